//! One typed snapshot of every input object, fed by events from a source (a manifest
//! folder here, Kubernetes watchers later). Everything after the source reads only this.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use portico_crds::{AddressPool, BgpAdvertisement, BgpPeer};

/// The kinds of object Portico reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `portico.io/v1alpha1 AddressPool` (cluster-scoped).
    AddressPool,
    /// `portico.io/v1alpha1 BGPPeer` (cluster-scoped).
    BgpPeer,
    /// `portico.io/v1alpha1 BGPAdvertisement` (cluster-scoped).
    BgpAdvertisement,
    /// `v1 Service`.
    Service,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice,
    /// `v1 Secret` (BGP MD5 passwords).
    Secret,
    /// `v1 Node` (labels for node selectors; cluster-scoped).
    Node,
    /// `v1 Namespace` (labels for pools' namespace selectors; cluster-scoped).
    Namespace,
}

impl Kind {
    /// The `kind` as written in manifests.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Kind::AddressPool => "AddressPool",
            Kind::BgpPeer => "BGPPeer",
            Kind::BgpAdvertisement => "BGPAdvertisement",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Secret => "Secret",
            Kind::Node => "Node",
            Kind::Namespace => "Namespace",
        }
    }

    /// Whether objects of this kind live in a namespace.
    #[must_use]
    pub fn namespaced(self) -> bool {
        matches!(self, Kind::Service | Kind::EndpointSlice | Kind::Secret)
    }
}

/// Which object: kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// The kind.
    pub kind: Kind,
    /// The namespace; empty for cluster-scoped kinds.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind.name(), self.name)
        } else {
            write!(f, "{} {}/{}", self.kind.name(), self.namespace, self.name)
        }
    }
}

/// One input object.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "objects are stored once in the world's maps; boxing buys nothing"
)]
pub enum Object {
    /// An address pool.
    AddressPool(AddressPool),
    /// A BGP neighbour.
    BgpPeer(BgpPeer),
    /// What to announce, how.
    BgpAdvertisement(BgpAdvertisement),
    /// A Service.
    Service(Service),
    /// Endpoints of a Service.
    EndpointSlice(EndpointSlice),
    /// A Secret.
    Secret(Secret),
    /// A Node.
    Node(Node),
    /// A Namespace.
    Namespace(Namespace),
}

impl PartialEq for Object {
    /// Same metadata, spec and status (the CRD root types do not derive `PartialEq`).
    fn eq(&self, other: &Self) -> bool {
        use Object as O;
        match (self, other) {
            (O::AddressPool(a), O::AddressPool(b)) => {
                a.metadata == b.metadata && a.spec == b.spec && a.status == b.status
            }
            (O::BgpPeer(a), O::BgpPeer(b)) => {
                a.metadata == b.metadata && a.spec == b.spec && a.status == b.status
            }
            (O::BgpAdvertisement(a), O::BgpAdvertisement(b)) => {
                a.metadata == b.metadata && a.spec == b.spec
            }
            (O::Service(a), O::Service(b)) => a == b,
            (O::EndpointSlice(a), O::EndpointSlice(b)) => a == b,
            (O::Secret(a), O::Secret(b)) => a == b,
            (O::Node(a), O::Node(b)) => a == b,
            (O::Namespace(a), O::Namespace(b)) => a == b,
            _ => false,
        }
    }
}

/// A change of one object, as every source reports it.
#[derive(Debug, Clone, PartialEq)]
#[allow(
    clippy::large_enum_variant,
    reason = "events are moved one at a time from the source into the world, never stored in bulk"
)]
pub enum Event {
    /// The object exists with this content (created or changed).
    Apply(ObjectKey, Object),
    /// The object is gone.
    Delete(ObjectKey),
}

/// The snapshot: every object by key, ordered so that every pass sees them in one order.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// AddressPools by name.
    pub pools: BTreeMap<String, AddressPool>,
    /// BGPPeers by name.
    pub peers: BTreeMap<String, BgpPeer>,
    /// BGPAdvertisements by name.
    pub advertisements: BTreeMap<String, BgpAdvertisement>,
    /// Services by (namespace, name).
    pub services: BTreeMap<(String, String), Service>,
    /// EndpointSlices by (namespace, name).
    pub endpoint_slices: BTreeMap<(String, String), EndpointSlice>,
    /// Secrets by (namespace, name).
    pub secrets: BTreeMap<(String, String), Secret>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
}

impl World {
    /// Applies one event. Returns whether the snapshot changed.
    pub fn apply(&mut self, event: Event) -> bool {
        match event {
            Event::Apply(key, object) => {
                let ns = || (key.namespace.clone(), key.name.clone());
                let name = || key.name.clone();
                match object {
                    Object::AddressPool(o) => put_with(&mut self.pools, name(), o, |a, b| {
                        a.metadata == b.metadata && a.spec == b.spec
                    }),
                    Object::BgpPeer(o) => put_with(&mut self.peers, name(), o, |a, b| {
                        a.metadata == b.metadata && a.spec == b.spec
                    }),
                    Object::BgpAdvertisement(o) => {
                        put_with(&mut self.advertisements, name(), o, |a, b| {
                            a.metadata == b.metadata && a.spec == b.spec
                        })
                    }
                    Object::Service(o) => put(&mut self.services, ns(), o),
                    Object::EndpointSlice(o) => put(&mut self.endpoint_slices, ns(), o),
                    Object::Secret(o) => put(&mut self.secrets, ns(), o),
                    Object::Node(o) => put(&mut self.nodes, name(), o),
                    Object::Namespace(o) => put(&mut self.namespaces, name(), o),
                }
            }
            Event::Delete(key) => {
                let ns = (key.namespace, key.name);
                match key.kind {
                    Kind::AddressPool => self.pools.remove(&ns.1).is_some(),
                    Kind::BgpPeer => self.peers.remove(&ns.1).is_some(),
                    Kind::BgpAdvertisement => self.advertisements.remove(&ns.1).is_some(),
                    Kind::Service => self.services.remove(&ns).is_some(),
                    Kind::EndpointSlice => self.endpoint_slices.remove(&ns).is_some(),
                    Kind::Secret => self.secrets.remove(&ns).is_some(),
                    Kind::Node => self.nodes.remove(&ns.1).is_some(),
                    Kind::Namespace => self.namespaces.remove(&ns.1).is_some(),
                }
            }
        }
    }

    /// Applies events in order. Returns whether anything changed.
    pub fn apply_all(&mut self, events: impl IntoIterator<Item = Event>) -> bool {
        events
            .into_iter()
            .fold(false, |changed, e| self.apply(e) | changed)
    }
}

fn put<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, key: K, value: V) -> bool {
    put_with(map, key, value, |a, b| a == b)
}

fn put_with<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    same: impl Fn(&V, &V) -> bool,
) -> bool {
    match map.get(&key) {
        Some(old) if same(old, &value) => false,
        _ => {
            map.insert(key, value);
            true
        }
    }
}
