//! A BPF_PROG_TEST_RUN fuzzer for the XDP balancer, with an output checker of its own.
//!
//! Packets: random bytes, and valid TCP, UDP, SCTP, ICMP and ICMPv6 packets over IPv4 and
//! IPv6 (to VIPs, as replies to tracked flows, as errors quoting them, to other addresses),
//! then mutated: truncated, bytes flipped, lengths changed, IPv4 options, IPv6 extension
//! chains (routing headers with segments left, fragments), VLAN and QinQ tags, TCP flags,
//! TTL, Ethernet trailers, bad checksums, oversized. A sweep first truncates a set of packets
//! at every offset.
//!
//! The checker does not ask the program what it did. It parses the input itself, decides
//! from the policy docs/xdp.md states what must happen (passed untouched, translated toward
//! a backend or back to a client, an ICMP answer), and checks the output against that:
//! lengths, IPv4 header checksums, L4 checksums (valid exactly when they were), TTL, the
//! backend and SNAT port, payload and trailer untouched. A model of the flows seen so far
//! checks that a flow keeps its backend and port and that no two flows share a port. Two
//! VIPs keep their clients' sources (`preserve_source`): their packets must reach a backend
//! with the client's address and port, and the backends' replies to clients of those flows
//! come back from the VIP (other packets from backends pass untouched), and ICMP errors
//! about those flows are translated both ways; those cases are not mutated.
//!
//! Runs as part of the test suite with a bounded count (a minute at most); more with
//! `PORTICO_XDP_FUZZ_PACKETS` (see the README). `PORTICO_XDP_FUZZ_SEED` replays a run.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use etherparse::{IpNumber, PacketBuilder};
use portico_integration::{
    fibnet,
    sctp::{self, crc32c},
    TestNet,
};
use portico_xdp::{
    verdict, BackendSpec, Balancer, LoadOptions, NodeConfig, Protocol, ServiceKey, ServiceSpec,
    TestRunOutput, XdpBalancer, XdpProgram,
};

use fibnet::{CLIENT_MAC, LB0_MAC, LB1_MAC};

const VIP4: [u8; 4] = [203, 0, 113, 10];
const XLAT_VIP4: [u8; 4] = [203, 0, 113, 46];
const XLAT_VIP6: [u8; 16] = [0xfd, 0, 0x02, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x46];
/// The port of the NAT46/64 VIPs' TCP and UDP listeners.
const XLAT_PORT: u16 = 80;
const VIP6: [u8; 16] = [0xfd, 0, 0x02, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10];
/// The VIPs whose services keep the client's source (`preserve_source`), with
/// [`KEEP_LISTENERS`] toward `backend_addrs` of their family. (Not a VIP6 address
/// `elsewhere` draws: those have bit 5 of the last byte set.)
const KEEP_VIP4: [u8; 4] = [203, 0, 113, 20];
const KEEP_VIP6: [u8; 16] = [0xfd, 0, 0x02, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x0f];
/// Listeners of the VIPs that keep sources: (port, protocol number).
const KEEP_LISTENERS: [(u16, u8); 2] = [(80, TCP), (53, UDP)];
const SNAT4: [u8; 4] = fibnet::SNAT4;
const SNAT6: [u8; 16] = [0xfd, 0, 0, 0x18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xfe];
const CLIENTS4: [[u8; 4]; 2] = [[198, 18, 0, 1], [198, 18, 0, 2]];
const CLIENT6: [u8; 16] = [0xfd, 0, 0, 0x18, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const BACKEND_PORT: u16 = 8080;
const SNAT_PORTS: (u16, u16) = (20000, 29999);
/// Client ports are drawn from this many values, so flows come back and the tables never
/// fill (nothing is evicted or expires during a run: every flow seen stays in the model).
const CLIENT_PORTS: u16 = 2048;
/// Both sides' MTU (the namespace's interfaces keep the default).
const MTU: usize = 1500;
/// Listeners: (VIP is v6, port, protocol number).
const LISTENERS: [(bool, u16, u8); 5] = [
    (false, 80, TCP),
    (false, 53, UDP),
    (false, 2905, SCTP),
    (true, 443, TCP),
    (true, 53, UDP),
];
const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;
const ICMP4: u8 = 1;
const ICMP6: u8 = 58;

fn backend4(i: usize) -> [u8; 4] {
    [198, 18, 1, i as u8 + 1]
}
fn backend6(i: usize) -> [u8; 16] {
    let mut a = SNAT6;
    a[15] = i as u8 + 1;
    a
}
fn backend_addrs(v6: bool) -> Vec<IpAddr> {
    (0..3)
        .map(|i| {
            if v6 {
                IpAddr::V6(Ipv6Addr::from(backend6(i)))
            } else {
                IpAddr::V4(Ipv4Addr::from(backend4(i)))
            }
        })
        .collect()
}
fn backend_mac(a: IpAddr) -> Option<[u8; 6]> {
    let last = match a {
        IpAddr::V4(a) => a.octets()[3],
        IpAddr::V6(a) => a.octets()[15],
    };
    backend_addrs(a.is_ipv6())
        .contains(&a)
        .then(|| fibnet::backend_mac(last))
}
fn vip(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(VIP6))
    } else {
        IpAddr::V4(Ipv4Addr::from(VIP4))
    }
}
/// The NAT46 (IPv4, backends `backend_addrs(true)`) or NAT64 (IPv6, backends
/// `backend_addrs(false)`) VIP: TCP and UDP on [`XLAT_PORT`].
fn xlat_vip(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(XLAT_VIP6))
    } else {
        IpAddr::V4(Ipv4Addr::from(XLAT_VIP4))
    }
}
fn keep_vip(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(KEEP_VIP6))
    } else {
        IpAddr::V4(Ipv4Addr::from(KEEP_VIP4))
    }
}
/// A router on the client side, IPv6.
fn ip6_router() -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&[0xfd, 0, 0, 0x18]);
    o[15] = 0x77;
    o
}
/// The IPv6 address embedding `a` in 64:ff9b::/96 (RFC 6052), the program's default prefix.
fn embed(a: [u8; 4]) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[..4].copy_from_slice(&[0, 0x64, 0xff, 0x9b]);
    o[12..].copy_from_slice(&a);
    o
}
fn snat(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(SNAT6))
    } else {
        IpAddr::V4(Ipv4Addr::from(SNAT4))
    }
}
fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

// ---------- a small deterministic random source ----------

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // SplitMix64.
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.below(from.len())]
    }
}

// ---------- checksums (computed from scratch) ----------

fn ones_sum(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        acc += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// Whether `data` (with its checksum field in place) sums to all ones.
fn sums_to_ones(data: &[u8], acc: u64) -> bool {
    fold(ones_sum(data, acc)) == 0xffff
}

/// The pseudo-header sum of an L4 segment.
fn pseudo(src: &[u8], dst: &[u8], proto: u8, len: usize) -> u64 {
    let mut acc = ones_sum(src, 0);
    acc = ones_sum(dst, acc);
    acc + u64::from(proto) + len as u64
}

fn fix_ipv4_checksum(p: &mut [u8], l3: usize) {
    let ihl = usize::from(p[l3] & 0xf) * 4;
    p[l3 + 10..l3 + 12].copy_from_slice(&[0, 0]);
    let c = !fold(ones_sum(&p[l3..l3 + ihl], 0));
    p[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
}

// ---------- the checker's own parser ----------

/// An IP packet as the checker reads it: offsets from the frame start.
#[derive(Clone, Debug)]
struct Ip {
    l3: usize,
    v6: bool,
    l4: usize,
    ip_end: usize,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    df: bool,
    /// A fragment: its identification, and whether it is a later one (offset non-zero: no
    /// transport header, `l4` is where its payload starts).
    frag: Option<(u32, bool)>,
}

/// Offsets the program never reads past.
const WINDOW: usize = 512;

/// Parses a frame the way the policy in docs/xdp.md reads one. `None`: the program must pass
/// it untouched, whatever it is addressed to (not IP; truncated; a length that disagrees
/// with the frame; a routing header with segments left; headers past the window; an IPv6
/// jumbogram). Fragments parse, with [`Ip::frag`] set.
fn parse(p: &[u8]) -> Option<Ip> {
    if p.len() < 14 {
        return None;
    }
    let mut l3 = 14;
    let mut et = u16::from_be_bytes([p[12], p[13]]);
    for _ in 0..2 {
        if et == 0x8100 || et == 0x88a8 {
            if p.len() < l3 + 4 {
                return None;
            }
            et = u16::from_be_bytes([p[l3 + 2], p[l3 + 3]]);
            l3 += 4;
        }
    }
    match et {
        0x0800 => {
            if p.len() < l3 + 20 || p[l3] >> 4 != 4 {
                return None;
            }
            let ihl = usize::from(p[l3] & 0xf) * 4;
            let tot = usize::from(u16::from_be_bytes([p[l3 + 2], p[l3 + 3]]));
            if ihl < 20 || tot < ihl || l3 + tot > p.len() {
                return None;
            }
            let frag = u16::from_be_bytes([p[l3 + 6], p[l3 + 7]]);
            let id = u32::from(u16::from_be_bytes([p[l3 + 4], p[l3 + 5]]));
            Some(Ip {
                l3,
                v6: false,
                l4: l3 + ihl,
                ip_end: l3 + tot,
                proto: p[l3 + 9],
                src: IpAddr::V4(Ipv4Addr::new(
                    p[l3 + 12],
                    p[l3 + 13],
                    p[l3 + 14],
                    p[l3 + 15],
                )),
                dst: IpAddr::V4(Ipv4Addr::new(
                    p[l3 + 16],
                    p[l3 + 17],
                    p[l3 + 18],
                    p[l3 + 19],
                )),
                ttl: p[l3 + 8],
                df: frag & 0x4000 != 0,
                frag: (frag & 0x3fff != 0).then_some((id, frag & 0x1fff != 0)),
            })
        }
        0x86dd => {
            if p.len() < l3 + 40 || p[l3] >> 4 != 6 {
                return None;
            }
            let plen = usize::from(u16::from_be_bytes([p[l3 + 4], p[l3 + 5]]));
            if plen == 0 || l3 + 40 + plen > p.len() {
                return None;
            }
            let mut next = p[l3 + 6];
            let mut off = l3 + 40;
            let mut walked = 0;
            let mut frag = None;
            while matches!(next, 0 | 43 | 60 | 44) && !frag.is_some_and(|(_, later)| later) {
                if walked == 4 {
                    return None;
                }
                walked += 1;
                if next == 44 {
                    if off + 8 > WINDOW || off + 8 > p.len() {
                        return None;
                    }
                    let offset_and_m = u16::from_be_bytes([p[off + 2], p[off + 3]]);
                    if offset_and_m & 0xfff9 != 0 {
                        let id =
                            u32::from_be_bytes([p[off + 4], p[off + 5], p[off + 6], p[off + 7]]);
                        frag = Some((id, offset_and_m & 0xfff8 != 0));
                    }
                    next = p[off];
                    off += 8;
                } else {
                    if off + 4 > WINDOW || off + 4 > p.len() {
                        return None;
                    }
                    if next == 43 && p[off + 3] != 0 {
                        return None;
                    }
                    next = p[off];
                    off += (usize::from(p[off + 1]) + 1) * 8;
                }
            }
            let a =
                |o: usize| IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&p[o..o + 16]).unwrap()));
            Some(Ip {
                l3,
                v6: true,
                l4: off,
                ip_end: l3 + 40 + plen,
                proto: next,
                src: a(l3 + 8),
                dst: a(l3 + 24),
                ttl: p[l3 + 7],
                df: true,
                frag,
            })
        }
        _ => None,
    }
}

/// Whether the transport header is whole (within the frame, the window and the IP packet)
/// and its lengths agree. `false`: passed untouched.
fn l4_ok(p: &[u8], ip: &Ip) -> bool {
    let need = match ip.proto {
        TCP => 20,
        // SCTP: the common header and the first chunk's header.
        SCTP => 16,
        UDP | ICMP4 | ICMP6 => 8,
        _ => return false,
    };
    if ip.l4 + need > WINDOW || ip.l4 + need > p.len() || ip.l4 + need > ip.ip_end {
        return false;
    }
    match ip.proto {
        TCP => {
            let doff = usize::from(p[ip.l4 + 12] >> 4) * 4;
            doff >= 20 && ip.l4 + doff <= ip.ip_end
        }
        // A first fragment's UDP length is the whole datagram's: not checked.
        UDP if ip.frag.is_some() => true,
        UDP => {
            let ulen = usize::from(u16::from_be_bytes([p[ip.l4 + 4], p[ip.l4 + 5]]));
            ulen >= 8 && ip.l4 + ulen <= ip.ip_end
        }
        _ => true,
    }
}

fn ipv4_header_ok(p: &[u8], ip: &Ip) -> bool {
    ip.v6 || sums_to_ones(&p[ip.l3..ip.l4], 0)
}

/// The L4 checksum's state: `None` for IPv4 UDP without one, else whether it is right.
fn l4_checksum_ok(p: &[u8], ip: &Ip) -> Option<bool> {
    if ip.proto == SCTP {
        return Some(sctp::crc_ok(&p[ip.l4..ip.ip_end]));
    }
    let (src, dst) = (octets(ip.src), octets(ip.dst));
    let end = if ip.proto == UDP {
        (ip.l4 + usize::from(u16::from_be_bytes([p[ip.l4 + 4], p[ip.l4 + 5]]))).min(ip.ip_end)
    } else {
        ip.ip_end
    };
    if ip.proto == UDP && !ip.v6 && p[ip.l4 + 6] == 0 && p[ip.l4 + 7] == 0 {
        return None;
    }
    let acc = pseudo(&src, &dst, ip.proto, end - ip.l4);
    Some(sums_to_ones(&p[ip.l4..end], acc))
}

