//! Types shared between the XDP program (`portico-xdp-ebpf`) and its userspace loader
//! (`portico-xdp`). Everything here is `#[repr(C)]` plain data with explicit padding, so
//! both sides agree on the layout byte for byte. Addresses and ports are kept in network
//! byte order exactly as they sit in the packet. An address is an [`Addr`]: four 32-bit
//! words, so keys are word-aligned and the program copies and compares them a word at a
//! time; an IPv4 address is word 0 and the other words are zero.
#![no_std]

/// An IPv4 or IPv6 address as it sits in the packet, as four words: word `i` holds bytes
/// `4i..4i+4` in memory order (read with `from_ne_bytes`). IPv4 uses word 0 only.
pub type Addr = [u32; 4];

/// The [`Addr`] of 16 bytes in network order.
pub fn addr_from_octets(o: [u8; 16]) -> Addr {
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// The [`Addr`] of an IPv4 address's 4 bytes.
pub fn addr_from_v4(o: [u8; 4]) -> Addr {
    [u32::from_ne_bytes(o), 0, 0, 0]
}

/// The 16 bytes, in network order, of an [`Addr`].
pub fn addr_octets(a: &Addr) -> [u8; 16] {
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    o
}

/// IPv4-embedded IPv6 addresses (RFC 6052 §2.2), for the NAT46/64 prefix
/// ([`Config::xlat_prefix`], [`Config::xlat_prefix_len`]): pure functions the program and
/// the loader share. A prefix is given by its first 96 bits (`[u32; 3]`, words as in
/// [`Addr`]; every allowed length fits in them) and its length.
///
/// Layout: the IPv4 address follows the prefix, but bits 64–71 (the "u" octet) are never
/// part of it: for a /40, /48 or /56 the address is split around them, for a /64 it starts
/// after them; the bits after the address (the suffix) are zero. A /96 holds the address
/// in its last 32 bits.
pub mod rfc6052 {
    use crate::Addr;

    /// The prefix lengths RFC 6052 allows.
    pub const LENGTHS: [u8; 6] = [32, 40, 48, 56, 64, 96];

    /// The address as two big-endian halves: bits 0–63 and 64–127.
    #[inline(always)]
    fn halves(a: &[u32; 3], last: u32) -> (u64, u64) {
        let be = |w: u32| u64::from(u32::from_be(w));
        ((be(a[0]) << 32) | be(a[1]), (be(a[2]) << 32) | be(last))
    }

    /// `(1 << n) - 1` for `n` in 0..=32.
    #[inline(always)]
    fn ones(n: u32) -> u64 {
        (1u64 << n) - 1
    }

    /// The IPv6 address embedding the IPv4 address `v4` (network order, as [`Addr`] word 0)
    /// in the prefix (`prefix`, `len`). A length RFC 6052 does not allow is read as 96.
    #[inline(always)]
    pub fn embed(prefix: &[u32; 3], len: u8, v4: u32) -> Addr {
        let v = u64::from(u32::from_be(v4));
        let (phi, plo) = halves(prefix, 0);
        let (hi, lo) = if matches!(len, 32 | 40 | 48 | 56 | 64) {
            // `k` bits of the address in the first half, the other `32 - k` after the u
            // octet (the second half's top 8 bits).
            let k = 64 - u32::from(len);
            let hi = (phi & !ones(k)) | (v >> (32 - k));
            (hi, (v & ones(32 - k)) << (24 + k))
        } else {
            (phi, (plo & !ones(32)) | v)
        };
        [
            ((hi >> 32) as u32).to_be(),
            (hi as u32).to_be(),
            ((lo >> 32) as u32).to_be(),
            (lo as u32).to_be(),
        ]
    }

    /// The IPv4 address (network order) that `a` embeds, when `a` lies in the prefix
    /// (`prefix`, `len`) and its u octet is zero (an address whose u octet is set is no
    /// IPv4-embedded address); the suffix is ignored. A length RFC 6052 does not allow is
    /// read as 96.
    #[inline(always)]
    pub fn extract(a: &Addr, prefix: &[u32; 3], len: u8) -> Option<u32> {
        let (hi, lo) = halves(&[a[0], a[1], a[2]], a[3]);
        let (phi, plo) = halves(prefix, 0);
        let v = if matches!(len, 32 | 40 | 48 | 56 | 64) {
            let k = 64 - u32::from(len);
            if (hi ^ phi) >> k != 0 || lo >> 56 != 0 {
                return None;
            }
            ((hi & ones(k)) << (32 - k)) | ((lo >> (24 + k)) & ones(32 - k))
        } else {
            if hi != phi || (lo ^ plo) >> 32 != 0 {
                return None;
            }
            lo & ones(32)
        };
        Some((v as u32).to_be())
    }
}

/// ICMP ↔ ICMPv6 error translation (RFC 7915 §4.2 and §5.2): pure functions of the type,
/// code and the 4 bytes after the checksum, for the program and the tests.
pub mod rfc7915 {
    /// What an ICMP error becomes in the other family.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Mapped {
        /// This type, code and 4 bytes after the checksum.
        Send(u8, u8, [u8; 4]),
        /// Not translated, passed to the stack (types the balancer leaves alone).
        Pass,
        /// Dropped: RFC 7915 says to drop it (a parameter problem of an untranslatable code,
        /// or whose pointer names a field the other family lacks).
        Drop,
    }

    /// An IPv4 header's field offset (a parameter problem's pointer) → the IPv6 header's
    /// (RFC 7915 §4.2, Figure 3), or `None` for fields IPv6 lacks.
    #[inline(always)]
    pub fn pointer_to_v6(p: u8) -> Option<u8> {
        match p {
            0 | 1 => Some(p),
            2 | 3 => Some(4),
            8 => Some(7),
            9 => Some(6),
            12..=15 => Some(8),
            16..=19 => Some(24),
            _ => None,
        }
    }

    /// An IPv6 header's field offset → the IPv4 header's (RFC 7915 §5.2, Figure 6), or
    /// `None` for fields IPv4 lacks.
    #[inline(always)]
    pub fn pointer_to_v4(p: u32) -> Option<u8> {
        match p {
            0 | 1 => Some(p as u8),
            4 | 5 => Some(2),
            6 => Some(9),
            7 => Some(8),
            8..=23 => Some(12),
            24..=39 => Some(16),
            _ => None,
        }
    }

    /// ICMPv6 (type, code, the 4 bytes after the checksum) → ICMP.
    #[inline(always)]
    pub fn to_v4(ty: u8, code: u8, rest: [u8; 4]) -> Mapped {
        match (ty, code) {
            // Destination unreachable: no route, beyond scope, address → host unreachable;
            // administratively prohibited → communication administratively prohibited;
            // port.
            (1, 0 | 2 | 3) => Mapped::Send(3, 1, [0; 4]),
            (1, 1) => Mapped::Send(3, 10, [0; 4]),
            (1, 4) => Mapped::Send(3, 3, [0; 4]),
            // Packet too big → fragmentation needed, the MTU less the 20 bytes IPv6 adds.
            (2, 0) => {
                let mtu = u32::from_be_bytes(rest).saturating_sub(20).min(0xffff) as u16;
                let m = mtu.to_be_bytes();
                Mapped::Send(3, 4, [0, 0, m[0], m[1]])
            }
            (3, 0 | 1) => Mapped::Send(11, code, [0; 4]),
            // Codes RFC 7915 does not list (destination unreachable 5 and up, e.g. source
            // address failed policy, reject route) are silently dropped.
            (1 | 3, _) => Mapped::Drop,
            // Parameter problem: an erroneous header field, its pointer mapped; an
            // unrecognized next header → protocol unreachable; the rest dropped.
            (4, 0) => match pointer_to_v4(u32::from_be_bytes(rest)) {
                Some(p) => Mapped::Send(12, 0, [p, 0, 0, 0]),
                None => Mapped::Drop,
            },
            (4, 1) => Mapped::Send(3, 2, [0; 4]),
            (4, _) => Mapped::Drop,
            _ => Mapped::Pass,
        }
    }

    /// ICMP (type, code, the 4 bytes after the checksum) → ICMPv6.
    #[inline(always)]
    pub fn to_v6(ty: u8, code: u8, rest: [u8; 4]) -> Mapped {
        match (ty, code) {
            (3, 0 | 1 | 5 | 6 | 7 | 8 | 11 | 12) => Mapped::Send(1, 0, [0; 4]),
            (3, 9 | 10 | 13 | 15) => Mapped::Send(1, 1, [0; 4]),
            (3, 3) => Mapped::Send(1, 4, [0; 4]),
            // Protocol unreachable → parameter problem, unrecognized next header, pointing
            // at the next header field (offset 6).
            (3, 2) => Mapped::Send(4, 1, [0, 0, 0, 6]),
            // Fragmentation needed → packet too big, the MTU plus the 20 bytes IPv6 adds
            // (an MTU of 0: no plateau guessing, passed).
            (3, 4) => {
                let mtu = u16::from_be_bytes([rest[2], rest[3]]);
                if mtu == 0 {
                    return Mapped::Pass;
                }
                Mapped::Send(2, 0, (u32::from(mtu) + 20).to_be_bytes())
            }
            (11, 0 | 1) => Mapped::Send(3, code, [0; 4]),
            // Host precedence violation (14) and codes RFC 7915 does not list are silently
            // dropped.
            (3 | 11, _) => Mapped::Drop,
            // Parameter problem: pointer indicates the error, or bad length → erroneous
            // header field, its pointer mapped; missing a required option and the rest
            // dropped.
            (12, 0 | 2) => match pointer_to_v6(rest[0]) {
                Some(p) => Mapped::Send(4, 0, [0, 0, 0, p]),
                None => Mapped::Drop,
            },
            (12, _) => Mapped::Drop,
            _ => Mapped::Pass,
        }
    }
}

