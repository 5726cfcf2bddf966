//! Real BGP daemons from Debian — BIRD 2, FRR 8 and GoBGP 3 — as test peers.
//!
//! [`RealPeer::start`] writes a generated configuration into a private directory under
//! `/tmp` (removed on drop), starts the daemon in the foreground inside a test namespace and
//! waits until its control socket answers. The peer is then driven and inspected through the
//! daemon's own CLI: session state, the routes it holds (with communities, large communities,
//! LOCAL_PREF, MED and the graceful-restart stale mark), routes it originates itself, and
//! process control (freeze with SIGSTOP, thaw, restart).
//!
//! Every daemon is configured for fast tests: connect-retry and the idle / error back-off
//! timers are 1 s, so a session comes back within a couple of seconds after a failure.
//!
//! Nothing here touches the root namespace: the daemons run inside the namespace given to
//! them, their sockets, pid files and logs live in the private directory, and the process
//! (which [`RealPeer`] owns) is killed and reaped on drop. A [`crate::TestNet`] dropping
//! afterwards also kills whatever is left in its namespaces.

mod bird;
mod frr;
mod gobgp;

use std::{
    fmt,
    fs::File,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;

use crate::NetNs;

/// How often the `wait_*` helpers poll the daemon.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// How long a daemon may take until its control socket answers.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Which BGP implementation runs the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKind {
    /// BIRD 2 (`bird`, queried with `birdc`).
    Bird,
    /// FRR 8 (`/usr/lib/frr/bgpd` without zebra, queried with `vtysh`).
    Frr,
    /// GoBGP 3 (`gobgpd`, queried with `gobgp` over its gRPC API on loopback).
    Gobgp,
}

impl PeerKind {
    /// All three implementations.
    pub const ALL: [Self; 3] = [Self::Bird, Self::Frr, Self::Gobgp];

    /// Short lower-case name (`bird`, `frr`, `gobgp`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Bird => "bird",
            Self::Frr => "frr",
            Self::Gobgp => "gobgp",
        }
    }
}

impl fmt::Display for PeerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An address family a session carries (unicast only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 unicast (AFI 1, SAFI 1).
    Ipv4,
    /// IPv6 unicast (AFI 2, SAFI 1).
    Ipv6,
}

impl Family {
    /// The family of `addr`.
    pub fn of(addr: IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::Ipv4,
            IpAddr::V6(_) => Self::Ipv6,
        }
    }
}

/// How the session's IP TTL is set and checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtlMode {
    /// The daemon's default: TTL 1 for eBGP, 64/255 for iBGP.
    #[default]
    Default,
    /// eBGP multihop with this outgoing TTL.
    ///
    /// BIRD then resolves next hops recursively, which needs an IGP table these tests do not
    /// build; use it for session tests, not for route tests, with BIRD.
    Multihop(u8),
    /// GTSM (RFC 5082): send with TTL 255 and accept only TTL 255 (single hop).
    Gtsm,
}

/// One configured BGP neighbor of a [`RealPeer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbor {
    /// The neighbor's address; also identifies the session in queries.
    pub addr: IpAddr,
    /// The neighbor's AS (4-byte ASNs are fine); equal to the local AS makes it iBGP.
    pub asn: u32,
    /// The neighbor's TCP port, when not 179.
    pub port: Option<u16>,
    /// Never connect, only accept.
    pub passive: bool,
    /// TCP MD5 signature password (RFC 2385).
    pub md5_password: Option<String>,
    /// TTL handling (multihop, GTSM).
    pub ttl: TtlMode,
    /// Graceful restart (RFC 4724) with this restart time in seconds.
    pub graceful_restart: Option<u16>,
    /// Families negotiated on the session.
    pub families: Vec<Family>,
}

