//! Lease tickets: a DN's signed statement that a client identity holds an address.
//!
//! The primary DN issues the ticket; the EN presents it to every other DN and again when it
//! reconnects. A DN never accepts an address claim without a ticket that verifies against the
//! issuing DN's public key from `cluster.toml`, so an EN cannot take another client's address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};

use base64::Engine;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use ipnet::IpNet;

use crate::wire::{DecodeError, Reader, Writer};

const TICKET_VERSION: u8 = 1;
/// A dual-stack ticket: version 1's fields, then the IPv6 address and its block. A ticket
/// without an IPv6 address stays version 1, byte for byte what DNs before dual stack decode.
const TICKET_VERSION_DUAL: u8 = 2;
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
    /// The client's IPv6 address, when the issuer has an IPv6 pool (dual stack); `address` is
    /// then the IPv4 one. Signed with the rest: a DN vouches for both or for neither.
    pub address6: Option<Lease6>,
}

/// The IPv6 half of a dual-stack lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease6 {
    pub address: Ipv6Addr,
    /// The block of the issuer's IPv6 pool the address comes from, backed by the same DN as
    /// the IPv4 block.
    pub block: IpNet,
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
    #[error("ticket has an IPv6 block {block} but its issuer {issuer:?} has no IPv6 pool")]
    NoIpv6Pool { issuer: String, block: IpNet },
}

impl LeaseClaim {
    fn encode_into(&self, w: &mut Writer<'_>) {
        w.u8(if self.address6.is_some() {
            TICKET_VERSION_DUAL
        } else {
            TICKET_VERSION
        });
        w.short_str(&self.identity);
        w.ip(self.address);
        w.short_str(&self.issuer);
        w.net(self.block);
        w.u64(self.issued_at);
        w.u64(self.expires_at);
        if let Some(v6) = &self.address6 {
            w.ip(v6.address.into());
            w.net(v6.block);
        }
    }

