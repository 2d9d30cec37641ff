//! Network namespaces the lab creates, owns and always removes.
//!
//! Every lab records what it creates under `/run/holdfast-lab/<id>/` before creating it: its
//! owner (pid and start time), its work directory, each namespace name and any stray file its
//! processes leave outside the work directory. Cleanup (on drop, on Ctrl-C or SIGTERM, or by
//! `lab down` for a lab whose owner died) removes exactly what the record names, and a namespace
//! that already exists is never adopted: the lab refuses to touch what it did not create.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

pub const MARKER_ROOT: &str = "/run/holdfast-lab";
const NAMESPACES: &str = "namespaces";
const OWNER: &str = "owner";
const WORKDIR: &str = "workdir";
const FILES: &str = "files";
/// Work directories are named this plus the lab id; cleanup removes nothing else.
const WORKDIR_PREFIX: &str = "holdfast-lab-";

/// Markers of the labs alive in this process, for the signal handler. Held while a namespace is
/// recorded and created, and while the signal handler cleans up, so that neither sees the other
/// half done.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
/// Set once the signal handler has started cleaning up: no new namespace may appear after it.
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
static COUNTER: AtomicU32 = AtomicU32::new(0);

fn live() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    // A panic elsewhere must not stop cleanup.
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat): with the
/// pid it names a process uniquely, so a reused pid is not mistaken for a lab's live owner.
fn start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the owner recorded as "<pid> [<start time>]" is still running.
fn owner_alive(record: &str) -> bool {
    let mut parts = record.split_whitespace();
    let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    match parts.next().and_then(|t| t.parse::<u64>().ok()) {
        Some(started) => start_time(pid) == Some(started),
        // Older markers carry only the pid.
        None => unsafe { libc::kill(pid as libc::pid_t, 0) == 0 },
    }
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

fn remove_line(path: &Path, line: &str) -> Result<()> {
    let text = fs::read_to_string(path).unwrap_or_default();
    let kept: String = text
        .lines()
        .filter(|l| *l != line)
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(path, kept).with_context(|| format!("cannot write {}", path.display()))
}

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
        // Short, so that interface names built from it ("<id>e" for wireguard-go) stay within
        // 15 characters; fixed-width pid so two ids never run into each other.
        let pid = std::process::id();
        let id = format!(
            "hf{:04x}{:x}",
            pid & 0xffff,
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        fs::create_dir_all(MARKER_ROOT).with_context(|| format!("cannot create {MARKER_ROOT}"))?;
        let marker = Path::new(MARKER_ROOT).join(&id);
        // create_dir (not _all) fails if it exists: two labs never share a marker.
        fs::create_dir(&marker).with_context(|| {
            format!(
                "cannot create {}: another lab (perhaps a stale one: `lab down`) has id {id}",
                marker.display()
            )
        })?;
        let owner = match start_time(pid) {
            Some(t) => format!("{pid} {t}"),
            None => pid.to_string(),
        };
        let base = std::env::var_os("HOLDFAST_LAB_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir);
        // Absolute, because the marker outlives this process's working directory.
        let dir = std::path::absolute(base.join(format!("{WORKDIR_PREFIX}{id}")))
            .context("cannot resolve the lab's work directory")?;
        let recorded = fs::write(marker.join(OWNER), owner)
            .and_then(|()| fs::write(marker.join(WORKDIR), dir.display().to_string()));
        if let Err(e) = recorded {
            let _ = fs::remove_dir_all(&marker);
            return Err(e).with_context(|| format!("cannot write {}", marker.display()));
        }
        {
            let mut live = live();
            if SHUTTING_DOWN.load(Ordering::SeqCst) {
                let _ = fs::remove_dir_all(&marker);
                bail!("shutting down: no new lab");
            }
            live.push(marker.clone());
        }
        // From here on the Netns exists, so its Drop removes the marker whatever fails next.
        let net = Self {
            id,
            marker,
            namespaces: Vec::new(),
            children: Vec::new(),
            dir,
        };
        fs::create_dir_all(&net.dir)
            .with_context(|| format!("cannot create {}", net.dir.display()))?;
        Ok(net)
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
        {
            // The signal handler must see either no trace of this namespace or its record.
            let _live = live();
            if SHUTTING_DOWN.load(Ordering::SeqCst) {
                bail!("shutting down: not creating namespace {name}");
            }
            if existing_namespaces()?.contains(&name) {
                bail!(
                    "namespace {name} already exists and is not this lab's: refusing to touch it"
                );
            }
            // Record first: if creation half-succeeds, cleanup still knows the name.
            let record = self.marker.join(NAMESPACES);
            append_line(&record, &name)?;
            if let Err(e) = ip(&["netns", "add", &name]) {
                // `ip netns add` creates nothing when it fails (for instance because someone
                // else created the name since the check above): forget the name, so that
                // cleanup never deletes a namespace that is not ours.
                remove_line(&record, &name)?;
                return Err(e.context(format!("cannot create namespace {name}")));
            }
        }
        self.namespaces.push(name.clone());
        self.exec(role, &["ip", "link", "set", "lo", "up"])?;
        // Links made here from now on skip duplicate address detection for their link-local
        // addresses too (global ones are added with `nodad`): otherwise IPv6 neighbours stay
        // unresolvable for a second or two after a lab comes up, and what is sent meanwhile
        // is lost. A kernel without IPv6 has nothing to turn off (`-e`).
        self.exec(
            role,
            &[
                "sysctl",
                "-e",
                "-qw",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0",
            ],
        )?;
        Ok(name)
    }

    /// Records a file that this lab's processes create outside its work directory (e.g. a
    /// wireguard-go control socket in /var/run/wireguard), so that cleanup removes it even when
    /// the process is killed before it can.
    pub fn own_file(&self, path: &Path) -> Result<()> {
        append_line(&self.marker.join(FILES), &path.display().to_string())
    }

    /// Writes `/etc/netns/<namespace>/<name>`, which `ip netns exec` bind-mounts over
    /// `/etc/<name>` for every process it starts in `role` from then on (resolv.conf, hosts).
    /// Recorded, with the directories it needed, before it is created: cleanup removes it.
    pub fn etc_file(&self, role: &str, name: &str, content: &str) -> Result<PathBuf> {
        let root = Path::new("/etc/netns");
        let dir = root.join(self.ns(role));
        for d in [root, dir.as_path()] {
            if !d.exists() {
                // Removed only if empty at cleanup: another lab's files there stay.
                self.own_file(d)?;
                fs::create_dir(d).with_context(|| format!("cannot create {}", d.display()))?;
            }
        }
        let path = dir.join(name);
        self.own_file(&path)?;
        fs::write(&path, content).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
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
        live().retain(|m| m != &self.marker);
    }
}

/// Whether work directories are kept for inspection (`HOLDFAST_LAB_KEEP=1`).
fn keep_workdirs() -> bool {
    std::env::var_os("HOLDFAST_LAB_KEEP").is_some()
}

/// Removes what the marker at `marker` records: kills every process in its namespaces, deletes
/// them and the files it recorded, its work directory (unless `HOLDFAST_LAB_KEEP` is set), then
/// the marker. Never touches a namespace the marker does not name.
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
    let files = fs::read_to_string(marker.join(FILES)).unwrap_or_default();
    // Newest first: a directory is recorded before the files in it, and goes once empty.
    for file in files.lines().rev().filter(|l| !l.is_empty()) {
        let _ = fs::remove_file(file).or_else(|_| fs::remove_dir(file));
    }
    if !keep_workdirs() {
        if let Some(dir) = recorded_workdir(marker) {
            let _ = fs::remove_dir_all(dir);
        }
    }
    let _ = fs::remove_dir_all(marker);
}

