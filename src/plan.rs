//! World → plan, pure: the allocations ([`Ipam`], through `portico-ipam`) and one node's
//! [`NodePlan`] (routes per BGP peer, XDP services with their backends, addresses to hold).
//! No I/O: the runtime feeds a [`World`] in and hands the plan to the appliers.
//!
//! Rules (`docs/architecture.md` has the whole flow):
//! - A Service is Portico's when it is `type: LoadBalancer` with class `portico.io/lb`, or
//!   without a class when Portico is the default class.
//! - Backends come from the EndpointSlices labelled `kubernetes.io/service-name`: ready
//!   endpoints carry new flows (weight 1), serving-but-terminating ones only drain (weight 0,
//!   tracked flows continue), others are left out. With `externalTrafficPolicy: Local` only
//!   this node's endpoints count, and the XDP service keeps the client's source
//!   (`ServiceSpec::preserve_source`: no SNAT; the backends reply through this node).
//! - An address is announced to a peer when some BGPAdvertisement selects it (its pool's
//!   labels, the Service's labels, this node's labels, the peer's name) and the Service has
//!   a ready endpoint: anywhere for `Cluster`, on this node for `Local` (as MetalLB does).
//!   Several advertisements selecting one prefix for one peer merge their communities; for
//!   MED and LOCAL_PREF the first by name wins and a difference is reported.
//! - A Service's listeners are NAT unless it is annotated `portico.io/forwarding-mode: dsr`
//!   (direct server return, `portico.io/dsr-encapsulation: ipip` (the default) or `gue`);
//!   a bad value is a problem naming the annotation and its value, and the Service gets no
//!   listener and no route until it is fixed (docs/dsr.md).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use portico_announcer::decision::aggregate;
use portico_announcer::driver::PeerConfig;
use portico_announcer::RouteAttrs;
use portico_crds::{
    service_consumer, validate_advertisement, validate_peer, ClassPolicy, InvalidObject,
    PeerInputs, ValidAdvertisement,
};
use portico_ipam::{
    Allocator, Consumer, ConsumerId, ConsumerKind, Family, Labels, Pool, PoolState, TrafficPolicy,
    Usage,
};
use portico_xdp::{BackendSpec, Encapsulation, Forwarding, Protocol, ServiceKey, ServiceSpec};

use crate::world::{Kind, ObjectKey, World};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The label every node carries with its own name.
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";

/// Service annotation: how the XDP balancer reaches the backends, `nat` (the default) or
/// `dsr` (direct server return: the backends answer the clients themselves).
pub const FORWARDING_MODE: &str = "portico.io/forwarding-mode";
/// Service annotation, with `portico.io/forwarding-mode: dsr`: the outer header, `ipip`
/// (the default: IPIP, IP6IP6, 4in6 or 6in4 by the families) or `gue` (GUE in UDP).
pub const DSR_ENCAPSULATION: &str = "portico.io/dsr-encapsulation";

/// The forwarding mode a Service's annotations ask for; the error names the annotation and
/// its value.
///
/// # Errors
/// An unknown mode or encapsulation, or an encapsulation without `dsr`.
pub fn forwarding_of(annotations: Option<&BTreeMap<String, String>>) -> Result<Forwarding, String> {
    let get = |k: &str| annotations.and_then(|a| a.get(k)).map(String::as_str);
    let field = |k: &str, v: &str| format!("metadata.annotations[\"{k}\"] = {v:?}");
    let encapsulation = match get(DSR_ENCAPSULATION) {
        None | Some("ipip") => Encapsulation::Ipip,
        Some("gue") => Encapsulation::Gue,
        Some(v) => {
            return Err(format!(
                "{}: must be ipip or gue",
                field(DSR_ENCAPSULATION, v)
            ))
        }
    };
    match get(FORWARDING_MODE) {
        Some("dsr") => Ok(Forwarding::Dsr(encapsulation)),
        None | Some("nat") => match get(DSR_ENCAPSULATION) {
            Some(v) => Err(format!(
                "{}: only with {FORWARDING_MODE}: dsr",
                field(DSR_ENCAPSULATION, v)
            )),
            None => Ok(Forwarding::Nat),
        },
        Some(v) => Err(format!("{}: must be nat or dsr", field(FORWARDING_MODE, v))),
    }
}

