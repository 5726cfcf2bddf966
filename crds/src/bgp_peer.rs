//! `BGPPeer`: one BGP neighbour of the nodes a selector picks, and what each node's
//! session with it looks like.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector as KubeLabelSelector, Time};
use k8s_openapi::jiff::Timestamp;
use kube::{CustomResource, Resource};
use portico_announcer::config::{PeerConfig, TtlMode};
use portico_announcer::session::{GracefulRestartConfig, SessionStatus};
use portico_announcer::{Family, SessionConfig};
use portico_ipam::LabelSelector;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::validation::{check_asn, label_selector, quoted, InvalidObject, Problems};

/// The BGP port.
pub const BGP_PORT: u16 = 179;

/// Longest TCP MD5 key Linux accepts (`TCP_MD5SIG_MAXKEYLEN`).
const MD5_MAX_KEY_LEN: usize = 80;

/// Largest Restart Time the graceful restart capability can carry (12 bits).
const MAX_RESTART_TIME: u32 = 4095;

/// Restart Time advertised when `gracefulRestart.restartTime` is unset.
const DEFAULT_RESTART_TIME: u16 = 120;

/// A BGP neighbour, and the session parameters the selected nodes use with it.
#[allow(
    clippy::duplicated_attributes,
    reason = "each printcolumn(...) repeats `type_ = \"string\"`, which clippy takes for a duplicate"
)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "portico.io",
    version = "v1alpha1",
    kind = "BGPPeer",
    root = "BgpPeer",
    shortname = "bgpp",
    category = "portico",
    status = "BgpPeerStatus",
    doc = "A BGP neighbour that the selected nodes announce LoadBalancer addresses to.",
    printcolumn(name = "Peer", type_ = "string", json_path = ".spec.peerAddress"),
    printcolumn(name = "ASN", type_ = "integer", json_path = ".spec.peerASN"),
    printcolumn(name = "State", type_ = "string", json_path = ".status.summary"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "!has(self.keepaliveTime) || !has(self.holdTime) || self.keepaliveTime * 3 <= self.holdTime",
     "message": "keepaliveTime must be at most a third of holdTime"},
    {"rule": "!(has(self.gtsm) && self.gtsm && has(self.ebgpMultihop))",
     "message": "gtsm (TTL 255, single hop) and ebgpMultihop exclude each other"},
    {"rule": "!has(self.sourceAddress) || (isIP(self.sourceAddress) && isIP(self.peerAddress) && ip(self.sourceAddress).family() == ip(self.peerAddress).family())",
     "message": "sourceAddress must be an IP address of the family of peerAddress"}
]))]
pub struct BgpPeerSpec {
    /// Our AS number (4-octet ASNs such as 4200000001 are fine).
    #[serde(rename = "myASN")]
    #[schemars(range(min = 1, max = 4_294_967_295_u32))]
    pub my_asn: u32,
    /// The AS number the peer must present; equal to `myASN` for iBGP.
    #[serde(rename = "peerASN")]
    #[schemars(range(min = 1, max = 4_294_967_295_u32))]
    pub peer_asn: u32,
    /// The peer's IPv4 or IPv6 address.
    #[schemars(extend("x-kubernetes-validations" = [
        {"rule": "isIP(self)", "message": "peerAddress must be an IPv4 or IPv6 address"}
    ]), length(max = 64))]
    pub peer_address: String,
    /// The peer's TCP port.
    #[serde(default = "bgp_port")]
    #[schemars(range(min = 1))]
    pub peer_port: u16,
    /// Local address to connect from (same family as `peerAddress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub source_address: Option<String>,
    /// BGP Identifier (an IPv4 address); defaults to the node's IPv4 address.
    #[serde(rename = "routerID", default, skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    /// Proposed hold time in seconds: 0 (no keepalives) or at least 3. Default 90.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 65535), extend("x-kubernetes-validations" = [
        {"rule": "self == 0 || self >= 3", "message": "holdTime must be 0 or at least 3"}
    ]))]
    pub hold_time: Option<u32>,
    /// Keepalive interval in seconds, at most a third of `holdTime`. Default: a third of
    /// the negotiated hold time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 21845))]
    pub keepalive_time: Option<u32>,
    /// Seconds between connection attempts. Default 120.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub connect_retry_time: Option<u32>,
    /// TCP MD5 signature password (RFC 2385), read from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// eBGP multihop: send with this TTL (1-255) instead of 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ebgp_multihop: Option<u8>,
    /// GTSM (RFC 5082) for single-hop eBGP: send with TTL 255 and accept only TTL 255.
    #[serde(default)]
    pub gtsm: bool,
    /// Graceful restart (RFC 4724): the peer keeps our routes while we restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub graceful_restart: Option<GracefulRestart>,
    /// Address families to offer: `ipv4-unicast`, `ipv6-unicast`. Default: both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend(
        "items" = {"type": "string", "enum": ["ipv4-unicast", "ipv6-unicast"]},
        "x-kubernetes-list-type" = "set"
    ))]
    pub families: Option<Vec<String>>,
    /// Only nodes whose labels match peer with this neighbour (absent: every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<KubeLabelSelector>,
}

