//! One BGP session as a deterministic state machine (RFC 4271 §8), with no I/O.
//!
//! Inputs are `handle_*(now, ..)` calls; outputs are drained with [`Session::poll_transmit`],
//! [`Session::poll_event`] and [`Session::poll_timeout`]. The driver moves bytes, opens and
//! closes TCP connections when asked by [`Event::Connect`] / [`Event::Close`], and calls
//! [`Session::handle_timeout`] at the deadline. Drain transmits before acting on
//! [`Event::Close`], so a NOTIFICATION reaches the wire before the socket closes.
//!
//! A session owns at most one TCP connection. Connection collision detection (§6.8) needs
//! two: the driver runs a second `Session` for an inbound connection that arrives while
//! the first is connected, and calls [`resolve_collision`] with both after every input;
//! once both have the peer's OPEN it closes the loser with Cease / Connection Collision
//! Resolution (tested in `tests/session.rs`).
//!
//! The Adj-RIB-Out is desired state: [`Command::Replace`] sets it whole and the session
//! sends only the difference from what the peer already has; [`Command::Announce`] and
//! [`Command::Withdraw`] edit it. UPDATEs go out in prefix order (withdrawals first, then
//! one group per attribute set, groups ordered by their first prefix), so the same inputs
//! always give the same bytes.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;

use crate::timer::{Jitter, Timer, TimerTable};
use crate::update::{self, EncodeContext, InspectContext, RouteAttrs, UpdateSummary};
use crate::wire::{
    self, Capabilities, CeaseSubcode, ErrorCode, Family, FsmSubcode, GracefulRestartCap,
    HeaderSubcode, Message, Notification, Open, OpenSubcode, AS_TRANS, HEADER_LEN,
    MAX_EXTENDED_MESSAGE_LEN, MAX_MESSAGE_LEN,
};

/// Hold time used while waiting for the peer's OPEN (RFC 4271 §8.2.2 suggests 4 minutes).
const LARGE_HOLD_TIME: Duration = Duration::from_secs(240);

/// FSM state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    /// Refusing connections.
    Idle,
    /// Waiting for an outbound TCP connection.
    Connect,
    /// Listening for the peer to connect.
    Active,
    /// OPEN sent, waiting for the peer's.
    OpenSent,
    /// OPENs exchanged, waiting for a KEEPALIVE.
    OpenConfirm,
    /// Exchanging UPDATEs.
    Established,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Who opened the TCP connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// We connected to the peer.
    Outbound,
    /// The peer connected to us.
    Inbound,
}

/// Graceful restart settings (RFC 4724).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GracefulRestartConfig {
    /// Restart Time advertised, in seconds (at most 4095).
    pub restart_time: u16,
    /// Set the Restart State bit: this speaker has just restarted. Cleared after the first
    /// session reaches Established.
    pub restarting: bool,
    /// Set the Forwarding State bit for every family (the data plane kept forwarding).
    pub forwarding_state: bool,
}

/// Per-peer session settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionConfig {
    /// Our AS.
    pub local_as: u32,
    /// The AS the peer must present.
    pub peer_as: u32,
    /// Our BGP Identifier.
    pub router_id: Ipv4Addr,
    /// Proposed hold time in seconds (0 disables keepalives; otherwise at least 3).
    pub hold_time: u16,
    /// Keepalive interval in seconds; defaults to a third of the negotiated hold time.
    pub keepalive_time: Option<u16>,
    /// ConnectRetryTime.
    pub connect_retry_time: Duration,
    /// First automatic-restart delay after an error; doubles per consecutive failure up to
    /// `connect_retry_time`.
    pub idle_hold_time: Duration,
    /// DelayOpenTime (RFC 4271 optional attribute); `None` sends OPEN on connect.
    pub delay_open: Option<Duration>,
    /// Never connect out; only accept (PassiveTcpEstablishment).
    pub passive: bool,
    /// Families to offer (RFC 4760).
    pub families: Vec<Family>,
    /// Offer 4-octet AS numbers (RFC 6793).
    pub four_octet_as: bool,
    /// Offer route refresh (RFC 2918).
    pub route_refresh: bool,
    /// Offer extended messages (RFC 8654).
    pub extended_message: bool,
    /// Offer graceful restart (RFC 4724).
    pub graceful_restart: Option<GracefulRestartConfig>,
    /// IPv4 next hop; defaults to the local address of an IPv4 session.
    pub next_hop_v4: Option<Ipv4Addr>,
    /// IPv6 next hop; defaults to the local address of an IPv6 session, else the
    /// IPv4-mapped local address.
    pub next_hop_v6: Option<Ipv6Addr>,
}

impl SessionConfig {
    /// Defaults close to common daemons: hold 90 s, connect retry 120 s, both families,
    /// 4-octet AS, route refresh and extended messages offered.
    pub fn new(local_as: u32, peer_as: u32, router_id: Ipv4Addr) -> Self {
        SessionConfig {
            local_as,
            peer_as,
            router_id,
            hold_time: 90,
            keepalive_time: None,
            connect_retry_time: Duration::from_secs(120),
            idle_hold_time: Duration::from_secs(1),
            delay_open: None,
            passive: false,
            families: vec![Family::Ipv4Unicast, Family::Ipv6Unicast],
            four_octet_as: true,
            route_refresh: true,
            extended_message: true,
            graceful_restart: None,
            next_hop_v4: None,
            next_hop_v6: None,
        }
    }

