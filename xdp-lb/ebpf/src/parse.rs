//! Header parsing: bounds-checked access to the linear part of the packet, Ethernet with up
//! to two VLAN tags, IPv4 with options, IPv6 with a bounded extension-header walk, and the
//! first bytes of the L4 header.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use portico_xdp_common::{family, proto, stat, Addr};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

const IPV6_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked at most before giving up (passed as malformed).
const IPV6_MAX_EXT: usize = 4;

/// Every header field the program reads or writes ends within this many bytes of the frame
/// start, so the verifier can bound every variable offset.
pub const MAX_OFFSET: usize = 512;

/// Why a packet is passed to the stack untouched. Every check that can refuse a packet
/// happens before the program's first write to it or to a map.
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not IPv4/IPv6.
    NotIp,
    /// Truncated or malformed.
    Malformed,
    /// A fragment.
    Fragment,
    /// A length field disagrees with the frame.
    BadLength,
    /// IPv4 header checksum wrong.
    BadChecksum,
    /// IPv6 routing header with segments left.
    RoutingHeader,
    /// A header the program needs ends past [`MAX_OFFSET`].
    LongHeaders,
    /// Not handled in XDP (a possible IPv6 jumbogram).
    Unsupported,
}

impl Skip {
    /// The counter the packet is passed under.
    #[inline(always)]
    pub fn stat(self) -> u32 {
        match self {
            Skip::NotIp => stat::PASS_NOT_VIP,
            Skip::Malformed => stat::PASS_MALFORMED,
            Skip::Fragment => stat::PASS_FRAGMENT,
            Skip::BadLength => stat::PASS_BAD_LENGTH,
            Skip::BadChecksum => stat::PASS_BAD_CSUM,
            Skip::RoutingHeader => stat::PASS_ROUTING_HEADER,
            Skip::LongHeaders => stat::PASS_LONG_HEADERS,
            Skip::Unsupported => stat::PASS_UNSUPPORTED,
        }
    }
}

/// Returns a pointer to a `T` at `offset`, or `Err` when it does not end within
/// [`MAX_OFFSET`] (`LongHeaders`) or within the linear data (`Malformed`).
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Skip> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset + size_of::<T>() > MAX_OFFSET {
        return Err(Skip::LongHeaders);
    }
    if start + offset + size_of::<T>() > end {
        return Err(Skip::Malformed);
    }
    Ok((start + offset) as *mut T)
}

/// Marks a global function's argument as used. The compiler may otherwise pass nothing for
/// an argument a callee ignores, and the verifier refuses a call with an unset argument
/// register.
#[inline(always)]
pub fn used(v: u64) -> u64 {
    let mut v = v;
    // SAFETY: a register move; not `pure`, so the compiler keeps it (and the argument) even
    // when the value goes unused.
    unsafe {
        core::arch::asm!(
            "{0} = {0}",
            inout(reg) v,
            options(nomem, nostack, preserves_flags)
        );
    }
    v
}

