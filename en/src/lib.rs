//! Holdfast's encapsulation node: the `en` binary's library.

pub mod client;
pub mod config;
