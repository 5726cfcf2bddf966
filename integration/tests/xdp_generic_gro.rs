//! Generic XDP and CHECKSUM_PARTIAL: TCP through the VIP from a local sender whose
//! checksums are finished later, on a path where they really are computed and checked
//! (docs/xdp.md, "Checksums in generic mode").
//!
//! ```text
//!  client ──veth── lb(eth0)   lb(eth1) ──veth── sw (bridge) ──veth── be1, be2, be3
//! ```
//! The client's `eth0` keeps transmit checksumming (and so GSO) on: its TCP packets cross
//! the veth CHECKSUM_PARTIAL, the checksum field holding the pseudo-header sum, and its bulk
//! data as GSO packets of up to 64 KiB. (GRO does not feed generic XDP on the interface it
//! is attached to: `netif_elide_gro` skips GRO there. It does on an upper device, a VLAN or
//! a bond, over a lower one that GROs.) The bridge's ports toward the backends and the LB's
//! own interfaces have transmit checksumming off, so the checksums are computed in software
//! (segmentation, `skb_checksum_help`) and the backends verify them; on plain veth a
//! receiver trusts CHECKSUM_PARTIAL and would hide a wrong field.
//!
//! The LB's interfaces are marked for it (`XdpProgram::mark_generic`, an opt-in: see
//! docs/xdp.md for why it is not the default).
//!
//! Checks: uploads and request/answer exchanges arrive whole, no namespace counts a TCP
//! checksum error, and GSO packets bigger than the MTU went to the stack to be segmented
//! (`pass_gso`) rather than being answered as too big. Before the fix every SYN reached the
//! backends with a wrong checksum and no connection opened.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{ensure, Context, Result};
use portico_integration::{
    lab::{self, Family},
    traffic, NetNs,
};
use portico_xdp::AttachMode;
use portico_xdp_common::stat;

/// Bytes each connection sends to a backend's sink.
const VOLUME: usize = 8 << 20;
/// Request lines per connection of [`exchanges`].
const LINES: usize = 50_000;
/// Connections, one after the other.
const CONNECTIONS: usize = 4;
/// A connection that makes no progress for this long has stalled (a liveness guard, not a
/// performance bound: transfers take well under a second when nothing is lost).
const STALL: Duration = Duration::from_secs(30);

/// `InCsumErrors` of the namespace's TCP MIB (IPv4 and IPv6 share it).
fn tcp_csum_errors(ns: &NetNs) -> Result<u64> {
    let snmp = ns.run(&["cat", "/proc/net/snmp"])?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (
        tcp.next().context("no Tcp header")?,
        tcp.next().context("no Tcp values")?,
    );
    let i = names
        .split_whitespace()
        .position(|n| n == "InCsumErrors")
        .context("no InCsumErrors")?;
    Ok(values
        .split_whitespace()
        .nth(i)
        .context("short Tcp line")?
        .parse()?)
}

/// Many exchanges on one connection: [`LINES`] short request lines sent in one burst (the
/// client's GSO packets carry many), each answered with the backend's name (the backend's
/// answers coalesce likewise); the answers counted.
fn exchanges(vip: SocketAddr) -> Result<usize> {
    let mut s = TcpStream::connect_timeout(&vip, traffic::IO_TIMEOUT)
        .with_context(|| format!("connecting to {vip}"))?;
    s.set_write_timeout(Some(STALL))?;
    s.set_read_timeout(Some(STALL))?;
    let request = b"x\n".repeat(LINES);
    let writer = {
        let mut w = s.try_clone()?;
        std::thread::spawn(move || -> Result<()> {
            w.write_all(&request)?;
            w.shutdown(Shutdown::Write)?;
            Ok(())
        })
    };
    let mut answers = Vec::new();
    s.read_to_end(&mut answers).context("reading answers")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    Ok(answers.iter().filter(|&&b| b == b'\n').count())
}

