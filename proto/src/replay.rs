//! The packets a failover would lose, and only those.
//!
//! Packets the client sends to its primary in the moments before that DN's death is known are
//! lost with it: at 100 packets/s the cluster's word comes a few milliseconds after the kill,
//! and the packet sent in between is gone. The client keeps the packets it sent to its primary
//! since that DN was last heard from (less a round trip, for what was still on its way), and on
//! failover sends them again through the new primary. A packet that did arrive arrives twice,
//! which IP allows and every transport handles; none is held longer than `window`, and no more
//! than `max` are held.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long a sent packet stays eligible to be sent again, and how many are kept: a few
/// milliseconds of detection at most, and a bounded copy of a bulk stream.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(50);
pub const DEFAULT_MAX: usize = 64;

#[derive(Debug, Clone)]
pub struct Unanswered<T> {
    window: Duration,
    max: usize,
    sent: VecDeque<(Instant, T)>,
    last_heard: Option<Instant>,
}

impl<T> Default for Unanswered<T> {
    fn default() -> Self {
        Self::new(DEFAULT_WINDOW, DEFAULT_MAX)
    }
}

impl<T> Unanswered<T> {
    pub fn new(window: Duration, max: usize) -> Self {
        Self {
            window,
            max,
            sent: VecDeque::new(),
            last_heard: None,
        }
    }

    /// When the DN was last heard from.
    pub fn last_heard(&self) -> Option<Instant> {
        self.last_heard
    }

    /// `item` went to the DN at `now`.
    pub fn sent(&mut self, now: Instant, item: T) {
        if self.max == 0 {
            return;
        }
        if self.sent.len() == self.max {
            self.sent.pop_front();
        }
        self.sent.push_back((now, item));
        self.expire(now);
    }

    /// Something arrived from the DN at `now`: it was alive a one-way trip ago, so what was sent
    /// a round trip (`rtt`) before now has reached it.
    pub fn heard(&mut self, now: Instant, rtt: Duration) {
        self.last_heard = Some(now);
        let Some(delivered_before) = now.checked_sub(rtt) else {
            return;
        };
        while self
            .sent
            .front()
            .is_some_and(|(at, _)| *at <= delivered_before)
        {
            self.sent.pop_front();
        }
    }

    /// The DN is gone: what it may not have delivered, oldest first, within the window. The
    /// record is emptied.
    pub fn take(&mut self, now: Instant) -> Vec<T> {
        self.expire(now);
        self.sent.drain(..).map(|(_, item)| item).collect()
    }

    pub fn len(&self) -> usize {
        self.sent.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sent.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.window)
        {
            self.sent.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_ping_sent_after_the_last_reply_is_sent_again() {
        let t0 = Instant::now();
        let mut u = Unanswered::new(50 * MS, 64);
        // A ping every 10 ms, answered 0.3 ms later, until the DN dies at 25 ms.
        for (k, seq) in (0u32..3).enumerate() {
            let at = t0 + 10 * MS * k as u32;
            u.sent(at, seq);
            u.heard(at + MS / 3, MS / 5);
        }
        u.sent(t0 + 30 * MS, 3);
        assert_eq!(u.take(t0 + 36 * MS), vec![3]);
        assert!(u.is_empty());
    }

    #[test]
    fn what_may_still_be_on_its_way_is_kept_and_old_packets_expire() {
        let t0 = Instant::now();
        let mut u = Unanswered::new(50 * MS, 64);
        u.sent(t0, 1);
        u.sent(t0 + 5 * MS, 2);
        // Heard at 6 ms with a 3 ms round trip: 1 has arrived, 2 may not have.
        u.heard(t0 + 6 * MS, 3 * MS);
        assert_eq!(u.len(), 1);
        assert_eq!(
            u.take(t0 + 100 * MS),
            Vec::<u32>::new(),
            "too old to send again"
        );
    }

    proptest! {
        /// Whatever is sent and heard, what is taken is a subsequence of what was sent, in order,
        /// at most `max` of it, none older than the window, and none sent a round trip or more
        /// before the last time the DN was heard from.
        #[test]
        fn taken_is_bounded_recent_unheard_and_in_order(
            events in proptest::collection::vec((0u64..20, any::<bool>()), 0..200),
            max in 0usize..10,
        ) {
            let t0 = Instant::now();
            let rtt = 2 * MS;
            let window = 30 * MS;
            let mut u = Unanswered::new(window, max);
            let (mut now, mut seq, mut last_heard) = (t0, 0u32, None);
            let mut log = Vec::new();
            for (gap, heard) in events {
                now += Duration::from_millis(gap);
                if heard {
                    u.heard(now, rtt);
                    last_heard = Some(now);
                } else {
                    u.sent(now, seq);
                    log.push((now, seq));
                    seq += 1;
                }
            }
            let taken = u.take(now);
            prop_assert!(taken.len() <= max);
            prop_assert!(taken.windows(2).all(|w| w[0] < w[1]));
            for s in &taken {
                let at = log.iter().find(|(_, x)| x == s).map(|(t, _)| *t).unwrap();
                prop_assert!(now.duration_since(at) <= window);
                if let Some(h) = last_heard {
                    prop_assert!(at + rtt > h, "{s} was delivered");
                }
            }
        }
    }
}
