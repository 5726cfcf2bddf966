//! NAT mode: client → VIP packets are DNATed to the backend and SNATed to the node, replies
//! are translated back, both in XDP. Connection tracking pins flows to their backend; new
//! flows consult the service's Maglev ring. A service that keeps client sources
//! (`service_flags::PRESERVE_SOURCE`) is only DNATed: its flows carry
//! `flow_flags::PRESERVE_SOURCE`, use the client's port where others hold a SNAT port, and
//! their reverse entries are keyed by the backend's reply to the client.
//!
//! The packet path is split for the verifier, which walks a function once per way to reach
//! it: the established-flow fast path ([`cached`]) is inline in the entry point; the slow
//! paths ([`balance_packet`]: conntrack and new flows, [`reply_packet`]: replies) are
//! global BPF functions, one per family and transport, checked once each on their own.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::generated::bpf_jiffies64,
    programs::XdpContext,
};
use portico_xdp_common::{
    backend_state, encap, family, flow_flags, flow_state, proto, service_flags, stat, Addr,
    Backend, Config, Flow, FlowCacheEntry, FlowKey, NextHop, ReplyCacheEntry, RevNat, Service,
    VipKey,
};

use crate::{
    csum,
    fib::{self, Route},
    maps::{self, count, Stats},
    nat46,
    parse::{ptr_at, store32, store_addr, used, Headers, Parsed, Skip},
    snat,
};

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// What [`reply_packet`] returns for a packet that is not a reply to a translated flow.
pub const NOT_MINE: u32 = u32::MAX;
/// What [`tracked`] returns for a flow whose `CONNTRACK` entry went stale: [`establish`]
/// removes it if the flow is balanced again as an unconfirmed one, which it would shadow.
const STALE: u32 = u32::MAX - 1;
/// [`establish`]'s argument: set when the flow is confirmed.
const CONFIRMED: u64 = 1 << 48;
/// [`establish`]'s argument: set when the flow has a stale `CONNTRACK` entry.
const STALE_ENTRY: u64 = 1 << 49;
/// [`establish`]'s argument: set when the port was the flow's own reservation already (an
/// unconfirmed flow's later packet).
const OWN_RESERVATION: u64 = 1 << 50;
/// [`establish`]'s argument: set when the port is the first of the flow's search, where
/// its later packets find the reservation again (no `CONNTRACK_NEW` entry needed).
const FIRST_PORT: u64 = 1 << 51;
/// [`establish`]'s argument: set when the flow keeps its client's source
/// (`service_flags::PRESERVE_SOURCE`).
const PRESERVED: u64 = 1 << 52;
/// [`pick`]'s answer when a backend was picked (its id in the low bits).
const PICKED: u32 = 0x2000_0000;
/// With [`PICKED`]: the flow keeps its client's source (no SNAT port is searched for).
const PICKED_PRESERVED: u32 = 0x0800_0000;
/// A slow path's answer for a packet too big for its next hop: this bit, and the MTU in the
/// low 16 bits. The entry point then answers with ICMP ([`crate::pmtu`]): its frame is not
/// stacked on the slow path's.
const TOO_BIG: u32 = 0x4000_0000;
/// A slow path's answer when the packet is to be rewritten and sent toward its backend: the
/// flow's backend, port and kind are in this CPU's `SCRATCH.send`, and the entry point calls
/// the send step ([`send`]), a global function of its own whose frame is not stacked on the
/// conntrack lookup's or the new flow's.
const SEND: u32 = 0x0100_0000;

/// A packet's addresses and ports, read once.
pub struct Tuple {
    /// 5-tuple as a map key.
    pub key: FlowKey,
    /// TCP flags (0 for UDP; what the first chunk stands for in SCTP, see `sctp::flags`).
    pub tcp_flags: u8,
}

/// Reads addresses, ports and TCP flags through the checked headers `h` of an IPv4 (`V4`)
/// or IPv6 packet. The whole transport header (TCP options, UDP's length) is checked here,
/// before anything is looked up or written: a packet refused later would be half rewritten.
#[inline(always)]
pub fn read_tuple<const V4: bool, const TCP: bool>(
    ctx: &XdpContext,
    p: &Parsed,
    h: &Headers<V4, TCP>,
) -> Result<Tuple, Skip> {
    let tcp_flags = if TCP {
        tcp_flags_at(h.l4, p)?
    } else {
        // UDP (and SCTP's common header): 8 bytes within the IP payload; UDP's own length
        // from 8 bytes up to the end of the IP payload.
        if p.l4 + 8 > p.ip_end {
            return Err(Skip::BadLength);
        }
        if p.proto == proto::UDP {
            // SAFETY: the 8-byte header is checked.
            let ulen = unsafe { u16::from_be_bytes([*h.l4.add(4), *h.l4.add(5)]) } as usize;
            if ulen < 8 || p.l4 + ulen > p.ip_end {
                return Err(Skip::BadLength);
            }
            0
        } else {
            // SCTP: its first chunk stands for TCP flags.
            crate::sctp::flags(ctx, p)?
        }
    };
    Ok(Tuple {
        key: key_of(h, p.proto),
        tcp_flags,
    })
}

/// The TCP header of `p`, checked whole (data offset within the IP payload): its flags.
#[inline(always)]
pub(crate) fn tcp_header(ctx: &XdpContext, p: &Parsed) -> Result<u8, Skip> {
    let t: *const [u8; 20] = ptr_at(ctx, p.l4)?;
    tcp_flags_at(t.cast(), p)
}

