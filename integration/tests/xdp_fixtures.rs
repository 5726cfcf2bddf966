//! BPF_PROG_TEST_RUN fixture table for the XDP balancer, as Katran's BpfTester:
//! `{description, input packet, expected verdict, expected output packet}`.
//!
//! The program runs "inside" a throwaway namespace (`lb`) whose interfaces, addresses and
//! permanent neighbour entries make `bpf_fib_lookup` resolve for real: clients sit behind
//! `eth0`, backends behind `eth1` (one backend also behind `eth0`, for the XDP_TX case).
//! Expected packets are built by a reference NAT that rewrites the input and recomputes
//! every checksum from scratch (independent of the program's incremental updates).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    icmpv4::DestUnreachableHeader, Icmpv4Type, Icmpv6Type, IpNumber, PacketBuilder, VlanId,
};
use portico_integration::{
    fibnet,
    sctp::{self, chunk, data_chunk, init_chunk},
    TestNet,
};
use portico_xdp::{
    verdict, BackendSpec, Balancer, LoadOptions, NodeConfig, Protocol, ServiceKey, ServiceSpec,
    XdpBalancer, XdpProgram,
};
use portico_xdp_common::stat;

use fibnet::{CLIENT_MAC, LB0_MAC, LB1_MAC};
const BE_MAC: [[u8; 6]; 3] = [
    [0x02, 0xbe, 0, 0, 0, 1],
    [0x02, 0xbe, 0, 0, 0, 2],
    [0x02, 0xbe, 0, 0, 0, 3],
];
const BE0_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x10];

const CLIENT4: [u8; 4] = [198, 18, 0, 1];
const CLIENT4B: [u8; 4] = [198, 18, 0, 2];
const VIP4: [u8; 4] = [203, 0, 113, 10];
const VIP4_TX: [u8; 4] = [203, 0, 113, 11];
const VIP4_DRAINED: [u8; 4] = [203, 0, 113, 12];
const VIP4_EMPTY: [u8; 4] = [203, 0, 113, 13];
/// NAT46: its backends are `BACKENDS6`.
const VIP4_46: [u8; 4] = [203, 0, 113, 46];
const SNAT4: [u8; 4] = [198, 18, 1, 254];
const BACKENDS4: [[u8; 4]; 3] = [[198, 18, 1, 1], [198, 18, 1, 2], [198, 18, 1, 3]];
const BACKEND4_ETH0: [u8; 4] = [198, 18, 0, 10];

const CLIENT6: [u8; 16] = ip6("fd00:18::1");
const VIP6: [u8; 16] = ip6("fd00:203::10");
/// NAT64: its backends are `BACKENDS4`.
const VIP6_64: [u8; 16] = ip6("fd00:203::64");
const SNAT6: [u8; 16] = ip6("fd00:18:1::fe");
const BACKENDS6: [[u8; 16]; 3] = [
    ip6("fd00:18:1::1"),
    ip6("fd00:18:1::2"),
    ip6("fd00:18:1::3"),
];

const fn ip6(s: &str) -> [u8; 16] {
    // Tiny const parser for the fixed, fully written-out forms used here ("fd00:18:1::1").
    let b = s.as_bytes();
    let mut groups = [0u16; 8];
    let mut n = 0;
    let mut i = 0;
    let mut cur: u16 = 0;
    let mut tail_start = 8;
    while i < b.len() {
        let c = b[i];
        if c == b':' {
            groups[n] = cur;
            n += 1;
            cur = 0;
            if i + 1 < b.len() && b[i + 1] == b':' {
                tail_start = n;
                i += 1;
            }
        } else {
            let d = if c >= b'a' { c - b'a' + 10 } else { c - b'0' };
            cur = cur * 16 + d as u16;
        }
        i += 1;
    }
    groups[n] = cur;
    n += 1;
    let mut out = [0u8; 16];
    if tail_start == 8 {
        let mut g = 0;
        while g < 8 {
            out[2 * g] = (groups[g] >> 8) as u8;
            out[2 * g + 1] = groups[g] as u8;
            g += 1;
        }
    } else {
        let head = tail_start;
        let tail = n - head;
        let mut g = 0;
        while g < head {
            out[2 * g] = (groups[g] >> 8) as u8;
            out[2 * g + 1] = groups[g] as u8;
            g += 1;
        }
        let mut t = 0;
        while t < tail {
            let pos = 8 - tail + t;
            out[2 * pos] = (groups[head + t] >> 8) as u8;
            out[2 * pos + 1] = groups[head + t] as u8;
            t += 1;
        }
    }
    out
}

// ---------- packet construction ----------

#[derive(Clone, Copy)]
enum L4 {
    Tcp { flags: u8 },
    Udp,
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;
const SYNACK: u8 = 0x12;

#[derive(Clone, Copy)]
enum Vlan {
    None,
    Single(u16),
    Double(u16, u16),
}

#[allow(
    clippy::too_many_arguments,
    reason = "one argument per header field a fixture varies"
)]
fn build(
    smac: [u8; 6],
    dmac: [u8; 6],
    vlan: Vlan,
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    l4: L4,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(smac, dmac);
    let ipb = match vlan {
        Vlan::None => match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
            (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
            _ => unreachable!(),
        },
        Vlan::Single(id) => {
            let v = eth.single_vlan(VlanId::try_new(id).unwrap());
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => v.ipv4(s.octets(), d.octets(), ttl),
                (IpAddr::V6(s), IpAddr::V6(d)) => v.ipv6(s.octets(), d.octets(), ttl),
                _ => unreachable!(),
            }
        }
        Vlan::Double(o, i) => {
            let v = eth.double_vlan(VlanId::try_new(o).unwrap(), VlanId::try_new(i).unwrap());
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => v.ipv4(s.octets(), d.octets(), ttl),
                (IpAddr::V6(s), IpAddr::V6(d)) => v.ipv6(s.octets(), d.octets(), ttl),
                _ => unreachable!(),
            }
        }
    };
    let mut out = Vec::new();
    match l4 {
        L4::Tcp { flags } => {
            let mut b = ipb.tcp(sport, dport, 1000, 64240);
            if flags & SYN != 0 {
                b = b.syn();
            }
            if flags & ACK != 0 {
                b = b.ack(1);
            }
            if flags & FIN != 0 {
                b = b.fin();
            }
            b.write(&mut out, payload).unwrap();
        }
        L4::Udp => ipb.udp(sport, dport).write(&mut out, payload).unwrap(),
    }
    out
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}
fn v6(a: [u8; 16]) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(a))
}

fn tcp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    build(
        CLIENT_MAC,
        LB0_MAC,
        Vlan::None,
        v4(src),
        v4(dst),
        64,
        L4::Tcp { flags },
        sport,
        dport,
        b"",
    )
}
fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    build(
        CLIENT_MAC,
        LB0_MAC,
        Vlan::None,
        v4(src),
        v4(dst),
        64,
        L4::Udp,
        sport,
        dport,
        payload,
    )
}
fn tcp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    build(
        CLIENT_MAC,
        LB0_MAC,
        Vlan::None,
        v6(src),
        v6(dst),
        64,
        L4::Tcp { flags },
        sport,
        dport,
        b"",
    )
}
fn udp6(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    build(
        CLIENT_MAC,
        LB0_MAC,
        Vlan::None,
        v6(src),
        v6(dst),
        64,
        L4::Udp,
        sport,
        dport,
        payload,
    )
}

fn echo4(src: [u8; 4], dst: [u8; 4], request: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB0_MAC).ipv4(src, dst, 64);
    if request {
        b.icmpv4_echo_request(1, 1)
            .write(&mut out, b"ping")
            .unwrap();
    } else {
        b.icmpv4_echo_reply(1, 1).write(&mut out, b"ping").unwrap();
    }
    out
}

fn echo_reply4() -> Vec<u8> {
    let mut p = echo4(VIP4, CLIENT4, false);
    p[0..6].copy_from_slice(&CLIENT_MAC);
    p[6..12].copy_from_slice(&LB0_MAC);
    p
}

fn echo6(src: [u8; 16], dst: [u8; 16], request: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let b = PacketBuilder::ethernet2(CLIENT_MAC, LB0_MAC).ipv6(src, dst, 64);
    if request {
        b.icmpv6_echo_request(1, 1)
            .write(&mut out, b"ping6")
            .unwrap();
    } else {
        b.icmpv6_echo_reply(1, 1).write(&mut out, b"ping6").unwrap();
    }
    out
}

/// An IP packet without its Ethernet header (what an ICMP error quotes).
fn l3_of(frame: Vec<u8>) -> Vec<u8> {
    frame[14..].to_vec()
}

/// Inserts IPv4 options (a multiple of 4 bytes) after the fixed header of an untagged packet.
fn with_ipv4_options(p: &[u8], options: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let mut out = p[..34].to_vec();
    out.extend_from_slice(options);
    out.extend_from_slice(&p[34..]);
    out[14] = 0x40 | ((20 + options.len()) / 4) as u8;
    let tot = u16::from_be_bytes([out[16], out[17]]) + options.len() as u16;
    out[16..18].copy_from_slice(&tot.to_be_bytes());
    let ihl = 20 + options.len();
    out[24..26].copy_from_slice(&[0, 0]);
    let c = ones_sum_finish(ones_sum(&out[14..14 + ihl], 0));
    out[24..26].copy_from_slice(&c.to_be_bytes());
    out
}

/// Inserts IPv6 extension headers (each `(type, bytes)`, bytes including the next-header and
/// length fields, whose next-header is patched here) after the fixed header.
fn with_ipv6_ext(p: &[u8], exts: &[(u8, Vec<u8>)]) -> Vec<u8> {
    let mut out = p[..54].to_vec();
    let upper = out[20];
    out[20] = exts[0].0;
    let mut added = 0;
    for (i, (_, bytes)) in exts.iter().enumerate() {
        let mut b = bytes.clone();
        b[0] = exts.get(i + 1).map_or(upper, |e| e.0);
        added += b.len();
        out.extend_from_slice(&b);
    }
    out.extend_from_slice(&p[54..]);
    let plen = u16::from_be_bytes([out[18], out[19]]) + added as u16;
    out[18..20].copy_from_slice(&plen.to_be_bytes());
    out
}

