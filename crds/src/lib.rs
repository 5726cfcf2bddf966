//! Kubernetes API types of Portico's custom resources (group `portico.io`), and their
//! conversion to and from plain data: the allocator's ([`portico_ipam`]) for
//! `AddressPool`, the BGP announcer's ([`portico_announcer`]) for `BGPPeer` and
//! `BGPAdvertisement`.

mod bgp_advertisement;
mod bgp_peer;
mod node_status;
mod service;
mod validation;

pub use bgp_advertisement::{
    parse_community, parse_large_community, validate_advertisement, BgpAdvertisement,
    BgpAdvertisementSpec, ValidAdvertisement, WELL_KNOWN_COMMUNITIES,
};
pub use bgp_peer::{
    validate_peer, BgpPeer, BgpPeerNodeStatus, BgpPeerSpec, BgpPeerStatus, GracefulRestart,
    PeerInputs, PrefixCounts, SecretKeyRef, ValidPeer, BGP_PORT,
};
pub use node_status::{
    DatapathSummary, PeerSession, PorticoNode, PorticoNodeSpec, PorticoNodeStatus,
};
pub use service::{
    ingress, service_conditions, service_consumer, ClassPolicy, ALLOCATED_CONDITION,
    LOAD_BALANCER_CLASS,
};
pub use validation::{FieldError, InvalidObject};

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector as KubeLabelSelector, Time,
};
use kube::{CustomResource, CustomResourceExt, Resource};
use portico_ipam::{
    Pool, PoolState, PoolStatus, RawBlock, RawPoolSpec, RawRequirement, RawSelector, SpecErrors,
    Usage,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CRD could not be written as YAML.
    #[error("cannot write the CRD as YAML: {0}")]
    Yaml(#[from] serde_saphyr::ser::Error),
    /// The CRD could not be turned into JSON.
    #[error("cannot write the CRD as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Which addresses an AddressPool holds, and who may use them.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats `type_ = \"string\"`, which clippy takes for a duplicate"
)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "portico.io",
    version = "v1alpha1",
    kind = "AddressPool",
    shortname = "lbpool",
    category = "portico",
    status = "AddressPoolStatus",
    doc = "A pool of LoadBalancer addresses that Portico hands out to Services and Gateways.",
    printcolumn(name = "Total", type_ = "string", json_path = ".status.total"),
    printcolumn(name = "Used", type_ = "string", json_path = ".status.used"),
    printcolumn(name = "Available", type_ = "string", json_path = ".status.available"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AddressPoolSpec {
    /// Address blocks: each either `{cidr}` or `{start, stop}`. IPv4 and IPv6 may mix.
    #[schemars(length(min = 1, max = 64))]
    pub blocks: Vec<Block>,
    /// Whether the network and broadcast address of each CIDR may be handed out
    /// (/31, /32, /127 and /128 always use every address).
    #[serde(rename = "allowFirstLastIPs", default = "yes")]
    pub allow_first_last_ips: bool,
    /// Skip every IPv4 address ending in .0 or .255.
    #[serde(rename = "avoidBuggyIPs", default)]
    pub avoid_buggy_ips: bool,
    /// Only consumers whose labels match may use the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<KubeLabelSelector>,
    /// Only consumers in namespaces whose labels match may use the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<KubeLabelSelector>,
    /// Only consumers in these namespaces may use the pool (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Pools with a lower number are tried first; pools without a priority are tried
    /// after every pool with one (as in MetalLB); ties go by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    /// Whether consumers that ask for no pool and no address get addresses from here.
    #[serde(default = "yes")]
    pub auto_assign: bool,
    /// No new allocations; existing ones stay.
    #[serde(default)]
    pub disabled: bool,
}

fn yes() -> bool {
    true
}

/// A block of addresses: set `cidr`, or `start` and `stop`.
///
/// The API server checks the shape (CEL, Kubernetes 1.31+ IP library); that `stop` is not
/// before `start` is checked by the controller (`InvalidSpec`), as CEL cannot order IPs.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "has(self.cidr) ? !has(self.start) && !has(self.stop) : has(self.start) && has(self.stop)",
     "message": "set cidr, or start and stop"},
    {"rule": "!has(self.cidr) || isCIDR(self.cidr)", "message": "cidr must be a CIDR such as 10.0.10.0/24"},
    {"rule": "!has(self.start) || isIP(self.start)", "message": "start must be an IP address"},
    {"rule": "!has(self.stop) || isIP(self.stop)", "message": "stop must be an IP address"},
    {"rule": "!has(self.start) || !has(self.stop) || !isIP(self.start) || !isIP(self.stop) || ip(self.start).family() == ip(self.stop).family()",
     "message": "start and stop must be of one family"}
]))]
pub struct Block {
    /// A CIDR such as `10.0.10.0/24` or `fd00:10::/64`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub cidr: Option<String>,
    /// First address of an inclusive range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub start: Option<String>,
    /// Last address of an inclusive range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub stop: Option<String>,
}

