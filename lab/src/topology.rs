//! The lab of `portico lab`: a top-of-rack router running BIRD with ECMP across two Portico
//! nodes, four backends and a client, in throwaway network namespaces.
//!
//! ```text
//!                                                  ┌── n1  portico standalone, XDP on eth0
//!  client ──veth── router (BIRD, ECMP) ──veth── sw (bridge)
//!  198.18.0.1      198.18.0.254 | 198.18.1.254     ├── n2  portico standalone, XDP on eth0
//!  fd00:18::1      fd00:18::fe  | fd00:18:1::fe    ├── be1, be2, be3 (dual stack)
//!                                                  └── be4 (IPv6 only)
//! ```
//! The nodes are one-armed: the router sends a VIP's traffic to a node (ECMP, hashed on the
//! 5-tuple), the node's XDP program picks a backend (Maglev, the same on both nodes), NATs
//! the packet to it with the node's own address as source and sends it back out of the same
//! interface; the backend answers the node, which translates the reply back to the client.
//! For the `externalTrafficPolicy: Local` Service the packet keeps the client's address;
//! its endpoint be3 routes IPv4 through its node n2 ([`BackendSpec::local_node`]), whose
//! program translates the replies' source back to the VIP.
//!
//! The direct-server-return Services ([`DSR_SERVICES`]: `demo/direct`, IPv4 in IPIP;
//! `demo/direct6`, IPv6 in IP6IP6; `demo/direct-gue`, IPv4 in GUE) are served by be1 and be2
//! ([`DSR_BACKENDS`]): the node sends the client's packet unchanged inside an outer header
//! from its own address to the backend; the backend runs `portico decap` on eth0 (XDP,
//! stripping the outer header), holds the VIPs on `lo`, serves TCP and UDP on them and
//! answers the client from the VIP through its default route, the router: the answers
//! cross the switch and the router, never a node.
//!
//! [`Lab`] owns everything and removes it when dropped (also on panic); [`LabHandle`] is
//! the serializable description another process uses to look at and drive a running lab:
//! its files, namespaces, nodes' admin sockets and the router.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::peers::{Neighbor, PeerConfig, PeerKind, RealPeer};
use crate::progress::Progress;
use crate::traffic::Backend;
use crate::{require_root, NetNs, TestNet};

/// The router's AS.
pub const ROUTER_ASN: u32 = 64500;
/// The nodes' AS (as the example BGPPeers say).
pub const NODE_ASN: u32 = 64512;
/// The router's proposed hold time (seconds); the example BGPPeers propose the same.
pub const HOLD_TIME: u16 = 3;
/// The router's graceful-restart time for the nodes (seconds).
pub const RESTART_TIME: u16 = 60;
/// The port every backend serves, TCP and UDP.
pub const BACKEND_PORT: u16 = 8080;
/// The port the example Services expose, TCP and UDP.
pub const SERVICE_PORT: u16 = 80;

/// The client's IPv4 address.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client's IPv6 address.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
/// The router's IPv4 address toward the client.
pub const ROUTER_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The router's IPv6 address toward the client.
pub const ROUTER_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0xfe);
/// The router's IPv4 address on the nodes' LAN (their BGP peer and gateway).
pub const ROUTER_LAN_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
/// The router's IPv6 address on the nodes' LAN.
pub const ROUTER_LAN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0xfe);

/// A Portico node of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSpec {
    /// Its name (`--node`, and `nodeName` in EndpointSlices).
    pub name: &'static str,
    /// Its IPv4 address: BGP source, router ID, SNAT address.
    pub v4: Ipv4Addr,
    /// Its IPv6 address: BGP source and SNAT address.
    pub v6: Ipv6Addr,
}

/// The two nodes.
pub const NODES: [NodeSpec; 2] = [
    NodeSpec {
        name: "n1",
        v4: Ipv4Addr::new(198, 18, 1, 11),
        v6: Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x11),
    },
    NodeSpec {
        name: "n2",
        v4: Ipv4Addr::new(198, 18, 1, 12),
        v6: Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 0x12),
    },
];

/// A backend host of the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSpec {
    /// Its name, which it answers with.
    pub name: &'static str,
    /// Its IPv4 address (`None`: IPv6 only).
    pub v4: Option<Ipv4Addr>,
    /// Its IPv6 address.
    pub v6: Ipv6Addr,
    /// The node it runs on as the endpoint of an `externalTrafficPolicy: Local` Service
    /// (`deploy/examples/lab/30-local.yaml`): its IPv4 default route goes through that node,
    /// as a pod's goes through its own node, so the replies of flows that keep the client's
    /// address come back through the node that translates them. `None`: via the router.
    pub local_node: Option<&'static str>,
}

/// The four backends: three dual-stack, one IPv6-only; be3 is `demo/local`'s endpoint on n2.
pub const BACKENDS: [BackendSpec; 4] = [
    BackendSpec {
        name: "be1",
        v4: Some(Ipv4Addr::new(198, 18, 1, 1)),
        v6: Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 1),
        local_node: None,
    },
    BackendSpec {
        name: "be2",
        v4: Some(Ipv4Addr::new(198, 18, 1, 2)),
        v6: Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 2),
        local_node: None,
    },
    BackendSpec {
        name: "be3",
        v4: Some(Ipv4Addr::new(198, 18, 1, 3)),
        v6: Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 3),
        local_node: Some("n2"),
    },
    BackendSpec {
        name: "be4",
        v4: None,
        v6: Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, 4),
        local_node: None,
    },
];

/// The address the direct-server-return Service `demo/direct` asks for
/// (`spec.loadBalancerIP` in `deploy/examples/lab/50-direct.yaml`): its backends hold it on
/// `lo` from the start, so it is fixed rather than allocated.
pub const DSR_VIP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 14);
/// The address of `demo/direct6`, the IPv6 direct-server-return Service (IP6IP6,
/// `deploy/examples/lab/60-direct6.yaml`); fixed for the same reason.
pub const DSR_VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0xe);
/// The address of `demo/direct-gue`, the IPv4 direct-server-return Service encapsulated in
/// GUE (`deploy/examples/lab/70-direct-gue.yaml`).
pub const DSR_GUE_VIP_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 13);
/// GUE's UDP port: the nodes' `--gue-port` and the DSR backends' `portico decap --gue-port`
/// (the balancer's default, given explicitly to both sides).
pub const GUE_PORT: u16 = portico_xdp::DEFAULT_GUE_PORT;

