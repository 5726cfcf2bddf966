//! Reading a consumer's requests from its annotations (Portico's own and, for migration,
//! MetalLB's and Cilium LB-IPAM's).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::consumer::{CrossNamespace, Requests, Sharing};
use crate::family::Family;

/// `portico.io/ips`: comma-separated addresses, at most one per family.
pub const IPS: &str = "portico.io/ips";
/// `portico.io/pool`: the name of the pool to allocate from.
pub const POOL: &str = "portico.io/pool";
/// `portico.io/sharing-key`: consumers with the same key may share an address.
pub const SHARING_KEY: &str = "portico.io/sharing-key";
/// `portico.io/sharing-cross-namespace`: `true`/`*`, `false`, or a namespace list.
pub const SHARING_CROSS_NAMESPACE: &str = "portico.io/sharing-cross-namespace";

/// Each request, its Portico annotation first, then the aliases accepted for migration:
/// MetalLB's (and its older `metallb.universe.tf/` spelling) and Cilium LB-IPAM's (and its
/// older `io.cilium/lb-ipam-` spelling).
pub const ALIASES: [(&str, &[&str]); 4] = [
    (
        IPS,
        &[
            "metallb.io/loadBalancerIPs",
            "metallb.universe.tf/loadBalancerIPs",
            "lbipam.cilium.io/ips",
            "io.cilium/lb-ipam-ips",
        ],
    ),
    (
        POOL,
        &[
            "metallb.io/address-pool",
            "metallb.universe.tf/address-pool",
        ],
    ),
    (
        SHARING_KEY,
        &[
            "metallb.io/allow-shared-ip",
            "metallb.universe.tf/allow-shared-ip",
            "lbipam.cilium.io/sharing-key",
            "io.cilium/lb-ipam-sharing-key",
        ],
    ),
    (
        SHARING_CROSS_NAMESPACE,
        &[
            "lbipam.cilium.io/sharing-cross-namespace",
            "io.cilium/lb-ipam-sharing-cross-namespace",
        ],
    ),
];

/// A problem with a consumer's requests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// An address that does not parse.
    #[error("{key}: {value:?} is not a valid IP address")]
    InvalidIp {
        /// The annotation or field.
        key: String,
        /// The offending entry.
        value: String,
    },
    /// Two addresses of the same family.
    #[error("{key}: {value:?} lists more than one {family} address")]
    TwoOfOneFamily {
        /// The annotation or field.
        key: String,
        /// The whole value.
        value: String,
        /// The repeated family.
        family: Family,
    },
    /// An annotation that must not be empty is.
    #[error("{key}: must not be empty")]
    Empty {
        /// The annotation.
        key: String,
    },
    /// Two spellings of one request disagree.
    #[error("{first}: {first_value:?} disagrees with {second}: {second_value:?}")]
    Conflicting {
        /// The first annotation or field.
        first: String,
        /// Its value.
        first_value: String,
        /// The second one.
        second: String,
        /// Its value.
        second_value: String,
    },
    /// A cross-namespace opt-in without a sharing key.
    #[error("{key}: is set but no sharing key is")]
    CrossNamespaceWithoutKey {
        /// The annotation.
        key: String,
    },
}

/// Reads the requests of a consumer from its annotations and its `spec.loadBalancerIP`.
///
/// # Errors
/// Every problem found; a consumer with bad requests should get no address and an event.
pub fn parse_requests(
    annotations: &BTreeMap<String, String>,
    load_balancer_ip: Option<&str>,
) -> Result<Requests, Vec<RequestError>> {
    let mut errors = Vec::new();
    let mut requests = Requests::default();

    let ips_sources = present(annotations, 0, load_balancer_ip);
    if let Some((key, value)) = agreed(&ips_sources, &mut errors, |v| {
        parse_ip_list(&ips_sources[0].0, v).ok()
    }) {
        match parse_ip_list(&key, &value) {
            Ok(ips) => requests.ips = ips,
            Err(e) => errors.push(e),
        }
    }
    let pool_sources = present(annotations, 1, None);
    if let Some((key, value)) = agreed(&pool_sources, &mut errors, |v| Some(v.trim().to_owned())) {
        if value.trim().is_empty() {
            errors.push(RequestError::Empty { key });
        } else {
            requests.pool = Some(value.trim().to_owned());
        }
    }
    let key_sources = present(annotations, 2, None);
    let sharing_key = agreed(&key_sources, &mut errors, |v| Some(v.trim().to_owned()));
    let cross_sources = present(annotations, 3, None);
    let cross = agreed(&cross_sources, &mut errors, |v| {
        Some(parse_cross_namespace(v))
    });
    match (sharing_key, cross) {
        (Some((key, value)), cross) => {
            if value.trim().is_empty() {
                errors.push(RequestError::Empty { key });
            } else {
                requests.sharing = Some(Sharing {
                    key: value.trim().to_owned(),
                    cross_namespace: cross
                        .map(|(_, v)| parse_cross_namespace(&v))
                        .unwrap_or_default(),
                });
            }
        }
        (None, Some((key, _))) => errors.push(RequestError::CrossNamespaceWithoutKey { key }),
        (None, None) => {}
    }
    if errors.is_empty() {
        Ok(requests)
    } else {
        Err(errors)
    }
}

