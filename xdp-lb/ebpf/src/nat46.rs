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
//! IPv4 UDP without a checksum gets one toward IPv6 (which requires it): its payload is
//! summed whole before anything is written ([`portico_udp_payload_sum`]: `bpf_loop` over
//! 256-byte chunks read with `bpf_xdp_load_bytes`, so any length, the fragments of a
//! multi-buffer frame included), then the new UDP header and pseudo-header are added. A
//! payload the helper cannot read (never, once the parser checked the lengths) is dropped
//! and counted (`drop_xlat_no_csum`).
//!
//! Not translated (passed, `pass_unsupported`): VLAN-tagged frames, IPv4 with options,
//! IPv6 with extension headers, fragments.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    cty::c_void,
    helpers::generated::{bpf_loop, bpf_xdp_adjust_head, bpf_xdp_load_bytes},
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
    /// Not 0: the next hop's neighbour is not resolved; the translated packet goes to the
    /// stack (keeping the frame's own MAC addresses), which resolves it and forwards.
    pub pass: u8,
    /// Explicit padding.
    pub _pad: [u8; 2],
}

/// Whether the packet can be translated: untagged, IPv4 without options and not a
/// fragment, IPv6 without extension headers, IPv6 UDP with a checksum (0 is not one there).
/// (IPv4 UDP without a checksum gets one on the way to IPv6: [`portico_udp_payload_sum`].)
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
    pass: bool,
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
            pass: u8::from(pass),
            _pad: [0; 2],
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
    let (Some(st), Some(sc)) = (Stats::get(), maps::SCRATCH.get_ptr_mut(0)) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch entry (map memory: it stays valid when the packet moves).
    let x = unsafe { &mut (*sc).xlat };
    if x.pass != 0 {
        // To the stack: the frame keeps its MAC addresses (its destination is this node's),
        // kept in the unused next hop while the header moves.
        let Ok(eth) = ptr_at_fresh::<[u32; 3]>(&ctx, 0) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: 12 bytes checked.
        x.hop.macs = unsafe { *eth };
    }
    let verdict = match (x.family == family::V6, tcp) {
        (true, true) => to_v6::<true>(&ctx, x, 0),
        (true, false) => {
            // IPv4 UDP without a checksum: its payload summed before anything is written.
            let payload_sum = match zero_csum_payload(&ctx) {
                None => 0,
                Some(len) => {
                    let sum = portico_udp_payload_sum(ctx.ctx, u64::from(len));
                    if sum == SUM_FAILED {
                        st.add(stat::DROP_XLAT_NO_CSUM, 1);
                        return xdp_action::XDP_DROP;
                    }
                    sum
                }
            };
            to_v6::<false>(&ctx, x, payload_sum)
        }
        (false, true) => to_v4::<true>(&ctx, x),
        (false, false) => to_v4::<false>(&ctx, x),
    };
    match verdict {
        Some(()) if x.pass != 0 => {
            st.add(stat::XLAT, 1);
            st.add(stat::PASS_NO_NEIGH, 1);
            let Ok(eth) = ptr_at_fresh::<[u32; 3]>(&ctx, 0) else {
                return xdp_action::XDP_ABORTED;
            };
            // SAFETY: 12 bytes checked.
            unsafe { *eth = x.hop.macs };
            xdp_action::XDP_PASS
        }
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

/// For an IPv4 UDP datagram (untagged, no options): `None` when it has a checksum, else the
/// length of its payload (the UDP length less the header; the parser checked it lies
/// within the IP packet).
#[inline(always)]
fn zero_csum_payload(ctx: &XdpContext) -> Option<u16> {
    let h: *const u8 = ptr_at_fresh::<[u8; 42]>(ctx, 0).ok()?.cast();
    // SAFETY: Ethernet, IPv4 and UDP headers checked.
    let (csum, len) = unsafe {
        (
            *(h.add(40) as *const u16),
            u16::from_be_bytes([*h.add(38), *h.add(39)]),
        )
    };
    (csum == 0).then(|| len.saturating_sub(8))
}

/// Where an untagged IPv4 UDP payload (no options) starts in the frame.
const UDP4_PAYLOAD: u32 = 42;

/// What [`portico_udp_payload_sum`] returns when the payload could not be read.
const SUM_FAILED: u64 = u64::MAX;

/// Bytes of payload each [`sum_chunk`] round reads (the scratch entry's buffer).
const CHUNK: u32 = 256;

/// [`sum_chunk`]'s state, on [`portico_udp_payload_sum`]'s stack (`bpf_loop` takes a
/// pointer to the caller's stack).
#[repr(C)]
struct SumState {
    /// The program's context, for `bpf_xdp_load_bytes`.
    ctx: *mut xdp_md,
    /// Payload bytes in all.
    len: u32,
    /// Set when a read failed.
    failed: u32,
    /// One's complement sum so far (32-bit words as they sit in memory).
    acc: u64,
}

/// The one's complement sum (64-bit accumulator, 32-bit words as they sit in memory) of the
/// `len` bytes of an untagged IPv4 UDP datagram's payload, wherever they are (the linear
/// part or the fragments of a multi-buffer frame), the last chunk zero-padded; or
/// [`SUM_FAILED`]. `bpf_loop` calls [`sum_chunk`] once per 256 bytes (at most 256 times), so
/// the verifier walks one round. A global function: its frame and the callback's are
/// stacked on `portico_xlat`'s only, far from the deepest chain.
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_udp_payload_sum(ctx: *mut xdp_md, len: u64) -> u64 {
    let len = used(len) as u32 & 0xffff;
    let mut state = SumState {
        ctx,
        len,
        failed: 0,
        acc: 0,
    };
    let rounds = len.div_ceil(CHUNK);
    // SAFETY: the callback has the signature bpf_loop expects; `state` outlives the call.
    let done = unsafe {
        bpf_loop(
            rounds,
            sum_chunk as *mut c_void,
            (&mut state as *mut SumState).cast(),
            0,
        )
    };
    if done != i64::from(rounds) || state.failed != 0 {
        return SUM_FAILED;
    }
    state.acc
}

/// One round of [`portico_udp_payload_sum`]: reads the `i`th chunk of the payload into this
/// CPU's scratch buffer (zero-padded when it is the last and shorter) and adds it to the sum.
/// Returns 0 to go on, 1 to stop (a failed read).
#[inline(never)]
extern "C" fn sum_chunk(i: u64, state: *mut SumState) -> i64 {
    // SAFETY: bpf_loop passes the pointer portico_udp_payload_sum gave it.
    let state = unsafe { &mut *state };
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        state.failed = 1;
        return 1;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let buf = unsafe { &mut (*sc).sum_buf };
    let done = (i as u32).wrapping_mul(CHUNK);
    // Laundered, so that the verifier sees the bounds (1 to CHUNK) checked on the value
    // the helper gets.
    let n = used(u64::from(state.len.saturating_sub(done).min(CHUNK)));
    if n == 0 || n > u64::from(CHUNK) {
        return 1;
    }
    let n = n as u32;
    if n < CHUNK {
        // The last chunk: zero-padded, word by word (no memset call).
        for w in buf.iter_mut() {
            // SAFETY: a word of this CPU's scratch entry.
            unsafe { core::ptr::write_volatile(w, 0) };
        }
    }
    // SAFETY: `n` bytes (1 to CHUNK) into the CHUNK-byte buffer; the helper checks the
    // offset and length against the whole buffer, fragments included.
    let read =
        unsafe { bpf_xdp_load_bytes(state.ctx, UDP4_PAYLOAD + done, buf.as_mut_ptr().cast(), n) };
    if read != 0 {
        state.failed = 1;
        return 1;
    }
    let mut acc = state.acc;
    for w in buf.iter() {
        acc += (w & 0xffff_ffff) + (w >> 32);
    }
    state.acc = acc;
    0
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

/// IPv4 → IPv6: 20 bytes more in front. `payload_sum`: for UDP without a checksum, its
/// payload's sum ([`portico_udp_payload_sum`]).
#[inline(always)]
fn to_v6<const TCP: bool>(ctx: &XdpContext, x: &Xlat, payload_sum: u64) -> Option<()> {
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
    // IPv4 UDP without a checksum: IPv6 needs one, computed whole (the caller summed the
    // payload).
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
        // The pseudo-header (addresses, UDP length, next header 17), the new UDP header
        // (its checksum field 0 for now) and the payload.
        // SAFETY: UDP header checked (frame above).
        let (len, header) = unsafe {
            *(h.add(60) as *mut u16) = 0;
            let hdr = *(h.add(54) as *const [u16; 4]);
            (
                u16::from_be_bytes([*h.add(58), *h.add(59)]),
                hdr.iter().map(|&w| u64::from(w)).sum::<u64>(),
            )
        };
        let sum = payload_sum
            + header
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
