//! Holdfast's lab: network namespaces standing in for the thesis's testbed, the real binaries
//! running in them, and real traffic tools (ping, curl, iperf3) measuring what they do.

pub mod attack;
pub mod bench;
pub mod cases;
pub mod compare;
pub mod experiment;
pub mod lab;
pub mod mobile;
pub mod mobile_dns;
pub mod mobile_v6;
pub mod netns;
pub mod ops;
pub mod plot;
pub mod scale;
pub mod session;
pub mod stats;
pub mod traffic;

/// Microseconds since the Unix epoch: the clock that times events across the lab's processes
/// (the kill in one, the client's switch in another).
pub fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
