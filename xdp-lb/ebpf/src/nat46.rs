//! NAT46 and NAT64 (RFC 7915 header translation): a service whose VIP family differs from
//! its backend's. The flow is balanced, tracked and given a SNAT port as any other, from
//! the node's SNAT address of the backend's family; its reverse-NAT entry records the
//! client's family, and replies are translated back.
//!
//! A slow path that finds a flow crossing families checks the packet can be translated
//! ([`eligible`]), resolves the next hop in the new family (the MTU check uses the
//! translated length, so an ICMP too-big answer carries the route's MTU less the 20 bytes
//! the IPv6 header adds, or plus the 20 it removes), leaves the new addresses, ports and
//! next hop in this CPU's scratch entry ([`request`]) and returns [`XLAT`]. The entry point
//! then calls [`translate`], a global function, so that its frame and the slow path's never
//! stack up. Translation: `bpf_xdp_adjust_head` by 20 bytes, a new Ethernet and IP header
//! (traffic class ↔ TOS, hop limit ↔ TTL less one, IPv4 without options, DF set and
//! identification 0 toward IPv4 — an atomic datagram, RFC 6864 — no fragment header toward
//! IPv6), the new ports, and the transport checksum updated for the new pseudo-header and
//! ports (the payload length and protocol weigh the same in both pseudo-headers).
//!
//! IPv4 UDP without a checksum gets one toward IPv6 (which requires it): the datagram is
//! summed whole when it is at most [`ZERO_CSUM_MAX`] bytes and all in the linear part, else
//! dropped and counted (`drop_xlat_no_csum`): a bounded loop the verifier walks once, no
//! helper, no fragments of a multi-buffer frame.
//!
//! Not translated (passed, `pass_unsupported`): VLAN-tagged frames, IPv4 with options,
//! IPv6 with extension headers, fragments.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::generated::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use portico_xdp_common::{family, proto, stat, Addr, NextHop};

use crate::{
    csum, fib,
    maps::{self, Stats},
    parse::{load32, ptr_at_fresh, store32, store_addr, used, Headers, Parsed},
};

/// A slow path's answer asking the entry point for the translation [`request`] described.
pub const XLAT: u32 = 0x1000_0000;

/// The translation asked for: in this CPU's scratch entry.
#[repr(C)]
pub struct Xlat {
    /// New source address.
    pub src: Addr,
    /// New destination address.
    pub dst: Addr,
    /// Next hop in the new family.
    pub hop: NextHop,
    /// New source port, network order.
    pub sport: u16,
    /// New destination port, network order.
    pub dport: u16,
    /// The new [`family`].
    pub family: u8,
    /// Explicit padding.
    pub _pad: [u8; 3],
}

/// Whether the packet can be translated: untagged, IPv4 without options and not a
/// fragment, IPv6 without extension headers, IPv6 UDP with a checksum (0 is not one there).
/// (IPv4 UDP without a checksum gets one on the way to IPv6, or is dropped when too long:
/// [`zero_csum_udp`].)
#[inline(always)]
pub fn eligible<const V4: bool, const TCP: bool>(p: &Parsed, h: &Headers<V4, TCP>) -> bool {
    if p.l3 != 14 || p.l4 != p.l3 + if V4 { 20 } else { 40 } {
        return false;
    }
    // SAFETY: within the checked IP and transport headers.
    unsafe {
        if V4 && u16::from_be_bytes([*h.ip.add(6), *h.ip.add(7)]) & 0x3fff != 0 {
            return false;
        }
        V4 || TCP || *(h.l4.add(6) as *const u16) != 0
    }
}

/// The longest IPv4 UDP datagram without a checksum that is given one toward IPv6: its
/// header and payload are summed 8 bytes at a time in a bounded loop (256 rounds), within
/// the frame's linear part. Longer ones are dropped (`drop_xlat_no_csum`).
pub const ZERO_CSUM_MAX: usize = 2048;

/// The length of the packet `p` once translated to the other family.
#[inline(always)]
pub fn translated_len(p: &Parsed, v4: bool) -> usize {
    if v4 {
        p.ip_len() + 20
    } else {
        p.ip_len().saturating_sub(20)
    }
}