/// A problem with one object, found while planning; the object is skipped (or its last good
/// state kept) and everything else goes on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectProblem {
    /// The object.
    pub object: ObjectKey,
    /// What is wrong, naming field and value where there is one.
    pub message: String,
}

fn key(kind: Kind, namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
}

fn invalid(kind: Kind, namespace: &str, name: &str, e: &InvalidObject) -> ObjectProblem {
    let message = e
        .errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    ObjectProblem {
        object: key(kind, namespace, name),
        message,
    }
}

/// Which node the plan is for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeIdentity {
    /// The node's name (`--node`).
    pub name: String,
    /// Extra labels (a `Node` object of that name in the world adds its own).
    pub labels: Labels,
    /// BGP Identifier for peers without `routerID`.
    pub router_id: Option<Ipv4Addr>,
}

impl NodeIdentity {
    /// The node's labels: `kubernetes.io/hostname`, then the Node object's, then the extra
    /// ones; and its router ID, falling back to the Node object's first IPv4 InternalIP.
    #[must_use]
    pub fn resolve(&self, world: &World) -> (Labels, Option<Ipv4Addr>) {
        let mut labels = Labels::new();
        labels.insert(HOSTNAME_LABEL.to_owned(), self.name.clone());
        let node = world.nodes.get(&self.name);
        if let Some(l) = node.and_then(|n| n.metadata.labels.as_ref()) {
            labels.extend(l.clone());
        }
        labels.extend(self.labels.clone());
        let from_node = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| {
                a.iter()
                    .filter(|a| a.type_ == "InternalIP")
                    .find_map(|a| a.address.parse::<Ipv4Addr>().ok())
            });
        (labels, self.router_id.or(from_node))
    }
}

/// What IPAM decided for one Service.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceAddresses {
    /// Its addresses, IPv4 first.
    pub addresses: Vec<IpAddr>,
    /// The pool of each address (same order).
    pub pools: Vec<String>,
    /// Why it has no (or not every) address: `Reason: message`.
    pub unsatisfied: Option<String>,
    /// What else the allocator says about it (grace period, pending request, not shared):
    /// `Reason: message`.
    pub notices: Vec<String>,
}

/// A pool as the status shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolReport {
    /// Ready, or why not.
    pub state: String,
    /// IPv4 counts.
    pub v4: Usage,
    /// IPv6 counts.
    pub v6: Usage,
}

/// What one IPAM pass produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IpamOutcome {
    /// Every Portico Service by (namespace, name).
    pub services: BTreeMap<(String, String), ServiceAddresses>,
    /// Every pool by name.
    pub pools: BTreeMap<String, PoolReport>,
    /// Problems with pools and Services.
    pub problems: Vec<ObjectProblem>,
}

impl IpamOutcome {
    /// The allocations to persist: `namespace/name` → addresses.
    #[must_use]
    pub fn allocations(&self) -> BTreeMap<String, Vec<IpAddr>> {
        self.services
            .iter()
            .filter(|(_, s)| !s.addresses.is_empty())
            .map(|((ns, n), s)| (format!("{ns}/{n}"), s.addresses.clone()))
            .collect()
    }
}

/// IPAM over successive worlds: the allocator and what was last applied to it.
#[derive(Debug, Default)]
pub struct Ipam {
    allocator: Allocator,
    pools: BTreeMap<String, Pool>,
    consumers: BTreeMap<ConsumerId, Consumer>,
    class: ClassPolicy,
    to_restore: Option<BTreeMap<String, Vec<IpAddr>>>,
}

impl Ipam {
    /// An empty allocator serving `class`; `saved` are the allocations persisted by an
    /// earlier run (`namespace/name` → addresses), re-taken on the first pass before anything
    /// new is allocated.
    #[must_use]
    pub fn new(class: ClassPolicy, saved: BTreeMap<String, Vec<IpAddr>>) -> Self {
        Ipam {
            class,
            to_restore: Some(saved),
            ..Ipam::default()
        }
    }

    /// When [`Ipam::reconcile`] must run again even if nothing changes (the end of a grace
    /// period), in the caller's seconds.
    #[must_use]
    pub fn next_deadline(&self) -> Option<u64> {
        self.allocator.next_deadline()
    }

