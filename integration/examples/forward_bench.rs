//! Packets forwarded per second through an LB node on veth, three ways, in one run:
//!
//! ```text
//! cargo run --release -p portico-integration --example forward_bench [-- --seconds 3]
//!     [--rounds 3] [--flows 65536] [--flow-cache SLOTS]
//! ```
//!
//! ```text
//!  client (eth0) ──veth── (eth0) lb (eth1) ──veth── (eth0) sink: 198.18.1.1, .2, .3
//! ```
//!
//! The client floods the VIP (203.0.113.10, UDP port 80) with 60-byte frames from one
//! address and `--flows` random source ports, through an AF_PACKET socket (its own sender,
//! on CPU 1). The LB node forwards them to three backends, all addresses of the sink, whose
//! XDP program counts and drops what arrives: the forwarded rate. The LB node's receive
//! queue runs in its own NAPI thread on CPU 0, so the sender and the forwarding do not share
//! a CPU. Three datapaths on the LB node, one after the other in each round:
//!
//! - `portico`: Portico's XDP program, native, SNAT to the node's backend-side address;
//! - `nftables`: no XDP, the kernel forwards with DNAT and masquerade in kube-proxy's
//!   nftables layout (service map, per-service chain, random endpoint, endpoint chains);
//! - `floor`: a minimal XDP NAT (`xdp_forward_floor`): backend by source port, addresses,
//!   port and checksums rewritten, MACs from a cached next hop, redirect; no state.
//!
//! Portico's flow cache has four slots per flow (`--flow-cache`, default: `--flows` × 4
//! rounded up to a power of two, 262,144 for 65,536 flows), as docs/xdp.md advises; more
//! costs TLB misses for nothing (2^20 slots measured 0.90–0.94 × the floor where 2^18
//! measured 0.94–0.96 in the same runs).
//!
//! Each phase warms up for a second (flows established), then counts for `--seconds`.
//! Per datapath the median of the rounds; the last line is
//! `{"portico_pps":..,"nftables_pps":..,"floor_pps":..}`. Portico's SNAT drops (which must
//! be 0) and the flow cache's hit rate are printed before it. The machine's other load
//! shows in the figures: compare within one run. Needs root.

use std::{
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use portico_integration::{NetNs, TestNet};
use portico_xdp::{
    AttachMode, BackendSpec, Balancer, LoadOptions, NodeConfig, Protocol, ServiceKey, ServiceSpec,
    XdpBalancer, XdpProgram,
};
use portico_xdp_common::{stat, FORWARD_FLOOR_PROGRAM_NAME, SINK_PROGRAM_NAME};

const CLIENT: [u8; 4] = [198, 18, 0, 1];
const SNAT: [u8; 4] = [198, 18, 1, 254];
const VIP: [u8; 4] = [203, 0, 113, 10];
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const BACKENDS: u8 = 3;
/// Frames per sendmmsg call.
const BATCH: usize = 64;
/// The sender's CPU; the LB node's NAPI thread gets the other one.
const SENDER_CPU: usize = 1;
const LB_CPU: usize = 0;

fn backend(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, i)
}

struct Options {
    seconds: f64,
    rounds: usize,
    flows: u32,
    flow_cache: u32,
}

fn options() -> Result<Options> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| -> Result<Option<String>> {
        Ok(match args.iter().position(|a| a == name) {
            Some(i) => Some(args.get(i + 1).context("a value")?.clone()),
            None => None,
        })
    };
    let flows: u32 = arg("--flows")?.map_or(Ok(65_536), |v| v.parse())?;
    let o = Options {
        seconds: arg("--seconds")?.map_or(Ok(3.0), |v| v.parse())?,
        rounds: arg("--rounds")?.map_or(Ok(3), |v| v.parse())?,
        flows,
        flow_cache: arg("--flow-cache")?.map_or_else(
            || Ok(flows.saturating_mul(4).next_power_of_two().min(1 << 20)),
            |v| v.parse(),
        )?,
    };
    ensure!(
        o.rounds > 0 && o.seconds > 0.0,
        "--rounds and --seconds must be positive"
    );
    ensure!(
        (1..=65_536).contains(&o.flows),
        "--flows is a number of source ports, 1 to 65536"
    );
    Ok(o)
}

/// The topology: namespaces, addresses, static neighbours (the sink answers no ARP), the
/// sink program.
struct Net {
    _net: TestNet,
    client: NetNs,
    lb: NetNs,
    lb_mac: [u8; 6],
    client_mac: [u8; 6],
    sink: XdpProgram,
}

