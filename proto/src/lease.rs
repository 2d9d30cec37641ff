//! Lease tickets: a DN's signed statement that a client identity holds an address.
//!
//! The primary DN issues the ticket; the EN presents it to every other DN and again when it
//! reconnects. A DN never accepts an address claim without a ticket that verifies against the
//! issuing DN's public key from `cluster.toml`, so an EN cannot take another client's address.

use std::collections::HashMap;
use std::net::IpAddr;

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use ipnet::IpNet;

use crate::wire::{DecodeError, Reader, Writer};

const TICKET_VERSION: u8 = 1;
/// Domain separation: a signature over a ticket can never be mistaken for one over anything else.
const SIGNING_CONTEXT: &[u8] = b"holdfast lease ticket v1\0";
const SIGNATURE_LEN: usize = 64;

/// What a ticket says. Encoded deterministically; the signature covers exactly these bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseClaim {
    /// The client's identity, taken from its authenticated TLS client certificate.
    pub identity: String,
    /// The virtual address leased to the client.
    pub address: IpAddr,
    /// Name of the DN that issued (and signed) the ticket.
    pub issuer: String,
    /// The block of the issuer's pool the address comes from (the block's designated backup
    /// carries it on failover).
    pub block: IpNet,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds; the ticket is invalid from this instant on.
    pub expires_at: u64,
}

/// A claim together with its issuer's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseTicket {
    pub claim: LeaseClaim,
    signature: [u8; SIGNATURE_LEN],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("malformed ticket: {0}")]
    Malformed(#[from] DecodeError),
    #[error("unsupported ticket version {0}")]
    Version(u8),
    #[error("ticket issued by unknown DN {0:?}")]
    UnknownIssuer(String),
    #[error("ticket signature does not verify against {0:?}'s key")]
    BadSignature(String),
    #[error("ticket expired at {expires_at} (now {now})")]
    Expired { expires_at: u64, now: u64 },
    #[error("ticket is for identity {ticket:?}, not {presented:?}")]
    WrongIdentity { ticket: String, presented: String },
    #[error("ticket address {address} is not inside its block {block}")]
    AddressOutsideBlock { address: IpAddr, block: IpNet },
    #[error("ticket block {block} is not in its issuer {issuer:?}'s pool {pool}")]
    OutsideIssuerPool {
        issuer: String,
        block: IpNet,
        pool: IpNet,
    },
}

impl LeaseClaim {
    fn encode_into(&self, w: &mut Writer<'_>) {
        w.u8(TICKET_VERSION);
        w.short_str(&self.identity);
        w.ip(self.address);
        w.short_str(&self.issuer);
        w.net(self.block);
        w.u64(self.issued_at);
        w.u64(self.expires_at);
    }

    fn signed_bytes(&self) -> Vec<u8> {
        let mut msg = SIGNING_CONTEXT.to_vec();
        self.encode_into(&mut Writer::new(&mut msg));
        msg
    }

    /// Signs the claim with the issuing DN's key.
    pub fn sign(self, key: &SigningKey) -> LeaseTicket {
        let signature = key.sign(&self.signed_bytes()).to_bytes();
        LeaseTicket {
            claim: self,
            signature,
        }
    }
}

