//! The cases of issue 14: edits that must not take a working address away, sharing rules,
//! and the behaviours people migrating from MetalLB or Cilium LB-IPAM rely on. Each test
//! names the MetalLB or Cilium behaviour it matches, or the difference it documents.

use std::net::IpAddr;

use portico_ipam::{
    Allocator, Consumer, CrossNamespace, LabelSelector, Notice, Operator, Pool, Protocol,
    TrafficPolicy, Unsatisfied, SERVICE_NAMESPACE_LABEL, SERVICE_NAME_LABEL,
    SHARING_CROSS_NAMESPACE,
};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn pool(name: &str, blocks: &[&str]) -> Pool {
    Pool::from_blocks(name, blocks).unwrap()
}

fn svc(name: &str) -> Consumer {
    Consumer::service("default", name)
}

fn held(a: &Allocator, c: &Consumer) -> Vec<IpAddr> {
    a.allocation(&c.id).map(|x| x.ips()).unwrap_or_default()
}

// ---- never take a working address away ------------------------------------------------

// MetalLB refuses a configuration that would take an assigned address away ("new config
// not compatible with assigned IPs") and keeps the old one; Portico accepts each object as
// it comes and keeps the address for a grace period, which gives the same result for a
// rename whose new pool arrives after the old one is deleted.
#[test]
fn rename_removing_the_old_pool_first_keeps_every_address() {
    let mut a = Allocator::new();
    a.apply_pool(pool("old", &["10.0.0.0/24"]).created(1), 0);
    let x = a.allocate(&svc("x")).unwrap();
    assert!(a.remove_pool("old", 10).is_empty());
    assert_eq!(a.allocate(&svc("x")).unwrap(), x);
    assert_eq!(
        a.notices(&svc("x").id),
        vec![Notice::GracePeriod {
            ip: ip("10.0.0.0"),
            release_at: 70
        }]
    );
    a.apply_pool(pool("new", &["10.0.0.0/24"]).created(2), 20);
    assert_eq!(a.allocate(&svc("x")).unwrap(), x);
    assert!(a.notices(&svc("x").id).is_empty());
    assert_eq!(a.next_deadline(), None);
    assert!(a.handle_timeout(1_000).is_empty());
    assert_eq!(a.pool_status("new").unwrap().v4.used, 1);
}

// The other order: the new pool is applied first and is in conflict with the old one
// until the old one goes (MetalLB and Cilium both keep the address in this order too).
#[test]
fn rename_applying_the_new_pool_first_keeps_every_address() {
    let mut a = Allocator::new();
    a.apply_pool(pool("old", &["10.0.0.0/24"]).created(1), 0);
    let x = a.allocate(&svc("x")).unwrap();
    a.apply_pool(pool("new", &["10.0.0.0/24"]).created(2), 5);
    assert!(a.remove_pool("old", 10).is_empty());
    assert_eq!(a.allocate(&svc("x")).unwrap(), x);
    assert!(a.notices(&svc("x").id).is_empty());
}

// MetalLB's configuration check keeps an address whose block is about to move to another
// pool (it refuses the intermediate configuration); Portico keeps it for the grace period,
// so a split whose shrunk pool arrives first works too.
#[test]
fn split_shrinking_the_old_pool_first_keeps_every_address() {
    let mut a = Allocator::new();
    a.apply_pool(pool("old", &["10.0.0.0/30"]), 0);
    let x = a.allocate(&svc("x").requesting(&[ip("10.0.0.3")])).unwrap();
    a.apply_pool(pool("old", &["10.0.0.0/31"]), 0);
    // Nobody else may take it meanwhile.
    assert!(a.allocate(&svc("y").requesting(&[ip("10.0.0.3")])).is_err());
    a.apply_pool(pool("new", &["10.0.0.2/31"]).created(1), 30);
    assert_eq!(
        a.allocate(&svc("x").requesting(&[ip("10.0.0.3")])).unwrap(),
        x
    );
    assert_eq!(a.next_deadline(), None);
}

