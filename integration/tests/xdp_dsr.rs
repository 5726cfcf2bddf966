//! Direct server return, the balancer side (issue 13), through BPF_PROG_TEST_RUN in the
//! `fibnet` namespace (where `bpf_fib_lookup` resolves for real): every encapsulation comes
//! out as Ethernet to the backend's MAC, an outer header built here with etherparse from
//! the fields the program may choose (the outer source within the configured prefix, GUE's
//! source port, the IPv6 flow label) and checked byte for byte (lengths, IPv4 header
//! checksum, DF, TTL 64, TOS copied, GUE's zero UDP checksum), then the client's packet
//! unchanged. A packet too big once encapsulated is answered with ICMP carrying the MTU
//! less the overhead. Needs root (fails with a message without it).

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use etherparse::{
    EtherType, Ethernet2Header, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder,
    UdpHeader,
};
use portico_integration::{fibnet, TestNet};
use portico_xdp::{
    verdict, BackendSpec, Balancer, DsrConfig, Encapsulation, Forwarding, LoadOptions, NodeConfig,
    Protocol, ServiceKey, ServiceSpec, XdpBalancer, XdpProgram,
};
use portico_xdp_common::stat;

use fibnet::{CLIENT_MAC, LB0_MAC, LB1_MAC};

const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1);
/// IPIP toward IPv4 backends (4in4), GUE on port 8443.
const VIP4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
/// IPv4 VIP with IPv6 backends: 4in6 (IPIP), GUE on 8443.
const VIP4_46: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 21);
/// IP6IP6 toward IPv6 backends, GUE on 8443.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0x20);
/// IPv6 VIP with IPv4 backends: 6in4 (IPIP), GUE on 8443.
const VIP6_64: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 0, 0, 0, 0, 0, 0x21);
/// The outer sources: these prefixes, their host bits from the flow hash.
const SRC4: (Ipv4Addr, u8) = (Ipv4Addr::new(198, 18, 200, 0), 24);
const SRC6: (Ipv6Addr, u8) = (Ipv6Addr::new(0xfd00, 0x18, 0x200, 0, 0, 0, 0, 0), 112);
const GUE_PORT: u16 = 6081;
const IPIP_PORT: u16 = 80;
const GUE_VIP_PORT: u16 = 8443;
/// The inner TOS / traffic class: DSCP AF41 and ECT(0), copied to the outer header.
const TOS: u8 = 0x8a;

fn backends(v6: bool) -> Vec<IpAddr> {
    (1..=3u8)
        .map(|i| {
            if v6 {
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0x18, 1, 0, 0, 0, 0, u16::from(i)))
            } else {
                IpAddr::V4(Ipv4Addr::new(198, 18, 1, i))
            }
        })
        .collect()
}

fn balancer() -> XdpBalancer {
    let program = XdpProgram::load_with(LoadOptions {
        max_services: 32,
        max_backends: 64,
        ring_size: 251,
        conntrack_entries: 4096,
        ..LoadOptions::default()
    })
    .expect("loading the XDP program (needs root)");
    let mut b = XdpBalancer::new(program);
    b.configure_node(&NodeConfig {
        snat_v4: Some(Ipv4Addr::from(fibnet::SNAT4)),
        snat_v6: Some(fibnet::SNAT6.parse().unwrap()),
        snat_ports: (20000, 20099),
        dsr: DsrConfig {
            source_v4: Some(SRC4),
            source_v6: Some(SRC6),
            gue_port: GUE_PORT,
        },
        ..NodeConfig::default()
    })
    .unwrap();
    for (vip, be_v6) in [
        (IpAddr::V4(VIP4), false),
        (IpAddr::V4(VIP4_46), true),
        (IpAddr::V6(VIP6), true),
        (IpAddr::V6(VIP6_64), false),
    ] {
        for (port, encap) in [
            (IPIP_PORT, Encapsulation::Ipip),
            (GUE_VIP_PORT, Encapsulation::Gue),
        ] {
            for proto in [Protocol::Tcp, Protocol::Udp] {
                b.upsert_service(&ServiceSpec {
                    key: ServiceKey { vip, port, proto },
                    backends: backends(be_v6)
                        .into_iter()
                        .map(|addr| BackendSpec {
                            addr,
                            port: 8080,
                            weight: 1,
                        })
                        .collect(),
                    hash_source_only: false,
                    preserve_source: false,
                    forwarding: Forwarding::Dsr(encap),
                })
                .unwrap();
            }
        }
    }
    b
}

