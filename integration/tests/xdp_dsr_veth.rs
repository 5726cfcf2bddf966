//! Direct server return end to end over veth (issue 13): the client's TCP and UDP traffic to
//! the VIP reaches the balancer (XDP, native), which encapsulates it toward the backends
//! (IPIP / IP6IP6, or GUE); each backend strips the outer header with the decapsulation
//! program (`portico_xdp::Decap`, as `portico decap` loads it), its server, bound to the VIP
//! on the service port, answers, and the answer goes to the client by the backends' own
//! return link. Packet sockets (AF_PACKET) show the answers arriving on the client's return
//! link, none on its link to the balancer, and none crossing the balancer. Needs root.
//!
//! ```text
//!  client eth0 ──veth── eth0 lb eth1 ──veth── sw (br0) ──veth── eth0 be1, be2, be3
//!  client eth1 ──veth── ret (br0) ──veth── eth1 be1, be2, be3      (the return link)
//! ```

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
};

use anyhow::{ensure, Context as _, Result};
use portico_integration::{
    lab::{self, Family},
    traffic::{self, Capture},
};
use portico_xdp::{
    AttachMode, Balancer, Decap, DecapConfig, DsrConfig, Encapsulation, Forwarding, Protocol,
};
use portico_xdp_common::stat;

/// Exchanges of each protocol.
const EXCHANGES: usize = 30;

/// The outer source prefix (four addresses, each a `--peer` of the backends).
fn source_prefix(f: Family) -> (IpAddr, u8) {
    if f.v6 {
        ("fd00:18:1::fc".parse().expect("address"), 126)
    } else {
        ("198.18.1.252".parse().expect("address"), 30)
    }
}

fn source_addresses(f: Family) -> Vec<IpAddr> {
    let (base, _) = source_prefix(f);
    (0..4u8)
        .map(|i| match base {
            IpAddr::V4(a) => {
                let mut o = a.octets();
                o[3] += i;
                IpAddr::from(o)
            }
            IpAddr::V6(a) => {
                let mut o = a.octets();
                o[15] += i;
                IpAddr::from(o)
            }
        })
        .collect()
}

/// The client's and backend `i`'s (1-based; 0: the client) addresses on the return link.
fn return_addr(f: Family, i: u8) -> String {
    if f.v6 {
        format!("fd00:18:30::{}", 1 + 16 * u16::from(i))
    } else {
        format!("198.18.30.{}", 1 + 16 * i)
    }
}

/// How many of the frames a capture has seen since the last call have IP source `from` and
/// destination `to`.
fn count(c: &Capture, from: IpAddr, to: IpAddr) -> usize {
    c.frames()
        .iter()
        .filter(|p| {
            let len = p.len();
            let addrs = match (p.get(12..14), from) {
                (Some([0x08, 0x00]), IpAddr::V4(_)) if len >= 34 => Some((
                    IpAddr::from(<[u8; 4]>::try_from(&p[26..30]).expect("4 bytes")),
                    IpAddr::from(<[u8; 4]>::try_from(&p[30..34]).expect("4 bytes")),
                )),
                (Some([0x86, 0xdd]), IpAddr::V6(_)) if len >= 54 => Some((
                    IpAddr::from(<[u8; 16]>::try_from(&p[22..38]).expect("16 bytes")),
                    IpAddr::from(<[u8; 16]>::try_from(&p[38..54]).expect("16 bytes")),
                )),
                _ => None,
            };
            addrs == Some((from, to))
        })
        .count()
}

