//! IP fragments (IPv4, and IPv6 with a fragment header). Only the first fragment of a
//! datagram carries the transport header, so only it can be balanced; the fragments after it
//! must reach the same backend (or, for a reply, the same client) with the same addresses.
//!
//! - A first fragment (offset 0, more to come) to a VIP or the SNAT address: its ports go
//!   into `FRAGS` under (source, destination, protocol, identification), then it takes the
//!   slow path as an unfragmented packet would (never the flow cache): balanced, tracked,
//!   rewritten (its transport checksum is updated incrementally, which stays right for the
//!   whole datagram) and sent.
//! - A later fragment: its `FRAGS` entry (at most [`FRAG_LIFE_SECONDS`] old) gives the ports,
//!   and with them the flow's `CONNTRACK` (or `REV_NAT`) entry: the fragment gets the same
//!   addresses as its first fragment (nothing else of it changes), a TTL / hop limit one
//!   lower, and the next hop from the FIB.
//! - SCTP's first fragments are passed (`pass_unsupported`): the CRC32c covers the whole
//!   datagram, whose length a first fragment does not tell, so new ports cannot be
//!   accounted for in it. Its later fragments are then headless.
//! - A later fragment before its first fragment: to a VIP it is dropped (`drop_frag_no_head`):
//!   the backend depends on the ports it lacks, and the stack can do nothing better with
//!   it. To the SNAT address it is passed (the node's own traffic uses that address too).
//!
//! Everything here runs in one global function, checked once by the verifier, called only
//! for fragments: the fast path of unfragmented packets is unchanged.

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    programs::XdpContext,
};
use portico_xdp_common::{
    encap, family, proto, stat, Addr, Config, FlowKey, FragEntry, FragKey, NextHop, VipKey,
};

use crate::{
    csum,
    fib::{self, Route},
    maps::{self, count, Stats},
    nat::{self, Way},
    parse::{self, load_addr, ptr_at, store32, store_addr, Parsed, Skip},
};

/// How long a first fragment's ports serve the fragments after it. Fragments of one
/// datagram arrive within milliseconds of each other; the bound keeps an identification
/// reused later (IPv4's 16 bits wrap) from following an old datagram's flow.
pub const FRAG_LIFE_SECONDS: u64 = 5;

/// A first fragment, checked and remembered, for the entry point's slow paths.
pub struct Head {
    /// The fragment, parsed up to its transport header.
    pub p: Parsed,
    /// Its TCP flags (0 for other protocols).
    pub tcp_flags: u8,
    /// Addressed to the SNAT address: maybe a reply.
    pub to_snat: bool,
    /// Addressed to a VIP.
    pub vip: bool,
}

/// Set in [`portico_fragment`]'s answer for a first fragment (packed as [`pack_head`]
/// says); a verdict otherwise.
const HEAD: u64 = 1 << 63;

/// A packet the parser refused as a fragment: the verdict, or (a first fragment) what the
/// entry point's slow paths need. The slow paths are called from the entry point, not from
/// here: their frames and this one's never stack up (512 bytes for the whole chain).
#[inline(always)]
pub fn handle(ctx: &XdpContext) -> Result<u32, Head> {
    let r = portico_fragment(ctx.ctx);
    if r & HEAD == 0 {
        return Ok(r as u32);
    }
    Err(Head {
        p: Parsed {
            l3: (r & 0xff) as usize,
            l4: ((r >> 8) & 0x1ff) as usize,
            ip_end: ((r >> 17) & 0x1_ffff) as usize,
            family: if (r >> 34) & 1 != 0 {
                family::V6
            } else {
                family::V4
            },
            proto: (r >> 35) as u8,
        },
        tcp_flags: (r >> 43) as u8,
        to_snat: (r >> 51) & 1 != 0,
        vip: (r >> 52) & 1 != 0,
    })
}

