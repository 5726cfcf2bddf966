//! ICMP ↔ ICMPv6 translation (RFC 7915 §4.2, §5.2) of the errors about a NAT46/64 flow:
//! destination unreachable, time exceeded, packet too big ↔ fragmentation needed, parameter
//! problem. From the backend side (quoting SNAT → backend) they reach the client in its
//! family; from the client side (quoting VIP → client) the backend in its family. The outer
//! and the quoted (inner) header both change family, so the frame grows or shrinks by 40
//! bytes (twice the header size difference); the quoted transport header stays where it is
//! relative to the frame's end, and everything after it is left untouched.
//!
//! The ICMP path (`portico_icmp4/6`) finds the flow and leaves in the scratch entry what the
//! error becomes ([`XLAT_ERROR`]); the entry point then calls [`translate`], a global
//! function (the two frames never stack up), which maps type and code
//! (`portico_xdp_common::rfc7915`: sent, passed, or dropped and counted `drop_xlat_icmp`),
//! picks the outer source, resolves the next hop with the translated length, rewrites the
//! front of the frame and sends it.
//!
//! Checksums: the new ICMP/ICMPv6 checksum is the old one updated (RFC 1624) by every word
//! that changes: the ICMPv6 pseudo-header removed (toward IPv4) or added (toward IPv6), the
//! type, code and the 4 bytes after the checksum, the quoted IP header (40 bytes out, 20 in,
//! or the reverse), the quoted ports and the quoted transport checksum. The quoted transport
//! checksum follows its own pseudo-header's addresses and ports (length and protocol weigh
//! the same in both families). The new IPv4 headers' checksums are computed whole. An error
//! whose checksum was wrong stays wrong by as much.
//!
//! Outer source: the peer's own error comes from the VIP (toward the client) or the SNAT
//! address (toward the backend); a router's IPv4 address goes to an IPv6 peer embedded in
//! the RFC 6052 prefix (`Config::xlat_prefix` and `xlat_prefix_len`, default 64:ff9b::/96;
//! `portico_xdp_common::rfc6052`); a router's IPv6 address goes to an IPv4 peer as the IPv4
//! address it embeds when it lies in that prefix, else as the VIP or SNAT address (an IPv4
//! peer cannot be told an IPv6 address, and must not see a packet from itself).
//!
//! Not translated (passed, `pass_unsupported`): VLAN-tagged frames, outer IPv4 options or
//! IPv6 extension headers, quoted IPv4 options or IPv6 extension headers, types and codes
//! the balancer leaves alone, fragmentation needed with an MTU of 0 (no plateau guessing).
//! Parameter problems RFC 7915 cannot translate are dropped.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::generated::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use portico_xdp_common::{
    family, proto, rfc6052,
    rfc7915::{self, Mapped},
    stat, Config,
};

use crate::{
    csum,
    fib::{self, Route},
    maps::{self, Scratch, Stats},
    parse::{ipv4_header_ok, ptr_at_fresh, store32, store_addr, used, Headers, Parsed, Skip},
};

/// What the ICMP path returns for an error about a NAT46/64 flow, after leaving the quoted
/// 5-tuple in the scratch entry's `owner` and in its `rev` what the error becomes: from the
/// backend side, the flow's reverse-NAT entry (`client`, `client_port` the quote's new
/// source, `vip`, `vip_port` its destination, `client_family` the family to send it in);
/// from the client side, an entry of the same shape toward the backend (the backend as
/// `client`, the SNAT address and port as `vip`). The entry point then calls
/// [`translate`].
pub const XLAT_ERROR: u32 = 0x2000_0000;

/// Translates the ICMP error `p` (from the backend side about a NAT46/64 flow, as
/// [`XLAT_ERROR`] says) and sends it: the verdict.
#[inline(always)]
pub fn translate(ctx: &XdpContext, p: &Parsed) -> u32 {
    let (hdr, meta) = p.pack(0);
    portico_xlat_icmp(ctx.ctx, hdr, meta)
}

