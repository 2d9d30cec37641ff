//! Notices one DN sends the others over the cluster network, signed with its lease key.
//!
//! "Home is back": a restarted DN whose blocks another DN serves actively sends it to its peers
//! until those blocks are free again; a peer carrying clients of that DN then tells them their
//! home is back (thesis 3.1). "Alive": every failure detector (`dn-fd`) heartbeats every other
//! one and says whether its DN is up (thesis 3.2). The lease key's public half is in
//! `cluster.toml` already, so peers authenticate each other without another PKI. A notice is
//! one UDP datagram: `magic, version, kind, sent_at, from, [body], signature`.
//!
//! Both kinds carry a sequence number that grows with every notice a sender sends ([`Sequence`]),
//! so a receiver takes each notice at most once: a captured one replayed is refused. Wall
//! clocks only vouch for the first notice a receiver hears from a peer ([`Freshness`]): after
//! that, a sender whose clock steps back keeps being heard.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier};

use crate::lease::IssuerKeys;
use crate::wire::{DecodeError, Reader, Writer};

/// UDP port DNs listen on for peer notices, on their cluster-network address, unless
/// `[ospf] peer_port` says otherwise.
pub const DEFAULT_PEER_PORT: u16 = 4434;
/// The first notice a receiver hears from a peer must be within this of its clock: a notice
/// replayed to a receiver that just started must not send clients to a DN that has since died.
pub const MAX_AGE_SECS: u64 = 10;

