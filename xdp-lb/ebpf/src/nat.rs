//! NAT mode: client → VIP packets are DNATed to the backend and SNATed to the node, replies
//! are translated back, both in XDP. Connection tracking pins flows to their backend; new
//! flows consult the service's Maglev ring.

use aya_ebpf::{
    bindings::{xdp_action, BPF_NOEXIST},
    helpers::generated::bpf_ktime_get_coarse_ns,
    programs::XdpContext,
};
use portico_xdp_common::{
    backend_state, family, flow_state, proto, service_flags, stat, Backend, Config, Flow, FlowKey,
    RevNat, Service,
};

use crate::{
    csum,
    fib::{self, Route},
    maps::{self, count, stat_add},
    parse::{ptr_at, Parsed, Skip},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
const NS_PER_S: u64 = 1_000_000_000;
/// SNAT ports tried before the new flow is dropped.
const SNAT_PROBES: u32 = 8;

/// A packet's addresses and ports, read once.
pub struct Tuple {
    /// 5-tuple as a map key.
    pub key: FlowKey,
    /// TCP flags (0 for other protocols).
    pub tcp_flags: u8,
}

/// Reads addresses, ports and TCP flags.
#[inline(always)]
pub fn read_tuple(ctx: &XdpContext, p: &Parsed) -> Result<Tuple, Skip> {
    let mut key = FlowKey {
        proto: p.proto,
        family: p.family,
        ..FlowKey::default()
    };
    if p.family == family::V4 {
        let a: *const [u8; 8] = ptr_at(ctx, p.l3 + 12)?;
        // SAFETY: 8 bytes checked.
        let a = unsafe { &*a };
        key.src[..4].copy_from_slice(&a[..4]);
        key.dst[..4].copy_from_slice(&a[4..]);
    } else {
        let a: *const [u8; 32] = ptr_at(ctx, p.l3 + 8)?;
        // SAFETY: 32 bytes checked.
        let a = unsafe { &*a };
        key.src.copy_from_slice(&a[..16]);
        key.dst.copy_from_slice(&a[16..]);
    }
    let mut tcp_flags = 0;
    if p.proto == proto::TCP {
        let t: *const [u8; 20] = ptr_at(ctx, p.l4)?;
        // SAFETY: 20 bytes checked.
        tcp_flags = unsafe { (*t)[13] };
    } else {
        let _: *const [u8; 8] = ptr_at(ctx, p.l4)?;
    }
    let ports: *const [u16; 2] = ptr_at(ctx, p.l4)?;
    // SAFETY: checked above.
    unsafe {
        key.sport = (*ports)[0];
        key.dport = (*ports)[1];
    }
    Ok(Tuple { key, tcp_flags })
}

#[inline(always)]
pub(crate) fn words(a: &[u8; 16]) -> [u32; 4] {
    // SAFETY: 16 bytes read as four u32 (unaligned read).
    unsafe { core::ptr::read_unaligned(a.as_ptr() as *const [u32; 4]) }
}

#[inline(always)]
fn murmur_mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn murmur_fin(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Flow hash, seeded so that every node picks the same backend for the same flow.
#[inline(always)]
fn flow_hash(k: &FlowKey, seed: u32, src_only: bool) -> u32 {
    let s = words(&k.src);
    let mut h = murmur_mix(seed, s[0] ^ s[1] ^ s[2] ^ s[3]);
    if !src_only {
        let d = words(&k.dst);
        h = murmur_mix(h, d[0] ^ d[1] ^ d[2] ^ d[3]);
        h = murmur_mix(h, (u32::from(k.sport) << 16) | u32::from(k.dport));
        h = murmur_mix(h, u32::from(k.proto));
    }
    murmur_fin(h)
}

#[inline(always)]
fn now_ns() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
fn expired(f: &Flow, cfg: &Config, proto_: u8, now: u64) -> bool {
    let timeout_s = if f.state == flow_state::CLOSING {
        cfg.tcp_closing_timeout_s
    } else if proto_ == proto::TCP {
        cfg.tcp_timeout_s
    } else {
        cfg.udp_timeout_s
    };
    now.saturating_sub(f.last_seen_ns) > u64::from(timeout_s) * NS_PER_S
}

/// A live backend by id.
#[inline(always)]
pub(crate) fn backend(id: u32) -> Option<&'static Backend> {
    if id == 0 {
        return None;
    }
    maps::BACKENDS
        .get(id)
        .filter(|b| b.state != backend_state::UNUSED)
}

/// Picks a backend for a new flow from the service's live Maglev ring.
#[inline(always)]
fn maglev_pick(svc: &Service, cfg: &Config, key: &FlowKey) -> u32 {
    let m = cfg.ring_size;
    if m == 0 {
        return 0;
    }
    let h = flow_hash(
        key,
        cfg.hash_seed,
        svc.flags & service_flags::HASH_SRC_ONLY != 0,
    );
    let base = (svc.id * 2 + (svc.ring_gen & 1)) * m;
    maps::RINGS.get(base + h % m).copied().unwrap_or(0)
}

/// Reserves a SNAT port toward `be` for the flow `key`: the port is taken exactly when its
/// reverse-NAT entry exists, inserted with BPF_NOEXIST, so two flows never share one.
/// Entries whose flow is gone (evicted, expired or moved) are reclaimed.
#[inline(always)]
fn claim_snat_port(
    key: &FlowKey,
    be: &Backend,
    backend_id: u32,
    snat: &[u8; 16],
    cfg: &Config,
    svc: &Service,
    now: u64,
) -> Option<u16> {
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if max < min {
        return None;
    }
    let range = max - min + 1;
    let start = flow_hash(key, cfg.hash_seed ^ 0x5bd1_e995, false);
    let rev = RevNat {
        client: key.src,
        vip: key.dst,
        client_port: key.sport,
        vip_port: key.dport,
        service_id: svc.id as u16,
        _pad: 0,
    };
    let mut rkey = FlowKey {
        src: be.addr,
        dst: *snat,
        sport: be.port,
        dport: 0,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    };
    for i in 0..SNAT_PROBES {
        let port =
            ((min + (start.wrapping_add(i.wrapping_mul(2_654_435_761)) % range)) as u16).to_be();
        rkey.dport = port;
        if maps::REV_NAT
            .insert(rkey, rev, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port);
        }
        // Taken: reclaim it when its owner no longer holds it.
        // SAFETY: read-only copy of the value.
        let Some(old) = (unsafe { maps::REV_NAT.get(rkey) }).copied() else {
            continue;
        };
        let owner = FlowKey {
            src: old.client,
            dst: old.vip,
            sport: old.client_port,
            dport: old.vip_port,
            proto: key.proto,
            family: key.family,
            _pad: [0; 2],
        };
        // SAFETY: read-only copy of the value.
        let live = match unsafe { maps::CONNTRACK.get(owner) } {
            Some(f) => {
                f.snat_port == port
                    && f.backend_id == backend_id
                    && !expired(f, cfg, key.proto, now)
                    && owner != *key
            }
            None => false,
        };
        if live {
            continue;
        }
        let _ = maps::REV_NAT.remove(rkey);
        if maps::REV_NAT
            .insert(rkey, rev, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port);
        }
    }
    None
}

