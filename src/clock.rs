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

/// Real time at the kernel's tick (`CLOCK_MONOTONIC_COARSE`: 1 to 4 ms behind, in steps of
/// 1 to 4 ms), for state machines that count in windows of 100 ms or more and read the time on
/// every request (breakers, retry budgets). It is a load from the kernel's shared page, some
/// 4 ns here, where `Instant::now` reads the timestamp counter and takes 20 ns. Not for rate
/// limits: a bucket that holds one token would lose the refill of a tick it never saw.
#[derive(Debug, Clone, Copy)]
pub struct CoarseClock {
    origin_ms: u64,
}

impl CoarseClock {
    pub fn new() -> Self {
        Self {
            origin_ms: coarse_monotonic_ms(),
        }
    }
}

impl Default for CoarseClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for CoarseClock {
    fn now_millis(&self) -> u64 {
        coarse_monotonic_ms().saturating_sub(self.origin_ms)
    }
}

#[cfg(target_os = "linux")]
fn coarse_monotonic_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid `timespec` for the call to fill in. It cannot fail for a clock
    // the kernel has (Linux 2.6.32 on); were it to, `now` stays zero and time stands still
    // for the caller, which its saturating arithmetic tolerates.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    let secs = u64::try_from(now.tv_sec).unwrap_or(0);
    let millis = u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000;
    secs.saturating_mul(1000).saturating_add(millis)
}

#[cfg(not(target_os = "linux"))]
fn coarse_monotonic_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    millis(ORIGIN.get_or_init(Instant::now).elapsed())
}

/// Whole milliseconds of `d`, saturating: state machines keep time in `u64` milliseconds.
pub fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_coarse_clock_never_goes_back() {
        let coarse = CoarseClock::new();
        let mut last = coarse.now_millis();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(30) {
            let now = coarse.now_millis();
            assert!(now >= last, "went back from {last} to {now}");
            last = now;
            std::hint::spin_loop();
        }
        // Read after the loop saw 30 ms pass: a tick behind, and a tick for where in its tick
        // the clock was made, at most.
        let moved = coarse.now_millis();
        assert!(moved >= 10, "moved {moved} ms in 30 ms");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_coarse_clock_is_the_monotonic_clock_at_most_a_tick_behind() {
        let precise_ms = || {
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid timespec for the call to fill in.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
            now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
        };
        for _ in 0..100 {
            // Read between two precise reads, so a pause between the calls cannot matter.
            let before = precise_ms();
            let coarse = coarse_monotonic_ms();
            let after = precise_ms();
            // A tick is 1 to 10 ms (HZ 1000 to 100).
            assert!(
                coarse <= after && coarse + 10 >= before,
                "coarse {coarse} ms, precise {before}..{after} ms"
            );
        }
    }
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
