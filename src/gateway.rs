//! Gateway API (experimental channel: TCPRoute, UDPRoute) on the shared model, decided
//! without I/O.
//!
//! A Gateway of a GatewayClass whose `controllerName` is [`GATEWAY_CONTROLLER`] enters the
//! model as a *synthetic* LoadBalancer Service ([`with_gateways`]): named
//! `gateway.<name>` (a dot cannot occur in a Service name, so it never collides), with the
//! Gateway's labels and `spec.infrastructure.labels` (pool selection), its TCP, UDP and
//! `portico.io/SCTP` listeners as ports, the `IPAddress` values of `spec.addresses` as
//! requested addresses, and `status.addresses` as what a new leader restores. IPAM then
//! allocates Gateways and Services from one allocator, and the agent plans Gateways'
//! listeners with the same `node_plan`: [`gateway_endpoint_slices`] turns the routes'
//! backendRefs into EndpointSlices of the synthetic Service (target ports resolved through
//! the backend Service's port name, weight 0 left out).
//!
//! [`decide_gateways`] writes: GatewayClass `Accepted`; Gateway `status.addresses`,
//! `Accepted` (`UnsupportedAddress` for address types other than `IPAddress`) and
//! `Programmed` (`AddressNotAssigned`, `AddressNotUsable`), listener status
//! (`supportedKinds`, `attachedRoutes`, `Accepted`/`UnsupportedProtocol` for HTTP, HTTPS
//! and TLS); each route's `status.parents` entries of this controller (`Accepted`,
//! `NotAllowedByListeners`, `NoMatchingParent`; `ResolvedRefs`, `RefNotPermitted` for a
//! cross-namespace backend without a ReferenceGrant, `BackendNotFound`, `InvalidKind`),
//! leaving other controllers' entries as they are.

use std::collections::{BTreeMap, BTreeSet};

use gateway_api::experimental::gatewayclasses::{GatewayClass, GatewayClassStatus};
use gateway_api::experimental::gateways::{
    Gateway, GatewayListenersAllowedRoutesNamespacesFrom as From, GatewayStatus,
    GatewayStatusAddresses, GatewayStatusListeners, GatewayStatusListenersSupportedKinds,
};
use gateway_api::experimental::referencegrants::ReferenceGrant;
use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Service, ServicePort, ServiceSpec,
    ServiceStatus as KubeServiceStatus,
};
use k8s_openapi::api::discovery::v1::{EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time};
use portico_crds::LOAD_BALANCER_CLASS;
use serde::{Deserialize, Serialize};

use crate::plan::{IpamOutcome, SERVICE_NAME_LABEL};
use crate::world::World;

/// The `controllerName` of Portico's GatewayClasses.
pub const GATEWAY_CONTROLLER: &str = "portico.io/gateway-controller";

/// The implementation-specific SCTP listener protocol.
pub const SCTP_PROTOCOL: &str = "portico.io/SCTP";

/// The Gateway API group.
pub const GROUP: &str = "gateway.networking.k8s.io";

/// The synthetic Service name of Gateway `name`.
#[must_use]
pub fn synthetic_name(name: &str) -> String {
    format!("gateway.{name}")
}

/// Whether a Service name is a Gateway's synthetic Service (real Service names have no
/// dot).
#[must_use]
pub fn is_synthetic(name: &str) -> bool {
    name.starts_with("gateway.")
}

/// TCPRoute or UDPRoute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RouteKind {
    /// `TCPRoute`.
    Tcp,
    /// `UDPRoute`.
    Udp,
}

impl RouteKind {
    /// The kind as written.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Tcp => "TCPRoute",
            RouteKind::Udp => "UDPRoute",
        }
    }
}

/// A parentRef (TCPRoute and UDPRoute share the shape).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParentRef {
    /// Group (default `gateway.networking.k8s.io`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Kind (default `Gateway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Listener name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// Listener port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// A backendRef.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BackendRef {
    /// Group (default core).
    #[serde(default)]
    pub group: Option<String>,
    /// Kind (default `Service`).
    #[serde(default)]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's).
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Service port.
    #[serde(default)]
    pub port: Option<i32>,
    /// Relative weight (default 1; 0: no traffic).
    #[serde(default)]
    pub weight: Option<i32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RouteRule {
    #[serde(default)]
    backend_refs: Vec<BackendRef>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RouteSpecJson {
    #[serde(default)]
    parent_refs: Vec<ParentRef>,
    #[serde(default)]
    rules: Vec<RouteRule>,
}

/// A TCPRoute or UDPRoute, as the decisions need it.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Which kind.
    pub kind: RouteKind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// `metadata.resourceVersion`.
    pub resource_version: Option<String>,
    /// `spec.parentRefs`.
    pub parent_refs: Vec<ParentRef>,
    /// Every rule's backendRefs.
    pub backends: Vec<BackendRef>,
    /// `status.parents` as stored (JSON), this controller's and others'.
    pub status_parents: Vec<serde_json::Value>,
}

