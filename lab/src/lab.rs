//! The XDP-only topology of the XDP traffic tests: a client, an LB node running Portico's
//! XDP balancer (driven directly, no control plane), and three backends in throwaway
//! network namespaces, with real TCP and UDP through a VIP. (`portico lab` runs the whole
//! system instead: see [`crate::topology`].)
//!
//! ```text
//!  client ──veth── lb (eth0)   lb (eth1) ──veth── sw (bridge) ──veth── be1, be2, be3
//! ```

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context as _, Result};
use portico_xdp::{
    AttachMode, BackendSpec, Balancer, LoadOptions, NodeConfig, Protocol, ServiceKey, ServiceSpec,
    XdpBalancer, XdpProgram,
};

use crate::{
    traffic::{self, Backend},
    NetNs, TestNet,
};

/// Number of backends in the lab.
pub const BACKENDS: u8 = 3;
/// The service port on the VIP.
pub const VIP_PORT: u16 = 80;
/// The port the backends listen on.
pub const BACKEND_PORT: u16 = 8080;

/// Addressing of one IP family in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// IPv6 (ULA fd00::/8) rather than IPv4 (198.18.0.0/15).
    pub v6: bool,
}

impl Family {
    /// The client's address.
    pub fn client(&self) -> &'static str {
        if self.v6 {
            "fd00:18::1"
        } else {
            "198.18.0.1"
        }
    }
    /// The LB node's address toward the client (the client's gateway).
    pub fn lb_client_side(&self) -> &'static str {
        if self.v6 {
            "fd00:18::fe"
        } else {
            "198.18.0.254"
        }
    }
    /// The LB node's address toward the backends, used as SNAT source.
    pub fn snat(&self) -> &'static str {
        if self.v6 {
            "fd00:18:1::fe"
        } else {
            "198.18.1.254"
        }
    }
    /// Backend `i` (1-based).
    pub fn backend(&self, i: u8) -> IpAddr {
        let s = if self.v6 {
            format!("fd00:18:1::{i}")
        } else {
            format!("198.18.1.{i}")
        };
        s.parse().expect("lab backend address")
    }
    /// The VIP.
    pub fn vip(&self) -> IpAddr {
        let s = if self.v6 {
            "fd00:203::10"
        } else {
            "203.0.113.10"
        };
        s.parse().expect("lab VIP")
    }
    fn plen(&self) -> &'static str {
        if self.v6 {
            "64"
        } else {
            "24"
        }
    }
    pub fn ip(&self) -> &'static str {
        if self.v6 {
            "-6"
        } else {
            "-4"
        }
    }
}

/// The lab's namespaces; all removed when dropped.
pub struct Topology {
    /// Owner of every namespace.
    pub net: TestNet,
    /// The client.
    pub client: NetNs,
    /// The LB node.
    pub lb: NetNs,
    /// The bridge joining the LB node and the backends.
    pub sw: NetNs,
    /// The backends, `be1`..`be3`.
    pub backends: Vec<NetNs>,
    /// Addressing.
    pub family: Family,
}

fn add_addr(ns: &NetNs, f: Family, addr: &str, dev: &str) -> Result<()> {
    let cidr = format!("{addr}/{}", f.plen());
    ns.run(&["ip", f.ip(), "addr", "add", &cidr, "dev", dev, "nodad"])?;
    Ok(())
}

