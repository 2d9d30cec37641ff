//! The DN failure detector's decisions (`dn-fd`; thesis sections 3 and 3.2): when to kill the
//! local DN, when to start it again, and when a peer counts as down.
//!
//! The detector is liberal in declaring failure (a false positive costs a failover, a false
//! negative an outage) and crash-only in what it does about it: a DN that misbehaves is killed
//! and started afresh, never repaired. [`Supervisor`] and [`Peers`] perform no I/O: the shell
//! feeds them events with the current time and performs the actions they return.

use std::time::{Duration, Instant};

/// How quickly a failing DN is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Delay after the first failure; doubled for each further recent failure.
    pub base: Duration,
    /// The delay never exceeds this.
    pub max: Duration,
    /// A DN that has run this long without failing has its failure count forgotten.
    pub healthy_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
        }
    }
}

impl RestartPolicy {
    /// The delay before the next start after `failures` recent failures (at least one).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// How the local DN's health is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// The DN is hung or stopped when no heartbeat arrived for this long.
    pub heartbeat_timeout: Duration,
    /// Time a freshly started DN has to send its first heartbeat (it sets up TUN, routes, keys).
    pub startup_grace: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        Self {
            heartbeat_timeout: Duration::from_millis(100),
            startup_grace: Duration::from_secs(5),
        }
    }
}

/// Why the detector killed the DN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KillReason {
    /// No heartbeat for `silence`: hung, stopped, or its event loop blocked.
    HeartbeatsStopped { silence: Duration },
    /// The DN reported a fatal condition itself.
    Fault(String),
    /// A configured limit was crossed (memory, a stalled data path).
    Limit(String),
}

