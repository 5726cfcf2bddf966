//! SNAT source ports. A port toward a backend (SNAT address, backend address and port,
//! protocol) is taken exactly when a reverse-NAT entry exists for it: in `REV_NAT` for a
//! confirmed flow, in `REV_NAT_NEW` for one whose client has sent a single packet. Entries
//! are inserted with BPF_NOEXIST, so two flows never share a port. Ports whose flow is gone
//! (evicted, expired, moved; unconfirmed and idle) are reclaimed.
//!
//! The search is a global BPF function: the verifier checks its loop once, not once per
//! way the packet path can reach it. It takes its request from this CPU's `SCRATCH` entry.

#![allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the helpers where they are, in the scratch map"
)]

use aya_ebpf::bindings::BPF_NOEXIST;
use portico_xdp_common::{
    encap, family, flow_flags, proto, Addr, Backend, Config, Flow, FlowKey, RevNat,
};

use crate::{
    maps::{self, Scratch},
    nat::{backend, expired, flow_hash, maglev_pick, port_hold, snat_addr, still_assigned},
};

/// SNAT ports tried before the new flow is dropped. With ports taken at random, all of them
/// are taken with a probability of occupancy^128: 1.4e-6 at 90 %, 3.4e-13 at 80 %.
const SNAT_PROBES: u32 = 128;
/// Set in [`portico_claim_snat_port`]'s result when a port was found.
const FOUND: u32 = 1 << 16;
/// Set with [`FOUND`] when the flow is confirmed: its entry is (now) in `REV_NAT`.
const CONFIRMED: u32 = 1 << 17;
/// Set with [`FOUND`] when the port was this flow's reservation already (in `REV_NAT_NEW`):
/// the packet is not the flow's first.
const OWN: u32 = 1 << 18;
/// Set with [`FOUND`] when the port is the first of the flow's search: the flow's later
/// packets find it again there, without a `CONNTRACK_NEW` entry.
const FIRST: u32 = 1 << 19;
/// [`portico_try_snat_port`]'s mode: the search's first try.
const TRY_FIRST: u64 = 1;
/// [`portico_try_snat_port`]'s mode: the flow most likely holds a reservation already (its
/// packet is not a SYN), so its first try looks before it reserves.
const TRY_LOOK_FIRST: u64 = 2;

/// A reserved port: network order, and whether the flow is confirmed (`REV_NAT` had its
/// entry: a closed 5-tuple opened again; it then goes to `CONNTRACK` at once).
pub struct Port {
    /// The port, network order.
    pub port: u16,
    /// The flow's entry is in `REV_NAT` (else in `REV_NAT_NEW`).
    pub confirmed: bool,
    /// The port was the flow's reservation in `REV_NAT_NEW` already: an unconfirmed flow's
    /// later packet.
    pub own: bool,
    /// The first port of the flow's search.
    pub first: bool,
}

/// The key of a flow's reverse-NAT entry: backend → node SNAT address (of the backend's
/// family: NAT46/64 flows change family) and port; for a flow that keeps its client's
/// source, backend → client address and port. A direct-server-return flow's replies never
/// cross the node: its entry only holds the flow's place, keyed VIP → client address and
/// port (the flow's own 5-tuple reversed, so two flows never clash).
#[inline(always)]
pub fn reply_key(key: &FlowKey, be: &Backend, snat: &Addr, snat_port: u16) -> FlowKey {
    let (src, sport, fam) = if be.encap != encap::NAT {
        (key.dst, key.dport, key.family)
    } else {
        (be.addr, be.port, be.family)
    };
    FlowKey {
        src,
        dst: *snat,
        sport,
        dport: snat_port,
        proto: key.proto,
        family: fam,
        _pad: [0; 2],
    }
}

/// The reverse-NAT entry of the flow `key` (client → VIP) toward `be`, seen at `now`.
#[inline(always)]
pub fn rev_nat(key: &FlowKey, be: &Backend, service_id: u16, now: u64) -> RevNat {
    RevNat {
        client: key.src,
        vip: key.dst,
        client_port: key.sport,
        vip_port: key.dport,
        service_id,
        client_family: if be.family == key.family {
            0
        } else {
            key.family
        },
        _pad: 0,
        last_seen: now,
    }
}

