//! One test per allocation rule of docs/ipam.md, through the public API only.

use std::net::IpAddr;

use portico_ipam::{
    Allocator, Consumer, CrossNamespace, Family, FamilyPolicy, LabelSelector, Operator, Pool,
    PoolState, Protocol, TrafficPolicy, Unsatisfied,
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

fn ips_of(a: &Allocator, c: &Consumer) -> Vec<IpAddr> {
    a.allocation(&c.id).map(|x| x.ips()).unwrap_or_default()
}

fn allocator_with(pools: Vec<Pool>) -> Allocator {
    let mut a = Allocator::new();
    for p in pools {
        a.apply_pool(p, 0);
    }
    a
}

#[test]
fn consumers_get_the_lowest_free_address_of_the_first_pool() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/30"])]);
    assert_eq!(a.allocate(&svc("x")).unwrap().ips(), vec![ip("10.0.0.0")]);
    assert_eq!(a.allocate(&svc("y")).unwrap().ips(), vec![ip("10.0.0.1")]);
}

#[test]
fn allocate_is_idempotent() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let first = a.allocate(&svc("x")).unwrap();
    assert_eq!(a.allocate(&svc("x")).unwrap(), first);
    assert_eq!(a.consumer_count(), 1);
}

#[test]
fn released_addresses_are_reused() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/31"])]);
    a.allocate(&svc("x")).unwrap();
    a.allocate(&svc("y")).unwrap();
    assert!(matches!(
        a.allocate(&svc("z")),
        Err(Unsatisfied::PoolExhausted { .. })
    ));
    a.release(&svc("x").id);
    assert_eq!(a.allocate(&svc("z")).unwrap().ips(), vec![ip("10.0.0.0")]);
}

#[test]
fn exhausted_pool_is_reported_with_its_name() {
    let mut a = allocator_with(vec![pool("tiny", &["10.0.0.1/32"])]);
    a.allocate(&svc("x")).unwrap();
    assert_eq!(
        a.allocate(&svc("y")),
        Err(Unsatisfied::PoolExhausted {
            family: Family::V4,
            pools: vec!["tiny".into()]
        })
    );
    assert!(a.allocation(&svc("y").id).is_none());
}

#[test]
fn lower_priority_number_is_tried_first_then_name() {
    let mut a = allocator_with(vec![
        pool("b", &["10.0.2.0/24"]).with_priority(3),
        pool("a", &["10.0.1.0/24"]).with_priority(3),
        pool("z", &["10.0.9.0/24"]).with_priority(-1),
    ]);
    assert_eq!(ips_of_alloc(&mut a, "x"), ip("10.0.9.0"));
    a.apply_pool(pool("z", &["10.0.9.0/24"]).with_priority(5), 0);
    a.release(&svc("x").id);
    assert_eq!(ips_of_alloc(&mut a, "x"), ip("10.0.1.0"));
}

fn ips_of_alloc(a: &mut Allocator, name: &str) -> IpAddr {
    a.allocate(&svc(name)).unwrap().ips()[0]
}

#[test]
fn full_pool_spills_over_to_the_next() {
    let mut a = allocator_with(vec![
        pool("a", &["10.0.0.0/32"]),
        pool("b", &["10.0.1.0/32"]),
    ]);
    assert_eq!(ips_of_alloc(&mut a, "x"), ip("10.0.0.0"));
    assert_eq!(ips_of_alloc(&mut a, "y"), ip("10.0.1.0"));
}

#[test]
fn service_selector_limits_who_uses_a_pool() {
    let web_only = pool("web", &["10.0.0.0/24"])
        .selecting(LabelSelector::everything().with_label("tier", "web"));
    let mut a = allocator_with(vec![web_only]);
    assert_eq!(
        a.allocate(&svc("db")),
        Err(Unsatisfied::NoMatchingPool { family: Family::V4 })
    );
    assert!(a.allocate(&svc("web").with_label("tier", "web")).is_ok());
}

