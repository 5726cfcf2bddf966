//! Pinning in bpffs: the maps the balancer's state lives in, the XDP links, and three small
//! maps of userspace state, all under one directory. A restarted loader reuses the maps (so
//! tracked flows keep their backend and SNAT port) and swaps its program into the links it
//! finds (so the interfaces are never without XDP).
//!
//! Directory layout: one file per pinned map, named as in the object (`CONNTRACK`, ...);
//! `ptc_meta` (magic and [`PINNED_LAYOUT_VERSION`]), `ptc_backends` (weight and position of
//! each backend id, which the kernel maps do not hold), `ptc_retired` (what removed backends
//! had counted, per service id); `link_<interface>` per attached interface.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, Map, MapData, MapError, MapInfo},
    pin::PinError,
    Pod,
};
use aya_obj::generated::bpf_map_type;
use portico_xdp_common::{map_name, Counters, PINNED_LAYOUT_VERSION};

use crate::program::{map_err, LoadOptions, XdpError};

/// Maps pinned under the directory: every map tracked flows, services, backends and counters
/// live in, and the per-CPU caches: their size is in `CONFIG::flow_cache_mask`, which the old
/// and the new program share until the new one is swapped into the links, so both must use
/// caches of the same size; and the presence filters, which both programs must keep
/// complete. Not pinned: `SCRATCH`, each packet's scratch space, `FRAGS`,
/// whose entries serve the fragments of a datagram for a few seconds, and `GENERIC_IFACES`
/// and `GENERIC_ANY`, which `XdpProgram::mark_generic` writes for its own program.
pub(crate) const PINNED_MAPS: [&str; 17] = [
    map_name::STATS,
    map_name::VIP_FILTER,
    map_name::CONFIG,
    map_name::SERVICES,
    map_name::RINGS,
    map_name::BACKENDS,
    map_name::CONNTRACK,
    map_name::CONNTRACK_NEW,
    map_name::REV_NAT,
    map_name::REV_NAT_NEW,
    map_name::SERVICE_STATS,
    map_name::SERVICE_DROPS,
    map_name::BACKEND_STATS,
    map_name::FLOW_CACHE,
    map_name::REPLY_CACHE,
    map_name::CT_FILTER,
    map_name::RN_FILTER,
];

/// Maps of the object that are deliberately not pinned (see [`PINNED_MAPS`]).
#[cfg(test)]
pub(crate) const UNPINNED_MAPS: [&str; 4] = ["SCRATCH", "FRAGS", "GENERIC_IFACES", "GENERIC_ANY"];

/// Magic and layout version of the pinned set.
const META: &str = "ptc_meta";
/// [`BackendMeta`] by backend id.
pub(crate) const BACKEND_META: &str = "ptc_backends";
/// [`Counters`] of removed backends by service id.
pub(crate) const RETIRED: &str = "ptc_retired";
/// Prefix of link pins: `link_<interface>`.
const LINK_PREFIX: &str = "link_";
/// "PTCO".
const MAGIC: u32 = 0x5054_434f;

/// Value of `ptc_meta`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PinMeta {
    magic: u32,
    layout: u32,
}

/// What the kernel maps do not say about a backend id: the weight it was given (its
/// `Backend` says only active or draining) and its position in the service's spec.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct BackendMeta {
    /// Weight as upserted.
    pub weight: u32,
    /// Index in `ServiceSpec::backends`.
    pub position: u32,
}

// SAFETY: #[repr(C)] plain data, two u32 fields, no padding, no pointers.
unsafe impl Pod for PinMeta {}
// SAFETY: as above.
unsafe impl Pod for BackendMeta {}

/// Type, key and value sizes, entries and flags of a map: what must match for a pinned map
/// to be reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

impl Geometry {
    fn array<V>(max_entries: u32) -> Self {
        Self {
            map_type: bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
            key_size: 4,
            value_size: size_of::<V>() as u32,
            max_entries,
            flags: 0,
        }
    }

    fn of_pin(name: &'static str, path: &Path) -> Result<Self, XdpError> {
        let info = MapInfo::from_pin(path).map_err(map_err(name))?;
        Ok(Self {
            // An unknown type cannot match any expected one.
            map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags(),
        })
    }