    /// Brings the allocator in line with `world` at `now` (seconds, the caller's clock) and
    /// reports every Service's addresses.
    ///
    /// An invalid pool keeps its last valid spec; an invalid Service keeps its addresses
    /// until it is fixed or deleted; an address whose pool disappeared stays for the grace
    /// period. Idempotent: a second pass over the same world at the same time changes
    /// nothing.
    pub fn reconcile(&mut self, world: &World, now: u64) -> IpamOutcome {
        let mut out = IpamOutcome::default();
        self.allocator.handle_timeout(now);
        let mut pool_labels: BTreeMap<&str, Labels> = BTreeMap::new();
        for (name, pool) in &world.pools {
            pool_labels.insert(name, pool.metadata.labels.clone().unwrap_or_default());
            match pool.to_pool() {
                Ok(p) => {
                    if self.pools.get(name) != Some(&p) {
                        self.allocator.apply_pool(p.clone(), now);
                        self.pools.insert(name.clone(), p);
                    }
                }
                Err(e) => out.problems.push(ObjectProblem {
                    object: key(Kind::AddressPool, "", name),
                    message: format!(
                        "{e}{}",
                        if self.pools.contains_key(name) {
                            "; the last valid spec stays in force"
                        } else {
                            ""
                        }
                    ),
                }),
            }
        }
        let gone: Vec<String> = self
            .pools
            .keys()
            .filter(|n| !world.pools.contains_key(*n))
            .cloned()
            .collect();
        for name in gone {
            self.allocator.remove_pool(&name, now);
            self.pools.remove(&name);
        }

        let mut consumers = BTreeMap::new();
        for ((ns, name), svc) in &world.services {
            let ns_labels = world
                .namespaces
                .get(ns)
                .and_then(|n| n.metadata.labels.clone())
                .unwrap_or_default();
            let id = ConsumerId {
                kind: ConsumerKind::Service,
                namespace: ns.clone(),
                name: name.clone(),
            };
            match service_consumer(svc, &ns_labels, self.class) {
                Ok(Some(c)) => {
                    consumers.insert(id, c);
                }
                Ok(None) => {}
                Err(e) => {
                    let mut p = invalid(Kind::Service, ns, name, &e);
                    if let Some(old) = self.consumers.get(&id) {
                        p.message
                            .push_str("; its addresses are kept until it is fixed");
                        consumers.insert(id, old.clone());
                    }
                    out.problems.push(p);
                }
            }
        }
        for id in self.consumers.keys() {
            if !consumers.contains_key(id) {
                self.allocator.release(id);
            }
        }
        if let Some(saved) = self.to_restore.take() {
            for (id, c) in &consumers {
                if let Some(addrs) = saved.get(&format!("{}/{}", id.namespace, id.name)) {
                    self.allocator.restore(c, addrs, now);
                }
            }
        }
        let ordered: Vec<&Consumer> = consumers.values().collect();
        let answers = self.allocator.allocate_all(&ordered);
        for (((ns, name), c), answer) in consumers
            .iter()
            .map(|(id, c)| ((&id.namespace, &id.name), c))
            .zip(answers)
        {
            let entry = match answer {
                Ok(a) => {
                    let addresses = a.ips();
                    let wanted = c.families.len().max(1);
                    let unsatisfied = (addresses.len() < wanted
                        && c.families.len() > 1
                        && c.family_policy != portico_ipam::FamilyPolicy::SingleStack)
                        .then(|| {
                            "PartialAllocation: not every requested family has an address"
                                .to_owned()
                        });
                    ServiceAddresses {
                        pools: addresses.iter().map(|ip| self.pool_of(*ip)).collect(),
                        addresses,
                        unsatisfied,
                        notices: Vec::new(),
                    }
                }
                Err(e) => ServiceAddresses {
                    unsatisfied: Some(format!("{}: {e}", e.reason())),
                    ..ServiceAddresses::default()
                },
            };
            let mut entry = entry;
            entry.notices = self
                .allocator
                .notices(&c.id)
                .iter()
                .map(|n| format!("{}: {n}", n.reason()))
                .collect();
            out.services.insert((ns.clone(), name.clone()), entry);
        }
        self.consumers = consumers;

        for name in world.pools.keys() {
            if let Some(s) = self.allocator.pool_status(name) {
                let state = match &s.state {
                    PoolState::Ready => "Ready".to_owned(),
                    PoolState::Conflict { with } => format!("Conflict with {with}"),
                };
                out.pools.insert(
                    name.clone(),
                    PoolReport {
                        state,
                        v4: s.v4,
                        v6: s.v6,
                    },
                );
            } else {
                out.pools.insert(
                    name.clone(),
                    PoolReport {
                        state: "InvalidSpec".to_owned(),
                        v4: Usage::default(),
                        v6: Usage::default(),
                    },
                );
            }
        }
        out.problems.sort();
        out
    }