#[test]
fn namespace_selector_and_namespace_list_limit_who_uses_a_pool() {
    let by_label = pool("team", &["10.0.0.0/24"]).selecting_namespaces(
        LabelSelector::everything().with_expression("team", Operator::In, &["blue"]),
    );
    let by_list = pool("listed", &["10.0.1.0/24"]).only_in(&["prod"]);
    let mut a = allocator_with(vec![by_label, by_list]);
    let blue = svc("x").with_namespace_label("team", "blue");
    assert_eq!(a.allocate(&blue).unwrap().ips(), vec![ip("10.0.0.0")]);
    let prod = Consumer::service("prod", "y");
    assert_eq!(a.allocate(&prod).unwrap().ips(), vec![ip("10.0.1.0")]);
    assert!(a.allocate(&svc("z")).is_err());
}

#[test]
fn auto_assign_off_serves_only_explicit_requests() {
    let mut a = allocator_with(vec![pool("manual", &["10.0.0.0/24"]).auto_assign(false)]);
    assert!(matches!(
        a.allocate(&svc("x")),
        Err(Unsatisfied::NoMatchingPool { .. })
    ));
    assert!(a.allocate(&svc("y").in_pool("manual")).is_ok());
    assert_eq!(
        a.allocate(&svc("z").requesting(&[ip("10.0.0.9")]))
            .unwrap()
            .ips(),
        vec![ip("10.0.0.9")]
    );
}

#[test]
fn requested_pool_is_the_only_one_used() {
    let mut a = allocator_with(vec![
        pool("a", &["10.0.0.0/24"]),
        pool("b", &["10.0.1.0/24"]),
    ]);
    assert_eq!(
        a.allocate(&svc("x").in_pool("b")).unwrap().ips(),
        vec![ip("10.0.1.0")]
    );
    assert!(matches!(
        a.allocate(&svc("y").in_pool("missing")),
        Err(Unsatisfied::NoMatchingPool { .. })
    ));
}

#[test]
fn disabled_pool_keeps_existing_allocations_but_makes_no_new_ones() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let before = a.allocate(&svc("x")).unwrap();
    a.apply_pool(pool("a", &["10.0.0.0/24"]).disabled(true), 0);
    assert_eq!(a.allocate(&svc("x")).unwrap(), before);
    assert!(a.allocate(&svc("y")).is_err());
}

#[test]
fn requested_ip_is_given_exactly() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let c = svc("x").requesting(&[ip("10.0.0.77")]);
    assert_eq!(a.allocate(&c).unwrap().ips(), vec![ip("10.0.0.77")]);
    // A changed request moves the consumer.
    let c = svc("x").requesting(&[ip("10.0.0.78")]);
    assert_eq!(a.allocate(&c).unwrap().ips(), vec![ip("10.0.0.78")]);
    assert!(a.holders(ip("10.0.0.77")).is_empty());
}

#[test]
fn requested_ip_outside_every_pool_is_reported() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    assert_eq!(
        a.allocate(&svc("x").requesting(&[ip("192.0.2.1")])),
        Err(Unsatisfied::RequestedIpOutsidePools {
            ip: ip("192.0.2.1")
        })
    );
}

#[test]
fn requested_ip_held_by_another_consumer_is_reported() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    a.allocate(&svc("x")).unwrap();
    assert_eq!(
        a.allocate(&svc("y").requesting(&[ip("10.0.0.0")])),
        Err(Unsatisfied::RequestedIpTaken {
            ip: ip("10.0.0.0"),
            by: svc("x").id
        })
    );
}

#[test]
fn requested_ip_in_a_pool_that_does_not_admit_the_consumer_is_refused() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"]).only_in(&["other"])]);
    assert!(matches!(
        a.allocate(&svc("x").requesting(&[ip("10.0.0.5")])),
        Err(Unsatisfied::RequestedIpNotAllowed { .. })
    ));
}

#[test]
fn single_stack_ipv6_gets_one_ipv6_address() {
    let mut a = allocator_with(vec![pool("dual", &["10.0.0.0/24", "fd00::/64"])]);
    let c = svc("x").with_families(&[Family::V6], FamilyPolicy::SingleStack);
    assert_eq!(a.allocate(&c).unwrap().ips(), vec![ip("fd00::")]);
}