/// The global function behind [`translate`]: a frame of its own, after the ICMP path's.
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_xlat_icmp(ctx: *mut xdp_md, hdr: u64, meta: u64) -> u32 {
    let ctx = XdpContext::new(ctx);
    let (hdr, meta) = (used(hdr), used(meta));
    let (Some(st), Some(cfg), Some(sc)) = (
        Stats::get(),
        maps::CONFIG.get(0),
        maps::SCRATCH.get_ptr_mut(0),
    ) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch entry (map memory: it stays valid when the packet moves);
    // nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    let (p, _) = Parsed::unpack(hdr, meta);
    let prepared = if p.family == family::V4 {
        prepare::<true>(&ctx, &p, sc, cfg)
    } else {
        prepare::<false>(&ctx, &p, sc, cfg)
    };
    if prepared != GO {
        return prepared;
    }
    let tcp = sc.rkey.proto == proto::TCP;
    let done = match (sc.xlat.family == family::V6, tcp) {
        (true, true) => to_v6::<true>(&ctx, sc, p.ip_end),
        (true, false) => to_v6::<false>(&ctx, sc, p.ip_end),
        (false, true) => to_v4::<true>(&ctx, sc, p.ip_end),
        (false, false) => to_v4::<false>(&ctx, sc, p.ip_end),
    };
    match done {
        Some(()) => {
            st.add(stat::ICMP_ERROR_NAT, 1);
            st.add(stat::XLAT, 1);
            fib::send(&ctx, &st, &sc.xlat.hop)
        }
        None => {
            // Refused before anything was written (checked the same before).
            st.add(stat::PASS_UNSUPPORTED, 1);
            xdp_action::XDP_PASS
        }
    }
}

/// What [`prepare`] returns when the packet is to be translated.
const GO: u32 = u32::MAX;

/// [`check`], its refusals counted: [`GO`] or a verdict. Not inlined: its frame is gone
/// before the translation's is made.
#[inline(never)]
fn prepare<const V4: bool>(ctx: &XdpContext, p: &Parsed, sc: &mut Scratch, cfg: &Config) -> u32 {
    let Some(st) = Stats::get() else {
        return xdp_action::XDP_PASS;
    };
    match check::<V4>(ctx, &st, p, sc, cfg) {
        Ok(Some(verdict)) => verdict,
        Ok(None) => GO,
        Err(skip) => {
            st.add(skip.stat(), 1);
            xdp_action::XDP_PASS
        }
    }
}