    /// The pool holding `ip`, by name (empty when none does any more).
    fn pool_of(&self, ip: IpAddr) -> String {
        let (family, value) = match ip {
            IpAddr::V4(a) => (Family::V4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (Family::V6, u128::from(a)),
        };
        self.pools
            .values()
            .find(|p| p.ranges.iter().any(|r| r.contains(family, value)))
            .map(|p| p.name.clone())
            .unwrap_or_default()
    }
}

/// One BGP peer of this node and the routes it should carry.
#[derive(Debug, Clone)]
pub struct PeerPlan {
    /// The BGPPeer's name.
    pub name: String,
    /// Session configuration.
    pub config: PeerConfig,
    /// Every prefix with its attributes.
    pub routes: BTreeMap<IpNet, RouteAttrs>,
}

/// How one Service looks from this node.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceView {
    /// Ready endpoints (this node's only, for `Local`).
    pub ready: usize,
    /// Endpoints that carry or drain flows.
    pub total: usize,
    /// Whether this node announces its addresses to at least one peer.
    pub announced: bool,
    /// Its traffic policy.
    pub local: bool,
    /// Its XDP listeners.
    pub listeners: Vec<ServiceKey>,
}

/// What one node should have.
#[derive(Debug, Clone, Default)]
pub struct NodePlan {
    /// BGP peers by address.
    pub peers: BTreeMap<IpAddr, PeerPlan>,
    /// XDP services by listener.
    pub services: BTreeMap<ServiceKey, ServiceSpec>,
    /// Addresses to hold on the local link (those this node announces).
    pub held: BTreeSet<IpAddr>,
    /// Per Service, for status.
    pub views: BTreeMap<(String, String), ServiceView>,
    /// Problems with peers, advertisements, Secrets and endpoints.
    pub problems: Vec<ObjectProblem>,
}

/// Endpoints of one Service port for one family: (address, port, ready, weight).
struct Endpoints {
    backends: Vec<BackendSpec>,
    ready: usize,
}

fn secret_password(world: &World, ns: &str, name: &str, key: &str) -> Option<String> {
    let s = world.secrets.get(&(ns.to_owned(), name.to_owned()))?;
    if let Some(v) = s.string_data.as_ref().and_then(|d| d.get(key)) {
        return Some(v.clone());
    }
    let bytes = s.data.as_ref()?.get(key)?;
    String::from_utf8(bytes.0.clone()).ok()
}

