//! BGPPeer and BGPAdvertisement: generated CRDs, and validation into the announcer's
//! configuration with errors that name the object, the field and the value.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use k8s_openapi::jiff::Timestamp;
use portico_announcer::driver::TtlMode;
use portico_announcer::session::SessionStatus;
use portico_announcer::{Family, LargeCommunity, State};
use portico_crds::{
    crd_files, parse_community, BgpAdvertisement, BgpAdvertisementSpec, BgpPeer, BgpPeerNodeStatus,
    BgpPeerSpec, BgpPeerStatus, GracefulRestart, PeerInputs, SecretKeyRef, BGP_ADVERTISEMENT_FILE,
    BGP_PEER_FILE,
};

const NODE_ID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 11);

fn inputs() -> PeerInputs<'static> {
    PeerInputs {
        node_router_id: Some(NODE_ID),
        password: None,
    }
}

/// A minimal valid eBGP peer spec, as a user would write it.
fn peer_spec() -> BgpPeerSpec {
    serde_json::from_str(r#"{"myASN":64512,"peerASN":64513,"peerAddress":"192.0.2.1"}"#).unwrap()
}

fn peer(spec: BgpPeerSpec) -> BgpPeer {
    BgpPeer::new("tor-a", spec)
}

/// The single error message of an invalid peer.
fn peer_error(spec: BgpPeerSpec) -> String {
    peer_error_with(spec, &inputs())
}

fn peer_error_with(spec: BgpPeerSpec, inputs: &PeerInputs<'_>) -> String {
    let err = peer(spec).to_peer_config(inputs).unwrap_err();
    assert_eq!(err.errors.len(), 1, "{err}");
    err.to_string()
}

fn advertisement(spec: BgpAdvertisementSpec) -> BgpAdvertisement {
    BgpAdvertisement::new("vips", spec)
}

fn advertisement_error(spec: BgpAdvertisementSpec) -> String {
    let err = advertisement(spec).to_advertisement().unwrap_err();
    assert_eq!(err.errors.len(), 1, "{err}");
    err.to_string()
}

fn crd_yaml(file: &str) -> String {
    crd_files()
        .unwrap()
        .into_iter()
        .find(|(name, _)| *name == file)
        .unwrap()
        .1
}

// --- generated CRDs ---

#[test]
fn bgp_crds_are_cluster_scoped_in_portico_io_v1alpha1() {
    for (file, kind) in [
        (BGP_PEER_FILE, "kind: BGPPeer\n"),
        (BGP_ADVERTISEMENT_FILE, "kind: BGPAdvertisement\n"),
    ] {
        let yaml = crd_yaml(file);
        assert!(yaml.contains("scope: Cluster"), "{file}");
        assert!(yaml.contains("group: portico.io"), "{file}");
        assert!(yaml.contains("name: v1alpha1"), "{file}");
        assert!(yaml.contains(kind), "{file}");
    }
    assert!(crd_yaml(BGP_PEER_FILE).contains("name: bgppeers.portico.io"));
    assert!(crd_yaml(BGP_ADVERTISEMENT_FILE).contains("name: bgpadvertisements.portico.io"));
}

#[test]
fn bgp_peer_crd_has_printer_columns_status_and_a_per_node_status_map() {
    let yaml = crd_yaml(BGP_PEER_FILE);
    for column in ["Peer", "ASN", "State", "Age"] {
        assert!(yaml.contains(&format!("name: {column}\n")), "{column}");
    }
    assert!(yaml.contains("status: {}"), "status subresource");
    assert!(yaml.contains("x-kubernetes-list-type: map"));
    assert!(yaml.contains("jsonPath: .status.summary"));
    assert!(yaml.contains("myASN:") && yaml.contains("peerASN:") && yaml.contains("routerID:"));
    assert!(yaml.contains("default: 179"));
}

#[test]
fn bgp_advertisement_crd_uses_the_familiar_field_names() {
    let yaml = crd_yaml(BGP_ADVERTISEMENT_FILE);
    for field in [
        "poolSelector:",
        "serviceSelector:",
        "peers:",
        "communities:",
        "largeCommunities:",
        "localPref:",
        "med:",
        "aggregationLength:",
        "aggregationLengthV6:",
        "nodeSelector:",
    ] {
        assert!(yaml.contains(field), "{field}");
    }
}

// --- BGPPeer: a valid spec ---

#[test]
fn minimal_peer_gets_port_179_both_families_and_the_node_router_id() {
    let valid = peer(peer_spec()).to_peer_config(&inputs()).unwrap();
    assert_eq!(valid.name, "tor-a");
    let p = &valid.peer;
    assert_eq!(p.address, "192.0.2.1".parse::<IpAddr>().unwrap());
    assert_eq!(p.port, 179);
    assert_eq!(p.ttl, TtlMode::Default);
    assert_eq!(p.md5_password, None);
    assert_eq!(p.session.local_as, 64512);
    assert_eq!(p.session.peer_as, 64513);
    assert_eq!(p.session.router_id, NODE_ID);
    assert_eq!(p.session.hold_time, 90);
    assert_eq!(p.session.families, Family::ALL.to_vec());
    assert_eq!(p.session.graceful_restart, None);
}

#[test]
fn full_peer_spec_maps_every_field_onto_the_driver_config() {
    let mut s = peer_spec();
    s.my_asn = 4_200_000_001;
    s.peer_asn = 4_200_000_002;
    s.peer_address = "fd00::1".into();
    s.peer_port = 1179;
    s.source_address = Some("fd00::2".into());
    s.router_id = Some("10.255.0.1".into());
    s.hold_time = Some(9);
    s.keepalive_time = Some(3);
    s.connect_retry_time = Some(5);
    s.password_secret_ref = Some(SecretKeyRef {
        name: "bgp".into(),
        namespace: "portico-system".into(),
        key: "password".into(),
    });
    s.ebgp_multihop = Some(4);
    s.graceful_restart = Some(GracefulRestart {
        enabled: true,
        restart_time: Some(60),
    });
    s.families = Some(vec!["ipv6-unicast".into()]);
    let valid = peer(s)
        .to_peer_config(&PeerInputs {
            node_router_id: None,
            password: Some("s3cret"),
        })
        .unwrap();
    let p = &valid.peer;
    assert_eq!(p.port, 1179);
    assert_eq!(p.source_address, Some("fd00::2".parse().unwrap()));
    assert_eq!(p.md5_password.as_deref(), Some("s3cret"));
    assert_eq!(p.ttl, TtlMode::Multihop(4));
    assert_eq!(p.session.router_id, Ipv4Addr::new(10, 255, 0, 1));
    assert_eq!(
        (p.session.hold_time, p.session.keepalive_time),
        (9, Some(3))
    );
    assert_eq!(p.session.connect_retry_time, Duration::from_secs(5));
    assert_eq!(p.session.families, vec![Family::Ipv6Unicast]);
    let gr = p.session.graceful_restart.as_ref().unwrap();
    assert_eq!(gr.restart_time, 60);
}

#[test]
fn gtsm_on_a_single_hop_ebgp_peer_sets_ttl_255_mode() {
    let mut s = peer_spec();
    s.gtsm = true;
    let valid = peer(s).to_peer_config(&inputs()).unwrap();
    assert_eq!(valid.peer.ttl, TtlMode::Gtsm);
}

#[test]
fn node_selector_is_converted_and_kept() {
    let mut s = peer_spec();
    s.node_selector = Some(LabelSelector {
        match_labels: Some([("rack".to_owned(), "r1".to_owned())].into()),
        match_expressions: None,
    });
    let valid = peer(s).to_peer_config(&inputs()).unwrap();
    let labels = [("rack".to_owned(), "r1".to_owned())].into();
    assert!(valid.node_selector.matches(&labels));
    assert!(!valid.node_selector.matches(&Default::default()));
}

// --- BGPPeer: one test per rule ---

#[test]
fn peer_asn_zero_is_not_a_valid_as_number() {
    let mut s = peer_spec();
    s.peer_asn = 0;
    assert_eq!(
        peer_error(s),
        "BGPPeer tor-a: spec.peerASN: 0 is not a valid AS number"
    );
}

#[test]
fn my_asn_as_trans_is_rejected() {
    let mut s = peer_spec();
    s.my_asn = 23456;
    let err = peer_error(s);
    assert!(
        err.starts_with("BGPPeer tor-a: spec.myASN: 23456 is AS_TRANS"),
        "{err}"
    );
}

#[test]
fn reserved_asn_65535_is_rejected() {
    let mut s = peer_spec();
    s.peer_asn = 65535;
    assert!(peer_error(s).contains("spec.peerASN: 65535 is a reserved AS number"));
}

#[test]
fn peer_address_must_be_an_ip_address() {
    let mut s = peer_spec();
    s.peer_address = "tor-a.example".into();
    assert_eq!(
        peer_error(s),
        r#"BGPPeer tor-a: spec.peerAddress: "tor-a.example" is not a valid IP address"#
    );
}

#[test]
fn peer_address_must_be_unicast() {
    for a in ["0.0.0.0", "224.0.0.5", "255.255.255.255", "ff02::5", "::"] {
        let mut s = peer_spec();
        s.peer_address = a.into();
        assert!(peer_error(s).contains("is not a unicast address"), "{a}");
    }
}

#[test]
fn peer_port_zero_is_rejected() {
    let mut s = peer_spec();
    s.peer_port = 0;
    assert_eq!(
        peer_error(s),
        "BGPPeer tor-a: spec.peerPort: 0 is not a valid TCP port"
    );
}

#[test]
fn source_address_must_parse_and_match_the_peer_family() {
    let mut s = peer_spec();
    s.source_address = Some("fd00::2".into());
    assert_eq!(
        peer_error(s),
        r#"BGPPeer tor-a: spec.sourceAddress: "fd00::2" is not of the same family as spec.peerAddress"#
    );
    let mut s = peer_spec();
    s.source_address = Some("10.0.0.300".into());
    assert!(peer_error(s).contains(r#"spec.sourceAddress: "10.0.0.300" is not a valid IP address"#));
}

#[test]
fn router_id_must_be_a_nonzero_ipv4_address() {
    let mut s = peer_spec();
    s.router_id = Some("fd00::1".into());
    assert_eq!(
        peer_error(s),
        r#"BGPPeer tor-a: spec.routerID: "fd00::1" is not an IPv4 address"#
    );
    let mut s = peer_spec();
    s.router_id = Some("0.0.0.0".into());
    assert!(peer_error(s).contains("must not be 0.0.0.0"));
}

#[test]
fn router_id_is_required_when_the_node_has_no_ipv4_address() {
    let err = peer_error_with(peer_spec(), &PeerInputs::default());
    assert!(err.contains("spec.routerID: <unset> is required"), "{err}");
}

#[test]
fn hold_time_of_one_or_two_seconds_is_rejected() {
    for hold in [1, 2] {
        let mut s = peer_spec();
        s.hold_time = Some(hold);
        assert_eq!(
            peer_error(s),
            format!(
                "BGPPeer tor-a: spec.holdTime: {hold} must be 0 or between 3 and 65535 seconds"
            )
        );
    }
    for hold in [0, 3, 65535] {
        let mut s = peer_spec();
        s.hold_time = Some(hold);
        assert!(peer(s).to_peer_config(&inputs()).is_ok(), "{hold}");
    }
    let mut s = peer_spec();
    s.hold_time = Some(65536);
    assert!(peer_error(s).contains("spec.holdTime: 65536"));
}

#[test]
fn keepalive_longer_than_a_third_of_hold_time_is_rejected() {
    let mut s = peer_spec();
    s.hold_time = Some(9);
    s.keepalive_time = Some(4);
    assert_eq!(
        peer_error(s),
        "BGPPeer tor-a: spec.keepaliveTime: 4 must be at most a third of spec.holdTime (3)"
    );
    let mut s = peer_spec();
    s.keepalive_time = Some(31);
    assert!(peer_error(s).contains("(30)"), "default hold time 90");
}

#[test]
fn keepalive_must_agree_with_a_zero_or_nonzero_hold_time() {
    let mut s = peer_spec();
    s.hold_time = Some(0);
    s.keepalive_time = Some(10);
    assert!(peer_error(s).contains("must be 0 or unset when spec.holdTime is 0"));
    let mut s = peer_spec();
    s.keepalive_time = Some(0);
    assert!(peer_error(s).contains("must be at least 1 when spec.holdTime is not 0"));
}

#[test]
fn connect_retry_time_must_be_positive() {
    let mut s = peer_spec();
    s.connect_retry_time = Some(0);
    assert_eq!(
        peer_error(s),
        "BGPPeer tor-a: spec.connectRetryTime: 0 must be between 1 and 65535 seconds"
    );
}

#[test]
fn password_secret_that_is_missing_names_the_secret_and_key() {
    let mut s = peer_spec();
    s.password_secret_ref = Some(SecretKeyRef {
        name: "bgp".into(),
        namespace: "portico-system".into(),
        key: "pw".into(),
    });
    assert_eq!(
        peer_error(s),
        r#"BGPPeer tor-a: spec.passwordSecretRef: "portico-system/bgp" has no key "pw""#
    );
}

#[test]
fn password_longer_than_the_tcp_md5_key_limit_is_rejected() {
    let mut s = peer_spec();
    s.password_secret_ref = Some(SecretKeyRef {
        name: "bgp".into(),
        namespace: "ns".into(),
        key: "password".into(),
    });
    let long = "x".repeat(81);
    let err = peer_error_with(
        s,
        &PeerInputs {
            node_router_id: Some(NODE_ID),
            password: Some(&long),
        },
    );
    assert!(err.contains("longer than 80 bytes"), "{err}");
}

#[test]
fn password_secret_ref_key_defaults_to_password() {
    let r: SecretKeyRef = serde_json::from_str(r#"{"name":"bgp","namespace":"ns"}"#).unwrap();
    assert_eq!(r.key, "password");
}

#[test]
fn gtsm_and_multihop_are_mutually_exclusive() {
    let mut s = peer_spec();
    s.gtsm = true;
    s.ebgp_multihop = Some(2);
    assert!(peer_error(s).contains("spec.ebgpMultihop: 2 cannot be combined with spec.gtsm"));
}

#[test]
fn gtsm_and_multihop_are_for_ebgp_only() {
    let mut s = peer_spec();
    s.peer_asn = s.my_asn;
    s.gtsm = true;
    assert!(peer_error(s).contains("spec.gtsm: true is for eBGP peers only"));
    let mut s = peer_spec();
    s.peer_asn = s.my_asn;
    s.ebgp_multihop = Some(3);
    assert!(peer_error(s).contains("spec.ebgpMultihop: 3 is for eBGP peers only"));
}

#[test]
fn multihop_ttl_zero_is_rejected() {
    let mut s = peer_spec();
    s.ebgp_multihop = Some(0);
    assert!(peer_error(s).contains("spec.ebgpMultihop: 0 must be a TTL between 1 and 255"));
}

#[test]
fn graceful_restart_time_must_fit_twelve_bits() {
    let mut s = peer_spec();
    s.graceful_restart = Some(GracefulRestart {
        enabled: true,
        restart_time: Some(4096),
    });
    assert_eq!(
        peer_error(s),
        "BGPPeer tor-a: spec.gracefulRestart.restartTime: 4096 must be between 1 and 4095 seconds"
    );
}

#[test]
fn graceful_restart_defaults_to_120_seconds_and_off_when_disabled() {
    let mut s = peer_spec();
    s.graceful_restart = Some(GracefulRestart {
        enabled: true,
        restart_time: None,
    });
    let valid = peer(s.clone()).to_peer_config(&inputs()).unwrap();
    let gr = valid.peer.session.graceful_restart.unwrap();
    assert_eq!(gr.restart_time, 120);
    assert!(gr.restarting && gr.forwarding_state);
    s.graceful_restart = Some(GracefulRestart::default());
    let valid = peer(s).to_peer_config(&inputs()).unwrap();
    assert_eq!(valid.peer.session.graceful_restart, None);
}

#[test]
fn unknown_or_no_families_are_rejected() {
    let mut s = peer_spec();
    s.families = Some(vec!["ipv4-unicast".into(), "l2vpn-evpn".into()]);
    assert_eq!(
        peer_error(s),
        r#"BGPPeer tor-a: spec.families[1]: "l2vpn-evpn" is not one of ipv4-unicast, ipv6-unicast"#
    );
    let mut s = peer_spec();
    s.families = Some(vec![]);
    assert!(peer_error(s).contains("spec.families: [] must list at least one family"));
}

#[test]
fn bad_node_selector_names_the_expression() {
    let mut s = peer_spec();
    s.node_selector = Some(LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "rack".into(),
            operator: "In".into(),
            values: None,
        }]),
    });
    assert_eq!(
        peer_error(s),
        "BGPPeer tor-a: spec.nodeSelector.matchExpressions[0].values: [] must not be empty for operator In"
    );
}

