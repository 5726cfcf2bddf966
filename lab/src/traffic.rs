//! Real traffic between namespaces, from threads of this process: each thread enters its
//! namespace (`setns` is per thread) and uses ordinary sockets. Backends answer every line or
//! datagram with their name, so clients can tell which backend served them; to the request
//! [`WHO_REQUEST`] they answer with their name and the source address they saw
//! (`be1 198.18.1.11:20001`), so a client also learns which node's SNAT address carried the
//! flow. Every loop is bounded in count and time.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::NetNs;

/// Socket timeouts for every client operation.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The line (TCP) or datagram (UDP) a backend answers with `<name> <source address>`.
pub const WHO_REQUEST: &str = "peer";

/// The line after which a TCP backend discards everything until the client closes its
/// side, then answers with the number of bytes it received (a bulk-transfer sink).
pub const SINK_REQUEST: &str = "sink";

/// What a backend said to [`WHO_REQUEST`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The backend's name.
    pub backend: String,
    /// The source address the backend saw: a node's SNAT address, or the client's own.
    pub seen_from: SocketAddr,
}

impl Answer {
    /// Parses `<name> <address:port>`.
    ///
    /// # Errors
    /// The text is not of that form.
    pub fn parse(text: &str) -> Result<Self> {
        let (backend, from) = text
            .trim()
            .split_once(' ')
            .with_context(|| format!("not a `<name> <address>` answer: {text:?}"))?;
        Ok(Self {
            backend: backend.to_owned(),
            seen_from: from
                .parse()
                .with_context(|| format!("bad source address in {text:?}"))?,
        })
    }
}

/// A TCP and UDP echo-with-name server on `port`, running in a namespace until dropped.
pub struct Backend {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    addr: SocketAddr,
}

impl Backend {
    /// Starts the server inside `ns` on `addr` (TCP and UDP); it answers with `name`.
    ///
    /// # Errors
    /// Entering the namespace or binding fails.
    pub fn start(ns: &NetNs, name: &str, addr: SocketAddr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
        let mut threads = Vec::new();
        for udp in [false, true] {
            let (ns, name, stop, tx) = (ns.clone(), name.to_owned(), stop.clone(), tx.clone());
            threads.push(std::thread::spawn(move || {
                let entered = ns.enter();
                let guard = match entered {
                    Ok(g) => g,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if udp {
                    serve_udp(addr, &name, &stop, &tx);
                } else {
                    serve_tcp(addr, &name, &stop, &tx);
                }
                drop(guard);
            }));
        }
        for _ in 0..2 {
            rx.recv_timeout(IO_TIMEOUT)
                .context("backend did not start")??;
        }
        Ok(Self {
            stop,
            threads,
            addr,
        })
    }
}

fn serve_tcp(
    addr: SocketAddr,
    name: &str,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<Result<()>>,
) {
    let listener = match TcpListener::bind(addr).and_then(|l| l.set_nonblocking(true).map(|()| l)) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("binding tcp {addr}: {e}")));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, peer)) => {
                let name = name.to_owned();
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    let mut writer = match stream.try_clone() {
                        Ok(w) => w,
                        Err(_) => return,
                    };
                    let mut reader = BufReader::new(stream);
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if !matches!(reader.read_line(&mut line), Ok(n) if n > 0) {
                            break;
                        }
                        let answer = match line.trim() {
                            SINK_REQUEST => {
                                // Everything until the client's FIN, then the byte count.
                                let n = std::io::copy(&mut reader, &mut std::io::sink());
                                let _ =
                                    writer.write_all(format!("{}\n", n.unwrap_or(0)).as_bytes());
                                break;
                            }
                            WHO_REQUEST => format!("{name} {peer}\n"),
                            _ => format!("{name}\n"),
                        };
                        if writer.write_all(answer.as_bytes()).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

fn serve_udp(
    addr: SocketAddr,
    name: &str,
    stop: &AtomicBool,
    ready: &std::sync::mpsc::Sender<Result<()>>,
) {
    let socket = match UdpSocket::bind(addr) {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(anyhow::anyhow!("binding udp {addr}: {e}")));
            return;
        }
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
    let _ = ready.send(Ok(()));
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let answer = if &buf[..n] == WHO_REQUEST.as_bytes() {
                format!("{name} {from}")
            } else {
                format!("{name}\n")
            };
            let _ = socket.send_to(answer.as_bytes(), from);
        }
    }
}

