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
use portico_integration::peers::{Neighbor, PeerConfig, PeerKind, RealPeer};
use portico_integration::traffic::{self, Backend};
use portico_integration::{require_root, NetNs, TestNet};

const NODE_IP: &str = "198.18.1.10";
const ROUTER_LAN: &str = "198.18.1.254";
const ROUTER_CLIENT_SIDE: &str = "198.18.0.254";
const CLIENT_IP: &str = "198.18.0.1";
const BACKEND_PORT: u16 = 8080;

fn backend_ip(i: u8) -> String {
    format!("198.18.1.{i}")
}

struct Lab {
    net: TestNet,
    client: NetNs,
    node: NetNs,
    backends: Vec<NetNs>,
    router: RealPeer,
    dir: tempfile::TempDir,
    portico: Option<Child>,
}

impl Lab {
    fn build() -> Result<Lab> {
        require_root("the standalone end-to-end test")?;
        let mut net = TestNet::new()?;
        let client = net.add_ns("cl")?;
        let rt = net.add_ns("rt")?;
        let sw = net.add_ns("sw")?;
        let node = net.add_ns("n1")?;
        net.veth(&client, "eth0", &rt, "eth0")?;
        net.veth(&rt, "lan", &sw, "rt")?;
        net.veth(&node, "eth0", &sw, "n1")?;
        sw.run(&["ip", "link", "add", "br0", "type", "bridge"])?;
        sw.run(&["ip", "link", "set", "br0", "up"])?;
        for port in ["rt", "n1"] {
            sw.run(&["ip", "link", "set", port, "master", "br0"])?;
        }
        let mut backends = Vec::new();
        for i in 1..=2u8 {
            let be = net.add_ns(&format!("be{i}"))?;
            let port = format!("be{i}");
            net.veth(&be, "eth0", &sw, &port)?;
            sw.run(&["ip", "link", "set", &port, "master", "br0"])?;
            be.run(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", backend_ip(i)),
                "dev",
                "eth0",
            ])?;
            be.run(&["ip", "route", "add", "default", "via", ROUTER_LAN])?;
            backends.push(be);
        }
        client.run(&[
            "ip",
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "eth0",
        ])?;
        client.run(&["ip", "route", "add", "default", "via", ROUTER_CLIENT_SIDE])?;
        rt.run(&[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER_CLIENT_SIDE}/24"),
            "dev",
            "eth0",
        ])?;
        rt.run(&[
            "ip",
            "addr",
            "add",
            &format!("{ROUTER_LAN}/24"),
            "dev",
            "lan",
        ])?;
        rt.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        node.run(&["ip", "addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"])?;
        node.run(&["ip", "route", "add", "default", "via", ROUTER_LAN])?;
        node.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        // Checksums are finished in software before XDP sees the frames (generic XDP on veth).
        for ns in [&client, &node, &rt] {
            ns.run(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        rt.run(&["ethtool", "-K", "lan", "tx", "off"])?;
        for be in &backends {
            be.run(&["ethtool", "-K", "eth0", "tx", "off"])?;
        }
        let router = RealPeer::start(
            &rt,
            PeerConfig::new(PeerKind::Bird, ROUTER_LAN.parse()?, 64500)
                .local_addr(ROUTER_LAN.parse()?)
                .kernel_export()
                .neighbor(Neighbor::new(NODE_IP.parse()?, 64512).graceful_restart(60)),
        )?;
        Ok(Lab {
            net,
            client,
            node,
            backends,
            router,
            dir: tempfile::tempdir()?,
            portico: None,
        })
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

    fn start_portico(&mut self) -> Result<()> {
        let child = self
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
            ])
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
        traffic::in_ns(&self.client, move || traffic::tcp_once(addr))
    }

    fn udp(&self, vip: IpAddr) -> Result<String> {
        let addr = SocketAddr::new(vip, 80);
        traffic::in_ns(&self.client, move || traffic::udp_once(addr))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut c) = self.portico.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = &self.net;
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

const POOL: &str = r#"apiVersion: portico.io/v1alpha1
kind: AddressPool
metadata: {name: lab}
spec:
  blocks: [{cidr: 203.0.113.0/28}]
"#;

const BGP: &str = r#"apiVersion: portico.io/v1alpha1
kind: BGPPeer
metadata: {name: tor}
spec:
  myASN: 64512
  peerASN: 64500
  peerAddress: 198.18.1.254
  holdTime: 9
  connectRetryTime: 1
  gracefulRestart: {enabled: true, restartTime: 60}
---
apiVersion: portico.io/v1alpha1
kind: BGPAdvertisement
metadata: {name: all}
spec: {}
"#;

fn service(name: &str, backends: &[u8]) -> String {
    let mut s = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: lab}}
spec:
  type: LoadBalancer
  loadBalancerClass: portico.io/lb
  ports: [{{name: tcp, port: 80, protocol: TCP}}, {{name: udp, port: 80, protocol: UDP}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: {name}-1, namespace: lab, labels: {{kubernetes.io/service-name: {name}}}}}
addressType: IPv4
ports: [{{name: tcp, port: {BACKEND_PORT}, protocol: TCP}}, {{name: udp, port: {BACKEND_PORT}, protocol: UDP}}]
endpoints:
"#
    );
    for i in backends {
        s.push_str(&format!(
            "  - {{addresses: [\"{}\"], nodeName: n1, conditions: {{ready: true}}}}\n",
            backend_ip(*i)
        ));
    }
    s
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
    let _servers: Vec<Backend> = lab
        .backends
        .iter()
        .enumerate()
        .map(|(i, be)| {
            let addr = SocketAddr::new(backend_ip(i as u8 + 1).parse()?, BACKEND_PORT);
            Backend::start(be, &format!("be{}", i + 1), addr)
        })
        .collect::<Result<_>>()?;
    lab.write("00-pool.yaml", POOL)?;
    lab.write("10-bgp.yaml", BGP)?;
    lab.write("20-web.yaml", &service("web", &[1]))?;
    lab.start_portico()?;

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
    lab.router.wait_routes(
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
    // Metrics: ready, and an exposition promtool accepts.
    let metrics: SocketAddr = "127.0.0.1:9464".parse()?;
    let (ready, _) = traffic::in_ns(&lab.node, move || common::http_get(metrics, "/readyz"))?;
    assert!(ready.contains("200"), "{ready}");
    let (status, body) = traffic::in_ns(&lab.node, move || common::http_get(metrics, "/metrics"))?;
    assert!(status.contains("200"), "{status}");
    common::promtool_check(&body);
    assert!(
        body.contains("portico_bgp_session_established{peer=\"tor\",address=\"198.18.1.254\"} 1"),
        "{body}"
    );

    // A second backend: new connections spread over both.
    lab.write("20-web.yaml", &service("web", &[1, 2]))?;
    let vip_addr = SocketAddr::new(vip, 80);
    wait_for("both backends answering", || {
        let seen = traffic::spread(
            &lab.client,
            vip_addr,
            40,
            2,
            Duration::from_secs(30),
            traffic::tcp_once,
        )?;
        Ok((seen.len() == 2).then_some(()))
    })?;

    // Shrinking the pool around the address keeps it.
    lab.write(
        "00-pool.yaml",
        &POOL.replace(
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

    // Restart: the same address, announced again, traffic flows again.
    lab.stop_portico()?;
    lab.start_portico()?;
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
    lab.router.wait_routes(
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
    Ok(())
}
