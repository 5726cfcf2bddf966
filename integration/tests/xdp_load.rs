//! The XDP balancer under load, with BPF_PROG_TEST_RUN (needs root): SNAT ports at high
//! occupancy, 5-tuples opened again right after they closed, and established flows through
//! a flood of new ones.

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
        preserve_source: false,
        forwarding: Default::default(),
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

/// The backend's SYN-ACK to a flow it saw from the SNAT address's `port`.
fn reply(backend: Ipv4Addr, port: u16) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(fibnet::backend_mac(backend.octets()[3]), fibnet::LB1_MAC)
        .ipv4(backend.octets(), fibnet::SNAT4, 64)
        .tcp(8080, port, 5000, 64240)
        .syn()
        .ack(1001)
        .write(&mut out, b"")
        .unwrap();
    out
}

/// Sets an IPv4 frame's header checksum after its header changed.
fn fix_ipv4_checksum(frame: &mut [u8]) {
    frame[24..26].fill(0);
    let sum = frame[14..34]
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    frame[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
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

/// The LB namespace's client-side and backend-side interfaces (entered).
fn ifaces() -> (u32, u32) {
    (
        fibnet::ifindex("eth0").unwrap(),
        fibnet::ifindex("eth1").unwrap(),
    )
}

/// Opens the flow of `client(n)`: SYN, the backend's SYN-ACK, the client's ACK, which
/// confirms it (`CONNTRACK`). Returns (address, port, backend, SNAT port).
fn open(b: &XdpBalancer, n: u32, eth0: u32, eth1: u32) -> ([u8; 4], u16, Ipv4Addr, u16) {
    let prog = b.program();
    let (src, sport) = client(n);
    let out = prog.test_run_on(&tcp(src, sport, SYN), Some(eth0)).unwrap();
    assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
    let (to, port) = sent_to(&out);
    let out = prog.test_run_on(&reply(to, port), Some(eth1)).unwrap();
    assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
    let out = prog.test_run_on(&tcp(src, sport, ACK), Some(eth0)).unwrap();
    assert_eq!(sent_to(&out), (to, port));
    (src, sport, to, port)
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
    // What status and metrics report: every seventh flow confirmed by its ACK, the rest
    // still unconfirmed, none lost.
    let tracked: HashMap<&str, u64> = b.tracked_flows().unwrap().into_iter().collect();
    let confirmed = u64::from(FLOWS.div_ceil(7));
    assert_eq!(tracked["established"], confirmed, "{tracked:?}");
    assert_eq!(
        tracked["unconfirmed"],
        u64::from(FLOWS) - confirmed,
        "{tracked:?}"
    );
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
    assert_eq!(prog.stat(stat::DROP_NO_SNAT_PORT).unwrap(), 0);
}

/// What protects established flows from a flood of new ones: a new flow lives in tables of
/// its own (`CONNTRACK_NEW`, `REV_NAT_NEW`) until its client's second packet (for TCP, one
/// other than a SYN) confirms it; a flood of SYNs churns those only.
#[test]
fn established_flows_keep_their_backend_through_a_flood_of_new_flows() {
    const ESTABLISHED: u32 = 1_000;
    const FLOOD: u32 = 100_000;
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // 8192 entries per CPU: the flood replaces them twelve times over.
    let mut b = balancer(16_384, (1024, 65535), &[1, 2, 3]);
    let _in = lb.enter().unwrap();
    pin_to_cpu(0);
    let (eth0, eth1) = ifaces();
    // Established: SYN, the backend's SYN-ACK, the client's ACK.
    let flows: Vec<_> = (0..ESTABLISHED).map(|n| open(&b, n, eth0, eth1)).collect();
    // Cached copies run out (two seconds); a fourth backend changes the ring, so a flow
    // whose entry was lost would be balanced anew, a quarter of them elsewhere.
    std::thread::sleep(Duration::from_millis(2100));
    b.upsert_service(&service(&[1, 2, 3, 4])).unwrap();
    let prog = b.program();
    // The flood: SYNs from as many sources, as fast as test-run goes.
    let inserts = prog.stat(stat::CT_INSERT).unwrap();
    let confirmed = prog.stat(stat::CT_CONFIRM).unwrap();
    let mut syn = tcp([100, 64, 0, 0], 1, SYN);
    let started = Instant::now();
    for n in 0..FLOOD {
        syn[26..30].copy_from_slice(&(0x6440_0000 | n).to_be_bytes());
        syn[34..36].copy_from_slice(&(1024 + (n % 50_000) as u16).to_be_bytes());
        fix_ipv4_checksum(&mut syn);
        let out = prog.test_run_on(&syn, Some(eth0)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
    }
    let elapsed = started.elapsed();
    println!(
        "{FLOOD} new flows in {elapsed:?} ({:.0} per second)",
        f64::from(FLOOD) / elapsed.as_secs_f64()
    );
    assert!(prog.stat(stat::CT_INSERT).unwrap() - inserts >= u64::from(FLOOD));
    assert_eq!(prog.stat(stat::CT_CONFIRM).unwrap(), confirmed);
    // Nor does it make the presence filters due for a rebuild: its flows went into neither
    // CONNTRACK nor REV_NAT.
    assert!(!prog.filters_due().unwrap(), "a flood made the filters due");
    // The first flood flows are long gone from the tables: an ACK of one is a new flow.
    let misses = prog.stat(stat::CT_MISS).unwrap();
    let early = tcp([100, 64, 0, 0], 1024, ACK);
    prog.test_run_on(&early, Some(eth0)).unwrap();
    assert_eq!(
        prog.stat(stat::CT_MISS).unwrap(),
        misses + 1,
        "the flood did not churn the tables"
    );
    // Every established flow still goes where it went, on its port, and its replies come
    // back to the client.
    let mut moved = 0;
    for &(src, sport, to, port) in &flows {
        let out = prog.test_run_on(&tcp(src, sport, ACK), Some(eth0)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
        if sent_to(&out) != (to, port) {
            moved += 1;
            continue;
        }
        let out = prog.test_run_on(&reply(to, port), Some(eth1)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
        let p = &out.packet;
        assert_eq!(u16::from_be_bytes([p[36], p[37]]), sport, "reply to {port}");
    }
    assert_eq!(moved, 0, "{moved} of {ESTABLISHED} established flows moved");
}

/// The presence filter in front of `CONNTRACK` (docs/xdp.md, "New flows"): a SYN whose
/// 5-tuple's bit is clear skips the lookup, so a tracked flow's bit must be set, by the
/// program when the flow is confirmed and by every rebuild after. A SYN of an open flow
/// (retransmitted) keeps its backend and port though the ring changed meanwhile; new
/// flows' SYNs skip the lookup.
#[test]
fn the_conntrack_filter_skips_new_flows_and_never_a_tracked_one() {
    const FLOWS: u32 = 2_000;
    const NEW: u32 = 10_000;
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let mut b = balancer(16_384, (1024, 65535), &[1, 2, 3]);
    let _in = lb.enter().unwrap();
    pin_to_cpu(0);
    let (eth0, eth1) = ifaces();
    let flows: Vec<_> = (0..FLOWS).map(|n| open(&b, n, eth0, eth1)).collect();
    // A fourth backend: a quarter of the flows would be balanced elsewhere, so a SYN that
    // missed its flow's entry would show.
    b.upsert_service(&service(&[1, 2, 3, 4])).unwrap();
    let check = |b: &XdpBalancer, what: &str| {
        let prog = b.program();
        let (hits, filtered) = (
            prog.stat(stat::CT_HIT).unwrap(),
            prog.stat(stat::CT_FILTERED).unwrap(),
        );
        for &(src, sport, to, port) in &flows {
            let out = prog.test_run_on(&tcp(src, sport, SYN), Some(eth0)).unwrap();
            assert_eq!(
                sent_to(&out),
                (to, port),
                "{what}: the SYN of the open flow {src:?}:{sport} went elsewhere"
            );
        }
        assert_eq!(
            prog.stat(stat::CT_HIT).unwrap() - hits,
            u64::from(FLOWS),
            "{what}: every SYN found its flow"
        );
        assert_eq!(prog.stat(stat::CT_FILTERED).unwrap(), filtered, "{what}");
    };
    check(&b, "bits the program set");
    b.program_mut().rebuild_filters().unwrap();
    check(&b, "bits the rebuild set");
    let prog = b.program();
    let filtered = prog.stat(stat::CT_FILTERED).unwrap();
    let mut fourth = 0;
    for n in FLOWS..FLOWS + NEW {
        let (src, sport) = client(n);
        let out = prog.test_run_on(&tcp(src, sport, SYN), Some(eth0)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
        fourth += usize::from(sent_to(&out).0 == backend(4));
    }
    let skipped = prog.stat(stat::CT_FILTERED).unwrap() - filtered;
    // 2,000 keys in at least 65,536 bits: 3 % of them set at most.
    assert!(
        skipped >= u64::from(NEW) * 95 / 100,
        "{skipped} of {NEW} new flows skipped the lookup"
    );
    assert!(fourth > 0, "no new flow went to the fourth backend");
}

/// A rebuild of the conntrack filter drops the bits of flows that left the table (here
/// evicted by the LRU), so their 5-tuples skip the lookup again; until then they do not.
#[test]
fn a_filter_rebuild_drops_the_bits_of_evicted_flows() {
    const OLD: u32 = 1_000;
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // 1,024 entries: the later flows evict the first ones.
    let mut b = balancer(1_024, (1024, 65535), &[1, 2, 3]);
    let _in = lb.enter().unwrap();
    pin_to_cpu(0);
    let (eth0, eth1) = ifaces();
    for n in 0..OLD + 4_000 {
        open(&b, n, eth0, eth1);
    }
    let tracked = b.program().map_len("CONNTRACK").unwrap();
    assert!(tracked <= 1_024, "{tracked} tracked");
    let filtered_syns = |b: &XdpBalancer, range: std::ops::Range<u32>| {
        let prog = b.program();
        let before = prog.stat(stat::CT_FILTERED).unwrap();
        for n in range {
            let (src, sport) = client(n);
            let out = prog.test_run_on(&tcp(src, sport, SYN), Some(eth0)).unwrap();
            assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
        }
        prog.stat(stat::CT_FILTERED).unwrap() - before
    };
    // The evicted flows' bits are still set: their SYNs look the table up.
    let half = OLD / 2;
    assert_eq!(filtered_syns(&b, 0..half), 0);
    b.program_mut().rebuild_filters().unwrap();
    let skipped = filtered_syns(&b, half..OLD);
    assert!(
        skipped >= u64::from(half) * 95 / 100,
        "after the rebuild, {skipped} of {half} evicted flows skipped the lookup"
    );
}

/// A rebuild sizes the filter for the flows tracked now (eight bits each), not for those of
/// the last rebuild: the node configured with none, 30,000 opened after, most new flows
/// still skip the lookup (63 % would, with the smallest filter's 65,536 bits). The filters
/// are due for the node's upkeep (`Balancer::maintain`) once that many new flows came.
#[test]
fn a_filter_rebuild_sizes_the_filter_for_the_flows_tracked_now() {
    const FLOWS: u32 = 30_000;
    const NEW: u32 = 10_000;
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let mut b = balancer(65_536, (1024, 65535), &[1, 2, 3]);
    let _in = lb.enter().unwrap();
    pin_to_cpu(0);
    let (eth0, eth1) = ifaces();
    // Configured: just rebuilt, not due.
    assert!(!b.program().filters_due().unwrap());
    for n in 0..FLOWS {
        open(&b, n, eth0, eth1);
    }
    // Many more entries than the filters were sized for: due (the node's upkeep rebuilds
    // them, five seconds after its last try at most).
    assert!(b.program().filters_due().unwrap());
    b.program_mut().rebuild_filters().unwrap();
    assert!(!b.program().filters_due().unwrap());
    let prog = b.program();
    let before = prog.stat(stat::CT_FILTERED).unwrap();
    for n in FLOWS..FLOWS + NEW {
        let (src, sport) = client(n);
        let out = prog.test_run_on(&tcp(src, sport, SYN), Some(eth0)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
    }
    let skipped = prog.stat(stat::CT_FILTERED).unwrap() - before;
    // 30,000 keys in 262,144 bits: 11 % of them set.
    assert!(
        skipped >= u64::from(NEW) * 80 / 100,
        "{skipped} of {NEW} new flows skipped the lookup"
    );
}

/// The presence filter in front of `REV_NAT`: a port search skips the lookup of a port whose
/// bit is clear, so a confirmed flow's port must have its bit, set by the program when the
/// flow is confirmed and by every rebuild after; else a new flow would be given it too.
#[test]
fn a_confirmed_flows_port_is_never_given_again_through_the_reverse_nat_filter() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // 1,000 ports toward one backend: 300 confirmed flows hold 30 % of them.
    let mut b = balancer(16_384, (20000, 20999), &[1]);
    let _in = lb.enter().unwrap();
    pin_to_cpu(0);
    let (eth0, eth1) = ifaces();
    let mut held: HashMap<u16, String> = (0..300)
        .map(|n| (open(&b, n, eth0, eth1).3, format!("confirmed flow {n}")))
        .collect();
    let mut new_flows = |b: &XdpBalancer, range: std::ops::Range<u32>, what: &str| {
        for n in range {
            let (src, sport) = client(n);
            let out = b
                .program()
                .test_run_on(&tcp(src, sport, SYN), Some(eth0))
                .unwrap();
            assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
            let port = sent_to(&out).1;
            if let Some(other) = held.insert(port, format!("new flow {n}")) {
                panic!("{what}: new flow {n} was given port {port}, held by {other}");
            }
        }
    };
    new_flows(&b, 1_000..1_200, "bits the program set");
    b.program_mut().rebuild_filters().unwrap();
    new_flows(&b, 2_000..2_200, "bits the rebuild set");
    assert_eq!(b.program().stat(stat::DROP_NO_SNAT_PORT).unwrap(), 0);
}
