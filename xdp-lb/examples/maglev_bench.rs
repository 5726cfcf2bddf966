//! Maglev table build time.
//!
//! `cargo run --release -p portico-xdp --example maglev_bench -- --m 65537 --backends 1000`
//! builds the table repeatedly and prints, last, one JSON line with the median build time and
//! the ratio of the largest to the smallest backend share.

use std::time::Instant;

use portico_xdp::maglev::{self, MaglevBackend};

fn arg(args: &[String], name: &str, default: u32) -> Result<u32, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| format!("{name} needs a value"))?
            .parse()
            .map_err(|e| format!("{name}: {e}")),
    }
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let m = arg(&args, "--m", 65537)?;
    let n = arg(&args, "--backends", 1000)?;
    let runs = arg(&args, "--runs", 51)?;
    let backends: Vec<MaglevBackend> = (0..n)
        .map(|i| MaglevBackend {
            key: u64::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xdead_beef,
            weight: 1,
        })
        .collect();
    let mut times = Vec::with_capacity(runs as usize);
    let mut table = None;
    for _ in 0..runs.max(1) {
        let start = Instant::now();
        table = Some(maglev::table(&backends, m).map_err(|e| e.to_string())?);
        times.push(start.elapsed().as_secs_f64() * 1e6);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let mut counts = vec![0u32; n as usize];
    for e in table.iter().flat_map(|t| t.iter()).flatten() {
        counts[e as usize] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(0);
    let min = counts.iter().copied().min().unwrap_or(0).max(1);
    eprintln!(
        "maglev: M={m}, {n} backends, {} runs; min/median/max build {:.0}/{median:.0}/{:.0} µs",
        times.len(),
        times[0],
        times[times.len() - 1]
    );
    println!(
        "{{\"m\":{m},\"backends\":{n},\"build_us\":{median:.1},\"max_over_min\":{:.4}}}",
        f64::from(max) / f64::from(min)
    );
    Ok(())
}
