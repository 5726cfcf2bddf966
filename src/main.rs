//! The `portico` binary.

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Portico: LoadBalancer addresses, BGP announcements and an XDP Maglev fast path for
/// bare-metal Kubernetes.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a throwaway topology in network namespaces, run traffic through the XDP
    /// program, print what it measured (last line JSON), and tear it down.
    Lab {
        /// Echo requests to send through the node.
        #[arg(long, default_value_t = 20)]
        pings: u32,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Lab { pings } => {
            let report = portico_integration::lab::run(pings)?;
            println!(
                "lab: client pinged the node {} times; XDP saw {} packets ({} bytes)",
                report.pings_sent, report.xdp_packets, report.xdp_bytes
            );
            println!("{}", report.to_json());
        }
    }
    Ok(())
}
