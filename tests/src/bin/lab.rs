use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use holdfast_lab::lab::{
    client_role, dn_role, parse_ping, Credential, Failure, Lab, LabSpec, Routing, SERVER,
};
use holdfast_lab::{bench, netns, traffic};

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

#[derive(Clone, Copy, clap::ValueEnum)]
enum Esr {
    /// FRR (zebra, ospfd), configured by esr-config.
    Frr,
    /// BIRD 2 (the thesis's choice), configured by esr-config; slower: OSPF `tick` is at least
    /// one second.
    Bird,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Fail {
    /// `kill -9` of the primary's `dn` process.
    Kill,
    /// Every link of the primary DN's namespace down at once: its host is cut off.
    Host,
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
    },
    /// Remove labs left behind by processes that no longer exist (never a live lab's).
    ///
    /// A lab is stale when the process recorded as its owner in /run/holdfast-lab/<id>/ is
    /// gone. Its namespaces, their processes and its work directory are removed (set
    /// HOLDFAST_LAB_KEEP=1 to keep the work directory and its logs).
    Down,
    /// Throughput (iperf3), RTT (ping) and CPU per GB of Holdfast, wireguard-go and bare veth.
    ///
    /// One lab, three setups one after another, each torn down before the next: Holdfast
    /// (en1 -> dn1), wireguard-go between the same namespaces, and the bare veth path routed
    /// through dn1. RTT is 200 pings at 10 ms; CPU counts the tunnel processes on both ends.
    Bench {
        /// Seconds of iperf3 per setup.
        #[arg(long, default_value_t = 10)]
        seconds: u32,
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
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
    #[arg(long, value_enum, default_value_t = Fail::Kill)]
    fail: Fail,
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
    let (routing, daemon) = match esr {
        Esr::Frr => (Routing::Frr, "FRR"),
        Esr::Bird => (Routing::Bird, "BIRD"),
    };
    say(&format!(
        "building the lab: en1 -- dn1, dn2 -- esr ({daemon}, OSPF) -- srv in network namespaces ..."
    ));
    let mut lab = Lab::start(&LabSpec {
        dns: 2,
        routing,
        supervised: dn_fd,
        ..LabSpec::default()
    })?;
    let www = lab.net.dir.join("www");
    let blob = traffic::make_blob(&www, "blob", size_mib << 20)?;
    traffic::serve_http(&mut lab.net, "srv", &www, SERVER)?;
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    let address = lab.wait_address(1, Duration::from_secs(15))?;
    let (primary, secondary) = lab.primary_and_secondary(1, Duration::from_secs(10))?;
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
    let (failure, what) = match fail {
        Fail::Kill => (Failure::Kill, format!("kill -9 of dn{primary}")),
        Fail::Host => (
            Failure::Host,
            format!("every link of dn{primary}'s host down"),
        ),
    };
    say(&format!("{what} ..."));
    lab.fail_dn(primary, failure)?;
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
                "fail": match fail { Fail::Kill => "kill", Fail::Host => "host" },
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

fn up(clients: u8) -> Result<()> {
    let clients = usize::from(clients);
    let mut lab = Lab::start(&LabSpec {
        clients,
        ..LabSpec::default()
    })?;
    for i in 1..=clients {
        lab.start_client(i, &Credential::Issued(format!("client{i}")))?;
        let address = lab.wait_address(i, Duration::from_secs(15))?;
        println!("{} is up with address {address}", client_role(i));
    }
    println!(
        "\nlab {} is up; its files are in {}",
        lab.net.id(),
        lab.net.dir.display()
    );
    for role in (1..=clients)
        .map(client_role)
        .chain(["dn1".into(), "srv".into()])
    {
        println!("  {role:<4} ip netns exec {} bash", lab.net.ns(&role));
    }
    println!(
        "  status: {} --config {} status",
        lab.bin("en"),
        lab.en_config(1).display()
    );
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
        Command::Up { clients } => up(clients),
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
        Command::Bench { seconds, json } => {
            let report = bench::run(seconds)?;
            if json {
                println!("{}", report.json());
            } else {
                print!("{}", report.table());
            }
            Ok(())
        }
    }
}