/// The work directory a marker names, if it is one the lab made: a damaged marker must not
/// make cleanup delete an arbitrary directory.
fn recorded_workdir(marker: &Path) -> Option<PathBuf> {
    let id = marker.file_name()?.to_str()?;
    let dir = PathBuf::from(fs::read_to_string(marker.join(WORKDIR)).ok()?.trim());
    let expected = format!("{WORKDIR_PREFIX}{id}");
    (dir.is_absolute() && dir.file_name()?.to_str()? == expected).then_some(dir)
}

/// Cleans every lab of this process and lets no new one start; for the signal handler.
pub fn cleanup_live() {
    let mut live = live();
    SHUTTING_DOWN.store(true, Ordering::SeqCst);
    for m in live.drain(..) {
        cleanup(&m);
    }
}

/// Write end of the pipe through which the signal handler hands a signal to the cleanup thread.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only async-signal-safe calls here: cleaning up takes locks, allocates and runs `ip`, so
    // it happens in the thread reading the pipe.
    let byte = signal as u8;
    let fd = SIGNAL_PIPE.load(Ordering::Relaxed);
    unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
}

/// Makes SIGINT and SIGTERM clean up every lab of this process, then exit with status 130.
///
/// A handler forwards the signal through a pipe to a thread of its own, where cleaning up is
/// safe. (Blocking the signals and `sigwait`ing instead would not do: child processes inherit
/// the signal mask, and the daemons would then ignore SIGTERM and Ctrl-C.)
pub fn cleanup_on_signals() -> Result<()> {
    let mut fds = [0 as libc::c_int; 2];
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot create the signal pipe");
    }
    let [read_fd, write_fd] = fds;
    SIGNAL_PIPE.store(write_fd, Ordering::Relaxed);
    std::thread::Builder::new()
        .name("lab-signals".into())
        .spawn(move || {
            let mut byte = 0u8;
            let n = unsafe { libc::read(read_fd, (&mut byte as *mut u8).cast(), 1) };
            if n == 1 {
                eprintln!("\nsignal {byte}: removing the lab");
                cleanup_live();
                // 130 as a shell reports Ctrl-C. _exit, not exit: the main thread may be
                // mid-way through a lab, and its destructors must not run on top of this.
                unsafe { libc::_exit(130) };
            }
        })
        .context("cannot start the signal thread")?;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        let handler: extern "C" fn(libc::c_int) = on_signal;
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        unsafe { libc::sigemptyset(&mut action.sa_mask) };
        if unsafe { libc::sigaction(signal, &action, std::ptr::null_mut()) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot handle signal {signal}"));
        }
    }
    Ok(())
}

