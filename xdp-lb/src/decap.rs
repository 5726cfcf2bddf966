//! Loader of the backends' decapsulation program (`xdp-lb/ebpf/src/decap.rs`, its own
//! object): for direct server return, a backend strips the outer header (IPIP, 6in4, 4in6,
//! IP6IP6 or GUE) that a balancer put around a client's packet, so its stack sees the
//! client's packet to the VIP and answers the client directly. It needs no tunnel module
//! (this kernel and many hosts have none).

use std::net::IpAddr;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::Xdp,
    Ebpf,
};
use portico_xdp_common::{decap, Addr};

use crate::program::{map_err, run_once, AttachMode, TestRunOutput, XdpError};

static DECAP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/portico-decap"));

/// What a backend decapsulates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecapConfig {
    /// This host's tunnel addresses: outer destinations it accepts.
    pub local: Vec<IpAddr>,
    /// The balancers: outer sources it accepts.
    pub peers: Vec<IpAddr>,
    /// UDP port of GUE (variant 1, the payload is the inner IP packet); `None`: no GUE.
    pub gue_port: Option<u16>,
}

/// The loaded decapsulation program.
pub struct Decap {
    ebpf: Ebpf,
}

fn key(a: IpAddr) -> Addr {
    match a {
        IpAddr::V4(v4) => [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            [w(0), w(4), w(8), w(12)]
        }
    }
}

impl Decap {
    /// Loads the program and writes `config` into its maps.
    ///
    /// # Errors
    /// The object does not load (no root, no BPF), or a map cannot be written.
    pub fn load(config: &DecapConfig) -> Result<Self, XdpError> {
        let mut ebpf = Ebpf::load(DECAP_OBJECT)?;
        {
            let prog: &mut Xdp = ebpf
                .program_mut(decap::PROGRAM_NAME)
                .ok_or(aya::programs::ProgramError::NotLoaded)?
                .try_into()?;
            crate::program::load_retrying(prog)?;
        }
        let mut d = Self { ebpf };
        d.configure(config)?;
        Ok(d)
    }

    /// Replaces the addresses and the GUE port.
    ///
    /// # Errors
    /// A map cannot be written (more than 64 local addresses or 1,024 peers).
    pub fn configure(&mut self, config: &DecapConfig) -> Result<(), XdpError> {
        for (name, addrs) in [
            ("DECAP_LOCAL", &config.local),
            ("DECAP_PEERS", &config.peers),
        ] {
            let map = self
                .ebpf
                .map_mut(name)
                .ok_or_else(|| crate::program::no_such_map(name))?;
            let mut m: HashMap<&mut MapData, Addr, u32> =
                HashMap::try_from(map).map_err(map_err(name))?;
            let old: Vec<Addr> = m.keys().filter_map(Result::ok).collect();
            for k in old {
                m.remove(&k).map_err(map_err(name))?;
            }
            for a in addrs {
                m.insert(key(*a), 1, 0).map_err(map_err(name))?;
            }
        }
        let name = "DECAP_CONFIG";
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or_else(|| crate::program::no_such_map(name))?;
        let mut cfg: Array<&mut MapData, u32> = Array::try_from(map).map_err(map_err(name))?;
        let port = config
            .gue_port
            .map_or(0, |p| u32::from(u16::from_ne_bytes(p.to_be_bytes())));
        cfg.set(0, port, 0).map_err(map_err(name))?;
        Ok(())
    }

    fn program(&self) -> Result<&Xdp, XdpError> {
        Ok(self
            .ebpf
            .program(decap::PROGRAM_NAME)
            .ok_or(aya::programs::ProgramError::NotLoaded)?
            .try_into()?)
    }

    /// Attaches to `iface` (the backend's interface toward the balancers) until dropped.
    ///
    /// # Errors
    /// No such interface, or the kernel refuses the attachment.
    pub fn attach(&mut self, iface: &str, mode: AttachMode) -> Result<(), XdpError> {
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(decap::PROGRAM_NAME)
            .ok_or(aya::programs::ProgramError::NotLoaded)?
            .try_into()?;
        match prog.attach(iface, mode.xdp_mode()) {
            Ok(_link) => Ok(()),
            Err(aya::programs::ProgramError::UnknownInterface { name }) => {
                Err(XdpError::NoSuchInterface(name))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs the program once on `packet` (BPF_PROG_TEST_RUN).
    ///
    /// # Errors
    /// The kernel refuses the run.
    pub fn test_run(&self, packet: &[u8]) -> Result<TestRunOutput, XdpError> {
        run_once(self.program()?, packet, None)
    }

    /// The counters by name ([`decap::NAMES`]), summed over CPUs.
    ///
    /// # Errors
    /// The counters cannot be read.
    pub fn counters(&self) -> Result<Vec<(&'static str, u64)>, XdpError> {
        let name = "DECAP_STATS";
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| crate::program::no_such_map(name))?;
        let stats: PerCpuArray<&MapData, u64> =
            PerCpuArray::try_from(map).map_err(map_err(name))?;
        let mut out = Vec::new();
        for (i, n) in decap::NAMES.iter().enumerate() {
            let v = stats.get(&(i as u32), 0).map_err(map_err(name))?;
            out.push((*n, v.iter().sum()));
        }
        Ok(out)
    }
}
