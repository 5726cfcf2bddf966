//! `portico standalone`: the manifest folder → world → IPAM → node plan → appliers loop,
//! with the state file, the admin socket and signal handling. Level-triggered: every pass
//! recomputes the whole plan, so a lost or coalesced event converges on the next pass.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use portico_announcer::driver::{Speaker, SpeakerConfig};
use portico_announcer::netlink::AddressHolder;
use portico_crds::ClassPolicy;
use portico_xdp::{
    AttachMode, Balancer, FakeBalancer, LoadOptions, NodeConfig, XdpBalancer, XdpError, XdpProgram,
};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot};

use crate::apply::{BalancerApplier, HolderApplier, SpeakerApplier};
use crate::manifest::ManifestFolder;
use crate::metrics::{MetricsRequest, ReconcileMetrics};
use crate::plan::{node_plan, Ipam, IpamOutcome, NodeIdentity, NodePlan};
use crate::status::{PeerRow, PoolRow, ServiceRow, StatusReport};
use crate::world::World;
use crate::{state, NodeAddresses};

/// What SIGTERM does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShutdownMode {
    /// Close sessions without withdrawing: peers with graceful restart keep the routes
    /// until the process is back.
    #[default]
    Keep,
    /// Withdraw every route (Cease), drop the held addresses and the XDP services.
    Withdraw,
}

/// The datapath to drive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datapath {
    /// The XDP program on these interfaces.
    Xdp {
        /// Interfaces to attach to.
        interfaces: Vec<String>,
        /// Attach mode.
        mode: AttachMode,
        /// Where maps and links are pinned (bpffs), so that a restart adopts the running
        /// datapath and tracked flows survive; `None`: nothing outlives the process.
        pin_dir: Option<PathBuf>,
        /// Table sizes (`--conntrack-entries`, `--flow-cache-entries`). Pins of other
        /// sizes are not adopted: the node starts over with empty tables.
        tables: LoadOptions,
    },
    /// No datapath: an in-memory balancer (addresses and BGP only; benchmarks and tests).
    Fake,
}

/// Settings of `portico standalone`.
#[derive(Debug, Clone)]
pub struct Options {
    /// The manifest folder.
    pub manifests: PathBuf,
    /// This node's name.
    pub node: String,
    /// Where allocations persist.
    pub state_file: Option<PathBuf>,
    /// The admin socket.
    pub admin_socket: Option<PathBuf>,
    /// Datapath.
    pub datapath: Datapath,
    /// BGP Identifier when peers set none (else the Node object's, else detected).
    pub router_id: Option<Ipv4Addr>,
    /// SNAT addresses (else detected on the first XDP interface).
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
    /// SIGTERM behaviour.
    pub shutdown: ShutdownMode,
    /// Serve `/metrics`, `/healthz` and `/readyz` here.
    pub metrics: Option<SocketAddr>,
    /// Quiet time after a file event before a pass.
    pub debounce: Duration,
    /// A pass at least this often, events or not.
    pub resync: Duration,
}

impl Options {
    /// Defaults for `manifests` and `node`.
    #[must_use]
    pub fn new(manifests: PathBuf, node: String) -> Self {
        Options {
            manifests,
            node,
            state_file: None,
            admin_socket: None,
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
            shutdown: ShutdownMode::Keep,
            metrics: None,
            debounce: Duration::from_millis(30),
            resync: Duration::from_secs(30),
        }
    }
}

type AdminRequest = oneshot::Sender<StatusReport>;

struct Runtime {
    opts: Options,
    folder: ManifestFolder,
    world: World,
    ipam: Ipam,
    identity: NodeIdentity,
    saved: BTreeMap<String, Vec<IpAddr>>,
    speaker: Option<SpeakerApplier>,
    balancer: BalancerApplier,
    holder: Option<HolderApplier>,
    outcome: IpamOutcome,
    plan: NodePlan,
    passes: u64,
    last_pass: Duration,
    problems: Vec<String>,
    xdp: bool,
    big_tcp: Vec<crate::bigtcp::LinkSizes>,
    reconcile_metrics: ReconcileMetrics,
}

