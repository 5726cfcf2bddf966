//! Push benchmark: how long after Established a real daemon holds Portico's whole table.
//!
//! ```text
//! cargo run --release -p portico-integration --example bgp_push -- --prefixes 100000 --peer bird
//! ```
//!
//! Portico's speaker already holds N distinct IPv4 host routes (from the benchmarking range
//! 198.18.0.0/15, above the link's 198.18.0.0/24) when its eBGP session to the daemon
//! (`bird`, `frr` or `gobgp`) comes up. The clock starts at the instant Portico's session
//! entered Established (from its status: snapshot time minus uptime) and stops at the end
//! of the first poll in which the daemon reports all N prefixes received from Portico.
//!
//! Polling must be cheap for the daemon, or it slows the import it measures: BIRD's
//! per-protocol route counter straight over its control socket (no process spawn, about a
//! millisecond), FRR's per-neighbor `pfxRcd` through vtysh, and for GoBGP an exact lookup
//! of the prefix Portico sends last (see [`Probe`]). The CLI spawns for FRR and GoBGP take
//! tens of milliseconds, which bounds the resolution for those two. After the clock stops,
//! the daemon's full table count is checked to be exactly N.
//!
//! The last line of output is `{"peer":"bird","prefixes":100000,"seconds":..}`. Everything
//! runs in two throwaway namespaces, removed on exit. Needs root.

use std::{
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr},
    os::unix::net::UnixStream,
    path::PathBuf,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use ipnet::{IpNet, Ipv4Net};
use portico_announcer::{
    driver::{PeerConfig as SpeakerPeer, PeerStatus, Speaker, SpeakerConfig},
    Family, RouteAttrs, SessionConfig, State,
};
use portico_integration::{
    peers::{Neighbor, PeerConfig, PeerKind, RealPeer},
    NetNs, TestNet,
};
use tokio::runtime::Runtime;

const PORTICO_ASN: u32 = 4_200_000_001;
const PEER_ASN: u32 = 4_200_000_002;
const PORTICO_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const PEER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// First announced host route: the link's /24 is skipped.
const FIRST_PREFIX: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 0);
/// Host routes available from `FIRST_PREFIX` to the end of 198.18.0.0/15.
const MAX_PREFIXES: usize = (1 << 17) - 256;
/// Bound for the session to come up and for the table to arrive.
const TIMEOUT: Duration = Duration::from_secs(60);

struct Args {
    prefixes: usize,
    peer: PeerKind,
}

fn parse_args() -> Result<Args> {
    let usage = "usage: bgp_push [--prefixes N] [--peer bird|frr|gobgp]";
    let mut args = Args {
        prefixes: 100_000,
        peer: PeerKind::Bird,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value; {usage}"))?;
        match flag.as_str() {
            "--prefixes" => args.prefixes = value.parse().context("--prefixes")?,
            "--peer" => {
                args.peer = PeerKind::ALL
                    .into_iter()
                    .find(|k| k.name() == value)
                    .with_context(|| format!("unknown peer {value:?}; {usage}"))?;
            }
            _ => bail!("unknown argument {flag:?}; {usage}"),
        }
    }
    ensure!(
        (1..=MAX_PREFIXES).contains(&args.prefixes),
        "--prefixes must be 1..={MAX_PREFIXES} (host routes in 198.18.0.0/15 above the link)"
    );
    Ok(args)
}

/// The `n` host routes Portico announces.
fn host_routes(n: usize) -> Vec<IpNet> {
    let first = u32::from(FIRST_PREFIX);
    (0..n)
        .map(|i| {
            let addr = Ipv4Addr::from(first + u32::try_from(i).expect("n fits in the /15"));
            IpNet::V4(Ipv4Net::new(addr, 32).expect("/32 is valid"))
        })
        .collect()
}

/// Tells whether the daemon holds all of Portico's prefixes, cheaply enough to poll hard.
enum Probe {
    /// BIRD's control socket, kept open (the CLI protocol is line based): the BGP
    /// protocol's `Routes: N imported` counter.
    Bird(BufReader<UnixStream>),
    /// `vtysh --vty_socket <dir> -c 'show bgp ipv4 unicast summary json'`: the neighbor's
    /// `pfxRcd` counter.
    Frr(NetNs, PathBuf),
    /// `gobgp -j global rib -a ipv4 <last prefix>`: an exact lookup of the prefix Portico
    /// sends last.
    ///
    /// GoBGP computes every table count (`gobgp neighbor`, `gobgp global rib summary`) by
    /// walking the table inside its main loop, so polling a count stalls the very import
    /// being measured (100k routes then take ~10 s instead of ~2). Portico sends its table
    /// sorted and GoBGP handles one neighbor's UPDATEs in order, so the last prefix
    /// arriving means all have; the full count is checked once afterwards.
    Gobgp(NetNs, IpNet),
}