/// The plan of `node` for `world` as IPAM left it.
#[must_use]
pub fn node_plan(world: &World, ipam: &IpamOutcome, node: &NodeIdentity) -> NodePlan {
    let mut plan = NodePlan::default();
    let (labels, router_id) = node.resolve(world);

    // Peers this node talks to.
    let mut peer_names: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (name, peer) in &world.peers {
        let password = peer
            .spec
            .password_secret_ref
            .as_ref()
            .and_then(|r| secret_password(world, &r.namespace, &r.name, &r.key));
        let inputs = PeerInputs {
            node_router_id: router_id,
            password: password.as_deref(),
        };
        match validate_peer(name, &peer.spec, &inputs) {
            Ok(v) if v.node_selector.matches(&labels) => {
                let addr = v.peer.address;
                if let Some(first) = peer_names.get(&addr) {
                    plan.problems.push(ObjectProblem {
                        object: key(Kind::BgpPeer, "", name),
                        message: format!(
                            "spec.peerAddress = \"{addr}\": BGPPeer {first} already peers with this address from this node; ignored"
                        ),
                    });
                    continue;
                }
                peer_names.insert(addr, name.clone());
                plan.peers.insert(
                    addr,
                    PeerPlan {
                        name: name.clone(),
                        config: v.peer,
                        routes: BTreeMap::new(),
                    },
                );
            }
            Ok(_) => {}
            Err(e) => plan.problems.push(invalid(Kind::BgpPeer, "", name, &e)),
        }
    }

    let mut advertisements: Vec<ValidAdvertisement> = Vec::new();
    for (name, adv) in &world.advertisements {
        match validate_advertisement(name, &adv.spec) {
            Ok(v) if v.node_selector.matches(&labels) => advertisements.push(v),
            Ok(_) => {}
            Err(e) => plan
                .problems
                .push(invalid(Kind::BgpAdvertisement, "", name, &e)),
        }
    }

    // EndpointSlices by Service.
    let mut slices: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
    for ((ns, _), slice) in &world.endpoint_slices {
        if let Some(svc) = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        {
            slices.entry((ns, svc)).or_default().push(slice);
        }
    }

    let mut conflicts = BTreeSet::new();
    for ((ns, name), addrs) in &ipam.services {
        let Some(svc) = world.services.get(&(ns.clone(), name.clone())) else {
            continue;
        };
        let Some(spec) = &svc.spec else { continue };
        let forwarding = match forwarding_of(svc.metadata.annotations.as_ref()) {
            Ok(f) => f,
            Err(message) => {
                plan.problems.push(ObjectProblem {
                    object: key(Kind::Service, ns, name),
                    message,
                });
                continue;
            }
        };
        let local = spec.external_traffic_policy.as_deref() == Some("Local");
        let svc_slices = slices.get(&(ns.as_str(), name.as_str()));
        let svc_labels = svc.metadata.labels.clone().unwrap_or_default();
        let mut view = ServiceView {
            local,
            ..ServiceView::default()
        };
        let mut ready_any = false;
        for &vip in &addrs.addresses {
            for p in spec.ports.iter().flatten() {
                let Ok(port) = u16::try_from(p.port) else {
                    continue;
                };
                let proto = match p.protocol.as_deref() {
                    None | Some("TCP") => Protocol::Tcp,
                    Some("UDP") => Protocol::Udp,
                    Some("SCTP") => Protocol::Sctp,
                    Some(_) => continue,
                };
                let eps = endpoints(
                    svc,
                    p.name.as_deref().unwrap_or(""),
                    p.protocol.as_deref().unwrap_or("TCP"),
                    vip,
                    svc_slices.map_or(&[][..], Vec::as_slice),
                    local.then_some(node.name.as_str()),
                );
                ready_any |= eps.ready > 0;
                view.ready = view.ready.max(eps.ready);
                view.total = view.total.max(eps.backends.len());
                let key = ServiceKey { vip, port, proto };
                view.listeners.push(key);
                plan.services.insert(
                    key,
                    ServiceSpec {
                        key,
                        backends: eps.backends,
                        hash_source_only: spec.session_affinity.as_deref() == Some("ClientIP"),
                        // Local: the backends are this node's, so their replies come back
                        // through it, and the backend sees the client's address (with DSR
                        // it does anyway: nothing to keep).
                        preserve_source: local && forwarding == Forwarding::Nat,
                        forwarding,
                    },
                );
            }
        }
        let policy = if local {
            TrafficPolicy::Local
        } else {
            TrafficPolicy::Cluster
        };
        if ready_any {
            for (&vip, pool) in addrs.addresses.iter().zip(&addrs.pools) {
                let pool_labels = world
                    .pools
                    .get(pool)
                    .and_then(|p| p.metadata.labels.clone())
                    .unwrap_or_default();
                for peer in plan.peers.values_mut() {
                    let mut chosen: Option<(IpNet, RouteAttrs, &str)> = None;
                    for adv in &advertisements {
                        if !adv.pool_selector.matches(&pool_labels)
                            || !adv.service_selector.matches(&svc_labels)
                            || !(adv.peers.is_empty() || adv.peers.contains(&peer.name))
                        {
                            continue;
                        }
                        let prefix =
                            aggregate([vip], adv.aggregation_length, adv.aggregation_length_v6)[0];
                        match &mut chosen {
                            None => chosen = Some((prefix, adv.attrs.clone(), &adv.name)),
                            Some((p, attrs, first)) => {
                                merge_attrs(attrs, &adv.attrs);
                                if (attrs.med, attrs.local_pref)
                                    != (adv.attrs.med, adv.attrs.local_pref)
                                    && (adv.attrs.med.is_some() || adv.attrs.local_pref.is_some())
                                {
                                    conflicts.insert(ObjectProblem {
                                        object: key(Kind::BgpAdvertisement, "", &adv.name),
                                        message: format!(
                                            "selects {vip} for BGPPeer {} with another MED or LOCAL_PREF than BGPAdvertisement {first}; {first}'s are used",
                                            peer.name
                                        ),
                                    });
                                }
                                // The longest (most specific) aggregation wins.
                                if prefix.prefix_len() > p.prefix_len() {
                                    *p = prefix;
                                }
                            }
                        }
                    }
                    if let Some((prefix, attrs, _)) = chosen {
                        match peer.routes.get_mut(&prefix) {
                            Some(existing) => merge_attrs(existing, &attrs),
                            None => {
                                peer.routes.insert(prefix, attrs);
                            }
                        }
                        view.announced = true;
                        plan.held.insert(vip);
                    }
                }
            }
        }
        let _ = policy;
        plan.views.insert((ns.clone(), name.clone()), view);
    }
    plan.problems.extend(conflicts);
    plan.problems.sort();
    plan
}

