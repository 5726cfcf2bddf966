//! `portico controller`: Kubernetes watchers (Services, AddressPools, Namespaces) feed the
//! shared [`World`]; the leader allocates with [`crate::plan::Ipam`] and writes what
//! [`decide`] decides: Service and AddressPool status through server-side apply on
//! `/status` with its own field manager, and Events.
//!
//! Level-triggered like `portico standalone`: every pass recomputes everything from the
//! snapshot (after a burst of watch events, on a leadership change, every `resync` and at
//! the next IPAM deadline), and writes only what differs from what the objects say.

pub mod decide;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event as KubeEvent, EventType as KubeEventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Api, Client, Resource as _};
use portico_crds::{AddressPool, AddressPoolStatus, ClassPolicy};
use tokio::sync::{mpsc, watch};

use crate::gateway::{self, GatewayDecisions, RouteKind};
use crate::k8s::apply_status;
use crate::k8s::gateway_source::{self, GatewaySource, GwEvent};
use crate::k8s::lease::{run_elector, Elector, LeaseName, LeaseTiming};
use crate::k8s::source::{self, Relist};
use crate::metrics::{MetricsRequest, ReconcileMetrics};
use crate::plan::IpamOutcome;
use crate::status::{PoolRow, ServiceRow, StatusReport};
use crate::world::{Kind, World};

use self::decide::{Allocating, Decisions, EventType, ServiceStatus};

/// Field manager of the controller's status writes.
pub const FIELD_MANAGER: &str = "portico-controller";

/// `reportingController` of its Events.
pub const REPORTING_CONTROLLER: &str = "portico.io/controller";

/// Settings of `portico controller`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Serve Services without a loadBalancerClass.
    pub default_class: bool,
    /// This replica's name (Pod name): Lease holder and Events' `reportingInstance`.
    pub identity: String,
    /// The Lease to elect a leader on; `None`: this replica always leads (one replica).
    pub lease: Option<LeaseName>,
    /// Election timing.
    pub timing: LeaseTiming,
    /// A pass at least this often.
    pub resync: Duration,
    /// Quiet time after a watch event before a pass.
    pub debounce: Duration,
    /// Serve `/metrics`, `/healthz` and `/readyz` here.
    pub metrics: Option<SocketAddr>,
    /// Serve Gateways of GatewayClasses with `controllerName: portico.io/gateway-controller`.
    pub gateway_api: bool,
}

impl Options {
    /// Defaults for a replica named `identity`, electing on `portico-controller` in
    /// `namespace`.
    #[must_use]
    pub fn new(identity: impl Into<String>, namespace: impl Into<String>) -> Self {
        Options {
            default_class: false,
            identity: identity.into(),
            lease: Some(LeaseName {
                namespace: namespace.into(),
                name: "portico-controller".into(),
            }),
            timing: LeaseTiming::default(),
            resync: Duration::from_secs(30),
            debounce: Duration::from_millis(50),
            metrics: None,
            gateway_api: true,
        }
    }
}

/// Counters a test (or `/metrics`) can read while the controller runs.
#[derive(Debug, Default)]
pub struct Stats {
    /// Passes run (leader or not).
    pub passes: AtomicU64,
    /// Passes that allocated (leading and synced).
    pub allocating_passes: AtomicU64,
    /// Service status writes sent.
    pub service_writes: AtomicU64,
    /// AddressPool status writes sent.
    pub pool_writes: AtomicU64,
    /// Events published.
    pub events: AtomicU64,
    /// Gateway API status writes sent (GatewayClasses, Gateways, routes).
    pub gateway_writes: AtomicU64,
    /// Writes the API refused.
    pub write_errors: AtomicU64,
    /// 1 while leading.
    pub leading: AtomicU64,
}

