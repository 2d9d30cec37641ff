//! The simulated cluster: the real EN, DN and failure-detector machines of `proto`, wired to a
//! simulated network, routing plane and clock. Nothing here decides what a machine decides; it
//! only plays the shells' part (delivering messages, performing actions) and the world's (time,
//! latency, loss, deaths, cuts).
//!
//! Time advances in quanta of [`QUANTUM_MS`]. In each quantum: due messages are delivered,
//! machines' timers run, every detector heartbeats its peers, every client with a primary sends
//! one packet (a ping at 100/s), and every `LEARN_MS` each DN reads the routes its routing daemon
//! learned from the others.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use holdfast_proto::cluster::Cluster;
use holdfast_proto::control::Message;
use holdfast_proto::dn::LeaseRecord;
use holdfast_proto::en;
use holdfast_proto::fd::{self, SupervisorAction};
use holdfast_proto::node::{self, NodePolicy, SessionId};
use holdfast_proto::probe::{ProbeConfig, Prober, Verdict};
use holdfast_proto::routes::RouteSpec;
use ipnet::IpNet;

pub const QUANTUM_MS: u64 = 10;
/// How often a DN reads the routes its routing daemon learned (the shell's `HELD_CHECK`).
const LEARN_MS: u64 = 250;
/// A QUIC connection whose peer went silent ends after this long: three keepalive periods, as
/// the client asks.
const IDLE_TIMEOUT_MS: u64 = 75_000;
/// A handshake with a DN that never answers gives up after this long.
const HANDSHAKE_TIMEOUT_MS: u64 = 1_000;
/// The client gives up on an `Attach` unanswered this long (the shell's connect timeout).
const ATTACH_TIMEOUT_MS: u64 = 5_000;
/// A stream frame lost to a broken path is sent again this often while the connection lives.
const RETRANSMIT_MS: u64 = 50;
/// A DN host cut off the network: the edge's OSPF drops its routes after BFD notices.
const BFD_MS: u64 = 150;
const UNIX0: u64 = 1_800_000_000;

/// The network between every two parties: one-way latency and jitter, and datagram loss.
#[derive(Debug, Clone, Copy)]
pub struct Net {
    pub latency_ms: u64,
    pub jitter_ms: u64,
    /// Per mille of data datagrams lost.
    pub loss_per_mille: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Process {
    Running,
    /// Stopped (SIGSTOP) until `until`; its dn-fd kills it when its heartbeats stop.
    Hung {
        until: u64,
    },
    /// Not running; dn-fd starts it again.
    Dead,
}

pub struct SimDn {
    pub name: String,
    key: SigningKey,
    pub process: Process,
    /// Counts starts: a message meant for an earlier process is lost with it.
    pub incarnation: u64,
    /// Cut off every network.
    pub cut: bool,
    cut_at: u64,
    /// Cut off the cluster network only: its clients still reach it, its peers and the edge
    /// do not.
    pub cluster_cut: bool,
    pub machine: Option<node::Machine>,
    /// The lease journal on disk.
    pub journal: Vec<LeaseRecord>,
    /// Routes in the DN's kernel (protocol 200).
    pub routes: Vec<RouteSpec>,
    routes_generation: Option<u64>,
    /// The shell's host table and per-session primary flags.
    pub hosts: BTreeMap<IpAddr, SessionId>,
    pub primary: BTreeSet<SessionId>,
    /// Messages delivered while the process was stopped.
    stalled: Vec<Delivery>,
    pub supervisor: fd::Supervisor,
    pub peers: fd::Peers,
    /// Whether its detector's heartbeats say "my DN is up".
    pub fd_says_up: bool,
    /// What its detector last told this DN about each peer (by cluster index): up or down.
    pub told: BTreeMap<usize, bool>,
    /// The learned routes last given to the machine.
    pub learned: Vec<IpNet>,
    /// The reference model's account of the backed blocks this DN may announce whole: from its
    /// detector saying the owner is down, until the owner is up and no client of the block is
    /// carried here.
    pub may_take_over: BTreeSet<IpNet>,
    /// When its detector last said each peer is up again, after a down the DN holds blocks
    /// through (not after a peer that was only silent: its blocks go back at once).
    pub told_up_at: BTreeMap<usize, u64>,
    /// Peers told down that have only been silent so far.
    pub only_silent: BTreeSet<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conduct {
    Honest,
    /// Holds a valid certificate and misuses it within what that allows.
    Rogue,
}

pub struct SimEn {
    pub identity: String,
    pub machine: en::Machine,
    pub started: bool,
    pub asleep_until: Option<u64>,
    pub conduct: Conduct,
    /// The connection each machine slot refers to.
    pub conns: Vec<Option<ConnId>>,
    /// Where the shell sends traffic.
    pub carrier: Option<usize>,
    /// Every ticket the client was given: (address, expiry).
    pub tickets: Vec<(IpAddr, u64)>,
    /// Extra sessions a rogue client opened outside its machine.
    pub rogue_conns: Vec<ConnId>,
    /// When each link to a DN is back up after a blip.
    pub blip_until: BTreeMap<usize, u64>,
    /// The prober of each slot's session, once it is up.
    pub probers: Vec<Option<Prober>>,
    /// Since when the DN the client sends through has been dead or out of reach.
    pub stranded_since: Option<u64>,
    /// A forged ICMP error about the session to a DN: (DN, the session then, when).
    pub forged: Option<(usize, ConnId, u64)>,
    /// What arrived while it slept.
    held: Vec<Delivery>,
}

pub type ConnId = u64;

#[derive(Debug, Clone)]
pub struct Conn {
    pub en: usize,
    pub dn: usize,
    /// The DN process it reaches.
    pub incarnation: u64,
    /// The client side dropped it.
    pub en_closed: bool,
    /// The DN side ended it.
    pub dn_closed: bool,
    /// When the DN last heard from the client on it (its idle timer).
    pub heard_from_en: u64,
}

#[derive(Debug, Clone)]
enum ToDn {
    Attach(Option<holdfast_proto::lease::LeaseTicket>),
    Data,
    Probe(u32),
    Switch,
    Demote,
    Ended,
}

#[derive(Debug, Clone)]
enum ToEn {
    Connected,
    Message(Box<Message>),
    Lost(en::Loss),
    /// A reply from the server, through whichever DN the edge chose.
    Data,
    Echo(u32),
    /// ICMP port unreachable, from the DN's host (or forged).
    Unreachable,
    /// The shell's deadline for an answer to `Attach`.
    AttachTimeout,
}

#[derive(Debug, Clone)]
enum Delivery {
    ToDn(ConnId, ToDn),
    ToEn(ConnId, ToEn),
    HomeIsBack {
        to: usize,
        from: String,
    },
    Peer {
        to: usize,
        about: usize,
        state: fd::PeerState,
    },
}

pub struct World {
    pub t0: Instant,
    pub now: u64,
    pub cluster: Cluster,
    pub dns: Vec<SimDn>,
    pub ens: Vec<SimEn>,
    pub conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    /// (due, sequence) -> delivery
    queue: BTreeMap<(u64, u64), Delivery>,
    seq: u64,
    /// Last due time per (connection, direction): control streams are ordered.
    stream_due: BTreeMap<(ConnId, bool), u64>,
    pub net: Net,
    rng: u64,
    pub log: Vec<String>,
    /// When something last happened that a client has to recover from.
    pub last_disruption: u64,
}

fn cluster_text(n: usize, keys: &[SigningKey]) -> String {
    let mut text = "[cluster]\nclient_ca = \"ca.pem\"\nclient_routes = [\"10.0.2.0/24\"]\nlease_lifetime_secs = 86400\n".to_owned();
    for (i, key) in keys.iter().enumerate().take(n) {
        let k = i + 1;
        let public = holdfast_proto::lease::encode_key(&key.verifying_key().to_bytes());
        text += &format!(
            "[[dn]]\nname = \"dn{k}\"\nendpoint = \"192.0.2.{k}:4433\"\npool = \"10.20{k}.0.0/24\"\npublic_key = \"{public}\"\n"
        );
    }
    text
}

impl World {
    pub fn new(dns: usize, ens: usize, rogues: usize, net: Net, seed: u64) -> Self {
        let keys: Vec<SigningKey> = (0..dns)
            .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
            .collect();
        let cluster = Cluster::parse(&cluster_text(dns, &keys), Path::new("/"))
            .expect("the simulated cluster's configuration is valid");
        let t0 = Instant::now();
        let names: Vec<String> = cluster.dns.iter().map(|d| d.name.clone()).collect();
        let sim_dns = names
            .iter()
            .zip(keys)
            .map(|(name, key)| SimDn {
                name: name.clone(),
                key,
                process: Process::Dead,
                incarnation: 0,
                cut: false,
                cut_at: 0,
                cluster_cut: false,
                machine: None,
                journal: Vec::new(),
                routes: Vec::new(),
                routes_generation: None,
                hosts: BTreeMap::new(),
                primary: BTreeSet::new(),
                stalled: Vec::new(),
                supervisor: fd::Supervisor::new(
                    fd::RestartPolicy::default(),
                    fd::HealthPolicy::default(),
                    t0,
                ),
                peers: fd::Peers::new(fd::PeerPolicy::default(), dns.saturating_sub(1)),
                fd_says_up: false,
                told: BTreeMap::new(),
                learned: Vec::new(),
                may_take_over: BTreeSet::new(),
                told_up_at: BTreeMap::new(),
                only_silent: BTreeSet::new(),
            })
            .collect();
        let sim_ens = (0..ens + rogues)
            .map(|i| SimEn {
                identity: format!("client{}", i + 1),
                machine: en::Machine::new(names.clone(), seed ^ (i as u64 + 1)),
                started: false,
                asleep_until: None,
                conduct: if i < ens {
                    Conduct::Honest
                } else {
                    Conduct::Rogue
                },
                conns: vec![None; dns],
                carrier: None,
                tickets: Vec::new(),
                rogue_conns: Vec::new(),
                blip_until: BTreeMap::new(),
                probers: vec![None; dns],
                stranded_since: None,
                forged: None,
                held: Vec::new(),
            })
            .collect();
        let mut world = Self {
            t0,
            now: 0,
            cluster,
            dns: sim_dns,
            ens: sim_ens,
            conns: BTreeMap::new(),
            next_conn: 1,
            queue: BTreeMap::new(),
            seq: 0,
            stream_due: BTreeMap::new(),
            net,
            rng: seed | 1,
            log: Vec::new(),
            last_disruption: 0,
        };
        // Every DN starts (its detector's first timeout spawns it).
        world.detectors();
        world
    }