/// A first fragment as [`handle`] unpacks it. Offsets fit: the IP header starts within 22
/// bytes, the transport header within [`parse::MAX_OFFSET`], and the packet ends within
/// 2^17 bytes.
#[inline(always)]
fn pack_head(p: &Parsed, tcp_flags: u8, to_snat: bool, vip: bool) -> u64 {
    HEAD | (p.l3 as u64 & 0xff)
        | (p.l4 as u64 & 0x1ff) << 8
        | (p.ip_end as u64 & 0x1_ffff) << 17
        | u64::from(p.family == family::V6) << 34
        | u64::from(p.proto) << 35
        | u64::from(tcp_flags) << 43
        | u64::from(to_snat) << 51
        | u64::from(vip) << 52
}

/// The global function behind [`handle`].
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_fragment(ctx: *mut xdp_md) -> u64 {
    let ctx = XdpContext::new(ctx);
    let Some(st) = Stats::get() else {
        return u64::from(xdp_action::XDP_PASS);
    };
    match fragment(&ctx, &st) {
        Ok(answer) => answer,
        Err(skip) => {
            // Passed untouched (nothing was written yet), counted by reason.
            st.add(skip.stat(), 1);
            u64::from(xdp_action::XDP_PASS)
        }
    }
}

/// Whether `a` is a VIP address (its presence entry in `SERVICES`, behind the filter).
#[inline(always)]
fn is_vip(fam: u8, a: &Addr) -> bool {
    if !maps::maybe_vip(fam, a) {
        return false;
    }
    let k = VipKey {
        addr: *a,
        port: 0,
        proto: 0,
        family: fam,
    };
    // SAFETY: only tested for presence.
    unsafe { maps::SERVICES.get(k) }.is_some()
}

#[inline(always)]
fn fragment(ctx: &XdpContext, st: &Stats) -> Result<u64, Skip> {
    let Some(cfg) = maps::CONFIG.get(0) else {
        return Ok(u64::from(xdp_action::XDP_PASS));
    };
    let (p, f) = parse::parse_fragment(ctx)?;
    if !f.is || !parse::has_ports(p.proto) {
        return Err(Skip::Fragment);
    }
    let v4 = p.family == family::V4;
    let (src, dst) = addresses(ctx, &p)?;
    let to_snat = dst == nat::snat_addr(cfg, p.family);
    let vip = is_vip(p.family, &dst);
    if !to_snat && !vip {
        return Err(Skip::Fragment);
    }
    // Ours to rewrite: the stack would drop an IPv4 header with a bad checksum.
    if v4 && !parse::ipv4_header_ok(ctx, &p)? {
        return Err(Skip::BadChecksum);
    }
    let key = FragKey {
        src,
        dst,
        id: f.id,
        proto: p.proto,
        family: p.family,
        _pad: [0; 2],
    };
    let now = nat::now();
    if !f.later {
        return head(ctx, st, &p, &key, to_snat, vip, now);
    }
    later_fragment(ctx, st, cfg, &p, &key, to_snat, now).map(u64::from)
}

