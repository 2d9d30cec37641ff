//! The EN's own liveness probes of each DN, and their wire form.
//!
//! QUIC notices a dead peer only at its idle timeout (seconds). The EN therefore probes a
//! session when it has reason to: what it sent goes unanswered, an ICMP error hints that the
//! DN may be gone, or the session has been quiet for the keepalive period. The DN counts as
//! dead when a probe goes unanswered for a few round trips. The cluster's failure detector is
//! the main path for a DN's death; the probes cover what only the client can see, its own
//! path. Probes ride in QUIC DATAGRAM frames like packets; their first byte has a zero high
//! nibble, which no IPv4 or IPv6 packet has, so the data path tells them apart for free.

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
    /// Time between probes while the session is suspect.
    pub interval: Duration,
    /// The DN is dead when something sent is unanswered for `misses` intervals and at least
    /// `rtt_factor` round trips.
    pub misses: u32,
    pub rtt_factor: u32,
    /// Floor of the silence that counts as death, whatever the RTT.
    pub min_silence: Duration,
    /// After an unauthenticated hint (an ICMP error about the session), the DN is dead when a
    /// probe sent at once is unanswered for this long and `rtt_factor` round trips.
    pub hinted_silence: Duration,
    /// A session that brought nothing for this long sends one probe, which keeps NAT bindings
    /// and the QUIC connection alive and checks the DN (WireGuard's persistent keepalive).
    pub keepalive: Duration,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(10),
            misses: 3,
            rtt_factor: 4,
            min_silence: Duration::from_millis(30),
            hinted_silence: Duration::from_millis(5),
            keepalive: Duration::from_secs(25),
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
    /// What was sent has not been answered for `silence`: treat the DN as dead.
    Dead { silence: Duration },
}

/// One session's prober. It costs nothing while the session carries traffic both ways: probes
/// go out only while something the client sent is unanswered for longer than a probe interval
/// and two round trips (then every interval until an answer or the deadline), after an
/// unauthenticated hint, and as a keepalive on a session that brought nothing for the
/// keepalive period.
#[derive(Debug, Clone)]
pub struct Prober {
    config: ProbeConfig,
    next_seq: u32,
    /// When anything last came from the DN (an echo or data).
    last_heard: Instant,
    /// The first thing sent after `last_heard`, if any: the session is owed an answer.
    unanswered_since: Option<Instant>,
    /// When a hint last arrived, if nothing was heard since.
    hinted_at: Option<Instant>,
    /// The next probe, while the session is suspect.
    next_probe: Option<Instant>,
    srtt: Option<Duration>,
    /// Send times of recent probes, by sequence number.
    in_flight: std::collections::VecDeque<(u32, Instant)>,
    /// The last reading of the QUIC layer's count of frames from the DN, and when it was read.
    quic_frames: Option<(u64, Instant)>,
    dead: bool,
}

impl Prober {
    /// `initial_rtt` (e.g. the handshake's) sets the deadline until the first echo.
    pub fn new(config: ProbeConfig, now: Instant, initial_rtt: Option<Duration>) -> Self {
        Self {
            config,
            next_seq: 0,
            last_heard: now,
            unanswered_since: None,
            hinted_at: None,
            next_probe: None,
            srtt: initial_rtt,
            in_flight: Default::default(),
            quic_frames: None,
            dead: false,
        }
    }

    pub fn config(&self) -> &ProbeConfig {
        &self.config
    }

    /// How long something sent may stay unanswered before the DN counts as dead.
    pub fn deadline(&self) -> Duration {
        let by_interval = self.config.interval * self.config.misses;
        by_interval.max(self.by_rtt()).max(self.config.min_silence)
    }

    /// How long a probe sent after a hint may stay unanswered.
    pub fn hinted_deadline(&self) -> Duration {
        self.by_rtt().max(self.config.hinted_silence)
    }

    fn by_rtt(&self) -> Duration {
        self.srtt.unwrap_or_default() * self.config.rtt_factor
    }

