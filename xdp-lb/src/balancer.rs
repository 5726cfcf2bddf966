//! The balancer API the controller drives: node configuration, services (VIP listeners) with
//! weighted backends, and their counters. [`XdpBalancer`] programs the XDP maps;
//! [`FakeBalancer`] keeps the same state in memory for controller tests.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};
use portico_xdp_common::{
    addr_from_octets, addr_from_v4, addr_octets, backend_state, config_flags, encap, family,
    map_name, proto, service_flags, source_filter_bit, vip_filter_bit, Addr, Backend, Config,
    Counters, NextHop, Service, VipKey, VIP_FILTER_WORDS,
};

use crate::{
    maglev::{self, MaglevBackend, MaglevError},
    pin::BackendMeta,
    program::{add_counters, map_err, XdpError, XdpProgram},
};

/// L4 protocol of a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// SCTP (listed; XDP passes it to the stack until CRC32c rewriting lands).
    Sctp,
}

impl Protocol {
    fn number(self) -> u8 {
        match self {
            Protocol::Tcp => proto::TCP,
            Protocol::Udp => proto::UDP,
            Protocol::Sctp => proto::SCTP,
        }
    }

    fn from_number(n: u8) -> Option<Self> {
        match n {
            proto::TCP => Some(Protocol::Tcp),
            proto::UDP => Some(Protocol::Udp),
            proto::SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// A VIP listener: (VIP, port, protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The VIP.
    pub vip: IpAddr,
    /// Listener port.
    pub port: u16,
    /// Listener protocol.
    pub proto: Protocol,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = match self.proto {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        };
        match self.vip {
            IpAddr::V4(a) => write!(f, "{a}:{}/{p}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{p}", self.port),
        }
    }
}

/// A backend of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendSpec {
    /// Backend address.
    pub addr: IpAddr,
    /// Backend port.
    pub port: u16,
    /// Relative weight; 0 drains: no new flows, tracked flows continue.
    pub weight: u32,
}

/// A service as the controller wants it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The listener.
    pub key: ServiceKey,
    /// Backends (empty: new flows are dropped and counted).
    pub backends: Vec<BackendSpec>,
    /// Hash on the client address only (session affinity).
    pub hash_source_only: bool,
    /// Keep the client's source address and port toward backends of the VIP's family
    /// (`externalTrafficPolicy: Local`): no SNAT, so the backend sees the client. The backend
    /// must route its replies back through this node (its default route), which translates
    /// their source back to the VIP. Backends of the other family are still reached through
    /// the SNAT address (NAT46/64).
    pub preserve_source: bool,
    /// How packets reach the backends: NAT, or direct server return.
    pub forwarding: Forwarding,
}

/// How a service's packets reach its backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Forwarding {
    /// Destination rewritten to the backend, source to the node; replies come back through
    /// the node and are translated back.
    #[default]
    Nat,
    /// Direct server return: the client's packet unchanged inside an outer header from the
    /// node to the backend, which answers the client itself (`portico decap` strips it).
    /// The backend must accept the VIP and the service port: neither is translated.
    Dsr(Encapsulation),
}

/// The outer header of direct server return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encapsulation {
    /// IP in IP by the families: IPIP (4in4), IP6IP6, 4in6, 6in4.
    Ipip,
    /// GUE variant 1: UDP to the node's GUE port, the client's packet as its payload.
    Gue,
}

impl Forwarding {
    /// The value of [`Backend::encap`] for this mode.
    pub fn encap(self) -> u8 {
        match self {
            Forwarding::Nat => encap::NAT,
            Forwarding::Dsr(Encapsulation::Ipip) => encap::IPIP,
            Forwarding::Dsr(Encapsulation::Gue) => encap::GUE,
        }
    }

    /// The mode of a [`Backend::encap`] value, `None` for one this build does not know.
    pub fn from_encap(e: u8) -> Option<Self> {
        match e {
            encap::NAT => Some(Forwarding::Nat),
            encap::IPIP => Some(Forwarding::Dsr(Encapsulation::Ipip)),
            encap::GUE => Some(Forwarding::Dsr(Encapsulation::Gue)),
            _ => None,
        }
    }
}

impl std::fmt::Display for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Forwarding::Nat => "nat",
            Forwarding::Dsr(Encapsulation::Ipip) => "dsr/ipip",
            Forwarding::Dsr(Encapsulation::Gue) => "dsr/gue",
        })
    }
}

/// Node-wide settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Source address for NAT toward IPv4 backends.
    pub snat_v4: Option<Ipv4Addr>,
    /// Source address for NAT toward IPv6 backends.
    pub snat_v6: Option<Ipv6Addr>,
    /// SNAT source ports; keep them out of the node's ephemeral range.
    pub snat_ports: (u16, u16),
    /// Flow-hash seed, the same on every node.
    pub hash_seed: u32,
    /// Idle timeout of TCP flows.
    pub tcp_timeout: Duration,
    /// Idle timeout of UDP flows.
    pub udp_timeout: Duration,
    /// Life of a TCP flow after FIN/RST.
    pub tcp_closing_timeout: Duration,
    /// Answer ICMP/ICMPv6 echo requests to VIPs in XDP (otherwise the stack sees them).
    pub echo_reply: bool,
    /// The RFC 6052 prefix embedding IPv4 addresses in IPv6, for NAT46/64 ICMP errors
    /// from routers of the other family.
    pub xlat_prefix: XlatPrefix,
    /// Direct server return's outer header.
    pub dsr: DsrConfig,
}

/// The well-known NAT64 prefix, 64:ff9b::/96 (RFC 6052 §2.1).
pub const WELL_KNOWN_XLAT_PREFIX: XlatPrefix = XlatPrefix {
    addr: Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0),
    len: 96,
};

/// An RFC 6052 prefix for IPv4-embedded IPv6 addresses (`64:ff9b::/96`, `2001:db8::/32`):
/// a length of 32, 40, 48, 56, 64 or 96 bits, no bit set past it, and (a /96) bits 64–71,
/// the "u" octet, zero. Parsed from and shown as `ADDRESS/LENGTH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XlatPrefix {
    /// The prefix's address.
    pub addr: Ipv6Addr,
    /// Its length in bits.
    pub len: u8,
}

impl XlatPrefix {
    /// Checks the prefix is one RFC 6052 allows.
    ///
    /// # Errors
    /// What is wrong with it, in words.
    pub fn check(&self) -> Result<(), &'static str> {
        if !portico_xdp_common::rfc6052::LENGTHS.contains(&self.len) {
            return Err("RFC 6052 allows prefixes of 32, 40, 48, 56, 64 or 96 bits");
        }
        let bits = u128::from(self.addr);
        if bits & (u128::MAX >> self.len) != 0 {
            return Err("bits are set past the prefix length");
        }
        if self.addr.octets()[8] != 0 {
            return Err("bits 64-71 (the u octet) must be zero");
        }
        Ok(())
    }
}

