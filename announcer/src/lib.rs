//! Portico's BGP announcer.
//!
//! - [`session`]: the sans-IO RFC 4271 session (FSM, timers, capabilities, Adj-RIB-Out).
//! - [`wire`] and [`update`]: the message codec (OPEN through netgauze-bgp-pkt; UPDATE
//!   packing and RFC 7606 inspection by hand).
//! - [`config`]: plain peer configuration ([`config::PeerConfig`]), free of tokio.
//! - [`driver`]: the thin tokio driver (`driver::Speaker`) with TCP MD5, GTSM and TTL.
//! - [`decision`]: aggregation of announced addresses into prefixes.
//! - [`netlink`]: holding announced addresses on a local link (dummy, else bridge).
//!
//! The driver and netlink need the default-on cargo feature `driver` (tokio, rtnetlink,
//! libc). Without it the crate is the sans-IO core and plain types, for API crates such
//! as `portico-crds`; [`driver`] then only re-exports the configuration types.

pub mod config;
pub mod decision;
#[cfg(feature = "driver")]
pub mod driver;
/// Without the `driver` feature: only the configuration types, so paths such as
/// `driver::TtlMode` keep resolving.
#[cfg(not(feature = "driver"))]
pub mod driver {
    pub use crate::config::{PeerConfig, TtlMode};
}
#[cfg(feature = "driver")]
pub mod netlink;
pub mod session;
#[cfg(feature = "driver")]
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