/// Checks the error `p` (`V4`: the backend's family) can be translated, picks the outer
/// source, resolves the client's next hop: `None` when the packet is to be translated (the
/// scratch entry's `xlat` then holds the new outer addresses and hop, its `rkey` the new
/// quoted addresses and ports), else a verdict. `sc.owner` holds the quoted 5-tuple,
/// `sc.rev` the flow's reverse-NAT entry.
#[inline(always)]
fn check<const V4: bool>(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    sc: &mut Scratch,
    cfg: &Config,
) -> Result<Option<u32>, Skip> {
    let h = Headers::<V4, false>::of(ctx, p)?;
    let (outer_src, _) = h.addrs();
    // Untagged, no outer options or extension headers; the quote's IPv4 header without
    // options (an IPv6 quote reached here only with TCP/UDP right after its header).
    let ip_hdr = if V4 { 20 } else { 40 };
    if p.l3 != 14 || p.l4 != p.l3 + ip_hdr {
        return Err(Skip::Unsupported);
    }
    let inner: *mut u8 = ptr_at_fresh::<u8>(ctx, p.l4 + 8)?;
    // SAFETY: the ICMP header (8 bytes) and the quoted IP header's first byte were checked.
    let (ty, code, rest, ihl) = unsafe {
        (
            *h.l4,
            *h.l4.add(1),
            *(h.l4.add(4) as *const [u8; 4]),
            *inner & 0x0f,
        )
    };
    if V4 && ihl != 5 {
        return Err(Skip::Unsupported);
    }
    let mapped = if V4 {
        rfc7915::to_v6(ty, code, rest)
    } else {
        rfc7915::to_v4(ty, code, rest)
    };
    let drop = match mapped {
        Mapped::Send(..) => false,
        Mapped::Pass => return Err(Skip::Unsupported),
        Mapped::Drop => true,
    };
    if V4 && !ipv4_header_ok(ctx, p)? {
        return Err(Skip::BadChecksum);
    }
    if drop {
        st.add(stat::DROP_XLAT_ICMP, 1);
        return Ok(Some(xdp_action::XDP_DROP));
    }
    if h.hop_limit() <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Ok(Some(xdp_action::XDP_PASS));
    }
    // The outer source: the VIP (toward the client) or the SNAT address (toward the
    // backend) for the peer's own report, else the router's address in the other family:
    // an IPv4 one embedded in the prefix, an IPv6 one inside the prefix as the IPv4 address
    // it embeds (else the VIP or SNAT address: an IPv4 peer cannot be told an IPv6
    // address).
    let rev = &sc.rev;
    let (prefix, len) = (&cfg.xlat_prefix, cfg.xlat_prefix_len);
    let from = if outer_src == sc.owner.dst || outer_src == rev.client {
        rev.vip
    } else if V4 {
        rfc6052::embed(prefix, len, outer_src[0])
    } else if let Some(v4) = rfc6052::extract(&outer_src, prefix, len) {
        [v4, 0, 0, 0]
    } else {
        rev.vip
    };
    let to_family = rev.client_family;
    sc.xlat.src = from;
    sc.xlat.dst = rev.client;
    sc.xlat.family = to_family;
    sc.rkey.src = rev.client;
    sc.rkey.sport = rev.client_port;
    sc.rkey.dst = rev.vip;
    sc.rkey.dport = rev.vip_port;
    let len = if V4 {
        p.ip_len() + 40
    } else {
        p.ip_len().saturating_sub(40)
    };
    let icmp = if V4 { proto::ICMPV6 } else { proto::ICMP };
    let route = fib::lookup(
        ctx,
        to_family,
        icmp,
        &sc.xlat.src,
        &sc.xlat.dst,
        0,
        0,
        len as u16,
        &mut sc.xlat.hop,
    );
    Ok(match route {
        Route::Via => None,
        Route::None => {
            st.add(stat::DROP_NO_ROUTE, 1);
            Some(xdp_action::XDP_DROP)
        }
        // Untranslated, the stack can do nothing useful with it: it takes it as an error
        // about its own traffic and drops it.
        Route::TooBig(_) => {
            st.add(stat::PASS_NEEDS_FRAG, 1);
            Some(xdp_action::XDP_PASS)
        }
        Route::NoNeigh => {
            st.add(stat::PASS_NO_NEIGH, 1);
            Some(xdp_action::XDP_PASS)
        }
    })
}

/// One's complement sum of the `n` 16-bit words at `at` (as they sit in the packet).
///
/// Each word is added as it comes (the running sum goes through [`used`]), so the compiler
/// does not load them all first and spill them (the stack is 512 bytes for the whole call
/// chain).
///
/// # Safety
/// `2 · n` bytes at `at` must be within the checked packet.
#[inline(always)]
unsafe fn sum_at(at: *const u8, n: usize) -> u64 {
    let mut s = 0u64;
    for i in 0..n {
        // SAFETY: within the range the caller checked.
        let w = unsafe { *(at.add(2 * i) as *const u16) };
        s = used(s + u64::from(w));
    }
    s
}

/// What removing the `n` 16-bit words at `at` from a one's complement sum adds (in order, as
/// [`sum_at`]).
///
/// # Safety
/// As [`sum_at`].
#[inline(always)]
unsafe fn removed_at(at: *const u8, n: usize) -> u64 {
    let mut s = 0u64;
    for i in 0..n {
        // SAFETY: within the range the caller checked.
        let w = unsafe { *(at.add(2 * i) as *const u16) };
        s = used(s + u64::from(!w));
    }
    s
}

/// The ICMPv6 pseudo-header's words but its addresses: the upper-layer length and the next
/// header (58), each a 32-bit big-endian field.
#[inline(always)]
fn pseudo_rest(len: u16) -> u64 {
    u64::from(u16::from_ne_bytes(len.to_be_bytes())) + u64::from(u16::from_ne_bytes([0, 58]))
}

