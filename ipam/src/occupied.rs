//! Occupied addresses of one family as merged runs, so that finding a free address costs
//! O(log runs) and a /64 costs memory only for what is in use.

use std::collections::BTreeMap;

/// Runs of occupied addresses, `start -> last` (inclusive), never touching each other.
///
/// A run may swallow addresses that no pool hands out (those the `skip` predicate names,
/// such as `x.x.x.255` and `x.x.x.0`), so that skipped addresses do not split runs.
#[derive(Debug, Clone, Default)]
pub(crate) struct Occupied {
    runs: BTreeMap<u128, u128>,
}

impl Occupied {
    /// The run containing `value`, if any.
    fn run_of(&self, value: u128) -> Option<(u128, u128)> {
        self.runs
            .range(..=value)
            .next_back()
            .filter(|(_, last)| **last >= value)
            .map(|(s, l)| (*s, *l))
    }

    /// Marks `value` occupied. `skip` names addresses that are never handed out; a gap of
    /// at most two such addresses between runs is bridged.
    pub fn insert(&mut self, value: u128, skip: impl Fn(u128) -> bool) {
        if self.run_of(value).is_some() {
            return;
        }
        let bridged = |from: u128, to: u128| -> bool {
            // Whether every address strictly between `from` and `to` is skipped.
            to > from && to - from <= 3 && (from + 1..to).all(&skip)
        };
        let mut start = value;
        let mut last = value;
        if let Some((s, l)) = self.runs.range(..value).next_back().map(|(s, l)| (*s, *l)) {
            if bridged(l, value) {
                self.runs.remove(&s);
                start = s;
            }
        }
        if value < u128::MAX {
            if let Some((s, l)) = self.runs.range(value + 1..).next().map(|(s, l)| (*s, *l)) {
                if bridged(value, s) {
                    self.runs.remove(&s);
                    last = l;
                }
            }
        }
        self.runs.insert(start, last);
    }

    /// Marks `value` free.
    pub fn remove(&mut self, value: u128) {
        let Some((start, last)) = self.run_of(value) else {
            return;
        };
        self.runs.remove(&start);
        if start < value {
            self.runs.insert(start, value - 1);
        }
        if value < last {
            self.runs.insert(value + 1, last);
        }
    }

    /// The lowest address in `first..=last` that is neither occupied nor skipped.
    pub fn first_free(&self, first: u128, last: u128, skip: impl Fn(u128) -> bool) -> Option<u128> {
        let mut candidate = first;
        loop {
            if candidate > last {
                return None;
            }
            if let Some((_, run_last)) = self.run_of(candidate) {
                candidate = run_last.checked_add(1)?;
            } else if skip(candidate) {
                candidate = candidate.checked_add(1)?;
            } else {
                return Some(candidate);
            }
        }
    }

    /// How many runs there are (a measure of fragmentation).
    #[cfg(test)]
    pub fn runs(&self) -> usize {
        self.runs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn never(_: u128) -> bool {
        false
    }

    #[test]
    fn sequential_inserts_merge_into_one_run() {
        let mut o = Occupied::default();
        for v in 10..1000 {
            o.insert(v, never);
        }
        assert_eq!(o.runs(), 1);
        assert_eq!(o.first_free(10, 2000, never), Some(1000));
    }

    #[test]
    fn removing_from_the_middle_splits_a_run_and_frees_that_address() {
        let mut o = Occupied::default();
        for v in 0..10 {
            o.insert(v, never);
        }
        o.remove(4);
        assert_eq!(o.runs(), 2);
        assert_eq!(o.first_free(0, 9, never), Some(4));
        o.insert(4, never);
        assert_eq!(o.runs(), 1);
        assert_eq!(o.first_free(0, 9, never), None);
    }

    #[test]
    fn skipped_addresses_do_not_split_runs() {
        let skip = |v: u128| v.is_multiple_of(256) || v % 256 == 255;
        let mut o = Occupied::default();
        let mut v = 1;
        for _ in 0..2000 {
            v = o.first_free(1, 1 << 20, skip).unwrap();
            o.insert(v, skip);
        }
        assert!(!skip(v));
        assert_eq!(o.runs(), 1);
    }

    #[test]
    fn the_last_ipv6_address_can_be_used() {
        let mut o = Occupied::default();
        assert_eq!(o.first_free(u128::MAX, u128::MAX, never), Some(u128::MAX));
        o.insert(u128::MAX, never);
        assert_eq!(
            o.first_free(u128::MAX - 1, u128::MAX, never),
            Some(u128::MAX - 1)
        );
        o.insert(u128::MAX - 1, never);
        assert_eq!(o.first_free(u128::MAX - 1, u128::MAX, never), None);
    }
}