#[test]
fn every_problem_of_a_peer_is_reported_at_once() {
    let mut s = peer_spec();
    s.peer_asn = 0;
    s.hold_time = Some(2);
    s.peer_address = "nope".into();
    let err = peer(s).to_peer_config(&inputs()).unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.peerASN", "spec.peerAddress", "spec.holdTime"]
    );
}

// --- BGPPeer status ---

fn established_status() -> SessionStatus {
    let now = Instant::now();
    let session = portico_announcer::testing::established_session(now, false);
    let mut status = session.status(now);
    status.uptime = Some(Duration::from_millis(125_700));
    status.advertised = [3, 1];
    status.last_notification_received = Some("OPEN Message Error / Bad Peer AS".into());
    status
}

#[test]
fn node_status_reports_state_uptime_hold_time_capabilities_and_counts() {
    let now = Timestamp::from_second(1_700_000_000).unwrap();
    let entry = BgpPeerNodeStatus::from_session("node-a", &established_status(), now);
    assert_eq!(entry.node, "node-a");
    assert_eq!(entry.state, "Established");
    assert_eq!(
        entry.established_since.as_ref().unwrap().0,
        Timestamp::from_second(1_700_000_000 - 125).unwrap()
    );
    assert!(entry.negotiated_hold_time.is_some());
    assert!(entry.capabilities.iter().any(|c| c == "ipv4-unicast"));
    assert!(entry.capabilities.iter().any(|c| c == "4-octet-as"));
    assert_eq!(
        (
            entry.prefixes_advertised.ipv4,
            entry.prefixes_advertised.ipv6
        ),
        (3, 1)
    );
    assert_eq!(
        entry.last_notification_received.as_deref(),
        Some("OPEN Message Error / Bad Peer AS")
    );
    let json = serde_json::to_value(&entry).unwrap();
    assert_eq!(
        json["lastNotificationReceived"],
        "OPEN Message Error / Bad Peer AS"
    );
    assert_eq!(json["prefixesAdvertised"]["ipv4"], 3);
}

