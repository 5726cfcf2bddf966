//! `portico lab up | apply | status | down | demo`: the lab as a command-line tool.
//!
//! The lab outlives the command that starts it, so one process owns it: `portico lab
//! supervise` (started by `up` and `demo`, never by hand) builds the [`Lab`], writes its
//! [`LabHandle`] to `<dir>/lab.json` and waits for SIGTERM, SIGINT or SIGHUP; then it stops
//! every process and deletes every namespace. Its namespaces carry its pid
//! (`ptc-<pid>-…`), so if it is killed outright, the next lab or test run sweeps them.
//! The other commands read `lab.json` and talk to the nodes' admin sockets, BIRD and the
//! router's kernel directly.
//!
//! `demo` runs the owner attached: Ctrl-C reaches it too and it tears the lab down; with
//! `--keep` (and for `up`) it runs in its own session and stays until `portico lab down`.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use crate::progress::{Progress, StepEvent};
use crate::topology::{
    is_dsr_vip, node_of, write_atomically, KernelRoute, Lab, LabHandle, LabOptions, NodeStatus,
    RouterSession, DSR_SERVICES, GUE_PORT, SERVICE_PORT,
};
use crate::traffic::{self, Answer};

/// Where the lab lives unless `--dir` says otherwise.
pub const DEFAULT_DIR: &str = "/run/portico-lab";

/// The file holding the running lab's [`LabHandle`].
pub const HANDLE_FILE: &str = "lab.json";

/// Where `down` keeps the handle of the lab it removed (its logs stay in the folder too).
pub const LAST_HANDLE_FILE: &str = "last-lab.json";

/// How long `up`, `apply` and `demo` wait for sessions, addresses and routes by default.
pub const DEFAULT_CONVERGE: Duration = Duration::from_secs(60);

/// The owner's last words before it waits: the handle is written.
const READY: &str = "READY";

/// The manifests of `deploy/examples/lab/`, built into the binary.
pub const EXAMPLE_MANIFESTS: [(&str, &str); 9] = [
    (
        "00-pool.yaml",
        include_str!("../../deploy/examples/lab/00-pool.yaml"),
    ),
    (
        "10-bgp.yaml",
        include_str!("../../deploy/examples/lab/10-bgp.yaml"),
    ),
    (
        "20-web.yaml",
        include_str!("../../deploy/examples/lab/20-web.yaml"),
    ),
    (
        "30-local.yaml",
        include_str!("../../deploy/examples/lab/30-local.yaml"),
    ),
    (
        "40-v6only.yaml",
        include_str!("../../deploy/examples/lab/40-v6only.yaml"),
    ),
    (
        "50-direct.yaml",
        include_str!("../../deploy/examples/lab/50-direct.yaml"),
    ),
    (
        "60-direct6.yaml",
        include_str!("../../deploy/examples/lab/60-direct6.yaml"),
    ),
    (
        "70-direct-gue.yaml",
        include_str!("../../deploy/examples/lab/70-direct-gue.yaml"),
    ),
    (
        "80-xlat.yaml",
        include_str!("../../deploy/examples/lab/80-xlat.yaml"),
    ),
];

/// The manifests to apply: those in `dir` (`.yaml`, `.yml`, `.json`, not recursive), or
/// the built-in examples.
///
/// # Errors
/// `dir` cannot be read or holds no manifest.
pub fn manifests(dir: Option<&Path>) -> Result<Vec<(String, String)>> {
    let Some(dir) = dir else {
        return Ok(EXAMPLE_MANIFESTS
            .iter()
            .map(|(n, t)| ((*n).to_owned(), (*t).to_owned()))
            .collect());
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.')
            || !entry.file_type()?.is_file()
            || ![".yaml", ".yml", ".json"].iter().any(|e| name.ends_with(e))
        {
            continue;
        }
        let text = std::fs::read_to_string(entry.path())
            .with_context(|| format!("reading {}", entry.path().display()))?;
        out.push((name, text));
    }
    out.sort();
    if out.is_empty() {
        bail!("{} holds no .yaml, .yml or .json file", dir.display());
    }
    Ok(out)
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn request_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// `portico lab supervise`: builds the lab, reports progress as JSON lines on stdout,
/// writes the handle, then holds the lab until SIGTERM, SIGINT or SIGHUP (or until the
/// handle file is deleted) and tears it down.
///
/// # Errors
/// The lab cannot be built (the error was also reported on stdout).
pub fn supervise(dir: &Path) -> Result<()> {
    for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, request_stop as *const () as libc::sighandler_t) };
    }
    let mut progress = Progress::wire(Box::new(std::io::stdout()));
    let lab = Lab::build(
        LabOptions {
            portico: std::env::current_exe().context("finding the portico binary")?,
            dir: dir.to_owned(),
            xdp_mode: "generic".to_owned(),
        },
        &mut progress,
    )?;
    let handle_path = dir.join(HANDLE_FILE);
    write_atomically(&handle_path, &serde_json::to_string_pretty(lab.handle())?)?;
    println!("{READY}");
    // Nothing more goes to stdout: the parent stops reading once it saw READY.
    while !STOP.load(Ordering::SeqCst) && handle_path.exists() {
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("portico lab: tearing down");
    drop(lab);
    let _ = std::fs::remove_file(&handle_path);
    Ok(())
}

