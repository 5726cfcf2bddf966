//! Jumbo frames through the XDP balancer (issue 13): every link of the lab's topology at
//! MTU 9000, the program attached natively (veth: a frame longer than a page arrives as a
//! multi-buffer `xdp_buff`, which only a frags-aware program may see), IPv4 and IPv6.
//!
//! ```text
//!  client ──veth── lb(eth0)   lb(eth1) ──veth── sw (bridge) ──veth── be1, be2, be3
//! ```
//! Checks: TCP connections whose requests are 60,000-byte lines (segments of up to 8,948
//! bytes) and 8,000-byte UDP datagrams (one frame each) all reach a backend through the VIP
//! and are answered; the balancer counted the datagrams in full (its byte counters come
//! from the IP length, fragments of the frame included).

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use portico_integration::{
    lab::{self, Family},
    traffic, NetNs,
};
use portico_xdp::{AttachMode, Balancer, Protocol};

/// The MTU of every link.
const MTU: &str = "9000";
/// TCP connections, each sending one long line.
const CONNECTIONS: usize = 20;
/// The length of each TCP request line.
const LINE: usize = 60_000;
/// UDP datagrams of [`DATAGRAM`] bytes.
const DATAGRAMS: usize = 20;
/// Payload of each UDP datagram: one 8,028- or 8,048-byte IP packet.
const DATAGRAM: usize = 8000;

/// Sets the MTU of every link of `ns` but the loopback (bridge ports before the bridge).
fn jumbo(ns: &NetNs) -> Result<()> {
    let links = ns.run(&["ip", "-o", "link", "show"])?;
    let mut names: Vec<String> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n != "lo")
        .collect();
    // Bridges last: a bridge's MTU cannot exceed its ports'.
    names.sort_by_key(|n| links.contains(&format!("master {n}")));
    for n in names {
        ns.run(&["ip", "link", "set", "dev", &n, "mtu", MTU])?;
    }
    Ok(())
}

fn tcp_long_line(vip: SocketAddr) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(5))
        .with_context(|| format!("connecting to {vip}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut line = vec![b'x'; LINE];
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer)?;
    ensure!(answer.starts_with("be"), "answer {answer:?}");
    Ok(answer.trim().to_owned())
}

fn udp_big(vip: SocketAddr) -> Result<String> {
    let local: SocketAddr = match vip.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let s = UdpSocket::bind(local)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let datagram = vec![b'y'; DATAGRAM];
    let mut buf = [0u8; 256];
    // Datagrams may be lost before neighbours settle: a bounded number of tries.
    for _ in 0..10 {
        s.send_to(&datagram, vip)?;
        if let Ok((n, _)) = s.recv_from(&mut buf) {
            return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_owned());
        }
    }
    anyhow::bail!("no answer to a {DATAGRAM}-byte datagram from {vip}")
}

fn run(v6: bool) -> Result<()> {
    let f = Family { v6 };
    let t = lab::topology(f)?;
    for ns in [&t.client, &t.lb, &t.sw].into_iter().chain(&t.backends) {
        jumbo(ns)?;
    }
    let _servers = t.start_backends()?;
    let data_path = t.start_data_path(AttachMode::Native)?;
    let vip = SocketAddr::new(f.vip(), lab::VIP_PORT);

    let tcp = traffic::in_ns(&t.client, move || {
        (0..CONNECTIONS)
            .map(|_| tcp_long_line(vip))
            .collect::<Result<Vec<_>>>()
    })?;
    ensure!(tcp.len() == CONNECTIONS, "TCP answers: {tcp:?}");

    let udp = traffic::in_ns(&t.client, move || {
        (0..DATAGRAMS)
            .map(|_| udp_big(vip))
            .collect::<Result<Vec<_>>>()
    })?;
    ensure!(udp.len() == DATAGRAMS, "UDP answers: {udp:?}");

    let b = &data_path.balancer;
    let tcp_stats = b
        .service_stats(&lab::service(f, Protocol::Tcp, &[]).key)?
        .context("the TCP service")?;
    ensure!(
        tcp_stats.service.bytes >= (CONNECTIONS * LINE) as u64,
        "TCP: {tcp_stats:?}"
    );
    let udp_stats = b
        .service_stats(&lab::service(f, Protocol::Udp, &[]).key)?
        .context("the UDP service")?;
    // Client → backend, each datagram counted in full: every one over a page, so
    // multi-buffer in XDP.
    let (packets, bytes) = udp_stats
        .backends
        .iter()
        .fold((0, 0), |(p, b), (_, c)| (p + c.packets, b + c.bytes));
    ensure!(
        packets >= DATAGRAMS as u64 && bytes >= packets * DATAGRAM as u64,
        "UDP: {udp_stats:?}"
    );
    Ok(())
}

#[test]
fn ipv4_jumbo_frames_cross_the_balancer_natively() {
    run(false).unwrap();
}

#[test]
fn ipv6_jumbo_frames_cross_the_balancer_natively() {
    run(true).unwrap();
}