/// A later fragment: its first fragment's flow, if it was seen, else a drop (to a VIP) or a
/// pass (to the SNAT address).
#[inline(always)]
fn later_fragment(
    ctx: &XdpContext,
    st: &Stats,
    cfg: &Config,
    p: &Parsed,
    key: &FragKey,
    to_snat: bool,
    now: u64,
) -> Result<u32, Skip> {
    let (src, dst) = (key.src, key.dst);
    let life = FRAG_LIFE_SECONDS * u64::from(cfg.hz);
    // SAFETY: read only; the entry is copied out at once.
    let entry = unsafe { maps::FRAGS.get(key) }
        .copied()
        .filter(|e| now.saturating_sub(e.seen) <= life);
    let Some(entry) = entry else {
        if to_snat {
            return Err(Skip::Fragment);
        }
        st.add(stat::DROP_FRAG_NO_HEAD, 1);
        return Ok(xdp_action::XDP_DROP);
    };
    let flow = FlowKey {
        src,
        dst,
        sport: entry.sport,
        dport: entry.dport,
        proto: p.proto,
        family: p.family,
        _pad: [0; 2],
    };
    // Where the first fragment went: new addresses, and the counters to bump.
    let (new_src, new_dst, backend_id, service_id) = if to_snat {
        // SAFETY: read only; copied out at once.
        let rev = unsafe {
            maps::REV_NAT
                .get(flow)
                .or_else(|| maps::REV_NAT_NEW.get(flow))
        };
        // Not a NAT46/64 flow's (its fragments are not translated).
        let Some(rev) = rev.copied().filter(|r| r.client_family == 0) else {
            return Err(Skip::Fragment);
        };
        (rev.vip, rev.client, 0, u32::from(rev.service_id))
    } else {
        // SAFETY: read only; copied out at once.
        let tracked = unsafe {
            maps::CONNTRACK
                .get(flow)
                .or_else(|| maps::CONNTRACK_NEW.get(flow))
        };
        let backend_id = match tracked.copied() {
            Some(tracked) => nat::backend(tracked.backend_id)
                .filter(|be| nat::still_assigned(be, &tracked))
                .map(|_| tracked.backend_id),
            // An unconfirmed flow on the first port of its search has its reservation
            // only; found as its packets find it (its backend is the ring's pick).
            None => {
                let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
                    return Err(Skip::Fragment);
                };
                // SAFETY: this CPU's scratch entry; nothing else uses it while the program
                // runs.
                unsafe { (*sc).rkey = flow };
                Some(crate::snat::portico_unconfirmed_flow() as u32).filter(|&id| id != 0)
            }
        };
        let Some((backend_id, be)) = backend_id
            .and_then(|id| nat::backend(id).map(|be| (id, be)))
            // Not a direct-server-return flow's either (later fragments are not
            // encapsulated: docs/dsr.md).
            .filter(|(_, be)| be.family == p.family && be.encap == encap::NAT)
        else {
            return Err(Skip::Fragment);
        };
        (nat::snat_addr(cfg, p.family), be.addr, backend_id, 0)
    };
    later(
        ctx,
        st,
        p,
        &flow,
        &new_src,
        &new_dst,
        backend_id | service_id << 16,
    )
}

