//! Random sequences of pool edits, consumer changes, releases, clock ticks and restarts,
//! checking after every step the invariants of docs/ipam.md; and random orders of the
//! multi-object edits people make to pools (rename, split, shrink then grow), checking
//! that no consumer ever loses an address that is still valid.
//!
//! Runs 10,000 cases by default; set `PROPTEST_CASES` to change that.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use proptest::prelude::*;

use portico_ipam::{
    Allocation, Allocator, Consumer, ConsumerId, CrossNamespace, Family, FamilyPolicy,
    LabelSelector, Notice, Pool, PoolState, Protocol, TrafficPolicy, DEFAULT_GRACE_PERIOD,
};

const POOLS: [&str; 3] = ["p0", "p1", "p2"];
const NAMES: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const NAMESPACES: [&str; 2] = ["n0", "n1"];

#[derive(Debug, Clone)]
struct PoolSpec {
    v4: Option<(u8, u8)>,
    v6: Option<(u8, u8)>,
    created_at: i64,
    priority: Option<i32>,
    web_only: bool,
    disabled: bool,
    auto_assign: bool,
    avoid_buggy: bool,
}

#[derive(Debug, Clone)]
struct ConsumerSpec {
    namespace: usize,
    web: bool,
    share: Option<bool>,
    ports: Vec<(u16, bool)>,
    local: bool,
    endpoints: bool,
    families: u8,
    requested_v4: Option<u8>,
    requested_pool: Option<usize>,
}

#[derive(Debug, Clone)]
enum Op {
    ApplyPool(usize, PoolSpec),
    RemovePool(usize),
    Allocate(usize, ConsumerSpec),
    Release(usize),
    Tick(u64),
    Restart,
}

fn pool_spec() -> impl Strategy<Value = PoolSpec> {
    (
        prop::option::of((0u8..24, 0u8..8)),
        prop::option::of((0u8..24, 0u8..8)),
        0i64..4,
        prop::option::weighted(0.7, 0i32..3),
        prop::bool::weighted(0.2),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.85),
        prop::bool::weighted(0.2),
    )
        .prop_map(
            |(v4, v6, created_at, priority, web_only, disabled, auto_assign, avoid_buggy)| {
                PoolSpec {
                    v4,
                    v6,
                    created_at,
                    priority,
                    web_only,
                    disabled,
                    auto_assign,
                    avoid_buggy,
                }
            },
        )
}

fn consumer_spec() -> impl Strategy<Value = ConsumerSpec> {
    (
        0usize..2,
        any::<bool>(),
        prop::option::of(any::<bool>()),
        prop::collection::vec(
            (prop::sample::select(vec![53u16, 80, 443]), any::<bool>()),
            0..3,
        ),
        prop::bool::weighted(0.2),
        any::<bool>(),
        0u8..5,
        prop::option::weighted(0.2, 250u8..=255),
        prop::option::weighted(0.1, 0usize..3),
    )
        .prop_map(
            |(
                namespace,
                web,
                share,
                ports,
                local,
                endpoints,
                families,
                requested_v4,
                requested_pool,
            )| {
                ConsumerSpec {
                    namespace,
                    web,
                    share,
                    ports,
                    local,
                    endpoints,
                    families,
                    requested_v4,
                    requested_pool,
                }
            },
        )
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0usize..3, pool_spec()).prop_map(|(i, s)| Op::ApplyPool(i, s)),
        1 => (0usize..3).prop_map(Op::RemovePool),
        6 => (0usize..6, consumer_spec()).prop_map(|(i, s)| Op::Allocate(i, s)),
        1 => (0usize..6).prop_map(Op::Release),
        1 => (0u64..90).prop_map(Op::Tick),
        1 => Just(Op::Restart),
    ]
}

/// Pools live in 10.0.0.248/29 + 10.0.1.0/29 (start offsets 0..24 over a 24-address
/// window straddling a .255/.0 boundary) and fd00::/120, small enough to run full.
fn build_pool(index: usize, spec: &PoolSpec) -> Pool {
    let mut blocks = Vec::new();
    if let Some((start, len)) = spec.v4 {
        let base = u32::from(std::net::Ipv4Addr::new(10, 0, 0, 248));
        let first = std::net::Ipv4Addr::from(base + u32::from(start));
        let last = std::net::Ipv4Addr::from(base + u32::from(start) + u32::from(len));
        blocks.push(format!("{first}-{last}"));
    }
    if let Some((start, len)) = spec.v6 {
        blocks.push(format!("fd00::{:x}-fd00::{:x}", start, start + len));
    }
    if blocks.is_empty() {
        blocks.push("10.0.2.0/32".into());
    }
    let refs: Vec<&str> = blocks.iter().map(String::as_str).collect();
    let mut pool = Pool::from_blocks(POOLS[index], &refs)
        .unwrap()
        .created(spec.created_at)
        .disabled(spec.disabled)
        .auto_assign(spec.auto_assign)
        .avoiding_buggy_ips(spec.avoid_buggy);
    if let Some(priority) = spec.priority {
        pool = pool.with_priority(priority);
    }
    if spec.web_only {
        pool = pool.selecting(LabelSelector::everything().with_label("tier", "web"));
    }
    pool
}

