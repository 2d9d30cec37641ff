//! The thin I/O shells shared by `en` and `dn`: everything here performs, nothing decides.

pub mod control;
pub mod gso;
pub mod metrics;
pub mod os;
pub mod quic;
pub mod tls;

pub use os::{icmp, netlink, resolver, tun};

/// How the daemons write their logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event; colours only on a terminal (and not with `NO_COLOR`).
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `message` and the event's
    /// fields), for log pipelines.
    Json,
}

impl LogFormat {
    pub fn name(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// The environment variable behind every daemon's `--log-format`; `dn-fd` sets it for its DN.
pub const LOG_FORMAT_ENV: &str = "HOLDFAST_LOG_FORMAT";

/// Logs to stderr in `format`; `RUST_LOG` overrides the default level (info). A log file or the
/// journal gets no colour codes.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => {
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).try_init()
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_span_list(false)
            .try_init(),
    };
}

/// A panic anywhere (any task, any thread) ends the daemon at once, after the usual message:
/// a task that died holding a session, a route or a lock would otherwise leave stale state
/// behind a process that still looks alive. The DN's failure detector then cleans up and
/// restarts it; a client's tunnel and routes go with its process.
pub fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
}

/// Seconds since the Unix epoch; the clock lease tickets are stamped with.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it): what peer notices'
/// sequence numbers start from.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The DN's lease signing key, read from the file `cluster.toml` names for it and checked
/// against the public key there. The DN signs leases and peer notices with it; its failure
/// detector signs heartbeats with it.
pub fn read_signing_key(
    spec: &holdfast_proto::cluster::DnSpec,
) -> anyhow::Result<ed25519_dalek::SigningKey> {
    use anyhow::{anyhow, bail, Context};
    let path = spec
        .signing_key
        .as_ref()
        .ok_or_else(|| anyhow!("dn {:?} has no signing_key file in the config", spec.name))?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read lease signing key {}", path.display()))?;
    let key = holdfast_proto::lease::parse_signing_key(&text)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    if key.verifying_key() != spec.public_key {
        bail!(
            "{} does not match dn {:?}'s public_key in the config",
            path.display(),
            spec.name
        );
    }
    Ok(key)
}

/// Loads `cluster.toml` and finds DN `node` in it, naming the DNs it has when there is none.
pub fn load_dn(
    config: &std::path::Path,
    node: &str,
) -> anyhow::Result<(
    holdfast_proto::cluster::Cluster,
    holdfast_proto::cluster::DnSpec,
)> {
    let cluster = holdfast_proto::cluster::Cluster::load(config)?;
    let spec = cluster.dn(node).cloned().ok_or_else(|| {
        let names: Vec<&str> = cluster.dns.iter().map(|d| d.name.as_str()).collect();
        anyhow::anyhow!(
            "no dn named {node:?} in {} (it has: {})",
            config.display(),
            names.join(", ")
        )
    })?;
    Ok((cluster, spec))
}

/// Threads to run for a `--threads` value: 0 is one per core.
pub fn thread_count(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// A daemon's async runtime with `threads` workers (see [`thread_count`] for 0). One thread
/// runs everything on it (no cross-thread wake-ups); more let a client's two directions, and a
/// DN's sessions, use their own cores.
pub fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    use anyhow::Context;
    let threads = thread_count(threads);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder
        .enable_all()
        .build()
        .with_context(|| format!("cannot start the async runtime with {threads} threads"))
}

/// A UDP socket bound to `local` and connected to `peer`, sharing `local` with its siblings
/// (one per peer). The kernel hands a datagram to the socket connected to its source before an
/// unconnected one, and to none when no peer sent it, so a flood from anywhere else never
/// reaches this queue, and never wakes the process.
pub fn udp_connected(
    local: std::net::SocketAddr,
    peer: std::net::SocketAddr,
) -> std::io::Result<tokio::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(local), Type::DGRAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&local.into())?;
    socket.connect(&peer.into())?;
    tokio::net::UdpSocket::from_std(socket.into())
}
