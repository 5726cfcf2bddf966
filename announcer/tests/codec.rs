//! Golden vectors, round trips and RFC 7606 classification for the wire codec.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use netgauze_bgp_pkt::path_attribute::PathAttributeValue;
use netgauze_bgp_pkt::wire::deserializer::BgpParsingContext;
use netgauze_bgp_pkt::BgpMessage;
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;
use portico_announcer::update::{
    self, EncodeContext, ErrorAction, InspectContext, LargeCommunity, RouteAttrs,
};
use portico_announcer::wire::{
    self, hex, AttrType, Capabilities, CeaseSubcode, ErrorCode, Family, FsmSubcode,
    GracefulRestartCap, HeaderSubcode, Message, Notification, Open, OpenSubcode,
    RouteRefreshSubcode, UpdateSubcode,
};

/// Assert equal bytes with a hex diff.
fn assert_bytes(got: &[u8], want: &[u8]) {
    assert_eq!(
        hex(got),
        hex(want),
        "lengths {} vs {}",
        got.len(),
        want.len()
    );
}

/// A message built field by field: marker, length, type, body.
fn message(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(ty);
    m.extend_from_slice(body);
    m
}

fn netgauze_decode(bytes: &[u8], asn4: bool) -> BgpMessage {
    let mut ctx = BgpParsingContext::asn2_default();
    ctx.set_asn4(asn4);
    let mut cur = SliceReader::new(bytes);
    let msg = BgpMessage::parse(&mut cur, &mut ctx).expect("netgauze decodes our bytes");
    assert!(cur.is_empty(), "leftover bytes");
    msg
}

fn ctx(max_len: usize) -> EncodeContext {
    EncodeContext {
        local_as: 65001,
        ibgp: false,
        four_octet_as: true,
        next_hop_v4: Some(Ipv4Addr::new(192, 0, 2, 1)),
        next_hop_v6: Some("fd00::1".parse().unwrap()),
        max_len,
    }
}

#[test]
fn keepalive_golden() {
    let mut out = Vec::new();
    wire::encode_keepalive(&mut out);
    assert_bytes(&out, &message(4, &[]));
    assert!(matches!(wire::decode(&out, 4096), Ok(Message::Keepalive)));
}

#[test]
fn notification_golden_and_text() {
    let n = Notification::new(ErrorCode::OPEN_MESSAGE, 2, vec![0xfd, 0xe9]);
    let mut out = Vec::new();
    n.encode(&mut out);
    assert_bytes(&out, &message(3, &[2, 2, 0xfd, 0xe9]));
    match wire::decode(&out, 4096) {
        Ok(Message::Notification(back)) => assert_eq!(back, n),
        other => panic!("{other:?}"),
    }
    assert_eq!(n.to_string(), "OPEN Message Error / Bad Peer AS");
    assert_eq!(
        Notification::new(ErrorCode::HOLD_TIMER_EXPIRED, 0, vec![]).to_string(),
        "Hold Timer Expired"
    );
    let shutdown = Notification::new(ErrorCode::CEASE, 2, b"\x04bye!".to_vec());
    assert_eq!(
        shutdown.to_string(),
        "Cease / Administrative Shutdown: \"bye!\""
    );
    assert_eq!(
        Notification::new(ErrorCode(9), 4, vec![]).to_string(),
        "Error code 9 / subcode 4"
    );
}

#[test]
fn typed_subcodes_carry_their_error_code_and_print_rfc_names() {
    let collision = Notification::cease(CeaseSubcode::CONNECTION_COLLISION_RESOLUTION);
    assert_eq!((collision.code, collision.subcode), (ErrorCode::CEASE, 7));
    assert_eq!(
        collision.to_string(),
        "Cease / Connection Collision Resolution"
    );
    assert_eq!(
        collision.subcode_as::<CeaseSubcode>(),
        Some(CeaseSubcode::CONNECTION_COLLISION_RESOLUTION)
    );
    assert_eq!(collision.subcode_as::<OpenSubcode>(), None);

    let cases: [(Notification, &str); 6] = [
        (
            Notification::of(HeaderSubcode::BAD_MESSAGE_TYPE, vec![9]),
            "Message Header Error / Bad Message Type",
        ),
        (
            Notification::of(OpenSubcode::BAD_BGP_IDENTIFIER, vec![]),
            "OPEN Message Error / Bad BGP Identifier",
        ),
        (
            Notification::update(UpdateSubcode::MALFORMED_AS_PATH),
            "UPDATE Message Error / Malformed AS_PATH",
        ),
        (
            Notification::of(FsmSubcode::UNEXPECTED_IN_OPENCONFIRM, vec![]),
            "Finite State Machine Error / Receive Unexpected Message in OpenConfirm State",
        ),
        (
            Notification::cease(CeaseSubcode::ADMINISTRATIVE_RESET),
            "Cease / Administrative Reset",
        ),
        (
            Notification::of(RouteRefreshSubcode::INVALID_MESSAGE_LENGTH, vec![]),
            "ROUTE-REFRESH Message Error / Invalid Message Length",
        ),
    ];
    for (n, text) in cases {
        assert_eq!(n.to_string(), text);
    }
    assert_eq!(CeaseSubcode::HARD_RESET.to_string(), "Hard Reset");
    assert_eq!(CeaseSubcode(42).to_string(), "CeaseSubcode(0x2a)");
    assert_eq!(
        Notification::cease(CeaseSubcode(42)).to_string(),
        "Cease / subcode 42"
    );
}

