use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use holdfast_lab::experiment::{self, Setup};
use holdfast_lab::lab::{
    client_role, dn_role, parse_ping, Credential, Failure, Lab, LabSpec, Routing, SERVER,
};
use holdfast_lab::{attack, bench, cases, compare, mobile, netns, ops, scale, traffic};
use std::path::{Path, PathBuf};

/// Holdfast's lab: the testbed in network namespaces on this machine (needs root).
///
/// Every lab removes its namespaces and processes when it ends, also on Ctrl-C. It only ever
/// touches namespaces it created itself (named hf<id>-<role>, recorded in /run/holdfast-lab).
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Esr {
    /// FRR (zebra, ospfd), configured by esr-config.
    Frr,
    /// BIRD 2 (the thesis's choice), configured by esr-config; slower: OSPF `tick` is at least
    /// one second.
    Bird,
}

impl Esr {
    fn routing(self) -> Routing {
        match self {
            Esr::Frr => Routing::Frr,
            Esr::Bird => Routing::Bird,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the demo: a client, two DNs, an edge router and a server; a ping at 100 packets/s and
    /// a download run while the client's primary DN fails (killed with SIGKILL, or its host cut
    /// off); prints the packets lost and whether the download completed intact.
    Demo(DemoOptions),
    /// Build the lab with N clients connected and keep it up until Ctrl-C, to explore by hand.
    ///
    /// Prints each namespace and the command that enters it. Ctrl-C (or SIGTERM) removes the
    /// namespaces, processes and files again.
    Up {
        /// Client namespaces (en1..enN), each with its own identity and `en`.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=50))]
        clients: u8,
        /// DNs (dn1..dnN). With more than one, the lab has an ESR running --esr.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=3))]
        dns: u8,
        /// Routing daemon on the DNs and the ESR when there is more than one DN.
        #[arg(long, value_enum, default_value_t = Esr::Frr)]
        esr: Esr,
        /// Run each DN under its failure detector, dn-fd.
        #[arg(long)]
        dn_fd: bool,
    },
    /// Remove labs left behind by processes that no longer exist (never a live lab's).
    ///
    /// A lab is stale when the process recorded as its owner in /run/holdfast-lab/<id>/ is
    /// gone. Its namespaces, their processes and its work directory are removed (set
    /// HOLDFAST_LAB_KEEP=1 to keep the work directory and its logs).
    Down,
    /// Throughput, RTT and CPU per GB of Holdfast, userspace WireGuard and bare veth.
    ///
    /// One lab, the setups one after another, each torn down before the next: Holdfast
    /// (en1 -> dn1), wireguard-go and boringtun between the same namespaces (a peer not
    /// installed is reported as skipped), and the bare veth path routed through dn1. Each
    /// setup gets: 200 pings at 10 ms (idle RTT); a one-stream TCP upload with pings at 10 ms
    /// beside it (RTT under load); a one-stream download (iperf3 -R); a four-stream upload; a
    /// UDP upload at the offered rate. CPU counts the tunnel processes on both ends.
    ///
    /// Example: lab bench --setups holdfast,veth --seconds 5 --runs 5 --json
    Bench {
        /// Seconds of each iperf3 run (four per setup).
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// The setups to measure, comma-separated (default: all).
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = bench::Setup::ALL)]
        setups: Vec<bench::Setup>,
        /// Offered rate of the UDP test (iperf3 -b: 500M, 2G, ...).
        #[arg(long, default_value = "1G")]
        udp_rate: String,
        /// Run the whole bench N times, each in a fresh lab, and report each figure's median
        /// and each ratio (share of veth, four streams to one, Holdfast to a peer) as the
        /// median of the runs' own ratios (`--json` adds every run's figures under `per_run`).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100))]
        runs: u64,
        #[command(flatten)]
        cores: Cores,
        /// Write bench.csv and bar charts (SVG) of throughput and RTT into DIR.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Two builds of en and dn measured in turn: what a change did to throughput and CPU.
    ///
    /// The machine's speed drifts by tens of percent over minutes, more than most changes
    /// move the figures, so the two builds run at once, each in a lab of its own (client 1 to
    /// the server, one DN), and every round runs one iperf3 stream through one lab and then
    /// the other (the order alternating), up and then down (-R). Reports each build's medians,
    /// the median of the rounds' paired changes, and in how many rounds the candidate did
    /// better. A directory needs en and dn (and dn-fd is not used): copy them out of
    /// target/release before building the other version.
    ///
    /// Example: lab compare --baseline /tmp/before --rounds 8 --seconds 3
    Compare {
        /// The build to compare against: a directory with its en and dn.
        #[arg(long, value_name = "DIR")]
        baseline: PathBuf,
        /// The build being measured (default: the en and dn beside this lab binary, or
        /// HOLDFAST_BIN_DIR).
        #[arg(long, value_name = "DIR")]
        candidate: Option<PathBuf>,
        /// Rounds; each runs both builds once each way.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=100))]
        rounds: u64,
        /// Seconds of each iperf3 run (the first is omitted, as in lab bench).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=60))]
        seconds: u32,
        #[command(flatten)]
        cores: Cores,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Many idle sessions on one DN: its CPU and memory per session, and with `--fail kill`
    /// how fast every session switches when that DN is killed.
    ///
    /// Builds two DNs under dn-fd with FRR and runs a load client (hf-load) in one client
    /// namespace: N clients in one process, each with its own certificate, a lease from dn1
    /// and a secondary session on dn2, all real QUIC and TLS, idle but for keepalives. The
    /// DNs' CPU is read from /proc over 10 s, before the sessions and with them.
    ///
    /// Example: lab scale --sessions 2000 --fail kill --json
    Scale {
        /// Client sessions to open (each with a secondary on the other DN).
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=scale::MAX_SESSIONS as u64))]
        sessions: u64,
        /// Kill the DN holding the sessions (SIGKILL, `kill`) and time each session's switch.
        #[arg(long, value_enum)]
        fail: Option<ScaleFailure>,
        /// Seconds between the keepalives of each session (the client's default).
        #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..=100))]
        keepalive_secs: u64,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// What an operator does to a running cluster, measured: a scrape of every daemon's
    /// metrics, ten drains of the client's DN (each followed by undrain) during a 100/s ping
    /// and a download, then the master ESR of a keepalived pair cut off during another ping
    /// and download.
    ///
    /// One lab: two DNs under dn-fd, FRR, two ESRs sharing the servers' and the DNs' gateways
    /// (VRRP adverts every 10 ms, esr-config's keepalived.conf), one client with metrics on.
    ///
    /// Example: lab ops --json
    Ops {
        /// Print one JSON object (metrics_ok, drain_lost, esr_failover_lost, download_ok, ...)
        /// instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// What a laptop or a phone does to its tunnel, against the real binaries: its address
    /// and default route move between two uplinks during an upload (roam), it sits behind a
    /// NAT (nat), the NAT forgets its mapping (nat_rebind), it sleeps for 30 s (suspend), it
    /// takes the DNS servers the cluster pushes and gives them back (dns), it has an IPv4 and
    /// an IPv6 address and loses its DN (dual_stack). Each case builds its
    /// own lab: two DNs, FRR, one client behind an access router with a `wifi` and an `lte`
    /// uplink (dns: one DN, dnsmasq on the server).
    ///
    /// Example: lab mobile --json
    ///          lab mobile --case roam
    Mobile {
        /// Run only this case (repeatable); the cases: roam, nat, nat_rebind, suspend, dns,
        /// dual_stack.
        #[arg(long = "case", value_name = "NAME")]
        cases: Vec<String>,
        /// Print one JSON object ({"cases": [{"name", "held", "detail"}]}) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Hostile input against the real binaries: floods, rogue clients, forged and replayed
    /// notices, log injection. Each case builds its own lab (two DNs under dn-fd, FRR, a real
    /// client pinging at 100/s) and holds when its check holds, no DN was killed or restarted,
    /// every DN's routes match its sessions and the real client lost no ping.
    ///
    /// Example: lab attack --json
    ///          lab attack --case initial_flood --case conn_flood
    Attack {
        /// Run only this case (repeatable); the cases: initial_flood, conn_flood,
        /// non_reading_client, reattach_route_leak, block_pull, restart_address_reuse,
        /// expired_lease_reuse, home_is_back_replay, log_injection, foreign_ticket.
        #[arg(long = "case", value_name = "NAME")]
        cases: Vec<String>,
        /// Print one JSON object ({"cases": [{"name", "held", "detail"}]}) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// The thesis's chapter 5 experiments: what a client notices when its DN fails.
    ///
    /// Every run builds a fresh lab (client, two DNs, ESR, server), fails the client's primary
    /// DN once while traffic flows, measures and tears the lab down. Several values for --esr,
    /// --fail and --dn-fd (comma-separated) run every combination, one series each.
    #[command(subcommand)]
    Experiment(Experiment),
}

#[derive(Subcommand)]
enum Experiment {
    /// A steady ping from the client to the server; counts the packets lost per run, in all and
    /// in a row (thesis figures 5.2 and 5.3).
    ///
    /// Example: lab experiment icmp --rate 100 --runs 45 --esr frr,bird --out results
    Icmp {
        /// Packets per second (the thesis: 10 and 100).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
        rate: u32,
        /// Bulk TCP traffic (iperf3, unpaced) through the tunnel beside the ping.
        #[arg(long, value_enum, default_value = "none")]
        load: experiment::Load,
        /// Kills per run, each of the client's primary of the moment, at least 5 s apart and each
        /// once the detector has restarted the last one and the client holds two sessions
        /// again; needs --dn-fd on.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        kills: u32,
        /// Instead of failing the primary during the ping: the client sends nothing for SECS,
        /// its primary fails halfway, then the ping starts (what the next burst loses).
        #[arg(long, value_name = "SECS", default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=600))]
        idle_secs: u32,
        #[command(flatten)]
        common: ExperimentOptions,
    },
    /// An HTTP download (curl from a Python HTTP server on the server host) with and without a
    /// failure part-way through; download times, mean, std dev, 95% CI, median, and what the
    /// failure added (thesis tables 5.1, 5.3 and 5.4). Every download's SHA-256 is checked.
    ///
    /// Example: lab experiment http --size 63M --runs 10 --fail-at 40% --out results
    Http {
        /// File size: 63M or 625M as in the thesis, or any size with a K, M or G suffix
        /// (powers of ten, like the thesis's MB).
        #[arg(long, default_value = "63M", value_parser = parse_size)]
        size: u64,
        /// How far into the download the primary fails, in percent.
        #[arg(long, default_value = "40%", value_parser = parse_percent)]
        fail_at: f64,
        #[command(flatten)]
        common: ExperimentOptions,
    },
}

/// Where a measurement runs (`lab bench`, `lab compare`).
#[derive(clap::Args)]
struct Cores {
    /// Run everything the command starts (the tunnels' daemons, iperf3, ping) on the first N
    /// cores this process may use (default: all of them). On one core throughput follows the
    /// CPU cost per byte, without the cores taking turns; the same bench with --cores 1 and
    /// without shows how each path's figures grow with cores.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=1024))]
    cores: Option<u64>,
}

impl Cores {
    fn asked(&self) -> Option<usize> {
        self.cores.map(|n| n as usize)
    }
}

#[derive(clap::Args)]
struct ExperimentOptions {
    /// Runs per setup (the thesis did at least 45 ICMP failovers and 30 downloads per case).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Routing daemon(s) on the DNs and the ESR.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "frr")]
    esr: Vec<Esr>,
    /// How the primary fails: kill (SIGKILL of dn), host (every link of its host down), link
    /// (only its cluster-network link down).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "kill")]
    fail: Vec<Failure>,
    /// Run the DNs under dn-fd: off, on, or both (off,on).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "off")]
    dn_fd: Vec<OnOff>,
    /// Write a CSV of every run and an SVG chart into DIR.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print one JSON object (per-run figures and summaries) instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ScaleFailure {
    /// SIGKILL of the `dn` process holding every session as primary.
    Kill,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    Off,
    On,
}

impl ExperimentOptions {
    fn setups(&self) -> Vec<Setup> {
        let esrs: Vec<Routing> = self.esr.iter().map(|e| e.routing()).collect();
        let dn_fds: Vec<bool> = self.dn_fd.iter().map(|d| *d == OnOff::On).collect();
        Setup::matrix(&esrs, &self.fail, &dn_fds)
    }
}

/// "63M" -> 63 000 000 bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, factor) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1_000),
        Some((i, 'M' | 'm')) => (&t[..i], 1_000_000),
        Some((i, 'G' | 'g')) => (&t[..i], 1_000_000_000),
        _ => (t, 1),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size like 63M or 625M"))?;
    match n.checked_mul(factor) {
        Some(0) | None => Err(format!(
            "{text:?}: the size must be above zero and below 2^64"
        )),
        Some(size) => Ok(size),
    }
}

/// "40%" or "40" -> 0.4.
fn parse_percent(text: &str) -> Result<f64, String> {
    let v: f64 = text
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{text:?} is not a percentage like 40%"))?;
    if !(1.0..=99.0).contains(&v) {
        return Err(format!(
            "{text:?}: the failure must land between 1% and 99%"
        ));
    }
    Ok(v / 100.0)
}

/// Prints a report as asked (JSON or the table), writes its files into `out`, and fails if a
/// run could not be measured.
fn finish(report: &impl experiment::Report, json: bool, out: Option<&Path>) -> Result<()> {
    if json {
        println!("{}", report.json());
    } else {
        print!("{}", report.table());
    }
    if let Some(dir) = out {
        report_files(&report.write(dir)?, json);
    }
    ensure!(
        report.errors().is_empty(),
        "{} run(s) could not be measured",
        report.errors().len()
    );
    Ok(())
}

fn report_files(files: &[PathBuf], json: bool) {
    for f in files {
        let line = format!("wrote {}", f.display());
        if json {
            eprintln!("{line}");
        } else {
            println!("{line}");
        }
    }
}

#[derive(clap::Args)]
struct DemoOptions {
    /// Size of the download in MiB.
    #[arg(long, default_value_t = 100)]
    size_mib: u64,
    /// Pace of the download in MiB/s, so that the failure lands in its middle.
    #[arg(long, default_value_t = 25, value_parser = clap::value_parser!(u64).range(1..))]
    rate_mib: u64,
    /// Routing daemon on the DNs and the edge service router.
    #[arg(long, value_enum, default_value_t = Esr::Frr)]
    esr: Esr,
    /// How the primary DN fails.
    #[arg(long, value_enum, default_value_t = Failure::Kill)]
    fail: Failure,
    /// Run each DN under its failure detector, dn-fd (peers heartbeat every 10 ms).
    #[arg(long)]
    dn_fd: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

fn demo(o: DemoOptions) -> Result<()> {
    let DemoOptions {
        size_mib,
        rate_mib,
        esr,
        fail,
        dn_fd,
        json,
    } = o;
    let say = |s: &str| {
        if !json {
            println!("{s}");
        }
    };
    let routing = esr.routing();
    let daemon = routing.name().to_uppercase();
    say(&format!(
        "building the lab: en1 -- dn1, dn2 -- esr ({daemon}, OSPF) -- srv in network namespaces ..."
    ));
    let experiment::Trial {
        mut lab,
        address,
        primary,
        secondary,
    } = Setup {
        esr: routing,
        fail,
        dn_fd,
    }
    .lab()?;
    let www = lab.net.dir.join("www");
    let blob = traffic::make_blob(&www, "blob", size_mib << 20)?;
    traffic::serve_http(&mut lab.net, "srv", &www, SERVER)?;
    say(&format!(
        "client1 is up with address {address}: primary dn{primary}, secondary dn{secondary}; the ESR routes it via {}",
        lab.esr_next_hop(address)?
    ));

    // A download paced to last a few seconds and a ping at 100 packets/s, both running while
    // the primary DN is killed 40% into the download.
    let expected = size_mib as f64 / rate_mib as f64;
    let pings = ((expected + 2.0) * 100.0) as u32;
    let out = lab.net.dir.join("downloaded");
    let url = format!("http://{SERVER}:{}/blob", traffic::HTTP_PORT);
    let mut pinger = lab.net.command(
        "en1",
        &[
            "ping",
            "-n",
            "-q",
            "-i",
            "0.01",
            "-c",
            &pings.to_string(),
            "-W",
            "1",
            SERVER,
        ],
    );
    pinger.stdout(Stdio::piped());
    let pinger = pinger.spawn()?;
    let curl = traffic::paced_download(&lab.net, "en1", &url, &out, rate_mib).spawn()?;
    std::thread::sleep(Duration::from_secs_f64(expected * 0.4));
    say(&format!(
        "{} ...",
        match fail {
            Failure::Kill => format!("kill -9 of dn{primary}"),
            Failure::Host => format!("every link of dn{primary}'s host down"),
            Failure::Link => format!("dn{primary}'s cluster link down"),
        }
    ));
    lab.fail_dn(primary, fail)?;
    let curl = curl.wait_with_output()?;
    let ping = pinger.wait_with_output()?;
    let (sent, received) = parse_ping(&String::from_utf8_lossy(&ping.stdout))?;
    let lost = sent - received;
    let seconds: f64 = String::from_utf8_lossy(&curl.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    let intact =
        curl.status.success() && traffic::sha256_file(&out).ok() == Some(blob.sha256.clone());
    let esr_now = lab.esr_next_hop(address)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "esr": daemon.to_lowercase(),
                "address": address,
                "failed": dn_role(primary),
                "fail": fail.name(),
                "dn_fd": dn_fd,
                "lost_packets": lost,
                "pings_sent": sent,
                "pings_received": received,
                "download_ok": intact,
                "download_bytes": blob.size,
                "download_seconds": seconds,
                "download_expected_seconds": expected,
                "esr_next_hop_after": esr_now,
            })
        );
    } else {
        println!("ping at 100 packets/s: {sent} sent, {received} received: {lost} lost across the failover");
        println!(
            "download of {size_mib} MiB at {rate_mib} MiB/s: {:.2} s (paced for {expected:.2} s), {}",
            seconds,
            if intact { "completed intact (SHA-256 matches)" } else { "FAILED or damaged" }
        );
        let now_primary = lab
            .en_status(1)
            .ok()
            .and_then(|s| {
                let sessions = s["sessions"].as_array()?.clone();
                sessions.iter().position(|x| x["role"] == "primary")
            })
            .map_or_else(|| "no DN".to_owned(), |p| dn_role(p + 1));
        println!("client1 now sends through {now_primary}; the ESR routes {address} via {esr_now}");
        println!("tearing down the lab");
    }
    if !curl.status.success() {
        bail!("curl failed: {}", String::from_utf8_lossy(&curl.stderr));
    }
    ensure!(intact, "the download arrived damaged");
    Ok(())
}

