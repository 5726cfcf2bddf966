//! Throwaway network namespaces.
//!
//! A [`TestNet`] owns every namespace, link and child process a test creates. Names carry a
//! project prefix, the owning process id and a sequence number (`ptc-<pid>-<seq><role>`), so
//! parallel tests never collide, and a sweep at start removes what a crashed run left behind
//! (namespaces whose owning process is gone). Drop — also during a panic — kills the children
//! and deletes the namespaces, which deletes their links with them.

use std::{
    fs::File,
    os::fd::AsRawFd,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, Context as _, Result};

/// Prefix of every namespace Portico's tests create.
pub const PREFIX: &str = "ptc-";

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Fails with a clear message when not running as root (kernel tests need it).
///
/// # Errors
/// The effective uid is not 0.
pub fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (CAP_NET_ADMIN, CAP_BPF); run the test suite as root (make test)");
    }
    Ok(())
}

/// One network namespace, by name. Owned by a [`TestNet`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// A namespace another process created and owns (e.g. a running lab's), by name.
    #[must_use]
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `args` in the namespace and returns its stdout; fails with stderr on non-zero exit.
    ///
    /// # Errors
    /// The command cannot start or exits non-zero.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args.split_first().context("empty command")?;
        let out = self
            .command(program)
            .args(rest)
            .output()
            .with_context(|| format!("starting {args:?} in {}", self.name))?;
        check(&out, &format!("{args:?} in {}", self.name))
    }

    /// Moves the calling thread into this namespace until the guard drops.
    ///
    /// # Errors
    /// The namespace file cannot be opened or `setns` fails.
    pub fn enter(&self) -> Result<NsEnterGuard> {
        let original =
            File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let target = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening netns {}", self.name))?;
        setns(&target).with_context(|| format!("entering netns {}", self.name))?;
        Ok(NsEnterGuard { original })
    }
}

/// Returns the thread to its original namespace on drop.
#[must_use = "the thread leaves the namespace when the guard drops"]
pub struct NsEnterGuard {
    original: File,
}

impl Drop for NsEnterGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original) {
            // Staying in the test namespace would make every later step lie; stop here.
            panic!("returning to the original network namespace failed: {e}");
        }
    }
}

fn setns(file: &File) -> std::io::Result<()> {
    // SAFETY: a valid namespace fd; CLONE_NEWNET restricts it to network namespaces.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn check(out: &Output, what: &str) -> Result<String> {
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    check(&out, &format!("ip {}", args.join(" ")))
}

/// All namespaces and processes of one test; everything is removed on drop.
pub struct TestNet {
    base: String,
    namespaces: Vec<NetNs>,
    children: Vec<Child>,
}

impl TestNet {
    /// Starts a test network: checks root, sweeps leftovers of dead runs, picks a unique base.
    ///
    /// # Errors
    /// Not root, or `ip netns` is unusable.
    pub fn new() -> Result<Self> {
        require_root("a network-namespace test")?;
        sweep_leftovers()?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            base: format!("{PREFIX}{}-{seq}", std::process::id()),
            namespaces: Vec::new(),
            children: Vec::new(),
        })
    }

    /// Creates namespace `<base><role>` with loopback up.
    ///
    /// # Errors
    /// `ip netns add` fails.
    pub fn add_ns(&mut self, role: &str) -> Result<NetNs> {
        let ns = NetNs {
            name: format!("{}{role}", self.base),
        };
        ip(&["netns", "add", &ns.name])?;
        self.namespaces.push(ns.clone());
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Joins `a` and `b` with a veth pair (`a_if` in `a`, `b_if` in `b`), both ends up.
    ///
    /// # Errors
    /// `ip link add` fails.
    pub fn veth(&self, a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) -> Result<()> {
        ip(&[
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ])?;
        a.run(&["ip", "link", "set", a_if, "up"])?;
        b.run(&["ip", "link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Starts `args` inside `ns`; the child is killed and reaped when the test net drops.
    ///
    /// # Errors
    /// The command cannot start.
    pub fn spawn(&mut self, ns: &NetNs, args: &[&str]) -> Result<&mut Child> {
        let (program, rest) = args.split_first().context("empty command")?;
        let child = ns
            .command(program)
            .args(rest)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("spawning {args:?} in {}", ns.name()))?;
        self.children.push(child);
        Ok(self.children.last_mut().expect("just pushed"))
    }

    /// Names of the namespaces this test owns.
    pub fn namespaces(&self) -> impl Iterator<Item = &NetNs> {
        self.namespaces.iter()
    }

    /// The common prefix of this test's namespace names (`ptc-<pid>-<seq>`).
    pub fn base(&self) -> &str {
        &self.base
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in &self.namespaces {
            // Kill anything still running inside (e.g. daemons that forked), then delete.
            let _ = Command::new("ip")
                .args(["netns", "pids", ns.name()])
                .output()
                .map(|out| {
                    for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                        if let Ok(pid) = pid.parse::<i32>() {
                            // SAFETY: plain kill(2) on a pid that lives in our own namespace.
                            unsafe { libc::kill(pid, libc::SIGKILL) };
                        }
                    }
                });
            let _ = ip(&["netns", "del", ns.name()]);
        }
    }
}

/// Deletes `ptc-<pid>-…` namespaces whose owning process no longer exists.
///
/// # Errors
/// `ip netns list` fails.
pub fn sweep_leftovers() -> Result<()> {
    for line in ip(&["netns", "list"])?.lines() {
        let name = line.split_whitespace().next().unwrap_or_default();
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", name]);
        }
    }
    Ok(())
}
