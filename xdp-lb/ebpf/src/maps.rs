//! The program's maps, one doc comment per map. Sizes are defaults; the loader sets the real
//! ones before load (`EbpfLoader::set_max_entries`).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use portico_xdp_common::{
    stat, Backend, Config, Counters, Flow, FlowKey, NextHop, RevNat, Service, VipKey,
    DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES,
};

/// Global per-CPU counters and verdict reasons, indexed by `portico_xdp_common::stat`.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Node configuration: SNAT addresses and port range, ring size, hash seed, timeouts.
#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// VIP listeners: (VIP, port, protocol) → service. Also holds one (VIP, 0, 0) entry per
/// VIP address, used to answer echo requests.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<VipKey, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES * 4, 0);

/// Maglev rings: service `s`, generation `g` occupies `[(2s+g)·M, (2s+g+1)·M)`; each slot is
/// a backend id (0 = empty). Userspace fills the idle half, then flips `Service::ring_gen`.
#[map(name = "RINGS")]
pub static RINGS: Array<u32> = Array::with_max_entries(DEFAULT_MAX_SERVICES * 2 * 16381, 0);

/// Backends by id (0 unused).
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`): inserts do not contend on one global list;
/// lookups still see every CPU's entries.
const BPF_F_NO_COMMON_LRU: u32 = 2;

/// Connection tracking: client → VIP 5-tuple → backend, SNAT port, state.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(65536, BPF_F_NO_COMMON_LRU);

/// Reverse NAT: backend → SNAT address:port 5-tuple → client and VIP. Also the SNAT port
/// reservation: a port is taken exactly when its entry exists (inserted with BPF_NOEXIST).
#[map(name = "REV_NAT")]
pub static REV_NAT: LruHashMap<FlowKey, RevNat> =
    LruHashMap::with_max_entries(65536, BPF_F_NO_COMMON_LRU);

/// Per-service per-CPU counters by service id.
#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Per-backend per-CPU counters by backend id.
#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Next hop toward each backend (egress interface and MACs from bpf_fib_lookup), cached for
/// a second so established flows skip the FIB.
#[map(name = "NEXT_HOPS")]
pub static NEXT_HOPS: Array<NextHop> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// Adds `n` to global counter `idx` on this CPU.
#[inline(always)]
pub fn stat_add(idx: u32, n: u64) {
    if let Some(slot) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += n };
    }
}

/// Counts a packet (and a new flow) against a service or backend.
#[inline(always)]
pub fn count(map: &PerCpuArray<Counters>, id: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(id) {
        // SAFETY: per-CPU slot.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}
