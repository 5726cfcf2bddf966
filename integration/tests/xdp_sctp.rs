//! SCTP through the balancer over veth (issue 13). The kernel here has no SCTP sockets: the
//! client and the backend speak it through raw IP sockets (protocol 132) with INIT,
//! INIT ACK and DATA chunks the test builds, and the backend's side is checked by capture
//! (an AF_PACKET socket on its interface): every packet arrives from the SNAT address on
//! the backend port with a right CRC32c, and the client gets the INIT ACK from the VIP.
//!
//! ```text
//!  client ──veth── lb(eth0)   lb(eth1) ──veth── sw (bridge) ──veth── be1
//! ```

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{bail, ensure, Context as _, Result};
use portico_integration::{
    lab::{self, Family},
    sctp::{self, chunk_type},
    traffic,
};
use portico_xdp::{AttachMode, Balancer, Protocol};
use portico_xdp_common::stat;

const IPPROTO_SCTP: i32 = 132;
/// Packets read at most while waiting for the one wanted (others are skipped).
const MAX_READS: usize = 200;

fn check(rc: i32, what: &str) -> Result<()> {
    if rc < 0 {
        bail!("{what}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Gives up on a read after `secs` seconds (a failure, never a skip).
fn read_timeout(fd: &OwnedFd, secs: i64) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: secs,
        tv_usec: 0,
    };
    // SAFETY: a valid socket and a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    check(rc, "SO_RCVTIMEO")
}

/// A raw IP socket for protocol 132 in the current namespace: the kernel adds the IP header
/// on send; received IPv4 packets start with theirs, IPv6 ones with the SCTP header.
fn raw_sctp(v6: bool) -> Result<OwnedFd> {
    let fam = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(fam, libc::SOCK_RAW, IPPROTO_SCTP) };
    check(fd, "raw IP socket, protocol 132")?;
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    read_timeout(&fd, 5)?;
    Ok(fd)
}

/// An AF_PACKET socket capturing every frame of interface `ifname` (current namespace).
fn capture(ifname: &str) -> Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    check(fd, "AF_PACKET socket")?;
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    ensure!(ifindex != 0, "no interface {ifname}");
    // SAFETY: all-zero is a valid sockaddr_ll; the fields set below make it a bind address.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: a valid socket and a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    check(rc, "binding the capture")?;
    read_timeout(&fd, 5)?;
    Ok(fd)
}

fn recv(fd: &OwnedFd) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: a valid socket and a buffer of the length given.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        bail!("receiving: {}", std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

/// A packet and its sender's address (raw IP sockets).
fn recv_from(fd: &OwnedFd) -> Result<(Vec<u8>, IpAddr)> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as u32;
    // SAFETY: a valid socket, a buffer and a sockaddr_storage of the lengths given.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            0,
            (&raw mut ss).cast(),
            &mut len,
        )
    };
    if n < 0 {
        bail!("receiving: {}", std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    let from = if i32::from(ss.ss_family) == libc::AF_INET6 {
        // SAFETY: the kernel wrote a sockaddr_in6.
        let sin6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const ss).cast()) };
        IpAddr::from(sin6.sin6_addr.s6_addr)
    } else {
        // SAFETY: the kernel wrote a sockaddr_in.
        let sin: libc::sockaddr_in = unsafe { std::ptr::read((&raw const ss).cast()) };
        IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
    };
    Ok((buf, from))
}

fn send_to(fd: &OwnedFd, to: IpAddr, sctp: &[u8]) -> Result<()> {
    let addr = socket2_addr(to);
    // SAFETY: a valid socket, the packet's bytes, and a sockaddr of the size given.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            sctp.as_ptr().cast(),
            sctp.len(),
            0,
            (&raw const addr.0).cast(),
            addr.1,
        )
    };
    ensure!(
        n == sctp.len() as isize,
        "sending to {to}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A sockaddr for `a` (port 0: raw sockets ignore it), with its length.
fn socket2_addr(a: IpAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match SocketAddr::new(a, 0) {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: 0,
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&raw mut ss).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as u32)
}

/// An SCTP packet seen on the wire: addresses and the SCTP bytes.
struct Seen {
    src: IpAddr,
    dst: IpAddr,
    sctp: Vec<u8>,
}

/// The SCTP packet of an Ethernet frame (untagged, no IPv6 extension headers), if it is one.
fn sctp_of_frame(f: &[u8]) -> Option<Seen> {
    let et = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let ip = f.get(14..)?;
    sctp_of_ip(ip, et == 0x86dd)
}

/// The SCTP packet of an IP packet, if it is one.
fn sctp_of_ip(ip: &[u8], v6: bool) -> Option<Seen> {
    if v6 {
        if ip.len() < 40 || ip[6] != 132 {
            return None;
        }
        let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        let a = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap());
        Some(Seen {
            src: a(8),
            dst: a(24),
            sctp: ip.get(40..40 + plen)?.to_vec(),
        })
    } else {
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[9] != 132 {
            return None;
        }
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        let a = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&ip[o..o + 4]).unwrap());
        Some(Seen {
            src: a(12),
            dst: a(16),
            sctp: ip.get(ihl..tot)?.to_vec(),
        })
    }
}