/// Sets the IPv4 total length of an untagged frame and recomputes the header checksum.
fn with_ipv4_total_length(p: &[u8], tot: u16) -> Vec<u8> {
    let mut out = p.to_vec();
    out[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(&mut out);
    out
}

/// Recomputes the IPv4 header checksum of an untagged frame.
fn fix_ipv4_checksum(p: &mut [u8]) {
    let ihl = usize::from(p[14] & 0x0f) * 4;
    p[24..26].copy_from_slice(&[0, 0]);
    let c = ones_sum_finish(ones_sum(&p[14..14 + ihl], 0));
    p[24..26].copy_from_slice(&c.to_be_bytes());
}

/// Sets the IPv6 payload length of an untagged frame.
fn with_ipv6_payload_length(p: &[u8], len: u16) -> Vec<u8> {
    let mut out = p.to_vec();
    out[18..20].copy_from_slice(&len.to_be_bytes());
    out
}

fn opts_ext(len8: usize) -> Vec<u8> {
    // PadN filling the header.
    let total = (len8 + 1) * 8;
    let mut b = vec![0u8; total];
    b[1] = len8 as u8;
    b[2] = 1;
    b[3] = (total - 4) as u8;
    b
}

// ---------- reference NAT with full checksum recomputation ----------

fn ones_sum(data: &[u8], mut acc: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn ones_sum_finish(mut acc: u32) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

struct Layout {
    l3: usize,
    l4: usize,
    v6: bool,
    proto: u8,
}

fn layout(p: &[u8]) -> Layout {
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([p[12], p[13]]);
    while et == 0x8100 || et == 0x88a8 {
        et = u16::from_be_bytes([p[l3 + 2], p[l3 + 3]]);
        l3 += 4;
    }
    if et == 0x0800 {
        let ihl = usize::from(p[l3] & 0xf) * 4;
        Layout {
            l3,
            l4: l3 + ihl,
            v6: false,
            proto: p[l3 + 9],
        }
    } else {
        let mut next = p[l3 + 6];
        let mut off = l3 + 40;
        while matches!(next, 0 | 43 | 60 | 44) {
            let len = if next == 44 {
                8
            } else {
                (usize::from(p[off + 1]) + 1) * 8
            };
            next = p[off];
            off += len;
        }
        Layout {
            l3,
            l4: off,
            v6: true,
            proto: next,
        }
    }
}

/// Rewrites MACs, addresses, ports and TTL, then recomputes all checksums from scratch.
fn reference_nat(
    input: &[u8],
    smac: [u8; 6],
    dmac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut p = input.to_vec();
    p[0..6].copy_from_slice(&dmac);
    p[6..12].copy_from_slice(&smac);
    let l = layout(&p);
    let udp_zero = l.proto == 17 && !l.v6 && p[l.l4 + 6] == 0 && p[l.l4 + 7] == 0;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p[l.l3 + 12..l.l3 + 16].copy_from_slice(&s.octets());
            p[l.l3 + 16..l.l3 + 20].copy_from_slice(&d.octets());
            p[l.l3 + 8] -= 1;
            p[l.l3 + 10..l.l3 + 12].copy_from_slice(&[0, 0]);
            let c = ones_sum_finish(ones_sum(&p[l.l3..l.l4], 0));
            p[l.l3 + 10..l.l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p[l.l3 + 8..l.l3 + 24].copy_from_slice(&s.octets());
            p[l.l3 + 24..l.l3 + 40].copy_from_slice(&d.octets());
            p[l.l3 + 7] -= 1;
        }
        _ => unreachable!(),
    }
    p[l.l4..l.l4 + 2].copy_from_slice(&sport.to_be_bytes());
    p[l.l4 + 2..l.l4 + 4].copy_from_slice(&dport.to_be_bytes());
    let csum_at = l.l4 + if l.proto == 6 { 16 } else { 6 };
    if !udp_zero {
        p[csum_at..csum_at + 2].copy_from_slice(&[0, 0]);
        let ip_end = l.l3
            + if l.v6 {
                40 + usize::from(u16::from_be_bytes([p[l.l3 + 4], p[l.l3 + 5]]))
            } else {
                usize::from(u16::from_be_bytes([p[l.l3 + 2], p[l.l3 + 3]]))
            };
        let seg_len = ip_end - l.l4;
        let mut acc = 0;
        if l.v6 {
            acc = ones_sum(&p[l.l3 + 8..l.l3 + 40], acc);
            acc = ones_sum(&(seg_len as u32).to_be_bytes(), acc);
        } else {
            acc = ones_sum(&p[l.l3 + 12..l.l3 + 20], acc);
            acc = ones_sum(&(seg_len as u16).to_be_bytes(), acc);
        }
        acc = ones_sum(&[0, l.proto], acc);
        acc = ones_sum(&p[l.l4..ip_end], acc);
        let mut c = ones_sum_finish(acc);
        if c == 0 && l.proto == 17 {
            c = 0xffff;
        }
        p[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// The (address, port) pair at source or destination of a packet.
fn endpoint(p: &[u8], source: bool) -> (IpAddr, u16) {
    let l = layout(p);
    let port_off = if source { l.l4 } else { l.l4 + 2 };
    let port = u16::from_be_bytes([p[port_off], p[port_off + 1]]);
    let addr = if l.v6 {
        let o = if source { l.l3 + 8 } else { l.l3 + 24 };
        v6(p[o..o + 16].try_into().unwrap())
    } else {
        let o = if source { l.l3 + 12 } else { l.l3 + 16 };
        v4(p[o..o + 4].try_into().unwrap())
    };
    (addr, port)
}

// ---------- the table ----------

/// What the output must be.
enum Expect {
    /// The verdict leaves the packet as it was.
    Unchanged,
    /// Exactly these bytes.
    Exact(Vec<u8>),
    /// NAT toward a backend of `backends`; remember the flow under `flow` (and, if `same_as`
    /// names an earlier flow, it must have the same backend and SNAT port).
    ToBackend {
        backends: Vec<IpAddr>,
        port: u16,
        snat: IpAddr,
        smac: [u8; 6],
        flow: &'static str,
        same_as: Option<&'static str>,
    },
}

struct Fixture {
    description: &'static str,
    input: Vec<u8>,
    ingress: &'static str,
    verdict: u32,
    expect: Expect,
    /// Counters (`stat::*`) and by how much this fixture must move them.
    counts: Vec<(u32, u64)>,
}

impl Fixture {
    /// Also checks that the run moves each of these counters by exactly that much.
    fn counts(&mut self, counts: &[(u32, u64)]) {
        self.counts = counts.to_vec();
    }
}

/// The fixtures, in the order they run (later ones may depend on flows earlier ones made).
#[derive(Default)]
struct Table(Vec<Fixture>);

impl Table {
    fn add(
        &mut self,
        description: &'static str,
        input: Vec<u8>,
        ingress: &'static str,
        verdict: u32,
        expect: Expect,
    ) -> &mut Fixture {
        self.0.push(Fixture {
            description,
            input,
            ingress,
            verdict,
            expect,
            counts: Vec::new(),
        });
        self.0.last_mut().expect("just pushed")
    }
}

/// A reply from the backend that flow `flow` landed on, to the SNAT address and port.
struct ReplyOf {
    flow: &'static str,
    l4: L4,
    vip: IpAddr,
    vport: u16,
    client: IpAddr,
    cport: u16,
}

fn balancer() -> XdpBalancer {
    let program = XdpProgram::load_with(LoadOptions {
        max_services: 16,
        max_backends: 64,
        ring_size: 251,
        conntrack_entries: 4096,
        ..LoadOptions::default()
    })
    .expect("loading the XDP program (needs root)");
    let mut b = XdpBalancer::new(program);
    b.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(SNAT4)),
        snat_v6: Some(Ipv6Addr::from(SNAT6)),
        snat_ports: (20000, 20099),
        ..NodeConfig::default()
    })
    .unwrap();
    let svc = |vip: IpAddr, port, proto, backends: Vec<(IpAddr, u32)>| ServiceSpec {
        key: ServiceKey { vip, port, proto },
        backends: backends
            .into_iter()
            .map(|(addr, weight)| BackendSpec {
                addr,
                port: 8080,
                weight,
            })
            .collect(),
        hash_source_only: false,
        preserve_source: false,
        forwarding: Default::default(),
    };
    let b4: Vec<(IpAddr, u32)> = BACKENDS4.iter().map(|a| (v4(*a), 1)).collect();
    let b6: Vec<(IpAddr, u32)> = BACKENDS6.iter().map(|a| (v6(*a), 1)).collect();
    b.upsert_service(&svc(v4(VIP4), 80, Protocol::Tcp, b4.clone()))
        .unwrap();
    b.upsert_service(&svc(v4(VIP4), 53, Protocol::Udp, b4.clone()))
        .unwrap();
    b.upsert_service(&svc(
        v4(VIP4_TX),
        80,
        Protocol::Tcp,
        vec![(v4(BACKEND4_ETH0), 1)],
    ))
    .unwrap();
    b.upsert_service(&svc(
        v4(VIP4_DRAINED),
        80,
        Protocol::Tcp,
        b4.iter().map(|(a, _)| (*a, 0)).collect(),
    ))
    .unwrap();
    b.upsert_service(&svc(v4(VIP4_EMPTY), 80, Protocol::Tcp, vec![]))
        .unwrap();
    b.upsert_service(&svc(v6(VIP6), 443, Protocol::Tcp, b6.clone()))
        .unwrap();
    b.upsert_service(&svc(v6(VIP6), 53, Protocol::Udp, b6.clone()))
        .unwrap();
    b.upsert_service(&svc(v4(VIP4), 2905, Protocol::Sctp, b4.clone()))
        .unwrap();
    b.upsert_service(&svc(v6(VIP6), 2905, Protocol::Sctp, b6.clone()))
        .unwrap();
    // NAT46: an IPv4 VIP with IPv6 backends; NAT64: the other way.
    for proto in [Protocol::Tcp, Protocol::Udp] {
        b.upsert_service(&svc(v4(VIP4_46), 80, proto, b6.clone()))
            .unwrap();
        b.upsert_service(&svc(v6(VIP6_64), 80, proto, b4.clone()))
            .unwrap();
    }
    b
}

fn nat_to(backends: &[IpAddr], flow: &'static str, same_as: Option<&'static str>) -> Expect {
    let v6 = backends[0].is_ipv6();
    Expect::ToBackend {
        backends: backends.to_vec(),
        port: 8080,
        snat: if v6 { self::v6(SNAT6) } else { v4(SNAT4) },
        smac: LB1_MAC,
        flow,
        same_as,
    }
}

fn fixtures() -> (Vec<Fixture>, Vec<(usize, ReplyOf)>) {
    let be4: Vec<IpAddr> = BACKENDS4.iter().map(|a| v4(*a)).collect();
    let be6: Vec<IpAddr> = BACKENDS6.iter().map(|a| v6(*a)).collect();
    let mut t = Table::default();
    use verdict::{DROP, PASS, REDIRECT, TX};
    use Expect::Unchanged;

    // IPv4 TCP
    t.add(
        "tcp4 SYN to VIP: new flow, NAT to a backend, redirected to eth1",
        tcp4(CLIENT4, VIP4, 40001, 80, SYN),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4", None),
    );
    t.add(
        "tcp4 ACK of the same flow: tracked, same backend and SNAT port",
        tcp4(CLIENT4, VIP4, 40001, 80, ACK),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4b", Some("t4")),
    );
    t.add(
        "tcp4 data segment of the same flow, 1000-byte payload",
        build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            v4(CLIENT4),
            v4(VIP4),
            64,
            L4::Tcp { flags: ACK },
            40001,
            80,
            &[0x5a; 1000],
        ),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4c", Some("t4")),
    );
    t.add(
        "tcp4 second client flow: NAT",
        tcp4(CLIENT4B, VIP4, 40002, 80, SYN),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4d", None),
    );
    t.add(
        "tcp4 third flow from the same client, other port",
        tcp4(CLIENT4, VIP4, 40003, 80, SYN),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4e", None),
    );
    t.add(
        "tcp4 FIN of a tracked flow: same backend",
        tcp4(CLIENT4, VIP4, 40001, 80, FIN | ACK),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4f", Some("t4")),
    );
    t.add(
        "tcp4 with 4 bytes of IPv4 options (NOP×3, EOL): NAT, options kept",
        with_ipv4_options(&tcp4(CLIENT4, VIP4, 40010, 80, SYN), &[1, 1, 1, 0]),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4o", None),
    );
    t.add(
        "tcp4 with 12 bytes of IPv4 options: NAT",
        with_ipv4_options(&tcp4(CLIENT4, VIP4, 40011, 80, SYN), &[1; 12]),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4o2", None),
    );
    t.add(
        "tcp4 in an 802.1Q tag: NAT, tag kept",
        build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::Single(100),
            v4(CLIENT4),
            v4(VIP4),
            64,
            L4::Tcp { flags: SYN },
            40020,
            80,
            b"",
        ),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4v", None),
    );
    t.add(
        "tcp4 in QinQ tags: NAT, both tags kept",
        build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::Double(200, 100),
            v4(CLIENT4),
            v4(VIP4),
            64,
            L4::Tcp { flags: SYN },
            40021,
            80,
            b"",
        ),
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4qq", None),
    );
    t.add(
        "tcp4 to a service whose backend is behind the ingress: XDP_TX",
        tcp4(CLIENT4, VIP4_TX, 40030, 80, SYN),
        "eth0",
        TX,
        Expect::ToBackend {
            backends: vec![v4(BACKEND4_ETH0)],
            port: 8080,
            snat: v4(SNAT4),
            smac: LB0_MAC,
            flow: "t4tx",
            same_as: None,
        },
    );
    t.add(
        "tcp4 TTL 1 to VIP: passed (the stack sends Time Exceeded)",
        build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            v4(CLIENT4),
            v4(VIP4),
            1,
            L4::Tcp { flags: SYN },
            40040,
            80,
            b"",
        ),
        "eth0",
        PASS,
        Unchanged,
    );
    t.add(
        "tcp4 to the VIP on a port without service: passed",
        tcp4(CLIENT4, VIP4, 40041, 81, SYN),
        "eth0",
        PASS,
        Unchanged,
    );
    t.add(
        "tcp4 to a non-VIP address: passed",
        tcp4(CLIENT4, [198, 18, 0, 254], 40042, 80, SYN),
        "eth0",
        PASS,
        Unchanged,
    );
    t.add(
        "tcp4 to a service whose backends all drain: dropped",
        tcp4(CLIENT4, VIP4_DRAINED, 40043, 80, SYN),
        "eth0",
        DROP,
        Unchanged,
    );
    t.add(
        "tcp4 to a service with no backends: dropped",
        tcp4(CLIENT4, VIP4_EMPTY, 40044, 80, SYN),
        "eth0",
        DROP,
        Unchanged,
    );
    t.add(
        "tcp4 to a SNAT port nobody holds: passed",
        tcp4(BACKENDS4[0], SNAT4, 8080, 20001, ACK),
        "eth1",
        PASS,
        Unchanged,
    );
    // IPv4 UDP
    t.add(
        "udp4 to VIP: new flow, NAT",
        udp4(CLIENT4, VIP4, 50001, 53, b"query"),
        "eth0",
        REDIRECT,
        nat_to(&be4, "u4", None),
    );
    t.add(
        "udp4 second datagram: tracked",
        udp4(CLIENT4, VIP4, 50001, 53, b"query2"),
        "eth0",
        REDIRECT,
        nat_to(&be4, "u4b", Some("u4")),
    );
    t.add(
        "udp4 without checksum (0): NAT keeps it 0",
        {
            let mut p = udp4(CLIENT4, VIP4, 50002, 53, b"nocsum");
            p[40..42].copy_from_slice(&[0, 0]);
            p
        },
        "eth0",
        REDIRECT,
        nat_to(&be4, "u4z", None),
    );
    t.add(
        "udp4 to the VIP's TCP-only port: passed",
        udp4(CLIENT4, VIP4, 50003, 80, b"x"),
        "eth0",
        PASS,
        Unchanged,
    );
    t.add(
        "ipv4 first fragment (MF) to VIP: balanced as a whole packet, its ports remembered",
        {
            let mut p = udp4(CLIENT4, VIP4, 50004, 53, b"frag");
            p[20] |= 0x20;
            fix_ipv4_checksum(&mut p);
            p
        },
        "eth0",
        REDIRECT,
        nat_to(&be4, "u4frag", None),
    )
    .counts(&[(stat::FRAG_HEAD, 1)]);
    t.add(
        "ipv4 later fragment (offset 8) to VIP, its first fragment never seen: dropped",
        {
            let mut p = udp4(CLIENT4, VIP4, 50005, 53, b"frag");
            // Another datagram than the first fragment's above (identification 0).
            p[18..20].copy_from_slice(&0x0777u16.to_be_bytes());
            p[21] = 1;
            fix_ipv4_checksum(&mut p);
            p
        },
        "eth0",
        DROP,
        Unchanged,
    )
    .counts(&[(stat::DROP_FRAG_NO_HEAD, 1)]);
    t.add(
        "ipv4 later fragment (offset 8) to an address that is not a VIP: passed",
        {
            let mut p = udp4(CLIENT4, [203, 0, 113, 99], 50005, 53, b"frag");
            p[21] = 1;
            fix_ipv4_checksum(&mut p);
            p
        },
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_FRAGMENT, 1)]);
    t.add(
        "ARP request: passed",
        {
            let mut p = vec![0xff; 6];
            p.extend_from_slice(&CLIENT_MAC);
            p.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
            p.extend_from_slice(&CLIENT_MAC);
            p.extend_from_slice(&CLIENT4);
            p.extend_from_slice(&[0; 6]);
            p.extend_from_slice(&VIP4);
            p
        },
        "eth0",
        PASS,
        Unchanged,
    );
    t.add(
        "ICMP echo request to a VIP: answered in XDP (XDP_TX)",
        echo4(CLIENT4, VIP4, true),
        "eth0",
        TX,
        Expect::Exact(echo_reply4()),
    );
    t.add(
        "ICMP echo request to a non-VIP address: passed",
        echo4(CLIENT4, [198, 18, 0, 254], true),
        "eth0",
        PASS,
        Unchanged,
    );
    t.add(
        "ICMPv6 echo request to a VIP: answered in XDP (XDP_TX)",
        echo6(CLIENT6, VIP6, true),
        "eth0",
        TX,
        Expect::Exact({
            let mut p = echo6(VIP6, CLIENT6, false);
            p[0..6].copy_from_slice(&CLIENT_MAC);
            p[6..12].copy_from_slice(&LB0_MAC);
            p
        }),
    );
    // IPv6
    t.add(
        "tcp6 SYN to VIP: new flow, NAT",
        tcp6(CLIENT6, VIP6, 41001, 443, SYN),
        "eth0",
        REDIRECT,
        nat_to(&be6, "t6", None),
    );
    t.add(
        "tcp6 ACK: tracked",
        tcp6(CLIENT6, VIP6, 41001, 443, ACK),
        "eth0",
        REDIRECT,
        nat_to(&be6, "t6b", Some("t6")),
    );
    t.add(
        "udp6 to VIP: new flow, NAT",
        udp6(CLIENT6, VIP6, 51001, 53, b"query6"),
        "eth0",
        REDIRECT,
        nat_to(&be6, "u6", None),
    );
    t.add(
        "udp6 second datagram: tracked",
        udp6(CLIENT6, VIP6, 51001, 53, b"again"),
        "eth0",
        REDIRECT,
        nat_to(&be6, "u6b", Some("u6")),
    );
    t.add(
        "tcp6 behind a hop-by-hop header: NAT",
        with_ipv6_ext(&tcp6(CLIENT6, VIP6, 41002, 443, SYN), &[(0, opts_ext(0))]),
        "eth0",
        REDIRECT,
        nat_to(&be6, "t6h", None),
    );
    t.add(
        "tcp6 behind hop-by-hop, routing (segments left 0) and destination options: NAT",
        with_ipv6_ext(
            &tcp6(CLIENT6, VIP6, 41003, 443, SYN),
            &[
                (0, opts_ext(0)),
                (43, vec![0, 0, 0, 0, 0, 0, 0, 0]),
                (60, opts_ext(1)),
            ],
        ),
        "eth0",
        REDIRECT,
        nat_to(&be6, "t6r", None),
    );
    t.add(
        "tcp6 behind an atomic fragment header (offset 0, M=0): NAT",
        with_ipv6_ext(
            &tcp6(CLIENT6, VIP6, 41004, 443, SYN),
            &[(44, vec![0, 0, 0, 0, 0, 0, 0, 1])],
        ),
        "eth0",
        REDIRECT,
        nat_to(&be6, "t6f", None),
    );
    t.add(
        "udp6 first fragment (offset 0, M=1): balanced as a whole packet",
        with_ipv6_ext(
            &udp6(CLIENT6, VIP6, 51002, 53, b"frag"),
            &[(44, vec![0, 0, 0, 1, 0, 0, 0, 2])],
        ),
        "eth0",
        REDIRECT,
        nat_to(&be6, "u6frag", None),
    )
    .counts(&[(stat::FRAG_HEAD, 1)]);
    t.add(
        "udp6 later fragment (offset 8) to an address that is not a VIP: passed",
        with_ipv6_ext(
            &udp6(CLIENT6, ip6("fd00:203::99"), 51002, 53, b"frag"),
            &[(44, vec![0, 0, 0, 8, 0, 0, 0, 2])],
        ),
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_FRAGMENT, 1)]);
    t.add(
        "tcp6 behind five extension headers (over the walk limit): passed",
        with_ipv6_ext(
            &tcp6(CLIENT6, VIP6, 41005, 443, SYN),
            &[
                (60, opts_ext(0)),
                (60, opts_ext(0)),
                (60, opts_ext(0)),
                (60, opts_ext(0)),
                (60, opts_ext(0)),
            ],
        ),
        "eth0",
        PASS,
        Unchanged,
    );
    t.add(
        "tcp6 hop limit 1: passed",
        build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            v6(CLIENT6),
            v6(VIP6),
            1,
            L4::Tcp { flags: SYN },
            41006,
            443,
            b"",
        ),
        "eth0",
        PASS,
        Unchanged,
    );
    t.add(
        "tcp6 to a non-VIP address: passed",
        tcp6(CLIENT6, ip6("fd00:18::fe"), 41007, 443, SYN),
        "eth0",
        PASS,
        Unchanged,
    );
    t.add(
        "udp6 in an 802.1Q tag: NAT",
        build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::Single(7),
            v6(CLIENT6),
            v6(VIP6),
            64,
            L4::Udp,
            51003,
            53,
            b"vlan6",
        ),
        "eth0",
        REDIRECT,
        nat_to(&be6, "u6v", None),
    );

    // Truncation at every header boundary (and inside each header): passed untouched.
    let full4 = tcp4(CLIENT4, VIP4, 40100, 80, SYN);
    for (cut, description) in [
        (14, "tcp4 cut after Ethernet"),
        (24, "tcp4 cut inside the IPv4 header"),
        (34, "tcp4 cut after the IPv4 header"),
        (44, "tcp4 cut inside the TCP header"),
        (53, "tcp4 cut one byte short of the TCP header"),
    ] {
        t.add(description, full4[..cut].to_vec(), "eth0", PASS, Unchanged);
    }
    let full6 = tcp6(CLIENT6, VIP6, 41100, 443, SYN);
    for (cut, description) in [
        (30, "tcp6 cut inside the IPv6 header"),
        (54, "tcp6 cut after the IPv6 header"),
        (64, "tcp6 cut inside the TCP header"),
    ] {
        t.add(description, full6[..cut].to_vec(), "eth0", PASS, Unchanged);
    }
    let ext6 = with_ipv6_ext(&tcp6(CLIENT6, VIP6, 41101, 443, SYN), &[(0, opts_ext(1))]);
    t.add(
        "tcp6 cut inside a hop-by-hop header",
        ext6[..58].to_vec(),
        "eth0",
        PASS,
        Unchanged,
    );
    let vlan4 = build(
        CLIENT_MAC,
        LB0_MAC,
        Vlan::Single(100),
        v4(CLIENT4),
        v4(VIP4),
        64,
        L4::Tcp { flags: SYN },
        40101,
        80,
        b"",
    );
    t.add(
        "tcp4 in 802.1Q cut inside the tag",
        vlan4[..16].to_vec(),
        "eth0",
        PASS,
        Unchanged,
    );
    let u4 = udp4(CLIENT4, VIP4, 50100, 53, b"q");
    t.add(
        "udp4 cut inside the UDP header",
        u4[..38].to_vec(),
        "eth0",
        PASS,
        Unchanged,
    );

    // Issue 10, defect 1: every bounds check before the first write. A transport header
    // that ends past the 512 bytes the program parses is passed untouched, and no flow or
    // SNAT port is taken for it.
    t.add(
        "tcp6 behind 448 bytes of hop-by-hop PadN (TCP header at byte 502): passed untouched",
        with_ipv6_ext(&tcp6(CLIENT6, VIP6, 41200, 443, SYN), &[(0, opts_ext(55))]),
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_LONG_HEADERS, 1), (stat::CT_INSERT, 0)]);
    t.add(
        "udp6 behind 456 bytes of hop-by-hop PadN (UDP header at byte 510): passed untouched",
        with_ipv6_ext(
            &udp6(CLIENT6, VIP6, 51200, 53, b"deep"),
            &[(0, opts_ext(56))],
        ),
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_LONG_HEADERS, 1), (stat::CT_INSERT, 0)]);
    t.add(
        "tcp6 behind 432 bytes of hop-by-hop PadN (TCP header ends at byte 506): NAT",
        with_ipv6_ext(&tcp6(CLIENT6, VIP6, 41201, 443, SYN), &[(0, opts_ext(53))]),
        "eth0",
        REDIRECT,
        nat_to(&be6, "t6deep", None),
    )
    .counts(&[(stat::CT_INSERT, 1)]);

    // Issue 10, defect 3: length fields that disagree with the frame, and IPv4 headers with
    // a bad checksum, are passed untouched (the stack drops them) and counted by reason.
    let syn4 = tcp4(CLIENT4, VIP4, 40200, 80, SYN);
    t.add(
        "tcp4 SYN whose IPv4 total length runs 100 bytes past the frame: passed untouched",
        with_ipv4_total_length(&syn4, 140),
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_BAD_LENGTH, 1), (stat::CT_INSERT, 0)]);
    t.add(
        "tcp4 SYN whose IPv4 total length (30) ends inside the TCP header: passed untouched",
        with_ipv4_total_length(&syn4, 30),
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_BAD_LENGTH, 1), (stat::CT_INSERT, 0)]);
    t.add(
        "tcp4 SYN whose IPv4 total length (16) is shorter than its header: passed untouched",
        with_ipv4_total_length(&syn4, 16),
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_BAD_LENGTH, 1), (stat::CT_INSERT, 0)]);
    t.add(
        "tcp4 SYN with a wrong IPv4 header checksum: passed untouched",
        {
            let mut p = syn4.clone();
            p[24] ^= 0x5a;
            p
        },
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_BAD_CSUM, 1), (stat::CT_INSERT, 0)]);
    t.add(
        "udp4 whose UDP length runs past the IP payload: passed untouched",
        {
            let mut p = udp4(CLIENT4, VIP4, 50200, 53, b"short");
            p[38..40].copy_from_slice(&200u16.to_be_bytes());
            p
        },
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_BAD_LENGTH, 1), (stat::CT_INSERT, 0)]);
    let syn6 = tcp6(CLIENT6, VIP6, 41210, 443, SYN);
    t.add(
        "tcp6 SYN whose payload length runs 100 bytes past the frame: passed untouched",
        with_ipv6_payload_length(&syn6, 120),
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_BAD_LENGTH, 1), (stat::CT_INSERT, 0)]);
    t.add(
        "tcp6 SYN with payload length 0 and no hop-by-hop header (no jumbogram): passed untouched",
        with_ipv6_payload_length(&syn6, 0),
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_BAD_LENGTH, 1), (stat::CT_INSERT, 0)]);
    t.add(
        "tcp4 SYN followed by 6 bytes of Ethernet trailer: NAT, trailer kept as it was",
        {
            let mut p = tcp4(CLIENT4, VIP4, 40201, 80, SYN);
            p.extend_from_slice(&[0xa5; 6]);
            p
        },
        "eth0",
        REDIRECT,
        nat_to(&be4, "t4trailer", None),
    )
    .counts(&[(stat::CT_INSERT, 1)]);

    // Issue 10, defect 4: the VIP is not the final destination while segments are left.
    t.add(
        "tcp6 SYN behind a segment routing header with 1 segment left: passed untouched",
        with_ipv6_ext(
            &tcp6(CLIENT6, VIP6, 41220, 443, SYN),
            &[(43, {
                let mut h = vec![0, 2, 4, 1, 0, 0, 0, 0];
                h.extend_from_slice(&ip6("fd00:99::1"));
                h
            })],
        ),
        "eth0",
        PASS,
        Unchanged,
    )
    .counts(&[(stat::PASS_ROUTING_HEADER, 1), (stat::CT_INSERT, 0)]);

    let n = t.0.len();
    // Replies: from the backend each flow landed on, to the SNAT address and port.
    let replies = vec![
        (
            n,
            ReplyOf {
                flow: "t4",
                l4: L4::Tcp { flags: SYNACK },
                vip: v4(VIP4),
                vport: 80,
                client: v4(CLIENT4),
                cport: 40001,
            },
        ),
        (
            n + 1,
            ReplyOf {
                flow: "t4d",
                l4: L4::Tcp { flags: SYNACK },
                vip: v4(VIP4),
                vport: 80,
                client: v4(CLIENT4B),
                cport: 40002,
            },
        ),
        (
            n + 2,
            ReplyOf {
                flow: "u4",
                l4: L4::Udp,
                vip: v4(VIP4),
                vport: 53,
                client: v4(CLIENT4),
                cport: 50001,
            },
        ),
        (
            n + 3,
            ReplyOf {
                flow: "t6",
                l4: L4::Tcp { flags: SYNACK },
                vip: v6(VIP6),
                vport: 443,
                client: v6(CLIENT6),
                cport: 41001,
            },
        ),
        (
            n + 4,
            ReplyOf {
                flow: "u6",
                l4: L4::Udp,
                vip: v6(VIP6),
                vport: 53,
                client: v6(CLIENT6),
                cport: 51001,
            },
        ),
    ];
    (t.0, replies)
}

