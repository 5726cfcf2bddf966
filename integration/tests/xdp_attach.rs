//! Attaches the XDP program to a veth inside throwaway namespaces and sends real traffic.

use portico_integration::TestNet;
use portico_xdp::{AttachMode, XdpProgram};

fn ping_through_attached_program(mode: AttachMode) {
    let mut net = TestNet::new().unwrap();
    let client = net.add_ns("c").unwrap();
    let node = net.add_ns("n").unwrap();
    net.veth(&client, "eth0", &node, "eth0").unwrap();
    client
        .run(&["ip", "addr", "add", "198.18.0.1/24", "dev", "eth0"])
        .unwrap();
    node.run(&["ip", "addr", "add", "198.18.0.2/24", "dev", "eth0"])
        .unwrap();

    let mut prog = XdpProgram::load().unwrap();
    {
        let _in_node = node.enter().unwrap();
        prog.attach("eth0", mode).unwrap();
    }
    let before = prog.stats().unwrap();
    client
        .run(&["ping", "-c", "5", "-i", "0.05", "-W", "2", "198.18.0.2"])
        .unwrap();
    let after = prog.stats().unwrap();
    // Five echo requests at least (ARP traffic may add a few packets).
    let seen = after.packets - before.packets;
    assert!(
        (5..=20).contains(&seen),
        "{mode:?}: program saw {seen} packets, expected 5 echo requests plus ARP"
    );
    assert!(
        after.bytes - before.bytes >= 5 * 98,
        "{mode:?}: bytes {}",
        after.bytes - before.bytes
    );
}

#[test]
fn native_xdp_on_veth_sees_pings() {
    ping_through_attached_program(AttachMode::Native);
}

#[test]
fn generic_xdp_on_veth_sees_pings() {
    ping_through_attached_program(AttachMode::Generic);
}

#[test]
fn test_net_removes_its_namespaces_on_drop() {
    let names: Vec<String> = {
        let mut net = TestNet::new().unwrap();
        net.add_ns("a").unwrap();
        net.add_ns("b").unwrap();
        net.namespaces().map(|n| n.name().to_owned()).collect()
    };
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for name in names {
        assert!(!list.contains(&name), "{name} still exists after drop");
    }
}

#[test]
fn test_net_cleans_up_after_a_panic() {
    let result = std::panic::catch_unwind(|| {
        let mut net = TestNet::new().unwrap();
        let ns = net.add_ns("p").unwrap();
        let name = ns.name().to_owned();
        std::panic::panic_any(name);
    });
    let name = *result.unwrap_err().downcast::<String>().unwrap();
    let list = String::from_utf8(
        std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(!list.contains(&name), "{name} survived a panic");
}

#[test]
fn attaching_to_a_missing_interface_names_it() {
    let mut net = TestNet::new().unwrap();
    let node = net.add_ns("n").unwrap();
    let mut prog = XdpProgram::load().unwrap();
    let _in_node = node.enter().unwrap();
    let err = prog
        .attach("nosuch0", AttachMode::Generic)
        .expect_err("attached to an interface that does not exist");
    assert!(err.to_string().contains("nosuch0"), "{err}");
}

#[test]
fn attaching_lets_the_stack_forward_packets_from_the_node_s_own_address() {
    let mut net = TestNet::new().unwrap();
    let node = net.add_ns("n").unwrap();
    let peer = net.add_ns("p").unwrap();
    net.veth(&node, "eth0", &peer, "eth0").unwrap();
    let mut prog = XdpProgram::load().unwrap();
    let _in_node = node.enter().unwrap();
    prog.attach("eth0", AttachMode::Generic).unwrap();
    let v = std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/accept_local").unwrap();
    assert_eq!(v.trim(), "1");
}
