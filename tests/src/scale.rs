//! `lab scale`: many idle sessions on one DN, what they cost it, and how fast they all switch
//! when it dies.
//!
//! A lab with two DNs under their failure detectors (dn-fd) and FRR, and one client namespace
//! running the load client `hf-load`: N clients in one process, each with its own certificate,
//! a lease from dn1 and a secondary session on dn2, idle but for keepalives. The lab reads
//! dn1's CPU time and resident memory from /proc before and after the sessions exist, then
//! (with `--fail kill`) kills dn1 and has the load client time every session's switch: from the
//! kill until dn2 told it dn1 is down and it sent `Switch`, and until dn2 confirmed.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::bench::{cpu_seconds, rss_kib};
use crate::lab::{dn_address_towards, dn_role, Failure, Lab, LabSpec, Routing};
use crate::stats::percentile;

/// Most sessions a run may ask for: the lab's largest pools are /16.
pub const MAX_SESSIONS: usize = 65_000;
/// How long the DN's idle CPU is measured.
const IDLE_WINDOW: Duration = Duration::from_secs(10);

pub struct ScaleOptions {
    pub sessions: usize,
    /// Kill the DN holding the sessions and time their switch.
    pub kill: bool,
    /// Seconds between keepalives of each session (the client's default: 25).
    pub keepalive_secs: u64,
    /// Progress lines on stderr.
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Self> {
        (!values.is_empty()).then(|| Self {
            p50: percentile(values, 50.0),
            p99: percentile(values, 99.0),
            max: values.iter().copied().fold(f64::MIN, f64::max),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// Sessions that came up (each client: one primary session on dn1, one secondary on dn2).
    pub sessions: usize,
    pub sessions_failed: usize,
    pub first_error: Option<String>,
    /// How long the load client took to issue certificates and open every session.
    pub setup_seconds: f64,
    pub keepalive_secs: u64,
    /// dn1's CPU over 10 s with every session idle, in percent of one core.
    pub dn_cpu_percent_idle: f64,
    /// The same before any session existed.
    pub dn_cpu_percent_empty: f64,
    /// dn1's resident memory before the sessions and with them.
    pub dn_rss_kib_empty: u64,
    pub dn_rss_kib_loaded: u64,
    /// (loaded - empty) / sessions.
    pub dn_rss_kib_per_session: f64,
    /// The same for dn2, where every session is a secondary.
    pub secondary_dn_cpu_percent_idle: f64,
    pub secondary_dn_rss_kib_per_session: f64,
    /// With `--fail kill`: sessions that switched to dn2 within the deadline (10 s).
    pub switched: Option<usize>,
    /// Milliseconds from the kill until the client switched: dn2 told it dn1 is down and it
    /// sent `Switch`. From then on it sends through dn2, which already routes dn1's blocks.
    pub switched_within_ms: Option<Spread>,
    /// Sessions dn2 confirmed with `Promoted`, and when (milliseconds from the kill).
    pub promoted: Option<usize>,
    pub promoted_within_ms: Option<Spread>,
}

/// The smallest lab pool prefix that holds `sessions` clients in one block (the network, the
/// DN's own address and the broadcast address are never leased).
fn pool_prefix_for(sessions: usize) -> u8 {
    (16..=24u8)
        .rev()
        .find(|p| (1usize << (32 - p)) - 3 >= sessions)
        .unwrap_or(16)
}

/// Percent of one core each of `pids` used over the same `window`.
fn cpu_percents(pids: [u32; 2], window: Duration) -> Result<[f64; 2]> {
    let before = [cpu_seconds(pids[0])?, cpu_seconds(pids[1])?];
    std::thread::sleep(window);
    let after = [cpu_seconds(pids[0])?, cpu_seconds(pids[1])?];
    let percent = |i: usize| (after[i] - before[i]) / window.as_secs_f64() * 100.0;
    Ok([percent(0), percent(1)])
}

/// Checks that both DNs are still the processes measured from the start, and when one is not,
/// fails with what its detector says about why (a DN its detector killed mid-run is restarted
/// under a new pid, which would otherwise only show as "process is gone").
fn same_dns(lab: &Lab, pids: [u32; 2]) -> Result<()> {
    for (i, pid) in pids.into_iter().enumerate() {
        let k = i + 1;
        let status = lab.fd_status(k)?;
        if status["dn"]["pid"].as_u64() == Some(u64::from(pid)) {
            continue;
        }
        let log = std::fs::read_to_string(lab.net.log_path(&Lab::fd_role(k))).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(40)..];
        bail!(
            "{role} (pid {pid}) did not live through the run: now {state} (pid {now}), \
             last kill: {kill}, last exit: {exit}, kills by reason: {reasons}\n\
             ----- the end of fd-{role}.log -----\n{tail}",
            role = dn_role(k),
            state = status["dn"]["state"],
            now = status["dn"]["pid"],
            kill = status["last_kill"],
            exit = status["last_exit"],
            reasons = status["kills_by_reason"],
            tail = tail.join("\n"),
        );
    }
    Ok(())
}

/// [`cpu_percents`] of the two DNs, or why one of them is not the DN it was.
fn dn_cpu_percents(lab: &Lab, pids: [u32; 2], window: Duration) -> Result<[f64; 2]> {
    let measured = cpu_percents(pids, window);
    same_dns(lab, pids)?;
    measured
}

/// The load client, killed if the run ends early.
struct LoadClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl LoadClient {
    /// The next JSON line it prints that has `key`.
    fn next(&mut self, key: &str) -> Result<Value> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line)? == 0 {
                bail!("the load client ended before it said {key:?}");
            }
            if let Ok(mut v) = serde_json::from_str::<Value>(&line) {
                if let Some(inner) = v.get_mut(key) {
                    return Ok(inner.take());
                }
            }
        }
    }

    fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .context("the load client's input is closed")?;
        writeln!(stdin, "{line}").context("the load client is gone")?;
        stdin.flush()?;
        Ok(())
    }
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        self.stdin.take();
        // End of input ends it; kill it if it does not go within a few seconds.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

