//! Portico's decapsulation program for backends (DSR): strips the outer header a balancer
//! put around a client's packet, so the backend's stack sees the client's packet to the VIP
//! (held on the backend, e.g. on `lo`) and answers the client directly. A separate object
//! from the balancer: a backend loads a few small maps, not the balancer's tables.
//!
//! Accepted: IPv4 outer (header without options) carrying IPv4 (protocol 4, IPIP) or IPv6
//! (41, 6in4); IPv6 outer (no extension headers) carrying IPv4 (4, 4in6) or IPv6 (41, IP6IP6);
//! and either outer with UDP to the configured GUE port whose payload is the inner IP packet
//! (GUE variant 1). Only packets whose outer destination is one of this host's tunnel
//! addresses (`DECAP_LOCAL`) and whose outer source is a known balancer (`DECAP_PEERS`) are
//! decapsulated: anyone else's tunnel packet passes untouched (and the kernel, lacking the
//! tunnel modules, drops it), so no one can inject packets with forged inner sources.
//! Everything is checked before the one write; verdicts are counted in `DECAP_STATS`.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{
        bindings::xdp_action,
        helpers::generated::bpf_xdp_adjust_head,
        macros::{map, xdp},
        maps::{Array, HashMap, PerCpuArray},
        programs::XdpContext,
    };
    use portico_xdp_common::{decap, Addr};

    /// This host's tunnel addresses (IPv4 as word 0, the rest zero): outer destinations.
    #[map(name = "DECAP_LOCAL")]
    static DECAP_LOCAL: HashMap<Addr, u32> = HashMap::with_max_entries(64, 0);

    /// Balancers allowed to send tunnelled packets here: outer sources.
    #[map(name = "DECAP_PEERS")]
    static DECAP_PEERS: HashMap<Addr, u32> = HashMap::with_max_entries(1024, 0);

    /// Index 0: the GUE UDP port, network order (0: GUE off).
    #[map(name = "DECAP_CONFIG")]
    static DECAP_CONFIG: Array<u32> = Array::with_max_entries(1, 0);

    /// Counters by [`decap`] index, per CPU.
    #[map(name = "DECAP_STATS")]
    static DECAP_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(decap::COUNT, 0);

    const ETH_LEN: usize = 14;
    const ETH_P_IP: u16 = 0x0800;
    const ETH_P_IPV6: u16 = 0x86dd;
    const IPPROTO_IPIP: u8 = 4;
    const IPPROTO_IPV6: u8 = 41;
    const IPPROTO_UDP: u8 = 17;

    #[inline(always)]
    fn count(idx: u32) {
        if let Some(c) = DECAP_STATS.get_ptr_mut(idx) {
            // SAFETY: a per-CPU value: no other writer.
            unsafe { *c += 1 };
        }
    }

    /// A `T` at `offset` within the linear data, or `None`.
    #[inline(always)]
    fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
        let start = ctx.data();
        if start + offset + core::mem::size_of::<T>() > ctx.data_end() {
            return None;
        }
        Some((start + offset) as *const T)
    }

    /// What the outer headers say: their length (from the Ethernet header's end) and the
    /// inner family's EtherType; `None` when not a tunnel packet for this host.
    struct Outer {
        len: usize,
        inner_ethertype: u16,
    }

    /// Decapsulates what is ours; passes everything else untouched.
    #[xdp]
    pub fn portico_decap(ctx: XdpContext) -> u32 {
        let verdict = match outer(&ctx) {
            Ok(o) => strip(&ctx, &o),
            Err(idx) => {
                count(idx);
                // From a known balancer, an inner packet that is not whole is dropped
                // (decapsulated, the stack would take it for the client's); the rest passes.
                return if idx == decap::DROP_MALFORMED {
                    xdp_action::XDP_DROP
                } else {
                    xdp_action::XDP_PASS
                };
            }
        };
        count(verdict.1);
        verdict.0
    }

    /// Reads and checks every outer header; `Err` carries the counter of the reason to pass.
    #[inline(always)]
    fn outer(ctx: &XdpContext) -> Result<Outer, u32> {
        let eth = at::<[u8; ETH_LEN]>(ctx, 0).ok_or(decap::PASS_NOT_TUNNEL)?;
        // SAFETY: 14 bytes checked.
        let ethertype = unsafe { u16::from_be_bytes([(*eth)[12], (*eth)[13]]) };
        let frame = ctx.data_end() - ctx.data();
        let (src, dst, proto, ip_len, ip_total) = match ethertype {
            ETH_P_IP => {
                let h = at::<[u8; 20]>(ctx, ETH_LEN).ok_or(decap::PASS_NOT_TUNNEL)?;
                // SAFETY: 20 bytes checked.
                let h = unsafe { &*h };
                let proto = h[9];
                if !matches!(proto, IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_UDP) {
                    return Err(decap::PASS_NOT_TUNNEL);
                }
                if h[0] != 0x45 {
                    // Options, or not version 4: not a header this program strips.
                    return Err(decap::PASS_MALFORMED);
                }
                // A fragment of a tunnel packet: the stack would have to reassemble it.
                if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                    return Err(decap::PASS_FRAGMENT);
                }
                let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
                let mut src = Addr::default();
                let mut dst = Addr::default();
                src[0] = u32::from_ne_bytes([h[12], h[13], h[14], h[15]]);
                dst[0] = u32::from_ne_bytes([h[16], h[17], h[18], h[19]]);
                (src, dst, proto, 20, total)
            }
            ETH_P_IPV6 => {
                let h = at::<[u8; 40]>(ctx, ETH_LEN).ok_or(decap::PASS_NOT_TUNNEL)?;
                // SAFETY: 40 bytes checked.
                let h = unsafe { &*h };
                let proto = h[6];
                if !matches!(proto, IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_UDP) {
                    return Err(decap::PASS_NOT_TUNNEL);
                }
                if h[0] >> 4 != 6 {
                    return Err(decap::PASS_MALFORMED);
                }
                let total = 40 + usize::from(u16::from_be_bytes([h[4], h[5]]));
                let word = |o: usize| u32::from_ne_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
                let src = [word(8), word(12), word(16), word(20)];
                let dst = [word(24), word(28), word(32), word(36)];
                (src, dst, proto, 40, total)
            }
            _ => return Err(decap::PASS_NOT_TUNNEL),
        };
        // The IP length must fit the frame (trailer bytes after it are allowed).
        if ip_total < ip_len || ETH_LEN + ip_total > frame {
            return Err(decap::PASS_MALFORMED);
        }
        let mut len = ip_len;
        if proto == IPPROTO_UDP {
            let gue_port = DECAP_CONFIG.get(0).copied().unwrap_or(0) as u16;
            let udp = at::<[u8; 8]>(ctx, ETH_LEN + ip_len).ok_or(decap::PASS_NOT_TUNNEL)?;
            // SAFETY: 8 bytes checked.
            let udp = unsafe { &*udp };
            let dport = u16::from_ne_bytes([udp[2], udp[3]]);
            if gue_port == 0 || dport != gue_port {
                return Err(decap::PASS_NOT_TUNNEL);
            }
            len += 8;
        }
        // SAFETY: both are plain keys; the values are not read.
        let ours = unsafe { DECAP_LOCAL.get(dst).is_some() };
        if !ours {
            return Err(decap::PASS_NOT_LOCAL);
        }
        // SAFETY: as above.
        let known = unsafe { DECAP_PEERS.get(src).is_some() };
        if !known {
            return Err(decap::PASS_UNKNOWN_PEER);
        }
        // The inner packet: its version must be the one the outer header (or, for GUE, its
        // first nibble) says, and its own length must fill the rest.
        let first = at::<[u8; 6]>(ctx, ETH_LEN + len).ok_or(decap::DROP_MALFORMED)?;
        // SAFETY: 6 bytes checked.
        let first = unsafe { &*first };
        let version = first[0] >> 4;
        let (inner_ethertype, inner_total) = match version {
            4 if proto != IPPROTO_IPV6 => {
                let inner = at::<[u8; 20]>(ctx, ETH_LEN + len).ok_or(decap::DROP_MALFORMED)?;
                // SAFETY: 20 bytes checked.
                let inner = unsafe { &*inner };
                (
                    ETH_P_IP,
                    usize::from(u16::from_be_bytes([inner[2], inner[3]])),
                )
            }
            6 if proto != IPPROTO_IPIP => {
                at::<[u8; 40]>(ctx, ETH_LEN + len).ok_or(decap::DROP_MALFORMED)?;
                (
                    ETH_P_IPV6,
                    40 + usize::from(u16::from_be_bytes([first[4], first[5]])),
                )
            }
            _ => return Err(decap::DROP_MALFORMED),
        };
        if len + inner_total != ip_total {
            return Err(decap::DROP_MALFORMED);
        }
        Ok(Outer {
            len,
            inner_ethertype,
        })
    }

    /// Moves the Ethernet addresses in front of the inner packet and drops the outer
    /// headers. Returns the verdict and its counter.
    #[inline(always)]
    fn strip(ctx: &XdpContext, o: &Outer) -> (u32, u32) {
        let Some(eth) = at::<[u8; 12]>(ctx, 0) else {
            return (xdp_action::XDP_PASS, decap::PASS_NOT_TUNNEL);
        };
        // SAFETY: 12 bytes checked.
        let macs = unsafe { *eth };
        // SAFETY: the context is the program's own; the offset is at most 48 bytes
        // (IPv6 and UDP), within what the frame was just checked to hold.
        let rc = unsafe { bpf_xdp_adjust_head(ctx.ctx, o.len as i32) };
        if rc != 0 {
            return (xdp_action::XDP_DROP, decap::DROP_MALFORMED);
        }
        let Some(eth) = at::<[u8; ETH_LEN]>(ctx, 0) else {
            return (xdp_action::XDP_DROP, decap::DROP_MALFORMED);
        };
        let mut h = [0u8; ETH_LEN];
        h[..12].copy_from_slice(&macs);
        h[12..].copy_from_slice(&o.inner_ethertype.to_be_bytes());
        // SAFETY: 14 bytes at the new start checked just above.
        unsafe { *(eth as *mut [u8; ETH_LEN]) = h };
        (xdp_action::XDP_PASS, decap::DECAPSULATED)
    }

    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

/// Host builds (clippy, `cargo check --workspace`) see an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