impl Route {
    /// From a TCPRoute's or UDPRoute's JSON (the two share their shape).
    ///
    /// # Errors
    /// The JSON is not a route.
    pub fn from_json(kind: RouteKind, v: &serde_json::Value) -> Result<Route, serde_json::Error> {
        let spec: RouteSpecJson = serde_json::from_value(v["spec"].clone())?;
        let meta = &v["metadata"];
        Ok(Route {
            kind,
            namespace: meta["namespace"].as_str().unwrap_or_default().to_owned(),
            name: meta["name"].as_str().unwrap_or_default().to_owned(),
            generation: meta["generation"].as_i64(),
            resource_version: meta["resourceVersion"].as_str().map(str::to_owned),
            parent_refs: spec.parent_refs,
            backends: spec
                .rules
                .into_iter()
                .flat_map(|r| r.backend_refs)
                .collect(),
            status_parents: v["status"]["parents"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        })
    }
}

/// The Gateway API objects Portico reads.
#[derive(Debug, Clone, Default)]
pub struct GatewayWorld {
    /// GatewayClasses by name.
    pub classes: BTreeMap<String, GatewayClass>,
    /// Gateways by (namespace, name).
    pub gateways: BTreeMap<(String, String), Gateway>,
    /// Routes by (kind, namespace, name).
    pub routes: BTreeMap<(RouteKind, String, String), Route>,
    /// ReferenceGrants by (namespace, name).
    pub grants: BTreeMap<(String, String), ReferenceGrant>,
}

impl GatewayWorld {
    /// Whether `gw` is of one of Portico's GatewayClasses.
    #[must_use]
    pub fn ours(&self, gw: &Gateway) -> bool {
        self.classes
            .get(&gw.spec.gateway_class_name)
            .is_some_and(|c| c.spec.controller_name == GATEWAY_CONTROLLER)
    }

    /// Portico's Gateways.
    pub fn our_gateways(&self) -> impl Iterator<Item = (&(String, String), &Gateway)> {
        self.gateways.iter().filter(|(_, g)| self.ours(g))
    }
}

/// Listeners of `gw` that Portico serves but that share their port and transport with
/// another one: every one of them is conflicted, none is programmed (L4 listeners have no
/// hostname to tell them apart).
fn conflicted_listeners(gw: &Gateway) -> BTreeSet<String> {
    let mut by_port: BTreeMap<(i32, &str), Vec<&str>> = BTreeMap::new();
    for l in &gw.spec.listeners {
        if let Some(proto) = listener_protocol(&l.protocol) {
            by_port.entry((l.port, proto)).or_default().push(&l.name);
        }
    }
    by_port
        .into_values()
        .filter(|names| names.len() > 1)
        .flatten()
        .map(str::to_owned)
        .collect()
}

/// The protocol a listener is served with, or `None` when Portico does not serve it.
fn listener_protocol(protocol: &str) -> Option<&'static str> {
    match protocol {
        "TCP" => Some("TCP"),
        "UDP" => Some("UDP"),
        SCTP_PROTOCOL => Some("SCTP"),
        _ => None,
    }
}

/// The route kind a listener protocol takes (SCTP listeners take TCPRoutes: a route
/// only names backends, the listener says how they are reached).
fn route_kind_of(protocol: &str) -> Option<RouteKind> {
    match protocol {
        "TCP" | SCTP_PROTOCOL => Some(RouteKind::Tcp),
        "UDP" => Some(RouteKind::Udp),
        _ => None,
    }
}

/// Requested addresses and unsupported address types of a Gateway.
fn requested_addresses(gw: &Gateway) -> (Vec<String>, Vec<String>) {
    let mut ips = Vec::new();
    let mut unsupported = Vec::new();
    for a in gw.spec.addresses.iter().flatten() {
        match a.r#type.as_deref() {
            None | Some("IPAddress") => {
                if let Some(v) = &a.value {
                    ips.push(v.clone());
                }
            }
            Some(other) => unsupported.push(other.to_owned()),
        }
    }
    (ips, unsupported)
}

