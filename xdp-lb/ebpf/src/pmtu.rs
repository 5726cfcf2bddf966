//! Path MTU: a packet too big for its next hop is answered with ICMP fragmentation needed
//! (IPv4 with DF) or ICMPv6 packet too big, built in place of the packet and sent back, as
//! a router would. Without the answer the sender never learns the MTU: a black hole.
//!
//! The answer is a global BPF function: the verifier checks it once, not once per way the
//! packet path can reach it. Its link-layer length (no VLAN tag, one, two) and family are
//! constants of six copies of the code, so every offset in it is a constant.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::generated::{
        bpf_jiffies64, bpf_xdp_adjust_head, bpf_xdp_adjust_tail, bpf_xdp_get_buff_len,
    },
    programs::XdpContext,
};
use portico_xdp_common::{family, proto, stat, Config};

use crate::{
    csum,
    maps::{self, Stats},
    parse::{load32, ptr_at, ptr_at_fresh, used, Parsed},
};

/// Answers per CPU per second, at most (the kernel's `icmp_msgs_per_sec` default is 1000
/// for a whole node); over the limit the packet is dropped, counted as `drop_too_big`.
pub const TOO_BIG_PER_SECOND: u32 = 1000;
/// The most of the offending packet an answer quotes, so that it stays within 576 bytes
/// (IPv4, RFC 1812) or 1280 (IPv6, RFC 4443).
const QUOTE_V4: usize = 576 - 20 - 8;
const QUOTE_V6: usize = 1280 - 40 - 8;
/// Bound on the offsets the quote's checksum reads (the verifier needs one).
const FAR: usize = 2048;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;

/// Answers the packet `p` describes, too big for a next hop of `mtu` bytes: the verdict
/// (XDP_TX with the answer in place of the packet, or XDP_DROP).
#[inline(always)]
pub fn too_big(ctx: &XdpContext, p: &Parsed, mtu: u32) -> u32 {
    portico_too_big(
        ctx.ctx,
        p.l3 as u32,
        p.ip_end as u32,
        u32::from(p.family),
        mtu,
    )
}

/// The global function behind [`too_big`]; arguments are plain integers (and the
/// context), as the verifier wants them for a function it checks on its own.
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_too_big(
    ctx: *mut xdp_md,
    l3: u32,
    ip_end: u32,
    fam: u32,
    mtu: u32,
) -> u32 {
    let ctx = XdpContext::new(ctx);
    let (l3, ip_end, fam, mtu) = (
        used(l3.into()) as u32,
        used(ip_end.into()) as u32,
        used(fam.into()) as u32,
        used(mtu.into()) as u32,
    );
    let (Some(st), Some(cfg)) = (Stats::get(), maps::CONFIG.get(0)) else {
        return xdp_action::XDP_DROP;
    };
    let v4 = fam == u32::from(family::V4);
    let ip_end = ip_end as usize;
    let answered = match (l3, v4) {
        (14, true) => answer::<14, true>(&ctx, ip_end, mtu, cfg),
        (18, true) => answer::<18, true>(&ctx, ip_end, mtu, cfg),
        (22, true) => answer::<22, true>(&ctx, ip_end, mtu, cfg),
        (14, false) => answer::<14, false>(&ctx, ip_end, mtu, cfg),
        (18, false) => answer::<18, false>(&ctx, ip_end, mtu, cfg),
        (22, false) => answer::<22, false>(&ctx, ip_end, mtu, cfg),
        _ => None,
    };
    match answered {
        Some(verdict) => {
            st.add(stat::ICMP_TOO_BIG, 1);
            verdict
        }
        None => {
            st.add(stat::DROP_TOO_BIG, 1);
            xdp_action::XDP_DROP
        }
    }
}

/// Takes one answer from this CPU's budget; `false` when it is spent for this second.
#[inline(always)]
fn allowed(cfg: &Config) -> bool {
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: plain helper call (inlined by the verifier).
    let now = unsafe { bpf_jiffies64() };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    if now.wrapping_sub(sc.too_big_window) >= u64::from(cfg.hz) {
        sc.too_big_window = now;
        sc.too_big_sent = 0;
    }
    if sc.too_big_sent >= TOO_BIG_PER_SECOND {
        return false;
    }
    sc.too_big_sent += 1;
    true
}

/// A pointer to `T` at `off`, for reads past [`crate::parse::MAX_OFFSET`] (the quote).
#[inline(always)]
fn ptr_far<T>(ctx: &XdpContext, off: usize) -> Option<*const T> {
    if off + core::mem::size_of::<T>() > FAR {
        return None;
    }
    let at = ctx.data() + off;
    (at + core::mem::size_of::<T>() <= ctx.data_end()).then_some(at as *const T)
}