/// Runs until SIGTERM or SIGINT.
///
/// # Errors
/// Setup fails: the state file is unreadable, the XDP program does not load or attach, the
/// BGP listener cannot bind, the admin socket cannot be created.
pub async fn run(opts: Options) -> Result<()> {
    let saved = match &opts.state_file {
        Some(p) => state::load(p)?.allocations,
        None => BTreeMap::new(),
    };
    let first_iface = match &opts.datapath {
        Datapath::Xdp { interfaces, .. } => interfaces.first().cloned(),
        Datapath::Fake => None,
    };
    let detected = NodeAddresses::detect(first_iface.as_deref());
    let identity = NodeIdentity {
        name: opts.node.clone(),
        labels: BTreeMap::new(),
        router_id: opts.router_id.or(detected.v4),
    };
    let node_config = NodeConfig {
        snat_v4: opts.snat_v4.or(detected.v4),
        snat_v6: opts.snat_v6.or(detected.v6),
        xlat_prefix: opts.nat64_prefix,
        dsr: opts.dsr,
        ..NodeConfig::default()
    };
    let big_tcp = crate::bigtcp::enable_all(&opts.big_tcp, opts.big_tcp_size).await?;
    let (balancer, xdp, adopted) = open_datapath(&opts.datapath)?;
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
    let (admin_tx, mut admin_rx) = mpsc::channel::<AdminRequest>(16);
    if let Some(path) = &opts.admin_socket {
        serve_admin(path.clone(), admin_tx)?;
    }
    let (metrics_tx, mut metrics_rx) = mpsc::channel::<MetricsRequest>(16);
    if let Some(addr) = opts.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics listener {addr}"))?;
        crate::metrics::serve(listener, metrics_tx);
    }
    let (file_tx, mut file_rx) = mpsc::unbounded_channel::<()>();
    let _watcher = watch_folder(&opts.manifests, file_tx)?;

    let mut rt = Runtime {
        folder: ManifestFolder::new(&opts.manifests),
        world: World::default(),
        ipam: Ipam::new(
            ClassPolicy {
                default_class: opts.default_class,
            },
            saved.clone(),
        ),
        identity,
        saved,
        speaker: Some(SpeakerApplier::new(speaker)),
        balancer: BalancerApplier::adopting(balancer, node_config, adopted),
        holder,
        outcome: IpamOutcome::default(),
        plan: NodePlan::default(),
        passes: 0,
        last_pass: Duration::ZERO,
        problems: Vec::new(),
        xdp,
        big_tcp,
        reconcile_metrics: ReconcileMetrics::default(),
        opts,
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut retry = Duration::from_millis(250);
    let mut upkeep = upkeep_timer();
    loop {
        rt.pass().await;
        let failing = !rt.healthy();
        let mut wait = if failing { retry } else { rt.opts.resync };
        if let Some(at) = rt.ipam.next_deadline() {
            wait = wait.min(Duration::from_secs(at.saturating_sub(unix_now()).max(1)));
        }
        retry = if failing {
            (retry * 2).min(Duration::from_secs(30))
        } else {
            Duration::from_millis(250)
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                Some(()) = file_rx.recv() => {
                    // Debounce: wait for a quiet moment, then one pass for the whole burst.
                    while let Ok(Some(())) =
                        tokio::time::timeout(rt.opts.debounce, file_rx.recv()).await
                    {}
                    break;
                }
                Some(reply) = admin_rx.recv() => {
                    let _ = reply.send(rt.report());
                }
                Some(reply) = metrics_rx.recv() => {
                    let ready = rt.passes > 0 && rt.healthy();
                    let _ = reply.send((rt.report(), rt.reconcile_metrics.clone(), ready));
                }
                _ = upkeep.tick() => rt.balancer.maintain(),
                () = tokio::time::sleep_until(deadline) => break,
                _ = sigterm.recv() => return rt.shutdown().await,
                _ = sigint.recv() => return rt.shutdown().await,
            }
        }
    }
}

