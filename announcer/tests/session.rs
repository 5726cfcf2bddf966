//! Session FSM, timers and negotiation, driven by a simulated clock.

mod common;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{config_a, config_b, split_messages, Pair};
use ipnet::IpNet;
use portico_announcer::session::{
    resolve_collision, CollisionLoser, Direction, Event, GracefulRestartConfig, Session,
    SessionConfig, State,
};
use portico_announcer::wire::CeaseSubcode;
use portico_announcer::{Command, Family, RouteAttrs};

fn v4_prefixes(n: u32) -> Vec<IpNet> {
    (0..n)
        .map(|i| IpNet::new(Ipv4Addr::from(0x0a00_0000 + i).into(), 32).unwrap())
        .collect()
}

fn v6_prefixes(n: u32) -> Vec<IpNet> {
    (0..n)
        .map(|i| {
            let a = std::net::Ipv6Addr::from(
                0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + u128::from(i),
            );
            IpNet::new(a.into(), 128).unwrap()
        })
        .collect()
}

#[test]
fn two_sessions_reach_established_and_agree_on_capabilities() {
    let mut p = Pair::default_pair();
    p.established();
    let n = p.a.negotiated().unwrap();
    assert_eq!(n.hold_time, 90);
    assert_eq!(n.keepalive_time, 30);
    assert!(n.four_octet_as && n.route_refresh && n.extended_message);
    assert_eq!(n.families, vec![Family::Ipv4Unicast, Family::Ipv6Unicast]);
    assert_eq!(n.peer_router_id, Ipv4Addr::new(192, 0, 2, 2));
    let states: Vec<State> = p
        .a_events
        .iter()
        .filter_map(|e| match e {
            Event::StateChanged { to, .. } => Some(*to),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            State::Connect,
            State::OpenSent,
            State::OpenConfirm,
            State::Established
        ]
    );
    assert!(p
        .b_events
        .iter()
        .any(|e| matches!(e, Event::Established(_))));
}

#[test]
fn keepalives_keep_an_idle_session_up() {
    let mut p = Pair::default_pair();
    p.established();
    p.advance(Duration::from_secs(600));
    assert_eq!(p.a.state(), State::Established);
    assert_eq!(p.b.state(), State::Established);
}

#[test]
fn frozen_peer_past_hold_time_gets_hold_timer_expired_and_session_recovers() {
    let mut p = Pair::default_pair();
    p.established();
    p.b_frozen = true;
    p.advance(Duration::from_secs(91));
    assert_ne!(p.a.state(), State::Established);
    let status = p.a.status(p.now);
    assert_eq!(
        status.last_notification_sent.as_deref(),
        Some("Hold Timer Expired")
    );
    // SIGCONT: the peer notices the dead connection, and A reconnects automatically.
    p.b_frozen = false;
    p.b.handle_closed(p.now);
    p.advance(Duration::from_secs(10));
    assert_eq!(p.a.state(), State::Established, "{:?}", p.a_events);
}

#[test]
fn wrong_peer_as_is_refused_with_bad_peer_as_text() {
    let mut b = config_b();
    b.peer_as = 65099;
    let mut p = Pair::new(config_a(), b);
    p.start();
    assert_ne!(p.a.state(), State::Established);
    let a = p.a.status(p.now);
    assert_eq!(
        a.last_notification_received.as_deref(),
        Some("OPEN Message Error / Bad Peer AS")
    );
    let b = p.b.status(p.now);
    assert_eq!(
        b.last_notification_sent.as_deref(),
        Some("OPEN Message Error / Bad Peer AS")
    );
}

#[test]
fn stop_sends_administrative_shutdown() {
    let mut p = Pair::default_pair();
    p.established();
    let now = p.now;
    p.a.handle_command(now, Command::Stop);
    p.drive();
    assert_eq!(p.a.state(), State::Idle);
    assert_eq!(
        p.b.status(p.now).last_notification_received.as_deref(),
        Some("Cease / Administrative Shutdown")
    );
    // No automatic restart after a manual stop.
    p.advance(Duration::from_secs(300));
    assert_eq!(p.a.state(), State::Idle);
}

