//! The EN shell: performs what [`holdfast_proto::en::Machine`] decides.
//!
//! It holds a QUIC session to every configured DN, keeps the TUN device and its routes, sends
//! traffic through the primary session and writes what any session delivers into the TUN
//! device. Sessions report their fate to the driver loop as events; the machine answers with
//! actions (connect, attach, configure, switch the primary).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use futures::FutureExt;
use holdfast_proto::control::{close, Lease, Message, RefuseCode};
use holdfast_proto::en::{change_dn_list, Action, Event, Loss, Machine, Role, SessionState};
use holdfast_proto::lease::LeaseTicket;
use holdfast_proto::packet::{self, PortUnreachable};
use holdfast_proto::probe::{self, encode_probe, Prober, Verdict};
use holdfast_proto::replay::Unanswered;
use holdfast_proto::underlay;
use holdfast_shell::metrics::{label, Families, Labels, Scraper};
use holdfast_shell::netlink::{NextHop, Routes};
use holdfast_shell::quic::{send_message, ControlReader};
use holdfast_shell::{control, quic, tls, tun};
use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::config::{DnEndpoint, EnConfig, Endpoint};
use holdfast_shell::resolver::Resolver;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the TUN MTU is re-derived from the primary session's path MTU: often while path
/// MTU discovery settles after a new primary, rarely afterwards, so that an idle client sleeps.
const MTU_CHECK: Duration = Duration::from_millis(500);
const MTU_SETTLED_CHECK: Duration = Duration::from_secs(60);
/// How long after a new primary the MTU is checked often.
const MTU_SETTLING: Duration = Duration::from_secs(10);
/// Most datagrams taken from a session before one batched TUN write.
const BATCH: usize = 64;

#[derive(Default, Serialize)]
struct Traffic {
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    dropped_no_session: AtomicU64,
    dropped_too_big: AtomicU64,
    /// TUN reads whose offload header could not be followed.
    dropped_malformed: AtomicU64,
    icmp_too_big_sent: AtomicU64,
    /// Packets sent again through a new primary after its predecessor died (see
    /// `holdfast_proto::replay`).
    resent_packets: AtomicU64,
}

/// What a session task reports to the driver. `generation` tells reports of a connection that
/// has since been replaced from current ones.
enum Report {
    Connected(usize, u64, quinn::Connection),
    Leased(usize, u64, Box<(Lease, ControlStream)>),
    Refused(usize, u64, RefuseCode, String),
    Lost(usize, u64, Loss),
    HomeIsBack(usize, u64),
    /// The DN says the failure detector found this other DN down.
    PeerDown(usize, u64, String),
    /// The home DN renewed the lease of the live session.
    Renewed(usize, u64, Box<Lease>),
    /// The DN is being drained (`true`) or back in service.
    Drain(usize, u64, bool),
    /// The DN's host name was looked up: the driver keeps its endpoint out of the tunnel,
    /// then answers, and the handshake starts.
    Resolved(usize, u64, SocketAddr, tokio::sync::oneshot::Sender<()>),
}

/// The control stream, kept open for the session's life.
struct ControlStream {
    send: quinn::SendStream,
    /// What the DN says after the lease; taken by the task that follows it.
    reader: Option<ControlReader>,
}

/// A session's prober, shared by its probing task, the reader that sees echoes and data, and
/// the sender; the prober is `None` until the session is up.
#[derive(Clone, Default)]
struct Liveness {
    prober: Arc<Mutex<Option<Prober>>>,
    /// Wakes the probing task when the prober's next timeout moved earlier.
    wake: Arc<tokio::sync::Notify>,
    /// Packets sent on the session since the DN was last heard from: sent again on failover.
    unanswered: Arc<Mutex<Unanswered<bytes::Bytes>>>,
}

impl Liveness {
    fn with<R>(&self, f: impl FnOnce(&mut Prober) -> R) -> Option<R> {
        let mut guard = self.prober.lock().ok()?;
        guard.as_mut().map(f)
    }

    /// The client sent data on the session.
    fn sent(&self, now: Instant) {
        if self.with(|p| p.on_sent(now)) == Some(true) {
            self.wake.notify_one();
        }
    }

    /// Something arrived from the DN at `now`.
    fn heard(&self, now: Instant, rtt: Duration) {
        if let Ok(mut u) = self.unanswered.lock() {
            u.heard(now, rtt);
        }
    }

    /// The path to the DN changed.
    fn path_changed(&self, now: Instant) {
        if self.with(|p| p.on_path_change(now)) == Some(true) {
            self.wake.notify_one();
        }
    }

    /// An unauthenticated hint that the DN may be gone.
    fn hint(&self, now: Instant) {
        if self.with(|p| p.on_hint(now)) == Some(true) {
            self.wake.notify_one();
        }
    }
}

/// The session traffic goes out on, and its liveness.
#[derive(Clone)]
struct Carrier {
    conn: quinn::Connection,
    liveness: Liveness,
}

#[derive(Default)]
struct Slot {
    liveness: Liveness,
    generation: u64,
    conn: Option<quinn::Connection>,
    control: Option<ControlStream>,
    connects: u64,
    /// Unix seconds when the session last came up.
    up_since: Option<u64>,
    /// The address a host-name endpoint last resolved to.
    resolved: Option<SocketAddr>,
}

struct Shared {
    /// The configuration as started; the DN list in it is not kept current (the driver's is).
    config: EnConfig,
    traffic: Traffic,
    /// The session packets go out on; `None` while no session can carry them.
    current: watch::Sender<Option<Carrier>>,
    /// The TUN device, once the first lease configured it.
    tun: watch::Sender<Option<Arc<tun::Tun>>>,
    status: Mutex<Snapshot>,
    failovers: Failovers,
}

/// Failovers as they happen, for the metrics: by cause, and how long the client had not heard
/// from the lost primary when it switched (what the outage cost, at most).
struct Failovers {
    by_cause: Family<Labels, Counter>,
    outage: Histogram,
}

impl Default for Failovers {
    fn default() -> Self {
        let buckets = [
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let by_cause = Family::default();
        // Every cause from the start, at 0: a series that appears only at the first failover
        // would make rates and alerts on it miss that failover.
        let every_loss = [
            Some(Loss::ProbeTimeout),
            Some(Loss::Unreachable),
            Some(Loss::ReportedDead),
            Some(Loss::Closed(String::new())),
            Some(Loss::ConnectFailed(String::new())),
            None,
        ];
        for loss in &every_loss {
            let _ = by_cause.get_or_create(&label("cause", cause(loss.as_ref())));
        }
        Self {
            by_cause,
            outage: Histogram::new(buckets),
        }
    }
}

/// A loss as a metric label.
fn cause(loss: Option<&Loss>) -> &'static str {
    match loss {
        Some(Loss::ProbeTimeout) => "probe_timeout",
        Some(Loss::Unreachable) => "unreachable",
        Some(Loss::ReportedDead) => "reported_dead",
        Some(Loss::Closed(_)) => "closed",
        Some(Loss::ConnectFailed(_)) => "connect_failed",
        None => "unknown",
    }
}

