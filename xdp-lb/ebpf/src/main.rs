//! Portico's XDP program. The entry point only dispatches; the work lives in modules split by
//! job, as Katran splits its headers: `parse` (bounds-checked headers), `nat` (conntrack,
//! Maglev, DNAT/SNAT and reverse NAT), `csum` (incremental checksums), `fib` (next hop),
//! `maps` (one doc comment per map).
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

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
        maps::{self, stat_add},
        nat,
        parse::{self, Skip},
    };

    /// Entry point, frags-aware (`xdp.frags` section): lengths come from the real buffer.
    #[xdp(frags)]
    pub fn portico_xdp(ctx: XdpContext) -> u32 {
        // SAFETY: ctx.ctx is the kernel's xdp_md for this invocation.
        let bytes =
            unsafe { aya_ebpf::helpers::generated::bpf_xdp_get_buff_len(ctx.ctx as *mut _) };
        stat_add(stat::PACKETS, 1);
        stat_add(stat::BYTES, bytes);
        match try_balance(&ctx, bytes) {
            Ok(verdict) => verdict,
            Err(skip) => {
                stat_add(
                    match skip {
                        Skip::NotIp => stat::PASS_NOT_VIP,
                        Skip::Malformed => stat::PASS_MALFORMED,
                        Skip::Fragment => stat::PASS_FRAGMENT,
                    },
                    1,
                );
                xdp_action::XDP_PASS
            }
        }
    }

    #[inline(always)]
    fn try_balance(ctx: &XdpContext, bytes: u64) -> Result<u32, Skip> {
        let p = parse::parse(ctx)?;
        let Some(cfg) = maps::CONFIG.get(0) else {
            return Ok(xdp_action::XDP_PASS);
        };
        if !parse::has_ports(p.proto) {
            let icmp = (p.family == family::V4 && p.proto == proto::ICMP)
                || (p.family == family::V6 && p.proto == proto::ICMPV6);
            if icmp {
                if let Some(verdict) = icmp::handle(ctx, &p, cfg)? {
                    return Ok(verdict);
                }
            }
            stat_add(stat::PASS_NOT_VIP, 1);
            return Ok(xdp_action::XDP_PASS);
        }
        let t = nat::read_tuple(ctx, &p)?;
        let vip = VipKey {
            addr: t.key.dst,
            port: t.key.dport,
            proto: t.key.proto,
            family: t.key.family,
        };
        // SAFETY: read-only copy of the value.
        if let Some(svc) = unsafe { maps::SERVICES.get(vip) }.copied() {
            if p.proto == proto::SCTP {
                // SCTP's CRC32c covers the whole packet: not rewritten in XDP (yet).
                stat_add(stat::PASS_UNSUPPORTED, 1);
                return Ok(xdp_action::XDP_PASS);
            }
            return nat::forward(ctx, &p, &t, &svc, cfg, bytes);
        }
        let to_snat = if t.key.family == family::V4 {
            t.key.dst[..4] == cfg.snat_v4
        } else {
            t.key.dst == cfg.snat_v6
        };
        if to_snat {
            if let Some(verdict) = nat::reply(ctx, &p, &t, bytes)? {
                return Ok(verdict);
            }
        }
        stat_add(stat::PASS_NOT_VIP, 1);
        Ok(xdp_action::XDP_PASS)
    }

    /// Benchmark floor: swaps the MAC addresses and sends the frame back (XDP_TX). Loaded
    /// only by the datapath benchmark, to compare the balancer against the cheapest program
    /// that touches the packet.
    #[xdp]
    pub fn xdp_floor(ctx: XdpContext) -> u32 {
        let Ok(eth) = parse::ptr_at::<[u8; 12]>(&ctx, 0) else {
            return xdp_action::XDP_PASS;
        };
        // SAFETY: 12 bytes checked.
        let eth = unsafe { &mut *eth };
        let mut dst = [0u8; 6];
        dst.copy_from_slice(&eth[0..6]);
        eth.copy_within(6..12, 0);
        eth[6..12].copy_from_slice(&dst);
        xdp_action::XDP_TX
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

/// Host builds (clippy, `cargo check --workspace`) see an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