#[test]
fn connect_retry_fires_with_jitter_while_peer_is_absent() {
    let mut p = Pair::default_pair();
    let now = p.now;
    p.a.handle_command(now, Command::Start);
    p.drive(); // B is Idle: the connect fails, A goes Active.
    assert_eq!(p.a.state(), State::Active);
    let deadline = p.a.poll_timeout().unwrap();
    let wait = deadline - p.now;
    assert!(
        wait >= Duration::from_millis(3750) && wait <= Duration::from_secs(5),
        "{wait:?}"
    );
    let connects = |p: &Pair| p.a_events.iter().filter(|e| **e == Event::Connect).count();
    assert_eq!(connects(&p), 1);
    p.advance(Duration::from_secs(5));
    assert_eq!(connects(&p), 2);
    // Once the peer listens, the next retry establishes.
    let now = p.now;
    p.b.handle_command(now, Command::Start);
    p.advance(Duration::from_secs(5));
    assert_eq!(p.a.state(), State::Established);
}

#[test]
fn delay_open_waits_for_the_peer_open() {
    let mut b = config_b();
    b.delay_open = Some(Duration::from_secs(3));
    let mut p = Pair::new(config_a(), b);
    p.start();
    // B held its OPEN; A's OPEN arrived, so B answered at once.
    assert_eq!(p.b.state(), State::Established);
    assert_eq!(p.a.state(), State::Established);
}

#[test]
fn delay_open_expiry_sends_open() {
    let mut a = config_a();
    a.delay_open = Some(Duration::from_secs(3));
    let mut b = config_b();
    b.delay_open = Some(Duration::from_secs(5));
    let mut p = Pair::new(a, b);
    p.start();
    assert_eq!(p.a.state(), State::Connect);
    p.advance(Duration::from_secs(3));
    assert_eq!(p.a.state(), State::Established);
}

#[test]
fn two_octet_peer_gets_as_trans_and_as4_path() {
    let mut a = config_a();
    a.local_as = 4_200_000_001;
    let mut b = config_b();
    b.four_octet_as = false;
    b.peer_as = 23456;
    let mut p = Pair::new(a, b);
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(1),
            attrs: RouteAttrs::default(),
        },
    );
    p.established();
    assert!(!p.a.negotiated().unwrap().four_octet_as);
    let bytes = p.a_bytes();
    let msgs = split_messages(&bytes);
    // OPEN carries AS_TRANS in My AS.
    assert_eq!(&msgs[0][20..22], &23456u16.to_be_bytes());
    let update = msgs.iter().find(|m| m[18] == 2).unwrap();
    // AS_PATH with a 2-octet AS_TRANS, AS4_PATH with the real AS.
    let as_path = [0x40, 2, 4, 2, 1, 0x5b, 0xa0];
    let as4_path = [0xc0, 17, 6, 2, 1, 0xfa, 0x56, 0xea, 0x01];
    let has = |needle: &[u8]| update.windows(needle.len()).any(|w| w == needle);
    assert!(has(&as_path), "{}", portico_announcer::wire::hex(update));
    assert!(has(&as4_path), "{}", portico_announcer::wire::hex(update));
    assert_eq!(p.b_updates()[0].announced, 1);
}

#[test]
fn four_octet_peer_gets_a_four_octet_as_path() {
    let mut a = config_a();
    a.local_as = 4_200_000_001;
    let mut b = config_b();
    b.peer_as = 4_200_000_001;
    let mut p = Pair::new(a, b);
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(1),
            attrs: RouteAttrs::default(),
        },
    );
    p.established();
    assert!(p.a.negotiated().unwrap().four_octet_as);
    let bytes = p.a_bytes();
    let update = split_messages(&bytes)
        .into_iter()
        .find(|m| m[18] == 2)
        .unwrap()
        .to_vec();
    let as_path = [0x40, 2, 6, 2, 1, 0xfa, 0x56, 0xea, 0x01];
    assert!(update.windows(as_path.len()).any(|w| w == as_path));
    assert!(!update.windows(2).any(|w| w == [0xc0, 17]));
}

