//! The DN's address decisions: who may hold which address, and what ticket proves it.
//!
//! [`LeaseBook`] is consulted when a session attaches. It never trusts a claim without a ticket
//! that verifies, keeps an address reserved for its holder until the lease expires (so a client
//! that reconnects gets the same address back), and hands out free addresses block by block.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use ed25519_dalek::SigningKey;

use crate::control::RefuseCode;
use crate::lease::{IssuerKeys, Lease6, LeaseClaim, LeaseTicket, TicketError};
use crate::plan::PoolPlan;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    #[error("{0}")]
    BadTicket(#[from] TicketError),
    #[error("address {address} is leased to another client until {until}")]
    AddressTaken { address: IpAddr, until: u64 },
    #[error("address {0} is not a client address of this DN's pool")]
    NotLeasable(IpAddr),
    #[error("no free address left in block {0}")]
    PoolExhausted(ipnet::IpNet),
    #[error("every block of pool {0} is served by another DN until its clients come home")]
    PoolHeld(ipnet::IpNet),
    #[error("this DN is being drained and takes no new client")]
    Draining,
}

impl AttachError {
    pub fn refuse_code(&self) -> RefuseCode {
        match self {
            AttachError::BadTicket(_) => RefuseCode::BadTicket,
            AttachError::AddressTaken { .. } | AttachError::NotLeasable(_) => {
                RefuseCode::AddressUnavailable
            }
            AttachError::PoolExhausted(_) | AttachError::PoolHeld(_) | AttachError::Draining => {
                RefuseCode::PoolExhausted
            }
        }
    }
}

/// What an accepted attach gives the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// An address of this DN's own pool, with a freshly signed ticket (renewed expiry).
    Home(LeaseTicket),
    /// A valid ticket issued by another DN: this DN carries the client at that address without
    /// owning it (a secondary session, or a client whose home DN is down).
    Foreign(LeaseTicket),
}

impl Grant {
    pub fn ticket(&self) -> &LeaseTicket {
        match self {
            Grant::Home(t) | Grant::Foreign(t) => t,
        }
    }
}

#[derive(Debug, Clone)]
struct Held {
    identity: String,
    expires_at: u64,
}

/// One lease of the DN's own pool as the DN keeps it across restarts: without it, a restarted
/// DN could give an address whose ticket is still valid to another client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    pub identity: String,
    pub address: IpAddr,
    pub expires_at: u64,
    /// The IPv6 address of a dual-stack lease.
    pub address6: Option<Ipv6Addr>,
}

/// The journal's word for an empty identity; not a base64 character, so never an identity.
const EMPTY_IDENTITY: &str = "-";

impl LeaseRecord {
    pub fn of(claim: &LeaseClaim) -> Self {
        Self {
            identity: claim.identity.clone(),
            address: claim.address,
            expires_at: claim.expires_at,
            address6: claim.address6.map(|v6| v6.address),
        }
    }

    /// One line of the DN's lease journal: `EXPIRES ADDRESS IDENTITY [ADDRESS6]`, the identity
    /// in base64 so that any certificate name fits on one line; a lease without IPv6 has no
    /// fourth field, as before dual stack. An empty identity (a certificate whose
    /// common name is empty) is written [`EMPTY_IDENTITY`]: an empty last field would be
    /// trimmed away with the line break, and the line taken for a torn write.
    pub fn to_line(&self) -> String {
        use base64::Engine;
        let identity = match self.identity.as_str() {
            "" => EMPTY_IDENTITY.to_owned(),
            id => base64::engine::general_purpose::STANDARD.encode(id),
        };
        match self.address6 {
            Some(v6) => format!("{} {} {identity} {v6}", self.expires_at, self.address),
            None => format!("{} {} {identity}", self.expires_at, self.address),
        }
    }

    /// `None` for a line that is not a record (a torn last write, say).
    pub fn from_line(line: &str) -> Option<Self> {
        use base64::Engine;
        let mut parts = line.trim().split(' ');
        let expires_at = parts.next()?.parse().ok()?;
        let address = parts.next()?.parse().ok()?;
        let identity = match parts.next()? {
            EMPTY_IDENTITY => Vec::new(),
            b64 => base64::engine::general_purpose::STANDARD.decode(b64).ok()?,
        };
        let address6 = match parts.next() {
            Some(v6) => Some(v6.parse().ok()?),
            None => None,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            identity: String::from_utf8(identity).ok()?,
            address,
            expires_at,
            address6,
        })
    }
}