#[test]
fn require_dual_stack_gets_both_families_or_nothing() {
    let mut a = allocator_with(vec![pool("v4", &["10.0.0.0/24"])]);
    let c = svc("x").with_families(&[Family::V4, Family::V6], FamilyPolicy::RequireDualStack);
    assert_eq!(
        a.allocate(&c),
        Err(Unsatisfied::FamilyUnavailable { family: Family::V6 })
    );
    assert!(a.allocation(&c.id).is_none());
    assert!(a.holders(ip("10.0.0.0")).is_empty());
    a.apply_pool(pool("v6", &["fd00::/64"]), 0);
    assert_eq!(
        a.allocate(&c).unwrap().ips(),
        vec![ip("10.0.0.0"), ip("fd00::")]
    );
}

#[test]
fn prefer_dual_stack_takes_what_is_available() {
    let mut a = allocator_with(vec![pool("v4", &["10.0.0.0/24"])]);
    let c = svc("x").with_families(&[Family::V6, Family::V4], FamilyPolicy::PreferDualStack);
    assert_eq!(a.allocate(&c).unwrap().ips(), vec![ip("10.0.0.0")]);
    // Once an IPv6 pool appears, the next reconcile adds the second family.
    a.apply_pool(pool("v6", &["fd00::/64"]), 0);
    assert_eq!(
        a.allocate(&c).unwrap().ips(),
        vec![ip("10.0.0.0"), ip("fd00::")]
    );
}

#[test]
fn tcp_and_udp_on_one_port_share_an_address() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let tcp = svc("dns-tcp").sharing("dns").with_port(53, Protocol::Tcp);
    let udp = svc("dns-udp").sharing("dns").with_port(53, Protocol::Udp);
    let first = a.allocate(&tcp).unwrap();
    assert_eq!(a.allocate(&udp).unwrap(), first);
    assert_eq!(a.holders(first.ips()[0]).len(), 2);
    assert_eq!(a.pool_status("a").unwrap().v4.used, 1);
}

#[test]
fn same_key_with_overlapping_ports_gets_its_own_address() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let x = a
        .allocate(&svc("x").sharing("k").with_port(80, Protocol::Tcp))
        .unwrap();
    let y = a
        .allocate(&svc("y").sharing("k").with_port(80, Protocol::Tcp))
        .unwrap();
    assert_ne!(x, y);
}

#[test]
fn requesting_a_shared_address_with_an_overlapping_port_is_a_port_conflict() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let x = a
        .allocate(&svc("x").sharing("k").with_port(80, Protocol::Tcp))
        .unwrap();
    let err = a
        .allocate(
            &svc("y")
                .sharing("k")
                .with_port(80, Protocol::Tcp)
                .requesting(&x.ips()),
        )
        .unwrap_err();
    assert_eq!(err.reason(), "PortConflict");
}

#[test]
fn sharers_must_agree_on_external_traffic_policy() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let x = a
        .allocate(&svc("x").sharing("k").with_port(80, Protocol::Tcp))
        .unwrap();
    let local = svc("y")
        .sharing("k")
        .with_port(443, Protocol::Tcp)
        .with_traffic_policy(TrafficPolicy::Local);
    assert_ne!(a.allocate(&local).unwrap(), x);
    let asking = svc("z")
        .sharing("k")
        .with_port(443, Protocol::Tcp)
        .with_traffic_policy(TrafficPolicy::Local);
    assert!(matches!(
        a.allocate(&asking.requesting(&x.ips())),
        Err(Unsatisfied::TrafficPolicyMismatch { .. })
    ));
}

#[test]
fn consumers_without_a_key_never_share() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let x = a.allocate(&svc("x").with_port(80, Protocol::Tcp)).unwrap();
    let y = a
        .allocate(&svc("y").sharing("k").requesting(&x.ips()))
        .unwrap_err();
    assert_eq!(y.reason(), "RequestedIPTaken");
}

#[test]
fn sharing_across_namespaces_needs_both_to_opt_in() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let x = Consumer::service("a", "x")
        .sharing_across("k", CrossNamespace::Any)
        .with_port(80, Protocol::Tcp);
    let shy = Consumer::service("b", "y")
        .sharing("k")
        .with_port(81, Protocol::Tcp);
    let keen = Consumer::service("c", "z")
        .sharing_across("k", CrossNamespace::Namespaces(["a".to_owned()].into()))
        .with_port(82, Protocol::Tcp);
    let shared = a.allocate(&x).unwrap();
    assert_ne!(a.allocate(&shy).unwrap(), shared);
    assert_eq!(a.allocate(&keen).unwrap(), shared);
}

