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

/// Below this many empty slots, claims search the empty slots instead of walking
/// permutations (same result, far fewer probes in the tail).
const TAIL_SLOTS: u32 = 256;

/// `x mod m` for `x < 2m`, without a branch: when `x < m`, `x - m` wraps to a larger value.
fn wrap(x: u32, m: u32) -> u32 {
    x.min(x.wrapping_sub(m))
}

/// Inverse of `a` modulo the prime `m`, for `0 < a < m` (extended Euclid).
fn mod_inverse(a: u32, m: u32) -> u32 {
    let (mut t, mut new_t) = (0i64, 1i64);
    let (mut r, mut new_r) = (m, a);
    while new_r != 0 {
        let q = r / new_r;
        (t, new_t) = (new_t, t - i64::from(q) * new_t);
        (r, new_r) = (new_r, r - q * new_r);
    }
    if t < 0 {
        t += i64::from(m);
    }
    t as u32
}

/// Words of the [`Taken`] bitmap: 2·[`MAX_M`] bits, a power of two so that masked indices
/// need no bounds check (32 KiB at most; 16 KiB touched for M = 65537, so it stays in L1).
const TAKEN_WORDS: usize = 4096;

/// Which slots are taken, as a bitmap holding every slot twice: bits `s` and `s + M` are
/// both set when slot `s` is taken. A probe `slot + j·skip` with both terms below M is then
/// tested as is, below 2M, without reducing it modulo M first.
struct Taken(Box<[u64; TAKEN_WORDS]>);

impl Taken {
    fn new() -> Self {
        let words: Box<[u64]> = vec![0; TAKEN_WORDS].into_boxed_slice();
        Self(words.try_into().expect("TAKEN_WORDS words"))
    }

    /// Whether bit `i` (< 2M) is set.
    fn has(&self, i: u32) -> bool {
        self.0[(i >> 6) as usize & (TAKEN_WORDS - 1)] >> (i & 63) & 1 != 0
    }

    /// Marks `slot` (< M) taken, in both of its places.
    fn take(&mut self, slot: u32, m: u32) {
        for i in [slot, slot + m] {
            self.0[(i >> 6) as usize & (TAKEN_WORDS - 1)] |= 1 << (i & 63);
        }
    }

    /// The slots still empty, in increasing order (a word at a time).
    fn empties(&self, m: u32) -> Vec<u32> {
        let mut empties = Vec::new();
        for (w, &word) in self.0[..(m as usize).div_ceil(64)].iter().enumerate() {
            let mut free = !word;
            while free != 0 {
                let slot = w as u32 * 64 + free.trailing_zeros();
                if slot >= m {
                    break;
                }
                empties.push(slot);
                free &= free - 1;
            }
        }
        empties
    }
}

/// Probes a walk tests in one step.
const GROUP: usize = 8;

/// One backend's walk through its permutation `offset + j·skip mod M`, j = 0, 1, …
struct Walker {
    /// The next slot of the permutation to try; every earlier one is taken.
    next: u32,
    /// j·skip mod M for j = 1 ..= GROUP. The probes of a step are independent additions to
    /// its first slot, and only the move from one step to the next is a dependent one.
    skips: [u32; GROUP],
    /// The backend's index in the caller's slice: what its slots hold.
    index: u32,
}

impl Walker {
    fn new(offset: u32, skip: u32, index: u32, m: u32) -> Self {
        let mut skips = [skip; GROUP];
        for j in 1..GROUP {
            skips[j] = wrap(skips[j - 1] + skip, m);
        }
        Self {
            next: offset,
            skips,
            index,
        }
    }

    /// Takes the first slot of the permutation, from `next` on, that is still empty (the
    /// classic Maglev step), and moves `next` past it. Inlined into the claim loops: a
    /// call per claim costs more than most claims.
    #[inline(always)]
    fn claim(&mut self, taken: &mut Taken, slots: &mut [u32], m: u32) {
        let mut first = self.next;
        let slot = 'found: loop {
            // first < M and each skip < M: every probe is below 2M (see [`Taken`]).
            let mut probes = [first; GROUP];
            for (probe, skip) in probes[1..].iter_mut().zip(self.skips) {
                *probe += skip;
            }
            for probe in probes {
                if !taken.has(probe) {
                    break 'found wrap(probe, m);
                }
            }
            first = wrap(first + self.skips[GROUP - 1], m);
        };
        taken.take(slot, m);
        slots[slot as usize] = self.index;
        self.next = wrap(slot + self.skips[0], m);
    }
}

/// The order of claims: round after round, each round the backends whose cumulative share
/// steps up, floor((round+1)·w/w_max) > floor(round·w/w_max), in key order. A backend of
/// weight w_max claims in every round, so no round is empty.
struct Rounds {
    weights: Vec<u64>,
    w_max: u64,
    /// All weights equal (the common case): every backend claims in every round.
    uniform: bool,
    round: u64,
    /// This round's backends, when not uniform.
    claimants: Vec<u32>,
    /// Claims of this round already made.
    pos: usize,
}

