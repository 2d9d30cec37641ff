//! The DN's session and routing decisions: which session carries a client, when a secondary
//! becomes a client's primary, which routes the DN keeps, what it tells clients and peers.
//!
//! A client holds a session to every DN. The DN whose pool its address is from is its home;
//! the lease ticket attaches it everywhere else as a secondary. The client's first data packet
//! on a session makes that DN its primary (thesis 4.2): the DN routes the address (a host route,
//! or nothing for an own client whose block is routed here anyway) and says `Promoted`. A
//! client that goes home sends `Demote`; packets it sent before that may still arrive, so for a
//! grace period they do not promote it again. A newer session for an address replaces the older
//! one, and whatever the older one had routed goes with it: routes follow the sessions that
//! exist.
//!
//! A backup announces a backed block as a whole (its halves) only after the failure detector
//! said the block's owner is down, and until the owner is up and the last of those clients has
//! left ([`RoutePlan`]). After a restart, the own blocks another DN has taken over are neither
//! advertised nor allocated from ([`Event::Learned`]), and while any own client is carried
//! elsewhere the DN tells its peers it is back, so that they send those clients home.
//!
//! [`Machine`] performs no I/O: the shell feeds it [`Event`]s with the current time and
//! performs the [`Action`]s it returns, in order; [`Machine::poll_timeout`] says when to call
//! [`Machine::handle_timeout`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use ipnet::IpNet;

use crate::cluster::Cluster;
use crate::control::{Lease, Message};
use crate::dn::{Grant, LeaseBook, LeaseRecord};
use crate::fd::PeerState;
use crate::lease::{Lease6, LeaseTicket};
use crate::routes::{blocks_carried_elsewhere, held_blocks, RoutePlan, RouteSpec};

/// The shell's name for one client connection, unique for the DN process's life.
pub type SessionId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodePolicy {
    /// After `Demote`, data on the session does not promote it again for this long.
    pub demote_grace: Duration,
    /// How often a DN with own clients carried elsewhere tells its peers it is back.
    pub notice_interval: Duration,
    /// How long after a dead DN is up again a block taken over from it stays announced whole,
    /// while its clients go home; those that have not by then keep host routes of their own,
    /// so that no client can hold a block away from its healthy home.
    pub homecoming: Duration,
}

impl Default for NodePolicy {
    fn default() -> Self {
        Self {
            demote_grace: Duration::from_secs(1),
            notice_interval: Duration::from_secs(1),
            homecoming: crate::en::RETRY_MAX,
        }
    }
}

// The attach (with a dual-stack ticket) is the large variant; events come per control
// message or session, never per packet, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A client authenticated as `identity` asks to be carried, with its ticket if it has one.
    /// A session attaches once; a second `Attach` on it is ignored.
    Attach {
        session: SessionId,
        identity: String,
        ticket: Option<LeaseTicket>,
    },
    /// Data from the client arrived on the session.
    Data(SessionId),
    /// The client says its traffic comes through this session from now on (`Switch`).
    Switch(SessionId),
    /// The client moved its traffic to another DN.
    Demote(SessionId),
    /// The session's connection is gone.
    Ended(SessionId),
    /// The failure detector says what became of DN `dn`: up (it can carry clients), its DN
    /// down, or silent (its detector unheard).
    Peer { dn: String, state: PeerState },
    /// The routes the routing daemon learned from the other DNs, as the kernel shows them now.
    Learned(Vec<IpNet>),
    /// DN `from` (its notice verified) says it is back.
    HomeIsBack { from: String },
    /// The operator drains the DN (`true`: every client moves its traffic elsewhere while this
    /// DN still delivers, and no new client is taken) or ends the drain (`false`).
    Drain(bool),
}

/// Why the DN closes a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The attach was refused; the `Refused` message was sent first and should arrive before
    /// the close does.
    Refused(String),
    /// A newer session carries the client's address.
    Replaced,
}

// A lease (with its DNS settings) is the large variant; actions come per control event, never
// per packet, so boxing it would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Keep this lease across restarts before anything else is done (the next action tells the
    /// client about it).
    Record(LeaseRecord),
    /// Send a control message on the session.
    Send(SessionId, Message),
    Close(SessionId, CloseReason),
    /// Packets for `address` go to this session (`None`: to none).
    Host {
        address: IpAddr,
        session: Option<SessionId>,
    },
    /// Whether the session is the client's primary here. Data on a session that is not needs an
    /// [`Event::Data`]; on one that is, nothing.
    Primary {
        session: SessionId,
        primary: bool,
    },
    /// The routes the DN must have now, all of them; `generation` grows with each set, so that
    /// a shell applying sets concurrently can drop a stale one.
    Routes {
        generation: u64,
        routes: Vec<RouteSpec>,
    },
    /// Tell every peer this DN is back (a signed notice).
    AnnounceHomeIsBack,
    /// Something an operator wants in the log.
    Note(Note),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    Attached {
        session: SessionId,
        identity: String,
        address: IpAddr,
        home: bool,
    },
    Refused {
        session: SessionId,
        identity: String,
        reason: String,
    },
    Replaced {
        old: SessionId,
        new: SessionId,
        address: IpAddr,
    },
    Promoted {
        session: SessionId,
        address: IpAddr,
        home: String,
        /// Why: the client said so (`Switch`), or its data arrived here.
        cause: PromotionCause,
        /// How long the session had been a secondary here.
        after: Duration,
    },
    Demoted {
        session: SessionId,
        address: IpAddr,
    },
    /// Own blocks another DN has taken over (or no longer has).
    Held {
        block: IpNet,
        held: bool,
    },
    /// Own blocks some clients of which another DN carries (or no longer does).
    CarriedElsewhere {
        block: IpNet,
        carried: bool,
    },
    PeerState {
        dn: String,
        up: bool,
    },
    /// DN `dn` has been up for the homecoming period: its blocks are no longer announced whole,
    /// and its clients still carried here keep host routes.
    LetGo {
        dn: String,
    },
    /// DN `dn` was only silent and is heard again with its DN up: it never stopped (its host
    /// stalled, or a link came back), so its blocks go back at once; its clients still carried
    /// here keep host routes until they have gone home.
    HeardAgain {
        dn: String,
    },
    /// Clients carried here for DN `home`, told it is back.
    SentHome {
        home: String,
        clients: usize,
    },
    /// The drain began (`on`) or ended; `clients` sessions were told.
    Drain {
        on: bool,
        clients: usize,
    },
}

