use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// Holdfast decapsulation node (DN): accepts encrypted sessions from Holdfast clients (ENs),
/// leases them addresses from this DN's pool and forwards their packets.
///
/// Run a DN:   dn --config /etc/holdfast/cluster.toml --node dn1
///
/// Status:     dn status --control /run/holdfast/dn-dn1.sock [--json]
///
/// First time: dn pki init --dir /etc/holdfast --dn dn1 --dn dn2 --client laptop
///             writes CAs, certificates and lease keys and prints the keys for cluster.toml.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The cluster description (see README.md, "cluster.toml").
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/holdfast/cluster.toml"
    )]
    config: PathBuf,
    /// Which [[dn]] of the cluster this process is.
    #[arg(long, short)]
    node: Option<String>,
    /// The local status socket [default: /run/holdfast/dn-<node>.sock].
    #[arg(long, global = true)]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR/metrics (a DN whose port is taken runs on
    /// without them, with a warning).
    #[arg(long, default_value = "127.0.0.1:9436", value_name = "ADDR")]
    metrics: std::net::SocketAddr,
    /// Serve no metrics.
    #[arg(long, conflicts_with = "metrics")]
    no_metrics: bool,
    /// Threads carrying traffic; 0 is one per core. Each client's session (its encryption and
    /// decryption) runs on one thread; the TUN device gets a queue per thread and the UDP port
    /// a socket per thread (up to 64), each read by its own task. The kernel spreads flows over
    /// the queues, and hands each client's datagrams to the socket of the endpoint holding its
    /// connection, from whatever address they come. So on a host with cores of its own a DN
    /// with many clients uses them all with 0. 1 (the default) has no cross-thread wake-ups:
    /// the fastest and the lowest latency where the DN shares its cores.
    #[arg(long, env = "HOLDFAST_DN_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(0..=256))]
    threads: u16,
    /// Log format: text, or one JSON object per line.
    #[arg(long, global = true, value_enum, env = holdfast_shell::LOG_FORMAT_ENV, default_value_t = holdfast_shell::LogFormat::Text)]
    log_format: holdfast_shell::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Show the running DN's clients and counters.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Take the running DN out of service without a failover: every client moves its traffic
    /// to another DN while this one still delivers (make before break), and no new client is
    /// taken. The DN keeps running; `dn undrain` takes it back into service.
    Drain,
    /// End a drain: the DN takes clients again and its own clients come home.
    Undrain,
    /// Create certificates and keys for a cluster.
    Pki {
        #[command(subcommand)]
        command: PkiCommand,
    },
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Create a server CA, a client CA, a TLS certificate and lease key per DN and a
    /// certificate per client, in DIR. Prints the [[dn]] public_key lines for cluster.toml.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A DN name (repeat for each DN).
        #[arg(long = "dn", required = true)]
        dns: Vec<String>,
        /// A client identity (repeat for each client).
        #[arg(long = "client")]
        clients: Vec<String>,
    },
    /// Issue one more client certificate with the client CA in DIR.
    AddClient {
        #[arg(long)]
        dir: PathBuf,
        /// The client's identity (its certificate's common name).
        name: String,
    },
}

fn control_path(explicit: Option<PathBuf>, node: Option<&str>) -> PathBuf {
    explicit
        .unwrap_or_else(|| PathBuf::from(format!("/run/holdfast/dn-{}.sock", node.unwrap_or("dn"))))
}

