//! Watchers of the Gateway API kinds into a [`GatewayWorld`]. Each kind is replaced whole
//! at the end of each (re)list, so a deletion missed while a watch was down is not missed
//! by the world. A kind whose CRD is not installed (the list answers 404) counts as
//! listed and empty: a cluster without Gateway API still gets its Services served.

use std::collections::BTreeSet;

use futures::StreamExt as _;
use gateway_api::experimental::gatewayclasses::GatewayClass;
use gateway_api::experimental::gateways::Gateway;
use gateway_api::experimental::referencegrants::ReferenceGrant;
use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::experimental::udproutes::UdpRoute;
use kube::runtime::{watcher, WatchStreamExt as _};
use kube::{Api, Client, ResourceExt as _};
use serde::Serialize;

use crate::gateway::{GatewayWorld, Route, RouteKind};

/// Which Gateway API kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GwKind {
    /// GatewayClass.
    Class,
    /// Gateway.
    Gateway,
    /// TCPRoute.
    TcpRoute,
    /// UDPRoute.
    UdpRoute,
    /// ReferenceGrant.
    Grant,
}

/// One Gateway API object.
#[derive(Debug, Clone)]
#[allow(
    clippy::large_enum_variant,
    reason = "moved one at a time from a watcher into the world"
)]
pub enum GwObject {
    /// A GatewayClass.
    Class(GatewayClass),
    /// A Gateway.
    Gateway(Gateway),
    /// A TCPRoute or UDPRoute.
    Route(Route),
    /// A ReferenceGrant.
    Grant(ReferenceGrant),
}

/// One watcher event of the Gateway API kinds.
pub type GwEvent = (GwKind, Result<watcher::Event<GwObject>, watcher::Error>);

fn ns_name(o: &impl kube::Resource) -> (String, String) {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// The route, or (if its spec does not read as one) the route with no parents or
/// backends, so it is reported on by nobody rather than lost from the relist.
fn route_of<R: Serialize + kube::Resource>(kind: RouteKind, r: &R) -> Route {
    serde_json::to_value(r)
        .ok()
        .and_then(|v| Route::from_json(kind, &v).ok())
        .unwrap_or_else(|| {
            let (namespace, name) = ns_name(r);
            Route {
                kind,
                namespace,
                name,
                generation: None,
                resource_version: None,
                parent_refs: Vec::new(),
                backends: Vec::new(),
                status_parents: Vec::new(),
            }
        })
}

/// Watches every Gateway API kind Portico reads.
pub fn watch_all(client: &Client) -> futures::stream::BoxStream<'static, GwEvent> {
    fn typed<K>(
        api: Api<K>,
        kind: GwKind,
        wrap: impl Fn(K) -> GwObject + Send + Sync + 'static,
    ) -> futures::stream::BoxStream<'static, GwEvent>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + 'static,
    {
        watcher(api, watcher::Config::default())
            .default_backoff()
            .map(move |r| {
                let r = r.map(|e| match e {
                    watcher::Event::Apply(o) => watcher::Event::Apply(wrap(o)),
                    watcher::Event::Delete(o) => watcher::Event::Delete(wrap(o)),
                    watcher::Event::Init => watcher::Event::Init,
                    watcher::Event::InitApply(o) => watcher::Event::InitApply(wrap(o)),
                    watcher::Event::InitDone => watcher::Event::InitDone,
                });
                (kind, r)
            })
            .boxed()
    }
    futures::stream::select_all([
        typed(
            Api::<GatewayClass>::all(client.clone()),
            GwKind::Class,
            GwObject::Class,
        ),
        typed(Api::<Gateway>::all(client.clone()), GwKind::Gateway, |o| {
            GwObject::Gateway(o)
        }),
        typed(
            Api::<TcpRoute>::all(client.clone()),
            GwKind::TcpRoute,
            |o| GwObject::Route(route_of(RouteKind::Tcp, &o)),
        ),
        typed(
            Api::<UdpRoute>::all(client.clone()),
            GwKind::UdpRoute,
            |o| GwObject::Route(route_of(RouteKind::Udp, &o)),
        ),
        typed(
            Api::<ReferenceGrant>::all(client.clone()),
            GwKind::Grant,
            GwObject::Grant,
        ),
    ])
    .boxed()
}

