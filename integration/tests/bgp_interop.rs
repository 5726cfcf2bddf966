//! Portico's BGP speaker against the real daemons: BIRD 2, FRR 8 and GoBGP 3.
//!
//! Each test owns two throwaway namespaces joined by veth: `portico` runs the
//! `portico_announcer` [`Speaker`] on a tokio runtime whose threads live in that namespace,
//! `peer` runs the daemon (started by `portico_integration::peers`). The link carries
//! 198.18.0.0/24 and fd00:18::/64; announced VIPs come from 198.19.0.0/16 and fd00:19::/48.
//! Nothing leaves the two namespaces. Needs root (`TestNet::new` fails clearly without it).
//!
//! Every scenario runs once per daemon (`bird::…`, `frr::…`, `gobgp::…`): eBGP over IPv4 and
//! IPv6 and iBGP with 4-byte ASNs and per-VIP attributes, withdrawal, TCP MD5 (right and
//! wrong password), Bad Peer AS in both directions, hold-timer expiry while the daemon is
//! frozen, daemon restart, Portico's graceful restart and aggregation.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    thread,
    time::{Duration, Instant},
};

use ipnet::IpNet;
use portico_announcer::{
    decision::aggregate,
    driver::{PeerConfig as SpeakerPeer, PeerStatus, Speaker, SpeakerConfig},
    session::GracefulRestartConfig,
    Family, LargeCommunity, RouteAttrs, SessionConfig, State,
};
use portico_integration::{
    peers::{Neighbor, PeerConfig, PeerKind, RealPeer, Route, SessionState},
    NetNs, TestNet,
};
use tokio::runtime::Runtime;

const PORTICO_ASN: u32 = 4_200_000_001;
const PEER_ASN: u32 = 4_200_000_002;
const PORTICO_V4: &str = "198.18.0.1";
const PORTICO_V6: &str = "fd00:18::1";
const PEER_V4: &str = "198.18.0.2";
const PEER_V6: &str = "fd00:18::2";

/// Bound for every wait in this file.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Three IPv4 and three IPv6 VIPs, announced with per-VIP attributes.
const VIPS: [&str; 6] = [
    "198.19.0.10/32",
    "198.19.0.11/32",
    "198.19.7.12/32",
    "fd00:19::10/128",
    "fd00:19::11/128",
    "fd00:19:7::12/128",
];

/// LOCAL_PREF sent over iBGP.
const LOCAL_PREF: u32 = 250;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn portico_addr(family: Family) -> IpAddr {
    match family {
        Family::Ipv4Unicast => ip(PORTICO_V4),
        Family::Ipv6Unicast => ip(PORTICO_V6),
    }
}

fn peer_addr(family: Family) -> IpAddr {
    match family {
        Family::Ipv4Unicast => ip(PEER_V4),
        Family::Ipv6Unicast => ip(PEER_V6),
    }
}

fn family_of(prefix: IpNet) -> Family {
    match prefix {
        IpNet::V4(_) => Family::Ipv4Unicast,
        IpNet::V6(_) => Family::Ipv6Unicast,
    }
}

/// The namespaces of one test: Portico's and the daemon's, joined by veth.
struct Link {
    // Dropped last: deletes the namespaces after the daemon and Portico are gone.
    _net: TestNet,
    portico: NetNs,
    peer: NetNs,
}

