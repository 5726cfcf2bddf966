//! What the controller writes, decided without I/O: objects in (the [`World`] as the
//! watchers last saw it, status included), status patches, conditions and Events out.
//!
//! Rules:
//! - Only the leader allocates. A new leader first restores every allocation it finds in
//!   the Services' `status.loadBalancer.ingress` ([`allocations_in_status`]), then
//!   allocates for the rest, so no address is handed out twice across a failover
//!   ([`Allocating`]). It does so only once every watcher has listed (`synced`): an
//!   allocation made before the last Service is known could take that Service's address.
//! - A Service's status is written only when it differs from what the object already says
//!   (ingress, and the `portico.io/` conditions): three unchanged Services cause no write.
//!   Conditions keep their `lastTransitionTime` while their status stays.
//! - Events go with status changes: `IPAllocated` when the addresses change to a
//!   non-empty set, `AllocationFailed` (Warning) when the allocation condition turns
//!   `False` or changes reason or message, `AllocationNotice` for a new notice.
//! - A Service Portico no longer serves (class or type changed) but still carries its
//!   condition gets an empty status from Portico's field manager, releasing its fields.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{LoadBalancerIngress, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use portico_crds::{
    invalid_status, status_of, AddressPoolStatus, ClassPolicy, ALLOCATED_CONDITION,
};
use portico_ipam::{Family, PoolState, PoolStatus};

use crate::plan::{Ipam, IpamOutcome, ServiceAddresses};
use crate::world::World;

/// Prefix of the Service condition types Portico owns.
pub const CONDITION_PREFIX: &str = "portico.io/";

/// Reason of the Event sent when a Service gets (new) addresses.
pub const IP_ALLOCATED: &str = "IPAllocated";

/// Reason of the Warning Event sent when a Service cannot get its addresses.
pub const ALLOCATION_FAILED: &str = "AllocationFailed";

/// Reason of the Event sent for a new allocator notice (grace period, pending request,
/// not shared).
pub const ALLOCATION_NOTICE: &str = "AllocationNotice";

/// The part of a Service's status Portico owns.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServiceStatus {
    /// `status.loadBalancer.ingress`: one entry per address, IPv4 first, `ipMode: VIP`.
    pub ingress: Vec<LoadBalancerIngress>,
    /// `status.conditions` of type `portico.io/…`.
    pub conditions: Vec<Condition>,
}

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Something went as it should.
    Normal,
    /// Something the owner should look at.
    Warning,
}

/// An Event about a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEvent {
    /// Normal or Warning.
    pub type_: EventType,
    /// CamelCase reason ([`IP_ALLOCATED`], [`ALLOCATION_FAILED`], [`ALLOCATION_NOTICE`]).
    pub reason: &'static str,
    /// What happened, in words.
    pub note: String,
}

/// A status to write to one Service, and the Events that go with it.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceWrite {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The status Portico's field manager applies (empty: release Portico's fields).
    pub status: ServiceStatus,
    /// Events to record once the write succeeded.
    pub events: Vec<ServiceEvent>,
}

/// A status to write to one AddressPool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolWrite {
    /// The pool's name.
    pub name: String,
    /// Its whole status (Portico owns all of it).
    pub status: AddressPoolStatus,
}

/// Everything one controller pass writes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Decisions {
    /// Service status writes, by (namespace, name).
    pub services: Vec<ServiceWrite>,
    /// AddressPool status writes, by name.
    pub pools: Vec<PoolWrite>,
}

impl Decisions {
    /// Whether there is nothing to write.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.pools.is_empty()
    }
}

/// The allocations that Services' statuses show, as `namespace/name` → addresses, for
/// the Services `class` serves: what a new leader restores before it allocates anything.
#[must_use]
pub fn allocations_in_status(world: &World, class: ClassPolicy) -> BTreeMap<String, Vec<IpAddr>> {
    world
        .services
        .iter()
        .filter(|(_, svc)| serves(class, svc))
        .filter_map(|((ns, name), svc)| {
            let ips: Vec<IpAddr> = current_ingress(svc)
                .iter()
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .collect();
            (!ips.is_empty()).then(|| (format!("{ns}/{name}"), ips))
        })
        .collect()
}

fn serves(class: ClassPolicy, svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .is_some_and(|s| class.serves(s.type_.as_deref(), s.load_balancer_class.as_deref()))
}

fn current_ingress(svc: &Service) -> &[LoadBalancerIngress] {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_deref())
        .unwrap_or_default()
}

fn current_conditions(svc: &Service) -> Vec<Condition> {
    svc.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.type_.starts_with(CONDITION_PREFIX))
        .cloned()
        .collect()
}

