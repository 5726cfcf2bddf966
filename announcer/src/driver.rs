//! The tokio driver: moves bytes between TCP sockets and [`Session`]s and wakes them at
//! their deadlines. Protocol decisions, connection collisions included, stay in the
//! sans-IO session core.
//!
//! One task per peer owns that peer's session(s); a listener task hands inbound
//! connections to the peer task by remote address. Each TCP connection has a reader task
//! and a writer task, so a peer that stops reading never blocks the session's timers.
//! Both directions are bounded: the reader waits while the peer task is behind, and the
//! writer's queue holds at most [`WRITE_QUEUE_CHUNKS`] chunks; while it is full the
//! session is not drained (its routes stay pending in the Adj-RIB-Out) and the hold
//! timer decides whether the peer is gone.
//!
//! Connection collision (RFC 4271 §6.8): an inbound connection that arrives while the
//! peer's session is in OpenSent/OpenConfirm gets a second `Session`; once both have the
//! peer's OPEN, [`resolve_collision`](crate::session::resolve_collision) closes the loser
//! with Cease / Connection Collision Resolution. An inbound connection while Established
//! is refused the same way.
//!
//! Desired state: [`Speaker::set_peers`] makes the peer set exactly a list of
//! [`PeerConfig`]s, and [`Speaker::set_peer_routes`] makes one peer's routes exactly a
//! table; both change only the difference and are safe to repeat.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use crate::config::{PeerConfig, TtlMode};
use crate::session::{CollisionLoser, Command, Direction, Event, Session, SessionStatus, State};
use crate::sockopt;
use crate::update::RouteAttrs;
use crate::wire::{CeaseSubcode, Notification};
use crate::Error;

/// Chunks (each one [`Session::poll_transmit`] result) a connection's write queue holds.
pub const WRITE_QUEUE_CHUNKS: usize = 16;
/// Reads (up to 64 KiB each) a peer task may have pending before readers wait.
const READ_QUEUE_CHUNKS: usize = 16;
/// How long a closed connection's writer may keep flushing.
const WRITER_LINGER: Duration = Duration::from_secs(5);
/// How long a stopping peer task gets to flush its NOTIFICATION.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// Speaker-wide settings.
#[derive(Clone, Debug, Default)]
pub struct SpeakerConfig {
    /// Where to accept connections (e.g. `0.0.0.0:179`); `None` for active-only peers.
    pub listen: Option<SocketAddr>,
    /// Identity of this node (e.g. a hash of its name). Mixed with fresh randomness into
    /// every session's timer jitter, so nodes that peer with the same router do not retry
    /// in lockstep.
    pub node_seed: u64,
}

/// A per-peer status snapshot.
#[derive(Clone, Debug)]
pub struct PeerStatus {
    /// The peer's address.
    pub address: IpAddr,
    /// The session's status when the snapshot was taken.
    pub session: SessionStatus,
    /// When the snapshot was taken.
    pub taken_at: Instant,
    /// The last transport failure (e.g. the TCP connect timing out), cleared once the
    /// session is Established. A wrong TCP MD5 password shows up here: the peer's kernel
    /// drops unsigned or badly signed SYNs silently, so no NOTIFICATION ever arrives.
    pub last_error: Option<String>,
}

impl PeerStatus {
    /// FSM state.
    pub fn state(&self) -> State {
        self.session.state
    }

    /// Time since Established, as of now.
    pub fn uptime(&self) -> Option<Duration> {
        self.session.uptime.map(|u| u + self.taken_at.elapsed())
    }
}

/// What [`Speaker::set_peers`] changed, each list sorted by address.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PeersChanged {
    /// Peers that were not there before.
    pub added: Vec<IpAddr>,
    /// Peers stopped with Cease / Administrative Shutdown and forgotten.
    pub removed: Vec<IpAddr>,
    /// Peers whose [`PeerConfig`] changed: stopped with Cease / Administrative Reset and
    /// started again with the new configuration and the same routes.
    pub restarted: Vec<IpAddr>,
}

impl PeersChanged {
    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.restarted.is_empty()
    }
}

enum PeerCtl {
    Command(Command),
    Inbound(TcpStream),
    Shutdown(CeaseSubcode),
}

struct PeerHandle {
    config: PeerConfig,
    /// Set by [`Speaker::set_peer_routes`]; `None`: the speaker-wide table.
    routes: Option<BTreeMap<IpNet, RouteAttrs>>,
    ctl: mpsc::UnboundedSender<PeerCtl>,
    status: watch::Receiver<PeerStatus>,
    task: JoinHandle<()>,
}

