//! The DN shell: accepts EN sessions over QUIC, feeds what happens to them (and what the
//! detector and the routing daemon say) to the DN's decision machine (`proto::node`), performs
//! what it decides (control messages, closes, the host table, kernel routes, the lease
//! journal, notices to peers) and moves packets between QUIC datagrams and the TUN device.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::FutureExt;
use holdfast_proto::admit::{Admission, AdmissionPolicy, Verdict};
use holdfast_proto::cluster::{Cluster, DnSpec};
use holdfast_proto::control::{close, Message};
use holdfast_proto::dn::LeaseRecord;
use holdfast_proto::lease::LeaseTicket;
use holdfast_proto::node::{Action, CloseReason, Event, Machine, NodePolicy, Note, SessionId};
use holdfast_proto::{packet, probe, steer};
use holdfast_shell::quic::{send_message, ControlReader};
use holdfast_shell::{control, quic, tls, tun, unix_now};

use crate::journal::Journal;
use crate::routes::RouteInjector;

mod detector;
mod homecoming;
mod metrics;
use serde::Serialize;
use tracing::{debug, error, info, warn, Instrument};

/// How long a client has after its handshake to send `Attach`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a handshake may take: one that stalls (a peer that sent an Initial and went quiet)
/// gives its place back instead of holding it for the idle timeout.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

pub struct Options {
    pub config: PathBuf,
    pub node: String,
    pub control: PathBuf,
    /// Where to serve Prometheus metrics; `None`: nowhere.
    pub metrics: Option<std::net::SocketAddr>,
    /// Workers: runtime threads, and as many TUN queues and UDP sockets (shards of the port),
    /// each read by its own task.
    pub workers: usize,
}

#[derive(Default, Serialize)]
struct Counters {
    sessions_accepted: AtomicU64,
    sessions_refused: AtomicU64,
    handshakes_failed: AtomicU64,
    /// Decapsulated packets whose source is not the session's leased address.
    dropped_spoofed: AtomicU64,
    /// Packets from the TUN device for an address no session holds.
    dropped_no_session: AtomicU64,
    /// Packets larger than the session's datagram size (answered with ICMP where allowed).
    dropped_too_big: AtomicU64,
    icmp_too_big_sent: AtomicU64,
    /// Packets without a readable destination, and TUN reads whose offload header could not be
    /// followed.
    dropped_malformed: AtomicU64,
    /// Decapsulated packets for the cluster network (detectors, peer notices, OSPF, BFD):
    /// no client may reach it through the tunnel.
    dropped_to_cluster: AtomicU64,
    /// Signed notices from peer DNs taken, and refused (bad signature, replayed, stale).
    peer_notices_taken: AtomicU64,
    peer_notices_refused: AtomicU64,
    /// Clients whose traffic arrived here on a secondary session (promoted), and clients that
    /// moved their traffic away (demoted).
    promotions: AtomicU64,
    demotions: AtomicU64,
    /// Route sets applied to the kernel.
    route_changes: AtomicU64,
    /// Handshakes that failed because they timed out (the rest: TLS or transport errors,
    /// `handshakes_failed` counts all).
    handshakes_timed_out: AtomicU64,
}

#[derive(Default, Serialize)]
struct Traffic {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    dropped_spoofed: AtomicU64,
}

/// The shell's side of a session: the connection, its control stream's writer and the data
/// path's view of the machine's decisions.
struct Session {
    id: SessionId,
    identity: String,
    /// Its certificate's fingerprint, for revocations applied while it is up.
    fingerprint: String,
    conn: quinn::Connection,
    traffic: Traffic,
    /// The address, once attached.
    address: OnceLock<IpAddr>,
    /// The IPv6 address of a dual-stack lease, once attached.
    address6: OnceLock<IpAddr>,
    /// Set while the machine says the client's traffic comes through this DN; data on a session
    /// that is not its primary goes to the machine.
    primary: AtomicBool,
    /// Messages for the client, written in order by the session's writer task.
    outbox: tokio::sync::mpsc::Sender<Outgoing>,
    /// The UDP shard (worker endpoint) whose connection IDs it uses.
    shard: u8,
}

enum Outgoing {
    Message(Box<Message>),
    /// Finish the stream after what is queued, give it a moment to arrive, then close.
    Refuse(String),
}

