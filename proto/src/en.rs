//! The EN's session decisions: which DNs to connect to, which session carries traffic, and what
//! to do when one is lost.
//!
//! The client keeps a session to every configured DN. The first DN to answer `Attach` leases the
//! address and becomes the primary; the lease ticket then attaches every other session as a
//! secondary. When the primary is lost, the next live secondary takes over at once (no handshake
//! at failover time), and lost sessions are re-established in the background with back-off and
//! jitter so that the client again holds every session.
//!
//! [`Machine`] performs no I/O: the shell feeds it [`Event`]s with the current time and performs
//! the [`Action`]s it returns; [`Machine::poll_timeout`] says when to call
//! [`Machine::handle_timeout`].

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::backoff::Backoff;
use crate::control::{Lease, RefuseCode};
use crate::lease::LeaseTicket;

/// Index of a DN in the client's configuration.
pub type Dn = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Handshake under way.
    Connecting,
    /// Handshake done; waiting for the first lease (from another DN) before attaching.
    Ready,
    /// `Attach` sent, answer awaited.
    Attaching,
    Up(Role),
    /// Lost or refused; the next attempt is due at `retry_at`.
    Waiting {
        retry_at: Instant,
    },
    /// Taken out of the client's configuration: closed, never tried again.
    Retired,
}

/// Why a session ended, as the shell observed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Loss {
    /// The handshake did not complete.
    ConnectFailed(String),
    /// The QUIC connection closed, was reset or timed out.
    Closed(String),
    /// The EN's own probes judged the DN dead.
    ProbeTimeout,
    /// The DN's port answered "unreachable".
    Unreachable,
    /// Another DN reported this one dead.
    ReportedDead,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake with DN `0` completed.
    Connected(Dn),
    /// DN `0` answered `Attach` with a lease.
    Leased(Dn, Box<Lease>),
    /// DN `0` refused to carry the client.
    Refused(Dn, RefuseCode),
    /// DN `0`'s session is gone.
    Lost(Dn, Loss),
    /// DN `0` says the client's home DN (its ticket's issuer) is back.
    HomeIsBack(Dn),
    /// A DN says the cluster's failure detector found DN `0` down.
    PeerDown(Dn),
    /// An ICMP error says DN `0`'s port is unreachable. Nobody authenticated it: it ends an
    /// attempt still under way (a retry is cheap), but a session only gets checked.
    Unreachable(Dn),
    /// DN `0` is being drained (`true`: move away from it, make before break) or is back in
    /// service (`false`).
    Drain(Dn, bool),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a handshake with the DN.
    Connect(Dn),
    /// Send `Attach` on the DN's session, with the ticket if the client has one.
    Attach(Dn, Option<LeaseTicket>),
    /// Give the TUN device this lease's address, MTU and routes.
    Configure(Lease),
    /// Send traffic through this DN's session from now on; `None`: no session can carry it.
    UsePrimary(Option<Dn>),
    /// Close the DN's session (e.g. it leased a different address).
    Close(Dn),
    /// Tell the DN it is no longer the client's primary, so it stops routing the address.
    Demote(Dn),
    /// Probe the session now: something hints that the DN may be gone.
    CheckNow(Dn),
    /// Tell the DN the client's traffic comes through it from now on (after `UsePrimary`).
    Switch(Dn),
    /// The primary `from` is gone: send again through `to` what `from` may not have delivered
    /// (see [`crate::replay`]). Only on failover: a DN left for home delivers what it has.
    Resend { from: Dn, to: Dn },
    /// The session's path changed: probe it now, judged afresh (see
    /// [`crate::probe::Prober::on_path_change`]).
    Reprobe(Dn),
}

struct Slot {
    state: SessionState,
    backoff: Backoff,
    last_loss: Option<Loss>,
    /// The DN said it is being drained: it carries the traffic only if no other DN can.
    draining: bool,
    /// Taken out of the configuration: it carries the traffic only until another session can,
    /// and is never reconnected.
    retired: bool,
    /// A retired DN that carried the traffic is closed at this time: until then it still
    /// delivers what was on its way when the traffic moved.
    close_at: Option<Instant>,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: SessionState::Connecting,
            backoff: Backoff::new(RETRY_BASE, RETRY_MAX),
            last_loss: None,
            draining: false,
            retired: false,
            close_at: None,
        }
    }
}

pub struct Machine {
    /// DN names, in configuration order.
    names: Vec<String>,
    slots: Vec<Slot>,
    primary: Option<Dn>,
    /// The session whose ticket-less `Attach` will lease the address.
    leasing: Option<Dn>,
    lease: Option<Lease>,
    /// The primary said the home DN is back: move home once its session is up.
    going_home: bool,
    /// Deterministic jitter source (xorshift), seeded by the shell.
    rng: u64,
}

pub const RETRY_BASE: Duration = Duration::from_millis(200);
pub const RETRY_MAX: Duration = Duration::from_secs(10);
/// How long a retired DN that carried the traffic keeps its session after the traffic moved:
/// long enough for what it was delivering to arrive.
pub const RETIRE_GRACE: Duration = Duration::from_secs(2);

impl Machine {
    /// A machine for the DNs `names` (configuration order); `seed` makes the retry jitter
    /// reproducible.
    pub fn new(names: Vec<String>, seed: u64) -> Self {
        Self {
            slots: (0..names.len()).map(|_| Slot::new()).collect(),
            primary: None,
            leasing: None,
            lease: None,
            going_home: false,
            rng: seed | 1,
            names,
        }
    }

