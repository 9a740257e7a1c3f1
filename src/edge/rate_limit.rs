//! Per-service rate limiting: owns the `rate_limit:` config section of a service, the choice of
//! the key a request is counted under (client IP, JWT subject or a header), the limiting
//! algorithm and its two backends, and the `RateLimit-*` / `Retry-After` headers.
//!
//! The algorithm is GCRA (the generic cell rate algorithm, equivalent to a token bucket that
//! holds `burst` tokens and refills one every `1 / requests_per_second`). Each key has one
//! number, its theoretical arrival time (TAT): with emission interval `T = 1 / rps` and tolerance
//! `τ = burst · T`, a request at `now` is allowed when `max(TAT, now) + T − τ <= now`, and then
//! moves the TAT to `max(TAT, now) + T`. A TAT in the past is the same as a full bucket, so a key
//! whose TAT has passed can be forgotten without changing any decision.
//!
//! - `local`: TATs in 64 mutex-guarded shards of a hash map, each touched for a few hash-map
//!   operations only. Memory is bounded: stale keys (TAT passed) are swept every 10 s of clock
//!   time and whenever a shard is full; a shard full of live keys evicts the one closest to
//!   being stale. Time comes from an injectable [`Clock`].
//! - `redis`: one atomic Lua script call per request (EVALSHA, falling back to EVAL when Redis
//!   lost the script, e.g. after a restart) on key `bw:rl:<service>:<key>`, with a PEXPIRE at the
//!   TAT, timed by the Redis server's clock so every gateway sharing the Redis enforces one
//!   limit. When Redis fails, `failure_mode` decides: `open` lets the request through, `closed`
//!   answers 503; either way the [`Decision`] says `degraded`.

use crate::clock::Clock;
use crate::redis::{self, Redis};
use fred::prelude::ClientLike;
use fred::types::{ClusterHash, CustomCommand, Value};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use once_cell::sync::Lazy;
use prometheus::{IntCounter, IntCounterVec, Opts};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// `rate_limit:` section of a service. Absent: the service is not rate limited.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate each key may make requests at, in requests per second; fractions are
    /// allowed (`0.5` is one request every 2 s). From 0.001 to 1000000. Required.
    #[serde(deserialize_with = "de_rate")]
    pub requests_per_second: f64,
    /// Requests a key may make at once, after being idle: the bucket size. 1 to 1000000.
    /// Default: `requests_per_second` rounded up (one second's worth).
    #[serde(default, deserialize_with = "de_burst")]
    pub burst: Option<u32>,
    /// What requests are counted under: `ip` (the client address), `user` (the JWT subject; the
    /// client address when the request has none) or `header:<Name>`, e.g. `header:X-Api-Key`
    /// (the client address when the header is absent or empty). Default: `ip`.
    #[serde(default)]
    pub key: RateKey,
    /// Where the counts live: `local` (this gateway process only) or `redis` (the top-level
    /// `redis:`, shared by every gateway using it, so they enforce one combined limit).
    /// Default: `local`.
    #[serde(default)]
    pub backend: Backend,
    /// What happens when the `redis` backend fails (down, slow beyond `redis.command_timeout`):
    /// `open` lets requests through, `closed` answers them `503`. Default: `open`.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// `local` backend: most keys remembered at once; beyond it the key closest to being
    /// forgotten anyway is evicted (which gives that key a full burst again). Default: 100000.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_max_keys() -> usize {
    100_000
}

const MIN_RATE: f64 = 0.001;
const MAX_RATE: f64 = 1_000_000.0;
const MAX_BURST: u32 = 1_000_000;

fn de_rate<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let rate = f64::deserialize(d)?;
    if !(MIN_RATE..=MAX_RATE).contains(&rate) {
        return Err(de::Error::custom(format!(
            "requests_per_second must be between {MIN_RATE} and {MAX_RATE}, got {rate}"
        )));
    }
    Ok(rate)
}

fn de_burst<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let burst = u32::deserialize(d)?;
    if !(1..=MAX_BURST).contains(&burst) {
        return Err(de::Error::custom(format!(
            "burst must be between 1 and {MAX_BURST}, got {burst}"
        )));
    }
    Ok(Some(burst))
}

impl RateLimitConfig {
    /// A config with this rate and everything else defaulted.
    #[cfg(test)]
    pub fn per_second(requests_per_second: f64) -> RateLimitConfig {
        RateLimitConfig {
            requests_per_second,
            burst: None,
            key: RateKey::default(),
            backend: Backend::default(),
            failure_mode: FailureMode::default(),
            max_keys: default_max_keys(),
        }
    }

    /// The burst in force: the configured one, or one second's worth.
    pub fn effective_burst(&self) -> u32 {
        self.burst.unwrap_or_else(|| {
            self.requests_per_second
                .ceil()
                .clamp(1.0, f64::from(MAX_BURST)) as u32
        })
    }
}

/// What a request is counted under.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RateKey {
    /// The client's IP address.
    #[default]
    Ip,
    /// The authenticated subject (JWT `sub`), else the client's IP address.
    User,
    /// The value of this request header, else the client's IP address.
    Header(HeaderName),
}

impl fmt::Display for RateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RateKey::Ip => f.write_str("ip"),
            RateKey::User => f.write_str("user"),
            RateKey::Header(name) => write!(f, "header:{name}"),
        }
    }
}

impl std::str::FromStr for RateKey {
    type Err = String;

    fn from_str(s: &str) -> Result<RateKey, String> {
        match s {
            "ip" => Ok(RateKey::Ip),
            "user" => Ok(RateKey::User),
            _ => match s.strip_prefix("header:") {
                Some(name) => HeaderName::from_bytes(name.trim().as_bytes())
                    .map(RateKey::Header)
                    .map_err(|_| format!("invalid header name {name:?} in rate limit key")),
                None => Err(format!(
                    "invalid rate limit key {s:?}: expected `ip`, `user` or `header:<Name>`"
                )),
            },
        }
    }
}

