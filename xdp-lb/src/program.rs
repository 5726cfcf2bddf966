//! Loading, attaching and test-running the XDP program, and raw access to its maps; with
//! [`XdpProgram::load_pinned`], maps and links pinned in bpffs that outlive the process.

use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use aya::{
    maps::{MapData, MapError, PerCpuArray},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
        ProgramError, TestRun, TestRunOptions, Xdp, XdpMode,
    },
    sys::SyscallError,
    util::KernelVersion,
    Ebpf, EbpfError, EbpfLoader,
};
use portico_xdp_common::{
    ct_filter, map_name, stat, Counters, FlowKey, StatBlock, DEFAULT_MAX_BACKENDS,
    DEFAULT_MAX_SERVICES, FLOOR_PROGRAM_NAME, JIFFIES_PROGRAM_NAME, PROGRAM_NAME,
};

use crate::{maglev, pin};

/// The XDP object file, built by `build.rs` through aya-build.
static PROGRAM_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portico-xdp"));

/// Errors of the XDP loader.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The object could not be loaded (verifier rejection, missing privileges, no BTF...).
    #[error("loading the XDP object: {0}")]
    Load(#[from] EbpfError),
    /// The program could not be loaded, attached or test-run.
    #[error("XDP program {PROGRAM_NAME}: {0}")]
    Program(#[from] ProgramError),
    /// A map is missing from the object, has the wrong type, or an operation on it failed.
    #[error("map {name}: {source}")]
    Map {
        /// Map name in the object.
        name: &'static str,
        /// What went wrong.
        source: MapError,
    },
    /// An OS query failed.
    #[error("{what}: {source}")]
    Os {
        /// What was asked.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// No interface of that name.
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
    /// Load options out of range.
    #[error("load option {field} = {value}: {why}")]
    BadOption {
        /// Which option.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// A map pinned by an earlier load does not fit this one (other load options, or a build
    /// whose map definitions differ). Nothing was changed.
    #[error(
        "pinned map {map} in {}: {field} is {pinned}, this load needs {wanted} (set by \
         {cause}); load with the options it was pinned with, or start fresh with \
         XdpProgram::unpin_maps (tracked connections are lost)",
        .dir.display()
    )]
    PinnedMapMismatch {
        /// The map's name.
        map: &'static str,
        /// The pin directory.
        dir: PathBuf,
        /// What differs: map type, key size, value size, max_entries or flags.
        field: &'static str,
        /// The pinned map's value.
        pinned: u64,
        /// What this load needs.
        wanted: u64,
        /// Where the wanted value comes from.
        cause: &'static str,
    },
    /// Another live process (or another load in this one) holds the pin directory: two
    /// balancers writing the same maps would undo each other's services and rings.
    #[error(
        "pin directory {} is in use by another process (a second `portico` for the same \
         node?); stop it first, or give this one its own --bpf-pin-dir",
        .dir.display()
    )]
    PinDirBusy {
        /// The pin directory.
        dir: PathBuf,
    },
    /// The pins were written by a build with another map layout (or by something else).
    #[error(
        "pins in {} have map layout version {pinned} (0: unknown), this build uses {wanted}; \
         start fresh with XdpProgram::unpin_maps (tracked connections are lost)",
        .dir.display()
    )]
    PinnedLayout {
        /// The pin directory.
        dir: PathBuf,
        /// The pinned layout version (0 when absent).
        pinned: u32,
        /// This build's [`portico_xdp_common::PINNED_LAYOUT_VERSION`].
        wanted: u32,
    },
    /// A bpffs operation failed (is the directory on bpffs, `/sys/fs/bpf`?).
    #[error("{what} {}: {source}", .path.display())]
    Pin {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A pinned attachment needs a BPF link (XDP links: Linux 5.9).
    #[error("interface {0:?}: pinning the XDP attachment needs BPF links (Linux 5.9 or later)")]
    NoBpfLink(String),
}

/// Map sizes, fixed at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    /// Service slots (ids 1..max_services-1).
    pub max_services: u32,
    /// Backend slots over all services (ids 1..max_backends-1).
    pub max_backends: u32,
    /// Maglev table size M, a prime in [251, 131071].
    pub ring_size: u32,
    /// Connection-tracking entries (LRU); the reverse-NAT map, and the two maps of
    /// unconfirmed flows (docs/xdp.md, "Floods"), have as many each.
    pub conntrack_entries: u32,
    /// Entries of each per-CPU cache, in front of conntrack (64 bytes each) and of reverse
    /// NAT (128 bytes each), per possible CPU; a power of two.
    pub flow_cache_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_services: DEFAULT_MAX_SERVICES,
            max_backends: DEFAULT_MAX_BACKENDS,
            ring_size: maglev::DEFAULT_M,
            conntrack_entries: 65536,
            flow_cache_entries: 4096,
        }
    }
}

impl LoadOptions {
    /// Checks every option's range (what loading checks first).
    ///
    /// # Errors
    /// [`XdpError::BadOption`] naming the first option out of range.
    pub fn validate(&self) -> Result<(), XdpError> {
        let bad = |field, value: u32, why| XdpError::BadOption {
            field,
            value: value.into(),
            why,
        };
        if !(maglev::MIN_M..=maglev::MAX_M).contains(&self.ring_size)
            || !maglev::is_prime(self.ring_size)
        {
            return Err(bad(
                "ring_size",
                self.ring_size,
                "must be a prime between 251 and 131071",
            ));
        }
        if !(2..=65535).contains(&self.max_services) {
            return Err(bad(
                "max_services",
                self.max_services,
                "must be between 2 and 65535",
            ));
        }
        if !(2..=1 << 20).contains(&self.max_backends) {
            return Err(bad(
                "max_backends",
                self.max_backends,
                "must be between 2 and 1048576",
            ));
        }
        if u64::from(self.max_services) * 2 * u64::from(self.ring_size) > u64::from(u32::MAX) {
            return Err(bad(
                "max_services",
                self.max_services,
                "times 2·ring_size exceeds the array limit",
            ));
        }
        if !self.flow_cache_entries.is_power_of_two() || self.flow_cache_entries > 1 << 20 {
            return Err(bad(
                "flow_cache_entries",
                self.flow_cache_entries,
                "must be a power of two up to 1048576",
            ));
        }
        if !(64..=1 << 26).contains(&self.conntrack_entries) {
            return Err(bad(
                "conntrack_entries",
                self.conntrack_entries,
                "must be between 64 and 67108864",
            ));
        }
        Ok(())
    }
}

