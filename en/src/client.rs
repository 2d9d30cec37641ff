//! The EN shell: holds a QUIC session to a DN, keeps the TUN device and its routes, forwards
//! packets both ways and reconnects with its lease ticket when the session is lost.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::FutureExt;
use holdfast_proto::backoff::Backoff;
use holdfast_proto::control::{close, Lease, Message, RefuseCode};
use holdfast_proto::lease::LeaseTicket;
use holdfast_proto::packet;
use holdfast_shell::netlink::{NextHop, Routes};
use holdfast_shell::quic::{send_message, ControlReader};
use holdfast_shell::{control, quic, tls, tun};
use ipnet::IpNet;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::config::{DnEndpoint, EnConfig};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the TUN MTU is re-derived from the session's path MTU.
const MTU_CHECK: Duration = Duration::from_millis(500);

#[derive(Default, Serialize)]
struct Traffic {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    dropped_no_session: AtomicU64,
    dropped_too_big: AtomicU64,
    icmp_too_big_sent: AtomicU64,
}

#[derive(Clone, Serialize)]
struct SessionView {
    dn: String,
    endpoint: SocketAddr,
    /// connecting | up | backoff | refused
    state: &'static str,
    role: &'static str,
    last_error: Option<String>,
    connects: u64,
}

struct Shared {
    config: EnConfig,
    traffic: Traffic,
    view: Mutex<View>,
    /// The session packets go out on; `None` while reconnecting.
    current: watch::Sender<Option<quinn::Connection>>,
}

#[derive(Default)]
struct View {
    address: Option<IpAddr>,
    /// The primary DN's own address inside its pool.
    gateway: Option<IpAddr>,
    lease_expires_at: Option<u64>,
    mtu: Option<u16>,
    up_since: Option<Instant>,
    sessions: Vec<SessionView>,
}

/// The TUN device and what was configured around it, created on the first lease.
struct Tunnel {
    dev: Arc<tun::Tun>,
    address: IpAddr,
    /// Host routes that keep DN endpoints out of the tunnel, removed on exit.
    exemptions: Vec<IpNet>,
}

pub async fn run(config: EnConfig) -> Result<()> {
    let tls = tls::client_config(&config.cert, &config.key, &config.server_ca)?;
    let bind: SocketAddr = if config.dns.iter().all(|d| d.endpoint.is_ipv4()) {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut endpoint = quic::endpoint(bind, None, None)?;
    endpoint.set_default_client_config(quic::client_config(tls)?);
    let routes = Routes::connect()?;
    let (current, _) = watch::channel(None);
    let shared = Arc::new(Shared {
        view: Mutex::new(View {
            sessions: config
                .dns
                .iter()
                .map(|d| SessionView {
                    dn: d.name.clone(),
                    endpoint: d.endpoint,
                    state: "connecting",
                    role: "candidate",
                    last_error: None,
                    connects: 0,
                })
                .collect(),
            ..View::default()
        }),
        config: config.clone(),
        traffic: Traffic::default(),
        current,
    });
    let status_shared = shared.clone();
    let _control = control::serve(config.control_socket.clone(), move |_| {
        status_shared.status()
    })
    .await?;
    info!(control = %config.control_socket.display(), dns = config.dns.len(), "en starting");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tunnel: Option<Tunnel> = None;
    let outcome = tokio::select! {
        res = maintain(&shared, &endpoint, &routes, &mut tunnel) => res,
        res = tokio::signal::ctrl_c() => { res.context("signal handler")?; info!("interrupted, shutting down"); Ok(()) }
        _ = term.recv() => { info!("terminated, shutting down"); Ok(()) }
    };
    if let Some(conn) = shared.current.borrow().clone() {
        conn.close(close::SHUTDOWN.into(), b"en shutting down");
    }
    endpoint.wait_idle().await;
    if let Some(t) = tunnel {
        for net in &t.exemptions {
            if let Err(e) = routes.delete(*net, None, None).await {
                warn!(error = %format!("{e:#}"), "could not remove endpoint route");
            }
        }
    }
    let _ = std::fs::remove_file(&config.control_socket);
    outcome
}

/// Keeps one session up, forever: connect, carry traffic until it dies, back off, repeat.
async fn maintain(
    shared: &Arc<Shared>,
    endpoint: &quinn::Endpoint,
    routes: &Routes,
    tunnel: &mut Option<Tunnel>,
) -> Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut ticket: Option<LeaseTicket> = None;
    let mut next_dn = 0usize;
    loop {
        let index = next_dn % shared.config.dns.len();
        let dn = shared.config.dns[index].clone();
        shared.set_state(index, "connecting", None);
        match connect(endpoint, &dn, ticket.as_ref()).await {
            Ok((conn, lease, control)) => {
                ticket = Some(lease.ticket.clone());
                if let Err(e) = ensure_tunnel(shared, routes, tunnel, &conn, &lease).await {
                    conn.close(
                        close::SHUTDOWN.into(),
                        b"client could not configure its tunnel",
                    );
                    return Err(e);
                }
                backoff.reset();
                shared.on_up(index, &lease);
                let Some(t) = tunnel.as_ref() else {
                    bail!("tunnel missing after configuration");
                };
                let reason = carry(shared, t, &conn).await;
                drop(control);
                shared.current.send_replace(None);
                warn!(dn = %dn.name, %reason, "session lost; reconnecting");
                shared.set_state(index, "backoff", Some(reason));
            }
            Err(Failure::Refused(code, reason)) => {
                warn!(dn = %dn.name, ?code, %reason, "DN refused this client");
                if code == RefuseCode::BadTicket || code == RefuseCode::AddressUnavailable {
                    // The ticket is no good here (e.g. expired): ask for a fresh lease next time.
                    ticket = None;
                }
                shared.set_state(index, "refused", Some(format!("{code:?}: {reason}")));
                next_dn += 1;
            }
            Err(Failure::Other(e)) => {
                let e = format!("{e:#}");
                warn!(dn = %dn.name, error = %e, "cannot connect");
                shared.set_state(index, "backoff", Some(e));
                next_dn += 1;
            }
        }
        let delay = backoff.next_delay(rand::random::<f64>());
        debug!(?delay, "waiting before reconnecting");
        tokio::time::sleep(delay).await;
    }
}

