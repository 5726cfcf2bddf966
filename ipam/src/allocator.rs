//! The allocator: pools and consumers in, allocations and reasons out.
//!
//! Memory is proportional to what is allocated. Consumers live in a slab of compact
//! [`Slot`]s; two `HashTable<u32>`s index them by identity and by address (4 bytes a
//! bucket), and free-address search runs over merged runs of occupied addresses
//! ([`Occupied`]), so a /64 pool costs nothing until it is used and finding a free
//! address costs O(log runs), never a scan of the pool.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::consumer::{
    Consumer, ConsumerId, ConsumerKind, CrossNamespace, PortProtocol, TrafficPolicy,
};
use crate::family::{from_number, to_number, Family};
use crate::pool::{is_buggy, Pool};
use crate::requests::SHARING_CROSS_NAMESPACE;
use crate::selector::Labels;

/// How long, by default, an address whose pool disappeared stays with its consumer
/// ([`Allocator::with_grace_period`]), in seconds.
pub const DEFAULT_GRACE_PERIOD: u64 = 60;

/// The addresses a consumer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Allocation {
    /// Its IPv4 address.
    pub v4: Option<Ipv4Addr>,
    /// Its IPv6 address.
    pub v6: Option<Ipv6Addr>,
}

impl Allocation {
    /// The addresses, IPv4 first.
    #[must_use]
    pub fn ips(&self) -> Vec<IpAddr> {
        self.v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.v6.map(IpAddr::V6))
            .collect()
    }

    /// Whether it holds no address.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }

    /// The address of `family`.
    #[must_use]
    pub fn get(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.v4.map(IpAddr::V4),
            Family::V6 => self.v6.map(IpAddr::V6),
        }
    }
}

/// Why a consumer got no allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsatisfied {
    /// No usable pool admits the consumer (selectors, namespaces, requested pool,
    /// autoAssign, disabled).
    #[error("no pool admits this consumer for {family}")]
    NoMatchingPool {
        /// The family asked for.
        family: Family,
    },
    /// Pools admit the consumer, but none has addresses of this family.
    #[error("no pool that admits this consumer has {family} addresses")]
    FamilyUnavailable {
        /// The missing family.
        family: Family,
    },
    /// Every admitting pool of the family is full.
    #[error("pools {pools:?} have no free {family} address")]
    PoolExhausted {
        /// The family.
        family: Family,
        /// The pools tried, in order.
        pools: Vec<String>,
    },
    /// The requested address is in no usable pool (or is one a pool skips).
    #[error("requested address {ip} is in no usable pool")]
    RequestedIpOutsidePools {
        /// The address.
        ip: IpAddr,
    },
    /// The requested address is in a pool that does not admit the consumer.
    #[error("requested address {ip} is in pool {pool}, which does not admit this consumer")]
    RequestedIpNotAllowed {
        /// The address.
        ip: IpAddr,
        /// The pool.
        pool: String,
    },
    /// The requested address is held by a consumer it cannot be shared with.
    #[error("requested address {ip} is held by {by}")]
    RequestedIpTaken {
        /// The address.
        ip: IpAddr,
        /// A holder.
        by: ConsumerId,
    },
    /// Same sharing key, but a (port, protocol) pair is used by both.
    #[error("{ip} is shared with {with}, which also uses {port}")]
    PortConflict {
        /// The address.
        ip: IpAddr,
        /// The other consumer.
        with: ConsumerId,
        /// The port both use.
        port: PortProtocol,
    },
    /// Same sharing key, but the externalTrafficPolicy differs.
    #[error("{ip} is shared with {with}, whose externalTrafficPolicy differs")]
    TrafficPolicyMismatch {
        /// The address.
        ip: IpAddr,
        /// The other consumer.
        with: ConsumerId,
    },
    /// Same sharing key, both `externalTrafficPolicy: Local`, but they select different
    /// endpoints: the nodes that may announce the address differ, so no announcement
    /// would be right for both (MetalLB refuses this too, through its "backend key").
    #[error(
        "{ip} is shared with {with}; both are externalTrafficPolicy Local but select \
         different endpoints, so the address could not be announced from the right nodes"
    )]
    LocalEndpointsDiffer {
        /// The address.
        ip: IpAddr,
        /// The other consumer.
        with: ConsumerId,
    },
    /// Same sharing key, but the holder is in another namespace and the two have not both
    /// opted in to sharing across namespaces.
    #[error(
        "{ip} has the same sharing key in namespace {}, held by {with}; to share it, {}",
        with.namespace,
        cross_namespace_hint(with, namespace, *accepted_here, *accepted_there)
    )]
    CrossNamespaceNotAllowed {
        /// The address.
        ip: IpAddr,
        /// The other consumer.
        with: ConsumerId,
        /// The namespace of the consumer that asked.
        namespace: String,
        /// Whether the consumer that asked accepts `with`'s namespace.
        accepted_here: bool,
        /// Whether `with` accepts the namespace of the consumer that asked.
        accepted_there: bool,
    },
}

/// What to add so that two consumers of different namespaces may share.
fn cross_namespace_hint(
    with: &ConsumerId,
    namespace: &str,
    accepted_here: bool,
    accepted_there: bool,
) -> String {
    let here = format!(
        "add {:?} to the {SHARING_CROSS_NAMESPACE} annotation of this {:?}",
        with.namespace, with.kind
    );
    let there = format!("add {namespace:?} to the {SHARING_CROSS_NAMESPACE} annotation of {with}");
    match (accepted_here, accepted_there) {
        (false, false) => format!("{here}, and {there}"),
        (false, true) => here,
        _ => there,
    }
}