/// How to attach to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// Driver mode (`XDP_FLAGS_DRV_MODE`): the driver runs the program before building an skb.
    Native,
    /// Generic mode (`XDP_FLAGS_SKB_MODE`): after the skb is built; works on every device.
    Generic,
}

impl AttachMode {
    pub(crate) fn xdp_mode(self) -> XdpMode {
        match self {
            AttachMode::Native => XdpMode::Driver,
            AttachMode::Generic => XdpMode::Skb,
        }
    }
}

/// Global counters, summed over CPUs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen (real buffer length, fragments included).
    pub bytes: u64,
}

/// Result of one `BPF_PROG_TEST_RUN` invocation.
#[derive(Debug, Clone)]
pub struct TestRunOutput {
    /// The XDP verdict (`XDP_PASS` = 2, ...).
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// Kernel-measured duration of the run.
    pub duration: Duration,
}

/// XDP action codes, as the kernel defines them.
pub mod verdict {
    /// Error in the program: drop.
    pub const ABORTED: u32 = 0;
    /// Drop.
    pub const DROP: u32 = 1;
    /// Hand to the stack.
    pub const PASS: u32 = 2;
    /// Send back out the receiving interface.
    pub const TX: u32 = 3;
    /// Send out another interface (bpf_redirect).
    pub const REDIRECT: u32 = 4;

    /// The action's name, for messages.
    pub fn name(v: u32) -> &'static str {
        match v {
            ABORTED => "XDP_ABORTED",
            DROP => "XDP_DROP",
            PASS => "XDP_PASS",
            TX => "XDP_TX",
            REDIRECT => "XDP_REDIRECT",
            _ => "XDP_?",
        }
    }
}

/// Portico's XDP program, loaded into the kernel.
///
/// Loaded with [`XdpProgram::load_with`], its maps and attachments live as long as the value.
/// Loaded with [`XdpProgram::load_pinned`], they are pinned in bpffs and outlive it: the next
/// process loads from the same directory, reuses the maps and replaces the program in the
/// attachments it finds; [`XdpProgram::detach_and_unpin`] or [`XdpProgram::unpin`] end them.
pub struct XdpProgram {
    pub(crate) ebpf: Ebpf,
    pub(crate) options: LoadOptions,
    hz: u32,
    rings: Mapped,
    /// `CT_FILTER` and `RN_FILTER`, the presence filters of [`FILTERED_TABLES`].
    filters: [Mapped; 2],
    /// Keys each table held at its filter's last rebuild: the least the next one sizes for.
    filter_keys: [u64; 2],
    /// When the filters were last rebuilt, and [`XdpProgram::table_inserts`] then.
    filter_rebuilt: Option<(Instant, u64)>,
    /// When a rebuild was last tried.
    filter_tried: Option<Instant>,
    pins: Option<Pins>,
}

/// Where a pinned program's maps and links live, and its userspace state.
struct Pins {
    dir: PathBuf,
    /// The directory, open and `flock`ed for as long as this program lives.
    _lock: std::fs::File,
    state: pin::State,
    reused: bool,
}

/// The embedded object.
#[cfg(test)]
pub(crate) fn program_object() -> &'static [u8] {
    PROGRAM_OBJECT
}

/// Bytes of one element of a BPF array of `u32` (the kernel rounds values up to 8).
const ELEM_BYTES: usize = 8;

/// How often the presence filters are rebuilt at least (bits of gone entries dropped).
pub const FILTER_REBUILD_EVERY: Duration = Duration::from_secs(30);
/// The least time between two rebuilds of the presence filters (or tries: a failed one
/// waits as long), however fast the tables grow.
pub const FILTER_REBUILD_GAP: Duration = Duration::from_secs(5);

/// The tables with a presence filter, in the order of `XdpProgram::filters`.
const FILTERED_TABLES: [&str; 2] = [map_name::CONNTRACK, map_name::REV_NAT];

/// An mmapable array map (`BPF_F_MMAPABLE`) of `elems` 8-byte elements, mapped into this
/// process: `RINGS` (Maglev tables are written with one copy rather than a syscall per
/// slot, 16,381 of them at the default size) and the presence filters.
struct Mapped {
    ptr: *mut u8,
    elems: usize,
    len: usize,
}

// SAFETY: the mapping is owned by the value and only written through `&mut XdpProgram`.
unsafe impl Send for Mapped {}
// SAFETY: as above; shared references never write.
unsafe impl Sync for Mapped {}

