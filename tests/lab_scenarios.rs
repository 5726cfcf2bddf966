//! The lab's end-to-end scenarios, on the topology of `portico lab` (a BIRD router with
//! ECMP over two nodes running the real `portico standalone` with XDP, four backends, a
//! client) with the manifests of `deploy/examples/lab/`:
//!
//! - a Service's life: created → address → route at the router → traffic; deleted → route
//!   withdrawn and the XDP service gone;
//! - `externalTrafficPolicy: Local`: only nodes with a ready local endpoint announce;
//! - a backend going not-ready: no new flows to it, its existing flows drain;
//! - shrinking the pool keeps every address still inside it;
//! - a node failing: the router withdraws it, new flows go through the other node, flows
//!   through the other node are untouched (the interruption is printed);
//! - a node restarting gracefully: the router keeps its routes, and the node's XDP state
//!   (pinned on the lab's own bpffs) keeps forwarding (the loss is printed);
//! - direct server return, one scenario per DSR Service (`demo/direct`, IPv4 in IPIP;
//!   `demo/direct6`, IPv6 in IP6IP6; `demo/direct-gue`, IPv4 in GUE): TCP and UDP answered by
//!   be1 and be2, which see the client's own address; the nodes encapsulate (`dsr_encap`)
//!   and translate no reply, and packet sockets on the switch show the encapsulated requests
//!   toward the backends and the answers going from the backends to the router, none
//!   toward a node;
//! - NAT46 and NAT64 (`demo/nat46`, `demo/nat64`): the IPv4 client
//!   reaches the IPv6-only backend through an IPv4 address, the IPv6 client IPv4 backends
//!   through an IPv6 address, TCP and UDP.
//!
//! Each scenario builds its own lab; they run one at a time (a lab is four processes and
//! ten namespaces, and BGP hold timers of 3 s should not race a busy machine). Timings are
//! printed, never asserted. Needs root; fails (never skips) without it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use ipnet::IpNet;
use portico_integration::control;
use portico_integration::probe::Prober;
use portico_integration::progress::Progress;
use portico_integration::topology::{
    dsr_service, node_named, wait_for, DsrService, Lab, LabHandle, LabOptions, NodeStatus,
    NodeStop, BACKENDS, DSR_BACKENDS, GUE_PORT, NODES, SERVICE_PORT,
};
use portico_integration::traffic::{self, Answer, Capture, LongLived};

/// One lab at a time.
static ONE_LAB: Mutex<()> = Mutex::new(());

const CONVERGE: Duration = Duration::from_secs(60);
const BOTH: [&str; 2] = ["n1", "n2"];

struct Scenario {
    lab: Lab,
    _dir: tempfile::TempDir,
}

impl Scenario {
    /// A lab with the example manifests applied and converged.
    fn start() -> Result<Scenario> {
        let dir = tempfile::tempdir()?;
        let mut progress = Progress::human(Box::new(std::io::stderr()));
        let lab = Lab::build(
            LabOptions {
                portico: env!("CARGO_BIN_EXE_portico").into(),
                dir: dir.path().join("lab"),
                xdp_mode: "generic".into(),
            },
            &mut progress,
        )?;
        lab.handle().apply(&control::manifests(None)?)?;
        lab.handle().wait_converged(&BOTH, CONVERGE)?;
        Ok(Scenario { lab, _dir: dir })
    }

    fn h(&self) -> &LabHandle {
        self.lab.handle()
    }

    /// The service `demo/<name>` as every node reports it, once they agree.
    fn service(
        &self,
        name: &str,
    ) -> Result<BTreeMap<String, portico_integration::topology::ServiceStatus>> {
        let statuses = self.statuses(&BOTH)?;
        let mut out = BTreeMap::new();
        for (node, st) in statuses {
            if let Some(s) = st.services.into_iter().find(|s| s.name == name) {
                out.insert(node, s);
            }
        }
        Ok(out)
    }

    fn statuses(&self, nodes: &[&str]) -> Result<BTreeMap<String, NodeStatus>> {
        wait_for("the nodes to agree", CONVERGE, || {
            self.h().agreed_statuses(nodes)
        })
    }

