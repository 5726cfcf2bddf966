//! An upgrade whose datapath tables changed: the pin folder holds maps this build cannot
//! adopt (here: a conntrack table of another size, as a change of a value's size would
//! give). `open_datapath` replaces them with empty maps and keeps the pinned link, so the
//! interface never goes without XDP, instead of refusing to start (a crash loop in a
//! DaemonSet). Needs root and bpffs (fails with a message without them).

use anyhow::{ensure, Context as _, Result};
use portico::standalone::{open_datapath, Datapath};
use portico_integration::TestNet;
use portico_xdp::{AttachMode, LoadOptions, XdpError, XdpProgram};

/// The id of the XDP program attached to `iface` in `ns`, from iproute2's JSON.
fn xdp_prog_id(ns: &portico_integration::NetNs, iface: &str) -> Result<Option<u64>> {
    let out = ns.run(&["ip", "-j", "-d", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j link")?;
    Ok(v[0]["xdp"]["prog"]["id"].as_u64())
}

#[test]
fn pins_of_another_layout_are_replaced_and_xdp_stays_attached() -> Result<()> {
    portico_integration::require_root("loading XDP with pinned maps")?;
    let mut net = TestNet::new()?;
    let a = net.add_ns("a")?;
    let b = net.add_ns("b")?;
    net.veth(&a, "eth0", &b, "eth0")?;
    let dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/portico-pins-upgrade-test-{}",
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let _in_a = a.enter()?;
        // The "old build": other table sizes, attached and pinned, then gone.
        let old = LoadOptions {
            conntrack_entries: 8192,
            ..LoadOptions::default()
        };
        let mut program = XdpProgram::load_pinned(old, &dir)?;
        program.attach("eth0", AttachMode::Generic)?;
        drop(program);
        let before = xdp_prog_id(&a, "eth0")?.context("the old program is attached")?;

        // This build cannot adopt those maps as they are.
        match XdpProgram::load_pinned(LoadOptions::default(), &dir) {
            Err(XdpError::PinnedMapMismatch { map, field, .. }) => {
                ensure!(field == "max_entries", "{map}: {field}");
            }
            Err(e) => anyhow::bail!("expected a pinned map mismatch, got {e}"),
            Ok(_) => anyhow::bail!("maps of another size were adopted"),
        }
        // Still attached: refusing changed nothing.
        ensure!(xdp_prog_id(&a, "eth0")? == Some(before));

        let (balancer, xdp, adopted) = open_datapath(&Datapath::Xdp {
            interfaces: vec!["eth0".into()],
            mode: AttachMode::Generic,
            pin_dir: Some(dir.clone()),
            tables: LoadOptions::default(),
        })?;
        ensure!(xdp, "an XDP datapath");
        ensure!(adopted.is_empty(), "nothing adopted from the old maps");
        drop(balancer);
        let after = xdp_prog_id(&a, "eth0")?.context("XDP attached after the restart")?;
        ensure!(
            after != before,
            "the new program replaced the old one in the link"
        );

        // The folder now holds this build's maps: the next start adopts them as they are.
        let again = XdpProgram::load_pinned(LoadOptions::default(), &dir)?;
        ensure!(
            again.reused_pins(),
            "the replaced maps are adopted on the next start"
        );
        again.detach_and_unpin()?;
        ensure!(xdp_prog_id(&a, "eth0")?.is_none(), "detached at the end");
        Ok(())
    })();
    if dir.exists() {
        let _ = XdpProgram::unpin(&dir);
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}