/// [`tcp_header`] of the checked 20 bytes at `t`.
#[inline(always)]
fn tcp_flags_at(t: *const u8, p: &Parsed) -> Result<u8, Skip> {
    // SAFETY: the caller checked 20 bytes.
    let (doff, flags) = unsafe { (*t.add(12) >> 4, *t.add(13)) };
    if doff < 5 {
        return Err(Skip::Malformed);
    }
    if p.l4 + (doff as usize) * 4 > p.ip_end {
        return Err(Skip::BadLength);
    }
    Ok(flags)
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
pub(crate) fn flow_hash(k: &FlowKey, seed: u32, src_only: bool) -> u32 {
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
pub(crate) fn now() -> u64 {
    // SAFETY: plain helper call.
    unsafe { bpf_jiffies64() }
}

/// How long a flow in its state lives without a packet, in jiffies.
#[inline(always)]
fn timeout(f: &Flow, cfg: &Config, proto_: u8) -> u64 {
    u64::from(if f.state == flow_state::CLOSING {
        cfg.tcp_closing_timeout
    } else if proto_ != proto::UDP {
        // TCP, and SCTP associations.
        cfg.tcp_timeout
    } else {
        cfg.udp_timeout
    })
}

#[inline(always)]
pub(crate) fn expired(f: &Flow, cfg: &Config, proto_: u8, now: u64) -> bool {
    now.saturating_sub(f.last_seen) > timeout(f, cfg, proto_)
}

/// A live backend by id, as a pointer (the program caches its next hop in it).
#[inline(always)]
pub(crate) fn backend_ptr(id: u32) -> Option<*mut Backend> {
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
pub(crate) fn maglev_pick(svc: &Service, cfg: &Config, key: &FlowKey) -> u32 {
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

/// The 5-tuple of a packet, from its checked headers (`proto_`: UDP or SCTP when not `TCP`).
#[inline(always)]
fn key_of<const V4: bool, const TCP: bool>(h: &Headers<V4, TCP>, proto_: u8) -> FlowKey {
    let (src, dst) = h.addrs();
    // SAFETY: the transport header's first 4 bytes are checked.
    let [sport, dport] = unsafe { *(h.l4 as *const [u16; 2]) };
    FlowKey {
        src,
        dst,
        sport,
        dport,
        proto: if TCP { proto::TCP } else { proto_ },
        family: if V4 { family::V4 } else { family::V6 },
        _pad: [0; 2],
    }
}

/// Whether the transport checksum field of `p` (its 5-tuple `old`) holds CHECKSUM_PARTIAL's
/// pseudo-header sum rather than a checksum: the field equals the sum of the pseudo-header
/// (addresses, protocol, transport length), and the packet came in on an interface marked
/// for it (`GENERIC_IFACES`, an opt-in: generic XDP is the only place such a packet can
/// reach XDP). The real checksum is computed after the program (segmentation, the NIC,
/// `skb_checksum_help`) from that sum, so it must stay a pseudo-header sum:
/// [`rewrite`] updates it for the new addresses only, in the sum's direction.
///
/// A packet with a finished checksum that happens to equal its pseudo-header sum is taken
/// for one and its checksum comes out wrong (for a fixed-content UDP datagram, one source
/// port in 65,535, every time: why marking is opt-in, docs/xdp.md). SCTP (CRC32c) and IPv4
/// UDP without a checksum never are.
#[inline(always)]
pub(crate) fn csum_partial<const V4: bool, const TCP: bool>(
    ctx: &XdpContext,
    p: &Parsed,
    h: &Headers<V4, TCP>,
    old: &FlowKey,
) -> bool {
    if maps::GENERIC_ANY.get(0).is_none_or(|&n| n == 0) || !TCP && old.proto != proto::UDP {
        return false;
    }
    // SAFETY: the checksum field is within the checked transport header.
    let field = unsafe { *(h.l4.add(if TCP { 16 } else { 6 }) as *const u16) };
    if !TCP && V4 && field == 0 {
        return false;
    }
    let mut sum = csum::pseudo_len_proto((p.ip_end - p.l4) as u32, old.proto);
    for w in if V4 { 0..1 } else { 0..4 } {
        sum += u64::from(old.src[w]) + u64::from(old.dst[w]);
    }
    csum::fold(sum) == field
        && maps::GENERIC_IFACES
            .get_ptr(ctx.ingress_ifindex() as u32)
            .is_some()
}

/// Rewrites addresses and ports through the checked header pointers, fixes the IP and L4
/// checksums and decrements the TTL / hop limit. `partial`: the L4 field holds a
/// pseudo-header sum ([`csum_partial`]), updated for the addresses only.
#[inline(always)]
fn rewrite<const V4: bool, const TCP: bool>(
    h: &Headers<V4, TCP>,
    old: &FlowKey,
    new_src: &Addr,
    new_dst: &Addr,
    new_sport: u16,
    new_dport: u16,
    partial: bool,
) {
    let ports = csum::diff16(old.sport, new_sport) + csum::diff16(old.dport, new_dport);
    let addr_delta;
    // SAFETY: h.ip covers the IP header (20 or 40 bytes, at an even offset), h.l4 the
    // transport header (20 bytes for TCP, 8 for UDP).
    unsafe {
        if V4 {
            addr_delta =
                csum::diff32(old.src[0], new_src[0]) + csum::diff32(old.dst[0], new_dst[0]);
            let ttl_proto = h.ip.add(8) as *mut u16;
            let old_tp = *ttl_proto;
            let mut bytes = old_tp.to_ne_bytes();
            bytes[0] -= 1;
            let new_tp = u16::from_ne_bytes(bytes);
            *ttl_proto = new_tp;
            let c = h.ip.add(10) as *mut u16;
            *c = csum::apply_small(*c, addr_delta + csum::diff16(old_tp, new_tp));
            store32(h.ip.add(12), new_src[0]);
            store32(h.ip.add(16), new_dst[0]);
        } else {
            addr_delta = csum::diff128(&old.src, new_src) + csum::diff128(&old.dst, new_dst);
            *h.ip.add(7) -= 1;
            store_addr(h.ip.add(8), new_src, false);
            store_addr(h.ip.add(24), new_dst, false);
        }
        *(h.l4 as *mut [u16; 2]) = [new_sport, new_dport];
        if TCP {
            let c = h.l4.add(16) as *mut u16;
            *c = if partial {
                csum::apply_pseudo(*c, addr_delta)
            } else {
                csum::apply_small(*c, addr_delta + ports)
            };
        } else if old.proto == proto::UDP {
            let c = h.l4.add(6) as *mut u16;
            // IPv4 UDP without checksum stays without one.
            if partial {
                *c = csum::apply_pseudo(*c, addr_delta);
            } else if !(V4 && *c == 0) {
                *c = csum::udp_nonzero(csum::apply_small(*c, addr_delta + ports));
            }
        }
        // SCTP: its CRC32c is updated by the caller (`sctp_crc`).
    }
}

/// [`rewrite`], on the slow paths: an SCTP packet's CRC32c is updated too. `false` (counted)
/// when the SCTP header is not within the packet, which `read_tuple` checked already: the
/// check here is the verifier's.
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the packet's context and its translation"
)]
fn rewrite_slow<const V4: bool, const TCP: bool>(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    h: &Headers<V4, TCP>,
    old: &FlowKey,
    new_src: &Addr,
    new_dst: &Addr,
    new_sport: u16,
    new_dport: u16,
) -> bool {
    let sctp = if !TCP && old.proto == proto::SCTP {
        let Ok(c) = crate::sctp::crc_field(ctx, p) else {
            st.add(stat::PASS_MALFORMED, 1);
            return false;
        };
        Some(c)
    } else {
        None
    };
    // Worked out where it is used, not kept across the route lookup: a value live there
    // would take a slot in the send step's frame.
    let partial = csum_partial(ctx, p, h, old);
    rewrite(h, old, new_src, new_dst, new_sport, new_dport, partial);
    if let Some(c) = sctp {
        // SAFETY: `c` is the checked SCTP common header.
        unsafe {
            crate::sctp::update_crc(
                st,
                c,
                [old.sport, old.dport],
                [new_sport, new_dport],
                p.ip_end - p.l4,
            )
        };
    }
    true
}

/// The MTU to tell the sender of an IPv4 (`V4`) or IPv6 packet whose next hop's MTU is
/// `mtu`: translated (`xlat`), the packet grows by 20 bytes (to IPv6) or shrinks by 20.
#[inline(always)]
fn client_mtu<const V4: bool>(mtu: u32, xlat: bool) -> u32 {
    match (xlat, V4) {
        (false, _) => mtu,
        (true, true) => mtu.saturating_sub(20),
        (true, false) => mtu + 20,
    }
}

/// Whether a cached next hop may carry a packet of `ip_len` bytes at `now`.
#[inline(always)]
pub(crate) fn hop_fresh(hop: &NextHop, ip_len: usize, now: u64) -> bool {
    (hop.expires.wrapping_sub(now as u32) as i32) > 0 && ip_len <= hop.mtu as usize
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

/// Where a 5-tuple's cache slots lie in this CPU's block: the block's start, the offset of
/// its compact slot (among the block's first `compact + 1`, by the low half of its hash) and
/// a far offset (anywhere in the block, by the high half). With fewer flows than the
/// compact slots, most copies sit in a few hundred pages however large the block, and their
/// lookups do not miss the TLB. Shared by [`cache_ways`] and [`reply_ways`].
#[inline(always)]
fn slot_offsets(key: &FlowKey, cfg: &Config, compact: u32) -> (u32, u32, u32) {
    let h = key.cache_hash();
    (
        cpu_base(cfg),
        h as u32 & cfg.flow_cache_mask & compact,
        (h >> 32) as u32 & cfg.flow_cache_mask,
    )
}

/// The two slots of this CPU's reply cache a reply's 5-tuple may occupy: its compact and
/// far slots ([`slot_offsets`]).
#[inline(always)]
fn reply_ways(key: &FlowKey, cfg: &Config) -> (u32, u32) {
    let (base, compact, far) = slot_offsets(key, cfg, COMPACT_REPLY_MASK);
    (base + compact, base + far)
}

/// The reply cache's compact slots: the first 2^14 of the CPU's block (128-byte entries:
/// 2 MB, 512 pages).
const COMPACT_REPLY_MASK: u32 = (1 << 14) - 1;

/// The three slots of this CPU's flow cache a 5-tuple may occupy (docs/xdp.md, "Flow
/// cache"): its compact slot, its far slot and the far slot's neighbour (wrapping around
/// the block) ([`slot_offsets`]); with more flows than compact slots, the other two keep
/// the hit rate. Slots may coincide in a small block.
#[inline(always)]
fn cache_ways(key: &FlowKey, cfg: &Config) -> (u32, u32, u32) {
    let (base, compact, far) = slot_offsets(key, cfg, COMPACT_WAY_MASK);
    (
        base + compact,
        base + far,
        base + (far.wrapping_add(1) & cfg.flow_cache_mask),
    )
}

/// The first way's slots: the first 2^16 of the CPU's block (4 MB, 1,024 pages of 4 KB).
/// With 2^15, twice as many of 10,000 flows found their compact slot taken and sat each on
/// a page of its own (docs/xdp.md, "Flow cache").
const COMPACT_WAY_MASK: u32 = (1 << 16) - 1;

/// Whether a client → VIP packet with these TCP flags may take the fast path: not a SYN,
/// FIN or RST, which change the flow's state.
#[inline(always)]
pub fn may_be_cached(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
}

/// A 5-tuple's set in this CPU's flow cache, its first slot's memory already on its way:
/// see [`cache_set`].
pub struct CacheSet {
    /// The first slot (null if the lookup failed, which it does not for a valid index).
    first: *mut FlowCacheEntry,
    /// The second slot's index.
    second: u32,
    /// The third slot's index.
    third: u32,
}

/// The 5-tuple's set in this CPU's flow cache. Its first slot is read here, early: with
/// many flows the read misses the TLB and the CPU caches, and the checks before the fast
/// path run while it completes.
#[inline(always)]
pub fn cache_set(key: &FlowKey, cfg: &Config) -> CacheSet {
    let (a, b, c) = cache_ways(key, cfg);
    let first = maps::FLOW_CACHE
        .get_ptr_mut(a)
        .unwrap_or(core::ptr::null_mut());
    if !first.is_null() {
        // SAFETY: a valid slot; a plain read, kept by `used`.
        used(u64::from(unsafe {
            core::ptr::read_volatile(&raw const (*first).flow.epoch)
        }));
    }
    CacheSet {
        first,
        second: b,
        third: c,
    }
}

/// The slot of this CPU's flow cache that holds the 5-tuple, if one does.
#[inline(always)]
fn cache_find(key: &FlowKey, cfg: &Config) -> Option<*mut FlowCacheEntry> {
    // The early read is of no use here, but a variant without it changed how the program
    // is laid out and measured the fast path 7 % slower (session 10).
    let set = cache_set(key, cfg);
    if key.family == family::V4 {
        cache_find_in::<true>(&set, key)
    } else {
        cache_find_in::<false>(&set, key)
    }
}

/// The slot of the set `set` that holds the 5-tuple, if one does.
#[inline(always)]
fn cache_find_in<const V4: bool>(set: &CacheSet, key: &FlowKey) -> Option<*mut FlowCacheEntry> {
    // SAFETY: per-CPU slots; only this CPU writes them.
    if !set.first.is_null() && unsafe { same_key::<V4>(&(*set.first).key, key) } {
        return Some(set.first);
    }
    let c = maps::FLOW_CACHE.get_ptr_mut(set.second)?;
    // SAFETY: as above.
    if unsafe { same_key::<V4>(&(*c).key, key) } {
        return Some(c);
    }
    let c = maps::FLOW_CACHE.get_ptr_mut(set.third)?;
    // SAFETY: as above.
    unsafe { same_key::<V4>(&(*c).key, key) }.then_some(c)
}

/// Whether a cached key is `key`, an IPv4 (`V4`) or IPv6 5-tuple. An IPv4 key's address
/// words 1..4 are zero (as [`read_tuple`] builds it), in the cache as in `key` (the family
/// is compared), so the IPv4 compare skips them.
#[inline(always)]
fn same_key<const V4: bool>(cached: &FlowKey, key: &FlowKey) -> bool {
    if !V4 {
        return cached == key;
    }
    cached.src[0] == key.src[0] && cached.dst[0] == key.dst[0] && cached.tail() == key.tail()
}

/// This CPU's block of the cache arrays starts here (the verifier inlines the helper).
#[inline(always)]
fn cpu_base(cfg: &Config) -> u32 {
    // SAFETY: plain helper call.
    let cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() };
    cpu.wrapping_mul(cfg.flow_cache_mask + 1)
}

/// Remembers a tracked flow in this CPU's flow cache: in the slot of its set that holds
/// it already (a flow never has two copies), else in the first that holds nothing valid
/// (the compact slot first), else in place of the copy refreshed longest ago.
///
/// A copy serves packets for its [`copy_life`] without looking at the flow's timeout, so a
/// flow whose timeout is shorter (a closing TCP flow, or UDP, under timeouts configured
/// below two seconds) is not cached, and a copy of its earlier state is dropped.
#[inline(always)]
fn cache_store(key: &FlowKey, flow: &Flow, cfg: &Config, now: u64) {
    // SCTP takes the slow path only (its CRC32c is updated there).
    if key.proto == proto::SCTP {
        return;
    }
    if timeout(flow, cfg, key.proto) < copy_life(cfg) {
        cache_forget(key, cfg);
        return;
    }
    let (a, b, c) = cache_ways(key, cfg);
    let (Some(a), Some(b), Some(c3)) = (
        maps::FLOW_CACHE.get_ptr_mut(a),
        maps::FLOW_CACHE.get_ptr_mut(b),
        maps::FLOW_CACHE.get_ptr_mut(c),
    ) else {
        return;
    };
    // SAFETY: per-CPU slots; only this CPU touches them while the program runs.
    let (ra, rb, rc) = unsafe { (&*a, &*b, &*c3) };
    let invalid = |c: &FlowCacheEntry| {
        c.flow.epoch != cfg.cache_epoch || now.saturating_sub(c.flow.last_seen) > copy_life(cfg)
    };
    let c = if ra.key == *key {
        a
    } else if rb.key == *key {
        b
    } else if rc.key == *key {
        c3
    } else if invalid(ra) {
        a
    } else if invalid(rb) {
        b
    } else if invalid(rc) {
        c3
    } else {
        // The copy refreshed longest ago.
        let (o, ro) = if rc.flow.last_seen < rb.flow.last_seen {
            (c3, rc)
        } else {
            (b, rb)
        };
        if ro.flow.last_seen < ra.flow.last_seen {
            o
        } else {
            a
        }
    };
    // SAFETY: as above.
    unsafe {
        (*c).key = *key;
        (*c).flow = *flow;
    }
}

/// Drops the copy of a flow from this CPU's flow cache, if there is one.
#[inline(always)]
fn cache_forget(key: &FlowKey, cfg: &Config) {
    if let Some(c) = cache_find(key, cfg) {
        // SAFETY: per-CPU slot; only this CPU touches it while the program runs.
        unsafe { (*c).key = FlowKey::default() };
    }
}

/// How often a flow's shared entries (`CONNTRACK`, `REV_NAT`) are written, at most: their
/// ages, and with them the LRU position and the SNAT port's hold. Once a second.
#[inline(always)]
fn refresh(cfg: &Config) -> u64 {
    u64::from(cfg.hz)
}

/// How long a cached copy (flow cache, reply cache) serves packets past the age it copies:
/// two seconds. An active flow takes the slow path about once per copy life.
#[inline(always)]
pub(crate) fn copy_life(cfg: &Config) -> u64 {
    2 * u64::from(cfg.hz)
}

/// How long a port stays its flow's after the flow was last seen, whatever became of the
/// flow: a second past the life of its last cached copy.
#[inline(always)]
pub(crate) fn port_hold(cfg: &Config) -> u64 {
    copy_life(cfg) + u64::from(cfg.hz)
}

/// The source a cached flow's packets get toward its backend: the client's own address for a
/// flow that keeps it (its port is the client's too), else the node's SNAT address.
#[inline(always)]
fn flow_source<const V4: bool>(key: &FlowKey, flow: &Flow, cfg: &Config) -> Addr {
    if flow.flags & flow_flags::PRESERVE_SOURCE != 0 {
        key.src
    } else if V4 {
        [cfg.snat_v4, 0, 0, 0]
    } else {
        cfg.snat_v6
    }
}

/// Whether a tracked flow still goes to `be`: the id is live and still the same backend of
/// the same service (ids are reused after a backend is removed).
#[inline(always)]
pub(crate) fn still_assigned(be: &Backend, flow: &Flow) -> bool {
    be.service_id == flow.service_id && be.generation == flow.backend_gen
}

/// Fast path, inline in the entry point: a packet without SYN, FIN or RST of a flow in this
/// CPU's flow cache (a copy within its [`copy_life`]), whose backend's next hop is cached and fits
/// the packet. No hash lookup, no helper call. `None` sends the packet to
/// [`balance_packet`].
#[inline(always)]
pub fn cached<const V4: bool, const TCP: bool>(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    h: &Headers<V4, TCP>,
    t: &Tuple,
    cfg: &Config,
    set: &CacheSet,
) -> Result<Option<u32>, Skip> {
    if !may_be_cached(t.tcp_flags) {
        return Ok(None);
    }
    let key = &t.key;
    let now = now();
    let Some(c) = cache_find_in::<V4>(set, key) else {
        return Ok(None);
    };
    // SAFETY: per-CPU slot; only this CPU writes it.
    let c = unsafe { &*c };
    // Within its life a copy's flow has not timed out (`cache_store`).
    if c.flow.epoch != cfg.cache_epoch || now.saturating_sub(c.flow.last_seen) > copy_life(cfg) {
        return Ok(None);
    }
    let Some(be) = backend_ptr(c.flow.backend_id) else {
        return Ok(None);
    };
    // SAFETY: valid map value pointer; read only here.
    let be = unsafe { &*be };
    if !still_assigned(be, &c.flow) {
        return Ok(None);
    }
    if be.encap != encap::NAT {
        // Direct server return: sized, encapsulated and sent by `encap`, from the entry
        // point. The TTL is not decremented, but one about to expire passes to the stack
        // as on the slow paths.
        if h.hop_limit() <= 1 {
            st.add(stat::PASS_TTL, 1);
            return Ok(Some(xdp_action::XDP_PASS));
        }
        st.add(stat::CT_HIT, 1);
        return Ok(Some(crate::encap::fast_step(c.flow.backend_id)));
    }
    if be.family != key.family || !hop_fresh(&be.hop, p.ip_len(), now) {
        return Ok(None);
    }
    // The rewrite and send.
    if h.hop_limit() <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Ok(Some(xdp_action::XDP_PASS));
    }
    st.add(stat::CT_HIT, 1);
    let partial = csum_partial(ctx, p, h, key);
    rewrite(
        h,
        key,
        &flow_source::<V4>(key, &c.flow, cfg),
        &be.addr,
        c.flow.snat_port,
        be.port,
        partial,
    );
    count(
        &maps::BACKEND_STATS,
        c.flow.backend_id,
        p.ip_end as u64,
        false,
    );
    Ok(Some(fib::send(ctx, st, &be.hop)))
}

/// Client → VIP packets the fast path did not serve: a tracked flow's packet goes to its
/// backend (one `CONNTRACK` lookup, which also refreshes the entry and the flow cache); a
/// new flow (or a stale entry: expired, backend gone, a new SYN after close) is balanced
/// through the service's Maglev ring.
#[inline(always)]
pub fn balance_packet(ctx: &XdpContext, st: &Stats, p: &Parsed, tcp_flags: u8) -> u32 {
    let (hdr, meta) = p.pack(tcp_flags);
    let v4 = p.family == family::V4;
    // Conntrack first, then (a miss or a stale entry) a new flow, then the rewrite and
    // send: global functions called one after the other, so that their frames never stack
    // up (the stack is 512 bytes for the whole chain).
    let verdict = match p.proto {
        proto::TCP if v4 => portico_tracked_tcp4(ctx.ctx, hdr, meta),
        proto::TCP => portico_tracked_tcp6(ctx.ctx, hdr, meta),
        // UDP and SCTP.
        _ if v4 => portico_tracked_udp4(ctx.ctx, hdr, meta),
        _ => portico_tracked_udp6(ctx.ctx, hdr, meta),
    };
    if verdict == SEND {
        return answer_too_big(ctx, p, send_step(ctx, p, hdr, meta, v4));
    }
    if verdict != NOT_MINE && verdict != STALE {
        return answer_too_big(ctx, p, verdict);
    }
    // A new flow: pick a backend, reserve a SNAT port toward it, track and send. Three
    // global functions in a row, for the same reason.
    let picked = match p.proto {
        proto::TCP if v4 => portico_pick_tcp4(ctx.ctx, hdr, meta),
        proto::TCP => portico_pick_tcp6(ctx.ctx, hdr, meta),
        _ if v4 => portico_pick_udp4(ctx.ctx, hdr, meta),
        _ => portico_pick_udp6(ctx.ctx, hdr, meta),
    };
    if picked & PICKED == 0 {
        return picked;
    }
    let picked = claim_port(picked, tcp_flags, verdict == STALE);
    if picked == 0 {
        st.add(stat::DROP_NO_SNAT_PORT, 1);
        maps::count_drop(snat::requested_service());
        return xdp_action::XDP_DROP;
    }
    let verdict = match p.proto {
        proto::TCP if v4 => portico_establish_tcp4(ctx.ctx, hdr, meta, picked),
        proto::TCP => portico_establish_tcp6(ctx.ctx, hdr, meta, picked),
        _ if v4 => portico_establish_udp4(ctx.ctx, hdr, meta, picked),
        _ => portico_establish_udp6(ctx.ctx, hdr, meta, picked),
    };
    if verdict == SEND {
        return answer_too_big(ctx, p, send_step(ctx, p, hdr, meta, v4));
    }
    answer_too_big(ctx, p, verdict)
}

/// The send step of a [`SEND`] answer: one global function per family and transport.
#[inline(always)]
fn send_step(ctx: &XdpContext, p: &Parsed, hdr: u64, meta: u64, v4: bool) -> u32 {
    match p.proto {
        proto::TCP if v4 => portico_send_tcp4(ctx.ctx, hdr, meta),
        proto::TCP => portico_send_tcp6(ctx.ctx, hdr, meta),
        _ if v4 => portico_send_udp4(ctx.ctx, hdr, meta),
        _ => portico_send_udp6(ctx.ctx, hdr, meta),
    }
}

/// The port step of a new flow, between [`pick`] and [`establish`]: [`pick`]'s answer
/// `picked` becomes [`establish`]'s argument (the port and what the search found), or 0 when
/// no port is free. A function of its own: inline, the values it holds across the search
/// grew the entry point's frame, which every call chain below the entry point carries
/// (512 bytes for the whole chain).
#[inline(never)]
fn claim_port(picked: u32, tcp_flags: u8, stale: bool) -> u64 {
    let preserved = picked & PICKED_PRESERVED != 0;
    // A packet other than a SYN most likely belongs to an unconfirmed flow, whose
    // reservation its search finds at once. A flow that keeps its client's source has one
    // port to try, the client's.
    let port = if preserved {
        snat::claim_preserved()
    } else {
        snat::claim(tcp_flags & TCP_SYN == 0)
    };
    let Some(port) = port else {
        return 0;
    };
    u64::from(picked & !PICKED_PRESERVED)
        | if preserved { PRESERVED } else { 0 }
        | u64::from(port.port) << 32
        | if port.confirmed { CONFIRMED } else { 0 }
        | if port.own { OWN_RESERVATION } else { 0 }
        | if port.first { FIRST_PORT } else { 0 }
        | if stale { STALE_ENTRY } else { 0 }
}

/// A slow path's verdict, or, when it asked for it, the ICMP too-big answer.
#[inline(always)]
fn answer_too_big(ctx: &XdpContext, p: &Parsed, verdict: u32) -> u32 {
    if verdict == NOT_MINE {
        verdict
    } else if verdict & TOO_BIG != 0 {
        crate::pmtu::too_big(ctx, p, verdict & 0xffff)
    } else if verdict & nat46::XLAT != 0 {
        nat46::translate(ctx, p)
    } else if verdict & crate::encap::ENCAP != 0 {
        crate::encap::forward(ctx, p, verdict)
    } else {
        verdict
    }
}

/// The client's family of a reverse-NAT entry found under a reply of family `fam`.
#[inline(always)]
fn client_family(rev: &RevNat, fam: u8) -> u8 {
    if rev.client_family != 0 {
        rev.client_family
    } else {
        fam
    }
}

/// The length of the reply `p` as it leaves toward the client (translated if NAT46/64).
#[inline(always)]
fn reply_len<const V4: bool>(p: &Parsed, rev: &RevNat) -> usize {
    if rev.client_family != 0 {
        nat46::translated_len(p, V4)
    } else {
        p.ip_len()
    }
}

/// The slow path's global functions, one per family and transport (`hdr` and `meta` are
/// [`Parsed::pack`]'s): each is checked once by the verifier, and each frame holds one
/// combination's locals only.
macro_rules! slow_path_fn {
    ($name:ident, $body:ident, $v4:literal, $tcp:literal) => {
        #[no_mangle]
        #[inline(never)]
        pub extern "C" fn $name(ctx: *mut xdp_md, hdr: u64, meta: u64) -> u32 {
            slow_path::<$v4, $tcp>(ctx, hdr, meta, 0, $body)
        }
    };
    ($name:ident, $body:ident, $v4:literal, $tcp:literal, $arg:ident) => {
        #[no_mangle]
        #[inline(never)]
        pub extern "C" fn $name(ctx: *mut xdp_md, hdr: u64, meta: u64, $arg: u64) -> u32 {
            slow_path::<$v4, $tcp>(ctx, hdr, meta, $arg, $body)
        }
    };
}

/// The common start of the slow paths: counters, configuration, headers and 5-tuple.
#[inline(always)]
fn slow_path<const V4: bool, const TCP: bool>(
    ctx: *mut xdp_md,
    hdr: u64,
    meta: u64,
    arg: u64,
    body: impl FnOnce(&XdpContext, &Stats, &Parsed, &Headers<V4, TCP>, &Tuple, &Config, u64) -> u32,
) -> u32 {
    let ctx = XdpContext::new(ctx);
    let (hdr, meta, arg) = (used(hdr), used(meta), used(arg));
    let (Some(st), Some(cfg)) = (Stats::get(), maps::CONFIG.get(0)) else {
        return xdp_action::XDP_PASS;
    };
    let (p, tcp_flags) = Parsed::unpack(hdr, meta);
    let Ok(h) = Headers::<V4, TCP>::of(&ctx, &p) else {
        st.add(stat::PASS_MALFORMED, 1);
        return xdp_action::XDP_PASS;
    };
    let t = Tuple {
        key: key_of(&h, p.proto),
        tcp_flags,
    };
    body(&ctx, &st, &p, &h, &t, cfg, arg)
}
slow_path_fn!(portico_tracked_tcp4, tracked, true, true);
slow_path_fn!(portico_tracked_udp4, tracked, true, false);
slow_path_fn!(portico_tracked_tcp6, tracked, false, true);
slow_path_fn!(portico_tracked_udp6, tracked, false, false);
slow_path_fn!(portico_pick_tcp4, pick, true, true);
slow_path_fn!(portico_pick_udp4, pick, true, false);
slow_path_fn!(portico_pick_tcp6, pick, false, true);
slow_path_fn!(portico_pick_udp6, pick, false, false);
slow_path_fn!(portico_establish_tcp4, establish, true, true, picked);
slow_path_fn!(portico_establish_udp4, establish, true, false, picked);
slow_path_fn!(portico_establish_tcp6, establish, false, true, picked);
slow_path_fn!(portico_establish_udp6, establish, false, false, picked);
slow_path_fn!(portico_send_tcp4, send, true, true);
slow_path_fn!(portico_send_udp4, send, true, false);
slow_path_fn!(portico_send_tcp6, send, false, true);
slow_path_fn!(portico_send_udp6, send, false, false);

/// A tracked flow's packet, from `CONNTRACK` (else [`unconfirmed`]): refreshes the entry's
/// age and LRU position, keeps its SNAT port, re-caches it, and asks for the send step
/// ([`SEND`]).
/// [`NOT_MINE`] when the flow is not tracked, [`STALE`] when its entry went stale.
#[inline(always)]
fn tracked<const V4: bool, const TCP: bool>(
    _ctx: &XdpContext,
    st: &Stats,
    _p: &Parsed,
    h: &Headers<V4, TCP>,
    t: &Tuple,
    cfg: &Config,
    _: u64,
) -> u32 {
    tracked_flow(st, h, t, cfg).unwrap_or(NOT_MINE)
}

#[inline(always)]
fn tracked_flow<const V4: bool, const TCP: bool>(
    st: &Stats,
    h: &Headers<V4, TCP>,
    t: &Tuple,
    cfg: &Config,
) -> Option<u32> {
    let key = &t.key;
    let now = now();
    // A clear filter bit: no entry, and no lookup (for a new flow, a cold bucket).
    let f = if maps::maybe_in(&maps::CT_FILTER, key) {
        maps::CONNTRACK.get_ptr_mut(key)
    } else {
        st.add(stat::CT_FILTERED, 1);
        None
    };
    let Some(f) = f else {
        if t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            // A SYN (or an SCTP INIT): a new flow, or an unconfirmed one's retransmission,
            // whose port search finds its reservation.
            return None;
        }
        return unconfirmed(st, h, t, cfg, now);
    };
    // SAFETY: valid map value pointer; racing writers only touch plain integers.
    let f = unsafe { &mut *f };
    let fresh_syn = t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    // A stale entry stays until the flow is balanced again (an ICMP error about the flow
    // still finds it if this packet is not forwarded).
    if (fresh_syn && f.state == flow_state::CLOSING) || expired(f, cfg, key.proto, now) {
        return Some(STALE);
    }
    let Some(be) = backend_ptr(f.backend_id).filter(|&be| {
        // SAFETY: valid map value pointer.
        still_assigned(unsafe { &*be }, f)
    }) else {
        return Some(STALE);
    };
    // The shared entries are written at most every REFRESH (and on a state change): the
    // entry's age, and the reverse-NAT entry's (which keeps the SNAT port). A packet that
    // only missed this CPU's flow cache (collisions, many flows) reads and copies.
    let closes = t.tcp_flags & (TCP_FIN | TCP_RST) != 0 && f.state != flow_state::CLOSING;
    if closes || now.saturating_sub(f.last_seen) >= refresh(cfg) {
        if closes {
            f.state = flow_state::CLOSING;
        }
        f.last_seen = now;
        // SAFETY: valid map value pointer.
        if !snat::hold(key, unsafe { &*be }, f, cfg, now) {
            // The port went to another flow: balance this one again.
            return Some(STALE);
        }
    }
    let mut flow = *f;
    flow.epoch = cfg.cache_epoch;
    cache_store(key, &flow, cfg, now);
    if h.hop_limit() <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Some(xdp_action::XDP_PASS);
    }
    st.add(stat::CT_HIT, 1);
    st.add(stat::CT_SLOW, 1);
    let to = To {
        backend_id: flow.backend_id,
        snat_port: flow.snat_port,
        new_flow: false,
        preserved: flow.flags & flow_flags::PRESERVE_SOURCE != 0,
    };
    Some(request_send(&to))
}