fn mac_of(ns: &NetNs, iface: &str) -> Result<[u8; 6]> {
    let text = ns.run(&["cat", &format!("/sys/class/net/{iface}/address")])?;
    let bytes: Vec<u8> = text
        .trim()
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address of {iface}: {text:?}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC address of {iface}: {text:?}"))
}

fn small_program() -> Result<XdpProgram> {
    Ok(XdpProgram::load_with(LoadOptions {
        max_services: 2,
        max_backends: 2,
        ring_size: 251,
        conntrack_entries: 64,
        flow_cache_entries: 64,
    })?)
}

fn build() -> Result<Net> {
    let mut net = TestNet::new()?;
    let client = net.add_ns("cl")?;
    let lb = net.add_ns("lb")?;
    let sink = net.add_ns("sink")?;
    net.veth(&client, "eth0", &lb, "eth0")?;
    net.veth(&lb, "eth1", &sink, "eth0")?;
    client.run(&["ip", "addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
    // Without TSO on the sending side, veth hands frames to the LB node's NAPI queue (not
    // the sender's backlog) whenever GRO is on there: the nftables phase too.
    client.run(&["ethtool", "-K", "eth0", "tso", "off", "gso", "off"])?;
    client.run(&["ip", "route", "add", "default", "via", "198.18.0.254"])?;
    lb.run(&["ip", "addr", "add", "198.18.0.254/24", "dev", "eth0"])?;
    lb.run(&["ip", "addr", "add", "198.18.1.254/24", "dev", "eth1"])?;
    lb.run(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
    for i in 1..=BACKENDS {
        let a = format!("{}/24", backend(i));
        sink.run(&["ip", "addr", "add", &a, "dev", "eth0"])?;
    }
    let sink_mac = mac_of(&sink, "eth0")?;
    let lladdr = sink_mac.map(|b| format!("{b:02x}")).join(":");
    for i in 1..=BACKENDS {
        let a = backend(i).to_string();
        lb.run(&[
            "ip",
            "neigh",
            "replace",
            &a,
            "lladdr",
            &lladdr,
            "dev",
            "eth1",
            "nud",
            "permanent",
        ])?;
    }
    // The LB node's receive side: GRO lets veth use NAPI without XDP too (the nftables
    // phase), threaded NAPI puts it on a CPU of its own.
    lb.run(&["ethtool", "-K", "eth0", "gro", "on"])?;
    let mut sink_prog = small_program()?;
    {
        let _in = sink.enter()?;
        sink_prog.attach_bench_program(SINK_PROGRAM_NAME, "eth0", AttachMode::Native)?;
    }
    let lb_mac = mac_of(&lb, "eth0")?;
    let client_mac = mac_of(&client, "eth0")?;
    Ok(Net {
        _net: net,
        client,
        lb,
        lb_mac,
        client_mac,
        sink: sink_prog,
    })
}

/// Names of the kernel's NAPI threads for an `eth0` (any namespace), with their pids.
fn napi_threads() -> Result<Vec<(i32, String)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let e = e?;
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(comm) = std::fs::read_to_string(e.path().join("comm")) {
            let comm = comm.trim();
            if comm.starts_with("napi/eth0-") {
                out.push((pid, comm.to_owned()));
            }
        }
    }
    Ok(out)
}

fn pin(pid: i32, cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        ensure!(
            libc::sched_setaffinity(pid, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0,
            "pinning {pid} to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Puts the LB node's `eth0` receive queue in a NAPI thread on [`LB_CPU`] (again after
/// each change of its XDP program, which recreates the queue); returns its pid.
fn threaded_napi(lb: &NetNs) -> Result<Vec<i32>> {
    let before = napi_threads()?;
    lb.run(&["sh", "-c", "echo 0 > /sys/class/net/eth0/threaded"])?;
    lb.run(&["sh", "-c", "echo 1 > /sys/class/net/eth0/threaded"])?;
    let ours: Vec<_> = napi_threads()?
        .into_iter()
        .filter(|t| !before.contains(t))
        .collect();
    ensure!(
        !ours.is_empty(),
        "no NAPI thread appeared for the LB node's eth0"
    );
    for &(pid, _) in &ours {
        pin(pid, LB_CPU)?;
    }
    Ok(ours.into_iter().map(|(pid, _)| pid).collect())
}

/// CPU time (user and system, in clock ticks) of the threads `pids`.
fn cpu_ticks(pids: &[i32]) -> Result<u64> {
    let mut total = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command (which may hold spaces), from field 3 on.
        let rest = stat.rsplit_once(')').context("/proc/<pid>/stat")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        total += f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    }
    Ok(total)
}

/// The flood's frames: Ethernet, IPv4 (checksum fixed: only the source port varies), UDP
/// without checksum, 18 bytes of payload: 60 bytes.
fn template(n: &Net) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&n.lb_mac);
    f.extend_from_slice(&n.client_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let ip_len: u16 = 20 + 8 + 18;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&CLIENT);
    ip[16..20].copy_from_slice(&VIP);
    let sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&VIP_PORT.to_be_bytes());
    f.extend_from_slice(&(8u16 + 18).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&[0x5a; 18]);
    f
}