impl Mapped {
    fn new(ebpf: &Ebpf, name: &'static str, elems: usize) -> Result<Self, XdpError> {
        let map = ebpf.map(name).ok_or_else(|| no_such_map(name))?;
        let aya::maps::Map::Array(data) = map else {
            return Err(XdpError::Map {
                name,
                source: MapError::InvalidMapType { map_type: 0 },
            });
        };
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        // Array elements are 8-byte aligned: a u32 slot takes 8 bytes.
        let len = (elems * ELEM_BYTES).div_ceil(page) * page;
        // SAFETY: maps `len` bytes of an mmapable array map of at least `elems` elements,
        // shared, at an address the kernel picks; checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(XdpError::Os {
                what: "mapping an array map into memory",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            ptr: ptr.cast(),
            elems,
            len,
        })
    }

    /// Element `i` as a `u64` the program updates concurrently.
    fn word(&self, i: usize) -> Option<&AtomicU64> {
        // SAFETY: in bounds of a live shared mapping, 8-byte aligned (page-aligned start,
        // 8-byte elements); the program writes the same words with atomic operations.
        (i < self.elems).then(|| unsafe { AtomicU64::from_ptr(self.ptr.cast::<u64>().add(i)) })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

impl XdpProgram {
    /// Loads the embedded object with default map sizes.
    ///
    /// # Errors
    /// As [`XdpProgram::load_with`].
    pub fn load() -> Result<Self, XdpError> {
        Self::load_with(LoadOptions::default())
    }

    /// Loads the embedded object with the given map sizes, and the program into the kernel.
    /// Maps and attachments go away with the value.
    ///
    /// # Errors
    /// Bad options; without `CAP_BPF`/root; the verifier rejects the program; no BTF.
    pub fn load_with(options: LoadOptions) -> Result<Self, XdpError> {
        Self::load_inner(options, None)
    }

    /// Loads the program with its state maps pinned under `dir` (on bpffs, e.g.
    /// `/sys/fs/bpf/portico/<node>`, created if missing), reusing the maps an earlier load
    /// pinned there: connection tracking, reverse NAT, services, backends, rings, the VIP
    /// filter, the configuration, the counters and the per-CPU caches. Then
    /// [`XdpBalancer::adopt`](crate::XdpBalancer::adopt) picks the services up, and
    /// [`XdpProgram::attach`] replaces the program in the links pinned there.
    ///
    /// # Errors
    /// As [`XdpProgram::load_with`]; [`XdpError::PinnedMapMismatch`] (naming the map) when a
    /// pinned map was made with other options or by a build with other map definitions,
    /// [`XdpError::PinnedLayout`] when the pins come from another map layout; in both cases
    /// nothing was changed. [`XdpError::Pin`] when `dir` is not usable.
    pub fn load_pinned(options: LoadOptions, dir: impl AsRef<Path>) -> Result<Self, XdpError> {
        Self::load_inner(options, Some(dir.as_ref()))
    }

    fn load_inner(options: LoadOptions, pin_dir: Option<&Path>) -> Result<Self, XdpError> {
        options.validate()?;
        let sizes = map_sizes(&options)?;
        let mut loader = EbpfLoader::new();
        for &(name, entries) in &sizes {
            loader.map_max_entries(name, entries);
        }
        let mut reused = false;
        let lock = pin_dir.map(pin::lock).transpose()?;
        if let Some(dir) = pin_dir {
            let expected = pin::expected(PROGRAM_OBJECT, &sizes, &options)?;
            reused = pin::prepare(dir, &expected)?;
            for name in pin::PINNED_MAPS {
                // Reused as is when pinned (checked above), else created and pinned.
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(PROGRAM_OBJECT)?;
        let prog: &mut Xdp = program_mut(&mut ebpf)?;
        load_retrying(prog)?;
        let hz = kernel_hz(&mut ebpf)?;
        let rings = Mapped::new(
            &ebpf,
            map_name::RINGS,
            options.max_services as usize * 2 * options.ring_size as usize,
        )?;
        // The presence filters of CONNTRACK and REV_NAT (`ct_filter`).
        let filter_words = ct_filter::map_entries(options.conntrack_entries) as usize;
        let filters = [
            Mapped::new(&ebpf, map_name::CT_FILTER, filter_words)?,
            Mapped::new(&ebpf, map_name::RN_FILTER, filter_words)?,
        ];
        if !reused {
            // Sized, not enabled: the program sets bits from now on; the first rebuild
            // enables them.
            let min = ct_filter::MIN_WORDS_LOG2;
            let room = ct_filter::room_log2(options.conntrack_entries);
            for f in &filters {
                if let Some(c) = f.word(ct_filter::CONTROL as usize) {
                    c.store(
                        ct_filter::control(false, 0, [min, min], room),
                        Ordering::Release,
                    );
                }
            }
        }
        let pins = match (pin_dir, lock) {
            (Some(dir), Some(lock)) => Some(Pins {
                dir: dir.to_owned(),
                _lock: lock,
                state: pin::State::open(dir, &options)?,
                reused,
            }),
            _ => None,
        };
        Ok(Self {
            ebpf,
            options,
            hz,
            rings,
            filters,
            filter_keys: [0; 2],
            filter_rebuilt: None,
            filter_tried: None,
            pins,
        })
    }

    /// The pin directory, for a program loaded with [`XdpProgram::load_pinned`].
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_ref().map(|p| p.dir.as_path())
    }

    /// Whether [`XdpProgram::load_pinned`] found pinned maps and reused them (their state
    /// is there to adopt), rather than creating them.
    pub fn reused_pins(&self) -> bool {
        self.pins.as_ref().is_some_and(|p| p.reused)
    }

    /// The userspace state of a pinned program.
    pub(crate) fn pinned_state(&self) -> Option<&pin::State> {
        self.pins.as_ref().map(|p| &p.state)
    }

    /// The userspace state of a pinned program, writable.
    pub(crate) fn pinned_state_mut(&mut self) -> Option<&mut pin::State> {
        self.pins.as_mut().map(|p| &mut p.state)
    }

    /// The kernel's id of the loaded XDP program (as `ip link` and `bpftool` show it).
    ///
    /// # Errors
    /// The kernel does not answer the query.
    pub fn program_id(&self) -> Result<u32, XdpError> {
        Ok(self.program()?.info()?.id())
    }

    /// Detaches from every interface this program's pin directory holds a link for and
    /// removes the pins (maps, links, userspace state, the directory): the state is gone for
    /// good (`--shutdown withdraw`). A program loaded without pins is simply dropped, which
    /// detaches it.
    ///
    /// # Errors
    /// A pin cannot be removed.
    pub fn detach_and_unpin(self) -> Result<(), XdpError> {
        let dir = self.pins.as_ref().map(|p| p.dir.clone());
        // Our own handles go first, so that removing the pins frees the links and maps.
        drop(self);
        match dir {
            Some(dir) => Self::unpin(dir),
            None => Ok(()),
        }
    }

    /// Removes everything [`XdpProgram::load_pinned`] pinned under `dir`: the links (each
    /// interface is detached once no process holds its link), the maps and the userspace
    /// state, and `dir` if nothing else is in it. Nothing there is not an error.
    ///
    /// # Errors
    /// A pin cannot be removed.
    pub fn unpin(dir: impl AsRef<Path>) -> Result<(), XdpError> {
        pin::remove_all(dir.as_ref())
    }

    /// Removes the pinned maps and userspace state under `dir` but keeps the links, so the
    /// next [`XdpProgram::load_pinned`] starts with empty maps and still replaces the program
    /// in place, without a moment with no XDP. Tracked connections are lost.
    ///
    /// # Errors
    /// A pin cannot be removed.
    pub fn unpin_maps(dir: impl AsRef<Path>) -> Result<(), XdpError> {
        pin::remove_maps(dir.as_ref())
    }

    /// The interfaces with a link pinned under this program's pin directory (attached by
    /// this process or an earlier one); empty without pins.
    ///
    /// # Errors
    /// The directory cannot be listed.
    pub fn pinned_interfaces(&self) -> Result<Vec<String>, XdpError> {
        match &self.pins {
            Some(p) => pin::pinned_links(&p.dir),
            None => Ok(Vec::new()),
        }
    }

    /// Removes the pinned link of `iface` (an interface no longer configured): it detaches
    /// once no process holds it. Returns whether there was one.
    ///
    /// # Errors
    /// The pin cannot be removed.
    pub fn unpin_interface(&mut self, iface: &str) -> Result<bool, XdpError> {
        let Some(p) = &self.pins else {
            return Ok(false);
        };
        let path = pin::link_path(&p.dir, iface);
        let existed = path.exists();
        pin::remove(&path)?;
        Ok(existed)
    }

    /// Writes `values` into the `RINGS` array from slot `first` on: one copy into the
    /// mapped array. The caller writes only a ring half no packet reads (see `Balancer`).
    ///
    /// # Errors
    /// The range is outside the array.
    pub(crate) fn write_ring(&mut self, first: usize, values: &[u32]) -> Result<(), XdpError> {
        if first + values.len() > self.rings.elems {
            return Err(XdpError::BadOption {
                field: "ring slot",
                value: (first + values.len()) as u64,
                why: "beyond the RINGS array",
            });
        }
        let stride = ELEM_BYTES / 4;
        for (i, v) in values.iter().enumerate() {
            // SAFETY: element `first + i` is in bounds (checked above) of a live, writable
            // shared mapping; its value is the first 4 of its 8 bytes.
            unsafe {
                self.rings
                    .ptr
                    .cast::<u32>()
                    .add((first + i) * stride)
                    .write(*v)
            };
        }
        // The flip that publishes the table is a map update (a syscall) after this: the
        // stores are visible to the program before the new generation is.
        std::sync::atomic::fence(std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// The kernel's tick rate (HZ): the program's clock is jiffies.
    pub fn hz(&self) -> u32 {
        self.hz
    }

    /// The map sizes this program was loaded with.
    pub fn options(&self) -> LoadOptions {
        self.options
    }

    /// The instructions the verifier walked to accept this balancer program (`None` on a
    /// kernel that does not report it): the load-time budget the program must stay within.
    ///
    /// # Errors
    /// The program's information cannot be read.
    pub fn verified_instructions(&self) -> Result<Option<u32>, XdpError> {
        Ok(self.program()?.info()?.verified_instruction_count())
    }

    fn program(&self) -> Result<&Xdp, XdpError> {
        let prog = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?;
        Ok(prog.try_into()?)
    }

    /// Attaches to `iface` (in the calling thread's network namespace) in `mode`, and sets
    /// `net.ipv4.conf.<iface>.accept_local=1` (see the body). Detached when `self` is
    /// dropped.
    ///
    /// A pinned program (see [`XdpProgram::load_pinned`]) attaches through a BPF link pinned
    /// as `link_<iface>` in its directory, which keeps it attached after the process exits.
    /// When that pin exists (an earlier process attached), the program in the link is
    /// replaced atomically: packets see the old program or the new one, never none. The link
    /// keeps the mode it was created with; to change it, remove it first
    /// ([`XdpProgram::unpin_interface`]). A link whose interface was deleted is replaced by a
    /// new one.
    ///
    /// # Errors
    /// Unknown interface, the driver refuses the mode, or the sysctl cannot be written; for a
    /// pinned program, a link pin that cannot be read, replaced or written, or a kernel
    /// without BPF links for XDP.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), XdpError> {
        // When the next hop has no neighbour entry yet, the rewritten packet is passed to the
        // stack to resolve it. Its IPv4 source is then the node's own SNAT address, which
        // the stack drops as a martian unless the interface accepts local sources. Set
        // first, so that a failure leaves nothing attached.
        // In a container /proc/sys is read-only: the agent's DaemonSet mounts the host's
        // /proc/sys/net elsewhere and names it in PORTICO_PROC_SYS_NET.
        let net = std::env::var("PORTICO_PROC_SYS_NET").unwrap_or_else(|_| "/proc/sys/net".into());
        let conf = format!("{net}/ipv4/conf/{iface}");
        let special = matches!(iface, "all" | "default") || iface.contains('/');
        if special || !std::path::Path::new(&conf).is_dir() {
            return Err(XdpError::NoSuchInterface(iface.to_owned()));
        }
        std::fs::write(format!("{conf}/accept_local"), "1").map_err(|source| XdpError::Os {
            what: "setting net.ipv4.conf.<interface>.accept_local=1 (first packets toward \
                   unresolved neighbours)",
            source,
        })?;
        if let Some(p) = &self.pins {
            let path = pin::link_path(&p.dir, iface);
            return self.attach_pinned(iface, mode, &path);
        }
        let prog = program_mut(&mut self.ebpf)?;
        match prog.attach(iface, mode.xdp_mode()) {
            Ok(_link) => Ok(()),
            Err(ProgramError::UnknownInterface { name }) => Err(XdpError::NoSuchInterface(name)),
            Err(e) => Err(e.into()),
        }
    }

    /// Tells the program that packets arriving on interface `ifindex` may be CHECKSUM_PARTIAL
    /// (generic XDP on a veth fed by a local sender): a transport checksum field equal to
    /// the packet's pseudo-header sum is then updated as that sum. Opt-in, never done by
    /// [`XdpProgram::attach`]: a finished checksum that happens to equal the sum is taken
    /// for one and comes out wrong, and for a UDP datagram of fixed content that happens for
    /// one source port every time (docs/xdp.md, "Checksums in generic mode").
    ///
    /// # Errors
    /// The map cannot be written.
    pub fn mark_generic(&mut self, ifindex: u32, generic: bool) -> Result<(), XdpError> {
        let mut map: aya::maps::HashMap<&mut MapData, u32, u32> =
            self.map_mut(map_name::GENERIC_IFACES)?;
        if generic {
            map.insert(ifindex, 1, 0)
                .map_err(map_err(map_name::GENERIC_IFACES))?;
        } else if map.get(&ifindex, 0).is_ok() {
            map.remove(&ifindex)
                .map_err(map_err(map_name::GENERIC_IFACES))?;
        }
        let count = map.keys().filter(Result::is_ok).count() as u32;
        let mut any: aya::maps::Array<&mut MapData, u32> = self.map_mut(map_name::GENERIC_ANY)?;
        any.set(0, count, 0).map_err(map_err(map_name::GENERIC_ANY))
    }

    /// Replaces the program in the link pinned at `path`, or attaches with a new link and
    /// pins it there. Either way this process keeps no handle on the link: the pin owns it.
    fn attach_pinned(
        &mut self,
        iface: &str,
        mode: AttachMode,
        path: &Path,
    ) -> Result<(), XdpError> {
        let pin_err = |what| {
            move |source| XdpError::Pin {
                what,
                path: path.to_owned(),
                source,
            }
        };
        if path.exists() {
            let pinned = PinnedLink::from_pin(path)
                .map_err(|e| pin_err("opening the pinned XDP link")(std::io::Error::other(e)))?;
            let link = XdpLink::try_from(FdLink::from(pinned))
                .map_err(|e| pin_err("opening the pinned XDP link")(std::io::Error::other(e)))?;
            let prog = program_mut(&mut self.ebpf)?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    // The pin keeps the link; dropping our handle leaves it attached.
                    drop(prog.take_link(id)?);
                    return Ok(());
                }
                // The interface was deleted: the link is defunct. Replace it below.
                Err(ProgramError::SyscallError(SyscallError { io_error, .. }))
                    if io_error.raw_os_error() == Some(libc::ENOLINK) =>
                {
                    pin::remove(path)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        // Without BPF links aya would fall back to a netlink attachment, which cannot be
        // pinned: refuse before attaching anything.
        let links = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(5, 9, 0));
        if !links {
            return Err(XdpError::NoBpfLink(iface.to_owned()));
        }
        let prog = program_mut(&mut self.ebpf)?;
        let id = match prog.attach(iface, mode.xdp_mode()) {
            Ok(id) => id,
            Err(ProgramError::UnknownInterface { name }) => {
                return Err(XdpError::NoSuchInterface(name))
            }
            Err(e) => return Err(e.into()),
        };
        let link = FdLink::try_from(prog.take_link(id)?)
            .map_err(|_| XdpError::NoBpfLink(iface.to_owned()))?;
        // On failure the link is dropped, which detaches it.
        link.pin(path)
            .map_err(|e| pin_err("pinning the XDP link")(pin::pin_io(e)))?;
        Ok(())
    }

    /// Runs the program once on `packet` with `BPF_PROG_TEST_RUN` (repeat = 1).
    ///
    /// # Errors
    /// The kernel refuses the run (packet too short or too long, no privileges).
    pub fn test_run(&self, packet: &[u8]) -> Result<TestRunOutput, XdpError> {
        self.test_run_on(packet, None)
    }

    /// As [`XdpProgram::test_run`], as if the packet arrived on interface `ingress_ifindex`
    /// (of the calling thread's namespace), so FIB lookups and XDP_TX decisions are real.
    ///
    /// # Errors
    /// The kernel refuses the run.
    pub fn test_run_on(
        &self,
        packet: &[u8],
        ingress_ifindex: Option<u32>,
    ) -> Result<TestRunOutput, XdpError> {
        run_once(self.program()?, packet, ingress_ifindex)
    }

    /// Runs the benchmark floor program (swap MACs, XDP_TX) once on `packet`; loads it on
    /// first use.
    ///
    /// # Errors
    /// The program does not load, or the kernel refuses the run.
    pub fn test_run_floor(
        &mut self,
        packet: &[u8],
        ingress_ifindex: Option<u32>,
    ) -> Result<TestRunOutput, XdpError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(FLOOR_PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        if prog.fd().is_err() {
            load_retrying(prog)?;
        }
        let prog: &Xdp = self
            .ebpf
            .program(FLOOR_PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        run_once(prog, packet, ingress_ifindex)
    }

    /// Attaches one of the object's benchmark programs
    /// (`portico_xdp_common::FORWARD_FLOOR_PROGRAM_NAME`, `SINK_PROGRAM_NAME`) to `iface` in
    /// `mode`, in place of the balancer; it shares this program's maps. Loaded on first use,
    /// detached when `self` is dropped. For `forward_bench`.
    ///
    /// # Errors
    /// No such program in the object, it does not load, or the attachment fails.
    pub fn attach_bench_program(
        &mut self,
        name: &str,
        iface: &str,
        mode: AttachMode,
    ) -> Result<(), XdpError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()?;
        if prog.fd().is_err() {
            load_retrying(prog)?;
        }
        match prog.attach(iface, mode.xdp_mode()) {
            Ok(_link) => Ok(()),
            Err(ProgramError::UnknownInterface { name }) => Err(XdpError::NoSuchInterface(name)),
            Err(e) => Err(e.into()),
        }
    }

    /// A global counter (see `portico_xdp_common::stat`), summed over all CPUs.
    ///
    /// # Errors
    /// The stats map is missing or unreadable.
    pub fn stat(&self, idx: u32) -> Result<u64, XdpError> {
        let array: PerCpuArray<&MapData, StatBlock> = self.map(map_name::STATS)?;
        let values = array.get(&0, 0).map_err(map_err(map_name::STATS))?;
        Ok(values
            .iter()
            .map(|b| b.counts.get(idx as usize).copied().unwrap_or(0))
            .sum())
    }

    /// Packets and bytes seen, summed over all CPUs.
    ///
    /// # Errors
    /// The stats map is missing or unreadable.
    pub fn stats(&self) -> Result<Stats, XdpError> {
        Ok(Stats {
            packets: self.stat(stat::PACKETS)?,
            bytes: self.stat(stat::BYTES)?,
        })
    }

    /// Counters of a service or backend id from `map` (`SERVICE_STATS` or `BACKEND_STATS`).
    pub(crate) fn counters(&self, map: &'static str, id: u32) -> Result<Counters, XdpError> {
        let array: PerCpuArray<&MapData, Counters> = self.map(map)?;
        let values = array.get(&id, 0).map_err(map_err(map))?;
        Ok(values
            .iter()
            .copied()
            .fold(Counters::default(), add_counters))
    }

    /// Packets of service id `id` dropped (`SERVICE_DROPS`), summed over all CPUs.
    pub(crate) fn service_drops(&self, id: u32) -> Result<u64, XdpError> {
        let array: PerCpuArray<&MapData, u64> = self.map(map_name::SERVICE_DROPS)?;
        let values = array
            .get(&id, 0)
            .map_err(map_err(map_name::SERVICE_DROPS))?;
        Ok(values.iter().sum())
    }

    /// Entries in the hash map `name` (conntrack and reverse-NAT tables), read in batches of
    /// 4,096 with `BPF_MAP_LOOKUP_BATCH`: about 130 system calls for a full 524,288-entry
    /// table, rather than one per entry. Entries come and go meanwhile, so the figure is a
    /// snapshot, good for a gauge.
    ///
    /// # Errors
    /// The map is missing, is not a hash map, or the kernel refuses the batch read.
    pub fn map_len(&self, name: &'static str) -> Result<u64, XdpError> {
        let mut total = 0u64;
        self.for_each_key(name, |_| total += 1)?;
        Ok(total)
    }

    /// Calls `f` with the key (its bytes) of every entry of the hash map `name`, read in
    /// batches of 4,096 with `BPF_MAP_LOOKUP_BATCH`, bucket by bucket: an entry that is in
    /// the map for the whole walk is seen once; one added or removed meanwhile, maybe.
    fn for_each_key(&self, name: &'static str, mut f: impl FnMut(&[u8])) -> Result<(), XdpError> {
        const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
        const BATCH: u32 = 4096;
        /// The batch part of `union bpf_attr`.
        #[repr(C)]
        #[derive(Default)]
        struct BatchAttr {
            in_batch: u64,
            out_batch: u64,
            keys: u64,
            values: u64,
            count: u32,
            map_fd: u32,
            elem_flags: u64,
            flags: u64,
        }
        let map = self.ebpf.map(name).ok_or_else(|| no_such_map(name))?;
        let data = match map {
            aya::maps::Map::HashMap(d) | aya::maps::Map::LruHashMap(d) => d,
            _ => {
                return Err(XdpError::Os {
                    what: "reading the entries of a map that is not a hash map",
                    source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
                })
            }
        };
        let info = data.info().map_err(map_err(name))?;
        let (key_size, value_size) = (info.key_size() as usize, info.value_size() as usize);
        let mut keys = vec![0u8; key_size * BATCH as usize];
        let mut values = vec![0u8; value_size * BATCH as usize];
        // The batch position token: a bucket index for hash maps; sized as a key to be safe.
        let mut token_in = vec![0u8; key_size.max(8)];
        let mut token_out = vec![0u8; key_size.max(8)];
        let fd = data.fd().as_fd().as_raw_fd();
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    token_in.as_mut_ptr() as u64
                },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: keys.as_mut_ptr() as u64,
                values: values.as_mut_ptr() as u64,
                count: BATCH,
                map_fd: fd as u32,
                ..BatchAttr::default()
            };
            // SAFETY: `attr` points at buffers of `count` keys and values of the map's own
            // sizes and at two tokens of at least the key size, all alive for the call; the
            // kernel writes only within them.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>(),
                )
            };
            let err = (rc < 0).then(std::io::Error::last_os_error);
            // On ENOENT (the end) `count` still holds the last batch's entries.
            let n = (attr.count as usize).min(BATCH as usize);
            keys.chunks_exact(key_size).take(n).for_each(&mut f);
            match err {
                None => {}
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Some(source) => {
                    return Err(XdpError::Os {
                        what: "BPF_MAP_LOOKUP_BATCH",
                        source,
                    })
                }
            }
            std::mem::swap(&mut token_in, &mut token_out);
            first = false;
        }
    }

    /// Rebuilds the presence filters of `CONNTRACK` and `REV_NAT` (`ct_filter`) and enables
    /// them: for each, sizes the copy packets do not read for the table's entries (eight
    /// bits each, at most the room for a copy), clears it, sets the bit of every key the
    /// table holds, then makes that copy the one packets read. The entries: the keys of the
    /// last rebuild's walk plus the inserts since (`flow_table_inserts`), or a count of
    /// them (a walk) the first time. The program sets each new entry's bit in both copies
    /// after its insert (and again if the size changed meanwhile), so an entry added during
    /// the rebuild is in the new copy either way: its bit set after the clear, or its entry
    /// there for the walk. Bits of entries gone since the last rebuild are dropped. Returns
    /// the keys walked, by table.
    ///
    /// Called by [`XdpBalancer`](crate::XdpBalancer) when the node is configured and by
    /// [`Balancer::maintain`](crate::Balancer::maintain) when [`XdpProgram::filters_due`].
    ///
    /// # Errors
    /// A table cannot be read, or a filter is not sized (a map of another build): that
    /// filter stays as it was (a disabled filter only costs the lookups it would save).
    pub fn rebuild_filters(&mut self) -> Result<[u64; 2], XdpError> {
        let inserts = self.table_inserts()?;
        let since = self
            .filter_rebuilt
            .map(|(_, then)| inserts.saturating_sub(then));
        // A failure waits FILTER_REBUILD_GAP before the next try, as a success does.
        self.filter_tried = Some(Instant::now());
        let mut keys = [0; 2];
        for (i, table) in FILTERED_TABLES.into_iter().enumerate() {
            let entries = match since {
                Some(n) => self.filter_keys[i].saturating_add(n),
                None => self.map_len(table)?,
            };
            keys[i] = self.rebuild_filter(i, table, entries)?;
            self.filter_keys[i] = keys[i];
        }
        self.filter_rebuilt = Some((Instant::now(), inserts));
        Ok(keys)
    }

    /// [`XdpProgram::rebuild_filters`] when they are due ([`XdpProgram::filters_due`]) and
    /// the last try is at least [`FILTER_REBUILD_GAP`] old: the node's upkeep, every
    /// second. Returns whether it rebuilt them.
    ///
    /// # Errors
    /// As [`XdpProgram::rebuild_filters`].
    pub fn rebuild_filters_if_due(&mut self) -> Result<bool, XdpError> {
        if self
            .filter_tried
            .is_some_and(|t| t.elapsed() < FILTER_REBUILD_GAP)
            || !self.filters_due()?
        {
            return Ok(false);
        }
        self.rebuild_filters()?;
        Ok(true)
    }

    /// Whether the presence filters are due for a rebuild: never rebuilt, rebuilt
    /// [`FILTER_REBUILD_EVERY`] ago, or outgrown: the tables took more new entries since
    /// than half the entries the filters were sized for (their bits would then be a fifth
    /// set, and more new flows would take the lookup). Cheap: one read of the counters.
    ///
    /// # Errors
    /// The counters cannot be read.
    pub fn filters_due(&self) -> Result<bool, XdpError> {
        let Some((at, inserts)) = self.filter_rebuilt else {
            return Ok(true);
        };
        let sized_for = self.filter_keys.iter().max().copied().unwrap_or(0).max(
            // The smallest filter's entries at eight bits each.
            (64 << ct_filter::MIN_WORDS_LOG2) / ct_filter::BITS_PER_ENTRY,
        );
        Ok(at.elapsed() >= FILTER_REBUILD_EVERY
            || self.table_inserts()?.saturating_sub(inserts) > sized_for / 2)
    }

    /// Entries inserted into `CONNTRACK` and `REV_NAT` so far (`flow_table_inserts`).
    fn table_inserts(&self) -> Result<u64, XdpError> {
        self.stat(stat::FLOW_TABLE_INSERTS)
    }

    /// [`XdpProgram::rebuild_filters`] for filter `i`, of `table`, sized for `entries`.
    fn rebuild_filter(&self, i: usize, table: &'static str, entries: u64) -> Result<u64, XdpError> {
        let f = &self.filters[i];
        let not_sized = || XdpError::Os {
            what: "rebuilding a presence filter the loader did not size (a map of another build)",
            source: std::io::Error::from(std::io::ErrorKind::InvalidData),
        };
        let cw = f.word(ct_filter::CONTROL as usize).ok_or_else(not_sized)?;
        let control = cw.load(Ordering::Acquire);
        if control == 0 {
            return Err(not_sized());
        }
        self.check_key_size(table)?;
        let room = ct_filter::room_log2(self.options.conntrack_entries);
        let active = u32::from(control & ct_filter::ACTIVE_ONE != 0);
        let idle = 1 - active;
        let mut log2 = [
            ct_filter::copy_log2(control, 0),
            ct_filter::copy_log2(control, 1),
        ];
        log2[idle as usize] = ct_filter::words_log2_for(entries).min(room);
        // The idle copy's new size first: from here on, packets set bits where the walk
        // will.
        cw.store(
            ct_filter::control(control & ct_filter::ENABLED != 0, active, log2, room),
            Ordering::SeqCst,
        );
        let start = ct_filter::copy_start(ct_filter::control(false, 0, log2, room), idle) as usize;
        for i in 0..1usize << log2[idle as usize] {
            if let Some(w) = f.word(start + i) {
                w.store(0, Ordering::Relaxed);
            }
        }
        // The clear is complete before the walk reads the first key.
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut keys = 0u64;
        self.for_each_key(table, |k| {
            // SAFETY: `k` holds exactly one FlowKey's bytes (`for_each_key` gives keys of
            // the map's key size, checked above to be FlowKey's), a plain repr(C) struct
            // of integers, valid for any bits; read unaligned from the batch buffer.
            let key = unsafe { k.as_ptr().cast::<FlowKey>().read_unaligned() };
            let (word, bit) = ct_filter::position(&key, log2[idle as usize]);
            if let Some(w) = f.word(start + word as usize) {
                w.fetch_or(bit, Ordering::Relaxed);
            }
            keys += 1;
        })?;
        cw.store(ct_filter::control(true, idle, log2, room), Ordering::SeqCst);
        Ok(keys)
    }

    /// Fails unless the keys of hash map `name` are [`FlowKey`]s.
    fn check_key_size(&self, name: &'static str) -> Result<(), XdpError> {
        let size = match self.ebpf.map(name).ok_or_else(|| no_such_map(name))? {
            aya::maps::Map::HashMap(d) | aya::maps::Map::LruHashMap(d) => {
                d.info().map_err(map_err(name))?.key_size() as usize
            }
            _ => 0,
        };
        if size != std::mem::size_of::<FlowKey>() {
            return Err(XdpError::Os {
                what: "a flow table whose keys are not FlowKeys (a map of another build)",
                source: std::io::Error::from(std::io::ErrorKind::InvalidData),
            });
        }
        Ok(())
    }

    /// A typed view of map `name`.
    pub(crate) fn map<'a, M>(&'a self, name: &'static str) -> Result<M, XdpError>
    where
        M: TryFrom<&'a aya::maps::Map, Error = MapError>,
    {
        let map = self.ebpf.map(name).ok_or_else(|| no_such_map(name))?;
        M::try_from(map).map_err(map_err(name))
    }

    /// A typed, writable view of map `name`.
    pub(crate) fn map_mut<'a, M>(&'a mut self, name: &'static str) -> Result<M, XdpError>
    where
        M: TryFrom<&'a mut aya::maps::Map, Error = MapError>,
    {
        let map = self.ebpf.map_mut(name).ok_or_else(|| no_such_map(name))?;
        M::try_from(map).map_err(map_err(name))
    }
}

