//! Which addresses a node announces, as pure functions.

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

/// `externalTrafficPolicy` of the Service owning an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum TrafficPolicy {
    /// Any node may attract traffic.
    #[default]
    Cluster,
    /// Only nodes with a ready local endpoint may attract traffic.
    Local,
}

/// The facts about one allocated address that the decision needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressFacts {
    /// The allocated address.
    pub address: IpAddr,
    /// The Service's traffic policy.
    pub policy: TrafficPolicy,
    /// Some `BGPAdvertisement` selects this address (its pool and service selectors match).
    pub selected_by_advertisement: bool,
    /// That advertisement's node selector matches this node.
    pub node_matches: bool,
    /// This node has a ready endpoint of the Service.
    pub node_has_ready_endpoint: bool,
}

/// Whether this node announces the address: an advertisement selects it, the node
/// matches, and for `externalTrafficPolicy: Local` the node has a ready local endpoint.
pub fn should_announce(facts: &AddressFacts) -> bool {
    facts.selected_by_advertisement
        && facts.node_matches
        && (facts.policy == TrafficPolicy::Cluster || facts.node_has_ready_endpoint)
}

/// Collapse host routes into covering prefixes: IPv4 addresses into `/len_v4`, IPv6 into
/// `/len_v6` (`aggregationLength` / `aggregationLengthV6`). Lengths beyond the address
/// width are clamped. The result is sorted and free of duplicates.
pub fn aggregate(
    addresses: impl IntoIterator<Item = IpAddr>,
    len_v4: u8,
    len_v6: u8,
) -> Vec<IpNet> {
    let mut out = BTreeSet::new();
    for a in addresses {
        let len = match a {
            IpAddr::V4(_) => len_v4.min(32),
            IpAddr::V6(_) => len_v6.min(128),
        };
        if let Ok(net) = IpNet::new(a, len) {
            out.insert(net.trunc());
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> AddressFacts {
        AddressFacts {
            address: "192.0.2.10".parse().unwrap(),
            policy: TrafficPolicy::Cluster,
            selected_by_advertisement: true,
            node_matches: true,
            node_has_ready_endpoint: false,
        }
    }

    #[test]
    fn cluster_policy_announces_from_every_matching_node() {
        assert!(should_announce(&facts()));
    }

    #[test]
    fn local_policy_needs_a_ready_local_endpoint() {
        let mut f = facts();
        f.policy = TrafficPolicy::Local;
        assert!(!should_announce(&f));
        f.node_has_ready_endpoint = true;
        assert!(should_announce(&f));
    }

    #[test]
    fn unselected_address_or_unmatched_node_is_not_announced() {
        let mut f = facts();
        f.selected_by_advertisement = false;
        assert!(!should_announce(&f));
        let mut f = facts();
        f.node_matches = false;
        f.node_has_ready_endpoint = true;
        assert!(!should_announce(&f));
    }

    #[test]
    fn three_hosts_in_one_slash_24_aggregate_to_one_prefix() {
        let addrs = [
            "198.51.100.1",
            "198.51.100.7",
            "198.51.100.200",
            "fd00::1",
            "fd00::2",
        ]
        .map(|a| a.parse::<IpAddr>().unwrap());
        let got = aggregate(addrs, 24, 120);
        let want: Vec<IpNet> = vec![
            "198.51.100.0/24".parse().unwrap(),
            "fd00::/120".parse().unwrap(),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn default_lengths_keep_host_routes() {
        let addrs = ["198.51.100.1", "198.51.100.7"].map(|a| a.parse::<IpAddr>().unwrap());
        assert_eq!(aggregate(addrs, 32, 128).len(), 2);
        assert_eq!(aggregate(addrs, 40, 200).len(), 2);
    }
}