pub struct LeaseBook {
    name: String,
    plan: PoolPlan,
    /// A dual-stack DN's IPv6 pool: each lease gets the IPv6 twin of its IPv4 address
    /// ([`PoolPlan::twin`]), so the IPv4 book decides both.
    plan6: Option<PoolPlan>,
    signing_key: SigningKey,
    keys: IssuerKeys,
    lifetime_secs: u64,
    by_address: HashMap<IpAddr, Held>,
    by_identity: HashMap<String, IpAddr>,
    /// Where the next search for a free address starts, per block.
    cursors: Vec<u128>,
    /// Own blocks another DN serves actively: their addresses may belong to clients it
    /// carries, whose tickets this DN (restarted, its book empty) no longer remembers.
    held: std::collections::BTreeSet<ipnet::IpNet>,
}

impl LeaseBook {
    pub fn new(
        name: impl Into<String>,
        plan: PoolPlan,
        signing_key: SigningKey,
        keys: IssuerKeys,
        lifetime_secs: u64,
    ) -> Self {
        let cursors = vec![0; plan.blocks.len()];
        Self {
            name: name.into(),
            plan,
            plan6: None,
            signing_key,
            keys,
            lifetime_secs,
            by_address: HashMap::new(),
            by_identity: HashMap::new(),
            cursors,
            held: Default::default(),
        }
    }

    /// Leases an IPv6 address from `plan6` beside each IPv4 one.
    pub fn with_plan6(mut self, plan6: Option<PoolPlan>) -> Self {
        self.plan6 = plan6;
        self
    }

    /// The IPv6 half of the lease at `address`, on a dual-stack DN.
    fn twin(&self, address: IpAddr) -> Option<Lease6> {
        let (twin, block) = self.plan.twin(address, self.plan6.as_ref()?)?;
        match twin {
            IpAddr::V6(address) => Some(Lease6 { address, block }),
            IpAddr::V4(_) => None,
        }
    }

    /// Takes back the leases a DN kept across a restart (oldest first; a later record for an
    /// address replaces an earlier one). Expired ones and addresses outside the pool are dropped.
    pub fn restore(&mut self, records: impl IntoIterator<Item = LeaseRecord>, now: u64) {
        for r in records {
            if r.expires_at <= now || !self.plan.is_leasable(r.address) {
                continue;
            }
            self.record(&r.identity, r.address, r.expires_at);
        }
    }

    /// Every unexpired lease, for a compacted journal.
    pub fn records(&self, now: u64) -> Vec<LeaseRecord> {
        let mut out: Vec<LeaseRecord> = self
            .by_address
            .iter()
            .filter(|(_, h)| h.expires_at > now)
            .map(|(address, h)| LeaseRecord {
                identity: h.identity.clone(),
                address: *address,
                expires_at: h.expires_at,
                address6: self.twin(*address).map(|v6| v6.address),
            })
            .collect();
        out.sort_by_key(|r| r.expires_at);
        out
    }

    /// Stops (or resumes) allocating from the own blocks another DN serves actively.
    pub fn set_held(&mut self, held: std::collections::BTreeSet<ipnet::IpNet>) {
        self.held = held;
    }

    pub fn plan(&self) -> &PoolPlan {
        &self.plan
    }

    /// Number of unexpired leases of this DN's own pool.
    pub fn active_leases(&self, now: u64) -> usize {
        self.by_address
            .values()
            .filter(|h| h.expires_at > now)
            .count()
    }

    /// Decides an attach by `identity` (already authenticated by its certificate), presenting
    /// `ticket` if it has one.
    pub fn attach(
        &mut self,
        identity: &str,
        ticket: Option<&LeaseTicket>,
        now: u64,
    ) -> Result<Grant, AttachError> {
        if let Some(ticket) = ticket {
            let claim = ticket.verify_for(&self.keys, identity, now)?;
            if claim.issuer != self.name {
                return Ok(Grant::Foreign(ticket.clone()));
            }
            let address = claim.address;
            if !self.plan.is_leasable(address) {
                return Err(AttachError::NotLeasable(address));
            }
            if let Some(held) = self.by_address.get(&address) {
                if held.identity != identity && held.expires_at > now {
                    return Err(AttachError::AddressTaken {
                        address,
                        until: held.expires_at,
                    });
                }
            }
            return Ok(Grant::Home(self.lease(identity, address, now)));
        }
        if let Some(&address) = self.by_identity.get(identity) {
            if self
                .by_address
                .get(&address)
                .is_some_and(|h| h.expires_at > now)
            {
                return Ok(Grant::Home(self.lease(identity, address, now)));
            }
        }
        let address = self.allocate(now)?;
        Ok(Grant::Home(self.lease(identity, address, now)))
    }