fn up(clients: u8, dns: u8, esr: Esr, dn_fd: bool) -> Result<()> {
    let (clients, dns) = (usize::from(clients), usize::from(dns));
    let mut lab = Lab::start(&LabSpec {
        clients,
        dns,
        routing: if dns > 1 {
            esr.routing()
        } else {
            Routing::Static
        },
        supervised: dn_fd,
        ..LabSpec::default()
    })?;
    for i in 1..=clients {
        lab.start_client(i, &Credential::Issued(format!("client{i}")))?;
        let address = lab.wait_address(i, Duration::from_secs(15))?;
        println!("{} is up with address {address}", client_role(i));
    }
    println!(
        "\nlab {} is up; its files are in {}; the server is {SERVER}",
        lab.net.id(),
        lab.net.dir.display()
    );
    let esr = (dns > 1).then(|| "esr".to_owned());
    for role in (1..=clients)
        .map(client_role)
        .chain((1..=dns).map(dn_role))
        .chain(esr)
        .chain(["srv".into()])
    {
        println!("  {role:<4} ip netns exec {} bash", lab.net.ns(&role));
    }
    println!(
        "  status: {} --config {} status",
        lab.bin("en"),
        lab.en_config(1).display()
    );
    for k in 1..=dns {
        println!(
            "          {} status --control {}",
            lab.bin("dn"),
            lab.dn_socket(k).display()
        );
        if dn_fd {
            println!(
                "          {} status --control {}",
                lab.bin("dn-fd"),
                lab.fd_socket(k).display()
            );
        }
    }
    println!("Ctrl-C tears it down.");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() -> Result<()> {
    // Before any lab exists, so that no Ctrl-C can leave one behind.
    netns::cleanup_on_signals()?;
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(options) => demo(options),
        Command::Up {
            clients,
            dns,
            esr,
            dn_fd,
        } => up(clients, dns, esr, dn_fd),
        Command::Down => {
            let removed = netns::cleanup_stale().context("cannot clean up")?;
            if removed.is_empty() {
                println!("no stale labs");
            }
            for lab in removed {
                match lab.kept {
                    Some(dir) => println!("removed stale lab {} (kept {})", lab.id, dir.display()),
                    None => println!("removed stale lab {}", lab.id),
                }
            }
            Ok(())
        }
        Command::Compare {
            baseline,
            candidate,
            rounds,
            seconds,
            cores,
            json,
        } => {
            let candidate = match candidate {
                Some(dir) => dir,
                None => holdfast_lab::lab::bin_dir()?,
            };
            let options = compare::Options {
                baseline,
                candidate,
                rounds: rounds as usize,
                seconds,
                cores: cores.asked(),
            };
            let report = compare::run(&options, |step| eprintln!("lab compare: {step}"))?;
            if json {
                println!("{}", report.json());
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Scale {
            sessions,
            fail,
            keepalive_secs,
            json,
        } => {
            let report = scale::run(&scale::ScaleOptions {
                sessions: sessions as usize,
                kill: fail == Some(ScaleFailure::Kill),
                keepalive_secs,
                quiet: json,
            })?;
            if json {
                println!("{}", report.json());
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Ops { json } => {
            let report = ops::run(json)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
        Command::Mobile { cases, json } => print_cases(&mobile::run(&cases, json)?, json),
        Command::Attack { cases, json } => print_cases(&attack::run(&cases, json)?, json),
        Command::Bench {
            seconds,
            setups,
            udp_rate,
            runs,
            cores,
            out,
            json,
        } => {
            let options = bench::Options {
                seconds,
                setups,
                udp_rate,
                runs: runs as usize,
                cores: cores.asked(),
            };
            finish(&bench::run_all(&options)?, json, out.as_deref())
        }
        Command::Experiment(Experiment::Icmp {
            rate,
            load,
            kills,
            idle_secs,
            common,
        }) => finish(
            &experiment::icmp(&experiment::IcmpOptions {
                rate,
                load,
                kills,
                idle_secs,
                runs: common.runs as usize,
                setups: common.setups(),
                quiet: common.json,
            })?,
            common.json,
            common.out.as_deref(),
        ),
        Command::Experiment(Experiment::Http {
            size,
            fail_at,
            common,
        }) => finish(
            &experiment::http(&experiment::HttpOptions {
                size,
                runs: common.runs as usize,
                fail_at,
                setups: common.setups(),
                quiet: common.json,
            })?,
            common.json,
            common.out.as_deref(),
        ),
    }
}

/// Prints a case report; exits with 1 unless every case held.
fn print_cases(report: &cases::CaseReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        print!("{}", report.table());
    }
    if !report.all_held() {
        std::process::exit(1);
    }
    Ok(())
}
