//! ICMP and ICMPv6: errors that quote a tracked flow are translated (outer and inner headers)
//! and sent to the right side, so path-MTU discovery and unreachable reports work through
//! the NAT; echo requests to a VIP are answered in XDP when configured, else passed.
//!
//! A global BPF function, checked once by the verifier. Each header is reached through one
//! checked pointer (outer IP, ICMP, quoted IP, quoted ports) at constant offsets.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    programs::XdpContext,
};
use portico_xdp_common::{
    config_flags, family, flow_flags, proto, stat, Config, FlowKey, NextHop, VipKey,
};

use crate::{
    csum,
    fib::{self, Route},
    maps::{self, Stats},
    nat::{backend, snat_addr},
    parse::{
        ipv4_header_ok, load_addr, ptr_at, ptr_at_fresh, store_addr, used, Headers, Parsed, Skip,
    },
};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_TIME_EXCEED: u8 = 3;
const ICMPV6_PARAM_PROB: u8 = 4;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// What [`portico_icmp4`]/[`portico_icmp6`] return for a packet that concerns no VIP or
/// tracked flow.
pub const NOT_MINE: u32 = u32::MAX;

/// Handles an ICMP/ICMPv6 packet (`hdr` and `meta` are [`Parsed::pack`]'s): the verdict, or
/// [`NOT_MINE`].
#[inline(always)]
pub fn handle_packet(ctx: &XdpContext, p: &Parsed) -> u32 {
    let (hdr, meta) = p.pack(0);
    if p.family == family::V4 {
        portico_icmp4(ctx.ctx, hdr, meta)
    } else {
        portico_icmp6(ctx.ctx, hdr, meta)
    }
}

/// ICMP (IPv4): a global function of its own (the two families' frames do not fit in one).
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_icmp4(ctx: *mut xdp_md, hdr: u64, meta: u64) -> u32 {
    icmp_entry::<true>(ctx, hdr, meta)
}

/// ICMPv6: a global function of its own.
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_icmp6(ctx: *mut xdp_md, hdr: u64, meta: u64) -> u32 {
    icmp_entry::<false>(ctx, hdr, meta)
}

#[inline(always)]
fn icmp_entry<const V4: bool>(ctx: *mut xdp_md, hdr: u64, meta: u64) -> u32 {
    let ctx = XdpContext::new(ctx);
    let (hdr, meta) = (used(hdr), used(meta));
    let (Some(st), Some(cfg)) = (Stats::get(), maps::CONFIG.get(0)) else {
        return xdp_action::XDP_PASS;
    };
    let (p, _) = Parsed::unpack(hdr, meta);
    match handle::<V4>(&ctx, &st, &p, cfg) {
        Ok(Some(verdict)) => verdict,
        Ok(None) => NOT_MINE,
        Err(skip) => {
            st.add(skip.stat(), 1);
            xdp_action::XDP_PASS
        }
    }
}

/// ICMP (`V4`) or ICMPv6: one copy each.
type Icmp<const V4: bool> = Headers<V4, false>;

#[inline(always)]
fn handle<const V4: bool>(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    cfg: &Config,
) -> Result<Option<u32>, Skip> {
    let h = Icmp::<V4>::of(ctx, p)?;
    if p.l4 + 8 > p.ip_end {
        return Err(Skip::BadLength);
    }
    // SAFETY: 8 bytes of ICMP header checked.
    let icmp_type = unsafe { *h.l4 };
    let is_error = if V4 {
        icmp_type == ICMP_DEST_UNREACH
            || icmp_type == ICMP_TIME_EXCEEDED
            || icmp_type == ICMP_PARAMETER_PROBLEM
    } else {
        icmp_type == ICMPV6_DEST_UNREACH
            || icmp_type == ICMPV6_PKT_TOOBIG
            || icmp_type == ICMPV6_TIME_EXCEED
            || icmp_type == ICMPV6_PARAM_PROB
    };
    if is_error {
        return translate_error(ctx, st, p, &h, cfg);
    }
    let is_echo = if V4 {
        icmp_type == ICMP_ECHO
    } else {
        icmp_type == ICMPV6_ECHO_REQUEST
    };
    if is_echo && cfg.flags & config_flags::ECHO_REPLY != 0 {
        return echo_reply(ctx, st, p, &h);
    }
    Ok(None)
}

