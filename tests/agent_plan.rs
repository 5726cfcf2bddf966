//! The agent's pure parts: addresses from the Service status the controller wrote, then the
//! same node plan as standalone; and the PorticoNode status it writes.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use portico::agent::{node_status, outcome_from_status, NodeFacts};
use portico::manifest::parse_text;
use portico::plan::{node_plan, NodeIdentity};
use portico::world::World;
use portico_crds::{ClassPolicy, PeerSession};
use portico_xdp::{Protocol, ServiceKey};

const BASE: &str = r#"
apiVersion: portico.io/v1alpha1
kind: AddressPool
metadata: {name: public}
spec:
  blocks: [{cidr: 198.51.100.0/24}]
---
apiVersion: portico.io/v1alpha1
kind: BGPPeer
metadata: {name: tor}
spec: {myASN: 64512, peerASN: 64500, peerAddress: 192.0.2.1}
---
apiVersion: portico.io/v1alpha1
kind: BGPAdvertisement
metadata: {name: all}
spec: {}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - {addresses: ["10.1.0.5"], nodeName: n1, conditions: {ready: true}}
"#;

fn web(status: &str) -> String {
    format!(
        r#"
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: shop}}
spec:
  type: LoadBalancer
  loadBalancerClass: portico.io/lb
  ports: [{{name: http, port: 80, protocol: TCP}}]
{status}
"#
    )
}

fn world(text: &str) -> World {
    let (events, errors) = parse_text("fixture.yaml", text);
    assert!(errors.is_empty(), "fixture does not parse: {errors:?}");
    let mut w = World::default();
    w.apply_all(events);
    w
}

fn n1() -> NodeIdentity {
    NodeIdentity {
        name: "n1".into(),
        labels: BTreeMap::new(),
        router_id: Some("192.0.2.10".parse().unwrap()),
    }
}

#[test]
fn the_agent_announces_and_balances_the_address_the_controller_wrote_into_status() {
    let w = world(&format!(
        "{BASE}{}",
        web(r#"status: {loadBalancer: {ingress: [{ip: 198.51.100.42, ipMode: VIP}]}}"#)
    ));
    let outcome = outcome_from_status(&w, ClassPolicy::default());
    let addrs = &outcome.services[&("shop".to_owned(), "web".to_owned())];
    let vip: IpAddr = "198.51.100.42".parse().unwrap();
    assert_eq!(addrs.addresses, vec![vip]);
    assert_eq!(addrs.pools, vec!["public".to_owned()]);
    let plan = node_plan(&w, &outcome, &n1());
    let key = ServiceKey {
        vip,
        port: 80,
        proto: Protocol::Tcp,
    };
    assert_eq!(plan.services[&key].backends.len(), 1);
    assert_eq!(plan.services[&key].backends[0].port, 8080);
    let tor: IpAddr = "192.0.2.1".parse().unwrap();
    assert!(plan.peers[&tor]
        .routes
        .contains_key(&"198.51.100.42/32".parse().unwrap()));
    assert!(plan.held.contains(&vip));
}

#[test]
fn a_service_the_controller_has_not_served_yet_is_neither_announced_nor_balanced() {
    let w = world(&format!("{BASE}{}", web("")));
    let outcome = outcome_from_status(&w, ClassPolicy::default());
    let plan = node_plan(&w, &outcome, &n1());
    assert!(plan.services.is_empty());
    assert!(plan.held.is_empty());
    let tor: IpAddr = "192.0.2.1".parse().unwrap();
    assert!(
        plan.peers[&tor].routes.is_empty(),
        "the session still comes up"
    );
}

#[test]
fn services_of_another_class_are_left_to_their_implementation() {
    let other = web(r#"status: {loadBalancer: {ingress: [{ip: 198.51.100.42}]}}"#)
        .replace("portico.io/lb", "example.com/other");
    let w = world(&format!("{BASE}{other}"));
    assert!(outcome_from_status(&w, ClassPolicy::default())
        .services
        .is_empty());
}

#[test]
fn the_node_status_summarises_sessions_announcements_and_the_datapath() {
    let w = world(&format!(
        "{BASE}{}",
        web(r#"status: {loadBalancer: {ingress: [{ip: 198.51.100.42, ipMode: VIP}]}}"#)
    ));
    let outcome = outcome_from_status(&w, ClassPolicy::default());
    let plan = node_plan(&w, &outcome, &n1());
    let session = |name: &str, state: &str| {
        (
            name.to_owned(),
            PeerSession {
                name: name.into(),
                address: "192.0.2.1".into(),
                state: state.into(),
                ..PeerSession::default()
            },
        )
    };
    let now = Time(Timestamp::from_second(1_700_000_000).unwrap());
    let facts = NodeFacts {
        peers: vec![session("tor", "Established"), session("spare", "Active")],
        xdp: true,
        ..NodeFacts::default()
    };
    let s = node_status(&plan, &facts, None, &now);
    assert_eq!(s.peers_summary, "1/2 Established");
    assert_eq!(
        s.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["spare", "tor"]
    );
    assert_eq!(s.announced, vec!["198.51.100.42".to_owned()]);
    assert_eq!(s.announced_count, 1);
    assert_eq!((s.datapath.services, s.datapath.backends), (1, 1));
    assert!(s.datapath.attached);
    assert_eq!(s.conditions[0].status, "True");

    // A failing applier turns Ready False; the same status later keeps its time.
    let failing = NodeFacts {
        failing: vec![("bgp".into(), "peer refused".into())],
        ..facts.clone()
    };
    let later = Time(Timestamp::from_second(1_700_000_060).unwrap());
    let f = node_status(&plan, &failing, Some(&s), &later);
    assert_eq!(f.conditions[0].status, "False");
    assert_eq!(f.conditions[0].last_transition_time, later);
    assert!(f.conditions[0].message.contains("bgp: peer refused"));
    let still = node_status(&plan, &failing, Some(&f), &now);
    assert_eq!(still.conditions[0].last_transition_time, later);
}