impl Backend {
    /// The address the backend listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts a [`Backend`] named `be<i>` in each namespace (`i` from 1), listening on
/// `addr(i)`; they stop when dropped.
///
/// # Errors
/// A server cannot bind, or there are more than 255 namespaces.
pub fn start_backends(
    namespaces: &[NetNs],
    addr: impl Fn(u8) -> SocketAddr,
) -> Result<Vec<Backend>> {
    namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let i = u8::try_from(i + 1)?;
            Backend::start(ns, &format!("be{i}"), addr(i))
        })
        .collect()
}

/// Runs `f` on a thread inside `ns` and returns its result.
///
/// # Errors
/// Entering the namespace fails, or `f` fails or panics.
pub fn in_ns<T: Send + 'static>(
    ns: &NetNs,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = ns.clone();
    std::thread::spawn(move || {
        let _guard = ns.enter()?;
        f()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
}

/// One TCP exchange: connect to `vip`, send a line, read the backend's name, close.
///
/// # Errors
/// Connect, write or read fails or times out.
pub fn tcp_once(vip: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&vip, IO_TIMEOUT)
        .with_context(|| format!("connecting to {vip}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the answer")?;
    let _ = s.shutdown(Shutdown::Both);
    if line.is_empty() {
        bail!("connection to {vip} closed without an answer");
    }
    Ok(line.trim().to_owned())
}

/// One UDP exchange from a fresh socket (a new flow): send, read the backend's name.
///
/// # Errors
/// Bind, send or receive fails or times out.
pub fn udp_once(vip: SocketAddr) -> Result<String> {
    let local: SocketAddr = match vip.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let s = UdpSocket::bind(local)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 256];
    // Datagrams may be lost before neighbours settle: retry a bounded number of times.
    for _ in 0..5 {
        s.send_to(b"hello", vip)?;
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
        }
    }
    bail!("no UDP answer from {vip} after 5 tries")
}

