//! Per-packet cost of the XDP balancer under `BPF_PROG_TEST_RUN` (needs root).
//!
//! `cargo run --release -p portico-xdp --example datapath_bench [-- --calls 100000]
//! [--case NAME] [--flow-cache ENTRIES]`
//!
//! The flow cache has 2^20 slots per CPU unless `--flow-cache` says otherwise (the loader's
//! default is 4,096): the many-flow cases run on one CPU.
//!
//! Method (as Katran's BpfTester): every call runs the program once (`repeat = 1`) on a fresh
//! copy of the input, and the kernel-measured durations are averaged; `repeat > 1` would feed
//! the rewritten packet back in. Every call's verdict is checked. Rounds alternate a block of
//! calls of a case with a block of the floor (a program that swaps the MACs and sends the
//! frame back), so machine noise hits both alike; ratios are per-round medians. The thread
//! stays on one CPU (the flow cache and LRU lists are per CPU). Before each case the
//! presence filters are rebuilt if the flows earlier cases left make them due, as a node's
//! upkeep does (there, at most every five seconds).
//!
//! Parts, in one run:
//! 1. One flow: `tcp4_ct_hit`, `udp6_ct_hit`, `tcp4_ct_hit_redirect`, `tcp4_reply`,
//!    `non_vip_pass`; `tcp4_new_flow` / `tcp6_new_flow` (a new client's SYN every call),
//!    `tcp4_new_flow_confirm` (a new flow's first ACK, which confirms it).
//! 2. Many flows: ACKs round-robin over N established flows (N = 1, 1,000, 10,000,
//!    100,000) from random client addresses and ports, IPv4 and IPv6, with the flow cache's
//!    hit rate; replies (backend → SNAT address) round-robin over 10,000 established
//!    flows (`tcp4_reply_n10000`). Then, beside the flows those cases left tracked, the
//!    presence filters' rebuild (`filter_rebuild`, its time) and
//!    `tcp4_new_flow_full_table`: new flows' SYNs with the filter sized for a full table.
//! 3. SNAT port picks: new flows to a one-backend service whose ports are 10 %, 50 % and
//!    90 % taken.
//!
//! One JSON line per case, then the summary line:
//! `{"ct_hit_over_floor_n1":..,"ct_hit_over_floor_n1000":..,"ct_hit_over_floor_n10000":..,
//! "ct_hit_over_floor_n100000":..,"new_flow_over_floor":..}` (IPv4; IPv6 on the line before).
//! `--case NAME` runs the cases whose name contains NAME, `--case =NAME` that case only;
//! several, separated by commas.

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
use portico_xdp_common::stat;

const VIP4: [u8; 4] = [203, 0, 113, 10];
const VIP6: [u8; 16] = [0xfd, 0, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
const ROUNDS: usize = 10;
/// SNAT source ports: 64,512 of them.
const SNAT_PORTS: (u16, u16) = (1024, 65535);
/// The listener whose one backend's SNAT ports the port-pick part fills.
const PICK_PORT: u16 = 82;

/// The backend's ACK to an IPv4 SYN the balancer forwarded (`forwarded`: that SYN as it
/// left the node): from the backend's address and port 8080 to the SNAT address and port
/// the SYN carried.
fn backend_ack(forwarded: &[u8]) -> Result<Vec<u8>> {
    let backend: [u8; 4] = forwarded[30..34].try_into()?;
    let snat_port = u16::from_be_bytes([forwarded[34], forwarded[35]]);
    let mut out = Vec::new();
    PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC)
        .ipv4(backend, fibnet::SNAT4, 64)
        .tcp(8080, snat_port, 1, 64240)
        .ack(2)
        .write(&mut out, &[])?;
    Ok(out)
}

fn tcp(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC);
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("one family"),
    }
    .tcp(sport, dport, 1, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::new();
    b.write(&mut out, &[]).expect("building a packet");
    out
}

fn udp6(sport: u16) -> Vec<u8> {
    let src: Ipv6Addr = "fd00:18::1".parse().expect("address");
    let mut out = Vec::new();
    PacketBuilder::ethernet2(fibnet::CLIENT_MAC, fibnet::LB0_MAC)
        .ipv6(src.octets(), VIP6, 64)
        .udp(sport, 53)
        .write(&mut out, b"0123456789abcdef")
        .expect("building a packet");
    out
}

