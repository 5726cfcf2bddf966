//! Kubernetes watchers as a source of [`world::Event`]s: the same events the manifest
//! folder produces, so everything after the source is shared with `portico standalone`.
//!
//! A watcher (re)lists with `Init`, `InitApply`…, `InitDone` (at start, and after a watch
//! answered 410 Gone). [`Relist`] buffers the listed objects and, at `InitDone`, applies
//! them and deletes whatever the world still holds of that kind that the list did not
//! show: a Delete lost while the watch was down is not lost for the world.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::pin::Pin;

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Resource, ResourceExt as _};
use portico_crds::{AddressPool, BgpAdvertisement, BgpPeer};
use serde::de::DeserializeOwned;

use crate::world::{Event, Kind, Object, ObjectKey, World};

/// A Kubernetes type the world holds.
pub trait WorldObject: Resource + Clone + DeserializeOwned + Debug + Send + 'static {
    /// Its kind in the world.
    const KIND: Kind;
    /// Wraps it.
    fn into_object(self) -> Object;
}

macro_rules! world_object {
    ($ty:ty, $kind:ident) => {
        impl WorldObject for $ty {
            const KIND: Kind = Kind::$kind;
            fn into_object(self) -> Object {
                Object::$kind(self)
            }
        }
    };
}

world_object!(AddressPool, AddressPool);
world_object!(BgpPeer, BgpPeer);
world_object!(BgpAdvertisement, BgpAdvertisement);
world_object!(Service, Service);
world_object!(EndpointSlice, EndpointSlice);
world_object!(Secret, Secret);
world_object!(Node, Node);
world_object!(Namespace, Namespace);

/// The world's key of `obj`.
#[must_use]
pub fn key_of<K: WorldObject>(obj: &K) -> ObjectKey {
    ObjectKey {
        kind: K::KIND,
        namespace: if K::KIND.namespaced() {
            obj.namespace().unwrap_or_default()
        } else {
            String::new()
        },
        name: obj.name_any(),
    }
}

/// One watcher event, the object already wrapped.
#[derive(Debug, Clone)]
pub struct WatchEvent {
    /// Which watcher.
    pub kind: Kind,
    /// What it said.
    pub event: watcher::Event<(ObjectKey, Object)>,
}

/// Wraps the objects of a typed watcher event.
#[must_use]
pub fn wrap<K: WorldObject>(event: watcher::Event<K>) -> WatchEvent {
    let w = |o: K| (key_of(&o), o.into_object());
    let event = match event {
        watcher::Event::Apply(o) => watcher::Event::Apply(w(o)),
        watcher::Event::Delete(o) => watcher::Event::Delete(w(o)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(o) => watcher::Event::InitApply(w(o)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    };
    WatchEvent {
        kind: K::KIND,
        event,
    }
}

/// Every key of `kind` the world holds.
#[must_use]
pub fn keys_of_kind(world: &World, kind: Kind) -> Vec<ObjectKey> {
    let cluster = |names: Vec<&String>| -> Vec<ObjectKey> {
        names
            .into_iter()
            .map(|n| ObjectKey {
                kind,
                namespace: String::new(),
                name: n.clone(),
            })
            .collect()
    };
    let namespaced = |keys: Vec<&(String, String)>| -> Vec<ObjectKey> {
        keys.into_iter()
            .map(|(ns, n)| ObjectKey {
                kind,
                namespace: ns.clone(),
                name: n.clone(),
            })
            .collect()
    };
    match kind {
        Kind::AddressPool => cluster(world.pools.keys().collect()),
        Kind::BgpPeer => cluster(world.peers.keys().collect()),
        Kind::BgpAdvertisement => cluster(world.advertisements.keys().collect()),
        Kind::Node => cluster(world.nodes.keys().collect()),
        Kind::Namespace => cluster(world.namespaces.keys().collect()),
        Kind::Service => namespaced(world.services.keys().collect()),
        Kind::EndpointSlice => namespaced(world.endpoint_slices.keys().collect()),
        Kind::Secret => namespaced(world.secrets.keys().collect()),
    }
}

/// Turns watcher events into world events, relists included, and knows when every
/// watcher has listed once.
#[derive(Debug, Default)]
pub struct Relist {
    expected: BTreeSet<Kind>,
    listing: BTreeMap<Kind, Vec<(ObjectKey, Object)>>,
    synced: BTreeSet<Kind>,
}

impl Relist {
    /// Expecting one watcher per kind of `kinds`.
    #[must_use]
    pub fn new(kinds: impl IntoIterator<Item = Kind>) -> Self {
        Relist {
            expected: kinds.into_iter().collect(),
            ..Relist::default()
        }
    }

    /// Whether every expected watcher has finished its first list.
    #[must_use]
    pub fn synced(&self) -> bool {
        self.expected.is_subset(&self.synced)
    }

    /// The world events for one watcher event. `world` is the snapshot before them (for
    /// the deletions a relist implies).
    pub fn handle(&mut self, event: WatchEvent, world: &World) -> Vec<Event> {
        let kind = event.kind;
        match event.event {
            watcher::Event::Apply((key, obj)) => vec![Event::Apply(key, obj)],
            watcher::Event::Delete((key, _)) => vec![Event::Delete(key)],
            watcher::Event::Init => {
                self.listing.insert(kind, Vec::new());
                Vec::new()
            }
            watcher::Event::InitApply(o) => {
                self.listing.entry(kind).or_default().push(o);
                Vec::new()
            }
            watcher::Event::InitDone => {
                let listed = self.listing.remove(&kind).unwrap_or_default();
                let seen: BTreeSet<&ObjectKey> = listed.iter().map(|(k, _)| k).collect();
                let mut out: Vec<Event> = keys_of_kind(world, kind)
                    .into_iter()
                    .filter(|k| !seen.contains(k))
                    .map(Event::Delete)
                    .collect();
                out.extend(listed.into_iter().map(|(k, o)| Event::Apply(k, o)));
                self.synced.insert(kind);
                out
            }
        }
    }
}

/// A boxed stream of watcher events of several kinds.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, watcher::Error>> + Send>>;

/// A watcher of `api` with the default back-off, its events wrapped.
#[must_use]
pub fn watch<K: WorldObject>(api: Api<K>, config: watcher::Config) -> WatchStream {
    watcher(api, config)
        .default_backoff()
        .map(|r| r.map(wrap))
        .boxed()
}