fn bgp_port() -> u16 {
    BGP_PORT
}

/// A key of a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// The Secret's name.
    pub name: String,
    /// The Secret's namespace.
    pub namespace: String,
    /// The key within the Secret.
    #[serde(default = "password_key")]
    pub key: String,
}

fn password_key() -> String {
    "password".to_owned()
}

/// Graceful restart settings.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GracefulRestart {
    /// Offer the capability.
    #[serde(default)]
    pub enabled: bool,
    /// Seconds the peer keeps our routes after the session drops (1-4095). Default 120.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4095))]
    pub restart_time: Option<u32>,
}

/// What the nodes observed about their sessions with this peer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct BgpPeerStatus {
    /// How many of the nodes have the session Established, e.g. `2/3 Established`.
    /// Recomputed with every change of `nodes`.
    #[serde(default)]
    pub summary: String,
    /// One entry per node that peers with this neighbour, sorted by node. Each node's
    /// speaker updates its own entry (read, [`BgpPeerStatus::upsert`], replace with the
    /// read resourceVersion, retry on conflict), so `summary` always matches the list.
    #[serde(default)]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<BgpPeerNodeStatus>,
}

/// One node's session with the peer.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpPeerNodeStatus {
    /// The node's name.
    pub node: String,
    /// FSM state: Idle, Connect, Active, OpenSent, OpenConfirm or Established.
    pub state: String,
    /// When the session reached Established (absent when it is not Established).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub established_since: Option<Time>,
    /// The hold time both ends agreed, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negotiated_hold_time: Option<u16>,
    /// Capabilities both ends agreed: families, `4-octet-as`, `route-refresh`,
    /// `extended-message`, `graceful-restart`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Prefixes advertised to the peer, per family.
    #[serde(default)]
    pub prefixes_advertised: PrefixCounts,
    /// The last NOTIFICATION sent, as text ("Hold Timer Expired").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_notification_sent: Option<String>,
    /// The last NOTIFICATION received, as text ("OPEN Message Error / Bad Peer AS").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_notification_received: Option<String>,
}

/// Prefix counts per family.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct PrefixCounts {
    /// IPv4 unicast prefixes.
    pub ipv4: u64,
    /// IPv6 unicast prefixes.
    pub ipv6: u64,
}

/// What a valid `BGPPeer` means for one node.
#[derive(Clone, Debug)]
pub struct ValidPeer {
    /// The object's name.
    pub name: String,
    /// The driver's configuration of this peer.
    pub peer: PeerConfig,
    /// Which nodes peer with it.
    pub node_selector: LabelSelector,
}

/// What the validation needs from outside the object.
#[derive(Clone, Debug, Default)]
pub struct PeerInputs<'a> {
    /// The node's IPv4 address, the BGP Identifier when `routerID` is unset.
    pub node_router_id: Option<Ipv4Addr>,
    /// The password read from `passwordSecretRef` (`None` when the Secret or key is
    /// missing).
    pub password: Option<&'a str>,
}

