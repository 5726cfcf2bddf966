//! Incremental Internet checksum updates (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
//!
//! Values are the raw words as they sit in the packet (no byte swapping): the one's
//! complement sum does not depend on byte order as long as every word is read the same way.

/// Accumulates the change of one 16-bit word.
#[inline(always)]
pub fn diff16(old: u16, new: u16) -> u64 {
    u64::from(!old) + u64::from(new)
}

/// Accumulates the change of one 32-bit word (an IPv4 address, or two 16-bit fields).
#[inline(always)]
pub fn diff32(old: u32, new: u32) -> u64 {
    u64::from(!old) + u64::from(new)
}

/// Accumulates the change of a 16-byte address.
#[inline(always)]
pub fn diff128(old: &[u32; 4], new: &[u32; 4]) -> u64 {
    diff32(old[0], new[0])
        + diff32(old[1], new[1])
        + diff32(old[2], new[2])
        + diff32(old[3], new[3])
}

/// Folds a 64-bit accumulator to 16 bits with end-around carry.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// As [`fold`], for an accumulator below 2^40 (up to 256 32-bit words): three 16-bit
/// steps (after the first the sum is below 2^24 + 2^16, after the second at most
/// 0xffff + 256, after the third at most 0xffff), without the 32-bit step.
#[inline(always)]
pub fn fold40(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Applies an accumulated change to checksum `csum`.
#[inline(always)]
pub fn apply(csum: u16, delta: u64) -> u16 {
    !fold(u64::from(!csum) + delta)
}

/// As [`apply`], for a change below 2^39 (a rewrite's addresses and ports: at most ten
/// 32-bit words), through [`fold40`].
#[inline(always)]
pub fn apply_small(csum: u16, delta: u64) -> u16 {
    !fold40(u64::from(!csum) + delta)
}

/// As [`apply`], for a UDP checksum: a result of 0 goes on the wire as 0xffff (RFC 768).
#[inline(always)]
pub fn apply_udp(csum: u16, delta: u64) -> u16 {
    udp_nonzero(apply(csum, delta))
}

/// Applies a change below 2^39 to a field holding a pseudo-header sum (CHECKSUM_PARTIAL:
/// the sum itself, not its complement), the opposite direction of [`apply`].
#[inline(always)]
pub fn apply_pseudo(sum: u16, delta: u64) -> u16 {
    fold40(u64::from(sum) + delta)
}

/// A computed UDP checksum as it goes on the wire: 0 as 0xffff (RFC 768).
#[inline(always)]
pub fn udp_nonzero(csum: u16) -> u16 {
    match csum {
        0 => 0xffff,
        c => c,
    }
}

/// The pseudo-header part of a TCP or UDP checksum that depends on neither address: protocol
/// and transport length (32 bits, BIG TCP included), as the kernel adds them
/// (`csum_tcpudp_nofold`, `csum_ipv6_magic`): `(len + proto) << 8` on a little-endian host,
/// the same one's complement sum as the big-endian words of either family's pseudo-header.
#[inline(always)]
pub fn pseudo_len_proto(len: u32, proto: u8) -> u64 {
    u64::from(len + u32::from(proto)) << 8
}
