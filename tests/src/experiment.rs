//! The thesis's chapter 5 experiments on the lab: how much a client notices when its DN fails.
//!
//! Each run builds a fresh lab (one client, two DNs, an ESR, a server) for its setup, fails the
//! client's primary DN once while traffic flows, measures, and tears the lab down, so that no
//! run inherits another's state. ICMP (thesis 5.1): a steady ping stream, lost packets counted
//! per run. HTTP (thesis 5.2): download times with and without a failure part-way through.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use serde_json::json;

use crate::lab::{Credential, Failure, Lab, LabSpec, Routing, SERVER};
use crate::plot;
use crate::stats::{Difference, Summary};
use crate::traffic::{self, Blob};

/// What one series of runs is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setup {
    pub esr: Routing,
    pub fail: Failure,
    /// Every DN under its failure detector.
    pub dn_fd: bool,
}

impl Setup {
    pub fn name(&self) -> String {
        format!(
            "{} {}{}",
            self.esr.name(),
            self.fail.name(),
            if self.dn_fd { " dn-fd" } else { "" }
        )
    }

    /// Every combination, in the order given.
    pub fn matrix(esrs: &[Routing], fails: &[Failure], dn_fds: &[bool]) -> Vec<Setup> {
        let mut out = Vec::new();
        for &esr in esrs {
            for &fail in fails {
                for &dn_fd in dn_fds {
                    out.push(Setup { esr, fail, dn_fd });
                }
            }
        }
        out
    }

    /// The default lab for this setup (also the demo's), with client 1 up.
    pub fn lab(&self) -> Result<Trial> {
        let mut lab = Lab::start(&LabSpec {
            dns: 2,
            routing: self.esr,
            supervised: self.dn_fd,
            ..LabSpec::default()
        })?;
        lab.start_client(1, &Credential::Issued("client1".into()))?;
        let address = lab.wait_address(1, Duration::from_secs(15))?;
        let (primary, secondary) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
        Ok(Trial {
            lab,
            address,
            primary,
            secondary,
        })
    }
}

/// A lab ready for one failure: client 1's address and its primary and secondary DN.
pub struct Trial {
    pub lab: Lab,
    pub address: std::net::IpAddr,
    pub primary: usize,
    pub secondary: usize,
}

/// What every experiment's report offers the `lab` command.
pub trait Report {
    /// The summary table, for people.
    fn table(&self) -> String;
    /// One JSON object with every run's figures and the summaries.
    fn json(&self) -> serde_json::Value;
    /// CSV of every run and an SVG chart into `dir`; returns the files written.
    fn write(&self, dir: &Path) -> Result<Vec<PathBuf>>;
    /// Runs that could not be measured, with why.
    fn errors(&self) -> &[String];
}

/// One setup's entry in a report's JSON: what the setup is, and its `figures` (an object).
fn setup_json(setup: &Setup, figures: serde_json::Value) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("setup".into(), setup.name().into());
    m.insert("esr".into(), setup.esr.name().into());
    m.insert("fail".into(), setup.fail.name().into());
    m.insert("dn_fd".into(), setup.dn_fd.into());
    if let serde_json::Value::Object(figures) = figures {
        m.extend(figures);
    }
    m.into()
}

fn setup_csv(setup: &Setup) -> String {
    format!(
        "{},{},{},{}",
        setup.name(),
        setup.esr.name(),
        setup.fail.name(),
        setup.dn_fd
    )
}

/// The report's object, with the single setup's `keys` copied to the top level when only one
/// setup ran (the common case: `lost`, `typical_s`... right where a script looks).
fn report_json(
    mut head: serde_json::Value,
    setups: Vec<serde_json::Value>,
    errors: &[String],
    keys: &[&str],
) -> serde_json::Value {
    if let Some(obj) = head.as_object_mut() {
        if let [only] = &setups[..] {
            for key in keys {
                obj.insert((*key).into(), only[*key].clone());
            }
        }
        obj.insert("setups".into(), setups.into());
        obj.insert("errors".into(), errors.into());
    }
    head
}

fn errors_section(out: &mut String, errors: &[String]) {
    for e in errors {
        let _ = writeln!(out, "not measured: {e}");
    }
}

pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))
}

