//! Builds the XDP program (`xdp-lb/ebpf`) for bpfel-unknown-none with the nightly toolchain
//! and bpf-linker, and leaves the object in OUT_DIR for `include_bytes_aligned!`.
use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root_dir = format!("{manifest_dir}/ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "portico-xdp-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the XDP program (run scripts/bootstrap.sh if bpf-linker or rust-src is missing)",
    )
}