    /// The first difference from `want`, as (field, pinned, wanted).
    fn difference(&self, want: &Self) -> Option<(&'static str, u32, u32)> {
        [
            ("map type", self.map_type, want.map_type),
            ("key size", self.key_size, want.key_size),
            ("value size", self.value_size, want.value_size),
            ("max_entries", self.max_entries, want.max_entries),
            ("flags", self.flags, want.flags),
        ]
        .into_iter()
        .find(|(_, pinned, wanted)| pinned != wanted)
    }
}

/// Which load option sets a map's size, for error messages.
fn sized_by(name: &str) -> &'static str {
    match name {
        map_name::RINGS => "LoadOptions::max_services × 2 × ring_size",
        map_name::SERVICES => "LoadOptions::max_services × 4",
        map_name::SERVICE_STATS | map_name::SERVICE_DROPS | RETIRED => "LoadOptions::max_services",
        map_name::BACKENDS | map_name::BACKEND_STATS | BACKEND_META => "LoadOptions::max_backends",
        map_name::CONNTRACK
        | map_name::CONNTRACK_NEW
        | map_name::REV_NAT
        | map_name::REV_NAT_NEW => "LoadOptions::conntrack_entries",
        map_name::CT_FILTER | map_name::RN_FILTER => {
            "LoadOptions::conntrack_entries (ct_filter::map_entries)"
        }
        map_name::FLOW_CACHE | map_name::REPLY_CACHE => {
            "LoadOptions::flow_cache_entries × possible CPUs"
        }
        _ => "fixed by the program",
    }
}

/// What each pinned map must look like for this build and `options`: the object's map
/// definitions with the loader's sizes, and the userspace state maps.
pub(crate) fn expected(
    object: &[u8],
    sizes: &[(&'static str, u32)],
    options: &LoadOptions,
) -> Result<Vec<(&'static str, Geometry)>, XdpError> {
    let obj = aya_obj::Object::parse(object).map_err(|e| XdpError::Load(e.into()))?;
    let sizes: HashMap<&str, u32> = sizes.iter().copied().collect();
    let mut out = Vec::new();
    for name in PINNED_MAPS {
        let def = obj.maps.get(name).ok_or(XdpError::Map {
            name,
            source: MapError::InvalidName { name: name.into() },
        })?;
        out.push((
            name,
            Geometry {
                map_type: def.map_type(),
                key_size: def.key_size(),
                value_size: def.value_size(),
                max_entries: sizes.get(name).copied().unwrap_or(def.max_entries()),
                flags: def.map_flags(),
            },
        ));
    }
    out.push((
        BACKEND_META,
        Geometry::array::<BackendMeta>(options.max_backends),
    ));
    out.push((RETIRED, Geometry::array::<Counters>(options.max_services)));
    Ok(out)
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> XdpError + 'a {
    move |source| XdpError::Pin {
        what,
        path: path.to_owned(),
        source,
    }
}

/// The OS error inside an aya pin error.
pub(crate) fn pin_io(e: PinError) -> io::Error {
    match e {
        PinError::SyscallError(s) => s.io_error,
        other => io::Error::new(io::ErrorKind::InvalidInput, other.to_string()),
    }
}

/// Gets `dir` ready for a load: creates it, checks the layout version and every pinned map
/// against `expected`, and writes the layout version when the set is new. Returns whether
/// pinned maps were found (their state is reused).
///
/// # Errors
/// The directory cannot be created (not on bpffs?), the pins come from another layout, or a
/// pinned map differs from what this load needs (the error names the map).
/// Creates `dir` and takes an exclusive, non-blocking `flock` on it, held while the
/// returned file is open: one balancer per pin directory. The kernel drops the lock when
/// the process dies, so a crash never leaves the directory locked.
pub(crate) fn lock(dir: &Path) -> Result<std::fs::File, XdpError> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(dir).map_err(io_err("creating the pin directory", dir))?;
    let file = std::fs::File::open(dir).map_err(io_err("opening the pin directory", dir))?;
    // SAFETY: flock only takes the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(XdpError::PinDirBusy {
                dir: dir.to_owned(),
            });
        }
        return Err(io_err("locking the pin directory", dir)(err));
    }
    Ok(file)
}