/// The running lab's handle in `dir`, if its owner is alive.
///
/// # Errors
/// The handle file exists but does not parse.
pub fn running(dir: &Path) -> Result<Option<LabHandle>> {
    let path = dir.join(HANDLE_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let handle: LabHandle =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    Ok(owner_alive(handle.owner_pid).then_some(handle))
}

/// Whether `pid` is a live `portico lab supervise` process.
fn owner_alive(pid: u32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie (state Z after the command name) has exited already.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    !zombie && args.contains(&&b"lab"[..]) && args.contains(&&b"supervise"[..])
}

/// The owner process of a lab being started.
pub struct Owner {
    child: Option<Child>,
    /// The lab.
    pub handle: LabHandle,
}

/// Starts the lab's owner and relays its progress; returns once the lab is built.
/// `detach`: the owner gets its own session and outlives this process (`up`, `demo
/// --keep`); otherwise it dies with it.
///
/// # Errors
/// A lab already runs in `dir`, or the owner fails to build it (its steps say where).
pub fn start_owner(dir: &Path, detach: bool, progress: &mut Progress) -> Result<Owner> {
    if let Some(h) = running(dir)? {
        bail!(
            "a lab is already up in {} (owner pid {}, namespaces {}*); run `portico lab down` first",
            dir.display(),
            h.owner_pid,
            h.base
        );
    }
    clear_lab_folder(dir)?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("owner.log");
    let log = std::fs::File::create(&log_path)?;
    let mut cmd = Command::new(std::env::current_exe().context("finding the portico binary")?);
    cmd.args(["lab", "supervise", "--dir"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    // SAFETY: setsid and prctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let rc = if detach {
                libc::setsid()
            } else {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM)
            };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting the lab's owner process")?;
    let stdout = child.stdout.take().context("the owner's stdout")?;
    let mut ready = false;
    let mut failure = None;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        if line == READY {
            ready = true;
            break;
        }
        if let Some(StepEvent::Failed { step, error, .. }) = progress.relay(&line) {
            failure = Some(format!("{step}: {error}"));
        }
    }
    if !ready {
        let status = child.wait()?;
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!(
            "the lab could not be built ({}; owner exited with {status}){}",
            failure.unwrap_or_else(|| "no step reported an error".into()),
            if log.trim().is_empty() {
                String::new()
            } else {
                format!("\n--- {} ---\n{}", log_path.display(), log.trim_end())
            }
        );
    }
    let handle = running(dir)?.context("the owner said it is ready but wrote no handle")?;
    Ok(Owner {
        child: (!detach).then_some(child),
        handle,
    })
}

/// What a lab keeps in its folder; nothing else is ever deleted there.
const LAB_ENTRIES: [&str; 9] = [
    "bpf",
    "decap",
    "manifests",
    "n1",
    "n2",
    "owner.log",
    HANDLE_FILE,
    LAST_HANDLE_FILE,
    ".staging",
];

/// Removes what an earlier lab left in `dir`; refuses a folder holding anything else, so a
/// mistyped `--dir` never deletes someone's files.
fn clear_lab_folder(dir: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    let names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    if let Some(other) = names.iter().find(|n| !LAB_ENTRIES.contains(&n.as_str())) {
        bail!(
            "{} holds {other:?}, which is not the lab's: choose an empty or new folder for --dir",
            dir.display()
        );
    }
    // The bpffs of a lab whose owner was killed outright.
    crate::topology::unmount_bpffs(&dir.join("bpf"))?;
    for name in names {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        }
        .with_context(|| format!("removing the old lab's {}", path.display()))?;
    }
    Ok(())
}

/// What `down` found and did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DownReport {
    /// The owner that was stopped, if one ran.
    pub owner_pid: Option<u32>,
    /// Namespaces (and the lab's bpffs) that were left and had to be removed here (should
    /// be none).
    pub swept: Vec<String>,
}

/// Stops the lab in `dir`: SIGTERM to its owner, which tears everything down; then checks
/// that none of its namespaces is left and deletes any that is.
///
/// # Errors
/// The owner does not stop even after SIGKILL, or a namespace cannot be deleted.
pub fn down(dir: &Path, owner: Option<Owner>) -> Result<DownReport> {
    let path = dir.join(HANDLE_FILE);
    let handle: Option<LabHandle> = match owner {
        Some(o) => {
            stop_owner(o.handle.owner_pid, o.child);
            Some(o.handle)
        }
        None => std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok()),
    };
    let mut report = DownReport::default();
    if let Some(h) = &handle {
        report.owner_pid = Some(h.owner_pid);
        if owner_alive(h.owner_pid) {
            stop_owner(h.owner_pid, None);
        }
        if owner_alive(h.owner_pid) {
            bail!("the lab's owner (pid {}) did not stop", h.owner_pid);
        }
        report.swept = sweep(&h.base)?;
        if crate::topology::is_mount_point(&h.bpffs()) {
            crate::topology::unmount_bpffs(&h.bpffs())?;
            report.swept.push(h.bpffs().display().to_string());
        }
    }
    crate::netns::sweep_leftovers()?;
    if let Some(h) = &handle {
        let _ = std::fs::write(dir.join(LAST_HANDLE_FILE), serde_json::to_string_pretty(h)?);
    }
    let _ = std::fs::remove_file(&path);
    Ok(report)
}

