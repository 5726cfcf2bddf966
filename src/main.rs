//! The `portico` binary.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use ipnet::{Ipv4Net, Ipv6Net};
use portico::standalone::{self, Datapath, Options, ShutdownMode};
use portico_xdp::AttachMode;

/// Portico: LoadBalancer addresses, BGP announcements and an XDP Maglev fast path for
/// bare-metal Kubernetes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum XdpMode {
    Native,
    Generic,
}

impl From<XdpMode> for AttachMode {
    fn from(m: XdpMode) -> Self {
        match m {
            XdpMode::Native => AttachMode::Native,
            XdpMode::Generic => AttachMode::Generic,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Shutdown {
    /// Keep the routes at peers with graceful restart.
    Keep,
    /// Withdraw routes, addresses and XDP services.
    Withdraw,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// Default admin socket.
const ADMIN_SOCKET: &str = "/run/portico/admin.sock";

#[derive(Debug, Subcommand)]
enum LabCommand {
    /// Build the lab, apply the manifests and wait for the routes; it stays up until
    /// `portico lab down`.
    Up {
        #[command(flatten)]
        common: LabArgs,
        /// Folder of manifests to apply (default: the built-in deploy/examples/lab).
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// Seconds to wait for BGP sessions, addresses and routes.
        #[arg(long, default_value_t = 60)]
        converge_secs: u64,
    },
    /// Replace the running lab's manifests and wait until nodes and router agree.
    Apply {
        #[command(flatten)]
        common: LabArgs,
        /// Folder of manifests to apply (default: the built-in deploy/examples/lab).
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
    },
    /// Show the running lab: Services and who announces them, router sessions and routes.
    Status {
        #[command(flatten)]
        common: LabArgs,
        /// Tables or JSON.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Stop every process of the lab and delete its namespaces.
    Down {
        #[command(flatten)]
        common: LabArgs,
    },
    /// Up, apply, wait for the routes, send TCP and UDP from the client to every address,
    /// print addresses, the router's ECMP routes and hits per node and per backend, then
    /// tear down (unless --keep). Last line JSON.
    Demo {
        #[command(flatten)]
        common: LabArgs,
        /// Folder of manifests to apply (default: the built-in deploy/examples/lab).
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// TCP connections, and as many UDP exchanges, per address.
        #[arg(long, default_value_t = 100)]
        flows: usize,
        /// Leave the lab up for `portico lab status`.
        #[arg(long)]
        keep: bool,
        /// Seconds of bulk TCP through one IPv4 and one IPv6 address (0: skip).
        #[arg(long, default_value_t = 2)]
        throughput_secs: u64,
        /// Seconds to wait for BGP sessions, addresses and routes.
        #[arg(long, default_value_t = 60)]
        converge_secs: u64,
    },
    /// Own a lab until SIGTERM (started by `up` and `demo`).
    #[command(hide = true)]
    Supervise {
        #[command(flatten)]
        common: LabArgs,
    },
}

#[derive(Debug, clap::Args)]
struct LabArgs {
    /// The lab's folder: manifests, node state, sockets, logs.
    #[arg(long, value_name = "DIR", default_value = portico_lab::control::DEFAULT_DIR)]
    dir: PathBuf,
}

#[derive(Debug, Subcommand)]
#[allow(
    clippy::large_enum_variant,
    reason = "parsed once at startup; boxing buys nothing"
)]
enum Command {
    /// Run Portico without Kubernetes: read a folder of manifests (AddressPool, BGPPeer,
    /// BGPAdvertisement, Service, EndpointSlice, Secret, Node), allocate, announce and
    /// balance; follow edits while running.
    Standalone {
        /// Folder of multi-document YAML files (read recursively).
        #[arg(long, value_name = "DIR")]
        manifests: PathBuf,
        /// This node's name (node selectors, externalTrafficPolicy: Local).
        #[arg(long)]
        node: String,
        /// Where allocations persist across restarts.
        #[arg(long, value_name = "FILE")]
        state: Option<PathBuf>,
        /// Attach the XDP balancer to these interfaces (repeat); none: no datapath.
        #[arg(long, value_name = "IFACE")]
        xdp: Vec<String>,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = XdpMode::Native)]
        xdp_mode: XdpMode,
        /// bpffs folder where the XDP maps and links are pinned, so that a restart keeps
        /// tracked flows (default /sys/fs/bpf/portico/<node>; "none": no pinning).
        #[arg(long, value_name = "DIR")]
        bpf_pin_dir: Option<String>,
        /// Admin socket for `portico status`.
        #[arg(long, value_name = "PATH", default_value = ADMIN_SOCKET)]
        admin_socket: PathBuf,
        /// BGP Identifier for peers without routerID (default: the node's IPv4 address).
        #[arg(long)]
        router_id: Option<Ipv4Addr>,
        /// IPv4 source of NAT toward backends (default: the first XDP interface's).
        #[arg(long)]
        snat_v4: Option<Ipv4Addr>,
        /// IPv6 source of NAT toward backends (default: the first XDP interface's).
        #[arg(long)]
        snat_v6: Option<Ipv6Addr>,
        #[command(flatten)]
        datapath: NodeDatapathArgs,
        /// Also accept BGP connections here (e.g. 0.0.0.0:179).
        #[arg(long)]
        bgp_listen: Option<SocketAddr>,
        /// Local link that holds announced addresses; "none" holds none.
        #[arg(long, default_value = "portico0")]
        hold_link: String,
        /// Serve LoadBalancer Services without a loadBalancerClass.
        #[arg(long)]
        default_class: bool,
        /// What SIGTERM does.
        #[arg(long, value_enum, default_value_t = Shutdown::Keep)]
        shutdown: Shutdown,
        /// Serve Prometheus metrics, /healthz and /readyz here ("none": off).
        #[arg(long, default_value = "127.0.0.1:9464")]
        metrics_address: String,
    },
    /// Run the Kubernetes controller (a Deployment): watch Services, AddressPools and
    /// Namespaces; the elected leader allocates addresses and writes Service and
    /// AddressPool status (server-side apply on /status) and Events.
    Controller {
        /// Serve LoadBalancer Services without a loadBalancerClass.
        #[arg(long)]
        default_class: bool,
        /// This replica's name (Lease holder, Events' reportingInstance).
        #[arg(long, env = "POD_NAME")]
        identity: Option<String>,
        /// Namespace of the leader-election Lease.
        #[arg(long, env = "POD_NAMESPACE", default_value = "portico-system")]
        lease_namespace: String,
        /// Name of the leader-election Lease.
        #[arg(long, default_value = "portico-controller")]
        lease_name: String,
        /// Lead without an election (a single replica).
        #[arg(long)]
        no_leader_election: bool,
        /// Do not watch or serve Gateway API objects.
        #[arg(long)]
        no_gateway_api: bool,
        /// Serve Prometheus metrics, /healthz and /readyz here ("none": off).
        #[arg(long, default_value = "0.0.0.0:9464")]
        metrics_address: String,
    },
    /// Run the node agent (a DaemonSet): watch what this node needs, announce the
    /// addresses the controller assigned over BGP, balance them with XDP, and report the
    /// node's sessions and datapath in its PorticoNode object.
    Agent {
        /// This node's name.
        #[arg(long, env = "NODE_NAME")]
        node: String,
        /// Attach the XDP balancer to these interfaces (repeat); none: no datapath.
        #[arg(long, value_name = "IFACE")]
        xdp: Vec<String>,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = XdpMode::Native)]
        xdp_mode: XdpMode,
        /// bpffs folder where the XDP maps and links are pinned, so that a restart keeps
        /// tracked flows (default /sys/fs/bpf/portico/<node>; "none": no pinning).
        #[arg(long, value_name = "DIR")]
        bpf_pin_dir: Option<String>,
        /// BGP Identifier for peers without routerID (default: the Node's InternalIP).
        #[arg(long)]
        router_id: Option<Ipv4Addr>,
        /// IPv4 source of NAT toward backends (default: the first XDP interface's).
        #[arg(long)]
        snat_v4: Option<Ipv4Addr>,
        /// IPv6 source of NAT toward backends (default: the first XDP interface's).
        #[arg(long)]
        snat_v6: Option<Ipv6Addr>,
        #[command(flatten)]
        datapath: NodeDatapathArgs,
        /// Also accept BGP connections here (e.g. 0.0.0.0:179).
        #[arg(long)]
        bgp_listen: Option<SocketAddr>,
        /// Local link that holds announced addresses; "none" holds none.
        #[arg(long, default_value = "portico0")]
        hold_link: String,
        /// Serve LoadBalancer Services without a loadBalancerClass.
        #[arg(long)]
        default_class: bool,
        /// Namespace of the Secrets with BGP MD5 passwords (the only Secrets read).
        #[arg(long, env = "POD_NAMESPACE", default_value = "portico-system")]
        secret_namespace: String,
        /// What SIGTERM does.
        #[arg(long, value_enum, default_value_t = Shutdown::Keep)]
        shutdown: Shutdown,
        /// Serve Prometheus metrics, /healthz and /readyz here ("none": off).
        #[arg(long, default_value = "0.0.0.0:9465")]
        metrics_address: String,
    },
    /// Show what a running `portico standalone` is doing.
    Status {
        /// Its admin socket.
        #[arg(long, value_name = "PATH", default_value = ADMIN_SOCKET)]
        socket: PathBuf,
        /// Tables or JSON.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// The lab (root): a BIRD router with ECMP over two nodes running `portico standalone`
    /// with XDP, four backends and a client, in network namespaces; it applies the manifests
    /// of deploy/examples/lab (built in) or of --manifests.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
    /// Direct server return, on a backend: strip the outer header (IPIP, 6in4, 4in6,
    /// IP6IP6 or GUE) that Portico's balancers put around clients' packets, with an XDP
    /// program on the interface toward them, so the backend's stack sees each client's
    /// packet to the VIP (hold the VIPs on `lo`) and answers the client directly. Only
    /// packets from --peer addresses to --local addresses are touched. Runs until SIGTERM;
    /// prints the counters as JSON when it stops.
    Decap {
        /// The backend's interface toward the balancers.
        #[arg(long, value_name = "IFACE")]
        interface: String,
        /// This backend's tunnel address (outer destination; repeat).
        #[arg(long, value_name = "ADDR", required = true)]
        local: Vec<std::net::IpAddr>,
        /// A balancer's address, or a prefix of them (a balancer's `--dsr-source-*`), as
        /// outer source (repeat; 1024 addresses at most in all).
        #[arg(long = "peer", value_name = "ADDR|CIDR", required = true, value_parser = parse_net::<std::net::IpAddr, ipnet::IpNet>)]
        peers: Vec<ipnet::IpNet>,
        /// UDP port of GUE encapsulation (off unless given).
        #[arg(long, value_name = "PORT")]
        gue_port: Option<u16>,
        /// XDP attach mode.
        #[arg(long, value_enum, default_value_t = XdpMode::Native)]
        xdp_mode: XdpMode,
    },
    /// Print Portico's CustomResourceDefinitions as YAML, generated from the Rust types,
    /// or write one file per CRD into a directory (the checked-in copies live in
    /// `deploy/crds/`).
    Crds {
        /// Write `<dir>/<plural>.<group>.yaml` files instead of printing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
}

/// A replica name when none is given: the host name and the process id.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "portico".to_owned());
    format!("{host}-{}", std::process::id())
}

