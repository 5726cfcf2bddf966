//! The RBAC of `deploy/` agrees with what the code asks of the API server.
//!
//! `portico controller` and `portico agent` (in process) run against a kmock that records
//! every request with the user who sent it (each program's client authenticates as its
//! ServiceAccount). The world they see makes them use every path of theirs that talks to
//! the API: watches, the new leader's fresh lists, the Lease (create, renewals, release),
//! status writes of Services, pools, Gateway API objects and the PorticoNode (whose first
//! server-side apply creates it), Events. Then, with the rules of `kubectl kustomize
//! deploy/`:
//! - every request is allowed for its user by a binding in the manifests (a new watch or
//!   write without a rule fails here);
//! - every rule is used by some request of its user (a rule the code no longer needs
//!   fails here), except the few listed in [`NEEDED_BUT_NOT_EXERCISED`], each with why.

#[path = "common_deploy/mod.rs"]
mod common_deploy;
#[path = "common_kmock/mod.rs"]
mod common_kmock;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use common_kmock::{create_json, Kmock};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, Subject,
};
use portico::k8s::lease::LeaseTiming;
use portico::{agent, controller};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::watch;

const NAMESPACE: &str = "portico-system";
const CONTROLLER: &str = "system:serviceaccount:portico-system:portico-controller";
const AGENT: &str = "system:serviceaccount:portico-system:portico-agent";

/// Permissions the code needs that no run here makes it use: (user, apiGroup, resource,
/// verb, why).
const NEEDED_BUT_NOT_EXERCISED: &[(&str, &str, &str, &str, &str)] = &[(
    CONTROLLER,
    "events.k8s.io",
    "events",
    "patch",
    "kube-runtime's Recorder patches an Event (a series) when the same event repeats for the \
     same object version; the controller publishes with each status write, which changes the \
     version, so a run cannot make it repeat on purpose",
)];

/// One request as the recording kmock saw it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "camelCase")]
struct Request {
    user: Option<String>,
    verb: String,
    api_group: String,
    resource: String,
    subresource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
}

impl Request {
    fn resource_path(&self) -> String {
        match &self.subresource {
            Some(s) => format!("{}/{s}", self.resource),
            None => self.resource.clone(),
        }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {}{} ns={} name={}",
            self.user.as_deref().unwrap_or("<anonymous>"),
            self.verb,
            if self.api_group.is_empty() {
                String::new()
            } else {
                format!("{}/", self.api_group)
            },
            self.resource_path(),
            self.namespace.as_deref().unwrap_or("-"),
            self.name.as_deref().unwrap_or("-"),
        )
    }
}

/// A rule granted to a user: cluster-wide (ClusterRoleBinding) or in one namespace.
#[derive(Debug, Clone)]
struct Grant {
    user: String,
    namespace: Option<String>,
    rule: PolicyRule,
    from: String,
}

/// One (apiGroup, resource, verb) of a grant, to count as used.
type Permission = (String, Option<String>, String, String, String);

impl Grant {
    fn allows(&self, r: &Request) -> bool {
        let user_ok = r.user.as_deref() == Some(self.user.as_str());
        let ns_ok = self
            .namespace
            .as_ref()
            .is_none_or(|ns| r.namespace.as_ref() == Some(ns));
        let has = |list: &[String], x: &str| list.iter().any(|v| v == x);
        let rule = &self.rule;
        let names_ok = rule
            .resource_names
            .as_ref()
            .is_none_or(|names| r.name.as_ref().is_some_and(|n| names.contains(n)));
        user_ok
            && ns_ok
            && has(rule.api_groups.as_deref().unwrap_or_default(), &r.api_group)
            && has(
                rule.resources.as_deref().unwrap_or_default(),
                &r.resource_path(),
            )
            && has(&rule.verbs, &r.verb)
            && names_ok
    }

