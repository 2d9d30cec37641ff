//! `lab bench`: throughput (TCP both ways, one stream and four, UDP), round-trip time idle and
//! under load, and the CPU cost of Holdfast, of userspace WireGuard (wireguard-go and
//! boringtun) and of the bare veth path, measured one after another in the same lab.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::lab::{
    client_underlay_address, dn_address_for_client, Credential, Lab, LabSpec, SERVER, SERVER_NET,
};
use crate::netns::wait_until;
use crate::stats::{median_of, percentile};
use crate::traffic::{iperf3_test, ping_rtts, rtts_of, IperfTest};

/// A setup the bench measures, in the order it measures them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Setup {
    Holdfast,
    WireguardGo,
    Boringtun,
    Veth,
}

impl Setup {
    pub const ALL: [Setup; 4] = [
        Setup::Holdfast,
        Setup::WireguardGo,
        Setup::Boringtun,
        Setup::Veth,
    ];

    /// As the table and the charts show it.
    fn label(self) -> &'static str {
        match self {
            Setup::Holdfast => "holdfast",
            Setup::WireguardGo => "wireguard-go",
            Setup::Boringtun => "boringtun",
            Setup::Veth => "veth (bare)",
        }
    }

    /// The userspace WireGuard daemon the setup runs, one per end, configured with `wg`: its
    /// program and the flags that keep it in the foreground.
    fn wireguard_daemon(self) -> Option<(&'static str, &'static [&'static str])> {
        match self {
            Setup::WireguardGo => Some(("wireguard-go", &["-f"])),
            // Its default drops root after start-up, which `wg set` then cannot reach.
            Setup::Boringtun => Some(("boringtun-cli", &["-f", "--disable-drop-privileges"])),
            Setup::Holdfast | Setup::Veth => None,
        }
    }

    /// The prefix of its keys in the JSON (`holdfast_mbps`, `wireguard_go_mbps`, ...).
    fn key(self) -> &'static str {
        match self {
            Setup::Holdfast => "holdfast",
            Setup::WireguardGo => "wireguard_go",
            Setup::Boringtun => "boringtun",
            Setup::Veth => "veth",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds of each iperf3 run.
    pub seconds: u32,
    /// The setups to measure.
    pub setups: Vec<Setup>,
    /// The UDP test's offered rate (iperf3's `-b`).
    pub udp_rate: String,
    /// Whole benches to run, each in a fresh lab; the report gives each figure's median and
    /// each ratio's median over the runs.
    pub runs: usize,
    /// Confine the bench (the tunnel's daemons, iperf3 and ping) to this many cores; `None`:
    /// every core this process may use.
    pub cores: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    /// TCP, one stream, client to server.
    pub mbps: f64,
    /// TCP, one stream, server to client.
    pub reverse_mbps: f64,
    /// TCP, four streams at once, client to server.
    pub streams4_mbps: f64,
    /// UDP, client to server, at the offered rate: what arrived.
    pub udp_mbps: f64,
    pub udp_lost_percent: f64,
    /// Idle: 200 pings at 10 ms.
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// Pings at 10 ms during the one-stream client-to-server run.
    pub loaded_rtt_p50_us: f64,
    pub loaded_rtt_p99_us: f64,
    /// CPU seconds the tunnel's own processes (both ends) spent per GB carried, each way.
    pub cpu_s_per_gb: Option<f64>,
    pub reverse_cpu_s_per_gb: Option<f64>,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Measured(Figures),
    /// Not measured, and why (a peer not installed).
    Skipped(String),
}

#[derive(Debug, Clone)]
pub struct Report {
    pub seconds: u32,
    pub udp_rate: String,
    /// Each figure is the median over this many runs.
    pub runs: usize,
    /// The cores everything ran on.
    pub cores: usize,
    pub setups: Vec<(Setup, Outcome)>,
    /// Every run's own figures, for the JSON (one entry when `runs` is 1).
    pub per_run: Vec<Vec<(Setup, Outcome)>>,
}

impl Figures {
    /// Each field's median over `all` (not empty).
    fn median(all: &[Figures]) -> Figures {
        let m = |field: fn(&Figures) -> f64| {
            let values: Vec<f64> = all.iter().map(field).filter(|v| v.is_finite()).collect();
            median_of(&values)
        };
        let cpu = |field: fn(&Figures) -> Option<f64>| {
            let values: Vec<f64> = all.iter().filter_map(field).collect();
            (!values.is_empty()).then(|| median_of(&values))
        };
        Figures {
            mbps: m(|f| f.mbps),
            reverse_mbps: m(|f| f.reverse_mbps),
            streams4_mbps: m(|f| f.streams4_mbps),
            udp_mbps: m(|f| f.udp_mbps),
            udp_lost_percent: m(|f| f.udp_lost_percent),
            rtt_p50_us: m(|f| f.rtt_p50_us),
            rtt_p99_us: m(|f| f.rtt_p99_us),
            loaded_rtt_p50_us: m(|f| f.loaded_rtt_p50_us),
            loaded_rtt_p99_us: m(|f| f.loaded_rtt_p99_us),
            cpu_s_per_gb: cpu(|f| f.cpu_s_per_gb),
            reverse_cpu_s_per_gb: cpu(|f| f.reverse_cpu_s_per_gb),
        }
    }
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks / hz)
}

