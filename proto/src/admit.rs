//! Which incoming connections a DN spends handshake work and memory on.
//!
//! Anyone who can reach the DN's port can send QUIC Initials, each of which costs the DN a TLS
//! handshake (a signature, key exchange, connection state) before any certificate is checked.
//! A flood of them must neither starve the clients the DN carries nor look to the failure
//! detector like a hung DN. So:
//!
//! - Up to `retry_above` handshakes in flight, every Initial is served at once (no extra round
//!   trip for a client failing over or reconnecting).
//! - Above that, an Initial from an address not yet validated gets a QUIC Retry: a token the
//!   sender must echo from its real address. Answering costs the DN one MAC, no state; a
//!   spoofed flood ends there.
//! - A validated address may have at most `per_source` handshakes in flight; the DN as a whole
//!   at most `max_in_flight`. Beyond those the Initial is refused (validated) or dropped
//!   unanswered (not validated: no reflection towards a spoofed victim).
//! - After the handshake, one client identity may hold at most `unattached_per_identity`
//!   connections that have not attached yet: a client certificate does not buy unbounded
//!   connections, each holding stream and datagram buffers.
//!
//! [`Admission`] performs no I/O; the shell asks it about every `Incoming` and tells it when a
//! handshake ends and when a connection attaches or goes.

use std::collections::HashMap;
use std::net::IpAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionPolicy {
    /// Handshakes in flight above which unvalidated addresses are sent a Retry first.
    pub retry_above: usize,
    /// Handshakes in flight from one validated address.
    pub per_source: usize,
    /// Handshakes in flight in all.
    pub max_in_flight: usize,
    /// Connections one identity may hold that have not attached yet.
    pub unattached_per_identity: usize,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        Self {
            // A DN restarted under 10,000 clients sees them all reconnect at once; 256 keeps
            // that burst free of Retry round trips for most and bounds a flood's state.
            retry_above: 256,
            per_source: 64,
            max_in_flight: 4096,
            // A client holds one session per DN; a reconnect may overlap the old one.
            unattached_per_identity: 4,
        }
    }
}

/// What to do with an incoming connection attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Start the handshake. Call [`Admission::handshake_ended`] when it ends, either way.
    Accept,
    /// Answer with a QUIC Retry (address validation), keeping no state.
    Retry,
    /// Refuse with a CONNECTION_REFUSED close (the address is validated: no reflection).
    Refuse,
    /// Drop it unanswered.
    Ignore,
}

#[derive(Debug, Clone, Default)]
pub struct Admission {
    policy: AdmissionPolicy,
    in_flight: usize,
    by_source: HashMap<IpAddr, usize>,
    unattached: HashMap<String, usize>,
    /// Attempts answered other than with [`Verdict::Accept`], by verdict.
    pub retried: u64,
    pub refused: u64,
    pub ignored: u64,
    /// Connections closed because their identity held too many unattached ones.
    pub over_identity_limit: u64,
}