impl LeaseTicket {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        let mut w = Writer::new(&mut out);
        self.claim.encode_into(&mut w);
        w.bytes(&self.signature);
        out
    }

    /// Parses a ticket without checking its signature; see [`LeaseTicket::verify`].
    pub fn decode(bytes: &[u8]) -> Result<Self, TicketError> {
        let mut r = Reader::new(bytes);
        let version = r.u8("ticket version")?;
        if version != TICKET_VERSION {
            return Err(TicketError::Version(version));
        }
        let claim = LeaseClaim {
            identity: r.short_str("ticket identity")?,
            address: r.ip("ticket address")?,
            issuer: r.short_str("ticket issuer")?,
            block: r.net("ticket block")?,
            issued_at: r.u64("ticket issue time")?,
            expires_at: r.u64("ticket expiry")?,
        };
        let signature = r.fixed::<SIGNATURE_LEN>("ticket signature")?;
        r.finish()?;
        Ok(Self { claim, signature })
    }

    /// Checks the signature against the issuer's key, the expiry and the internal consistency.
    /// The identity is checked separately ([`LeaseTicket::verify_for`]) where it is known.
    pub fn verify(&self, keys: &IssuerKeys, now: u64) -> Result<&LeaseClaim, TicketError> {
        let c = &self.claim;
        let key = keys
            .get(&c.issuer)
            .ok_or_else(|| TicketError::UnknownIssuer(c.issuer.clone()))?;
        let signature = Signature::from_bytes(&self.signature);
        key.verify(&c.signed_bytes(), &signature)
            .map_err(|_| TicketError::BadSignature(c.issuer.clone()))?;
        if now >= c.expires_at {
            return Err(TicketError::Expired {
                expires_at: c.expires_at,
                now,
            });
        }
        if !c.block.contains(&c.address) {
            return Err(TicketError::AddressOutsideBlock {
                address: c.address,
                block: c.block,
            });
        }
        // A DN vouches only for its own pool: its key (stolen, or a DN misconfigured) must
        // not hand out another DN's clients' addresses.
        if let Some(pool) = keys.pool(&c.issuer) {
            if !(pool.contains(&c.block.network()) && c.block.prefix_len() >= pool.prefix_len()) {
                return Err(TicketError::OutsideIssuerPool {
                    issuer: c.issuer.clone(),
                    block: c.block,
                    pool,
                });
            }
        }
        Ok(c)
    }

    /// [`LeaseTicket::verify`], and the ticket must name the identity the client authenticated as.
    pub fn verify_for(
        &self,
        keys: &IssuerKeys,
        identity: &str,
        now: u64,
    ) -> Result<&LeaseClaim, TicketError> {
        let claim = self.verify(keys, now)?;
        if claim.identity != identity {
            return Err(TicketError::WrongIdentity {
                ticket: claim.identity.clone(),
                presented: identity.to_owned(),
            });
        }
        Ok(claim)
    }
}

/// The public keys of every DN in the cluster, by DN name, and the pool each may lease from.
#[derive(Debug, Clone, Default)]
pub struct IssuerKeys {
    keys: HashMap<String, VerifyingKey>,
    pools: HashMap<String, IpNet>,
}

impl IssuerKeys {
    pub fn insert(&mut self, dn: impl Into<String>, key: VerifyingKey) {
        self.keys.insert(dn.into(), key);
    }

    /// The pool DN `dn` leases from: its tickets for blocks outside it are refused.
    pub fn insert_pool(&mut self, dn: impl Into<String>, pool: IpNet) {
        self.pools.insert(dn.into(), pool);
    }

    pub fn get(&self, dn: &str) -> Option<&VerifyingKey> {
        self.keys.get(dn)
    }

    pub fn pool(&self, dn: &str) -> Option<IpNet> {
        self.pools.get(dn).copied()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("not valid base64: {0}")]
    Base64(String),
    #[error("expected {expected} bytes, found {found}")]
    Length { expected: usize, found: usize },
    #[error("not a valid Ed25519 public key")]
    NotAPoint,
}

fn decode_32(text: &str) -> Result<[u8; 32], KeyError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| KeyError::Base64(e.to_string()))?;
    bytes.as_slice().try_into().map_err(|_| KeyError::Length {
        expected: 32,
        found: bytes.len(),
    })
}

/// Parses a base64 Ed25519 public key as written in `cluster.toml`.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, KeyError> {
    VerifyingKey::from_bytes(&decode_32(text)?).map_err(|_| KeyError::NotAPoint)
}

/// Parses a base64 Ed25519 secret key (the 32-byte seed) as written in a DN's key file.
pub fn parse_signing_key(text: &str) -> Result<SigningKey, KeyError> {
    Ok(SigningKey::from_bytes(&decode_32(text)?))
}

