//! `PorticoNode`: what one node's agent is doing, one object per node, written only by
//! that node's agent (server-side apply on `/status`), so no object is read-modify-written
//! by every node.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::PrefixCounts;

/// One node's agent: its BGP sessions and datapath. The object is named after the node
/// and owned by its Node, so it goes when the Node goes.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats `type_ = \"string\"`, which clippy takes for a duplicate"
)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "portico.io",
    version = "v1alpha1",
    kind = "PorticoNode",
    status = "PorticoNodeStatus",
    shortname = "pnode",
    category = "portico",
    doc = "What Portico's agent on one node is doing: BGP sessions, announced addresses, datapath.",
    printcolumn(name = "Peers", type_ = "string", json_path = ".status.peersSummary"),
    printcolumn(
        name = "Announced",
        type_ = "integer",
        json_path = ".status.announcedCount"
    ),
    printcolumn(
        name = "XDP Services",
        type_ = "integer",
        json_path = ".status.datapath.services"
    ),
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
pub struct PorticoNodeSpec {}

/// What the node's agent observed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PorticoNodeStatus {
    /// `Ready`: every applier (BGP, XDP, held addresses) applied the last plan.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// E.g. `2/3 Established`.
    #[serde(default)]
    pub peers_summary: String,
    /// One entry per BGP peer of this node, by name.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub peers: Vec<PeerSession>,
    /// How many addresses this node announces.
    #[serde(default)]
    pub announced_count: i32,
    /// The addresses this node announces (held on its local link).
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "set"))]
    pub announced: Vec<String>,
    /// The XDP balancer.
    #[serde(default)]
    pub datapath: DatapathSummary,
    /// Problems with objects this node reads (peers, advertisements, Secrets).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// This node's session with one BGP peer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerSession {
    /// The BGPPeer's name.
    pub name: String,
    /// The peer's address.
    pub address: String,
    /// FSM state: Idle, Connect, Active, OpenSent, OpenConfirm or Established.
    pub state: String,
    /// When the session reached Established (uptime = now - this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established_since: Option<Time>,
    /// Prefixes sent, per family.
    #[serde(default)]
    pub prefixes_sent: PrefixCounts,
    /// The last transport failure or NOTIFICATION.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The node's XDP balancer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatapathSummary {
    /// Whether the XDP program is attached (false: no datapath on this node).
    #[serde(default)]
    pub attached: bool,
    /// Listeners (VIP, port, protocol) programmed.
    #[serde(default)]
    pub services: i32,
    /// Backends across them.
    #[serde(default)]
    pub backends: i32,
    /// Listeners the balancer refused, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}