/// A packet (not a SYN) of a flow in `CONNTRACK_NEW` (an unconfirmed flow whose port is
/// not the first of its search): sent to its backend on its port. It confirms the flow:
/// its entries move to `CONNTRACK` and `REV_NAT`, and it is cached. [`NOT_MINE`] when the
/// flow is not there or its entry went stale.
#[inline(always)]
fn unconfirmed<const V4: bool, const TCP: bool>(
    st: &Stats,
    h: &Headers<V4, TCP>,
    t: &Tuple,
    cfg: &Config,
    now: u64,
) -> Option<u32> {
    let key = &t.key;
    let n = maps::CONNTRACK_NEW.get_ptr_mut(key)?;
    // SAFETY: valid map value pointer; racing writers only touch plain integers.
    let n = unsafe { &mut *n };
    let Some(be) = backend_ptr(n.backend_id).filter(|&be| {
        now.saturating_sub(n.last_seen) <= snat::unconfirmed_timeout(cfg, key.proto)
            // SAFETY: valid map value pointer.
            && still_assigned(unsafe { &*be }, n)
    }) else {
        // Balanced again; the new entry replaces this one.
        return None;
    };
    // Read now: the entry goes when the flow is confirmed.
    let (backend_id, snat_port, flags) = (n.backend_id, n.snat_port, n.flags);
    if h.hop_limit() <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Some(xdp_action::XDP_PASS);
    }
    // Not a SYN (those go to the port search; UDP has no flags, an SCTP INIT stands for a
    // SYN): it confirms the flow.
    let mut flow = *n;
    flow.last_seen = now;
    flow.epoch = cfg.cache_epoch;
    if t.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        flow.state = flow_state::CLOSING;
    }
    // SAFETY: valid map value pointer.
    if !snat::confirm(key, unsafe { &*be }, &flow, cfg, now) {
        return None;
    }
    if track(key, &flow) {
        st.add(stat::CT_CONFIRM, 1);
        let _ = maps::CONNTRACK_NEW.remove(key);
        cache_store(key, &flow, cfg, now);
    }
    st.add(stat::CT_HIT, 1);
    st.add(stat::CT_SLOW, 1);
    let to = To {
        backend_id,
        snat_port,
        new_flow: false,
        preserved: flags & flow_flags::PRESERVE_SOURCE != 0,
    };
    Some(request_send(&to))
}

