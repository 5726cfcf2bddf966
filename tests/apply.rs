//! Appliers change only what differs, and one refused object does not stop the rest.

use std::collections::BTreeMap;

use portico::apply::BalancerApplier;
use portico_xdp::{
    BackendSpec, Encapsulation, FakeBalancer, Forwarding, NodeConfig, Protocol, ServiceKey,
    ServiceSpec,
};

fn spec(vip: &str, port: u16, backends: &[&str]) -> ServiceSpec {
    let key = ServiceKey {
        vip: vip.parse().unwrap(),
        port,
        proto: Protocol::Tcp,
    };
    ServiceSpec {
        key,
        backends: backends
            .iter()
            .map(|b| BackendSpec {
                addr: b.parse().unwrap(),
                port: 8080,
                weight: 1,
            })
            .collect(),
        hash_source_only: false,
        forwarding: Default::default(),
    }
}

fn plan(specs: &[ServiceSpec]) -> BTreeMap<ServiceKey, ServiceSpec> {
    specs.iter().map(|s| (s.key, s.clone())).collect()
}

fn applier() -> BalancerApplier {
    let node = NodeConfig {
        snat_v4: Some("192.0.2.10".parse().unwrap()),
        ..NodeConfig::default()
    };
    BalancerApplier::new(Box::new(FakeBalancer::default()), node)
}

#[test]
fn a_service_the_balancer_refuses_is_reported_and_the_others_still_go_in() {
    let mut a = applier();
    let v4 = spec("198.51.100.1", 80, &["10.0.0.1"]);
    // No IPv6 SNAT address on this node: refused, with the reason.
    let v6 = spec("2001:db8::1", 80, &["fd00::1"]);
    a.apply(&plan(&[v4.clone(), v6.clone()]));
    assert_eq!(a.applied().keys().collect::<Vec<_>>(), [&v4.key]);
    assert!(!a.health.ok);
    let why = &a.service_errors[&v6.key];
    assert!(why.contains("no IPv6 SNAT address"), "{why}");
    assert!(a
        .health
        .last_error
        .as_deref()
        .unwrap()
        .contains("2001:db8::1"));
    // The next pass without the refused service is healthy again.
    a.apply(&plan(std::slice::from_ref(&v4)));
    assert!(a.health.ok);
    assert_eq!(a.health.failures, 1);
}

#[test]
fn only_changed_services_are_written_and_gone_ones_removed() {
    let mut a = applier();
    let web = spec("198.51.100.1", 80, &["10.0.0.1"]);
    let api = spec("198.51.100.2", 443, &["10.0.0.2"]);
    a.apply(&plan(&[web.clone(), api.clone()]));
    let web2 = spec("198.51.100.1", 80, &["10.0.0.1", "10.0.0.3"]);
    a.apply(&plan(std::slice::from_ref(&web2)));
    assert_eq!(a.applied().len(), 1);
    assert_eq!(a.balancer().service(&web.key), Some(&web2));
    assert_eq!(a.balancer().service(&api.key), None);
    assert!(a.health.ok);
}

#[test]
fn a_forwarding_mode_change_alone_is_written() {
    let mut a = applier();
    let web = spec("198.51.100.1", 80, &["10.0.0.1"]);
    a.apply(&plan(std::slice::from_ref(&web)));
    let dsr = ServiceSpec {
        forwarding: Forwarding::Dsr(Encapsulation::Gue),
        ..web.clone()
    };
    a.apply(&plan(std::slice::from_ref(&dsr)));
    assert_eq!(a.balancer().service(&web.key), Some(&dsr));
    assert!(a.health.ok);
}