    /// How long something sent may stay unanswered before probes start.
    fn suspect_after(&self) -> Duration {
        self.config.interval.max(self.srtt.unwrap_or_default() * 2)
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Whether the session is owed an answer (and so probed).
    pub fn is_suspect(&self) -> bool {
        self.unanswered_since.is_some()
    }

    /// Decides what to do at `now`.
    pub fn poll(&mut self, now: Instant) -> Verdict {
        if self.dead {
            return Verdict::Wait;
        }
        if let Some(silence) = self.overdue(now) {
            self.dead = true;
            return Verdict::Dead { silence };
        }
        let due = match self.unanswered_since {
            Some(since) => self.next_probe.unwrap_or(since + self.suspect_after()),
            None => self.last_heard + self.config.keepalive,
        };
        if now < due {
            return Verdict::Wait;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.in_flight.push_back((seq, now));
        // Remember only what could still be answered in time.
        while self.in_flight.len() > 64 {
            self.in_flight.pop_front();
        }
        self.unanswered_since.get_or_insert(now);
        self.next_probe = Some(now + self.config.interval);
        Verdict::Send(seq)
    }

    /// The silence that makes the DN dead at `now`, if it is.
    fn overdue(&self, now: Instant) -> Option<Duration> {
        if let Some(hint) = self.hinted_at {
            let silence = now.saturating_duration_since(hint);
            if silence >= self.hinted_deadline() {
                return Some(silence);
            }
        }
        let silence = now.saturating_duration_since(self.unanswered_since?);
        (silence >= self.deadline()).then_some(silence)
    }

    /// When [`Prober::poll`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.dead {
            return None;
        }
        let Some(since) = self.unanswered_since else {
            return Some(self.last_heard + self.config.keepalive);
        };
        let probe = self.next_probe.unwrap_or(since + self.suspect_after());
        let death = since + self.deadline();
        let hinted = self.hinted_at.map(|h| h + self.hinted_deadline());
        Some(hinted.map_or(probe.min(death), |h| probe.min(death).min(h)))
    }

    /// The client sent something on the session at `now`. Says whether the session just
    /// became owed an answer, so that [`Prober::poll_timeout`] moved earlier.
    pub fn on_sent(&mut self, now: Instant) -> bool {
        if self.dead || self.unanswered_since.is_some() {
            return false;
        }
        self.unanswered_since = Some(now);
        true
    }

    /// An echo of probe `seq` arrived at `now`.
    pub fn on_echo(&mut self, seq: u32, now: Instant) {
        if let Some(pos) = self.in_flight.iter().position(|(s, _)| *s == seq) {
            let (_, sent) = self.in_flight[pos];
            self.in_flight.drain(..=pos);
            let sample = now.saturating_duration_since(sent);
            self.srtt = Some(match self.srtt {
                Some(s) => (s * 7 + sample) / 8,
                None => sample,
            });
        }
        self.on_traffic(now);
    }

    /// `frames`: how many authenticated frames the QUIC layer has taken from the DN on this
    /// session (its acknowledgements above all), read at `now`. A DN whose queue is full (the
    /// client sends faster than it forwards) answers probes late, after the data queued in
    /// front of them, but its QUIC layer keeps acknowledging what arrives: a count that grew
    /// since the previous reading proves the DN and the path alive after that reading. That
    /// answers what was owed since then, never a debt newer than the reading, so that a DN
    /// that died between two readings is still judged by its silence since the last sign of
    /// life. Only frames that decrypted count, so that nobody but the DN can make them.
    pub fn on_quic_frames(&mut self, frames: u64, now: Instant) {
        let previous = self.quic_frames.replace((frames, now));
        if let Some((seen, read_at)) = previous {
            if frames > seen {
                self.alive_after(read_at);
            }
        }
    }

    /// The DN was alive at some moment after `at`.
    fn alive_after(&mut self, at: Instant) {
        let newer = |owed: Option<Instant>| owed.is_some_and(|t| t > at);
        if self.dead || newer(self.unanswered_since) || newer(self.hinted_at) {
            return;
        }
        self.on_traffic(at);
    }

    /// Anything from the DN (an echo, data) answers whatever was owed.
    pub fn on_traffic(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
        self.unanswered_since = None;
        self.hinted_at = None;
        self.next_probe = None;
    }

    /// The client's own path to the DN changed (another uplink, another address): what the
    /// round trip was says nothing about the new path, and the DN must hear from the client
    /// at once (so that it follows it there). Probe now, judged by the floor deadlines until
    /// the new path has been measured. Says whether [`Prober::poll_timeout`] moved earlier.
    pub fn on_path_change(&mut self, now: Instant) -> bool {
        if self.dead {
            return false;
        }
        self.srtt = None;
        self.in_flight.clear();
        self.unanswered_since.get_or_insert(now);
        self.next_probe = Some(now);
        true
    }