impl<'de> Deserialize<'de> for RateKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RateKey, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// Where a limiter keeps its counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backend {
    #[default]
    Local,
    Redis,
}

/// What a `redis` limiter decides when Redis fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Let the request through.
    #[default]
    Open,
    /// Refuse it with 503.
    Closed,
}

/// The verdict on one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The burst: requests a key may make at once.
    pub limit: u64,
    /// Requests the key may still make right now (0 when rejected).
    pub remaining: u64,
    /// Until the key's bucket is full again (the limit fully available).
    pub reset_after: Duration,
    /// When rejected: until the next request of this key would be allowed.
    pub retry_after: Option<Duration>,
    /// Redis failed and `failure_mode` decided; `remaining` and `reset_after` mean nothing then.
    pub degraded: bool,
}

impl Decision {
    /// How the gateway answers a refused request: `429 rate limit exceeded`, or `503 rate
    /// limiter unavailable` when Redis failed under `failure_mode: closed`. `None` if allowed.
    pub fn rejection(&self) -> Option<(StatusCode, &'static str)> {
        match (self.allowed, self.degraded) {
            (true, _) => None,
            (false, false) => Some((StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded")),
            (false, true) => Some((StatusCode::SERVICE_UNAVAILABLE, "rate limiter unavailable")),
        }
    }
}

pub static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Longest key the local backend stores as is; longer ones (a header value can be kilobytes)
/// are stored as a 64-bit keyed hash, so `max_keys` bounds memory and not just the count.
const MAX_LOCAL_KEY_LEN: usize = 128;
const SHARDS: usize = 64;
/// Stale keys are swept from a shard at least this often (clock time, microseconds).
const SWEEP_EVERY_US: u64 = 10_000_000;
/// When Redis fails under `failure_mode: closed`: the Retry-After offered.
const DEGRADED_RETRY_AFTER: Duration = Duration::from_secs(1);

static REJECTED: Lazy<IntCounterVec> = Lazy::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "breakwater_ratelimit_rejected_total",
            "Requests refused by a service's rate limit (429, or 503 when Redis failed under failure_mode closed), by service.",
        ),
        &["service"],
    )
    .expect("valid metric definition");
    crate::ops::metrics::METRICS
        .registry
        .register(Box::new(c.clone()))
        .expect("breakwater_ratelimit_rejected_total registered once");
    c
});

/// GCRA: the outcome of one request at `now` against a key's TAT (all in microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gcra {
    allowed: bool,
    /// The TAT to store (unchanged when rejected).
    tat: u64,
    reset_after: u64,
    retry_after: u64,
}

fn gcra(now: u64, tat: u64, interval: u64, tolerance: u64) -> Gcra {
    let tat = tat.max(now);
    let new_tat = tat + interval;
    let allow_at = new_tat.saturating_sub(tolerance);
    if allow_at > now {
        Gcra {
            allowed: false,
            tat,
            reset_after: tat - now,
            retry_after: allow_at - now,
        }
    } else {
        Gcra {
            allowed: true,
            tat: new_tat,
            reset_after: new_tat - now,
            retry_after: 0,
        }
    }
}

/// The Redis half of GCRA; mirrors [`gcra`] on the server's clock. `string.format('%d')` because
/// Lua 5.1 prints numbers with 14 significant digits and a TAT in microseconds has 16.
const GCRA_LUA: &str = r#"-- breakwater GCRA rate limit. KEYS[1]: TAT in microseconds of the Redis clock.
-- ARGV[1]: emission interval, ARGV[2]: tolerance (burst * interval), microseconds.
-- Returns {allowed 0|1, reset_after_us, retry_after_us}.
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return {0, tat - now, allow_at - now}
end
redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
return {1, new_tat - now, 0}
"#;
/// SHA-1 of [`GCRA_LUA`], as `SCRIPT LOAD` reports it (checked by a test against a real Redis).
const GCRA_SHA: &str = "b71bd502078fc2fe6547250372c04e8877fcf651";

struct Shard {
    tats: HashMap<Box<str>, u64>,
    next_sweep: u64,
}

impl Shard {
    fn sweep(&mut self, now: u64) {
        self.tats.retain(|_, tat| *tat > now);
        self.next_sweep = now + SWEEP_EVERY_US;
    }

    fn insert(&mut self, key: &str, tat: u64, now: u64, cap: usize) {
        if self.tats.len() >= cap {
            self.sweep(now);
        }
        if self.tats.len() >= cap {
            // Every key is live. The smallest TAT is the key closest to a full bucket, so
            // forgetting it is the smallest error; the scan is only paid under key flooding.
            let oldest = self
                .tats
                .iter()
                .min_by_key(|(_, tat)| **tat)
                .map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                self.tats.remove(&oldest);
            }
        }
        self.tats.insert(key.into(), tat);
    }
}

struct LocalStore {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    shard_cap: usize,
    clock: Arc<dyn Clock>,
}

enum Store {
    Local(LocalStore),
    Redis {
        redis: Redis,
        /// `bw:rl:<service>:`.
        prefix: String,
    },
}

/// A service's compiled rate limit: the numbers worked out once, and where the counts live.
pub struct RateLimitPolicy {
    rule: Rule,
    store: StoreKind,
}

enum StoreKind {
    Local { max_keys: usize },
    Redis { redis: Redis, prefix: String },
}

/// The numbers of a limit, as the policy compiled them and the limiter applies them.
struct Rule {
    service: String,
    key: RateKey,
    failure_mode: FailureMode,
    limit: u64,
    interval_us: u64,
    tolerance_us: u64,
    limit_header: HeaderValue,
}

