//! Userspace side of Portico's XDP fast path: the loader for the XDP program built from
//! `xdp-lb/ebpf` (embedded at build time), the pure Maglev table builder, and the
//! [`Balancer`] API that the controller drives (with an in-memory fake for its tests).

pub mod balancer;
pub mod decap;
pub mod maglev;
mod pin;
pub mod program;

pub use balancer::{
    stable_key, BackendSpec, Balancer, BalancerError, DsrConfig, Encapsulation, FakeBalancer,
    Forwarding, NodeConfig, Protocol, ServiceKey, ServiceSpec, XdpBalancer, XlatPrefix,
    DEFAULT_GUE_PORT, WELL_KNOWN_XLAT_PREFIX,
};
pub use decap::{Decap, DecapConfig};
pub use program::{verdict, AttachMode, LoadOptions, Stats, TestRunOutput, XdpError, XdpProgram};