#[test]
fn route_refresh_golden() {
    let mut out = Vec::new();
    wire::encode_route_refresh(&mut out, Family::Ipv6Unicast);
    assert_bytes(&out, &message(5, &[0, 2, 0, 1]));
}

#[test]
fn open_golden_and_round_trip() {
    let open = Open {
        my_as: 23456,
        hold_time: 90,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        capabilities: Capabilities {
            families: vec![Family::Ipv4Unicast, Family::Ipv6Unicast],
            four_octet_as: Some(4_200_000_001),
            route_refresh: true,
            enhanced_route_refresh: false,
            graceful_restart: Some(GracefulRestartCap {
                restarting: true,
                restart_time: 120,
                families: vec![(Family::Ipv4Unicast, true), (Family::Ipv6Unicast, true)],
            }),
            extended_message: true,
            any_multiprotocol: true,
            other: vec![],
        },
    };
    let mut out = Vec::new();
    open.encode(&mut out);
    // Each capability in its own optional parameter (type 2).
    let caps: Vec<Vec<u8>> = vec![
        vec![1, 4, 0, 1, 0, 1], // MP IPv4 unicast
        vec![1, 4, 0, 2, 0, 1], // MP IPv6 unicast
        vec![2, 0],             // route refresh
        vec![6, 0],             // extended message
        {
            let mut gr = vec![64, 10];
            gr.extend_from_slice(&(0x8000u16 | 120).to_be_bytes());
            gr.extend_from_slice(&[0, 1, 1, 0x80, 0, 2, 1, 0x80]);
            gr
        },
        {
            let mut a = vec![65, 4];
            a.extend_from_slice(&4_200_000_001u32.to_be_bytes());
            a
        },
    ];
    let mut params = Vec::new();
    for c in &caps {
        params.push(2);
        params.push(c.len() as u8);
        params.extend_from_slice(c);
    }
    let mut body = vec![4];
    body.extend_from_slice(&23456u16.to_be_bytes());
    body.extend_from_slice(&90u16.to_be_bytes());
    body.extend_from_slice(&[10, 0, 0, 1]);
    body.push(params.len() as u8);
    body.extend_from_slice(&params);
    assert_bytes(&out, &message(1, &body));
    match wire::decode(&out, 4096) {
        Ok(Message::Open(back)) => {
            assert_eq!(back, open);
            assert_eq!(back.peer_as(), 4_200_000_001);
            let mut again = Vec::new();
            back.encode(&mut again);
            assert_bytes(&again, &out);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn open_errors_map_to_notification_subcodes() {
    let mut body = vec![3, 0xfd, 0xe9, 0, 90, 10, 0, 0, 1, 0];
    let bad_version = message(1, &body);
    let n = match wire::decode(&bad_version, 4096) {
        Err(n) => n,
        Ok(m) => panic!("{m:?}"),
    };
    assert_eq!(
        n.to_string(),
        "OPEN Message Error / Unsupported Version Number"
    );
    body[0] = 4;
    body[3] = 0;
    body[4] = 2; // hold time 2
    let n = wire::decode(&message(1, &body), 4096).unwrap_err();
    assert_eq!(n.to_string(), "OPEN Message Error / Unacceptable Hold Time");
}

#[test]
fn header_errors() {
    let mut bad_marker = message(4, &[]);
    bad_marker[3] = 0;
    assert_eq!(
        wire::decode(&bad_marker, 4096).unwrap_err().to_string(),
        "Message Header Error / Connection Not Synchronized"
    );
    assert_eq!(
        wire::decode(&message(4, &[0]), 4096)
            .unwrap_err()
            .to_string(),
        "Message Header Error / Bad Message Length"
    );
    assert_eq!(
        wire::decode(&message(9, &[]), 4096)
            .unwrap_err()
            .to_string(),
        "Message Header Error / Bad Message Type"
    );
    assert_eq!(wire::message_len(&message(4, &[])[..18]), None);
    assert_eq!(wire::message_len(&message(4, &[])), Some(19));
}

#[test]
fn update_v4_golden_and_netgauze_agrees() {
    let attrs = RouteAttrs {
        med: Some(5),
        local_pref: Some(200), // not sent: eBGP
        communities: vec![0xfde9_0064],
        large_communities: vec![LargeCommunity {
            global_admin: 65001,
            local_data1: 1,
            local_data2: 2,
        }],
    };
    let prefixes: Vec<IpNet> = vec![
        "203.0.113.7/32".parse().unwrap(),
        "198.51.100.0/24".parse().unwrap(),
    ];
    let mut out = vec![];
    let n =
        update::encode_announcements(&ctx(4096), Family::Ipv4Unicast, &attrs, &prefixes, &mut out)
            .unwrap();
    assert_eq!(n, 1);
    let mut pa = Vec::new();
    pa.extend_from_slice(&[0x40, 1, 1, 0]);
    pa.extend_from_slice(&[0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xe9]);
    pa.extend_from_slice(&[0x80, 4, 4, 0, 0, 0, 5]);
    pa.extend_from_slice(&[0xc0, 8, 4, 0xfd, 0xe9, 0, 0x64]);
    pa.extend_from_slice(&[0xc0, 32, 12, 0, 0, 0xfd, 0xe9, 0, 0, 0, 1, 0, 0, 0, 2]);
    pa.extend_from_slice(&[0x40, 3, 4, 192, 0, 2, 1]);
    let mut body = vec![0, 0];
    body.extend_from_slice(&(pa.len() as u16).to_be_bytes());
    body.extend_from_slice(&pa);
    body.extend_from_slice(&[32, 203, 0, 113, 7, 24, 198, 51, 100]);
    assert_bytes(&out, &message(2, &body));

    let BgpMessage::Update(u) = netgauze_decode(&out, true) else {
        panic!("not an update")
    };
    assert_eq!(u.nlri().len(), 2);
    let kinds: Vec<String> = u
        .path_attributes()
        .iter()
        .map(|a| format!("{:?}", std::mem::discriminant(a.value())))
        .collect();
    assert_eq!(kinds.len(), 6);
    assert!(u
        .path_attributes()
        .iter()
        .any(|a| matches!(a.value(), PathAttributeValue::LargeCommunities(_))));
}

#[test]
fn update_v6_mp_reach_golden_and_netgauze_agrees() {
    let mut c = ctx(4096);
    c.ibgp = true;
    let prefixes: Vec<IpNet> = vec!["fd00:1::5/128".parse().unwrap()];
    let mut out = vec![];
    update::encode_announcements(
        &c,
        Family::Ipv6Unicast,
        &RouteAttrs::default(),
        &prefixes,
        &mut out,
    )
    .unwrap();
    let nh: Ipv6Addr = "fd00::1".parse().unwrap();
    let mut mp = vec![0, 2, 1, 16];
    mp.extend_from_slice(&nh.octets());
    mp.push(0);
    mp.push(128);
    mp.extend_from_slice(&"fd00:1::5".parse::<Ipv6Addr>().unwrap().octets());
    let mut pa = vec![0x40, 1, 1, 0, 0x40, 2, 0, 0x40, 5, 4, 0, 0, 0, 100];
    pa.extend_from_slice(&[0x90, 14]);
    pa.extend_from_slice(&(mp.len() as u16).to_be_bytes());
    pa.extend_from_slice(&mp);
    let mut body = vec![0, 0];
    body.extend_from_slice(&(pa.len() as u16).to_be_bytes());
    body.extend_from_slice(&pa);
    assert_bytes(&out, &message(2, &body));
    assert!(matches!(netgauze_decode(&out, true), BgpMessage::Update(_)));
}

#[test]
fn withdrawals_and_end_of_rib_golden() {
    let mut out = vec![];
    let p: Vec<IpNet> = vec!["10.1.2.3/32".parse().unwrap()];
    update::encode_withdrawals(&ctx(4096), Family::Ipv4Unicast, &p, &mut out);
    assert_bytes(&out, &message(2, &[0, 5, 32, 10, 1, 2, 3, 0, 0]));
    out.clear();
    update::encode_end_of_rib(Family::Ipv4Unicast, &mut out);
    assert_bytes(&out, &message(2, &[0, 0, 0, 0]));
    out.clear();
    update::encode_end_of_rib(Family::Ipv6Unicast, &mut out);
    assert_bytes(&out, &message(2, &[0, 0, 0, 6, 0x80, 15, 3, 0, 2, 1]));
    let ictx = InspectContext {
        four_octet_as: true,
        ibgp: false,
    };
    let s = update::inspect(&out[19..], ictx).unwrap();
    assert_eq!(s.end_of_rib, Some(Family::Ipv6Unicast));
    out.clear();
    let p6: Vec<IpNet> = vec!["fd00::/64".parse().unwrap()];
    update::encode_withdrawals(&ctx(4096), Family::Ipv6Unicast, &p6, &mut out);
    assert!(matches!(netgauze_decode(&out, true), BgpMessage::Update(_)));
    let s = update::inspect(&out[19..], ictx).unwrap();
    assert_eq!((s.withdrawn, s.end_of_rib), (1, None));
}

#[test]
fn every_packed_update_fits_and_decodes() {
    let prefixes: Vec<IpNet> = (0..5000u32)
        .map(|i| IpNet::new(Ipv4Addr::from(0x0a00_0000 + i * 256).into(), 24).unwrap())
        .collect();
    let mut out = vec![];
    let n = update::encode_announcements(
        &ctx(4096),
        Family::Ipv4Unicast,
        &RouteAttrs::default(),
        &prefixes,
        &mut out,
    )
    .unwrap();
    let mut rest = &out[..];
    let mut total = 0;
    let mut count = 0;
    while let Some(len) = wire::message_len(rest) {
        assert!(len <= 4096);
        let BgpMessage::Update(u) = netgauze_decode(&rest[..len], true) else {
            panic!()
        };
        total += u.nlri().len();
        count += 1;
        rest = &rest[len..];
    }
    assert_eq!((count, total), (n, 5000));
}

// ---- RFC 7606 ----

fn update_body(withdrawn: &[u8], attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(withdrawn.len() as u16).to_be_bytes());
    b.extend_from_slice(withdrawn);
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(attrs);
    b.extend_from_slice(nlri);
    b
}

const ORIGIN: [u8; 4] = [0x40, 1, 1, 0];
const AS_PATH: [u8; 9] = [0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xea];
const NEXT_HOP: [u8; 7] = [0x40, 3, 4, 192, 0, 2, 2];
const NLRI: [u8; 5] = [32, 10, 0, 0, 1];
const EBGP: InspectContext = InspectContext {
    four_octet_as: true,
    ibgp: false,
};

fn with(extra: &[u8]) -> Vec<u8> {
    let mut a = ORIGIN.to_vec();
    a.extend_from_slice(&AS_PATH);
    a.extend_from_slice(&NEXT_HOP);
    a.extend_from_slice(extra);
    update_body(&[], &a, &NLRI)
}

fn action(body: &[u8]) -> (ErrorAction, Option<AttrType>) {
    let s = update::inspect(body, EBGP).unwrap();
    (s.action, s.culprit)
}

#[test]
fn rfc7606_well_formed_update_counts_prefixes() {
    let s = update::inspect(&with(&[]), EBGP).unwrap();
    assert_eq!((s.announced, s.action), (1, ErrorAction::None));
}

#[test]
fn rfc7606_bad_origin_value_is_treat_as_withdraw() {
    let mut a = vec![0x40, 1, 1, 7];
    a.extend_from_slice(&AS_PATH);
    a.extend_from_slice(&NEXT_HOP);
    let s = update::inspect(&update_body(&[], &a, &NLRI), EBGP).unwrap();
    assert_eq!(
        (s.action, s.culprit),
        (ErrorAction::TreatAsWithdraw, Some(AttrType::ORIGIN))
    );
}

#[test]
fn rfc7606_missing_mandatory_attribute_is_treat_as_withdraw() {
    let mut a = ORIGIN.to_vec();
    a.extend_from_slice(&NEXT_HOP);
    let s = update::inspect(&update_body(&[], &a, &NLRI), EBGP).unwrap();
    assert_eq!(
        (s.action, s.culprit),
        (ErrorAction::TreatAsWithdraw, Some(AttrType::AS_PATH))
    );
    // Without NLRI, nothing is missing.
    let s = update::inspect(&update_body(&[], &a, &[]), EBGP).unwrap();
    assert_eq!(s.action, ErrorAction::None);
}

#[test]
fn rfc7606_bad_community_length_is_treat_as_withdraw() {
    assert_eq!(
        action(&with(&[0xc0, 8, 3, 1, 2, 3])),
        (ErrorAction::TreatAsWithdraw, Some(AttrType::COMMUNITIES))
    );
    assert_eq!(
        action(&with(&[0xc0, 32, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
        (
            ErrorAction::TreatAsWithdraw,
            Some(AttrType::LARGE_COMMUNITIES)
        )
    );
}

#[test]
fn rfc7606_bad_atomic_aggregate_and_aggregator_are_discarded() {
    assert_eq!(
        action(&with(&[0x40, 6, 1, 0])),
        (
            ErrorAction::AttributeDiscard,
            Some(AttrType::ATOMIC_AGGREGATE)
        )
    );
    assert_eq!(
        action(&with(&[0xc0, 7, 3, 0, 0, 0])),
        (ErrorAction::AttributeDiscard, Some(AttrType::AGGREGATOR))
    );
}

#[test]
fn rfc7606_local_pref_from_external_peer_is_discarded() {
    assert_eq!(
        action(&with(&[0x40, 5, 4, 0, 0, 0, 100])),
        (ErrorAction::AttributeDiscard, Some(AttrType::LOCAL_PREF))
    );
}

#[test]
fn rfc7606_duplicate_attribute_keeps_first() {
    assert_eq!(
        action(&with(&ORIGIN)),
        (ErrorAction::AttributeDiscard, Some(AttrType::ORIGIN))
    );
}

#[test]
fn rfc7606_attribute_overrunning_the_list_is_treat_as_withdraw() {
    // MED claims 4 bytes, list ends after 2.
    assert_eq!(
        action(&with(&[0x80, 4, 4, 0, 0])).0,
        ErrorAction::TreatAsWithdraw
    );
    // Fewer than three bytes left for a header.
    assert_eq!(action(&with(&[0x80, 4])).0, ErrorAction::TreatAsWithdraw);
}

#[test]
fn rfc7606_session_reset_cases() {
    // Total attribute length runs past the message.
    let mut b = with(&[]);
    b[3] = 200;
    assert_eq!(
        update::inspect(&b, EBGP).unwrap_err().to_string(),
        "UPDATE Message Error / Malformed Attribute List"
    );
    // NLRI prefix length 33.
    let mut a = ORIGIN.to_vec();
    a.extend_from_slice(&AS_PATH);
    a.extend_from_slice(&NEXT_HOP);
    assert_eq!(
        update::inspect(&update_body(&[], &a, &[33, 1, 2, 3, 4, 5]), EBGP)
            .unwrap_err()
            .to_string(),
        "UPDATE Message Error / Invalid Network Field"
    );
    // Malformed MP_REACH_NLRI.
    assert_eq!(
        update::inspect(&with(&[0x80, 14, 3, 0, 2, 1]), EBGP)
            .unwrap_err()
            .to_string(),
        "UPDATE Message Error / Optional Attribute Error"
    );
    // Repeated MP_UNREACH_NLRI.
    let two = [0x80, 15, 3, 0, 2, 1, 0x80, 15, 3, 0, 2, 1];
    assert_eq!(
        update::inspect(&update_body(&[], &two, &[]), EBGP)
            .unwrap_err()
            .to_string(),
        "UPDATE Message Error / Malformed Attribute List"
    );
    // Unrecognized well-known attribute.
    assert_eq!(
        update::inspect(&with(&[0x40, 99, 0]), EBGP)
            .unwrap_err()
            .to_string(),
        "UPDATE Message Error / Unrecognized Well-known Attribute"
    );
}

#[test]
fn rfc7606_unknown_optional_attribute_is_fine() {
    assert_eq!(action(&with(&[0xc0, 99, 2, 1, 2])).0, ErrorAction::None);
}

#[test]
fn two_octet_as_path_is_checked_with_two_octet_width() {
    let ctx2 = InspectContext {
        four_octet_as: false,
        ibgp: false,
    };
    let mut a = ORIGIN.to_vec();
    a.extend_from_slice(&[0x40, 2, 4, 2, 1, 0xfd, 0xea]);
    a.extend_from_slice(&NEXT_HOP);
    let s = update::inspect(&update_body(&[], &a, &NLRI), ctx2).unwrap();
    assert_eq!(s.action, ErrorAction::None);
    let s = update::inspect(&update_body(&[], &a, &NLRI), EBGP).unwrap();
    assert_eq!(s.action, ErrorAction::TreatAsWithdraw);
}
