//! Layer 2 of the controller's tests: the API contract, against a scripted API server
//! behind kube's `Client` (tower-test). Every request the controller, its watchers and its
//! elector send is recorded with method, path, query, content type and body, and the
//! tests assert on exactly those: status through server-side apply on `/status` with
//! Portico's field manager and `force`, Events, 409 on a Lease race, 410 Gone → relist,
//! bookmark → resume without a relist.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use http::{Request, Response};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use kube::client::Body;
use kube::runtime::watcher;
use kube::{Api, Client};
use portico::controller::{self, Stats, FIELD_MANAGER};
use portico::k8s::lease::{round, Elector, LeaseTiming};
use portico::k8s::source::{self, Relist};
use portico::world::{Kind, World};
use serde_json::{json, Value};
use tokio::sync::watch;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Value,
}

impl Seen {
    fn is_watch(&self) -> bool {
        self.query.get("watch").is_some_and(|v| v == "true")
    }
}

/// What the scripted server answers.
enum Reply {
    /// A JSON body with this status code.
    Json(u16, Value),
    /// Watch events, one JSON line each; then the stream ends.
    Lines(Vec<Value>),
    /// No answer (a watch that stays open).
    Hang,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A client whose requests go to `route`, and the log of what it sent.
fn scripted(route: impl FnMut(&Seen) -> Reply + Send + 'static) -> (Client, Log) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let log: Log = Arc::default();
    tokio::spawn(serve(handle, route, log.clone()));
    (Client::new(service, "default"), log)
}

async fn serve(mut handle: Handle, mut route: impl FnMut(&Seen) -> Reply, log: Log) {
    let mut open = Vec::new();
    while let Some((req, send)) = handle.next_request().await {
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap();
        let query = parts
            .uri
            .query()
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k.to_owned(), v.to_owned())
            })
            .collect();
        let seen = Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query,
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned()),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        };
        let reply = route(&seen);
        log.lock().unwrap().push(seen);
        let respond = |code: u16, body: Vec<u8>| {
            Response::builder()
                .status(code)
                .body(Body::from(body))
                .unwrap()
        };
        match reply {
            Reply::Json(code, v) => {
                send.send_response(respond(code, serde_json::to_vec(&v).unwrap()))
            }
            Reply::Lines(lines) => {
                let mut body = Vec::new();
                for l in lines {
                    body.extend(serde_json::to_vec(&l).unwrap());
                    body.push(b'\n');
                }
                send.send_response(respond(200, body));
            }
            Reply::Hang => open.push(send),
        }
    }
}

fn list(kind: &str, api_version: &str, rv: &str, items: Vec<Value>) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": format!("{kind}List"),
        "metadata": {"resourceVersion": rv},
        "items": items,
    })
}

fn status(code: u16, reason: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Status", "metadata": {},
        "status": "Failure", "reason": reason, "code": code, "message": reason,
    })
}

fn web_service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop", "uid": "u-web", "resourceVersion": "3", "generation": 1},
        "spec": {
            "type": "LoadBalancer", "loadBalancerClass": "portico.io/lb",
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    })
}

fn public_pool() -> Value {
    json!({
        "apiVersion": "portico.io/v1alpha1", "kind": "AddressPool",
        "metadata": {"name": "public", "uid": "u-pool", "resourceVersion": "2",
                     "creationTimestamp": "2024-01-01T00:00:00Z"},
        "spec": {"blocks": [{"cidr": "198.51.100.0/30"}]},
    })
}