struct Dn {
    spec: DnSpec,
    /// The other DNs of the cluster.
    peer_names: Vec<String>,
    /// The cluster network, closed to tunnel traffic.
    cluster_net: Option<ipnet::IpNet>,
    machine: Mutex<Machine>,
    /// Every session the shell holds, attached or not yet.
    sessions: RwLock<HashMap<SessionId, Arc<Session>>>,
    /// The host table: leased address -> the session that carries it. O(1) per packet.
    hosts: RwLock<HashMap<IpAddr, Arc<Session>>>,
    tun: tun::Tun,
    /// Shared by the sessions' decapsulating tasks (a writer per session would cost each
    /// idle session a megabyte).
    writers: tun::WriterPool,
    routes: tokio::sync::Mutex<RouteInjector>,
    journal: Mutex<Journal>,
    peers: Option<Arc<homecoming::Peers>>,
    /// Woken when the machine's next timeout may have changed.
    timer: tokio::sync::Notify,
    counters: Counters,
    /// Packets forwarded in either direction, and other inputs handled (connections accepted,
    /// probes answered): the failure detector's view of the data path's progress.
    forwarded: AtomicU64,
    handled: AtomicU64,
    /// Packets and bytes through the DN, all sessions together (each session counts its own).
    traffic: Traffic,
    /// Which connection attempts get handshake work and memory.
    admission: Mutex<Admission>,
    /// UDP shards of the listening port (one endpoint each).
    shards: u8,
}

pub async fn run(opts: Options) -> Result<()> {
    let link = detector::Link::connect(&opts.control)?.map(Arc::new);
    let outcome = serve(opts, link.clone()).await;
    if let (Err(e), Some(link)) = (&outcome, &link) {
        link.report_fault(&format!("{e:#}"));
    }
    outcome
}

async fn serve(opts: Options, link: Option<Arc<detector::Link>>) -> Result<()> {
    // The text as applied: a reload (SIGHUP) compares the file with it.
    let mut applied = std::fs::read_to_string(&opts.config)
        .with_context(|| format!("cannot read {}", opts.config.display()))?;
    let (cluster, spec) = holdfast_shell::load_dn(&opts.config, &opts.node)?;
    let signing_key = holdfast_shell::read_signing_key(&spec)?;
    let plan = spec.plan.clone();
    // The device holds only the DN's own address; the pool reaches it through the routes below,
    // which carry our protocol number for the routing daemon to export.
    let host_prefix = if plan.gateway().is_ipv4() { 32 } else { 128 };
    let tun = tun::open_queues(
        &spec.tun,
        plan.gateway(),
        host_prefix,
        spec.mtu,
        opts.workers.max(1),
    )?;
    if let Some(IpAddr::V6(gateway6)) = spec.plan6.as_ref().map(|p| p.gateway()) {
        // Dual stack: the DN's own IPv6 address too, the source of its ICMPv6 errors.
        tun.enable_ipv6(gateway6)
            .with_context(|| format!("cannot give {} its IPv6 address", spec.tun))?;
    }
    // Opened after the TUN device on purpose: when the process dies, the kernel releases its
    // files in reverse order, and tearing the device down takes ~20 ms (RCU grace periods).
    // The UDP socket goes first, so clients get "port unreachable" at once.
    // Clamped into 1..=MAX_SHARDS first, so the narrowing cannot truncate.
    let shards = opts.workers.clamp(1, usize::from(steer::MAX_SHARDS)) as u8;
    let endpoints = quic::sharded_endpoints(
        spec.listen,
        server_config(&cluster, &spec)?,
        &signing_key.to_bytes(),
        shards,
    )?;
    let (mut journal, kept, unreadable) = Journal::open(&spec.lease_journal)?;
    if unreadable > 0 {
        warn!(journal = %spec.lease_journal.display(), lines = unreadable, "skipped unreadable lines of the lease journal");
    }
    let mut machine = Machine::new(
        &cluster,
        &spec.name,
        signing_key.clone(),
        kept,
        NodePolicy::default(),
        unix_now(),
    )?;
    journal.compact(&machine.lease_records(unix_now()))?;
    info!(journal = %spec.lease_journal.display(), leases = machine.active_leases(unix_now()), "lease journal read");
    // After a restart, the routing daemon may show that another DN has taken over own blocks:
    // those stay unadvertised until their clients have come home.
    let netlink = holdfast_shell::netlink::Routes::connect()?;
    let learned = netlink
        .learned()
        .await
        .context("cannot read the kernel's routes")?;
    let now = std::time::Instant::now();
    let mut first = machine.handle(Event::Learned(learned), now, unix_now());
    first.extend(machine.start());
    let routes = RouteInjector::new(tun.index()?)?;
    let peers = homecoming::Peers::bind(&cluster, &spec, signing_key)
        .await?
        .map(Arc::new);
    let dn = Arc::new(Dn {
        spec: spec.clone(),
        peer_names: cluster
            .dns
            .iter()
            .filter(|d| d.name != spec.name)
            .map(|d| d.name.clone())
            .collect(),
        cluster_net: cluster.ospf.as_ref().map(|o| o.network),
        machine: Mutex::new(machine),
        sessions: RwLock::new(HashMap::new()),
        hosts: RwLock::new(HashMap::new()),
        tun,
        writers: tun::WriterPool::default(),
        routes: tokio::sync::Mutex::new(routes),
        journal: Mutex::new(journal),
        peers,
        timer: tokio::sync::Notify::new(),
        counters: Counters::default(),
        forwarded: AtomicU64::new(0),
        handled: AtomicU64::new(0),
        traffic: Traffic::default(),
        admission: Mutex::new(Admission::new(AdmissionPolicy::default())),
        shards,
    });
    dn.perform(first).await;
    tokio::spawn(homecoming::follow_learned(dn.clone(), netlink));
    if let Some(peers) = dn.peers.clone() {
        tokio::spawn(homecoming::listen(dn.clone(), peers));
    }
    tokio::spawn(timers(dn.clone()));
    if let Some(link) = link {
        tokio::spawn(detector::run(dn.clone(), link));
    }
    let status_dn = dn.clone();
    let _control = control::serve(opts.control.clone(), move |request| match request {
        "drain" => status_dn.drain(true),
        "undrain" => status_dn.drain(false),
        _ => status_dn.status(),
    })
    .await?;
    let _metrics = match opts.metrics {
        Some(addr) => {
            let registry = std::sync::Arc::new(metrics::registry(dn.clone()));
            match holdfast_shell::metrics::serve(addr, registry, "dn").await {
                Ok(task) => Some(task),
                // Forwarding matters more than metrics: a DN whose port is taken (two DNs on
                // one host with the same --metrics) runs on and says so.
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "running without metrics");
                    None
                }
            }
        }
        None => None,
    };
    info!(node = %spec.name, listen = %spec.listen, pool = %plan.pool, tun = %spec.tun, mtu = spec.mtu, control = %opts.control.display(), "dn up");

    // One reader per queue; the first to stop ends the DN.
    let mut readers = tokio::task::JoinSet::new();
    for queue in 0..dn.tun.queue_count() {
        readers.spawn(tun_to_sessions(dn.clone(), queue));
    }
    // One acceptor per UDP shard; they end when their endpoint is closed.
    let mut acceptors = tokio::task::JoinSet::new();
    for (shard, endpoint) in endpoints.iter().enumerate() {
        acceptors.spawn(accept(dn.clone(), endpoint.clone(), shard as u8));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let outcome = loop {
        tokio::select! {
            Some(_) = acceptors.join_next() => break Ok(()),
            res = tokio::signal::ctrl_c() => { res?; info!("interrupted, shutting down"); break Ok(()); }
            _ = term.recv() => { info!("terminated, shutting down"); break Ok(()); }
            _ = hup.recv() => reload(&dn, &opts, &endpoints, &mut applied),
            Some(res) = readers.join_next() => {
                break Err(match res {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => anyhow!("the TUN reader stopped"),
                    Err(e) => anyhow!("the TUN reader panicked: {e}"),
                });
            }
        }
    };
    for endpoint in &endpoints {
        endpoint.close(close::SHUTDOWN.into(), b"dn shutting down");
    }
    for endpoint in &endpoints {
        endpoint.wait_idle().await;
    }
    let _ = std::fs::remove_file(&opts.control);
    outcome
}