    /// A later expiry for the lease `identity` holds at `address`, if it still holds it.
    pub fn renew(&mut self, identity: &str, address: IpAddr, now: u64) -> Option<LeaseTicket> {
        let holds = self
            .by_address
            .get(&address)
            .is_some_and(|h| h.identity == identity);
        holds.then(|| self.lease(identity, address, now))
    }

    /// Records `identity` at `address` and signs a ticket for it.
    fn lease(&mut self, identity: &str, address: IpAddr, now: u64) -> LeaseTicket {
        let expires_at = now.saturating_add(self.lifetime_secs);
        self.record(identity, address, expires_at);
        let block = self
            .plan
            .block_containing(address)
            .map(|b| b.net)
            .unwrap_or(self.plan.pool);
        LeaseClaim {
            identity: identity.to_owned(),
            address,
            issuer: self.name.clone(),
            block,
            issued_at: now,
            expires_at,
            address6: self.twin(address),
        }
        .sign(&self.signing_key)
    }

    fn record(&mut self, identity: &str, address: IpAddr, expires_at: u64) {
        if let Some(old) = self.by_identity.insert(identity.to_owned(), address) {
            if old != address
                && self
                    .by_address
                    .get(&old)
                    .is_some_and(|h| h.identity == identity)
            {
                self.by_address.remove(&old);
            }
        }
        if let Some(prev) = self.by_address.insert(
            address,
            Held {
                identity: identity.to_owned(),
                expires_at,
            },
        ) {
            // An expired lease of someone else at this address is gone for good.
            if prev.identity != identity && self.by_identity.get(&prev.identity) == Some(&address) {
                self.by_identity.remove(&prev.identity);
            }
        }
    }

