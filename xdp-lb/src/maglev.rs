//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), built in userspace.
//!
//! [`table`] is a pure function: the same backends and table size give the same table on
//! every node, whatever order the backends come in, because they are sorted by their stable
//! key first. Weights are proportional: a backend of weight `w` claims `w / w_max` slots per
//! round on average (not only in the first round, as Katran's default does), so shares follow
//! weights across the whole table. Weight 0 means draining: no slots, so no new flows, while
//! connection tracking keeps existing flows on it.
//!
//! The XDP program only indexes `ring[hash % M]`.

/// Smallest table size accepted.
pub const MIN_M: u32 = 251;
/// Largest table size accepted.
pub const MAX_M: u32 = 131_071;
/// Default table size (as Cilium's default).
pub const DEFAULT_M: u32 = 16_381;

/// A backend as Maglev sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaglevBackend {
    /// Stable identity, the same on every node (e.g. a hash of address and port): it decides
    /// the backend's permutation and its place in the sort.
    pub key: u64,
    /// Relative weight; 0 drains the backend.
    pub weight: u32,
}

/// Why a table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// M must be a prime in [`MIN_M`, `MAX_M`].
    #[error("maglev table size {0} is not a prime between {MIN_M} and {MAX_M}")]
    BadTableSize(u32),
    /// Two backends share a key: their permutations would be identical.
    #[error("two backends share the stable key {0:#018x}")]
    DuplicateKey(u64),
}