/// Writes the request for a SNAT port toward `be` for the flow `key` of service
/// `service_id`, seen at `now`, into this CPU's scratch entry, for [`claim`].
#[inline(always)]
pub fn request(key: &FlowKey, be: &Backend, cfg: &Config, service_id: u16, now: u64) -> bool {
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    sc.rev = rev_nat(key, be, service_id, now);
    sc.rkey = reply_key(key, be, &snat_addr(cfg, be.family), 0);
    true
}

/// Writes the request of a flow that keeps its client's source ([`request`]'s counterpart):
/// its reverse entry is keyed by (backend, client address and port), and the only "port" it
/// may hold is the client's own.
#[inline(always)]
pub fn request_preserved(key: &FlowKey, be: &Backend, service_id: u16, now: u64) -> bool {
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    sc.rev = rev_nat(key, be, service_id, now);
    sc.rkey = reply_key(key, be, &key.src, 0);
    true
}

/// Takes the reverse entry [`request_preserved`] asked for, as one try of the port search
/// at the client's own port: the flow's already (confirmed, or its own reservation), or
/// free, or held by another live flow from the same client address and port toward the same
/// backend (through another VIP), which the backend could not tell apart: `None`.
#[inline(always)]
pub fn claim_preserved() -> Option<Port> {
    let sc = maps::SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch entry, read before the call that uses it.
    let port = unsafe { (*sc).rev.client_port };
    let r = portico_try_snat_port(u64::from(port), 0);
    (r & FOUND != 0).then_some(Port {
        port: r as u16,
        confirmed: r & CONFIRMED != 0,
        own: r & OWN != 0,
        first: false,
    })
}

/// The service of the request in this CPU's scratch entry (its drop counter).
#[inline(always)]
pub fn requested_service() -> u32 {
    maps::SCRATCH
        .get_ptr_mut(0)
        // SAFETY: this CPU's scratch entry; a plain read.
        .map_or(0, |sc| u32::from(unsafe { (*sc).rev.service_id }))
}

/// Reserves the SNAT port [`request`] asked for. `None` when every port tried is held.
/// `look_first`: the packet is not a SYN, so the flow most likely has its reservation.
#[inline(always)]
pub fn claim(look_first: bool) -> Option<Port> {
    let r = portico_claim_snat_port(u64::from(look_first));
    (r & FOUND != 0).then_some(Port {
        port: r as u16,
        confirmed: r & CONFIRMED != 0,
        own: r & OWN != 0,
        first: r & FIRST != 0,
    })
}

/// How long an unconfirmed flow (its `CONNTRACK_NEW` entry, its port's reservation) lasts
/// with no packet: its protocol's idle timeout for UDP (a request and its replies are often
/// all a UDP flow has), the closing one (10 s by default) for TCP, a handshake takes less,
/// or the idle timeout if shorter. At least [`port_hold`]: cached copies of the reservation
/// must be gone.
#[inline(always)]
pub fn unconfirmed_timeout(cfg: &Config, proto_: u8) -> u64 {
    let t = if proto_ == proto::UDP {
        cfg.udp_timeout
    } else {
        cfg.tcp_closing_timeout.min(cfg.tcp_timeout)
    };
    u64::from(t).max(port_hold(cfg))
}

/// Whether `r` is the reverse-NAT entry of the flow the request is for.
#[inline(always)]
fn own(r: &RevNat, want: &RevNat) -> bool {
    r.client == want.client
        && r.vip == want.vip
        && r.client_port == want.client_port
        && r.vip_port == want.vip_port
}

