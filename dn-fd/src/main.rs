use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use holdfast_proto::fd::{HealthPolicy, RestartPolicy};

mod metrics;
mod supervise;

/// Holdfast DN failure detector (dn-fd): runs the local DN as its child, kills it with SIGKILL
/// when it stops heartbeating, reports a fault or crosses a limit, deletes its routes at once,
/// restarts it with a growing back-off, and heartbeats the other DNs' detectors so that a dead
/// DN host is noticed in tens of milliseconds.
///
/// Run:     dn-fd --config /etc/holdfast/cluster.toml --node dn1
///
/// Status:  dn-fd status --node dn1 [--json]
///
/// Metrics: curl http://127.0.0.1:9435/metrics   (Prometheus text format)
///
/// Peers heartbeat each other over UDP on the DNs' cluster-network addresses (router_id),
/// port 4435, every 10 ms; a peer silent for 3 intervals is down. Set these in cluster.toml:
///   [detector]
///   port = 4435
///   interval_ms = 10
///   misses = 3
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The cluster description, as the DN reads it.
    #[arg(
        long,
        short,
        global = true,
        default_value = "/etc/holdfast/cluster.toml"
    )]
    config: PathBuf,
    /// Which [[dn]] of the cluster runs on this host.
    #[arg(long, short, global = true)]
    node: Option<String>,
    /// This detector's status socket [default: /run/holdfast/dn-fd-<node>.sock].
    #[arg(long, global = true)]
    control: Option<PathBuf>,
    /// The dn binary to run [default: `dn` next to this executable, else `dn` on PATH].
    #[arg(long)]
    dn: Option<PathBuf>,
    /// The DN's status socket, passed to it as --control [default: /run/holdfast/dn-<node>.sock].
    #[arg(long)]
    dn_control: Option<PathBuf>,
    /// Kill the DN when no heartbeat came for this long (it sends one every 10 ms while its
    /// event loop has ticked within the last second).
    #[arg(long, default_value_t = 100, value_name = "MS")]
    heartbeat_timeout_ms: u64,
    /// How long a freshly started DN has to send its first heartbeat.
    #[arg(long, default_value_t = 5000, value_name = "MS")]
    startup_grace_ms: u64,
    /// Delay before the first restart; it doubles with every failure since the last healthy run.
    #[arg(long, default_value_t = 100, value_name = "MS")]
    restart_base_ms: u64,
    /// The longest delay between restarts.
    #[arg(long, default_value_t = 30_000, value_name = "MS")]
    restart_max_ms: u64,
    /// A DN that ran this long has its failure count forgotten.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    healthy_after_secs: u64,
    /// Kill the DN when its resident memory exceeds this many MiB (0: no limit).
    #[arg(long, default_value_t = 0, value_name = "MIB")]
    memory_limit_mib: u64,
    /// Kill the DN when datagrams wait in its socket's receive queue while it does nothing with
    /// them (forwards no packet, accepts no connection, answers no probe), for this long (0: do
    /// not watch).
    #[arg(long, default_value_t = 1000, value_name = "MS")]
    stall_ms: u64,
    /// Serve Prometheus metrics over HTTP here (GET /metrics).
    #[arg(long, default_value = "127.0.0.1:9435", value_name = "ADDR")]
    metrics: SocketAddr,
    /// Serve no metrics.
    #[arg(long, conflicts_with = "metrics")]
    no_metrics: bool,
    /// Where the DN serves its own metrics (given to it as `dn --metrics`).
    #[arg(long, default_value = "127.0.0.1:9436", value_name = "ADDR")]
    dn_metrics: SocketAddr,
    /// The DN serves no metrics.
    #[arg(long, conflicts_with = "dn_metrics")]
    no_dn_metrics: bool,
    /// Run at this SCHED_FIFO real-time priority (1-99; 0: normal scheduling), so that
    /// heartbeats go out and are read on time however loaded the host is: a peer late by three
    /// intervals counts as dead. The detector itself uses little CPU; the DN it starts runs at
    /// normal priority. Needs CAP_SYS_NICE (root has it); without it the detector says so and
    /// runs at normal priority.
    #[arg(long, default_value_t = 10, value_name = "PRIORITY", value_parser = clap::value_parser!(u8).range(0..=99))]
    realtime_priority: u8,
    /// Log format: text, or one JSON object per line.
    #[arg(long, global = true, value_enum, env = holdfast_shell::LOG_FORMAT_ENV, default_value_t = holdfast_shell::LogFormat::Text)]
    log_format: holdfast_shell::LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Show the local DN's state, restarts and kills, and every peer with its last heartbeat.
    Status {
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn control_path(explicit: Option<PathBuf>, node: Option<&str>) -> PathBuf {
    explicit.unwrap_or_else(|| {
        PathBuf::from(format!("/run/holdfast/dn-fd-{}.sock", node.unwrap_or("dn")))
    })
}

/// `dn` next to this executable (how the project builds and installs them), else from PATH.
fn default_dn_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("dn")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("dn"))
}