/// A lab `lab down` removed.
pub struct Removed {
    pub id: String,
    /// Its work directory, when `HOLDFAST_LAB_KEEP` kept it.
    pub kept: Option<PathBuf>,
}

/// Removes labs whose owner process is gone. Live labs are left alone.
pub fn cleanup_stale() -> Result<Vec<Removed>> {
    let mut removed = Vec::new();
    let entries = match fs::read_dir(MARKER_ROOT) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e).with_context(|| format!("cannot read {MARKER_ROOT}")),
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let marker = entry.path();
        let owner = fs::read_to_string(marker.join(OWNER)).unwrap_or_default();
        if owner_alive(&owner) {
            continue;
        }
        let kept = recorded_workdir(&marker).filter(|_| keep_workdirs());
        cleanup(&marker);
        removed.push(Removed {
            id: entry.file_name().to_string_lossy().into_owned(),
            kept,
        });
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_named_by_pid_and_start_time() {
        let me = std::process::id();
        let started = start_time(me).expect("our own start time");
        assert!(owner_alive(&format!("{me} {started}")));
        // Same pid, another start time: the pid was reused, the owner is gone.
        assert!(!owner_alive(&format!("{me} {}", started + 1)));
        assert!(owner_alive(&me.to_string()));
        assert!(!owner_alive(""));
    }

    #[test]
    fn only_the_lab_s_own_work_directory_is_removed() {
        let marker = std::env::temp_dir().join(format!("hf-marker-test-{}", std::process::id()));
        let marker = marker.join("hf12340");
        fs::create_dir_all(&marker).unwrap();
        fs::write(marker.join(WORKDIR), "/tmp/holdfast-lab-hf12340\n").unwrap();
        assert_eq!(
            recorded_workdir(&marker),
            Some(PathBuf::from("/tmp/holdfast-lab-hf12340"))
        );
        for bad in [
            "/",
            "/tmp",
            "holdfast-lab-hf12340",
            "/tmp/holdfast-lab-hf99",
        ] {
            fs::write(marker.join(WORKDIR), bad).unwrap();
            assert_eq!(recorded_workdir(&marker), None, "{bad}");
        }
        fs::remove_dir_all(marker.parent().unwrap()).unwrap();
    }

    #[test]
    fn removing_a_record_keeps_the_others() {
        let path = std::env::temp_dir().join(format!("hf-record-test-{}", std::process::id()));
        append_line(&path, "a").unwrap();
        append_line(&path, "b").unwrap();
        append_line(&path, "c").unwrap();
        remove_line(&path, "b").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "a\nc\n");
        fs::remove_file(path).unwrap();
    }
}