impl Neighbor {
    /// A plain active neighbor on port 179 carrying the family of its address.
    pub fn new(addr: IpAddr, asn: u32) -> Self {
        Self {
            addr,
            asn,
            port: None,
            passive: false,
            md5_password: None,
            ttl: TtlMode::Default,
            graceful_restart: None,
            families: vec![Family::of(addr)],
        }
    }

    /// Connects to `port` instead of 179.
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Only accepts connections, never opens one.
    #[must_use]
    pub fn passive(mut self) -> Self {
        self.passive = true;
        self
    }

    /// Signs the session with TCP MD5.
    #[must_use]
    pub fn md5(mut self, password: &str) -> Self {
        self.md5_password = Some(password.to_owned());
        self
    }

    /// Sets the TTL mode.
    #[must_use]
    pub fn ttl(mut self, ttl: TtlMode) -> Self {
        self.ttl = ttl;
        self
    }

    /// Enables graceful restart with `restart_time` seconds.
    #[must_use]
    pub fn graceful_restart(mut self, restart_time: u16) -> Self {
        self.graceful_restart = Some(restart_time);
        self
    }

    /// Replaces the negotiated families.
    #[must_use]
    pub fn families(mut self, families: &[Family]) -> Self {
        self.families = families.to_vec();
        self
    }

    fn carries(&self, family: Family) -> bool {
        self.families.contains(&family)
    }
}

/// Everything a daemon's generated configuration is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The implementation to run.
    pub kind: PeerKind,
    /// BGP identifier.
    pub router_id: Ipv4Addr,
    /// Local AS.
    pub local_asn: u32,
    /// Source addresses: a neighbor's session uses the one of its family, if any.
    pub local_addrs: Vec<IpAddr>,
    /// Configured sessions.
    pub neighbors: Vec<Neighbor>,
    /// ConnectRetry (and idle / error back-off) time in seconds; 1 by default.
    pub connect_retry_secs: u16,
    /// Proposed hold time in seconds (at least 3); keepalive is a third of it. 9 by default.
    pub hold_time: u16,
    /// BIRD only: install BGP routes into the namespace's kernel tables (ECMP merged), as
    /// a router in front of Portico nodes does.
    pub kernel_export: bool,
}

impl PeerConfig {
    /// A peer of `kind` with no neighbors, connect-retry 1 s and hold time 9 s.
    pub fn new(kind: PeerKind, router_id: Ipv4Addr, local_asn: u32) -> Self {
        Self {
            kind,
            router_id,
            local_asn,
            local_addrs: Vec::new(),
            neighbors: Vec::new(),
            connect_retry_secs: 1,
            hold_time: 9,
            kernel_export: false,
        }
    }

    /// Adds a source address.
    #[must_use]
    pub fn local_addr(mut self, addr: IpAddr) -> Self {
        self.local_addrs.push(addr);
        self
    }

    /// Adds a neighbor.
    #[must_use]
    pub fn neighbor(mut self, neighbor: Neighbor) -> Self {
        self.neighbors.push(neighbor);
        self
    }

    /// Sets the proposed hold time (seconds, at least 3).
    /// Installs received BGP routes into the kernel (BIRD only), multipath merged.
    #[must_use]
    pub fn kernel_export(mut self) -> Self {
        self.kernel_export = true;
        self
    }

    #[must_use]
    pub fn hold_time(mut self, secs: u16) -> Self {
        self.hold_time = secs;
        self
    }

    /// Keepalive interval: a third of the hold time, at least 1 s.
    pub fn keepalive_time(&self) -> u16 {
        (self.hold_time / 3).max(1)
    }