/// A process's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

fn total_cpu(pids: &[u32]) -> Result<f64> {
    pids.iter().map(|p| cpu_seconds(*p)).sum()
}

/// One iperf3 run from client 1 to the server; returns the rate (Mbit/s), the UDP loss if UDP,
/// and the CPU seconds per GB the `pids` spent on it.
pub(crate) fn run(
    lab: &mut Lab,
    seconds: u32,
    pids: &[u32],
    test: &IperfTest,
) -> Result<(f64, Option<f64>, Option<f64>)> {
    let before = total_cpu(pids)?;
    let run = iperf3_test(&mut lab.net, "srv", "en1", SERVER, seconds, test)
        .with_context(|| format!("iperf3 {test:?}"))?;
    let cpu = total_cpu(pids)? - before;
    let gigabytes = run.bytes as f64 / 1e9;
    let per_gb = (!pids.is_empty() && gigabytes > 0.0).then(|| cpu / gigabytes);
    Ok((run.mbps, run.lost_percent, per_gb))
}

/// Pings the server every 10 ms from client 1 for `seconds`, starting `delay` from now, on a
/// thread of its own (to run beside an iperf3 run).
fn ping_in_background(
    lab: &Lab,
    delay: Duration,
    seconds: u32,
) -> std::thread::JoinHandle<Result<Vec<f64>>> {
    let deadline = seconds.max(1).to_string();
    let mut ping = lab.net.command(
        "en1",
        &[
            "ping", "-n", "-i", "0.01", "-w", &deadline, "-W", "1", SERVER,
        ],
    );
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let out = ping.output().context("cannot run ping")?;
        Ok(rtts_of(&String::from_utf8_lossy(&out.stdout)))
    })
}

/// Every figure of one setup, between client 1 and the server; `pids` are the tunnel's processes.
fn measure(lab: &mut Lab, o: &Options, pids: &[u32]) -> Result<Figures> {
    let rtts = ping_rtts(&lab.net, "en1", SERVER, 200, "0.01")?;
    // Pings under load skip the first second, which iperf3 omits too (slow start).
    let loaded = ping_in_background(lab, Duration::from_secs(1), o.seconds.saturating_sub(1));
    let forward = run(lab, o.seconds, pids, &IperfTest::default());
    let loaded = loaded
        .join()
        .map_err(|_| anyhow::anyhow!("the ping thread failed"))??;
    let (mbps, _, cpu_s_per_gb) = forward?;
    anyhow::ensure!(!loaded.is_empty(), "no ping replies under load");
    let reverse = IperfTest {
        reverse: true,
        ..IperfTest::default()
    };
    let (reverse_mbps, _, reverse_cpu_s_per_gb) = run(lab, o.seconds, pids, &reverse)?;
    let four = IperfTest {
        streams: 4,
        ..IperfTest::default()
    };
    let (streams4_mbps, _, _) = run(lab, o.seconds, pids, &four)?;
    let udp = IperfTest {
        udp_rate: Some(o.udp_rate.clone()),
        ..IperfTest::default()
    };
    let (udp_mbps, udp_lost, _) = run(lab, o.seconds, pids, &udp)?;
    Ok(Figures {
        mbps,
        reverse_mbps,
        streams4_mbps,
        udp_mbps,
        udp_lost_percent: udp_lost.unwrap_or(f64::NAN),
        rtt_p50_us: percentile(&rtts, 50.0),
        rtt_p99_us: percentile(&rtts, 99.0),
        loaded_rtt_p50_us: percentile(&loaded, 50.0),
        loaded_rtt_p99_us: percentile(&loaded, 99.0),
        cpu_s_per_gb,
        reverse_cpu_s_per_gb,
    })
}

