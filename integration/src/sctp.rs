//! SCTP packets for tests, built by hand (the kernel here has no SCTP): chunks, the common
//! header and its CRC32c, computed bit by bit, independent of the XDP program's update.

/// CRC32c (Castagnoli, reflected polynomial 0x82F63B78), bit by bit.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82f6_3b78
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// Chunk types.
pub mod chunk_type {
    /// DATA.
    pub const DATA: u8 = 0;
    /// INIT.
    pub const INIT: u8 = 1;
    /// INIT ACK.
    pub const INIT_ACK: u8 = 2;
    /// ABORT.
    pub const ABORT: u8 = 6;
    /// SHUTDOWN COMPLETE.
    pub const SHUTDOWN_COMPLETE: u8 = 14;
}

/// A chunk: type, flags, value, padded to 4 bytes.
pub fn chunk(ty: u8, flags: u8, value: &[u8]) -> Vec<u8> {
    let mut c = vec![ty, flags];
    c.extend_from_slice(&((4 + value.len()) as u16).to_be_bytes());
    c.extend_from_slice(value);
    while c.len() % 4 != 0 {
        c.push(0);
    }
    c
}

/// INIT (or INIT ACK) with initiate tag `tag`: a_rwnd, 10 streams each way, TSN 1.
pub fn init_chunk(ty: u8, tag: u32) -> Vec<u8> {
    let mut v = tag.to_be_bytes().to_vec();
    v.extend_from_slice(&65536u32.to_be_bytes());
    v.extend_from_slice(&[0, 10, 0, 10]);
    v.extend_from_slice(&1u32.to_be_bytes());
    chunk(ty, 0, &v)
}

/// A DATA chunk (unordered, a whole message) with TSN `tsn` carrying `data`.
pub fn data_chunk(tsn: u32, data: &[u8]) -> Vec<u8> {
    let mut v = tsn.to_be_bytes().to_vec();
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(data);
    chunk(chunk_type::DATA, 0x07, &v)
}

/// An SCTP packet: common header (ports, verification tag, CRC32c stored little-endian as
/// Linux writes it) and `chunks`.
pub fn packet(sport: u16, dport: u16, vtag: u32, chunks: &[u8]) -> Vec<u8> {
    let mut p = sport.to_be_bytes().to_vec();
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(chunks);
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

/// Whether an SCTP packet's CRC32c is right.
pub fn crc_ok(sctp: &[u8]) -> bool {
    if sctp.len() < 12 {
        return false;
    }
    let mut p = sctp.to_vec();
    let stored = u32::from_le_bytes([p[8], p[9], p[10], p[11]]);
    p[8..12].copy_from_slice(&[0; 4]);
    crc32c(&p) == stored
}

#[cfg(test)]
mod tests {
    #[test]
    fn crc32c_of_the_check_string() {
        assert_eq!(super::crc32c(b"123456789"), 0xe306_9283);
    }
}
