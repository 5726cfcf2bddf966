//! Gateway API on the shared model, decided without I/O: GatewayClass acceptance, Gateway
//! addresses from the same allocator as Services, listener and route status, and the
//! agent's plan for Gateway listeners.

use std::collections::BTreeMap;
use std::net::IpAddr;

use gateway_api::experimental::gatewayclasses::GatewayClass;
use gateway_api::experimental::gateways::{Gateway, GatewayStatus};
use gateway_api::experimental::referencegrants::ReferenceGrant;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use portico::gateway::{
    decide_gateways, gateway_endpoint_slices, synthetic_name, with_gateway_backends, with_gateways,
    GatewayDecisions, GatewayWorld, Route, RouteKind, GATEWAY_CONTROLLER,
};
use portico::manifest::parse_text;
use portico::plan::{node_plan, Ipam, NodeIdentity};
use portico::world::World;
use portico_crds::ClassPolicy;
use portico_xdp::{Protocol, ServiceKey};
use serde_json::{json, Value};

const BASE: &str = r#"
apiVersion: portico.io/v1alpha1
kind: AddressPool
metadata: {name: services}
spec:
  blocks: [{cidr: 198.51.100.0/30}]
  serviceSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}
---
apiVersion: portico.io/v1alpha1
kind: AddressPool
metadata: {name: edge}
spec:
  blocks: [{cidr: 203.0.113.0/30}]
  serviceSelector: {matchLabels: {tier: edge}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: LoadBalancer
  loadBalancerClass: portico.io/lb
  ports: [{name: http, port: 80, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  type: ClusterIP
  ports: [{name: app, port: 9000, protocol: TCP}, {name: dns, port: 53, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: backend-1, namespace: shop, labels: {kubernetes.io/service-name: backend}}
addressType: IPv4
ports: [{name: app, port: 9090, protocol: TCP}, {name: dns, port: 5353, protocol: UDP}]
endpoints:
  - {addresses: ["10.1.0.5"], nodeName: n1, conditions: {ready: true}}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: data}
spec:
  type: ClusterIP
  ports: [{name: app, port: 9000, protocol: TCP}]
"#;

fn world() -> World {
    let (events, errors) = parse_text("fixture.yaml", BASE);
    assert!(errors.is_empty(), "{errors:?}");
    let mut w = World::default();
    w.apply_all(events);
    w
}

fn class(name: &str, controller: &str) -> GatewayClass {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
        "metadata": {"name": name, "generation": 1},
        "spec": {"controllerName": controller},
    }))
    .unwrap()
}

fn gateway(name: &str, extra: Value) -> Gateway {
    let mut v = json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": "shop", "generation": 2},
        "spec": {
            "gatewayClassName": "portico",
            "infrastructure": {"labels": {"tier": "edge"}},
            "listeners": [
                {"name": "app", "port": 9000, "protocol": "TCP"},
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "web", "port": 443, "protocol": "HTTPS"},
            ],
        },
    });
    merge(&mut v, extra);
    serde_json::from_value(v).unwrap()
}

fn merge(into: &mut Value, patch: Value) {
    match (into, patch) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k).or_insert(Value::Null), v);
            }
        }
        (slot, v) => *slot = v,
    }
}

fn route(kind: RouteKind, name: &str, ns: &str, parent: Value, backends: Value) -> Route {
    Route::from_json(
        kind,
        &json!({
            "metadata": {"name": name, "namespace": ns, "generation": 1},
            "spec": {"parentRefs": [parent], "rules": [{"backendRefs": backends}]},
        }),
    )
    .unwrap()
}

fn gws(gateways: Vec<Gateway>, routes: Vec<Route>) -> GatewayWorld {
    let mut w = GatewayWorld::default();
    for c in [
        class("portico", GATEWAY_CONTROLLER),
        class("envoy", "example.com/envoy"),
    ] {
        w.classes.insert(c.metadata.name.clone().unwrap(), c);
    }
    for g in gateways {
        w.gateways.insert(
            (
                g.metadata.namespace.clone().unwrap(),
                g.metadata.name.clone().unwrap(),
            ),
            g,
        );
    }
    for r in routes {
        w.routes
            .insert((r.kind, r.namespace.clone(), r.name.clone()), r);
    }
    w
}