/// What the driver last published for `en status`; counters and RTTs are read live.
#[derive(Default)]
struct Snapshot {
    base: serde_json::Value,
    conns: Vec<Option<quinn::Connection>>,
}

impl Shared {
    fn status(&self) -> serde_json::Value {
        let Ok(snapshot) = self.status.lock() else {
            return serde_json::json!({"error": "status unavailable"});
        };
        let mut status = snapshot.base.clone();
        status["traffic"] = serde_json::to_value(&self.traffic).unwrap_or_default();
        status["udp"] = holdfast_shell::gso::SENT.figures();
        if let Some(sessions) = status["sessions"].as_array_mut() {
            for (view, conn) in sessions.iter_mut().zip(&snapshot.conns) {
                if let Some(c) = conn {
                    view["rtt_us"] = (c.rtt().as_micros() as u64).into();
                    view["max_datagram"] = c.max_datagram_size().into();
                    view["quic"] = holdfast_shell::quic::path_figures(&c.stats());
                }
            }
        }
        status
    }
}

/// The TUN device and what was configured around it.
struct Tunnel {
    dev: Arc<tun::Tun>,
    address: IpAddr,
    /// The IPv6 address of a dual-stack lease, on the device beside `address`.
    address6: Option<std::net::Ipv6Addr>,
    mtu: u16,
    /// Unreachable routes that keep a full tunnel from leaking the family it cannot carry,
    /// removed on exit.
    unreachable: Vec<IpNet>,
    /// Host routes that keep DN endpoints out of the tunnel, removed on exit.
    exemptions: Vec<Exemption>,
}

/// How the kernel routes a DN endpoint: the next hop and the source address it gives.
type Path = (NextHop, Option<IpAddr>);

/// A host route that keeps a DN endpoint out of the tunnel, through the host's own route to
/// it (`None`: there is none, and the endpoint is made unreachable rather than left to the
/// tunnel's routes, which would loop the client's sessions into themselves).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Exemption {
    host: IpNet,
    hop: Option<NextHop>,
}