#[test]
fn idle_session_status_has_no_uptime_or_capabilities() {
    let mut s = established_status();
    s.state = State::Idle;
    s.uptime = None;
    s.negotiated = None;
    let entry = BgpPeerNodeStatus::from_session("n", &s, Timestamp::UNIX_EPOCH);
    assert_eq!(entry.state, "Idle");
    assert_eq!(entry.established_since, None);
    assert!(entry.capabilities.is_empty());
    assert_eq!(entry.negotiated_hold_time, None);
}

#[test]
fn peer_status_keeps_one_entry_per_node_sorted() {
    let mut status = BgpPeerStatus::default();
    let entry = |node: &str, state: &str| BgpPeerNodeStatus {
        node: node.into(),
        state: state.into(),
        ..BgpPeerNodeStatus::default()
    };
    status.upsert(entry("node-b", "Active"));
    status.upsert(entry("node-a", "Connect"));
    status.upsert(entry("node-b", "Established"));
    let got: Vec<(&str, &str)> = status
        .nodes
        .iter()
        .map(|n| (n.node.as_str(), n.state.as_str()))
        .collect();
    assert_eq!(got, [("node-a", "Connect"), ("node-b", "Established")]);
    assert_eq!(status.summary, "1/2 Established");
    status.remove("node-a");
    assert_eq!(status.nodes.len(), 1);
    assert_eq!(status.summary, "1/1 Established");
    status.remove("node-b");
    assert_eq!(status.summary, "");
}