/// Rewrites addresses and ports in place and fixes the IP and L4 checksums; decrements the
/// TTL / hop limit. `new_src`/`new_dst` are in 16-byte form.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    p: &Parsed,
    old: &FlowKey,
    new_src: &[u8; 16],
    new_dst: &[u8; 16],
    new_sport: u16,
    new_dport: u16,
) -> Result<(), Skip> {
    let (os, od, ns, nd) = (
        words(&old.src),
        words(&old.dst),
        words(new_src),
        words(new_dst),
    );
    let mut l4_delta = csum::diff16(old.sport, new_sport) + csum::diff16(old.dport, new_dport);
    if p.family == family::V4 {
        let ip: *mut [u8; 20] = ptr_at(ctx, p.l3)?;
        let addr_delta = csum::diff32(os[0], ns[0]) + csum::diff32(od[0], nd[0]);
        l4_delta += addr_delta;
        // SAFETY: 20 bytes checked.
        unsafe {
            let ttl_proto = ip.cast::<u8>().add(8) as *mut u16;
            let old_tp = core::ptr::read_unaligned(ttl_proto);
            let mut bytes = old_tp.to_ne_bytes();
            bytes[0] -= 1;
            let new_tp = u16::from_ne_bytes(bytes);
            core::ptr::write_unaligned(ttl_proto, new_tp);
            let c = ip.cast::<u8>().add(10) as *mut u16;
            let ip_delta = addr_delta + csum::diff16(old_tp, new_tp);
            core::ptr::write_unaligned(c, csum::apply(core::ptr::read_unaligned(c), ip_delta));
            core::ptr::write_unaligned(ip.cast::<u8>().add(12) as *mut u32, ns[0]);
            core::ptr::write_unaligned(ip.cast::<u8>().add(16) as *mut u32, nd[0]);
        }
    } else {
        let ip: *mut [u8; 40] = ptr_at(ctx, p.l3)?;
        l4_delta += csum::diff128(&os, &ns) + csum::diff128(&od, &nd);
        // SAFETY: 40 bytes checked.
        let ip = unsafe { &mut *ip };
        ip[7] -= 1;
        ip[8..24].copy_from_slice(new_src);
        ip[24..40].copy_from_slice(new_dst);
    }
    let ports: *mut [u16; 2] = ptr_at(ctx, p.l4)?;
    // SAFETY: 4 bytes checked.
    unsafe {
        (*ports)[0] = new_sport;
        (*ports)[1] = new_dport;
    }
    if p.proto == proto::TCP {
        let c: *mut u16 = ptr_at(ctx, p.l4 + 16)?;
        // SAFETY: checked.
        unsafe { *c = csum::apply(*c, l4_delta) };
    } else {
        let c: *mut u16 = ptr_at(ctx, p.l4 + 6)?;
        // SAFETY: checked. IPv4 UDP without checksum stays without one.
        unsafe {
            if !(p.family == family::V4 && *c == 0) {
                *c = csum::apply_udp(*c, l4_delta);
            }
        }
    }
    Ok(())
}