#[test]
fn shrink_then_grow_keeps_every_address() {
    let mut a = Allocator::new();
    a.apply_pool(pool("p", &["10.0.0.0/30"]), 0);
    let names = ["a", "b", "c", "d"];
    let before: Vec<_> = names.iter().map(|n| a.allocate(&svc(n)).unwrap()).collect();
    a.apply_pool(pool("p", &["10.0.0.0/31"]), 0);
    for n in names {
        a.allocate(&svc(n)).unwrap();
    }
    a.apply_pool(pool("p", &["10.0.0.0/30"]), 59);
    let after: Vec<_> = names.iter().map(|n| a.allocate(&svc(n)).unwrap()).collect();
    assert_eq!(after, before);
    assert!(a.handle_timeout(1_000).is_empty());
}

#[test]
fn address_in_no_pool_is_released_when_the_grace_period_ends() {
    let mut a = Allocator::new().with_grace_period(30);
    a.apply_pool(pool("old", &["10.0.0.0/24"]), 0);
    a.apply_pool(pool("other", &["10.0.1.0/24"]), 0);
    let x = svc("x");
    a.allocate(&x).unwrap();
    a.remove_pool("old", 100);
    assert_eq!(a.next_deadline(), Some(130));
    assert!(a.handle_timeout(129).is_empty());
    let released = a.handle_timeout(130);
    assert_eq!(released.len(), 1);
    assert_eq!(
        (released[0].consumer.clone(), released[0].ip),
        (x.id.clone(), ip("10.0.0.0"))
    );
    assert!(held(&a, &x).is_empty());
    // Reconciled, it gets an address of a pool that admits it.
    assert_eq!(a.allocate(&x).unwrap().ips(), vec![ip("10.0.1.0")]);
}

#[test]
fn grace_period_zero_releases_at_once_as_before() {
    let mut a = Allocator::new().with_grace_period(0);
    a.apply_pool(pool("old", &["10.0.0.0/24"]), 0);
    a.allocate(&svc("x")).unwrap();
    assert_eq!(a.remove_pool("old", 0).len(), 1);
    assert_eq!(a.next_deadline(), None);
}

#[test]
fn an_address_in_its_grace_period_survives_a_restart() {
    let mut a = Allocator::new();
    a.apply_pool(pool("old", &["10.0.0.0/24"]), 0);
    let x = a.allocate(&svc("x")).unwrap();
    a.remove_pool("old", 0);
    // A fresh allocator that sees the status but not the pool keeps the address, and
    // starts the grace period again from the restart.
    let mut b = Allocator::new();
    assert_eq!(b.restore(&svc("x"), &x.ips(), 500), x.ips());
    assert_eq!(b.allocate(&svc("x")).unwrap(), x);
    assert_eq!(b.next_deadline(), Some(560));
}

// MetalLB keeps a Service's address when its new loadBalancerIP cannot be assigned;
// Portico keeps it too, and says why.
#[test]
fn changing_the_requested_address_to_a_taken_one_keeps_the_current_address() {
    let mut a = Allocator::new();
    a.apply_pool(pool("p", &["10.0.0.0/24"]), 0);
    let holder = svc("holder").requesting(&[ip("10.0.0.9")]);
    a.allocate(&holder).unwrap();
    let x = a.allocate(&svc("x")).unwrap();
    let moving = svc("x").requesting(&[ip("10.0.0.9")]);
    assert_eq!(a.allocate(&moving).unwrap(), x);
    let notices = a.notices(&moving.id);
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].reason(), "RequestPending");
    assert_eq!(
        notices[0],
        Notice::RequestPending {
            requested: vec![ip("10.0.0.9")],
            why: Unsatisfied::RequestedIpTaken {
                ip: ip("10.0.0.9"),
                by: holder.id.clone()
            }
        }
    );
    assert!(notices[0]
        .to_string()
        .starts_with("keeps its current address"));
    assert_eq!(a.pending_requests().collect::<Vec<_>>(), vec![&moving.id]);
    // Once the address is free, the next reconcile moves it.
    a.release(&holder.id);
    assert_eq!(a.allocate(&moving).unwrap().ips(), vec![ip("10.0.0.9")]);
    assert!(a.holders(x.ips()[0]).is_empty());
    assert!(a.notices(&moving.id).is_empty());
    assert_eq!(a.pending_requests().count(), 0);
}