fn ifindex(name: &str) -> u32 {
    fibnet::ifindex(name).unwrap()
}

fn hex(p: &[u8]) -> String {
    p.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_output(description: &str, want: &[u8], got: &[u8]) {
    if want != got {
        let first = want
            .iter()
            .zip(got)
            .position(|(a, b)| a != b)
            .unwrap_or(want.len().min(got.len()));
        panic!(
            "{description}: output differs at byte {first}\n want ({} B): {}\n  got ({} B): {}",
            want.len(),
            hex(want),
            got.len(),
            hex(got)
        );
    }
}

/// Runs one fixture's checks; a failed check (a panic) is recorded under its description.
fn attempt(failures: &mut Vec<String>, description: &str, check: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)).is_err() {
        failures.push(description.to_owned());
    }
}

#[test]
fn xdp_fixture_table() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let (fixtures, replies) = fixtures();
    let mut flows: std::collections::HashMap<&str, (IpAddr, u16)> =
        std::collections::HashMap::new();
    let mut run = 0;
    // Every fixture runs; the failures are listed at the end.
    let mut failures: Vec<String> = Vec::new();
    let counters = || -> Vec<u64> { (0..stat::COUNT).map(|i| prog.stat(i).unwrap()).collect() };
    for fx in &fixtures {
        run += 1;
        let before = counters();
        attempt(&mut failures, fx.description, || {
            let out = prog
                .test_run_on(&fx.input, Some(ifindex(fx.ingress)))
                .unwrap();
            assert_eq!(
                verdict::name(out.verdict),
                verdict::name(fx.verdict),
                "{}: verdict",
                fx.description
            );
            match &fx.expect {
                Expect::Unchanged => check_output(fx.description, &fx.input, &out.packet),
                Expect::Exact(want) => check_output(fx.description, want, &out.packet),
                Expect::ToBackend {
                    backends,
                    port,
                    snat,
                    smac,
                    flow,
                    same_as,
                } => {
                    let (backend, bport) = endpoint(&out.packet, false);
                    let (src, sport) = endpoint(&out.packet, true);
                    assert!(
                        backends.contains(&backend),
                        "{}: went to {backend}, not a backend",
                        fx.description
                    );
                    assert_eq!(bport, *port, "{}: backend port", fx.description);
                    assert_eq!(src, *snat, "{}: SNAT address", fx.description);
                    assert!(
                        (20000..=20099).contains(&sport),
                        "{}: SNAT port {sport} outside the range",
                        fx.description
                    );
                    if let Some(prev) = same_as {
                        assert_eq!(
                            flows[prev],
                            (backend, sport),
                            "{}: tracked flow moved",
                            fx.description
                        );
                    }
                    flows.insert(flow, (backend, sport));
                    let dmac = if backend == v4(BACKEND4_ETH0) {
                        BE0_MAC
                    } else {
                        let i = backends.iter().position(|b| *b == backend).unwrap();
                        BE_MAC[i]
                    };
                    let want = reference_nat(&fx.input, *smac, dmac, *snat, backend, sport, *port);
                    check_output(fx.description, &want, &out.packet);
                }
            }
            let after = counters();
            for &(idx, delta) in &fx.counts {
                assert_eq!(
                    after[idx as usize] - before[idx as usize],
                    delta,
                    "{}: counter {}",
                    fx.description,
                    stat::NAMES[idx as usize]
                );
            }
        });
    }
    for (_, r) in &replies {
        let description = format!(
            "reply of flow {}: reverse NAT to the client via eth0",
            r.flow
        );
        run += 1;
        attempt(&mut failures, &description, || {
            let (backend, snat_port) = flows[r.flow];
            let snat = if backend.is_ipv6() {
                v6(SNAT6)
            } else {
                v4(SNAT4)
            };
            let dmac = BE_MAC[0];
            let input = build(
                dmac,
                LB1_MAC,
                Vlan::None,
                backend,
                snat,
                64,
                r.l4,
                8080,
                snat_port,
                b"reply",
            );
            let out = prog.test_run_on(&input, Some(ifindex("eth1"))).unwrap();
            assert_eq!(
                verdict::name(out.verdict),
                "XDP_REDIRECT",
                "{description}: verdict"
            );
            let want = reference_nat(
                &input, LB0_MAC, CLIENT_MAC, r.vip, r.client, r.vport, r.cport,
            );
            check_output(&description, &want, &out.packet);
        });
    }
    // ICMP errors quoting tracked flows, translated outer and inner.
    // (description, input, ingress, verdict, expected output)
    type IcmpCase = (String, Vec<u8>, &'static str, u32, Vec<u8>);
    let mut icmp_cases: Vec<IcmpCase> = Vec::new();
    {
        let (backend, snat_port) = flows["u4"];
        let IpAddr::V4(be) = backend else {
            unreachable!()
        };
        let quoted = l3_of(build(
            LB1_MAC,
            be_mac(backend),
            Vlan::None,
            v4(SNAT4),
            backend,
            63,
            L4::Udp,
            snat_port,
            8080,
            b"query",
        ));
        let port_unreach = || Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
        let mut input = Vec::new();
        PacketBuilder::ethernet2(be_mac(backend), LB1_MAC)
            .ipv4(be.octets(), SNAT4, 64)
            .icmpv4(port_unreach())
            .write(&mut input, &quoted)
            .unwrap();
        let client_view = l3_of(build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            v4(CLIENT4),
            v4(VIP4),
            63,
            L4::Udp,
            50001,
            53,
            b"query",
        ));
        let mut want = Vec::new();
        PacketBuilder::ethernet2(LB0_MAC, CLIENT_MAC)
            .ipv4(VIP4, CLIENT4, 63)
            .icmpv4(port_unreach())
            .write(&mut want, &client_view)
            .unwrap();
        icmp_cases.push((
            "ICMP port unreachable from the backend of a UDP flow: translated to the client".into(),
            input,
            "eth1",
            verdict::REDIRECT,
            want,
        ));
    }
    {
        let (backend, snat_port) = flows["t6"];
        let IpAddr::V6(be) = backend else {
            unreachable!()
        };
        let quoted = l3_of(build(
            LB1_MAC,
            be_mac(backend),
            Vlan::None,
            v6(SNAT6),
            backend,
            63,
            L4::Tcp { flags: SYN },
            snat_port,
            8080,
            b"",
        ));
        let mut input = Vec::new();
        PacketBuilder::ethernet2(be_mac(backend), LB1_MAC)
            .ipv6(be.octets(), SNAT6, 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut input, &quoted)
            .unwrap();
        let client_view = l3_of(build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            v6(CLIENT6),
            v6(VIP6),
            63,
            L4::Tcp { flags: SYN },
            41001,
            443,
            b"",
        ));
        let mut want = Vec::new();
        PacketBuilder::ethernet2(LB0_MAC, CLIENT_MAC)
            .ipv6(VIP6, CLIENT6, 63)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut want, &client_view)
            .unwrap();
        icmp_cases.push((
            "ICMPv6 packet too big from the backend of a TCP flow: translated to the client".into(),
            input,
            "eth1",
            verdict::REDIRECT,
            want,
        ));
    }
    {
        let (backend, snat_port) = flows["t4"];
        let IpAddr::V4(be) = backend else {
            unreachable!()
        };
        let frag_needed = || {
            Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::FragmentationNeeded {
                next_hop_mtu: 1400,
            })
        };
        let quoted = l3_of(build(
            LB0_MAC,
            CLIENT_MAC,
            Vlan::None,
            v4(VIP4),
            v4(CLIENT4),
            63,
            L4::Tcp { flags: SYNACK },
            80,
            40001,
            b"",
        ));
        let mut input = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LB0_MAC)
            .ipv4(CLIENT4, VIP4, 64)
            .icmpv4(frag_needed())
            .write(&mut input, &quoted)
            .unwrap();
        let backend_view = l3_of(build(
            LB1_MAC,
            be_mac(backend),
            Vlan::None,
            backend,
            v4(SNAT4),
            63,
            L4::Tcp { flags: SYNACK },
            8080,
            snat_port,
            b"",
        ));
        let mut want = Vec::new();
        PacketBuilder::ethernet2(LB1_MAC, be_mac(backend))
            .ipv4(SNAT4, be.octets(), 63)
            .icmpv4(frag_needed())
            .write(&mut want, &backend_view)
            .unwrap();
        icmp_cases.push(("ICMP fragmentation needed from the client side about a reply: translated to the backend".into(), input, "eth0", verdict::REDIRECT, want));
    }
    {
        // An error quoting a flow nobody tracks: passed untouched.
        let quoted = l3_of(build(
            LB1_MAC,
            BE_MAC[0],
            Vlan::None,
            v4(SNAT4),
            v4(BACKENDS4[0]),
            63,
            L4::Udp,
            29999,
            8080,
            b"?",
        ));
        let mut input = Vec::new();
        PacketBuilder::ethernet2(BE_MAC[0], LB1_MAC)
            .ipv4(BACKENDS4[0], SNAT4, 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                DestUnreachableHeader::Port,
            ))
            .write(&mut input, &quoted)
            .unwrap();
        let want = input.clone();
        icmp_cases.push((
            "ICMP error quoting an untracked flow: passed".into(),
            input,
            "eth1",
            verdict::PASS,
            want,
        ));
    }
    {
        // Issue 10, defect 2: an 8-byte quote (no room for the TCP checksum) followed by 24
        // bytes of Ethernet trailer: only the IP payload is translated and summed.
        let (backend, snat_port) = flows["t4"];
        let IpAddr::V4(be) = backend else {
            unreachable!()
        };
        let quote = |frame: Vec<u8>| l3_of(frame)[..28].to_vec();
        let quoted = quote(build(
            LB1_MAC,
            be_mac(backend),
            Vlan::None,
            v4(SNAT4),
            backend,
            63,
            L4::Tcp { flags: ACK },
            snat_port,
            8080,
            b"",
        ));
        let trailer: Vec<u8> = (0..24u8).map(|i| 0x90 ^ i).collect();
        let port_unreach = || Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Port);
        let mut input = Vec::new();
        PacketBuilder::ethernet2(be_mac(backend), LB1_MAC)
            .ipv4(be.octets(), SNAT4, 64)
            .icmpv4(port_unreach())
            .write(&mut input, &quoted)
            .unwrap();
        input.extend_from_slice(&trailer);
        let client_view = quote(build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            v4(CLIENT4),
            v4(VIP4),
            63,
            L4::Tcp { flags: ACK },
            40001,
            80,
            b"",
        ));
        let mut want = Vec::new();
        PacketBuilder::ethernet2(LB0_MAC, CLIENT_MAC)
            .ipv4(VIP4, CLIENT4, 63)
            .icmpv4(port_unreach())
            .write(&mut want, &client_view)
            .unwrap();
        want.extend_from_slice(&trailer);
        icmp_cases.push((
            "ICMP port unreachable quoting 8 bytes of a TCP flow, then 24 bytes of Ethernet \
             trailer: translated, trailer untouched"
                .into(),
            input,
            "eth1",
            verdict::REDIRECT,
            want,
        ));
    }
    {
        // Issue 10, defect 5: a report about a SNAT flow whose outer source is the client's
        // own address goes to the client from the VIP, never from the client to itself.
        let (backend, snat_port) = flows["u4"];
        let quoted = l3_of(build(
            LB1_MAC,
            be_mac(backend),
            Vlan::None,
            v4(SNAT4),
            backend,
            63,
            L4::Udp,
            snat_port,
            8080,
            b"query",
        ));
        let host_unreach = || Icmpv4Type::DestinationUnreachable(DestUnreachableHeader::Host);
        let mut input = Vec::new();
        PacketBuilder::ethernet2(be_mac(backend), LB1_MAC)
            .ipv4(CLIENT4, SNAT4, 64)
            .icmpv4(host_unreach())
            .write(&mut input, &quoted)
            .unwrap();
        let client_view = l3_of(build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            v4(CLIENT4),
            v4(VIP4),
            63,
            L4::Udp,
            50001,
            53,
            b"query",
        ));
        let mut want = Vec::new();
        PacketBuilder::ethernet2(LB0_MAC, CLIENT_MAC)
            .ipv4(VIP4, CLIENT4, 63)
            .icmpv4(host_unreach())
            .write(&mut want, &client_view)
            .unwrap();
        icmp_cases.push((
            "ICMP host unreachable from the client's own address about its SNAT flow: sent \
             to the client from the VIP"
                .into(),
            input,
            "eth1",
            verdict::REDIRECT,
            want,
        ));
    }
    for (description, input, ingress, want_verdict, want) in &icmp_cases {
        run += 1;
        attempt(&mut failures, description, || {
            let out = prog.test_run_on(input, Some(ifindex(ingress))).unwrap();
            assert_eq!(
                verdict::name(out.verdict),
                verdict::name(*want_verdict),
                "{description}: verdict"
            );
            check_output(description, want, &out.packet);
        });
    }
    assert!(
        failures.is_empty(),
        "{} of {run} fixtures failed:\n  {}",
        failures.len(),
        failures.join("\n  ")
    );
    assert!(prog.stat(stat::ICMP_ERROR_NAT).unwrap() >= 3);
    assert!(run >= 40, "only {run} fixtures ran");
    assert!(prog.stat(stat::PASS_FRAGMENT).unwrap() >= 2);
    // Truncated frames: a header cut short (malformed), or an IP length past the frame.
    assert!(
        prog.stat(stat::PASS_MALFORMED).unwrap() + prog.stat(stat::PASS_BAD_LENGTH).unwrap() >= 10
    );
    assert!(prog.stat(stat::REPLY_NAT).unwrap() >= 5);
    assert!(prog.stat(stat::DROP_NO_BACKEND).unwrap() >= 2);
    println!("{run} fixtures passed");
}

