//! Aggregation of announced addresses into covering prefixes, as a pure function.
//!
//! Which addresses a node announces is decided by the caller (the root package, with
//! `portico_ipam::TrafficPolicy`).

use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;

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