/// What Portico observed about a pool.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AddressPoolStatus {
    /// `Ready`, plus `Conflict` (naming the older overlapping pool) or `InvalidSpec`
    /// (naming the field and value).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// IPv4 counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<FamilyCounts>,
    /// IPv6 counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<FamilyCounts>,
    /// Usable addresses of both families (a decimal string: IPv6 counts exceed 64 bits).
    #[serde(default)]
    pub total: String,
    /// Allocated addresses of both families.
    #[serde(default)]
    pub used: String,
    /// Addresses free for new allocations.
    #[serde(default)]
    pub available: String,
}

/// Address counts of one family, as decimal strings (a /64 has 2^64 addresses).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct FamilyCounts {
    /// Usable addresses (saturating at 2^128-1).
    pub total: String,
    /// Allocated addresses.
    pub used: String,
    /// Free addresses.
    pub available: String,
}

pub(crate) fn raw_selector(selector: &KubeLabelSelector) -> RawSelector {
    RawSelector {
        match_labels: selector.match_labels.clone().unwrap_or_default(),
        match_expressions: selector
            .match_expressions
            .iter()
            .flatten()
            .map(|r| RawRequirement {
                key: r.key.clone(),
                operator: r.operator.clone(),
                values: r.values.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

impl AddressPoolSpec {
    /// The spec as the allocator's unchecked plain data.
    #[must_use]
    pub fn to_raw(&self) -> RawPoolSpec {
        RawPoolSpec {
            blocks: self
                .blocks
                .iter()
                .map(|b| RawBlock {
                    cidr: b.cidr.clone(),
                    start: b.start.clone(),
                    stop: b.stop.clone(),
                })
                .collect(),
            allow_first_last_ips: Some(self.allow_first_last_ips),
            avoid_buggy_ips: Some(self.avoid_buggy_ips),
            service_selector: self.service_selector.as_ref().map(raw_selector),
            namespace_selector: self.namespace_selector.as_ref().map(raw_selector),
            namespaces: self.namespaces.clone(),
            priority: self.priority,
            auto_assign: Some(self.auto_assign),
            disabled: Some(self.disabled),
        }
    }
}

impl AddressPool {
    /// Validates the pool into the allocator's form.
    ///
    /// # Errors
    /// Every problem of the spec, each naming the field and value.
    pub fn to_pool(&self) -> Result<Pool, SpecErrors> {
        let name = self.meta().name.as_deref().unwrap_or_default();
        let created_at = self
            .meta()
            .creation_timestamp
            .as_ref()
            .map_or(0, |t| t.0.as_second());
        Pool::parse(name, created_at, &self.spec.to_raw())
    }
}

fn counts(usage: &Usage) -> FamilyCounts {
    FamilyCounts {
        total: usage.total.to_string(),
        used: usage.used.to_string(),
        available: usage.available.to_string(),
    }
}

fn condition(type_: &str, ok: bool, reason: &str, message: String, now: &Time) -> Condition {
    Condition {
        type_: type_.to_owned(),
        status: if ok { "True" } else { "False" }.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time: now.clone(),
        observed_generation: None,
    }
}

/// The status of a pool the allocator uses.
///
/// `previous` keeps transition times of conditions whose status did not change.
#[must_use]
pub fn status_of(
    status: &PoolStatus,
    has_v4: bool,
    has_v6: bool,
    previous: Option<&AddressPoolStatus>,
    now: &Time,
) -> AddressPoolStatus {
    let mut conditions = match &status.state {
        PoolState::Ready => vec![condition(
            "Ready",
            true,
            "Ready",
            "pool is in use".into(),
            now,
        )],
        PoolState::Conflict { with } => vec![
            condition(
                "Ready",
                false,
                "Conflict",
                format!("overlaps older pool {with}; not used"),
                now,
            ),
            condition(
                "Conflict",
                true,
                "Overlap",
                format!("overlaps older pool {with}"),
                now,
            ),
        ],
    };
    keep_transition_times(&mut conditions, previous);
    let sum = |f: fn(&Usage) -> u128| f(&status.v4).saturating_add(f(&status.v6)).to_string();
    AddressPoolStatus {
        conditions,
        ipv4: has_v4.then(|| counts(&status.v4)),
        ipv6: has_v6.then(|| counts(&status.v6)),
        total: sum(|u| u.total),
        used: sum(|u| u.used),
        available: sum(|u| u.available),
    }
}

/// The status of a pool whose spec is invalid: `Ready=False` and `InvalidSpec` with the
/// problems. Counts of the previous status are kept (the last valid spec stays in force).
#[must_use]
pub fn invalid_status(
    errors: &SpecErrors,
    previous: Option<&AddressPoolStatus>,
    now: &Time,
) -> AddressPoolStatus {
    let mut conditions = vec![
        condition("Ready", false, "InvalidSpec", errors.to_string(), now),
        condition("InvalidSpec", true, "InvalidSpec", errors.to_string(), now),
    ];
    keep_transition_times(&mut conditions, previous);
    AddressPoolStatus {
        conditions,
        ..previous.cloned().unwrap_or_else(|| AddressPoolStatus {
            total: "0".into(),
            used: "0".into(),
            available: "0".into(),
            ..AddressPoolStatus::default()
        })
    }
}

fn keep_transition_times(conditions: &mut [Condition], previous: Option<&AddressPoolStatus>) {
    let Some(previous) = previous else { return };
    let before: BTreeMap<&str, &Condition> = previous
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), c))
        .collect();
    for c in conditions {
        if let Some(old) = before.get(c.type_.as_str()) {
            if old.status == c.status {
                c.last_transition_time = old.last_transition_time.clone();
            }
        }
    }
}

/// Turns schemars' Rust integer formats (`uint8`, `uint32`, …) into the ones Kubernetes
/// defines (`int32`, `int64`), and float bounds (`255.0`) into integers.
fn kubernetes_int_formats(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some("integer") {
                let format = match map.get("format").and_then(Value::as_str) {
                    Some("uint8" | "uint16" | "int8" | "int16") => Some("int32"),
                    Some("uint32" | "uint64" | "uint" | "uint128") => Some("int64"),
                    _ => None,
                };
                if let Some(f) = format {
                    map.insert("format".into(), f.into());
                }
                for bound in ["minimum", "maximum"] {
                    if let Some(x) = map.get(bound).and_then(Value::as_f64) {
                        #[allow(
                            clippy::cast_possible_truncation,
                            reason = "schema bounds of Rust integers are whole numbers within i64"
                        )]
                        map.insert(bound.into(), Value::from(x as i64));
                    }
                }
            }
            for child in map.values_mut() {
                kubernetes_int_formats(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(kubernetes_int_formats),
        _ => {}
    }
}

