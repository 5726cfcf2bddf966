//! Two tokio Speakers peer over 127.0.0.1: OPEN -> Established -> UPDATE -> withdraw.
//! Both sides connect actively, so this also exercises collision resolution (§6.8).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use portico_announcer::driver::{PeerConfig, Speaker, SpeakerConfig};
use portico_announcer::{RouteAttrs, SessionConfig, State};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

async fn speaker() -> Speaker {
    Speaker::bind(SpeakerConfig {
        listen: Some(SocketAddr::new(LOCALHOST, 0)),
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

/// TCP MD5 needs CONFIG_TCP_MD5SIG; where setsockopt is refused the test is skipped.
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
        eprintln!("skipping: TCP MD5 unavailable: {e}");
        return;
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
