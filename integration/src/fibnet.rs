//! A namespace in which `bpf_fib_lookup` resolves for real, for `BPF_PROG_TEST_RUN` fixtures
//! and benchmarks of the XDP balancer: clients behind `eth0`, backends behind `eth1` (and a
//! few on `eth0`, as a one-armed node reaches them), and permanent neighbour entries with
//! known MACs (no traffic is ever sent).

use anyhow::Result;

use crate::{NetNs, TestNet};

/// MAC of the clients' next hop (every client address resolves to it).
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 1];
/// MAC of the LB node's `eth0` (client side).
pub const LB0_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0];
/// MAC of the LB node's `eth1` (backend side).
pub const LB1_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 1];
/// Backends on `eth1`: `198.18.1.<i>` and `fd00:18:1::<i>` for i in 1..=BACKENDS.
pub const BACKENDS: u8 = 16;
/// The MAC of backend `i` (1-based).
pub fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, i]
}
/// Backends on the client side (`eth0`), one-armed: `198.18.0.<100+i>` and
/// `fd00:18::<100+i>` for i in 1..=ONE_ARM_BACKENDS, MAC `02:be:00:00:01:<i>`.
pub const ONE_ARM_BACKENDS: u8 = 16;
/// A backend on the client side (`eth0`), for the XDP_TX case.
pub const BACKEND_ON_ETH0: [u8; 4] = [198, 18, 0, 10];
/// Its MAC.
pub const BACKEND_ON_ETH0_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x10];
/// IPv4 SNAT address (on `eth1`).
pub const SNAT4: [u8; 4] = [198, 18, 1, 254];
/// IPv6 SNAT address (on `eth1`).
pub const SNAT6: &str = "fd00:18:1::fe";

/// Builds the `lb` namespace (and a `w` namespace holding the veth peers).
///
/// # Errors
/// A namespace, link, address, sysctl or neighbour cannot be set up.
pub fn lb_namespace(net: &mut TestNet) -> Result<NetNs> {
    let lb = net.add_ns("lb")?;
    let wire = net.add_ns("w")?;
    net.veth(&lb, "eth0", &wire, "c0")?;
    net.veth(&lb, "eth1", &wire, "b0")?;
    let mut cmds: Vec<Vec<String>> = [
        "ip link set eth0 address 02:1b:00:00:00:00",
        "ip link set eth1 address 02:1b:00:00:00:01",
        "ip addr add 198.18.0.254/24 dev eth0",
        "ip addr add 198.18.1.254/24 dev eth1",
        "ip -6 addr add fd00:18::fe/64 dev eth0 nodad",
        "ip -6 addr add fd00:18:1::fe/64 dev eth1 nodad",
        "sysctl -qw net.ipv4.ip_forward=1",
        "sysctl -qw net.ipv6.conf.all.forwarding=1",
        "ip neigh replace 198.18.0.1 lladdr 02:c1:00:00:00:01 dev eth0 nud permanent",
        "ip neigh replace 198.18.0.2 lladdr 02:c1:00:00:00:01 dev eth0 nud permanent",
        "ip neigh replace fd00:18::1 lladdr 02:c1:00:00:00:01 dev eth0 nud permanent",
        "ip neigh replace 198.18.0.10 lladdr 02:be:00:00:00:10 dev eth0 nud permanent",
    ]
    .iter()
    .map(|c| c.split(' ').map(str::to_owned).collect())
    .collect();
    for i in 1..=BACKENDS {
        let mac = format!("02:be:00:00:00:{i:02x}");
        for addr in [format!("198.18.1.{i}"), format!("fd00:18:1::{i:x}")] {
            cmds.push(
                [
                    "ip",
                    "neigh",
                    "replace",
                    &addr,
                    "lladdr",
                    &mac,
                    "dev",
                    "eth1",
                    "nud",
                    "permanent",
                ]
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            );
        }
    }
    for i in 1..=ONE_ARM_BACKENDS {
        let mac = format!("02:be:00:00:01:{i:02x}");
        for addr in [
            format!("198.18.0.{}", 100 + i),
            format!("fd00:18::{:x}", 100 + i),
        ] {
            cmds.push(
                format!("ip neigh replace {addr} lladdr {mac} dev eth0 nud permanent")
                    .split(' ')
                    .map(str::to_owned)
                    .collect(),
            );
        }
    }
    for c in &cmds {
        let args: Vec<&str> = c.iter().map(String::as_str).collect();
        lb.run(&args)?;
    }
    Ok(lb)
}

/// The interface index of `name` in the calling thread's namespace.
///
/// # Errors
/// No such interface.
pub fn ifindex(name: &str) -> Result<u32> {
    let c = std::ffi::CString::new(name)?;
    // SAFETY: valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    anyhow::ensure!(i != 0, "no interface {name}");
    Ok(i)
}