/// As [`ptr_at`], with a bounds check the compiler cannot drop. It drops a check it can
/// prove from an earlier one, say `data + 12` from `data + l3 + 20` with `l3 >= 0`; the
/// verifier tracks bounds per derived pointer and cannot follow that proof. Used where a
/// constant offset follows checks at variable ones (in the global functions).
#[inline(always)]
pub fn ptr_at_fresh<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Skip> {
    let mut start = ctx.data();
    // SAFETY: a register move: the value is unchanged, but the compiler no longer knows
    // where it came from. (Not an empty template: that leaves two line-info records at one
    // instruction, which the kernel refuses.)
    unsafe {
        core::arch::asm!(
            "{0} = {0}",
            inout(reg) start,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    let end = ctx.data_end();
    if offset + size_of::<T>() > MAX_OFFSET {
        return Err(Skip::LongHeaders);
    }
    if start + offset + size_of::<T>() > end {
        return Err(Skip::Malformed);
    }
    Ok((start + offset) as *mut T)
}

/// The frame's length: the linear part, plus the fragments of a multi-buffer frame (one
/// helper call, made only when the linear part is too short for what the IP header says).
#[inline(always)]
fn frame_len_at_least(ctx: &XdpContext, want: usize) -> bool {
    let linear = ctx.data_end() - ctx.data();
    if want <= linear {
        return true;
    }
    // SAFETY: ctx.ctx is this invocation's xdp_md.
    let total = unsafe { aya_ebpf::helpers::generated::bpf_xdp_get_buff_len(ctx.ctx as *mut _) };
    want as u64 <= total
}

/// An IP length field of 0 (IPv4 total length, IPv6 payload length without a hop-by-hop
/// header): a BIG TCP packet (GSO/GRO above 64 KiB; only generic XDP, which runs after GRO,
/// sees one) when the buffer holds more than 64 KiB after `after` (the IPv4 header's start,
/// the IPv6 header's end): passed (`Unsupported`), as the stack built it; else a wrong
/// length. One helper call, for such packets only.
///
/// Not balanced: such a packet's transport checksum is CHECKSUM_PARTIAL's pseudo-header
/// sum, which XDP cannot tell from a full one, so the incremental update of ports would be
/// wrong (docs/xdp.md, "BIG TCP and jumbo frames").
#[inline(never)]
fn length_zero(ctx: &XdpContext, after: usize) -> Skip {
    // SAFETY: ctx.ctx is this invocation's xdp_md.
    let total = unsafe { aya_ebpf::helpers::generated::bpf_xdp_get_buff_len(ctx.ctx as *mut _) };
    if total > (after + 0xffff) as u64 {
        Skip::Unsupported
    } else {
        Skip::BadLength
    }
}

/// Loads the 4 bytes at `p` in one instruction, whatever their alignment. IP addresses
/// sit at 2-byte offsets in the packet; Rust's unaligned reads would go byte by byte, while
/// x86-64 and arm64 load them directly and the verifier allows it for packet and map-value
/// pointers.
///
/// # Safety
/// `p..p + 4` is in a checked packet range or a map value.
#[inline(always)]
pub unsafe fn load32(p: *const u8) -> u32 {
    let v: u32;
    // SAFETY: the caller guarantees the 4 bytes are readable.
    unsafe {
        core::arch::asm!(
            "{0} = *(u32 *)({1} + 0)",
            out(reg) v,
            in(reg) p,
            options(nostack, readonly, preserves_flags)
        );
    }
    v
}

/// Stores 4 bytes at `p` in one instruction, whatever their alignment (see [`load32`]).
///
/// # Safety
/// `p..p + 4` is in a checked packet range or a map value.
#[inline(always)]
pub unsafe fn store32(p: *mut u8, v: u32) {
    // SAFETY: the caller guarantees the 4 bytes are writable.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({0} + 0) = {1}",
            in(reg) p,
            in(reg) v,
            options(nostack, preserves_flags)
        );
    }
}

/// Reads an address at `p`: 4 bytes (IPv4, word 0) or 16.
///
/// # Safety
/// As [`load32`], for 4 or 16 bytes.
#[inline(always)]
pub unsafe fn load_addr(p: *const u8, v4: bool) -> Addr {
    // SAFETY: the caller guarantees the bytes are readable.
    unsafe {
        if v4 {
            [load32(p), 0, 0, 0]
        } else {
            [
                load32(p),
                load32(p.add(4)),
                load32(p.add(8)),
                load32(p.add(12)),
            ]
        }
    }
}

/// Writes an address at `p`: word 0 (IPv4) or all four words.
///
/// # Safety
/// As [`store32`], for 4 or 16 bytes.
#[inline(always)]
pub unsafe fn store_addr(p: *mut u8, a: &Addr, v4: bool) {
    // SAFETY: the caller guarantees the bytes are writable.
    unsafe {
        store32(p, a[0]);
        if !v4 {
            store32(p.add(4), a[1]);
            store32(p.add(8), a[2]);
            store32(p.add(12), a[3]);
        }
    }
}