/// A client's packet to `vip`: Ethernet from the client's next hop, TOS [`TOS`], TCP (ACK,
/// or SYN) or UDP, `payload` bytes of data. IPv4 with DF unless `no_df`.
fn client_packet(
    vip: IpAddr,
    sport: u16,
    dport: u16,
    tcp: Option<bool>,
    payload: usize,
) -> Vec<u8> {
    client_packet_df(vip, sport, dport, tcp, payload, true)
}

fn client_packet_df(
    vip: IpAddr,
    sport: u16,
    dport: u16,
    tcp: Option<bool>,
    payload: usize,
    df: bool,
) -> Vec<u8> {
    let eth = PacketBuilder::ethernet2(CLIENT_MAC, LB0_MAC);
    let ip = match vip {
        IpAddr::V4(v) => eth.ipv4(CLIENT4.octets(), v.octets(), 61),
        IpAddr::V6(v) => eth.ipv6(CLIENT6.octets(), v.octets(), 61),
    };
    let data: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let mut out = Vec::new();
    match tcp {
        Some(syn) => {
            let t = ip.tcp(sport, dport, 1000, 65_535);
            let t = if syn { t.syn() } else { t.ack(1) };
            t.write(&mut out, &data).unwrap();
        }
        None => ip.udp(sport, dport).write(&mut out, &data).unwrap(),
    }
    // The TOS / traffic class, and DF, set by hand (the builder has no setter).
    if vip.is_ipv4() {
        out[15] = TOS;
        if !df {
            out[20] &= !0x40;
        }
        fix_ipv4_checksum(&mut out[14..34]);
    } else {
        out[14] = 0x60 | TOS >> 4;
        out[15] = (TOS << 4) | (out[15] & 0x0f);
    }
    out
}

/// Recomputes an IPv4 header's checksum (RFC 1071), from scratch.
fn fix_ipv4_checksum(h: &mut [u8]) {
    h[10] = 0;
    h[11] = 0;
    let c = !ones_sum(h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
}

fn ones_sum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// What the program chose for a flow: the outer source, GUE's source port and the IPv6
/// flow label (0 where they do not apply).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Chosen {
    backend: IpAddr,
    source: IpAddr,
    sport: u16,
    flow_label: u32,
}

