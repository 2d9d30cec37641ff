//! Holdfast's protocol core: everything that decides, nothing that does I/O.
//!
//! No sockets, no tokio, no clocks: time comes in as an argument (`now`, seconds or
//! `std::time::Instant` supplied by the caller) and decisions go out as values. The `en` and
//! `dn` crates are thin shells that perform what these types decide.

pub mod admit;
pub mod backoff;
pub mod cluster;
pub mod coalesce;
pub mod control;
pub mod dn;
pub mod dns;
pub mod en;
pub mod fd;
pub mod gso;
pub mod lease;
pub mod node;
pub mod offload;
pub mod packet;
pub mod peer;
pub mod plan;
pub mod probe;
pub mod replay;
pub mod routes;
pub mod steer;
pub mod underlay;
pub mod wire;

/// ALPN protocol identifier of Holdfast sessions; the version is part of it, so a peer that
/// speaks another version fails the TLS handshake with a clear "no application protocol" alert.
pub const ALPN: &[u8] = b"holdfast/1";