/// `config` was read from `path`, which is read again on SIGHUP; `metrics`: where to serve
/// Prometheus metrics, if anywhere.
pub async fn run(config: EnConfig, path: PathBuf, metrics: Option<SocketAddr>) -> Result<()> {
    let tls = tls::client_config(&config.cert, &config.key, &config.server_ca)?;
    // A host name may resolve to either family.
    let bind: SocketAddr = if config.dns.iter().all(|d| d.endpoint.is_ipv4_addr()) {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let mut endpoint = quic::endpoint(bind, None, None)?;
    endpoint.set_default_client_config(quic::client_config(tls, idle_timeout(&config))?);
    let routes = Routes::connect()?;
    let shared = Arc::new(Shared {
        config: config.clone(),
        traffic: Traffic::default(),
        current: watch::channel(None).0,
        tun: watch::channel(None).0,
        status: Mutex::new(Snapshot::default()),
        failovers: Failovers::default(),
    });
    let status_shared = shared.clone();
    let _control = control::serve(config.control_socket.clone(), move |_| {
        status_shared.status()
    })
    .await?;
    let _metrics = match metrics {
        Some(addr) => Some(
            holdfast_shell::metrics::serve(addr, Arc::new(metrics_registry(shared.clone())), "en")
                .await?,
        ),
        None => None,
    };
    info!(control = %config.control_socket.display(), dns = config.dns.len(), "en starting");
    let resolver = Resolver::new(config.dns_mode, &config.control_socket);
    resolver.recover();

    let mut driver = Driver {
        machine: Machine::new(
            config.dns.iter().map(|d| d.name.clone()).collect(),
            rand::random(),
        ),
        slots: (0..config.dns.len()).map(|_| Slot::default()).collect(),
        dns: config.dns.clone(),
        path,
        paths: Vec::new(),
        shared: shared.clone(),
        endpoint: endpoint.clone(),
        routes: &routes,
        tunnel: None,
        resolver,
        primary_since: Instant::now(),
        previous_primary_for: Duration::ZERO,
        mtu_check_at: Instant::now() + MTU_CHECK,
        reports: mpsc::unbounded_channel(),
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        res = driver.run() => res,
        res = tokio::signal::ctrl_c() => { res.context("signal handler")?; info!("interrupted, shutting down"); Ok(()) }
        _ = term.recv() => { info!("terminated, shutting down"); Ok(()) }
    };
    for slot in &driver.slots {
        if let Some(conn) = &slot.conn {
            conn.close(close::SHUTDOWN.into(), b"en shutting down");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    driver.resolver.remove().await;
    if let Some(t) = &driver.tunnel {
        for net in t
            .exemptions
            .iter()
            .map(|e| e.host)
            .chain(t.unreachable.iter().copied())
        {
            if let Err(e) = routes.delete(net, None, None).await {
                warn!(error = %format!("{e:#}"), "could not remove endpoint route");
            }
        }
    }
    let _ = std::fs::remove_file(&config.control_socket);
    outcome
}

struct Driver<'a> {
    machine: Machine,
    slots: Vec<Slot>,
    /// Every DN the machine has an index for, retired ones included (reports about them may
    /// still arrive); the machine says which are configured.
    dns: Vec<DnEndpoint>,
    /// The configuration file, read again on SIGHUP.
    path: PathBuf,
    /// How the kernel last routed each DN endpoint (see [`Driver::on_network_change`]).
    paths: Vec<(usize, Option<Path>)>,
    shared: Arc<Shared>,
    endpoint: quinn::Endpoint,
    routes: &'a Routes,
    tunnel: Option<Tunnel>,
    /// The DNS settings of the lease, applied to the system while the tunnel is up.
    resolver: Resolver,
    /// When the primary last changed (path MTU discovery starts over).
    primary_since: Instant,
    /// How long the previous primary carried the traffic (for the log line of going home).
    previous_primary_for: Duration,
    /// When the TUN MTU is next compared with the primary's path.
    mtu_check_at: Instant,
    reports: (
        mpsc::UnboundedSender<Report>,
        mpsc::UnboundedReceiver<Report>,
    ),
}

impl Driver<'_> {
    async fn run(&mut self) -> Result<()> {
        let actions = self.machine.start();
        self.perform(actions).await?;
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot watch for SIGHUP")?;
        let mut network = match holdfast_shell::netlink::watch() {
            Ok(rx) => Some(rx),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "network changes will not be followed: sessions move only when they fail");
                None
            }
        };
        self.paths = self.current_paths().await;
        let mut unreachable = match holdfast_shell::icmp::watch() {
            Ok(rx) => Some(rx),
            Err(e) => {
                warn!(error = %format!("{e:#}"), "DNs whose port is closed will be noticed by probes only");
                None
            }
        };
        loop {
            self.publish_status();
            let deadline = self.machine.poll_timeout();
            let timer = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => futures::future::pending().await,
                }
            };
            tokio::select! {
                report = self.reports.1.recv() => {
                    let Some(report) = report else { return Err(anyhow!("session reports ended")) };
                    let report = match report {
                        Report::Resolved(dn, generation, addr, done) => {
                            self.resolved(dn, generation, addr).await;
                            let _ = done.send(());
                            continue;
                        }
                        other => other,
                    };
                    if let Some(event) = self.accept(report) {
                        let actions = self.machine.handle(event, Instant::now());
                        self.perform(actions).await?;
                    }
                }
                _ = timer => {
                    let actions = self.machine.handle_timeout(Instant::now());
                    self.perform(actions).await?;
                }
                _ = hangup.recv() => self.reload().await?,
                Some(()) = async {
                    let rx = network.as_mut()?;
                    let first = rx.recv().await;
                    // A change comes as a burst of notices: one look at the result.
                    while rx.try_recv().is_ok() {}
                    first
                } => {
                    if let Err(e) = self.on_network_change().await {
                        warn!(error = %format!("{e:#}"), "cannot follow the network change; sessions move when they fail");
                    }
                }
                _ = tokio::time::sleep_until(self.mtu_check_at.into()) => {
                    self.follow_mtu();
                    let settling = self.primary_since.elapsed() < MTU_SETTLING;
                    self.mtu_check_at = Instant::now() + if settling { MTU_CHECK } else { MTU_SETTLED_CHECK };
                }
                Some(u) = async { match unreachable.as_mut() { Some(rx) => rx.recv().await, None => None } } => {
                    if let Some(event) = self.on_unreachable(u) {
                        let actions = self.machine.handle(event, Instant::now());
                        self.perform(actions).await?;
                    }
                }
            }
        }
    }

    /// A DN's port answered "unreachable" to one of our datagrams: its `dn` may be gone (or
    /// someone forged the error); the machine decides what that is worth.
    fn on_unreachable(&mut self, u: PortUnreachable) -> Option<Event> {
        if self.endpoint.local_addr().ok()?.port() != u.local_port {
            return None;
        }
        let same = |a: SocketAddr| {
            a.port() == u.remote.port() && a.ip().to_canonical() == u.remote.ip().to_canonical()
        };
        // The newest entry: a DN retired for a changed name keeps its endpoint.
        let dn = (0..self.dns.len())
            .rev()
            .find(|&i| self.address(i).is_some_and(same))?;
        debug!(dn = %self.dns[dn].name, "ICMP port unreachable from the DN");
        Some(Event::Unreachable(dn))
    }

    /// Where DN `dn` is: its configured address, or what its host name last resolved to.
    fn address(&self, dn: usize) -> Option<SocketAddr> {
        self.dns[dn].endpoint.addr().or(self.slots[dn].resolved)
    }

    /// DN `dn`'s host name resolved to `addr` (a new address): keep it outside a full tunnel,
    /// and drop the exemption of the old one.
    async fn resolved(&mut self, dn: usize, generation: u64, addr: SocketAddr) {
        if self.slots.get(dn).map(|s| s.generation) != Some(generation) {
            return;
        }
        info!(dn = %self.dns[dn].name, endpoint = %self.dns[dn].endpoint, %addr, "DN host name resolved");
        self.slots[dn].resolved = Some(addr);
        self.sync_exemptions().await;
    }

    /// Turns a session report into a machine event, dropping reports about connections that
    /// have since been replaced.
    fn accept(&mut self, report: Report) -> Option<Event> {
        let (dn, generation) = match &report {
            Report::Connected(d, g, _)
            | Report::Leased(d, g, ..)
            | Report::Refused(d, g, ..)
            | Report::Lost(d, g, _)
            | Report::HomeIsBack(d, g)
            | Report::PeerDown(d, g, _)
            | Report::Renewed(d, g, _)
            | Report::Drain(d, g, _)
            | Report::Resolved(d, g, ..) => (*d, *g),
        };
        if self.slots.get(dn)?.generation != generation {
            return None;
        }
        let name = self.dns[dn].name.clone();
        Some(match report {
            Report::Connected(_, _, conn) => {
                self.watch(dn, generation, &conn);
                self.slots[dn].conn = Some(conn);
                Event::Connected(dn)
            }
            Report::Leased(_, _, leased) => {
                let (lease, mut control) = *leased;
                if let Some(reader) = control.reader.take() {
                    tokio::spawn(follow_control(
                        reader,
                        name.clone(),
                        self.reports.0.clone(),
                        (dn, generation),
                    ));
                }
                if let Some(conn) = &self.slots[dn].conn {
                    self.probe(dn, generation, conn);
                }
                let slot = &mut self.slots[dn];
                slot.control = Some(control);
                slot.connects += 1;
                slot.up_since = Some(holdfast_shell::unix_now());
                info!(dn = %name, address = %lease.ticket.claim.address, "session up");
                Event::Leased(dn, Box::new(lease))
            }
            Report::Refused(_, _, code, reason) => {
                warn!(dn = %name, ?code, %reason, "DN refused this client");
                self.drop_session(dn);
                Event::Refused(dn, code)
            }
            Report::Lost(_, _, loss) => {
                warn!(dn = %name, ?loss, "session lost");
                self.drop_session(dn);
                Event::Lost(dn, loss)
            }
            Report::HomeIsBack(..) => {
                info!(dn = %name, "the DN says this client's home DN is back");
                Event::HomeIsBack(dn)
            }
            Report::Drain(_, _, on) => {
                if on {
                    info!(dn = %name, "the DN is being drained: moving the traffic off it");
                } else {
                    info!(dn = %name, "the DN is back in service");
                }
                Event::Drain(dn, on)
            }
            Report::Renewed(_, _, lease) => {
                debug!(dn = %name, expires_at = lease.ticket.claim.expires_at, "lease renewed");
                Event::Leased(dn, lease)
            }
            // Taken by the run loop before it gets here.
            Report::Resolved(..) => return None,
            Report::PeerDown(_, _, dead) => {
                let Some(index) = self.machine.dn_named(&dead) else {
                    debug!(dn = %name, %dead, "the DN reports a DN this client does not know");
                    return None;
                };
                warn!(dn = %dead, reporter = %name, "the cluster's failure detector reports this DN down");
                Event::PeerDown(index)
            }
        })
    }

    fn drop_session(&mut self, dn: usize) {
        let slot = &mut self.slots[dn];
        slot.generation += 1;
        slot.control = None;
        slot.up_since = None;
        if let Some(conn) = slot.conn.take() {
            conn.close(close::SHUTDOWN.into(), b"session abandoned");
        }
    }

    async fn perform(&mut self, actions: Vec<Action>) -> Result<()> {
        for action in actions {
            debug!(?action, "performing");
            match action {
                Action::Connect(dn) => self.connect(dn),
                Action::Attach(dn, ticket) => self.attach(dn, ticket),
                Action::Configure(lease) => self.configure(&lease).await?,
                Action::UsePrimary(dn) => {
                    let carrier = dn.and_then(|d| {
                        let slot = &self.slots[d];
                        slot.conn.clone().map(|conn| Carrier {
                            conn,
                            liveness: slot.liveness.clone(),
                        })
                    });
                    match dn {
                        Some(d) => info!(dn = %self.dns[d].name, "primary session"),
                        None => warn!("no session can carry traffic"),
                    }
                    self.shared.current.send_replace(carrier);
                    self.previous_primary_for = self.primary_since.elapsed();
                    self.primary_since = Instant::now();
                    self.mtu_check_at = self.primary_since + MTU_CHECK;
                }
                Action::Close(dn) => {
                    self.drop_session(dn);
                    if self.machine.is_retired(dn) {
                        info!(dn = %self.dns[dn].name, "session to a DN no longer configured closed");
                        self.sync_exemptions().await;
                    }
                }
                Action::Demote(dn) => {
                    // Demoted: the client left `dn` for its home DN, or because `dn` is drained.
                    let name = &self.dns[dn].name;
                    let on_it_ms = self.previous_primary_for.as_millis() as u64;
                    if self.machine.is_retired(dn) {
                        info!(from = %name, on_it_ms, cause = "removed from the configuration", "moved the traffic off a DN no longer configured");
                    } else if self.machine.is_draining(dn) {
                        info!(from = %name, on_it_ms, cause = "drain", "moved the traffic off a DN being drained");
                    } else {
                        info!(from = %name, away_ms = on_it_ms, cause = "home DN up again", "going home");
                    }
                    self.tell(dn, Message::Demote).await
                }
                Action::Switch(dn) => self.tell(dn, Message::Switch).await,
                Action::Resend { from, to } => self.resend(from, to),
                Action::CheckNow(dn) => self.slots[dn].liveness.hint(Instant::now()),
                Action::Reprobe(dn) => self.slots[dn].liveness.path_changed(Instant::now()),
            }
        }
        Ok(())
    }

    /// Sends through `to` what the lost primary `from` may not have delivered (this happens on
    /// failover only: it is counted as one).
    fn resend(&self, from: usize, to: usize) {
        let now = Instant::now();
        let (packets, last_heard) = match self.slots[from].liveness.unanswered.lock() {
            Ok(mut u) => (u.take(now), u.last_heard()),
            Err(_) => return,
        };
        let cause = cause(self.machine.last_loss(from));
        let failovers = &self.shared.failovers;
        failovers
            .by_cause
            .get_or_create(&label("cause", cause))
            .inc();
        let silent = last_heard.map(|heard| now.saturating_duration_since(heard));
        if let Some(silent) = silent {
            failovers.outage.observe(silent.as_secs_f64());
        }
        let names = &self.dns;
        let (from_name, to_name) = (&names[from].name, &names[to].name);
        match silent {
            Some(silent) => {
                let silent_ms = silent.as_millis() as u64;
                info!(from = %from_name, to = %to_name, %cause, silent_ms, "failover: the primary is lost, traffic moved to the secondary");
            }
            None => {
                info!(from = %from_name, to = %to_name, %cause, "failover: the primary is lost (never heard from), traffic moved to the secondary");
            }
        }
        let Some(conn) = self.slots[to].conn.as_ref() else {
            return;
        };
        let mut resent = 0u64;
        for packet in packets {
            if conn.send_datagram(packet).is_ok() {
                resent += 1;
            }
        }
        if resent > 0 {
            self.shared
                .traffic
                .resent_packets
                .fetch_add(resent, Relaxed);
            info!(packets = resent, from = %from_name, to = %to_name, "sent again what the lost DN may not have delivered");
        }
    }

    /// Tells the DN that the client's traffic moved away from it (`Demote`, so that it lowers
    /// its routes) or to it (`Switch`, so that it routes the client at once).
    async fn tell(&mut self, dn: usize, message: Message) {
        let name = &self.dns[dn].name;
        let Some(control) = self.slots[dn].control.as_mut() else {
            return;
        };
        info!(dn = %name, ?message, "telling the DN where the traffic goes now");
        let sent =
            tokio::time::timeout(CONNECT_TIMEOUT, send_message(&mut control.send, &message)).await;
        if !matches!(sent, Ok(Ok(()))) {
            warn!(dn = %name, ?message, "cannot tell the DN");
        }
    }

    fn connect(&mut self, dn: usize) {
        let slot = &mut self.slots[dn];
        slot.generation += 1;
        let generation = slot.generation;
        let last = slot.resolved;
        let target = self.dns[dn].clone();
        let endpoint = self.endpoint.clone();
        let tx = self.reports.0.clone();
        tokio::spawn(async move {
            let ipv4_only = endpoint.local_addr().map(|a| a.is_ipv4()).unwrap_or(false);
            let addr = match &target.endpoint {
                Endpoint::Addr(a) => Ok(*a),
                Endpoint::Name { host, port } => {
                    let found = resolve(host, *port, ipv4_only, last).await;
                    match found {
                        Ok(a) if Some(a) != last => {
                            // Wait until the driver has kept the new address out of the tunnel.
                            let (done, wait) = tokio::sync::oneshot::channel();
                            let _ = tx.send(Report::Resolved(dn, generation, a, done));
                            let _ = tokio::time::timeout(CONNECT_TIMEOUT, wait).await;
                            Ok(a)
                        }
                        other => other,
                    }
                }
            };
            let connected = match addr {
                Ok(addr) => handshake(&endpoint, &target, addr).await,
                Err(e) => Err(e),
            };
            let report = match connected {
                Ok(conn) => Report::Connected(dn, generation, conn),
                Err(e) => Report::Lost(dn, generation, Loss::ConnectFailed(format!("{e:#}"))),
            };
            let _ = tx.send(report);
        });
    }

    /// Reports the connection's end, and writes whatever it delivers into the TUN device: after
    /// a failover, packets may still arrive on any live session.
    fn watch(&mut self, dn: usize, generation: u64, conn: &quinn::Connection) {
        let tx = self.reports.0.clone();
        let watched = conn.clone();
        tokio::spawn(async move {
            let reason = watched.closed().await;
            let _ = tx.send(Report::Lost(
                dn,
                generation,
                Loss::Closed(describe_close(&reason)),
            ));
        });
        let liveness = Liveness::default();
        self.slots[dn].liveness = liveness.clone();
        tokio::spawn(session_to_tun(self.shared.clone(), conn.clone(), liveness));
    }

    /// Probes the DN on this session when the prober says so, until it judges the DN dead.
    fn probe(&self, dn: usize, generation: u64, conn: &quinn::Connection) {
        let liveness = self.slots[dn].liveness.clone();
        if let Ok(mut p) = liveness.prober.lock() {
            *p = Some(Prober::new(
                self.shared.config.liveness,
                Instant::now(),
                Some(conn.rtt()),
            ));
        }
        let tx = self.reports.0.clone();
        let conn = conn.clone();
        tokio::spawn(async move {
            loop {
                // Read at every wake-up: what the DN's QUIC layer sent since the last one
                // keeps a DN alive whose echoes wait behind a full queue.
                let frames = quic::frames_from_peer(&conn);
                let now = Instant::now();
                let Some((verdict, next)) = liveness.with(|p| {
                    p.on_quic_frames(frames, now);
                    (p.poll(now), p.poll_timeout())
                }) else {
                    return;
                };
                match verdict {
                    Verdict::Send(seq) => {
                        let probe = bytes::Bytes::copy_from_slice(&encode_probe(seq));
                        if conn.send_datagram(probe).is_err() {
                            return;
                        }
                        continue;
                    }
                    Verdict::Dead { silence } => {
                        warn!(?silence, "DN stopped answering probes");
                        let _ = tx.send(Report::Lost(dn, generation, Loss::ProbeTimeout));
                        return;
                    }
                    Verdict::Wait => {}
                }
                if conn.close_reason().is_some() {
                    return;
                }
                let Some(at) = next else { return };
                tokio::select! {
                    _ = tokio::time::sleep_until(at.into()) => {}
                    _ = liveness.wake.notified() => {}
                    _ = conn.closed() => return,
                }
            }
        });
    }

    fn attach(&mut self, dn: usize, ticket: Option<LeaseTicket>) {
        let Some(conn) = self.slots[dn].conn.clone() else {
            return;
        };
        let generation = self.slots[dn].generation;
        let tx = self.reports.0.clone();
        tokio::spawn(async move {
            let _ = tx.send(match attach(&conn, ticket).await {
                Ok(leased) => Report::Leased(dn, generation, Box::new(leased)),
                Err(AttachFailure::Refused(code, reason)) => {
                    Report::Refused(dn, generation, code, reason)
                }
                Err(AttachFailure::Other(e)) => {
                    Report::Lost(dn, generation, Loss::Closed(format!("{e:#}")))
                }
            });
        });
    }

    /// Creates the TUN device and routes on the first lease; afterwards follows the address.
    async fn configure(&mut self, lease: &Lease) -> Result<()> {
        let address = lease.ticket.claim.address;
        let address6 = lease.ticket.claim.address6.map(|v6| v6.address);
        if let Some(t) = self.tunnel.as_mut() {
            if t.address != address {
                warn!(old = %t.address, new = %address, "address changed");
                t.dev
                    .set_address(address)
                    .with_context(|| format!("cannot move {} to {address}", t.dev.name()))?;
                t.address = address;
            }
            if let Some(v6) = address6.filter(|v6| t.address6 != Some(*v6)) {
                warn!(old = ?t.address6, new = %v6, "IPv6 address changed");
                t.dev
                    .enable_ipv6(v6)
                    .with_context(|| format!("cannot give {} {v6}", t.dev.name()))?;
                t.address6 = Some(v6);
            }
            let link = t.dev.index()?;
            self.resolver.follow(link, &lease.dns).await;
            return Ok(());
        }
        let mtu = self
            .machine
            .primary()
            .or_else(|| self.slots.iter().position(|s| s.conn.is_some()))
            .and_then(|d| self.slots[d].conn.as_ref())
            .map(inner_mtu)
            .unwrap_or(1280)
            .min(lease.mtu);
        let config = &self.shared.config;
        let prefix = if address.is_ipv4() { 32 } else { 128 };
        let dev = Arc::new(tun::open(&config.tun, address, prefix, mtu)?);
        if let Some(v6) = address6 {
            dev.enable_ipv6(v6)
                .with_context(|| format!("cannot give {} {v6}", config.tun))?;
        }
        let index = dev.index()?;
        let tun_name = config.tun.clone();
        let plan = lease_routes(lease);
        self.tunnel = Some(Tunnel {
            dev: dev.clone(),
            address,
            address6,
            mtu,
            unreachable: Vec::new(),
            exemptions: Vec::new(),
        });
        // Every DN endpoint a pushed route would swallow keeps its path, before those routes.
        self.sync_exemptions().await;
        let through_tunnel = NextHop {
            gateway: None,
            oif: Some(index),
        };
        for net in &plan.tunnel {
            self.routes.replace(*net, &through_tunnel, None).await?;
        }
        for net in &plan.unreachable {
            self.routes
                .replace_unreachable(*net)
                .await
                .with_context(|| format!("cannot keep {net} from leaving outside the tunnel"))?;
            if let Some(t) = self.tunnel.as_mut() {
                t.unreachable.push(*net);
            }
        }
        info!(tun = %tun_name, %address, ?address6, mtu, routes = ?plan.tunnel, unreachable = ?plan.unreachable, "tunnel configured");
        self.resolver.follow(index, &lease.dns).await;
        tokio::spawn(tun_to_session(self.shared.clone(), dev.clone()));
        self.shared.tun.send_replace(Some(dev));
        Ok(())
    }

    /// Reads the configuration file again (SIGHUP) and applies its DN list: DNs no longer
    /// listed (or listed differently) are retired, make before break if one carries the
    /// traffic, new ones are connected to, and the TLS files are read again for the sessions
    /// made from now on. A file that does not load, or that changes what needs a restart, is
    /// refused with a message and nothing changes.
    async fn reload(&mut self) -> Result<()> {
        let path = self.path.display().to_string();
        let new = match EnConfig::load(&self.path) {
            Ok(new) => new,
            Err(e) => {
                error!(config = %path, "reload refused, running on unchanged: {e:#}");
                return Ok(());
            }
        };
        if let Err(why) = self.check_live(&new) {
            error!(config = %path, "reload refused, running on unchanged: {why:#}");
            return Ok(());
        }
        let now = Instant::now();
        let running: Vec<(usize, DnEndpoint)> = self
            .machine
            .configured()
            .map(|i| (i, self.dns[i].clone()))
            .collect();
        let change = change_dn_list(&running, &new.dns);
        let mut actions = Vec::new();
        for &dn in &change.retire {
            info!(dn = %self.dns[dn].name, endpoint = %self.dns[dn].endpoint, "DN removed from the configuration");
            actions.extend(self.machine.retire(dn, now));
        }
        for &i in &change.add {
            let entry = new.dns[i].clone();
            info!(dn = %entry.name, endpoint = %entry.endpoint, "DN added to the configuration");
            let (dn, connect) = self.machine.add(entry.name.clone());
            debug_assert_eq!(dn, self.dns.len());
            self.dns.push(entry);
            self.slots.push(Slot::default());
            actions.extend(connect);
        }
        self.perform(actions).await?;
        self.sync_exemptions().await;
        info!(
            config = %path,
            dns = self.machine.configured().count(),
            added = change.add.len(),
            removed = change.retire.len(),
            "configuration reloaded"
        );
        Ok(())
    }

    /// Whether `new` differs from the running configuration only in what a reload applies;
    /// reads the TLS files of `new` for the sessions made from now on.
    fn check_live(&mut self, new: &EnConfig) -> Result<()> {
        let old = &self.shared.config;
        let mut restart = Vec::new();
        if new.tun != old.tun {
            restart.push("tun");
        }
        if new.control_socket != old.control_socket {
            restart.push("control_socket");
        }
        if new.liveness != old.liveness {
            restart.push("[liveness]");
        }
        if new.dns_mode != old.dns_mode {
            restart.push("dns");
        }
        if !restart.is_empty() {
            bail!(
                "{} changed, which needs a restart of en (live: [[dn]], cert, key, server_ca)",
                restart.join(", ")
            );
        }
        let ipv4_only = self.endpoint.local_addr()?.is_ipv4();
        if let Some(dn) = new
            .dns
            .iter()
            .find(|d| ipv4_only && !d.endpoint.is_ipv4_addr())
        {
            bail!(
                "dn {}: an IPv6 or host-name endpoint needs a restart of en (it started with IPv4 DNs only)",
                dn.name
            );
        }
        let tls = tls::client_config(&new.cert, &new.key, &new.server_ca)?;
        self.endpoint
            .set_default_client_config(quic::client_config(tls, idle_timeout(new))?);
        Ok(())
    }

    /// Keeps a host route, through the host's own routes, to every DN endpoint the tunnel's
    /// routes contain, and none to an endpoint no DN uses: after the tunnel came up, the DN
    /// list changed, or the host's network did (another uplink, another default route).
    async fn sync_exemptions(&mut self) {
        let Some(routes) = self.machine.lease().map(lease_routes) else {
            return;
        };
        let Some(current) = self.tunnel.as_ref().map(|t| t.exemptions.clone()) else {
            return;
        };
        let mut wanted: Vec<IpNet> = (0..self.dns.len())
            .filter(|&i| self.machine.state(i) != Some(&SessionState::Retired))
            .filter_map(|i| self.address(i).map(|a| a.ip()))
            .filter(|ip| routes.covers(ip))
            .map(IpNet::from)
            .collect();
        wanted.dedup();
        let table = if wanted.is_empty() {
            Vec::new()
        } else {
            match self.routes.underlay().await {
                Ok(table) => table,
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "cannot read the host's routes: DN endpoint routes left as they are");
                    return;
                }
            }
        };
        let mut kept = Vec::new();
        for host in &wanted {
            let hop = underlay::route_to(host.addr(), &table).map(|r| NextHop {
                gateway: r.gateway,
                oif: r.oif,
            });
            let want = Exemption { host: *host, hop };
            if current.contains(&want) {
                kept.push(want);
                continue;
            }
            let installed = match &want.hop {
                Some(hop) => self.routes.replace(*host, hop, None).await,
                None => self.routes.replace_unreachable(*host).await,
            };
            match installed {
                Ok(()) => {
                    match &want.hop {
                        Some(hop) => {
                            info!(endpoint = %host.addr(), ?hop, "keeping the DN endpoint outside the tunnel")
                        }
                        None => {
                            warn!(endpoint = %host.addr(), "no route to the DN endpoint outside the tunnel: unreachable until there is one")
                        }
                    }
                    kept.push(want);
                }
                Err(e) => {
                    warn!(endpoint = %host.addr(), error = %format!("{e:#}"), "cannot keep the DN endpoint outside the tunnel")
                }
            }
        }
        for old in current.iter().filter(|e| !wanted.contains(&e.host)) {
            match self.routes.delete(old.host, None, None).await {
                Ok(()) => info!(route = %old.host, "endpoint route removed: no DN uses it"),
                Err(e) => {
                    warn!(route = %old.host, error = %format!("{e:#}"), "could not remove endpoint route");
                    kept.push(old.clone());
                }
            }
        }
        if let Some(t) = self.tunnel.as_mut() {
            t.exemptions = kept;
        }
    }

    /// How the kernel routes each configured DN's endpoint now: next hop and source address.
    async fn current_paths(&self) -> Vec<(usize, Option<Path>)> {
        let mut out = Vec::new();
        for dn in self.machine.configured() {
            let path = match self.address(dn) {
                Some(a) => self.routes.lookup(a.ip()).await.ok(),
                None => None,
            };
            out.push((dn, path));
        }
        out
    }

    /// The host's links, addresses or routes changed. The DN endpoints' routes follow the host's
    /// own; if the path to a DN moved (another uplink, another source address), the QUIC
    /// endpoint moves to a fresh socket, so that every session migrates at once (QUIC
    /// connection migration, a new connection ID, a packet at once so the DN follows), and the
    /// machine probes the sessions and retries the DNs it was waiting for.
    async fn on_network_change(&mut self) -> Result<()> {
        self.sync_exemptions().await;
        let paths = self.current_paths().await;
        if paths == self.paths {
            return Ok(());
        }
        self.paths = paths;
        let local = self.endpoint.local_addr()?;
        let socket = holdfast_shell::os::udp::socket(SocketAddr::new(local.ip(), 0))?;
        holdfast_shell::quic::rebind(&self.endpoint, socket)?;
        info!(from = %local, to = %self.endpoint.local_addr()?, "network changed: the sessions migrate to the new path");
        let actions = self.machine.network_changed(Instant::now());
        self.perform(actions).await
    }

    /// Keeps the TUN MTU equal to what the primary session's path carries.
    fn follow_mtu(&mut self) {
        let Some(conn) = self.shared.current.borrow().clone().map(|c| c.conn) else {
            return;
        };
        let Some(t) = self.tunnel.as_mut() else {
            return;
        };
        let now = inner_mtu(&conn);
        if now != t.mtu {
            match t.dev.set_mtu(now) {
                Ok(()) => {
                    info!(from = t.mtu, to = now, "path MTU changed; TUN MTU follows");
                    t.mtu = now;
                }
                Err(e) => warn!(error = %e, "cannot set the TUN MTU"),
            }
        }
    }

    fn publish_status(&self) {
        // Retired DNs are shown until their session is closed.
        let shown: Vec<usize> = (0..self.dns.len())
            .filter(|&i| self.machine.state(i) != Some(&SessionState::Retired))
            .collect();
        let sessions: Vec<serde_json::Value> = shown
            .iter()
            .map(|&i| {
                let dn = &self.dns[i];
                let (state, role) = match self.machine.state(i) {
                    Some(SessionState::Up(Role::Primary)) => ("up", "primary"),
                    Some(SessionState::Up(Role::Secondary)) => ("up", "secondary"),
                    Some(SessionState::Connecting) => ("connecting", "-"),
                    Some(SessionState::Ready) => ("ready", "-"),
                    Some(SessionState::Attaching) => ("attaching", "-"),
                    Some(SessionState::Waiting { .. } | SessionState::Retired) | None => {
                        ("backoff", "-")
                    }
                };
                let slot = &self.slots[i];
                serde_json::json!({
                    "dn": dn.name,
                    "endpoint": dn.endpoint.to_string(),
                    "address": self.address(i),
                    "state": state,
                    "role": role,
                    "retired": self.machine.is_retired(i),
                    "up_since": slot.up_since,
                    "connects": slot.connects,
                    "last_error": self.machine.last_loss(i).map(|l| format!("{l:?}")),
                })
            })
            .collect();
        let lease = self.machine.lease();
        let status = serde_json::json!({
            "address": lease.map(|l| l.ticket.claim.address),
            "address6": lease.and_then(|l| l.ticket.claim.address6).map(|v6| v6.address),
            "gateway": lease.map(|l| l.gateway),
            "home": lease.map(|l| &l.ticket.claim.issuer),
            "lease_expires_at": lease.map(|l| l.ticket.claim.expires_at),
            "tun": self.shared.config.tun,
            "mtu": self.tunnel.as_ref().map(|t| t.mtu),
            "dns": self.resolver.status(),
            "sessions": sessions,
        });
        let conns = shown
            .iter()
            .map(|&i| {
                self.slots[i]
                    .conn
                    .clone()
                    .filter(|_| matches!(self.machine.state(i), Some(SessionState::Up(_))))
            })
            .collect();
        if let Ok(mut s) = self.shared.status.lock() {
            *s = Snapshot {
                base: status,
                conns,
            };
        }
    }
}

