//! Portico's BGP announcer.
//!
//! - [`session`]: the sans-IO RFC 4271 session (FSM, timers, capabilities, Adj-RIB-Out).
//! - [`wire`] and [`update`]: the message codec (OPEN through netgauze-bgp-pkt; UPDATE
//!   packing and RFC 7606 inspection by hand).
//! - [`driver`]: the thin tokio driver ([`driver::Speaker`]) with TCP MD5, GTSM and TTL.
//! - [`decision`]: which addresses a node announces, and aggregation.
//! - [`netlink`]: holding announced addresses on a local link (dummy, else bridge).

pub mod decision;
pub mod driver;
pub mod netlink;
pub mod session;
mod sockopt;
#[doc(hidden)]
pub mod testing;
mod timer;
pub mod update;
pub mod wire;

pub use session::{Command, Direction, Event, Negotiated, Session, SessionConfig, State};
pub use update::{LargeCommunity, RouteAttrs};
pub use wire::{Family, Notification};

/// Errors of the announcer crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A socket operation failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Configuration that cannot work.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The speaker task is gone.
    #[error("speaker has shut down")]
    Shutdown,
    /// No peer with that address.
    #[error("unknown peer {0}")]
    UnknownPeer(std::net::IpAddr),
}
