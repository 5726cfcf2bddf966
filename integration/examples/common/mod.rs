//! What the `portico standalone` benchmarks share.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use portico::standalone::Options;
use portico::status::StatusReport;
use portico_integration::NetNs;

/// Runs `portico standalone` in this process, on a thread inside `ns` (sockets, netlink and
/// XDP attach in that namespace). It runs until the process exits.
pub fn start_in_process(ns: &NetNs, opts: Options) {
    let ns = ns.clone();
    std::thread::spawn(move || {
        let _inside = ns.enter().expect("entering the node namespace");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        if let Err(e) = rt.block_on(portico::standalone::run(opts)) {
            eprintln!("portico standalone failed: {e:#}");
            std::process::exit(1);
        }
    });
}

#[allow(dead_code, reason = "not every benchmark uses every helper")]
/// Polls the admin socket until `done` holds for the report.
pub fn wait_status(
    socket: &Path,
    timeout: Duration,
    mut done: impl FnMut(&StatusReport) -> bool,
) -> Result<StatusReport> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = portico::status::query(socket) {
            if done(&r) {
                return Ok(r);
            }
        }
        if Instant::now() > deadline {
            bail!("status not as expected after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[allow(dead_code, reason = "not every benchmark uses every helper")]
/// Peak resident set size of this process, in MiB (VmHWM).
pub fn peak_rss_mb() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

#[allow(dead_code, reason = "not every benchmark uses every helper")]
/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
