//! Next-hop resolution with `bpf_fib_lookup`: egress interface and MAC addresses.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::generated::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect},
    programs::XdpContext,
};
use portico_xdp_common::{family, stat, NextHop};

use crate::{
    maps::Stats,
    parse::{ptr_at, store32},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;

/// Where a rewritten packet goes.
pub enum Route {
    /// Resolved: interface and MACs.
    Via(NextHop),
    /// Route known, neighbour not resolved yet: let the kernel resolve it.
    NoNeigh,
    /// No route.
    None,
}

/// What to look up.
struct Query {
    src: [u32; 4],
    dst: [u32; 4],
    sport: u16,
    dport: u16,
    tot_len: u16,
    fam: u8,
    proto: u8,
}

/// Looks up the route for a packet from `src` to `dst` (network order, 16-byte form)
/// arriving on the context's interface.
#[inline(always)]
#[allow(
    clippy::too_many_arguments,
    reason = "mirrors the fields bpf_fib_lookup takes"
)]
pub fn lookup(
    ctx: &XdpContext,
    fam: u8,
    proto: u8,
    src: &[u32; 4],
    dst: &[u32; 4],
    sport: u16,
    dport: u16,
    tot_len: u16,
) -> Route {
    let q = Query {
        src: *src,
        dst: *dst,
        sport,
        dport,
        tot_len,
        fam,
        proto,
    };
    let mut hop = NextHop::default();
    match lookup_outlined(ctx, &q, &mut hop) {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Via(hop),
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeigh,
        _ => Route::None,
    }
}

/// The FIB lookup proper, as a BPF function of its own: it runs once a second per backend
/// (the result is cached) and for replies, and its 64-byte parameter block then lives in its
/// own stack frame rather than in the packet path's.
#[inline(never)]
fn lookup_outlined(ctx: &XdpContext, q: &Query, hop: &mut NextHop) -> i64 {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid starting value.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.l4_protocol = q.proto;
    p.sport = q.sport;
    p.dport = q.dport;
    p.__bindgen_anon_1.tot_len = q.tot_len;
    p.ifindex = ctx.ingress_ifindex() as u32;
    if q.fam == family::V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = q.src[0];
        p.__bindgen_anon_4.ipv4_dst = q.dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = q.src;
        p.__bindgen_anon_4.ipv6_dst = q.dst;
    }
    // SAFETY: ctx.ctx is this invocation's xdp_md; p lives on the stack for the call.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.ctx as *mut _,
            &mut p as *mut _,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let mut eth = [0u8; 12];
        eth[..6].copy_from_slice(&p.dmac);
        eth[6..].copy_from_slice(&p.smac);
        let w = |i: usize| u32::from_ne_bytes([eth[i], eth[i + 1], eth[i + 2], eth[i + 3]]);
        *hop = NextHop {
            ifindex: p.ifindex,
            macs: [w(0), w(4), w(8)],
            expires: 0,
        };
    }
    rc
}

/// Writes the next hop's MACs and sends the packet: XDP_TX when it leaves the interface it
/// came in on, a redirect otherwise.
#[inline(always)]
pub fn send(ctx: &XdpContext, st: &Stats, nh: &NextHop) -> u32 {
    let Ok(eth) = ptr_at::<[u8; 12]>(ctx, 0) else {
        return xdp_action::XDP_ABORTED;
    };
    let eth = eth.cast::<u8>();
    // SAFETY: 12 bytes checked above.
    unsafe {
        store32(eth, nh.macs[0]);
        store32(eth.add(4), nh.macs[1]);
        store32(eth.add(8), nh.macs[2]);
    }
    if nh.ifindex == ctx.ingress_ifindex() as u32 {
        st.add(stat::TX, 1);
        xdp_action::XDP_TX
    } else {
        st.add(stat::REDIRECT, 1);
        // SAFETY: plain helper call.
        unsafe { bpf_redirect(nh.ifindex, 0) as u32 }
    }
}