impl Rounds {
    fn new(weights: Vec<u64>) -> Self {
        let w_max = weights.iter().copied().max().unwrap_or(1);
        let uniform = weights.iter().all(|&w| w == w_max);
        let mut rounds = Self {
            weights,
            w_max,
            uniform,
            round: 0,
            claimants: Vec::new(),
            pos: 0,
        };
        rounds.fill();
        rounds
    }

    fn fill(&mut self) {
        if self.uniform {
            return;
        }
        let (round, w_max) = (self.round, self.w_max);
        self.claimants.clear();
        for (k, &w) in self.weights.iter().enumerate() {
            if w == w_max || (round + 1) * w / w_max != round * w / w_max {
                self.claimants.push(k as u32);
            }
        }
    }

    /// Claims in this round: made and in all. Starts the next round when this one is over.
    fn current(&mut self) -> (usize, usize) {
        let len = |r: &Self| {
            if r.uniform {
                r.weights.len()
            } else {
                r.claimants.len()
            }
        };
        if self.pos == len(self) {
            self.round += 1;
            self.pos = 0;
            self.fill();
        }
        (self.pos, len(self))
    }

    /// The backend that makes claim `pos` of this round.
    fn backend(&self, pos: usize) -> usize {
        if self.uniform {
            pos
        } else {
            self.claimants[pos] as usize
        }
    }
}

/// A Maglev lookup table: `M` slots, each an index into the backends given to [`table`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    slots: Vec<u32>,
}

impl Table {
    const EMPTY: u32 = u32::MAX;

    /// Number of slots (M).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table has no slots (never, for a built table).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The backend index in `slot`, `None` when no backend has weight.
    pub fn get(&self, slot: usize) -> Option<u32> {
        self.slots.get(slot).copied().filter(|&i| i != Self::EMPTY)
    }

    /// Every slot in order.
    pub fn iter(&self) -> impl Iterator<Item = Option<u32>> + '_ {
        self.slots.iter().map(|&i| (i != Self::EMPTY).then_some(i))
    }
}