impl BgpPeer {
    /// Checks the spec and turns it into the driver's [`PeerConfig`].
    ///
    /// # Errors
    /// Every problem of the spec, each naming the field and value.
    pub fn to_peer_config(&self, inputs: &PeerInputs<'_>) -> Result<ValidPeer, InvalidObject> {
        let name = self.meta().name.as_deref().unwrap_or_default();
        validate_peer(name, &self.spec, inputs)
    }
}

/// Checks `spec` (of the `BGPPeer` called `name`) and turns it into a [`PeerConfig`].
///
/// # Errors
/// Every problem of the spec, each naming the field and value.
pub fn validate_peer(
    name: &str,
    spec: &BgpPeerSpec,
    inputs: &PeerInputs<'_>,
) -> Result<ValidPeer, InvalidObject> {
    let mut p = Problems::default();
    check_asn(&mut p, "spec.myASN", spec.my_asn);
    check_asn(&mut p, "spec.peerASN", spec.peer_asn);
    let ibgp = spec.my_asn == spec.peer_asn;

    let address = match spec.peer_address.parse::<IpAddr>() {
        Ok(a) if a.is_unspecified() || a.is_multicast() || a == IpAddr::V4(Ipv4Addr::BROADCAST) => {
            p.push(
                "spec.peerAddress",
                quoted(&spec.peer_address),
                "is not a unicast address",
            );
            None
        }
        Ok(a) => Some(a),
        Err(_) => {
            p.push(
                "spec.peerAddress",
                quoted(&spec.peer_address),
                "is not a valid IP address",
            );
            None
        }
    };
    if spec.peer_port == 0 {
        p.push("spec.peerPort", 0, "is not a valid TCP port");
    }
    let source_address = spec
        .source_address
        .as_deref()
        .and_then(|s| match s.parse::<IpAddr>() {
            Ok(a) if address.is_some_and(|peer| peer.is_ipv4() != a.is_ipv4()) => {
                p.push(
                    "spec.sourceAddress",
                    quoted(s),
                    "is not of the same family as spec.peerAddress",
                );
                None
            }
            Ok(a) => Some(a),
            Err(_) => {
                p.push("spec.sourceAddress", quoted(s), "is not a valid IP address");
                None
            }
        });
    let router_id = match &spec.router_id {
        Some(s) => match s.parse::<Ipv4Addr>() {
            Ok(id) if id.is_unspecified() => {
                p.push("spec.routerID", quoted(s), "must not be 0.0.0.0");
                None
            }
            Ok(id) => Some(id),
            Err(_) => {
                p.push("spec.routerID", quoted(s), "is not an IPv4 address");
                None
            }
        },
        None => {
            if inputs.node_router_id.is_none() {
                p.push(
                    "spec.routerID",
                    "<unset>",
                    "is required: the node has no IPv4 address to use as BGP Identifier",
                );
            }
            inputs.node_router_id
        }
    };

    let hold_time = spec.hold_time.unwrap_or(90);
    if hold_time == 1 || hold_time == 2 || hold_time > u32::from(u16::MAX) {
        p.push(
            "spec.holdTime",
            hold_time,
            "must be 0 or between 3 and 65535 seconds",
        );
    }
    if let Some(k) = spec.keepalive_time {
        if hold_time == 0 && k != 0 {
            p.push(
                "spec.keepaliveTime",
                k,
                "must be 0 or unset when spec.holdTime is 0",
            );
        } else if hold_time != 0 && k == 0 {
            p.push(
                "spec.keepaliveTime",
                k,
                "must be at least 1 when spec.holdTime is not 0",
            );
        } else if k > hold_time / 3 {
            p.push(
                "spec.keepaliveTime",
                k,
                format!(
                    "must be at most a third of spec.holdTime ({})",
                    hold_time / 3
                ),
            );
        }
    }
    if let Some(t) = spec.connect_retry_time {
        if t == 0 || t > u32::from(u16::MAX) {
            p.push(
                "spec.connectRetryTime",
                t,
                "must be between 1 and 65535 seconds",
            );
        }
    }

    let md5_password = match &spec.password_secret_ref {
        None => None,
        Some(r) => {
            let secret = format!("{}/{}", r.namespace, r.name);
            if r.name.is_empty() {
                p.push(
                    "spec.passwordSecretRef.name",
                    quoted(&r.name),
                    "must not be empty",
                );
            }
            if r.namespace.is_empty() {
                p.push(
                    "spec.passwordSecretRef.namespace",
                    quoted(&r.namespace),
                    "must not be empty",
                );
            }
            if r.key.is_empty() {
                p.push(
                    "spec.passwordSecretRef.key",
                    quoted(&r.key),
                    "must not be empty",
                );
            }
            match inputs.password {
                None => {
                    p.push(
                        "spec.passwordSecretRef",
                        quoted(&secret),
                        format!("has no key {}", quoted(&r.key)),
                    );
                    None
                }
                Some("") => {
                    p.push(
                        "spec.passwordSecretRef",
                        quoted(&secret),
                        "holds an empty password",
                    );
                    None
                }
                Some(pw) if pw.len() > MD5_MAX_KEY_LEN => {
                    p.push(
                        "spec.passwordSecretRef",
                        quoted(&secret),
                        format!("holds a password longer than {MD5_MAX_KEY_LEN} bytes"),
                    );
                    None
                }
                Some(pw) => Some(pw.to_owned()),
            }
        }
    };

    let ttl = match (spec.gtsm, spec.ebgp_multihop) {
        (true, Some(ttl)) => {
            p.push(
                "spec.ebgpMultihop",
                ttl,
                "cannot be combined with spec.gtsm (GTSM is for directly connected peers)",
            );
            TtlMode::Default
        }
        (true, None) if ibgp => {
            p.push(
                "spec.gtsm",
                true,
                "is for eBGP peers only (myASN equals peerASN)",
            );
            TtlMode::Default
        }
        (true, None) => TtlMode::Gtsm,
        (false, Some(ttl)) if ibgp => {
            p.push(
                "spec.ebgpMultihop",
                ttl,
                "is for eBGP peers only (myASN equals peerASN)",
            );
            TtlMode::Default
        }
        (false, Some(0)) => {
            p.push("spec.ebgpMultihop", 0, "must be a TTL between 1 and 255");
            TtlMode::Default
        }
        (false, Some(ttl)) => TtlMode::Multihop(ttl),
        (false, None) => TtlMode::Default,
    };

    let graceful_restart = match &spec.graceful_restart {
        Some(gr) => {
            let restart_time = gr.restart_time.unwrap_or(u32::from(DEFAULT_RESTART_TIME));
            if restart_time == 0 || restart_time > MAX_RESTART_TIME {
                p.push(
                    "spec.gracefulRestart.restartTime",
                    restart_time,
                    format!("must be between 1 and {MAX_RESTART_TIME} seconds"),
                );
            }
            gr.enabled.then(|| GracefulRestartConfig {
                restart_time: u16::try_from(restart_time.min(MAX_RESTART_TIME))
                    .unwrap_or(DEFAULT_RESTART_TIME),
                // A speaker that starts may be restarting: ask the peer to keep our routes
                // until End-of-RIB. The data plane (XDP, held addresses) keeps forwarding.
                restarting: true,
                forwarding_state: true,
            })
        }
        None => None,
    };

    let families = match &spec.families {
        None => Family::ALL.to_vec(),
        Some(list) => {
            if list.is_empty() {
                p.push("spec.families", "[]", "must list at least one family");
            }
            let mut families = Vec::new();
            for (i, f) in list.iter().enumerate() {
                match f.as_str() {
                    "ipv4-unicast" => families.push(Family::Ipv4Unicast),
                    "ipv6-unicast" => families.push(Family::Ipv6Unicast),
                    _ => p.push(
                        format!("spec.families[{i}]"),
                        quoted(f),
                        "is not one of ipv4-unicast, ipv6-unicast",
                    ),
                }
            }
            families.sort_by_key(|f| f.afi());
            families.dedup();
            families
        }
    };

    let node_selector = label_selector(&mut p, "spec.nodeSelector", spec.node_selector.as_ref());

    let (Some(address), Some(router_id)) = (address, router_id) else {
        // Both were reported above.
        return Err(p.finish("BGPPeer", name, ()).unwrap_err());
    };
    let mut session = SessionConfig::new(spec.my_asn, spec.peer_asn, router_id);
    session.hold_time = u16::try_from(hold_time).unwrap_or(u16::MAX);
    session.keepalive_time = spec
        .keepalive_time
        .map(|k| u16::try_from(k).unwrap_or(u16::MAX));
    if let Some(t) = spec.connect_retry_time {
        session.connect_retry_time = Duration::from_secs(u64::from(t));
    }
    session.graceful_restart = graceful_restart;
    session.families = families;
    let mut peer = PeerConfig::new(address, session);
    peer.port = spec.peer_port;
    peer.source_address = source_address;
    peer.md5_password = md5_password;
    peer.ttl = ttl;
    p.finish(
        "BGPPeer",
        name,
        ValidPeer {
            name: name.to_owned(),
            peer,
            node_selector,
        },
    )
}