fn ms_or_dash(v: &serde_json::Value) -> String {
    v.as_u64()
        .map(|ms| format!("{ms} ms"))
        .unwrap_or_else(|| "-".into())
}

fn print_status(s: &serde_json::Value) {
    let dn = &s["dn"];
    println!(
        "dn-fd {}  dn {} (pid {})  last heartbeat {}  next start in {}",
        s["node"].as_str().unwrap_or("?"),
        dn["state"].as_str().unwrap_or("?"),
        dn["pid"]
            .as_u64()
            .map(|p| p.to_string())
            .unwrap_or_else(|| "-".into()),
        ms_or_dash(&dn["heartbeat_age_ms"]),
        ms_or_dash(&dn["next_start_in_ms"]),
    );
    println!(
        "starts {}  restarts {}  kills {} (heartbeat {}, fault {}, limit {})  recent failures {}  routes deleted {}",
        s["starts"],
        s["restarts"],
        s["kills"],
        s["kills_by_reason"]["heartbeat"],
        s["kills_by_reason"]["fault"],
        s["kills_by_reason"]["limit"],
        s["recent_failures"],
        s["routes_deleted"],
    );
    println!(
        "last kill: {}\nlast exit: {}",
        s["last_kill"].as_str().unwrap_or("-"),
        s["last_exit"].as_str().unwrap_or("-")
    );
    if let Some(peers) = s["peers"].as_array() {
        if peers.is_empty() {
            println!("peers: none (no other DN has a router_id on the cluster network)");
        }
        for p in peers {
            println!(
                "  peer {:<12} {:<21} {:<8} last heartbeat {}",
                p["name"].as_str().unwrap_or("?"),
                p["address"].as_str().unwrap_or("?"),
                p["state"].as_str().unwrap_or("?"),
                ms_or_dash(&p["heartbeat_age_ms"]),
            );
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Status { json }) = cli.command {
        let path = control_path(cli.control, cli.node.as_deref());
        let status = holdfast_shell::control::request(&path, "status").await?;
        if json {
            println!("{status}");
        } else {
            print_status(&status);
        }
        return Ok(());
    }
    holdfast_shell::init_logging(cli.log_format);
    holdfast_shell::abort_on_panic();
    let Some(node) = cli.node else {
        anyhow::bail!(
            "which DN does this detector supervise? give --node NAME (a [[dn]] name in the config)"
        );
    };
    supervise::set_realtime_priority(cli.realtime_priority);
    let opts = supervise::Options {
        control: control_path(cli.control, Some(&node)),
        dn_control: cli
            .dn_control
            .unwrap_or_else(|| PathBuf::from(format!("/run/holdfast/dn-{node}.sock"))),
        dn: cli.dn.unwrap_or_else(default_dn_binary),
        config: cli.config,
        node,
        restart: RestartPolicy {
            base: Duration::from_millis(cli.restart_base_ms.max(1)),
            max: Duration::from_millis(cli.restart_max_ms.max(cli.restart_base_ms).max(1)),
            healthy_after: Duration::from_secs(cli.healthy_after_secs),
        },
        health: HealthPolicy {
            heartbeat_timeout: Duration::from_millis(cli.heartbeat_timeout_ms.max(20)),
            startup_grace: Duration::from_millis(cli.startup_grace_ms.max(100)),
        },
        memory_limit_bytes: cli.memory_limit_mib.saturating_mul(1 << 20),
        stall: Duration::from_millis(cli.stall_ms),
        metrics: (!cli.no_metrics).then_some(cli.metrics),
        dn_metrics: (!cli.no_dn_metrics).then_some(cli.dn_metrics),
        log_format: cli.log_format,
    };
    supervise::run(opts).await
}
