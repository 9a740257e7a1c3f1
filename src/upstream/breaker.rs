//! Circuit breaker per upstream: owns the decision whether a request may be sent to an upstream,
//! the bookkeeping of outcomes that drives that decision (consecutive failures, a rolling window of
//! calls and failures, probe accounting, reset-timeout backoff).
//!
//! ```text
//!                 consecutive failures >= failure_threshold
//!                 or (window calls >= volume_threshold
//!                     and failure% >= error_threshold_percentage)
//!                 or health check unhealthy
//!   +--------+ ------------------------------------------------> +------+
//!   | Closed |                                                    | Open | <---------+
//!   +--------+ <---------------+                                  +------+           |
//!                              |                                     |               |
//!        success_threshold     |        reset timeout elapsed        |               |
//!        probe successes       |        (lazily, on the next         |               |
//!        (timeout, window and  |        admit / state read)          |  a probe      |
//!        counters reset)       |        or health check healthy      |  fails        |
//!                              |                                     v  (timeout x2, |
//!                              |                               +----------+  capped) |
//!                              +------------------------------ | HalfOpen | ---------+
//!                                                              +----------+
//!                                                   at most half_open_requests
//!                                                   probes in flight; health check
//!                                                   unhealthy also re-opens it
//!                                                   (timeout not doubled)
//! ```
//!
//! The whole state (state, reset-timeout backoff step, generation, and the Open deadline or the
//! HalfOpen probe counts) lives in one `AtomicU64`, so every transition is a single compare-and-swap:
//! exactly one thread wins it and fires the listener, the half-open probe limit is exact, and a
//! reader never sees a state paired with another state's deadline. Each transition bumps the
//! generation; a permit remembers the generation it was admitted in, so results that arrive after
//! the breaker moved on (a slow Closed request finishing after it opened, a probe finishing after
//! another probe already re-opened it) are ignored instead of corrupting the new state.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{millis, Clock};
use crate::ops::metrics::METRICS;
use crate::values::FieldError;
use serde::{Deserialize, Serialize};

/// A service's `circuit_breaker:` section: the settings of the breaker each of its upstreams
/// has (see the state machine above). Always on; these tune it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures (no success in between) that open the breaker; 0 turns this trip
    /// off. Default: 5.
    pub failure_threshold: u32,
    /// Failure percentage over the rolling window that opens it once `volume_threshold` is
    /// reached; 0 turns this trip off. Default: 50.
    pub error_threshold_percentage: u32,
    /// Calls the rolling window must hold before the percentage counts, so a single failure on
    /// a quiet upstream does not open it. Default: 20.
    pub volume_threshold: u32,
    /// Span of the rolling window, split into 10 buckets; older calls are forgotten.
    /// Default: 10s.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub rolling_window: Duration,
    /// How long it stays open before admitting probes (half-open). Default: 30s.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub reset_timeout: Duration,
    /// The open time doubles each time a probe fails, up to this. Default: 5m.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub max_reset_timeout: Duration,
    /// Probe requests admitted at once while half-open. Default: 1.
    pub half_open_requests: u32,
    /// Probe successes that close it. Default: 1.
    pub success_threshold: u32,
    /// Upstream statuses that count as failures. Default: [500, 502, 503, 504].
    pub failure_statuses: Vec<u16>,
    /// A call whose response header takes longer than this to arrive (from the start of the
    /// attempt, connecting included) counts as a failure. How long the client then takes to
    /// read the body does not count. Default: none.
    #[serde(deserialize_with = "crate::values::de_opt_duration")]
    pub slow_call_threshold: Option<Duration>,
    /// gRPC statuses that count as failures when a `protocol: grpc` upstream ends a call with
    /// them (in its trailers, or a trailers-only answer). Default: [14, 4, 13] (UNAVAILABLE,
    /// DEADLINE_EXCEEDED, INTERNAL).
    pub grpc_failure_codes: Vec<u32>,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            error_threshold_percentage: 50,
            volume_threshold: 20,
            rolling_window: Duration::from_secs(10),
            reset_timeout: Duration::from_secs(30),
            max_reset_timeout: Duration::from_secs(300),
            half_open_requests: 1,
            success_threshold: 1,
            failure_statuses: vec![500, 502, 503, 504],
            slow_call_threshold: None,
            grpc_failure_codes: vec![14, 4, 13],
        }
    }
}