    /// iBGP when both ends are in the same AS.
    pub fn is_ibgp(&self) -> bool {
        self.local_as == self.peer_as
    }
}

/// What the two OPENs agreed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// The peer's AS.
    pub peer_as: u32,
    /// The peer's BGP Identifier.
    pub peer_router_id: Ipv4Addr,
    /// Hold time in seconds (minimum of both).
    pub hold_time: u16,
    /// Keepalive interval in seconds.
    pub keepalive_time: u16,
    /// Families both offered (IPv4 unicast implied when the peer sent no MP capability).
    pub families: Vec<Family>,
    /// Both offered 4-octet AS.
    pub four_octet_as: bool,
    /// Both offered route refresh.
    pub route_refresh: bool,
    /// Both offered extended messages.
    pub extended_message: bool,
    /// Either side offered graceful restart (End-of-RIB is sent).
    pub graceful_restart: bool,
    /// The capabilities the peer sent.
    pub peer_capabilities: Capabilities,
    /// Connection endpoints.
    pub local: SocketAddr,
    /// Connection endpoints.
    pub remote: SocketAddr,
    /// Who connected.
    pub direction: Direction,
}

/// Instructions for the session.
#[derive(Clone, Debug)]
pub enum Command {
    /// ManualStart (passive when configured).
    Start,
    /// ManualStop: Cease / Administrative Shutdown, then Idle with no automatic restart.
    Stop,
    /// ManualStop with another Cease subcode (e.g. Administrative Reset before the driver
    /// restarts the peer with new configuration).
    StopWith(CeaseSubcode),
    /// Add or replace prefixes in the Adj-RIB-Out with these attributes.
    Announce {
        /// Prefixes.
        prefixes: Vec<IpNet>,
        /// Attributes.
        attrs: RouteAttrs,
    },
    /// Remove prefixes from the Adj-RIB-Out.
    Withdraw {
        /// Prefixes.
        prefixes: Vec<IpNet>,
    },
    /// Make the Adj-RIB-Out exactly `routes`: prefixes not in it are withdrawn, new or
    /// changed ones announced, unchanged ones not sent again.
    Replace {
        /// The complete set of routes the peer should carry.
        routes: BTreeMap<IpNet, RouteAttrs>,
    },
    /// Re-send the whole Adj-RIB-Out for a family (what a received ROUTE-REFRESH does).
    Resend(Family),
    /// Ask the peer to re-send its routes (sends ROUTE-REFRESH when negotiated).
    RequestRefresh(Family),
}

/// Something the driver or the operator should know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The FSM moved.
    StateChanged {
        /// Old state.
        from: State,
        /// New state.
        to: State,
    },
    /// Open an outbound TCP connection to the peer (abandon any attempt in progress).
    Connect,
    /// Close the TCP connection (after writing pending transmits).
    Close,
    /// The peer's OPEN was accepted (collision detection uses its identifier).
    OpenReceived {
        /// The peer's BGP Identifier.
        router_id: Ipv4Addr,
    },
    /// The session is up.
    Established(Box<Negotiated>),
    /// We sent a NOTIFICATION.
    NotificationSent(Notification),
    /// The peer sent a NOTIFICATION.
    NotificationReceived(Notification),
    /// An UPDATE was received and inspected (never installed).
    UpdateReceived(UpdateSummary),
    /// Prefixes of a family could not be announced: no next hop of that family is known.
    NoNextHop(Family),
}

/// A point-in-time view of the session for status reporting.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionStatus {
    /// FSM state.
    pub state: State,
    /// Time since Established.
    pub uptime: Option<Duration>,
    /// Negotiated parameters while OpenConfirm or Established.
    pub negotiated: Option<Negotiated>,
    /// Prefixes advertised, indexed by [`Family::index`].
    pub advertised: [usize; 2],
    /// Last NOTIFICATION sent, as text.
    pub last_notification_sent: Option<String>,
    /// Last NOTIFICATION received, as text.
    pub last_notification_received: Option<String>,
    /// UPDATEs received.
    pub updates_received: u64,
    /// UPDATEs sent.
    pub updates_sent: u64,
    /// Prefixes announced to us (counted, never installed).
    pub prefixes_received: u64,
    /// Prefixes withdrawn by the peer.
    pub withdrawals_received: u64,
    /// Times the session fell back to Idle or Active after a failure.
    pub connect_retry_counter: u32,
}

struct Conn {
    local: SocketAddr,
    remote: SocketAddr,
    direction: Direction,
}