/// File name of the AddressPool CRD under `deploy/crds/`.
pub const ADDRESS_POOL_FILE: &str = "addresspools.portico.io.yaml";

/// File name of the BGPPeer CRD under `deploy/crds/`.
pub const BGP_PEER_FILE: &str = "bgppeers.portico.io.yaml";

/// File name of the BGPAdvertisement CRD under `deploy/crds/`.
pub const BGP_ADVERTISEMENT_FILE: &str = "bgpadvertisements.portico.io.yaml";

/// File name of the PorticoNode CRD under `deploy/crds/`.
pub const PORTICO_NODE_FILE: &str = "porticonodes.portico.io.yaml";

/// Every CRD as `(file name, YAML)`, generated from the Rust types.
///
/// # Errors
/// If serialising fails.
pub fn crd_files() -> Result<Vec<(&'static str, String)>, Error> {
    let crds = [
        (ADDRESS_POOL_FILE, AddressPool::crd()),
        (BGP_PEER_FILE, BgpPeer::crd()),
        (BGP_ADVERTISEMENT_FILE, BgpAdvertisement::crd()),
        (PORTICO_NODE_FILE, PorticoNode::crd()),
    ];
    crds.into_iter()
        .map(|(file, crd)| {
            let mut value = serde_json::to_value(&crd)?;
            kubernetes_int_formats(&mut value);
            let yaml = serde_saphyr::to_string(&value)?;
            Ok((
                file,
                format!("# Generated by `portico crds`; do not edit.\n{yaml}"),
            ))
        })
        .collect()
}
