//! Types shared between the XDP program (`portico-xdp-ebpf`) and its userspace loader
//! (`portico-xdp`). Everything here is `#[repr(C)]` plain data with explicit padding, so
//! both sides agree on the layout byte for byte. Addresses and ports are kept in network
//! byte order exactly as they sit in the packet; an IPv4 address fills the first 4 bytes of
//! a 16-byte address and the rest is zero.
#![no_std]

/// Address family tags used in keys (not the kernel's AF_* numbers).
pub mod family {
    /// IPv4.
    pub const V4: u8 = 4;
    /// IPv6.
    pub const V6: u8 = 6;
}

/// IP protocol numbers the balancer handles.
pub mod proto {
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
    /// SCTP.
    pub const SCTP: u8 = 132;
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// ICMPv6.
    pub const ICMPV6: u8 = 58;
}

/// Indices into the per-CPU `STATS` array map: global counters and verdict reasons.
pub mod stat {
    /// Every packet the program saw.
    pub const PACKETS: u32 = 0;
    /// Bytes of every packet the program saw (the real buffer length, frags included).
    pub const BYTES: u32 = 1;
    /// Passed: not IP, or not addressed to a VIP or a SNAT port.
    pub const PASS_NOT_VIP: u32 = 2;
    /// Passed: truncated or malformed header (the stack decides).
    pub const PASS_MALFORMED: u32 = 3;
    /// Passed: IP fragment (no L4 ports to balance on).
    pub const PASS_FRAGMENT: u32 = 4;
    /// Passed: TTL/hop limit would expire (the stack sends Time Exceeded).
    pub const PASS_TTL: u32 = 5;
    /// Passed after rewrite: the kernel has no neighbour entry for the next hop yet.
    pub const PASS_NO_NEIGH: u32 = 6;
    /// Dropped: the service has no backend with weight (all draining or none).
    pub const DROP_NO_BACKEND: u32 = 7;
    /// Dropped: no free SNAT port after bounded probing.
    pub const DROP_NO_SNAT_PORT: u32 = 8;
    /// Dropped: no route to the backend or client.
    pub const DROP_NO_ROUTE: u32 = 9;
    /// Conntrack: a new entry was inserted.
    pub const CT_INSERT: u32 = 10;
    /// Conntrack: lookup missed (new flow, or evicted/expired entry).
    pub const CT_MISS: u32 = 11;
    /// Conntrack: lookup hit.
    pub const CT_HIT: u32 = 12;
    /// Replies reverse-translated.
    pub const REPLY_NAT: u32 = 13;
    /// Sent back out the receiving interface.
    pub const TX: u32 = 14;
    /// Redirected to another interface.
    pub const REDIRECT: u32 = 15;
    /// Passed: a VIP packet with an unsupported protocol or a fragment-less SCTP oddity.
    pub const PASS_UNSUPPORTED: u32 = 16;
    /// ICMP errors quoting a tracked flow, translated.
    pub const ICMP_ERROR_NAT: u32 = 17;
    /// Echo requests to a VIP answered.
    pub const ICMP_ECHO_REPLY: u32 = 18;
    /// Number of slots in the `STATS` map.
    pub const COUNT: u32 = 19;
}

/// Names of the maps, as the loader looks them up in the object file.
pub mod map_name {
    /// Per-CPU global counters, indexed by [`crate::stat`].
    pub const STATS: &str = "STATS";
    /// Node configuration, one [`crate::Config`] at index 0.
    pub const CONFIG: &str = "CONFIG";
    /// VIP listeners: [`crate::VipKey`] → [`crate::Service`].
    pub const SERVICES: &str = "SERVICES";
    /// Maglev rings, `2 · M` slots per service (double buffer), values are backend ids.
    pub const RINGS: &str = "RINGS";
    /// Backends by id: [`crate::Backend`].
    pub const BACKENDS: &str = "BACKENDS";
    /// Connection tracking: [`crate::FlowKey`] → [`crate::Flow`] (LRU).
    pub const CONNTRACK: &str = "CONNTRACK";
    /// Reverse NAT: reply [`crate::FlowKey`] → [`crate::RevNat`] (LRU).
    pub const REV_NAT: &str = "REV_NAT";
    /// Per-service per-CPU counters: [`crate::Counters`] by service id.
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    /// Per-backend per-CPU counters: [`crate::Counters`] by backend id.
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    /// Cached next hops per backend id: [`crate::NextHop`].
    pub const NEXT_HOPS: &str = "NEXT_HOPS";
}

/// Name of the XDP entry point in the object file.
pub const PROGRAM_NAME: &str = "portico_xdp";
/// Name of the benchmark floor program (swap MACs, XDP_TX) in the same object.
pub const FLOOR_PROGRAM_NAME: &str = "xdp_floor";

/// Default number of service slots (ids 1..MAX_SERVICES-1; id 0 means unset).
pub const DEFAULT_MAX_SERVICES: u32 = 256;
/// Default number of backend slots (ids 1..MAX_BACKENDS-1; id 0 means unset).
pub const DEFAULT_MAX_BACKENDS: u32 = 4096;

