//! Portico's XDP program. The entry point only dispatches; the work lives in modules split by
//! job, as Katran splits its headers: `parse` (bounds-checked headers), `nat` (conntrack,
//! Maglev, DNAT/SNAT and reverse NAT), `csum` (incremental checksums), `fib` (next hop),
//! `maps` (one doc comment per map).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod csum;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod parse;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
    use portico_xdp_common::{family, proto, stat, VipKey};

    use crate::{
        icmp,
        maps::{self, Stats},
        nat,
        parse::{self, Skip},
    };

    /// Entry point, frags-aware (`xdp.frags` section): lengths come from the real buffer.
    #[xdp(frags)]
    pub fn portico_xdp(ctx: XdpContext) -> u32 {
        let Some(st) = Stats::get() else {
            return xdp_action::XDP_PASS;
        };
        st.add(stat::PACKETS, 1);
        match try_balance(&ctx, &st) {
            Ok(verdict) => verdict,
            Err(skip) => {
                // Not parsed: the linear part is what there is to count.
                st.add(stat::BYTES, (ctx.data_end() - ctx.data()) as u64);
                st.add(skip.stat(), 1);
                xdp_action::XDP_PASS
            }
        }
    }

    /// Replies to the node's SNAT address are translated back; traffic to an address outside
    /// the VIP filter passes after one array read; VIP traffic goes to its tracked backend
    /// (one conntrack lookup) or, for a new flow, through the service's Maglev ring.
    #[inline(always)]
    fn try_balance(ctx: &XdpContext, st: &Stats) -> Result<u32, Skip> {
        let p = parse::parse(ctx)?;
        let bytes = p.len;
        st.add(stat::BYTES, bytes);
        let Some(cfg) = maps::CONFIG.get(0) else {
            return Ok(xdp_action::XDP_PASS);
        };
        if !parse::has_ports(p.proto) {
            let icmp = (p.family == family::V4 && p.proto == proto::ICMP)
                || (p.family == family::V6 && p.proto == proto::ICMPV6);
            if icmp {
                if let Some(verdict) = icmp::handle(ctx, st, &p, cfg)? {
                    return Ok(verdict);
                }
            }
            st.add(stat::PASS_NOT_VIP, 1);
            return Ok(xdp_action::XDP_PASS);
        }
        let t = nat::read_tuple(ctx, &p)?;
        let key = &t.key;
        if key.dst == nat::snat_addr(cfg, key.family) {
            if let Some(verdict) = nat::reply(ctx, st, &p, &t, cfg, bytes)? {
                return Ok(verdict);
            }
        }
        if !maps::maybe_vip(key.family, &key.dst) {
            st.add(stat::PASS_NOT_VIP, 1);
            return Ok(xdp_action::XDP_PASS);
        }
        if p.proto != proto::SCTP {
            if let Some(verdict) = nat::tracked(ctx, st, &p, &t, cfg, bytes)? {
                return Ok(verdict);
            }
        }
        let vip = VipKey {
            addr: key.dst,
            port: key.dport,
            proto: key.proto,
            family: key.family,
        };
        // SAFETY: read-only copy of the value.
        let Some(svc) = (unsafe { maps::SERVICES.get(vip) }).copied() else {
            st.add(stat::PASS_NOT_VIP, 1);
            return Ok(xdp_action::XDP_PASS);
        };
        if p.proto == proto::SCTP {
            // SCTP's CRC32c covers the whole packet: not rewritten in XDP (yet).
            st.add(stat::PASS_UNSUPPORTED, 1);
            return Ok(xdp_action::XDP_PASS);
        }
        nat::new_flow(ctx, st, &p, &t, &svc, cfg, bytes)
    }

    /// Benchmark floor: swaps the MAC addresses and sends the frame back (XDP_TX). Loaded
    /// only by the datapath benchmark, to compare the balancer against the cheapest program
    /// that touches the packet.
    #[xdp]
    pub fn xdp_floor(ctx: XdpContext) -> u32 {
        let Ok(eth) = parse::ptr_at::<[u16; 6]>(&ctx, 0) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: 12 bytes checked; the frame starts at an even address.
        let eth = unsafe { &mut *eth };
        let [d0, d1, d2, s0, s1, s2] = *eth;
        *eth = [s0, s1, s2, d0, d1, d2];
        xdp_action::XDP_TX
    }

    /// Returns the kernel's jiffies (low 32 bits) as its verdict: the loader runs it through
    /// BPF_PROG_TEST_RUN twice, some time apart, to learn HZ.
    #[xdp]
    pub fn xdp_jiffies(_ctx: XdpContext) -> u32 {
        // SAFETY: plain helper call.
        unsafe { aya_ebpf::helpers::generated::bpf_jiffies64() as u32 }
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

/// Host builds (clippy, `cargo check --workspace`) see an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
