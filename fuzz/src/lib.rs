//! The checks behind each fuzz target, one function per decoder of bytes that come from the
//! network, a local socket or the disk.
//!
//! They live in a library, not in the target files, so that `cargo test` (stable, no libFuzzer)
//! can replay the committed corpus through exactly what the fuzzer runs, and so that the seeds
//! are generated from the same key set the checks verify with. Every check panics on a
//! finding: a decoder that panics, or a decoded value that does not survive being encoded and
//! decoded again.

use std::sync::OnceLock;

use ed25519_dalek::SigningKey;
use holdfast_proto::lease::IssuerKeys;

mod checks;
pub mod seeds;

pub use checks::{
    coalesce, control, icmp, lease_record, lease_ticket, local_message, offload, packet,
    peer_notice,
};

/// A target's check: panics on a finding.
pub type Check = fn(&[u8]);

/// Every target, by the name of its `fuzz_targets/` file and its corpus directory.
pub const TARGETS: &[(&str, Check)] = &[
    ("control", control),
    ("lease_ticket", lease_ticket),
    ("peer_notice", peer_notice),
    ("local_message", local_message),
    ("lease_record", lease_record),
    ("packet", packet),
    ("icmp", icmp),
    ("offload", offload),
    ("coalesce", coalesce),
];

/// The cluster the checks decode for: three DNs whose keys it knows (dn1 and dn2 with their
/// pools, dn1 dual stack with an IPv6 pool too, dn3 with none, as in a `cluster.toml` that names no pool for it), and a stranger's
/// key that signs as a DN of another cluster would.
pub struct Cluster {
    pub dn1: SigningKey,
    pub dn2: SigningKey,
    pub dn3: SigningKey,
    pub stranger: SigningKey,
    pub keys: IssuerKeys,
}

impl Cluster {
    /// The key that signs for `name`: its own for a known DN, else the stranger's.
    pub fn key_for(&self, name: &str) -> &SigningKey {
        match name {
            "dn1" => &self.dn1,
            "dn2" => &self.dn2,
            "dn3" => &self.dn3,
            _ => &self.stranger,
        }
    }
}

/// Built once: deriving Ed25519 keys on every input would dominate the run time.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let dn1 = SigningKey::from_bytes(&[1; 32]);
        let dn2 = SigningKey::from_bytes(&[2; 32]);
        let dn3 = SigningKey::from_bytes(&[3; 32]);
        let mut keys = IssuerKeys::default();
        keys.insert("dn1", dn1.verifying_key());
        keys.insert("dn2", dn2.verifying_key());
        keys.insert("dn3", dn3.verifying_key());
        keys.insert_pool("dn1", "10.200.0.0/16".parse().unwrap());
        keys.insert_pool6("dn1", "fd00:210::/48".parse().unwrap());
        keys.insert_pool("dn2", "fd00:200::/48".parse().unwrap());
        Cluster {
            dn1,
            dn2,
            dn3,
            stranger: SigningKey::from_bytes(&[9; 32]),
            keys,
        }
    })
}

#[cfg(test)]
mod tests;