impl Unsatisfied {
    /// A CamelCase reason for a condition or an event.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Unsatisfied::NoMatchingPool { .. } => "NoMatchingPool",
            Unsatisfied::FamilyUnavailable { .. } => "FamilyUnavailable",
            Unsatisfied::PoolExhausted { .. } => "PoolExhausted",
            Unsatisfied::RequestedIpOutsidePools { .. } => "RequestedIPOutsidePools",
            Unsatisfied::RequestedIpNotAllowed { .. } => "RequestedIPNotAllowed",
            Unsatisfied::RequestedIpTaken { .. } => "RequestedIPTaken",
            Unsatisfied::PortConflict { .. } => "PortConflict",
            Unsatisfied::TrafficPolicyMismatch { .. } => "TrafficPolicyMismatch",
            Unsatisfied::LocalEndpointsDiffer { .. } => "LocalEndpointsDiffer",
            Unsatisfied::CrossNamespaceNotAllowed { .. } => "CrossNamespaceSharingNotAllowed",
        }
    }
}

/// Something to tell the owner of a consumer that holds addresses: plain data, so that
/// every runtime (the manifest folder, the Kubernetes controller) can show it as a
/// condition and an event. Read them with [`Allocator::notices`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// `ip` is in no usable pool any more (its pool was removed or shrunk, or is now in
    /// conflict). The consumer keeps it until `release_at`, and for good if a pool that
    /// contains it appears before then (a rename or split applied in either order).
    GracePeriod {
        /// The address.
        ip: IpAddr,
        /// When it is released, in the caller's seconds (see [`Allocator::handle_timeout`]).
        release_at: u64,
    },
    /// The consumer asks for addresses it does not hold, and they cannot be given yet; it
    /// keeps the addresses it holds meanwhile (as MetalLB does) and moves once they can.
    RequestPending {
        /// The addresses asked for.
        requested: Vec<IpAddr>,
        /// Why they cannot be given.
        why: Unsatisfied,
    },
    /// The consumer has a sharing key, but an address held under that key did not accept
    /// it, so it holds an address of its own.
    NotShared {
        /// The sharing key.
        key: String,
        /// Why it could not join (names the other consumer, and for another namespace
        /// the opt-in to add).
        why: Unsatisfied,
    },
}

impl Notice {
    /// A CamelCase reason for a condition or an event.
    #[must_use]
    pub fn reason(&self) -> &'static str {
        match self {
            Notice::GracePeriod { .. } => "AddressInGracePeriod",
            Notice::RequestPending { .. } => "RequestPending",
            Notice::NotShared { .. } => "NotShared",
        }
    }
}

impl std::fmt::Display for Notice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Notice::GracePeriod { ip, release_at } => write!(
                f,
                "{ip} is in no usable address pool; it is kept until {release_at} and for \
                 good if a pool containing it appears by then"
            ),
            Notice::RequestPending { requested, why } => {
                f.write_str("keeps its current address: requested ")?;
                for (i, ip) in requested.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{ip}")?;
                }
                write!(f, " cannot be given yet: {why}")
            }
            Notice::NotShared { key, why } => {
                write!(f, "sharing key {key:?}: has an address of its own: {why}")
            }
        }
    }
}

/// An address taken from a consumer by a pool change.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Released {
    /// The consumer, which should be reconciled again.
    pub consumer: ConsumerId,
    /// The address it lost.
    pub ip: IpAddr,
}

/// Whether a pool can be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolState {
    /// In use.
    Ready,
    /// Overlaps an older pool, so it is not used.
    Conflict {
        /// The older pool.
        with: String,
    },
}

/// Address counts of one family in a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Usable addresses (saturating at `u128::MAX`).
    pub total: u128,
    /// Allocated addresses (a shared address counts once).
    pub used: u128,
    /// Addresses still free for new allocations (0 while in conflict).
    pub available: u128,
}

/// What a pool's status should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolStatus {
    /// Ready or in conflict.
    pub state: PoolState,
    /// IPv4 counts.
    pub v4: Usage,
    /// IPv6 counts.
    pub v6: Usage,
}

const NONE: u32 = u32::MAX;

/// A consumer's identity, stored compactly.
#[derive(Debug)]
struct StoredId {
    kind: ConsumerKind,
    namespace: Box<str>,
    name: Box<str>,
}

impl StoredId {
    fn is(&self, id: &ConsumerId) -> bool {
        self.kind == id.kind && *self.namespace == id.namespace && *self.name == id.name
    }

    fn to_id(&self) -> ConsumerId {
        ConsumerId {
            kind: self.kind,
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
        }
    }
}

/// What a sharing consumer agreed to; the holders of one address form a chain through
/// `next`, one chain per family.
#[derive(Debug, Clone)]
struct ShareState {
    key: Box<str>,
    cross: CrossNamespace,
    ports: Box<[PortProtocol]>,
    policy: TrafficPolicy,
    endpoints: Labels,
    next: [u32; 2],
}

impl ShareState {
    fn of(consumer: &Consumer) -> Option<Box<ShareState>> {
        consumer.requests.sharing.as_ref().map(|s| {
            Box::new(ShareState {
                key: s.key.as_str().into(),
                cross: s.cross_namespace.clone(),
                ports: consumer.ports.iter().copied().collect(),
                policy: consumer.traffic_policy,
                endpoints: consumer.endpoint_selector.clone(),
                next: [NONE; 2],
            })
        })
    }

    fn same_terms(&self, other: &ShareState) -> bool {
        self.key == other.key
            && self.cross == other.cross
            && self.ports == other.ports
            && self.policy == other.policy
            && self.endpoints == other.endpoints
    }
}

/// One consumer's entry.
#[derive(Debug)]
struct Slot {
    id: StoredId,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    share: Option<Box<ShareState>>,
}

impl Slot {
    fn addr(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.v4.map(IpAddr::V4),
            Family::V6 => self.v6.map(IpAddr::V6),
        }
    }

    fn set_addr(&mut self, family: Family, ip: Option<IpAddr>) {
        match (family, ip) {
            (Family::V4, Some(IpAddr::V4(a))) => self.v4 = Some(a),
            (Family::V6, Some(IpAddr::V6(a))) => self.v6 = Some(a),
            (Family::V4, _) => self.v4 = None,
            (Family::V6, _) => self.v6 = None,
        }
    }

    fn next(&self, family: Family) -> u32 {
        self.share.as_ref().map_or(NONE, |s| s.next[family.index()])
    }

    fn allocation(&self) -> Allocation {
        Allocation {
            v4: self.v4,
            v6: self.v6,
        }
    }
}

