//! Layer 3 of the controller's tests: `portico controller` (in process) against kmock with
//! the repository's extension on 127.0.0.1 — real HTTP, real watches, real Leases.

#[path = "common_kmock/mod.rs"]
mod common_kmock;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common_kmock::{eventually, Kmock};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use portico::controller::{self, Stats};
use portico::k8s::lease::LeaseTiming;
use portico_crds::AddressPool;
use serde_json::json;
use tokio::sync::watch;

fn pool(cidr: &str) -> AddressPool {
    serde_json::from_value(json!({
        "apiVersion": "portico.io/v1alpha1", "kind": "AddressPool",
        "metadata": {"name": "public"},
        "spec": {"blocks": [{"cidr": cidr}]},
    }))
    .unwrap()
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "portico.io/lb",
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }))
    .unwrap()
}

async fn create(client: &Client, pool_cidr: &str, services: &[&str]) {
    Api::<AddressPool>::all(client.clone())
        .create(&PostParams::default(), &pool(pool_cidr))
        .await
        .unwrap();
    let api = Api::<Service>::namespaced(client.clone(), "shop");
    for s in services {
        api.create(&PostParams::default(), &service(s))
            .await
            .unwrap();
    }
}

async fn address_of(client: &Client, name: &str) -> Option<IpAddr> {
    let svc = Api::<Service>::namespaced(client.clone(), "shop")
        .get(name)
        .await
        .ok()?;
    svc.status?
        .load_balancer?
        .ingress?
        .first()?
        .ip
        .as_deref()?
        .parse()
        .ok()
}

struct Running {
    stats: Arc<Stats>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

fn start(client: Client, identity: &str, elect: bool) -> Running {
    let mut opts = controller::Options::new(identity, "portico-system");
    if elect {
        opts.timing = LeaseTiming {
            duration: Duration::from_secs(2),
            renew_deadline: Duration::from_millis(1500),
            retry: Duration::from_millis(200),
        };
    } else {
        opts.lease = None;
    }
    opts.resync = Duration::from_millis(300);
    opts.debounce = Duration::from_millis(20);
    let stats = Arc::new(Stats::default());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(controller::run(client, opts, stats.clone(), rx));
    Running { stats, stop, task }
}

impl Running {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        self.task.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_created_service_gets_an_address_in_status_and_an_ip_allocated_event() {
    common_kmock::init_logs();
    let kmock = Kmock::start();
    let client = kmock.client();
    let c = start(client.clone(), "ctl-0", true);
    create(&client, "198.51.100.0/30", &["web"]).await;
    let ip = eventually(10, "web's address", || address_of(&client, "web")).await;
    assert_eq!(ip, "198.51.100.0".parse::<IpAddr>().unwrap());
    let svc = Api::<Service>::namespaced(client.clone(), "shop")
        .get("web")
        .await
        .unwrap();
    let status = svc.status.unwrap();
    assert_eq!(
        status.load_balancer.unwrap().ingress.unwrap()[0]
            .ip_mode
            .as_deref(),
        Some("VIP")
    );
    let cond = &status.conditions.unwrap()[0];
    assert_eq!(
        (cond.type_.as_str(), cond.status.as_str()),
        ("portico.io/IPAMRequestSatisfied", "True")
    );
    let events = Api::<Event>::namespaced(client.clone(), "shop");
    let allocated = eventually(5, "the IPAllocated Event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("IPAllocated"))
    })
    .await;
    assert_eq!(
        allocated.note.as_deref(),
        Some("Assigned 198.51.100.0 from pool public")
    );
    assert_eq!(
        allocated.regarding.unwrap().uid,
        svc.metadata.uid,
        "the Event names the Service by uid"
    );
    let pools = Api::<AddressPool>::all(client.clone());
    let used = eventually(5, "the pool's status", || async {
        let p = pools.get("public").await.ok()?;
        p.status.filter(|s| s.used == "1")
    })
    .await;
    assert_eq!((used.total.as_str(), used.available.as_str()), ("4", "3"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_pool_moves_no_service_to_another_address() {
    common_kmock::init_logs();
    let kmock = Kmock::start();
    let client = kmock.client();
    let c = start(client.clone(), "ctl-0", false);
    create(&client, "198.51.100.0/30", &["a", "b"]).await;
    let a = eventually(10, "a's address", || address_of(&client, "a")).await;
    let b = eventually(10, "b's address", || address_of(&client, "b")).await;
    let pools = Api::<AddressPool>::all(client.clone());
    pools
        .patch(
            "public",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"blocks": [{"cidr": "198.51.100.0/29"}]}})),
        )
        .await
        .unwrap();
    eventually(10, "the grown pool's counts", || async {
        let p = pools.get("public").await.ok()?;
        p.status.filter(|s| s.total == "8")
    })
    .await;
    assert_eq!(address_of(&client, "a").await, Some(a));
    assert_eq!(address_of(&client, "b").await, Some(b));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_unchanged_services_cause_a_bounded_number_of_reconciles_and_no_more_writes() {
    common_kmock::init_logs();
    let kmock = Kmock::start();
    let client = kmock.client();
    let c = start(client.clone(), "ctl-0", false);
    create(&client, "198.51.100.0/29", &["a", "b", "c"]).await;
    for s in ["a", "b", "c"] {
        eventually(10, "every address", || address_of(&client, s)).await;
    }
    // Let the echoes of the writes come back, then watch a quiet period with a 300 ms
    // resync: passes happen, writes do not.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let writes = Stats::get(&c.stats.service_writes);
    let pool_writes = Stats::get(&c.stats.pool_writes);
    let passes = Stats::get(&c.stats.passes);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        Stats::get(&c.stats.service_writes),
        writes,
        "no Service write"
    );
    assert_eq!(
        Stats::get(&c.stats.pool_writes),
        pool_writes,
        "no pool write"
    );
    assert_eq!(writes, 3, "one write per Service");
    let quiet = Stats::get(&c.stats.passes) - passes;
    assert!(
        (3..=10).contains(&quiet),
        "{quiet} passes in 2 s: only the resync should run"
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_controllers_elect_one_leader_and_fail_over_without_handing_an_address_out_twice() {
    common_kmock::init_logs();
    let kmock = Kmock::start();
    let client = kmock.client();
    let first = start(client.clone(), "ctl-a", true);
    let second = start(client.clone(), "ctl-b", true);
    create(&client, "198.51.100.0/30", &["one"]).await;
    let one = eventually(10, "one's address", || address_of(&client, "one")).await;
    let leading = |r: &Running| Stats::get(&r.stats.leading) == 1;
    eventually(5, "exactly one leader", || async {
        (leading(&first) ^ leading(&second)).then_some(())
    })
    .await;
    let (leader, follower) = if leading(&first) {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(
        Stats::get(&follower.stats.service_writes),
        0,
        "the follower wrote nothing"
    );
    // The leader goes away (handing the Lease over); meanwhile a Service is created.
    leader.stop().await;
    Api::<Service>::namespaced(client.clone(), "shop")
        .create(&PostParams::default(), &service("two"))
        .await
        .unwrap();
    let two = eventually(10, "two's address", || address_of(&client, "two")).await;
    assert!(leading(&follower));
    assert_ne!(one, two, "no address handed out twice");
    assert_eq!(
        address_of(&client, "one").await,
        Some(one),
        "one kept its address"
    );
    follower.stop().await;
}