fn parse_metrics_address(s: &str) -> Result<Option<SocketAddr>> {
    if s == "none" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .with_context(|| format!("--metrics-address {s:?} is not an address:port or \"none\""))
}

/// A channel that turns true on SIGTERM or SIGINT.
fn stop_on_signal() -> Result<tokio::sync::watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping");
        let _ = tx.send(true);
    });
    Ok(rx)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Human => fmt.init(),
        LogFormat::Json => fmt.json().init(),
    }
    match cli.command {
        Command::Standalone {
            manifests,
            node,
            state,
            xdp,
            xdp_mode,
            bpf_pin_dir,
            admin_socket,
            router_id,
            snat_v4,
            snat_v6,
            datapath,
            bgp_listen,
            hold_link,
            default_class,
            shutdown,
            metrics_address,
        } => {
            let pin_dir = pin_dir_arg(bpf_pin_dir.as_deref(), &node);
            let mut opts = Options::new(manifests, node);
            opts.state_file = state;
            opts.admin_socket = Some(admin_socket);
            opts.datapath = if xdp.is_empty() {
                Datapath::Fake
            } else {
                Datapath::Xdp {
                    interfaces: xdp,
                    mode: xdp_mode.into(),
                    pin_dir,
                    tables: datapath.tables(),
                }
            };
            opts.router_id = router_id;
            opts.snat_v4 = snat_v4;
            opts.snat_v6 = snat_v6;
            opts.nat64_prefix = datapath.nat64_prefix;
            opts.dsr = datapath.dsr.config();
            opts.bgp_listen = bgp_listen;
            opts.hold_link = (hold_link != "none").then_some(hold_link);
            portico::bigtcp::check_size(datapath.big_tcp_size)?;
            opts.big_tcp = datapath.big_tcp;
            opts.big_tcp_size = datapath.big_tcp_size;
            opts.default_class = default_class;
            opts.metrics = if metrics_address == "none" {
                None
            } else {
                Some(metrics_address.parse().with_context(|| {
                    format!(
                        "--metrics-address {metrics_address:?} is not an address:port or \"none\""
                    )
                })?)
            };
            opts.shutdown = match shutdown {
                Shutdown::Keep => ShutdownMode::Keep,
                Shutdown::Withdraw => ShutdownMode::Withdraw,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(standalone::run(opts))?;
        }
        Command::Controller {
            default_class,
            identity,
            lease_namespace,
            lease_name,
            no_leader_election,
            no_gateway_api,
            metrics_address,
        } => {
            let identity = identity.unwrap_or_else(default_identity);
            let mut opts = portico::controller::Options::new(identity, lease_namespace);
            opts.default_class = default_class;
            opts.lease = if no_leader_election {
                None
            } else {
                opts.lease.map(|mut l| {
                    l.name = lease_name;
                    l
                })
            };
            opts.metrics = parse_metrics_address(&metrics_address)?;
            opts.gateway_api = !no_gateway_api;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
                let stop = stop_on_signal()?;
                let stats = std::sync::Arc::default();
                portico::controller::run(client, opts, stats, stop).await
            })?;
        }
        Command::Agent {
            node,
            xdp,
            xdp_mode,
            bpf_pin_dir,
            router_id,
            snat_v4,
            snat_v6,
            datapath,
            bgp_listen,
            hold_link,
            default_class,
            secret_namespace,
            shutdown,
            metrics_address,
        } => {
            let pin_dir = pin_dir_arg(bpf_pin_dir.as_deref(), &node);
            let mut opts = portico::agent::Options::new(node);
            opts.datapath = if xdp.is_empty() {
                Datapath::Fake
            } else {
                Datapath::Xdp {
                    interfaces: xdp,
                    mode: xdp_mode.into(),
                    pin_dir,
                    tables: datapath.tables(),
                }
            };
            opts.router_id = router_id;
            opts.snat_v4 = snat_v4;
            opts.snat_v6 = snat_v6;
            opts.nat64_prefix = datapath.nat64_prefix;
            opts.dsr = datapath.dsr.config();
            opts.bgp_listen = bgp_listen;
            opts.hold_link = (hold_link != "none").then_some(hold_link);
            portico::bigtcp::check_size(datapath.big_tcp_size)?;
            opts.big_tcp = datapath.big_tcp;
            opts.big_tcp_size = datapath.big_tcp_size;
            opts.default_class = default_class;
            opts.secret_namespace = secret_namespace;
            opts.metrics = parse_metrics_address(&metrics_address)?;
            opts.shutdown = match shutdown {
                Shutdown::Keep => ShutdownMode::Keep,
                Shutdown::Withdraw => ShutdownMode::Withdraw,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
                let stop = stop_on_signal()?;
                portico::agent::run(client, opts, stop).await
            })?;
        }
        Command::Status { socket, output } => {
            let report = portico::status::query(&socket)?;
            match output {
                Output::Table => print!("{}", report.render()),
                Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
        }
        Command::Lab { command } => lab(command)?,
        Command::Decap {
            interface,
            local,
            peers,
            gue_port,
            xdp_mode,
        } => {
            let peers = peer_addresses(&peers)?;
            let mut d = portico_xdp::Decap::load(&portico_xdp::DecapConfig {
                local,
                peers,
                gue_port,
            })
            .context("loading the decapsulation program (needs root and BPF)")?;
            let mode = xdp_mode.into();
            d.attach(&interface, mode)
                .with_context(|| format!("attaching the decapsulation program to {interface}"))?;
            tracing::info!(iface = %interface, "decapsulating; SIGTERM stops");
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let mut stop = stop_on_signal()?;
                let _ = stop.changed().await;
                anyhow::Ok(())
            })?;
            let counters: std::collections::BTreeMap<&str, u64> =
                d.counters()?.into_iter().collect();
            println!("{}", serde_json::to_string(&counters)?);
        }
        Command::Crds { out_dir } => {
            let files = portico_crds::crd_files()?;
            match out_dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    for (name, yaml) in files {
                        let path = dir.join(name);
                        std::fs::write(&path, yaml)
                            .with_context(|| format!("writing {}", path.display()))?;
                        println!("wrote {}", path.display());
                    }
                }
                None => {
                    for (i, (_, yaml)) in files.iter().enumerate() {
                        if i > 0 {
                            println!("---");
                        }
                        print!("{yaml}");
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs a `portico lab` command; the last line of `up`, `apply`, `status`, `down` and `demo`
/// is JSON, also when they fail (then the exit status is 1).
fn lab(command: LabCommand) -> Result<()> {
    use portico_lab::control;
    use portico_lab::progress::Progress;

    let started = std::time::Instant::now();
    let mut progress = Progress::human(Box::new(std::io::stdout()));
    let outcome: Result<serde_json::Value> = match command {
        LabCommand::Supervise { common } => {
            return control::supervise(&common.dir);
        }
        LabCommand::Up {
            common,
            manifests,
            converge_secs,
        } => {
            println!(
                "portico lab up: BIRD router, nodes n1 and n2, backends be1-be4, client (in {})",
                common.dir.display()
            );
            control::up(
                &common.dir,
                manifests.as_deref(),
                std::time::Duration::from_secs(converge_secs),
                &mut progress,
            )
            .map(|s| {
                print!("\n{}", s.render());
                serde_json::json!({"ok": true, "owner_pid": s.handle.owner_pid, "dir": common.dir})
            })
        }
        LabCommand::Apply { common, manifests } => {
            control::apply(&common.dir, manifests.as_deref(), &mut progress).map(|s| {
                print!("\n{}", s.render());
                serde_json::json!({"ok": true})
            })
        }
        LabCommand::Status { common, output } => control::status(&common.dir).and_then(|s| {
            if let Output::Table = output {
                print!("{}", s.render());
            }
            Ok(serde_json::json!({"ok": true, "status": serde_json::to_value(&s)?}))
        }),
        LabCommand::Down { common } => control::down(&common.dir, None).map(|r| {
            match r.owner_pid {
                Some(pid) => println!("portico lab down: the lab of pid {pid} is gone"),
                None => println!(
                    "portico lab down: no lab was up in {}",
                    common.dir.display()
                ),
            }
            serde_json::json!({"ok": true, "owner_pid": r.owner_pid, "swept": r.swept})
        }),
        LabCommand::Demo {
            common,
            manifests,
            flows,
            keep,
            throughput_secs,
            converge_secs,
        } => {
            println!(
                "portico lab demo: BIRD router with ECMP, nodes n1 and n2 (portico standalone, generic XDP), backends be1-be4, client"
            );
            let opts = control::DemoOptions {
                dir: common.dir,
                manifests,
                flows,
                keep,
                throughput_secs,
                converge: std::time::Duration::from_secs(converge_secs),
            };
            control::demo(&opts, &mut progress).map(|report| {
                print!("{}", report.render());
                let secs = started.elapsed().as_secs_f64();
                println!("\nportico lab demo: done in {secs:.1} s");
                report.to_json(secs)
            })
        }
    };
    match outcome {
        Ok(json) => {
            println!("{json}");
            Ok(())
        }
        Err(e) => {
            let step = progress.first_failure().map(str::to_owned);
            eprintln!("portico lab: {e:#}");
            println!(
                "{}",
                serde_json::json!({
                    "ok": false,
                    "step": step,
                    "error": format!("{e:#}"),
                    "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                })
            );
            std::process::exit(1);
        }
    }
}

/// `--bpf-pin-dir`: a folder, "none", or the default under /sys/fs/bpf for `node`.
/// The node's datapath options beyond NAT, the same for `standalone` and `agent`.
#[derive(clap::Args, Debug)]
struct NodeDatapathArgs {
    /// RFC 6052 prefix (/32, /40, /48, /56, /64 or /96) for NAT46/64: ICMP errors from
    /// routers of the other family reach clients from their address embedded in it.
    #[arg(long, value_name = "PREFIX/LEN", default_value = "64:ff9b::/96", value_parser = parse_nat64_prefix)]
    nat64_prefix: portico_xdp::XlatPrefix,
    #[command(flatten)]
    dsr: DsrArgs,
    /// Enable BIG TCP (GSO/GRO above 64 KiB, IPv4 and IPv6) on these interfaces
    /// (repeat); the sizes the kernel reports show in `portico status`.
    #[arg(long, value_name = "IFACE")]
    big_tcp: Vec<String>,
    /// GSO/GRO size for --big-tcp, in bytes (clamped to the driver's limit).
    #[arg(long, value_name = "BYTES", default_value_t = portico::bigtcp::DEFAULT_SIZE)]
    big_tcp_size: u32,
    /// Flows the node tracks (LRU): the size of each of its four flow tables, about
    /// 560 bytes per entry over the four (docs/xdp.md, "Table sizes"). Size it for the flows
    /// the node forwards at once.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CONNTRACK_ENTRIES,
          value_parser = parse_conntrack_entries)]
    conntrack_entries: u32,
    /// Slots of each CPU's flow cache (192 bytes a slot, per CPU), a power of two: two to
    /// four slots per flow a CPU forwards keep established flows on the fast path.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_FLOW_CACHE_ENTRIES,
          value_parser = parse_flow_cache_entries)]
    flow_cache_entries: u32,
}