fn link() -> Link {
    let mut net = TestNet::new().unwrap();
    let portico = net.add_ns("portico").unwrap();
    let peer = net.add_ns("peer").unwrap();
    net.veth(&portico, "eth0", &peer, "eth0").unwrap();
    for (ns, v4, v6) in [
        (&portico, PORTICO_V4, PORTICO_V6),
        (&peer, PEER_V4, PEER_V6),
    ] {
        // No DAD: FRR refuses IPv6 sessions while the link-local address is tentative, and
        // a tentative ULA cannot be bound. Down/up brings link-local back without DAD.
        ns.run(&["sysctl", "-qw", "net.ipv6.conf.eth0.accept_dad=0"])
            .unwrap();
        ns.run(&["ip", "link", "set", "eth0", "down"]).unwrap();
        ns.run(&["ip", "link", "set", "eth0", "up"]).unwrap();
        ns.run(&["ip", "addr", "add", &format!("{v4}/24"), "dev", "eth0"])
            .unwrap();
        ns.run(&[
            "ip",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            "eth0",
            "nodad",
        ])
        .unwrap();
    }
    Link {
        _net: net,
        portico,
        peer,
    }
}

/// Portico's speaker on a tokio runtime whose worker threads live in Portico's namespace.
///
/// Sockets belong to the namespace of the thread that creates them, and threads inherit
/// the namespace of the thread that spawns them: the runtime is built (and starts its
/// workers) on a scratch thread that entered the namespace, and everything that opens a
/// socket runs as a task on those workers.
struct Portico {
    speaker: Option<Speaker>,
    rt: Option<Runtime>,
}

impl Portico {
    fn start(ns: &NetNs, listen: Option<SocketAddr>) -> Self {
        let inside = ns.clone();
        let rt = thread::spawn(move || -> anyhow::Result<Runtime> {
            let _in_ns = inside.enter()?;
            Ok(tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?)
        })
        .join()
        .expect("the runtime builder thread panicked")
        .unwrap();
        let worker_ns = rt
            .block_on(rt.spawn(async { std::fs::metadata("/proc/thread-self/ns/net") }))
            .unwrap()
            .unwrap()
            .ino();
        let wanted = std::fs::metadata(format!("/run/netns/{}", ns.name()))
            .unwrap()
            .ino();
        assert_eq!(worker_ns, wanted, "tokio workers are not in {}", ns.name());
        let speaker = rt
            .block_on(rt.spawn(Speaker::bind(SpeakerConfig {
                listen,
                ..SpeakerConfig::default()
            })))
            .unwrap()
            .unwrap();
        Self {
            speaker: Some(speaker),
            rt: Some(rt),
        }
    }

    fn speaker(&self) -> &Speaker {
        self.speaker.as_ref().expect("speaker is running")
    }

    fn rt(&self) -> &Runtime {
        self.rt.as_ref().expect("runtime is running")
    }

    fn add_peer(&self, peer: SpeakerPeer) {
        let _rt = self.rt().enter();
        self.speaker().add_peer(peer).unwrap();
    }

    fn announce(&self, prefixes: Vec<IpNet>, attrs: RouteAttrs) {
        self.speaker().announce(prefixes, attrs);
    }

    fn withdraw(&self, prefixes: Vec<IpNet>) {
        self.speaker().withdraw(prefixes);
    }

    fn status(&self, peer: IpAddr) -> PeerStatus {
        self.speaker()
            .peer_status(peer)
            .expect("peer is configured")
    }

    /// Waits until `peer`'s status satisfies `pred`; panics naming `what` and the status.
    fn wait_for(
        &self,
        peer: IpAddr,
        what: &str,
        timeout: Duration,
        pred: impl FnMut(&PeerStatus) -> bool,
    ) -> PeerStatus {
        let waited = self
            .rt()
            .block_on(self.speaker().wait_for(peer, timeout, pred));
        waited.unwrap_or_else(|e| {
            panic!(
                "Portico: session to {peer} not {what} within {timeout:?} ({e}); status: {:#?}",
                self.status(peer)
            )
        })
    }

    fn wait_established(&self, peer: IpAddr) -> PeerStatus {
        self.wait_for(peer, "Established", TIMEOUT, |s| {
            s.state() == State::Established
        })
    }

    /// Ends the speaker as a crash would: tasks and sockets go away without a NOTIFICATION
    /// (dropping a [`Speaker`] aborts its peer tasks; then the whole runtime goes).
    fn kill(mut self) {
        drop(self.speaker.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_millis(100));
        }
    }
}

