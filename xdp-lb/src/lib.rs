//! Userspace side of Portico's XDP fast path: loads the XDP program built from `xdp-lb/ebpf`
//! (embedded at build time), attaches it, runs it under `BPF_PROG_TEST_RUN`, reads its maps.

use std::time::Duration;

use aya::{
    maps::PerCpuArray,
    programs::{ProgramError, TestRun, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfError,
};
use portico_xdp_common::{map_name, stat, PROGRAM_NAME};

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
    /// A map is missing from the object or has the wrong type.
    #[error("map {name}: {source}")]
    Map {
        /// Map name in the object.
        name: &'static str,
        /// What went wrong.
        source: aya::maps::MapError,
    },
    /// No interface of that name.
    #[error("interface {0:?} does not exist")]
    NoSuchInterface(String),
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
    fn xdp_mode(self) -> XdpMode {
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
}

/// Portico's XDP program, loaded into the kernel (not yet attached).
pub struct XdpProgram {
    ebpf: Ebpf,
}

impl XdpProgram {
    /// Loads the embedded object and the program into the kernel.
    ///
    /// # Errors
    /// Fails without `CAP_BPF`/root, when the verifier rejects the program, or without BTF.
    pub fn load() -> Result<Self, XdpError> {
        let mut ebpf = Ebpf::load(PROGRAM_OBJECT)?;
        let prog: &mut Xdp = program_mut(&mut ebpf)?;
        prog.load()?;
        Ok(Self { ebpf })
    }

    fn program(&self) -> Result<&Xdp, XdpError> {
        let prog = self
            .ebpf
            .program(PROGRAM_NAME)
            .ok_or(ProgramError::NotLoaded)?;
        Ok(prog.try_into()?)
    }

    /// Attaches to `iface` in `mode`. Detached when `self` is dropped.
    ///
    /// # Errors
    /// Unknown interface, or the driver refuses the mode.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), XdpError> {
        let prog = program_mut(&mut self.ebpf)?;
        match prog.attach(iface, mode.xdp_mode()) {
            Ok(_link) => Ok(()),
            Err(ProgramError::UnknownInterface { name }) => Err(XdpError::NoSuchInterface(name)),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs the program once on `packet` with `BPF_PROG_TEST_RUN` (repeat = 1).
    ///
    /// # Errors
    /// The kernel refuses the run (packet too short or too long, no privileges).
    pub fn test_run(&self, packet: &[u8]) -> Result<TestRunOutput, XdpError> {
        // Room for encapsulation growth at the tail is not needed by XDP (it grows at the head
        // inside the headroom the kernel adds), so the output is at most the input plus slack.
        let mut out = vec![0u8; packet.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..TestRunOptions::new()
        };
        let result = self.program()?.test_run(opts)?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: result.return_value,
            packet: out,
            duration: result.duration,
        })
    }

    /// Reads the global counters, summed over all CPUs.
    ///
    /// # Errors
    /// The stats map is missing or unreadable.
    pub fn stats(&self) -> Result<Stats, XdpError> {
        let map = self.ebpf.map(map_name::STATS).ok_or(XdpError::Map {
            name: map_name::STATS,
            source: aya::maps::MapError::InvalidName {
                name: map_name::STATS.into(),
            },
        })?;
        let array: PerCpuArray<_, u64> =
            PerCpuArray::try_from(map).map_err(|source| XdpError::Map {
                name: map_name::STATS,
                source,
            })?;
        let sum = |idx: u32| -> Result<u64, XdpError> {
            let values = array.get(&idx, 0).map_err(|source| XdpError::Map {
                name: map_name::STATS,
                source,
            })?;
            Ok(values.iter().sum())
        };
        Ok(Stats {
            packets: sum(stat::PACKETS)?,
            bytes: sum(stat::BYTES)?,
        })
    }
}

fn program_mut(ebpf: &mut Ebpf) -> Result<&mut Xdp, XdpError> {
    let prog = ebpf
        .program_mut(PROGRAM_NAME)
        .ok_or(ProgramError::NotLoaded)?;
    Ok(prog.try_into()?)
}