/// The `(key, value)` pairs present for request number `which` of [`ALIASES`], Portico's
/// own first; `spec.loadBalancerIP` counts as one more spelling of the address request.
fn present(
    annotations: &BTreeMap<String, String>,
    which: usize,
    extra: Option<&str>,
) -> Vec<(String, String)> {
    let (own, aliases) = ALIASES[which];
    let mut found: Vec<(String, String)> = std::iter::once(own)
        .chain(aliases.iter().copied())
        .filter_map(|k| annotations.get(k).map(|v| (k.to_owned(), v.clone())))
        .collect();
    if let Some(ip) = extra.filter(|ip| !ip.trim().is_empty()) {
        found.push(("spec.loadBalancerIP".to_owned(), ip.to_owned()));
    }
    found
}

/// The first spelling, after checking that the others mean the same (compared through
/// `meaning`; a value without meaning is reported by the caller, not here).
fn agreed<T: PartialEq>(
    sources: &[(String, String)],
    errors: &mut Vec<RequestError>,
    meaning: impl Fn(&str) -> Option<T>,
) -> Option<(String, String)> {
    let (first_key, first_value) = sources.first()?;
    let first_meaning = meaning(first_value);
    for (key, value) in &sources[1..] {
        let same = match (&first_meaning, meaning(value)) {
            (Some(a), Some(b)) => *a == b,
            _ => value.trim() == first_value.trim(),
        };
        if !same {
            errors.push(RequestError::Conflicting {
                first: first_key.clone(),
                first_value: first_value.clone(),
                second: key.clone(),
                second_value: value.clone(),
            });
        }
    }
    Some((first_key.clone(), first_value.clone()))
}

fn parse_ip_list(key: &str, value: &str) -> Result<Vec<IpAddr>, RequestError> {
    let mut ips: Vec<IpAddr> = Vec::new();
    for entry in value.split(',').map(str::trim) {
        let ip: IpAddr = entry.parse().map_err(|_| RequestError::InvalidIp {
            key: key.to_owned(),
            value: entry.to_owned(),
        })?;
        if ips.iter().any(|other| Family::of(*other) == Family::of(ip)) {
            return Err(RequestError::TwoOfOneFamily {
                key: key.to_owned(),
                value: value.to_owned(),
                family: Family::of(ip),
            });
        }
        ips.push(ip);
    }
    ips.sort();
    Ok(ips)
}