fn now() -> Time {
    Time(Timestamp::from_second(1_700_000_000).unwrap())
}

fn pass(w: &World, g: &GatewayWorld) -> (portico::plan::IpamOutcome, GatewayDecisions) {
    let full = with_gateways(w, g);
    let mut ipam = Ipam::new(ClassPolicy::default(), BTreeMap::new());
    let outcome = ipam.reconcile(&full, 0);
    let d = decide_gateways(&full, g, &outcome, &now());
    (outcome, d)
}

/// The agent's plan on node n1 once the controller's Gateway statuses are written back.
fn agent_plan(w: &World, g: &mut GatewayWorld, d: &GatewayDecisions) -> portico::plan::NodePlan {
    for (key, status) in &d.gateways {
        g.gateways.get_mut(key).unwrap().status = Some(status.clone());
    }
    let full = with_gateway_backends(w, g);
    let outcome = portico::agent::outcome_from_status(&full, ClassPolicy::default());
    node_plan(
        &full,
        &outcome,
        &NodeIdentity {
            name: "n1".into(),
            labels: BTreeMap::new(),
            router_id: Some("192.0.2.10".parse().unwrap()),
        },
    )
}

fn status_of<'a>(d: &'a GatewayDecisions, name: &str) -> &'a GatewayStatus {
    &d.gateways
        .iter()
        .find(|((_, n), _)| n == name)
        .unwrap_or_else(|| panic!("no status for {name}: {d:#?}"))
        .1
}

fn cond<'a>(cs: &'a [Condition], t: &str) -> &'a Condition {
    cs.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn portico_s_gateway_class_is_accepted_and_others_are_left_alone() {
    let (_, d) = pass(&world(), &gws(vec![], vec![]));
    assert_eq!(d.classes.len(), 1);
    assert_eq!(d.classes[0].0, "portico");
    let c = &d.classes[0].1.conditions.as_ref().unwrap()[0];
    assert_eq!((c.type_.as_str(), c.status.as_str()), ("Accepted", "True"));
    assert_eq!(c.observed_generation, Some(1));
}