/// Answers the controller's three watchers and accepts every write.
fn controller_routes(seen: &Seen) -> Reply {
    let path = seen.path.as_str();
    if seen.method == "GET" {
        if seen.is_watch() {
            return Reply::Hang;
        }
        return match path {
            "/api/v1/services" => {
                Reply::Json(200, list("Service", "v1", "10", vec![web_service()]))
            }
            "/apis/portico.io/v1alpha1/addresspools" => Reply::Json(
                200,
                list(
                    "AddressPool",
                    "portico.io/v1alpha1",
                    "10",
                    vec![public_pool()],
                ),
            ),
            "/api/v1/namespaces" => Reply::Json(200, list("Namespace", "v1", "10", vec![])),
            _ => Reply::Json(404, status(404, "NotFound")),
        };
    }
    match (seen.method.as_str(), path) {
        ("PATCH", "/api/v1/namespaces/shop/services/web/status") => {
            let mut svc = web_service();
            svc["status"] = seen.body["status"].clone();
            Reply::Json(200, svc)
        }
        ("PATCH", "/apis/portico.io/v1alpha1/addresspools/public/status") => {
            let mut pool = public_pool();
            pool["status"] = seen.body["status"].clone();
            Reply::Json(200, pool)
        }
        ("POST", "/apis/events.k8s.io/v1/namespaces/shop/events") => {
            Reply::Json(201, seen.body.clone())
        }
        _ => Reply::Json(404, status(404, "NotFound")),
    }
}

async fn wait_for(log: &Log, what: &str, f: impl Fn(&[Seen]) -> bool) {
    for _ in 0..200 {
        if f(&log.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "timed out waiting for {what}; requests: {:#?}",
        log.lock().unwrap()
    );
}

fn single_replica() -> controller::Options {
    let mut opts = controller::Options::new("portico-controller-0", "portico-system");
    opts.lease = None;
    opts.debounce = Duration::from_millis(5);
    opts
}

#[tokio::test]
async fn service_status_goes_through_server_side_apply_on_the_status_subresource() {
    let (client, log) = scripted(controller_routes);
    let (stop_tx, stop) = watch::channel(false);
    let stats = Arc::new(Stats::default());
    let task = tokio::spawn(controller::run(
        client,
        single_replica(),
        stats.clone(),
        stop,
    ));
    let is_patch = |s: &Seen| s.method == "PATCH" && s.path.ends_with("/services/web/status");
    wait_for(&log, "the Service status patch", |l| l.iter().any(is_patch)).await;
    let seen = log.lock().unwrap().clone();
    let patch = seen.iter().find(|s| is_patch(s)).unwrap();
    assert_eq!(patch.path, "/api/v1/namespaces/shop/services/web/status");
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        patch.query.get("fieldManager").map(String::as_str),
        Some(FIELD_MANAGER)
    );
    assert_eq!(patch.query.get("force").map(String::as_str), Some("true"));
    assert_eq!(patch.body["apiVersion"], "v1");
    assert_eq!(patch.body["kind"], "Service");
    assert_eq!(
        patch.body["metadata"],
        json!({"name": "web", "namespace": "shop"})
    );
    assert_eq!(
        patch.body["status"]["loadBalancer"]["ingress"],
        json!([{"ip": "198.51.100.0", "ipMode": "VIP"}])
    );
    let cond = &patch.body["status"]["conditions"][0];
    assert_eq!(cond["type"], "portico.io/IPAMRequestSatisfied");
    assert_eq!(cond["status"], "True");
    assert!(
        patch.body.get("spec").is_none(),
        "a status write carries no spec"
    );

    wait_for(&log, "the IPAllocated Event", |l| {
        l.iter()
            .any(|s| s.method == "POST" && s.path.ends_with("/events"))
    })
    .await;
    let seen = log.lock().unwrap().clone();
    let event = seen.iter().find(|s| s.path.ends_with("/events")).unwrap();
    assert_eq!(event.path, "/apis/events.k8s.io/v1/namespaces/shop/events");
    assert_eq!(event.body["reason"], "IPAllocated");
    assert_eq!(event.body["type"], "Normal");
    assert_eq!(event.body["regarding"]["uid"], "u-web");
    assert_eq!(event.body["regarding"]["kind"], "Service");
    assert_eq!(event.body["reportingController"], "portico.io/controller");
    assert_eq!(event.body["reportingInstance"], "portico-controller-0");

    wait_for(&log, "the AddressPool status patch", |l| {
        l.iter()
            .any(|s| s.path.ends_with("/addresspools/public/status"))
    })
    .await;
    let seen = log.lock().unwrap().clone();
    let pool = seen
        .iter()
        .find(|s| s.path.ends_with("/addresspools/public/status"))
        .unwrap();
    assert_eq!(pool.method, "PATCH");
    assert_eq!(
        pool.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        pool.query.get("fieldManager").map(String::as_str),
        Some(FIELD_MANAGER)
    );
    assert_eq!(pool.body["kind"], "AddressPool");
    assert_eq!(pool.body["apiVersion"], "portico.io/v1alpha1");
    assert_eq!(pool.body["status"]["used"], "1");

    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    // One write per object: the pass before the watch echoes the write does not repeat it.
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen.iter().filter(|s| is_patch(s)).count(), 1);
}

