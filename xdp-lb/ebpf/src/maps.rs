//! The program's maps, one doc comment per map. Sizes are defaults; the loader sets the real
//! ones before load (`EbpfLoader::set_max_entries`).
use aya_ebpf::{
    bindings::bpf_fib_lookup,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use portico_xdp_common::{
    config_flags, ct_filter, source_filter_bit, vip_filter_bit, Addr, Backend, Config, Counters,
    Flow, FlowCacheEntry, FlowKey, FragEntry, FragKey, ReplyCacheEntry, RevNat, Service, StatBlock,
    VipKey, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_SERVICES, VIP_FILTER_WORDS,
};

/// Global counters and verdict reasons: one [`StatBlock`] per CPU, looked up once per packet.
#[map(name = "STATS")]
pub static STATS: PerCpuArray<StatBlock> = PerCpuArray::with_max_entries(1, 0);

/// Bitmap of VIP addresses (`vip_filter_bit`): traffic to any other address passes after one
/// array read, without a hash lookup.
#[map(name = "VIP_FILTER")]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// Node configuration: SNAT addresses and port range, ring size, hash seed, timeouts.
#[map(name = "CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// VIP listeners: (VIP, port, protocol) → service. Also holds one (VIP, 0, 0) entry per
/// VIP address, used to answer echo requests.
#[map(name = "SERVICES")]
pub static SERVICES: HashMap<VipKey, Service> =
    HashMap::with_max_entries(DEFAULT_MAX_SERVICES * 4, 0);

/// Maglev rings: service `s`, generation `g` occupies `[(2s+g)·M, (2s+g+1)·M)`; each slot is
/// a backend id (0 = empty). Userspace fills the idle half, then flips `Service::ring_gen`.
/// Memory-mapped by the loader (`BPF_F_MMAPABLE`), which writes a new table with one copy
/// instead of a syscall per slot.
#[map(name = "RINGS")]
pub static RINGS: Array<u32> =
    Array::with_max_entries(DEFAULT_MAX_SERVICES * 2 * 16381, BPF_F_MMAPABLE);

/// `BPF_F_MMAPABLE`: the array can be mapped into the loader's memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Backends by id (0 unused), each with its cached next hop (egress interface and MACs from
/// bpf_fib_lookup, kept a second so established flows skip the FIB).
#[map(name = "BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(DEFAULT_MAX_BACKENDS, BPF_F_MMAPABLE);

/// The four LRU tables share one LRU list each across CPUs (no `BPF_F_NO_COMMON_LRU`):
/// every CPU may use the whole table, and an insert takes a node from this CPU's local free
/// list, refilled 128 nodes at a time, where a per-CPU list rotates and scans its own list on
/// every insert (measured: a new flow's SYN about 15 % and its confirming ACK about 20 %
/// cheaper).
///
/// Connection tracking: client → VIP 5-tuple → backend, SNAT port, state.
#[map(name = "CONNTRACK")]
pub static CONNTRACK: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(65536, 0);

/// Connection tracking of unconfirmed flows (the client has sent one packet, or only SYNs)
/// whose SNAT port is not the first of their port search (the others are found again by
/// their search, in `REV_NAT_NEW`): as `CONNTRACK`. The flow's confirming packet moves its
/// entry to `CONNTRACK`, so a flood of new flows churns this table and `REV_NAT_NEW` only,
/// never the two that established flows live in.
#[map(name = "CONNTRACK_NEW")]
pub static CONNTRACK_NEW: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(65536, 0);

/// Per-CPU exact-match cache in front of `CONNTRACK`: CPU `c` owns entries
/// `[c·N, (c+1)·N)`, indexed by a hash of the 5-tuple. A plain array in page-aligned
/// (mmapable) memory rather than a per-CPU array, so each 64-byte entry is one cache line.
/// Three-way sets: a 5-tuple may sit in one entry among the block's first 2^16 or in two
/// neighbours anywhere in the block (`nat::cache_ways`). A copy serves for two
/// seconds past the `CONNTRACK` age it copies, then the flow's next packet refreshes the
/// entry (its `last_seen` and LRU position, at most once a second) and the copy; so does
/// every SYN, FIN or RST.
#[map(name = "FLOW_CACHE")]
pub static FLOW_CACHE: Array<FlowCacheEntry> = Array::with_max_entries(4096, BPF_F_MMAPABLE);

/// Per-CPU exact-match cache in front of `REV_NAT` (with the next hop to the client), one
/// entry per slot, refreshed as `FLOW_CACHE` is. Two-way sets: one entry among the block's
/// first 2^14, one anywhere in it (`nat::reply_ways`).
#[map(name = "REPLY_CACHE")]
pub static REPLY_CACHE: Array<ReplyCacheEntry> = Array::with_max_entries(4096, BPF_F_MMAPABLE);

/// Room for the keys and values the program passes to helpers (a new flow's SNAT port
/// reservation, ICMP translation, the FIB lookup's parameter block), and the ICMP too-big
/// rate limit, one per CPU: the program's stack is 512 bytes in all, for the whole chain of
/// calls.
#[map(name = "SCRATCH")]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// See [`SCRATCH`].
#[repr(C)]
pub struct Scratch {
    /// Reverse-NAT key being tried.
    pub rkey: FlowKey,
    /// The flow that holds a taken port.
    pub owner: FlowKey,
    /// The reverse-NAT entry to insert.
    pub rev: RevNat,
    /// A reverse-NAT key looked up on the side (`snat::portico_unconfirmed_flow`).
    pub look: FlowKey,
    /// A listener looked up on the side (`snat::portico_unconfirmed_flow`).
    pub vip: VipKey,
    /// Start (jiffies) of this CPU's current one-second window of ICMP too-big answers.
    pub too_big_window: u64,
    /// ICMP too-big answers sent by this CPU in that window.
    pub too_big_sent: u32,
    /// Explicit padding.
    pub _pad: u32,
    /// `bpf_fib_lookup`'s parameter block (64 bytes).
    pub fib: bpf_fib_lookup,
    /// A NAT46/64 translation asked for by a slow path, done by `nat46::translate`.
    pub xlat: crate::nat46::Xlat,
    /// A chunk of an IPv4 UDP payload being summed (`nat46::portico_udp_payload_sum`).
    pub sum_buf: [u64; 32],
    /// Where a slow path sends its packet, for the send step (`nat::send`).
    pub send: crate::nat::To,
}

/// Reverse NAT: backend → SNAT address:port 5-tuple → client and VIP. Also the SNAT port
/// reservation: a port is taken exactly when its entry exists (inserted with BPF_NOEXIST).
#[map(name = "REV_NAT")]
pub static REV_NAT: LruHashMap<FlowKey, RevNat> = LruHashMap::with_max_entries(65536, 0);

/// Reverse NAT of unconfirmed flows: same keys and values as `REV_NAT`, and like it the
/// reservation of the SNAT port. For most unconfirmed flows (port the first of their
/// search) this entry is all there is of them. Confirming a flow moves its entry to
/// `REV_NAT`.
#[map(name = "REV_NAT_NEW")]
pub static REV_NAT_NEW: LruHashMap<FlowKey, RevNat> = LruHashMap::with_max_entries(65536, 0);

/// Presence filter of `CONNTRACK` (`portico_xdp_common::ct_filter`): a control word, then
/// two copies of the bitmap. Memory-mapped by the loader, which rebuilds the idle copy.
#[map(name = "CT_FILTER")]
pub static CT_FILTER: Array<u64> = Array::with_max_entries(8 + 2 * 8192, BPF_F_MMAPABLE);

/// Presence filter of `REV_NAT`, as `CT_FILTER`: a SNAT port whose bit is clear is not held
/// by a confirmed flow.
#[map(name = "RN_FILTER")]
pub static RN_FILTER: Array<u64> = Array::with_max_entries(8 + 2 * 8192, BPF_F_MMAPABLE);

/// Whether the table behind `filter` may hold `key`: `false` only when the filter is
/// enabled and the key's bit is clear in its active copy, and the control word did not
/// change meanwhile (a rebuild may be clearing the copy this read was about).
#[inline(always)]
pub fn maybe_in(filter: &Array<u64>, key: &FlowKey) -> bool {
    let Some(c) = filter.get_ptr(ct_filter::CONTROL) else {
        return true;
    };
    // SAFETY: a valid map value pointer; the loader writes it with atomic stores.
    let control = unsafe { core::ptr::read_volatile(c) };
    if control & ct_filter::ENABLED == 0 {
        return true;
    }
    let copy = u32::from(control & ct_filter::ACTIVE_ONE != 0);
    let (word, bit) = ct_filter::position(key, ct_filter::copy_log2(control, copy));
    let Some(w) = filter.get_ptr(ct_filter::copy_start(control, copy) + word) else {
        return true;
    };
    // SAFETY: as above.
    let set = unsafe { core::ptr::read_volatile(w) } & bit != 0;
    // SAFETY: as above.
    set || unsafe { core::ptr::read_volatile(c) } != control
}

/// Sets `key`'s bit in both copies of `filter`: called after each insert into its table (a
/// rebuild that clears a copy meanwhile finds the entry in the table), and counted.
#[inline(always)]
pub fn mark(filter: &Array<u64>, key: &FlowKey) {
    if let Some(st) = Stats::get() {
        st.add(portico_xdp_common::stat::FLOW_TABLE_INSERTS, 1);
    }
    let Some(c) = filter.get_ptr(ct_filter::CONTROL) else {
        return;
    };
    // SAFETY: a valid map value pointer; the loader writes it with atomic stores.
    let control = unsafe { core::ptr::read_volatile(c) };
    if control == 0 {
        // Not sized by the loader (yet).
        return;
    }
    mark_with(filter, key, control);
    // The ORs are full barriers: the insert is visible to the loader's walk from here. A
    // rebuild that gave the idle copy a new size before them may have walked past the entry
    // already, so the bits go where that size puts them too.
    // SAFETY: as above.
    let now = unsafe { core::ptr::read_volatile(c) };
    if now != control {
        mark_with(filter, key, now);
    }
}

/// [`mark`]'s ORs, with the copies' sizes of `control`.
#[inline(always)]
fn mark_with(filter: &Array<u64>, key: &FlowKey, control: u64) {
    for copy in [0, 1] {
        let (word, bit) = ct_filter::position(key, ct_filter::copy_log2(control, copy));
        if let Some(w) = filter.get_ptr_mut(ct_filter::copy_start(control, copy) + word) {
            // SAFETY: a valid map value pointer, 8-byte aligned; other CPUs and the loader
            // set bits in the same words, hence the atomic OR (`core` offers none on this
            // target). The fetching form: a full barrier on every architecture (the plain
            // one orders nothing on arm64), which [`mark`] relies on.
            unsafe {
                core::arch::asm!(
                    "{bit} = atomic_fetch_or((u64 *)({w} + 0), {bit})",
                    w = in(reg) w,
                    bit = inout(reg) bit => _,
                    options(nostack),
                );
            }
        }
    }
}

/// Interfaces whose packets may be CHECKSUM_PARTIAL (ifindex → 1): generic XDP on a veth
/// fed by a local sender, the transport checksum field holding the pseudo-header sum
/// (`nat::csum_partial`). Written only when the loader is told (`XdpProgram::mark_generic`,
/// an opt-in: docs/xdp.md, "Checksums in generic mode"). Looked up only for packets whose
/// field equals that sum.
#[map(name = "GENERIC_IFACES")]
pub static GENERIC_IFACES: HashMap<u32, u32> = HashMap::with_max_entries(64, 0);

/// How many interfaces `GENERIC_IFACES` holds: while 0 (the default), no packet is checked
/// for a pseudo-header sum (one array read, on the fast path).
#[map(name = "GENERIC_ANY")]
pub static GENERIC_ANY: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`), for `FRAGS`: a datagram's fragments most
/// often reach the CPU its first one did.
const BPF_F_NO_COMMON_LRU: u32 = 2;

/// Fragment tracking: a first fragment's (source, destination, protocol, identification) →
/// its ports, for the fragments after it (`frag`). Entries serve for a few seconds; not
/// pinned (a restart loses the datagrams in flight at most).
#[map(name = "FRAGS")]
pub static FRAGS: LruHashMap<FragKey, FragEntry> =
    LruHashMap::with_max_entries(16384, BPF_F_NO_COMMON_LRU);

/// Per-service per-CPU counters by service id.
#[map(name = "SERVICE_STATS")]
pub static SERVICE_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Per-service per-CPU drops by service id: packets of the service dropped for want of a
/// backend, a SNAT port or a route (the global `STATS` count them by reason).
#[map(name = "SERVICE_DROPS")]
pub static SERVICE_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(DEFAULT_MAX_SERVICES, 0);

/// Per-backend per-CPU counters by backend id.
#[map(name = "BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<Counters> =
    PerCpuArray::with_max_entries(DEFAULT_MAX_BACKENDS, 0);

/// This CPU's global counters.
pub struct Stats(*mut StatBlock);

impl Stats {
    /// This CPU's block; `None` only if the map is missing its entry (never, for an array).
    #[inline(always)]
    pub fn get() -> Option<Self> {
        STATS.get_ptr_mut(0).map(Self)
    }

    /// Adds `n` to counter `idx` (a `stat` constant).
    #[inline(always)]
    pub fn add(&self, idx: u32, n: u64) {
        // SAFETY: per-CPU block; only this CPU writes it while the program runs. Indices are
        // constants below stat::COUNT, so the bounds check folds away.
        unsafe {
            if let Some(c) = (*self.0).counts.get_mut(idx as usize) {
                *c += n;
            }
        }
    }
}

/// Whether `a` may be a VIP address (its `VIP_FILTER` bit is set).
#[inline(always)]
pub fn maybe_vip(fam: u8, a: &Addr) -> bool {
    let bit = vip_filter_bit(fam, a);
    VIP_FILTER
        .get(bit >> 6)
        .is_some_and(|w| w & (1u64 << (bit & 63)) != 0)
}

/// Whether `a` may be a backend address of a service that keeps client sources: the node
/// has such a service and the address's source bit is set in `VIP_FILTER`.
#[inline(always)]
pub fn maybe_preserved_backend(cfg: &Config, fam: u8, a: &Addr) -> bool {
    if cfg.flags & config_flags::PRESERVED_SOURCES == 0 {
        return false;
    }
    let bit = source_filter_bit(fam, a);
    VIP_FILTER
        .get(bit >> 6)
        .is_some_and(|w| w & (1u64 << (bit & 63)) != 0)
}

/// Counts a packet of service `id` dropped (`SERVICE_DROPS`); id 0 (unknown) is not counted.
#[inline(always)]
pub fn count_drop(id: u32) {
    if id == 0 {
        return;
    }
    if let Some(c) = SERVICE_DROPS.get_ptr_mut(id) {
        // SAFETY: per-CPU slot; only this CPU writes it while the program runs.
        unsafe { *c += 1 };
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
