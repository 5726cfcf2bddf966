//! World → plan fixtures: one test per rule, worlds written as the manifests a user writes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use portico::manifest::parse_text;
use portico::plan::{node_plan, Ipam, IpamOutcome, NodeIdentity, NodePlan};
use portico::world::World;
use portico_crds::ClassPolicy;
use portico_xdp::{Encapsulation, Forwarding, Protocol, ServiceKey};

const BASE: &str = r#"
apiVersion: portico.io/v1alpha1
kind: AddressPool
metadata: {name: public, labels: {tier: public}}
spec:
  blocks: [{cidr: 198.51.100.0/24}, {cidr: "2001:db8:100::/120"}]
---
apiVersion: portico.io/v1alpha1
kind: BGPPeer
metadata: {name: tor}
spec: {myASN: 64512, peerASN: 64500, peerAddress: 192.0.2.1}
---
apiVersion: portico.io/v1alpha1
kind: BGPAdvertisement
metadata: {name: all}
spec: {communities: ["64512:100"]}
"#;

fn service(name: &str, extra: &str) -> String {
    format!(
        r#"
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}
spec:
  type: LoadBalancer
  loadBalancerClass: portico.io/lb
  ports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 53, protocol: UDP}}]
{extra}
"#
    )
}

/// An EndpointSlice of `svc` with endpoints `(address, node, ready, serving, terminating)`.
fn slice(svc: &str, family: &str, eps: &[(&str, &str, bool, bool, bool)]) -> String {
    let mut s = format!(
        r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {svc}-{}, namespace: shop, labels: {{kubernetes.io/service-name: {svc}}}}}
addressType: {family}
ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 5353, protocol: UDP}}]
endpoints:
"#,
        family.to_lowercase()
    );
    for (addr, node, ready, serving, terminating) in eps {
        s.push_str(&format!(
            "  - {{addresses: [\"{addr}\"], nodeName: {node}, conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}}}\n"
        ));
    }
    s
}

fn world(text: &str) -> World {
    let (events, errors) = parse_text("fixture.yaml", text);
    assert!(errors.is_empty(), "fixture does not parse: {errors:?}");
    let mut w = World::default();
    w.apply_all(events);
    w
}

fn node(name: &str) -> NodeIdentity {
    NodeIdentity {
        name: name.into(),
        labels: BTreeMap::new(),
        router_id: Some("192.0.2.10".parse().unwrap()),
    }
}

fn plan_for(text: &str, node_name: &str) -> (IpamOutcome, NodePlan) {
    let w = world(text);
    let mut ipam = Ipam::new(ClassPolicy::default(), BTreeMap::new());
    let outcome = ipam.reconcile(&w, 0);
    let plan = node_plan(&w, &outcome, &node(node_name));
    (outcome, plan)
}

fn addr_of(outcome: &IpamOutcome, name: &str) -> IpAddr {
    outcome.services[&("shop".to_owned(), name.to_owned())].addresses[0]
}

fn tor() -> IpAddr {
    "192.0.2.1".parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

const READY: (bool, bool, bool) = (true, true, false);

fn ep<'a>(
    addr: &'a str,
    node: &'a str,
    c: (bool, bool, bool),
) -> (&'a str, &'a str, bool, bool, bool) {
    (addr, node, c.0, c.1, c.2)
}