/// Checks `out` is `input` encapsulated toward one of `backends` with `gue` or IP in IP,
/// byte for byte around what the program may choose; returns those choices.
fn check_encapsulated(
    what: &str,
    input: &[u8],
    out: &[u8],
    backends: &[IpAddr],
    gue: bool,
) -> Chosen {
    let outer_v6 = backends[0].is_ipv6();
    let inner_v6 = input[14] >> 4 == 6;
    // The client's IP packet (an Ethernet trailer after it stays behind it), and its TOS.
    let ip_len = if inner_v6 {
        40 + usize::from(u16::from_be_bytes([input[18], input[19]]))
    } else {
        usize::from(u16::from_be_bytes([input[16], input[17]]))
    };
    let inner = &input[14..14 + ip_len];
    let trailer = &input[14 + ip_len..];
    let tos = if inner_v6 {
        (input[14] << 4) | (input[15] >> 4)
    } else {
        input[15]
    };
    let overhead = if outer_v6 { 40 } else { 20 } + if gue { 8 } else { 0 };
    assert_eq!(out.len(), input.len() + overhead, "{what}: length");
    // The choices, read from the output and checked for range.
    let (source, backend) = if outer_v6 {
        let s: [u8; 16] = out[22..38].try_into().unwrap();
        let d: [u8; 16] = out[38..54].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d))
    } else {
        let s: [u8; 4] = out[26..30].try_into().unwrap();
        let d: [u8; 4] = out[30..34].try_into().unwrap();
        (IpAddr::from(s), IpAddr::from(d))
    };
    assert!(
        backends.contains(&backend),
        "{what}: outer destination {backend}"
    );
    match source {
        IpAddr::V4(s) => assert_eq!(
            u32::from(s) >> (32 - SRC4.1),
            u32::from(SRC4.0) >> (32 - SRC4.1),
            "{what}: outer source {s} outside {SRC4:?}"
        ),
        IpAddr::V6(s) => assert_eq!(
            u128::from(s) >> (128 - SRC6.1),
            u128::from(SRC6.0) >> (128 - SRC6.1),
            "{what}: outer source {s} outside {SRC6:?}"
        ),
    }
    let l4 = 14 + if outer_v6 { 40 } else { 20 };
    let sport = if gue {
        u16::from_be_bytes([out[l4], out[l4 + 1]])
    } else {
        0
    };
    if gue {
        assert!(sport >= 0x8000, "{what}: GUE source port {sport}");
    }
    let flow_label = if outer_v6 {
        u32::from_be_bytes([0, out[15] & 0x0f, out[16], out[17]])
    } else {
        0
    };
    // The expected frame, built from those choices.
    let backend_mac = {
        let last = match backend {
            IpAddr::V4(a) => a.octets()[3],
            IpAddr::V6(a) => a.octets()[15],
        };
        fibnet::backend_mac(last)
    };
    let mut want = Vec::new();
    Ethernet2Header {
        destination: backend_mac,
        source: LB1_MAC,
        ether_type: if outer_v6 {
            EtherType::IPV6
        } else {
            EtherType::IPV4
        },
    }
    .write(&mut want)
    .unwrap();
    let ip_payload = inner.len() + if gue { 8 } else { 0 };
    let proto = match (gue, inner_v6) {
        (true, _) => IpNumber::UDP,
        (false, false) => IpNumber::IPV4,
        (false, true) => IpNumber::IPV6,
    };
    match (source, backend) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h =
                Ipv4Header::new(ip_payload as u16, 64, proto, s.octets(), d.octets()).unwrap();
            h.dscp = (tos >> 2).try_into().unwrap();
            h.ecn = (tos & 3).try_into().unwrap();
            h.dont_fragment = true;
            h.identification = 0;
            // `write` computes the header checksum itself.
            h.write(&mut want).unwrap();
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => Ipv6Header {
            traffic_class: tos,
            flow_label: Ipv6FlowLabel::try_new(flow_label).unwrap(),
            payload_length: ip_payload as u16,
            next_header: proto,
            hop_limit: 64,
            source: s.octets(),
            destination: d.octets(),
        }
        .write(&mut want)
        .unwrap(),
        _ => panic!("{what}: mixed outer families"),
    }
    if gue {
        UdpHeader {
            source_port: sport,
            destination_port: GUE_PORT,
            length: (8 + inner.len()) as u16,
            // Zero for both outer families (RFC 6935 for IPv6): docs/dsr.md.
            checksum: 0,
        }
        .write(&mut want)
        .unwrap();
    }
    want.extend_from_slice(inner);
    want.extend_from_slice(trailer);
    assert_eq!(
        hex(out),
        hex(&want),
        "{what}: not the expected encapsulation"
    );
    if !outer_v6 {
        assert_eq!(
            ones_sum(&out[14..34]),
            0xffff,
            "{what}: IPv4 header checksum"
        );
    }
    assert_eq!(
        &out[14 + overhead..14 + overhead + ip_len],
        inner,
        "{what}: the client's packet changed"
    );
    Chosen {
        backend,
        source,
        sport,
        flow_label,
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn ifindex(name: &str) -> u32 {
    fibnet::ifindex(name).unwrap()
}

#[test]
fn every_encapsulation_carries_the_clients_packet_unchanged_to_a_backend() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let eth0 = ifindex("eth0");
    let cases = [
        ("IPIP (4in4)", IpAddr::V4(VIP4), false, false),
        ("4in6", IpAddr::V4(VIP4_46), true, false),
        ("IP6IP6", IpAddr::V6(VIP6), true, false),
        ("6in4", IpAddr::V6(VIP6_64), false, false),
        ("GUE 4 over 4", IpAddr::V4(VIP4), false, true),
        ("GUE 4 over 6", IpAddr::V4(VIP4_46), true, true),
        ("GUE 6 over 6", IpAddr::V6(VIP6), true, true),
        ("GUE 6 over 4", IpAddr::V6(VIP6_64), false, true),
    ];
    let mut sport = 41_000;
    for (what, vip, be_v6, gue) in cases {
        let port = if gue { GUE_VIP_PORT } else { IPIP_PORT };
        let bes = backends(be_v6);
        for (l4, tcp) in [("TCP", Some(true)), ("UDP", None)] {
            let what = format!("{what} {l4}");
            sport += 1;
            let encapsulated = prog.stat(stat::DSR_ENCAP).unwrap();
            // The flow's first packet (slow path), then its next one (for TCP, the flow
            // cache's fast path once the flow is confirmed; UDP is confirmed at once).
            let first = client_packet(vip, sport, port, tcp, 100);
            let out = prog.test_run_on(&first, Some(eth0)).unwrap();
            assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT", "{what}: first");
            let chosen = check_encapsulated(&what, &first, &out.packet, &bes, gue);
            for i in 0..3 {
                let next = client_packet(vip, sport, port, tcp.map(|_| false), 200 + i);
                let out = prog.test_run_on(&next, Some(eth0)).unwrap();
                assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT", "{what}: next");
                let again = check_encapsulated(&what, &next, &out.packet, &bes, gue);
                assert_eq!(again, chosen, "{what}: a flow's packets take one way");
            }
            assert_eq!(
                prog.stat(stat::DSR_ENCAP).unwrap(),
                encapsulated + 4,
                "{what}: counted"
            );
        }
    }
    // A flow's later packets come from the flow cache.
    assert!(prog.stat(stat::CT_SLOW).unwrap() < prog.stat(stat::CT_HIT).unwrap());
}