/// Each lab node's `--conntrack-entries`.
pub const LAB_CONNTRACK_ENTRIES: u32 = 65536;

/// How a DSR Service's packets travel from a node to a backend, the value of its
/// `portico.io/dsr-encapsulation` annotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DsrEncapsulation {
    /// An IP header in front of the client's packet: IPIP for IPv4, IP6IP6 for IPv6.
    Ipip,
    /// An IP and a UDP header to [`GUE_PORT`] (GUE variant 1).
    Gue,
}

impl DsrEncapsulation {
    /// The annotation's value.
    #[must_use]
    pub fn annotation(self) -> &'static str {
        match self {
            Self::Ipip => "ipip",
            Self::Gue => "gue",
        }
    }
}

/// A direct-server-return Service of the example manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsrService {
    /// `namespace/name`.
    pub service: &'static str,
    /// Its one address (`spec.loadBalancerIP`), held by every DSR backend on `lo`.
    pub vip: IpAddr,
    /// Its encapsulation.
    pub encapsulation: DsrEncapsulation,
}

impl DsrService {
    /// The outer header on the wire, by name: `IPIP`, `IP6IP6` or `GUE` (its endpoints are
    /// of the VIP's family, so no 4in6 or 6in4 here).
    #[must_use]
    pub fn outer(&self) -> &'static str {
        match (self.encapsulation, self.vip) {
            (DsrEncapsulation::Ipip, IpAddr::V4(_)) => "IPIP",
            (DsrEncapsulation::Ipip, IpAddr::V6(_)) => "IP6IP6",
            (DsrEncapsulation::Gue, _) => "GUE",
        }
    }

    /// The client's address of the VIP's family (the source the backends must see).
    #[must_use]
    pub fn client(&self) -> IpAddr {
        match self.vip {
            IpAddr::V4(_) => IpAddr::V4(CLIENT_V4),
            IpAddr::V6(_) => IpAddr::V6(CLIENT_V6),
        }
    }
}

/// The direct-server-return Services (docs/dsr.md), all served by [`DSR_BACKENDS`].
pub const DSR_SERVICES: [DsrService; 3] = [
    DsrService {
        service: "demo/direct",
        vip: IpAddr::V4(DSR_VIP_V4),
        encapsulation: DsrEncapsulation::Ipip,
    },
    DsrService {
        service: "demo/direct6",
        vip: IpAddr::V6(DSR_VIP_V6),
        encapsulation: DsrEncapsulation::Ipip,
    },
    DsrService {
        service: "demo/direct-gue",
        vip: IpAddr::V4(DSR_GUE_VIP_V4),
        encapsulation: DsrEncapsulation::Gue,
    },
];

/// The DSR Service `service` (`namespace/name`).
///
/// # Errors
/// The lab has no such DSR Service.
pub fn dsr_service(service: &str) -> Result<&'static DsrService> {
    DSR_SERVICES
        .iter()
        .find(|d| d.service == service)
        .with_context(|| {
            let names: Vec<&str> = DSR_SERVICES.iter().map(|d| d.service).collect();
            format!("the lab has no DSR Service {service:?} (DSR Services: {names:?})")
        })
}

/// Whether `addr` is the address of a DSR Service (whose answers go around the nodes).
#[must_use]
pub fn is_dsr_vip(addr: IpAddr) -> bool {
    DSR_SERVICES.iter().any(|d| d.vip == addr)
}

/// The backends of every DSR Service ([`DSR_SERVICES`]): each runs `portico decap` on eth0
/// with its IPv4 and IPv6 addresses as local ends, the nodes' addresses of both families as
/// peers and [`GUE_PORT`], holds every DSR VIP on `lo` and serves TCP and UDP on each
/// VIP:[`SERVICE_PORT`] (DSR translates neither address nor port). Their default routes
/// are the router, so the answers go around the nodes.
pub const DSR_BACKENDS: [&str; 2] = ["be1", "be2"];

/// The node owning `addr` (one of its LAN addresses), if any.
#[must_use]
pub fn node_of(addr: IpAddr) -> Option<&'static NodeSpec> {
    NODES
        .iter()
        .find(|n| addr == IpAddr::V4(n.v4) || addr == IpAddr::V6(n.v6))
}

/// The node called `name`.
///
/// # Errors
/// There is no such node.
pub fn node_named(name: &str) -> Result<&'static NodeSpec> {
    NODES
        .iter()
        .find(|n| n.name == name)
        .with_context(|| format!("the lab has no node {name:?} (nodes: n1, n2)"))
}

/// How a lab is built.
#[derive(Debug, Clone)]
pub struct LabOptions {
    /// The `portico` binary the nodes run (`portico standalone`).
    pub portico: PathBuf,
    /// Where the lab keeps manifests, node state, sockets and logs (created if missing).
    pub dir: PathBuf,
    /// XDP attach mode on the nodes' uplinks: `generic`. (`native` on a veth also needs an
    /// XDP program or GRO on the switch's ports to deliver `XDP_TX` frames; the lab sets up
    /// neither, so traffic fails.)
    pub xdp_mode: String,
}

/// Everything another process needs to look at and drive a running lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabHandle {
    /// The process that owns the lab (its namespaces carry this pid).
    pub owner_pid: u32,
    /// The prefix of every namespace of the lab.
    pub base: String,
    /// The lab's folder.
    pub dir: PathBuf,
    /// Namespace names by role (`client`, `router`, `switch`, `n1`, `be1`, …).
    pub namespaces: BTreeMap<String, String>,
    /// BIRD's control socket.
    pub bird_socket: PathBuf,
    /// The `portico` binary the nodes run.
    pub portico: PathBuf,
}

/// A node's `portico status`, the parts the lab reads (the JSON of the admin socket).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The node.
    pub node: String,
    /// Its address pools.
    pub pools: Vec<PoolStatus>,
    /// Its Services.
    pub services: Vec<ServiceStatus>,
    /// Its BGP peers.
    pub peers: Vec<PeerStatus>,
    /// Its appliers' health.
    pub appliers: Vec<ApplierStatus>,
    /// Problems with files and objects.
    pub problems: Vec<String>,
    /// Reconcile passes so far.
    pub passes: u64,
    /// The XDP program's global counters by name.
    #[serde(default)]
    pub datapath: Vec<(String, u64)>,
    /// Tracked flows by table, and the tables' capacity.
    #[serde(default)]
    pub conntrack: Vec<(String, u64)>,
}