pub fn run(o: &ScaleOptions) -> Result<ScaleReport> {
    if o.sessions == 0 || o.sessions > MAX_SESSIONS {
        bail!("--sessions must be between 1 and {MAX_SESSIONS}");
    }
    let say = |s: &str| {
        if !o.quiet {
            eprintln!("{s}");
        }
    };
    let prefix = pool_prefix_for(o.sessions);
    say(&format!(
        "building the lab: 2 DNs under dn-fd (pools /{prefix}), FRR, one client namespace ..."
    ));
    let mut lab = Lab::start(&LabSpec {
        clients: 1,
        dns: 2,
        routing: Routing::Frr,
        supervised: true,
        pool_prefix: prefix,
        ..LabSpec::default()
    })?;
    let pids = [lab.dn_pid(1)?, lab.dn_pid(2)?];
    // Let the DNs settle (OSPF, detector heartbeats) before the baseline.
    std::thread::sleep(Duration::from_secs(2));
    let rss_empty = [rss_kib(pids[0])?, rss_kib(pids[1])?];
    let cpu_empty = dn_cpu_percents(&lab, pids, IDLE_WINDOW)?;

    say(&format!(
        "opening {} sessions from one load client ...",
        o.sessions
    ));
    let pki = lab.pki_dir().display().to_string();
    let endpoint = |k: usize| format!("{}={}:4433", dn_role(k), dn_address_towards(1, k));
    let (primary, secondary) = (endpoint(1), endpoint(2));
    let (sessions, keepalive) = (o.sessions.to_string(), o.keepalive_secs.to_string());
    let load = lab.bin("hf-load");
    let log = std::fs::File::create(lab.net.log_path("hf-load"))?;
    let mut cmd = lab.net.command(
        "en1",
        &[
            &load,
            "--pki",
            &pki,
            "--sessions",
            &sessions,
            "--primary",
            &primary,
            "--secondary",
            &secondary,
            "--keepalive-secs",
            &keepalive,
        ],
    );
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(log);
    let mut child = cmd.spawn().context("cannot start the load client")?;
    let stdin = child.stdin.take();
    let stdout = BufReader::new(child.stdout.take().context("no load client output")?);
    let mut client = LoadClient {
        child,
        stdin,
        stdout,
    };
    let ready = client.next("ready").with_context(|| lab.net.logs())?;
    let opened = ready["sessions"].as_u64().unwrap_or(0) as usize;
    if opened == 0 {
        bail!(
            "no session came up: {}",
            ready["first_error"].as_str().unwrap_or("no error given")
        );
    }
    say(&format!(
        "{opened} sessions up in {:.1} s; measuring the idle DNs for {} s ...",
        ready["setup_seconds"].as_f64().unwrap_or(f64::NAN),
        IDLE_WINDOW.as_secs()
    ));
    // Let the last handshakes' work (journal, logs) finish before the idle window.
    std::thread::sleep(Duration::from_secs(3));
    let cpu_idle = dn_cpu_percents(&lab, pids, IDLE_WINDOW)?;
    let rss_loaded = [rss_kib(pids[0])?, rss_kib(pids[1])?];
    let per_session = |i: usize| (rss_loaded[i] as f64 - rss_empty[i] as f64) / opened as f64;
    let mut report = ScaleReport {
        sessions: opened,
        sessions_failed: ready["failed"].as_u64().unwrap_or(0) as usize,
        first_error: ready["first_error"].as_str().map(str::to_owned),
        setup_seconds: ready["setup_seconds"].as_f64().unwrap_or(f64::NAN),
        keepalive_secs: o.keepalive_secs,
        dn_cpu_percent_idle: cpu_idle[0],
        dn_cpu_percent_empty: cpu_empty[0],
        dn_rss_kib_empty: rss_empty[0],
        dn_rss_kib_loaded: rss_loaded[0],
        dn_rss_kib_per_session: per_session(0),
        secondary_dn_cpu_percent_idle: cpu_idle[1],
        secondary_dn_rss_kib_per_session: per_session(1),
        switched: None,
        switched_within_ms: None,
        promoted: None,
        promoted_within_ms: None,
    };
    if o.kill {
        say("kill -9 of dn1 ...");
        let at = crate::unix_micros();
        lab.fail_dn(1, Failure::Kill)?;
        client.say(&format!("kill {at}"))?;
        let seen = client.next("switched").with_context(|| lab.net.logs())?;
        let switched = floats(&seen["switched_ms"]);
        let promoted = floats(&seen["promoted_ms"]);
        report.switched = Some(switched.len());
        report.switched_within_ms = Spread::of(&switched);
        report.promoted = Some(promoted.len());
        report.promoted_within_ms = Spread::of(&promoted);
    }
    drop(client);
    Ok(report)
}

