//! Per-packet cost of the XDP balancer under `BPF_PROG_TEST_RUN` (needs root).
//!
//! `cargo run --release -p portico-xdp --example datapath_bench [-- --calls 100000] [--case NAME]`
//!
//! `--case NAME` times only that case and the floor (for profiling one path).
//!
//! Method (as Katran's BpfTester): every call runs the program once (`repeat = 1`) on a fresh
//! copy of the input, and the kernel-measured durations are averaged; `repeat > 1` would feed
//! the rewritten packet back in. Every call's verdict is checked. Each round runs a block of
//! calls per case, rounds rotate so machine noise hits all cases alike; one JSON line per
//! case, then a summary line.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use etherparse::PacketBuilder;
use portico_integration::{fibnet, TestNet};
use portico_xdp::{
    verdict, BackendSpec, Balancer, LoadOptions, NodeConfig, Protocol, ServiceKey, ServiceSpec,
    XdpBalancer, XdpProgram,
};

const VIP4: [u8; 4] = [203, 0, 113, 10];
const VIP6: &str = "fd00:203::10";
const ROUNDS: usize = 10;

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("building a packet");
    out
}

fn udp6(sport: u16) -> Vec<u8> {
    let src: Ipv6Addr = "fd00:18::1".parse().expect("address");
    let dst: Ipv6Addr = VIP6.parse().expect("address");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC)
        .ipv6(src.octets(), dst.octets(), 64)
        .udp(sport, 53)
        .write(&mut out, b"0123456789abcdef")
        .expect("building a packet");
    out
}

struct Case {
    name: &'static str,
    total: Duration,
    calls: u64,
}

impl Case {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            total: Duration::ZERO,
            calls: 0,
        }
    }

    fn ns(&self) -> f64 {
        self.total.as_nanos() as f64 / self.calls.max(1) as f64
    }
}

