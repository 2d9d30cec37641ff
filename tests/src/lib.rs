//! Holdfast's lab: network namespaces standing in for the thesis's testbed, the real binaries
//! running in them, and real traffic tools (ping, curl, iperf3) measuring what they do.

pub mod bench;
pub mod experiment;
pub mod lab;
pub mod netns;
pub mod plot;
pub mod scale;
pub mod stats;
pub mod traffic;