impl Probe {
    fn new(peer: &RealPeer, last: IpNet) -> Result<Self> {
        Ok(match peer.kind() {
            PeerKind::Bird => {
                let socket = peer.dir().join("bird.ctl");
                let stream = UnixStream::connect(&socket)
                    .with_context(|| format!("connecting to {}", socket.display()))?;
                let mut reader = BufReader::new(stream);
                // Greeting: `0001 BIRD 2.x ready.`
                let mut line = String::new();
                reader.read_line(&mut line)?;
                ensure!(
                    line.starts_with("0001"),
                    "unexpected BIRD greeting {line:?}"
                );
                Probe::Bird(reader)
            }
            PeerKind::Frr => Probe::Frr(peer.ns().clone(), peer.dir().to_path_buf()),
            PeerKind::Gobgp => Probe::Gobgp(peer.ns().clone(), last),
        })
    }

    /// Whether the daemon holds all `n` prefixes.
    fn complete(&mut self, n: usize) -> Result<bool> {
        let n = n as u64;
        match self {
            Probe::Bird(reader) => {
                reader.get_mut().write_all(b"show protocols all\n")?;
                let mut out = String::new();
                loop {
                    let mut line = String::new();
                    ensure!(reader.read_line(&mut line)? > 0, "BIRD closed its socket");
                    // A reply ends with `0000` (done) or an 8xxx/9xxx error code.
                    let last = line.starts_with("0000")
                        || (line.starts_with(['8', '9']) && line.as_bytes().get(4) == Some(&b' '));
                    out.push_str(&line);
                    if last {
                        break;
                    }
                }
                Ok(bird_bgp_routes(&out) >= n)
            }
            Probe::Frr(ns, dir) => {
                let out = ns.run(&[
                    "vtysh",
                    "--vty_socket",
                    &dir.display().to_string(),
                    "-c",
                    "show bgp ipv4 unicast summary json",
                ])?;
                let v: serde_json::Value = serde_json::from_str(&out)?;
                let received = v["peers"][PORTICO_ADDR.to_string()]["pfxRcd"].as_u64();
                Ok(received.unwrap_or(0) >= n)
            }
            Probe::Gobgp(ns, last) => {
                let out = ns.run(&[
                    "gobgp",
                    "-u",
                    "127.0.0.1",
                    "-p",
                    "50051",
                    "-j",
                    "global",
                    "rib",
                    "-a",
                    "ipv4",
                    &last.to_string(),
                ])?;
                let out = out.trim();
                if out.is_empty() || out == "null" {
                    return Ok(false);
                }
                let v: serde_json::Value = serde_json::from_str(out)?;
                Ok(v.get(last.to_string()).is_some())
            }
        }
    }
}

