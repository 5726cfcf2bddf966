//! NAT mode: client → VIP packets are DNATed to the backend and SNATed to the node, replies
//! are translated back, both in XDP. Connection tracking pins flows to their backend; new
//! flows consult the service's Maglev ring.

use aya_ebpf::{
    bindings::{xdp_action, BPF_NOEXIST},
    helpers::generated::bpf_jiffies64,
    programs::XdpContext,
};
use portico_xdp_common::{
    backend_state, family, flow_state, proto, service_flags, stat, Addr, Backend, Config, Flow,
    FlowCacheEntry, FlowKey, ReplyCacheEntry, RevNat, Service,
};

use crate::{
    csum,
    fib::{self, Route},
    maps::{self, count, Stats},
    parse::{load_addr, ptr_at, store32, store_addr, Parsed, Skip},
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
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
    let v4 = p.family == family::V4;
    let (src, dst) = if v4 {
        let a: *const [u8; 8] = ptr_at(ctx, p.l3 + 12)?;
        let a = a.cast::<u8>();
        // SAFETY: 8 bytes checked.
        unsafe { (load_addr(a, true), load_addr(a.add(4), true)) }
    } else {
        let a: *const [u8; 32] = ptr_at(ctx, p.l3 + 8)?;
        let a = a.cast::<u8>();
        // SAFETY: 32 bytes checked.
        unsafe { (load_addr(a, false), load_addr(a.add(16), false)) }
    };
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
    let [sport, dport] = unsafe { *ports };
    Ok(Tuple {
        key: FlowKey {
            src,
            dst,
            sport,
            dport,
            proto: p.proto,
            family: p.family,
            _pad: [0; 2],
        },
        tcp_flags,
    })
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
    let s = &k.src;
    let mut h = murmur_mix(seed, s[0] ^ s[1] ^ s[2] ^ s[3]);
    if !src_only {
        let d = &k.dst;
        h = murmur_mix(h, d[0] ^ d[1] ^ d[2] ^ d[3]);
        h = murmur_mix(h, (u32::from(k.sport) << 16) | u32::from(k.dport));
        h = murmur_mix(h, u32::from(k.proto));
    }
    murmur_fin(h)
}

/// Now, in jiffies (the verifier inlines the helper into one load).
#[inline(always)]
fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_jiffies64() }
}

#[inline(always)]
fn expired(f: &Flow, cfg: &Config, proto_: u8, now: u64) -> bool {
    let timeout = if f.state == flow_state::CLOSING {
        cfg.tcp_closing_timeout
    } else if proto_ == proto::TCP {
        cfg.tcp_timeout
    } else {
        cfg.udp_timeout
    };
    now.saturating_sub(f.last_seen) > u64::from(timeout)
}

/// A live backend by id, as a pointer (the program caches its next hop in it).
#[inline(always)]
fn backend_ptr(id: u32) -> Option<*mut Backend> {
    if id == 0 {
        return None;
    }
    let be = maps::BACKENDS.get_ptr_mut(id)?;
    // SAFETY: valid map value pointer.
    (unsafe { (*be).state } != backend_state::UNUSED).then_some(be)
}

/// A live backend by id.
#[inline(always)]
pub(crate) fn backend(id: u32) -> Option<&'static Backend> {
    // SAFETY: valid map value pointer, read only.
    backend_ptr(id).map(|b| unsafe { &*b })
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
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the helpers where they are, in the scratch map"
)]
fn claim_snat_port(
    key: &FlowKey,
    be: &Backend,
    snat: &Addr,
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
    let sc = maps::SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    sc.rev = rev_nat(key, svc.id as u16, now);
    sc.rkey = reply_key(key, be, snat, 0);
    for i in 0..SNAT_PROBES {
        let port =
            ((min + (start.wrapping_add(i.wrapping_mul(2_654_435_761)) % range)) as u16).to_be();
        sc.rkey.dport = port;
        if maps::REV_NAT
            .insert(&sc.rkey, &sc.rev, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port);
        }
        // Taken: reclaim it when its owner no longer holds it.
        // SAFETY: read-only use of the value.
        let Some(old) = (unsafe { maps::REV_NAT.get(&sc.rkey) }) else {
            continue;
        };
        // Cached copies of a flow live a second past its last lookup: wait two.
        if now.saturating_sub(old.last_seen) <= 2 * u64::from(cfg.hz) {
            continue;
        }
        sc.owner = FlowKey {
            src: old.client,
            dst: old.vip,
            sport: old.client_port,
            dport: old.vip_port,
            proto: key.proto,
            family: key.family,
            _pad: [0; 2],
        };
        // The owner holds the port while its flow is tracked, unexpired, on this port, and
        // still on a backend with this address and port: of any service, since services
        // that share a backend share its SNAT port space.
        // SAFETY: read-only use of the value.
        let live = match unsafe { maps::CONNTRACK.get(&sc.owner) } {
            Some(f) => {
                f.snat_port == port
                    && !expired(f, cfg, key.proto, now)
                    && sc.owner != *key
                    && backend(f.backend_id).is_some_and(|owner_be| {
                        owner_be.addr == be.addr
                            && owner_be.port == be.port
                            && still_assigned(owner_be, f)
                    })
            }
            None => false,
        };
        if live {
            continue;
        }
        let _ = maps::REV_NAT.remove(&sc.rkey);
        if maps::REV_NAT
            .insert(&sc.rkey, &sc.rev, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port);
        }
    }
    None
}

