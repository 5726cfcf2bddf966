//! The manifests of `deploy/` as users get them: the Kustomize base (`kubectl kustomize
//! deploy/`), the Kubernetes examples (`deploy/examples/kubernetes/`, also a
//! kustomization) and the lab's manifests (`deploy/examples/lab/`):
//! - validate offline with `kubernetes-validate --strict` against every Kubernetes version
//!   Portico supports (`scripts/bootstrap.sh` installs the validator, pinned, in the kmock
//!   virtual environment); the kinds it has no schema for are exactly the custom ones,
//!   which the next test checks;
//! - Portico's custom resources validate against the schemas of `deploy/crds/`, strictly
//!   (no field the schema does not list; `tests/kmock/validate_custom_resources.py`);
//! - parse into their k8s-openapi, Gateway API and Portico types with nothing left over:
//!   serializing the typed value again gives back every field of the manifest, unchanged
//!   (a misspelt or misplaced field is dropped by the type, and fails here).

#[path = "common_deploy/mod.rs"]
mod common_deploy;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// The Kubernetes versions Portico supports.
const VERSIONS: &[&str] = &["1.33.0", "1.34.0", "1.35.0", "1.36.0"];

/// Kinds kubernetes-validate has no schema for (CRDs' kinds): checked by type instead.
const CUSTOM_KINDS: &[&str] = &[
    "AddressPool",
    "BGPPeer",
    "BGPAdvertisement",
    "GatewayClass",
    "Gateway",
    "TCPRoute",
    "UDPRoute",
];

/// Python of the kmock virtual environment (kubernetes-validate, jsonschema).
fn python() -> String {
    std::env::var("PORTICO_KMOCK_PYTHON")
        .unwrap_or_else(|_| "/opt/portico-kmock/bin/python".to_owned())
}

fn validator() -> PathBuf {
    Path::new(&python()).with_file_name("kubernetes-validate")
}

fn lab_files() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(common_deploy::deploy_dir("examples/lab"))
        .expect("deploy/examples/lab")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    out.sort();
    assert!(out.len() >= 4, "lab manifests: {out:?}");
    out
}

/// (what, YAML text) of everything a user applies.
fn sources() -> Vec<(String, String)> {
    let mut out = vec![
        (
            "kubectl kustomize deploy/".to_owned(),
            common_deploy::kustomize_yaml(&common_deploy::deploy_dir("")),
        ),
        (
            "kubectl kustomize deploy/examples/kubernetes".to_owned(),
            common_deploy::kustomize_yaml(&common_deploy::deploy_dir("examples/kubernetes")),
        ),
    ];
    for f in lab_files() {
        out.push((
            f.display().to_string(),
            std::fs::read_to_string(&f).unwrap(),
        ));
    }
    out
}

/// [`sources`] written into `dir`, one file each.
fn written_sources(dir: &Path) -> Vec<PathBuf> {
    sources()
        .iter()
        .enumerate()
        .map(|(i, (_, yaml))| {
            let f = dir.join(format!("{i}.yaml"));
            std::fs::write(&f, yaml).unwrap();
            f
        })
        .collect()
}

#[test]
fn rendered_base_examples_and_lab_validate_strictly_against_every_supported_kubernetes() {
    let dir = tempfile::tempdir().unwrap();
    let files = written_sources(dir.path());
    let tool = validator();
    for version in VERSIONS {
        let out = Command::new(&tool)
            .args(["--strict", "-k", version])
            .args(&files)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (run scripts/bootstrap.sh): {e}",
                    tool.display()
                )
            });
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version} failed:\n{text}"
        );
        let passed = text.lines().filter(|l| l.contains(" passed for ")).count();
        assert!(passed >= 20, "only {passed} objects validated:\n{text}");
        // Every object without a schema is of a kind the typed test below covers.
        for line in text.lines().filter(|l| l.contains("Couldn't find schema")) {
            let kind = line
                .split("for kind ")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap_or_default();
            assert!(
                CUSTOM_KINDS.contains(&kind),
                "kubernetes-validate has no schema for {kind} and no typed check covers it: {line}"
            );
        }
    }
}