/// The TTL / hop limit of the packet.
#[inline(always)]
fn hop_limit(ctx: &XdpContext, p: &Parsed) -> Result<u8, Skip> {
    let off = if p.family == family::V4 {
        p.l3 + 8
    } else {
        p.l3 + 7
    };
    // SAFETY: checked by ptr_at.
    Ok(unsafe { *ptr_at::<u8>(ctx, off)? })
}

/// Total length for the FIB lookup (MTU check), from the IP header.
#[inline(always)]
fn ip_tot_len(ctx: &XdpContext, p: &Parsed) -> Result<u16, Skip> {
    if p.family == family::V4 {
        // SAFETY: checked by ptr_at.
        Ok(u16::from_be(unsafe { *ptr_at::<u16>(ctx, p.l3 + 2)? }))
    } else {
        // SAFETY: checked by ptr_at.
        Ok(u16::from_be(unsafe { *ptr_at::<u16>(ctx, p.l3 + 4)? }).saturating_add(40))
    }
}

/// The node's SNAT address for a family, in 16-byte form.
#[inline(always)]
pub(crate) fn snat_addr(cfg: &Config, fam: u8) -> [u8; 16] {
    let mut a = [0u8; 16];
    if fam == family::V4 {
        a[..4].copy_from_slice(&cfg.snat_v4);
    } else {
        a = cfg.snat_v6;
    }
    a
}