/// What the parser found; offsets are from the start of the packet.
pub struct Parsed {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the L4 header.
    pub l4: usize,
    /// [`family`].
    pub family: u8,
    /// L4 protocol.
    pub proto: u8,
    /// Offset of the end of the IP packet: L2 header plus the IP length field, checked
    /// against the frame (fragments of multi-buffer frames included). Bytes after it are
    /// an Ethernet trailer, never read, written or summed.
    pub ip_end: usize,
}

impl Parsed {
    /// Length of the IP packet (header included).
    #[inline(always)]
    pub fn ip_len(&self) -> usize {
        self.ip_end - self.l3
    }

    /// The offsets, family, protocol and TCP flags as two integers: how the entry point
    /// hands a packet to a global BPF function (whose arguments must be plain integers).
    #[inline(always)]
    pub fn pack(&self, tcp_flags: u8) -> (u64, u64) {
        (
            self.l3 as u64 | (self.l4 as u64) << 16 | (self.ip_end as u64) << 32,
            u64::from(self.family) | u64::from(self.proto) << 8 | u64::from(tcp_flags) << 16,
        )
    }

    /// The other end of [`Parsed::pack`]: the offsets are whatever the caller said, so every
    /// access through them is bounds-checked again (as every access is).
    #[inline(always)]
    pub fn unpack(hdr: u64, meta: u64) -> (Self, u8) {
        (
            Self {
                l3: (hdr & 0xffff) as usize,
                l4: ((hdr >> 16) & 0xffff) as usize,
                ip_end: ((hdr >> 32) & 0x1_ffff) as usize,
                family: meta as u8,
                proto: (meta >> 8) as u8,
            },
            (meta >> 16) as u8,
        )
    }
}

/// Checked pointers to the IP header (20 bytes for IPv4, 40 for IPv6) and the transport
/// header (20 bytes for TCP, 8 otherwise). Every access after the parser goes through them
/// at a constant offset: a header reached by a variable offset is derived once, so the
/// compiler cannot reuse one bounds check for a pointer the verifier knows nothing about.
///
/// Family (`V4`) and transport (`TCP`) are type parameters: code past the dispatch on them
/// is one copy per combination, with nothing left to re-check (the verifier cannot tell that
/// a value read again from a function's arguments is the one it checked before).
pub struct Headers<const V4: bool, const TCP: bool> {
    /// The IP header.
    pub ip: *mut u8,
    /// The transport header.
    pub l4: *mut u8,
}

impl<const V4: bool, const TCP: bool> Headers<V4, TCP> {
    /// The header pointers of `p`.
    #[inline(always)]
    pub fn of(ctx: &XdpContext, p: &Parsed) -> Result<Self, Skip> {
        let ip: *mut u8 = if V4 {
            ptr_at::<[u8; 20]>(ctx, p.l3)?.cast()
        } else {
            ptr_at::<[u8; 40]>(ctx, p.l3)?.cast()
        };
        let l4: *mut u8 = if TCP {
            ptr_at::<[u8; 20]>(ctx, p.l4)?.cast()
        } else {
            ptr_at::<[u8; 8]>(ctx, p.l4)?.cast()
        };
        Ok(Self { ip, l4 })
    }

    /// The TTL / hop limit.
    #[inline(always)]
    pub fn hop_limit(&self) -> u8 {
        // SAFETY: within the checked IP header.
        unsafe { *self.ip.add(if V4 { 8 } else { 7 }) }
    }

    /// Whether routers may fragment the packet: IPv4 without DF (IPv6 never).
    #[inline(always)]
    pub fn may_fragment(&self) -> bool {
        // SAFETY: within the checked IP header.
        V4 && unsafe { *self.ip.add(6) } & 0x40 == 0
    }

    /// Source and destination addresses.
    #[inline(always)]
    pub fn addrs(&self) -> (Addr, Addr) {
        // SAFETY: within the checked IP header.
        unsafe {
            if V4 {
                (
                    load_addr(self.ip.add(12), true),
                    load_addr(self.ip.add(16), true),
                )
            } else {
                (
                    load_addr(self.ip.add(8), false),
                    load_addr(self.ip.add(24), false),
                )
            }
        }
    }
}