pub fn encode_key(bytes: &[u8; 32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A fresh signing key for a DN, from the operating system's randomness.
pub fn generate_signing_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn keys() -> IssuerKeys {
        let mut k = IssuerKeys::default();
        k.insert("dn1", key(1).verifying_key());
        k.insert("dn2", key(2).verifying_key());
        k.insert_pool("dn1", "10.200.0.0/24".parse().unwrap());
        k.insert_pool("dn2", "10.201.0.0/24".parse().unwrap());
        k
    }

    fn claim() -> LeaseClaim {
        LeaseClaim {
            identity: "laptop".into(),
            address: "10.200.0.5".parse().unwrap(),
            issuer: "dn1".into(),
            block: "10.200.0.0/25".parse().unwrap(),
            issued_at: 1000,
            expires_at: 2000,
        }
    }

    #[test]
    fn a_fresh_ticket_verifies() {
        let t = claim().sign(&key(1));
        let back = LeaseTicket::decode(&t.encode()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.verify_for(&keys(), "laptop", 1500).unwrap(), &claim());
    }

    #[test]
    fn another_dns_key_is_rejected() {
        // Signed by dn2 but claiming to be issued by dn1.
        let t = claim().sign(&key(2));
        assert_eq!(
            t.verify(&keys(), 1500),
            Err(TicketError::BadSignature("dn1".into()))
        );
        let mut c = claim();
        c.issuer = "dn9".into();
        assert!(matches!(
            c.sign(&key(1)).verify(&keys(), 1500),
            Err(TicketError::UnknownIssuer(_))
        ));
    }

    #[test]
    fn expiry_is_exclusive() {
        let t = claim().sign(&key(1));
        assert!(t.verify(&keys(), 1999).is_ok());
        assert!(matches!(
            t.verify(&keys(), 2000),
            Err(TicketError::Expired { .. })
        ));
    }

    #[test]
    fn another_identity_is_rejected() {
        let t = claim().sign(&key(1));
        assert!(matches!(
            t.verify_for(&keys(), "phone", 1500),
            Err(TicketError::WrongIdentity { .. })
        ));
    }

    #[test]
    fn address_must_lie_in_block() {
        let mut c = claim();
        c.address = "10.200.1.5".parse().unwrap();
        assert!(matches!(
            c.sign(&key(1)).verify(&keys(), 1500),
            Err(TicketError::AddressOutsideBlock { .. })
        ));
    }

    #[test]
    fn a_dn_vouches_only_for_its_own_pool() {
        // dn2's key, a ticket for an address of dn1's pool.
        let mut c = claim();
        c.issuer = "dn2".into();
        assert!(matches!(
            c.sign(&key(2)).verify(&keys(), 1500),
            Err(TicketError::OutsideIssuerPool { .. })
        ));
        // A block wider than the pool is outside it too.
        let mut c = claim();
        c.block = "10.200.0.0/23".parse().unwrap();
        assert!(matches!(
            c.sign(&key(1)).verify(&keys(), 1500),
            Err(TicketError::OutsideIssuerPool { .. })
        ));
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = claim().sign(&key(1)).encode();
        for cut in 0..bytes.len() {
            assert!(LeaseTicket::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(LeaseTicket::decode(&longer).is_err());
    }

    proptest! {
        #[test]
        fn any_single_bit_flip_is_rejected(bit in 0usize..(8 * 120)) {
            let bytes = claim().sign(&key(1)).encode();
            let bit = bit % (bytes.len() * 8);
            let mut altered = bytes.clone();
            altered[bit / 8] ^= 1 << (bit % 8);
            match LeaseTicket::decode(&altered) {
                Err(_) => {}
                Ok(t) => prop_assert!(t.verify_for(&keys(), "laptop", 1500).is_err()),
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = LeaseTicket::decode(&bytes);
        }

        #[test]
        fn round_trip(identity in "[a-z0-9.-]{1,40}", a in any::<u32>(), len in 8u8..=32, t in 0u64..u64::MAX / 2) {
            let block = IpNet::new(std::net::Ipv4Addr::from(a).into(), len).unwrap().trunc();
            let c = LeaseClaim { identity, address: block.addr(), issuer: "dn2".into(), block, issued_at: t, expires_at: t + 10 };
            let ticket = c.clone().sign(&key(2));
            let back = LeaseTicket::decode(&ticket.encode()).unwrap();
            // Any block: no pool is known for the issuer here.
            let mut any_pool = IssuerKeys::default();
            any_pool.insert("dn2", key(2).verifying_key());
            prop_assert_eq!(back.verify(&any_pool, t).unwrap(), &c);
        }
    }
}