enum Failure {
    Refused(RefuseCode, String),
    Other(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Other(e.into())
    }
}

/// Handshake, `Attach`, and the DN's answer.
async fn connect(
    endpoint: &quinn::Endpoint,
    dn: &DnEndpoint,
    ticket: Option<&LeaseTicket>,
) -> Result<(quinn::Connection, Lease, ControlStream), Failure> {
    let attempt = async {
        let conn = endpoint
            .connect(dn.endpoint, &dn.server_name)
            .with_context(|| format!("cannot start a connection to {}", dn.endpoint))?
            .await
            .with_context(|| format!("handshake with {} ({}) failed", dn.name, dn.endpoint))?;
        let (mut send, recv) = conn
            .open_bi()
            .await
            .context("cannot open the control stream")?;
        send_message(
            &mut send,
            &Message::Attach {
                ticket: ticket.cloned(),
            },
        )
        .await?;
        let mut reader = ControlReader::new(recv);
        match reader.next().await {
            Ok(Some(Message::Leased(lease))) => Ok((
                conn,
                lease,
                ControlStream {
                    _send: send,
                    _reader: reader,
                },
            )),
            Ok(Some(Message::Refused { code, reason })) => Err(Failure::Refused(code, reason)),
            Ok(other) => Err(Failure::Other(anyhow!(
                "unexpected answer to Attach: {other:?}"
            ))),
            Err(e) => match conn.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(c)) => Err(Failure::Refused(
                    RefuseCode::ProtocolError,
                    format!(
                        "{} ({})",
                        close::describe(c.error_code.into_inner()),
                        String::from_utf8_lossy(&c.reason)
                    ),
                )),
                _ => Err(Failure::Other(e)),
            },
        }
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
        Ok(res) => res,
        Err(_) => Err(Failure::Other(anyhow!(
            "no answer from {} ({}) within {CONNECT_TIMEOUT:?}",
            dn.name,
            dn.endpoint
        ))),
    }
}

/// The control stream stays open for the session's life.
struct ControlStream {
    _send: quinn::SendStream,
    _reader: ControlReader,
}

