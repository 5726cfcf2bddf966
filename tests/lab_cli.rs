//! `portico lab` as a user runs it: the real binary, its owner process, and what it leaves
//! behind (nothing: no namespace, no process). Needs root; fails (never skips) without it.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;

use anyhow::{Context as _, Result};
use portico::status::{BackendRow, PeerRow, PoolRow, ServiceRow, StatusReport};
use portico_integration::control::LAST_HANDLE_FILE;
use portico_integration::topology::{LabHandle, NodeStatus};

/// One lab at a time.
static ONE_LAB: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn portico(args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(args)
        .output()
        .context("running portico")
}

/// The last line of stdout, as JSON.
fn last_json(out: &Output) -> Result<serde_json::Value> {
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| {
        format!(
            "last line is not JSON: {line:?}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The namespaces named after the lab that `down` removed.
fn leftovers(dir: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(dir.join(LAST_HANDLE_FILE))
        .context("down keeps the handle of the lab it removed")?;
    let handle: LabHandle = serde_json::from_str(&text)?;
    // Gone, or a zombie its new parent (init) has not reaped yet.
    let stat =
        std::fs::read_to_string(format!("/proc/{}/stat", handle.owner_pid)).unwrap_or_default();
    let running = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'));
    assert!(
        !running,
        "the lab's owner (pid {}) still runs",
        handle.owner_pid
    );
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&handle.base))
        .map(str::to_owned)
        .collect())
}

#[test]
fn lab_demo_sends_traffic_to_every_address_and_leaves_nothing_behind() -> Result<()> {
    let _one = lock();
    let dir = tempfile::tempdir()?;
    let d = dir.path().join("lab");
    let out = portico(&[
        "lab",
        "demo",
        "--dir",
        &d.display().to_string(),
        "--flows",
        "20",
        "--throughput-secs",
        "1",
    ])?;
    let json = last_json(&out)?;
    assert!(out.status.success(), "{json}");
    assert_eq!(json["ok"], true);
    let addresses = json["addresses"].as_object().context("addresses")?;
    assert_eq!(addresses.len(), 8, "{json}");
    assert_eq!(
        json["addresses"]["demo/web"].as_array().map(Vec::len),
        Some(2)
    );
    // Every address, TCP and UDP, all answered.
    let flows = json["flows"].as_array().context("flows")?;
    assert_eq!(flows.len(), 18, "{json}");
    for f in flows {
        assert_eq!(f["failed"], 0, "{f}");
        assert_eq!(f["answered"], 20, "{f}");
    }
    assert_eq!(json["routes"]["203.0.113.0/32"], serde_json::json!(["n2"]));
    // The direct-server-return Services: the nodes encapsulated their requests, each
    // Service's in its own outer header.
    let dsr: u64 = json["dsr_encap"]
        .as_object()
        .context("dsr_encap")?
        .values()
        .filter_map(serde_json::Value::as_u64)
        .sum();
    assert!(dsr >= 3 * 2 * 20, "{json}");
    for (service, outer) in [
        ("demo/direct", "IPIP"),
        ("demo/direct6", "IP6IP6"),
        ("demo/direct-gue", "GUE"),
    ] {
        let row = &json["dsr"][service];
        assert_eq!(row["outer"], outer, "{json}");
        let packets: u64 = row["packets"]
            .as_object()
            .with_context(|| format!("dsr {service} packets"))?
            .values()
            .filter_map(serde_json::Value::as_u64)
            .sum();
        assert!(packets >= 2 * 20, "{service}: {json}");
    }
    // The bulk TCP step measures demo/web, both families (the most backends, no NAT46/64).
    let web: Vec<std::net::IpAddr> = serde_json::from_value(json["addresses"]["demo/web"].clone())?;
    let measured: Vec<std::net::SocketAddr> = json["throughput_gbps"]
        .as_object()
        .context("throughput_gbps")?
        .keys()
        .map(|k| k.parse())
        .collect::<Result<_, _>>()?;
    assert_eq!(measured.len(), 2, "{json}");
    assert!(measured.iter().all(|t| web.contains(&t.ip())), "{json}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for shown in [
        "allocated addresses",
        "[ECMP]",
        "hits per node",
        "hits per backend",
        "direct server return",
        "throughput",
    ] {
        assert!(stdout.contains(shown), "{shown:?} missing from\n{stdout}");
    }
    assert_eq!(leftovers(&d)?, Vec::<String>::new());
    Ok(())
}