/// Builds the topology for one family.
///
/// # Errors
/// Not root, or a namespace, link, address or route cannot be set up.
pub fn topology(f: Family) -> Result<Topology> {
    let mut net = TestNet::new()?;
    let client = net.add_ns("cl")?;
    let lb = net.add_ns("lb")?;
    let sw = net.add_ns("sw")?;
    net.veth(&client, "eth0", &lb, "eth0")?;
    net.veth(&lb, "eth1", &sw, "lb")?;
    sw.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
    sw.run(&["ip", "link", "set", "br0", "up"])?;
    sw.run(&["ip", "link", "set", "lb", "master", "br0"])?;
    let mut backends = Vec::new();
    for i in 1..=BACKENDS {
        let be = net.add_ns(&format!("be{i}"))?;
        let port = format!("be{i}");
        net.veth(&be, "eth0", &sw, &port)?;
        sw.run(&["ip", "link", "set", &port, "master", "br0"])?;
        add_addr(&be, f, &f.backend(i).to_string(), "eth0")?;
        // Native XDP on veth hands over frames without finished checksums otherwise.
        be.run(&["ethtool", "-K", "eth0", "tx", "off"])?;
        backends.push(be);
    }
    add_addr(&client, f, f.client(), "eth0")?;
    client.run(&[
        "ip",
        f.ip(),
        "route",
        "add",
        "default",
        "via",
        f.lb_client_side(),
    ])?;
    client.run(&["ethtool", "-K", "eth0", "tx", "off"])?;
    add_addr(&lb, f, f.lb_client_side(), "eth0")?;
    add_addr(&lb, f, f.snat(), "eth1")?;
    lb.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    lb.run(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
    // Resolve neighbours both ways before the balancer relies on them.
    for i in 1..=BACKENDS {
        lb.run(&["ping", "-c", "1", "-W", "2", &f.backend(i).to_string()])?;
    }
    client.run(&["ping", "-c", "1", "-W", "2", f.lb_client_side()])?;
    Ok(Topology {
        net,
        client,
        lb,
        sw,
        backends,
        family: f,
    })
}

/// A service on the lab's VIP; `weights[i]` for backend `i + 1`, `None` leaves it out.
pub fn service(f: Family, proto: Protocol, weights: &[Option<u32>]) -> ServiceSpec {
    ServiceSpec {
        key: ServiceKey {
            vip: f.vip(),
            port: VIP_PORT,
            proto,
        },
        backends: weights
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                w.map(|weight| BackendSpec {
                    addr: f.backend(i as u8 + 1),
                    port: BACKEND_PORT,
                    weight,
                })
            })
            .collect(),
        hash_source_only: false,
        forwarding: Default::default(),
    }
}

/// The running data path: the balancer on both LB interfaces, and pass-through copies of
/// the program on the veth peers (native XDP redirect into a veth requires one there).
pub struct DataPath {
    /// The balancer.
    pub balancer: XdpBalancer,
    _peer_programs: Vec<XdpProgram>,
}

impl Topology {
    /// Starts TCP and UDP servers on every backend; they stop when dropped.
    ///
    /// # Errors
    /// A server cannot bind.
    pub fn start_backends(&self) -> Result<Vec<Backend>> {
        let f = self.family;
        traffic::start_backends(&self.backends, |i| {
            SocketAddr::new(f.backend(i), BACKEND_PORT)
        })
    }

    /// Pass-through copies of the program on the veth peers of the LB node's interfaces
    /// (the client's `eth0`, the bridge's `lb`): native XDP redirect into a veth needs an XDP
    /// program on its peer. They detach when dropped.
    ///
    /// # Errors
    /// A program does not load or attach.
    pub fn start_peer_programs(&self, mode: AttachMode) -> Result<Vec<XdpProgram>> {
        let mut peer_programs = Vec::new();
        for (ns, iface) in [(&self.client, "eth0"), (&self.sw, "lb")] {
            let mut p = XdpProgram::load_with(LoadOptions {
                max_services: 2,
                max_backends: 2,
                ring_size: 251,
                conntrack_entries: 64,
                flow_cache_entries: 64,
            })?;
            let _in = ns.enter()?;
            p.attach(iface, mode)?;
            peer_programs.push(p);
        }
        Ok(peer_programs)
    }

    /// The LB node's balancer configuration: SNAT from its backend-side address.
    ///
    /// # Errors
    /// Never for the lab's fixed addresses.
    pub fn node_config(&self) -> Result<NodeConfig> {
        let f = self.family;
        Ok(NodeConfig {
            snat_v4: if f.v6 { None } else { Some(f.snat().parse()?) },
            snat_v6: if f.v6 { Some(f.snat().parse()?) } else { None },
            snat_ports: (20000, 29999),
            ..NodeConfig::default()
        })
    }

    /// Loads the XDP program, configures the node, adds TCP and UDP services on the VIP
    /// with all backends at weight 1, and attaches everything in `mode`.
    ///
    /// # Errors
    /// The program does not load or attach, or a map update fails.
    pub fn start_data_path(&self, mode: AttachMode) -> Result<DataPath> {
        let f = self.family;
        let peer_programs = self.start_peer_programs(mode)?;
        let program = XdpProgram::load_with(LoadOptions {
            max_services: 16,
            max_backends: 64,
            ring_size: 4093,
            conntrack_entries: 65536,
            ..LoadOptions::default()
        })
        .context("loading the XDP program (needs root)")?;
        let mut balancer = XdpBalancer::new(program);
        balancer.configure_node(&self.node_config()?)?;
        let all = vec![Some(1); usize::from(BACKENDS)];
        for proto in [Protocol::Tcp, Protocol::Udp] {
            balancer.upsert_service(&service(f, proto, &all))?;
        }
        for iface in ["eth0", "eth1"] {
            let _in = self.lb.enter()?;
            balancer.program_mut().attach(iface, mode)?;
        }
        Ok(DataPath {
            balancer,
            _peer_programs: peer_programs,
        })
    }
}