/// The synthetic Service of a Gateway (see the module doc); `None` when it asks for an
/// address type Portico does not support (nothing is allocated then).
#[must_use]
pub fn synthetic_service(namespace: &str, gw: &Gateway) -> Option<Service> {
    let (ips, unsupported) = requested_addresses(gw);
    if !unsupported.is_empty() {
        return None;
    }
    let mut labels = gw.metadata.labels.clone().unwrap_or_default();
    if let Some(l) = gw
        .spec
        .infrastructure
        .as_ref()
        .and_then(|i| i.labels.as_ref())
    {
        labels.extend(l.clone());
    }
    // Portico's annotations (pool, sharing key) work on a Gateway as on a Service, on the
    // object or in spec.infrastructure; spec.addresses wins over portico.io/ips.
    let mut annotations = gw.metadata.annotations.clone().unwrap_or_default();
    if let Some(a) = gw
        .spec
        .infrastructure
        .as_ref()
        .and_then(|i| i.annotations.as_ref())
    {
        annotations.extend(a.clone());
    }
    if !ips.is_empty() {
        annotations.insert("portico.io/ips".to_owned(), ips.join(","));
    }
    let v6 = |s: &String| s.contains(':');
    let families: Vec<String> = match (ips.iter().any(|s| !v6(s)), ips.iter().any(v6)) {
        (false, true) => vec!["IPv6".into()],
        (true, true) => vec!["IPv4".into(), "IPv6".into()],
        _ => vec!["IPv4".into()],
    };
    let conflicted = conflicted_listeners(gw);
    let ports = gw
        .spec
        .listeners
        .iter()
        .filter(|l| !conflicted.contains(&l.name))
        .filter_map(|l| {
            Some(ServicePort {
                name: Some(l.name.clone()),
                port: l.port,
                protocol: Some(listener_protocol(&l.protocol)?.to_owned()),
                ..ServicePort::default()
            })
        })
        .collect();
    let ingress: Vec<LoadBalancerIngress> = gw
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.r#type.as_deref().is_none_or(|t| t == "IPAddress"))
        .map(|a| LoadBalancerIngress {
            ip: Some(a.value.clone()),
            ..LoadBalancerIngress::default()
        })
        .collect();
    Some(Service {
        metadata: ObjectMeta {
            name: Some(synthetic_name(
                &gw.metadata.name.clone().unwrap_or_default(),
            )),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            annotations: Some(annotations),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: Some(LOAD_BALANCER_CLASS.into()),
            ip_family_policy: Some(
                if families.len() > 1 {
                    "RequireDualStack"
                } else {
                    "SingleStack"
                }
                .into(),
            ),
            ip_families: Some(families),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        status: (!ingress.is_empty()).then(|| KubeServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(ingress),
            }),
            ..KubeServiceStatus::default()
        }),
    })
}

/// `world` with a synthetic Service for each of Portico's Gateways.
#[must_use]
pub fn with_gateways(world: &World, gws: &GatewayWorld) -> World {
    let mut out = world.clone();
    for ((ns, name), gw) in gws.our_gateways() {
        if let Some(svc) = synthetic_service(ns, gw) {
            out.services.insert((ns.clone(), synthetic_name(name)), svc);
        }
    }
    out
}