/// Checks that `out` is an ICMP fragmentation-needed (IPv4) or ICMPv6 packet-too-big
/// answering `input` (an untagged frame): MACs swapped, from the packet's destination to its
/// source, the MTU, every checksum right, and the start of the packet as it arrived quoted.
fn check_too_big(description: &str, input: &[u8], out: &[u8], mtu: u32) {
    let v6 = u16::from_be_bytes([input[12], input[13]]) == 0x86dd;
    assert_eq!(out[0..6], input[6..12], "{description}: destination MAC");
    assert_eq!(out[6..12], input[0..6], "{description}: source MAC");
    assert_eq!(out[12..14], input[12..14], "{description}: ethertype");
    let (ip, icmp) = if v6 {
        (&out[14..54], &out[54..])
    } else {
        (&out[14..34], &out[34..])
    };
    let quote_max = if v6 { 1232 } else { 548 };
    let arrived = &input[14..];
    let quoted = &arrived[..arrived.len().min(quote_max)];
    assert_eq!(&icmp[8..], quoted, "{description}: quote");
    if v6 {
        assert_eq!(ip[0] >> 4, 6, "{description}: version");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[4], ip[5]])),
            icmp.len(),
            "{description}: payload length"
        );
        assert_eq!(ip[6], 58, "{description}: next header");
        assert!(ip[7] > 1, "{description}: hop limit");
        assert_eq!(
            ip[8..24],
            arrived[24..40],
            "{description}: from the destination"
        );
        assert_eq!(ip[24..40], arrived[8..24], "{description}: to the source");
        assert_eq!((icmp[0], icmp[1]), (2, 0), "{description}: type, code");
        assert_eq!(
            u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
            mtu,
            "{description}: MTU"
        );
        let mut acc = ones_sum(&ip[8..40], 0);
        acc = ones_sum(&(icmp.len() as u32).to_be_bytes(), acc);
        acc = ones_sum(&[0, 58], acc);
        acc = ones_sum(icmp, acc);
        assert_eq!(ones_sum_finish(acc), 0, "{description}: ICMPv6 checksum");
    } else {
        assert_eq!(ip[0], 0x45, "{description}: version, header length");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            20 + icmp.len(),
            "{description}: total length"
        );
        assert_eq!(ip[9], 1, "{description}: protocol");
        assert!(ip[8] > 1, "{description}: TTL");
        assert_eq!(
            ones_sum_finish(ones_sum(ip, 0)),
            0,
            "{description}: header checksum"
        );
        assert_eq!(
            ip[12..16],
            arrived[16..20],
            "{description}: from the destination"
        );
        assert_eq!(ip[16..20], arrived[12..16], "{description}: to the source");
        assert_eq!((icmp[0], icmp[1]), (3, 4), "{description}: type, code");
        assert_eq!(
            u32::from(u16::from_be_bytes([icmp[6], icmp[7]])),
            mtu,
            "{description}: next-hop MTU"
        );
        assert_eq!(
            ones_sum_finish(ones_sum(icmp, 0)),
            0,
            "{description}: ICMP checksum"
        );
    }
}

/// Issue 10, defect 6: a packet too big for the backend side's MTU is answered with ICMP
/// fragmentation needed / packet too big (rate-limited), whether or not its next hop is
/// cached; IPv4 without DF is rewritten and left to the stack to fragment.
#[test]
fn a_packet_too_big_for_the_next_hop_is_answered_with_icmp() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    lb.run(&["ip", "link", "set", "eth1", "mtu", "1400"])
        .unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    // The ICMP rate limit is per CPU: stay on one.
    pin_to_cpu(0);
    let eth0 = ifindex("eth0");
    let be4: Vec<IpAddr> = BACKENDS4.iter().map(|a| v4(*a)).collect();

    // A TCP flow, its next hop now cached.
    let out = prog
        .test_run_on(&tcp4(CLIENT4, VIP4, 40300, 80, SYN), Some(eth0))
        .unwrap();
    assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT");
    let (backend, _) = endpoint(&out.packet, false);
    let (_, snat_port) = endpoint(&out.packet, true);
    assert!(be4.contains(&backend));
    let big = |df: bool| {
        let mut p = build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            v4(CLIENT4),
            v4(VIP4),
            64,
            L4::Tcp { flags: ACK },
            40300,
            80,
            &[0x3c; 1410],
        );
        if !df {
            p[20] &= !0x40;
            fix_ipv4_checksum(&mut p);
        }
        p
    };
    let too_big = |what: &str, input: &[u8]| {
        let sent = prog.stat(stat::ICMP_TOO_BIG).unwrap();
        let out = prog.test_run_on(input, Some(eth0)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_TX", "{what}: verdict");
        check_too_big(what, input, &out.packet, 1400);
        assert_eq!(prog.stat(stat::ICMP_TOO_BIG).unwrap(), sent + 1, "{what}");
    };
    too_big("tcp4 1450 bytes with DF, next hop cached", &big(true));

    // Without DF: translated and passed, for the stack to fragment.
    let input = big(false);
    let out = prog.test_run_on(&input, Some(eth0)).unwrap();
    assert_eq!(verdict::name(out.verdict), "XDP_PASS", "no DF: verdict");
    // The stack forwards (and fragments) it: the MACs are left to it.
    let want = reference_nat(
        &input,
        CLIENT_MAC,
        LB0_MAC,
        v4(SNAT4),
        backend,
        snat_port,
        8080,
    );
    check_output("tcp4 1450 bytes without DF", &want, &out.packet);
    assert_eq!(prog.stat(stat::PASS_NEEDS_FRAG).unwrap(), 1);

    // IPv6, a new UDP flow whose first datagram is too big.
    let mut big6 = udp6(CLIENT6, VIP6, 51300, 53, &[0x6b; 1500]);
    too_big("udp6 1548 bytes, new flow", &big6);
    big6[62] ^= 1;
    too_big("udp6 1548 bytes, tracked flow", &big6);

    // Once the cached next hop expires, the FIB says the same.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    too_big("tcp4 1450 bytes with DF, next hop expired", &big(true));
    assert_eq!(prog.stat(stat::DROP_NO_ROUTE).unwrap(), 0);

    // Rate-limited: at most 1000 answers per CPU per second, the rest dropped.
    let (sent, dropped) = (
        prog.stat(stat::ICMP_TOO_BIG).unwrap(),
        prog.stat(stat::DROP_TOO_BIG).unwrap(),
    );
    let input = big(true);
    for _ in 0..2500 {
        let out = prog.test_run_on(&input, Some(eth0)).unwrap();
        assert!(matches!(out.verdict, verdict::TX | verdict::DROP));
    }
    let sent = prog.stat(stat::ICMP_TOO_BIG).unwrap() - sent;
    let dropped = prog.stat(stat::DROP_TOO_BIG).unwrap() - dropped;
    assert_eq!(sent + dropped, 2500);
    assert!(dropped >= 400, "{sent} answered, {dropped} dropped");
}