fn build_consumer(index: usize, spec: &ConsumerSpec) -> Consumer {
    let mut c = Consumer::service(NAMESPACES[spec.namespace], NAMES[index]);
    if spec.web {
        c = c.with_label("tier", "web");
    }
    match spec.share {
        Some(true) => c = c.sharing_across("k", CrossNamespace::Any),
        Some(false) => c = c.sharing("k"),
        None => {}
    }
    for &(port, udp) in &spec.ports {
        c = c.with_port(port, if udp { Protocol::Udp } else { Protocol::Tcp });
    }
    if spec.local {
        c = c.with_traffic_policy(TrafficPolicy::Local);
    }
    c = c.selecting_endpoints("app", if spec.endpoints { "a" } else { "b" });
    c = match spec.families {
        0 | 1 => c,
        2 => c.with_families(&[Family::V6], FamilyPolicy::SingleStack),
        3 => c.with_families(&[Family::V4, Family::V6], FamilyPolicy::PreferDualStack),
        _ => c.with_families(&[Family::V6, Family::V4], FamilyPolicy::RequireDualStack),
    };
    if let Some(last) = spec.requested_v4 {
        c = c.requesting(&[IpAddr::from([10, 0, 0, last])]);
    }
    if let Some(p) = spec.requested_pool {
        c = c.in_pool(POOLS[p]);
    }
    c
}

struct World {
    allocator: Allocator,
    pools: BTreeMap<usize, Pool>,
    consumers: BTreeMap<usize, Consumer>,
    /// The simulated clock, in seconds.
    now: u64,
}

impl World {
    fn snapshot(&self) -> BTreeMap<ConsumerId, Allocation> {
        self.allocator.allocations().collect()
    }

    /// Reconciles every known consumer, as the controller does after a pool change.
    fn reconcile_all(&mut self) {
        let consumers: Vec<&Consumer> = self.consumers.values().collect();
        let _ = self.allocator.allocate_all(&consumers);
    }

    fn restart(&mut self) {
        let before = self.snapshot();
        let mut fresh = Allocator::new();
        for p in self.pools.values() {
            fresh.apply_pool(p.clone(), self.now);
        }
        for c in self.consumers.values() {
            if let Some(a) = before.get(&c.id) {
                fresh.restore(c, &a.ips(), self.now);
            }
        }
        self.allocator = fresh;
    }

    /// Whether `c` may still hold `ip`, judged from the world rather than the allocator:
    /// a Ready pool contains it and admits `c`, or it is in its grace period.
    fn still_valid(&self, c: &Consumer, ip: IpAddr) -> bool {
        let in_grace = self.allocator.in_grace_period().any(|(g, _)| g == ip);
        in_grace
            || self.pools.values().any(|p| {
                self.allocator.pool_status(&p.name).unwrap().state == PoolState::Ready
                    && p.contains(ip)
                    && p.admits(c)
                    && c.requests.pool.as_ref().is_none_or(|n| *n == p.name)
            })
    }

    /// Reconciles everyone after a pool change, checking that nobody loses an address
    /// that is still valid (unless it asked for another one and got it).
    fn reconcile_all_keeping_valid_addresses(&mut self) -> Result<(), TestCaseError> {
        let before = self.snapshot();
        self.reconcile_all();
        for c in self.consumers.values() {
            let Some(held) = before.get(&c.id) else {
                continue;
            };
            let now = self.allocator.allocation(&c.id).unwrap_or_default();
            // RequireDualStack is both families or nothing: losing one loses both.
            if c.family_policy == FamilyPolicy::RequireDualStack
                && held.ips().iter().any(|ip| !self.still_valid(c, *ip))
            {
                continue;
            }
            for ip in held.ips() {
                let moved_on_request = !c.requests.ips.is_empty() && !c.requests.ips.contains(&ip);
                if self.still_valid(c, ip) && !moved_on_request {
                    prop_assert!(
                        now.ips().contains(&ip),
                        "{} lost {} although it is still valid",
                        c.id,
                        ip
                    );
                }
            }
        }
        Ok(())
    }
}