    fn permissions(&self) -> Vec<Permission> {
        let mut out = Vec::new();
        for g in self.rule.api_groups.iter().flatten() {
            for res in self.rule.resources.iter().flatten() {
                for v in &self.rule.verbs {
                    out.push((
                        self.user.clone(),
                        self.namespace.clone(),
                        g.clone(),
                        res.clone(),
                        v.clone(),
                    ));
                }
            }
        }
        out
    }

    /// Whether `r` uses permission `p` of this grant.
    fn uses(&self, p: &Permission, r: &Request) -> bool {
        self.allows(r) && r.api_group == p.2 && r.resource_path() == p.3 && r.verb == p.4
    }
}

fn user_of(s: &Subject) -> Option<String> {
    (s.kind == "ServiceAccount").then(|| {
        format!(
            "system:serviceaccount:{}:{}",
            s.namespace.as_deref().unwrap_or_default(),
            s.name
        )
    })
}

/// Every rule the rendered manifests grant, per user.
fn grants(docs: &[Value]) -> Vec<Grant> {
    let cluster_roles: Vec<ClusterRole> = common_deploy::of_kind(docs, "ClusterRole")
        .into_iter()
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .collect();
    let roles: Vec<Role> = common_deploy::of_kind(docs, "Role")
        .into_iter()
        .map(|v| serde_json::from_value(v.clone()).unwrap())
        .collect();
    let rules_of = |kind: &str, name: &str, ns: Option<&str>| -> Vec<PolicyRule> {
        match kind {
            "ClusterRole" => cluster_roles
                .iter()
                .find(|r| r.metadata.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("no ClusterRole {name}"))
                .rules
                .clone()
                .unwrap_or_default(),
            "Role" => roles
                .iter()
                .find(|r| {
                    r.metadata.name.as_deref() == Some(name)
                        && r.metadata.namespace.as_deref() == ns
                })
                .unwrap_or_else(|| panic!("no Role {name} in {ns:?}"))
                .rules
                .clone()
                .unwrap_or_default(),
            k => panic!("roleRef of kind {k}"),
        }
    };
    let mut out = Vec::new();
    for v in common_deploy::of_kind(docs, "ClusterRoleBinding") {
        let b: ClusterRoleBinding = serde_json::from_value(v.clone()).unwrap();
        let rules = rules_of(&b.role_ref.kind, &b.role_ref.name, None);
        for user in b.subjects.iter().flatten().filter_map(user_of) {
            for rule in &rules {
                out.push(Grant {
                    user: user.clone(),
                    namespace: None,
                    rule: rule.clone(),
                    from: format!("ClusterRole {}", b.role_ref.name),
                });
            }
        }
    }
    for v in common_deploy::of_kind(docs, "RoleBinding") {
        let b: RoleBinding = serde_json::from_value(v.clone()).unwrap();
        let ns = b
            .metadata
            .namespace
            .clone()
            .expect("a RoleBinding's namespace");
        let rules = rules_of(&b.role_ref.kind, &b.role_ref.name, Some(&ns));
        for user in b.subjects.iter().flatten().filter_map(user_of) {
            for rule in &rules {
                out.push(Grant {
                    user: user.clone(),
                    namespace: Some(ns.clone()),
                    rule: rule.clone(),
                    from: format!("{} {} in {ns}", b.role_ref.kind, b.role_ref.name),
                });
            }
        }
    }
    out
}

fn recorded(file: &Path) -> Vec<Request> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The permissions of `grants` no request in `requests` used, less the listed exceptions.
fn unused(grants: &[Grant], requests: &[Request]) -> Vec<String> {
    let mut out = BTreeSet::new();
    for g in grants {
        for p in g.permissions() {
            let excepted = NEEDED_BUT_NOT_EXERCISED
                .iter()
                .any(|(u, group, res, verb, _)| {
                    (*u, *group, *res, *verb) == (&p.0, &p.2, &p.3, &p.4)
                });
            if !excepted && !requests.iter().any(|r| g.uses(&p, r)) {
                out.insert(format!(
                    "{} may {} {}/{} ({}{})",
                    p.0,
                    p.4,
                    p.2,
                    p.3,
                    g.from,
                    g.rule
                        .resource_names
                        .as_ref()
                        .map(|n| format!(", names {n:?}"))
                        .unwrap_or_default()
                ));
            }
        }
    }
    out.into_iter().collect()
}

