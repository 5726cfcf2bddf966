//! How tracked flows and counters live through service changes, run in the kernel with
//! BPF_PROG_TEST_RUN (needs root): backend ids that get reused, removed services, the
//! per-CPU flow cache, and service totals that keep what removed backends counted.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use etherparse::PacketBuilder;
use portico_integration::{fibnet, TestNet};
use portico_xdp::{
    verdict, BackendSpec, Balancer, LoadOptions, NodeConfig, Protocol, ServiceKey, ServiceSpec,
    XdpBalancer, XdpProgram,
};
use portico_xdp_common::stat;

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const VIP_A: [u8; 4] = [203, 0, 113, 20];
const VIP_B: [u8; 4] = [203, 0, 113, 21];
const X: [u8; 4] = [198, 18, 1, 1];
const Y: [u8; 4] = [198, 18, 1, 2];
const Z: [u8; 4] = [198, 18, 1, 3];

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn tcp(dst: [u8; 4], sport: u16, flags: u8) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC)
        .ipv4(CLIENT, dst, 64)
        .tcp(sport, 80, 1000, 64240);
    let b = if flags & SYN != 0 { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, b"data").unwrap();
    out
}

/// Destination address of a forwarded IPv4 frame.
fn dst_of(frame: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33])
}

fn key(vip: [u8; 4]) -> ServiceKey {
    ServiceKey {
        vip: IpAddr::V4(Ipv4Addr::from(vip)),
        port: 80,
        proto: Protocol::Tcp,
    }
}

fn spec(vip: [u8; 4], backends: &[[u8; 4]]) -> ServiceSpec {
    ServiceSpec {
        key: key(vip),
        backends: backends
            .iter()
            .map(|b| BackendSpec {
                addr: IpAddr::V4(Ipv4Addr::from(*b)),
                port: 8080,
                weight: 1,
            })
            .collect(),
        hash_source_only: false,
        preserve_source: false,
        forwarding: Default::default(),
    }
}

fn balancer() -> XdpBalancer {
    let program = XdpProgram::load_with(LoadOptions {
        max_services: 8,
        max_backends: 16,
        ring_size: 251,
        conntrack_entries: 1024,
        flow_cache_entries: 256,
    })
    .expect("loading the XDP program (needs root)");
    let mut b = XdpBalancer::new(program);
    b.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(fibnet::SNAT4)),
        snat_ports: (20000, 20999),
        ..NodeConfig::default()
    })
    .unwrap();
    b
}

/// A balancer whose TCP flows expire after a second, with SNAT ports `ports`, and a
/// service on `VIP_A` with backend X.
fn one_second_flows(ports: (u16, u16)) -> XdpBalancer {
    let mut b = balancer();
    b.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(fibnet::SNAT4)),
        snat_ports: ports,
        tcp_timeout: Duration::from_secs(1),
        ..NodeConfig::default()
    })
    .unwrap();
    b.upsert_service(&spec(VIP_A, &[X])).unwrap();
    b
}

/// Runs `frame` as if it came in on eth0; returns (verdict, output).
fn run(b: &XdpBalancer, frame: &[u8]) -> (u32, Vec<u8>) {
    let eth0 = fibnet::ifindex("eth0").unwrap();
    let out = b.program().test_run_on(frame, Some(eth0)).unwrap();
    (out.verdict, out.packet)
}

#[test]
fn a_flow_never_follows_its_backend_id_to_another_backend() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let mut b = balancer();
    let _in = lb.enter().unwrap();

    b.upsert_service(&spec(VIP_A, &[X])).unwrap();
    let (v, out) = run(&b, &tcp(VIP_A, 40000, SYN));
    assert_eq!(verdict::name(v), "XDP_REDIRECT");
    assert_eq!(dst_of(&out), Ipv4Addr::from(X));
    // The flow is tracked (and cached): its next packet goes to X too.
    let hits = b.program().stat(stat::CT_HIT).unwrap();
    let (_, out) = run(&b, &tcp(VIP_A, 40000, ACK));
    assert_eq!(dst_of(&out), Ipv4Addr::from(X));
    assert_eq!(b.program().stat(stat::CT_HIT).unwrap(), hits + 1);

    // X leaves (Y takes a new id), then Z arrives and gets X's old id.
    b.upsert_service(&spec(VIP_A, &[Y])).unwrap();
    b.upsert_service(&spec(VIP_A, &[Y, Z])).unwrap();
    let misses = b.program().stat(stat::CT_MISS).unwrap();
    let (v, out) = run(&b, &tcp(VIP_A, 40000, ACK));
    assert_eq!(verdict::name(v), "XDP_REDIRECT");
    let to = dst_of(&out);
    assert!(
        to == Ipv4Addr::from(Y) || to == Ipv4Addr::from(Z),
        "went to {to}"
    );
    assert_eq!(
        b.program().stat(stat::CT_MISS).unwrap(),
        misses + 1,
        "the flow of a removed backend is balanced again, not sent down the reused id"
    );
}

