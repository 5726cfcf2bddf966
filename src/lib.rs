//! Portico as a system: the desired-state model that joins IPAM, the BGP speaker and the
//! XDP balancer, and the runtimes that drive it.
//!
//! ```text
//! source (manifest folder | Kubernetes watchers)
//!   → world::Event → world::World                       (one typed snapshot)
//!   → plan::Ipam::reconcile → plan::IpamOutcome         (pure: allocations)
//!   → plan::node_plan → plan::NodePlan                  (pure: routes, XDP services, addresses)
//!   → apply::{SpeakerApplier, BalancerApplier, HolderApplier}   (only the difference)
//! ```

pub mod agent;
pub mod apply;
pub mod bigtcp;
pub mod controller;
pub mod gateway;
pub mod k8s;
pub mod manifest;
pub mod metrics;
pub mod plan;
pub mod standalone;
pub mod state;
pub mod status;
pub mod world;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Addresses found on the node's interfaces.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// First global IPv4 address.
    pub v4: Option<Ipv4Addr>,
    /// First global (not link-local) IPv6 address.
    pub v6: Option<Ipv6Addr>,
}

impl NodeAddresses {
    /// The first usable addresses of `iface`, or of any interface but loopback when `iface`
    /// is `None` or has none of a family.
    #[must_use]
    pub fn detect(iface: Option<&str>) -> Self {
        let all = interface_addresses();
        let pick = |only: Option<&str>| {
            let mut found = NodeAddresses::default();
            for (name, ip) in &all {
                if only.is_some_and(|o| o != name) || name == "lo" {
                    continue;
                }
                match ip {
                    IpAddr::V4(a)
                        if found.v4.is_none() && !a.is_loopback() && !a.is_link_local() =>
                    {
                        found.v4 = Some(*a);
                    }
                    IpAddr::V6(a)
                        if found.v6.is_none() && !a.is_loopback() && !a.is_unicast_link_local() =>
                    {
                        found.v6 = Some(*a);
                    }
                    _ => {}
                }
            }
            found
        };
        let on_iface = pick(iface);
        let anywhere = pick(None);
        NodeAddresses {
            v4: on_iface.v4.or(anywhere.v4),
            v6: on_iface.v6.or(anywhere.v6),
        }
    }
}

/// Every (interface, address) pair of this network namespace.
fn interface_addresses() -> Vec<(String, IpAddr)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`; on success we free it below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: ifa_addr is non-null and points to a sockaddr whose family says its type.
        let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
        let ip = match family {
            libc::AF_INET => {
                // SAFETY: the family is AF_INET, so the sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)))
            }
            libc::AF_INET6 => {
                // SAFETY: the family is AF_INET6, so the sockaddr is a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr))
            }
            _ => continue,
        };
        out.push((name, ip));
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}
