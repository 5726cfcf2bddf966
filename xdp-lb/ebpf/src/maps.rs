//! The program's maps, one doc comment per map.
use aya_ebpf::{macros::map, maps::PerCpuArray};
use portico_xdp_common::stat;

/// Global per-CPU counters, indexed by `portico_xdp_common::stat`.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Adds `n` to counter `idx` on this CPU.
#[inline(always)]
pub fn stat_add(idx: u32, n: u64) {
    if let Some(slot) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += n };
    }
}