#[derive(Debug)]
struct PoolEntry {
    pool: Pool,
    conflict: Option<String>,
    used: [u128; 2],
}

/// The LB-IPAM allocator. Deterministic: the same calls in the same order give the same
/// answers. Feed it pools with [`Allocator::apply_pool`], consumers with
/// [`Allocator::allocate`] (idempotent: call it on every reconcile), and after a restart
/// the addresses already in consumers' status with [`Allocator::restore`].
///
/// It reads no clock: calls that may start a grace period take `now`, in seconds of the
/// caller's choosing (Unix time, say); [`Allocator::next_deadline`] says when
/// [`Allocator::handle_timeout`] must be called next.
#[derive(Debug)]
pub struct Allocator {
    /// Sorted by (priority, name): the order pools are tried in.
    pools: Vec<PoolEntry>,
    /// Ranges of usable pools per family: `first -> (last, index into pools)`.
    ranges: [BTreeMap<u128, (u128, u32)>; 2],
    occupied: [crate::occupied::Occupied; 2],
    slots: Vec<Option<Slot>>,
    free_slots: Vec<u32>,
    /// Slot numbers by consumer identity.
    by_id: HashTable<u32>,
    /// `slot << 1 | family` of an address's first holder, by address.
    by_addr: HashTable<u32>,
    /// Addresses held under each sharing key.
    shared: HashMap<Box<str>, BTreeSet<IpAddr>>,
    hasher: DefaultHashBuilder,
    /// Seconds an address in no usable pool stays with its holders.
    grace_period: u64,
    /// Held addresses in no usable pool, with the time they are released.
    orphans: BTreeMap<IpAddr, u64>,
    /// What the last [`Allocator::allocate`] of each consumer had to say, where anything.
    notices: BTreeMap<ConsumerId, Vec<Notice>>,
    /// Counts addresses becoming held or free: what can change another consumer's answer.
    generation: u64,
}

impl Default for Allocator {
    fn default() -> Self {
        Allocator {
            pools: Vec::new(),
            ranges: Default::default(),
            occupied: Default::default(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            by_id: HashTable::new(),
            by_addr: HashTable::new(),
            shared: HashMap::new(),
            hasher: DefaultHashBuilder::default(),
            grace_period: DEFAULT_GRACE_PERIOD,
            orphans: BTreeMap::new(),
            notices: BTreeMap::new(),
            generation: 0,
        }
    }
}

fn id_hash(hasher: &DefaultHashBuilder, kind: ConsumerKind, namespace: &str, name: &str) -> u64 {
    hasher.hash_one((kind, namespace, name))
}

fn addr_ref(slot: u32, family: Family) -> u32 {
    (slot << 1) | family.index() as u32
}

fn addr_ref_parts(r: u32) -> (u32, Family) {
    (r >> 1, if r & 1 == 0 { Family::V4 } else { Family::V6 })
}

impl Allocator {
    /// An allocator with no pools and no consumers, and a grace period of
    /// [`DEFAULT_GRACE_PERIOD`].
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets how many seconds an address whose pool disappeared stays with its consumers
    /// (0: it is released at once). Applies to grace periods that start afterwards.
    #[must_use]
    pub fn with_grace_period(mut self, seconds: u64) -> Self {
        self.grace_period = seconds;
        self
    }

    /// The grace period in seconds.
    #[must_use]
    pub fn grace_period(&self) -> u64 {
        self.grace_period
    }

    // ---- pools -------------------------------------------------------------------------

    /// Adds a pool or replaces the pool of the same name, at time `now` (seconds).
    ///
    /// No consumer loses an address here: an address no usable pool covers any more
    /// stays with its holders for the grace period ([`Notice::GracePeriod`]), and keeps
    /// them for good if a pool containing it is applied before the period ends, so a
    /// rename or split works in either order. Returns what was released at once, which is
    /// only ever something when the grace period is 0.
    ///
    /// Consumers whose labels a changed selector no longer matches lose their address on
    /// their next [`Allocator::allocate`], so reconcile every consumer after a pool change.
    pub fn apply_pool(&mut self, pool: Pool, now: u64) -> Vec<Released> {
        self.pools.retain(|p| p.pool.name != pool.name);
        self.pools.push(PoolEntry {
            pool,
            conflict: None,
            used: [0; 2],
        });
        self.reindex_pools(now)
    }

    /// Removes a pool at time `now` (seconds). Its addresses stay with their holders while
    /// another usable pool (such as one that was in conflict with it) covers them, and
    /// otherwise for the grace period, as in [`Allocator::apply_pool`].
    pub fn remove_pool(&mut self, name: &str, now: u64) -> Vec<Released> {
        let before = self.pools.len();
        self.pools.retain(|p| p.pool.name != name);
        if self.pools.len() == before {
            return Vec::new();
        }
        self.reindex_pools(now)
    }

    /// Releases the addresses whose grace period has ended by `now`, and returns them;
    /// their consumers should be reconciled (they get a new address if a pool admits them).
    pub fn handle_timeout(&mut self, now: u64) -> Vec<Released> {
        let expired: Vec<IpAddr> = self
            .orphans
            .iter()
            .filter(|(_, &at)| at <= now)
            .map(|(&ip, _)| ip)
            .collect();
        let mut released = Vec::new();
        for ip in expired {
            self.orphans.remove(&ip);
            self.release_address(ip, &mut released);
        }
        released.sort();
        released
    }

    /// When [`Allocator::handle_timeout`] must next be called (the earliest end of a grace
    /// period), if ever.
    #[must_use]
    pub fn next_deadline(&self) -> Option<u64> {
        self.orphans.values().min().copied()
    }

