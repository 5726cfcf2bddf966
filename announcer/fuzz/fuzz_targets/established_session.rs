//! Arbitrary bytes from the peer into an Established session: nothing may panic.
//! `cargo +nightly fuzz run established_session -- -max_total_time=60`
#![no_main]

use std::sync::OnceLock;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use portico_announcer::testing::{established_session, feed_peer_bytes};

fuzz_target!(|data: &[u8]| {
    static NOW: OnceLock<Instant> = OnceLock::new();
    let now = *NOW.get_or_init(Instant::now);
    // The first byte picks iBGP/eBGP and how the stream is split into reads.
    let (ctl, rest) = data.split_first().unwrap_or((&0, &[]));
    let mut s = established_session(now, ctl & 1 == 1);
    feed_peer_bytes(&mut s, now, rest, usize::from(ctl >> 1));
});