/// Which listeners of which Gateway a route's parentRef attaches to.
struct Attachment {
    /// Portico's Gateway (namespace, name), if the parentRef names one.
    gateway: Option<(String, String)>,
    /// Listener names accepted.
    listeners: Vec<String>,
    /// Why none, if none: (reason, message).
    refused: Option<(&'static str, String)>,
}

fn namespace_labels(world: &World, ns: &str) -> BTreeMap<String, String> {
    world
        .namespaces
        .get(ns)
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default()
}

fn attach(world: &World, gws: &GatewayWorld, route: &Route, p: &ParentRef) -> Attachment {
    let none = |reason, message: String| Attachment {
        gateway: None,
        listeners: Vec::new(),
        refused: Some((reason, message)),
    };
    if p.group.as_deref().unwrap_or(GROUP) != GROUP
        || p.kind.as_deref().unwrap_or("Gateway") != "Gateway"
    {
        return none("NoMatchingParent", "parentRef is not a Gateway".into());
    }
    let ns = p
        .namespace
        .clone()
        .unwrap_or_else(|| route.namespace.clone());
    let key = (ns, p.name.clone());
    let Some(gw) = gws.gateways.get(&key).filter(|g| gws.ours(g)) else {
        return none(
            "NoMatchingParent",
            format!("no Portico Gateway {}/{}", key.0, key.1),
        );
    };
    let mut matched_ref = false;
    let mut listeners = Vec::new();
    let conflicted = conflicted_listeners(gw);
    for l in gw
        .spec
        .listeners
        .iter()
        .filter(|l| !conflicted.contains(&l.name))
    {
        if p.section_name.as_ref().is_some_and(|s| *s != l.name)
            || p.port.is_some_and(|port| port != l.port)
        {
            continue;
        }
        matched_ref = true;
        if route_kind_of(&l.protocol) != Some(route.kind) {
            continue;
        }
        let namespaces = l
            .allowed_routes
            .as_ref()
            .and_then(|a| a.namespaces.as_ref());
        let allowed = match namespaces.and_then(|n| n.from.as_ref()) {
            None | Some(From::Same) => route.namespace == key.0,
            Some(From::All) => true,
            Some(From::Selector) => {
                let labels = namespace_labels(world, &route.namespace);
                namespaces
                    .and_then(|n| n.selector.as_ref())
                    .and_then(|s| {
                        let mut sel = portico_ipam::LabelSelector::everything();
                        for (k, v) in s.match_labels.iter().flatten() {
                            sel = sel.with_label(k, v);
                        }
                        for e in s.match_expressions.iter().flatten() {
                            let op = match e.operator.as_str() {
                                "In" => portico_ipam::Operator::In,
                                "NotIn" => portico_ipam::Operator::NotIn,
                                "Exists" => portico_ipam::Operator::Exists,
                                "DoesNotExist" => portico_ipam::Operator::DoesNotExist,
                                // An operator Kubernetes does not define selects nothing.
                                _ => return None,
                            };
                            let values: Vec<&str> =
                                e.values.iter().flatten().map(String::as_str).collect();
                            sel = sel.with_expression(&e.key, op, &values);
                        }
                        Some(sel)
                    })
                    .is_some_and(|sel| sel.matches(&labels))
            }
        };
        if let Some(kinds) = l.allowed_routes.as_ref().and_then(|a| a.kinds.as_ref()) {
            if !kinds.iter().any(|k| k.kind == route.kind.name()) {
                continue;
            }
        }
        if allowed {
            listeners.push(l.name.clone());
        }
    }
    let refused = if listeners.is_empty() {
        Some(if matched_ref {
            (
                "NotAllowedByListeners",
                format!(
                    "no listener of Gateway {}/{} takes {}s from namespace {}",
                    key.0,
                    key.1,
                    route.kind.name(),
                    route.namespace
                ),
            )
        } else {
            (
                "NoMatchingParent",
                format!(
                    "Gateway {}/{} has no listener matching sectionName/port",
                    key.0, key.1
                ),
            )
        })
    } else {
        None
    };
    Attachment {
        gateway: Some(key),
        listeners,
        refused,
    }
}

/// Whether a ReferenceGrant in `to_ns` lets `route` refer to Service `name` there.
fn granted(gws: &GatewayWorld, route: &Route, to_ns: &str, name: &str) -> bool {
    gws.grants.iter().any(|((ns, _), g)| {
        ns == to_ns
            && g.spec.from.iter().any(|f| {
                f.group == GROUP && f.kind == route.kind.name() && f.namespace == route.namespace
            })
            && g.spec.to.iter().any(|t| {
                t.group.is_empty()
                    && t.kind == "Service"
                    && t.name.as_deref().is_none_or(|n| n == name)
            })
    })
}

/// Whether a route's backendRefs resolve: `Ok` or (reason, message).
fn resolve(world: &World, gws: &GatewayWorld, route: &Route) -> Result<(), (&'static str, String)> {
    for b in &route.backends {
        if !b.group.as_deref().unwrap_or("").is_empty()
            || b.kind.as_deref().unwrap_or("Service") != "Service"
        {
            return Err((
                "InvalidKind",
                format!("backendRef {} is not a core Service", b.name),
            ));
        }
        let ns = b
            .namespace
            .clone()
            .unwrap_or_else(|| route.namespace.clone());
        if ns != route.namespace && !granted(gws, route, &ns, &b.name) {
            return Err((
                "RefNotPermitted",
                format!(
                    "backendRef {ns}/{} needs a ReferenceGrant in namespace {ns}",
                    b.name
                ),
            ));
        }
        if !world.services.contains_key(&(ns.clone(), b.name.clone())) {
            return Err((
                "BackendNotFound",
                format!("Service {ns}/{} does not exist", b.name),
            ));
        }
    }
    Ok(())
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
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
        observed_generation: generation,
    }
}