impl Admission {
    pub fn new(policy: AdmissionPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    pub fn policy(&self) -> AdmissionPolicy {
        self.policy
    }

    /// Handshakes started and not yet ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Decides an incoming connection attempt from `source`; `validated`: its address was
    /// proven (it echoed our Retry token).
    pub fn incoming(&mut self, source: IpAddr, validated: bool) -> Verdict {
        let source = source.to_canonical();
        let from_source = self.by_source.get(&source).copied().unwrap_or(0);
        let verdict = if !validated && self.in_flight >= self.policy.retry_above {
            Verdict::Retry
        } else if self.in_flight >= self.policy.max_in_flight
            || from_source >= self.policy.per_source
        {
            if validated {
                Verdict::Refuse
            } else {
                Verdict::Ignore
            }
        } else {
            Verdict::Accept
        };
        match verdict {
            Verdict::Accept => {
                self.in_flight += 1;
                *self.by_source.entry(source).or_insert(0) += 1;
            }
            Verdict::Retry => self.retried += 1,
            Verdict::Refuse => self.refused += 1,
            Verdict::Ignore => self.ignored += 1,
        }
        verdict
    }

    /// An accepted handshake from `source` ended (done or failed).
    pub fn handshake_ended(&mut self, source: IpAddr) {
        let source = source.to_canonical();
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(n) = self.by_source.get_mut(&source) {
            *n -= 1;
            if *n == 0 {
                self.by_source.remove(&source);
            }
        }
    }

    /// A handshake authenticated `identity`; `false`: it holds too many unattached connections
    /// already, close this one. On `true`, call [`Admission::attached_or_gone`] once the
    /// connection attaches or ends.
    pub fn identified(&mut self, identity: &str) -> bool {
        let held = self.unattached.get(identity).copied().unwrap_or(0);
        if held >= self.policy.unattached_per_identity {
            self.over_identity_limit += 1;
            return false;
        }
        *self.unattached.entry(identity.to_owned()).or_insert(0) += 1;
        true
    }

    /// A connection [`Admission::identified`] as `identity` attached (or was refused, or
    /// ended) and no longer counts as unattached.
    pub fn attached_or_gone(&mut self, identity: &str) {
        if let Some(n) = self.unattached.get_mut(identity) {
            *n -= 1;
            if *n == 0 {
                self.unattached.remove(identity);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> AdmissionPolicy {
        AdmissionPolicy {
            retry_above: 4,
            per_source: 2,
            max_in_flight: 6,
            unattached_per_identity: 2,
        }
    }

    fn ip(i: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, i])
    }

    #[test]
    fn a_quiet_dn_serves_every_initial_at_once() {
        let mut a = Admission::new(AdmissionPolicy::default());
        for i in 0..200 {
            assert_eq!(a.incoming(ip(i), false), Verdict::Accept);
        }
    }

    #[test]
    fn under_load_unvalidated_addresses_get_a_retry_and_validated_ones_a_place() {
        let mut a = Admission::new(policy());
        for i in 0..4 {
            assert_eq!(a.incoming(ip(i), false), Verdict::Accept);
        }
        assert_eq!(a.incoming(ip(9), false), Verdict::Retry);
        assert_eq!(a.incoming(ip(9), true), Verdict::Accept);
        assert_eq!(a.retried, 1);
    }

    #[test]
    fn one_source_cannot_take_every_place() {
        let mut a = Admission::new(policy());
        assert_eq!(a.incoming(ip(1), true), Verdict::Accept);
        assert_eq!(a.incoming(ip(1), true), Verdict::Accept);
        assert_eq!(a.incoming(ip(1), true), Verdict::Refuse);
        assert_eq!(a.incoming(ip(1), false), Verdict::Ignore);
        assert_eq!(a.incoming(ip(2), true), Verdict::Accept);
        a.handshake_ended(ip(1));
        assert_eq!(a.incoming(ip(1), true), Verdict::Accept);
    }

    #[test]
    fn a_full_dn_refuses_without_reflecting() {
        let mut a = Admission::new(policy());
        for i in 0..6 {
            assert_eq!(a.incoming(ip(i), true), Verdict::Accept);
        }
        assert_eq!(a.incoming(ip(7), true), Verdict::Refuse);
        assert_eq!(a.incoming(ip(7), false), Verdict::Retry);
        assert_eq!(a.in_flight(), 6);
    }

    #[test]
    fn an_identity_holds_few_unattached_connections() {
        let mut a = Admission::new(policy());
        assert!(a.identified("x"));
        assert!(a.identified("x"));
        assert!(!a.identified("x"));
        assert!(a.identified("y"));
        a.attached_or_gone("x");
        assert!(a.identified("x"));
        assert_eq!(a.over_identity_limit, 1);
    }

    proptest! {
        /// Whatever arrives and ends in whatever order, the counts never exceed the policy and
        /// return to zero when every handshake has ended.
        #[test]
        fn bounds_hold_and_counts_return_to_zero(ops in proptest::collection::vec((0u8..5, any::<bool>(), any::<bool>()), 1..300)) {
            let p = policy();
            let mut a = Admission::new(p);
            let mut open: Vec<IpAddr> = Vec::new();
            for (src, validated, end_one) in ops {
                if end_one && !open.is_empty() {
                    let s = open.remove(0);
                    a.handshake_ended(s);
                } else if a.incoming(ip(src), validated) == Verdict::Accept {
                    open.push(ip(src));
                }
                prop_assert!(a.in_flight() <= p.max_in_flight);
                prop_assert_eq!(a.in_flight(), open.len());
                for s in 0..5 {
                    prop_assert!(open.iter().filter(|o| **o == ip(s)).count() <= p.per_source);
                }
            }
            for s in open.drain(..) {
                a.handshake_ended(s);
            }
            prop_assert_eq!(a.in_flight(), 0);
            prop_assert!(a.by_source.is_empty());
        }
    }
}
