//! The detector's shell: the DN child process, the local heartbeat socket, the peers' UDP
//! socket, netlink, and the status socket. Every decision is [`Supervisor`]'s, [`Peers`]' or
//! [`StallWatch`]'s (in `holdfast_proto::fd`); this file performs what they return.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use holdfast_proto::fd::{
    Admission, ChildState, HealthPolicy, KillReason, LocalMessage, PeerChange, PeerGate, PeerState,
    Peers, RestartPolicy, StallWatch, Supervisor, SupervisorAction, FD_SOCKET_ENV,
};
use holdfast_proto::lease::IssuerKeys;
use holdfast_proto::peer::{Freshness, Notice, PeerNotice, Sequence};
use holdfast_shell::netlink::Routes;
use holdfast_shell::unix_now;
use tokio::net::{UdpSocket, UnixDatagram};
use tokio::process::{Child, Command};
use tracing::{debug, error, info, warn};

use crate::metrics;

pub struct Options {
    pub config: PathBuf,
    pub node: String,
    pub control: PathBuf,
    pub dn: PathBuf,
    pub dn_control: PathBuf,
    pub restart: RestartPolicy,
    pub health: HealthPolicy,
    /// 0: no limit.
    pub memory_limit_bytes: u64,
    /// Zero: the data path is not watched.
    pub stall: Duration,
    pub metrics: Option<SocketAddr>,
    /// Where the DN serves its metrics; `None`: nowhere.
    pub dn_metrics: Option<SocketAddr>,
    /// The DN logs in the same format.
    pub log_format: holdfast_shell::LogFormat,
}

/// Datagrams read from each peer's socket before a silence is judged.
const PEEK_BEFORE_SILENCE: usize = 16;
/// How often limits (memory, stalled data path) are sampled.
const LIMIT_CHECK: Duration = Duration::from_millis(100);
/// How long a DN asked to stop (SIGTERM) has before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A peer detector: another DN of the cluster, reached on its cluster-network address.
struct PeerInfo {
    name: String,
    address: SocketAddr,
    changes: u64,
}

/// Everything status and metrics show, behind one lock the loop holds only briefly.
pub struct State {
    node: String,
    supervisor: Supervisor,
    peers: Peers,
    peer_info: Vec<PeerInfo>,
    /// The heartbeats taken from each peer: a replayed one is refused.
    freshness: Freshness,
    /// This detector's heartbeat sequence.
    sequence: Sequence,
    pid: Option<u32>,
    /// The DN's forwarded-packet count from its last heartbeat.
    forwarded: u64,
    /// Its count of other inputs handled (connections accepted, probes answered).
    handled: u64,
    routes_deleted: u64,
    kills_by_reason: BTreeMap<&'static str, u64>,
}

fn reason_kind(reason: &KillReason) -> &'static str {
    match reason {
        KillReason::HeartbeatsStopped { .. } => "heartbeat",
        KillReason::Fault(_) => "fault",
        KillReason::Limit(_) => "limit",
    }
}

fn peer_state_name(state: PeerState) -> &'static str {
    match state {
        PeerState::Unknown => "unknown",
        PeerState::Up => "up",
        PeerState::DnDown => "dn-down",
        PeerState::Silent => "silent",
    }
}

fn ms_until(t: Instant, now: Instant) -> u64 {
    t.saturating_duration_since(now).as_millis() as u64
}

