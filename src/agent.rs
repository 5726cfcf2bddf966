//! `portico agent` (a DaemonSet, one per node): Kubernetes watchers feed the shared
//! [`World`] with what this node needs (Services, EndpointSlices, AddressPools, BGPPeers,
//! BGPAdvertisements, the Secrets of one namespace, its own Node); the addresses come from
//! the Services' status as the controller wrote it ([`outcome_from_status`]);
//! [`node_plan`] turns that into this node's plan and the same appliers as in
//! `portico standalone` apply it. The node's state goes to its own `PorticoNode` object.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, Resource as _};
use portico_announcer::driver::{PeerStatus, Speaker, SpeakerConfig};
use portico_announcer::netlink::AddressHolder;
use portico_crds::{
    AddressPool, BgpAdvertisement, BgpPeer, ClassPolicy, DatapathSummary, PeerSession, PorticoNode,
    PorticoNodeStatus, PrefixCounts,
};
use portico_ipam::Family;
use portico_xdp::NodeConfig;
use tokio::sync::{mpsc, watch};

use crate::apply::{BalancerApplier, HolderApplier, SpeakerApplier};
use crate::k8s::apply_status;
use crate::k8s::gateway_source::{self, GatewaySource, GwEvent};
use crate::k8s::source::{self, Relist};
use crate::metrics::{MetricsRequest, ReconcileMetrics};
use crate::plan::{node_plan, IpamOutcome, NodeIdentity, NodePlan, ServiceAddresses};
use crate::standalone::{Datapath, ShutdownMode};
use crate::status::{ApplierHealthRow, PeerRow, ServiceRow, StatusReport};
use crate::world::{Kind, World};
use crate::NodeAddresses;

/// Field manager of the agent's writes.
pub const FIELD_MANAGER: &str = "portico-agent";

/// Settings of `portico agent`.
#[derive(Debug, Clone)]
pub struct Options {
    /// This node's name (the Node object, `PorticoNode` name, eTP Local).
    pub node: String,
    /// Datapath.
    pub datapath: Datapath,
    /// BGP Identifier when peers set none (else the Node's InternalIP, else detected).
    pub router_id: Option<Ipv4Addr>,
    /// SNAT address toward backends (else detected on the first XDP interface).
    pub snat_v4: Option<Ipv4Addr>,
    /// SNAT IPv6 address.
    pub snat_v6: Option<Ipv6Addr>,
    /// RFC 6052 prefix for NAT46/64 ICMP errors from routers of the other family.
    pub nat64_prefix: portico_xdp::XlatPrefix,
    /// Direct server return's outer source and GUE port (docs/dsr.md).
    pub dsr: portico_xdp::DsrConfig,
    /// Accept BGP connections here.
    pub bgp_listen: Option<SocketAddr>,
    /// Link that holds announced addresses (`None`: hold none).
    pub hold_link: Option<String>,
    /// Interfaces to enable BIG TCP on ([`crate::bigtcp`]), at `big_tcp_size` bytes.
    pub big_tcp: Vec<String>,
    /// GSO/GRO size for `big_tcp`.
    pub big_tcp_size: u32,
    /// Serve Services without a loadBalancerClass.
    pub default_class: bool,
    /// The namespace whose Secrets hold BGP MD5 passwords (the only Secrets read).
    pub secret_namespace: String,
    /// Serve `/metrics`, `/healthz` and `/readyz` here.
    pub metrics: Option<SocketAddr>,
    /// SIGTERM behaviour.
    pub shutdown: ShutdownMode,
    /// Quiet time after a watch event before a pass.
    pub debounce: Duration,
    /// A pass at least this often.
    pub resync: Duration,
}