    /// The configured source address of `addr`'s family, if any.
    fn local_addr_for(&self, addr: IpAddr) -> Option<IpAddr> {
        self.local_addrs
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == addr.is_ipv4())
    }

    fn neighbor_index(&self, addr: IpAddr) -> Result<usize> {
        self.neighbors
            .iter()
            .position(|n| n.addr == addr)
            .with_context(|| format!("{addr} is not a configured neighbor"))
    }

    fn validate(&self) -> Result<()> {
        if self.hold_time < 3 {
            bail!("hold time {} s is below the minimum of 3 s", self.hold_time);
        }
        if self.connect_retry_secs == 0 {
            bail!("connect-retry must be at least 1 s");
        }
        for n in &self.neighbors {
            if n.families.is_empty() {
                bail!("neighbor {} carries no family", n.addr);
            }
            if let Some(pw) = &n.md5_password {
                if pw.is_empty() || pw.contains(['"', '\\', '\n', ' ']) {
                    bail!("MD5 password for {} must be non-empty without quotes, backslashes or spaces", n.addr);
                }
            }
        }
        Ok(())
    }
}

/// RFC 4271 session state as the daemon reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionState {
    /// Idle (also BIRD's `Close` and FRR's `Clearing` / `Deleted`).
    Idle,
    /// Connect.
    Connect,
    /// Active.
    Active,
    /// OpenSent.
    OpenSent,
    /// OpenConfirm.
    OpenConfirm,
    /// Established.
    Established,
}

impl SessionState {
    /// Parses the state names BIRD and FRR print (case-insensitive).
    fn from_name(name: &str) -> Result<Self> {
        Ok(match name.to_ascii_lowercase().as_str() {
            "idle" | "close" | "clearing" | "deleted" | "down" => Self::Idle,
            "connect" => Self::Connect,
            // BIRD shows an idle passive neighbour as "Passive": waiting for the peer to
            // connect, which RFC 4271 calls Active.
            "active" | "passive" => Self::Active,
            "opensent" => Self::OpenSent,
            "openconfirm" => Self::OpenConfirm,
            "established" => Self::Established,
            other => bail!("unknown BGP session state {other:?}"),
        })
    }
}

/// One route as the daemon holds it (the best path for its prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The prefix.
    pub prefix: IpNet,
    /// BGP next hop; `None` for routes the daemon originates itself.
    pub next_hop: Option<IpAddr>,
    /// AS numbers of the AS_PATH in order (sets flattened); empty for local routes.
    pub as_path: Vec<u32>,
    /// COMMUNITIES (RFC 1997) as `(asn, value)`.
    pub communities: Vec<(u16, u16)>,
    /// LARGE_COMMUNITIES (RFC 8092) as `(global, local1, local2)`.
    pub large_communities: Vec<(u32, u32, u32)>,
    /// LOCAL_PREF, when the daemon shows one (BIRD shows it for eBGP routes too).
    pub local_pref: Option<u32>,
    /// MULTI_EXIT_DISC, when present.
    pub med: Option<u32>,
    /// Kept as stale during a neighbor's graceful restart.
    pub stale: bool,
}

/// A route the daemon originates itself (see [`RealPeer::announce`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The prefix.
    pub prefix: IpNet,
    /// Communities attached.
    pub communities: Vec<(u16, u16)>,
    /// Large communities attached.
    pub large_communities: Vec<(u32, u32, u32)>,
    /// MED attached.
    pub med: Option<u32>,
    /// LOCAL_PREF attached (only sent over iBGP).
    pub local_pref: Option<u32>,
}

impl Announcement {
    /// `prefix` with no optional attributes.
    pub fn new(prefix: IpNet) -> Self {
        Self {
            prefix: prefix.trunc(),
            communities: Vec::new(),
            large_communities: Vec::new(),
            med: None,
            local_pref: None,
        }
    }

    /// Adds a community.
    #[must_use]
    pub fn community(mut self, asn: u16, value: u16) -> Self {
        self.communities.push((asn, value));
        self
    }

    /// Adds a large community.
    #[must_use]
    pub fn large_community(mut self, global: u32, local1: u32, local2: u32) -> Self {
        self.large_communities.push((global, local1, local2));
        self
    }