impl State {
    pub fn status(&self) -> serde_json::Value {
        let now = Instant::now();
        let sup = &self.supervisor;
        let (state, heartbeat_age_ms, next_start_in_ms) = match sup.state() {
            ChildState::Stopped { restart_at } => {
                ("stopped", None, Some(ms_until(restart_at, now)))
            }
            ChildState::Starting { .. } => ("starting", None, None),
            ChildState::Running { last_heartbeat, .. } => (
                "running",
                Some(now.saturating_duration_since(last_heartbeat).as_millis() as u64),
                None,
            ),
            ChildState::Killing => ("killing", None, None),
        };
        let peers: Vec<serde_json::Value> = self
            .peer_info
            .iter()
            .enumerate()
            .map(|(i, p)| {
                serde_json::json!({
                    "name": p.name,
                    "address": p.address.to_string(),
                    "state": self.peers.state(i).map(peer_state_name),
                    "up": self.peers.state(i).is_some_and(PeerState::is_up),
                    "heartbeat_age_ms": self.peers.age(i, now).map(|a| a.as_millis() as u64),
                    "changes": p.changes,
                })
            })
            .collect();
        let kills_by_reason: serde_json::Map<String, serde_json::Value> =
            ["heartbeat", "fault", "limit"]
                .iter()
                .map(|k| {
                    (
                        (*k).to_owned(),
                        self.kills_by_reason.get(k).copied().unwrap_or(0).into(),
                    )
                })
                .collect();
        serde_json::json!({
            "node": self.node,
            "dn": {
                "state": state,
                "pid": self.pid,
                "heartbeat_age_ms": heartbeat_age_ms,
                "next_start_in_ms": next_start_in_ms,
                "forwarded": self.forwarded,
                "handled": self.handled,
            },
            "starts": sup.starts,
            "restarts": sup.starts.saturating_sub(1),
            "kills": sup.kills,
            "kills_by_reason": kills_by_reason,
            "recent_failures": sup.recent_failures(),
            "last_kill": sup.last_kill.as_ref().map(ToString::to_string),
            "last_exit": sup.last_exit,
            "routes_deleted": self.routes_deleted,
            "peers": peers,
        })
    }
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The local datagram socket the DN heartbeats to, removed when the detector exits.
struct LocalSocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Drop for LocalSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One connected socket per peer, all bound to this detector's port: each peer's heartbeats
/// wait in their own queue, and datagrams from any other address are dropped by the kernel, so
/// a flood at the port can neither crowd out a peer's heartbeats nor keep the detector busy.
struct PeerSockets {
    /// In the order of the peers (as in `State::peer_info`); each peer's address is fixed by
    /// the config.
    links: Vec<(UdpSocket, SocketAddr)>,
    signing_key: ed25519_dalek::SigningKey,
    keys: IssuerKeys,
    interval: Duration,
    /// Which datagrams earn a signature check (a forged source address still reaches a link).
    gate: PeerGate,
    /// The link read first next time, so that one busy link cannot starve the others.
    next_link: AtomicUsize,
}

struct Detector {
    opts: Options,
    state: Shared,
    child: Option<Child>,
    local: LocalSocket,
    /// Where the running DN listens for what the detector says (learned from its heartbeats).
    dn_socket: Option<PathBuf>,
    peer_sockets: Option<PeerSockets>,
    netlink: Routes,
    stall: StallWatch,
    listen_port: u16,
}

pub async fn run(opts: Options) -> Result<()> {
    let (cluster, spec) = holdfast_shell::load_dn(&opts.config, &opts.node)?;
    if !opts.dn.is_file() && opts.dn.components().count() > 1 {
        return Err(anyhow!(
            "the dn binary {} does not exist (give its path with --dn)",
            opts.dn.display()
        ));
    }
    let local_path = holdfast_shell::control::beside(&opts.control, ".hb");
    if let Some(dir) = local_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(&local_path);
    // Only this user may send it heartbeats and faults: a fault kills the DN.
    let bound = holdfast_shell::control::bind_private_datagram(&local_path)?;
    let local = LocalSocket {
        socket: UnixDatagram::from_std(bound)
            .with_context(|| format!("cannot watch {}", local_path.display()))?,
        path: local_path,
    };
    let peer_info: Vec<PeerInfo> = cluster
        .dns
        .iter()
        .filter(|d| d.name != spec.name)
        .filter_map(|d| {
            Some(PeerInfo {
                name: d.name.clone(),
                address: SocketAddr::from((d.router_id?, cluster.detector.port)),
                changes: 0,
            })
        })
        .collect();
    let peer_sockets = match spec.router_id {
        Some(me) if !peer_info.is_empty() => {
            let local = SocketAddr::from((me, cluster.detector.port));
            let links = peer_info
                .iter()
                .map(|p| {
                    holdfast_shell::udp_connected(local, p.address)
                        .map(|socket| (socket, p.address))
                        .with_context(|| {
                            format!(
                                "cannot bind the peer heartbeat socket {local} ([detector] port) for peer {} at {}",
                                p.name, p.address
                            )
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            Some(PeerSockets {
                links,
                signing_key: holdfast_shell::read_signing_key(&spec)?,
                keys: cluster.issuer_keys(),
                interval: cluster.detector.peers.interval,
                gate: PeerGate::new(
                    peer_info
                        .iter()
                        .map(|p| (p.name.clone(), p.address.ip()))
                        .collect(),
                    cluster.detector.peers,
                    Instant::now(),
                ),
                next_link: AtomicUsize::new(0),
            })
        }
        _ => {
            warn!("no peers to heartbeat: this DN or the others have no router_id (an [ospf] cluster network)");
            None
        }
    };
    let now = Instant::now();
    let state: Shared = Arc::new(Mutex::new(State {
        node: spec.name.clone(),
        supervisor: Supervisor::new(opts.restart, opts.health, now),
        peers: Peers::new(cluster.detector.peers, peer_info.len()),
        peer_info,
        freshness: Freshness::default(),
        sequence: Sequence::default(),
        pid: None,
        forwarded: 0,
        handled: 0,
        routes_deleted: 0,
        kills_by_reason: BTreeMap::new(),
    }));
    let status_state = state.clone();
    let _control = holdfast_shell::control::serve(opts.control.clone(), move |_req| {
        lock(&status_state).status()
    })
    .await?;
    let _metrics = match opts.metrics {
        Some(addr) => Some(
            holdfast_shell::metrics::serve(
                addr,
                Arc::new(metrics::registry(state.clone())),
                "dn-fd",
            )
            .await?,
        ),
        None => None,
    };
    info!(
        node = %spec.name,
        dn = %opts.dn.display(),
        heartbeat_timeout_ms = opts.health.heartbeat_timeout.as_millis() as u64,
        restart_base_ms = opts.restart.base.as_millis() as u64,
        restart_max_ms = opts.restart.max.as_millis() as u64,
        peers = lock(&state).peer_info.len(),
        "dn-fd up"
    );
    let mut detector = Detector {
        stall: StallWatch::new(opts.stall),
        opts,
        state,
        child: None,
        local,
        dn_socket: None,
        peer_sockets,
        netlink: Routes::connect()?,
        listen_port: spec.listen.port(),
    };
    let outcome = detector.run().await;
    detector.stop().await;
    let _ = std::fs::remove_file(&detector.opts.control);
    outcome
}

/// Puts this process's thread (and the threads it starts later) at SCHED_FIFO `priority`, or
/// leaves it at normal scheduling for 0. A detector that is not scheduled for three heartbeat
/// intervals makes its peers call it dead, and calls them dead itself when it wakes.
pub fn set_realtime_priority(priority: u8) {
    if priority == 0 {
        return;
    }
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: sched_setscheduler on the calling thread with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } == 0 {
        info!(priority, "running at real-time priority (SCHED_FIFO)");
    } else {
        warn!(
            priority,
            error = %std::io::Error::last_os_error(),
            "cannot run at real-time priority (needs CAP_SYS_NICE; --realtime-priority 0 \
             silences this): heartbeats may be late on a loaded host"
        );
    }
}

/// Resolves when the child exits; never, when there is none.
async fn wait_child(child: &mut Option<Child>) -> std::io::Result<std::process::ExitStatus> {
    match child {
        Some(c) => c.wait().await,
        None => std::future::pending().await,
    }
}

/// The next datagram from any peer's socket, with the peer's address; never, without peers.
async fn recv_peer(
    sockets: &Option<PeerSockets>,
    buf: &mut [u8],
) -> (SocketAddr, std::io::Result<usize>) {
    let Some(sockets) = sockets else {
        return std::future::pending().await;
    };
    let links = &sockets.links;
    let first = sockets.next_link.fetch_add(1, Ordering::Relaxed);
    std::future::poll_fn(|cx| {
        for k in 0..links.len() {
            let (socket, address) = &links[(first + k) % links.len()];
            let mut read = tokio::io::ReadBuf::new(buf);
            if let Poll::Ready(got) = socket.poll_recv(cx, &mut read) {
                return Poll::Ready((*address, got.map(|()| read.filled().len())));
            }
        }
        Poll::Pending
    })
    .await
}

/// A datagram already waiting in link `link`'s socket, without waiting for one.
fn try_recv_link(
    sockets: &Option<PeerSockets>,
    link: usize,
    buf: &mut [u8],
) -> Option<(SocketAddr, usize)> {
    let (socket, address) = sockets.as_ref()?.links.get(link)?;
    socket.try_recv(buf).ok().map(|n| (*address, n))
}

fn describe_exit(status: &std::process::ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status}"),
    }
}

impl Detector {
    async fn run(&mut self) -> Result<()> {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut local_buf = [0u8; 1024];
        let mut peer_buf = [0u8; 512];
        let mut limits = tokio::time::interval(LIMIT_CHECK);
        let heartbeat_every = self
            .peer_sockets
            .as_ref()
            .map(|p| p.interval)
            .unwrap_or(Duration::from_secs(3600));
        let mut heartbeats = tokio::time::interval(heartbeat_every);
        heartbeats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let deadline = {
                let s = lock(&self.state);
                [s.supervisor.poll_timeout(), s.peers.poll_timeout()]
                    .into_iter()
                    .flatten()
                    .min()
            };
            let sleep = async {
                match deadline {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {
                    // A detector that was itself held up may find heartbeats waiting: they
                    // count before any silence is judged (a bounded look: a forged flood
                    // must not keep the timeout from being handled).
                    let links = self.peer_sockets.as_ref().map_or(0, |p| p.links.len());
                    for link in 0..links {
                        for _ in 0..PEEK_BEFORE_SILENCE {
                            let Some((from, n)) = try_recv_link(&self.peer_sockets, link, &mut peer_buf) else {
                                break;
                            };
                            self.on_peer_datagram(&peer_buf[..n], from).await;
                        }
                    }
                    let now = Instant::now();
                    let (actions, changes) = {
                        let mut s = lock(&self.state);
                        (s.supervisor.handle_timeout(now), s.peers.handle_timeout(now))
                    };
                    self.perform(actions).await;
                    self.peer_changes(changes).await;
                }
                got = self.local.socket.recv_from(&mut local_buf) => match got {
                    Ok((n, from)) => {
                        let from = from.as_pathname().map(Path::to_path_buf);
                        self.on_local(&local_buf[..n], from).await;
                    }
                    Err(e) => warn!(error = %e, "local heartbeat socket error"),
                },
                status = wait_child(&mut self.child) => {
                    let how = match status {
                        Ok(s) => describe_exit(&s),
                        Err(e) => format!("cannot be waited for: {e}"),
                    };
                    self.child = None;
                    self.dn_socket = None;
                    self.stall.reset();
                    let actions = {
                        let mut s = lock(&self.state);
                        s.pid = None;
                        s.supervisor.on_exit(how.clone(), Instant::now())
                    };
                    warn!(exit = %how, "the DN exited");
                    self.perform(actions).await;
                }
                (from, got) = recv_peer(&self.peer_sockets, &mut peer_buf) => match got {
                    Ok(n) => self.on_peer_datagram(&peer_buf[..n], from).await,
                    // Mostly "connection refused": the peer's detector is not running.
                    Err(e) => debug!(peer = %from, error = %e, "peer socket error"),
                },
                _ = heartbeats.tick() => {
                    let running = matches!(lock(&self.state).supervisor.state(), ChildState::Running { .. });
                    self.heartbeat_peers(running).await;
                }
                _ = limits.tick() => self.check_limits().await,
                res = tokio::signal::ctrl_c() => {
                    res?;
                    info!("interrupted: stopping the DN");
                    return Ok(());
                }
                _ = term.recv() => {
                    info!("terminated: stopping the DN");
                    return Ok(());
                }
                _ = hup.recv() => {
                    // The DN reloads its configuration; the detector's own settings are flags.
                    match lock(&self.state).pid {
                        Some(pid) => {
                            info!(pid, "SIGHUP: telling the DN to reload its configuration");
                            // SAFETY: kill(2) on the pid of our own child.
                            unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
                        }
                        None => info!("SIGHUP: no DN running to reload"),
                    }
                }
            }
        }
    }

    async fn perform(&mut self, actions: Vec<SupervisorAction>) {
        let mut queue = std::collections::VecDeque::from(actions);
        while let Some(action) = queue.pop_front() {
            match action {
                // A DN that cannot be started has exited, as far as the supervisor goes.
                SupervisorAction::Spawn => queue.extend(self.spawn()),
                SupervisorAction::Kill(reason) => {
                    let pid = lock(&self.state).pid;
                    error!(pid = ?pid, %reason, "killing the DN");
                    *lock(&self.state)
                        .kills_by_reason
                        .entry(reason_kind(&reason))
                        .or_default() += 1;
                    if let Some(child) = &mut self.child {
                        if let Err(e) = child.start_kill() {
                            warn!(error = %e, "cannot kill the DN");
                        }
                    }
                }
                SupervisorAction::DeleteRoutes => self.delete_routes().await,
                SupervisorAction::AnnounceDn { up } => self.heartbeat_peers(up).await,
            }
        }
    }

    /// Starts the DN; returns what the supervisor decides if it cannot be started.
    fn spawn(&mut self) -> Vec<SupervisorAction> {
        let mut cmd = Command::new(&self.opts.dn);
        cmd.arg("--config")
            .arg(&self.opts.config)
            .arg("--node")
            .arg(&self.opts.node)
            .arg("--control")
            .arg(&self.opts.dn_control)
            .args(match self.opts.dn_metrics {
                Some(addr) => vec!["--metrics".to_owned(), addr.to_string()],
                None => vec!["--no-metrics".to_owned()],
            })
            .env(FD_SOCKET_ENV, &self.local.path)
            .env(holdfast_shell::LOG_FORMAT_ENV, self.opts.log_format.name())
            .kill_on_drop(true);
        let parent = std::process::id();
        // SAFETY: sched_setscheduler, prctl, getppid and _exit are async-signal-safe; nothing
        // is allocated.
        unsafe {
            cmd.pre_exec(move || {
                // The detector's real-time priority is its own: the DN competes like anything
                // else (lowering a policy always succeeds).
                let normal = libc::sched_param { sched_priority: 0 };
                libc::sched_setscheduler(0, libc::SCHED_OTHER, &normal);
                // The DN dies with its detector, whatever kills the detector (even SIGKILL).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The detector died before the line above took effect.
                if libc::getppid() != parent as libc::pid_t {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        match cmd.spawn() {
            Ok(child) => {
                let pid = child.id();
                info!(?pid, "DN started");
                lock(&self.state).pid = pid;
                self.child = Some(child);
                Vec::new()
            }
            Err(e) => {
                let how = format!("cannot start {}: {e}", self.opts.dn.display());
                error!("{how}");
                lock(&self.state).supervisor.on_exit(how, Instant::now())
            }
        }
    }

    async fn delete_routes(&mut self) {
        let started = Instant::now();
        match self.netlink.delete_ours().await {
            Ok(deleted) => {
                lock(&self.state).routes_deleted += deleted.len() as u64;
                let list: Vec<String> = deleted.iter().map(ToString::to_string).collect();
                info!(
                    routes = %list.join(" "),
                    took_us = started.elapsed().as_micros() as u64,
                    "deleted the DN's routes"
                );
            }
            Err(e) => error!(error = %format!("{e:#}"), "cannot delete the DN's routes"),
        }
    }

    async fn on_local(&mut self, datagram: &[u8], from: Option<PathBuf>) {
        let Some(message) = LocalMessage::decode(datagram) else {
            debug!("ignoring a malformed local datagram");
            return;
        };
        let child_pid = lock(&self.state).pid;
        match message {
            LocalMessage::Heartbeat {
                pid,
                forwarded,
                handled,
            } if Some(pid) == child_pid => {
                let actions = {
                    let mut s = lock(&self.state);
                    s.forwarded = forwarded;
                    s.handled = handled;
                    s.supervisor.on_heartbeat(Instant::now())
                };
                if from.is_some() && from != self.dn_socket {
                    self.dn_socket = from;
                    self.tell_dn_all_down();
                }
                self.perform(actions).await;
            }
            LocalMessage::Fault { pid, reason } if Some(pid) == child_pid => {
                warn!(%reason, "the DN reports a fault");
                let actions = lock(&self.state)
                    .supervisor
                    .on_failure(KillReason::Fault(reason));
                self.perform(actions).await;
            }
            other => debug!(?other, "ignoring a local datagram from no DN of ours"),
        }
    }

    fn tell_dn(&self, message: &LocalMessage) {
        if let Some(path) = &self.dn_socket {
            if let Err(e) = self
                .local
                .socket
                .try_send_to(message.encode().as_bytes(), path)
            {
                warn!(error = %e, "cannot tell the DN");
            }
        }
    }

    /// A DN that just started knows nothing of its peers: tell it which are down.
    fn tell_dn_all_down(&self) {
        let messages: Vec<LocalMessage> = {
            let s = lock(&self.state);
            s.peer_info
                .iter()
                .enumerate()
                .filter_map(|(i, p)| match s.peers.state(i) {
                    Some(state @ (PeerState::Silent | PeerState::DnDown)) => {
                        Some(LocalMessage::Peer {
                            dn: p.name.clone(),
                            state,
                        })
                    }
                    _ => None,
                })
                .collect()
        };
        for m in &messages {
            self.tell_dn(m);
        }
    }

    async fn peer_changes(&mut self, changes: Vec<PeerChange>) {
        for change in changes {
            let message = {
                let mut s = lock(&self.state);
                let Some(info) = s.peer_info.get_mut(change.peer) else {
                    continue;
                };
                info.changes += 1;
                let name = info.name.clone();
                let (from, to) = (peer_state_name(change.from), peer_state_name(change.to));
                if change.to.is_up() {
                    info!(peer = %name, %from, %to, "peer up");
                } else {
                    warn!(peer = %name, %from, %to, "peer down");
                }
                change
                    .tells_dn()
                    .map(|state| LocalMessage::Peer { dn: name, state })
            };
            if let Some(m) = message {
                self.tell_dn(&m);
            }
        }
    }

    async fn on_peer_datagram(&mut self, datagram: &[u8], from: SocketAddr) {
        let Some(peer_sockets) = &mut self.peer_sockets else {
            return;
        };
        // Address and budget first: no signature work for a flood.
        let Some(claimed) = PeerNotice::claimed_sender(datagram) else {
            debug!(%from, "ignoring a datagram that is no peer notice");
            return;
        };
        match peer_sockets.gate.admit(&claimed, from.ip(), Instant::now()) {
            Admission::Check(_) => {}
            refused => {
                debug!(%from, ?claimed, ?refused, "ignoring a peer datagram before its signature");
                return;
            }
        }
        let notice = match PeerNotice::open(datagram, &peer_sockets.keys) {
            Ok(n) => n,
            Err(e) => {
                debug!(%from, error = %e, "ignoring a peer datagram");
                return;
            }
        };
        let Notice::Alive { dn_up, .. } = notice.notice else {
            return;
        };
        let change = {
            let mut s = lock(&self.state);
            let Some(index) = s.peer_info.iter().position(|p| p.name == notice.from) else {
                return;
            };
            if let Err(e) = s.freshness.take(&notice, unix_now()) {
                debug!(error = %e, "ignoring a heartbeat");
                return;
            }
            s.peers.on_heartbeat(index, dn_up, Instant::now())
        };
        self.peer_changes(change.into_iter().collect()).await;
    }

    /// One heartbeat to every peer, saying whether the local DN is up.
    async fn heartbeat_peers(&self, dn_up: bool) {
        let Some(p) = &self.peer_sockets else {
            return;
        };
        let seq = lock(&self.state)
            .sequence
            .next(holdfast_shell::unix_millis());
        let datagram = PeerNotice {
            from: self.opts.node.clone(),
            sent_at: unix_now(),
            notice: Notice::Alive { dn_up, seq },
        }
        .seal(&p.signing_key);
        for (socket, address) in &p.links {
            // A peer whose host is gone answers nothing or "unreachable": not our failure.
            if let Err(e) = socket.send(&datagram).await {
                debug!(%address, error = %e, "heartbeat not sent");
            }
        }
    }

    async fn check_limits(&mut self) {
        let (pid, progress, running) = {
            let s = lock(&self.state);
            (
                s.pid,
                s.forwarded.wrapping_add(s.handled),
                matches!(s.supervisor.state(), ChildState::Running { .. }),
            )
        };
        let (Some(pid), true) = (pid, running) else {
            return;
        };
        let mut reason = None;
        if self.opts.memory_limit_bytes > 0 {
            if let Some(rss) = resident_bytes(pid) {
                if rss > self.opts.memory_limit_bytes {
                    reason = Some(KillReason::Limit(format!(
                        "resident memory {} MiB over the limit of {} MiB",
                        rss >> 20,
                        self.opts.memory_limit_bytes >> 20
                    )));
                }
            }
        }
        if reason.is_none() && !self.opts.stall.is_zero() {
            if let Some(queued) = udp_receive_queue(pid, self.listen_port) {
                reason = self.stall.observe(Instant::now(), queued, progress);
            }
        }
        if let Some(reason) = reason {
            let actions = lock(&self.state).supervisor.on_failure(reason);
            self.perform(actions).await;
        }
    }

    /// The detector is exiting: the DN goes with it, and so do its routes.
    async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: signalling our own child by pid.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGTERM);
                }
            }
            if tokio::time::timeout(STOP_GRACE, child.wait())
                .await
                .is_err()
            {
                warn!("the DN did not stop within {STOP_GRACE:?}: killing it");
                let _ = child.kill().await;
            }
        }
        self.heartbeat_peers(false).await;
        self.delete_routes().await;
    }
}

/// The process's resident memory, from /proc.
fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Bytes waiting in the receive queues of the process's UDP sockets on `port`, as the kernel
/// reports them in its network namespace's /proc/net/udp{,6}.
fn udp_receive_queue(pid: u32, port: u16) -> Option<u64> {
    let mut total = 0;
    let mut seen = false;
    for file in ["udp", "udp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st tx_queue:rx_queue ...
            let (Some(local), Some(queues)) = (fields.get(1), fields.get(4)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if local_port != Some(port) {
                continue;
            }
            if let Some(rx) = queues
                .split_once(':')
                .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
            {
                total += rx;
                seen = true;
            }
        }
    }
    seen.then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receive_queue_is_read_from_proc() {
        // A socket of our own with two datagrams waiting in it.
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = socket.local_addr().unwrap().port();
        assert_eq!(udp_receive_queue(std::process::id(), port), Some(0));
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sender.send_to(&[0u8; 100], ("127.0.0.1", port)).unwrap();
        sender.send_to(&[0u8; 100], ("127.0.0.1", port)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(udp_receive_queue(std::process::id(), port).unwrap() >= 200);
        assert!(resident_bytes(std::process::id()).unwrap() > 0);
    }
}