/// What removing [`pseudo_rest`] from a one's complement sum adds.
#[inline(always)]
fn pseudo_rest_removed(len: u16) -> u64 {
    u64::from(!u16::from_ne_bytes(len.to_be_bytes())) + u64::from(!u16::from_ne_bytes([0, 58]))
}

/// A big-endian 16-bit field.
///
/// # Safety
/// 2 bytes at `at` must be within the checked packet.
#[inline(always)]
unsafe fn be16(at: *const u8) -> u16 {
    // SAFETY: as the caller checked.
    unsafe { u16::from_be_bytes([*at, *at.add(1)]) }
}

/// Writes a 20-byte IPv4 header (no options, identification 0, DF) with its checksum.
///
/// # Safety
/// 20 bytes at `at` (an even offset) must be within the checked packet.
#[inline(always)]
unsafe fn write_ipv4(at: *mut u8, tos: u8, tot_len: u16, ttl_proto: [u8; 2], src: u32, dst: u32) {
    let t = tot_len.to_be_bytes();
    // SAFETY: as the caller checked.
    unsafe {
        *(at as *mut [u8; 8]) = [0x45, tos, t[0], t[1], 0, 0, 0x40, 0];
        *(at.add(8) as *mut [u8; 4]) = [ttl_proto[0], ttl_proto[1], 0, 0];
        store32(at.add(12), src);
        store32(at.add(16), dst);
        *(at.add(10) as *mut u16) = !csum::fold(sum_at(at, 10));
    }
}

/// The first 8 bytes of an IPv6 header: version, traffic class, flow label 0, payload
/// length, next header, hop limit.
#[inline(always)]
fn ipv6_start(tc: u8, plen: u16, nh: u8, hl: u8) -> [u8; 8] {
    let l = plen.to_be_bytes();
    [0x60 | tc >> 4, tc << 4, 0, 0, l[0], l[1], nh, hl]
}

/// Offset of the transport checksum in its header.
const fn csum_at(tcp: bool) -> usize {
    if tcp {
        16
    } else {
        6
    }
}

/// The quoted transport checksum, when the quote holds it (within the IP packet) and (for
/// UDP) it is not 0 (left as it is).
#[inline(always)]
fn quoted_csum<const TCP: bool>(ctx: &XdpContext, at: usize, ip_end: usize) -> Option<u16> {
    if at + 2 > ip_end {
        return None;
    }
    let c = ptr_at_fresh::<u16>(ctx, at).ok()?;
    // SAFETY: 2 bytes checked.
    let old = unsafe { *c };
    (TCP || old != 0).then_some(old)
}

/// Writes the quoted transport checksum `old` changed by `delta` at `at`: the ICMP
/// checksum's change by it.
#[inline(always)]
fn write_quoted_csum<const TCP: bool>(ctx: &XdpContext, at: usize, old: u16, delta: u64) -> u64 {
    let new = if TCP {
        csum::apply(old, delta)
    } else {
        csum::apply_udp(old, delta)
    };
    let Ok(c) = ptr_at_fresh::<u16>(ctx, at) else {
        return 0;
    };
    // SAFETY: 2 bytes checked.
    unsafe { *c = new };
    csum::diff16(old, new)
}