/// Rewrites addresses and ports in place and fixes the IP and L4 checksums; decrements the
/// TTL / hop limit.
#[inline(always)]
fn rewrite(
    ctx: &XdpContext,
    p: &Parsed,
    old: &FlowKey,
    new_src: &Addr,
    new_dst: &Addr,
    new_sport: u16,
    new_dport: u16,
) -> Result<(), Skip> {
    let mut l4_delta = csum::diff16(old.sport, new_sport) + csum::diff16(old.dport, new_dport);
    if p.family == family::V4 {
        let ip: *mut [u8; 20] = ptr_at(ctx, p.l3)?;
        let ip = ip.cast::<u8>();
        let addr_delta =
            csum::diff32(old.src[0], new_src[0]) + csum::diff32(old.dst[0], new_dst[0]);
        l4_delta += addr_delta;
        // SAFETY: 20 bytes checked; the IP header starts at an even offset.
        unsafe {
            let ttl_proto = ip.add(8) as *mut u16;
            let old_tp = *ttl_proto;
            let mut bytes = old_tp.to_ne_bytes();
            bytes[0] -= 1;
            let new_tp = u16::from_ne_bytes(bytes);
            *ttl_proto = new_tp;
            let c = ip.add(10) as *mut u16;
            *c = csum::apply(*c, addr_delta + csum::diff16(old_tp, new_tp));
            store32(ip.add(12), new_src[0]);
            store32(ip.add(16), new_dst[0]);
        }
    } else {
        let ip: *mut [u8; 40] = ptr_at(ctx, p.l3)?;
        let ip = ip.cast::<u8>();
        l4_delta += csum::diff128(&old.src, new_src) + csum::diff128(&old.dst, new_dst);
        // SAFETY: 40 bytes checked.
        unsafe {
            *ip.add(7) -= 1;
            store_addr(ip.add(8), new_src, false);
            store_addr(ip.add(24), new_dst, false);
        }
    }
    let ports: *mut [u16; 2] = ptr_at(ctx, p.l4)?;
    // SAFETY: 4 bytes checked.
    unsafe { *ports = [new_sport, new_dport] };
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

/// The node's SNAT address for a family.
#[inline(always)]
pub(crate) fn snat_addr(cfg: &Config, fam: u8) -> Addr {
    if fam == family::V4 {
        [cfg.snat_v4, 0, 0, 0]
    } else {
        cfg.snat_v6
    }
}

/// Index of a 5-tuple in this CPU's block of the caches.
#[inline(always)]
fn cache_index(key: &FlowKey, cfg: &Config) -> u32 {
    let (s, d) = (&key.src, &key.dst);
    let h = (s[0] ^ s[1] ^ s[2] ^ s[3])
        ^ (d[0] ^ d[1] ^ d[2] ^ d[3]).rotate_left(16)
        ^ ((u32::from(key.sport) << 16) | u32::from(key.dport)).wrapping_mul(0x9e37_79b1)
        ^ u32::from(key.proto);
    cpu_base(cfg) + (murmur_fin(h) & cfg.flow_cache_mask)
}

/// Slot of the per-CPU flow cache for a 5-tuple.
#[inline(always)]
fn cache_slot(key: &FlowKey, cfg: &Config) -> Option<*mut FlowCacheEntry> {
    maps::FLOW_CACHE.get_ptr_mut(cache_index(key, cfg))
}

/// This CPU's block of the cache arrays starts here (the verifier inlines the helper).
#[inline(always)]
fn cpu_base(cfg: &Config) -> u32 {
    // SAFETY: plain helper call.
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() };
    cpu.wrapping_mul(cfg.flow_cache_mask + 1)
}