    /// The address of `demo/<name>` of one family.
    fn address(&self, name: &str, v6: bool) -> Result<IpAddr> {
        let svc = self.service(name)?;
        let s = svc
            .values()
            .next()
            .with_context(|| format!("no service {name}"))?;
        s.addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv6() == v6)
            .with_context(|| format!("{name} has no {} address", if v6 { "IPv6" } else { "IPv4" }))
    }

    /// The nodes the router's kernel sends `addr` to.
    fn route_nodes(&self, addr: IpAddr) -> Result<Vec<String>> {
        Ok(self
            .h()
            .router_routes()?
            .into_iter()
            .find(|r| r.prefix == IpNet::from(addr))
            .map(|r| r.nodes())
            .unwrap_or_default())
    }

    fn wait_route(&self, addr: IpAddr, nodes: &[&str]) -> Result<()> {
        wait_for(
            &format!("the router to route {addr} via {nodes:?}"),
            CONVERGE,
            || {
                let have = self.route_nodes(addr)?;
                Ok((have == nodes).then_some(()))
            },
        )
    }

    /// `count` TCP exchanges (or UDP, `udp`) to `addr`:80 from the client; all must answer.
    fn answers(&self, addr: IpAddr, count: usize, udp: bool) -> Result<Vec<Answer>> {
        let exchange = if udp {
            traffic::udp_who
        } else {
            traffic::tcp_who
        };
        let got = traffic::answers(
            &self.h().ns("client")?,
            SocketAddr::new(addr, SERVICE_PORT),
            count,
            4,
            Duration::from_secs(60),
            exchange,
        )?;
        got.into_iter()
            .map(|r| r.map_err(|e| anyhow::anyhow!("{addr}: {e}")))
            .collect()
    }

    /// Opens `count` long-lived TCP connections to `addr`:80 from the client.
    fn long_lived(&self, addr: IpAddr, count: usize) -> Result<Vec<(LongLived, Answer)>> {
        let target = SocketAddr::new(addr, SERVICE_PORT);
        traffic::in_ns(&self.h().ns("client")?, move || {
            (0..count)
                .map(|_| {
                    let mut c = LongLived::open(target)?;
                    let who = c.who()?;
                    Ok((c, who))
                })
                .collect()
        })
    }

    /// Edits an applied manifest with `edit` and writes it back.
    fn edit(&self, file: &str, edit: impl FnOnce(String) -> String) -> Result<()> {
        let text = self.h().read_manifest(file)?;
        let new = edit(text.clone());
        assert_ne!(text, new, "the edit of {file} changed nothing");
        self.h().write_manifest(file, &new)
    }
}

fn nodes_of(answers: &[Answer]) -> BTreeSet<String> {
    answers
        .iter()
        .map(|a| {
            portico_integration::topology::node_of(a.seen_from.ip())
                .map_or_else(|| a.seen_from.ip().to_string(), |n| n.name.to_owned())
        })
        .collect()
}

fn backends_of(answers: &[Answer]) -> BTreeSet<String> {
    answers.iter().map(|a| a.backend.clone()).collect()
}