    /// Held addresses that are in no usable pool, with the end of their grace period.
    pub fn in_grace_period(&self) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        self.orphans.iter().map(|(&ip, &at)| (ip, at))
    }

    /// Takes `ip` from every holder, recording each in `released`.
    fn release_address(&mut self, ip: IpAddr, released: &mut Vec<Released>) {
        let family = Family::of(ip);
        for slot in self.holder_slots(ip) {
            released.push(Released {
                consumer: self.slot(slot).id.to_id(),
                ip,
            });
            self.unhold(slot, family);
            if self.slot(slot).allocation().is_empty() {
                self.drop_slot(slot);
            }
        }
    }

    /// The slots holding `ip`, first holder first.
    fn holder_slots(&self, ip: IpAddr) -> Vec<u32> {
        let family = Family::of(ip);
        let mut out = Vec::new();
        let mut next = self.head(ip).map_or(NONE, |r| addr_ref_parts(r).0);
        while next != NONE {
            out.push(next);
            next = self.slot(next).next(family);
        }
        out
    }

    /// The status of a pool, or `None` if there is no such pool.
    #[must_use]
    pub fn pool_status(&self, name: &str) -> Option<PoolStatus> {
        let entry = self.pools.iter().find(|p| p.pool.name == name)?;
        let usage = |family: Family| {
            let total = entry.pool.total(family);
            let used = entry.used[family.index()];
            Usage {
                total,
                used,
                available: if entry.conflict.is_some() {
                    0
                } else {
                    total.saturating_sub(used)
                },
            }
        };
        Some(PoolStatus {
            state: match &entry.conflict {
                None => PoolState::Ready,
                Some(with) => PoolState::Conflict { with: with.clone() },
            },
            v4: usage(Family::V4),
            v6: usage(Family::V6),
        })
    }

    /// Names of the known pools, in the order they are tried.
    pub fn pool_names(&self) -> impl Iterator<Item = &str> {
        self.pools.iter().map(|p| p.pool.name.as_str())
    }

    fn reindex_pools(&mut self, now: u64) -> Vec<Released> {
        self.pools
            .sort_by(|a, b| a.pool.order_key().cmp(&b.pool.order_key()));
        // Overlaps: walk pools oldest first; a pool overlapping an older usable one loses.
        let mut by_age: Vec<usize> = (0..self.pools.len()).collect();
        by_age.sort_by(|&a, &b| {
            let (a, b) = (&self.pools[a].pool, &self.pools[b].pool);
            (a.created_at, &a.name).cmp(&(b.created_at, &b.name))
        });
        let mut usable: Vec<usize> = Vec::new();
        for &i in &by_age {
            let conflict = usable
                .iter()
                .find(|&&j| {
                    self.pools[i]
                        .pool
                        .ranges
                        .iter()
                        .any(|r| self.pools[j].pool.ranges.iter().any(|o| r.overlaps(o)))
                })
                .map(|&j| self.pools[j].pool.name.clone());
            if conflict.is_none() {
                usable.push(i);
            }
            self.pools[i].conflict = conflict;
        }
        self.ranges = Default::default();
        for &i in &usable {
            for r in &self.pools[i].pool.ranges {
                self.ranges[r.family.index()].insert(r.first, (r.last, i as u32));
            }
        }
        // Addresses no usable pool covers any more start their grace period (or are
        // released at once without one); addresses a pool covers again leave it.
        let mut uncovered = Vec::new();
        for slot in 0..self.slots.len() as u32 {
            for family in Family::ALL {
                let Some(ip) = self.slots[slot as usize]
                    .as_ref()
                    .and_then(|s| s.addr(family))
                else {
                    continue;
                };
                if self.head(ip) != Some(addr_ref(slot, family)) {
                    continue;
                }
                if self.pool_of(ip).is_some() {
                    self.orphans.remove(&ip);
                } else {
                    uncovered.push(ip);
                }
            }
        }
        let mut released = Vec::new();
        for ip in uncovered {
            if self.grace_period == 0 {
                self.orphans.remove(&ip);
                self.release_address(ip, &mut released);
            } else {
                self.orphans
                    .entry(ip)
                    .or_insert(now.saturating_add(self.grace_period));
            }
        }
        self.rebuild_occupancy();
        released.sort();
        released
    }

    /// Recomputes free-address runs and per-pool counts from the held addresses.
    fn rebuild_occupancy(&mut self) {
        self.occupied = Default::default();
        for p in &mut self.pools {
            p.used = [0; 2];
        }
        for slot in 0..self.slots.len() as u32 {
            for family in Family::ALL {
                let Some(ip) = self.slots[slot as usize]
                    .as_ref()
                    .and_then(|s| s.addr(family))
                else {
                    continue;
                };
                if self.head(ip) == Some(addr_ref(slot, family)) {
                    self.mark_occupied(ip);
                }
            }
        }
    }

    /// The usable pool that hands out `ip`.
    fn pool_of(&self, ip: IpAddr) -> Option<usize> {
        let (family, value) = to_number(ip);
        let (_, &(last, index)) = self.ranges[family.index()].range(..=value).next_back()?;
        let index = index as usize;
        (last >= value && !self.pools[index].pool.excludes(family, value)).then_some(index)
    }

    fn skip_fn(&self, family: Family, index: usize) -> impl Fn(u128) -> bool {
        let avoid = self.pools[index].pool.avoid_buggy_ips && family == Family::V4;
        move |v| avoid && is_buggy(v)
    }

    fn mark_occupied(&mut self, ip: IpAddr) {
        self.generation += 1;
        let (family, value) = to_number(ip);
        if let Some(index) = self.pool_of(ip) {
            let skip = self.skip_fn(family, index);
            self.occupied[family.index()].insert(value, skip);
            self.pools[index].used[family.index()] += 1;
        }
    }

