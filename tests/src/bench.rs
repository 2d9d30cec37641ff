//! `lab bench`: throughput, latency and CPU cost of Holdfast, of wireguard-go and of the bare
//! veth path, measured one after another in the same lab.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::lab::{
    client_underlay_address, dn_address_for_client, Credential, Lab, LabSpec, SERVER, SERVER_NET,
};
use crate::netns::wait_until;
use crate::stats::percentile;
use crate::traffic::{iperf3, ping_rtts};

#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub mbps: f64,
    pub rtt_p50_us: f64,
    pub rtt_p99_us: f64,
    /// CPU seconds the tunnel's own processes (both ends) spent per GB carried.
    pub cpu_s_per_gb: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seconds: u32,
    pub holdfast: Figures,
    pub wireguard_go: Figures,
    pub veth: Figures,
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

/// Measures RTT, then throughput (and the CPU the `pids` spent on it) from client 1 to the server.
fn measure(lab: &mut Lab, seconds: u32, pids: &[u32]) -> Result<Figures> {
    let rtts = ping_rtts(&lab.net, "en1", SERVER, 200, "0.01")?;
    let before = total_cpu(pids)?;
    let run = iperf3(&mut lab.net, "srv", "en1", SERVER, seconds)?;
    let cpu = total_cpu(pids)? - before;
    let gigabytes = run.bytes as f64 / 1e9;
    Ok(Figures {
        mbps: run.mbps,
        rtt_p50_us: percentile(&rtts, 50.0),
        rtt_p99_us: percentile(&rtts, 99.0),
        cpu_s_per_gb: (!pids.is_empty() && gigabytes > 0.0).then(|| cpu / gigabytes),
    })
}