/// Address family tags used in keys (not the kernel's AF_* numbers).
pub mod family {
    /// IPv4.
    pub const V4: u8 = 4;
    /// IPv6.
    pub const V6: u8 = 6;
}

/// IP protocol numbers the balancer handles.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Indices into [`StatBlock::counts`] (the per-CPU `STATS` map): global counters and verdict
/// reasons.
pub mod stat {
    // The counters every forwarded packet bumps come first: one cache line.
    /// Every packet the program saw.
    pub const PACKETS: u32 = 0;
    /// Bytes of every packet the program saw: L2 header plus the IP length (fragments of
    /// multi-buffer frames included, Ethernet padding not); the linear length when not IP.
    pub const BYTES: u32 = 1;
    /// Conntrack: lookup hit.
    pub const CT_HIT: u32 = 2;
    /// Sent back out the receiving interface.
    pub const TX: u32 = 3;
    /// Redirected to another interface.
    pub const REDIRECT: u32 = 4;
    /// Replies reverse-translated.
    pub const REPLY_NAT: u32 = 5;
    /// Conntrack: lookup missed (new flow, or evicted/expired entry).
    pub const CT_MISS: u32 = 6;
    /// Conntrack: a new flow was tracked (in `CONNTRACK_NEW` until confirmed, in
    /// `CONNTRACK` at once when it re-opened a closed 5-tuple on its port).
    pub const CT_INSERT: u32 = 7;
    /// Passed: not IP, or not addressed to a VIP or a SNAT port.
    pub const PASS_NOT_VIP: u32 = 8;
    /// Passed: truncated or malformed header (the stack decides).
    pub const PASS_MALFORMED: u32 = 9;
    /// Passed: IP fragment not to a VIP or the SNAT address, or whose first fragment's flow is
    /// not tracked (not balanced, or not a reply).
    pub const PASS_FRAGMENT: u32 = 10;
    /// Passed: TTL/hop limit would expire (the stack sends Time Exceeded).
    pub const PASS_TTL: u32 = 11;
    /// Passed after rewrite: the kernel has no neighbour entry for the next hop yet.
    pub const PASS_NO_NEIGH: u32 = 12;
    /// Dropped: the service has no backend with weight (all draining or none).
    pub const DROP_NO_BACKEND: u32 = 13;
    /// Dropped: no free SNAT port after bounded probing.
    pub const DROP_NO_SNAT_PORT: u32 = 14;
    /// Dropped: no route to the backend or client.
    pub const DROP_NO_ROUTE: u32 = 15;
    /// Passed: a VIP packet the program does not handle (an IPv6 jumbogram; a backend of the
    /// other family).
    pub const PASS_UNSUPPORTED: u32 = 16;
    /// ICMP errors quoting a tracked flow, translated.
    pub const ICMP_ERROR_NAT: u32 = 17;
    /// Echo requests to a VIP answered.
    pub const ICMP_ECHO_REPLY: u32 = 18;
    /// Passed untouched: an IP length field disagrees with the frame (IPv4 total length
    /// beyond the frame or shorter than the headers, IPv6 payload length beyond the frame or
    /// 0 without a hop-by-hop header, UDP length beyond the IP payload). The stack drops it.
    pub const PASS_BAD_LENGTH: u32 = 19;
    /// Passed untouched: IPv4 header checksum wrong (the stack drops it, `InCsumErrors`).
    pub const PASS_BAD_CSUM: u32 = 20;
    /// Passed untouched: IPv6 routing header with segments left, so the VIP is not the
    /// final destination.
    pub const PASS_ROUTING_HEADER: u32 = 21;
    /// Passed untouched: the L4 header ends past the bytes the program parses (512).
    pub const PASS_LONG_HEADERS: u32 = 22;
    /// Too big for the next hop's MTU with DF (always, for IPv6): answered with ICMP
    /// fragmentation needed / ICMPv6 packet too big, in place of the packet.
    pub const ICMP_TOO_BIG: u32 = 23;
    /// Dropped: too big for the next hop, and the per-CPU ICMP rate limit was reached.
    pub const DROP_TOO_BIG: u32 = 24;
    /// Passed after rewrite: IPv4 without DF bigger than the next hop's MTU; the stack
    /// fragments it.
    pub const PASS_NEEDS_FRAG: u32 = 25;
    /// Of the `ct_hit` packets, those that missed this CPU's flow cache and were looked up
    /// in `CONNTRACK`: the cache's hit rate is `1 - ct_slow / ct_hit`.
    pub const CT_SLOW: u32 = 26;
    /// Conntrack: an unconfirmed flow was confirmed (its second packet, a TCP packet other
    /// than a SYN) and moved to `CONNTRACK`.
    pub const CT_CONFIRM: u32 = 27;
    /// A first fragment (offset 0, more to come) to a VIP or the SNAT address: its ports
    /// were remembered in `FRAGS` for the fragments after it, and it went the way of an
    /// unfragmented packet.
    pub const FRAG_HEAD: u32 = 28;
    /// A later fragment translated as its first fragment's flow was (addresses, TTL / hop
    /// limit) and sent.
    pub const FRAG_NAT: u32 = 29;
    /// Dropped: a later fragment to a VIP whose first fragment was not seen (yet): its ports,
    /// and so its backend, are unknown (docs/xdp.md, "Fragments").
    pub const DROP_FRAG_NO_HEAD: u32 = 30;
    /// SCTP packets whose ports were rewritten, their CRC32c updated.
    pub const SCTP_CRC: u32 = 31;
    /// Packets translated between IPv4 and IPv6 (NAT46 toward an IPv6 backend of an IPv4
    /// VIP, NAT64 the other way, and their replies).
    pub const XLAT: u32 = 32;
    /// Packets of direct-server-return services sent to their backend inside an outer
    /// header (IPIP, IP6IP6, 4in6, 6in4 or GUE).
    pub const DSR_ENCAP: u32 = 33;
    /// Dropped: an IPv4 UDP datagram without a checksum toward IPv6 (which needs one) whose
    /// payload the program could not read to sum (not expected once its lengths were
    /// checked).
    pub const DROP_XLAT_NO_CSUM: u32 = 34;
    /// Dropped: an ICMP error about a NAT46/64 flow that RFC 7915 says to drop rather than
    /// translate (a parameter problem whose code or pointer the other family lacks).
    pub const DROP_XLAT_ICMP: u32 = 35;
    /// Passed to the stack to be segmented there: a GSO packet (CHECKSUM_PARTIAL, seen by
    /// generic XDP only) rewritten toward its backend or client, bigger than the next hop's
    /// MTU (a redirect of it would fail).
    pub const PASS_GSO: u32 = 36;
    /// Conntrack: lookups skipped because the presence filter (`crate::ct_filter`) proved
    /// the 5-tuple untracked (most new flows' first packets).
    pub const CT_FILTERED: u32 = 37;
    /// Entries inserted into `CONNTRACK` and `REV_NAT`, each of which set its bits in the
    /// table's presence filter: the node rebuilds the filters when these outgrow them.
    pub const FLOW_TABLE_INSERTS: u32 = 38;
    /// Number of counters in a [`crate::StatBlock`].
    pub const COUNT: u32 = 39;

