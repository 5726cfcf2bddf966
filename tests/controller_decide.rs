//! Layer 1 of the controller's tests: pure reconcile decisions. Objects in (a world written
//! as the manifests a user writes, status included), status writes, conditions and Events
//! out; leadership and failover as plain calls.

use std::net::IpAddr;

use k8s_openapi::api::core::v1::{LoadBalancerStatus, ServiceStatus as KubeServiceStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use portico::controller::decide::{
    allocations_in_status, decide, Allocating, Decisions, EventType, ALLOCATION_FAILED,
    IP_ALLOCATED,
};
use portico::manifest::parse_text;
use portico::plan::Ipam;
use portico::world::World;
use portico_crds::{ClassPolicy, ALLOCATED_CONDITION};

const POOL: &str = r#"
apiVersion: portico.io/v1alpha1
kind: AddressPool
metadata: {name: public, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  blocks: [{cidr: 198.51.100.0/30}, {cidr: "2001:db8:100::/126"}]
"#;

fn service(name: &str, extra: &str) -> String {
    format!(
        r#"
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop, resourceVersion: "1", generation: 1}}
spec:
  type: LoadBalancer
  loadBalancerClass: portico.io/lb
  ports: [{{name: http, port: 80, protocol: TCP}}]
{extra}
"#
    )
}

fn with_status(name: &str, ips: &[&str]) -> String {
    let ingress: Vec<String> = ips
        .iter()
        .map(|ip| format!("{{ip: \"{ip}\", ipMode: VIP}}"))
        .collect();
    service(
        name,
        &format!(
            "status: {{loadBalancer: {{ingress: [{}]}}}}",
            ingress.join(", ")
        ),
    )
}

fn world(text: &str) -> World {
    let (events, errors) = parse_text("fixture.yaml", text);
    assert!(errors.is_empty(), "fixture does not parse: {errors:?}");
    let mut w = World::default();
    w.apply_all(events);
    w
}

fn at(secs: i64) -> Time {
    Time(Timestamp::from_second(1_700_000_000 + secs).unwrap())
}

fn class() -> ClassPolicy {
    ClassPolicy::default()
}

/// One leader pass over a fresh allocator restored from the world's statuses.
fn leader_pass(w: &World, now: i64) -> Decisions {
    let mut a = Allocating::new(class());
    a.pass(w, true, true, 0, &at(now)).unwrap().1
}

/// What the API server does with the writes: the statuses land on the objects.
fn echo(w: &mut World, d: &Decisions) {
    for s in &d.services {
        let svc = w
            .services
            .get_mut(&(s.namespace.clone(), s.name.clone()))
            .unwrap();
        let status = svc.status.get_or_insert_with(KubeServiceStatus::default);
        status.load_balancer = Some(LoadBalancerStatus {
            ingress: Some(s.status.ingress.clone()),
        });
        let mut conditions: Vec<_> = status
            .conditions
            .take()
            .unwrap_or_default()
            .into_iter()
            .filter(|c| !c.type_.starts_with("portico.io/"))
            .collect();
        conditions.extend(s.status.conditions.clone());
        status.conditions = Some(conditions);
    }
    for p in &d.pools {
        w.pools.get_mut(&p.name).unwrap().status = Some(p.status.clone());
    }
}