/// One address pool as a node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Name.
    pub name: String,
    /// `Ready`, `Conflict with …` or `InvalidSpec`.
    pub state: String,
    /// IPv4 addresses usable.
    pub v4_total: String,
    /// IPv6 addresses usable.
    pub v6_total: String,
}

/// One Service as a node sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// Ready backends (this node's only, for `Local`).
    pub backends_ready: usize,
    /// Backends carrying or draining flows.
    pub backends_total: usize,
    /// Announced from this node.
    pub announced: bool,
    /// `externalTrafficPolicy: Local`.
    pub local: bool,
    /// Why it lacks an address.
    pub unsatisfied: Option<String>,
    /// Packets this node's XDP program balanced for it.
    pub packets: u64,
    /// New flows this node's XDP program balanced for it.
    pub new_flows: u64,
    /// Packets this node's XDP program dropped for it.
    #[serde(default)]
    pub drops: u64,
    /// Its backends with this node's counters.
    #[serde(default)]
    pub backends: Vec<BackendStatus>,
}

/// One backend of a Service with one node's XDP counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Address.
    pub address: IpAddr,
    /// Port.
    pub port: u16,
    /// Packets this node sent toward it.
    pub packets: u64,
    /// New flows this node balanced to it.
    pub new_flows: u64,
}

impl ServiceStatus {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// One BGP peer as a node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    /// The BGPPeer's name.
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// Session state.
    pub state: String,
}

/// An applier's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplierStatus {
    /// The applier.
    pub name: String,
    /// Its last pass applied fully.
    pub ok: bool,
    /// Its last failure.
    pub last_error: Option<String>,
}

/// A route the router installed into its kernel from BGP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRoute {
    /// The prefix.
    pub prefix: IpNet,
    /// The next hops (more than one: ECMP).
    pub next_hops: Vec<IpAddr>,
}

impl KernelRoute {
    /// The nodes behind the next hops, by name (an unknown next hop shows as its address).
    pub fn nodes(&self) -> Vec<String> {
        self.next_hops
            .iter()
            .map(|nh| node_of(*nh).map_or_else(|| nh.to_string(), |n| n.name.to_owned()))
            .collect()
    }
}

/// The router's BGP session with one neighbor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouterSession {
    /// The neighbor.
    pub neighbor: IpAddr,
    /// The node it belongs to.
    pub node: String,
    /// BIRD's state (`Established`, `Active`, …).
    pub state: String,
}

/// The order of BIRD's neighbors (protocols `n0`..`n3`).
fn router_neighbors() -> Vec<(IpAddr, &'static str)> {
    NODES
        .iter()
        .flat_map(|n| [(IpAddr::V4(n.v4), n.name), (IpAddr::V6(n.v6), n.name)])
        .collect()
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `timeout`.
///
/// # Errors
/// `timeout` passes; the error names `what` and the last error or state `f` reported.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("none");
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}; last error: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `text` to `path` through a temporary file and a rename, as editors do, so a
/// watcher never reads half a file.
///
/// # Errors
/// Writing or renaming fails.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let dir = path.parent().context("a file path has a parent")?;
    let name = path
        .file_name()
        .context("a file path has a name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming onto {}", path.display()))?;
    Ok(())
}

impl LabHandle {
    /// The namespace of `role` (`client`, `router`, `switch`, a node or a backend).
    ///
    /// # Errors
    /// The lab has no such role.
    pub fn ns(&self, role: &str) -> Result<NetNs> {
        self.namespaces
            .get(role)
            .map(|n| NetNs::named(n))
            .with_context(|| format!("the lab has no namespace for {role:?}"))
    }

