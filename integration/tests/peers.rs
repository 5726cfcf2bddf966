//! Real BIRD, FRR and GoBGP daemons peering with each other across a veth pair between two
//! throwaway namespaces: sessions over IPv4 and IPv6 with 4-byte ASNs, route exchange with
//! communities, TCP MD5, hold-timer expiry while frozen, restarts and graceful restart.
//!
//! These prove the launchers in `portico_integration::peers` before Portico's own speaker
//! is tested against them. Addresses live only on the test's veth (198.18.0.0/24 and
//! fd00:18::/64); nothing leaves the two namespaces. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use ipnet::{IpNet, Ipv4Net};
use portico_integration::{
    peers::{Announcement, Neighbor, PeerConfig, PeerKind, RealPeer, Route, SessionState},
    NetNs, TestNet,
};

const ASN_A: u32 = 4_200_000_001;
const ASN_B: u32 = 4_200_000_002;

/// Bound for every wait in this file.
const TIMEOUT: Duration = Duration::from_secs(30);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// One side of the veth link: its namespace, addresses and AS.
struct Side {
    ns: NetNs,
    v4: IpAddr,
    v6: IpAddr,
    asn: u32,
}

/// Two namespaces `a` and `b` joined by veth, with IPv4 and IPv6 addresses on each end.
fn link() -> (TestNet, Side, Side) {
    let mut net = TestNet::new().unwrap();
    let a = net.add_ns("a").unwrap();
    let b = net.add_ns("b").unwrap();
    net.veth(&a, "eth0", &b, "eth0").unwrap();
    for (ns, v4, v6) in [
        (&a, "198.18.0.1/24", "fd00:18::1/64"),
        (&b, "198.18.0.2/24", "fd00:18::2/64"),
    ] {
        // No DAD on the link: FRR refuses IPv6 sessions while eth0's link-local address is
        // tentative, and a tentative ULA cannot be bound. The link-local address comes back
        // without DAD once the link goes down and up.
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"])
            .unwrap();
        ns.run(&["ip", "link", "set", "eth0", "down"]).unwrap();
        ns.run(&["ip", "link", "set", "eth0", "up"]).unwrap();
        ns.run(&["ip", "addr", "add", v4, "dev", "eth0"]).unwrap();
        ns.run(&["ip", "addr", "add", v6, "dev", "eth0", "nodad"])
            .unwrap();
    }
    let side = |ns: NetNs, v4: &str, v6: &str, asn| Side {
        ns,
        v4: ip(v4),
        v6: ip(v6),
        asn,
    };
    (
        net,
        side(a, "198.18.0.1", "fd00:18::1", ASN_A),
        side(b, "198.18.0.2", "fd00:18::2", ASN_B),
    )
}

/// Unwraps `result`, or panics with the error and the log tails of `peers`.
fn ok<T>(result: anyhow::Result<T>, peers: &[&RealPeer]) -> T {
    result.unwrap_or_else(|e| {
        let logs: Vec<String> = peers.iter().map(|p| p.log_tail()).collect();
        panic!("{e:#}\n{}", logs.join("\n"))
    })
}

/// Keeps only the IPv4 session of `config`.
fn v4only(mut config: PeerConfig) -> PeerConfig {
    config.neighbors.retain(|n| n.addr.is_ipv4());
    config
}

/// `me` peering with `other` over IPv4 and over IPv6, each neighbor shaped by `shape`.
fn config(
    kind: PeerKind,
    me: &Side,
    other: &Side,
    shape: impl Fn(Neighbor) -> Neighbor,
) -> PeerConfig {
    let IpAddr::V4(router_id) = me.v4 else {
        unreachable!()
    };
    PeerConfig::new(kind, router_id, me.asn)
        .local_addr(me.v4)
        .local_addr(me.v6)
        .neighbor(shape(Neighbor::new(other.v4, other.asn)))
        .neighbor(shape(Neighbor::new(other.v6, other.asn)))
}

