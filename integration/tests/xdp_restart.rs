//! Restarting the balancer without dropping traffic: maps and XDP links pinned in bpffs
//! (`XdpProgram::load_pinned`), the balancer's state adopted by the next process
//! (`XdpBalancer::adopt`), the program replaced inside the pinned links.
//!
//! ```text
//!  client ──veth── lb(eth0)   lb(eth1) ──veth── sw (bridge) ──veth── be1, be2, be3
//! ```
//! A process exit is simulated by dropping the balancer: this process then holds no handle
//! on the program, its maps or its links, exactly as after an exit. Each test pins under its
//! own directory (`/sys/fs/bpf/ptc-<pid>-<seq>-<what>`), removed on success and failure.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use etherparse::PacketBuilder;
use portico_integration::{
    fibnet,
    lab::{self, Family},
    require_root,
    traffic::{self, LongLived},
    NetNs, TestNet,
};
use portico_xdp::{
    verdict, AttachMode, BackendSpec, Balancer, Encapsulation, Forwarding, LoadOptions, NodeConfig,
    Protocol, ServiceKey, ServiceSpec, XdpBalancer, XdpProgram,
};
use portico_xdp_common::stat;

/// Map sizes of the LB node's program.
fn options() -> LoadOptions {
    LoadOptions {
        max_services: 16,
        max_backends: 64,
        ring_size: 4093,
        conntrack_entries: 65536,
        ..LoadOptions::default()
    }
}

/// A pin directory of this test process, unpinned (and so detached) when dropped.
struct PinDir(PathBuf);

