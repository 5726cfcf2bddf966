//! ICMP and ICMPv6: errors that quote a tracked flow are translated (outer and inner headers)
//! and sent to the right side, so path-MTU discovery and unreachable reports work through
//! the NAT; echo requests to a VIP are answered in XDP when configured, else passed.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use portico_xdp_common::{config_flags, family, proto, stat, Addr, Config, FlowKey, VipKey};

use crate::{
    csum,
    fib::{self, Route},
    maps::{self, Stats},
    nat::{backend, snat_addr},
    parse::{load_addr, ptr_at, store_addr, Parsed, Skip},
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// Handles an ICMP/ICMPv6 packet; `None` when it concerns no VIP or tracked flow.
#[inline(always)]
pub fn handle(ctx: &XdpContext, st: &Stats, p: &Parsed, cfg: &Config) -> Result<Option<u32>, Skip> {
    let hdr: *const [u8; 8] = ptr_at(ctx, p.l4)?;
    // SAFETY: 8 bytes checked.
    let icmp_type = unsafe { (*hdr)[0] };
    let v4 = p.family == family::V4;
    let is_error = if v4 {
        icmp_type == ICMP_DEST_UNREACH || icmp_type == ICMP_TIME_EXCEEDED
    } else {
        icmp_type == ICMPV6_DEST_UNREACH
            || icmp_type == ICMPV6_PKT_TOOBIG
            || icmp_type == ICMPV6_TIME_EXCEED
    };
    if is_error {
        return translate_error(ctx, st, p, cfg);
    }
    let is_echo = if v4 {
        icmp_type == ICMP_ECHO
    } else {
        icmp_type == ICMPV6_ECHO_REQUEST
    };
    if is_echo && cfg.flags & config_flags::ECHO_REPLY != 0 {
        return echo_reply(ctx, st, p);
    }
    Ok(None)
}

/// Reads the outer source and destination.
#[inline(always)]
fn outer_addrs(ctx: &XdpContext, p: &Parsed) -> Result<(Addr, Addr), Skip> {
    if p.family == family::V4 {
        let a: *const [u8; 8] = ptr_at(ctx, p.l3 + 12)?;
        let a = a.cast::<u8>();
        // SAFETY: 8 bytes checked.
        Ok(unsafe { (load_addr(a, true), load_addr(a.add(4), true)) })
    } else {
        let a: *const [u8; 32] = ptr_at(ctx, p.l3 + 8)?;
        let a = a.cast::<u8>();
        // SAFETY: 32 bytes checked.
        Ok(unsafe { (load_addr(a, false), load_addr(a.add(16), false)) })
    }
}

/// Echo request to a VIP address: answered in place and sent back (XDP_TX).
#[inline(always)]
fn echo_reply(ctx: &XdpContext, st: &Stats, p: &Parsed) -> Result<Option<u32>, Skip> {
    let (src, dst) = outer_addrs(ctx, p)?;
    let presence = VipKey {
        addr: dst,
        port: 0,
        proto: 0,
        family: p.family,
    };
    // SAFETY: read-only lookup.
    if unsafe { maps::SERVICES.get(presence) }.is_none() {
        return Ok(None);
    }
    let v4 = p.family == family::V4;
    // Type: request → reply; the checksum follows the change of the type/code word.
    let tc: *mut [u8; 4] = ptr_at(ctx, p.l4)?;
    // SAFETY: 4 bytes checked.
    let tc = unsafe { &mut *tc };
    let old = u16::from_ne_bytes([tc[0], tc[1]]);
    tc[0] = if v4 {
        ICMP_ECHO_REPLY
    } else {
        ICMPV6_ECHO_REPLY
    };
    let new = u16::from_ne_bytes([tc[0], tc[1]]);
    let c = u16::from_ne_bytes([tc[2], tc[3]]);
    let c = csum::apply(c, csum::diff16(old, new)).to_ne_bytes();
    tc[2] = c[0];
    tc[3] = c[1];
    // Swap addresses (sums unchanged) and MACs; fresh TTL.
    if v4 {
        let ip: *mut [u8; 20] = ptr_at(ctx, p.l3)?;
        // SAFETY: 20 bytes checked.
        let ip = unsafe { &mut *ip };
        let old_tp = u16::from_ne_bytes([ip[8], ip[9]]);
        ip[8] = 64;
        let new_tp = u16::from_ne_bytes([ip[8], ip[9]]);
        let c = csum::apply(
            u16::from_ne_bytes([ip[10], ip[11]]),
            csum::diff16(old_tp, new_tp),
        )
        .to_ne_bytes();
        ip[10] = c[0];
        ip[11] = c[1];
        let ip = ip.as_mut_ptr();
        // SAFETY: 20 bytes checked.
        unsafe {
            store_addr(ip.add(12), &dst, true);
            store_addr(ip.add(16), &src, true);
        }
    } else {
        let ip: *mut [u8; 40] = ptr_at(ctx, p.l3)?;
        let ip = ip.cast::<u8>();
        // SAFETY: 40 bytes checked.
        unsafe {
            *ip.add(7) = 64;
            store_addr(ip.add(8), &dst, false);
            store_addr(ip.add(24), &src, false);
        }
    }
    let eth: *mut [u16; 6] = ptr_at(ctx, 0)?;
    // SAFETY: 12 bytes checked; the frame starts at an even address.
    let eth = unsafe { &mut *eth };
    let [d0, d1, d2, s0, s1, s2] = *eth;
    *eth = [s0, s1, s2, d0, d1, d2];
    st.add(stat::ICMP_ECHO_REPLY, 1);
    Ok(Some(xdp_action::XDP_TX))
}

/// The quoted packet inside an ICMP error.
struct Inner {
    l3: usize,
    l4: usize,
    key: FlowKey,
}

#[inline(always)]
fn parse_inner(ctx: &XdpContext, p: &Parsed) -> Result<Option<Inner>, Skip> {
    let l3 = p.l4 + 8;
    let mut key = FlowKey {
        family: p.family,
        ..FlowKey::default()
    };
    let l4 = if p.family == family::V4 {
        let ip: *const [u8; 20] = ptr_at(ctx, l3)?;
        // SAFETY: 20 bytes checked.
        let ip = unsafe { &*ip };
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        if ihl < 20 {
            return Ok(None);
        }
        key.proto = ip[9];
        let ip = ip.as_ptr();
        // SAFETY: 20 bytes checked.
        unsafe {
            key.src = load_addr(ip.add(12), true);
            key.dst = load_addr(ip.add(16), true);
        }
        l3 + ihl
    } else {
        let ip: *const [u8; 40] = ptr_at(ctx, l3)?;
        // SAFETY: 40 bytes checked.
        let ip = unsafe { &*ip };
        key.proto = ip[6];
        let ip = ip.as_ptr();
        // SAFETY: 40 bytes checked.
        unsafe {
            key.src = load_addr(ip.add(8), false);
            key.dst = load_addr(ip.add(24), false);
        }
        l3 + 40
    };
    if key.proto != proto::TCP && key.proto != proto::UDP {
        return Ok(None);
    }
    let ports: *const [u16; 2] = ptr_at(ctx, l4)?;
    // SAFETY: 4 bytes checked.
    unsafe {
        key.sport = (*ports)[0];
        key.dport = (*ports)[1];
    }
    Ok(Some(Inner { l3, l4, key }))
}

/// Rewrites of one ICMP error.
struct Rewrite {
    outer_src: Addr,
    outer_dst: Addr,
    inner_src: Addr,
    inner_sport: u16,
    inner_dst: Addr,
    inner_dport: u16,
}

#[inline(always)]
fn translate_error(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    cfg: &Config,
) -> Result<Option<u32>, Skip> {
    let Some(inner) = parse_inner(ctx, p)? else {
        return Ok(None);
    };
    let (outer_src, outer_dst) = outer_addrs(ctx, p)?;
    let snat = snat_addr(cfg, p.family);
    let k = &inner.key;
    let rw = if outer_dst == snat && k.src == snat {
        // From the backend side, about a packet the node sent to a backend.
        let rkey = k.reversed();
        // SAFETY: read-only copy.
        let Some(rev) = (unsafe { maps::REV_NAT.get(rkey) }) else {
            return Ok(None);
        };
        Rewrite {
            // The backend's own report comes from the VIP; a router's keeps its address.
            outer_src: if outer_src == k.dst {
                rev.vip
            } else {
                outer_src
            },
            outer_dst: rev.client,
            inner_src: rev.client,
            inner_sport: rev.client_port,
            inner_dst: rev.vip,
            inner_dport: rev.vip_port,
        }
    } else if outer_dst == k.src {
        // From the client side, about a reply the node sent from a VIP.
        let fkey = k.reversed();
        // SAFETY: read-only copy.
        let Some(flow) = (unsafe { maps::CONNTRACK.get(fkey) }).copied() else {
            return Ok(None);
        };
        let Some(be) = backend(flow.backend_id) else {
            return Ok(None);
        };
        Rewrite {
            outer_src: snat,
            outer_dst: be.addr,
            inner_src: be.addr,
            inner_sport: be.port,
            inner_dst: snat,
            inner_dport: flow.snat_port,
        }
    } else {
        return Ok(None);
    };
    // TTL / hop limit 1: let the stack deal with it.
    let hop_off = if p.family == family::V4 {
        p.l3 + 8
    } else {
        p.l3 + 7
    };
    // SAFETY: checked by ptr_at.
    if unsafe { *ptr_at::<u8>(ctx, hop_off)? } <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Ok(Some(xdp_action::XDP_PASS));
    }
    apply(ctx, p, &inner, &outer_src, &outer_dst, &rw)?;
    st.add(stat::ICMP_ERROR_NAT, 1);
    let tot_len = if p.family == family::V4 {
        // SAFETY: checked by ptr_at.
        u16::from_be(unsafe { *ptr_at::<u16>(ctx, p.l3 + 2)? })
    } else {
        // SAFETY: checked by ptr_at.
        u16::from_be(unsafe { *ptr_at::<u16>(ctx, p.l3 + 4)? }).saturating_add(40)
    };
    let proto_ = if p.family == family::V4 {
        proto::ICMP
    } else {
        proto::ICMPV6
    };
    Ok(Some(
        match fib::lookup(
            ctx,
            p.family,
            proto_,
            &rw.outer_src,
            &rw.outer_dst,
            0,
            0,
            tot_len,
        ) {
            Route::Via(hop) => fib::send(ctx, st, &hop),
            Route::NoNeigh => {
                st.add(stat::PASS_NO_NEIGH, 1);
                xdp_action::XDP_PASS
            }
            Route::None => {
                st.add(stat::DROP_NO_ROUTE, 1);
                xdp_action::XDP_DROP
            }
        },
    ))
}

