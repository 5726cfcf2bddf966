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
mod encap;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod frag;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod icmp46;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod nat46;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod pmtu;
#[cfg(target_arch = "bpf")]
mod sctp;
#[cfg(target_arch = "bpf")]
mod snat;

#[cfg(target_arch = "bpf")]
mod program {
    use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
    use portico_xdp_common::{family, proto, stat, Config};

    use crate::{
        csum, encap, frag, icmp, icmp46,
        maps::{self, Stats},
        nat,
        parse::{self, Headers, Parsed, Skip},
    };

    /// What [`front`] asks the entry point to do, when not a verdict (verdicts are below
    /// 0x100): call a slow path. TCP flags ride in bits 24..32.
    const SLOW_BALANCE: u32 = 0x100;
    const SLOW_REPLY: u32 = 0x200;
    const SLOW_ICMP: u32 = 0x300;
    // 0x400: `encap::FAST_STEP`.
    /// With [`SLOW_REPLY`]: the destination may also be a VIP.
    const MAYBE_VIP: u32 = 0x1_0000;
    /// With [`SLOW_REPLY`]: the IPv4 header checksum is still to be checked (a packet from a
    /// backend of a service that keeps client sources: checked here, not in [`front`], so
    /// that the verifier walks the check once, not once per state of the front half).
    const CHECK_IPV4: u32 = 0x2_0000;

    /// Entry point, frags-aware (`xdp.frags` section): lengths come from the real buffer.
    ///
    /// Its own frame is small: the front half ([`front`]: checks and the cached fast path)
    /// is a BPF function whose frame is gone by the time a slow path (a global function with
    /// its own frame) is called, and the stack is 512 bytes for the whole chain.
    #[xdp(frags)]
    pub fn portico_xdp(ctx: XdpContext) -> u32 {
        let Some(st) = Stats::get() else {
            return xdp_action::XDP_PASS;
        };
        st.add(stat::PACKETS, 1);
        let (p, step) = match parse::parse(&ctx) {
            Ok(p) => {
                st.add(stat::BYTES, p.ip_end as u64);
                let step = front(&ctx, &st, &p);
                if step < SLOW_BALANCE {
                    return step;
                }
                (p, step)
            }
            Err(skip) => {
                // Not parsed: the linear part is what there is to count.
                st.add(stat::BYTES, (ctx.data_end() - ctx.data()) as u64);
                let Skip::Fragment = skip else {
                    st.add(skip.stat(), 1);
                    return xdp_action::XDP_PASS;
                };
                // A fragment: a verdict, or a first fragment for the slow paths below.
                match frag::handle(&ctx) {
                    Ok(verdict) => return verdict,
                    Err(head) => {
                        let flags = u32::from(head.tcp_flags) << 24;
                        let step = match (head.to_snat, head.vip) {
                            (true, true) => SLOW_REPLY | MAYBE_VIP | flags,
                            (true, false) => SLOW_REPLY | flags,
                            _ => SLOW_BALANCE | flags,
                        };
                        (head.p, step)
                    }
                }
            }
        };
        if step & 0xf00 == encap::FAST_STEP {
            // A cached flow of a direct-server-return service.
            return encap::forward(&ctx, &p, encap::of_fast_step(step));
        }
        let tcp_flags = (step >> 24) as u8;
        match step & 0xf00 {
            SLOW_ICMP => {
                let verdict = icmp::handle_packet(&ctx, &p);
                if verdict == icmp46::XLAT_ERROR {
                    return icmp46::translate(&ctx, &p);
                }
                if verdict != icmp::NOT_MINE {
                    return verdict;
                }
            }
            SLOW_REPLY => {
                if step & CHECK_IPV4 != 0 && p.family == family::V4 {
                    match parse::ipv4_header_ok(&ctx, &p) {
                        Ok(true) => {}
                        Ok(false) => {
                            st.add(Skip::BadChecksum.stat(), 1);
                            return xdp_action::XDP_PASS;
                        }
                        Err(skip) => {
                            st.add(skip.stat(), 1);
                            return xdp_action::XDP_PASS;
                        }
                    }
                }
                let verdict = nat::reply_packet(&ctx, &p, tcp_flags);
                if verdict != nat::NOT_MINE {
                    return verdict;
                }
                if step & MAYBE_VIP != 0 {
                    return nat::balance_packet(&ctx, &st, &p, tcp_flags);
                }
            }
            _ => return nat::balance_packet(&ctx, &st, &p, tcp_flags),
        }
        st.add(stat::PASS_NOT_VIP, 1);
        xdp_action::XDP_PASS
    }

    /// The front half: counts and verdicts for what is not ours, the checks every packet we
    /// rewrite must pass, and the cached fast path. Returns a verdict, or the slow path to
    /// take.
    #[inline(never)]
    fn front(ctx: &XdpContext, st: &Stats, p: &Parsed) -> u32 {
        let step = if p.family == family::V4 {
            try_front::<true>(ctx, st, p)
        } else {
            try_front::<false>(ctx, st, p)
        };
        match step {
            Ok(step) => step,
            Err(skip) => {
                // Passed untouched (nothing was written yet), counted by reason.
                st.add(skip.stat(), 1);
                xdp_action::XDP_PASS
            }
        }
    }