    /// Each counter's name, by index, as status and metrics show it.
    pub const NAMES: [&str; COUNT as usize] = [
        "packets",
        "bytes",
        "ct_hit",
        "tx",
        "redirect",
        "reply_nat",
        "ct_miss",
        "ct_insert",
        "pass_not_vip",
        "pass_malformed",
        "pass_fragment",
        "pass_ttl",
        "pass_no_neigh",
        "drop_no_backend",
        "drop_no_snat_port",
        "drop_no_route",
        "pass_unsupported",
        "icmp_error_nat",
        "icmp_echo_reply",
        "pass_bad_length",
        "pass_bad_csum",
        "pass_routing_header",
        "pass_long_headers",
        "icmp_too_big",
        "drop_too_big",
        "pass_needs_frag",
        "ct_slow",
        "ct_confirm",
        "frag_head",
        "frag_nat",
        "drop_frag_no_head",
        "sctp_crc",
        "xlat",
        "dsr_encap",
        "drop_xlat_no_csum",
        "drop_xlat_icmp",
        "pass_gso",
        "ct_filtered",
        "flow_table_inserts",
    ];
}

/// Names of the maps, as the loader looks them up in the object file.
pub mod map_name {
    /// Per-CPU global counters: one [`crate::StatBlock`] at index 0.
    pub const STATS: &str = "STATS";
    /// Node configuration, one [`crate::Config`] at index 0.
    pub const CONFIG: &str = "CONFIG";
    /// VIP listeners: [`crate::VipKey`] → [`crate::Service`].
    pub const SERVICES: &str = "SERVICES";
    /// Maglev rings, `2 · M` slots per service (double buffer), values are backend ids.
    pub const RINGS: &str = "RINGS";
    /// Backends by id: [`crate::Backend`].
    pub const BACKENDS: &str = "BACKENDS";
    /// Connection tracking: [`crate::FlowKey`] → [`crate::Flow`] (LRU).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Connection tracking of unconfirmed flows: as `CONNTRACK`.
    pub const CONNTRACK_NEW: &str = "CONNTRACK_NEW";
    /// Reverse NAT: reply [`crate::FlowKey`] → [`crate::RevNat`] (LRU), confirmed flows.
    pub const REV_NAT: &str = "REV_NAT";
    /// Reverse NAT of unconfirmed flows (one packet seen from the client): as `REV_NAT`.
    pub const REV_NAT_NEW: &str = "REV_NAT_NEW";
    /// Per-service per-CPU counters: [`crate::Counters`] by service id.
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// Per-backend per-CPU counters: [`crate::Counters`] by backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// Per-service per-CPU drop counters: `u64` packets by service id.
    pub const SERVICE_DROPS: &str = "SERVICE_DROPS";
    /// Per-CPU exact-match cache of tracked flows: [`crate::FlowCacheEntry`] by hash.
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    /// Per-CPU exact-match cache of reverse NAT: [`crate::ReplyCacheEntry`] by hash.
    pub const REPLY_CACHE: &str = "REPLY_CACHE";
    /// Bitmap of VIP addresses: [`crate::VIP_FILTER_WORDS`] words, see
    /// [`crate::vip_filter_bit`].
    pub const VIP_FILTER: &str = "VIP_FILTER";
    /// Fragment tracking: [`crate::FragKey`] → [`crate::FragEntry`] (LRU), filled from first
    /// fragments.
    pub const FRAGS: &str = "FRAGS";
    /// Interfaces whose packets may be CHECKSUM_PARTIAL: ifindex (`u32`) → 1, written by
    /// `XdpProgram::mark_generic` (an opt-in). Not pinned.
    pub const GENERIC_IFACES: &str = "GENERIC_IFACES";
    /// How many interfaces `GENERIC_IFACES` holds (`Array<u32>`, one entry): while 0 no
    /// packet pays the pseudo-header check. Not pinned.
    pub const GENERIC_ANY: &str = "GENERIC_ANY";
    /// Presence filter of `CONNTRACK` (`u64` words, see [`crate::ct_filter`]).
    pub const CT_FILTER: &str = "CT_FILTER";
    /// Presence filter of `REV_NAT`, as `CT_FILTER`.
    pub const RN_FILTER: &str = "RN_FILTER";
}