/// Asks for a translation (new addresses and ports, toward `to_family`, out by `hop`):
/// [`XLAT`], or a pass if the scratch entry is missing (never).
#[inline(always)]
pub fn request(
    src: &Addr,
    dst: &Addr,
    sport: u16,
    dport: u16,
    to_family: u8,
    hop: &NextHop,
) -> u32 {
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    unsafe {
        (*sc).xlat = Xlat {
            src: *src,
            dst: *dst,
            hop: *hop,
            sport,
            dport,
            family: to_family,
            _pad: [0; 3],
        };
    }
    XLAT
}

/// Translates the packet `p` as [`request`] asked, and sends it: the verdict.
#[inline(always)]
pub fn translate(ctx: &XdpContext, p: &Parsed) -> u32 {
    portico_xlat(ctx.ctx, u64::from(p.proto))
}

/// The global function behind [`translate`].
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_xlat(ctx: *mut xdp_md, l4_proto: u64) -> u32 {
    let ctx = XdpContext::new(ctx);
    let tcp = used(l4_proto) as u8 == proto::TCP;
    let (Some(st), Some(sc)) = (Stats::get(), maps::SCRATCH.get_ptr(0)) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch entry (map memory: it stays valid when the packet moves).
    let x = unsafe { &(*sc).xlat };
    let verdict = match (x.family == family::V6, tcp) {
        (true, true) => to_v6::<true>(&ctx, x),
        (true, false) => {
            if zero_csum_udp(&ctx) == Some(false) {
                st.add(stat::DROP_XLAT_NO_CSUM, 1);
                return xdp_action::XDP_DROP;
            }
            to_v6::<false>(&ctx, x)
        }
        (false, true) => to_v4::<true>(&ctx, x),
        (false, false) => to_v4::<false>(&ctx, x),
    };
    match verdict {
        Some(()) => {
            st.add(stat::XLAT, 1);
            fib::send(&ctx, &st, &x.hop)
        }
        None => {
            // Refused before anything was written (the slow path checked the same).
            st.add(stat::PASS_UNSUPPORTED, 1);
            xdp_action::XDP_PASS
        }
    }
}

/// For an IPv4 UDP datagram (untagged, no options): `None` when it has a checksum,
/// `Some(true)` when it has none but can be given one ([`ZERO_CSUM_MAX`], all in the
/// linear part), `Some(false)` when it cannot.
#[inline(always)]
fn zero_csum_udp(ctx: &XdpContext) -> Option<bool> {
    let h: *const u8 = ptr_at_fresh::<[u8; 42]>(ctx, 0).ok()?.cast();
    // SAFETY: Ethernet, IPv4 and UDP headers checked.
    let (csum, len) = unsafe {
        (
            *(h.add(40) as *const u16),
            usize::from(u16::from_be_bytes([*h.add(38), *h.add(39)])),
        )
    };
    if csum != 0 {
        return None;
    }
    Some(len <= ZERO_CSUM_MAX && 34 + len <= ctx.data_end() - ctx.data())
}

/// One's complement sum (64-bit accumulator, words as they sit in memory) of the `len`
/// bytes at `off` in the linear part, 8 at a time, the last few zero-padded; `None` when
/// they are not all there. At most [`ZERO_CSUM_MAX`] bytes.
#[inline(always)]
fn sum_linear(ctx: &XdpContext, off: usize, len: usize) -> Option<u64> {
    if len > ZERO_CSUM_MAX {
        return None;
    }
    let mut sum = 0u64;
    let mut done = 0usize;
    for _ in 0..ZERO_CSUM_MAX / 8 {
        if done + 8 > len {
            break;
        }
        let w = ptr_at_anywhere::<u64>(ctx, off + done)?;
        // SAFETY: 8 bytes checked; loaded whatever their alignment (x86-64, arm64).
        let w = unsafe { core::ptr::read_unaligned(w) };
        sum += (w & 0xffff_ffff) + (w >> 32);
        done += 8;
    }
    // The last 0 to 7 bytes, zero-padded as the checksum pads an odd length.
    let mut tail = [0u8; 8];
    for (i, t) in tail.iter_mut().enumerate() {
        if done + i >= len {
            break;
        }
        let b = ptr_at_anywhere::<u8>(ctx, off + done + i)?;
        // SAFETY: 1 byte checked.
        *t = unsafe { *b };
    }
    let w = u64::from_ne_bytes(tail);
    Some(sum + (w & 0xffff_ffff) + (w >> 32))
}