/// Exchanges a line on every connection from the client's namespace; returns per connection
/// whether it still works (and answers from the same backend).
fn still_working(lab: &Scenario, conns: Vec<(LongLived, Answer)>) -> Result<Vec<(Answer, bool)>> {
    traffic::in_ns(&lab.h().ns("client")?, move || {
        Ok(conns
            .into_iter()
            .map(|(mut c, who)| {
                let _ = c.set_timeout(Duration::from_secs(2));
                let ok = c.exchange().is_ok_and(|b| b == who.backend);
                (who, ok)
            })
            .collect())
    })
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_LAB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

const EXTRA: &str = r#"apiVersion: v1
kind: Service
metadata: {name: extra, namespace: demo}
spec:
  type: LoadBalancer
  loadBalancerClass: portico.io/lb
  ports: [{name: tcp, port: 80, protocol: TCP}, {name: udp, port: 80, protocol: UDP}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: extra-ipv4, namespace: demo, labels: {kubernetes.io/service-name: extra}}
addressType: IPv4
ports: [{name: tcp, port: 8080, protocol: TCP}, {name: udp, port: 8080, protocol: UDP}]
endpoints:
  - {addresses: ["198.18.1.1"], nodeName: n1, conditions: {ready: true}}
  - {addresses: ["198.18.1.2"], nodeName: n1, conditions: {ready: true}}
"#;

#[test]
fn a_service_gets_an_address_a_route_and_traffic_and_loses_them_when_deleted() -> Result<()> {
    let _one = lock();
    let lab = Scenario::start()?;
    let t0 = Instant::now();
    lab.h().write_manifest("50-extra.yaml", EXTRA)?;
    let vip = wait_for("extra's address on both nodes", CONVERGE, || {
        let svc = lab.service("extra")?;
        let addrs: BTreeSet<Vec<IpAddr>> = svc.values().map(|s| s.addresses.clone()).collect();
        Ok(
            (svc.len() == 2 && addrs.len() == 1 && svc.values().all(|s| s.announced))
                .then(|| svc.values().next().map(|s| s.addresses[0]))
                .flatten(),
        )
    })?;
    assert!("203.0.113.0/28".parse::<IpNet>()?.contains(&vip), "{vip}");
    lab.wait_route(vip, &BOTH)?;
    let answers = lab.answers(vip, 40, false)?;
    let backends = backends_of(&answers);
    assert!(
        backends.is_subset(&["be1", "be2"].map(String::from).into()),
        "{backends:?}"
    );
    assert_eq!(lab.answers(vip, 10, true)?.len(), 10);
    eprintln!(
        "lifecycle: created → traffic through {vip} in {} ms (nodes {:?}, backends {backends:?})",
        t0.elapsed().as_millis(),
        nodes_of(&answers)
    );

    let t1 = Instant::now();
    lab.h().remove_manifest("50-extra.yaml")?;
    lab.wait_route(vip, &[])?;
    wait_for("extra gone from both nodes", CONVERGE, || {
        Ok(lab.service("extra")?.is_empty().then_some(()))
    })?;
    for (node, st) in lab.statuses(&BOTH)? {
        assert!(
            st.appliers.iter().all(|a| a.ok),
            "{node}: {:?}",
            st.appliers
        );
        // The node runs with the lab's table size (`--conntrack-entries`).
        let capacity = st.conntrack.iter().find(|(t, _)| t == "capacity");
        assert_eq!(
            capacity.map(|(_, n)| *n),
            Some(u64::from(portico_lab::topology::LAB_CONNTRACK_ENTRIES)),
            "{node}: {:?}",
            st.conntrack
        );
    }
    eprintln!(
        "lifecycle: deleted → route withdrawn in {} ms",
        t1.elapsed().as_millis()
    );
    // The XDP service is gone too: sent straight to n1, the address answers no more.
    let rt = lab.h().ns("router")?;
    let n1 = node_named("n1")?.v4.to_string();
    rt.run(&[
        "ip",
        "route",
        "add",
        &format!("{vip}/32"),
        "via",
        &n1,
        "proto",
        "static",
    ])?;
    let target = SocketAddr::new(vip, SERVICE_PORT);
    let reached = traffic::in_ns(&lab.h().ns("client")?, move || {
        Ok(std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_ok())
    })?;
    rt.run(&[
        "ip",
        "route",
        "del",
        &format!("{vip}/32"),
        "proto",
        "static",
    ])?;
    assert!(
        !reached,
        "{vip} still answers on n1 after the Service was deleted"
    );
    Ok(())
}

#[test]
fn only_nodes_with_a_ready_local_endpoint_announce_a_local_service() -> Result<()> {
    let _one = lock();
    let lab = Scenario::start()?;
    let vip = lab.address("local", false)?;
    let svc = lab.service("local")?;
    assert!(svc["n2"].local && svc["n2"].announced, "{svc:?}");
    assert!(!svc["n1"].announced, "n1 has no local endpoint: {svc:?}");
    assert_eq!(lab.route_nodes(vip)?, ["n2"]);
    // Not SNATed: the backend sees the client's own address, TCP and UDP (be3 routes its
    // replies through n2, which translates their source back to the VIP).
    let client = IpAddr::V4(portico_integration::topology::CLIENT_V4);
    for udp in [false, true] {
        let answers = lab.answers(vip, 30, udp)?;
        assert_eq!(nodes_of(&answers), [client.to_string()].into(), "udp={udp}");
        assert_eq!(backends_of(&answers), ["be3".to_owned()].into());
    }
    let n2 = lab.h().node_status("n2")?;
    let drops: u64 = n2
        .services
        .iter()
        .filter(|s| s.name == "local")
        .map(|s| s.drops)
        .sum();
    assert_eq!(drops, 0, "n2 dropped packets of demo/local");

    // The endpoint moves to n1 (and be3 with it: its route goes through n1 now): so does
    // the announcement, and the client's address still reaches the backend.
    lab.edit("30-local.yaml", |t| {
        t.replace("nodeName: n2", "nodeName: n1")
    })?;
    let n1 = portico_integration::topology::node_named("n1")?
        .v4
        .to_string();
    lab.h()
        .ns("be3")?
        .run(&["ip", "-4", "route", "replace", "default", "via", &n1])?;
    lab.wait_route(vip, &["n1"])?;
    let answers = lab.answers(vip, 20, true)?;
    assert_eq!(nodes_of(&answers), [client.to_string()].into());
    assert_eq!(backends_of(&answers), ["be3".to_owned()].into());

    // No ready endpoint anywhere: nobody announces it.
    lab.edit("30-local.yaml", |t| {
        t.replace("ready: true", "ready: false")
    })?;
    lab.wait_route(vip, &[])?;
    let svc = lab.service("local")?;
    assert!(svc.values().all(|s| !s.announced), "{svc:?}");
    Ok(())
}

#[test]
fn a_backend_that_goes_not_ready_gets_no_new_flows_and_keeps_its_old_ones() -> Result<()> {
    let _one = lock();
    let lab = Scenario::start()?;
    let vip = lab.address("web", false)?;
    let conns = lab.long_lived(vip, 30)?;
    let on_be1 = conns.iter().filter(|(_, w)| w.backend == "be1").count();
    assert!(
        on_be1 > 0,
        "no connection landed on be1: {:?}",
        conns.iter().map(|c| &c.1).collect::<Vec<_>>()
    );

    // be1 terminating: not ready, still serving (Kubernetes' drain), in both slices.
    lab.edit("20-web.yaml", |t| {
        t.replace(
            r#"["198.18.1.1"], nodeName: n1, conditions: {ready: true}"#,
            r#"["198.18.1.1"], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}"#,
        )
        .replace(
            r#"["fd00:18:1::1"], nodeName: n1, conditions: {ready: true}"#,
            r#"["fd00:18:1::1"], nodeName: n1, conditions: {ready: false, serving: true, terminating: true}"#,
        )
    })?;
    wait_for("both nodes to see be1 draining", CONVERGE, || {
        let svc = lab.service("web")?;
        Ok((svc.len() == 2
            && svc
                .values()
                .all(|s| s.backends_ready == 3 && s.backends_total == 4))
        .then_some(()))
    })?;
    let fresh = lab.answers(vip, 60, false)?;
    assert!(
        !backends_of(&fresh).contains("be1"),
        "new flows reached be1: {:?}",
        backends_of(&fresh)
    );
    let old = still_working(&lab, conns)?;
    let broken: Vec<&Answer> = old.iter().filter(|(_, ok)| !ok).map(|(a, _)| a).collect();
    assert!(
        broken.is_empty(),
        "established flows broke while be1 drained: {broken:?}"
    );
    eprintln!(
        "drain: {on_be1} of {} established connections on be1 kept working; 60 new flows avoided it",
        old.len()
    );

    // be1 fails (not serving either): it leaves the backends; new flows still avoid it.
    lab.edit("20-web.yaml", |t| {
        t.replace(
            "ready: false, serving: true, terminating: true",
            "ready: false, serving: false",
        )
    })?;
    wait_for("both nodes to drop be1", CONVERGE, || {
        let svc = lab.service("web")?;
        Ok((svc.len() == 2 && svc.values().all(|s| s.backends_total == 3)).then_some(()))
    })?;
    let fresh = lab.answers(vip, 30, true)?;
    assert!(
        !backends_of(&fresh).contains("be1"),
        "{:?}",
        backends_of(&fresh)
    );
    Ok(())
}

#[test]
fn shrinking_the_pool_keeps_every_address_still_inside_it() -> Result<()> {
    let _one = lock();
    let lab = Scenario::start()?;
    let before: BTreeMap<String, Vec<IpAddr>> = lab
        .statuses(&BOTH)?
        .remove("n1")
        .context("n1")?
        .services
        .into_iter()
        .map(|s| (s.id(), s.addresses))
        .collect();
    let v4: Vec<IpAddr> = before
        .values()
        .flatten()
        .copied()
        .filter(IpAddr::is_ipv4)
        .collect();
    let v6: Vec<IpAddr> = before
        .values()
        .flatten()
        .copied()
        .filter(IpAddr::is_ipv6)
        .collect();
    let (lo, hi) = (
        v4.iter().min().context("v4")?,
        v4.iter().max().context("v4")?,
    );
    let (lo6, hi6) = (
        v6.iter().min().context("v6")?,
        v6.iter().max().context("v6")?,
    );
    // From 16 + 256 addresses down to exactly the used ranges.
    lab.edit("00-pool.yaml", |t| {
        t.replace(
            "- cidr: 203.0.113.0/28",
            &format!("- {{start: \"{lo}\", stop: \"{hi}\"}}"),
        )
        .replace(
            "- cidr: fd00:203::/120",
            &format!("- {{start: \"{lo6}\", stop: \"{hi6}\"}}"),
        )
    })?;
    // The addresses need not be contiguous (the DSR Services ask for fixed ones).
    let want_v4 = match (lo, hi) {
        (IpAddr::V4(lo), IpAddr::V4(hi)) => (u32::from(*hi) - u32::from(*lo) + 1).to_string(),
        _ => bail!("IPv4 addresses expected: {lo} {hi}"),
    };
    let want_v6 = match (lo6, hi6) {
        (IpAddr::V6(lo), IpAddr::V6(hi)) => (u128::from(*hi) - u128::from(*lo) + 1).to_string(),
        _ => bail!("IPv6 addresses expected: {lo6} {hi6}"),
    };
    wait_for("both nodes to apply the smaller pool", CONVERGE, || {
        let st = lab.statuses(&BOTH)?;
        Ok(st
            .values()
            .all(|s| {
                s.pools
                    .iter()
                    .any(|p| p.v4_total == want_v4 && p.v6_total == want_v6)
            })
            .then_some(()))
    })?;
    for (node, st) in lab.statuses(&BOTH)? {
        let after: BTreeMap<String, Vec<IpAddr>> = st
            .services
            .into_iter()
            .map(|s| (s.id(), s.addresses))
            .collect();
        assert_eq!(
            after, before,
            "{node} moved an address that is still in the pool"
        );
    }
    let (_, routes) = lab.h().wait_converged(&BOTH, CONVERGE)?;
    for addr in before.values().flatten() {
        assert!(
            routes.iter().any(|r| r.prefix == IpNet::from(*addr)),
            "{addr} lost its route"
        );
        lab.answers(*addr, 4, false)?;
    }
    Ok(())
}

#[test]
fn a_failed_node_is_withdrawn_and_flows_through_the_other_node_are_untouched() -> Result<()> {
    let _one = lock();
    let mut lab = Scenario::start()?;
    let vip = lab.address("web", false)?;
    let conns = lab.long_lived(vip, 40)?;
    let via = |n: &str| {
        conns
            .iter()
            .filter(|(_, w)| nodes_of(std::slice::from_ref(w)).contains(n))
            .count()
    };
    let (via_n1, via_n2) = (via("n1"), via("n2"));
    assert!(
        via_n1 > 0 && via_n2 > 0,
        "ECMP put every connection on one node: n1 {via_n1}, n2 {via_n2}"
    );
    let client = lab.h().ns("client")?;
    let prober = Prober::start(
        &client,
        SocketAddr::new(vip, SERVICE_PORT),
        Duration::from_millis(10),
        Duration::from_millis(500),
    );
    std::thread::sleep(Duration::from_millis(500));

    let failed_at = prober.now();
    lab.lab.stop_node("n1", NodeStop::Failure)?;
    let t = Instant::now();
    lab.wait_route(vip, &["n2"])?;
    let withdrawn_after = t.elapsed();
    std::thread::sleep(Duration::from_millis(1000));
    let report = prober.finish()?;

    let fresh = lab.answers(vip, 40, false)?;
    assert_eq!(
        nodes_of(&fresh),
        ["n2".to_owned()].into(),
        "new flows after the withdrawal"
    );
    let old = still_working(&lab, conns)?;
    let n2_broken = old
        .iter()
        .filter(|(w, ok)| !ok && nodes_of(std::slice::from_ref(w)).contains("n2"))
        .count();
    let n1_broken = old
        .iter()
        .filter(|(w, ok)| !ok && nodes_of(std::slice::from_ref(w)).contains("n1"))
        .count();
    assert_eq!(
        n2_broken, 0,
        "established flows through n2 broke when n1 failed"
    );
    let before = report.lost_between(Duration::ZERO, failed_at);
    assert_eq!(before, 0, "probes were lost before the failure");
    eprintln!(
        "node failure: the router withdrew n1 {} ms after it failed (hold time 3 s); UDP probes: {}; \
         established TCP through n2: {via_n2} of {via_n2} untouched; through n1: {n1_broken} of {via_n1} broken",
        withdrawn_after.as_millis(),
        report.summary()
    );

    // n1 comes back: ECMP again.
    lab.lab.start_node("n1")?;
    lab.wait_route(vip, &BOTH)?;
    let back = lab.answers(vip, 40, false)?;
    assert_eq!(nodes_of(&back).len(), 2, "{:?}", nodes_of(&back));
    Ok(())
}

#[test]
fn a_gracefully_restarting_node_keeps_its_routes_at_the_router() -> Result<()> {
    let _one = lock();
    let mut lab = Scenario::start()?;
    let (_, routes) = lab.h().wait_converged(&BOTH, CONVERGE)?;
    let vip = lab.address("web", false)?;
    let vip6 = lab.address("web", true)?;
    let conns = lab.long_lived(vip, 30)?;
    let client = lab.h().ns("client")?;
    let prober = Prober::start(
        &client,
        SocketAddr::new(vip, SERVICE_PORT),
        Duration::from_millis(10),
        Duration::from_millis(500),
    );
    let prober6 = Prober::start(
        &client,
        SocketAddr::new(vip6, SERVICE_PORT),
        Duration::from_millis(10),
        Duration::from_millis(500),
    );
    std::thread::sleep(Duration::from_millis(500));

    // Watch the router's routes while n1 restarts: they must keep n1 as a next hop.
    let h = lab.h().clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let want = routes.clone();
        std::thread::spawn(move || -> Result<usize> {
            let mut polls = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let now = h.router_routes()?;
                if now != want {
                    bail!(
                        "the router's routes changed during the restart: {now:?}, before {want:?}"
                    );
                }
                polls += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(polls)
        })
    };
    let down_at = prober.now();
    lab.lab.stop_node("n1", NodeStop::Graceful)?;
    // Down for a moment, as a process restart is.
    std::thread::sleep(Duration::from_millis(500));
    let sessions = lab.h().router_sessions()?;
    assert!(
        sessions
            .iter()
            .filter(|s| s.node == "n1")
            .all(|s| s.state != "Established"),
        "{sessions:?}"
    );
    lab.lab.start_node("n1")?;
    wait_for("n1's sessions back", CONVERGE, || {
        let s = lab.h().router_sessions()?;
        Ok(s.iter().all(|s| s.state == "Established").then_some(()))
    })?;
    let back_at = prober.now();
    lab.h().wait_converged(&BOTH, CONVERGE)?;
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let polls = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))??;
    let (r4, r6) = (prober.finish()?, prober6.finish()?);
    assert!(polls > 0);
    let old = still_working(&lab, conns)?;
    let on = |n: &str, broken: bool| {
        old.iter()
            .filter(|(w, ok)| *ok != broken && nodes_of(std::slice::from_ref(w)).contains(n))
            .count()
    };
    assert_eq!(
        on("n2", true),
        0,
        "established flows through n2 broke while n1 restarted"
    );
    eprintln!(
        "graceful restart: established TCP through n1: {} of {} broken (XDP stays attached \
         with its pinned maps while no process runs; the new one adopts them); through n2: \
         {} of {} untouched",
        on("n1", true),
        on("n1", true) + on("n1", false),
        on("n2", false),
        on("n2", false)
    );
    let after = lab.answers(vip, 40, false)?;
    assert_eq!(nodes_of(&after).len(), 2, "{:?}", nodes_of(&after));
    for (family, r) in [("IPv4", &r4), ("IPv6", &r6)] {
        eprintln!(
            "graceful restart ({family}): routes kept at the router ({polls} checks); n1 down to back {} ms; \
             UDP probes: {}; lost while n1 restarted: {} of {}",
            (back_at - down_at).as_millis(),
            r.summary(),
            r.lost_between(down_at, back_at + Duration::from_secs(1)),
            r.sent_between(down_at, back_at + Duration::from_secs(1)),
        );
    }
    Ok(())
}