#[test]
fn a_service_with_ready_endpoints_gets_an_address_xdp_listeners_and_a_route() {
    let text = format!(
        "{BASE}{}{}",
        service("web", ""),
        slice(
            "web",
            "IPv4",
            &[ep("10.0.0.1", "n1", READY), ep("10.0.0.2", "n2", READY)]
        )
    );
    let (outcome, plan) = plan_for(&text, "n1");
    let vip = addr_of(&outcome, "web");
    assert_eq!(vip, "198.51.100.0".parse::<IpAddr>().unwrap());
    assert_eq!(
        outcome.services[&("shop".into(), "web".into())].pools,
        ["public"]
    );
    let tcp = &plan.services[&ServiceKey {
        vip,
        port: 80,
        proto: Protocol::Tcp,
    }];
    let backends: Vec<(String, u16, u32)> = tcp
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.port, b.weight))
        .collect();
    assert_eq!(
        backends,
        [("10.0.0.1".into(), 8080, 1), ("10.0.0.2".into(), 8080, 1)]
    );
    let udp = &plan.services[&ServiceKey {
        vip,
        port: 53,
        proto: Protocol::Udp,
    }];
    assert!(udp.backends.iter().all(|b| b.port == 5353));
    let routes = &plan.peers[&tor()].routes;
    assert_eq!(
        routes.keys().copied().collect::<Vec<_>>(),
        [net("198.51.100.0/32")]
    );
    assert_eq!(
        routes[&net("198.51.100.0/32")].communities,
        [64512 << 16 | 100]
    );
    assert!(plan.held.contains(&vip));
    assert!(plan.problems.is_empty(), "{:?}", plan.problems);
}

#[test]
fn cluster_policy_without_a_ready_endpoint_anywhere_is_not_announced() {
    let text = format!(
        "{BASE}{}{}",
        service("web", ""),
        slice(
            "web",
            "IPv4",
            &[ep("10.0.0.1", "n2", (false, false, false))]
        )
    );
    let (outcome, plan) = plan_for(&text, "n1");
    assert!(!outcome.services[&("shop".into(), "web".into())]
        .addresses
        .is_empty());
    assert!(plan.peers[&tor()].routes.is_empty());
    assert!(plan.held.is_empty());
}

#[test]
fn local_policy_announces_only_from_a_node_with_a_ready_local_endpoint_and_keeps_only_local_backends(
) {
    let text = format!(
        "{BASE}{}{}",
        service("web", "  externalTrafficPolicy: Local"),
        slice(
            "web",
            "IPv4",
            &[ep("10.0.0.1", "n1", READY), ep("10.0.0.2", "n2", READY)]
        )
    );
    let (outcome, on_n1) = plan_for(&text, "n1");
    let vip = addr_of(&outcome, "web");
    let key = ServiceKey {
        vip,
        port: 80,
        proto: Protocol::Tcp,
    };
    let b: Vec<String> = on_n1.services[&key]
        .backends
        .iter()
        .map(|b| b.addr.to_string())
        .collect();
    assert_eq!(b, ["10.0.0.1"]);
    assert_eq!(on_n1.peers[&tor()].routes.len(), 1);
    let (_, on_n3) = plan_for(&text, "n3");
    assert!(on_n3.services[&key].backends.is_empty());
    assert!(
        on_n3.peers[&tor()].routes.is_empty(),
        "n3 has no local endpoint"
    );
}

#[test]
fn local_policy_keeps_the_client_source_and_cluster_policy_does_not() {
    let text = format!(
        "{BASE}{}{}{}{}",
        service("local", "  externalTrafficPolicy: Local"),
        slice("local", "IPv4", &[ep("10.0.0.1", "n1", READY)]),
        service("cluster", "  externalTrafficPolicy: Cluster"),
        slice("cluster", "IPv4", &[ep("10.0.0.2", "n1", READY)])
    );
    let (outcome, plan) = plan_for(&text, "n1");
    let spec = |name| {
        &plan.services[&ServiceKey {
            vip: addr_of(&outcome, name),
            port: 80,
            proto: Protocol::Tcp,
        }]
    };
    assert!(
        spec("local").preserve_source,
        "Local keeps the client's source"
    );
    assert!(!spec("cluster").preserve_source, "Cluster is SNATed");
    assert!(!spec("cluster").hash_source_only);

    // With direct server return the client's packet reaches the backend as it was: no NAT
    // whose source would need keeping.
    let text = format!(
        "{BASE}{}{}",
        annotated("dsr", "portico.io/forwarding-mode: dsr").replace(
            "  type: LoadBalancer",
            "  type: LoadBalancer\n  externalTrafficPolicy: Local"
        ),
        slice("dsr", "IPv4", &[ep("10.0.0.3", "n1", READY)])
    );
    let (outcome, plan) = plan_for(&text, "n1");
    let dsr = &plan.services[&ServiceKey {
        vip: addr_of(&outcome, "dsr"),
        port: 80,
        proto: Protocol::Tcp,
    }];
    assert!(matches!(dsr.forwarding, Forwarding::Dsr(_)), "{dsr:?}");
    assert!(plan.views[&("shop".into(), "dsr".into())].local, "Local");
    assert!(!dsr.preserve_source, "{dsr:?}");
}