/// Builds the answer for a link-layer header of `L3` bytes: cuts the frame after the
/// quote, makes room for the new IP and ICMP headers in front, moves the link-layer header
/// (VLAN tags included) there with the MACs swapped, and writes the headers: from the
/// packet's destination (the VIP, or the SNAT address for a reply) to its source. `None`
/// when rate-limited or the frame cannot be resized.
#[inline(always)]
fn answer<const L3: usize, const V4: bool>(
    ctx: &XdpContext,
    ip_end: usize,
    mtu: u32,
    cfg: &Config,
) -> Option<u32> {
    if !allowed(cfg) {
        return None;
    }
    // The addresses, read before anything moves.
    let ip = ptr_at::<[u32; 10]>(ctx, L3).ok()?;
    // SAFETY: 40 bytes checked (an IPv4 packet this big has them too).
    let ip = unsafe { &*ip };
    let (src, dst) = if V4 {
        ([ip[3], 0, 0, 0], [ip[4], 0, 0, 0])
    } else {
        ([ip[2], ip[3], ip[4], ip[5]], [ip[6], ip[7], ip[8], ip[9]])
    };
    let (ip_hdr, hdr) = if V4 { (20, 28) } else { (40, 48) };
    let linear = ctx.data_end() - ctx.data();
    let quote = ip_end
        .saturating_sub(L3)
        .min(if V4 { QUOTE_V4 } else { QUOTE_V6 })
        .min(linear.saturating_sub(L3));
    // SAFETY: ctx.ctx is this invocation's xdp_md; both helpers check their arguments.
    let resized = unsafe {
        let total = bpf_xdp_get_buff_len(ctx.ctx) as i64;
        let keep = (L3 + quote) as i64;
        (keep >= total || bpf_xdp_adjust_tail(ctx.ctx, (keep - total) as i32) == 0)
            && bpf_xdp_adjust_head(ctx.ctx, -(hdr as i32)) == 0
    };
    if !resized {
        return None;
    }
    // Link layer: from [hdr, hdr + L3) to [0, L3), MACs swapped (no overlap: hdr >= 28).
    let old = ptr_at::<[u8; L3]>(ctx, hdr).ok()?;
    let new = ptr_at::<[u8; L3]>(ctx, 0).ok()?;
    // SAFETY: L3 bytes each, checked.
    unsafe {
        let old = &*old;
        let new = &mut *new;
        new[..6].copy_from_slice(&old[6..12]);
        new[6..12].copy_from_slice(&old[..6]);
        new[12..].copy_from_slice(&old[12..]);
    }
    let upper_len = 8 + quote;
    let mut sum: u64 = 0;
    if V4 {
        let h = ptr_at::<[u8; 28]>(ctx, L3).ok()?;
        // SAFETY: 28 bytes checked.
        let h = unsafe { &mut *h };
        let tot = ((ip_hdr + upper_len) as u16).to_be_bytes();
        let m = (mtu.min(0xffff) as u16).to_be_bytes();
        // Precedence "internetwork control" as the kernel sends its errors; no DF.
        *h = [
            0x45,
            0xc0,
            tot[0],
            tot[1],
            0,
            0,
            0,
            0,
            64,
            proto::ICMP,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            ICMP_DEST_UNREACH,
            ICMP_FRAG_NEEDED,
            0,
            0,
            0,
            0,
            m[0],
            m[1],
        ];
        let a = dst[0].to_ne_bytes();
        let b = src[0].to_ne_bytes();
        h[12..16].copy_from_slice(&a);
        h[16..20].copy_from_slice(&b);
        let mut ip_sum = 0u64;
        for w in h[..20].chunks_exact(2) {
            ip_sum += u64::from(u16::from_ne_bytes([w[0], w[1]]));
        }
        let c = (!csum::fold(ip_sum)).to_ne_bytes();
        h[10] = c[0];
        h[11] = c[1];
    } else {
        let h = ptr_at::<[u32; 12]>(ctx, L3).ok()?;
        // SAFETY: 48 bytes checked.
        let h = unsafe { &mut *h };
        let plen = upper_len as u32;
        *h = [
            u32::from_be(0x6000_0000),
            u32::from_be((plen << 16) | (u32::from(proto::ICMPV6) << 8) | 64),
            dst[0],
            dst[1],
            dst[2],
            dst[3],
            src[0],
            src[1],
            src[2],
            src[3],
            u32::from_be(u32::from(ICMPV6_PKT_TOOBIG) << 24),
            mtu.to_be(),
        ];
        // ICMPv6's pseudo-header: addresses, upper-layer length, next header.
        for w in &h[2..10] {
            sum += u64::from(*w);
        }
        sum += u64::from(plen.to_be()) + u64::from(u32::from(proto::ICMPV6).to_be());
    }
    // The ICMP header and the quote, a word at a time.
    let start = L3 + ip_hdr;
    let end = start + upper_len;
    let mut off = start;
    for _ in 0..(QUOTE_V6 + 8) / 4 {
        if off + 4 > end {
            break;
        }
        let w = ptr_far::<[u8; 4]>(ctx, off)?;
        // SAFETY: 4 bytes checked.
        sum += u64::from(unsafe { load32(w.cast()) });
        off += 4;
    }
    if off + 2 <= end {
        let w = ptr_far::<u16>(ctx, off)?;
        // SAFETY: 2 bytes checked.
        sum += u64::from(unsafe { *w });
        off += 2;
    }
    if off < end {
        let b = ptr_far::<u8>(ctx, off)?;
        // SAFETY: 1 byte checked. An odd last byte is the high half of a zero-padded word.
        sum += u64::from(u16::from_ne_bytes([unsafe { *b }, 0]));
    }
    let c = ptr_at_fresh::<u16>(ctx, start + 2).ok()?;
    // SAFETY: 2 bytes checked.
    unsafe { *c = !csum::fold(sum) };
    Some(xdp_action::XDP_TX)
}