/// The source and destination addresses of the IP header.
#[inline(always)]
fn addresses(ctx: &XdpContext, p: &Parsed) -> Result<(Addr, Addr), Skip> {
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

/// A first fragment: its transport header whole within the fragment, its ports remembered;
/// then (back in the entry point) the slow path of an unfragmented packet.
#[inline(always)]
fn head(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    key: &FragKey,
    to_snat: bool,
    vip: bool,
    now: u64,
) -> Result<u64, Skip> {
    let mut tcp_flags = 0;
    if p.proto == proto::TCP {
        tcp_flags = nat::tcp_header(ctx, p)?;
    } else {
        let _: *const [u8; 8] = ptr_at(ctx, p.l4)?;
        // The UDP length is the datagram's, longer than this fragment: not checked against
        // it (the backend's stack checks it once reassembled).
        if p.l4 + 8 > p.ip_end {
            return Err(Skip::BadLength);
        }
        // SCTP's CRC32c covers the whole datagram, whose length a first fragment does not
        // tell: new ports cannot be accounted for. Its fragments are not balanced.
        if p.proto == proto::SCTP {
            return Err(Skip::Unsupported);
        }
    }
    let ports: *const [u16; 2] = ptr_at(ctx, p.l4)?;
    // SAFETY: checked above.
    let [sport, dport] = unsafe { *ports };
    let entry = FragEntry {
        seen: now,
        sport,
        dport,
        _pad: 0,
    };
    // A full table evicts its oldest entries (LRU): fragments of those datagrams are then
    // dropped as headless.
    let _ = maps::FRAGS.insert(key, entry, 0);
    st.add(stat::FRAG_HEAD, 1);
    Ok(pack_head(p, tcp_flags, to_snat, vip))
}

/// A later fragment of a translated flow: the new addresses, a TTL / hop limit one lower,
/// and out by the FIB's next hop. `ids`: the backend id (forward) in the low 16 bits, or
/// the service id (replies) in the next 16, for the counters.
#[inline(always)]
fn later(
    ctx: &XdpContext,
    st: &Stats,
    p: &Parsed,
    flow: &FlowKey,
    new_src: &Addr,
    new_dst: &Addr,
    ids: u32,
) -> Result<u32, Skip> {
    let v4 = p.family == family::V4;
    // The whole fixed header, checked before anything is written.
    let ip: *mut u8 = if v4 {
        ptr_at::<[u8; 20]>(ctx, p.l3)?.cast()
    } else {
        ptr_at::<[u8; 40]>(ctx, p.l3)?.cast()
    };
    // SAFETY: within the checked header.
    let (ttl, df) = unsafe {
        if v4 {
            (*ip.add(8), *ip.add(6) & 0x40 != 0)
        } else {
            (*ip.add(7), true)
        }
    };
    if ttl <= 1 {
        st.add(stat::PASS_TTL, 1);
        return Ok(xdp_action::XDP_PASS);
    }
    let mut hop = NextHop::default();
    let route = fib::lookup(
        ctx,
        p.family,
        p.proto,
        new_src,
        new_dst,
        0,
        0,
        p.ip_len() as u16,
        &mut hop,
    );
    let way = match route {
        Route::Via => Way::Hop,
        Route::NoNeigh => Way::PassNoNeigh,
        Route::TooBig(mtu) => {
            if df {
                return Ok(crate::pmtu::too_big(ctx, p, mtu.min(0xffff)));
            }
            Way::PassToFragment
        }
        Route::None => {
            st.add(stat::DROP_NO_ROUTE, 1);
            return Ok(xdp_action::XDP_DROP);
        }
    };
    // SAFETY: the IP header was checked above (20 or 40 bytes); the program's packet
    // pointers are re-derived from it only.
    unsafe { rewrite(ip, v4, flow, new_src, new_dst) };
    st.add(stat::FRAG_NAT, 1);
    let (backend_id, service_id) = (ids & 0xffff, ids >> 16);
    if backend_id != 0 {
        count(&maps::BACKEND_STATS, backend_id, p.ip_end as u64, false);
    } else {
        count(&maps::SERVICE_STATS, service_id, p.ip_end as u64, false);
    }
    Ok(nat::go(ctx, st, way, &hop))
}

/// Writes the new addresses and the TTL / hop limit one lower; for IPv4, updates the header
/// checksum. The payload (a piece of the transport segment) is left as it is: the first
/// fragment's transport checksum, updated for the whole datagram, covers it.
///
/// # Safety
/// `ip` points to a checked IPv4 (20 bytes) or IPv6 (40 bytes) header.
#[inline(always)]
unsafe fn rewrite(ip: *mut u8, v4: bool, old: &FlowKey, src: &Addr, dst: &Addr) {
    // SAFETY: the caller guarantees the header's bytes.
    unsafe {
        if v4 {
            let ttl_proto = ip.add(8) as *mut u16;
            let old_tp = *ttl_proto;
            let mut bytes = old_tp.to_ne_bytes();
            bytes[0] -= 1;
            let new_tp = u16::from_ne_bytes(bytes);
            *ttl_proto = new_tp;
            let delta = csum::diff32(old.src[0], src[0])
                + csum::diff32(old.dst[0], dst[0])
                + csum::diff16(old_tp, new_tp);
            let c = ip.add(10) as *mut u16;
            *c = csum::apply(*c, delta);
            store32(ip.add(12), src[0]);
            store32(ip.add(16), dst[0]);
        } else {
            *ip.add(7) -= 1;
            store_addr(ip.add(8), src, false);
            store_addr(ip.add(24), dst, false);
        }
    }
}