/// The key of a flow's reverse-NAT entry: backend → node SNAT address and port.
#[inline(always)]
fn reply_key(key: &FlowKey, be: &Backend, snat: &Addr, snat_port: u16) -> FlowKey {
    FlowKey {
        src: be.addr,
        dst: *snat,
        sport: be.port,
        dport: snat_port,
        proto: key.proto,
        family: key.family,
        _pad: [0; 2],
    }
}

/// The reverse-NAT entry of the flow `key` (client → VIP), seen at `now`.
#[inline(always)]
fn rev_nat(key: &FlowKey, service_id: u16, now: u64) -> RevNat {
    RevNat {
        client: key.src,
        vip: key.dst,
        client_port: key.sport,
        vip_port: key.dport,
        service_id,
        _pad: 0,
        last_seen: now,
    }
}

/// Remembers a tracked flow in this CPU's cache slot for it.
#[inline(always)]
fn cache_store(slot: Option<*mut FlowCacheEntry>, key: &FlowKey, flow: &Flow) {
    if let Some(c) = slot {
        // SAFETY: per-CPU slot; only this CPU touches it while the program runs.
        unsafe {
            (*c).key = *key;
            (*c).flow = *flow;
        }
    }
}

/// Keeps a tracked flow's SNAT port reserved (its `REV_NAT` entry fresh, so the port is
/// not reclaimed while copies of the flow are cached), putting the entry back if the LRU
/// evicted it. `false` when the port now belongs to another flow.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the helpers where they are, in the scratch map"
)]
fn hold_snat_port(key: &FlowKey, be: &Backend, flow: &Flow, cfg: &Config, now: u64) -> bool {
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    sc.rkey = reply_key(key, be, &snat_addr(cfg, key.family), flow.snat_port);
    if let Some(r) = maps::REV_NAT.get_ptr_mut(&sc.rkey) {
        // SAFETY: valid map value pointer; plain integers.
        let r = unsafe { &mut *r };
        let ours = r.client == key.src
            && r.vip == key.dst
            && r.client_port == key.sport
            && r.vip_port == key.dport;
        if ours {
            r.last_seen = now;
        }
        return ours;
    }
    sc.rev = rev_nat(key, flow.service_id, now);
    maps::REV_NAT
        .insert(&sc.rkey, &sc.rev, u64::from(BPF_NOEXIST))
        .is_ok()
}

/// Whether a tracked flow still goes to `be`: the id is live and still the same backend of
/// the same service (ids are reused after a backend is removed).
#[inline(always)]
fn still_assigned(be: &Backend, flow: &Flow) -> bool {
    be.service_id == flow.service_id && be.generation == flow.backend_gen
}

