//! Real traffic through the lab: a Python HTTP server and curl, iperf3, ping.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::netns::{wait_until, Netns};

pub const HTTP_PORT: u16 = 8080;

/// A file of random bytes and its digest.
pub struct Blob {
    pub path: PathBuf,
    pub size: u64,
    pub sha256: String,
}

/// Writes `size` random bytes to `dir/name` (random so no layer can compress them away).
pub fn make_blob(dir: &Path, name: &str, size: u64) -> Result<Blob> {
    fs::create_dir_all(dir)?;
    let path = dir.join(name);
    let mut file = std::io::BufWriter::new(
        fs::File::create(&path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 1 << 20];
    let mut left = size;
    let mut rng = rand::thread_rng();
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        rng.fill_bytes(&mut chunk[..n]);
        hasher.update(&chunk[..n]);
        file.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    file.flush()?;
    Ok(Blob {
        path,
        size,
        sha256: hex::encode(hasher.finalize()),
    })
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file =
        fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Serves `dir` over HTTP on `addr:HTTP_PORT` in `role` (Python's http.server), ready on return.
pub fn serve_http(net: &mut Netns, role: &str, dir: &Path, addr: &str) -> Result<()> {
    let port = HTTP_PORT.to_string();
    let dir_s = dir.display().to_string();
    net.spawn(
        role,
        "http-server",
        &[
            "python3",
            "-m",
            "http.server",
            "--bind",
            addr,
            "--directory",
            &dir_s,
            &port,
        ],
        &[],
    )?;
    let url = format!("http://{addr}:{port}/");
    wait_until(Duration::from_secs(10), "the HTTP server", || {
        net.try_exec(
            role,
            &["curl", "-s", "-o", "/dev/null", "--max-time", "1", &url],
        )
        .is_ok_and(|o| o.status.success())
    })
}

/// A finished download.
pub struct Download {
    pub seconds: f64,
    pub bytes: u64,
}

/// Downloads `url` with curl in `role` into `out`.
pub fn download(
    net: &Netns,
    role: &str,
    url: &str,
    out: &Path,
    timeout: Duration,
) -> Result<Download> {
    let out_s = out.display().to_string();
    let max = timeout.as_secs().to_string();
    let output = net.exec(
        role,
        &[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            &max,
            "-o",
            &out_s,
            "-w",
            "%{time_total} %{size_download}",
            url,
        ],
    )?;
    let text = String::from_utf8_lossy(&output.stdout);
    let mut parts = text.split_whitespace();
    let seconds = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("curl printed no time: {text}"))?;
    let bytes = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("curl printed no size: {text}"))?;
    Ok(Download { seconds, bytes })
}

/// A curl download of `url` into `out` in `role`, paced to `rate_mib` MiB/s so that it lasts
/// long enough for a failure to land in it; prints its total time on stdout. Not started.
pub fn paced_download(
    net: &Netns,
    role: &str,
    url: &str,
    out: &Path,
    rate_mib: u64,
) -> std::process::Command {
    let rate = format!("{rate_mib}M");
    let out_s = out.display().to_string();
    let mut curl = net.command(
        role,
        &[
            "curl",
            "-sS",
            "--fail",
            "--max-time",
            "600",
            "--limit-rate",
            &rate,
            "-o",
            &out_s,
            "-w",
            "%{time_total}",
            url,
        ],
    );
    curl.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    curl
}

/// What an iperf3 run measured.
pub struct Iperf {
    /// Receiver's rate over the measured period, in Mbit/s.
    pub mbps: f64,
    /// Bytes sent over the whole run, the omitted warm-up second included (the CPU figures
    /// cover the whole run too).
    pub bytes: u64,
    /// UDP: the share of datagrams the receiver never got, in percent.
    pub lost_percent: Option<f64>,
}

/// Starts a one-test iperf3 server on `server_addr` in `server_role` and waits until it
/// listens; returns its process name in the lab.
fn iperf3_server(net: &mut Netns, server_role: &str, server_addr: &str) -> Result<String> {
    let name = format!("iperf3-server-{}", rand::random::<u32>());
    net.spawn(
        server_role,
        &name,
        &["iperf3", "-s", "-1", "-B", server_addr],
        &[],
    )?;
    // Poll until the server listens rather than sleeping a fixed time and hoping.
    let listening = wait_until(Duration::from_secs(5), "iperf3 to listen", || {
        net.try_exec(server_role, &["ss", "-Htln", "sport", "= :5201"])
            .is_ok_and(|o| !o.stdout.is_empty())
    });
    if let Err(e) = listening {
        let _ = net.stop(&name, libc::SIGTERM);
        return Err(e);
    }
    Ok(name)
}

/// What an iperf3 run does: TCP from the client by default.
#[derive(Debug, Clone, Default)]
pub struct IperfTest {
    /// Data flows from the server to the client (`-R`).
    pub reverse: bool,
    /// Parallel streams (`-P`); 0 or 1 is one stream.
    pub streams: u32,
    /// UDP at this offered rate (iperf3's `-b`, e.g. "1G") with 1200-byte datagrams, which fit
    /// every tunnel's MTU.
    pub udp_rate: Option<String>,
}

/// iperf3 TCP throughput from `client_role` to `server_addr` in `server_role`.
pub fn iperf3(
    net: &mut Netns,
    server_role: &str,
    client_role: &str,
    server_addr: &str,
    seconds: u32,
) -> Result<Iperf> {
    iperf3_test(
        net,
        server_role,
        client_role,
        server_addr,
        seconds,
        &IperfTest::default(),
    )
}

/// One iperf3 run of `test` between `client_role` and `server_addr` in `server_role`. The
/// first second is omitted from the rate (TCP's slow start).
pub fn iperf3_test(
    net: &mut Netns,
    server_role: &str,
    client_role: &str,
    server_addr: &str,
    seconds: u32,
    test: &IperfTest,
) -> Result<Iperf> {
    let name = iperf3_server(net, server_role, server_addr)?;
    let secs = seconds.to_string();
    let streams = test.streams.max(1).to_string();
    let mut argv = vec![
        "iperf3",
        "-c",
        server_addr,
        "-t",
        &secs,
        "-O",
        "1",
        "-P",
        &streams,
        "--json",
    ];
    if test.reverse {
        argv.push("-R");
    }
    if let Some(rate) = &test.udp_rate {
        argv.extend(["-u", "-b", rate, "-l", "1200"]);
    }
    let out = net.exec(client_role, &argv);
    let _ = net.stop(&name, libc::SIGTERM);
    let out = out?;
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("iperf3 printed no JSON")?;
    parse_iperf3(&json, test.udp_rate.is_some())
}

/// The receiver's rate and the bytes carried from iperf3's `--json` output.
fn parse_iperf3(json: &serde_json::Value, udp: bool) -> Result<Iperf> {
    let end = &json["end"];
    let lost_percent = if udp {
        Some(
            end["sum"]["lost_percent"]
                .as_f64()
                .ok_or_else(|| anyhow!("iperf3 UDP JSON has no end.sum.lost_percent: {json}"))?,
        )
    } else {
        None
    };
    // TCP: what the receiver got. UDP (iperf3 3.12 has no sum_received for it): the offered
    // rate less what the receiver reported lost.
    let mbps = match (
        end["sum_received"]["bits_per_second"].as_f64(),
        lost_percent,
    ) {
        (Some(b), _) => b / 1e6,
        (None, Some(lost)) => {
            end["sum"]["bits_per_second"]
                .as_f64()
                .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum: {json}"))?
                * (1.0 - lost / 100.0)
                / 1e6
        }
        (None, None) => bail!("iperf3 JSON has no end.sum_received: {json}"),
    };
    let bytes = json["intervals"]
        .as_array()
        .map(|v| v.iter().filter_map(|i| i["sum"]["bytes"].as_u64()).sum())
        .unwrap_or(0);
    Ok(Iperf {
        mbps,
        bytes,
        lost_percent,
    })
}

/// A bulk TCP stream running in the background (see [`bulk`]).
pub struct Bulk {
    server: String,
    client: std::process::Child,
    /// When the stream should be over, with a margin: a stalled stream is killed then.
    deadline: std::time::Instant,
}

/// Starts an iperf3 TCP stream of `seconds` between `client_role` and `server_addr` in
/// `server_role`: from the client, or to it with `download`; paced to `rate` (iperf3's `-b`,
/// e.g. "20M") if given. [`Bulk::finish`] waits for it.
pub fn bulk(
    net: &mut Netns,
    server_role: &str,
    client_role: &str,
    server_addr: &str,
    seconds: u32,
    download: bool,
    rate: Option<&str>,
) -> Result<Bulk> {
    let server = iperf3_server(net, server_role, server_addr)?;
    let secs = seconds.to_string();
    let mut argv = vec!["iperf3", "-c", server_addr, "-t", &secs, "--json"];
    if download {
        argv.push("-R");
    }
    if let Some(rate) = rate {
        argv.extend(["-b", rate]);
    }
    let client = net
        .command(client_role, &argv)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("cannot start iperf3")?;
    let deadline = std::time::Instant::now() + Duration::from_secs(u64::from(seconds) + 15);
    Ok(Bulk {
        server,
        client,
        deadline,
    })
}

impl Bulk {
    /// Waits for the stream to end; the bytes it carried (0 if iperf3 reported none).
    pub fn finish(mut self, net: &mut Netns) -> Result<u64> {
        // iperf3 waits forever for the end of a test whose connection died.
        while self.client.try_wait()?.is_none() && std::time::Instant::now() < self.deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.client.kill();
        let out = self.client.wait_with_output();
        let _ = net.stop(&self.server, libc::SIGTERM);
        let json: serde_json::Value = serde_json::from_slice(&out?.stdout).unwrap_or_default();
        Ok(json["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0))
    }
}

/// Round-trip times in microseconds of `count` pings at `interval` seconds.
pub fn ping_rtts(
    net: &Netns,
    role: &str,
    target: &str,
    count: u32,
    interval: &str,
) -> Result<Vec<f64>> {
    let count_s = count.to_string();
    let out = net.try_exec(
        role,
        &[
            "ping", "-n", "-c", &count_s, "-i", interval, "-W", "1", target,
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts = rtts_of(&text);
    if rtts.is_empty() {
        bail!("no ping replies from {target}: {text}");
    }
    Ok(rtts)
}

/// The round-trip times, in microseconds, of the replies in ping's output.
pub fn rtts_of(ping_output: &str) -> Vec<f64> {
    ping_output
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|ms| ms.parse::<f64>().ok())
        .map(|ms| ms * 1000.0)
        .collect()
}

/// A ping running in the background (`ping -i INTERVAL`), its output read as it prints (a long
/// stream would fill the pipe and stop ping). [`Pinger::stop`] ends it and counts.
pub struct Pinger {
    child: std::process::Child,
    printed: std::thread::JoinHandle<String>,
}

impl Pinger {
    pub fn start(net: &Netns, role: &str, target: &str, interval: &str) -> Result<Self> {
        let mut ping = net.command(role, &["ping", "-n", "-i", interval, "-W", "1", target]);
        ping.stdout(std::process::Stdio::piped());
        let mut child = ping.spawn().context("cannot start ping")?;
        let mut stdout = child.stdout.take().context("no ping output")?;
        let printed = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        Ok(Self { child, printed })
    }

    /// Interrupts ping; returns (sent, answered), read from its per-reply lines; a last request
    /// still unanswered at the interrupt is not counted.
    pub fn stop(self) -> Result<(u32, u32)> {
        let (sent, answered) = self.stop_with_replies()?;
        Ok((sent, answered.len() as u32))
    }

    /// As [`Pinger::stop`], with the sequence numbers answered.
    pub fn stop_with_replies(mut self) -> Result<(u32, std::collections::BTreeSet<u32>)> {
        // SAFETY: the pid of the ping this struct started (`ip netns exec` execs it).
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGINT) };
        self.child.wait()?;
        let printed = self
            .printed
            .join()
            .map_err(|_| anyhow::anyhow!("the ping reader failed"))?;
        let (sent, answered) = crate::experiment::parse_ping_replies(&printed)?;
        // The last request may still have been on its way when ping was interrupted: unanswered,
        // it is not counted (whatever is measured happens well before the stop).
        let sent = if sent > 0 && !answered.contains(&sent) {
            sent - 1
        } else {
            sent
        };
        Ok((sent, answered))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_hash_what_they_wrote() {
        let dir = std::env::temp_dir().join(format!("hf-blob-{}", std::process::id()));
        let blob = make_blob(&dir, "b", 3 << 20 | 5).unwrap();
        assert_eq!(sha256_file(&blob.path).unwrap(), blob.sha256);
        assert_eq!(fs::metadata(&blob.path).unwrap().len(), blob.size);
        fs::remove_dir_all(dir).unwrap();
    }
}