/// Inserts a flow into `CONNTRACK`, then sets its bit in the table's presence filter.
#[inline(always)]
fn track(key: &FlowKey, flow: &Flow) -> bool {
    let ok = maps::CONNTRACK.insert(key, flow, 0).is_ok();
    if ok {
        maps::mark(&maps::CT_FILTER, key);
    }
    ok
}

/// Client → VIP packet of a new flow (or one whose entry went stale), first half: the
/// service, the TTL, and Maglev's pick of a backend. Leaves the SNAT port request in this
/// CPU's scratch entry and returns [`PICKED`] | backend id, else a verdict.
#[inline(always)]
fn pick<const V4: bool, const TCP: bool>(
    _ctx: &XdpContext,
    st: &Stats,
    _p: &Parsed,
    h: &Headers<V4, TCP>,
    t: &Tuple,
    cfg: &Config,
    _: u64,
) -> u32 {
    let key = &t.key;
    let vip = VipKey {
        addr: key.dst,
        port: key.dport,
        proto: key.proto,
        family: key.family,
    };
    // SAFETY: read-only use of the value.
    let Some(svc) = (unsafe { maps::SERVICES.get(vip) }) else {
        st.add(stat::PASS_NOT_VIP, 1);
        return xdp_action::XDP_PASS;
    };
    if h.hop_limit() <= 1 {
        st.add(stat::PASS_TTL, 1);
        return xdp_action::XDP_PASS;
    }
    let id = maglev_pick(svc, cfg, key);
    let Some(be) = backend(id).filter(|b| b.service_id == svc.id as u16) else {
        st.add(stat::DROP_NO_BACKEND, 1);
        maps::count_drop(svc.id);
        return xdp_action::XDP_DROP;
    };
    // The client's source is kept toward a backend of its own family only (NAT46/64 needs
    // an address of the backend's family: the SNAT address). Direct server return keeps it
    // whatever the families (the client's packet travels inside an outer header): its flows
    // take the same one try at the client's own port, not a SNAT port of the node's range,
    // which would cap a DSR service at the range's size per backend for nothing.
    let keeps_source = be.encap != encap::NAT
        || (svc.flags & service_flags::PRESERVE_SOURCE != 0 && be.family == key.family);
    if keeps_source {
        if !snat::request_preserved(key, be, svc.id as u16, now()) {
            return xdp_action::XDP_PASS;
        }
        return PICKED | PICKED_PRESERVED | id;
    }
    if !snat::request(key, be, cfg, svc.id as u16, now()) {
        return xdp_action::XDP_PASS;
    }
    PICKED | id
}

