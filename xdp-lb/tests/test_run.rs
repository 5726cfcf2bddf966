//! The XDP program under BPF_PROG_TEST_RUN (needs root; fails loudly without it).

use etherparse::PacketBuilder;
use portico_xdp::{verdict, XdpProgram};

fn udp4_packet(payload: &[u8]) -> Vec<u8> {
    let builder = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4([198, 18, 0, 1], [198, 18, 0, 2], 64)
        .udp(40000, 53);
    let mut packet = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut packet, payload).unwrap();
    packet
}

fn load() -> XdpProgram {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "BPF_PROG_TEST_RUN needs root (CAP_BPF, CAP_NET_ADMIN): run the suite as root"
    );
    XdpProgram::load().expect("loading the XDP program")
}

#[test]
fn counter_program_passes_a_udp_packet_and_counts_it() {
    let prog = load();
    let before = prog.stats().unwrap();
    let packet = udp4_packet(b"hello portico");
    let out = prog.test_run(&packet).unwrap();
    assert_eq!(out.verdict, verdict::PASS);
    assert_eq!(out.packet, packet, "a passed packet is left untouched");
    let after = prog.stats().unwrap();
    assert_eq!(after.packets - before.packets, 1);
    assert_eq!(after.bytes - before.bytes, packet.len() as u64);
}

#[test]
fn counter_program_counts_every_run() {
    let prog = load();
    let packet = udp4_packet(&[0xa5; 100]);
    for _ in 0..10 {
        assert_eq!(prog.test_run(&packet).unwrap().verdict, verdict::PASS);
    }
    let stats = prog.stats().unwrap();
    assert_eq!(stats.packets, 10);
    assert_eq!(stats.bytes, 10 * packet.len() as u64);
}

/// The verifier accepts the program with room to spare: the instructions it walks stay well
/// under its limit of a million, so the next feature does not tip it over.
#[test]
fn the_verifier_walks_the_program_well_within_its_limit() {
    let prog = load();
    // This process's program: other processes (tests running beside this one) may have
    // other builds of it loaded under the same name.
    let walked = prog
        .verified_instructions()
        .unwrap()
        .expect("the kernel reports verified instructions");
    println!("verifier walked {walked} instructions");
    assert!(walked < 500_000, "{walked}");
}