/// Layout version of the maps the loader pins in bpffs (all but the per-CPU scratch and
/// caches), which a restarted loader reuses. Sizes are checked on their own; bump this when
/// a pinned map's key or value changes meaning at the same size, so that a new build refuses
/// the old pins instead of misreading them.
pub const PINNED_LAYOUT_VERSION: u32 = 3;

/// Name of the XDP entry point in the object file.
pub const PROGRAM_NAME: &str = "portico_xdp";
/// Name of the benchmark floor program (swap MACs, XDP_TX) in the same object.
pub const FLOOR_PROGRAM_NAME: &str = "xdp_floor";
/// Name of the probe that returns the kernel's jiffies (the loader measures HZ with it).
pub const JIFFIES_PROGRAM_NAME: &str = "xdp_jiffies";
/// Name of the forwarding benchmark's floor (`forward_bench`): a minimal XDP NAT that
/// rewrites IPv4 UDP toward backend ids 1 to 3 and redirects, with no flow state.
pub const FORWARD_FLOOR_PROGRAM_NAME: &str = "xdp_forward_floor";
/// Name of the forwarding benchmark's sink: counts each packet (`stat::PACKETS`) and drops
/// it.
pub const SINK_PROGRAM_NAME: &str = "xdp_sink";

/// Default number of service slots (ids 1..MAX_SERVICES-1; id 0 means unset).
pub const DEFAULT_MAX_SERVICES: u32 = 256;
/// Default number of backend slots (ids 1..MAX_BACKENDS-1; id 0 means unset).
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;

/// Global counters of one CPU: the single entry of the per-CPU `STATS` map, so a packet
/// looks its CPU's block up once and bumps counters by index.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatBlock {
    /// Counters, indexed by [`stat`].
    pub counts: [u64; stat::COUNT as usize],
}

// By hand: `Default` is derived for arrays of at most 32 elements.
impl Default for StatBlock {
    fn default() -> Self {
        Self {
            counts: [0; stat::COUNT as usize],
        }
    }
}

/// Words (64 bits each) of the `VIP_FILTER` bitmap.
pub const VIP_FILTER_WORDS: u32 = 1024;

/// The bit of the `VIP_FILTER` bitmap that stands for a VIP address: packets to an address
/// whose bit is clear pass without a hash-map lookup; a set bit means "maybe a VIP" (two
/// addresses may share a bit). Identical in the program and the loader.
#[inline(always)]
pub fn vip_filter_bit(fam: u8, a: &Addr) -> u32 {
    let x = (a[0] ^ a[1] ^ a[2] ^ a[3] ^ u32::from(fam)).wrapping_mul(0x9e37_79b1);
    // Top 16 bits: 1024 words of 64 bits.
    x >> 16
}

/// The bit of the `VIP_FILTER` bitmap that stands for a backend address of a service that
/// keeps client sources ([`service_flags::PRESERVE_SOURCE`]): its replies are addressed to
/// the client, not to a VIP or the SNAT address, so the filter also knows their sources. A
/// set bit means "maybe such a backend"; a VIP sharing the bit only costs a lookup.
#[inline(always)]
pub fn source_filter_bit(fam: u8, a: &Addr) -> u32 {
    vip_filter_bit(fam | 0x80, a)
}

/// Node-wide configuration (map `CONFIG`, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// SNAT source for IPv4 backends (network order, as [`Addr`] word 0).
    pub snat_v4: u32,
    /// Maglev table size M (prime); every ring has M slots.
    pub ring_size: u32,
    /// SNAT source for IPv6 backends.
    pub snat_v6: Addr,
    /// Lowest SNAT source port (host order).
    pub snat_port_min: u16,
    /// Highest SNAT source port (host order).
    pub snat_port_max: u16,
    /// Seed of the flow hash; the same on every node so ECMP-shifted flows land alike.
    pub hash_seed: u32,
    /// [`config_flags`].
    pub flags: u32,
    /// Kernel ticks per second (HZ), measured by the loader. The program keeps time in
    /// jiffies: `bpf_jiffies64` is inlined into one load, the cheapest clock there is.
    pub hz: u32,
    /// Idle timeout of tracked TCP flows, in jiffies.
    pub tcp_timeout: u32,
    /// Idle timeout of tracked UDP flows, in jiffies.
    pub udp_timeout: u32,
    /// Life of a TCP flow after FIN or RST, in jiffies.
    pub tcp_closing_timeout: u32,
    /// Entries of the per-CPU flow cache minus one (a power of two minus one).
    pub flow_cache_mask: u32,
    /// Bumped by the loader to invalidate every per-CPU cached copy at once (a service was
    /// removed).
    pub cache_epoch: u32,
    /// The RFC 6052 prefix (its first 96 bits, the bits past its length zero) that embeds
    /// an IPv4 address in IPv6 for NAT46/64 ICMP errors from routers of the other family
    /// (default 64:ff9b::/96); see [`rfc6052`].
    pub xlat_prefix: [u32; 3],
    /// Outer IPv4 source of direct server return (network order, as [`Addr`] word 0); the
    /// bits set in `dsr_v4_mask` come from the flow hash. 0: the SNAT address.
    pub dsr_v4: u32,
    /// Bits of the outer IPv4 source taken from the flow hash (network order).
    pub dsr_v4_mask: u32,
    /// Outer IPv6 source of direct server return; 0: the SNAT address.
    pub dsr_v6: Addr,
    /// Bits of the outer IPv6 source's last word taken from the flow hash (network order).
    pub dsr_v6_mask: u32,
    /// GUE destination port toward the backends, network order.
    pub gue_port: u16,
    /// The length of [`Config::xlat_prefix`]: 32, 40, 48, 56, 64 or 96; 0 (a `CONFIG`
    /// written before it existed, in what was padding) means 96.
    pub xlat_prefix_len: u8,
    /// Explicit padding.
    pub _pad: u8,
}

/// The layout of the presence filters of `CONNTRACK` and `REV_NAT` (maps `CT_FILTER`,
/// `RN_FILTER`; docs/xdp.md, "New flows"): one bit per hash of a key, set by the program
/// after each insert into the table and never cleared by it, so a clear bit proves the key
/// has no entry and a new flow's first packet skips the lookup (a cold bucket of a large
/// table: `CONNTRACK`'s alone about a fifth of a SYN's cost). Two copies: the program sets
/// the bit in both and reads the active one; the loader rebuilds the idle one from the
/// table (size it, clear it, set the bits of the keys), then makes it the active one, so
/// bits of gone flows do not pile up. Each copy is sized to the table's entries at its
/// rebuild (eight bits per entry, at least [`MIN_WORDS_LOG2`]), not to its capacity: a
/// small filter stays in the CPU's caches. Word [`CONTROL`](ct_filter::CONTROL) holds
/// [`ENABLED`](ct_filter::ENABLED), the active copy, each copy's size and the room for one.
pub mod ct_filter {
    use crate::FlowKey;