/// Second half, once the SNAT port is reserved: the flow is tracked, and the send step
/// asked for ([`SEND`]).
/// `picked` is [`pick`]'s backend id, the port (network order) in bits 32 to 47,
/// [`CONFIRMED`], [`STALE_ENTRY`], [`OWN_RESERVATION`] and [`FIRST_PORT`].
///
/// A new flow is unconfirmed (docs/xdp.md, "Floods"): its reservation in `REV_NAT_NEW` is
/// all there is of it when its port is the first of its search (its next packet's search
/// finds it there again, one lookup), else it also gets a `CONNTRACK_NEW` entry. A later
/// packet of an unconfirmed flow (its reservation found, `OWN_RESERVATION`) confirms it,
/// unless it is a SYN again: the reservation moves to `REV_NAT`, the flow into
/// `CONNTRACK`. A flow whose port was still its own in `REV_NAT` goes to `CONNTRACK` at once.
#[inline(always)]
fn establish<const V4: bool, const TCP: bool>(
    _ctx: &XdpContext,
    st: &Stats,
    _p: &Parsed,
    _h: &Headers<V4, TCP>,
    t: &Tuple,
    cfg: &Config,
    picked: u64,
) -> u32 {
    let key = &t.key;
    let now = now();
    let id = (picked as u32) & !PICKED;
    let port = (picked >> 32) as u16;
    let preserved = picked & PRESERVED != 0;
    let confirmed = picked & CONFIRMED != 0;
    let own = picked & OWN_RESERVATION != 0;
    let first = picked & FIRST_PORT != 0;
    let Some(be) = backend_ptr(id) else {
        st.add(stat::DROP_NO_BACKEND, 1);
        return xdp_action::XDP_DROP;
    };
    // SAFETY: valid map value pointer.
    let (service_id, backend_gen) = unsafe { ((*be).service_id, (*be).generation) };
    let flow = Flow {
        backend_id: id,
        snat_port: port,
        service_id,
        last_seen: now,
        backend_gen,
        state: if t.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            flow_state::CLOSING
        } else {
            flow_state::OPEN
        },
        flags: if preserved {
            flow_flags::PRESERVE_SOURCE
        } else {
            0
        },
        epoch: cfg.cache_epoch,
    };
    // Anything but a SYN (UDP has no flags; an SCTP INIT stands for a SYN).
    let confirms = own && !confirmed && t.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN;
    if confirms {
        // SAFETY: valid map value pointer.
        if !snat::confirm_claimed(key, unsafe { &*be }, &flow, cfg, now) {
            st.add(stat::DROP_NO_SNAT_PORT, 1);
            maps::count_drop(u32::from(service_id));
            return xdp_action::XDP_DROP;
        }
        if track(key, &flow) {
            st.add(stat::CT_CONFIRM, 1);
        }
        if !first {
            let _ = maps::CONNTRACK_NEW.remove(key);
        }
        st.add(stat::CT_HIT, 1);
        st.add(stat::CT_SLOW, 1);
    } else {
        if !own {
            st.add(stat::CT_MISS, 1);
        }
        let inserted = if confirmed {
            track(key, &flow)
        } else if !first {
            maps::CONNTRACK_NEW.insert(key, flow, 0).is_ok()
        } else {
            true
        };
        if inserted && !own {
            st.add(stat::CT_INSERT, 1);
        }
        if !confirmed && picked & STALE_ENTRY != 0 {
            let _ = maps::CONNTRACK.remove(key);
        }
    }
    // A copy of the flow's previous life (a stale entry: re-opened after FIN or RST, its
    // backend gone) must not serve its next packets: they confirm it, or find it cached
    // anew. (A flow without an entry has no copy, unless the LRU evicted its entry within
    // the copy's life; then the new entry most often has its old backend and port.)
    if confirmed || confirms {
        cache_store(key, &flow, cfg, now);
    } else if picked & STALE_ENTRY != 0 {
        cache_forget(key, cfg);
    }
    let to = To {
        backend_id: id,
        snat_port: port,
        new_flow: !own,
        preserved,
    };
    request_send(&to)
}