/// Reads until an SCTP packet `want` accepts arrives (at most [`MAX_READS`] packets).
fn wait_for(
    what: &str,
    mut read: impl FnMut() -> Result<Option<Seen>>,
    want: impl Fn(&Seen) -> bool,
) -> Result<Seen> {
    for _ in 0..MAX_READS {
        if let Some(s) = read().with_context(|| format!("waiting for {what}"))? {
            if want(&s) {
                return Ok(s);
            }
        }
    }
    bail!("{what}: not among {MAX_READS} packets")
}

fn ports(sctp: &[u8]) -> (u16, u16) {
    (
        u16::from_be_bytes([sctp[0], sctp[1]]),
        u16::from_be_bytes([sctp[2], sctp[3]]),
    )
}

fn association(v6: bool) -> Result<()> {
    let f = Family { v6 };
    let t = lab::topology(f)?;
    let mut data_path = t.start_data_path(AttachMode::Native)?;
    // One backend: the association's packets all land where the capture is.
    let svc = lab::service(f, Protocol::Sctp, &[Some(1), None, None]);
    data_path.balancer.upsert_service(&svc)?;
    let (vip, be, snat) = (f.vip(), f.backend(1), f.snat().parse::<IpAddr>()?);
    let (be_raw, be_cap) = traffic::in_ns(&t.backends[0], move || {
        Ok((raw_sctp(v6)?, capture("eth0")?))
    })?;
    let client_raw = traffic::in_ns(&t.client, move || raw_sctp(v6))?;
    let cport = 40000;
    let at_backend = |what: &str, ty: u8| {
        wait_for(
            what,
            || Ok(sctp_of_frame(&recv(&be_cap)?)),
            |s| s.dst == be && s.sctp.len() > 12 && s.sctp[12] == ty,
        )
    };

    // INIT: at the backend from the SNAT address, on the backend port, CRC right.
    let init = sctp::packet(
        cport,
        lab::VIP_PORT,
        0,
        &sctp::init_chunk(chunk_type::INIT, 0x1111),
    );
    send_to(&client_raw, vip, &init)?;
    let got = at_backend("INIT at the backend", chunk_type::INIT)?;
    let (snat_port, bport) = ports(&got.sctp);
    ensure!(
        got.src == snat,
        "INIT from {}, not the SNAT address",
        got.src
    );
    ensure!(bport == lab::BACKEND_PORT, "INIT to port {bport}");
    ensure!(sctp::crc_ok(&got.sctp), "INIT at the backend: CRC32c wrong");
    ensure!(got.sctp[12..] == init[12..], "INIT's chunks changed");

    // INIT ACK from the backend: at the client from the VIP, CRC right.
    let init_ack = sctp::packet(
        lab::BACKEND_PORT,
        snat_port,
        0x1111,
        &sctp::init_chunk(chunk_type::INIT_ACK, 0x2222),
    );
    send_to(&be_raw, snat, &init_ack)?;
    let got = wait_for(
        "INIT ACK at the client",
        || {
            let (p, from) = recv_from(&client_raw)?;
            // IPv6 raw sockets hand over the payload only.
            Ok(if v6 {
                Some(Seen {
                    src: from,
                    dst: f.client().parse()?,
                    sctp: p,
                })
            } else {
                sctp_of_ip(&p, false)
            })
        },
        |s| s.sctp.len() > 12 && s.sctp[12] == chunk_type::INIT_ACK,
    )?;
    ensure!(
        ports(&got.sctp) == (lab::VIP_PORT, cport),
        "INIT ACK ports {:?}",
        ports(&got.sctp)
    );
    ensure!(got.src == vip, "INIT ACK from {}, not the VIP", got.src);
    ensure!(
        sctp::crc_ok(&got.sctp),
        "INIT ACK at the client: CRC32c wrong"
    );

    // DATA, small and large: same SNAT port, CRC right, payload intact.
    for (tsn, len) in [(1u32, 5usize), (2, 1200)] {
        let body: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
        let data = sctp::packet(cport, lab::VIP_PORT, 0x2222, &sctp::data_chunk(tsn, &body));
        send_to(&client_raw, vip, &data)?;
        let got = at_backend(&format!("DATA of {len} bytes"), chunk_type::DATA)?;
        ensure!(got.src == snat, "DATA from {}", got.src);
        ensure!(
            ports(&got.sctp) == (snat_port, lab::BACKEND_PORT),
            "DATA ports {:?}",
            ports(&got.sctp)
        );
        ensure!(sctp::crc_ok(&got.sctp), "DATA of {len} bytes: CRC32c wrong");
        ensure!(got.sctp[12..] == data[12..], "DATA's chunks changed");
    }
    let prog = data_path.balancer.program();
    ensure!(
        prog.stat(stat::SCTP_CRC)? >= 4,
        "sctp_crc {}",
        prog.stat(stat::SCTP_CRC)?
    );
    Ok(())
}

#[test]
fn ipv4_sctp_association_through_the_vip() {
    association(false).unwrap();
}

#[test]
fn ipv6_sctp_association_through_the_vip() {
    association(true).unwrap();
}