fn vip(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(VIP6))
    } else {
        IpAddr::V4(Ipv4Addr::from(VIP4))
    }
}

/// A deterministic source of client addresses and ports.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A random client: IPv4 in 10/8, IPv6 in fd00:c1::/64; a port from 1024.
    fn client(&mut self, v6: bool) -> (IpAddr, u16) {
        let r = self.next();
        let port = 1024 + (r >> 48) as u16 % 64000;
        let addr = if v6 {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[0xfd, 0, 0, 0xc1]);
            a[8..].copy_from_slice(&self.next().to_be_bytes());
            IpAddr::V6(Ipv6Addr::from(a))
        } else {
            IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (r as u32 & 0x00ff_ffff)))
        };
        (addr, port)
    }
}

/// Accumulated kernel time and calls of a case, and of the floor in the same rounds.
#[derive(Default)]
struct Timing {
    total: Duration,
    calls: u64,
    floor_total: Duration,
    floor_calls: u64,
    ratios: Vec<f64>,
}

impl Timing {
    fn ns(&self) -> f64 {
        self.total.as_nanos() as f64 / self.calls.max(1) as f64
    }
    fn floor_ns(&self) -> f64 {
        self.floor_total.as_nanos() as f64 / self.floor_calls.max(1) as f64
    }
    fn median_ratio(&mut self) -> f64 {
        self.ratios.sort_by(f64::total_cmp);
        self.ratios
            .get(self.ratios.len() / 2)
            .copied()
            .unwrap_or(f64::NAN)
    }
}

struct Bench {
    balancer: XdpBalancer,
    eth0: u32,
    floor_packet: Vec<u8>,
}

impl Bench {
    fn run(&self, packet: &[u8], want: u32, what: &str) -> Result<Duration> {
        let out = self
            .balancer
            .program()
            .test_run_on(packet, Some(self.eth0))?;
        if out.verdict != want {
            bail!(
                "{what}: verdict {} (want {})",
                verdict::name(out.verdict),
                verdict::name(want)
            );
        }
        Ok(out.duration)
    }

    fn floor(&mut self) -> Result<Duration> {
        let out = self
            .balancer
            .program_mut()
            .test_run_floor(&self.floor_packet, Some(self.eth0))?;
        ensure!(
            out.verdict == verdict::TX,
            "floor: {}",
            verdict::name(out.verdict)
        );
        Ok(out.duration)
    }

    /// `rounds` rounds of `per_round` calls of `case` (given the call's index), each
    /// followed by as many floor calls.
    fn time(
        &mut self,
        per_round: usize,
        mut case: impl FnMut(&mut Self, usize) -> Result<Duration>,
    ) -> Result<Timing> {
        let mut t = Timing::default();
        let mut i = 0;
        for _ in 0..ROUNDS {
            let (mut c, mut f) = (Duration::ZERO, Duration::ZERO);
            for _ in 0..per_round {
                c += case(self, i)?;
                i += 1;
            }
            for _ in 0..per_round {
                f += self.floor()?;
            }
            t.total += c;
            t.floor_total += f;
            t.calls += per_round as u64;
            t.floor_calls += per_round as u64;
            t.ratios
                .push(c.as_nanos() as f64 / f.as_nanos().max(1) as f64);
        }
        Ok(t)
    }

    /// The node's upkeep between cases: the presence filters rebuilt if due.
    fn upkeep(&mut self) -> Result<()> {
        let program = self.balancer.program_mut();
        if program.filters_due()? {
            program.rebuild_filters()?;
        }
        Ok(())
    }

    fn stat(&self, idx: u32) -> Result<u64> {
        Ok(self.balancer.program().stat(idx)?)
    }
}

fn report(name: &str, t: &mut Timing, extra: &str) -> f64 {
    let ratio = t.median_ratio();
    println!(
        "{{\"case\":\"{name}\",\"ns_per_pkt\":{:.1},\"floor_ns\":{:.1},\"over_floor\":{ratio:.2},\"calls\":{}{extra}}}",
        t.ns(),
        t.floor_ns(),
        t.calls
    );
    ratio
}

