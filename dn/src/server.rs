//! The DN shell: accepts EN sessions over QUIC, asks the lease book, and moves packets between
//! QUIC datagrams and the TUN device.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures::FutureExt;
use holdfast_proto::cluster::{Cluster, DnSpec};
use holdfast_proto::control::{close, Lease, Message};
use holdfast_proto::dn::{Grant, LeaseBook};
use holdfast_proto::{packet, probe};
use holdfast_shell::quic::{send_message, ControlReader};
use holdfast_shell::{control, quic, tls, tun, unix_now};

use crate::routes::RouteInjector;

mod detector;
mod homecoming;
use serde::Serialize;
use tracing::{debug, info, warn, Instrument};

/// How long a client has after its handshake to send `Attach`.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Options {
    pub config: PathBuf,
    pub node: String,
    pub control: PathBuf,
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
    dropped_malformed: AtomicU64,
}

#[derive(Default, Serialize)]
struct Traffic {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    dropped_spoofed: AtomicU64,
}

struct Session {
    identity: String,
    address: IpAddr,
    conn: quinn::Connection,
    traffic: Traffic,
    /// The DN whose pool the address is from (this one, or another for a secondary session).
    owner: String,
    /// The block of the owner's pool the address is from.
    block: ipnet::IpNet,
    /// Set while the client's traffic comes through this DN (it is the client's primary).
    promoted: std::sync::atomic::AtomicBool,
    /// When the client last moved its traffic away ([`Message::Demote`]).
    demoted_at: Mutex<Option<std::time::Instant>>,
    /// The DN's half of the control stream.
    control: tokio::sync::Mutex<quinn::SendStream>,
}

struct Dn {
    spec: DnSpec,
    cluster: Cluster,
    book: Mutex<LeaseBook>,
    /// The host table: leased address -> the session that carries it. O(1) per packet.
    hosts: RwLock<HashMap<IpAddr, Arc<Session>>>,
    tun: tun::Tun,
    routes: tokio::sync::Mutex<RouteInjector>,
    counters: Counters,
    /// Packets forwarded in either direction: the failure detector's view of the data path.
    forwarded: AtomicU64,
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
    let (cluster, spec) = holdfast_shell::load_dn(&opts.config, &opts.node)?;
    let signing_key = holdfast_shell::read_signing_key(&spec)?;
    let (cert, key) = match (&spec.cert, &spec.key) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => bail!("dn {:?} needs both cert and key in the config", spec.name),
    };
    let tls = tls::server_config(
        &cert,
        &key,
        &cluster.client_ca,
        cluster.revoked_clients.clone(),
    )?;
    let plan = spec.plan.clone();
    // The device holds only the DN's own address; the pool reaches it through the routes below,
    // which carry our protocol number for the routing daemon to export.
    let host_prefix = if plan.gateway().is_ipv4() { 32 } else { 128 };
    let tun = tun::open(&spec.tun, plan.gateway(), host_prefix, spec.mtu)?;
    // Opened after the TUN device on purpose: when the process dies, the kernel releases its
    // files in reverse order, and tearing the device down takes ~20 ms (RCU grace periods).
    // The UDP socket goes first, so clients get "port unreachable" at once.
    let endpoint = quic::endpoint(
        spec.listen,
        Some(quic::server_config(tls)?),
        Some(&signing_key.to_bytes()),
    )?;
    // After a restart, the routing daemon may show that another DN still serves own blocks:
    // those stay unadvertised until their clients have come home.
    let netlink = holdfast_shell::netlink::Routes::connect()?;
    let held = homecoming::held_now(&netlink, &spec)
        .await
        .context("cannot read the kernel's routes")?;
    for block in &held {
        info!(%block, "another DN serves this own block: not advertising or allocating from it until its clients come home");
    }
    let routes = RouteInjector::start(&cluster, &spec.name, tun.index()?, held.clone()).await?;
    let peers = homecoming::Peers::bind(&cluster, &spec, signing_key.clone())
        .await?
        .map(Arc::new);
    let mut book = LeaseBook::new(
        spec.name.clone(),
        plan.clone(),
        signing_key,
        cluster.issuer_keys(),
        cluster.lease_lifetime_secs,
    );
    book.set_held(held.clone());
    let dn = Arc::new(Dn {
        spec: spec.clone(),
        cluster: cluster.clone(),
        book: Mutex::new(book),
        hosts: RwLock::new(HashMap::new()),
        tun,
        routes: tokio::sync::Mutex::new(routes),
        counters: Counters::default(),
        forwarded: AtomicU64::new(0),
    });
    tokio::spawn(homecoming::follow_held(
        dn.clone(),
        netlink,
        held,
        peers.clone(),
    ));
    if let Some(peers) = peers {
        tokio::spawn(homecoming::listen(dn.clone(), peers));
    }
    if let Some(link) = link {
        tokio::spawn(detector::run(dn.clone(), link));
    }
    let status_dn = dn.clone();
    let _control = control::serve(opts.control.clone(), move |_req| status_dn.status()).await?;
    info!(node = %spec.name, listen = %spec.listen, pool = %plan.pool, tun = %spec.tun, mtu = spec.mtu, control = %opts.control.display(), "dn up");

    let mut reader = tokio::spawn(tun_to_sessions(dn.clone()));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break Ok(()) };
                let span = tracing::info_span!("session", remote = %incoming.remote_address());
                tokio::spawn(serve_session(dn.clone(), incoming).instrument(span));
            }
            res = tokio::signal::ctrl_c() => { res?; info!("interrupted, shutting down"); break Ok(()); }
            _ = term.recv() => { info!("terminated, shutting down"); break Ok(()); }
            res = &mut reader => {
                break Err(match res {
                    Ok(Err(e)) => e,
                    Ok(Ok(())) => anyhow!("the TUN reader stopped"),
                    Err(e) => anyhow!("the TUN reader panicked: {e}"),
                });
            }
        }
    };
    endpoint.close(close::SHUTDOWN.into(), b"dn shutting down");
    endpoint.wait_idle().await;
    let _ = std::fs::remove_file(&opts.control);
    outcome
}