fn ports(p: &[u8], ip: &Ip) -> (u16, u16) {
    (
        u16::from_be_bytes([p[ip.l4], p[ip.l4 + 1]]),
        u16::from_be_bytes([p[ip.l4 + 2], p[ip.l4 + 3]]),
    )
}

/// TCP flags; for SCTP, the ones its first chunk stands for (INIT: SYN; ABORT, SHUTDOWN
/// COMPLETE: RST; any other: ACK).
fn tcp_flags(p: &[u8], ip: &Ip) -> u8 {
    match ip.proto {
        TCP => p[ip.l4 + 13],
        SCTP => match p[ip.l4 + 12] {
            1 => 0x02,
            6 | 14 => 0x04,
            _ => 0x10,
        },
        _ => 0,
    }
}

// ---------- the model of the flows seen ----------

/// A client's flow: (client, client port, VIP, VIP port, protocol).
type Tuple = (IpAddr, u16, IpAddr, u16, u8);

/// A fragmented datagram: (source, destination, protocol, identification).
type FragKey = (IpAddr, IpAddr, u8, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    backend: IpAddr,
    snat_port: u16,
}

#[derive(Default)]
struct Model {
    /// Client flow → where it went (ordered: a seed replays the same choices).
    forward: BTreeMap<Tuple, Mapping>,
    /// (backend, SNAT port, protocol) → the flow it belongs to (its reverse-NAT entry).
    reverse: BTreeMap<(IpAddr, u16, u8), Tuple>,
    /// Flows that saw FIN or RST.
    closing: HashMap<Tuple, bool>,
    /// Closed flows a fresh SYN re-opened: they may come back with another port, and until
    /// one of their packets shows which, the model does not know it.
    may_move: HashMap<Tuple, bool>,
    /// First fragments the program must have remembered: (source, destination, protocol,
    /// identification) → their ports, and when.
    frags: BTreeMap<FragKey, ((u16, u16), Instant)>,
    /// Fragments of a datagram still to send (the last one first).
    pending: Vec<Case>,
    /// Counts by what happened, for the summary.
    outcomes: HashMap<&'static str, u64>,
    /// Flows to a VIP that keeps sources → their backend.
    kept: BTreeMap<Tuple, IpAddr>,
    /// (backend, client, client port, protocol) → the flow kept to that backend: what the
    /// backend's reply to the client is translated for.
    kept_replies: BTreeMap<(IpAddr, IpAddr, u16, u8), Tuple>,
    /// Clients (address, port, protocol) of NAT46/64 flows whose packet was passed
    /// untranslated (IPv4 options, extension headers...): the program reserved a SNAT port
    /// for the flow before refusing the translation, so a reply to a port the model does
    /// not know may be translated back to one of them.
    xlat_refused: BTreeSet<(IpAddr, u16, u8)>,
}

impl Model {
    fn count(&mut self, what: &'static str) {
        *self.outcomes.entry(what).or_default() += 1;
    }

    /// Whether the port `snat_port` toward `backend`, last seen held by `t`, was released
    /// by it since (its flow moved to another port): the program may have given it to a
    /// flow the model never saw forwarded (one answered with ICMP too-big), so a reply to
    /// it may go to that flow.
    fn stale(&self, t: Tuple, backend: IpAddr, snat_port: u16) -> bool {
        self.forward.get(&t) != Some(&Mapping { backend, snat_port })
            || self.may_move.contains_key(&t)
    }

    /// What a client → VIP packet does to its flow's state before anything else happens to
    /// it (TTL, size): FIN or RST closes a tracked flow; a fresh SYN on a closed one starts
    /// it afresh (it may then get another port).
    fn note(&mut self, t: Tuple, flags: u8, ttl: u8) {
        let fresh_syn = flags & 0x12 == 0x02;
        if !self.forward.contains_key(&t) {
            return;
        }
        let closing = self.closing.get(&t).copied().unwrap_or(false);
        if fresh_syn && closing {
            if ttl > 1 {
                self.may_move.insert(t, true);
                self.closing.insert(t, flags & 0x05 != 0);
            }
        } else if flags & 0x05 != 0 {
            self.closing.insert(t, true);
        }
    }

    /// Records that `t` went to `m`; fails if that moves a live flow or shares a port.
    fn learn(&mut self, t: Tuple, m: Mapping, flags: u8) -> Result<(), String> {
        let known = self.forward.get(&t).copied();
        let may_move = self.may_move.remove(&t).is_some();
        if let Some(old) = known {
            if old != m && !may_move {
                return Err(format!("flow {t:?} moved from {old:?} to {m:?}"));
            }
        } else {
            self.closing.insert(t, flags & 0x05 != 0);
        }
        if let Some(owner) = self.reverse.get(&(m.backend, m.snat_port, t.4)) {
            if *owner != t && self.forward.get(owner) == Some(&m) {
                return Err(format!(
                    "flow {t:?} got {m:?}, which live flow {owner:?} holds"
                ));
            }
        }
        self.forward.insert(t, m);
        self.reverse.insert((m.backend, m.snat_port, t.4), t);
        Ok(())
    }
}

// ---------- packet construction ----------

fn l4_build(
    b: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = Vec::new();
    match proto {
        TCP => {
            let mut t = b.tcp(sport, dport, 1000, 64240);
            if flags & 0x02 != 0 {
                t = t.syn();
            }
            if flags & 0x10 != 0 {
                t = t.ack(7);
            }
            if flags & 0x01 != 0 {
                t = t.fin();
            }
            if flags & 0x04 != 0 {
                t = t.rst();
            }
            if flags & 0x08 != 0 {
                t = t.psh();
            }
            t.write(&mut out, payload).unwrap();
        }
        UDP => b.udp(sport, dport).write(&mut out, payload).unwrap(),
        SCTP => {
            // Common header, one chunk of the type the flags stand for (INIT for a SYN,
            // ABORT for an RST, SHUTDOWN COMPLETE for a FIN, else DATA) with the payload,
            // and a right CRC32c (mutations may break it).
            let ty = if flags & 0x04 != 0 {
                6
            } else if flags & 0x12 == 0x02 {
                1
            } else if flags & 0x01 != 0 {
                14
            } else {
                0
            };
            let mut sctp = Vec::new();
            sctp.extend_from_slice(&sport.to_be_bytes());
            sctp.extend_from_slice(&dport.to_be_bytes());
            sctp.extend_from_slice(&[0x5c, 0x7a, 0x90, 0x01, 0, 0, 0, 0]);
            sctp.extend_from_slice(&[ty, 0]);
            sctp.extend_from_slice(&((4 + payload.len()) as u16).to_be_bytes());
            sctp.extend_from_slice(payload);
            while sctp.len() % 4 != 0 {
                sctp.push(0);
            }
            let crc = crc32c(&sctp);
            sctp[8..12].copy_from_slice(&crc.to_le_bytes());
            b.write(&mut out, IpNumber(proto), &sctp).unwrap();
        }
        _ => {
            // SCTP common header (ports, tag, CRC32c left zero) and the payload.
            let mut sctp = Vec::new();
            sctp.extend_from_slice(&sport.to_be_bytes());
            sctp.extend_from_slice(&dport.to_be_bytes());
            sctp.extend_from_slice(&[0; 8]);
            sctp.extend_from_slice(payload);
            b.write(&mut out, IpNumber(proto), &sctp).unwrap();
        }
    }
    out
}

fn ip_builder(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(smac, dmac);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), ttl),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), ttl),
        _ => unreachable!(),
    }
}

#[allow(clippy::too_many_arguments, reason = "one argument per header field")]
fn packet(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    proto: u8,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    l4_build(
        ip_builder(smac, dmac, src, dst, ttl),
        proto,
        sport,
        dport,
        flags,
        payload,
    )
}

#[allow(clippy::too_many_arguments, reason = "one argument per header field")]
fn icmp_packet(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    ttl: u8,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let b = ip_builder(smac, dmac, src, dst, ttl);
    let mut out = Vec::new();
    if src.is_ipv6() {
        b.icmpv6_raw(ty, code, rest)
            .write(&mut out, payload)
            .unwrap();
    } else {
        b.icmpv4_raw(ty, code, rest)
            .write(&mut out, payload)
            .unwrap();
    }
    out
}

/// Inserts VLAN tags after the MAC addresses.
fn with_vlans(p: &[u8], tags: &[u16]) -> Vec<u8> {
    let mut out = p[..12].to_vec();
    for (i, tag) in tags.iter().enumerate() {
        out.extend_from_slice(if i == 0 && tags.len() == 2 {
            &[0x88, 0xa8]
        } else {
            &[0x81, 0x00]
        });
        out.extend_from_slice(&tag.to_be_bytes());
    }
    out.extend_from_slice(&p[12..]);
    out
}

/// Inserts IPv4 options (a multiple of 4 bytes, NOPs) in an untagged frame; fixes lengths
/// and the header checksum.
fn with_ipv4_options(p: &[u8], words: usize) -> Vec<u8> {
    let mut out = p[..34].to_vec();
    out.extend(std::iter::repeat_n(1u8, words * 4));
    out.extend_from_slice(&p[34..]);
    out[14] = 0x40 | (5 + words) as u8;
    let tot = u16::from_be_bytes([out[16], out[17]]) + (words * 4) as u16;
    out[16..18].copy_from_slice(&tot.to_be_bytes());
    fix_ipv4_checksum(&mut out, 14);
    out
}

/// Inserts IPv6 extension headers (type, bytes) in an untagged frame.
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

/// A random IPv6 extension header: hop-by-hop or destination options (PadN), routing
/// (segments left sometimes non-zero), or fragment (sometimes a real one).
fn random_ext(rng: &mut Rng) -> (u8, Vec<u8>) {
    match rng.below(4) {
        0 | 1 => {
            let len8 = if rng.chance(5) {
                50 + rng.below(10)
            } else {
                rng.below(3)
            };
            let total = (len8 + 1) * 8;
            let mut b = vec![0u8; total];
            b[1] = len8 as u8;
            b[2] = 1;
            b[3] = (total - 4) as u8;
            (if rng.chance(50) { 0 } else { 60 }, b)
        }
        2 => {
            let mut b = vec![0, 2, 4, if rng.chance(30) { 1 } else { 0 }, 0, 0, 0, 0];
            b.extend_from_slice(&rng.bytes(16));
            (43, b)
        }
        _ => {
            let mut b = vec![0, 0, 0, 0, 0, 0, 0, 1];
            if rng.chance(30) {
                b[3] = rng.pick(&[1u8, 8, 9]);
            }
            (44, b)
        }
    }
}

// ---------- the generator ----------

struct Case {
    input: Vec<u8>,
    ingress: &'static str,
}

fn client_tuple(rng: &mut Rng, v6: bool) -> (IpAddr, u16) {
    let client = if v6 {
        IpAddr::V6(Ipv6Addr::from(CLIENT6))
    } else {
        IpAddr::V4(Ipv4Addr::from(rng.pick(&CLIENTS4)))
    };
    (client, 1024 + rng.below(usize::from(CLIENT_PORTS)) as u16)
}

fn payload(rng: &mut Rng) -> Vec<u8> {
    let n = match rng.below(10) {
        0 => 1400 + rng.below(250),
        1 => rng.below(600),
        _ => rng.below(40),
    };
    rng.bytes(n)
}

/// Client → VIP (or to another port/address of the VIP). Packets too big for the backend
/// side only for flows the model knows: a new flow answered with ICMP too-big is tracked
/// without the checker seeing where it went.
fn to_vip(rng: &mut Rng, model: &Model) -> Case {
    if rng.chance(15) {
        return to_xlat_vip(rng);
    }
    let (v6, port, proto) = if rng.chance(90) {
        rng.pick(&LISTENERS)
    } else {
        (
            rng.chance(50),
            rng.below(100) as u16,
            rng.pick(&[TCP, UDP, SCTP]),
        )
    };
    let (client, cport) = client_tuple(rng, v6);
    let flags = if rng.chance(60) {
        rng.pick(&[0x02u8, 0x10, 0x18, 0x11, 0x14, 0x04, 0x12])
    } else {
        rng.next() as u8
    };
    let ttl = if rng.chance(3) {
        rng.below(3) as u8
    } else {
        64
    };
    let mut body = payload(rng);
    let known = model
        .forward
        .contains_key(&(client, cport, vip(v6), port, proto));
    if body.len() > 1000 && (!known || flags & 0x02 != 0) {
        body.truncate(100);
    }
    let input = packet(
        CLIENT_MAC,
        LB0_MAC,
        client,
        vip(v6),
        ttl,
        proto,
        cport,
        port,
        flags,
        &body,
    );
    Case {
        input,
        ingress: "eth0",
    }
}

/// Client → a NAT46/64 VIP: TCP or UDP, sometimes another port or protocol, a TOS.
fn to_xlat_vip(rng: &mut Rng) -> Case {
    let v6 = rng.chance(50);
    let (mut client, cport) = client_tuple(rng, v6);
    // Now and then a client on the client subnet the node has no neighbour entry for: the
    // replies to it are translated and left to the stack to resolve.
    if rng.chance(5) {
        client = if v6 {
            IpAddr::V6(Ipv6Addr::from({
                let mut a = CLIENT6;
                a[15] = 0x60;
                a
            }))
        } else {
            IpAddr::V4(Ipv4Addr::new(198, 18, 0, 60))
        };
    }
    let proto = rng.pick(&[TCP, UDP, TCP, UDP, SCTP]);
    let port = if rng.chance(90) { XLAT_PORT } else { 81 };
    let flags = rng.pick(&[0x02u8, 0x10, 0x18, 0x11, 0x04]);
    let ttl = if rng.chance(3) { 1 } else { 64 };
    let mut body = payload(rng);
    body.truncate(900);
    let mut input = packet(
        CLIENT_MAC,
        LB0_MAC,
        client,
        xlat_vip(v6),
        ttl,
        proto,
        cport,
        port,
        flags,
        &body,
    );
    let tos = rng.next() as u8;
    if v6 {
        input[14] = 0x60 | tos >> 4;
        input[15] = (tos << 4) | (input[15] & 0x0f);
    } else {
        input[15] = tos;
        fix_ipv4_checksum(&mut input, 14);
    }
    Case {
        input,
        ingress: "eth0",
    }
}

