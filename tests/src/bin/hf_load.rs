//! The load client of `lab scale`: many real client sessions from one process.
//!
//! Every simulated client has its own certificate (issued in memory by the lab's client CA),
//! attaches to the primary DN for a lease and presents the ticket to the secondary DN, exactly
//! as `en` does: real QUIC, TLS and leases. The sessions then stay idle but for a keepalive
//! probe every `--keepalive-secs` on each session, spread evenly over the period.
//!
//! It talks to `lab scale` in JSON lines. On stdout: `{"ready": ...}` once every session is up
//! (or has failed), and after a `kill <unix-microseconds>` line on stdin, `{"switched": ...}`:
//! for each session, the milliseconds from the kill until it switched (the secondary DN said
//! `PeerDown` for the primary and the client sent `Switch`: from then on it sends through the
//! secondary, which already routes the dead DN's blocks), and until the secondary confirmed
//! with `Promoted`. End of stdin ends the process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use holdfast_lab::session::{attach, parse_dn};
use holdfast_lab::unix_micros;
use holdfast_proto::control::Message;
use holdfast_proto::probe::encode_probe;
use holdfast_shell::quic::{send_message, ControlReader};
use holdfast_shell::{quic, tls};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncBufReadExt;
use tokio::sync::{mpsc, Semaphore};

/// Open many idle client sessions to two DNs and time their switch when the primary dies
/// (the load client of `lab scale`; run by the lab inside its client namespace).
#[derive(Parser)]
struct Cli {
    /// The lab's PKI directory (client CA certificate and key, server CA).
    #[arg(long)]
    pki: PathBuf,
    /// Sessions to open: each a client with a primary and a secondary session.
    #[arg(long)]
    sessions: usize,
    /// The primary DN: NAME=ADDRESS:PORT.
    #[arg(long, value_parser = parse_dn)]
    primary: (String, SocketAddr),
    /// The secondary DN: NAME=ADDRESS:PORT.
    #[arg(long, value_parser = parse_dn)]
    secondary: (String, SocketAddr),
    /// Seconds between keepalive probes on each session (the client's default: 25).
    #[arg(long, default_value_t = 25)]
    keepalive_secs: u64,
    /// Handshakes in flight at once while the sessions are opened.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// How long after the kill sessions may take to switch before they count as not switched.
    #[arg(long, default_value_t = 10)]
    switch_timeout_secs: u64,
}

/// One client: its two sessions.
struct Client {
    primary: quinn::Connection,
    secondary: quinn::Connection,
    /// Kept open: a finished control stream would end the session at the DN.
    _primary_control: (quinn::SendStream, ControlReader),
    secondary_send: quinn::SendStream,
    secondary_reader: ControlReader,
}

/// What one client saw after the kill, in unix microseconds.
#[derive(Default, Clone, Copy)]
struct Seen {
    told: Option<u64>,
    promoted: Option<u64>,
}

async fn open_client(
    endpoint: quinn::Endpoint,
    config: quinn::ClientConfig,
    cli: Arc<Cli>,
) -> Result<Client> {
    let primary = attach(&endpoint, config.clone(), &cli.primary, None).await?;
    let secondary = attach(&endpoint, config, &cli.secondary, Some(primary.ticket)).await?;
    Ok(Client {
        primary: primary.conn,
        secondary: secondary.conn,
        _primary_control: (primary.send, primary.reader),
        secondary_send: secondary.send,
        secondary_reader: secondary.reader,
    })
}