/// SIGTERM, up to 30 s for the teardown, then SIGKILL.
fn stop_owner(pid: u32, child: Option<Child>) {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill(2); the pid was checked to be a lab owner (or is our own child).
    unsafe { libc::kill(pid_t, libc::SIGTERM) };
    let gone = |child: &mut Option<Child>| match child {
        Some(c) => matches!(c.try_wait(), Ok(Some(_)) | Err(_)),
        None => !owner_alive(pid),
    };
    let mut child = child;
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if gone(&mut child) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid_t, libc::SIGKILL) };
    if let Some(c) = child.as_mut() {
        let _ = c.wait();
    } else {
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Deletes the namespaces named `<base>…`, killing what runs in them; returns their names.
fn sweep(base: &str) -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    let mut swept = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name.is_empty() || !name.starts_with(base) {
            continue;
        }
        let pids = Command::new("ip").args(["netns", "pids", name]).output()?;
        for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<libc::pid_t>() {
                // SAFETY: kill(2) on a process inside the lab's own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let del = Command::new("ip").args(["netns", "del", name]).output()?;
        if !del.status.success() {
            bail!(
                "deleting namespace {name}: {}",
                String::from_utf8_lossy(&del.stderr)
            );
        }
        swept.push(name.to_owned());
    }
    Ok(swept)
}

/// What `portico lab status` shows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabStatus {
    /// The lab.
    pub handle: LabHandle,
    /// Each node's status, or why it does not answer.
    pub nodes: BTreeMap<String, Result<NodeStatus, String>>,
    /// BIRD's sessions with the nodes.
    pub sessions: Vec<RouterSession>,
    /// The router's BGP routes in its kernel.
    pub routes: Vec<KernelRoute>,
}

/// Looks at the running lab.
///
/// # Errors
/// No lab runs in `dir`, or the router cannot be queried.
pub fn status(dir: &Path) -> Result<LabStatus> {
    let handle = running(dir)?.with_context(|| {
        format!(
            "no lab is up in {} (start one with `portico lab up`)",
            dir.display()
        )
    })?;
    Ok(LabStatus {
        nodes: handle
            .node_statuses()
            .into_iter()
            .map(|(n, s)| (n, s.map_err(|e| format!("{e:#}"))))
            .collect(),
        sessions: handle.router_sessions()?,
        routes: handle.router_routes()?,
        handle,
    })
}

impl LabStatus {
    /// Tables for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let h = &self.handle;
        out.push_str(&format!(
            "lab in {} (owner pid {}, namespaces {}*)\nmanifests: {} (edit; the nodes follow)\n\n",
            h.dir.display(),
            h.owner_pid,
            h.base,
            h.applied_dir().display()
        ));
        out.push_str(&render_services(&self.nodes));
        out.push_str(&render_backend_flows(&self.nodes));
        out.push_str("\nrouter sessions\n");
        for s in &self.sessions {
            out.push_str(&format!("  {:<4} {:<16} {}\n", s.node, s.neighbor, s.state));
        }
        out.push_str("\nrouter routes (BIRD → kernel)\n");
        out.push_str(&render_routes(&self.routes));
        for (node, st) in &self.nodes {
            match st {
                Ok(st) => {
                    for p in &st.problems {
                        out.push_str(&format!("problem on {node}: {p}\n"));
                    }
                }
                Err(e) => out.push_str(&format!("{node}: {e}\n")),
            }
        }
        out
    }
}

fn render_services(nodes: &BTreeMap<String, Result<NodeStatus, String>>) -> String {
    let mut rows: BTreeMap<String, (Vec<IpAddr>, Vec<String>, bool, u64)> = BTreeMap::new();
    for (node, st) in nodes {
        let Ok(st) = st else { continue };
        for s in &st.services {
            let row = rows.entry(s.id()).or_default();
            row.0.clone_from(&s.addresses);
            if s.announced {
                row.1.push(node.clone());
            }
            row.2 = s.local;
            row.3 += s.new_flows;
        }
    }
    let mut out = format!(
        "{:<16} {:<8} {:<34} {:<10} {}\n",
        "service", "policy", "addresses", "announced", "new flows (XDP)"
    );
    for (id, (addrs, by, local, flows)) in rows {
        let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        out.push_str(&format!(
            "{:<16} {:<8} {:<34} {:<10} {}\n",
            id,
            if local { "Local" } else { "Cluster" },
            addrs.join(", "),
            by.join(","),
            flows
        ));
    }
    out
}

/// New flows per backend and node, from the nodes' XDP counters.
fn render_backend_flows(nodes: &BTreeMap<String, Result<NodeStatus, String>>) -> String {
    let mut rows: BTreeMap<(String, String), BTreeMap<String, u64>> = BTreeMap::new();
    for (node, st) in nodes {
        let Ok(st) = st else { continue };
        for s in &st.services {
            for b in &s.backends {
                let name = crate::topology::BACKENDS
                    .iter()
                    .find(|spec| {
                        spec.v4.map(IpAddr::V4) == Some(b.address)
                            || IpAddr::V6(spec.v6) == b.address
                    })
                    .map_or_else(|| b.address.to_string(), |spec| spec.name.to_owned());
                *rows
                    .entry((
                        s.id(),
                        format!("{name} {}", SocketAddr::new(b.address, b.port)),
                    ))
                    .or_default()
                    .entry(node.clone())
                    .or_default() += b.new_flows;
            }
        }
    }
    if rows.is_empty() {
        return String::new();
    }
    let names: Vec<&String> = nodes.keys().collect();
    let mut out = format!(
        "\nnew flows per backend (XDP counters)\n  {:<16} {:<32}",
        "service", "backend"
    );
    for n in &names {
        out.push_str(&format!(" {n:>8}"));
    }
    out.push('\n');
    for ((svc, backend), counts) in rows {
        out.push_str(&format!("  {svc:<16} {backend:<32}"));
        for n in &names {
            out.push_str(&format!(" {:>8}", counts.get(*n).copied().unwrap_or(0)));
        }
        out.push('\n');
    }
    out
}

