//! A token bucket with the clock passed in, so that callers decide what "now" is and
//! tests need no sleeping. Used for connection rates (one token per connection) and
//! bandwidth (one token per byte).

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second.
    rate: f64,
    /// Most tokens held at once: the burst.
    capacity: f64,
    /// May go below zero after [`Self::reserve`]: a debt paid back by waiting.
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` must be positive; `capacity` is at least one token.
    pub fn new(rate: f64, capacity: f64, now: Instant) -> Self {
        let capacity = capacity.max(1.0);
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        // A clock read before `last` (another thread's older `now`) adds nothing.
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = self.last.max(now);
    }

    /// Takes `n` tokens if they are there; otherwise takes nothing.
    pub fn try_take(&mut self, n: f64, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }

    /// Takes `n` tokens even if that leaves a debt, and says how long the caller must
    /// wait for the debt to be repaid. Callers that wait in turn are spaced exactly at
    /// `rate`, and nobody holds the bucket while waiting.
    pub fn reserve(&mut self, n: f64, now: Instant) -> Duration {
        self.refill(now);
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }

    /// Takes a new rate and burst (a reload), keeping what is held: tokens earned so far
    /// at the old rate stay (down to the new burst), and a debt stays owed.
    pub fn retune(&mut self, rate: f64, capacity: f64, now: Instant) {
        let capacity = capacity.max(1.0);
        if rate == self.rate && capacity == self.capacity {
            return;
        }
        self.refill(now);
        self.rate = rate;
        self.capacity = capacity;
        self.tokens = self.tokens.min(capacity);
    }

    /// Full again: forgetting this bucket loses nothing.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_refusal_then_refill_at_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert!(b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0));
        assert!(b.try_take(1.0, t0));
        assert!(!b.try_take(1.0, t0), "burst of 3 spent");
        assert!(!b.try_take(1.0, t0 + ms(50)), "half a token after 50 ms");
        assert!(b.try_take(1.0, t0 + ms(100)), "one token after 100 ms");
        assert!(!b.is_full(t0 + ms(200)));
        assert!(b.is_full(t0 + ms(10_000)), "never above capacity");
        assert!(b.try_take(3.0, t0 + ms(10_000)));
        assert!(!b.try_take(1.0, t0 + ms(10_000)));
    }

    #[test]
    fn reservations_are_spaced_at_the_rate() {
        let t0 = Instant::now();
        // 1000 bytes per second, 100 bytes of burst.
        let mut b = TokenBucket::new(1000.0, 100.0, t0);
        assert_eq!(b.reserve(100.0, t0), Duration::ZERO);
        assert_eq!(b.reserve(500.0, t0), ms(500));
        // A second caller queues behind the first one's debt.
        assert_eq!(b.reserve(500.0, t0), ms(1000));
        // Once the time has passed, the debt is repaid and the bucket refills.
        assert_eq!(b.reserve(0.0, t0 + ms(1000)), Duration::ZERO);
        assert!(b.is_full(t0 + ms(1100)));
    }

    #[test]
    fn a_retuned_bucket_keeps_its_debt_and_refills_at_the_new_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000.0, 100.0, t0);
        assert_eq!(b.reserve(600.0, t0), ms(500));
        b.retune(100.0, 10.0, t0);
        // The 500 owed, now repaid at 100 per second.
        assert_eq!(b.reserve(0.0, t0), ms(5000));
        b.retune(1000.0, 1000.0, t0 + ms(5000));
        assert!(
            !b.is_full(t0 + ms(5000)),
            "a larger burst is earned, not given"
        );
        assert!(b.is_full(t0 + ms(6000)));
    }

    #[test]
    fn an_older_clock_reading_adds_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1.0, 1.0, t0 + ms(5));
        assert!(b.try_take(1.0, t0 + ms(5)));
        assert!(!b.try_take(1.0, t0));
    }
}
