//! Allocates many consumers over three pools (IPv4 /15, IPv6 /64, dual-stack), rebuilds
//! the allocator from the resulting status as after a restart, and prints as its last line
//! `{"services":N,"alloc_ms":..,"rebuild_ms":..,"bytes_per_alloc":..}`.
//!
//! `cargo run --release -p portico-ipam --example scale -- --services 100000`
//!
//! `bytes_per_alloc` is the allocator's live heap (bytes requested from the global
//! allocator, counted by a wrapper around it) divided by the number of consumers.
//! `alloc_ms` is `allocate_all` over every consumer, the controller's reconcile.
//! `rebuild_ms` covers a fresh allocator, its pools, `restore` of every consumer's status
//! addresses, and the `allocate` pass that confirms them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Instant;

use portico_ipam::{Allocator, Consumer, Family, FamilyPolicy, Pool, Protocol};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every method forwards to `System` with the same arguments and only adds
// bookkeeping on an atomic counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

fn pools() -> Vec<Pool> {
    let pool = |name: &str, blocks: &[&str]| match Pool::from_blocks(name, blocks) {
        Ok(p) => p,
        Err(e) => panic!("built-in pool {name} is invalid: {e}"),
    };
    vec![
        pool("v4", &["198.18.0.0/15"]),
        pool("v6", &["fd00:18::/64"]),
        pool("dual", &["10.96.0.0/16", "fd00:96::/64"])
            .auto_assign(false)
            .with_priority(1),
    ]
}

fn consumers(n: usize) -> Vec<Consumer> {
    (0..n)
        .map(|i| {
            let c = Consumer::service(&format!("ns-{}", i % 50), &format!("svc-{i}"))
                .with_port(443, Protocol::Tcp);
            match i % 3 {
                0 => c,
                1 => c.with_families(&[Family::V6], FamilyPolicy::SingleStack),
                _ => c
                    .with_families(&[Family::V4, Family::V6], FamilyPolicy::RequireDualStack)
                    .in_pool("dual"),
            }
        })
        .collect()
}

fn main() -> ExitCode {
    let mut services = 100_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().map(|v| v.parse::<usize>())) {
            ("--services", Some(Ok(n))) => services = n,
            _ => {
                eprintln!("usage: scale [--services N]");
                return ExitCode::FAILURE;
            }
        }
    }
    let consumers = consumers(services);

    let all: Vec<&Consumer> = consumers.iter().collect();
    let before = live();
    let start = Instant::now();
    let mut allocator = Allocator::new();
    for p in pools() {
        allocator.apply_pool(p, 0);
    }
    // As the controller reconciles everyone: one pass, and more while anyone waits on a
    // change of the pass.
    let failed = allocator
        .allocate_all(&all)
        .iter()
        .filter(|a| a.is_err())
        .count();
    let alloc_ms = start.elapsed().as_secs_f64() * 1e3;
    let bytes = live() - before;
    let bytes_per_alloc = bytes as f64 / services.max(1) as f64;

    // What the controller would find in each consumer's status after a restart.
    let status: Vec<Vec<IpAddr>> = consumers
        .iter()
        .map(|c| {
            allocator
                .allocation(&c.id)
                .map(|a| a.ips())
                .unwrap_or_default()
        })
        .collect();

    let start = Instant::now();
    let mut rebuilt = Allocator::new();
    for p in pools() {
        rebuilt.apply_pool(p, 0);
    }
    for (c, ips) in consumers.iter().zip(&status) {
        rebuilt.restore(c, ips, 0);
    }
    let mut moved = 0usize;
    for (c, ips) in consumers.iter().zip(&status) {
        let now = rebuilt.allocate(c).map(|a| a.ips()).unwrap_or_default();
        if now != *ips {
            moved += 1;
        }
    }
    let rebuild_ms = start.elapsed().as_secs_f64() * 1e3;

    for name in ["v4", "v6", "dual"] {
        if let Some(s) = allocator.pool_status(name) {
            println!(
                "pool {name}: IPv4 used {} of {}, IPv6 used {} of {}",
                s.v4.used, s.v4.total, s.v6.used, s.v6.total
            );
        }
    }
    println!(
        "allocator heap {bytes} bytes; {failed} consumers unsatisfied; {moved} moved across the rebuild"
    );
    println!(
        "{{\"services\":{services},\"alloc_ms\":{alloc_ms:.1},\"rebuild_ms\":{rebuild_ms:.1},\"bytes_per_alloc\":{bytes_per_alloc:.1}}}"
    );
    if failed > 0 || moved > 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