/// Splits the outcome's `Reason: message` strings.
fn reason_and_message(s: &str) -> (&str, &str) {
    s.split_once(": ").unwrap_or((s, ""))
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    previous: &[Condition],
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time,
        observed_generation: None,
    }
}

/// The status a Service should have for what IPAM decided.
///
/// Conditions: [`ALLOCATED_CONDITION`] (`True` with the addresses, or `False` with the
/// allocator's reason), then one `portico.io/<Reason>` condition per kind of notice.
#[must_use]
pub fn service_status(
    addrs: &ServiceAddresses,
    generation: Option<i64>,
    previous: &[Condition],
    now: &Time,
) -> ServiceStatus {
    let ingress = addrs
        .addresses
        .iter()
        .map(|ip| LoadBalancerIngress {
            ip: Some(ip.to_string()),
            ip_mode: Some("VIP".into()),
            ..LoadBalancerIngress::default()
        })
        .collect();
    let joined = addrs
        .addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut conditions = vec![match &addrs.unsatisfied {
        None => condition(
            ALLOCATED_CONDITION,
            true,
            "Allocated",
            format!("{joined} from {}", pools_of(addrs)),
            previous,
            now,
        ),
        Some(why) => {
            let (reason, message) = reason_and_message(why);
            let message = if joined.is_empty() {
                message.to_owned()
            } else {
                format!("{message} (has {joined})")
            };
            condition(ALLOCATED_CONDITION, false, reason, message, previous, now)
        }
    }];
    for notice in &addrs.notices {
        let (reason, message) = reason_and_message(notice);
        let type_ = format!("{CONDITION_PREFIX}{reason}");
        match conditions.iter_mut().find(|c| c.type_ == type_) {
            Some(c) => {
                c.message.push_str("; ");
                c.message.push_str(message);
            }
            None => conditions.push(condition(
                &type_,
                true,
                reason,
                message.to_owned(),
                previous,
                now,
            )),
        }
    }
    for c in &mut conditions {
        c.observed_generation = generation;
    }
    ServiceStatus {
        ingress,
        conditions,
    }
}

fn pools_of(addrs: &ServiceAddresses) -> String {
    let mut pools: Vec<&str> = addrs
        .pools
        .iter()
        .map(String::as_str)
        .filter(|p| !p.is_empty())
        .collect();
    pools.dedup();
    if pools.is_empty() {
        "no pool (grace period)".to_owned()
    } else {
        format!("pool {}", pools.join(","))
    }
}

/// Whether two condition lists say the same, transition times included.
fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    let key = |c: &Condition| {
        (
            c.type_.clone(),
            c.status.clone(),
            c.reason.clone(),
            c.message.clone(),
            c.last_transition_time.clone(),
            c.observed_generation,
        )
    };
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

fn same_ingress(a: &[LoadBalancerIngress], b: &[LoadBalancerIngress]) -> bool {
    let key = |i: &LoadBalancerIngress| (i.ip.clone(), i.ip_mode.clone(), i.hostname.clone());
    a.iter().map(key).eq(b.iter().map(key))
}

/// The Events that go with moving a Service from `before` to `after`.
fn service_events(before: &ServiceStatus, after: &ServiceStatus) -> Vec<ServiceEvent> {
    let mut events = Vec::new();
    let ips = |s: &ServiceStatus| -> Vec<String> {
        s.ingress.iter().filter_map(|i| i.ip.clone()).collect()
    };
    let (old_ips, new_ips) = (ips(before), ips(after));
    let allocated = |s: &ServiceStatus| {
        s.conditions
            .iter()
            .find(|c| c.type_ == ALLOCATED_CONDITION)
            .cloned()
    };
    let new_cond = allocated(after);
    if !new_ips.is_empty() && new_ips != old_ips {
        let from = new_cond
            .as_ref()
            .and_then(|c| c.message.split_once(" from "))
            .map(|(_, pools)| format!(" from {pools}"))
            .unwrap_or_default();
        events.push(ServiceEvent {
            type_: EventType::Normal,
            reason: IP_ALLOCATED,
            note: if old_ips.is_empty() {
                format!("Assigned {}{from}", new_ips.join(","))
            } else {
                format!(
                    "Assigned {}{from} (was {})",
                    new_ips.join(","),
                    old_ips.join(",")
                )
            },
        });
    }
    if let Some(c) = &new_cond {
        let old = allocated(before);
        let changed = old.as_ref().is_none_or(|o| {
            (&o.status, &o.reason, &o.message) != (&c.status, &c.reason, &c.message)
        });
        if c.status == "False" && changed {
            events.push(ServiceEvent {
                type_: EventType::Warning,
                reason: ALLOCATION_FAILED,
                note: format!("{}: {}", c.reason, c.message),
            });
        }
    }
    for c in after
        .conditions
        .iter()
        .filter(|c| c.type_ != ALLOCATED_CONDITION)
    {
        let seen = before
            .conditions
            .iter()
            .any(|o| o.type_ == c.type_ && o.message == c.message);
        if !seen {
            events.push(ServiceEvent {
                type_: EventType::Normal,
                reason: ALLOCATION_NOTICE,
                note: format!("{}: {}", c.reason, c.message),
            });
        }
    }
    events
}