/// Adds `other`'s communities to `into` (sorted, without duplicates).
fn merge_attrs(into: &mut RouteAttrs, other: &RouteAttrs) {
    into.communities.extend(&other.communities);
    into.communities.sort_unstable();
    into.communities.dedup();
    into.large_communities.extend(&other.large_communities);
    into.large_communities.sort_unstable();
    into.large_communities.dedup();
}

/// The backends of one Service port for `vip`: those of the VIP's family; when the Service
/// has no endpoint slice of that family for the port, those of the other family, which the
/// XDP balancer reaches by NAT46/NAT64 (an IPv4 address in front of an IPv6-only workload,
/// a Gateway of one family routing to Services of the other).
fn endpoints(
    svc: &Service,
    port_name: &str,
    protocol: &str,
    vip: IpAddr,
    slices: &[&EndpointSlice],
    only_node: Option<&str>,
) -> Endpoints {
    let _ = svc;
    let same = endpoints_of(port_name, protocol, vip.is_ipv4(), slices, only_node);
    if same.1 {
        return same.0;
    }
    endpoints_of(port_name, protocol, !vip.is_ipv4(), slices, only_node).0
}

/// The backends of one Service port among the slices of one family, and whether any slice
/// of that family has the port at all.
fn endpoints_of(
    port_name: &str,
    protocol: &str,
    v4: bool,
    slices: &[&EndpointSlice],
    only_node: Option<&str>,
) -> (Endpoints, bool) {
    let family = if v4 { "IPv4" } else { "IPv6" };
    let mut has_port = false;
    let mut backends: BTreeMap<(IpAddr, u16), u32> = BTreeMap::new();
    let mut ready = 0;
    for slice in slices.iter().filter(|s| s.address_type == family) {
        let Some(target) = slice.ports.iter().flatten().find_map(|p| {
            let name_matches = p.name.as_deref().unwrap_or("") == port_name;
            let proto_matches = p.protocol.as_deref().unwrap_or("TCP") == protocol;
            (name_matches && proto_matches)
                .then_some(p.port)
                .flatten()
                .and_then(|port| u16::try_from(port).ok())
                .filter(|p| *p != 0)
        }) else {
            continue;
        };
        has_port = true;
        for ep in slice.endpoints.iter().flatten() {
            if only_node.is_some_and(|n| ep.node_name.as_deref() != Some(n)) {
                continue;
            }
            let c = ep.conditions.as_ref();
            let is_ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(is_ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let weight = if is_ready && !terminating {
                1
            } else if serving {
                0
            } else {
                continue;
            };
            for a in &ep.addresses {
                let Ok(addr) = a.parse::<IpAddr>() else {
                    continue;
                };
                if addr.is_ipv4() != v4 {
                    continue;
                }
                let w = backends.entry((addr, target)).or_insert(0);
                if weight > *w {
                    *w = weight;
                }
            }
        }
    }
    let backends: Vec<BackendSpec> = backends
        .into_iter()
        .map(|((addr, port), weight)| {
            if weight > 0 {
                ready += 1;
            }
            BackendSpec { addr, port, weight }
        })
        .collect();
    (Endpoints { backends, ready }, has_port)
}