    /// Index of the control word.
    pub const CONTROL: u32 = 0;
    /// Index of the first word of copy 0 (a cache line past the control word).
    pub const FIRST_WORD: u32 = 8;
    /// Control bit: the active copy holds every entry's bit (a rebuild made it so); while
    /// clear, every packet looks `CONNTRACK` up.
    pub const ENABLED: u64 = 1;
    /// Control bit: copy 1 is the active one.
    pub const ACTIVE_ONE: u64 = 2;
    /// Control bits: log2 of the words of copy 0 at this shift, of copy 1 at twice it, of
    /// the room for a copy (copy 1 starts that many words after copy 0) at three times it.
    pub const LOG2_SHIFT: u32 = 8;
    /// Filter bits per `CONNTRACK` entry: a table that holds as many entries as at the
    /// rebuild sets about one bit in eight (12 %), so most new flows skip the lookup.
    pub const BITS_PER_ENTRY: u64 = 8;
    /// The smallest copy: 2^10 words (8 KiB, 65,536 bits).
    pub const MIN_WORDS_LOG2: u32 = 10;

    /// Log2 of the room for one copy for a table of `entries` (its capacity).
    pub fn room_log2(entries: u32) -> u32 {
        words_log2_for(u64::from(entries))
    }

    /// Log2 of the words of a copy built for `entries` entries.
    pub fn words_log2_for(entries: u64) -> u32 {
        let words = entries.saturating_mul(BITS_PER_ENTRY).div_ceil(64).max(1);
        words
            .next_power_of_two()
            .trailing_zeros()
            .max(MIN_WORDS_LOG2)
    }

    /// Entries of the `CT_FILTER` array for a table of `entries`.
    pub fn map_entries(entries: u32) -> u32 {
        FIRST_WORD + (2u32 << room_log2(entries))
    }

    /// Log2 of the words of copy `copy` (0 or 1), from the control word.
    #[inline(always)]
    pub fn copy_log2(control: u64, copy: u32) -> u32 {
        ((control >> (LOG2_SHIFT * (1 + copy))) & 0x3f) as u32
    }

    /// Index of the first word of copy `copy`, from the control word.
    #[inline(always)]
    pub fn copy_start(control: u64, copy: u32) -> u32 {
        let room = ((control >> (LOG2_SHIFT * 3)) & 0x3f) as u32;
        FIRST_WORD + (copy << room)
    }

    /// A control word: copies of 2^`log2[0]` and 2^`log2[1]` words in rooms of 2^`room`.
    pub fn control(enabled: bool, active: u32, log2: [u32; 2], room: u32) -> u64 {
        (if enabled { ENABLED } else { 0 })
            | (if active != 0 { ACTIVE_ONE } else { 0 })
            | u64::from(log2[0]) << LOG2_SHIFT
            | u64::from(log2[1]) << (2 * LOG2_SHIFT)
            | u64::from(room) << (3 * LOG2_SHIFT)
    }

    /// The word (from the copy's start) and bit of `key` in a copy of 2^`words_log2` words:
    /// the high half of the flow cache's hash (the low half picks the cache slot).
    #[inline(always)]
    pub fn position(key: &FlowKey, words_log2: u32) -> (u32, u64) {
        let h = (key.cache_hash() >> 32) as u32;
        let b = h & (1u32 << words_log2 << 6).wrapping_sub(1);
        (b >> 6, 1u64 << (b & 63))
    }
}

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// Answer ICMP/ICMPv6 echo requests to VIPs in XDP (otherwise they pass to the stack).
    pub const ECHO_REPLY: u32 = 1;
    /// Some service keeps client sources ([`crate::service_flags::PRESERVE_SOURCE`]): packets
    /// from an address whose [`crate::source_filter_bit`] is set in `VIP_FILTER` may be
    /// replies of such a flow. Clear: that check costs nothing.
    pub const PRESERVED_SOURCES: u32 = 2;
}

/// The backends' decapsulation program (`portico_decap`, its own object) and its counters
/// (per-CPU array `DECAP_STATS`).
pub mod decap {
    /// Program name in the decapsulation object.
    pub const PROGRAM_NAME: &str = "portico_decap";
    /// Decapsulated and passed to the stack.
    pub const DECAPSULATED: u32 = 0;
    /// Not a tunnel packet (or GUE to another port): passed untouched.
    pub const PASS_NOT_TUNNEL: u32 = 1;
    /// A tunnel packet to an address that is not one of this host's tunnel addresses.
    pub const PASS_NOT_LOCAL: u32 = 2;
    /// A tunnel packet from a source that is not a known balancer.
    pub const PASS_UNKNOWN_PEER: u32 = 3;
    /// Outer header this program does not strip (IPv4 options, bad version or length).
    pub const PASS_MALFORMED: u32 = 4;
    /// A fragment of an outer IPv4 packet (the stack reassembles; no tunnel module here).
    pub const PASS_FRAGMENT: u32 = 5;
    /// From a known balancer, but the inner packet is not a whole IPv4/IPv6 packet of the
    /// family the outer header announces: dropped.
    pub const DROP_MALFORMED: u32 = 6;
    /// Number of counters.
    pub const COUNT: u32 = 7;
    /// Counter names by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "decapsulated",
        "pass_not_tunnel",
        "pass_not_local",
        "pass_unknown_peer",
        "pass_malformed",
        "pass_fragment",
        "drop_malformed",
    ];
}

/// Service lookup key: a VIP listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// VIP address.
    pub addr: Addr,
    /// Port, network order (0 for ICMP echo lookups).
    pub port: u16,
    /// IP protocol ([`proto`]).
    pub proto: u8,
    /// [`family`].
    pub family: u8,
}

/// A service (value of `SERVICES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Service id, 1..MAX_SERVICES; indexes rings and counters.
    pub id: u32,
    /// [`service_flags`].
    pub flags: u32,
    /// Which half of the double-buffered ring is live (0 or 1).
    pub ring_gen: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Bits of [`Service::flags`].
pub mod service_flags {
    /// Hash on the source address only (session affinity).
    pub const HASH_SRC_ONLY: u32 = 1;
    /// Keep the client's source address and port (`externalTrafficPolicy: Local`): the
    /// balancer only rewrites the destination toward a backend of the VIP's family, and no
    /// SNAT port is taken. The backend must route its replies back through this node, which
    /// translates their source back to the VIP.
    pub const PRESERVE_SOURCE: u32 = 2;
    /// Bits 8..16: the service's [`crate::encap`] mode (the datapath reads the copy in each
    /// [`crate::Backend`]; this one is for a restarted loader adopting the maps).
    pub const ENCAP_SHIFT: u32 = 8;
}

