//! Gateway API end to end against kmock with the repository's extension: `portico
//! controller` (in process) gives a Gateway with TCP and UDP listeners an address, accepts
//! its class, reports its listeners and the routes' parents, and settles.

#[path = "common_kmock/mod.rs"]
mod common_kmock;

use std::sync::Arc;
use std::time::Duration;

use common_kmock::{create_json, eventually, Kmock};
use gateway_api::experimental::gatewayclasses::GatewayClass;
use gateway_api::experimental::gateways::Gateway;
use gateway_api::experimental::tcproutes::TcpRoute;
use gateway_api::experimental::udproutes::UdpRoute;
use kube::Api;
use portico::controller::{self, Stats};
use serde_json::json;
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_with_tcp_and_udp_listeners_and_routes_gets_an_address_and_status() {
    common_kmock::init_logs();
    let kmock = Kmock::start();
    let client = kmock.client();
    for obj in [
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "AddressPool",
               "metadata": {"name": "edge"}, "spec": {"blocks": [{"cidr": "203.0.113.0/30"}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
               "metadata": {"name": "portico"},
               "spec": {"controllerName": "portico.io/gateway-controller"}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "namespace": "shop"},
               "spec": {"type": "ClusterIP", "ports": [{"name": "app", "port": 9000, "protocol": "TCP"},
                                                        {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "edge", "namespace": "shop"},
               "spec": {"gatewayClassName": "portico", "listeners": [
                   {"name": "app", "port": 9000, "protocol": "TCP"},
                   {"name": "dns", "port": 53, "protocol": "UDP"},
                   {"name": "web", "port": 443, "protocol": "HTTPS"}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
               "metadata": {"name": "app", "namespace": "shop"},
               "spec": {"parentRefs": [{"name": "edge"}],
                        "rules": [{"backendRefs": [{"name": "backend", "port": 9000}]}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "UDPRoute",
               "metadata": {"name": "dns", "namespace": "shop"},
               "spec": {"parentRefs": [{"name": "edge", "sectionName": "dns"}],
                        "rules": [{"backendRefs": [{"name": "backend", "port": 53}]}]}}),
    ] {
        create_json(&client, obj).await;
    }
    let mut opts = controller::Options::new("ctl-0", "portico-system");
    opts.lease = None;
    opts.debounce = Duration::from_millis(20);
    opts.resync = Duration::from_millis(300);
    let stats = Arc::new(Stats::default());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(controller::run(client.clone(), opts, stats.clone(), rx));

    let gateways = Api::<Gateway>::namespaced(client.clone(), "shop");
    let status = eventually(10, "the Gateway's address", || async {
        let g = gateways.get("edge").await.ok()?;
        g.status
            .filter(|s| s.addresses.as_ref().is_some_and(|a| !a.is_empty()))
    })
    .await;
    assert_eq!(status.addresses.as_ref().unwrap()[0].value, "203.0.113.0");
    let conditions = status.conditions.clone().unwrap();
    let programmed = conditions.iter().find(|c| c.type_ == "Programmed").unwrap();
    assert_eq!(programmed.status, "True");
    let listeners = status.listeners.clone().unwrap();
    let by_name = |n: &str| listeners.iter().find(|l| l.name == n).unwrap().clone();
    assert_eq!(by_name("app").attached_routes, 1);
    assert_eq!(by_name("dns").attached_routes, 1);
    let web = by_name("web");
    let accepted = web
        .conditions
        .iter()
        .find(|c| c.type_ == "Accepted")
        .unwrap();
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        ("False", "UnsupportedProtocol")
    );

    let class = Api::<GatewayClass>::all(client.clone())
        .get("portico")
        .await
        .unwrap();
    let accepted = &class.status.unwrap().conditions.unwrap()[0];
    assert_eq!(
        (accepted.type_.as_str(), accepted.status.as_str()),
        ("Accepted", "True")
    );
    let tcp = eventually(5, "the TCPRoute's parents", || async {
        let r = Api::<TcpRoute>::namespaced(client.clone(), "shop")
            .get("app")
            .await
            .ok()?;
        r.status.filter(|s| !s.parents.is_empty())
    })
    .await;
    assert_eq!(
        tcp.parents[0].controller_name,
        "portico.io/gateway-controller"
    );
    assert!(tcp.parents[0].conditions.iter().all(|c| c.status == "True"));
    let udp = Api::<UdpRoute>::namespaced(client.clone(), "shop")
        .get("dns")
        .await
        .unwrap();
    assert_eq!(
        udp.status.unwrap().parents[0]
            .parent_ref
            .section_name
            .as_deref(),
        Some("dns")
    );

    // Settled: resync passes write nothing more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = Stats::get(&stats.gateway_writes);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        Stats::get(&stats.gateway_writes),
        writes,
        "no more Gateway API writes"
    );
    stop.send(true).unwrap();
    task.await.unwrap().unwrap();
}