    pub fn instant(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now)
    }

    pub fn unix(&self) -> u64 {
        UNIX0 + self.now / 1000
    }

    fn note(&mut self, text: String) {
        self.log.push(format!("{:>7} ms  {text}", self.now));
    }

    fn random(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn delay(&mut self) -> u64 {
        let jitter = if self.net.jitter_ms == 0 {
            0
        } else {
            self.random() % (self.net.jitter_ms + 1)
        };
        self.net.latency_ms + jitter
    }

    fn schedule(&mut self, due: u64, delivery: Delivery) {
        self.seq += 1;
        self.queue.insert((due, self.seq), delivery);
    }

    /// Sends on a control stream: reliable and in order, so never before the last message on
    /// the same stream.
    fn send_stream(&mut self, conn: ConnId, to_dn: bool, delivery: Delivery) {
        let mut due = self.now + self.delay();
        let last = self.stream_due.entry((conn, to_dn)).or_insert(0);
        due = due.max(*last);
        *last = due;
        self.schedule(due, delivery);
    }

    /// Whether a datagram between client `en` and DN `dn` can cross the network now.
    pub fn path_up(&self, en: usize, dn: usize) -> bool {
        let e = &self.ens[en];
        !self.dns[dn].cut
            && e.asleep_until.is_none()
            && e.blip_until.get(&dn).is_none_or(|t| *t <= self.now)
    }

    pub fn dn_running(&self, dn: usize) -> bool {
        self.dns[dn].process == Process::Running
    }

    // --- the steps a scenario takes -------------------------------------------------------

    pub fn start_client(&mut self, en: usize) {
        if self.ens[en].started {
            return;
        }
        self.ens[en].started = true;
        if self.ens[en].conduct == Conduct::Honest {
            self.last_disruption = self.now;
        }
        let id = self.ens[en].identity.clone();
        self.note(format!("{id} starts"));
        let actions = self.ens[en].machine.start();
        self.perform_en(en, actions);
    }

    /// SIGKILL of DN `dn`'s process.
    pub fn kill(&mut self, dn: usize) {
        if self.dns[dn].process == Process::Dead {
            return;
        }
        self.note(format!("{} killed", self.dns[dn].name));
        self.last_disruption = self.now;
        self.process_died(dn, "killed by signal 9");
    }

    /// SIGSTOP of DN `dn`'s process for `ms`.
    pub fn hang(&mut self, dn: usize, ms: u64) {
        if self.dns[dn].process != Process::Running {
            return;
        }
        self.note(format!("{} stopped for {ms} ms", self.dns[dn].name));
        self.last_disruption = self.now;
        self.dns[dn].process = Process::Hung {
            until: self.now + ms,
        };
    }

    /// DN `dn`'s host loses (or regains) every network.
    pub fn cut(&mut self, dn: usize, cut: bool) {
        if self.dns[dn].cut == cut {
            return;
        }
        let what = if cut {
            "cut off"
        } else {
            "back on the network"
        };
        self.note(format!("{} {what}", self.dns[dn].name));
        self.last_disruption = self.now;
        self.dns[dn].cut = cut;
        if cut {
            self.dns[dn].cut_at = self.now;
            let conns: Vec<ConnId> = self
                .conns
                .iter()
                .filter(|(_, c)| c.dn == dn && !c.en_closed)
                .map(|(id, _)| *id)
                .collect();
            for id in conns {
                // The client's prober notices; the DN only at its idle timeout.
                self.dn_times_out(id);
            }
        }
    }

    /// DN `dn` loses (or regains) the cluster network only: the detectors and the routing
    /// plane lose it, its clients do not.
    pub fn cut_cluster(&mut self, dn: usize, cut: bool) {
        if self.dns[dn].cluster_cut == cut {
            return;
        }
        let what = if cut {
            "cut from the cluster network"
        } else {
            "back on the cluster network"
        };
        self.note(format!("{} {what}", self.dns[dn].name));
        self.last_disruption = self.now;
        self.dns[dn].cluster_cut = cut;
        if cut {
            self.dns[dn].cut_at = self.now;
        }
    }

    /// Whether DN `dn` is off the cluster network (its host cut, or only that link).
    fn off_cluster(&self, dn: usize) -> bool {
        self.dns[dn].cut || self.dns[dn].cluster_cut
    }

    /// The path between client `en` and DN `dn` fails for `ms`; neither end is told.
    pub fn blip(&mut self, en: usize, dn: usize, ms: u64) {
        if !self.ens[en].started {
            return;
        }
        self.note(format!(
            "{} <-> {} down for {ms} ms",
            self.ens[en].identity, self.dns[dn].name
        ));
        if self.ens[en].conduct == Conduct::Honest {
            self.last_disruption = self.now;
        }
        self.ens[en].blip_until.insert(dn, self.now + ms);
        if let Some(id) = self.ens[en].conns[dn] {
            // The client's prober notices; the DN only at its idle timeout.
            self.dn_times_out(id);
        }
    }

    /// Client `en` stops (a closed laptop lid) for `ms`.
    pub fn sleep(&mut self, en: usize, ms: u64) {
        if !self.ens[en].started || self.ens[en].asleep_until.is_some() {
            return;
        }
        self.note(format!("{} sleeps for {ms} ms", self.ens[en].identity));
        self.ens[en].asleep_until = Some(self.now + ms);
        if self.ens[en].conduct == Conduct::Honest {
            self.last_disruption = self.now;
        }
        let conns: Vec<ConnId> = self.ens[en].conns.iter().flatten().copied().collect();
        for id in conns {
            // The DN side times out; the client finds its sessions dead when it wakes.
            self.dn_times_out(id);
        }
    }

    /// A rogue client sends a packet through its session to `dn`, whatever its machine says.
    pub fn rogue_data(&mut self, en: usize, dn: usize) {
        if let Some(conn) = self.ens[en].conns[dn] {
            self.note(format!(
                "{} (rogue) sends through {}",
                self.ens[en].identity, self.dns[dn].name
            ));
            self.send_data(conn);
        }
    }

    /// A rogue client tells `dn` it moved away, whatever its machine says.
    pub fn rogue_demote(&mut self, en: usize, dn: usize) {
        if let Some(conn) = self.ens[en].conns[dn] {
            self.note(format!(
                "{} (rogue) demotes {}",
                self.ens[en].identity, self.dns[dn].name
            ));
            self.send_stream(conn, true, Delivery::ToDn(conn, ToDn::Demote));
        }
    }

    /// A rogue client opens another session to `dn` for its address and sends through it.
    pub fn rogue_reattach(&mut self, en: usize, dn: usize) {
        let Some(lease) = self.ens[en].machine.lease() else {
            return;
        };
        if !self.path_up(en, dn) || !self.dn_running(dn) {
            return;
        }
        let ticket = lease.ticket.clone();
        let conn = self.open_conn(en, dn);
        self.note(format!(
            "{} (rogue) opens a second session to {}",
            self.ens[en].identity, self.dns[dn].name
        ));
        self.ens[en].rogue_conns.push(conn);
        self.send_stream(conn, true, Delivery::ToDn(conn, ToDn::Attach(Some(ticket))));
        self.send_data(conn);
    }

    /// Lets `ms` pass, quantum by quantum.
    pub fn run(
        &mut self,
        ms: u64,
        mut check: impl FnMut(&World) -> Result<(), String>,
    ) -> Result<(), String> {
        let end = self.now + ms;
        while self.now < end {
            self.quantum(self.now + QUANTUM_MS);
            check(self)?;
        }
        Ok(())
    }

    /// Ends every fault: hosts back on the network, clients awake, links up.
    pub fn heal(&mut self) {
        for dn in 0..self.dns.len() {
            self.cut(dn, false);
            self.cut_cluster(dn, false);
            if let Process::Hung { .. } = self.dns[dn].process {
                self.dns[dn].process = Process::Hung { until: self.now };
            }
        }
        for en in &mut self.ens {
            en.blip_until.clear();
            if let Some(t) = &mut en.asleep_until {
                *t = (*t).min(self.now);
            }
        }
    }

    // --- one quantum ----------------------------------------------------------------------

    /// Runs the world up to `end`. Deliveries and probers act at their own millisecond, the
    /// rest (detectors, timers, traffic) once a quantum.
    fn quantum(&mut self, end: u64) {
        for spin in 0.. {
            let delivery = self
                .queue
                .keys()
                .next()
                .copied()
                .filter(|(due, _)| *due <= end);
            let probe = self.next_prober_due().filter(|(due, ..)| *due <= end);
            assert!(
                spin < 100_000,
                "the simulation spins at {} ms: next delivery {:?} {:?}, next probe {:?} {:?}",
                self.now,
                delivery,
                delivery.and_then(|k| self.queue.get(&k)),
                probe,
                probe.map(|(_, e, d)| (
                    self.ens[e].probers[d].clone(),
                    self.ens[e].probers[d]
                        .as_ref()
                        .and_then(|p| p.poll_timeout())
                        .map(|t| t.saturating_duration_since(self.t0)),
                    self.ens[e].started,
                    self.ens[e].asleep_until
                ))
            );
            match (delivery, probe) {
                (Some((due, seq)), p) if p.is_none_or(|(pd, ..)| due <= pd) => {
                    self.now = self.now.max(due);
                    if let Some(d) = self.queue.remove(&(due, seq)) {
                        self.deliver(d);
                    }
                }
                (_, Some((due, en, d))) => {
                    self.now = self.now.max(due);
                    self.poll_prober(en, d);
                }
                _ => break,
            }
        }
        self.now = end;
        self.wake_and_resume();
        self.detectors();
        self.timers();
        if self.now.is_multiple_of(LEARN_MS) {
            for dn in 0..self.dns.len() {
                self.learn(dn);
            }
        }
        self.traffic();
        self.follow_stranded();
        self.settle_reference();
    }

    /// The earliest prober timeout among awake clients: (ms, client, DN).
    fn next_prober_due(&self) -> Option<(u64, usize, usize)> {
        let mut best: Option<(u64, usize, usize)> = None;
        for (en, e) in self.ens.iter().enumerate() {
            if !e.started || e.asleep_until.is_some() {
                continue;
            }
            for (d, p) in e.probers.iter().enumerate() {
                let Some(at) = p.as_ref().and_then(|p| p.poll_timeout()) else {
                    continue;
                };
                // Rounded up to the millisecond, and never in the past.
                let ms = at
                    .saturating_duration_since(self.t0)
                    .as_nanos()
                    .div_ceil(1_000_000) as u64;
                let ms = ms.max(self.now);
                if best.is_none_or(|(b, ..)| ms < b) {
                    best = Some((ms, en, d));
                }
            }
        }
        best
    }

    /// Does what client `en`'s prober of its session to `d` decides now.
    fn poll_prober(&mut self, en: usize, d: usize) {
        let now = self.instant();
        while let Some(p) = self.ens[en].probers[d].as_mut() {
            match p.poll(now) {
                Verdict::Wait => break,
                Verdict::Send(seq) => {
                    if let Some(conn) = self.ens[en].conns[d] {
                        if self.path_up(en, d) {
                            let due = self.now + self.delay();
                            self.schedule(due, Delivery::ToDn(conn, ToDn::Probe(seq)));
                        }
                    }
                }
                Verdict::Dead { silence } => {
                    let srtt = p.srtt();
                    let label = format!(
                        "{}'s prober gives {} up after {silence:?} (srtt {srtt:?})",
                        self.ens[en].identity, self.dns[d].name
                    );
                    self.note(label);
                    if let Some(conn) = self.ens[en].conns[d].take() {
                        self.en_drops(conn);
                    }
                    self.ens[en].probers[d] = None;
                    let actions = self.ens[en]
                        .machine
                        .handle(en::Event::Lost(d, en::Loss::ProbeTimeout), now);
                    self.perform_en(en, actions);
                    break;
                }
            }
        }
    }

    /// Whether client `en`'s session to `dn` reaches a live process of that DN.
    pub fn session_alive(&self, en: usize, dn: usize) -> bool {
        let Some(conn) = self.ens[en].conns[dn] else {
            return false;
        };
        let c = &self.conns[&conn];
        self.dn_running(dn)
            && self.path_up(en, dn)
            && c.incarnation == self.dns[dn].incarnation
            && !c.dn_closed
    }

    fn follow_stranded(&mut self) {
        for en in 0..self.ens.len() {
            let e = &self.ens[en];
            let stranded = e.started
                && e.asleep_until.is_none()
                && e.carrier.is_some_and(|d| !self.session_alive(en, d));
            let since = if stranded {
                Some(e.stranded_since.unwrap_or(self.now))
            } else {
                None
            };
            self.ens[en].stranded_since = since;
        }
    }

    /// Someone forges an ICMP "port unreachable" quoting client `en`'s session to `dn`.
    pub fn forge_unreachable(&mut self, en: usize, dn: usize) {
        let e = &self.ens[en];
        let (true, None, Some(conn)) = (e.started, e.asleep_until, e.conns[dn]) else {
            return;
        };
        self.note(format!(
            "forged ICMP unreachable to {} about {}",
            self.ens[en].identity, self.dns[dn].name
        ));
        // Only an established session is promised to survive it; an attempt under way may end.
        if matches!(
            self.ens[en].machine.state(dn),
            Some(en::SessionState::Up(_))
        ) {
            self.ens[en].forged = Some((dn, conn, self.now));
        }
        let now = self.instant();
        let actions = self.ens[en].machine.handle(en::Event::Unreachable(dn), now);
        self.perform_en(en, actions);
    }

    /// The primary sessions DN `dn` carries, by address, as its shell knows them.
    pub fn primaries(&self, dn: usize) -> BTreeMap<IpAddr, SessionId> {
        let d = &self.dns[dn];
        d.hosts
            .iter()
            .filter(|(_, s)| d.primary.contains(s))
            .map(|(a, s)| (*a, *s))
            .collect()
    }

    fn settle_reference(&mut self) {
        for dn in 0..self.dns.len() {
            let carried: Vec<IpAddr> = self.primaries(dn).into_keys().collect();
            let d = &self.dns[dn];
            let owner = |block: &IpNet| {
                self.cluster
                    .dns
                    .iter()
                    .position(|o| o.plan.pool.contains(block))
            };
            let owner_down =
                |block: &IpNet| owner(block).is_some_and(|o| d.told.get(&o) == Some(&false));
            // Its clients have the homecoming period to leave before the block is let go of.
            let homecoming = NodePolicy::default().homecoming.as_millis() as u64;
            let coming_home = |block: &IpNet| {
                owner(block)
                    .and_then(|o| d.told_up_at.get(&o))
                    .is_some_and(|t| self.now < t + homecoming)
            };
            let keep: BTreeSet<IpNet> = d
                .may_take_over
                .iter()
                .filter(|b| {
                    owner_down(b) || (coming_home(b) && carried.iter().any(|a| b.contains(a)))
                })
                .copied()
                .collect();
            self.dns[dn].may_take_over = keep;
        }
    }

    fn wake_and_resume(&mut self) {
        for en in 0..self.ens.len() {
            if self.ens[en].asleep_until.is_some_and(|t| t <= self.now) {
                self.ens[en].asleep_until = None;
                if self.ens[en].conduct == Conduct::Honest {
                    self.last_disruption = self.now;
                }
                let id = self.ens[en].identity.clone();
                self.note(format!("{id} wakes"));
                // It reads what arrived meanwhile; its probers find out the rest.
                for d in std::mem::take(&mut self.ens[en].held) {
                    self.deliver(d);
                }
            }
        }
        for dn in 0..self.dns.len() {
            if let Process::Hung { until } = self.dns[dn].process {
                if until <= self.now {
                    self.dns[dn].process = Process::Running;
                    self.note(format!("{} resumes", self.dns[dn].name));
                    let stalled = std::mem::take(&mut self.dns[dn].stalled);
                    for d in stalled {
                        self.deliver(d);
                    }
                }
            }
        }
    }

    fn timers(&mut self) {
        let now = self.instant();
        for en in 0..self.ens.len() {
            if !self.ens[en].started || self.ens[en].asleep_until.is_some() {
                continue;
            }
            if self.ens[en]
                .machine
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                let actions = self.ens[en].machine.handle_timeout(now);
                self.perform_en(en, actions);
            }
        }
        for dn in 0..self.dns.len() {
            if !self.dn_running(dn) {
                continue;
            }
            let due = self.dns[dn]
                .machine
                .as_ref()
                .and_then(|m| m.poll_timeout())
                .is_some_and(|t| t <= now);
            if due {
                let unix = self.unix();
                let actions = match self.dns[dn].machine.as_mut() {
                    Some(m) => m.handle_timeout(now, unix),
                    None => Vec::new(),
                };
                self.perform_dn(dn, actions);
            }
        }
    }