/// The QUIC server side: the DN's certificate and key, client certificates from the cluster's
/// client CA, less the revoked ones. Read at start and again on reload.
fn server_config(cluster: &Cluster, spec: &DnSpec) -> Result<quinn::ServerConfig> {
    let (Some(cert), Some(key)) = (&spec.cert, &spec.key) else {
        bail!("dn {:?} needs both cert and key in the config", spec.name);
    };
    let tls = tls::server_config(
        cert,
        key,
        &cluster.client_ca,
        cluster.revoked_clients.clone(),
    )?;
    quic::server_config(tls)
}

/// Applies a changed `cluster.toml` (SIGHUP): revocations take effect at once (new handshakes
/// are checked against the new list, live sessions of revoked clients are closed) and the TLS
/// files are read again. A file that does not load, or that changes anything else, is refused
/// with a message and nothing is applied.
fn reload(dn: &Dn, opts: &Options, endpoints: &[quinn::Endpoint], applied: &mut String) {
    let refuse = |why: String| error!(config = %opts.config.display(), "reload refused, running on unchanged: {why}");
    let text = match std::fs::read_to_string(&opts.config) {
        Ok(text) => text,
        Err(e) => return refuse(format!("cannot read it: {e}")),
    };
    let (cluster, spec) = match holdfast_shell::load_dn(&opts.config, &opts.node) {
        Ok(loaded) => loaded,
        Err(e) => return refuse(format!("{e:#}")),
    };
    match holdfast_proto::cluster::restart_needed(applied, &text) {
        Ok(keys) if keys.is_empty() => {}
        Ok(keys) => {
            return refuse(format!(
                "{} changed, which needs a restart of the DN (live: {})",
                keys.join(", "),
                holdfast_proto::cluster::LIVE_KEYS.join(", ")
            ))
        }
        Err(e) => return refuse(e.to_string()),
    }
    match server_config(&cluster, &spec) {
        Ok(config) => {
            for endpoint in endpoints {
                endpoint.set_server_config(Some(config.clone()));
            }
        }
        Err(e) => return refuse(format!("{e:#}")),
    }
    let revoked: Vec<Arc<Session>> = dn
        .sessions
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|s| tls::is_revoked(&cluster.revoked_clients, &s.identity, &s.fingerprint))
        .cloned()
        .collect();
    for session in &revoked {
        warn!(client = %session.identity, remote = %session.conn.remote_address(), "client revoked: closing its session");
        session
            .conn
            .close(close::REFUSED.into(), b"client revoked by the cluster");
    }
    *applied = text;
    info!(
        revoked_clients = cluster.revoked_clients.len(),
        sessions_closed = revoked.len(),
        "configuration reloaded"
    );
}

