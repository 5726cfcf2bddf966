//! The capabilities the agent's DaemonSet grants (`deploy/base/agent.yaml`) are enough, and
//! each is needed: root with exactly those capabilities (the bounding set, as a container
//! runtime gives them) loads the XDP program with its maps pinned on bpffs, attaches it to
//! an interface, adopts the pins again after a restart and creates the link that holds the
//! announced addresses; without any one of them, it fails. The datapath and address code is
//! the agent's (`standalone::open_datapath`, `HolderApplier`), run here through
//! `portico standalone` in a network namespace of its own with a veth pair.
//!
//! Needs root, bpffs on /sys/fs/bpf (`scripts/bootstrap.sh` mounts it), unshare, setpriv
//! and ip.

#[path = "common_deploy/mod.rs"]
mod common_deploy;

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

/// The capabilities the DaemonSet adds, as setpriv names them.
fn daemonset_caps() -> Vec<String> {
    let docs = common_deploy::kustomize(&common_deploy::deploy_dir(""));
    let ds = &common_deploy::of_kind(&docs, "DaemonSet")[0];
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_array()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().unwrap().to_lowercase())
        .collect()
}

/// Runs `portico standalone` with XDP and the address link as root limited to `caps`, in a
/// new network namespace, twice (the second run adopts the pins). Ok: both runs attached
/// and created the link; Err: the output of the run that did not.
fn run_with(caps: &[String], dir: &Path) -> Result<(), String> {
    let pins = format!("/sys/fs/bpf/portico-caps-test-{}", std::process::id());
    let bounding: String = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let result = (|| {
        for round in ["first start", "restart (adopts the pins)"] {
            let script = format!(
                "ip link add capa type veth peer name capb && ip link set capa up && \
                 ip link set capb up && exec setpriv --bounding-set {bounding} --inh-caps -all -- \
                 {bin} standalone --manifests {dir}/m --node caps --state {dir}/state.json \
                 --xdp capa --xdp-mode generic --bpf-pin-dir {pins} --admin-socket {dir}/admin.sock \
                 --metrics-address none --hold-link portico0",
                bin = env!("CARGO_BIN_EXE_portico"),
                dir = dir.display(),
            );
            let mut child = Command::new("unshare")
                .args(["--net", "sh", "-c", &script])
                .env("PORTICO_PROC_SYS_NET", "/proc/sys/net")
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot run unshare: {e}"))?;
            let mut output = Vec::new();
            let (mut attached, mut linked) = (false, false);
            for line in BufReader::new(child.stderr.take().unwrap()).lines() {
                let Ok(line) = line else { break };
                attached |= line.contains("XDP attached");
                linked |= line.contains("created address-holding link");
                output.push(line);
                if attached && linked {
                    break;
                }
            }
            // SAFETY: kill(2) on our own child's pid (unshare, then sh, exec into portico).
            unsafe {
                libc::kill(i32::try_from(child.id()).unwrap(), libc::SIGKILL);
            }
            let _ = child.wait();
            if !(attached && linked) {
                return Err(format!("{round}:\n{}", output.join("\n")));
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&pins);
    result
}

#[test]
fn the_agent_capabilities_of_the_daemonset_are_enough_and_each_is_needed() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "needs root (setpriv, network namespaces, XDP)"
    );
    let caps = daemonset_caps();
    assert!(!caps.is_empty());
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("m")).unwrap();
    std::fs::copy(
        common_deploy::deploy_dir("examples/lab/00-pool.yaml"),
        dir.path().join("m/00-pool.yaml"),
    )
    .unwrap();
    if let Err(out) = run_with(&caps, dir.path()) {
        panic!("with the DaemonSet's capabilities {caps:?} the datapath did not start: {out}");
    }
    for left_out in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != left_out).cloned().collect();
        assert!(
            run_with(&fewer, dir.path()).is_err(),
            "the agent starts with {fewer:?}, without {left_out}: the DaemonSet grants more \
             than it needs (deploy/base/agent.yaml)"
        );
    }
}