#[test]
fn terminating_endpoints_drain_with_weight_zero_and_unready_ones_are_left_out() {
    let text = format!(
        "{BASE}{}{}",
        service("web", ""),
        slice(
            "web",
            "IPv4",
            &[
                ep("10.0.0.1", "n1", READY),
                ep("10.0.0.2", "n1", (false, true, true)),
                ep("10.0.0.3", "n1", (false, false, false)),
            ]
        )
    );
    let (outcome, plan) = plan_for(&text, "n1");
    let key = ServiceKey {
        vip: addr_of(&outcome, "web"),
        port: 80,
        proto: Protocol::Tcp,
    };
    let b: Vec<(String, u32)> = plan.services[&key]
        .backends
        .iter()
        .map(|b| (b.addr.to_string(), b.weight))
        .collect();
    assert_eq!(b, [("10.0.0.1".into(), 1), ("10.0.0.2".into(), 0)]);
    let view = &plan.views[&("shop".into(), "web".into())];
    assert_eq!((view.ready, view.total), (1, 2));
}

#[test]
fn dual_stack_services_get_backends_of_each_family_from_their_own_slices() {
    let text = format!(
        "{BASE}{}{}{}",
        service(
            "web",
            "  ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack"
        ),
        slice("web", "IPv4", &[ep("10.0.0.1", "n1", READY)]),
        slice("web", "IPv6", &[ep("fd00::1", "n1", READY)])
    );
    let (outcome, plan) = plan_for(&text, "n1");
    let a = &outcome.services[&("shop".into(), "web".into())].addresses;
    assert_eq!(a.len(), 2);
    for vip in a {
        let key = ServiceKey {
            vip: *vip,
            port: 80,
            proto: Protocol::Tcp,
        };
        let backends = &plan.services[&key].backends;
        assert_eq!(backends.len(), 1);
        assert_eq!(backends[0].addr.is_ipv4(), vip.is_ipv4());
    }
    let routes: Vec<IpNet> = plan.peers[&tor()].routes.keys().copied().collect();
    assert_eq!(routes, [net("198.51.100.0/32"), net("2001:db8:100::/128")]);
}

#[test]
fn an_advertisement_naming_peers_announces_only_to_those_peers() {
    let text = format!(
        "{}{}{}{}",
        BASE.replace("spec: {communities: [\"64512:100\"]}", "spec: {peers: [tor]}"),
        "---\napiVersion: portico.io/v1alpha1\nkind: BGPPeer\nmetadata: {name: tor2}\nspec: {myASN: 64512, peerASN: 64500, peerAddress: 192.0.2.2}\n",
        service("web", ""),
        slice("web", "IPv4", &[ep("10.0.0.1", "n1", READY)])
    );
    let (_, plan) = plan_for(&text, "n1");
    assert_eq!(plan.peers[&tor()].routes.len(), 1);
    assert!(plan.peers[&"192.0.2.2".parse::<IpAddr>().unwrap()]
        .routes
        .is_empty());
}

