//! Real traffic to a service that keeps the client's source (`externalTrafficPolicy: Local`,
//! `ServiceSpec::preserve_source`): the lab topology of `xdp_traffic`, with each backend's
//! default route through the LB node, as a Local backend has it.
//!
//! ```text
//!  client ──veth── lb(eth0)   lb(eth1) ──veth── sw (bridge) ──veth── be1, be2, be3
//!                                 ▲ default route of every backend
//! ```
//! Checks: before, a SNATed service's backends see the node's SNAT address; once the
//! service keeps sources, TCP connections and UDP exchanges through the VIP succeed, every
//! backend sees the client's own address and port, UDP answers come from the VIP, and no
//! packet is dropped; long-lived connections keep working through the flow cache.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{bail, Context as _, Result};
use portico_integration::{
    lab::{self, Family},
    traffic::{self, Answer, LongLived, IO_TIMEOUT, WHO_REQUEST},
};
use portico_xdp::{AttachMode, Balancer, Protocol};
use portico_xdp_common::stat;

/// Connections (and UDP exchanges) per check.
const EXCHANGES: usize = 60;

/// One TCP exchange of [`WHO_REQUEST`]: the client's own address and port, and the answer.
fn tcp_seen(vip: SocketAddr) -> Result<(SocketAddr, Answer)> {
    let mut s = TcpStream::connect_timeout(&vip, IO_TIMEOUT)
        .with_context(|| format!("connecting to {vip}"))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let local = s.local_addr()?;
    s.write_all(format!("{WHO_REQUEST}\n").as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let _ = s.shutdown(Shutdown::Both);
    Ok((local, Answer::parse(&line)?))
}

/// One UDP exchange of [`WHO_REQUEST`] from a fresh socket: the client's own address and
/// port, and the answer, which must come from the VIP (a bounded number of tries).
fn udp_seen(vip: SocketAddr) -> Result<(SocketAddr, Answer)> {
    let any: SocketAddr = match vip.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let s = UdpSocket::bind(any)?;
    s.set_read_timeout(Some(Duration::from_millis(500)))?;
    let mut buf = [0u8; 256];
    for _ in 0..5 {
        s.send_to(WHO_REQUEST.as_bytes(), vip)?;
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            if from != vip {
                bail!("the answer came from {from}, not from the VIP {vip}");
            }
            // The source address the routes chose, as the backend must see it.
            let local = SocketAddr::new(client_addr(vip), s.local_addr()?.port());
            return Ok((local, Answer::parse(&String::from_utf8_lossy(&buf[..n]))?));
        }
    }
    bail!("no UDP answer from {vip} after 5 tries")
}

/// The client's address in the family of `vip`.
fn client_addr(vip: SocketAddr) -> IpAddr {
    Family { v6: vip.is_ipv6() }
        .client()
        .parse()
        .expect("lab client address")
}

fn run(mode: AttachMode, v6: bool) {
    let f = Family { v6 };
    let t = lab::topology(f).unwrap();
    // A Local backend routes its replies through its node.
    for be in &t.backends {
        be.run(&["ip", f.ip(), "route", "add", "default", "via", f.snat()])
            .unwrap();
    }
    let _servers = t.start_backends().unwrap();
    let mut data_path = t.start_data_path(mode).unwrap();
    let balancer = &mut data_path.balancer;
    let vip = SocketAddr::new(f.vip(), lab::VIP_PORT);
    let what = format!("{mode:?} v6={v6}");

    // As installed: SNATed, the backend sees the node.
    let (_, answer) = traffic::in_ns(&t.client, move || tcp_seen(vip)).unwrap();
    assert_eq!(answer.seen_from.ip().to_string(), f.snat(), "{what}: SNAT");

    let all = vec![Some(1); usize::from(lab::BACKENDS)];
    let mut keys = Vec::new();
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let mut spec = lab::service(f, proto, &all);
        spec.preserve_source = true;
        balancer.upsert_service(&spec).unwrap();
        keys.push(spec.key);
    }
    let drops_before = balancer.program().stat(stat::DROP_NO_SNAT_PORT).unwrap();
    for (proto, exchange) in [
        (
            "TCP",
            tcp_seen as fn(SocketAddr) -> Result<(SocketAddr, Answer)>,
        ),
        ("UDP", udp_seen),
    ] {
        let seen = traffic::in_ns(&t.client, move || {
            (0..EXCHANGES)
                .map(|_| exchange(vip))
                .collect::<Result<Vec<_>>>()
        })
        .unwrap_or_else(|e| panic!("{what} {proto}: {e:#}"));
        let mut backends: Vec<&str> = Vec::new();
        for (local, answer) in &seen {
            assert_eq!(
                answer.seen_from, *local,
                "{what} {proto}: {} saw another source than the client's",
                answer.backend
            );
            if !backends.contains(&answer.backend.as_str()) {
                backends.push(&answer.backend);
            }
        }
        assert_eq!(
            backends.len(),
            usize::from(lab::BACKENDS),
            "{what} {proto}: every backend takes flows: {backends:?}"
        );
    }

    // Long-lived connections: after their first exchanges they are cached; they keep
    // working and keep their backend.
    let mut long: Vec<LongLived> = traffic::in_ns(&t.client, move || {
        (0..6).map(|_| LongLived::open(vip)).collect()
    })
    .unwrap();
    for round in 0..4 {
        for c in &mut long {
            let answer = c
                .who()
                .unwrap_or_else(|e| panic!("{what}: round {round}: {e:#}"));
            assert_eq!(answer.backend, c.backend, "{what}: a connection moved");
            assert_eq!(answer.seen_from.ip(), f.client().parse::<IpAddr>().unwrap());
        }
    }

    let p = balancer.program();
    assert_eq!(p.stat(stat::DROP_NO_SNAT_PORT).unwrap(), drops_before);
    assert!(p.stat(stat::REPLY_NAT).unwrap() > 0, "{what}: replies");
    for key in &keys {
        let stats = balancer.service_stats(key).unwrap().unwrap();
        assert_eq!(stats.drops, 0, "{what}: {key} dropped packets");
        assert!(stats.service.packets > 0, "{what}: {key}: {stats:?}");
    }
}

#[test]
fn native_ipv4_backends_see_the_client_address() {
    run(AttachMode::Native, false);
}

#[test]
fn native_ipv6_backends_see_the_client_address() {
    run(AttachMode::Native, true);
}

#[test]
fn generic_ipv4_backends_see_the_client_address() {
    run(AttachMode::Generic, false);
}

#[test]
fn generic_ipv6_backends_see_the_client_address() {
    run(AttachMode::Generic, true);
}