/// A backend (value of `BACKENDS`). `state == 0` means the slot is unused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address.
    pub addr: Addr,
    /// Backend port, network order.
    pub port: u16,
    /// [`family`].
    pub family: u8,
    /// [`backend_state`].
    pub state: u8,
    /// The service this backend id belongs to.
    pub service_id: u16,
    /// Bumped each time the id is given to a backend: a tracked flow follows its backend id
    /// only while service and generation still match, never to a backend that reused the id.
    pub generation: u16,
    /// Next hop toward the backend, cached here by the program for a second (in the same
    /// map value, so a forwarded packet reads one entry). The loader writes it empty.
    pub hop: NextHop,
    /// How packets reach this backend ([`encap`]): translated (NAT, 0) or, for direct
    /// server return, inside an outer header. A property of the backend's service, copied
    /// here so the forwarding paths read one map value.
    pub encap: u8,
    /// Explicit padding.
    pub _pad1: [u8; 3],
    /// Padding to a cache line (the array's values start page-aligned).
    pub _pad2: [u32; 3],
}

/// Values of [`Backend::encap`]: how a service's packets reach its backends.
pub mod encap {
    /// NAT: destination (and source) rewritten.
    pub const NAT: u8 = 0;
    /// Direct server return in an IP-in-IP header of the backend's family: IPIP (4in4),
    /// IP6IP6, 4in6 or 6in4, by the client's and the backend's families.
    pub const IPIP: u8 = 1;
    /// Direct server return in GUE (variant 1: UDP whose payload is the client's packet),
    /// the outer header of the backend's family.
    pub const GUE: u8 = 2;
}

/// Values of [`Backend::state`].
pub mod backend_state {
    /// Unused slot (removed backend): tracked flows to it are re-balanced.
    pub const UNUSED: u8 = 0;
    /// Takes new flows (when in the ring) and keeps tracked ones.
    pub const ACTIVE: u8 = 1;
    /// Weight 0: out of the ring; tracked flows continue.
    pub const DRAINING: u8 = 2;
}

/// A flow's 5-tuple as it arrives (conntrack and reverse-NAT key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: Addr,
    /// Destination address.
    pub dst: Addr,
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`family`].
    pub family: u8,
    /// Explicit padding (always zero).
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// Ports, protocol, family and padding as two words (one compare each).
    #[inline(always)]
    pub fn tail(&self) -> [u32; 2] {
        // SAFETY: `sport` starts 8 bytes of plain integers (`sport` to `_pad`) at offset 32
        // of a `repr(C)` struct aligned to 4.
        unsafe { *(&raw const self.sport).cast::<[u32; 2]>() }
    }

    /// The same flow seen from the other end: addresses and ports swapped.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }

    /// The hash that picks the 5-tuple's slot in the per-CPU caches: every bit of each
    /// address (folded to 64 bits), port and the protocol reaches every bit of the result,
    /// and for one destination (a VIP and port) IPv4 sources and ports map one to one onto
    /// 64-bit hashes, so slots collide only as chance has it.
    #[inline(always)]
    pub fn cache_hash(&self) -> u64 {
        #[inline(always)]
        fn fold(a: &Addr) -> u64 {
            (u64::from(a[0]) | u64::from(a[1]) << 32) ^ (u64::from(a[2]) << 32 | u64::from(a[3]))
        }
        let ports = u64::from(self.sport) << 48 | u64::from(self.dport) << 32;
        let dst = fold(&self.dst) ^ u64::from(self.proto);
        fmix64(fold(&self.src) ^ ports ^ dst.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
}

/// MurmurHash3's 64-bit finalizer: a bijection that spreads each input bit over the output.
#[inline(always)]
pub fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// A tracked flow (value of `CONNTRACK`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Chosen backend id.
    pub backend_id: u32,
    /// SNAT source port, network order.
    pub snat_port: u16,
    /// The service the flow was balanced for (its counters).
    pub service_id: u16,
    /// Last time a packet was seen (jiffies), refreshed at most once a second.
    pub last_seen: u64,
    /// [`Backend::generation`] of the backend when the flow was balanced.
    pub backend_gen: u16,
    /// [`flow_state`].
    pub state: u8,
    /// [`flow_flags`] (0 in entries written before it existed: their meaning is unchanged).
    pub flags: u8,
    /// In a per-CPU cached copy: [`Config::cache_epoch`] when it was made (a copy from
    /// another epoch is not used).
    pub epoch: u32,
}

/// An entry of the per-CPU flow cache (map `FLOW_CACHE`): a copy of a tracked flow, so that
/// most packets of an established flow skip the shared conntrack hash (an exact-match cache,
/// as Open vSwitch keeps per datapath thread). One cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheEntry {
    /// The flow's 5-tuple; all zero = empty.
    pub key: FlowKey,
    /// The conntrack entry as of `flow.last_seen`.
    pub flow: Flow,
}

/// Bits of [`Flow::flags`].
pub mod flow_flags {
    /// The flow keeps the client's source address and port toward its backend
    /// ([`crate::service_flags::PRESERVE_SOURCE`]); [`crate::Flow::snat_port`] is the client's
    /// port, and the flow's reverse entry is keyed by (backend, client).
    pub const PRESERVE_SOURCE: u8 = 1;
}

/// Values of [`Flow::state`].
pub mod flow_state {
    /// Open.
    pub const OPEN: u8 = 0;
    /// FIN or RST seen: the entry lives `tcp_closing_timeout_s` more.
    pub const CLOSING: u8 = 1;
}

/// What a reply is translated back to (value of `REV_NAT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    /// The client's address (the reply's new destination).
    pub client: Addr,
    /// The VIP (the reply's new source).
    pub vip: Addr,
    /// Client port, network order.
    pub client_port: u16,
    /// VIP port, network order.
    pub vip_port: u16,
    /// Service id (for counters).
    pub service_id: u16,
    /// The client's [`family`] when it differs from the backend's (NAT46/NAT64: the reply is
    /// translated to it); 0 when they are the same (entries written before NAT46/64 existed
    /// hold 0 here too).
    pub client_family: u8,
    /// Explicit padding.
    pub _pad: u8,
    /// Last time either direction of the flow looked this entry up (jiffies, refreshed at
    /// most once a second per CPU). The SNAT port is not reclaimed within two seconds of it,
    /// so no per-CPU cached copy of the flow outlives its port.
    pub last_seen: u64,
}

/// An entry of the per-CPU reply cache (map `REPLY_CACHE`): a copy of a reverse-NAT entry
/// and the next hop toward the client, so most replies skip the shared hash and the FIB.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplyCacheEntry {
    /// The reply's 5-tuple; all zero = empty.
    pub key: FlowKey,
    /// The reverse-NAT entry as of `rev.last_seen`.
    pub rev: RevNat,
    /// Next hop toward the client.
    pub hop: NextHop,
    /// [`Config::cache_epoch`] when the copy was made.
    pub epoch: u32,
    /// Padding to two cache lines.
    pub _pad: [u32; 3],
}