fn render_routes(routes: &[KernelRoute]) -> String {
    let mut out = String::new();
    for r in routes {
        let hops: Vec<String> = r
            .next_hops
            .iter()
            .zip(r.nodes())
            .map(|(h, n)| format!("{n} ({h})"))
            .collect();
        out.push_str(&format!(
            "  {:<22} {}{}\n",
            r.prefix.to_string(),
            hops.join(", "),
            if r.next_hops.len() > 1 {
                "  [ECMP]"
            } else {
                ""
            }
        ));
    }
    if routes.is_empty() {
        out.push_str("  (none)\n");
    }
    out
}

/// Options of `portico lab demo`.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The lab's folder.
    pub dir: PathBuf,
    /// Manifests to apply (`None`: the built-in examples).
    pub manifests: Option<PathBuf>,
    /// TCP connections, and as many UDP exchanges, per address.
    pub flows: usize,
    /// Leave the lab up.
    pub keep: bool,
    /// Seconds of bulk TCP through one IPv4 and one IPv6 address (0: none).
    pub throughput_secs: u64,
    /// How long to wait for sessions, addresses and routes after applying.
    pub converge: Duration,
}

/// Traffic to one address and protocol, and who served it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FlowRow {
    /// The Service.
    pub service: String,
    /// The address and port.
    pub target: SocketAddr,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// Exchanges answered.
    pub answered: usize,
    /// Exchanges that failed, with the first error.
    pub failed: usize,
    /// The first failure.
    pub first_error: Option<String>,
    /// Answers by the node that carried them (the source address the backend saw).
    pub nodes: BTreeMap<String, usize>,
    /// Answers by backend.
    pub backends: BTreeMap<String, usize>,
}

/// What `portico lab demo` measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DemoReport {
    /// Every step that ran, with its duration in seconds.
    pub steps: Vec<(String, f64)>,
    /// Addresses by Service.
    pub addresses: BTreeMap<String, Vec<IpAddr>>,
    /// The router's routes once converged.
    pub routes: Vec<KernelRoute>,
    /// Traffic per address and protocol.
    pub flows: Vec<FlowRow>,
    /// Bulk TCP through the lab, per address.
    pub throughput: Vec<Throughput>,
    /// A UDP flood through the lab, per address: (Service, address and port, result).
    #[serde(default)]
    pub udp_flood: Vec<(String, SocketAddr, traffic::Flood)>,
    /// Packets each node sent to the DSR Services' backends inside an outer header during
    /// the traffic step (its XDP counter `dsr_encap`, all DSR Services together); the
    /// answers bypass the nodes.
    #[serde(default)]
    pub dsr_encap: BTreeMap<String, u64>,
    /// Per DSR Service that has an address: packets each node balanced for it (and so
    /// encapsulated) during the traffic step.
    #[serde(default)]
    pub dsr: Vec<DsrRow>,
    /// The lab was left up.
    pub kept: bool,
}

/// One direct-server-return Service in the demo.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DsrRow {
    /// The Service.
    pub service: String,
    /// Its address.
    pub vip: IpAddr,
    /// The outer header: `IPIP`, `IP6IP6` or `GUE`.
    pub outer: String,
    /// Packets each node balanced for it (each sent to a backend encapsulated).
    pub packets: BTreeMap<String, u64>,
}

/// Bulk TCP from the client through one address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Throughput {
    /// The Service.
    pub service: String,
    /// The address and port.
    pub target: SocketAddr,
    /// Parallel connections.
    pub streams: usize,
    /// Bytes the backends received on the streams that completed.
    pub bytes: u64,
    /// Seconds from the first connect to the last byte count.
    pub secs: f64,
    /// Streams that broke (reset, timed out), with the error; not counted in `bytes`.
    pub failed: Vec<String>,
}

impl Throughput {
    /// Gbit/s the backends received on the streams that completed, scaled to all streams
    /// (zero when none completed).
    pub fn gbit_per_sec(&self) -> f64 {
        let done = self.streams - self.failed.len();
        if done == 0 {
            return 0.0;
        }
        self.bytes as f64 * 8.0 / self.secs.max(1e-9) / 1e9 * self.streams as f64 / done as f64
    }
}

/// `streams` parallel bulk transfers through `target` for `secs` seconds each; a stream
/// that breaks is recorded, not fatal.
///
/// # Errors
/// A stream's thread cannot run in the client's namespace.
/// Client sockets (flows) of the UDP flood step.
const UDP_FLOOD_FLOWS: usize = 256;
/// Upper bound of datagrams per address in the UDP flood step.
const UDP_FLOOD_MAX: u64 = 5_000_000;

fn bulk(
    client: &crate::NetNs,
    service: &str,
    target: SocketAddr,
    streams: usize,
    secs: u64,
) -> Result<Throughput> {
    let start = Instant::now();
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let client = client.clone();
            std::thread::spawn(move || {
                traffic::in_ns(&client, move || {
                    Ok(traffic::tcp_bulk(target, Duration::from_secs(secs)))
                })
            })
        })
        .collect();
    let mut bytes = 0;
    let mut failed = Vec::new();
    for h in handles {
        match h
            .join()
            .map_err(|_| anyhow::anyhow!("a bulk stream panicked"))??
        {
            Ok(n) => bytes += n,
            Err(e) => failed.push(format!("{e:#}")),
        }
    }
    Ok(Throughput {
        service: service.to_owned(),
        target,
        streams,
        bytes,
        secs: start.elapsed().as_secs_f64(),
        failed,
    })
}

/// Checks root and the tools, and reads the manifests to apply.
fn preflight(
    manifest_dir: Option<&Path>,
    progress: &mut Progress,
) -> Result<Vec<(String, String)>> {
    progress.step("preflight: root, tools, manifests", || {
        crate::require_root("portico lab")?;
        for tool in ["ip", "bridge", "bird", "birdc", "ethtool", "sysctl"] {
            which(tool)?;
        }
        manifests(manifest_dir)
    })
}