    /// A free address from the least-used block.
    fn allocate(&mut self, now: u64) -> Result<IpAddr, AttachError> {
        let load = |net: ipnet::IpNet| {
            self.by_address
                .iter()
                .filter(|(a, h)| net.contains(*a) && h.expires_at > now)
                .count()
        };
        let (index, block) = self
            .plan
            .blocks
            .iter()
            .enumerate()
            .filter(|(i, b)| {
                // A block is held if either family's half is: they move together.
                let twin = self.plan6.as_ref().and_then(|p| p.blocks.get(*i));
                !self.held.contains(&b.net) && !twin.is_some_and(|t| self.held.contains(&t.net))
            })
            .min_by_key(|(_, b)| load(b.net))
            .map(|(i, b)| (i, b.clone()))
            .ok_or(if self.held.is_empty() {
                AttachError::PoolExhausted(self.plan.pool)
            } else {
                AttachError::PoolHeld(self.plan.pool)
            })?;
        // Bounded so that a huge, nearly full IPv6 block cannot stall the DN.
        const MAX_PROBES: usize = 1 << 20;
        let found = self
            .plan
            .candidates(&block, self.cursors[index])
            .take(MAX_PROBES)
            .find(|a| self.by_address.get(a).is_none_or(|h| h.expires_at <= now));
        let address = found.ok_or(AttachError::PoolExhausted(block.net))?;
        self.cursors[index] = crate::plan::index_of(block.net.network(), address) + 1;
        Ok(address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn book(name: &str, pool: &str) -> LeaseBook {
        let mut keys = IssuerKeys::default();
        keys.insert("dn1", SigningKey::from_bytes(&[1; 32]).verifying_key());
        keys.insert("dn2", SigningKey::from_bytes(&[2; 32]).verifying_key());
        let seed = if name == "dn1" { 1 } else { 2 };
        let plan = PoolPlan::new(pool.parse().unwrap(), &["dnx".into()], None).unwrap();
        LeaseBook::new(name, plan, SigningKey::from_bytes(&[seed; 32]), keys, 100)
    }

    fn address(g: &Grant) -> IpAddr {
        g.ticket().claim.address
    }

    #[test]
    fn clients_get_distinct_addresses_and_keep_them() {
        let mut b = book("dn1", "10.200.0.0/24");
        let a = b.attach("a", None, 0).unwrap();
        let c = b.attach("c", None, 0).unwrap();
        assert_ne!(address(&a), address(&c));
        assert_eq!(address(&a).to_string(), "10.200.0.2");
        // Reconnect with and without the ticket.
        assert_eq!(
            address(&b.attach("a", Some(a.ticket()), 50).unwrap()),
            address(&a)
        );
        assert_eq!(address(&b.attach("a", None, 50).unwrap()), address(&a));
        assert_eq!(b.active_leases(50), 2);
    }

    #[test]
    fn a_ticket_for_someone_elses_address_is_refused() {
        let mut b = book("dn1", "10.200.0.0/24");
        let a = b.attach("a", None, 0).unwrap();
        // "c" presents a's ticket: identity mismatch.
        assert!(matches!(
            b.attach("c", Some(a.ticket()), 1),
            Err(AttachError::BadTicket(TicketError::WrongIdentity { .. }))
        ));
        // "c" holds a validly signed ticket for a's address (e.g. from an old lease).
        let forged = LeaseClaim {
            identity: "c".into(),
            address: address(&a),
            issuer: "dn1".into(),
            block: "10.200.0.0/24".parse().unwrap(),
            issued_at: 0,
            expires_at: 1000,
            address6: None,
        }
        .sign(&SigningKey::from_bytes(&[1; 32]));
        assert!(matches!(
            b.attach("c", Some(&forged), 1),
            Err(AttachError::AddressTaken { .. })
        ));
    }

    #[test]
    fn expired_leases_free_their_address() {
        let mut b = book("dn1", "10.200.0.0/30"); // one leasable address: .2
        let a = b.attach("a", None, 0).unwrap();
        assert!(matches!(
            b.attach("c", None, 99),
            Err(AttachError::PoolExhausted(_))
        ));
        let c = b.attach("c", None, 100).unwrap();
        assert_eq!(address(&c), address(&a));
        // a's old ticket has expired too.
        assert!(b.attach("a", Some(a.ticket()), 100).is_err());
    }

    #[test]
    fn held_blocks_are_not_allocated_from_but_their_tickets_still_attach() {
        let mut b = book("dn1", "10.200.0.0/24");
        let a = b.attach("a", None, 0).unwrap();
        let block = b.plan().blocks[0].net;
        let mut restarted = book("dn1", "10.200.0.0/24");
        restarted.set_held([block].into());
        assert_eq!(
            restarted.attach("c", None, 0),
            Err(AttachError::PoolHeld("10.200.0.0/24".parse().unwrap()))
        );
        // The client carried elsewhere comes home with its ticket.
        let back = restarted.attach("a", Some(a.ticket()), 1).unwrap();
        assert_eq!(address(&back), address(&a));
        restarted.set_held(Default::default());
        let c = restarted.attach("c", None, 1).unwrap();
        assert_ne!(address(&c), address(&a));
    }

    fn dual_book(name: &str) -> LeaseBook {
        let seed = if name == "dn1" { 1 } else { 2 };
        let mut keys = IssuerKeys::default();
        keys.insert("dn1", SigningKey::from_bytes(&[1; 32]).verifying_key());
        keys.insert("dn2", SigningKey::from_bytes(&[2; 32]).verifying_key());
        keys.insert_pool("dn1", "10.200.0.0/24".parse().unwrap());
        keys.insert_pool6("dn1", "fd00:200::/64".parse().unwrap());
        keys.insert_pool("dn2", "10.201.0.0/24".parse().unwrap());
        let (v4, v6) = if name == "dn1" {
            ("10.200.0.0/24", "fd00:200::/64")
        } else {
            ("10.201.0.0/24", "fd00:201::/64")
        };
        let plan = PoolPlan::new(v4.parse().unwrap(), &["dnx".into()], None).unwrap();
        let plan6 = PoolPlan::new(v6.parse().unwrap(), &["dnx".into()], None).unwrap();
        LeaseBook::new(name, plan, SigningKey::from_bytes(&[seed; 32]), keys, 100)
            .with_plan6(Some(plan6))
    }

    #[test]
    fn a_dual_stack_lease_carries_both_addresses_everywhere_and_across_a_restart() {
        let mut dn1 = dual_book("dn1");
        let a = dn1.attach("a", None, 0).unwrap();
        let v6 = a.ticket().claim.address6.unwrap();
        assert_eq!(
            (address(&a).to_string(), v6.address.to_string()),
            ("10.200.0.2".into(), "fd00:200::2".into())
        );
        // A backup carries the ticket for both.
        let mut dn2 = dual_book("dn2");
        match dn2.attach("a", Some(a.ticket()), 1).unwrap() {
            Grant::Foreign(f) => assert_eq!(f.claim.address6, Some(v6)),
            other => panic!("expected a foreign grant, got {other:?}"),
        }
        // The journal keeps both; a restarted DN gives both back, and no one else either.
        let records = dn1.records(1);
        assert_eq!(records[0].address6, Some(v6.address));
        let lines: Vec<String> = records.iter().map(|r| r.to_line()).collect();
        let mut again = dual_book("dn1");
        again.restore(lines.iter().filter_map(|l| LeaseRecord::from_line(l)), 1);
        let back = again.attach("a", None, 2).unwrap();
        assert_eq!(back.ticket().claim.address6, Some(v6));
        let c = again.attach("c", None, 2).unwrap();
        assert_ne!(c.ticket().claim.address6.unwrap().address, v6.address);
        // A held IPv6 block holds its IPv4 twin too.
        let mut held = dual_book("dn1");
        held.set_held([held.plan6.as_ref().unwrap().blocks[0].net].into());
        assert!(held.attach("d", None, 0).is_err());
    }

    #[test]
    fn foreign_tickets_are_carried_not_owned() {
        let mut dn2 = book("dn2", "10.201.0.0/24");
        let mut dn1 = book("dn1", "10.200.0.0/24");
        let t = dn1.attach("a", None, 0).unwrap();
        match dn2.attach("a", Some(t.ticket()), 1).unwrap() {
            Grant::Foreign(f) => assert_eq!(&f, t.ticket()),
            other => panic!("expected a foreign grant, got {other:?}"),
        }
        assert_eq!(dn2.active_leases(1), 0);
    }

    #[test]
    fn journal_lines_read_back_even_with_an_empty_identity() {
        // Found by fuzzing: an empty identity was written as an empty last field, which the
        // reader trimmed away with the line break and took for a torn write, so a restarted DN
        // forgot that lease.
        for identity in ["", "laptop-1", "-", "CN with spaces\nand a line"] {
            let r = LeaseRecord {
                identity: identity.into(),
                address: "10.200.0.5".parse().unwrap(),
                expires_at: 170,
                address6: None,
            };
            let line = r.to_line() + "\n";
            assert_eq!(LeaseRecord::from_line(&line), Some(r), "{line:?}");
        }
        assert_eq!(
            LeaseRecord {
                identity: String::new(),
                address: "fd00::5".parse().unwrap(),
                expires_at: 7,
                address6: None,
            }
            .to_line(),
            "7 fd00::5 -"
        );
        let dual = LeaseRecord {
            identity: "a".into(),
            address: "10.200.0.5".parse().unwrap(),
            expires_at: 7,
            address6: Some("fd00:200::5".parse().unwrap()),
        };
        assert_eq!(dual.to_line(), "7 10.200.0.5 YQ== fd00:200::5");
        assert_eq!(LeaseRecord::from_line(&dual.to_line()), Some(dual));
        assert_eq!(LeaseRecord::from_line("7 10.200.0.5 YQ== 10.0.0.1x"), None);
        // A line cut before its identity is still no record.
        assert_eq!(LeaseRecord::from_line("170 10.200.0.5 \n"), None);
        assert_eq!(LeaseRecord::from_line("170 10.200.0.5"), None);
    }

    proptest! {
        /// Whatever the order of attaches, no two identities ever hold the same address at once,
        /// and every granted address is leasable.
        #[test]
        fn no_address_is_ever_shared(ops in proptest::collection::vec((0u8..6, any::<bool>(), 0u64..30), 1..60)) {
            let mut b = book("dn1", "10.200.0.0/28");
            let mut tickets: HashMap<String, LeaseTicket> = HashMap::new();
            let mut now = 0;
            for (who, with_ticket, dt) in ops {
                now += dt;
                let id = format!("c{who}");
                let t = if with_ticket { tickets.get(&id).cloned() } else { None };
                if let Ok(g) = b.attach(&id, t.as_ref(), now) {
                    prop_assert!(b.plan().is_leasable(address(&g)));
                    tickets.insert(id, g.ticket().clone());
                }
                let mut seen: HashMap<IpAddr, &str> = HashMap::new();
                for (id, t) in &tickets {
                    if t.claim.expires_at > now {
                        if let Some(other) = seen.insert(t.claim.address, id) {
                            prop_assert!(false, "{} and {} share {}", other, id, t.claim.address);
                        }
                    }
                }
            }
        }
    }
}