/// The IP frames a capture has seen since the last call, by their outer header; other
/// frames are left out.
fn frames(c: &Capture) -> Vec<Frame> {
    c.frames().iter().flat_map(|f| Frame::parse(f)).collect()
}

/// The outer IP header of a captured frame, and its UDP destination port if it carries UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    src: IpAddr,
    dst: IpAddr,
    /// The outer header's protocol / next header (after IPv6 extension headers).
    proto: u8,
    udp_dst: Option<u16>,
}

impl Frame {
    fn parse(frame: &[u8]) -> Option<Frame> {
        let p = SlicedPacket::from_ethernet(frame).ok()?;
        let (src, dst) = match p.net.as_ref()? {
            NetSlice::Ipv4(ip) => (
                IpAddr::V4(ip.header().source_addr()),
                IpAddr::V4(ip.header().destination_addr()),
            ),
            NetSlice::Ipv6(ip) => (
                IpAddr::V6(ip.header().source_addr()),
                IpAddr::V6(ip.header().destination_addr()),
            ),
            NetSlice::Arp(_) => return None,
        };
        let proto = p.ip_payload()?.ip_number.0;
        let udp_dst = match &p.transport {
            Some(TransportSlice::Udp(u)) => Some(u.destination_port()),
            _ => None,
        };
        Some(Frame {
            src,
            dst,
            proto,
            udp_dst,
        })
    }