/// Keeps a measured run (and says so on stderr), or records why it could not be measured.
fn keep<R>(
    quiet: bool,
    what: String,
    result: Result<R>,
    say: impl Fn(&R) -> String,
    runs: &mut Vec<R>,
    errors: &mut Vec<String>,
) {
    match result {
        Ok(r) => {
            progress(quiet, &format!("{what}: {}", say(&r)));
            runs.push(r);
        }
        Err(e) => {
            let e = format!("{what}: {e:#}");
            progress(quiet, &e);
            errors.push(e);
        }
    }
}

/// Says what is going on, on stderr, unless the output is JSON only.
fn progress(quiet: bool, line: &str) {
    if !quiet {
        eprintln!("{line}");
    }
}

// ---------------------------------------------------------------------------------------------
// ICMP

pub struct IcmpOptions {
    /// Packets per second.
    pub rate: u32,
    pub runs: usize,
    pub setups: Vec<Setup>,
    /// Bulk TCP traffic through the tunnel while the ping runs.
    pub load: Load,
    /// Failures per run, `KILL_EVERY` apart; each hits the client's primary of the moment.
    pub kills: u32,
    /// When above zero: the client sends nothing for this long, its primary fails halfway,
    /// then the ping starts (what the next burst loses).
    pub idle_secs: u32,
    pub quiet: bool,
}

/// Bulk traffic beside the ping: an unpaced iperf3 TCP stream between the client and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Load {
    /// Only the ping.
    None,
    /// The client sends as fast as TCP allows (iperf3 from the client to the server).
    Upload,
    /// The server sends to the client as fast as TCP allows (iperf3 -R).
    Download,
}

impl Load {
    pub fn name(self) -> &'static str {
        match self {
            Load::None => "none",
            Load::Upload => "upload",
            Load::Download => "download",
        }
    }
}

/// Time between the failures of a run with several, at least: each also waits until the failed
/// DN has been restarted by its detector and the client holds two sessions again.
const KILL_EVERY: f64 = 5.0;

/// Seconds of steady stream before the failure (plus a random fraction of the interval between
/// packets) and after it.
const ICMP_BEFORE: f64 = 2.0;
const ICMP_AFTER: f64 = 3.0;

#[derive(Debug, Clone, Serialize)]
pub struct IcmpRun {
    pub setup: String,
    pub run: usize,
    pub sent: u32,
    /// Echo requests without a reply.
    pub lost: u32,
    /// The longest run of consecutive lost packets.
    pub consecutive: u32,
    /// Milliseconds from the failure until the client switched to another DN (its log).
    pub switch_ms: Option<f64>,
}

/// What ping printed: how many it sent and which sequence numbers were answered.
pub fn parse_ping_replies(text: &str) -> Result<(u32, BTreeSet<u32>)> {
    let answered: BTreeSet<u32> = text
        .lines()
        .filter(|l| l.contains("bytes from") && !l.contains("DUP!"))
        .filter_map(|l| {
            let seq = l.split("icmp_seq=").nth(1)?;
            seq.split_whitespace().next()?.parse().ok()
        })
        .collect();
    let (sent, _) = crate::lab::parse_ping(text)?;
    Ok((sent, answered))
}

/// Lost packets among sequence numbers 1..=sent, and the longest run of them.
pub fn losses(sent: u32, answered: &BTreeSet<u32>) -> (u32, u32) {
    let (mut lost, mut run, mut longest) = (0, 0, 0);
    for seq in 1..=sent {
        if answered.contains(&seq) {
            run = 0;
        } else {
            lost += 1;
            run += 1;
            longest = longest.max(run);
        }
    }
    (lost, longest)
}

