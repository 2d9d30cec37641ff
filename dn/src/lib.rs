//! Holdfast's decapsulation node: the `dn` binary's library.

pub mod journal;
pub mod pki;
pub mod routes;
pub mod server;