struct Shared {
    peers: Mutex<HashMap<IpAddr, PeerHandle>>,
    routes: Mutex<BTreeMap<IpNet, RouteAttrs>>,
    listener: Option<Arc<TcpListener>>,
    node_seed: u64,
}

/// A BGP speaker: a listener and a set of peers. Each peer carries either its own routes
/// ([`Speaker::set_peer_routes`]) or, until those are set, the speaker-wide table of
/// [`Speaker::announce`] / [`Speaker::withdraw`].
pub struct Speaker {
    shared: Arc<Shared>,
    accept_task: Option<JoinHandle<()>>,
    local_addr: Option<SocketAddr>,
}

fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A jitter seed for a session with `peer`: the node's identity, the peer, and fresh
/// randomness (std's per-process random hash keys, advanced per call), so two nodes
/// peering with the same router, or one node restarting, draw different retry delays.
fn session_seed(node_seed: u64, peer: IpAddr) -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    node_seed.hash(&mut h);
    peer.hash(&mut h);
    Instant::now().hash(&mut h);
    h.finish()
}

/// Back-off of the accept loop after errors such as EMFILE, which would otherwise repeat
/// at once and spin: starts at [`AcceptBackoff::MIN`] and doubles up to
/// [`AcceptBackoff::MAX`]; a successful accept resets it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AcceptBackoff {
    current: Option<Duration>,
}

impl AcceptBackoff {
    /// The first pause.
    pub const MIN: Duration = Duration::from_millis(10);
    /// The longest pause.
    pub const MAX: Duration = Duration::from_secs(1);

    /// An accept failed: how long to pause, and whether this is the first failure of a
    /// streak (the one worth logging).
    pub fn failed(&mut self) -> (Duration, bool) {
        let first = self.current.is_none();
        let next = self
            .current
            .map_or(Self::MIN, |d| d.saturating_mul(2).min(Self::MAX));
        self.current = Some(next);
        (next, first)
    }

    /// An accept succeeded. Returns whether a failure streak just ended.
    pub fn succeeded(&mut self) -> bool {
        self.current.take().is_some()
    }
}

impl Speaker {
    /// Start a speaker, listening when `config.listen` is set.
    ///
    /// # Errors
    /// Binding the listener failed.
    pub async fn bind(config: SpeakerConfig) -> Result<Speaker, Error> {
        let listener = match config.listen {
            Some(addr) => {
                let socket = if addr.is_ipv4() {
                    TcpSocket::new_v4()
                } else {
                    TcpSocket::new_v6()
                }
                .map_err(|source| Error::Io {
                    op: "socket",
                    source,
                })?;
                socket.set_reuseaddr(true).map_err(|source| Error::Io {
                    op: "SO_REUSEADDR",
                    source,
                })?;
                socket
                    .bind(addr)
                    .map_err(|source| Error::Io { op: "bind", source })?;
                Some(Arc::new(socket.listen(64).map_err(|source| Error::Io {
                    op: "listen",
                    source,
                })?))
            }
            None => None,
        };
        let local_addr = listener.as_ref().and_then(|l| l.local_addr().ok());
        let shared = Arc::new(Shared {
            peers: Mutex::new(HashMap::new()),
            routes: Mutex::new(BTreeMap::new()),
            listener: listener.clone(),
            node_seed: config.node_seed,
        });
        let accept_task = listener.map(|l| tokio::spawn(accept_loop(l, Arc::downgrade(&shared))));
        Ok(Speaker {
            shared,
            accept_task,
            local_addr,
        })
    }

    /// The listening address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Add a peer and start its session; it carries the speaker-wide table until
    /// [`Speaker::set_peer_routes`] gives it its own.
    ///
    /// # Errors
    /// The peer already exists, or the MD5 key could not be installed on the listener.
    pub fn add_peer(&self, peer: PeerConfig) -> Result<(), Error> {
        let address = normalize(peer.address);
        let mut peers = lock(&self.shared.peers);
        if peers.contains_key(&address) {
            return Err(Error::Config(format!("peer {address} already exists")));
        }
        self.install_md5(address, peer.md5_password.as_deref(), false)?;
        let routes = lock(&self.shared.routes).clone();
        let handle = self.spawn_peer(peer, None, routes, None);
        peers.insert(address, handle);
        Ok(())
    }

