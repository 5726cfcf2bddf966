//! Next-hop resolution with `bpf_fib_lookup`: egress interface and MAC addresses.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::generated::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect},
    programs::XdpContext,
};
use portico_xdp_common::{family, stat, NextHop};

use crate::{
    maps::{self, Stats},
    parse::{ptr_at_fresh, store32},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;
const BPF_FIB_LKUP_RET_NO_NEIGH: i64 = 7;
const BPF_FIB_LKUP_RET_FRAG_NEEDED: i64 = 8;
const BPF_FIB_LKUP_RET_NOT_FWDED: i64 = 4;

/// Where a rewritten packet goes.
pub enum Route {
    /// Resolved: interface, MACs and the route's MTU, written where the caller asked.
    Via,
    /// Route known, neighbour not resolved yet: let the kernel resolve it.
    NoNeigh,
    /// The packet is bigger than the route's MTU (given).
    TooBig(u32),
    /// No route.
    None,
}

/// Looks up the route for a packet from `src` to `dst` (network order, 16-byte form)
/// arriving on the context's interface. On success the next hop is written to `out` (a map
/// value, or this CPU's cache slot: no copy on the stack); nothing is written otherwise.
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
    out: &mut NextHop,
) -> Route {
    // Scalars packed into one argument: a BPF function takes five.
    let q = u64::from(fam)
        | u64::from(proto) << 8
        | u64::from(sport) << 16
        | u64::from(dport) << 32
        | u64::from(tot_len) << 48;
    let r = lookup_in_scratch(ctx, src, dst, q, out);
    match r as u32 as i64 {
        BPF_FIB_LKUP_RET_SUCCESS => Route::Via,
        BPF_FIB_LKUP_RET_NO_NEIGH => Route::NoNeigh,
        BPF_FIB_LKUP_RET_FRAG_NEEDED => Route::TooBig((r >> 32) as u32),
        _ => Route::None,
    }
}

/// The FIB lookup proper. Its 64-byte parameter block lives in this CPU's scratch entry,
/// not on the stack (512 bytes for the whole chain of calls). `q`: family, protocol, ports
/// and length, as [`lookup`] packs them. Returns the helper's result code, and the route's
/// MTU in the upper 32 bits.
#[inline(always)]
fn lookup_in_scratch(
    ctx: &XdpContext,
    src: &[u32; 4],
    dst: &[u32; 4],
    q: u64,
    out: &mut NextHop,
) -> u64 {
    let Some(sc) = maps::SCRATCH.get_ptr_mut(0) else {
        return BPF_FIB_LKUP_RET_NOT_FWDED as u64;
    };
    // SAFETY: this CPU's scratch entry; nothing else uses it while the program runs.
    let p = unsafe { &mut (*sc).fib };
    // SAFETY: bpf_fib_lookup is plain data; all-zero is a valid starting value.
    *p = unsafe { core::mem::zeroed() };
    p.l4_protocol = (q >> 8) as u8;
    p.sport = (q >> 16) as u16;
    p.dport = (q >> 32) as u16;
    p.__bindgen_anon_1.tot_len = (q >> 48) as u16;
    p.ifindex = ctx.ingress_ifindex() as u32;
    if q as u8 == family::V4 {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src[0];
        p.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = *src;
        p.__bindgen_anon_4.ipv6_dst = *dst;
    }
    // SAFETY: ctx.ctx is this invocation's xdp_md; p is map memory of the right size.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.ctx as *mut _,
            p as *mut _,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    // SAFETY: plain integers; on success and on FRAG_NEEDED the kernel wrote the MTU here.
    let mtu = u32::from(unsafe { p.__bindgen_anon_1.mtu_result });
    if rc == BPF_FIB_LKUP_RET_SUCCESS {
        let w = |m: &[u8; 6], i: usize| u32::from_ne_bytes([m[i], m[i + 1], m[i + 2], m[i + 3]]);
        let (d, s) = (&p.dmac, &p.smac);
        *out = NextHop {
            ifindex: p.ifindex,
            macs: [
                w(d, 0),
                u32::from_ne_bytes([d[4], d[5], s[0], s[1]]),
                w(s, 2),
            ],
            expires: 0,
            mtu,
        };
    }
    (rc as u32 as u64) | u64::from(mtu) << 32
}

/// Writes the next hop's MACs and sends the packet: XDP_TX when it leaves the interface it
/// came in on, a redirect otherwise.
#[inline(always)]
pub fn send(ctx: &XdpContext, st: &Stats, nh: &NextHop) -> u32 {
    let Ok(eth) = ptr_at_fresh::<[u8; 12]>(ctx, 0) else {
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