/// Runs the machine's timeouts when they are due.
async fn timers(dn: Arc<Dn>) {
    loop {
        let due = dn.lock_machine().poll_timeout();
        let changed = dn.timer.notified();
        match due {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {
                        let actions = dn
                            .lock_machine()
                            .handle_timeout(std::time::Instant::now(), unix_now());
                        dn.perform(actions).await;
                    }
                    _ = changed => {}
                }
            }
            None => changed.await,
        }
    }
}

/// Takes the connection attempts of one UDP shard's endpoint, until it is closed.
async fn accept(dn: Arc<Dn>, endpoint: quinn::Endpoint, shard: u8) {
    while let Some(incoming) = endpoint.accept().await {
        dn.handled.fetch_add(1, Relaxed);
        admit(&dn, incoming, shard);
    }
}

/// Starts the handshake of a connection attempt, or answers it the cheap way the admission
/// policy says (a Retry, a refusal, nothing).
fn admit(dn: &Arc<Dn>, incoming: quinn::Incoming, shard: u8) {
    let remote = incoming.remote_address();
    let verdict = dn
        .lock_admission()
        .incoming(remote.ip(), incoming.remote_address_validated());
    match verdict {
        Verdict::Accept => {
            let span = tracing::info_span!("session", %remote);
            let handshake = InFlight {
                dn: dn.clone(),
                remote,
            };
            tokio::spawn(serve_session(dn.clone(), incoming, handshake, shard).instrument(span));
        }
        Verdict::Retry => {
            if let Err(e) = incoming.retry() {
                // Only an address already validated cannot be sent another Retry.
                e.into_incoming().ignore();
            }
        }
        Verdict::Refuse => incoming.refuse(),
        Verdict::Ignore => incoming.ignore(),
    }
}

/// An accepted handshake's place; given back when dropped, however the handshake ends.
struct InFlight {
    dn: Arc<Dn>,
    remote: std::net::SocketAddr,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.dn.lock_admission().handshake_ended(self.remote.ip());
    }
}

/// A connection that authenticated and has not attached yet, counted against its identity.
struct Unattached {
    dn: Arc<Dn>,
    identity: String,
}

impl Drop for Unattached {
    fn drop(&mut self) {
        self.dn.lock_admission().attached_or_gone(&self.identity);
    }
}

/// Identity of the authenticated client (its certificate's common name) and the certificate's
/// fingerprint.
fn peer_identity(conn: &quinn::Connection) -> Option<(String, String)> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    let cert = certs.first()?;
    Some((tls::identity_of(cert)?, tls::fingerprint(cert)))
}

async fn serve_session(dn: Arc<Dn>, incoming: quinn::Incoming, handshake: InFlight, shard: u8) {
    let remote = incoming.remote_address();
    let handshake_done = match incoming.accept() {
        Ok(connecting) => tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| Err(quinn::ConnectionError::TimedOut)),
        Err(e) => Err(e),
    };
    drop(handshake);
    let conn = match handshake_done {
        Ok(conn) => conn,
        Err(e) => {
            dn.counters.handshakes_failed.fetch_add(1, Relaxed);
            if matches!(e, quinn::ConnectionError::TimedOut) {
                dn.counters.handshakes_timed_out.fetch_add(1, Relaxed);
            }
            debug!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    let Some((identity, fingerprint)) = peer_identity(&conn) else {
        warn!(%remote, "client certificate has no common name; closing");
        conn.close(close::REFUSED.into(), b"certificate names no identity");
        return;
    };
    if !dn.lock_admission().identified(&identity) {
        debug!(client = ?identity, %remote, "too many unattached connections for this identity");
        conn.close(
            close::REFUSED.into(),
            b"too many connections not yet attached for this identity",
        );
        return;
    }
    let unattached = Unattached {
        dn: dn.clone(),
        identity: identity.clone(),
    };
    let attach = read_attach(&conn).await;
    let (send, mut reader, ticket) = match attach {
        Ok(got) => got,
        Err(e) => {
            dn.counters.sessions_refused.fetch_add(1, Relaxed);
            warn!(client = ?identity, %remote, error = %format!("{e:#}"), "session refused");
            return;
        }
    };
    let id = conn.stable_id() as SessionId;
    let (outbox, queued) = tokio::sync::mpsc::channel(OUTBOX);
    let session = Arc::new(Session {
        id,
        identity: identity.clone(),
        fingerprint,
        conn: conn.clone(),
        traffic: Traffic::default(),
        address: OnceLock::new(),
        address6: OnceLock::new(),
        primary: AtomicBool::new(false),
        outbox,
        shard,
    });
    tokio::spawn(write_control(conn.clone(), send, queued));
    dn.sessions
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, session.clone());
    dn.handle(Event::Attach {
        session: id,
        identity: identity.clone(),
        ticket,
    })
    .await;
    let attached = dn
        .lock_machine()
        .session(id)
        .map(|s| (s.address, s.address6));
    drop(unattached);
    if let Some((address, address6)) = attached {
        let _ = session.address.set(address);
        if let Some(v6) = address6 {
            let _ = session.address6.set(v6.address.into());
        }
        dn.counters.sessions_accepted.fetch_add(1, Relaxed);
        // Keep reading the control stream: a malformed message ends the session.
        let (watcher, control_dn) = (conn.clone(), dn.clone());
        tokio::spawn(async move {
            loop {
                match reader.next().await {
                    Ok(Some(Message::Demote)) => control_dn.handle(Event::Demote(id)).await,
                    Ok(Some(Message::Switch)) => control_dn.handle(Event::Switch(id)).await,
                    Ok(Some(msg)) => debug!(?msg, "ignoring control message"),
                    Ok(None) => break,
                    Err(e) => {
                        debug!(error = %format!("{e:#}"), "control stream ended");
                        if watcher.close_reason().is_none() {
                            watcher.close(close::PROTOCOL.into(), b"malformed control message");
                        }
                        break;
                    }
                }
            }
        });
        let reason = carry(&dn, &session).await;
        info!(client = %identity, %remote, %address, %reason, "session ended");
    } else {
        dn.counters.sessions_refused.fetch_add(1, Relaxed);
        // The refusal is on its way; the writer closes the connection after it.
        let _ = conn.closed().await;
    }
    dn.handle(Event::Ended(id)).await;
    dn.sessions
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
}