/// A pointer to a `T` at `offset` of the linear part, with no cap on the offset (unlike
/// `ptr_at`, whose headers end within 512 bytes): for the payload sum.
#[inline(always)]
fn ptr_at_anywhere<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if offset > ZERO_CSUM_MAX + 64 || start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// The frame's first `tcp_len` (TCP) or `udp_len` bytes, checked (`TCP` picks; the lengths
/// are 54/42 or 74/62, as the callers pass them).
#[inline(always)]
fn frame<const TCP: bool>(ctx: &XdpContext, tcp_len: usize, udp_len: usize) -> Option<*mut u8> {
    let h: *mut u8 = match (TCP, tcp_len, udp_len) {
        (true, 54, _) => ptr_at_fresh::<[u8; 54]>(ctx, 0).ok()?.cast(),
        (true, _, _) => ptr_at_fresh::<[u8; 74]>(ctx, 0).ok()?.cast(),
        (false, _, 42) => ptr_at_fresh::<[u8; 42]>(ctx, 0).ok()?.cast(),
        (false, _, _) => ptr_at_fresh::<[u8; 62]>(ctx, 0).ok()?.cast(),
    };
    Some(h)
}

/// The transport checksum `old` with the change `delta` (UDP's 0 goes out as 0xffff).
#[inline(always)]
fn l4_csum<const TCP: bool>(old: u16, delta: u64) -> u16 {
    if TCP {
        csum::apply(old, delta)
    } else {
        csum::apply_udp(old, delta)
    }
}

/// Offset of the transport checksum in its header.
const fn csum_at(tcp: bool) -> usize {
    if tcp {
        16
    } else {
        6
    }
}

/// The sum of an address's words, for a checksum change: added (`+`) or, complemented,
/// removed.
#[inline(always)]
fn words(a: &Addr, v4: bool, removed: bool) -> u64 {
    let w = |x: u32| u64::from(if removed { !x } else { x });
    if v4 {
        w(a[0])
    } else {
        w(a[0]) + w(a[1]) + w(a[2]) + w(a[3])
    }
}

/// IPv4 → IPv6: 20 bytes more in front.
#[inline(always)]
fn to_v6<const TCP: bool>(ctx: &XdpContext, x: &Xlat) -> Option<()> {
    // Ethernet, IPv4 (no options), transport header (20 or 8 bytes): read all first.
    let h = frame::<TCP>(ctx, 54, 42)?;
    // SAFETY: Ethernet, IPv4 and the transport header checked.
    let (tos, tot, ttl, l4_proto, old_src, old_dst, ports, old_csum) = unsafe {
        (
            *h.add(15),
            u16::from_be_bytes([*h.add(16), *h.add(17)]),
            *h.add(22),
            *h.add(23),
            load32(h.add(26)),
            load32(h.add(30)),
            *(h.add(34) as *const [u16; 2]),
            *(h.add(34 + csum_at(TCP)) as *const u16),
        )
    };
    let delta = u64::from(!old_src)
        + u64::from(!old_dst)
        + words(&x.src, false, false)
        + words(&x.dst, false, false)
        + csum::diff16(ports[0], x.sport)
        + csum::diff16(ports[1], x.dport);
    let new_csum = l4_csum::<TCP>(old_csum, delta);
    // IPv4 UDP without a checksum: IPv6 needs one, computed whole (the caller checked the
    // datagram is short enough and linear).
    let zero = !TCP && old_csum == 0;
    // SAFETY: ctx.ctx is this invocation's xdp_md; every packet pointer is derived again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx as *mut _, -20) } != 0 {
        return None;
    }
    // The frame grew by 20 bytes: checked again (every pointer before is stale).
    let h = frame::<TCP>(ctx, 74, 62)?;
    let plen = tot.saturating_sub(20).to_be_bytes();
    // SAFETY: Ethernet, IPv6 and the transport header checked.
    unsafe {
        *(h.add(12) as *mut [u8; 2]) = [0x86, 0xdd];
        *(h.add(14) as *mut [u8; 8]) = [
            0x60 | tos >> 4,
            tos << 4,
            0,
            0,
            plen[0],
            plen[1],
            l4_proto,
            ttl.saturating_sub(1),
        ];
        store_addr(h.add(22), &x.src, false);
        store_addr(h.add(38), &x.dst, false);
        *(h.add(54) as *mut [u16; 2]) = [x.sport, x.dport];
        *(h.add(54 + csum_at(TCP)) as *mut u16) = new_csum;
    }
    if zero {
        // The pseudo-header (addresses, UDP length, next header 17) and the datagram, its
        // checksum field 0 for now.
        // SAFETY: UDP header checked (frame above).
        let len = unsafe {
            *(h.add(60) as *mut u16) = 0;
            u16::from_be_bytes([*h.add(58), *h.add(59)])
        };
        let sum = sum_linear(ctx, 54, usize::from(len))?
            + words(&x.src, false, false)
            + words(&x.dst, false, false)
            + u64::from(u16::from_ne_bytes(len.to_be_bytes()))
            + u64::from(u16::from_ne_bytes([0, proto::UDP]));
        let c = match !csum::fold(sum) {
            0 => 0xffff,
            c => c,
        };
        let h = frame::<TCP>(ctx, 74, 62)?;
        // SAFETY: UDP header checked.
        unsafe { *(h.add(60) as *mut u16) = c };
    }
    Some(())
}