fn start_pair(
    kind_a: PeerKind,
    kind_b: PeerKind,
    shape: impl Fn(Neighbor) -> Neighbor + Copy,
    hold_time: u16,
) -> (TestNet, Side, Side, RealPeer, RealPeer) {
    let (net, a, b) = link();
    let peer_a =
        RealPeer::start(&a.ns, config(kind_a, &a, &b, shape).hold_time(hold_time)).unwrap();
    let peer_b =
        RealPeer::start(&b.ns, config(kind_b, &b, &a, shape).hold_time(hold_time)).unwrap();
    (net, a, b, peer_a, peer_b)
}

fn wait_all_established(peer_a: &RealPeer, a: &Side, peer_b: &RealPeer, b: &Side) {
    for addr in [b.v4, b.v6] {
        ok(peer_a.wait_established(addr, TIMEOUT), &[peer_b]);
    }
    for addr in [a.v4, a.v6] {
        ok(peer_b.wait_established(addr, TIMEOUT), &[peer_a]);
    }
}

/// The two routes (IPv4 /32 and IPv6 /128) `side` announces, tagged with its AS.
fn announcements(side: &Side, tag: u16) -> [Announcement; 2] {
    let v4 = format!("198.51.100.{tag}/32");
    let v6 = format!("2001:db8:{tag}::1/128");
    [net(&v4), net(&v6)].map(|prefix| {
        Announcement::new(prefix)
            .community(65000, tag)
            .community(65001, 100 + tag)
            .large_community(side.asn, u32::from(tag), 7)
            .med(u32::from(tag) * 10)
    })
}

/// Asserts that `route` is what `from` announced as `a` over eBGP.
fn assert_received(route: &Route, a: &Announcement, from: &Side) {
    let next_hop = if a.prefix.addr().is_ipv4() {
        from.v4
    } else {
        from.v6
    };
    assert_eq!(route.next_hop, Some(next_hop), "{route:?}");
    assert_eq!(route.as_path, vec![from.asn], "{route:?}");
    assert_eq!(route.communities, a.communities, "{route:?}");
    assert_eq!(route.large_communities, a.large_communities, "{route:?}");
    assert_eq!(route.med, a.med, "{route:?}");
    assert!(!route.stale, "{route:?}");
}

fn holds_all(routes: &[Route], wanted: &[Announcement]) -> bool {
    wanted
        .iter()
        .all(|a| routes.iter().any(|r| r.prefix == a.prefix))
}

/// Both daemons come up over IPv4 and IPv6 and each learns the other's routes with all
/// attributes intact.
fn exchange_routes(kind_a: PeerKind, kind_b: PeerKind) {
    let (_net, a, b, mut peer_a, mut peer_b) = start_pair(kind_a, kind_b, |n| n, 9);
    let from_a = announcements(&a, 1);
    let from_b = announcements(&b, 2);
    for ann in &from_a {
        peer_a.announce(ann.clone()).unwrap();
    }
    for ann in &from_b {
        peer_b.announce(ann.clone()).unwrap();
    }
    wait_all_established(&peer_a, &a, &peer_b, &b);

    for (receiver, wanted, sender) in [(&peer_b, &from_a, &a), (&peer_a, &from_b, &b)] {
        let routes = ok(
            receiver.wait_routes(|r| holds_all(r, wanted), TIMEOUT),
            &[&peer_a, &peer_b],
        );
        for ann in wanted {
            let route = routes.iter().find(|r| r.prefix == ann.prefix).unwrap();
            assert_received(route, ann, sender);
        }
        // Its own routes show as local ones.
        assert!(routes.iter().any(|r| r.as_path.is_empty()), "{routes:#?}");
        assert!(receiver.route_count().unwrap() >= 4);
    }

    // A withdrawal reaches the other side.
    peer_a.withdraw(from_a[0].prefix).unwrap();
    let withdrawn = peer_b.wait_routes(
        |r| {
            !r.iter().any(|r| r.prefix == from_a[0].prefix)
                && r.iter().any(|r| r.prefix == from_a[1].prefix)
        },
        TIMEOUT,
    );
    ok(withdrawn, &[&peer_a]);
}