impl BgpPeerNodeStatus {
    /// The status entry of `node` from its session's status, taken at `now`.
    ///
    /// `establishedSince` is rounded to whole seconds, so repeated reports of one session
    /// produce the same entry and no needless writes.
    #[must_use]
    pub fn from_session(node: &str, session: &SessionStatus, now: Timestamp) -> Self {
        let established_since = session.uptime.and_then(|up| {
            let secs = i64::try_from(up.as_secs()).ok()?;
            Timestamp::from_second(now.as_second() - secs)
                .ok()
                .map(Time)
        });
        let mut capabilities = Vec::new();
        if let Some(n) = &session.negotiated {
            capabilities.extend(n.families.iter().map(ToString::to_string));
            for (on, cap) in [
                (n.four_octet_as, "4-octet-as"),
                (n.route_refresh, "route-refresh"),
                (n.extended_message, "extended-message"),
                (n.graceful_restart, "graceful-restart"),
            ] {
                if on {
                    capabilities.push(cap.to_owned());
                }
            }
        }
        let count = |f: Family| session.advertised[f.index()] as u64;
        BgpPeerNodeStatus {
            node: node.to_owned(),
            state: session.state.to_string(),
            established_since,
            negotiated_hold_time: session.negotiated.as_ref().map(|n| n.hold_time),
            capabilities,
            prefixes_advertised: PrefixCounts {
                ipv4: count(Family::Ipv4Unicast),
                ipv6: count(Family::Ipv6Unicast),
            },
            last_notification_sent: session.last_notification_sent.clone(),
            last_notification_received: session.last_notification_received.clone(),
        }
    }
}

impl BgpPeerStatus {
    /// Replaces (or adds) the entry of `entry.node`, keeping the list sorted by node.
    /// Updates `summary`.
    pub fn upsert(&mut self, entry: BgpPeerNodeStatus) {
        match self.nodes.binary_search_by(|n| n.node.cmp(&entry.node)) {
            Ok(i) => self.nodes[i] = entry,
            Err(i) => self.nodes.insert(i, entry),
        }
        self.summary = self.summarize();
    }

    /// Drops the entry of a node that no longer peers with this neighbour. Updates
    /// `summary`.
    pub fn remove(&mut self, node: &str) {
        self.nodes.retain(|n| n.node != node);
        self.summary = self.summarize();
    }

    /// `<established>/<nodes> Established`, or empty when no node peers.
    #[must_use]
    pub fn summarize(&self) -> String {
        if self.nodes.is_empty() {
            return String::new();
        }
        let up = self
            .nodes
            .iter()
            .filter(|n| n.state == "Established")
            .count();
        format!("{up}/{} Established", self.nodes.len())
    }
}