/// Builds the lookup table: `M` slots, each an index into `backends`, or `None` in every
/// slot when no backend has a weight (all draining or none at all).
///
/// # Errors
/// `m` is not a prime in range, or two backends share a key.
pub fn table(backends: &[MaglevBackend], m: u32) -> Result<Table, MaglevError> {
    if !(MIN_M..=MAX_M).contains(&m) || !is_prime(m) {
        return Err(MaglevError::BadTableSize(m));
    }
    let mut sorted: Vec<(u64, u32)> = backends
        .iter()
        .enumerate()
        .map(|(i, b)| (b.key, i as u32))
        .collect();
    sorted.sort_unstable();
    if let Some(pair) = sorted.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return Err(MaglevError::DuplicateKey(pair[0].0));
    }
    sorted.retain(|&(_, i)| backends[i as usize].weight > 0);
    let mut entries: Vec<u32> = vec![Table::EMPTY; m as usize];
    if sorted.is_empty() {
        return Ok(Table { slots: entries });
    }

    // Per backend, in key order: its walker, its permutation's offset, its weight. Slots are
    // u32 (M < 2^17) and advance by addition and a branch-free wrap, never by division.
    let m64 = u64::from(m);
    let mut walkers: Vec<Walker> = Vec::with_capacity(sorted.len());
    let mut offsets: Vec<u32> = Vec::with_capacity(sorted.len());
    let mut weights: Vec<u64> = Vec::with_capacity(sorted.len());
    for &(key, i) in &sorted {
        let offset = (mix64(key) % m64) as u32;
        let skip = (mix64(key ^ 0x9e37_79b9_7f4a_7c15) % (m64 - 1) + 1) as u32;
        walkers.push(Walker::new(offset, skip, i, m));
        offsets.push(offset);
        weights.push(u64::from(backends[i as usize].weight));
    }
    let mut rounds = Rounds::new(weights);
    let mut taken = Taken::new();

    // Walk the permutations until TAIL_SLOTS slots are left, a run of claims at a time.
    let walk_until = m.saturating_sub(TAIL_SLOTS);
    let mut filled = 0u32;
    while filled < walk_until {
        let (pos, len) = rounds.current();
        let run = ((walk_until - filled) as usize).min(len - pos);
        if rounds.uniform {
            for w in &mut walkers[pos..pos + run] {
                w.claim(&mut taken, &mut entries, m);
            }
        } else {
            for &k in &rounds.claimants[pos..pos + run] {
                walkers[k as usize].claim(&mut taken, &mut entries, m);
            }
        }
        rounds.pos += run;
        filled += run as u32;
    }

    // Tail: walking would take about M/remaining probes per claim. Instead each claim takes
    // the empty slot that comes first in its backend's permutation (every earlier slot is
    // taken, so that is the slot the walk would reach): the one whose position
    // j(e) = (e − offset)·skip⁻¹ mod M is smallest. No need to reduce mod M to compare: with
    // c = ⌈2^64/M⌉ and x < 2^47, (c·x mod 2^64)·M / 2^64 rounds down to x mod M (Lemire,
    // Kaser & Kurz, "Faster remainder by direct computation", 2019), so the low 64 bits of
    // c·x rank the positions in the same order. Here x = (e + M − offset)·skip⁻¹ < 2M·M <
    // 2^35, and c·x = (c·skip⁻¹)·(e + M − offset) mod 2^64: one multiplication per slot.
    let mut empties = taken.empties(m);
    let c = u64::MAX / m64 + 1;
    while !empties.is_empty() {
        let (pos, _) = rounds.current();
        let k = rounds.backend(pos);
        rounds.pos += 1;
        let scale = c.wrapping_mul(u64::from(mod_inverse(walkers[k].skips[0], m)));
        let shift = m - offsets[k];
        let (mut best, mut best_rank) = (0usize, u64::MAX);
        for (e, &slot) in empties.iter().enumerate() {
            let rank = scale.wrapping_mul(u64::from(slot + shift));
            if rank < best_rank {
                best_rank = rank;
                best = e;
            }
        }
        let slot = empties.swap_remove(best);
        entries[slot as usize] = walkers[k].index;
    }
    Ok(Table { slots: entries })
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

    fn counts(t: &Table, n: usize) -> Vec<u32> {
        let mut c = vec![0u32; n];
        for e in t.iter().flatten() {
            c[e as usize] += 1;
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
            assert!(t.iter().all(|e| e.is_some()));
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
                .zip(after.iter())
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
        assert!(table(&b, DEFAULT_M).unwrap().iter().all(|e| e.is_none()));
        assert!(table(&[], DEFAULT_M).unwrap().iter().all(|e| e.is_none()));
    }

    /// Classic Maglev population (walk each permutation until an empty slot), with the same
    /// permutations and weighted rounds: the reference the tail shortcut must match.
    fn reference(backends: &[MaglevBackend], m: u32) -> Vec<u64> {
        let mut order: Vec<&MaglevBackend> = backends.iter().filter(|b| b.weight > 0).collect();
        order.sort_by_key(|b| b.key);
        let m64 = u64::from(m);
        let mut next: Vec<u64> = order.iter().map(|b| mix64(b.key) % m64).collect();
        let skip: Vec<u64> = order
            .iter()
            .map(|b| mix64(b.key ^ 0x9e37_79b9_7f4a_7c15) % (m64 - 1) + 1)
            .collect();
        let w_max = order.iter().map(|b| u64::from(b.weight)).max().unwrap();
        let mut slots = vec![u64::MAX; m as usize];
        let mut filled = 0;
        let mut round = 0u64;
        while filled < m {
            for (k, b) in order.iter().enumerate() {
                let w = u64::from(b.weight);
                if (round + 1) * w / w_max == round * w / w_max || filled == m {
                    continue;
                }
                while slots[next[k] as usize] != u64::MAX {
                    next[k] = (next[k] + skip[k]) % m64;
                }
                slots[next[k] as usize] = b.key;
                next[k] = (next[k] + skip[k]) % m64;
                filled += 1;
            }
            round += 1;
        }
        slots
    }

    #[test]
    fn the_fast_builder_matches_classic_maglev_slot_for_slot() {
        for (n, m, weighted) in [
            (3u32, 251u32, false),
            (100, 16_381, false),
            (37, 65_537, true),
            (1000, 65_537, false),
        ] {
            let b: Vec<MaglevBackend> = backends(n)
                .into_iter()
                .enumerate()
                .map(|(i, mut x)| {
                    if weighted {
                        x.weight = 1 + (i as u32 % 4);
                    }
                    x
                })
                .collect();
            let fast: Vec<u64> = table(&b, m)
                .unwrap()
                .iter()
                .map(|e| b[e.unwrap() as usize].key)
                .collect();
            assert_eq!(fast, reference(&b, m), "n={n} m={m} weighted={weighted}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any backend set: every slot filled by a weighted backend, or all empty when none
        /// has weight; and the table matches classic Maglev slot for slot.
        #[test]
        fn any_backend_set_fills_the_table_like_classic_maglev(
            weights in proptest::collection::vec(0u32..5, 0..40),
            m in proptest::sample::select(vec![251u32, 257, 1021, 4093]),
            salt in proptest::prelude::any::<u64>(),
        ) {
            let b: Vec<MaglevBackend> = weights
                .iter()
                .enumerate()
                .map(|(i, w)| MaglevBackend { key: mix64(i as u64 ^ salt), weight: *w })
                .collect();
            let t = table(&b, m).unwrap();
            let any_weight = b.iter().any(|x| x.weight > 0);
            for e in t.iter() {
                match e {
                    Some(i) => proptest::prop_assert!(b[i as usize].weight > 0),
                    None => proptest::prop_assert!(!any_weight),
                }
            }
            if any_weight {
                let fast: Vec<u64> = t.iter().map(|e| b[e.unwrap() as usize].key).collect();
                proptest::prop_assert_eq!(fast, reference(&b, m));
            }
        }
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