/// Looks up a DN's host name (at each connection attempt: its address may move). A failed
/// look-up falls back on the address found last, if any: a full tunnel whose DNS servers sit
/// behind the DNs cannot look anything up while no DN is reachable.
async fn resolve(
    host: &str,
    port: u16,
    ipv4_only: bool,
    last: Option<SocketAddr>,
) -> Result<SocketAddr> {
    let found =
        match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((host, port))).await {
            Ok(Ok(addrs)) => addrs
                .into_iter()
                .find(|a| !ipv4_only || a.is_ipv4())
                .ok_or_else(|| {
                    anyhow!(if ipv4_only {
                        "no IPv4 address"
                    } else {
                        "no address"
                    })
                }),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(anyhow!("no answer within {CONNECT_TIMEOUT:?}")),
        };
    match (found, last) {
        (Ok(a), _) => Ok(a),
        (Err(e), Some(last)) => {
            warn!(%host, error = %format!("{e:#}"), %last, "cannot resolve the DN's host name: trying its last address");
            Ok(last)
        }
        (Err(e), None) => Err(e.context(format!("cannot resolve {host}"))),
    }
}

async fn handshake(
    endpoint: &quinn::Endpoint,
    dn: &DnEndpoint,
    addr: SocketAddr,
) -> Result<quinn::Connection> {
    let connecting = endpoint
        .connect(addr, &dn.server_name)
        .with_context(|| format!("cannot start a connection to {}", dn.endpoint))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| {
            anyhow!(
                "no answer from {} ({}) within {CONNECT_TIMEOUT:?}",
                dn.name,
                dn.endpoint
            )
        })?
        .with_context(|| format!("handshake with {} ({}) failed", dn.name, dn.endpoint))
}

