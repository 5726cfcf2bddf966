//! Layer 3 of the agent's tests: `portico controller` and `portico agent` (in process, the
//! agent without a datapath or held addresses) against kmock with the repository's
//! extension. What the agent watches turns into its plan, and its plan into its own
//! PorticoNode object.

mod common;
#[path = "common_kmock/mod.rs"]
mod common_kmock;

use std::sync::Arc;
use std::time::Duration;

use common_kmock::{eventually, Kmock};
use kube::api::{DynamicObject, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};
use portico::{agent, controller};
use portico_crds::PorticoNode;
use serde_json::{json, Value};
use tokio::sync::watch;

async fn create(client: &Client, obj: Value) {
    let api_version = obj["apiVersion"].as_str().unwrap();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = obj["kind"].as_str().unwrap();
    let plural = match kind {
        "BGPPeer" => "bgppeers".to_owned(),
        "BGPAdvertisement" => "bgpadvertisements".to_owned(),
        "AddressPool" => "addresspools".to_owned(),
        "EndpointSlice" => "endpointslices".to_owned(),
        k => format!("{}s", k.to_lowercase()),
    };
    let ar =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), &plural);
    let o: DynamicObject = serde_json::from_value(obj.clone()).unwrap();
    let api: Api<DynamicObject> = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.create(&PostParams::default(), &o).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_plans_what_it_watches_and_reports_it_in_its_portico_node() {
    common_kmock::init_logs();
    let kmock = Kmock::start();
    let client = kmock.client();
    for obj in [
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "n1", "labels": {"rack": "r1"}},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}),
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "AddressPool",
               "metadata": {"name": "public"}, "spec": {"blocks": [{"cidr": "198.51.100.0/30"}]}}),
        // A peer on loopback that nobody answers: the session stays down, as reported.
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
               "spec": {"myASN": 64512, "peerASN": 64500, "peerAddress": "127.0.0.1",
                        "peerPort": 1, "connectRetryTime": 1}}),
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "BGPAdvertisement",
               "metadata": {"name": "all"}, "spec": {}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"type": "LoadBalancer", "loadBalancerClass": "portico.io/lb",
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        common_kmock::web_endpoints("web-1", "web", &[("10.1.0.5", "n1"), ("10.1.0.6", "n2")]),
    ] {
        create(&client, obj).await;
    }
    let (stop, rx) = watch::channel(false);
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (ctl_metrics, agent_metrics) = (free_port(), free_port());
    let mut copts = controller::Options::new("ctl-0", "portico-system");
    copts.lease = None;
    copts.debounce = Duration::from_millis(20);
    copts.metrics = Some(ctl_metrics);
    let ctl = tokio::spawn(controller::run(
        client.clone(),
        copts,
        Arc::default(),
        rx.clone(),
    ));
    let mut aopts = agent::Options::new("n1");
    aopts.debounce = Duration::from_millis(20);
    aopts.resync = Duration::from_millis(500);
    aopts.metrics = Some(agent_metrics);
    let agt = tokio::spawn(agent::run(client.clone(), aopts, rx));

    let nodes = Api::<PorticoNode>::all(client.clone());
    let status = eventually(
        15,
        "n1's PorticoNode to show the announced address",
        || async {
            let n = nodes.get("n1").await.ok()?;
            n.status.filter(|s| s.announced_count == 1)
        },
    )
    .await;
    assert_eq!(status.announced, vec!["198.51.100.0".to_owned()]);
    assert_eq!(
        status.datapath.services, 1,
        "one listener: 198.51.100.0:80/TCP"
    );
    assert_eq!(status.datapath.backends, 2, "both endpoints (eTP Cluster)");
    assert!(!status.datapath.attached, "no XDP in this test");
    assert_eq!(status.peers.len(), 1);
    assert_eq!(status.peers[0].name, "tor");
    assert_eq!(status.peers[0].address, "127.0.0.1");
    assert_ne!(status.peers[0].state, "Established");
    assert_eq!(status.peers_summary, "0/1 Established");
    let node = nodes.get("n1").await.unwrap();
    let owner = &node.metadata.owner_references.unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Node", "n1"));

    // Health and metrics, as in standalone mode; the exposition passes promtool.
    for addr in [ctl_metrics, agent_metrics] {
        let (ready, _) = tokio::task::spawn_blocking(move || common::http_get(addr, "/readyz"))
            .await
            .unwrap()
            .unwrap();
        assert!(ready.contains("200"), "{addr}: {ready}");
        let (status, body) =
            tokio::task::spawn_blocking(move || common::http_get(addr, "/metrics"))
                .await
                .unwrap()
                .unwrap();
        assert!(status.contains("200"), "{addr}: {status}");
        common::promtool_check(&body);
    }

    stop.send(true).unwrap();
    ctl.await.unwrap().unwrap();
    agt.await.unwrap().unwrap();
}
