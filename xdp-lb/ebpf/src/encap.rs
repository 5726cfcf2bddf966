//! Direct server return: a client's packet to a DSR service goes to its backend unchanged
//! (no DNAT, no SNAT, TTL as it came) inside an outer header from the node to the backend;
//! the backend (`portico decap`) strips it and answers the client itself.
//!
//! Backend selection and connection tracking are NAT's ([`crate::nat`]); where NAT would
//! rewrite the packet, a DSR backend's path asks for [`ENCAP`] instead, and the entry point
//! (or the fast path) calls [`forward`]: a global function per inner and outer family,
//! checked once each by the verifier, whose frame never stacks on a slow path's.
//!
//! Outer headers, by the client's family (inner) and the backend's (outer):
//!
//! | inner | outer | `encap::IPIP` | `encap::GUE` |
//! | --- | --- | --- | --- |
//! | IPv4 | IPv4 | IPIP (protocol 4) | UDP to the GUE port |
//! | IPv6 | IPv6 | IP6IP6 (next header 41) | UDP to the GUE port |
//! | IPv4 | IPv6 | 4in6 (next header 4) | UDP to the GUE port |
//! | IPv6 | IPv4 | 6in4 (protocol 41) | UDP to the GUE port |
//!
//! The outer source carries the flow's entropy for the backend's RSS and ECMP: the bits of
//! `Config::dsr_v4_mask` / `dsr_v6_mask` come from the flow hash, the rest from the
//! configured prefix (or the SNAT address). GUE's source port and the outer IPv6 flow label
//! come from the hash too. The outer IPv4 header has DF set (the packet is sized against the
//! next hop here), TTL / hop limit 64, the inner TOS / traffic class (ECN included, RFC 6040
//! normal mode). GUE's UDP checksum is 0 for both families: over IPv6 as RFC 6935 and 6936
//! allow for tunnels, the inner packet carrying its own checksums.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::generated::bpf_xdp_adjust_head,
    programs::XdpContext,
};
use portico_xdp_common::{encap, family, stat, Addr, Backend, Config, FlowKey};

use crate::{
    csum,
    fib::{self, Route},
    maps::{self, count, Stats},
    nat,
    parse::{load32, ptr_at_fresh, store32, store_addr, used, Headers, Parsed},
};

/// A slow path's answer for a DSR backend: this bit, [`ENCAP_NEW`] for a new flow, and the
/// backend id in the low 24 bits (ids are below 2^20). The entry point then calls
/// [`forward`].
pub const ENCAP: u32 = 0x0800_0000;
/// With [`ENCAP`]: the packet starts a flow (the backend's new-flow counter).
pub const ENCAP_NEW: u32 = 0x0400_0000;
/// The backend id bits of an [`ENCAP`] verdict.
const ID: u32 = 0x00ff_ffff;
/// The fast path's step for a DSR backend (in the entry point's step bits `0xf00`, beside
/// its `SLOW_*` steps), the backend id in bits 12 to 31: the entry point calls [`forward`]
/// once the fast path's frame is gone (the stack holds 512 bytes for the chain of calls).
pub const FAST_STEP: u32 = 0x400;

/// The fast path's step toward the backend `backend_id` (below 2^20).
#[inline(always)]
pub fn fast_step(backend_id: u32) -> u32 {
    FAST_STEP | backend_id << 12
}

/// The [`ENCAP`] verdict of a [`fast_step`].
#[inline(always)]
pub fn of_fast_step(step: u32) -> u32 {
    request(step >> 12, false)
}
/// [`portico_encap4`]'s answer for a packet too big once encapsulated: this bit, and the MTU
/// to tell the client in the low 16 bits.
const TOO_BIG: u32 = 0x4000_0000;
/// Outer hop limit / TTL.
const OUTER_TTL: u8 = 64;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_UDP: u8 = 17;

/// The verdict of a slow path that found a DSR backend: [`ENCAP`] for [`forward`].
#[inline(always)]
pub fn request(backend_id: u32, new_flow: bool) -> u32 {
    ENCAP | if new_flow { ENCAP_NEW } else { 0 } | (backend_id & ID)
}