// --- BGPAdvertisement ---

#[test]
fn advertisement_maps_communities_large_communities_local_pref_and_med() {
    let spec: BgpAdvertisementSpec = serde_json::from_str(
        r#"{"communities":["65000:100","no-export","65000:100"],
            "largeCommunities":["4200000001:1:2"],
            "localPref":200,"med":10,"aggregationLength":24,"peers":["tor-a"]}"#,
    )
    .unwrap();
    let valid = advertisement(spec).to_advertisement().unwrap();
    assert_eq!(
        valid.attrs.communities,
        vec![65000 << 16 | 100, 0xFFFF_FF01]
    );
    assert_eq!(
        valid.attrs.large_communities,
        vec![LargeCommunity {
            global_admin: 4_200_000_001,
            local_data1: 1,
            local_data2: 2,
        }]
    );
    assert_eq!(valid.attrs.local_pref, Some(200));
    assert_eq!(valid.attrs.med, Some(10));
    assert_eq!(
        (valid.aggregation_length, valid.aggregation_length_v6),
        (24, 128)
    );
    assert_eq!(valid.peers, vec!["tor-a".to_owned()]);
}

#[test]
fn empty_advertisement_announces_host_routes_everywhere() {
    let valid = advertisement(BgpAdvertisementSpec::default())
        .to_advertisement()
        .unwrap();
    assert_eq!(
        (valid.aggregation_length, valid.aggregation_length_v6),
        (32, 128)
    );
    assert!(valid.peers.is_empty());
    assert_eq!(valid.attrs, Default::default());
    assert!(valid.node_selector.matches(&Default::default()));
}

