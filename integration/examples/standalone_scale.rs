//! `portico standalone` at scale: N Services with 3 endpoints each, loaded from a folder,
//! announced to a real BIRD peer.
//!
//! ```text
//! cargo run --release -p portico-integration --example standalone_scale -- --services 10000
//! ```
//!
//! The folder (100 files) is written before the runtime starts (in-process, in the node's
//! namespace, with the in-memory balancer: this measures the control plane, not XDP). The
//! clock starts when the runtime is started and stops when BIRD holds all N host routes.
//! Peak RSS is this process's (the runtime plus a small harness; BIRD is another process).
//! Last line: `{"services":N,"converge_ms":..,"rss_mb":..}`. Needs root.

mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use portico::standalone::{Datapath, Options};
use portico_integration::standalone::{self as topo, NODE_IP};

const FILES: usize = 100;

fn services_arg() -> Result<usize> {
    let mut args = std::env::args().skip(1);
    let mut n = 10_000;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--services" => {
                n = args
                    .next()
                    .context("--services needs a number")?
                    .parse()
                    .context("--services: not a number")?;
            }
            other => bail!("unknown argument {other:?}; usage: --services N"),
        }
    }
    if n == 0 || n > 60_000 {
        bail!("--services must be between 1 and 60000 (the pool is a /16)");
    }
    Ok(n)
}

fn main() -> Result<()> {
    let n = services_arg()?;
    let t = topo::build(0)?;
    let dir = tempfile::tempdir()?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(
        manifests.join("00-base.yaml"),
        topo::BASE_MANIFESTS.replace("203.0.113.0/28", "198.19.0.0/16"),
    )?;
    for f in 0..FILES {
        let mut text = String::new();
        for i in (f..n).step_by(FILES) {
            let b = |k: u32| format!("10.{}.{}.{k}", i / 256, i % 256);
            let _ = write!(
                text,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: scale}}\nspec:\n  type: LoadBalancer\n  loadBalancerClass: portico.io/lb\n  ports: [{{name: http, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: scale, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n  - {{addresses: [\"{}\"]}}\n  - {{addresses: [\"{}\"]}}\n  - {{addresses: [\"{}\"]}}\n",
                b(1),
                b(2),
                b(3)
            );
        }
        std::fs::write(manifests.join(format!("svc-{f:03}.yaml")), text)?;
    }
    let socket = dir.path().join("admin.sock");
    let mut opts = Options::new(manifests, "n1".into());
    opts.state_file = Some(dir.path().join("state.json"));
    opts.admin_socket = Some(socket);
    opts.datapath = Datapath::Fake;
    opts.router_id = Some(NODE_IP.parse()?);
    let start = Instant::now();
    common::start_in_process(&t.node, opts);
    t.router.wait_route_count(n, Duration::from_secs(120))?;
    let converge = start.elapsed();
    let rss = common::peak_rss_mb()?;
    println!("{n} services announced to BIRD after {converge:?}; peak RSS {rss:.1} MiB");
    println!(
        "{}",
        serde_json::json!({
            "services": n,
            "converge_ms": converge.as_millis() as u64,
            "rss_mb": (rss * 10.0).round() / 10.0,
        })
    );
    Ok(())
}