/// Encapsulates the packet `p` toward the backend of an [`ENCAP`] verdict and sends it;
/// answers with ICMP instead when it would not fit the next hop. The verdict.
#[inline(always)]
pub fn forward(ctx: &XdpContext, p: &Parsed, verdict: u32) -> u32 {
    let (hdr, meta) = p.pack(0);
    let v = if p.family == family::V4 {
        portico_encap4(ctx.ctx, hdr, meta, u64::from(verdict))
    } else {
        portico_encap6(ctx.ctx, hdr, meta, u64::from(verdict))
    };
    if v & TOO_BIG != 0 {
        crate::pmtu::too_big(ctx, p, v & 0xffff)
    } else {
        v
    }
}

/// [`forward`] for an IPv4 client packet (either outer family).
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_encap4(ctx: *mut xdp_md, hdr: u64, meta: u64, verdict: u64) -> u32 {
    encap_entry::<true>(ctx, hdr, meta, verdict)
}

/// [`forward`] for an IPv6 client packet (either outer family).
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_encap6(ctx: *mut xdp_md, hdr: u64, meta: u64, verdict: u64) -> u32 {
    encap_entry::<false>(ctx, hdr, meta, verdict)
}

#[inline(always)]
fn encap_entry<const IN4: bool>(ctx: *mut xdp_md, hdr: u64, meta: u64, verdict: u64) -> u32 {
    let ctx = XdpContext::new(ctx);
    let (hdr, meta, verdict) = (used(hdr), used(meta), used(verdict) as u32);
    let (Some(st), Some(cfg)) = (Stats::get(), maps::CONFIG.get(0)) else {
        return xdp_action::XDP_PASS;
    };
    let (p, _) = Parsed::unpack(hdr, meta);
    let id = verdict & ID;
    let Some(be) = nat::backend_ptr(id) else {
        st.add(stat::DROP_NO_BACKEND, 1);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: valid map value pointer; only the next-hop cache is written through it.
    let be = unsafe { &mut *be };
    // Only an untagged Ethernet header is moved in front of the outer header.
    if p.l3 != 14 {
        st.add(stat::PASS_UNSUPPORTED, 1);
        return xdp_action::XDP_PASS;
    }
    let way = match be.family {
        family::V4 => encapsulate::<IN4, true>(&ctx, &st, cfg, &p, be),
        family::V6 => encapsulate::<IN4, false>(&ctx, &st, cfg, &p, be),
        _ => Err(xdp_action::XDP_DROP),
    };
    match way {
        Ok(true) => {
            st.add(stat::DSR_ENCAP, 1);
            count(
                &maps::BACKEND_STATS,
                id,
                p.ip_end as u64,
                verdict & ENCAP_NEW != 0,
            );
            fib::send(&ctx, &st, &be.hop)
        }
        Ok(false) => {
            // Encapsulated, and left to the stack to resolve the neighbour.
            st.add(stat::DSR_ENCAP, 1);
            st.add(stat::PASS_NO_NEIGH, 1);
            xdp_action::XDP_PASS
        }
        Err(verdict) => verdict,
    }
}

/// What the outer header needs from the client's packet, read before anything moves.
struct Inner {
    /// The flow hash: entropy for the outer source, GUE source port and flow label.
    hash: u32,
    /// TOS / traffic class.
    tos: u8,
    /// IPv4 without DF: a router may fragment it.
    may_fragment: bool,
    /// The first 12 bytes of the Ethernet header (kept for a packet left to the stack).
    macs: [u32; 3],
}

/// Reads [`Inner`] from the checked headers of `p` (the transport header's first 8 bytes
/// hold the ports, for TCP, UDP and SCTP alike).
#[inline(always)]
fn inner<const IN4: bool>(ctx: &XdpContext, p: &Parsed, cfg: &Config) -> Option<Inner> {
    let h = Headers::<IN4, false>::of(ctx, p).ok()?;
    let eth = ptr_at_fresh::<[u8; 12]>(ctx, 0).ok()?.cast::<u8>();
    let (src, dst) = h.addrs();
    // SAFETY: the transport header's first 8 bytes, the IP header and 12 Ethernet bytes
    // are checked.
    let ([sport, dport], b0, b1, macs) = unsafe {
        (
            *(h.l4 as *const [u16; 2]),
            *h.ip,
            *h.ip.add(1),
            [load32(eth), load32(eth.add(4)), load32(eth.add(8))],
        )
    };
    let key = FlowKey {
        src,
        dst,
        sport,
        dport,
        proto: p.proto,
        family: p.family,
        _pad: [0; 2],
    };
    Some(Inner {
        hash: nat::flow_hash(&key, cfg.hash_seed, false),
        tos: if IN4 { b1 } else { (b0 << 4) | (b1 >> 4) },
        may_fragment: h.may_fragment(),
        macs,
    })
}

/// The outer source toward a backend of the family `OUT4` picks, for a flow of `hash`.
#[inline(always)]
fn outer_source<const OUT4: bool>(cfg: &Config, hash: u32) -> Addr {
    if OUT4 {
        let base = if cfg.dsr_v4 != 0 {
            cfg.dsr_v4
        } else {
            cfg.snat_v4
        };
        [
            (base & !cfg.dsr_v4_mask) | (hash & cfg.dsr_v4_mask),
            0,
            0,
            0,
        ]
    } else {
        let mut a = if cfg.dsr_v6 != [0; 4] {
            cfg.dsr_v6
        } else {
            cfg.snat_v6
        };
        a[3] = (a[3] & !cfg.dsr_v6_mask) | (hash & cfg.dsr_v6_mask);
        a
    }
}

/// Sizes the encapsulated packet against the next hop (resolving it if its cache is stale),
/// then writes the outer header. `Ok(true)`: ready to send by `be.hop`; `Ok(false)`: left to
/// the stack (no neighbour entry yet); `Err`: the verdict (an ICMP request with
/// [`TOO_BIG`], a drop, a pass), the packet untouched.
#[inline(always)]
fn encapsulate<const IN4: bool, const OUT4: bool>(
    ctx: &XdpContext,
    st: &Stats,
    cfg: &Config,
    p: &Parsed,
    be: &mut Backend,
) -> Result<bool, u32> {
    let Some(inner) = inner::<IN4>(ctx, p, cfg) else {
        st.add(stat::PASS_MALFORMED, 1);
        return Err(xdp_action::XDP_PASS);
    };
    let gue = be.encap == encap::GUE;
    let overhead = if OUT4 { 20 } else { 40 } + if gue { 8 } else { 0 };
    let len = p.ip_len() + overhead;
    // The outer length fields hold 16 bits (IPv6: the payload, the outer header excluded).
    if len - if OUT4 { 0 } else { 40 } > 0xffff {
        st.add(stat::PASS_UNSUPPORTED, 1);
        return Err(xdp_action::XDP_PASS);
    }
    let src = outer_source::<OUT4>(cfg, inner.hash);
    let sport = (0x8000 | (inner.hash >> 16) as u16).to_be();
    let oproto = match (gue, IN4) {
        (true, _) => IPPROTO_UDP,
        (false, true) => IPPROTO_IPIP,
        (false, false) => IPPROTO_IPV6,
    };
    let now = nat::now();
    let mut to_hop = true;
    if !nat::hop_fresh(&be.hop, len, now) {
        let hop: *mut portico_xdp_common::NextHop = &mut be.hop;
        // SAFETY: `hop` is a field of the map value `be`, disjoint from the address.
        match fib::lookup(
            ctx,
            be.family,
            oproto,
            &src,
            &be.addr,
            if gue { sport } else { 0 },
            if gue { cfg.gue_port } else { 0 },
            len as u16,
            unsafe { &mut *hop },
        ) {
            Route::Via => be.hop.expires = (now + u64::from(cfg.hz)) as u32,
            Route::NoNeigh => to_hop = false,
            Route::TooBig(mtu) => {
                if inner.may_fragment {
                    // No fragmenting here, and the backend reassembles no outer fragments.
                    st.add(stat::DROP_TOO_BIG, 1);
                    return Err(xdp_action::XDP_DROP);
                }
                return Err(TOO_BIG | mtu.saturating_sub(overhead as u32).min(0xffff));
            }
            Route::None => {
                st.add(stat::DROP_NO_ROUTE, 1);
                return Err(xdp_action::XDP_DROP);
            }
        }
    }
    let written = match (gue, OUT4) {
        (false, true) => write::<20>(ctx, &inner, &src, be, len, oproto, 0),
        (true, true) => write::<28>(ctx, &inner, &src, be, len, oproto, cfg.gue_port),
        (false, false) => write::<40>(ctx, &inner, &src, be, len, oproto, 0),
        (true, false) => write::<48>(ctx, &inner, &src, be, len, oproto, cfg.gue_port),
    };
    if written.is_none() {
        // Refused before anything was written (adjust_head failed), or the frame is shorter
        // after it than it was before (never).
        st.add(stat::PASS_UNSUPPORTED, 1);
        return Err(xdp_action::XDP_PASS);
    }
    Ok(to_hop)
}

/// Makes room for `OH` bytes of outer header (20 or 40 for IPv4 or IPv6, 8 more for GUE's
/// UDP) and writes the Ethernet type and the outer header; the MACs are the old ones (the
/// next hop's are written when sent). `len`: the outer packet's length.
#[inline(always)]
fn write<const OH: usize>(
    ctx: &XdpContext,
    inner: &Inner,
    src: &Addr,
    be: &Backend,
    len: usize,
    oproto: u8,
    gue_port: u16,
) -> Option<()> {
    let out4 = OH == 20 || OH == 28;
    // SAFETY: ctx.ctx is this invocation's xdp_md; every packet pointer is derived again.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx as *mut _, -(OH as i32)) } != 0 {
        return None;
    }
    let h: *mut u8 = match OH {
        20 => ptr_at_fresh::<[u8; 14 + 20]>(ctx, 0).ok()?.cast(),
        28 => ptr_at_fresh::<[u8; 14 + 28]>(ctx, 0).ok()?.cast(),
        40 => ptr_at_fresh::<[u8; 14 + 40]>(ctx, 0).ok()?.cast(),
        _ => ptr_at_fresh::<[u8; 14 + 48]>(ctx, 0).ok()?.cast(),
    };
    let l = (len as u16).to_be_bytes();
    // SAFETY: the Ethernet header and the `OH` bytes after it are checked above.
    unsafe {
        store32(h, inner.macs[0]);
        store32(h.add(4), inner.macs[1]);
        store32(h.add(8), inner.macs[2]);
        let udp_at = if out4 {
            *(h.add(12) as *mut [u8; 2]) = [0x08, 0x00];
            let mut ip: [u8; 12] = [
                0x45, inner.tos, l[0], l[1], 0, 0, 0x40, 0, OUTER_TTL, oproto, 0, 0,
            ];
            let mut sum = u64::from(src[0]) + u64::from(be.addr[0]);
            for i in 0..6 {
                sum += u64::from(u16::from_ne_bytes([ip[2 * i], ip[2 * i + 1]]));
            }
            let c = (!csum::fold(sum)).to_ne_bytes();
            ip[10] = c[0];
            ip[11] = c[1];
            *(h.add(14) as *mut [u8; 12]) = ip;
            store32(h.add(26), src[0]);
            store32(h.add(30), be.addr[0]);
            34
        } else {
            *(h.add(12) as *mut [u8; 2]) = [0x86, 0xdd];
            let plen = ((len - 40) as u16).to_be_bytes();
            let flow = inner.hash & 0x000f_ffff;
            *(h.add(14) as *mut [u8; 8]) = [
                0x60 | inner.tos >> 4,
                inner.tos << 4 | (flow >> 16) as u8,
                (flow >> 8) as u8,
                flow as u8,
                plen[0],
                plen[1],
                oproto,
                OUTER_TTL,
            ];
            store_addr(h.add(22), src, false);
            store_addr(h.add(38), &be.addr, false);
            54
        };
        if OH == 28 || OH == 48 {
            let sport = (0x8000 | (inner.hash >> 16) as u16).to_be();
            let ulen = ((len - (udp_at - 14)) as u16).to_be_bytes();
            *(h.add(udp_at) as *mut [u16; 2]) = [sport, gue_port];
            *(h.add(udp_at + 4) as *mut [u8; 4]) = [ulen[0], ulen[1], 0, 0];
        }
    }
    Some(())
}