impl Options {
    /// Defaults for `node`.
    #[must_use]
    pub fn new(node: impl Into<String>) -> Self {
        Options {
            node: node.into(),
            datapath: Datapath::Fake,
            router_id: None,
            snat_v4: None,
            snat_v6: None,
            nat64_prefix: portico_xdp::WELL_KNOWN_XLAT_PREFIX,
            dsr: portico_xdp::DsrConfig::default(),
            bgp_listen: None,
            hold_link: None,
            big_tcp: Vec::new(),
            big_tcp_size: crate::bigtcp::DEFAULT_SIZE,
            default_class: false,
            secret_namespace: "portico-system".into(),
            metrics: None,
            shutdown: ShutdownMode::Keep,
            debounce: Duration::from_millis(50),
            resync: Duration::from_secs(30),
        }
    }
}

/// The addresses of every Service `class` serves, as the controller wrote them into
/// `status.loadBalancer.ingress` (IPv4 first), each with the pool that contains it: the
/// agent's stand-in for IPAM, which only the controller runs.
#[must_use]
pub fn outcome_from_status(world: &World, class: ClassPolicy) -> IpamOutcome {
    let pools: Vec<portico_ipam::Pool> = world
        .pools
        .values()
        .filter_map(|p| p.to_pool().ok())
        .collect();
    let pool_of = |ip: IpAddr| -> String {
        let (family, value) = match ip {
            IpAddr::V4(a) => (Family::V4, u128::from(u32::from(a))),
            IpAddr::V6(a) => (Family::V6, u128::from(a)),
        };
        pools
            .iter()
            .find(|p| p.ranges.iter().any(|r| r.contains(family, value)))
            .map(|p| p.name.clone())
            .unwrap_or_default()
    };
    let mut out = IpamOutcome::default();
    for ((ns, name), svc) in &world.services {
        let serves = svc
            .spec
            .as_ref()
            .is_some_and(|s| class.serves(s.type_.as_deref(), s.load_balancer_class.as_deref()));
        if !serves {
            continue;
        }
        let mut addresses: Vec<IpAddr> = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect();
        addresses.sort_by_key(|ip| (ip.is_ipv6(), *ip));
        addresses.dedup();
        let pools = addresses.iter().map(|ip| pool_of(*ip)).collect();
        out.services.insert(
            (ns.clone(), name.clone()),
            ServiceAddresses {
                addresses,
                pools,
                unsatisfied: None,
                notices: Vec::new(),
            },
        );
    }
    out
}

/// What the agent knows about its appliers for [`node_status`].
#[derive(Debug, Clone, Default)]
pub struct NodeFacts {
    /// Each BGP peer's session as the speaker reports it: (name, status).
    pub peers: Vec<(String, PeerSession)>,
    /// Whether XDP is attached.
    pub xdp: bool,
    /// Listeners the balancer refused.
    pub balancer_errors: Vec<String>,
    /// Appliers that failed the last pass, with their last error.
    pub failing: Vec<(String, String)>,
    /// Problems with objects.
    pub problems: Vec<String>,
}