    /// Make the speaker's peers exactly `peers` (keyed by address): new ones are added,
    /// missing ones removed (Cease / Administrative Shutdown), ones whose [`PeerConfig`]
    /// changed are restarted with the new config (Cease / Administrative Reset) and keep
    /// their routes, and unchanged ones are left alone (no flap). A restarted peer's new
    /// session starts once the old one has closed (at most 2 s later). Waits up to 2 s for
    /// removed peers to send their NOTIFICATION.
    ///
    /// # Errors
    /// [`Error::Config`] when two entries have the same address (nothing is changed);
    /// [`Error::Io`] when a TCP MD5 key could not be installed on the listener: that peer
    /// is left as it was (or out, when new), every other change is made, and a later
    /// call tries again.
    pub async fn set_peers(&self, peers: Vec<PeerConfig>) -> Result<PeersChanged, Error> {
        let mut wanted: BTreeMap<IpAddr, PeerConfig> = BTreeMap::new();
        for p in peers {
            let address = normalize(p.address);
            if wanted.insert(address, p).is_some() {
                return Err(Error::Config(format!("peer {address} is listed twice")));
            }
        }
        let mut changed = PeersChanged::default();
        let mut stopping = Vec::new();
        let mut first_error = None;
        {
            let mut current = lock(&self.shared.peers);
            let gone: Vec<IpAddr> = current
                .keys()
                .filter(|a| !wanted.contains_key(a))
                .copied()
                .collect();
            for address in gone {
                if let Some(h) = current.remove(&address) {
                    self.forget_md5(address, &h.config);
                    let _ = h
                        .ctl
                        .send(PeerCtl::Shutdown(CeaseSubcode::ADMINISTRATIVE_SHUTDOWN));
                    stopping.push(h.task);
                    changed.removed.push(address);
                }
            }
            for (address, config) in wanted {
                let existing = current.get(&address);
                if existing.is_some_and(|h| h.config == config) {
                    continue;
                }
                if let Err(e) = self.install_md5(address, config.md5_password.as_deref(), true) {
                    first_error.get_or_insert(e);
                    continue;
                }
                match current.remove(&address) {
                    Some(old) => {
                        let _ = old
                            .ctl
                            .send(PeerCtl::Shutdown(CeaseSubcode::ADMINISTRATIVE_RESET));
                        let routes = old
                            .routes
                            .clone()
                            .unwrap_or_else(|| lock(&self.shared.routes).clone());
                        let handle = self.spawn_peer(config, old.routes, routes, Some(old.task));
                        current.insert(address, handle);
                        changed.restarted.push(address);
                    }
                    None => {
                        let routes = lock(&self.shared.routes).clone();
                        current.insert(address, self.spawn_peer(config, None, routes, None));
                        changed.added.push(address);
                    }
                }
            }
        }
        let grace = stopping
            .into_iter()
            .map(|task| tokio::time::timeout(STOP_GRACE, task));
        futures_util::future::join_all(grace).await;
        match first_error {
            Some(e) => Err(e),
            None => Ok(changed),
        }
    }

    /// Set the complete set of routes `peer` should carry; its session announces and
    /// withdraws only the difference from what it carries now. Kept by the speaker, so a
    /// peer restarted by [`Speaker::set_peers`] (or a session that re-establishes)
    /// re-announces from it. From then on the peer no longer follows the speaker-wide
    /// table of [`Speaker::announce`] / [`Speaker::withdraw`]. Prefixes are truncated to
    /// their length (`10.0.0.1/24` is `10.0.0.0/24`).
    ///
    /// # Errors
    /// [`Error::UnknownPeer`]; [`Error::Shutdown`] when the peer task has ended.
    pub fn set_peer_routes(
        &self,
        peer: IpAddr,
        routes: BTreeMap<IpNet, RouteAttrs>,
    ) -> Result<(), Error> {
        let peer = normalize(peer);
        let routes: BTreeMap<IpNet, RouteAttrs> =
            routes.into_iter().map(|(p, a)| (p.trunc(), a)).collect();
        let mut peers = lock(&self.shared.peers);
        let handle = peers.get_mut(&peer).ok_or(Error::UnknownPeer(peer))?;
        if handle.routes.as_ref() == Some(&routes) {
            return Ok(());
        }
        handle.routes = Some(routes.clone());
        handle
            .ctl
            .send(PeerCtl::Command(Command::Replace { routes }))
            .map_err(|_| Error::Shutdown)
    }