/// The source ports, a random permutation of `flows` of them, from 1024 up.
fn ports(flows: u32) -> Vec<u16> {
    let mut p: Vec<u16> = (0..flows).map(|i| (1024 + i % 64_512) as u16).collect();
    let mut x = 0x5052_5443_u64;
    for i in (1..p.len()).rev() {
        x = x
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        p.swap(i, (x >> 33) as usize % (i + 1));
    }
    p
}

/// The flood, until `stop`: frames sent (or dropped by the full veth queue) in `sent`.
fn sender(
    client: NetNs,
    frame: Vec<u8>,
    ports: Vec<u16>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Result<()> {
    pin(0, SENDER_CPU)?;
    let _in = client.enter()?;
    let ifindex = {
        let name = c"eth0";
        // SAFETY: a NUL-terminated name.
        unsafe { libc::if_nametoindex(name.as_ptr()) }
    };
    ensure!(ifindex != 0, "no eth0 in the client namespace");
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    let result = (|| -> Result<()> {
        // SAFETY: a zeroed sockaddr_ll is valid; fields set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = ifindex as i32;
        // SAFETY: fd is ours; sll lives across the call.
        let r = unsafe {
            libc::bind(
                fd,
                std::ptr::from_ref(&sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        ensure!(
            r == 0,
            "binding to eth0: {}",
            std::io::Error::last_os_error()
        );
        let one: libc::c_int = 1;
        // Straight to the driver: the sender measures the LB node, not a qdisc.
        // SAFETY: fd is ours; `one` lives across the call.
        let r = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        ensure!(
            r == 0,
            "PACKET_QDISC_BYPASS: {}",
            std::io::Error::last_os_error()
        );
        let mut frames = vec![frame; BATCH];
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(BATCH);
        for f in &mut frames {
            iov.push(libc::iovec {
                iov_base: f.as_mut_ptr().cast(),
                iov_len: f.len(),
            });
        }
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: a zeroed mmsghdr is valid; the iovec lives as long as `msgs`.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_iov = std::ptr::from_mut(v);
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut next = 0;
        while !stop.load(Ordering::Relaxed) {
            for f in &mut frames {
                f[34..36].copy_from_slice(&ports[next].to_be_bytes());
                next = (next + 1) % ports.len();
            }
            // SAFETY: fd is ours; msgs point at live buffers.
            let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as u32, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOBUFS) {
                    continue;
                }
                bail!("sendmmsg: {e}");
            }
            sent.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(())
    })();
    // SAFETY: our fd.
    unsafe { libc::close(fd) };
    result
}

/// What a phase measured.
struct Rates {
    /// Frames the sink counted, per second.
    forwarded: f64,
    /// Frames the sender handed to the client's veth, per second (the veth holds the sender
    /// back while the LB node's queue is full).
    offered: f64,
    /// Share of a CPU the LB node's NAPI thread used: near 1, the LB node is the bottleneck.
    lb_cpu: f64,
    /// Portico only, over the counted seconds: (fast-path hits, slow-path hits, SNAT drops).
    counters: (u64, u64, u64),
}

impl Rates {
    /// Frames the LB node would forward per second of a whole CPU.
    fn capacity(&self) -> f64 {
        self.forwarded / self.lb_cpu.max(1e-9)
    }

    fn print(&self, round: usize, datapath: &str) {
        println!(
            "{{\"round\":{round},\"datapath\":\"{datapath}\",\"pps\":{:.0},\"offered_pps\":{:.0},\"lb_cpu\":{:.2},\"pps_per_lb_cpu\":{:.0}}}",
            self.forwarded,
            self.offered,
            self.lb_cpu,
            self.capacity()
        );
    }
}

/// Portico's counters that a phase reports.
fn counters(b: Option<&XdpBalancer>) -> Result<(u64, u64, u64)> {
    let Some(b) = b else {
        return Ok((0, 0, 0));
    };
    let p = b.program();
    Ok((
        p.stat(stat::CT_HIT)?,
        p.stat(stat::CT_SLOW)?,
        p.stat(stat::DROP_NO_SNAT_PORT)?,
    ))
}

/// One phase: a second to warm up, then the rates over `seconds`.
fn measure(
    n: &Net,
    o: &Options,
    (frame, ports): (&[u8], &[u16]),
    napi: &[i32],
    portico: Option<&XdpBalancer>,
) -> Result<Rates> {
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let handle = {
        let (client, frame, ports) = (n.client.clone(), frame.to_vec(), ports.to_vec());
        let (stop, sent) = (stop.clone(), sent.clone());
        thread::spawn(move || sender(client, frame, ports, stop, sent))
    };
    thread::sleep(Duration::from_secs(1));
    let (sink0, sent0, cpu0, c0, t0) = (
        n.sink.stat(stat::PACKETS)?,
        sent.load(Ordering::Relaxed),
        cpu_ticks(napi)?,
        counters(portico)?,
        Instant::now(),
    );
    thread::sleep(Duration::from_secs_f64(o.seconds));
    let (sink1, sent1, cpu1, c1, dt) = (
        n.sink.stat(stat::PACKETS)?,
        sent.load(Ordering::Relaxed),
        cpu_ticks(napi)?,
        counters(portico)?,
        t0.elapsed().as_secs_f64(),
    );
    stop.store(true, Ordering::Relaxed);
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    // Let the queues drain before the next phase.
    thread::sleep(Duration::from_millis(200));
    // SAFETY: plain sysconf(3).
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(Rates {
        forwarded: (sink1 - sink0) as f64 / dt,
        offered: (sent1 - sent0) as f64 / dt,
        lb_cpu: (cpu1 - cpu0) as f64 / ticks / dt,
        counters: (c1.0 - c0.0, c1.1 - c0.1, c1.2 - c0.2),
    })
}

fn service() -> ServiceSpec {
    ServiceSpec {
        key: ServiceKey {
            vip: Ipv4Addr::from(VIP).into(),
            port: VIP_PORT,
            proto: Protocol::Udp,
        },
        backends: (1..=BACKENDS)
            .map(|i| BackendSpec {
                addr: backend(i).into(),
                port: BACKEND_PORT,
                weight: 1,
            })
            .collect(),
        hash_source_only: false,
        preserve_source: false,
        forwarding: Default::default(),
    }
}

/// A balancer for the LB node: SNAT from its backend-side address over the whole port
/// range, tables for every flow on one CPU.
fn balancer(o: &Options) -> Result<XdpBalancer> {
    let program = XdpProgram::load_with(LoadOptions {
        max_services: 4,
        max_backends: 8,
        ring_size: 4093,
        // Per CPU: half; the flows all arrive on one.
        conntrack_entries: 4 * 65_536,
        flow_cache_entries: o.flow_cache,
    })?;
    let mut b = XdpBalancer::new(program);
    b.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(SNAT)),
        snat_ports: (1024, 65535),
        ..NodeConfig::default()
    })?;
    b.upsert_service(&service())?;
    Ok(b)
}