/// Identity of the authenticated client: its certificate's common name.
fn peer_identity(conn: &quinn::Connection) -> Option<String> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    tls::identity_of(certs.first()?)
}

async fn serve_session(dn: Arc<Dn>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            dn.counters.handshakes_failed.fetch_add(1, Relaxed);
            warn!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    let Some(identity) = peer_identity(&conn) else {
        warn!(%remote, "client certificate has no common name; closing");
        conn.close(close::REFUSED.into(), b"certificate names no identity");
        return;
    };
    match attach(&dn, &conn, &identity, remote).await {
        Ok(session) => {
            let reason = carry(&dn, &session).await;
            let gone = {
                let mut hosts = dn.hosts.write().unwrap_or_else(|e| e.into_inner());
                if hosts
                    .get(&session.address)
                    .is_some_and(|s| s.conn.stable_id() == conn.stable_id())
                {
                    hosts.remove(&session.address);
                }
                !hosts.contains_key(&session.address)
            };
            if gone && session.promoted.load(Relaxed) {
                if let Err(e) = dn.routes.lock().await.release(session.address).await {
                    warn!(error = %format!("{e:#}"), "cannot withdraw the client's route");
                }
            }
            info!(client = %identity, %remote, address = %session.address, %reason, "session ended");
        }
        Err(e) => {
            dn.counters.sessions_refused.fetch_add(1, Relaxed);
            warn!(client = %identity, %remote, error = %format!("{e:#}"), "session refused");
        }
    }
}