/// Entries of every map whose size comes from the options.
fn map_sizes(options: &LoadOptions) -> Result<Vec<(&'static str, u32)>, XdpError> {
    // The caches hold a block of `flow_cache_entries` per possible CPU.
    let cpus = aya::util::nr_cpus().map_err(|(_, source)| XdpError::Os {
        what: "reading the possible CPUs",
        source,
    })?;
    let cache_entries = u32::try_from(cpus)
        .ok()
        .and_then(|c| c.checked_mul(options.flow_cache_entries))
        .ok_or(XdpError::BadOption {
            field: "flow_cache_entries",
            value: options.flow_cache_entries.into(),
            why: "times the possible CPUs exceeds the array limit",
        })?;
    Ok(vec![
        (
            map_name::RINGS,
            options.max_services * 2 * options.ring_size,
        ),
        (map_name::SERVICES, options.max_services * 4),
        (map_name::SERVICE_STATS, options.max_services),
        (map_name::SERVICE_DROPS, options.max_services),
        (map_name::BACKENDS, options.max_backends),
        (map_name::BACKEND_STATS, options.max_backends),
        (map_name::CONNTRACK, options.conntrack_entries),
        (map_name::CONNTRACK_NEW, options.conntrack_entries),
        (map_name::REV_NAT, options.conntrack_entries),
        (map_name::REV_NAT_NEW, options.conntrack_entries),
        (
            map_name::CT_FILTER,
            ct_filter::map_entries(options.conntrack_entries),
        ),
        (
            map_name::RN_FILTER,
            ct_filter::map_entries(options.conntrack_entries),
        ),
        (map_name::FLOW_CACHE, cache_entries),
        (map_name::REPLY_CACHE, cache_entries),
    ])
}

