//! The XDP balancer under load, with BPF_PROG_TEST_RUN (needs root): SNAT ports at high
//! occupancy, and 5-tuples opened again right after they closed.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use portico_integration::{fibnet, TestNet};
use portico_xdp::{
    verdict, BackendSpec, Balancer, LoadOptions, NodeConfig, Protocol, ServiceKey, ServiceSpec,
    XdpBalancer, XdpProgram,
};
use portico_xdp_common::stat;

const VIP: [u8; 4] = [203, 0, 113, 30];
const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

fn tcp(src: [u8; 4], sport: u16, flags: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC)
        .ipv4(src, VIP, 64)
        .tcp(sport, 80, 1000, 64240);
    let b = match flags {
        SYN => b.syn(),
        f if f & FIN != 0 => b.fin().ack(1),
        _ => b.ack(1),
    };
    let mut out = Vec::new();
    b.write(&mut out, b"x").unwrap();
    out
}

fn backend(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, i)
}

fn key() -> ServiceKey {
    ServiceKey {
        vip: IpAddr::V4(Ipv4Addr::from(VIP)),
        port: 80,
        proto: Protocol::Tcp,
    }
}

fn service(backends: &[u8]) -> ServiceSpec {
    ServiceSpec {
        key: key(),
        backends: backends
            .iter()
            .map(|&i| BackendSpec {
                addr: IpAddr::V4(backend(i)),
                port: 8080,
                weight: 1,
            })
            .collect(),
        hash_source_only: false,
    }
}

fn balancer(conntrack_entries: u32, ports: (u16, u16), backends: &[u8]) -> XdpBalancer {
    let program = XdpProgram::load_with(LoadOptions {
        max_services: 8,
        max_backends: 32,
        ring_size: 251,
        conntrack_entries,
        flow_cache_entries: 1024,
    })
    .expect("loading the XDP program (needs root)");
    let mut b = XdpBalancer::new(program);
    b.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(fibnet::SNAT4)),
        snat_ports: ports,
        ..NodeConfig::default()
    })
    .unwrap();
    b.upsert_service(&service(backends)).unwrap();
    b
}

/// Where a forwarded frame went: (backend, SNAT port).
fn sent_to(out: &portico_xdp::TestRunOutput) -> (Ipv4Addr, u16) {
    let p = &out.packet;
    (
        Ipv4Addr::new(p[30], p[31], p[32], p[33]),
        u16::from_be_bytes([p[34], p[35]]),
    )
}

/// Per-CPU LRU lists and caches: one CPU for a whole test.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "pinning the test thread to CPU {cpu}"
        );
    }
}

/// Client `n` of many: a distinct (address, port) each.
fn client(n: u32) -> ([u8; 4], u16) {
    let a = n / 20_000;
    ([198, 18, 0, 1 + a as u8], 10_000 + (n % 20_000) as u16)
}

#[test]
fn fifty_thousand_concurrent_flows_to_one_backend_each_get_a_port() {
    const FLOWS: u32 = 50_000;
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // Each CPU's LRU share must hold them all: the test runs on one CPU.
    let b = balancer(262_144, (1024, 65535), &[1]);
    let prog = b.program();
    let _in = lb.enter().unwrap();
    pin_to_cpu(0);
    let eth0 = fibnet::ifindex("eth0").unwrap();
    let drops = prog.stat(stat::DROP_NO_SNAT_PORT).unwrap();
    let mut ports = HashMap::new();
    let started = Instant::now();
    for n in 0..FLOWS {
        let (src, sport) = client(n);
        let out = prog.test_run_on(&tcp(src, sport, SYN), Some(eth0)).unwrap();
        assert_eq!(
            verdict::name(out.verdict),
            "XDP_REDIRECT",
            "flow {n}: {} of 64512 ports taken",
            ports.len()
        );
        let (to, port) = sent_to(&out);
        assert_eq!(to, backend(1));
        if let Some(other) = ports.insert(port, n) {
            panic!("flows {other} and {n} share SNAT port {port}");
        }
    }
    println!(
        "{FLOWS} flows ({:.1} % of the range) in {:?}",
        f64::from(FLOWS) * 100.0 / 64512.0,
        started.elapsed()
    );
    assert_eq!(prog.stat(stat::DROP_NO_SNAT_PORT).unwrap(), drops);
    // Every one is still tracked on its port.
    for n in (0..FLOWS).step_by(7) {
        let (src, sport) = client(n);
        let out = prog.test_run_on(&tcp(src, sport, ACK), Some(eth0)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
        assert_eq!(ports[&sent_to(&out).1], n, "flow {n} changed port");
    }
}

#[test]
fn a_new_flow_gets_a_port_while_fewer_than_ninety_percent_are_taken() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // 1000 ports toward one backend.
    let b = balancer(16_384, (20000, 20999), &[1]);
    let prog = b.program();
    let _in = lb.enter().unwrap();
    pin_to_cpu(0);
    let eth0 = fibnet::ifindex("eth0").unwrap();
    let mut ports = HashSet::new();
    for n in 0..900 {
        let out = prog
            .test_run_on(&tcp([198, 18, 0, 1], 30_000 + n, SYN), Some(eth0))
            .unwrap();
        assert_eq!(
            verdict::name(out.verdict),
            "XDP_REDIRECT",
            "a new flow was refused with {} of 1000 ports taken",
            ports.len()
        );
        assert!(ports.insert(sent_to(&out).1), "a port given twice");
    }
    assert_eq!(prog.stat(stat::DROP_NO_SNAT_PORT).unwrap(), 0);
    // Past 90 %, then all of it: refused once none is left, never a port given twice.
    let mut refused = 0;
    for n in 900..1100 {
        let out = prog
            .test_run_on(&tcp([198, 18, 0, 1], 30_000 + n, SYN), Some(eth0))
            .unwrap();
        match out.verdict {
            verdict::REDIRECT => assert!(ports.insert(sent_to(&out).1), "a port given twice"),
            verdict::DROP => refused += 1,
            v => panic!("{}", verdict::name(v)),
        }
    }
    assert!(
        ports.len() <= 1000 && refused >= 100,
        "{} ports, {refused} refused",
        ports.len()
    );
    assert_eq!(prog.stat(stat::DROP_NO_SNAT_PORT).unwrap(), refused);
}

#[test]
fn a_closed_five_tuple_opens_again_at_once_on_its_own_port() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // Ten ports, five held by other flows.
    let b = balancer(16_384, (20000, 20009), &[1]);
    let prog = b.program();
    let _in = lb.enter().unwrap();
    pin_to_cpu(0);
    let eth0 = fibnet::ifindex("eth0").unwrap();
    for n in 0..5 {
        let out = prog
            .test_run_on(&tcp([198, 18, 0, 2], 40_000 + n, SYN), Some(eth0))
            .unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
    }
    let started = Instant::now();
    let mut port = None;
    for round in 0..100 {
        let out = prog
            .test_run_on(&tcp([198, 18, 0, 1], 45_000, SYN), Some(eth0))
            .unwrap();
        assert_eq!(
            verdict::name(out.verdict),
            "XDP_REDIRECT",
            "round {round}: the 5-tuple could not open again"
        );
        let p = sent_to(&out).1;
        assert_eq!(*port.get_or_insert(p), p, "round {round}: another port");
        for flags in [ACK, FIN | ACK] {
            let out = prog
                .test_run_on(&tcp([198, 18, 0, 1], 45_000, flags), Some(eth0))
                .unwrap();
            assert_eq!(sent_to(&out).1, p);
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(prog.stat(stat::DROP_NO_SNAT_PORT).unwrap(), 0);
}