fn world() -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "n1", "uid": "0b2f9c52-1111-4c3e-9a70-000000000001"},
               "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.10"}]}}),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "tor-md5", "namespace": NAMESPACE},
               "stringData": {"password": "secret"}}),
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "AddressPool",
               "metadata": {"name": "public"}, "spec": {"blocks": [{"cidr": "198.51.100.0/29"}]}}),
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
               "spec": {"myASN": 64512, "peerASN": 64500, "peerAddress": "127.0.0.1",
                        "peerPort": 1, "connectRetryTime": 1,
                        "passwordSecretRef": {"name": "tor-md5", "namespace": NAMESPACE}}}),
        json!({"apiVersion": "portico.io/v1alpha1", "kind": "BGPAdvertisement",
               "metadata": {"name": "all"}, "spec": {}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"type": "LoadBalancer", "loadBalancerClass": "portico.io/lb",
                        "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "backend", "namespace": "shop"},
               "spec": {"type": "ClusterIP", "ports": [{"name": "app", "port": 9000, "protocol": "TCP"},
                                                        {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
        common_kmock::web_endpoints("web-1", "web", &[("10.1.0.5", "n1")]),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
               "metadata": {"name": "portico"},
               "spec": {"controllerName": "portico.io/gateway-controller"}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "edge", "namespace": "shop"},
               "spec": {"gatewayClassName": "portico", "listeners": [
                   {"name": "app", "port": 9000, "protocol": "TCP"},
                   {"name": "dns", "port": 53, "protocol": "UDP"}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "TCPRoute",
               "metadata": {"name": "app", "namespace": "shop"},
               "spec": {"parentRefs": [{"name": "edge", "sectionName": "app"}],
                        "rules": [{"backendRefs": [{"name": "backend", "port": 9000}]}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1alpha2", "kind": "UDPRoute",
               "metadata": {"name": "dns", "namespace": "shop"},
               "spec": {"parentRefs": [{"name": "edge", "sectionName": "dns"}],
                        "rules": [{"backendRefs": [{"name": "backend", "port": 53}]}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "ReferenceGrant",
               "metadata": {"name": "from-shop", "namespace": "shop"},
               "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "TCPRoute",
                                  "namespace": "shop"}],
                        "to": [{"group": "", "kind": "Service"}]}}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_of_controller_and_agent_is_allowed_by_deploy_rbac_and_every_rule_is_used() {
    common_kmock::init_logs();
    let docs = common_deploy::kustomize(&common_deploy::deploy_dir(""));
    let grants = grants(&docs);
    for user in [CONTROLLER, AGENT] {
        assert!(
            grants.iter().any(|g| g.user == user),
            "deploy/ binds no role to {user}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("requests.jsonl");
    let kmock = Kmock::start_recording(&log);
    let admin = kmock.client();
    for obj in world() {
        create_json(&admin, obj).await;
    }

    let (stop, rx) = watch::channel(false);
    let mut copts = controller::Options::new("portico-controller-0", NAMESPACE);
    copts.timing = LeaseTiming {
        duration: Duration::from_secs(2),
        renew_deadline: Duration::from_millis(1500),
        retry: Duration::from_millis(200),
    };
    copts.resync = Duration::from_millis(300);
    copts.debounce = Duration::from_millis(20);
    let ctl = tokio::spawn(controller::run(
        kmock.client_as(CONTROLLER),
        copts,
        std::sync::Arc::default(),
        rx.clone(),
    ));
    let mut aopts = agent::Options::new("n1");
    aopts.secret_namespace = NAMESPACE.into();
    aopts.debounce = Duration::from_millis(20);
    aopts.resync = Duration::from_millis(300);
    let agt = tokio::spawn(agent::run(kmock.client_as(AGENT), aopts, rx));

    // Until every rule has been used, or for at most a minute (then the failure names the
    // rules no request used).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let missing = loop {
        let missing = unused(&grants, &recorded(&log));
        if missing.is_empty() || tokio::time::Instant::now() >= deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Stopping releases the Lease (get, update): those requests are checked too.
    stop.send(true).unwrap();
    ctl.await.unwrap().unwrap();
    agt.await.unwrap().unwrap();
    let requests = recorded(&log);
    let mut denied = BTreeSet::new();
    for r in requests
        .iter()
        .filter(|r| matches!(r.user.as_deref(), Some(CONTROLLER | AGENT)))
    {
        if !grants.iter().any(|g| g.allows(r)) {
            denied.insert(r.to_string());
        }
    }
    assert!(
        denied.is_empty() && missing.is_empty(),
        "requests the RBAC of deploy/ does not allow (add a rule, with the code that needs \
         it):\n  {}\nrules of deploy/ that neither program used in this run (drop them, or \
         list them in NEEDED_BUT_NOT_EXERCISED with why):\n  {}",
        denied.into_iter().collect::<Vec<_>>().join("\n  "),
        missing.join("\n  ")
    );
    for user in [CONTROLLER, AGENT] {
        let n = requests
            .iter()
            .filter(|r| r.user.as_deref() == Some(user))
            .count();
        assert!(n > 10, "only {n} requests recorded for {user}");
    }
    // The exceptions are still granted (else the list is stale).
    for (user, group, res, verb, why) in NEEDED_BUT_NOT_EXERCISED {
        let granted = grants.iter().any(|g| {
            g.user == *user
                && g.permissions().iter().any(|p| {
                    (&p.2, &p.3, &p.4)
                        == (
                            &(*group).to_owned(),
                            &(*res).to_owned(),
                            &(*verb).to_owned(),
                        )
                })
        });
        assert!(
            granted,
            "{user} is no longer granted {verb} {group}/{res} ({why}): drop the exception"
        );
    }
}

#[test]
fn the_rbac_has_no_wildcards_and_binds_the_service_accounts_the_workloads_run_as() {
    let docs = common_deploy::kustomize(&common_deploy::deploy_dir(""));
    for kind in ["ClusterRole", "Role"] {
        for role in common_deploy::of_kind(&docs, kind) {
            for rule in role["rules"].as_array().expect("rules") {
                for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
                    for v in rule[field].as_array().into_iter().flatten() {
                        assert!(
                            !v.as_str().unwrap_or_default().contains('*'),
                            "wildcard in {kind} {}: {rule}",
                            role["metadata"]["name"]
                        );
                    }
                }
                assert!(rule.get("nonResourceURLs").is_none(), "{rule}");
            }
        }
    }
    let grants = grants(&docs);
    for (kind, name, user) in [
        ("Deployment", "portico-controller", CONTROLLER),
        ("DaemonSet", "portico-agent", AGENT),
    ] {
        let w = common_deploy::of_kind(&docs, kind)
            .into_iter()
            .find(|w| w["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"));
        let sa = w["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or("default");
        let ns = w["metadata"]["namespace"].as_str().unwrap_or_default();
        assert_eq!(
            format!("system:serviceaccount:{ns}:{sa}"),
            user,
            "{kind} {name} runs as another ServiceAccount than the RBAC test checks"
        );
        assert!(grants.iter().any(|g| g.user == user));
        assert!(
            common_deploy::of_kind(&docs, "ServiceAccount")
                .iter()
                .any(|s| s["metadata"]["name"] == sa && s["metadata"]["namespace"] == ns),
            "no ServiceAccount {ns}/{sa}"
        );
    }
}
