//! SCTP (RFC 9260): balanced and tracked by ports as TCP and UDP are, through the same
//! slow paths (the UDP copies: `TCP` false), never through the flow cache.
//!
//! - The first chunk's type stands in for TCP flags ([`flags`]): INIT is a SYN (a new
//!   association; it re-opens a closed entry and does not confirm an unconfirmed one),
//!   ABORT and SHUTDOWN COMPLETE are an RST (the entry closes, and lives the TCP closing
//!   timeout), any other chunk an ACK. Associations time out as TCP connections do.
//! - The checksum is a CRC32c of the whole packet, without a pseudo-header: new addresses
//!   leave it alone, new ports change it. It is updated, not recomputed ([`crc_delta`]):
//!   the CRC is linear over GF(2), so the change the new ports make is the CRC (from a zero
//!   register) of the 4 bytes by which they differ, followed by as many zero bytes as the
//!   rest of the packet has, which is that 4-byte difference times x^(8·length) modulo the
//!   CRC polynomial. A few hundred instructions whatever the packet's length, nothing of the
//!   payload read (so multi-buffer frames need nothing special), and a packet whose CRC was
//!   wrong stays wrong, as it would with a recomputation that checked it first.
//!
//! Byte order: the CRC field holds the CRC little-endian (as Linux writes it); the program
//! runs on little-endian machines (bpfel), so a native 32-bit load of the field is the CRC,
//! and a native load of the two ports is the polynomial of their 4 bytes.

use aya_ebpf::programs::XdpContext;

use portico_xdp_common::stat;

use crate::{
    maps::Stats,
    parse::{load32, ptr_at, store32, used, Parsed, Skip},
};

/// The CRC32c polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;
/// INIT: a new association.
const INIT: u8 = 1;
/// ABORT: the association ends at once.
const ABORT: u8 = 6;
/// SHUTDOWN COMPLETE: the last chunk of a graceful close.
const SHUTDOWN_COMPLETE: u8 = 14;
/// The TCP flags the chunk types stand for (`nat`'s constants).
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;

/// The TCP flags an SCTP packet stands for, from its first chunk's type. The common header
/// (12 bytes) and the first chunk's header (4) must be within the packet.
#[inline(always)]
pub fn flags(ctx: &XdpContext, p: &Parsed) -> Result<u8, Skip> {
    let h: *const [u8; 16] = ptr_at(ctx, p.l4)?;
    if p.l4 + 16 > p.ip_end {
        return Err(Skip::BadLength);
    }
    // SAFETY: 16 bytes checked.
    let chunk = unsafe { (*h)[12] };
    Ok(match chunk {
        INIT => SYN,
        ABORT | SHUTDOWN_COMPLETE => RST,
        _ => ACK,
    })
}

/// The SCTP common header (12 bytes: ports, verification tag, CRC32c), checked; taken before
/// anything is written.
#[inline(always)]
pub fn crc_field(ctx: &XdpContext, p: &Parsed) -> Result<*mut u8, Skip> {
    let h: *mut [u8; 12] = ptr_at(ctx, p.l4)?;
    Ok(h.cast())
}

/// Updates the CRC32c of an SCTP packet of `len` bytes whose ports were rewritten from `old`
/// to `new` (each as read natively); equal ports leave it alone.
///
/// # Safety
/// `h` is the packet's checked SCTP common header ([`crc_field`]).
#[inline(always)]
pub unsafe fn update_crc(st: &Stats, h: *mut u8, old: [u16; 2], new: [u16; 2], len: usize) {
    let word = |ports: [u16; 2]| u32::from(ports[0]) | u32::from(ports[1]) << 16;
    let w = word(old) ^ word(new);
    if w == 0 {
        return;
    }
    let delta = crc_delta(w, len);
    // SAFETY: bytes 8..12 of the checked 12-byte header.
    unsafe { store32(h.add(8), load32(h.add(8)) ^ delta) };
    st.add(stat::SCTP_CRC, 1);
}

/// `a · b` modulo the polynomial, in the reflected representation (bit 31 is x^0): zlib's
/// `multmodp`, for CRC32c. Without branches: the verifier follows one path through it,
/// whatever it knows of the operands.
#[inline(always)]
fn mul(a: u32, b: u32) -> u32 {
    let mut b = b;
    let mut p = 0;
    for i in 0..32 {
        p ^= b & ((a >> (31 - i)) & 1).wrapping_neg();
        b = (b >> 1) ^ (POLY & (b & 1).wrapping_neg());
    }
    p
}

/// 1 (x^0) in the reflected representation.
const ONE: u32 = 0x8000_0000;

/// `x^(8·2^i)` modulo the polynomial, for i = 0..17 (a packet is shorter than 2^17 bytes).
const X8_POW2: [u32; 17] = {
    let mut t = [0u32; 17];
    // x^8: bit 31 - 8.
    t[0] = 1 << 23;
    let mut i = 1;
    while i < 17 {
        t[i] = mul_const(t[i - 1], t[i - 1]);
        i += 1;
    }
    t
};

/// [`mul`], at compile time.
const fn mul_const(a: u32, b: u32) -> u32 {
    let mut b = b;
    let mut p = 0;
    let mut i = 0;
    while i < 32 {
        if a & (0x8000_0000 >> i) != 0 {
            p ^= b;
        }
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        i += 1;
    }
    p
}

/// What to XOR into the CRC field (read natively) of an SCTP packet of `len` bytes whose
/// first 4 bytes (the ports, read natively as one word) change by `w` (old XOR new).
#[inline(always)]
pub fn crc_delta(w: u32, len: usize) -> u32 {
    portico_sctp_crc_delta(u64::from(w), len as u64) as u32
}

/// The global function behind [`crc_delta`] (checked once; no stack).
#[no_mangle]
#[inline(never)]
pub extern "C" fn portico_sctp_crc_delta(w: u64, len: u64) -> u64 {
    let (w, len) = (used(w) as u32, used(len) as u32);
    // x^(8·len): per bit of the length, a factor of x^(8·2^i) or of 1, chosen without a
    // branch (a branch per bit would be 2^17 paths for the verifier, each with its own
    // constant).
    let mut shift: u32 = ONE;
    macro_rules! bit {
        ($($i:literal)*) => {$(
            let take = ((len >> $i) & 1).wrapping_neg();
            shift = mul(ONE ^ ((X8_POW2[$i] ^ ONE) & take), shift);
        )*};
    }
    bit!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16);
    u64::from(mul(shift, w))
}