fn compatible(x: &Consumer, y: &Consumer) -> bool {
    let (Some(sx), Some(sy)) = (&x.requests.sharing, &y.requests.sharing) else {
        return false;
    };
    sx.key == sy.key
        && x.traffic_policy == y.traffic_policy
        && (x.traffic_policy == TrafficPolicy::Cluster
            || x.endpoint_selector == y.endpoint_selector)
        && x.ports.is_disjoint(&y.ports)
        && (x.id.namespace == y.id.namespace
            || (sx.cross_namespace.allows(&y.id.namespace)
                && sy.cross_namespace.allows(&x.id.namespace)))
}

fn check_invariants(world: &World) -> Result<(), TestCaseError> {
    let a = &world.allocator;
    let by_id: BTreeMap<&ConsumerId, &Consumer> =
        world.consumers.values().map(|c| (&c.id, c)).collect();
    let mut holders: BTreeMap<IpAddr, Vec<&ConsumerId>> = BTreeMap::new();
    let allocations: Vec<(ConsumerId, Allocation)> = a.allocations().collect();
    for (id, alloc) in &allocations {
        prop_assert!(!alloc.is_empty(), "{id} is listed with no address");
        for ip in alloc.ips() {
            holders.entry(ip).or_default().push(id);
        }
    }
    // Ready pools never overlap, and every held address is in exactly one Ready pool.
    let ready: Vec<&Pool> = world
        .pools
        .values()
        .filter(|p| a.pool_status(&p.name).unwrap().state == PoolState::Ready)
        .collect();
    for (i, p) in ready.iter().enumerate() {
        for q in &ready[i + 1..] {
            prop_assert!(
                !p.ranges
                    .iter()
                    .any(|r| q.ranges.iter().any(|s| r.overlaps(s))),
                "ready pools {} and {} overlap",
                p.name,
                q.name
            );
        }
    }
    // Addresses in their grace period are held, in no Ready pool, and not yet due.
    let grace: BTreeMap<IpAddr, u64> = a.in_grace_period().collect();
    for (ip, at) in &grace {
        prop_assert!(holders.contains_key(ip), "{} in grace but not held", ip);
        prop_assert!(*at > world.now, "{} overdue ({} <= {})", ip, at, world.now);
    }
    for (ip, ids) in &holders {
        let inside = ready.iter().filter(|p| p.contains(*ip)).count();
        let expected = usize::from(!grace.contains_key(ip));
        prop_assert_eq!(inside, expected, "{} is held outside the ready pools", ip);
        // No address is shared unless every pair of holders may share.
        for (i, x) in ids.iter().enumerate() {
            for y in &ids[i + 1..] {
                let (cx, cy) = (by_id[x], by_id[y]);
                prop_assert!(compatible(cx, cy), "{} shared by {} and {}", ip, x, y);
            }
        }
        let mut listed = a.holders(*ip);
        listed.sort();
        let mut expected: Vec<ConsumerId> = ids.iter().map(|i| (*i).clone()).collect();
        expected.sort();
        prop_assert_eq!(listed, expected);
    }
    // Pool counts match the held addresses.
    for p in world.pools.values() {
        let status = a.pool_status(&p.name).unwrap();
        for family in Family::ALL {
            let usage = if family == Family::V4 {
                status.v4
            } else {
                status.v6
            };
            let counted = if status.state == PoolState::Ready {
                holders
                    .keys()
                    .filter(|ip| Family::of(**ip) == family && p.contains(**ip))
                    .count() as u128
            } else {
                0
            };
            prop_assert_eq!(usage.used, counted, "pool {} {}", &p.name, family);
            prop_assert!(usage.used <= usage.total);
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn random_histories_keep_every_invariant(ops in prop::collection::vec(op(), 1..40)) {
        let mut world = World {
            allocator: Allocator::new(),
            pools: BTreeMap::new(),
            consumers: BTreeMap::new(),
            now: 0,
        };
        for op in ops {
            match op {
                Op::ApplyPool(i, spec) => {
                    let before = world.snapshot();
                    let pool = build_pool(i, &spec);
                    world.pools.insert(i, pool.clone());
                    let released = world.allocator.apply_pool(pool, world.now);
                    // With a grace period, a pool edit takes nothing from anyone.
                    prop_assert!(released.is_empty());
                    prop_assert_eq!(&world.snapshot(), &before, "a pool edit moved someone");
                    world.reconcile_all_keeping_valid_addresses()?;
                }
                Op::RemovePool(i) => {
                    if let Some(pool) = world.pools.remove(&i) {
                        let before = world.snapshot();
                        prop_assert!(world.allocator.remove_pool(&pool.name, world.now).is_empty());
                        prop_assert_eq!(&world.snapshot(), &before, "a pool removal moved someone");
                        world.reconcile_all_keeping_valid_addresses()?;
                    }
                }
                Op::Tick(seconds) => {
                    world.now += seconds;
                    let before = world.snapshot();
                    let due: BTreeSet<IpAddr> = world
                        .allocator
                        .in_grace_period()
                        .filter(|(_, at)| *at <= world.now)
                        .map(|(ip, _)| ip)
                        .collect();
                    let released = world.allocator.handle_timeout(world.now);
                    let released_ips: BTreeSet<IpAddr> = released.iter().map(|r| r.ip).collect();
                    prop_assert_eq!(&released_ips, &due);
                    // Only the holders of overdue addresses lose anything, and only those.
                    for (id, alloc) in &before {
                        let kept: Vec<IpAddr> =
                            alloc.ips().into_iter().filter(|ip| !due.contains(ip)).collect();
                        let now = world.allocator.allocation(id).unwrap_or_default().ips();
                        prop_assert_eq!(now, kept, "{} changed on a tick", id);
                    }
                    world.reconcile_all();
                }
                Op::Allocate(i, spec) => {
                    let c = build_consumer(i, &spec);
                    if let Some(old) = world.consumers.insert(i, c.clone()) {
                        if old.id != c.id {
                            // A different object (it moved namespace): the old one is gone.
                            world.allocator.release(&old.id);
                        }
                    }
                    let before = world.allocator.allocation(&c.id);
                    let first = world.allocator.allocate(&c);
                    let first_notices = world.allocator.notices(&c.id);
                    let second = world.allocator.allocate(&c);
                    prop_assert_eq!(&first, &second, "allocate is not idempotent for {}", &c.id);
                    prop_assert_eq!(&first_notices, &world.allocator.notices(&c.id));
                    if let Ok(alloc) = &first {
                        if let Some(ip) = c.requests.ips.first() {
                            if alloc.ips() != vec![*ip] {
                                // It keeps what it held (where still valid) while the
                                // request cannot be met.
                                let held = before.unwrap_or_default().ips();
                                prop_assert!(alloc.ips().iter().all(|ip| held.contains(ip)));
                                let pending = first_notices
                                    .iter()
                                    .any(|n| matches!(n, Notice::RequestPending { .. }));
                                prop_assert!(pending, "{} kept an address silently", &c.id);
                            }
                        }
                    }
                }
                Op::Release(i) => {
                    if let Some(c) = world.consumers.remove(&i) {
                        world.allocator.release(&c.id);
                        prop_assert!(world.allocator.allocation(&c.id).is_none());
                    }
                }
                Op::Restart => {
                    // Reach a steady state first (a controller reconciles everything).
                    world.reconcile_all();
                    let steady = world.snapshot();
                    world.reconcile_all();
                    prop_assert_eq!(&world.snapshot(), &steady, "a second reconcile moved someone");
                    world.restart();
                    world.reconcile_all();
                    let after = world.snapshot();
                    for (id, alloc) in &steady {
                        prop_assert_eq!(after.get(id), Some(alloc), "{} moved across a restart", id);
                    }
                }
            }
            check_invariants(&world)?;
        }
    }
}

/// A multi-object edit people make to pools, whose steps reach the allocator in any order.
#[derive(Debug, Clone, Copy)]
enum Edit {
    /// Pool `old` becomes pool `new` with the same blocks: apply `new`, remove `old`.
    Rename,
    /// Pool `old` (a /27) becomes `old` (the lower /28) plus `new` (the upper /28).
    Split,
    /// Pool `old` shrinks to its lower /28, then grows back to the /27.
    ShrinkThenGrow,
}

/// One step of an edit as the allocator sees it.
#[derive(Debug, Clone)]
enum Step {
    Apply(Pool),
    Remove(&'static str),
}

fn edit_pool(name: &str, blocks: &[&str], created_at: i64) -> Pool {
    Pool::from_blocks(name, blocks).unwrap().created(created_at)
}

/// The steps of `edit`, in the order they are written; `narrower` makes the final pools
/// cover only part of the original one, so that some addresses really leave.
fn edit_steps(edit: Edit, narrower: bool) -> Vec<Step> {
    let upper = if narrower {
        "10.0.0.16/29"
    } else {
        "10.0.0.16/28"
    };
    match edit {
        Edit::Rename => vec![
            Step::Apply(edit_pool(
                "new",
                &[if narrower {
                    "10.0.0.0/28"
                } else {
                    "10.0.0.0/27"
                }],
                2,
            )),
            Step::Remove("old"),
        ],
        Edit::Split => vec![
            Step::Apply(edit_pool("old", &["10.0.0.0/28"], 1)),
            Step::Apply(edit_pool("new", &[upper], 2)),
        ],
        Edit::ShrinkThenGrow => vec![
            Step::Apply(edit_pool("old", &["10.0.0.0/28"], 1)),
            Step::Apply(edit_pool(
                "old",
                &[if narrower {
                    "10.0.0.0/28"
                } else {
                    "10.0.0.0/27"
                }],
                1,
            )),
        ],
    }
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        Just(Edit::Rename),
        Just(Edit::Split),
        Just(Edit::ShrinkThenGrow)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases() / 4, ..ProptestConfig::default() })]

    /// Renames, splits and shrink-then-grow edits, their steps applied in a random order
    /// (a folder being edited, `kubectl apply -f dir/`), with random reconciles and clock
    /// ticks shorter than the grace period between them: no consumer ever loses an address
    /// during the edit, and afterwards exactly the addresses the final pools no longer
    /// cover are released, once the grace period ends.
    #[test]
    fn pool_edits_in_any_order_never_take_a_still_valid_address(
        edit in edit(),
        narrower in any::<bool>(),
        consumers in prop::collection::vec((any::<bool>(), prop::option::of(0u8..32)), 1..24),
        reversed in any::<bool>(),
        pauses in prop::collection::vec((0u64..25, any::<bool>()), 2),
    ) {
        let grace = DEFAULT_GRACE_PERIOD;
        let mut a = Allocator::new();
        let mut now = 1_000u64;
        a.apply_pool(edit_pool("old", &["10.0.0.0/27"], 1), now);
        let mut services = Vec::new();
        for (i, (share, requested)) in consumers.iter().enumerate() {
            let mut c = Consumer::service("n", &format!("s{i}"))
                .with_port(80 + i as u16, Protocol::Tcp);
            if *share {
                c = c.sharing("k");
            }
            if let Some(last) = requested {
                c = c.requesting(&[IpAddr::from([10, 0, 0, *last])]);
            }
            if a.allocate(&c).is_ok() {
                services.push(c);
            }
        }
        let start: BTreeMap<ConsumerId, Allocation> = a.allocations().collect();
        let mut steps = edit_steps(edit, narrower);
        // Rename and split have two independent steps; shrink-then-grow keeps its order.
        if !matches!(edit, Edit::ShrinkThenGrow) && reversed {
            steps.reverse();
        }
        let mut final_pools: BTreeMap<String, Pool> =
            [("old".to_owned(), edit_pool("old", &["10.0.0.0/27"], 1))].into();
        for (step, (pause, reconcile)) in steps.into_iter().zip(pauses) {
            now += pause;
            prop_assert!(a.handle_timeout(now).is_empty(), "released within the grace period");
            match step {
                Step::Apply(pool) => {
                    final_pools.insert(pool.name.clone(), pool.clone());
                    prop_assert!(a.apply_pool(pool, now).is_empty());
                }
                Step::Remove(name) => {
                    final_pools.remove(name);
                    prop_assert!(a.remove_pool(name, now).is_empty());
                }
            }
            if reconcile {
                for c in &services {
                    let _ = a.allocate(c);
                }
            }
            let during: BTreeMap<ConsumerId, Allocation> = a.allocations().collect();
            prop_assert_eq!(&during, &start, "someone lost an address during the edit");
        }
        for c in &services {
            let _ = a.allocate(c);
        }
        prop_assert_eq!(&a.allocations().collect::<BTreeMap<_, _>>(), &start);
        // After the grace period, exactly the addresses outside the final pools go.
        now += grace;
        a.handle_timeout(now);
        prop_assert_eq!(a.next_deadline(), None);
        for c in &services {
            let _ = a.allocate(c);
        }
        for (id, alloc) in &start {
            let ip = alloc.ips()[0];
            let covered = final_pools.values().any(|p| p.contains(ip));
            let held = a.allocation(id).is_some_and(|now| now.ips().contains(&ip));
            prop_assert_eq!(held, covered, "{} and {} after the edit", id, ip);
        }
    }
}