/// Applies watcher events to a [`GatewayWorld`].
#[derive(Debug, Default)]
pub struct GatewaySource {
    /// The objects.
    pub world: GatewayWorld,
    listing: std::collections::BTreeMap<GwKind, GatewayWorld>,
    synced: BTreeSet<GwKind>,
}

const ALL: [GwKind; 5] = [
    GwKind::Class,
    GwKind::Gateway,
    GwKind::TcpRoute,
    GwKind::UdpRoute,
    GwKind::Grant,
];

impl GatewaySource {
    /// Whether every kind has listed once (or is not installed).
    #[must_use]
    pub fn synced(&self) -> bool {
        ALL.iter().all(|k| self.synced.contains(k))
    }

    /// Counts every kind as listed (Gateway API turned off).
    pub fn mark_all_synced(&mut self) {
        self.synced.extend(ALL);
    }

    /// Applies one event. Returns whether the world may have changed.
    pub fn handle(&mut self, (kind, event): GwEvent) -> bool {
        let event = match event {
            Ok(e) => e,
            Err(watcher::Error::InitialListFailed(kube::Error::Api(e))) if e.code == 404 => {
                if self.synced.insert(kind) {
                    tracing::info!(?kind, "Gateway API kind not installed; treated as empty");
                }
                return false;
            }
            Err(e) => {
                tracing::warn!(?kind, "watch: {e}");
                return false;
            }
        };
        match event {
            watcher::Event::Init => {
                self.listing.insert(kind, GatewayWorld::default());
                false
            }
            watcher::Event::InitApply(o) => {
                put(self.listing.entry(kind).or_default(), o);
                false
            }
            watcher::Event::InitDone => {
                let listed = self.listing.remove(&kind).unwrap_or_default();
                let w = &mut self.world;
                match kind {
                    GwKind::Class => w.classes = listed.classes,
                    GwKind::Gateway => w.gateways = listed.gateways,
                    GwKind::Grant => w.grants = listed.grants,
                    GwKind::TcpRoute | GwKind::UdpRoute => {
                        let rk = if kind == GwKind::TcpRoute {
                            RouteKind::Tcp
                        } else {
                            RouteKind::Udp
                        };
                        w.routes.retain(|(k, _, _), _| *k != rk);
                        w.routes.extend(listed.routes);
                    }
                }
                self.synced.insert(kind);
                true
            }
            watcher::Event::Apply(o) => {
                put(&mut self.world, o);
                true
            }
            watcher::Event::Delete(o) => {
                let w = &mut self.world;
                match o {
                    GwObject::Class(c) => {
                        w.classes.remove(&c.name_any());
                    }
                    GwObject::Gateway(g) => {
                        w.gateways.remove(&ns_name(&g));
                    }
                    GwObject::Grant(g) => {
                        w.grants.remove(&ns_name(&g));
                    }
                    GwObject::Route(r) => {
                        w.routes.remove(&(r.kind, r.namespace, r.name));
                    }
                }
                true
            }
        }
    }
}

fn put(w: &mut GatewayWorld, o: GwObject) {
    match o {
        GwObject::Class(c) => {
            w.classes.insert(c.name_any(), c);
        }
        GwObject::Gateway(g) => {
            w.gateways.insert(ns_name(&g), g);
        }
        GwObject::Grant(g) => {
            w.grants.insert(ns_name(&g), g);
        }
        GwObject::Route(r) => {
            w.routes
                .insert((r.kind, r.namespace.clone(), r.name.clone()), r);
        }
    }
}
