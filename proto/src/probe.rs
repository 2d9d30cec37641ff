//! The EN's own liveness probes of each DN, and their wire form.
//!
//! QUIC notices a dead peer only at its idle timeout (seconds). The EN therefore sends a small
//! probe on every session at a short interval and judges the DN dead when probes stop being
//! answered for longer than a few round trips. Probes ride in QUIC DATAGRAM frames like packets;
//! their first byte has a zero high nibble, which no IPv4 or IPv6 packet has, so the data path
//! tells them apart for free.

use std::time::{Duration, Instant};

const KIND_PROBE: u8 = 0x01;
const KIND_ECHO: u8 = 0x02;
/// Probe datagrams are `kind, seq (u32)`.
pub const PROBE_LEN: usize = 5;

/// Whether a datagram is a probe or echo rather than an IP packet.
pub fn is_probe(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b >> 4 == 0)
}

pub fn encode_probe(seq: u32) -> [u8; PROBE_LEN] {
    let mut out = [KIND_PROBE, 0, 0, 0, 0];
    out[1..].copy_from_slice(&seq.to_be_bytes());
    out
}

/// The DN's answer to a probe datagram, or `None` if it is not a well-formed probe.
pub fn echo_for(datagram: &[u8]) -> Option<[u8; PROBE_LEN]> {
    if datagram.len() != PROBE_LEN || datagram[0] != KIND_PROBE {
        return None;
    }
    let mut out = [0u8; PROBE_LEN];
    out.copy_from_slice(datagram);
    out[0] = KIND_ECHO;
    Some(out)
}

/// The sequence number of an echo, or `None` if it is not a well-formed echo.
pub fn parse_echo(datagram: &[u8]) -> Option<u32> {
    if datagram.len() != PROBE_LEN || datagram[0] != KIND_ECHO {
        return None;
    }
    let mut seq = [0u8; 4];
    seq.copy_from_slice(&datagram[1..]);
    Some(u32::from_be_bytes(seq))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Time between probes.
    pub interval: Duration,
    /// The DN is dead when nothing was echoed for `misses` intervals and at least
    /// `rtt_factor` round trips.
    pub misses: u32,
    pub rtt_factor: u32,
    /// Floor of the silence that counts as death, whatever the RTT.
    pub min_silence: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(10),
            misses: 3,
            rtt_factor: 4,
            min_silence: Duration::from_millis(30),
        }
    }
}

/// What the prober wants done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Send probe `seq` now.
    Send(u32),
    /// Nothing to do until [`Prober::poll_timeout`].
    Wait,
    /// The DN has not answered for `silence`: treat it as dead.
    Dead { silence: Duration },
}

/// One session's prober.
#[derive(Debug, Clone)]
pub struct Prober {
    config: ProbeConfig,
    next_seq: u32,
    next_send: Instant,
    /// When the last echo (or the start) was seen.
    last_heard: Instant,
    srtt: Option<Duration>,
    /// Send times of recent probes, by sequence number.
    in_flight: std::collections::VecDeque<(u32, Instant)>,
    dead: bool,
}

impl Prober {
    /// `initial_rtt` (e.g. the handshake's) sets the deadline until the first echo.
    pub fn new(config: ProbeConfig, now: Instant, initial_rtt: Option<Duration>) -> Self {
        Self {
            config,
            next_seq: 0,
            next_send: now,
            last_heard: now,
            srtt: initial_rtt,
            in_flight: Default::default(),
            dead: false,
        }
    }

    /// The silence after which the DN counts as dead.
    pub fn deadline(&self) -> Duration {
        let by_interval = self.config.interval * self.config.misses;
        let by_rtt = self.srtt.unwrap_or_default() * self.config.rtt_factor;
        by_interval.max(by_rtt).max(self.config.min_silence)
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Decides what to do at `now`.
    pub fn poll(&mut self, now: Instant) -> Verdict {
        if self.dead {
            return Verdict::Wait;
        }
        let silence = now.saturating_duration_since(self.last_heard);
        if silence >= self.deadline() {
            self.dead = true;
            return Verdict::Dead { silence };
        }
        if now >= self.next_send {
            let seq = self.next_seq;
            self.next_seq = self.next_seq.wrapping_add(1);
            self.next_send = now + self.config.interval;
            self.in_flight.push_back((seq, now));
            // Remember only what could still be answered in time.
            while self.in_flight.len() > 64 {
                self.in_flight.pop_front();
            }
            return Verdict::Send(seq);
        }
        Verdict::Wait
    }

    /// When [`Prober::poll`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        (!self.dead).then(|| self.next_send.min(self.last_heard + self.deadline()))
    }