#[test]
fn a_gateway_gets_an_address_from_the_pool_its_infrastructure_labels_select() {
    let (outcome, d) = pass(&world(), &gws(vec![gateway("edge", json!({}))], vec![]));
    let s = status_of(&d, "edge");
    let addrs = s.addresses.as_ref().unwrap();
    assert_eq!(addrs.len(), 1);
    assert_eq!(addrs[0].r#type.as_deref(), Some("IPAddress"));
    assert_eq!(addrs[0].value, "203.0.113.0");
    let conditions = s.conditions.as_ref().unwrap();
    assert_eq!(cond(conditions, "Accepted").status, "True");
    let programmed = cond(conditions, "Programmed");
    assert_eq!(
        (programmed.status.as_str(), programmed.reason.as_str()),
        ("True", "Programmed")
    );
    assert_eq!(programmed.observed_generation, Some(2));
    // One allocator: the Service got its address from the other pool.
    assert_eq!(
        outcome.services[&("shop".to_owned(), "web".to_owned())].addresses,
        vec!["198.51.100.0".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn gateways_of_another_controller_get_nothing() {
    let mut g = gateway("theirs", json!({}));
    g.spec.gateway_class_name = "envoy".into();
    let (outcome, d) = pass(&world(), &gws(vec![g], vec![]));
    assert!(d.gateways.is_empty());
    assert!(!outcome
        .services
        .contains_key(&("shop".to_owned(), synthetic_name("theirs"))));
}

#[test]
fn a_requested_address_inside_a_pool_is_honoured_and_one_outside_is_not_usable() {
    let inside = gateway(
        "a",
        json!({"spec": {"addresses": [{"type": "IPAddress", "value": "203.0.113.2"}]}}),
    );
    let outside = gateway(
        "b",
        json!({"spec": {"addresses": [{"value": "192.0.2.9"}]}}),
    );
    let (_, d) = pass(&world(), &gws(vec![inside, outside], vec![]));
    assert_eq!(
        status_of(&d, "a").addresses.as_ref().unwrap()[0].value,
        "203.0.113.2"
    );
    let b = status_of(&d, "b");
    assert!(b.addresses.as_ref().unwrap().is_empty());
    let p = cond(b.conditions.as_ref().unwrap(), "Programmed");
    assert_eq!(
        (p.status.as_str(), p.reason.as_str()),
        ("False", "AddressNotUsable")
    );
    assert!(p.message.contains("192.0.2.9"), "{}", p.message);
}

#[test]
fn an_exhausted_pool_leaves_the_gateway_without_an_address_assigned() {
    let gateways = (0..5)
        .map(|i| gateway(&format!("g{i}"), json!({})))
        .collect();
    let (_, d) = pass(&world(), &gws(gateways, vec![]));
    let p = cond(
        status_of(&d, "g4").conditions.as_ref().unwrap(),
        "Programmed",
    );
    assert_eq!(
        (p.status.as_str(), p.reason.as_str()),
        ("False", "AddressNotAssigned")
    );
}

#[test]
fn address_types_other_than_ip_address_are_unsupported() {
    let g = gateway(
        "named",
        json!({"spec": {"addresses": [{"type": "Hostname", "value": "lb.example"}]}}),
    );
    let (outcome, d) = pass(&world(), &gws(vec![g], vec![]));
    let s = status_of(&d, "named");
    let a = cond(s.conditions.as_ref().unwrap(), "Accepted");
    assert_eq!(
        (a.status.as_str(), a.reason.as_str()),
        ("False", "UnsupportedAddress")
    );
    assert!(!outcome
        .services
        .contains_key(&("shop".to_owned(), synthetic_name("named"))));
}

#[test]
fn tcp_and_udp_listeners_are_served_and_https_is_reported_unsupported() {
    let (_, d) = pass(&world(), &gws(vec![gateway("edge", json!({}))], vec![]));
    let listeners = status_of(&d, "edge").listeners.as_ref().unwrap();
    let by_name = |n: &str| listeners.iter().find(|l| l.name == n).unwrap();
    let app = by_name("app");
    assert_eq!(app.supported_kinds.as_ref().unwrap()[0].kind, "TCPRoute");
    assert_eq!(cond(&app.conditions, "Accepted").status, "True");
    assert_eq!(cond(&app.conditions, "Programmed").status, "True");
    assert_eq!(
        by_name("dns").supported_kinds.as_ref().unwrap()[0].kind,
        "UDPRoute"
    );
    let web = by_name("web");
    let a = cond(&web.conditions, "Accepted");
    assert_eq!(
        (a.status.as_str(), a.reason.as_str()),
        ("False", "UnsupportedProtocol")
    );
    assert!(web.supported_kinds.as_ref().unwrap().is_empty());
}

fn parent(section: Option<&str>) -> Value {
    match section {
        Some(s) => json!({"name": "edge", "sectionName": s}),
        None => json!({"name": "edge"}),
    }
}

fn route_conditions(d: &GatewayDecisions, name: &str) -> Vec<Condition> {
    let parents = &d.routes.iter().find(|((_, _, n), _)| n == name).unwrap().1;
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == GATEWAY_CONTROLLER)
        .unwrap();
    serde_json::from_value(ours["conditions"].clone()).unwrap()
}

#[test]
fn routes_attach_to_listeners_of_their_kind_and_are_counted() {
    let tcp = route(
        RouteKind::Tcp,
        "app",
        "shop",
        parent(None),
        json!([{"name": "backend", "port": 9000}]),
    );
    let udp = route(
        RouteKind::Udp,
        "dns",
        "shop",
        parent(Some("dns")),
        json!([{"name": "backend", "port": 53}]),
    );
    let wrong = route(
        RouteKind::Udp,
        "wrong",
        "shop",
        parent(Some("app")),
        json!([{"name": "backend", "port": 53}]),
    );
    let (_, d) = pass(
        &world(),
        &gws(vec![gateway("edge", json!({}))], vec![tcp, udp, wrong]),
    );
    let listeners = status_of(&d, "edge").listeners.as_ref().unwrap();
    let attached = |n: &str| {
        listeners
            .iter()
            .find(|l| l.name == n)
            .unwrap()
            .attached_routes
    };
    assert_eq!(
        (attached("app"), attached("dns"), attached("web")),
        (1, 1, 0)
    );
    let a = route_conditions(&d, "app");
    assert_eq!(cond(&a, "Accepted").status, "True");
    assert_eq!(cond(&a, "ResolvedRefs").status, "True");
    let w = route_conditions(&d, "wrong");
    let acc = cond(&w, "Accepted");
    assert_eq!(
        (acc.status.as_str(), acc.reason.as_str()),
        ("False", "NotAllowedByListeners")
    );
}

#[test]
fn a_route_from_another_namespace_attaches_only_where_listeners_allow_it() {
    let r = route(
        RouteKind::Tcp,
        "far",
        "data",
        json!({"name": "edge", "namespace": "shop"}),
        json!([{"name": "other", "port": 9000}]),
    );
    let (_, d) = pass(
        &world(),
        &gws(vec![gateway("edge", json!({}))], vec![r.clone()]),
    );
    assert_eq!(
        cond(&route_conditions(&d, "far"), "Accepted").reason,
        "NotAllowedByListeners"
    );
    let open = gateway(
        "edge",
        json!({"spec": {"listeners": [
            {"name": "app", "port": 9000, "protocol": "TCP", "allowedRoutes": {"namespaces": {"from": "All"}}}
        ]}}),
    );
    let (_, d) = pass(&world(), &gws(vec![open], vec![r]));
    assert_eq!(
        cond(&route_conditions(&d, "far"), "Accepted").status,
        "True"
    );
}

#[test]
fn a_cross_namespace_backend_needs_a_reference_grant() {
    let r = route(
        RouteKind::Tcp,
        "app",
        "shop",
        parent(None),
        json!([{"name": "other", "namespace": "data", "port": 9000}]),
    );
    let g = gws(vec![gateway("edge", json!({}))], vec![r]);
    let (_, d) = pass(&world(), &g);
    let refs = cond(&route_conditions(&d, "app"), "ResolvedRefs").clone();
    assert_eq!(
        (refs.status.as_str(), refs.reason.as_str()),
        ("False", "RefNotPermitted")
    );
    let mut granted = g.clone();
    let grant: ReferenceGrant = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "ReferenceGrant",
        "metadata": {"name": "from-shop", "namespace": "data"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "TCPRoute", "namespace": "shop"}],
                 "to": [{"group": "", "kind": "Service"}]},
    }))
    .unwrap();
    granted
        .grants
        .insert(("data".into(), "from-shop".into()), grant);
    let (_, d) = pass(&world(), &granted);
    assert_eq!(
        cond(&route_conditions(&d, "app"), "ResolvedRefs").status,
        "True"
    );
}