fn record(case: &mut Case, out: &portico_xdp::TestRunOutput, want: u32) -> Result<()> {
    if out.verdict != want {
        bail!(
            "{}: verdict {} (want {})",
            case.name,
            verdict::name(out.verdict),
            verdict::name(want)
        );
    }
    case.total += out.duration;
    case.calls += 1;
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let calls: usize = match args.iter().position(|a| a == "--calls") {
        Some(i) => args.get(i + 1).context("--calls needs a value")?.parse()?,
        None => 100_000,
    };
    ensure!(calls >= ROUNDS, "--calls must be at least {ROUNDS}");
    let only: Option<String> = match args.iter().position(|a| a == "--case") {
        Some(i) => Some(args.get(i + 1).context("--case needs a value")?.clone()),
        None => None,
    };
    let per_round = calls / ROUNDS;

    let mut net = TestNet::new()?;
    let lb = fibnet::lb_namespace(&mut net)?;
    let program = XdpProgram::load_with(LoadOptions {
        max_services: 16,
        max_backends: 64,
        ring_size: 16381,
        conntrack_entries: 262_144,
        ..LoadOptions::default()
    })?;
    let mut balancer = XdpBalancer::new(program);
    balancer.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(fibnet::SNAT4)),
        snat_v6: Some(fibnet::SNAT6.parse()?),
        snat_ports: (1024, 65535),
        ..NodeConfig::default()
    })?;
    // One-armed (the usual bare-metal node: clients and backends behind the same NIC, so
    // forwarded packets leave by XDP_TX), and backends behind a second NIC (redirect).
    let one_arm = |v6: bool| -> Vec<BackendSpec> {
        (1..=fibnet::ONE_ARM_BACKENDS)
            .map(|i| BackendSpec {
                addr: if v6 {
                    IpAddr::V6(format!("fd00:18::{:x}", 100 + i).parse().expect("address"))
                } else {
                    IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100 + i))
                },
                port: 8080,
                weight: 1,
            })
            .collect()
    };
    let other_nic: Vec<BackendSpec> = (1..=fibnet::BACKENDS)
        .map(|i| BackendSpec {
            addr: IpAddr::V4(Ipv4Addr::new(198, 18, 1, i)),
            port: 8080,
            weight: 1,
        })
        .collect();
    for (vip, port, proto, backends) in [
        (
            IpAddr::V4(Ipv4Addr::from(VIP4)),
            80,
            Protocol::Tcp,
            one_arm(false),
        ),
        (
            IpAddr::V4(Ipv4Addr::from(VIP4)),
            81,
            Protocol::Tcp,
            other_nic,
        ),
        (IpAddr::V6(VIP6.parse()?), 53, Protocol::Udp, one_arm(true)),
    ] {
        balancer.upsert_service(&ServiceSpec {
            key: ServiceKey { vip, port, proto },
            backends,
            hash_source_only: false,
        })?;
    }

    let _in_lb = lb.enter()?;
    let eth0 = fibnet::ifindex("eth0")?;
    let established = tcp4([198, 18, 0, 1], VIP4, 40000, 80, false);
    let established_81 = tcp4([198, 18, 0, 1], VIP4, 40000, 81, false);
    let udp = udp6(50000);
    let not_vip = tcp4([198, 18, 0, 1], [198, 18, 0, 254], 40001, 80, true);
    // Warm: create the tracked flows and the next-hop cache.
    for p in [&tcp4([198, 18, 0, 1], VIP4, 40000, 81, true), &udp] {
        balancer.program().test_run_on(p, Some(eth0))?;
    }
    // The one-armed TCP flow: its SYN tells which backend and SNAT port replies come from.
    let syn = balancer
        .program()
        .test_run_on(&tcp4([198, 18, 0, 1], VIP4, 40000, 80, true), Some(eth0))?;
    ensure!(
        syn.verdict == verdict::TX,
        "the warm-up SYN was not forwarded"
    );
    let (backend, snat_port) = (
        [
            syn.packet[30],
            syn.packet[31],
            syn.packet[32],
            syn.packet[33],
        ],
        u16::from_be_bytes([syn.packet[34], syn.packet[35]]),
    );
    let reply = {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC)
            .ipv4(backend, fibnet::SNAT4, 64)
            .tcp(8080, snat_port, 1, 64240)
            .ack(2)
            .write(&mut out, &[])?;
        out
    };
    // Index 0 is the ratio's numerator, FLOOR its denominator.
    const FLOOR: usize = 4;
    let mut cases = [
        Case::new("tcp4_ct_hit"),
        Case::new("tcp4_new_flow"),
        Case::new("udp6_ct_hit"),
        Case::new("non_vip_pass"),
        Case::new("floor_xdp_tx"),
        Case::new("tcp4_ct_hit_redirect"),
        Case::new("tcp4_reply"),
    ];
    let wanted: Vec<bool> = cases
        .iter()
        .map(|c| only.as_deref().is_none_or(|o| o == c.name) || c.name == "floor_xdp_tx")
        .collect();
    let mut round_ratio = Vec::with_capacity(ROUNDS);
    let mut flow = 0u32;
    for _ in 0..ROUNDS {
        let (hit_before, floor_before) = (cases[0].total, cases[FLOOR].total);
        // Each case runs a block of calls in a row (its maps stay warm, as in a steady
        // stream of that traffic); the blocks rotate across rounds so noise hits all alike.
        for (i, case) in cases.iter_mut().enumerate() {
            if !wanted[i] {
                continue;
            }
            for _ in 0..per_round {
                let (out, want) = match i {
                    0 => (
                        balancer.program().test_run_on(&established, Some(eth0))?,
                        verdict::TX,
                    ),
                    1 => {
                        // A new flow each call: distinct client address and port.
                        flow += 1;
                        let src = [198, 18, 0, 1 + (flow >> 16) as u8];
                        let syn = tcp4(src, VIP4, (flow & 0xffff) as u16 | 1024, 80, true);
                        (
                            balancer.program().test_run_on(&syn, Some(eth0))?,
                            verdict::TX,
                        )
                    }
                    2 => (
                        balancer.program().test_run_on(&udp, Some(eth0))?,
                        verdict::TX,
                    ),
                    3 => (
                        balancer.program().test_run_on(&not_vip, Some(eth0))?,
                        verdict::PASS,
                    ),
                    FLOOR => (
                        balancer
                            .program_mut()
                            .test_run_floor(&established, Some(eth0))?,
                        verdict::TX,
                    ),
                    5 => (
                        balancer
                            .program()
                            .test_run_on(&established_81, Some(eth0))?,
                        verdict::REDIRECT,
                    ),
                    _ => (
                        balancer.program().test_run_on(&reply, Some(eth0))?,
                        verdict::TX,
                    ),
                };
                record(case, &out, want)?;
            }
        }
        let hit = (cases[0].total - hit_before).as_nanos() as f64;
        let floor = (cases[FLOOR].total - floor_before).as_nanos() as f64;
        round_ratio.push(hit / floor.max(1.0));
    }
    for c in cases.iter().filter(|c| c.calls > 0) {
        println!(
            "{{\"case\":\"{}\",\"ns_per_pkt\":{:.1},\"calls\":{}}}",
            c.name,
            c.ns(),
            c.calls
        );
    }
    round_ratio.sort_by(f64::total_cmp);
    let median_ratio = round_ratio[ROUNDS / 2];
    eprintln!(
        "tcp4_ct_hit / floor_xdp_tx: {:.2} overall, per-round median {median_ratio:.2} (min {:.2}, max {:.2})",
        cases[0].ns() / cases[FLOOR].ns(),
        round_ratio[0],
        round_ratio[ROUNDS - 1]
    );
    println!(
        "{{\"tcp4_ct_hit_over_floor\":{:.2},\"tcp4_new_flow_over_floor\":{:.2},\"round_median_ct_hit_over_floor\":{median_ratio:.2}}}",
        cases[0].ns() / cases[FLOOR].ns(),
        cases[1].ns() / cases[FLOOR].ns()
    );
    Ok(())
}