/// Keeps the calling thread on one CPU (per-CPU state and limits stay put).
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

// ---------- keeping the client's source (externalTrafficPolicy: Local) ----------

/// VIPs of the services that keep their clients' sources.
const PVIP4: [u8; 4] = [203, 0, 113, 20];
const PVIP4_ONE: [u8; 4] = [203, 0, 113, 21];
const PVIP4_ONE_AGAIN: [u8; 4] = [203, 0, 113, 22];
const PVIP4_EMPTY: [u8; 4] = [203, 0, 113, 23];
const PVIP6: [u8; 16] = ip6("fd00:203::20");

/// A balancer whose services keep the client's source address and port.
fn preserving_balancer() -> XdpBalancer {
    let program = XdpProgram::load_with(LoadOptions {
        max_services: 16,
        max_backends: 64,
        ring_size: 251,
        conntrack_entries: 4096,
        ..LoadOptions::default()
    })
    .expect("loading the XDP program (needs root)");
    let mut b = XdpBalancer::new(program);
    b.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(SNAT4)),
        snat_v6: Some(Ipv6Addr::from(SNAT6)),
        snat_ports: (20000, 20099),
        ..NodeConfig::default()
    })
    .unwrap();
    let svc = |vip: IpAddr, port, proto, backends: Vec<IpAddr>| ServiceSpec {
        key: ServiceKey { vip, port, proto },
        backends: backends
            .into_iter()
            .map(|addr| BackendSpec {
                addr,
                port: 8080,
                weight: 1,
            })
            .collect(),
        hash_source_only: false,
        preserve_source: true,
        forwarding: Default::default(),
    };
    let b4: Vec<IpAddr> = BACKENDS4.iter().map(|a| v4(*a)).collect();
    let b6: Vec<IpAddr> = BACKENDS6.iter().map(|a| v6(*a)).collect();
    for (vip, port, backends) in [
        (v4(PVIP4), 80, b4.clone()),
        (v4(PVIP4), 53, b4.clone()),
        (v6(PVIP6), 443, b6.clone()),
        (v6(PVIP6), 53, b6),
    ] {
        let proto = if port == 53 {
            Protocol::Udp
        } else {
            Protocol::Tcp
        };
        b.upsert_service(&svc(vip, port, proto, backends)).unwrap();
    }
    b.upsert_service(&svc(v4(PVIP4), 2905, Protocol::Sctp, b4.clone()))
        .unwrap();
    // Two services with the same single backend, and one without backends.
    for vip in [PVIP4_ONE, PVIP4_ONE_AGAIN] {
        b.upsert_service(&svc(v4(vip), 80, Protocol::Tcp, vec![b4[0]]))
            .unwrap();
    }
    b.upsert_service(&svc(v4(PVIP4_EMPTY), 80, Protocol::Tcp, vec![]))
        .unwrap();
    b
}

/// A client's packet: from `client:cport` via `eth0` to `vip:vport`.
fn from_client(client: IpAddr, vip: IpAddr, l4: L4, cport: u16, vport: u16) -> Vec<u8> {
    build(
        CLIENT_MAC,
        LB0_MAC,
        Vlan::None,
        client,
        vip,
        64,
        l4,
        cport,
        vport,
        b"ping",
    )
}

/// A backend's packet: from `backend:8080` via `eth1` to `client:cport`.
fn from_backend(backend: IpAddr, client: IpAddr, l4: L4, cport: u16) -> Vec<u8> {
    build(
        be_mac(backend),
        LB1_MAC,
        Vlan::None,
        backend,
        client,
        64,
        l4,
        8080,
        cport,
        b"pong",
    )
}

#[test]
fn a_service_that_keeps_client_sources_only_rewrites_the_destination_and_translates_replies() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = preserving_balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let (eth0, eth1) = (ifindex("eth0"), ifindex("eth1"));
    let stat_of = |i| prog.stat(i).unwrap();
    use verdict::{DROP, PASS, REDIRECT};

    let cases = [
        ("TCP/IPv4", v4(CLIENT4), v4(PVIP4), 80, true),
        ("UDP/IPv4", v4(CLIENT4), v4(PVIP4), 53, false),
        ("TCP/IPv6", v6(CLIENT6), v6(PVIP6), 443, true),
        ("UDP/IPv6", v6(CLIENT6), v6(PVIP6), 53, false),
    ];
    for (what, client, vip, vport, tcp) in cases {
        let cport = 41000;
        let first = if tcp { L4::Tcp { flags: SYN } } else { L4::Udp };
        let next = if tcp { L4::Tcp { flags: ACK } } else { L4::Udp };
        let backends: Vec<IpAddr> = if client.is_ipv4() {
            BACKENDS4.iter().map(|a| v4(*a)).collect()
        } else {
            BACKENDS6.iter().map(|a| v6(*a)).collect()
        };
        // Forward: only the destination changes (addresses, port, TTL, checksums).
        let input = from_client(client, vip, first, cport, vport);
        let snat_before = stat_of(stat::CT_INSERT);
        let out = run_expecting(prog, what, &input, eth0, REDIRECT);
        let (backend, bport) = endpoint(&out, false);
        assert!(backends.contains(&backend), "{what}: went to {backend}");
        assert_eq!(bport, 8080, "{what}: backend port");
        assert_eq!(endpoint(&out, true), (client, cport), "{what}: source kept");
        let want = reference_nat(
            &input,
            LB1_MAC,
            be_mac(backend),
            client,
            backend,
            cport,
            8080,
        );
        check_output(what, &want, &out);
        assert_eq!(stat_of(stat::CT_INSERT) - snat_before, 1, "{what}: tracked");

        // The reply, addressed to the client: its source goes back to the VIP.
        let reply_l4 = if tcp {
            L4::Tcp { flags: SYNACK }
        } else {
            L4::Udp
        };
        for round in ["unconfirmed", "confirmed", "cached"] {
            let reply = from_backend(backend, client, reply_l4, cport);
            let out = run_expecting(
                prog,
                &format!("{what} reply ({round})"),
                &reply,
                eth1,
                REDIRECT,
            );
            let want = reference_nat(&reply, LB0_MAC, CLIENT_MAC, vip, client, vport, cport);
            check_output(&format!("{what} reply ({round})"), &want, &out);
            // The client's next packet: same backend, source kept (it confirms the flow,
            // then goes through the flow cache).
            let input = from_client(client, vip, next, cport, vport);
            let out = run_expecting(
                prog,
                &format!("{what} next ({round})"),
                &input,
                eth0,
                REDIRECT,
            );
            let want = reference_nat(
                &input,
                LB1_MAC,
                be_mac(backend),
                client,
                backend,
                cport,
                8080,
            );
            check_output(&format!("{what} next ({round})"), &want, &out);
        }

        // Traffic from the backend that is no reply (another port of the client) passes.
        let stray = from_backend(backend, client, reply_l4, cport + 1);
        let before = stat_of(stat::PASS_NOT_VIP);
        let out = run_expecting(prog, &format!("{what} stray"), &stray, eth1, PASS);
        check_output(&format!("{what} stray"), &stray, &out);
        assert_eq!(
            stat_of(stat::PASS_NOT_VIP) - before,
            1,
            "{what}: stray counted"
        );

        // A reply with a wrong IPv4 header checksum is passed untouched, counted.
        if client.is_ipv4() {
            let mut bad = from_backend(backend, client, reply_l4, cport);
            bad[24] ^= 0x5a;
            let before = stat_of(stat::PASS_BAD_CSUM);
            let out = run_expecting(prog, &format!("{what} bad checksum"), &bad, eth1, PASS);
            check_output(&format!("{what} bad checksum"), &bad, &out);
            assert_eq!(
                stat_of(stat::PASS_BAD_CSUM) - before,
                1,
                "{what}: bad checksum"
            );
        }

        // ICMP errors about the flow, both ways, translated with every checksum.
        let l4 = if tcp { L4::Tcp { flags: ACK } } else { L4::Udp };
        let quote = |smac, dmac, src, dst, sport, dport| {
            l3_of(build(
                smac,
                dmac,
                Vlan::None,
                src,
                dst,
                63,
                l4,
                sport,
                dport,
                b"q",
            ))
        };
        // An error as sent (TTL 64), or as the node forwards it (63).
        let icmp = |smac, dmac, src: IpAddr, dst: IpAddr, ttl: u8, quoted: &[u8]| {
            let eth = PacketBuilder::ethernet2(smac, dmac);
            let mut out = Vec::new();
            match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => eth
                    .ipv4(s.octets(), d.octets(), ttl)
                    .icmpv4(Icmpv4Type::DestinationUnreachable(
                        DestUnreachableHeader::Port,
                    ))
                    .write(&mut out, quoted),
                (IpAddr::V6(s), IpAddr::V6(d)) => eth
                    .ipv6(s.octets(), d.octets(), ttl)
                    .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
                    .write(&mut out, quoted),
                _ => unreachable!(),
            }
            .unwrap();
            out
        };
        // From the backend to the client, about what it received from the client.
        let input = icmp(
            be_mac(backend),
            LB1_MAC,
            backend,
            client,
            64,
            &quote(LB1_MAC, be_mac(backend), client, backend, cport, 8080),
        );
        let want = icmp(
            LB0_MAC,
            CLIENT_MAC,
            vip,
            client,
            63,
            &quote(CLIENT_MAC, LB0_MAC, client, vip, cport, vport),
        );
        let w = format!("{what}: ICMP error from the backend");
        let out = run_expecting(prog, &w, &input, eth1, REDIRECT);
        check_output(&w, &want, &out);
        // From the client to the VIP, about a reply it received: the client's address stays.
        let input = icmp(
            CLIENT_MAC,
            LB0_MAC,
            client,
            vip,
            64,
            &quote(LB0_MAC, CLIENT_MAC, vip, client, vport, cport),
        );
        let want = icmp(
            LB1_MAC,
            be_mac(backend),
            client,
            backend,
            63,
            &quote(be_mac(backend), LB1_MAC, backend, client, 8080, cport),
        );
        let w = format!("{what}: ICMP error from the client");
        let out = run_expecting(prog, &w, &input, eth0, REDIRECT);
        check_output(&w, &want, &out);
    }
    let cached = stat_of(stat::CT_HIT) - stat_of(stat::CT_SLOW);
    assert!(cached >= 4, "the flow cache served {cached} packets");

    // The same client address and port toward the same backend through a second VIP: the
    // backend could not tell the two flows apart, so the second is dropped, counted against
    // its service.
    let key = |vip| ServiceKey {
        vip: v4(vip),
        port: 80,
        proto: Protocol::Tcp,
    };
    let syn = |vip| from_client(v4(CLIENT4B), v4(vip), L4::Tcp { flags: SYN }, 42000, 80);
    run_expecting(prog, "first VIP", &syn(PVIP4_ONE), eth0, REDIRECT);
    let before = stat_of(stat::DROP_NO_SNAT_PORT);
    run_expecting(
        prog,
        "second VIP, same 4-tuple",
        &syn(PVIP4_ONE_AGAIN),
        eth0,
        DROP,
    );
    assert_eq!(stat_of(stat::DROP_NO_SNAT_PORT) - before, 1);
    let drops = |vip| balancer.service_stats(&key(vip)).unwrap().unwrap().drops;
    assert_eq!(drops(PVIP4_ONE_AGAIN), 1);
    assert_eq!(drops(PVIP4_ONE), 0);
    // Another port of that client goes through.
    let other = from_client(
        v4(CLIENT4B),
        v4(PVIP4_ONE_AGAIN),
        L4::Tcp { flags: SYN },
        42001,
        80,
    );
    run_expecting(prog, "second VIP, another port", &other, eth0, REDIRECT);

    // No backend: dropped, counted against the service.
    for _ in 0..3 {
        run_expecting(prog, "no backend", &syn(PVIP4_EMPTY), eth0, DROP);
    }
    assert_eq!(drops(PVIP4_EMPTY), 3);

    // SCTP: the association keeps the client's address and port; the CRC32c is right both
    // ways (it changes with the destination port going in, the source port coming back).
    let init = init_chunk(1, 0x1111);
    let input = sctp_frame(
        CLIENT_MAC,
        LB0_MAC,
        v4(CLIENT4),
        v4(PVIP4),
        64,
        33000,
        2905,
        0,
        &init,
    );
    let out = run_expecting(prog, "SCTP INIT", &input, eth0, REDIRECT);
    let (backend, _) = endpoint(&out, false);
    let want = sctp_frame(
        LB1_MAC,
        be_mac(backend),
        v4(CLIENT4),
        backend,
        63,
        33000,
        8080,
        0,
        &init,
    );
    check_output("SCTP INIT", &want, &out);
    assert!(sctp_crc_ok(&out), "SCTP INIT: CRC32c");
    let ack = init_chunk(2, 0x2222);
    let reply = sctp_frame(
        be_mac(backend),
        LB1_MAC,
        backend,
        v4(CLIENT4),
        64,
        8080,
        33000,
        0x1111,
        &ack,
    );
    let out = run_expecting(prog, "SCTP INIT ACK", &reply, eth1, REDIRECT);
    let want = sctp_frame(
        LB0_MAC,
        CLIENT_MAC,
        v4(PVIP4),
        v4(CLIENT4),
        63,
        2905,
        33000,
        0x1111,
        &ack,
    );
    check_output("SCTP INIT ACK", &want, &out);
    assert!(sctp_crc_ok(&out), "SCTP INIT ACK: CRC32c");

    // A fragmented datagram: every fragment keeps the client's address, the first its port.
    let payload: Vec<u8> = (0..600u32).map(|i| (i * 7 + 3) as u8).collect();
    let datagram = build(
        CLIENT_MAC,
        LB0_MAC,
        Vlan::None,
        v4(CLIENT4),
        v4(PVIP4),
        64,
        L4::Udp,
        43000,
        53,
        &payload,
    );
    let pieces = fragment4(&datagram, 0x2001, &[0, 200, 400, 608]);
    let mut went_to = None;
    for (i, piece) in pieces.iter().enumerate() {
        let what = format!("fragment {i}");
        let out = run_expecting(prog, &what, piece, eth0, REDIRECT);
        let (src, dst) = (&out[26..30], &out[30..34]);
        assert_eq!(src, CLIENT4, "{what}: source kept");
        assert!(BACKENDS4.iter().any(|b| b == dst), "{what}: to {dst:?}");
        assert_eq!(
            *went_to.get_or_insert(dst.to_vec()),
            dst,
            "{what}: same backend"
        );
        if i == 0 {
            assert_eq!(
                endpoint(&out, true),
                (v4(CLIENT4), 43000),
                "{what}: port kept"
            );
        }
    }

    // Without such services the source check is off again: a backend's packet to a client
    // passes, whatever the tables hold.
    let mut balancer = balancer;
    let keys: Vec<ServiceKey> = balancer.services().map(|s| s.key).collect();
    for key in &keys {
        balancer.remove_service(key).unwrap();
    }
    let reply = from_backend(v4(BACKENDS4[0]), v4(CLIENT4), L4::Udp, 41000);
    let out = run_expecting(balancer.program(), "after removal", &reply, eth1, PASS);
    check_output("after removal", &reply, &out);
}

