//! Test harness for Portico's end-to-end tests: the lab crate's namespaces, daemon
//! launchers and traffic (re-exported from `portico-lab`), plus helpers only tests and
//! benchmarks use ([`fibnet`], [`sctp`]).
//!
//! Traffic in these tests only ever flows between namespaces the test created itself.

pub mod fibnet;
pub mod sctp;

pub use portico_lab::{
    control, lab, netns, peers, probe, progress, require_root, standalone, topology, traffic,
    NetNs, TestNet,
};
