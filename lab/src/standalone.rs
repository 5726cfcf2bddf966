//! The topology `portico standalone` is proven on: a router running BIRD (BGP routes
//! installed into its kernel, ECMP merged), a node on the router's LAN where Portico runs
//! with XDP on its uplink (one-armed), backends on the same LAN, and a client behind the
//! router.
//!
//! ```text
//!  client ──veth── router (BIRD) ──veth── sw (bridge) ──veth── node (Portico, XDP eth0)
//!                                                      ├─veth── be1
//!                                                      └─veth── be…
//! ```

use std::net::{IpAddr, SocketAddr};

use anyhow::Result;

use crate::peers::{Neighbor, PeerConfig, PeerKind, RealPeer};
use crate::traffic::Backend;
use crate::{require_root, NetNs, TestNet};

/// The node's address on the LAN (its BGP source, router ID and SNAT address).
pub const NODE_IP: &str = "198.18.1.10";
/// The router's LAN address (the node's BGP peer and default gateway).
pub const ROUTER_LAN: &str = "198.18.1.254";
/// The router's address toward the client.
pub const ROUTER_CLIENT_SIDE: &str = "198.18.0.254";
/// The client's address.
pub const CLIENT_IP: &str = "198.18.0.1";
/// The router's AS.
pub const ROUTER_ASN: u32 = 64500;
/// The node's AS.
pub const NODE_ASN: u32 = 64512;
/// The port backends listen on (TCP and UDP).
pub const BACKEND_PORT: u16 = 8080;

/// Backend `i` (1-based) on the LAN.
///
/// # Panics
/// Never: the address is well-formed.
#[must_use]
pub fn backend_ip(i: u8) -> IpAddr {
    format!("198.18.1.{i}").parse().expect("backend address")
}

/// The namespaces and the router; all removed when dropped.
pub struct Topology {
    /// Owner of every namespace and process.
    pub net: TestNet,
    /// The client.
    pub client: NetNs,
    /// The node Portico runs in.
    pub node: NetNs,
    /// The backends.
    pub backends: Vec<NetNs>,
    /// BIRD on the router.
    pub router: RealPeer,
}

/// Builds the topology with `backends` backends (at most 9).
///
/// # Errors
/// Not root, or a namespace, link, address or the router cannot be set up.
pub fn build(backends: u8) -> Result<Topology> {
    require_root("the standalone topology")?;
    let mut net = TestNet::new()?;
    let client = net.add_ns("cl")?;
    let rt = net.add_ns("rt")?;
    let sw = net.add_ns("sw")?;
    let node = net.add_ns("n1")?;
    net.veth(&client, "eth0", &rt, "eth0")?;
    net.veth(&rt, "lan", &sw, "rt")?;
    net.veth(&node, "eth0", &sw, "n1")?;
    sw.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
    sw.run(&["ip", "link", "set", "br0", "up"])?;
    for port in ["rt", "n1"] {
        sw.run(&["ip", "link", "set", port, "master", "br0"])?;
    }
    let mut bes = Vec::new();
    for i in 1..=backends {
        let be = net.add_ns(&format!("be{i}"))?;
        let port = format!("be{i}");
        net.veth(&be, "eth0", &sw, &port)?;
        sw.run(&["ip", "link", "set", &port, "master", "br0"])?;
        be.run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/24", backend_ip(i)),
            "dev",
            "eth0",
        ])?;
        be.run(&["ip", "route", "add", "default", "via", ROUTER_LAN])?;
        bes.push(be);
    }
    client.run(&[
        "ip",
        "addr",
        "add",
        &format!("{CLIENT_IP}/24"),
        "dev",
        "eth0",
    ])?;
    client.run(&["ip", "route", "add", "default", "via", ROUTER_CLIENT_SIDE])?;
    rt.run(&[
        "ip",
        "addr",
        "add",
        &format!("{ROUTER_CLIENT_SIDE}/24"),
        "dev",
        "eth0",
    ])?;
    rt.run(&[
        "ip",
        "addr",
        "add",
        &format!("{ROUTER_LAN}/24"),
        "dev",
        "lan",
    ])?;
    rt.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    node.run(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
    node.run(&["ip", "route", "add", "default", "via", ROUTER_LAN])?;
    node.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    // Checksums are finished in software before XDP sees the frames (generic XDP on veth).
    for ns in [&client, &node, &rt] {
        ns.run(&["ethtool", "-K", "eth0", "tx", "off"])?;
    }
    rt.run(&["ethtool", "-K", "lan", "tx", "off"])?;
    for be in &bes {
        be.run(&["ethtool", "-K", "eth0", "tx", "off"])?;
    }
    let router = RealPeer::start(
        &rt,
        PeerConfig::new(PeerKind::Bird, ROUTER_LAN.parse()?, ROUTER_ASN)
            .local_addr(ROUTER_LAN.parse()?)
            .kernel_export()
            .neighbor(Neighbor::new(NODE_IP.parse()?, NODE_ASN).graceful_restart(60)),
    )?;
    Ok(Topology {
        net,
        client,
        node,
        backends: bes,
        router,
    })
}

impl Topology {
    /// Starts TCP and UDP servers answering with their name (`be1`, …) on every backend.
    ///
    /// # Errors
    /// A server cannot bind.
    pub fn start_backends(&self) -> Result<Vec<Backend>> {
        crate::traffic::start_backends(&self.backends, |i| {
            SocketAddr::new(backend_ip(i), BACKEND_PORT)
        })
    }
}

/// The manifests every run starts from: a pool, the router as BGP peer (graceful restart
/// on) and an advertisement of every address.
pub const BASE_MANIFESTS: &str = r#"apiVersion: portico.io/v1alpha1
kind: AddressPool
metadata: {name: lab}
spec:
  blocks: [{cidr: 203.0.113.0/28}]
---
apiVersion: portico.io/v1alpha1
kind: BGPPeer
metadata: {name: tor}
spec:
  myASN: 64512
  peerASN: 64500
  peerAddress: 198.18.1.254
  holdTime: 9
  connectRetryTime: 1
  gracefulRestart: {enabled: true, restartTime: 60}
---
apiVersion: portico.io/v1alpha1
kind: BGPAdvertisement
metadata: {name: all}
spec: {}
"#;

/// A LoadBalancer Service `name` in namespace `lab` (TCP and UDP port 80) and its
/// EndpointSlice with ready endpoints on `backends` (addresses as written).
#[must_use]
pub fn service_manifest(name: &str, backends: &[IpAddr]) -> String {
    let mut s = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: lab}}
spec:
  type: LoadBalancer
  loadBalancerClass: portico.io/lb
  ports: [{{name: tcp, port: 80, protocol: TCP}}, {{name: udp, port: 80, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: lab, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: tcp, port: {BACKEND_PORT}, protocol: TCP}}, {{name: udp, port: {BACKEND_PORT}, protocol: UDP}}]
endpoints:
"#
    );
    for b in backends {
        s.push_str(&format!(
            "  - {{addresses: [\"{b}\"], nodeName: n1, conditions: {{ready: true}}}}\n"
        ));
    }
    s
}