#[test]
fn outer_sources_and_gue_ports_spread_flows_for_the_backends_rss() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let eth0 = ifindex("eth0");
    for (what, vip, be_v6) in [
        ("GUE over IPv4", IpAddr::V4(VIP4), false),
        ("GUE over IPv6", IpAddr::V6(VIP6), true),
    ] {
        let mut sources = BTreeSet::new();
        let mut ports = BTreeSet::new();
        let mut labels = BTreeSet::new();
        for sport in 50_000..50_064u16 {
            let input = client_packet(vip, sport, GUE_VIP_PORT, None, 10);
            let out = prog.test_run_on(&input, Some(eth0)).unwrap();
            let c = check_encapsulated(what, &input, &out.packet, &backends(be_v6), true);
            sources.insert(c.source);
            ports.insert(c.sport);
            labels.insert(c.flow_label);
        }
        // 64 flows over 256 (IPv4) or 65,536 (IPv6) sources and 32,768 ports: by chance,
        // far more than 32 distinct values of each.
        assert!(
            sources.len() > 32,
            "{what}: {} outer sources",
            sources.len()
        );
        assert!(ports.len() > 32, "{what}: {} source ports", ports.len());
        if be_v6 {
            assert!(labels.len() > 32, "{what}: {} flow labels", labels.len());
        }
    }
}