/// HZ, measured once per process: the jiffies probe runs twice, 100 ms apart, and the rate
/// snaps to the common kernel values (100, 250, 300, 1000) when within 10 %.
fn kernel_hz(ebpf: &mut Ebpf) -> Result<u32, XdpError> {
    static HZ: OnceLock<u32> = OnceLock::new();
    if let Some(hz) = HZ.get() {
        return Ok(*hz);
    }
    let prog: &mut Xdp = ebpf
        .program_mut(JIFFIES_PROGRAM_NAME)
        .ok_or(ProgramError::NotLoaded)?
        .try_into()?;
    load_retrying(prog)?;
    let probe = [0u8; 64];
    let (j0, t0) = (run_once(prog, &probe, None)?.verdict, Instant::now());
    std::thread::sleep(Duration::from_millis(100));
    let (j1, t1) = (run_once(prog, &probe, None)?.verdict, Instant::now());
    let rate = f64::from(j1.wrapping_sub(j0)) / (t1 - t0).as_secs_f64();
    let hz = [100u32, 250, 300, 1000]
        .into_iter()
        .find(|&h| (rate - f64::from(h)).abs() <= f64::from(h) / 10.0)
        .unwrap_or(rate.round().max(1.0) as u32);
    Ok(*HZ.get_or_init(|| hz))
}