/// Parses L2 and L3 up to the L4 header; a fragment is `Skip::Fragment`.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Skip> {
    parse_l2::<false>(ctx).map(|(p, _)| p)
}

/// A fragment's place in its datagram, as [`parse_fragment`] finds it.
pub struct Frag {
    /// Whether the packet is a fragment at all (offset or more-fragments set).
    pub is: bool,
    /// A later fragment (offset non-zero): no transport header; `Parsed::l4` is where its
    /// payload starts.
    pub later: bool,
    /// Identification as it sits in the packet (IPv4: 16 bits, IPv6: the fragment header's
    /// 32).
    pub id: u32,
}

impl Frag {
    const NONE: Self = Self {
        is: false,
        later: false,
        id: 0,
    };
}

/// As [`parse`], but a fragment is parsed too (for [`crate::frag`]): its first fragment up
/// to the transport header, a later one up to its payload.
#[inline(always)]
pub fn parse_fragment(ctx: &XdpContext) -> Result<(Parsed, Frag), Skip> {
    parse_l2::<true>(ctx)
}

/// Both parsers: `FRAGS` says whether fragments are parsed or refused.
#[inline(always)]
fn parse_l2<const FRAGS: bool>(ctx: &XdpContext) -> Result<(Parsed, Frag), Skip> {
    let mut off = ETH_HLEN;
    let mut ethertype = u16::from_be(unsafe { *ptr_at::<u16>(ctx, 12)? });
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner).
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = u16::from_be(unsafe { *ptr_at::<u16>(ctx, off + 2)? });
            off += 4;
        }
    }
    match ethertype {
        ETH_P_IP => parse_v4::<FRAGS>(ctx, off),
        ETH_P_IPV6 => parse_v6::<FRAGS>(ctx, off),
        _ => Err(Skip::NotIp),
    }
}

#[inline(always)]
fn parse_v4<const FRAGS: bool>(ctx: &XdpContext, l3: usize) -> Result<(Parsed, Frag), Skip> {
    let ip: *const [u8; 20] = ptr_at(ctx, l3)?;
    // SAFETY: 20 bytes checked.
    let ip = unsafe { &*ip };
    let vihl = ip[0];
    if vihl >> 4 != 4 {
        return Err(Skip::Malformed);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(Skip::Malformed);
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    if tot_len == 0 {
        return Err(length_zero(ctx, l3));
    }
    if tot_len < ihl || !frame_len_at_least(ctx, l3 + tot_len) {
        return Err(Skip::BadLength);
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]);
    // More-fragments set or a non-zero offset: a fragment.
    let mut f = Frag::NONE;
    if frag & 0x3fff != 0 {
        if !FRAGS {
            return Err(Skip::Fragment);
        }
        f = Frag {
            is: true,
            later: frag & 0x1fff != 0,
            id: u32::from(u16::from_ne_bytes([ip[4], ip[5]])),
        };
    }
    Ok((
        Parsed {
            l3,
            l4: l3 + ihl,
            family: family::V4,
            proto: ip[9],
            ip_end: l3 + tot_len,
        },
        f,
    ))
}

/// Whether the IPv4 header of `p` (options included) sums to all ones. Checked only for
/// packets the program would rewrite or answer: others pass untouched anyway.
#[inline(always)]
pub fn ipv4_header_ok(ctx: &XdpContext, p: &Parsed) -> Result<bool, Skip> {
    let h: *const [u8; 20] = ptr_at(ctx, p.l3)?;
    ipv4_header_ok_at(ctx, p, h.cast())
}