/// Where a client → VIP packet goes: a [`SEND`] answer's request, in this CPU's
/// `SCRATCH.send`.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct To {
    pub backend_id: u32,
    /// The SNAT port, or the client's port when `preserved` (network order).
    pub snat_port: u16,
    pub new_flow: bool,
    /// The flow keeps its client's source address (and port).
    pub preserved: bool,
}

/// Leaves `to` in this CPU's scratch entry for [`send`]: the [`SEND`] answer.
#[inline(always)]
fn request_send(to: &To) -> u32 {
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    unsafe { (*sc).send = *to };
    SEND
}

/// The send step: the packet toward the backend [`request_send`] left in this CPU's
/// scratch entry.
#[inline(always)]
fn send<const V4: bool, const TCP: bool>(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    h: &Headers<V4, TCP>,
    t: &Tuple,
    cfg: &Config,
    _: u64,
) -> u32 {
    let Some(sc) = maps::SCRATCH.get_ptr(0) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: this CPU's scratch entry, written by the slow path just before.
    let to = unsafe { (*sc).send };
    let Some(be) = backend_ptr(to.backend_id) else {
        st.add(stat::DROP_NO_BACKEND, 1);
        return xdp_action::XDP_DROP;
    };
    send_to_backend(ctx, st, p, h, &t.key, cfg, be, &to, now())
}

