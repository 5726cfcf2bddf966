//! What `portico status` shows: the report the running process serves on its admin socket,
//! and its rendering as tables.

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::apply::ApplierHealth;

/// One pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolRow {
    /// Name.
    pub name: String,
    /// `Ready`, `Conflict with …` or `InvalidSpec`.
    pub state: String,
    /// IPv4 addresses in use.
    pub v4_used: String,
    /// IPv4 addresses usable.
    pub v4_total: String,
    /// IPv6 addresses in use.
    pub v6_used: String,
    /// IPv6 addresses usable.
    pub v6_total: String,
}

/// One Portico Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRow {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// The pool of each address.
    pub pools: Vec<String>,
    /// Ready backends (this node's, for `Local`).
    pub backends_ready: usize,
    /// Backends carrying or draining flows.
    pub backends_total: usize,
    /// Announced from this node.
    pub announced: bool,
    /// `externalTrafficPolicy: Local`.
    pub local: bool,
    /// Why it lacks an address.
    pub unsatisfied: Option<String>,
    /// What else IPAM says (grace period, pending request, not shared).
    #[serde(default)]
    pub notices: Vec<String>,
    /// Packets the datapath balanced for it.
    pub packets: u64,
    /// New flows the datapath balanced for it.
    pub new_flows: u64,
    /// Packets the datapath dropped for it (no backend, no SNAT port, no route).
    #[serde(default)]
    pub drops: u64,
    /// Per backend.
    #[serde(default)]
    pub backends: Vec<BackendRow>,
}

/// One backend of a Service, summed over the Service's listeners.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRow {
    /// Address.
    pub address: IpAddr,
    /// Port.
    pub port: u16,
    /// Packets toward it.
    pub packets: u64,
    /// New flows balanced to it.
    pub new_flows: u64,
}

/// One BGP peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRow {
    /// The BGPPeer's name.
    pub name: String,
    /// The peer's address.
    pub address: IpAddr,
    /// FSM state.
    pub state: String,
    /// Seconds since Established.
    pub uptime_secs: Option<u64>,
    /// Prefixes advertised (IPv4, IPv6).
    pub prefixes_sent: [usize; 2],
    /// Last transport failure or NOTIFICATION.
    pub last_error: Option<String>,
}

/// Everything `portico status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The node.
    pub node: String,
    /// Pools.
    pub pools: Vec<PoolRow>,
    /// Services.
    pub services: Vec<ServiceRow>,
    /// BGP peers.
    pub peers: Vec<PeerRow>,
    /// Global datapath counters by name (empty without XDP).
    pub datapath: Vec<(String, u64)>,
    /// Tracked flows by conntrack table (`established`, `unconfirmed`; empty without XDP).
    #[serde(default)]
    pub conntrack: Vec<(String, u64)>,
    /// Interfaces with BIG TCP, as the kernel reports them (`--big-tcp`).
    #[serde(default)]
    pub big_tcp: Vec<crate::bigtcp::LinkSizes>,
    /// Appliers' health.
    pub appliers: Vec<ApplierHealthRow>,
    /// Problems with files and objects.
    pub problems: Vec<String>,
    /// Reconcile passes so far.
    pub passes: u64,
    /// Duration of the last pass, in microseconds.
    pub last_pass_us: u64,
}

/// An applier's health, as reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplierHealthRow {
    /// The applier.
    pub name: String,
    /// Last pass fully applied.
    pub ok: bool,
    /// Last failure.
    pub last_error: Option<String>,
    /// Failed passes.
    pub failures: u64,
}

impl From<&ApplierHealth> for ApplierHealthRow {
    fn from(h: &ApplierHealth) -> Self {
        ApplierHealthRow {
            name: h.name.to_owned(),
            ok: h.ok,
            last_error: h.last_error.clone(),
            failures: h.failures,
        }
    }
}

/// Asks the process behind `socket` for its report.
///
/// # Errors
/// The socket cannot be reached or the answer is not a report.
pub fn query(socket: &Path) -> anyhow::Result<StatusReport> {
    use anyhow::Context as _;
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to {} (is `portico standalone` running with this --admin-socket?)",
            socket.display()
        )
    })?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).context("reading the status answer")
}

/// The balancer's tracked flows by table, for the report; empty (and logged) when the
/// tables cannot be read, so a status request never fails on them.
pub fn tracked_flows(balancer: &(dyn portico_xdp::Balancer + Send)) -> Vec<(String, u64)> {
    match balancer.tracked_flows() {
        Ok(t) => t.into_iter().map(|(n, v)| (n.to_owned(), v)).collect(),
        Err(e) => {
            tracing::debug!("counting tracked flows: {e}");
            Vec::new()
        }
    }
}