fn print_status(status: &serde_json::Value) {
    let get = |k: &str| status[k].to_string();
    println!(
        "dn {}  listen {}  pool {}  tun {} (mtu {})",
        status["node"].as_str().unwrap_or("?"),
        get("listen").trim_matches('"'),
        get("pool").trim_matches('"'),
        status["tun"].as_str().unwrap_or("?"),
        get("mtu")
    );
    let sharded = status["udp_shards"].as_u64().is_some_and(|n| n > 1);
    if sharded {
        println!(
            "{} workers: each has its own UDP socket on the port and TUN queue",
            status["udp_shards"]
        );
    }
    if status["draining"] == true {
        println!("DRAINING: clients are told to move to another DN; no new client is taken");
    }
    println!(
        "sessions {}  leases {}  refused {}  handshakes failed {}",
        get("sessions"),
        get("leases"),
        get("sessions_refused"),
        get("handshakes_failed")
    );
    println!(
        "dropped: spoofed source {}  no session {}  too big {} (ICMP sent {})  malformed {}",
        get("dropped_spoofed"),
        get("dropped_no_session"),
        get("dropped_too_big"),
        get("icmp_too_big_sent"),
        get("dropped_malformed")
    );
    if let Some(clients) = status["clients"].as_array() {
        for c in clients {
            let t = &c["traffic"];
            // A dual-stack client's two addresses: "10.200.0.2 fd00:200::2".
            let address = match c["address6"].as_str() {
                Some(v6) => format!("{} {v6}", c["address"].as_str().unwrap_or("?")),
                None => c["address"].as_str().unwrap_or("?").to_owned(),
            };
            let worker = if sharded {
                format!("  worker {}", c["shard"])
            } else {
                String::new()
            };
            println!(
                "  {:<20} {:<16} from {:<22} rtt {:>6} us  rx {} pkts / {} B  tx {} pkts / {} B{worker}",
                c["identity"].as_str().unwrap_or("?"),
                address,
                c["remote"].as_str().unwrap_or("?"),
                c["rtt_us"],
                t["rx_packets"],
                t["rx_bytes"],
                t["tx_packets"],
                t["tx_bytes"]
            );
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match cli.command {
        None => holdfast_shell::thread_count(cli.threads.into()),
        Some(_) => 1,
    };
    holdfast_shell::runtime(threads)?.block_on(run(cli, threads))
}

async fn run(cli: Cli, threads: usize) -> Result<()> {
    match cli.command {
        Some(Command::Status { json }) => {
            let path = control_path(cli.control, cli.node.as_deref());
            let status = holdfast_shell::control::request(&path, "status").await?;
            if json {
                println!("{status}");
            } else {
                print_status(&status);
            }
            Ok(())
        }
        Some(Command::Drain) | Some(Command::Undrain) => {
            let request = if matches!(cli.command, Some(Command::Drain)) {
                "drain"
            } else {
                "undrain"
            };
            let path = control_path(cli.control, cli.node.as_deref());
            let answer = holdfast_shell::control::request(&path, request).await?;
            let clients = answer["clients_told"].as_u64().unwrap_or(0);
            match (request, answer["draining"].as_bool()) {
                ("drain", Some(true)) => println!(
                    "draining: {clients} clients told to move their traffic to another DN; no new client is taken (dn status shows who is still here)"
                ),
                ("undrain", Some(false)) => {
                    println!("in service again: {clients} clients told; its own clients come home")
                }
                _ => anyhow::bail!("the DN did not take the request: {answer}"),
            }
            Ok(())
        }
        Some(Command::Pki { command }) => match command {
            PkiCommand::Init { dir, dns, clients } => {
                let dns: Vec<&str> = dns.iter().map(String::as_str).collect();
                let clients: Vec<&str> = clients.iter().map(String::as_str).collect();
                let keys = holdfast_dn::pki::generate(&dir, &dns, &clients)?;
                println!(
                    "wrote CAs, certificates and lease keys to {}",
                    dir.display()
                );
                println!("put each DN's public lease key into its [[dn]] in cluster.toml:");
                for (name, key) in keys {
                    println!("  {name}: public_key = \"{key}\"");
                }
                Ok(())
            }
            PkiCommand::AddClient { dir, name } => {
                holdfast_dn::pki::add_client(&dir, &name)?;
                println!(
                    "wrote {0}/{name}.crt.pem and {0}/{name}.key.pem",
                    dir.display()
                );
                Ok(())
            }
        },
        None => {
            holdfast_shell::init_logging(cli.log_format);
            holdfast_shell::abort_on_panic();
            let node = cli
                .node
                .context("--node NAME is required to run a DN (see --help)")?;
            let control = control_path(cli.control, Some(&node));
            holdfast_dn::server::run(holdfast_dn::server::Options {
                config: cli.config,
                node,
                control,
                metrics: (!cli.no_metrics).then_some(cli.metrics),
                workers: threads,
            })
            .await
        }
    }
}