    /// Whether this is a DSR outer header of `d`'s kind (IPIP: protocol 4; IP6IP6: next
    /// header 41; GUE: UDP to [`GUE_PORT`]).
    fn is_encapsulated_as(&self, d: &DsrService) -> bool {
        match d.outer() {
            "IPIP" => self.proto == 4,
            "IP6IP6" => self.proto == 41,
            _ => self.proto == 17 && self.udp_dst == Some(GUE_PORT),
        }
    }

    /// Whether this is any DSR outer header (IPIP, IPv6 in IP, GUE).
    fn is_encapsulated(&self) -> bool {
        self.proto == 4 || self.proto == 41 || (self.proto == 17 && self.udp_dst == Some(GUE_PORT))
    }
}

/// A node's XDP counter `name`.
fn counter(st: &NodeStatus, name: &str) -> Result<u64> {
    st.datapath
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| *v)
        .with_context(|| format!("{} reports no counter {name}", st.node))
}

#[test]
fn a_direct_server_return_service_is_answered_by_its_backends_around_the_nodes() -> Result<()> {
    dsr_is_answered_by_its_backends_around_the_nodes("demo/direct")
}

#[test]
fn an_ipv6_direct_server_return_service_is_answered_by_its_backends_around_the_nodes() -> Result<()>
{
    dsr_is_answered_by_its_backends_around_the_nodes("demo/direct6")
}