/// Status writes of one pass over the Gateway API objects.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewayDecisions {
    /// GatewayClass statuses by name.
    pub classes: Vec<(String, GatewayClassStatus)>,
    /// Gateway statuses by (namespace, name).
    pub gateways: Vec<((String, String), GatewayStatus)>,
    /// Route `status.parents` by (kind, namespace, name).
    pub routes: Vec<((RouteKind, String, String), Vec<serde_json::Value>)>,
}

impl GatewayDecisions {
    /// Whether there is nothing to write.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.classes.is_empty() && self.gateways.is_empty() && self.routes.is_empty()
    }
}

/// Reasons of an unsatisfied request that mean "the address asked for cannot be used".
const NOT_USABLE: [&str; 3] = [
    "RequestedIPOutsidePools",
    "RequestedIPNotAllowed",
    "RequestedIPTaken",
];

/// What to write for `gws` given IPAM's `outcome` (over [`with_gateways`]) at `now`: only
/// what differs from the objects' current status.
#[must_use]
pub fn decide_gateways(
    world: &World,
    gws: &GatewayWorld,
    outcome: &IpamOutcome,
    now: &Time,
) -> GatewayDecisions {
    let mut out = GatewayDecisions::default();
    for (name, class) in &gws.classes {
        if class.spec.controller_name != GATEWAY_CONTROLLER {
            continue;
        }
        let previous = class
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let status = GatewayClassStatus {
            conditions: Some(vec![condition(
                "Accepted",
                true,
                "Accepted",
                "handled by Portico: TCP, UDP and portico.io/SCTP listeners on the XDP balancer"
                    .into(),
                class.metadata.generation,
                &previous,
                now,
            )]),
            supported_features: class
                .status
                .as_ref()
                .and_then(|s| s.supported_features.clone()),
        };
        if class.status.as_ref() != Some(&status) {
            out.classes.push((name.clone(), status));
        }
    }

    // Routes first: listeners count what attaches to them.
    let mut attached: BTreeMap<(String, String, String), i32> = BTreeMap::new();
    for (key, route) in &gws.routes {
        let resolved = resolve(world, gws, route);
        let mut ours = Vec::new();
        for p in &route.parent_refs {
            let a = attach(world, gws, route, p);
            let Some(gw_key) = &a.gateway else {
                // Not a Portico Gateway: not ours to report on, unless it names a
                // Gateway of ours that does not exist (NoMatchingParent is then ours too).
                continue;
            };
            if a.refused.is_none() && resolved.is_ok() {
                for l in &a.listeners {
                    *attached
                        .entry((gw_key.0.clone(), gw_key.1.clone(), l.clone()))
                        .or_default() += 1;
                }
            }
            let previous: Vec<Condition> = route
                .status_parents
                .iter()
                .find(|e| {
                    e["controllerName"] == GATEWAY_CONTROLLER
                        && serde_json::from_value::<ParentRef>(e["parentRef"].clone())
                            .ok()
                            .as_ref()
                            == Some(p)
                })
                .and_then(|e| serde_json::from_value(e["conditions"].clone()).ok())
                .unwrap_or_default();
            let accepted = match &a.refused {
                None => condition(
                    "Accepted",
                    true,
                    "Accepted",
                    format!("attached to listeners {}", a.listeners.join(",")),
                    route.generation,
                    &previous,
                    now,
                ),
                Some((reason, msg)) => condition(
                    "Accepted",
                    false,
                    reason,
                    msg.clone(),
                    route.generation,
                    &previous,
                    now,
                ),
            };
            let refs = match &resolved {
                Ok(()) => condition(
                    "ResolvedRefs",
                    true,
                    "ResolvedRefs",
                    "every backendRef resolves".into(),
                    route.generation,
                    &previous,
                    now,
                ),
                Err((reason, msg)) => condition(
                    "ResolvedRefs",
                    false,
                    reason,
                    msg.clone(),
                    route.generation,
                    &previous,
                    now,
                ),
            };
            ours.push(serde_json::json!({
                "parentRef": p,
                "controllerName": GATEWAY_CONTROLLER,
                "conditions": [accepted, refs],
            }));
        }
        let mut parents: Vec<serde_json::Value> = route
            .status_parents
            .iter()
            .filter(|e| e["controllerName"] != GATEWAY_CONTROLLER)
            .cloned()
            .collect();
        parents.extend(ours);
        if parents != route.status_parents {
            out.routes.push((key.clone(), parents));
        }
    }

    for ((ns, name), gw) in gws.our_gateways() {
        let previous = gw
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        let generation = gw.metadata.generation;
        let (_, unsupported) = requested_addresses(gw);
        let addrs = outcome.services.get(&(ns.clone(), synthetic_name(name)));
        let addresses: Vec<GatewayStatusAddresses> = addrs
            .map(|a| {
                a.addresses
                    .iter()
                    .map(|ip| GatewayStatusAddresses {
                        r#type: Some("IPAddress".into()),
                        value: ip.to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let accepted = if unsupported.is_empty() {
            condition(
                "Accepted",
                true,
                "Accepted",
                "accepted by Portico".into(),
                generation,
                &previous,
                now,
            )
        } else {
            condition(
                "Accepted",
                false,
                "UnsupportedAddress",
                format!("address types {unsupported:?} are not supported; use IPAddress"),
                generation,
                &previous,
                now,
            )
        };
        let programmed = match (unsupported.is_empty(), addrs) {
            (false, _) => condition(
                "Programmed",
                false,
                "Invalid",
                "not accepted".into(),
                generation,
                &previous,
                now,
            ),
            (true, Some(a)) if !a.addresses.is_empty() => condition(
                "Programmed",
                true,
                "Programmed",
                format!(
                    "{} on the XDP balancer",
                    addresses
                        .iter()
                        .map(|a| a.value.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ),
                generation,
                &previous,
                now,
            ),
            (true, a) => {
                let why = a
                    .and_then(|a| a.unsatisfied.clone())
                    .unwrap_or_else(|| "NoAddress: no address yet".into());
                let (reason, message) = why.split_once(": ").unwrap_or((&why, ""));
                let reason = if NOT_USABLE.contains(&reason) {
                    "AddressNotUsable"
                } else {
                    "AddressNotAssigned"
                };
                condition(
                    "Programmed",
                    false,
                    reason,
                    why.clone(),
                    generation,
                    &previous,
                    now,
                )
                .tap_message(message)
            }
        };
        let conflicted = conflicted_listeners(gw);
        let listeners: Vec<GatewayStatusListeners> = gw
            .spec
            .listeners
            .iter()
            .map(|l| {
                let conflict = conflicted.contains(&l.name);
                let prev: Vec<Condition> = gw
                    .status
                    .as_ref()
                    .and_then(|s| s.listeners.as_ref())
                    .and_then(|ls| ls.iter().find(|x| x.name == l.name))
                    .map(|x| x.conditions.clone())
                    .unwrap_or_default();
                let kind = route_kind_of(&l.protocol);
                let supported = listener_protocol(&l.protocol).is_some();
                let conditions = vec![
                    if supported {
                        condition("Accepted", true, "Accepted", "served by the XDP balancer".into(), generation, &prev, now)
                    } else {
                        condition(
                            "Accepted",
                            false,
                            "UnsupportedProtocol",
                            format!("protocol {} is not served by Portico (TCP, UDP and {SCTP_PROTOCOL} are)", l.protocol),
                            generation,
                            &prev,
                            now,
                        )
                    },
                    condition(
                        "Programmed",
                        supported && !conflict && programmed.status == "True",
                        if supported && !conflict && programmed.status == "True" { "Programmed" } else { "Invalid" },
                        String::new(),
                        generation,
                        &prev,
                        now,
                    ),
                    condition("ResolvedRefs", true, "ResolvedRefs", String::new(), generation, &prev, now),
                    if conflict {
                        condition(
                            "Conflicted",
                            true,
                            "ProtocolConflict",
                            format!("another listener also uses port {} for {}", l.port, l.protocol),
                            generation,
                            &prev,
                            now,
                        )
                    } else {
                        condition("Conflicted", false, "NoConflicts", String::new(), generation, &prev, now)
                    },
                ];
                GatewayStatusListeners {
                    attached_routes: attached.get(&(ns.clone(), name.clone(), l.name.clone())).copied().unwrap_or(0),
                    conditions,
                    name: l.name.clone(),
                    supported_kinds: Some(
                        kind.filter(|_| supported)
                            .map(|k| {
                                vec![GatewayStatusListenersSupportedKinds {
                                    group: Some(GROUP.into()),
                                    kind: k.name().into(),
                                }]
                            })
                            .unwrap_or_default(),
                    ),
                }
            })
            .collect();
        let status = GatewayStatus {
            addresses: Some(addresses),
            attached_listener_sets: gw.status.as_ref().and_then(|s| s.attached_listener_sets),
            conditions: Some(vec![accepted, programmed]),
            listeners: Some(listeners),
        };
        if gw.status.as_ref() != Some(&status) {
            out.gateways.push(((ns.clone(), name.clone()), status));
        }
    }
    out
}

trait TapMessage {
    fn tap_message(self, message: &str) -> Self;
}

impl TapMessage for Condition {
    /// Uses `message` (the allocator's words without the reason) when it says something.
    fn tap_message(mut self, message: &str) -> Self {
        if !message.is_empty() {
            message.clone_into(&mut self.message);
        }
        self
    }
}

/// One backendRef of a route attached to one listener of a Portico Gateway, resolved:
/// the backend's EndpointSlices with the target port the ref's Service port names.
struct ListenerBackend<'a> {
    gateway: (String, String),
    listener: String,
    protocol: &'static str,
    weight: u32,
    slices: Vec<(&'a (String, String), &'a EndpointSlice, i32)>,
}

/// Every resolved backendRef of every route attached to a listener of Portico's Gateways,
/// weight 0 included.
fn listener_backends<'a>(world: &'a World, gws: &GatewayWorld) -> Vec<ListenerBackend<'a>> {
    let mut out = Vec::new();
    for route in gws.routes.values() {
        if resolve(world, gws, route).is_err() {
            continue;
        }
        for p in &route.parent_refs {
            let a = attach(world, gws, route, p);
            let (Some((gns, gname)), None) = (&a.gateway, &a.refused) else {
                continue;
            };
            let Some(gw) = gws.gateways.get(&(gns.clone(), gname.clone())) else {
                continue;
            };
            for lname in &a.listeners {
                let Some(listener) = gw.spec.listeners.iter().find(|l| l.name == *lname) else {
                    continue;
                };
                let Some(protocol) = listener_protocol(&listener.protocol) else {
                    continue;
                };
                for b in &route.backends {
                    let bns = b
                        .namespace
                        .clone()
                        .unwrap_or_else(|| route.namespace.clone());
                    let Some(svc) = world.services.get(&(bns.clone(), b.name.clone())) else {
                        continue;
                    };
                    let Some(port_name) = svc
                        .spec
                        .iter()
                        .flat_map(|s| s.ports.iter().flatten())
                        .find(|sp| b.port.is_none_or(|p| p == sp.port))
                        .map(|sp| sp.name.clone().unwrap_or_default())
                    else {
                        continue;
                    };
                    let slices = world
                        .endpoint_slices
                        .iter()
                        .filter(|((sns, _), slice)| {
                            *sns == bns
                                && slice
                                    .metadata
                                    .labels
                                    .as_ref()
                                    .and_then(|l| l.get(SERVICE_NAME_LABEL))
                                    == Some(&b.name)
                        })
                        .filter_map(|(key, slice)| {
                            let target = slice
                                .ports
                                .iter()
                                .flatten()
                                .find(|p| p.name.clone().unwrap_or_default() == port_name)
                                .and_then(|p| p.port)?;
                            Some((key, slice, target))
                        })
                        .collect();
                    out.push(ListenerBackend {
                        gateway: (gns.clone(), gname.clone()),
                        listener: lname.clone(),
                        protocol,
                        weight: u32::try_from(b.weight.unwrap_or(1)).unwrap_or(0),
                        slices,
                    });
                }
            }
        }
    }
    out
}

/// EndpointSlices of the synthetic Services: for each listener of each Portico Gateway,
/// the endpoints of the backend Services of the routes attached to it, on the port the
/// backendRef's Service port targets (by name in the backend's EndpointSlices). Routes
/// whose refs do not resolve contribute nothing; a backendRef with weight 0 neither.
#[must_use]
pub fn gateway_endpoint_slices(world: &World, gws: &GatewayWorld) -> Vec<EndpointSlice> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for lb in listener_backends(world, gws)
        .into_iter()
        .filter(|b| b.weight > 0)
    {
        let (gns, gname) = &lb.gateway;
        for ((bns, sname), slice, target) in lb.slices {
            let name = format!("{}.{}.{bns}.{sname}", synthetic_name(gname), lb.listener);
            if !seen.insert(name.clone()) {
                continue;
            }
            out.push(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(gns.clone()),
                    labels: Some(BTreeMap::from([(
                        SERVICE_NAME_LABEL.to_owned(),
                        synthetic_name(gname),
                    )])),
                    ..ObjectMeta::default()
                },
                address_type: slice.address_type.clone(),
                endpoints: slice.endpoints.clone(),
                ports: Some(vec![EndpointPort {
                    name: Some(lb.listener.clone()),
                    port: Some(target),
                    protocol: Some(lb.protocol.to_owned()),
                    ..EndpointPort::default()
                }]),
            });
        }
    }
    out
}

