//! SNAT source ports. A port toward a backend (SNAT address, backend address and port,
//! protocol) is taken exactly when its reverse-NAT entry exists: it is inserted with
//! BPF_NOEXIST, so two flows never share one. Entries whose flow is gone (evicted, expired
//! or moved) are reclaimed.
//!
//! The search is a global BPF function: the verifier checks its loop once, not once per
//! way the packet path can reach it. It takes its request from this CPU's `SCRATCH` entry.

use aya_ebpf::bindings::BPF_NOEXIST;
use portico_xdp_common::{Addr, Backend, Config, Flow, FlowKey, RevNat};

use crate::{
    maps,
    nat::{backend, expired, flow_hash, snat_addr, still_assigned},
};

/// SNAT ports tried before the new flow is dropped. With ports taken at random, all of them
/// are taken with a probability of occupancy^128: 1.4e-6 at 90 %, 3.4e-13 at 80 %.
const SNAT_PROBES: u32 = 128;
/// Set in [`portico_claim_snat_port`]'s result when a port was found.
const FOUND: u32 = 1 << 16;

/// The key of a flow's reverse-NAT entry: backend → node SNAT address and port.
#[inline(always)]
pub fn reply_key(key: &FlowKey, be: &Backend, snat: &Addr, snat_port: u16) -> FlowKey {
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
pub fn rev_nat(key: &FlowKey, service_id: u16, now: u64) -> RevNat {
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

/// Writes the request for a SNAT port toward `be` for the flow `key` of service
/// `service_id`, seen at `now`, into this CPU's scratch entry, for [`claim`].
#[inline(always)]
pub fn request(key: &FlowKey, be: &Backend, cfg: &Config, service_id: u16, now: u64) -> bool {
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let sc = unsafe { &mut *sc };
    sc.rev = rev_nat(key, service_id, now);
    sc.rkey = reply_key(key, be, &snat_addr(cfg, key.family), 0);
    true
}

/// Reserves the SNAT port [`request`] asked for: the port, network order, or `None` when
/// every port tried is held.
#[inline(always)]
pub fn claim() -> Option<u16> {
    let r = portico_claim_snat_port();
    (r & FOUND != 0).then_some(r as u16)
}

/// The search behind [`claim`]: the request (`SCRATCH.rkey` with the backend and SNAT
/// address, `SCRATCH.rev` the entry to insert) is in this CPU's scratch entry. Returns
/// [`FOUND`] | port (network order), or 0.
#[no_mangle]
#[inline(never)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the helpers where they are, in the scratch map"
)]
pub extern "C" fn portico_claim_snat_port() -> u32 {
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
        family: sc.rkey.family,
        _pad: [0; 2],
    };
    let start = flow_hash(&sc.owner, cfg.hash_seed ^ 0x5bd1_e995, false);
    let min = u32::from(cfg.snat_port_min);
    let max = u32::from(cfg.snat_port_max);
    if max < min {
        return 0;
    }
    let range = max - min + 1;
    let now = sc.rev.last_seen;
    for i in 0..SNAT_PROBES {
        let port = (min + probe(start, i, range)) as u16;
        let port = port.to_be();
        sc.rkey.dport = port;
        // The first port is tried by inserting at once (the common case: free); the
        // others are looked up first (an insert that fails still takes, and on a full LRU
        // map evicts, an entry for the attempt).
        if i == 0
            && maps::REV_NAT
                .insert(&sc.rkey, &sc.rev, u64::from(BPF_NOEXIST))
                .is_ok()
        {
            return FOUND | u32::from(port);
        }
        let Some(old) = maps::REV_NAT.get_ptr_mut(&sc.rkey) else {
            if maps::REV_NAT
                .insert(&sc.rkey, &sc.rev, u64::from(BPF_NOEXIST))
                .is_ok()
            {
                return FOUND | u32::from(port);
            }
            continue;
        };
        // SAFETY: valid map value pointer; plain integers.
        let old = unsafe { &mut *old };
        // This very flow held it (a closed 5-tuple opened again, or a flow whose entry
        // went away): the port is its own, at once.
        if old.client == sc.rev.client
            && old.vip == sc.rev.vip
            && old.client_port == sc.rev.client_port
            && old.vip_port == sc.rev.vip_port
        {
            *old = sc.rev;
            return FOUND | u32::from(port);
        }
        // Cached copies of a flow live a second past its last refresh: wait two.
        if now.saturating_sub(old.last_seen) <= 2 * u64::from(cfg.hz) {
            continue;
        }
        sc.owner = FlowKey {
            src: old.client,
            dst: old.vip,
            sport: old.client_port,
            dport: old.vip_port,
            proto: sc.rkey.proto,
            family: sc.rkey.family,
            _pad: [0; 2],
        };
        // The owner holds the port while its flow is tracked, unexpired, on this port, and
        // still on a backend with this address and port: of any service, since services
        // that share a backend share its SNAT port space.
        // SAFETY: read-only use of the value.
        let live = match unsafe { maps::CONNTRACK.get(&sc.owner) } {
            Some(f) => {
                f.snat_port == port
                    && !expired(f, cfg, sc.rkey.proto, now)
                    && backend(f.backend_id).is_some_and(|owner_be| {
                        owner_be.addr == sc.rkey.src
                            && owner_be.port == sc.rkey.sport
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
            return FOUND | u32::from(port);
        }
    }
    0
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

/// Keeps a tracked flow's SNAT port reserved (its `REV_NAT` entry fresh, so the port is
/// not reclaimed while copies of the flow are cached), putting the entry back if the LRU
/// evicted it. `false` when the port now belongs to another flow.
#[inline(always)]
#[allow(
    clippy::needless_borrows_for_generic_args,
    reason = "keys and values are passed to the helpers where they are, in the scratch map"
)]
pub fn hold(key: &FlowKey, be: &Backend, flow: &Flow, cfg: &Config, now: u64) -> bool {
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