/// DSR flows take no port of the node's SNAT range (here 100 ports): 1,000 new TCP flows
/// to three backends all go out encapsulated, and one client address and port used toward
/// two VIP ports that share their backends makes two flows, neither refused.
#[test]
fn dsr_flows_are_not_capped_by_the_snat_port_range() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let eth0 = ifindex("eth0");
    let vip = IpAddr::V4(VIP4);
    for sport in 30_000..31_000u16 {
        let input = client_packet(vip, sport, IPIP_PORT, Some(true), 0);
        let out = prog.test_run_on(&input, Some(eth0)).unwrap();
        assert_eq!(
            verdict::name(out.verdict),
            "XDP_REDIRECT",
            "SYN from port {sport}"
        );
        check_encapsulated("IPIP SYN", &input, &out.packet, &backends(false), false);
    }
    for (port, gue) in [
        (IPIP_PORT, false),
        (GUE_VIP_PORT, false),
        (GUE_VIP_PORT, true),
    ] {
        // The same client port toward both VIP ports (the GUE one twice: its second
        // packet, an ACK, confirms that flow).
        let input = client_packet(vip, 40_000, port, Some(!gue), 0);
        let out = prog.test_run_on(&input, Some(eth0)).unwrap();
        assert_eq!(
            verdict::name(out.verdict),
            "XDP_REDIRECT",
            "client port 40000 to VIP port {port}"
        );
        check_encapsulated(
            "shared client port",
            &input,
            &out.packet,
            &backends(false),
            port == GUE_VIP_PORT,
        );
    }
    assert_eq!(prog.stat(stat::DROP_NO_SNAT_PORT).unwrap(), 0);
    assert_eq!(prog.stat(stat::DSR_ENCAP).unwrap(), 1_003);
}

/// A DSR flow that ECMP moves to another node mid-stream keeps its backend: the second
/// node, with no state for it, balances its ACK through the same Maglev ring and seed to
/// the backend the first node chose (docs/xdp.md, "A flow that arrives at another node").
#[test]
fn a_dsr_flow_moved_to_another_node_keeps_its_backend() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let (first, second) = (balancer(), balancer());
    let _in_lb = lb.enter().unwrap();
    let eth0 = ifindex("eth0");
    let mut chosen = BTreeSet::new();
    for (vip, be_v6) in [(IpAddr::V4(VIP4), false), (IpAddr::V6(VIP6), true)] {
        for sport in 41_000..41_032u16 {
            let syn = client_packet(vip, sport, IPIP_PORT, Some(true), 0);
            let out = first.program().test_run_on(&syn, Some(eth0)).unwrap();
            let a = check_encapsulated("SYN, node 1", &syn, &out.packet, &backends(be_v6), false);
            let ack = client_packet(vip, sport, IPIP_PORT, Some(false), 100);
            let out = second.program().test_run_on(&ack, Some(eth0)).unwrap();
            let b = check_encapsulated("ACK, node 2", &ack, &out.packet, &backends(be_v6), false);
            assert_eq!(a.backend, b.backend, "client port {sport} to {vip}");
            chosen.insert(a.backend);
        }
    }
    // The flows spread over the backends (three of each family).
    assert!(chosen.len() >= 4, "{chosen:?}");
}

/// A fixed outer source (a /32 or /128) is used as it is.
#[test]
fn a_fixed_outer_source_is_used_for_every_flow() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let mut balancer = balancer();
    balancer
        .configure_node(&NodeConfig {
            snat_v4: Some(Ipv4Addr::from(fibnet::SNAT4)),
            snat_v6: Some(fibnet::SNAT6.parse().unwrap()),
            snat_ports: (20000, 20099),
            dsr: DsrConfig {
                source_v4: Some((Ipv4Addr::new(198, 18, 200, 7), 32)),
                source_v6: None,
                gue_port: GUE_PORT,
            },
            ..NodeConfig::default()
        })
        .unwrap();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let eth0 = ifindex("eth0");
    for sport in 51_000..51_016u16 {
        let input = client_packet(IpAddr::V4(VIP4), sport, IPIP_PORT, None, 10);
        let out = prog.test_run_on(&input, Some(eth0)).unwrap();
        let c = check_encapsulated("fixed v4", &input, &out.packet, &backends(false), false);
        assert_eq!(c.source, IpAddr::V4(Ipv4Addr::new(198, 18, 200, 7)));
        // No IPv6 source configured: the IPv6 SNAT address.
        let input = client_packet(IpAddr::V6(VIP6), sport, IPIP_PORT, None, 10);
        let out = prog.test_run_on(&input, Some(eth0)).unwrap();
        let out = &out.packet;
        let s: [u8; 16] = out[22..38].try_into().unwrap();
        assert_eq!(
            Ipv6Addr::from(s),
            fibnet::SNAT6.parse::<Ipv6Addr>().unwrap()
        );
    }
}