/// Applies `files` to the lab and waits until the nodes and the router agree.
fn apply_and_converge(
    handle: &LabHandle,
    files: &[(String, String)],
    converge: Duration,
    progress: &mut Progress,
) -> Result<(BTreeMap<String, NodeStatus>, Vec<KernelRoute>)> {
    progress.step("apply manifests", || handle.apply(files))?;
    let nodes: Vec<&str> = crate::topology::NODES.iter().map(|n| n.name).collect();
    progress.step("BGP sessions, addresses and ECMP routes", || {
        handle.wait_converged(&nodes, converge)
    })
}

/// `portico lab up`: builds the lab in `dir` with an owner that outlives this process,
/// applies the manifests (`manifest_dir`, or the built-in examples) and waits for the
/// routes. A failure tears the lab down again.
///
/// # Errors
/// A step fails; the error names it.
pub fn up(
    dir: &Path,
    manifest_dir: Option<&Path>,
    converge: Duration,
    progress: &mut Progress,
) -> Result<LabStatus> {
    let files = preflight(manifest_dir, progress)?;
    let owner = start_owner(dir, true, progress)?;
    match apply_and_converge(&owner.handle, &files, converge, progress).and_then(|_| status(dir)) {
        Ok(s) => Ok(s),
        Err(e) => {
            let _ = progress.step("tear down after the failure", || {
                down(dir, Some(owner)).map(drop)
            });
            Err(e)
        }
    }
}

/// `portico lab apply`: replaces the running lab's manifests (`manifest_dir`, or the
/// built-in examples) and waits until the nodes and the router agree again.
///
/// # Errors
/// No lab runs, or a step fails.
pub fn apply(
    dir: &Path,
    manifest_dir: Option<&Path>,
    progress: &mut Progress,
) -> Result<LabStatus> {
    let handle = running(dir)?.with_context(|| {
        format!(
            "no lab is up in {} (start one with `portico lab up`)",
            dir.display()
        )
    })?;
    let files = progress.step("read manifests", || manifests(manifest_dir))?;
    apply_and_converge(&handle, &files, DEFAULT_CONVERGE, progress)?;
    status(dir)
}

/// `portico lab demo`: up, apply, wait for the routes, traffic to every address, tables,
/// down (unless `keep`). Any failure names its step and tears the lab down.
///
/// # Errors
/// A step fails; the error names it.
pub fn demo(opts: &DemoOptions, progress: &mut Progress) -> Result<DemoReport> {
    let files = preflight(opts.manifests.as_deref(), progress)?;
    let owner = start_owner(&opts.dir, opts.keep, progress)?;
    let handle = owner.handle.clone();
    let result = demo_on(&handle, &files, opts, progress);
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = progress.step("tear down after the failure", || {
                down(&opts.dir, Some(owner)).map(drop)
            });
            return Err(e);
        }
    };
    if opts.keep {
        progress.note(&format!(
            "the lab stays up: `portico lab status`, edit {}, `portico lab down`",
            handle.applied_dir().display()
        ));
        report.kept = true;
        // Detached: the owner is not our child and keeps running.
        drop(owner);
    } else {
        progress.step("tear down", || {
            let r = down(&opts.dir, Some(owner))?;
            if !r.swept.is_empty() {
                bail!("namespaces were left behind and deleted: {:?}", r.swept);
            }
            Ok(())
        })?;
    }
    report.steps = progress
        .steps()
        .iter()
        .map(|(s, d)| (s.clone(), (d.as_secs_f64() * 1000.0).round() / 1000.0))
        .collect();
    Ok(report)
}