#[test]
fn community_with_a_part_above_65535_is_rejected() {
    let spec = BgpAdvertisementSpec {
        communities: vec!["65000:1".into(), "65536:1".into()],
        ..Default::default()
    };
    assert_eq!(
        advertisement_error(spec),
        r#"BGPAdvertisement vips: spec.communities[1]: "65536:1" is not a valid community: both parts of ASN:value must be 0-65535"#
    );
}

#[test]
fn community_that_is_neither_pair_nor_well_known_is_rejected() {
    for bad in [
        "no-exports",
        "65000",
        "65000:",
        ":1",
        "-1:2",
        "1:2:3",
        "+1:2",
    ] {
        assert!(parse_community(bad).is_err(), "{bad}");
    }
    assert_eq!(parse_community("NO-EXPORT"), Ok(0xFFFF_FF01));
    assert_eq!(parse_community("blackhole"), Ok(0xFFFF_029A));
    assert_eq!(parse_community("0:0"), Ok(0));
    assert_eq!(parse_community("65535:65535"), Ok(u32::MAX));
}

#[test]
fn large_community_needs_three_32_bit_parts() {
    for bad in ["4200000001:1", "4294967296:1:2", "a:b:c", "1:2:3:4", "1::2"] {
        let spec = BgpAdvertisementSpec {
            large_communities: vec![bad.into()],
            ..Default::default()
        };
        let err = advertisement_error(spec);
        assert!(
            err.starts_with(&format!(
                "BGPAdvertisement vips: spec.largeCommunities[0]: \"{bad}\" is not"
            )),
            "{err}"
        );
    }
}