/// `--conntrack-entries` unless given: 262,144 flows (about 150 MB in all four tables).
const DEFAULT_CONNTRACK_ENTRIES: u32 = 1 << 18;
/// `--flow-cache-entries` unless given: 16,384 slots per CPU (3 MB per CPU).
const DEFAULT_FLOW_CACHE_ENTRIES: u32 = 1 << 14;

impl NodeDatapathArgs {
    /// The XDP program's table sizes.
    fn tables(&self) -> portico_xdp::LoadOptions {
        portico_xdp::LoadOptions {
            conntrack_entries: self.conntrack_entries,
            flow_cache_entries: self.flow_cache_entries,
            ..portico_xdp::LoadOptions::default()
        }
    }
}

/// `--conntrack-entries`, in the range the loader takes (`LoadOptions::validate`).
fn parse_conntrack_entries(s: &str) -> Result<u32, String> {
    parse_table_size(s, |n| portico_xdp::LoadOptions {
        conntrack_entries: n,
        ..portico_xdp::LoadOptions::default()
    })
}

/// `--flow-cache-entries`, in the range the loader takes (`LoadOptions::validate`).
fn parse_flow_cache_entries(s: &str) -> Result<u32, String> {
    parse_table_size(s, |n| portico_xdp::LoadOptions {
        flow_cache_entries: n,
        ..portico_xdp::LoadOptions::default()
    })
}