fn dsr_over_veth(v6: bool, encap: Encapsulation) -> Result<()> {
    let f = Family { v6 };
    let mut t = lab::topology(f)?;
    let client_ip: IpAddr = f.client().parse()?;
    let vip = f.vip();
    let plen = if v6 { "64" } else { "24" };

    // The return link, a bridge of its own.
    let ret = t.net.add_ns("ret")?;
    ret.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
    ret.run(&["ip", "link", "set", "br0", "up"])?;
    t.net.veth(&t.client, "eth1", &ret, "cl")?;
    ret.run(&["ip", "link", "set", "cl", "master", "br0"])?;
    t.client.run(&[
        "ip",
        f.ip(),
        "addr",
        "add",
        &format!("{}/{plen}", return_addr(f, 0)),
        "dev",
        "eth1",
        "nodad",
    ])?;
    // Answers come from the VIP on eth1, whose route is by eth0: no reverse-path filter.
    for conf in ["all", "default", "eth0", "eth1"] {
        t.client.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{conf}.rp_filter=0"),
        ])?;
    }
    let sources = source_addresses(f);
    let mut decaps = Vec::new();
    for (i, be) in t.backends.iter().enumerate() {
        let i = i as u8 + 1;
        let port = format!("be{i}");
        t.net.veth(be, "eth1", &ret, &port)?;
        ret.run(&["ip", "link", "set", &port, "master", "br0"])?;
        be.run(&[
            "ip",
            f.ip(),
            "addr",
            "add",
            &format!("{}/{plen}", return_addr(f, i)),
            "dev",
            "eth1",
            "nodad",
        ])?;
        // The VIP on lo; answers to the client by the return link.
        let host = if v6 { "128" } else { "32" };
        be.run(&[
            "ip",
            f.ip(),
            "addr",
            "add",
            &format!("{vip}/{host}"),
            "dev",
            "lo",
        ])?;
        be.run(&[
            "ip",
            f.ip(),
            "route",
            "add",
            &format!("{client_ip}/{host}"),
            "via",
            &return_addr(f, 0),
            "dev",
            "eth1",
        ])?;
        // The client's packets arrive on eth0, its route is eth1.
        for conf in ["all", "default", "eth0", "eth1"] {
            be.run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.conf.{conf}.rp_filter=0"),
            ])?;
        }
        let mut d = Decap::load(&DecapConfig {
            local: vec![f.backend(i)],
            peers: sources.clone(),
            gue_port: Some(portico_xdp::DEFAULT_GUE_PORT),
        })?;
        {
            let _in = be.enter()?;
            d.attach("eth0", AttachMode::Native)?;
        }
        decaps.push(d);
    }
    // The backends' servers listen on the VIP and the service port: DSR translates neither.
    let _servers = traffic::start_backends(&t.backends, |_| SocketAddr::new(vip, lab::VIP_PORT))?;

    let mut data_path = t.start_data_path(AttachMode::Native)?;
    let balancer = &mut data_path.balancer;
    let (base, len) = source_prefix(f);
    let mut node = t.node_config()?;
    node.dsr = DsrConfig {
        source_v4: match base {
            IpAddr::V4(a) => Some((a, len)),
            IpAddr::V6(_) => None,
        },
        source_v6: match base {
            IpAddr::V6(a) => Some((a, len)),
            IpAddr::V4(_) => None,
        },
        ..DsrConfig::default()
    };
    balancer.configure_node(&node)?;
    let all = vec![Some(1); usize::from(lab::BACKENDS)];
    for proto in [Protocol::Tcp, Protocol::Udp] {
        let mut spec = lab::service(f, proto, &all);
        spec.forwarding = Forwarding::Dsr(encap);
        balancer.upsert_service(&spec)?;
    }

    let lb_captures = [Capture::open(&t.lb, "eth0")?, Capture::open(&t.lb, "eth1")?];
    let client_via_lb = Capture::open(&t.client, "eth0")?;
    let client_return = Capture::open(&t.client, "eth1")?;

    let to = SocketAddr::new(vip, lab::VIP_PORT);
    for (what, exchange) in [
        ("TCP", traffic::tcp_once as fn(SocketAddr) -> Result<String>),
        ("UDP", traffic::udp_once),
    ] {
        let tally = traffic::in_ns(&t.client, move || {
            let mut tally = BTreeMap::<String, usize>::new();
            for _ in 0..EXCHANGES {
                *tally.entry(exchange(to)?).or_default() += 1;
            }
            Ok(tally)
        })
        .with_context(|| format!("{what} to {to}"))?;
        ensure!(
            tally.values().sum::<usize>() == EXCHANGES,
            "{what}: {tally:?}"
        );
        ensure!(
            tally.len() == usize::from(lab::BACKENDS),
            "{what}: every backend answers some: {tally:?}"
        );
    }

    // Every answer (TCP: SYN-ACK, data, FIN-ACK; UDP: one datagram each) came by the
    // return link; none by the balancer's link, none through the balancer.
    let returned = count(&client_return, vip, client_ip);
    ensure!(
        returned >= 4 * EXCHANGES,
        "{returned} frames from the VIP on the client's return link"
    );
    let via_lb = count(&client_via_lb, vip, client_ip);
    ensure!(
        via_lb == 0,
        "{via_lb} frames from the VIP on the client's link to the balancer"
    );
    for (iface, c) in ["eth0", "eth1"].iter().zip(&lb_captures) {
        let crossed = count(c, vip, client_ip);
        ensure!(
            crossed == 0,
            "{crossed} answers crossed the balancer's {iface}"
        );
    }
    let encapsulated = balancer.program().stat(stat::DSR_ENCAP)?;
    ensure!(
        encapsulated >= 4 * EXCHANGES as u64,
        "{encapsulated} packets encapsulated for {} exchanges",
        2 * EXCHANGES
    );
    let decapsulated: u64 = decaps
        .iter()
        .map(|d| {
            d.counters().map(|c| {
                c.iter()
                    .find(|(n, _)| *n == "decapsulated")
                    .map_or(0, |x| x.1)
            })
        })
        .sum::<Result<u64, _>>()?;
    ensure!(
        decapsulated >= 4 * EXCHANGES as u64 && decapsulated <= encapsulated,
        "{decapsulated} decapsulated, {encapsulated} encapsulated"
    );
    Ok(())
}

#[test]
fn ipv4_ipip_answers_go_straight_to_the_client() {
    dsr_over_veth(false, Encapsulation::Ipip).unwrap();
}

#[test]
fn ipv6_ip6ip6_answers_go_straight_to_the_client() {
    dsr_over_veth(true, Encapsulation::Ipip).unwrap();
}

#[test]
fn ipv4_gue_answers_go_straight_to_the_client() {
    dsr_over_veth(false, Encapsulation::Gue).unwrap();
}

#[test]
fn ipv6_gue_answers_go_straight_to_the_client() {
    dsr_over_veth(true, Encapsulation::Gue).unwrap();
}
