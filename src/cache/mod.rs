//! The response cache: which requests may be answered from a stored response, which upstream
//! responses are stored and for how long, request coalescing, and the two backends (in-process
//! memory by default, Redis when several gateways share it).
//!
//! The top-level `cache:` section compiles into the one [`ResponseCache`] per process (the
//! backend, the coalescer and the global settings); a service's `cache:` section compiles into
//! a [`ServiceCachePolicy`], which start-up turns into its [`ServiceCache`] with its metric
//! handles. Both sections are declared in [`config`](CacheConfig). Per request the
//! proxy calls [`ServiceCache::lookup`] in `request_filter`, and for a forwarded request keeps
//! the returned [`CacheState`] in its context: `start_fill` on the upstream response header,
//! `push_body` on each body chunk, `take_stale` when the upstream fails. Dropping the state
//! ends its part in coalescing, however the request ended.
//!
//! Freshness: an entry is fresh for its ttl (the service's `ttl`, lowered by the response's
//! `s-maxage`/`max-age`), then usable only on upstream error until `ttl + stale_if_error`,
//! which is also how long the backend keeps it.

mod backend;
mod coalesce;
mod config;
mod entry;
mod key;
mod memory;
mod redis_store;

pub use backend::{CacheBackend, CacheError};
pub use config::{BackendKind, CacheConfig, ServiceCacheConfig};
pub use entry::{CachedResponse, Freshness};
pub use key::CacheKey;
pub use memory::MemoryBackend;
pub use redis_store::RedisBackend;

use crate::clock::{millis, Clock};
use crate::redis::Redis;
use crate::routing::request_host;
use backend::metrics;
use bytes::{Bytes, BytesMut};
use coalesce::{Coalescer, FlightGuard, FlightState, Join};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use prometheus::IntCounter;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The response header saying how the cache answered: HIT, MISS, STALE or BYPASS.
pub const X_CACHE: &str = "x-cache";

/// Statuses whose responses may be stored (RFC 9110's heuristically cacheable set).
const STORABLE_STATUSES: [u16; 10] = [200, 203, 204, 300, 301, 404, 405, 410, 414, 501];

/// Wall-clock milliseconds since the Unix epoch: entry times must mean the same in every
/// gateway sharing a Redis, which a per-process monotonic clock would not. A clock stepping
/// back only makes entries look younger for a moment (ages saturate at zero).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, millis)
    }
}

/// The process-wide cache: backend, coalescer and global settings.
pub struct ResponseCache {
    backend: Arc<dyn CacheBackend>,
    coalescer: Arc<Coalescer>,
    clock: Arc<dyn Clock>,
    max_body_size: usize,
    lock_timeout: Duration,
}

impl CacheConfig {
    /// Compiles the process-wide cache: its backend, empty. `redis` is the shared connection
    /// from the top-level `redis:` section; it is required (and only used) when
    /// `backend: redis`.
    pub fn compile(&self, redis: Option<&Redis>) -> Result<Arc<ResponseCache>, String> {
        let backend: Arc<dyn CacheBackend> = match (self.backend, redis) {
            (BackendKind::Memory, _) => Arc::new(MemoryBackend::new(self.max_memory.as_u64())),
            (BackendKind::Redis, Some(redis)) => Arc::new(RedisBackend::new(redis.pool().clone())),
            (BackendKind::Redis, None) => {
                return Err(
                    "cache.backend is redis but no top-level `redis:` connection is configured"
                        .into(),
                )
            }
        };
        Ok(ResponseCache::with_backend(
            self,
            backend,
            Arc::new(SystemClock),
        ))
    }
}

impl ResponseCache {
    /// With a given backend and clock (tests, or a backend built elsewhere).
    pub fn with_backend(
        cfg: &CacheConfig,
        backend: Arc<dyn CacheBackend>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        Arc::new(ResponseCache {
            backend,
            coalescer: Arc::new(Coalescer::default()),
            clock,
            max_body_size: cfg.max_body_size.as_usize(),
            lock_timeout: cfg.lock_timeout,
        })
    }

    /// Removes every entry whose request path starts with `prefix` (a plain string prefix:
    /// `/users/1` also covers `/users/10`), in `service` only when given. Returns how many.
    pub async fn purge(&self, prefix: &str, service: Option<&str>) -> Result<u64, CacheError> {
        if !prefix.starts_with('/') {
            return Err(CacheError::InvalidPurge(format!(
                "prefix {prefix:?} must start with '/'"
            )));
        }
        self.backend.purge(prefix, service).await
    }