pub(crate) fn prepare(dir: &Path, expected: &[(&'static str, Geometry)]) -> Result<bool, XdpError> {
    std::fs::create_dir_all(dir).map_err(io_err("creating the pin directory", dir))?;
    let present: Vec<&(&str, Geometry)> = expected
        .iter()
        .filter(|(n, _)| dir.join(n).exists())
        .collect();
    let meta_path = dir.join(META);
    if meta_path.exists() {
        let pinned = read_meta(&meta_path)?;
        if pinned.magic != MAGIC || pinned.layout != PINNED_LAYOUT_VERSION {
            return Err(XdpError::PinnedLayout {
                dir: dir.to_owned(),
                pinned: pinned.layout,
                wanted: PINNED_LAYOUT_VERSION,
            });
        }
    } else if !present.is_empty() {
        // Maps without the version: not ours, or from before versioning.
        return Err(XdpError::PinnedLayout {
            dir: dir.to_owned(),
            pinned: 0,
            wanted: PINNED_LAYOUT_VERSION,
        });
    }
    for (name, want) in &present {
        let got = Geometry::of_pin(name, &dir.join(name))?;
        if let Some((field, pinned, wanted)) = got.difference(want) {
            return Err(XdpError::PinnedMapMismatch {
                map: name,
                dir: dir.to_owned(),
                field,
                pinned: pinned.into(),
                wanted: wanted.into(),
                cause: if field == "max_entries" {
                    sized_by(name)
                } else {
                    "the map's definition changed between builds"
                },
            });
        }
    }
    if !meta_path.exists() {
        // Written first: a load that stops halfway leaves versioned pins behind.
        let mut map = Map::Array(create_array::<PinMeta>(META, 1)?);
        let meta = PinMeta {
            magic: MAGIC,
            layout: PINNED_LAYOUT_VERSION,
        };
        Array::<&mut MapData, PinMeta>::try_from(&mut map)
            .and_then(|mut array| array.set(0, meta, 0))
            .map_err(map_err(META))?;
        map_pin(&map, &meta_path)?;
    }
    Ok(!present.is_empty())
}

fn read_meta(path: &Path) -> Result<PinMeta, XdpError> {
    let data = MapData::from_pin(path).map_err(map_err(META))?;
    let map = Map::from_map_data(data).map_err(map_err(META))?;
    let Ok(array) = Array::<&MapData, PinMeta>::try_from(&map) else {
        // Another value size: another layout.
        return Ok(PinMeta::default());
    };
    array.get(&0, 0).map_err(map_err(META))
}

fn map_pin(map: &Map, path: &Path) -> Result<(), XdpError> {
    map.pin(path)
        .map_err(|e| io_err("pinning", path)(pin_io(e)))
}

/// Creates an array map of `max_entries` values of `V`, named `name` in the kernel.
fn create_array<V>(name: &'static str, max_entries: u32) -> Result<MapData, XdpError> {
    let obj = aya_obj::Map::new_from_params(
        bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
        4,
        size_of::<V>() as u32,
        max_entries,
        0,
    );
    MapData::create(obj, name, None).map_err(map_err(name))
}

/// The userspace state maps of a pinned program.
pub(crate) struct State {
    backend_meta: Map,
    retired: Map,
}

impl State {
    /// Opens the state maps under `dir`, creating and pinning them when missing (their sizes
    /// were checked by [`prepare`]).
    pub(crate) fn open(dir: &Path, options: &LoadOptions) -> Result<Self, XdpError> {
        Ok(Self {
            backend_meta: open_array::<BackendMeta>(dir, BACKEND_META, options.max_backends)?,
            retired: open_array::<Counters>(dir, RETIRED, options.max_services)?,
        })
    }

    /// The weight and position recorded for backend `id` (zero when never recorded).
    pub(crate) fn backend_meta(&self, id: u32) -> Result<BackendMeta, XdpError> {
        let array: Array<&MapData, BackendMeta> =
            Array::try_from(&self.backend_meta).map_err(map_err(BACKEND_META))?;
        array.get(&id, 0).map_err(map_err(BACKEND_META))
    }

    /// Records backend `id`'s weight and position.
    pub(crate) fn set_backend_meta(&mut self, id: u32, meta: BackendMeta) -> Result<(), XdpError> {
        let mut array: Array<&mut MapData, BackendMeta> =
            Array::try_from(&mut self.backend_meta).map_err(map_err(BACKEND_META))?;
        array.set(id, meta, 0).map_err(map_err(BACKEND_META))
    }

    /// What removed backends of service `id` had counted.
    pub(crate) fn retired(&self, id: u32) -> Result<Counters, XdpError> {
        let array: Array<&MapData, Counters> =
            Array::try_from(&self.retired).map_err(map_err(RETIRED))?;
        array.get(&id, 0).map_err(map_err(RETIRED))
    }

    /// Records what removed backends of service `id` had counted.
    pub(crate) fn set_retired(&mut self, id: u32, c: Counters) -> Result<(), XdpError> {
        let mut array: Array<&mut MapData, Counters> =
            Array::try_from(&mut self.retired).map_err(map_err(RETIRED))?;
        array.set(id, c, 0).map_err(map_err(RETIRED))
    }
}

fn open_array<V>(dir: &Path, name: &'static str, max_entries: u32) -> Result<Map, XdpError> {
    let path = dir.join(name);
    if path.exists() {
        let data = MapData::from_pin(&path).map_err(map_err(name))?;
        return Map::from_map_data(data).map_err(map_err(name));
    }
    let map = Map::Array(create_array::<V>(name, max_entries)?);
    map_pin(&map, &path)?;
    Ok(map)
}

/// Where the link of `iface` is pinned.
pub(crate) fn link_path(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("{LINK_PREFIX}{iface}"))
}

/// The interfaces with a pinned link under `dir`.
pub(crate) fn pinned_links(dir: &Path) -> Result<Vec<String>, XdpError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err("listing the pin directory", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_err("listing the pin directory", dir))?;
        if let Some(iface) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix(LINK_PREFIX))
        {
            out.push(iface.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// Removes `path` if it exists.
pub(crate) fn remove(path: &Path) -> Result<(), XdpError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing the pin", path)(e)),
        _ => Ok(()),
    }
}