/// The `PorticoNode` status for `plan` and `facts`. `previous` keeps the transition time
/// of a condition whose status did not change.
#[must_use]
pub fn node_status(
    plan: &NodePlan,
    facts: &NodeFacts,
    previous: Option<&PorticoNodeStatus>,
    now: &Time,
) -> PorticoNodeStatus {
    let ready = facts.failing.is_empty();
    let message = if ready {
        "every applier applied the last plan".to_owned()
    } else {
        facts
            .failing
            .iter()
            .map(|(n, e)| format!("{n}: {e}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let status = if ready { "True" } else { "False" };
    let last_transition_time = previous
        .and_then(|p| {
            p.conditions
                .iter()
                .find(|c| c.type_ == "Ready" && c.status == status)
        })
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    let mut peers: Vec<PeerSession> = facts.peers.iter().map(|(_, p)| p.clone()).collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    let established = peers.iter().filter(|p| p.state == "Established").count();
    PorticoNodeStatus {
        conditions: vec![Condition {
            type_: "Ready".into(),
            status: status.into(),
            reason: if ready { "Applied" } else { "ApplyFailed" }.into(),
            message,
            last_transition_time,
            observed_generation: None,
        }],
        peers_summary: format!("{established}/{} Established", peers.len()),
        peers,
        announced_count: i32::try_from(plan.held.len()).unwrap_or(i32::MAX),
        announced: plan.held.iter().map(ToString::to_string).collect(),
        datapath: DatapathSummary {
            attached: facts.xdp,
            services: i32::try_from(plan.services.len()).unwrap_or(i32::MAX),
            backends: i32::try_from(
                plan.services
                    .values()
                    .map(|s| s.backends.len())
                    .sum::<usize>(),
            )
            .unwrap_or(i32::MAX),
            errors: facts.balancer_errors.clone(),
        },
        problems: facts.problems.clone(),
    }
}

/// A peer session as `PorticoNode` shows it; `established_since` is remembered by the
/// caller from the pass that first saw the session Established, so it does not move.
#[must_use]
pub fn peer_session(name: &str, p: &PeerStatus, established_since: Option<Time>) -> PeerSession {
    let to_u64 = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    PeerSession {
        name: name.to_owned(),
        address: p.address.to_string(),
        state: p.state().to_string(),
        established_since,
        prefixes_sent: PrefixCounts {
            ipv4: to_u64(p.session.advertised[0]),
            ipv6: to_u64(p.session.advertised[1]),
        },
        last_error: p
            .last_error
            .clone()
            .or_else(|| p.session.last_notification_received.clone())
            .or_else(|| p.session.last_notification_sent.clone()),
    }
}

fn node_seed(node: &str) -> u64 {
    node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[allow(
    clippy::large_enum_variant,
    reason = "one event at a time moves from a watcher to the world; never stored in bulk"
)]
enum Input {
    World(Result<source::WatchEvent, watcher::Error>),
    Gateway(GwEvent),
}

struct Agent {
    client: Client,
    gws: GatewaySource,
    opts: Options,
    world: World,
    relist: Relist,
    identity: NodeIdentity,
    speaker: Option<SpeakerApplier>,
    balancer: BalancerApplier,
    holder: Option<HolderApplier>,
    outcome: IpamOutcome,
    plan: NodePlan,
    xdp: bool,
    big_tcp: Vec<crate::bigtcp::LinkSizes>,
    established: BTreeMap<IpAddr, Time>,
    written: Option<PorticoNodeStatus>,
    created: bool,
    passes: u64,
    last_pass: Duration,
    metrics: ReconcileMetrics,
}

/// Runs the agent until `stop` turns true.
///
/// # Errors
/// Setup fails: the XDP program does not load or attach, the BGP listener cannot bind,
/// the address link cannot be created, the metrics listener cannot bind.
pub async fn run(client: Client, opts: Options, mut stop: watch::Receiver<bool>) -> Result<()> {
    let first_iface = match &opts.datapath {
        Datapath::Xdp { interfaces, .. } => interfaces.first().cloned(),
        Datapath::Fake => None,
    };
    let detected = NodeAddresses::detect(first_iface.as_deref());
    let node_config = NodeConfig {
        snat_v4: opts.snat_v4.or(detected.v4),
        snat_v6: opts.snat_v6.or(detected.v6),
        xlat_prefix: opts.nat64_prefix,
        dsr: opts.dsr,
        ..NodeConfig::default()
    };
    let big_tcp = crate::bigtcp::enable_all(&opts.big_tcp, opts.big_tcp_size).await?;
    let (balancer, xdp, adopted) = crate::standalone::open_datapath(&opts.datapath)?;
    let speaker = Speaker::bind(SpeakerConfig {
        listen: opts.bgp_listen,
        node_seed: node_seed(&opts.node),
    })
    .await
    .context("starting the BGP speaker")?;
    let holder = match &opts.hold_link {
        Some(name) => Some(HolderApplier::new(
            AddressHolder::connect(name)
                .await
                .with_context(|| format!("creating the address link {name}"))?,
        )),
        None => None,
    };
    let (metrics_tx, mut metrics_rx) = mpsc::channel::<MetricsRequest>(16);
    if let Some(addr) = opts.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
        crate::metrics::serve(listener, metrics_tx);
    }
    let c = &client;
    let world_events = futures::stream::select_all([
        source::watch(Api::<Service>::all(c.clone()), watcher::Config::default()),
        source::watch(
            Api::<EndpointSlice>::all(c.clone()),
            watcher::Config::default(),
        ),
        source::watch(
            Api::<AddressPool>::all(c.clone()),
            watcher::Config::default(),
        ),
        source::watch(Api::<BgpPeer>::all(c.clone()), watcher::Config::default()),
        source::watch(
            Api::<BgpAdvertisement>::all(c.clone()),
            watcher::Config::default(),
        ),
        source::watch(
            Api::<Secret>::namespaced(c.clone(), &opts.secret_namespace),
            watcher::Config::default(),
        ),
        source::watch(
            Api::<Node>::all(c.clone()),
            watcher::Config::default().fields(&format!("metadata.name={}", opts.node)),
        ),
    ])
    .map(Input::World);
    let mut events = futures::stream::select(
        world_events,
        gateway_source::watch_all(&client).map(Input::Gateway),
    );
    let mut a = Agent {
        client,
        gws: GatewaySource::default(),
        identity: NodeIdentity {
            name: opts.node.clone(),
            labels: BTreeMap::new(),
            router_id: opts.router_id,
        },
        world: World::default(),
        relist: Relist::new([
            Kind::Service,
            Kind::EndpointSlice,
            Kind::AddressPool,
            Kind::BgpPeer,
            Kind::BgpAdvertisement,
            Kind::Secret,
            Kind::Node,
        ]),
        speaker: Some(SpeakerApplier::new(speaker)),
        balancer: BalancerApplier::adopting(balancer, node_config, adopted),
        holder,
        outcome: IpamOutcome::default(),
        plan: NodePlan::default(),
        xdp,
        big_tcp,
        established: BTreeMap::new(),
        written: None,
        created: false,
        passes: 0,
        last_pass: Duration::ZERO,
        metrics: ReconcileMetrics::default(),
        opts,
    };
    // Detected addresses are the last resort for the router ID (after the Node's).
    let fallback_router_id = detected.v4;
    let mut retry = Duration::from_millis(250);
    let mut upkeep = crate::standalone::upkeep_timer();
    loop {
        let failing = !a.healthy();
        let wait = if failing { retry } else { a.opts.resync };
        retry = if failing {
            (retry * 2).min(Duration::from_secs(30))
        } else {
            Duration::from_millis(250)
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                Some(ev) = events.next() => {
                    a.on_watch(ev);
                    while let Ok(Some(ev)) =
                        tokio::time::timeout(a.opts.debounce, events.next()).await
                    {
                        a.on_watch(ev);
                    }
                    break;
                }
                Some(reply) = metrics_rx.recv() => {
                    let ready = a.relist.synced() && a.gws.synced() && a.healthy();
                    let _ = reply.send((a.report(), a.metrics.clone(), ready));
                }
                _ = upkeep.tick() => a.balancer.maintain(),
                () = tokio::time::sleep_until(deadline) => break,
                _ = stop.changed() => return a.shutdown().await,
            }
        }
        if a.relist.synced() && a.gws.synced() {
            a.pass(fallback_router_id).await;
        }
    }
}

impl Agent {
    fn healthy(&self) -> bool {
        self.speaker.as_ref().is_none_or(|s| s.health.ok)
            && self.balancer.health.ok
            && self.holder.as_ref().is_none_or(|h| h.health.ok)
    }

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

    async fn pass(&mut self, fallback_router_id: Option<Ipv4Addr>) {
        let started = Instant::now();
        let class = ClassPolicy {
            default_class: self.opts.default_class,
        };
        // Gateways enter as synthetic Services with EndpointSlices from their routes.
        let world = crate::gateway::with_gateway_backends(&self.world, &self.gws.world);
        self.outcome = outcome_from_status(&world, class);
        let mut identity = self.identity.clone();
        if identity.router_id.is_none() && identity.resolve(&world).1.is_none() {
            identity.router_id = fallback_router_id;
        }
        self.plan = node_plan(&world, &self.outcome, &identity);
        crate::gateway::apply_backend_weights(
            &mut self.plan,
            &world,
            &self.gws.world,
            &self.outcome,
        );
        if let Some(s) = &mut self.speaker {
            s.apply(&self.plan.peers).await;
        }
        self.balancer.apply(&self.plan.services);
        if let Some(h) = &mut self.holder {
            h.apply(&self.plan.held).await;
        }
        self.passes += 1;
        self.last_pass = started.elapsed();
        let failed: Vec<&str> = self
            .appliers()
            .iter()
            .filter(|h| !h.ok)
            .map(|h| match h.name.as_str() {
                "bgp" => "bgp",
                "xdp" => "xdp",
                _ => "addresses",
            })
            .collect();
        self.metrics.observe(self.last_pass, &failed);
        self.write_node_status().await;
    }

    fn appliers(&self) -> Vec<ApplierHealthRow> {
        let mut out = Vec::new();
        if let Some(s) = &self.speaker {
            out.push((&s.health).into());
        }
        out.push((&self.balancer.health).into());
        if let Some(h) = &self.holder {
            out.push((&h.health).into());
        }
        out
    }

    fn facts(&mut self) -> NodeFacts {
        let now = Timestamp::now();
        let statuses = self
            .speaker
            .as_ref()
            .map(|s| s.speaker().status())
            .unwrap_or_default();
        let mut peers = Vec::new();
        let mut seen = BTreeSet::new();
        for p in &statuses {
            let name = self
                .plan
                .peers
                .get(&p.address)
                .map(|pp| pp.name.clone())
                .unwrap_or_default();
            let since = match p.uptime() {
                Some(up) => Some(
                    self.established
                        .entry(p.address)
                        .or_insert_with(|| {
                            let up =
                                SignedDuration::from_secs(i64::try_from(up.as_secs()).unwrap_or(0));
                            Time(now.checked_sub(up).unwrap_or(now))
                        })
                        .clone(),
                ),
                None => None,
            };
            if since.is_some() {
                seen.insert(p.address);
            }
            peers.push((name.clone(), peer_session(&name, p, since)));
        }
        self.established.retain(|a, _| seen.contains(a));
        NodeFacts {
            peers,
            xdp: self.xdp,
            balancer_errors: self
                .balancer
                .service_errors
                .iter()
                .map(|(k, e)| format!("{}:{} {:?}: {e}", k.vip, k.port, k.proto))
                .collect(),
            failing: self
                .appliers()
                .into_iter()
                .filter(|h| !h.ok)
                .map(|h| (h.name, h.last_error.unwrap_or_default()))
                .collect(),
            problems: self
                .plan
                .problems
                .iter()
                .map(|p| format!("({}): {}", p.object, p.message))
                .collect(),
        }
    }

    /// Creates the node's `PorticoNode` once (owned by its Node), then applies its status
    /// when it changed.
    async fn write_node_status(&mut self) {
        let facts = self.facts();
        let status = node_status(
            &self.plan,
            &facts,
            self.written.as_ref(),
            &Time(Timestamp::now()),
        );
        if self.written.as_ref() == Some(&status) {
            return;
        }
        let api = Api::<PorticoNode>::all(self.client.clone());
        if !self.created {
            let mut metadata = serde_json::json!({ "name": self.opts.node });
            if let Some(node) = self.world.nodes.get(&self.opts.node) {
                if let Some(owner) = node.controller_owner_ref(&()) {
                    metadata["ownerReferences"] = serde_json::json!([owner]);
                }
            }
            let body = serde_json::json!({
                "apiVersion": "portico.io/v1alpha1",
                "kind": "PorticoNode",
                "metadata": metadata,
                "spec": {},
            });
            match api
                .patch(
                    &self.opts.node,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
            {
                Ok(_) => self.created = true,
                Err(e) => {
                    tracing::warn!(node = %self.opts.node, "creating the PorticoNode: {e}");
                    return;
                }
            }
        }
        match apply_status(&api, &self.opts.node, None, FIELD_MANAGER, &status).await {
            Ok(_) => self.written = Some(status),
            Err(e) => tracing::warn!(node = %self.opts.node, "writing the PorticoNode status: {e}"),
        }
    }

    fn report(&self) -> StatusReport {
        let peers = self
            .speaker
            .as_ref()
            .map(|s| s.speaker().status())
            .unwrap_or_default()
            .into_iter()
            .map(|p| PeerRow {
                name: self
                    .plan
                    .peers
                    .get(&p.address)
                    .map(|pp| pp.name.clone())
                    .unwrap_or_default(),
                address: p.address,
                state: p.state().to_string(),
                uptime_secs: p.uptime().map(|u| u.as_secs()),
                prefixes_sent: p.session.advertised,
                last_error: p.last_error.clone(),
            })
            .collect();
        let services = self
            .outcome
            .services
            .iter()
            .map(|((ns, name), a)| {
                let view = self
                    .plan
                    .views
                    .get(&(ns.clone(), name.clone()))
                    .cloned()
                    .unwrap_or_default();
                let c = crate::status::service_counters(self.balancer.balancer(), &view.listeners);
                ServiceRow {
                    namespace: ns.clone(),
                    name: name.clone(),
                    addresses: a.addresses.clone(),
                    pools: a.pools.clone(),
                    backends_ready: view.ready,
                    backends_total: view.total,
                    announced: view.announced,
                    local: view.local,
                    unsatisfied: None,
                    notices: Vec::new(),
                    packets: c.packets,
                    new_flows: c.new_flows,
                    drops: c.drops,
                    backends: c.backends,
                }
            })
            .collect();
        let (datapath, conntrack) = if self.xdp {
            let counters = self
                .balancer
                .balancer()
                .datapath_counters()
                .map(|c| c.into_iter().map(|(n, v)| (n.to_owned(), v)).collect())
                .unwrap_or_default();
            (
                counters,
                crate::status::tracked_flows(self.balancer.balancer()),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        StatusReport {
            node: self.opts.node.clone(),
            pools: Vec::new(),
            services,
            peers,
            datapath,
            conntrack,
            big_tcp: self.big_tcp.clone(),
            appliers: self.appliers(),
            problems: self
                .plan
                .problems
                .iter()
                .map(|p| format!("({}): {}", p.object, p.message))
                .collect(),
            passes: self.passes,
            last_pass_us: u64::try_from(self.last_pass.as_micros()).unwrap_or(u64::MAX),
        }
    }

    async fn shutdown(mut self) -> Result<()> {
        match self.opts.shutdown {
            ShutdownMode::Keep => {
                tracing::info!(
                    "stopping without withdrawing: peers with graceful restart keep the routes"
                );
            }
            ShutdownMode::Withdraw => {
                tracing::info!("stopping: withdrawing routes, addresses and services");
                if let Some(s) = self.speaker.take() {
                    s.into_speaker().shutdown().await;
                }
                if let Some(h) = self.holder.take() {
                    if let Err(e) = h.remove().await {
                        tracing::warn!("removing the address link: {e}");
                    }
                }
                self.balancer.clear();
            }
        }
        Ok(())
    }
}