#[test]
fn a_missing_backend_is_reported_and_other_controllers_entries_are_kept() {
    let mut r = route(
        RouteKind::Tcp,
        "app",
        "shop",
        parent(None),
        json!([{"name": "nope", "port": 9000}]),
    );
    let theirs = json!({"parentRef": {"name": "elsewhere"}, "controllerName": "example.com/envoy", "conditions": []});
    r.status_parents = vec![theirs.clone()];
    let (_, d) = pass(&world(), &gws(vec![gateway("edge", json!({}))], vec![r]));
    let parents = &d.routes[0].1;
    assert_eq!(parents[0], theirs);
    assert_eq!(
        cond(&route_conditions(&d, "app"), "ResolvedRefs").reason,
        "BackendNotFound"
    );
}

#[test]
fn statuses_already_written_are_not_written_again() {
    let tcp = route(
        RouteKind::Tcp,
        "app",
        "shop",
        parent(None),
        json!([{"name": "backend", "port": 9000}]),
    );
    let mut g = gws(vec![gateway("edge", json!({}))], vec![tcp]);
    let (_, d) = pass(&world(), &g);
    for (name, status) in &d.classes {
        g.classes.get_mut(name).unwrap().status = Some(status.clone());
    }
    for (key, status) in &d.gateways {
        g.gateways.get_mut(key).unwrap().status = Some(status.clone());
    }
    for (key, parents) in &d.routes {
        let r = g.routes.get_mut(key).unwrap();
        r.status_parents = serde_json::from_value(serde_json::to_value(parents).unwrap()).unwrap();
    }
    // A new leader restores the Gateway's address from its status, and nothing changes.
    let (_, again) = pass(&world(), &g);
    assert!(again.is_empty(), "{again:#?}");
}