impl Drop for Portico {
    fn drop(&mut self) {
        drop(self.speaker.take());
    }
}

/// Portico's session settings: fast retries, one family.
fn session(peer_as: u32, family: Family) -> SessionConfig {
    let mut s = SessionConfig::new(PORTICO_ASN, peer_as, Ipv4Addr::new(198, 18, 0, 1));
    s.hold_time = 9;
    s.connect_retry_time = Duration::from_secs(1);
    s.idle_hold_time = Duration::from_secs(1);
    s.families = vec![family];
    s
}

/// Portico's peer: the daemon's address of `family`.
fn speaker_peer(peer_as: u32, family: Family) -> SpeakerPeer {
    SpeakerPeer::new(peer_addr(family), session(peer_as, family))
}

/// The daemon's configuration with `neighbors` (Portico's addresses).
fn daemon(kind: PeerKind, local_asn: u32, neighbors: Vec<Neighbor>) -> PeerConfig {
    let mut config = PeerConfig::new(kind, Ipv4Addr::new(198, 18, 0, 2), local_asn)
        .local_addr(ip(PEER_V4))
        .local_addr(ip(PEER_V6));
    for n in neighbors {
        config = config.neighbor(n);
    }
    config
}

fn start_daemon(link: &Link, config: PeerConfig) -> RealPeer {
    RealPeer::start(&link.peer, config).unwrap_or_else(|e| panic!("starting the daemon: {e:#}"))
}

/// Unwraps `result`, or panics with the error and the daemon's log tail.
fn ok<T>(result: anyhow::Result<T>, peer: &RealPeer) -> T {
    result.unwrap_or_else(|e| panic!("{e:#}\n{}", peer.log_tail()))
}

/// Whether the daemon's session towards `neighbor` is Established.
///
/// `peers::SessionState` does not know BIRD's `Passive` (a passive neighbor waiting for a
/// connection); the error that names an unknown state means "not Established" here.
fn daemon_established(peer: &RealPeer, neighbor: IpAddr) -> bool {
    match peer.session_state(neighbor) {
        Ok(state) => state == SessionState::Established,
        Err(e) if e.to_string().contains("unknown BGP session state") => false,
        Err(e) => panic!("{e:#}\n{}", peer.log_tail()),
    }
}