#[test]
fn graceful_restart_sends_end_of_rib_after_the_table_for_each_family() {
    let mut a = config_a();
    a.graceful_restart = Some(GracefulRestartConfig {
        restart_time: 120,
        restarting: true,
        forwarding_state: true,
    });
    let mut p = Pair::new(a, config_b());
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(3).into_iter().chain(v6_prefixes(2)).collect(),
            attrs: RouteAttrs::default(),
        },
    );
    p.established();
    let ups = p.b_updates();
    let eor: Vec<Option<Family>> = ups.iter().map(|u| u.end_of_rib).collect();
    assert_eq!(
        eor,
        [
            None,
            None,
            Some(Family::Ipv4Unicast),
            Some(Family::Ipv6Unicast)
        ]
    );
    // The peer saw the R and F bits.
    let n = p.b.negotiated().unwrap();
    let gr = n.peer_capabilities.graceful_restart.as_ref().unwrap();
    assert!(gr.restarting);
    assert_eq!(gr.restart_time, 120);
    assert!(gr.families.iter().all(|(_, f)| *f));
    // The R bit is only for the first session after a restart.
    let now = p.now;
    p.a.handle_command(now, Command::Stop);
    p.a.handle_command(now, Command::Start);
    p.drive();
    p.advance(Duration::from_secs(10));
    let n = p.b.negotiated().unwrap();
    assert!(
        !n.peer_capabilities
            .graceful_restart
            .as_ref()
            .unwrap()
            .restarting
    );
}

#[test]
fn no_end_of_rib_without_graceful_restart() {
    let mut p = Pair::default_pair();
    p.established();
    assert!(p.b_updates().is_empty());
}

#[test]
fn route_refresh_request_is_answered_with_the_adj_rib_out() {
    let mut p = Pair::default_pair();
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(100)
                .into_iter()
                .chain(v6_prefixes(10))
                .collect(),
            attrs: RouteAttrs::default(),
        },
    );
    p.established();
    let before: usize = p.b_updates().iter().map(|u| u.announced).sum();
    assert_eq!(before, 110);
    let now = p.now;
    p.b.handle_command(now, Command::RequestRefresh(Family::Ipv6Unicast));
    p.drive();
    let after: usize = p.b_updates().iter().map(|u| u.announced).sum();
    assert_eq!(after - before, 10);
}

#[test]
fn full_table_is_packed_into_few_updates() {
    let mut b = config_b();
    b.extended_message = false;
    let mut p = Pair::new(config_a(), b);
    let now = p.now;
    let attrs = RouteAttrs {
        communities: vec![0xfde8_0001],
        ..Default::default()
    };
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(10_000),
            attrs,
        },
    );
    p.established();
    let ups = p.b_updates();
    assert_eq!(ups.iter().map(|u| u.announced).sum::<usize>(), 10_000);
    // 5 bytes per /32; attributes ORIGIN(4)+AS_PATH(9)+COMMUNITIES(7)+NEXT_HOP(7)=27:
    // (4096-23-27)/5 = 809 per message.
    assert_eq!(ups.len(), 10_000usize.div_ceil(809));
    assert_eq!(p.a.status(p.now).advertised, [10_000, 0]);
}

#[test]
fn extended_messages_pack_more_per_update() {
    let mut p = Pair::default_pair();
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(100_000),
            attrs: RouteAttrs::default(),
        },
    );
    p.established();
    let ups = p.b_updates();
    assert_eq!(ups.iter().map(|u| u.announced).sum::<usize>(), 100_000);
    // (65535-23-20)/5 = 13098 per message.
    assert_eq!(ups.len(), 100_000usize.div_ceil(13_098));
}