#[test]
fn portico_custom_resources_in_examples_validate_against_the_crd_schemas_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let files = written_sources(dir.path());
    let python = python();
    let out = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/kmock/validate_custom_resources.py"))
        .arg(common_deploy::deploy_dir("crds"))
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (run scripts/bootstrap.sh): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "custom resources that their CRD's schema refuses:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for kind in ["AddressPool", "BGPPeer", "BGPAdvertisement"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("valid {kind}/"))),
            "no {kind} validated:\n{text}"
        );
    }
}

/// Where `original` has something `typed` lacks or differs in, as a path.
fn difference(original: &Value, typed: &Value, path: &str) -> Option<String> {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            Some(w) => difference(v, w, &format!("{path}.{k}")),
            None => Some(format!("{path}.{k} (unknown to the type)")),
        }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| difference(v, w, &format!("{path}[{i}]"))),
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => None,
        (a, b) if a == b => None,
        (a, b) => Some(format!("{path}: {a} became {b}")),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Result<Value, String> {
    let typed: T = serde_json::from_value(doc.clone()).map_err(|e| e.to_string())?;
    serde_json::to_value(typed).map_err(|e| e.to_string())
}

/// The document serialized back from its type, or why it does not parse.
fn typed(doc: &Value) -> Result<Value, String> {
    use gateway_api::experimental as gw;
    use k8s_openapi::api::{apps, core, discovery, rbac};
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiext;
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let kind = doc["kind"].as_str().unwrap_or_default();
    match (api_version, kind) {
        ("v1", "Namespace") => round_trip::<core::v1::Namespace>(doc),
        ("v1", "ServiceAccount") => round_trip::<core::v1::ServiceAccount>(doc),
        ("v1", "ConfigMap") => round_trip::<core::v1::ConfigMap>(doc),
        ("v1", "Secret") => round_trip::<core::v1::Secret>(doc),
        ("v1", "Service") => round_trip::<core::v1::Service>(doc),
        ("v1", "Node") => round_trip::<core::v1::Node>(doc),
        ("apps/v1", "Deployment") => round_trip::<apps::v1::Deployment>(doc),
        ("apps/v1", "DaemonSet") => round_trip::<apps::v1::DaemonSet>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => round_trip::<rbac::v1::ClusterRole>(doc),
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
            round_trip::<rbac::v1::ClusterRoleBinding>(doc)
        }
        ("rbac.authorization.k8s.io/v1", "Role") => round_trip::<rbac::v1::Role>(doc),
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => round_trip::<rbac::v1::RoleBinding>(doc),
        ("discovery.k8s.io/v1", "EndpointSlice") => round_trip::<discovery::v1::EndpointSlice>(doc),
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => {
            round_trip::<apiext::CustomResourceDefinition>(doc)
        }
        ("gateway.networking.k8s.io/v1", "GatewayClass") => {
            round_trip::<gw::gatewayclasses::GatewayClass>(doc)
        }
        ("gateway.networking.k8s.io/v1", "Gateway") => round_trip::<gw::gateways::Gateway>(doc),
        ("gateway.networking.k8s.io/v1alpha2", "TCPRoute") => {
            round_trip::<gw::tcproutes::TcpRoute>(doc)
        }
        ("gateway.networking.k8s.io/v1alpha2", "UDPRoute") => {
            round_trip::<gw::udproutes::UdpRoute>(doc)
        }
        ("portico.io/v1alpha1", "AddressPool") => round_trip::<portico_crds::AddressPool>(doc),
        ("portico.io/v1alpha1", "BGPPeer") => round_trip::<portico_crds::BgpPeer>(doc),
        ("portico.io/v1alpha1", "BGPAdvertisement") => {
            round_trip::<portico_crds::BgpAdvertisement>(doc)
        }
        (v, k) => Err(format!("no type for {v} {k}: add it to this test")),
    }
}