/// Checks for `period` that the daemon's session towards `neighbor` never comes up.
fn expect_never_established(peer: &RealPeer, neighbor: IpAddr, period: Duration) {
    let deadline = Instant::now() + period;
    while Instant::now() < deadline {
        assert!(
            !daemon_established(peer, neighbor),
            "{}: session to {neighbor} came up, but it must stay down",
            peer.kind()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The attributes VIP `i` is announced with.
fn vip_attrs(i: usize, ibgp: bool) -> RouteAttrs {
    let tag = u32::try_from(i).unwrap();
    RouteAttrs {
        med: Some(50 + tag),
        local_pref: ibgp.then_some(LOCAL_PREF),
        communities: vec![65000 << 16 | (100 + tag), 65001 << 16 | 7],
        large_communities: vec![LargeCommunity {
            global_admin: PORTICO_ASN,
            local_data1: tag,
            local_data2: 7,
        }],
    }
}

/// Announces every VIP with its own attributes.
fn announce_vips(portico: &Portico, ibgp: bool) {
    for (i, vip) in VIPS.iter().enumerate() {
        portico.announce(vec![net(vip)], vip_attrs(i, ibgp));
    }
}

/// The VIPs (with their index) a session of `families` carries.
fn vips_of(families: &[Family]) -> Vec<(usize, IpNet)> {
    VIPS.iter()
        .map(|v| net(v))
        .enumerate()
        .filter(|(_, v)| families.contains(&family_of(*v)))
        .collect()
}

/// The prefixes of the IPv4 VIPs that `announce_vips` announces.
fn v4_vip_prefixes() -> Vec<IpNet> {
    vips_of(&[Family::Ipv4Unicast])
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// Both ends see the IPv4 session Established and the daemon holds every IPv4 VIP.
fn wait_up_with_v4_vips(portico: &Portico, peer: &RealPeer) {
    portico.wait_established(ip(PEER_V4));
    ok(peer.wait_established(ip(PORTICO_V4), TIMEOUT), peer);
    let prefixes = v4_vip_prefixes();
    ok(peer.wait_routes(|r| holds_all(r, &prefixes), TIMEOUT), peer);
}

fn holds_all(routes: &[Route], prefixes: &[IpNet]) -> bool {
    prefixes
        .iter()
        .all(|p| routes.iter().any(|r| r.prefix == *p))
}

/// Asserts that `route` is VIP `i` as Portico announced it.
fn assert_vip(route: &Route, i: usize, ibgp: bool) {
    let attrs = vip_attrs(i, ibgp);
    let family = family_of(route.prefix);
    assert_eq!(route.next_hop, Some(portico_addr(family)), "{route:#?}");
    let as_path: Vec<u32> = if ibgp { vec![] } else { vec![PORTICO_ASN] };
    assert_eq!(route.as_path, as_path, "{route:#?}");
    let communities: Vec<(u16, u16)> = attrs
        .communities
        .iter()
        .map(|c| ((c >> 16) as u16, *c as u16))
        .collect();
    assert_eq!(route.communities, communities, "{route:#?}");
    let large: Vec<(u32, u32, u32)> = attrs
        .large_communities
        .iter()
        .map(|l| (l.global_admin, l.local_data1, l.local_data2))
        .collect();
    assert_eq!(route.large_communities, large, "{route:#?}");
    assert_eq!(route.med, attrs.med, "{route:#?}");
    if ibgp {
        assert_eq!(route.local_pref, Some(LOCAL_PREF), "{route:#?}");
    }
    assert!(!route.stale, "{route:#?}");
}

/// How Portico and the daemon peer in [`announce_and_withdraw`].
#[derive(Clone, Copy, PartialEq, Eq)]
enum Peering {
    /// eBGP over IPv4, Portico connects.
    EbgpV4,
    /// eBGP over IPv6, Portico connects.
    EbgpV6,
    /// iBGP over IPv4 and IPv6, Portico listens passively and the daemon connects.
    IbgpPassive,
}

/// The daemon learns the VIPs with their attributes; a withdrawn one disappears.
fn announce_and_withdraw(kind: PeerKind, peering: Peering) {
    let link = link();
    let (families, ibgp) = match peering {
        Peering::EbgpV4 => (vec![Family::Ipv4Unicast], false),
        Peering::EbgpV6 => (vec![Family::Ipv6Unicast], false),
        Peering::IbgpPassive => (Family::ALL.to_vec(), true),
    };
    let (peer_asn, listen) = if ibgp {
        (PORTICO_ASN, Some(SocketAddr::new(ip("::"), 179)))
    } else {
        (PEER_ASN, None)
    };
    let neighbors = families
        .iter()
        .map(|f| {
            let n = Neighbor::new(portico_addr(*f), PORTICO_ASN);
            if ibgp {
                n
            } else {
                n.passive()
            }
        })
        .collect();
    let peer = start_daemon(&link, daemon(kind, peer_asn, neighbors));
    let portico = Portico::start(&link.portico, listen);
    for f in &families {
        let mut p = speaker_peer(peer_asn, *f);
        p.session.passive = ibgp;
        portico.add_peer(p);
    }
    for f in &families {
        portico.wait_established(peer_addr(*f));
        ok(peer.wait_established(portico_addr(*f), TIMEOUT), &peer);
    }

    // Announced while Established: live UPDATEs.
    announce_vips(&portico, ibgp);
    let vips = vips_of(&families);
    let prefixes: Vec<IpNet> = vips.iter().map(|(_, p)| *p).collect();
    let routes = ok(
        peer.wait_routes(|r| holds_all(r, &prefixes), TIMEOUT),
        &peer,
    );
    for (i, prefix) in &vips {
        let route = routes.iter().find(|r| r.prefix == *prefix).unwrap();
        assert_vip(route, *i, ibgp);
    }
    for f in &families {
        let status = portico.status(peer_addr(*f));
        assert_eq!(status.session.advertised[f.index()], 3, "{status:#?}");
    }

    // Withdraw the first VIP of each family: gone, the others stay.
    let withdrawn: Vec<IpNet> = [VIPS[0], VIPS[3]].map(net).to_vec();
    portico.withdraw(withdrawn.clone());
    let kept: Vec<IpNet> = prefixes
        .iter()
        .copied()
        .filter(|p| !withdrawn.contains(p))
        .collect();
    let after = peer.wait_routes(
        |r| holds_all(r, &kept) && !r.iter().any(|r| withdrawn.contains(&r.prefix)),
        TIMEOUT,
    );
    ok(after, &peer);
    for f in &families {
        let status = portico.status(peer_addr(*f));
        assert_eq!(status.session.advertised[f.index()], 2, "{status:#?}");
    }
}

/// TCP MD5 with the same password on both sides: the session comes up and carries routes.
fn md5_matching(kind: PeerKind) {
    let link = link();
    let v4 = Family::Ipv4Unicast;
    let neighbor = Neighbor::new(ip(PORTICO_V4), PORTICO_ASN)
        .passive()
        .md5("portico-s3cret");
    let peer = start_daemon(&link, daemon(kind, PEER_ASN, vec![neighbor]));
    let portico = Portico::start(&link.portico, None);
    let mut p = speaker_peer(PEER_ASN, v4);
    p.md5_password = Some("portico-s3cret".into());
    portico.add_peer(p);
    announce_vips(&portico, false);
    wait_up_with_v4_vips(&portico, &peer);
}

/// A wrong MD5 password: the daemon's kernel drops Portico's SYNs, no session comes up, and
/// Portico's status shows a session that never got as far as an OPEN.
fn md5_wrong_password(kind: PeerKind) {
    let link = link();
    let neighbor = Neighbor::new(ip(PORTICO_V4), PORTICO_ASN)
        .passive()
        .md5("the-right-one");
    let peer = start_daemon(&link, daemon(kind, PEER_ASN, vec![neighbor]));
    let portico = Portico::start(&link.portico, None);
    let mut p = speaker_peer(PEER_ASN, Family::Ipv4Unicast);
    p.md5_password = Some("a-wrong-one".into());
    portico.add_peer(p);
    // Every other test brings this session up within a second or two.
    expect_never_established(&peer, ip(PORTICO_V4), Duration::from_secs(4));
    let status = portico.status(ip(PEER_V4));
    let s = &status.session;
    assert!(
        matches!(s.state, State::Connect | State::Active),
        "Portico should still be trying to connect: {status:#?}"
    );
    assert!(
        s.negotiated.is_none() && s.uptime.is_none(),
        "no OPEN may have been accepted: {status:#?}"
    );
    assert_eq!(s.last_notification_sent, None, "{status:#?}");
    assert_eq!(s.last_notification_received, None, "{status:#?}");
    assert_eq!(s.updates_received, 0, "{status:#?}");
    let error = status.last_error.as_deref().unwrap_or_default();
    assert!(
        error.contains("timed out") && error.contains("TCP MD5"),
        "the status must say why there is no session: {status:#?}"
    );
}

const BAD_PEER_AS: &str = "OPEN Message Error / Bad Peer AS";

/// Bad Peer AS both ways: over IPv4 the daemon expects another AS from Portico and sends
/// the NOTIFICATION; over IPv6 Portico expects another AS from the daemon. Portico's status
/// shows each as text, and neither session comes up.
fn bad_peer_as(kind: PeerKind) {
    let link = link();
    let neighbors = vec![
        Neighbor::new(ip(PORTICO_V4), PORTICO_ASN + 1).passive(),
        Neighbor::new(ip(PORTICO_V6), PORTICO_ASN).passive(),
    ];
    let peer = start_daemon(&link, daemon(kind, PEER_ASN, neighbors));
    let portico = Portico::start(&link.portico, None);
    portico.add_peer(speaker_peer(PEER_ASN, Family::Ipv4Unicast));
    portico.add_peer(speaker_peer(PEER_ASN + 1, Family::Ipv6Unicast));

    let received = portico.wait_for(ip(PEER_V4), "told Bad Peer AS", TIMEOUT, |s| {
        s.session.last_notification_received.is_some()
    });
    assert_eq!(
        received.session.last_notification_received.as_deref(),
        Some(BAD_PEER_AS),
        "{received:#?}\n{}",
        peer.log_tail()
    );
    let sent = portico.wait_for(ip(PEER_V6), "sending Bad Peer AS", TIMEOUT, |s| {
        s.session.last_notification_sent.is_some()
    });
    assert_eq!(
        sent.session.last_notification_sent.as_deref(),
        Some(BAD_PEER_AS),
        "{sent:#?}"
    );
    for addr in [PORTICO_V4, PORTICO_V6] {
        assert!(!daemon_established(&peer, ip(addr)), "{}", peer.log_tail());
    }
    for addr in [PEER_V4, PEER_V6] {
        let status = portico.status(ip(addr));
        assert_ne!(status.state(), State::Established, "{status:#?}");
    }
}

/// The daemon frozen (SIGSTOP) past the 3 s hold time: Portico sends Hold Timer Expired and
/// drops the session; after SIGCONT it comes back with the VIPs.
fn frozen_peer(kind: PeerKind) {
    let link = link();
    let v4 = Family::Ipv4Unicast;
    let neighbor = Neighbor::new(ip(PORTICO_V4), PORTICO_ASN).passive();
    let peer = start_daemon(&link, daemon(kind, PEER_ASN, vec![neighbor]).hold_time(3));
    let portico = Portico::start(&link.portico, None);
    let mut p = speaker_peer(PEER_ASN, v4);
    p.session.hold_time = 3;
    p.session.keepalive_time = Some(1);
    portico.add_peer(p);
    announce_vips(&portico, false);
    let up = portico.wait_established(ip(PEER_V4));
    assert_eq!(
        up.session.negotiated.as_ref().unwrap().hold_time,
        3,
        "{up:#?}"
    );
    ok(peer.wait_established(ip(PORTICO_V4), TIMEOUT), &peer);

    ok(peer.stop(), &peer);
    let frozen_at = Instant::now();
    let expired = portico.wait_for(
        ip(PEER_V4),
        "down with Hold Timer Expired",
        Duration::from_secs(10),
        |s| {
            s.state() != State::Established
                && s.session
                    .last_notification_sent
                    .as_deref()
                    .is_some_and(|n| n.starts_with("Hold Timer Expired"))
        },
    );
    assert!(
        frozen_at.elapsed() >= Duration::from_secs(2),
        "dropped too early: {expired:#?}"
    );

    ok(peer.cont(), &peer);
    wait_up_with_v4_vips(&portico, &peer);
}

/// The daemon restarts: Portico reconnects and re-advertises its whole table.
fn restarted_peer(kind: PeerKind) {
    let link = link();
    let v4 = Family::Ipv4Unicast;
    let neighbor = Neighbor::new(ip(PORTICO_V4), PORTICO_ASN).passive();
    let mut peer = start_daemon(&link, daemon(kind, PEER_ASN, vec![neighbor]));
    let portico = Portico::start(&link.portico, None);
    announce_vips(&portico, false);
    portico.add_peer(speaker_peer(PEER_ASN, v4));
    let vips = vips_of(&[v4]);
    let prefixes: Vec<IpNet> = vips.iter().map(|(_, p)| *p).collect();
    ok(
        peer.wait_routes(|r| holds_all(r, &prefixes), TIMEOUT),
        &peer,
    );

    let old_pid = peer.pid();
    let restarted_at = Instant::now();
    ok(peer.restart(), &peer);
    assert_ne!(peer.pid(), old_pid);
    ok(peer.wait_established(ip(PORTICO_V4), TIMEOUT), &peer);
    let status = portico.wait_for(ip(PEER_V4), "re-established", TIMEOUT, |s| {
        s.state() == State::Established && s.uptime().is_some_and(|u| u < restarted_at.elapsed())
    });
    let routes = ok(
        peer.wait_routes(|r| holds_all(r, &prefixes), TIMEOUT),
        &peer,
    );
    for (i, prefix) in &vips {
        assert_vip(
            routes.iter().find(|r| r.prefix == *prefix).unwrap(),
            *i,
            false,
        );
    }
    assert_eq!(status.session.advertised[v4.index()], 3, "{status:#?}");
}

/// Portico's speaker dies without a NOTIFICATION and a new one (Restart State set) comes up
/// within the restart time: the daemon keeps the VIPs, stale, the whole time, and they are
/// fresh again after Portico's End-of-RIB.
fn graceful_restart(kind: PeerKind) {
    let link = link();
    let v4 = Family::Ipv4Unicast;
    let neighbor = Neighbor::new(ip(PORTICO_V4), PORTICO_ASN)
        .passive()
        .graceful_restart(30);
    let peer = start_daemon(&link, daemon(kind, PEER_ASN, vec![neighbor]));
    let peer_config = |restarting| {
        let mut p = speaker_peer(PEER_ASN, v4);
        p.session.graceful_restart = Some(GracefulRestartConfig {
            restart_time: 30,
            restarting,
            forwarding_state: true,
        });
        p
    };
    let prefixes = v4_vip_prefixes();
    let all_fresh = |r: &[Route]| holds_all(r, &prefixes) && r.iter().all(|r| !r.stale);

    let first = Portico::start(&link.portico, None);
    announce_vips(&first, false);
    first.add_peer(peer_config(false));
    let up = first.wait_established(ip(PEER_V4));
    assert!(
        up.session.negotiated.as_ref().unwrap().graceful_restart,
        "graceful restart not negotiated: {up:#?}"
    );
    ok(peer.wait_routes(all_fresh, TIMEOUT), &peer);

    first.kill();
    // From here on the VIPs must never leave the daemon's table.
    let present = |phase: &str| -> Vec<Route> {
        let routes = ok(peer.routes(), &peer);
        assert!(
            holds_all(&routes, &prefixes),
            "{kind} dropped VIPs {phase}: {routes:#?}\n{}",
            peer.log_tail()
        );
        routes
    };
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let routes = present("while Portico was down");
        if prefixes
            .iter()
            .all(|p| routes.iter().any(|r| r.prefix == *p && r.stale))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{kind} never marked the VIPs stale: {routes:#?}\n{}",
            peer.log_tail()
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !daemon_established(&peer, ip(PORTICO_V4)),
        "{}",
        peer.log_tail()
    );
    // Stay down a little longer: still stale, still there.
    let still_down = Instant::now() + Duration::from_secs(1);
    while Instant::now() < still_down {
        present("while Portico was down");
        thread::sleep(Duration::from_millis(100));
    }

    let second = Portico::start(&link.portico, None);
    announce_vips(&second, false);
    second.add_peer(peer_config(true));
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let routes = present("across Portico's restart");
        if all_fresh(&routes) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VIPs still stale after Portico came back: {routes:#?}\nPortico: {:#?}\n{}",
            second.status(ip(PEER_V4)),
            peer.log_tail()
        );
        thread::sleep(Duration::from_millis(100));
    }
    let status = second.wait_established(ip(PEER_V4));
    assert_eq!(status.session.advertised[v4.index()], 3, "{status:#?}");
    // Fresh and staying: no late flush of the refreshed routes.
    thread::sleep(Duration::from_millis(500));
    assert!(all_fresh(&present("after End-of-RIB")));
}

/// With aggregation length 24, three host routes in one /24 go out as that /24 alone.
fn aggregation(kind: PeerKind) {
    let link = link();
    let neighbor = Neighbor::new(ip(PORTICO_V4), PORTICO_ASN).passive();
    let peer = start_daemon(&link, daemon(kind, PEER_ASN, vec![neighbor]));
    let portico = Portico::start(&link.portico, None);
    portico.add_peer(speaker_peer(PEER_ASN, Family::Ipv4Unicast));
    let hosts = ["198.19.5.1", "198.19.5.7", "198.19.5.200"].map(ip);
    let aggregated = aggregate(hosts, 24, 128);
    assert_eq!(aggregated, vec![net("198.19.5.0/24")]);
    portico.announce(aggregated.clone(), vip_attrs(0, false));
    portico.wait_established(ip(PEER_V4));
    let routes = ok(
        peer.wait_routes(|r| holds_all(r, &aggregated), TIMEOUT),
        &peer,
    );
    let prefixes: Vec<IpNet> = routes.iter().map(|r| r.prefix).collect();
    assert_eq!(prefixes, aggregated, "{routes:#?}");
    assert_eq!(routes[0].as_path, vec![PORTICO_ASN], "{routes:#?}");
    let status = portico.status(ip(PEER_V4));
    assert_eq!(status.session.advertised, [1, 0], "{status:#?}");
}

/// One module per daemon, each with every scenario as a sentence-style test.
macro_rules! against {
    ($($daemon:ident => $kind:expr;)*) => {$(
        mod $daemon {
            use super::*;

            const KIND: PeerKind = $kind;

            #[test]
            fn learns_vips_over_ebgp_ipv4_with_their_attributes_and_drops_a_withdrawn_one() {
                announce_and_withdraw(KIND, Peering::EbgpV4);
            }

            #[test]
            fn learns_vips_over_ebgp_ipv6_with_their_attributes_and_drops_a_withdrawn_one() {
                announce_and_withdraw(KIND, Peering::EbgpV6);
            }

            #[test]
            fn learns_vips_over_ibgp_with_local_pref_from_a_passive_portico() {
                announce_and_withdraw(KIND, Peering::IbgpPassive);
            }

            #[test]
            fn brings_up_a_session_signed_with_tcp_md5() {
                md5_matching(KIND);
            }

            #[test]
            fn never_brings_up_a_session_with_a_wrong_md5_password() {
                md5_wrong_password(KIND);
            }

            #[test]
            fn exchanges_bad_peer_as_notifications_that_portico_reports_as_text() {
                bad_peer_as(KIND);
            }

            #[test]
            fn loses_the_session_to_hold_timer_expiry_while_frozen_and_recovers() {
                frozen_peer(KIND);
            }

            #[test]
            fn gets_every_vip_again_after_restarting() {
                restarted_peer(KIND);
            }

            #[test]
            fn keeps_stale_vips_through_a_portico_graceful_restart() {
                graceful_restart(KIND);
            }

            #[test]
            fn receives_three_host_routes_aggregated_into_one_slash_24() {
                aggregation(KIND);
            }
        }
    )*};
}

against! {
    bird => PeerKind::Bird;
    frr => PeerKind::Frr;
    gobgp => PeerKind::Gobgp;
}