#[tokio::test]
async fn a_refused_status_write_is_retried_with_back_off() {
    let refused = Arc::new(Mutex::new(0));
    let r = refused.clone();
    let (client, log) = scripted(move |seen| {
        if seen.method == "PATCH" && seen.path.ends_with("/services/web/status") {
            let mut n = r.lock().unwrap();
            *n += 1;
            if *n == 1 {
                return Reply::Json(409, status(409, "Conflict"));
            }
        }
        controller_routes(seen)
    });
    let (stop_tx, stop) = watch::channel(false);
    let stats = Arc::new(Stats::default());
    let task = tokio::spawn(controller::run(
        client,
        single_replica(),
        stats.clone(),
        stop,
    ));
    wait_for(&log, "a second Service status patch", |l| {
        l.iter()
            .filter(|s| s.method == "PATCH" && s.path.ends_with("/services/web/status"))
            .count()
            >= 2
    })
    .await;
    assert_eq!(Stats::get(&stats.write_errors), 1);
    // No Event for the refused write; one for the accepted one.
    wait_for(&log, "one Event", |l| {
        l.iter().any(|s| s.path.ends_with("/events"))
    })
    .await;
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    let events = log
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path.ends_with("/events"))
        .count();
    assert_eq!(events, 1);
}

fn lease(holder: &str, rv: &str, transitions: i32) -> Value {
    json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "portico-controller", "namespace": "portico-system", "resourceVersion": rv},
        "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15, "leaseTransitions": transitions,
                 "renewTime": "2024-01-01T00:00:00.000000Z"},
    })
}

const LEASE_PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/portico-system/leases";

fn lease_api(client: Client) -> Api<Lease> {
    Api::namespaced(client, "portico-system")
}

