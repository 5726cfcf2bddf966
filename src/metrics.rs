//! Prometheus metrics (OpenMetrics text through `prometheus-client`), and the small HTTP
//! listener that serves them with `/healthz` and `/readyz`.
//!
//! Most values are read at scrape time from the same [`StatusReport`] that `portico status`
//! shows, so the two never disagree; reconcile durations and errors accumulate in
//! [`ReconcileMetrics`].

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};

use crate::status::StatusReport;

type Labels = Vec<(String, String)>;

/// What accumulates between scrapes.
#[derive(Debug, Clone)]
pub struct ReconcileMetrics {
    /// Duration of each reconcile pass.
    pub duration: Histogram,
    /// Passes in which some applier failed, by applier.
    pub errors: Family<Labels, Counter>,
}

impl Default for ReconcileMetrics {
    fn default() -> Self {
        ReconcileMetrics {
            duration: Histogram::new(exponential_buckets(0.0001, 4.0, 10)),
            errors: Family::default(),
        }
    }
}

impl ReconcileMetrics {
    /// Records one pass.
    pub fn observe(&self, took: Duration, failed_appliers: &[&str]) {
        self.duration.observe(took.as_secs_f64());
        for a in failed_appliers {
            self.errors
                .get_or_create(&vec![("applier".to_owned(), (*a).to_owned())])
                .inc();
        }
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn gauge_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Gauge> {
    let f = Family::<Labels, Gauge>::default();
    registry.register(name, help, f.clone());
    f
}

fn counter_family(registry: &mut Registry, name: &str, help: &str) -> Family<Labels, Counter> {
    let f = Family::<Labels, Counter>::default();
    registry.register(name, help, f.clone());
    f
}

fn set(f: &Family<Labels, Gauge>, l: &[(&str, &str)], v: impl TryInto<i64>) {
    f.get_or_create(&labels(l))
        .set(v.try_into().unwrap_or(i64::MAX));
}

fn parse_count(s: &str) -> i64 {
    s.parse::<u128>()
        .map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// The exposition for `report`.
#[must_use]
pub fn render(report: &StatusReport, reconcile: &ReconcileMetrics) -> String {
    let mut r = Registry::default();
    let total = gauge_family(
        &mut r,
        "portico_ipam_addresses",
        "Usable addresses per pool and family",
    );
    let used = gauge_family(
        &mut r,
        "portico_ipam_addresses_used",
        "Allocated addresses per pool and family",
    );
    let pool_ready = gauge_family(
        &mut r,
        "portico_ipam_pool_ready",
        "1 when the pool is in use",
    );
    for p in &report.pools {
        for (family, t, u) in [
            ("ipv4", &p.v4_total, &p.v4_used),
            ("ipv6", &p.v6_total, &p.v6_used),
        ] {
            set(
                &total,
                &[("pool", &p.name), ("family", family)],
                parse_count(t),
            );
            set(
                &used,
                &[("pool", &p.name), ("family", family)],
                parse_count(u),
            );
        }
        set(
            &pool_ready,
            &[("pool", &p.name)],
            i64::from(p.state == "Ready"),
        );
    }
    let services = gauge_family(
        &mut r,
        "portico_ipam_services",
        "Portico Services by state (allocated or unsatisfied)",
    );
    let allocated = report
        .services
        .iter()
        .filter(|s| !s.addresses.is_empty())
        .count();
    set(&services, &[("state", "allocated")], allocated);
    set(
        &services,
        &[("state", "unsatisfied")],
        report.services.len() - allocated,
    );

    let established = gauge_family(
        &mut r,
        "portico_bgp_session_established",
        "1 when the session with the peer is Established",
    );
    let uptime = gauge_family(
        &mut r,
        "portico_bgp_session_uptime_seconds",
        "Time since the session reached Established",
    );
    let prefixes = gauge_family(
        &mut r,
        "portico_bgp_prefixes_advertised",
        "Prefixes advertised to the peer",
    );
    for p in &report.peers {
        let addr = p.address.to_string();
        let l = [("peer", p.name.as_str()), ("address", addr.as_str())];
        set(&established, &l, i64::from(p.state == "Established"));
        set(&uptime, &l, p.uptime_secs.unwrap_or(0));
        for (i, family) in ["ipv4", "ipv6"].iter().enumerate() {
            set(
                &prefixes,
                &[("peer", &p.name), ("address", &addr), ("family", family)],
                p.prefixes_sent[i],
            );
        }
    }

    let packets = counter_family(
        &mut r,
        "portico_xdp_service_packets",
        "Packets the XDP balancer handled for a Service",
    );
    let flows = counter_family(
        &mut r,
        "portico_xdp_service_new_flows",
        "New flows the XDP balancer balanced for a Service",
    );
    let drops = counter_family(
        &mut r,
        "portico_xdp_service_drops",
        "Packets the XDP balancer dropped for a Service: no backend, no SNAT port, no route",
    );
    let backends = gauge_family(
        &mut r,
        "portico_xdp_service_backends",
        "Backends of a Service on this node, by state (ready or total)",
    );
    for s in &report.services {
        let l = [
            ("namespace", s.namespace.as_str()),
            ("service", s.name.as_str()),
        ];
        packets.get_or_create(&labels(&l)).inc_by(s.packets);
        flows.get_or_create(&labels(&l)).inc_by(s.new_flows);
        drops.get_or_create(&labels(&l)).inc_by(s.drops);
        let mut ready = l.to_vec();
        ready.push(("state", "ready"));
        set(&backends, &ready, s.backends_ready);
        let mut all = l.to_vec();
        all.push(("state", "total"));
        set(&backends, &all, s.backends_total);
    }
    let backend_packets = counter_family(
        &mut r,
        "portico_xdp_backend_packets",
        "Packets the XDP balancer sent to a backend",
    );
    let backend_flows = counter_family(
        &mut r,
        "portico_xdp_backend_new_flows",
        "New flows the XDP balancer balanced to a backend",
    );
    for s in &report.services {
        for b in &s.backends {
            let backend = format!("{}", std::net::SocketAddr::new(b.address, b.port));
            let l = labels(&[
                ("namespace", &s.namespace),
                ("service", &s.name),
                ("backend", &backend),
            ]);
            backend_packets.get_or_create(&l).inc_by(b.packets);
            backend_flows.get_or_create(&l).inc_by(b.new_flows);
        }
    }
    let datapath = counter_family(
        &mut r,
        "portico_xdp_datapath",
        "Global XDP counters: packets, bytes, verdicts, and drops and passes by reason",
    );
    for (name, v) in &report.datapath {
        datapath
            .get_or_create(&labels(&[("counter", name)]))
            .inc_by(*v);
    }

    let tracked = gauge_family(
        &mut r,
        "portico_xdp_conntrack_entries",
        "Flows the XDP balancer tracks, by table (established, unconfirmed), and each table's capacity",
    );
    for (table, v) in &report.conntrack {
        set(&tracked, &[("table", table)], *v);
    }

    let appliers = gauge_family(
        &mut r,
        "portico_applier_ok",
        "1 when the applier's last pass applied everything",
    );
    for a in &report.appliers {
        set(&appliers, &[("applier", &a.name)], i64::from(a.ok));
    }
    let problems = gauge_family(
        &mut r,
        "portico_config_problems",
        "Files and objects reported as invalid",
    );
    set(&problems, &[], report.problems.len());
    r.register(
        "portico_reconcile_duration_seconds",
        "Duration of reconcile passes",
        reconcile.duration.clone(),
    );
    r.register(
        "portico_reconcile_errors",
        "Reconcile passes in which an applier failed",
        reconcile.errors.clone(),
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &r);
    out
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics exposition: counters are
/// declared under their `_total` name and the `# EOF` marker goes. Served to scrapers and
/// tools (`promtool check metrics`) that do not ask for OpenMetrics.
#[must_use]
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// A request the listener forwards to the runtime: a report and the reconcile metrics.
pub type MetricsRequest = oneshot::Sender<(StatusReport, ReconcileMetrics, bool)>;

/// Serves `/metrics`, `/healthz` (the runtime answers) and `/readyz` (the first pass is
/// done and every applier is healthy) on `listener`.
pub fn serve(listener: TcpListener, tx: mpsc::Sender<MetricsRequest>) {
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let n = match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let request = String::from_utf8_lossy(&buf[..n]);
                let path = request
                    .lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .unwrap_or("/");
                let openmetrics = request.lines().any(|l| {
                    l.to_ascii_lowercase().starts_with("accept:")
                        && l.contains("application/openmetrics-text")
                });
                let (reply_tx, reply_rx) = oneshot::channel();
                let answer = if tx.send(reply_tx).await.is_ok() {
                    tokio::time::timeout(Duration::from_secs(10), reply_rx)
                        .await
                        .ok()
                        .and_then(Result::ok)
                } else {
                    None
                };
                let (status, content_type, body) = match (path, answer) {
                    (_, None) => (
                        "503 Service Unavailable",
                        "text/plain",
                        "runtime not answering\n".to_owned(),
                    ),
                    ("/metrics", Some((report, reconcile, _))) if openmetrics => (
                        "200 OK",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        render(&report, &reconcile),
                    ),
                    ("/metrics", Some((report, reconcile, _))) => (
                        "200 OK",
                        "text/plain; version=0.0.4; charset=utf-8",
                        to_prometheus_text(&render(&report, &reconcile)),
                    ),
                    ("/healthz", Some(_)) => ("200 OK", "text/plain", "ok\n".to_owned()),
                    ("/readyz", Some((_, _, true))) => {
                        ("200 OK", "text/plain", "ready\n".to_owned())
                    }
                    ("/readyz", Some((report, _, false))) => (
                        "503 Service Unavailable",
                        "text/plain",
                        format!(
                            "not ready: {}\n",
                            report
                                .appliers
                                .iter()
                                .filter(|a| !a.ok)
                                .map(|a| format!(
                                    "{}: {}",
                                    a.name,
                                    a.last_error.clone().unwrap_or_default()
                                ))
                                .collect::<Vec<_>>()
                                .join("; ")
                        ),
                    ),
                    _ => (
                        "404 Not Found",
                        "text/plain",
                        "try /metrics, /healthz or /readyz\n".to_owned(),
                    ),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes()).await;
                let _ = stream.write_all(body.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
}