impl Stats {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A counter's value.
    #[must_use]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What was last written for an object: the resourceVersion the object had in the world
/// when we wrote, and the status written. A pass before the watch echoes the write back
/// would otherwise write the same status again.
#[derive(Debug, Default)]
struct Written {
    services: BTreeMap<(String, String), (Option<String>, ServiceStatus)>,
    pools: BTreeMap<String, (Option<String>, AddressPoolStatus)>,
}

/// Equal but for condition transition times (which a pass before the echo recomputes as
/// `now`).
fn same_service_status(a: &ServiceStatus, b: &ServiceStatus) -> bool {
    let strip = |s: &ServiceStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

fn same_pool_status(a: &AddressPoolStatus, b: &AddressPoolStatus) -> bool {
    let strip = |s: &AddressPoolStatus| {
        let mut s = s.clone();
        for c in &mut s.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        s
    };
    strip(a) == strip(b)
}

/// A Gateway API status write: (kind, namespace, name), the resourceVersion seen, status.
type GatewayWrite = ((String, String, String), Option<String>, serde_json::Value);

/// One input of the controller's loop.
#[allow(
    clippy::large_enum_variant,
    reason = "one event at a time moves from a watcher to the world; never stored in bulk"
)]
enum Input {
    World(Result<source::WatchEvent, watcher::Error>),
    Gateway(GwEvent),
}

struct Controller {
    client: Client,
    gws: GatewaySource,
    gw_written: BTreeMap<(String, String, String), (Option<String>, serde_json::Value)>,
    opts: Options,
    world: World,
    relist: Relist,
    allocating: Allocating,
    written: Written,
    recorder: Recorder,
    outcome: IpamOutcome,
    stats: Arc<Stats>,
    metrics: ReconcileMetrics,
    failing: bool,
}

/// Runs the controller until `stop` turns true.
///
/// # Errors
/// The metrics listener cannot bind.
pub async fn run(
    client: Client,
    opts: Options,
    stats: Arc<Stats>,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let world_events = futures::stream::select_all([
        source::watch(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
        source::watch(
            Api::<AddressPool>::all(client.clone()),
            watcher::Config::default(),
        ),
        source::watch(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
        ),
    ])
    .map(Input::World);
    let gateway_events = if opts.gateway_api {
        gateway_source::watch_all(&client)
            .map(Input::Gateway)
            .boxed()
    } else {
        futures::stream::empty().boxed()
    };
    let mut events = futures::stream::select(world_events, gateway_events);
    let (lead_tx, mut lead_rx) = watch::channel(opts.lease.is_none());
    let elector_task = opts.lease.clone().map(|lease| {
        let api = Api::<Lease>::namespaced(client.clone(), &lease.namespace);
        let elector = Elector::new(opts.identity.clone(), opts.timing);
        tokio::spawn(run_elector(api, lease.name, elector, lead_tx, stop.clone()))
    });
    let (metrics_tx, mut metrics_rx) = mpsc::channel::<MetricsRequest>(16);
    if let Some(addr) = opts.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
        crate::metrics::serve(listener, metrics_tx);
    }
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: REPORTING_CONTROLLER.into(),
            instance: Some(opts.identity.clone()),
        },
    );
    let mut gws = GatewaySource::default();
    if !opts.gateway_api {
        gws.mark_all_synced();
    }
    let mut c = Controller {
        client,
        gws,
        gw_written: BTreeMap::new(),
        allocating: Allocating::new(ClassPolicy {
            default_class: opts.default_class,
        }),
        opts,
        world: World::default(),
        relist: Relist::new([Kind::Service, Kind::AddressPool, Kind::Namespace]),
        written: Written::default(),
        recorder,
        outcome: IpamOutcome::default(),
        stats,
        metrics: ReconcileMetrics::default(),
        failing: false,
    };
    let mut retry = Duration::from_millis(250);
    loop {
        let mut wait = if c.failing { retry } else { c.opts.resync };
        retry = if c.failing {
            (retry * 2).min(Duration::from_secs(30))
        } else {
            Duration::from_millis(250)
        };
        if let Some(at) = c.allocating.next_deadline() {
            wait = wait.min(Duration::from_secs(at.saturating_sub(unix_now()).max(1)));
        }
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                Some(ev) = events.next() => {
                    c.on_watch(ev);
                    // Debounce: take the rest of the burst, then one pass.
                    while let Ok(Some(ev)) =
                        tokio::time::timeout(c.opts.debounce, events.next()).await
                    {
                        c.on_watch(ev);
                    }
                    break;
                }
                // Wakes the loop; the value is read (and published) below.
                Ok(()) = lead_rx.changed() => break,
                Some(reply) = metrics_rx.recv() => {
                    let ready = c.relist.synced();
                    let _ = reply.send((c.report(), c.metrics.clone(), ready));
                }
                () = tokio::time::sleep_until(deadline) => break,
                _ = stop.changed() => {
                    if let Some(t) = elector_task {
                        let _ = t.await;
                    }
                    return Ok(());
                }
            }
        }
        // The pass and the `leading` stat see the same value, whichever branch woke us
        // (a pass must never write as leader while the stat still says follower).
        let leading = *lead_rx.borrow_and_update();
        if c.stats.leading.swap(u64::from(leading), Ordering::Relaxed) != u64::from(leading) {
            tracing::info!(identity = %c.opts.identity, leading, "leadership changed");
        }
        c.pass(leading).await;
    }
}