#[test]
fn aggregation_length_announces_one_covering_prefix_for_several_services() {
    let text = format!(
        "{}{}{}{}{}",
        BASE.replace(
            "spec: {communities: [\"64512:100\"]}",
            "spec: {aggregationLength: 24}"
        ),
        service("a", ""),
        slice("a", "IPv4", &[ep("10.0.0.1", "n1", READY)]),
        service("b", ""),
        slice("b", "IPv4", &[ep("10.0.0.2", "n1", READY)])
    );
    let (outcome, plan) = plan_for(&text, "n1");
    assert_ne!(addr_of(&outcome, "a"), addr_of(&outcome, "b"));
    let routes: Vec<IpNet> = plan.peers[&tor()].routes.keys().copied().collect();
    assert_eq!(routes, [net("198.51.100.0/24")]);
}

#[test]
fn pool_and_service_selectors_of_advertisements_pick_what_is_announced_and_communities_merge() {
    let text = format!(
        "{BASE}{}{}{}{}{}",
        "---\napiVersion: portico.io/v1alpha1\nkind: BGPAdvertisement\nmetadata: {name: web-only}\nspec: {serviceSelector: {matchLabels: {app: web}}, poolSelector: {matchLabels: {tier: public}}, communities: [no-export]}\n",
        service("web", ""),
        slice("web", "IPv4", &[ep("10.0.0.1", "n1", READY)]),
        service("db", ""),
        slice("db", "IPv4", &[ep("10.0.0.2", "n1", READY)])
    );
    let (outcome, plan) = plan_for(&text, "n1");
    let routes = &plan.peers[&tor()].routes;
    let web = IpNet::from(addr_of(&outcome, "web"));
    let db = IpNet::from(addr_of(&outcome, "db"));
    assert_eq!(routes[&web].communities, [64512 << 16 | 100, 0xFFFF_FF01]);
    assert_eq!(routes[&db].communities, [64512 << 16 | 100]);
}

#[test]
fn a_peer_whose_node_selector_does_not_match_this_node_is_not_configured() {
    let text = BASE.replace(
        "peerAddress: 192.0.2.1}",
        "peerAddress: 192.0.2.1, nodeSelector: {matchLabels: {kubernetes.io/hostname: n2}}}",
    );
    let (_, on_n1) = plan_for(&text, "n1");
    assert!(on_n1.peers.is_empty());
    let (_, on_n2) = plan_for(&text, "n2");
    assert_eq!(on_n2.peers.len(), 1);
}

#[test]
fn the_md5_password_comes_from_the_secret_and_a_missing_key_is_a_problem_naming_the_field() {
    let with_ref = BASE.replace(
        "peerAddress: 192.0.2.1}",
        "peerAddress: 192.0.2.1, passwordSecretRef: {name: bgp, namespace: portico}}",
    );
    let secret = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: bgp, namespace: portico}\nstringData: {password: s3cret}\n";
    let (_, plan) = plan_for(&format!("{with_ref}{secret}"), "n1");
    assert_eq!(
        plan.peers[&tor()].config.md5_password.as_deref(),
        Some("s3cret")
    );
    let (_, plan) = plan_for(&with_ref, "n1");
    assert!(plan.peers.is_empty());
    assert_eq!(plan.problems.len(), 1);
    let p = &plan.problems[0];
    assert_eq!(p.object.to_string(), "BGPPeer tor");
    assert!(
        p.message.contains("spec.passwordSecretRef"),
        "{}",
        p.message
    );
}

#[test]
fn services_of_another_class_are_not_portico_s() {
    let text = format!(
        "{BASE}{}",
        service("web", "").replace("portico.io/lb", "example.com/other")
    );
    let (outcome, plan) = plan_for(&text, "n1");
    assert!(outcome.services.is_empty());
    assert!(plan.services.is_empty());
}

#[test]
fn a_service_edited_into_an_invalid_state_keeps_its_address_until_fixed() {
    let good = format!("{BASE}{}", service("web", ""));
    let mut w = world(&good);
    let mut ipam = Ipam::new(ClassPolicy::default(), BTreeMap::new());
    let before = ipam.reconcile(&w, 0);
    let vip = addr_of(&before, "web");
    let (events, _) = parse_text(
        "f.yaml",
        &service("web", "  externalTrafficPolicy: Sometimes"),
    );
    w.apply_all(events);
    let after = ipam.reconcile(&w, 0);
    assert_eq!(addr_of(&after, "web"), vip);
    assert!(after.problems[0]
        .message
        .contains("spec.externalTrafficPolicy"));
    assert!(after.problems[0].message.contains("kept until it is fixed"));
}