fn icmp_run(setup: &Setup, o: &IcmpOptions, run: usize) -> Result<IcmpRun> {
    let Trial {
        mut lab, primary, ..
    } = setup.lab()?;
    let rate = o.rate;
    let interval = 1.0 / f64::from(rate);
    let mut failed_at = None;
    if o.idle_secs > 0 {
        // Nothing to send while the primary dies; then a burst.
        let half = Duration::from_secs(u64::from(o.idle_secs)) / 2;
        std::thread::sleep(half);
        failed_at = Some(unix_now());
        lab.fail_dn(primary, setup.fail)?;
        std::thread::sleep(half);
    }
    let failures = f64::from(o.kills.saturating_sub(1)) * KILL_EVERY;
    let seconds = if o.idle_secs > 0 {
        ICMP_AFTER
    } else {
        ICMP_BEFORE + failures + ICMP_AFTER
    };
    let count = (f64::from(rate) * seconds).round() as u32;
    let bulk = match o.load {
        Load::None => None,
        load => Some(traffic::bulk(
            &mut lab.net,
            "srv",
            "en1",
            SERVER,
            seconds.ceil() as u32 + 1,
            load == Load::Download,
            None,
        )?),
    };
    let interval_s = format!("{interval}");
    let count_s = count.to_string();
    let mut argv = vec!["ping", "-n", "-i", &interval_s, "-W", "1", SERVER];
    if o.kills == 1 {
        // Several kills wait for the client to be home again in between, however long that
        // takes: that ping runs until it is interrupted.
        argv.extend(["-c", &count_s]);
    }
    let mut ping = lab.net.command("en1", &argv);
    ping.stdout(Stdio::piped());
    let mut ping = ping.spawn().context("cannot start ping")?;
    // Read as it prints: a long stream's lines fill the pipe, and a blocked ping stops sending.
    let mut stdout = ping.stdout.take().context("no ping output")?;
    let printed = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
        text
    });
    // The failure lands at a random point between two packets, as a real one would: at a
    // fixed phase every run would measure the same slice of the failover.
    let phase = rand::random::<f64>() * interval;
    if o.idle_secs == 0 {
        std::thread::sleep(Duration::from_secs_f64(ICMP_BEFORE + phase));
        failed_at = Some(unix_now());
        lab.fail_dn(primary, setup.fail)?;
    }
    for _ in 1..o.kills {
        std::thread::sleep(Duration::from_secs_f64(KILL_EVERY));
        // The detector restarts the DN after its back-off (which grows with every kill) and the
        // client goes home: the next failure hits the client's primary once it has a secondary
        // again.
        let (now_primary, _) = lab.primary_and_secondary(1, Duration::from_secs(60))?;
        lab.fail_dn(now_primary, setup.fail)?;
    }
    if o.kills > 1 {
        std::thread::sleep(Duration::from_secs_f64(ICMP_AFTER));
        // SAFETY: the pid of the ping this function started (`ip netns exec` execs it).
        unsafe { libc::kill(ping.id() as libc::pid_t, libc::SIGINT) };
    }
    ping.wait()?;
    let printed = printed
        .join()
        .map_err(|_| anyhow!("the ping reader failed"))?;
    if let Some(bulk) = bulk {
        let carried = bulk.finish(&mut lab.net)?;
        if carried == 0 {
            bail!("the bulk {} carried nothing", o.load.name());
        }
    }
    let (sent, answered) = parse_ping_replies(&printed)?;
    let (lost, consecutive) = losses(sent, &answered);
    let log = std::fs::read_to_string(lab.net.log_path("en1")).unwrap_or_default();
    let switch_ms = failed_at.and_then(|t| first_switch_after(&log, t).map(|s| (s - t) * 1000.0));
    Ok(IcmpRun {
        setup: setup.name(),
        run,
        sent,
        lost,
        consecutive,
        switch_ms,
    })
}

fn unix_now() -> f64 {
    crate::unix_micros() as f64 / 1e6
}

/// When (unix seconds) the client's log first says it sends through another session after
/// `after`: the moment it switched.
pub fn first_switch_after(log: &str, after: f64) -> Option<f64> {
    log.lines()
        .filter(|l| l.contains("primary session"))
        .filter_map(log_time)
        .find(|t| *t >= after)
}

