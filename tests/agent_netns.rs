//! `portico controller` and `portico agent` (the real binaries) end to end, in network
//! namespaces: kmock with the repository's extension runs inside the node's namespace
//! (on its 127.0.0.1), both programs read a kubeconfig pointing at it, the agent peers
//! with BIRD on the router and attaches XDP to the node's uplink, and a client behind the
//! router reaches a backend through the address the controller assigned.
//!
//! ```text
//!  client ──veth── router (BIRD) ──veth── sw (bridge) ──veth── node (kmock, controller,
//!                                                      │          agent with XDP eth0)
//!                                                      ├─veth── be1
//!                                                      └─veth── be2
//! ```
//! Needs root; fails (never skips) without it.

#[path = "common_kmock/mod.rs"]
mod common_kmock;

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use common_kmock::Kmock;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Service;
use kube::api::{DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};
use portico_crds::PorticoNode;
use portico_integration::standalone::{self as topo, NODE_IP};
use portico_integration::traffic;
use serde_json::{json, Value};

/// The processes, killed on drop (before the namespaces go).
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn objects(backend: IpAddr) -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
               "status": {"addresses": [{"type": "InternalIP", "address": NODE_IP}]}}),
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "AddressPool",
               "metadata": {"name": "lab"}, "spec": {"blocks": [{"cidr": "203.0.113.0/28"}]}}),
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
               "spec": {"myASN": topo::NODE_ASN, "peerASN": topo::ROUTER_ASN,
                        "peerAddress": topo::ROUTER_LAN, "holdTime": 9, "connectRetryTime": 1}}),
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "BGPAdvertisement",
               "metadata": {"name": "all"}, "spec": {}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "lab"},
               "spec": {"type": "LoadBalancer", "loadBalancerClass": "portico.io/lb",
                        "ports": [{"name": "tcp", "port": 80, "protocol": "TCP"},
                                  {"name": "udp", "port": 80, "protocol": "UDP"}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-1", "namespace": "lab",
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4",
               "ports": [{"name": "tcp", "port": topo::BACKEND_PORT, "protocol": "TCP"},
                         {"name": "udp", "port": topo::BACKEND_PORT, "protocol": "UDP"}],
               "endpoints": [{"addresses": [backend.to_string()], "nodeName": "n1",
                              "conditions": {"ready": true}}]}),
    ]
}

fn plural(kind: &str) -> String {
    match kind {
        "BGPPeer" => "bgppeers".into(),
        "BGPAdvertisement" => "bgpadvertisements".into(),
        "AddressPool" => "addresspools".into(),
        "EndpointSlice" => "endpointslices".into(),
        k => format!("{}s", k.to_lowercase()),
    }
}

async fn create(client: &Client, obj: Value) -> Result<()> {
    let api_version = obj["apiVersion"].as_str().context("apiVersion")?;
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = obj["kind"].as_str().context("kind")?;
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind),
        &plural(kind),
    );
    let o: DynamicObject = serde_json::from_value(obj.clone())?;
    let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.create(&PostParams::default(), &o).await?;
    Ok(())
}

/// Runs `f` with a client of kmock, on a thread inside the node's namespace.
fn with_client<T: Send + 'static, F>(
    node: &portico_integration::NetNs,
    url: String,
    f: impl FnOnce(Client) -> F + Send + 'static,
) -> Result<T>
where
    F: std::future::Future<Output = Result<T>>,
{
    traffic::in_ns(node, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let config = kube::Config::new(url.parse()?);
            let client = Client::try_from(config)?;
            f(client).await
        })
    })
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}; last error: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_agent_turns_what_it_watches_into_an_announced_route_and_xdp_traffic() -> Result<()> {
    let lab = topo::build(2)?;
    let _servers = lab.start_backends()?;
    let kmock = Kmock::start_with(|python| lab.node.command(python));
    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, kmock.kubeconfig())?;
    let bin = env!("CARGO_BIN_EXE_portico");
    let spawn = |args: &[&str]| -> Result<Child> {
        lab.node
            .command(bin)
            .args(args)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting portico {}", args[0]))
    };
    let _procs = Procs(vec![
        spawn(&[
            "controller",
            "--no-leader-election",
            "--identity",
            "ctl-0",
            "--metrics-address",
            "none",
        ])?,
        spawn(&[
            "agent",
            "--node",
            "n1",
            "--xdp",
            "eth0",
            "--xdp-mode",
            "generic",
            // `ip netns exec` hides /sys/fs/bpf; restarts are tested in standalone_e2e.
            "--bpf-pin-dir",
            "none",
            "--metrics-address",
            "none",
        ])?,
    ]);
    let url = kmock.url();
    let be1 = topo::backend_ip(1);
    with_client(&lab.node, url.clone(), move |client| async move {
        for obj in objects(be1) {
            create(&client, obj).await?;
        }
        Ok(())
    })?;

    // The controller assigns; the agent (router ID from the Node's InternalIP) announces.
    let vip: IpAddr = wait_for("web's address in status", || {
        with_client(&lab.node, url.clone(), |client| async move {
            let svc = Api::<Service>::namespaced(client, "lab").get("web").await?;
            Ok(svc
                .status
                .and_then(|s| s.load_balancer)
                .and_then(|lb| lb.ingress)
                .and_then(|i| i.first()?.ip.clone())
                .and_then(|ip| ip.parse().ok()))
        })
    })?;
    assert!("203.0.113.0/28".parse::<IpNet>()?.contains(&vip));
    lab.router.wait_routes(
        |r| r.iter().any(|r| r.prefix == IpNet::from(vip)),
        Duration::from_secs(60),
    )?;
    let addr = SocketAddr::new(vip, 80);
    wait_for("a TCP answer through the VIP", || {
        Ok(traffic::in_ns(&lab.client, move || traffic::tcp_once(addr)).ok())
    })?;
    assert_eq!(
        traffic::in_ns(&lab.client, move || traffic::tcp_once(addr))?,
        "be1"
    );
    assert_eq!(
        traffic::in_ns(&lab.client, move || traffic::udp_once(addr))?,
        "be1"
    );

    // The node's own object reports it.
    let status = wait_for("n1's PorticoNode with the session up", || {
        with_client(&lab.node, url.clone(), |client| async move {
            let n = Api::<PorticoNode>::all(client).get("n1").await?;
            Ok(n.status.filter(|s| s.peers_summary == "1/1 Established"))
        })
    })?;
    assert_eq!(status.announced, vec![vip.to_string()]);
    assert!(status.datapath.attached);
    assert_eq!(status.datapath.services, 2, "TCP and UDP on port 80");
    assert!(status.peers[0].prefixes_sent.ipv4 >= 1, "{status:?}");
    Ok(())
}