/// A fragmented datagram (key of `FRAGS`): addresses, protocol and identification (the
/// IPv4 header's 16 bits, or the IPv6 fragment header's 32, as they sit in the packet).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    /// Source address.
    pub src: Addr,
    /// Destination address.
    pub dst: Addr,
    /// Identification, network order (IPv4: the low 16 bits in memory order).
    pub id: u32,
    /// IP protocol (of the transport header the first fragment carries).
    pub proto: u8,
    /// [`family`].
    pub family: u8,
    /// Explicit padding (always zero).
    pub _pad: [u8; 2],
}

/// What the fragments after the first of a datagram need (value of `FRAGS`): the ports the
/// first fragment carried, which with the [`FragKey`] make the flow's 5-tuple.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragEntry {
    /// When the first fragment was seen (jiffies).
    pub seen: u64,
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// Explicit padding.
    pub _pad: u32,
}

/// Packet, byte and new-flow counters (per CPU) of a service or a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// New flows.
    pub new_flows: u64,
}

/// A cached next hop toward a backend ([`Backend::hop`]) or a client.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface.
    pub ifindex: u32,
    /// The first 12 bytes of the Ethernet header to write, as words: destination MAC, then
    /// source MAC.
    pub macs: [u32; 3],
    /// Valid until (the low 32 bits of jiffies, compared with wrap-around).
    pub expires: u32,
    /// The route's MTU as the FIB reported it: a bigger packet goes through the FIB again
    /// (and is answered with ICMP too-big). 0 = empty, so an all-zero entry is never used.
    pub mtu: u32,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding and no pointers.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::StatBlock {}
    unsafe impl aya::Pod for super::FlowCacheEntry {}
    unsafe impl aya::Pod for super::ReplyCacheEntry {}
    unsafe impl aya::Pod for super::FragKey {}
    unsafe impl aya::Pod for super::FragEntry {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use core::mem::size_of;

    use super::*;

    /// Of `keys` hashed into `slots` slots by the half of their hash from bit `shift` on
    /// (the flow cache uses both), the share alone in its slot.
    fn alone(keys: &[FlowKey], slots: u64, shift: u32) -> f64 {
        let mut count = std::collections::HashMap::<u64, u32>::new();
        for k in keys {
            *count
                .entry((k.cache_hash() >> shift) & (slots - 1))
                .or_default() += 1;
        }
        count.values().filter(|&&c| c == 1).count() as f64 / keys.len() as f64
    }

    #[test]
    fn cache_slots_spread_flows_to_one_vip_as_chance_would() {
        let vip = addr_from_v4([203, 0, 113, 10]);
        let key = |src: Addr, sport: u16| FlowKey {
            src,
            dst: vip,
            sport: sport.to_be(),
            dport: 443u16.to_be(),
            proto: proto::TCP,
            family: family::V4,
            _pad: [0; 2],
        };
        let rng = |mut x: u64| {
            move || {
                x = fmix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15));
                x
            }
        };
        let mut rand = rng(1);
        // 100,000 flows in 2^20 slots: e^(-100000/2^20) = 0.909 are alone by chance.
        let slots = 1 << 20;
        let random = (0..100_000).map(|_| {
            let r = rand();
            key(addr_from_v4((r as u32).to_be_bytes()), (r >> 48) as u16)
        });
        // Structured sources: two clients' sequential ports; a /16 on one port; a /24
        // times 400 ports.
        let two_clients = (0..100_000u32).map(|i| {
            key(
                addr_from_v4([198, 18, 0, 1 + (i & 1) as u8]),
                1024 + (i / 2) as u16,
            )
        });
        let slash16 =
            (0..65_536u32).map(|i| key(addr_from_v4([10, 1, (i >> 8) as u8, i as u8]), 40_000));
        let grid = (0..100_000u32).map(|i| {
            key(
                addr_from_v4([10, 2, 3, (i % 250) as u8]),
                20_000 + (i / 250) as u16,
            )
        });
        let mut rand = rng(2);
        let v6 = (0..100_000u64).map(move |_| {
            let mut src = vip;
            src[0] = 0x00fd;
            src[2] = rand() as u32;
            src[3] = rand() as u32;
            FlowKey {
                family: family::V6,
                ..key(src, rand() as u16)
            }
        });
        let sets: [(&str, std::vec::Vec<FlowKey>); 5] = [
            ("random", random.collect()),
            ("two clients", two_clients.collect()),
            ("a /16", slash16.collect()),
            ("a /24 × 400 ports", grid.collect()),
            ("random IPv6", v6.collect()),
        ];
        for (what, keys) in &sets {
            for shift in [0, 32] {
                let share = alone(keys, slots, shift);
                assert!(
                    share > 0.89,
                    "{what}, bits {shift}..: {share:.3} alone in their slot"
                );
            }
        }
    }

    #[test]
    fn addresses_round_trip_through_words() {
        let o: [u8; 16] = core::array::from_fn(|i| i as u8 * 7 + 1);
        assert_eq!(addr_octets(&addr_from_octets(o)), o);
        let v4 = addr_octets(&addr_from_v4([192, 0, 2, 1]));
        assert_eq!(v4[..4], [192, 0, 2, 1]);
        assert!(v4[4..].iter().all(|&b| b == 0));
    }

    #[test]
    fn vip_filter_bits_stay_in_range_and_separate_families() {
        let a = addr_from_v4([203, 0, 113, 10]);
        assert!(vip_filter_bit(family::V4, &a) < VIP_FILTER_WORDS * 64);
        assert_ne!(
            vip_filter_bit(family::V4, &a),
            vip_filter_bit(family::V6, &a)
        );
    }

    /// RFC 6052 §2.4's examples: 192.0.2.33 in 2001:db8:122:344::/N for each length, and
    /// in the well-known prefix.
    #[test]
    fn ipv4_addresses_embed_and_extract_as_rfc_6052_shows() {
        let v6 = |s: &str| addr_from_octets(s.parse::<std::net::Ipv6Addr>().unwrap().octets());
        let prefix = |s: &str| {
            let a = v6(s);
            [a[0], a[1], a[2]]
        };
        let v4 = addr_from_v4([192, 0, 2, 33])[0];
        for (len, p, want) in [
            (32, "2001:db8::", "2001:db8:c000:221::"),
            (40, "2001:db8:100::", "2001:db8:1c0:2:21::"),
            (48, "2001:db8:122::", "2001:db8:122:c000:2:2100::"),
            (56, "2001:db8:122:300::", "2001:db8:122:3c0:0:221::"),
            (64, "2001:db8:122:344::", "2001:db8:122:344:c0:2:2100:0"),
            (96, "2001:db8:122:344::", "2001:db8:122:344::c000:221"),
            (96, "64:ff9b::", "64:ff9b::c000:221"),
        ] {
            let p = prefix(p);
            assert_eq!(rfc6052::embed(&p, len, v4), v6(want), "/{len}");
            assert_eq!(rfc6052::extract(&v6(want), &p, len), Some(v4), "/{len}");
        }
    }

    #[test]
    fn only_addresses_inside_the_prefix_with_a_zero_u_octet_embed_an_ipv4_address() {
        let v6 = |s: &str| addr_from_octets(s.parse::<std::net::Ipv6Addr>().unwrap().octets());
        let p = {
            let a = v6("2001:db8:122::");
            [a[0], a[1], a[2]]
        };
        // Outside the /48, or the u octet set: none.
        assert_eq!(
            rfc6052::extract(&v6("2001:db8:123:c000:2:2100::"), &p, 48),
            None
        );
        assert_eq!(
            rfc6052::extract(&v6("2001:db8:122:c000:102:2100::"), &p, 48),
            None
        );
        // The suffix is ignored.
        assert_eq!(
            rfc6052::extract(&v6("2001:db8:122:c000:2:2100:0:1"), &p, 48),
            Some(addr_from_v4([192, 0, 2, 33])[0])
        );
        // Every length round-trips every bit of the IPv4 address.
        for len in rfc6052::LENGTHS {
            for v4 in [0u32, u32::MAX, 0x8000_0001, 0x0102_0304, 0xfedc_ba98] {
                let a = rfc6052::embed(&p, len, v4);
                assert_eq!(rfc6052::extract(&a, &p, len), Some(v4), "/{len} {v4:#x}");
                assert_eq!(addr_octets(&a)[8], 0, "/{len}: the u octet");
            }
        }
    }

    /// RFC 7915 Figures 3 and 6: each header field's offset, both ways; fields one family
    /// lacks have no pointer in it.
    #[test]
    fn parameter_problem_pointers_map_field_to_field() {
        use rfc7915::{pointer_to_v4, pointer_to_v6, to_v4, to_v6, Mapped};
        let v4_to_v6: [Option<u8>; 20] = [
            Some(0),
            Some(1),
            Some(4),
            Some(4),
            None,
            None,
            None,
            None,
            Some(7),
            Some(6),
            None,
            None,
            Some(8),
            Some(8),
            Some(8),
            Some(8),
            Some(24),
            Some(24),
            Some(24),
            Some(24),
        ];
        for (p, want) in v4_to_v6.iter().enumerate() {
            assert_eq!(pointer_to_v6(p as u8), *want, "IPv4 pointer {p}");
        }
        assert_eq!(pointer_to_v6(20), None, "past the IPv4 header");
        for p in 0..48u32 {
            let want = match p {
                0 | 1 => Some(p as u8),
                2 | 3 => None,
                4 | 5 => Some(2),
                6 => Some(9),
                7 => Some(8),
                8..=23 => Some(12),
                24..=39 => Some(16),
                _ => None,
            };
            assert_eq!(pointer_to_v4(p), want, "IPv6 pointer {p}");
        }
        assert_eq!(pointer_to_v4(1 << 24), None, "the pointer is 32 bits");
        // Codes: bad length maps as pointer-indicates-error; missing option is dropped;
        // unrecognized next header becomes protocol unreachable; an option is dropped.
        assert_eq!(to_v6(12, 2, [9, 0, 0, 0]), Mapped::Send(4, 0, [0, 0, 0, 6]));
        assert_eq!(to_v6(12, 0, [4, 0, 0, 0]), Mapped::Drop);
        assert_eq!(to_v6(12, 1, [0; 4]), Mapped::Drop);
        assert_eq!(
            to_v4(4, 0, [0, 0, 0, 24]),
            Mapped::Send(12, 0, [16, 0, 0, 0])
        );
        assert_eq!(to_v4(4, 0, [0, 0, 0, 2]), Mapped::Drop);
        assert_eq!(to_v4(4, 1, [0, 0, 0, 40]), Mapped::Send(3, 2, [0; 4]));
        assert_eq!(to_v4(4, 2, [0, 0, 0, 40]), Mapped::Drop);
        // Codes the RFC does not list are dropped; a fragmentation-needed without an MTU is
        // passed (no plateau guessing), as are types the balancer leaves alone.
        assert_eq!(to_v4(1, 5, [0; 4]), Mapped::Drop);
        assert_eq!(to_v4(3, 2, [0; 4]), Mapped::Drop);
        assert_eq!(to_v6(3, 14, [0; 4]), Mapped::Drop);
        assert_eq!(to_v6(3, 16, [0; 4]), Mapped::Drop);
        assert_eq!(to_v6(11, 2, [0; 4]), Mapped::Drop);
        assert_eq!(to_v6(3, 4, [0; 4]), Mapped::Pass);
        assert_eq!(to_v6(5, 0, [0; 4]), Mapped::Pass);
    }

    #[test]
    fn map_types_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 104);
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<Service>(), 16);
        assert_eq!(size_of::<Backend>(), 64);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 24);
        assert_eq!(size_of::<FlowCacheEntry>(), 64);
        assert_eq!(size_of::<RevNat>(), 48);
        assert_eq!(size_of::<ReplyCacheEntry>(), 128);
        assert_eq!(size_of::<Counters>(), 24);
        assert_eq!(size_of::<NextHop>(), 24);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<FragEntry>(), 16);
        assert_eq!(size_of::<StatBlock>(), 8 * stat::COUNT as usize);
    }

    #[test]
    fn conntrack_filter_copies_are_sized_to_eight_bits_per_entry_within_their_room() {
        use ct_filter::*;
        // At least 2^10 words; eight bits per entry above that.
        assert_eq!(words_log2_for(0), MIN_WORDS_LOG2);
        assert_eq!(words_log2_for(8_192), 10);
        assert_eq!(words_log2_for(8_193), 11);
        assert_eq!(words_log2_for(262_144), 15);
        // The array: the control line, then room for two copies of the capacity's size.
        assert_eq!(map_entries(262_144), FIRST_WORD + 2 * 32_768);
        assert_eq!(map_entries(64), FIRST_WORD + 2 * 1_024);
        let c = control(true, 1, [12, 15], 15);
        assert_eq!(c & ENABLED, ENABLED);
        assert_eq!(c & ACTIVE_ONE, ACTIVE_ONE);
        assert_eq!((copy_log2(c, 0), copy_log2(c, 1)), (12, 15));
        assert_eq!(copy_start(c, 0), FIRST_WORD);
        assert_eq!(copy_start(c, 1), FIRST_WORD + 32_768);
        assert_eq!(control(false, 0, [10, 10], 10) & (ENABLED | ACTIVE_ONE), 0);
        // Positions stay inside the copy, and spread over all of it.
        let mut seen = std::collections::HashSet::new();
        for sport in 0..20_000u16 {
            let key = FlowKey {
                src: addr_from_v4([198, 51, 100, 7]),
                dst: addr_from_v4([203, 0, 113, 10]),
                sport,
                dport: 443,
                proto: proto::TCP,
                family: family::V4,
                _pad: [0; 2],
            };
            let (word, bit) = position(&key, 10);
            assert!(word < 1 << 10);
            assert_eq!(bit.count_ones(), 1);
            seen.insert((word, bit));
        }
        // 20,000 keys in 65,536 bits: about 17,300 distinct bits if spread as chance has it.
        assert!(seen.len() > 16_500, "{} distinct bits", seen.len());
    }
}