    /// Each client with a primary sends one packet through it.
    fn traffic(&mut self) {
        for en in 0..self.ens.len() {
            let e = &self.ens[en];
            if !e.started || e.asleep_until.is_some() {
                continue;
            }
            if let Some(d) = e.carrier {
                if let Some(conn) = e.conns[d] {
                    let now = self.instant();
                    if let Some(p) = self.ens[en].probers[d].as_mut() {
                        p.on_sent(now);
                    }
                    self.send_data(conn);
                }
            }
        }
    }

    fn send_data(&mut self, conn: ConnId) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if c.en_closed || !self.path_up(c.en, c.dn) {
            return;
        }
        if (self.random() % 1000) < u64::from(self.net.loss_per_mille) {
            return;
        }
        let due = self.now + self.delay();
        self.schedule(due, Delivery::ToDn(conn, ToDn::Data));
    }

    // --- the failure detectors ------------------------------------------------------------

    fn detectors(&mut self) {
        let now = self.instant();
        let n = self.dns.len();
        for dn in 0..n {
            // The DN heartbeats its detector while it runs.
            let mut actions = if self.dn_running(dn) {
                self.dns[dn].supervisor.on_heartbeat(now)
            } else {
                Vec::new()
            };
            if self.dns[dn]
                .supervisor
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                actions.extend(self.dns[dn].supervisor.handle_timeout(now));
            }
            self.perform_supervisor(dn, actions);
        }
        // Detectors heartbeat each other over the cluster network.
        for to in 0..n {
            for from in 0..n {
                if from == to || self.off_cluster(from) || self.off_cluster(to) {
                    continue;
                }
                let up = self.dns[from].fd_says_up;
                let index = peer_index(to, from);
                if let Some(change) = self.dns[to].peers.on_heartbeat(index, up, now) {
                    self.tell_dn_peer(to, from, change.tells_dn());
                }
            }
            let changes = self.dns[to].peers.handle_timeout(now);
            for change in changes {
                let from = peer_of(to, change.peer);
                self.tell_dn_peer(to, from, change.tells_dn());
            }
        }
    }

    fn tell_dn_peer(&mut self, to: usize, about: usize, news: Option<fd::PeerState>) {
        let Some(state) = news else {
            return;
        };
        if let Process::Hung { .. } = self.dns[to].process {
            self.dns[to]
                .stalled
                .push(Delivery::Peer { to, about, state });
            return;
        }
        if !self.dn_running(to) {
            return;
        }
        let up = state.is_up();
        let d = &mut self.dns[to];
        let was_down = d.told.get(&about) == Some(&false);
        d.told.insert(about, up);
        match state {
            fd::PeerState::Silent if !was_down => {
                d.only_silent.insert(about);
            }
            fd::PeerState::DnDown => {
                d.only_silent.remove(&about);
            }
            _ => {}
        }
        if up {
            if was_down && d.only_silent.remove(&about) {
                d.told_up_at.remove(&about);
            } else {
                d.told_up_at.insert(about, self.now);
            }
        } else {
            let me = self.dns[to].name.clone();
            let backed: Vec<IpNet> = self.cluster.dns[about]
                .plan
                .blocks
                .iter()
                .filter(|b| b.backup.as_deref() == Some(me.as_str()))
                .map(|b| b.net)
                .collect();
            self.dns[to].may_take_over.extend(backed);
        }
        let event = node::Event::Peer {
            dn: self.dns[about].name.clone(),
            state,
        };
        self.dn_event(to, event);
    }

    fn perform_supervisor(&mut self, dn: usize, actions: Vec<SupervisorAction>) {
        for action in actions {
            match action {
                SupervisorAction::Spawn => self.spawn(dn),
                SupervisorAction::Kill(reason) => {
                    self.note(format!(
                        "{}'s detector kills it: {reason}",
                        self.dns[dn].name
                    ));
                    self.process_died(dn, "killed by its detector");
                }
                SupervisorAction::DeleteRoutes => {
                    self.dns[dn].routes.clear();
                }
                SupervisorAction::AnnounceDn { up } => self.dns[dn].fd_says_up = up,
            }
        }
    }

    fn spawn(&mut self, dn: usize) {
        let d = &mut self.dns[dn];
        d.incarnation += 1;
        d.process = Process::Running;
        d.hosts.clear();
        d.primary.clear();
        d.told.clear();
        d.may_take_over.clear();
        d.told_up_at.clear();
        d.only_silent.clear();
        d.stalled.clear();
        d.routes_generation = None;
        let records = d.journal.clone();
        let unix = UNIX0 + self.now / 1000;
        let machine = node::Machine::new(
            &self.cluster,
            &d.name.clone(),
            d.key.clone(),
            records,
            NodePolicy::default(),
            unix,
        )
        .expect("every simulated DN is in the cluster");
        d.machine = Some(machine);
        let name = d.name.clone();
        self.note(format!(
            "{name} starts (process {})",
            self.dns[dn].incarnation
        ));
        // The shell reads the kernel's learned routes before it installs its own.
        let learned = self.learned_by(dn);
        self.dns[dn].learned = learned.clone();
        self.dn_event(dn, node::Event::Learned(learned));
        let actions = match self.dns[dn].machine.as_mut() {
            Some(m) => m.start(),
            None => Vec::new(),
        };
        self.perform_dn(dn, actions);
        // Its detector tells the new process which peers are down.
        for peer in 0..self.dns.len() {
            if peer == dn {
                continue;
            }
            let state = self.dns[dn].peers.state(peer_index(dn, peer));
            if matches!(state, Some(fd::PeerState::Silent | fd::PeerState::DnDown)) {
                self.tell_dn_peer(dn, peer, state);
            }
        }
    }

    fn process_died(&mut self, dn: usize, how: &str) {
        let d = &mut self.dns[dn];
        d.process = Process::Dead;
        d.machine = None;
        d.stalled.clear();
        d.hosts.clear();
        d.primary.clear();
        let incarnation = d.incarnation;
        let now = self.instant();
        let actions = self.dns[dn].supervisor.on_exit(how.to_owned(), now);
        self.perform_supervisor(dn, actions);
        // The kernel deletes nothing by itself, but the detector just did (DeleteRoutes); when
        // the detector itself did the kill its actions ran before this.
        self.dns[dn].routes.clear();
        // Every client of the dead process notices: its port answers unreachable or its
        // probes go unanswered.
        let conns: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.dn == dn && c.incarnation == incarnation && !c.dn_closed)
            .map(|(id, _)| *id)
            .collect();
        // Their clients find out from the cluster, from their probes, or from the port
        // answering "unreachable" to what they send.
        for id in conns {
            if let Some(c) = self.conns.get_mut(&id) {
                c.dn_closed = true;
            }
        }
    }

    // --- the routing plane ----------------------------------------------------------------

    /// Whether the edge (and the other DNs) see DN `dn`'s routes.
    pub fn routes_visible(&self, dn: usize) -> bool {
        !self.off_cluster(dn) || self.now < self.dns[dn].cut_at + BFD_MS
    }

    /// The routes DN `dn`'s routing daemon learned from the others.
    fn learned_by(&self, dn: usize) -> Vec<IpNet> {
        if !self.routes_visible(dn) {
            return Vec::new();
        }
        let mut out: Vec<IpNet> = (0..self.dns.len())
            .filter(|&o| o != dn && self.routes_visible(o))
            .flat_map(|o| self.dns[o].routes.iter().map(|r| r.net))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn learn(&mut self, dn: usize) {
        if !self.dn_running(dn) || self.dns[dn].machine.is_none() {
            return;
        }
        let learned = self.learned_by(dn);
        if learned == self.dns[dn].learned {
            return;
        }
        self.dns[dn].learned = learned.clone();
        self.dn_event(dn, node::Event::Learned(learned));
    }

    /// Where the edge sends packets for `address`: the DNs whose visible route for it wins
    /// (longest prefix, then lowest metric).
    pub fn edge_next_hops(&self, address: IpAddr) -> Vec<usize> {
        let mut best: Option<(u8, u32)> = None;
        let mut hops = Vec::new();
        for (i, d) in self.dns.iter().enumerate() {
            if !self.routes_visible(i) {
                continue;
            }
            for r in &d.routes {
                if !r.net.contains(&address) {
                    continue;
                }
                let rank = (r.net.prefix_len(), u32::MAX - r.metric);
                match best {
                    Some(b) if rank < b => {}
                    Some(b) if rank == b => hops.push(i),
                    _ => {
                        best = Some(rank);
                        hops = vec![i];
                    }
                }
            }
        }
        hops.sort();
        hops.dedup();
        hops
    }

    // --- connections ----------------------------------------------------------------------

    fn open_conn(&mut self, en: usize, dn: usize) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(
            id,
            Conn {
                en,
                dn,
                incarnation: self.dns[dn].incarnation,
                en_closed: false,
                dn_closed: false,
                heard_from_en: self.now,
            },
        );
        id
    }

    fn dn_times_out(&mut self, id: ConnId) {
        let due = self.now + IDLE_TIMEOUT_MS;
        self.schedule(due, Delivery::ToDn(id, ToDn::Ended));
    }

    /// The client dropped the connection: its close reaches the DN if the path is up,
    /// otherwise the DN's idle timeout ends it.
    fn en_drops(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.en_closed {
            return;
        }
        c.en_closed = true;
        let (en, dn) = (c.en, c.dn);
        if self.path_up(en, dn) {
            self.send_stream(id, true, Delivery::ToDn(id, ToDn::Ended));
        } else {
            self.dn_times_out(id);
        }
    }

    // --- deliveries -----------------------------------------------------------------------

    fn deliver(&mut self, delivery: Delivery) {
        match delivery {
            Delivery::ToDn(conn, what) => self.deliver_to_dn(conn, what),
            Delivery::ToEn(conn, what) => self.deliver_to_en(conn, what),
            Delivery::Peer { to, about, state } => self.tell_dn_peer(to, about, Some(state)),
            Delivery::HomeIsBack { to, from } => {
                if self.dn_running(to) && !self.dns[to].cut {
                    self.dn_event(to, node::Event::HomeIsBack { from });
                } else if let Process::Hung { .. } = self.dns[to].process {
                    self.dns[to].stalled.push(Delivery::HomeIsBack { to, from });
                }
            }
        }
    }

    fn deliver_to_dn(&mut self, conn: ConnId, what: ToDn) {
        let Some(c) = self.conns.get(&conn).cloned() else {
            return;
        };
        let ended = matches!(what, ToDn::Ended);
        // A timeout is the DN's own doing; anything else must cross the network. Stream frames
        // are sent again until the path is back, while the connection lives.
        if !ended && !self.path_up(c.en, c.dn) {
            if matches!(what, ToDn::Attach(_) | ToDn::Demote | ToDn::Switch)
                && !c.en_closed
                && !c.dn_closed
            {
                let due = self.now + RETRANSMIT_MS;
                self.schedule(due, Delivery::ToDn(conn, what));
            }
            return;
        }
        if matches!(what, ToDn::Data | ToDn::Probe(_)) {
            if let Some(c) = self.conns.get_mut(&conn) {
                c.heard_from_en = self.now;
            }
            if self.answer_for_gone_session(conn, &c) {
                return;
            }
        }
        let d = &self.dns[c.dn];
        if c.incarnation != d.incarnation || d.process == Process::Dead {
            return;
        }
        if let Process::Hung { .. } = d.process {
            self.dns[c.dn].stalled.push(Delivery::ToDn(conn, what));
            return;
        }
        if c.dn_closed {
            return;
        }
        if let ToDn::Probe(seq) = what {
            let due = self.now + self.delay();
            self.schedule(due, Delivery::ToEn(conn, ToEn::Echo(seq)));
            return;
        }
        let event = match what {
            ToDn::Attach(ticket) => node::Event::Attach {
                session: conn,
                identity: self.ens[c.en].identity.clone(),
                ticket,
            },
            ToDn::Probe(_) => return,
            ToDn::Data => {
                self.reply(c.en);
                if self.dns[c.dn].primary.contains(&conn) {
                    return;
                }
                node::Event::Data(conn)
            }
            ToDn::Demote => node::Event::Demote(conn),
            ToDn::Switch => node::Event::Switch(conn),
            ToDn::Ended => {
                // The idle timer runs from the last thing heard.
                let idle_until = c.heard_from_en + IDLE_TIMEOUT_MS;
                if !c.en_closed && idle_until > self.now {
                    self.schedule(idle_until, Delivery::ToDn(conn, ToDn::Ended));
                    return;
                }
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.dn_closed = true;
                }
                node::Event::Ended(conn)
            }
        };
        self.dn_event(c.dn, event);
    }

    /// A datagram for a session the DN no longer has: a restarted DN (same stateless-reset key)
    /// resets the connection, a DN whose process is gone has its host answer "unreachable".
    /// Says whether the datagram ended there.
    fn answer_for_gone_session(&mut self, conn: ConnId, c: &Conn) -> bool {
        let d = &self.dns[c.dn];
        let answer = if d.process == Process::Dead {
            ToEn::Unreachable
        } else if d.process == Process::Running && (c.incarnation != d.incarnation || c.dn_closed) {
            ToEn::Lost(en::Loss::Closed("stateless reset".into()))
        } else {
            return false;
        };
        let due = self.now + self.delay();
        self.schedule(due, Delivery::ToEn(conn, answer));
        true
    }

    /// The server answers client `en`'s packet; the edge picks the DN, which forwards it on
    /// whatever session it holds for the address.
    fn reply(&mut self, en: usize) {
        let Some(address) = self.ens[en].machine.lease().map(|l| l.ticket.claim.address) else {
            return;
        };
        let Some(&hop) = self.edge_next_hops(address).first() else {
            return;
        };
        if !self.dn_running(hop) {
            return;
        }
        let Some(&session) = self.dns[hop].hosts.get(&address) else {
            return;
        };
        let Some(c) = self.conns.get(&session) else {
            return;
        };
        if c.en_closed || !self.path_up(c.en, hop) {
            return;
        }
        if (self.random() % 1000) < u64::from(self.net.loss_per_mille) {
            return;
        }
        let due = self.now + 2 * self.delay();
        self.schedule(due, Delivery::ToEn(session, ToEn::Data));
    }

    fn deliver_to_en(&mut self, conn: ConnId, what: ToEn) {
        let Some(c) = self.conns.get(&conn).cloned() else {
            return;
        };
        let en = c.en;
        if !self.ens[en].started {
            return;
        }
        // A stopped process finds what arrived meanwhile when it runs again.
        if self.ens[en].asleep_until.is_some() {
            self.ens[en].held.push(Delivery::ToEn(conn, what));
            return;
        }
        // Reports about a connection the client has since replaced are dropped, as the shell's
        // generation check does.
        if self.ens[en].conns[c.dn] != Some(conn) {
            return;
        }
        if matches!(what, ToEn::Message(_)) && !self.path_up(en, c.dn) {
            let due = self.now + RETRANSMIT_MS;
            self.schedule(due, Delivery::ToEn(conn, what));
            return;
        }
        let d = c.dn;
        let now = self.instant();
        let event = match what {
            ToEn::Connected => en::Event::Connected(d),
            ToEn::Lost(loss) => {
                self.ens[en].conns[d] = None;
                self.ens[en].probers[d] = None;
                self.en_drops(conn);
                en::Event::Lost(d, loss)
            }
            ToEn::Data => {
                if let Some(p) = self.ens[en].probers[d].as_mut() {
                    p.on_traffic(now);
                }
                return;
            }
            ToEn::Echo(seq) => {
                if let Some(p) = self.ens[en].probers[d].as_mut() {
                    p.on_echo(seq, now);
                }
                return;
            }
            ToEn::Unreachable => en::Event::Unreachable(d),
            ToEn::AttachTimeout => {
                if self.ens[en].machine.state(d) != Some(&en::SessionState::Attaching) {
                    return;
                }
                self.ens[en].conns[d] = None;
                self.en_drops(conn);
                en::Event::Lost(d, en::Loss::Closed("no answer to Attach".into()))
            }
            ToEn::Message(m) => match *m {
                Message::Leased(lease) => {
                    let rtt = Duration::from_millis(2 * self.net.latency_ms);
                    self.ens[en].probers[d] =
                        Some(Prober::new(ProbeConfig::default(), now, Some(rtt)));
                    let ticket = (lease.ticket.claim.address, lease.ticket.claim.expires_at);
                    let actions = self.ens[en]
                        .machine
                        .handle(en::Event::Leased(d, Box::new(lease)), now);
                    // The client holds what its machine took.
                    let held = self.ens[en].machine.lease().map(|l| l.ticket.claim.address);
                    if held == Some(ticket.0) && !self.ens[en].tickets.contains(&ticket) {
                        self.ens[en].tickets.push(ticket);
                    }
                    self.perform_en(en, actions);
                    return;
                }
                Message::Refused { code, .. } => {
                    self.ens[en].conns[d] = None;
                    self.ens[en].probers[d] = None;
                    self.en_drops(conn);
                    en::Event::Refused(d, code)
                }
                Message::HomeIsBack => en::Event::HomeIsBack(d),
                Message::Drain => en::Event::Drain(d, true),
                Message::Undrain => en::Event::Drain(d, false),
                Message::PeerDown { dn } => {
                    let Some(index) = self.dns.iter().position(|x| x.name == dn) else {
                        return;
                    };
                    en::Event::PeerDown(index)
                }
                Message::Promoted | Message::Attach { .. } | Message::Demote | Message::Switch => {
                    return
                }
            },
        };
        let label = format!("{} <- {event:?}", self.ens[en].identity);
        if !matches!(event, en::Event::Leased(..)) {
            self.note(label);
        }
        let actions = self.ens[en].machine.handle(event, now);
        self.perform_en(en, actions);
    }

    fn perform_en(&mut self, en: usize, actions: Vec<en::Action>) {
        for action in actions {
            match action {
                en::Action::Connect(d) => {
                    let label = format!(
                        "{} connects to {} (path up {}, running {})",
                        self.ens[en].identity,
                        self.dns[d].name,
                        self.path_up(en, d),
                        self.dn_running(d)
                    );
                    self.note(label);
                    self.ens[en].probers[d] = None;
                    if let Some(old) = self.ens[en].conns[d].take() {
                        self.en_drops(old);
                    }
                    let conn = self.open_conn(en, d);
                    self.ens[en].conns[d] = Some(conn);
                    if self.path_up(en, d) && self.dn_running(d) {
                        let due = self.now + 2 * self.delay();
                        self.schedule(due, Delivery::ToEn(conn, ToEn::Connected));
                    } else {
                        let due = self.now + HANDSHAKE_TIMEOUT_MS;
                        let loss = en::Loss::ConnectFailed("no answer".into());
                        self.schedule(due, Delivery::ToEn(conn, ToEn::Lost(loss)));
                    }
                }
                en::Action::Attach(d, ticket) => {
                    if let Some(conn) = self.ens[en].conns[d] {
                        self.send_stream(conn, true, Delivery::ToDn(conn, ToDn::Attach(ticket)));
                        let due = self.now + ATTACH_TIMEOUT_MS;
                        self.schedule(due, Delivery::ToEn(conn, ToEn::AttachTimeout));
                    }
                }
                en::Action::Configure(lease) => {
                    let id = self.ens[en].identity.clone();
                    self.note(format!(
                        "{id} configured with {}",
                        lease.ticket.claim.address
                    ));
                }
                en::Action::UsePrimary(p) => {
                    self.ens[en].carrier = p;
                    let id = self.ens[en].identity.clone();
                    let name = p.map_or("none".to_owned(), |d| self.dns[d].name.clone());
                    self.note(format!("{id} sends through {name}"));
                }
                en::Action::Close(d) => {
                    self.ens[en].probers[d] = None;
                    if let Some(conn) = self.ens[en].conns[d].take() {
                        self.en_drops(conn);
                    }
                }
                en::Action::CheckNow(d) => {
                    let now = self.instant();
                    if let Some(p) = self.ens[en].probers[d].as_mut() {
                        p.on_hint(now);
                    }
                    // The shell wakes the probing task at once.
                    self.poll_prober(en, d);
                }
                en::Action::Reprobe(d) => {
                    let now = self.instant();
                    if let Some(p) = self.ens[en].probers[d].as_mut() {
                        p.on_path_change(now);
                    }
                    self.poll_prober(en, d);
                }
                en::Action::Switch(d) => {
                    if let Some(conn) = self.ens[en].conns[d] {
                        self.send_stream(conn, true, Delivery::ToDn(conn, ToDn::Switch));
                    }
                }
                en::Action::Demote(d) => {
                    if let Some(conn) = self.ens[en].conns[d] {
                        self.send_stream(conn, true, Delivery::ToDn(conn, ToDn::Demote));
                    }
                }
                // The simulation carries no payload to send again; resent packets would be
                // data to the new primary, which the `Switch` just before has already told.
                en::Action::Resend { .. } => {}
            }
        }
    }

    fn dn_event(&mut self, dn: usize, event: node::Event) {
        let now = self.instant();
        let unix = self.unix();
        let actions = match self.dns[dn].machine.as_mut() {
            Some(m) => m.handle(event, now, unix),
            None => return,
        };
        self.perform_dn(dn, actions);
        // The reference follows every event, as the machine does.
        self.settle_reference();
    }

    fn perform_dn(&mut self, dn: usize, actions: Vec<node::Action>) {
        for action in actions {
            match action {
                node::Action::Record(r) => self.dns[dn].journal.push(r),
                node::Action::Send(session, message) => {
                    if self.conns.get(&session).is_some_and(|c| c.dn == dn) {
                        self.send_stream(
                            session,
                            false,
                            Delivery::ToEn(session, ToEn::Message(Box::new(message))),
                        );
                    }
                }
                node::Action::Close(session, reason) => {
                    let Some(c) = self.conns.get_mut(&session) else {
                        continue;
                    };
                    c.dn_closed = true;
                    let en = c.en;
                    if self.path_up(en, dn) {
                        let loss = en::Loss::Closed(format!("{reason:?}"));
                        self.send_stream(session, false, Delivery::ToEn(session, ToEn::Lost(loss)));
                    }
                    // Otherwise the client finds out by its probes, or by the stateless reset
                    // its next datagram gets.
                }
                node::Action::Host { address, session } => match session {
                    Some(s) => {
                        self.dns[dn].hosts.insert(address, s);
                    }
                    None => {
                        self.dns[dn].hosts.remove(&address);
                    }
                },
                node::Action::Primary { session, primary } => {
                    if primary {
                        self.dns[dn].primary.insert(session);
                    } else {
                        self.dns[dn].primary.remove(&session);
                    }
                }
                node::Action::Routes { generation, routes } => {
                    if self.dns[dn]
                        .routes_generation
                        .is_none_or(|g| generation > g)
                    {
                        self.dns[dn].routes_generation = Some(generation);
                        self.dns[dn].routes = routes;
                    }
                }
                node::Action::AnnounceHomeIsBack => {
                    if self.off_cluster(dn) {
                        continue;
                    }
                    let from = self.dns[dn].name.clone();
                    for to in 0..self.dns.len() {
                        if to != dn {
                            let due = self.now + self.delay();
                            let from = from.clone();
                            self.schedule(due, Delivery::HomeIsBack { to, from });
                        }
                    }
                }
                node::Action::Note(note) => {
                    let name = self.dns[dn].name.clone();
                    self.note(format!("{name}: {note:?}"));
                }
            }
        }
    }
}

/// Index of DN `peer` among DN `me`'s peers (the detector numbers the others in order).
fn peer_index(me: usize, peer: usize) -> usize {
    if peer < me {
        peer
    } else {
        peer - 1
    }
}

fn peer_of(me: usize, index: usize) -> usize {
    if index < me {
        index
    } else {
        index + 1
    }
}