    fn mark_free(&mut self, ip: IpAddr) {
        self.generation += 1;
        let (family, value) = to_number(ip);
        self.occupied[family.index()].remove(value);
        if let Some(index) = self.pool_of(ip) {
            let used = &mut self.pools[index].used[family.index()];
            *used = used.saturating_sub(1);
        }
    }

    fn admits(&self, entry: &PoolEntry, consumer: &Consumer) -> bool {
        entry.conflict.is_none()
            && consumer
                .requests
                .pool
                .as_ref()
                .is_none_or(|name| *name == entry.pool.name)
            && entry.pool.admits(consumer)
    }

    fn offers_new(&self, entry: &PoolEntry, consumer: &Consumer) -> bool {
        self.admits(entry, consumer)
            && !entry.pool.disabled
            && (entry.pool.auto_assign
                || consumer.requests.pool.is_some()
                || !consumer.requests.ips.is_empty())
    }

    // ---- consumers ---------------------------------------------------------------------

    /// Gives `consumer` its addresses, keeping those it already holds while it may (they
    /// are in a usable pool that admits it, or in their grace period). Idempotent.
    ///
    /// A consumer that asks for other addresses than it holds moves only once all of them
    /// can be given; until then it keeps what it holds, with [`Notice::RequestPending`].
    /// What else there is to tell its owner is in [`Allocator::notices`].
    ///
    /// # Errors
    /// Why it cannot be satisfied; it then holds no address.
    pub fn allocate(&mut self, consumer: &Consumer) -> Result<Allocation, Unsatisfied> {
        let mut notices = Vec::new();
        let result = self.allocate_inner(consumer, &mut notices);
        if result.is_ok() {
            if let Some(slot) = self.find_slot(&consumer.id) {
                self.sharing_notices(consumer, slot, &mut notices);
            }
        }
        if notices.is_empty() || result.is_err() {
            self.notices.remove(&consumer.id);
        } else {
            self.notices.insert(consumer.id.clone(), notices);
        }
        result
    }

    /// Allocates every consumer in `consumers`, in order, until nothing more changes:
    /// the answers of a controller that reconciles everything.
    ///
    /// One pass is not enough when a consumer waits for an address that a consumer later
    /// in the order gives up (it moves to the address it asked for, or takes a shared
    /// one): those still waiting after a pass that changed what is held are tried again.
    /// A second call with the same consumers changes nothing. Returns each consumer's
    /// answer, in the order given.
    pub fn allocate_all(
        &mut self,
        consumers: &[&Consumer],
    ) -> Vec<Result<Allocation, Unsatisfied>> {
        let before = self.generation;
        let mut out: Vec<_> = consumers.iter().map(|c| self.allocate(c)).collect();
        let mut changed = self.generation != before;
        // A further pass that changes no answer leaves everything as it was, so it is the
        // last; the bound only guards against a cycle nobody has found.
        for _ in 0..consumers.len() {
            if !changed {
                break;
            }
            changed = false;
            for (c, answer) in consumers.iter().zip(out.iter_mut()) {
                if self.waiting(c, answer) {
                    let again = self.allocate(c);
                    changed |= again != *answer;
                    *answer = again;
                }
            }
        }
        out
    }

    /// Whether `consumer`, last answered `answer`, lacks something another consumer's
    /// change could give it.
    fn waiting(&self, consumer: &Consumer, answer: &Result<Allocation, Unsatisfied>) -> bool {
        match answer {
            Err(_) => true,
            Ok(a) => {
                a.ips().len() < consumer.wanted().families.len()
                    || self.notices.get(&consumer.id).is_some_and(|n| {
                        n.iter().any(|n| {
                            matches!(n, Notice::RequestPending { .. } | Notice::NotShared { .. })
                        })
                    })
            }
        }
    }