/// Echo request to a VIP address: answered in place and sent back (XDP_TX).
#[inline(always)]
fn echo_reply<const V4: bool>(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    h: &Icmp<V4>,
) -> Result<Option<u32>, Skip> {
    let (src, dst) = h.addrs();
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
    if V4 && !ipv4_header_ok(ctx, p)? {
        return Err(Skip::BadChecksum);
    }
    let eth: *mut [u16; 6] = ptr_at_fresh(ctx, 0)?;
    // SAFETY: the checked ICMP header (type, code, checksum) and IP header; 12 bytes of
    // Ethernet header, at an even address.
    unsafe {
        // Type: request → reply; the checksum follows the change of the type/code word.
        let tc = h.l4 as *mut u16;
        let old = *tc;
        *h.l4 = if V4 {
            ICMP_ECHO_REPLY
        } else {
            ICMPV6_ECHO_REPLY
        };
        let new = *tc;
        let c = h.l4.add(2) as *mut u16;
        *c = csum::apply(*c, csum::diff16(old, new));
        // Swap addresses (sums unchanged) and MACs; fresh TTL.
        if V4 {
            let ttl_proto = h.ip.add(8) as *mut u16;
            let old_tp = *ttl_proto;
            *h.ip.add(8) = 64;
            let c = h.ip.add(10) as *mut u16;
            *c = csum::apply(*c, csum::diff16(old_tp, *ttl_proto));
            store_addr(h.ip.add(12), &dst, true);
            store_addr(h.ip.add(16), &src, true);
        } else {
            *h.ip.add(7) = 64;
            store_addr(h.ip.add(8), &dst, false);
            store_addr(h.ip.add(24), &src, false);
        }
        let [d0, d1, d2, s0, s1, s2] = *eth;
        *eth = [s0, s1, s2, d0, d1, d2];
    }
    st.add(stat::ICMP_ECHO_REPLY, 1);
    Ok(Some(xdp_action::XDP_TX))
}

/// The quoted packet inside an ICMP error: its IP header and its first four transport
/// bytes (the ports), through one checked pointer each, and where its L4 checksum sits when
/// the quote includes it. Its 5-tuple goes to this CPU's scratch entry (`owner`).
struct Inner {
    ip: *mut u8,
    ports: *mut [u16; 2],
    csum: Option<*mut u16>,
    proto: u8,
}

#[inline(always)]
fn parse_inner<const V4: bool>(
    ctx: &XdpContext,
    p: &Parsed,
    quoted: &mut FlowKey,
) -> Result<Option<Inner>, Skip> {
    // The quote ends with the IP packet; an Ethernet trailer is not part of it.
    let l3 = p.l4 + 8;
    let (ip, l4): (*mut u8, usize) = if V4 {
        let ip: *mut [u8; 20] = ptr_at(ctx, l3)?;
        // SAFETY: 20 bytes checked.
        let ihl = ((unsafe { (*ip)[0] } & 0x0f) as usize) * 4;
        if ihl < 20 || l3 + ihl > p.ip_end {
            return Ok(None);
        }
        (ip.cast(), l3 + ihl)
    } else {
        let ip: *mut [u8; 40] = ptr_at(ctx, l3)?;
        if l3 + 40 > p.ip_end {
            return Ok(None);
        }
        (ip.cast(), l3 + 40)
    };
    // SAFETY: within the checked quoted IP header.
    let proto_ = unsafe { *ip.add(if V4 { 9 } else { 6 }) };
    if proto_ != proto::TCP && proto_ != proto::UDP || l4 + 4 > p.ip_end {
        return Ok(None);
    }
    let ports: *mut [u16; 2] = ptr_at(ctx, l4)?;
    // SAFETY: the quoted IP header and 4 bytes of ports, checked.
    unsafe {
        *quoted = FlowKey {
            src: load_addr(ip.add(if V4 { 12 } else { 8 }), V4),
            dst: load_addr(ip.add(if V4 { 16 } else { 24 }), V4),
            sport: (*ports)[0],
            dport: (*ports)[1],
            proto: proto_,
            family: if V4 { family::V4 } else { family::V6 },
            _pad: [0; 2],
        };
    }
    // The quoted L4 checksum, when the quote includes it: within the IP packet (not merely
    // within the frame, which may carry an Ethernet trailer).
    let csum_off = if proto_ == proto::TCP {
        l4 + 16
    } else {
        l4 + 6
    };
    let csum = if csum_off + 2 <= p.ip_end {
        ptr_at::<u16>(ctx, csum_off).ok()
    } else {
        None
    };
    Ok(Some(Inner {
        ip,
        ports,
        csum,
        proto: proto_,
    }))
}