/// Reads the client's `Attach`: the control stream's halves and the ticket, if any.
async fn read_attach(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, ControlReader, Option<LeaseTicket>)> {
    let (send, recv) = tokio::time::timeout(ATTACH_TIMEOUT, conn.accept_bi())
        .await
        .context("no control stream within the attach timeout")?
        .context("connection lost before attach")?;
    let mut reader = ControlReader::new(recv);
    match tokio::time::timeout(ATTACH_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(Message::Attach { ticket }))) => Ok((send, reader, ticket)),
        Ok(Ok(other)) => {
            conn.close(close::PROTOCOL.into(), b"expected Attach");
            bail!("expected Attach, got {other:?}");
        }
        Ok(Err(e)) => {
            conn.close(close::PROTOCOL.into(), b"malformed control message");
            Err(e)
        }
        Err(_) => {
            conn.close(close::PROTOCOL.into(), b"attach timeout");
            bail!("no Attach within {ATTACH_TIMEOUT:?}");
        }
    }
}

/// Messages queued for one client before it counts as not reading.
const OUTBOX: usize = 64;
/// Longest a control write may wait for the client to take it.
const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Writes the session's control messages in order; a client that does not take them within
/// the deadline is disconnected, so that nobody else waits on it.
async fn write_control(
    conn: quinn::Connection,
    mut send: quinn::SendStream,
    mut queued: tokio::sync::mpsc::Receiver<Outgoing>,
) {
    while let Some(out) = queued.recv().await {
        match out {
            Outgoing::Message(message) => {
                match tokio::time::timeout(CONTROL_WRITE_TIMEOUT, send_message(&mut send, &message))
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        debug!(error = %format!("{e:#}"), "control write failed");
                        return;
                    }
                    Err(_) => {
                        warn!("the client does not read its control stream: disconnecting it");
                        conn.close(close::PROTOCOL.into(), b"control stream not read");
                        return;
                    }
                }
            }
            Outgoing::Refuse(reason) => {
                let _ = send.finish();
                // Give the refusal a moment to arrive before the close overtakes it.
                tokio::time::sleep(Duration::from_millis(100)).await;
                conn.close(close::REFUSED.into(), reason.as_bytes());
                return;
            }
        }
    }
}