#[tokio::test]
async fn a_candidate_creates_the_missing_lease_and_leads() {
    let (client, log) = scripted(|seen| match seen.method.as_str() {
        "GET" => Reply::Json(404, status(404, "NotFound")),
        "POST" => {
            let mut l = seen.body.clone();
            l["metadata"]["resourceVersion"] = "1".into();
            Reply::Json(201, l)
        }
        _ => Reply::Json(500, status(500, "InternalError")),
    });
    let mut e = Elector::new("a", LeaseTiming::default());
    assert!(round(&lease_api(client), "portico-controller", &mut e)
        .await
        .unwrap());
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen[0].path, format!("{LEASE_PATH}/portico-controller"));
    assert_eq!(seen[1].method, "POST");
    assert_eq!(seen[1].path, LEASE_PATH);
    assert_eq!(seen[1].body["spec"]["holderIdentity"], "a");
    assert_eq!(seen[1].body["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(seen[1].body["metadata"]["name"], "portico-controller");
}

#[tokio::test(start_paused = true)]
async fn an_expired_lease_is_taken_over_with_the_resource_version_it_was_read_at() {
    let (client, log) = scripted(|seen| match seen.method.as_str() {
        "GET" => Reply::Json(200, lease("b", "7", 3)),
        "PUT" => {
            let mut l = seen.body.clone();
            l["metadata"]["resourceVersion"] = "8".into();
            Reply::Json(200, l)
        }
        _ => Reply::Json(500, status(500, "InternalError")),
    });
    let api = lease_api(client);
    let mut e = Elector::new("a", LeaseTiming::default());
    assert!(!round(&api, "portico-controller", &mut e).await.unwrap());
    assert_eq!(
        log.lock().unwrap().len(),
        1,
        "a fresh lease of another holder is left alone"
    );
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(!round(&api, "portico-controller", &mut e).await.unwrap());
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(round(&api, "portico-controller", &mut e).await.unwrap());
    let seen = log.lock().unwrap().clone();
    let put = seen.iter().find(|s| s.method == "PUT").unwrap();
    assert_eq!(put.path, format!("{LEASE_PATH}/portico-controller"));
    assert_eq!(put.body["metadata"]["resourceVersion"], "7");
    assert_eq!(put.body["spec"]["holderIdentity"], "a");
    assert_eq!(put.body["spec"]["leaseTransitions"], 4);
}

#[tokio::test(start_paused = true)]
async fn a_takeover_that_loses_the_race_gets_409_and_does_not_lead() {
    let (client, log) = scripted(|seen| match seen.method.as_str() {
        "GET" => Reply::Json(200, lease("b", "7", 3)),
        "PUT" => Reply::Json(409, status(409, "Conflict")),
        _ => Reply::Json(500, status(500, "InternalError")),
    });
    let api = lease_api(client);
    let mut e = Elector::new("a", LeaseTiming::default());
    assert!(!round(&api, "portico-controller", &mut e).await.unwrap());
    tokio::time::advance(Duration::from_secs(16)).await;
    assert!(!round(&api, "portico-controller", &mut e).await.unwrap());
    assert!(log.lock().unwrap().iter().any(|s| s.method == "PUT"));
}

#[tokio::test(start_paused = true)]
async fn a_leader_that_cannot_renew_stops_leading_before_the_lease_expires() {
    let renewals = Arc::new(Mutex::new(0));
    let r = renewals.clone();
    let (client, _log) = scripted(move |seen| match seen.method.as_str() {
        "GET" => Reply::Json(200, lease("a", "7", 0)),
        "PUT" => {
            let mut n = r.lock().unwrap();
            *n += 1;
            if *n == 1 {
                let mut l = seen.body.clone();
                l["metadata"]["resourceVersion"] = "8".into();
                Reply::Json(200, l)
            } else {
                Reply::Json(500, status(500, "InternalError"))
            }
        }
        _ => Reply::Json(500, status(500, "InternalError")),
    });
    let api = lease_api(client);
    let mut e = Elector::new("a", LeaseTiming::default());
    assert!(round(&api, "portico-controller", &mut e).await.unwrap());
    tokio::time::advance(Duration::from_secs(5)).await;
    assert!(
        round(&api, "portico-controller", &mut e).await.unwrap(),
        "within the renew deadline"
    );
    tokio::time::advance(Duration::from_secs(6)).await;
    assert!(
        !round(&api, "portico-controller", &mut e).await.unwrap(),
        "past the renew deadline"
    );
}

fn svc(name: &str, rv: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": "shop", "resourceVersion": rv},
           "spec": {"type": "ClusterIP"}})
}

/// Feeds a Service watcher into a shared world, in the background.
fn drive(client: Client) -> (Arc<Mutex<World>>, tokio::task::JoinHandle<()>) {
    let world: Arc<Mutex<World>> = Arc::default();
    let w = world.clone();
    let task = tokio::spawn(async move {
        let mut relist = Relist::new([Kind::Service]);
        let mut stream = source::watch(Api::<Service>::all(client), watcher::Config::default());
        while let Some(ev) = stream.next().await {
            if let Ok(ev) = ev {
                let mut world = w.lock().unwrap();
                let events = relist.handle(ev, &world);
                world.apply_all(events);
            }
        }
    });
    (world, task)
}

fn names(w: &Arc<Mutex<World>>) -> Vec<String> {
    w.lock()
        .unwrap()
        .services
        .keys()
        .map(|(_, n)| n.clone())
        .collect()
}

