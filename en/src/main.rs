use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use holdfast_en::config::EnConfig;

/// Holdfast client (EN): one virtual address, carried through a Holdfast DN cluster over QUIC.
///
/// Start the tunnel:   en --config /etc/holdfast/en.toml up
/// Look at it:         en --config /etc/holdfast/en.toml status [--json]
///
/// `up` runs in the foreground (use your service manager to keep it running) and needs root or
/// CAP_NET_ADMIN to create its TUN device. It applies the DNS servers and search domains the
/// cluster pushes (systemd-resolved on the TUN device, or /etc/resolv.conf) unless en.toml
/// says dns = "off", and takes them back when it stops. Stop it with Ctrl-C or SIGTERM.
/// SIGHUP reads the configuration again and applies a changed [[dn]] list (and certificate files); any other
/// change needs a restart and is refused with a message in the log.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The client configuration (see README.md, "en.toml").
    #[arg(long, short, global = true, default_value = "/etc/holdfast/en.toml")]
    config: PathBuf,
    /// Log format: text, or one JSON object per line.
    #[arg(long, global = true, value_enum, env = holdfast_shell::LOG_FORMAT_ENV, default_value_t = holdfast_shell::LogFormat::Text)]
    log_format: holdfast_shell::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Connect, create the TUN device and routes, forward traffic; reconnect when a session is lost.
    Up {
        /// Serve Prometheus metrics at http://ADDR/metrics (off unless given; e.g.
        /// 127.0.0.1:9437).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<std::net::SocketAddr>,
        /// Threads carrying traffic. 1 runs everything on one core with no cross-thread
        /// wake-ups: the fastest and the lowest latency where the client shares few cores, and
        /// what a phone's battery wants. 2 lets the two directions (TUN to QUIC, QUIC to TUN)
        /// run on cores of their own.
        #[arg(long, env = "HOLDFAST_EN_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        threads: u16,
    },
    /// Show the running client's address, sessions, RTT and traffic.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn print_status(s: &serde_json::Value) {
    let t = &s["traffic"];
    // A dual-stack lease shows both addresses: "address 10.200.0.2 fd00:200::2".
    let address6 = s["address6"]
        .as_str()
        .map(|a| format!(" {a}"))
        .unwrap_or_default();
    println!(
        "address {}{address6}  tun {}  mtu {}",
        s["address"].as_str().unwrap_or("none (not connected)"),
        s["tun"].as_str().unwrap_or("?"),
        s["mtu"],
    );
    println!(
        "sent {} pkts / {} B   received {} pkts / {} B   dropped: no session {}  too big {}  malformed {}",
        t["tx_packets"],
        t["tx_bytes"],
        t["rx_packets"],
        t["rx_bytes"],
        t["dropped_no_session"],
        t["dropped_too_big"],
        t["dropped_malformed"]
    );
    print_dns(&s["dns"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Some(sessions) = s["sessions"].as_array() {
        for x in sessions {
            let up = x["up_since"]
                .as_u64()
                .filter(|_| x["state"] == "up")
                .map(|t| format!("  up {}s", now.saturating_sub(t)))
                .unwrap_or_default();
            let rtt = x["rtt_us"]
                .as_u64()
                .map(|r| format!("  rtt {r} us"))
                .unwrap_or_default();
            let retired = if x["retired"] == true {
                "  leaving: no longer in en.toml"
            } else {
                ""
            };
            let error = x["last_error"]
                .as_str()
                .map(|e| format!("  last loss: {e}"))
                .unwrap_or_default();
            println!(
                "  {:<10} {:<22} {:<10} {:<9}{rtt}{up}{retired}{error}",
                x["dn"].as_str().unwrap_or("?"),
                x["endpoint"].as_str().unwrap_or("?"),
                x["state"].as_str().unwrap_or("?"),
                x["role"].as_str().unwrap_or("?"),
            );
        }
    }
}

/// One line: the DNS servers applied from the lease, and how (or why not).
fn print_dns(d: &serde_json::Value) {
    let list = |k: &str| {
        d[k].as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default()
    };
    if d["mode"] == "off" {
        println!("dns off (en.toml): the cluster's DNS settings are not applied");
    } else if let Some(error) = d["error"].as_str() {
        println!("dns not applied: {error}");
    } else if let Some(via) = d["via"].as_str() {
        let search = match list("search") {
            s if s.is_empty() => String::new(),
            s => format!("  search {s}"),
        };
        println!("dns {}{search}  via {via}", list("servers"));
    } else {
        println!("dns none pushed by the cluster");
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match cli.command {
        Command::Up { threads, .. } => threads.into(),
        Command::Status { .. } => 1,
    };
    holdfast_shell::runtime(threads)?.block_on(run(cli))
}

async fn run(cli: Cli) -> Result<()> {
    let config = EnConfig::load(&cli.config)?;
    match cli.command {
        Command::Up { metrics, .. } => {
            holdfast_shell::init_logging(cli.log_format);
            holdfast_shell::abort_on_panic();
            holdfast_en::client::run(config, cli.config, metrics).await
        }
        Command::Status { json } => {
            let status = holdfast_shell::control::request(&config.control_socket, "status").await?;
            if json {
                println!("{status}");
            } else {
                print_status(&status);
            }
            Ok(())
        }
    }
}