/// [`ipv4_header_ok`] with the header's first 20 bytes checked at `h`.
#[inline(always)]
pub fn ipv4_header_ok_at(ctx: &XdpContext, p: &Parsed, h: *const u8) -> Result<bool, Skip> {
    // SAFETY: the caller checked 20 bytes.
    let mut sum = unsafe {
        u64::from(load32(h))
            + u64::from(load32(h.add(4)))
            + u64::from(load32(h.add(8)))
            + u64::from(load32(h.add(12)))
            + u64::from(load32(h.add(16)))
    };
    let ihl = p.l4 - p.l3;
    for i in 0..10 {
        let off = 20 + 4 * i;
        if off >= ihl {
            break;
        }
        let w: *const [u8; 4] = ptr_at(ctx, p.l3 + off)?;
        // SAFETY: 4 bytes checked.
        sum += u64::from(unsafe { load32(w.cast()) });
    }
    // At most 15 words: below 2^36.
    Ok(crate::csum::fold40(sum) == 0xffff)
}

#[inline(always)]
fn parse_v6<const FRAGS: bool>(ctx: &XdpContext, l3: usize) -> Result<(Parsed, Frag), Skip> {
    let ip: *const [u8; 40] = ptr_at(ctx, l3)?;
    // SAFETY: 40 bytes checked.
    let ip = unsafe { &*ip };
    if ip[0] >> 4 != 6 {
        return Err(Skip::Malformed);
    }
    let mut next = ip[6];
    let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    if payload == 0 {
        // A jumbogram (RFC 2675, a hop-by-hop header with a jumbo payload option) or a BIG
        // TCP packet (no hop-by-hop header since Linux 6.3).
        return Err(if next == IPV6_HOP {
            Skip::Unsupported
        } else {
            length_zero(ctx, l3 + 40)
        });
    }
    let ip_end = l3 + 40 + payload;
    if !frame_len_at_least(ctx, ip_end) {
        return Err(Skip::BadLength);
    }
    let mut off = l3 + 40;
    let mut f = Frag::NONE;
    for _ in 0..IPV6_MAX_EXT {
        match next {
            IPV6_HOP | IPV6_ROUTING | IPV6_DSTOPTS => {
                let hdr: *const [u8; 4] = ptr_at(ctx, off)?;
                // SAFETY: 4 bytes checked.
                let (nh, len, segments_left) = unsafe { ((*hdr)[0], (*hdr)[1], (*hdr)[3]) };
                // Segments left: the VIP is a waypoint, not the final destination.
                if next == IPV6_ROUTING && segments_left != 0 {
                    return Err(Skip::RoutingHeader);
                }
                next = nh;
                off += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let hdr: *const [u8; 8] = ptr_at(ctx, off)?;
                // SAFETY: 8 bytes checked.
                let (nh, fo_hi, fo_lo) = unsafe { ((*hdr)[0], (*hdr)[2], (*hdr)[3]) };
                let offset_and_m = u16::from_be_bytes([fo_hi, fo_lo]);
                next = nh;
                off += 8;
                // Offset non-zero or more-fragments set: a real fragment.
                if offset_and_m & 0xfff9 != 0 {
                    if !FRAGS {
                        return Err(Skip::Fragment);
                    }
                    // SAFETY: 8 bytes checked.
                    let id = unsafe { load32(hdr.cast::<u8>().add(4)) };
                    let later = offset_and_m & 0xfff8 != 0;
                    f = Frag {
                        is: true,
                        later,
                        id,
                    };
                    if later {
                        // What follows is payload, not headers.
                        return Ok((parsed_v6(l3, off, next, ip_end), f));
                    }
                }
            }
            _ => return Ok((parsed_v6(l3, off, next, ip_end), f)),
        }
    }
    // Too many extension headers, or the chain ended on one: let the stack decide.
    match next {
        IPV6_HOP | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT => Err(Skip::Malformed),
        _ => Ok((parsed_v6(l3, off, next, ip_end), f)),
    }
}

/// An IPv6 packet's [`Parsed`].
#[inline(always)]
fn parsed_v6(l3: usize, l4: usize, proto: u8, ip_end: usize) -> Parsed {
    Parsed {
        l3,
        l4,
        family: family::V6,
        proto,
        ip_end,
    }
}

/// Whether `p` is one of the L4 protocols with ports that the balancer handles.
#[inline(always)]
pub fn has_ports(p: u8) -> bool {
    p == proto::TCP || p == proto::UDP || p == proto::SCTP
}