// ---------- fragments ----------

/// The MAC address of a backend (`BACKENDS4`, then `BACKENDS6`).
fn be_mac(backend: IpAddr) -> [u8; 6] {
    let i = BACKENDS4
        .iter()
        .map(|a| v4(*a))
        .chain(BACKENDS6.iter().map(|a| v6(*a)))
        .position(|b| b == backend)
        .unwrap_or_else(|| panic!("{backend} is not a backend"));
    BE_MAC[i % 3]
}

/// Runs `input` arriving on `ingress`; checks the verdict is `want`; the output packet.
fn run_expecting(prog: &XdpProgram, what: &str, input: &[u8], ingress: u32, want: u32) -> Vec<u8> {
    let out = prog.test_run_on(input, Some(ingress)).unwrap();
    assert_eq!(
        verdict::name(out.verdict),
        verdict::name(want),
        "{what}: verdict"
    );
    out.packet
}

/// Splits an untagged IPv4 frame without options into fragments with identification `id`:
/// piece `i` is the IP payload's bytes `cuts[i]..cuts[i + 1]` (multiples of 8 but the last),
/// DF clear, MF on all but the last piece, every header checksum recomputed.
fn fragment4(frame: &[u8], id: u16, cuts: &[usize]) -> Vec<Vec<u8>> {
    assert_eq!(frame[14], 0x45, "no IPv4 options");
    let tot = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let payload = &frame[34..14 + tot];
    assert_eq!(*cuts.last().unwrap(), payload.len());
    cuts.windows(2)
        .map(|w| {
            let (a, b) = (w[0], w[1]);
            assert_eq!(a % 8, 0);
            let mut p = frame[..34].to_vec();
            p[16..18].copy_from_slice(&((20 + b - a) as u16).to_be_bytes());
            p[18..20].copy_from_slice(&id.to_be_bytes());
            let more = if b < payload.len() { 0x2000 } else { 0 };
            p[20..22].copy_from_slice(&(more | (a / 8) as u16).to_be_bytes());
            fix_ipv4_checksum(&mut p);
            p.extend_from_slice(&payload[a..b]);
            p
        })
        .collect()
}

/// As [`fragment4`], for an untagged IPv6 frame without extension headers: each piece gets
/// a fragment header (identification `id`).
fn fragment6(frame: &[u8], id: u32, cuts: &[usize]) -> Vec<Vec<u8>> {
    let payload = &frame[54..];
    assert_eq!(*cuts.last().unwrap(), payload.len());
    let upper = frame[20];
    cuts.windows(2)
        .map(|w| {
            let (a, b) = (w[0], w[1]);
            assert_eq!(a % 8, 0);
            let mut p = frame[..54].to_vec();
            p[18..20].copy_from_slice(&((8 + b - a) as u16).to_be_bytes());
            p[20] = 44;
            let more = u16::from(b < payload.len());
            p.extend_from_slice(&[upper, 0]);
            p.extend_from_slice(&(a as u16 | more).to_be_bytes());
            p.extend_from_slice(&id.to_be_bytes());
            p.extend_from_slice(&payload[a..b]);
            p
        })
        .collect()
}

/// Issue 13: the fragments after the first reach the first fragment's backend (and a
/// fragmented reply its client), translated as it was, in order or not; a fragment ahead of
/// its first fragment is dropped, then passes once the first fragment was seen. The
/// expected fragments are the fragments of the whole datagram as the backend must see it,
/// built with its checksums computed from scratch.
#[test]
fn fragments_follow_their_first_fragment() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let (eth0, eth1) = (ifindex("eth0"), ifindex("eth1"));
    let payload: Vec<u8> = (0..600u32).map(|i| (i * 7 + 3) as u8).collect();
    let stat = |i| prog.stat(i).unwrap();
    let send = |what: &str, input: &[u8], ingress: u32, want: u32| {
        run_expecting(prog, what, input, ingress, want)
    };

    for v6 in [false, true] {
        let fam = if v6 { "ipv6" } else { "ipv4" };
        let (client, vip, snat) = if v6 {
            (self::v6(CLIENT6), self::v6(VIP6), self::v6(SNAT6))
        } else {
            (v4(CLIENT4), v4(VIP4), v4(SNAT4))
        };
        // UDP header and 600 bytes: pieces of 200, 200 and 208 bytes.
        let cuts = [0, 200, 400, 608];
        let split = |frame: &[u8], id: u32| {
            if v6 {
                fragment6(frame, id, &cuts)
            } else {
                fragment4(frame, id as u16, &cuts)
            }
        };
        let udp = |smac, dmac, src, dst, ttl, sport, dport| {
            build(
                smac,
                dmac,
                Vlan::None,
                src,
                dst,
                ttl,
                L4::Udp,
                sport,
                dport,
                &payload,
            )
        };
        for (id, order, cport) in [
            (0x1001u32, [0usize, 1, 2], 52001u16),
            (0x1002, [2, 0, 1], 52002),
            (0x1003, [1, 2, 0], 52003),
        ] {
            let input = split(&udp(CLIENT_MAC, LB0_MAC, client, vip, 64, cport, 53), id);
            let what = format!("{fam} UDP datagram {id:#x}, fragments in order {order:?}");
            let (heads, nats, headless) = (
                stat(stat::FRAG_HEAD),
                stat(stat::FRAG_NAT),
                stat(stat::DROP_FRAG_NO_HEAD),
            );
            let mut early = 0;
            let mut outs: Vec<Option<Vec<u8>>> = vec![None; 3];
            let mut head_seen = false;
            for &i in &order {
                let w = format!("{what}: fragment {i}");
                if i == 0 {
                    outs[0] = Some(send(&w, &input[0], eth0, verdict::REDIRECT));
                    head_seen = true;
                } else if head_seen {
                    outs[i] = Some(send(&w, &input[i], eth0, verdict::REDIRECT));
                } else {
                    // Ahead of its first fragment: dropped, and sent again (as a host's
                    // retransmission would) after it.
                    let out = send(&w, &input[i], eth0, verdict::DROP);
                    assert_eq!(out, input[i], "{w}: dropped unchanged");
                    early += 1;
                }
            }
            for (i, out) in outs.iter_mut().enumerate() {
                if out.is_none() {
                    let w = format!("{what}: fragment {i} again, after its first fragment");
                    *out = Some(send(&w, &input[i], eth0, verdict::REDIRECT));
                }
            }
            let outs: Vec<Vec<u8>> = outs.into_iter().map(Option::unwrap).collect();
            let (backend, _) = endpoint(&outs[0], false);
            let (_, snat_port) = endpoint(&outs[0], true);
            let want = split(
                &udp(LB1_MAC, be_mac(backend), snat, backend, 63, snat_port, 8080),
                id,
            );
            for (i, (got, want)) in outs.iter().zip(&want).enumerate() {
                check_output(&format!("{what}: fragment {i}"), want, got);
            }
            assert_eq!(stat(stat::FRAG_HEAD) - heads, 1, "{what}: frag_head");
            assert_eq!(stat(stat::FRAG_NAT) - nats, 2, "{what}: frag_nat");
            assert_eq!(
                stat(stat::DROP_FRAG_NO_HEAD) - headless,
                early,
                "{what}: drop_frag_no_head"
            );

            // The backend's reply, fragmented the same way, reaches the client as from the
            // VIP, every fragment.
            let reply = split(
                &udp(be_mac(backend), LB1_MAC, backend, snat, 64, 8080, snat_port),
                id ^ 0xff,
            );
            let want = split(
                &udp(LB0_MAC, CLIENT_MAC, vip, client, 63, 53, cport),
                id ^ 0xff,
            );
            for i in [0, 2, 1] {
                let w = format!("{what}: reply fragment {i}");
                let got = send(&w, &reply[i], eth1, verdict::REDIRECT);
                check_output(&w, &want[i], &got);
            }
        }
    }

    // A fragment to the SNAT address ahead of its first fragment may be the node's own
    // traffic: passed untouched.
    let input = fragment4(
        &build(
            BE_MAC[0],
            LB1_MAC,
            Vlan::None,
            v4(BACKENDS4[0]),
            v4(SNAT4),
            64,
            L4::Udp,
            8080,
            20050,
            &payload,
        ),
        0x2001,
        &[0, 200, 400, 608],
    );
    let passed = stat(stat::PASS_FRAGMENT);
    let out = send(
        "headless fragment to the SNAT address",
        &input[1],
        eth1,
        verdict::PASS,
    );
    assert_eq!(out, input[1]);
    assert_eq!(stat(stat::PASS_FRAGMENT) - passed, 1);
}

// ---------- SCTP ----------

/// An SCTP packet in an untagged frame: common header (CRC32c computed here, little-endian
/// on the wire as Linux writes it) and `chunks`.
#[allow(
    clippy::too_many_arguments,
    reason = "one argument per header field a fixture varies"
)]
fn sctp_frame(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    sport: u16,
    dport: u16,
    vtag: u32,
    chunks: &[u8],
) -> Vec<u8> {
    let sctp = sctp::packet(sport, dport, vtag, chunks);
    let eth = PacketBuilder::ethernet2(smac, dmac);
    let b = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => unreachable!(),
    };
    let mut out = Vec::new();
    b.write(&mut out, IpNumber(132), &sctp).unwrap();
    out
}

/// Whether the SCTP packet of an untagged frame carries a right CRC32c.
fn sctp_crc_ok(frame: &[u8]) -> bool {
    sctp::crc_ok(&frame[layout(frame).l4..])
}

/// Issue 13: SCTP to a VIP is balanced and tracked by ports (INIT opens, ABORT closes, a new
/// INIT re-opens); the backend's INIT ACK and DATA go back to the client; the new ports'
/// CRC32c is right (checked against expected packets whose CRC the test computes from
/// scratch), a wrong one stays wrong; a 1,400-byte DATA chunk too.
#[test]
fn sctp_is_balanced_by_ports_with_its_crc32c_updated() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let (eth0, eth1) = (ifindex("eth0"), ifindex("eth1"));
    let stat = |i| prog.stat(i).unwrap();
    let send = |what: &str, input: &[u8], ingress: u32, want: u32| {
        run_expecting(prog, what, input, ingress, want)
    };
    let big: Vec<u8> = (0..1400u32).map(|i| (i * 13 + 5) as u8).collect();
    for v6 in [false, true] {
        let fam = if v6 { "ipv6" } else { "ipv4" };
        let (client, vip, snat, backends) = if v6 {
            (
                self::v6(CLIENT6),
                self::v6(VIP6),
                self::v6(SNAT6),
                BACKENDS6.iter().map(|a| self::v6(*a)).collect::<Vec<_>>(),
            )
        } else {
            (
                v4(CLIENT4),
                v4(VIP4),
                v4(SNAT4),
                BACKENDS4.iter().map(|a| v4(*a)).collect::<Vec<_>>(),
            )
        };
        let cport = 33000;
        let crcs = stat(stat::SCTP_CRC);
        // Client → VIP, and what the backend must receive.
        let to_vip = |vtag, chunks: &[u8]| {
            sctp_frame(
                CLIENT_MAC, LB0_MAC, client, vip, 64, cport, 2905, vtag, chunks,
            )
        };
        let at_backend = |backend, snat_port, vtag, chunks: &[u8]| {
            sctp_frame(
                LB1_MAC,
                be_mac(backend),
                snat,
                backend,
                63,
                snat_port,
                8080,
                vtag,
                chunks,
            )
        };
        let what = format!("{fam} SCTP INIT to the VIP");
        let out = send(
            &what,
            &to_vip(0, &init_chunk(1, 0x1111)),
            eth0,
            verdict::REDIRECT,
        );
        let (backend, _) = endpoint(&out, false);
        let (_, snat_port) = endpoint(&out, true);
        assert!(backends.contains(&backend), "{what}: went to {backend}");
        assert!((20000..=20099).contains(&snat_port), "{what}: SNAT port");
        check_output(
            &what,
            &at_backend(backend, snat_port, 0, &init_chunk(1, 0x1111)),
            &out,
        );
        assert!(sctp_crc_ok(&out), "{what}: CRC32c");

        // The backend's INIT ACK reaches the client from the VIP.
        let what = format!("{fam} SCTP INIT ACK from the backend");
        let reply = sctp_frame(
            be_mac(backend),
            LB1_MAC,
            backend,
            snat,
            64,
            8080,
            snat_port,
            0x1111,
            &init_chunk(2, 0x2222),
        );
        let out = send(&what, &reply, eth1, verdict::REDIRECT);
        let want = sctp_frame(
            LB0_MAC,
            CLIENT_MAC,
            vip,
            client,
            63,
            2905,
            cport,
            0x1111,
            &init_chunk(2, 0x2222),
        );
        check_output(&what, &want, &out);

        // DATA of the association (a small chunk, then 1,400 bytes): same backend, port.
        for (n, data) in [(1u32, &b"hello"[..]), (2, &big[..])] {
            let what = format!("{fam} SCTP DATA of {} bytes", data.len());
            let chunks = data_chunk(n, data);
            let out = send(&what, &to_vip(0x2222, &chunks), eth0, verdict::REDIRECT);
            check_output(
                &what,
                &at_backend(backend, snat_port, 0x2222, &chunks),
                &out,
            );
        }

        // A wrong CRC stays wrong, by as much.
        let what = format!("{fam} SCTP DATA with a wrong CRC32c");
        let chunks = data_chunk(3, b"bad");
        let mut input = to_vip(0x2222, &chunks);
        let at = input.len() - chunks.len() - 4;
        input[at] ^= 0x5a;
        let out = send(&what, &input, eth0, verdict::REDIRECT);
        let mut want = at_backend(backend, snat_port, 0x2222, &chunks);
        let at = want.len() - chunks.len() - 4;
        want[at] ^= 0x5a;
        check_output(&what, &want, &out);
        assert!(!sctp_crc_ok(&out), "{what}: still wrong");
        assert_eq!(stat(stat::SCTP_CRC) - crcs, 5, "{fam}: sctp_crc");

        // ABORT closes the association; a new INIT on the same ports opens a new one.
        let what = format!("{fam} SCTP ABORT");
        let abort = chunk(6, 0, &[]);
        let out = send(&what, &to_vip(0x2222, &abort), eth0, verdict::REDIRECT);
        check_output(&what, &at_backend(backend, snat_port, 0x2222, &abort), &out);
        let inserts = stat(stat::CT_INSERT);
        let what = format!("{fam} SCTP INIT after ABORT");
        let out = send(
            &what,
            &to_vip(0, &init_chunk(1, 0x3333)),
            eth0,
            verdict::REDIRECT,
        );
        let (backend2, _) = endpoint(&out, false);
        let (_, snat_port2) = endpoint(&out, true);
        check_output(
            &what,
            &at_backend(backend2, snat_port2, 0, &init_chunk(1, 0x3333)),
            &out,
        );
        assert_eq!(stat(stat::CT_INSERT) - inserts, 1, "{what}: a new entry");
    }

    // A first fragment of an SCTP packet: its CRC32c covers a datagram of unknown length,
    // so it is passed untouched.
    let mut head = sctp_frame(
        CLIENT_MAC,
        LB0_MAC,
        v4(CLIENT4),
        v4(VIP4),
        64,
        33001,
        2905,
        0,
        &init_chunk(1, 0x4444),
    );
    head[20] |= 0x20;
    fix_ipv4_checksum(&mut head);
    let unsupported = stat(stat::PASS_UNSUPPORTED);
    let out = send("SCTP first fragment", &head, eth0, verdict::PASS);
    assert_eq!(out, head, "SCTP first fragment: untouched");
    assert_eq!(stat(stat::PASS_UNSUPPORTED) - unsupported, 1);
}

