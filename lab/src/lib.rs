//! What `portico lab` needs at run time: throwaway network namespaces joined by veth
//! ([`netns`]), real BGP daemons ([`peers`]), traffic clients and backends ([`traffic`]) and
//! the lab topology ([`lab`]). The test-only helpers (fixture namespaces, benchmarks) live in
//! `portico-integration`, which re-exports this crate; the shipped binary links only this.
//!
//! Traffic only ever flows between namespaces created here.

pub mod lab;
pub mod netns;
pub mod peers;
pub mod standalone;
pub mod traffic;

pub use netns::{require_root, NetNs, TestNet};
