//! The session's timers as a table of deadlines (like quinn-proto's `connection/timer.rs`).

use std::time::Instant;

/// A session timer (RFC 4271 §8 plus the automatic-restart hold of §8.1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Timer {
    /// ConnectRetryTimer.
    ConnectRetry = 0,
    /// HoldTimer.
    Hold = 1,
    /// KeepaliveTimer.
    Keepalive = 2,
    /// DelayOpenTimer.
    DelayOpen = 3,
    /// IdleHoldTimer: automatic restart after an error dropped the session to Idle.
    IdleHold = 4,
}

impl Timer {
    pub(crate) const ALL: [Timer; 5] = [
        Timer::ConnectRetry,
        Timer::Hold,
        Timer::Keepalive,
        Timer::DelayOpen,
        Timer::IdleHold,
    ];
}

/// Deadlines, one slot per [`Timer`].
#[derive(Clone, Debug, Default)]
pub(crate) struct TimerTable {
    deadlines: [Option<Instant>; 5],
}

impl TimerTable {
    pub(crate) fn set(&mut self, timer: Timer, at: Instant) {
        self.deadlines[timer as usize] = Some(at);
    }

    pub(crate) fn stop(&mut self, timer: Timer) {
        self.deadlines[timer as usize] = None;
    }

    pub(crate) fn get(&self, timer: Timer) -> Option<Instant> {
        self.deadlines[timer as usize]
    }

    pub(crate) fn is_running(&self, timer: Timer) -> bool {
        self.get(timer).is_some()
    }

    pub(crate) fn stop_all(&mut self) {
        self.deadlines = [None; 5];
    }

    /// The earliest deadline.
    pub(crate) fn next(&self) -> Option<Instant> {
        self.deadlines.iter().flatten().min().copied()
    }

    /// Remove and return one expired timer, earliest first.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<Timer> {
        let t = Timer::ALL
            .into_iter()
            .filter(|t| self.get(*t).is_some_and(|d| d <= now))
            .min_by_key(|t| self.get(*t))?;
        self.stop(t);
        Some(t)
    }
}

/// A small deterministic PRNG (xorshift64*) for timer jitter; seeded from outside so
/// tests are reproducible.
#[derive(Clone, Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new(seed: u64) -> Self {
        Jitter(if seed == 0 {
            0x9e37_79b9_7f4a_7c15
        } else {
            seed
        })
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `d` scaled by a random factor in [0.75, 1.0] (RFC 4271 §10).
    pub(crate) fn apply(&mut self, d: std::time::Duration) -> std::time::Duration {
        let frac = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        d.mul_f64(0.75 + 0.25 * frac)
    }
}