#[test]
fn the_agent_balances_gateway_listeners_to_the_routes_backends_on_their_target_ports() {
    let tcp = route(
        RouteKind::Tcp,
        "app",
        "shop",
        parent(None),
        json!([{"name": "backend", "port": 9000}]),
    );
    let udp = route(
        RouteKind::Udp,
        "dns",
        "shop",
        parent(Some("dns")),
        json!([{"name": "backend", "port": 53, "weight": 0}]),
    );
    let mut g = gws(vec![gateway("edge", json!({}))], vec![tcp, udp]);
    // The controller wrote the address; the agent reads it from the Gateway's status.
    let (_, d) = pass(&world(), &g);
    for (key, status) in &d.gateways {
        g.gateways.get_mut(key).unwrap().status = Some(status.clone());
    }
    let full = with_gateway_backends(&world(), &g);
    assert_eq!(
        gateway_endpoint_slices(&world(), &g).len(),
        1,
        "weight 0 contributes nothing"
    );
    let outcome = portico::agent::outcome_from_status(&full, ClassPolicy::default());
    let plan = node_plan(
        &full,
        &outcome,
        &NodeIdentity {
            name: "n1".into(),
            labels: BTreeMap::new(),
            router_id: Some("192.0.2.10".parse().unwrap()),
        },
    );
    let vip: IpAddr = "203.0.113.0".parse().unwrap();
    let app = &plan.services[&ServiceKey {
        vip,
        port: 9000,
        proto: Protocol::Tcp,
    }];
    assert_eq!(app.backends.len(), 1);
    assert_eq!(app.backends[0].addr, "10.1.0.5".parse::<IpAddr>().unwrap());
    assert_eq!(
        app.backends[0].port, 9090,
        "the backend Service's target port"
    );
    let dns = &plan.services[&ServiceKey {
        vip,
        port: 53,
        proto: Protocol::Udp,
    }];
    assert!(dns.backends.is_empty());
    assert!(
        !plan.services.keys().any(|k| k.port == 443),
        "HTTPS is not served"
    );
}

#[test]
fn a_gateway_shares_an_address_with_a_service_through_the_sharing_key() {
    let mut w = world();
    let mut web = w.services[&("shop".to_owned(), "web".to_owned())].clone();
    web.metadata.annotations = Some(BTreeMap::from([(
        "portico.io/sharing-key".to_owned(),
        "front".to_owned(),
    )]));
    web.metadata.labels = Some(BTreeMap::from([("tier".to_owned(), "edge".to_owned())]));
    w.services.insert(("shop".into(), "web".into()), web);
    let g = gateway(
        "edge",
        json!({"spec": {"infrastructure": {"annotations": {"portico.io/sharing-key": "front"}}}}),
    );
    let (outcome, d) = pass(&w, &gws(vec![g], vec![]));
    let svc = &outcome.services[&("shop".to_owned(), "web".to_owned())].addresses;
    assert_eq!(
        status_of(&d, "edge").addresses.as_ref().unwrap()[0].value,
        svc[0].to_string(),
        "one address for the Service on :80 and the Gateway on :9000 and :53"
    );
}