    /// The first actions: connect to every DN at once.
    pub fn start(&mut self) -> Vec<Action> {
        let mut out = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if !slot.retired {
                slot.state = SessionState::Connecting;
                out.push(Action::Connect(i));
            }
        }
        out
    }

    /// A DN added to the configuration: it gets the next index and is connected to at once.
    pub fn add(&mut self, name: String) -> (Dn, Vec<Action>) {
        self.names.push(name);
        self.slots.push(Slot::new());
        let dn = self.slots.len() - 1;
        (dn, vec![Action::Connect(dn)])
    }

    /// A DN taken out of the configuration. Its index stays taken (reports about it may still
    /// be on their way) but it is never connected to again. A primary is left make before
    /// break, as for a drain, and closed [`RETIRE_GRACE`] later; with no other session up it
    /// carries the traffic until one is.
    pub fn retire(&mut self, dn: Dn, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let Some(slot) = self.slots.get_mut(dn) else {
            return out;
        };
        if slot.retired {
            return out;
        }
        slot.retired = true;
        if self.primary == Some(dn) {
            self.leave_retired_primary(now, &mut out);
        } else {
            self.close_retired(dn, &mut out);
        }
        out
    }

    /// Moves the traffic off a retired primary if another session can take it.
    fn leave_retired_primary(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(p) = self.primary.filter(|&p| self.slots[p].retired) else {
            return;
        };
        // Even a DN being drained takes the traffic: it is still in the configuration.
        if let Some(&next) = self
            .successors(p)
            .first()
            .filter(|&&n| !self.slots[n].retired)
        {
            self.hand_over(p, next, out);
        }
        self.schedule_retired_closes(now);
    }

    /// A retired DN that no longer carries the traffic (it handed over, or the client went
    /// home) is closed after the grace.
    fn schedule_retired_closes(&mut self, now: Instant) {
        for slot in &mut self.slots {
            if slot.retired
                && slot.state == SessionState::Up(Role::Secondary)
                && slot.close_at.is_none()
            {
                slot.close_at = Some(now + RETIRE_GRACE);
            }
        }
    }

    fn close_retired(&mut self, dn: Dn, out: &mut Vec<Action>) {
        let slot = &mut self.slots[dn];
        let was = std::mem::replace(&mut slot.state, SessionState::Retired);
        slot.close_at = None;
        if !matches!(was, SessionState::Waiting { .. } | SessionState::Retired) {
            out.push(Action::Close(dn));
        }
        self.hand_over_leasing(dn, out);
    }

    /// The DN called `name` among those configured (a retired DN of the same name is not).
    pub fn dn_named(&self, name: &str) -> Option<Dn> {
        self.names
            .iter()
            .zip(&self.slots)
            .position(|(n, s)| n == name && !s.retired)
    }

    /// The DNs the client is configured with: every index but the retired ones.
    pub fn configured(&self) -> impl Iterator<Item = Dn> + '_ {
        (0..self.slots.len()).filter(|&i| !self.slots[i].retired)
    }

    pub fn primary(&self) -> Option<Dn> {
        self.primary
    }

    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    pub fn state(&self, dn: Dn) -> Option<&SessionState> {
        self.slots.get(dn).map(|s| &s.state)
    }

    /// Whether DN `dn` said it is being drained.
    pub fn is_draining(&self, dn: Dn) -> bool {
        self.slots.get(dn).is_some_and(|s| s.draining)
    }

    /// Whether DN `dn` was taken out of the configuration (its session may still be in its
    /// grace).
    pub fn is_retired(&self, dn: Dn) -> bool {
        self.slots.get(dn).is_some_and(|s| s.retired)
    }

    pub fn last_loss(&self, dn: Dn) -> Option<&Loss> {
        self.slots.get(dn).and_then(|s| s.last_loss.as_ref())
    }

    fn jitter(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }

    fn ticket(&self) -> Option<LeaseTicket> {
        self.lease.as_ref().map(|l| l.ticket.clone())
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        let dn = match &event {
            Event::Connected(d)
            | Event::Leased(d, _)
            | Event::Refused(d, _)
            | Event::Lost(d, _)
            | Event::HomeIsBack(d)
            | Event::PeerDown(d)
            | Event::Unreachable(d)
            | Event::Drain(d, _) => *d,
        };
        if self
            .slots
            .get(dn)
            .is_none_or(|s| s.state == SessionState::Retired)
        {
            return out;
        }
        match event {
            Event::Connected(d) => {
                if self.slots[d].state != SessionState::Connecting {
                    return out;
                }
                if self.lease.is_some() {
                    self.slots[d].state = SessionState::Attaching;
                    out.push(Action::Attach(d, self.ticket()));
                } else if self.leasing.is_none() {
                    self.leasing = Some(d);
                    self.slots[d].state = SessionState::Attaching;
                    out.push(Action::Attach(d, None));
                } else {
                    self.slots[d].state = SessionState::Ready;
                }
            }
            Event::Leased(d, lease) => self.on_leased(d, *lease, now, &mut out),
            Event::Refused(d, code) => {
                let loss = Loss::Closed(format!("refused: {code:?}"));
                if matches!(code, RefuseCode::BadTicket | RefuseCode::AddressUnavailable)
                    && self.live_sessions() == 0
                {
                    // Nobody carries the old address any more and its ticket is no good: start
                    // over with a fresh lease.
                    self.lease = None;
                }
                self.lose(d, loss, now, &mut out);
            }
            Event::Lost(d, loss) => self.lose(d, loss, now, &mut out),
            Event::PeerDown(d) => {
                // Only news about the primary moves the client. When the cluster is split, each
                // side reports the other down; the primary's word about a secondary must not
                // cut the client off from the side that can still route it. A dead secondary
                // shows itself to its keepalive, or when the client fails over to it.
                if self.primary == Some(d) {
                    out.push(Action::Close(d));
                    self.lose(d, Loss::ReportedDead, now, &mut out);
                }
            }
            Event::Unreachable(d) => match self.slots[d].state {
                SessionState::Up(_) => out.push(Action::CheckNow(d)),
                SessionState::Waiting { .. } | SessionState::Retired => {}
                SessionState::Connecting | SessionState::Ready | SessionState::Attaching => {
                    out.push(Action::Close(d));
                    self.lose(d, Loss::Unreachable, now, &mut out)
                }
            },
            Event::HomeIsBack(d) => {
                // Only the DN carrying the client can know it carries it for the home DN.
                if self.primary == Some(d) {
                    self.going_home = true;
                    self.go_home(&mut out);
                }
            }
            Event::Drain(d, true) => {
                self.slots[d].draining = true;
                if self.primary == Some(d) {
                    self.move_off(d, &mut out);
                }
            }
            Event::Drain(d, false) => {
                self.slots[d].draining = false;
                // The home back in service: the client goes home as it would after a failure.
                if self.home() == Some(d) && self.primary != Some(d) {
                    self.going_home = true;
                    self.go_home(&mut out);
                }
            }
        }
        self.schedule_retired_closes(now);
        out
    }

    /// The secondaries that may take the traffic from `from`, best first: the lease's failover
    /// order (its block's designated backup first), then configuration order after `from`;
    /// DNs being drained after those, and retired DNs still in their grace last.
    fn successors(&self, from: Dn) -> Vec<Dn> {
        let n = self.slots.len();
        let by_lease = self
            .lease
            .iter()
            .flat_map(|l| l.failover.iter())
            .filter_map(|name| self.dn_named(name));
        let by_config = (1..n).map(|k| (from + k) % n);
        let mut order: Vec<Dn> = Vec::new();
        for i in by_lease.chain(by_config) {
            if !order.contains(&i) && self.slots[i].state == SessionState::Up(Role::Secondary) {
                order.push(i);
            }
        }
        order.sort_by_key(|&i| (self.slots[i].retired, self.slots[i].draining));
        order
    }

    /// Moves the traffic off a primary being drained while it still delivers: the next
    /// secondary is told first (`Switch`), then the drained DN (`Demote`); nothing is resent.
    fn move_off(&mut self, from: Dn, out: &mut Vec<Action>) {
        if let Some(&next) = self.successors(from).first() {
            if !self.slots[next].draining && !self.slots[next].retired {
                self.hand_over(from, next, out);
            }
        }
    }

    /// The live primary `from` gives the traffic to the secondary `next`: `next` is told first.
    fn hand_over(&mut self, from: Dn, next: Dn, out: &mut Vec<Action>) {
        self.slots[from].state = SessionState::Up(Role::Secondary);
        self.slots[next].state = SessionState::Up(Role::Primary);
        self.primary = Some(next);
        out.push(Action::UsePrimary(Some(next)));
        out.push(Action::Switch(next));
        out.push(Action::Demote(from));
    }

    /// The DN that issued the client's ticket.
    pub fn home(&self) -> Option<Dn> {
        let issuer = &self.lease.as_ref()?.ticket.claim.issuer;
        self.dn_named(issuer)
    }

    /// Moves the traffic to the home DN if the client was told it is back and its session is up.
    fn go_home(&mut self, out: &mut Vec<Action>) {
        let (Some(home), Some(current)) = (self.home(), self.primary) else {
            return;
        };
        if !self.going_home
            || self.slots[home].state != SessionState::Up(Role::Secondary)
            || self.slots[home].draining
        {
            return;
        }
        self.going_home = false;
        if home == current {
            return;
        }
        self.slots[current].state = SessionState::Up(Role::Secondary);
        self.slots[home].state = SessionState::Up(Role::Primary);
        self.primary = Some(home);
        out.push(Action::UsePrimary(Some(home)));
        out.push(Action::Switch(home));
        out.push(Action::Demote(current));
    }

    fn on_leased(&mut self, d: Dn, lease: Lease, now: Instant, out: &mut Vec<Action>) {
        if self.slots[d].state != SessionState::Attaching {
            // The home DN renews the lease of a live session: the later ticket is the one to
            // present from now on.
            if let Some(ours) = &mut self.lease {
                let (old, new) = (&ours.ticket.claim, &lease.ticket.claim);
                if old.address == new.address
                    && old.issuer == new.issuer
                    && new.expires_at > old.expires_at
                {
                    *ours = lease;
                }
            }
            return;
        }
        // A DN still being drained says so again right after the lease.
        self.slots[d].draining = false;
        match &self.lease {
            Some(ours) if ours.ticket.claim.address != lease.ticket.claim.address => {
                // This DN would carry another address; the client has one already. Try again
                // later: by then the DN may accept the ticket.
                out.push(Action::Close(d));
                let loss = Loss::Closed(format!("leased {} instead", lease.ticket.claim.address));
                self.lose(d, loss, now, out);
                return;
            }
            Some(ours) => {
                // A renewed ticket (later expiry) replaces the old one.
                if lease.ticket.claim.expires_at > ours.ticket.claim.expires_at {
                    self.lease = Some(lease.clone());
                }
            }
            None => {
                self.lease = Some(lease.clone());
                self.leasing = None;
                out.push(Action::Configure(lease));
                for (i, slot) in self.slots.iter_mut().enumerate() {
                    if slot.state == SessionState::Ready {
                        slot.state = SessionState::Attaching;
                        out.push(Action::Attach(
                            i,
                            self.lease.as_ref().map(|l| l.ticket.clone()),
                        ));
                    }
                }
            }
        }
        self.slots[d].backoff.reset();
        if self.primary.is_none() {
            self.slots[d].state = SessionState::Up(Role::Primary);
            self.primary = Some(d);
            out.push(Action::UsePrimary(Some(d)));
        } else {
            self.slots[d].state = SessionState::Up(Role::Secondary);
            self.go_home(out);
            self.leave_retired_primary(now, out);
        }
    }

    fn live_sessions(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(s.state, SessionState::Up(_)))
            .count()
    }

    fn lose(&mut self, d: Dn, loss: Loss, now: Instant, out: &mut Vec<Action>) {
        if matches!(
            self.slots[d].state,
            SessionState::Waiting { .. } | SessionState::Retired
        ) {
            return;
        }
        let jitter = self.jitter();
        let slot = &mut self.slots[d];
        slot.state = if slot.retired {
            slot.close_at = None;
            SessionState::Retired
        } else {
            SessionState::Waiting {
                retry_at: now + slot.backoff.next_delay(jitter),
            }
        };
        slot.last_loss = Some(loss);
        if self.home() == Some(d) {
            // Home died again: wait to be told anew that it is back.
            self.going_home = false;
        }
        self.hand_over_leasing(d, out);
        if self.primary == Some(d) {
            self.primary = None;
            // The next live session in the lease's failover order (its block's designated
            // backup first), then in configuration order after the lost one; one being
            // drained only if no other is up, a retired one only if nothing else is.
            if let Some(&i) = self.successors(d).first() {
                self.slots[i].state = SessionState::Up(Role::Primary);
                // A retired DN in its grace stays until another session can take over.
                self.slots[i].close_at = None;
                self.primary = Some(i);
            }
            out.push(Action::UsePrimary(self.primary));
            if let Some(i) = self.primary {
                out.push(Action::Switch(i));
                out.push(Action::Resend { from: d, to: i });
            }
        }
    }

    /// The host's network changed under the client (an uplink came or went, the address or
    /// the default route moved): every live session is probed at once over its new path (the DN
    /// follows the client there on its first packet, and a path that does not carry is found
    /// out), and every DN waiting to be retried is tried now, its back-off started over: the
    /// failures it counted were on the old network.
    pub fn network_changed(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            match slot.state {
                SessionState::Up(_) => out.push(Action::Reprobe(i)),
                SessionState::Waiting { .. } => {
                    slot.backoff.reset();
                    slot.state = SessionState::Waiting { retry_at: now };
                }
                _ => {}
            }
        }
        out.extend(self.handle_timeout(now));
        out
    }

    /// `d` asked for the lease and will not get it: another session that is ready asks instead.
    fn hand_over_leasing(&mut self, d: Dn, out: &mut Vec<Action>) {
        if self.leasing != Some(d) {
            return;
        }
        self.leasing = None;
        if let Some(next) = self
            .slots
            .iter()
            .position(|s| s.state == SessionState::Ready)
        {
            self.leasing = Some(next);
            self.slots[next].state = SessionState::Attaching;
            out.push(Action::Attach(next, None));
        }
    }

    /// When [`Machine::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.slots
            .iter()
            .filter_map(|s| match s.state {
                SessionState::Waiting { retry_at } => Some(retry_at),
                _ => s.close_at,
            })
            .min()
    }

    /// Starts the reconnects that are due and closes retired DNs whose grace is over.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for i in 0..self.slots.len() {
            let slot = &mut self.slots[i];
            match slot.state {
                SessionState::Waiting { retry_at } if retry_at <= now => {
                    slot.state = SessionState::Connecting;
                    out.push(Action::Connect(i));
                }
                _ if slot.close_at.is_some_and(|t| t <= now) => self.close_retired(i, &mut out),
                _ => {}
            }
        }
        out
    }
}

