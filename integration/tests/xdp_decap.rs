//! The backends' decapsulation program (DSR), in the kernel through BPF_PROG_TEST_RUN: every
//! encapsulation a balancer may use comes out as the client's own packet behind the same
//! Ethernet addresses, byte for byte; anything not for this host, not from a known
//! balancer, or malformed passes untouched (or, from a balancer, is dropped), counted by
//! reason. Needs root (fails with a message without it).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{IpNumber, PacketBuilder};
use portico_xdp::{verdict, Decap, DecapConfig};

const MACS: ([u8; 6], [u8; 6]) = ([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2]);
const LB4: [u8; 4] = [198, 18, 1, 11];
const BE4: [u8; 4] = [198, 18, 1, 1];
const LB6: [u8; 16] = [0xfd, 0, 0, 0x18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x11];
const BE6: [u8; 16] = [0xfd, 0, 0, 0x18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const GUE_PORT: u16 = 6080;

fn config() -> DecapConfig {
    DecapConfig {
        local: vec![IpAddr::from(BE4), IpAddr::from(BE6)],
        peers: vec![IpAddr::from(LB4), IpAddr::from(LB6)],
        gue_port: Some(GUE_PORT),
    }
}

fn decap() -> Decap {
    portico_integration::require_root("loading the decapsulation program").unwrap();
    Decap::load(&config()).unwrap()
}

/// The client's packet (IP header onward): TCP from the client to the VIP.
fn inner(v6: bool) -> Vec<u8> {
    let b = if v6 {
        PacketBuilder::ipv6(
            [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
            [0xfd, 0, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            61,
        )
    } else {
        PacketBuilder::ipv4([192, 0, 2, 7], [203, 0, 113, 1], 61)
    };
    let mut out = Vec::new();
    b.tcp(40_000, 80, 7, 65_535)
        .syn()
        .write(&mut out, b"hello")
        .unwrap();
    out
}

/// `payload` (an IP packet) after Ethernet and an outer IP header from `src` to `dst` with
/// `proto`, or, with `gue`, after outer IP and UDP to the GUE port.
fn outer(src: IpAddr, dst: IpAddr, payload: &[u8], gue: bool) -> Vec<u8> {
    let inner_v6 = payload[0] >> 4 == 6;
    let eth = PacketBuilder::ethernet2(MACS.0, MACS.1);
    let ip = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("mixed outer families"),
    };
    let mut out = Vec::new();
    if gue {
        ip.udp(51_234, GUE_PORT).write(&mut out, payload).unwrap();
    } else {
        let proto = if inner_v6 {
            IpNumber::IPV6
        } else {
            IpNumber::IPV4
        };
        ip.write(&mut out, proto, payload).unwrap();
    }
    out
}

/// What the backend's stack must get: the same MACs, the inner family's EtherType, the
/// client's packet unchanged.
fn expected(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    // etherparse's `ethernet2(source, destination)`: the frame starts with the destination.
    out.extend_from_slice(&MACS.1);
    out.extend_from_slice(&MACS.0);
    out.extend_from_slice(if payload[0] >> 4 == 6 {
        &[0x86, 0xdd]
    } else {
        &[0x08, 0x00]
    });
    out.extend_from_slice(payload);
    out
}

fn counter(d: &Decap, name: &str) -> u64 {
    d.counters()
        .unwrap()
        .into_iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

#[test]
fn every_encapsulation_comes_out_as_the_clients_packet() {
    let d = decap();
    let (lb4, be4) = (IpAddr::from(LB4), IpAddr::from(BE4));
    let (lb6, be6) = (IpAddr::from(LB6), IpAddr::from(BE6));
    let cases = [
        ("IPIP (4in4)", lb4, be4, false, false),
        ("6in4", lb4, be4, true, false),
        ("4in6", lb6, be6, false, false),
        ("IP6IP6", lb6, be6, true, false),
        ("GUE 4 over 4", lb4, be4, false, true),
        ("GUE 6 over 4", lb4, be4, true, true),
        ("GUE 4 over 6", lb6, be6, false, true),
        ("GUE 6 over 6", lb6, be6, true, true),
    ];
    for (i, (what, src, dst, inner_v6, gue)) in cases.into_iter().enumerate() {
        let payload = inner(inner_v6);
        let out = d.test_run(&outer(src, dst, &payload, gue)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_PASS", "{what}");
        assert_eq!(
            out.packet,
            expected(&payload),
            "{what}: not the client's packet"
        );
        assert_eq!(counter(&d, "decapsulated"), i as u64 + 1, "{what}");
    }
    // Ethernet trailer bytes after the outer packet (short frames padded) are no reason to
    // refuse; they stay behind the inner packet, where the stack ignores them.
    let payload = inner(false);
    let mut padded = outer(lb4, be4, &payload, false);
    padded.extend_from_slice(&[0; 6]);
    let out = d.test_run(&padded).unwrap();
    assert_eq!(&out.packet[..14 + payload.len()], &expected(&payload)[..]);
}

#[test]
fn tunnel_packets_not_for_this_host_or_not_from_a_balancer_pass_untouched() {
    let d = decap();
    let payload = inner(false);
    let stranger = IpAddr::from(Ipv4Addr::new(198, 18, 1, 99));
    let cases = [
        (
            "unknown peer",
            outer(stranger, IpAddr::from(BE4), &payload, false),
            "pass_unknown_peer",
        ),
        (
            "another host's tunnel address",
            outer(IpAddr::from(LB4), stranger, &payload, false),
            "pass_not_local",
        ),
        (
            "unknown IPv6 peer",
            outer(
                IpAddr::from(Ipv6Addr::LOCALHOST),
                IpAddr::from(BE6),
                &inner(true),
                false,
            ),
            "pass_unknown_peer",
        ),
        (
            "plain TCP to the backend",
            {
                let mut out = Vec::new();
                PacketBuilder::ethernet2(MACS.0, MACS.1)
                    .ipv4(LB4, BE4, 64)
                    .tcp(1, 2, 3, 4)
                    .write(&mut out, b"x")
                    .unwrap();
                out
            },
            "pass_not_tunnel",
        ),
        (
            "UDP to another port",
            {
                let mut out = Vec::new();
                PacketBuilder::ethernet2(MACS.0, MACS.1)
                    .ipv4(LB4, BE4, 64)
                    .udp(1, GUE_PORT + 1)
                    .write(&mut out, &payload)
                    .unwrap();
                out
            },
            "pass_not_tunnel",
        ),
    ];
    for (what, packet, reason) in cases {
        let before = counter(&d, reason);
        let out = d.test_run(&packet).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_PASS", "{what}");
        assert_eq!(out.packet, packet, "{what}: changed");
        assert_eq!(
            counter(&d, reason),
            before + 1,
            "{what}: counted as {reason}"
        );
    }
    assert_eq!(counter(&d, "decapsulated"), 0);
}

#[test]
fn malformed_tunnel_packets_are_refused_before_anything_is_written() {
    let d = decap();
    let (lb4, be4) = (IpAddr::from(LB4), IpAddr::from(BE4));
    let good = outer(lb4, be4, &inner(false), false);
    // The outer length says more than the frame holds: passed untouched.
    let mut long = good.clone();
    let claimed = u16::from_be_bytes([long[16], long[17]]) + 40;
    long[16..18].copy_from_slice(&claimed.to_be_bytes());
    // From a balancer, an inner packet cut short (its own length says more): dropped.
    let mut cut = good.clone();
    let inner_len_at = 14 + 20 + 2;
    cut[inner_len_at..inner_len_at + 2].copy_from_slice(&200u16.to_be_bytes());
    // IPIP announcing IPv4 but carrying IPv6: dropped.
    let mut wrong = outer(lb4, be4, &inner(true), false);
    wrong[14 + 9] = 4;
    // A fragment of a tunnel packet: passed.
    let mut frag = good.clone();
    frag[14 + 6] = 0x20;
    for (what, packet, verdict_name, reason) in [
        (
            "outer length beyond the frame",
            long,
            "XDP_PASS",
            "pass_malformed",
        ),
        (
            "inner length beyond the outer",
            cut,
            "XDP_DROP",
            "drop_malformed",
        ),
        ("IPIP carrying IPv6", wrong, "XDP_DROP", "drop_malformed"),
        ("fragment", frag, "XDP_PASS", "pass_fragment"),
    ] {
        let before = counter(&d, reason);
        let out = d.test_run(&packet).unwrap();
        assert_eq!(verdict::name(out.verdict), verdict_name, "{what}");
        assert_eq!(out.packet, packet, "{what}: changed");
        assert_eq!(
            counter(&d, reason),
            before + 1,
            "{what}: counted as {reason}"
        );
    }
    // Truncated at every length the kernel runs (14 bytes and up): never decapsulated,
    // never a write.
    for len in 14..good.len() {
        let out = d.test_run(&good[..len]).unwrap();
        assert_eq!(out.packet, &good[..len], "cut at {len}: changed");
    }
    assert_eq!(counter(&d, "decapsulated"), 0);
}