    /// Every address the claim leases with its block: the first (IPv4 in a dual-stack lease),
    /// then the IPv6 one if any.
    pub fn addresses(&self) -> impl Iterator<Item = (IpAddr, IpNet)> + '_ {
        std::iter::once((self.address, self.block))
            .chain(self.address6.map(|v6| (IpAddr::V6(v6.address), v6.block)))
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
        if version != TICKET_VERSION && version != TICKET_VERSION_DUAL {
            return Err(TicketError::Version(version));
        }
        let mut claim = LeaseClaim {
            identity: r.short_str("ticket identity")?,
            address: r.ip("ticket address")?,
            issuer: r.short_str("ticket issuer")?,
            block: r.net("ticket block")?,
            issued_at: r.u64("ticket issue time")?,
            expires_at: r.u64("ticket expiry")?,
            address6: None,
        };
        if version == TICKET_VERSION_DUAL {
            let invalid = |detail: &str| DecodeError::Invalid {
                what: "ticket IPv6 address",
                detail: detail.into(),
            };
            let IpAddr::V6(address) = r.ip("ticket IPv6 address")? else {
                return Err(invalid("not IPv6").into());
            };
            let block = r.net("ticket IPv6 block")?;
            // Encoding must give back the same bytes: the other address is of the other family.
            if !block.addr().is_ipv6() || !claim.address.is_ipv4() {
                return Err(invalid("a dual-stack ticket is one IPv4 and one IPv6 address").into());
            }
            claim.address6 = Some(Lease6 { address, block });
        }
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
        if let Some(v6) = &c.address6 {
            if !v6.block.contains(&IpAddr::V6(v6.address)) {
                return Err(TicketError::AddressOutsideBlock {
                    address: v6.address.into(),
                    block: v6.block,
                });
            }
        }
        // A DN vouches only for its own pools: its key (stolen, or a DN misconfigured) must
        // not hand out another DN's clients' addresses.
        if let Some(pool) = keys.pool(&c.issuer) {
            within(&c.issuer, c.block, pool)?;
            if let Some(v6) = &c.address6 {
                let pool6 = keys
                    .pool6(&c.issuer)
                    .ok_or_else(|| TicketError::NoIpv6Pool {
                        issuer: c.issuer.clone(),
                        block: v6.block,
                    })?;
                within(&c.issuer, v6.block, pool6)?;
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

/// Whether `block` lies inside `pool` (and is not wider).
fn within(issuer: &str, block: IpNet, pool: IpNet) -> Result<(), TicketError> {
    if pool.contains(&block.network()) && block.prefix_len() >= pool.prefix_len() {
        Ok(())
    } else {
        Err(TicketError::OutsideIssuerPool {
            issuer: issuer.to_owned(),
            block,
            pool,
        })
    }
}

/// The public keys of every DN in the cluster, by DN name, and the pools each may lease from.
#[derive(Debug, Clone, Default)]
pub struct IssuerKeys {
    keys: HashMap<String, VerifyingKey>,
    pools: HashMap<String, IpNet>,
    pools6: HashMap<String, IpNet>,
}

impl IssuerKeys {
    pub fn insert(&mut self, dn: impl Into<String>, key: VerifyingKey) {
        self.keys.insert(dn.into(), key);
    }

    /// The pool DN `dn` leases from: its tickets for blocks outside it are refused.
    pub fn insert_pool(&mut self, dn: impl Into<String>, pool: IpNet) {
        self.pools.insert(dn.into(), pool);
    }

    /// The IPv6 pool of a dual-stack DN `dn`.
    pub fn insert_pool6(&mut self, dn: impl Into<String>, pool: IpNet) {
        self.pools6.insert(dn.into(), pool);
    }

    pub fn pool6(&self, dn: &str) -> Option<IpNet> {
        self.pools6.get(dn).copied()
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
            address6: None,
        }
    }

    fn dual() -> LeaseClaim {
        LeaseClaim {
            address6: Some(Lease6 {
                address: "fd00:200::5".parse().unwrap(),
                block: "fd00:200::/65".parse().unwrap(),
            }),
            ..claim()
        }
    }

    fn dual_keys() -> IssuerKeys {
        let mut k = keys();
        k.insert_pool6("dn1", "fd00:200::/64".parse().unwrap());
        k
    }

    #[test]
    fn a_ticket_without_ipv6_is_version_1_byte_for_byte() {
        let bytes = claim().sign(&key(1)).encode();
        assert_eq!(bytes[0], 1);
        // Version, identity, address, issuer, block, two times, signature.
        assert_eq!(bytes.len(), 1 + 7 + 5 + 4 + 6 + 16 + 64);
    }

    #[test]
    fn a_dual_stack_ticket_signs_and_checks_both_addresses() {
        let t = dual().sign(&key(1));
        let bytes = t.encode();
        assert_eq!(bytes[0], 2);
        let back = LeaseTicket::decode(&bytes).unwrap();
        assert_eq!(back, t);
        let c = back.verify_for(&dual_keys(), "laptop", 1500).unwrap();
        let all: Vec<String> = c.addresses().map(|(a, b)| format!("{a} {b}")).collect();
        assert_eq!(
            all,
            ["10.200.0.5 10.200.0.0/25", "fd00:200::5 fd00:200::/65"]
        );
        // An issuer without an IPv6 pool vouches for no IPv6 address.
        assert!(matches!(
            back.verify(&keys(), 1500),
            Err(TicketError::NoIpv6Pool { .. })
        ));
        // Outside its block, or its block outside the pool.
        let mut c = dual();
        c.address6.as_mut().unwrap().address = "fd00:200::8000:0:0:5".parse().unwrap();
        assert!(matches!(
            c.sign(&key(1)).verify(&dual_keys(), 1500),
            Err(TicketError::AddressOutsideBlock { .. })
        ));
        let mut c = dual();
        c.address6 = Some(Lease6 {
            address: "fd00:201::5".parse().unwrap(),
            block: "fd00:201::/65".parse().unwrap(),
        });
        assert!(matches!(
            c.sign(&key(1)).verify(&dual_keys(), 1500),
            Err(TicketError::OutsideIssuerPool { .. })
        ));
        // The IPv6 part is signed: swapping it breaks the signature.
        let mut forged = t.clone();
        forged.claim.address6.as_mut().unwrap().address = "fd00:200::6".parse().unwrap();
        let forged = LeaseTicket::decode(&forged.encode()).unwrap();
        assert!(matches!(
            forged.verify(&dual_keys(), 1500),
            Err(TicketError::BadSignature(_))
        ));
    }

    #[test]
    fn a_dual_stack_ticket_is_decoded_strictly() {
        let bytes = dual().sign(&key(1)).encode();
        for cut in 0..bytes.len() {
            assert!(LeaseTicket::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        // Version 1 with the IPv6 section is trailing garbage; version 2 without it is short.
        let mut v1 = bytes.clone();
        v1[0] = 1;
        assert!(LeaseTicket::decode(&v1).is_err());
        let mut v2 = claim().sign(&key(1)).encode();
        v2[0] = 2;
        assert!(LeaseTicket::decode(&v2).is_err());
        // Two IPv6 addresses are not dual stack.
        let mut c = dual();
        c.address = "fd00:200::7".parse().unwrap();
        assert!(LeaseTicket::decode(&c.sign(&key(1)).encode()).is_err());
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
        fn dual_stack_round_trip(a in any::<u32>(), b in any::<u128>(), len in 8u8..=32, len6 in 32u8..=120, t in 0u64..u64::MAX / 2) {
            let block = IpNet::new(std::net::Ipv4Addr::from(a).into(), len).unwrap().trunc();
            let block6 = IpNet::new(Ipv6Addr::from(b).into(), len6).unwrap().trunc();
            let IpAddr::V6(address6) = block6.addr() else { unreachable!() };
            let c = LeaseClaim { identity: "x".into(), address: block.addr(), issuer: "dn2".into(), block, issued_at: t, expires_at: t + 10, address6: Some(Lease6 { address: address6, block: block6 }) };
            let ticket = c.clone().sign(&key(2));
            let back = LeaseTicket::decode(&ticket.encode()).unwrap();
            prop_assert_eq!(&back, &ticket);
            let mut any_pool = IssuerKeys::default();
            any_pool.insert("dn2", key(2).verifying_key());
            prop_assert_eq!(back.verify(&any_pool, t).unwrap(), &c);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = LeaseTicket::decode(&bytes);
        }

        #[test]
        fn round_trip(identity in "[a-z0-9.-]{1,40}", a in any::<u32>(), len in 8u8..=32, t in 0u64..u64::MAX / 2) {
            let block = IpNet::new(std::net::Ipv4Addr::from(a).into(), len).unwrap().trunc();
            let c = LeaseClaim { identity, address: block.addr(), issuer: "dn2".into(), block, issued_at: t, expires_at: t + 10, address6: None };
            let ticket = c.clone().sign(&key(2));
            let back = LeaseTicket::decode(&ticket.encode()).unwrap();
            // Any block: no pool is known for the issuer here.
            let mut any_pool = IssuerKeys::default();
            any_pool.insert("dn2", key(2).verifying_key());
            prop_assert_eq!(back.verify(&any_pool, t).unwrap(), &c);
        }
    }
}
