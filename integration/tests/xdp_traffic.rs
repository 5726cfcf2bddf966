//! Real traffic through the XDP balancer: a client, an LB node and three backends in
//! throwaway namespaces, the program attached natively or generically, IPv4 and IPv6.
//!
//! ```text
//!  client ──veth── lb(eth0)   lb(eth1) ──veth── sw (bridge) ──veth── be1, be2, be3
//! ```
//! Checks: 3,000 TCP connections and 3,000 UDP exchanges through the VIP all succeed, each
//! backend's share within ±20 % of equal; removing a backend keeps long-lived connections to
//! the others alive; a backend at weight 0 gets no new flows while its connections continue.

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use portico_integration::{
    lab::{self, Family},
    traffic::{self, LongLived},
};
use portico_xdp::{AttachMode, Balancer, Protocol};

const CONNECTIONS: usize = 3000;

fn assert_even(what: &str, tally: &BTreeMap<String, usize>, total: usize, names: &[&str]) {
    let got: usize = tally.values().sum();
    assert_eq!(
        got, total,
        "{what}: {got} of {total} exchanges answered: {tally:?}"
    );
    let fair = total as f64 / names.len() as f64;
    for n in names {
        let c = *tally.get(*n).unwrap_or(&0) as f64;
        assert!(
            (c - fair).abs() <= 0.2 * fair,
            "{what}: backend {n} served {c}, equal share is {fair:.0} (±20%): {tally:?}"
        );
    }
    for k in tally.keys() {
        assert!(
            names.contains(&k.as_str()),
            "{what}: unexpected backend {k}: {tally:?}"
        );
    }
}

fn run(mode: AttachMode, v6: bool) {
    let f = Family { v6 };
    let t = lab::topology(f).unwrap();
    let _servers = t.start_backends().unwrap();
    // Keep the whole data path alive: it also holds the programs on the veth peers.
    let mut data_path = t.start_data_path(mode).unwrap();
    let balancer = &mut data_path.balancer;
    let vip = SocketAddr::new(f.vip(), lab::VIP_PORT);
    let tcp_key = lab::service(f, Protocol::Tcp, &[]).key;
    let all = ["be1", "be2", "be3"];

    let tcp = traffic::spread(
        &t.client,
        vip,
        CONNECTIONS,
        4,
        Duration::from_secs(120),
        traffic::tcp_once,
    )
    .unwrap();
    assert_even(&format!("{mode:?} v6={v6} TCP"), &tcp, CONNECTIONS, &all);
    // The VIP exists nowhere but in the XDP maps: the balancer carried every connection.
    let stats = balancer.service_stats(&tcp_key).unwrap().unwrap();
    assert!(
        stats.service.new_flows >= CONNECTIONS as u64,
        "{mode:?} v6={v6}: {stats:?}"
    );
    let per_backend: u64 = stats.backends.iter().map(|(_, c)| c.new_flows).sum();
    assert_eq!(per_backend, stats.service.new_flows);
    let udp = traffic::spread(
        &t.client,
        vip,
        CONNECTIONS,
        4,
        Duration::from_secs(120),
        traffic::udp_once,
    )
    .unwrap();
    assert_even(&format!("{mode:?} v6={v6} UDP"), &udp, CONNECTIONS, &all);

    // Long-lived connections, then drain be2 (weight 0): no new flows to it, its old ones live.
    let mut long: Vec<LongLived> = traffic::in_ns(&t.client, move || {
        (0..30).map(|_| LongLived::open(vip)).collect()
    })
    .unwrap();
    assert!(
        long.iter().any(|c| c.backend == "be2"),
        "no long-lived connection landed on be2"
    );
    balancer
        .set_backend_weight(&tcp_key, f.backend(2), lab::BACKEND_PORT, 0)
        .unwrap();
    let drained = traffic::spread(
        &t.client,
        vip,
        300,
        2,
        Duration::from_secs(60),
        traffic::tcp_once,
    )
    .unwrap();
    assert!(
        !drained.contains_key("be2"),
        "{mode:?} v6={v6}: drained be2 still got new flows: {drained:?}"
    );
    assert_eq!(drained.values().sum::<usize>(), 300);
    for c in &mut long {
        let who = c.exchange().unwrap_or_else(|e| {
            panic!(
                "{mode:?} v6={v6}: connection to {} broke during drain: {e}",
                c.backend
            )
        });
        assert_eq!(who, c.backend, "a tracked connection moved");
    }

    // Remove be3: connections to be1 and be2 keep exchanging data.
    balancer
        .upsert_service(&lab::service(f, Protocol::Tcp, &[Some(1), Some(0), None]))
        .unwrap();
    for c in long.iter_mut().filter(|c| c.backend != "be3") {
        for _ in 0..3 {
            let who = c.exchange().unwrap_or_else(|e| {
                panic!(
                    "{mode:?} v6={v6}: connection to {} broke after be3 left: {e}",
                    c.backend
                )
            });
            assert_eq!(who, c.backend);
        }
    }
    let after = traffic::spread(
        &t.client,
        vip,
        200,
        2,
        Duration::from_secs(60),
        traffic::tcp_once,
    )
    .unwrap();
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        vec!["be1"],
        "only be1 takes new flows now: {after:?}"
    );
}

#[test]
fn native_ipv4_traffic_through_the_vip() {
    run(AttachMode::Native, false);
}

#[test]
fn native_ipv6_traffic_through_the_vip() {
    run(AttachMode::Native, true);
}

#[test]
fn generic_ipv4_traffic_through_the_vip() {
    run(AttachMode::Generic, false);
}

#[test]
fn generic_ipv6_traffic_through_the_vip() {
    run(AttachMode::Generic, true);
}

/// A new flow toward a backend whose neighbour entry the node does not have yet: the
/// rewritten packet goes through the stack, which resolves the neighbour and sends it.
/// Lost, the client would retransmit its SYN only after a second.
fn first_packet_to_an_unresolved_backend(v6: bool) {
    let f = Family { v6 };
    let t = lab::topology(f).unwrap();
    let _servers = t.start_backends().unwrap();
    let _data_path = t.start_data_path(AttachMode::Generic).unwrap();
    let vip = SocketAddr::new(f.vip(), lab::VIP_PORT);
    for attempt in 0..6 {
        t.lb.run(&["ip", f.ip(), "neigh", "flush", "dev", "eth1"])
            .unwrap();
        let start = std::time::Instant::now();
        let who = traffic::in_ns(&t.client, move || traffic::tcp_once(vip)).unwrap();
        let took = start.elapsed();
        assert!(
            took < Duration::from_millis(700),
            "v6={v6}, attempt {attempt}: the connection to {who} took {took:?}: the first SYN was lost"
        );
    }
}

#[test]
fn ipv4_first_packet_to_an_unresolved_backend_is_not_lost() {
    first_packet_to_an_unresolved_backend(false);
}

#[test]
fn ipv6_first_packet_to_an_unresolved_backend_is_not_lost() {
    first_packet_to_an_unresolved_backend(true);
}