#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys are passed to the helpers where they are, in the scratch map"
)]
fn translate_error<const V4: bool>(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    h: &Icmp<V4>,
    cfg: &Config,
) -> Result<Option<u32>, Skip> {
    // Keys and the rewrite live in this CPU's scratch entry (the stack is 512 bytes in all):
    // `owner` holds the quoted 5-tuple, `rkey` the lookup key; then `owner` gets the new
    // outer addresses and `rkey` the new quoted addresses and ports.
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return Ok(None);
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    let Some(inner) = parse_inner::<V4>(ctx, p, &mut sc.owner)? else {
        return Ok(None);
    };
    let (outer_src, outer_dst) = h.addrs();
    let snat = snat_addr(cfg, p.family);
    sc.rkey = sc.owner.reversed();
    // From the backend side, about a packet the node sent to a backend: from the SNAT
    // address, or (a flow that keeps its client's source) from the client to a backend of
    // such a service, the error then addressed to the client.
    // (Only that flow's reverse entry tells the second kind from a client-side error; the
    // keys are in the scratch entry, as the stack is nearly all used at this depth.)
    let from_backend_side = (outer_dst == snat && sc.owner.src == snat)
        || (outer_dst == sc.owner.src
            && cfg.flags & config_flags::PRESERVED_SOURCES != 0
            && (maps::REV_NAT.get_ptr(&sc.rkey).is_some()
                || maps::REV_NAT_NEW.get_ptr(&sc.rkey).is_some()));
    if from_backend_side {
        // SAFETY: read-only use of the value.
        let Some(rev) = (unsafe {
            maps::REV_NAT
                .get(&sc.rkey)
                .or_else(|| maps::REV_NAT_NEW.get(&sc.rkey))
        }) else {
            return Ok(None);
        };
        // A NAT46/64 flow's errors change family (`icmp46`).
        if rev.client_family != 0 {
            sc.rev = *rev;
            return Ok(Some(crate::icmp46::XLAT_ERROR));
        }
        // The backend's own report comes from the VIP; a router's keeps its address, unless
        // it is the client's own (the client would see a packet from itself).
        sc.owner.src = if outer_src == sc.owner.dst || outer_src == rev.client {
            rev.vip
        } else {
            outer_src
        };
        sc.owner.dst = rev.client;
        sc.rkey.src = rev.client;
        sc.rkey.sport = rev.client_port;
        sc.rkey.dst = rev.vip;
        sc.rkey.dport = rev.vip_port;
    } else if outer_dst == sc.owner.src {
        // From the client side, about a reply the node sent from a VIP: a tracked flow, or
        // an unconfirmed one (in `CONNTRACK_NEW`, or only its reservation at the first port
        // of its search).
        // SAFETY: read-only use of the value.
        let (backend_id, snat_port, flags) = match unsafe {
            maps::CONNTRACK
                .get(&sc.rkey)
                .or_else(|| maps::CONNTRACK_NEW.get(&sc.rkey))
        } {
            Some(flow) => (flow.backend_id, flow.snat_port, flow.flags),
            None => {
                let found = crate::snat::portico_unconfirmed_flow();
                (found as u32, (found >> 32) as u16, 0)
            }
        };
        let Some(be) = backend(backend_id) else {
            return Ok(None);
        };
        if be.family != p.family {
            // A NAT46/64 flow: the error goes to the backend in its family (`icmp46`),
            // quoting backend → SNAT address and port.
            sc.rev.client = be.addr;
            sc.rev.client_port = be.port;
            sc.rev.vip = snat_addr(cfg, be.family);
            sc.rev.vip_port = snat_port;
            sc.rev.client_family = be.family;
            return Ok(Some(crate::icmp46::XLAT_ERROR));
        }
        // A flow that keeps its client's source: the error keeps its own source, and the
        // quoted reply went to the client (the quote's destination); else both are the
        // node's SNAT address.
        let (outer, quoted) = if flags & flow_flags::PRESERVE_SOURCE != 0 {
            (outer_src, sc.owner.dst)
        } else {
            (snat, snat)
        };
        sc.owner.src = outer;
        sc.owner.dst = be.addr;
        sc.rkey.src = be.addr;
        sc.rkey.sport = be.port;
        sc.rkey.dst = quoted;
        sc.rkey.dport = snat_port;
    } else {
        return Ok(None);
    }
    if V4 && !ipv4_header_ok(ctx, p)? {
        return Err(Skip::BadChecksum);
    }
    // TTL / hop limit 1: let the stack deal with it.
    if h.hop_limit() <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Ok(Some(xdp_action::XDP_PASS));
    }
    let proto_ = if V4 { proto::ICMP } else { proto::ICMPV6 };
    let mut hop = NextHop::default();
    let route = fib::lookup(
        ctx,
        p.family,
        proto_,
        &sc.owner.src,
        &sc.owner.dst,
        0,
        0,
        p.ip_len() as u16,
        &mut hop,
    );
    if let Route::None = route {
        st.add(stat::DROP_NO_ROUTE, 1);
        return Ok(Some(xdp_action::XDP_DROP));
    }
    apply(h, &inner, &sc.owner, &sc.rkey);
    st.add(stat::ICMP_ERROR_NAT, 1);
    Ok(Some(match route {
        Route::Via => fib::send(ctx, st, &hop),
        // An error bigger than the next hop's MTU (it quotes a big packet): the stack
        // fragments or drops it as it would its own.
        Route::TooBig(_) => {
            st.add(stat::PASS_NEEDS_FRAG, 1);
            xdp_action::XDP_PASS
        }
        _ => {
            st.add(stat::PASS_NO_NEIGH, 1);
            xdp_action::XDP_PASS
        }
    }))
}