/// Removes the pinned maps and userspace state under `dir` (not the links).
pub(crate) fn remove_maps(dir: &Path) -> Result<(), XdpError> {
    for name in PINNED_MAPS
        .iter()
        .chain([BACKEND_META, RETIRED, META].iter())
    {
        remove(&dir.join(name))?;
    }
    Ok(())
}

/// Removes the link pins (detaching each link no process holds), the maps and state, and
/// `dir` itself when nothing else is left in it.
pub(crate) fn remove_all(dir: &Path) -> Result<(), XdpError> {
    for iface in pinned_links(dir)? {
        remove(&link_path(dir, &iface))?;
    }
    remove_maps(dir)?;
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        // Something we did not pin lives there: leave it.
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => Ok(()),
        Err(e) => Err(io_err("removing the pin directory", dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_of_the_object_is_either_pinned_or_deliberately_not() {
        let obj = aya_obj::Object::parse(crate::program::program_object()).unwrap();
        for name in obj.maps.keys() {
            assert!(
                PINNED_MAPS.contains(&name.as_str()) || UNPINNED_MAPS.contains(&name.as_str()),
                "map {name} is in neither PINNED_MAPS nor UNPINNED_MAPS: decide whether a \
                 restart must keep it"
            );
        }
        for name in PINNED_MAPS.iter().chain(UNPINNED_MAPS.iter()) {
            assert!(obj.maps.contains_key(*name), "{name} is not in the object");
        }
    }

    #[test]
    fn the_first_difference_names_its_field() {
        let a = Geometry::array::<u32>(10);
        let b = Geometry::array::<u32>(20);
        assert_eq!(a.difference(&b), Some(("max_entries", 10, 20)));
        assert_eq!(a.difference(&a), None);
        let c = Geometry::array::<u64>(10);
        assert_eq!(a.difference(&c), Some(("value size", 4, 8)));
    }

    #[test]
    fn mismatch_hints_name_the_load_option() {
        assert_eq!(
            sized_by(map_name::CONNTRACK),
            "LoadOptions::conntrack_entries"
        );
        assert_eq!(sized_by(map_name::STATS), "fixed by the program");
    }
}