    /// Sets the MED.
    #[must_use]
    pub fn med(mut self, med: u32) -> Self {
        self.med = Some(med);
        self
    }

    /// Sets LOCAL_PREF.
    #[must_use]
    pub fn local_pref(mut self, local_pref: u32) -> Self {
        self.local_pref = Some(local_pref);
        self
    }

    fn family(&self) -> Family {
        Family::of(self.prefix.addr())
    }
}

/// What a daemon module needs to run its CLI.
struct Ctl<'a> {
    ns: &'a NetNs,
    dir: &'a Path,
    config: &'a PeerConfig,
}

impl Ctl<'_> {
    /// Runs `args` inside the namespace and returns stdout.
    fn run(&self, args: &[&str]) -> Result<String> {
        self.ns.run(args)
    }
}

/// A running BGP daemon in a test namespace, owned by the test.
///
/// Dropping it kills and reaps the daemon and removes its directory.
pub struct RealPeer {
    ns: NetNs,
    config: PeerConfig,
    announcements: Vec<Announcement>,
    dir: tempfile::TempDir,
    /// The BGP daemon.
    child: Option<Child>,
    /// Processes the daemon needs, started once before it (FRR's zebra).
    helpers: Vec<Child>,
}

impl fmt::Debug for RealPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RealPeer")
            .field("kind", &self.config.kind)
            .field("ns", &self.ns.name())
            .field("dir", &self.dir.path())
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish_non_exhaustive()
    }
}