fn pin_to_cpu(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        ensure!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0,
            "pinning to CPU {cpu}"
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| -> Result<Option<String>> {
        Ok(match args.iter().position(|a| a == name) {
            Some(i) => Some(args.get(i + 1).context("a value")?.clone()),
            None => None,
        })
    };
    let calls: usize = arg("--calls")?.map_or(Ok(100_000), |v| v.parse())?;
    ensure!(calls >= ROUNDS, "--calls must be at least {ROUNDS}");
    let only = arg("--case")?;
    // The largest the loader takes: 100,000 flows on one CPU need it (a slot of their own
    // for 91 % of them).
    let flow_cache_entries: u32 = arg("--flow-cache")?.map_or(Ok(1 << 20), |v| v.parse())?;
    // `--case =NAME`: that case only.
    let wanted = |name: &str| {
        only.as_deref().is_none_or(|o| {
            o.split(',')
                .any(|o| o.strip_prefix('=').map_or(name.contains(o), |e| name == e))
        })
    };
    let per_round = calls / ROUNDS;

    let mut net = TestNet::new()?;
    let lb = fibnet::lb_namespace(&mut net)?;
    let program = XdpProgram::load_with(LoadOptions {
        max_services: 16,
        max_backends: 128,
        ring_size: 16381,
        // 262,144 per CPU: every case's flows fit (an LRU table that overflows keeps the
        // entries it saw used, and evicts the flows a case just established).
        conntrack_entries: 524_288,
        flow_cache_entries,
    })?;
    let mut balancer = XdpBalancer::new(program);
    balancer.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(fibnet::SNAT4)),
        snat_v6: Some(fibnet::SNAT6.parse()?),
        snat_ports: SNAT_PORTS,
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
    for (v6, port, proto, backends) in [
        (false, 80, Protocol::Tcp, one_arm(false)),
        (false, 81, Protocol::Tcp, other_nic),
        (
            false,
            PICK_PORT,
            Protocol::Tcp,
            vec![BackendSpec {
                addr: IpAddr::V4(Ipv4Addr::from(fibnet::BACKEND_ON_ETH0)),
                port: 8080,
                weight: 1,
            }],
        ),
        (true, 53, Protocol::Udp, one_arm(true)),
        (true, 443, Protocol::Tcp, one_arm(true)),
    ] {
        balancer.upsert_service(&ServiceSpec {
            key: ServiceKey {
                vip: vip(v6),
                port,
                proto,
            },
            backends,
            hash_source_only: false,
            preserve_source: false,
            forwarding: Default::default(),
        })?;
    }

    let _in_lb = lb.enter()?;
    pin_to_cpu(0)?;
    println!(
        "{{\"flow_cache_entries_per_cpu\":{flow_cache_entries},\"conntrack_entries\":524288}}"
    );
    let eth0 = fibnet::ifindex("eth0")?;
    let client4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1));
    let established = tcp(client4, vip(false), 40000, 80, false);
    let mut bench = Bench {
        balancer,
        eth0,
        floor_packet: established.clone(),
    };
    let mut rng = Rng(0x5052_5443);

    // ---- 1. one flow ----
    let established_81 = tcp(client4, vip(false), 40000, 81, false);
    let udp = udp6(50000);
    let not_vip = tcp(
        client4,
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, 254)),
        40001,
        80,
        true,
    );
    for p in [&tcp(client4, vip(false), 40000, 81, true), &udp, &udp] {
        bench.balancer.program().test_run_on(p, Some(eth0))?;
    }
    // The one-armed TCP flow: its SYN tells which backend and SNAT port replies come from.
    let syn = bench
        .balancer
        .program()
        .test_run_on(&tcp(client4, vip(false), 40000, 80, true), Some(eth0))?;
    ensure!(
        syn.verdict == verdict::TX,
        "the warm-up SYN was not forwarded"
    );
    for p in [&established, &established_81] {
        bench.balancer.program().test_run_on(p, Some(eth0))?;
    }
    let reply = backend_ack(&syn.packet)?;
    let mut new_flow_ratio = (f64::NAN, f64::NAN);
    type Case<'a> = (
        &'static str,
        Box<dyn FnMut(&mut Bench, usize) -> Result<Duration> + 'a>,
    );
    let one_flow: Vec<Case> = vec![
        (
            "tcp4_ct_hit",
            Box::new(|b, _| b.run(&established, verdict::TX, "tcp4_ct_hit")),
        ),
        (
            "tcp4_new_flow",
            Box::new(|b, i| {
                // A new flow each call: distinct client address and port.
                let src = IpAddr::V4(Ipv4Addr::from(0x6440_0000 | (i as u32 >> 14)));
                let p = tcp(src, vip(false), 1024 + (i & 0x3fff) as u16, 80, true);
                b.run(&p, verdict::TX, "tcp4_new_flow")
            }),
        ),
        (
            "tcp4_new_flow_confirm",
            Box::new(|b, i| {
                // A new flow's SYN (not timed), then its first ACK, which confirms it.
                let src = IpAddr::V4(Ipv4Addr::from(0x6480_0000 | (i as u32 >> 14)));
                let sport = 1024 + (i & 0x3fff) as u16;
                b.run(
                    &tcp(src, vip(false), sport, 80, true),
                    verdict::TX,
                    "confirm's SYN",
                )?;
                let p = tcp(src, vip(false), sport, 80, false);
                b.run(&p, verdict::TX, "tcp4_new_flow_confirm")
            }),
        ),
        (
            "tcp6_new_flow",
            Box::new(|b, i| {
                let mut a = [0u8; 16];
                a[..4].copy_from_slice(&[0xfd, 0, 0, 0xc2]);
                a[12..].copy_from_slice(&(i as u32 >> 14).to_be_bytes());
                let src = IpAddr::V6(Ipv6Addr::from(a));
                let p = tcp(src, vip(true), 1024 + (i & 0x3fff) as u16, 443, true);
                b.run(&p, verdict::TX, "tcp6_new_flow")
            }),
        ),
        (
            "udp6_ct_hit",
            Box::new(|b, _| b.run(&udp, verdict::TX, "udp6_ct_hit")),
        ),
        (
            "non_vip_pass",
            Box::new(|b, _| b.run(&not_vip, verdict::PASS, "non_vip_pass")),
        ),
        (
            "tcp4_ct_hit_redirect",
            Box::new(|b, _| b.run(&established_81, verdict::REDIRECT, "redirect")),
        ),
        (
            "tcp4_reply",
            Box::new(|b, _| b.run(&reply, verdict::TX, "tcp4_reply")),
        ),
    ];
    for (name, mut case) in one_flow {
        if !wanted(name) {
            continue;
        }
        bench.upkeep()?;
        let mut t = bench.time(per_round, |b, i| case(b, i))?;
        let r = report(name, &mut t, "");
        match name {
            "tcp4_new_flow" => new_flow_ratio.0 = r,
            "tcp6_new_flow" => new_flow_ratio.1 = r,
            _ => {}
        }
    }

    // ---- 2. many flows ----
    let mut many = [[f64::NAN; 4]; 2];
    for (f, v6) in [false, true].into_iter().enumerate() {
        for (k, n) in [1usize, 1_000, 10_000, 100_000].into_iter().enumerate() {
            let name = format!("tcp{}_ct_hit_n{n}", if v6 { 6 } else { 4 });
            if !wanted(&name) {
                continue;
            }
            let (port, vaddr) = (if v6 { 443 } else { 80 }, vip(v6));
            let acks: Vec<Vec<u8>> = (0..n)
                .map(|_| {
                    let (src, sport) = rng.client(v6);
                    tcp(src, vaddr, sport, port, false)
                })
                .collect();
            // Establish: the SYN makes the flow, the ACK caches it.
            for ack in &acks {
                let mut syn = ack.clone();
                let flags = syn.len() - 20 + 13;
                syn[flags] = 0x02;
                bench.run(&syn, verdict::TX, "establishing")?;
                bench.run(ack, verdict::TX, "establishing")?;
            }
            let (hits, slow, misses) = (
                bench.stat(stat::CT_HIT)?,
                bench.stat(stat::CT_SLOW)?,
                bench.stat(stat::CT_MISS)?,
            );
            bench.upkeep()?;
            let per_round = per_round.max(2 * n / ROUNDS);
            let mut t = bench.time(per_round, |b, i| b.run(&acks[i % n], verdict::TX, "ct_hit"))?;
            let hits = bench.stat(stat::CT_HIT)? - hits;
            let slow = bench.stat(stat::CT_SLOW)? - slow;
            let misses = bench.stat(stat::CT_MISS)? - misses;
            ensure!(misses == 0, "{name}: {misses} established flows were lost");
            let hit_rate = 1.0 - slow as f64 / hits.max(1) as f64;
            many[f][k] = report(
                &name,
                &mut t,
                &format!(",\"flow_cache_hit_rate\":{hit_rate:.3}"),
            );
        }
    }

    // ---- 2a. replies of many flows ----
    // Backend → SNAT address replies, round-robin over 10,000 established flows (the
    // reply cache in front of `REV_NAT`). From the one client whose neighbour the node
    // knows (replies to others would pass to the stack), on 10,000 ports.
    if wanted("tcp4_reply_n10000") {
        let n = 10_000;
        let mut replies = Vec::with_capacity(n);
        for i in 0..n {
            let (src, sport) = (client4, 20_000 + i as u16);
            let syn = bench
                .balancer
                .program()
                .test_run_on(&tcp(src, vip(false), sport, 80, true), Some(eth0))?;
            ensure!(
                syn.verdict == verdict::TX,
                "establishing: SYN not forwarded"
            );
            bench.run(
                &tcp(src, vip(false), sport, 80, false),
                verdict::TX,
                "establishing",
            )?;
            replies.push(backend_ack(&syn.packet)?);
        }
        bench.upkeep()?;
        let per_round = per_round.max(2 * n / ROUNDS);
        let mut t = bench.time(per_round, |b, i| {
            b.run(&replies[i % n], verdict::TX, "tcp4_reply_n10000")
        })?;
        report("tcp4_reply_n10000", &mut t, "");
    }

    // ---- 2b. new flows beside a full table ----
    // The many-flow cases left their flows in CONNTRACK and REV_NAT: the node's rebuild of
    // the presence filters (timed), sized for them, then new flows' SYNs (the realistic case of
    // `tcp4_new_flow`, which runs beside an empty table and the smallest filter).
    if wanted("tcp4_new_flow_full_table") {
        let started = std::time::Instant::now();
        let [keys, rev_keys] = bench.balancer.program_mut().rebuild_filters()?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        println!(
            "{{\"case\":\"filter_rebuild\",\"conntrack_keys\":{keys},\"rev_nat_keys\":{rev_keys},\"ms\":{ms:.1}}}"
        );
        let mut t = bench.time(per_round, |b, _| {
            let (src, sport) = rng.client(false);
            b.run(
                &tcp(src, vip(false), sport, 80, true),
                verdict::TX,
                "tcp4_new_flow_full_table",
            )
        })?;
        report(
            "tcp4_new_flow_full_table",
            &mut t,
            &format!(",\"tracked\":{keys}"),
        );
    }

    // ---- 3. SNAT port picks ----
    if wanted("port_pick") {
        let range = usize::from(SNAT_PORTS.1 - SNAT_PORTS.0) + 1;
        let mut filled = 0;
        for percent in [10usize, 50, 90] {
            // Fill the one backend's ports to the level with established flows (SYN, ACK),
            // then time new flows' SYNs (2 % more).
            while filled < range * percent / 100 {
                let (src, sport) = rng.client(false);
                for syn in [true, false] {
                    bench.run(
                        &tcp(src, vip(false), sport, PICK_PORT, syn),
                        verdict::TX,
                        "filling",
                    )?;
                }
                filled += 1;
            }
            let per_round = range / 50 / ROUNDS;
            let mut t = bench.time(per_round, |b, _| {
                let (src, sport) = rng.client(false);
                b.run(
                    &tcp(src, vip(false), sport, PICK_PORT, true),
                    verdict::TX,
                    "port_pick",
                )
            })?;
            filled += per_round * ROUNDS;
            report(
                &format!("tcp4_new_flow_ports_{percent}pct_taken"),
                &mut t,
                "",
            );
        }
    }

    println!(
        "{{\"v6_ct_hit_over_floor_n1\":{:.2},\"v6_ct_hit_over_floor_n1000\":{:.2},\"v6_ct_hit_over_floor_n10000\":{:.2},\"v6_ct_hit_over_floor_n100000\":{:.2},\"v6_new_flow_over_floor\":{:.2}}}",
        many[1][0], many[1][1], many[1][2], many[1][3], new_flow_ratio.1
    );
    println!(
        "{{\"ct_hit_over_floor_n1\":{:.2},\"ct_hit_over_floor_n1000\":{:.2},\"ct_hit_over_floor_n10000\":{:.2},\"ct_hit_over_floor_n100000\":{:.2},\"new_flow_over_floor\":{:.2}}}",
        many[0][0], many[0][1], many[0][2], many[0][3], new_flow_ratio.0
    );
    Ok(())
}