/// A table size `s`, checked by the loader's own rules on the options `with` makes of it.
fn parse_table_size(
    s: &str,
    with: impl Fn(u32) -> portico_xdp::LoadOptions,
) -> Result<u32, String> {
    let n: u32 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of entries"))?;
    match with(n).validate() {
        Err(portico_xdp::XdpError::BadOption { why, .. }) => Err(format!("{n}: {why}")),
        Err(e) => Err(format!("{n}: {e}")),
        Ok(()) => Ok(n),
    }
}

/// Direct server return's outer header, the node's side (docs/dsr.md).
#[derive(clap::Args, Debug)]
struct DsrArgs {
    /// Outer IPv4 source toward DSR backends: an address, or a prefix whose host bits come
    /// from the flow hash (entropy for the backends' RSS) (default: the IPv4 SNAT address).
    #[arg(long, value_name = "CIDR", value_parser = parse_net::<Ipv4Addr, Ipv4Net>)]
    dsr_source_v4: Option<Ipv4Net>,
    /// Outer IPv6 source toward DSR backends, as for IPv4 (at most the last 32 bits come from
    /// the flow hash) (default: the IPv6 SNAT address).
    #[arg(long, value_name = "CIDR", value_parser = parse_net::<Ipv6Addr, Ipv6Net>)]
    dsr_source_v6: Option<Ipv6Net>,
    /// GUE's UDP port at the backends (their `portico decap --gue-port`).
    #[arg(long, value_name = "PORT", default_value_t = portico_xdp::DEFAULT_GUE_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    gue_port: u16,
}