    /// Something nobody authenticated (an ICMP error quoting the session) says the DN may be
    /// gone: probe at once, and count it dead only if that probe goes unanswered. Says whether
    /// [`Prober::poll_timeout`] moved earlier.
    pub fn on_hint(&mut self, now: Instant) -> bool {
        if self.dead || self.hinted_at.is_some() {
            return false;
        }
        self.hinted_at = Some(now);
        self.unanswered_since.get_or_insert(now);
        self.next_probe = Some(now);
        true
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Drives the prober to `until`, answering nothing; returns the probes sent and the verdict.
    fn run_until(p: &mut Prober, until: Instant) -> (Vec<Instant>, Option<Instant>) {
        let mut sent = Vec::new();
        while let Some(t) = p.poll_timeout() {
            if t > until {
                break;
            }
            match p.poll(t) {
                Verdict::Send(_) => sent.push(t),
                Verdict::Dead { .. } => return (sent, Some(t)),
                Verdict::Wait => {}
            }
        }
        (sent, None)
    }

    #[test]
    fn an_idle_session_only_keeps_alive() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(1)));
        assert_eq!(p.poll(t0), Verdict::Wait);
        assert_eq!(p.poll_timeout(), Some(t0 + Duration::from_secs(25)));
        let mut t = t0;
        let mut probes = 0;
        for _ in 0..4 {
            t = p.poll_timeout().unwrap();
            let Verdict::Send(seq) = p.poll(t) else {
                panic!("no keepalive at {:?}", t - t0)
            };
            probes += 1;
            p.on_echo(seq, t + ms(1));
        }
        assert_eq!(probes, 4);
        assert!(t - t0 >= Duration::from_secs(100));
    }

    #[test]
    fn unanswered_sends_start_probes_and_death_comes_at_the_deadline() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(1)));
        assert!(p.on_sent(t0));
        assert!(!p.on_sent(t0 + ms(2)), "already owed an answer");
        let (sent, dead) = run_until(&mut p, t0 + Duration::from_secs(1));
        assert_eq!(sent, vec![t0 + ms(10), t0 + ms(20)]);
        assert_eq!(dead, Some(t0 + ms(30)));
        assert_eq!(p.poll(t0 + Duration::from_secs(2)), Verdict::Wait);
    }

    #[test]
    fn traffic_both_ways_needs_no_probes() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(1)));
        let mut t = t0;
        for _ in 0..10_000 {
            p.on_sent(t);
            // The answer comes within a few milliseconds.
            t += ms(3);
            assert_eq!(p.poll(t), Verdict::Wait);
            p.on_traffic(t);
        }
    }

    #[test]
    fn a_hint_is_checked_not_believed() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(1)));
        assert!(p.on_hint(t0));
        let Verdict::Send(seq) = p.poll(t0) else {
            panic!("no probe on a hint")
        };
        // The DN answers: the hint was false, and nothing more is owed.
        p.on_echo(seq, t0 + ms(1));
        assert!(!p.is_suspect());
        assert_eq!(p.poll_timeout(), Some(t0 + ms(1) + Duration::from_secs(25)));
        // Another hint, and this time the DN is silent: dead after max(5 ms, 4 RTT).
        let t1 = t0 + ms(100);
        p.on_hint(t1);
        let (sent, dead) = run_until(&mut p, t1 + Duration::from_secs(1));
        assert_eq!(sent, vec![t1]);
        assert_eq!(dead, Some(t1 + p.hinted_deadline()));
        assert_eq!(p.hinted_deadline(), ms(5));
    }

    #[test]
    fn a_slow_path_gets_longer_deadlines() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(100)));
        assert_eq!(p.deadline(), ms(400));
        assert_eq!(p.hinted_deadline(), ms(400));
        // And data is allowed two round trips before probes start.
        p.on_sent(t0);
        assert_eq!(p.poll_timeout(), Some(t0 + ms(200)));
    }

    /// Drives the prober as the client does while it sends all the time: something sent every
    /// millisecond, and the QUIC frame count read only when the probing task wakes (when the
    /// session becomes owed an answer, and at the prober's timeouts). `acked(t)`: whether
    /// something from the DN's QUIC layer arrived at `t`; no echo ever comes back. Returns
    /// when the DN was declared dead, if it was before `until`.
    fn saturated(
        p: &mut Prober,
        t0: Instant,
        until: Instant,
        acked: impl Fn(Instant) -> bool,
    ) -> Option<Instant> {
        let mut frames = 0u64;
        let mut now = t0;
        while now < until {
            if acked(now) {
                frames += 1;
            }
            let woken = p.on_sent(now);
            if woken || p.poll_timeout().is_some_and(|t| t <= now) {
                p.on_quic_frames(frames, now);
                if let Verdict::Dead { .. } = p.poll(now) {
                    return Some(now);
                }
            }
            now += ms(1);
        }
        None
    }

    #[test]
    fn a_dn_that_acknowledges_is_alive_though_its_echoes_are_late() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(1)));
        // A DN so busy that no echo comes back within a second, acknowledging every 2 ms.
        let dead = saturated(&mut p, t0, t0 + Duration::from_secs(10), |t| {
            (t - t0).as_millis().is_multiple_of(2)
        });
        assert_eq!(dead, None);
    }

    #[test]
    fn a_dn_that_stops_acknowledging_is_dead_soon_after_the_deadline() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(1)));
        let last_ack = t0 + ms(499);
        let dead = saturated(&mut p, t0, t0 + Duration::from_secs(2), |t| t <= last_ack).unwrap();
        // The last acknowledgement is seen at the first reading after it, and answers what was
        // owed since the reading before; what is sent after that is owed from then on, and the
        // DN is dead when it has waited the deadline: one probe interval late at most.
        let silence = dead - last_ack;
        assert!(silence >= p.deadline(), "{silence:?}");
        assert!(silence <= p.deadline() + p.config().interval, "{silence:?}");
    }

    #[test]
    fn frames_read_late_do_not_answer_a_newer_debt_or_hint() {
        let t0 = Instant::now();
        let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(1)));
        p.on_quic_frames(0, t0);
        // Something sent at 5 ms; an acknowledgement arrives at some moment after 0 ms, and
        // is read at 8 ms: it may be older than the debt, so the debt stands.
        p.on_sent(t0 + ms(5));
        p.on_quic_frames(1, t0 + ms(8));
        assert!(p.is_suspect());
        // More arrive after 8 ms, read at 12 ms: they answer it.
        p.on_quic_frames(2, t0 + ms(12));
        assert!(!p.is_suspect());
        // A hint at 15 ms, and frames that arrived after 12 ms read at 16 ms: the hint stands
        // (they may predate it), and the probe it asks for is judged by its own deadline.
        p.on_hint(t0 + ms(15));
        p.on_quic_frames(3, t0 + ms(16));
        assert!(p.is_suspect());
        assert_eq!(p.poll(t0 + ms(16)), Verdict::Send(0));
        assert!(matches!(p.poll(t0 + ms(20)), Verdict::Dead { .. }));
    }

    proptest! {
        /// A DN whose QUIC layer acknowledges at least every half probe interval is never
        /// declared dead, however late its echoes; one that falls silent is declared dead at
        /// most one probe interval after the deadline counted from its last sign of life.
        #[test]
        fn acknowledgements_keep_a_live_dn_and_silence_ends_a_dead_one(
            gaps in proptest::collection::vec(1u64..=5, 1..400),
            dies in proptest::bool::ANY,
        ) {
            let t0 = Instant::now();
            let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(1)));
            let mut acks = std::collections::BTreeSet::new();
            let mut t = 0;
            for gap in &gaps {
                t += gap;
                acks.insert(t);
            }
            let last = t;
            let end = if dies { last + 200 } else { last };
            let dead = saturated(&mut p, t0, t0 + ms(end), |at| acks.contains(&((at - t0).as_millis() as u64)));
            if dies {
                let dead = dead.expect("a silent DN is declared dead");
                let silence = dead - (t0 + ms(last));
                prop_assert!(silence >= p.deadline(), "dead after {silence:?}");
                prop_assert!(silence <= p.deadline() + p.config().interval, "dead only after {silence:?}");
            } else {
                prop_assert_eq!(dead, None);
            }
        }

        /// Whatever the client sends and the DN answers: the DN is declared dead exactly when
        /// something has been unanswered for the deadline, never while answers keep coming in
        /// time, and the prober never sleeps past a deadline.
        #[test]
        fn death_is_declared_at_the_deadline_and_only_then(
            steps in proptest::collection::vec((0u8..4, 1u64..60), 1..80),
        ) {
            let t0 = Instant::now();
            let mut p = Prober::new(ProbeConfig::default(), t0, Some(ms(2)));
            let mut now = t0;
            let mut owed: Option<Instant> = None;
            let mut hinted: Option<Instant> = None;
            for (what, gap) in steps {
                let until = now + ms(gap);
                while let Some(t) = p.poll_timeout() {
                    prop_assert!(t >= now);
                    if let Some(o) = owed { prop_assert!(t <= o + p.deadline()); }
                    if t > until { break; }
                    now = t;
                    match p.poll(now) {
                        Verdict::Dead { silence } => {
                            let by_owed = owed.is_some_and(|o| now - o >= p.deadline());
                            let by_hint = hinted.is_some_and(|h| now - h >= p.hinted_deadline());
                            prop_assert!(by_owed || by_hint, "dead after {:?} of silence", silence);
                            return Ok(());
                        }
                        Verdict::Send(_) => { owed.get_or_insert(now); }
                        Verdict::Wait => {}
                    }
                }
                now = until;
                match what {
                    0 => { p.on_sent(now); owed.get_or_insert(now); }
                    1 => { p.on_traffic(now); owed = None; hinted = None; }
                    2 if p.on_hint(now) => { hinted = Some(now); owed.get_or_insert(now); }
                    _ => {}
                }
            }
        }
    }
}