/// Client → VIP packet of a tracked flow: sent to the flow's backend. `None` when the flow is
/// not tracked, or its entry is stale (expired, backend gone, a new SYN after close): the
/// caller then treats the packet as a new flow.
///
/// Packets without SYN, FIN or RST are served from this CPU's flow cache when its copy is
/// under a second old; the others, and every flow once a second, go to `CONNTRACK`, which
/// refreshes the entry's age and LRU position and the cached copy.
#[inline(always)]
pub fn tracked(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    t: &Tuple,
    cfg: &Config,
    bytes: u64,
) -> Result<Option<u32>, Skip> {
    let key = &t.key;
    let now = now();
    let hz = u64::from(cfg.hz);
    let slot = cache_slot(key, cfg);
    let mut cached = None;
    if t.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        if let Some(c) = slot {
            // SAFETY: per-CPU slot.
            let c = unsafe { &*c };
            if c.key == *key
                && c.flow.epoch == cfg.cache_epoch
                && now.saturating_sub(c.flow.last_seen) <= hz
            {
                cached = Some(c.flow);
            }
        }
    }
    let slow = cached.is_none();
    let flow = match cached {
        Some(f) => {
            if expired(&f, cfg, key.proto, now) {
                return Ok(None);
            }
            f
        }
        None => {
            let Some(f) = maps::CONNTRACK.get_ptr_mut(key) else {
                return Ok(None);
            };
            // SAFETY: valid map value pointer; racing writers only touch plain integers.
            let f = unsafe { &mut *f };
            let fresh_syn = t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if (fresh_syn && f.state == flow_state::CLOSING) || expired(f, cfg, key.proto, now) {
                return Ok(None);
            }
            if t.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                f.state = flow_state::CLOSING;
            }
            f.last_seen = now;
            let mut copy = *f;
            copy.epoch = cfg.cache_epoch;
            copy
        }
    };
    let Some(be) = backend_ptr(flow.backend_id) else {
        return Ok(None);
    };
    // SAFETY: valid map value pointer.
    if !still_assigned(unsafe { &*be }, &flow) {
        return Ok(None);
    }
    if slow {
        // SAFETY: valid map value pointer.
        if !hold_snat_port(key, unsafe { &*be }, &flow, cfg, now) {
            // The port went to another flow: balance this one again.
            return Ok(None);
        }
        cache_store(slot, key, &flow);
    }
    if hop_limit(ctx, p)? <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Ok(Some(xdp_action::XDP_PASS));
    }
    st.add(stat::CT_HIT, 1);
    let to = To {
        be,
        backend_id: flow.backend_id,
        snat_port: flow.snat_port,
        new_flow: false,
    };
    send_to_backend(ctx, st, p, key, cfg, &to, bytes, now).map(Some)
}

/// Client → VIP packet of a new flow (or one whose entry went stale): Maglev picks the
/// backend, a SNAT port is reserved, the flow is tracked and the packet sent.
#[inline(always)]
pub fn new_flow(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    t: &Tuple,
    svc: &Service,
    cfg: &Config,
    bytes: u64,
) -> Result<u32, Skip> {
    if hop_limit(ctx, p)? <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Ok(xdp_action::XDP_PASS);
    }
    let now = now();
    let key = &t.key;
    st.add(stat::CT_MISS, 1);
    let id = maglev_pick(svc, cfg, key);
    // SAFETY: valid map value pointer.
    let Some(be) = backend_ptr(id).filter(|b| unsafe { (**b).service_id } == svc.id as u16) else {
        st.add(stat::DROP_NO_BACKEND, 1);
        return Ok(xdp_action::XDP_DROP);
    };
    let snat = snat_addr(cfg, key.family);
    // SAFETY: valid map value pointer, read only here.
    let Some(port) = claim_snat_port(key, unsafe { &*be }, &snat, cfg, svc, now) else {
        st.add(stat::DROP_NO_SNAT_PORT, 1);
        return Ok(xdp_action::XDP_DROP);
    };
    let flow = Flow {
        backend_id: id,
        snat_port: port,
        service_id: svc.id as u16,
        last_seen: now,
        // SAFETY: valid map value pointer.
        backend_gen: unsafe { (*be).generation },
        state: if t.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flow_state::CLOSING
        } else {
            flow_state::OPEN
        },
        _pad: 0,
        epoch: cfg.cache_epoch,
    };
    if maps::CONNTRACK.insert(key, flow, 0).is_ok() {
        st.add(stat::CT_INSERT, 1);
    }
    cache_store(cache_slot(key, cfg), key, &flow);
    let to = To {
        be,
        backend_id: id,
        snat_port: port,
        new_flow: true,
    };
    send_to_backend(ctx, st, p, key, cfg, &to, bytes, now)
}

/// Where a client → VIP packet goes.
struct To {
    be: *mut Backend,
    backend_id: u32,
    snat_port: u16,
    new_flow: bool,
}

