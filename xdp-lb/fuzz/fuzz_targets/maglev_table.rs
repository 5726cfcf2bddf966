//! Fuzzes the Maglev table builder with arbitrary backend sets, weights and table sizes.
//! The module is compiled in directly (it is pure and depends on thiserror only), so the
//! fuzz build does not pull in the loader and its eBPF build.
#![no_main]

#[path = "../../src/maglev.rs"]
#[allow(dead_code, reason = "only the builder is exercised here")]
mod maglev;

use libfuzzer_sys::fuzz_target;
use maglev::{table, MaglevBackend, MaglevError};

/// Table sizes tried: primes across the accepted range, plus non-primes that must be refused.
const SIZES: [u32; 8] = [251, 257, 1021, 4093, 16381, 65537, 1000, 131_071];

fuzz_target!(|data: &[u8]| {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let m = SIZES[usize::from(size) % SIZES.len()];
    // Each backend: 8 bytes of key, 1 byte of weight.
    let backends: Vec<MaglevBackend> = rest
        .chunks_exact(9)
        .take(300)
        .map(|c| MaglevBackend {
            key: u64::from_le_bytes(c[..8].try_into().unwrap_or_default()),
            weight: u32::from(c[8] % 8),
        })
        .collect();
    match table(&backends, m) {
        Ok(t) => {
            assert_eq!(t.len(), m as usize);
            let any_weight = backends.iter().any(|b| b.weight > 0);
            for e in t.iter() {
                match e {
                    Some(i) => assert!(backends[i as usize].weight > 0, "a drained backend got a slot"),
                    None => assert!(!any_weight, "an empty slot although backends have weight"),
                }
            }
        }
        Err(MaglevError::BadTableSize(s)) => assert!(s == 1000, "a prime size {s} was refused"),
        Err(MaglevError::DuplicateKey(k)) => {
            assert!(backends.iter().filter(|b| b.key == k).count() > 1, "no duplicate of {k:#x}");
        }
    }
});
