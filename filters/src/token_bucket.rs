//! A lock-free token bucket, as Envoy's `AtomicTokenBucketImpl` (what its
//! local rate limiters use: `no_timer_based_rate_limit_token_bucket`).
//!
//! The bucket is one atomic: the instant at which it was (or would have
//! been) empty. Tokens available at `now` are `(now - that) * rate`, capped
//! at `max_tokens`; taking one moves the instant forward by `1 / rate`. It
//! starts full, refills continuously (not in `fill_interval` steps), and
//! needs no timer.
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `envoy.type.v3.TokenBucket`, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BucketSpec {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
}

#[derive(Debug)]
pub struct TokenBucket {
    max_tokens: u32,
    tokens_per_fill: i128,
    /// Nanoseconds per fill.
    interval: i128,
    /// Nanoseconds since [`epoch`] at which the bucket was empty (negative
    /// for buckets full since before the epoch).
    empty_at: AtomicI64,
}

/// Process-wide origin of the buckets' clocks (monotonic).
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> i64 {
    i64::try_from(epoch().elapsed().as_nanos()).unwrap_or(i64::MAX)
}

// Token amounts are kept scaled by `interval` (nanoseconds x tokens per
// fill), so the arithmetic is exact integers.
impl TokenBucket {
    /// A full bucket.
    pub fn new(spec: BucketSpec) -> TokenBucket {
        let interval = i128::try_from(spec.fill_interval.as_nanos())
            .unwrap_or(i128::MAX / 4)
            .clamp(1, 1 << 80);
        let tokens_per_fill = i128::from(spec.tokens_per_fill.max(1));
        let full_for = i128::from(spec.max_tokens) * interval / tokens_per_fill;
        let empty_at = i128::from(now_ns()) - full_for;
        TokenBucket {
            max_tokens: spec.max_tokens,
            tokens_per_fill,
            interval,
            empty_at: AtomicI64::new(i64::try_from(empty_at).unwrap_or(i64::MIN / 2)),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self) -> bool {
        self.try_take_at(now_ns())
    }

    /// Tokens at `now`, scaled by `interval`.
    fn scaled(&self, now: i64, empty_at: i64) -> i128 {
        let elapsed = i128::from(now) - i128::from(empty_at);
        (elapsed.max(0) * self.tokens_per_fill).min(i128::from(self.max_tokens) * self.interval)
    }

    fn try_take_at(&self, now: i64) -> bool {
        let mut old = self.empty_at.load(Ordering::Relaxed);
        loop {
            let total = self.scaled(now, old);
            if total < self.interval {
                return false;
            }
            let left = (total - self.interval) / self.tokens_per_fill;
            let new = i64::try_from(i128::from(now) - left).unwrap_or(old);
            match self.empty_at.compare_exchange_weak(
                old,
                new,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(cur) => old = cur,
            }
        }
    }

    /// Whole tokens left now (for `x-ratelimit-remaining`).
    pub fn remaining(&self) -> u32 {
        let total = self.scaled(now_ns(), self.empty_at.load(Ordering::Relaxed));
        u32::try_from(total / self.interval).unwrap_or(self.max_tokens)
    }

    pub fn max_tokens(&self) -> u32 {
        self.max_tokens
    }

    /// Whole seconds until the next token (0 with one available), rounded
    /// up (for `x-ratelimit-reset`, as Envoy's `resetSeconds`).
    pub fn reset_seconds(&self) -> u64 {
        let total = self.scaled(now_ns(), self.empty_at.load(Ordering::Relaxed));
        if total >= self.interval {
            return 0;
        }
        let wait_ns = (self.interval - total + self.tokens_per_fill - 1) / self.tokens_per_fill;
        u64::try_from((wait_ns + 999_999_999) / 1_000_000_000).unwrap_or(u64::MAX)
    }

    /// Orders buckets by fill rate (tokens per unit of time), slowest first.
    pub fn cmp_rate(&self, other: &TokenBucket) -> std::cmp::Ordering {
        (self.tokens_per_fill * other.interval).cmp(&(other.tokens_per_fill * self.interval))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max: u32, per_fill: u32, ms: u64) -> BucketSpec {
        BucketSpec {
            max_tokens: max,
            tokens_per_fill: per_fill,
            fill_interval: Duration::from_millis(ms),
        }
    }

    #[test]
    fn starts_full_and_empties() {
        let b = TokenBucket::new(spec(3, 1, 1000));
        let t = now_ns();
        assert!(b.try_take_at(t));
        assert!(b.try_take_at(t));
        assert!(b.try_take_at(t));
        assert!(!b.try_take_at(t));
    }

    #[test]
    fn refills_continuously_and_caps() {
        let b = TokenBucket::new(spec(2, 2, 1000));
        let t = now_ns();
        assert!(b.try_take_at(t) && b.try_take_at(t));
        assert!(!b.try_take_at(t + 400_000_000)); // 0.8 tokens
        assert!(b.try_take_at(t + 600_000_000)); // 1.2 tokens
        assert!(!b.try_take_at(t + 600_000_000)); // 0.2 left
                                                  // Long idle: capped at max_tokens.
        let later = t + 100_000_000_000;
        assert!(b.try_take_at(later) && b.try_take_at(later));
        assert!(!b.try_take_at(later));
    }
}
