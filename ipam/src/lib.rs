//! Portico's address allocator (LB-IPAM). Pure: plain data in, decisions out; no
//! Kubernetes client, no async runtime, no I/O. The controller turns API objects into
//! [`Pool`]s (through [`Pool::parse`]) and [`Consumer`]s (through [`parse_requests`]),
//! feeds them to an [`Allocator`], and writes back what it answers.
//!
//! The rules are described in `docs/ipam.md`.

mod allocator;
mod consumer;
mod family;
mod occupied;
mod pool;
mod requests;
mod selector;

pub use allocator::{
    Allocation, Allocator, Notice, PoolState, PoolStatus, Released, Unsatisfied, Usage,
    DEFAULT_GRACE_PERIOD,
};
pub use consumer::{
    Consumer, ConsumerId, ConsumerKind, CrossNamespace, FamilyPolicy, PortProtocol, Protocol,
    Requests, Sharing, TrafficPolicy,
};
pub use family::Family;
pub use pool::{
    parse_selector, AddrRange, Pool, RawBlock, RawPoolSpec, RawRequirement, RawSelector, SpecError,
    SpecErrors, SERVICE_NAMESPACE_LABEL, SERVICE_NAME_LABEL,
};
pub use requests::{
    parse_requests, RequestError, ALIASES, IPS, POOL, SHARING_CROSS_NAMESPACE, SHARING_KEY,
};
pub use selector::{LabelSelector, Labels, Operator, Requirement};