impl DsrArgs {
    fn config(&self) -> portico_xdp::DsrConfig {
        portico_xdp::DsrConfig {
            source_v4: self.dsr_source_v4.map(|n| (n.addr(), n.prefix_len())),
            source_v6: self.dsr_source_v6.map(|n| (n.addr(), n.prefix_len())),
            gue_port: self.gue_port,
        }
    }
}

/// A prefix, or one address (a /32 or /128): `--dsr-source-v4/-v6`, `decap --peer`.
fn parse_net<A, N>(s: &str) -> Result<N, String>
where
    A: std::str::FromStr,
    N: std::str::FromStr + From<A>,
    N::Err: std::fmt::Display,
{
    match s.parse::<A>() {
        Ok(a) => Ok(N::from(a)),
        Err(_) => s.parse::<N>().map_err(|e| e.to_string()),
    }
}

/// The most addresses `portico decap --peer` takes (its `DECAP_PEERS` map's size).
const MAX_PEERS: usize = 1024;

/// Every address of the `--peer` prefixes (network and broadcast addresses included: a
/// balancer's outer source may be any of them), at most [`MAX_PEERS`].
fn peer_addresses(nets: &[ipnet::IpNet]) -> Result<Vec<std::net::IpAddr>> {
    let mut out = Vec::new();
    for net in nets {
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        let count = 1u128.checked_shl(host_bits).unwrap_or(u128::MAX);
        anyhow::ensure!(
            (out.len() as u128).saturating_add(count) <= MAX_PEERS as u128,
            "--peer {net}: more than {MAX_PEERS} peer addresses in all"
        );
        match net {
            ipnet::IpNet::V4(n) => out.extend(
                (u32::from(n.network())..=u32::from(n.broadcast()))
                    .map(|a| std::net::IpAddr::from(Ipv4Addr::from(a))),
            ),
            ipnet::IpNet::V6(n) => out.extend(
                (u128::from(n.network())..=u128::from(n.broadcast()))
                    .map(|a| std::net::IpAddr::from(Ipv6Addr::from(a))),
            ),
        }
    }
    Ok(out)
}