/// Backend → SNAT address and port, of a flow the model knows (or a random port).
fn reply(rng: &mut Rng, model: &Model) -> Case {
    let known: Vec<_> = model.reverse.keys().copied().collect();
    let (backend, sport, proto) = if !known.is_empty() && rng.chance(85) {
        known[rng.below(known.len())]
    } else {
        let v6 = rng.chance(50);
        // A port the program never hands out: no reply can be its.
        (
            backend_addrs(v6)[rng.below(3)],
            SNAT_PORTS.1 + 1 + rng.below(100) as u16,
            rng.pick(&[TCP, UDP, SCTP]),
        )
    };
    let flags = rng.pick(&[0x12u8, 0x10, 0x18, 0x11, 0x04]);
    let input = packet(
        backend_mac(backend).unwrap(),
        LB1_MAC,
        backend,
        snat(backend.is_ipv6()),
        64,
        proto,
        BACKEND_PORT,
        sport,
        flags,
        &payload(rng),
    );
    Case {
        input,
        ingress: "eth1",
    }
}

/// Client → a VIP that keeps sources, or a backend's packet to a client: the reply of a
/// flow the model kept, or (a port no client uses) no reply at all. Not mutated.
fn kept(rng: &mut Rng, model: &Model) -> Case {
    if !model.kept.is_empty() && rng.chance(20) {
        return kept_icmp_error(rng, model);
    }
    let flags = rng.pick(&[0x02u8, 0x10, 0x18, 0x11, 0x04, 0x12]);
    if rng.chance(50) {
        let known: Vec<_> = model.kept_replies.keys().copied().collect();
        let (backend, client, cport, proto) = if !known.is_empty() && rng.chance(90) {
            known[rng.below(known.len())]
        } else {
            let v6 = rng.chance(50);
            let (client, _) = client_tuple(rng, v6);
            (
                backend_addrs(v6)[rng.below(3)],
                client,
                60000 + rng.below(1000) as u16,
                rng.pick(&[TCP, UDP]),
            )
        };
        let input = packet(
            backend_mac(backend).unwrap(),
            LB1_MAC,
            backend,
            client,
            64,
            proto,
            BACKEND_PORT,
            cport,
            flags,
            &payload(rng),
        );
        return Case {
            input,
            ingress: "eth1",
        };
    }
    let v6 = rng.chance(50);
    let (port, proto) = rng.pick(&KEEP_LISTENERS);
    let (client, cport) = client_tuple(rng, v6);
    let mut body = payload(rng);
    let known = model
        .kept
        .contains_key(&(client, cport, keep_vip(v6), port, proto));
    if body.len() > 1000 && (!known || flags & 0x02 != 0) {
        body.truncate(100);
    }
    let input = packet(
        CLIENT_MAC,
        LB0_MAC,
        client,
        keep_vip(v6),
        64,
        proto,
        cport,
        port,
        flags,
        &body,
    );
    Case {
        input,
        ingress: "eth0",
    }
}

/// An ICMP error about a flow that kept its client's source: from its backend (or a router
/// on its side, or claiming the client's address) to the client, quoting what the backend
/// received; or from the client to the VIP, quoting a reply.
fn kept_icmp_error(rng: &mut Rng, model: &Model) -> Case {
    let flows: Vec<_> = model.kept.iter().map(|(t, b)| (*t, *b)).collect();
    let ((client, cport, vipa, vport, proto), backend) = flows[rng.below(flows.len())];
    let v6 = client.is_ipv6();
    let (ty, code, rest) = if v6 {
        rng.pick(&[(1u8, 4u8, [0u8; 4]), (2, 0, [0, 0, 5, 0]), (3, 0, [0; 4])])
    } else {
        rng.pick(&[(3u8, 3u8, [0u8; 4]), (3, 4, [0, 0, 5, 0]), (11, 0, [0; 4])])
    };
    let n = rng.below(32);
    let body = rng.bytes(n);
    let ip_len = if v6 { 40 } else { 20 };
    let (smac, dmac, from, to, q, ingress) = if rng.chance(60) {
        let q = packet(
            LB1_MAC,
            backend_mac(backend).unwrap(),
            client,
            backend,
            63,
            proto,
            cport,
            BACKEND_PORT,
            0x10,
            &body,
        );
        let from = match rng.below(3) {
            0 => backend,
            1 => client,
            _ => backend_addrs(v6)[rng.below(3)],
        };
        (
            backend_mac(backend).unwrap(),
            LB1_MAC,
            from,
            client,
            q,
            "eth1",
        )
    } else {
        let q = packet(
            LB0_MAC, CLIENT_MAC, vipa, client, 63, proto, vport, cport, 0x10, &body,
        );
        (CLIENT_MAC, LB0_MAC, client, vipa, q, "eth0")
    };
    let q = q[14..].to_vec();
    let n = match rng.below(3) {
        0 => q.len(),
        1 => ip_len + 8,
        _ => ip_len + rng.below(q.len() - ip_len + 1),
    };
    let input = icmp_packet(smac, dmac, from, to, 64, ty, code, rest, &q[..n]);
    Case { input, ingress }
}

/// An echo request to a VIP (or elsewhere).
fn echo(rng: &mut Rng) -> Case {
    let v6 = rng.chance(50);
    let (client, _) = client_tuple(rng, v6);
    let to = if rng.chance(80) { vip(v6) } else { snat(v6) };
    let ty = if v6 { 128 } else { 8 };
    let input = icmp_packet(
        CLIENT_MAC,
        LB0_MAC,
        client,
        to,
        64,
        ty,
        0,
        [0, 1, 0, rng.next() as u8],
        &{
            let n = rng.below(64);
            rng.bytes(n)
        },
    );
    Case {
        input,
        ingress: "eth0",
    }
}

/// An ICMP error quoting a known flow: from the backend side about a packet the node sent,
/// or from the client side about a reply.
fn icmp_error(rng: &mut Rng, model: &Model) -> Case {
    let flows: Vec<_> = model.forward.iter().map(|(t, m)| (*t, *m)).collect();
    let Some(&((client, cport, vipa, vport, proto), m)) = flows.get(rng.below(flows.len().max(1)))
    else {
        return to_vip(rng, model);
    };
    // A NAT46/64 flow's errors are in the family of the side that sends them: the
    // backend's, or the client's.
    let xlat = client.is_ipv6() != m.backend.is_ipv6();
    let backend_side = rng.chance(60);
    let v6 = if xlat && backend_side {
        m.backend.is_ipv6()
    } else {
        client.is_ipv6()
    };
    let (ty, code, rest) = match (v6, xlat) {
        (true, false) => rng.pick(&[
            (1u8, 4u8, [0u8; 4]),
            (2, 0, [0, 0, 5, 0]),
            (3, 0, [0; 4]),
            (4, 0, [0, 0, 0, 7]),
        ]),
        (false, false) => rng.pick(&[
            (3u8, 3u8, [0u8; 4]),
            (3, 4, [0, 0, 5, 0]),
            (11, 0, [0; 4]),
            (3, 1, [0; 4]),
            (12, 0, [8, 0, 0, 0]),
        ]),
        // Every code RFC 7915 maps, and some it drops.
        (true, true) => {
            let (code, mtu) = (rng.below(7) as u8, 1280 + rng.below(8000) as u32);
            let pointer = rng.below(48) as u8;
            rng.pick(&[
                (1u8, code, [0u8; 4]),
                (2, 0, mtu.to_be_bytes()),
                (2, 0, [0xff, 0xff, 0xff, 0xff]),
                (3, code % 3, [0; 4]),
                (4, 0, [0, 0, 0, 8]),
                (4, code % 3, [0, 0, 0, pointer]),
            ])
        }
        (false, true) => {
            let (code, pointer) = (rng.below(16) as u8, rng.below(24) as u8);
            rng.pick(&[
                (3u8, code, [0u8; 4]),
                (3, 4, [0, 0, 5, 0]),
                (3, 4, [0; 4]),
                (11, code % 3, [0; 4]),
                (12, 0, [8, 0, 0, 0]),
                (12, code % 3, [pointer, 0, 0, 0]),
            ])
        }
    };
    let n = rng.below(32);
    let body = rng.bytes(n);
    let quote_len = |q: &[u8], rng: &mut Rng| -> usize {
        match rng.below(4) {
            0 => q.len(),
            1 => (if v6 { 40 } else { 20 }) + 8,
            _ => (if v6 { 40 } else { 20 }) + rng.below(q.len() - if v6 { 40 } else { 20 } + 1),
        }
    };
    let (input, ingress) = if backend_side {
        // The backend (or a router on its side) about SNAT → backend.
        let q = packet(
            LB1_MAC,
            backend_mac(m.backend).unwrap(),
            snat(v6),
            m.backend,
            63,
            proto,
            m.snat_port,
            BACKEND_PORT,
            0x10,
            &body,
        );
        let q = q[14..].to_vec();
        let n = quote_len(&q, rng).min(q.len());
        let from = match rng.below(if xlat { 4 } else { 3 }) {
            0 => m.backend,
            1 if !xlat => client,
            // A router's IPv4 address in the RFC 6052 prefix.
            3 if v6 => IpAddr::V6(Ipv6Addr::from(embed(backend4(7)))),
            _ => {
                if v6 {
                    IpAddr::V6(Ipv6Addr::from(backend6(7)))
                } else {
                    IpAddr::V4(Ipv4Addr::from(backend4(7)))
                }
            }
        };
        (
            icmp_packet(
                backend_mac(m.backend).unwrap(),
                LB1_MAC,
                from,
                snat(v6),
                64,
                ty,
                code,
                rest,
                &q[..n],
            ),
            "eth1",
        )
    } else {
        // The client about VIP → client.
        let q = packet(
            LB0_MAC, CLIENT_MAC, vipa, client, 63, proto, vport, cport, 0x10, &body,
        );
        let q = q[14..].to_vec();
        let n = quote_len(&q, rng).min(q.len());
        // A NAT46/64 flow's: the client's own, or a router's (an IPv6 one may embed an IPv4
        // address in the prefix).
        let from = match rng.below(if xlat { 4 } else { 1 }) {
            0 | 1 => client,
            2 if v6 => IpAddr::V6(Ipv6Addr::from(embed([198, 18, 0, 77]))),
            _ if v6 => IpAddr::V6(Ipv6Addr::from(ip6_router())),
            _ => IpAddr::V4(Ipv4Addr::new(198, 18, 0, 77)),
        };
        (
            icmp_packet(CLIENT_MAC, LB0_MAC, from, vipa, 64, ty, code, rest, &q[..n]),
            "eth0",
        )
    };
    Case { input, ingress }
}

/// Traffic that is none of the balancer's business.
fn elsewhere(rng: &mut Rng) -> Case {
    let v6 = rng.chance(50);
    let (client, cport) = client_tuple(rng, v6);
    let dst = if v6 {
        IpAddr::V6(Ipv6Addr::from({
            let mut a = VIP6;
            a[15] = rng.next() as u8 | 0x20;
            a
        }))
    } else {
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, 200 + rng.below(50) as u8))
    };
    let proto = rng.pick(&[TCP, UDP, SCTP, 47]);
    let input = packet(
        CLIENT_MAC,
        LB0_MAC,
        client,
        dst,
        64,
        proto,
        cport,
        rng.next() as u16,
        0x10,
        &payload(rng),
    );
    Case {
        input,
        ingress: "eth0",
    }
}

fn random_bytes(rng: &mut Rng) -> Case {
    let max = if rng.chance(80) { 120 } else { 1600 };
    let n = rng.below(max);
    let mut input = rng.bytes(n);
    if rng.chance(70) && input.len() >= 14 {
        input[12..14].copy_from_slice(&rng.pick(&[[0x08u8, 0x00], [0x86, 0xdd], [0x81, 0x00]]));
        if input.len() > 14 && rng.chance(50) {
            input[14] = rng.pick(&[0x45u8, 0x46, 0x60]);
        }
    }
    Case {
        input,
        ingress: rng.pick(&["eth0", "eth1"]),
    }
}