#[test]
fn a_shared_address_outlives_one_of_its_holders() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let x = svc("x").sharing("k").with_port(1, Protocol::Tcp);
    let y = svc("y").sharing("k").with_port(2, Protocol::Tcp);
    let shared = a.allocate(&x).unwrap();
    a.allocate(&y).unwrap();
    a.release(&x.id);
    assert_eq!(a.holders(shared.ips()[0]), vec![y.id.clone()]);
    assert_ne!(a.allocate(&svc("z")).unwrap(), shared);
}

#[test]
fn changing_ports_into_a_conflict_gives_up_the_shared_address() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let x = svc("x").sharing("k").with_port(1, Protocol::Tcp);
    let y = svc("y").sharing("k").with_port(2, Protocol::Tcp);
    let shared = a.allocate(&x).unwrap();
    a.allocate(&y).unwrap();
    let y_clashing = svc("y").sharing("k").with_port(1, Protocol::Tcp);
    assert_ne!(a.allocate(&y_clashing).unwrap(), shared);
    assert_eq!(a.holders(shared.ips()[0]), vec![x.id.clone()]);
}

#[test]
fn pool_edit_keeps_addresses_still_inside_the_pool() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24"])]);
    let kept: Vec<_> = (0..4)
        .map(|i| ips_of_alloc(&mut a, &format!("s{i}")))
        .collect();
    let released = a.apply_pool(pool("a", &["10.0.0.0/24", "10.0.5.0/24"]), 0);
    assert!(released.is_empty());
    for (i, ip) in kept.iter().enumerate() {
        assert_eq!(ips_of_alloc(&mut a, &format!("s{i}")), *ip);
    }
}

#[test]
fn pool_edit_releases_only_addresses_that_left_the_pool_once_the_grace_period_ends() {
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/24", "10.0.1.0/24"])]);
    let x = a.allocate(&svc("x").requesting(&[ip("10.0.0.5")])).unwrap();
    let y = a.allocate(&svc("y").requesting(&[ip("10.0.1.5")])).unwrap();
    assert!(a.apply_pool(pool("a", &["10.0.1.0/24"]), 100).is_empty());
    assert_eq!(a.allocate(&svc("x").requesting(&[ip("10.0.0.5")])), Ok(x));
    assert_eq!(a.next_deadline(), Some(160));
    assert!(a.handle_timeout(159).is_empty());
    let released = a.handle_timeout(160);
    assert_eq!(released.len(), 1);
    assert_eq!(released[0].consumer, svc("x").id);
    assert_eq!(released[0].ip, x.ips()[0]);
    assert_eq!(a.allocation(&svc("y").id), Some(y));
    assert_eq!(a.allocation(&svc("x").id), None);
}

#[test]
fn pool_edit_that_drops_a_consumer_from_the_selector_releases_it_on_reconcile() {
    let mut a = allocator_with(vec![
        pool("a", &["10.0.0.0/24"]),
        pool("b", &["10.0.1.0/24"]),
    ]);
    let web = svc("web").with_label("tier", "web");
    let db = svc("db").with_label("tier", "db");
    assert_eq!(ips_of_alloc_c(&mut a, &web), ip("10.0.0.0"));
    assert_eq!(ips_of_alloc_c(&mut a, &db), ip("10.0.0.1"));
    a.apply_pool(
        pool("a", &["10.0.0.0/24"])
            .selecting(LabelSelector::everything().with_label("tier", "web")),
        0,
    );
    assert_eq!(ips_of_alloc_c(&mut a, &web), ip("10.0.0.0"));
    assert_eq!(ips_of_alloc_c(&mut a, &db), ip("10.0.1.0"));
}

fn ips_of_alloc_c(a: &mut Allocator, c: &Consumer) -> IpAddr {
    a.allocate(c).unwrap().ips()[0]
}

