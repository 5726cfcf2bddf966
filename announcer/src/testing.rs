//! Helpers for fuzzing and property tests: an Established session built by wiring two
//! sessions back to back in memory.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use crate::session::{Command, Direction, Session, SessionConfig, State};
use crate::update::RouteAttrs;

/// A session (AS 65001) Established with an in-memory peer (AS 65002) that offered
/// everything, with two routes in its Adj-RIB-Out. `ibgp` makes both ends AS 65001.
///
/// # Panics
/// If the two sessions fail to establish (a bug in the session).
pub fn established_session(now: Instant, ibgp: bool) -> Session {
    let prefixes = vec![
        "203.0.113.1/32".parse().unwrap(),
        "fd00::1/128".parse().unwrap(),
    ];
    established_session_with(now, ibgp, prefixes, RouteAttrs::default())
}

/// Feeds `stream` to `session` as the peer's bytes, `split` bytes per read, draining
/// transmits and events after each read; then lets every timer fire. Used by the fuzz
/// target and the property tests: whatever the bytes, nothing may panic.
pub fn feed_peer_bytes(session: &mut Session, now: Instant, stream: &[u8], split: usize) {
    for chunk in stream.chunks(split.max(1)) {
        session.handle_bytes(now, chunk);
        while session.poll_transmit().is_some() {}
        while session.poll_event().is_some() {}
    }
    session.handle_timeout(now + Duration::from_secs(1000));
    let _ = session.poll_transmit();
    let _ = session.status(now);
}

/// Like [`established_session`], with `prefixes` in the Adj-RIB-Out before the session
/// comes up (so the full-table path encodes them during establishment).
///
/// # Panics
/// If the two sessions fail to establish (a bug in the session).
pub fn established_session_with(
    now: Instant,
    ibgp: bool,
    prefixes: Vec<ipnet::IpNet>,
    attrs: RouteAttrs,
) -> Session {
    let peer_as = if ibgp { 65001 } else { 65002 };
    let mut a = Session::new(
        SessionConfig::new(65001, peer_as, Ipv4Addr::new(192, 0, 2, 1)),
        now,
        1,
    );
    let mut b_cfg = SessionConfig::new(peer_as, 65001, Ipv4Addr::new(192, 0, 2, 2));
    b_cfg.passive = true;
    let mut b = Session::new(b_cfg, now, 2);
    a.handle_command(now, Command::Announce { prefixes, attrs });
    b.handle_command(now, Command::Start);
    a.handle_command(now, Command::Start);
    let la: SocketAddr = "192.0.2.1:40000".parse().unwrap();
    let lb: SocketAddr = "192.0.2.2:179".parse().unwrap();
    assert!(a.handle_connected(now, la, lb, Direction::Outbound));
    assert!(b.handle_connected(now, lb, la, Direction::Inbound));
    for _ in 0..10 {
        while let Some(t) = a.poll_transmit() {
            b.handle_bytes(now, &t);
        }
        while let Some(t) = b.poll_transmit() {
            a.handle_bytes(now, &t);
        }
    }
    while a.poll_event().is_some() {}
    assert_eq!(a.state(), State::Established);
    a
}