/// The search behind [`claim`]: the request (`SCRATCH.rkey` with the backend and SNAT
/// address, `SCRATCH.rev` the entry to insert) is in this CPU's scratch entry. Returns
/// [`FOUND`] | [`CONFIRMED`]? | [`OWN`]? | [`FIRST`]? | port (network order), or 0.
/// `look_first` (not 0): the packet is not a SYN (see [`TRY_LOOK_FIRST`]).
///
/// For each port tried: a `REV_NAT` entry of this very flow (a closed 5-tuple opened again,
/// or a flow whose conntrack entry went away) makes it the flow's at once, confirmed; one
/// of another flow, reclaimable when that flow is gone and its copies have expired. Then a
/// `REV_NAT_NEW` entry of this flow (whose `CONNTRACK_NEW` entry went away) is its again,
/// unconfirmed; one of another flow is reclaimable once idle for the unconfirmed timeout.
/// A port in neither is reserved in `REV_NAT_NEW`.
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_claim_snat_port(look_first: u64) -> u32 {
    let look_first = if crate::parse::used(look_first) != 0 {
        TRY_LOOK_FIRST
    } else {
        0
    };
    let (Some(cfg), Some(sc)) = (maps::CONFIG.get(0), maps::SCRATCH.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    // Where the search starts: a hash of the flow, the same on every node.
    sc.owner = FlowKey {
        src: sc.rev.client,
        dst: sc.rev.vip,
        sport: sc.rev.client_port,
        dport: sc.rev.vip_port,
        proto: sc.rkey.proto,
        // The client's family (the backend's unless NAT46/64).
        family: if sc.rev.client_family != 0 {
            sc.rev.client_family
        } else {
            sc.rkey.family
        },
        _pad: [0; 2],
    };
    let start = search_start(&sc.owner, cfg);
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if max < min {
        return 0;
    }
    let range = max - min + 1;
    for i in 0..SNAT_PROBES {
        let port = ((min + probe(start, i, range)) as u16).to_be();
        if i == 0 {
            let r = portico_try_snat_port(u64::from(port), TRY_FIRST | look_first);
            if r & FOUND != 0 {
                return r | FIRST;
            }
            continue;
        }
        let r = portico_try_snat_port(u64::from(port), 0);
        if r & FOUND != 0 {
            return r;
        }
    }
    0
}

/// Where a flow's port search starts: a hash of the flow, the same on every node.
#[inline(always)]
fn search_start(key: &FlowKey, cfg: &Config) -> u32 {
    flow_hash(key, cfg.hash_seed ^ 0x5bd1_e995, false)
}

/// The first port (network order) of the search of the flow `key` (client → VIP).
#[inline(always)]
fn first_port(key: &FlowKey, cfg: &Config) -> Option<u16> {
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if max < min {
        return None;
    }
    Some(((min + probe(search_start(key, cfg), 0, max - min + 1)) as u16).to_be())
}

/// An unconfirmed flow without a `CONNTRACK_NEW` entry, its 5-tuple (client → VIP) in this
/// CPU's `SCRATCH.rkey`: its backend (Maglev's pick) and port (the first of its search),
/// if its reservation is there (for ICMP errors from the client side and later fragments).
/// Returns the backend id | port (network order) << 32, or 0.
/// A global function: its frame is not stacked on its caller's.
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_unconfirmed_flow() -> u64 {
    let (Some(cfg), Some(sc)) = (maps::CONFIG.get(0), maps::SCRATCH.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs. Keys
    // are built there field by field, not on the stack, which this call's caller has used
    // most of; few values live across the helper calls.
    let sc = unsafe { &mut *sc };
    let Some(port) = first_port(&sc.rkey, cfg) else {
        return 0;
    };
    sc.look.dport = port;
    sc.look.proto = sc.rkey.proto;
    sc.vip.addr = sc.rkey.dst;
    sc.vip.port = sc.rkey.dport;
    sc.vip.proto = sc.rkey.proto;
    sc.vip.family = sc.rkey.family;
    // SAFETY: read-only use of the value.
    let Some(svc) = (unsafe { maps::SERVICES.get(&sc.vip) }) else {
        return 0;
    };
    let id = maglev_pick(svc, cfg, &sc.rkey);
    let Some(be) = backend(id) else {
        return 0;
    };
    // The reservation's key is in the backend's family (with NAT46/NAT64, not the
    // client's), toward the node's SNAT address of that family.
    sc.look.src = be.addr;
    sc.look.sport = be.port;
    sc.look.family = be.family;
    if be.family == family::V4 {
        sc.look.dst[0] = cfg.snat_v4;
        sc.look.dst[1] = 0;
        sc.look.dst[2] = 0;
        sc.look.dst[3] = 0;
    } else {
        sc.look.dst = cfg.snat_v6;
    }
    // SAFETY: read-only use of the value.
    match unsafe { maps::REV_NAT_NEW.get(&sc.look) } {
        Some(r)
            if r.client == sc.rkey.src
                && r.vip == sc.rkey.dst
                && r.client_port == sc.rkey.sport
                && r.vip_port == sc.rkey.dport =>
        {
            u64::from(id) | u64::from(sc.look.dport) << 32
        }
        _ => 0,
    }
}

/// Who holds a port in `REV_NAT`.
enum Holder {
    /// Nobody.
    None,
    /// The flow the request is for (its entry is refreshed).
    Own,
    /// A flow that no longer does: its entry may go.
    Released,
    /// Another flow.
    Other,
}

/// One port of [`portico_claim_snat_port`]'s search (network order), the request in this
/// CPU's scratch entry: the [`FOUND`] | [`CONFIRMED`]? | port answer, or 0 when it is
/// held. `first`: the search's first try, which most often finds the port free, so it
/// reserves before it looks (an insert and a lookup); later tries look first (a lookup,
/// when the port is held). A global function of its own: the verifier checks it once, not
/// once per try.
///
/// A port is reserved in `REV_NAT_NEW` (with BPF_NOEXIST) and then looked up in
/// `REV_NAT`: a flow confirmed on another CPU is inserted there before its reservation goes
/// (and [`hold`], putting back an evicted entry, looks at `REV_NAT_NEW` after its insert),
/// so of two flows that race for a port, at most one keeps it.
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_try_snat_port(port: u64, mode: u64) -> u32 {
    let port = crate::parse::used(port) as u16;
    let mode = crate::parse::used(mode);
    let first = mode & TRY_FIRST != 0;
    let (Some(cfg), Some(sc)) = (maps::CONFIG.get(0), maps::SCRATCH.get_ptr_mut(0)) else {
        return 0;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    sc.rkey.dport = port;
    let found = FOUND | u32::from(port);
    if first && mode & TRY_LOOK_FIRST != 0 {
        // Most likely the flow's own reservation: one lookup finds it.
        if let Some(old) = maps::REV_NAT_NEW.get_ptr_mut(&sc.rkey) {
            // SAFETY: valid map value pointer; plain integers.
            let old = unsafe { &mut *old };
            if own(old, &sc.rev) {
                old.last_seen = sc.rev.last_seen;
                return found | OWN;
            }
        }
    }
    if !first {
        match holder(sc, cfg, port) {
            Holder::Own => return found | CONFIRMED,
            Holder::Other => return 0,
            Holder::Released => {
                let _ = maps::REV_NAT.remove(&sc.rkey);
            }
            Holder::None => {}
        }
    }
    if !reserve(sc) {
        // Reserved already: this flow's own reservation, a live one of another flow, or a
        // stale one, which goes.
        let now = sc.rev.last_seen;
        let Some(old) = maps::REV_NAT_NEW.get_ptr_mut(&sc.rkey) else {
            return 0;
        };
        // SAFETY: valid map value pointer; plain integers.
        let old = unsafe { &mut *old };
        if own(old, &sc.rev) {
            old.last_seen = now;
            return found | OWN;
        }
        if now.saturating_sub(old.last_seen) <= unconfirmed_timeout(cfg, sc.rkey.proto) {
            return 0;
        }
        let _ = maps::REV_NAT_NEW.remove(&sc.rkey);
        if !reserve(sc) {
            return 0;
        }
    }
    match holder(sc, cfg, port) {
        Holder::None => found,
        Holder::Own => {
            let _ = maps::REV_NAT_NEW.remove(&sc.rkey);
            found | CONFIRMED
        }
        Holder::Released => {
            let _ = maps::REV_NAT.remove(&sc.rkey);
            found
        }
        Holder::Other => {
            let _ = maps::REV_NAT_NEW.remove(&sc.rkey);
            0
        }
    }
}

/// Reserves the requested port in `REV_NAT_NEW` if no entry holds it there.
#[inline(always)]
fn reserve(sc: &Scratch) -> bool {
    maps::REV_NAT_NEW
        .insert(&sc.rkey, &sc.rev, u64::from(BPF_NOEXIST))
        .is_ok()
}

/// Who holds the requested port (`port`, network order) in `REV_NAT`; refreshes the entry
/// when it is the requesting flow's.
#[inline(always)]
fn holder(sc: &mut Scratch, cfg: &Config, port: u16) -> Holder {
    if !maps::maybe_in(&maps::RN_FILTER, &sc.rkey) {
        // Its bit set after every insert, before the reservation that insert replaces
        // goes: a reservation of this port made since sees it.
        return Holder::None;
    }
    let Some(old) = maps::REV_NAT.get_ptr_mut(&sc.rkey) else {
        return Holder::None;
    };
    // SAFETY: valid map value pointer; plain integers.
    let old = unsafe { &mut *old };
    let now = sc.rev.last_seen;
    if own(old, &sc.rev) {
        old.last_seen = now;
        return Holder::Own;
    }
    if released(
        old,
        &mut sc.owner,
        sc.rkey.src,
        sc.rkey.sport,
        port,
        cfg,
        now,
        sc.rkey.proto,
        sc.rkey.family,
    ) {
        Holder::Released
    } else {
        Holder::Other
    }
}

/// Whether a confirmed flow's port (its entry `old`) is free for the taking: unseen for
/// [`port_hold`] (its cached copies are gone) and its flow no longer tracked on it: gone,
/// expired, or on another port or backend. `owner` is scratch space for the
/// owner's key; (`backend`, `backend_port`) and `port` are the port's, `backend_family` the
/// backend's family.
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "the search's state, in registers"
)]
fn released(
    old: &RevNat,
    owner: &mut FlowKey,
    backend_addr: Addr,
    backend_port: u16,
    port: u16,
    cfg: &Config,
    now: u64,
    proto_: u8,
    backend_family: u8,
) -> bool {
    if now.saturating_sub(old.last_seen) <= port_hold(cfg) {
        return false;
    }
    // The holder's client family: the backend's, unless the holder is a NAT46/64 flow.
    owner.family = if old.client_family != 0 {
        old.client_family
    } else {
        backend_family
    };
    owner.src = old.client;
    owner.dst = old.vip;
    owner.sport = old.client_port;
    owner.dport = old.vip_port;
    // The owner holds the port while its flow is tracked, unexpired, on this port, and
    // still on a backend with this address and port: of any service, since services that
    // share a backend share its SNAT port space.
    // SAFETY: read-only use of the value.
    let live = match unsafe { maps::CONNTRACK.get(&*owner) } {
        Some(f) => {
            f.snat_port == port
                && !expired(f, cfg, proto_, now)
                && backend(f.backend_id).is_some_and(|owner_be| {
                    owner_be.addr == backend_addr
                        && owner_be.port == backend_port
                        && still_assigned(owner_be, f)
                })
        }
        None => false,
    };
    !live
}

/// The `i`-th port (an offset in a range of `range` ports) a flow whose hash is `start`
/// tries. A range no longer than the search is walked whole, in order; a longer one is
/// sampled: each flow's own pseudo-random sequence, so flows that collide on one port do
/// not collide on the next (a common step would make the search linear probing, whose
/// clusters exhaust the tries long before the range fills).
#[inline(always)]
fn probe(start: u32, i: u32, range: u32) -> u32 {
    if range <= SNAT_PROBES {
        return (start.wrapping_add(i)) % range;
    }
    let mut h = start ^ i.wrapping_mul(0x9e37_79b9);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h % range
}

/// Points this CPU's scratch entry at the flow `key`'s port: `rkey` its reverse-NAT key,
/// `rev` its entry as of `now`.
#[inline(always)]
fn request_for(
    key: &FlowKey,
    be: &Backend,
    flow: &Flow,
    cfg: &Config,
    now: u64,
) -> Option<&'static mut Scratch> {
    let sc = maps::SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    // A flow that keeps its client's source is keyed by the client's address.
    let src = if flow.flags & flow_flags::PRESERVE_SOURCE != 0 {
        key.src
    } else {
        snat_addr(cfg, be.family)
    };
    sc.rkey = reply_key(key, be, &src, flow.snat_port);
    sc.rev = rev_nat(key, be, flow.service_id, now);
    Some(sc)
}