/// A BGP session (see the module docs).
pub struct Session {
    config: SessionConfig,
    state: State,
    jitter: Jitter,
    timers: TimerTable,
    admin_up: bool,
    conn: Option<Conn>,
    rx: Vec<u8>,
    tx: Vec<u8>,
    events: VecDeque<Event>,
    negotiated: Option<Negotiated>,
    established_at: Option<Instant>,
    gr_restart_reported: bool,
    rib: BTreeMap<IpNet, Arc<RouteAttrs>>,
    interned: HashMap<RouteAttrs, Arc<RouteAttrs>>,
    rib_count: [usize; 2],
    dirty: BTreeSet<IpNet>,
    full_table_pending: bool,
    resend_pending: [bool; 2],
    next_hop_missing_reported: [bool; 2],
    last_sent: Option<Notification>,
    last_received: Option<Notification>,
    updates_received: u64,
    updates_sent: u64,
    prefixes_received: u64,
    withdrawals_received: u64,
    connect_retry_counter: u32,
    consecutive_failures: u32,
}

/// Which connection survives a collision (§6.8): the one opened by the speaker with the
/// higher BGP Identifier.
pub fn collision_winner(local_id: Ipv4Addr, remote_id: Ipv4Addr) -> Direction {
    if u32::from(local_id) > u32::from(remote_id) {
        Direction::Outbound
    } else {
        Direction::Inbound
    }
}

/// Which of two sessions with the same peer gave way in a collision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CollisionLoser {
    /// The first session passed to [`resolve_collision`] was closed.
    First,
    /// The second one was closed.
    Second,
}

/// Resolve a connection collision (RFC 4271 §6.8) between two sessions with the same
/// peer, each on its own connection. Nothing happens until both have the peer's OPEN;
/// then the connection opened by the speaker with the higher BGP Identifier survives
/// (equal identifiers, possible over eBGP: the higher AS wins, RFC 6286 §2.3) and the
/// other session is closed with Cease / Connection Collision Resolution.
///
/// Returns which session was closed, or `None` while there is nothing to decide.
pub fn resolve_collision(
    now: Instant,
    first: &mut Session,
    second: &mut Session,
) -> Option<CollisionLoser> {
    let (Some(n1), Some(n2)) = (first.negotiated(), second.negotiated()) else {
        return None;
    };
    let first_dir = first.direction()?;
    second.direction()?;
    let local = first.config.router_id;
    let remote = n2.peer_router_id;
    let winner = if local == remote {
        if first.config.local_as > n1.peer_as {
            Direction::Outbound
        } else {
            Direction::Inbound
        }
    } else {
        collision_winner(local, remote)
    };
    if first_dir == winner {
        second.close_for_collision(now);
        Some(CollisionLoser::Second)
    } else {
        first.close_for_collision(now);
        Some(CollisionLoser::First)
    }
}

impl Session {
    /// A session in Idle. `rng_seed` drives timer jitter.
    pub fn new(config: SessionConfig, _now: Instant, rng_seed: u64) -> Self {
        Session {
            config,
            state: State::Idle,
            jitter: Jitter::new(rng_seed),
            timers: TimerTable::default(),
            admin_up: false,
            conn: None,
            rx: Vec::new(),
            tx: Vec::new(),
            events: VecDeque::new(),
            negotiated: None,
            established_at: None,
            gr_restart_reported: false,
            rib: BTreeMap::new(),
            interned: HashMap::new(),
            rib_count: [0; 2],
            dirty: BTreeSet::new(),
            full_table_pending: false,
            resend_pending: [false; 2],
            next_hop_missing_reported: [false; 2],
            last_sent: None,
            last_received: None,
            updates_received: 0,
            updates_sent: 0,
            prefixes_received: 0,
            withdrawals_received: 0,
            connect_retry_counter: 0,
            consecutive_failures: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// Current FSM state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a TCP connection is attached.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Direction of the attached connection.
    pub fn direction(&self) -> Option<Direction> {
        self.conn.as_ref().map(|c| c.direction)
    }

    /// What was negotiated, from OpenConfirm on.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// Whether a new TCP connection would be accepted by [`Session::handle_connected`]:
    /// in Connect or Active, and in Idle while an automatic restart is pending (after an
    /// error; not after [`Command::Stop`]). Accepting the peer's connection then, rather
    /// than refusing it, keeps two speakers that both back off from missing each other.
    pub fn accepts_connection(&self) -> bool {
        self.conn.is_none()
            && (matches!(self.state, State::Connect | State::Active) || self.restart_pending())
    }

    fn restart_pending(&self) -> bool {
        self.state == State::Idle && self.admin_up && self.timers.is_running(Timer::IdleHold)
    }

    /// The Adj-RIB-Out contents.
    pub fn routes(&self) -> impl Iterator<Item = (&IpNet, &RouteAttrs)> {
        self.rib.iter().map(|(p, a)| (p, &**a))
    }

    /// Status snapshot.
    pub fn status(&self, now: Instant) -> SessionStatus {
        let mut advertised = [0; 2];
        if self.state == State::Established {
            if let Some(n) = &self.negotiated {
                let ctx = self.encode_context(n);
                for f in &n.families {
                    let has_nh = match f {
                        Family::Ipv4Unicast => ctx.next_hop_v4.is_some(),
                        Family::Ipv6Unicast => ctx.next_hop_v6.is_some(),
                    };
                    if has_nh {
                        advertised[f.index()] = self.rib_count[f.index()];
                    }
                }
            }
        }
        SessionStatus {
            state: self.state,
            uptime: self
                .established_at
                .map(|t| now.saturating_duration_since(t)),
            negotiated: self.negotiated.clone(),
            advertised,
            last_notification_sent: self.last_sent.as_ref().map(ToString::to_string),
            last_notification_received: self.last_received.as_ref().map(ToString::to_string),
            updates_received: self.updates_received,
            updates_sent: self.updates_sent,
            prefixes_received: self.prefixes_received,
            withdrawals_received: self.withdrawals_received,
            connect_retry_counter: self.connect_retry_counter,
        }
    }

    /// Bytes to write to the TCP connection.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        if self.state == State::Established && self.conn.is_some() {
            self.flush_routes();
        }
        if self.tx.is_empty() {
            None
        } else {
            Some(Bytes::from(std::mem::take(&mut self.tx)))
        }
    }

