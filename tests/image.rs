//! The container image and its SBOMs, built here without a registry by `scripts/image.sh`
//! from the binary these tests were built with (debug info stripped; `make image` ships the
//! release binary the same way):
//! - podman (vfs storage, runc, no network: what works in this sandbox) loads the OCI
//!   archive and runs `portico --version` in it;
//! - the binary's SBOM (cargo-cyclonedx) lists exactly the crates of `Cargo.lock` the binary
//!   is built from, at their locked versions, and the image's SBOM lists every Debian
//!   package of the image's dpkg status as a pkg:deb purl plus the binary and its crates;
//!   both validate against the CycloneDX schema (cyclonedx-python-lib, offline).
//!
//! Needs root, mmdebstrap, podman, runc, cargo-cyclonedx and the kmock virtual environment
//! (all from `scripts/bootstrap.sh`) and the machine's apt sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

struct Built {
    out: PathBuf,
    archive: PathBuf,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what} (run scripts/bootstrap.sh): {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Builds the image once for all tests of this file.
fn built() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = repo().join("target/image-test");
        let stdout = run(
            Command::new(repo().join("scripts/image.sh"))
                .arg("--binary")
                .arg(env!("CARGO_BIN_EXE_portico"))
                .arg("--out")
                .arg(&out),
            "scripts/image.sh",
        );
        let archive = PathBuf::from(stdout.trim());
        assert!(archive.is_file(), "no archive at {}", archive.display());
        Built { out, archive }
    })
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn validate_sbom(path: &Path) {
    let python = std::env::var("PORTICO_KMOCK_PYTHON")
        .unwrap_or_else(|_| "/opt/portico-kmock/bin/python".to_owned());
    let out = Command::new(&python)
        .arg(repo().join("scripts/image/validate_sbom.py"))
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python} (run scripts/bootstrap.sh): {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("valid "),
        "{} does not validate against the CycloneDX schema:\n{text}{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn podman_runs_portico_version_in_the_image_built_without_a_registry() {
    let b = built();
    let store = tempfile::tempdir().unwrap();
    let version = run(
        Command::new("podman")
            .arg("--root")
            .arg(store.path().join("root"))
            .arg("--runroot")
            .arg(store.path().join("run"))
            .args([
                "--storage-driver",
                "vfs",
                "--cgroup-manager",
                "cgroupfs",
                "--runtime",
                "runc",
                "run",
                "--rm",
                "--network",
                "none",
                // Lower than the sandbox's limits: podman's defaults are higher, and raising
                // them needs CAP_SYS_RESOURCE.
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
            ])
            .arg(format!("oci-archive:{}", b.archive.display()))
            .arg("--version"),
        "podman run",
    );
    assert_eq!(
        version.trim(),
        format!("portico {}", env!("CARGO_PKG_VERSION")),
        "portico --version in the image"
    );
    // The image is small: a Debian root with glibc and libgcc only, and the binary.
    let index = run(
        Command::new("tar")
            .arg("-xOf")
            .arg(&b.archive)
            .arg("index.json"),
        "tar",
    );
    let index: Value = serde_json::from_str(&index).unwrap();
    assert_eq!(
        index["manifests"][0]["annotations"]["org.opencontainers.image.ref.name"],
        format!("localhost/portico:{}", env!("CARGO_PKG_VERSION"))
    );
}

/// (name, version) of every package in Cargo.lock.
fn locked() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string(repo().join("Cargo.lock")).unwrap();
    let mut out = BTreeSet::new();
    let mut name = None;
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_owned());
        } else if let Some(v) = line.strip_prefix("version = ") {
            if let Some(n) = name.take() {
                out.insert((n, v.trim_matches('"').to_owned()));
            }
        }
    }
    out
}

/// (name, version) of the packages `cargo tree` says the binary is built from: normal
/// dependencies and build dependencies (the eBPF program, built by a build script, is
/// inside the binary), host target, the package itself left out.
fn cargo_tree() -> BTreeSet<(String, String)> {
    let text = run(
        Command::new(env!("CARGO")).current_dir(repo()).args([
            "tree",
            "--locked",
            "--offline",
            "-p",
            "portico",
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ]),
        "cargo tree",
    );
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let name = it.next()?;
            let version = it.next()?.trim_start_matches('v');
            Some((name.to_owned(), version.to_owned()))
        })
        .filter(|(n, _)| n != "portico")
        .collect()
}