impl PinDir {
    fn new(what: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        sweep_dead_pin_dirs();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!(
            "/sys/fs/bpf/ptc-{}-{seq}-{what}",
            std::process::id()
        ));
        let _ = XdpProgram::unpin(&path);
        Self(path)
    }

    fn entries(&self) -> BTreeSet<String> {
        std::fs::read_dir(&self.0)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = XdpProgram::unpin(&self.0) {
            eprintln!("unpinning {}: {e}", self.0.display());
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes pin directories left by test processes that no longer exist.
fn sweep_dead_pin_dirs() {
    let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix("ptc-")
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = XdpProgram::unpin(entry.path());
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// The id of the XDP program attached to `iface` in `ns`, as `ip link` reports it.
fn attached_program(ns: &NetNs, iface: &str) -> Option<u64> {
    let out = ns.run(&["ip", "-j", "link", "show", "dev", iface]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    json[0]["xdp"]["prog"]["id"].as_u64()
}

/// Waits up to a second for `iface` in `ns` to have no XDP program: the kernel frees a link
/// whose last pin went away after an RCU grace period, not at once.
fn wait_detached(ns: &NetNs, iface: &str) -> Option<u64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let id = attached_program(ns, iface);
        if id.is_none() || std::time::Instant::now() > deadline {
            return id;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Established connections on every backend, as (backend, local, peer): the peer is the
/// node's SNAT address and port of the flow.
fn backend_connections(t: &lab::Topology) -> BTreeSet<(usize, String, String)> {
    let mut out = BTreeSet::new();
    for (i, be) in t.backends.iter().enumerate() {
        let ss = be.run(&["ss", "-Htn", "state", "established"]).unwrap();
        for line in ss.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let [_, _, local, peer, ..] = fields[..] {
                out.insert((i + 1, local.to_owned(), peer.to_owned()));
            }
        }
    }
    out
}

fn counter(b: &XdpBalancer, name: &str) -> u64 {
    b.datapath_counters()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

/// One process's start: load from the pins, adopt, configure, upsert, attach.
fn start(
    t: &lab::Topology,
    pins: &PinDir,
    mode: AttachMode,
    specs: &[&ServiceSpec],
) -> XdpBalancer {
    let program = XdpProgram::load_pinned(options(), &pins.0).unwrap();
    let mut b = XdpBalancer::adopt(program).unwrap();
    b.configure_node(&t.node_config().unwrap()).unwrap();
    for spec in specs {
        b.upsert_service(spec).unwrap();
    }
    let _in = t.lb.enter().unwrap();
    for iface in ["eth0", "eth1"] {
        b.program_mut().attach(iface, mode).unwrap();
    }
    b
}

fn exchange_all(long: &mut [LongLived], when: &str) {
    for c in long.iter_mut() {
        for _ in 0..3 {
            let who = c
                .exchange()
                .unwrap_or_else(|e| panic!("{when}: connection to {} broke: {e}", c.backend));
            assert_eq!(who, c.backend, "{when}: a tracked connection moved");
        }
    }
}

fn restart_keeps_connections(mode: AttachMode, v6: bool) {
    let f = Family { v6 };
    let t = lab::topology(f).unwrap();
    let _servers = t.start_backends().unwrap();
    let _peers = t.start_peer_programs(mode).unwrap();
    let pins = PinDir::new("restart");
    let vip = SocketAddr::new(f.vip(), lab::VIP_PORT);
    // Uneven weights and a draining backend: the adopted specs must carry them; so must a
    // service that keeps client sources (its backends route back through the LB node).
    let tcp = lab::service(f, Protocol::Tcp, &[Some(1), Some(2), Some(1)]);
    let mut udp = lab::service(f, Protocol::Udp, &[Some(1), Some(0), Some(1)]);
    udp.preserve_source = true;
    for be in &t.backends {
        be.run(&["ip", f.ip(), "route", "add", "default", "via", f.snat()])
            .unwrap();
    }

    // First process.
    let mut first = start(&t, &pins, mode, &[&tcp, &udp]);
    assert!(
        !first.program().reused_pins(),
        "a fresh directory has no pins"
    );
    // be1 leaves and comes back: its id's generation is now 2, which a balancer starting
    // from nothing would not know (it would hand the id out at generation 1, and every
    // tracked flow to be1 would be balanced anew, with a new SNAT port).
    first
        .upsert_service(&lab::service(f, Protocol::Tcp, &[None, Some(2), Some(1)]))
        .unwrap();
    first.upsert_service(&tcp).unwrap();
    let first_id = u64::from(first.program().program_id().unwrap());
    for iface in ["eth0", "eth1"] {
        assert_eq!(attached_program(&t.lb, iface), Some(first_id), "{iface}");
    }
    // At least 24 connections, and one of them on be1: be1 has a quarter of the ring, so 24
    // miss it about once in a thousand tries; up to 64 more are opened until one lands there.
    let mut long: Vec<LongLived> = traffic::in_ns(&t.client, move || {
        let mut long = Vec::new();
        while long.len() < 24
            || (long.len() < 88 && !long.iter().any(|c: &LongLived| c.backend == "be1"))
        {
            long.push(LongLived::open(vip)?);
        }
        Ok(long)
    })
    .unwrap();
    let backends: BTreeSet<&str> = long.iter().map(|c| c.backend.as_str()).collect();
    assert!(
        backends.contains("be1"),
        "{} connections, none on be1: {backends:?}",
        long.len()
    );
    exchange_all(&mut long, "before the restart");
    let inserts = counter(&first, "ct_insert");
    let flows = backend_connections(&t);
    assert_eq!(flows.len(), long.len(), "{flows:?}");

    // The process exits: the pinned links keep the program attached, the pinned maps its
    // state, and tracked connections keep flowing with no process around.
    drop(first);
    for iface in ["eth0", "eth1"] {
        assert_eq!(
            attached_program(&t.lb, iface),
            Some(first_id),
            "{iface}: XDP left with the process"
        );
    }
    exchange_all(&mut long, "between the processes");

    // Second process: the maps come back, the balancer adopts what they hold.
    let program = XdpProgram::load_pinned(options(), &pins.0).unwrap();
    assert!(program.reused_pins());
    let mut second = XdpBalancer::adopt(program).unwrap();
    assert_eq!(second.service(&tcp.key), Some(&tcp));
    assert_eq!(second.service(&udp.key), Some(&udp));
    assert_eq!(second.services().count(), 2);
    assert_eq!(second.node_config(), &t.node_config().unwrap());
    second.configure_node(&t.node_config().unwrap()).unwrap();
    second.upsert_service(&tcp).unwrap();
    second.upsert_service(&udp).unwrap();
    {
        let _in = t.lb.enter().unwrap();
        for iface in ["eth0", "eth1"] {
            second.program_mut().attach(iface, mode).unwrap();
        }
    }
    let second_id = u64::from(second.program().program_id().unwrap());
    assert_ne!(second_id, first_id);
    for iface in ["eth0", "eth1"] {
        assert_eq!(
            attached_program(&t.lb, iface),
            Some(second_id),
            "{iface}: the new program did not replace the old one in the link"
        );
    }
    let mut names = pins.entries();
    names.retain(|n| n.starts_with("link_"));
    assert_eq!(
        names,
        BTreeSet::from(["link_eth0".into(), "link_eth1".into()])
    );

    // Same connections, same backends, same SNAT ports, and no flow balanced anew.
    exchange_all(&mut long, "after the restart");
    assert_eq!(
        backend_connections(&t),
        flows,
        "a flow changed its SNAT port"
    );
    assert_eq!(
        counter(&second, "ct_insert"),
        inserts,
        "tracked flows were balanced anew"
    );
    // New connections are balanced as before.
    let fresh = traffic::spread(
        &t.client,
        vip,
        60,
        2,
        Duration::from_secs(60),
        traffic::tcp_once,
    )
    .unwrap();
    assert_eq!(fresh.values().sum::<usize>(), 60, "{fresh:?}");
    assert!(counter(&second, "ct_insert") >= inserts + 60);
    let udp_answer = traffic::in_ns(&t.client, move || traffic::udp_once(vip)).unwrap();
    assert_ne!(udp_answer, "be2", "be2 drains on the UDP service");

    // Adopted services can be removed: the UDP listener goes, TCP stays.
    assert!(second.remove_service(&udp.key).unwrap());
    assert!(
        traffic::in_ns(&t.client, move || traffic::udp_once(vip)).is_err(),
        "the removed UDP service still answers"
    );
    exchange_all(&mut long, "after removing the UDP service");
    assert!(second.remove_service(&tcp.key).unwrap());
    assert_eq!(second.services().count(), 0);

    // Shutdown with withdrawal: detached everywhere, nothing left pinned.
    second.into_program().detach_and_unpin().unwrap();
    assert!(!pins.0.exists(), "left behind: {:?}", pins.entries());
    for iface in ["eth0", "eth1"] {
        assert_eq!(wait_detached(&t.lb, iface), None, "{iface}: still attached");
    }
}

#[test]
fn native_ipv4_connections_survive_a_restart_from_the_pins() {
    restart_keeps_connections(AttachMode::Native, false);
}

#[test]
fn generic_ipv6_connections_survive_a_restart_from_the_pins() {
    restart_keeps_connections(AttachMode::Generic, true);
}

#[test]
fn a_pinned_map_of_another_size_is_refused_with_its_name() {
    require_root("loading XDP programs with pinned maps").unwrap();
    let pins = PinDir::new("mismatch");
    let small = LoadOptions {
        conntrack_entries: 1024,
        ..options()
    };
    drop(XdpProgram::load_pinned(small, &pins.0).unwrap());

    let bigger = LoadOptions {
        conntrack_entries: 2048,
        ..small
    };
    let err = XdpProgram::load_pinned(bigger, &pins.0)
        .err()
        .expect("a conntrack size change was accepted")
        .to_string();
    for part in [
        "CONNTRACK",
        "max_entries is 1024",
        "needs 2048",
        "conntrack_entries",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    let err = XdpProgram::load_pinned(
        LoadOptions {
            ring_size: 251,
            ..small
        },
        &pins.0,
    )
    .err()
    .expect("a ring size change was accepted")
    .to_string();
    assert!(err.contains("RINGS") && err.contains("ring_size"), "{err}");

    // Refusals change nothing: the options the maps were pinned with still load them.
    let again = XdpProgram::load_pinned(small, &pins.0).unwrap();
    assert!(again.reused_pins());
    drop(again);
    // Starting fresh: drop the maps, then the new size loads.
    XdpProgram::unpin_maps(&pins.0).unwrap();
    let fresh = XdpProgram::load_pinned(bigger, &pins.0).unwrap();
    assert!(!fresh.reused_pins());
}

#[test]
fn a_second_load_of_a_pin_directory_in_use_is_refused_until_the_first_is_gone() {
    require_root("loading XDP programs with pinned maps").unwrap();
    let pins = PinDir::new("busy");
    let first = XdpProgram::load_pinned(options(), &pins.0).unwrap();
    let err = XdpProgram::load_pinned(options(), &pins.0)
        .err()
        .expect("two programs loaded the same pin directory at once")
        .to_string();
    assert!(
        err.contains("in use by another process") && err.contains(&*pins.0.to_string_lossy()),
        "{err}"
    );
    drop(first);
    let second = XdpProgram::load_pinned(options(), &pins.0).unwrap();
    assert!(second.reused_pins());
}

#[test]
fn unpin_detaches_and_leaves_nothing_under_the_directory() {
    let mut net = TestNet::new().unwrap();
    let a = net.add_ns("a").unwrap();
    let b = net.add_ns("b").unwrap();
    net.veth(&a, "eth0", &b, "eth0").unwrap();
    let pins = PinDir::new("unpin");
    let f = Family { v6: false };
    let program = XdpProgram::load_pinned(options(), &pins.0).unwrap();
    let mut balancer = XdpBalancer::adopt(program).unwrap();
    balancer
        .configure_node(&portico_xdp::NodeConfig {
            snat_v4: Some("198.18.1.254".parse().unwrap()),
            ..portico_xdp::NodeConfig::default()
        })
        .unwrap();
    balancer
        .upsert_service(&lab::service(f, Protocol::Tcp, &[Some(1), Some(1)]))
        .unwrap();
    {
        let _in = a.enter().unwrap();
        balancer
            .program_mut()
            .attach("eth0", AttachMode::Generic)
            .unwrap();
    }
    let id = u64::from(balancer.program().program_id().unwrap());
    drop(balancer);
    assert_eq!(attached_program(&a, "eth0"), Some(id));
    let names = pins.entries();
    for name in ["CONNTRACK", "REV_NAT", "SERVICES", "BACKENDS", "link_eth0"] {
        assert!(names.contains(name), "{name} not pinned: {names:?}");
    }

    XdpProgram::unpin(&pins.0).unwrap();
    assert!(
        !pins.0.exists(),
        "left under the directory: {:?}",
        pins.entries()
    );
    assert_eq!(wait_detached(&a, "eth0"), None, "still attached");
}

/// A balancer on the pinned maps under `pins`, configured as the `fibnet` LB node.
fn fibnet_balancer(pins: &PinDir) -> XdpBalancer {
    let program = XdpProgram::load_pinned(
        LoadOptions {
            max_services: 8,
            max_backends: 16,
            ring_size: 251,
            conntrack_entries: 1024,
            flow_cache_entries: 256,
        },
        &pins.0,
    )
    .unwrap();
    let mut b = XdpBalancer::adopt(program).unwrap();
    b.configure_node(&NodeConfig {
        snat_v4: Some(fibnet::SNAT4.into()),
        snat_ports: (20000, 20999),
        ..NodeConfig::default()
    })
    .unwrap();
    b
}

#[test]
fn an_id_released_before_a_restart_comes_back_with_its_next_generation() {
    const VIP: [u8; 4] = [203, 0, 113, 20];
    const X: [u8; 4] = [198, 18, 1, 1];
    const Y: [u8; 4] = [198, 18, 1, 2];
    const Z: [u8; 4] = [198, 18, 1, 3];
    let spec = |backends: &[[u8; 4]]| ServiceSpec {
        key: ServiceKey {
            vip: VIP.into(),
            port: 80,
            proto: Protocol::Tcp,
        },
        backends: backends
            .iter()
            .map(|a| BackendSpec {
                addr: (*a).into(),
                port: 8080,
                weight: 1,
            })
            .collect(),
        hash_source_only: false,
        preserve_source: false,
        forwarding: Default::default(),
    };
    let packet = |syn: bool| {
        let b = PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC)
            .ipv4([198, 18, 0, 1], VIP, 64)
            .tcp(40000, 80, 1000, 64240);
        let b = if syn { b.syn() } else { b.ack(1) };
        let mut out = Vec::new();
        b.write(&mut out, b"data").unwrap();
        out
    };
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let pins = PinDir::new("generation");
    let _in = lb.enter().unwrap();
    let eth0 = fibnet::ifindex("eth0").unwrap();
    let run = |b: &XdpBalancer, frame: &[u8]| {
        let out = b.program().test_run_on(frame, Some(eth0)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
        [
            out.packet[30],
            out.packet[31],
            out.packet[32],
            out.packet[33],
        ]
    };

    // A flow to X; then X leaves (its id is free, at generation 1).
    let mut first = fibnet_balancer(&pins);
    first.upsert_service(&spec(&[X])).unwrap();
    assert_eq!(run(&first, &packet(true)), X);
    first.upsert_service(&spec(&[Y])).unwrap();
    drop(first);

    // After the restart Z takes X's old id: at generation 2, so the flow does not follow.
    let mut second = fibnet_balancer(&pins);
    second.upsert_service(&spec(&[Y, Z])).unwrap();
    let misses = second.program().stat(stat::CT_MISS).unwrap();
    let to = run(&second, &packet(false));
    assert!(to == Y || to == Z, "went to {to:?}");
    assert_eq!(
        second.program().stat(stat::CT_MISS).unwrap(),
        misses + 1,
        "the flow of a backend removed before the restart followed its id to another backend"
    );
}

#[test]
fn a_link_whose_interface_was_recreated_is_replaced_and_can_be_unpinned() {
    let mut net = TestNet::new().unwrap();
    let a = net.add_ns("a").unwrap();
    let b = net.add_ns("b").unwrap();
    net.veth(&a, "eth0", &b, "eth0").unwrap();
    let pins = PinDir::new("relink");
    let attach = |pins: &PinDir| {
        let mut program = XdpProgram::load_pinned(options(), &pins.0).unwrap();
        let _in = a.enter().unwrap();
        program.attach("eth0", AttachMode::Generic).unwrap();
        program
    };
    drop(attach(&pins));
    assert!(attached_program(&a, "eth0").is_some());

    // The interface goes away with its link's attachment; one of the same name comes back.
    a.run(&["ip", "link", "del", "eth0"]).unwrap();
    net.veth(&a, "eth0", &b, "eth0").unwrap();
    assert_eq!(attached_program(&a, "eth0"), None);
    let mut program = attach(&pins);
    let id = u64::from(program.program_id().unwrap());
    assert_eq!(attached_program(&a, "eth0"), Some(id));
    assert_eq!(
        program.pinned_interfaces().unwrap(),
        vec!["eth0".to_owned()]
    );

    // An interface no longer configured: its link goes, the maps stay.
    assert!(program.unpin_interface("eth0").unwrap());
    assert!(!program.unpin_interface("eth0").unwrap());
    assert_eq!(wait_detached(&a, "eth0"), None, "still attached");
    assert!(program.pinned_interfaces().unwrap().is_empty());
    assert!(pins.entries().contains("CONNTRACK"));
}

/// A direct-server-return service survives a restart from the pins as one: the adopted spec
/// says so, and its tracked flow's next packet is encapsulated toward the same backend.
#[test]
fn a_dsr_service_is_adopted_with_its_forwarding_mode() {
    const VIP: [u8; 4] = [203, 0, 113, 30];
    let spec = ServiceSpec {
        key: ServiceKey {
            vip: VIP.into(),
            port: 80,
            proto: Protocol::Tcp,
        },
        backends: (1..=3u8)
            .map(|i| BackendSpec {
                addr: [198, 18, 1, i].into(),
                port: 8080,
                weight: 1,
            })
            .collect(),
        hash_source_only: false,
        preserve_source: false,
        forwarding: Forwarding::Dsr(Encapsulation::Gue),
    };
    let packet = |syn: bool| {
        let b = PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC)
            .ipv4([198, 18, 0, 1], VIP, 64)
            .tcp(40000, 80, 1000, 64240);
        let b = if syn { b.syn() } else { b.ack(1) };
        let mut out = Vec::new();
        b.write(&mut out, b"data").unwrap();
        out
    };
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let pins = PinDir::new("dsr");
    let _in = lb.enter().unwrap();
    let eth0 = fibnet::ifindex("eth0").unwrap();
    // The outer destination (a backend) and protocol (UDP: GUE) of the answer.
    let run = |b: &XdpBalancer, frame: &[u8]| {
        let out = b.program().test_run_on(frame, Some(eth0)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
        let p = &out.packet;
        assert_eq!(
            &p[14 + 28..],
            &frame[14..],
            "the client's packet, unchanged"
        );
        (p[23], [p[30], p[31], p[32], p[33]])
    };
    let mut first = fibnet_balancer(&pins);
    first.upsert_service(&spec).unwrap();
    let (proto, backend) = run(&first, &packet(true));
    assert_eq!(proto, 17);
    drop(first);

    let second = fibnet_balancer(&pins);
    assert_eq!(second.service(&spec.key), Some(&spec));
    assert_eq!(run(&second, &packet(false)), (17, backend));
}