#[test]
fn saved_allocations_are_retaken_before_new_services_allocate_after_a_restart() {
    // b alone gets the first address; after a restart that also finds a (which sorts first
    // and would otherwise take it), b keeps its address and a gets the next one.
    let mut ipam = Ipam::new(ClassPolicy::default(), BTreeMap::new());
    let first = ipam.reconcile(&world(&format!("{BASE}{}", service("b", ""))), 0);
    let b = addr_of(&first, "b");
    let saved = first.allocations();
    let mut restarted = Ipam::new(ClassPolicy::default(), saved);
    let both = format!("{BASE}{}{}", service("a", ""), service("b", ""));
    let again = restarted.reconcile(&world(&both), 0);
    assert_eq!(addr_of(&again, "b"), b);
    assert_ne!(addr_of(&again, "a"), b);
    let mut fresh = Ipam::new(ClassPolicy::default(), BTreeMap::new());
    assert_eq!(
        addr_of(&fresh.reconcile(&world(&both), 0), "a"),
        b,
        "the fixture must be able to fail"
    );
}

#[test]
fn planning_is_deterministic() {
    let text = format!(
        "{BASE}{}{}{}{}",
        service("a", ""),
        slice(
            "a",
            "IPv4",
            &[ep("10.0.0.1", "n1", READY), ep("10.0.0.9", "n2", READY)]
        ),
        service("b", "  externalTrafficPolicy: Local"),
        slice("b", "IPv4", &[ep("10.0.0.2", "n1", READY)])
    );
    let (o1, p1) = plan_for(&text, "n1");
    let (o2, p2) = plan_for(&text, "n1");
    assert_eq!(o1, o2);
    assert_eq!(p1.services, p2.services);
    assert_eq!(format!("{:?}", p1.peers), format!("{:?}", p2.peers));
}

#[test]
fn services_sharing_a_key_share_one_address_with_a_listener_each_and_one_route() {
    let shared = |name: &str, port: u16, backend: &str| {
        format!(
            r#"
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop, annotations: {{portico.io/sharing-key: front}}}}
spec:
  type: LoadBalancer
  loadBalancerClass: portico.io/lb
  ports: [{{name: http, port: {port}, protocol: TCP}}]
{}"#,
            slice(name, "IPv4", &[ep(backend, "n1", READY)])
        )
    };
    let text = format!(
        "{BASE}{}{}",
        shared("web", 80, "10.0.0.1"),
        shared("api", 443, "10.0.0.2")
    );
    let (outcome, plan) = plan_for(&text, "n1");
    let vip = addr_of(&outcome, "web");
    assert_eq!(addr_of(&outcome, "api"), vip);
    let web = &plan.services[&ServiceKey {
        vip,
        port: 80,
        proto: Protocol::Tcp,
    }];
    let api = &plan.services[&ServiceKey {
        vip,
        port: 443,
        proto: Protocol::Tcp,
    }];
    assert_eq!(web.backends[0].addr.to_string(), "10.0.0.1");
    assert_eq!(api.backends[0].addr.to_string(), "10.0.0.2");
    assert_eq!(plan.peers[&tor()].routes.len(), 1);
}

/// `service(name, "")` with these annotations.
fn annotated(name: &str, annotations: &str) -> String {
    service(name, "").replace(
        &format!("labels: {{app: {name}}}}}"),
        &format!("labels: {{app: {name}}}, annotations: {{{annotations}}}}}"),
    )
}