/// Reads `Attach`, decides with the lease book, answers `Leased` or `Refused`.
async fn attach(
    dn: &Arc<Dn>,
    conn: &quinn::Connection,
    identity: &str,
    remote: SocketAddr,
) -> Result<Arc<Session>> {
    let (mut send, recv) = tokio::time::timeout(ATTACH_TIMEOUT, conn.accept_bi())
        .await
        .context("no control stream within the attach timeout")?
        .context("connection lost before attach")?;
    let mut reader = ControlReader::new(recv);
    let ticket = match tokio::time::timeout(ATTACH_TIMEOUT, reader.next()).await {
        Ok(Ok(Some(Message::Attach { ticket }))) => ticket,
        Ok(Ok(other)) => {
            conn.close(close::PROTOCOL.into(), b"expected Attach");
            bail!("expected Attach, got {other:?}");
        }
        Ok(Err(e)) => {
            conn.close(close::PROTOCOL.into(), b"malformed control message");
            return Err(e);
        }
        Err(_) => {
            conn.close(close::PROTOCOL.into(), b"attach timeout");
            bail!("no Attach within {ATTACH_TIMEOUT:?}");
        }
    };
    let decision = dn.book.lock().unwrap_or_else(|e| e.into_inner()).attach(
        identity,
        ticket.as_ref(),
        unix_now(),
    );
    let grant = match decision {
        Ok(grant) => grant,
        Err(e) => {
            let reason = e.to_string();
            let _ = send_message(
                &mut send,
                &Message::Refused {
                    code: e.refuse_code(),
                    reason: reason.clone(),
                },
            )
            .await;
            let _ = send.finish();
            // Give the refusal a moment to arrive before the close overtakes it.
            tokio::time::sleep(Duration::from_millis(100)).await;
            conn.close(close::REFUSED.into(), reason.as_bytes());
            return Err(e.into());
        }
    };
    let ticket = grant.ticket().clone();
    let address = ticket.claim.address;
    let (ticket_owner, ticket_block) = (ticket.claim.issuer.clone(), ticket.claim.block);
    let failover = dn.cluster.failover_order(&ticket.claim.issuer, address);
    let lease = Lease {
        ticket,
        gateway: dn.spec.plan.gateway(),
        mtu: dn.spec.mtu,
        routes: dn.cluster.client_routes.clone(),
        failover,
    };
    send_message(&mut send, &Message::Leased(lease)).await?;
    let session = Arc::new(Session {
        identity: identity.to_owned(),
        address,
        conn: conn.clone(),
        traffic: Traffic::default(),
        owner: ticket_owner.clone(),
        block: ticket_block,
        promoted: std::sync::atomic::AtomicBool::new(false),
        demoted_at: Mutex::new(None),
        control: tokio::sync::Mutex::new(send),
    });
    let replaced = dn
        .hosts
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .insert(address, session.clone());
    if let Some(old) = replaced {
        info!(client = %old.identity, %address, "replacing the client's older session");
        old.conn
            .close(close::REPLACED.into(), b"replaced by a newer session");
    }
    dn.counters.sessions_accepted.fetch_add(1, Relaxed);
    let kind = match grant {
        Grant::Home(_) => "home",
        Grant::Foreign(_) => "foreign (secondary)",
    };
    info!(client = %identity, %remote, %address, lease = kind, "client attached");
    // Keep reading the control stream: a malformed message ends the session.
    let watcher = conn.clone();
    let (dn, demoted) = (dn.clone(), session.clone());
    tokio::spawn(async move {
        loop {
            match reader.next().await {
                Ok(Some(Message::Demote)) => demote(&dn, &demoted).await,
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
    Ok(session)
}

/// Most datagrams taken from a session before one batched TUN write.
const BATCH: usize = 64;

/// Decapsulates the session's datagrams into the TUN device until the session ends.
async fn carry(dn: &Dn, session: &Session) -> String {
    let mut warned = false;
    let mut writer = tun::Writer::default();
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
                    let _ = session
                        .conn
                        .send_datagram(bytes::Bytes::copy_from_slice(&echo));
                }
            } else if packet::source(&datagram) == Some(session.address) {
                session.traffic.rx_packets.fetch_add(1, Relaxed);
                session
                    .traffic
                    .rx_bytes
                    .fetch_add(datagram.len() as u64, Relaxed);
                batch.push(datagram);
            } else {
                dn.counters.dropped_spoofed.fetch_add(1, Relaxed);
                session.traffic.dropped_spoofed.fetch_add(1, Relaxed);
                if !warned {
                    warned = true;
                    warn!(client = %session.identity, leased = %session.address, source = ?packet::source(&datagram), "dropping packets with a source that is not the client's address");
                }
            }
            if batch.len() < BATCH {
                next = session
                    .conn
                    .read_datagram()
                    .now_or_never()
                    .and_then(Result::ok);
            }
        }
        if !batch.is_empty() && !session.promoted.load(Relaxed) && !session.just_demoted() {
            promote(dn, session).await;
        }
        match writer.send(&dn.tun, &batch).await {
            Ok(()) => {
                dn.forwarded.fetch_add(batch.len() as u64, Relaxed);
            }
            Err(e) => debug!(error = %e, "TUN write failed"),
        }
        batch.clear();
    }
}

/// The client's traffic arrived here: this DN is its primary. On a secondary session that
/// means the client failed over, so this DN now routes its address (no control round trip
/// first) and says so; an own client needs a route of its own only while another DN still
/// serves its block.
async fn promote(dn: &Dn, session: &Session) {
    session.promoted.store(true, Relaxed);
    let foreign = session.owner != dn.spec.name;
    if foreign {
        info!(client = %session.identity, address = %session.address, home = %session.owner, "client's traffic arrived here: promoted to its primary");
    }
    if let Err(e) = dn
        .routes
        .lock()
        .await
        .serve(session.address, &session.owner, session.block)
        .await
    {
        warn!(error = %format!("{e:#}"), "cannot route the promoted client");
    }
    if !foreign {
        return;
    }
    let mut control = session.control.lock().await;
    if let Err(e) = send_message(&mut control, &Message::Promoted).await {
        debug!(error = %format!("{e:#}"), "cannot tell the client it was promoted");
    }
}