impl RealPeer {
    /// Writes the configuration, starts the daemon inside `ns` and waits (up to 15 s) until
    /// its control socket answers.
    ///
    /// # Errors
    /// The configuration is invalid, the daemon cannot start, exits, or its control socket
    /// does not answer in time (the error carries the tail of the daemon's log).
    pub fn start(ns: &NetNs, config: PeerConfig) -> Result<Self> {
        config.validate()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("ptc-{}-", config.kind))
            .tempdir_in("/tmp")
            .context("creating the peer's directory under /tmp")?;
        let mut peer = Self {
            ns: ns.clone(),
            config,
            announcements: Vec::new(),
            dir,
            child: None,
            helpers: Vec::new(),
        };
        let helpers = match peer.config.kind {
            PeerKind::Frr => frr::helpers(&peer.ctl())?,
            PeerKind::Bird | PeerKind::Gobgp => Vec::new(),
        };
        for helper in helpers {
            let child = peer.spawn(&helper.argv)?;
            peer.helpers.push(child);
            peer.wait_for_file(&helper.ready)?;
        }
        peer.launch()?;
        Ok(peer)
    }

    /// The implementation.
    pub fn kind(&self) -> PeerKind {
        self.config.kind
    }

    /// The configuration the daemon runs with.
    pub fn config(&self) -> &PeerConfig {
        &self.config
    }

    /// The namespace the daemon runs in.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// The private directory holding configuration, sockets and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id of the daemon (the BGP process itself: `bird`, `bgpd`, `gobgpd`);
    /// `None` after [`RealPeer::crash`] until the next [`RealPeer::restart`].
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn running_pid(&self) -> Result<u32> {
        self.pid()
            .with_context(|| format!("{} is not running", self.config.kind))
    }

    /// The daemon's session state towards `neighbor`.
    ///
    /// # Errors
    /// `neighbor` is not configured, or the control command fails.
    pub fn session_state(&self, neighbor: IpAddr) -> Result<SessionState> {
        let ctl = self.ctl();
        match self.config.kind {
            PeerKind::Bird => bird::session_state(&ctl, neighbor),
            PeerKind::Frr => frr::session_state(&ctl, neighbor),
            PeerKind::Gobgp => gobgp::session_state(&ctl, neighbor),
        }
    }

    /// Polls until `done(state)` holds for the session towards `neighbor`.
    ///
    /// # Errors
    /// It does not within `timeout` (the error names the last state and carries the log tail).
    pub fn wait_state(
        &self,
        neighbor: IpAddr,
        what: &str,
        done: impl Fn(SessionState) -> bool,
        timeout: Duration,
    ) -> Result<SessionState> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.session_state(neighbor);
            if let Ok(s) = &state {
                if done(*s) {
                    return Ok(*s);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} in {}: session to {neighbor} not {what} after {timeout:?} (last: {state:?})\n{}",
                    self.config.kind,
                    self.ns.name(),
                    self.log_tail()
                );
            }
            self.check_alive()?;
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until the session towards `neighbor` is Established.
    ///
    /// # Errors
    /// It is not within `timeout`.
    pub fn wait_established(&self, neighbor: IpAddr, timeout: Duration) -> Result<()> {
        self.wait_state(
            neighbor,
            "Established",
            |s| s == SessionState::Established,
            timeout,
        )
        .map(drop)
    }

    /// Waits until the session towards `neighbor` has left Established.
    ///
    /// # Errors
    /// It has not within `timeout`.
    pub fn wait_down(&self, neighbor: IpAddr, timeout: Duration) -> Result<SessionState> {
        self.wait_state(
            neighbor,
            "down",
            |s| s != SessionState::Established,
            timeout,
        )
    }

    /// Checks for `period` that the session towards `neighbor` never reaches Established.
    ///
    /// # Errors
    /// It does, or the daemon dies.
    pub fn expect_never_established(&self, neighbor: IpAddr, period: Duration) -> Result<()> {
        let deadline = Instant::now() + period;
        while Instant::now() < deadline {
            if self.session_state(neighbor)? == SessionState::Established {
                bail!(
                    "{}: session to {neighbor} came up, but it must stay down",
                    self.config.kind
                );
            }
            self.check_alive()?;
            thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    /// The best route per prefix the daemon holds, IPv4 and IPv6, including its own.
    ///
    /// Reads `birdc show route all`, `gobgp -j global rib`, or `vtysh` JSON (one detail query
    /// per prefix, batched), so use [`RealPeer::route_count`] for large tables.
    ///
    /// # Errors
    /// The control command fails or prints something unparsable.
    pub fn routes(&self) -> Result<Vec<Route>> {
        let ctl = self.ctl();
        let mut routes = match self.config.kind {
            PeerKind::Bird => bird::routes(&ctl),
            PeerKind::Frr => frr::routes(&ctl),
            PeerKind::Gobgp => gobgp::routes(&ctl),
        }
        .with_context(|| format!("reading routes from {}", self.config.kind))?;
        routes.sort_by_key(|r| r.prefix);
        Ok(routes)
    }

    /// The number of prefixes in the daemon's IPv4 and IPv6 tables (cheap, for big tables).
    ///
    /// # Errors
    /// The control command fails or prints something unparsable.
    pub fn route_count(&self) -> Result<usize> {
        let ctl = self.ctl();
        match self.config.kind {
            PeerKind::Bird => bird::route_count(&ctl),
            PeerKind::Frr => frr::route_count(&ctl),
            PeerKind::Gobgp => gobgp::route_count(&ctl),
        }
        .with_context(|| format!("counting routes in {}", self.config.kind))
    }

    /// The route for `prefix`, if the daemon holds one.
    ///
    /// # Errors
    /// As [`RealPeer::routes`].
    pub fn route(&self, prefix: IpNet) -> Result<Option<Route>> {
        Ok(self.routes()?.into_iter().find(|r| r.prefix == prefix))
    }

    /// Polls [`RealPeer::routes`] until `done` holds and returns those routes.
    ///
    /// # Errors
    /// It does not within `timeout` (the error shows the last table and the log tail).
    pub fn wait_routes(
        &self,
        done: impl Fn(&[Route]) -> bool,
        timeout: Duration,
    ) -> Result<Vec<Route>> {
        let deadline = Instant::now() + timeout;
        loop {
            let routes = self.routes();
            if let Ok(r) = &routes {
                if done(r) {
                    return routes;
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} in {}: routes not as expected after {timeout:?}; last: {routes:#?}\n{}",
                    self.config.kind,
                    self.ns.name(),
                    self.log_tail()
                );
            }
            self.check_alive()?;
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Polls [`RealPeer::route_count`] until it reaches at least `n`; returns the count.
    ///
    /// # Errors
    /// It does not within `timeout`.
    pub fn wait_route_count(&self, n: usize, timeout: Duration) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let count = self.route_count();
            if let Ok(c) = count {
                if c >= n {
                    return Ok(c);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: {count:?} routes after {timeout:?}, waiting for {n}",
                    self.config.kind
                );
            }
            self.check_alive()?;
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Makes the daemon originate `announcement` (replacing one for the same prefix).
    /// Announcements survive [`RealPeer::restart`].
    ///
    /// # Errors
    /// The daemon rejects it.
    pub fn announce(&mut self, announcement: Announcement) -> Result<()> {
        self.announce_many([announcement])
    }

    /// Originates many routes at once: one reconfiguration for BIRD, batched vtysh calls for
    /// FRR (fast for routes without attributes; each route with attributes needs its own
    /// route-map, which costs bgpd tens of milliseconds); GoBGP still takes one `gobgp` call
    /// per route (about 10 ms each).
    ///
    /// # Errors
    /// The daemon rejects one of them.
    pub fn announce_many(
        &mut self,
        announcements: impl IntoIterator<Item = Announcement>,
    ) -> Result<()> {
        let batch: Vec<Announcement> = announcements.into_iter().collect();
        let mut known: std::collections::HashMap<IpNet, usize> = self
            .announcements
            .iter()
            .enumerate()
            .map(|(i, a)| (a.prefix, i))
            .collect();
        let mut previous = Vec::with_capacity(batch.len());
        for a in &batch {
            match known.get(&a.prefix) {
                Some(&i) => {
                    previous.push(Some(std::mem::replace(
                        &mut self.announcements[i],
                        a.clone(),
                    )));
                }
                None => {
                    known.insert(a.prefix, self.announcements.len());
                    self.announcements.push(a.clone());
                    previous.push(None);
                }
            }
        }
        let ctl = self.ctl();
        match self.config.kind {
            PeerKind::Bird => bird::apply_announcements(&ctl, &self.announcements),
            PeerKind::Frr => frr::announce(&ctl, &batch, &previous),
            PeerKind::Gobgp => batch.iter().try_for_each(|a| gobgp::announce(&ctl, a)),
        }
        .with_context(|| format!("{} announcing {} routes", self.config.kind, batch.len()))
    }

    /// Stops originating `prefix`.
    ///
    /// # Errors
    /// It was not announced, or the daemon rejects the withdrawal.
    pub fn withdraw(&mut self, prefix: IpNet) -> Result<()> {
        let prefix = prefix.trunc();
        let index = self
            .announcements
            .iter()
            .position(|a| a.prefix == prefix)
            .with_context(|| format!("{prefix} is not announced"))?;
        let gone = self.announcements.remove(index);
        let ctl = self.ctl();
        match self.config.kind {
            PeerKind::Bird => bird::apply_announcements(&ctl, &self.announcements),
            PeerKind::Frr => frr::withdraw(&ctl, &gone),
            PeerKind::Gobgp => gobgp::withdraw(&ctl, &gone),
        }
        .with_context(|| format!("{} withdrawing {prefix}", self.config.kind))
    }

    /// Freezes the daemon (SIGSTOP): it stops sending keepalives, so neighbors drop the
    /// session after the hold time.
    ///
    /// # Errors
    /// kill(2) fails.
    pub fn stop(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// Thaws a frozen daemon (SIGCONT).
    ///
    /// # Errors
    /// kill(2) fails.
    pub fn cont(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Stops the daemon if it runs (SIGTERM, SIGKILL after 5 s) and starts it again with the
    /// same configuration and announcements; returns once the control socket answers.
    ///
    /// # Errors
    /// As [`RealPeer::start`].
    pub fn restart(&mut self) -> Result<()> {
        self.terminate(libc::SIGTERM);
        self.launch()
    }

    /// Kills the daemon with SIGKILL, as in a crash: no NOTIFICATION, the kernel closes its
    /// TCP connections. It stays down until [`RealPeer::restart`].
    pub fn crash(&mut self) {
        self.terminate(libc::SIGKILL);
    }

    /// The last lines of the daemon's log (stdout and stderr), for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        format!(
            "--- {} log ({}) ---\n{tail}",
            self.config.kind,
            self.log_path().display()
        )
    }

    fn ctl(&self) -> Ctl<'_> {
        Ctl {
            ns: &self.ns,
            dir: self.dir.path(),
            config: &self.config,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// Starts `argv` in the namespace with output appended to the log.
    fn spawn(&self, argv: &[String]) -> Result<Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("opening the daemon log")?;
        let (program, args) = argv.split_first().context("empty daemon command")?;
        // `ip netns exec` execs the program in place: the child's pid is the daemon's.
        self.ns
            .command(program)
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {argv:?} in {}", self.ns.name()))
    }

    /// Waits until a helper has created `path` (its socket).
    fn wait_for_file(&self, path: &Path) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while !path.exists() {
            if Instant::now() >= deadline {
                bail!(
                    "{} did not appear within {START_TIMEOUT:?}\n{}",
                    path.display(),
                    self.log_tail()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    /// Writes the configuration, spawns the daemon and waits for its control socket.
    fn launch(&mut self) -> Result<()> {
        let ctl = self.ctl();
        let argv = match self.config.kind {
            PeerKind::Bird => bird::prepare(&ctl, &self.announcements)?,
            PeerKind::Frr => frr::prepare(&ctl, &self.announcements)?,
            PeerKind::Gobgp => gobgp::prepare(&ctl)?,
        };
        self.child = Some(self.spawn(&argv)?);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            self.check_alive()?;
            let ctl = self.ctl();
            let probe = match self.config.kind {
                PeerKind::Bird => bird::probe(&ctl),
                PeerKind::Frr => frr::probe(&ctl),
                PeerKind::Gobgp => gobgp::probe(&ctl),
            };
            match probe {
                Ok(()) => break,
                Err(e) if Instant::now() >= deadline => {
                    return Err(e.context(format!(
                        "{} did not answer on its control socket within {START_TIMEOUT:?}\n{}",
                        self.config.kind,
                        self.log_tail()
                    )));
                }
                Err(_) => thread::sleep(POLL_INTERVAL),
            }
        }
        if self.config.kind == PeerKind::Gobgp {
            let ctl = self.ctl();
            for a in &self.announcements {
                gobgp::announce(&ctl, a)?;
            }
        }
        Ok(())
    }

    /// Fails when the daemon has exited.
    fn check_alive(&self) -> Result<()> {
        // try_wait needs &mut; a zero-timeout waitid with WNOWAIT leaves the child reapable.
        let pid = self.running_pid()?;
        // SAFETY: siginfo_t is plain data; waitid only writes into it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waitid on our own child with WNOHANG | WNOWAIT does not reap it.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        // SAFETY: si_pid is valid to read for the WEXITED case; 0 when nothing happened.
        if rc == 0 && unsafe { info.si_pid() } != 0 {
            bail!(
                "{} (pid {pid}) exited\n{}",
                self.config.kind,
                self.log_tail()
            );
        }
        Ok(())
    }

    fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.running_pid()?).context("pid out of range")?;
        // SAFETY: kill(2) on our own, not yet reaped child.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("signalling {} (pid {pid})", self.config.kind));
        }
        Ok(())
    }

    /// Sends `signal` (then SIGKILL after 5 s) and reaps the daemon. A frozen daemon is
    /// thawed first so that it can act on SIGTERM.
    fn terminate(&mut self, signal: libc::c_int) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            // SAFETY: kill(2) on our own, not yet reaped child.
            unsafe {
                libc::kill(pid, signal);
                libc::kill(pid, libc::SIGCONT);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Set to keep each peer's directory (config, log) after the test, for debugging.
pub const KEEP_DIRS_ENV: &str = "PORTICO_KEEP_PEER_DIRS";

impl Drop for RealPeer {
    fn drop(&mut self) {
        if std::env::var_os(KEEP_DIRS_ENV).is_some() {
            self.dir.disable_cleanup(true);
        }
        for mut child in self.child.take().into_iter().chain(self.helpers.drain(..)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A process started before the daemon, ready once `ready` exists.
struct Helper {
    argv: Vec<String>,
    ready: PathBuf,
}

/// Parses `a:b` (FRR and GoBGP print communities this way).
fn parse_community(s: &str) -> Result<(u16, u16)> {
    // FRR's JSON spells these `noExport`, its CLI `no-export`.
    let name: String = s
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let well_known = match name.as_str() {
        "gracefulshutdown" | "gshut" => Some(0x0000),
        "acceptown" => Some(0x0001),
        "llgrstale" => Some(0x0006),
        "nollgr" => Some(0x0007),
        "blackhole" => Some(0x029a),
        "noexport" => Some(0xff01),
        "noadvertise" => Some(0xff02),
        "localas" | "noexportsubconfed" => Some(0xff03),
        "nopeer" => Some(0xff04),
        _ => None,
    };
    if let Some(value) = well_known {
        return Ok((0xffff, value));
    }
    let (a, b) = s
        .split_once(':')
        .with_context(|| format!("bad community {s:?}"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

/// Parses `a:b:c`.
fn parse_large_community(s: &str) -> Result<(u32, u32, u32)> {
    let mut parts = s.split(':').map(|p| p.trim().parse::<u32>());
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), Some(c), None) => Ok((a?, b?, c?)),
        _ => bail!("bad large community {s:?}"),
    }
}

/// All AS numbers in an AS path string, ignoring set/confed punctuation (`{`, `}`, `(`, `)`).
fn parse_as_path(s: &str) -> Result<Vec<u32>> {
    s.split(|c: char| c.is_whitespace() || "{}(),[]".contains(c))
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("bad AS {t:?} in {s:?}"))
        })
        .collect()
}

/// `None` for the unspecified address (how daemons show "self").
fn specified(addr: IpAddr) -> Option<IpAddr> {
    (!addr.is_unspecified()).then_some(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn communities_parse_with_well_known_names() {
        assert_eq!(parse_community("65000:7").unwrap(), (65000, 7));
        assert_eq!(parse_community("no-export").unwrap(), (0xffff, 0xff01));
        assert_eq!(parse_community("noExport").unwrap(), (0xffff, 0xff01));
        assert!(parse_community("65000").is_err());
        assert_eq!(
            parse_large_community("4200000001:1:2").unwrap(),
            (4_200_000_001, 1, 2)
        );
        assert!(parse_large_community("1:2").is_err());
    }

    #[test]
    fn bird_s_passive_state_reads_as_active() {
        assert_eq!(
            SessionState::from_name("Passive").unwrap(),
            SessionState::Active
        );
        assert!(SessionState::from_name("Sleeping").is_err());
    }

    #[test]
    fn as_paths_flatten_sets() {
        assert_eq!(
            parse_as_path("4200000002 65000 {1,2}").unwrap(),
            vec![4_200_000_002, 65000, 1, 2]
        );
        assert_eq!(parse_as_path("").unwrap(), Vec::<u32>::new());
    }
}
