//! Real traffic through the XDP balancer: a client, an LB node and three backends in
//! throwaway namespaces, the program attached natively or generically, IPv4 and IPv6.
//!
//! ```text
//!  client ──veth── lb(eth0)   lb(eth1) ──veth── sw (bridge) ──veth── be1, be2, be3
//! ```
//! Checks: 3,000 TCP connections and 3,000 UDP exchanges through the VIP all succeed, each
//! backend's share within ±20 % of equal; removing a backend keeps long-lived connections to
//! the others alive; a backend at weight 0 gets no new flows while its connections continue.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use portico_integration::{
    traffic::{self, Backend, LongLived},
    NetNs, TestNet,
};
use portico_xdp::{
    AttachMode, BackendSpec, Balancer, LoadOptions, NodeConfig, Protocol, ServiceKey, ServiceSpec,
    XdpBalancer, XdpProgram,
};

const CONNECTIONS: usize = 3000;

struct Family {
    v6: bool,
}

impl Family {
    fn client(&self) -> &'static str {
        if self.v6 {
            "fd00:18::1"
        } else {
            "198.18.0.1"
        }
    }
    fn lb_client_side(&self) -> &'static str {
        if self.v6 {
            "fd00:18::fe"
        } else {
            "198.18.0.254"
        }
    }
    fn snat(&self) -> &'static str {
        if self.v6 {
            "fd00:18:1::fe"
        } else {
            "198.18.1.254"
        }
    }
    fn backend(&self, i: u8) -> String {
        if self.v6 {
            format!("fd00:18:1::{i}")
        } else {
            format!("198.18.1.{i}")
        }
    }
    fn vip(&self) -> IpAddr {
        if self.v6 {
            "fd00:203::10".parse().unwrap()
        } else {
            "203.0.113.10".parse().unwrap()
        }
    }
    fn plen(&self) -> &'static str {
        if self.v6 {
            "64"
        } else {
            "24"
        }
    }
    fn ip(&self) -> &'static str {
        if self.v6 {
            "-6"
        } else {
            "-4"
        }
    }
}

struct Topology {
    net: TestNet,
    client: NetNs,
    lb: NetNs,
    backends: Vec<NetNs>,
}

fn topology(f: &Family) -> Topology {
    let mut net = TestNet::new().unwrap();
    let client = net.add_ns("cl").unwrap();
    let lb = net.add_ns("lb").unwrap();
    let sw = net.add_ns("sw").unwrap();
    net.veth(&client, "eth0", &lb, "eth0").unwrap();
    net.veth(&lb, "eth1", &sw, "lb").unwrap();
    sw.run(&["ip", "link", "add", "br0", "type", "bridge"])
        .unwrap();
    sw.run(&["ip", "link", "set", "br0", "up"]).unwrap();
    sw.run(&["ip", "link", "set", "lb", "master", "br0"])
        .unwrap();
    let mut backends = Vec::new();
    for i in 1..=3u8 {
        let be = net.add_ns(&format!("be{i}")).unwrap();
        let port = format!("be{i}");
        net.veth(&be, "eth0", &sw, &port).unwrap();
        sw.run(&["ip", "link", "set", &port, "master", "br0"])
            .unwrap();
        be.run(&[
            "ip",
            f.ip(),
            "addr",
            "add",
            &format!("{}/{}", f.backend(i), f.plen()),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
        // Native XDP on veth hands over frames without finished checksums otherwise.
        be.run(&["ethtool", "-K", "eth0", "tx", "off"]).unwrap();
        backends.push(be);
    }
    client
        .run(&[
            "ip",
            f.ip(),
            "addr",
            "add",
            &format!("{}/{}", f.client(), f.plen()),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    client
        .run(&[
            "ip",
            f.ip(),
            "route",
            "add",
            "default",
            "via",
            f.lb_client_side(),
        ])
        .unwrap();
    client.run(&["ethtool", "-K", "eth0", "tx", "off"]).unwrap();
    lb.run(&[
        "ip",
        f.ip(),
        "addr",
        "add",
        &format!("{}/{}", f.lb_client_side(), f.plen()),
        "dev",
        "eth0",
        "nodad",
    ])
    .unwrap();
    lb.run(&[
        "ip",
        f.ip(),
        "addr",
        "add",
        &format!("{}/{}", f.snat(), f.plen()),
        "dev",
        "eth1",
        "nodad",
    ])
    .unwrap();
    lb.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]).unwrap();
    lb.run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])
        .unwrap();
    // Resolve neighbours both ways before the balancer relies on them.
    for i in 1..=3 {
        lb.run(&["ping", "-c", "1", "-W", "2", &f.backend(i)])
            .unwrap();
    }
    client
        .run(&["ping", "-c", "1", "-W", "2", f.lb_client_side()])
        .unwrap();
    Topology {
        net,
        client,
        lb,
        backends,
    }
}

