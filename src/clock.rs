//! Time for the gateway's state machines (breakers, retry budgets, rate limits, JWKS refetch
//! pacing, cache freshness): a millisecond clock behind a trait, so each of them can be tested
//! with a clock that only moves when the test says so.

use std::time::{Duration, Instant};

/// Source of monotonic time in milliseconds. Abstracted so state machines can be tested with
/// a manual clock instead of sleeping.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since an arbitrary fixed origin; never goes backwards.
    fn now_millis(&self) -> u64;
}

/// Real time, measured from when the clock was created.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_millis(&self) -> u64 {
        millis(self.origin.elapsed())
    }
}

/// Whole milliseconds of `d`, saturating: state machines keep time in `u64` milliseconds.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
pub use manual::ManualClock;

#[cfg(test)]
mod manual {
    use super::{millis, Clock};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A clock that only moves when told to; for tests across the crate.
    #[derive(Debug, Default)]
    pub struct ManualClock(AtomicU64);

    impl ManualClock {
        pub fn new(start_ms: u64) -> Self {
            Self(AtomicU64::new(start_ms))
        }

        pub fn advance(&self, d: Duration) {
            self.0.fetch_add(millis(d), Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn now_millis(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }
}