#[test]
fn withdrawals_and_changes_are_batched() {
    let mut b = config_b();
    b.extended_message = false;
    let mut p = Pair::new(config_a(), b);
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(2000)
                .into_iter()
                .chain(v6_prefixes(500))
                .collect(),
            attrs: RouteAttrs::default(),
        },
    );
    p.established();
    let n0 = p.b_updates().len();
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Withdraw {
            prefixes: v4_prefixes(1000)
                .into_iter()
                .chain(v6_prefixes(500))
                .collect(),
        },
    );
    p.drive();
    let ups = p.b_updates();
    let new = &ups[n0..];
    assert_eq!(new.iter().map(|u| u.withdrawn).sum::<usize>(), 1500);
    // (4096-23)/5 = 814 v4 per message; v6 /128 = 17 bytes: (4096-23-7)/17 = 239.
    assert_eq!(new.len(), 1000usize.div_ceil(814) + 500usize.div_ceil(239));
    assert_eq!(p.a.status(p.now).advertised, [1000, 0]);
}

#[test]
fn attribute_change_re_announces_only_changed_prefixes() {
    let mut p = Pair::default_pair();
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(10),
            attrs: RouteAttrs::default(),
        },
    );
    p.established();
    let n0 = p.b_updates().len();
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(3),
            attrs: RouteAttrs {
                med: Some(10),
                ..Default::default()
            },
        },
    );
    // Re-announcing unchanged prefixes sends nothing.
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(10)[5..].to_vec(),
            attrs: RouteAttrs::default(),
        },
    );
    p.drive();
    let ups = p.b_updates();
    assert_eq!(ups.len() - n0, 1);
    assert_eq!(ups[n0].announced, 3);
}

#[test]
fn unexpected_update_in_open_confirm_is_an_fsm_error() {
    let mut p = Pair::default_pair();
    let now = p.now;
    p.b.handle_command(now, Command::Start);
    p.a.handle_command(now, Command::Start);
    // Deliver A's OPEN to B by hand without B's reply reaching A.
    while let Some(e) = p.a.poll_event() {
        if e == Event::Connect {
            let a = common::A_ADDR.parse().unwrap();
            let b = common::B_ADDR.parse().unwrap();
            assert!(p
                .a
                .handle_connected(now, a, b, portico_announcer::Direction::Outbound));
            assert!(p
                .b
                .handle_connected(now, b, a, portico_announcer::Direction::Inbound));
        }
    }
    let open = p.a.poll_transmit().unwrap();
    p.b.handle_bytes(now, &open);
    assert_eq!(p.b.state(), State::OpenConfirm);
    let mut eor = Vec::new();
    portico_announcer::update::encode_end_of_rib(Family::Ipv4Unicast, &mut eor);
    p.b.handle_bytes(now, &eor);
    assert_eq!(p.b.state(), State::Idle);
    assert_eq!(
        p.b.status(now).last_notification_sent.as_deref(),
        Some("Finite State Machine Error / Receive Unexpected Message in OpenConfirm State")
    );
}

#[test]
fn ipv6_session_announces_ipv4_with_configured_next_hop_only() {
    use portico_announcer::Direction;
    let mut a = config_a();
    a.next_hop_v4 = None;
    let mut p = Pair::new(a, config_b());
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(2).into_iter().chain(v6_prefixes(2)).collect(),
            attrs: RouteAttrs::default(),
        },
    );
    p.a.handle_command(now, Command::Start);
    p.b.handle_command(now, Command::Start);
    while let Some(e) = p.a.poll_event() {
        if e == Event::Connect {
            let a = "[fd00::1]:40000".parse().unwrap();
            let b = "[fd00::2]:179".parse().unwrap();
            assert!(p.a.handle_connected(now, a, b, Direction::Outbound));
            assert!(p.b.handle_connected(now, b, a, Direction::Inbound));
            p.connected = true;
        }
    }
    p.drive();
    assert_eq!(p.a.state(), State::Established);
    assert!(p.a_events.contains(&Event::NoNextHop(Family::Ipv4Unicast)));
    assert_eq!(p.a.status(p.now).advertised, [0, 2]);
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn med(m: u32) -> RouteAttrs {
    RouteAttrs {
        med: Some(m),
        ..Default::default()
    }
}

/// The IPv4 UPDATEs A sent from byte `from` on: (withdrawn, attributes, announced).
fn updates_since(p: &Pair, from: usize) -> Vec<(Vec<IpNet>, Vec<u8>, Vec<IpNet>)> {
    let bytes = p.a_bytes();
    split_messages(&bytes[from..])
        .into_iter()
        .filter_map(common::ipv4_update)
        .collect()
}

