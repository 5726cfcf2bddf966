//! The `portico` binary.

use anyhow::{Context, Result};
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
        /// TCP connections (and as many UDP exchanges) to send through the VIP.
        #[arg(long, default_value_t = 300)]
        connections: usize,
        /// Use IPv6 (ULA) addressing instead of IPv4.
        #[arg(long)]
        ipv6: bool,
    },
    /// Print Portico's CustomResourceDefinitions as YAML, generated from the Rust types,
    /// or write one file per CRD into a directory (the checked-in copies live in
    /// `deploy/crds/`).
    Crds {
        /// Write `<dir>/<plural>.<group>.yaml` files instead of printing.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<std::path::PathBuf>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Lab { connections, ipv6 } => {
            let report = portico_integration::lab::run(connections, ipv6)?;
            println!(
                "lab: client → VIP through Portico's XDP balancer: TCP per backend {:?}, UDP per backend {:?}; XDP counted {} new TCP flows, {} packets",
                report.tcp, report.udp, report.xdp_tcp_new_flows, report.xdp_tcp_packets
            );
            println!("{}", report.to_json());
        }
        Command::Crds { out_dir } => {
            let files = portico_crds::crd_files()?;
            match out_dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    for (name, yaml) in files {
                        let path = dir.join(name);
                        std::fs::write(&path, yaml)
                            .with_context(|| format!("writing {}", path.display()))?;
                        println!("wrote {}", path.display());
                    }
                }
                None => {
                    for (i, (_, yaml)) in files.iter().enumerate() {
                        if i > 0 {
                            println!("---");
                        }
                        print!("{yaml}");
                    }
                }
            }
        }
    }
    Ok(())
}