#[test]
fn the_binary_sbom_lists_the_crates_of_cargo_lock_the_binary_is_built_from_and_validates() {
    let b = built();
    let path = b.out.join("portico.cdx.json");
    validate_sbom(&path);
    let sbom = json(&path);
    assert_eq!(sbom["metadata"]["component"]["name"], "portico");
    let components: BTreeSet<(String, String)> = sbom["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let locked = locked();
    let stray: Vec<_> = components.difference(&locked).collect();
    assert!(
        stray.is_empty(),
        "in the SBOM, not in Cargo.lock: {stray:?}"
    );
    // Every crate the binary is built from is listed. cargo-cyclonedx reads `cargo
    // metadata`, whose resolve unifies features across the whole workspace, so it may also
    // list a few crates an optional feature would bring (all of them locked, as checked).
    let tree = cargo_tree();
    let missing: Vec<_> = tree.difference(&components).collect();
    assert!(
        missing.is_empty(),
        "crates of `cargo tree -e normal,build` missing from the SBOM: {missing:?}"
    );
    let extra = components.difference(&tree).count();
    assert!(
        extra * 10 < tree.len(),
        "{extra} crates in the SBOM beyond the {} of cargo tree",
        tree.len()
    );
    for c in sbom["components"].as_array().unwrap() {
        let purl = c["purl"].as_str().unwrap_or_default();
        assert!(purl.starts_with("pkg:cargo/"), "{c}");
    }
    eprintln!(
        "binary SBOM: {} crates ({} from cargo tree, {extra} more from feature unification)",
        components.len(),
        tree.len()
    );
}

/// (package, version) of the image's dpkg status.
fn dpkg_status(rootfs: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(rootfs.join("var/lib/dpkg/status")).unwrap();
    text.split("\n\n")
        .filter_map(|para| {
            let field = |f: &str| {
                para.lines()
                    .find_map(|l| l.strip_prefix(&format!("{f}: ")))
                    .map(str::to_owned)
            };
            Some((field("Package")?, field("Version")?))
        })
        .collect()
}

#[test]
fn the_image_sbom_lists_every_debian_package_and_the_binary_and_validates() {
    let b = built();
    let path = b.out.join("portico-image.cdx.json");
    validate_sbom(&path);
    let sbom = json(&path);
    let components = sbom["components"].as_array().unwrap();
    let debs: BTreeMap<String, String> = components
        .iter()
        .filter(|c| {
            c["purl"]
                .as_str()
                .is_some_and(|p| p.starts_with("pkg:deb/debian/"))
        })
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["version"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let status = dpkg_status(&b.out.join("rootfs"));
    assert_eq!(
        debs, status,
        "Debian packages: SBOM vs the image's dpkg status"
    );
    for needed in ["libc6", "libgcc-s1", "base-files"] {
        assert!(debs.contains_key(needed), "no {needed} in the image");
    }
    assert_eq!(sbom["metadata"]["component"]["type"], "container");
    let binary = json(&b.out.join("portico.cdx.json"));
    let crates = binary["components"].as_array().unwrap().len();
    let refs: BTreeSet<&str> = components
        .iter()
        .filter_map(|c| c["bom-ref"].as_str())
        .collect();
    assert_eq!(refs.len(), components.len(), "bom-refs are unique");
    assert!(
        components
            .iter()
            .any(|c| c["name"] == "portico" && c["type"] == "application"),
        "the binary is a component"
    );
    assert!(
        components.len() >= debs.len() + crates + 2,
        "the crates of the binary are in the image SBOM"
    );
    assert!(components
        .iter()
        .any(|c| c["type"] == "operating-system" && c["name"] == "debian"));
    eprintln!(
        "image SBOM: {} Debian packages, {crates} crates, {} components",
        debs.len(),
        components.len()
    );
}