    /// The desired routes of one peer as last set with [`Speaker::set_peer_routes`]
    /// (truncated); `None` for an unknown peer or one that follows the speaker-wide table.
    pub fn peer_routes(&self, peer: IpAddr) -> Option<BTreeMap<IpNet, RouteAttrs>> {
        lock(&self.shared.peers)
            .get(&normalize(peer))
            .and_then(|h| h.routes.clone())
    }

    /// Stop a peer (Cease / Administrative Shutdown) and forget it.
    ///
    /// # Errors
    /// [`Error::UnknownPeer`].
    pub async fn remove_peer(&self, address: IpAddr) -> Result<(), Error> {
        let address = normalize(address);
        let handle = lock(&self.shared.peers)
            .remove(&address)
            .ok_or(Error::UnknownPeer(address))?;
        self.forget_md5(address, &handle.config);
        let _ = handle
            .ctl
            .send(PeerCtl::Shutdown(CeaseSubcode::ADMINISTRATIVE_SHUTDOWN));
        let _ = tokio::time::timeout(STOP_GRACE, handle.task).await;
        Ok(())
    }

    /// Announce prefixes in the speaker-wide table: to every peer without routes of its
    /// own, and to such peers added later.
    pub fn announce(&self, prefixes: Vec<IpNet>, attrs: RouteAttrs) {
        {
            let mut routes = lock(&self.shared.routes);
            for p in &prefixes {
                routes.insert(p.trunc(), attrs.clone());
            }
        }
        self.broadcast(Command::Announce { prefixes, attrs });
    }

    /// Withdraw prefixes from the speaker-wide table (from every peer without routes of
    /// its own).
    pub fn withdraw(&self, prefixes: Vec<IpNet>) {
        {
            let mut routes = lock(&self.shared.routes);
            for p in &prefixes {
                routes.remove(&p.trunc());
            }
        }
        self.broadcast(Command::Withdraw { prefixes });
    }

    /// Send a command to one peer's session (e.g. Stop/Start or a route refresh). Route
    /// commands sent this way are not remembered by the speaker: prefer
    /// [`Speaker::set_peer_routes`].
    ///
    /// # Errors
    /// [`Error::UnknownPeer`].
    pub fn command(&self, peer: IpAddr, command: Command) -> Result<(), Error> {
        let peer = normalize(peer);
        let peers = lock(&self.shared.peers);
        let handle = peers.get(&peer).ok_or(Error::UnknownPeer(peer))?;
        handle
            .ctl
            .send(PeerCtl::Command(command))
            .map_err(|_| Error::Shutdown)
    }

    /// Sends a route command to the peers that follow the speaker-wide table.
    fn broadcast(&self, command: Command) {
        for handle in lock(&self.shared.peers).values() {
            if handle.routes.is_none() {
                let _ = handle.ctl.send(PeerCtl::Command(command.clone()));
            }
        }
    }

    /// Starts a peer task carrying `routes`; with `after`, its session starts once that
    /// (the previous task for the same peer) has ended.
    fn spawn_peer(
        &self,
        peer: PeerConfig,
        own_routes: Option<BTreeMap<IpNet, RouteAttrs>>,
        routes: BTreeMap<IpNet, RouteAttrs>,
        after: Option<JoinHandle<()>>,
    ) -> PeerHandle {
        let address = normalize(peer.address);
        let now = Instant::now();
        let seed = session_seed(self.shared.node_seed, address);
        let mut session = Session::new(peer.session.clone(), now, seed);
        session.handle_command(now, Command::Replace { routes });
        session.handle_command(now, Command::Start);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(PeerStatus {
            address,
            session: session.status(now),
            taken_at: now,
            last_error: None,
        });
        let driver = PeerDriver::new(peer.clone(), session, status_tx, self.shared.node_seed);
        let task = tokio::spawn(async move {
            if let Some(previous) = after {
                let _ = tokio::time::timeout(STOP_GRACE, previous).await;
            }
            driver.run(ctl_rx).await;
        });
        PeerHandle {
            config: peer,
            routes: own_routes,
            ctl: ctl_tx,
            status: status_rx,
            task,
        }
    }

