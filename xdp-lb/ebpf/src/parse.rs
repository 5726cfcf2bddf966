//! Header parsing: bounds-checked access to the linear part of the packet, Ethernet with up
//! to two VLAN tags, IPv4 with options, IPv6 with a bounded extension-header walk, and the
//! first bytes of the L4 header.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use portico_xdp_common::{family, proto, stat, Addr};

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;

const IPV6_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// Extension headers walked at most before giving up (passed as malformed).
const IPV6_MAX_EXT: usize = 4;

/// Offsets stay below this, so the verifier can bound every variable offset.
const MAX_OFFSET: usize = 512;

/// Why a packet is not balanced.
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not IPv4/IPv6.
    NotIp,
    /// Truncated or malformed.
    Malformed,
    /// A fragment.
    Fragment,
}

impl Skip {
    /// The counter the packet is passed under.
    #[inline(always)]
    pub fn stat(self) -> u32 {
        match self {
            Skip::NotIp => stat::PASS_NOT_VIP,
            Skip::Malformed => stat::PASS_MALFORMED,
            Skip::Fragment => stat::PASS_FRAGMENT,
        }
    }
}

/// Returns a pointer to a `T` at `offset`, or `Err` when it does not fit in the linear data.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, Skip> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset > MAX_OFFSET || start + offset + size_of::<T>() > end {
        return Err(Skip::Malformed);
    }
    Ok((start + offset) as *mut T)
}

/// Loads the 4 bytes at `p` in one instruction, whatever their alignment. IP addresses
/// sit at 2-byte offsets in the packet; Rust's unaligned reads would go byte by byte, while
/// x86-64 and arm64 load them directly and the verifier allows it for packet and map-value
/// pointers.
///
/// # Safety
/// `p..p + 4` is in a checked packet range or a map value.
#[inline(always)]
pub unsafe fn load32(p: *const u8) -> u32 {
    let v: u32;
    // SAFETY: the caller guarantees the 4 bytes are readable.
    unsafe {
        core::arch::asm!(
            "{0} = *(u32 *)({1} + 0)",
            out(reg) v,
            in(reg) p,
            options(nostack, readonly, preserves_flags)
        );
    }
    v
}

/// Stores 4 bytes at `p` in one instruction, whatever their alignment (see [`load32`]).
///
/// # Safety
/// `p..p + 4` is in a checked packet range or a map value.
#[inline(always)]
pub unsafe fn store32(p: *mut u8, v: u32) {
    // SAFETY: the caller guarantees the 4 bytes are writable.
    unsafe {
        core::arch::asm!(
            "*(u32 *)({0} + 0) = {1}",
            in(reg) p,
            in(reg) v,
            options(nostack, preserves_flags)
        );
    }
}

/// Reads an address at `p`: 4 bytes (IPv4, word 0) or 16.
///
/// # Safety
/// As [`load32`], for 4 or 16 bytes.
#[inline(always)]
pub unsafe fn load_addr(p: *const u8, v4: bool) -> Addr {
    // SAFETY: the caller guarantees the bytes are readable.
    unsafe {
        if v4 {
            [load32(p), 0, 0, 0]
        } else {
            [
                load32(p),
                load32(p.add(4)),
                load32(p.add(8)),
                load32(p.add(12)),
            ]
        }
    }
}

/// Writes an address at `p`: word 0 (IPv4) or all four words.
///
/// # Safety
/// As [`store32`], for 4 or 16 bytes.
#[inline(always)]
pub unsafe fn store_addr(p: *mut u8, a: &Addr, v4: bool) {
    // SAFETY: the caller guarantees the bytes are writable.
    unsafe {
        store32(p, a[0]);
        if !v4 {
            store32(p.add(4), a[1]);
            store32(p.add(8), a[2]);
            store32(p.add(12), a[3]);
        }
    }
}

/// What the parser found; offsets are from the start of the packet.
pub struct Parsed {
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the L4 header.
    pub l4: usize,
    /// [`family`].
    pub family: u8,
    /// L4 protocol.
    pub proto: u8,
    /// Frame length: L2 header plus the IP header's length field, so fragments (xdp.frags)
    /// count without a helper call; the real buffer length for IPv6 jumbograms.
    pub len: u64,
}

