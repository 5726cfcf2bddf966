//! Two tokio Speakers peer over 127.0.0.1: OPEN -> Established -> UPDATE -> withdraw.
//! Both sides connect actively, so this also exercises collision resolution (§6.8).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use portico_announcer::driver::{AcceptBackoff, PeerConfig, PeersChanged, Speaker, SpeakerConfig};
use portico_announcer::{RouteAttrs, SessionConfig, State};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn speaker() -> Speaker {
    Speaker::bind(SpeakerConfig {
        listen: Some(SocketAddr::new(LOCALHOST, 0)),
        node_seed: 7,
    })
    .await
    .unwrap()
}

fn peer(local_as: u32, peer_as: u32, id: u8, port: u16, password: Option<&str>) -> PeerConfig {
    let mut s = SessionConfig::new(local_as, peer_as, Ipv4Addr::new(10, 0, 0, id));
    s.connect_retry_time = Duration::from_secs(1);
    s.idle_hold_time = Duration::from_millis(200);
    s.hold_time = 9;
    let mut p = PeerConfig::new(LOCALHOST, s);
    p.port = port;
    p.md5_password = password.map(str::to_owned);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_speakers_peer_over_loopback_and_exchange_routes() {
    let a = speaker().await;
    let b = speaker().await;
    let prefixes: Vec<IpNet> = ["198.51.100.1/32", "198.51.100.2/32", "fd00::10/128"]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    a.announce(
        prefixes.clone(),
        RouteAttrs {
            communities: vec![0xfde8_0001],
            ..Default::default()
        },
    );
    a.add_peer(peer(
        4_200_000_001,
        4_200_000_002,
        1,
        b.local_addr().unwrap().port(),
        None,
    ))
    .unwrap();
    b.add_peer(peer(
        4_200_000_002,
        4_200_000_001,
        2,
        a.local_addr().unwrap().port(),
        None,
    ))
    .unwrap();
    let t = Duration::from_secs(10);
    let up = a
        .wait_for(LOCALHOST, t, |s| s.state() == State::Established)
        .await
        .expect("a established");
    let n = up.session.negotiated.as_ref().unwrap();
    assert!(n.four_octet_as);
    assert_eq!(n.peer_as, 4_200_000_002);
    let got = b
        .wait_for(LOCALHOST, t, |s| s.session.prefixes_received >= 3)
        .await
        .expect("b received the routes");
    assert_eq!(got.state(), State::Established);
    assert_eq!(a.peer_status(LOCALHOST).unwrap().session.advertised, [2, 1]);

    a.withdraw(vec![prefixes[0]]);
    b.wait_for(LOCALHOST, t, |s| s.session.withdrawals_received >= 1)
        .await
        .expect("withdrawal seen");

    a.shutdown().await;
    let down = b
        .wait_for(LOCALHOST, t, |s| {
            s.session.last_notification_received.is_some()
        })
        .await
        .unwrap();
    assert_eq!(
        down.session.last_notification_received.as_deref(),
        Some("Cease / Administrative Shutdown")
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_peer_as_surfaces_as_text_in_status() {
    let a = speaker().await;
    let b = speaker().await;
    a.add_peer(peer(65001, 65002, 1, b.local_addr().unwrap().port(), None))
        .unwrap();
    b.add_peer(peer(65002, 65009, 2, a.local_addr().unwrap().port(), None))
        .unwrap();
    let s = a
        .wait_for(LOCALHOST, Duration::from_secs(10), |s| {
            s.session.last_notification_received.is_some()
        })
        .await
        .unwrap();
    assert_eq!(
        s.session.last_notification_received.as_deref(),
        Some("OPEN Message Error / Bad Peer AS")
    );
    a.shutdown().await;
    b.shutdown().await;
}

/// TCP MD5 needs a kernel with CONFIG_TCP_MD5SIG; without it this test fails and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_passwords_must_match() {
    let a = speaker().await;
    let b = speaker().await;
    let pa = peer(
        65001,
        65002,
        1,
        b.local_addr().unwrap().port(),
        Some("s3cret"),
    );
    if let Err(e) = a.add_peer(pa) {
        panic!(
            "TCP MD5 is unavailable: {e}. This kernel lacks CONFIG_TCP_MD5SIG (or the \
             TCP_MD5SIG socket option is blocked); BGP peers that need a password cannot \
             work here. Run on a kernel built with CONFIG_TCP_MD5SIG=y."
        );
    }
    b.add_peer(peer(
        65002,
        65001,
        2,
        a.local_addr().unwrap().port(),
        Some("s3cret"),
    ))
    .unwrap();
    a.wait_for(LOCALHOST, Duration::from_secs(10), |s| {
        s.state() == State::Established
    })
    .await
    .expect("established with matching passwords");
    a.shutdown().await;
    b.shutdown().await;

    let a = speaker().await;
    let b = speaker().await;
    a.add_peer(peer(
        65001,
        65002,
        1,
        b.local_addr().unwrap().port(),
        Some("one"),
    ))
    .unwrap();
    b.add_peer(peer(
        65002,
        65001,
        2,
        a.local_addr().unwrap().port(),
        Some("two"),
    ))
    .unwrap();
    let r = a
        .wait_for(LOCALHOST, Duration::from_secs(3), |s| {
            s.state() == State::Established
        })
        .await;
    assert!(r.is_err(), "no session with mismatched passwords");
    a.shutdown().await;
    b.shutdown().await;
}

fn routes(entries: &[(&str, u32)]) -> BTreeMap<IpNet, RouteAttrs> {
    entries
        .iter()
        .map(|(p, med)| {
            let attrs = RouteAttrs {
                med: Some(*med),
                ..Default::default()
            };
            (p.parse().unwrap(), attrs)
        })
        .collect()
}

/// Two speakers peered over loopback, A through `set_peers`; returns them Established.
async fn peered_with_set_peers() -> (Speaker, Speaker, PeerConfig) {
    let a = speaker().await;
    let b = speaker().await;
    let pa = peer(65001, 65002, 1, b.local_addr().unwrap().port(), None);
    let changed = a.set_peers(vec![pa.clone()]).await.unwrap();
    assert_eq!(
        changed,
        PeersChanged {
            added: vec![LOCALHOST],
            ..Default::default()
        }
    );
    b.add_peer(peer(65002, 65001, 2, a.local_addr().unwrap().port(), None))
        .unwrap();
    let t = Duration::from_secs(10);
    for s in [&a, &b] {
        s.wait_for(LOCALHOST, t, |s| s.state() == State::Established)
            .await
            .expect("established");
    }
    (a, b, pa)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_peers_with_an_unchanged_config_does_not_flap() {
    let (a, b, pa) = peered_with_set_peers().await;
    // Let a startup collision (both sides connect) settle first.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = b.peer_status(LOCALHOST).unwrap();
    assert_eq!(before.state(), State::Established);
    let changed = a.set_peers(vec![pa.clone()]).await.unwrap();
    assert!(changed.is_empty(), "{changed:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = b.peer_status(LOCALHOST).unwrap();
    assert_eq!(after.state(), State::Established);
    assert_eq!(
        after.session.connect_retry_counter,
        before.session.connect_retry_counter
    );
    assert_eq!(
        after.session.last_notification_received,
        before.session.last_notification_received
    );
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_peer_routes_change_by_difference_and_survive_a_restart() {
    let (a, b, mut pa) = peered_with_set_peers().await;
    let t = Duration::from_secs(10);
    let first = routes(&[
        ("198.51.100.1/32", 1),
        ("198.51.100.2/32", 1),
        ("198.51.100.3/32", 2),
    ]);
    a.set_peer_routes(LOCALHOST, first).unwrap();
    b.wait_for(LOCALHOST, t, |s| s.session.prefixes_received >= 3)
        .await
        .expect("routes announced");
    // .2 goes, .3 changes, .4 is new: one withdrawal, two announcements.
    let second = routes(&[
        ("198.51.100.1/32", 1),
        ("198.51.100.3/32", 3),
        ("198.51.100.4/32", 1),
    ]);
    a.set_peer_routes(LOCALHOST, second.clone()).unwrap();
    let s = b
        .wait_for(LOCALHOST, t, |s| s.session.prefixes_received >= 5)
        .await
        .expect("difference announced");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = b.peer_status(LOCALHOST).unwrap_or(s);
    assert_eq!(s.session.prefixes_received, 5);
    assert_eq!(s.session.withdrawals_received, 1);
    assert_eq!(a.peer_routes(LOCALHOST), Some(second.clone()));
    assert_eq!(a.peer_status(LOCALHOST).unwrap().session.advertised, [3, 0]);

    // A changed hold time restarts the session, which re-announces the same routes.
    pa.session.hold_time = 12;
    let changed = a.set_peers(vec![pa.clone()]).await.unwrap();
    assert_eq!(changed.restarted, vec![LOCALHOST]);
    assert!(changed.added.is_empty() && changed.removed.is_empty());
    let reset = b
        .wait_for(LOCALHOST, t, |s| {
            s.session.last_notification_received.is_some()
        })
        .await
        .unwrap();
    assert_eq!(
        reset.session.last_notification_received.as_deref(),
        Some("Cease / Administrative Reset")
    );
    let up = a
        .wait_for(LOCALHOST, t, |s| {
            s.state() == State::Established && s.session.advertised == [3, 0]
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "re-established with the same routes: {e}\na: {:?}\nb: {:?}",
                a.peer_status(LOCALHOST),
                b.peer_status(LOCALHOST)
            )
        });
    assert_eq!(up.session.negotiated.unwrap().hold_time, 9);
    assert_eq!(a.peer_routes(LOCALHOST), Some(second));

    let changed = a.set_peers(Vec::new()).await.unwrap();
    assert_eq!(changed.removed, vec![LOCALHOST]);
    assert!(a.peer_status(LOCALHOST).is_none());
    assert!(a.peer_routes(LOCALHOST).is_none());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn set_peers_refuses_the_same_address_twice() {
    let a = speaker().await;
    let p = peer(65001, 65002, 1, 179, None);
    let r = a.set_peers(vec![p.clone(), p]).await;
    assert!(r.is_err());
    assert!(a.status().is_empty());
}

#[test]
fn accept_back_off_doubles_to_a_second_and_resets_on_success() {
    let mut b = AcceptBackoff::default();
    let (d, first) = b.failed();
    assert_eq!((d, first), (AcceptBackoff::MIN, true));
    let mut last = d;
    for _ in 0..20 {
        let (d, first) = b.failed();
        assert!(!first);
        assert!(d >= last && d <= AcceptBackoff::MAX);
        last = d;
    }
    assert_eq!(last, AcceptBackoff::MAX);
    assert!(b.succeeded());
    assert!(!b.succeeded());
    assert_eq!(b.failed(), (AcceptBackoff::MIN, true));
}

/// The far end is a sans-IO session on a socket with a tiny receive buffer: it completes
/// the handshake, then neither reads nor writes. The speaker's writes back up into its
/// bounded queue, its timers keep running, and the hold timer ends the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_reading_is_dropped_by_the_hold_timer() {
    use portico_announcer::session::{Direction, Session};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind(SocketAddr::new(LOCALHOST, 0)).unwrap();
    let listener = socket.listen(1).unwrap();
    let port = listener.local_addr().unwrap().port();

    let a = Speaker::bind(SpeakerConfig {
        listen: None,
        node_seed: 1,
    })
    .await
    .unwrap();
    // About 1 MB of UPDATEs: far more than the socket buffers hold.
    let many: Vec<IpNet> = (0..200_000u32)
        .map(|i| IpNet::new(Ipv4Addr::from(0x0a00_0000 + i).into(), 32).unwrap())
        .collect();
    a.announce(many, RouteAttrs::default());
    let mut pa = peer(65001, 65002, 1, port, None);
    pa.session.hold_time = 3;
    // One connect attempt only, however slow this machine is.
    pa.session.connect_retry_time = Duration::from_secs(60);
    a.add_peer(pa).unwrap();

    let (mut stream, remote) = listener.accept().await.unwrap();
    let now = std::time::Instant::now();
    let mut cfg = SessionConfig::new(65002, 65001, Ipv4Addr::new(10, 0, 0, 2));
    cfg.passive = true;
    cfg.hold_time = 3;
    let mut far = Session::new(cfg, now, 3);
    far.handle_command(now, portico_announcer::Command::Start);
    assert!(far.handle_connected(
        now,
        stream.local_addr().unwrap(),
        remote,
        Direction::Inbound
    ));
    let mut buf = vec![0u8; 4096];
    while far.state() != State::Established {
        while let Some(t) = far.poll_transmit() {
            stream.write_all(&t).await.unwrap();
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("handshake bytes")
            .unwrap();
        assert!(
            n > 0,
            "speaker closed during the handshake: {:?}",
            a.peer_status(LOCALHOST)
        );
        far.handle_bytes(now, &buf[..n]);
    }
    while let Some(t) = far.poll_transmit() {
        stream.write_all(&t).await.unwrap();
    }
    // Now silent: no reads, no keepalives.
    let s = a
        .wait_for(LOCALHOST, Duration::from_secs(10), |s| {
            s.session.last_notification_sent.is_some()
        })
        .await
        .expect("hold timer fired while writes were blocked");
    assert_eq!(
        s.session.last_notification_sent.as_deref(),
        Some("Hold Timer Expired")
    );
    assert!(
        s.session.advertised.iter().sum::<usize>() < 200_000 || s.state() != State::Established
    );
    drop(stream);
    a.shutdown().await;
}