impl Runtime {
    fn healthy(&self) -> bool {
        self.speaker.as_ref().is_none_or(|s| s.health.ok)
            && self.balancer.health.ok
            && self.holder.as_ref().is_none_or(|h| h.health.ok)
    }

    async fn pass(&mut self) {
        let started = Instant::now();
        match self.folder.rescan() {
            Ok(events) => {
                self.world.apply_all(events);
            }
            Err(e) => tracing::error!(
                folder = %self.folder.root().display(),
                "cannot list the manifest folder: {e}; keeping what was read before"
            ),
        }
        self.outcome = self.ipam.reconcile(&self.world, unix_now());
        let allocations = self.outcome.allocations();
        if allocations != self.saved {
            if let Some(path) = &self.opts.state_file {
                match state::save(path, &allocations) {
                    Ok(()) => self.saved = allocations,
                    Err(e) => tracing::error!("{e}"),
                }
            } else {
                self.saved = allocations;
            }
        }
        self.plan = node_plan(&self.world, &self.outcome, &self.identity);
        if let Some(s) = &mut self.speaker {
            s.apply(&self.plan.peers).await;
        }
        self.balancer.apply(&self.plan.services);
        if let Some(h) = &mut self.holder {
            h.apply(&self.plan.held).await;
        }
        let mut problems: Vec<String> = self
            .folder
            .errors()
            .iter()
            .map(ToString::to_string)
            .collect();
        for p in self.outcome.problems.iter().chain(&self.plan.problems) {
            let place = self
                .folder
                .origin(&p.object)
                .map(|o| format!("{o} "))
                .unwrap_or_default();
            problems.push(format!("{place}({}): {}", p.object, p.message));
        }
        for p in &problems {
            if !self.problems.contains(p) {
                tracing::warn!("{p}");
            }
        }
        self.problems = problems;
        self.passes += 1;
        self.last_pass = started.elapsed();
        let mut failed = Vec::new();
        if let Some(s) = &self.speaker {
            if !s.health.ok {
                failed.push(s.health.name);
            }
        }
        if !self.balancer.health.ok {
            failed.push(self.balancer.health.name);
        }
        if let Some(h) = &self.holder {
            if !h.health.ok {
                failed.push(h.health.name);
            }
        }
        self.reconcile_metrics.observe(self.last_pass, &failed);
        tracing::debug!(
            pass = self.passes,
            us = self.last_pass.as_micros() as u64,
            services = self.outcome.services.len(),
            "reconciled"
        );
    }