#[test]
fn a_gue_direct_server_return_service_is_answered_by_its_backends_around_the_nodes() -> Result<()> {
    dsr_is_answered_by_its_backends_around_the_nodes("demo/direct-gue")
}

/// TCP and UDP flows from the client to the DSR Service `service`: answered by every one of
/// its backends, which see the client's own address; the nodes encapsulate (`dsr_encap`)
/// and translate no reply (`reply_nat`); on the switch's ports the requests reach the
/// backends inside the Service's outer header only, and the answers (VIP → client) go
/// from the backends to the router, none toward a node.
fn dsr_is_answered_by_its_backends_around_the_nodes(service: &str) -> Result<()> {
    const FLOWS: usize = 40;
    let d = *dsr_service(service)?;
    let _one = lock();
    let lab = Scenario::start()?;
    let name = service.split_once('/').map_or(service, |(_, n)| n);
    let vip = lab.address(name, d.vip.is_ipv6())?;
    assert_eq!(
        vip, d.vip,
        "{service} has another address than its backends hold"
    );
    lab.wait_route(vip, &BOTH)?;

    // Packet sockets on the switch's ports: toward each node, the router and the backends.
    let sw = lab.h().ns("switch")?;
    let mut captures = BTreeMap::new();
    for port in ["n1", "n2", "rt"].into_iter().chain(DSR_BACKENDS) {
        captures.insert(port, Capture::open(&sw, port)?);
    }
    let before = lab.statuses(&BOTH)?;
    let tcp = lab.answers(vip, FLOWS, false)?;
    let udp = lab.answers(vip, FLOWS, true)?;
    // Late FINs and ACKs still in flight are not needed: every answer already crossed.
    let after = lab.statuses(&BOTH)?;

    // Answered by the Service's backends, which saw the client's own address.
    let client = d.client();
    for (proto, answers) in [("TCP", &tcp), ("UDP", &udp)] {
        assert_eq!(
            backends_of(answers),
            DSR_BACKENDS.map(String::from).into(),
            "{service} {proto}: {FLOWS} flows over be1 and be2"
        );
        for a in answers.iter() {
            assert_eq!(
                a.seen_from.ip(),
                client,
                "{service} {proto}: {} saw {} instead of the client",
                a.backend,
                a.seen_from
            );
        }
    }

    // The nodes encapsulated every request and translated no reply.
    let mut encapsulated = BTreeMap::new();
    for (node, st) in &after {
        let was = &before[node];
        let encap = counter(st, "dsr_encap")? - counter(was, "dsr_encap")?;
        let reply_nat = counter(st, "reply_nat")? - counter(was, "reply_nat")?;
        assert_eq!(reply_nat, 0, "{node} translated replies of {service}");
        encapsulated.insert(node.clone(), encap);
    }
    let total: u64 = encapsulated.values().sum();
    // At least a SYN, an ACK and the request of each TCP flow; one datagram per UDP flow.
    let want = u64::try_from(4 * FLOWS)?;
    assert!(
        total >= want,
        "{service}: dsr_encap grew by {encapsulated:?} only (at least {want} expected)"
    );

    // On the wire: the outer header from the nodes to the backends; answers from the VIP to
    // the client from the backends toward the router, none toward a node.
    let frames: BTreeMap<&str, Vec<Frame>> =
        captures.iter().map(|(p, c)| (*p, frames(c))).collect();
    let answer = |f: &Frame| f.src == vip && f.dst == client;
    let count =
        |port: &str, pick: &dyn Fn(&Frame) -> bool| frames[port].iter().filter(|f| pick(f)).count();
    for node in ["n1", "n2"] {
        assert_eq!(
            count(node, &answer),
            0,
            "answers of {service} went to {node}"
        );
    }
    let to_router = count("rt", &answer);
    assert!(
        to_router >= 3 * FLOWS,
        "only {to_router} answers from {vip} reached the router"
    );
    let from_node = |f: &Frame| {
        NODES
            .iter()
            .any(|n| f.src == IpAddr::V4(n.v4) || f.src == IpAddr::V6(n.v6))
    };
    let mut tunnelled_total = 0;
    for be in DSR_BACKENDS {
        let spec = BACKENDS
            .iter()
            .find(|b| b.name == be)
            .context("a DSR backend")?;
        let addr = match vip {
            IpAddr::V4(_) => IpAddr::V4(spec.v4.context("a DSR backend has an IPv4 address")?),
            IpAddr::V6(_) => IpAddr::V6(spec.v6),
        };
        let to_backend = |f: &Frame| from_node(f) && f.dst == addr;
        let tunnelled = count(be, &|f| to_backend(f) && f.is_encapsulated_as(&d));
        let other = count(be, &|f| {
            to_backend(f) && f.is_encapsulated() && !f.is_encapsulated_as(&d)
        });
        let plain = count(be, &|f| f.src == client && f.dst == vip);
        assert!(
            tunnelled > 0,
            "no {} packet from a node reached {be}",
            d.outer()
        );
        assert_eq!(
            other,
            0,
            "{be} got packets of {service} in another outer header than {}",
            d.outer()
        );
        assert_eq!(
            plain, 0,
            "{be} got the client's packets without an outer header"
        );
        let answered = count(be, &answer);
        assert!(answered > 0, "{be} sent no answer from {vip}");
        tunnelled_total += tunnelled;
    }
    eprintln!(
        "direct server return, {service} ({}): {FLOWS} TCP and {FLOWS} UDP flows to {vip} \
         answered by {:?}; dsr_encap per node {encapsulated:?}, reply_nat +0; {} frames to \
         the backends {tunnelled_total}; answers backend → router {to_router}, toward n1 and \
         n2 0",
        d.outer(),
        backends_of(&tcp),
        d.outer()
    );
    Ok(())
}