/// Starts client 1 and waits until its session carries full-size datagrams; returns the
/// tunnel's processes (`en1`, `dn1`).
pub(crate) fn start_holdfast(lab: &mut Lab) -> Result<Vec<u32>> {
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    lab.wait_address(1, Duration::from_secs(15))?;
    // Let path MTU discovery reach full-size datagrams before measuring.
    std::thread::sleep(Duration::from_secs(2));
    Ok(["en1", "dn1"]
        .iter()
        .filter_map(|n| lab.net.pid(n))
        .collect())
}

fn holdfast(lab: &mut Lab, o: &Options) -> Result<Figures> {
    let pids = start_holdfast(lab)?;
    let figures = measure(lab, o, &pids)?;
    lab.net.stop("en1", libc::SIGTERM)?;
    lab.net.stop("dn1", libc::SIGTERM)?;
    Ok(figures)
}

fn wg_key(lab: &Lab) -> Result<(String, String)> {
    let private = lab.net.exec("dn1", &["wg", "genkey"])?;
    let private = String::from_utf8_lossy(&private.stdout).trim().to_owned();
    let mut cmd = lab.net.command("dn1", &["wg", "pubkey"]);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        use std::io::Write;
        stdin.write_all(private.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    Ok((
        private,
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
    ))
}

/// Where `program` is on the PATH, if anywhere.
fn installed(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

fn wireguard(lab: &mut Lab, o: &Options, program: &str, flags: &[&str]) -> Result<Figures> {
    // UAPI sockets live in /var/run/wireguard, shared by every namespace: names must differ.
    let (en_if, dn_if) = (format!("{}e", lab.net.id()), format!("{}d", lab.net.id()));
    let (en_priv, en_pub) = wg_key(lab)?;
    let (dn_priv, dn_pub) = wg_key(lab)?;
    // Both remove their socket on SIGTERM, but not when the lab is killed.
    for ifname in [&en_if, &dn_if] {
        lab.net
            .own_file(&Path::new("/var/run/wireguard").join(format!("{ifname}.sock")))?;
    }
    let dir = lab.net.dir.clone();
    std::fs::write(dir.join("wg-en.key"), &en_priv)?;
    std::fs::write(dir.join("wg-dn.key"), &dn_priv)?;
    let (en_name, dn_name) = (format!("{program}-en"), format!("{program}-dn"));
    for (role, name, ifname) in [("en1", &en_name, &en_if), ("dn1", &dn_name, &dn_if)] {
        let mut argv = vec![program];
        argv.extend_from_slice(flags);
        argv.push(ifname);
        lab.net.spawn(role, name, &argv, &[])?;
    }
    wait_until(Duration::from_secs(5), "WireGuard interfaces", || {
        lab.net.exec("en1", &["ip", "link", "show", &en_if]).is_ok()
            && lab.net.exec("dn1", &["ip", "link", "show", &dn_if]).is_ok()
    })?;
    let en_key = dir.join("wg-en.key").display().to_string();
    let dn_key = dir.join("wg-dn.key").display().to_string();
    let endpoint = format!("{}:51820", dn_address_for_client(1));
    // The UAPI socket can appear a moment after the interface.
    wait_until(
        Duration::from_secs(5),
        "the client's WireGuard socket",
        || {
            lab.net
                .exec(
                    "en1",
                    &[
                        "wg",
                        "set",
                        &en_if,
                        "private-key",
                        &en_key,
                        "peer",
                        &dn_pub,
                        "endpoint",
                        &endpoint,
                        "allowed-ips",
                        "0.0.0.0/0",
                    ],
                )
                .is_ok()
        },
    )?;
    wait_until(Duration::from_secs(5), "the DN's WireGuard socket", || {
        lab.net
            .exec(
                "dn1",
                &[
                    "wg",
                    "set",
                    &dn_if,
                    "private-key",
                    &dn_key,
                    "listen-port",
                    "51820",
                    "peer",
                    &en_pub,
                    "allowed-ips",
                    "10.200.0.2/32",
                ],
            )
            .is_ok()
    })?;
    lab.net.exec(
        "en1",
        &["ip", "addr", "add", "10.200.0.2/32", "dev", &en_if],
    )?;
    lab.net
        .exec("en1", &["ip", "link", "set", &en_if, "mtu", "1420", "up"])?;
    lab.net
        .exec("en1", &["ip", "route", "add", SERVER_NET, "dev", &en_if])?;
    lab.net.exec(
        "dn1",
        &["ip", "addr", "add", "10.200.0.1/24", "dev", &dn_if],
    )?;
    lab.net
        .exec("dn1", &["ip", "link", "set", &dn_if, "mtu", "1420", "up"])?;
    let pids: Vec<u32> = [&en_name, &dn_name]
        .iter()
        .filter_map(|n| lab.net.pid(n))
        .collect();
    let figures = measure(lab, o, &pids);
    lab.net.stop(&en_name, libc::SIGTERM)?;
    lab.net.stop(&dn_name, libc::SIGTERM)?;
    let _ = lab.net.exec("en1", &["ip", "link", "del", &en_if]);
    let _ = lab.net.exec("dn1", &["ip", "link", "del", &dn_if]);
    figures
}

fn veth(lab: &mut Lab, o: &Options) -> Result<Figures> {
    lab.net.exec(
        "en1",
        &[
            "ip",
            "route",
            "replace",
            SERVER_NET,
            "via",
            &dn_address_for_client(1),
        ],
    )?;
    let client_net = format!("{}/32", client_underlay_address(1));
    lab.net.exec(
        "srv",
        &["ip", "route", "replace", &client_net, "via", "10.0.2.1"],
    )?;
    measure(lab, o, &[])
}

/// Measures the setups of `o` one after another in one lab.
fn run_once(o: &Options) -> Result<Vec<(Setup, Outcome)>> {
    let mut lab = Lab::start(&LabSpec::default())?;
    let mut setups = Vec::new();
    for setup in Setup::ALL {
        if !o.setups.contains(&setup) {
            continue;
        }
        eprintln!("lab bench: {} ...", setup.label());
        let outcome = match (setup, setup.wireguard_daemon()) {
            (_, Some((program, flags))) if installed(program).is_some() => {
                Outcome::Measured(wireguard(&mut lab, o, program, flags)?)
            }
            (_, Some((program, _))) => Outcome::Skipped(format!(
                "{program} is not installed (scripts/install-deps.sh installs it)"
            )),
            (Setup::Holdfast, None) => Outcome::Measured(holdfast(&mut lab, o)?),
            (_, None) => Outcome::Measured(veth(&mut lab, o)?),
        };
        setups.push((setup, outcome));
    }
    Ok(setups)
}

/// Runs the bench `o.runs` times, each in a fresh lab; the report's figures are the medians.
pub fn run_all(o: &Options) -> Result<Report> {
    let cores = run_on_cores(o.cores)?;
    let runs = o.runs.max(1);
    let mut per_run = Vec::with_capacity(runs);
    for run in 1..=runs {
        if runs > 1 {
            eprintln!("lab bench: run {run} of {runs}");
        }
        per_run.push(run_once(o)?);
    }
    let mut setups = Vec::new();
    for (i, (setup, first)) in per_run[0].iter().enumerate() {
        let measured: Vec<Figures> = per_run
            .iter()
            .filter_map(|r| match r.get(i) {
                Some((_, Outcome::Measured(f))) => Some(f.clone()),
                _ => None,
            })
            .collect();
        let outcome = if measured.is_empty() {
            first.clone()
        } else {
            Outcome::Measured(Figures::median(&measured))
        };
        setups.push((*setup, outcome));
    }
    Ok(Report {
        seconds: o.seconds,
        udp_rate: o.udp_rate.clone(),
        runs,
        cores,
        setups,
        per_run,
    })
}

/// Confines what the calling thread starts from now on to the first `asked` cores (see
/// [`confine_to_cores`]), or to every core it may use when `None`; returns how many that is.
pub(crate) fn run_on_cores(asked: Option<usize>) -> Result<usize> {
    Ok(match asked {
        Some(n) => confine_to_cores(n)?.len(),
        None => allowed_cores()?.len(),
    })
}

/// The footer's words for where a measurement ran: "Everything ran on 2 cores."
pub(crate) fn ran_on(cores: usize) -> String {
    let plural = if cores == 1 { "" } else { "s" };
    format!("Everything ran on {cores} core{plural}.")
}

/// The cores the calling thread may run on.
pub fn allowed_cores() -> Result<Vec<usize>> {
    // SAFETY: `cpu_set_t` is plain bits, and the kernel writes at most the size it is given.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("cannot read the CPU affinity");
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&core| unsafe { libc::CPU_ISSET(core, &set) })
        .collect())
}