/// IPv6 → IPv4: 20 bytes fewer in front.
#[inline(always)]
fn to_v4<const TCP: bool>(ctx: &XdpContext, x: &Xlat) -> Option<()> {
    let h = frame::<TCP>(ctx, 74, 62)?;
    // SAFETY: Ethernet, IPv6 and the transport header checked.
    let (b0, b1, plen, l4_proto, hl, ports, old_csum) = unsafe {
        (
            *h.add(14),
            *h.add(15),
            u16::from_be_bytes([*h.add(18), *h.add(19)]),
            *h.add(20),
            *h.add(21),
            *(h.add(54) as *const [u16; 2]),
            *(h.add(54 + csum_at(TCP)) as *const u16),
        )
    };
    // SAFETY: within the IPv6 header checked.
    let (old_src, old_dst) = unsafe {
        (
            crate::parse::load_addr(h.add(22), false),
            crate::parse::load_addr(h.add(38), false),
        )
    };
    let delta = words(&old_src, false, true)
        + words(&old_dst, false, true)
        + words(&x.src, true, false)
        + words(&x.dst, true, false)
        + csum::diff16(ports[0], x.sport)
        + csum::diff16(ports[1], x.dport);
    let new_csum = l4_csum::<TCP>(old_csum, delta);
    let tos = (b0 << 4) | (b1 >> 4);
    let tot = plen.saturating_add(20).to_be_bytes();
    let mut ip: [u8; 12] = [
        0x45,
        tos,
        tot[0],
        tot[1],
        0,
        0,
        0x40,
        0,
        hl.saturating_sub(1),
        l4_proto,
        0,
        0,
    ];
    // The header checksum: the 12 bytes above and the addresses.
    let mut sum = u64::from(x.src[0]) + u64::from(x.dst[0]);
    for i in 0..6 {
        sum += u64::from(u16::from_ne_bytes([ip[2 * i], ip[2 * i + 1]]));
    }
    let c = (!csum::fold(sum)).to_ne_bytes();
    ip[10] = c[0];
    ip[11] = c[1];
    // SAFETY: ctx.ctx is this invocation's xdp_md; every packet pointer is derived again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx as *mut _, 20) } != 0 {
        return None;
    }
    // The frame shrank by 20 bytes: checked again (every pointer before is stale).
    let h = frame::<TCP>(ctx, 54, 42)?;
    // SAFETY: Ethernet, IPv4 and the transport header checked.
    unsafe {
        *(h.add(12) as *mut [u8; 2]) = [0x08, 0x00];
        *(h.add(14) as *mut [u8; 12]) = ip;
        store32(h.add(26), x.src[0]);
        store32(h.add(30), x.dst[0]);
        *(h.add(34) as *mut [u16; 2]) = [x.sport, x.dport];
        *(h.add(34 + csum_at(TCP)) as *mut u16) = new_csum;
    }
    Some(())
}