#[test]
fn forwarding_mode_dsr_makes_every_listener_of_the_service_direct_server_return() {
    let eps = slice("web", "IPv4", &[ep("10.0.0.1", "n1", READY)]);
    for (annotations, want) in [
        ("", Forwarding::Nat),
        ("portico.io/forwarding-mode: nat", Forwarding::Nat),
        (
            "portico.io/forwarding-mode: dsr",
            Forwarding::Dsr(Encapsulation::Ipip),
        ),
        (
            "portico.io/forwarding-mode: dsr, portico.io/dsr-encapsulation: ipip",
            Forwarding::Dsr(Encapsulation::Ipip),
        ),
        (
            "portico.io/forwarding-mode: dsr, portico.io/dsr-encapsulation: gue",
            Forwarding::Dsr(Encapsulation::Gue),
        ),
    ] {
        let text = format!("{BASE}{}{eps}", annotated("web", annotations));
        let (_, plan) = plan_for(&text, "n1");
        assert_eq!(plan.services.len(), 2, "{annotations}");
        for spec in plan.services.values() {
            assert_eq!(spec.forwarding, want, "{annotations}");
        }
        assert!(plan.problems.is_empty(), "{:?}", plan.problems);
        assert!(!plan.peers[&tor()].routes.is_empty(), "{annotations}");
    }
}

#[test]
fn a_bad_forwarding_annotation_is_a_problem_naming_service_annotation_and_value() {
    let eps = slice("web", "IPv4", &[ep("10.0.0.1", "n1", READY)]);
    for (annotations, message) in [
        (
            "portico.io/forwarding-mode: direct",
            r#"metadata.annotations["portico.io/forwarding-mode"] = "direct": must be nat or dsr"#,
        ),
        (
            "portico.io/forwarding-mode: dsr, portico.io/dsr-encapsulation: vxlan",
            r#"metadata.annotations["portico.io/dsr-encapsulation"] = "vxlan": must be ipip or gue"#,
        ),
        (
            "portico.io/dsr-encapsulation: gue",
            r#"metadata.annotations["portico.io/dsr-encapsulation"] = "gue": only with portico.io/forwarding-mode: dsr"#,
        ),
    ] {
        let text = format!(
            "{BASE}{}{eps}{}{}",
            annotated("web", annotations),
            service("api", ""),
            slice("api", "IPv4", &[ep("10.0.0.2", "n1", READY)])
        );
        let (outcome, plan) = plan_for(&text, "n1");
        assert_eq!(plan.problems.len(), 1, "{:?}", plan.problems);
        let p = &plan.problems[0];
        assert_eq!(p.object.to_string(), "Service shop/web");
        assert_eq!(p.message, message);
        // No listener and no route for it until fixed; the other Service goes on.
        let web = addr_of(&outcome, "web");
        assert!(plan.services.keys().all(|k| k.vip != web));
        assert!(!plan.peers[&tor()].routes.keys().any(|n| n.addr() == web));
        assert_eq!(plan.services.len(), 2);
    }
}

#[test]
fn a_service_waiting_for_an_address_gets_it_in_the_same_plan_as_its_holder_moves_away() {
    // b holds the first address; then, in one edit, a asks for it and b asks for another.
    // a sorts first, so it is planned while b still holds the address.
    let mut ipam = Ipam::new(ClassPolicy::default(), BTreeMap::new());
    let first = ipam.reconcile(&world(&format!("{BASE}{}", service("b", ""))), 0);
    let held = addr_of(&first, "b");
    assert_eq!(held, "198.51.100.0".parse::<IpAddr>().unwrap());
    let edited = format!(
        "{BASE}{}{}",
        annotated("a", "portico.io/ips: 198.51.100.0"),
        annotated("b", "portico.io/ips: 198.51.100.7")
    );
    let w = world(&edited);
    let once = ipam.reconcile(&w, 0);
    assert_eq!(
        addr_of(&once, "b"),
        "198.51.100.7".parse::<IpAddr>().unwrap()
    );
    assert_eq!(
        addr_of(&once, "a"),
        held,
        "a waits for a second plan: {once:?}"
    );
    assert_eq!(
        ipam.reconcile(&w, 0),
        once,
        "a second plan changed something"
    );
}
