//! What `portico lab` needs at run time: throwaway network namespaces joined by veth
//! ([`netns`]), real BGP daemons ([`peers`]), traffic clients and backends ([`traffic`]),
//! the lab itself (a BIRD router with ECMP over two nodes running `portico standalone`:
//! [`topology`]), the commands around it ([`control`], with [`progress`] lines), and the
//! smaller topologies the XDP and standalone tests use ([`lab`], [`standalone`]). The test-only helpers (fixture namespaces, benchmarks) live in
//! `portico-integration`, which re-exports this crate; the shipped binary links only this.
//!
//! Traffic only ever flows between namespaces created here.

pub mod control;
pub mod lab;
pub mod netns;
pub mod peers;
pub mod probe;
pub mod progress;
pub mod standalone;
pub mod topology;
pub mod traffic;

pub use netns::{require_root, NetNs, TestNet};
