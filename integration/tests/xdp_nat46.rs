//! NAT46 and NAT64 over veth (issue 13): an IPv4-only client reaches IPv6-only backends
//! through an IPv4 VIP, and an IPv6-only client IPv4-only backends through an IPv6 VIP,
//! TCP and UDP, natively attached.
//!
//! ```text
//!  client ──veth── lb(eth0)   lb(eth1) ──veth── sw (bridge) ──veth── be1, be2, be3
//! ```
//! The lab's topology of the client's family, then the backends moved to the other family
//! (their addresses of the client's family removed) and the LB node given a SNAT address of
//! theirs.

use std::{collections::BTreeMap, net::SocketAddr};

use anyhow::{ensure, Result};
use portico_integration::{
    lab::{self, Family},
    traffic,
};
use portico_xdp::{
    AttachMode, BackendSpec, Balancer, NodeConfig, Protocol, ServiceKey, ServiceSpec,
};
use portico_xdp_common::stat;

/// Exchanges of each protocol.
const EXCHANGES: usize = 150;

fn cross_family(client_v6: bool) -> Result<()> {
    let cf = Family { v6: client_v6 };
    let bf = Family { v6: !client_v6 };
    let t = lab::topology(cf)?;
    // The backends speak the other family only.
    for (i, be) in t.backends.iter().enumerate() {
        let i = i as u8 + 1;
        let plen = if bf.v6 { "64" } else { "24" };
        be.run(&[
            "ip",
            bf.ip(),
            "addr",
            "add",
            &format!("{}/{plen}", bf.backend(i)),
            "dev",
            "eth0",
            "nodad",
        ])?;
        let cplen = if cf.v6 { "64" } else { "24" };
        be.run(&[
            "ip",
            cf.ip(),
            "addr",
            "del",
            &format!("{}/{cplen}", cf.backend(i)),
            "dev",
            "eth0",
        ])?;
    }
    let plen = if bf.v6 { "64" } else { "24" };
    t.lb.run(&[
        "ip",
        bf.ip(),
        "addr",
        "add",
        &format!("{}/{plen}", bf.snat()),
        "dev",
        "eth1",
        "nodad",
    ])?;
    // Neighbours resolved before the balancer relies on them.
    for i in 1..=lab::BACKENDS {
        t.lb.run(&["ping", "-c", "1", "-W", "2", &bf.backend(i).to_string()])?;
    }
    let _servers = traffic::start_backends(&t.backends, |i| {
        SocketAddr::new(bf.backend(i), lab::BACKEND_PORT)
    })?;
    let mut data_path = t.start_data_path(AttachMode::Native)?;
    let balancer = &mut data_path.balancer;
    balancer.configure_node(&NodeConfig {
        snat_v4: Some(if cf.v6 { bf.snat() } else { cf.snat() }.parse()?),
        snat_v6: Some(if cf.v6 { cf.snat() } else { bf.snat() }.parse()?),
        snat_ports: (20000, 29999),
        ..NodeConfig::default()
    })?;
    for proto in [Protocol::Tcp, Protocol::Udp] {
        balancer.upsert_service(&ServiceSpec {
            key: ServiceKey {
                vip: cf.vip(),
                port: lab::VIP_PORT,
                proto,
            },
            backends: (1..=lab::BACKENDS)
                .map(|i| BackendSpec {
                    addr: bf.backend(i),
                    port: lab::BACKEND_PORT,
                    weight: 1,
                })
                .collect(),
            hash_source_only: false,
            forwarding: Default::default(),
        })?;
    }
    let vip = SocketAddr::new(cf.vip(), lab::VIP_PORT);
    for (what, exchange) in [
        ("TCP", traffic::tcp_once as fn(SocketAddr) -> Result<String>),
        ("UDP", traffic::udp_once),
    ] {
        let tally = traffic::in_ns(&t.client, move || {
            let mut tally = BTreeMap::<String, usize>::new();
            for _ in 0..EXCHANGES {
                *tally.entry(exchange(vip)?).or_default() += 1;
            }
            Ok(tally)
        })?;
        ensure!(
            tally.values().sum::<usize>() == EXCHANGES,
            "{what}: {tally:?}"
        );
        ensure!(
            tally.len() == usize::from(lab::BACKENDS),
            "{what}: every backend answers some: {tally:?}"
        );
    }
    let xlat = balancer.program().stat(stat::XLAT)?;
    ensure!(
        xlat >= 4 * EXCHANGES as u64,
        "{xlat} packets translated for {} exchanges",
        2 * EXCHANGES
    );
    Ok(())
}

#[test]
fn ipv4_client_reaches_ipv6_backends_through_an_ipv4_vip() {
    cross_family(false).unwrap();
}

#[test]
fn ipv6_client_reaches_ipv4_backends_through_an_ipv6_vip() {
    cross_family(true).unwrap();
}