/// Writes the new outer and inner addresses and ports and fixes every checksum involved:
/// outer IPv4 header, inner IPv4 header, inner L4 (when quoted in full), ICMP.
#[inline(always)]
fn apply(
    ctx: &XdpContext,
    p: &Parsed,
    inner: &Inner,
    outer_src: &Addr,
    outer_dst: &Addr,
    rw: &Rewrite,
) -> Result<(), Skip> {
    let k = &inner.key;
    let v4 = p.family == family::V4;
    // Changes inside the ICMP payload (the quoted packet), as one's complement deltas.
    let inner_addr_delta = if v4 {
        csum::diff32(k.src[0], rw.inner_src[0]) + csum::diff32(k.dst[0], rw.inner_dst[0])
    } else {
        csum::diff128(&k.src, &rw.inner_src) + csum::diff128(&k.dst, &rw.inner_dst)
    };
    let inner_port_delta =
        csum::diff16(k.sport, rw.inner_sport) + csum::diff16(k.dport, rw.inner_dport);
    let mut icmp_delta = inner_addr_delta + inner_port_delta;

    // Inner L4 checksum, when the quote includes it.
    let l4_csum_off = if k.proto == proto::TCP {
        inner.l4 + 16
    } else {
        inner.l4 + 6
    };
    if let Ok(c) = ptr_at::<u16>(ctx, l4_csum_off) {
        // SAFETY: checked.
        unsafe {
            let old = *c;
            if !(v4 && k.proto == proto::UDP && old == 0) {
                let new = if k.proto == proto::UDP {
                    csum::apply_udp(old, inner_addr_delta + inner_port_delta)
                } else {
                    csum::apply(old, inner_addr_delta + inner_port_delta)
                };
                *c = new;
                icmp_delta += csum::diff16(old, new);
            }
        }
    }
    // Inner IPv4 header.
    if v4 {
        let ip: *mut [u8; 20] = ptr_at(ctx, inner.l3)?;
        // SAFETY: 20 bytes checked.
        let ip = unsafe { &mut *ip };
        let old = u16::from_ne_bytes([ip[10], ip[11]]);
        let new = csum::apply(old, inner_addr_delta);
        icmp_delta += csum::diff16(old, new);
        let b = new.to_ne_bytes();
        ip[10] = b[0];
        ip[11] = b[1];
        let ip = ip.as_mut_ptr();
        // SAFETY: 20 bytes checked.
        unsafe {
            store_addr(ip.add(12), &rw.inner_src, true);
            store_addr(ip.add(16), &rw.inner_dst, true);
        }
    } else {
        let ip: *mut [u8; 40] = ptr_at(ctx, inner.l3)?;
        let ip = ip.cast::<u8>();
        // SAFETY: 40 bytes checked.
        unsafe {
            store_addr(ip.add(8), &rw.inner_src, false);
            store_addr(ip.add(24), &rw.inner_dst, false);
        }
    }
    let ports: *mut [u16; 2] = ptr_at(ctx, inner.l4)?;
    // SAFETY: 4 bytes checked.
    unsafe {
        (*ports)[0] = rw.inner_sport;
        (*ports)[1] = rw.inner_dport;
    }
    // Outer header; ICMPv6 also covers the outer addresses in its pseudo-header.
    if v4 {
        let ip: *mut [u8; 20] = ptr_at(ctx, p.l3)?;
        // SAFETY: 20 bytes checked.
        let ip = unsafe { &mut *ip };
        let old_tp = u16::from_ne_bytes([ip[8], ip[9]]);
        ip[8] -= 1;
        let new_tp = u16::from_ne_bytes([ip[8], ip[9]]);
        let delta = csum::diff32(outer_src[0], rw.outer_src[0])
            + csum::diff32(outer_dst[0], rw.outer_dst[0])
            + csum::diff16(old_tp, new_tp);
        let c = csum::apply(u16::from_ne_bytes([ip[10], ip[11]]), delta).to_ne_bytes();
        ip[10] = c[0];
        ip[11] = c[1];
        let ip = ip.as_mut_ptr();
        // SAFETY: 20 bytes checked.
        unsafe {
            store_addr(ip.add(12), &rw.outer_src, true);
            store_addr(ip.add(16), &rw.outer_dst, true);
        }
    } else {
        let ip: *mut [u8; 40] = ptr_at(ctx, p.l3)?;
        let ip = ip.cast::<u8>();
        // SAFETY: 40 bytes checked.
        unsafe {
            *ip.add(7) -= 1;
            store_addr(ip.add(8), &rw.outer_src, false);
            store_addr(ip.add(24), &rw.outer_dst, false);
        }
        icmp_delta +=
            csum::diff128(outer_src, &rw.outer_src) + csum::diff128(outer_dst, &rw.outer_dst);
    }
    let c: *mut u16 = ptr_at(ctx, p.l4 + 2)?;
    // SAFETY: checked.
    unsafe { *c = csum::apply(*c, icmp_delta) };
    Ok(())
}