/// The sum of two sets of counters.
pub(crate) fn add_counters(a: Counters, b: Counters) -> Counters {
    Counters {
        packets: a.packets + b.packets,
        bytes: a.bytes + b.bytes,
        new_flows: a.new_flows + b.new_flows,
    }
}

/// Wraps a map error with the map's name.
/// The error for a map the object lacks.
pub(crate) fn no_such_map(name: &'static str) -> XdpError {
    XdpError::Map {
        name,
        source: MapError::InvalidName { name: name.into() },
    }
}

pub(crate) fn map_err(name: &'static str) -> impl Fn(MapError) -> XdpError {
    move |source| XdpError::Map { name, source }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let prog = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(ProgramError::NotLoaded)?;
    Ok(prog.try_into()?)
}

/// One `BPF_PROG_TEST_RUN` with repeat = 1, optionally as if arriving on `ingress_ifindex`.
/// Loads `prog`, again when BPF_PROG_LOAD answers EAGAIN: the verifier gives up with
/// EAGAIN when a signal reaches the loading thread during a long verification (seen on a
/// loaded machine); libbpf retries the same way. Up to five tries.
pub(crate) fn load_retrying(prog: &mut Xdp) -> Result<(), ProgramError> {
    let mut attempt = 1;
    loop {
        match prog.load() {
            Err(ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < 5 =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

pub(crate) fn run_once(
    prog: &Xdp,
    packet: &[u8],
    ingress_ifindex: Option<u32>,
) -> Result<TestRunOutput, XdpError> {
    let mut out = vec![0u8; packet.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex.
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(packet.len() as u32).to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: ingress_ifindex.map(|i| {
            ctx[12..16].copy_from_slice(&i.to_ne_bytes());
            &ctx[..]
        }),
        ..TestRunOptions::new()
    };
    let result = prog.test_run(opts)?;
    out.truncate(result.data_size_out as usize);
    Ok(TestRunOutput {
        verdict: result.return_value,
        packet: out,
        duration: result.duration,
    })
}