#[test]
fn every_manifest_parses_into_its_type_with_no_unknown_or_changed_field() {
    let mut kinds = BTreeSet::new();
    let mut problems = Vec::new();
    for (what, yaml) in sources() {
        let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml)
            .unwrap_or_else(|e| panic!("{what} is not YAML: {e}"));
        for doc in docs.iter().filter(|d| !d.is_null()) {
            let name = format!(
                "{what}: {} {}",
                doc["kind"].as_str().unwrap_or("?"),
                doc["metadata"]["name"].as_str().unwrap_or("?")
            );
            kinds.insert(doc["kind"].as_str().unwrap_or_default().to_owned());
            match typed(doc) {
                Ok(back) => {
                    if let Some(d) = difference(doc, &back, "") {
                        problems.push(format!("{name}: {d}"));
                    }
                }
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    for k in CUSTOM_KINDS {
        assert!(kinds.contains(*k), "no {k} in deploy/ or its examples");
    }
}

#[test]
fn the_base_holds_the_crds_workloads_and_rbac_and_no_example() {
    let docs = common_deploy::kustomize(&common_deploy::deploy_dir(""));
    let count = |kind: &str| common_deploy::of_kind(&docs, kind).len();
    for (kind, n) in [
        ("CustomResourceDefinition", 4),
        ("Namespace", 1),
        ("ServiceAccount", 2),
        ("ClusterRole", 2),
        ("ClusterRoleBinding", 2),
        ("Role", 2),
        ("RoleBinding", 2),
        ("Deployment", 1),
        ("DaemonSet", 1),
        ("GatewayClass", 1),
        ("ConfigMap", 1),
    ] {
        assert_eq!(count(kind), n, "{kind} in kubectl kustomize deploy/");
    }
    assert_eq!(docs.len(), 19, "objects in the base: only those above");
    // The CRDs are the generated ones (crds/tests/crds.rs keeps deploy/crds in sync).
    let mut crd_names: Vec<&str> = common_deploy::of_kind(&docs, "CustomResourceDefinition")
        .iter()
        .filter_map(|c| c["metadata"]["name"].as_str())
        .collect();
    crd_names.sort_unstable();
    let mut generated: Vec<String> = portico_crds::crd_files()
        .unwrap()
        .into_iter()
        .map(|(file, _)| file.trim_end_matches(".yaml").to_owned())
        .collect();
    generated.sort();
    assert_eq!(crd_names, generated);

    let deployment = &common_deploy::of_kind(&docs, "Deployment")[0];
    assert_eq!(deployment["spec"]["replicas"], 2);
    let args = &deployment["spec"]["template"]["spec"]["containers"][0]["args"];
    assert!(
        !args.to_string().contains("no-leader-election"),
        "two replicas need leader election: {args}"
    );
    let gc = &common_deploy::of_kind(&docs, "GatewayClass")[0];
    assert_eq!(
        gc["spec"]["controllerName"],
        "portico.io/gateway-controller"
    );

    let ds = &common_deploy::of_kind(&docs, "DaemonSet")[0]["spec"]["template"]["spec"];
    assert_eq!(ds["hostNetwork"], true);
    let sc = &ds["containers"][0]["securityContext"];
    assert_ne!(sc["privileged"], true, "the agent is not privileged");
    let caps: BTreeSet<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let allowed: BTreeSet<&str> = ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN"].into();
    assert!(caps.is_subset(&allowed), "capabilities {caps:?}");
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    // Each added capability is justified in a comment in the source YAML.
    let source = std::fs::read_to_string(common_deploy::deploy_dir("base/agent.yaml")).unwrap();
    for cap in &caps {
        assert!(
            source.contains(&format!("# {cap}: ")),
            "no comment justifying {cap} in deploy/base/agent.yaml"
        );
    }
    // The probes hit the endpoints the programs serve.
    for w in [deployment, &common_deploy::of_kind(&docs, "DaemonSet")[0]] {
        let c = &w["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    }
}