/// kube-proxy's nftables layout for one LoadBalancer IP with three endpoints (the chains a
/// packet of it goes through; names shortened).
fn nft_rules() -> String {
    let mut endpoints = String::new();
    let mut vmap = Vec::new();
    for i in 1..=BACKENDS {
        let be = backend(i);
        endpoints.push_str(&format!(
            "  chain endpoint-{i} {{\n    ip saddr {be} jump mark-for-masquerade\n    \
             meta l4proto udp dnat to {be}:{BACKEND_PORT}\n  }}\n"
        ));
        vmap.push(format!("{} : goto endpoint-{i}", i - 1));
    }
    let vip = Ipv4Addr::from(VIP);
    format!(
        "table ip kube-proxy {{
  map service-ips {{
    type ipv4_addr . inet_proto . inet_service : verdict
    elements = {{ {vip} . udp . {VIP_PORT} : goto external-svc }}
  }}
  map no-endpoint-services {{
    type ipv4_addr . inet_proto . inet_service : verdict
  }}
  chain filter-forward {{
    type filter hook forward priority -110; policy accept;
    ct state new jump service-endpoints-check
  }}
  chain service-endpoints-check {{
    ip daddr . meta l4proto . th dport vmap @no-endpoint-services
  }}
  chain mark-for-masquerade {{
    meta mark set meta mark or 0x4000
  }}
  chain masquerading {{
    meta mark & 0x4000 == 0 return
    meta mark set meta mark xor 0x4000
    masquerade fully-random
  }}
  chain services {{
    ip daddr . meta l4proto . th dport vmap @service-ips
  }}
  chain nat-prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    jump services
  }}
  chain nat-postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    jump masquerading
  }}
  chain external-svc {{
    jump mark-for-masquerade
    goto service-svc
  }}
  chain service-svc {{
    numgen random mod {BACKENDS} vmap {{ {} }}
  }}
{endpoints}}}
",
        vmap.join(", ")
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let o = options()?;
    let n = build()?;
    let frame = template(&n);
    let ports = ports(o.flows);
    let flood = (frame.as_slice(), ports.as_slice());
    let (mut portico, mut nft, mut floor) = (Vec::new(), Vec::new(), Vec::new());
    let (mut snat_drops, mut hits, mut slow) = (0, 0, 0);
    for round in 0..o.rounds {
        // Portico.
        {
            let mut b = balancer(&o)?;
            {
                let _in = n.lb.enter()?;
                b.program_mut().attach("eth0", AttachMode::Native)?;
            }
            let napi = threaded_napi(&n.lb)?;
            let r = measure(&n, &o, flood, &napi, Some(&b))?;
            hits += r.counters.0;
            slow += r.counters.1;
            // Over the whole phase: the first packets of every flow too.
            snat_drops += b.program().stat(stat::DROP_NO_SNAT_PORT)?;
            r.print(round, "portico");
            portico.push(r);
        }
        // nftables: the kernel forwards.
        {
            let path =
                std::env::temp_dir().join(format!("forward_bench-{}.nft", std::process::id()));
            std::fs::write(&path, nft_rules())?;
            n.lb.run(&["nft", "-f", &path.to_string_lossy()])?;
            std::fs::remove_file(&path)?;
            let napi = threaded_napi(&n.lb)?;
            let r = measure(&n, &o, flood, &napi, None)?;
            n.lb.run(&["nft", "delete", "table", "ip", "kube-proxy"])?;
            r.print(round, "nftables");
            nft.push(r);
        }
        // The floor, on the maps of a balancer whose next hops are resolved.
        {
            let mut b = balancer(&o)?;
            {
                let _in = n.lb.enter()?;
                let eth0 = {
                    let name = c"eth0";
                    // SAFETY: a NUL-terminated name.
                    unsafe { libc::if_nametoindex(name.as_ptr()) }
                };
                let mut f = frame.clone();
                for port in 0..64u16 {
                    f[34..36].copy_from_slice(&(1024 + port).to_be_bytes());
                    b.program().test_run_on(&f, Some(eth0))?;
                }
                b.program_mut().attach_bench_program(
                    FORWARD_FLOOR_PROGRAM_NAME,
                    "eth0",
                    AttachMode::Native,
                )?;
            }
            let napi = threaded_napi(&n.lb)?;
            let r = measure(&n, &o, flood, &napi, None)?;
            r.print(round, "floor");
            floor.push(r);
        }
    }
    let hit_rate = 1.0 - slow as f64 / hits.max(1) as f64;
    let med = |v: &[Rates], f: fn(&Rates) -> f64| median(v.iter().map(f).collect());
    println!(
        "{{\"portico_snat_drops\":{snat_drops},\"portico_flow_cache_hit_rate\":{hit_rate:.4},\"flows\":{},\"flow_cache_entries_per_cpu\":{}}}",
        o.flows, o.flow_cache
    );
    println!(
        "{{\"portico_pps_per_lb_cpu\":{:.0},\"nftables_pps_per_lb_cpu\":{:.0},\"floor_pps_per_lb_cpu\":{:.0}}}",
        med(&portico, Rates::capacity),
        med(&nft, Rates::capacity),
        med(&floor, Rates::capacity)
    );
    println!(
        "{{\"portico_pps\":{:.0},\"nftables_pps\":{:.0},\"floor_pps\":{:.0}}}",
        med(&portico, |r| r.forwarded),
        med(&nft, |r| r.forwarded),
        med(&floor, |r| r.forwarded)
    );
    Ok(())
}