    /// Brings `breakwater_cache_bytes` up to date; called when metrics are scraped.
    pub fn refresh_metrics(&self) {
        if let Some(bytes) = self.backend.bytes() {
            metrics()
                .bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    fn now(&self) -> u64 {
        self.clock.now_millis()
    }
}

/// A service's cache policy, built when the config loads.
#[derive(Clone)]
pub struct ServiceCache {
    inner: Arc<ServiceInner>,
}

struct ServiceInner {
    service: Arc<str>,
    ttl_ms: u64,
    stale_ms: u64,
    per_user: bool,
    cache: Arc<ResponseCache>,
    hit: IntCounter,
    miss: IntCounter,
    stale: IntCounter,
    bypass: IntCounter,
}

/// What `lookup` decided.
pub enum Lookup {
    /// Answer with this; the upstream is not contacted.
    Hit(Served),
    /// Forward the request; keep the state for the response phases.
    Forward(CacheState),
}

/// A response to write from the cache, `X-Cache` and `Age` set. The proxy adds its own
/// per-request headers (`X-Request-Id`).
pub struct Served {
    /// Boxed, as `Session::write_response_header` takes it.
    pub header: Box<ResponseHeader>,
    /// Empty for HEAD (the header still carries the GET's `Content-Length`).
    pub body: Bytes,
}

impl ServiceCacheConfig {
    /// Compiles a service's cache policy. `has_auth`: the service's routes authenticate
    /// requests, which makes `vary_by_user` default to true.
    pub fn compile(&self, has_auth: bool) -> ServiceCachePolicy {
        ServiceCachePolicy {
            ttl_ms: millis(self.ttl),
            stale_ms: millis(self.stale_if_error),
            per_user: self.vary_by_user.unwrap_or(has_auth),
        }
    }
}

/// A service's compiled cache policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCachePolicy {
    ttl_ms: u64,
    stale_ms: u64,
    per_user: bool,
}

impl ServiceCache {
    /// The policy of `service` on the shared cache, with its metric handles.
    pub fn new(
        service: &str,
        policy: ServiceCachePolicy,
        cache: Arc<ResponseCache>,
    ) -> ServiceCache {
        let counter = |result: &str| metrics().requests.with_label_values(&[service, result]);
        ServiceCache {
            inner: Arc::new(ServiceInner {
                service: Arc::from(service),
                ttl_ms: policy.ttl_ms,
                stale_ms: policy.stale_ms,
                per_user: policy.per_user,
                cache,
                hit: counter("hit"),
                miss: counter("miss"),
                stale: counter("stale"),
                bypass: counter("bypass"),
            }),
        }
    }