#[test]
fn changing_the_requested_address_to_one_outside_the_pools_keeps_the_current_address() {
    let mut a = Allocator::new();
    a.apply_pool(pool("p", &["10.0.0.0/24"]), 0);
    let x = a.allocate(&svc("x").requesting(&[ip("10.0.0.5")])).unwrap();
    let typo = svc("x").requesting(&[ip("10.0.1.5")]);
    assert_eq!(a.allocate(&typo).unwrap(), x);
    assert!(matches!(
        &a.notices(&typo.id)[..],
        [Notice::RequestPending {
            why: Unsatisfied::RequestedIpOutsidePools { .. },
            ..
        }]
    ));
}

// ---- sharing ---------------------------------------------------------------------------

// MetalLB: Services with externalTrafficPolicy Local share an address only if their
// selectors are equal (the allocator's "backend key").
#[test]
fn local_services_with_different_selectors_do_not_share_as_metallb_backend_key() {
    let mut a = Allocator::new();
    a.apply_pool(pool("p", &["10.0.0.0/24"]), 0);
    let local = |name: &str, app: &str, port: u16| {
        svc(name)
            .sharing("k")
            .with_port(port, Protocol::Tcp)
            .with_traffic_policy(TrafficPolicy::Local)
            .selecting_endpoints("app", app)
    };
    let web = a.allocate(&local("web", "web", 80)).unwrap();
    let api = local("api", "api", 443);
    assert_ne!(a.allocate(&api).unwrap(), web);
    let notices = a.notices(&api.id);
    assert_eq!(notices.len(), 1);
    assert_eq!(notices[0].reason(), "NotShared");
    let Notice::NotShared { key, why } = &notices[0] else {
        panic!("{notices:?}")
    };
    assert_eq!(key, "k");
    assert_eq!(why.reason(), "LocalEndpointsDiffer");
    // Asking for the shared address outright is refused with the same reason.
    let asking = local("asking", "other", 8080).requesting(&web.ips());
    assert_eq!(
        a.allocate(&asking),
        Err(Unsatisfied::LocalEndpointsDiffer {
            ip: web.ips()[0],
            with: svc("web").id
        })
    );
    // Same selector: shared, as in MetalLB.
    let web_tls = local("web-tls", "web", 443);
    assert_eq!(a.allocate(&web_tls).unwrap(), web);
}

// MetalLB's backend key is empty for Cluster Services: their selectors do not matter.
#[test]
fn cluster_services_share_whatever_their_selectors_as_in_metallb() {
    let mut a = Allocator::new();
    a.apply_pool(pool("p", &["10.0.0.0/24"]), 0);
    let x = svc("x")
        .sharing("k")
        .with_port(80, Protocol::Tcp)
        .selecting_endpoints("app", "x");
    let y = svc("y")
        .sharing("k")
        .with_port(81, Protocol::Tcp)
        .selecting_endpoints("app", "y");
    assert_eq!(a.allocate(&x).unwrap(), a.allocate(&y).unwrap());
}

// Cilium: a sharing key is scoped to the namespace unless both Services list each other's
// namespace in lbipam.cilium.io/sharing-cross-namespace. Cilium says nothing when it
// gives separate addresses; Portico says which namespace and which annotation.
#[test]
fn sharing_key_in_another_namespace_without_opt_in_is_explained() {
    let mut a = Allocator::new();
    a.apply_pool(pool("p", &["10.0.0.0/24"]), 0);
    let team_a = Consumer::service("team-a", "dns")
        .sharing("dns")
        .with_port(53, Protocol::Udp);
    let team_b = Consumer::service("team-b", "dns")
        .sharing("dns")
        .with_port(53, Protocol::Tcp);
    let shared = a.allocate(&team_a).unwrap();
    assert_ne!(a.allocate(&team_b).unwrap(), shared);
    let notices = a.notices(&team_b.id);
    let [Notice::NotShared { why, .. }] = &notices[..] else {
        panic!("{notices:?}")
    };
    assert_eq!(why.reason(), "CrossNamespaceSharingNotAllowed");
    let message = notices[0].to_string();
    for needle in ["team-a", "team-b", SHARING_CROSS_NAMESPACE] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from {message}"
        );
    }
    // The other side is told too.
    a.allocate(&team_a).unwrap();
    assert_eq!(a.notices(&team_a.id).len(), 1);
    // With only one side opted in, the message names only what is missing.
    let keen_b = team_b.clone().sharing_across(
        "dns",
        CrossNamespace::Namespaces(["team-a".to_owned()].into()),
    );
    a.allocate(&keen_b).unwrap();
    let message = a.notices(&keen_b.id)[0].to_string();
    assert!(message.contains("\"team-b\""), "{message}");
    assert!(!message.contains("\"team-a\" to"), "{message}");
    // Both opted in: they share, as in Cilium.
    let keen_a = team_a.clone().sharing_across(
        "dns",
        CrossNamespace::Namespaces(["team-b".to_owned()].into()),
    );
    a.allocate(&keen_a).unwrap();
    a.release(&keen_b.id);
    assert_eq!(a.allocate(&keen_b).unwrap(), shared);
    assert!(a.notices(&keen_b.id).is_empty());
}