/// Structured changes: options and extension headers, tags, lengths, flags, bytes.
fn mutate(rng: &mut Rng, case: &mut Case) {
    let p = &mut case.input;
    let v6 = p.len() > 13 && p[12..14] == [0x86, 0xdd];
    let v4 = p.len() > 13 && p[12..14] == [0x08, 0x00];
    if v4 && rng.chance(15) && p.len() >= 34 {
        *p = with_ipv4_options(p, 1 + rng.below(10));
    }
    if v6 && rng.chance(25) && p.len() >= 54 {
        let exts: Vec<_> = (0..1 + rng.below(5)).map(|_| random_ext(rng)).collect();
        *p = with_ipv6_ext(p, &exts);
    }
    let l3 = 14;
    let changes = rng.below(3);
    for _ in 0..changes {
        // The changes below read and write the first IP header's fields.
        if p.len() < l3 + 40 {
            break;
        }
        match rng.below(9) {
            0 => {
                // A byte anywhere in the first 96.
                let i = rng.below(p.len().min(96));
                p[i] ^= 1 << rng.below(8);
            }
            1 if v4 => {
                let tot = u16::from_be_bytes([p[16], p[17]]);
                let new = match rng.below(3) {
                    0 => tot.wrapping_add(rng.below(64) as u16),
                    1 => tot.saturating_sub(rng.below(40) as u16),
                    _ => rng.next() as u16,
                };
                p[16..18].copy_from_slice(&new.to_be_bytes());
            }
            1 if v6 => {
                let plen = u16::from_be_bytes([p[18], p[19]]);
                let new = if rng.chance(20) {
                    0
                } else {
                    plen.wrapping_add(rng.below(80) as u16).wrapping_sub(40)
                };
                p[18..20].copy_from_slice(&new.to_be_bytes());
            }
            2 if v4 => p[14] = 0x40 | rng.below(16) as u8,
            3 if v4 => {
                // Fragments: MF, an offset, or DF flipped.
                p[20] ^= rng.pick(&[0x20u8, 0x40, 0x01]);
            }
            4 => {
                // Somewhere in a transport header: ports, lengths, data offset, flags.
                if let Some(ip) = parse(p) {
                    let i = ip.l4 + rng.below(14);
                    if i < p.len() {
                        p[i] = rng.next() as u8;
                    }
                }
            }
            5 if v4 => p[22] = rng.below(3) as u8,
            5 if v6 => p[21] = rng.below(3) as u8,
            6 => {
                let cut = rng.below(p.len());
                p.truncate(cut);
            }
            7 => {
                let n = 1 + rng.below(30);
                p.extend_from_slice(&rng.bytes(n));
            }
            _ => {}
        }
    }
    // Usually keep the IPv4 header checksum right, to get past it.
    if v4 && p.len() >= 34 && rng.chance(80) {
        let ihl = usize::from(p[14] & 0xf) * 4;
        if ihl >= 20 && p.len() >= 14 + ihl {
            fix_ipv4_checksum(p, 14);
        }
    }
    if rng.chance(8) && p.len() >= 14 {
        let tags: Vec<u16> = (0..1 + rng.below(2))
            .map(|_| rng.below(4094) as u16 + 1)
            .collect();
        *p = with_vlans(p, &tags);
    }
}

/// A datagram to a VIP (or a reply) cut into two to four fragments with a random
/// identification, in a random order: the first to send now, the others after it.
fn fragmented(rng: &mut Rng, model: &Model) -> Vec<Case> {
    let case = if rng.chance(70) {
        to_vip(rng, model)
    } else {
        reply(rng, model)
    };
    let Some(ip) = parse(&case.input) else {
        return vec![case];
    };
    let p = &case.input;
    let hdr_end = if ip.v6 { ip.l3 + 40 } else { ip.l4 };
    let n = ip.ip_end - hdr_end;
    if ip.frag.is_some() || n < 16 || (ip.v6 && ip.l4 != hdr_end) {
        return vec![case];
    }
    let mut cuts: Vec<usize> = (0..1 + rng.below(3))
        .map(|_| 8 * (1 + rng.below((n - 1) / 8)))
        .collect();
    cuts.extend([0, n]);
    cuts.sort_unstable();
    cuts.dedup();
    let id = rng.next() as u32;
    let mut pieces: Vec<Case> = cuts
        .windows(2)
        .map(|w| {
            let (a, b) = (w[0], w[1]);
            let more = b < n;
            let mut f = p[..hdr_end].to_vec();
            if ip.v6 {
                f[ip.l3 + 4..ip.l3 + 6].copy_from_slice(&((8 + b - a) as u16).to_be_bytes());
                f[ip.l3 + 6] = 44;
                f.extend_from_slice(&[ip.proto, 0]);
                f.extend_from_slice(&(a as u16 | u16::from(more)).to_be_bytes());
                f.extend_from_slice(&id.to_be_bytes());
            } else {
                let l3 = ip.l3;
                f[l3 + 2..l3 + 4].copy_from_slice(&((hdr_end - l3 + b - a) as u16).to_be_bytes());
                f[l3 + 4..l3 + 6].copy_from_slice(&(id as u16).to_be_bytes());
                let mf = if more { 0x2000 } else { 0 };
                f[l3 + 6..l3 + 8].copy_from_slice(&(mf | (a / 8) as u16).to_be_bytes());
                fix_ipv4_checksum(&mut f, l3);
            }
            f.extend_from_slice(&p[hdr_end + a..hdr_end + b]);
            Case {
                input: f,
                ingress: case.ingress,
            }
        })
        .collect();
    if rng.chance(50) {
        for i in (1..pieces.len()).rev() {
            pieces.swap(i, rng.below(i + 1));
        }
    }
    for piece in &mut pieces {
        if rng.chance(10) {
            mutate(rng, piece);
        }
    }
    pieces
}

fn generate(rng: &mut Rng, model: &Model) -> Case {
    let mut case = match rng.below(100) {
        0..8 => return random_bytes(rng),
        8..14 => return kept(rng, model),
        14..45 => to_vip(rng, model),
        45..62 => reply(rng, model),
        62..70 => echo(rng),
        70..84 => icmp_error(rng, model),
        _ => elsewhere(rng),
    };
    if rng.chance(40) {
        mutate(rng, &mut case);
    }
    case
}

// ---------- the checker ----------

#[track_caller]
fn unchanged(input: &[u8], out: &TestRunOutput) -> Result<(), String> {
    if out.verdict != verdict::PASS {
        return Err(format!(
            "want XDP_PASS, got {} (checker line {})",
            verdict::name(out.verdict),
            std::panic::Location::caller().line()
        ));
    }
    if out.packet != input {
        return Err("passed, but changed".into());
    }
    Ok(())
}

/// Checks a translated TCP/UDP packet: everything but addresses, ports, TTL and checksums
/// (and MACs) is as it came; the IPv4 header sums right; the L4 checksum is right exactly
/// when it was.
fn translated(
    input: &[u8],
    inp: &Ip,
    out: &[u8],
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
) -> Result<(), String> {
    let Some(o) = parse(out) else {
        return Err("output does not parse".into());
    };
    if out.len() != input.len() || o.l4 != inp.l4 || o.ip_end != inp.ip_end || o.proto != inp.proto
    {
        return Err("output's layout differs".into());
    }
    if (o.src, o.dst) != (src, dst) {
        return Err(format!(
            "addresses {} → {}, want {src} → {dst}",
            o.src, o.dst
        ));
    }
    let later = inp.frag.is_some_and(|(_, later)| later);
    if !later && ports(out, &o) != (sport, dport) {
        return Err(format!(
            "ports {:?}, want ({sport}, {dport})",
            ports(out, &o)
        ));
    }
    if o.ttl != inp.ttl - 1 {
        return Err(format!("TTL {} from {}", o.ttl, inp.ttl));
    }
    if !ipv4_header_ok(out, &o) {
        return Err("IPv4 header checksum".into());
    }
    if later {
        // Only the IP header changes.
        return if out[12..inp.l3] != input[12..inp.l3] || out[inp.l4..] != input[inp.l4..] {
            Err("bytes outside the IP header changed".into())
        } else {
            Ok(())
        };
    }
    if l4_checksum_ok(input, inp) != l4_checksum_ok(out, &o) {
        return Err(format!(
            "L4 checksum: {:?} in, {:?} out",
            l4_checksum_ok(input, inp),
            l4_checksum_ok(out, &o)
        ));
    }
    // Tags, and everything after the checksum field (payload, trailer), as they were.
    let csum_end = inp.l4
        + match inp.proto {
            TCP => 18,
            SCTP => 12,
            _ => 8,
        };
    if out[12..inp.l3] != input[12..inp.l3] || out[csum_end..] != input[csum_end..] {
        return Err("bytes outside the rewritten fields changed".into());
    }
    Ok(())
}

/// The next hop toward an address, as the namespace's routes and permanent neighbours
/// (integration/src/fibnet.rs) make it.
enum Hop {
    /// A neighbour with a known MAC: (destination MAC, source MAC).
    Via([u8; 6], [u8; 6]),
    /// On a connected subnet, no neighbour entry: the stack resolves it.
    NoNeigh,
    /// One of the node's own addresses, or no route at all.
    NoRoute,
    /// An IPv4 network or broadcast address: not forwarded, or left to the stack.
    Unsure,
}

fn hop_to(a: IpAddr) -> Hop {
    let (v6, o) = match a {
        IpAddr::V4(a) => (false, a.octets().to_vec()),
        IpAddr::V6(a) => (true, a.octets().to_vec()),
    };
    let (client_side, backend_side) = if v6 {
        (
            o[..8] == [0xfd, 0, 0, 0x18, 0, 0, 0, 0],
            o[..8] == [0xfd, 0, 0, 0x18, 0, 1, 0, 0],
        )
    } else {
        (o[..3] == [198, 18, 0], o[..3] == [198, 18, 1])
    };
    if !client_side && !backend_side {
        return Hop::NoRoute;
    }
    let last = o[o.len() - 1];
    // IPv6 host parts other than ::<one byte> have no neighbour entry.
    if v6 && o[8..15].iter().any(|&b| b != 0) {
        return Hop::NoNeigh;
    }
    // The node's own addresses: ::fe and .254, and the subnet-router anycast address.
    if last == 0xfe || (v6 && last == 0) {
        return Hop::NoRoute;
    }
    if !v6 && (last == 0 || last == 255) {
        return Hop::Unsure;
    }
    if backend_side {
        return if (1..=fibnet::BACKENDS).contains(&last) {
            Hop::Via(fibnet::backend_mac(last), LB1_MAC)
        } else {
            Hop::NoNeigh
        };
    }
    // Client side: the clients, the backend on eth0, the one-armed backends (198.18.0.101
    // to .116, fd00:18::65 to ::74: 101 to 116 written in hex).
    match (v6, last) {
        (_, 1) | (false, 2) => Hop::Via(CLIENT_MAC, LB0_MAC),
        (false, 10) => Hop::Via(fibnet::BACKEND_ON_ETH0_MAC, LB0_MAC),
        (false, 101..=116) => Hop::Via([0x02, 0xbe, 0, 0, 1, last - 100], LB0_MAC),
        (true, 0x65..=0x74) => Hop::Via([0x02, 0xbe, 0, 0, 1, last - 0x64], LB0_MAC),
        _ => Hop::NoNeigh,
    }
}

/// Not a unicast address one could route from.
fn martian(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => {
            a.is_unspecified()
                || a.is_loopback()
                || a.is_multicast()
                || a.is_broadcast()
                || a.octets()[0] >= 240
        }
        IpAddr::V6(a) => a.is_unspecified() || a.is_loopback() || a.is_multicast(),
    }
}

/// The verdict and MACs of a translated frame sent toward `to` (not too big).
fn check_sent(out: &TestRunOutput, to: IpAddr) -> Result<&'static str, String> {
    match hop_to(to) {
        Hop::Via(dmac, smac) => {
            if !matches!(out.verdict, verdict::TX | verdict::REDIRECT) {
                return Err(format!(
                    "toward {to}: want TX or REDIRECT, got {}",
                    verdict::name(out.verdict)
                ));
            }
            let o = &out.packet;
            if o[0..6] != dmac || o[6..12] != smac {
                return Err(format!(
                    "MACs {:02x?} {:02x?} toward {to}",
                    &o[0..6],
                    &o[6..12]
                ));
            }
            Ok("sent")
        }
        Hop::NoNeigh => {
            if out.verdict != verdict::PASS {
                return Err(format!(
                    "toward {to} (no neighbour): want XDP_PASS, got {}",
                    verdict::name(out.verdict)
                ));
            }
            Ok("passed_no_neighbour")
        }
        Hop::NoRoute => {
            if out.verdict != verdict::DROP {
                return Err(format!(
                    "toward {to} (no route): want XDP_DROP, got {}",
                    verdict::name(out.verdict)
                ));
            }
            Ok("dropped_no_route")
        }
        Hop::Unsure => match out.verdict {
            verdict::PASS => Ok("passed_no_neighbour"),
            verdict::DROP => Ok("dropped_no_route"),
            v => Err(format!("toward {to}: got {}", verdict::name(v))),
        },
    }
}

/// A packet whose translation the program would forward: checks the verdict and output.
/// `big`: bigger than the next hop's MTU.
#[allow(clippy::too_many_arguments, reason = "the translation's fields")]
fn forwarded(
    input: &[u8],
    inp: &Ip,
    out: &TestRunOutput,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
    model: &mut Model,
) -> Result<&'static str, String> {
    let big = inp.ip_end - inp.l3 > MTU;
    // No route: dropped before anything is written (`dport` 0: toward some backend, all
    // routed).
    if dport != 0
        && (matches!(hop_to(dst), Hop::NoRoute)
            || matches!(hop_to(dst), Hop::Unsure) && out.verdict == verdict::DROP)
    {
        if out.verdict != verdict::DROP {
            return Err(format!(
                "toward {dst} (no route): want XDP_DROP, got {}",
                verdict::name(out.verdict)
            ));
        }
        return Ok("dropped_no_route");
    }
    if big && inp.df {
        return match out.verdict {
            verdict::TX => {
                too_big(input, inp, &out.packet)?;
                Ok("icmp_too_big")
            }
            verdict::DROP => Ok("too_big_rate_limited"),
            v => Err(format!("too big with DF: got {}", verdict::name(v))),
        };
    }
    translated(input, inp, &out.packet, src, sport, dst, dport)?;
    if big {
        // IPv4 without DF: left to the stack to fragment.
        if out.verdict != verdict::PASS {
            return Err(format!(
                "too big without DF: got {}",
                verdict::name(out.verdict)
            ));
        }
        return Ok("passed_to_fragment");
    }
    let _ = model;
    match check_sent(out, dst)? {
        "sent" => Ok("translated"),
        other => Ok(other),
    }
}