/// The RFC 3339 UTC timestamp (`2026-12-02T19:21:40.685071Z`) a log line starts with, in unix
/// seconds; colour codes around it are skipped.
pub fn log_time(line: &str) -> Option<f64> {
    let bytes = line.as_bytes();
    let start = (0..bytes.len().saturating_sub(4))
        .find(|&i| bytes[i..i + 4].iter().all(u8::is_ascii_digit) && bytes[i + 4] == b'-')?;
    let stamp = line[start..].split('Z').next()?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from 1970-01-01 to the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

pub struct IcmpReport {
    pub rate: u32,
    pub load: Load,
    pub kills: u32,
    pub idle_secs: u32,
    /// Per setup, in order: its runs.
    pub setups: Vec<(Setup, Vec<IcmpRun>)>,
    /// Runs that could not be measured (the lab failed), with why.
    pub errors: Vec<String>,
}

pub fn icmp(o: &IcmpOptions) -> Result<IcmpReport> {
    if o.kills > 1 && o.setups.iter().any(|s| !s.dn_fd || s.fail != Failure::Kill) {
        bail!("several kills per run need --fail kill and --dn-fd on: the detector restarts each killed DN");
    }
    if o.idle_secs > 0 && (o.kills > 1 || o.load != Load::None) {
        bail!("--idle-secs fails the DN once while nothing flows: not with --kills or --load");
    }
    let mut report = IcmpReport {
        rate: o.rate,
        load: o.load,
        kills: o.kills,
        idle_secs: o.idle_secs,
        setups: Vec::new(),
        errors: Vec::new(),
    };
    for setup in &o.setups {
        let mut runs = Vec::new();
        for run in 1..=o.runs {
            keep(
                o.quiet,
                format!(
                    "icmp {} pps, {} load {}, {} kill(s), run {run}/{}",
                    o.rate,
                    setup.name(),
                    o.load.name(),
                    o.kills,
                    o.runs
                ),
                icmp_run(setup, o, run),
                |r| {
                    format!(
                        "{} of {} lost, {} in a row, switched after {}",
                        r.lost,
                        r.sent,
                        r.consecutive,
                        r.switch_ms
                            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"))
                    )
                },
                &mut runs,
                &mut report.errors,
            );
        }
        report.setups.push((*setup, runs));
    }
    Ok(report)
}

fn summary_of<T>(runs: &[T], f: impl Fn(&T) -> f64) -> Option<Summary> {
    Summary::of(&runs.iter().map(f).collect::<Vec<_>>())
}

fn row(out: &mut String, name: &str, s: Option<Summary>) {
    let _ = match s {
        Some(s) => writeln!(
            out,
            "{name:<22} {:>4} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>8.2} {:>8.2}",
            s.n, s.min, s.median, s.p95, s.max, s.mean, s.std_dev
        ),
        None => writeln!(out, "{name:<22}    0 (no run measured)"),
    };
}

impl Report for IcmpReport {
    fn table(&self) -> String {
        let failures = f64::from(self.kills.saturating_sub(1)) * KILL_EVERY;
        let mut out = if self.idle_secs > 0 {
            format!(
                "ICMP at {} packets/s after {} s of silence: the primary DN failed {} s into the silence, then a {ICMP_AFTER} s stream\n\n",
                self.rate,
                self.idle_secs,
                self.idle_secs / 2
            )
        } else {
            format!(
                "ICMP at {} packets/s, the primary DN failed {} per run ({ICMP_BEFORE} s and a random part of a packet interval into a {}{} s stream{}), bulk traffic: {}\n\n",
                self.rate,
                match self.kills {
                    1 => "once".to_owned(),
                    n => format!("{n} times, at least {KILL_EVERY} s apart and each once the client had two sessions again,"),
                },
                if self.kills > 1 { "at least " } else { "" },
                ICMP_BEFORE + failures + ICMP_AFTER,
                if self.kills > 1 { ", each kill hitting the primary of the moment" } else { "" },
                self.load.name()
            )
        };
        let _ = writeln!(
            out,
            "{:<22} {:>4} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8}",
            "lost packets", "runs", "min", "median", "p95", "max", "mean", "std dev"
        );
        for (setup, runs) in &self.setups {
            row(
                &mut out,
                &setup.name(),
                summary_of(runs, |r| f64::from(r.lost)),
            );
        }
        let _ = writeln!(
            out,
            "\nms from the failure until the client switched (its log)"
        );
        for (setup, runs) in &self.setups {
            let switched: Vec<f64> = runs.iter().filter_map(|r| r.switch_ms).collect();
            row(&mut out, &setup.name(), Summary::of(&switched));
        }
        let _ = writeln!(out, "\nlongest run of consecutive losses");
        for (setup, runs) in &self.setups {
            row(
                &mut out,
                &setup.name(),
                summary_of(runs, |r| f64::from(r.consecutive)),
            );
        }
        errors_section(&mut out, &self.errors);
        out
    }

    fn json(&self) -> serde_json::Value {
        let setups: Vec<serde_json::Value> = self
            .setups
            .iter()
            .map(|(setup, runs)| {
                setup_json(
                    setup,
                    json!({
                        "lost": runs.iter().map(|r| r.lost).collect::<Vec<_>>(),
                        "consecutive": runs.iter().map(|r| r.consecutive).collect::<Vec<_>>(),
                        "switch_ms": runs.iter().map(|r| r.switch_ms).collect::<Vec<_>>(),
                        "sent": runs.iter().map(|r| r.sent).collect::<Vec<_>>(),
                        "summary": summary_of(runs, |r| f64::from(r.lost)),
                        "consecutive_summary": summary_of(runs, |r| f64::from(r.consecutive)),
                    }),
                )
            })
            .collect();
        report_json(
            json!({"experiment": "icmp", "rate": self.rate, "load": self.load.name(), "kills": self.kills, "idle_secs": self.idle_secs}),
            setups,
            &self.errors,
            &["lost", "consecutive", "summary"],
        )
    }

    /// `icmp-<rate>.csv` (every run) and `icmp-<rate>.svg` (lost packets per run).
    fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        create_dir(dir)?;
        let csv_path = dir.join(format!("icmp-{}.csv", self.rate));
        let mut csv = "setup,esr,fail,dn_fd,rate,run,sent,lost,consecutive\n".to_owned();
        for (setup, runs) in &self.setups {
            for r in runs {
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{},{}",
                    setup_csv(setup),
                    self.rate,
                    r.run,
                    r.sent,
                    r.lost,
                    r.consecutive
                );
            }
        }
        std::fs::write(&csv_path, csv)?;
        let svg_path = dir.join(format!("icmp-{}.svg", self.rate));
        let series: Vec<(String, Vec<f64>)> = self
            .setups
            .iter()
            .map(|(s, runs)| (s.name(), runs.iter().map(|r| f64::from(r.lost)).collect()))
            .collect();
        plot::per_run(
            &svg_path,
            &format!(
                "Packets lost during a failover ({} packets per second)",
                self.rate
            ),
            "lost packets",
            &series,
        )?;
        Ok(vec![csv_path, svg_path])
    }

    fn errors(&self) -> &[String] {
        &self.errors
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP

pub struct HttpOptions {
    pub size: u64,
    pub runs: usize,
    /// Fraction of the download after which the primary fails.
    pub fail_at: f64,
    pub setups: Vec<Setup>,
    pub quiet: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpRun {
    pub setup: String,
    pub failure: bool,
    pub run: usize,
    pub seconds: f64,
}

/// How long a download may take before the run counts as failed.
const DOWNLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// A download without a failure, in a lab already up; checks the content.
fn typical_download(lab: &Lab, blob: &Blob) -> Result<f64> {
    let out = lab.net.dir.join("downloaded");
    let url = format!("http://{SERVER}:{}/{}", traffic::HTTP_PORT, blob_name(blob));
    let d = traffic::download(&lab.net, "en1", &url, &out, DOWNLOAD_TIMEOUT)?;
    check_content(&out, blob)?;
    let _ = std::fs::remove_file(&out);
    Ok(d.seconds)
}

fn blob_name(blob: &Blob) -> String {
    blob.path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn check_content(out: &Path, blob: &Blob) -> Result<()> {
    let got = traffic::sha256_file(out)?;
    if got != blob.sha256 {
        bail!(
            "the download arrived damaged: SHA-256 {got}, sent {}",
            blob.sha256
        );
    }
    Ok(())
}

/// A download in a fresh lab whose primary DN fails once `fail_at` of the file has arrived.
/// The same file was downloaded once before in that lab.
fn failure_download(setup: &Setup, blob: &Blob, www: &Path, fail_at: f64) -> Result<f64> {
    let Trial {
        mut lab, primary, ..
    } = setup.lab()?;
    traffic::serve_http(&mut lab.net, "srv", www, SERVER)?;
    // One untimed download first, so that the timed one starts from the same warm state as the
    // typical runs (which share one lab): the first download through a new lab is slower.
    typical_download(&lab, blob).context("warm-up download")?;
    let out = lab.net.dir.join("downloaded");
    let url = format!("http://{SERVER}:{}/{}", traffic::HTTP_PORT, blob_name(blob));
    let out_s = out.display().to_string();
    let mut curl = lab.net.command(
        "en1",
        &[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            &DOWNLOAD_TIMEOUT.as_secs().to_string(),
            "-o",
            &out_s,
            "-w",
            "%{time_total}",
            &url,
        ],
    );
    curl.stdout(Stdio::piped()).stderr(Stdio::piped());
    let curl = curl.spawn().context("cannot start curl")?;
    let threshold = (blob.size as f64 * fail_at) as u64;
    let started = Instant::now();
    loop {
        let have = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        if have >= threshold {
            break;
        }
        if started.elapsed() > DOWNLOAD_TIMEOUT {
            bail!("the download never reached {threshold} bytes");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    lab.fail_dn(primary, setup.fail)?;
    let done = curl.wait_with_output()?;
    if !done.status.success() {
        bail!(
            "curl failed: {}",
            String::from_utf8_lossy(&done.stderr).trim()
        );
    }
    check_content(&out, blob)?;
    String::from_utf8_lossy(&done.stdout)
        .trim()
        .parse()
        .map_err(|_| anyhow!("curl printed no time"))
}

pub struct HttpReport {
    pub size: u64,
    pub fail_at: f64,
    pub setups: Vec<(Setup, Vec<HttpRun>)>,
    pub errors: Vec<String>,
}

pub fn http(o: &HttpOptions) -> Result<HttpReport> {
    let www = std::env::temp_dir().join(format!("holdfast-http-{}", std::process::id()));
    let blob = traffic::make_blob(&www, "file", o.size)?;
    let result = http_with(o, &blob, &www);
    let _ = std::fs::remove_dir_all(&www);
    result
}

fn http_with(o: &HttpOptions, blob: &Blob, www: &Path) -> Result<HttpReport> {
    let mut report = HttpReport {
        size: o.size,
        fail_at: o.fail_at,
        setups: Vec::new(),
        errors: Vec::new(),
    };
    for setup in &o.setups {
        let mut runs = Vec::new();
        // Typical downloads share one lab: nothing fails in them. Like every failure run,
        // they start after one untimed download.
        match setup.lab() {
            Ok(Trial { mut lab, .. }) => {
                traffic::serve_http(&mut lab.net, "srv", www, SERVER)?;
                if let Err(e) = typical_download(&lab, blob) {
                    report
                        .errors
                        .push(format!("{} warm-up download: {e:#}", setup.name()));
                }
                for run in 1..=o.runs {
                    keep(
                        o.quiet,
                        format!("http {} typical run {run}/{}", setup.name(), o.runs),
                        typical_download(&lab, blob).map(|seconds| HttpRun {
                            setup: setup.name(),
                            failure: false,
                            run,
                            seconds,
                        }),
                        |r| format!("{:.3} s", r.seconds),
                        &mut runs,
                        &mut report.errors,
                    );
                }
            }
            Err(e) => report
                .errors
                .push(format!("{} typical runs: {e:#}", setup.name())),
        }
        for run in 1..=o.runs {
            keep(
                o.quiet,
                format!("http {} failure run {run}/{}", setup.name(), o.runs),
                failure_download(setup, blob, www, o.fail_at).map(|seconds| HttpRun {
                    setup: setup.name(),
                    failure: true,
                    run,
                    seconds,
                }),
                |r| format!("{:.3} s", r.seconds),
                &mut runs,
                &mut report.errors,
            );
        }
        report.setups.push((*setup, runs));
    }
    Ok(report)
}

fn times(runs: &[HttpRun], failure: bool) -> Vec<f64> {
    runs.iter()
        .filter(|r| r.failure == failure)
        .map(|r| r.seconds)
        .collect()
}

/// "63 MB" style, as the thesis names its files.
pub fn size_label(bytes: u64) -> String {
    if bytes >= 1_000_000_000 {
        format!("{:.1} GB", bytes as f64 / 1e9)
    } else {
        format!("{} MB", (bytes as f64 / 1e6).round())
    }
}

impl Report for HttpReport {
    fn table(&self) -> String {
        let mut out = format!(
            "HTTP download of {} ({} bytes), the primary DN failed at {:.0}% in the failure runs\n\n",
            size_label(self.size),
            self.size,
            self.fail_at * 100.0
        );
        let _ = writeln!(
            out,
            "{:<22} {:<8} {:>4} {:>8} {:>8} {:>8} {:>8}",
            "setup", "case", "runs", "mean s", "std dev", "95% CI", "median"
        );
        for (setup, runs) in &self.setups {
            let typical = Summary::of(&times(runs, false));
            let failure = Summary::of(&times(runs, true));
            for (case, s) in [("typical", typical), ("failure", failure)] {
                let _ = match s {
                    Some(s) => writeln!(
                        out,
                        "{:<22} {case:<8} {:>4} {:>8.3} {:>8.3} {:>8} {:>8.3}",
                        setup.name(),
                        s.n,
                        s.mean,
                        s.std_dev,
                        if s.ci95.is_finite() {
                            format!("±{:.3}", s.ci95)
                        } else {
                            "-".into()
                        },
                        s.median
                    ),
                    None => writeln!(out, "{:<22} {case:<8}    0 (no run measured)", setup.name()),
                };
            }
            if let (Some(t), Some(f)) = (typical, failure) {
                let d = Difference::between(&t, &f);
                let _ = writeln!(
                    out,
                    "{:<22} added by the failure: mean {:+.3} s (95% CI ±{:.3}), median {:+.3} s",
                    "", d.mean, d.mean_ci95, d.median
                );
            }
        }
        errors_section(&mut out, &self.errors);
        out
    }

    fn json(&self) -> serde_json::Value {
        let setups: Vec<serde_json::Value> = self
            .setups
            .iter()
            .map(|(setup, runs)| {
                let (typical, failure) = (times(runs, false), times(runs, true));
                let (ts, fs) = (Summary::of(&typical), Summary::of(&failure));
                let diff = ts.zip(fs).map(|(t, f)| Difference::between(&t, &f));
                setup_json(
                    setup,
                    json!({
                        "typical_s": typical,
                        "failure_s": failure,
                        "typical": ts,
                        "failure": fs,
                        "difference": diff,
                    }),
                )
            })
            .collect();
        report_json(
            json!({"experiment": "http", "size_bytes": self.size, "fail_at": self.fail_at}),
            setups,
            &self.errors,
            &["typical_s", "failure_s", "typical", "failure", "difference"],
        )
    }

    /// `http-<MB>.csv` (every run) and `http-<MB>.svg` (download time per run).
    fn write(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        create_dir(dir)?;
        let stem = format!("http-{}M", (self.size as f64 / 1e6).round());
        let csv_path = dir.join(format!("{stem}.csv"));
        let mut csv = "setup,esr,fail,dn_fd,size_bytes,case,run,seconds\n".to_owned();
        for (setup, runs) in &self.setups {
            for r in runs {
                let _ = writeln!(
                    csv,
                    "{},{},{},{},{:.6}",
                    setup_csv(setup),
                    self.size,
                    if r.failure { "failure" } else { "typical" },
                    r.run,
                    r.seconds
                );
            }
        }
        std::fs::write(&csv_path, csv)?;
        let svg_path = dir.join(format!("{stem}.svg"));
        let mut series = Vec::new();
        for (setup, runs) in &self.setups {
            series.push((format!("{} typical", setup.name()), times(runs, false)));
            series.push((format!("{} failure", setup.name()), times(runs, true)));
        }
        plot::per_run(
            &svg_path,
            &format!(
                "Download time of {} with and without a failure at {:.0}%",
                size_label(self.size),
                self.fail_at * 100.0
            ),
            "seconds",
            &series,
        )?;
        Ok(vec![csv_path, svg_path])
    }

    fn errors(&self) -> &[String] {
        &self.errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_output_gives_sent_answered_and_runs_of_losses() {
        let text = "PING 10.0.2.1 (10.0.2.1) 56(84) bytes of data.\n\
            64 bytes from 10.0.2.1: icmp_seq=1 ttl=62 time=0.31 ms\n\
            64 bytes from 10.0.2.1: icmp_seq=2 ttl=62 time=0.29 ms\n\
            64 bytes from 10.0.2.1: icmp_seq=2 ttl=62 time=0.29 ms (DUP!)\n\
            64 bytes from 10.0.2.1: icmp_seq=5 ttl=62 time=0.30 ms\n\
            64 bytes from 10.0.2.1: icmp_seq=7 ttl=62 time=0.30 ms\n\
            \n--- 10.0.2.1 ping statistics ---\n\
            8 packets transmitted, 4 received, 50% packet loss, time 70ms\n";
        let (sent, answered) = parse_ping_replies(text).unwrap();
        assert_eq!(sent, 8);
        assert_eq!(answered.into_iter().collect::<Vec<_>>(), vec![1, 2, 5, 7]);
        let answered: BTreeSet<u32> = [1, 2, 5, 7].into();
        // Missing: 3, 4 (a run of 2), 6, 8.
        assert_eq!(losses(8, &answered), (4, 2));
        assert_eq!(losses(3, &[1, 2, 3].into()), (0, 0));
        assert_eq!(losses(3, &BTreeSet::new()), (3, 3));
        assert!(parse_ping_replies("garbage").is_err());
    }

    #[test]
    fn setups_multiply_out_and_name_themselves() {
        let m = Setup::matrix(
            &[Routing::Frr, Routing::Bird],
            &[Failure::Kill, Failure::Host],
            &[false, true],
        );
        assert_eq!(m.len(), 8);
        assert_eq!(m[0].name(), "frr kill");
        assert_eq!(m[1].name(), "frr kill dn-fd");
        assert_eq!(m[7].name(), "bird host dn-fd");
        assert_eq!(size_label(63_000_000), "63 MB");
        assert_eq!(size_label(625_000_000), "625 MB");
    }

    #[test]
    fn log_times_read_as_unix_seconds() {
        let line = "\u{1b}[2m2026-12-02T19:21:40.685071Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m primary session";
        let t = log_time(line).unwrap();
        assert!((t - 1_796_239_300.685_071).abs() < 1e-6, "{t}");
        assert_eq!(log_time("1970-01-01T00:00:01.5Z x"), Some(1.5));
        assert_eq!(log_time("no time here"), None);
        assert_eq!(first_switch_after(line, t + 1.0), None);
        assert_eq!(first_switch_after(line, t - 1.0), Some(t));
    }

    #[test]
    fn reports_render_tables_json_csv_and_charts() {
        let setup = Setup {
            esr: Routing::Frr,
            fail: Failure::Kill,
            dn_fd: false,
        };
        let icmp = IcmpReport {
            rate: 100,
            load: Load::None,
            kills: 1,
            idle_secs: 0,
            setups: vec![(
                setup,
                (1..=3)
                    .map(|run| IcmpRun {
                        setup: setup.name(),
                        run,
                        sent: 500,
                        lost: run as u32 - 1,
                        consecutive: run as u32 - 1,
                        switch_ms: Some(5.0),
                    })
                    .collect(),
            )],
            errors: vec![],
        };
        assert!(icmp.table().contains("frr kill"));
        let j = icmp.json();
        assert_eq!(j["lost"], json!([0, 1, 2]));
        assert_eq!(j["summary"]["median"], 1.0);
        let http = HttpReport {
            size: 63_000_000,
            fail_at: 0.4,
            setups: vec![(
                setup,
                vec![
                    HttpRun {
                        setup: setup.name(),
                        failure: false,
                        run: 1,
                        seconds: 1.0,
                    },
                    HttpRun {
                        setup: setup.name(),
                        failure: false,
                        run: 2,
                        seconds: 1.2,
                    },
                    HttpRun {
                        setup: setup.name(),
                        failure: true,
                        run: 1,
                        seconds: 1.5,
                    },
                    HttpRun {
                        setup: setup.name(),
                        failure: true,
                        run: 2,
                        seconds: 1.7,
                    },
                ],
            )],
            errors: vec![],
        };
        let j = http.json();
        assert_eq!(j["typical_s"], json!([1.0, 1.2]));
        assert_eq!(j["failure_s"], json!([1.5, 1.7]));
        assert!((j["difference"]["median"].as_f64().unwrap() - 0.5).abs() < 1e-9);
        assert!(http.table().contains("added by the failure: mean +0.500 s"));
        let dir = std::env::temp_dir().join(format!("hf-exp-{}", std::process::id()));
        let files = [icmp.write(&dir).unwrap(), http.write(&dir).unwrap()].concat();
        let csv = std::fs::read_to_string(&files[0]).unwrap();
        assert_eq!(csv.lines().count(), 4);
        assert!(csv
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("frr kill,frr,kill,false,100,1,500,0,0"));
        let csv = std::fs::read_to_string(&files[2]).unwrap();
        assert!(csv.contains("frr kill,frr,kill,false,63000000,failure,2,1.700000"));
        for f in &files {
            assert!(f.exists());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
