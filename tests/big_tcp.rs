//! `--big-tcp`: GSO/GRO sizes above 64 KiB for IPv4 and IPv6 set through rtnetlink on a veth
//! in a namespace of the test's own, and read back independently with iproute2's JSON.
//! Needs root (fails with a message without it).

use anyhow::{Context as _, Result};
use portico::bigtcp::{self, LinkSizes, DEFAULT_SIZE};
use portico_integration::{traffic, TestNet};

fn ip_link_json(ns: &portico_integration::NetNs, iface: &str) -> Result<serde_json::Value> {
    let out = ns.run(&["ip", "-d", "-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    Ok(v[0].clone())
}

fn enable_in(
    ns: &portico_integration::NetNs,
    ifaces: &[&str],
    size: u32,
) -> Result<Vec<LinkSizes>> {
    let ifaces: Vec<String> = ifaces.iter().map(|s| (*s).to_owned()).collect();
    traffic::in_ns(ns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(bigtcp::enable_all(&ifaces, size))
    })
}

#[test]
fn big_tcp_sizes_are_set_for_both_families_and_read_back() -> Result<()> {
    portico_integration::require_root("setting GSO/GRO sizes with rtnetlink")?;
    let mut net = TestNet::new()?;
    let a = net.add_ns("a")?;
    let b = net.add_ns("b")?;
    net.veth(&a, "eth0", &b, "eth0")?;
    let before = ip_link_json(&a, "eth0")?;
    assert_eq!(before["gso_max_size"], 65536, "{before}");

    let got = enable_in(&a, &["eth0"], DEFAULT_SIZE)?;
    assert_eq!(got.len(), 1);
    let s = &got[0];
    assert!(s.enabled(), "{s:?}");
    assert_eq!(
        (
            s.gso_max_size,
            s.gro_max_size,
            s.gso_ipv4_max_size,
            s.gro_ipv4_max_size
        ),
        (DEFAULT_SIZE, DEFAULT_SIZE, DEFAULT_SIZE, DEFAULT_SIZE),
        "{s:?}"
    );
    // iproute2 reads what rtnetlink wrote: the IPv6 pair (the installed iproute2 neither
    // shows nor sets the IPv4 pair, which `s` above read back from the kernel).
    let after = ip_link_json(&a, "eth0")?;
    for field in ["gso_max_size", "gro_max_size"] {
        assert_eq!(after[field], DEFAULT_SIZE, "{field}: {after}");
    }
    // The peer is untouched.
    assert_eq!(ip_link_json(&b, "eth0")?["gso_max_size"], 65536);
    Ok(())
}

#[test]
fn bad_sizes_and_missing_interfaces_are_named_in_the_error() -> Result<()> {
    portico_integration::require_root("setting GSO/GRO sizes with rtnetlink")?;
    for size in [65_536, 1_000_000] {
        let err = bigtcp::check_size(size).unwrap_err().to_string();
        assert!(err.contains(&format!("--big-tcp-size {size}")), "{err}");
    }
    let mut net = TestNet::new()?;
    let a = net.add_ns("a")?;
    let err = enable_in(&a, &["nosuch0"], DEFAULT_SIZE).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("--big-tcp nosuch0") && err.contains("no such interface"),
        "{err}"
    );
    Ok(())
}
