//! `portico lab`: builds a small topology in network namespaces and runs real traffic
//! through Portico's XDP program. Today: a client and one node joined by veth, the program
//! attached natively on the node; later issues add the router, BGP and backends.

use anyhow::{Context as _, Result};
use portico_xdp::{AttachMode, XdpProgram};

use crate::TestNet;

/// What one lab run measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabReport {
    /// Echo requests the client sent.
    pub pings_sent: u32,
    /// Packets the XDP program saw on the node.
    pub xdp_packets: u64,
    /// Bytes the XDP program saw on the node.
    pub xdp_bytes: u64,
}

impl LabReport {
    /// One-line JSON rendering.
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "pings_sent": self.pings_sent,
            "xdp_packets": self.xdp_packets,
            "xdp_bytes": self.xdp_bytes,
        })
        .to_string()
    }
}

/// Builds the lab, sends `pings` echo requests through it, tears it down, reports.
///
/// # Errors
/// Not root, a namespace or link cannot be made, the program does not load, or pings fail.
pub fn run(pings: u32) -> Result<LabReport> {
    let mut net = TestNet::new()?;
    let client = net.add_ns("client")?;
    let node = net.add_ns("node")?;
    net.veth(&client, "eth0", &node, "eth0")?;
    client.run(&["ip", "addr", "add", "198.18.0.1/24", "dev", "eth0"])?;
    node.run(&["ip", "addr", "add", "198.18.0.2/24", "dev", "eth0"])?;

    let mut prog = XdpProgram::load().context("loading the XDP program")?;
    {
        let _in_node = node.enter()?;
        prog.attach("eth0", AttachMode::Native)
            .context("attaching XDP on the node")?;
    }
    let count = pings.to_string();
    client.run(&["ping", "-c", &count, "-i", "0.05", "-W", "2", "198.18.0.2"])?;
    let stats = prog.stats()?;
    Ok(LabReport {
        pings_sent: pings,
        xdp_packets: stats.packets,
        xdp_bytes: stats.bytes,
    })
}
