//! Two in-memory sessions wired back to back with a simulated clock (like quinn's
//! `tests/util.rs` `Pair`).
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use portico_announcer::session::{Direction, Event, Session, SessionConfig, State};
use portico_announcer::update::UpdateSummary;
use portico_announcer::Command;

pub const A_ADDR: &str = "192.0.2.1:40000";
pub const B_ADDR: &str = "192.0.2.2:179";

pub fn config_a() -> SessionConfig {
    let mut c = SessionConfig::new(65001, 65002, Ipv4Addr::new(192, 0, 2, 1));
    c.connect_retry_time = Duration::from_secs(5);
    c
}

pub fn config_b() -> SessionConfig {
    let mut c = SessionConfig::new(65002, 65001, Ipv4Addr::new(192, 0, 2, 2));
    c.passive = true;
    c.connect_retry_time = Duration::from_secs(5);
    c
}

pub struct Pair {
    pub now: Instant,
    pub a: Session,
    pub b: Session,
    pub a_events: Vec<Event>,
    pub b_events: Vec<Event>,
    /// Every chunk A sent to B, in order.
    pub a_sent: Vec<Bytes>,
    pub b_sent: Vec<Bytes>,
    pub connected: bool,
    /// B neither receives nor sends nor sees time pass (SIGSTOP).
    pub b_frozen: bool,
}

impl Pair {
    pub fn new(a: SessionConfig, b: SessionConfig) -> Self {
        let now = Instant::now();
        Pair {
            now,
            a: Session::new(a, now, 1),
            b: Session::new(b, now, 2),
            a_events: Vec::new(),
            b_events: Vec::new(),
            a_sent: Vec::new(),
            b_sent: Vec::new(),
            connected: false,
            b_frozen: false,
        }
    }

    pub fn default_pair() -> Self {
        Self::new(config_a(), config_b())
    }

    /// Start both and run until quiet.
    pub fn start(&mut self) {
        let now = self.now;
        self.b.handle_command(now, Command::Start);
        self.a.handle_command(now, Command::Start);
        self.drive();
    }

    pub fn established(&mut self) -> &mut Self {
        self.start();
        assert_eq!(self.a.state(), State::Established, "a: {:?}", self.a_events);
        assert_eq!(self.b.state(), State::Established, "b: {:?}", self.b_events);
        self
    }

    fn connect(&mut self) {
        // Like a driver, B acts on what it already said (a Close of the old connection)
        // before it sees a new one.
        self.drain_b_events();
        if self.connected || self.b_frozen || !self.b.accepts_connection() {
            // Connection refused: the attempt fails.
            self.a.handle_closed(self.now);
            return;
        }
        let a: SocketAddr = A_ADDR.parse().unwrap();
        let b: SocketAddr = B_ADDR.parse().unwrap();
        assert!(self.a.handle_connected(self.now, a, b, Direction::Outbound));
        assert!(self.b.handle_connected(self.now, b, a, Direction::Inbound));
        self.connected = true;
    }

    /// Move bytes and events until nothing happens.
    pub fn drive(&mut self) {
        for _ in 0..100_000 {
            let mut progress = false;
            while let Some(t) = self.a.poll_transmit() {
                progress = true;
                if self.connected && !self.b_frozen {
                    self.a_sent.push(t.clone());
                    self.b.handle_bytes(self.now, &t);
                }
            }
            if !self.b_frozen {
                while let Some(t) = self.b.poll_transmit() {
                    progress = true;
                    if self.connected {
                        self.b_sent.push(t.clone());
                        self.a.handle_bytes(self.now, &t);
                    }
                }
            }
            while let Some(e) = self.a.poll_event() {
                progress = true;
                match &e {
                    Event::Connect => self.connect(),
                    Event::Close if self.connected => {
                        self.connected = false;
                        if !self.b_frozen {
                            self.b.handle_closed(self.now);
                        }
                    }
                    _ => {}
                }
                self.a_events.push(e);
            }
            progress |= self.drain_b_events();
            if !progress {
                return;
            }
        }
        panic!("pair did not settle");
    }

    /// Handle B's pending events; returns whether there were any.
    fn drain_b_events(&mut self) -> bool {
        let mut any = false;
        if self.b_frozen {
            return false;
        }
        while let Some(e) = self.b.poll_event() {
            any = true;
            if let Event::Close = e {
                if self.connected {
                    self.connected = false;
                    self.a.handle_closed(self.now);
                }
            }
            self.b_events.push(e);
        }
        any
    }

    /// Advance the clock by `d`, firing timers in order.
    pub fn advance(&mut self, d: Duration) {
        let target = self.now + d;
        loop {
            let mut next = self.a.poll_timeout();
            if !self.b_frozen {
                next = match (next, self.b.poll_timeout()) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                };
            }
            match next {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.a.handle_timeout(self.now);
                    if !self.b_frozen {
                        self.b.handle_timeout(self.now);
                    }
                    self.drive();
                }
                _ => break,
            }
        }
        self.now = target;
        self.drive();
    }

    pub fn b_updates(&self) -> Vec<UpdateSummary> {
        self.b_events
            .iter()
            .filter_map(|e| match e {
                Event::UpdateReceived(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn a_bytes(&self) -> Vec<u8> {
        self.a_sent.iter().flat_map(|b| b.iter().copied()).collect()
    }
}

/// Split a byte stream into messages.
pub fn split_messages(mut buf: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some(len) = portico_announcer::wire::message_len(buf) {
        out.push(&buf[..len]);
        buf = &buf[len..];
    }
    assert!(buf.is_empty());
    out
}

/// The parts of an IPv4 UPDATE (no MP attributes): withdrawn prefixes, the raw path
/// attributes, and announced prefixes. `None` for other message types.
pub fn ipv4_update(msg: &[u8]) -> Option<(Vec<ipnet::IpNet>, Vec<u8>, Vec<ipnet::IpNet>)> {
    if msg[18] != 2 {
        return None;
    }
    let body = &msg[19..];
    let wlen = usize::from(u16::from_be_bytes([body[0], body[1]]));
    let withdrawn = ipv4_prefixes(&body[2..2 + wlen]);
    let rest = &body[2 + wlen..];
    let alen = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
    let attrs = rest[2..2 + alen].to_vec();
    let nlri = ipv4_prefixes(&rest[2 + alen..]);
    Some((withdrawn, attrs, nlri))
}

fn ipv4_prefixes(mut buf: &[u8]) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    while let Some((&len, rest)) = buf.split_first() {
        let n = usize::from(len).div_ceil(8);
        let mut octets = [0u8; 4];
        octets[..n].copy_from_slice(&rest[..n]);
        out.push(ipnet::IpNet::new(Ipv4Addr::from(octets).into(), len).unwrap());
        buf = &rest[n..];
    }
    out
}
