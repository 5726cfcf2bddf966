//! Types shared between the XDP program (`portico-xdp-ebpf`) and its userspace loader
//! (`portico-xdp`). Everything here is `#[repr(C)]` plain data with explicit padding, so
//! both sides agree on the layout byte for byte.
#![no_std]

/// Indices into the per-CPU `STATS` array map.
pub mod stat {
    /// Every packet the program saw.
    pub const PACKETS: u32 = 0;
    /// Bytes of every packet the program saw (the real buffer length, frags included).
    pub const BYTES: u32 = 1;
    /// Number of slots in the `STATS` map.
    pub const COUNT: u32 = 2;
}

/// Names of the maps, as the loader looks them up in the object file.
pub mod map_name {
    /// Per-CPU global counters, indexed by [`crate::stat`].
    pub const STATS: &str = "STATS";
}

/// Name of the XDP entry point in the object file.
pub const PROGRAM_NAME: &str = "portico_xdp";
