//! The manifests of `deploy/` as `kubectl kustomize` renders them (offline).

#![allow(dead_code, reason = "each test file uses some of the helpers")]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// `deploy/` (or a folder under it) in the repository.
#[must_use]
pub fn deploy_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(sub)
}

/// The output of `kubectl kustomize <dir>`.
///
/// # Panics
/// kubectl is missing or the kustomization does not render.
#[must_use]
pub fn kustomize_yaml(dir: &Path) -> String {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run kubectl (on the machine image; /usr/bin/kubectl): {e}")
        });
    assert!(
        out.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("kustomize output is UTF-8")
}

/// The documents of `kubectl kustomize <dir>`.
///
/// # Panics
/// As [`kustomize_yaml`], or the output is not YAML.
#[must_use]
pub fn kustomize(dir: &Path) -> Vec<Value> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(&kustomize_yaml(dir)).expect("kustomize output parses");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

/// The objects of `docs` of `kind`.
#[must_use]
pub fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}