/// Confines the calling thread, and so every thread and process it starts from now on (the
/// lab's daemons, iperf3 and ping), to the first `n` of the cores it may use; returns those.
/// The same bench on fewer cores shows how each path's figures grow with cores.
pub fn confine_to_cores(n: usize) -> Result<Vec<usize>> {
    let allowed = allowed_cores()?;
    anyhow::ensure!(
        (1..=allowed.len()).contains(&n),
        "cannot run on {n} cores: this process may use {} ({allowed:?})",
        allowed.len()
    );
    let chosen = allowed[..n].to_vec();
    // SAFETY: as in `allowed_cores`; every index is below CPU_SETSIZE.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &core in &chosen {
        unsafe { libc::CPU_SET(core, &mut set) };
    }
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot confine the bench to cores {chosen:?}"));
    }
    Ok(chosen)
}

impl Report {
    fn measured(&self) -> impl Iterator<Item = (Setup, &Figures)> {
        self.setups.iter().filter_map(|(s, o)| match o {
            Outcome::Measured(f) => Some((*s, f)),
            Outcome::Skipped(_) => None,
        })
    }

    /// `a`'s figure over `b`'s, where both were measured (see [`Report::ratio`]).
    fn between(&self, a: Setup, b: Setup, figure: fn(&Figures) -> f64) -> Option<f64> {
        self.ratio(|run| {
            let (a, b) = (figure(measured_in(run, a)?), figure(measured_in(run, b)?));
            (b > 0.0).then(|| a / b)
        })
    }