/// One TCP exchange of [`WHO_REQUEST`]: connect to `vip`, ask, read the answer, close.
///
/// # Errors
/// Connect, write or read fails or times out, or the answer does not parse.
pub fn tcp_who(vip: SocketAddr) -> Result<Answer> {
    let mut s = TcpStream::connect_timeout(&vip, IO_TIMEOUT)
        .with_context(|| format!("connecting to {vip}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.write_all(format!("{WHO_REQUEST}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the answer")?;
    let _ = s.shutdown(Shutdown::Both);
    if line.is_empty() {
        bail!("connection to {vip} closed without an answer");
    }
    Answer::parse(&line)
}

/// One UDP exchange of [`WHO_REQUEST`] from a fresh socket (a new flow), retried a bounded
/// number of times.
///
/// # Errors
/// Bind, send or receive fails, no answer comes, or it does not parse.
pub fn udp_who(vip: SocketAddr) -> Result<Answer> {
    let local: SocketAddr = match vip.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let s = UdpSocket::bind(local)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 256];
    for _ in 0..5 {
        s.send_to(WHO_REQUEST.as_bytes(), vip)?;
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            return Answer::parse(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    bail!("no UDP answer from {vip} after 5 tries")
}

/// A bulk TCP transfer to a backend's [`SINK_REQUEST`] through `vip` for `duration`
/// (the calling thread must be in the client's namespace); returns the bytes the backend
/// counted.
///
/// # Errors
/// The connection fails, breaks, or the count does not come back.
pub fn tcp_bulk(vip: SocketAddr, duration: Duration) -> Result<u64> {
    let start = Instant::now();
    tcp_sink(vip, IO_TIMEOUT, 64 * 1024, |_| start.elapsed() < duration)
}

/// Sends `bytes` bytes (a multiple of 256 KiB rounded down) to a backend's sink through
/// `vip`, each read or write allowed `timeout`; the count the backend read.
///
/// # Errors
/// The connection fails, breaks, or the count does not come back.
pub fn tcp_upload(vip: SocketAddr, bytes: usize, timeout: Duration) -> Result<u64> {
    const CHUNK: usize = 256 * 1024;
    tcp_sink(vip, timeout, CHUNK, |sent| sent + CHUNK <= bytes)
}

/// Opens a connection to the sink behind `vip`, sends chunks of `chunk` bytes while `more`
/// (given the bytes sent so far) says so, and returns the count the backend read.
fn tcp_sink(
    vip: SocketAddr,
    timeout: Duration,
    chunk: usize,
    mut more: impl FnMut(usize) -> bool,
) -> Result<u64> {
    let mut s = TcpStream::connect_timeout(&vip, IO_TIMEOUT)
        .with_context(|| format!("connecting to {vip}"))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("{SINK_REQUEST}\n").as_bytes())?;
    let data = vec![0xa5_u8; chunk];
    let mut sent = 0;
    while more(sent) {
        s.write_all(&data).context("sending")?;
        sent += chunk;
    }
    s.shutdown(Shutdown::Write)?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the byte count")?;
    line.trim()
        .parse()
        .with_context(|| format!("not a byte count: {line:?}"))
}

/// What [`udp_flood`] measured.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Flood {
    /// Flows (client sockets, each with its own source port).
    pub flows: usize,
    /// Datagrams sent.
    pub sent: u64,
    /// Answers received (each a round trip through the balancer both ways).
    pub answered: u64,
    /// Seconds of sending.
    pub secs: f64,
}

impl Flood {
    /// Datagrams sent per second.
    pub fn sent_per_sec(&self) -> f64 {
        self.sent as f64 / self.secs.max(1e-9)
    }

    /// Answers per second: request and answer both crossed the balancer.
    pub fn answered_per_sec(&self) -> f64 {
        self.answered as f64 / self.secs.max(1e-9)
    }
}

/// Floods `vip` from `flows` UDP sockets (one source port each, chosen by the kernel) with
/// 32-byte datagrams for `duration` or until `max_datagrams` are sent, round-robin,
/// without waiting for answers; answers are drained as they come and for 300 ms after.
/// Run it inside the client's namespace (see [`in_ns`]). Bounded in count and time.
///
/// # Errors
/// A socket cannot be created or connected, or a send fails with anything but a full
/// buffer.
pub fn udp_flood(
    vip: SocketAddr,
    flows: usize,
    duration: Duration,
    max_datagrams: u64,
) -> Result<Flood> {
    let local: SocketAddr = if vip.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sockets = (0..flows.max(1))
        .map(|_| {
            let s = UdpSocket::bind(local)?;
            s.connect(vip)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("opening {flows} UDP sockets toward {vip}"))?;
    let payload = [0x5a_u8; 32];
    let mut buf = [0_u8; 512];
    let mut out = Flood {
        flows: sockets.len(),
        ..Flood::default()
    };
    let drain = |out: &mut Flood, buf: &mut [u8]| {
        for s in &sockets {
            while s.recv(buf).is_ok() {
                out.answered += 1;
            }
        }
    };
    let start = Instant::now();
    'send: while out.sent < max_datagrams {
        for s in &sockets {
            match s.send(&payload) {
                Ok(_) => out.sent += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // An ICMP error from a lost earlier datagram surfaces on the next send.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e).with_context(|| format!("sending to {vip}")),
            }
        }
        drain(&mut out, &mut buf);
        if start.elapsed() >= duration {
            break 'send;
        }
    }
    out.secs = start.elapsed().as_secs_f64();
    let tail = Instant::now();
    while tail.elapsed() < Duration::from_millis(300) {
        drain(&mut out, &mut buf);
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(out)
}

/// Runs `count` exchanges of `exchange` against `vip` on `threads` threads inside `ns` and
/// returns every answer; a failed exchange is kept as its error text, so one lost flow does
/// not hide what the others saw.
///
/// # Errors
/// Entering the namespace fails, a thread panics, or the whole run exceeds `deadline`.
pub fn answers(
    ns: &NetNs,
    vip: SocketAddr,
    count: usize,
    threads: usize,
    deadline: Duration,
    exchange: fn(SocketAddr) -> Result<Answer>,
) -> Result<Vec<Result<Answer, String>>> {
    let start = Instant::now();
    let threads = threads.max(1);
    let mut handles = Vec::new();
    for t in 0..threads {
        let n = count / threads + usize::from(t < count % threads);
        let ns = ns.clone();
        handles.push(std::thread::spawn(
            move || -> Result<Vec<Result<Answer, String>>> {
                let _guard = ns.enter()?;
                let mut out = Vec::with_capacity(n);
                for i in 0..n {
                    if start.elapsed() > deadline {
                        bail!("deadline of {deadline:?} passed after {i} exchanges on one thread");
                    }
                    out.push(exchange(vip).map_err(|e| format!("{e:#}")));
                }
                Ok(out)
            },
        ));
    }
    let mut all = Vec::with_capacity(count);
    for h in handles {
        all.extend(
            h.join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??,
        );
    }
    Ok(all)
}

/// Runs `count` exchanges of `exchange` against `vip` on `threads` threads inside `ns`, and
/// returns how many each backend answered. Fails on the first failed exchange.
///
/// # Errors
/// Any exchange fails, or the whole run exceeds `deadline`.
pub fn spread(
    ns: &NetNs,
    vip: SocketAddr,
    count: usize,
    threads: usize,
    deadline: Duration,
    exchange: fn(SocketAddr) -> Result<String>,
) -> Result<BTreeMap<String, usize>> {
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..threads {
        let n = count / threads + usize::from(t < count % threads);
        let ns = ns.clone();
        handles.push(std::thread::spawn(
            move || -> Result<BTreeMap<String, usize>> {
                let _guard = ns.enter()?;
                let mut tally = BTreeMap::new();
                for i in 0..n {
                    if start.elapsed() > deadline {
                        bail!("deadline of {deadline:?} passed after {i} exchanges on one thread");
                    }
                    let who =
                        exchange(vip).with_context(|| format!("exchange {i} on thread {t}"))?;
                    *tally.entry(who).or_insert(0) += 1;
                }
                Ok(tally)
            },
        ));
    }
    let mut total = BTreeMap::new();
    for h in handles {
        let tally = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        for (k, v) in tally {
            *total.entry(k).or_insert(0) += v;
        }
    }
    Ok(total)
}

/// A long-lived TCP connection through the VIP, kept open to exchange lines later.
pub struct LongLived {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The backend that answered the first line.
    pub backend: String,
}

impl LongLived {
    /// Opens a connection (the calling thread must be in the client namespace) and learns
    /// which backend serves it.
    ///
    /// # Errors
    /// The connection or first exchange fails.
    pub fn open(vip: SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&vip, IO_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        let reader = BufReader::new(stream.try_clone()?);
        let mut me = Self {
            stream,
            reader,
            backend: String::new(),
        };
        me.backend = me.exchange()?;
        Ok(me)
    }

    /// Sends a line and reads the answer.
    ///
    /// # Errors
    /// The connection broke or timed out.
    pub fn exchange(&mut self) -> Result<String> {
        self.stream.write_all(b"ping\n")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.is_empty() {
            bail!("connection closed");
        }
        Ok(line.trim().to_owned())
    }

    /// Asks [`WHO_REQUEST`] on the open connection: which backend, and which source address
    /// it sees (the node that carries this flow).
    ///
    /// # Errors
    /// The connection broke or timed out, or the answer does not parse.
    pub fn who(&mut self) -> Result<Answer> {
        self.stream
            .write_all(format!("{WHO_REQUEST}\n").as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        if line.is_empty() {
            bail!("connection closed");
        }
        Answer::parse(&line)
    }

    /// Sets the read timeout of later exchanges (a broken flow fails after this long).
    ///
    /// # Errors
    /// The socket option cannot be set.
    pub fn set_timeout(&self, timeout: Duration) -> Result<()> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        Ok(())
    }
}

/// A packet socket (AF_PACKET) on one interface of a namespace, capturing every frame, both
/// directions, from the moment it is opened (an 8 MiB receive buffer).
pub struct Capture {
    fd: std::os::fd::OwnedFd,
}

impl Capture {
    /// Opens the socket on `iface` inside `ns`.
    ///
    /// # Errors
    /// No such interface, or the socket cannot be made (needs root).
    pub fn open(ns: &NetNs, iface: &str) -> Result<Self> {
        use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
        /// `ETH_P_ALL`.
        const ETH_P_ALL: u16 = 0x0003;
        let iface = iface.to_owned();
        in_ns(ns, move || {
            // SAFETY: plain socket(2); the descriptor is owned below.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK,
                    i32::from(ETH_P_ALL.to_be()),
                )
            };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: a fresh descriptor we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(iface.as_str())?;
            // SAFETY: a valid C string.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            if ifindex == 0 {
                bail!("no interface {iface}");
            }
            // SAFETY: a zeroed sockaddr_ll is valid; its fields are set below.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = ETH_P_ALL.to_be();
            sll.sll_ifindex = i32::try_from(ifindex)?;
            // SAFETY: `sll` is valid for its length.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sll).cast(),
                    u32::try_from(std::mem::size_of::<libc::sockaddr_ll>())?,
                )
            };
            if rc != 0 {
                bail!("binding to {iface}: {}", std::io::Error::last_os_error());
            }
            let size: libc::c_int = 8 << 20;
            // SAFETY: a c_int option value.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const size).cast(),
                    u32::try_from(std::mem::size_of::<libc::c_int>())?,
                )
            };
            Ok(Self { fd })
        })
    }

    /// The frames captured since the last call, in order (the socket is drained).
    #[must_use]
    pub fn frames(&self) -> Vec<Vec<u8>> {
        use std::os::fd::AsRawFd as _;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        // Bounded: the socket holds what arrived; each read takes one frame.
        for _ in 0..1_000_000 {
            // SAFETY: `buf` is valid for its length.
            let len = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            let Ok(len) = usize::try_from(len) else {
                break;
            };
            out.push(buf[..len].to_vec());
        }
        out
    }
}