impl Dn {
    fn lock_machine(&self) -> std::sync::MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_admission(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn session(&self, id: SessionId) -> Option<Arc<Session>> {
        self.sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    /// Feeds the machine one event and performs what it decides.
    async fn handle(self: &Arc<Self>, event: Event) {
        let actions = self
            .lock_machine()
            .handle(event, std::time::Instant::now(), unix_now());
        self.perform(actions).await;
    }

    /// Performs the machine's actions, in order.
    async fn perform(self: &Arc<Self>, actions: Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        for action in actions {
            match action {
                Action::Record(record) => {
                    let dn = self.clone();
                    let written = tokio::task::spawn_blocking(move || dn.record(&record)).await;
                    match written {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            error!(error = %format!("{e:#}"), "lease not kept: a restart could give its address away")
                        }
                        Err(e) => error!(error = %e, "lease journal writer failed"),
                    }
                }
                Action::Send(id, message) => {
                    if let Some(session) = self.session(id) {
                        if session
                            .outbox
                            .try_send(Outgoing::Message(Box::new(message)))
                            .is_err()
                        {
                            warn!(client = %session.identity, "the client does not read its control stream: disconnecting it");
                            session
                                .conn
                                .close(close::PROTOCOL.into(), b"control stream not read");
                        }
                    }
                }
                Action::Close(id, reason) => {
                    let Some(session) = self.session(id) else {
                        continue;
                    };
                    match reason {
                        CloseReason::Refused(why) => {
                            let _ = session.outbox.try_send(Outgoing::Refuse(why));
                        }
                        CloseReason::Replaced => session
                            .conn
                            .close(close::REPLACED.into(), b"replaced by a newer session"),
                    }
                }
                Action::Host { address, session } => {
                    let mut hosts = self.hosts.write().unwrap_or_else(|e| e.into_inner());
                    match session.and_then(|id| self.session(id)) {
                        Some(s) => {
                            hosts.insert(address, s);
                        }
                        None => {
                            hosts.remove(&address);
                        }
                    }
                }
                Action::Primary { session, primary } => {
                    if let Some(s) = self.session(session) {
                        s.primary.store(primary, Relaxed);
                    }
                }
                Action::Routes { generation, routes } => {
                    self.counters.route_changes.fetch_add(1, Relaxed);
                    if let Err(e) = self.routes.lock().await.apply(generation, routes).await {
                        warn!(error = %format!("{e:#}"), "cannot bring the kernel's routes in line");
                    }
                }
                Action::AnnounceHomeIsBack => {
                    if let Some(peers) = &self.peers {
                        peers.announce_home_is_back(&self.spec.name).await;
                    }
                }
                Action::Note(note) => log_note(self, &note),
            }
        }
        self.timer.notify_one();
    }

    fn record(&self, record: &LeaseRecord) -> Result<()> {
        let mut journal = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        journal.append(record)?;
        // Counting is cheap; the records are built only when the file is rewritten, so that
        // thousands of attaches do not each copy every lease.
        let live = self.lock_machine().active_leases(unix_now());
        if journal.wants_compaction(live) {
            let records = self.lock_machine().lease_records(unix_now());
            journal.compact(&records)?;
        }
        Ok(())
    }
}

fn log_note(dn: &Dn, note: &Note) {
    let who = |id: &SessionId| {
        dn.session(*id)
            .map(|s| (s.identity.clone(), s.conn.remote_address()))
    };
    match note {
        Note::Attached {
            session,
            identity,
            address,
            home,
        } => {
            let remote = who(session).map(|(_, r)| r.to_string()).unwrap_or_default();
            let lease = if *home { "home" } else { "foreign (secondary)" };
            info!(client = %identity, %remote, %address, %lease, "client attached");
        }
        Note::Refused {
            identity, reason, ..
        } => {
            warn!(client = %identity, %reason, "attach refused");
        }
        Note::Replaced { address, .. } => {
            info!(%address, "replacing the client's older session");
        }
        Note::Promoted {
            address,
            home,
            session,
            cause,
            after,
        } => {
            dn.counters.promotions.fetch_add(1, Relaxed);
            let client = who(session).map(|(c, _)| c).unwrap_or_default();
            let cause = cause.name();
            let secondary_ms = after.as_millis() as u64;
            info!(%client, %address, %home, %cause, secondary_ms, "client's traffic arrived here: promoted to its primary");
        }
        Note::Demoted { address, session } => {
            dn.counters.demotions.fetch_add(1, Relaxed);
            let client = who(session).map(|(c, _)| c).unwrap_or_default();
            info!(%client, %address, "the client moved its traffic away: no longer its primary");
        }
        Note::Held { block, held: true } => {
            info!(%block, "another DN serves this own block: not advertising or allocating from it until its clients come home");
        }
        Note::Held { block, held: false } => {
            info!(%block, "own block free again: advertising and allocating from it");
        }
        Note::CarriedElsewhere {
            block,
            carried: true,
        } => {
            info!(%block, "another DN carries clients of this own block: telling the peers this DN is back");
        }
        Note::CarriedElsewhere {
            block,
            carried: false,
        } => {
            info!(%block, "no client of this own block is carried elsewhere any more");
        }
        Note::PeerState { dn: peer, up: true } => {
            info!(%peer, "the failure detector says this DN is up");
        }
        Note::PeerState {
            dn: peer,
            up: false,
        } => {
            warn!(%peer, "the failure detector says this DN is down: taking over the blocks backed for it and telling the clients with a secondary session here");
        }
        Note::HeardAgain { dn: peer } => {
            info!(%peer, "the DN was only unheard and never stopped: its blocks go back to standby at once; its clients still here keep host routes");
        }
        Note::LetGo { dn: peer } => {
            info!(%peer, "the DN has been back for the homecoming period: its blocks go back to standby; its clients still here keep host routes");
        }
        Note::Drain { on: true, clients } => {
            warn!(%clients, "draining: every client is told to move its traffic to another DN; no new client is taken");
        }
        Note::Drain { on: false, clients } => {
            info!(%clients, "drain ended: taking clients again; own clients come home");
        }
        Note::SentHome { home, clients } => {
            info!(%home, %clients, "home DN is back: telling its clients carried here");
        }
    }
}

/// Most datagrams taken from a session before one batched TUN write.
const BATCH: usize = 64;

/// Decapsulates the session's datagrams into the TUN device until the session ends.
async fn carry(dn: &Arc<Dn>, session: &Session) -> String {
    let Some(&address) = session.address.get() else {
        return "never attached".into();
    };
    // A client may send from its own addresses only: one, or one of each family.
    let own = [address, session.address6.get().copied().unwrap_or(address)];
    let mut warned = false;
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let first = match session.conn.read_datagram().await {
            Ok(d) => d,
            Err(e) => return e.to_string(),
        };
        // Take whatever else has already arrived, so the TUN write can coalesce it.
        let mut next = Some(first);
        while let Some(datagram) = next.take() {
            if probe::is_probe(&datagram) {
                if let Some(echo) = probe::echo_for(&datagram) {
                    dn.handled.fetch_add(1, Relaxed);
                    let _ = session
                        .conn
                        .send_datagram(bytes::Bytes::copy_from_slice(&echo));
                }
            } else if !packet::from_one_of(&datagram, &own) {
                dn.counters.dropped_spoofed.fetch_add(1, Relaxed);
                session.traffic.dropped_spoofed.fetch_add(1, Relaxed);
                if !warned {
                    warned = true;
                    warn!(client = %session.identity, leased = %address, source = ?packet::source(&datagram), "dropping packets with a source that is not the client's address");
                }
            } else if packet::destination(&datagram)
                .is_some_and(|dst| dn.cluster_net.is_some_and(|net| net.contains(&dst)))
            {
                dn.counters.dropped_to_cluster.fetch_add(1, Relaxed);
            } else {
                batch.push(datagram);
            }
            if batch.len() < BATCH {
                next = session
                    .conn
                    .read_datagram()
                    .now_or_never()
                    .and_then(Result::ok);
            }
        }
        if !batch.is_empty() {
            // Counted once a batch: the DN's counters are shared by every worker.
            let bytes = batch.iter().map(|d| d.len() as u64).sum();
            for traffic in [&session.traffic, &dn.traffic] {
                traffic.rx_packets.fetch_add(batch.len() as u64, Relaxed);
                traffic.rx_bytes.fetch_add(bytes, Relaxed);
            }
            if !session.primary.load(Relaxed) {
                dn.handle(Event::Data(session.id)).await;
            }
        }
        match dn.writers.send(&dn.tun, &batch).await {
            Ok(()) => {
                dn.forwarded.fetch_add(batch.len() as u64, Relaxed);
            }
            Err(e) => debug!(error = %e, "TUN write failed"),
        }
        batch.clear();
    }
}