/// Rewrites a client → VIP packet toward its backend, counts it, and sends it to the cached
/// next hop (else the FIB's, cached for a second).
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the packet's context, parsed once"
)]
fn send_to_backend(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    key: &FlowKey,
    cfg: &Config,
    to: &To,
    bytes: u64,
    now: u64,
) -> Result<u32, Skip> {
    // SAFETY: valid map value pointer; only the next-hop cache is written below.
    let be = unsafe { &mut *to.be };
    if be.family != key.family {
        st.add(stat::PASS_UNSUPPORTED, 1);
        return Ok(xdp_action::XDP_PASS);
    }
    let snat = snat_addr(cfg, key.family);
    rewrite(ctx, p, key, &snat, &be.addr, to.snat_port, be.port)?;
    // Per backend only: the loader adds a service's backends up for its counters.
    count(&maps::BACKEND_STATS, to.backend_id, bytes, to.new_flow);

    // Cached next hop, else the FIB (and cache it for a second).
    if be.hop.expires > now {
        return Ok(fib::send(ctx, st, &be.hop));
    }
    // The rewrite left the length alone.
    let tot_len = ip_tot_len(ctx, p)?;
    match fib::lookup(
        ctx,
        key.family,
        key.proto,
        &snat,
        &be.addr,
        to.snat_port,
        be.port,
        tot_len,
    ) {
        Route::Via(mut hop) => {
            hop.expires = now + u64::from(cfg.hz);
            // A racing writer on another CPU writes the same data.
            be.hop = hop;
            Ok(fib::send(ctx, st, &hop))
        }
        Route::NoNeigh => {
            st.add(stat::PASS_NO_NEIGH, 1);
            Ok(xdp_action::XDP_PASS)
        }
        Route::None => {
            st.add(stat::DROP_NO_ROUTE, 1);
            Ok(xdp_action::XDP_DROP)
        }
    }
}

/// Backend → node SNAT port: translate back to VIP → client and send. `None` when the
/// packet is not a reply to a translated flow.
///
/// Packets without SYN, FIN or RST are served from this CPU's reply cache (entry and next
/// hop) while its copy is under a second old; the others go to `REV_NAT`, refresh its age
/// and next hop, and re-cache it.
#[inline(always)]
pub fn reply(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    t: &Tuple,
    cfg: &Config,
    bytes: u64,
) -> Result<Option<u32>, Skip> {
    let key = &t.key;
    let now = now();
    let hz = u64::from(cfg.hz);
    let slot = maps::REPLY_CACHE.get_ptr_mut(cache_index(key, cfg));
    let mut cached: Option<&ReplyCacheEntry> = None;
    if t.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        if let Some(c) = slot {
            // SAFETY: per-CPU slot.
            let c = unsafe { &*c };
            if c.key == *key
                && c.epoch == cfg.cache_epoch
                && now.saturating_sub(c.rev.last_seen) <= hz
            {
                cached = Some(c);
            }
        }
    }
    // Map values are used in place: the stack is 512 bytes for the whole program.
    let (rev, route): (&RevNat, Route) = match cached {
        Some(c) => (&c.rev, Route::Via(c.hop)),
        None => {
            let Some(r) = maps::REV_NAT.get_ptr_mut(key) else {
                return Ok(None);
            };
            // SAFETY: valid map value pointer; racing writers write plain integers, or the
            // same next hop.
            let r = unsafe { &mut *r };
            r.last_seen = now;
            let tot_len = ip_tot_len(ctx, p)?;
            let route = fib::lookup(
                ctx,
                key.family,
                key.proto,
                &r.vip,
                &r.client,
                r.vip_port,
                r.client_port,
                tot_len,
            );
            // Work from a copy in this CPU's slot: LRU entries are recycled at once when
            // evicted, so the shared one may change under us. Valid for the fast path only
            // with a resolved next hop.
            let Some(c) = slot else {
                return Ok(None);
            };
            // SAFETY: per-CPU slot.
            let c = unsafe { &mut *c };
            c.rev = *r;
            if let Route::Via(hop) = &route {
                c.key = *key;
                c.hop = *hop;
                c.epoch = cfg.cache_epoch;
            } else {
                c.key = FlowKey::default();
            }
            (&c.rev, route)
        }
    };
    if hop_limit(ctx, p)? <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Ok(Some(xdp_action::XDP_PASS));
    }
    rewrite(
        ctx,
        p,
        key,
        &rev.vip,
        &rev.client,
        rev.vip_port,
        rev.client_port,
    )?;
    st.add(stat::REPLY_NAT, 1);
    count(
        &maps::SERVICE_STATS,
        u32::from(rev.service_id),
        bytes,
        false,
    );
    let verdict = match route {
        Route::Via(hop) => fib::send(ctx, st, &hop),
        Route::NoNeigh => {
            st.add(stat::PASS_NO_NEIGH, 1);
            xdp_action::XDP_PASS
        }
        Route::None => {
            st.add(stat::DROP_NO_ROUTE, 1);
            xdp_action::XDP_DROP
        }
    };
    Ok(Some(verdict))
}
