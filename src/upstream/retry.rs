//! Retries: a service's `retries` count and its retry budget. The budget, after Envoy's, owns
//! the decision whether a failed request may be retried, so that retries stay a bounded
//! fraction of traffic and cannot multiply load on an upstream that is already failing. Over
//! the last second, retries may reach `percent`% of original requests, with a floor of
//! `min_per_second` so quiet services can still retry.
//!
//! Counts live in a lock-free one-second rolling window of ten 100 ms buckets. A retry is
//! admitted by a compare-and-swap on the current bucket that re-checks the budget, so concurrent
//! callers cannot overshoot it together.

use crate::clock::Clock;
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Most retries a service may configure.
pub const MAX_RETRIES: u32 = 10;

/// A service's `retries`: how many times a failed attempt may be tried again.
pub fn check_retries(retries: u32) -> Result<(), String> {
    if retries > MAX_RETRIES {
        return Err(format!("at most {MAX_RETRIES} retries, got {retries}"));
    }
    Ok(())
}

/// A service's `retry_budget:` section, like Envoy's: retries in the last second may be at
/// most `percent` of the requests in it, but `min_per_second` are always allowed. Any values
/// are accepted.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    /// Retries allowed per second, in percent of original requests in the same second.
    /// Default: 20.
    pub percent: u32,
    /// Retries allowed per second regardless of traffic, so low-volume services can retry
    /// at all. Default: 3.
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        Self {
            percent: 20,
            min_per_second: 3,
        }
    }
}

const BUCKETS: u64 = 10;
const BUCKET_MS: u64 = 100;
// Bucket word: 24 bits epoch | 20 bits requests | 20 bits retries. Counts saturate rather than
// wrap (a million per 100 ms per route is far beyond a single gateway).
const EPOCH_MASK: u64 = (1 << 24) - 1;
const COUNT_BITS: u32 = 20;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;

#[derive(Clone, Copy, Default)]
struct Counts {
    requests: u64,
    retries: u64,
}

pub struct RetryBudget {
    config: RetryBudgetConfig,
    clock: Arc<dyn Clock>,
    buckets: [AtomicU64; BUCKETS as usize],
}

impl RetryBudget {
    pub fn new(config: RetryBudgetConfig, clock: Arc<dyn Clock>) -> Self {
        Self {
            config,
            clock,
            buckets: Default::default(),
        }
    }

    /// Counts an original (non-retry) request; this is what earns retry budget.
    pub fn record_request(&self) {
        let epoch = self.clock.now_millis() / BUCKET_MS;
        let bucket = self.bucket(epoch);
        let mut word = bucket.load(Ordering::Relaxed);
        loop {
            let mut counts = decode(word, epoch);
            counts.requests += 1;
            match bucket.compare_exchange_weak(
                word,
                encode(epoch, counts),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return,
                Err(seen) => word = seen,
            }
        }
    }

    /// Whether a retry may be sent now; if so it is counted against the budget.
    pub fn try_acquire_retry(&self) -> bool {
        let epoch = self.clock.now_millis() / BUCKET_MS;
        let others = self.totals_except_current(epoch);
        let bucket = self.bucket(epoch);
        let mut word = bucket.load(Ordering::Relaxed);
        loop {
            let mut current = decode(word, epoch);
            let requests = others.requests + current.requests;
            let retries = others.retries + current.retries;
            if retries >= self.allowed(requests) {
                return false;
            }
            current.retries += 1;
            match bucket.compare_exchange_weak(
                word,
                encode(epoch, current),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(seen) => word = seen,
            }
        }
    }

    /// (requests, retries) in the last second.
    #[cfg(test)]
    fn window_counts(&self) -> (u64, u64) {
        let epoch = self.clock.now_millis() / BUCKET_MS;
        let others = self.totals_except_current(epoch);
        let current = decode(self.bucket(epoch).load(Ordering::Relaxed), epoch);
        (
            others.requests + current.requests,
            others.retries + current.retries,
        )
    }

    fn allowed(&self, requests: u64) -> u64 {
        let by_percent = requests.saturating_mul(u64::from(self.config.percent)) / 100;
        by_percent.max(u64::from(self.config.min_per_second))
    }

    fn bucket(&self, epoch: u64) -> &AtomicU64 {
        &self.buckets[(epoch % BUCKETS) as usize]
    }