#[test]
fn bird_and_gobgp_exchange_routes_over_ipv4_and_ipv6() {
    exchange_routes(PeerKind::Bird, PeerKind::Gobgp);
}

#[test]
fn gobgp_and_frr_exchange_routes_over_ipv4_and_ipv6() {
    exchange_routes(PeerKind::Gobgp, PeerKind::Frr);
}

#[test]
fn frr_and_bird_exchange_routes_over_ipv4_and_ipv6() {
    exchange_routes(PeerKind::Frr, PeerKind::Bird);
}

/// iBGP (both in AS 4200000001): LOCAL_PREF travels, the AS_PATH stays empty, the next hop
/// is the originator, and a re-announcement with other attributes replaces the route.
fn ibgp(kind_a: PeerKind, kind_b: PeerKind) {
    let (_net, a, mut b) = link();
    b.asn = a.asn;
    let mut peer_a = RealPeer::start(&a.ns, config(kind_a, &a, &b, |n| n)).unwrap();
    let peer_b = RealPeer::start(&b.ns, config(kind_b, &b, &a, |n| n)).unwrap();
    let sent = announcements(&a, 5).map(|ann| ann.local_pref(200));
    for ann in &sent {
        peer_a.announce(ann.clone()).unwrap();
    }
    wait_all_established(&peer_a, &a, &peer_b, &b);
    let routes = ok(
        peer_b.wait_routes(|r| holds_all(r, &sent), TIMEOUT),
        &[&peer_a],
    );
    for ann in &sent {
        let route = routes.iter().find(|r| r.prefix == ann.prefix).unwrap();
        let next_hop = if ann.prefix.addr().is_ipv4() {
            a.v4
        } else {
            a.v6
        };
        assert_eq!(route.next_hop, Some(next_hop), "{route:?}");
        assert_eq!(route.as_path, Vec::<u32>::new(), "{route:?}");
        assert_eq!(route.local_pref, Some(200), "{route:?}");
        assert_eq!(route.communities, ann.communities, "{route:?}");
        assert_eq!(route.large_communities, ann.large_communities, "{route:?}");
        assert_eq!(route.med, ann.med, "{route:?}");
    }

    let changed = Announcement::new(sent[0].prefix)
        .local_pref(300)
        .large_community(a.asn, 9, 9);
    peer_a.announce(changed.clone()).unwrap();
    let replaced = peer_b.wait_routes(
        |r| {
            r.iter().any(|r| {
                r.prefix == changed.prefix
                    && r.local_pref == Some(300)
                    && r.communities.is_empty()
                    && r.large_communities == changed.large_communities
            })
        },
        TIMEOUT,
    );
    ok(replaced, &[&peer_a]);
}

#[test]
fn ibgp_from_bird_to_frr_carries_local_pref() {
    ibgp(PeerKind::Bird, PeerKind::Frr);
}

#[test]
fn ibgp_from_frr_to_gobgp_carries_local_pref() {
    ibgp(PeerKind::Frr, PeerKind::Gobgp);
}

#[test]
fn ibgp_from_gobgp_to_bird_carries_local_pref() {
    ibgp(PeerKind::Gobgp, PeerKind::Bird);
}

/// Matching TCP MD5 passwords on both sides: the sessions come up.
fn md5_matching(kind_a: PeerKind, kind_b: PeerKind) {
    let (_net, a, b, peer_a, peer_b) = start_pair(kind_a, kind_b, |n| n.md5("portico-s3cret"), 9);
    wait_all_established(&peer_a, &a, &peer_b, &b);
}

#[test]
fn md5_with_matching_passwords_brings_up_bird_and_frr() {
    md5_matching(PeerKind::Bird, PeerKind::Frr);
}

#[test]
fn md5_with_matching_passwords_brings_up_frr_and_gobgp() {
    md5_matching(PeerKind::Frr, PeerKind::Gobgp);
}