fn demo_on(
    handle: &LabHandle,
    files: &[(String, String)],
    opts: &DemoOptions,
    progress: &mut Progress,
) -> Result<DemoReport> {
    let (statuses, routes) = apply_and_converge(handle, files, opts.converge, progress)?;
    let mut report = DemoReport {
        routes,
        ..DemoReport::default()
    };
    // Ready backends per Service, as its nodes count them (the most any node sees).
    let mut ready: BTreeMap<String, usize> = BTreeMap::new();
    for st in statuses.values() {
        for s in &st.services {
            report.addresses.insert(s.id(), s.addresses.clone());
            let n = ready.entry(s.id()).or_default();
            *n = (*n).max(s.backends_ready);
        }
    }
    let client = handle.ns("client")?;
    let dsr_before = dsr_encap_counts(handle);
    let packets_before = service_packets(handle);
    report.flows = progress.step("traffic from the client to every address", || {
        let mut rows = Vec::new();
        for (service, addrs) in &report.addresses {
            for ip in addrs {
                let target = SocketAddr::new(*ip, SERVICE_PORT);
                for (protocol, exchange) in [
                    ("tcp", traffic::tcp_who as fn(SocketAddr) -> Result<Answer>),
                    ("udp", traffic::udp_who),
                ] {
                    let answers = traffic::answers(
                        &client,
                        target,
                        opts.flows,
                        4,
                        Duration::from_secs(120),
                        exchange,
                    )?;
                    rows.push(tally(service, target, protocol, &answers));
                }
            }
        }
        let failed: Vec<String> = rows
            .iter()
            .filter(|r| r.failed > 0)
            .map(|r| {
                format!(
                    "{} {}/{}: {} of {} failed, first: {}",
                    r.service,
                    r.target,
                    r.protocol,
                    r.failed,
                    r.failed + r.answered,
                    r.first_error.as_deref().unwrap_or("")
                )
            })
            .collect();
        if !failed.is_empty() {
            bail!(
                "{} (XDP counters {})",
                failed.join("; "),
                handle.datapath_exceptions()
            );
        }
        Ok(rows)
    })?;
    if report.addresses.values().flatten().any(|a| is_dsr_vip(*a)) {
        report.dsr_encap = dsr_encap_counts(handle)
            .into_iter()
            .map(|(node, n)| {
                let before = dsr_before.get(&node).copied().unwrap_or(0);
                (node, n.saturating_sub(before))
            })
            .collect();
        let packets_after = service_packets(handle);
        report.dsr = DSR_SERVICES
            .iter()
            .filter(|d| {
                report
                    .addresses
                    .get(d.service)
                    .is_some_and(|a| a.contains(&d.vip))
            })
            .map(|d| DsrRow {
                service: d.service.to_owned(),
                vip: d.vip,
                outer: d.outer().to_owned(),
                packets: packets_after
                    .iter()
                    .filter_map(|((node, svc), n)| {
                        let before = packets_before.get(&(node.clone(), svc.clone()));
                        (svc == d.service)
                            .then(|| (node.clone(), n.saturating_sub(before.copied().unwrap_or(0))))
                    })
                    .collect(),
            })
            .collect();
    }
    if opts.throughput_secs > 0 {
        // Per family, the address routed over the most nodes (ECMP), then of the Service
        // with the most ready backends (demo/web: the streams spread over the most
        // backends, and no NAT46/64 translation), first by name on ties.
        let hops = |a: &IpAddr| {
            report
                .routes
                .iter()
                .find(|r| r.prefix == ipnet::IpNet::from(*a))
                .map_or(0, |r| r.next_hops.len())
        };
        let targets: Vec<(String, IpAddr)> = [false, true]
            .into_iter()
            .filter_map(|v6| {
                report
                    .addresses
                    .iter()
                    .flat_map(|(svc, addrs)| addrs.iter().map(move |a| (svc.clone(), *a)))
                    // Through the nodes both ways: not the DSR addresses, whose answers
                    // go around them (and whose outer headers need 20 to 48 bytes of MTU
                    // more).
                    .filter(|(_, a)| a.is_ipv6() == v6 && !is_dsr_vip(*a))
                    .max_by_key(|(svc, a)| {
                        (
                            hops(a),
                            ready.get(svc).copied().unwrap_or(0),
                            std::cmp::Reverse(svc.clone()),
                        )
                    })
            })
            .collect();
        let resets_before = handle.tcp_resets_sent();
        report.throughput = progress.step("throughput: bulk TCP through the lab", || {
            targets
                .iter()
                .map(|(svc, ip)| {
                    bulk(
                        &client,
                        svc,
                        SocketAddr::new(*ip, SERVICE_PORT),
                        4,
                        opts.throughput_secs,
                    )
                })
                .collect()
        })?;
        report.udp_flood = progress.step("throughput: UDP flood through the lab", || {
            targets
                .iter()
                .map(|(svc, ip)| {
                    let target = SocketAddr::new(*ip, SERVICE_PORT);
                    let secs = opts.throughput_secs.min(2);
                    let flood = traffic::in_ns(&client, move || {
                        traffic::udp_flood(
                            target,
                            UDP_FLOOD_FLOWS,
                            Duration::from_secs(secs),
                            UDP_FLOOD_MAX,
                        )
                    })?;
                    Ok((svc.clone(), target, flood))
                })
                .collect::<Result<Vec<_>>>()
        })?;
        // A stream that breaks is a datapath anomaly worth seeing, not a reason to throw
        // the measurement away: say which host sent the reset and what XDP counted.
        for t in report.throughput.iter().filter(|t| !t.failed.is_empty()) {
            let sent: Vec<String> = handle
                .tcp_resets_sent()
                .iter()
                .map(|(host, n)| (host, n - resets_before.get(host).copied().unwrap_or(0)))
                .filter(|(_, n)| *n > 0)
                .map(|(host, n)| format!("{host}={n}"))
                .collect();
            progress.note(&format!(
                "WARNING: {} of {} bulk streams to {} broke: {}; TCP resets sent during the step: {}; XDP counters {}",
                t.failed.len(),
                t.streams,
                t.target,
                t.failed.join("; "),
                if sent.is_empty() { "none".to_owned() } else { sent.join(" ") },
                handle.datapath_exceptions()
            ));
        }
    }
    Ok(report)
}

/// Every answering node's packets per Service: (node, `namespace/name`) → packets.
fn service_packets(handle: &LabHandle) -> BTreeMap<(String, String), u64> {
    handle
        .node_statuses()
        .into_iter()
        .filter_map(|(node, st)| Some((node, st.ok()?)))
        .flat_map(|(node, st)| {
            st.services
                .into_iter()
                .map(move |s| ((node.clone(), s.id()), s.packets))
        })
        .collect()
}

/// Every answering node's `dsr_encap` XDP counter.
fn dsr_encap_counts(handle: &LabHandle) -> BTreeMap<String, u64> {
    handle
        .node_statuses()
        .into_iter()
        .filter_map(|(node, st)| {
            let st = st.ok()?;
            let n = st.datapath.iter().find(|(k, _)| k == "dsr_encap")?.1;
            Some((node, n))
        })
        .collect()
}

