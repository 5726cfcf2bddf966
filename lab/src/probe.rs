//! A steady stream of short UDP flows through an address, to measure what an event (a node
//! failing, a node restarting) costs the traffic: every `interval` a fresh socket (a new
//! 5-tuple, so the router's ECMP hash spreads the probes over the nodes) sends
//! [`WHO_REQUEST`]; a probe without an answer within `timeout`
//! is lost. Runs on its own thread inside a namespace until [`Prober::finish`], and at most
//! [`MAX_RUN`].

use std::collections::BTreeMap;
use std::io::ErrorKind;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};

use crate::topology::node_of;
use crate::traffic::{Answer, WHO_REQUEST};
use crate::NetNs;

/// The longest a prober runs, whatever happens.
pub const MAX_RUN: Duration = Duration::from_secs(180);

/// One probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// When it was sent, since the prober started.
    pub sent: Duration,
    /// The answer and how long it took, or `None`: lost.
    pub answer: Option<(Duration, Answer)>,
}

/// Sends probes until finished.
pub struct Prober {
    started: Instant,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Probe>>>,
    interval: Duration,
}

impl Prober {
    /// Starts probing `target` from `ns`.
    pub fn start(ns: &NetNs, target: SocketAddr, interval: Duration, timeout: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let (ns, flag) = (ns.clone(), stop.clone());
        let thread = std::thread::spawn(move || -> Result<Vec<Probe>> {
            let _in = ns.enter()?;
            run(target, interval, timeout, started, &flag)
        });
        Self {
            started,
            stop,
            thread,
            interval,
        }
    }

    /// Time since the prober started (to place events on the probes' time line).
    pub fn now(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops sending, waits for the last answers and reports.
    ///
    /// # Errors
    /// The probing thread failed (a socket could not be opened) or panicked.
    pub fn finish(self) -> Result<ProbeReport> {
        self.stop.store(true, Ordering::SeqCst);
        let probes = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the probing thread panicked"))??;
        Ok(ProbeReport {
            probes,
            interval: self.interval,
        })
    }
}

fn run(
    target: SocketAddr,
    interval: Duration,
    timeout: Duration,
    started: Instant,
    stop: &AtomicBool,
) -> Result<Vec<Probe>> {
    let local: SocketAddr = match target.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse()?,
        IpAddr::V6(_) => "[::]:0".parse()?,
    };
    let mut probes: Vec<Probe> = Vec::new();
    // (index into probes, socket) of probes still waiting for an answer.
    let mut pending: Vec<(usize, UdpSocket)> = Vec::new();
    let mut next = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        let now = Instant::now();
        let stopping = stop.load(Ordering::SeqCst) || started.elapsed() > MAX_RUN;
        if !stopping && now >= next {
            let s = UdpSocket::bind(local).context("opening a probe socket")?;
            s.set_nonblocking(true)?;
            let sent = started.elapsed();
            // A send error (no route yet) is a lost probe like any other.
            let _ = s.send_to(WHO_REQUEST.as_bytes(), target);
            probes.push(Probe { sent, answer: None });
            pending.push((probes.len() - 1, s));
            next += interval;
            if next < now {
                next = now + interval;
            }
        }
        pending.retain(|(i, s)| {
            let age = started.elapsed().saturating_sub(probes[*i].sent);
            match s.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if let Ok(a) = Answer::parse(&String::from_utf8_lossy(&buf[..n])) {
                        probes[*i].answer = Some((age, a));
                    }
                    false
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => age < timeout,
                Err(_) => age < timeout,
            }
        });
        if stopping && pending.is_empty() {
            return Ok(probes);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// What a prober saw.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    /// Every probe in order.
    pub probes: Vec<Probe>,
    /// The interval between probes.
    pub interval: Duration,
}

impl ProbeReport {
    /// Probes sent.
    pub fn sent(&self) -> usize {
        self.probes.len()
    }

    /// Probes lost.
    pub fn lost(&self) -> usize {
        self.probes.iter().filter(|p| p.answer.is_none()).count()
    }

    /// Probes lost that were sent within `from..to`.
    pub fn lost_between(&self, from: Duration, to: Duration) -> usize {
        self.probes
            .iter()
            .filter(|p| p.answer.is_none() && p.sent >= from && p.sent < to)
            .count()
    }

    /// Probes sent within `from..to`.
    pub fn sent_between(&self, from: Duration, to: Duration) -> usize {
        self.probes
            .iter()
            .filter(|p| p.sent >= from && p.sent < to)
            .count()
    }

    /// From the first lost probe to one interval after the last (zero when none was lost):
    /// how long some new flows went unanswered.
    pub fn interruption(&self) -> Duration {
        let mut lost = self.probes.iter().filter(|p| p.answer.is_none());
        match (
            lost.next(),
            self.probes.iter().rev().find(|p| p.answer.is_none()),
        ) {
            (Some(first), Some(last)) => last.sent - first.sent + self.interval,
            _ => Duration::ZERO,
        }
    }

    /// Answered probes by the node that carried them.
    pub fn by_node(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (_, a) in self.probes.iter().filter_map(|p| p.answer.as_ref()) {
            let node = node_of(a.seen_from.ip())
                .map_or_else(|| a.seen_from.ip().to_string(), |n| n.name.to_owned());
            *out.entry(node).or_insert(0) += 1;
        }
        out
    }

    /// One line for people: sent, lost, interruption window.
    pub fn summary(&self) -> String {
        format!(
            "{} probes every {} ms, {} lost ({:.1}%), new flows interrupted for {} ms",
            self.sent(),
            self.interval.as_millis(),
            self.lost(),
            100.0 * self.lost() as f64 / self.sent().max(1) as f64,
            self.interruption().as_millis()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(ms: u64, lost: bool) -> Probe {
        Probe {
            sent: Duration::from_millis(ms),
            answer: (!lost).then(|| {
                (
                    Duration::from_millis(1),
                    Answer::parse("be1 198.18.1.11:20000").unwrap(),
                )
            }),
        }
    }

    #[test]
    fn interruption_spans_first_to_last_lost_probe() {
        let r = ProbeReport {
            probes: vec![
                probe(0, false),
                probe(10, true),
                probe(20, false),
                probe(30, true),
                probe(40, false),
            ],
            interval: Duration::from_millis(10),
        };
        assert_eq!(r.lost(), 2);
        assert_eq!(r.interruption(), Duration::from_millis(30));
        assert_eq!(
            r.lost_between(Duration::from_millis(15), Duration::from_millis(50)),
            1
        );
        assert_eq!(r.by_node()["n1"], 3);
        let none = ProbeReport {
            probes: vec![probe(0, false)],
            interval: Duration::from_millis(10),
        };
        assert_eq!(none.interruption(), Duration::ZERO);
    }
}