/// An ICMP fragmentation-needed / packet-too-big answering `input`.
fn too_big(input: &[u8], inp: &Ip, out: &[u8]) -> Result<(), String> {
    let l3 = inp.l3;
    if out[0..6] != input[6..12] || out[6..12] != input[0..6] || out[12..l3] != input[12..l3] {
        return Err("too big: link layer".into());
    }
    let Some(o) = parse(out) else {
        return Err("too big: does not parse".into());
    };
    if o.proto != if inp.v6 { ICMP6 } else { ICMP4 } || (o.src, o.dst) != (inp.dst, inp.src) {
        return Err("too big: header".into());
    }
    let icmp = &out[o.l4..o.ip_end];
    let quote = &input[l3..inp.ip_end];
    let quote = &quote[..quote.len().min(if inp.v6 { 1232 } else { 548 })];
    if &icmp[8..] != quote || out.len() != o.ip_end {
        return Err("too big: quote".into());
    }
    let mtu_ok = if inp.v6 {
        icmp[..2] == [2, 0]
            && u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]) as usize == MTU
    } else {
        icmp[..2] == [3, 4] && usize::from(u16::from_be_bytes([icmp[6], icmp[7]])) == MTU
    };
    let acc = if inp.v6 {
        pseudo(&octets(o.src), &octets(o.dst), ICMP6, icmp.len())
    } else {
        0
    };
    if !mtu_ok || !sums_to_ones(icmp, acc) || !ipv4_header_ok(out, &o) {
        return Err("too big: type, MTU or checksums".into());
    }
    Ok(())
}

/// Checks one run against the policy and the model; returns what happened.
fn check(case: &Case, out: &TestRunOutput, model: &mut Model) -> Result<&'static str, String> {
    let input = &case.input;
    if out.verdict == verdict::ABORTED {
        return Err("XDP_ABORTED".into());
    }
    let Some(ip) = parse(input) else {
        unchanged(input, out)?;
        return Ok("passed_unparsed");
    };
    if ip.frag.is_some_and(|(_, later)| later) {
        // No transport header to check.
    } else if !l4_ok(input, &ip) {
        unchanged(input, out)?;
        return Ok("passed_bad_l4");
    }
    let v6 = ip.v6;
    let ours =
        ip.dst == vip(v6) || ip.dst == snat(v6) || ip.dst == xlat_vip(v6) || ip.dst == keep_vip(v6);
    if ip.frag.is_some() && !(ours && matches!(ip.proto, TCP | UDP | SCTP)) {
        unchanged(input, out)?;
        return Ok("passed_fragment");
    }
    if ours && !ipv4_header_ok(input, &ip) {
        unchanged(input, out)?;
        return Ok("passed_bad_ip_checksum");
    }
    if let Some((id, later)) = ip.frag {
        if later {
            return check_later_fragment(input, &ip, id, out, model);
        }
        if ip.proto == SCTP {
            // Its CRC32c covers a datagram of a length the fragment does not tell.
            unchanged(input, out)?;
            return Ok("passed_sctp_fragment");
        }
        // A first fragment: its ports are remembered, then it goes as a whole packet would.
        model.frags.insert(
            (ip.src, ip.dst, ip.proto, id),
            (ports(input, &ip), Instant::now()),
        );
    }
    let what = check_l4(input, &ip, out, model)?;
    // SCTP's own count: its CRC32c was checked.
    Ok(match (ip.proto, what) {
        (SCTP, "translated") => "sctp_translated",
        _ => what,
    })
}

/// [`check`], for a packet that parsed, whose transport header is sound, and which is not a
/// later fragment.
fn check_l4(
    input: &[u8],
    ip: &Ip,
    out: &TestRunOutput,
    model: &mut Model,
) -> Result<&'static str, String> {
    let ip = ip.clone();
    let v6 = ip.v6;
    match ip.proto {
        TCP | UDP | SCTP if ip.dst == snat(v6) => {
            let (sport, dport) = ports(input, &ip);
            let Some(&t) = (sport == BACKEND_PORT)
                .then(|| model.reverse.get(&(ip.src, dport, ip.proto)))
                .flatten()
            else {
                // A reservation of a NAT46/64 flow refused translation: back to its client
                // (passed, translated, toward one without a neighbour entry) ...
                let sent_or_no_neigh =
                    |o: &Ip| out.verdict != verdict::PASS || matches!(hop_to(o.dst), Hop::NoNeigh);
                if let Some(o) = parse(&out.packet).filter(|o| o.v6 != v6 && sent_or_no_neigh(o)) {
                    let (_, cport) = ports(&out.packet, &o);
                    if model.xlat_refused.contains(&(o.dst, cport, ip.proto)) {
                        return Ok("reply_to_a_refused_xlat_flow");
                    }
                }
                // ... or, too big once translated, answered with too-big (or dropped over
                // the rate limit), as a tracked flow's reply is (`check_xlat`).
                let ip_len = ip.ip_end - ip.l3;
                let xlat_len = if v6 { ip_len - 20 } else { ip_len + 20 };
                let refused = model
                    .xlat_refused
                    .iter()
                    .any(|r| r.2 == ip.proto && r.0.is_ipv6() != v6);
                let icmp_back = parse(&out.packet)
                    .is_some_and(|o| o.dst == ip.src && o.proto == if v6 { ICMP6 } else { ICMP4 });
                if refused
                    && xlat_len > MTU
                    && (out.verdict == verdict::DROP || out.verdict == verdict::TX && icmp_back)
                {
                    return Ok("reply_to_a_refused_xlat_flow_too_big");
                }
                unchanged(input, out)?;
                return Ok("passed_not_a_reply");
            };
            if model.stale(t, ip.src, dport) {
                return Ok("reply_to_a_released_port");
            }
            if ip.ttl <= 1 {
                unchanged(input, out)?;
                return Ok("passed_ttl");
            }
            let (client, cport, vipa, vport, _) = t;
            if client.is_ipv6() != v6 {
                return check_xlat(input, &ip, out, vipa, vport, client, cport);
            }
            forwarded(input, &ip, out, vipa, vport, client, cport, model)
        }
        TCP | UDP if ip.dst == xlat_vip(v6) => {
            let (sport, dport) = ports(input, &ip);
            if dport != XLAT_PORT {
                unchanged(input, out)?;
                return Ok("passed_no_listener");
            }
            let flags = tcp_flags(input, &ip);
            let t = (ip.src, sport, ip.dst, dport, ip.proto);
            model.note(t, flags, ip.ttl);
            if ip.ttl <= 1 {
                unchanged(input, out)?;
                return Ok("passed_ttl");
            }
            if !xlat_eligible(input, &ip) {
                unchanged(input, out)?;
                model.xlat_refused.insert((ip.src, sport, ip.proto));
                return Ok("passed_xlat_unsupported");
            }
            let Some(o) = parse(&out.packet).filter(|o| o.v6 != v6) else {
                return Err(format!(
                    "not translated: {} (in {} B, out {} B)",
                    verdict::name(out.verdict),
                    input.len(),
                    out.packet.len()
                ));
            };
            let (osport, _) = ports(&out.packet, &o);
            if !backend_addrs(!v6).contains(&o.dst) {
                return Err(format!("went to {}, not a backend", o.dst));
            }
            if !(SNAT_PORTS.0..=SNAT_PORTS.1).contains(&osport) {
                return Err(format!("SNAT port {osport} outside the range"));
            }
            let what = check_xlat(input, &ip, out, snat(!v6), osport, o.dst, BACKEND_PORT)?;
            model.learn(
                t,
                Mapping {
                    backend: o.dst,
                    snat_port: osport,
                },
                flags,
            )?;
            Ok(what)
        }
        TCP | UDP | SCTP if ip.dst == vip(v6) => {
            let (sport, dport) = ports(input, &ip);
            if !LISTENERS.contains(&(v6, dport, ip.proto)) {
                unchanged(input, out)?;
                return Ok("passed_no_listener");
            }
            let flags = tcp_flags(input, &ip);
            model.note((ip.src, sport, ip.dst, dport, ip.proto), flags, ip.ttl);
            if ip.ttl <= 1 {
                unchanged(input, out)?;
                return Ok("passed_ttl");
            }
            if ip.ip_end - ip.l3 > MTU && ip.df {
                // Answered with ICMP too-big (or dropped over the rate limit).
                let none = snat(v6);
                return forwarded(input, &ip, out, none, 0, none, 0, model);
            }
            // Where it went.
            let what = match parse(&out.packet) {
                Some(o) if o.proto == ip.proto && out.packet.len() == input.len() => {
                    let (osport, odport) = ports(&out.packet, &o);
                    if !backend_addrs(v6).contains(&o.dst) || odport != BACKEND_PORT {
                        return Err(format!("went to {}:{odport}, not a backend", o.dst));
                    }
                    if !(SNAT_PORTS.0..=SNAT_PORTS.1).contains(&osport) {
                        return Err(format!("SNAT port {osport} outside the range"));
                    }
                    let what = forwarded(
                        input,
                        &ip,
                        out,
                        snat(v6),
                        osport,
                        o.dst,
                        BACKEND_PORT,
                        model,
                    )?;
                    model.learn(
                        (ip.src, sport, ip.dst, dport, ip.proto),
                        Mapping {
                            backend: o.dst,
                            snat_port: osport,
                        },
                        flags,
                    )?;
                    what
                }
                _ => {
                    let none = snat(v6);
                    forwarded(input, &ip, out, none, 0, none, 0, model)?
                }
            };
            Ok(what)
        }
        TCP | UDP | SCTP if ip.dst == keep_vip(v6) => check_kept(input, &ip, out, model),
        TCP | UDP if backend_addrs(v6).contains(&ip.src) => {
            // Maybe the reply of a flow that kept its client's source.
            let (sport, dport) = ports(input, &ip);
            let Some(&t) = (sport == BACKEND_PORT)
                .then(|| model.kept_replies.get(&(ip.src, ip.dst, dport, ip.proto)))
                .flatten()
            else {
                unchanged(input, out)?;
                return Ok("passed_not_a_reply");
            };
            if ip.ttl <= 1 {
                unchanged(input, out)?;
                return Ok("passed_ttl");
            }
            let (client, cport, vipa, vport, _) = t;
            match forwarded(input, &ip, out, vipa, vport, client, cport, model)? {
                "translated" => Ok("kept_reply_translated"),
                other => Ok(other),
            }
        }
        ICMP4 | ICMP6 if ip.proto == if v6 { ICMP6 } else { ICMP4 } => {
            check_icmp(input, &ip, out, model)
        }
        _ => {
            unchanged(input, out)?;
            Ok("passed_other")
        }
    }
}

/// A client's packet to a VIP that keeps sources: to a backend of its family with only the
/// destination rewritten (the source address and port stay the client's), always the same
/// backend for the same flow (the ring never changes during a run).
fn check_kept(
    input: &[u8],
    ip: &Ip,
    out: &TestRunOutput,
    model: &mut Model,
) -> Result<&'static str, String> {
    let v6 = ip.v6;
    let (sport, dport) = ports(input, ip);
    if !KEEP_LISTENERS.contains(&(dport, ip.proto)) {
        unchanged(input, out)?;
        return Ok("passed_no_listener");
    }
    if ip.ttl <= 1 {
        unchanged(input, out)?;
        return Ok("passed_ttl");
    }
    let none = snat(v6);
    if ip.ip_end - ip.l3 > MTU && ip.df {
        return forwarded(input, ip, out, none, 0, none, 0, model);
    }
    let Some(o) = parse(&out.packet).filter(|o| o.proto == ip.proto) else {
        return forwarded(input, ip, out, none, 0, none, 0, model);
    };
    let (_, odport) = ports(&out.packet, &o);
    if !backend_addrs(v6).contains(&o.dst) || odport != BACKEND_PORT {
        return Err(format!("went to {}:{odport}, not a backend", o.dst));
    }
    // The client's own address and port.
    let what = forwarded(input, ip, out, ip.src, sport, o.dst, BACKEND_PORT, model)?;
    let t = (ip.src, sport, ip.dst, dport, ip.proto);
    if let Some(old) = model.kept.insert(t, o.dst) {
        if old != o.dst {
            return Err(format!("kept flow {t:?} moved from {old} to {}", o.dst));
        }
    }
    model
        .kept_replies
        .insert((o.dst, ip.src, sport, ip.proto), t);
    Ok(match what {
        "translated" => "kept_translated",
        other => other,
    })
}

/// Whether a packet of a NAT46/64 flow can be translated: untagged, IPv4 without options,
/// IPv6 without extension headers, not a fragment, IPv6 UDP with a checksum (IPv4 UDP
/// without one gets one, whatever its length).
fn xlat_eligible(p: &[u8], ip: &Ip) -> bool {
    ip.frag.is_none()
        && ip.l3 == 14
        && ip.l4 == ip.l3 + if ip.v6 { 40 } else { 20 }
        && (!ip.v6 || ip.proto == TCP || p[ip.l4 + 6..ip.l4 + 8] != [0, 0])
}