    /// Replies to the node's SNAT address, or from a backend of a service that keeps client
    /// sources, go to the reply path; traffic to an address
    /// outside the VIP filter passes after one array read; VIP traffic of a cached flow goes
    /// to its backend here, the rest to the slow path. One copy per family (`V4`) and
    /// transport: the headers are checked once, and IPv4 keys are compared and hashed by
    /// their one address word.
    #[inline(always)]
    fn try_front<const V4: bool>(ctx: &XdpContext, st: &Stats, p: &Parsed) -> Result<u32, Skip> {
        let Some(cfg) = maps::CONFIG.get(0) else {
            return Ok(xdp_action::XDP_PASS);
        };
        if p.proto == proto::TCP {
            return try_ports::<V4, true>(ctx, st, p, cfg);
        }
        if parse::has_ports(p.proto) {
            return try_ports::<V4, false>(ctx, st, p, cfg);
        }
        if p.proto == if V4 { proto::ICMP } else { proto::ICMPV6 } {
            return Ok(SLOW_ICMP);
        }
        st.add(stat::PASS_NOT_VIP, 1);
        Ok(xdp_action::XDP_PASS)
    }

    /// [`try_front`] of a packet with ports: TCP (`TCP`), UDP or SCTP.
    #[inline(always)]
    fn try_ports<const V4: bool, const TCP: bool>(
        ctx: &XdpContext,
        st: &Stats,
        p: &Parsed,
        cfg: &Config,
    ) -> Result<u32, Skip> {
        let h = Headers::<V4, TCP>::of(ctx, p)?;
        let t = nat::read_tuple(ctx, p, &h)?;
        let key = &t.key;
        let to_snat = key.dst == nat::snat_addr(cfg, key.family);
        let maybe_vip = maps::maybe_vip(key.family, &key.dst);
        if !to_snat && !maybe_vip {
            // A reply of a flow that keeps its client's source comes from a backend of such
            // a service to the client: a configuration bit, then a bitmap read.
            if maps::maybe_preserved_backend(cfg, key.family, &key.src) {
                return Ok(SLOW_REPLY | CHECK_IPV4 | u32::from(t.tcp_flags) << 24);
            }
            st.add(stat::PASS_NOT_VIP, 1);
            return Ok(xdp_action::XDP_PASS);
        }
        // Replies, and SYN, FIN or RST, do not use the flow cache.
        let set = (!to_snat && nat::may_be_cached(t.tcp_flags)).then(|| nat::cache_set(key, cfg));
        // Ours to rewrite: the stack would drop an IPv4 header with a bad checksum.
        if V4 && !parse::ipv4_header_ok_at(ctx, p, h.ip)? {
            return Err(Skip::BadChecksum);
        }
        let flags = u32::from(t.tcp_flags) << 24;
        if to_snat {
            return Ok(SLOW_REPLY | flags | if maybe_vip { MAYBE_VIP } else { 0 });
        }
        if let Some(set) = set {
            if let Some(verdict) = nat::cached(ctx, st, p, &h, &t, cfg, &set)? {
                return Ok(verdict);
            }
        }
        Ok(SLOW_BALANCE | flags)
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

    /// Forwarding benchmark floor: the least an XDP NAT does for IPv4 UDP to a VIP. It
    /// picks backend id 1, 2 or 3 by the source port, rewrites addresses (source: the SNAT
    /// address), destination port, TTL, checksums and MACs from the backend's cached next
    /// hop, and redirects. No flow state, no service lookup; the hop must have been
    /// resolved (by the balancer) before.
    #[xdp]
    pub fn xdp_forward_floor(ctx: XdpContext) -> u32 {
        forward_floor(&ctx).unwrap_or(xdp_action::XDP_PASS)
    }

    #[inline(always)]
    fn forward_floor(ctx: &XdpContext) -> Option<u32> {
        let st = Stats::get()?;
        let cfg = maps::CONFIG.get(0)?;
        let h = parse::ptr_at::<[u8; 42]>(ctx, 0).ok()?.cast::<u8>();
        // SAFETY: 42 bytes (Ethernet, a 20-byte IPv4 header, UDP) checked above.
        unsafe {
            if *h.add(12) != 0x08 || *h.add(13) != 0 || *h.add(14) != 0x45 || *h.add(23) != 17 {
                return None;
            }
            let sport = u16::from_be_bytes([*h.add(34), *h.add(35)]);
            let be = maps::BACKENDS.get(1 + u32::from(sport) % 3)?;
            if be.hop.mtu == 0 {
                return None;
            }
            let (old_src, old_dst) = (parse::load32(h.add(26)), parse::load32(h.add(30)));
            let old_ttl = *(h.add(22) as *const u16);
            let mut ttl = old_ttl.to_ne_bytes();
            ttl[0] = ttl[0].wrapping_sub(1);
            let new_ttl = u16::from_ne_bytes(ttl);
            let addrs = csum::diff32(old_src, cfg.snat_v4) + csum::diff32(old_dst, be.addr[0]);
            let c = h.add(24) as *mut u16;
            *c = csum::apply(*c, addrs + csum::diff16(old_ttl, new_ttl));
            *(h.add(22) as *mut u16) = new_ttl;
            parse::store32(h.add(26), cfg.snat_v4);
            parse::store32(h.add(30), be.addr[0]);
            let old_dport = *(h.add(36) as *const u16);
            *(h.add(36) as *mut u16) = be.port;
            let c = h.add(40) as *mut u16;
            if *c != 0 {
                *c = csum::apply_udp(*c, addrs + csum::diff16(old_dport, be.port));
            }
            Some(crate::fib::send(ctx, &st, &be.hop))
        }
    }

    /// Forwarding benchmark sink: counts the packet (`stat::PACKETS`) and drops it.
    #[xdp]
    pub fn xdp_sink(_ctx: XdpContext) -> u32 {
        if let Some(st) = Stats::get() {
            st.add(stat::PACKETS, 1);
        }
        xdp_action::XDP_DROP
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