impl BreakerConfig {
    /// The checks serde cannot do; errors name the field below the service.
    pub fn check(&self) -> Result<(), FieldError> {
        let field = |name: &str| format!(".circuit_breaker{name}");
        if self.error_threshold_percentage > 100 {
            return Err(FieldError::new(
                field(".error_threshold_percentage"),
                format!("must be 0..=100, got {}", self.error_threshold_percentage),
            ));
        }
        if self.half_open_requests == 0 || self.success_threshold == 0 {
            return Err(FieldError::new(
                field(""),
                "half_open_requests and success_threshold must be at least 1",
            ));
        }
        if self.reset_timeout.is_zero() || self.rolling_window.is_zero() {
            return Err(FieldError::new(
                field(""),
                "reset_timeout and rolling_window must be greater than zero",
            ));
        }
        if self.max_reset_timeout < self.reset_timeout {
            return Err(FieldError::new(
                field(".max_reset_timeout"),
                "max_reset_timeout must not be shorter than reset_timeout",
            ));
        }
        if let Some(bad) = self
            .failure_statuses
            .iter()
            .find(|s| !(100..=599).contains(*s))
        {
            return Err(FieldError::new(
                field(".failure_statuses"),
                format!("{bad} is not an HTTP status"),
            ));
        }
        if let Some(bad) = self.grpc_failure_codes.iter().find(|c| **c > 16) {
            return Err(FieldError::new(
                field(".grpc_failure_codes"),
                format!("{bad} is not a gRPC status code (0 to 16)"),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum State {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

impl State {
    /// Stable name used in metrics labels, logs and the admin API.
    pub fn as_str(&self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure,
}

/// Called with `(from, to)` on every state transition, once, on the thread that caused it.
pub type TransitionListener = Arc<dyn Fn(State, State) + Send + Sync>;

/// A listener that keeps the breaker's metrics and log in step with its transitions.
pub fn metrics_listener(service: &str, upstream: &str) -> TransitionListener {
    let m = &*METRICS;
    let state_gauge = m.circuit_state.with_label_values(&[service, upstream]);
    state_gauge.set(State::Closed as i64);
    let to_counter = |to: State| {
        m.circuit_transitions_total
            .with_label_values(&[service, upstream, to.as_str()])
    };
    let counters = [
        to_counter(State::Closed),
        to_counter(State::HalfOpen),
        to_counter(State::Open),
    ];
    let (service, upstream) = (service.to_string(), upstream.to_string());
    Arc::new(move |from: State, to: State| {
        state_gauge.set(to as i64);
        counters[to as usize].inc();
        if to == State::Open {
            log::warn!("circuit breaker of {service} upstream {upstream}: {from} -> {to}");
        } else {
            log::info!("circuit breaker of {service} upstream {upstream}: {from} -> {to}");
        }
    })
}

/// Point-in-time view for the admin API and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub state: State,
    pub consecutive_failures: u32,
    pub window_calls: u64,
    pub window_failures: u64,
    /// Open duration in force: the current one while Open, the one the last opening used while
    /// HalfOpen (a probe failure doubles it), `reset_timeout` while Closed.
    pub current_reset_timeout: Duration,
    pub retry_after: Option<Duration>,
    pub probes_in_flight: u32,
    /// Probe successes so far in this half-open period (0 unless HalfOpen).
    pub probe_successes: u32,
}

/// What a breaker hands over to the process that takes over at a reload: enough to go on
/// where it stopped. Probes in flight are not carried: they finish in the old process, and
/// counting them here would hold slots nobody releases. The rolling window is not carried
/// either (it is seconds long and refills).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedBreaker {
    pub state: State,
    /// Reset-timeout backoff step (each failed probe doubles the open time).
    pub step: u32,
    /// While open: how long until it half-opens.
    pub open_for_ms: u64,
    /// While half-open: probe successes so far.
    pub probe_successes: u32,
    /// While closed: failures in a row so far.
    pub consecutive_failures: u32,
}

// Layout of the state word, low bits first:
//   2 bits state | 6 bits backoff step | 16 bits generation | 40 bits payload
// Payload while Open: deadline in ms since the breaker was created (40 bits is ~34 years).
// Payload while HalfOpen: probes in flight (20 bits) | probe successes (20 bits).
const STATE_MASK: u64 = 0b11;
const STEP_SHIFT: u32 = 2;
const STEP_MAX: u32 = 0x3f;
const GEN_SHIFT: u32 = 8;
const GEN_MASK: u64 = 0xffff;
const PAYLOAD_SHIFT: u32 = 24;
const PAYLOAD_MAX: u64 = (1 << 40) - 1;
const PROBE_BITS: u32 = 20;
const PROBE_MAX: u32 = (1 << PROBE_BITS) - 1;

#[derive(Clone, Copy, PartialEq, Eq)]
struct Word(u64);

impl Word {
    fn new(state: State, step: u32, generation: u16, payload: u64) -> Self {
        Self(
            state as u64
                | u64::from(step.min(STEP_MAX)) << STEP_SHIFT
                | u64::from(generation) << GEN_SHIFT
                | payload.min(PAYLOAD_MAX) << PAYLOAD_SHIFT,
        )
    }

    fn state(self) -> State {
        match self.0 & STATE_MASK {
            0 => State::Closed,
            1 => State::HalfOpen,
            _ => State::Open,
        }
    }

    fn step(self) -> u32 {
        ((self.0 >> STEP_SHIFT) as u32) & STEP_MAX
    }

    fn generation(self) -> u16 {
        ((self.0 >> GEN_SHIFT) & GEN_MASK) as u16
    }

    fn payload(self) -> u64 {
        self.0 >> PAYLOAD_SHIFT
    }

    fn deadline(self) -> u64 {
        self.payload()
    }

    fn probes_in_flight(self) -> u32 {
        (self.payload() as u32) & PROBE_MAX
    }

    fn probe_successes(self) -> u32 {
        ((self.payload() >> PROBE_BITS) as u32) & PROBE_MAX
    }

    /// A transition: always a new generation, so permits from the old state go stale.
    fn transition(self, state: State, step: u32, payload: u64) -> Self {
        Self::new(state, step, self.generation().wrapping_add(1), payload)
    }

    /// Same HalfOpen period with different probe counts; the generation is kept so the probes
    /// already admitted in this period still count.
    fn with_probes(self, in_flight: u32, successes: u32) -> Self {
        let payload =
            u64::from(in_flight.min(PROBE_MAX)) | u64::from(successes.min(PROBE_MAX)) << PROBE_BITS;
        Self::new(self.state(), self.step(), self.generation(), payload)
    }
}

const BUCKETS: usize = 10;
// Bucket word: 24 bits epoch | 20 bits calls | 20 bits failures. Counts saturate rather than
// wrap; the epoch is compared modulo 2^24, which only misleads for a bucket left untouched for
// exactly a multiple of 2^24 bucket spans.
const EPOCH_MASK: u64 = (1 << 24) - 1;
const COUNT_BITS: u32 = 20;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;

/// Lock-free rolling count of calls and failures: each bucket carries the epoch it belongs to,
/// and a writer that finds a stale epoch resets the bucket in the same CAS that records the call.
struct RollingWindow {
    bucket_ms: u64,
    buckets: [AtomicU64; BUCKETS],
}

impl RollingWindow {
    fn new(span: Duration) -> Self {
        Self {
            bucket_ms: (millis(span) / BUCKETS as u64).max(1),
            buckets: Default::default(),
        }
    }

    fn record(&self, now_ms: u64, failed: bool) {
        let epoch = now_ms / self.bucket_ms;
        let tag = epoch & EPOCH_MASK;
        let bucket = &self.buckets[(epoch % BUCKETS as u64) as usize];
        let mut cur = bucket.load(Ordering::Relaxed);
        loop {
            let (calls, failures) = if cur >> (2 * COUNT_BITS) == tag {
                (cur >> COUNT_BITS & COUNT_MAX, cur & COUNT_MAX)
            } else {
                (0, 0)
            };
            let next = tag << (2 * COUNT_BITS)
                | (calls + 1).min(COUNT_MAX) << COUNT_BITS
                | (failures + u64::from(failed)).min(COUNT_MAX);
            match bucket.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(seen) => cur = seen,
            }
        }
    }

    /// (calls, failures) over the buckets still inside the window.
    fn totals(&self, now_ms: u64) -> (u64, u64) {
        let now_epoch = now_ms / self.bucket_ms;
        self.buckets
            .iter()
            .fold((0, 0), |(calls, failures), bucket| {
                let word = bucket.load(Ordering::Relaxed);
                let age = now_epoch.wrapping_sub(word >> (2 * COUNT_BITS)) & EPOCH_MASK;
                if word == 0 || age >= BUCKETS as u64 {
                    (calls, failures)
                } else {
                    (
                        calls + (word >> COUNT_BITS & COUNT_MAX),
                        failures + (word & COUNT_MAX),
                    )
                }
            })
    }

    fn clear(&self) {
        for bucket in &self.buckets {
            bucket.store(0, Ordering::Relaxed);
        }
    }
}

pub struct CircuitBreaker {
    config: BreakerConfig,
    clock: Arc<dyn Clock>,
    /// Clock reading at creation; deadlines are stored relative to it to fit the state word.
    origin_ms: u64,
    reset_ms: u64,
    max_reset_ms: u64,
    probe_limit: u32,
    success_threshold: u32,
    word: AtomicU64,
    consecutive_failures: AtomicU32,
    window: RollingWindow,
    listener: Option<TransitionListener>,
}

impl CircuitBreaker {
    pub fn new(config: BreakerConfig, clock: Arc<dyn Clock>) -> Self {
        let reset_ms = millis(config.reset_timeout);
        Self {
            origin_ms: clock.now_millis(),
            reset_ms,
            // A cap below the base timeout would shorten the first opening; treat it as no backoff.
            max_reset_ms: millis(config.max_reset_timeout).max(reset_ms),
            probe_limit: config.half_open_requests.clamp(1, PROBE_MAX),
            success_threshold: config.success_threshold.clamp(1, PROBE_MAX),
            word: AtomicU64::new(Word::new(State::Closed, 0, 0, 0).0),
            consecutive_failures: AtomicU32::new(0),
            window: RollingWindow::new(config.rolling_window),
            listener: None,
            clock,
            config,
        }
    }

    pub fn with_listener(mut self, listener: TransitionListener) -> Self {
        self.listener = Some(listener);
        self
    }

    #[cfg(test)]
    pub fn config(&self) -> &BreakerConfig {
        &self.config
    }

    /// How a call that got a response header went: a failure when its status is one of
    /// `failure_statuses` or the header took longer than `slow_call_threshold`. `took` is
    /// asked only with a threshold set: a clock read is some 20 ns.
    pub fn judge(&self, status: u16, took: impl FnOnce() -> Duration) -> Outcome {
        let slow = self
            .config
            .slow_call_threshold
            .is_some_and(|limit| took() > limit);
        if slow || self.config.failure_statuses.contains(&status) {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// How a gRPC call went by the status its upstream ended it with.
    pub fn judge_grpc(&self, code: u32) -> Outcome {
        if self.config.grpc_failure_codes.contains(&code) {
            Outcome::Failure
        } else {
            Outcome::Success
        }
    }

    /// Admits a request, or returns `None` when Open or when all half-open probe slots are taken.
    /// The permit must be [`Permit::record`]ed with the request's outcome; dropping it instead
    /// means the request was cancelled and counts for nothing.
    pub fn try_acquire(self: &Arc<Self>) -> Option<Permit> {
        let mut word = self.load_effective();
        loop {
            match word.state() {
                State::Closed => return Some(Permit::new(self, word.generation(), false)),
                State::Open => return None,
                State::HalfOpen => {
                    let in_flight = word.probes_in_flight();
                    if in_flight >= self.probe_limit {
                        return None;
                    }
                    let next = word.with_probes(in_flight + 1, word.probe_successes());
                    match self.cas(word, next) {
                        Ok(()) => return Some(Permit::new(self, word.generation(), true)),
                        Err(_) => word = self.load_effective(),
                    }
                }
            }
        }
    }

    /// Whether [`try_acquire`](Self::try_acquire) would admit a request right now; no side effects,
    /// so a load balancer can skip open upstreams without starting their half-open transition.
    pub fn would_admit(&self) -> bool {
        let word = self.load();
        match word.state() {
            State::Closed => true,
            State::HalfOpen => word.probes_in_flight() < self.probe_limit,
            State::Open => self.elapsed_ms() >= word.deadline(),
        }
    }

    /// Effective state: an Open breaker whose reset timeout elapsed becomes (and reports) HalfOpen.
    pub fn state(&self) -> State {
        self.load_effective().state()
    }

    /// While Open, how long until probes are let through (for a `Retry-After` header).
    pub fn retry_after(&self) -> Option<Duration> {
        let word = self.load();
        self.retry_after_of(word, self.elapsed_ms())
    }

    /// Active health check result. Unhealthy opens the breaker (unless already Open); healthy
    /// moves an Open breaker to HalfOpen at once, so real traffic confirms recovery without
    /// waiting out the reset timeout.
    pub fn on_health_check(&self, healthy: bool) {
        let mut word = self.load_effective();
        loop {
            let next = match (healthy, word.state()) {
                (false, State::Closed) => self.open_word(word, 0),
                // Not a failed probe, so no backoff: a flapping health check alone should not
                // push the reset timeout to its cap.
                (false, State::HalfOpen) => self.open_word(word, word.step()),
                (true, State::Open) => word.transition(State::HalfOpen, word.step(), 0),
                (false, State::Open) | (true, State::Closed | State::HalfOpen) => return,
            };
            match self.cas(word, next) {
                Ok(()) => return self.notify(word.state(), next.state()),
                Err(seen) => word = seen,
            }
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        let word = self.load_effective();
        let now = self.elapsed_ms();
        let (window_calls, window_failures) = self.window.totals(self.clock.now_millis());
        let half_open = word.state() == State::HalfOpen;
        Snapshot {
            state: word.state(),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            window_calls,
            window_failures,
            current_reset_timeout: Duration::from_millis(self.reset_timeout_ms(word.step())),
            retry_after: self.retry_after_of(word, now),
            probes_in_flight: if half_open {
                word.probes_in_flight()
            } else {
                0
            },
            probe_successes: if half_open { word.probe_successes() } else { 0 },
        }
    }

    /// The state to hand to a reloaded process (see [`CarriedBreaker`]).
    pub fn carry(&self) -> CarriedBreaker {
        let word = self.load_effective();
        let half_open = word.state() == State::HalfOpen;
        CarriedBreaker {
            state: word.state(),
            step: word.step(),
            open_for_ms: word.deadline().saturating_sub(self.elapsed_ms()),
            probe_successes: if half_open { word.probe_successes() } else { 0 },
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
        }
        .normalized()
    }

    /// Takes over the state a previous process handed over, before this breaker admits
    /// anything. Permits of this process's earlier generation (there are none at start-up)
    /// go stale.
    pub fn resume(&self, carried: &CarriedBreaker) {
        let current = self.load();
        let step = carried.step.min(STEP_MAX);
        let next = match carried.state {
            State::Closed => current.transition(State::Closed, step, 0),
            State::Open => current.transition(
                State::Open,
                step,
                self.elapsed_ms().saturating_add(carried.open_for_ms),
            ),
            State::HalfOpen => current
                .transition(State::HalfOpen, step, 0)
                .with_probes(0, carried.probe_successes),
        };
        self.consecutive_failures
            .store(carried.consecutive_failures, Ordering::Relaxed);
        if self.cas(current, next).is_ok() && current.state() != next.state() {
            self.notify(current.state(), next.state());
        }
    }

    fn load(&self) -> Word {
        Word(self.word.load(Ordering::Acquire))
    }

    fn cas(&self, current: Word, next: Word) -> Result<(), Word> {
        self.word
            .compare_exchange(current.0, next.0, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(Word)
    }

    /// Loads the state word, first performing a due Open -> HalfOpen transition so that it
    /// happens (and is announced) exactly once, by whichever caller notices first.
    fn load_effective(&self) -> Word {
        let mut word = self.load();
        while word.state() == State::Open && self.elapsed_ms() >= word.deadline() {
            let next = word.transition(State::HalfOpen, word.step(), 0);
            match self.cas(word, next) {
                Ok(()) => {
                    self.notify(State::Open, State::HalfOpen);
                    return next;
                }
                Err(seen) => word = seen,
            }
        }
        word
    }

    fn elapsed_ms(&self) -> u64 {
        self.clock.now_millis().saturating_sub(self.origin_ms)
    }

    fn retry_after_of(&self, word: Word, now: u64) -> Option<Duration> {
        (word.state() == State::Open && now < word.deadline())
            .then(|| Duration::from_millis(word.deadline() - now))
    }

    fn reset_timeout_ms(&self, step: u32) -> u64 {
        let factor = 1u64.checked_shl(step).unwrap_or(u64::MAX);
        self.reset_ms.saturating_mul(factor).min(self.max_reset_ms)
    }

    fn open_word(&self, from: Word, step: u32) -> Word {
        let deadline = self
            .elapsed_ms()
            .saturating_add(self.reset_timeout_ms(step));
        from.transition(State::Open, step, deadline)
    }

    fn notify(&self, from: State, to: State) {
        if let Some(listener) = &self.listener {
            listener(from, to);
        }
    }

    fn record_closed(&self, generation: u16, outcome: Outcome) {
        let word = self.load();
        if word.state() != State::Closed || word.generation() != generation {
            return;
        }
        let now = self.clock.now_millis();
        let failed = outcome == Outcome::Failure;
        self.window.record(now, failed);
        if !failed {
            // Skip the store when already zero to keep the cache line shared on the happy path.
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let consecutive = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if self.should_trip(consecutive, now) {
            let next = self.open_word(word, 0);
            // Closed words carry no payload, so failing here means another thread already
            // made the transition.
            if self.cas(word, next).is_ok() {
                self.notify(State::Closed, State::Open);
            }
        }
    }

    fn should_trip(&self, consecutive: u32, now_ms: u64) -> bool {
        let threshold = self.config.failure_threshold;
        if threshold > 0 && consecutive >= threshold {
            return true;
        }
        let percentage = u64::from(self.config.error_threshold_percentage);
        if percentage == 0 {
            return false;
        }
        let (calls, failures) = self.window.totals(now_ms);
        calls > 0
            && calls >= u64::from(self.config.volume_threshold)
            && failures * 100 >= percentage * calls
    }

    fn record_probe(&self, generation: u16, outcome: Outcome) {
        let mut word = self.load();
        loop {
            if word.state() != State::HalfOpen || word.generation() != generation {
                return;
            }
            let in_flight = word.probes_in_flight().saturating_sub(1);
            let successes = word.probe_successes() + 1;
            let next = match outcome {
                Outcome::Failure => self.open_word(word, word.step().saturating_add(1)),
                Outcome::Success if successes >= self.success_threshold => {
                    // Reset before publishing Closed: nothing records into these while HalfOpen,
                    // and the first Closed-state results must not meet the failures that opened it.
                    self.window.clear();
                    self.consecutive_failures.store(0, Ordering::Relaxed);
                    word.transition(State::Closed, 0, 0)
                }
                Outcome::Success => word.with_probes(in_flight, successes),
            };
            match self.cas(word, next) {
                Ok(()) if next.state() != State::HalfOpen => {
                    return self.notify(State::HalfOpen, next.state())
                }
                Ok(()) => return,
                Err(seen) => word = seen,
            }
        }
    }

    /// A probe whose header was a success broke off in its body: a failed probe after all. If
    /// its success already closed the breaker, the failure counts in that closed period.
    fn record_late_probe_failure(&self, generation: u16) {
        let mut word = self.load();
        loop {
            let next = match word.state() {
                State::HalfOpen if word.generation() == generation => {
                    self.open_word(word, word.step().saturating_add(1))
                }
                State::Closed if word.generation() == generation.wrapping_add(1) => {
                    return self.record_closed(word.generation(), Outcome::Failure);
                }
                _ => return,
            };
            match self.cas(word, next) {
                Ok(()) => return self.notify(State::HalfOpen, State::Open),
                Err(seen) => word = seen,
            }
        }
    }

    fn release_probe(&self, generation: u16) {
        let mut word = self.load();
        while word.state() == State::HalfOpen
            && word.generation() == generation
            && word.probes_in_flight() > 0
        {
            let next = word.with_probes(word.probes_in_flight() - 1, word.probe_successes());
            match self.cas(word, next) {
                Ok(()) => return,
                Err(seen) => word = seen,
            }
        }
    }
}

impl CarriedBreaker {
    /// Only the fields that mean something in its state are kept.
    fn normalized(mut self) -> CarriedBreaker {
        if self.state != State::Open {
            self.open_for_ms = 0;
        }
        if self.state != State::Closed {
            self.consecutive_failures = 0;
        }
        self
    }
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Raw state, not `snapshot()`: formatting must not perform the lazy HalfOpen transition.
        let word = self.load();
        f.debug_struct("CircuitBreaker")
            .field("config", &self.config)
            .field("state", &word.state())
            .field("generation", &word.generation())
            .finish_non_exhaustive()
    }
}

/// Admission to send one request. Carries the generation it was admitted in, so its result only
/// counts if the breaker is still in that same state period.
///
/// The outcome is known in two steps. When the response header arrives ([`Permit::responded`])
/// its status and timing decide: a failure is recorded at once, and so is a probe's success,
/// which frees the half-open slot then rather than when a slow client has read the body. A
/// closed-state success waits for the end of the call ([`Permit::record`]), where a body that
/// broke off on the upstream's side still makes it a failure.
pub struct Permit {
    breaker: Arc<CircuitBreaker>,
    generation: u16,
    probe: bool,
    progress: Progress,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// No response header yet.
    Admitted,
    /// The header was a success: recorded for a probe, held for a closed-state call.
    Responded,
    /// The outcome is recorded; nothing more counts.
    Settled,
}

impl Permit {
    fn new(breaker: &Arc<CircuitBreaker>, generation: u16, probe: bool) -> Self {
        Self {
            breaker: Arc::clone(breaker),
            generation,
            probe,
            progress: Progress::Admitted,
        }
    }

    /// The response header arrived and was judged `outcome` (see [`CircuitBreaker::judge`]).
    pub fn responded(&mut self, outcome: Outcome) {
        if self.progress != Progress::Admitted {
            return;
        }
        match (outcome, self.probe) {
            (Outcome::Failure, _) => {
                self.progress = Progress::Settled;
                self.record_now(Outcome::Failure);
            }
            (Outcome::Success, true) => {
                self.progress = Progress::Responded;
                self.record_now(Outcome::Success);
            }
            (Outcome::Success, false) => self.progress = Progress::Responded,
        }
    }

    /// Whether this request is a half-open probe.
    #[cfg(test)]
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The call is over and went as `outcome`; after a header that was a success, a failure
    /// here is a body that broke off on the upstream's side.
    pub fn record(mut self, outcome: Outcome) {
        let progress = std::mem::replace(&mut self.progress, Progress::Settled);
        match (progress, outcome, self.probe) {
            (Progress::Admitted, _, _) | (Progress::Responded, _, false) => {
                self.record_now(outcome)
            }
            (Progress::Responded, Outcome::Failure, true) => {
                self.breaker.record_late_probe_failure(self.generation)
            }
            (Progress::Responded, Outcome::Success, true) | (Progress::Settled, _, _) => {}
        }
    }

    fn record_now(&self, outcome: Outcome) {
        if self.probe {
            self.breaker.record_probe(self.generation, outcome);
        } else {
            self.breaker.record_closed(self.generation, outcome);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.probe && self.progress == Progress::Admitted {
            self.breaker.release_probe(self.generation);
        }
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("generation", &self.generation)
            .field("probe", &self.probe)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use std::sync::Mutex;
    use std::thread;

    type Transitions = Arc<Mutex<Vec<(State, State)>>>;

    fn config() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            error_threshold_percentage: 50,
            volume_threshold: 10,
            rolling_window: Duration::from_secs(10),
            reset_timeout: Duration::from_secs(30),
            max_reset_timeout: Duration::from_secs(100),
            half_open_requests: 1,
            success_threshold: 1,
            ..BreakerConfig::default()
        }
    }

    fn breaker(config: BreakerConfig) -> (Arc<CircuitBreaker>, Arc<ManualClock>, Transitions) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let seen: Transitions = Arc::default();
        let sink = Arc::clone(&seen);
        let breaker =
            CircuitBreaker::new(config, clock.clone()).with_listener(Arc::new(move |from, to| {
                sink.lock().unwrap().push((from, to))
            }));
        (Arc::new(breaker), clock, seen)
    }

    fn call(breaker: &Arc<CircuitBreaker>, outcome: Outcome) {
        breaker
            .try_acquire()
            .expect("breaker should admit")
            .record(outcome);
    }

    fn open(breaker: &Arc<CircuitBreaker>) {
        for _ in 0..breaker.config().failure_threshold {
            call(breaker, Outcome::Failure);
        }
        assert_eq!(breaker.state(), State::Open);
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn a_probe_is_settled_at_its_header_and_frees_its_slot() {
        let (b, clock, _) = breaker(BreakerConfig {
            success_threshold: 2,
            ..config()
        });
        open(&b);
        clock.advance(secs(30));
        let mut first = b.try_acquire().expect("a probe");
        assert!(first.is_probe());
        assert!(b.try_acquire().is_none(), "one probe at a time");
        // The header arrives: the slot is free while the body is still being read.
        first.responded(Outcome::Success);
        assert_eq!(b.snapshot().probes_in_flight, 0);
        assert_eq!(b.snapshot().probe_successes, 1);
        let second = b.try_acquire().expect("the next probe");
        // The end of the first call changes nothing more.
        first.record(Outcome::Success);
        assert_eq!(b.snapshot().probe_successes, 1);
        second.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_probe_whose_body_breaks_off_fails_after_all() {
        let (b, clock, seen) = breaker(BreakerConfig {
            success_threshold: 2,
            ..config()
        });
        open(&b);
        clock.advance(secs(30));
        let mut probe = b.try_acquire().unwrap();
        probe.responded(Outcome::Success);
        probe.record(Outcome::Failure);
        assert_eq!(b.state(), State::Open);
        assert_eq!(
            b.retry_after(),
            Some(secs(60)),
            "a failed probe doubles the wait"
        );
        assert_eq!(
            seen.lock().unwrap().last(),
            Some(&(State::HalfOpen, State::Open))
        );
        // A probe whose success closed the breaker counts as a failure in the closed period.
        let (b, clock, _) = breaker(config());
        open(&b);
        clock.advance(secs(30));
        let mut probe = b.try_acquire().unwrap();
        probe.responded(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
        probe.record(Outcome::Failure);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 1);
    }

    #[test]
    fn a_closed_call_is_judged_at_its_header_and_fails_if_its_body_breaks_off() {
        let (b, _, _) = breaker(config());
        // A failure at the header is recorded at once.
        let mut p = b.try_acquire().unwrap();
        p.responded(Outcome::Failure);
        assert_eq!(b.snapshot().consecutive_failures, 1);
        p.record(Outcome::Success);
        assert_eq!(b.snapshot().window_calls, 1, "recorded once");
        // A success is held until the end, so bodies that break off add up.
        for _ in 0..2 {
            let mut p = b.try_acquire().unwrap();
            p.responded(Outcome::Success);
            p.record(Outcome::Failure);
        }
        assert_eq!(b.state(), State::Open, "three failures in a row");
        let snap = b.snapshot();
        assert_eq!((snap.window_calls, snap.window_failures), (3, 3));
    }

    #[test]
    fn slow_calls_are_judged_by_the_time_to_the_header() {
        let (b, _, _) = breaker(BreakerConfig {
            slow_call_threshold: Some(Duration::from_millis(100)),
            ..config()
        });
        assert_eq!(
            b.judge(200, || Duration::from_millis(100)),
            Outcome::Success
        );
        assert_eq!(
            b.judge(200, || Duration::from_millis(101)),
            Outcome::Failure
        );
        assert_eq!(b.judge(503, || Duration::ZERO), Outcome::Failure);
        // Without a threshold the time is not asked for.
        let (b, _, _) = breaker(config());
        let asked = std::cell::Cell::new(false);
        let took = || {
            asked.set(true);
            Duration::from_secs(3600)
        };
        assert_eq!(b.judge(200, took), Outcome::Success);
        assert!(!asked.get());
    }

    #[test]
    fn state_names() {
        assert_eq!(State::Closed.as_str(), "closed");
        assert_eq!(State::HalfOpen.as_str(), "half_open");
        assert_eq!(State::Open.as_str(), "open");
    }

    #[test]
    fn defaults_match_documentation() {
        let c = BreakerConfig::default();
        assert_eq!(
            (
                c.failure_threshold,
                c.error_threshold_percentage,
                c.volume_threshold
            ),
            (5, 50, 20)
        );
        assert_eq!(
            (c.rolling_window, c.reset_timeout, c.max_reset_timeout),
            (secs(10), secs(30), secs(300))
        );
        assert_eq!((c.half_open_requests, c.success_threshold), (1, 1));
    }

    #[test]
    fn consecutive_failures_open_it_and_a_success_resets_the_count() {
        let (b, _, seen) = breaker(config());
        call(&b, Outcome::Failure);
        call(&b, Outcome::Failure);
        call(&b, Outcome::Success);
        call(&b, Outcome::Failure);
        call(&b, Outcome::Failure);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.snapshot().consecutive_failures, 2);
        call(&b, Outcome::Failure);
        assert_eq!(b.state(), State::Open);
        assert!(b.try_acquire().is_none());
        assert!(!b.would_admit());
        assert_eq!(b.retry_after(), Some(secs(30)));
        assert_eq!(*seen.lock().unwrap(), vec![(State::Closed, State::Open)]);
    }

    #[test]
    fn failure_rate_opens_it_only_once_volume_is_reached() {
        let (b, _, _) = breaker(BreakerConfig {
            failure_threshold: 0,
            ..config()
        });
        // 4 failures out of 8 calls is 50%, but below the volume threshold of 10.
        for _ in 0..4 {
            call(&b, Outcome::Success);
            call(&b, Outcome::Failure);
        }
        assert_eq!(b.state(), State::Closed);
        call(&b, Outcome::Success);
        call(&b, Outcome::Success);
        // 10 calls, 4 failures: volume reached, rate 40% < 50%.
        assert_eq!(b.state(), State::Closed);
        call(&b, Outcome::Failure);
        // 11 calls, 5 failures: 45%.
        assert_eq!(b.state(), State::Closed);
        call(&b, Outcome::Failure);
        // 12 calls, 6 failures: 50%.
        assert_eq!(b.state(), State::Open);
        let snap = b.snapshot();
        assert_eq!((snap.window_calls, snap.window_failures), (12, 6));
    }

    #[test]
    fn old_buckets_expire_as_the_clock_moves() {
        let (b, clock, _) = breaker(BreakerConfig {
            failure_threshold: 0,
            ..config()
        });
        for _ in 0..9 {
            call(&b, Outcome::Failure);
        }
        assert_eq!(b.snapshot().window_calls, 9);
        clock.advance(Duration::from_millis(5_500));
        call(&b, Outcome::Success);
        assert_eq!(b.snapshot().window_calls, 10);
        // The nine failures were 10 s ago: out of the window, so this failure is 1 of 2.
        clock.advance(Duration::from_millis(4_500));
        call(&b, Outcome::Failure);
        let snap = b.snapshot();
        assert_eq!((snap.window_calls, snap.window_failures), (2, 1));
        assert_eq!(snap.state, State::Closed);
        clock.advance(secs(10));
        assert_eq!(b.snapshot().window_calls, 0);
    }

    #[test]
    fn open_becomes_half_open_after_the_reset_timeout_and_a_probe_success_closes_it() {
        let (b, clock, seen) = breaker(config());
        open(&b);
        clock.advance(secs(29));
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.retry_after(), Some(secs(1)));
        clock.advance(secs(1));
        assert!(b.would_admit());
        assert_eq!(b.retry_after(), None);
        assert_eq!(b.state(), State::HalfOpen);
        let probe = b.try_acquire().expect("probe admitted");
        assert!(probe.is_probe());
        assert!(b.try_acquire().is_none(), "only one probe at a time");
        assert!(!b.would_admit());
        probe.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
        let snap = b.snapshot();
        assert_eq!(snap.consecutive_failures, 0);
        assert_eq!((snap.window_calls, snap.window_failures), (0, 0));
        assert_eq!(snap.current_reset_timeout, secs(30));
        assert!(!b.try_acquire().expect("closed admits").is_probe());
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (State::Closed, State::Open),
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Closed),
            ]
        );
    }

    #[test]
    fn failed_probes_double_the_reset_timeout_up_to_the_cap_and_closing_resets_it() {
        let (b, clock, seen) = breaker(config());
        open(&b);
        for expected in [60, 100, 100] {
            clock.advance(b.retry_after().expect("open"));
            b.try_acquire().expect("probe").record(Outcome::Failure);
            assert_eq!(b.state(), State::Open);
            assert_eq!(b.retry_after(), Some(secs(expected)));
            assert_eq!(b.snapshot().current_reset_timeout, secs(expected));
        }
        clock.advance(secs(100));
        assert_eq!(b.snapshot().current_reset_timeout, secs(100));
        b.try_acquire().expect("probe").record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
        open(&b);
        assert_eq!(b.retry_after(), Some(secs(30)));
        assert_eq!(seen.lock().unwrap().len(), 1 + 3 * 2 + 2 + 1);
    }

    #[test]
    fn half_open_admits_at_most_the_configured_probes() {
        let (b, clock, _) = breaker(BreakerConfig {
            half_open_requests: 2,
            success_threshold: 3,
            ..config()
        });
        open(&b);
        clock.advance(secs(30));
        let first = b.try_acquire().expect("first probe");
        let second = b.try_acquire().expect("second probe");
        assert!(b.try_acquire().is_none());
        assert_eq!(b.snapshot().probes_in_flight, 2);
        first.record(Outcome::Success);
        assert_eq!(b.snapshot().probes_in_flight, 1);
        let third = b.try_acquire().expect("slot freed by the finished probe");
        assert!(b.try_acquire().is_none());
        second.record(Outcome::Success);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.snapshot().probe_successes, 2);
        third.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn success_threshold_above_one_needs_that_many_probe_successes() {
        let (b, clock, _) = breaker(BreakerConfig {
            success_threshold: 3,
            ..config()
        });
        open(&b);
        clock.advance(secs(30));
        for _ in 0..2 {
            b.try_acquire().expect("probe").record(Outcome::Success);
            assert_eq!(b.state(), State::HalfOpen);
        }
        b.try_acquire().expect("probe").record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_probe_failure_after_some_successes_reopens_it() {
        let (b, clock, _) = breaker(BreakerConfig {
            success_threshold: 2,
            ..config()
        });
        open(&b);
        clock.advance(secs(30));
        b.try_acquire().expect("probe").record(Outcome::Success);
        b.try_acquire().expect("probe").record(Outcome::Failure);
        assert_eq!(b.state(), State::Open);
        clock.advance(secs(60));
        // A new half-open period starts counting successes from zero.
        b.try_acquire().expect("probe").record(Outcome::Success);
        assert_eq!(b.state(), State::HalfOpen);
    }

    #[test]
    fn unhealthy_check_opens_closed_and_half_open_but_leaves_open_alone() {
        let (b, clock, seen) = breaker(config());
        b.on_health_check(false);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.retry_after(), Some(secs(30)));
        clock.advance(secs(10));
        b.on_health_check(false);
        assert_eq!(b.retry_after(), Some(secs(20)), "deadline not extended");
        clock.advance(secs(20));
        assert_eq!(b.state(), State::HalfOpen);
        b.on_health_check(false);
        assert_eq!(b.state(), State::Open);
        assert_eq!(
            b.retry_after(),
            Some(secs(30)),
            "not a failed probe: no backoff"
        );
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                (State::Closed, State::Open),
                (State::Open, State::HalfOpen),
                (State::HalfOpen, State::Open),
            ]
        );
    }

    #[test]
    fn healthy_check_half_opens_an_open_breaker_at_once_and_is_otherwise_ignored() {
        let (b, _, seen) = breaker(config());
        b.on_health_check(true);
        assert_eq!(b.state(), State::Closed);
        open(&b);
        b.on_health_check(true);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.retry_after(), None);
        b.on_health_check(true);
        assert_eq!(b.state(), State::HalfOpen);
        b.try_acquire().expect("probe").record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[test]
    fn listener_fires_once_for_a_lazy_transition_however_often_it_is_observed() {
        let (b, clock, seen) = breaker(config());
        open(&b);
        clock.advance(secs(30));
        for _ in 0..5 {
            assert!(b.would_admit());
            assert_eq!(b.state(), State::HalfOpen);
            let _ = b.snapshot();
        }
        assert_eq!(
            *seen.lock().unwrap(),
            vec![(State::Closed, State::Open), (State::Open, State::HalfOpen)]
        );
    }

    #[test]
    fn would_admit_has_no_side_effects() {
        let (b, clock, seen) = breaker(config());
        open(&b);
        clock.advance(secs(30));
        assert!(b.would_admit());
        assert_eq!(seen.lock().unwrap().len(), 1, "no Open -> HalfOpen yet");
    }

    #[test]
    fn late_results_from_an_earlier_state_are_ignored() {
        let (b, clock, seen) = breaker(config());
        let slow_success = b.try_acquire().expect("closed");
        let slow_failure = b.try_acquire().expect("closed");
        open(&b);
        slow_success.record(Outcome::Success);
        slow_failure.record(Outcome::Failure);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.retry_after(), Some(secs(30)));

        clock.advance(secs(30));
        let stale = b.try_acquire().expect("probe");
        let closed_before = b.try_acquire();
        assert!(closed_before.is_none());
        b.on_health_check(false);
        b.on_health_check(true);
        // A new half-open period: the old probe's success must not close it, nor its slot count.
        let fresh = b.try_acquire().expect("new period has a free slot");
        stale.record(Outcome::Success);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.snapshot().probes_in_flight, 1);
        fresh.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);