    /// The next deadline at which [`Session::handle_timeout`] must be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Apply a command.
    pub fn handle_command(&mut self, now: Instant, command: Command) {
        match command {
            Command::Start => self.start(now),
            Command::Stop => self.stop(now),
            Command::StopWith(reason) => self.stop_with(now, reason),
            Command::Announce { prefixes, attrs } => {
                let attrs = self.intern(attrs);
                for p in prefixes {
                    self.set_route(p.trunc(), &attrs);
                }
            }
            Command::Withdraw { prefixes } => {
                for p in prefixes {
                    self.remove_route(p.trunc());
                }
                self.forget_unused_attrs();
            }
            Command::Replace { routes } => {
                let desired: BTreeMap<IpNet, RouteAttrs> =
                    routes.into_iter().map(|(p, a)| (p.trunc(), a)).collect();
                let gone: Vec<IpNet> = self
                    .rib
                    .keys()
                    .filter(|p| !desired.contains_key(p))
                    .copied()
                    .collect();
                for p in gone {
                    self.remove_route(p);
                }
                for (p, a) in desired {
                    if self.rib.get(&p).is_some_and(|old| **old == a) {
                        continue;
                    }
                    let a = self.intern(a);
                    self.set_route(p, &a);
                }
                self.forget_unused_attrs();
            }
            Command::Resend(f) => self.resend_pending[f.index()] = true,
            Command::RequestRefresh(f) => {
                if let Some(n) = &self.negotiated {
                    if self.state == State::Established
                        && n.route_refresh
                        && n.families.contains(&f)
                    {
                        wire::encode_route_refresh(&mut self.tx, f);
                    }
                }
            }
        }
    }

    /// A TCP connection to the peer is up. Returns `false` when the session refuses it
    /// (Idle, or already connected); the driver then closes that socket.
    pub fn handle_connected(
        &mut self,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        direction: Direction,
    ) -> bool {
        if !self.accepts_connection() {
            return false;
        }
        if direction == Direction::Outbound && self.state != State::Connect {
            // A late outbound connect that we already gave up on.
            return false;
        }
        if self.state == State::Idle {
            // An inbound connection ends the automatic-restart hold early.
            self.timers.stop(Timer::IdleHold);
            self.set_state(State::Active);
        }
        self.conn = Some(Conn {
            local,
            remote,
            direction,
        });
        self.rx.clear();
        self.tx.clear();
        self.timers.stop(Timer::ConnectRetry);
        if let Some(delay) = self.config.delay_open {
            self.timers.set(Timer::DelayOpen, now + delay);
            // Guards against a peer that never sends its OPEN.
            self.timers.set(Timer::Hold, now + LARGE_HOLD_TIME);
        } else {
            self.send_open();
            self.timers.set(Timer::Hold, now + LARGE_HOLD_TIME);
            self.set_state(State::OpenSent);
        }
        true
    }

    /// The TCP connection closed, or the outbound attempt failed.
    pub fn handle_closed(&mut self, now: Instant) {
        match self.state {
            State::Idle => {}
            State::Connect | State::Active | State::OpenSent => {
                // RFC 4271 §8.2.2 Event 18: back to Active, retry later.
                self.drop_connection();
                self.timers.stop(Timer::DelayOpen);
                self.timers.stop(Timer::Hold);
                if self.state != State::Active || !self.timers.is_running(Timer::ConnectRetry) {
                    self.restart_connect_retry(now);
                }
                if self.state == State::OpenSent {
                    self.connect_retry_counter += 1;
                }
                self.set_state(State::Active);
            }
            State::OpenConfirm | State::Established => {
                self.fail(now, None);
            }
        }
    }

