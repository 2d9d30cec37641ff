use std::time::Duration;

use anyhow::{ensure, Context, Result};
use clap::{Parser, Subcommand};
use holdfast_lab::lab::{client_role, Credential, Lab, LabSpec, SERVER};
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

#[derive(Subcommand)]
enum Command {
    /// Run the demo: a client, a DN and a server; ping and a download through the tunnel.
    Demo {
        /// Size of the download in MiB.
        #[arg(long, default_value_t = 50)]
        size_mib: u64,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
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

fn demo(size_mib: u64, json: bool) -> Result<()> {
    let say = |s: &str| {
        if !json {
            println!("{s}");
        }
    };
    say("building the lab: en1 -- dn1 -- srv in network namespaces ...");
    let mut lab = Lab::start(&LabSpec::default())?;
    let www = lab.net.dir.join("www");
    let blob = traffic::make_blob(&www, "blob", size_mib << 20)?;
    traffic::serve_http(&mut lab.net, "srv", &www, SERVER)?;
    lab.start_client(1, &Credential::Issued("client1".into()))?;
    let address = lab.wait_address(1, Duration::from_secs(15))?;
    say(&format!("client1 is up with address {address}"));
    let (sent, received) = lab.ping("en1", SERVER, 300, &["-i", "0.01"])?;
    say(&format!(
        "ping at 100 packets/s to the server {SERVER}: {sent} sent, {received} received"
    ));
    let out = lab.net.dir.join("downloaded");
    let url = format!("http://{SERVER}:{}/blob", traffic::HTTP_PORT);
    let got = traffic::download(&lab.net, "en1", &url, &out, Duration::from_secs(300))?;
    let intact = traffic::sha256_file(&out)? == blob.sha256 && got.bytes == blob.size;
    let mbps = got.bytes as f64 * 8.0 / got.seconds / 1e6;
    say(&format!(
        "download of {size_mib} MiB over HTTP: {:.2} s ({mbps:.0} Mbit/s), SHA-256 {}",
        got.seconds,
        if intact { "matches" } else { "DIFFERS" }
    ));
    let en_out = lab.net.try_exec(
        "en1",
        &[
            &lab.bin("en"),
            "--config",
            &lab.en_config(1).display().to_string(),
            "status",
        ],
    )?;
    let dn_out = std::process::Command::new(lab.bin("dn"))
        .args([
            "status",
            "--control",
            &lab.dn_socket(1).display().to_string(),
        ])
        .output()?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "address": address,
                "pings_sent": sent,
                "pings_received": received,
                "lost_packets": sent - received,
                "download_bytes": got.bytes,
                "download_seconds": got.seconds,
                "download_mbps": mbps,
                "download_ok": intact,
            })
        );
    } else {
        println!("\n$ en status\n{}", String::from_utf8_lossy(&en_out.stdout));
        println!("$ dn status\n{}", String::from_utf8_lossy(&dn_out.stdout));
        println!("tearing down the lab");
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
        Command::Demo { size_mib, json } => demo(size_mib, json),
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
