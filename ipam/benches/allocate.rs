//! Single allocate and release against an allocator already holding 10,000 consumers.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use portico_ipam::{Allocator, Consumer, Family, FamilyPolicy, Pool, Protocol};

fn filled(v6: bool) -> Allocator {
    let mut a = Allocator::new();
    let pool = Pool::from_blocks("p", &["198.18.0.0/15", "fd00:18::/64"])
        .unwrap_or_else(|e| panic!("bench pool: {e}"));
    a.apply_pool(pool, 0);
    for i in 0..10_000 {
        let _ = a.allocate(&consumer(i, v6));
    }
    a
}

fn consumer(i: usize, v6: bool) -> Consumer {
    let c = Consumer::service("bench", &format!("svc-{i}")).with_port(443, Protocol::Tcp);
    if v6 {
        c.with_families(&[Family::V6], FamilyPolicy::SingleStack)
    } else {
        c
    }
}

fn bench(c: &mut Criterion) {
    for (label, v6) in [("ipv4", false), ("ipv6", true)] {
        let mut a = filled(v6);
        let newcomer = consumer(1_000_000, v6);
        c.bench_function(&format!("allocate_then_release_{label}"), |b| {
            b.iter(|| {
                let got = a.allocate(black_box(&newcomer));
                a.release(&newcomer.id);
                black_box(got)
            })
        });
        let existing = consumer(5_000, v6);
        c.bench_function(&format!("reallocate_existing_{label}"), |b| {
            b.iter(|| black_box(a.allocate(black_box(&existing))))
        });
    }
    let mut a = filled(false);
    let shared: Vec<Consumer> = (0..2)
        .map(|i| {
            Consumer::service("bench", &format!("dns-{i}"))
                .sharing("dns")
                .with_port(53, if i == 0 { Protocol::Tcp } else { Protocol::Udp })
        })
        .collect();
    let _ = a.allocate(&shared[0]);
    c.bench_function("join_shared_address_then_leave", |b| {
        b.iter(|| {
            let got = a.allocate(black_box(&shared[1]));
            a.release(&shared[1].id);
            black_box(got)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
