//! Nothing a peer sends can panic an Established session (bounded-time twin of the
//! cargo-fuzz target in `fuzz/`), and RFC 7606 errors keep the session up.

use std::time::Instant;

use portico_announcer::session::{Event, State};
use portico_announcer::testing::{established_session, feed_peer_bytes};
use portico_announcer::update::ErrorAction;
use proptest::prelude::*;

/// A message with a valid marker and length around an arbitrary body.
fn framed(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()).min(65535) as u16).to_be_bytes());
    m.push(ty);
    m.extend_from_slice(body);
    m
}

fn message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        (1u8..=6, proptest::collection::vec(any::<u8>(), 0..600)).prop_map(|(t, b)| framed(t, &b)),
        // UPDATE-shaped: plausible length fields, random contents.
        (0u16..40, proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(w, rest)| {
            let mut b = vec![0, (w % 8) as u8];
            b.extend(std::iter::repeat_n(24u8, (w % 8) as usize));
            b.extend_from_slice(&(rest.len() as u16).to_be_bytes());
            b.extend_from_slice(&rest);
            framed(2, &b)
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn arbitrary_peer_bytes_never_panic(msgs in proptest::collection::vec(message(), 1..6), split in 1usize..64, ibgp in any::<bool>()) {
        let now = Instant::now();
        let mut s = established_session(now, ibgp);
        feed_peer_bytes(&mut s, now, &msgs.concat(), split);
    }
}

fn update(attrs: &[u8], nlri: &[u8]) -> Vec<u8> {
    let mut b = vec![0, 0];
    b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    b.extend_from_slice(attrs);
    b.extend_from_slice(nlri);
    framed(2, &b)
}

#[test]
fn treat_as_withdraw_keeps_the_session_up() {
    let now = Instant::now();
    let mut s = established_session(now, false);
    // Bad ORIGIN value: treat-as-withdraw, no NOTIFICATION.
    let attrs = [0x40, 1, 1, 9, 0x40, 2, 0, 0x40, 3, 4, 192, 0, 2, 2];
    s.handle_bytes(now, &update(&attrs, &[32, 10, 0, 0, 1]));
    assert_eq!(s.state(), State::Established);
    let ev: Vec<Event> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(ev.iter().any(
        |e| matches!(e, Event::UpdateReceived(u) if u.action == ErrorAction::TreatAsWithdraw)
    ));
    assert!(s.poll_transmit().is_none());
    assert_eq!(s.status(now).updates_received, 1);
}

#[test]
fn invalid_nlri_resets_with_the_right_notification() {
    let now = Instant::now();
    let mut s = established_session(now, false);
    let attrs = [0x40, 1, 1, 0, 0x40, 2, 0, 0x40, 3, 4, 192, 0, 2, 2];
    s.handle_bytes(now, &update(&attrs, &[40, 10, 0, 0, 1, 1]));
    assert_eq!(s.state(), State::Idle);
    let sent = s.poll_transmit().unwrap();
    assert_eq!(&sent[18..21], &[3, 3, 10]);
    assert_eq!(
        s.status(now).last_notification_sent.as_deref(),
        Some("UPDATE Message Error / Invalid Network Field")
    );
}

#[test]
fn large_update_is_fine_with_extended_messages_and_short_length_is_not() {
    let now = Instant::now();
    let mut s = established_session(now, false);
    // Extended messages were negotiated, so 5000 bytes is fine...
    let big = update(&[0xc0, 99, 0], &[]);
    let mut padded = big.clone();
    padded.resize(5000, 0);
    let len = padded.len() as u16;
    padded[16..18].copy_from_slice(&len.to_be_bytes());
    s.handle_bytes(now, &padded);
    // ...but trailing NLRI zeros are /0 prefixes, valid: the session survives.
    assert_eq!(s.state(), State::Established);
    // A length field below 19 is always an error.
    s.handle_bytes(now, &[0xff; 16]);
    s.handle_bytes(now, &[0, 5, 4]);
    assert_eq!(
        s.status(now).last_notification_sent.as_deref(),
        Some("Message Header Error / Bad Message Length")
    );
}

#[test]
fn checked_in_fuzz_corpus_replays_cleanly() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/established_session");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let data = std::fs::read(entry.unwrap().path()).unwrap();
        let now = Instant::now();
        let (ctl, rest) = data.split_first().unwrap();
        let mut s = established_session(now, ctl & 1 == 1);
        for chunk in rest.chunks(usize::from(ctl >> 1).max(1)) {
            s.handle_bytes(now, chunk);
        }
        while s.poll_event().is_some() {}
        n += 1;
    }
    assert!(n >= 5);
}
