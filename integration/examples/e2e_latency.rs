//! Manifest written → first TCP connection through the VIP, end to end:
//!
//! ```text
//! cargo run --release -p portico-integration --example e2e_latency
//! ```
//!
//! On the standalone topology (BIRD router with kernel routes, a node running
//! `portico standalone` in-process with XDP on its uplink, backends, a client behind the
//! router), each of 10 rounds writes a new Service and its EndpointSlice into the watched
//! folder; the clock stops at the first TCP connection from the client, through the router,
//! to the new VIP that a backend answers. The path covers inotify and debounce, IPAM, the
//! state file, planning, the BGP UPDATE, BIRD's kernel export and the XDP service. Last
//! line: `{"create_to_traffic_ms":<median>,"rounds":[..]}`. Needs root.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use portico::standalone::{Datapath, Options};
use portico_integration::standalone::{self as topo, NODE_IP};
use portico_integration::traffic;
use portico_xdp::{AttachMode, LoadOptions};

const ROUNDS: usize = 10;

fn main() -> Result<()> {
    let t = topo::build(2)?;
    let _servers = t.start_backends()?;
    let dir = tempfile::tempdir()?;
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::write(manifests.join("00-base.yaml"), topo::BASE_MANIFESTS)?;
    let socket = dir.path().join("admin.sock");
    let mut opts = Options::new(manifests.clone(), "n1".into());
    opts.state_file = Some(dir.path().join("state.json"));
    opts.admin_socket = Some(socket.clone());
    opts.datapath = Datapath::Xdp {
        interfaces: vec!["eth0".into()],
        mode: AttachMode::Generic,
        pin_dir: None,
        tables: LoadOptions::default(),
    };
    opts.router_id = Some(NODE_IP.parse()?);
    opts.hold_link = Some("portico0".into());
    common::start_in_process(&t.node, opts);
    common::wait_status(&socket, Duration::from_secs(30), |r| {
        r.peers.iter().any(|p| p.state == "Established")
    })?;

    let backends = [topo::backend_ip(1), topo::backend_ip(2)];
    let mut rounds = Vec::new();
    for i in 0..ROUNDS {
        let name = format!("svc{i}");
        let tmp = dir.path().join(format!(".{name}.yaml"));
        std::fs::write(&tmp, topo::service_manifest(&name, &backends))?;
        let start = Instant::now();
        std::fs::rename(&tmp, manifests.join(format!("{name}.yaml")))?;
        let report = common::wait_status(&socket, Duration::from_secs(30), |r| {
            r.services
                .iter()
                .any(|s| s.name == name && !s.addresses.is_empty())
        })?;
        let vip = report
            .services
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.addresses[0])
            .expect("checked above");
        let addr = SocketAddr::new(vip, 80);
        let answered = traffic::in_ns(&t.client, move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Ok(s) =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                {
                    drop(s);
                    if traffic::tcp_once(addr).is_ok() {
                        return Ok(());
                    }
                }
                if Instant::now() > deadline {
                    bail!("no TCP answer from {addr} within 30 s");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        answered?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        println!("round {i}: {name} → {vip}: first TCP answer after {ms:.1} ms");
        rounds.push(ms);
    }
    let mut sorted = rounds.clone();
    let median = common::median(&mut sorted);
    println!(
        "{}",
        serde_json::json!({
            "create_to_traffic_ms": (median * 10.0).round() / 10.0,
            "rounds": rounds.iter().map(|r| (r * 10.0).round() / 10.0).collect::<Vec<_>>(),
        })
    );
    Ok(())
}