/// A multiple of every count up to 16, so per-endpoint shares of a backendRef's weight
/// stay exact for small backends.
const WEIGHT_SCALE: u64 = 720_720;

/// Gives the Maglev backends of Gateway listeners their backendRef weights: a backendRef
/// of weight `w` with `n` endpoints gives each `w / n` of the listener's traffic (Gateway
/// API weights are per backendRef, not per endpoint). Draining backends keep weight 0.
/// `outcome` holds the Gateways' addresses (the synthetic Services').
pub fn apply_backend_weights(
    plan: &mut crate::plan::NodePlan,
    world: &World,
    gws: &GatewayWorld,
    outcome: &IpamOutcome,
) {
    use std::net::IpAddr;
    // (namespace, Gateway, listener) → (endpoint address, port) → weight.
    type ListenerKey = (String, String, String);
    let mut weights: BTreeMap<ListenerKey, BTreeMap<(IpAddr, u16), u64>> = BTreeMap::new();
    for lb in listener_backends(world, gws) {
        let mut endpoints: BTreeSet<(IpAddr, u16)> = BTreeSet::new();
        for (_, slice, target) in &lb.slices {
            let Ok(port) = u16::try_from(*target) else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                for a in &ep.addresses {
                    if let Ok(ip) = a.parse() {
                        endpoints.insert((ip, port));
                    }
                }
            }
        }
        if endpoints.is_empty() {
            continue;
        }
        let share = u64::from(lb.weight) * WEIGHT_SCALE / endpoints.len() as u64;
        let entry = weights
            .entry((
                lb.gateway.0.clone(),
                lb.gateway.1.clone(),
                lb.listener.clone(),
            ))
            .or_default();
        for e in endpoints {
            *entry.entry(e).or_default() += share;
        }
    }
    for ((ns, name, listener), by_endpoint) in weights {
        let Some(gw) = gws.gateways.get(&(ns.clone(), name.clone())) else {
            continue;
        };
        let Some(l) = gw.spec.listeners.iter().find(|l| l.name == listener) else {
            continue;
        };
        let (Ok(port), Some(proto)) = (u16::try_from(l.port), listener_protocol(&l.protocol))
        else {
            continue;
        };
        let proto = match proto {
            "UDP" => portico_xdp::Protocol::Udp,
            "SCTP" => portico_xdp::Protocol::Sctp,
            _ => portico_xdp::Protocol::Tcp,
        };
        let Some(addrs) = outcome.services.get(&(ns.clone(), synthetic_name(&name))) else {
            continue;
        };
        // Scale down to u32 keeping proportions.
        let max = by_endpoint.values().copied().max().unwrap_or(1).max(1);
        let divisor = max.div_ceil(u64::from(u32::MAX)).max(1);
        for vip in &addrs.addresses {
            let key = portico_xdp::ServiceKey {
                vip: *vip,
                port,
                proto,
            };
            let Some(spec) = plan.services.get_mut(&key) else {
                continue;
            };
            for b in &mut spec.backends {
                if b.weight == 0 {
                    continue;
                }
                if let Some(w) = by_endpoint.get(&(b.addr, b.port)) {
                    b.weight = u32::try_from(w / divisor).unwrap_or(u32::MAX).max(1);
                }
            }
        }
    }
}

/// `world` as the agent plans it: [`with_gateways`] plus [`gateway_endpoint_slices`].
#[must_use]
pub fn with_gateway_backends(world: &World, gws: &GatewayWorld) -> World {
    let mut out = with_gateways(world, gws);
    for slice in gateway_endpoint_slices(world, gws) {
        let key = (
            slice.metadata.namespace.clone().unwrap_or_default(),
            slice.metadata.name.clone().unwrap_or_default(),
        );
        out.endpoint_slices.insert(key, slice);
    }
    out
}