fn tally(
    service: &str,
    target: SocketAddr,
    protocol: &str,
    answers: &[Result<Answer, String>],
) -> FlowRow {
    let mut row = FlowRow {
        service: service.to_owned(),
        target,
        protocol: protocol.to_owned(),
        answered: 0,
        failed: 0,
        first_error: None,
        nodes: BTreeMap::new(),
        backends: BTreeMap::new(),
    };
    for a in answers {
        match a {
            Ok(a) => {
                row.answered += 1;
                *row.backends.entry(a.backend.clone()).or_default() += 1;
                let node = node_of(a.seen_from.ip()).map_or_else(
                    || format!("{} (not SNATed)", a.seen_from.ip()),
                    |n| n.name.to_owned(),
                );
                *row.nodes.entry(node).or_default() += 1;
            }
            Err(e) => {
                row.failed += 1;
                if row.first_error.is_none() {
                    row.first_error = Some(e.clone());
                }
            }
        }
    }
    row
}

impl DemoReport {
    /// The tables: addresses, the router's ECMP routes, hits per node and per backend.
    pub fn render(&self) -> String {
        let mut out = String::from("\nallocated addresses\n");
        for (service, addrs) in &self.addresses {
            let addrs: Vec<String> = addrs.iter().map(ToString::to_string).collect();
            out.push_str(&format!("  {:<16} {}\n", service, addrs.join(", ")));
        }
        out.push_str("\nrouter routes (BIRD → kernel, next hop = node)\n");
        out.push_str(&render_routes(&self.routes));
        let mut node_names: Vec<String> = self
            .flows
            .iter()
            .flat_map(|f| f.nodes.keys().cloned())
            .collect();
        node_names.sort();
        node_names.dedup();
        let mut backend_names: Vec<String> = self
            .flows
            .iter()
            .flat_map(|f| f.backends.keys().cloned())
            .collect();
        backend_names.sort();
        backend_names.dedup();
        for (title, names, pick) in [
            (
                "hits per node (the node whose address the backend saw)",
                &node_names,
                (|f: &FlowRow| &f.nodes) as fn(&FlowRow) -> &BTreeMap<String, usize>,
            ),
            ("hits per backend", &backend_names, |f: &FlowRow| {
                &f.backends
            }),
        ] {
            out.push_str(&format!("\n{title}\n"));
            out.push_str(&format!(
                "  {:<16} {:<28} {:<5}",
                "service", "address", "proto"
            ));
            for n in names {
                out.push_str(&format!(" {n:>6}"));
            }
            out.push('\n');
            for f in &self.flows {
                out.push_str(&format!(
                    "  {:<16} {:<28} {:<5}",
                    f.service,
                    f.target.to_string(),
                    f.protocol
                ));
                for n in names {
                    let hits = pick(f).get(n).copied().unwrap_or(0);
                    // As wide as the column's name ("198.18.0.1 (not SNATed)" is long).
                    out.push_str(&format!(" {hits:>width$}", width = n.len().max(6)));
                }
                out.push('\n');
            }
        }
        if !self.dsr_encap.is_empty() {
            out.push_str(&self.render_dsr());
        }
        if !self.throughput.is_empty() {
            out.push_str("\nthroughput: bulk TCP, client → router → node (XDP) → backend\n");
            for t in &self.throughput {
                out.push_str(&format!(
                    "  {:<16} {:<28} {} streams, {:.1} s: {:.2} Gbit/s{}\n",
                    t.service,
                    t.target.to_string(),
                    t.streams,
                    t.secs,
                    t.gbit_per_sec(),
                    if t.failed.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} streams broke; see the warning above)", t.failed.len())
                    }
                ));
            }
        }
        if !self.udp_flood.is_empty() {
            out.push_str(
                "\nthroughput: UDP flood, 32-byte datagrams, each answered by the backend \
                 (request and answer both through XDP)\n",
            );
            for (svc, target, f) in &self.udp_flood {
                out.push_str(&format!(
                    "  {:<16} {:<28} {} flows, {:.1} s: sent {:.0}/s, answered {:.0}/s ({:.1} %)\n",
                    svc,
                    target.to_string(),
                    f.flows,
                    f.secs,
                    f.sent_per_sec(),
                    f.answered_per_sec(),
                    100.0 * f.answered as f64 / (f.sent.max(1)) as f64,
                ));
            }
        }
        out
    }

    /// The direct-server-return table: per DSR Service its outer header and the packets
    /// each node encapsulated, then the nodes' `dsr_encap` counters.
    fn render_dsr(&self) -> String {
        let nodes: Vec<&String> = self.dsr_encap.keys().collect();
        let mut out = String::from(
            "\ndirect server return: client → router → node (XDP encapsulates) → backend \
             (portico decap); answers backend → router → client\n",
        );
        out.push_str(&format!(
            "  {:<16} {:<28} {:<16}",
            "service", "address", "outer header"
        ));
        for n in &nodes {
            out.push_str(&format!(" {n:>6}"));
        }
        out.push('\n');
        for d in &self.dsr {
            let outer = if d.outer == "GUE" {
                format!("GUE (UDP {GUE_PORT})")
            } else {
                d.outer.clone()
            };
            out.push_str(&format!(
                "  {:<16} {:<28} {:<16}",
                d.service,
                d.vip.to_string(),
                outer
            ));
            for n in &nodes {
                out.push_str(&format!(
                    " {:>6}",
                    d.packets.get(n.as_str()).copied().unwrap_or(0)
                ));
            }
            out.push('\n');
        }
        let per_node: Vec<String> = self
            .dsr_encap
            .iter()
            .map(|(node, n)| format!("{node} {n}"))
            .collect();
        out.push_str(&format!(
            "  packets encapsulated per node, all DSR Services (dsr_encap): {}\n",
            per_node.join(", ")
        ));
        out
    }

    /// The one-line JSON summary.
    pub fn to_json(&self, seconds: f64) -> serde_json::Value {
        serde_json::json!({
            "ok": true,
            "seconds": (seconds * 10.0).round() / 10.0,
            "steps": self.steps.iter().map(|(s, d)| (s.clone(), *d)).collect::<BTreeMap<_, _>>(),
            "addresses": self.addresses,
            "routes": self.routes.iter().map(|r| (r.prefix.to_string(), r.nodes())).collect::<BTreeMap<_, _>>(),
            "flows": self.flows.iter().map(|f| serde_json::json!({
                "service": f.service,
                "target": f.target.to_string(),
                "protocol": f.protocol,
                "answered": f.answered,
                "failed": f.failed,
                "nodes": f.nodes,
                "backends": f.backends,
            })).collect::<Vec<_>>(),
            "throughput_gbps": self.throughput.iter().map(|t| (t.target.to_string(), (t.gbit_per_sec() * 100.0).round() / 100.0)).collect::<BTreeMap<_, _>>(),
            "throughput_broken_streams": self.throughput.iter().map(|t| t.failed.len()).sum::<usize>(),
            "udp_answered_pps": self.udp_flood.iter().map(|(_, t, f)| (t.to_string(), f.answered_per_sec().round())).collect::<BTreeMap<_, _>>(),
            "udp_sent_pps": self.udp_flood.iter().map(|(_, t, f)| (t.to_string(), f.sent_per_sec().round())).collect::<BTreeMap<_, _>>(),
            "dsr_encap": self.dsr_encap,
            "dsr": self.dsr.iter().map(|d| (d.service.clone(), serde_json::json!({
                "vip": d.vip,
                "outer": d.outer,
                "packets": d.packets,
            }))).collect::<BTreeMap<_, _>>(),
            "kept": self.kept,
        })
    }
}