/// A packet translated to the other family: addresses, ports, TTL / hop limit, TOS /
/// traffic class, IPv4's DF and identification 0 and header checksum, the transport
/// checksum right exactly when it was, and everything after it as it came; sent to the
/// next hop of `dst`.
fn check_xlat(
    input: &[u8],
    inp: &Ip,
    out: &TestRunOutput,
    src: IpAddr,
    sport: u16,
    dst: IpAddr,
    dport: u16,
) -> Result<&'static str, String> {
    if !xlat_eligible(input, inp) {
        unchanged(input, out)?;
        return Ok("passed_xlat_unsupported");
    }
    let grows = !inp.v6;
    let new_len = if grows {
        inp.ip_end - inp.l3 + 20
    } else {
        inp.ip_end - inp.l3 - 20
    };
    // Without a route it is dropped before anything is written. (A network or broadcast
    // address, `Unsure`, may have a route the kernel's FIB finds: then its MTU applies.)
    let hop = hop_to(dst);
    let routed_too_big = new_len > MTU && out.verdict == verdict::TX;
    // A network address has a connected route the kernel's FIB finds, and no neighbour: then
    // it is translated and passed as toward any address without one.
    let unsure_no_neigh =
        matches!(hop, Hop::Unsure) && out.verdict == verdict::PASS && out.packet != input;
    if matches!(hop, Hop::NoRoute)
        || matches!(hop, Hop::Unsure) && !routed_too_big && !unsure_no_neigh
    {
        if out.packet != input || !matches!(out.verdict, verdict::DROP | verdict::PASS) {
            return Err(format!(
                "toward {dst} (no route): got {}",
                verdict::name(out.verdict)
            ));
        }
        return Ok("dropped_no_route");
    }
    // Too big is known before the neighbour: the kernel's FIB lookup checks the MTU first
    // (BPF_FIB_LKUP_RET_FRAG_NEEDED comes before NO_NEIGH), as on the same-family path.
    if new_len > MTU {
        // Answered with ICMP too-big (its MTU adjusted by 20), dropped over the rate limit,
        // or (IPv4 without DF) passed untranslated.
        return match out.verdict {
            verdict::TX | verdict::DROP => Ok("xlat_too_big"),
            verdict::PASS if !inp.df => {
                unchanged(input, out)?;
                Ok("passed_xlat_unsupported")
            }
            v => Err(format!("too big to translate: {}", verdict::name(v))),
        };
    }
    // Without a neighbour it is translated all the same and passed to the stack with the
    // frame's own MAC addresses (the stack resolves the neighbour and forwards it).
    let no_neigh = matches!(hop, Hop::NoNeigh) || unsure_no_neigh;
    if no_neigh && (out.verdict != verdict::PASS || out.packet.get(..12) != input.get(..12)) {
        return Err(format!(
            "toward {dst} (no neighbour): want the translation passed with the frame's MACs, \
             got {} with {:02x?}",
            verdict::name(out.verdict),
            out.packet.get(..12)
        ));
    }
    let o = &out.packet;
    let Some(op) = parse(o) else {
        return Err("translated packet does not parse".into());
    };
    let want_len = if grows {
        input.len() + 20
    } else {
        input.len() - 20
    };
    if op.v6 == inp.v6 || o.len() != want_len || op.proto != inp.proto {
        return Err("not translated to the other family".into());
    }
    if (op.src, op.dst) != (src, dst) || ports(o, &op) != (sport, dport) {
        return Err(format!(
            "{}:{:?} → {}, want {src}:{sport} → {dst}:{dport}",
            op.src,
            ports(o, &op),
            op.dst
        ));
    }
    if op.ttl != inp.ttl - 1 {
        return Err(format!("TTL {} from {}", op.ttl, inp.ttl));
    }
    let tos = |p: &[u8], ip: &Ip| {
        if ip.v6 {
            (p[ip.l3] << 4) | (p[ip.l3 + 1] >> 4)
        } else {
            p[ip.l3 + 1]
        }
    };
    if tos(o, &op) != tos(input, inp) {
        return Err("TOS / traffic class".into());
    }
    if !op.v6 && (o[op.l3 + 4..op.l3 + 8] != [0, 0, 0x40, 0] || !ipv4_header_ok(o, &op)) {
        return Err("IPv4 header: identification, DF or checksum".into());
    }
    // IPv4 UDP without a checksum gets a right one.
    if l4_checksum_ok(input, inp).or(Some(true)) != l4_checksum_ok(o, &op) {
        return Err(format!(
            "L4 checksum: {:?} in, {:?} out",
            l4_checksum_ok(input, inp),
            l4_checksum_ok(o, &op)
        ));
    }
    let after = if inp.proto == TCP { 18 } else { 8 };
    if o[op.l4 + after..] != input[inp.l4 + after..] {
        return Err("bytes after the transport checksum changed".into());
    }
    if no_neigh {
        return Ok("xlat_passed_no_neighbour");
    }
    match check_sent(out, dst)? {
        "sent" => Ok("xlat_translated"),
        other => Ok(other),
    }
}

/// A later fragment to a VIP or the SNAT address, its IPv4 header sound: translated as its
/// first fragment's flow was; without a first fragment seen, dropped (to a VIP) or passed
/// (to the SNAT address).
fn check_later_fragment(
    input: &[u8],
    ip: &Ip,
    id: u32,
    out: &TestRunOutput,
    model: &mut Model,
) -> Result<&'static str, String> {
    let v6 = ip.v6;
    let to_vip = ip.dst == vip(v6) || ip.dst == xlat_vip(v6);
    let head = model.frags.get(&(ip.src, ip.dst, ip.proto, id)).copied();
    // The program forgets a first fragment after five seconds (of jiffies): near that,
    // either outcome.
    if head.is_some_and(|(_, seen)| seen.elapsed() > Duration::from_millis(4500)) {
        return Ok("fragment_head_expiring");
    }
    let Some(((sport, dport), _)) = head else {
        if to_vip {
            if out.verdict != verdict::DROP || out.packet != input {
                return Err(format!(
                    "fragment without its first fragment: want XDP_DROP, got {}",
                    verdict::name(out.verdict)
                ));
            }
            return Ok("dropped_fragment_no_head");
        }
        unchanged(input, out)?;
        return Ok("passed_fragment");
    };
    // Where the first fragment's flow goes, as the model knows it.
    let target = if to_vip {
        let t = (ip.src, sport, ip.dst, dport, ip.proto);
        match model.forward.get(&t) {
            Some(_) if model.may_move.contains_key(&t) => {
                return Ok("fragment_of_a_moving_flow");
            }
            // A NAT46/64 flow's fragments are not translated.
            Some(m) if m.backend.is_ipv6() != v6 => {
                unchanged(input, out)?;
                return Ok("passed_fragment_xlat");
            }
            Some(m) => Some((snat(v6), m.backend)),
            None => None,
        }
    } else {
        match (sport == BACKEND_PORT)
            .then(|| model.reverse.get(&(ip.src, dport, ip.proto)))
            .flatten()
        {
            Some(&t) if model.stale(t, ip.src, dport) => {
                return Ok("fragment_of_a_released_port");
            }
            Some(&(client, _, _, _, _)) if client.is_ipv6() != v6 => {
                unchanged(input, out)?;
                return Ok("passed_fragment_xlat");
            }
            Some(&(client, _, vipa, _, _)) => Some((vipa, client)),
            None => None,
        }
    };
    let Some((src, dst)) = target else {
        // A flow the model never saw forwarded: passed untouched; or, tracked without the
        // model seeing it (a new flow answered with ICMP too-big), translated.
        if out.verdict == verdict::PASS && out.packet == input {
            return Ok("passed_fragment_untracked");
        }
        return Ok("fragment_of_an_unseen_flow");
    };
    if ip.ttl <= 1 {
        unchanged(input, out)?;
        return Ok("passed_ttl");
    }
    match forwarded(input, ip, out, src, 0, dst, 1, model)? {
        "translated" => Ok("fragment_translated"),
        other => Ok(other),
    }
}

fn check_icmp(
    input: &[u8],
    ip: &Ip,
    out: &TestRunOutput,
    model: &mut Model,
) -> Result<&'static str, String> {
    let v6 = ip.v6;
    let ty = input[ip.l4];
    let echo = if v6 { ty == 128 } else { ty == 8 };
    let error = if v6 {
        matches!(ty, 1..=4)
    } else {
        matches!(ty, 3 | 11 | 12)
    };
    // Any VIP answers, a NAT46/64 one too (in its own family: nothing to translate).
    if echo && (ip.dst == vip(v6) || ip.dst == xlat_vip(v6)) {
        return echo_reply(input, ip, out);
    }
    if !error {
        unchanged(input, out)?;
        return Ok("passed_icmp_other");
    }
    // The quoted packet.
    let q3 = ip.l4 + 8;
    let (qsrc, qdst, q4, qproto) = if v6 {
        if q3 + 40 > ip.ip_end || q3 + 40 > WINDOW {
            unchanged(input, out)?;
            return Ok("passed_icmp_short_quote");
        }
        let a = |o: usize| {
            IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(&input[o..o + 16]).unwrap(),
            ))
        };
        (a(q3 + 8), a(q3 + 24), q3 + 40, input[q3 + 6])
    } else {
        let ihl = usize::from(input[q3.min(input.len() - 1)] & 0xf) * 4;
        if q3 + 20 > ip.ip_end || q3 + 20 > WINDOW || ihl < 20 || q3 + ihl > ip.ip_end {
            unchanged(input, out)?;
            return Ok("passed_icmp_short_quote");
        }
        let a = |o: usize| {
            IpAddr::V4(Ipv4Addr::new(
                input[o],
                input[o + 1],
                input[o + 2],
                input[o + 3],
            ))
        };
        (a(q3 + 12), a(q3 + 16), q3 + ihl, input[q3 + 9])
    };
    if !matches!(qproto, TCP | UDP) || q4 + 4 > ip.ip_end || q4 + 4 > WINDOW {
        unchanged(input, out)?;
        return Ok("passed_icmp_quote_not_tcp_udp");
    }
    let qsport = u16::from_be_bytes([input[q4], input[q4 + 1]]);
    let qdport = u16::from_be_bytes([input[q4 + 2], input[q4 + 3]]);
    // What it becomes: (outer src, outer dst, quoted src, sport, quoted dst, dport).
    let mut kept_flow = false;
    let want = if ip.dst == snat(v6) && qsrc == snat(v6) {
        if let Some(&t) = model.reverse.get(&(qdst, qsport, qproto)) {
            if model.stale(t, qdst, qsport) {
                return Ok("icmp_about_a_released_port");
            }
            let (client, cport, vipa, vport, _) = t;
            if qdport == BACKEND_PORT && client.is_ipv6() != v6 {
                let quote = Quote {
                    l3: q3,
                    l4: q4,
                    proto: qproto,
                    backend: qdst,
                };
                return check_icmp_xlat(input, ip, &quote, out, (client, cport), (vipa, vport));
            }
        }
        model
            .reverse
            .get(&(qdst, qsport, qproto))
            .filter(|&&(client, ..)| qdport == BACKEND_PORT && client.is_ipv6() == v6)
            .map(|&(client, cport, vipa, vport, _)| {
                let from = if ip.src == qdst || ip.src == client {
                    vipa
                } else {
                    ip.src
                };
                (from, client, client, cport, vipa, vport)
            })
    } else if let Some(&(client, cport, vipa, vport, _)) = (ip.dst == qsrc
        && qdport == BACKEND_PORT)
        .then(|| model.kept_replies.get(&(qdst, qsrc, qsport, qproto)))
        .flatten()
    {
        // From the backend side about a flow that kept its client's source: to the client,
        // from the VIP (the backend's own, or one claiming the client's address) or the
        // router that sent it, quoting client → VIP.
        let from = if ip.src == qdst || ip.src == client {
            vipa
        } else {
            ip.src
        };
        kept_flow = true;
        Some((from, client, client, cport, vipa, vport))
    } else if let Some(&backend) = (ip.dst == qsrc)
        .then(|| model.kept.get(&(qdst, qdport, qsrc, qsport, qproto)))
        .flatten()
    {
        // From the client side about a reply of such a flow: to its backend, the error's
        // source kept, quoting backend → client.
        kept_flow = true;
        Some((ip.src, backend, backend, BACKEND_PORT, qdst, qdport))
    } else if ip.dst == qsrc {
        let t = (qdst, qdport, qsrc, qsport, qproto);
        if model.may_move.contains_key(&t) {
            // Re-opened, its new port not seen yet: the model cannot tell.
            return Ok("icmp_about_a_reopened_flow");
        }
        if let Some(m) = model.forward.get(&t).filter(|m| m.backend.is_ipv6() != v6) {
            // A NAT46/64 flow's reply: to the backend in its family, from the SNAT address
            // (the client's own error) or the router through the prefix, quoting backend →
            // SNAT address and port.
            let quote = Quote {
                l3: q3,
                l4: q4,
                proto: qproto,
                backend: qdst,
            };
            let (backend, snat_port) = (m.backend, m.snat_port);
            return check_icmp_xlat(
                input,
                ip,
                &quote,
                out,
                (backend, BACKEND_PORT),
                (snat(!v6), snat_port),
            )
            .map(|o| {
                if o == "icmp_error_xlat" {
                    "icmp_error_xlat_to_backend"
                } else {
                    o
                }
            });
        }
        model
            .forward
            .get(&t)
            .filter(|m| m.backend.is_ipv6() == v6)
            .map(|m| {
                (
                    snat(v6),
                    m.backend,
                    m.backend,
                    BACKEND_PORT,
                    snat(v6),
                    m.snat_port,
                )
            })
    } else {
        None
    };
    let Some((osrc, odst, isrc, isport, idst, idport)) = want else {
        let touched = out.verdict != verdict::PASS || out.packet != *input;
        if touched && ip.dst == qsrc && model.xlat_refused.contains(&(qdst, qdport, qproto)) {
            // About a reply of a NAT46/64 flow refused translation whose reservation lives
            // on, answered: the model does not know its port.
            return Ok("icmp_about_a_refused_xlat_flow");
        }
        unchanged(input, out)?;
        return Ok("passed_icmp_not_ours");
    };
    if !ipv4_header_ok(input, ip) || ip.ttl <= 1 {
        unchanged(input, out)?;
        return Ok("passed_icmp_checks");
    }
    // A router's address that is no unicast address: the FIB refuses that source.
    if osrc == ip.src && martian(osrc) && out.verdict == verdict::DROP {
        return Ok("dropped_martian_source");
    }
    if matches!(hop_to(odst), Hop::NoRoute)
        || matches!(hop_to(odst), Hop::Unsure) && out.verdict == verdict::DROP
    {
        if out.verdict != verdict::DROP {
            return Err(format!(
                "ICMP toward {odst} (no route): want XDP_DROP, got {}",
                verdict::name(out.verdict)
            ));
        }
        return Ok("dropped_no_route");
    }
    let o = &out.packet;
    let Some(op) = parse(o) else {
        return Err("translated ICMP does not parse".into());
    };
    if o.len() != input.len() || (op.src, op.dst) != (osrc, odst) || op.ttl != ip.ttl - 1 {
        return Err(format!(
            "ICMP outer {} → {} ttl {}, want {osrc} → {odst}",
            op.src, op.dst, op.ttl
        ));
    }
    if !ipv4_header_ok(o, &op) {
        return Err("ICMP outer IPv4 header checksum".into());
    }
    // The quote's new addresses and ports.
    let (a_src, a_dst) = if v6 {
        (q3 + 8, q3 + 24)
    } else {
        (q3 + 12, q3 + 16)
    };
    let alen = if v6 { 16 } else { 4 };
    if o[a_src..a_src + alen] != octets(isrc)[..] || o[a_dst..a_dst + alen] != octets(idst)[..] {
        return Err("ICMP quoted addresses".into());
    }
    if o[q4..q4 + 4] != [isport.to_be_bytes(), idport.to_be_bytes()].concat()[..] {
        return Err(format!(
            "ICMP quoted ports {:02x?}, want {isport} → {idport}",
            &o[q4..q4 + 4]
        ));
    }
    // Checksums: ICMP, quoted IPv4 header and quoted L4, right exactly as before (the
    // quoted L4 one as an incremental update, RFC 1624, when it is inside the packet).
    let icmp_sum = |p: &[u8], x: &Ip| {
        let acc = if v6 {
            pseudo(&octets(x.src), &octets(x.dst), ICMP6, x.ip_end - x.l4)
        } else {
            0
        };
        sums_to_ones(&p[x.l4..x.ip_end], acc)
    };
    if icmp_sum(input, ip) != icmp_sum(o, &op) {
        return Err("ICMP checksum".into());
    }
    if !v6 && sums_to_ones(&input[q3..q4], 0) != sums_to_ones(&o[q3..q4], 0) {
        return Err("quoted IPv4 header checksum".into());
    }
    let qcsum = q4 + if qproto == TCP { 16 } else { 6 };
    let qcsum_in = qcsum + 2 <= ip.ip_end && qcsum + 2 <= WINDOW;
    if qcsum_in {
        let old = u16::from_be_bytes([input[qcsum], input[qcsum + 1]]);
        let new = u16::from_be_bytes([o[qcsum], o[qcsum + 1]]);
        let unchanged_zero = !v6 && qproto == UDP && old == 0;
        // Sum of the changed words, old and new: HC' = ~(~HC + ~m + m') (RFC 1624).
        let mut acc = u64::from(!old);
        for (at, len) in [(a_src, alen), (a_dst, alen), (q4, 4)] {
            for w in (0..len).step_by(2) {
                acc += u64::from(!u16::from_be_bytes([input[at + w], input[at + w + 1]]));
                acc += u64::from(u16::from_be_bytes([o[at + w], o[at + w + 1]]));
            }
        }
        let mut want = !fold(acc);
        if qproto == UDP && want == 0 {
            want = 0xffff;
        }
        if unchanged_zero {
            want = 0;
        }
        if new != want {
            return Err(format!("quoted L4 checksum {new:#06x}, want {want:#06x}"));
        }
    }
    // Everything else (the rest of the quote, a trailer) as it was.
    let rest = q4 + 4;
    let skip = |i: usize| (qcsum..qcsum + 2).contains(&i) && qcsum_in;
    if (rest..o.len()).any(|i| !skip(i) && o[i] != input[i]) {
        return Err("ICMP: bytes outside the translated fields changed".into());
    }
    if ip.ip_end - ip.l3 > MTU {
        if out.verdict != verdict::PASS {
            return Err(format!(
                "big ICMP error: got {}",
                verdict::name(out.verdict)
            ));
        }
        return Ok("icmp_error_passed_to_fragment");
    }
    match check_sent(out, odst)? {
        "sent" if kept_flow => Ok("kept_icmp_error_translated"),
        "sent" => Ok("icmp_error_translated"),
        other => Ok(other),
    }
}