impl RateLimitConfig {
    /// Compiles the limit of `service`. `redis` is the shared pool (needed by
    /// `backend: redis`, ignored otherwise). The rate and burst ranges were checked when the
    /// section was parsed.
    pub fn compile(&self, service: &str, redis: Option<&Redis>) -> Result<RateLimitPolicy, String> {
        let burst = self.effective_burst();
        // Whole microseconds: exact integer arithmetic, and `remaining` is a whole number.
        // The clamp only matters for a config built in code, which skipped the parser's check.
        let rate = self.requests_per_second.clamp(MIN_RATE, MAX_RATE);
        let interval_us = ((1_000_000.0 / rate).round() as u64).max(1);
        let store = match self.backend {
            Backend::Local => StoreKind::Local {
                max_keys: self.max_keys,
            },
            Backend::Redis => StoreKind::Redis {
                redis: redis.cloned().ok_or_else(|| {
                    format!(
                        "services.{service}.rate_limit.backend is redis but no top-level `redis:` is configured"
                    )
                })?,
                prefix: format!("bw:rl:{service}:"),
            },
        };
        let rule = Rule {
            service: service.to_string(),
            key: self.key.clone(),
            failure_mode: self.failure_mode,
            limit: u64::from(burst),
            interval_us,
            tolerance_us: interval_us * u64::from(burst),
            limit_header: HeaderValue::from(burst),
        };
        Ok(RateLimitPolicy { rule, store })
    }
}

/// One service's rate limiter; shared by all worker threads.
pub struct RateLimiter {
    rule: Rule,
    rejected: IntCounter,
    store: Store,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("service", &self.rule.service)
            .field("key", &self.rule.key)
            .field("limit", &self.rule.limit)
            .field("interval_us", &self.rule.interval_us)
            .field(
                "backend",
                &match self.store {
                    Store::Local(_) => Backend::Local,
                    Store::Redis { .. } => Backend::Redis,
                },
            )
            .finish()
    }
}

impl RateLimiter {
    /// Starts the limiter a policy describes, with empty counts and its metric handle;
    /// `clock` times the `local` backend (the `redis` backend uses the Redis server's clock).
    pub fn new(policy: RateLimitPolicy, clock: Arc<dyn Clock>) -> RateLimiter {
        let store = match policy.store {
            StoreKind::Local { max_keys } => Store::Local(LocalStore {
                shards: (0..SHARDS)
                    .map(|_| {
                        Mutex::new(Shard {
                            tats: HashMap::new(),
                            next_sweep: 0,
                        })
                    })
                    .collect(),
                hasher: RandomState::new(),
                shard_cap: max_keys.div_ceil(SHARDS).max(1),
                clock,
            }),
            StoreKind::Redis { redis, prefix } => Store::Redis { redis, prefix },
        };
        RateLimiter {
            rejected: REJECTED.with_label_values(&[&policy.rule.service]),
            rule: policy.rule,
            store,
        }
    }

    /// Whether the key is the authenticated subject, so the limit is checked after
    /// authentication; every other key is checked before it, so refused requests count too.
    pub fn needs_identity(&self) -> bool {
        self.rule.key == RateKey::User
    }