// ---------- NAT46 / NAT64 ----------

/// Sets an untagged frame's TOS / traffic class; for IPv4 also DF, identification 0 and the
/// header checksum (what the translator writes toward IPv4: an atomic datagram).
fn with_tos(mut p: Vec<u8>, tos: u8, atomic_v4: bool) -> Vec<u8> {
    if p[12..14] == [0x08, 0x00] {
        p[15] = tos;
        if atomic_v4 {
            p[18..22].copy_from_slice(&[0, 0, 0x40, 0]);
        }
        fix_ipv4_checksum(&mut p);
    } else {
        p[14] = 0x60 | tos >> 4;
        p[15] = (tos << 4) | (p[15] & 0x0f);
    }
    p
}

/// Issue 13: an IPv4 VIP with IPv6 backends (NAT46) and an IPv6 VIP with IPv4 backends
/// (NAT64), TCP and UDP, both ways: the translated packet is compared byte for byte with
/// one built from scratch in the other family (etherparse computes its checksums): the
/// SNAT address of the backend's family, TOS ↔ traffic class, TTL ↔ hop limit less one,
/// DF and identification 0 toward IPv4. IPv4 UDP without a checksum gets one, whatever its
/// length.
#[test]
fn nat46_and_nat64_translate_headers_and_checksums() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // Room toward the backends for UDP datagrams longer than a page (multi-buffer frames).
    lb.run(&["ip", "link", "set", "eth1", "mtu", "9000"])
        .unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let (eth0, eth1) = (ifindex("eth0"), ifindex("eth1"));
    let stat = |i| prog.stat(i).unwrap();
    let send = |what: &str, input: &[u8], ingress: u32, want: u32| {
        run_expecting(prog, what, input, ingress, want)
    };
    let xlats = stat(stat::XLAT);
    let mut translated = 0;
    for (nat, client, vip, snat, backends) in [
        (
            "NAT46",
            v4(CLIENT4),
            v4(VIP4_46),
            v6(SNAT6),
            BACKENDS6.iter().map(|a| v6(*a)).collect::<Vec<_>>(),
        ),
        (
            "NAT64",
            v6(CLIENT6),
            v6(VIP6_64),
            v4(SNAT4),
            BACKENDS4.iter().map(|a| v4(*a)).collect::<Vec<_>>(),
        ),
    ] {
        for (l4, reply_l4, payload) in [
            (L4::Tcp { flags: SYN }, L4::Tcp { flags: SYNACK }, &b""[..]),
            (L4::Udp, L4::Udp, &b"a query of some length"[..]),
        ] {
            let what = format!("{nat} {}", if payload.is_empty() { "TCP" } else { "UDP" });
            let cport = 42000 + translated as u16;
            let input = with_tos(
                build(
                    CLIENT_MAC,
                    LB0_MAC,
                    Vlan::None,
                    client,
                    vip,
                    64,
                    l4,
                    cport,
                    80,
                    payload,
                ),
                0xb8,
                false,
            );
            let out = send(&what, &input, eth0, verdict::REDIRECT);
            let (backend, bport) = endpoint(&out, false);
            let (src, snat_port) = endpoint(&out, true);
            assert!(backends.contains(&backend), "{what}: went to {backend}");
            assert_eq!((src, bport), (snat, 8080), "{what}: from the SNAT address");
            let want = with_tos(
                build(
                    LB1_MAC,
                    be_mac(backend),
                    Vlan::None,
                    snat,
                    backend,
                    63,
                    l4,
                    snat_port,
                    8080,
                    payload,
                ),
                0xb8,
                true,
            );
            check_output(&what, &want, &out);

            let what = format!("{what} reply");
            let reply = with_tos(
                build(
                    be_mac(backend),
                    LB1_MAC,
                    Vlan::None,
                    backend,
                    snat,
                    64,
                    reply_l4,
                    8080,
                    snat_port,
                    payload,
                ),
                0x28,
                false,
            );
            let out = send(&what, &reply, eth1, verdict::REDIRECT);
            let want = with_tos(
                build(
                    LB0_MAC,
                    CLIENT_MAC,
                    Vlan::None,
                    vip,
                    client,
                    63,
                    reply_l4,
                    80,
                    cport,
                    payload,
                ),
                0x28,
                true,
            );
            check_output(&what, &want, &out);
            translated += 2;
        }
    }
    assert_eq!(stat(stat::XLAT) - xlats, translated);

    // IPv4 UDP without a checksum: IPv6 needs one, computed over the whole datagram (odd
    // lengths, lengths not a multiple of 8 or of the program's 256-byte chunks, and
    // datagrams longer than a page, whose end is in the fragments of a multi-buffer frame),
    // compared with the packet built in IPv6 by etherparse.
    for (i, len) in [
        0usize, 1, 7, 8, 13, 255, 256, 257, 1000, 1432, 2100, 5001, 8000,
    ]
    .into_iter()
    .enumerate()
    {
        let what = format!("NAT46 UDP without a checksum, {len} bytes of payload");
        let payload: Vec<u8> = (0..len).map(|b| (b * 7 + 3) as u8).collect();
        let cport = 42100 + i as u16;
        let mut input = udp4(CLIENT4, VIP4_46, cport, 80, &payload);
        input[40..42].copy_from_slice(&[0, 0]);
        let out = send(&what, &input, eth0, verdict::REDIRECT);
        let (backend, _) = endpoint(&out, false);
        let (_, snat_port) = endpoint(&out, true);
        let want = with_tos(
            build(
                LB1_MAC,
                be_mac(backend),
                Vlan::None,
                v6(SNAT6),
                backend,
                63,
                L4::Udp,
                snat_port,
                8080,
                &payload,
            ),
            0,
            false,
        );
        check_output(&what, &want, &out);
    }
    assert_eq!(stat(stat::DROP_XLAT_NO_CSUM), 0);
}

/// An ICMP or ICMPv6 error frame (`type`, `code`, the 4 bytes after the checksum) from `src`
/// to `dst`, TTL / hop limit 64, quoting `quote`; etherparse computes its checksum (with
/// ICMPv6's pseudo-header).
#[allow(
    clippy::too_many_arguments,
    reason = "one argument per header field a fixture varies"
)]
fn icmp_error(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    quote: &[u8],
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(smac, dmac);
    let mut out = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth
            .ipv4(s.octets(), d.octets(), 64)
            .icmpv4(Icmpv4Type::Unknown {
                type_u8: ty,
                code_u8: code,
                bytes5to8: rest,
            })
            .write(&mut out, quote)
            .unwrap(),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth
            .ipv6(s.octets(), d.octets(), 64)
            .icmpv6(Icmpv6Type::Unknown {
                type_u8: ty,
                code_u8: code,
                bytes5to8: rest,
            })
            .write(&mut out, quote)
            .unwrap(),
        _ => unreachable!(),
    }
    out
}

/// An ICMP error from the backend side about a NAT46/64 flow, and what the client should get.
/// `from`/`want_from`: the router's source, or (`None`) the backend's own error (from the
/// VIP).
struct XlatIcmpCase {
    what: &'static str,
    nat46: bool,
    tcp: bool,
    from: Option<IpAddr>,
    err: (u8, u8, [u8; 4]),
    truncated: bool,
    want: (u8, u8, [u8; 4]),
    want_from: Option<IpAddr>,
}

/// Opens the flow `c` is about (client port `cport`), sends the backend side's error about
/// it and compares the client's error with one built from scratch in the client's family
/// (etherparse computes every checksum, the quote's included). `want_verdict` other than
/// XDP_REDIRECT: only the verdict is checked, and the error must come back untouched when
/// passed.
fn check_xlat_icmp_error(prog: &XdpProgram, c: &XlatIcmpCase, cport: u16, want_verdict: u32) {
    let (eth0, eth1) = (ifindex("eth0"), ifindex("eth1"));
    let (client, vip) = if c.nat46 {
        (v4(CLIENT4), v4(VIP4_46))
    } else {
        (v6(CLIENT6), v6(VIP6_64))
    };
    let (l4, payload) = if c.tcp {
        (L4::Tcp { flags: SYN }, &b""[..])
    } else {
        (L4::Udp, &b"a datagram the backend refused"[..])
    };
    let input = with_tos(
        build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            client,
            vip,
            64,
            l4,
            cport,
            80,
            payload,
        ),
        0x20,
        false,
    );
    let out = run_expecting(prog, c.what, &input, eth0, verdict::REDIRECT);
    let (backend, _) = endpoint(&out, false);
    let (snat, _) = endpoint(&out, true);
    let sent = l3_of(out);
    // What the backend side quotes: the packet as sent, or its IP header and 8 bytes.
    let ihl = if c.nat46 { 40 } else { 20 };
    let quote = if c.truncated {
        &sent[..ihl + 8]
    } else {
        &sent[..]
    };
    let error = icmp_error(
        be_mac(backend),
        LB1_MAC,
        c.from.unwrap_or(backend),
        snat,
        c.err.0,
        c.err.1,
        c.err.2,
        quote,
    );
    if want_verdict != verdict::REDIRECT {
        let got = run_expecting(prog, c.what, &error, eth1, want_verdict);
        if want_verdict == verdict::PASS {
            assert_eq!(got, error, "{}: untouched", c.what);
        }
        return;
    }
    // The client's packet as the backend saw it, in the client's family.
    let seen = l3_of(with_tos(
        build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            client,
            vip,
            63,
            l4,
            cport,
            80,
            payload,
        ),
        0x20,
        true,
    ));
    let client_ihl = if c.nat46 { 20 } else { 40 };
    let want_quote = if c.truncated {
        &seen[..client_ihl + 8]
    } else {
        &seen[..]
    };
    let mut want = with_tos(
        icmp_error(
            LB0_MAC,
            CLIENT_MAC,
            c.want_from.unwrap_or(vip),
            client,
            c.want.0,
            c.want.1,
            c.want.2,
            want_quote,
        ),
        0,
        true,
    );
    // TTL / hop limit one lower than the error's 64.
    if c.nat46 {
        want[22] = 63;
        fix_ipv4_checksum(&mut want);
    } else {
        want[21] = 63;
    }
    let got = run_expecting(prog, c.what, &error, eth1, verdict::REDIRECT);
    check_output(c.what, &want, &got);
}

/// Issue 13: an ICMP error from the backend side about a NAT46/64 flow reaches the client
/// in the client's family (RFC 7915): ICMPv4 ↔ ICMPv6 type and code, the MTU less or plus
/// 20, a parameter problem's pointer mapped field to field, the quoted packet translated
/// back to the one the client sent (as the backend saw it: its TTL one lower, DF and
/// identification 0 toward IPv4), the outer source the VIP for the backend's own error, a
/// router's IPv4 address in 64:ff9b::/96 for an IPv6 client, a router's IPv6 address inside
/// that prefix as its IPv4 address (else the VIP) for an IPv4 client. Each expected packet
/// is built from scratch in the client's family (etherparse computes every checksum, the
/// quote's included); a truncated quote stays truncated. Parameter problems RFC 7915 cannot
/// translate are dropped and counted.
#[test]
fn nat46_and_nat64_icmp_errors_reach_the_client_in_its_family() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let stat = |i| prog.stat(i).unwrap();
    let router4 = v4([198, 18, 1, 200]);
    let router6 = v6(ip6("fd00:18:1::200"));
    let router4_in_prefix = v6(ip6("64:ff9b::c612:1c8"));
    let case = |what, nat46, tcp, from, err, truncated, want, want_from| XlatIcmpCase {
        what,
        nat46,
        tcp,
        from,
        err,
        truncated,
        want,
        want_from,
    };
    let cases = [
        case(
            "NAT64 TCP, the backend's port unreachable",
            false,
            true,
            None,
            (3, 3, [0; 4]),
            false,
            (1, 4, [0; 4]),
            None,
        ),
        case(
            "NAT64 UDP, a router's fragmentation needed (MTU 1400)",
            false,
            false,
            Some(router4),
            (3, 4, [0, 0, 0x05, 0x78]),
            false,
            (2, 0, 1420u32.to_be_bytes()),
            Some(router4_in_prefix),
        ),
        case(
            "NAT64 TCP, a router's time exceeded, short quote",
            false,
            true,
            Some(router4),
            (11, 0, [0; 4]),
            true,
            (3, 0, [0; 4]),
            Some(router4_in_prefix),
        ),
        case(
            "NAT64 UDP, protocol unreachable",
            false,
            false,
            None,
            (3, 2, [0; 4]),
            false,
            (4, 1, [0, 0, 0, 6]),
            None,
        ),
        case(
            "NAT64 TCP, the backend's parameter problem at the TTL",
            false,
            true,
            None,
            (12, 0, [8, 0, 0, 0]),
            false,
            (4, 0, [0, 0, 0, 7]),
            None,
        ),
        case(
            "NAT64 UDP, a router's bad length at the total length, short quote",
            false,
            false,
            Some(router4),
            (12, 2, [3, 0, 0, 0]),
            true,
            (4, 0, [0, 0, 0, 4]),
            Some(router4_in_prefix),
        ),
        case(
            "NAT46 TCP, the backend's port unreachable",
            true,
            true,
            None,
            (1, 4, [0; 4]),
            false,
            (3, 3, [0; 4]),
            None,
        ),
        case(
            "NAT46 UDP, a router's packet too big (MTU 1400), outside the prefix",
            true,
            false,
            Some(router6),
            (2, 0, 1400u32.to_be_bytes()),
            false,
            (3, 4, [0, 0, 0x05, 0x64]),
            None,
        ),
        case(
            "NAT46 TCP, a router's time exceeded, inside the prefix, short quote",
            true,
            true,
            Some(router4_in_prefix),
            (3, 0, [0; 4]),
            true,
            (11, 0, [0; 4]),
            Some(router4),
        ),
        case(
            "NAT46 UDP, administratively prohibited",
            true,
            false,
            None,
            (1, 1, [0; 4]),
            false,
            (3, 10, [0; 4]),
            None,
        ),
        case(
            "NAT46 TCP, the backend's parameter problem at the destination address",
            true,
            true,
            None,
            (4, 0, [0, 0, 0, 30]),
            false,
            (12, 0, [16, 0, 0, 0]),
            None,
        ),
        case(
            "NAT46 UDP, unrecognized next header",
            true,
            false,
            None,
            (4, 1, [0, 0, 0, 6]),
            false,
            (3, 2, [0; 4]),
            None,
        ),
    ];
    let xlats = stat(stat::XLAT);
    for (i, c) in cases.iter().enumerate() {
        check_xlat_icmp_error(prog, c, 43000 + i as u16, verdict::REDIRECT);
    }
    // The flows' first packets and their errors.
    assert_eq!(stat(stat::XLAT) - xlats, 2 * cases.len() as u64);

    // Codes RFC 7915 does not list (ICMPv6 destination unreachable 5: source address failed
    // policy; ICMP 3/14: host precedence violation) and parameter problems it cannot
    // translate (a field the other family lacks, a code it drops) are dropped and counted; a
    // fragmentation-needed without an MTU is passed untouched (no plateau guessing).
    let unsupported = stat(stat::PASS_UNSUPPORTED);
    let dropped = stat(stat::DROP_XLAT_ICMP);
    for (i, (what, nat46, err, want)) in [
        (
            "NAT46 unlisted destination-unreachable code",
            true,
            (1, 5, [0; 4]),
            verdict::DROP,
        ),
        (
            "NAT64 host precedence violation",
            false,
            (3, 14, [0; 4]),
            verdict::DROP,
        ),
        (
            "NAT64 fragmentation needed without an MTU",
            false,
            (3, 4, [0; 4]),
            verdict::PASS,
        ),
        (
            "NAT46 parameter problem at the flow label",
            true,
            (4, 0, [0, 0, 0, 2]),
            verdict::DROP,
        ),
        (
            "NAT46 parameter problem, an unrecognized option",
            true,
            (4, 2, [0, 0, 0, 40]),
            verdict::DROP,
        ),
        (
            "NAT64 parameter problem at the identification",
            false,
            (12, 0, [4, 0, 0, 0]),
            verdict::DROP,
        ),
        (
            "NAT64 parameter problem, a required option missing",
            false,
            (12, 1, [0; 4]),
            verdict::DROP,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let c = case(what, nat46, true, None, err, false, (0, 0, [0; 4]), None);
        check_xlat_icmp_error(prog, &c, 43100 + i as u16, want);
    }
    assert_eq!(stat(stat::PASS_UNSUPPORTED) - unsupported, 1);
    assert_eq!(stat(stat::DROP_XLAT_ICMP) - dropped, 6);
}