    /// The folder the nodes watch.
    pub fn manifests_dir(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Where applied manifests live (a subfolder of [`LabHandle::manifests_dir`], swapped
    /// whole by [`LabHandle::apply`]); edit files here and the nodes follow.
    pub fn applied_dir(&self) -> PathBuf {
        self.manifests_dir().join("lab")
    }

    /// The lab's own bpffs, where each node pins its XDP maps and links (`<dir>/bpf/<node>`):
    /// `ip netns exec` remounts /sys, so /sys/fs/bpf is not visible to the nodes, and a
    /// mount of its own keeps the lab's pins apart from every other run's.
    pub fn bpffs(&self) -> PathBuf {
        self.dir.join("bpf")
    }

    /// A node's folder: state file, admin socket, log.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.join(node)
    }

    /// A node's admin socket (`portico status --socket`).
    pub fn admin_socket(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("admin.sock")
    }

    /// A node's state file.
    pub fn state_file(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("state.json")
    }

    /// A node's log (stdout and stderr of `portico standalone`).
    pub fn node_log(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("portico.log")
    }

    /// The log of `portico decap` on a DSR backend (its counters, as JSON,
    /// are the last line once it stopped).
    pub fn decap_log(&self, backend: &str) -> PathBuf {
        self.dir.join("decap").join(format!("{backend}.log"))
    }

    /// The last lines of a node's log, for error messages.
    pub fn node_log_tail(&self, node: &str) -> String {
        let text = std::fs::read_to_string(self.node_log(node)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ---\n{}",
            self.node_log(node).display(),
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }

    /// Asks a node's admin socket for its status.
    ///
    /// # Errors
    /// The node does not answer (not running, or still starting).
    pub fn node_status(&self, node: &str) -> Result<NodeStatus> {
        let path = self.admin_socket(node);
        let mut s = UnixStream::connect(&path)
            .with_context(|| format!("connecting to {node}'s admin socket {}", path.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"status\n")?;
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("{node}'s status: {line:?}"))
    }

    /// Every node's XDP counters of packets passed to its stack or dropped, where not
    /// zero (`n1: pass_not_vip=59 drop_no_snat_port=1; n2: …`), to explain failed traffic.
    pub fn datapath_exceptions(&self) -> String {
        self.node_statuses()
            .into_iter()
            .map(|(node, st)| match st {
                Ok(st) => {
                    let counters: Vec<String> = st
                        .datapath
                        .iter()
                        .filter(|(k, v)| *v > 0 && (k.starts_with("pass") || k.starts_with("drop")))
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    format!("{node}: {}", counters.join(" "))
                }
                Err(e) => format!("{node}: {e:#}"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// TCP resets each host's kernel has sent so far (`OutRsts` of `/proc/net/snmp` in its
    /// namespace), by role; hosts that cannot be read are left out.
    pub fn tcp_resets_sent(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for (role, name) in &self.namespaces {
            if role == "switch" {
                continue;
            }
            let Ok(text) = NetNs::named(name).run(&["cat", "/proc/net/snmp"]) else {
                continue;
            };
            let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
            if let (Some(head), Some(values)) = (tcp.next(), tcp.next()) {
                let value = head
                    .split_whitespace()
                    .zip(values.split_whitespace())
                    .find(|(k, _)| *k == "OutRsts")
                    .and_then(|(_, v)| v.parse().ok());
                if let Some(v) = value {
                    out.insert(role.clone(), v);
                }
            }
        }
        out
    }

    /// The status of every node that answers, by name.
    pub fn node_statuses(&self) -> BTreeMap<String, Result<NodeStatus>> {
        NODES
            .iter()
            .map(|n| (n.name.to_owned(), self.node_status(n.name)))
            .collect()
    }

    /// The routes BIRD installed into the router's kernel, IPv4 and IPv6.
    ///
    /// # Errors
    /// `ip route` fails or prints something unexpected.
    pub fn router_routes(&self) -> Result<Vec<KernelRoute>> {
        let rt = self.ns("router")?;
        let mut routes = Vec::new();
        for family in ["-4", "-6"] {
            let out = rt.run(&["ip", "-j", family, "route", "show", "proto", "bird"])?;
            routes.extend(parse_ip_routes(&out)?);
        }
        routes.sort_by_key(|r| r.prefix);
        Ok(routes)
    }

    /// BIRD's sessions with the nodes.
    ///
    /// # Errors
    /// `birdc` fails.
    pub fn router_sessions(&self) -> Result<Vec<RouterSession>> {
        let rt = self.ns("router")?;
        let socket = self.bird_socket.display().to_string();
        let out = rt.run(&["birdc", "-s", &socket, "show", "protocols"])?;
        let mut states = BTreeMap::new();
        for line in out.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() >= 5 && words[1] == "BGP" {
                // Name Proto Table State Since Info…; BGP's Info starts with its state.
                let info = words.get(5).copied().unwrap_or(words[3]);
                states.insert(words[0].to_owned(), info.to_owned());
            }
        }
        Ok(router_neighbors()
            .into_iter()
            .enumerate()
            .map(|(i, (neighbor, node))| RouterSession {
                neighbor,
                node: node.to_owned(),
                state: states
                    .get(&format!("n{i}"))
                    .cloned()
                    .unwrap_or_else(|| "unknown".into()),
            })
            .collect())
    }

    /// Replaces the applied manifests with `files` (name, text) in one step: they are
    /// written into a hidden staging folder that is then swapped with the applied one
    /// (`renameat2(RENAME_EXCHANGE)`), so every node sees the whole set at once and, reading
    /// the same inputs, allocates the same addresses.
    ///
    /// # Errors
    /// A file cannot be written or the swap fails.
    pub fn apply(&self, files: &[(String, String)]) -> Result<()> {
        let stage = self.manifests_dir().join(".staging");
        if stage.exists() {
            std::fs::remove_dir_all(&stage)?;
        }
        std::fs::create_dir_all(&stage).with_context(|| format!("creating {}", stage.display()))?;
        for (name, text) in files {
            std::fs::write(stage.join(name), text)
                .with_context(|| format!("writing {name} into {}", stage.display()))?;
        }
        let applied = self.applied_dir();
        if applied.exists() {
            exchange(&stage, &applied)?;
            std::fs::remove_dir_all(&stage)?;
        } else {
            std::fs::rename(&stage, &applied)
                .with_context(|| format!("renaming onto {}", applied.display()))?;
        }
        Ok(())
    }

    /// Writes one applied manifest (created or replaced atomically).
    ///
    /// # Errors
    /// Writing fails.
    pub fn write_manifest(&self, file: &str, text: &str) -> Result<()> {
        std::fs::create_dir_all(self.applied_dir())?;
        write_atomically(&self.applied_dir().join(file), text)
    }

    /// The text of one applied manifest.
    ///
    /// # Errors
    /// It does not exist.
    pub fn read_manifest(&self, file: &str) -> Result<String> {
        let path = self.applied_dir().join(file);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Deletes one applied manifest.
    ///
    /// # Errors
    /// It does not exist.
    pub fn remove_manifest(&self, file: &str) -> Result<()> {
        let path = self.applied_dir().join(file);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    /// Every running node's status once the nodes agree: each has reconciled, every
    /// Service has all its addresses and the nodes give it the same ones; `None` while not.
    ///
    /// # Errors
    /// A node does not answer, or the nodes disagree on an address (they run one IPAM
    /// each; see `docs/lab.md`).
    pub fn agreed_statuses(&self, nodes: &[&str]) -> Result<Option<BTreeMap<String, NodeStatus>>> {
        let mut statuses = BTreeMap::new();
        for &n in nodes {
            statuses.insert(n.to_owned(), self.node_status(n)?);
        }
        let mut addresses: BTreeMap<String, (String, Vec<IpAddr>)> = BTreeMap::new();
        for (node, st) in &statuses {
            if st.passes == 0 {
                return Ok(None);
            }
            for s in &st.services {
                if let Some(why) = &s.unsatisfied {
                    bail!("{node}: {} has no address yet: {why}", s.id());
                }
                if s.addresses.is_empty() {
                    return Ok(None);
                }
                match addresses.get(&s.id()) {
                    Some((first, a)) if *a != s.addresses => bail!(
                        "{first} gives {} the addresses {a:?} and {node} gives it {:?}",
                        s.id(),
                        s.addresses
                    ),
                    Some(_) => {}
                    None => {
                        addresses.insert(s.id(), (node.clone(), s.addresses.clone()));
                    }
                }
            }
        }
        let ids: BTreeSet<Vec<String>> = statuses
            .values()
            .map(|st| st.services.iter().map(ServiceStatus::id).collect())
            .collect();
        if ids.len() > 1 {
            return Ok(None);
        }
        Ok(Some(statuses))
    }

    /// The routes the router should have given the nodes' statuses: every address of a
    /// Service, via every node that announces it.
    pub fn expected_routes(
        statuses: &BTreeMap<String, NodeStatus>,
    ) -> BTreeMap<IpNet, Vec<IpAddr>> {
        let mut want: BTreeMap<IpNet, Vec<IpAddr>> = BTreeMap::new();
        for (node, st) in statuses {
            let Ok(spec) = node_named(node) else { continue };
            for s in &st.services {
                for a in &s.addresses {
                    let entry = want.entry(IpNet::from(*a)).or_default();
                    if s.announced {
                        entry.push(match a {
                            IpAddr::V4(_) => IpAddr::V4(spec.v4),
                            IpAddr::V6(_) => IpAddr::V6(spec.v6),
                        });
                    }
                }
            }
        }
        for hops in want.values_mut() {
            hops.sort();
        }
        want
    }

    /// Waits until the lab has converged: the nodes' BGP sessions are up, they agree on
    /// every address, and the router's kernel routes every address via exactly the nodes
    /// that announce it. Returns the nodes' statuses and the router's routes.
    ///
    /// # Errors
    /// It does not converge within `timeout`.
    pub fn wait_converged(
        &self,
        nodes: &[&str],
        timeout: Duration,
    ) -> Result<(BTreeMap<String, NodeStatus>, Vec<KernelRoute>)> {
        wait_for("the nodes and the router to agree", timeout, || {
            let Some(statuses) = self.agreed_statuses(nodes)? else {
                bail!("the nodes have not allocated every address yet");
            };
            let problems: Vec<String> = statuses
                .values()
                .flat_map(|st| st.problems.iter().map(|p| format!("{}: {p}", st.node)))
                .collect();
            let problems = if problems.is_empty() {
                String::new()
            } else {
                format!(" (the nodes report: {})", problems.join("; "))
            };
            for st in statuses.values() {
                if st.peers.is_empty() {
                    bail!("{} has no BGP peer{problems}", st.node);
                }
                if let Some(p) = st.peers.iter().find(|p| p.state != "Established") {
                    bail!(
                        "{}'s session with {} ({}) is {}{problems}",
                        st.node,
                        p.name,
                        p.address,
                        p.state
                    );
                }
            }
            let want = Self::expected_routes(&statuses);
            let routes = self.router_routes()?;
            let have: BTreeMap<IpNet, Vec<IpAddr>> = routes
                .iter()
                .map(|r| (r.prefix, r.next_hops.clone()))
                .collect();
            let want: BTreeMap<IpNet, Vec<IpAddr>> =
                want.into_iter().filter(|(_, h)| !h.is_empty()).collect();
            if have != want {
                bail!("the router routes {have:?}, the nodes announce {want:?}{problems}");
            }
            Ok(Some((statuses, routes)))
        })
    }
}

/// Swaps two paths atomically.
fn exchange(a: &Path, b: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: two valid NUL-terminated paths; renameat2 does not keep the pointers.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("swapping {} and {}", a.display(), b.display()));
    }
    Ok(())
}

/// Parses `ip -j route show`: single-path routes carry `gateway`, ECMP ones `nexthops`.
fn parse_ip_routes(json: &str) -> Result<Vec<KernelRoute>> {
    let json = json.trim();
    if json.is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = serde_json::from_str(json).context("ip -j route")?;
    let mut out = Vec::new();
    for r in v.as_array().context("ip -j route: not a list")? {
        let dst = r["dst"].as_str().context("route without dst")?;
        let prefix: IpNet = if dst.contains('/') {
            dst.parse()?
        } else {
            IpNet::from(dst.parse::<IpAddr>()?)
        };
        let mut next_hops = Vec::new();
        if let Some(gw) = r["gateway"].as_str() {
            next_hops.push(gw.parse()?);
        }
        for nh in r["nexthops"].as_array().into_iter().flatten() {
            if let Some(gw) = nh["gateway"].as_str() {
                next_hops.push(gw.parse()?);
            }
        }
        next_hops.sort();
        out.push(KernelRoute { prefix, next_hops });
    }
    Ok(out)
}

/// One running (or stopped) node process.
struct NodeProcess {
    spec: NodeSpec,
    child: Option<Child>,
}

/// How to take a node down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStop {
    /// SIGTERM: `portico standalone` closes its sessions without a NOTIFICATION, so the
    /// router keeps its routes (graceful restart) until it is back.
    Graceful,
    /// The node fails: its switch port goes down (cable pulled), then the process is
    /// killed. The router notices when the hold timer expires and withdraws its routes.
    Failure,
}

/// A running lab; dropping it stops every process and deletes every namespace.
pub struct Lab {
    handle: LabHandle,
    options: LabOptions,
    nodes: Vec<NodeProcess>,
    /// `portico decap` on each of [`DSR_BACKENDS`].
    decaps: Vec<Child>,
    bpffs_mounted: bool,
    // Dropped in this order: nodes first (the field above), then backends, router, and the
    // namespaces last.
    _backends: Vec<Backend>,
    router: RealPeer,
    net: TestNet,
}

impl Lab {
    /// Builds the lab: namespaces and links, the router, the backends, and the two nodes
    /// running `portico standalone` on an empty manifest folder (see [`LabHandle::apply`]).
    /// Each part is one step of `progress`.
    ///
    /// # Errors
    /// Not root, a tool is missing, or a part cannot be set up; what was built is removed.
    pub fn build(options: LabOptions, progress: &mut Progress) -> Result<Lab> {
        require_root("the lab")?;
        let dir = options.dir.clone();
        std::fs::create_dir_all(dir.join("manifests"))
            .with_context(|| format!("creating {}", dir.display()))?;
        let (net, namespaces) = progress.step("namespaces and links", build_network)?;
        let router = progress.step("router: BIRD with ECMP into its kernel", || {
            start_router(&NetNs::named(&namespaces["router"]))
        })?;
        let backends = progress.step("backends: TCP and UDP servers", || {
            start_backends(&namespaces)
        })?;
        let handle = LabHandle {
            owner_pid: std::process::id(),
            base: net.base().to_owned(),
            dir,
            namespaces,
            bird_socket: router.dir().join("bird.ctl"),
            portico: options.portico.clone(),
        };
        let mut lab = Lab {
            handle,
            options,
            nodes: NODES
                .iter()
                .map(|&spec| NodeProcess { spec, child: None })
                .collect(),
            decaps: Vec::new(),
            bpffs_mounted: false,
            _backends: backends,
            router,
            net,
        };
        progress.step("DSR backends: portico decap with XDP", || {
            for b in DSR_BACKENDS {
                let child = lab.spawn_decap(b)?;
                lab.decaps.push(child);
                lab.wait_decap(b)?;
            }
            Ok(())
        })?;
        progress.step("nodes: portico standalone with XDP", || {
            mount_bpffs(&lab.handle.bpffs())?;
            lab.bpffs_mounted = true;
            for n in NODES {
                lab.spawn_node(n.name)?;
            }
            for n in NODES {
                lab.wait_node(n.name)?;
            }
            Ok(())
        })?;
        Ok(lab)
    }

    /// The lab's description, for other processes and for queries.
    pub fn handle(&self) -> &LabHandle {
        &self.handle
    }

    /// BIRD on the router.
    pub fn router(&self) -> &RealPeer {
        &self.router
    }

    /// The test net owning the namespaces.
    pub fn net(&self) -> &TestNet {
        &self.net
    }

    /// Starts node `name` again (its switch port up first, if a failure took it down) and
    /// waits until its admin socket answers.
    ///
    /// # Errors
    /// No such node, it runs already, or it does not come up.
    pub fn start_node(&mut self, name: &str) -> Result<()> {
        self.handle
            .ns("switch")?
            .run(&["ip", "link", "set", name, "up"])?;
        self.spawn_node(name)?;
        self.wait_node(name)
    }

    /// Takes node `name` down as `how` says and waits for its process to end.
    ///
    /// # Errors
    /// No such node or it is not running, or it does not stop within 20 s.
    pub fn stop_node(&mut self, name: &str, how: NodeStop) -> Result<()> {
        if how == NodeStop::Failure {
            self.handle
                .ns("switch")?
                .run(&["ip", "link", "set", name, "down"])?;
        }
        let node = self.node_mut(name)?;
        let mut child = node
            .child
            .take()
            .with_context(|| format!("{name} is not running"))?;
        let signal = match how {
            NodeStop::Graceful => libc::SIGTERM,
            NodeStop::Failure => libc::SIGKILL,
        };
        let pid = libc::pid_t::try_from(child.id())?;
        // SAFETY: kill(2) on our own, not yet reaped child (`ip netns exec` execs in place).
        unsafe { libc::kill(pid, signal) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                if how == NodeStop::Graceful && !status.success() {
                    bail!(
                        "{name} exited with {status} on SIGTERM\n{}",
                        self.handle.node_log_tail(name)
                    );
                }
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("{name} did not stop within 20 s; killed");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn node_mut(&mut self, name: &str) -> Result<&mut NodeProcess> {
        self.nodes
            .iter_mut()
            .find(|n| n.spec.name == name)
            .with_context(|| format!("the lab has no node {name:?}"))
    }

    fn spawn_node(&mut self, name: &str) -> Result<()> {
        let h = self.handle.clone();
        let mode = self.options.xdp_mode.clone();
        let node = self.node_mut(name)?;
        if node.child.is_some() {
            bail!("{name} runs already");
        }
        let spec = node.spec;
        std::fs::create_dir_all(h.node_dir(name))?;
        let log = File::options()
            .create(true)
            .append(true)
            .open(h.node_log(name))
            .with_context(|| format!("opening {}", h.node_log(name).display()))?;
        let path = |p: PathBuf| p.display().to_string();
        let mut cmd = h.ns(name)?.command(&path(h.portico.clone()));
        cmd.args([
            "standalone",
            "--manifests",
            &path(h.manifests_dir()),
            "--node",
            name,
            "--state",
            &path(h.state_file(name)),
            "--xdp",
            "eth0",
            "--xdp-mode",
            &mode,
            "--admin-socket",
            &path(h.admin_socket(name)),
            "--router-id",
            &spec.v4.to_string(),
            "--bpf-pin-dir",
            &path(h.bpffs().join(name)),
            // The DSR outer source is the node's own address of each family (the default:
            // the SNAT address), the backends' `portico decap --peer`.
            "--gue-port",
            &GUE_PORT.to_string(),
            // A lab's flows are few: small tables (the defaults take about 150 MB a node).
            "--conntrack-entries",
            &LAB_CONNTRACK_ENTRIES.to_string(),
            "--flow-cache-entries",
            "4096",
        ])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        die_with_lab(&mut cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting portico standalone on {name}"))?;
        self.node_mut(name)?.child = Some(child);
        Ok(())
    }

    /// Starts `portico decap` on eth0 of backend `name`: its own addresses are the outer
    /// destinations, the nodes' addresses of both families (their DSR outer source, the SNAT
    /// address by default) the peers, and GUE is stripped on [`GUE_PORT`].
    fn spawn_decap(&self, name: &str) -> Result<Child> {
        let h = &self.handle;
        let spec = BACKENDS
            .iter()
            .find(|b| b.name == name)
            .with_context(|| format!("the lab has no backend {name:?}"))?;
        let v4 = spec.v4.with_context(|| {
            format!("backend {name} has no IPv4 address for the IPv4 DSR Services")
        })?;
        let log_path = h.decap_log(name);
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = h.ns(name)?.command(&h.portico.display().to_string());
        cmd.args([
            "decap",
            "--interface",
            "eth0",
            "--local",
            &v4.to_string(),
            "--local",
            &spec.v6.to_string(),
            "--gue-port",
            &GUE_PORT.to_string(),
            "--xdp-mode",
            &self.options.xdp_mode,
        ]);
        for n in NODES {
            cmd.args(["--peer", &n.v4.to_string(), "--peer", &n.v6.to_string()]);
        }
        cmd.env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_lab(&mut cmd);
        cmd.spawn()
            .with_context(|| format!("starting portico decap on {name}"))
    }

    /// Waits until backend `name`'s eth0 carries an XDP program (the last decap started).
    fn wait_decap(&mut self, name: &str) -> Result<()> {
        let ns = self.handle.ns(name)?;
        let log = self.handle.decap_log(name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let link = ns.run(&["ip", "link", "show", "dev", "eth0"])?;
            if link.contains("xdp") {
                return Ok(());
            }
            let child = self.decaps.last_mut().context("no decap process")?;
            if let Some(status) = child.try_wait()? {
                bail!(
                    "portico decap on {name} exited with {status}\n--- {} ---\n{}",
                    log.display(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if Instant::now() >= deadline {
                bail!("portico decap on {name} did not attach within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_node(&mut self, name: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.handle.node_status(name).is_ok() {
                return Ok(());
            }
            let h = self.handle.clone();
            let node = self.node_mut(name)?;
            if let Some(child) = node.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    node.child = None;
                    bail!(
                        "portico standalone on {name} exited with {status}\n{}",
                        h.node_log_tail(name)
                    );
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name}'s admin socket did not answer within 30 s\n{}",
                    h.node_log_tail(name)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // SIGTERM: decap detaches and prints its counters into its log.
        for child in &mut self.decaps {
            if let Ok(pid) = libc::pid_t::try_from(child.id()) {
                // SAFETY: kill(2) on our own, not yet reaped child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for child in &mut self.decaps {
            while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.bpffs_mounted {
            let bpffs = self.handle.bpffs();
            for n in NODES {
                let _ = portico_xdp::XdpProgram::unpin(bpffs.join(n.name));
            }
            let _ = unmount_bpffs(&bpffs);
        }
    }
}

/// Mounts a bpffs on `dir` (created if missing).
fn mount_bpffs(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(dir)
        .output()
        .context("running mount")?;
    if !out.status.success() {
        bail!(
            "mounting a bpffs on {}: {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Whether a filesystem is mounted on `dir`.
#[must_use]
pub fn is_mount_point(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|m| Path::new(m) == dir)
}

/// Unmounts the lab's bpffs (which drops every pin in it) and removes the folder.
///
/// # Errors
/// `umount` fails.
pub fn unmount_bpffs(dir: &Path) -> Result<()> {
    if is_mount_point(dir) {
        let out = std::process::Command::new("umount")
            .arg(dir)
            .output()
            .context("running umount")?;
        if !out.status.success() {
            bail!(
                "unmounting {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Adds the address `cidr` (IPv4 or IPv6) to `dev` in `ns`; IPv6 without duplicate address
/// detection, so it is usable at once.
///
/// # Errors
/// `ip addr add` fails.
pub fn addr(ns: &NetNs, cidr: &str, dev: &str) -> Result<()> {
    let family = if cidr.contains(':') { "-6" } else { "-4" };
    let mut args = vec!["ip", family, "addr", "add", cidr, "dev", dev];
    if family == "-6" {
        args.push("nodad");
    }
    ns.run(&args)?;
    Ok(())
}

/// Default routes in `ns`: via `v4` (if any) and via `v6`.
///
/// # Errors
/// `ip route add` fails.
pub fn default_routes(ns: &NetNs, v4: Option<Ipv4Addr>, v6: Ipv6Addr) -> Result<()> {
    if let Some(gw) = v4 {
        ns.run(&[
            "ip",
            "-4",
            "route",
            "add",
            "default",
            "via",
            &gw.to_string(),
        ])?;
    }
    ns.run(&[
        "ip",
        "-6",
        "route",
        "add",
        "default",
        "via",
        &v6.to_string(),
    ])?;
    Ok(())
}

/// The lab router's forwarding and ECMP settings: it forwards both families and picks a
/// path by a hash of the packet's 5-tuple (source and destination address and port,
/// protocol), as a router across a wire does, so one client's flows spread over the nodes
/// and each flow stays on one node for its whole life.
///
/// Not `fib_multipath_hash_policy=1`: for a packet that already carries a layer-4 hash that
/// policy uses it instead of the packet's fields, and across veth a TCP segment carries its
/// socket's `sk_txhash`, which the client's kernel draws anew on every retransmission
/// timeout (`net.core.txrehash`). A bulk stream then moved to the other node after a timeout,
/// which balanced it as a new flow from its own SNAT address; the backend did not know that
/// source and reset the stream (docs/lab.md, "A stream moved to the other node"). Policy 3
/// hashes the fields listed in `fib_multipath_hash_fields` (0x37: both addresses, protocol,
/// both ports; not the IPv6 flow label, which the client also changes on a timeout).
///
/// # Errors
/// A sysctl cannot be set.
pub fn configure_router(rt: &NetNs) -> Result<()> {
    for sysctl in [
        "net.ipv4.ip_forward=1",
        "net.ipv6.conf.all.forwarding=1",
        "net.ipv4.fib_multipath_hash_policy=3",
        "net.ipv4.fib_multipath_hash_fields=0x37",
        "net.ipv6.fib_multipath_hash_policy=3",
        "net.ipv6.fib_multipath_hash_fields=0x37",
    ] {
        rt.run(&["sysctl", "-qw", sysctl])?;
    }
    Ok(())
}

/// Namespaces, veth pairs, the bridge, addresses, routes and sysctls.
fn build_network() -> Result<(TestNet, BTreeMap<String, String>)> {
    let mut net = TestNet::new()?;
    let mut names = BTreeMap::new();
    let client = net.add_ns("cl")?;
    let rt = net.add_ns("rt")?;
    let sw = net.add_ns("sw")?;
    names.insert("client".to_owned(), client.name().to_owned());
    names.insert("router".to_owned(), rt.name().to_owned());
    names.insert("switch".to_owned(), sw.name().to_owned());
    sw.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
    sw.run(&["ip", "link", "set", "br0", "up"])?;

    net.veth(&client, "eth0", &rt, "eth0")?;
    net.veth(&rt, "lan", &sw, "rt")?;
    sw.run(&["ip", "link", "set", "rt", "master", "br0"])?;
    addr(&client, &format!("{CLIENT_V4}/24"), "eth0")?;
    addr(&client, &format!("{CLIENT_V6}/64"), "eth0")?;
    default_routes(&client, Some(ROUTER_CLIENT_V4), ROUTER_CLIENT_V6)?;
    addr(&rt, &format!("{ROUTER_CLIENT_V4}/24"), "eth0")?;
    addr(&rt, &format!("{ROUTER_CLIENT_V6}/64"), "eth0")?;
    addr(&rt, &format!("{ROUTER_LAN_V4}/24"), "lan")?;
    addr(&rt, &format!("{ROUTER_LAN_V6}/64"), "lan")?;
    configure_router(&rt)?;

    for n in NODES {
        let ns = net.add_ns(n.name)?;
        net.veth(&ns, "eth0", &sw, n.name)?;
        sw.run(&["ip", "link", "set", n.name, "master", "br0"])?;
        // A NIC drops unicast frames for other MAC addresses before XDP sees them; a veth
        // does not, and the bridge floods frames for a MAC it does not know (or forgot when
        // a port went down) to every port, so the other node's XDP program would balance
        // them too. No unknown-unicast flooding to the nodes, as their NICs would filter.
        sw.run(&["bridge", "link", "set", "dev", n.name, "flood", "off"])?;
        addr(&ns, &format!("{}/24", n.v4), "eth0")?;
        addr(&ns, &format!("{}/64", n.v6), "eth0")?;
        default_routes(&ns, Some(ROUTER_LAN_V4), ROUTER_LAN_V6)?;
        // The XDP program's FIB lookups need a forwarding node.
        ns.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        names.insert(n.name.to_owned(), ns.name().to_owned());
    }
    for b in BACKENDS {
        let ns = net.add_ns(b.name)?;
        net.veth(&ns, "eth0", &sw, b.name)?;
        sw.run(&["ip", "link", "set", b.name, "master", "br0"])?;
        if let Some(v4) = b.v4 {
            addr(&ns, &format!("{v4}/24"), "eth0")?;
        }
        addr(&ns, &format!("{}/64", b.v6), "eth0")?;
        let gateway_v4 = match b.local_node {
            Some(node) => Some(node_named(node)?.v4),
            None => Some(ROUTER_LAN_V4),
        };
        default_routes(&ns, b.v4.and(gateway_v4), ROUTER_LAN_V6)?;
        if DSR_BACKENDS.contains(&b.name) {
            // The DSR Services' VIPs: the decapsulated packets are addressed to them and the
            // answers leave from them. No reverse-path filter, as docs/dsr.md asks of a DSR
            // backend (here the client is routed out of eth0 anyway, so a strict filter
            // would pass too; a backend whose tunnel link is not its route back needs it).
            // IPv6 has no reverse-path filter of its own.
            for d in DSR_SERVICES {
                addr(&ns, &IpNet::from(d.vip).to_string(), "lo")?;
            }
            for conf in ["all", "default", "eth0"] {
                ns.run(&[
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{conf}.rp_filter=0"),
                ])?;
            }
        }
        names.insert(b.name.to_owned(), ns.name().to_owned());
    }
    // The nodes' neighbour entries for the DSR backends, both families, before the first
    // encapsulated packet relies on them (a request to a backend without one goes through
    // the node's stack: slower, and counted as pass_no_neigh).
    for n in NODES {
        let ns = NetNs::named(&names[n.name]);
        for b in BACKENDS.iter().filter(|b| DSR_BACKENDS.contains(&b.name)) {
            let addrs = b.v4.map(IpAddr::V4).into_iter().chain([IpAddr::V6(b.v6)]);
            for a in addrs {
                ns.run(&["ping", "-c", "1", "-W", "2", &a.to_string()])?;
            }
        }
    }
    // Generic XDP sees frames before the stack finishes offloaded checksums: every sender
    // computes them in software.
    for role in names.keys().filter(|r| r.as_str() != "switch") {
        NetNs::named(&names[role]).run(&["ethtool", "-K", "eth0", "tx", "off"])?;
    }
    rt.run(&["ethtool", "-K", "lan", "tx", "off"])?;
    Ok((net, names))
}

fn start_router(rt: &NetNs) -> Result<RealPeer> {
    let mut config = PeerConfig::new(PeerKind::Bird, ROUTER_LAN_V4, ROUTER_ASN)
        .local_addr(IpAddr::V4(ROUTER_LAN_V4))
        .local_addr(IpAddr::V6(ROUTER_LAN_V6))
        .kernel_export()
        .hold_time(HOLD_TIME);
    for (neighbor, _) in router_neighbors() {
        config = config.neighbor(Neighbor::new(neighbor, NODE_ASN).graceful_restart(RESTART_TIME));
    }
    RealPeer::start(rt, config)
}

fn start_backends(namespaces: &BTreeMap<String, String>) -> Result<Vec<Backend>> {
    let mut out = Vec::new();
    for b in BACKENDS {
        let ns = NetNs::named(&namespaces[b.name]);
        if let Some(v4) = b.v4 {
            out.push(Backend::start(
                &ns,
                b.name,
                SocketAddr::new(IpAddr::V4(v4), BACKEND_PORT),
            )?);
        }
        out.push(Backend::start(
            &ns,
            b.name,
            SocketAddr::new(IpAddr::V6(b.v6), BACKEND_PORT),
        )?);
        if DSR_BACKENDS.contains(&b.name) {
            for d in DSR_SERVICES {
                out.push(Backend::start(
                    &ns,
                    b.name,
                    SocketAddr::new(d.vip, SERVICE_PORT),
                )?);
            }
        }
    }
    Ok(out)
}

/// Makes the process `cmd` starts die (SIGKILL) with the thread that owns the lab, even when
/// that process is killed without running its destructors.
fn die_with_lab(cmd: &mut std::process::Command) {
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_json_routes_parse_single_and_multipath() {
        let json = r#"[{"dst":"203.0.113.0","protocol":"bird","metric":32,"flags":[],
            "nexthops":[{"gateway":"198.18.1.12","dev":"lan","weight":1,"flags":[]},
                        {"gateway":"198.18.1.11","dev":"lan","weight":1,"flags":[]}]},
            {"dst":"203.0.113.1","gateway":"198.18.1.12","dev":"lan","protocol":"bird",
             "metric":32,"flags":[]}]"#;
        let routes = parse_ip_routes(json).unwrap();
        assert_eq!(routes.len(), 2);
        assert_eq!(routes[0].prefix, "203.0.113.0/32".parse::<IpNet>().unwrap());
        assert_eq!(routes[0].nodes(), ["n1", "n2"]);
        assert_eq!(routes[1].nodes(), ["n2"]);
        assert!(parse_ip_routes("").unwrap().is_empty());
    }
}