/// Client → VIP: conntrack or Maglev, SNAT port, rewrite, send.
#[inline(always)]
pub fn forward(
    ctx: &XdpContext,
    p: &Parsed,
    t: &Tuple,
    svc: &Service,
    cfg: &Config,
    bytes: u64,
) -> Result<u32, Skip> {
    if hop_limit(ctx, p)? <= 1 {
        stat_add(stat::PASS_TTL, 1);
        return Ok(xdp_action::XDP_PASS);
    }
    let now = now_ns();
    let key = &t.key;
    let closing = t.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    let fresh_syn = t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;

    let mut tracked: Option<(u32, u16, &'static Backend)> = None;
    if let Some(f) = maps::CONNTRACK.get_ptr_mut(key) {
        // SAFETY: valid map value pointer; racing writers only touch plain integers.
        let flow = unsafe { &mut *f };
        let reusable = !(fresh_syn && flow.state == flow_state::CLOSING);
        if reusable && !expired(flow, cfg, key.proto, now) {
            if let Some(be) = backend(flow.backend_id) {
                if now.saturating_sub(flow.last_seen_ns) > NS_PER_S {
                    flow.last_seen_ns = now;
                }
                if closing && flow.state != flow_state::CLOSING {
                    flow.state = flow_state::CLOSING;
                    flow.last_seen_ns = now;
                }
                tracked = Some((flow.backend_id, flow.snat_port, be));
            }
        }
    }
    let snat = snat_addr(cfg, key.family);
    let new_flow = tracked.is_none();
    let (backend_id, snat_port, be) = match tracked {
        Some(hit) => {
            stat_add(stat::CT_HIT, 1);
            hit
        }
        None => {
            stat_add(stat::CT_MISS, 1);
            let id = maglev_pick(svc, cfg, key);
            let Some(be) = backend(id) else {
                stat_add(stat::DROP_NO_BACKEND, 1);
                return Ok(xdp_action::XDP_DROP);
            };
            let Some(port) = claim_snat_port(key, be, id, &snat, cfg, svc, now) else {
                stat_add(stat::DROP_NO_SNAT_PORT, 1);
                return Ok(xdp_action::XDP_DROP);
            };
            let flow = Flow {
                backend_id: id,
                snat_port: port,
                state: if closing {
                    flow_state::CLOSING
                } else {
                    flow_state::OPEN
                },
                _pad: 0,
                last_seen_ns: now,
            };
            if maps::CONNTRACK.insert(key, flow, 0).is_ok() {
                stat_add(stat::CT_INSERT, 1);
            }
            (id, port, be)
        }
    };
    if be.family != key.family {
        stat_add(stat::PASS_UNSUPPORTED, 1);
        return Ok(xdp_action::XDP_PASS);
    }
    let tot_len = ip_tot_len(ctx, p)?;
    rewrite(ctx, p, key, &snat, &be.addr, snat_port, be.port)?;
    count(&maps::SERVICE_STATS, svc.id, bytes, new_flow);
    count(&maps::BACKEND_STATS, backend_id, bytes, new_flow);

    // Cached next hop, else the FIB (and cache it for a second).
    if let Some(nh) = maps::NEXT_HOPS.get_ptr_mut(backend_id) {
        // SAFETY: valid map value pointer.
        let cached = unsafe { *nh };
        if cached.expires_ns > now {
            return Ok(fib::send(ctx, &cached));
        }
        match fib::lookup(
            ctx,
            key.family,
            key.proto,
            &words(&snat),
            &words(&be.addr),
            snat_port,
            be.port,
            tot_len,
        ) {
            Route::Via(mut hop) => {
                hop.expires_ns = now + NS_PER_S;
                // SAFETY: valid map value pointer; a racing writer writes the same data.
                unsafe { *nh = hop };
                return Ok(fib::send(ctx, &hop));
            }
            Route::NoNeigh => {
                stat_add(stat::PASS_NO_NEIGH, 1);
                return Ok(xdp_action::XDP_PASS);
            }
            Route::None => {}
        }
    }
    stat_add(stat::DROP_NO_ROUTE, 1);
    Ok(xdp_action::XDP_DROP)
}

/// Backend → node SNAT port: translate back to VIP → client and send.
#[inline(always)]
pub fn reply(ctx: &XdpContext, p: &Parsed, t: &Tuple, bytes: u64) -> Result<Option<u32>, Skip> {
    // SAFETY: read-only copy of the value.
    let Some(rev) = (unsafe { maps::REV_NAT.get(t.key) }).copied() else {
        return Ok(None);
    };
    if hop_limit(ctx, p)? <= 1 {
        stat_add(stat::PASS_TTL, 1);
        return Ok(Some(xdp_action::XDP_PASS));
    }
    let tot_len = ip_tot_len(ctx, p)?;
    rewrite(
        ctx,
        p,
        &t.key,
        &rev.vip,
        &rev.client,
        rev.vip_port,
        rev.client_port,
    )?;
    stat_add(stat::REPLY_NAT, 1);
    count(
        &maps::SERVICE_STATS,
        u32::from(rev.service_id),
        bytes,
        false,
    );
    let verdict = match fib::lookup(
        ctx,
        t.key.family,
        t.key.proto,
        &words(&rev.vip),
        &words(&rev.client),
        rev.vip_port,
        rev.client_port,
        tot_len,
    ) {
        Route::Via(hop) => fib::send(ctx, &hop),
        Route::NoNeigh => {
            stat_add(stat::PASS_NO_NEIGH, 1);
            xdp_action::XDP_PASS
        }
        Route::None => {
            stat_add(stat::DROP_NO_ROUTE, 1);
            xdp_action::XDP_DROP
        }
    };
    Ok(Some(verdict))
}
