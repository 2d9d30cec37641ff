//! Network namespaces the lab creates, owns and always removes.
//!
//! Every lab records what it creates under `/run/holdfast-lab/<id>/` before creating it: its
//! owner's pid and each namespace name. Cleanup (on drop, on Ctrl-C, or by `lab down` for a lab
//! whose owner died) removes exactly what the record names, and a namespace that already exists
//! is never adopted: the lab refuses to touch what it did not create.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub const MARKER_ROOT: &str = "/run/holdfast-lab";
const NAMESPACES: &str = "namespaces";
const OWNER: &str = "owner";

/// Markers of the labs alive in this process, for the Ctrl-C handler.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Whether the lab can run here; says why not on stderr (tests skip rather than fail).
pub fn have_root() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: the lab needs root (network namespaces, TUN)");
        return false;
    }
    true
}

/// Runs a command and fails with its output when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| {
        format!("cannot run {cmd:?} (is it installed? scripts/install-deps.sh)")
    })?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

fn existing_namespaces() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if cond() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// A set of namespaces and the processes started in them.
pub struct Netns {
    id: String,
    marker: PathBuf,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    /// Where configs and process logs go.
    pub dir: PathBuf,
}

impl Netns {
    /// Starts an empty lab; `HOLDFAST_LAB_DIR` overrides where its files go.
    pub fn new() -> Result<Self> {
        if unsafe { libc::geteuid() } != 0 {
            bail!("the lab needs root (network namespaces, TUN devices)");
        }
        // Short, so that "<id>-<role>" stays a readable namespace name.
        let id = format!(
            "hf{:x}{:x}",
            std::process::id() & 0xffff,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let marker = Path::new(MARKER_ROOT).join(&id);
        if marker.exists() {
            bail!("{} exists: another lab has id {id}", marker.display());
        }
        fs::create_dir_all(&marker)
            .with_context(|| format!("cannot create {}", marker.display()))?;
        fs::write(marker.join(OWNER), std::process::id().to_string())?;
        let dir = std::env::var_os("HOLDFAST_LAB_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("holdfast-lab-{id}"));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::write(marker.join("workdir"), dir.display().to_string())?;
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(marker.clone());
        Ok(Self {
            id,
            marker,
            namespaces: Vec::new(),
            children: Vec::new(),
            dir,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The full namespace name of `role`.
    pub fn ns(&self, role: &str) -> String {
        format!("{}-{role}", self.id)
    }

    /// Creates namespace `role` with loopback up.
    pub fn add(&mut self, role: &str) -> Result<String> {
        let name = self.ns(role);
        if existing_namespaces()?.contains(&name) {
            bail!("namespace {name} already exists and is not this lab's: refusing to touch it");
        }
        // Record first: if creation half-succeeds, cleanup still knows the name.
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.marker.join(NAMESPACES))?;
        writeln!(f, "{name}")?;
        ip(&["netns", "add", &name])?;
        self.namespaces.push(name.clone());
        self.exec(role, &["ip", "link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// A veth pair between two namespaces, created directly inside them (never in the host's
    /// namespace), addressed and up. Addresses are in CIDR form, e.g. "10.0.1.2/24".
    pub fn link(&self, a: (&str, &str, &str), b: (&str, &str, &str)) -> Result<()> {
        let (a_role, a_if, a_addr) = a;
        let (b_role, b_if, b_addr) = b;
        let (a_ns, b_ns) = (self.ns(a_role), self.ns(b_role));
        ip(&[
            "link", "add", "name", a_if, "netns", &a_ns, "type", "veth", "peer", "name", b_if,
            "netns", &b_ns,
        ])?;
        for (role, ifname, addr) in [(a_role, a_if, a_addr), (b_role, b_if, b_addr)] {
            self.exec(role, &["ip", "addr", "add", addr, "dev", ifname])?;
            self.exec(role, &["ip", "link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// A command line run inside namespace `role`.
    pub fn command(&self, role: &str, argv: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(role)]).args(argv);
        cmd
    }

    /// Runs `argv` in `role` and fails if it fails.
    pub fn exec(&self, role: &str, argv: &[&str]) -> Result<Output> {
        run(&mut self.command(role, argv))
    }

    /// Runs `argv` in `role`, returning its output whatever its exit status.
    pub fn try_exec(&self, role: &str, argv: &[&str]) -> Result<Output> {
        self.command(role, argv)
            .output()
            .with_context(|| format!("cannot run {argv:?}"))
    }

    /// Starts a long-running process in `role`; its output goes to `<dir>/<name>.log`.
    pub fn spawn(
        &mut self,
        role: &str,
        name: &str,
        argv: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let log = self.log_path(name);
        let out = fs::File::create(&log)?;
        let mut cmd = self.command(role, argv);
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {argv:?} in {role}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    /// Sends `signal` to the process started as `name` (and what `ip netns exec` ran).
    pub fn signal(&mut self, name: &str, signal: libc::c_int) -> Result<()> {
        let Some((_, child)) = self.children.iter_mut().find(|(n, _)| n == name) else {
            bail!("no process named {name} in this lab");
        };
        // `ip netns exec` execs the command, so the child's pid is the command's pid.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        Ok(())
    }

    /// Stops `name` with `signal` and waits for it to exit.
    pub fn stop(&mut self, name: &str, signal: libc::c_int) -> Result<()> {
        self.signal(name, signal)?;
        let index = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| anyhow!("no process named {name}"))?;
        let (_, mut child) = self.children.remove(index);
        let start = Instant::now();
        while child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(5) {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The pid of the process started as `name`.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// Whether the process started as `name` is still running.
    pub fn running(&mut self, name: &str) -> bool {
        self.children
            .iter_mut()
            .find(|(n, _)| n == name)
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// Every process log of this lab, for a failure report.
    pub fn logs(&self) -> String {
        let mut names: Vec<String> = fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter_map(|n| n.strip_suffix(".log").map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let mut out = String::new();
        for name in names {
            let text = fs::read_to_string(self.log_path(&name)).unwrap_or_default();
            out.push_str(&format!("----- {name}.log -----\n{text}\n"));
        }
        out
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        cleanup(&self.marker);
        LIVE.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|m| m != &self.marker);
        if std::env::var_os("HOLDFAST_LAB_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Removes what the marker at `marker` records: kills every process in its namespaces, deletes
/// them, then the marker. Never touches a namespace the marker does not name.
pub fn cleanup(marker: &Path) {
    let names = fs::read_to_string(marker.join(NAMESPACES)).unwrap_or_default();
    for ns in names.lines().filter(|l| !l.is_empty()) {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<libc::pid_t>() {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    let _ = fs::remove_dir_all(marker);
}

/// Cleans every lab of this process; for the Ctrl-C handler.
pub fn cleanup_live() {
    let markers: Vec<PathBuf> = LIVE.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for m in markers {
        cleanup(&m);
    }
}

/// Removes labs whose owner process is gone; returns their ids. Live labs are left alone.
pub fn cleanup_stale() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = fs::read_dir(MARKER_ROOT) else {
        return Ok(removed);
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let marker = entry.path();
        let owner = fs::read_to_string(marker.join(OWNER))
            .ok()
            .and_then(|s| s.trim().parse::<libc::pid_t>().ok());
        let alive = owner.is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
        if !alive {
            cleanup(&marker);
            removed.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(removed)
}
