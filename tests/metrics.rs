//! The metrics exposition passes `promtool check metrics` (Debian's prometheus package,
//! installed by scripts/bootstrap.sh); the test fails, never skips, without it.

use std::time::Duration;

mod common;

use common::promtool_check;
use portico::apply::ApplierHealth;
use portico::metrics::{render, to_prometheus_text, ReconcileMetrics};
use portico::status::{ApplierHealthRow, PeerRow, PoolRow, ServiceRow, StatusReport};

fn report() -> StatusReport {
    StatusReport {
        node: "n1".into(),
        pools: vec![PoolRow {
            name: "public".into(),
            state: "Ready".into(),
            v4_used: "1".into(),
            v4_total: "256".into(),
            v6_used: "0".into(),
            v6_total: "18446744073709551616".into(),
        }],
        services: vec![ServiceRow {
            namespace: "shop".into(),
            name: "web".into(),
            addresses: vec!["198.51.100.1".parse().unwrap()],
            pools: vec!["public".into()],
            backends_ready: 2,
            backends_total: 3,
            announced: true,
            local: false,
            unsatisfied: None,
            notices: Vec::new(),
            packets: 1000,
            new_flows: 10,
            drops: 7,
            backends: vec![portico::status::BackendRow {
                address: "10.0.0.1".parse().unwrap(),
                port: 8080,
                packets: 600,
                new_flows: 6,
            }],
        }],
        peers: vec![PeerRow {
            name: "tor".into(),
            address: "192.0.2.1".parse().unwrap(),
            state: "Established".into(),
            uptime_secs: Some(42),
            prefixes_sent: [1, 0],
            last_error: None,
        }],
        datapath: vec![("packets".into(), 1000), ("drop_no_backend".into(), 3)],
        conntrack: vec![("established".into(), 42), ("unconfirmed".into(), 5)],
        big_tcp: Vec::new(),
        appliers: vec![ApplierHealthRow::from(&ApplierHealth::default())],
        problems: vec!["x.yaml: bad".into()],
        passes: 3,
        last_pass_us: 120,
    }
}

#[test]
fn the_exposition_passes_promtool_and_names_every_family() {
    let reconcile = ReconcileMetrics::default();
    reconcile.observe(Duration::from_micros(300), &["bgp"]);
    let text = render(&report(), &reconcile);
    assert!(text.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    promtool_check(&to_prometheus_text(&text));
    for family in [
        "portico_ipam_addresses",
        "portico_ipam_addresses_used",
        "portico_bgp_session_established",
        "portico_bgp_prefixes_advertised",
        "portico_xdp_service_packets_total",
        "portico_xdp_service_drops_total",
        "portico_xdp_datapath_total",
        "portico_reconcile_duration_seconds_bucket",
        "portico_reconcile_errors_total",
    ] {
        assert!(
            text.contains(&format!("\n{family}{{")) || text.contains(&format!("\n{family} ")),
            "{family} missing:\n{text}"
        );
    }
    assert!(
        text.contains("portico_xdp_datapath_total{counter=\"drop_no_backend\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("portico_xdp_service_drops_total{namespace=\"shop\",service=\"web\"} 7"),
        "{text}"
    );
    assert!(
        text.contains("portico_xdp_conntrack_entries{table=\"established\"} 42"),
        "{text}"
    );
}

#[test]
fn status_shows_each_service_s_drops() {
    let text = report().render();
    let header = text
        .lines()
        .find(|l| l.starts_with("SERVICE"))
        .expect("services table");
    assert!(header.trim_end().ends_with("DROPS"), "{text}");
    let row = text
        .lines()
        .find(|l| l.starts_with("shop/web"))
        .expect("the service's row");
    assert_eq!(row.split_whitespace().last(), Some("7"), "{text}");
}
