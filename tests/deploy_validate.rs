//! The generated CRDs (and any example manifests under `deploy/examples/`) validate
//! offline with `kubernetes-validate --strict` against every Kubernetes version Portico
//! supports. `scripts/bootstrap.sh` installs the validator, pinned, in the kmock virtual
//! environment.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes versions Portico supports.
const VERSIONS: &[&str] = &["1.33.0", "1.34.0", "1.35.0", "1.36.0"];

fn validator() -> PathBuf {
    let python = std::env::var("PORTICO_KMOCK_PYTHON")
        .unwrap_or_else(|_| "/opt/portico-kmock/bin/python".to_owned());
    Path::new(&python).with_file_name("kubernetes-validate")
}

fn manifests() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    let mut out = Vec::new();
    for dir in ["crds", "examples"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir)) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "yaml") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn generated_crds_and_examples_validate_strictly_against_every_supported_kubernetes() {
    let files = manifests();
    assert!(files.len() >= 4, "no manifests found: {files:?}");
    let tool = validator();
    for version in VERSIONS {
        let out = Command::new(&tool)
            .args(["--strict", "--quiet", "-k", version])
            .args(&files)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (run scripts/bootstrap.sh): {e}",
                    tool.display()
                )
            });
        assert!(
            out.status.success(),
            "kubernetes-validate --strict -k {version} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