    /// Bytes read from the TCP connection.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if self.conn.is_none() {
            return;
        }
        self.rx.extend_from_slice(data);
        let buf = std::mem::take(&mut self.rx);
        let mut pos = 0;
        while self.conn.is_some() {
            let rest = &buf[pos..];
            let Some(len) = wire::message_len(rest) else {
                break;
            };
            if rest[..16].iter().any(|&b| b != 0xff) {
                let n = Notification::of(HeaderSubcode::CONNECTION_NOT_SYNCHRONIZED, Vec::new());
                self.fail(now, Some(n));
                break;
            }
            if !(HEADER_LEN..=self.max_recv_len()).contains(&len) {
                self.fail(now, Some(wire::bad_length(len)));
                break;
            }
            if rest.len() < len {
                break;
            }
            pos += len;
            self.handle_message(now, &rest[..len]);
        }
        if self.conn.is_some() {
            let mut buf = buf;
            buf.drain(..pos);
            self.rx = buf;
        }
    }

    /// Fire expired timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(t) = self.timers.pop_expired(now) {
            match t {
                Timer::ConnectRetry => match self.state {
                    State::Connect => {
                        // Abandon the attempt and try again.
                        self.events.push_back(Event::Close);
                        self.restart_connect_retry(now);
                        self.events.push_back(Event::Connect);
                    }
                    State::Active => {
                        self.restart_connect_retry(now);
                        if !self.config.passive {
                            self.set_state(State::Connect);
                            self.events.push_back(Event::Connect);
                        }
                    }
                    _ => {}
                },
                Timer::DelayOpen => {
                    if self.conn.is_some() && matches!(self.state, State::Connect | State::Active) {
                        self.send_open();
                        self.timers.set(Timer::Hold, now + LARGE_HOLD_TIME);
                        self.set_state(State::OpenSent);
                    }
                }
                Timer::Hold => {
                    if self.conn.is_some() {
                        let n = Notification::new(ErrorCode::HOLD_TIMER_EXPIRED, 0, Vec::new());
                        self.fail(now, Some(n));
                    }
                }
                Timer::Keepalive => {
                    if matches!(self.state, State::OpenConfirm | State::Established) {
                        wire::encode_keepalive(&mut self.tx);
                        self.arm_keepalive(now);
                    }
                }
                Timer::IdleHold => {
                    if self.state == State::Idle && self.admin_up {
                        self.admin_up = false;
                        self.start(now);
                    }
                }
            }
        }
    }

    /// Close this connection because the other one won the collision (§6.8): send
    /// Cease / Connection Collision Resolution and go Idle without automatic restart.
    pub fn close_for_collision(&mut self, now: Instant) {
        let n = Notification::cease(CeaseSubcode::CONNECTION_COLLISION_RESOLUTION);
        self.admin_up = false;
        self.fail(now, Some(n));
    }

    /// The shared copy of `attrs`, so prefixes with equal attributes share one `Arc` and
    /// group into one UPDATE.
    fn intern(&mut self, attrs: RouteAttrs) -> Arc<RouteAttrs> {
        match self.interned.get(&attrs) {
            Some(a) => a.clone(),
            None => {
                let a = Arc::new(attrs.clone());
                self.interned.insert(attrs, a.clone());
                a
            }
        }
    }

    /// Drops interned attributes no route uses any more.
    fn forget_unused_attrs(&mut self) {
        self.interned.retain(|_, a| Arc::strong_count(a) > 1);
    }

    /// Puts a (truncated) prefix into the Adj-RIB-Out, marking it for sending if changed.
    fn set_route(&mut self, p: IpNet, attrs: &Arc<RouteAttrs>) {
        match self.rib.insert(p, attrs.clone()) {
            None => self.rib_count[Family::of(&p).index()] += 1,
            Some(old) if Arc::ptr_eq(&old, attrs) => return,
            Some(_) => {}
        }
        if self.state == State::Established {
            self.dirty.insert(p);
        }
    }

    /// Takes a (truncated) prefix out of the Adj-RIB-Out, marking it for withdrawal.
    fn remove_route(&mut self, p: IpNet) {
        if self.rib.remove(&p).is_some() {
            self.rib_count[Family::of(&p).index()] -= 1;
            if self.state == State::Established {
                self.dirty.insert(p);
            }
        }
    }

    fn start(&mut self, now: Instant) {
        if self.admin_up && self.state != State::Idle {
            return;
        }
        self.admin_up = true;
        self.timers.stop(Timer::IdleHold);
        if self.state != State::Idle {
            return;
        }
        self.restart_connect_retry(now);
        if self.config.passive {
            self.set_state(State::Active);
        } else {
            self.set_state(State::Connect);
            self.events.push_back(Event::Connect);
        }
    }

    fn stop(&mut self, now: Instant) {
        self.stop_with(now, CeaseSubcode::ADMINISTRATIVE_SHUTDOWN);
    }

    fn stop_with(&mut self, now: Instant, reason: CeaseSubcode) {
        self.admin_up = false;
        if self.conn.is_some()
            && matches!(
                self.state,
                State::OpenSent | State::OpenConfirm | State::Established
            )
        {
            self.fail(now, Some(Notification::cease(reason)));
        } else {
            if self.conn.is_some() || self.state == State::Connect {
                self.events.push_back(Event::Close);
            }
            self.drop_connection();
            self.timers.stop_all();
            self.set_state(State::Idle);
        }
        self.timers.stop_all();
    }

    /// Error path to Idle: optional NOTIFICATION, close, schedule automatic restart.
    fn fail(&mut self, now: Instant, notification: Option<Notification>) {
        if let Some(n) = notification {
            if self.conn.is_some() {
                n.encode(&mut self.tx);
            }
            self.last_sent = Some(n.clone());
            self.events.push_back(Event::NotificationSent(n));
        }
        self.events.push_back(Event::Close);
        self.drop_connection();
        self.timers.stop_all();
        self.connect_retry_counter += 1;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        self.set_state(State::Idle);
        if self.admin_up {
            let shift = self.consecutive_failures.saturating_sub(1).min(10);
            let delay = self.config.idle_hold_time.saturating_mul(1 << shift).min(
                self.config
                    .connect_retry_time
                    .max(self.config.idle_hold_time),
            );
            let delay = self.jitter.apply(delay);
            self.timers.set(Timer::IdleHold, now + delay);
        }
    }

    fn drop_connection(&mut self) {
        self.conn = None;
        self.rx.clear();
        self.negotiated = None;
        self.established_at = None;
        self.dirty.clear();
        self.full_table_pending = false;
        self.resend_pending = [false; 2];
    }

    fn set_state(&mut self, to: State) {
        if self.state != to {
            let from = self.state;
            self.state = to;
            self.events.push_back(Event::StateChanged { from, to });
        }
    }

    fn restart_connect_retry(&mut self, now: Instant) {
        let d = self.jitter.apply(self.config.connect_retry_time);
        self.timers.set(Timer::ConnectRetry, now + d);
    }

    fn arm_keepalive(&mut self, now: Instant) {
        if let Some(n) = &self.negotiated {
            if n.keepalive_time > 0 {
                let d = self
                    .jitter
                    .apply(Duration::from_secs(u64::from(n.keepalive_time)));
                self.timers.set(Timer::Keepalive, now + d);
            }
        }
    }

    fn restart_hold(&mut self, now: Instant) {
        match &self.negotiated {
            Some(n) if n.hold_time > 0 => {
                let d = Duration::from_secs(u64::from(n.hold_time));
                self.timers.set(Timer::Hold, now + d);
            }
            Some(_) => self.timers.stop(Timer::Hold),
            None => {}
        }
    }

    fn max_recv_len(&self) -> usize {
        match &self.negotiated {
            Some(n) if n.extended_message => MAX_EXTENDED_MESSAGE_LEN,
            _ => MAX_MESSAGE_LEN,
        }
    }

    fn local_open(&self) -> Open {
        let c = &self.config;
        let my_as = u16::try_from(c.local_as).unwrap_or(AS_TRANS);
        let graceful_restart = c.graceful_restart.as_ref().map(|gr| GracefulRestartCap {
            restarting: gr.restarting && !self.gr_restart_reported,
            restart_time: gr.restart_time.min(4095),
            families: c
                .families
                .iter()
                .map(|f| (*f, gr.forwarding_state))
                .collect(),
        });
        Open {
            my_as,
            hold_time: c.hold_time,
            router_id: c.router_id,
            capabilities: Capabilities {
                families: c.families.clone(),
                four_octet_as: c.four_octet_as.then_some(c.local_as),
                route_refresh: c.route_refresh,
                enhanced_route_refresh: false,
                graceful_restart,
                extended_message: c.extended_message,
                any_multiprotocol: !c.families.is_empty(),
                other: Vec::new(),
            },
        }
    }

    fn send_open(&mut self) {
        let open = self.local_open();
        open.encode(&mut self.tx);
    }

    fn fsm_error(&mut self, now: Instant) {
        let sub = match self.state {
            State::OpenSent => FsmSubcode::UNEXPECTED_IN_OPENSENT,
            State::OpenConfirm => FsmSubcode::UNEXPECTED_IN_OPENCONFIRM,
            State::Established => FsmSubcode::UNEXPECTED_IN_ESTABLISHED,
            _ => FsmSubcode::UNSPECIFIED,
        };
        self.fail(now, Some(Notification::of(sub, Vec::new())));
    }

    fn handle_message(&mut self, now: Instant, msg: &[u8]) {
        let decoded = match wire::decode(msg, self.max_recv_len()) {
            Ok(m) => m,
            Err(n) => {
                // A malformed NOTIFICATION is not answered with one (RFC 4271 §6.4).
                let is_notification = msg.get(18) == Some(&wire::MessageType::NOTIFICATION.0);
                self.fail(now, (!is_notification).then_some(n));
                return;
            }
        };
        match decoded {
            Message::Notification(n) => {
                self.last_received = Some(n.clone());
                self.events.push_back(Event::NotificationReceived(n));
                self.fail_silently(now);
            }
            Message::Open(open) => {
                let delay_open_running = self.timers.is_running(Timer::DelayOpen);
                match self.state {
                    State::OpenSent => {
                        if self.accept_open(now, &open) {
                            wire::encode_keepalive(&mut self.tx);
                            self.set_state(State::OpenConfirm);
                        }
                    }
                    State::Connect | State::Active if delay_open_running => {
                        self.timers.stop(Timer::DelayOpen);
                        if self.accept_open(now, &open) {
                            self.send_open();
                            wire::encode_keepalive(&mut self.tx);
                            self.set_state(State::OpenConfirm);
                        }
                    }
                    _ => self.fsm_error(now),
                }
            }
            Message::Keepalive => match self.state {
                State::OpenConfirm => {
                    self.restart_hold(now);
                    self.established(now);
                }
                State::Established => self.restart_hold(now),
                _ => self.fsm_error(now),
            },
            Message::Update(body) => {
                if self.state != State::Established {
                    self.fsm_error(now);
                    return;
                }
                self.restart_hold(now);
                self.updates_received += 1;
                let ctx = match &self.negotiated {
                    Some(n) => InspectContext {
                        four_octet_as: n.four_octet_as,
                        ibgp: self.config.is_ibgp(),
                    },
                    None => return,
                };
                match update::inspect(body, ctx) {
                    Ok(summary) => {
                        self.prefixes_received += summary.announced as u64;
                        self.withdrawals_received += summary.withdrawn as u64;
                        self.events.push_back(Event::UpdateReceived(summary));
                    }
                    Err(n) => self.fail(now, Some(n)),
                }
            }
            Message::RouteRefresh { afi, subtype, safi } => {
                if self.state != State::Established {
                    self.fsm_error(now);
                    return;
                }
                self.restart_hold(now);
                let family = Family::from_afi_safi(afi, safi);
                let negotiated = self
                    .negotiated
                    .as_ref()
                    .is_some_and(|n| n.route_refresh || self.config.route_refresh);
                // Subtype 0 is a request; BoRR/EoRR markers need no answer. Requests for
                // families we do not carry are ignored (RFC 2918 §4).
                if let (Some(f), 0, true) = (family, subtype, negotiated) {
                    if self
                        .negotiated
                        .as_ref()
                        .is_some_and(|n| n.families.contains(&f))
                    {
                        self.resend_pending[f.index()] = true;
                    }
                }
            }
        }
    }

    /// To Idle without sending a NOTIFICATION (the peer sent one).
    fn fail_silently(&mut self, now: Instant) {
        self.fail(now, None);
    }

    /// Validate the peer's OPEN; on success record the negotiation and arm timers.
    fn accept_open(&mut self, now: Instant, open: &Open) -> bool {
        match self.negotiate(open) {
            Ok(n) => {
                self.events.push_back(Event::OpenReceived {
                    router_id: open.router_id,
                });
                self.negotiated = Some(n);
                self.restart_hold(now);
                self.arm_keepalive(now);
                true
            }
            Err(notification) => {
                self.fail(now, Some(notification));
                false
            }
        }
    }

    fn negotiate(&self, open: &Open) -> Result<Negotiated, Notification> {
        let c = &self.config;
        let open_err = |sub: OpenSubcode, data: Vec<u8>| Notification::of(sub, data);
        // A speaker without RFC 6793 ignores the capability and sees AS_TRANS.
        let peer_as = if c.four_octet_as {
            open.peer_as()
        } else {
            u32::from(open.my_as)
        };
        if peer_as != c.peer_as {
            return Err(open_err(
                OpenSubcode::BAD_PEER_AS,
                open.my_as.to_be_bytes().to_vec(),
            ));
        }
        if open.router_id.is_unspecified() || (c.is_ibgp() && open.router_id == c.router_id) {
            return Err(open_err(
                OpenSubcode::BAD_BGP_IDENTIFIER,
                open.router_id.octets().to_vec(),
            ));
        }
        if open.hold_time == 1 || open.hold_time == 2 {
            return Err(open_err(
                OpenSubcode::UNACCEPTABLE_HOLD_TIME,
                open.hold_time.to_be_bytes().to_vec(),
            ));
        }
        let hold_time = c.hold_time.min(open.hold_time);
        let keepalive_time = match c.keepalive_time {
            _ if hold_time == 0 => 0,
            Some(k) => k.min(hold_time / 3).max(1),
            None => (hold_time / 3).max(1),
        };
        let peer = &open.capabilities;
        let peer_families: Vec<Family> = if peer.any_multiprotocol {
            peer.families.clone()
        } else {
            vec![Family::Ipv4Unicast]
        };
        let ours: Vec<Family> = if c.families.is_empty() {
            vec![Family::Ipv4Unicast]
        } else {
            c.families.clone()
        };
        let families = ours
            .into_iter()
            .filter(|f| peer_families.contains(f))
            .collect();
        let conn = self.conn.as_ref();
        let unspecified = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        Ok(Negotiated {
            peer_as,
            peer_router_id: open.router_id,
            hold_time,
            keepalive_time,
            families,
            four_octet_as: c.four_octet_as && peer.four_octet_as.is_some(),
            route_refresh: c.route_refresh && peer.route_refresh,
            extended_message: c.extended_message && peer.extended_message,
            graceful_restart: c.graceful_restart.is_some() || peer.graceful_restart.is_some(),
            peer_capabilities: peer.clone(),
            local: conn.map_or(unspecified, |c| c.local),
            remote: conn.map_or(unspecified, |c| c.remote),
            direction: conn.map_or(Direction::Outbound, |c| c.direction),
        })
    }

    fn established(&mut self, now: Instant) {
        self.set_state(State::Established);
        self.established_at = Some(now);
        self.consecutive_failures = 0;
        self.full_table_pending = true;
        self.dirty.clear();
        if let Some(n) = &self.negotiated {
            self.events
                .push_back(Event::Established(Box::new(n.clone())));
        }
        self.gr_restart_reported = true;
    }

    fn encode_context(&self, n: &Negotiated) -> EncodeContext {
        let c = &self.config;
        let (nh4, nh6) = match n.local.ip() {
            IpAddr::V4(v4) if !v4.is_unspecified() => (Some(v4), Some(v4.to_ipv6_mapped())),
            IpAddr::V6(v6) if !v6.is_unspecified() => (v6.to_ipv4_mapped(), Some(v6)),
            _ => (None, None),
        };
        EncodeContext {
            local_as: c.local_as,
            ibgp: c.is_ibgp(),
            four_octet_as: n.four_octet_as,
            next_hop_v4: c.next_hop_v4.or(nh4),
            next_hop_v6: c.next_hop_v6.or(nh6),
            max_len: if n.extended_message {
                MAX_EXTENDED_MESSAGE_LEN
            } else {
                MAX_MESSAGE_LEN
            },
        }
    }

    /// Encode pending route changes into `tx`.
    fn flush_routes(&mut self) {
        let Some(n) = self.negotiated.clone() else {
            return;
        };
        let full = std::mem::take(&mut self.full_table_pending);
        let resend = std::mem::take(&mut self.resend_pending);
        if !full && !resend.iter().any(|r| *r) && self.dirty.is_empty() {
            return;
        }
        let ctx = self.encode_context(&n);
        for f in &n.families {
            if full || resend[f.index()] {
                self.send_table(&ctx, *f);
            }
        }
        if full {
            self.dirty.clear();
            if n.graceful_restart {
                for f in &n.families {
                    update::encode_end_of_rib(*f, &mut self.tx);
                    self.updates_sent += 1;
                }
            }
        }
        if !self.dirty.is_empty() {
            let dirty = std::mem::take(&mut self.dirty);
            let mut withdrawn: [Vec<IpNet>; 2] = [Vec::new(), Vec::new()];
            // Groups in the order of their first prefix; the map only finds a group.
            let mut groups: Vec<(Arc<RouteAttrs>, [Vec<IpNet>; 2])> = Vec::new();
            let mut group_of: HashMap<*const RouteAttrs, usize> = HashMap::new();
            for p in dirty {
                let f = Family::of(&p);
                if !n.families.contains(&f) {
                    continue;
                }
                match self.rib.get(&p) {
                    Some(a) => {
                        let i = *group_of.entry(Arc::as_ptr(a)).or_insert_with(|| {
                            groups.push((a.clone(), [Vec::new(), Vec::new()]));
                            groups.len() - 1
                        });
                        groups[i].1[f.index()].push(p);
                    }
                    None => withdrawn[f.index()].push(p),
                }
            }
            for f in Family::ALL {
                let w = &withdrawn[f.index()];
                if !w.is_empty() {
                    self.updates_sent +=
                        update::encode_withdrawals(&ctx, f, w, &mut self.tx) as u64;
                }
            }
            for (attrs, by_family) in &groups {
                for f in Family::ALL {
                    let ps = &by_family[f.index()];
                    if !ps.is_empty() {
                        self.announce(&ctx, f, attrs, ps);
                    }
                }
            }
        }
    }

    fn announce(&mut self, ctx: &EncodeContext, f: Family, attrs: &RouteAttrs, ps: &[IpNet]) {
        match update::encode_announcements(ctx, f, attrs, ps, &mut self.tx) {
            Ok(count) => self.updates_sent += count as u64,
            Err(update::NoNextHop(f)) => {
                if !self.next_hop_missing_reported[f.index()] {
                    self.next_hop_missing_reported[f.index()] = true;
                    self.events.push_back(Event::NoNextHop(f));
                }
            }
        }
    }

    fn send_table(&mut self, ctx: &EncodeContext, f: Family) {
        let range: (std::ops::Bound<IpNet>, std::ops::Bound<IpNet>) = match f {
            Family::Ipv4Unicast => (
                std::ops::Bound::Unbounded,
                std::ops::Bound::Excluded(IpNet::V6(Default::default())),
            ),
            Family::Ipv6Unicast => (
                std::ops::Bound::Included(IpNet::V6(Default::default())),
                std::ops::Bound::Unbounded,
            ),
        };
        // Groups in the order of their first prefix; the map only finds a group.
        let mut groups: Vec<(Arc<RouteAttrs>, Vec<IpNet>)> = Vec::new();
        let mut group_of: HashMap<*const RouteAttrs, usize> = HashMap::new();
        for (p, a) in self.rib.range(range) {
            if Family::of(p) != f {
                continue;
            }
            let i = *group_of.entry(Arc::as_ptr(a)).or_insert_with(|| {
                groups.push((a.clone(), Vec::new()));
                groups.len() - 1
            });
            groups[i].1.push(*p);
        }
        for (attrs, ps) in groups {
            self.announce(ctx, f, &attrs, &ps);
        }
    }
}