#[test]
fn md5_with_matching_passwords_brings_up_gobgp_and_bird() {
    md5_matching(PeerKind::Gobgp, PeerKind::Bird);
}

/// Different passwords: the kernel drops the unsigned-looking SYNs, so no session comes up
/// on either side (every other test brings these sessions up within a few seconds).
fn md5_mismatch(kind_a: PeerKind, kind_b: PeerKind) {
    let (_net, a, b) = link();
    let peer_a = RealPeer::start(&a.ns, config(kind_a, &a, &b, |n| n.md5("right"))).unwrap();
    let peer_b = RealPeer::start(&b.ns, config(kind_b, &b, &a, |n| n.md5("wrong"))).unwrap();
    peer_a
        .expect_never_established(b.v4, Duration::from_secs(4))
        .unwrap();
    for (peer, other) in [(&peer_a, &b), (&peer_b, &a)] {
        for addr in [other.v4, other.v6] {
            assert_ne!(peer.session_state(addr).unwrap(), SessionState::Established);
        }
    }
}

#[test]
fn md5_with_a_wrong_password_keeps_bird_and_gobgp_down() {
    md5_mismatch(PeerKind::Bird, PeerKind::Gobgp);
}

#[test]
fn md5_with_a_wrong_password_keeps_frr_and_bird_down() {
    md5_mismatch(PeerKind::Frr, PeerKind::Bird);
}

/// `frozen` is stopped past the hold time: `watcher` drops the session; after SIGCONT both
/// come back.
fn freeze_and_thaw(frozen_kind: PeerKind, watcher_kind: PeerKind) {
    let (_net, a, b, frozen, watcher) = start_pair(frozen_kind, watcher_kind, |n| n, 3);
    wait_all_established(&frozen, &a, &watcher, &b);

    frozen.stop().unwrap();
    // Hold time 3 s: the watcher gives up after 3 s without a keepalive.
    for addr in [a.v4, a.v6] {
        ok(watcher.wait_down(addr, Duration::from_secs(10)), &[&frozen]);
    }
    frozen.cont().unwrap();
    wait_all_established(&frozen, &a, &watcher, &b);
}

#[test]
fn frozen_gobgp_loses_the_session_to_bird_and_recovers() {
    freeze_and_thaw(PeerKind::Gobgp, PeerKind::Bird);
}

#[test]
fn frozen_frr_loses_the_session_to_gobgp_and_recovers() {
    freeze_and_thaw(PeerKind::Frr, PeerKind::Gobgp);
}

#[test]
fn frozen_bird_loses_the_session_to_frr_and_recovers() {
    freeze_and_thaw(PeerKind::Bird, PeerKind::Frr);
}

/// Restarting a peer brings the session back with its announcements re-advertised.
#[test]
fn restarted_peers_come_back_with_their_routes() {
    for kind in PeerKind::ALL {
        let (_net, a, b) = link();
        let mut restarted = RealPeer::start(&a.ns, config(kind, &a, &b, |n| n)).unwrap();
        let watcher = RealPeer::start(&b.ns, config(PeerKind::Bird, &b, &a, |n| n)).unwrap();
        let [v4, _] = announcements(&a, 3);
        restarted.announce(v4.clone()).unwrap();
        let first = watcher.wait_routes(|r| holds_all(r, std::slice::from_ref(&v4)), TIMEOUT);
        ok(first, &[&restarted]);
        let old_pid = restarted.pid();
        restarted.restart().unwrap();
        assert_ne!(restarted.pid(), old_pid, "{kind}");
        ok(restarted.wait_established(b.v4, TIMEOUT), &[&watcher]);
        let again = watcher.wait_routes(|r| holds_all(r, std::slice::from_ref(&v4)), TIMEOUT);
        let routes = ok(again, &[&restarted]);
        let route = routes.iter().find(|r| r.prefix == v4.prefix).unwrap();
        assert_received(route, &v4, &a);
    }
}