fn inner_mtu(conn: &quinn::Connection) -> u16 {
    let size = conn.max_datagram_size().unwrap_or(1200);
    u16::try_from(size).unwrap_or(u16::MAX).clamp(576, 9000)
}

/// Creates the TUN device and routes on the first lease; afterwards only checks the address.
async fn ensure_tunnel(
    shared: &Arc<Shared>,
    routes: &Routes,
    tunnel: &mut Option<Tunnel>,
    conn: &quinn::Connection,
    lease: &Lease,
) -> Result<()> {
    let address = lease.ticket.claim.address;
    let mtu = inner_mtu(conn).min(lease.mtu);
    if let Some(t) = tunnel.as_mut() {
        if t.address != address {
            // A new lease from a DN that lost our old one: move the device to the new address.
            warn!(old = %t.address, new = %address, "address changed");
            t.dev
                .set_address(address)
                .with_context(|| format!("cannot move {} to {address}", t.dev.name()))?;
            t.address = address;
        }
        return Ok(());
    }
    let prefix = if address.is_ipv4() { 32 } else { 128 };
    let dev = Arc::new(tun::open(&shared.config.tun, address, prefix, mtu)?);
    let index = dev.index()?;
    // Keep every DN endpoint that a pushed route would swallow on its current path.
    let mut exemptions = Vec::new();
    for dn in &shared.config.dns {
        let ip = dn.endpoint.ip();
        if lease.routes.iter().any(|r| r.contains(&ip)) {
            let hop: NextHop = routes.lookup(ip).await?;
            let host = IpNet::from(ip);
            routes.replace(host, &hop, None).await?;
            info!(endpoint = %ip, ?hop, "keeping the DN endpoint outside the tunnel");
            exemptions.push(host);
        }
    }
    let through_tunnel = NextHop {
        gateway: None,
        oif: Some(index),
    };
    for net in &lease.routes {
        for part in split_default(*net) {
            routes.replace(part, &through_tunnel, None).await?;
        }
    }
    info!(tun = %shared.config.tun, %address, mtu, routes = ?lease.routes, "tunnel configured");
    let t = Tunnel {
        dev,

        address,
        exemptions,
    };
    tokio::spawn(tun_to_session(shared.clone(), t.dev.clone()));
    *tunnel = Some(t);
    Ok(())
}

/// A default route is installed as its two halves so that the original default route stays
/// in place underneath (and comes back untouched when the tunnel goes).
fn split_default(net: IpNet) -> Vec<IpNet> {
    if net.prefix_len() == 0 {
        net.subnets(1)
            .map(|s| s.collect())
            .unwrap_or_else(|_| vec![net])
    } else {
        vec![net]
    }
}

/// Most datagrams taken from the session before one batched TUN write.
const BATCH: usize = 64;

/// Carries the session's datagrams into the TUN device and keeps the MTU in step with the path
/// until the session ends; returns why it ended.
async fn carry(shared: &Shared, tunnel: &Tunnel, conn: &quinn::Connection) -> String {
    shared.current.send_replace(Some(conn.clone()));
    let mut mtu = inner_mtu(conn);
    let mut mtu_tick = tokio::time::interval(MTU_CHECK);
    let mut writer = tun::Writer::default();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            datagram = conn.read_datagram() => {
                let mut next = match datagram {
                    Ok(d) => Some(d),
                    Err(e) => return describe_close(&e),
                };
                // Take whatever else has already arrived, so the TUN write can coalesce it.
                while let Some(d) = next.take() {
                    shared.traffic.rx_packets.fetch_add(1, Relaxed);
                    shared.traffic.rx_bytes.fetch_add(d.len() as u64, Relaxed);
                    batch.push(d);
                    if batch.len() < BATCH {
                        next = conn.read_datagram().now_or_never().and_then(Result::ok);
                    }
                }
                if let Err(e) = writer.send(&tunnel.dev, &batch).await {
                    debug!(error = %e, "TUN write failed");
                }
                batch.clear();
            }
            _ = mtu_tick.tick() => {
                let now = inner_mtu(conn);
                if now != mtu {
                    match tunnel.dev.set_mtu(now) {
                        Ok(()) => { info!(from = mtu, to = now, "path MTU changed; TUN MTU follows"); mtu = now; }
                        Err(e) => warn!(error = %e, "cannot set the TUN MTU"),
                    }
                    if let Ok(mut v) = shared.view.lock() { v.mtu = Some(mtu); }
                }
            }
        }
    }
}

