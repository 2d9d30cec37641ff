//! Reconnect back-off: exponential, capped, with caller-supplied jitter so tests are exact.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            failures: 0,
        }
    }

    /// The delay before the next attempt after one more failure. `jitter` in `[0, 1)` spreads
    /// the delay over `[d/2, d)` so that many clients that lost the same DN do not retry in step.
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let exp = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        let full = self.base.saturating_mul(1u32 << exp).min(self.max);
        let jitter = jitter.clamp(0.0, 1.0);
        full.mul_f64(0.5 + jitter / 2.0)
    }

    /// A session came up: the next failure starts from the base delay again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let got: Vec<u128> = (0..7)
            .map(|_| b.next_delay(0.999_999).as_millis())
            .collect();
        assert_eq!(got, [99, 199, 399, 799, 1599, 1999, 1999]);
        b.reset();
        assert_eq!(b.next_delay(0.0), Duration::from_millis(50));
    }

    proptest! {
        #[test]
        fn delay_stays_within_bounds(fails in 0u32..100, jitter in 0.0f64..1.0) {
            let mut b = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
            let mut d = Duration::ZERO;
            for _ in 0..=fails {
                d = b.next_delay(jitter);
            }
            prop_assert!(d >= Duration::from_millis(25) && d <= Duration::from_secs(5));
        }
    }
}