fn start_balancer(t: &Topology, f: &Family, mode: AttachMode) -> XdpBalancer {
    let program = XdpProgram::load_with(LoadOptions {
        max_services: 16,
        max_backends: 64,
        ring_size: 4093,
        conntrack_entries: 65536,
    })
    .expect("loading the XDP program (needs root)");
    let mut b = XdpBalancer::new(program);
    b.configure_node(&NodeConfig {
        snat_v4: (!f.v6).then(|| f.snat().parse().unwrap()),
        snat_v6: f.v6.then(|| f.snat().parse().unwrap()),
        snat_ports: (20000, 29999),
        ..NodeConfig::default()
    })
    .unwrap();
    for proto in [Protocol::Tcp, Protocol::Udp] {
        b.upsert_service(&spec(f, proto, &[1, 1, 1])).unwrap();
    }
    // The balancer on both LB interfaces; pass-through copies on the veth peers so native
    // redirects into them are accepted.
    for (ns, iface) in [(&t.lb, "eth0"), (&t.lb, "eth1")] {
        let _in = ns.enter().unwrap();
        b.program_mut().attach(iface, mode).unwrap();
    }
    b
}

fn spec(f: &Family, proto: Protocol, weights: &[u32]) -> ServiceSpec {
    ServiceSpec {
        key: ServiceKey {
            vip: f.vip(),
            port: 80,
            proto,
        },
        backends: weights
            .iter()
            .enumerate()
            .filter(|(_, w)| **w != u32::MAX)
            .map(|(i, w)| BackendSpec {
                addr: f.backend(i as u8 + 1).parse().unwrap(),
                port: 8080,
                weight: *w,
            })
            .collect(),
        hash_source_only: false,
    }
}

/// Attaches a pass-everything copy of the program to the peers of the LB's links, which
/// native XDP_REDIRECT into a veth requires.
fn attach_peer_passers(t: &Topology, mode: AttachMode) -> Vec<XdpProgram> {
    let mut keep = Vec::new();
    let sw = t
        .net
        .namespaces()
        .find(|n| n.name().ends_with("sw"))
        .unwrap()
        .clone();
    for (ns, iface) in [(&t.client, "eth0"), (&sw, "lb")] {
        let mut p = XdpProgram::load_with(LoadOptions {
            max_services: 2,
            max_backends: 2,
            ring_size: 251,
            conntrack_entries: 64,
        })
        .unwrap();
        let _in = ns.enter().unwrap();
        p.attach(iface, mode).unwrap();
        keep.push(p);
    }
    keep
}

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
    let t = topology(&f);
    let mut servers = Vec::new();
    for (i, be) in t.backends.iter().enumerate() {
        let addr = SocketAddr::new(f.backend(i as u8 + 1).parse().unwrap(), 8080);
        servers.push(Backend::start(be, &format!("be{}", i + 1), addr).unwrap());
    }
    let _passers = attach_peer_passers(&t, mode);
    let mut balancer = start_balancer(&t, &f, mode);
    let vip = SocketAddr::new(f.vip(), 80);
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
    let stats = balancer.service_stats(&vip_key(&f)).unwrap().unwrap();
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
        .set_backend_weight(&vip_key(&f), f.backend(2).parse().unwrap(), 8080, 0)
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
        .upsert_service(&spec(&f, Protocol::Tcp, &[1, 0, u32::MAX]))
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
    drop(servers);
}

fn vip_key(f: &Family) -> ServiceKey {
    ServiceKey {
        vip: f.vip(),
        port: 80,
        proto: Protocol::Tcp,
    }
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