enum AttachFailure {
    Refused(RefuseCode, String),
    Other(anyhow::Error),
}

/// Sends `Attach` on a new control stream and reads the DN's answer.
async fn attach(
    conn: &quinn::Connection,
    ticket: Option<LeaseTicket>,
) -> Result<(Lease, ControlStream), AttachFailure> {
    let exchange = async {
        let (mut send, recv) = conn
            .open_bi()
            .await
            .context("cannot open the control stream")?;
        send_message(&mut send, &Message::Attach { ticket }).await?;
        let mut reader = ControlReader::new(recv);
        let answer = reader.next().await;
        Ok::<_, anyhow::Error>((send, reader, answer))
    };
    let (send, reader, answer) = match tokio::time::timeout(CONNECT_TIMEOUT, exchange).await {
        Ok(Ok(parts)) => parts,
        Ok(Err(e)) => return Err(AttachFailure::Other(refusal_or(conn, e))),
        Err(_) => {
            return Err(AttachFailure::Other(anyhow!(
                "no answer to Attach within {CONNECT_TIMEOUT:?}"
            )))
        }
    };
    match answer {
        Ok(Some(Message::Leased(lease))) => Ok((
            lease,
            ControlStream {
                send,
                reader: Some(reader),
            },
        )),
        Ok(Some(Message::Refused { code, reason })) => Err(AttachFailure::Refused(code, reason)),
        Ok(other) => Err(AttachFailure::Other(anyhow!(
            "unexpected answer to Attach: {other:?}"
        ))),
        Err(e) => Err(AttachFailure::Other(refusal_or(conn, e))),
    }
}