    /// Sums the nine buckets before the current one that are still inside the window. They only
    /// change by going stale, which can only shrink what a caller sees, never overshoot.
    fn totals_except_current(&self, epoch: u64) -> Counts {
        (1..BUCKETS).fold(Counts::default(), |sum, back| {
            let Some(past) = epoch.checked_sub(back) else {
                return sum;
            };
            let counts = decode(self.bucket(past).load(Ordering::Relaxed), past);
            Counts {
                requests: sum.requests + counts.requests,
                retries: sum.retries + counts.retries,
            }
        })
    }
}

/// The counts in `word` if it belongs to `epoch`, else zero: a bucket from an older lap of the
/// ring is stale and gets overwritten by the next CAS.
fn decode(word: u64, epoch: u64) -> Counts {
    if word >> (2 * COUNT_BITS) != epoch & EPOCH_MASK {
        return Counts::default();
    }
    Counts {
        requests: word >> COUNT_BITS & COUNT_MAX,
        retries: word & COUNT_MAX,
    }
}

fn encode(epoch: u64, counts: Counts) -> u64 {
    (epoch & EPOCH_MASK) << (2 * COUNT_BITS)
        | counts.requests.min(COUNT_MAX) << COUNT_BITS
        | counts.retries.min(COUNT_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::thread;
    use std::time::Duration;

    fn budget(percent: u32, min_per_second: u32) -> (RetryBudget, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let config = RetryBudgetConfig {
            percent,
            min_per_second,
        };
        (RetryBudget::new(config, clock.clone()), clock)
    }

    fn granted(budget: &RetryBudget, attempts: usize) -> usize {
        (0..attempts).filter(|_| budget.try_acquire_retry()).count()
    }

    #[test]
    fn defaults_match_documentation() {
        let c = RetryBudgetConfig::default();
        assert_eq!((c.percent, c.min_per_second), (20, 3));
    }

    #[test]
    fn min_per_second_floor_allows_retries_without_traffic() {
        let (b, _) = budget(20, 3);
        assert_eq!(granted(&b, 10), 3);
        // 10 requests earn 2 retries by percentage; the floor of 3 still applies.
        for _ in 0..10 {
            b.record_request();
        }
        assert!(!b.try_acquire_retry());
    }

    #[test]
    fn percentage_caps_retries_under_load() {
        let (b, clock) = budget(20, 3);
        // 100 requests spread over the second: 20 retries allowed.
        for _ in 0..10 {
            for _ in 0..10 {
                b.record_request();
            }
            clock.advance(Duration::from_millis(90));
        }
        assert_eq!(granted(&b, 50), 20);
        assert_eq!(b.window_counts(), (100, 20));
        b.record_request();
        b.record_request();
        b.record_request();
        b.record_request();
        b.record_request();
        // 105 requests: 21 allowed.
        assert_eq!(granted(&b, 5), 1);
    }

    #[test]
    fn window_sliding_restores_budget() {
        let (b, clock) = budget(20, 3);
        for _ in 0..50 {
            b.record_request();
        }
        assert_eq!(granted(&b, 20), 10);
        clock.advance(Duration::from_millis(900));
        assert!(!b.try_acquire_retry(), "still the same second");
        clock.advance(Duration::from_millis(100));
        // Requests and retries of the first bucket have left the window: back to the floor.
        assert_eq!(b.window_counts(), (0, 0));
        assert_eq!(granted(&b, 10), 3);
    }

    #[test]
    fn buckets_expire_one_at_a_time() {
        let (b, clock) = budget(50, 0);
        for _ in 0..4 {
            b.record_request();
        }
        clock.advance(Duration::from_millis(500));
        for _ in 0..4 {
            b.record_request();
        }
        assert_eq!(granted(&b, 10), 4);
        clock.advance(Duration::from_millis(500));
        // The first 4 requests expired, the retries (taken later) have not.
        assert_eq!(b.window_counts(), (4, 4));
        assert!(!b.try_acquire_retry());
        clock.advance(Duration::from_millis(500));
        assert_eq!(b.window_counts(), (0, 0));
        assert!(
            !b.try_acquire_retry(),
            "no traffic and no floor: no retries"
        );
    }

    #[test]
    fn concurrent_retries_never_overshoot_the_budget() {
        let (b, _) = budget(10, 5);
        for _ in 0..1_000 {
            b.record_request();
        }
        let b = Arc::new(b);
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let b = Arc::clone(&b);
                thread::spawn(move || granted(&b, 1_000))
            })
            .collect();
        let total: usize = workers
            .into_iter()
            .map(|w| w.join().expect("worker panicked"))
            .sum();
        assert_eq!(total, 100);
    }
}