/// Keeps a confirmed flow's SNAT port reserved (its `REV_NAT` entry fresh, so the port is
/// not reclaimed while copies of the flow are cached), putting back an entry the LRU
/// evicted. `false` when the port now belongs to another flow.
#[inline(always)]
pub fn hold(key: &FlowKey, be: &Backend, flow: &Flow, cfg: &Config, now: u64) -> bool {
    let Some(sc) = request_for(key, be, flow, cfg, now) else {
        return false;
    };
    if let Some(r) = maps::REV_NAT.get_ptr_mut(&sc.rkey) {
        // SAFETY: valid map value pointer; plain integers.
        let r = unsafe { &mut *r };
        let ours = own(r, &sc.rev);
        if ours {
            r.last_seen = now;
        }
        return ours;
    }
    put_back(sc, cfg)
}

/// Puts the requested entry back into `REV_NAT`, unless another flow reserved its port in
/// `REV_NAT_NEW` (before, or while this runs: a reservation looks at `REV_NAT` after it is
/// made, and this looks at `REV_NAT_NEW` after the insert, so one of the two sees the
/// other).
#[inline(always)]
fn put_back(sc: &Scratch, cfg: &Config) -> bool {
    let reserved_by_another = |sc: &Scratch| {
        maps::REV_NAT_NEW.get_ptr_mut(&sc.rkey).is_some_and(|r| {
            // SAFETY: valid map value pointer; read only.
            let r = unsafe { &*r };
            !own(r, &sc.rev)
                && sc.rev.last_seen.saturating_sub(r.last_seen)
                    <= unconfirmed_timeout(cfg, sc.rkey.proto)
        })
    };
    if reserved_by_another(sc) || !insert_confirmed(sc) {
        return false;
    }
    if reserved_by_another(sc) {
        let _ = maps::REV_NAT.remove(&sc.rkey);
        return false;
    }
    true
}