/// Issue 13: with an RFC 6052 prefix of 32, 48 or 64 bits, a router's IPv4 address reaches
/// an IPv6 client embedded around the u octet, and a router's IPv6 address inside the
/// prefix reaches an IPv4 client as the IPv4 address it embeds; one outside it (here: its u
/// octet set) as the VIP. The embedded forms are RFC 6052 §2.4's examples for 192.0.2.33.
#[test]
fn nat46_and_nat64_icmp_errors_embed_routers_in_prefixes_of_32_48_and_64_bits() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let mut balancer = balancer();
    let _in_lb = lb.enter().unwrap();
    let router4 = v4([192, 0, 2, 33]);
    let mut cport = 43200;
    for (prefix, embedded, u_set) in [
        (
            "2001:db8::/32",
            ip6("2001:db8:c000:221::"),
            ip6("2001:db8:c000:221:100::"),
        ),
        (
            "2001:db8:122::/48",
            ip6("2001:db8:122:c000:2:2100::"),
            ip6("2001:db8:122:c000:102:2100::"),
        ),
        (
            "2001:db8:122:344::/64",
            ip6("2001:db8:122:344:c0:2:2100:0"),
            ip6("2001:db8:122:344:1c0:2:2100:0"),
        ),
    ] {
        balancer
            .configure_node(&NodeConfig {
                snat_v4: Some(Ipv4Addr::from(SNAT4)),
                snat_v6: Some(Ipv6Addr::from(SNAT6)),
                snat_ports: (20000, 20099),
                xlat_prefix: prefix.parse().unwrap(),
                ..NodeConfig::default()
            })
            .unwrap();
        let prog = balancer.program();
        let what = |w: &str| -> &'static str { format!("{prefix}: {w}").leak() };
        for c in [
            XlatIcmpCase {
                what: what("NAT64 UDP, a router's fragmentation needed"),
                nat46: false,
                tcp: false,
                from: Some(router4),
                err: (3, 4, [0, 0, 0x05, 0x78]),
                truncated: false,
                want: (2, 0, 1420u32.to_be_bytes()),
                want_from: Some(v6(embedded)),
            },
            XlatIcmpCase {
                what: what("NAT64 TCP, a router's parameter problem, short quote"),
                nat46: false,
                tcp: true,
                from: Some(router4),
                err: (12, 0, [16, 0, 0, 0]),
                truncated: true,
                want: (4, 0, [0, 0, 0, 24]),
                want_from: Some(v6(embedded)),
            },
            XlatIcmpCase {
                what: what("NAT46 TCP, a router's time exceeded, inside the prefix"),
                nat46: true,
                tcp: true,
                from: Some(v6(embedded)),
                err: (3, 0, [0; 4]),
                truncated: false,
                want: (11, 0, [0; 4]),
                want_from: Some(router4),
            },
            XlatIcmpCase {
                what: what("NAT46 UDP, a router's address unreachable, its u octet set"),
                nat46: true,
                tcp: false,
                from: Some(v6(u_set)),
                err: (1, 3, [0; 4]),
                truncated: false,
                want: (3, 1, [0; 4]),
                want_from: None,
            },
        ] {
            check_xlat_icmp_error(prog, &c, cport, verdict::REDIRECT);
            cport += 1;
        }
    }
}

/// Issue 13: an ICMP error from the client side (the client, or a router on its side) about
/// a reply of a NAT46/64 flow (VIP → client) reaches the backend in the backend's family:
/// RFC 7915's type, code and MTU, from the SNAT address (the client's own error; the
/// backend knows no other address of the client's) or a router's address through the
/// prefix, quoting the reply as the backend sent it (backend → SNAT address and port, its
/// TTL as the client saw it). Each expected error is built from scratch in the backend's
/// family by etherparse, which computes every checksum (the quote's included).
#[test]
fn client_side_icmp_errors_of_nat46_and_nat64_flows_reach_the_backend_in_its_family() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let (eth0, eth1) = (ifindex("eth0"), ifindex("eth1"));
    let stat = |i| prog.stat(i).unwrap();
    let router4 = v4([198, 18, 0, 200]);
    let router4_in_prefix = v6(ip6("64:ff9b::c612:c8"));
    // (what, NAT46, TCP, the error's source (None: the client), error, truncated quote,
    // what the backend gets, its source (None: the SNAT address)).
    #[allow(clippy::type_complexity, reason = "a fixture table")]
    let cases: [(
        &str,
        bool,
        bool,
        Option<IpAddr>,
        (u8, u8, [u8; 4]),
        bool,
        (u8, u8, [u8; 4]),
        Option<IpAddr>,
    ); 5] = [
        (
            "NAT46 TCP, the client's fragmentation needed (MTU 1400)",
            true,
            true,
            None,
            (3, 4, [0, 0, 0x05, 0x78]),
            false,
            (2, 0, 1420u32.to_be_bytes()),
            None,
        ),
        (
            "NAT46 UDP, the client's port unreachable",
            true,
            false,
            None,
            (3, 3, [0; 4]),
            false,
            (1, 4, [0; 4]),
            None,
        ),
        (
            "NAT46 UDP, a router's fragmentation needed, short quote",
            true,
            false,
            Some(router4),
            (3, 4, [0, 0, 0x05, 0x00]),
            true,
            (2, 0, 1300u32.to_be_bytes()),
            Some(router4_in_prefix),
        ),
        (
            "NAT64 TCP, the client's packet too big (MTU 1400)",
            false,
            true,
            None,
            (2, 0, 1400u32.to_be_bytes()),
            false,
            (3, 4, [0, 0, 0x05, 0x64]),
            None,
        ),
        (
            "NAT64 UDP, the client's port unreachable, short quote",
            false,
            false,
            None,
            (1, 4, [0; 4]),
            true,
            (3, 3, [0; 4]),
            None,
        ),
    ];
    let xlats = stat(stat::XLAT);
    for (i, &(what, nat46, tcp, from, err, truncated, want_err, want_from)) in
        cases.iter().enumerate()
    {
        let (client, vip, snat) = if nat46 {
            (v4(CLIENT4), v4(VIP4_46), v6(SNAT6))
        } else {
            (v6(CLIENT6), v6(VIP6_64), v4(SNAT4))
        };
        let (l4, reply_l4, payload) = if tcp {
            (L4::Tcp { flags: SYN }, L4::Tcp { flags: SYNACK }, &b""[..])
        } else {
            (L4::Udp, L4::Udp, &b"an answer the client refused"[..])
        };
        let cport = 43300 + i as u16;
        let input = build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            client,
            vip,
            64,
            l4,
            cport,
            80,
            payload,
        );
        let out = run_expecting(prog, what, &input, eth0, verdict::REDIRECT);
        let (backend, _) = endpoint(&out, false);
        let (_, snat_port) = endpoint(&out, true);
        // The backend's reply, and what the client got of it.
        let reply = |ttl| {
            with_tos(
                build(
                    be_mac(backend),
                    LB1_MAC,
                    Vlan::None,
                    backend,
                    snat,
                    ttl,
                    reply_l4,
                    8080,
                    snat_port,
                    payload,
                ),
                0x28,
                // Toward IPv4 (NAT64's backend side), an atomic datagram.
                !nat46,
            )
        };
        let got = l3_of(run_expecting(
            prog,
            what,
            &reply(64),
            eth1,
            verdict::REDIRECT,
        ));
        let ihl = if nat46 { 20 } else { 40 };
        let quote = if truncated { &got[..ihl + 8] } else { &got[..] };
        let error = icmp_error(
            CLIENT_MAC,
            LB0_MAC,
            from.unwrap_or(client),
            vip,
            err.0,
            err.1,
            err.2,
            quote,
        );
        // The reply as the backend sent it, its TTL as the client saw it.
        let seen = l3_of(reply(63));
        let backend_ihl = if nat46 { 40 } else { 20 };
        let want_quote = if truncated {
            &seen[..backend_ihl + 8]
        } else {
            &seen[..]
        };
        let mut want = with_tos(
            icmp_error(
                LB1_MAC,
                be_mac(backend),
                want_from.unwrap_or(snat),
                backend,
                want_err.0,
                want_err.1,
                want_err.2,
                want_quote,
            ),
            0,
            true,
        );
        if nat46 {
            want[21] = 63;
        } else {
            want[22] = 63;
            fix_ipv4_checksum(&mut want);
        }
        let got = run_expecting(prog, what, &error, eth0, verdict::REDIRECT);
        check_output(what, &want, &got);
    }
    // Each flow's first packet, its reply and the error.
    assert_eq!(stat(stat::XLAT) - xlats, 3 * cases.len() as u64);
}

// ---------- BIG TCP and multi-buffer frames ----------

/// Issue 13: frames longer than a page reach the program as multi-buffer `xdp_buff`s
/// (BPF_PROG_TEST_RUN takes up to about 73 KB, the linear part then about 3.5 KB): a
/// 60,000-byte TCP segment over IPv4 and IPv6 to a VIP is balanced and compared byte for
/// byte with the reference (its checksum covers all the fragments, updated incrementally);
/// a BIG TCP packet (IPv4 total length 0, IPv6 payload length 0 without a hop-by-hop header,
/// over 64 KiB in the buffer) is passed untouched (`pass_unsupported`), not mistaken for a
/// bad length; a length of 0 on a short frame is one (`pass_bad_length`).
#[test]
fn multi_buffer_and_big_tcp_packets() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    // Room toward the backends for a 60,000-byte packet.
    lb.run(&["ip", "link", "set", "eth1", "mtu", "65535"])
        .unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let eth0 = ifindex("eth0");
    let stat = |i| prog.stat(i).unwrap();
    let send = |what: &str, input: &[u8], want: u32| run_expecting(prog, what, input, eth0, want);

    let payload: Vec<u8> = (0..60_000 - 40).map(|i| (i * 13 + 5) as u8).collect();
    for (what, client, vip, port, snat, backends) in [
        (
            "60,000-byte IPv4 TCP segment",
            v4(CLIENT4),
            v4(VIP4),
            80,
            v4(SNAT4),
            BACKENDS4.iter().map(|a| v4(*a)).collect::<Vec<_>>(),
        ),
        (
            "60,000-byte IPv6 TCP segment",
            v6(CLIENT6),
            v6(VIP6),
            443,
            v6(SNAT6),
            BACKENDS6.iter().map(|a| v6(*a)).collect::<Vec<_>>(),
        ),
    ] {
        let l4 = L4::Tcp { flags: ACK };
        let input = build(
            CLIENT_MAC,
            LB0_MAC,
            Vlan::None,
            client,
            vip,
            64,
            l4,
            44000,
            port,
            &payload,
        );
        assert!(input.len() >= 60_000, "{what}: a multi-buffer frame");
        let out = send(what, &input, verdict::REDIRECT);
        let (backend, _) = endpoint(&out, false);
        let (src, snat_port) = endpoint(&out, true);
        assert!(backends.contains(&backend), "{what}: went to {backend}");
        assert_eq!(src, snat, "{what}: from the SNAT address");
        let want = build(
            LB1_MAC,
            be_mac(backend),
            Vlan::None,
            snat,
            backend,
            63,
            l4,
            snat_port,
            8080,
            &payload,
        );
        check_output(what, &want, &out);
    }

    // BIG TCP: the length field 0, the packet over 64 KiB.
    // (Longer than an IP length field can say: the payload appended by hand; the TCP
    // checksum does not matter for a packet passed untouched.)
    let big = |client, vip, port, len_at: usize| {
        let mut p = tcp_with_payload(client, vip, port, &[]);
        p.resize(70_000, 0x42);
        p[len_at..len_at + 2].copy_from_slice(&[0, 0]);
        p
    };
    let mut big4 = big(v4(CLIENT4), v4(VIP4), 80, 16);
    fix_ipv4_checksum(&mut big4);
    let big6 = big(v6(CLIENT6), v6(VIP6), 443, 18);
    for (what, input) in [("BIG TCP over IPv4", &big4), ("BIG TCP over IPv6", &big6)] {
        let unsupported = stat(stat::PASS_UNSUPPORTED);
        let bad = stat(stat::PASS_BAD_LENGTH);
        let out = send(what, input, verdict::PASS);
        assert!(out == *input, "{what}: untouched");
        assert_eq!(stat(stat::PASS_UNSUPPORTED) - unsupported, 1, "{what}");
        assert_eq!(stat(stat::PASS_BAD_LENGTH) - bad, 0, "{what}");
    }
    // A length of 0 on a frame that holds no more than 64 KiB: a wrong length.
    let mut short4 = tcp4(CLIENT4, VIP4, 44001, 80, ACK);
    short4[16..18].copy_from_slice(&[0, 0]);
    fix_ipv4_checksum(&mut short4);
    let mut short6 = tcp6(CLIENT6, VIP6, 44001, 443, ACK);
    short6[18..20].copy_from_slice(&[0, 0]);
    for (what, input) in [
        ("IPv4 length 0, short", &short4),
        ("IPv6 length 0, short", &short6),
    ] {
        let bad = stat(stat::PASS_BAD_LENGTH);
        let out = send(what, input, verdict::PASS);
        assert!(out == *input, "{what}: untouched");
        assert_eq!(stat(stat::PASS_BAD_LENGTH) - bad, 1, "{what}");
    }
}

/// A TCP ACK from the client to `vip:port` carrying `payload`.
fn tcp_with_payload(client: IpAddr, vip: IpAddr, port: u16, payload: &[u8]) -> Vec<u8> {
    build(
        CLIENT_MAC,
        LB0_MAC,
        Vlan::None,
        client,
        vip,
        64,
        L4::Tcp { flags: ACK },
        44002,
        port,
        payload,
    )
}