/// What made a DN a client's primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromotionCause {
    /// The client's `Switch`.
    Switch,
    /// The client's data arrived on the secondary session.
    Data,
}

impl PromotionCause {
    pub fn name(self) -> &'static str {
        match self {
            PromotionCause::Switch => "switch",
            PromotionCause::Data => "data",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Session {
    pub identity: String,
    pub address: IpAddr,
    /// The DN whose pool the address is from.
    pub home: String,
    pub block: IpNet,
    /// The IPv6 address of a dual-stack lease: routed, carried and released with `address`.
    pub address6: Option<Lease6>,
    pub primary: bool,
    demoted_at: Option<Instant>,
    /// When it became a secondary here (attached, or demoted).
    secondary_since: Instant,
    /// A session on its home DN: when its lease is renewed, so that a client connected longer
    /// than the lease lifetime keeps its address (and its journal entry) for as long as it
    /// stays.
    renew_at: Option<Instant>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0:?} is not a DN of the cluster")]
    UnknownNode(String),
}

pub struct Machine {
    me: String,
    cluster: Cluster,
    policy: NodePolicy,
    book: LeaseBook,
    routes: RoutePlan,
    /// The routes last handed to the shell, with their generation.
    routes_sent: Option<(u64, Vec<RouteSpec>)>,
    sessions: BTreeMap<SessionId, Session>,
    hosts: BTreeMap<IpAddr, SessionId>,
    /// Own blocks some clients of which another DN carries.
    carried_elsewhere: BTreeSet<IpNet>,
    next_notice: Option<Instant>,
    /// DNs up again whose blocks this DN still announces whole, and until when it may.
    homecoming: BTreeMap<String, Instant>,
    /// Peers down that have only been silent so far (never said their DN is down).
    only_silent: BTreeSet<String>,
    /// Being drained: clients are told to move away, new ones are not taken.
    draining: bool,
}

impl Session {
    /// Every address of the client's lease, with its block.
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, IpNet)> + '_ {
        std::iter::once((self.address, self.block))
            .chain(self.address6.map(|v6| (IpAddr::V6(v6.address), v6.block)))
    }
}

impl Machine {
    /// The machine of DN `me`, with the leases it kept across a restart (`restored`).
    pub fn new(
        cluster: &Cluster,
        me: &str,
        signing_key: SigningKey,
        restored: Vec<LeaseRecord>,
        policy: NodePolicy,
        unix: u64,
    ) -> Result<Self, NodeError> {
        let spec = cluster
            .dn(me)
            .ok_or_else(|| NodeError::UnknownNode(me.to_owned()))?;
        let mut book = LeaseBook::new(
            me,
            spec.plan.clone(),
            signing_key,
            cluster.issuer_keys(),
            cluster.lease_lifetime_secs,
        )
        .with_plan6(spec.plan6.clone());
        book.restore(restored, unix);
        Ok(Self {
            me: me.to_owned(),
            cluster: cluster.clone(),
            policy,
            book,
            routes: RoutePlan::new(cluster, me),
            routes_sent: None,
            sessions: BTreeMap::new(),
            hosts: BTreeMap::new(),
            carried_elsewhere: BTreeSet::new(),
            next_notice: None,
            homecoming: BTreeMap::new(),
            only_silent: BTreeSet::new(),
            draining: false,
        })
    }

    /// The first actions: the routes the DN keeps from the start. Feed [`Event::Learned`]
    /// first where the routing daemon's routes are known, so that taken-over blocks are left
    /// out from the start.
    pub fn start(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        self.push_routes(&mut out);
        out
    }

    pub fn name(&self) -> &str {
        &self.me
    }

    pub fn session(&self, id: SessionId) -> Option<&Session> {
        self.sessions.get(&id)
    }

    pub fn sessions(&self) -> impl Iterator<Item = (SessionId, &Session)> {
        self.sessions.iter().map(|(id, s)| (*id, s))
    }

    /// The session packets for `address` go to.
    pub fn host(&self, address: IpAddr) -> Option<SessionId> {
        self.hosts.get(&address).copied()
    }

    pub fn routes(&self) -> Vec<RouteSpec> {
        self.routes.desired()
    }

    pub fn route_plan(&self) -> &RoutePlan {
        &self.routes
    }

    pub fn held(&self) -> &BTreeSet<IpNet> {
        self.routes.held()
    }