/// Reads what the DN says after the lease, for the session's life.
async fn follow_control(
    mut reader: ControlReader,
    dn: String,
    reports: mpsc::UnboundedSender<Report>,
    (index, generation): (usize, u64),
) {
    loop {
        match reader.next().await {
            Ok(Some(Message::Promoted)) => {
                info!(%dn, "the DN made itself this client's primary and routes its address")
            }
            Ok(Some(Message::HomeIsBack)) => {
                let _ = reports.send(Report::HomeIsBack(index, generation));
            }
            Ok(Some(Message::PeerDown { dn: dead })) => {
                let _ = reports.send(Report::PeerDown(index, generation, dead));
            }
            Ok(Some(Message::Leased(lease))) => {
                let _ = reports.send(Report::Renewed(index, generation, Box::new(lease)));
            }
            Ok(Some(Message::Drain)) => {
                let _ = reports.send(Report::Drain(index, generation, true));
            }
            Ok(Some(Message::Undrain)) => {
                let _ = reports.send(Report::Drain(index, generation, false));
            }
            Ok(Some(other)) => debug!(%dn, ?other, "ignoring control message"),
            Ok(None) => return,
            Err(e) => {
                debug!(%dn, error = %format!("{e:#}"), "control stream ended");
                return;
            }
        }
    }
}