    /// Installs the peer's TCP MD5 key on the listener; with `replace`, a peer without
    /// a password has any old key removed.
    fn install_md5(
        &self,
        address: IpAddr,
        password: Option<&str>,
        replace: bool,
    ) -> Result<(), Error> {
        let Some(l) = &self.shared.listener else {
            return Ok(());
        };
        match password {
            Some(pw) => {
                sockopt::set_md5(&**l, address, pw.as_bytes()).map_err(|source| Error::Io {
                    op: "TCP_MD5SIG on listener",
                    source,
                })
            }
            None => {
                if replace {
                    let _ = sockopt::set_md5(&**l, address, &[]);
                }
                Ok(())
            }
        }
    }

    fn forget_md5(&self, address: IpAddr, config: &PeerConfig) {
        if let (Some(l), Some(_)) = (&self.shared.listener, &config.md5_password) {
            let _ = sockopt::set_md5(&**l, address, &[]);
        }
    }

    /// Status of every peer.
    pub fn status(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = lock(&self.shared.peers)
            .values()
            .map(|h| h.status.borrow().clone())
            .collect();
        v.sort_by_key(|s| s.address);
        v
    }

    /// Status of one peer.
    pub fn peer_status(&self, peer: IpAddr) -> Option<PeerStatus> {
        lock(&self.shared.peers)
            .get(&normalize(peer))
            .map(|h| h.status.borrow().clone())
    }

    /// Wait until a peer's status satisfies `pred`.
    ///
    /// # Errors
    /// [`Error::UnknownPeer`], or [`Error::Shutdown`] on timeout or when the peer task ends.
    pub async fn wait_for(
        &self,
        peer: IpAddr,
        timeout: Duration,
        mut pred: impl FnMut(&PeerStatus) -> bool,
    ) -> Result<PeerStatus, Error> {
        let peer = normalize(peer);
        let mut rx = lock(&self.shared.peers)
            .get(&peer)
            .map(|h| h.status.clone())
            .ok_or(Error::UnknownPeer(peer))?;
        let fut = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if pred(&s) {
                        return Ok(s.clone());
                    }
                }
                rx.changed().await.map_err(|_| Error::Shutdown)?;
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::Shutdown)?
    }

    /// Stop every peer with Cease / Administrative Shutdown and end all tasks.
    pub async fn shutdown(mut self) {
        let handles: Vec<PeerHandle> = lock(&self.shared.peers).drain().map(|(_, h)| h).collect();
        for h in &handles {
            let _ = h
                .ctl
                .send(PeerCtl::Shutdown(CeaseSubcode::ADMINISTRATIVE_SHUTDOWN));
        }
        for h in handles {
            let _ = tokio::time::timeout(STOP_GRACE, h.task).await;
        }
        if let Some(t) = self.accept_task.take() {
            t.abort();
        }
    }
}

impl Drop for Speaker {
    fn drop(&mut self) {
        if let Some(t) = self.accept_task.take() {
            t.abort();
        }
        for (_, h) in lock(&self.shared.peers).drain() {
            h.task.abort();
        }
    }
}

/// Hands inbound connections to their peer tasks until the speaker is dropped.
async fn accept_loop(listener: Arc<TcpListener>, shared: std::sync::Weak<Shared>) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let (stream, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                let (pause, first) = backoff.failed();
                if first {
                    tracing::warn!("accept failed: {e}; retrying with back-off up to 1 s");
                }
                tokio::time::sleep(pause).await;
                continue;
            }
        };
        if backoff.succeeded() {
            tracing::info!("accepting connections again");
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let peers = lock(&shared.peers);
        match peers.get(&normalize(remote.ip())) {
            Some(p) => {
                let _ = p.ctl.send(PeerCtl::Inbound(stream));
            }
            None => tracing::debug!(%remote, "connection from unknown peer dropped"),
        }
    }
}

enum Io {
    Data(u64, Bytes),
    Closed(u64),
    Connected(u64, std::io::Result<TcpStream>),
    /// The writer of a stalled connection made room in its queue.
    Writable,
}

struct ConnIo {
    id: u64,
    writer: mpsc::Sender<Bytes>,
    /// Set when the write queue was full; the writer then reports [`Io::Writable`].
    stalled: Arc<AtomicBool>,
    reader: JoinHandle<()>,
    writer_task: JoinHandle<()>,
}

