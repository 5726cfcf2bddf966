//! The lab router's ECMP keeps a flow on one node whatever the sending socket's hash.
//!
//! ```text
//!  client ──veth── router (configure_router) ──veth── h1 (VIP on lo, listener)
//!                                            └─veth── h2 (VIP on lo, listener)
//! ```
//! A TCP segment that crosses a veth keeps its socket's `sk_txhash`, which the sender's
//! kernel draws anew for every socket and on every retransmission timeout. A router that
//! hashed on it (`fib_multipath_hash_policy=1` does, for a packet with a layer-4 hash) moved
//! a bulk stream to the other node after a timeout; in the lab that node balanced it from
//! its own SNAT address and the backend reset the stream (about one `portico lab demo` in
//! six to eight). Here each of 24 sockets in a row connects from the same address and port
//! (each gets a new `sk_txhash`, as a timeout would give one socket): every one must reach
//! the same host. With policy 1 they spread over both (all on one with probability 2^-23).
//! Connections from 32 different source ports must reach both hosts (ECMP works at all).

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    os::fd::FromRawFd,
};

use anyhow::{bail, Context as _, Result};
use portico_integration::{
    require_root,
    topology::{self, addr, default_routes},
    traffic::{self, Backend, WHO_REQUEST},
    NetNs, TestNet,
};

const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec, 0, 0, 0, 0, 0, 1);
const VIP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 80);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec, 0xff, 0, 0, 0, 0, 0x80);
const PORT: u16 = 8080;
/// Sockets in a row from one source address and port.
const SAME_TUPLE: usize = 24;
/// Connections from distinct source ports.
const SPREAD: u16 = 32;

struct Net {
    _net: TestNet,
    client: NetNs,
    _servers: Vec<Backend>,
}

fn build() -> Result<Net> {
    require_root("lab_ecmp")?;
    let mut net = TestNet::new()?;
    let client = net.add_ns("ec")?;
    let rt = net.add_ns("er")?;
    net.veth(&client, "eth0", &rt, "c")?;
    for (ns, cidr, dev) in [
        (&client, format!("{CLIENT_V4}/24"), "eth0"),
        (&client, format!("{CLIENT_V6}/64"), "eth0"),
        (&rt, "198.51.100.254/24".to_owned(), "c"),
        (&rt, "fd00:ec::fe/64".to_owned(), "c"),
    ] {
        addr(ns, &cidr, dev)?;
    }
    default_routes(
        &client,
        Some(Ipv4Addr::new(198, 51, 100, 254)),
        "fd00:ec::fe".parse()?,
    )?;
    // The code under test: the lab router's forwarding and ECMP settings.
    topology::configure_router(&rt)?;
    let mut servers = Vec::new();
    let (mut via4, mut via6) = (Vec::new(), Vec::new());
    for i in 1..=2u8 {
        let h = net.add_ns(&format!("eh{i}"))?;
        let dev = format!("h{i}");
        net.veth(&h, "eth0", &rt, &dev)?;
        addr(&h, &format!("198.51.{i}.1/24"), "eth0")?;
        addr(&h, &format!("fd00:ec:{i}::1/64"), "eth0")?;
        addr(&rt, &format!("198.51.{i}.254/24"), &dev)?;
        addr(&rt, &format!("fd00:ec:{i}::fe/64"), &dev)?;
        default_routes(
            &h,
            Some(Ipv4Addr::new(198, 51, i, 254)),
            format!("fd00:ec:{i}::fe").parse()?,
        )?;
        addr(&h, &format!("{VIP_V4}/32"), "lo")?;
        addr(&h, &format!("{VIP_V6}/128"), "lo")?;
        via4.push(format!("198.51.{i}.1"));
        via6.push(format!("fd00:ec:{i}::1"));
        for ip in [IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)] {
            servers.push(Backend::start(
                &h,
                &format!("h{i}"),
                SocketAddr::new(ip, PORT),
            )?);
        }
    }
    for (family, vip, via) in [
        ("-4", format!("{VIP_V4}/32"), via4),
        ("-6", format!("{VIP_V6}/128"), via6),
    ] {
        let mut args = vec!["ip", family, "route", "add", &vip];
        for v in &via {
            args.extend(["nexthop", "via", v.as_str()]);
        }
        rt.run(&args)?;
    }
    Ok(Net {
        _net: net,
        client,
        _servers: servers,
    })
}