/// Routes every packet the kernel hands queue `queue` of the TUN device to the session holding
/// its destination.
async fn tun_to_sessions(dn: Arc<Dn>, queue: usize) -> Result<()> {
    let mut reader = tun::Reader::default();
    let mut writer = tun::Writer::default();
    let mut batch = Vec::with_capacity(64);
    let mut icmp = Vec::with_capacity(1280);
    loop {
        reader
            .recv_queue(&dn.tun, queue, &mut batch)
            .await
            .context("TUN read failed")?;
        let mangled = reader.take_dropped();
        if mangled > 0 {
            dn.counters.dropped_malformed.fetch_add(mangled, Relaxed);
        }
        // A batch is mostly one flow's: its packets take the session looked up for the one
        // before when they go to the same address, and are counted once per run of them.
        let mut run: Option<Run> = None;
        for pkt in batch.drain(..) {
            let Some(dst) = packet::destination(&pkt) else {
                dn.counters.dropped_malformed.fetch_add(1, Relaxed);
                continue;
            };
            if run.as_ref().is_none_or(|r| r.to != dst) {
                if let Some(done) = run.replace(Run::to(&dn, dst)) {
                    done.count(&dn);
                }
            }
            let Some(Run {
                session: Some(session),
                packets,
                bytes: sent_bytes,
                ..
            }) = run.as_mut()
            else {
                dn.counters.dropped_no_session.fetch_add(1, Relaxed);
                continue;
            };
            let len = pkt.len() as u64;
            match session.conn.send_datagram(pkt.clone()) {
                Ok(()) => {
                    *packets += 1;
                    *sent_bytes += len;
                }
                Err(quinn::SendDatagramError::TooLarge) => {
                    dn.counters.dropped_too_big.fetch_add(1, Relaxed);
                    let mtu = session.conn.max_datagram_size().unwrap_or(1200);
                    let mtu = u16::try_from(mtu).unwrap_or(u16::MAX);
                    if packet::dont_fragment(&pkt) && packet::packet_too_big(&pkt, mtu, &mut icmp) {
                        dn.counters.icmp_too_big_sent.fetch_add(1, Relaxed);
                        let reply = bytes::Bytes::copy_from_slice(&icmp);
                        let _ = writer.send(&dn.tun, &[reply]).await;
                    }
                }
                Err(e) => debug!(error = %e, %dst, "datagram not sent"),
            }
        }
        if let Some(done) = run {
            done.count(&dn);
        }
    }
}