#[test]
fn replacing_routes_sends_only_the_difference() {
    let mut p = Pair::default_pair();
    let now = p.now;
    let before: BTreeMap<IpNet, RouteAttrs> = [
        (net("10.0.0.1/32"), med(1)),
        (net("10.0.0.2/32"), med(1)),
        (net("10.0.0.3/32"), med(2)),
    ]
    .into();
    p.a.handle_command(now, Command::Replace { routes: before });
    p.established();
    let from = p.a_bytes().len();
    let now = p.now;
    // .1 unchanged, .2 gone, .3 changes attributes, .4 is new (with .1's attributes).
    let after: BTreeMap<IpNet, RouteAttrs> = [
        (net("10.0.0.1/32"), med(1)),
        (net("10.0.0.3/32"), med(3)),
        (net("10.0.0.4/32"), med(1)),
    ]
    .into();
    p.a.handle_command(
        now,
        Command::Replace {
            routes: after.clone(),
        },
    );
    p.drive();
    let ups = updates_since(&p, from);
    assert_eq!(ups.len(), 3, "{ups:?}");
    assert_eq!(ups[0].0, vec![net("10.0.0.2/32")]);
    assert!(ups[0].2.is_empty());
    // Announcement groups in the order of their first prefix: .3 (MED 3), then .4.
    assert_eq!(ups[1].2, vec![net("10.0.0.3/32")]);
    assert_eq!(ups[2].2, vec![net("10.0.0.4/32")]);
    assert!(ups[1..].iter().all(|u| u.0.is_empty()));
    let rib: BTreeMap<IpNet, RouteAttrs> = p.a.routes().map(|(p, a)| (*p, a.clone())).collect();
    assert_eq!(rib, after);
    assert_eq!(p.a.status(p.now).advertised, [3, 0]);
}

#[test]
fn replacing_with_the_same_routes_sends_nothing() {
    let mut p = Pair::default_pair();
    let now = p.now;
    let routes: BTreeMap<IpNet, RouteAttrs> = v4_prefixes(50)
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, med(i as u32 % 3)))
        .collect();
    p.a.handle_command(
        now,
        Command::Replace {
            routes: routes.clone(),
        },
    );
    p.established();
    let from = p.a_bytes().len();
    let now = p.now;
    // Host bits are truncated away, as with Announce.
    let mut again = routes.clone();
    let first = *again.keys().next().unwrap();
    let a = again.remove(&first).unwrap();
    again.insert(net("10.0.0.0/32"), a);
    p.a.handle_command(now, Command::Replace { routes: again });
    p.drive();
    assert!(updates_since(&p, from).is_empty());
}

#[test]
fn replacing_with_nothing_withdraws_everything() {
    let mut p = Pair::default_pair();
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Announce {
            prefixes: v4_prefixes(20),
            attrs: med(7),
        },
    );
    p.established();
    let from = p.a_bytes().len();
    let now = p.now;
    p.a.handle_command(
        now,
        Command::Replace {
            routes: BTreeMap::new(),
        },
    );
    p.drive();
    let ups = updates_since(&p, from);
    assert_eq!(ups.len(), 1);
    assert_eq!(ups[0].0, v4_prefixes(20));
    assert_eq!(p.a.routes().count(), 0);
}

/// Eight attribute sets over interleaved prefixes: the full table at Established, then
/// changes, withdrawals and a replacement. Returns every byte A sent.
fn update_stream() -> Vec<u8> {
    let mut p = Pair::default_pair();
    let now = p.now;
    for i in 0..8u32 {
        let prefixes = v4_prefixes(64)
            .into_iter()
            .chain(v6_prefixes(64))
            .skip(i as usize)
            .step_by(8)
            .collect();
        p.a.handle_command(
            now,
            Command::Announce {
                prefixes,
                attrs: med(i),
            },
        );
    }
    p.established();
    let now = p.now;
    for i in 0..8u32 {
        let prefixes = v4_prefixes(128)
            .into_iter()
            .skip(i as usize)
            .step_by(5)
            .collect();
        p.a.handle_command(
            now,
            Command::Announce {
                prefixes,
                attrs: med(100 + i),
            },
        );
    }
    p.a.handle_command(
        now,
        Command::Withdraw {
            prefixes: v6_prefixes(64).into_iter().step_by(3).collect(),
        },
    );
    p.drive();
    let routes = v4_prefixes(40)
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, med(200 + (i as u32 * 7) % 8)))
        .collect();
    let now = p.now;
    p.a.handle_command(now, Command::Replace { routes });
    p.drive();
    p.a_bytes()
}