impl std::fmt::Display for KillReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KillReason::HeartbeatsStopped { silence } => {
                write!(f, "no heartbeat for {} ms", silence.as_millis())
            }
            KillReason::Fault(what) => write!(f, "fault reported: {what}"),
            KillReason::Limit(what) => write!(f, "limit crossed: {what}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupervisorAction {
    /// Start the DN process.
    Spawn,
    /// Kill the DN with SIGKILL.
    Kill(KillReason),
    /// The DN is gone: delete its protocol-200 routes now, so the routing daemon withdraws them.
    DeleteRoutes,
    /// Tell the peers whether the local DN is up.
    AnnounceDn { up: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildState {
    /// Not running; the next start is due at `restart_at`.
    Stopped { restart_at: Instant },
    /// Started at `since`, no heartbeat yet.
    Starting { since: Instant },
    /// Sending heartbeats; the last at `last_heartbeat`.
    Running {
        since: Instant,
        last_heartbeat: Instant,
    },
    /// Killed; waiting for the exit to be reported.
    Killing,
}

/// Supervision of the local DN: start it, watch its heartbeats, kill it when it misbehaves,
/// start it again after a back-off that grows with recent failures.
#[derive(Debug, Clone)]
pub struct Supervisor {
    restart: RestartPolicy,
    health: HealthPolicy,
    state: ChildState,
    /// Failures since the DN last ran healthily for `healthy_after`.
    recent_failures: u32,
    pub starts: u64,
    pub kills: u64,
    pub last_kill: Option<KillReason>,
    pub last_exit: Option<String>,
}

impl Supervisor {
    /// A supervisor whose DN is to be started at once.
    pub fn new(restart: RestartPolicy, health: HealthPolicy, now: Instant) -> Self {
        Self {
            restart,
            health,
            state: ChildState::Stopped { restart_at: now },
            recent_failures: 0,
            starts: 0,
            kills: 0,
            last_kill: None,
            last_exit: None,
        }
    }

    pub fn state(&self) -> ChildState {
        self.state
    }

    pub fn recent_failures(&self) -> u32 {
        self.recent_failures
    }

    /// When [`Supervisor::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            ChildState::Stopped { restart_at } => Some(restart_at),
            ChildState::Starting { since } => Some(since + self.health.startup_grace),
            ChildState::Running {
                since,
                last_heartbeat,
            } => {
                let deadline = last_heartbeat + self.health.heartbeat_timeout;
                let healthy = since + self.restart.healthy_after;
                Some(if self.recent_failures > 0 {
                    deadline.min(healthy)
                } else {
                    deadline
                })
            }
            ChildState::Killing => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Vec<SupervisorAction> {
        match self.state {
            ChildState::Stopped { restart_at } if now >= restart_at => {
                self.state = ChildState::Starting { since: now };
                self.starts += 1;
                vec![SupervisorAction::Spawn]
            }
            ChildState::Starting { since } if now >= since + self.health.startup_grace => self
                .kill(KillReason::HeartbeatsStopped {
                    silence: now - since,
                }),
            ChildState::Running {
                since,
                last_heartbeat,
            } => {
                if now >= since + self.restart.healthy_after {
                    self.recent_failures = 0;
                }
                if now >= last_heartbeat + self.health.heartbeat_timeout {
                    self.kill(KillReason::HeartbeatsStopped {
                        silence: now - last_heartbeat,
                    })
                } else {
                    Vec::new()
                }
            }
            _ => Vec::new(),
        }
    }

    /// A heartbeat from the DN.
    pub fn on_heartbeat(&mut self, now: Instant) -> Vec<SupervisorAction> {
        match self.state {
            ChildState::Starting { since } => {
                self.state = ChildState::Running {
                    since,
                    last_heartbeat: now,
                };
                vec![SupervisorAction::AnnounceDn { up: true }]
            }
            ChildState::Running { since, .. } => {
                self.state = ChildState::Running {
                    since,
                    last_heartbeat: now,
                };
                Vec::new()
            }
            // A late heartbeat from a DN being killed, or from no DN of ours.
            ChildState::Stopped { .. } | ChildState::Killing => Vec::new(),
        }
    }

    /// The DN reported a fatal condition, or the shell saw a limit crossed.
    pub fn on_failure(&mut self, reason: KillReason) -> Vec<SupervisorAction> {
        match self.state {
            ChildState::Starting { .. } | ChildState::Running { .. } => self.kill(reason),
            ChildState::Stopped { .. } | ChildState::Killing => Vec::new(),
        }
    }

    fn kill(&mut self, reason: KillReason) -> Vec<SupervisorAction> {
        self.state = ChildState::Killing;
        self.kills += 1;
        self.last_kill = Some(reason.clone());
        // Routes go first, so that none outlives the kill, and peers are told at once, not
        // when the exit is reaped.
        vec![
            SupervisorAction::DeleteRoutes,
            SupervisorAction::Kill(reason),
            SupervisorAction::AnnounceDn { up: false },
        ]
    }

    /// The DN process exited (`how`: its status, as the shell describes it).
    pub fn on_exit(&mut self, how: String, now: Instant) -> Vec<SupervisorAction> {
        let mut out = Vec::new();
        match self.state {
            ChildState::Stopped { .. } => return out,
            ChildState::Killing => {}
            ChildState::Starting { .. } | ChildState::Running { .. } => {
                out.push(SupervisorAction::DeleteRoutes);
                out.push(SupervisorAction::AnnounceDn { up: false });
            }
        }
        if let ChildState::Running { since, .. } = self.state {
            if now >= since + self.restart.healthy_after {
                self.recent_failures = 0;
            }
        }
        self.recent_failures = self.recent_failures.saturating_add(1);
        self.last_exit = Some(how);
        self.state = ChildState::Stopped {
            restart_at: now + self.restart.delay(self.recent_failures),
        };
        out
    }
}

/// How peers are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerPolicy {
    /// How often every detector heartbeats every other.
    pub interval: Duration,
    /// A peer silent for this many intervals is down.
    pub misses: u32,
}

impl Default for PeerPolicy {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(10),
            misses: 3,
        }
    }
}

impl PeerPolicy {
    pub fn silence_limit(&self) -> Duration {
        self.interval * self.misses.max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Not heard from yet.
    Unknown,
    /// Its detector heartbeats and says its DN is up.
    Up,
    /// Its detector heartbeats but says its DN is down (killed, restarting).
    DnDown,
    /// Its detector went silent: host or link failure.
    Silent,
}

impl PeerState {
    /// Whether the peer's DN can carry clients.
    pub fn is_up(self) -> bool {
        self == PeerState::Up
    }
}

/// A peer whose state changed, for the shell to tell the local DN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub peer: usize,
    pub from: PeerState,
    pub to: PeerState,
}