impl std::str::FromStr for XlatPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s}: want ADDRESS/LENGTH, e.g. 64:ff9b::/96"))?;
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|e| format!("{s}: {e} (an IPv6 address)"))?;
        let len: u8 = len.parse().map_err(|e| format!("{s}: the length: {e}"))?;
        let prefix = Self { addr, len };
        prefix.check().map_err(|why| format!("{s}: {why}"))?;
        Ok(prefix)
    }
}

impl std::fmt::Display for XlatPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// The node's side of direct server return's outer header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DsrConfig {
    /// Outer IPv4 source: a prefix whose host bits come from the flow hash (entropy for the
    /// backends' RSS), or one address (`/32`). `None`: the IPv4 SNAT address.
    pub source_v4: Option<(Ipv4Addr, u8)>,
    /// Outer IPv6 source, as for IPv4; at most the last 32 bits come from the flow hash.
    /// `None`: the IPv6 SNAT address.
    pub source_v6: Option<(Ipv6Addr, u8)>,
    /// GUE's UDP destination port at the backends (`portico decap --gue-port`).
    pub gue_port: u16,
}

impl Default for DsrConfig {
    fn default() -> Self {
        Self {
            source_v4: None,
            source_v6: None,
            gue_port: DEFAULT_GUE_PORT,
        }
    }
}

/// The default GUE port, as `portico decap`'s.
pub const DEFAULT_GUE_PORT: u16 = 6080;

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            snat_v4: None,
            snat_v6: None,
            snat_ports: (20000, 29999),
            hash_seed: 0x5052_5443,
            tcp_timeout: Duration::from_secs(3600),
            udp_timeout: Duration::from_secs(60),
            tcp_closing_timeout: Duration::from_secs(10),
            echo_reply: true,
            xlat_prefix: WELL_KNOWN_XLAT_PREFIX,
            dsr: DsrConfig::default(),
        }
    }
}

/// The host bits of a prefix of `len` bits in a 32-bit word of the address's last 32 bits
/// (`bits` long in all), in network order: the bits the flow hash fills.
fn host_mask(bits: u8, len: u8) -> u32 {
    let host = u32::from(bits.saturating_sub(len)).min(32);
    let m = if host == 32 {
        u32::MAX
    } else {
        (1u32 << host) - 1
    };
    u32::from_ne_bytes(m.to_be_bytes())
}

/// Counters of a service and of each of its backends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// The service's own counters (client → VIP and replies).
    pub service: Counters,
    /// Per backend (address, port), client → backend direction.
    pub backends: Vec<((IpAddr, u16), Counters)>,
    /// Packets of the service dropped: no backend with weight, no SNAT port (or, keeping the
    /// client's source, its address and port taken toward the backend by another flow), no
    /// route to the backend or the client.
    pub drops: u64,
}

