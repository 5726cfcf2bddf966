//! `BGPAdvertisement`: which LoadBalancer addresses are announced, to which peers, from
//! which nodes, with which attributes.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as KubeLabelSelector;
use kube::{CustomResource, Resource};
use portico_announcer::{LargeCommunity, RouteAttrs};
use portico_ipam::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{label_selector, quoted, InvalidObject, Problems};

/// Well-known communities (RFC 1997, 3765, 7999, 8326, 7611) by the names FRR and BIRD use.
pub const WELL_KNOWN_COMMUNITIES: [(&str, u32); 8] = [
    ("no-export", 0xFFFF_FF01),
    ("no-advertise", 0xFFFF_FF02),
    ("no-export-subconfed", 0xFFFF_FF03),
    ("local-as", 0xFFFF_FF03),
    ("no-peer", 0xFFFF_FF04),
    ("graceful-shutdown", 0xFFFF_0000),
    ("accept-own", 0xFFFF_0001),
    ("blackhole", 0xFFFF_029A),
];

/// Which addresses to announce over BGP, and how.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats `type_ = \"string\"`, which clippy takes for a duplicate"
)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "portico.io",
    version = "v1alpha1",
    kind = "BGPAdvertisement",
    root = "BgpAdvertisement",
    shortname = "bgpadv",
    category = "portico",
    doc = "Announces the addresses of the selected pools and Services to BGP peers, from the selected nodes.",
    printcolumn(name = "LocalPref", type_ = "integer", json_path = ".spec.localPref"),
    printcolumn(name = "MED", type_ = "integer", json_path = ".spec.med"),
    printcolumn(
        name = "Aggregation",
        type_ = "integer",
        json_path = ".spec.aggregationLength"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct BgpAdvertisementSpec {
    /// AddressPools whose addresses are announced (absent: every pool).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool_selector: Option<KubeLabelSelector>,
    /// Services whose addresses are announced (absent: every Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<KubeLabelSelector>,
    /// Names of the BGPPeers to announce to (empty: every peer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// COMMUNITIES: `"65000:100"` or a well-known name (`no-export`, `no-advertise`,
    /// `no-export-subconfed`, `local-as`, `no-peer`, `graceful-shutdown`, `accept-own`,
    /// `blackhole`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// LARGE_COMMUNITIES (RFC 8092): `"4200000001:1:2"`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub large_communities: Vec<String>,
    /// LOCAL_PREF, sent to iBGP peers only (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 4_294_967_295_u32))]
    pub local_pref: Option<u32>,
    /// MULTI_EXIT_DISC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 4_294_967_295_u32))]
    pub med: Option<u32>,
    /// Announce IPv4 addresses as prefixes of this length (0-32). Default 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 32))]
    pub aggregation_length: Option<u8>,
    /// Announce IPv6 addresses as prefixes of this length (0-128). Default 128.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 128))]
    pub aggregation_length_v6: Option<u8>,
    /// Only nodes whose labels match announce (absent: every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<KubeLabelSelector>,
}

/// A valid `BGPAdvertisement` as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidAdvertisement {
    /// The object's name.
    pub name: String,
    /// Attributes of every route it announces.
    pub attrs: RouteAttrs,
    /// Which AddressPools (by their labels).
    pub pool_selector: LabelSelector,
    /// Which Services (by their labels).
    pub service_selector: LabelSelector,
    /// Which nodes announce.
    pub node_selector: LabelSelector,
    /// BGPPeer names; empty means every peer.
    pub peers: Vec<String>,
    /// IPv4 prefix length of announcements.
    pub aggregation_length: u8,
    /// IPv6 prefix length of announcements.
    pub aggregation_length_v6: u8,
}

impl BgpAdvertisement {
    /// Checks the spec and turns it into plain data with the announcer's [`RouteAttrs`].
    ///
    /// # Errors
    /// Every problem of the spec, each naming the field and value.
    pub fn to_advertisement(&self) -> Result<ValidAdvertisement, InvalidObject> {
        let name = self.meta().name.as_deref().unwrap_or_default();
        validate_advertisement(name, &self.spec)
    }
}