#[tokio::test]
async fn a_watch_answered_410_gone_relists_and_deletes_what_the_new_list_lacks() {
    let lists = Arc::new(Mutex::new(0));
    let l = lists.clone();
    let (client, log) = scripted(move |seen| {
        if seen.is_watch() {
            // The watch from rv 1 is too old: the server compacted that history away.
            if seen.query.get("resourceVersion").map(String::as_str) == Some("1") {
                return Reply::Lines(vec![
                    json!({"type": "ERROR", "object": status(410, "Expired")}),
                ]);
            }
            return Reply::Hang;
        }
        let mut n = l.lock().unwrap();
        *n += 1;
        if *n == 1 {
            Reply::Json(
                200,
                list("Service", "v1", "1", vec![svc("a", "1"), svc("b", "1")]),
            )
        } else {
            // b was deleted while the watch was down; its Delete is never seen.
            Reply::Json(200, list("Service", "v1", "9", vec![svc("a", "5")]))
        }
    });
    let (world, task) = drive(client);
    wait_for(&log, "the watch from the relist", |l| {
        l.iter().any(|s| {
            s.is_watch() && s.query.get("resourceVersion").map(String::as_str) == Some("9")
        })
    })
    .await;
    for _ in 0..100 {
        if names(&world) == ["a"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(names(&world), ["a"], "b is gone after the relist");
    task.abort();
    let seen = log.lock().unwrap().clone();
    let shape: Vec<(bool, Option<&str>)> = seen
        .iter()
        .map(|s| {
            (
                s.is_watch(),
                s.query.get("resourceVersion").map(String::as_str),
            )
        })
        .collect();
    assert_eq!(
        shape,
        vec![
            (false, None),
            (true, Some("1")),
            (false, None),
            (true, Some("9"))
        ],
        "list, watch, 410, list again, watch from the new list: {seen:#?}"
    );
    assert!(seen.iter().all(|s| s.path == "/api/v1/services"));
}

#[tokio::test]
async fn a_watch_resumes_from_its_last_bookmark_without_a_relist() {
    let (client, log) = scripted(|seen| {
        if !seen.is_watch() {
            return Reply::Json(200, list("Service", "v1", "1", vec![svc("a", "1")]));
        }
        match seen.query.get("resourceVersion").map(String::as_str) {
            // The watch ends (server timeout) after a bookmark at rv 5.
            Some("1") => Reply::Lines(vec![json!({
                "type": "BOOKMARK",
                "object": {"apiVersion": "v1", "kind": "Service",
                           "metadata": {"resourceVersion": "5"}},
            })]),
            _ => Reply::Hang,
        }
    });
    let (world, task) = drive(client);
    wait_for(&log, "the resumed watch", |l| {
        l.iter().filter(|s| s.is_watch()).count() >= 2
    })
    .await;
    task.abort();
    let seen = log.lock().unwrap().clone();
    let watches: Vec<&Seen> = seen.iter().filter(|s| s.is_watch()).collect();
    assert_eq!(
        watches[0]
            .query
            .get("allowWatchBookmarks")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(
        watches[1].query.get("resourceVersion").map(String::as_str),
        Some("5")
    );
    assert_eq!(
        seen.iter().filter(|s| !s.is_watch()).count(),
        1,
        "no relist: {seen:#?}"
    );
    assert_eq!(names(&world), ["a"]);
}

#[tokio::test]
async fn a_new_leader_lists_services_afresh_before_its_first_write() {
    let (client, log) = scripted(|seen| {
        if seen.path.starts_with(LEASE_PATH) {
            return match seen.method.as_str() {
                "GET" => Reply::Json(404, status(404, "NotFound")),
                _ => {
                    let mut l = seen.body.clone();
                    l["metadata"]["resourceVersion"] = "1".into();
                    Reply::Json(201, l)
                }
            };
        }
        controller_routes(seen)
    });
    let mut opts = controller::Options::new("portico-controller-0", "portico-system");
    opts.debounce = Duration::from_millis(5);
    let (stop_tx, stop) = watch::channel(false);
    let task = tokio::spawn(controller::run(client, opts, Arc::default(), stop));
    let is_patch = |s: &Seen| s.method == "PATCH" && s.path.ends_with("/services/web/status");
    wait_for(&log, "the Service status patch", |l| l.iter().any(is_patch)).await;
    stop_tx.send(true).unwrap();
    task.await.unwrap().unwrap();
    let seen = log.lock().unwrap().clone();
    let fresh_list = seen
        .iter()
        .position(|s| {
            s.method == "GET"
                && s.path == "/api/v1/services"
                && !s.is_watch()
                && !s.query.contains_key("limit")
        })
        .expect("a fresh list of Services on becoming leader");
    let lease_won = seen
        .iter()
        .position(|s| s.method == "POST" && s.path == LEASE_PATH)
        .unwrap();
    let first_patch = seen.iter().position(is_patch).unwrap();
    assert!(
        lease_won < fresh_list && fresh_list < first_patch,
        "{seen:#?}"
    );
}