    /// `request_filter`: answers from the cache, or says to forward. `user` is the
    /// authenticated identity (JWT subject) when the route has one. A miss for a key another
    /// request is already filling waits here (at most `lock_timeout`) and comes back as a
    /// `Hit` when that request stored its response.
    pub async fn lookup(&self, req: &RequestHeader, user: Option<&str>) -> Lookup {
        let s = &self.inner;
        let head = if req.method == Method::GET {
            false
        } else if req.method == Method::HEAD {
            true
        } else {
            return Lookup::Forward(CacheState(Inner::Pass));
        };
        let user = user.filter(|_| s.per_user);
        // An authenticated request must never be answered with, or fill, an entry another
        // user could read.
        let unshareable = req.headers.contains_key(header::AUTHORIZATION) && user.is_none();
        if unshareable || request_bypasses(&req.headers) {
            s.bypass.inc();
            return Lookup::Forward(CacheState(Inner::Bypass));
        }
        let host = request_host(req).unwrap_or_default();
        let key = CacheKey::new(&s.service, host, req.uri.path(), req.uri.query(), user);
        let mut miss = Box::new(MissState {
            svc: Arc::clone(&self.inner),
            key,
            head,
            per_user_key: user.is_some(),
            stale: None,
            guard: None,
            fill: None,
            outcome: Some(Outcome::Miss),
        });
        let cache = &s.cache;
        match cache.backend.get(&miss.key).await {
            Err(e) => {
                // A broken backend costs no waiting: straight upstream.
                crate::redis::record_error("cache_get", &e);
                return Lookup::Forward(CacheState(Inner::Miss(miss)));
            }
            Ok(Some(entry)) if entry.vary_matches(&req.headers) => {
                let now = cache.now();
                match entry.freshness(now) {
                    Freshness::Fresh => {
                        if let Some(served) = serve(&entry, head, "HIT", now) {
                            miss.outcome = Some(Outcome::Hit);
                            return Lookup::Hit(served);
                        }
                    }
                    Freshness::Stale => miss.stale = Some(Arc::new(entry)),
                    Freshness::Expired => {}
                }
            }
            Ok(_) => {}
        }

        // HEAD never leads: its upstream response has no body to store.
        let rx = if head {
            cache.coalescer.follow(miss.key.as_str())
        } else {
            match cache.coalescer.join(miss.key.as_str()) {
                Join::Lead(guard) => {
                    miss.guard = Some(guard);
                    None
                }
                Join::Follow(rx) => Some(rx),
            }
        };
        let Some(mut rx) = rx else {
            return Lookup::Forward(CacheState(Inner::Miss(miss)));
        };
        let outcome = tokio::time::timeout(cache.lock_timeout, coalesce::wait(&mut rx))
            .await
            .unwrap_or(FlightState::NotStored);
        let now = cache.now();
        let served = match outcome {
            FlightState::Stored(entry) if entry.vary_matches(&req.headers) => {
                serve(&entry, head, "HIT", now).map(|r| (r, Outcome::Hit))
            }
            FlightState::UpstreamFailed => miss
                .stale
                .as_ref()
                .filter(|e| e.freshness(now) != Freshness::Expired)
                .and_then(|e| serve(e, head, "STALE", now))
                .map(|r| (r, Outcome::Stale)),
            _ => None,
        };
        match served {
            Some((served, outcome)) => {
                miss.outcome = Some(outcome);
                Lookup::Hit(served)
            }
            // The leader stored nothing usable for us: go upstream ourselves, in parallel.
            None => Lookup::Forward(CacheState(Inner::Miss(miss))),
        }
    }
}

/// Per-request cache state, kept in the proxy's context from `lookup` to the end of the
/// request. Dropping it releases coalescing followers and counts the request's result.
pub struct CacheState(Inner);

enum Inner {
    /// Not a cacheable method: the cache stays out of it entirely (no `X-Cache`).
    Pass,
    Bypass,
    Miss(Box<MissState>),
}

struct MissState {
    svc: Arc<ServiceInner>,
    key: CacheKey,
    head: bool,
    per_user_key: bool,
    /// A copy past its ttl but within stale_if_error, for `take_stale`.
    stale: Option<Arc<CachedResponse>>,
    /// Present while this request leads the fill of its key.
    guard: Option<FlightGuard>,
    fill: Option<Fill>,
    /// The result counted when the request ends.
    outcome: Option<Outcome>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Hit,
    Miss,
    Stale,
}

/// A response being buffered for storage.
struct Fill {
    status: u16,
    headers: Vec<(HeaderName, HeaderValue)>,
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
    ttl_ms: u64,
    chunks: Vec<Bytes>,
    len: usize,
}

impl Drop for MissState {
    fn drop(&mut self) {
        let svc = &self.svc;
        match self.outcome.take() {
            Some(Outcome::Hit) => svc.hit.inc(),
            Some(Outcome::Miss) => svc.miss.inc(),
            Some(Outcome::Stale) => svc.stale.inc(),
            None => {}
        }
    }
}

impl CacheState {
    /// The `X-Cache` value this request's response gets (None: not cacheable).
    pub fn x_cache(&self) -> Option<&'static str> {
        match &self.0 {
            Inner::Pass => None,
            Inner::Bypass => Some("BYPASS"),
            Inner::Miss(m) if m.outcome == Some(Outcome::Stale) => Some("STALE"),
            Inner::Miss(_) => Some("MISS"),
        }
    }

    /// Upstream response header (`upstream_response_filter`, before per-request headers are
    /// added): tags `X-Cache` and decides whether the response will be stored. `req` is the
    /// client's request (`session.req_header()`), for the `Vary` values. Call once per
    /// response; later calls (retries' responses) restart the decision.
    pub fn start_fill(&mut self, req: &RequestHeader, resp: &mut ResponseHeader) {
        let m = match &mut self.0 {
            Inner::Pass => return,
            Inner::Bypass => {
                let _ = resp.insert_header(X_CACHE, "BYPASS");
                return;
            }
            Inner::Miss(m) => m,
        };
        if resp.status.is_informational() {
            return;
        }
        let _ = resp.insert_header(X_CACHE, "MISS");
        m.fill = None;
        let svc = &m.svc;
        let decision = (!m.head)
            .then(|| {
                storable_ttl(
                    resp.status.as_u16(),
                    &resp.headers,
                    m.per_user_key,
                    svc.ttl_ms,
                )
            })
            .flatten()
            .and_then(|ttl| Some((ttl, vary_values(&resp.headers, &req.headers)?)))
            .filter(|_| {
                content_length(&resp.headers).is_none_or(|n| n <= svc.cache.max_body_size as u64)
            });
        let Some((ttl_ms, vary)) = decision else {
            if let Some(guard) = m.guard.take() {
                guard.publish(FlightState::NotStored);
            }
            return;
        };
        m.fill = Some(Fill {
            status: resp.status.as_u16(),
            headers: stored_headers(&resp.headers),
            vary,
            ttl_ms,
            chunks: Vec::new(),
            len: 0,
        });
        let bodyless =
            matches!(resp.status.as_u16(), 204 | 304) || content_length(&resp.headers) == Some(0);
        if bodyless {
            m.complete();
        }
    }