/// The ICMP answer `out` to `input`: from the VIP to the client, fragmentation needed /
/// packet too big with `mtu`, quoting the start of `input`'s IP packet.
fn check_too_big(what: &str, input: &[u8], out: &[u8], mtu: u32) {
    assert_eq!(out[..6], CLIENT_MAC, "{what}: back to the client's hop");
    let v6 = input[14] >> 4 == 6;
    let icmp_off = if v6 {
        assert_eq!(out[38..54], input[22..38], "{what}: to the client");
        assert_eq!(out[22..38], input[38..54], "{what}: from the VIP");
        assert_eq!(out[20], 58, "{what}: ICMPv6");
        54
    } else {
        assert_eq!(out[30..34], input[26..30], "{what}: to the client");
        assert_eq!(out[26..30], input[30..34], "{what}: from the VIP");
        assert_eq!(out[23], 1, "{what}: ICMP");
        assert_eq!(
            ones_sum(&out[14..34]),
            0xffff,
            "{what}: IPv4 header checksum"
        );
        34
    };
    let icmp = &out[icmp_off..];
    if v6 {
        assert_eq!(icmp[0], 2, "{what}: ICMPv6 packet too big");
        assert_eq!(
            u32::from_be_bytes(icmp[4..8].try_into().unwrap()),
            mtu,
            "{what}: MTU"
        );
    } else {
        assert_eq!((icmp[0], icmp[1]), (3, 4), "{what}: fragmentation needed");
        assert_eq!(
            u32::from(u16::from_be_bytes([icmp[6], icmp[7]])),
            mtu,
            "{what}: next-hop MTU"
        );
        assert_eq!(ones_sum(icmp), 0xffff, "{what}: ICMP checksum");
    }
    let quoted = &icmp[8..];
    assert_eq!(&quoted[..40], &input[14..54], "{what}: the quote");
}

#[test]
fn a_packet_too_big_once_encapsulated_is_answered_with_the_mtu_less_the_overhead() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    lb.run(&["ip", "link", "set", "eth1", "mtu", "1400"])
        .unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let eth0 = ifindex("eth0");
    let cases = [
        ("IPIP (4in4)", IpAddr::V4(VIP4), false, false, 20),
        ("4in6", IpAddr::V4(VIP4_46), true, false, 40),
        ("IP6IP6", IpAddr::V6(VIP6), true, false, 40),
        ("6in4", IpAddr::V6(VIP6_64), false, false, 20),
        ("GUE 4 over 4", IpAddr::V4(VIP4), false, true, 28),
        ("GUE 4 over 6", IpAddr::V4(VIP4_46), true, true, 48),
        ("GUE 6 over 6", IpAddr::V6(VIP6), true, true, 48),
        ("GUE 6 over 4", IpAddr::V6(VIP6_64), false, true, 28),
    ];
    let mut sport = 42_000;
    for (what, vip, be_v6, gue, overhead) in cases {
        let port = if gue { GUE_VIP_PORT } else { IPIP_PORT };
        let bes = backends(be_v6);
        sport += 1;
        let l3 = if vip.is_ipv4() { 20 } else { 40 };
        // Exactly fits: the IP packet is 1400 bytes less the overhead.
        let fits = 1400 - overhead - l3 - 20;
        let input = client_packet(vip, sport, port, Some(true), fits);
        let out = prog.test_run_on(&input, Some(eth0)).unwrap();
        assert_eq!(verdict::name(out.verdict), "XDP_REDIRECT", "{what}: fits");
        check_encapsulated(what, &input, &out.packet, &bes, gue);
        // One byte more: answered (twice: nothing of the first answer stays behind).
        for _ in 0..2 {
            let sent = prog.stat(stat::ICMP_TOO_BIG).unwrap();
            let input = client_packet(vip, sport, port, Some(false), fits + 1);
            let out = prog.test_run_on(&input, Some(eth0)).unwrap();
            assert_eq!(verdict::name(out.verdict), "XDP_TX", "{what}: too big");
            check_too_big(what, &input, &out.packet, 1400 - overhead as u32);
            assert_eq!(prog.stat(stat::ICMP_TOO_BIG).unwrap(), sent + 1, "{what}");
        }
    }
    // IPv4 without DF: nobody fragments it (the backend reassembles no outer fragments):
    // dropped, counted.
    let dropped = prog.stat(stat::DROP_TOO_BIG).unwrap();
    let input = client_packet_df(IpAddr::V4(VIP4), 43_000, IPIP_PORT, None, 1400, false);
    let out = prog.test_run_on(&input, Some(eth0)).unwrap();
    assert_eq!(verdict::name(out.verdict), "XDP_DROP", "no DF");
    assert_eq!(prog.stat(stat::DROP_TOO_BIG).unwrap(), dropped + 1);
}