/// Rewrites a client → VIP packet toward its backend, counts it, and sends it to the cached
/// next hop (else the FIB's, cached for a second). The next hop is known before the packet
/// is touched: one too big for it is answered with ICMP instead.
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the packet's context, parsed once"
)]
fn send_to_backend<const V4: bool, const TCP: bool>(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    h: &Headers<V4, TCP>,
    key: &FlowKey,
    cfg: &Config,
    be: *mut Backend,
    to: &To,
    now: u64,
) -> u32 {
    // SAFETY: valid map value pointer; only the next-hop cache is written below.
    let be = unsafe { &mut *be };
    if be.encap != encap::NAT {
        // Direct server return: the entry point encapsulates (`crate::encap`).
        return crate::encap::request(to.backend_id, to.new_flow);
    }
    // NAT46 / NAT64: the backend's family differs from the VIP's.
    let xlat = be.family != key.family;
    // NAT46/64 of a CHECKSUM_PARTIAL packet is not done: a GSO packet would keep the
    // other family's GSO type.
    if xlat && (!nat46::eligible(p, h) || csum_partial(ctx, p, h, key)) {
        st.add(stat::PASS_UNSUPPORTED, 1);
        return xdp_action::XDP_PASS;
    }
    let snat = if to.preserved {
        key.src
    } else {
        snat_addr(cfg, be.family)
    };
    let ip_len = if xlat {
        nat46::translated_len(p, V4)
    } else {
        p.ip_len()
    };
    // Where it goes, decided before the packet is touched; the next hop itself stays in the
    // backend's entry (no copy on the stack).
    let way = if hop_fresh(&be.hop, ip_len, now) {
        Way::Hop
    } else {
        // Written in place; a racing writer on another CPU writes the same data.
        let hop: *mut NextHop = &mut be.hop;
        // SAFETY: `hop` is a field of the map value `be`, disjoint from the address.
        match fib::lookup(
            ctx,
            be.family,
            key.proto,
            &snat,
            &be.addr,
            to.snat_port,
            be.port,
            ip_len as u16,
            unsafe { &mut *hop },
        ) {
            Route::Via => {
                be.hop.expires = (now + u64::from(cfg.hz)) as u32;
                Way::Hop
            }
            Route::NoNeigh => Way::PassNoNeigh,
            // A GSO packet (GRO's, or a local sender's): the stack segments it.
            Route::TooBig(_) if csum_partial(ctx, p, h, key) => Way::PassGso,
            Route::TooBig(mtu) => {
                if !h.may_fragment() {
                    return TOO_BIG | client_mtu::<V4>(mtu, xlat).min(0xffff);
                }
                Way::PassToFragment
            }
            Route::None => {
                st.add(stat::DROP_NO_ROUTE, 1);
                maps::count_drop(u32::from(be.service_id));
                return xdp_action::XDP_DROP;
            }
        }
    };
    if xlat {
        return match way {
            // Without a neighbour, translated all the same and passed to the stack, which
            // resolves it and forwards the packet (untranslated, the stack could never
            // reach the backend, and the neighbour would never resolve).
            Way::Hop | Way::PassNoNeigh => {
                count(
                    &maps::BACKEND_STATS,
                    to.backend_id,
                    p.ip_end as u64,
                    to.new_flow,
                );
                let pass = matches!(way, Way::PassNoNeigh);
                nat46::request(
                    &snat,
                    &be.addr,
                    to.snat_port,
                    be.port,
                    be.family,
                    &be.hop,
                    pass,
                )
            }
            Way::PassToFragment | Way::PassGso => {
                st.add(stat::PASS_UNSUPPORTED, 1);
                xdp_action::XDP_PASS
            }
        };
    }
    if !rewrite_slow(ctx, st, p, h, key, &snat, &be.addr, to.snat_port, be.port) {
        return xdp_action::XDP_PASS;
    }
    // Per backend only: the loader adds a service's backends up for its counters.
    count(
        &maps::BACKEND_STATS,
        to.backend_id,
        p.ip_end as u64,
        to.new_flow,
    );
    go(ctx, st, way, &be.hop)
}

/// Sends a rewritten packet the way its route says: out by `hop`, or to the stack. Each arm
/// counts under a constant: a reason carried as data would be a distinct verifier state per
/// value through the rewrite before.
#[inline(always)]
pub(crate) fn go(ctx: &XdpContext, st: &Stats, way: Way, hop: &NextHop) -> u32 {
    match way {
        Way::Hop => fib::send(ctx, st, hop),
        Way::PassNoNeigh => {
            st.add(stat::PASS_NO_NEIGH, 1);
            xdp_action::XDP_PASS
        }
        Way::PassToFragment => {
            st.add(stat::PASS_NEEDS_FRAG, 1);
            xdp_action::XDP_PASS
        }
        Way::PassGso => {
            st.add(stat::PASS_GSO, 1);
            xdp_action::XDP_PASS
        }
    }
}

/// Where a rewritten packet goes, once its route is known.
pub(crate) enum Way {
    /// Out by the cached next hop.
    Hop,
    /// To the stack, which resolves the neighbour.
    PassNoNeigh,
    /// To the stack, which fragments it (IPv4 without DF, bigger than the MTU).
    PassToFragment,
    /// To the stack, which segments it: a GSO packet (CHECKSUM_PARTIAL, generic XDP only)
    /// bigger than the MTU. A redirect would fail (`xdp_ok_fwd_dev` compares the whole
    /// length with the MTU).
    PassGso,
}