    /// Each response body chunk (`response_body_filter`). The body is buffered only while it
    /// stays within `max_body_size`; beyond it the fill is dropped and the body streams on
    /// untouched. At the end of the stream the entry is written in the background and
    /// followers are answered.
    pub fn push_body(&mut self, chunk: Option<&Bytes>, end_of_stream: bool) {
        let Inner::Miss(m) = &mut self.0 else {
            return;
        };
        let Some(fill) = m.fill.as_mut() else {
            return;
        };
        if let Some(chunk) = chunk.filter(|c| !c.is_empty()) {
            if fill.len + chunk.len() > m.svc.cache.max_body_size {
                m.fill = None;
                if let Some(guard) = m.guard.take() {
                    guard.publish(FlightState::NotStored);
                }
                return;
            }
            fill.len += chunk.len();
            fill.chunks.push(chunk.clone());
        }
        if end_of_stream {
            m.complete();
        }
    }

    /// The upstream failed (error, timeout, or no upstream admits the request): the stale
    /// copy, if one is within `stale_if_error`, tagged `X-Cache: STALE`. Followers of this
    /// request that hold a stale copy serve theirs at once.
    pub fn take_stale(&mut self) -> Option<Served> {
        let Inner::Miss(m) = &mut self.0 else {
            return None;
        };
        m.fill = None;
        if let Some(guard) = m.guard.take() {
            guard.publish(FlightState::UpstreamFailed);
        }
        let now = m.svc.cache.now();
        let entry = m.stale.take()?;
        if entry.freshness(now) == Freshness::Expired {
            return None;
        }
        let served = serve(&entry, m.head, "STALE", now)?;
        m.outcome = Some(Outcome::Stale);
        Some(served)
    }
}

impl MissState {
    /// The whole body arrived: publish to followers and store in the background.
    fn complete(&mut self) {
        let Some(fill) = self.fill.take() else {
            return;
        };
        let body = match fill.chunks.len() {
            0 => Bytes::new(),
            1 => fill.chunks[0].clone(),
            _ => {
                let mut b = BytesMut::with_capacity(fill.len);
                for c in &fill.chunks {
                    b.extend_from_slice(c);
                }
                b.freeze()
            }
        };
        let cache = Arc::clone(&self.svc.cache);
        let entry = Arc::new(CachedResponse {
            status: fill.status,
            headers: fill.headers,
            body,
            stored_at_ms: cache.now(),
            ttl_ms: fill.ttl_ms,
            stale_ms: self.svc.stale_ms,
            vary: fill.vary,
        });
        let keep_for = Duration::from_millis(entry.ttl_ms.saturating_add(entry.stale_ms));
        let guard = self.guard.take();
        if let Some(g) = &guard {
            g.publish(FlightState::Stored(Arc::clone(&entry)));
        }
        let key = self.key.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            log::warn!("cache: no async runtime to store {}", key.as_str());
            return;
        };
        rt.spawn(async move {
            let entry = Arc::try_unwrap(entry).unwrap_or_else(|shared| (*shared).clone());
            if let Err(e) = cache.backend.put(&key, entry, keep_for).await {
                crate::redis::record_error("cache_put", &e);
            }
            // Until here, late arrivals for the key were answered from the published entry.
            drop(guard);
        });
    }
}

/// The client asked not to be served from (or to fill) the cache.
fn request_bypasses(headers: &HeaderMap) -> bool {
    let mut has_cache_control = false;
    for v in headers.get_all(header::CACHE_CONTROL) {
        has_cache_control = true;
        if directives(v).any(|(name, _)| name == "no-cache" || name == "no-store") {
            return true;
        }
    }
    // HTTP/1.0 clients say it with Pragma; Cache-Control wins when both are present.
    !has_cache_control
        && headers
            .get_all(header::PRAGMA)
            .iter()
            .any(|v| directives(v).any(|(name, _)| name == "no-cache"))
}