fn parse_cross_namespace(value: &str) -> CrossNamespace {
    match value.trim() {
        "" | "false" => CrossNamespace::Denied,
        "true" | "*" => CrossNamespace::Any,
        list => {
            let namespaces: BTreeSet<String> = list
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_owned)
                .collect();
            if namespaces.contains("*") {
                CrossNamespace::Any
            } else {
                CrossNamespace::Namespaces(namespaces)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_annotations_means_no_requests() {
        assert_eq!(
            parse_requests(&annotations(&[]), None),
            Ok(Requests::default())
        );
    }

    #[test]
    fn portico_annotations_are_read() {
        let r = parse_requests(
            &annotations(&[
                (IPS, "10.0.0.7, fd00::7"),
                (POOL, "edge"),
                (SHARING_KEY, "dns"),
                (SHARING_CROSS_NAMESPACE, "true"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(r.ips, vec![ip("10.0.0.7"), ip("fd00::7")]);
        assert_eq!(r.pool.as_deref(), Some("edge"));
        assert_eq!(
            r.sharing,
            Some(Sharing {
                key: "dns".into(),
                cross_namespace: CrossNamespace::Any
            })
        );
    }

    #[test]
    fn metallb_aliases_are_accepted() {
        let r = parse_requests(
            &annotations(&[
                ("metallb.io/loadBalancerIPs", "10.0.0.8"),
                ("metallb.io/address-pool", "old"),
                ("metallb.io/allow-shared-ip", "k"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(r.ips, vec![ip("10.0.0.8")]);
        assert_eq!(r.pool.as_deref(), Some("old"));
        assert_eq!(r.sharing.unwrap().key, "k");
    }

    #[test]
    fn cilium_aliases_are_accepted_with_a_namespace_list() {
        let r = parse_requests(
            &annotations(&[
                ("lbipam.cilium.io/ips", "fd00::9"),
                ("lbipam.cilium.io/sharing-key", "k"),
                ("lbipam.cilium.io/sharing-cross-namespace", "a, b"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(r.ips, vec![ip("fd00::9")]);
        let cross = r.sharing.unwrap().cross_namespace;
        assert!(cross.allows("a") && cross.allows("b") && !cross.allows("c"));
    }

    // MetalLB still reads its metallb.universe.tf/ annotations and Cilium its
    // io.cilium/lb-ipam- ones; manifests written for older releases keep working.
    #[test]
    fn older_metallb_and_cilium_spellings_are_accepted() {
        let r = parse_requests(
            &annotations(&[
                ("metallb.universe.tf/loadBalancerIPs", "10.0.0.8"),
                ("metallb.universe.tf/address-pool", "old"),
                ("io.cilium/lb-ipam-sharing-key", "k"),
                ("io.cilium/lb-ipam-sharing-cross-namespace", "*"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(r.ips, vec![ip("10.0.0.8")]);
        assert_eq!(r.pool.as_deref(), Some("old"));
        let sharing = r.sharing.unwrap();
        assert_eq!(sharing.key, "k");
        assert_eq!(sharing.cross_namespace, CrossNamespace::Any);
    }

    #[test]
    fn load_balancer_ip_field_is_a_request() {
        let r = parse_requests(&annotations(&[]), Some("10.0.0.9")).unwrap();
        assert_eq!(r.ips, vec![ip("10.0.0.9")]);
    }

    #[test]
    fn invalid_address_is_reported_with_its_annotation() {
        let e = parse_requests(&annotations(&[(IPS, "10.0.0.1,10.0.0.300")]), None).unwrap_err();
        assert_eq!(
            e[0].to_string(),
            r#"portico.io/ips: "10.0.0.300" is not a valid IP address"#
        );
    }

    #[test]
    fn two_addresses_of_one_family_are_rejected() {
        let e = parse_requests(&annotations(&[(IPS, "10.0.0.1,10.0.0.2")]), None).unwrap_err();
        assert!(matches!(e[0], RequestError::TwoOfOneFamily { .. }));
    }

    #[test]
    fn disagreeing_spellings_are_rejected() {
        let e = parse_requests(
            &annotations(&[(POOL, "a"), ("metallb.io/address-pool", "b")]),
            None,
        )
        .unwrap_err();
        assert_eq!(
            e[0].to_string(),
            r#"portico.io/pool: "a" disagrees with metallb.io/address-pool: "b""#
        );
    }

    #[test]
    fn agreeing_spellings_are_fine_even_when_written_differently() {
        let r = parse_requests(
            &annotations(&[
                (IPS, "fd00::1,10.0.0.1"),
                ("metallb.io/loadBalancerIPs", "10.0.0.1, fd00:0::1"),
            ]),
            None,
        )
        .unwrap();
        assert_eq!(r.ips.len(), 2);
    }

    #[test]
    fn empty_sharing_key_is_rejected() {
        let e = parse_requests(&annotations(&[(SHARING_KEY, " ")]), None).unwrap_err();
        assert_eq!(
            e,
            vec![RequestError::Empty {
                key: SHARING_KEY.into()
            }]
        );
    }

    #[test]
    fn cross_namespace_without_key_is_rejected() {
        let e =
            parse_requests(&annotations(&[(SHARING_CROSS_NAMESPACE, "true")]), None).unwrap_err();
        assert!(matches!(
            e[0],
            RequestError::CrossNamespaceWithoutKey { .. }
        ));
    }
}