/// Fails when `tool` is not on the PATH.
fn which(tool: &str) -> Result<()> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|d| d.join(tool).is_file());
    if !found {
        bail!("{tool} is missing: run scripts/bootstrap.sh (Debian packages iproute2, bird2, ethtool, procps)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_manifests_are_exactly_the_example_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/lab");
        let on_disk = manifests(Some(&dir)).unwrap();
        let built_in = manifests(None).unwrap();
        assert_eq!(
            on_disk, built_in,
            "update EXAMPLE_MANIFESTS in lab/src/control.rs"
        );
    }

    #[test]
    fn every_dsr_service_of_the_lab_is_in_the_manifests_as_the_backends_expect() {
        // The backends hold each VIP on lo before any manifest is applied, so the manifest
        // must ask for exactly that address and encapsulation.
        for d in DSR_SERVICES {
            let (namespace, name) = d.service.split_once('/').unwrap();
            let (file, text) = EXAMPLE_MANIFESTS
                .iter()
                .find(|(_, t)| t.contains(&format!("  name: {name}\n  namespace: {namespace}\n")))
                .unwrap_or_else(|| panic!("no manifest defines {}", d.service));
            for want in [
                "portico.io/forwarding-mode: dsr".to_owned(),
                format!(
                    "portico.io/dsr-encapsulation: {}",
                    d.encapsulation.annotation()
                ),
                format!("loadBalancerIP: {}", d.vip),
            ] {
                assert!(text.contains(&want), "{file} lacks {want:?}");
            }
        }
    }

    #[test]
    fn the_demo_shows_every_dsr_service_with_its_outer_header_and_packets_per_node() {
        let report = DemoReport {
            dsr_encap: [("n1".to_owned(), 7), ("n2".to_owned(), 5)].into(),
            dsr: DSR_SERVICES
                .iter()
                .map(|d| DsrRow {
                    service: d.service.to_owned(),
                    vip: d.vip,
                    outer: d.outer().to_owned(),
                    packets: [("n1".to_owned(), 3), ("n2".to_owned(), 1)].into(),
                })
                .collect(),
            ..DemoReport::default()
        };
        let text = report.render();
        for want in [
            "demo/direct      203.0.113.14                 IPIP                  3      1",
            "demo/direct6     fd00:203::e                  IP6IP6                3      1",
            "demo/direct-gue  203.0.113.13                 GUE (UDP 6080)        3      1",
            "(dsr_encap): n1 7, n2 5",
        ] {
            assert!(text.contains(want), "{want:?} missing from\n{text}");
        }
    }

    #[test]
    fn an_old_lab_folder_is_cleared_but_a_foreign_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("manifests/lab")).unwrap();
        std::fs::write(dir.path().join("owner.log"), "x").unwrap();
        clear_lab_folder(dir.path()).unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        let err = clear_lab_folder(dir.path()).unwrap_err();
        assert!(format!("{err}").contains("\"notes.txt\""), "{err}");
        assert!(dir.path().join("notes.txt").exists());
        clear_lab_folder(&dir.path().join("missing")).unwrap();
    }

    #[test]
    fn answers_tally_by_node_and_backend() {
        let answers = vec![
            Ok(Answer::parse("be1 198.18.1.11:20000").unwrap()),
            Ok(Answer::parse("be2 198.18.1.12:20000").unwrap()),
            Ok(Answer::parse("be2 198.18.0.1:40000").unwrap()),
            Err("timed out".to_owned()),
        ];
        let row = tally(
            "demo/web",
            "203.0.113.1:80".parse().unwrap(),
            "tcp",
            &answers,
        );
        assert_eq!(row.answered, 3);
        assert_eq!(row.failed, 1);
        assert_eq!(row.first_error.as_deref(), Some("timed out"));
        assert_eq!(row.backends["be2"], 2);
        assert_eq!(row.nodes["n1"], 1);
        assert_eq!(row.nodes["198.18.0.1 (not SNATed)"], 1);
    }
}