/// ICMPv6 (from an IPv6 backend side) → ICMP: 40 bytes fewer in front. Not inlined: each
/// copy's frame is its own, and only one is live at a time. The scratch entry's values are
/// each read once, after the move, so that none is kept across the helper call.
#[inline(never)]
fn to_v4<const TCP: bool>(ctx: &XdpContext, sc: &Scratch, ip_end: usize) -> Option<()> {
    // Ethernet, IPv6, ICMPv6, quoted IPv6, quoted ports.
    let h: *mut u8 = ptr_at_fresh::<[u8; 106]>(ctx, 0).ok()?.cast();
    // SAFETY: 106 bytes checked.
    let (tc, icmp_len, hl, ty, code, old_csum, rest, ports) = unsafe {
        (
            (*h.add(14) << 4) | (*h.add(15) >> 4),
            be16(h.add(18)),
            *h.add(21),
            *h.add(54),
            *h.add(55),
            *(h.add(56) as *const u16),
            *(h.add(58) as *const [u8; 4]),
            *(h.add(102) as *const [u16; 2]),
        )
    };
    // SAFETY: 106 bytes checked.
    let (i_tc, i_len, i_nh, i_hl) = unsafe {
        (
            (*h.add(62) << 4) | (*h.add(63) >> 4),
            be16(h.add(66)).saturating_add(20),
            *h.add(68),
            *h.add(69),
        )
    };
    let Mapped::Send(ty, code, rest) = rfc7915::to_v4(ty, code, rest) else {
        return None;
    };
    let quoted = quoted_csum::<TCP>(ctx, 102 + csum_at(TCP), ip_end);
    // Out of the quoted transport checksum: its pseudo-header's addresses. Out of the ICMP
    // checksum: the pseudo-header, type and code, the 4 bytes after the checksum, the
    // quoted IPv6 header.
    // SAFETY: within the 106 bytes checked (pointers from before any change).
    let (gone_l4, gone) = unsafe {
        (
            removed_at(h.add(70), 16),
            removed_at(h.add(22), 16)
                + removed_at(h.add(54), 1)
                + removed_at(h.add(58), 2)
                + removed_at(h.add(62), 20)
                + pseudo_rest_removed(icmp_len),
        )
    };
    // SAFETY: ctx.ctx is this invocation's xdp_md; every packet pointer is derived again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx as *mut _, 40) } != 0 {
        return None;
    }
    let (x, q) = (&sc.xlat, &sc.rkey);
    // Ethernet, IPv4, ICMP, quoted IPv4, quoted ports (every pointer before is stale).
    let h: *mut u8 = ptr_at_fresh::<[u8; 66]>(ctx, 0).ok()?.cast();
    // SAFETY: 66 bytes checked; IP headers at even offsets.
    let mut delta = unsafe {
        *(h.add(12) as *mut [u8; 2]) = [0x08, 0x00];
        write_ipv4(
            h.add(14),
            tc,
            // The ICMP message is 20 bytes shorter than the ICMPv6 one (the quoted header):
            // the total length is the IPv6 payload length.
            icmp_len,
            [hl.saturating_sub(1), proto::ICMP],
            x.src[0],
            x.dst[0],
        );
        *(h.add(34) as *mut [u8; 2]) = [ty, code];
        *(h.add(38) as *mut [u8; 4]) = rest;
        write_ipv4(h.add(42), i_tc, i_len, [i_hl, i_nh], q.src[0], q.dst[0]);
        *(h.add(62) as *mut [u16; 2]) = [q.sport, q.dport];
        gone + sum_at(h.add(34), 1) + sum_at(h.add(38), 2) + sum_at(h.add(42), 10)
    };
    // The quoted ports, in both checksums.
    // SAFETY: within the 66 bytes checked.
    let (ports_delta, addrs) = unsafe {
        (
            removed_at(ports.as_ptr().cast(), 2) + sum_at(h.add(62), 2),
            sum_at(h.add(54), 4),
        )
    };
    delta += ports_delta;
    if let Some(old) = quoted {
        delta +=
            write_quoted_csum::<TCP>(ctx, 62 + csum_at(TCP), old, gone_l4 + addrs + ports_delta);
    }
    let c = ptr_at_fresh::<u16>(ctx, 36).ok()?;
    // SAFETY: 2 bytes checked.
    unsafe { *c = csum::apply(old_csum, delta) };
    Some(())
}

