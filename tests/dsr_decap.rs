//! `portico decap` on a backend, end to end over veth: a balancer's namespace sends a
//! client's UDP datagram to the VIP inside IPIP (a raw socket, protocol 4: the kernel writes
//! the outer header); the backend's XDP program strips it, the backend's UDP server (bound
//! to the VIP, held on `lo`) gets the client's datagram from the client's address and
//! answers it; the answer leaves by the backend's own link to the client, from the VIP,
//! never through the balancer. Needs root (fails with a message without it).
//!
//! ```text
//!  lb 198.18.5.1 ──veth── 198.18.5.2 backend 198.18.6.2 ──veth── 198.18.6.1 client
//!                          (portico decap on eth0; VIP 203.0.113.50 on lo)
//! ```

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use etherparse::PacketBuilder;
use portico_integration::{traffic, NetNs, TestNet};

const BACKEND: [u8; 4] = [198, 18, 5, 2];
const CLIENT: [u8; 4] = [198, 18, 6, 1];
const VIP: [u8; 4] = [203, 0, 113, 50];
const PORT: u16 = 7000;
const CLIENT_PORT: u16 = 40_000;

/// Sends `inner` (an IPv4 packet) from `ns` to `to` inside IPIP.
fn send_ipip(ns: &NetNs, inner: Vec<u8>, to: Ipv4Addr) -> Result<()> {
    traffic::in_ns(ns, move || {
        // SAFETY: plain socket(2); the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_IPIP) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("raw IPIP socket");
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(to.octets()),
            },
            sin_zero: [0; 8],
        };
        // SAFETY: `inner` and `addr` are valid for the call's lengths.
        let rc = unsafe {
            libc::sendto(
                fd,
                inner.as_ptr().cast(),
                inner.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let err = std::io::Error::last_os_error();
        // SAFETY: our own descriptor.
        unsafe { libc::close(fd) };
        if rc < 0 {
            return Err(err).context("sending the IPIP packet");
        }
        Ok(())
    })
}

/// Waits (bounded) until `iface` in `ns` has an XDP program.
fn wait_xdp(ns: &NetNs, iface: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        if ns
            .run(&["ip", "link", "show", "dev", iface])?
            .contains("xdp")
        {
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(20) {
            bail!("no XDP program on {iface} after 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_backend_decapsulates_and_answers_the_client_directly() -> Result<()> {
    portico_integration::require_root("XDP and network namespaces")?;
    let mut net = TestNet::new()?;
    let lb = net.add_ns("lb")?;
    let be = net.add_ns("be")?;
    let client = net.add_ns("cl")?;
    net.veth(&lb, "eth0", &be, "eth0")?;
    net.veth(&be, "eth1", &client, "eth0")?;
    lb.run(&["ip", "addr", "add", "198.18.5.1/24", "dev", "eth0"])?;
    be.run(&["ip", "addr", "add", "198.18.5.2/24", "dev", "eth0"])?;
    be.run(&["ip", "addr", "add", "198.18.6.2/24", "dev", "eth1"])?;
    be.run(&["ip", "addr", "add", "203.0.113.50/32", "dev", "lo"])?;
    client.run(&["ip", "addr", "add", "198.18.6.1/24", "dev", "eth0"])?;
    client.run(&["ip", "route", "add", "203.0.113.50/32", "via", "198.18.6.2"])?;
    // The client's packets arrive on eth0 while the route back to the client is eth1: a
    // DSR backend must not filter them by reverse path.
    for conf in ["all", "eth0"] {
        be.run(&[
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{conf}.rp_filter=0"),
        ])?;
    }

    let decap = be
        .command(env!("CARGO_BIN_EXE_portico"))
        .args([
            "decap",
            "--interface",
            "eth0",
            "--local",
            "198.18.5.2",
            "--peer",
            "198.18.5.1",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("starting portico decap")?;
    let result = (|| -> Result<()> {
        wait_xdp(&be, "eth0")?;
        // The backend's server, bound to the VIP; the client's socket.
        let server = traffic::in_ns(&be, || {
            let s = UdpSocket::bind(SocketAddr::from((VIP, PORT)))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(s)
        })?;
        let cl = traffic::in_ns(&client, || {
            let s = UdpSocket::bind(SocketAddr::from((CLIENT, CLIENT_PORT)))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            Ok(s)
        })?;
        let mut inner = Vec::new();
        PacketBuilder::ipv4(CLIENT, VIP, 63)
            .udp(CLIENT_PORT, PORT)
            .write(&mut inner, b"dsr?")?;
        send_ipip(&lb, inner, Ipv4Addr::from(BACKEND))?;

        let mut buf = [0u8; 64];
        let (n, from) = server
            .recv_from(&mut buf)
            .context("the backend got no datagram")?;
        assert_eq!(&buf[..n], b"dsr?");
        assert_eq!(
            from,
            SocketAddr::from((CLIENT, CLIENT_PORT)),
            "not the client's source"
        );
        server.send_to(b"dsr!", from)?;
        let (n, from) = cl.recv_from(&mut buf).context("the client got no answer")?;
        assert_eq!(&buf[..n], b"dsr!");
        assert_eq!(
            from,
            SocketAddr::from((VIP, PORT)),
            "the answer is not from the VIP"
        );
        // The balancer has no link to the client: the answer can only have gone by the
        // backend's own.
        Ok(())
    })();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(decap.id() as i32, libc::SIGTERM) };
    let out = decap.wait_with_output()?;
    result?;
    let counters: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("counters: {}", String::from_utf8_lossy(&out.stdout)))?;
    assert_eq!(counters["decapsulated"], 1, "{counters}");
    Ok(())
}