/// The client moved its traffic to another DN (it went home): stop routing its address here.
/// The session stays, as a secondary; a data packet would promote it again.
async fn demote(dn: &Dn, session: &Session) {
    if !session.promoted.swap(false, Relaxed) {
        return;
    }
    *session.demoted_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    info!(client = %session.identity, address = %session.address, home = %session.owner, "the client moved its traffic away: no longer its primary");
    if let Err(e) = dn.routes.lock().await.release(session.address).await {
        warn!(error = %format!("{e:#}"), "cannot withdraw the client's route");
    }
}

/// Packets the client sent before it moved away may arrive after its `Demote` (datagrams and
/// the control stream are not ordered); they must not make this DN its primary again.
const DEMOTE_GRACE: Duration = Duration::from_secs(1);

impl Session {
    fn just_demoted(&self) -> bool {
        self.demoted_at
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|t| t.elapsed() < DEMOTE_GRACE)
    }
}

/// Routes every packet the kernel hands the TUN device to the session holding its destination.
async fn tun_to_sessions(dn: Arc<Dn>) -> Result<()> {
    let mut reader = tun::Reader::default();
    let mut writer = tun::Writer::default();
    let mut batch = Vec::with_capacity(64);
    let mut icmp = Vec::with_capacity(1280);
    loop {
        reader
            .recv(&dn.tun, &mut batch)
            .await
            .context("TUN read failed")?;
        for pkt in batch.drain(..) {
            let Some(dst) = packet::destination(&pkt) else {
                dn.counters.dropped_malformed.fetch_add(1, Relaxed);
                continue;
            };
            let session = dn
                .hosts
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&dst)
                .cloned();
            let Some(session) = session else {
                dn.counters.dropped_no_session.fetch_add(1, Relaxed);
                continue;
            };
            let len = pkt.len() as u64;
            match session.conn.send_datagram(pkt.clone()) {
                Ok(()) => {
                    dn.forwarded.fetch_add(1, Relaxed);
                    session.traffic.tx_packets.fetch_add(1, Relaxed);
                    session.traffic.tx_bytes.fetch_add(len, Relaxed);
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
    }
}

impl Dn {
    fn status(&self) -> serde_json::Value {
        let hosts = self.hosts.read().unwrap_or_else(|e| e.into_inner());
        let mut clients: Vec<serde_json::Value> = hosts
            .values()
            .map(|s| {
                serde_json::json!({
                    "identity": s.identity,
                    "address": s.address,
                    "remote": s.conn.remote_address(),
                    "rtt_us": s.conn.rtt().as_micros() as u64,
                    "max_datagram": s.conn.max_datagram_size(),
                    "primary": s.promoted.load(Relaxed),
                    "home": s.owner,
                    "traffic": s.traffic,
                })
            })
            .collect();
        clients.sort_by(|a, b| a["address"].to_string().cmp(&b["address"].to_string()));
        let leases = self
            .book
            .lock()
            .map(|b| b.active_leases(unix_now()))
            .unwrap_or(0);
        let (routes, held, down): (Vec<serde_json::Value>, Vec<ipnet::IpNet>, Vec<String>) = self
            .routes
            .try_lock()
            .map(|r| {
                (
                    r.installed()
                        .iter()
                        .map(|x| serde_json::json!({"net": x.net, "metric": x.metric, "reason": x.reason.to_string()}))
                        .collect(),
                    r.held().iter().copied().collect(),
                    r.down().iter().cloned().collect(),
                )
            })
            .unwrap_or_default();
        let mut status = serde_json::json!({
            "routes": routes,
            "held_blocks": held,
            "peers_down": down,
            "node": self.spec.name,
            "listen": self.spec.listen,
            "pool": self.spec.plan.pool,
            "tun": self.spec.tun,
            "mtu": self.spec.mtu,
            "leases": leases,
            "sessions": clients.len(),
            "clients": clients,
        });
        if let (Some(obj), Ok(serde_json::Value::Object(counters))) =
            (status.as_object_mut(), serde_json::to_value(&self.counters))
        {
            obj.extend(counters);
        }
        status
    }
}