impl Controller {
    fn on_watch(&mut self, input: Input) {
        let ev = match input {
            Input::World(ev) => ev,
            Input::Gateway(ev) => {
                self.gws.handle(ev);
                return;
            }
        };
        match ev {
            Ok(ev) => {
                let events = self.relist.handle(ev, &self.world);
                self.world.apply_all(events);
            }
            Err(e) => tracing::warn!("watch: {e}"),
        }
    }

    /// Before a new leader restores allocations from status: a fresh (quorum) list of the
    /// Services and Gateways, so a status the previous leader wrote just before it stopped
    /// is seen even if its watch event has not arrived yet.
    async fn refresh_before_leading(&mut self) {
        use kube::api::ListParams;
        match Api::<Service>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(list) => {
                let events: Vec<crate::world::Event> = list
                    .items
                    .into_iter()
                    .map(|svc| {
                        crate::world::Event::Apply(
                            source::key_of(&svc),
                            crate::world::Object::Service(svc),
                        )
                    })
                    .collect();
                self.world.apply_all(events);
            }
            Err(e) => tracing::warn!("listing Services before leading: {e}"),
        }
        if self.opts.gateway_api {
            if let Ok(list) =
                Api::<gateway_api::experimental::gateways::Gateway>::all(self.client.clone())
                    .list(&ListParams::default())
                    .await
            {
                for gw in list.items {
                    let key = (
                        gw.metadata.namespace.clone().unwrap_or_default(),
                        gw.metadata.name.clone().unwrap_or_default(),
                    );
                    self.gws.world.gateways.insert(key, gw);
                }
            }
        }
    }

    async fn pass(&mut self, leading: bool) {
        let started = Instant::now();
        Stats::bump(&self.stats.passes);
        let synced = self.relist.synced() && self.gws.synced();
        if leading && synced && !self.allocating.active() && self.opts.lease.is_some() {
            // The first allocating pass of a new leader restores from status: read it fresh.
            self.refresh_before_leading().await;
        }
        let world = gateway::with_gateways(&self.world, &self.gws.world);
        let Some((outcome, decisions)) =
            self.allocating
                .pass(&world, leading, synced, unix_now(), &Time(Timestamp::now()))
        else {
            self.written = Written::default();
            self.gw_written.clear();
            return;
        };
        Stats::bump(&self.stats.allocating_passes);
        let gw_decisions =
            gateway::decide_gateways(&world, &self.gws.world, &outcome, &Time(Timestamp::now()));
        self.outcome = outcome;
        let failed = self.write(decisions).await + self.write_gateways(gw_decisions).await;
        self.failing = failed > 0;
        self.metrics.observe(
            started.elapsed(),
            if self.failing { &["kubernetes"] } else { &[] },
        );
    }

    /// Writes what differs from what was already written for the same resourceVersion.
    /// Returns how many writes failed.
    async fn write(&mut self, decisions: Decisions) -> usize {
        let mut failed = 0;
        for w in decisions.services {
            let key = (w.namespace.clone(), w.name.clone());
            let Some(svc) = self.world.services.get(&key) else {
                continue;
            };
            let rv = svc.metadata.resource_version.clone();
            if self
                .written
                .services
                .get(&key)
                .is_some_and(|(r, s)| *r == rv && same_service_status(s, &w.status))
            {
                continue;
            }
            let reference = svc.object_ref(&());
            let api = Api::<Service>::namespaced(self.client.clone(), &w.namespace);
            let status = serde_json::json!({
                "loadBalancer": { "ingress": w.status.ingress },
                "conditions": w.status.conditions,
            });
            Stats::bump(&self.stats.service_writes);
            match apply_status(&api, &w.name, Some(&w.namespace), FIELD_MANAGER, status).await {
                Ok(_) => {
                    tracing::info!(service = %format!("{}/{}", w.namespace, w.name), ingress = ?w.status.ingress.iter().filter_map(|i| i.ip.clone()).collect::<Vec<_>>(), "status written");
                    self.written.services.insert(key, (rv, w.status));
                    for e in w.events {
                        let event = KubeEvent {
                            type_: match e.type_ {
                                EventType::Normal => KubeEventType::Normal,
                                EventType::Warning => KubeEventType::Warning,
                            },
                            reason: e.reason.into(),
                            note: Some(e.note),
                            action: "Allocate".into(),
                            secondary: None,
                        };
                        match self.recorder.publish(&event, &reference).await {
                            Ok(()) => Stats::bump(&self.stats.events),
                            Err(err) => tracing::warn!("publishing event {}: {err}", e.reason),
                        }
                    }
                }
                Err(e) => {
                    failed += 1;
                    Stats::bump(&self.stats.write_errors);
                    tracing::warn!(
                        service = %format!("{}/{}", w.namespace, w.name),
                        "writing status: {e}"
                    );
                }
            }
        }
        for w in decisions.pools {
            let Some(pool) = self.world.pools.get(&w.name) else {
                continue;
            };
            let rv = pool.metadata.resource_version.clone();
            if self
                .written
                .pools
                .get(&w.name)
                .is_some_and(|(r, s)| *r == rv && same_pool_status(s, &w.status))
            {
                continue;
            }
            let api = Api::<AddressPool>::all(self.client.clone());
            Stats::bump(&self.stats.pool_writes);
            match apply_status(&api, &w.name, None, FIELD_MANAGER, &w.status).await {
                Ok(_) => {
                    self.written.pools.insert(w.name, (rv, w.status));
                }
                Err(e) => {
                    failed += 1;
                    Stats::bump(&self.stats.write_errors);
                    tracing::warn!(pool = %w.name, "writing status: {e}");
                }
            }
        }
        failed
    }

    /// Writes Gateway API statuses that differ from what was written for the same
    /// resourceVersion. Returns how many writes failed.
    async fn write_gateways(&mut self, d: GatewayDecisions) -> usize {
        let strip = |v: &serde_json::Value| {
            let mut v = v.clone();
            strip_times(&mut v);
            v
        };
        let mut writes: Vec<GatewayWrite> = Vec::new();
        for (name, status) in d.classes {
            let rv = self
                .gws
                .world
                .classes
                .get(&name)
                .and_then(|c| c.metadata.resource_version.clone());
            writes.push((
                ("GatewayClass".into(), String::new(), name),
                rv,
                serde_json::to_value(status).unwrap_or_default(),
            ));
        }
        for ((ns, name), status) in d.gateways {
            let rv = self
                .gws
                .world
                .gateways
                .get(&(ns.clone(), name.clone()))
                .and_then(|g| g.metadata.resource_version.clone());
            writes.push((
                ("Gateway".into(), ns, name),
                rv,
                serde_json::to_value(status).unwrap_or_default(),
            ));
        }
        for ((kind, ns, name), parents) in d.routes {
            let rv = self
                .gws
                .world
                .routes
                .get(&(kind, ns.clone(), name.clone()))
                .and_then(|r| r.resource_version.clone());
            writes.push((
                (kind.name().into(), ns, name),
                rv,
                serde_json::json!({ "parents": parents }),
            ));
        }
        let mut failed = 0;
        for (key, rv, status) in writes {
            if self
                .gw_written
                .get(&key)
                .is_some_and(|(r, s)| rv.is_some() && *r == rv && *s == strip(&status))
            {
                continue;
            }
            Stats::bump(&self.stats.gateway_writes);
            let (kind, ns, name) = &key;
            let c = self.client.clone();
            let result = match kind.as_str() {
                "GatewayClass" => apply_status(
                    &Api::<gateway_api::experimental::gatewayclasses::GatewayClass>::all(c),
                    name,
                    None,
                    FIELD_MANAGER,
                    &status,
                )
                .await
                .map(|_| ()),
                "Gateway" => apply_status(
                    &Api::<gateway_api::experimental::gateways::Gateway>::namespaced(c, ns),
                    name,
                    Some(ns),
                    FIELD_MANAGER,
                    &status,
                )
                .await
                .map(|_| ()),
                k if k == RouteKind::Tcp.name() => apply_status(
                    &Api::<gateway_api::experimental::tcproutes::TcpRoute>::namespaced(c, ns),
                    name,
                    Some(ns),
                    FIELD_MANAGER,
                    &status,
                )
                .await
                .map(|_| ()),
                _ => apply_status(
                    &Api::<gateway_api::experimental::udproutes::UdpRoute>::namespaced(c, ns),
                    name,
                    Some(ns),
                    FIELD_MANAGER,
                    &status,
                )
                .await
                .map(|_| ()),
            };
            match result {
                Ok(()) => {
                    let stripped = strip(&status);
                    self.gw_written.insert(key, (rv, stripped));
                }
                Err(e) => {
                    failed += 1;
                    Stats::bump(&self.stats.write_errors);
                    tracing::warn!(kind = %kind, object = %format!("{ns}/{name}"), "writing status: {e}");
                }
            }
        }
        failed
    }

    fn report(&self) -> StatusReport {
        StatusReport {
            node: self.opts.identity.clone(),
            pools: self
                .outcome
                .pools
                .iter()
                .map(|(name, p)| PoolRow {
                    name: name.clone(),
                    state: p.state.clone(),
                    v4_used: p.v4.used.to_string(),
                    v4_total: p.v4.total.to_string(),
                    v6_used: p.v6.used.to_string(),
                    v6_total: p.v6.total.to_string(),
                })
                .collect(),
            services: self
                .outcome
                .services
                .iter()
                .map(|((ns, name), a)| ServiceRow {
                    namespace: ns.clone(),
                    name: name.clone(),
                    addresses: a.addresses.clone(),
                    pools: a.pools.clone(),
                    backends_ready: 0,
                    backends_total: 0,
                    announced: false,
                    local: false,
                    unsatisfied: a.unsatisfied.clone(),
                    notices: a.notices.clone(),
                    packets: 0,
                    new_flows: 0,
                    drops: 0,
                    backends: Vec::new(),
                })
                .collect(),
            problems: self
                .outcome
                .problems
                .iter()
                .map(|p| format!("({}): {}", p.object, p.message))
                .collect(),
            passes: Stats::get(&self.stats.passes),
            ..StatusReport::default()
        }
    }
}

/// Clears every `lastTransitionTime` (a pass before the echo recomputes them as now).
fn strip_times(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("lastTransitionTime");
            m.values_mut().for_each(strip_times);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_times),
        _ => {}
    }
}