#[test]
fn a_failing_demo_names_its_step_and_leaves_no_namespace() -> Result<()> {
    let _one = lock();
    let dir = tempfile::tempdir()?;
    let d = dir.path().join("lab");
    // A pool and a Service but no BGPPeer: the routes never come.
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    for (name, text) in portico_integration::control::EXAMPLE_MANIFESTS {
        if name != "10-bgp.yaml" {
            std::fs::write(manifests.join(name), text)?;
        }
    }
    let out = portico(&[
        "lab",
        "demo",
        "--dir",
        &d.display().to_string(),
        "--manifests",
        &manifests.display().to_string(),
        "--converge-secs",
        "3",
    ])?;
    let json = last_json(&out)?;
    assert_eq!(out.status.code(), Some(1), "{json}");
    assert_eq!(json["ok"], false);
    assert_eq!(
        json["step"], "BGP sessions, addresses and ECMP routes",
        "{json}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("✗ BGP sessions, addresses and ECMP routes failed after"),
        "{stdout}"
    );
    assert!(stdout.contains("tear down after the failure"), "{stdout}");
    assert_eq!(leftovers(&d)?, Vec::<String>::new());
    Ok(())
}

#[test]
fn lab_up_stays_up_for_status_until_down() -> Result<()> {
    let _one = lock();
    let dir = tempfile::tempdir()?;
    let d = dir.path().join("lab");
    let d_arg = d.display().to_string();
    let up = portico(&["lab", "up", "--dir", &d_arg])?;
    let json = last_json(&up)?;
    assert!(up.status.success(), "{json}");
    // `up` has exited; the lab has not.
    let result = (|| -> Result<()> {
        let status = portico(&["lab", "status", "--dir", &d_arg, "--output", "json"])?;
        let json = last_json(&status)?;
        assert!(status.status.success(), "{json}");
        let sessions = json["status"]["sessions"].as_array().context("sessions")?;
        assert_eq!(sessions.len(), 4);
        assert!(
            sessions.iter().all(|s| s["state"] == "Established"),
            "{sessions:?}"
        );
        let again = portico(&["lab", "up", "--dir", &d_arg])?;
        assert_eq!(
            again.status.code(),
            Some(1),
            "a second lab in the same folder"
        );
        assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));
        Ok(())
    })();
    let down = portico(&["lab", "down", "--dir", &d_arg])?;
    result?;
    let json = last_json(&down)?;
    assert!(down.status.success(), "{json}");
    assert_eq!(json["swept"], serde_json::json!([]));
    assert_eq!(leftovers(&d)?, Vec::<String>::new());
    let status = portico(&["lab", "status", "--dir", &d_arg])?;
    assert_eq!(status.status.code(), Some(1));
    Ok(())
}

#[test]
fn the_lab_reads_the_status_portico_serves() {
    let report = StatusReport {
        node: "n1".into(),
        pools: vec![PoolRow {
            name: "lab".into(),
            state: "Ready".into(),
            v4_used: "2".into(),
            v4_total: "16".into(),
            v6_used: "1".into(),
            v6_total: "256".into(),
        }],
        services: vec![ServiceRow {
            namespace: "demo".into(),
            name: "web".into(),
            addresses: vec!["203.0.113.1".parse().unwrap()],
            pools: vec!["lab".into()],
            backends_ready: 3,
            backends_total: 4,
            announced: true,
            local: false,
            unsatisfied: None,
            notices: Vec::new(),
            packets: 10,
            new_flows: 2,
            drops: 0,
            backends: vec![BackendRow {
                address: "198.18.1.1".parse().unwrap(),
                port: 8080,
                packets: 10,
                new_flows: 2,
            }],
        }],
        peers: vec![PeerRow {
            name: "tor-v4".into(),
            address: "198.18.1.254".parse().unwrap(),
            state: "Established".into(),
            uptime_secs: Some(3),
            prefixes_sent: [1, 0],
            last_error: None,
        }],
        passes: 7,
        ..StatusReport::default()
    };
    let seen: NodeStatus = serde_json::from_str(&serde_json::to_string(&report).unwrap()).unwrap();
    assert_eq!(seen.node, "n1");
    assert_eq!(seen.passes, 7);
    assert_eq!(seen.pools[0].v4_total, "16");
    let s = &seen.services[0];
    assert_eq!(
        (s.id().as_str(), s.backends_ready, s.backends_total),
        ("demo/web", 3, 4)
    );
    assert!(s.announced && !s.local && s.new_flows == 2);
    assert_eq!((s.backends[0].port, s.backends[0].new_flows), (8080, 2));
    assert_eq!(seen.peers[0].state, "Established");
}