fn echo_reply(input: &[u8], ip: &Ip, out: &TestRunOutput) -> Result<&'static str, String> {
    if out.verdict != verdict::TX {
        return Err(format!(
            "echo: want XDP_TX, got {}",
            verdict::name(out.verdict)
        ));
    }
    let o = &out.packet;
    let Some(op) = parse(o) else {
        return Err("echo reply does not parse".into());
    };
    if o.len() != input.len() || (op.src, op.dst) != (ip.dst, ip.src) || op.ttl != 64 {
        return Err("echo reply header".into());
    }
    if o[0..6] != input[6..12] || o[6..12] != input[0..6] {
        return Err("echo reply MACs".into());
    }
    if o[op.l4] != if ip.v6 { 129 } else { 0 } || o[op.l4 + 4..] != input[ip.l4 + 4..] {
        return Err("echo reply body".into());
    }
    let sum = |p: &[u8], x: &Ip| {
        let acc = if x.v6 {
            pseudo(&octets(x.src), &octets(x.dst), ICMP6, x.ip_end - x.l4)
        } else {
            0
        };
        sums_to_ones(&p[x.l4..x.ip_end], acc)
    };
    if sum(input, ip) != sum(o, &op) || !ipv4_header_ok(o, &op) {
        return Err("echo reply checksums".into());
    }
    Ok("echo_reply")
}

// ---------- the run ----------

/// A listener with `backends` on [`BACKEND_PORT`], weight 1 each.
fn service(vip: IpAddr, port: u16, proto: Protocol, backends: Vec<IpAddr>) -> ServiceSpec {
    ServiceSpec {
        key: ServiceKey { vip, port, proto },
        backends: backends
            .into_iter()
            .map(|addr| BackendSpec {
                addr,
                port: BACKEND_PORT,
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
        max_services: 16,
        max_backends: 64,
        ring_size: 251,
        conntrack_entries: 65536,
        flow_cache_entries: 1024,
    })
    .expect("loading the XDP program (needs root)");
    let mut b = XdpBalancer::new(program);
    let hour = Duration::from_secs(3600);
    b.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(SNAT4)),
        snat_v6: Some(Ipv6Addr::from(SNAT6)),
        snat_ports: SNAT_PORTS,
        tcp_timeout: hour,
        udp_timeout: hour,
        tcp_closing_timeout: hour,
        ..NodeConfig::default()
    })
    .unwrap();
    for (v6, port, proto) in LISTENERS {
        let proto = match proto {
            TCP => Protocol::Tcp,
            UDP => Protocol::Udp,
            _ => Protocol::Sctp,
        };
        b.upsert_service(&service(vip(v6), port, proto, backend_addrs(v6)))
            .unwrap();
    }
    // Keeping the client's source.
    for v6 in [false, true] {
        for (port, proto) in KEEP_LISTENERS {
            let proto = if proto == TCP {
                Protocol::Tcp
            } else {
                Protocol::Udp
            };
            let mut spec = service(keep_vip(v6), port, proto, backend_addrs(v6));
            spec.preserve_source = true;
            b.upsert_service(&spec).unwrap();
        }
    }
    // NAT46 and NAT64: each VIP's backends are of the other family.
    for v6 in [false, true] {
        for proto in [Protocol::Tcp, Protocol::Udp] {
            b.upsert_service(&service(xlat_vip(v6), XLAT_PORT, proto, backend_addrs(!v6)))
                .unwrap();
        }
    }
    b
}

/// Packets for the truncation sweep: each is cut at every offset.
fn sweep_packets(rng: &mut Rng) -> Vec<Case> {
    let c4 = IpAddr::V4(Ipv4Addr::from(CLIENTS4[0]));
    let c6 = IpAddr::V6(Ipv6Addr::from(CLIENT6));
    let mut cases = vec![
        packet(
            CLIENT_MAC,
            LB0_MAC,
            c4,
            vip(false),
            64,
            TCP,
            3000,
            80,
            0x02,
            b"sweep",
        ),
        with_ipv4_options(
            &packet(
                CLIENT_MAC,
                LB0_MAC,
                c4,
                vip(false),
                64,
                UDP,
                3001,
                53,
                0,
                b"sweep",
            ),
            3,
        ),
        with_vlans(
            &packet(
                CLIENT_MAC,
                LB0_MAC,
                c4,
                vip(false),
                64,
                TCP,
                3002,
                80,
                0x10,
                b"sweep",
            ),
            &[7, 9],
        ),
        with_ipv6_ext(
            &packet(
                CLIENT_MAC,
                LB0_MAC,
                c6,
                vip(true),
                64,
                UDP,
                3003,
                53,
                0,
                b"sweep",
            ),
            &[
                (0, vec![0, 0, 1, 4, 0, 0, 0, 0]),
                (44, vec![0, 0, 0, 0, 0, 0, 0, 1]),
            ],
        ),
        packet(
            CLIENT_MAC,
            LB0_MAC,
            c6,
            vip(true),
            64,
            TCP,
            3004,
            443,
            0x02,
            b"sweep",
        ),
        icmp_packet(
            CLIENT_MAC,
            LB0_MAC,
            c4,
            vip(false),
            64,
            8,
            0,
            [0, 1, 0, 1],
            b"ping",
        ),
    ]
    .into_iter()
    .map(|input| Case {
        input,
        ingress: "eth0",
    })
    .collect::<Vec<_>>();
    let _ = rng;
    cases.push(Case {
        input: packet(
            LB1_MAC,
            LB1_MAC,
            IpAddr::V4(Ipv4Addr::from(backend4(0))),
            snat(false),
            64,
            TCP,
            8080,
            20000,
            0x12,
            b"sweep",
        ),
        ingress: "eth1",
    });
    cases
}