/// Node-wide configuration (map `CONFIG`, index 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// SNAT source for IPv4 backends (network order).
    pub snat_v4: [u8; 4],
    /// Maglev table size M (prime); every ring has M slots.
    pub ring_size: u32,
    /// SNAT source for IPv6 backends.
    pub snat_v6: [u8; 16],
    /// Lowest SNAT source port (host order).
    pub snat_port_min: u16,
    /// Highest SNAT source port (host order).
    pub snat_port_max: u16,
    /// Seed of the flow hash; the same on every node so ECMP-shifted flows land alike.
    pub hash_seed: u32,
    /// [`config_flags`].
    pub flags: u32,
    /// Idle timeout of tracked TCP flows, seconds.
    pub tcp_timeout_s: u32,
    /// Idle timeout of tracked UDP flows, seconds.
    pub udp_timeout_s: u32,
    /// Life of a TCP flow after FIN or RST, seconds.
    pub tcp_closing_timeout_s: u32,
}

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// Answer ICMP/ICMPv6 echo requests to VIPs in XDP (otherwise they pass to the stack).
    pub const ECHO_REPLY: u32 = 1;
}

/// Service lookup key: a VIP listener.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// VIP address.
    pub addr: [u8; 16],
    /// Port, network order (0 for ICMP echo lookups).
    pub port: u16,
    /// IP protocol ([`proto`]).
    pub proto: u8,
    /// [`family`].
    pub family: u8,
}

/// A service (value of `SERVICES`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Service id, 1..MAX_SERVICES; indexes rings and counters.
    pub id: u32,
    /// [`service_flags`].
    pub flags: u32,
    /// Which half of the double-buffered ring is live (0 or 1).
    pub ring_gen: u32,
    /// Explicit padding.
    pub _pad: u32,
}

/// Bits of [`Service::flags`].
pub mod service_flags {
    /// Hash on the source address only (session affinity).
    pub const HASH_SRC_ONLY: u32 = 1;
}

/// A backend (value of `BACKENDS`). `state == 0` means the slot is unused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address.
    pub addr: [u8; 16],
    /// Backend port, network order.
    pub port: u16,
    /// [`family`].
    pub family: u8,
    /// [`backend_state`].
    pub state: u8,
}

/// Values of [`Backend::state`].
pub mod backend_state {
    /// Unused slot (removed backend): tracked flows to it are re-balanced.
    pub const UNUSED: u8 = 0;
    /// Takes new flows (when in the ring) and keeps tracked ones.
    pub const ACTIVE: u8 = 1;
    /// Weight 0: out of the ring; tracked flows continue.
    pub const DRAINING: u8 = 2;
}

/// A flow's 5-tuple as it arrives (conntrack and reverse-NAT key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub src: [u8; 16],
    /// Destination address.
    pub dst: [u8; 16],
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// [`family`].
    pub family: u8,
    /// Explicit padding (always zero).
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The same flow seen from the other end: addresses and ports swapped.
    #[inline(always)]
    pub fn reversed(&self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
            sport: self.dport,
            dport: self.sport,
            ..*self
        }
    }
}

/// A tracked flow (value of `CONNTRACK`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Chosen backend id.
    pub backend_id: u32,
    /// SNAT source port, network order.
    pub snat_port: u16,
    /// [`flow_state`].
    pub state: u8,
    /// Explicit padding.
    pub _pad: u8,
    /// Last time a packet was seen (coarse monotonic ns), refreshed at most once a second.
    pub last_seen_ns: u64,
}

/// Values of [`Flow::state`].
pub mod flow_state {
    /// Open.
    pub const OPEN: u8 = 0;
    /// FIN or RST seen: the entry lives `tcp_closing_timeout_s` more.
    pub const CLOSING: u8 = 1;
}

/// What a reply is translated back to (value of `REV_NAT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    /// The client's address (the reply's new destination).
    pub client: [u8; 16],
    /// The VIP (the reply's new source).
    pub vip: [u8; 16],
    /// Client port, network order.
    pub client_port: u16,
    /// VIP port, network order.
    pub vip_port: u16,
    /// Service id (for counters).
    pub service_id: u16,
    /// Explicit padding.
    pub _pad: u16,
}

/// Packet, byte and new-flow counters (per CPU) of a service or a backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
    /// New flows.
    pub new_flows: u64,
}

/// A cached next hop toward a backend (value of `NEXT_HOPS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface.
    pub ifindex: u32,
    /// Source MAC.
    pub smac: [u8; 6],
    /// Destination MAC.
    pub dmac: [u8; 6],
    /// Valid until (coarse monotonic ns); 0 = empty.
    pub expires_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain data with explicit padding and no pointers.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::NextHop {}
}

#[cfg(test)]
mod tests {
    use core::mem::size_of;

    use super::*;

    #[test]
    fn map_types_have_no_implicit_padding() {
        assert_eq!(size_of::<Config>(), 48);
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<Service>(), 16);
        assert_eq!(size_of::<Backend>(), 20);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 16);
        assert_eq!(size_of::<RevNat>(), 40);
        assert_eq!(size_of::<Counters>(), 24);
        assert_eq!(size_of::<NextHop>(), 24);
    }
}