/// Writes the new outer addresses (`new_outer`'s source and destination) and quoted
/// addresses and ports (`new_inner`'s), and fixes every checksum involved: outer IPv4
/// header, inner IPv4 header, inner L4 (when quoted in full), ICMP. The old values are read
/// from the packet as they are replaced; every pointer was checked before, so nothing here
/// can fail half-way.
#[inline(always)]
fn apply<const V4: bool>(h: &Icmp<V4>, inner: &Inner, new_outer: &FlowKey, new_inner: &FlowKey) {
    let (a_src, a_dst) = if V4 { (12, 16) } else { (8, 24) };
    // SAFETY: every range was checked (Headers, parse_inner); IP headers start at even
    // offsets.
    unsafe {
        let ip = inner.ip;
        let old_src = load_addr(ip.add(a_src), V4);
        let old_dst = load_addr(ip.add(a_dst), V4);
        let [old_sport, old_dport] = *inner.ports;
        // Changes inside the ICMP payload (the quoted packet), as one's complement deltas.
        let inner_addr_delta =
            csum::diff128(&old_src, &new_inner.src) + csum::diff128(&old_dst, &new_inner.dst);
        let inner_port_delta =
            csum::diff16(old_sport, new_inner.sport) + csum::diff16(old_dport, new_inner.dport);
        let mut icmp_delta = inner_addr_delta + inner_port_delta;
        if let Some(c) = inner.csum {
            let old = *c;
            if !(V4 && inner.proto == proto::UDP && old == 0) {
                let new = if inner.proto == proto::UDP {
                    csum::apply_udp(old, inner_addr_delta + inner_port_delta)
                } else {
                    csum::apply(old, inner_addr_delta + inner_port_delta)
                };
                *c = new;
                icmp_delta += csum::diff16(old, new);
            }
        }
        if V4 {
            // Inner IPv4 header checksum (inside the ICMP payload).
            let c = ip.add(10) as *mut u16;
            let old = *c;
            let new = csum::apply(old, inner_addr_delta);
            icmp_delta += csum::diff16(old, new);
            *c = new;
        }
        store_addr(ip.add(a_src), &new_inner.src, V4);
        store_addr(ip.add(a_dst), &new_inner.dst, V4);
        *inner.ports = [new_inner.sport, new_inner.dport];
        // Outer header; ICMPv6 also covers the outer addresses in its pseudo-header.
        let ip = h.ip;
        let old_src = load_addr(ip.add(a_src), V4);
        let old_dst = load_addr(ip.add(a_dst), V4);
        let outer_delta =
            csum::diff128(&old_src, &new_outer.src) + csum::diff128(&old_dst, &new_outer.dst);
        if V4 {
            let ttl_proto = ip.add(8) as *mut u16;
            let old_tp = *ttl_proto;
            let mut b = old_tp.to_ne_bytes();
            b[0] -= 1;
            let new_tp = u16::from_ne_bytes(b);
            *ttl_proto = new_tp;
            let c = ip.add(10) as *mut u16;
            *c = csum::apply(*c, outer_delta + csum::diff16(old_tp, new_tp));
        } else {
            *ip.add(7) -= 1;
            icmp_delta += outer_delta;
        }
        store_addr(ip.add(a_src), &new_outer.src, V4);
        store_addr(ip.add(a_dst), &new_outer.dst, V4);
        let c = h.l4.add(2) as *mut u16;
        *c = csum::apply(*c, icmp_delta);
    }
}
