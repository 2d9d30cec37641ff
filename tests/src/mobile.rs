//! `lab mobile`: what a laptop or a phone does to its tunnel, each case against the real
//! binaries.
//!
//! Every case gets a fresh lab: two DNs with FRR and an ESR, and one client behind an access
//! router (`ap1`) that it reaches over two uplinks, `wifi` (preferred) and `lte`, as a laptop
//! with a phone's hotspot or a phone with Wi-Fi and a mobile network has; in the NAT cases the
//! router masquerades the client with random ports (nftables), as home routers and carrier
//! NATs do.

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, ensure, Context, Result};

use crate::cases::{self, CaseReport, CaseResult};
use crate::lab::{
    access_router, dn_address_towards, Access, Credential, Lab, LabSpec, Routing, Uplink, SERVER,
};
use crate::netns::wait_until;
use crate::traffic::{self, Pinger};

/// Every case, in the order they run.
pub const CASES: &[&str] = &["roam", "nat", "nat_rebind", "suspend", "dns", "dual_stack"];

/// Pings at 100/s that one address change or NAT rebinding may cost at most.
pub const LOST_PER_CHANGE: u32 = 2;
/// How often `nat_rebind` flushes the NAT's state.
const REBINDS: usize = 3;
/// Workers (UDP shards) of each DN in `nat_rebind`.
const REBIND_DN_WORKERS: usize = 4;
/// How soon after a resume traffic must flow again.
pub const BACK_WITHIN: Duration = Duration::from_secs(1);
/// How long the client is stopped in `suspend`.
const SUSPEND: Duration = Duration::from_secs(30);
/// The NAT's UDP timeouts in `nat` (shorter than Linux's 30 s / 120 s, to keep the case short)
/// and the client keepalive that must keep the mapping alive across them.
const NAT_UDP_TIMEOUT_SECS: u64 = 10;
const NAT_KEEPALIVE_SECS: u64 = 4;
/// Where the servers' TCP echo listens in `suspend`.
const ECHO_PORT: u16 = 7000;

/// Runs the named cases (all if `only` is empty).
pub fn run(only: &[String], quiet: bool) -> Result<CaseReport> {
    cases::run("lab mobile", CASES, only, quiet, |name| {
        let (held, detail) = match name {
            "roam" => roam()?,
            "nat" => nat()?,
            "nat_rebind" => nat_rebind()?,
            "suspend" => suspend()?,
            "dns" => crate::mobile_dns::dns_case()?,
            "dual_stack" => crate::mobile_v6::dual_stack_case()?,
            other => return Err(anyhow!("no case {other:?}")),
        };
        Ok(CaseResult {
            name: name.to_owned(),
            held,
            detail,
        })
    })
}

/// A lab with one mobile client, its sessions to both DNs up.
fn mobile_lab(nat: bool, full_tunnel: bool, keepalive_secs: Option<u64>) -> Result<Lab> {
    mobile_lab_with(nat, full_tunnel, keepalive_secs, None)
}

/// [`mobile_lab`] whose DNs run `dn_threads` workers.
fn mobile_lab_with(
    nat: bool,
    full_tunnel: bool,
    keepalive_secs: Option<u64>,
    dn_threads: Option<usize>,
) -> Result<Lab> {
    let mut spec = LabSpec {
        dns: 2,
        routing: Routing::Frr,
        access: Access::Mobile { nat },
        client_keepalive_secs: keepalive_secs,
        dn_threads,
        ..LabSpec::default()
    };
    if full_tunnel {
        spec.client_routes = vec!["0.0.0.0/0".into()];
    }
    let mut lab = Lab::start(&spec)?;
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    lab.wait_address(1, Duration::from_secs(15))?;
    lab.primary_and_secondary(1, Duration::from_secs(10))?;
    Ok(lab)
}