/// Returns whether `n` is prime (trial division; `n` is at most [`MAX_M`]).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// 64-bit finaliser of MurmurHash3: a cheap, well-mixed permutation of `x`.
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Builds the lookup table: `M` entries, each an index into `backends`, or `None` for every
/// entry when no backend has a weight (all draining or none at all).
///
/// # Errors
/// `m` is not a prime in range, or two backends share a key.
pub fn table(backends: &[MaglevBackend], m: u32) -> Result<Vec<Option<u32>>, MaglevError> {
    if !(MIN_M..=MAX_M).contains(&m) || !is_prime(m) {
        return Err(MaglevError::BadTableSize(m));
    }
    let mut order: Vec<u32> = (0..backends.len() as u32).collect();
    order.sort_unstable_by_key(|&i| backends[i as usize].key);
    for pair in order.windows(2) {
        if backends[pair[0] as usize].key == backends[pair[1] as usize].key {
            return Err(MaglevError::DuplicateKey(backends[pair[0] as usize].key));
        }
    }
    order.retain(|&i| backends[i as usize].weight > 0);
    let mut entries: Vec<u32> = vec![u32::MAX; m as usize];
    if order.is_empty() {
        return Ok(vec![None; m as usize]);
    }

    let m64 = u64::from(m);
    // Per backend: next slot of its permutation, its skip, its weight.
    let mut next: Vec<u64> = Vec::with_capacity(order.len());
    let mut skip: Vec<u64> = Vec::with_capacity(order.len());
    let mut weight: Vec<u64> = Vec::with_capacity(order.len());
    for &i in &order {
        let b = backends[i as usize];
        next.push(mix64(b.key) % m64);
        skip.push(mix64(b.key ^ 0x9e37_79b9_7f4a_7c15) % (m64 - 1) + 1);
        weight.push(u64::from(b.weight));
    }
    let w_max = weight.iter().copied().max().unwrap_or(1);

    let mut filled = 0u32;
    let mut round: u64 = 0;
    'fill: loop {
        for (k, &idx) in order.iter().enumerate() {
            // Backend k claims a slot this round when its cumulative share steps up:
            // floor((round+1)·w/w_max) > floor(round·w/w_max).
            let w = weight[k];
            if w != w_max && (round + 1) * w / w_max == round * w / w_max {
                continue;
            }
            let mut slot = next[k];
            while entries[slot as usize] != u32::MAX {
                slot += skip[k];
                if slot >= m64 {
                    slot -= m64;
                }
            }
            entries[slot as usize] = idx;
            slot += skip[k];
            if slot >= m64 {
                slot -= m64;
            }
            next[k] = slot;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
        round += 1;
    }
    Ok(entries.into_iter().map(Some).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(n: u32) -> Vec<MaglevBackend> {
        (0..n)
            .map(|i| MaglevBackend {
                key: 0x1000 + u64::from(i) * 7919,
                weight: 1,
            })
            .collect()
    }

    fn counts(t: &[Option<u32>], n: usize) -> Vec<u32> {
        let mut c = vec![0u32; n];
        for e in t.iter().flatten() {
            c[*e as usize] += 1;
        }
        c
    }

    #[test]
    fn table_size_must_be_a_prime_in_range() {
        assert_eq!(
            table(&backends(3), 250),
            Err(MaglevError::BadTableSize(250))
        );
        assert_eq!(
            table(&backends(3), 65536),
            Err(MaglevError::BadTableSize(65536))
        );
        assert_eq!(
            table(&backends(3), 131_101),
            Err(MaglevError::BadTableSize(131_101))
        );
        assert!(table(&backends(3), 251).is_ok());
        assert!(table(&backends(3), 131_071).is_ok());
    }

    #[test]
    fn every_slot_is_filled_and_shares_are_within_one_percent() {
        for n in [1u32, 3, 10, 100] {
            let m = 65537;
            let t = table(&backends(n), m).unwrap();
            assert!(t.iter().all(Option::is_some));
            let c = counts(&t, n as usize);
            let (min, max) = (*c.iter().min().unwrap(), *c.iter().max().unwrap());
            assert!(
                f64::from(max - min) / f64::from(m / n) <= 0.01,
                "n={n}: min {min} max {max}"
            );
        }
    }

    #[test]
    fn the_table_does_not_depend_on_input_order() {
        let b = backends(17);
        let mut reversed = b.clone();
        reversed.reverse();
        let t1 = table(&b, DEFAULT_M).unwrap();
        let t2 = table(&reversed, DEFAULT_M).unwrap();
        let keys1: Vec<u64> = t1.iter().map(|e| b[e.unwrap() as usize].key).collect();
        let keys2: Vec<u64> = t2
            .iter()
            .map(|e| reversed[e.unwrap() as usize].key)
            .collect();
        assert_eq!(keys1, keys2);
    }

    #[test]
    fn removing_one_of_n_backends_moves_at_most_one_nth_plus_two_percent() {
        for n in [3u32, 10, 50] {
            let m = DEFAULT_M;
            let all = backends(n);
            let before = table(&all, m).unwrap();
            let kept: Vec<MaglevBackend> = all[1..].to_vec();
            let after = table(&kept, m).unwrap();
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| {
                    let bk = all[b.unwrap() as usize].key;
                    let ak = kept[a.unwrap() as usize].key;
                    bk != all[0].key && bk != ak
                })
                .count();
            // Slots of the removed backend must move; count only the others' moves on top.
            let removed_share = before.iter().filter(|e| e.unwrap() == 0).count();
            let total_moved = (moved + removed_share) as f64 / f64::from(m);
            assert!(
                total_moved <= 1.0 / f64::from(n) + 0.02,
                "n={n}: {total_moved:.4} of flows moved"
            );
        }
    }

    #[test]
    fn shares_follow_weights() {
        let b = vec![
            MaglevBackend { key: 1, weight: 1 },
            MaglevBackend { key: 2, weight: 2 },
            MaglevBackend { key: 3, weight: 5 },
        ];
        let m = 65537;
        let c = counts(&table(&b, m).unwrap(), 3);
        let expected = [1.0 / 8.0, 2.0 / 8.0, 5.0 / 8.0];
        for (i, e) in expected.iter().enumerate() {
            let share = f64::from(c[i]) / f64::from(m);
            assert!(
                (share - e).abs() < 0.01,
                "backend {i}: share {share:.4}, expected {e:.4}"
            );
        }
    }

    #[test]
    fn weight_zero_drains_and_all_zero_gives_an_empty_table() {
        let mut b = backends(4);
        b[2].weight = 0;
        let t = table(&b, DEFAULT_M).unwrap();
        assert!(t.iter().all(|e| e.is_some() && e.unwrap() != 2));
        for x in &mut b {
            x.weight = 0;
        }
        assert!(table(&b, DEFAULT_M).unwrap().iter().all(Option::is_none));
        assert!(table(&[], DEFAULT_M).unwrap().iter().all(Option::is_none));
    }

    #[test]
    fn duplicate_keys_are_refused() {
        let b = vec![
            MaglevBackend { key: 9, weight: 1 },
            MaglevBackend { key: 9, weight: 1 },
        ];
        assert_eq!(table(&b, DEFAULT_M), Err(MaglevError::DuplicateKey(9)));
    }
}