    /// `a`'s figure as a percentage of `b`'s.
    fn percent(&self, a: Setup, b: Setup, figure: fn(&Figures) -> f64) -> Option<f64> {
        self.between(a, b, figure).map(|r| 100.0 * r)
    }

    /// A ratio taken within each run, and its median over the runs: the two figures of a run
    /// were measured in one lab a minute apart, while the machine's speed drifts by tens of
    /// percent between runs, so a ratio of two medians (taken from different runs) would
    /// carry that drift.
    fn ratio(&self, of_run: impl Fn(&[(Setup, Outcome)]) -> Option<f64>) -> Option<f64> {
        let ratios: Vec<f64> = self
            .per_run
            .iter()
            .filter_map(|run| of_run(run))
            .filter(|r| r.is_finite())
            .collect();
        (!ratios.is_empty()).then(|| median_of(&ratios))
    }

    /// Holdfast's four-stream upload over its one-stream upload.
    fn streams4_to_one(&self) -> Option<f64> {
        self.ratio(|run| {
            let h = measured_in(run, Setup::Holdfast)?;
            (h.mbps > 0.0).then(|| h.streams4_mbps / h.mbps)
        })
    }

    fn chart(
        &self,
        path: &Path,
        title: &str,
        unit: &str,
        figure: fn(&Figures) -> f64,
    ) -> Result<()> {
        let bars: Vec<(String, f64)> = self
            .measured()
            .map(|(s, f)| (s.label().to_owned(), figure(f)))
            .collect();
        crate::plot::bars(path, title, unit, &bars)
    }
}