/// Parses L2 and L3 up to the L4 header.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Parsed, Skip> {
    let mut off = ETH_HLEN;
    let mut ethertype = u16::from_be(unsafe { *ptr_at::<u16>(ctx, 12)? });
    // Up to two VLAN tags (802.1ad outer, 802.1Q inner).
    for _ in 0..2 {
        if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
            ethertype = u16::from_be(unsafe { *ptr_at::<u16>(ctx, off + 2)? });
            off += 4;
        }
    }
    match ethertype {
        ETH_P_IP => parse_v4(ctx, off),
        ETH_P_IPV6 => parse_v6(ctx, off),
        _ => Err(Skip::NotIp),
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize) -> Result<Parsed, Skip> {
    let first: *const u8 = ptr_at(ctx, l3)?;
    // Make sure the fixed header is there before reading fields.
    let _: *const [u8; 20] = ptr_at(ctx, l3)?;
    let vihl = unsafe { *first };
    if vihl >> 4 != 4 {
        return Err(Skip::Malformed);
    }
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(Skip::Malformed);
    }
    let frag = u16::from_be(unsafe { *ptr_at::<u16>(ctx, l3 + 6)? });
    // More-fragments set or a non-zero offset: no ports to balance on.
    if frag & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }
    let proto = unsafe { *ptr_at::<u8>(ctx, l3 + 9)? };
    let tot_len = u16::from_be(unsafe { *ptr_at::<u16>(ctx, l3 + 2)? });
    Ok(Parsed {
        l3,
        l4: l3 + ihl,
        family: family::V4,
        proto,
        len: (l3 + tot_len as usize) as u64,
    })
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize) -> Result<Parsed, Skip> {
    let _: *const [u8; 40] = ptr_at(ctx, l3)?;
    let version = unsafe { *ptr_at::<u8>(ctx, l3)? } >> 4;
    if version != 6 {
        return Err(Skip::Malformed);
    }
    let mut next = unsafe { *ptr_at::<u8>(ctx, l3 + 6)? };
    let payload = u16::from_be(unsafe { *ptr_at::<u16>(ctx, l3 + 4)? });
    let len = if payload == 0 {
        // A jumbogram (RFC 2675): only the buffer knows.
        // SAFETY: ctx.ctx is this invocation's xdp_md.
        unsafe { aya_ebpf::helpers::generated::bpf_xdp_get_buff_len(ctx.ctx as *mut _) }
    } else {
        (l3 + 40 + payload as usize) as u64
    };
    let mut off = l3 + 40;
    for _ in 0..IPV6_MAX_EXT {
        match next {
            IPV6_HOP | IPV6_ROUTING | IPV6_DSTOPTS => {
                let hdr: *const [u8; 2] = ptr_at(ctx, off)?;
                let (nh, len) = unsafe { ((*hdr)[0], (*hdr)[1]) };
                next = nh;
                off += (len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let hdr: *const [u8; 8] = ptr_at(ctx, off)?;
                let (nh, fo_hi, fo_lo) = unsafe { ((*hdr)[0], (*hdr)[2], (*hdr)[3]) };
                let offset_and_m = u16::from_be_bytes([fo_hi, fo_lo]);
                // Offset non-zero or more-fragments set: a real fragment.
                if offset_and_m & 0xfff9 != 0 {
                    return Err(Skip::Fragment);
                }
                next = nh;
                off += 8;
            }
            _ => {
                return Ok(Parsed {
                    l3,
                    l4: off,
                    family: family::V6,
                    proto: next,
                    len,
                });
            }
        }
    }
    // Too many extension headers, or the chain ended on one: let the stack decide.
    match next {
        IPV6_HOP | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT => Err(Skip::Malformed),
        _ => Ok(Parsed {
            l3,
            l4: off,
            family: family::V6,
            proto: next,
            len,
        }),
    }
}

/// Whether `p` is one of the L4 protocols with ports that the balancer handles.
#[inline(always)]
pub fn has_ports(p: u8) -> bool {
    p == proto::TCP || p == proto::UDP || p == proto::SCTP
}