fn describe_close(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => format!(
            "DN closed the session: {} ({})",
            close::describe(c.error_code.into_inner()),
            String::from_utf8_lossy(&c.reason)
        ),
        other => other.to_string(),
    }
}

/// Sends every packet the kernel routes into the TUN device over the current session.
async fn tun_to_session(shared: Arc<Shared>, dev: Arc<tun::Tun>) {
    let traffic = &shared.traffic;
    let mut current = shared.current.subscribe();
    let mut reader = tun::Reader::default();
    let mut writer = tun::Writer::default();
    let mut batch = Vec::with_capacity(BATCH);
    let mut icmp = Vec::with_capacity(1280);
    let mut conn = current.borrow_and_update().clone();
    loop {
        if let Err(e) = reader.recv(&dev, &mut batch).await {
            warn!(error = %e, "TUN read failed; stopping the TUN reader");
            return;
        }
        if current.has_changed().unwrap_or(false) {
            conn = current.borrow_and_update().clone();
        }
        let Some(c) = conn.as_ref() else {
            traffic
                .dropped_no_session
                .fetch_add(batch.len() as u64, Relaxed);
            batch.clear();
            continue;
        };
        for pkt in batch.drain(..) {
            let len = pkt.len() as u64;
            match c.send_datagram_wait(pkt.clone()).await {
                Ok(()) => {
                    traffic.tx_packets.fetch_add(1, Relaxed);
                    traffic.tx_bytes.fetch_add(len, Relaxed);
                }
                Err(quinn::SendDatagramError::TooLarge) => {
                    traffic.dropped_too_big.fetch_add(1, Relaxed);
                    let mtu = inner_mtu(c);
                    if packet::dont_fragment(&pkt) && packet::packet_too_big(&pkt, mtu, &mut icmp) {
                        traffic.icmp_too_big_sent.fetch_add(1, Relaxed);
                        let reply = bytes::Bytes::copy_from_slice(&icmp);
                        let _ = writer.send(&dev, &[reply]).await;
                    }
                }
                Err(e) => debug!(error = %e, "datagram not sent"),
            }
        }
    }
}

impl Shared {
    fn set_state(&self, index: usize, state: &'static str, error: Option<String>) {
        if let Ok(mut v) = self.view.lock() {
            if state != "up" {
                v.up_since = None;
            }
            if let Some(s) = v.sessions.get_mut(index) {
                s.state = state;
                s.role = "candidate";
                if error.is_some() {
                    s.last_error = error;
                }
            }
        }
    }

    fn on_up(&self, index: usize, lease: &Lease) {
        info!(dn = %self.config.dns[index].name, address = %lease.ticket.claim.address, "session up");
        if let Ok(mut v) = self.view.lock() {
            v.address = Some(lease.ticket.claim.address);
            v.gateway = Some(lease.gateway);
            v.lease_expires_at = Some(lease.ticket.claim.expires_at);
            v.up_since = Some(Instant::now());
            if let Some(s) = v.sessions.get_mut(index) {
                s.state = "up";
                s.role = "primary";
                s.connects += 1;
            }
        }
    }

    fn status(&self) -> serde_json::Value {
        let conn = self.current.borrow().clone();
        let Ok(v) = self.view.lock() else {
            return serde_json::json!({"error": "status unavailable"});
        };
        let sessions: Vec<serde_json::Value> = v
            .sessions
            .iter()
            .map(|s| {
                let mut j = serde_json::to_value(s).unwrap_or_default();
                if let (Some(c), true) = (&conn, s.state == "up") {
                    j["rtt_us"] = (c.rtt().as_micros() as u64).into();
                    j["max_datagram"] = c.max_datagram_size().into();
                }
                j
            })
            .collect();
        serde_json::json!({
            "address": v.address,
            "gateway": v.gateway,
            "tun": self.config.tun,
            "mtu": v.mtu.or_else(|| conn.as_ref().map(inner_mtu)),
            "up_secs": v.up_since.map(|t| t.elapsed().as_secs()),
            "lease_expires_at": v.lease_expires_at,
            "sessions": sessions,
            "traffic": self.traffic,
        })
    }
}