impl ConnIo {
    /// Stop reading; the writer task flushes what it has, then shuts the socket down. A
    /// writer still stuck on a peer that does not read is aborted after [`WRITER_LINGER`].
    fn close(self) {
        self.reader.abort();
        let writer = self.writer_task;
        tokio::spawn(async move {
            tokio::time::sleep(WRITER_LINGER).await;
            writer.abort();
        });
    }
}

struct Slot {
    session: Session,
    conn: Option<ConnIo>,
}

/// The per-peer task: one primary session, and a second one during a collision.
struct PeerDriver {
    peer: PeerConfig,
    slots: Vec<Slot>,
    io_tx: mpsc::Sender<Io>,
    io_rx: mpsc::Receiver<Io>,
    next_id: u64,
    connect_attempt: u64,
    last_error: Option<String>,
    connecting: Option<JoinHandle<()>>,
    status: watch::Sender<PeerStatus>,
    node_seed: u64,
}

impl PeerDriver {
    fn new(
        peer: PeerConfig,
        session: Session,
        status: watch::Sender<PeerStatus>,
        node_seed: u64,
    ) -> Self {
        let (io_tx, io_rx) = mpsc::channel(READ_QUEUE_CHUNKS);
        PeerDriver {
            peer,
            slots: vec![Slot {
                session,
                conn: None,
            }],
            io_tx,
            io_rx,
            next_id: 0,
            connect_attempt: 0,
            last_error: None,
            connecting: None,
            status,
            node_seed,
        }
    }