#[test]
fn removed_pool_consumers_move_to_another_matching_pool() {
    let mut a = allocator_with(vec![
        pool("a", &["10.0.0.0/24"]),
        pool("b", &["10.0.1.0/24"]),
    ]);
    let x = svc("x");
    assert_eq!(ips_of_alloc_c(&mut a, &x), ip("10.0.0.0"));
    assert!(a.remove_pool("a", 0).is_empty());
    assert_eq!(ips_of_alloc_c(&mut a, &x), ip("10.0.0.0"));
    let released = a.handle_timeout(a.next_deadline().unwrap());
    assert_eq!(released.len(), 1);
    assert_eq!(ips_of_alloc_c(&mut a, &x), ip("10.0.1.0"));
    a.remove_pool("b", 0);
    a.handle_timeout(u64::MAX);
    assert_eq!(
        a.allocate(&x),
        Err(Unsatisfied::NoMatchingPool { family: Family::V4 })
    );
}

#[test]
fn overlapping_newer_pool_gets_conflict_and_is_not_used() {
    let mut a = Allocator::new();
    a.apply_pool(pool("old", &["10.0.0.0/24"]).created(100), 0);
    a.apply_pool(
        pool("new", &["10.0.0.128/25", "10.0.9.0/24"])
            .created(200)
            .with_priority(-5),
        0,
    );
    a.apply_pool(pool("other", &["10.0.1.0/24"]).created(300), 0);
    assert_eq!(
        a.pool_status("new").unwrap().state,
        PoolState::Conflict { with: "old".into() }
    );
    assert_eq!(a.pool_status("old").unwrap().state, PoolState::Ready);
    assert_eq!(a.pool_status("other").unwrap().state, PoolState::Ready);
    assert_eq!(ips_of_alloc(&mut a, "x"), ip("10.0.0.0"));
    assert!(a.allocate(&svc("y").in_pool("new")).is_err());
    assert!(a.allocate(&svc("z").in_pool("other")).is_ok());
}

#[test]
fn overlap_ties_on_creation_time_are_broken_by_name() {
    let mut a = Allocator::new();
    a.apply_pool(pool("b", &["10.0.0.0/24"]).created(5), 0);
    a.apply_pool(pool("a", &["10.0.0.0/25"]).created(5), 0);
    assert_eq!(a.pool_status("a").unwrap().state, PoolState::Ready);
    assert_eq!(
        a.pool_status("b").unwrap().state,
        PoolState::Conflict { with: "a".into() }
    );
}

#[test]
fn removing_the_older_pool_lifts_the_conflict() {
    let mut a = Allocator::new();
    a.apply_pool(pool("old", &["10.0.0.0/24"]).created(1), 0);
    a.apply_pool(pool("new", &["10.0.0.0/24"]).created(2), 0);
    let x = a.allocate(&svc("x")).unwrap();
    a.remove_pool("old", 0);
    assert_eq!(a.pool_status("new").unwrap().state, PoolState::Ready);
    // The address is still in a usable pool, so the consumer keeps it.
    assert_eq!(a.allocate(&svc("x")).unwrap(), x);
}

#[test]
fn restart_rebuild_from_status_yields_the_same_allocations() {
    let pools = || {
        vec![
            pool("a", &["10.0.0.0/29"]),
            pool("b", &["10.0.1.0/24", "fd00::/64"]),
        ]
    };
    let mut a = allocator_with(pools());
    let consumers: Vec<Consumer> = (0..20)
        .map(|i| {
            let c = svc(&format!("s{i}"));
            match i % 4 {
                0 => c.with_families(&[Family::V4, Family::V6], FamilyPolicy::RequireDualStack),
                1 => c.sharing("k").with_port(i as u16, Protocol::Tcp),
                2 => c.with_families(&[Family::V6], FamilyPolicy::SingleStack),
                _ => c,
            }
        })
        .collect();
    for c in &consumers {
        a.allocate(c).unwrap();
    }
    // Free some addresses early in the pools so a naive rebuild would move people.
    a.release(&consumers[3].id);
    a.release(&consumers[7].id);
    let status: Vec<_> = consumers.iter().map(|c| ips_of(&a, c)).collect();

    let mut b = allocator_with(pools());
    for (c, ips) in consumers.iter().zip(&status) {
        if !ips.is_empty() {
            assert_eq!(b.restore(c, ips, 0), *ips);
        }
    }
    for (c, ips) in consumers.iter().zip(&status) {
        if !ips.is_empty() {
            assert_eq!(b.allocate(c).unwrap().ips(), *ips);
        }
    }
}