#[test]
fn same_inputs_give_byte_identical_update_streams() {
    let first = update_stream();
    assert!(split_messages(&first).len() > 20);
    for _ in 0..5 {
        let again = update_stream();
        assert!(
            first == again,
            "UPDATE streams differ between identical runs"
        );
    }
}

#[test]
fn stop_with_administrative_reset_sends_that_reason() {
    let mut p = Pair::default_pair();
    p.established();
    let now = p.now;
    p.a.handle_command(now, Command::StopWith(CeaseSubcode::ADMINISTRATIVE_RESET));
    p.drive();
    assert_eq!(p.a.state(), State::Idle);
    assert_eq!(
        p.b.status(p.now).last_notification_received.as_deref(),
        Some("Cease / Administrative Reset")
    );
}

/// Both speakers connect at once. Returns the four sessions, each with the peer's OPEN
/// (OpenConfirm): (A's outbound, B's inbound) on A's connection and (A's inbound, B's
/// outbound) on B's.
fn simultaneous_opens(a_cfg: &SessionConfig, b_cfg: &SessionConfig, now: Instant) -> [Session; 4] {
    let mk = |c: &SessionConfig, seed| {
        let mut s = Session::new(c.clone(), now, seed);
        s.handle_command(now, Command::Start);
        while s.poll_event().is_some() {}
        s
    };
    let (mut a_out, mut b_in) = (mk(a_cfg, 1), mk(b_cfg, 2));
    let (mut a_in, mut b_out) = (mk(a_cfg, 3), mk(b_cfg, 4));
    let (la, lb) = (
        common::A_ADDR.parse().unwrap(),
        common::B_ADDR.parse().unwrap(),
    );
    let (la2, lb2) = (
        "192.0.2.1:179".parse().unwrap(),
        "192.0.2.2:40001".parse().unwrap(),
    );
    assert!(a_out.handle_connected(now, la, lb, Direction::Outbound));
    assert!(b_in.handle_connected(now, lb, la, Direction::Inbound));
    assert!(b_out.handle_connected(now, lb2, la2, Direction::Outbound));
    assert!(a_in.handle_connected(now, la2, lb2, Direction::Inbound));
    // Exchange only the OPENs, so every session waits in OpenConfirm.
    for (x, y) in [(&mut a_out, &mut b_in), (&mut a_in, &mut b_out)] {
        let (tx, ty) = (x.poll_transmit().unwrap(), y.poll_transmit().unwrap());
        y.handle_bytes(now, &tx);
        x.handle_bytes(now, &ty);
    }
    for s in [&a_out, &b_in, &a_in, &b_out] {
        assert_eq!(s.state(), State::OpenConfirm);
    }
    [a_out, b_in, a_in, b_out]
}