        // A Closed-state failure from before the breaker last opened does not count now.
        let old = b.try_acquire().expect("closed");
        open(&b);
        clock.advance(secs(30));
        b.try_acquire().expect("probe").record(Outcome::Success);
        old.record(Outcome::Failure);
        assert_eq!(b.snapshot().consecutive_failures, 0);
        assert_eq!(b.snapshot().window_failures, 0);
        assert_eq!(seen.lock().unwrap().len(), 8);
    }

    #[test]
    fn a_late_probe_failure_does_not_extend_the_backoff() {
        let (b, clock, _) = breaker(BreakerConfig {
            half_open_requests: 2,
            ..config()
        });
        open(&b);
        clock.advance(secs(30));
        let first = b.try_acquire().expect("probe");
        let second = b.try_acquire().expect("probe");
        first.record(Outcome::Failure);
        second.record(Outcome::Failure);
        assert_eq!(b.retry_after(), Some(secs(60)));
    }

    #[test]
    fn a_dropped_probe_releases_its_slot_and_counts_for_nothing() {
        let (b, clock, _) = breaker(config());
        open(&b);
        clock.advance(secs(30));
        let probe = b.try_acquire().expect("probe");
        assert!(b.try_acquire().is_none());
        drop(probe);
        assert_eq!(b.state(), State::HalfOpen);
        let snap = b.snapshot();
        assert_eq!((snap.probes_in_flight, snap.probe_successes), (0, 0));
        b.try_acquire()
            .expect("slot released")
            .record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_dropped_closed_permit_counts_for_nothing() {
        let (b, _, _) = breaker(config());
        drop(b.try_acquire());
        let snap = b.snapshot();
        assert_eq!((snap.window_calls, snap.consecutive_failures), (0, 0));
    }

    #[test]
    fn zero_probe_and_success_settings_act_as_one() {
        let (b, clock, _) = breaker(BreakerConfig {
            half_open_requests: 0,
            success_threshold: 0,
            ..config()
        });
        open(&b);
        clock.advance(secs(30));
        let probe = b.try_acquire().expect("one probe");
        assert!(b.try_acquire().is_none());
        probe.record(Outcome::Success);
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn half_open_probe_limit_holds_under_contention() {
        const LIMIT: u32 = 3;
        let (b, _, _) = breaker(BreakerConfig {
            half_open_requests: LIMIT,
            ..config()
        });
        open(&b);
        b.on_health_check(true);
        let in_flight = Arc::new(AtomicU32::new(0));
        let max_seen = Arc::new(AtomicU32::new(0));
        let admitted = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..16)
            .map(|_| {
                let (b, in_flight, max_seen, admitted) = (
                    Arc::clone(&b),
                    Arc::clone(&in_flight),
                    Arc::clone(&max_seen),
                    Arc::clone(&admitted),
                );
                thread::spawn(move || {
                    for _ in 0..20_000 {
                        if let Some(permit) = b.try_acquire() {
                            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                            max_seen.fetch_max(now, Ordering::SeqCst);
                            assert!(now <= LIMIT, "{now} probes in flight");
                            admitted.fetch_add(1, Ordering::Relaxed);
                            for _ in 0..50 {
                                std::hint::spin_loop();
                            }
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                            drop(permit);
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker panicked");
        }
        let max_seen = max_seen.load(Ordering::SeqCst);
        assert!((1..=LIMIT).contains(&max_seen), "max in flight {max_seen}");
        assert!(admitted.load(Ordering::Relaxed) > 0);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.snapshot().probes_in_flight, 0);
    }

    #[test]
    fn concurrent_failures_open_it_exactly_once() {
        let (b, _, seen) = breaker(config());
        let workers: Vec<_> = (0..8)
            .map(|_| {
                let b = Arc::clone(&b);
                thread::spawn(move || {
                    for _ in 0..1_000 {
                        if let Some(permit) = b.try_acquire() {
                            permit.record(Outcome::Failure);
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.join().expect("worker panicked");
        }
        assert_eq!(*seen.lock().unwrap(), vec![(State::Closed, State::Open)]);
    }

    #[test]
    fn an_open_breaker_resumes_open_for_the_rest_of_its_timeout_with_its_backoff() {
        let (old, old_clock, _) = breaker(config());
        open(&old);
        // A failed probe doubles the timeout: step 1, 60 s.
        old_clock.advance(secs(30));
        call(&old, Outcome::Failure);
        old_clock.advance(secs(20));
        let carried = old.carry();
        assert_eq!(carried.state, State::Open);
        assert_eq!((carried.step, carried.open_for_ms), (1, 40_000));

        let (new, clock, seen) = breaker(config());
        new.resume(&carried);
        assert_eq!(new.state(), State::Open);
        assert_eq!(new.retry_after(), Some(secs(40)));
        assert!(!new.would_admit());
        clock.advance(secs(40));
        assert_eq!(new.state(), State::HalfOpen);
        // The backoff went on: another failed probe opens it for 120 s, not 60.
        call(&new, Outcome::Failure);
        assert_eq!(new.retry_after(), Some(secs(100)));
        assert_eq!(
            seen.lock().unwrap()[0],
            (State::Closed, State::Open),
            "the metric listener hears the resumed state"
        );
    }

    #[test]
    fn half_open_resumes_with_its_successes_and_no_probes_in_flight() {
        let (old, old_clock, _) = breaker(BreakerConfig {
            success_threshold: 3,
            half_open_requests: 2,
            ..config()
        });
        open(&old);
        old_clock.advance(secs(30));
        call(&old, Outcome::Success);
        let in_flight = old.try_acquire().expect("a second probe slot");
        let carried = old.carry();
        drop(in_flight);
        assert_eq!(
            (carried.state, carried.probe_successes),
            (State::HalfOpen, 1)
        );

        let (new, _, _) = breaker(BreakerConfig {
            success_threshold: 3,
            half_open_requests: 2,
            ..config()
        });
        new.resume(&carried);
        let snapshot = new.snapshot();
        assert_eq!(snapshot.state, State::HalfOpen);
        assert_eq!(
            (snapshot.probes_in_flight, snapshot.probe_successes),
            (0, 1)
        );
        call(&new, Outcome::Success);
        call(&new, Outcome::Success);
        assert_eq!(new.state(), State::Closed);
    }

    #[test]
    fn closed_resumes_with_its_failures_in_a_row() {
        let (old, _, _) = breaker(config());
        call(&old, Outcome::Failure);
        call(&old, Outcome::Failure);
        let carried = old.carry();
        assert_eq!(
            (carried.state, carried.consecutive_failures),
            (State::Closed, 2)
        );
        let (new, _, seen) = breaker(config());
        new.resume(&carried);
        call(&new, Outcome::Failure);
        assert_eq!(new.state(), State::Open);
        assert_eq!(*seen.lock().unwrap(), vec![(State::Closed, State::Open)]);
    }
}