/// Connects from `from` to `to` (the calling thread in the client's namespace), asks which
/// host answers, and closes with a reset (linger 0), so that no TIME_WAIT entry keeps the
/// 5-tuple from being used again at once.
fn who_from(from: SocketAddr, to: SocketAddr) -> Result<String> {
    let domain = if from.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket call; the descriptor is owned by the TcpStream below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns; the stream closes it.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    set_option(fd, libc::SO_REUSEADDR, &(1 as libc::c_int))?;
    set_option(
        fd,
        libc::SO_LINGER,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    let (sa, len) = sockaddr(from);
    // SAFETY: valid descriptor; `sa` holds a sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, (&raw const sa).cast(), len) } != 0 {
        bail!("bind {from}: {}", std::io::Error::last_os_error());
    }
    let (sa, len) = sockaddr(to);
    // The previous socket of the same 5-tuple is gone from the lookup tables a moment
    // after its reset: a busy 5-tuple (EADDRNOTAVAIL) is tried again, 100 times at most.
    for attempt in 0.. {
        // SAFETY: as above (blocking connect; the peer is a namespace away).
        if unsafe { libc::connect(fd, (&raw const sa).cast(), len) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EADDRNOTAVAIL) || attempt == 100 {
            bail!("connect {from} → {to}: {e}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    stream.set_read_timeout(Some(traffic::IO_TIMEOUT))?;
    let mut w = stream.try_clone()?;
    w.write_all(format!("{WHO_REQUEST}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("reading the answer")?;
    Ok(traffic::Answer::parse(&line)?.backend)
}

/// Sets the socket option `name` (level `SOL_SOCKET`) of `fd` to `value`.
fn set_option<T>(fd: libc::c_int, name: libc::c_int, value: &T) -> Result<()> {
    // SAFETY: valid descriptor; `value` is a live `T` of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if r != 0 {
        bail!("setsockopt {name}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// `a` as a `sockaddr_storage` and its length.
fn sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in>().write(sin) };
            (ss, size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in6>().write(sin6) };
            (ss, size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
}

fn run(client_ip: IpAddr, vip: IpAddr) {
    let net = build().unwrap();
    let to = SocketAddr::new(vip, PORT);
    let (same, spread) = traffic::in_ns(&net.client, move || {
        let mut same = BTreeMap::<String, usize>::new();
        for _ in 0..SAME_TUPLE {
            let host = who_from(SocketAddr::new(client_ip, 41000), to)?;
            *same.entry(host).or_default() += 1;
        }
        let mut spread = BTreeMap::<String, usize>::new();
        for i in 0..SPREAD {
            let host = who_from(SocketAddr::new(client_ip, 42000 + i), to)?;
            *spread.entry(host).or_default() += 1;
        }
        Ok((same, spread))
    })
    .unwrap();
    assert_eq!(
        same.len(),
        1,
        "{SAME_TUPLE} connections from {client_ip} port 41000 to {to}, one socket after \
         another, reached more than one host: the router's ECMP follows the sending socket's \
         hash, not the 5-tuple: {same:?}"
    );
    assert_eq!(
        spread.len(),
        2,
        "{SPREAD} connections from distinct ports to {to} all reached one host: no ECMP: \
         {spread:?}"
    );
}

#[test]
fn one_tuple_one_node_v4() {
    run(IpAddr::V4(CLIENT_V4), IpAddr::V4(VIP_V4));
}

#[test]
fn one_tuple_one_node_v6() {
    run(IpAddr::V6(CLIENT_V6), IpAddr::V6(VIP_V6));
}