/// Runs a collision and resolves it on `side` ("a" or "b"), the way the driver does with
/// its primary (outbound) and second (inbound) session. Returns whether A's connection
/// survived, after checking the loser's peer got Cease / Connection Collision Resolution
/// and the survivor reaches Established.
fn collide(a_cfg: &SessionConfig, b_cfg: &SessionConfig, side: &str) -> bool {
    let now = Instant::now();
    let [mut a_out, mut b_in, mut a_in, mut b_out] = simultaneous_opens(a_cfg, b_cfg, now);
    let (first, second) = match side {
        "a" => (&mut a_out, &mut a_in),
        _ => (&mut b_out, &mut b_in),
    };
    let loser = resolve_collision(now, first, second).expect("both have the OPEN");
    // Deciding again finds nothing left to decide.
    assert_eq!(resolve_collision(now, first, second), None);
    // A's primary is its outbound session, B's is its outbound one too.
    let a_conn_survives = match side {
        "a" => loser == CollisionLoser::Second,
        _ => loser == CollisionLoser::First,
    };
    let (mut lx, mut ly, mut wx, mut wy) = if a_conn_survives {
        (a_in, b_out, a_out, b_in)
    } else {
        (a_out, b_in, a_in, b_out)
    };
    // The closed session's NOTIFICATION reaches its peer.
    let (closed, open) = if side == "a" {
        (&mut lx, &mut ly)
    } else {
        (&mut ly, &mut lx)
    };
    let notification = closed.poll_transmit().expect("a NOTIFICATION");
    assert!(!closed.is_connected());
    open.handle_bytes(now, &notification);
    assert_eq!(open.state(), State::Idle);
    assert_eq!(
        open.status(now).last_notification_received.as_deref(),
        Some("Cease / Connection Collision Resolution")
    );
    for _ in 0..2 {
        while let Some(t) = wx.poll_transmit() {
            wy.handle_bytes(now, &t);
        }
        while let Some(t) = wy.poll_transmit() {
            wx.handle_bytes(now, &t);
        }
    }
    assert_eq!(wx.state(), State::Established);
    assert_eq!(wy.state(), State::Established);
    a_conn_survives
}

#[test]
fn collision_keeps_the_connection_of_the_higher_identifier_whichever_side_decides() {
    let mut a = config_a();
    let mut b = config_b();
    b.passive = false;
    // B (192.0.2.2) is higher: B's connection survives, decided on either side.
    assert!(!collide(&a, &b, "a"));
    assert!(!collide(&a, &b, "b"));
    // Swap the identifiers: A's connection survives.
    a.router_id = Ipv4Addr::new(192, 0, 2, 200);
    assert!(collide(&a, &b, "a"));
    assert!(collide(&a, &b, "b"));
}

#[test]
fn collision_between_equal_identifiers_keeps_the_connection_of_the_higher_as() {
    let a = config_a(); // AS 65001
    let mut b = config_b(); // AS 65002
    b.passive = false;
    b.router_id = a.router_id;
    assert!(!collide(&a, &b, "a"));
    assert!(!collide(&a, &b, "b"));
}

#[test]
fn collision_waits_for_both_opens() {
    let now = Instant::now();
    let mut b_cfg = config_b();
    b_cfg.passive = false;
    let [mut a_out, _, _, _] = simultaneous_opens(&config_a(), &b_cfg, now);
    let mut fresh = Session::new(config_a(), now, 9);
    fresh.handle_command(now, Command::Start);
    let (la, lb) = (
        "192.0.2.1:179".parse().unwrap(),
        "192.0.2.2:40001".parse().unwrap(),
    );
    assert!(fresh.handle_connected(now, la, lb, Direction::Inbound));
    assert_eq!(resolve_collision(now, &mut a_out, &mut fresh), None);
    assert_eq!(a_out.state(), State::OpenConfirm);
    assert_eq!(fresh.state(), State::OpenSent);
}

#[test]
fn inbound_connection_during_the_restart_hold_is_accepted_but_not_after_stop() {
    let mut p = Pair::default_pair();
    p.established();
    let now = p.now;
    // The connection drops: A waits in Idle for its automatic restart.
    p.a.handle_closed(now);
    assert_eq!(p.a.state(), State::Idle);
    assert!(p.a.accepts_connection());
    let (la, lb) = (
        "192.0.2.1:179".parse().unwrap(),
        "192.0.2.2:40001".parse().unwrap(),
    );
    assert!(p.a.handle_connected(now, la, lb, Direction::Inbound));
    assert_eq!(p.a.state(), State::OpenSent);
    // An outbound connect is never taken in Idle, and a stopped session refuses all.
    let mut s = Session::new(config_a(), now, 5);
    s.handle_command(now, Command::Start);
    s.handle_command(now, Command::Stop);
    assert!(!s.accepts_connection());
    assert!(!s.handle_connected(now, la, lb, Direction::Inbound));
}