impl PeerChange {
    /// What the local DN must be told: the new state when the peer's DN became able or unable
    /// to carry clients. Unknown -> silent or -> DN down is news too: the DN may carry its
    /// clients. So is silent -> DN down: a peer that was only unheard has restarted, and its
    /// clients carried here must stay until they have gone home.
    pub fn tells_dn(&self) -> Option<PeerState> {
        (self.from.is_up() != self.to.is_up()
            || self.from == PeerState::Unknown
            || (self.from == PeerState::Silent && self.to == PeerState::DnDown))
            .then_some(self.to)
    }
}

#[derive(Debug, Clone)]
struct Peer {
    state: PeerState,
    last_heard: Option<Instant>,
}

/// Every other detector of the cluster, by index in the cluster's DN list (minus this one).
#[derive(Debug, Clone)]
pub struct Peers {
    policy: PeerPolicy,
    peers: Vec<Peer>,
}

impl Peers {
    pub fn new(policy: PeerPolicy, count: usize) -> Self {
        Self {
            policy,
            peers: vec![
                Peer {
                    state: PeerState::Unknown,
                    last_heard: None,
                };
                count
            ],
        }
    }

    pub fn state(&self, peer: usize) -> Option<PeerState> {
        self.peers.get(peer).map(|p| p.state)
    }

    /// How long ago the peer was last heard from.
    pub fn age(&self, peer: usize, now: Instant) -> Option<Duration> {
        self.peers
            .get(peer)?
            .last_heard
            .map(|t| now.saturating_duration_since(t))
    }

    fn set(&mut self, peer: usize, to: PeerState) -> Option<PeerChange> {
        let slot = &mut self.peers[peer];
        let from = slot.state;
        (from != to).then(|| {
            slot.state = to;
            PeerChange { peer, from, to }
        })
    }

    /// A heartbeat from `peer` saying whether its DN is up.
    pub fn on_heartbeat(&mut self, peer: usize, dn_up: bool, now: Instant) -> Option<PeerChange> {
        self.peers.get_mut(peer)?.last_heard = Some(now);
        self.set(
            peer,
            if dn_up {
                PeerState::Up
            } else {
                PeerState::DnDown
            },
        )
    }

    /// When [`Peers::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .iter()
            .filter(|p| p.state != PeerState::Silent)
            .filter_map(|p| p.last_heard)
            .map(|t| t + self.policy.silence_limit())
            .min()
    }

    /// Peers silent past the limit are down.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<PeerChange> {
        let limit = self.policy.silence_limit();
        let silent: Vec<usize> = self
            .peers
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.state != PeerState::Silent && p.last_heard.is_some_and(|t| now >= t + limit)
            })
            .map(|(i, _)| i)
            .collect();
        silent
            .into_iter()
            .filter_map(|i| self.set(i, PeerState::Silent))
            .collect()
    }
}

/// Which datagrams on a peer port earn a signature check. Checking an Ed25519 signature costs
/// tens of microseconds, so a flood of forged heartbeats could keep a detector too busy to read
/// the real ones. A datagram must come from the configured address of the peer it claims to be
/// from, and each peer gets a budget of checks (a token bucket: `per_interval` for every
/// heartbeat interval, up to `burst`), so that a flood claiming one peer cannot crowd out
/// another's heartbeats.
#[derive(Debug, Clone)]
pub struct PeerGate {
    peers: Vec<(String, std::net::IpAddr)>,
    buckets: Vec<(f64, Instant)>,
    per_interval: f64,
    interval: Duration,
    burst: f64,
}

/// What [`PeerGate::admit`] says of a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Check its signature; it claims peer number `0`.
    Check(usize),
    /// No peer of that name.
    UnknownPeer,
    /// Not from the claimed peer's address.
    WrongAddress,
    /// The claimed peer's budget is spent for now.
    OverBudget,
}

impl PeerGate {
    /// Checks a peer may earn per heartbeat interval (it sends one), and at most in a burst.
    pub const PER_INTERVAL: u32 = 4;
    pub const BURST: u32 = 64;

