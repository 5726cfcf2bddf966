//! TCP throughput through the XDP balancer with BIG TCP on and off, IPv4 and IPv6, in one
//! run (root; iperf3 from `scripts/bootstrap.sh`):
//!
//! ```text
//! cargo run --release -p portico-integration --example big_tcp_bench [-- --seconds 5]
//! ```
//!
//! ```text
//!  client ──veth── lb(eth0)   lb(eth1) ──veth── sw (bridge) ──veth── be1
//! ```
//! The lab's topology (`portico_lab::lab`), Portico's XDP program attached natively on the
//! LB node, one TCP service whose only backend is be1 (iperf3's control and data
//! connections must reach the same server). Per family, two phases on fresh namespaces:
//! `baseline` (GSO/GRO sizes as the kernel sets them, 64 KiB) and `big_tcp` (every link of
//! every namespace raised to 196,608 bytes for IPv4 and IPv6 by Portico's own setter,
//! `portico::bigtcp::enable_all`, as `--big-tcp IFACE` does). One iperf3 run of `--seconds` per phase, bounded by `timeout`.
//! Checksum errors: `nstat` `TcpInCsumErrors` and `UdpInCsumErrors` in every namespace,
//! before and after; any change fails the benchmark.
//!
//! One JSON line per family: `{"family":"ipv4","big_tcp_gbps":..,"baseline_gbps":..}`;
//! the last line a JSON summary.
//!
//! What to expect on veth: attaching XDP natively to a veth turns GSO off on its peer
//! (`veth_xdp_set`), and XDP runs before GRO, so the frames the balancer forwards are at most
//! an MTU long either way; BIG TCP changes only what the endpoints' stacks do around it.

use std::{
    collections::BTreeMap,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{bail, ensure, Context, Result};
use portico_integration::{
    lab::{self, Family, Topology},
    NetNs,
};
use portico_xdp::{AttachMode, Balancer, Protocol};

/// GSO/GRO size for the BIG TCP phase (the agent's `--big-tcp-size` default).
const BIG: u32 = 196_608;

struct Args {
    seconds: u32,
}

fn args() -> Result<Args> {
    let mut a = Args { seconds: 5 };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--seconds" => {
                a.seconds = it.next().context("--seconds N")?.parse()?;
                ensure!((1..=30).contains(&a.seconds), "--seconds: 1 to 30");
            }
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

/// The links of `ns` but the loopback.
fn links(ns: &NetNs) -> Result<Vec<String>> {
    Ok(ns
        .run(&["ip", "-o", "link", "show"])?
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n != "lo")
        .collect())
}

/// `TcpInCsumErrors` and `UdpInCsumErrors` of `ns` (absolute, history untouched), plus
/// the IPv6 UDP one.
fn csum_errors(ns: &NetNs) -> Result<BTreeMap<String, u64>> {
    let out = ns.run(&[
        "nstat",
        "-a",
        "-z",
        "-s",
        "TcpInCsumErrors",
        "UdpInCsumErrors",
        "Udp6InCsumErrors",
    ])?;
    let mut m = BTreeMap::new();
    for l in out.lines() {
        let mut w = l.split_whitespace();
        if let (Some(name), Some(v)) = (w.next(), w.next()) {
            if let Ok(v) = v.parse() {
                m.insert(format!("{}:{name}", ns.name()), v);
            }
        }
    }
    Ok(m)
}

/// Raises the GSO/GRO sizes (IPv4 and IPv6) of every link of every namespace with
/// Portico's own setter, as `--big-tcp IFACE` does on a node (iproute2 6.1 knows no
/// `gso_ipv4_max_size`).
fn big_tcp(t: &Topology) -> Result<()> {
    for ns in [&t.client, &t.lb, &t.sw].into_iter().chain(&t.backends) {
        let ns = ns.clone();
        let ns_links = links(&ns)?;
        std::thread::spawn(move || -> Result<()> {
            let _in = ns.enter()?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(portico::bigtcp::enable_all(&ns_links, BIG))?;
            Ok(())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the BIG TCP setter panicked"))??;
    }
    Ok(())
}

/// An iperf3 server in `ns` on `addr`:`port` for one test, bounded.
fn iperf_server(ns: &NetNs, addr: &str, port: u16, seconds: u32) -> Result<Child> {
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns.name(),
            "timeout",
            &(seconds + 20).to_string(),
        ])
        .args(["iperf3", "-s", "-1", "-B", addr, "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting iperf3 -s (scripts/bootstrap.sh installs iperf3)")
}

/// One phase on a fresh topology: the received rate in Gbit/s.
fn phase(f: Family, big: bool, seconds: u32) -> Result<f64> {
    let t = lab::topology(f)?;
    if big {
        big_tcp(&t)?;
    }
    let mut data_path = t.start_data_path(AttachMode::Native)?;
    // One backend: iperf3's control and data connections must meet the same server.
    data_path
        .balancer
        .upsert_service(&lab::service(f, Protocol::Tcp, &[Some(1), None, None]))?;
    let all: Vec<&NetNs> = [&t.client, &t.lb, &t.sw]
        .into_iter()
        .chain(&t.backends)
        .collect();
    let before = all
        .iter()
        .map(|ns| csum_errors(ns))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        before.iter().all(|m| m.len() == 3),
        "nstat did not report the three checksum counters: {before:?}"
    );
    let mut server = iperf_server(
        &t.backends[0],
        &f.backend(1).to_string(),
        lab::BACKEND_PORT,
        seconds,
    )?;
    // The server listening before the client connects (bounded wait).
    std::thread::sleep(Duration::from_millis(500));
    let out = t.client.run(&[
        "timeout",
        &(seconds + 15).to_string(),
        "iperf3",
        "-c",
        &f.vip().to_string(),
        "-p",
        &lab::VIP_PORT.to_string(),
        "-t",
        &seconds.to_string(),
        "--connect-timeout",
        "3000",
        "-J",
    ]);
    let _ = server.kill();
    let _ = server.wait();
    let out = out.context("iperf3 -c through the VIP")?;
    let json: serde_json::Value = serde_json::from_str(&out).context("iperf3 -J output")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| format!("no received rate in iperf3's output: {}", json["error"]))?;
    let after = all
        .iter()
        .map(|ns| csum_errors(ns))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        before == after,
        "checksum errors counted during the run: before {before:?}, after {after:?}"
    );
    Ok(bps / 1e9)
}

fn main() -> Result<()> {
    let a = args()?;
    portico_integration::require_root("big_tcp_bench (namespaces, XDP)")?;
    let mut summary = serde_json::Map::new();
    for v6 in [false, true] {
        let f = Family { v6 };
        let family = if v6 { "ipv6" } else { "ipv4" };
        let baseline = phase(f, false, a.seconds)?;
        let big = phase(f, true, a.seconds)?;
        println!(
            "{}",
            serde_json::json!({
                "family": family,
                "big_tcp_gbps": (big * 100.0).round() / 100.0,
                "baseline_gbps": (baseline * 100.0).round() / 100.0,
            })
        );
        summary.insert(
            format!("{family}_big_tcp_gbps"),
            (big * 100.0).round().into(),
        );
        summary.insert(
            format!("{family}_baseline_gbps"),
            (baseline * 100.0).round().into(),
        );
    }
    // Gbit/s with two decimals.
    for v in summary.values_mut() {
        *v = (v.as_f64().unwrap_or(0.0) / 100.0).into();
    }
    summary.insert("csum_errors".into(), 0.into());
    summary.insert("seconds".into(), a.seconds.into());
    println!("{}", serde_json::Value::Object(summary));
    Ok(())
}