fn pin_dir_arg(arg: Option<&str>, node: &str) -> Option<PathBuf> {
    match arg {
        Some("none") => None,
        Some(dir) => Some(PathBuf::from(dir)),
        None => Some(PathBuf::from(format!("/sys/fs/bpf/portico/{node}"))),
    }
}

/// `--nat64-prefix`: an RFC 6052 prefix (`XlatPrefix`'s rules); clap's error names the flag
/// and the value, ours says what is wrong with it.
fn parse_nat64_prefix(s: &str) -> Result<portico_xdp::XlatPrefix, String> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent's DaemonSet (deploy/base/agent.yaml): its args, with `$(VAR)` taken from
    /// its ConfigMap, are accepted by this binary.
    #[test]
    fn the_agent_daemonset_args_parse() {
        let text = include_str!("../deploy/base/agent.yaml");
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(text).unwrap();
        let config = docs.iter().find(|d| d["kind"] == "ConfigMap").unwrap();
        let ds = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
        let container = &ds["spec"]["template"]["spec"]["containers"][0];
        let env: std::collections::BTreeMap<String, String> = container["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| {
                let key = e["valueFrom"]["configMapKeyRef"]["key"].as_str()?;
                let value = config["data"][key].as_str()?;
                Some((e["name"].as_str()?.to_owned(), value.to_owned()))
            })
            .collect();
        let mut argv = vec!["portico".to_owned()];
        for arg in container["args"].as_array().unwrap() {
            let mut a = arg.as_str().unwrap().to_owned();
            for (name, value) in &env {
                a = a.replace(&format!("$({name})"), value);
            }
            assert!(!a.contains("$("), "{a}: no ConfigMap key for it");
            argv.push(a);
        }
        argv.push("--node=n1".into());
        let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
        let Command::Agent { datapath, .. } = cli.command else {
            panic!("agent");
        };
        let t = datapath.tables();
        assert_eq!(
            (t.conntrack_entries, t.flow_cache_entries),
            (DEFAULT_CONNTRACK_ENTRIES, DEFAULT_FLOW_CACHE_ENTRIES)
        );
    }

    #[test]
    fn bad_table_sizes_are_refused_naming_the_flag_and_the_value() {
        for (args, want) in [
            (
                vec!["--conntrack-entries", "10"],
                "--conntrack-entries <N>': 10: must be between 64 and 67108864",
            ),
            (
                vec!["--conntrack-entries", "lots"],
                "--conntrack-entries <N>': \"lots\" is not a number of entries",
            ),
            (
                vec!["--flow-cache-entries", "3000"],
                "--flow-cache-entries <N>': 3000: must be a power of two up to 1048576",
            ),
            (
                vec!["--flow-cache-entries", "2097152"],
                "--flow-cache-entries <N>': 2097152: must be a power of two up to 1048576",
            ),
        ] {
            let mut argv = vec!["portico", "standalone", "--manifests", "m", "--node", "n1"];
            argv.extend(args);
            let err = Cli::try_parse_from(argv).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let ok = Cli::try_parse_from([
            "portico",
            "standalone",
            "--manifests",
            "m",
            "--node",
            "n1",
            "--conntrack-entries",
            "1000000",
            "--flow-cache-entries",
            "65536",
        ])
        .unwrap();
        let Command::Standalone { datapath, .. } = ok.command else {
            panic!("standalone");
        };
        let t = datapath.tables();
        assert_eq!(
            (t.conntrack_entries, t.flow_cache_entries),
            (1_000_000, 65536)
        );
    }

    #[test]
    fn a_bad_nat64_prefix_is_refused_naming_the_flag_the_value_and_the_fault() {
        assert_eq!(
            parse_nat64_prefix("2001:db8:122::/48").unwrap().to_string(),
            "2001:db8:122::/48"
        );
        for (bad, why) in [
            ("64:ff9b::/80", "32, 40, 48, 56, 64 or 96"),
            ("64:ff9b::1/96", "past the prefix length"),
            ("64:ff9b:0:0:100::/96", "u octet"),
        ] {
            let err = Cli::try_parse_from([
                "portico",
                "standalone",
                "--manifests",
                "m",
                "--node",
                "n",
                "--nat64-prefix",
                bad,
            ])
            .unwrap_err()
            .to_string();
            assert!(
                err.contains("--nat64-prefix") && err.contains(bad) && err.contains(why),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn decap_peers_are_addresses_or_every_address_of_a_prefix_up_to_the_map_size() {
        let nets: Vec<ipnet::IpNet> = ["198.18.5.1", "198.18.200.0/30", "fd00:18::fc/126"]
            .iter()
            .map(|s| parse_net::<std::net::IpAddr, ipnet::IpNet>(s).unwrap())
            .collect();
        let addrs: Vec<String> = peer_addresses(&nets)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            addrs,
            [
                "198.18.5.1",
                "198.18.200.0",
                "198.18.200.1",
                "198.18.200.2",
                "198.18.200.3",
                "fd00:18::fc",
                "fd00:18::fd",
                "fd00:18::fe",
                "fd00:18::ff",
            ]
        );
        let e =
            peer_addresses(&[parse_net::<std::net::IpAddr, ipnet::IpNet>("10.0.0.0/21").unwrap()])
                .unwrap_err();
        assert_eq!(
            e.to_string(),
            "--peer 10.0.0.0/21: more than 1024 peer addresses in all"
        );
        assert!(
            peer_addresses(&[parse_net::<std::net::IpAddr, ipnet::IpNet>("::/0").unwrap()])
                .is_err()
        );
        assert!(peer_addresses(&[
            parse_net::<std::net::IpAddr, ipnet::IpNet>("::1").unwrap(),
            parse_net::<std::net::IpAddr, ipnet::IpNet>("::/0").unwrap()
        ])
        .is_err());
        assert!(parse_net::<std::net::IpAddr, ipnet::IpNet>("198.18.0.0/33").is_err());
    }
}