#[test]
fn removing_a_service_forgets_its_flows() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let mut b = balancer();
    let _in = lb.enter().unwrap();

    b.upsert_service(&spec(VIP_A, &[X])).unwrap();
    run(&b, &tcp(VIP_A, 41000, SYN));
    let (_, out) = run(&b, &tcp(VIP_A, 41000, ACK));
    assert_eq!(dst_of(&out), Ipv4Addr::from(X));

    assert!(b.remove_service(&key(VIP_A)).unwrap());
    // Another service now owns the ids the old one used.
    b.upsert_service(&spec(VIP_B, &[Y])).unwrap();
    let (v, out) = run(&b, &tcp(VIP_A, 41000, ACK));
    assert_eq!(
        verdict::name(v),
        "XDP_PASS",
        "a packet to a removed VIP goes to the stack"
    );
    assert_eq!(out, tcp(VIP_A, 41000, ACK), "and leaves untouched");

    // The VIP comes back with another backend: the old flow starts afresh there.
    b.upsert_service(&spec(VIP_A, &[Z])).unwrap();
    let (v, out) = run(&b, &tcp(VIP_A, 41000, ACK));
    assert_eq!(verdict::name(v), "XDP_REDIRECT");
    assert_eq!(dst_of(&out), Ipv4Addr::from(Z));
}

#[test]
fn service_totals_keep_what_removed_backends_counted() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let mut b = balancer();
    let _in = lb.enter().unwrap();

    b.upsert_service(&spec(VIP_A, &[X, Y, Z])).unwrap();
    for port in 42000..42060 {
        let (v, _) = run(&b, &tcp(VIP_A, port, SYN));
        assert_eq!(verdict::name(v), "XDP_REDIRECT");
    }
    let before = b.service_stats(&key(VIP_A)).unwrap().unwrap();
    assert_eq!(before.service.packets, 60);
    assert_eq!(before.service.new_flows, 60);
    let per_backend: u64 = before.backends.iter().map(|(_, c)| c.packets).sum();
    assert_eq!(per_backend, 60);

    b.upsert_service(&spec(VIP_A, &[X])).unwrap();
    let after = b.service_stats(&key(VIP_A)).unwrap().unwrap();
    assert_eq!(after.service, before.service, "totals never go backwards");
    assert_eq!(after.backends.len(), 1);
}

#[test]
fn the_loader_measures_the_kernel_tick_rate() {
    let b = balancer();
    let hz = b.program().hz();
    assert!((24..=2000).contains(&hz), "HZ measured as {hz}");
}

#[test]
fn a_snat_port_is_reclaimed_only_three_seconds_after_its_flow_was_last_seen() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // Two SNAT ports.
    let b = one_second_flows((20000, 20001));
    let _in = lb.enter().unwrap();
    let new_flow = |b: &XdpBalancer, sport: u16| {
        let drops = b.program().stat(stat::DROP_NO_SNAT_PORT).unwrap();
        let (v, out) = run(b, &tcp(VIP_A, sport, SYN));
        let dropped = b.program().stat(stat::DROP_NO_SNAT_PORT).unwrap() == drops + 1;
        (verdict::name(v), dropped, out)
    };
    let port_of = |out: &[u8]| u16::from_be_bytes([out[34], out[35]]);

    // One flow confirmed (SYN, ACK), one not (a SYN only): each holds a port.
    let (v, _, out) = new_flow(&b, 43000);
    assert_eq!(v, "XDP_REDIRECT");
    let (v, ack) = run(&b, &tcp(VIP_A, 43000, ACK));
    assert_eq!(verdict::name(v), "XDP_REDIRECT");
    assert_eq!(port_of(&ack), port_of(&out));
    assert_eq!(b.program().stat(stat::CT_CONFIRM).unwrap(), 1);
    let (v, _, _) = new_flow(&b, 43001);
    assert_eq!(v, "XDP_REDIRECT");
    let (v, dropped, _) = new_flow(&b, 43002);
    assert_eq!((v, dropped), ("XDP_DROP", true));

    // Both have expired, but per-CPU cached copies of them may live two seconds past their
    // last lookup: the ports stay reserved until three seconds after that.
    std::thread::sleep(Duration::from_millis(2300));
    let (v, dropped, _) = new_flow(&b, 43002);
    assert_eq!((v, dropped), ("XDP_DROP", true));

    std::thread::sleep(Duration::from_millis(1000));
    let mut ports = Vec::new();
    for sport in [43002, 43003] {
        let (v, _, out) = new_flow(&b, sport);
        assert_eq!(v, "XDP_REDIRECT", "a port is reclaimed");
        ports.push(port_of(&out));
    }
    ports.sort_unstable();
    assert_eq!(ports, [20000, 20001]);
}