fn ips_of(d: &Decisions, name: &str) -> Vec<IpAddr> {
    d.services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no write for {name}: {d:#?}"))
        .status
        .ingress
        .iter()
        .map(|i| i.ip.as_deref().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn a_new_service_gets_its_address_in_status_the_allocated_condition_and_an_ip_allocated_event() {
    let w = world(&format!("{POOL}{}", service("web", "")));
    let d = leader_pass(&w, 0);
    let write = &d.services[0];
    assert_eq!(
        (write.namespace.as_str(), write.name.as_str()),
        ("shop", "web")
    );
    assert_eq!(
        ips_of(&d, "web"),
        vec!["198.51.100.0".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(write.status.ingress[0].ip_mode.as_deref(), Some("VIP"));
    let c = &write.status.conditions[0];
    assert_eq!(
        (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
        (ALLOCATED_CONDITION, "True", "Allocated")
    );
    assert_eq!(c.message, "198.51.100.0 from pool public");
    assert_eq!(c.observed_generation, Some(1));
    assert_eq!(write.events.len(), 1);
    assert_eq!(write.events[0].reason, IP_ALLOCATED);
    assert_eq!(write.events[0].type_, EventType::Normal);
    assert_eq!(
        write.events[0].note,
        "Assigned 198.51.100.0 from pool public"
    );
}

#[test]
fn three_unchanged_services_cause_no_write_once_their_status_says_it_all() {
    let mut w = world(&format!(
        "{POOL}{}{}{}",
        service("a", ""),
        service("b", ""),
        service("c", "")
    ));
    let mut alloc = Allocating::new(class());
    let (_, first) = alloc.pass(&w, true, true, 0, &at(0)).unwrap();
    assert_eq!(first.services.len(), 3);
    assert_eq!(first.pools.len(), 1);
    echo(&mut w, &first);
    for t in 1..5 {
        let (_, again) = alloc.pass(&w, true, true, t, &at(t as i64)).unwrap();
        assert!(again.is_empty(), "pass {t} writes again: {again:#?}");
    }
}

#[test]
fn an_exhausted_pool_gives_a_false_condition_with_the_allocator_reason_and_a_warning() {
    let mut text = POOL.to_owned();
    for n in ["a", "b", "c", "d", "e"] {
        text.push_str(&service(n, ""));
    }
    let d = leader_pass(&world(&text), 0);
    let e = d.services.iter().find(|s| s.name == "e").unwrap();
    assert!(e.status.ingress.is_empty());
    let c = &e.status.conditions[0];
    assert_eq!(
        (c.type_.as_str(), c.status.as_str(), c.reason.as_str()),
        (ALLOCATED_CONDITION, "False", "PoolExhausted")
    );
    assert!(c.message.contains("public"), "{}", c.message);
    assert_eq!(e.events.len(), 1);
    assert_eq!(e.events[0].type_, EventType::Warning);
    assert_eq!(e.events[0].reason, ALLOCATION_FAILED);
    assert!(
        e.events[0].note.starts_with("PoolExhausted: "),
        "{}",
        e.events[0].note
    );
}

#[test]
fn a_failure_that_stays_the_same_is_not_reported_again_and_keeps_its_transition_time() {
    let mut text = POOL.to_owned();
    for n in ["a", "b", "c", "d", "e"] {
        text.push_str(&service(n, ""));
    }
    let mut w = world(&text);
    let mut alloc = Allocating::new(class());
    let (_, first) = alloc.pass(&w, true, true, 0, &at(0)).unwrap();
    echo(&mut w, &first);
    let (_, later) = alloc.pass(&w, true, true, 60, &at(60)).unwrap();
    assert!(later.is_empty(), "{later:#?}");
    let svc = &w.services[&("shop".to_owned(), "e".to_owned())];
    let c = &svc.status.as_ref().unwrap().conditions.as_ref().unwrap()[0];
    assert_eq!(c.last_transition_time, at(0));
}

#[test]
fn a_new_leader_restores_addresses_from_status_before_it_allocates() {
    // web holds .0 and .1 is held by api (from status); a new Service must get .2, not
    // an address that a Service listed later already shows.
    let text = format!(
        "{POOL}{}{}{}",
        with_status("web", &["198.51.100.0"]),
        service("new", ""),
        with_status("api", &["198.51.100.1"]),
    );
    let w = world(&text);
    assert_eq!(allocations_in_status(&w, class()).len(), 2);
    let d = leader_pass(&w, 0);
    assert_eq!(
        ips_of(&d, "new"),
        vec!["198.51.100.2".parse::<IpAddr>().unwrap()]
    );
    // The restored ones keep their addresses; they only gain the condition.
    assert_eq!(
        ips_of(&d, "web"),
        vec!["198.51.100.0".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        ips_of(&d, "api"),
        vec!["198.51.100.1".parse::<IpAddr>().unwrap()]
    );
    let web = d.services.iter().find(|s| s.name == "web").unwrap();
    assert!(
        web.events.is_empty(),
        "a restored address is not news: {:?}",
        web.events
    );
}

#[test]
fn an_allocator_without_the_statuses_would_hand_an_address_out_twice() {
    // The reason for restore-then-allocate: the same world through an allocator that
    // did not restore gives "new" the address "web" holds.
    let w = world(&format!(
        "{POOL}{}{}",
        service("new", ""),
        with_status("web", &["198.51.100.0"])
    ));
    let mut naive = Ipam::new(class(), Default::default());
    let outcome = naive.reconcile(&w, 0);
    let d = decide(&w, &outcome, class(), &at(0));
    let web_holds: IpAddr = "198.51.100.0".parse().unwrap();
    assert_eq!(ips_of(&d, "new"), vec![web_holds]);
    assert_eq!(
        ips_of(&leader_pass(&w, 0), "new"),
        vec!["198.51.100.1".parse::<IpAddr>().unwrap()]
    );
}

#[test]
fn a_follower_decides_nothing_and_nothing_is_allocated_before_every_watcher_has_listed() {
    let w = world(&format!("{POOL}{}", service("web", "")));
    let mut a = Allocating::new(class());
    assert!(a.pass(&w, false, true, 0, &at(0)).is_none());
    assert!(a.pass(&w, true, false, 0, &at(0)).is_none());
    assert!(!a.active());
    assert!(a.pass(&w, true, true, 0, &at(0)).is_some());
    assert!(a.active());
    assert!(a.pass(&w, false, true, 0, &at(0)).is_none());
    assert!(!a.active(), "losing the lead forgets the allocator");
}

#[test]
fn failover_hands_no_address_out_twice() {
    let mut w = world(&format!("{POOL}{}", service("one", "")));
    let mut first = Allocating::new(class());
    let mut second = Allocating::new(class());
    let (_, d) = first.pass(&w, true, true, 0, &at(0)).unwrap();
    echo(&mut w, &d);
    // The first leader goes away; while the second takes over a Service is created.
    assert!(first.pass(&w, false, true, 1, &at(1)).is_none());
    w.apply_all(parse_text("more.yaml", &service("two", "")).0);
    assert!(second.pass(&w, false, true, 1, &at(1)).is_none());
    let (_, d) = second.pass(&w, true, true, 20, &at(20)).unwrap();
    echo(&mut w, &d);
    let one = allocations_in_status(&w, class());
    assert_eq!(
        one["shop/one"],
        vec!["198.51.100.0".parse::<IpAddr>().unwrap()]
    );
    assert_eq!(
        one["shop/two"],
        vec!["198.51.100.1".parse::<IpAddr>().unwrap()]
    );
    // And back again: the first restores both.
    let (_, d) = first.pass(&w, true, true, 40, &at(40)).unwrap();
    assert!(d.services.is_empty(), "{d:#?}");
}

#[test]
fn pool_edit_keeps_addresses_still_inside_the_pool() {
    let mut w = world(&format!("{POOL}{}{}", service("a", ""), service("b", "")));
    let mut alloc = Allocating::new(class());
    let (_, d) = alloc.pass(&w, true, true, 0, &at(0)).unwrap();
    echo(&mut w, &d);
    let before = allocations_in_status(&w, class());
    // Grow the pool: nothing moves.
    let grown = POOL.replace("198.51.100.0/30", "198.51.100.0/29");
    w.apply_all(parse_text("pool.yaml", &grown).0);
    let (_, d) = alloc.pass(&w, true, true, 10, &at(10)).unwrap();
    assert!(d.services.is_empty(), "{d:#?}");
    assert_eq!(d.pools.len(), 1, "the counts change");
    echo(&mut w, &d);
    assert_eq!(allocations_in_status(&w, class()), before);
}

#[test]
fn pool_status_counts_addresses_per_family() {
    let d = leader_pass(&world(&format!("{POOL}{}", service("a", ""))), 0);
    let p = &d.pools[0];
    assert_eq!(p.name, "public");
    let v4 = p.status.ipv4.as_ref().unwrap();
    assert_eq!(
        (v4.total.as_str(), v4.used.as_str(), v4.available.as_str()),
        ("4", "1", "3")
    );
    let v6 = p.status.ipv6.as_ref().unwrap();
    assert_eq!((v6.total.as_str(), v6.used.as_str()), ("4", "0"));
    assert_eq!(p.status.total, "8");
    let ready = &p.status.conditions[0];
    assert_eq!(
        (ready.type_.as_str(), ready.status.as_str()),
        ("Ready", "True")
    );
}

#[test]
fn an_overlapping_pool_reports_a_conflict_naming_the_older_pool() {
    let newer = r#"
---
apiVersion: portico.io/v1alpha1
kind: AddressPool
metadata: {name: later, creationTimestamp: "2024-06-01T00:00:00Z"}
spec:
  blocks: [{cidr: 198.51.100.0/31}]
"#;
    let d = leader_pass(&world(&format!("{POOL}{newer}")), 0);
    let later = d.pools.iter().find(|p| p.name == "later").unwrap();
    let types: Vec<(&str, &str)> = later
        .status
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c.status.as_str()))
        .collect();
    assert_eq!(types, vec![("Ready", "False"), ("Conflict", "True")]);
    assert!(later.status.conditions[1].message.contains("public"));
}

#[test]
fn an_invalid_pool_reports_invalid_spec_with_field_and_value() {
    let bad = POOL.replace("198.51.100.0/30", "198.51.100.0/33");
    let d = leader_pass(&world(&bad), 0);
    let c = &d.pools[0].status.conditions[0];
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(c.message.contains("198.51.100.0/33"), "{}", c.message);
}

#[test]
fn a_service_portico_no_longer_serves_has_portico_s_status_released() {
    let mut w = world(&format!("{POOL}{}", service("web", "")));
    let (_, d) = Allocating::new(class())
        .pass(&w, true, true, 0, &at(0))
        .unwrap();
    echo(&mut w, &d);
    let other = service("web", "").replace("portico.io/lb", "example.com/other");
    w.apply_all(parse_text("svc.yaml", &other).0);
    // Keep the status the object had (the source replaced the whole object).
    echo(&mut w, &d);
    let d = leader_pass(&w, 5);
    assert_eq!(d.services.len(), 1);
    assert!(d.services[0].status.ingress.is_empty());
    assert!(d.services[0].status.conditions.is_empty());
}

#[test]
fn services_of_other_classes_are_left_alone() {
    let other = service("web", "").replace("portico.io/lb", "example.com/other");
    let w = world(&format!("{POOL}{other}"));
    let d = leader_pass(&w, 0);
    assert!(d.services.is_empty());
}
