//! BIG TCP on chosen interfaces (`--big-tcp IFACE`): raises the largest GSO and GRO packet
//! the stack builds for the interface above 64 KiB, for IPv6 (`IFLA_GSO_MAX_SIZE`,
//! `IFLA_GRO_MAX_SIZE`) and IPv4 (`IFLA_GSO_IPV4_MAX_SIZE` 63, `IFLA_GRO_IPV4_MAX_SIZE` 64),
//! through rtnetlink: the iproute2 of many distributions cannot set the IPv4 pair. The
//! sizes are clamped to what the driver takes (`IFLA_TSO_MAX_SIZE`), read back and
//! reported in `portico status`. Fewer, bigger packets through the stack mean fewer
//! per-packet costs on the nodes and backends; the XDP program reads lengths from the
//! buffer, not from the IP header, so it passes them as they are.

use anyhow::{bail, Context as _, Result};
use futures::TryStreamExt as _;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};
use serde::{Deserialize, Serialize};

/// The size Portico asks for by default: 192 KiB, three times the legacy limit.
pub const DEFAULT_SIZE: u32 = 196_608;

/// The legacy limit: packets are never built bigger than this without BIG TCP.
pub const LEGACY_SIZE: u32 = 65_536;

/// The biggest GSO/GRO packet an interface builds, as the kernel reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkSizes {
    /// The interface.
    pub interface: String,
    /// IPv6 (and the legacy limit of all families before 6.3): `gso_max_size`.
    pub gso_max_size: u32,
    /// IPv6: `gro_max_size`.
    pub gro_max_size: u32,
    /// IPv4: `gso_ipv4_max_size` (0: the kernel does not know it).
    pub gso_ipv4_max_size: u32,
    /// IPv4: `gro_ipv4_max_size` (0: the kernel does not know it).
    pub gro_ipv4_max_size: u32,
    /// The most the driver takes: `tso_max_size`.
    pub tso_max_size: u32,
}

impl LinkSizes {
    fn of(interface: &str, msg: &LinkMessage) -> Self {
        let mut s = Self {
            interface: interface.to_owned(),
            ..Self::default()
        };
        for a in &msg.attributes {
            match a {
                LinkAttribute::GsoMaxSize(v) => s.gso_max_size = *v,
                LinkAttribute::GroMaxSize(v) => s.gro_max_size = *v,
                LinkAttribute::GsoIpv4MaxSize(v) => s.gso_ipv4_max_size = *v,
                LinkAttribute::GroIpv4MaxSize(v) => s.gro_ipv4_max_size = *v,
                LinkAttribute::TsoMaxSize(v) => s.tso_max_size = *v,
                _ => {}
            }
        }
        s
    }

    /// Whether every size is above the legacy 64 KiB limit.
    pub fn enabled(&self) -> bool {
        [
            self.gso_max_size,
            self.gro_max_size,
            self.gso_ipv4_max_size,
            self.gro_ipv4_max_size,
        ]
        .iter()
        .all(|v| *v > LEGACY_SIZE)
    }
}

/// Validates a `--big-tcp-size`: above 64 KiB (else it is not BIG TCP) and at most 512 KiB
/// (the kernel's `GSO_MAX_SIZE`).
///
/// # Errors
/// The size is out of that range, with the value in the message.
pub fn check_size(size: u32) -> Result<()> {
    const KERNEL_MAX: u32 = 524_280;
    if size <= LEGACY_SIZE || size > KERNEL_MAX {
        bail!(
            "--big-tcp-size {size}: must be above {LEGACY_SIZE} (the limit without BIG TCP) \
             and at most {KERNEL_MAX} (the kernel's GSO_MAX_SIZE)"
        );
    }
    Ok(())
}

async fn link(handle: &Handle, interface: &str) -> Result<LinkMessage> {
    let found = handle
        .link()
        .get()
        .match_name(interface.to_owned())
        .execute()
        .try_next()
        .await;
    match found {
        Ok(Some(link)) => Ok(link),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            bail!("--big-tcp {interface}: no such interface")
        }
        Ok(None) => bail!("--big-tcp {interface}: no such interface"),
        Err(e) => Err(e).with_context(|| format!("--big-tcp {interface}: reading the interface")),
    }
}

/// Reads the sizes of `interface`.
///
/// # Errors
/// No such interface, or rtnetlink fails.
pub async fn read(handle: &Handle, interface: &str) -> Result<LinkSizes> {
    Ok(LinkSizes::of(interface, &link(handle, interface).await?))
}

/// Sets all four sizes of `interface` to `size` (clamped to the driver's `tso_max_size`)
/// and returns what the kernel reports afterwards.
///
/// # Errors
/// No such interface, the kernel refuses a size (message with interface and value), or the
/// kernel has no IPv4 BIG TCP (before Linux 6.3).
pub async fn enable(handle: &Handle, interface: &str, size: u32) -> Result<LinkSizes> {
    check_size(size)?;
    let msg = link(handle, interface).await?;
    let before = LinkSizes::of(interface, &msg);
    let size = if before.tso_max_size > 0 {
        size.min(before.tso_max_size)
    } else {
        size
    };
    let index = msg.header.index;
    // GSO before GRO, IPv6 before IPv4: the kernel checks each IPv4 size against nothing
    // but its own limit, so the order only matters for the message a refusal names.
    for (name, attr) in [
        ("gso_max_size", LinkAttribute::GsoMaxSize(size)),
        ("gro_max_size", LinkAttribute::GroMaxSize(size)),
        ("gso_ipv4_max_size", LinkAttribute::GsoIpv4MaxSize(size)),
        ("gro_ipv4_max_size", LinkAttribute::GroIpv4MaxSize(size)),
    ] {
        let set = LinkUnspec::new_with_index(index)
            .append_extra_attribute(attr)
            .build();
        handle.link().set(set).execute().await.with_context(|| {
            format!(
                "--big-tcp {interface}: setting {name} to {size} (driver limit tso_max_size {})",
                before.tso_max_size
            )
        })?;
    }
    let after = read(handle, interface).await?;
    if after.gso_ipv4_max_size == 0 {
        bail!(
            "--big-tcp {interface}: this kernel has no IPv4 BIG TCP (gso_ipv4_max_size, \
             Linux 6.3 or later)"
        );
    }
    Ok(after)
}

/// Enables BIG TCP on every interface of `interfaces`, in order; the first failure stops.
///
/// # Errors
/// As [`enable`], or the rtnetlink connection cannot be opened.
pub async fn enable_all(interfaces: &[String], size: u32) -> Result<Vec<LinkSizes>> {
    if interfaces.is_empty() {
        return Ok(Vec::new());
    }
    let (conn, handle, _) = rtnetlink::new_connection().context("opening rtnetlink")?;
    let task = tokio::spawn(conn);
    let mut out = Vec::new();
    for iface in interfaces {
        let sizes = enable(&handle, iface, size).await?;
        tracing::info!(
            iface = %iface,
            gso = sizes.gso_max_size,
            gro = sizes.gro_max_size,
            gso_ipv4 = sizes.gso_ipv4_max_size,
            gro_ipv4 = sizes.gro_ipv4_max_size,
            "BIG TCP enabled"
        );
        out.push(sizes);
    }
    task.abort();
    Ok(out)
}