/// Errors of the balancer API; each names the object, field and value.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    /// The spec is invalid.
    #[error("service {service}: {field} = {value}: {why}")]
    InvalidSpec {
        /// The listener.
        service: ServiceKey,
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The node configuration is invalid.
    #[error("node config: {field} = {value}: {why}")]
    InvalidNodeConfig {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Out of service or backend slots.
    #[error("out of {what} slots ({max} at most; reload with a larger LoadOptions)")]
    Full {
        /// Which table.
        what: &'static str,
        /// Its size.
        max: u32,
    },
    /// Maglev refused the backends.
    #[error("service {service}: {source}")]
    Maglev {
        /// The listener.
        service: ServiceKey,
        /// Why.
        source: MaglevError,
    },
    /// The kernel side failed.
    #[error(transparent)]
    Xdp(#[from] XdpError),
    /// [`XdpBalancer::adopt`] found map contents this build cannot interpret.
    #[error(
        "adopting the balancer state in the maps: {what}: {why} (pins from another build? \
         start fresh with XdpProgram::unpin_maps)"
    )]
    Adopt {
        /// The entry.
        what: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

/// What the controller needs from a balancer.
pub trait Balancer {
    /// Sets SNAT addresses, port range, hash seed and timeouts.
    ///
    /// # Errors
    /// Invalid values, or the kernel refuses the update.
    fn configure_node(&mut self, config: &NodeConfig) -> Result<(), BalancerError>;

    /// Creates or replaces a service; its Maglev table is swapped in whole.
    ///
    /// # Errors
    /// Invalid spec, no SNAT address for the family, out of slots, or a kernel failure.
    fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<(), BalancerError>;

    /// Removes a service; returns whether it existed.
    ///
    /// # Errors
    /// The kernel refuses the update.
    fn remove_service(&mut self, key: &ServiceKey) -> Result<bool, BalancerError>;

    /// The current spec of a service.
    fn service(&self, key: &ServiceKey) -> Option<&ServiceSpec>;

    /// Counters of a service, `None` when it does not exist.
    ///
    /// # Errors
    /// The counters cannot be read.
    fn service_stats(&self, key: &ServiceKey) -> Result<Option<ServiceStats>, BalancerError>;

    /// The datapath's global counters by name (packets, drops by reason, …); none for a
    /// balancer without a datapath.
    ///
    /// # Errors
    /// The counters cannot be read.
    fn datapath_counters(&self) -> Result<Vec<(&'static str, u64)>, BalancerError> {
        Ok(Vec::new())
    }

    /// Tracked flows by table (`established`, `unconfirmed`) and each table's `capacity`;
    /// none for a balancer without a datapath.
    ///
    /// # Errors
    /// The tables cannot be read.
    fn tracked_flows(&self) -> Result<Vec<(&'static str, u64)>, BalancerError> {
        Ok(Vec::new())
    }

    /// Upkeep of the datapath's tables, called every second and after each reconcile pass:
    /// the XDP balancer rebuilds the presence filters of its flow tables when they are due
    /// (docs/xdp.md, "New flows"). Nothing for a balancer without a datapath.
    ///
    /// # Errors
    /// The tables cannot be read.
    fn maintain(&mut self) -> Result<(), BalancerError> {
        Ok(())
    }

    /// Changes one backend's weight (0 drains it).
    ///
    /// # Errors
    /// Unknown service or backend, or as [`Balancer::upsert_service`].
    fn set_backend_weight(
        &mut self,
        key: &ServiceKey,
        addr: IpAddr,
        port: u16,
        weight: u32,
    ) -> Result<(), BalancerError> {
        let mut spec = self
            .service(key)
            .cloned()
            .ok_or_else(|| BalancerError::InvalidSpec {
                service: *key,
                field: "service",
                value: key.to_string(),
                why: "no such service",
            })?;
        let backend = spec
            .backends
            .iter_mut()
            .find(|b| b.addr == addr && b.port == port)
            .ok_or_else(|| BalancerError::InvalidSpec {
                service: *key,
                field: "backends",
                value: format!("{addr}:{port}"),
                why: "no such backend",
            })?;
        backend.weight = weight;
        self.upsert_service(&spec)
    }
}

/// Checks a spec against the node configuration.
fn validate(spec: &ServiceSpec, node: &NodeConfig) -> Result<(), BalancerError> {
    let bad = |field, value: String, why| BalancerError::InvalidSpec {
        service: spec.key,
        field,
        value,
        why,
    };
    if spec.key.port == 0 {
        return Err(bad("port", "0".into(), "listener port must be 1-65535"));
    }
    match spec.key.vip {
        IpAddr::V4(_) if node.snat_v4.is_none() => {
            return Err(bad(
                "vip",
                spec.key.vip.to_string(),
                "no IPv4 SNAT address configured on this node",
            ))
        }
        IpAddr::V6(_) if node.snat_v6.is_none() => {
            return Err(bad(
                "vip",
                spec.key.vip.to_string(),
                "no IPv6 SNAT address configured on this node",
            ))
        }
        _ => {}
    }
    let mut seen = BTreeSet::new();
    for (i, b) in spec.backends.iter().enumerate() {
        // NAT46 / NAT64: the packets reach the backend from the node's SNAT address of the
        // backend's family.
        let snat_missing = match b.addr {
            IpAddr::V4(_) => node.snat_v4.is_none(),
            IpAddr::V6(_) => node.snat_v6.is_none(),
        };
        if snat_missing {
            return Err(bad(
                "backends[].addr",
                format!("[{i}] {}", b.addr),
                "no SNAT address of the backend's family configured on this node",
            ));
        }
        if b.port == 0 {
            return Err(bad(
                "backends[].port",
                format!("[{i}] 0"),
                "backend port must be 1-65535",
            ));
        }
        if !seen.insert((b.addr, b.port)) {
            return Err(bad(
                "backends",
                format!("[{i}] {}:{}", b.addr, b.port),
                "duplicate backend",
            ));
        }
    }
    Ok(())
}

fn validate_node(c: &NodeConfig) -> Result<(), BalancerError> {
    let bad = |field, value: String, why| BalancerError::InvalidNodeConfig { field, value, why };
    let (lo, hi) = c.snat_ports;
    if lo == 0 || lo > hi {
        return Err(bad(
            "snat_ports",
            format!("{lo}-{hi}"),
            "must be a non-empty range within 1-65535",
        ));
    }
    if let Err(why) = c.xlat_prefix.check() {
        return Err(bad("xlat_prefix", c.xlat_prefix.to_string(), why));
    }
    for (field, d) in [
        ("tcp_timeout", c.tcp_timeout),
        ("udp_timeout", c.udp_timeout),
        ("tcp_closing_timeout", c.tcp_closing_timeout),
    ] {
        if d.as_secs() == 0 || d.as_secs() > u64::from(u32::MAX) {
            return Err(bad(
                field,
                format!("{d:?}"),
                "must be between 1 s and 2^32 s",
            ));
        }
    }
    if let Some((a, len)) = c.dsr.source_v4 {
        if len > 32 || a.is_unspecified() {
            return Err(bad(
                "dsr.source_v4",
                format!("{a}/{len}"),
                "must be an IPv4 address with a prefix length of at most 32",
            ));
        }
    }
    if let Some((a, len)) = c.dsr.source_v6 {
        if len > 128 || a.is_unspecified() {
            return Err(bad(
                "dsr.source_v6",
                format!("{a}/{len}"),
                "must be an IPv6 address with a prefix length of at most 128",
            ));
        }
    }
    if c.dsr.gue_port == 0 {
        return Err(bad("dsr.gue_port", "0".into(), "must be 1-65535"));
    }
    Ok(())
}

/// The stable Maglev key of a backend: FNV-1a over address and port, the same on every node.
pub fn stable_key(addr: IpAddr, port: u16) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes: Vec<u8> = match addr {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    for b in bytes.iter().chain(port.to_be_bytes().iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The Maglev table of a spec's backends, keyed by their stable keys.
fn maglev_table(spec: &ServiceSpec, m: u32) -> Result<maglev::Table, BalancerError> {
    let backends: Vec<MaglevBackend> = spec
        .backends
        .iter()
        .map(|b| MaglevBackend {
            key: stable_key(b.addr, b.port),
            weight: b.weight,
        })
        .collect();
    maglev::table(&backends, m).map_err(|source| BalancerError::Maglev {
        service: spec.key,
        source,
    })
}

/// The program's form of an address: words and family tag.
fn addr16(a: IpAddr) -> (Addr, u8) {
    match a {
        IpAddr::V4(v4) => (addr_from_v4(v4.octets()), family::V4),
        IpAddr::V6(v6) => (addr_from_octets(v6.octets()), family::V6),
    }
}

/// The (VIP, 0, 0) entry that marks an address as a VIP (echo replies).
fn presence_key(vip: IpAddr) -> VipKey {
    let (addr, fam) = addr16(vip);
    VipKey {
        addr,
        port: 0,
        proto: 0,
        family: fam,
    }
}

/// The address of the program's form, `None` for an unknown family tag.
fn ip_of(fam: u8, a: &Addr) -> Option<IpAddr> {
    match fam {
        family::V4 => Some(IpAddr::V4(Ipv4Addr::from(a[0].to_ne_bytes()))),
        family::V6 => Some(IpAddr::V6(Ipv6Addr::from(addr_octets(a)))),
        _ => None,
    }
}

/// The listener of a `SERVICES` key.
fn service_key_of(k: &VipKey) -> Result<ServiceKey, BalancerError> {
    let bad = |why| BalancerError::Adopt {
        what: format!("SERVICES key {k:?}"),
        why,
    };
    Ok(ServiceKey {
        vip: ip_of(k.family, &k.addr).ok_or_else(|| bad("unknown address family"))?,
        port: u16::from_be(k.port),
        proto: Protocol::from_number(k.proto).ok_or_else(|| bad("unknown protocol"))?,
    })
}

/// The node configuration a `CONFIG` value was written from (timeouts to the jiffy).
fn node_config_of(c: &Config) -> NodeConfig {
    let hz = u64::from(c.hz.max(1));
    let duration = |jiffies: u32| Duration::from_millis(u64::from(jiffies) * 1000 / hz);
    NodeConfig {
        snat_v4: (c.snat_v4 != 0).then(|| Ipv4Addr::from(c.snat_v4.to_ne_bytes())),
        snat_v6: (c.snat_v6 != [0; 4]).then(|| Ipv6Addr::from(addr_octets(&c.snat_v6))),
        snat_ports: (c.snat_port_min, c.snat_port_max),
        hash_seed: c.hash_seed,
        tcp_timeout: duration(c.tcp_timeout),
        udp_timeout: duration(c.udp_timeout),
        tcp_closing_timeout: duration(c.tcp_closing_timeout),
        echo_reply: c.flags & config_flags::ECHO_REPLY != 0,
        xlat_prefix: XlatPrefix {
            addr: Ipv6Addr::from(addr_octets(&[
                c.xlat_prefix[0],
                c.xlat_prefix[1],
                c.xlat_prefix[2],
                0,
            ])),
            len: if c.xlat_prefix_len == 0 {
                96
            } else {
                c.xlat_prefix_len
            },
        },
        dsr: DsrConfig {
            source_v4: (c.dsr_v4 != 0).then(|| {
                let host = u32::from_be_bytes(c.dsr_v4_mask.to_ne_bytes()).count_ones() as u8;
                (Ipv4Addr::from(c.dsr_v4.to_ne_bytes()), 32 - host)
            }),
            source_v6: (c.dsr_v6 != [0; 4]).then(|| {
                let host = u32::from_be_bytes(c.dsr_v6_mask.to_ne_bytes()).count_ones() as u8;
                (Ipv6Addr::from(addr_octets(&c.dsr_v6)), 128 - host)
            }),
            gue_port: u16::from_be(c.gue_port),
        },
    }
}

fn vip_key(k: &ServiceKey) -> VipKey {
    let (addr, fam) = addr16(k.vip);
    VipKey {
        addr,
        port: k.port.to_be(),
        proto: k.proto.number(),
        family: fam,
    }
}

/// Lowest free id in `1..max` not in `used`.
fn free_id(used: &BTreeSet<u32>, max: u32) -> Option<u32> {
    (1..max).find(|i| !used.contains(i))
}

/// A backend's address and port.
pub type BackendAddr = (IpAddr, u16);

/// The `VIP_FILTER` bitmap for a set of VIP addresses and the backend addresses of services
/// that keep client sources (their replies are addressed to clients: the filter knows them by
/// their source, [`source_filter_bit`]).
fn vip_filter<'a>(
    vips: impl Iterator<Item = &'a IpAddr>,
    preserved_backends: impl Iterator<Item = &'a IpAddr>,
) -> Vec<u64> {
    let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
    let mut set = |bit: u32| words[(bit >> 6) as usize] |= 1 << (bit & 63);
    for vip in vips {
        let (addr, fam) = addr16(*vip);
        set(vip_filter_bit(fam, &addr));
    }
    for be in preserved_backends {
        let (addr, fam) = addr16(*be);
        set(source_filter_bit(fam, &addr));
    }
    words
}

struct Installed {
    id: u32,
    ring_gen: u32,
    spec: ServiceSpec,
    backend_ids: HashMap<(IpAddr, u16), u32>,
    /// What backends removed from the service had counted (client → VIP direction is
    /// counted per backend only, so the service's totals keep it).
    retired: Counters,
}

/// The real balancer: programs the XDP maps of a loaded [`XdpProgram`].
pub struct XdpBalancer {
    program: XdpProgram,
    node: NodeConfig,
    services: BTreeMap<ServiceKey, Installed>,
    service_ids: BTreeSet<u32>,
    backend_ids: BTreeSet<u32>,
    /// What the `VIP_FILTER` map holds.
    filter: Vec<u64>,
    /// Generation of each backend id ever used (bumped when the id is handed out again).
    generations: HashMap<u32, u16>,
    /// What the `CONFIG` map holds.
    config: Config,
}

impl XdpBalancer {
    /// Wraps a loaded program; call [`Balancer::configure_node`] before adding services.
    pub fn new(program: XdpProgram) -> Self {
        Self {
            program,
            node: NodeConfig::default(),
            services: BTreeMap::new(),
            service_ids: BTreeSet::new(),
            backend_ids: BTreeSet::new(),
            filter: vec![0; VIP_FILTER_WORDS as usize],
            generations: HashMap::new(),
            config: Config::default(),
        }
    }

    /// Wraps a program whose maps may already hold a balancer's state (loaded with
    /// [`XdpProgram::load_pinned`] after a restart) and takes that state over: the node
    /// configuration, the services with their ids and live ring halves, their backends with
    /// ids, generations, weights and order, and what removed backends had counted. Upserting
    /// the same services again then keeps every id and generation, so tracked flows keep
    /// their backend and SNAT port; services no longer wanted can be removed. On empty maps
    /// this is [`XdpBalancer::new`].
    ///
    /// What an interrupted update can leave behind is repaired: backends of no service are
    /// released (their flows re-balance), and the VIP filter and echo entries are brought in
    /// line with the services. Weights and order come from the pinned userspace state; a
    /// program loaded without pins reports active backends at weight 1.
    ///
    /// # Errors
    /// A map cannot be read or repaired, or holds entries this build cannot interpret.
    pub fn adopt(program: XdpProgram) -> Result<Self, BalancerError> {
        let mut b = Self::new(program);
        let options = b.program.options();
        let cfg = {
            let array: Array<&MapData, Config> = b.program.map(map_name::CONFIG)?;
            array.get(&0, 0).map_err(map_err(map_name::CONFIG))?
        };
        if cfg != Config::default() {
            b.node = node_config_of(&cfg);
            b.config = cfg;
        }

        // Every backend id: an unused slot keeps its last generation too.
        let mut members: BTreeMap<u16, Vec<(u32, Backend)>> = BTreeMap::new();
        {
            let array: Array<&MapData, Backend> = b.program.map(map_name::BACKENDS)?;
            for id in 1..options.max_backends {
                let be = array.get(&id, 0).map_err(map_err(map_name::BACKENDS))?;
                if be.generation != 0 {
                    b.generations.insert(id, be.generation);
                }
                if be.state != backend_state::UNUSED {
                    members.entry(be.service_id).or_default().push((id, be));
                }
            }
        }

        let entries: Vec<(VipKey, Service)> = {
            let map: BpfHashMap<&MapData, VipKey, Service> = b.program.map(map_name::SERVICES)?;
            map.iter()
                .collect::<Result<_, _>>()
                .map_err(map_err(map_name::SERVICES))?
        };
        let mut echo_keys = Vec::new();
        let mut orphans = Vec::new();
        for (k, svc) in entries {
            if k.port == 0 && k.proto == 0 {
                echo_keys.push(k);
                continue;
            }
            let key = service_key_of(&k)?;
            if svc.id == 0
                || svc.id >= options.max_services
                || svc.ring_gen > 1
                || !b.service_ids.insert(svc.id)
            {
                return Err(BalancerError::Adopt {
                    what: format!("service {key} ({svc:?})"),
                    why: "service id or ring half out of range, or an id used twice",
                });
            }
            let mut listed = Vec::new();
            let mut backend_ids = HashMap::new();
            for (bid, be) in members.remove(&(svc.id as u16)).unwrap_or_default() {
                let addr = ip_of(be.family, &be.addr).ok_or_else(|| BalancerError::Adopt {
                    what: format!("backend id {bid} of service {key}"),
                    why: "unknown address family",
                })?;
                let port = u16::from_be(be.port);
                if backend_ids.contains_key(&(addr, port)) {
                    orphans.push((bid, be));
                    continue;
                }
                let meta = match b.program.pinned_state() {
                    Some(state) => state.backend_meta(bid)?,
                    None => BackendMeta::default(),
                };
                let weight = if be.state == backend_state::DRAINING {
                    0
                } else {
                    meta.weight.max(1)
                };
                listed.push((meta.position, BackendSpec { addr, port, weight }));
                backend_ids.insert((addr, port), bid);
                b.backend_ids.insert(bid);
            }
            listed.sort_by_key(|(position, be)| (*position, be.addr, be.port));
            let retired = match b.program.pinned_state() {
                Some(state) => state.retired(svc.id)?,
                None => Counters::default(),
            };
            b.services.insert(
                key,
                Installed {
                    id: svc.id,
                    ring_gen: svc.ring_gen,
                    spec: ServiceSpec {
                        key,
                        backends: listed.into_iter().map(|(_, be)| be).collect(),
                        hash_source_only: svc.flags & service_flags::HASH_SRC_ONLY != 0,
                        preserve_source: svc.flags & service_flags::PRESERVE_SOURCE != 0,
                        forwarding: Forwarding::from_encap(
                            (svc.flags >> service_flags::ENCAP_SHIFT) as u8,
                        )
                        .ok_or_else(|| BalancerError::Adopt {
                            what: format!("SERVICES value of {key}"),
                            why: "unknown forwarding mode",
                        })?,
                    },
                    backend_ids,
                    retired,
                },
            );
        }

        // Backends of no service: an update or removal stopped between its map writes.
        orphans.extend(members.into_values().flatten());
        for (bid, _) in &orphans {
            b.release_backend(*bid)?;
        }
        if !orphans.is_empty() {
            b.bump_cache_epoch()?;
        }
        {
            let array: Array<&MapData, u64> = b.program.map(map_name::VIP_FILTER)?;
            for (i, word) in b.filter.iter_mut().enumerate() {
                *word = array
                    .get(&(i as u32), 0)
                    .map_err(map_err(map_name::VIP_FILTER))?;
            }
        }
        b.sync_vip_filter(None)?;
        let vips: BTreeSet<IpAddr> = b.services.keys().map(|k| k.vip).collect();
        let wanted: Vec<VipKey> = vips.iter().map(|v| presence_key(*v)).collect();
        let mut map: BpfHashMap<&mut MapData, VipKey, Service> =
            b.program.map_mut(map_name::SERVICES)?;
        for k in echo_keys.iter().filter(|k| !wanted.contains(k)) {
            map.remove(k).map_err(map_err(map_name::SERVICES))?;
        }
        for k in wanted.iter().filter(|k| !echo_keys.contains(k)) {
            map.insert(k, Service::default(), 0)
                .map_err(map_err(map_name::SERVICES))?;
        }
        Ok(b)
    }

    /// The installed services, by key (after [`XdpBalancer::adopt`]: those found in the
    /// maps, as they were upserted).
    pub fn services(&self) -> impl Iterator<Item = &ServiceSpec> + '_ {
        self.services.values().map(|i| &i.spec)
    }

    /// The node configuration as last set or adopted.
    pub fn node_config(&self) -> &NodeConfig {
        &self.node
    }

    /// The program, unwrapped (to [`XdpProgram::detach_and_unpin`] it at shutdown).
    pub fn into_program(self) -> XdpProgram {
        self.program
    }

    /// The live Maglev ring of a service as the program reads it: for each slot, the
    /// backend (address, port) it sends new flows to, `None` where no backend has weight.
    /// For inspection (one map read per slot).
    ///
    /// # Errors
    /// The rings map cannot be read.
    pub fn live_ring(
        &self,
        key: &ServiceKey,
    ) -> Result<Option<Vec<Option<BackendAddr>>>, XdpError> {
        let Some(installed) = self.services.get(key) else {
            return Ok(None);
        };
        let by_id: HashMap<u32, (IpAddr, u16)> = installed
            .backend_ids
            .iter()
            .map(|(b, id)| (*id, *b))
            .collect();
        let m = self.program.options().ring_size;
        let base = (installed.id * 2 + installed.ring_gen) * m;
        let rings: Array<&MapData, u32> = self.program.map(map_name::RINGS)?;
        (base..base + m)
            .map(|slot| {
                let id = rings.get(&slot, 0).map_err(map_err(map_name::RINGS))?;
                Ok(by_id.get(&id).copied())
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// The underlying program (attach, test-run, raw counters).
    pub fn program(&self) -> &XdpProgram {
        &self.program
    }

    /// The underlying program, mutably (attach).
    pub fn program_mut(&mut self) -> &mut XdpProgram {
        &mut self.program
    }

    fn write_backend(&mut self, id: u32, b: &Backend) -> Result<(), XdpError> {
        let mut backends: Array<&mut MapData, Backend> =
            self.program.map_mut(map_name::BACKENDS)?;
        backends.set(id, b, 0).map_err(map_err(map_name::BACKENDS))
    }

    /// Frees a backend id: tracked flows to it are re-balanced from then on. The slot keeps
    /// the id's generation, so that a balancer adopting the maps hands the id out with the
    /// next one.
    fn release_backend(&mut self, id: u32) -> Result<(), XdpError> {
        let released = Backend {
            generation: self.generations.get(&id).copied().unwrap_or(0),
            ..Backend::default()
        };
        self.write_backend(id, &released)?;
        if let Some(state) = self.program.pinned_state_mut() {
            state.set_backend_meta(id, BackendMeta::default())?;
        }
        self.backend_ids.remove(&id);
        Ok(())
    }

    /// Brings the `VIP_FILTER` map and `config_flags::PRESERVED_SOURCES` in line with the
    /// installed services and `pending` (a service about to be installed: its replies are
    /// recognised before its first flow can exist), changed words only.
    fn sync_vip_filter(&mut self, pending: Option<&ServiceSpec>) -> Result<(), XdpError> {
        let specs = || {
            self.services
                .values()
                .map(|i| &i.spec)
                .filter(|s| pending.is_none_or(|p| p.key != s.key))
                .chain(pending)
        };
        let preserved = || {
            specs()
                .filter(|s| s.preserve_source)
                .flat_map(|s| s.backends.iter().map(|b| &b.addr))
        };
        let wanted = vip_filter(specs().map(|s| &s.key.vip), preserved());
        let any_preserved = preserved().next().is_some();
        let mut map: Array<&mut MapData, u64> = self.program.map_mut(map_name::VIP_FILTER)?;
        for (i, (&new, old)) in wanted.iter().zip(self.filter.iter_mut()).enumerate() {
            if new != *old {
                map.set(i as u32, new, 0)
                    .map_err(map_err(map_name::VIP_FILTER))?;
                *old = new;
            }
        }
        let flags = if any_preserved {
            self.config.flags | config_flags::PRESERVED_SOURCES
        } else {
            self.config.flags & !config_flags::PRESERVED_SOURCES
        };
        if flags != self.config.flags {
            self.config.flags = flags;
            let mut array: Array<&mut MapData, Config> = self.program.map_mut(map_name::CONFIG)?;
            array
                .set(0, self.config, 0)
                .map_err(map_err(map_name::CONFIG))?;
        }
        Ok(())
    }

    /// Invalidates every per-CPU cached flow and reply at once: the program refills them
    /// from the shared maps, whose entries it checks against the live backends.
    fn bump_cache_epoch(&mut self) -> Result<(), XdpError> {
        self.config.cache_epoch = self.config.cache_epoch.wrapping_add(1);
        let mut array: Array<&mut MapData, Config> = self.program.map_mut(map_name::CONFIG)?;
        array
            .set(0, self.config, 0)
            .map_err(map_err(map_name::CONFIG))
    }

    fn reset_drops(&mut self, id: u32) -> Result<(), XdpError> {
        let os = |what| move |source| XdpError::Os { what, source };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| os("reading possible CPUs")(e))?;
        let mut array: PerCpuArray<&mut MapData, u64> =
            self.program.map_mut(map_name::SERVICE_DROPS)?;
        let zeros = PerCpuValues::try_from(vec![0u64; cpus]).map_err(os("per-CPU values"))?;
        array
            .set(id, zeros, 0)
            .map_err(map_err(map_name::SERVICE_DROPS))
    }

    fn reset_counters(&mut self, map: &'static str, id: u32) -> Result<(), XdpError> {
        let os = |what| move |source| XdpError::Os { what, source };
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| os("reading possible CPUs")(e))?;
        let mut array: PerCpuArray<&mut MapData, Counters> = self.program.map_mut(map)?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus])
            .map_err(os("per-CPU values"))?;
        array.set(id, zeros, 0).map_err(map_err(map))
    }
}

impl Balancer for XdpBalancer {
    fn configure_node(&mut self, config: &NodeConfig) -> Result<(), BalancerError> {
        validate_node(config)?;
        let hz = self.program.hz();
        let jiffies =
            |d: Duration| u32::try_from(d.as_millis() * u128::from(hz) / 1000).unwrap_or(u32::MAX);
        let mut cfg = Config {
            ring_size: self.program.options().ring_size,
            snat_port_min: config.snat_ports.0,
            snat_port_max: config.snat_ports.1,
            hash_seed: config.hash_seed,
            flags: if config.echo_reply {
                config_flags::ECHO_REPLY
            } else {
                0
            },
            hz,
            tcp_timeout: jiffies(config.tcp_timeout),
            udp_timeout: jiffies(config.udp_timeout),
            tcp_closing_timeout: jiffies(config.tcp_closing_timeout),
            flow_cache_mask: self.program.options().flow_cache_entries - 1,
            ..Config::default()
        };
        if let Some(a) = config.snat_v4 {
            cfg.snat_v4 = addr_from_v4(a.octets())[0];
        }
        if let Some(a) = config.snat_v6 {
            cfg.snat_v6 = addr_from_octets(a.octets());
        }
        let prefix = addr_from_octets(config.xlat_prefix.addr.octets());
        cfg.xlat_prefix = [prefix[0], prefix[1], prefix[2]];
        cfg.xlat_prefix_len = config.xlat_prefix.len;
        if let Some((a, len)) = config.dsr.source_v4 {
            cfg.dsr_v4 = addr_from_v4(a.octets())[0];
            cfg.dsr_v4_mask = host_mask(32, len);
        }
        if let Some((a, len)) = config.dsr.source_v6 {
            cfg.dsr_v6 = addr_from_octets(a.octets());
            cfg.dsr_v6_mask = host_mask(128, len);
        }
        cfg.gue_port = config.dsr.gue_port.to_be();
        cfg.cache_epoch = self.config.cache_epoch;
        cfg.flags |= self.config.flags & config_flags::PRESERVED_SOURCES;
        let mut array: Array<&mut MapData, Config> = self.program.map_mut(map_name::CONFIG)?;
        array.set(0, cfg, 0).map_err(map_err(map_name::CONFIG))?;
        self.config = cfg;
        self.node = config.clone();
        // The presence filters: a failure leaves them as they were (disabled at first,
        // which only costs lookups); the upkeep (`maintain`) tries again and reports it.
        let _ = self.program.rebuild_filters();
        Ok(())
    }

    fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<(), BalancerError> {
        validate(spec, &self.node)?;
        let options = self.program.options();
        let m = options.ring_size;

        // Ids: keep the service's and its surviving backends'; allocate the rest.
        let known = self.services.get(&spec.key);
        let new_backends = spec
            .backends
            .iter()
            .filter(|b| known.is_none_or(|i| !i.backend_ids.contains_key(&(b.addr, b.port))))
            .count();
        // Ids 1..max are usable; check room first so a refused update changes nothing.
        if self.backend_ids.len() + new_backends > options.max_backends as usize - 1 {
            return Err(BalancerError::Full {
                what: "backend",
                max: options.max_backends,
            });
        }
        let (id, old_gen, mut backend_ids, retired) = match known {
            Some(i) => (i.id, i.ring_gen, i.backend_ids.clone(), i.retired),
            None => {
                let id = free_id(&self.service_ids, options.max_services).ok_or(
                    BalancerError::Full {
                        what: "service",
                        max: options.max_services,
                    },
                )?;
                self.service_ids.insert(id);
                self.reset_counters(map_name::SERVICE_STATS, id)?;
                self.reset_drops(id)?;
                if let Some(state) = self.program.pinned_state_mut() {
                    state.set_retired(id, Counters::default())?;
                }
                (id, 1, HashMap::new(), Counters::default())
            }
        };
        let wanted: BTreeSet<(IpAddr, u16)> =
            spec.backends.iter().map(|b| (b.addr, b.port)).collect();
        let gone: Vec<((IpAddr, u16), u32)> = backend_ids
            .iter()
            .filter(|(k, _)| !wanted.contains(k))
            .map(|(k, v)| (*k, *v))
            .collect();
        for (position, b) in spec.backends.iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(slot) =
                backend_ids.entry((b.addr, b.port))
            {
                let Some(bid) = free_id(&self.backend_ids, options.max_backends) else {
                    return Err(BalancerError::Full {
                        what: "backend",
                        max: options.max_backends,
                    });
                };
                slot.insert(bid);
                self.backend_ids.insert(bid);
                let g = self.generations.entry(bid).or_insert(0);
                *g = g.wrapping_add(1);
                self.reset_counters(map_name::BACKEND_STATS, bid)?;
            }
            let (addr, fam) = addr16(b.addr);
            let value = Backend {
                addr,
                port: b.port.to_be(),
                family: fam,
                state: if b.weight == 0 {
                    backend_state::DRAINING
                } else {
                    backend_state::ACTIVE
                },
                service_id: id as u16,
                generation: self.generations[&backend_ids[&(b.addr, b.port)]],
                hop: NextHop::default(),
                encap: spec.forwarding.encap(),
                _pad1: [0; 3],
                _pad2: [0; 3],
            };
            self.write_backend(backend_ids[&(b.addr, b.port)], &value)?;
            if let Some(state) = self.program.pinned_state_mut() {
                let meta = BackendMeta {
                    weight: b.weight,
                    position: position as u32,
                };
                state.set_backend_meta(backend_ids[&(b.addr, b.port)], meta)?;
            }
        }

        // Replies of flows that keep the client's source are recognised before the service
        // can have any.
        if spec.preserve_source {
            self.sync_vip_filter(Some(spec))?;
        }

        // Maglev over the wanted backends, written into the idle half of the ring.
        let table = maglev_table(spec, m)?;
        let new_gen = old_gen ^ 1;
        let base = (id * 2 + new_gen) * m;
        let ring: Vec<u32> = table
            .iter()
            .map(|entry| {
                entry.map_or(0, |i| {
                    let b = &spec.backends[i as usize];
                    backend_ids[&(b.addr, b.port)]
                })
            })
            .collect();
        self.program.write_ring(base as usize, &ring)?;
        // Flip: packets see the old table or the new one, never a mix.
        let service = Service {
            id,
            flags: if spec.hash_source_only {
                service_flags::HASH_SRC_ONLY
            } else {
                0
            } | if spec.preserve_source {
                service_flags::PRESERVE_SOURCE
            } else {
                0
            } | u32::from(spec.forwarding.encap()) << service_flags::ENCAP_SHIFT,
            ring_gen: new_gen,
            _pad: 0,
        };
        {
            let mut services: BpfHashMap<&mut MapData, VipKey, Service> =
                self.program.map_mut(map_name::SERVICES)?;
            services
                .insert(vip_key(&spec.key), service, 0)
                .map_err(map_err(map_name::SERVICES))?;
        }
        // Flipped: record it before anything else can fail, so the next update writes the
        // idle half, never the live one. Backends that left stay listed until released.
        self.services.insert(
            spec.key,
            Installed {
                id,
                ring_gen: new_gen,
                spec: spec.clone(),
                backend_ids,
                retired,
            },
        );
        {
            let mut services: BpfHashMap<&mut MapData, VipKey, Service> =
                self.program.map_mut(map_name::SERVICES)?;
            services
                .insert(presence_key(spec.key.vip), Service::default(), 0)
                .map_err(map_err(map_name::SERVICES))?;
        }
        for (k, bid) in gone {
            let counted = self.program.counters(map_name::BACKEND_STATS, bid)?;
            self.release_backend(bid)?;
            if let Some(installed) = self.services.get_mut(&spec.key) {
                installed.backend_ids.remove(&k);
                installed.retired = add_counters(installed.retired, counted);
                let retired = installed.retired;
                if let Some(state) = self.program.pinned_state_mut() {
                    state.set_retired(id, retired)?;
                }
            }
        }
        self.sync_vip_filter(None)?;
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<bool, BalancerError> {
        let Some(installed) = self.services.remove(key) else {
            return Ok(false);
        };
        {
            let mut services: BpfHashMap<&mut MapData, VipKey, Service> =
                self.program.map_mut(map_name::SERVICES)?;
            services
                .remove(&vip_key(key))
                .map_err(map_err(map_name::SERVICES))?;
            if !self.services.keys().any(|k| k.vip == key.vip) {
                services
                    .remove(&presence_key(key.vip))
                    .map_err(map_err(map_name::SERVICES))?;
            }
        }
        self.sync_vip_filter(None)?;
        for bid in installed.backend_ids.values() {
            self.release_backend(*bid)?;
        }
        // Tracked flows of the service need no purge: its backend ids are released, and a
        // flow never follows an id to another service or backend. Their SNAT ports are
        // reclaimed as their flows are found gone. Cached copies go now.
        self.bump_cache_epoch()?;
        self.service_ids.remove(&installed.id);
        Ok(true)
    }

    fn service(&self, key: &ServiceKey) -> Option<&ServiceSpec> {
        self.services.get(key).map(|i| &i.spec)
    }

    fn datapath_counters(&self) -> Result<Vec<(&'static str, u64)>, BalancerError> {
        let mut out = Vec::with_capacity(portico_xdp_common::stat::NAMES.len());
        for (i, name) in portico_xdp_common::stat::NAMES.iter().enumerate() {
            out.push((*name, self.program.stat(i as u32)?));
        }
        Ok(out)
    }

    fn maintain(&mut self) -> Result<(), BalancerError> {
        self.program.rebuild_filters_if_due()?;
        Ok(())
    }

    fn tracked_flows(&self) -> Result<Vec<(&'static str, u64)>, BalancerError> {
        // Every unconfirmed flow holds one reservation in REV_NAT_NEW; most have no
        // CONNTRACK_NEW entry (docs/xdp.md, "Floods").
        // Each table holds `capacity` entries: past it, its LRU evicts.
        Ok(vec![
            ("established", self.program.map_len(map_name::CONNTRACK)?),
            ("unconfirmed", self.program.map_len(map_name::REV_NAT_NEW)?),
            (
                "capacity",
                u64::from(self.program.options().conntrack_entries),
            ),
        ])
    }

    fn service_stats(&self, key: &ServiceKey) -> Result<Option<ServiceStats>, BalancerError> {
        let Some(installed) = self.services.get(key) else {
            return Ok(None);
        };
        // The service's own map counts replies; client → VIP packets are counted per backend.
        let mut service = add_counters(
            self.program
                .counters(map_name::SERVICE_STATS, installed.id)?,
            installed.retired,
        );
        let mut backends = Vec::new();
        for b in &installed.spec.backends {
            let bid = installed.backend_ids[&(b.addr, b.port)];
            let c = self.program.counters(map_name::BACKEND_STATS, bid)?;
            service = add_counters(service, c);
            backends.push(((b.addr, b.port), c));
        }
        let drops = self.program.service_drops(installed.id)?;
        Ok(Some(ServiceStats {
            service,
            backends,
            drops,
        }))
    }
}

/// In-memory balancer with the same validation, for controller tests.
#[derive(Debug, Default)]
pub struct FakeBalancer {
    /// The node configuration last set.
    pub node: NodeConfig,
    /// The services, as upserted.
    pub services: BTreeMap<ServiceKey, ServiceSpec>,
}

impl Balancer for FakeBalancer {
    fn configure_node(&mut self, config: &NodeConfig) -> Result<(), BalancerError> {
        validate_node(config)?;
        self.node = config.clone();
        Ok(())
    }

    fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<(), BalancerError> {
        validate(spec, &self.node)?;
        maglev_table(spec, maglev::MIN_M)?;
        self.services.insert(spec.key, spec.clone());
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<bool, BalancerError> {
        Ok(self.services.remove(key).is_some())
    }

    fn service(&self, key: &ServiceKey) -> Option<&ServiceSpec> {
        self.services.get(key)
    }

    fn service_stats(&self, key: &ServiceKey) -> Result<Option<ServiceStats>, BalancerError> {
        Ok(self.services.get(key).map(|s| ServiceStats {
            service: Counters::default(),
            backends: s
                .backends
                .iter()
                .map(|b| ((b.addr, b.port), Counters::default()))
                .collect(),
            drops: 0,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ServiceKey {
        ServiceKey {
            vip: "203.0.113.10".parse().unwrap(),
            port: 80,
            proto: Protocol::Tcp,
        }
    }

    fn node() -> NodeConfig {
        NodeConfig {
            snat_v4: Some("198.18.1.1".parse().unwrap()),
            ..NodeConfig::default()
        }
    }

    #[test]
    fn a_backend_of_a_family_without_a_snat_address_is_refused_with_its_index_and_address() {
        let mut fake = FakeBalancer::default();
        fake.configure_node(&node()).unwrap();
        let spec = ServiceSpec {
            key: key(),
            backends: vec![
                BackendSpec {
                    addr: "198.18.2.1".parse().unwrap(),
                    port: 8080,
                    weight: 1,
                },
                BackendSpec {
                    addr: "fd00::1".parse().unwrap(),
                    port: 8080,
                    weight: 1,
                },
            ],
            hash_source_only: false,
            preserve_source: false,
            forwarding: Forwarding::Nat,
        };
        let err = fake.upsert_service(&spec).unwrap_err().to_string();
        assert!(
            err.contains("203.0.113.10:80/tcp") && err.contains("[1] fd00::1"),
            "{err}"
        );
    }

    #[test]
    fn a_vip_without_snat_address_for_its_family_is_refused() {
        let mut fake = FakeBalancer::default();
        fake.configure_node(&node()).unwrap();
        let spec = ServiceSpec {
            key: ServiceKey {
                vip: "2001:db8::10".parse().unwrap(),
                port: 443,
                proto: Protocol::Tcp,
            },
            backends: vec![],
            hash_source_only: false,
            preserve_source: false,
            forwarding: Forwarding::Nat,
        };
        let err = fake.upsert_service(&spec).unwrap_err().to_string();
        assert!(err.contains("no IPv6 SNAT address"), "{err}");
    }

    #[test]
    fn an_empty_snat_port_range_is_refused() {
        let mut fake = FakeBalancer::default();
        let err = fake
            .configure_node(&NodeConfig {
                snat_ports: (30000, 20000),
                ..node()
            })
            .unwrap_err()
            .to_string();
        assert!(err.contains("snat_ports = 30000-20000"), "{err}");
    }

    #[test]
    fn set_backend_weight_updates_the_stored_spec() {
        let mut fake = FakeBalancer::default();
        fake.configure_node(&node()).unwrap();
        let b = BackendSpec {
            addr: "198.18.2.1".parse().unwrap(),
            port: 8080,
            weight: 1,
        };
        fake.upsert_service(&ServiceSpec {
            key: key(),
            backends: vec![b],
            hash_source_only: false,
            preserve_source: false,
            forwarding: Forwarding::Nat,
        })
        .unwrap();
        fake.set_backend_weight(&key(), b.addr, b.port, 0).unwrap();
        assert_eq!(fake.service(&key()).unwrap().backends[0].weight, 0);
        assert!(fake.set_backend_weight(&key(), b.addr, 1, 0).is_err());
    }

    #[test]
    fn a_pinned_balancer_can_move_into_the_runtime_task() {
        fn send<T: Send + 'static>() {}
        send::<XdpBalancer>();
    }

    #[test]
    fn a_config_reads_back_as_the_node_config_it_was_written_from() {
        let node = NodeConfig {
            snat_v4: Some("198.18.1.254".parse().unwrap()),
            snat_v6: Some("fd00:18:1::fe".parse().unwrap()),
            snat_ports: (21000, 21999),
            hash_seed: 7,
            tcp_timeout: Duration::from_secs(3600),
            udp_timeout: Duration::from_secs(60),
            tcp_closing_timeout: Duration::from_secs(10),
            echo_reply: false,
            xlat_prefix: "2001:db8:64::/48".parse().unwrap(),
            dsr: DsrConfig {
                source_v4: Some(("198.18.200.0".parse().unwrap(), 24)),
                source_v6: Some(("fd00:18:200::".parse().unwrap(), 112)),
                gue_port: 7777,
            },
        };
        let hz = 250;
        let jiffies = |d: Duration| (d.as_millis() * hz / 1000) as u32;
        let cfg = Config {
            snat_v4: addr_from_v4([198, 18, 1, 254])[0],
            snat_v6: addr_from_octets("fd00:18:1::fe".parse::<Ipv6Addr>().unwrap().octets()),
            snat_port_min: 21000,
            snat_port_max: 21999,
            hash_seed: 7,
            hz: hz as u32,
            tcp_timeout: jiffies(node.tcp_timeout),
            udp_timeout: jiffies(node.udp_timeout),
            tcp_closing_timeout: jiffies(node.tcp_closing_timeout),
            xlat_prefix: [
                u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]),
                u32::from_ne_bytes([0, 0x64, 0, 0]),
                0,
            ],
            xlat_prefix_len: 48,
            dsr_v4: addr_from_v4([198, 18, 200, 0])[0],
            dsr_v4_mask: u32::from_ne_bytes([0, 0, 0, 0xff]),
            dsr_v6: addr_from_octets("fd00:18:200::".parse::<Ipv6Addr>().unwrap().octets()),
            dsr_v6_mask: u32::from_ne_bytes([0, 0, 0xff, 0xff]),
            gue_port: 7777u16.to_be(),
            ..Config::default()
        };
        assert_eq!(node_config_of(&cfg), node);
    }

    #[test]
    fn the_filter_knows_vips_by_destination_and_preserved_backends_by_source() {
        let vip: IpAddr = "203.0.113.10".parse().unwrap();
        let be: IpAddr = "198.18.1.1".parse().unwrap();
        let words = vip_filter([&vip].into_iter(), [&be].into_iter());
        let has = |bit: u32| words[(bit >> 6) as usize] & (1 << (bit & 63)) != 0;
        let (a, f) = addr16(vip);
        assert!(has(vip_filter_bit(f, &a)));
        let (a, f) = addr16(be);
        assert!(has(source_filter_bit(f, &a)));
        assert!(!has(vip_filter_bit(f, &a)), "a backend is no VIP");
        assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 2);
    }

    #[test]
    fn nat64_prefixes_of_every_rfc_6052_length_are_taken_and_others_refused() {
        for ok in [
            "64:ff9b::/96",
            "2001:db8::/32",
            "2001:db8:100::/40",
            "2001:db8:122::/48",
            "2001:db8:122:300::/56",
            "2001:db8:122:344::/64",
        ] {
            let p: XlatPrefix = ok.parse().unwrap();
            assert_eq!(p.to_string(), ok);
        }
        for (bad, why) in [
            ("64:ff9b::", "ADDRESS/LENGTH"),
            ("64:ff9b::/80", "32, 40, 48, 56, 64 or 96"),
            ("64:ff9b::/128", "32, 40, 48, 56, 64 or 96"),
            ("64:ff9b::1/96", "past the prefix length"),
            ("2001:db8:1::/32", "past the prefix length"),
            ("64:ff9b:0:0:100::/96", "u octet"),
            ("nonsense/96", "IPv6 address"),
            ("64:ff9b::/x", "length"),
        ] {
            let err = bad.parse::<XlatPrefix>().unwrap_err();
            assert!(err.starts_with(bad) && err.contains(why), "{bad}: {err}");
        }
        // A node config built by hand is checked too, the field and value named.
        let node = NodeConfig {
            xlat_prefix: XlatPrefix {
                addr: "64:ff9b::1".parse().unwrap(),
                len: 96,
            },
            ..NodeConfig::default()
        };
        let err = validate_node(&node).unwrap_err().to_string();
        assert!(err.contains("xlat_prefix = 64:ff9b::1/96"), "{err}");
        assert!(validate_node(&NodeConfig::default()).is_ok());
    }

    #[test]
    fn stable_keys_differ_by_port_and_address() {
        let a: IpAddr = "198.18.2.1".parse().unwrap();
        let b: IpAddr = "198.18.2.2".parse().unwrap();
        assert_ne!(stable_key(a, 80), stable_key(a, 81));
        assert_ne!(stable_key(a, 80), stable_key(b, 80));
        assert_eq!(stable_key(a, 80), stable_key(a, 80));
    }
}
