//! The tokio driver: moves bytes between TCP sockets and [`Session`]s and wakes them at
//! their deadlines. It holds no protocol logic beyond connection collision handling.
//!
//! One task per peer owns that peer's session(s); a listener task hands inbound
//! connections to the peer task by remote address. Each TCP connection has a reader task
//! and a writer task, so a peer that stops reading never blocks the session's timers.
//!
//! Connection collision (RFC 4271 §6.8) is resolved here: an inbound connection that
//! arrives while the peer's session is in OpenSent/OpenConfirm gets a second `Session`;
//! once both have the peer's OPEN, [`collision_winner`] picks the survivor and the other
//! is closed with Cease / Connection Collision Resolution. An inbound connection while
//! Established is refused the same way.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
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

/// Speaker-wide settings.
#[derive(Clone, Debug, Default)]
pub struct SpeakerConfig {
    /// Where to accept connections (e.g. `0.0.0.0:179`); `None` for active-only peers.
    pub listen: Option<SocketAddr>,
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

enum PeerCtl {
    Command(Command),
    Inbound(TcpStream),
    Shutdown,
}

struct PeerHandle {
    ctl: mpsc::UnboundedSender<PeerCtl>,
    status: watch::Receiver<PeerStatus>,
    task: JoinHandle<()>,
}

struct Shared {
    peers: Mutex<HashMap<IpAddr, PeerHandle>>,
    routes: Mutex<BTreeMap<IpNet, RouteAttrs>>,
    listener: Option<Arc<TcpListener>>,
}

/// A BGP speaker: a listener and a set of peers sharing one announced table.
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
        });
        let accept_task = listener.map(|l| {
            let shared = Arc::downgrade(&shared);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, remote)) = l.accept().await else {
                        continue;
                    };
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
            })
        });
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

    /// Add a peer and start its session; it receives the current table.
    ///
    /// # Errors
    /// The peer already exists, or the MD5 key could not be installed on the listener.
    pub fn add_peer(&self, peer: PeerConfig) -> Result<(), Error> {
        let address = normalize(peer.address);
        let mut peers = lock(&self.shared.peers);
        if peers.contains_key(&address) {
            return Err(Error::Config(format!("peer {address} already exists")));
        }
        if let (Some(l), Some(pw)) = (&self.shared.listener, &peer.md5_password) {
            sockopt::set_md5(&**l, address, pw.as_bytes()).map_err(|source| Error::Io {
                op: "TCP_MD5SIG on listener",
                source,
            })?;
        }
        let now = Instant::now();
        let seed = u64::from(now.elapsed().subsec_nanos()) ^ address_seed(address);
        let mut session = Session::new(peer.session.clone(), now, seed);
        let routes = lock(&self.shared.routes).clone();
        session.handle_command(now, Command::Replace { routes });
        session.handle_command(now, Command::Start);
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(PeerStatus {
            address,
            session: session.status(now),
            taken_at: now,
            last_error: None,
        });
        let driver = PeerDriver::new(peer, session, status_tx);
        let task = tokio::spawn(driver.run(ctl_rx));
        peers.insert(
            address,
            PeerHandle {
                ctl: ctl_tx,
                status: status_rx,
                task,
            },
        );
        Ok(())
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
        if let Some(l) = &self.shared.listener {
            let _ = sockopt::set_md5(&**l, address, &[]);
        }
        let _ = handle.ctl.send(PeerCtl::Shutdown);
        let _ = tokio::time::timeout(Duration::from_secs(2), handle.task).await;
        Ok(())
    }

    /// Announce prefixes to every peer (and to peers added later).
    pub fn announce(&self, prefixes: Vec<IpNet>, attrs: RouteAttrs) {
        {
            let mut routes = lock(&self.shared.routes);
            for p in &prefixes {
                routes.insert(p.trunc(), attrs.clone());
            }
        }
        self.broadcast(Command::Announce { prefixes, attrs });
    }

    /// Withdraw prefixes from every peer.
    pub fn withdraw(&self, prefixes: Vec<IpNet>) {
        {
            let mut routes = lock(&self.shared.routes);
            for p in &prefixes {
                routes.remove(&p.trunc());
            }
        }
        self.broadcast(Command::Withdraw { prefixes });
    }

    /// Send a command to one peer's session (e.g. per-peer announcements or Stop/Start).
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

    fn broadcast(&self, command: Command) {
        for handle in lock(&self.shared.peers).values() {
            let _ = handle.ctl.send(PeerCtl::Command(command.clone()));
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
            let _ = h.ctl.send(PeerCtl::Shutdown);
        }
        for h in handles {
            let _ = tokio::time::timeout(Duration::from_secs(2), h.task).await;
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

fn address_seed(a: IpAddr) -> u64 {
    match a {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6) as u64,
    }
}

enum Io {
    Data(u64, Bytes),
    Closed(u64),
    Connected(u64, std::io::Result<TcpStream>),
}

struct ConnIo {
    id: u64,
    writer: mpsc::UnboundedSender<Bytes>,
    reader: JoinHandle<()>,
}

impl ConnIo {
    /// Stop reading; the writer task flushes what it has, then shuts the socket down.
    fn close(self) {
        self.reader.abort();
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
    io_tx: mpsc::UnboundedSender<Io>,
    io_rx: mpsc::UnboundedReceiver<Io>,
    next_id: u64,
    connect_attempt: u64,
    last_error: Option<String>,
    connecting: Option<JoinHandle<()>>,
    status: watch::Sender<PeerStatus>,
}

impl PeerDriver {
    fn new(peer: PeerConfig, session: Session, status: watch::Sender<PeerStatus>) -> Self {
        let (io_tx, io_rx) = mpsc::unbounded_channel();
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
                        Some(PeerCtl::Shutdown) | None => {
                            let now = Instant::now();
                            for s in &mut self.slots {
                                s.session.handle_command(now, Command::Stop);
                            }
                            self.pump();
                            if let Some(c) = self.connecting.take() {
                                c.abort();
                            }
                            // Give the writer tasks a moment to flush the NOTIFICATION.
                            tokio::time::sleep(Duration::from_millis(50)).await;
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
        while let Some(bytes) = self.slots[i].session.poll_transmit() {
            if let Some(c) = &self.slots[i].conn {
                let _ = c.writer.send(bytes);
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
            let mut second = Session::new(self.peer.session.clone(), now, self.next_id ^ 0x5eed);
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
        let (wtx, mut wrx) = mpsc::unbounded_channel::<Bytes>();
        tokio::spawn(async move {
            while let Some(b) = wrx.recv().await {
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
                        let _ = io.send(Io::Closed(id));
                        return;
                    }
                    Ok(n) => {
                        if io
                            .send(Io::Data(id, Bytes::copy_from_slice(&buf[..n])))
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
            reader,
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
            let _ = io.send(Io::Connected(attempt, result));
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