/// What a reloaded DN list changes in the running one.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DnListChange {
    /// Running DNs that are no longer wanted as they are.
    pub retire: Vec<Dn>,
    /// Indices into the wanted list of the DNs to add.
    pub add: Vec<usize>,
}

/// Compares the running DNs (index and entry) with a reloaded list: an entry found unchanged
/// keeps its session; one that changed in any way (its endpoint, say) is retired and its new
/// form added, so that no session stays connected to what the file no longer says.
pub fn change_dn_list<T: PartialEq>(running: &[(Dn, T)], wanted: &[T]) -> DnListChange {
    DnListChange {
        retire: running
            .iter()
            .filter(|(_, entry)| !wanted.contains(entry))
            .map(|(dn, _)| *dn)
            .collect(),
        add: (0..wanted.len())
            .filter(|&i| !running.iter().any(|(_, entry)| *entry == wanted[i]))
            .collect(),
    }
}

/// The routes a client keeps for its lease, both families.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TunnelRoutes {
    /// Into the TUN device: the pushed networks of a family the lease has an address of, a
    /// default route as its two halves so that the host's own default route stays underneath
    /// (and is untouched when the tunnel goes).
    pub tunnel: Vec<IpNet>,
    /// Unreachable until the client exits: what must not leave outside the tunnel but cannot
    /// go into it. In a full tunnel (a default route pushed for either family), the other
    /// family's halves when the tunnel does not carry that family whole, and pushed networks of
    /// a family the lease has no address of.
    pub unreachable: Vec<IpNet>,
}