#[test]
fn xdp_fuzz_checked_by_an_independent_model() {
    let packets: u64 = std::env::var("PORTICO_XDP_FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150_000);
    let seed: u64 = std::env::var("PORTICO_XDP_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    // A bounded run: stop early rather than run past a minute in a slow (debug) build.
    let budget = Duration::from_secs(
        std::env::var("PORTICO_XDP_FUZZ_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if cfg!(debug_assertions) { 50 } else { 3600 }),
    );
    println!("PORTICO_XDP_FUZZ_SEED={seed} PORTICO_XDP_FUZZ_PACKETS={packets}");
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    // Per-CPU LRU lists and rate limits: one CPU for the whole run.
    pin_to_cpu(0);
    let ifindex = |name: &str| fibnet::ifindex(name).unwrap();
    let (eth0, eth1) = (ifindex("eth0"), ifindex("eth1"));
    let mut rng = Rng(seed);
    let mut model = Model::default();
    // Replaying a seed: prints every packet whose hex dump contains this (a flow's ports,
    // say) with what the program and the model made of it.
    let trace = std::env::var("PORTICO_XDP_FUZZ_TRACE").ok();
    let run = |case: &Case, model: &mut Model, n: u64| {
        if case.input.len() < 14 {
            // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
            model.count("refused_by_test_run");
            return;
        }
        let ingress = if case.ingress == "eth0" { eth0 } else { eth1 };
        let out = prog.test_run_on(&case.input, Some(ingress)).unwrap();
        let checked = check(case, &out, model);
        if trace
            .as_deref()
            .is_some_and(|t| hex(&case.input).contains(t) || hex(&out.packet).contains(t))
        {
            println!(
                "{n}: {} {:?} {}\n  in  {}\n  out {}",
                case.ingress,
                checked,
                verdict::name(out.verdict),
                hex(&case.input),
                hex(&out.packet)
            );
        }
        match checked {
            Ok(what) => model.count(what),
            Err(why) => panic!(
                "packet {n} (seed {seed}): {why}\n ingress {}, verdict {}\n  in ({} B): {}\n out ({} B): {}",
                case.ingress,
                verdict::name(out.verdict),
                case.input.len(),
                hex(&case.input),
                out.packet.len(),
                hex(&out.packet)
            ),
        }
    };
    let mut n = 0;
    for case in sweep_packets(&mut rng) {
        for cut in 0..=case.input.len() {
            let c = Case {
                input: case.input[..cut].to_vec(),
                ingress: case.ingress,
            };
            run(&c, &mut model, n);
            n += 1;
        }
    }
    let started = Instant::now();
    while n < packets && started.elapsed() < budget {
        let case = if let Some(case) = model.pending.pop() {
            case
        } else if rng.chance(3) {
            let mut pieces = fragmented(&mut rng, &model);
            let first = pieces.remove(0);
            pieces.reverse();
            model.pending = pieces;
            first
        } else {
            generate(&mut rng, &model)
        };
        run(&case, &mut model, n);
        n += 1;
    }
    let mut outcomes: Vec<_> = model.outcomes.iter().collect();
    outcomes.sort();
    println!("{n} packets, {} flows: {outcomes:?}", model.forward.len());
    for must in [
        "translated",
        "icmp_too_big",
        "echo_reply",
        "icmp_error_translated",
        "passed_unparsed",
        "fragment_translated",
        "dropped_fragment_no_head",
        "sctp_translated",
        "xlat_translated",
        "xlat_passed_no_neighbour",
        "kept_translated",
        "kept_reply_translated",
        "kept_icmp_error_translated",
        "icmp_error_xlat",
        "icmp_error_xlat_to_backend",
        "dropped_icmp_xlat",
    ] {
        assert!(
            model.outcomes.get(must).copied().unwrap_or(0) > 0 || n < 20_000,
            "no packet ended as {must}: {outcomes:?}"
        );
    }
}

fn hex(p: &[u8]) -> String {
    p.iter().map(|b| format!("{b:02x}")).collect()
}

/// Keeps the calling thread on one CPU.
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

/// The quoted packet of an ICMP error: offsets, transport protocol, its destination.
struct Quote {
    l3: usize,
    l4: usize,
    proto: u8,
    backend: IpAddr,
}

/// What the checker expects of an ICMP error crossing families.
enum XlatIcmp {
    /// This (type, code, 4 bytes) in the other family.
    To(u8, u8, [u8; 4]),
    /// Passed untouched.
    Pass,
    /// Dropped (`drop_xlat_icmp`).
    Drop,
}

/// RFC 7915 §4.2 / §5.2, as the checker reads them: an error's (type, code, 4 bytes) in the
/// other family, passed (types the balancer leaves alone), or dropped (codes the RFC drops
/// or does not list, and parameter problems pointing at fields the other family lacks).
fn xlat_icmp_type(v6: bool, ty: u8, code: u8, rest: [u8; 4]) -> XlatIcmp {
    use XlatIcmp::{Drop, Pass, To};
    if v6 {
        // ICMPv6 → ICMP.
        match (ty, code) {
            (1, 0 | 2 | 3) => To(3, 1, [0; 4]),
            (1, 1) => To(3, 10, [0; 4]),
            (1, 4) => To(3, 3, [0; 4]),
            (2, 0) => {
                let mtu = u32::from_be_bytes(rest).saturating_sub(20).min(65535) as u16;
                let [a, b] = mtu.to_be_bytes();
                To(3, 4, [0, 0, a, b])
            }
            (3, 0 | 1) => To(11, code, [0; 4]),
            (1 | 3, _) => Drop,
            // IPv6 header offsets → IPv4's: version and traffic class, traffic class and
            // flow label, payload length → total length, next header → protocol, hop
            // limit → TTL, the addresses.
            (4, 0) => match u32::from_be_bytes(rest) {
                p @ (0 | 1) => To(12, 0, [p as u8, 0, 0, 0]),
                4 | 5 => To(12, 0, [2, 0, 0, 0]),
                6 => To(12, 0, [9, 0, 0, 0]),
                7 => To(12, 0, [8, 0, 0, 0]),
                8..=23 => To(12, 0, [12, 0, 0, 0]),
                24..=39 => To(12, 0, [16, 0, 0, 0]),
                _ => Drop,
            },
            (4, 1) => To(3, 2, [0; 4]),
            (4, _) => Drop,
            _ => Pass,
        }
    } else {
        match (ty, code) {
            (3, 0 | 1 | 5..=8 | 11 | 12) => To(1, 0, [0; 4]),
            (3, 9 | 10 | 13 | 15) => To(1, 1, [0; 4]),
            (3, 3) => To(1, 4, [0; 4]),
            (3, 2) => To(4, 1, [0, 0, 0, 6]),
            (3, 4) => {
                let mtu = u32::from(u16::from_be_bytes([rest[2], rest[3]]));
                if mtu == 0 {
                    Pass
                } else {
                    To(2, 0, (mtu + 20).to_be_bytes())
                }
            }
            (11, 0 | 1) => To(3, code, [0; 4]),
            // Host precedence violation and unlisted codes.
            (3 | 11, _) => Drop,
            // IPv4 header offsets → IPv6's (identification, flags, fragment offset and
            // checksum have none).
            (12, 0 | 2) => match rest[0] {
                p @ (0 | 1) => To(4, 0, [0, 0, 0, p]),
                2 | 3 => To(4, 0, [0, 0, 0, 4]),
                8 => To(4, 0, [0, 0, 0, 7]),
                9 => To(4, 0, [0, 0, 0, 6]),
                12..=15 => To(4, 0, [0, 0, 0, 8]),
                16..=19 => To(4, 0, [0, 0, 0, 24]),
                _ => Drop,
            },
            (12, _) => Drop,
            _ => Pass,
        }
    }
}

/// An ICMP error about a NAT46/64 flow: from the backend side (to `client`, the client and
/// its port; the VIP and its port as `vip`), translated to the client's family; from the
/// client side (to `client`, the backend and its port; `vip` the SNAT address and port, and
/// `q.backend` the client), translated to the backend's; or passed, or dropped.
fn check_icmp_xlat(
    input: &[u8],
    ip: &Ip,
    q: &Quote,
    out: &TestRunOutput,
    client: (IpAddr, u16),
    vip: (IpAddr, u16),
) -> Result<&'static str, String> {
    let v6 = ip.v6;
    let ty = input[ip.l4];
    let code = input[ip.l4 + 1];
    let rest: [u8; 4] = input[ip.l4 + 4..ip.l4 + 8].try_into().unwrap();
    let plain = ip.l3 == 14 && ip.l4 == 14 + if v6 { 40 } else { 20 };
    let quote_plain = v6 || input[q.l3] & 0x0f == 5;
    let mapped = if plain && quote_plain {
        xlat_icmp_type(v6, ty, code, rest)
    } else {
        XlatIcmp::Pass
    };
    let (nty, ncode, nrest) = match mapped {
        XlatIcmp::To(t, c, r) => (t, c, r),
        XlatIcmp::Pass => {
            unchanged(input, out)?;
            return Ok("passed_icmp_xlat_unsupported");
        }
        XlatIcmp::Drop if ipv4_header_ok(input, ip) => {
            if out.verdict != verdict::DROP {
                return Err(format!(
                    "untranslatable parameter problem: want XDP_DROP, got {}",
                    verdict::name(out.verdict)
                ));
            }
            return Ok("dropped_icmp_xlat");
        }
        XlatIcmp::Drop => (0, 0, [0; 4]),
    };
    if !ipv4_header_ok(input, ip) || ip.ttl <= 1 {
        unchanged(input, out)?;
        return Ok("passed_icmp_checks");
    }
    // The outer source: the VIP for the backend's own error; a router's IPv4 address in
    // the prefix; a router's IPv6 address inside the prefix as its IPv4 address, else the
    // VIP.
    let from = match ip.src {
        a if a == q.backend => vip.0,
        IpAddr::V4(a) => IpAddr::V6(Ipv6Addr::from(embed(a.octets()))),
        IpAddr::V6(a) => {
            let o = a.octets();
            if o[..12] == embed([0; 4])[..12] {
                IpAddr::V4(Ipv4Addr::new(o[12], o[13], o[14], o[15]))
            } else {
                vip.0
            }
        }
    };
    let new_len = if v6 {
        ip.ip_end - ip.l3 - 40
    } else {
        ip.ip_end - ip.l3 + 40
    };
    match hop_to(client.0) {
        Hop::NoRoute => {
            if out.verdict != verdict::DROP {
                return Err(format!(
                    "ICMP toward {} (no route): want XDP_DROP, got {}",
                    client.0,
                    verdict::name(out.verdict)
                ));
            }
            return Ok("dropped_no_route");
        }
        Hop::NoNeigh | Hop::Unsure if out.verdict != verdict::REDIRECT => {
            if out.verdict == verdict::PASS {
                unchanged(input, out)?;
            }
            return Ok("passed_no_neighbour");
        }
        _ => {}
    }
    // A source no route may come from (an embedded address such as 127.0.0.1).
    if martian(from) && out.verdict == verdict::DROP {
        return Ok("dropped_martian_source");
    }
    if new_len > MTU {
        unchanged(input, out)?;
        return Ok("icmp_error_passed_to_fragment");
    }
    // The expected frame, built from scratch in the client's family but for the quoted
    // transport checksum and the ICMP checksum (checked below).
    let o = &out.packet;
    let shift = if v6 { -40isize } else { 40 };
    if o.len() as isize != input.len() as isize + shift {
        return Err(format!(
            "translated ICMP error of {} bytes from {}, want {}",
            o.len(),
            input.len(),
            input.len() as isize + shift
        ));
    }
    let mut want = o[..12].to_vec();
    let tos = if v6 {
        (input[ip.l3] << 4) | (input[ip.l3 + 1] >> 4)
    } else {
        input[ip.l3 + 1]
    };
    // The quoted packet's total length in the client's family, from its length field as
    // the program reads it (saturating, a quote may carry any value).
    let q_len = if v6 {
        usize::from(u16::from_be_bytes([input[q.l3 + 4], input[q.l3 + 5]]).saturating_add(20))
    } else {
        usize::from(u16::from_be_bytes([input[q.l3 + 2], input[q.l3 + 3]]).saturating_sub(20)) + 40
    };
    let q_tos = if v6 {
        (input[q.l3] << 4) | (input[q.l3 + 1] >> 4)
    } else {
        input[q.l3 + 1]
    };
    let (q_ttl, q_proto) = if v6 {
        (input[q.l3 + 7], input[q.l3 + 6])
    } else {
        (input[q.l3 + 8], input[q.l3 + 9])
    };
    let header =
        |want: &mut Vec<u8>, tos: u8, len: usize, ttl: u8, proto: u8, s: IpAddr, d: IpAddr| {
            let start = want.len();
            if v6 {
                // Toward IPv4.
                want.extend_from_slice(&[0x45, tos]);
                want.extend_from_slice(&(len as u16).to_be_bytes());
                want.extend_from_slice(&[0, 0, 0x40, 0, ttl, proto, 0, 0]);
                want.extend_from_slice(&octets(s));
                want.extend_from_slice(&octets(d));
                let c = !fold(ones_sum(&want[start..start + 20], 0));
                want[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
            } else {
                want.extend_from_slice(&[0x60 | tos >> 4, tos << 4, 0, 0]);
                want.extend_from_slice(&((len - 40) as u16).to_be_bytes());
                want.extend_from_slice(&[proto, ttl]);
                want.extend_from_slice(&octets(s));
                want.extend_from_slice(&octets(d));
            }
        };
    want.extend_from_slice(if v6 { &[0x08, 0x00] } else { &[0x86, 0xdd] });
    let l3 = want.len();
    header(
        &mut want,
        tos,
        new_len,
        ip.ttl - 1,
        if v6 { ICMP4 } else { ICMP6 },
        from,
        client.0,
    );
    let l4 = want.len();
    want.extend_from_slice(&[nty, ncode, 0, 0]);
    want.extend_from_slice(&nrest);
    let nq3 = want.len();
    header(&mut want, q_tos, q_len, q_ttl, q_proto, client.0, vip.0);
    let nq4 = want.len();
    want.extend_from_slice(&client.1.to_be_bytes());
    want.extend_from_slice(&vip.1.to_be_bytes());
    want.extend_from_slice(&input[q.l4 + 4..]);
    // The quoted transport checksum, when the quote holds it: an incremental update
    // (RFC 1624) for the new addresses and ports; UDP's 0 (IPv4) stays 0.
    let qc = q.l4 + if q.proto == TCP { 16 } else { 6 };
    if qc + 2 <= ip.ip_end {
        let old = u16::from_be_bytes([input[qc], input[qc + 1]]);
        let mut acc = u64::from(!old);
        for (from, to) in [
            (
                &input[q.l3 + if v6 { 8 } else { 12 }..q.l4],
                &want[nq3 + if v6 { 12 } else { 8 }..nq4],
            ),
            (&input[q.l4..q.l4 + 4], &want[nq4..nq4 + 4]),
        ] {
            for w in from.chunks(2) {
                acc += u64::from(!u16::from_be_bytes([w[0], w[1]]));
            }
            for w in to.chunks(2) {
                acc += u64::from(u16::from_be_bytes([w[0], w[1]]));
            }
        }
        let mut new = !fold(acc);
        if q.proto == UDP && new == 0 {
            new = 0xffff;
        }
        if q.proto == UDP && old == 0 {
            new = 0;
        }
        let at = nq4 + (qc - q.l4);
        want[at..at + 2].copy_from_slice(&new.to_be_bytes());
    }
    // The ICMP checksum: right exactly as before (ICMPv6's with its pseudo-header).
    want[l4 + 2..l4 + 4].copy_from_slice(&o[l4 + 2..l4 + 4]);
    let ip_end = l3 + new_len;
    let sum = |p: &[u8], at_l4: usize, end: usize, six: bool, s: IpAddr, d: IpAddr| {
        let acc = if six {
            pseudo(&octets(s), &octets(d), ICMP6, end - at_l4)
        } else {
            0
        };
        sums_to_ones(&p[at_l4..end], acc)
    };
    if sum(input, ip.l4, ip.ip_end, v6, ip.src, ip.dst)
        != sum(&want, l4, ip_end, !v6, from, client.0)
    {
        return Err("translated ICMP error: its checksum".into());
    }
    if want != *o {
        let at = want.iter().zip(o).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "translated ICMP error differs at byte {at}: want {:02x?}, got {:02x?}",
            &want[at.saturating_sub(4)..(at + 8).min(want.len())],
            &o[at.saturating_sub(4)..(at + 8).min(o.len())]
        ));
    }
    match check_sent(out, client.0)? {
        "sent" => Ok("icmp_error_xlat"),
        other => Ok(other),
    }
}