    fn allocate_inner(
        &mut self,
        consumer: &Consumer,
        notices: &mut Vec<Notice>,
    ) -> Result<Allocation, Unsatisfied> {
        let wanted = consumer.wanted();
        let slot = self.slot_for(consumer);
        self.refresh_share(slot, consumer);
        let asks_for_ips = !consumer.requests.ips.is_empty();
        let mut moving = false;
        for family in Family::ALL {
            if let Some(ip) = self.slot(slot).addr(family) {
                if !self.may_keep(consumer, ip) {
                    self.unhold(slot, family);
                } else if asks_for_ips && consumer.requested_ip(family) != Some(ip) {
                    moving = true;
                } else if !wanted.families.contains(&family) {
                    self.unhold(slot, family);
                }
            }
        }
        if moving {
            return Ok(self.move_to_requested(consumer, slot, notices));
        }
        let kept_some = !self.slot(slot).allocation().is_empty();
        let mut first_error = None;
        for &family in &wanted.families {
            if self.slot(slot).addr(family).is_some() {
                continue;
            }
            match self.pick(consumer, slot, family) {
                Ok(ip) => self.hold(slot, ip),
                Err(e) if wanted.all_required => {
                    self.drop_slot(slot);
                    if kept_some {
                        // Answer as a first allocation would, so that repeated calls give
                        // the same reason.
                        notices.clear();
                        return self.allocate_inner(consumer, notices);
                    }
                    return Err(e);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        let allocation = self.slot(slot).allocation();
        if allocation.is_empty() {
            self.drop_slot(slot);
            return Err(first_error.unwrap_or(Unsatisfied::NoMatchingPool {
                family: wanted.families.first().copied().unwrap_or(Family::V4),
            }));
        }
        Ok(allocation)
    }

    /// Moves a consumer that holds addresses other than those it asks for onto the
    /// requested ones, all or nothing: if any cannot be given it keeps what it holds.
    fn move_to_requested(
        &mut self,
        consumer: &Consumer,
        slot: u32,
        notices: &mut Vec<Notice>,
    ) -> Allocation {
        let mut picks = Vec::new();
        for &ip in &consumer.requests.ips {
            if self.slot(slot).addr(Family::of(ip)) == Some(ip) {
                continue;
            }
            match self.pick(consumer, slot, Family::of(ip)) {
                Ok(ip) => picks.push(ip),
                Err(why) => {
                    notices.push(Notice::RequestPending {
                        requested: consumer.requests.ips.clone(),
                        why,
                    });
                    return self.slot(slot).allocation();
                }
            }
        }
        for family in Family::ALL {
            if self.slot(slot).addr(family) != consumer.requested_ip(family) {
                self.unhold(slot, family);
            }
        }
        for ip in picks {
            self.hold(slot, ip);
        }
        self.slot(slot).allocation()
    }

    /// Records, for each address the consumer holds under a sharing key, why another
    /// address held under that key (in a pool that admits it) did not take it.
    fn sharing_notices(&self, consumer: &Consumer, slot: u32, notices: &mut Vec<Notice>) {
        let Some(sharing) = &consumer.requests.sharing else {
            return;
        };
        let Some(addresses) = self.shared.get(sharing.key.as_str()) else {
            return;
        };
        for family in Family::ALL {
            let Some(mine) = self.slot(slot).addr(family) else {
                continue;
            };
            let refusal = addresses
                .iter()
                .filter(|&&ip| ip != mine && Family::of(ip) == family)
                .filter(|&&ip| {
                    self.pool_of(ip)
                        .is_some_and(|i| self.admits(&self.pools[i], consumer))
                })
                .find_map(|&ip| self.share_check(consumer, Some(slot), ip).err());
            if let Some(why) = refusal {
                notices.push(Notice::NotShared {
                    key: sharing.key.clone(),
                    why,
                });
            }
        }
    }

    /// What there is to tell the owner of a consumer, as of its last
    /// [`Allocator::allocate`] (and, for grace periods, as of now): empty for a consumer
    /// that holds nothing or all is well with.
    #[must_use]
    pub fn notices(&self, id: &ConsumerId) -> Vec<Notice> {
        let Some(slot) = self.find_slot(id) else {
            return Vec::new();
        };
        let mut out: Vec<Notice> = self
            .slot(slot)
            .allocation()
            .ips()
            .into_iter()
            .filter_map(|ip| {
                self.orphans
                    .get(&ip)
                    .map(|&release_at| Notice::GracePeriod { ip, release_at })
            })
            .collect();
        out.extend(self.notices.get(id).into_iter().flatten().cloned());
        out
    }

    /// Consumers that keep an address while waiting for the one they asked for
    /// ([`Notice::RequestPending`]); reconcile them again when addresses are freed.
    pub fn pending_requests(&self) -> impl Iterator<Item = &ConsumerId> + '_ {
        self.notices
            .iter()
            .filter(|(_, n)| n.iter().any(|n| matches!(n, Notice::RequestPending { .. })))
            .map(|(id, _)| id)
    }

    /// Re-takes addresses a consumer held before a restart (from its status), at time
    /// `now` (seconds), where it may still hold them and they are not taken by someone it
    /// cannot share with. An address in no usable pool is kept for a grace period that
    /// starts now, as after a pool change. Returns the kept addresses. Restore every
    /// consumer first, then [`Allocator::allocate`] each, so that no consumer's new
    /// allocation takes another's old address.
    pub fn restore(&mut self, consumer: &Consumer, addresses: &[IpAddr], now: u64) -> Vec<IpAddr> {
        let wanted = consumer.wanted();
        let slot = self.slot_for(consumer);
        self.refresh_share(slot, consumer);
        let mut kept = Vec::new();
        for &ip in addresses {
            let family = Family::of(ip);
            let allowed = match self.pool_of(ip) {
                Some(index) => self.admits(&self.pools[index], consumer),
                None => self.grace_period > 0,
            };
            // A consumer asking for other addresses keeps what it held, of any family,
            // until they can be given (see `allocate`).
            let wanted_family =
                wanted.families.contains(&family) || !consumer.requests.ips.is_empty();
            if self.slot(slot).addr(family).is_some()
                || !wanted_family
                || !allowed
                || self.share_check(consumer, Some(slot), ip).is_err()
            {
                continue;
            }
            self.hold(slot, ip);
            if self.pool_of(ip).is_none() {
                self.orphans
                    .entry(ip)
                    .or_insert(now.saturating_add(self.grace_period));
            }
            kept.push(ip);
        }
        if self.slot(slot).allocation().is_empty() {
            self.drop_slot(slot);
        }
        kept
    }

    /// Forgets a consumer, freeing its addresses (a shared address stays with its other
    /// holders). Returns what it held.
    pub fn release(&mut self, id: &ConsumerId) -> Option<Allocation> {
        let slot = self.find_slot(id)?;
        let allocation = self.slot(slot).allocation();
        self.drop_slot(slot);
        Some(allocation)
    }

    /// What a consumer holds.
    #[must_use]
    pub fn allocation(&self, id: &ConsumerId) -> Option<Allocation> {
        self.find_slot(id).map(|s| self.slot(s).allocation())
    }

    /// Every consumer holding an address, with what it holds (in no particular order).
    pub fn allocations(&self) -> impl Iterator<Item = (ConsumerId, Allocation)> + '_ {
        self.slots
            .iter()
            .flatten()
            .map(|s| (s.id.to_id(), s.allocation()))
    }

    /// How many consumers hold addresses.
    #[must_use]
    pub fn consumer_count(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// The consumers holding `ip`.
    #[must_use]
    pub fn holders(&self, ip: IpAddr) -> Vec<ConsumerId> {
        let family = Family::of(ip);
        let mut out = Vec::new();
        let mut next = self.head(ip).map_or(NONE, |r| addr_ref_parts(r).0);
        while next != NONE {
            let s = self.slot(next);
            out.push(s.id.to_id());
            next = s.next(family);
        }
        out
    }

    fn slot(&self, slot: u32) -> &Slot {
        self.slots[slot as usize]
            .as_ref()
            .expect("slot numbers in the indexes are live")
    }

    fn slot_mut(&mut self, slot: u32) -> &mut Slot {
        self.slots[slot as usize]
            .as_mut()
            .expect("slot numbers in the indexes are live")
    }

    fn find_slot(&self, id: &ConsumerId) -> Option<u32> {
        let hash = id_hash(&self.hasher, id.kind, &id.namespace, &id.name);
        let slots = &self.slots;
        self.by_id
            .find(hash, |&s| {
                slots[s as usize]
                    .as_ref()
                    .is_some_and(|slot| slot.id.is(id))
            })
            .copied()
    }

    fn slot_for(&mut self, consumer: &Consumer) -> u32 {
        if let Some(slot) = self.find_slot(&consumer.id) {
            return slot;
        }
        let entry = Slot {
            id: StoredId {
                kind: consumer.id.kind,
                namespace: consumer.id.namespace.as_str().into(),
                name: consumer.id.name.as_str().into(),
            },
            v4: None,
            v6: None,
            share: ShareState::of(consumer),
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(entry);
                slot
            }
            None => {
                self.slots.push(Some(entry));
                (self.slots.len() - 1) as u32
            }
        };
        let hash = id_hash(
            &self.hasher,
            consumer.id.kind,
            &consumer.id.namespace,
            &consumer.id.name,
        );
        let (slots, hasher) = (&self.slots, &self.hasher);
        self.by_id.insert_unique(hash, slot, |&s| {
            let id = &slots[s as usize]
                .as_ref()
                .expect("indexed slots are live")
                .id;
            id_hash(hasher, id.kind, &id.namespace, &id.name)
        });
        slot
    }

    fn drop_slot(&mut self, slot: u32) {
        for family in Family::ALL {
            self.unhold(slot, family);
        }
        if !self.notices.is_empty() {
            let id = self.slot(slot).id.to_id();
            self.notices.remove(&id);
        }
        let id = &self.slot(slot).id;
        let hash = id_hash(&self.hasher, id.kind, &id.namespace, &id.name);
        if let Ok(entry) = self.by_id.find_entry(hash, |&s| s == slot) {
            entry.remove();
        }
        self.slots[slot as usize] = None;
        self.free_slots.push(slot);
    }

    /// The first holder of `ip`, as `slot << 1 | family`.
    fn head(&self, ip: IpAddr) -> Option<u32> {
        let hash = self.hasher.hash_one(ip);
        let slots = &self.slots;
        self.by_addr
            .find(hash, |&r| {
                let (s, family) = addr_ref_parts(r);
                slots[s as usize]
                    .as_ref()
                    .is_some_and(|slot| slot.addr(family) == Some(ip))
            })
            .copied()
    }

    /// Whether `consumer` may go on holding `ip`, its address requests aside: the address
    /// is in a usable pool that admits it, or in no usable pool but in its grace period.
    fn may_keep(&self, consumer: &Consumer, ip: IpAddr) -> bool {
        match self.pool_of(ip) {
            Some(index) => self.admits(&self.pools[index], consumer),
            None => self.orphans.contains_key(&ip),
        }
    }

    /// Whether `consumer` may hold `ip` next to its current holders.
    fn share_check(
        &self,
        consumer: &Consumer,
        own: Option<u32>,
        ip: IpAddr,
    ) -> Result<(), Unsatisfied> {
        let family = Family::of(ip);
        let mut next = self.head(ip).map_or(NONE, |r| addr_ref_parts(r).0);
        while next != NONE {
            let holder = self.slot(next);
            let current = next;
            next = holder.next(family);
            if Some(current) == own {
                continue;
            }
            let taken = || Unsatisfied::RequestedIpTaken {
                ip,
                by: holder.id.to_id(),
            };
            let (Some(theirs), Some(ours)) = (&holder.share, &consumer.requests.sharing) else {
                return Err(taken());
            };
            if *theirs.key != *ours.key {
                return Err(taken());
            }
            if *holder.id.namespace != *consumer.id.namespace {
                let accepted_here = ours.cross_namespace.allows(&holder.id.namespace);
                let accepted_there = theirs.cross.allows(&consumer.id.namespace);
                if !(accepted_here && accepted_there) {
                    return Err(Unsatisfied::CrossNamespaceNotAllowed {
                        ip,
                        with: holder.id.to_id(),
                        namespace: consumer.id.namespace.clone(),
                        accepted_here,
                        accepted_there,
                    });
                }
            }
            if theirs.policy != consumer.traffic_policy {
                return Err(Unsatisfied::TrafficPolicyMismatch {
                    ip,
                    with: holder.id.to_id(),
                });
            }
            if consumer.traffic_policy == TrafficPolicy::Local
                && theirs.endpoints != consumer.endpoint_selector
            {
                return Err(Unsatisfied::LocalEndpointsDiffer {
                    ip,
                    with: holder.id.to_id(),
                });
            }
            if let Some(port) = theirs.ports.iter().find(|p| consumer.ports.contains(p)) {
                return Err(Unsatisfied::PortConflict {
                    ip,
                    with: holder.id.to_id(),
                    port: *port,
                });
            }
        }
        Ok(())
    }

    /// Brings the slot's sharing terms up to date with the consumer's, giving up shared
    /// addresses whose other holders do not accept the new terms.
    fn refresh_share(&mut self, slot: u32, consumer: &Consumer) {
        let desired = ShareState::of(consumer);
        let same = match (&self.slot(slot).share, &desired) {
            (None, None) => true,
            (Some(a), Some(b)) => a.same_terms(b),
            _ => false,
        };
        if same {
            return;
        }
        for family in Family::ALL {
            if let Some(ip) = self.slot(slot).addr(family) {
                if self.share_check(consumer, Some(slot), ip).is_err() {
                    self.unhold(slot, family);
                }
            }
        }
        // Remaining addresses are either held alone or accepted by their co-holders.
        let old_key = self.slot(slot).share.as_ref().map(|s| s.key.clone());
        let next = self.slot(slot).share.as_ref().map_or([NONE; 2], |s| s.next);
        let held: Vec<IpAddr> = self.slot(slot).allocation().ips();
        for &ip in &held {
            let alone = self.holders(ip).len() == 1;
            if let (Some(key), true) = (&old_key, alone) {
                if let Some(set) = self.shared.get_mut(key) {
                    set.remove(&ip);
                    if set.is_empty() {
                        self.shared.remove(key);
                    }
                }
            }
        }
        let mut desired = desired;
        if let Some(d) = &mut desired {
            d.next = next;
            for &ip in &held {
                self.shared.entry(d.key.clone()).or_default().insert(ip);
            }
        }
        self.slot_mut(slot).share = desired;
    }

    fn pick(&self, consumer: &Consumer, slot: u32, family: Family) -> Result<IpAddr, Unsatisfied> {
        if let Some(ip) = consumer.requested_ip(family) {
            let Some(index) = self.pool_of(ip) else {
                return Err(Unsatisfied::RequestedIpOutsidePools { ip });
            };
            let entry = &self.pools[index];
            if !self.offers_new(entry, consumer) {
                return Err(Unsatisfied::RequestedIpNotAllowed {
                    ip,
                    pool: entry.pool.name.clone(),
                });
            }
            self.share_check(consumer, Some(slot), ip)?;
            return Ok(ip);
        }
        let offering: Vec<usize> = (0..self.pools.len())
            .filter(|&i| self.offers_new(&self.pools[i], consumer))
            .collect();
        let candidates: Vec<usize> = offering
            .iter()
            .copied()
            .filter(|&i| self.pools[i].pool.has_family(family))
            .collect();
        if candidates.is_empty() {
            return Err(if offering.is_empty() {
                Unsatisfied::NoMatchingPool { family }
            } else {
                Unsatisfied::FamilyUnavailable { family }
            });
        }
        // Join an address of the same sharing key where the holders accept us; where none
        // does (ports overlap, policies differ, namespaces not opted in), take a fresh one.
        if let Some(sharing) = &consumer.requests.sharing {
            for &ip in self.shared.get(sharing.key.as_str()).into_iter().flatten() {
                if Family::of(ip) == family
                    && self.pool_of(ip).is_some_and(|i| candidates.contains(&i))
                    && self.share_check(consumer, Some(slot), ip).is_ok()
                {
                    return Ok(ip);
                }
            }
        }
        for &index in &candidates {
            let skip = self.skip_fn(family, index);
            for r in self.pools[index]
                .pool
                .ranges
                .iter()
                .filter(|r| r.family == family)
            {
                if let Some(value) =
                    self.occupied[family.index()].first_free(r.first, r.last, &skip)
                {
                    return Ok(from_number(family, value));
                }
            }
        }
        Err(Unsatisfied::PoolExhausted {
            family,
            pools: candidates
                .iter()
                .map(|&i| self.pools[i].pool.name.clone())
                .collect(),
        })
    }

    /// Gives `ip` to the slot, joining its current holders if there are any (the caller
    /// has checked that they accept it).
    fn hold(&mut self, slot: u32, ip: IpAddr) {
        let family = Family::of(ip);
        let head = self.head(ip);
        self.slot_mut(slot).set_addr(family, Some(ip));
        let me = addr_ref(slot, family);
        let hash = self.hasher.hash_one(ip);
        match head {
            Some(head) => {
                if let Some(entry) = self.by_addr.find_mut(hash, |&r| r == head) {
                    *entry = me;
                }
                if let Some(share) = self.slot_mut(slot).share.as_mut() {
                    share.next[family.index()] = addr_ref_parts(head).0;
                }
            }
            None => {
                let (slots, hasher) = (&self.slots, &self.hasher);
                self.by_addr.insert_unique(hash, me, |&r| {
                    let (s, f) = addr_ref_parts(r);
                    hasher.hash_one(
                        slots[s as usize]
                            .as_ref()
                            .and_then(|slot| slot.addr(f))
                            .expect("indexed addresses are held"),
                    )
                });
                self.mark_occupied(ip);
                if let Some(key) = self.slot(slot).share.as_ref().map(|s| s.key.clone()) {
                    self.shared.entry(key).or_default().insert(ip);
                }
            }
        }
    }

    /// Takes the slot's address of `family` away, leaving it to any other holders.
    fn unhold(&mut self, slot: u32, family: Family) {
        let Some(ip) = self.slot(slot).addr(family) else {
            return;
        };
        let me = addr_ref(slot, family);
        let after_me = self.slot(slot).next(family);
        let head = self.head(ip);
        let hash = self.hasher.hash_one(ip);
        if head == Some(me) {
            if after_me == NONE {
                if let Ok(entry) = self.by_addr.find_entry(hash, |&r| r == me) {
                    entry.remove();
                }
                self.mark_free(ip);
                self.orphans.remove(&ip);
                if let Some(key) = self.slot(slot).share.as_ref().map(|s| s.key.clone()) {
                    if let Some(set) = self.shared.get_mut(&key) {
                        set.remove(&ip);
                        if set.is_empty() {
                            self.shared.remove(&key);
                        }
                    }
                }
            } else if let Some(entry) = self.by_addr.find_mut(hash, |&r| r == me) {
                *entry = addr_ref(after_me, family);
            }
        } else if let Some(head) = head {
            let mut cursor = addr_ref_parts(head).0;
            while cursor != NONE {
                let next = self.slot(cursor).next(family);
                if next == slot {
                    if let Some(share) = self.slot_mut(cursor).share.as_mut() {
                        share.next[family.index()] = after_me;
                    }
                    break;
                }
                cursor = next;
            }
        }
        let s = self.slot_mut(slot);
        s.set_addr(family, None);
        if let Some(share) = s.share.as_mut() {
            share.next[family.index()] = NONE;
        }
    }
}