    /// The key `check` should count this request under. `client_ip` is the client's address,
    /// `subject` the authenticated JWT subject if any. Keys from different sources are
    /// namespaced (`sub:`, `hdr:`, `ip:`) so a client cannot name someone else's bucket, e.g.
    /// by sending another client's address as its API key.
    pub fn key_for<'a>(
        &self,
        client_ip: &'a str,
        subject: Option<&'a str>,
        headers: &HeaderMap,
    ) -> Cow<'a, str> {
        match &self.rule.key {
            RateKey::Ip => Cow::Borrowed(client_ip),
            RateKey::User => match subject {
                Some(sub) if !sub.is_empty() => Cow::Owned(format!("sub:{sub}")),
                _ => Cow::Owned(format!("ip:{client_ip}")),
            },
            RateKey::Header(name) => match headers.get(name) {
                Some(v) if !v.is_empty() => {
                    Cow::Owned(format!("hdr:{}", String::from_utf8_lossy(v.as_bytes())))
                }
                _ => Cow::Owned(format!("ip:{client_ip}")),
            },
        }
    }

    /// Counts one request of `key` and says whether it may go on. Never fails: a Redis error
    /// is counted in `breakwater_redis_errors_total{op="ratelimit"}` and decided by
    /// `failure_mode`, within `redis.command_timeout`.
    pub async fn check(&self, key: &str) -> Decision {
        let decision = match &self.store {
            Store::Local(local) => self.check_local(local, key),
            Store::Redis { redis, prefix } => self.check_redis(redis, prefix, key).await,
        };
        if !decision.allowed {
            self.rejected.inc();
        }
        decision
    }

    /// Headers for the response: `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`
    /// (seconds, rounded up), and when rejected `Retry-After` (seconds, rounded up, at least 1).
    /// A degraded decision has no meaningful counts, so it gets only `Retry-After` if rejected.
    pub fn headers(&self, d: &Decision) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers = Vec::with_capacity(4);
        if !d.degraded {
            headers.push((RATELIMIT_LIMIT.clone(), self.rule.limit_header.clone()));
            headers.push((RATELIMIT_REMAINING.clone(), HeaderValue::from(d.remaining)));
            headers.push((
                RATELIMIT_RESET.clone(),
                HeaderValue::from(ceil_secs(d.reset_after)),
            ));
        }
        if let Some(retry) = d.retry_after {
            headers.push((
                http::header::RETRY_AFTER,
                HeaderValue::from(ceil_secs(retry).max(1)),
            ));
        }
        headers
    }

    /// Keys the local backend remembers right now (0 for the redis backend).
    #[cfg(test)]
    fn tracked_keys(&self) -> usize {
        match &self.store {
            Store::Local(local) => local
                .shards
                .iter()
                .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).tats.len())
                .sum(),
            Store::Redis { .. } => 0,
        }
    }

    fn decision(&self, allowed: bool, reset_after_us: u64, retry_after_us: u64) -> Decision {
        let remaining = if allowed {
            self.rule.tolerance_us.saturating_sub(reset_after_us) / self.rule.interval_us
        } else {
            0
        };
        Decision {
            allowed,
            limit: self.rule.limit,
            remaining,
            reset_after: Duration::from_micros(reset_after_us),
            retry_after: (!allowed).then(|| Duration::from_micros(retry_after_us)),
            degraded: false,
        }
    }

    fn degraded(&self) -> Decision {
        let allowed = self.rule.failure_mode == FailureMode::Open;
        Decision {
            allowed,
            limit: self.rule.limit,
            remaining: 0,
            reset_after: Duration::ZERO,
            retry_after: (!allowed).then_some(DEGRADED_RETRY_AFTER),
            degraded: true,
        }
    }

    /// The local backend's live buckets, to hand to a reloaded process: each key with the
    /// microseconds until its bucket is full again. Keys too long to store as they are
    /// (kept as a per-process hash) are not carried. Empty for the `redis` backend, whose
    /// counts outlive the process anyway.
    pub fn carry_buckets(&self) -> Vec<(String, u64)> {
        let Store::Local(local) = &self.store else {
            return Vec::new();
        };
        let now = local.clock.now_millis().saturating_mul(1000);
        let mut buckets = Vec::new();
        for shard in local.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            buckets.extend(
                shard
                    .tats
                    .iter()
                    .filter(|(key, tat)| **tat > now && !key.starts_with('#'))
                    .map(|(key, tat)| (key.to_string(), tat - now)),
            );
        }
        buckets
    }

    /// Takes over buckets a previous process handed over (see [`Self::carry_buckets`]).
    pub fn resume_buckets(&self, buckets: &[(String, u64)]) {
        let Store::Local(local) = &self.store else {
            return;
        };
        let now = local.clock.now_millis().saturating_mul(1000);
        for (key, full_in_us) in buckets {
            if key.len() > MAX_LOCAL_KEY_LEN {
                continue;
            }
            let hash = local.hasher.hash_one(key.as_str());
            let mut shard = local.shards[(hash % SHARDS as u64) as usize]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            shard.insert(key, now.saturating_add(*full_in_us), now, local.shard_cap);
        }
    }

    fn check_local(&self, local: &LocalStore, key: &str) -> Decision {
        let now = local.clock.now_millis().saturating_mul(1000);
        let hash = local.hasher.hash_one(key);
        let hashed;
        let key = if key.len() > MAX_LOCAL_KEY_LEN {
            hashed = format!("#{hash:016x}");
            hashed.as_str()
        } else {
            key
        };
        let mut shard = local.shards[(hash % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if now >= shard.next_sweep {
            shard.sweep(now);
        }
        let outcome = match shard.tats.get_mut(key) {
            Some(tat) => {
                let outcome = gcra(now, *tat, self.rule.interval_us, self.rule.tolerance_us);
                *tat = outcome.tat;
                outcome
            }
            None => {
                let outcome = gcra(now, now, self.rule.interval_us, self.rule.tolerance_us);
                if outcome.allowed {
                    shard.insert(key, outcome.tat, now, local.shard_cap);
                }
                outcome
            }
        };
        drop(shard);
        self.decision(outcome.allowed, outcome.reset_after, outcome.retry_after)
    }

    async fn check_redis(&self, redis: &Redis, prefix: &str, key: &str) -> Decision {
        let redis_key = format!("{prefix}{key}");
        match self.run_script(redis, &redis_key).await {
            Ok(reply) => match reply.as_slice() {
                &[allowed, reset_after, retry_after] => self.decision(
                    allowed == 1,
                    u64::try_from(reset_after).unwrap_or(0),
                    u64::try_from(retry_after).unwrap_or(0),
                ),
                other => {
                    redis::record_error(
                        "ratelimit",
                        &format!("unexpected rate limit script reply {other:?}"),
                    );
                    self.degraded()
                }
            },
            Err(e) => {
                redis::record_error("ratelimit", &e);
                self.degraded()
            }
        }
    }

    /// EVALSHA, and EVAL when the server does not have the script (first use, after a restart
    /// or a failover); EVAL also caches it there for the next EVALSHA.
    async fn run_script(&self, redis: &Redis, key: &str) -> Result<Vec<i64>, fred::error::Error> {
        let args = |script: &'static str| -> Vec<Value> {
            vec![
                Value::from_static_str(script),
                Value::Integer(1),
                Value::from(key),
                Value::Integer(self.rule.interval_us as i64),
                Value::Integer(self.rule.tolerance_us as i64),
            ]
        };
        // Offset 2 is KEYS[1]: a cluster routes the call to the node owning the key.
        let evalsha = CustomCommand::new_static("EVALSHA", ClusterHash::Offset(2), false);
        match redis.commands().custom(evalsha, args(GCRA_SHA)).await {
            Err(e) if e.details().starts_with("NOSCRIPT") => {
                let eval = CustomCommand::new_static("EVAL", ClusterHash::Offset(2), false);
                redis.commands().custom(eval, args(GCRA_LUA)).await
            }
            result => result,
        }
    }
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, MonotonicClock};
    use crate::redis::tests::{
        config as redis_config, wait_connected, ConnectorRuntime, TestRedis,
    };
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::thread;
    use std::time::Instant;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn cfg(rps: f64, burst: u32) -> RateLimitConfig {
        RateLimitConfig {
            burst: Some(burst),
            ..RateLimitConfig::per_second(rps)
        }
    }

    fn local(cfg: &RateLimitConfig) -> (RateLimiter, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let limiter = RateLimiter::new(cfg.compile("svc", None).unwrap(), clock.clone());
        (limiter, clock)
    }

    fn check(limiter: &RateLimiter, key: &str) -> Decision {
        match &limiter.store {
            Store::Local(l) => {
                let d = limiter.check_local(l, key);
                if !d.allowed {
                    limiter.rejected.inc();
                }
                d
            }
            Store::Redis { .. } => panic!("local only"),
        }
    }

    fn header<'h>(headers: &'h [(HeaderName, HeaderValue)], name: &str) -> Option<&'h str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_str().unwrap())
    }

    #[test]
    fn config_parses_with_defaults_and_rejects_bad_values() {
        let c: RateLimitConfig = serde_yaml::from_str("{requests_per_second: 100}").unwrap();
        assert_eq!(c, RateLimitConfig::per_second(100.0));
        assert_eq!(c.effective_burst(), 100);
        assert_eq!(
            (c.key.clone(), c.backend, c.failure_mode),
            (RateKey::Ip, Backend::Local, FailureMode::Open)
        );
        assert_eq!(c.max_keys, 100_000);
        assert_eq!(RateLimitConfig::per_second(0.5).effective_burst(), 1);

        let c: RateLimitConfig = serde_yaml::from_str(
            "{requests_per_second: 100, burst: 200, key: 'header:X-Api-Key', backend: redis, failure_mode: closed, max_keys: 10}",
        )
        .unwrap();
        assert_eq!(c.effective_burst(), 200);
        assert_eq!(c.key, RateKey::Header(HeaderName::from_static("x-api-key")));
        assert_eq!(c.key.to_string(), "header:x-api-key");
        assert_eq!(
            (c.backend, c.failure_mode, c.max_keys),
            (Backend::Redis, FailureMode::Closed, 10)
        );
        let c: RateLimitConfig =
            serde_yaml::from_str("{requests_per_second: 1, key: user}").unwrap();
        assert_eq!(c.key, RateKey::User);

        for (yaml, expect) in [
            ("{requests_per_second: 0}", "between"),
            ("{requests_per_second: -3}", "between"),
            ("{requests_per_second: 1, burst: 0}", "burst must be"),
            (
                "{requests_per_second: 1, key: cookie}",
                "expected `ip`, `user` or `header:<Name>`",
            ),
            (
                "{requests_per_second: 1, key: 'header:bad name'}",
                "invalid header name",
            ),
            (
                "{requests_per_second: 1, backend: memcached}",
                "unknown variant",
            ),
            (
                "{requests_per_second: 1, failure_mode: maybe}",
                "unknown variant",
            ),
            ("{requests_per_second: 1, rps: 2}", "unknown field"),
            ("{burst: 2}", "missing field `requests_per_second`"),
        ] {
            let err = serde_yaml::from_str::<RateLimitConfig>(yaml)
                .unwrap_err()
                .to_string();
            assert!(err.contains(expect), "{yaml}: {err}");
        }
    }

    #[test]
    fn check_can_run_on_any_worker_thread() {
        // Pingora's phases are `Send` futures; `check` must not hold anything `!Send`.
        fn assert_send<T: Send>(_: &T) {}
        fn assert_sync<T: Send + Sync>() {}
        assert_sync::<RateLimiter>();
        let (l, _) = local(&cfg(1.0, 1));
        assert_send(&l.check("k"));
    }

    #[test]
    fn redis_backend_without_redis_is_refused() {
        let c = RateLimitConfig {
            backend: Backend::Redis,
            ..cfg(1.0, 1)
        };
        let err = c.compile("orders", None).err().unwrap();
        assert!(
            err.contains("services.orders.rate_limit.backend") && err.contains("redis:"),
            "{err}"
        );
    }

    #[test]
    fn a_full_burst_is_allowed_then_requests_are_rejected() {
        let (l, _) = local(&cfg(10.0, 5));
        for remaining in (0..5).rev() {
            let d = check(&l, "k");
            assert!(d.allowed && !d.degraded);
            assert_eq!((d.limit, d.remaining, d.retry_after), (5, remaining, None));
        }
        let before = l.rejected.get();
        let d = check(&l, "k");
        assert!(!d.allowed && !d.degraded);
        assert_eq!(d.remaining, 0);
        assert_eq!(
            d.reset_after,
            ms(500),
            "five requests of 100 ms each to refill"
        );
        assert_eq!(d.retry_after, Some(ms(100)));
        assert_eq!(l.rejected.get(), before + 1);
        assert_eq!(
            d.rejection(),
            Some((StatusCode::TOO_MANY_REQUESTS, "rate limit exceeded"))
        );
    }

    #[test]
    fn tokens_refill_at_the_configured_rate() {
        let (l, clock) = local(&cfg(10.0, 5));
        for _ in 0..5 {
            assert!(check(&l, "k").allowed);
        }
        assert!(!check(&l, "k").allowed);
        clock.advance(ms(99));
        assert!(!check(&l, "k").allowed, "not yet a whole interval");
        clock.advance(ms(1));
        assert!(check(&l, "k").allowed, "one token after 100 ms");
        assert!(!check(&l, "k").allowed, "and only one");
        clock.advance(ms(300));
        for _ in 0..3 {
            assert!(check(&l, "k").allowed);
        }
        assert!(!check(&l, "k").allowed);
        // Idle far longer than the refill time: a full burst, never more.
        clock.advance(Duration::from_secs(3600));
        let allowed = (0..20).filter(|_| check(&l, "k").allowed).count();
        assert_eq!(allowed, 5);
        // Steady traffic exactly at the rate is always allowed.
        clock.advance(Duration::from_secs(1));
        for _ in 0..100 {
            clock.advance(ms(100));
            assert!(check(&l, "k").allowed);
        }
    }

    #[test]
    fn retry_after_says_exactly_when_the_next_request_is_allowed() {
        let (l, clock) = local(&cfg(4.0, 2)); // one token every 250 ms
        assert!(check(&l, "k").allowed);
        clock.advance(ms(10));
        assert!(check(&l, "k").allowed);
        clock.advance(ms(30));
        let d = check(&l, "k");
        assert_eq!(d.retry_after, Some(ms(210)));
        assert_eq!(d.reset_after, ms(460));
        clock.advance(ms(209));
        assert!(!check(&l, "k").allowed);
        let d = check(&l, "k");
        assert_eq!(d.retry_after, Some(ms(1)));
        clock.advance(ms(1));
        let d = check(&l, "k");
        assert!(d.allowed);
        assert_eq!(d.remaining, 0);
    }

    #[test]
    fn headers_round_seconds_up_and_retry_after_is_at_least_one() {
        let (l, _) = local(&cfg(10.0, 3));
        let d = check(&l, "k");
        let h = l.headers(&d);
        assert_eq!(header(&h, "ratelimit-limit"), Some("3"));
        assert_eq!(header(&h, "ratelimit-remaining"), Some("2"));
        assert_eq!(
            header(&h, "ratelimit-reset"),
            Some("1"),
            "100 ms rounds up to 1 s"
        );
        assert_eq!(header(&h, "retry-after"), None);
        check(&l, "k");
        check(&l, "k");
        let h = l.headers(&check(&l, "k"));
        assert_eq!(header(&h, "ratelimit-remaining"), Some("0"));
        assert_eq!(
            header(&h, "retry-after"),
            Some("1"),
            "100 ms rounds up to 1 s"
        );

        let (slow, _) = local(&cfg(0.4, 1)); // one every 2.5 s
        check(&slow, "k");
        let h = slow.headers(&check(&slow, "k"));
        assert_eq!(header(&h, "retry-after"), Some("3"));
        assert_eq!(header(&h, "ratelimit-reset"), Some("3"));

        let degraded_open = Decision {
            allowed: true,
            ..l.degraded()
        };
        assert!(l.headers(&degraded_open).is_empty());
        let closed_cfg = RateLimitConfig {
            failure_mode: FailureMode::Closed,
            ..cfg(1.0, 1)
        };
        let closed = RateLimiter::new(
            closed_cfg.compile("svc", None).unwrap(),
            Arc::new(ManualClock::new(0)),
        );
        let d = closed.degraded();
        assert_eq!(
            d.rejection(),
            Some((StatusCode::SERVICE_UNAVAILABLE, "rate limiter unavailable"))
        );
        let h = closed.headers(&d);
        assert_eq!(h.len(), 1);
        assert_eq!(header(&h, "retry-after"), Some("1"));
    }

    #[test]
    fn separate_keys_have_separate_buckets() {
        let (l, _) = local(&cfg(1.0, 2));
        for key in ["a", "b", "c"] {
            assert!(check(&l, key).allowed);
            assert!(check(&l, key).allowed);
            assert!(!check(&l, key).allowed);
        }
        assert_eq!(l.tracked_keys(), 3);
    }

    #[test]
    fn keys_come_from_ip_subject_or_header_with_ip_fallback() {
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("k1"));
        let with = |key: &str| {
            let c = RateLimitConfig {
                key: key.parse().unwrap(),
                ..cfg(1.0, 1)
            };
            RateLimiter::new(
                c.compile("svc", None).unwrap(),
                Arc::new(ManualClock::new(0)),
            )
        };
        let ip = with("ip");
        assert_eq!(ip.key_for("10.0.0.1", Some("alice"), &headers), "10.0.0.1");
        assert!(matches!(
            ip.key_for("10.0.0.1", None, &headers),
            Cow::Borrowed(_)
        ));
        let user = with("user");
        assert_eq!(
            user.key_for("10.0.0.1", Some("alice"), &headers),
            "sub:alice"
        );
        assert_eq!(user.key_for("10.0.0.1", None, &headers), "ip:10.0.0.1");
        assert_eq!(user.key_for("10.0.0.1", Some(""), &headers), "ip:10.0.0.1");
        let hdr = with("header:X-Api-Key");
        assert_eq!(hdr.key_for("10.0.0.1", Some("alice"), &headers), "hdr:k1");
        assert_eq!(
            hdr.key_for("10.0.0.1", None, &HeaderMap::new()),
            "ip:10.0.0.1"
        );
        // A client naming another client's address as its key still gets its own bucket.
        headers.insert("x-api-key", HeaderValue::from_static("ip:10.0.0.2"));
        assert_ne!(
            hdr.key_for("10.0.0.1", None, &headers),
            hdr.key_for("10.0.0.2", None, &HeaderMap::new())
        );
    }

    #[test]
    fn memory_stays_bounded_and_stale_keys_are_evicted() {
        let c = RateLimitConfig {
            max_keys: 6_400,
            ..cfg(10.0, 5)
        };
        let (l, clock) = local(&c);
        for i in 0..20_000 {
            assert!(check(&l, &format!("flood-{i}")).allowed);
        }
        let held = l.tracked_keys();
        assert!((6_000..=6_400).contains(&held), "{held} keys held");
        // A long key costs no more than a short one, and is still limited.
        let long = "x".repeat(10_000);
        for _ in 0..5 {
            assert!(check(&l, &long).allowed);
        }
        assert!(!check(&l, &long).allowed);
        let Store::Local(store) = &l.store else {
            unreachable!()
        };
        let longest = store
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap()
                    .tats
                    .keys()
                    .map(|k| k.len())
                    .collect::<Vec<_>>()
            })
            .max();
        assert!(longest <= Some(MAX_LOCAL_KEY_LEN));

        // Once every TAT has passed, the periodic sweep forgets the keys (which changes no
        // decision: a passed TAT is a full bucket).
        clock.advance(Duration::from_secs(11));
        for i in 0..1_000 {
            assert!(check(&l, &format!("new-{i}")).allowed);
        }
        assert_eq!(l.tracked_keys(), 1_000);
    }

    #[test]
    fn a_full_shard_evicts_the_key_closest_to_a_full_bucket() {
        let c = RateLimitConfig {
            max_keys: SHARDS, // one key per shard
            ..cfg(1.0, 3)
        };
        let (l, clock) = local(&c);
        let Store::Local(store) = &l.store else {
            unreachable!()
        };
        // Two keys that land in the same shard.
        let shard_of = |k: &str| store.hasher.hash_one(k) % SHARDS as u64;
        let a = "key-0".to_string();
        let b = (1..)
            .map(|i| format!("key-{i}"))
            .find(|k| shard_of(k) == shard_of(&a))
            .unwrap();
        for _ in 0..3 {
            assert!(check(&l, &a).allowed);
        }
        clock.advance(ms(100));
        assert!(check(&l, &b).allowed);
        assert_eq!(l.tracked_keys(), 1, "a was evicted for b");
        // a starts over with a full burst: the bounded-memory trade-off under key flooding.
        assert!(check(&l, &a).allowed);
    }

    #[test]
    fn concurrent_requests_never_exceed_burst_plus_rate_times_elapsed() {
        const BURST: u64 = 50;
        const RPS: f64 = 1000.0; // one token per ms
        let clock = Arc::new(ManualClock::new(0));
        let l = Arc::new(RateLimiter::new(
            cfg(RPS, BURST as u32).compile("svc", None).unwrap(),
            clock.clone(),
        ));
        let allowed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..8)
            .map(|t| {
                let (l, allowed, stop) = (Arc::clone(&l), Arc::clone(&allowed), Arc::clone(&stop));
                thread::spawn(move || {
                    let mut i = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Half the traffic on one hot key, the rest spread over a few.
                        let key = if i.is_multiple_of(2) {
                            "hot".to_string()
                        } else {
                            format!("k{}", (i + t) % 4)
                        };
                        if check(&l, &key).allowed && key == "hot" {
                            allowed.fetch_add(1, Ordering::Relaxed);
                        }
                        i += 1;
                    }
                })
            })
            .collect();
        let elapsed_ms = 200;
        for _ in 0..elapsed_ms {
            thread::sleep(Duration::from_micros(200));
            clock.advance(ms(1));
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            w.join().unwrap();
        }
        let allowed = allowed.load(Ordering::Relaxed);
        let bound = BURST + (RPS as u64) * elapsed_ms / 1000;
        assert!(allowed <= bound, "{allowed} allowed, bound {bound}");
        assert!(allowed >= BURST, "{allowed} allowed");
    }

    #[test]
    fn gcra_matches_a_token_bucket() {
        // burst 3, one token per 10 units; 3 at once, then one per 10.
        let (mut tat, mut allowed) = (0, 0);
        for now in 0..100 {
            let g = gcra(now, tat, 10, 30);
            if g.allowed {
                allowed += 1;
            }
            tat = g.tat;
        }
        assert_eq!(allowed, 3 + 9);
    }

    // ----- redis backend, against a real redis-server -----

    fn redis_limiter(redis: &Redis, c: RateLimitConfig) -> RateLimiter {
        let c = RateLimitConfig {
            backend: Backend::Redis,
            ..c
        };
        RateLimiter::new(
            c.compile("svc", Some(redis)).unwrap(),
            Arc::new(MonotonicClock::new()),
        )
    }

    fn worker_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_script_sha_matches_the_script() {
        let server = TestRedis::start();
        let redis = redis_config(&server.url()).compile().unwrap();
        let _connector = ConnectorRuntime::start(&redis);
        worker_runtime().block_on(async {
            wait_connected(&redis).await;
            let sha: String = redis
                .commands()
                .custom(
                    CustomCommand::new_static("SCRIPT", ClusterHash::Random, false),
                    vec![
                        Value::from_static_str("LOAD"),
                        Value::from_static_str(GCRA_LUA),
                    ],
                )
                .await
                .unwrap();
            assert_eq!(sha, GCRA_SHA);
        });
    }

    #[test]
    fn redis_backend_limits_like_the_local_one_and_sets_an_expiry() {
        let server = TestRedis::start();
        let redis = redis_config(&server.url()).compile().unwrap();
        let _connector = ConnectorRuntime::start(&redis);
        let l = redis_limiter(&redis, cfg(1.0, 3));
        worker_runtime().block_on(async {
            wait_connected(&redis).await;
            for remaining in [2, 1, 0] {
                let d = l.check("10.0.0.1").await;
                assert!(d.allowed && !d.degraded, "{d:?}");
                assert_eq!(d.remaining, remaining);
            }
            let d = l.check("10.0.0.1").await;
            assert!(!d.allowed && !d.degraded, "{d:?}");
            let retry = d.retry_after.unwrap();
            assert!(retry > ms(900) && retry <= ms(1000), "{retry:?}");
            assert!(
                d.reset_after > ms(2900) && d.reset_after <= ms(3000),
                "{d:?}"
            );
            assert!(l.check("10.0.0.2").await.allowed, "another key");
            use fred::prelude::KeysInterface;
            let ttl: i64 = redis.commands().pttl("bw:rl:svc:10.0.0.1").await.unwrap();
            assert!((2900..=3000).contains(&ttl), "pttl {ttl}");
            // One script call per request: EVAL only for the very first, then EVALSHA.
            let stats: String = redis
                .commands()
                .custom(
                    CustomCommand::new_static("INFO", ClusterHash::Random, false),
                    vec![Value::from_static_str("commandstats")],
                )
                .await
                .unwrap();
            let calls = |cmd: &str| -> u64 {
                stats
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("cmdstat_{cmd}:calls=")))
                    .and_then(|rest| rest.split(',').next())
                    .map_or(0, |n| n.parse().unwrap())
            };
            assert_eq!(calls("eval"), 1, "{stats}");
            assert_eq!(calls("evalsha"), 5, "{stats}");
        });
    }

    #[test]
    fn two_gateways_sharing_redis_enforce_one_limit() {
        let server = TestRedis::start();
        // Two limiters with their own pools and connectors: two gateway processes.
        let (r1, r2) = (
            redis_config(&server.url()).compile().unwrap(),
            redis_config(&server.url()).compile().unwrap(),
        );
        let (_c1, _c2) = (ConnectorRuntime::start(&r1), ConnectorRuntime::start(&r2));
        let (l1, l2) = (
            redis_limiter(&r1, cfg(1.0, 10)),
            redis_limiter(&r2, cfg(1.0, 10)),
        );
        worker_runtime().block_on(async {
            wait_connected(&r1).await;
            wait_connected(&r2).await;
            let start = Instant::now();
            let mut allowed = 0;
            for i in 0..30 {
                let l = if i % 2 == 0 { &l1 } else { &l2 };
                if l.check("shared").await.allowed {
                    allowed += 1;
                }
            }
            let extra = start.elapsed().as_secs();
            assert!((10..=10 + extra).contains(&allowed), "{allowed} allowed");
        });
    }

    #[test]
    fn redis_down_fails_open_or_closed_quickly_and_limiting_resumes_after_restart() {
        let mut server = TestRedis::start();
        let redis = redis_config(&server.url()).compile().unwrap();
        let _connector = ConnectorRuntime::start(&redis);
        let open = redis_limiter(&redis, cfg(1.0, 2));
        let closed = redis_limiter(
            &redis,
            RateLimitConfig {
                failure_mode: FailureMode::Closed,
                ..cfg(1.0, 2)
            },
        );
        let rt = worker_runtime();
        rt.block_on(async {
            wait_connected(&redis).await;
            assert!(open.check("a").await.allowed);
            assert!(open.check("a").await.allowed);
            assert!(!open.check("a").await.allowed);
        });
        server.kill();
        let limit = redis.command_timeout() + ms(100);
        rt.block_on(async {
            for _ in 0..10 {
                let start = Instant::now();
                let d = open.check("a").await;
                assert!(d.allowed && d.degraded, "fail open: {d:?}");
                assert!(start.elapsed() < limit, "{:?}", start.elapsed());
                let start = Instant::now();
                let d = closed.check("a").await;
                assert!(!d.allowed && d.degraded, "fail closed: {d:?}");
                assert_eq!(d.retry_after, Some(DEGRADED_RETRY_AFTER));
                assert!(start.elapsed() < limit, "{:?}", start.elapsed());
            }
        });
        // Same port, empty Redis (no keys, no scripts): the same limiters recover by themselves.
        server.restart();
        rt.block_on(async {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let d = open.check("b").await;
                if !d.degraded {
                    assert!(d.allowed);
                    break;
                }
                assert!(Instant::now() < deadline, "limiting did not resume");
                tokio::time::sleep(ms(50)).await;
            }
            assert!(open.check("b").await.allowed);
            let d = open.check("b").await;
            assert!(!d.allowed && !d.degraded, "{d:?}");
            let d = closed.check("c").await;
            assert!(d.allowed && !d.degraded, "{d:?}");
        });
    }

    /// A three-node Redis Cluster (no replicas) on free loopback ports, killed on drop.
    struct TestCluster {
        ports: Vec<u16>,
        children: Vec<std::process::Child>,
        _dir: tempfile::TempDir,
    }

    impl TestCluster {
        fn start() -> TestCluster {
            use std::net::TcpListener;
            use std::process::{Command, Stdio};
            // A node also listens on port + 10000 (the cluster bus), which must be free too.
            let mut held = Vec::new();
            while held.len() < 3 {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                let port = l.local_addr().unwrap().port();
                if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
                    held.push(l);
                }
            }
            let ports: Vec<u16> = held
                .iter()
                .map(|l| l.local_addr().unwrap().port())
                .collect();
            drop(held);
            let dir = tempfile::tempdir().unwrap();
            let mut cluster = TestCluster {
                ports: ports.clone(),
                children: Vec::new(),
                _dir: dir,
            };
            for port in &ports {
                let node_dir = cluster._dir.path().join(port.to_string());
                std::fs::create_dir(&node_dir).unwrap();
                let child = Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args([
                        "--cluster-enabled",
                        "yes",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                    ])
                    .current_dir(&node_dir)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn redis-server");
                cluster.children.push(child);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while !ports
                .iter()
                .all(|p| std::net::TcpStream::connect(("127.0.0.1", *p)).is_ok())
            {
                assert!(Instant::now() < deadline, "cluster nodes did not start");
                thread::sleep(ms(20));
            }
            let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            let out = Command::new("redis-cli")
                .args(["--cluster", "create"])
                .args(&nodes)
                .arg("--cluster-yes")
                .output()
                .expect("run redis-cli --cluster create");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            cluster
        }
    }

    impl Drop for TestCluster {
        fn drop(&mut self) {
            for c in &mut self.children {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    #[test]
    fn a_redis_cluster_url_in_either_spelling_limits_keys_on_every_node() {
        let cluster = TestCluster::start();
        let rt = worker_runtime();
        for (i, url) in [
            format!("redis+cluster://127.0.0.1:{}", cluster.ports[0]),
            format!("redis-cluster://127.0.0.1:{}", cluster.ports[1]),
        ]
        .iter()
        .enumerate()
        {
            let redis = redis_config(url).compile().unwrap();
            let _connector = ConnectorRuntime::start(&redis);
            let l = redis_limiter(&redis, cfg(1.0, 2));
            rt.block_on(async {
                wait_connected(&redis).await;
                // 50 keys land on all three nodes (16384 slots split in three).
                for k in 0..50 {
                    let key = format!("{i}-{k}");
                    let (a, b, c) = (
                        l.check(&key).await,
                        l.check(&key).await,
                        l.check(&key).await,
                    );
                    assert!(
                        a.allowed && b.allowed && !a.degraded && !b.degraded,
                        "{url}: {a:?} {b:?}"
                    );
                    assert!(!c.allowed && !c.degraded, "{url}: {c:?}");
                }
            });
        }
    }

    #[test]
    fn buckets_carried_to_a_new_limiter_keep_their_counts() {
        let c = cfg(1.0, 3);
        let (old, _clock) = local(&c);
        for _ in 0..3 {
            assert!(check(&old, "ip:10.0.0.1").allowed);
        }
        assert!(!check(&old, "ip:10.0.0.1").allowed);
        assert!(check(&old, "ip:10.0.0.2").allowed);
        let carried = old.carry_buckets();
        assert_eq!(carried.len(), 2);

        let (new, clock) = local(&c);
        new.resume_buckets(&carried);
        assert!(
            !check(&new, "ip:10.0.0.1").allowed,
            "an empty bucket stays empty"
        );
        assert!(check(&new, "ip:10.0.0.2").allowed);
        assert!(check(&new, "ip:10.0.0.2").allowed);
        assert!(
            !check(&new, "ip:10.0.0.2").allowed,
            "two of three were left"
        );
        clock.advance(ms(1000));
        assert!(
            check(&new, "ip:10.0.0.1").allowed,
            "and it refills at the same rate"
        );
    }
}