/// A Service's datapath counters, summed over its XDP listeners: packets, new flows and
/// drops, and per backend (address, port) packets and new flows. A listener whose counters
/// cannot be read counts nothing (a status request never fails on them).
pub fn service_counters(
    balancer: &(dyn portico_xdp::Balancer + Send),
    listeners: &[portico_xdp::ServiceKey],
) -> ServiceCounters {
    let mut c = ServiceCounters::default();
    let mut backends: std::collections::BTreeMap<(IpAddr, u16), (u64, u64)> =
        std::collections::BTreeMap::new();
    for key in listeners {
        if let Ok(Some(s)) = balancer.service_stats(key) {
            c.packets += s.service.packets;
            c.new_flows += s.service.new_flows;
            c.drops += s.drops;
            for (b, n) in s.backends {
                let e = backends.entry(b).or_default();
                e.0 += n.packets;
                e.1 += n.new_flows;
            }
        }
    }
    c.backends = backends
        .into_iter()
        .map(|((address, port), (packets, new_flows))| BackendRow {
            address,
            port,
            packets,
            new_flows,
        })
        .collect();
    c
}

/// What [`service_counters`] sums.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    /// Packets, client → VIP.
    pub packets: u64,
    /// New flows.
    pub new_flows: u64,
    /// Packets dropped (no backend, no port, no route).
    pub drops: u64,
    /// Per backend.
    pub backends: Vec<BackendRow>,
}

fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>());
    for r in rows {
        line(r);
    }
}

fn uptime(secs: Option<u64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 60 => format!("{s}s"),
        Some(s) if s < 3600 => format!("{}m{}s", s / 60, s % 60),
        Some(s) => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

impl StatusReport {
    /// Human tables, like `cilium bgp peers`.
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Node: {}\n", self.node);
        let pools: Vec<Vec<String>> = self
            .pools
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.state.clone(),
                    format!("{}/{}", p.v4_used, p.v4_total),
                    format!("{}/{}", p.v6_used, p.v6_total),
                ]
            })
            .collect();
        table(
            &mut out,
            &["POOL", "STATE", "IPV4 USED", "IPV6 USED"],
            &pools,
        );
        out.push('\n');
        let services: Vec<Vec<String>> = self
            .services
            .iter()
            .map(|s| {
                let addrs = if s.addresses.is_empty() {
                    s.unsatisfied.clone().unwrap_or_else(|| "<pending>".into())
                } else {
                    s.addresses
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(",")
                };
                vec![
                    format!("{}/{}", s.namespace, s.name),
                    addrs,
                    s.pools.join(","),
                    format!("{}/{}", s.backends_ready, s.backends_total),
                    if s.announced { "yes" } else { "no" }.into(),
                    s.packets.to_string(),
                    s.drops.to_string(),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "SERVICE",
                "ADDRESSES",
                "POOL",
                "BACKENDS",
                "ANNOUNCED",
                "PACKETS",
                "DROPS",
            ],
            &services,
        );
        out.push('\n');
        let peers: Vec<Vec<String>> = self
            .peers
            .iter()
            .map(|p| {
                vec![
                    p.name.clone(),
                    p.address.to_string(),
                    p.state.clone(),
                    uptime(p.uptime_secs),
                    format!("{}/{}", p.prefixes_sent[0], p.prefixes_sent[1]),
                    p.last_error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &mut out,
            &[
                "PEER",
                "ADDRESS",
                "STATE",
                "UPTIME",
                "SENT V4/V6",
                "LAST ERROR",
            ],
            &peers,
        );
        if !self.datapath.is_empty() {
            out.push('\n');
            let rows: Vec<Vec<String>> = self
                .datapath
                .iter()
                .filter(|(_, v)| *v > 0)
                .map(|(n, v)| vec![n.clone(), v.to_string()])
                .collect();
            table(&mut out, &["DATAPATH COUNTER", "VALUE"], &rows);
        }
        if !self.conntrack.is_empty() {
            out.push('\n');
            let rows: Vec<Vec<String>> = self
                .conntrack
                .iter()
                .map(|(n, v)| vec![n.clone(), v.to_string()])
                .collect();
            table(&mut out, &["TRACKED FLOWS", "ENTRIES"], &rows);
        }
        if !self.big_tcp.is_empty() {
            out.push('\n');
            let rows: Vec<Vec<String>> = self
                .big_tcp
                .iter()
                .map(|b| {
                    vec![
                        b.interface.clone(),
                        format!("{}/{}", b.gso_max_size, b.gro_max_size),
                        format!("{}/{}", b.gso_ipv4_max_size, b.gro_ipv4_max_size),
                        b.tso_max_size.to_string(),
                    ]
                })
                .collect();
            table(
                &mut out,
                &["BIG TCP", "IPV6 GSO/GRO", "IPV4 GSO/GRO", "DRIVER MAX"],
                &rows,
            );
        }
        out.push('\n');
        let appliers: Vec<Vec<String>> = self
            .appliers
            .iter()
            .map(|a| {
                vec![
                    a.name.clone(),
                    if a.ok { "ok" } else { "failing" }.into(),
                    a.failures.to_string(),
                    a.last_error.clone().unwrap_or_default(),
                ]
            })
            .collect();
        table(
            &mut out,
            &["APPLIER", "STATE", "FAILURES", "LAST ERROR"],
            &appliers,
        );
        if !self.problems.is_empty() {
            let _ = writeln!(out, "\nProblems:");
            for p in &self.problems {
                let _ = writeln!(out, "  {p}");
            }
        }
        out
    }
}