/// How many times the client has made each session so far, by DN.
fn connects(lab: &Lab) -> Result<Vec<(String, u64)>> {
    let status = lab.en_status(1)?;
    Ok(status["sessions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["dn"].as_str().unwrap_or("?").to_owned(),
                s["connects"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

/// Sessions made again since `before`.
fn remade(lab: &Lab, before: &[(String, u64)]) -> Result<u64> {
    let after = connects(lab)?;
    Ok(after
        .iter()
        .map(|(dn, n)| {
            let was = before.iter().find(|(d, _)| d == dn).map_or(0, |(_, n)| *n);
            n.saturating_sub(was)
        })
        .sum())
}

/// The interface the client's namespace routes `addr` through right now.
fn route_dev(lab: &Lab, addr: &str) -> Result<String> {
    let out = lab.net.exec("en1", &["ip", "-4", "route", "get", addr])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("no device in `ip route get {addr}`: {text}"))
}

/// The Wi-Fi goes away during a paced TCP upload in a full tunnel, so the client's address
/// and default route move to LTE; 3 s later the Wi-Fi is back and preferred again. The
/// sessions migrate: no session is made again, each change costs at most
/// [`LOST_PER_CHANGE`] pings at 100/s, the upload completes and the DN endpoints' routes follow
/// the default route.
fn roam() -> Result<(bool, String)> {
    let mut lab = mobile_lab(false, true, None)?;
    let before = connects(&lab)?;
    let upload_secs = 9;
    let upload = traffic::bulk(
        &mut lab.net,
        "srv",
        "en1",
        SERVER,
        upload_secs,
        false,
        Some("20M"),
    )?;
    let ping = Pinger::start(&lab.net, "en1", SERVER, "0.01")?;
    std::thread::sleep(Duration::from_secs(2));
    lab.net
        .exec("en1", &["ip", "link", "set", "wifi", "down"])?;
    std::thread::sleep(Duration::from_millis(300));
    let endpoint = dn_address_towards(1, 1);
    let on_lte = route_dev(&lab, &endpoint)?;
    std::thread::sleep(Duration::from_millis(2700));
    let wifi = Uplink::Wifi;
    lab.net.exec("en1", &["ip", "link", "set", "wifi", "up"])?;
    lab.net.exec(
        "en1",
        &[
            "ip",
            "route",
            "replace",
            "default",
            "via",
            &wifi.gateway(1),
            "metric",
            wifi.metric(),
        ],
    )?;
    std::thread::sleep(Duration::from_millis(300));
    let on_wifi = route_dev(&lab, &endpoint)?;
    std::thread::sleep(Duration::from_millis(2700));
    let (sent, answered) = ping.stop()?;
    let uploaded = upload.finish(&mut lab.net)?;
    let remade = remade(&lab, &before)?;
    let lost = sent - answered;
    // 20 Mbit/s for the run, less the slow start: most of it must have arrived.
    let expected = 20_000_000 / 8 * u64::from(upload_secs);
    let upload_ok = uploaded >= expected * 8 / 10;
    let held = lost <= 2 * LOST_PER_CHANGE
        && remade == 0
        && upload_ok
        && on_lte == "lte"
        && on_wifi == "wifi";
    Ok((
        held,
        format!(
            "2 address changes: {lost} of {sent} pings lost, {remade} sessions made again, \
             upload {:.1} of {:.1} MB, DN endpoint routed via {on_lte} then {on_wifi}",
            uploaded as f64 / 1e6,
            expected as f64 / 1e6
        ),
    ))
}

/// Behind a NAT whose UDP mappings expire after [`NAT_UDP_TIMEOUT_SECS`], a client with a
/// keepalive of [`NAT_KEEPALIVE_SECS`] stays reachable: after 2.5 timeouts of idleness, the
/// server reaches the client (DN to client through the NAT) and no session was made again.
fn nat() -> Result<(bool, String)> {
    let lab = mobile_lab(true, false, Some(NAT_KEEPALIVE_SECS))?;
    let ap = access_router(1);
    for key in ["udp_timeout", "udp_timeout_stream"] {
        lab.net.exec(
            &ap,
            &[
                "sysctl",
                "-qw",
                &format!("net.netfilter.nf_conntrack_{key}={NAT_UDP_TIMEOUT_SECS}"),
            ],
        )?;
    }
    let before = connects(&lab)?;
    let remote = lab.dn_status(1)?["clients"][0]["remote"]
        .as_str()
        .unwrap_or("?")
        .to_owned();
    let behind_nat = remote.starts_with(&format!("{}:", crate::lab::client_address_towards(1, 1)));
    std::thread::sleep(Duration::from_secs(NAT_UDP_TIMEOUT_SECS * 5 / 2));
    let address = lab.wait_address(1, Duration::from_secs(1))?.to_string();
    let (sent, received) = lab.ping("srv", &address, 20, &["-i", "0.05"])?;
    let remade = remade(&lab, &before)?;
    let held = behind_nat && received == sent && remade == 0;
    Ok((
        held,
        format!(
            "dn1 sees the client at {remote} (the NAT); idle {} s past a {NAT_UDP_TIMEOUT_SECS} s \
             NAT timeout with a {NAT_KEEPALIVE_SECS} s keepalive: server to client {received} of \
             {sent} pings, {remade} sessions made again",
            NAT_UDP_TIMEOUT_SECS * 5 / 2
        ),
    ))
}

/// The NAT forgets its mappings (`conntrack -F`) [`REBINDS`] times during a ping at 100/s: each
/// time the client's next packets leave from a new external port, the DNs follow (QUIC
/// migration), at most [`LOST_PER_CHANGE`] pings are lost and no session is made again. The DNs
/// run [`REBIND_DN_WORKERS`] workers, each with its own UDP socket on the port: the kernel must
/// hand the packets from each new port to the worker holding the connection, where a hash of
/// the addresses would pick another worker three times in four.
fn nat_rebind() -> Result<(bool, String)> {
    let lab = mobile_lab_with(true, false, None, Some(REBIND_DN_WORKERS))?;
    let ap = access_router(1);
    let before = connects(&lab)?;
    let primary = lab.primary_of(1).context("no primary")?;
    let client = |lab: &Lab| -> Result<(String, u64)> {
        let c = &lab.dn_status(primary)?["clients"][0];
        Ok((
            c["remote"].as_str().unwrap_or("?").to_owned(),
            c["shard"].as_u64().unwrap_or(0),
        ))
    };
    let (first, shard) = client(&lab)?;
    let mut seen = vec![first];
    let ping = Pinger::start(&lab.net, "en1", SERVER, "0.01")?;
    for _ in 0..REBINDS {
        std::thread::sleep(Duration::from_secs(2));
        lab.net.exec(&ap, &["conntrack", "-F"])?;
        std::thread::sleep(Duration::from_secs(1));
        seen.push(client(&lab)?.0);
    }
    std::thread::sleep(Duration::from_secs(2));
    let (sent, answered) = ping.stop()?;
    let remade = remade(&lab, &before)?;
    let lost = sent - answered;
    let moved = seen.windows(2).filter(|w| w[0] != w[1]).count();
    let held = lost <= REBINDS as u32 * LOST_PER_CHANGE && remade == 0 && moved == REBINDS;
    Ok((
        held,
        format!(
            "NAT state flushed {REBINDS} times: the DN (worker {shard} of {REBIND_DN_WORKERS}) saw {}; \
             {lost} of {sent} pings lost, {remade} sessions made again",
            seen.join(" then ")
        ),
    ))
}

/// A TCP echo server in the servers' namespace, and a client in en1 that connected to it and
/// sends a line each time it is given one.
struct Echo {
    client: std::process::Child,
    replies: BufReader<std::process::ChildStdout>,
}

const ECHO_SERVER: &str = "import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1)
c,_=s.accept()
while True:
    d=c.recv(4096)
    if not d: break
    c.sendall(d)
";

const ECHO_CLIENT: &str = "import socket,sys
c=socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print('connected', flush=True)
for line in sys.stdin:
    c.sendall(line.encode())
    print(c.recv(4096).decode().strip(), flush=True)
";

impl Echo {
    fn start(lab: &mut Lab) -> Result<Self> {
        let port = ECHO_PORT.to_string();
        lab.net.spawn(
            "srv",
            "echo-server",
            &["python3", "-c", ECHO_SERVER, SERVER, &port],
            &[],
        )?;
        wait_until(Duration::from_secs(5), "the echo server to listen", || {
            lab.net
                .try_exec("srv", &["ss", "-Htln", &format!("sport = :{port}")])
                .is_ok_and(|o| !o.stdout.is_empty())
        })?;
        let mut client = lab
            .net
            .command("en1", &["python3", "-c", ECHO_CLIENT, SERVER, &port])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the echo client")?;
        let stdout = client.stdout.take().context("no echo client output")?;
        let mut echo = Self {
            client,
            replies: BufReader::new(stdout),
        };
        ensure!(
            echo.line()? == "connected",
            "the echo client did not connect"
        );
        Ok(echo)
    }

    fn line(&mut self) -> Result<String> {
        let mut line = String::new();
        self.replies.read_line(&mut line)?;
        Ok(line.trim().to_owned())
    }

    /// Sends `text` and returns what came back.
    fn round_trip(&mut self, text: &str) -> Result<String> {
        let stdin = self.client.stdin.as_mut().context("echo client closed")?;
        writeln!(stdin, "{text}")?;
        self.line()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}

/// The client is stopped for [`SUSPEND`] (SIGSTOP, as when a laptop's lid closes) and resumed:
/// traffic flows again within [`BACK_WITHIN`], with the same address, and a TCP connection
/// left idle across the sleep still works.
fn suspend() -> Result<(bool, String)> {
    let mut lab = mobile_lab(true, false, None)?;
    let address = lab.wait_address(1, Duration::from_secs(1))?;
    let before = connects(&lab)?;
    let mut echo = Echo::start(&mut lab)?;
    ensure!(
        echo.round_trip("before")? == "before",
        "the echo does not answer"
    );
    lab.net.signal("en1", libc::SIGSTOP)?;
    std::thread::sleep(SUSPEND);
    lab.net.signal("en1", libc::SIGCONT)?;
    let ping = Pinger::start(&lab.net, "en1", SERVER, "0.01")?;
    std::thread::sleep(Duration::from_secs(3));
    let (sent, answered) = ping.stop_with_replies()?;
    let first = answered.iter().next().copied();
    // Ping sends every 10 ms from sequence 1, starting right after the resume.
    let back = first.map(|seq| Duration::from_millis(10 * u64::from(seq - 1)));
    let after = lab.wait_address(1, Duration::from_secs(5))?;
    let tcp = echo.round_trip("after").unwrap_or_default();
    let remade = remade(&lab, &before)?;
    let held = back.is_some_and(|b| b <= BACK_WITHIN) && after == address && tcp == "after";
    let back = back.map_or("never".to_owned(), |b| format!("{} ms", b.as_millis()));
    Ok((
        held,
        format!(
            "stopped {} s: traffic back after {back} ({} of {sent} pings in 3 s), address \
             {address} then {after}, idle TCP connection {}, {remade} sessions made again",
            SUSPEND.as_secs(),
            answered.len(),
            if tcp == "after" { "works" } else { "broken" }
        ),
    ))
}