/// Backend → node SNAT port: translated back to VIP → client and sent; [`NOT_MINE`] when
/// the packet is not a reply to a translated flow.
///
/// Packets without SYN, FIN or RST are served from this CPU's reply cache (entry and next
/// hop) while its copy is within its [`copy_life`]; the others go to `REV_NAT`, refresh its age
/// and next hop, and re-cache it.
#[inline(always)]
pub fn reply_packet(ctx: &XdpContext, p: &Parsed, tcp_flags: u8) -> u32 {
    let (hdr, meta) = p.pack(tcp_flags);
    let v4 = p.family == family::V4;
    let verdict = match p.proto {
        proto::TCP if v4 => portico_reply_tcp4(ctx.ctx, hdr, meta),
        proto::TCP => portico_reply_tcp6(ctx.ctx, hdr, meta),
        // UDP and SCTP.
        _ if v4 => portico_reply_udp4(ctx.ctx, hdr, meta),
        _ => portico_reply_udp6(ctx.ctx, hdr, meta),
    };
    answer_too_big(ctx, p, verdict)
}

/// The reply path's global functions, one per family and transport.
macro_rules! reply_fn {
    ($name:ident, $v4:literal, $tcp:literal) => {
        #[no_mangle]
        #[inline(never)]
        pub extern "C" fn $name(ctx: *mut xdp_md, hdr: u64, meta: u64) -> u32 {
            let ctx = XdpContext::new(ctx);
            let (hdr, meta) = (used(hdr), used(meta));
            let (Some(st), Some(cfg)) = (Stats::get(), maps::CONFIG.get(0)) else {
                return xdp_action::XDP_PASS;
            };
            let (p, tcp_flags) = Parsed::unpack(hdr, meta);
            reply::<$v4, $tcp>(&ctx, &st, &p, tcp_flags, cfg)
        }
    };
}
reply_fn!(portico_reply_tcp4, true, true);
reply_fn!(portico_reply_udp4, true, false);
reply_fn!(portico_reply_tcp6, false, true);
reply_fn!(portico_reply_udp6, false, false);

#[inline(always)]
fn reply<const V4: bool, const TCP: bool>(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    tcp_flags: u8,
    cfg: &Config,
) -> u32 {
    let Ok(h) = Headers::<V4, TCP>::of(ctx, p) else {
        return NOT_MINE;
    };
    let key = &key_of(&h, p.proto);
    let now = now();
    let (a, b) = reply_ways(key, cfg);
    let (Some(a), Some(b)) = (
        maps::REPLY_CACHE.get_ptr_mut(a),
        maps::REPLY_CACHE.get_ptr_mut(b),
    ) else {
        return NOT_MINE;
    };
    // SAFETY: per-CPU slots; only this CPU touches them while the program runs.
    let (ra, rb) = unsafe { (&*a, &*b) };
    let valid = |c: &ReplyCacheEntry| {
        c.epoch == cfg.cache_epoch && now.saturating_sub(c.rev.last_seen) <= copy_life(cfg)
    };
    // The slot that holds the 5-tuple, else the one to take: one whose copy is no longer
    // valid (the compact one first), else the one refreshed longer ago.
    let slot = if ra.key == *key {
        a
    } else if rb.key == *key {
        b
    } else if !valid(ra) {
        a
    } else if !valid(rb) || rb.rev.last_seen < ra.rev.last_seen {
        b
    } else {
        a
    };
    let mut cached: Option<&ReplyCacheEntry> = None;
    if tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0 {
        // SAFETY: per-CPU slot.
        let c = unsafe { &*slot };
        if c.key == *key && valid(c) && reply_len::<V4>(p, &c.rev) <= c.hop.mtu as usize {
            cached = Some(c);
        }
    }
    // Map values are used in place: the stack is 512 bytes for the whole program.
    let (rev, hop, route): (&RevNat, &NextHop, Route) = match cached {
        Some(c) => (&c.rev, &c.hop, Route::Via),
        None => {
            // A confirmed flow's entry, else an unconfirmed one's (a clear filter bit: no
            // confirmed one).
            let confirmed = if maps::maybe_in(&maps::RN_FILTER, key) {
                maps::REV_NAT.get_ptr_mut(key)
            } else {
                None
            };
            let Some(r) = confirmed.or_else(|| maps::REV_NAT_NEW.get_ptr_mut(key)) else {
                return NOT_MINE;
            };
            // SAFETY: valid map value pointer; racing writers write plain integers, or the
            // same next hop.
            let r = unsafe { &mut *r };
            if now.saturating_sub(r.last_seen) >= refresh(cfg) {
                r.last_seen = now;
            }
            // Work from a copy in this CPU's slot: LRU entries are recycled at once when
            // evicted, so the shared one may change under us. Valid for the fast path only
            // with a resolved next hop (written into the slot by the lookup).
            // SAFETY: per-CPU slot.
            let c = unsafe { &mut *slot };
            c.rev = *r;
            let route = fib::lookup(
                ctx,
                client_family(&c.rev, key.family),
                key.proto,
                &c.rev.vip,
                &c.rev.client,
                c.rev.vip_port,
                c.rev.client_port,
                reply_len::<V4>(p, &c.rev) as u16,
                &mut c.hop,
            );
            if let Route::Via = route {
                c.key = *key;
                c.epoch = cfg.cache_epoch;
            } else {
                c.key = FlowKey::default();
            }
            (&c.rev, &c.hop, route)
        }
    };
    if h.hop_limit() <= 1 {
        st.add(stat::PASS_TTL, 1);
        return xdp_action::XDP_PASS;
    }
    let xlat = rev.client_family != 0;
    if xlat && (!nat46::eligible(p, &h) || csum_partial(ctx, p, &h, key)) {
        st.add(stat::PASS_UNSUPPORTED, 1);
        return xdp_action::XDP_PASS;
    }
    let way = match route {
        Route::Via => Way::Hop,
        Route::NoNeigh => Way::PassNoNeigh,
        Route::TooBig(_) if csum_partial(ctx, p, &h, key) => Way::PassGso,
        Route::TooBig(mtu) => {
            if !h.may_fragment() {
                return TOO_BIG | client_mtu::<V4>(mtu, xlat).min(0xffff);
            }
            Way::PassToFragment
        }
        Route::None => {
            st.add(stat::DROP_NO_ROUTE, 1);
            maps::count_drop(u32::from(rev.service_id));
            return xdp_action::XDP_DROP;
        }
    };
    if xlat {
        return match way {
            // Without a neighbour, translated all the same and passed to the stack, which
            // resolves the client-side neighbour (see `send_to_backend`).
            Way::Hop | Way::PassNoNeigh => {
                st.add(stat::REPLY_NAT, 1);
                count(
                    &maps::SERVICE_STATS,
                    u32::from(rev.service_id),
                    p.ip_end as u64,
                    false,
                );
                let pass = matches!(way, Way::PassNoNeigh);
                nat46::request(
                    &rev.vip,
                    &rev.client,
                    rev.vip_port,
                    rev.client_port,
                    rev.client_family,
                    hop,
                    pass,
                )
            }
            Way::PassToFragment | Way::PassGso => {
                st.add(stat::PASS_UNSUPPORTED, 1);
                xdp_action::XDP_PASS
            }
        };
    }
    if !rewrite_slow(
        ctx,
        st,
        p,
        &h,
        key,
        &rev.vip,
        &rev.client,
        rev.vip_port,
        rev.client_port,
    ) {
        return xdp_action::XDP_PASS;
    }
    st.add(stat::REPLY_NAT, 1);
    count(
        &maps::SERVICE_STATS,
        u32::from(rev.service_id),
        p.ip_end as u64,
        false,
    );
    go(ctx, st, way, hop)
}