    pub fn new(peers: Vec<(String, std::net::IpAddr)>, policy: PeerPolicy, now: Instant) -> Self {
        let burst = f64::from(Self::BURST);
        Self {
            buckets: vec![(burst, now); peers.len()],
            peers,
            per_interval: f64::from(Self::PER_INTERVAL),
            interval: policy.interval.max(Duration::from_micros(100)),
            burst,
        }
    }

    pub fn admit(&mut self, claimed: &str, from: std::net::IpAddr, now: Instant) -> Admission {
        let Some(index) = self.peers.iter().position(|(n, _)| n == claimed) else {
            return Admission::UnknownPeer;
        };
        if self.peers[index].1.to_canonical() != from.to_canonical() {
            return Admission::WrongAddress;
        }
        let (tokens, since) = &mut self.buckets[index];
        let earned = now.saturating_duration_since(*since).as_secs_f64()
            / self.interval.as_secs_f64()
            * self.per_interval;
        *tokens = (*tokens + earned).min(self.burst);
        *since = now;
        if *tokens < 1.0 {
            return Admission::OverBudget;
        }
        *tokens -= 1.0;
        Admission::Check(index)
    }
}

/// Environment variable through which `dn-fd` gives the DN its heartbeat socket's path.
pub const FD_SOCKET_ENV: &str = "HOLDFAST_FD_SOCKET";

/// One datagram on the local socket between the DN and its detector, as text: a line a person
/// can read in `strace` or `socat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalMessage {
    /// DN -> detector: alive, with how many packets it has forwarded so far (both directions)
    /// and how many other inputs it has handled (connections accepted, probes answered): an
    /// idle tunnel under a burst of handshakes forwards nothing and is still making progress.
    Heartbeat {
        pid: u32,
        forwarded: u64,
        handled: u64,
    },
    /// DN -> detector: a fatal condition; the detector kills and restarts the DN.
    Fault { pid: u32, reason: String },
    /// Detector -> DN: peer `dn` changed: up (it can carry clients), its DN down (its detector
    /// says so), or silent (its detector is unheard: host or link gone, or a false alarm).
    Peer { dn: String, state: PeerState },
}

/// Longest fault reason carried; the rest is cut.
const MAX_REASON: usize = 400;

/// A fault reason as carried: one line of at most [`MAX_REASON`] characters. Applied when
/// decoding too, so that what the detector logs has no control characters whoever sent it, and
/// a decoded message encodes to one that decodes the same.
fn clean(reason: &str) -> String {
    reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON)
        .collect()
}

impl LocalMessage {
    pub fn encode(&self) -> String {
        match self {
            LocalMessage::Heartbeat {
                pid,
                forwarded,
                handled,
            } => format!("HB {pid} {forwarded} {handled}"),
            LocalMessage::Fault { pid, reason } => format!("FAULT {pid} {}", clean(reason)),
            LocalMessage::Peer { dn, state } => {
                let state = match state {
                    PeerState::Up => "up",
                    PeerState::DnDown => "down",
                    PeerState::Silent => "silent",
                    PeerState::Unknown => "unknown",
                };
                format!("PEER {dn} {state}")
            }
        }
    }

    /// `None` for anything that is not a well-formed message.
    pub fn decode(datagram: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(datagram).ok()?;
        let (kind, rest) = text.split_once(' ')?;
        match kind {
            "HB" => {
                let mut fields = rest.split(' ');
                let pid = fields.next()?.parse().ok()?;
                let forwarded = fields.next()?.parse().ok()?;
                // A DN of the release before counted only forwarded packets.
                let handled = match fields.next() {
                    Some(h) => h.parse().ok()?,
                    None => 0,
                };
                fields.next().is_none().then_some(LocalMessage::Heartbeat {
                    pid,
                    forwarded,
                    handled,
                })
            }
            "FAULT" => {
                let (pid, reason) = rest.split_once(' ').unwrap_or((rest, ""));
                Some(LocalMessage::Fault {
                    pid: pid.parse().ok()?,
                    reason: clean(reason),
                })
            }
            "PEER" => {
                let (dn, state) = rest.split_once(' ')?;
                // A detector of the release before said "down" for a silent peer too.
                let state = match state {
                    "up" => PeerState::Up,
                    "down" => PeerState::DnDown,
                    "silent" => PeerState::Silent,
                    "unknown" => PeerState::Unknown,
                    _ => return None,
                };
                (!dn.is_empty() && !dn.contains(' ')).then(|| LocalMessage::Peer {
                    dn: dn.to_owned(),
                    state,
                })
            }
            _ => None,
        }
    }
}