/// `setup`'s figures in one run, if it was measured there.
fn measured_in(run: &[(Setup, Outcome)], setup: Setup) -> Option<&Figures> {
    run.iter().find_map(|(s, o)| match o {
        Outcome::Measured(f) if *s == setup => Some(f),
        _ => None,
    })
}

/// `{setup}_{figure}` for every measured setup's figures, and `skipped` with the reasons.
fn setups_json(setups: &[(Setup, Outcome)]) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    let mut skipped = serde_json::Map::new();
    for (setup, outcome) in setups {
        let f = match outcome {
            Outcome::Measured(f) => f,
            Outcome::Skipped(why) => {
                skipped.insert(setup.key().into(), why.clone().into());
                continue;
            }
        };
        let k = setup.key();
        if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(f) {
            for (name, value) in fields {
                // The tunnels' CPU; the bare path has none to count.
                if value.is_null() {
                    continue;
                }
                m.insert(format!("{k}_{name}"), value);
            }
        }
    }
    m.insert("skipped".into(), skipped.into());
    m
}

fn forward(f: &Figures) -> f64 {
    f.mbps
}
fn reverse(f: &Figures) -> f64 {
    f.reverse_mbps
}

/// The bench reports like the experiments: a table, JSON, CSV and charts.
impl crate::experiment::Report for Report {
    /// `bench.csv` (one row per setup) and bar charts of throughput and RTT.
    fn write(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        crate::experiment::create_dir(dir)?;
        let mut csv = "path,seconds,mbps,reverse_mbps,streams4_mbps,udp_mbps,udp_lost_percent,\
                       rtt_p50_us,rtt_p99_us,loaded_rtt_p50_us,loaded_rtt_p99_us,cpu_s_per_gb,\
                       reverse_cpu_s_per_gb\n"
            .to_owned();
        let cpu = |c: Option<f64>| c.map(|c| format!("{c:.3}")).unwrap_or_default();
        for (setup, f) in self.measured() {
            csv += &format!(
                "{},{},{:.1},{:.1},{:.1},{:.1},{:.3},{:.1},{:.1},{:.1},{:.1},{},{}\n",
                setup.label(),
                self.seconds,
                f.mbps,
                f.reverse_mbps,
                f.streams4_mbps,
                f.udp_mbps,
                f.udp_lost_percent,
                f.rtt_p50_us,
                f.rtt_p99_us,
                f.loaded_rtt_p50_us,
                f.loaded_rtt_p99_us,
                cpu(f.cpu_s_per_gb),
                cpu(f.reverse_cpu_s_per_gb),
            );
        }
        let csv_path = dir.join("bench.csv");
        std::fs::write(&csv_path, csv)?;
        let s = self.seconds;
        let charts = [
            (
                "bench-throughput.svg",
                format!("TCP throughput, one stream, client to server (iperf3, {s} s)"),
                "Mbit/s",
                forward as fn(&Figures) -> f64,
            ),
            (
                "bench-reverse.svg",
                format!("TCP throughput, one stream, server to client (iperf3 -R, {s} s)"),
                "Mbit/s",
                reverse,
            ),
            (
                "bench-streams4.svg",
                format!("TCP throughput, four streams, client to server (iperf3 -P 4, {s} s)"),
                "Mbit/s",
                |f| f.streams4_mbps,
            ),
            (
                "bench-rtt.svg",
                "Round-trip time, median of 200 pings, idle".to_owned(),
                "microseconds",
                |f| f.rtt_p50_us,
            ),
            (
                "bench-rtt-loaded.svg",
                "Round-trip time, median, during the one-stream upload".to_owned(),
                "microseconds",
                |f| f.loaded_rtt_p50_us,
            ),
        ];
        let mut files = vec![csv_path];
        for (name, title, unit, figure) in charts {
            let path = dir.join(name);
            self.chart(&path, &title, unit, figure)?;
            files.push(path);
        }
        Ok(files)
    }