impl TunnelRoutes {
    /// Whether `ip` falls under one of these routes: a DN endpoint that does needs a host route
    /// of its own outside the tunnel.
    pub fn covers(&self, ip: &IpAddr) -> bool {
        self.tunnel
            .iter()
            .chain(&self.unreachable)
            .any(|n| n.contains(ip))
    }
}

/// A network as the routes that stand for it: a default route as its two halves.
pub fn halves(net: IpNet) -> Vec<IpNet> {
    if net.prefix_len() == 0 {
        net.subnets(1)
            .map(|s| s.collect())
            .unwrap_or_else(|_| vec![net])
    } else {
        vec![net]
    }
}

/// What a client routes for a lease of `addresses` (one, or one of each family) with the pushed
/// `routes`: in a full tunnel no traffic of either family leaves outside it.
pub fn tunnel_routes(routes: &[IpNet], addresses: &[IpAddr]) -> TunnelRoutes {
    let has = |v6: bool| addresses.iter().any(|a| a.is_ipv6() == v6);
    let default = |v6: bool| -> IpNet {
        if v6 {
            IpNet::V6(Default::default())
        } else {
            IpNet::V4(Default::default())
        }
    };
    let mut out = TunnelRoutes::default();
    for net in routes {
        let part = halves(*net);
        if has(net.addr().is_ipv6()) {
            out.tunnel.extend(part);
        } else {
            out.unreachable.extend(part);
        }
    }
    let full = routes.iter().any(|n| n.prefix_len() == 0);
    for v6 in [false, true] {
        if full && !routes.contains(&default(v6)) {
            out.unreachable.extend(halves(default(v6)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_tunnel_lets_neither_family_leave_outside_it() {
        let nets = |v: &[&str]| -> Vec<IpNet> { v.iter().map(|n| n.parse().unwrap()).collect() };
        let show = |r: &TunnelRoutes| {
            (
                r.tunnel.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                r.unreachable
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>(),
            )
        };
        let v4: IpAddr = "10.200.0.2".parse().unwrap();
        let v6: IpAddr = "fd00:200::2".parse().unwrap();
        // IPv4 only, split tunnel: as before dual stack.
        let r = tunnel_routes(&nets(&["10.0.2.0/24"]), &[v4]);
        assert_eq!(show(&r), (vec!["10.0.2.0/24".into()], vec![]));
        // A full IPv4 tunnel without an IPv6 address: IPv6 is unreachable, not leaked.
        let r = tunnel_routes(&nets(&["0.0.0.0/0"]), &[v4]);
        assert_eq!(
            show(&r),
            (
                vec!["0.0.0.0/1".into(), "128.0.0.0/1".into()],
                vec!["::/1".into(), "8000::/1".into()]
            )
        );
        assert!(r.covers(&"2001:db8::1".parse().unwrap()));
        // The other way round.
        let r = tunnel_routes(&nets(&["::/0"]), &[v6]);
        assert_eq!(
            show(&r).1,
            vec!["0.0.0.0/1".to_owned(), "128.0.0.0/1".to_owned()]
        );
        // Dual stack, both defaults pushed: both families into the tunnel.
        let r = tunnel_routes(&nets(&["0.0.0.0/0", "::/0"]), &[v4, v6]);
        assert_eq!(r.tunnel.len(), 4);
        assert!(r.unreachable.is_empty());
        // An IPv6 network pushed to a client without an IPv6 address cannot be carried, and
        // must not go outside either.
        let r = tunnel_routes(&nets(&["10.0.2.0/24", "fd00:2::/64"]), &[v4]);
        assert_eq!(
            show(&r),
            (vec!["10.0.2.0/24".into()], vec!["fd00:2::/64".into()])
        );
        assert!(!r.covers(&"192.0.2.1".parse().unwrap()));
    }
    use crate::lease::LeaseClaim;
    use ed25519_dalek::SigningKey;
    use proptest::prelude::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("dn{i}")).collect()
    }

    fn lease(address: &str, expires_at: u64) -> Lease {
        Lease {
            ticket: LeaseClaim {
                identity: "laptop".into(),
                address: address.parse().unwrap(),
                issuer: "dn0".into(),
                block: "10.200.0.0/24".parse().unwrap(),
                issued_at: 0,
                expires_at,
                address6: None,
            }
            .sign(&SigningKey::from_bytes(&[1; 32])),
            gateway: "10.200.0.1".parse().unwrap(),
            mtu: 1400,
            routes: vec![],
            failover: vec![],
            dns: Default::default(),
        }
    }

    /// Two DNs, both sessions up, dn0 (the lease's issuer, the client's home) primary.
    fn two_sessions_up(t0: Instant) -> (Machine, Lease) {
        let mut m = Machine::new(names(2), 3);
        m.start();
        let l = lease("10.200.0.2", 100);
        m.handle(Event::Connected(0), t0);
        m.handle(Event::Leased(0, Box::new(l.clone())), t0);
        m.handle(Event::Connected(1), t0);
        m.handle(Event::Leased(1, Box::new(l.clone())), t0);
        (m, l)
    }

    #[test]
    fn a_drained_primary_is_left_before_it_goes_and_taken_back_after() {
        let t0 = Instant::now();
        let (mut m, l) = two_sessions_up(t0);
        assert_eq!(m.primary(), Some(0));
        // Make before break: the secondary is told first, the drained DN keeps delivering.
        assert_eq!(
            m.handle(Event::Drain(0, true), t0),
            vec![
                Action::UsePrimary(Some(1)),
                Action::Switch(1),
                Action::Demote(0)
            ]
        );
        // Its session coming back does not take the client home while the drain lasts, and
        // the drained DN is the last resort when the other is lost.
        assert_eq!(m.handle(Event::HomeIsBack(1), t0), vec![]);
        assert_eq!(m.primary(), Some(1));
        assert_eq!(
            m.handle(Event::Drain(0, false), t0),
            vec![
                Action::UsePrimary(Some(0)),
                Action::Switch(0),
                Action::Demote(1)
            ]
        );
        // A drained secondary: nothing moves; on reattach the mark is cleared (the DN says it
        // again if the drain lasts).
        assert_eq!(m.handle(Event::Drain(1, true), t0), vec![]);
        assert!(m.is_draining(1));
        m.handle(Event::Lost(1, Loss::Closed("x".into())), t0);
        let later = t0 + RETRY_MAX * 2;
        assert_eq!(m.handle_timeout(later), vec![Action::Connect(1)]);
        m.handle(Event::Connected(1), later);
        m.handle(Event::Leased(1, Box::new(l)), later);
        assert!(!m.is_draining(1));
    }

    #[test]
    fn first_lease_wins_then_the_ticket_attaches_the_others() {
        let t0 = Instant::now();
        let mut m = Machine::new(names(3), 7);
        assert_eq!(
            m.start(),
            vec![Action::Connect(0), Action::Connect(1), Action::Connect(2)]
        );
        assert_eq!(
            m.handle(Event::Connected(1), t0),
            vec![Action::Attach(1, None)]
        );
        assert_eq!(m.handle(Event::Connected(0), t0), vec![]);
        let l = lease("10.200.0.2", 100);
        let acts = m.handle(Event::Leased(1, Box::new(l.clone())), t0);
        assert_eq!(
            acts,
            vec![
                Action::Configure(l.clone()),
                Action::Attach(0, Some(l.ticket.clone())),
                Action::UsePrimary(Some(1))
            ]
        );
        assert_eq!(
            m.handle(Event::Connected(2), t0),
            vec![Action::Attach(2, Some(l.ticket.clone()))]
        );
        assert_eq!(m.handle(Event::Leased(0, Box::new(l.clone())), t0), vec![]);
        assert_eq!(m.state(0), Some(&SessionState::Up(Role::Secondary)));
        // The primary dies: the next live session in order takes over at once, and is told.
        assert_eq!(
            m.handle(Event::Lost(1, Loss::ProbeTimeout), t0),
            vec![
                Action::UsePrimary(Some(0)),
                Action::Switch(0),
                Action::Resend { from: 1, to: 0 }
            ]
        );
        assert!(matches!(m.state(1), Some(SessionState::Waiting { .. })));
        // And it is reconnected in the background.
        let due = m.poll_timeout().unwrap();
        assert!(due > t0 && due <= t0 + RETRY_BASE);
        assert_eq!(m.handle_timeout(due), vec![Action::Connect(1)]);
        assert_eq!(
            m.handle(Event::Connected(1), due),
            vec![Action::Attach(1, Some(l.ticket.clone()))]
        );
    }

    #[test]
    fn failover_follows_the_lease_order() {
        let t0 = Instant::now();
        let mut m = Machine::new(names(3), 5);
        m.start();
        let mut l = lease("10.200.0.2", 100);
        l.failover = vec!["dn0".into(), "dn2".into()];
        m.handle(Event::Connected(1), t0);
        m.handle(Event::Leased(1, Box::new(l.clone())), t0);
        for d in [2, 0] {
            m.handle(Event::Connected(d), t0);
            m.handle(Event::Leased(d, Box::new(l.clone())), t0);
        }
        // Configuration order after dn1 would be dn2; the lease says dn0.
        assert_eq!(
            m.handle(Event::Lost(1, Loss::ProbeTimeout), t0),
            vec![
                Action::UsePrimary(Some(0)),
                Action::Switch(0),
                Action::Resend { from: 1, to: 0 }
            ]
        );
    }

    #[test]
    fn a_lease_for_another_address_is_closed() {
        let t0 = Instant::now();
        let mut m = Machine::new(names(2), 1);
        m.start();
        m.handle(Event::Connected(0), t0);
        m.handle(Event::Leased(0, Box::new(lease("10.200.0.2", 100))), t0);
        m.handle(Event::Connected(1), t0);
        assert_eq!(
            m.handle(Event::Leased(1, Box::new(lease("10.200.0.9", 100))), t0),
            vec![Action::Close(1)]
        );
    }

    #[test]
    fn when_every_session_is_gone_nothing_carries_traffic_and_all_reconnect() {
        let t0 = Instant::now();
        let (mut m, l) = two_sessions_up(t0);
        assert_eq!(
            m.handle(Event::Lost(0, Loss::Unreachable), t0),
            vec![
                Action::UsePrimary(Some(1)),
                Action::Switch(1),
                Action::Resend { from: 0, to: 1 }
            ]
        );
        assert_eq!(
            m.handle(Event::Lost(1, Loss::Closed("reset".into())), t0),
            vec![Action::UsePrimary(None)]
        );
        let later = t0 + RETRY_MAX;
        assert_eq!(
            m.handle_timeout(later),
            vec![Action::Connect(0), Action::Connect(1)]
        );
        // The client still holds its ticket and presents it.
        assert_eq!(
            m.handle(Event::Connected(1), later),
            vec![Action::Attach(1, Some(l.ticket.clone()))]
        );
        assert_eq!(
            m.handle(Event::Leased(1, Box::new(l)), later),
            vec![Action::UsePrimary(Some(1))]
        );
    }

    #[test]
    fn told_home_is_back_the_client_moves_home_once_its_session_is_up() {
        let t0 = Instant::now();
        let (mut m, l) = two_sessions_up(t0);
        assert_eq!(m.home(), Some(0));
        m.handle(Event::Lost(0, Loss::ProbeTimeout), t0);
        assert_eq!(m.primary(), Some(1));
        // Only the primary's word counts, and home is not up yet: nothing moves.
        assert_eq!(m.handle(Event::HomeIsBack(1), t0), vec![]);
        let later = t0 + RETRY_MAX;
        assert_eq!(m.handle_timeout(later), vec![Action::Connect(0)]);
        m.handle(Event::Connected(0), later);
        assert_eq!(
            m.handle(Event::Leased(0, Box::new(l.clone())), later),
            vec![
                Action::UsePrimary(Some(0)),
                Action::Switch(0),
                Action::Demote(1)
            ]
        );
        assert_eq!(m.state(1), Some(&SessionState::Up(Role::Secondary)));
        // Told again while home: nothing to do.
        assert_eq!(m.handle(Event::HomeIsBack(0), later), vec![]);
    }

    #[test]
    fn home_that_dies_again_must_be_announced_again() {
        let t0 = Instant::now();
        let (mut m, l) = two_sessions_up(t0);
        m.handle(Event::Lost(0, Loss::ProbeTimeout), t0);
        assert_eq!(
            m.handle(Event::HomeIsBack(0), t0),
            vec![],
            "not the primary"
        );
        m.handle(Event::HomeIsBack(1), t0);
        let t1 = t0 + RETRY_MAX;
        m.handle_timeout(t1);
        m.handle(Event::Connected(0), t1);
        // The home session fails before its lease: the notice is void.
        m.handle(Event::Lost(0, Loss::Unreachable), t1);
        let t2 = t1 + RETRY_MAX;
        m.handle_timeout(t2);
        m.handle(Event::Connected(0), t2);
        assert_eq!(m.handle(Event::Leased(0, Box::new(l)), t2), vec![]);
        assert_eq!(m.primary(), Some(1));
    }

    #[test]
    fn only_news_of_the_primarys_death_moves_the_client() {
        let t0 = Instant::now();
        let (mut m, _) = two_sessions_up(t0);
        // dn0, the primary, says dn1 is down: a split cluster says that of both sides.
        assert_eq!(m.handle(Event::PeerDown(1), t0), vec![]);
        assert_eq!(m.state(1), Some(&SessionState::Up(Role::Secondary)));
        // dn1 says dn0, the primary, is down: switch now.
        assert_eq!(
            m.handle(Event::PeerDown(0), t0),
            vec![
                Action::Close(0),
                Action::UsePrimary(Some(1)),
                Action::Switch(1),
                Action::Resend { from: 0, to: 1 }
            ]
        );
    }

    #[test]
    fn an_unreachable_hint_ends_an_attempt_but_only_checks_a_session() {
        let t0 = Instant::now();
        let (mut m, _) = two_sessions_up(t0);
        assert_eq!(
            m.handle(Event::Unreachable(0), t0),
            vec![Action::CheckNow(0)]
        );
        assert_eq!(m.primary(), Some(0));
        m.handle(Event::Lost(1, Loss::ProbeTimeout), t0);
        m.handle_timeout(t0 + RETRY_MAX);
        assert_eq!(m.state(1), Some(&SessionState::Connecting));
        assert_eq!(
            m.handle(Event::Unreachable(1), t0 + RETRY_MAX),
            vec![Action::Close(1)]
        );
        assert_eq!(m.last_loss(1), Some(&Loss::Unreachable));
    }

    #[test]
    fn a_reloaded_list_keeps_what_is_unchanged() {
        let running = [(0, ("dn0", 1)), (1, ("dn1", 1)), (3, ("dn3", 1))];
        let wanted = [("dn1", 1), ("dn3", 2), ("dn4", 1)];
        assert_eq!(
            change_dn_list(&running, &wanted),
            DnListChange {
                retire: vec![0, 3],
                add: vec![1, 2]
            }
        );
        assert_eq!(
            change_dn_list(&running, &running.map(|(_, e)| e)),
            DnListChange::default()
        );
    }

    #[test]
    fn a_retired_primary_hands_over_before_it_is_closed() {
        let t0 = Instant::now();
        let (mut m, l) = two_sessions_up(t0);
        // Make before break, as for a drain; the session is closed after the grace.
        assert_eq!(
            m.retire(0, t0),
            vec![
                Action::UsePrimary(Some(1)),
                Action::Switch(1),
                Action::Demote(0)
            ]
        );
        assert_eq!(m.poll_timeout(), Some(t0 + RETIRE_GRACE));
        assert_eq!(m.handle_timeout(t0 + RETIRE_GRACE), vec![Action::Close(0)]);
        assert_eq!(m.state(0), Some(&SessionState::Retired));
        assert_eq!(m.poll_timeout(), None);
        // Late reports about it change nothing, and it is never reconnected.
        assert_eq!(m.handle(Event::Lost(0, Loss::ProbeTimeout), t0), vec![]);
        assert_eq!(m.handle_timeout(t0 + RETRY_MAX * 10), vec![]);
        // The retired DN was the lease's issuer: the client's home is gone, and a DN of the
        // same name added again is a new one, the home from now on.
        assert_eq!(m.home(), None);
        let (dn, acts) = m.add("dn0".into());
        assert_eq!((dn, acts), (2, vec![Action::Connect(2)]));
        assert_eq!(m.home(), Some(2));
        assert_eq!(
            m.handle(Event::Connected(2), t0),
            vec![Action::Attach(2, Some(l.ticket.clone()))]
        );
        m.handle(Event::HomeIsBack(1), t0);
        assert_eq!(
            m.handle(Event::Leased(2, Box::new(l)), t0),
            vec![
                Action::UsePrimary(Some(2)),
                Action::Switch(2),
                Action::Demote(1)
            ]
        );
        assert_eq!(m.configured().collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn a_retired_primary_alone_carries_the_traffic_until_a_new_dn_is_up() {
        let t0 = Instant::now();
        let mut m = Machine::new(names(1), 9);
        m.start();
        let l = lease("10.200.0.2", 100);
        m.handle(Event::Connected(0), t0);
        m.handle(Event::Leased(0, Box::new(l.clone())), t0);
        assert_eq!(m.retire(0, t0), vec![]);
        assert_eq!(m.primary(), Some(0));
        let (dn, _) = m.add("dn9".into());
        m.handle(Event::Connected(dn), t0);
        assert_eq!(
            m.handle(Event::Leased(dn, Box::new(l)), t0),
            vec![
                Action::UsePrimary(Some(1)),
                Action::Switch(1),
                Action::Demote(0)
            ]
        );
        assert_eq!(m.handle_timeout(t0 + RETIRE_GRACE), vec![Action::Close(0)]);
    }

    #[test]
    fn a_retired_dn_that_was_asked_for_the_lease_hands_the_request_on() {
        let t0 = Instant::now();
        let mut m = Machine::new(names(2), 9);
        m.start();
        m.handle(Event::Connected(0), t0);
        m.handle(Event::Connected(1), t0);
        assert_eq!(
            m.retire(0, t0),
            vec![Action::Close(0), Action::Attach(1, None)]
        );
        // A DN that was waiting for a retry is simply forgotten.
        m.handle(Event::Lost(1, Loss::ProbeTimeout), t0);
        assert_eq!(m.retire(1, t0), vec![]);
        assert_eq!(m.poll_timeout(), None);
    }

    #[test]
    fn a_network_change_reprobes_live_sessions_and_retries_the_others_now() {
        let t0 = Instant::now();
        let (mut m, _) = two_sessions_up(t0);
        // dn1 lost twice: its back-off has grown.
        m.handle(Event::Lost(1, Loss::ProbeTimeout), t0);
        let t1 = t0 + RETRY_MAX;
        m.handle_timeout(t1);
        m.handle(Event::Lost(1, Loss::ConnectFailed("no route".into())), t1);
        assert_eq!(
            m.network_changed(t1),
            vec![Action::Reprobe(0), Action::Connect(1)]
        );
        // The back-off started over: the next failure waits the base delay at most.
        m.handle(Event::Lost(1, Loss::ConnectFailed("no route".into())), t1);
        assert!(m.poll_timeout().is_some_and(|t| t <= t1 + RETRY_BASE));
    }

    /// What the simulated world does next.
    #[derive(Debug, Clone)]
    enum Step {
        /// A pending handshake with DN i completes.
        Connect(usize),
        /// A pending Attach on DN i is answered.
        Answer(usize),
        /// DN i refuses a pending Attach.
        Refuse(usize),
        /// DN i's session (or attempt) dies.
        Kill(usize),
        /// Time passes.
        Wait(u64),
        /// DN i says the client's home is back.
        HomeIsBack(usize),
        /// DN i is taken out of the configuration.
        Retire(usize),
        /// The host's network changed.
        NetworkChanged,
    }

    fn step(n: usize) -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..n).prop_map(Step::Connect),
            3 => (0..n).prop_map(Step::Answer),
            1 => (0..n).prop_map(Step::Refuse),
            2 => (0..n).prop_map(Step::Kill),
            2 => (0u64..3000).prop_map(Step::Wait),
            1 => (0..n).prop_map(Step::HomeIsBack),
            1 => (0..n).prop_map(Step::Retire),
            1 => Just(Step::NetworkChanged),
        ]
    }

    proptest! {
        /// Against a simulated cluster that connects, answers, refuses and kills sessions in
        /// any order: exactly the primary carries traffic, the primary is always a live session,
        /// a live session exists only with a lease, there is a primary whenever any session is
        /// up, and every lost session is retried within the back-off cap.
        #[test]
        fn sessions_fail_over_and_come_back(n in 1usize..5, steps in proptest::collection::vec(step(4), 1..120), seed in any::<u64>()) {
            let t0 = Instant::now();
            let mut now = t0;
            let mut m = Machine::new(names(n), seed);
            let the_lease = lease("10.200.0.2", 1_000_000);
            // What the world has been asked to do.
            let mut connecting = vec![false; n];
            let mut attaching = vec![false; n];
            let mut carrier: Option<usize> = None;
            let mut retired = vec![false; n];
            let apply = |acts: Vec<Action>, connecting: &mut [bool], attaching: &mut [bool], carrier: &mut Option<usize>| {
                for a in acts {
                    match a {
                        Action::Connect(i) => connecting[i] = true,
                        Action::Attach(i, _) => attaching[i] = true,
                        Action::UsePrimary(p) => *carrier = p,
                        Action::Demote(_) | Action::Configure(_) | Action::Close(_) | Action::CheckNow(_) | Action::Switch(_) | Action::Resend { .. } | Action::Reprobe(_) => {}
                    }
                }
            };
            let acts = m.start();
            apply(acts, &mut connecting, &mut attaching, &mut carrier);
            for s in steps {
                let acts = match s.clone() {
                    Step::Connect(i) if i < n && connecting[i] => { connecting[i] = false; m.handle(Event::Connected(i), now) }
                    Step::Answer(i) if i < n && attaching[i] => { attaching[i] = false; m.handle(Event::Leased(i, Box::new(the_lease.clone())), now) }
                    Step::Refuse(i) if i < n && attaching[i] => { attaching[i] = false; m.handle(Event::Refused(i, RefuseCode::PoolExhausted), now) }
                    Step::Kill(i) if i < n => { connecting[i] = false; attaching[i] = false; m.handle(Event::Lost(i, Loss::ProbeTimeout), now) }
                    Step::Wait(ms) => { now += Duration::from_millis(ms); m.handle_timeout(now) }
                    Step::HomeIsBack(i) if i < n => m.handle(Event::HomeIsBack(i), now),
                    Step::Retire(i) if i < n => { retired[i] = true; m.retire(i, now) }
                    Step::NetworkChanged => m.network_changed(now),
                    _ => continue,
                };
                // A demoted DN was the primary, is live, and the client is now at home. Packets
                // are sent again only from a lost primary to the new one.
                let before = carrier;
                for a in &acts {
                    if let Action::Demote(d) = a {
                        prop_assert_eq!(Some(*d), before);
                        prop_assert_eq!(m.state(*d), Some(&SessionState::Up(Role::Secondary)));
                        // Left for home, or because it was taken out of the configuration.
                        prop_assert!(m.primary() == m.home() || retired[*d]);
                    }
                    if let Action::Resend { from, to } = a {
                        prop_assert_eq!(Some(*from), before);
                        prop_assert_eq!(Some(*to), m.primary());
                        prop_assert!(!matches!(m.state(*from), Some(SessionState::Up(_))));
                    }
                }
                let acts_seen = acts.clone();
                apply(acts, &mut connecting, &mut attaching, &mut carrier);

                // The shell's view (last UsePrimary) and the machine's agree.
                prop_assert_eq!(carrier, m.primary());
                let primaries: Vec<usize> = (0..n).filter(|&i| m.state(i) == Some(&SessionState::Up(Role::Primary))).collect();
                match m.primary() {
                    Some(p) => prop_assert_eq!(primaries, vec![p]),
                    None => {
                        prop_assert!(primaries.is_empty());
                        prop_assert!((0..n).all(|i| !matches!(m.state(i), Some(SessionState::Up(_)))), "a live session but no primary");
                    }
                }
                if (0..n).any(|i| matches!(m.state(i), Some(SessionState::Up(_)))) {
                    prop_assert!(m.lease().is_some());
                }
                // A retired DN is never connected again, carries the traffic only while no
                // configured session can, and is otherwise closed within the grace.
                for a in &acts_seen {
                    if let Action::Connect(i) = a {
                        prop_assert!(!retired[*i], "a retired DN reconnected");
                    }
                }
                if let Some(p) = m.primary().filter(|&p| retired[p]) {
                    prop_assert!((0..n).all(|i| i == p || retired[i] || !matches!(m.state(i), Some(SessionState::Up(_)))));
                }
                for i in (0..n).filter(|&i| retired[i]) {
                    let st = m.state(i).cloned();
                    match st {
                        Some(SessionState::Retired) => {}
                        Some(SessionState::Up(_)) => prop_assert!(m.primary() == Some(i) || m.poll_timeout().is_some_and(|t| t <= now + RETIRE_GRACE)),
                        other => prop_assert!(false, "retired DN {} in {:?}", i, other),
                    }
                }
                // Nothing waits longer than the cap to be retried.
                if let Some(t) = m.poll_timeout() {
                    prop_assert!(t <= now + RETRY_MAX);
                }
                // No retry is overdue once timeouts have been handled.
                if matches!(s, Step::Wait(_)) {
                    for i in 0..n {
                        if let Some(SessionState::Waiting { retry_at }) = m.state(i) {
                            prop_assert!(*retry_at > now, "an overdue retry");
                        }
                    }
                }
                // A session the world is not working on is waiting for a retry, or up.
                for i in 0..n {
                    let st = m.state(i).cloned();
                    match st {
                        Some(SessionState::Connecting) => prop_assert!(connecting[i]),
                        Some(SessionState::Attaching) => prop_assert!(attaching[i]),
                        _ => {}
                    }
                }
            }
        }
    }
}
