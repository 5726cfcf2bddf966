//! Portico's XDP program. The entry point only dispatches; the work lives in modules split by
//! job (parsing, NAT, checksums, ICMP, maps), as Katran splits its headers.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod maps;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
    use portico_xdp_common::stat;

    use crate::maps;

    /// Entry point, frags-aware from the start (`xdp.frags` section).
    #[xdp(frags)]
    pub fn portico_xdp(ctx: XdpContext) -> u32 {
        count(&ctx);
        xdp_action::XDP_PASS
    }

    /// Counts the packet and its bytes in the per-CPU stats.
    #[inline(always)]
    fn count(ctx: &XdpContext) {
        maps::stat_add(stat::PACKETS, 1);
        // SAFETY: ctx.ctx is the kernel's xdp_md for this invocation.
        let len = unsafe { aya_ebpf::helpers::generated::bpf_xdp_get_buff_len(ctx.ctx as *mut _) };
        maps::stat_add(stat::BYTES, len);
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

/// Host builds (clippy, `cargo check --workspace`) see an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