/// A DN that closed the connection said why; prefer its words to the stream error.
fn refusal_or(conn: &quinn::Connection, e: anyhow::Error) -> anyhow::Error {
    match conn.close_reason() {
        Some(reason) => anyhow!(describe_close(&reason)),
        None => e,
    }
}

/// Three keepalive periods without a word end a session.
fn idle_timeout(config: &EnConfig) -> Duration {
    config.liveness.keepalive * 3
}

fn inner_mtu(conn: &quinn::Connection) -> u16 {
    let size = conn.max_datagram_size().unwrap_or(1200);
    u16::try_from(size).unwrap_or(u16::MAX).clamp(576, 9000)
}

/// The client's metrics: failovers as they happened, and the rest from `en status` at scrape time.
fn metrics_registry(shared: Arc<Shared>) -> Registry {
    let mut registry = Registry::default();
    registry.register(
        "holdfast_en_failovers",
        "Failovers from a lost primary to a secondary, by what lost it: probe_timeout, unreachable (ICMP), reported_dead (the cluster's detector), closed, connect_failed.",
        shared.failovers.by_cause.clone(),
    );
    registry.register_with_unit(
        "holdfast_en_failover_outage",
        "At each failover, how long the lost primary had been silent: the most traffic the switch can have cost.",
        prometheus_client::registry::Unit::Seconds,
        shared.failovers.outage.clone(),
    );
    registry.register_collector(Box::new(Scraper::new(move |f| {
        let status = shared.status();
        write_metrics(f, &status);
    })));
    registry
}