    fn json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert("seconds".into(), self.seconds.into());
        m.insert("udp_rate".into(), self.udp_rate.clone().into());
        m.insert("runs".into(), self.runs.into());
        m.insert("cores".into(), self.cores.into());
        m.extend(setups_json(&self.setups));
        if self.runs > 1 {
            let runs: Vec<serde_json::Value> = self
                .per_run
                .iter()
                .map(|run| serde_json::Value::Object(setups_json(run)))
                .collect();
            m.insert("per_run".into(), runs.into());
        }
        let pct = |a, b, figure| self.percent(a, b, figure);
        m.insert(
            "holdfast_percent_of_veth".into(),
            pct(Setup::Holdfast, Setup::Veth, forward).into(),
        );
        m.insert(
            "holdfast_reverse_percent_of_veth".into(),
            pct(Setup::Holdfast, Setup::Veth, reverse).into(),
        );
        // Present whenever their setups were measured (null when a ratio cannot be taken).
        let measured = |setup| self.measured().any(|(s, _)| s == setup);
        if measured(Setup::Holdfast) {
            m.insert(
                "holdfast_streams4_to_one".into(),
                self.streams4_to_one().into(),
            );
            if measured(Setup::WireguardGo) {
                let to_wg = |figure| self.between(Setup::Holdfast, Setup::WireguardGo, figure);
                m.insert(
                    "throughput_ratio_holdfast_to_wireguard_go".into(),
                    to_wg(forward).into(),
                );
                m.insert(
                    "rtt_p50_ratio_holdfast_to_wireguard_go".into(),
                    to_wg(|f| f.rtt_p50_us).into(),
                );
            }
        }
        serde_json::Value::Object(m)
    }

    fn table(&self) -> String {
        let cpu = |c: Option<f64>| c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "-".into());
        let mut out = format!(
            "{:<13} {:>10} {:>10} {:>10} {:>15} {:>9} {:>9} {:>9} {:>9} {:>9}\n",
            "path",
            "up Mbit/s",
            "down",
            "4x up",
            "UDP up (lost)",
            "RTT p50",
            "loaded",
            "p99 load",
            "CPU s/GB",
            "down"
        );
        for (setup, outcome) in &self.setups {
            match outcome {
                Outcome::Measured(f) => {
                    out += &format!(
                        "{:<13} {:>10.0} {:>10.0} {:>10.0} {:>15} {:>9.0} {:>9.0} {:>9.0} {:>9} {:>9}\n",
                        setup.label(),
                        f.mbps,
                        f.reverse_mbps,
                        f.streams4_mbps,
                        format!("{:.0} ({:.1}%)", f.udp_mbps, f.udp_lost_percent),
                        f.rtt_p50_us,
                        f.loaded_rtt_p50_us,
                        f.loaded_rtt_p99_us,
                        cpu(f.cpu_s_per_gb),
                        cpu(f.reverse_cpu_s_per_gb),
                    )
                }
                Outcome::Skipped(why) => out += &format!("{:<13} skipped: {why}\n", setup.label()),
            }
        }
        out += &format!(
            "\nTCP runs {} s each (the first omitted), UDP offered at {} in 1200-byte datagrams; \
             RTT in microseconds, idle (200 pings) and during the upload. {}\n",
            self.seconds,
            self.udp_rate,
            ran_on(self.cores)
        );
        if self.runs > 1 {
            out += &format!(
                "Each figure is the median of {} runs; each ratio below the median of the runs' own ratios.\n",
                self.runs
            );
        }
        let pct = |figure| self.percent(Setup::Holdfast, Setup::Veth, figure);
        if let (Some(up), Some(down)) = (pct(forward), pct(reverse)) {
            out += &format!("holdfast, one stream: {up:.1}% of veth up, {down:.1}% down\n");
        }
        if let Some(x) = self.streams4_to_one() {
            out += &format!("holdfast, four streams: x{x:.2} of one\n");
        }
        for peer in [Setup::WireguardGo, Setup::Boringtun] {
            let to = |figure| self.between(Setup::Holdfast, peer, figure);
            if let (Some(up), Some(down), Some(rtt)) =
                (to(forward), to(reverse), to(|f| f.rtt_p50_us))
            {
                out += &format!(
                    "holdfast / {}: throughput x{up:.2} up, x{down:.2} down, RTT p50 x{rtt:.2}\n",
                    peer.label(),
                );
            }
        }
        out
    }

    /// Every figure is measured or the bench fails as a whole (a peer not installed is
    /// reported as skipped).
    fn errors(&self) -> &[String] {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(mbps: f64, reverse_mbps: f64, streams4_mbps: f64) -> Figures {
        Figures {
            mbps,
            reverse_mbps,
            streams4_mbps,
            udp_mbps: 0.0,
            udp_lost_percent: 0.0,
            rtt_p50_us: 100.0,
            rtt_p99_us: 100.0,
            loaded_rtt_p50_us: 100.0,
            loaded_rtt_p99_us: 100.0,
            cpu_s_per_gb: None,
            reverse_cpu_s_per_gb: None,
        }
    }

    /// Runs of (Holdfast up, veth up), in a report as `run_all` makes it.
    fn report(runs: &[(f64, f64)]) -> Report {
        let per_run: Vec<Vec<(Setup, Outcome)>> = runs
            .iter()
            .map(|&(h, v)| {
                vec![
                    (Setup::Holdfast, Outcome::Measured(figures(h, h, 2.0 * h))),
                    (Setup::Veth, Outcome::Measured(figures(v, v, 4.0 * v))),
                ]
            })
            .collect();
        let setups = [Setup::Holdfast, Setup::Veth]
            .into_iter()
            .enumerate()
            .map(|(i, setup)| {
                let all: Vec<Figures> = per_run
                    .iter()
                    .filter_map(|run| match &run[i].1 {
                        Outcome::Measured(f) => Some(f.clone()),
                        Outcome::Skipped(_) => None,
                    })
                    .collect();
                (setup, Outcome::Measured(Figures::median(&all)))
            })
            .collect();
        Report {
            seconds: 5,
            udp_rate: "1G".into(),
            runs: runs.len(),
            cores: 2,
            setups,
            per_run,
        }
    }

    #[test]
    fn the_bench_confines_itself_to_the_cores_asked_for() {
        // On a thread of its own: affinity is per thread, and the test harness's others keep theirs.
        std::thread::spawn(|| {
            let all = allowed_cores().unwrap();
            assert!(!all.is_empty());
            assert!(confine_to_cores(0).is_err());
            assert!(confine_to_cores(all.len() + 1).is_err());
            assert_eq!(confine_to_cores(1).unwrap(), all[..1]);
            assert_eq!(allowed_cores().unwrap(), all[..1]);
            // What this thread starts inherits it.
            let child = std::thread::spawn(|| allowed_cores().unwrap())
                .join()
                .unwrap();
            assert_eq!(child, all[..1]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn a_share_of_veth_is_the_median_of_each_runs_own_share() {
        // Shares 12.5%, 30% and 33.3%: their median is 30%; the ratio of the medians
        // (3000 / 12000 = 25%) would mix figures of different runs.
        let r = report(&[(2000.0, 16000.0), (3000.0, 10000.0), (4000.0, 12000.0)]);
        let up = r.percent(Setup::Holdfast, Setup::Veth, forward);
        assert_eq!(up.map(|p| (p * 10.0).round() / 10.0), Some(30.0));
        assert_eq!(r.streams4_to_one(), Some(2.0));
    }

    #[test]
    fn a_setup_missing_from_a_run_leaves_that_run_out() {
        let mut r = report(&[(3000.0, 10000.0), (1000.0, 10000.0)]);
        r.per_run[1].retain(|(s, _)| *s != Setup::Veth);
        let up = r.percent(Setup::Holdfast, Setup::Veth, forward);
        assert_eq!(up.map(|p| p.round()), Some(30.0));
        assert_eq!(
            r.between(Setup::Holdfast, Setup::WireguardGo, forward),
            None
        );
    }
}