/// A run of a batch's packets to one address: its session, looked up once, and what was sent
/// to it, counted once.
struct Run {
    to: IpAddr,
    session: Option<Arc<Session>>,
    packets: u64,
    bytes: u64,
}

impl Run {
    fn to(dn: &Dn, to: IpAddr) -> Self {
        let session = dn
            .hosts
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&to)
            .cloned();
        Self {
            to,
            session,
            packets: 0,
            bytes: 0,
        }
    }

    /// Adds what was sent to the session's counters and the DN's.
    fn count(self, dn: &Dn) {
        let Some(session) = self.session.filter(|_| self.packets > 0) else {
            return;
        };
        dn.forwarded.fetch_add(self.packets, Relaxed);
        for traffic in [&session.traffic, &dn.traffic] {
            traffic.tx_packets.fetch_add(self.packets, Relaxed);
            traffic.tx_bytes.fetch_add(self.bytes, Relaxed);
        }
    }
}

impl Dn {
    /// Starts (`true`) or ends a drain, from the control socket; answers with the outcome.
    fn drain(self: &Arc<Self>, on: bool) -> serde_json::Value {
        let actions =
            self.lock_machine()
                .handle(Event::Drain(on), std::time::Instant::now(), unix_now());
        let told = actions
            .iter()
            .filter(|a| matches!(a, Action::Send(..)))
            .count();
        let dn = self.clone();
        tokio::spawn(async move { dn.perform(actions).await });
        serde_json::json!({"draining": self.lock_machine().draining(), "clients_told": told})
    }

    fn status(&self) -> serde_json::Value {
        let homes: HashMap<SessionId, String> = self
            .lock_machine()
            .sessions()
            .map(|(id, m)| (id, m.home.clone()))
            .collect();
        let hosts = self.hosts.read().unwrap_or_else(|e| e.into_inner());
        let mut clients: Vec<serde_json::Value> = hosts
            .iter()
            // A dual-stack client is listed once, under its first address, with both.
            .filter(|(address, s)| s.address.get().is_none() || s.address6.get() != Some(*address))
            .map(|(address, s)| {
                let home = homes.get(&s.id).cloned().unwrap_or_default();
                serde_json::json!({
                    "identity": s.identity,
                    "address": address,
                    "address6": s.address6.get(),
                    "remote": s.conn.remote_address(),
                    "rtt_us": s.conn.rtt().as_micros() as u64,
                    "max_datagram": s.conn.max_datagram_size(),
                    "quic": holdfast_shell::quic::path_figures(&s.conn.stats()),
                    "primary": s.primary.load(Relaxed),
                    "home": home,
                    "shard": s.shard,
                    "traffic": s.traffic,
                })
            })
            .collect();
        drop(hosts);
        clients.sort_by(|a, b| a["address"].to_string().cmp(&b["address"].to_string()));
        let (leases, held, down) = {
            let m = self.lock_machine();
            (
                m.active_leases(unix_now()),
                m.held().iter().copied().collect::<Vec<ipnet::IpNet>>(),
                m.peers_down().iter().cloned().collect::<Vec<String>>(),
            )
        };
        let routes: Vec<serde_json::Value> = self
            .routes
            .try_lock()
            .map(|r| {
                r.installed()
                    .iter()
                    .map(|x| serde_json::json!({"net": x.net, "metric": x.metric, "reason": x.reason.to_string()}))
                    .collect()
            })
            .unwrap_or_default();
        let mut status = serde_json::json!({
            "routes": routes,
            "held_blocks": held,
            "peers_down": down,
            "draining": self.lock_machine().draining(),
            "node": self.spec.name,
            "listen": self.spec.listen,
            "pool": self.spec.plan.pool,
            "tun": self.spec.tun,
            "mtu": self.spec.mtu,
            "udp_shards": self.shards,
            "udp": holdfast_shell::gso::SENT.figures(),
            "leases": leases,
            "sessions": clients.len(),
            "clients": clients,
        });
        if let (Some(obj), Ok(serde_json::Value::Object(counters))) =
            (status.as_object_mut(), serde_json::to_value(&self.counters))
        {
            obj.extend(counters);
        }
        let admission = self.lock_admission();
        status["admission"] = serde_json::json!({
            "handshakes_in_flight": admission.in_flight(),
            "retried": admission.retried,
            "refused": admission.refused,
            "ignored": admission.ignored,
            "over_identity_limit": admission.over_identity_limit,
        });
        status
    }
}