fn write_metrics(f: &mut Families<'_>, s: &serde_json::Value) {
    let sessions = s["sessions"].as_array().cloned().unwrap_or_default();
    let dn = |x: &serde_json::Value| label("dn", x["dn"].as_str().unwrap_or(""));
    f.gauge(
        "holdfast_en_session_up",
        "1 while the session to the DN is up, by DN and role (primary carries the traffic).",
        &sessions
            .iter()
            .map(|x| {
                let mut l = dn(x);
                l.push(("role", x["role"].as_str().unwrap_or("-").to_owned()));
                (l, i64::from(x["state"] == "up"))
            })
            .collect::<Vec<_>>(),
    );
    f.counter(
        "holdfast_en_session_connects",
        "Sessions made to each DN (a reconnect counts again).",
        &sessions
            .iter()
            .map(|x| (dn(x), x["connects"].as_u64().unwrap_or(0)))
            .collect::<Vec<_>>(),
    );
    f.gauge(
        "holdfast_en_rtt_seconds",
        "Round-trip time of each live session, as QUIC measures it.",
        &sessions
            .iter()
            .filter_map(|x| Some((dn(x), x["rtt_us"].as_u64()? as f64 / 1e6)))
            .collect::<Vec<_>>(),
    );
    // Per live session; a new session starts its counters again from zero.
    let quic = |key: &str| -> Vec<_> {
        sessions
            .iter()
            .filter_map(|x| Some((dn(x), x["quic"][key].as_u64()?)))
            .collect()
    };
    f.gauge(
        "holdfast_en_quic_cwnd_bytes",
        "Congestion window of each live session: the bytes QUIC lets be in flight.",
        &quic("cwnd")
            .into_iter()
            .map(|(l, v)| (l, i64::try_from(v).unwrap_or(i64::MAX)))
            .collect::<Vec<_>>(),
    );
    f.counter(
        "holdfast_en_quic_lost_packets",
        "QUIC packets of each live session declared lost.",
        &quic("lost_packets"),
    );
    let udp = &holdfast_shell::gso::SENT;
    f.counter_one(
        "holdfast_en_udp_datagrams_sent",
        "UDP datagrams the client sent, all sessions together.",
        udp.datagrams(),
    );
    f.counter_one(
        "holdfast_en_udp_send_calls",
        "System calls that sent them: datagrams_sent / send_calls is the segmentation-offload batch.",
        udp.calls(),
    );
    let t = &s["traffic"];
    let n = |k: &str| t[k].as_u64().unwrap_or(0);
    f.counter(
        "holdfast_en_packets",
        "Packets through the tunnel: out (to the DN) and in (from it).",
        &[
            (label("direction", "out"), n("tx_packets")),
            (label("direction", "in"), n("rx_packets")),
        ],
    );
    f.counter(
        "holdfast_en_bytes",
        "Bytes of IP packets through the tunnel, by direction.",
        &[
            (label("direction", "out"), n("tx_bytes")),
            (label("direction", "in"), n("rx_bytes")),
        ],
    );
    f.counter(
        "holdfast_en_dropped_packets",
        "Packets dropped, by reason: no_session (nothing can carry them), oversized, \
         malformed (TUN reads the kernel described in a way that could not be followed).",
        &[
            (label("reason", "no_session"), n("dropped_no_session")),
            (label("reason", "oversized"), n("dropped_too_big")),
            (label("reason", "malformed"), n("dropped_malformed")),
        ],
    );
    f.counter_one(
        "holdfast_en_resent_packets",
        "Packets sent again through a new primary after a failover.",
        n("resent_packets"),
    );
}

/// The routes the client keeps for `lease`: both families, nothing leaking from a full tunnel.
fn lease_routes(lease: &Lease) -> holdfast_proto::en::TunnelRoutes {
    let addresses: Vec<IpAddr> = lease.ticket.claim.addresses().map(|(a, _)| a).collect();
    holdfast_proto::en::tunnel_routes(&lease.routes, &addresses)
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

/// Writes what one session delivers into the TUN device until the session ends.
async fn session_to_tun(shared: Arc<Shared>, conn: quinn::Connection, liveness: Liveness) {
    let mut tun_rx = shared.tun.subscribe();
    let mut writer = tun::Writer::default();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let mut next = match conn.read_datagram().await {
            Ok(d) => Some(d),
            Err(_) => return,
        };
        // Take whatever else has already arrived, so the TUN write can coalesce it.
        let now = Instant::now();
        while let Some(d) = next.take() {
            if probe::is_probe(&d) {
                if let Some(seq) = probe::parse_echo(&d) {
                    liveness.with(|p| p.on_echo(seq, now));
                }
            } else {
                shared.traffic.rx_packets.fetch_add(1, Relaxed);
                shared.traffic.rx_bytes.fetch_add(d.len() as u64, Relaxed);
                batch.push(d);
            }
            if batch.len() < BATCH {
                next = conn.read_datagram().now_or_never().and_then(Result::ok);
            }
        }
        liveness.heard(now, conn.rtt());
        if !batch.is_empty() {
            liveness.with(|p| p.on_traffic(now));
        }
        let dev = tun_rx.borrow_and_update().clone();
        if let Some(dev) = dev {
            if let Err(e) = writer.send(&dev, &batch).await {
                debug!(error = %e, "TUN write failed");
            }
        }
        batch.clear();
    }
}

/// Sends every packet the kernel routes into the TUN device over the primary session.
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
        let mangled = reader.take_dropped();
        if mangled > 0 {
            traffic.dropped_malformed.fetch_add(mangled, Relaxed);
        }
        if current.has_changed().unwrap_or(false) {
            conn = current.borrow_and_update().clone();
        }
        let Some(Carrier { conn: c, liveness }) = conn.as_ref() else {
            traffic
                .dropped_no_session
                .fetch_add(batch.len() as u64, Relaxed);
            batch.clear();
            continue;
        };
        let now = Instant::now();
        liveness.sent(now);
        for pkt in batch.drain(..) {
            let len = pkt.len() as u64;
            match c.send_datagram_wait(pkt.clone()).await {
                Ok(()) => {
                    traffic.tx_packets.fetch_add(1, Relaxed);
                    traffic.tx_bytes.fetch_add(len, Relaxed);
                    if let Ok(mut u) = liveness.unanswered.lock() {
                        u.sent(now, pkt);
                    }
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