    fn report(&self) -> StatusReport {
        let pools = self
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
                    unsatisfied: a.unsatisfied.clone(),
                    notices: a.notices.clone(),
                    packets: c.packets,
                    new_flows: c.new_flows,
                    drops: c.drops,
                    backends: c.backends,
                }
            })
            .collect();
        let peers = match &self.speaker {
            Some(s) => s
                .speaker()
                .status()
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
                    last_error: p
                        .last_error
                        .clone()
                        .or_else(|| p.session.last_notification_received.clone())
                        .or_else(|| p.session.last_notification_sent.clone()),
                })
                .collect(),
            None => Vec::new(),
        };
        let (datapath, conntrack) = if self.xdp {
            (
                self.datapath_counters(),
                crate::status::tracked_flows(self.balancer.balancer()),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let mut appliers = vec![(&self.balancer.health).into()];
        if let Some(s) = &self.speaker {
            appliers.insert(0, (&s.health).into());
        }
        if let Some(h) = &self.holder {
            appliers.push((&h.health).into());
        }
        StatusReport {
            node: self.opts.node.clone(),
            pools,
            services,
            peers,
            datapath,
            conntrack,
            big_tcp: self.big_tcp.clone(),
            appliers,
            problems: self.problems.clone(),
            passes: self.passes,
            last_pass_us: self.last_pass.as_micros() as u64,
        }
    }

    fn datapath_counters(&self) -> Vec<(String, u64)> {
        match self.balancer.balancer().datapath_counters() {
            Ok(c) => c.into_iter().map(|(n, v)| (n.to_owned(), v)).collect(),
            Err(e) => {
                tracing::debug!("reading datapath counters: {e}");
                Vec::new()
            }
        }
    }

    async fn shutdown(mut self) -> Result<()> {
        match self.opts.shutdown {
            ShutdownMode::Keep => {
                tracing::info!(
                    "shutting down without withdrawing: peers with graceful restart keep the routes"
                );
                // Dropping the speaker closes the sessions without a NOTIFICATION.
            }
            ShutdownMode::Withdraw => {
                tracing::info!("shutting down: withdrawing routes, addresses and services");
                if let Some(s) = self.speaker.take() {
                    s.into_speaker().shutdown().await;
                }
                if let Some(h) = self.holder.take() {
                    if let Err(e) = h.remove().await {
                        tracing::warn!("removing the address link: {e}");
                    }
                }
                self.balancer.clear();
                if let Datapath::Xdp {
                    pin_dir: Some(dir), ..
                } = &self.opts.datapath
                {
                    if let Err(e) = XdpProgram::unpin(dir) {
                        tracing::warn!("detaching XDP and removing {}: {e}", dir.display());
                    }
                }
            }
        }
        if let Some(p) = &self.opts.admin_socket {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }
}

/// The datapath's upkeep timer (`BalancerApplier::maintain`): every second, ticks missed
/// while a pass ran skipped.
pub(crate) fn upkeep_timer() -> tokio::time::Interval {
    let mut t = tokio::time::interval(Duration::from_secs(1));
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    t
}

/// What [`open_datapath`] gives: the balancer, whether it is XDP, and the services it
/// adopted from a pinned datapath.
pub type OpenedDatapath = (
    Box<dyn Balancer + Send>,
    bool,
    BTreeMap<portico_xdp::ServiceKey, portico_xdp::ServiceSpec>,
);

/// Loads (or, with a pin folder holding a running datapath, adopts) the XDP program and
/// attaches it; the in-memory balancer for [`Datapath::Fake`]. Shared by every runtime.
///
/// # Errors
/// The program does not load, the pins do not fit, or attaching fails.
pub fn open_datapath(datapath: &Datapath) -> Result<OpenedDatapath> {
    let mut adopted = BTreeMap::new();
    let (balancer, xdp): (Box<dyn Balancer + Send>, bool) = match datapath {
        Datapath::Fake => (Box::new(FakeBalancer::default()), false),
        Datapath::Xdp {
            interfaces,
            mode,
            pin_dir,
            tables,
        } => {
            let mut b = match pin_dir {
                Some(dir) => {
                    check_bpffs(dir)?;
                    let program = load_pinned_or_start_over(dir, *tables).with_context(|| {
                        format!(
                            "loading the XDP program with its maps pinned in {}",
                            dir.display()
                        )
                    })?;
                    let reused = program.reused_pins();
                    let b = XdpBalancer::adopt(program)
                        .context("adopting the running datapath's state")?;
                    if reused {
                        adopted = b.services().map(|s| (s.key, s.clone())).collect();
                        tracing::info!(
                            dir = %dir.display(),
                            services = adopted.len(),
                            "adopted the pinned XDP datapath; tracked flows continue"
                        );
                    }
                    b
                }
                None => XdpBalancer::new(
                    XdpProgram::load_with(*tables)
                        .context("loading the XDP program (needs root and a BPF-capable kernel)")?,
                ),
            };
            if pin_dir.is_some() {
                for stale in b.program().pinned_interfaces()? {
                    if !interfaces.contains(&stale) {
                        b.program_mut().unpin_interface(&stale)?;
                        tracing::info!(iface = %stale, "XDP detached: no longer configured");
                    }
                }
            }
            for iface in interfaces {
                b.program_mut()
                    .attach(iface, *mode)
                    .with_context(|| format!("attaching XDP to {iface}"))?;
                tracing::info!(iface = %iface, ?mode, "XDP attached");
            }
            (Box::new(b), true)
        }
    };
    Ok((balancer, xdp, adopted))
}

/// Fails with a clear message unless `dir` (or its nearest existing ancestor) is on a
/// bpffs: pins elsewhere cannot be created, and a bpffs private to this process (as
/// `ip netns exec` gives it, remounting /sys) would vanish with it.
/// Loads the XDP program with its maps pinned in `dir`. Pins this build cannot adopt
/// (another layout version, or a map of another size: an upgrade across a change of the
/// datapath's tables, or other table sizes) are replaced by empty maps, and the load is
/// tried once more: the pinned links stay, so the interfaces keep an XDP program throughout,
/// but the connections tracked through this node are lost (logged as a warning). Any other
/// error is returned as it is.
fn load_pinned_or_start_over(
    dir: &std::path::Path,
    tables: LoadOptions,
) -> Result<XdpProgram, XdpError> {
    match XdpProgram::load_pinned(tables, dir) {
        Err(e @ (XdpError::PinnedMapMismatch { .. } | XdpError::PinnedLayout { .. })) => {
            tracing::warn!(
                dir = %dir.display(),
                error = %e,
                "the pinned XDP maps do not fit this build: starting over with empty maps \
                 (XDP stays attached; connections tracked through this node are lost)"
            );
            XdpProgram::unpin_maps(dir)?;
            XdpProgram::load_pinned(tables, dir)
        }
        other => other,
    }
}

fn check_bpffs(dir: &std::path::Path) -> Result<()> {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let mut at = dir;
    while !at.exists() {
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    let path = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .context("pin folder path contains a NUL byte")?;
    // SAFETY: statfs only writes into `buf`, which is a plain-old-data struct.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid NUL-terminated string and `buf` is writable.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut buf) };
    #[allow(
        clippy::unnecessary_cast,
        reason = "f_type's integer type differs between libc targets"
    )]
    let on_bpffs = rc == 0 && buf.f_type as i64 == BPF_FS_MAGIC;
    if !on_bpffs {
        anyhow::bail!(
            "--bpf-pin-dir {}: {} is not on a bpffs, so the XDP maps cannot be pinned there; \
             mount one (`mount -t bpf bpf /sys/fs/bpf`; under `ip netns exec`, which remounts \
             /sys, use a bpffs mounted elsewhere), or pass --bpf-pin-dir none",
            dir.display(),
            at.display()
        );
    }
    Ok(())
}

