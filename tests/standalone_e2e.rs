//! `portico standalone` end to end, in network namespaces: a router running BIRD (routes
//! installed into its kernel), a node running the real `portico` binary with XDP on its
//! uplink, two backends on the node's LAN and a client behind the router.
//!
//! ```text
//!  client ──veth── router (BIRD) ──veth── sw (bridge) ──veth── node (portico, XDP eth0)
//!                                                      ├─veth── be1
//!                                                      └─veth── be2
//! ```
//! Needs root; fails (never skips) without it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

mod common;
use ipnet::IpNet;
use portico::status::StatusReport;
use portico_integration::standalone::{self as topo, Topology, NODE_IP};
use portico_integration::traffic::{self, Backend};

struct Lab {
    topo: Topology,
    dir: tempfile::TempDir,
    portico: Option<Child>,
    /// A bpffs of this run: `ip netns exec` remounts /sys, so /sys/fs/bpf is not visible
    /// to the node process; a bpffs mounted elsewhere in the root mount namespace is.
    bpffs: PathBuf,
}

impl Lab {
    fn build() -> Result<Lab> {
        let topo = topo::build(2)?;
        let bpffs = PathBuf::from(format!("/run/ptc-bpffs-{}", std::process::id()));
        std::fs::create_dir_all(&bpffs)?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs)
            .status()?;
        if !mounted.success() {
            bail!("mounting a bpffs on {} failed", bpffs.display());
        }
        Ok(Lab {
            topo,
            dir: tempfile::tempdir()?,
            portico: None,
            bpffs,
        })
    }

    /// bpffs folder of this run's pinned maps and links.
    fn pin_dir(&self) -> PathBuf {
        self.bpffs.join("n1")
    }

    fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }
    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state.json")
    }
    fn socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    fn write(&self, file: &str, text: &str) -> Result<()> {
        std::fs::create_dir_all(self.manifests())?;
        // Write then rename, as editors and `kubectl`-style tools do.
        let tmp = self.dir.path().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests().join(file))?;
        Ok(())
    }

    fn start_portico(&mut self, extra: &[&str]) -> Result<()> {
        let child = self
            .topo
            .node
            .command(env!("CARGO_BIN_EXE_portico"))
            .args([
                "standalone",
                "--manifests",
                &self.manifests().display().to_string(),
                "--node",
                "n1",
                "--state",
                &self.state_file().display().to_string(),
                "--xdp",
                "eth0",
                "--xdp-mode",
                "generic",
                "--admin-socket",
                &self.socket().display().to_string(),
                "--router-id",
                NODE_IP,
                "--bpf-pin-dir",
                &self.pin_dir().display().to_string(),
                "--big-tcp",
                "eth0",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .spawn()
            .context("starting portico standalone")?;
        self.portico = Some(child);
        Ok(())
    }

    /// SIGTERM, then wait for the process to exit.
    fn stop_portico(&mut self) -> Result<()> {
        let Some(mut child) = self.portico.take() else {
            return Ok(());
        };
        // `ip netns exec` execs the program, so the child's pid is portico's.
        let pid = i32::try_from(child.id())?;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = child.wait()?;
        if !status.success() {
            bail!("portico exited with {status} on SIGTERM");
        }
        Ok(())
    }

    fn status(&self) -> Result<StatusReport> {
        portico::status::query(&self.socket())
    }

    fn tcp(&self, vip: IpAddr) -> Result<String> {
        let addr = SocketAddr::new(vip, 80);
        traffic::in_ns(&self.topo.client, move || traffic::tcp_once(addr))
    }

    fn udp(&self, vip: IpAddr) -> Result<String> {
        let addr = SocketAddr::new(vip, 80);
        traffic::in_ns(&self.topo.client, move || traffic::udp_once(addr))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.portico.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = portico_xdp::XdpProgram::unpin(self.pin_dir());
        let _ = std::process::Command::new("umount")
            .arg(&self.bpffs)
            .status();
        let _ = std::fs::remove_dir(&self.bpffs);
    }
}

/// Polls `f` until it returns `Some` (convergence, not speed: the bound only stops a broken
/// run from hanging).
fn wait_for<T>(what: &str, mut f: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}; last error: {last}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn saved_address(state: &Path, service: &str) -> Result<Option<IpAddr>> {
    let Ok(text) = std::fs::read_to_string(state) else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_str(&text)?;
    Ok(v["allocations"][format!("lab/{service}")][0]
        .as_str()
        .and_then(|s| s.parse().ok()))
}

fn host_route(vip: IpAddr) -> IpNet {
    IpNet::from(vip)
}

#[test]
fn standalone_turns_manifests_into_an_announced_address_that_carries_traffic() -> Result<()> {
    let mut lab = Lab::build()?;
    let _servers: Vec<Backend> = lab.topo.start_backends()?;
    let (be1, be2) = (topo::backend_ip(1), topo::backend_ip(2));
    lab.write("00-base.yaml", topo::BASE_MANIFESTS)?;
    lab.write("20-web.yaml", &topo::service_manifest("web", &[be1]))?;
    lab.start_portico(&[])?;

    // Address → state file and status; route at the router; TCP and UDP reach be1.
    let state = lab.state_file();
    let vip = wait_for("web's address in the state file", || {
        saved_address(&state, "web")
    })?;
    assert!("203.0.113.0/28".parse::<IpNet>()?.contains(&vip));
    let report = wait_for("status over the admin socket", || lab.status().map(Some))?;
    let web = report
        .services
        .iter()
        .find(|s| s.name == "web")
        .context("web in status")?;
    assert_eq!(web.addresses, [vip]);
    lab.topo.router.wait_routes(
        |r| r.iter().any(|r| r.prefix == host_route(vip)),
        Duration::from_secs(60),
    )?;
    wait_for("a TCP answer through the VIP", || Ok(lab.tcp(vip).ok()))?;
    assert_eq!(lab.tcp(vip)?, "be1");
    assert_eq!(lab.udp(vip)?, "be1");
    // The answers came through the XDP balancer (the node's stack has no listener on :80).
    let report = lab.status()?;
    let web = report
        .services
        .iter()
        .find(|s| s.name == "web")
        .context("web")?;
    assert!(web.new_flows >= 2 && web.announced, "{web:?}");
    let tx = report
        .datapath
        .iter()
        .find(|(n, _)| n == "tx")
        .map_or(0, |(_, v)| *v);
    assert!(tx > 0, "XDP_TX counter: {:?}", report.datapath);
    // BIG TCP on the uplink, as the kernel reports it.
    assert!(
        report.big_tcp.len() == 1
            && report.big_tcp[0].interface == "eth0"
            && report.big_tcp[0].enabled(),
        "{:?}",
        report.big_tcp
    );
    // The flows just made are tracked (read back from the conntrack tables).
    let tracked: u64 = report.conntrack.iter().map(|(_, v)| v).sum();
    assert!(
        tracked >= 1 && report.conntrack.iter().any(|(t, _)| t == "established"),
        "tracked flows: {:?}",
        report.conntrack
    );
    // Metrics: ready, and an exposition promtool accepts.
    let metrics: SocketAddr = "127.0.0.1:9464".parse()?;
    let (ready, _) = traffic::in_ns(&lab.topo.node, move || common::http_get(metrics, "/readyz"))?;
    assert!(ready.contains("200"), "{ready}");
    let (status, body) = traffic::in_ns(&lab.topo.node, move || {
        common::http_get(metrics, "/metrics")
    })?;
    assert!(status.contains("200"), "{status}");
    common::promtool_check(&body);
    assert!(
        body.contains("portico_bgp_session_established{peer=\"tor\",address=\"198.18.1.254\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("portico_xdp_conntrack_entries{table=\"established\"}"),
        "{body}"
    );

    // A second backend: new connections spread over both.
    lab.write("20-web.yaml", &topo::service_manifest("web", &[be1, be2]))?;
    let vip_addr = SocketAddr::new(vip, 80);
    wait_for("both backends answering", || {
        let seen = traffic::spread(
            &lab.topo.client,
            vip_addr,
            40,
            2,
            Duration::from_secs(30),
            traffic::tcp_once,
        )?;
        Ok((seen.len() == 2).then_some(()))
    })?;

    let report = lab.status()?;
    let web = report
        .services
        .iter()
        .find(|s| s.name == "web")
        .context("web")?;
    let hit: Vec<String> = web
        .backends
        .iter()
        .filter(|b| b.new_flows > 0)
        .map(|b| b.address.to_string())
        .collect();
    assert_eq!(hit, [be1.to_string(), be2.to_string()], "{web:?}");
    // What an operator types.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .args(["status", "--socket"])
        .arg(lab.socket())
        .output()?;
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    for want in ["lab/web", &vip.to_string(), "tor", "Established"] {
        assert!(
            table.contains(want),
            "`portico status` lacks {want}:\n{table}"
        );
    }

    // Shrinking the pool around the address keeps it.
    lab.write(
        "00-base.yaml",
        &topo::BASE_MANIFESTS.replace(
            "[{cidr: 203.0.113.0/28}]",
            &format!("[{{start: \"{vip}\", stop: 203.0.113.3}}]"),
        ),
    )?;
    wait_for("the shrunk pool in status", || {
        let r = lab.status()?;
        Ok(r.pools.iter().any(|p| p.v4_total == "4").then_some(()))
    })?;
    assert_eq!(saved_address(&state, "web")?, Some(vip));
    assert_eq!(lab.tcp(vip)?.len(), 3);

    // A broken file is reported with file and field; everything else keeps working.
    lab.write(
        "30-broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: lab}\nspec: {ports: [{port: eighty}]}\n",
    )?;
    let problem = wait_for("the broken file reported", || {
        let r = lab.status()?;
        Ok(r.problems
            .into_iter()
            .find(|p| p.contains("30-broken.yaml")))
    })?;
    assert!(
        problem.contains("spec.ports[0].port = \"eighty\""),
        "{problem}"
    );
    assert!(lab.tcp(vip).is_ok());

    // Restart: the same address, announced again, traffic flows again, and a connection
    // established before the restart carries on with the same backend (the XDP program and
    // its maps stay pinned; the new process adopts them).
    let mut long = traffic::in_ns(&lab.topo.client, move || traffic::LongLived::open(vip_addr))?;
    let first = long.backend.clone();
    lab.stop_portico()?;
    assert_eq!(long.exchange()?, first, "while portico is stopped");
    // Stopped with graceful restart negotiated: the router keeps the route meanwhile.
    assert!(
        lab.topo.router.route(host_route(vip))?.is_some(),
        "the router dropped the route although graceful restart was negotiated"
    );
    lab.start_portico(&[])?;
    let report = wait_for("status after the restart", || lab.status().map(Some))?;
    let web = report
        .services
        .iter()
        .find(|s| s.name == "web")
        .context("web")?;
    assert_eq!(web.addresses, [vip]);
    wait_for("TCP through the VIP after the restart", || {
        Ok(lab.tcp(vip).ok())
    })?;

    // Delete the Service: route withdrawn, XDP service gone.
    std::fs::remove_file(lab.manifests().join("20-web.yaml"))?;
    lab.topo.router.wait_routes(
        |r| !r.iter().any(|r| r.prefix == host_route(vip)),
        Duration::from_secs(60),
    )?;
    let report = wait_for("web gone from status", || {
        let r = lab.status()?;
        Ok(r.services.iter().all(|s| s.name != "web").then_some(r))
    })?;
    assert!(
        report.appliers.iter().all(|a| a.ok),
        "{:?}",
        report.appliers
    );
    assert_eq!(saved_address(&state, "web")?, None);
    lab.stop_portico()?;

    // `--shutdown withdraw`: Cease, so the router drops the routes at once; the address
    // link goes too.
    lab.write("20-web.yaml", &topo::service_manifest("web", &[be1]))?;
    lab.start_portico(&["--shutdown", "withdraw"])?;
    let vip = wait_for("web's address again", || saved_address(&state, "web"))?;
    lab.topo.router.wait_routes(
        |r| r.iter().any(|r| r.prefix == host_route(vip)),
        Duration::from_secs(60),
    )?;
    lab.stop_portico()?;
    assert!(
        lab.topo.router.route(host_route(vip))?.is_none(),
        "route still at the router"
    );
    let links = lab.topo.node.run(&["ip", "-o", "link", "show"])?;
    assert!(!links.contains("portico0"), "{links}");
    assert!(
        !lab.pin_dir().exists(),
        "pins left in {}",
        lab.pin_dir().display()
    );
    assert!(!links.contains("xdp"), "XDP still attached: {links}");
    Ok(())
}