/// How long (ms) a response may be served fresh, or `None` when it must not be stored.
/// `per_user_key`: the key includes the user, so `private` responses are storable.
fn storable_ttl(status: u16, headers: &HeaderMap, per_user_key: bool, ttl_ms: u64) -> Option<u64> {
    if !STORABLE_STATUSES.contains(&status)
        || headers.contains_key(header::SET_COOKIE)
        || is_event_stream(headers)
    {
        return None;
    }
    let mut max_age = None;
    let mut s_maxage = None;
    for v in headers.get_all(header::CACHE_CONTROL) {
        for (name, arg) in directives(v) {
            match name.as_str() {
                "no-store" | "no-cache" => return None,
                "private" if !per_user_key => return None,
                // An unreadable age means "stale now", per RFC 9111 4.2.1.
                "max-age" => max_age = Some(arg.and_then(|a| a.parse().ok()).unwrap_or(0u64)),
                "s-maxage" => s_maxage = Some(arg.and_then(|a| a.parse().ok()).unwrap_or(0u64)),
                _ => {}
            }
        }
    }
    let ttl = match s_maxage.or(max_age) {
        Some(secs) => ttl_ms.min(secs.saturating_mul(1000)),
        None => ttl_ms,
    };
    (ttl > 0).then_some(ttl)
}

/// A Server-Sent Events stream: live, never finished in the usual sense, and different for
/// each subscriber, so never stored whatever its `Cache-Control` says. Any `Content-Type`
/// line naming it counts (parameters, case and spaces aside).
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_TYPE).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b';')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"text/event-stream"))
    })
}

/// The request's values for the headers the response varies on; `None` for `Vary: *` or an
/// unreadable `Vary` (not storable).
#[allow(clippy::type_complexity)]
fn vary_values(
    resp: &HeaderMap,
    req: &HeaderMap,
) -> Option<Vec<(HeaderName, Option<HeaderValue>)>> {
    let mut out: Vec<(HeaderName, Option<HeaderValue>)> = Vec::new();
    for v in resp.get_all(header::VARY) {
        let text = v.to_str().ok()?;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            let name = HeaderName::from_bytes(name.as_bytes()).ok()?;
            if !out.iter().any(|(n, _)| *n == name) {
                let value = entry::joined_values(req, &name);
                out.push((name, value));
            }
        }
    }
    Some(out)
}

/// The response headers worth replaying: not hop-by-hop, not recomputed on serving
/// (`Content-Length`, `Age`, `X-Cache`), not about one request (`X-Request-Id`, rate-limit
/// counters).
fn stored_headers(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            !matches!(
                n,
                "connection"
                    | "keep-alive"
                    | "proxy-connection"
                    | "transfer-encoding"
                    | "te"
                    | "trailer"
                    | "upgrade"
                    | "content-length"
                    | "age"
                    | X_CACHE
                    | "x-request-id"
            ) && !n.starts_with("x-ratelimit-")
                && !n.starts_with("ratelimit")
        })
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The response for a stored entry.
fn serve(entry: &CachedResponse, head: bool, x_cache: &'static str, now_ms: u64) -> Option<Served> {
    let mut header = ResponseHeader::build(entry.status, Some(entry.headers.len() + 3)).ok()?;
    for (name, value) in &entry.headers {
        header.append_header(name.clone(), value.clone()).ok()?;
    }
    if !matches!(entry.status, 204 | 304) {
        header
            .insert_header(header::CONTENT_LENGTH, entry.body.len())
            .ok()?;
    }
    header.insert_header(X_CACHE, x_cache).ok()?;
    header
        .insert_header(header::AGE, entry.age_secs(now_ms))
        .ok()?;
    Some(Served {
        header: Box::new(header),
        body: if head {
            Bytes::new()
        } else {
            entry.body.clone()
        },
    })
}

/// `Cache-Control`-style directives of one header value: lower-case names, unquoted args.
fn directives(v: &HeaderValue) -> impl Iterator<Item = (String, Option<&str>)> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| match d.split_once('=') {
            Some((name, arg)) => (
                name.trim().to_ascii_lowercase(),
                Some(arg.trim().trim_matches('"')),
            ),
            None => (d.to_ascii_lowercase(), None),
        })
}

#[cfg(test)]
mod tests;