/// A small deterministic generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Whether the IP packet in `p` (after 14 bytes of Ethernet) is whole and, for IPv4, has a
/// right header checksum and is no later fragment: what a packet must be to be encapsulated.
fn well_formed(p: &[u8]) -> bool {
    if p.len() < 14 + 20 {
        return false;
    }
    if p[12..14] == [0x08, 0x00] {
        let ihl = usize::from(p[14] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([p[16], p[17]]));
        p[14] >> 4 == 4
            && ihl >= 20
            && total >= ihl
            && 14 + total <= p.len()
            && ones_sum(&p[14..14 + ihl]) == 0xffff
            // A first fragment goes the way of a whole packet; later ones do not.
            && u16::from_be_bytes([p[20], p[21]]) & 0x1fff == 0
    } else {
        p[12..14] == [0x86, 0xdd]
            && p.len() >= 54
            && p[14] >> 4 == 6
            && 54 + usize::from(u16::from_be_bytes([p[18], p[19]])) <= p.len()
    }
}

/// Random and mutated packets to the DSR listeners: every output is the input passed
/// untouched, a drop counted as too big, an ICMP too-big answer, or a well-formed packet's
/// exact encapsulation toward the backend and outer source its flow always gets.
#[test]
fn mutated_packets_to_dsr_services_pass_untouched_or_go_encapsulated_whole() {
    let mut net = TestNet::new().unwrap();
    let lb = fibnet::lb_namespace(&mut net).unwrap();
    let balancer = balancer();
    let prog = balancer.program();
    let _in_lb = lb.enter().unwrap();
    let eth0 = ifindex("eth0");
    // A fixed seed (reproducible); `PORTICO_XDP_DSR_SEED` for another.
    let seed = std::env::var("PORTICO_XDP_DSR_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_d5a0);
    let mut rng = Rng(seed);
    let vips = [
        IpAddr::V4(VIP4),
        IpAddr::V4(VIP4_46),
        IpAddr::V6(VIP6),
        IpAddr::V6(VIP6_64),
    ];
    let mut flows = std::collections::HashMap::<Vec<u8>, Chosen>::new();
    let mut tally = std::collections::BTreeMap::<&str, usize>::new();
    for n in 0..3000 {
        let vip = vips[rng.below(vips.len())];
        let gue = rng.below(2) == 0;
        let port = if gue { GUE_VIP_PORT } else { IPIP_PORT };
        let tcp = match rng.below(3) {
            0 => Some(true),
            1 => Some(false),
            _ => None,
        };
        let len = if rng.below(8) == 0 {
            1400 + rng.below(100)
        } else {
            rng.below(200)
        };
        let sport = 30_000 + rng.below(16) as u16;
        let mut p = client_packet_df(vip, sport, port, tcp, len, rng.below(4) != 0);
        // Mutations, each by chance.
        if rng.below(4) == 0 {
            let at = 14 + rng.below(60.min(p.len() - 14));
            p[at] ^= 1 << rng.below(8);
            if vip.is_ipv4() && rng.below(2) == 0 {
                fix_ipv4_checksum(&mut p[14..34]);
            }
        }
        if rng.below(8) == 0 {
            p[if vip.is_ipv4() { 22 } else { 21 }] = rng.below(3) as u8;
            if vip.is_ipv4() {
                fix_ipv4_checksum(&mut p[14..34]);
            }
        }
        if rng.below(8) == 0 {
            p.extend((0..1 + rng.below(20)).map(|_| 0));
        }
        if rng.below(10) == 0 {
            let keep = 14 + rng.below(p.len() - 14);
            p.truncate(keep);
        }
        if rng.below(12) == 0 {
            // An 802.1Q tag: DSR moves only an untagged Ethernet header.
            p.splice(12..12, [0x81, 0x00, 0x00, 0x07]);
        }
        let what = format!("seed {seed}, packet {n}");
        let before = balancer.datapath_counters().unwrap();
        let out = prog.test_run_on(&p, Some(eth0)).unwrap();
        let kind = verdict::name(out.verdict);
        *tally.entry(kind).or_default() += 1;
        match kind {
            "XDP_PASS" => assert_eq!(hex(&out.packet), hex(&p), "{what}: passed, changed"),
            "XDP_DROP" => {
                let after = balancer.datapath_counters().unwrap();
                let moved: Vec<&str> = after
                    .iter()
                    .zip(&before)
                    .filter(|((n, a), (_, b))| a != b && n.starts_with("drop"))
                    .map(|((n, _), _)| *n)
                    .collect();
                // Too big without DF; or a later fragment (a flipped offset bit), whose
                // first fragment was not seen (docs/xdp.md, "Fragments").
                let l3 = if p[12..14] == [0x81, 0x00] { 18 } else { 14 };
                let later_fragment = p[l3 - 2..l3] == [0x08, 0x00]
                    && u16::from_be_bytes([p[l3 + 6], p[l3 + 7]]) & 0x1fff != 0;
                let why = if later_fragment {
                    "drop_frag_no_head"
                } else {
                    "drop_too_big"
                };
                assert_eq!(moved, [why], "{what}: dropped as");
            }
            "XDP_TX" => {
                // Only a too-big answer goes back out the way it came.
                let v6 = out.packet[12..14] == [0x86, 0xdd];
                let icmp = &out.packet[if v6 { 54 } else { 34 }..];
                let (kind, mtu) = if v6 {
                    (icmp[0], u32::from_be_bytes(icmp[4..8].try_into().unwrap()))
                } else {
                    assert_eq!(icmp[1], 4, "{what}: fragmentation needed");
                    (icmp[0], u32::from(u16::from_be_bytes([icmp[6], icmp[7]])))
                };
                assert_eq!(kind, if v6 { 2 } else { 3 }, "{what}: too big");
                assert!([1480, 1472, 1460, 1452].contains(&mtu), "{what}: MTU {mtu}");
            }
            "XDP_REDIRECT" => {
                assert!(
                    well_formed(&p),
                    "{what}: a malformed packet was forwarded: {}",
                    hex(&p)
                );
                // Of the service the packet reached (a flipped bit may make it another's).
                let outer_v6 = out.packet[12..14] == [0x86, 0xdd];
                let c = check_encapsulated(&what, &p, &out.packet, &backends(outer_v6), gue);
                // The flow: addresses, ports and protocol of the client's packet.
                let l3 = &p[14..];
                let (addrs, l4) = if vip.is_ipv4() {
                    (&l3[12..20], usize::from(l3[0] & 0x0f) * 4)
                } else {
                    (&l3[8..40], 40)
                };
                let proto = if vip.is_ipv4() { l3[9] } else { l3[6] };
                let mut key = addrs.to_vec();
                key.extend_from_slice(&l3[l4..l4 + 4]);
                key.push(proto);
                let first = *flows.entry(key).or_insert(c);
                assert_eq!(
                    (first.backend, first.source, first.sport),
                    (c.backend, c.source, c.sport),
                    "{what}: the flow changed its way"
                );
            }
            other => panic!("{what}: verdict {other}"),
        }
    }
    // Each kind of outcome happened.
    for kind in ["XDP_PASS", "XDP_REDIRECT", "XDP_TX", "XDP_DROP"] {
        assert!(tally.get(kind).copied().unwrap_or(0) > 0, "{tally:?}");
    }
}