impl ScaleReport {
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn table(&self) -> String {
        let mut out = format!(
            "sessions: {} up ({} failed), opened in {:.1} s; keepalive every {} s per session\n",
            self.sessions, self.sessions_failed, self.setup_seconds, self.keepalive_secs
        );
        if let Some(e) = &self.first_error {
            out += &format!("  first failure: {e}\n");
        }
        out += &format!(
            "dn1 (primary of every session): CPU {:.2}% of a core idle ({:.2}% with no session); \
             RSS {} KiB -> {} KiB: {:.1} KiB per session\n",
            self.dn_cpu_percent_idle,
            self.dn_cpu_percent_empty,
            self.dn_rss_kib_empty,
            self.dn_rss_kib_loaded,
            self.dn_rss_kib_per_session
        );
        out += &format!(
            "dn2 (secondary of every session): CPU {:.2}% of a core idle; {:.1} KiB per session\n",
            self.secondary_dn_cpu_percent_idle, self.secondary_dn_rss_kib_per_session
        );
        if let Some(n) = self.switched {
            out += &format!(
                "after kill -9 of dn1: {n} of {} sessions switched to dn2\n",
                self.sessions
            );
            let line = |what: &str, s: &Option<Spread>| match s {
                Some(s) => format!(
                    "  {what}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n",
                    s.p50, s.p99, s.max
                ),
                None => format!("  {what}: none\n"),
            };
            out += &line(
                "switched (told by dn2, Switch sent)",
                &self.switched_within_ms,
            );
            out += &line("confirmed by dn2 (Promoted)", &self.promoted_within_ms);
        }
        out
    }
}