/// Whether a DN's event loop still makes progress, from a counter the loop advances on a timer.
/// The DN heartbeats from a thread of its own, and only while this says the loop is alive: a
/// burst of work (thousands of handshakes or notices) delays the loop without silencing the
/// heartbeats, a loop stuck for `stuck_after` silences them, and a dead or frozen process is
/// silent at once.
#[derive(Debug, Clone)]
pub struct LoopWatch {
    stuck_after: Duration,
    seen: u64,
    moved_at: Instant,
}

impl LoopWatch {
    pub fn new(stuck_after: Duration, ticks: u64, now: Instant) -> Self {
        Self {
            stuck_after,
            seen: ticks,
            moved_at: now,
        }
    }

    /// One look at the loop's counter: whether the loop has moved within `stuck_after`.
    pub fn alive(&mut self, now: Instant, ticks: u64) -> bool {
        if ticks != self.seen {
            self.seen = ticks;
            self.moved_at = now;
        }
        now.saturating_duration_since(self.moved_at) < self.stuck_after
    }
}

/// A stalled data path: bytes wait in the DN's receive queue while its progress count stands
/// still, for longer than `window`. The shell samples the queue (the kernel's view of the QUIC
/// socket) and the count (packets forwarded plus other inputs handled, from heartbeats) and
/// calls [`StallWatch::observe`].
#[derive(Debug, Clone)]
pub struct StallWatch {
    window: Duration,
    /// Since when the queue has been non-empty with the count unchanged, and that count.
    stuck_since: Option<(Instant, u64)>,
}

impl StallWatch {
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            stuck_since: None,
        }
    }

    /// Forget what was seen (a new DN process).
    pub fn reset(&mut self) {
        self.stuck_since = None;
    }

    /// One sample. Returns the kill reason once the path has been stalled for the window.
    pub fn observe(
        &mut self,
        now: Instant,
        queued_bytes: u64,
        progress: u64,
    ) -> Option<KillReason> {
        if queued_bytes == 0 {
            self.stuck_since = None;
            return None;
        }
        match self.stuck_since {
            Some((since, count)) if count == progress => {
                let stalled = now.saturating_duration_since(since);
                (stalled >= self.window).then(|| {
                    KillReason::Limit(format!(
                        "data path stalled: {queued_bytes} bytes queued, nothing forwarded or handled for {} ms",
                        stalled.as_millis()
                    ))
                })
            }
            _ => {
                self.stuck_since = Some((now, progress));
                None
            }
        }
    }
}

#[cfg(test)]
mod gate_tests {
    use super::*;