/// Seconds since the Unix epoch (IPAM's clock: grace periods survive restarts through the
/// state file's addresses, not through this process's uptime).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A stable number from the node's name, so that nodes peering with one router jitter
/// their connect retries differently.
fn node_seed(node: &str) -> u64 {
    node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn serve_admin(path: PathBuf, tx: mpsc::Sender<AdminRequest>) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the admin socket's folder {}", dir.display()))?;
    }
    // A socket left by a previous run that did not stop cleanly.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding the admin socket {}", path.display()))?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = stream.into_split();
                let mut line = String::new();
                let mut rd = BufReader::new(rd);
                if tokio::time::timeout(Duration::from_secs(5), rd.read_line(&mut line))
                    .await
                    .is_err()
                {
                    return;
                }
                let answer = match line.trim() {
                    "status" => {
                        let (reply_tx, reply_rx) = oneshot::channel();
                        if tx.send(reply_tx).await.is_err() {
                            return;
                        }
                        match reply_rx.await {
                            Ok(r) => serde_json::to_string(&r).unwrap_or_default(),
                            Err(_) => return,
                        }
                    }
                    other => serde_json::json!({ "error": format!("unknown request {other:?}") })
                        .to_string(),
                };
                let _ = wr.write_all(answer.as_bytes()).await;
                let _ = wr.write_all(b"\n").await;
            });
        }
    });
    Ok(())
}

fn watch_folder(
    dir: &std::path::Path,
    tx: mpsc::UnboundedSender<()>,
) -> Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.send(());
        }
    })
    .context("starting the inotify watcher")?;
    watcher
        .watch(dir, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    Ok(watcher)
}