/// Routes imported by BGP protocols in `show protocols all` output: each protocol starts
/// with a `1002-<name> <proto> ...` line, and its channels show
/// `Routes:         100000 imported, 0 exported, 100000 preferred` while up.
fn bird_bgp_routes(out: &str) -> u64 {
    let mut in_bgp = false;
    let mut total = 0;
    for line in out.lines() {
        if let Some(header) = line.strip_prefix("1002-") {
            in_bgp = header.split_whitespace().nth(1) == Some("BGP");
            continue;
        }
        let Some(rest) = line.trim().strip_prefix("Routes:") else {
            continue;
        };
        if in_bgp {
            total += rest
                .split_whitespace()
                .next()
                .and_then(|w| w.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// A tokio runtime whose worker threads (and so the sockets they open) live in `ns`.
fn runtime_in(ns: &NetNs) -> Result<Runtime> {
    let inside = ns.clone();
    thread::spawn(move || -> Result<Runtime> {
        let _in_ns = inside.enter()?;
        Ok(tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the runtime builder thread panicked"))?
}

/// When the session entered Established, from a status snapshot taken while it is up.
fn established_at(status: &PeerStatus) -> Option<Instant> {
    (status.state() == State::Established)
        .then(|| status.session.uptime.map(|u| status.taken_at - u))
        .flatten()
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let n = args.prefixes;

    let mut net = TestNet::new()?;
    let portico_ns = net.add_ns("push-portico")?;
    let peer_ns = net.add_ns("push-peer")?;
    net.veth(&portico_ns, "eth0", &peer_ns, "eth0")?;
    portico_ns.run(&["ip", "addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
    peer_ns.run(&["ip", "addr", "add", "198.18.0.2/24", "dev", "eth0"])?;

    let peer = RealPeer::start(
        &peer_ns,
        PeerConfig::new(args.peer, PEER_ADDR, PEER_ASN)
            .local_addr(IpAddr::V4(PEER_ADDR))
            .neighbor(Neighbor::new(IpAddr::V4(PORTICO_ADDR), PORTICO_ASN).passive()),
    )?;

    let rt = runtime_in(&portico_ns)?;
    let speaker = rt.block_on(rt.spawn(Speaker::bind(SpeakerConfig::default())))??;
    let prefixes = host_routes(n);
    let last = *prefixes.last().expect("at least one prefix");
    let mut probe = Probe::new(&peer, last)?;
    let build = Instant::now();
    speaker.announce(prefixes, RouteAttrs::default());
    let mut session = SessionConfig::new(PORTICO_ASN, PEER_ASN, PORTICO_ADDR);
    session.families = vec![Family::Ipv4Unicast];
    session.connect_retry_time = Duration::from_secs(1);
    let peer_addr = IpAddr::V4(PEER_ADDR);
    {
        let _rt = rt.enter();
        speaker.add_peer(SpeakerPeer::new(peer_addr, session))?;
    }
    eprintln!(
        "{}: Portico holds {n} prefixes ({:?} to hand over); connecting",
        args.peer,
        build.elapsed()
    );

    // Poll until the daemon holds everything. The clock runs from Portico's Established.
    let debug = std::env::var_os("BGP_PUSH_DEBUG").is_some();
    let deadline = Instant::now() + TIMEOUT;
    let mut polls = 0u32;
    let mut last_incomplete: Option<Instant> = None;
    let done_at = loop {
        let started = Instant::now();
        let complete = match probe.complete(n) {
            Ok(c) => c,
            Err(e) if polls == 0 => return Err(e.context("the first poll failed")),
            Err(_) => false,
        };
        let ended = Instant::now();
        polls += 1;
        if debug {
            eprintln!("poll {polls}: complete={complete} in {:?}", ended - started);
        }
        if complete {
            break ended;
        }
        last_incomplete = Some(started);
        if ended >= deadline {
            bail!(
                "{}: not all {n} prefixes after {TIMEOUT:?} (holds {:?}); Portico: {:#?}\n{}",
                args.peer,
                peer.route_count(),
                speaker.peer_status(peer_addr),
                peer.log_tail()
            );
        }
        // BIRD answers from its main loop: leave it some room between polls.
        thread::sleep(Duration::from_millis(1));
    };
    let status = speaker
        .peer_status(peer_addr)
        .context("Portico's peer is gone")?;
    let up = established_at(&status)
        .with_context(|| format!("Portico's session is not Established at the end: {status:#?}"))?;
    ensure!(
        status.session.advertised[Family::Ipv4Unicast.index()] == n,
        "Portico advertised {:?}, expected {n}",
        status.session.advertised
    );
    let held = peer.route_count()?;
    ensure!(
        held == n,
        "{} reported complete but holds {held} of {n} prefixes",
        args.peer
    );
    let seconds = done_at.saturating_duration_since(up).as_secs_f64();
    let since_up = |t: Instant| {
        // Negative when the poll started before Established.
        if t >= up {
            (t - up).as_secs_f64()
        } else {
            -(up - t).as_secs_f64()
        }
    };
    eprintln!(
        "{}: {n} prefixes held by {seconds:.4} s after Established (last incomplete poll \
         started at {} s; {polls} polls; {} UPDATEs sent)",
        args.peer,
        last_incomplete.map_or("-".into(), |t| format!("{:.4}", since_up(t))),
        status.session.updates_sent
    );
    drop(speaker);
    drop(rt);
    drop(probe);
    drop(peer);
    drop(net);
    println!(
        "{}",
        serde_json::json!({"peer": args.peer.name(), "prefixes": n, "seconds": (seconds * 1e4).round() / 1e4})
    );
    Ok(())
}
