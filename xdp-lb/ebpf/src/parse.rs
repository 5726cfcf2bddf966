//! Header parsing: bounds-checked access to the linear part of the packet, Ethernet with up
//! to two VLAN tags, IPv4 with options, IPv6 with a bounded extension-header walk, and the
//! first bytes of the L4 header.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use portico_xdp_common::{family, proto};

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
    Ok(Parsed {
        l3,
        l4: l3 + ihl,
        family: family::V4,
        proto,
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
        }),
    }
}

/// Whether `p` is one of the L4 protocols with ports that the balancer handles.
#[inline(always)]
pub fn has_ports(p: u8) -> bool {
    p == proto::TCP || p == proto::UDP || p == proto::SCTP
}