#[test]
fn aggregation_length_beyond_the_address_width_is_rejected() {
    let spec = BgpAdvertisementSpec {
        aggregation_length: Some(33),
        ..Default::default()
    };
    assert_eq!(
        advertisement_error(spec),
        "BGPAdvertisement vips: spec.aggregationLength: 33 is longer than an IPv4 prefix can be (0-32)"
    );
    let spec = BgpAdvertisementSpec {
        aggregation_length_v6: Some(129),
        ..Default::default()
    };
    assert!(advertisement_error(spec).contains("spec.aggregationLengthV6: 129"));
}

#[test]
fn empty_peer_name_is_rejected_and_duplicates_collapse() {
    let spec = BgpAdvertisementSpec {
        peers: vec!["a".into(), "".into(), "a".into()],
        ..Default::default()
    };
    assert_eq!(
        advertisement_error(spec),
        r#"BGPAdvertisement vips: spec.peers[1]: "" is not a BGPPeer name"#
    );
}

#[test]
fn advertisement_selectors_are_checked_with_their_field_paths() {
    let bad = LabelSelector {
        match_labels: None,
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "k".into(),
            operator: "Like".into(),
            values: None,
        }]),
    };
    let spec = BgpAdvertisementSpec {
        pool_selector: Some(bad.clone()),
        service_selector: Some(bad.clone()),
        node_selector: Some(bad),
        ..Default::default()
    };
    let err = advertisement(spec).to_advertisement().unwrap_err();
    let fields: Vec<&str> = err.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.poolSelector.matchExpressions[0].operator",
            "spec.serviceSelector.matchExpressions[0].operator",
            "spec.nodeSelector.matchExpressions[0].operator",
        ]
    );
}