#[test]
fn requesting_an_address_shared_in_another_namespace_names_the_opt_in() {
    let mut a = Allocator::new();
    a.apply_pool(pool("p", &["10.0.0.0/24"]), 0);
    let x = Consumer::service("a", "x").sharing("k");
    let shared = a.allocate(&x).unwrap();
    let y = Consumer::service("b", "y")
        .sharing("k")
        .requesting(&shared.ips());
    let err = a.allocate(&y).unwrap_err();
    assert_eq!(err.reason(), "CrossNamespaceSharingNotAllowed");
    assert!(err.to_string().contains(SHARING_CROSS_NAMESPACE), "{err}");
}

// ---- migration parity ------------------------------------------------------------------

// MetalLB: pools with a priority are tried first, lowest number first; pools without one
// come last. (Portico breaks ties by name; an explicit 0 is a priority.)
#[test]
fn pools_without_priority_are_tried_last_as_in_metallb() {
    let mut a = Allocator::new();
    a.apply_pool(pool("a-unset", &["10.0.1.0/24"]), 0);
    a.apply_pool(pool("b-five", &["10.0.5.0/24"]).with_priority(5), 0);
    a.apply_pool(pool("c-zero", &["10.0.0.0/32"]).with_priority(0), 0);
    assert_eq!(
        a.pool_names().collect::<Vec<_>>(),
        vec!["c-zero", "b-five", "a-unset"]
    );
    assert_eq!(a.allocate(&svc("x")).unwrap().ips(), vec![ip("10.0.0.0")]);
    assert_eq!(a.allocate(&svc("y")).unwrap().ips(), vec![ip("10.0.5.0")]);
}

// Cilium: serviceSelector sees io.kubernetes.service.namespace and
// io.kubernetes.service.name, valued with the Service's namespace and name.
#[test]
fn cilium_virtual_namespace_label_selects_the_services_namespace() {
    let mut a = Allocator::new();
    a.apply_pool(
        pool("tenant", &["10.0.0.0/24"])
            .selecting(LabelSelector::everything().with_label(SERVICE_NAMESPACE_LABEL, "tenant-a")),
        0,
    );
    assert!(a.allocate(&Consumer::service("tenant-a", "web")).is_ok());
    // A Service elsewhere cannot claim the pool by labelling itself.
    let impostor =
        Consumer::service("tenant-b", "web").with_label(SERVICE_NAMESPACE_LABEL, "tenant-a");
    assert!(matches!(
        a.allocate(&impostor),
        Err(Unsatisfied::NoMatchingPool { .. })
    ));
}

#[test]
fn cilium_virtual_name_label_selects_the_services_name_with_expressions() {
    let mut a = Allocator::new();
    a.apply_pool(
        pool("named", &["10.0.0.0/24"]).selecting(LabelSelector::everything().with_expression(
            SERVICE_NAME_LABEL,
            Operator::In,
            &["ingress", "gateway"],
        )),
        0,
    );
    assert!(a.allocate(&svc("gateway")).is_ok());
    assert!(a
        .allocate(&svc("db").with_label(SERVICE_NAME_LABEL, "gateway"))
        .is_err());
    // NotIn sees the virtual label too: it is never absent.
    let mut b = Allocator::new();
    b.apply_pool(
        pool("not-db", &["10.0.0.0/24"]).selecting(LabelSelector::everything().with_expression(
            SERVICE_NAME_LABEL,
            Operator::NotIn,
            &["db"],
        )),
        0,
    );
    assert!(b.allocate(&svc("db")).is_err());
    assert!(b.allocate(&svc("web")).is_ok());
}