/// Issue 13, through the whole system (manifest → plan → XDP): the IPv4 client reaches the
/// IPv6-only backend be4 through `demo/nat46`'s IPv4 address, and the IPv6 client reaches be1
/// and be2 over IPv4 through `demo/nat64`'s IPv6 address (`deploy/examples/lab/80-xlat.yaml`:
/// a Service port whose endpoint slices are all of the other family), TCP and UDP; each
/// backend sees a node's address of its own family, and the nodes count the translations
/// (`xlat`).
#[test]
fn ipv4_clients_reach_ipv6_only_backends_and_ipv6_clients_ipv4_ones() -> Result<()> {
    let _one = lock();
    let lab = Scenario::start()?;
    let vip46 = wait_for("nat46's address", CONVERGE, || {
        Ok(lab.address("nat46", false).ok())
    })?;
    let vip64 = wait_for("nat64's address", CONVERGE, || {
        Ok(lab.address("nat64", true).ok())
    })?;
    lab.wait_route(vip46, &BOTH)?;
    lab.wait_route(vip64, &BOTH)?;
    let before = lab.statuses(&BOTH)?;

    for (vip, want, v6_backends) in [
        (vip46, BTreeSet::from(["be4".to_owned()]), true),
        (
            vip64,
            BTreeSet::from(["be1".to_owned(), "be2".to_owned()]),
            false,
        ),
    ] {
        for udp in [false, true] {
            let answers = lab.answers(vip, 40, udp)?;
            let backends = backends_of(&answers);
            assert!(
                backends.is_subset(&want) && !backends.is_empty(),
                "{vip} ({}): answered by {backends:?}, want {want:?}",
                if udp { "UDP" } else { "TCP" }
            );
            for a in &answers {
                let from = a.seen_from.ip();
                assert!(
                    from.is_ipv6() == v6_backends
                        && portico_integration::topology::node_of(from).is_some(),
                    "{vip}: {} saw {from}, not a node's address of its own family",
                    a.backend
                );
            }
            eprintln!(
                "xlat: {vip} {}: 40 answers by {backends:?} through {:?}",
                if udp { "UDP" } else { "TCP" },
                nodes_of(&answers)
            );
        }
    }

    let after = lab.statuses(&BOTH)?;
    let mut translated = 0;
    for node in BOTH {
        translated += counter(&after[node], "xlat")? - counter(&before[node], "xlat")?;
    }
    // 160 exchanges, each at least a request and an answer translated.
    assert!(
        translated >= 320,
        "the nodes translated {translated} packets"
    );
    Ok(())
}