/// ICMP (from an IPv4 backend side) → ICMPv6: 40 bytes more in front. Not inlined, as
/// [`to_v4`].
#[inline(never)]
fn to_v6<const TCP: bool>(ctx: &XdpContext, sc: &Scratch, ip_end: usize) -> Option<()> {
    // Ethernet, IPv4, ICMP, quoted IPv4 (no options), quoted ports.
    let h: *mut u8 = ptr_at_fresh::<[u8; 66]>(ctx, 0).ok()?.cast();
    // SAFETY: 66 bytes checked.
    let (tos, icmp_len, ttl, ty, code, old_csum, rest, ports) = unsafe {
        (
            *h.add(15),
            // The ICMPv6 message: the ICMP one (total length less 20) and the 20 more bytes
            // of the quoted IPv6 header.
            be16(h.add(16)),
            *h.add(22),
            *h.add(34),
            *h.add(35),
            *(h.add(36) as *const u16),
            *(h.add(38) as *const [u8; 4]),
            *(h.add(62) as *const [u16; 2]),
        )
    };
    // SAFETY: 66 bytes checked.
    let (i_tos, i_len, i_ttl, i_proto) = unsafe {
        (
            *h.add(43),
            be16(h.add(44)).saturating_sub(20),
            *h.add(50),
            *h.add(51),
        )
    };
    let Mapped::Send(ty, code, rest) = rfc7915::to_v6(ty, code, rest) else {
        return None;
    };
    let quoted = quoted_csum::<TCP>(ctx, 62 + csum_at(TCP), ip_end);
    // Out of the quoted transport checksum: its pseudo-header's addresses. Out of the ICMP
    // checksum: type and code, the 4 bytes after the checksum, the quoted IPv4 header.
    // SAFETY: within the 66 bytes checked (pointers from before any change).
    let (gone_l4, gone) = unsafe {
        (
            removed_at(h.add(54), 4),
            removed_at(h.add(34), 1) + removed_at(h.add(38), 2) + removed_at(h.add(42), 10),
        )
    };
    // SAFETY: ctx.ctx is this invocation's xdp_md; every packet pointer is derived again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx as *mut _, -40) } != 0 {
        return None;
    }
    let (x, q) = (&sc.xlat, &sc.rkey);
    // Ethernet, IPv6, ICMPv6, quoted IPv6, quoted ports (every pointer before is stale).
    let h: *mut u8 = ptr_at_fresh::<[u8; 106]>(ctx, 0).ok()?.cast();
    // SAFETY: 106 bytes checked; IP headers at even offsets.
    let mut delta = unsafe {
        *(h.add(12) as *mut [u8; 2]) = [0x86, 0xdd];
        *(h.add(14) as *mut [u8; 8]) =
            ipv6_start(tos, icmp_len, proto::ICMPV6, ttl.saturating_sub(1));
        store_addr(h.add(22), &x.src, false);
        store_addr(h.add(38), &x.dst, false);
        *(h.add(54) as *mut [u8; 2]) = [ty, code];
        *(h.add(58) as *mut [u8; 4]) = rest;
        *(h.add(62) as *mut [u8; 8]) = ipv6_start(i_tos, i_len, i_proto, i_ttl);
        store_addr(h.add(70), &q.src, false);
        store_addr(h.add(86), &q.dst, false);
        *(h.add(102) as *mut [u16; 2]) = [q.sport, q.dport];
        // Into the ICMPv6 checksum: the pseudo-header, type and code, the 4 bytes, the
        // quoted IPv6 header.
        gone + pseudo_rest(icmp_len)
            + sum_at(h.add(22), 16)
            + sum_at(h.add(54), 1)
            + sum_at(h.add(58), 2)
            + sum_at(h.add(62), 20)
    };
    // SAFETY: within the 106 bytes checked.
    let (ports_delta, addrs) = unsafe {
        (
            removed_at(ports.as_ptr().cast(), 2) + sum_at(h.add(102), 2),
            sum_at(h.add(70), 16),
        )
    };
    delta += ports_delta;
    if let Some(old) = quoted {
        delta +=
            write_quoted_csum::<TCP>(ctx, 102 + csum_at(TCP), old, gone_l4 + addrs + ports_delta);
    }
    let c = ptr_at_fresh::<u16>(ctx, 56).ok()?;
    // SAFETY: 2 bytes checked.
    unsafe { *c = csum::apply(old_csum, delta) };
    Some(())
}