    async fn run(mut self, mut ctl: mpsc::UnboundedReceiver<PeerCtl>) {
        loop {
            self.pump();
            let deadline = self
                .slots
                .iter()
                .filter_map(|s| s.session.poll_timeout())
                .min();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                io = self.io_rx.recv() => {
                    if let Some(io) = io {
                        self.handle_io(io);
                    }
                }
                c = ctl.recv() => {
                    match c {
                        Some(PeerCtl::Command(cmd)) => {
                            let now = Instant::now();
                            for s in &mut self.slots {
                                s.session.handle_command(now, cmd.clone());
                            }
                        }
                        Some(PeerCtl::Inbound(stream)) => self.inbound(stream),
                        Some(PeerCtl::Shutdown(reason)) => {
                            self.stop(reason).await;
                            return;
                        }
                        None => {
                            self.stop(CeaseSubcode::ADMINISTRATIVE_SHUTDOWN).await;
                            return;
                        }
                    }
                }
                () = sleep => {
                    let now = Instant::now();
                    for s in &mut self.slots {
                        s.session.handle_timeout(now);
                    }
                }
            }
        }
    }

    /// Stops every session with Cease / `reason` and lets the writers flush.
    async fn stop(&mut self, reason: CeaseSubcode) {
        let now = Instant::now();
        for s in &mut self.slots {
            s.session.handle_command(now, Command::StopWith(reason));
        }
        self.pump();
        if let Some(c) = self.connecting.take() {
            c.abort();
        }
        // Give the writer tasks a moment to flush the NOTIFICATION.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Drain transmits and events of every slot, resolve collisions, publish status.
    fn pump(&mut self) {
        for _ in 0..4 {
            let mut again = false;
            for i in 0..self.slots.len() {
                again |= self.pump_slot(i);
            }
            again |= self.resolve_collision();
            if !again {
                break;
            }
        }
        let now = Instant::now();
        let s = &self.slots[0].session;
        if s.state() == State::Established {
            self.last_error = None;
        }
        self.status.send_replace(PeerStatus {
            address: normalize(self.peer.address),
            session: s.status(now),
            taken_at: now,
            last_error: self.last_error.clone(),
        });
    }

    fn pump_slot(&mut self, i: usize) -> bool {
        let mut did = false;
        loop {
            let slot = &mut self.slots[i];
            let permit = match &slot.conn {
                Some(c) => {
                    // Set before trying, so a writer that frees room meanwhile reports it.
                    c.stalled.store(true, Ordering::Release);
                    match c.writer.try_reserve() {
                        Ok(permit) => {
                            c.stalled.store(false, Ordering::Release);
                            Some(permit)
                        }
                        // Flow control: leave the rest in the session until the writer
                        // reports room (or the hold timer ends the session).
                        Err(mpsc::error::TrySendError::Full(())) => break,
                        Err(mpsc::error::TrySendError::Closed(())) => None,
                    }
                }
                None => None,
            };
            let Some(bytes) = slot.session.poll_transmit() else {
                break;
            };
            if let Some(permit) = permit {
                permit.send(bytes);
            }
        }
        while let Some(event) = self.slots[i].session.poll_event() {
            did = true;
            match event {
                Event::Connect if i == 0 => self.start_connect(),
                Event::Close => {
                    if let Some(c) = self.slots[i].conn.take() {
                        c.close();
                    }
                    if i == 0 {
                        self.abort_connect();
                    }
                }
                Event::Established(n) => tracing::info!(
                    peer = %self.peer.address,
                    hold = n.hold_time,
                    families = ?n.families,
                    "BGP session established"
                ),
                Event::NotificationSent(n) => {
                    tracing::warn!(peer = %self.peer.address, "NOTIFICATION sent: {n}")
                }
                Event::NotificationReceived(n) => {
                    tracing::warn!(peer = %self.peer.address, "NOTIFICATION received: {n}")
                }
                Event::NoNextHop(f) => {
                    tracing::warn!(peer = %self.peer.address, "no {f} next hop; not announced")
                }
                Event::StateChanged { from, to } => {
                    tracing::debug!(peer = %self.peer.address, "{from} -> {to}")
                }
                _ => {}
            }
        }
        did
    }

    fn resolve_collision(&mut self) -> bool {
        if self.slots.len() == 2 {
            let (first, second) = self.slots.split_at_mut(1);
            let loser = crate::session::resolve_collision(
                Instant::now(),
                &mut first[0].session,
                &mut second[0].session,
            );
            match loser {
                Some(CollisionLoser::First) => {
                    self.pump_slot(0);
                }
                Some(CollisionLoser::Second) => {
                    self.pump_slot(1);
                }
                None => {}
            }
            // Promote the second session once the first is gone; drop a failed second.
            if !self.slots[0].session.is_connected() && self.slots[1].session.is_connected() {
                self.slots.swap(0, 1);
                self.slots.pop();
                return true;
            }
            if !self.slots[1].session.is_connected() {
                self.slots.pop();
                return true;
            }
        }
        false
    }

    fn handle_io(&mut self, io: Io) {
        let now = Instant::now();
        match io {
            Io::Data(id, bytes) => {
                if let Some(s) = self.slot_by_conn(id) {
                    s.session.handle_bytes(now, &bytes);
                }
            }
            Io::Closed(id) => {
                if let Some(s) = self.slot_by_conn(id) {
                    if let Some(c) = s.conn.take() {
                        c.close();
                    }
                    s.session.handle_closed(now);
                }
            }
            Io::Writable => {}
            Io::Connected(attempt, result) => {
                if attempt != self.connect_attempt {
                    return;
                }
                self.connecting = None;
                match result {
                    Ok(stream) if self.slots[0].session.accepts_connection() => {
                        self.attach(0, stream, Direction::Outbound);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(peer = %self.peer.address, "connect failed: {e}");
                        self.last_error = Some(connect_error(&self.peer, &e));
                        if self.slots[0].session.state() == State::Connect {
                            self.slots[0].session.handle_closed(now);
                        }
                    }
                }
            }
        }
    }

    fn slot_by_conn(&mut self, id: u64) -> Option<&mut Slot> {
        self.slots
            .iter_mut()
            .find(|s| s.conn.as_ref().is_some_and(|c| c.id == id))
    }

    fn inbound(&mut self, stream: TcpStream) {
        let v6 = stream.peer_addr().is_ok_and(|a| a.is_ipv6());
        if let Err(e) = apply_ttl(&self.peer, &stream, v6) {
            tracing::warn!(peer = %self.peer.address, "TTL options: {e}");
        }
        let now = Instant::now();
        let primary = &self.slots[0].session;
        if primary.accepts_connection() {
            if let Some(c) = self.connecting.take() {
                c.abort();
            }
            self.attach(0, stream, Direction::Inbound);
        } else if self.slots.len() == 1
            && matches!(primary.state(), State::OpenSent | State::OpenConfirm)
        {
            let mut second = Session::new(
                self.peer.session.clone(),
                now,
                session_seed(self.node_seed, self.peer.address),
            );
            let routes = primary.routes().map(|(p, a)| (*p, a.clone())).collect();
            second.handle_command(now, Command::Replace { routes });
            second.handle_command(now, Command::Start);
            self.slots.push(Slot {
                session: second,
                conn: None,
            });
            self.attach(1, stream, Direction::Inbound);
        } else {
            let sub = if primary.state() == State::Established {
                CeaseSubcode::CONNECTION_COLLISION_RESOLUTION
            } else {
                CeaseSubcode::CONNECTION_REJECTED
            };
            let mut bytes = Vec::new();
            Notification::cease(sub).encode(&mut bytes);
            tokio::spawn(async move {
                let mut stream = stream;
                let _ = stream.write_all(&bytes).await;
                let _ = stream.shutdown().await;
            });
        }
    }

    fn attach(&mut self, i: usize, stream: TcpStream, direction: Direction) {
        let (Ok(local), Ok(remote)) = (stream.local_addr(), stream.peer_addr()) else {
            self.slots[i].session.handle_closed(Instant::now());
            return;
        };
        let _ = stream.set_nodelay(true);
        self.next_id += 1;
        let id = self.next_id;
        let (mut rd, mut wr) = stream.into_split();
        let (wtx, mut wrx) = mpsc::channel::<Bytes>(WRITE_QUEUE_CHUNKS);
        let stalled = Arc::new(AtomicBool::new(false));
        let (writer_stalled, writer_io) = (stalled.clone(), self.io_tx.clone());
        let writer_task = tokio::spawn(async move {
            while let Some(b) = wrx.recv().await {
                if writer_stalled.swap(false, Ordering::AcqRel) {
                    let _ = writer_io.send(Io::Writable).await;
                }
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let io = self.io_tx.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = io.send(Io::Closed(id)).await;
                        return;
                    }
                    Ok(n) => {
                        if io
                            .send(Io::Data(id, Bytes::copy_from_slice(&buf[..n])))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        });
        let conn = ConnIo {
            id,
            writer: wtx,
            stalled,
            reader,
            writer_task,
        };
        let now = Instant::now();
        if self.slots[i]
            .session
            .handle_connected(now, local, remote, direction)
        {
            self.slots[i].conn = Some(conn);
        } else {
            conn.close();
        }
    }

    /// Abandons a pending connect; one that got no answer by then is recorded as timed out.
    fn abort_connect(&mut self) {
        if let Some(c) = self.connecting.take() {
            if !c.is_finished() {
                self.last_error = Some(connect_error(
                    &self.peer,
                    &std::io::Error::from(std::io::ErrorKind::TimedOut),
                ));
            }
            c.abort();
        }
    }

    fn start_connect(&mut self) {
        self.abort_connect();
        self.connect_attempt += 1;
        let attempt = self.connect_attempt;
        let io = self.io_tx.clone();
        let peer = self.peer.clone();
        let target = SocketAddr::new(peer.address, peer.port);
        let timeout = peer.session.connect_retry_time;
        self.connecting = Some(tokio::spawn(async move {
            let result = async {
                let socket = if target.is_ipv4() {
                    TcpSocket::new_v4()?
                } else {
                    TcpSocket::new_v6()?
                };
                if let Some(src) = peer.source_address {
                    socket.bind(SocketAddr::new(src, 0))?;
                }
                if let Some(pw) = &peer.md5_password {
                    sockopt::set_md5(&socket, peer.address, pw.as_bytes())?;
                }
                apply_ttl(&peer, &socket, target.is_ipv6())?;
                match tokio::time::timeout(timeout, socket.connect(target)).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                }
            }
            .await;
            let _ = io.send(Io::Connected(attempt, result)).await;
        }));
    }
}

/// A connect failure as status text, with a hint when TCP MD5 may be the cause.
fn connect_error(peer: &PeerConfig, e: &std::io::Error) -> String {
    let hint = if peer.md5_password.is_some() && e.kind() == std::io::ErrorKind::TimedOut {
        " (TCP MD5 is configured: a password mismatch makes the peer drop our SYNs silently)"
    } else {
        ""
    };
    format!("TCP connect to {}:{}: {e}{hint}", peer.address, peer.port)
}

fn apply_ttl(
    peer: &PeerConfig,
    socket: &impl std::os::fd::AsRawFd,
    v6: bool,
) -> std::io::Result<()> {
    match peer.ttl {
        TtlMode::Gtsm => {
            sockopt::set_ttl(socket, v6, 255)?;
            sockopt::set_min_ttl(socket, v6, 255)
        }
        TtlMode::Multihop(ttl) => sockopt::set_ttl(socket, v6, ttl),
        TtlMode::Default if !peer.session.is_ibgp() => sockopt::set_ttl(socket, v6, 1),
        TtlMode::Default => Ok(()),
    }
}