fn holdfast(lab: &mut Lab, seconds: u32) -> Result<Figures> {
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    lab.wait_address(1, Duration::from_secs(15))?;
    // Let path MTU discovery reach full-size datagrams before measuring.
    std::thread::sleep(Duration::from_secs(2));
    let pids: Vec<u32> = ["en1", "dn1"]
        .iter()
        .filter_map(|n| lab.net.pid(n))
        .collect();
    let figures = measure(lab, seconds, &pids)?;
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

fn wireguard_go(lab: &mut Lab, seconds: u32) -> Result<Figures> {
    // UAPI sockets live in /var/run/wireguard, shared by every namespace: names must differ.
    let (en_if, dn_if) = (format!("{}e", lab.net.id()), format!("{}d", lab.net.id()));
    let (en_priv, en_pub) = wg_key(lab)?;
    let (dn_priv, dn_pub) = wg_key(lab)?;
    // wireguard-go removes its socket on SIGTERM, but not when the lab is killed.
    for ifname in [&en_if, &dn_if] {
        lab.net
            .own_file(&Path::new("/var/run/wireguard").join(format!("{ifname}.sock")))?;
    }
    let dir = lab.net.dir.clone();
    std::fs::write(dir.join("wg-en.key"), &en_priv)?;
    std::fs::write(dir.join("wg-dn.key"), &dn_priv)?;
    lab.net.spawn(
        "en1",
        "wireguard-go-en",
        &["wireguard-go", "-f", &en_if],
        &[],
    )?;
    lab.net.spawn(
        "dn1",
        "wireguard-go-dn",
        &["wireguard-go", "-f", &dn_if],
        &[],
    )?;
    wait_until(Duration::from_secs(5), "wireguard-go interfaces", || {
        lab.net.exec("en1", &["ip", "link", "show", &en_if]).is_ok()
            && lab.net.exec("dn1", &["ip", "link", "show", &dn_if]).is_ok()
    })?;
    let en_key = dir.join("wg-en.key").display().to_string();
    let dn_key = dir.join("wg-dn.key").display().to_string();
    let endpoint = format!("{}:51820", dn_address_for_client(1));
    lab.net.exec(
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
    )?;
    lab.net.exec(
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
    )?;
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
    let pids: Vec<u32> = ["wireguard-go-en", "wireguard-go-dn"]
        .iter()
        .filter_map(|n| lab.net.pid(n))
        .collect();
    let figures = measure(lab, seconds, &pids);
    lab.net.stop("wireguard-go-en", libc::SIGTERM)?;
    lab.net.stop("wireguard-go-dn", libc::SIGTERM)?;
    let _ = lab.net.exec("en1", &["ip", "link", "del", &en_if]);
    let _ = lab.net.exec("dn1", &["ip", "link", "del", &dn_if]);
    figures
}

fn veth(lab: &mut Lab, seconds: u32) -> Result<Figures> {
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
    measure(lab, seconds, &[])
}

/// Runs all three setups in one lab.
pub fn run(seconds: u32) -> Result<Report> {
    let mut lab = Lab::start(&LabSpec::default())?;
    let holdfast = holdfast(&mut lab, seconds).with_context(|| lab.net.logs())?;
    let wireguard_go = wireguard_go(&mut lab, seconds).with_context(|| lab.net.logs())?;
    let veth = veth(&mut lab, seconds)?;
    Ok(Report {
        seconds,
        holdfast,
        wireguard_go,
        veth,
    })
}

impl Report {
    fn paths(&self) -> [(&'static str, &Figures); 3] {
        [
            ("holdfast", &self.holdfast),
            ("wireguard-go", &self.wireguard_go),
            ("veth (bare)", &self.veth),
        ]
    }
}

/// The bench reports like the experiments: a table, JSON, CSV and charts.
impl crate::experiment::Report for Report {
    /// `bench.csv` (one row per path) and bar charts of throughput and RTT.
    fn write(&self, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
        crate::experiment::create_dir(dir)?;
        let mut csv = "path,seconds,mbps,rtt_p50_us,rtt_p99_us,cpu_s_per_gb\n".to_owned();
        for (name, f) in self.paths() {
            csv += &format!(
                "{name},{},{:.1},{:.1},{:.1},{}\n",
                self.seconds,
                f.mbps,
                f.rtt_p50_us,
                f.rtt_p99_us,
                f.cpu_s_per_gb
                    .map(|c| format!("{c:.3}"))
                    .unwrap_or_default()
            );
        }
        let csv_path = dir.join("bench.csv");
        std::fs::write(&csv_path, csv)?;
        let throughput = dir.join("bench-throughput.svg");
        crate::plot::bars(
            &throughput,
            &format!(
                "TCP throughput, client to server (iperf3, {} s)",
                self.seconds
            ),
            "Mbit/s",
            &self.paths().map(|(n, f)| (n.to_owned(), f.mbps)),
        )?;
        let rtt = dir.join("bench-rtt.svg");
        crate::plot::bars(
            &rtt,
            "Round-trip time, median of 200 pings",
            "microseconds",
            &self.paths().map(|(n, f)| (n.to_owned(), f.rtt_p50_us)),
        )?;
        Ok(vec![csv_path, throughput, rtt])
    }

    fn json(&self) -> serde_json::Value {
        let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
        serde_json::json!({
            "seconds": self.seconds,
            "holdfast_mbps": self.holdfast.mbps,
            "wireguard_go_mbps": self.wireguard_go.mbps,
            "veth_mbps": self.veth.mbps,
            "holdfast_rtt_p50_us": self.holdfast.rtt_p50_us,
            "holdfast_rtt_p99_us": self.holdfast.rtt_p99_us,
            "wireguard_go_rtt_p50_us": self.wireguard_go.rtt_p50_us,
            "wireguard_go_rtt_p99_us": self.wireguard_go.rtt_p99_us,
            "veth_rtt_p50_us": self.veth.rtt_p50_us,
            "veth_rtt_p99_us": self.veth.rtt_p99_us,
            "holdfast_cpu_s_per_gb": self.holdfast.cpu_s_per_gb,
            "wireguard_go_cpu_s_per_gb": self.wireguard_go.cpu_s_per_gb,
            "throughput_ratio_holdfast_to_wireguard_go": ratio(self.holdfast.mbps, self.wireguard_go.mbps),
            "rtt_p50_ratio_holdfast_to_wireguard_go": ratio(self.holdfast.rtt_p50_us, self.wireguard_go.rtt_p50_us),
        })
    }

    fn table(&self) -> String {
        let row = |name: &str, f: &Figures| {
            format!(
                "{name:<14} {:>10.0} {:>10.0} {:>10.0} {:>12}\n",
                f.mbps,
                f.rtt_p50_us,
                f.rtt_p99_us,
                f.cpu_s_per_gb
                    .map(|c| format!("{c:.2}"))
                    .unwrap_or_else(|| "-".into())
            )
        };
        let mut out = format!(
            "{:<14} {:>10} {:>10} {:>10} {:>12}\n",
            "path", "Mbit/s", "RTT p50us", "RTT p99us", "CPU s/GB"
        );
        for (name, f) in self.paths() {
            out += &row(name, f);
        }
        out += &format!(
            "\nholdfast / wireguard-go: throughput x{:.2}, RTT p50 x{:.2}\n",
            self.holdfast.mbps / self.wireguard_go.mbps,
            self.holdfast.rtt_p50_us / self.wireguard_go.rtt_p50_us
        );
        out
    }

    /// Every figure is measured or the bench fails as a whole.
    fn errors(&self) -> &[String] {
        &[]
    }
}
