//! Plain configuration types of a speaker's peers, free of tokio so API crates (the CRDs)
//! can name them without pulling in the driver.

use std::net::IpAddr;

use crate::session::SessionConfig;

/// How outgoing TTL and incoming TTL checks are set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TtlMode {
    /// eBGP: TTL 1 (directly connected); iBGP: the system default.
    #[default]
    Default,
    /// GTSM (RFC 5082): send with TTL 255, accept only TTL 255 (single-hop eBGP).
    Gtsm,
    /// eBGP multihop: send with this TTL.
    Multihop(u8),
}

/// One peer of a speaker. Two configs are equal when a running session would not need
/// to restart to go from one to the other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's address (connections from elsewhere are not accepted for it).
    pub address: IpAddr,
    /// The peer's TCP port for active connections.
    pub port: u16,
    /// Local address to connect from.
    pub source_address: Option<IpAddr>,
    /// TCP MD5 signature password (RFC 2385).
    pub md5_password: Option<String>,
    /// TTL handling.
    pub ttl: TtlMode,
    /// Session parameters.
    pub session: SessionConfig,
}

impl PeerConfig {
    /// A peer on port 179 with default TTL handling and no password.
    pub fn new(address: IpAddr, session: SessionConfig) -> Self {
        PeerConfig {
            address,
            port: 179,
            source_address: None,
            md5_password: None,
            ttl: TtlMode::Default,
            session,
        }
    }
}