#[test]
fn backend_ref_weights_become_maglev_weights_per_endpoint() {
    // backend (1 endpoint) weight 3, spare (2 endpoints) weight 1: 6:1:1 per endpoint.
    let extra = r#"
---
apiVersion: v1
kind: Service
metadata: {name: spare, namespace: shop}
spec:
  type: ClusterIP
  ports: [{name: app, port: 9000, protocol: TCP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: spare-1, namespace: shop, labels: {kubernetes.io/service-name: spare}}
addressType: IPv4
ports: [{name: app, port: 7000, protocol: TCP}]
endpoints:
  - {addresses: ["10.2.0.1"], nodeName: n1, conditions: {ready: true}}
  - {addresses: ["10.2.0.2"], nodeName: n2, conditions: {ready: true}}
"#;
    let mut w = world();
    w.apply_all(parse_text("extra.yaml", extra).0);
    let r = route(
        RouteKind::Tcp,
        "app",
        "shop",
        parent(Some("app")),
        json!([{"name": "backend", "port": 9000, "weight": 3}, {"name": "spare", "port": 9000, "weight": 1}]),
    );
    let mut g = gws(vec![gateway("edge", json!({}))], vec![r]);
    let (_, d) = pass(&w, &g);
    for (key, status) in &d.gateways {
        g.gateways.get_mut(key).unwrap().status = Some(status.clone());
    }
    let full = with_gateway_backends(&w, &g);
    let outcome = portico::agent::outcome_from_status(&full, ClassPolicy::default());
    let mut plan = node_plan(
        &full,
        &outcome,
        &NodeIdentity {
            name: "n1".into(),
            labels: BTreeMap::new(),
            router_id: Some("192.0.2.10".parse().unwrap()),
        },
    );
    portico::gateway::apply_backend_weights(&mut plan, &full, &g, &outcome);
    let spec = &plan.services[&ServiceKey {
        vip: "203.0.113.0".parse().unwrap(),
        port: 9000,
        proto: Protocol::Tcp,
    }];
    let weight = |a: &str| {
        spec.backends
            .iter()
            .find(|b| b.addr == a.parse::<IpAddr>().unwrap())
            .unwrap()
            .weight
    };
    assert_eq!(weight("10.1.0.5"), 6 * weight("10.2.0.1"));
    assert_eq!(weight("10.2.0.1"), weight("10.2.0.2"));
    assert!(weight("10.2.0.1") > 0);
}

#[test]
fn a_listener_admits_routes_from_namespaces_its_selector_matches() {
    let mut w = world();
    w.apply_all(
        parse_text(
            "ns.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: data, labels: {team: data, env: prod}}\n",
        )
        .0,
    );
    let r = route(
        RouteKind::Tcp,
        "far",
        "data",
        json!({"name": "edge", "namespace": "shop"}),
        json!([{"name": "other", "port": 9000}]),
    );
    let listener = |selector: Value| {
        gateway(
            "edge",
            json!({"spec": {"listeners": [
                {"name": "app", "port": 9000, "protocol": "TCP",
                 "allowedRoutes": {"namespaces": {"from": "Selector", "selector": selector}}}
            ]}}),
        )
    };
    let accepted = |selector: Value| {
        let (_, d) = pass(&w, &gws(vec![listener(selector)], vec![r.clone()]));
        cond(&route_conditions(&d, "far"), "Accepted")
            .status
            .clone()
    };
    assert_eq!(accepted(json!({"matchLabels": {"team": "data"}})), "True");
    assert_eq!(
        accepted(
            json!({"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "stage"]}]})
        ),
        "True"
    );
    assert_eq!(
        accepted(
            json!({"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["prod"]}]})
        ),
        "False"
    );
    assert_eq!(accepted(json!({"matchLabels": {"team": "web"}})), "False");
}

#[test]
fn two_listeners_on_one_port_and_transport_are_conflicted_and_take_no_routes() {
    let g = gateway(
        "edge",
        json!({"spec": {"listeners": [
            {"name": "a", "port": 9000, "protocol": "TCP"},
            {"name": "b", "port": 9000, "protocol": "TCP"},
            {"name": "u", "port": 9000, "protocol": "UDP"},
        ]}}),
    );
    let r = route(
        RouteKind::Tcp,
        "app",
        "shop",
        parent(None),
        json!([{"name": "backend", "port": 9000}]),
    );
    let (_, d) = pass(&world(), &gws(vec![g], vec![r]));
    let listeners = status_of(&d, "edge").listeners.clone().unwrap();
    for name in ["a", "b"] {
        let l = listeners.iter().find(|l| l.name == name).unwrap();
        let c = cond(&l.conditions, "Conflicted");
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "ProtocolConflict")
        );
        assert_eq!(cond(&l.conditions, "Programmed").status, "False");
        assert_eq!(l.attached_routes, 0);
    }
    let u = listeners.iter().find(|l| l.name == "u").unwrap();
    assert_eq!(
        cond(&u.conditions, "Conflicted").status,
        "False",
        "UDP on 9000 is fine"
    );
    assert_eq!(
        cond(&route_conditions(&d, "app"), "Accepted").reason,
        "NotAllowedByListeners"
    );
}

#[test]
fn an_sctp_listener_is_balanced_as_sctp_to_the_routes_backends() {
    let mut w = world();
    let (events, errors) = parse_text(
        "diameter.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: diameter, namespace: shop}
spec:
  type: ClusterIP
  ports: [{name: diam, port: 3868, protocol: SCTP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: diameter-1, namespace: shop, labels: {kubernetes.io/service-name: diameter}}
addressType: IPv4
ports: [{name: diam, port: 3869, protocol: SCTP}]
endpoints:
  - {addresses: ["10.1.0.6"], nodeName: n1, conditions: {ready: true}}
"#,
    );
    assert!(errors.is_empty(), "{errors:?}");
    w.apply_all(events);
    // SCTP listeners take TCPRoutes (there is no SCTPRoute).
    let sctp = route(
        RouteKind::Tcp,
        "diameter",
        "shop",
        parent(Some("diam")),
        json!([{"name": "diameter", "port": 3868}]),
    );
    let edge = gateway(
        "edge",
        json!({"spec": {"listeners": [{"name": "diam", "port": 3868, "protocol": "portico.io/SCTP"}]}}),
    );
    let mut g = gws(vec![edge], vec![sctp]);
    let (_, d) = pass(&w, &g);
    let status = status_of(&d, "edge");
    let listener = &status.listeners.as_ref().unwrap()[0];
    assert_eq!(listener.attached_routes, 1, "{listener:?}");
    assert_eq!(cond(&listener.conditions, "Programmed").status, "True");
    let plan = agent_plan(&w, &mut g, &d);
    let vip: IpAddr = "203.0.113.0".parse().unwrap();
    let diam = &plan.services[&ServiceKey {
        vip,
        port: 3868,
        proto: Protocol::Sctp,
    }];
    assert_eq!(diam.backends.len(), 1, "{diam:?}");
    assert_eq!(diam.backends[0].addr, "10.1.0.6".parse::<IpAddr>().unwrap());
    assert_eq!(
        diam.backends[0].port, 3869,
        "the backend Service's target port"
    );
    assert!(
        !plan
            .services
            .keys()
            .any(|k| k.port == 3868 && k.proto != Protocol::Sctp),
        "served as SCTP only"
    );
}

#[test]
fn an_ipv6_gateway_routes_to_ipv4_backends_through_nat64() {
    let mut w = world();
    let (events, errors) = parse_text(
        "edge6.yaml",
        r#"
apiVersion: portico.io/v1alpha1
kind: AddressPool
metadata: {name: edge6}
spec:
  blocks: [{cidr: "2001:db8:e::/126"}]
  serviceSelector: {matchLabels: {tier: edge}}
"#,
    );
    assert!(errors.is_empty(), "{errors:?}");
    w.apply_all(events);
    let tcp = route(
        RouteKind::Tcp,
        "app",
        "shop",
        parent(Some("app")),
        json!([{"name": "backend", "port": 9000}]),
    );
    let edge = gateway(
        "edge",
        json!({"spec": {"addresses": [{"type": "IPAddress", "value": "2001:db8:e::1"}]}}),
    );
    let mut g = gws(vec![edge], vec![tcp]);
    let (_, d) = pass(&w, &g);
    let plan = agent_plan(&w, &mut g, &d);
    let vip: IpAddr = "2001:db8:e::1".parse().unwrap();
    let app = &plan.services[&ServiceKey {
        vip,
        port: 9000,
        proto: Protocol::Tcp,
    }];
    // The backend Service has IPv4 endpoints only: the IPv6 listener reaches them (NAT64).
    assert_eq!(app.backends.len(), 1, "{app:?}");
    assert_eq!(app.backends[0].addr, "10.1.0.5".parse::<IpAddr>().unwrap());
    assert_eq!(app.backends[0].port, 9090);
}