#[test]
fn a_flow_idle_past_a_timeout_shorter_than_a_cached_copys_life_is_balanced_again() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // A per-CPU cached copy lives two seconds.
    let b = one_second_flows((20000, 20999));
    let _in = lb.enter().unwrap();
    for flags in [SYN, ACK, ACK] {
        let (v, _) = run(&b, &tcp(VIP_A, 44000, flags));
        assert_eq!(verdict::name(v), "XDP_REDIRECT");
    }
    std::thread::sleep(Duration::from_millis(1500));
    // Another flow to X: its new flow's slow path refreshes X's cached next hop (it lives a
    // second), which the fast path needs.
    let (v, _) = run(&b, &tcp(VIP_A, 44001, SYN));
    assert_eq!(verdict::name(v), "XDP_REDIRECT");
    let misses = b.program().stat(stat::CT_MISS).unwrap();
    let (v, _) = run(&b, &tcp(VIP_A, 44000, ACK));
    assert_eq!(verdict::name(v), "XDP_REDIRECT");
    assert_eq!(
        b.program().stat(stat::CT_MISS).unwrap(),
        misses + 1,
        "the flow timed out: no cached copy may serve it"
    );
}

#[test]
fn the_program_reads_the_maglev_table_userspace_built() {
    use portico_xdp::maglev::{self, MaglevBackend};
    let mut b = balancer();
    // Twice: each upsert writes the idle half of the double-buffered ring, then flips.
    for backends in [&[X, Y, Z][..], &[X, Z][..]] {
        let s = spec(VIP_A, backends);
        b.upsert_service(&s).unwrap();
        let live = b.live_ring(&s.key).unwrap().unwrap();
        assert_eq!(live.len(), 251);
        let keys: Vec<MaglevBackend> = s
            .backends
            .iter()
            .map(|be| MaglevBackend {
                key: portico_xdp::stable_key(be.addr, be.port),
                weight: be.weight,
            })
            .collect();
        let table = maglev::table(&keys, 251).unwrap();
        for (slot, (got, want)) in live.iter().zip(table.iter()).enumerate() {
            let want = want.map(|i| (s.backends[i as usize].addr, s.backends[i as usize].port));
            assert_eq!(*got, want, "slot {slot}");
        }
    }
}

#[test]
fn an_idle_flow_keeps_its_snat_port_against_another_service_of_the_same_backend() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let mut b = balancer();
    b.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(fibnet::SNAT4)),
        snat_ports: (20000, 20000),
        ..NodeConfig::default()
    })
    .unwrap();
    // Two services, one backend (another backend id each): one SNAT port space.
    b.upsert_service(&spec(VIP_A, &[X])).unwrap();
    b.upsert_service(&spec(VIP_B, &[X])).unwrap();
    let _in = lb.enter().unwrap();

    for flags in [SYN, ACK] {
        let (v, out) = run(&b, &tcp(VIP_A, 44000, flags));
        assert_eq!(verdict::name(v), "XDP_REDIRECT");
        assert_eq!(u16::from_be_bytes([out[34], out[35]]), 20000);
    }
    // Idle past the three seconds a port is held for an unseen flow, but tracked and
    // unexpired: the port is still its own.
    std::thread::sleep(Duration::from_millis(3300));
    let (v, _) = run(&b, &tcp(VIP_B, 44001, SYN));
    assert_eq!(
        verdict::name(v),
        "XDP_DROP",
        "a new flow of the other service took the idle flow's only port"
    );
    let (v, out) = run(&b, &tcp(VIP_A, 44000, ACK));
    assert_eq!(verdict::name(v), "XDP_REDIRECT");
    assert_eq!(u16::from_be_bytes([out[34], out[35]]), 20000);
}