/// `restarter` crashes; `helper` keeps its routes marked stale, and fresh after it is back.
fn graceful_restart(helper_kind: PeerKind, restarter_kind: PeerKind) {
    let (_net, a, b) = link();
    let helper = RealPeer::start(
        &a.ns,
        v4only(config(helper_kind, &a, &b, |n| n.graceful_restart(20))),
    )
    .unwrap();
    let mut restarter = RealPeer::start(
        &b.ns,
        v4only(config(restarter_kind, &b, &a, |n| n.graceful_restart(20))),
    )
    .unwrap();
    let [v4, _] = announcements(&b, 4);
    restarter.announce(v4.clone()).unwrap();
    ok(helper.wait_established(b.v4, TIMEOUT), &[&restarter]);
    let fresh = helper.wait_routes(
        |r| r.iter().any(|r| r.prefix == v4.prefix && !r.stale),
        TIMEOUT,
    );
    ok(fresh, &[&restarter]);

    restarter.crash();
    let stale = helper.wait_routes(
        |r| r.iter().any(|r| r.prefix == v4.prefix && r.stale),
        TIMEOUT,
    );
    let routes = ok(stale, &[&restarter]);
    assert_ne!(
        helper.session_state(b.v4).unwrap(),
        SessionState::Established,
        "{routes:#?}"
    );

    restarter.restart().unwrap();
    ok(helper.wait_established(b.v4, TIMEOUT), &[&restarter]);
    let fresh = helper.wait_routes(
        |r| r.iter().any(|r| r.prefix == v4.prefix && !r.stale),
        TIMEOUT,
    );
    ok(fresh, &[&restarter]);
}

#[test]
fn bird_keeps_stale_routes_while_gobgp_restarts() {
    graceful_restart(PeerKind::Bird, PeerKind::Gobgp);
}

#[test]
fn gobgp_keeps_stale_routes_while_frr_restarts() {
    graceful_restart(PeerKind::Gobgp, PeerKind::Frr);
}

#[test]
fn frr_keeps_stale_routes_while_bird_restarts() {
    graceful_restart(PeerKind::Frr, PeerKind::Bird);
}

/// `origin` originates `n` host routes (198.19.0.0/16) in one go; `receiver` counts them all
/// with the cheap `route_count`, as the push benchmark does.
fn large_table(origin_kind: PeerKind, receiver_kind: PeerKind, n: usize) {
    let (_net, a, b) = link();
    let mut origin = RealPeer::start(&a.ns, v4only(config(origin_kind, &a, &b, |n| n))).unwrap();
    let receiver = RealPeer::start(&b.ns, v4only(config(receiver_kind, &b, &a, |n| n))).unwrap();
    ok(receiver.wait_established(a.v4, TIMEOUT), &[&origin]);
    let started = Instant::now();
    let routes = (0..n).map(|i| {
        let [hi, lo] = u16::try_from(i).unwrap().to_be_bytes();
        Announcement::new(IpNet::V4(
            Ipv4Net::new(Ipv4Addr::new(198, 19, hi, lo), 32).unwrap(),
        ))
    });
    origin.announce_many(routes).unwrap();
    let announced = started.elapsed();
    assert_eq!(origin.route_count().unwrap(), n);
    let count = ok(receiver.wait_route_count(n, TIMEOUT), &[&origin]);
    assert_eq!(count, n);
    eprintln!(
        "{origin_kind} announced {n} routes in {announced:?}; {receiver_kind} held them all \
         after {:?}",
        started.elapsed()
    );
}

#[test]
fn frr_counts_ten_thousand_routes_from_bird() {
    large_table(PeerKind::Bird, PeerKind::Frr, 10_000);
}

#[test]
fn gobgp_counts_ten_thousand_routes_from_bird() {
    large_table(PeerKind::Bird, PeerKind::Gobgp, 10_000);
}

#[test]
fn bird_counts_ten_thousand_routes_from_frr() {
    large_table(PeerKind::Frr, PeerKind::Bird, 10_000);
}