    /// An echo of probe `seq` arrived at `now`.
    pub fn on_echo(&mut self, seq: u32, now: Instant) {
        let Some(pos) = self.in_flight.iter().position(|(s, _)| *s == seq) else {
            return;
        };
        let (_, sent) = self.in_flight[pos];
        self.in_flight.drain(..=pos);
        let sample = now.saturating_duration_since(sent);
        self.srtt = Some(match self.srtt {
            Some(s) => (s * 7 + sample) / 8,
            None => sample,
        });
        self.last_heard = now;
    }

    /// Any sign of life from the DN (e.g. a data packet) counts like an echo for liveness.
    pub fn on_traffic(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn probes_are_not_ip_and_echo_round_trips() {
        let p = encode_probe(77);
        assert!(is_probe(&p));
        assert!(!is_probe(&[0x45, 0, 0]));
        assert!(!is_probe(&[0x60]));
        let e = echo_for(&p).unwrap();
        assert_eq!(parse_echo(&e), Some(77));
        assert_eq!(echo_for(&e), None, "an echo is not echoed again");
        assert_eq!(parse_echo(&p), None);
        assert_eq!(echo_for(&p[..4]), None);
    }

    #[test]
    fn a_silent_dn_is_dead_after_the_deadline_and_not_before() {
        let t0 = Instant::now();
        let config = ProbeConfig::default();
        let mut p = Prober::new(config, t0, None);
        assert_eq!(p.poll(t0), Verdict::Send(0));
        let mut t = t0;
        let mut verdict = Verdict::Wait;
        while t < t0 + Duration::from_secs(1) {
            t = p.poll_timeout().unwrap();
            verdict = p.poll(t);
            if matches!(verdict, Verdict::Dead { .. }) {
                break;
            }
        }
        assert_eq!(
            verdict,
            Verdict::Dead {
                silence: Duration::from_millis(30)
            }
        );
        assert_eq!(t - t0, Duration::from_millis(30));
        assert_eq!(p.poll(t + Duration::from_secs(1)), Verdict::Wait);
    }

    #[test]
    fn echoes_keep_it_alive_and_set_the_rtt() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, None);
        let mut t = t0;
        let mut pending = Vec::new();
        for _ in 0..100 {
            // Echoes take 5 ms.
            for (seq, at) in std::mem::take(&mut pending) {
                if at <= t {
                    p.on_echo(seq, at);
                } else {
                    pending.push((seq, at));
                }
            }
            match p.poll(t) {
                Verdict::Send(seq) => pending.push((seq, t + Duration::from_millis(5))),
                Verdict::Dead { .. } => panic!("declared dead at {:?}", t - t0),
                Verdict::Wait => {}
            }
            t += Duration::from_millis(5);
        }
        assert_eq!(p.srtt(), Some(Duration::from_millis(5)));
    }

    #[test]
    fn a_slow_path_gets_a_longer_deadline() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, None);
        let Verdict::Send(seq) = p.poll(t0) else {
            panic!()
        };
        p.on_echo(seq, t0 + Duration::from_millis(100));
        assert_eq!(p.deadline(), Duration::from_millis(400));
    }

    proptest! {
        /// Whatever the pattern of echoes, the verdict "dead" comes exactly when the silence
        /// reaches the deadline, and never while echoes keep coming within it.
        #[test]
        fn death_is_declared_at_the_deadline(gaps in proptest::collection::vec(1u64..100, 1..60)) {
            let t0 = Instant::now();
            let mut p = Prober::new(ProbeConfig::default(), t0, None);
            let mut now = t0;
            let mut last_echo = t0;
            for gap in gaps {
                let until = now + Duration::from_millis(gap);
                // Drive the prober up to the next echo.
                while let Some(t) = p.poll_timeout() {
                    if t > until { break; }
                    now = t;
                    match p.poll(now) {
                        Verdict::Dead { silence } => {
                            prop_assert!(silence >= p.deadline());
                            prop_assert_eq!(now - last_echo, silence);
                            return Ok(());
                        }
                        Verdict::Send(_) | Verdict::Wait => {}
                    }
                }
                now = until;
                prop_assert!(now - last_echo <= p.deadline() + Duration::from_millis(100));
                p.on_traffic(now);
                last_echo = now;
            }
        }
    }
}