    #[test]
    fn only_the_claimed_peers_address_within_its_budget_earns_a_check() {
        let t0 = Instant::now();
        let a: std::net::IpAddr = "10.9.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.9.0.2".parse().unwrap();
        let mut g = PeerGate::new(
            vec![("dn1".into(), a), ("dn2".into(), b)],
            PeerPolicy::default(),
            t0,
        );
        assert_eq!(g.admit("dn1", a, t0), Admission::Check(0));
        assert_eq!(g.admit("dn1", b, t0), Admission::WrongAddress);
        assert_eq!(g.admit("dn9", a, t0), Admission::UnknownPeer);
        // A flood claiming dn1 spends dn1's budget, not dn2's.
        let mut checked = 0;
        for _ in 0..10_000 {
            if g.admit("dn1", a, t0) != Admission::OverBudget {
                checked += 1;
            }
        }
        assert_eq!(checked, PeerGate::BURST - 1);
        assert_eq!(g.admit("dn2", b, t0), Admission::Check(1));
        // The budget comes back with time: PER_INTERVAL checks each heartbeat interval.
        let later = t0 + PeerPolicy::default().interval;
        let again = (0..100)
            .filter(|_| g.admit("dn1", a, later) == Admission::Check(0))
            .count();
        assert_eq!(again, PeerGate::PER_INTERVAL as usize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn restart_delay_doubles_and_is_capped() {
        let p = RestartPolicy::default();
        assert_eq!(p.delay(1), 100 * MS);
        assert_eq!(p.delay(2), 200 * MS);
        assert_eq!(p.delay(5), 1600 * MS);
        assert_eq!(p.delay(20), p.max);
        assert_eq!(p.delay(u32::MAX), p.max);
    }

    #[test]
    fn a_silent_dn_is_killed_its_routes_deleted_and_it_is_restarted_after_the_back_off() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(RestartPolicy::default(), HealthPolicy::default(), t0);
        assert_eq!(s.handle_timeout(t0), vec![SupervisorAction::Spawn]);
        assert_eq!(
            s.on_heartbeat(t0 + 300 * MS),
            vec![SupervisorAction::AnnounceDn { up: true }]
        );
        assert_eq!(s.on_heartbeat(t0 + 310 * MS), vec![]);
        // SIGSTOP: heartbeats stop.
        let due = s.poll_timeout().unwrap();
        assert_eq!(due, t0 + 410 * MS);
        assert_eq!(s.handle_timeout(due - MS), vec![]);
        assert_eq!(
            s.handle_timeout(due),
            vec![
                SupervisorAction::DeleteRoutes,
                SupervisorAction::Kill(KillReason::HeartbeatsStopped { silence: 100 * MS }),
                SupervisorAction::AnnounceDn { up: false },
            ]
        );
        assert_eq!(s.kills, 1);
        // The exit of a killed DN needs nothing more; the restart is due after the back-off.
        assert_eq!(s.on_exit("killed by SIGKILL".into(), due + MS), vec![]);
        assert_eq!(s.poll_timeout(), Some(due + MS + 100 * MS));
        assert_eq!(
            s.handle_timeout(due + 101 * MS),
            vec![SupervisorAction::Spawn]
        );
        assert_eq!(s.starts, 2);
    }

    #[test]
    fn a_dn_that_never_heartbeats_is_killed_after_the_startup_grace() {
        let t0 = Instant::now();
        let h = HealthPolicy::default();
        let mut s = Supervisor::new(RestartPolicy::default(), h, t0);
        s.handle_timeout(t0);
        assert_eq!(s.poll_timeout(), Some(t0 + h.startup_grace));
        let acts = s.handle_timeout(t0 + h.startup_grace);
        assert!(matches!(acts[1], SupervisorAction::Kill(_)));
    }

    #[test]
    fn an_unexpected_exit_deletes_routes_at_once_and_a_fault_kills() {
        let t0 = Instant::now();
        let mut s = Supervisor::new(RestartPolicy::default(), HealthPolicy::default(), t0);
        s.handle_timeout(t0);
        s.on_heartbeat(t0);
        assert_eq!(
            s.on_exit("exit status 1".into(), t0 + MS),
            vec![
                SupervisorAction::DeleteRoutes,
                SupervisorAction::AnnounceDn { up: false }
            ]
        );
        let t1 = s.poll_timeout().unwrap();
        s.handle_timeout(t1);
        s.on_heartbeat(t1);
        let acts = s.on_failure(KillReason::Fault("TUN device gone".into()));
        assert_eq!(
            acts[1],
            SupervisorAction::Kill(KillReason::Fault("TUN device gone".into()))
        );
        assert_eq!(s.on_failure(KillReason::Limit("memory".into())), vec![]);
    }

    #[test]
    fn a_flapping_dn_waits_longer_each_time_and_a_healthy_run_resets_the_count() {
        let t0 = Instant::now();
        let policy = RestartPolicy::default();
        let mut s = Supervisor::new(policy, HealthPolicy::default(), t0);
        let mut now;
        let mut delays = Vec::new();
        for _ in 0..4 {
            now = s.poll_timeout().unwrap();
            s.handle_timeout(now);
            s.on_heartbeat(now);
            s.on_exit("exit status 1".into(), now + MS);
            delays.push(s.poll_timeout().unwrap() - (now + MS));
        }
        assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS, 800 * MS]);
        // Now it runs healthily for a long time, heartbeating, before failing again.
        now = s.poll_timeout().unwrap();
        s.handle_timeout(now);
        let start = now;
        while now < start + policy.healthy_after + MS {
            now += 50 * MS;
            s.on_heartbeat(now);
            s.handle_timeout(now);
        }
        assert_eq!(s.recent_failures(), 0);
        s.on_exit("exit status 1".into(), now);
        assert_eq!(s.poll_timeout(), Some(now + policy.base));
    }

    #[test]
    fn peers_go_silent_after_the_missed_heartbeats_and_say_when_their_dn_is_down() {
        let t0 = Instant::now();
        let mut p = Peers::new(PeerPolicy::default(), 2);
        assert_eq!(p.poll_timeout(), None);
        assert_eq!(
            p.on_heartbeat(0, true, t0),
            Some(PeerChange {
                peer: 0,
                from: PeerState::Unknown,
                to: PeerState::Up
            })
        );
        assert_eq!(p.on_heartbeat(0, true, t0 + 10 * MS), None);
        assert_eq!(p.poll_timeout(), Some(t0 + 40 * MS));
        assert_eq!(p.handle_timeout(t0 + 39 * MS), vec![]);
        assert_eq!(
            p.handle_timeout(t0 + 40 * MS),
            vec![PeerChange {
                peer: 0,
                from: PeerState::Up,
                to: PeerState::Silent
            }]
        );
        // A silent peer is not re-announced; it comes back with its next heartbeat.
        assert_eq!(p.handle_timeout(t0 + 100 * MS), vec![]);
        // Back, saying its DN is down: it restarted, which its DN must be told.
        let restarted = p.on_heartbeat(0, false, t0 + 200 * MS).unwrap();
        assert_eq!(restarted.to, PeerState::DnDown);
        assert_eq!(restarted.tells_dn(), Some(PeerState::DnDown));
        assert!(!p.state(0).unwrap().is_up());
        assert_eq!(p.on_heartbeat(5, true, t0), None, "no such peer");
    }

    #[test]
    fn local_messages_round_trip_and_garbage_is_refused() {
        for m in [
            LocalMessage::Heartbeat {
                pid: 42,
                forwarded: 7,
                handled: 3,
            },
            LocalMessage::Fault {
                pid: 42,
                reason: "TUN reader stopped: EIO".into(),
            },
            LocalMessage::Fault {
                pid: 1,
                reason: String::new(),
            },
            LocalMessage::Peer {
                dn: "dn2".into(),
                state: PeerState::DnDown,
            },
            LocalMessage::Peer {
                dn: "dn2".into(),
                state: PeerState::Silent,
            },
            LocalMessage::Peer {
                dn: "dn2".into(),
                state: PeerState::Up,
            },
        ] {
            assert_eq!(LocalMessage::decode(m.encode().as_bytes()), Some(m));
        }
        let multi_line = LocalMessage::Fault {
            pid: 3,
            reason: "a\nb".into(),
        };
        assert_eq!(
            LocalMessage::decode(multi_line.encode().as_bytes()),
            Some(LocalMessage::Fault {
                pid: 3,
                reason: "a b".into()
            })
        );
        for bad in [
            "",
            "HB",
            "HB x 1",
            "HB 1",
            "HB 1 2 x",
            "HB 1 2 3 4",
            "PEER dn2 maybe",
            "PEER  up",
            "NOPE 1",
            "\u{ff}",
        ] {
            assert_eq!(LocalMessage::decode(bad.as_bytes()), None, "{bad:?}");
        }
        // Found by fuzzing: a control character in a received reason was kept, so the
        // message did not survive being encoded again (and reached the log as it was).
        let received = LocalMessage::decode(b"FAULT 42 7\"242\x18TUN rea\x1b[2d").unwrap();
        assert_eq!(
            received,
            LocalMessage::Fault {
                pid: 42,
                reason: "7\"242 TUN rea [2d".into()
            }
        );
        assert_eq!(
            LocalMessage::decode(received.encode().as_bytes()),
            Some(received)
        );
        assert_eq!(
            LocalMessage::decode(b"HB 9 5"),
            Some(LocalMessage::Heartbeat {
                pid: 9,
                forwarded: 5,
                handled: 0
            }),
            "the heartbeat of the release before"
        );
    }

    #[test]
    fn a_busy_loop_keeps_the_heartbeats_and_a_stuck_one_silences_them() {
        let t0 = Instant::now();
        let mut w = LoopWatch::new(1000 * MS, 5, t0);
        assert!(w.alive(t0 + 10 * MS, 5));
        // Busy for 900 ms without a tick: still alive.
        assert!(w.alive(t0 + 900 * MS, 5));
        assert!(w.alive(t0 + 950 * MS, 6), "it moved");
        assert!(w.alive(t0 + 1900 * MS, 6));
        assert!(!w.alive(t0 + 1950 * MS, 6), "stuck for a second");
        assert!(!w.alive(t0 + 5000 * MS, 6));
        assert!(w.alive(t0 + 5010 * MS, 7), "moving again");
    }

    #[test]
    fn a_queue_that_does_not_drain_while_nothing_is_forwarded_is_a_stall() {
        let t0 = Instant::now();
        let mut w = StallWatch::new(500 * MS);
        assert_eq!(w.observe(t0, 0, 10), None);
        assert_eq!(w.observe(t0 + 100 * MS, 3000, 10), None);
        assert_eq!(w.observe(t0 + 500 * MS, 3000, 10), None);
        // Forwarding moved on: the clock starts again.
        assert_eq!(w.observe(t0 + 550 * MS, 3000, 11), None);
        assert_eq!(w.observe(t0 + 1000 * MS, 9000, 11), None);
        assert!(matches!(
            w.observe(t0 + 1050 * MS, 9000, 11),
            Some(KillReason::Limit(_))
        ));
        // An empty queue is never a stall, however long nothing moves.
        w.reset();
        for i in 0..100 {
            assert_eq!(w.observe(t0 + i * 100 * MS, 0, 11), None);
        }
    }

    proptest! {
        /// Whatever the DN does, the supervisor kills only a live child, never asks for two
        /// spawns without an exit between them, deletes routes whenever the DN stops being up,
        /// and never waits longer than the cap to start it again.
        #[test]
        fn local_message_decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = LocalMessage::decode(&bytes);
        }

        #[test]
        fn supervision_is_consistent(steps in proptest::collection::vec((0u8..5, 0u64..500), 1..200)) {
            let t0 = Instant::now();
            let policy = RestartPolicy { base: 10 * MS, max: 1000 * MS, healthy_after: 5000 * MS };
            let mut s = Supervisor::new(policy, HealthPolicy { heartbeat_timeout: 100 * MS, startup_grace: 300 * MS }, t0);
            let mut now = t0;
            let mut alive = false;
            let mut announced_up = false;
            for (kind, ms) in steps {
                now += Duration::from_millis(ms);
                let acts = match kind {
                    0 => s.handle_timeout(now),
                    1 => if alive { s.on_heartbeat(now) } else { vec![] },
                    2 => if alive { alive = false; s.on_exit("exited".into(), now) } else { vec![] },
                    3 => s.on_failure(KillReason::Fault("x".into())),
                    _ => match s.poll_timeout() { Some(t) => { now = now.max(t); s.handle_timeout(now) } None => vec![] },
                };
                let killed = acts.iter().any(|a| matches!(a, SupervisorAction::Kill(_)));
                for a in &acts {
                    match a {
                        SupervisorAction::Spawn => { prop_assert!(!alive, "spawned twice"); alive = true; }
                        SupervisorAction::Kill(_) => prop_assert!(alive, "killed a dead child"),
                        SupervisorAction::AnnounceDn { up } => announced_up = *up,
                        SupervisorAction::DeleteRoutes => {}
                    }
                }
                if killed {
                    prop_assert!(acts.contains(&SupervisorAction::DeleteRoutes));
                    // The shell reaps the killed child at once.
                    alive = false;
                    prop_assert_eq!(s.on_exit("killed".into(), now), vec![]);
                }
                if announced_up {
                    let running = matches!(s.state(), ChildState::Running { .. });
                    prop_assert!(running, "announced up while {:?}", s.state());
                }
                if let ChildState::Stopped { restart_at } = s.state() {
                    prop_assert!(restart_at <= now + policy.max);
                }
            }
        }
    }
}