/// Follows one client's secondary session: on `PeerDown` for the primary it switches, as `en`
/// does, and reports when it switched and when the DN said `Promoted`. Drains echoes on both
/// sessions so that they do not pile up.
async fn follow(
    mut client: Client,
    index: usize,
    primary_name: String,
    seen: mpsc::UnboundedSender<(usize, Seen)>,
) {
    let mut state = Seen::default();
    // The primary's end is expected at the kill; the secondary is followed on.
    let mut primary_alive = true;
    loop {
        tokio::select! {
            msg = client.secondary_reader.next() => match msg {
                Ok(Some(Message::PeerDown { dn })) if dn == primary_name && state.told.is_none() => {
                    state.told = Some(unix_micros());
                    if send_message(&mut client.secondary_send, &Message::Switch).await.is_err() {
                        return;
                    }
                    let _ = seen.send((index, state));
                }
                Ok(Some(Message::Promoted)) if state.promoted.is_none() => {
                    state.promoted = Some(unix_micros());
                    let _ = seen.send((index, state));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            },
            got = client.secondary.read_datagram() => if got.is_err() { return },
            got = client.primary.read_datagram(), if primary_alive => primary_alive = got.is_ok(),
        }
    }
}

/// Sends every session a keepalive probe once per `period`, spread evenly over it.
async fn keepalives(conns: Vec<quinn::Connection>, period: Duration) {
    const TICK: Duration = Duration::from_millis(100);
    let ticks = (period.as_millis() / TICK.as_millis()).max(1) as usize;
    let mut interval = tokio::time::interval(TICK);
    let mut seq = 0u32;
    for tick in (0..ticks).cycle() {
        interval.tick().await;
        let (from, to) = (conns.len() * tick / ticks, conns.len() * (tick + 1) / ticks);
        for conn in &conns[from..to] {
            seq = seq.wrapping_add(1);
            let _ = conn.send_datagram(bytes::Bytes::copy_from_slice(&encode_probe(seq)));
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Arc::new(Cli::parse());
    if cli.sessions == 0 {
        bail!("--sessions must be at least 1");
    }
    let started = std::time::Instant::now();
    let names: Vec<String> = (1..=cli.sessions).map(|i| format!("load{i}")).collect();
    let issued = holdfast_dn::pki::issue_clients_in_memory(&cli.pki, &names)?;
    let roots = tls::roots(&cli.pki.join(holdfast_dn::pki::SERVER_CA))?;
    let idle = Duration::from_secs(cli.keepalive_secs) * 3;
    // No default client configuration: every client connects with its own certificate.
    let endpoint = quic::endpoint("0.0.0.0:0".parse()?, None, None)?;
    eprintln!(
        "hf-load: {} certificates issued in {:.1} s; opening sessions",
        issued.len(),
        started.elapsed().as_secs_f64()
    );

    let gate = Arc::new(Semaphore::new(cli.concurrency.max(1)));
    let mut opening = tokio::task::JoinSet::new();
    for (index, (cert, key)) in issued.into_iter().enumerate() {
        let tls = tls::client_config_with(
            roots.clone(),
            vec![CertificateDer::from(cert)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )?;
        let config = quic::client_config(tls, idle)?;
        let (endpoint, cli, gate) = (endpoint.clone(), cli.clone(), gate.clone());
        opening.spawn(async move {
            let _permit = gate.acquire_owned().await;
            let opened =
                tokio::time::timeout(Duration::from_secs(30), open_client(endpoint, config, cli))
                    .await
                    .map_err(|_| anyhow!("no lease within 30 s"))
                    .and_then(|r| r);
            (index, opened)
        });
    }
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let mut conns = Vec::with_capacity(2 * cli.sessions);
    let (mut opened, mut failed, mut first_error) = (0usize, 0usize, None);
    while let Some(joined) = opening.join_next().await {
        match joined {
            Ok((index, Ok(client))) => {
                opened += 1;
                conns.push(client.primary.clone());
                conns.push(client.secondary.clone());
                tokio::spawn(follow(
                    client,
                    index,
                    cli.primary.0.clone(),
                    seen_tx.clone(),
                ));
                if opened % 1000 == 0 {
                    eprintln!("hf-load: {opened} sessions up");
                }
            }
            Ok((_, Err(e))) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    drop(seen_tx);
    let setup = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({"ready": {
            "sessions": opened,
            "failed": failed,
            "first_error": first_error,
            "setup_seconds": setup,
        }})
    );
    tokio::spawn(keepalives(conns, Duration::from_secs(cli.keepalive_secs)));

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let Some(at) = line.strip_prefix("kill ") else {
            continue;
        };
        let killed: u64 = at.trim().parse().context("kill takes unix microseconds")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(cli.switch_timeout_secs);
        let mut results = vec![Seen::default(); cli.sessions];
        let mut promoted = 0;
        while promoted < opened {
            match tokio::time::timeout_at(deadline, seen_rx.recv()).await {
                Ok(Some((index, seen))) => {
                    promoted += usize::from(seen.promoted.is_some());
                    results[index] = seen;
                }
                Ok(None) | Err(_) => break,
            }
        }
        let ms = |t: Option<u64>| t.map(|t| t.saturating_sub(killed) as f64 / 1000.0);
        let switched: Vec<f64> = results.iter().filter_map(|s| ms(s.told)).collect();
        let promoted: Vec<f64> = results.iter().filter_map(|s| ms(s.promoted)).collect();
        println!(
            "{}",
            serde_json::json!({"switched": {"switched_ms": switched, "promoted_ms": promoted}})
        );
    }
    Ok(())
}