fn run(v6: bool) -> Result<()> {
    let f = Family { v6 };
    let t = lab::topology(f)?;
    // The lab turns it off for native XDP; a local sender's packets come CHECKSUM_PARTIAL,
    // the client's requests and the backends' answers alike (so every packet the balancer
    // sees is one, and none a finished checksum that happens to match its pseudo-header sum:
    // the one-in-65,536 ambiguity docs/xdp.md describes would make the test flaky).
    t.client.run(&["ethtool", "-K", "eth0", "tx", "on"])?;
    for be in &t.backends {
        be.run(&["ethtool", "-K", "eth0", "tx", "on"])?;
    }
    // Checksums computed in software where the aggregates are segmented: the bridge's ports
    // toward the backends, and the LB's own interfaces (the stack's path, and the answers'
    // way to the client). The bridge's port toward the LB keeps the answers partial.
    for port in ["be1", "be2", "be3"] {
        t.sw.run(&["ethtool", "-K", port, "tx", "off"])?;
    }
    t.sw.run(&["ethtool", "-K", "lb", "tx", "on"])?;
    for dev in ["eth0", "eth1"] {
        t.lb.run(&["ethtool", "-K", dev, "tx", "off"])?;
    }
    let _servers = t.start_backends()?;
    let mut data_path = t.start_data_path(AttachMode::Generic)?;
    // The opt-in: the LB's two interfaces may bring CHECKSUM_PARTIAL packets.
    for dev in ["eth0", "eth1"] {
        let link = t.lb.run(&["ip", "-o", "link", "show", dev])?;
        let ifindex: u32 = link
            .split(':')
            .next()
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no ifindex in {link:?}"))?;
        data_path
            .balancer
            .program_mut()
            .mark_generic(ifindex, true)?;
    }
    let vip = SocketAddr::new(f.vip(), lab::VIP_PORT);
    let spaces: Vec<&NetNs> = [&t.client, &t.lb, &t.sw]
        .into_iter()
        .chain(&t.backends)
        .collect();
    let before = spaces
        .iter()
        .map(|ns| tcp_csum_errors(ns))
        .collect::<Result<Vec<_>>>()?;

    let uploads = traffic::in_ns(&t.client, move || {
        (0..CONNECTIONS)
            .map(|_| traffic::tcp_upload(vip, VOLUME, STALL))
            .collect::<Result<Vec<_>>>()
    });
    let exchanged = traffic::in_ns(&t.client, move || {
        (0..CONNECTIONS)
            .map(|_| exchanges(vip))
            .collect::<Result<Vec<_>>>()
    });

    let after = spaces
        .iter()
        .map(|ns| tcp_csum_errors(ns))
        .collect::<Result<Vec<_>>>()?;
    let prog = data_path.balancer.program();
    let counters: Vec<(&str, u64)> = [
        stat::REDIRECT,
        stat::CT_HIT,
        stat::REPLY_NAT,
        stat::ICMP_TOO_BIG,
        stat::DROP_TOO_BIG,
        stat::PASS_NEEDS_FRAG,
        stat::PASS_UNSUPPORTED,
        stat::PASS_GSO,
    ]
    .into_iter()
    .map(|i| Ok((stat::NAMES[i as usize], prog.stat(i)?)))
    .collect::<Result<_>>()?;
    let errors: Vec<(String, u64)> = spaces
        .iter()
        .zip(before.iter().zip(&after))
        .map(|(ns, (b, a))| (ns.name().to_owned(), a - b))
        .collect();
    eprintln!("v6={v6}: uploads {uploads:?}, exchanges {exchanged:?}");
    eprintln!("v6={v6}: TcpInCsumErrors {errors:?}, balancer {counters:?}");
    let uploads = uploads?;
    ensure!(
        uploads.iter().all(|&n| n == VOLUME as u64),
        "uploads: {uploads:?}"
    );
    let exchanged = exchanged?;
    ensure!(
        exchanged.iter().all(|&n| n == LINES),
        "exchanges: {exchanged:?}"
    );
    ensure!(
        errors.iter().all(|(_, n)| *n == 0),
        "TCP checksum errors: {errors:?}; balancer {counters:?}"
    );
    let count = |name| counters.iter().find(|(n, _)| *n == name).map_or(0, |c| c.1);
    ensure!(
        count("pass_gso") > 0 && count("icmp_too_big") == 0 && count("ct_hit") > 0,
        "balancer {counters:?}"
    );
    Ok(())
}

#[test]
fn generic_ipv4_checksum_partial_packets_reach_backends_with_good_checksums() {
    run(false).unwrap();
}

#[test]
fn generic_ipv6_checksum_partial_packets_reach_backends_with_good_checksums() {
    run(true).unwrap();
}