/// The status writes and Events for `world` as IPAM left it in `outcome`, at `now`.
#[must_use]
pub fn decide(world: &World, outcome: &IpamOutcome, class: ClassPolicy, now: &Time) -> Decisions {
    let mut out = Decisions::default();
    for ((ns, name), svc) in &world.services {
        if crate::gateway::is_synthetic(name) {
            // A Gateway's stand-in: its status goes to the Gateway (crate::gateway).
            continue;
        }
        let before = ServiceStatus {
            ingress: current_ingress(svc).to_vec(),
            conditions: current_conditions(svc),
        };
        let after = match outcome.services.get(&(ns.clone(), name.clone())) {
            Some(addrs) => service_status(addrs, svc.metadata.generation, &before.conditions, now),
            None => {
                // Not Portico's (any more): release what Portico wrote, if it wrote.
                let ours = before
                    .conditions
                    .iter()
                    .any(|c| c.type_ == ALLOCATED_CONDITION);
                if !ours || serves(class, svc) {
                    continue;
                }
                ServiceStatus::default()
            }
        };
        if same_ingress(&before.ingress, &after.ingress)
            && same_conditions(&before.conditions, &after.conditions)
        {
            continue;
        }
        let events = service_events(&before, &after);
        out.services.push(ServiceWrite {
            namespace: ns.clone(),
            name: name.clone(),
            status: after,
            events,
        });
    }
    for (name, pool) in &world.pools {
        let previous = pool.status.as_ref();
        let Some(report) = outcome.pools.get(name) else {
            continue;
        };
        let status = match pool.to_pool() {
            Err(errors) => invalid_status(&errors, previous, now),
            Ok(parsed) => {
                let state = match report.state.strip_prefix("Conflict with ") {
                    Some(with) => PoolState::Conflict {
                        with: with.to_owned(),
                    },
                    None => PoolState::Ready,
                };
                let has = |f: Family| parsed.ranges.iter().any(|r| r.family == f);
                status_of(
                    &PoolStatus {
                        state,
                        v4: report.v4,
                        v6: report.v6,
                    },
                    has(Family::V4),
                    has(Family::V6),
                    previous,
                    now,
                )
            }
        };
        if previous != Some(&status) {
            out.pools.push(PoolWrite {
                name: name.clone(),
                status,
            });
        }
    }
    out
}

/// The allocating side of the controller across leadership changes: no allocator while
/// not leading; on becoming leader, one built from the allocations in the Services'
/// status, used from the first pass after every watcher has listed.
#[derive(Debug)]
pub struct Allocating {
    class: ClassPolicy,
    ipam: Option<Ipam>,
}

impl Allocating {
    /// Serving `class`, not leading yet.
    #[must_use]
    pub fn new(class: ClassPolicy) -> Self {
        Allocating { class, ipam: None }
    }

    /// Whether an allocator is in use (leading and synced).
    #[must_use]
    pub fn active(&self) -> bool {
        self.ipam.is_some()
    }

    /// When the allocator must run again even without changes (end of a grace period).
    #[must_use]
    pub fn next_deadline(&self) -> Option<u64> {
        self.ipam.as_ref().and_then(Ipam::next_deadline)
    }

    /// One pass. Not leading: forgets the allocator and decides nothing. Leading but not
    /// `synced` (some watcher has not listed yet): decides nothing. Leading and synced: on
    /// the first such pass restores what the statuses show, then reconciles and decides.
    /// `now_secs` is IPAM's clock, `now` the one written into conditions.
    pub fn pass(
        &mut self,
        world: &World,
        leading: bool,
        synced: bool,
        now_secs: u64,
        now: &Time,
    ) -> Option<(IpamOutcome, Decisions)> {
        if !leading {
            self.ipam = None;
            return None;
        }
        if !synced {
            return None;
        }
        let class = self.class;
        let ipam = self
            .ipam
            .get_or_insert_with(|| Ipam::new(class, allocations_in_status(world, class)));
        let outcome = ipam.reconcile(world, now_secs);
        let decisions = decide(world, &outcome, class, now);
        Some((outcome, decisions))
    }
}