const MAGIC: &[u8; 4] = b"HFPN";
/// Version 2 added the sequence to "home is back".
const VERSION: u8 = 2;
const SIGNING_CONTEXT: &[u8] = b"holdfast peer notice v1\0";
const SIGNATURE_LEN: usize = 64;
const K_HOME_IS_BACK: u8 = 1;
const K_ALIVE: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The sender is up again and wants its clients back.
    HomeIsBack { seq: u64 },
    /// A failure detector's heartbeat: whether its DN is up. `seq` grows with every heartbeat
    /// (the sender's clock in milliseconds), so a replayed one is told from a fresh one.
    Alive { dn_up: bool, seq: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerNotice {
    pub from: String,
    /// Unix seconds at the sender.
    pub sent_at: u64,
    pub notice: Notice,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("malformed peer notice: {0}")]
    Malformed(#[from] DecodeError),
    #[error("peer notice from {0:?}, which is not a DN of this cluster")]
    UnknownPeer(String),
    #[error("peer notice from {0:?} has a bad signature")]
    BadSignature(String),
    #[error("peer notice from {from:?} is {age} s off this DN's clock (at most {MAX_AGE_SECS} s)")]
    Stale { from: String, age: u64 },
    #[error("peer notice from {from:?} replayed or reordered (sequence {seq}, last taken {last})")]
    Replayed { from: String, seq: u64, last: u64 },
}

impl Notice {
    pub fn seq(&self) -> u64 {
        match *self {
            Notice::HomeIsBack { seq } | Notice::Alive { seq, .. } => seq,
        }
    }
}

/// A sender's sequence numbers: its clock in milliseconds, but never less than the last one
/// plus one, so that it grows even when the clock steps back, and starts above anything the
/// sender sent before a restart as long as the clock did not step back across it.
#[derive(Debug, Clone, Default)]
pub struct Sequence {
    last: u64,
}

impl Sequence {
    /// The next sequence number, given the clock now (unix milliseconds).
    pub fn next(&mut self, unix_ms: u64) -> u64 {
        self.last = unix_ms.max(self.last + 1);
        self.last
    }
}

/// What a receiver takes from each peer: a notice whose sequence is above the last one taken.
/// The first notice from a peer (nothing taken yet) must also be within [`MAX_AGE_SECS`] of the
/// receiver's clock.
#[derive(Debug, Clone, Default)]
pub struct Freshness {
    last: std::collections::HashMap<String, u64>,
}

impl Freshness {
    /// Takes `notice` (already opened, so its signature holds) if it is fresh; `now` is the
    /// receiver's clock, unix seconds.
    pub fn take(&mut self, notice: &PeerNotice, now: u64) -> Result<(), PeerError> {
        let seq = notice.notice.seq();
        match self.last.get(&notice.from) {
            Some(&last) if seq <= last => {
                return Err(PeerError::Replayed {
                    from: notice.from.clone(),
                    seq,
                    last,
                })
            }
            Some(_) => {}
            None => {
                let age = now.abs_diff(notice.sent_at);
                if age > MAX_AGE_SECS {
                    return Err(PeerError::Stale {
                        from: notice.from.clone(),
                        age,
                    });
                }
            }
        }
        self.last.insert(notice.from.clone(), seq);
        Ok(())
    }

    /// The last sequence taken from `from`.
    pub fn last(&self, from: &str) -> Option<u64> {
        self.last.get(from).copied()
    }
}

impl PeerNotice {
    fn body(&self, out: &mut Vec<u8>) {
        let mut w = Writer::new(out);
        w.bytes(MAGIC);
        w.u8(VERSION);
        w.u8(match self.notice {
            Notice::HomeIsBack { .. } => K_HOME_IS_BACK,
            Notice::Alive { .. } => K_ALIVE,
        });
        w.u64(self.sent_at);
        w.short_str(&self.from);
        match self.notice {
            Notice::HomeIsBack { seq } => w.u64(seq),
            Notice::Alive { dn_up, seq } => {
                w.u8(u8::from(dn_up));
                w.u64(seq);
            }
        }
    }

    /// The datagram carrying this notice, signed with the sender's lease key.
    pub fn seal(&self, key: &SigningKey) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.body(&mut out);
        let mut signed = SIGNING_CONTEXT.to_vec();
        signed.extend_from_slice(&out);
        let signature = key.sign(&signed).to_bytes();
        out.extend_from_slice(&signature);
        out
    }

    /// The sender a datagram claims to come from, read without any signature work: for the
    /// checks that must come first (the sender's address, a rate limit). `None` if the
    /// datagram is not a peer notice.
    pub fn claimed_sender(datagram: &[u8]) -> Option<String> {
        let mut r = Reader::new(datagram);
        if r.fixed::<4>("magic").ok()? != *MAGIC || r.u8("version").ok()? != VERSION {
            return None;
        }
        r.u8("notice kind").ok()?;
        r.u64("sent at").ok()?;
        r.short_str("sender").ok()
    }

    /// Decodes a datagram and checks that a DN of `keys` signed it. Whether it is fresh is
    /// [`Freshness`]'s question.
    pub fn open(datagram: &[u8], keys: &IssuerKeys) -> Result<Self, PeerError> {
        let mut r = Reader::new(datagram);
        if r.fixed::<4>("magic")? != *MAGIC {
            return Err(DecodeError::Invalid {
                what: "magic",
                detail: "not a Holdfast peer notice".into(),
            }
            .into());
        }
        let version = r.u8("version")?;
        if version != VERSION {
            return Err(DecodeError::UnknownTag {
                what: "peer notice version",
                tag: version,
            }
            .into());
        }
        let kind = r.u8("notice kind")?;
        let sent_at = r.u64("sent at")?;
        let from = r.short_str("sender")?;
        let notice = match kind {
            K_HOME_IS_BACK => Notice::HomeIsBack {
                seq: r.u64("sequence")?,
            },
            K_ALIVE => Notice::Alive {
                dn_up: match r.u8("dn up")? {
                    0 => false,
                    1 => true,
                    tag => {
                        return Err(DecodeError::UnknownTag {
                            what: "dn up flag",
                            tag,
                        }
                        .into())
                    }
                },
                seq: r.u64("sequence")?,
            },
            tag => {
                return Err(DecodeError::UnknownTag {
                    what: "peer notice kind",
                    tag,
                }
                .into())
            }
        };
        let body_len = datagram.len() - r.remaining();
        let signature: [u8; SIGNATURE_LEN] = r.fixed("signature")?;
        r.finish()?;
        let key = keys
            .get(&from)
            .ok_or_else(|| PeerError::UnknownPeer(from.clone()))?;
        let mut signed = SIGNING_CONTEXT.to_vec();
        signed.extend_from_slice(&datagram[..body_len]);
        key.verify(&signed, &Signature::from_bytes(&signature))
            .map_err(|_| PeerError::BadSignature(from.clone()))?;
        Ok(Self {
            from,
            sent_at,
            notice,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_claimed_sender_is_read_without_a_key() {
        let (key, _) = keys();
        let datagram = PeerNotice {
            from: "dn2".into(),
            sent_at: 5,
            notice: Notice::Alive {
                dn_up: true,
                seq: 1,
            },
        }
        .seal(&key);
        assert_eq!(
            PeerNotice::claimed_sender(&datagram).as_deref(),
            Some("dn2")
        );
        assert_eq!(PeerNotice::claimed_sender(&datagram[..10]), None);
        assert_eq!(PeerNotice::claimed_sender(b"GET / HTTP/1.1"), None);
    }

    fn keys() -> (SigningKey, IssuerKeys) {
        let key = SigningKey::from_bytes(&[5; 32]);
        let mut keys = IssuerKeys::default();
        keys.insert("dn1", key.verifying_key());
        (key, keys)
    }

    fn notice(at: u64) -> PeerNotice {
        PeerNotice {
            from: "dn1".into(),
            sent_at: at,
            notice: Notice::HomeIsBack { seq: at * 1000 },
        }
    }

    fn notice_with(seq: u64, sent_at: u64) -> PeerNotice {
        PeerNotice {
            from: "dn2".into(),
            sent_at,
            notice: Notice::HomeIsBack { seq },
        }
    }

    #[test]
    fn a_sealed_notice_opens_at_the_peer() {
        let (key, keys) = keys();
        let datagram = notice(1000).seal(&key);
        assert_eq!(PeerNotice::open(&datagram, &keys), Ok(notice(1000)));
    }

    #[test]
    fn a_notice_is_taken_once() {
        let mut fresh = Freshness::default();
        assert_eq!(fresh.take(&notice(1000), 1003), Ok(()));
        assert!(matches!(
            fresh.take(&notice(1000), 1003),
            Err(PeerError::Replayed { .. })
        ));
        assert_eq!(fresh.take(&notice(1001), 1003), Ok(()));
        assert_eq!(fresh.last("dn1"), Some(1_001_000));
    }

    #[test]
    fn only_the_first_notice_is_held_to_the_clock() {
        let mut fresh = Freshness::default();
        assert!(matches!(
            fresh.take(&notice(1000), 1000 + MAX_AGE_SECS + 1),
            Err(PeerError::Stale { .. })
        ));
        let mut seq = Sequence::default();
        let before = seq.next(1_000_000);
        assert_eq!(fresh.take(&notice_with(before, 5000), 5003), Ok(()));
        // The sender's clock stepped back an hour: its sequence still grows and the receiver
        // no longer asks its clock, so it is heard.
        let after = seq.next(1_000_000 - 900_000);
        assert!(after > before);
        assert_eq!(fresh.take(&notice_with(after, 5000 - 3600), 5010), Ok(()));
    }

    #[test]
    fn a_heartbeat_carries_the_dn_state_and_its_sequence() {
        let (key, keys) = keys();
        for dn_up in [true, false] {
            let alive = PeerNotice {
                notice: Notice::Alive { dn_up, seq: 77 },
                ..notice(1000)
            };
            assert_eq!(PeerNotice::open(&alive.seal(&key), &keys), Ok(alive));
        }
    }

    #[test]
    fn forged_stale_and_unknown_notices_are_refused() {
        let (key, keys) = keys();
        let other = SigningKey::from_bytes(&[6; 32]);
        assert_eq!(
            PeerNotice::open(&notice(1000).seal(&other), &keys),
            Err(PeerError::BadSignature("dn1".into()))
        );
        let stranger = PeerNotice {
            from: "dn9".into(),
            ..notice(1000)
        };
        assert_eq!(
            PeerNotice::open(&stranger.seal(&key), &keys),
            Err(PeerError::UnknownPeer("dn9".into()))
        );
        // The sender's name is signed: renaming the sender breaks the signature.
        let mut renamed = notice(1000).seal(&key);
        // The sender's name's last byte, before the sequence.
        let at = renamed.len() - SIGNATURE_LEN - 8 - 1;
        renamed[at] = b'2';
        let mut both = keys.clone();
        both.insert("dn2", key.verifying_key());
        assert_eq!(
            PeerNotice::open(&renamed, &both),
            Err(PeerError::BadSignature("dn2".into()))
        );
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let (_, keys) = keys();
            let _ = PeerNotice::open(&bytes, &keys);
        }

        #[test]
        fn any_flipped_byte_is_refused(at in any::<usize>(), bit in 0u8..8) {
            let (key, keys) = keys();
            let mut datagram = notice(1000).seal(&key);
            let at = at % datagram.len();
            datagram[at] ^= 1 << bit;
            prop_assert!(PeerNotice::open(&datagram, &keys).is_err());
        }
    }
}