#[test]
fn restore_refuses_addresses_outside_pools_without_a_grace_period_and_duplicates() {
    let mut a = Allocator::new().with_grace_period(0);
    a.apply_pool(pool("a", &["10.0.0.0/24"]), 0);
    assert!(a.restore(&svc("x"), &[ip("192.0.2.1")], 0).is_empty());
    assert_eq!(
        a.restore(&svc("y"), &[ip("10.0.0.9")], 0),
        vec![ip("10.0.0.9")]
    );
    assert!(a.restore(&svc("z"), &[ip("10.0.0.9")], 0).is_empty());
}

#[test]
fn avoid_buggy_ips_never_hands_out_dot_zero_or_dot_255() {
    let mut a = allocator_with(vec![
        pool("a", &["10.0.0.254-10.0.1.1"]).avoiding_buggy_ips(true)
    ]);
    assert_eq!(ips_of_alloc(&mut a, "x"), ip("10.0.0.254"));
    assert_eq!(ips_of_alloc(&mut a, "y"), ip("10.0.1.1"));
    assert!(a.allocate(&svc("z")).is_err());
    assert!(a.allocate(&svc("w").requesting(&[ip("10.0.1.0")])).is_err());
}

#[test]
fn pool_status_counts_used_and_available_per_family() {
    let mut a = allocator_with(vec![pool("d", &["10.0.0.0/30", "fd00::/64"])]);
    a.allocate(&svc("x")).unwrap();
    a.allocate(&svc("y").with_families(&[Family::V6], FamilyPolicy::SingleStack))
        .unwrap();
    let s = a.pool_status("d").unwrap();
    assert_eq!((s.v4.total, s.v4.used, s.v4.available), (4, 1, 3));
    assert_eq!(
        (s.v6.total, s.v6.used, s.v6.available),
        (1 << 64, 1, (1 << 64) - 1)
    );
}

#[test]
fn ipv6_slash_64_costs_memory_only_for_what_is_used() {
    // Allocating at the far end of a /64 is as cheap as at its start: nothing scans.
    let mut a = allocator_with(vec![pool("v6", &["fd00::/64"])]);
    let far = ip("fd00::ffff:ffff:ffff:fff0");
    let c = svc("x")
        .with_families(&[Family::V6], FamilyPolicy::SingleStack)
        .requesting(&[far]);
    assert_eq!(a.allocate(&c).unwrap().ips(), vec![far]);
    for i in 0..1000 {
        let c = svc(&format!("s{i}")).with_families(&[Family::V6], FamilyPolicy::SingleStack);
        a.allocate(&c).unwrap();
    }
    assert_eq!(a.pool_status("v6").unwrap().v6.used, 1001);
}

#[test]
fn allocate_all_reaches_the_state_a_second_pass_would_not_change() {
    // y holds .0; then x asks for .0 and y for .5. x comes first, while y still holds .0.
    let mut a = allocator_with(vec![pool("a", &["10.0.0.0/29"])]);
    a.allocate(&svc("y")).unwrap();
    let x = svc("x").requesting(&[ip("10.0.0.0")]);
    let y = svc("y").requesting(&[ip("10.0.0.5")]);
    let answers = a.allocate_all(&[&x, &y]);
    assert_eq!(answers[0].as_ref().unwrap().ips(), vec![ip("10.0.0.0")]);
    assert_eq!(answers[1].as_ref().unwrap().ips(), vec![ip("10.0.0.5")]);
    assert_eq!(a.allocate_all(&[&x, &y]), answers);
    // One pass of allocate, in the same order, leaves x waiting.
    let mut b = allocator_with(vec![pool("a", &["10.0.0.0/29"])]);
    b.allocate(&svc("y")).unwrap();
    assert!(b.allocate(&x).is_err(), "the fixture must be able to fail");
}