    pub fn carried_elsewhere(&self) -> &BTreeSet<IpNet> {
        &self.carried_elsewhere
    }

    pub fn peers_down(&self) -> &BTreeSet<String> {
        self.routes.down()
    }

    pub fn draining(&self) -> bool {
        self.draining
    }

    pub fn active_leases(&self, unix: u64) -> usize {
        self.book.active_leases(unix)
    }

    /// Every unexpired lease of the own pool, for a compacted journal.
    pub fn lease_records(&self, unix: u64) -> Vec<LeaseRecord> {
        self.book.records(unix)
    }

    pub fn handle(&mut self, event: Event, now: Instant, unix: u64) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Attach {
                session,
                identity,
                ticket,
            } => self.attach(session, identity, ticket, now, unix, &mut out),
            Event::Data(session) => self.promote(session, now, false, &mut out),
            Event::Switch(session) => self.promote(session, now, true, &mut out),
            Event::Demote(session) => self.demote(session, now, &mut out),
            Event::Ended(session) => self.end(session, &mut out),
            Event::Peer { dn, state } => self.on_peer(dn, state, now, &mut out),
            Event::Learned(learned) => self.on_learned(&learned, now, &mut out),
            Event::HomeIsBack { from } => self.send_home(&from, &mut out),
            Event::Drain(on) => self.drain(on, &mut out),
        }
        out
    }

    /// Tells every client the DN is (or is no longer) being drained. Clients whose primary it
    /// is move to a secondary at once, which promotes them (`Switch`) while this DN still
    /// delivers; they `Demote` here after that, which lowers what this DN routed for them.
    fn drain(&mut self, on: bool, out: &mut Vec<Action>) {
        if self.draining == on {
            return;
        }
        self.draining = on;
        let message = if on { Message::Drain } else { Message::Undrain };
        for id in self.sessions.keys() {
            out.push(Action::Send(*id, message.clone()));
        }
        out.push(Action::Note(Note::Drain {
            on,
            clients: self.sessions.len(),
        }));
    }

    fn attach(
        &mut self,
        session: SessionId,
        identity: String,
        ticket: Option<LeaseTicket>,
        now: Instant,
        unix: u64,
        out: &mut Vec<Action>,
    ) {
        if self.sessions.contains_key(&session) {
            return;
        }
        // A DN being drained takes no new client; a client it carries, or carries as a
        // secondary, may still attach with its ticket (and is told of the drain).
        let grant = if self.draining && ticket.is_none() {
            Err(crate::dn::AttachError::Draining)
        } else {
            self.book.attach(&identity, ticket.as_ref(), unix)
        };
        let grant = match grant {
            Ok(grant) => grant,
            Err(e) => {
                let reason = e.to_string();
                out.push(Action::Note(Note::Refused {
                    session,
                    identity,
                    reason: reason.clone(),
                }));
                out.push(Action::Send(
                    session,
                    Message::Refused {
                        code: e.refuse_code(),
                        reason: reason.clone(),
                    },
                ));
                out.push(Action::Close(session, CloseReason::Refused(reason)));
                return;
            }
        };
        let claim = grant.ticket().claim.clone();
        let home = matches!(grant, Grant::Home(_));
        if home {
            out.push(Action::Record(LeaseRecord::of(&claim)));
        }
        let lease = self.lease_message(grant.ticket().clone());
        out.push(Action::Note(Note::Attached {
            session,
            identity: identity.clone(),
            address: claim.address,
            home: claim.issuer == self.me,
        }));
        out.push(Action::Send(session, Message::Leased(lease)));
        if self.draining {
            out.push(Action::Send(session, Message::Drain));
        }
        if let Some(old) = self.hosts.get(&claim.address).copied() {
            out.push(Action::Note(Note::Replaced {
                old,
                new: session,
                address: claim.address,
            }));
            self.end(old, out);
            out.push(Action::Close(old, CloseReason::Replaced));
        }
        self.sessions.insert(
            session,
            Session {
                identity,
                address: claim.address,
                home: claim.issuer.clone(),
                block: claim.block,
                address6: claim.address6,
                primary: false,
                demoted_at: None,
                secondary_since: now,
                renew_at: home.then(|| now + self.renewal_period()),
            },
        );
        for (address, _) in claim.addresses() {
            // An IPv6 address still routed to an older session of another IPv4 lease (a
            // changed pool6, say) is this session's now.
            self.hosts.insert(address, session);
            out.push(Action::Host {
                address,
                session: Some(session),
            });
        }
    }

    /// What a client is told with its lease.
    fn lease_message(&self, ticket: LeaseTicket) -> Lease {
        let claim = &ticket.claim;
        Lease {
            gateway: self
                .cluster
                .dn(&self.me)
                .map(|d| d.plan.gateway())
                .unwrap_or(claim.address),
            mtu: self.cluster.dn(&self.me).map(|d| d.mtu).unwrap_or(1280),
            routes: self.cluster.client_routes.clone(),
            failover: self.cluster.failover_order(&claim.issuer, claim.address),
            // The pool's, not this DN's: a backup carrying another DN's client says what the
            // client's home would.
            dns: self.cluster.dns_for(claim.address),
            ticket,
        }
    }

    /// Leases of live sessions are renewed at half their lifetime.
    fn renewal_period(&self) -> Duration {
        Duration::from_secs(self.cluster.lease_lifetime_secs.div_ceil(2).max(1))
    }

    /// Renews the leases of home sessions that are due: recorded, then sent to the client.
    fn renew_due(&mut self, now: Instant, unix: u64, out: &mut Vec<Action>) {
        let period = self.renewal_period();
        let due: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.renew_at.is_some_and(|t| t <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            s.renew_at = Some(now + period);
            let (identity, address) = (s.identity.clone(), s.address);
            let Some(ticket) = self.book.renew(&identity, address, unix) else {
                continue;
            };
            out.push(Action::Record(LeaseRecord::of(&ticket.claim)));
            out.push(Action::Send(
                id,
                Message::Leased(self.lease_message(ticket)),
            ));
        }
    }

    /// Makes the session the client's primary here. Data does so unless the client moved away
    /// within the grace period (it may be a packet sent before the move); the client's word
    /// (`told`), ordered after its `Demote`, always does.
    fn promote(&mut self, id: SessionId, now: Instant, told: bool, out: &mut Vec<Action>) {
        let grace = self.policy.demote_grace;
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if s.primary || (!told && s.demoted_at.is_some_and(|t| now < t + grace)) {
            return;
        }
        s.primary = true;
        s.demoted_at = None;
        let after = now.saturating_duration_since(s.secondary_since);
        let (address, home) = (s.address, s.home.clone());
        let mut rerouted = false;
        for (a, block) in s.addresses().collect::<Vec<_>>() {
            rerouted |= self.routes.serve(a, &home, block);
        }
        out.push(Action::Primary {
            session: id,
            primary: true,
        });
        if rerouted {
            self.push_routes(out);
        }
        if home != self.me {
            out.push(Action::Note(Note::Promoted {
                session: id,
                address,
                home,
                cause: if told {
                    PromotionCause::Switch
                } else {
                    PromotionCause::Data
                },
                after,
            }));
            out.push(Action::Send(id, Message::Promoted));
        }
    }

    fn demote(&mut self, id: SessionId, now: Instant, out: &mut Vec<Action>) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        if !s.primary {
            return;
        }
        s.primary = false;
        s.demoted_at = Some(now);
        s.secondary_since = now;
        let address = s.address;
        for (a, _) in s.addresses().collect::<Vec<_>>() {
            self.routes.release(a);
        }
        out.push(Action::Primary {
            session: id,
            primary: false,
        });
        out.push(Action::Note(Note::Demoted {
            session: id,
            address,
        }));
        self.push_routes(out);
    }

    /// Forgets the session and everything it had routed.
    fn end(&mut self, id: SessionId, out: &mut Vec<Action>) {
        let Some(s) = self.sessions.remove(&id) else {
            return;
        };
        for (address, _) in s.addresses() {
            if self.hosts.get(&address) == Some(&id) {
                self.hosts.remove(&address);
                out.push(Action::Host {
                    address,
                    session: None,
                });
            }
            if s.primary {
                self.routes.release(address);
            }
        }
        if s.primary {
            self.push_routes(out);
        }
    }

    fn on_peer(&mut self, dn: String, state: PeerState, now: Instant, out: &mut Vec<Action>) {
        if dn == self.me || self.cluster.dn(&dn).is_none() {
            return;
        }
        let was_down = self.routes.down().contains(&dn);
        match state {
            PeerState::Unknown => return,
            PeerState::Silent if !was_down => {
                self.only_silent.insert(dn.clone());
            }
            PeerState::Silent | PeerState::Up => {}
            PeerState::DnDown => {
                self.only_silent.remove(&dn);
            }
        }
        let up = state.is_up();
        if !self.routes.set_down(&dn, !up) {
            return;
        }
        out.push(Action::Note(Note::PeerState { dn: dn.clone(), up }));
        if up {
            if self.only_silent.remove(&dn) {
                // Its DN never stopped, so nothing can take its blocks from clients still here
                // (they keep host routes): holding them for the homecoming period would only
                // keep a healthy DN from its own block after a false alarm.
                if self.routes.let_go_of(&dn) {
                    out.push(Action::Note(Note::HeardAgain { dn }));
                }
            } else if self.routes.holds_blocks_of(&dn) {
                self.homecoming.insert(dn, now + self.policy.homecoming);
            }
            self.push_routes(out);
            return;
        }
        self.push_routes(out);
        self.homecoming.remove(&dn);
        // Clients whose primary it was switch now, before their own probes could tell. Clients
        // whose primary this DN is are not told: when the cluster is split, each side reports
        // the other down, and a client must follow the side that can still route it.
        for (id, s) in &self.sessions {
            if !s.primary {
                out.push(Action::Send(*id, Message::PeerDown { dn: dn.clone() }));
            }
        }
    }

    fn on_learned(&mut self, learned: &[IpNet], now: Instant, out: &mut Vec<Action>) {
        let own: Vec<IpNet> = self
            .cluster
            .dn(&self.me)
            .map(|d| {
                d.plan
                    .blocks
                    .iter()
                    .chain(d.plan6.iter().flat_map(|p| &p.blocks))
                    .map(|b| b.net)
                    .collect()
            })
            .unwrap_or_default();
        let held = held_blocks(&own, learned);
        for block in held.symmetric_difference(self.routes.held()) {
            out.push(Action::Note(Note::Held {
                block: *block,
                held: held.contains(block),
            }));
        }
        self.book.set_held(held.clone());
        if self.routes.set_held(held) {
            self.push_routes(out);
        }
        let carried = blocks_carried_elsewhere(&own, learned);
        for block in carried.symmetric_difference(&self.carried_elsewhere) {
            out.push(Action::Note(Note::CarriedElsewhere {
                block: *block,
                carried: carried.contains(block),
            }));
        }
        self.carried_elsewhere = carried;
        if self.carried_elsewhere.is_empty() {
            self.next_notice = None;
        } else if self.next_notice.is_none() {
            self.next_notice = Some(now + self.policy.notice_interval);
            out.push(Action::AnnounceHomeIsBack);
        }
    }

    /// Tells the clients carried here for DN `home` that it is back.
    fn send_home(&mut self, home: &str, out: &mut Vec<Action>) {
        let before = out.len();
        for (id, s) in &self.sessions {
            if s.primary && s.home == home && home != self.me {
                out.push(Action::Send(*id, Message::HomeIsBack));
            }
        }
        let clients = out.len() - before;
        if clients > 0 {
            out.push(Action::Note(Note::SentHome {
                home: home.to_owned(),
                clients,
            }));
        }
    }

    fn push_routes(&mut self, out: &mut Vec<Action>) {
        let routes = self.routes.desired();
        if self.routes_sent.as_ref().is_some_and(|(_, r)| *r == routes) {
            return;
        }
        let generation = self.routes_sent.as_ref().map_or(0, |(g, _)| g + 1);
        self.routes_sent = Some((generation, routes.clone()));
        out.push(Action::Routes { generation, routes });
    }

    /// When [`Machine::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_notice
            .into_iter()
            .chain(self.homecoming.values().copied())
            .chain(self.sessions.values().filter_map(|s| s.renew_at))
            .min()
    }

    /// `unix`: the wall clock now, for the leases renewed.
    pub fn handle_timeout(&mut self, now: Instant, unix: u64) -> Vec<Action> {
        let mut out = Vec::new();
        self.renew_due(now, unix, &mut out);
        let due: Vec<String> = self
            .homecoming
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(dn, _)| dn.clone())
            .collect();
        for dn in due {
            self.homecoming.remove(&dn);
            if self.routes.let_go_of(&dn) {
                out.push(Action::Note(Note::LetGo { dn }));
                self.push_routes(&mut out);
            }
        }
        if let Some(due) = self.next_notice {
            if now >= due {
                out.push(Action::AnnounceHomeIsBack);
                self.next_notice = Some(now + self.policy.notice_interval);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::RefuseCode;
    use crate::routes::Reason;
    use std::path::Path;

    fn key(i: usize) -> SigningKey {
        SigningKey::from_bytes(&[i as u8; 32])
    }

    fn cluster(n: usize) -> Cluster {
        let mut text = "[cluster]\nclient_ca = \"ca.pem\"\n".to_owned();
        for i in 1..=n {
            let public = crate::lease::encode_key(&key(i).verifying_key().to_bytes());
            text += &format!(
                "[[dn]]\nname = \"dn{i}\"\nendpoint = \"10.0.0.{i}\"\npool = \"10.20{i}.0.0/24\"\npublic_key = \"{public}\"\n"
            );
        }
        Cluster::parse(&text, Path::new("/")).unwrap()
    }

    fn machine(c: &Cluster, i: usize) -> Machine {
        let mut m = Machine::new(
            c,
            &format!("dn{i}"),
            key(i),
            vec![],
            NodePolicy::default(),
            1000,
        )
        .unwrap();
        m.start();
        m
    }

    fn attach(
        m: &mut Machine,
        id: SessionId,
        who: &str,
        ticket: Option<LeaseTicket>,
        now: Instant,
    ) -> Vec<Action> {
        m.handle(
            Event::Attach {
                session: id,
                identity: who.into(),
                ticket,
            },
            now,
            1000,
        )
    }

    /// Two DNs; "laptop" leased by dn1 (session 1) and attached to dn2 as a secondary
    /// (session 5).
    fn laptop_on_both() -> (Machine, Machine, Lease, Instant) {
        let c = cluster(2);
        let (mut dn1, mut dn2) = (machine(&c, 1), machine(&c, 2));
        let t = Instant::now();
        let lease = leased(&attach(&mut dn1, 1, "laptop", None, t)).unwrap();
        attach(&mut dn2, 5, "laptop", Some(lease.ticket.clone()), t);
        (dn1, dn2, lease, t)
    }

    fn leased(actions: &[Action]) -> Option<Lease> {
        actions.iter().find_map(|a| match a {
            Action::Send(_, Message::Leased(l)) => Some(l.clone()),
            _ => None,
        })
    }

    fn routes(m: &Machine) -> Vec<String> {
        m.routes()
            .iter()
            .filter(|r| !matches!(r.reason, Reason::Home | Reason::Standby { .. }))
            .map(|r| format!("{} {}", r.net, r.reason))
            .collect()
    }

    /// Two dual-stack DNs: every DN's IPv6 pool is split and backed as its IPv4 pool is.
    fn dual_cluster() -> Cluster {
        let mut text = "[cluster]\nclient_ca = \"ca.pem\"\n".to_owned();
        for i in 1..=2 {
            let public = crate::lease::encode_key(&key(i).verifying_key().to_bytes());
            text += &format!(
                "[[dn]]\nname = \"dn{i}\"\nendpoint = \"10.0.0.{i}\"\npool = \"10.20{i}.0.0/24\"\n\
                 pool6 = \"fd00:20{i}::/64\"\npublic_key = \"{public}\"\n"
            );
        }
        Cluster::parse(&text, Path::new("/")).unwrap()
    }

    #[test]
    fn both_families_are_leased_routed_and_failed_over_together() {
        let c = dual_cluster();
        let (mut dn1, mut dn2) = (machine(&c, 1), machine(&c, 2));
        let standing: Vec<String> = dn2
            .routes()
            .iter()
            .map(|r| format!("{} {}", r.net, r.reason))
            .collect();
        assert!(
            standing.contains(&"fd00:202::/64 own block".to_owned()),
            "{standing:?}"
        );
        assert!(
            standing.contains(&"fd00:201::/64 standby for dn1".to_owned()),
            "{standing:?}"
        );
        let t = Instant::now();
        let acts = attach(&mut dn1, 1, "laptop", None, t);
        let lease = leased(&acts).unwrap();
        let v6 = lease.ticket.claim.address6.unwrap();
        assert_eq!(v6.address.to_string(), "fd00:201::2");
        assert!(acts.contains(&Action::Host {
            address: v6.address.into(),
            session: Some(1)
        }));
        assert!(matches!(&acts[0], Action::Record(r) if r.address6 == Some(v6.address)));
        // The backup takes the ticket for both; the client's data moves both host routes.
        let acts = attach(&mut dn2, 5, "laptop", Some(lease.ticket.clone()), t);
        assert!(acts.contains(&Action::Host {
            address: v6.address.into(),
            session: Some(5)
        }));
        assert_eq!(dn2.host(v6.address.into()), Some(5));
        dn2.handle(Event::Data(5), t, 1000);
        assert_eq!(
            routes(&dn2),
            ["10.201.0.2/32 host for dn1", "fd00:201::2/128 host for dn1"]
        );
        // dn1 dies: both families' blocks are taken over whole.
        dn2.handle(
            Event::Peer {
                dn: "dn1".into(),
                state: PeerState::DnDown,
            },
            t,
            1000,
        );
        assert_eq!(
            routes(&dn2),
            [
                "10.201.0.0/25 serving for dn1",
                "10.201.0.128/25 serving for dn1",
                "fd00:201::/65 serving for dn1",
                "fd00:201:0:0:8000::/65 serving for dn1",
            ]
        );
        // The session's end forgets both addresses.
        let acts = dn2.handle(Event::Ended(5), t, 1000);
        assert!(acts.contains(&Action::Host {
            address: v6.address.into(),
            session: None
        }));
        assert_eq!(dn2.host(v6.address.into()), None);
    }

    /// Each pool names its own DNS; a secondary (the backup) attaching a client of dn1's
    /// block tells it dn1's pool's settings, not its own.
    #[test]
    fn the_lease_carries_the_dns_of_the_addresss_pool_from_any_dn() {
        let mut text = "[cluster]\nclient_ca = \"ca.pem\"\n".to_owned();
        for i in 1..=2 {
            let public = crate::lease::encode_key(&key(i).verifying_key().to_bytes());
            text += &format!(
                "[[dn]]\nname = \"dn{i}\"\nendpoint = \"10.0.0.{i}\"\npool = \"10.20{i}.0.0/24\"\n\
                 public_key = \"{public}\"\ndns_servers = [\"10.0.{i}.53\"]\ndns_search = [\"pool{i}.example\"]\n"
            );
        }
        let c = Cluster::parse(&text, Path::new("/")).unwrap();
        let (mut dn1, mut dn2) = (machine(&c, 1), machine(&c, 2));
        let t = Instant::now();
        let home = leased(&attach(&mut dn1, 1, "laptop", None, t)).unwrap();
        assert_eq!(home.dns, c.dn("dn1").unwrap().dns);
        assert_eq!(
            home.dns.servers,
            ["10.0.1.53".parse::<std::net::IpAddr>().unwrap()]
        );
        let backup = leased(&attach(&mut dn2, 5, "laptop", Some(home.ticket.clone()), t)).unwrap();
        assert_eq!(backup.dns, home.dns);
        // A cluster that pushes nothing sends nothing.
        let plain = cluster(2);
        let mut m = machine(&plain, 1);
        assert!(leased(&attach(&mut m, 1, "laptop", None, t))
            .unwrap()
            .dns
            .is_empty());
    }

    #[test]
    fn a_drained_dn_tells_every_client_and_takes_no_new_one() {
        let (mut dn1, _, lease, t) = laptop_on_both();
        let acts = dn1.handle(Event::Drain(true), t, 1000);
        assert!(acts.contains(&Action::Send(1, Message::Drain)), "{acts:?}");
        assert!(dn1.draining());
        // A new client is refused; the laptop reattaching with its ticket is taken and told.
        let newcomer = attach(&mut dn1, 2, "phone", None, t);
        assert!(
            newcomer
                .iter()
                .any(|a| matches!(a, Action::Send(2, Message::Refused { .. }))),
            "{newcomer:?}"
        );
        let again = attach(&mut dn1, 3, "laptop", Some(lease.ticket.clone()), t);
        let lease_at = again
            .iter()
            .position(|a| matches!(a, Action::Send(3, Message::Leased(_))));
        let told_at = again
            .iter()
            .position(|a| *a == Action::Send(3, Message::Drain));
        assert!(lease_at.unwrap() < told_at.unwrap(), "{again:?}");
        let back = dn1.handle(Event::Drain(false), t, 1000);
        assert!(
            back.contains(&Action::Send(3, Message::Undrain)),
            "{back:?}"
        );
        assert!(leased(&attach(&mut dn1, 4, "phone", None, t)).is_some());
    }

    #[test]
    fn a_live_home_session_has_its_lease_renewed_at_half_life() {
        let c = cluster(2);
        let mut m = machine(&c, 1);
        let t = Instant::now();
        let first = leased(&attach(&mut m, 1, "laptop", None, t)).unwrap();
        let due = m.poll_timeout().unwrap();
        let half = Duration::from_secs(c.lease_lifetime_secs.div_ceil(2));
        assert_eq!(due, t + half);
        let acts = m.handle_timeout(due, 1000 + half.as_secs());
        let renewed = leased(&acts).unwrap();
        assert_eq!(renewed.ticket.claim.address, first.ticket.claim.address);
        assert!(renewed.ticket.claim.expires_at > first.ticket.claim.expires_at);
        // Kept across a restart before the client hears of it.
        assert!(
            matches!(acts[0], Action::Record(ref r) if r.expires_at == renewed.ticket.claim.expires_at)
        );
        // A secondary session's lease is its home's to renew.
        let mut dn2 = machine(&c, 2);
        attach(&mut dn2, 5, "laptop", Some(first.ticket.clone()), t);
        assert_eq!(dn2.poll_timeout(), None);
        // A session that ended is not renewed.
        m.handle(Event::Ended(1), due, 1000);
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn a_home_lease_is_recorded_before_the_client_hears_of_it() {
        let c = cluster(2);
        let mut m = machine(&c, 1);
        let t = Instant::now();
        let acts = attach(&mut m, 1, "laptop", None, t);
        let record = acts.iter().position(|a| matches!(a, Action::Record(_)));
        let send = acts
            .iter()
            .position(|a| matches!(a, Action::Send(_, Message::Leased(_))));
        assert!(record.unwrap() < send.unwrap(), "{acts:?}");
        let lease = leased(&acts).unwrap();
        assert_eq!(lease.failover, vec!["dn2".to_owned()]);
        assert!(acts.contains(&Action::Host {
            address: lease.ticket.claim.address,
            session: Some(1)
        }));
        // A restarted DN keeps it: another client gets another address.
        let mut again = Machine::new(
            &c,
            "dn1",
            key(1),
            m.lease_records(1000),
            NodePolicy::default(),
            1000,
        )
        .unwrap();
        let other = leased(&attach(&mut again, 7, "phone", None, t)).unwrap();
        assert_ne!(other.ticket.claim.address, lease.ticket.claim.address);
    }

    #[test]
    fn a_bad_ticket_is_refused_then_closed() {
        let c = cluster(2);
        let mut dn1 = machine(&c, 1);
        let t = Instant::now();
        let lease = leased(&attach(&mut dn1, 1, "laptop", None, t)).unwrap();
        let acts = attach(&mut dn1, 2, "phone", Some(lease.ticket), t);
        assert!(matches!(
            &acts[1],
            Action::Send(
                2,
                Message::Refused {
                    code: RefuseCode::BadTicket,
                    ..
                }
            )
        ));
        assert!(matches!(
            &acts[2],
            Action::Close(2, CloseReason::Refused(_))
        ));
        assert!(dn1.session(2).is_none());
    }

    #[test]
    fn promotion_demotion_and_the_grace_period() {
        let (_dn1, mut dn2, lease, t) = laptop_on_both();
        let a = lease.ticket.claim.address;
        // dn1 is healthy: the client moves alone, as a host route.
        let acts = dn2.handle(Event::Data(5), t, 1000);
        assert!(acts.contains(&Action::Send(5, Message::Promoted)));
        assert_eq!(routes(&dn2), vec![format!("{a}/32 host for dn1")]);
        assert!(dn2.handle(Event::Data(5), t, 1000).is_empty());
        dn2.handle(Event::Demote(5), t, 1000);
        assert!(routes(&dn2).is_empty());
        // Late packets from before the demotion do not promote it again...
        let late = t + Duration::from_millis(500);
        assert!(dn2.handle(Event::Data(5), late, 1000).is_empty());
        // ...but traffic after the grace period does.
        let after = t + NodePolicy::default().demote_grace;
        assert!(!dn2.handle(Event::Data(5), after, 1000).is_empty());
        assert_eq!(routes(&dn2).len(), 1);
        // A client that comes back within the grace period says so, and is promoted at once.
        dn2.handle(Event::Demote(5), after, 1000);
        assert!(routes(&dn2).is_empty());
        let acts = dn2.handle(Event::Switch(5), after, 1000);
        assert!(acts.contains(&Action::Send(5, Message::Promoted)));
        assert_eq!(routes(&dn2).len(), 1);
    }

    #[test]
    fn a_newer_session_replaces_the_older_and_its_routes_go_with_it() {
        let (_dn1, mut dn2, lease, t) = laptop_on_both();
        dn2.handle(Event::Data(5), t, 1000);
        assert_eq!(routes(&dn2).len(), 1);
        let acts = attach(&mut dn2, 6, "laptop", Some(lease.ticket.clone()), t);
        assert!(acts.contains(&Action::Close(5, CloseReason::Replaced)));
        assert!(routes(&dn2).is_empty(), "{:?}", routes(&dn2));
        assert_eq!(dn2.host(lease.ticket.claim.address), Some(6));
        // The old session's end changes nothing now.
        assert!(dn2.handle(Event::Ended(5), t, 1000).is_empty());
        assert_eq!(dn2.host(lease.ticket.claim.address), Some(6));
    }

    #[test]
    fn a_dead_owners_block_is_taken_whole_and_let_go_after_the_homecoming() {
        let (_dn1, mut dn2, lease, t) = laptop_on_both();
        let a = lease.ticket.claim.address;
        let acts = dn2.handle(
            Event::Peer {
                dn: "dn1".into(),
                state: PeerState::DnDown,
            },
            t,
            1000,
        );
        assert!(acts.contains(&Action::Send(5, Message::PeerDown { dn: "dn1".into() })));
        let halves = vec![
            "10.201.0.0/25 serving for dn1".to_owned(),
            "10.201.0.128/25 serving for dn1".to_owned(),
        ];
        assert_eq!(routes(&dn2), halves);
        dn2.handle(Event::Data(5), t, 1000);
        assert_eq!(routes(&dn2), halves);
        // dn1 is back; the client has the homecoming period to leave.
        let up = t + Duration::from_secs(1);
        dn2.handle(
            Event::Peer {
                dn: "dn1".into(),
                state: PeerState::Up,
            },
            up,
            1001,
        );
        assert_eq!(routes(&dn2), halves);
        let deadline = dn2.poll_timeout().unwrap();
        assert_eq!(deadline, up + NodePolicy::default().homecoming);
        dn2.handle_timeout(deadline, 1000);
        assert_eq!(routes(&dn2), vec![format!("{a}/32 host for dn1")]);
        assert_eq!(dn2.poll_timeout(), None);
    }

    #[test]
    fn a_peer_that_was_only_silent_gets_its_blocks_back_at_once() {
        let (_dn1, mut dn2, lease, t) = laptop_on_both();
        let a = lease.ticket.claim.address;
        let peer = |state| Event::Peer {
            dn: "dn1".into(),
            state,
        };
        let halves = vec![
            "10.201.0.0/25 serving for dn1".to_owned(),
            "10.201.0.128/25 serving for dn1".to_owned(),
        ];
        // Silent: taken over whole at once, the client told, as for a dead DN.
        let acts = dn2.handle(peer(PeerState::Silent), t, 1000);
        assert!(acts.contains(&Action::Send(5, Message::PeerDown { dn: "dn1".into() })));
        dn2.handle(Event::Data(5), t, 1000);
        assert_eq!(routes(&dn2), halves);
        // Heard again with its DN up: a false alarm. The blocks go back now; the client
        // carried here keeps a host route.
        let later = t + Duration::from_millis(40);
        let acts = dn2.handle(peer(PeerState::Up), later, 1000);
        assert!(acts.contains(&Action::Note(Note::HeardAgain { dn: "dn1".into() })));
        assert_eq!(routes(&dn2), vec![format!("{a}/32 host for dn1")]);
        assert_eq!(dn2.poll_timeout(), None, "no homecoming period");

        // Silent, then its detector says its DN is down (it restarted): the homecoming holds.
        dn2.handle(peer(PeerState::Silent), later, 1000);
        assert!(dn2.handle(peer(PeerState::DnDown), later, 1000).is_empty());
        assert_eq!(routes(&dn2), halves);
        let up = later + Duration::from_secs(1);
        dn2.handle(peer(PeerState::Up), up, 1000);
        assert_eq!(routes(&dn2), halves);
        assert_eq!(
            dn2.poll_timeout(),
            Some(up + NodePolicy::default().homecoming)
        );
    }

    #[test]
    fn a_restarted_dn_leaves_taken_over_blocks_alone_and_calls_its_clients_home() {
        let c = cluster(2);
        let mut dn1 = machine(&c, 1);
        let mut dn2 = machine(&c, 2);
        let t = Instant::now();
        dn2.handle(
            Event::Peer {
                dn: "dn1".into(),
                state: PeerState::DnDown,
            },
            t,
            1000,
        );
        let learned: Vec<IpNet> = dn2.routes().iter().map(|r| r.net).collect();
        let acts = dn1.handle(Event::Learned(learned), t, 1000);
        assert!(acts.contains(&Action::AnnounceHomeIsBack));
        assert!(!dn1.routes().iter().any(|r| r.reason == Reason::Home));
        let refused = attach(&mut dn1, 1, "laptop", None, t);
        assert!(matches!(
            refused[1],
            Action::Send(
                1,
                Message::Refused {
                    code: RefuseCode::PoolExhausted,
                    ..
                }
            )
        ));
        // It keeps telling its peers, once a notice interval.
        let next = dn1.poll_timeout().unwrap();
        assert_eq!(
            dn1.handle_timeout(next, 1000),
            vec![Action::AnnounceHomeIsBack]
        );
        // A host route elsewhere moves one client, not the block: nothing is held, but the
        // peers are still told.
        let host: Vec<IpNet> = vec!["10.201.0.9/32".parse().unwrap()];
        dn1.handle(Event::Learned(host), next, 1001);
        assert!(dn1.held().is_empty());
        assert!(dn1.routes().iter().any(|r| r.reason == Reason::Home));
        assert!(dn1.poll_timeout().is_some());
        dn1.handle(Event::Learned(vec![]), next, 1001);
        assert_eq!(dn1.poll_timeout(), None);
    }
}