/// Inserts the requested entry into `REV_NAT` (with BPF_NOEXIST), then sets its bit in the
/// table's presence filter: before the caller looks at or removes the port's reservation
/// in `REV_NAT_NEW`, so a search that reserves the port later finds the bit set.
#[inline(always)]
fn insert_confirmed(sc: &Scratch) -> bool {
    let ok = maps::REV_NAT
        .insert(&sc.rkey, &sc.rev, u64::from(BPF_NOEXIST))
        .is_ok();
    if ok {
        maps::mark(&maps::RN_FILTER, &sc.rkey);
    }
    ok
}

/// Confirms an unconfirmed flow: its port's reservation moves from `REV_NAT_NEW` to
/// `REV_NAT` (inserted there first: a search for the port on another CPU always finds one
/// of the two). `false` when the port now belongs to another flow.
#[inline(always)]
pub fn confirm(key: &FlowKey, be: &Backend, flow: &Flow, cfg: &Config, now: u64) -> bool {
    let Some(sc) = request_for(key, be, flow, cfg, now) else {
        return false;
    };
    let reserved = maps::REV_NAT_NEW.get_ptr_mut(&sc.rkey).is_some_and(|r| {
        // SAFETY: valid map value pointer; read only.
        own(unsafe { &*r }, &sc.rev)
    });
    if !reserved {
        // The reservation went (evicted, or reclaimed after the unconfirmed timeout).
        return hold(key, be, flow, cfg, now);
    }
    if !insert_confirmed(sc) {
        // Confirmed meanwhile on another CPU, or (if not its own) held by another flow.
        return hold(key, be, flow, cfg, now);
    }
    let _ = maps::REV_NAT_NEW.remove(&sc.rkey);
    true
}

/// Confirms the unconfirmed flow whose own reservation [`claim`] has just found (its key and
/// entry still in this CPU's scratch entry): the reservation moves from `REV_NAT_NEW` to
/// `REV_NAT`, inserted there first, as in [`confirm`]. `false` when another flow holds the
/// port in `REV_NAT`; the reservation is then dropped.
#[inline(always)]
pub fn confirm_claimed(key: &FlowKey, be: &Backend, flow: &Flow, cfg: &Config, now: u64) -> bool {
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    if insert_confirmed(sc) {
        let _ = maps::REV_NAT_NEW.remove(&sc.rkey);
        return true;
    }
    // Confirmed meanwhile on another CPU, or held by another flow.
    if hold(key, be, flow, cfg, now) {
        return true;
    }
    let _ = maps::REV_NAT_NEW.remove(&sc.rkey);
    false
}