/// Parses a standard community: `ASN:value` (each 0-65535) or a well-known name.
///
/// # Errors
/// What is wrong, worded to follow the quoted value.
pub fn parse_community(s: &str) -> Result<u32, &'static str> {
    if let Some((_, value)) = WELL_KNOWN_COMMUNITIES
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(s))
    {
        return Ok(*value);
    }
    let (asn, value) = s.split_once(':').ok_or(
        "is not a community: use ASN:value (each 0-65535) or a well-known name such as no-export",
    )?;
    let part = |p: &str| {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse::<u16>().ok()
    };
    match (part(asn), part(value)) {
        (Some(a), Some(v)) => Ok(u32::from(a) << 16 | u32::from(v)),
        _ => Err("is not a valid community: both parts of ASN:value must be 0-65535"),
    }
}

/// Parses a large community `global:local1:local2` (each 0-4294967295).
///
/// # Errors
/// What is wrong, worded to follow the quoted value.
pub fn parse_large_community(s: &str) -> Result<LargeCommunity, &'static str> {
    let parts: Vec<&str> = s.split(':').collect();
    let [g, l1, l2] = parts[..] else {
        return Err("is not a large community: use global:local1:local2");
    };
    let part = |p: &str| {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        p.parse::<u32>().ok()
    };
    match (part(g), part(l1), part(l2)) {
        (Some(global_admin), Some(local_data1), Some(local_data2)) => Ok(LargeCommunity {
            global_admin,
            local_data1,
            local_data2,
        }),
        _ => Err("is not a valid large community: each part must be 0-4294967295"),
    }
}

/// Checks `spec` (of the `BGPAdvertisement` called `name`) and turns it into plain data.
///
/// # Errors
/// Every problem of the spec, each naming the field and value.
pub fn validate_advertisement(
    name: &str,
    spec: &BgpAdvertisementSpec,
) -> Result<ValidAdvertisement, InvalidObject> {
    let mut p = Problems::default();
    let pool_selector = label_selector(&mut p, "spec.poolSelector", spec.pool_selector.as_ref());
    let service_selector = label_selector(
        &mut p,
        "spec.serviceSelector",
        spec.service_selector.as_ref(),
    );
    let node_selector = label_selector(&mut p, "spec.nodeSelector", spec.node_selector.as_ref());

    let mut peers = Vec::new();
    for (i, peer) in spec.peers.iter().enumerate() {
        if peer.is_empty() {
            p.push(
                format!("spec.peers[{i}]"),
                quoted(peer),
                "is not a BGPPeer name",
            );
        } else if !peers.contains(peer) {
            peers.push(peer.clone());
        }
    }

    let mut communities = Vec::new();
    for (i, c) in spec.communities.iter().enumerate() {
        match parse_community(c) {
            Ok(c) if !communities.contains(&c) => communities.push(c),
            Ok(_) => {}
            Err(problem) => p.push(format!("spec.communities[{i}]"), quoted(c), problem),
        }
    }
    let mut large_communities = Vec::new();
    for (i, c) in spec.large_communities.iter().enumerate() {
        match parse_large_community(c) {
            Ok(c) if !large_communities.contains(&c) => large_communities.push(c),
            Ok(_) => {}
            Err(problem) => p.push(format!("spec.largeCommunities[{i}]"), quoted(c), problem),
        }
    }

    let aggregation_length = spec.aggregation_length.unwrap_or(32);
    if aggregation_length > 32 {
        p.push(
            "spec.aggregationLength",
            aggregation_length,
            "is longer than an IPv4 prefix can be (0-32)",
        );
    }
    let aggregation_length_v6 = spec.aggregation_length_v6.unwrap_or(128);
    if aggregation_length_v6 > 128 {
        p.push(
            "spec.aggregationLengthV6",
            aggregation_length_v6,
            "is longer than an IPv6 prefix can be (0-128)",
        );
    }

    p.finish(
        "BGPAdvertisement",
        name,
        ValidAdvertisement {
            name: name.to_owned(),
            attrs: RouteAttrs {
                med: spec.med,
                local_pref: spec.local_pref,
                communities,
                large_communities,
            },
            pool_selector,
            service_selector,
            node_selector,
            peers,
            aggregation_length,
            aggregation_length_v6,
        },
    )
}
