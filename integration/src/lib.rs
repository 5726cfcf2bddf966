//! Test harness for Portico's end-to-end tests: throwaway network namespaces joined by veth,
//! child processes reaped on drop, and (in later modules) real BGP peers and the lab.
//!
//! Traffic in these tests only ever flows between namespaces the test created itself.

pub mod fibnet;
pub mod lab;
pub mod netns;
pub mod peers;
pub mod traffic;

pub use netns::{require_root, NetNs, TestNet};
