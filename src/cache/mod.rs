//! The response cache: which requests may be answered from a stored response, which upstream
//! responses are stored and for how long, conditional requests and ranges answered from a
//! stored copy, revalidation and refresh of stale copies, request coalescing, and the two
//! backends (in-process memory by default, Redis when several gateways share it).
//!
//! The top-level `cache:` section compiles into the one [`ResponseCache`] per process (the
//! backend, the coalescer and the global settings); a service's `cache:` section compiles into
//! a [`ServiceCachePolicy`], which start-up turns into its [`ServiceCache`] with its metric
//! handles. Both sections are declared in [`config`](CacheConfig). Per request the
//! proxy calls [`ServiceCache::lookup`] in `request_filter`, and for a forwarded request keeps
//! the returned [`CacheState`] in its context: `prepare_upstream_request` on the upstream
//! request, `start_fill` on the upstream response header, `push_body` on each body chunk,
//! `take_stale` when the upstream fails. Dropping the state ends its part in coalescing,
//! however the request ended.
//!
//! A stored response is fresh for its ttl (the service's `ttl`, lowered by the response's
//! `s-maxage`, `max-age` or `Expires`). Once stale it is, in this order: served at once while
//! one background request refreshes it (within stale-while-revalidate); revalidated with a
//! conditional request when it has a validator (a `304` refreshes it without the body); or
//! fetched again; and served when the upstream fails (within stale-if-error).
//!
//! Refreshes and revalidations run as Pingora subrequests through the gateway's own
//! pipeline (`Refresh` is the ticket the proxy hands to one): they are admitted by the
//! upstream's breaker, bounded by the service's timeouts and retries, and counted like any
//! request, so the cache never talks to an upstream behind the resilience layer's back. The
//! request that needs the refreshed copy waits for that subrequest as a coalescing follower.
//!
//! Why not pingora-cache: adopting it would move the lookup after `request_filter` (where
//! admission and the breaker's stale-on-open answer live), key entries by hash (so purge by
//! path prefix needs an index of its own in both backends), and leave the bounded memory and
//! the Redis backends to be written against an API Pingora marks experimental. See
//! `docs/architecture.md`.

mod backend;
mod coalesce;
mod config;
mod entry;
mod key;
mod memory;
mod policy;
mod redis_store;
mod respond;

pub use backend::{CacheBackend, CacheError};
pub use config::{BackendKind, CacheConfig, ServiceCacheConfig};
pub use entry::{CachedResponse, Stored, VaryIndex};
pub use key::{CacheKey, KeyParts, PurgeFilter};
pub use memory::{MemoryBackend, ENTRY_OVERHEAD};
pub use redis_store::RedisBackend;
pub use respond::Served;

use crate::clock::{millis, Clock};
use crate::edge::compression;
use crate::redis::Redis;
use crate::routing::request_host;
use backend::metrics;
use bytes::Bytes;
use coalesce::{Coalescer, Filled, FlightGuard, FlightState, Join};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use policy::Defaults;
use prometheus::IntCounter;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The response header saying how the cache answered: HIT, MISS, STALE, REVALIDATED or
/// BYPASS.
pub const X_CACHE: &str = "x-cache";

/// Background (stale-while-revalidate) refreshes running at once in the process, at most.
/// A stale copy whose refresh finds the bound reached is still served; a later request
/// refreshes it.
pub const MAX_BACKGROUND_REFRESHES: usize = 64;

/// Request headers a refresh never forwards from the request that triggered it: the
/// refresh asks for the whole current response (and its own validators).
const CLIENT_PRECONDITIONS: [HeaderName; 6] = [
    header::RANGE,
    header::IF_RANGE,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_MATCH,
    header::IF_UNMODIFIED_SINCE,
];

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
    max_variants: usize,
    background: Arc<Semaphore>,
}

impl CacheConfig {
    /// Compiles the process-wide cache: its backend, empty. `redis` is the shared connection
    /// from the top-level `redis:` section; it is required (and only used) when
    /// `backend: redis`.
    pub fn compile(&self, redis: Option<&Redis>) -> Result<Arc<ResponseCache>, String> {
        if self.max_variants == 0 {
            return Err("cache.max_variants must be at least 1".into());
        }
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

/// What a lookup found for a request: the key its entry lives (or would live) under, and
/// the entry if one matches the request.
struct Found {
    key: CacheKey,
    entry: Option<CachedResponse>,
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
            max_variants: cfg.max_variants.max(1),
            background: Arc::new(Semaphore::new(MAX_BACKGROUND_REFRESHES)),
        })
    }

    /// Removes every entry whose request path starts with `prefix` (a plain string prefix:
    /// `/users/1` also covers `/users/10`), in `service` only when given, every variant
    /// included. Returns how many keys.
    pub async fn purge(&self, prefix: &str, service: Option<&str>) -> Result<u64, CacheError> {
        if !prefix.starts_with('/') {
            return Err(CacheError::InvalidPurge(format!(
                "prefix {prefix:?} must start with '/'"
            )));
        }
        self.backend.purge(&PurgeFilter::new(prefix, service)).await
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

    fn system_now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(self.now())
    }

    /// The entry a request selects: at its primary key, or, when the primary key holds the
    /// variant index of a response that varies, at the variant key its headers select.
    async fn find(&self, primary: &CacheKey, request: &HeaderMap) -> Result<Found, CacheError> {
        let decoded = match self.backend.get(primary).await? {
            None => None,
            Some(bytes) => decode(primary, bytes),
        };
        let (key, entry) = match decoded {
            Some(Stored::Variants(index)) => {
                let key = primary.variant(&index.names, request);
                let entry = match self.backend.get(&key).await? {
                    Some(bytes) => match decode(&key, bytes) {
                        Some(Stored::Response(e)) => Some(e),
                        _ => None,
                    },
                    None => None,
                };
                (key, entry)
            }
            Some(Stored::Response(e)) => (primary.clone(), Some(e)),
            None => (primary.clone(), None),
        };
        Ok(Found {
            key,
            entry: entry.filter(|e| e.vary_matches(request)),
        })
    }

    /// Stores `entry` at `primary`, or, for a response that varies, at its `variant` key with
    /// the primary key's variant index updated: at most `max_variants` per URL, the oldest
    /// dropped. Two gateways storing variants of one URL at the same moment may each miss the
    /// other's in the index; such a variant stays reachable and expires on its own.
    async fn store(
        &self,
        primary: &CacheKey,
        variant: Option<&(CacheKey, Vec<HeaderName>)>,
        encoded: Bytes,
        keep_for: Duration,
    ) -> Result<(), CacheError> {
        let Some((variant, names)) = variant else {
            return self.backend.put(primary, encoded, keep_for).await;
        };
        self.backend.put(variant, encoded, keep_for).await?;
        let previous = match self.backend.get(primary).await? {
            Some(bytes) => decode(primary, bytes),
            None => None,
        };
        let mut index = match previous {
            Some(Stored::Variants(index)) if index.names == *names => index,
            Some(Stored::Variants(other)) => {
                // The response now varies on other headers: the old variants are unreachable.
                for key in &other.variants {
                    self.backend.remove(&CacheKey::from_stored(key)).await?;
                }
                VaryIndex::default()
            }
            _ => VaryIndex::default(),
        };
        index.names = names.clone();
        index.variants.retain(|k| **k != *variant.as_str());
        index.variants.push(variant.as_str().into());
        while index.variants.len() > self.max_variants {
            let oldest = index.variants.remove(0);
            self.backend.remove(&CacheKey::from_stored(&oldest)).await?;
        }
        self.backend
            .put(primary, Stored::Variants(index).encode(), keep_for)
            .await
    }
}

/// A stored value, or `None` when it cannot be read (an older format after an upgrade, or
/// garbage): a miss, and the next fill replaces it.
fn decode(key: &CacheKey, bytes: Bytes) -> Option<Stored> {
    match Stored::decode(bytes) {
        Ok(stored) => Some(stored),
        Err(e) => {
            log::debug!(
                "cache: entry {} unreadable, treated as a miss: {e}",
                key.as_str()
            );
            None
        }
    }
}

/// A service's cache policy, built when the config loads.
#[derive(Clone)]
pub struct ServiceCache {
    inner: Arc<ServiceInner>,
}

struct ServiceInner {
    service: Arc<str>,
    defaults: Defaults,
    per_user: bool,
    ignore_cookies: bool,
    cache: Arc<ResponseCache>,
    hit: IntCounter,
    miss: IntCounter,
    stale: IntCounter,
    revalidated: IntCounter,
    bypass: IntCounter,
    not_modified: IntCounter,
    revalidation_not_modified: IntCounter,
    revalidation_modified: IntCounter,
    revalidation_error: IntCounter,
    refresh_started: IntCounter,
    refresh_skipped: IntCounter,
}

/// What `lookup` decided.
pub enum Lookup {
    /// Answer with this; the upstream is not contacted by this request.
    Hit(Served),
    /// Forward the request; keep the state for the response phases.
    Forward(CacheState),
}

/// How the cache answered a request, as `X-Cache` and `breakwater_cache_requests_total` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Hit,
    Miss,
    Stale,
    Revalidated,
}

impl Outcome {
    fn x_cache(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Stale => "STALE",
            Outcome::Revalidated => "REVALIDATED",
        }
    }
}

impl ServiceCacheConfig {
    /// Compiles a service's cache policy. `has_auth`: the service's routes authenticate
    /// requests, which makes `vary_by_user` default to true.
    pub fn compile(&self, has_auth: bool) -> ServiceCachePolicy {
        ServiceCachePolicy {
            defaults: Defaults {
                ttl_ms: millis(self.ttl),
                swr_ms: millis(self.stale_while_revalidate),
                sie_ms: millis(self.stale_if_error),
            },
            per_user: self.vary_by_user.unwrap_or(has_auth),
            ignore_cookies: self.ignore_cookies,
        }
    }
}

/// A service's compiled cache policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCachePolicy {
    defaults: Defaults,
    per_user: bool,
    ignore_cookies: bool,
}

/// The spawner the proxy gives `lookup`: runs a [`Refresh`] as a subrequest through the
/// pipeline, or hands it back when it cannot.
pub type SpawnRefresh<'a> = &'a (dyn Fn(Refresh) -> Result<(), Refresh> + Send + Sync);

impl ServiceCache {
    /// The policy of `service` on the shared cache, with its metric handles.
    pub fn new(
        service: &str,
        policy: ServiceCachePolicy,
        cache: Arc<ResponseCache>,
    ) -> ServiceCache {
        let m = metrics();
        let counter = |result: &str| m.requests.with_label_values(&[service, result]);
        let revalidation = |outcome: &str| m.revalidations.with_label_values(&[service, outcome]);
        let refresh = |result: &str| m.background_refreshes.with_label_values(&[service, result]);
        ServiceCache {
            inner: Arc::new(ServiceInner {
                service: Arc::from(service),
                defaults: policy.defaults,
                per_user: policy.per_user,
                ignore_cookies: policy.ignore_cookies,
                cache,
                hit: counter("hit"),
                miss: counter("miss"),
                stale: counter("stale"),
                revalidated: counter("revalidated"),
                bypass: counter("bypass"),
                not_modified: m.not_modified.with_label_values(&[service]),
                revalidation_not_modified: revalidation("not_modified"),
                revalidation_modified: revalidation("modified"),
                revalidation_error: revalidation("error"),
                refresh_started: refresh("started"),
                refresh_skipped: refresh("skipped"),
            }),
        }
    }

    /// `request_filter`: answers from the cache, or says to forward. `user` is the
    /// authenticated identity (JWT subject) when the route has one; `https`: the client came
    /// over TLS. A stale entry that needs refreshing is handed to `spawn` as a [`Refresh`]
    /// (in the background within stale-while-revalidate; else this request waits for it, at
    /// most `lock_timeout`). A miss for a key another request is already filling waits too,
    /// and comes back as a `Hit` when that request stored its response.
    pub async fn lookup(
        &self,
        req: &RequestHeader,
        user: Option<&str>,
        https: bool,
        spawn: SpawnRefresh<'_>,
    ) -> Lookup {
        let s = &self.inner;
        let head = if req.method == Method::GET {
            false
        } else if req.method == Method::HEAD {
            true
        } else {
            return Lookup::Forward(CacheState(Inner::Pass));
        };
        let user = user.filter(|_| s.per_user);
        // A request with credentials must never be answered with, or fill, an entry another
        // user could read; cookies count as credentials unless the service says otherwise.
        let credentials = req.headers.contains_key(header::AUTHORIZATION)
            || (!s.ignore_cookies && req.headers.contains_key(header::COOKIE));
        if (credentials && user.is_none()) || policy::request_bypasses(&req.headers) {
            s.bypass.inc();
            return Lookup::Forward(CacheState(Inner::Bypass));
        }
        let primary = CacheKey::new(KeyParts {
            service: &s.service,
            https,
            host: request_host(req).unwrap_or_default(),
            path: req.uri.path(),
            query: req.uri.query(),
            user,
        });
        let found = match s.cache.find(&primary, &req.headers).await {
            Ok(found) => found,
            Err(e) => {
                // A broken backend costs no waiting: straight upstream.
                crate::redis::record_error("cache_get", &e);
                let key = primary.clone();
                return Lookup::Forward(self.miss_state(primary, key, head, user.is_some()));
            }
        };
        let mut miss = self.miss(primary, found.key, head, user.is_some());
        if let Some(entry) = found.entry {
            let now = s.cache.now();
            if entry.is_fresh(now) {
                if let Some(served) = self.serve(&entry, req, Outcome::Hit, now) {
                    miss.outcome = None;
                    return Lookup::Hit(served);
                }
            } else {
                let entry = Arc::new(entry);
                if entry.within_swr(now) {
                    if let Some(served) = self.serve(&entry, req, Outcome::Stale, now) {
                        if !head {
                            self.refresh_in_background(&miss, &entry, spawn);
                        }
                        miss.outcome = None;
                        return Lookup::Hit(served);
                    }
                }
                if entry.within_sie(now) {
                    miss.stale = Some(Arc::clone(&entry));
                }
                // HEAD never leads: its upstream response has no body to store.
                if entry.has_validator() && !head {
                    return self.revalidate(miss, entry, req, spawn).await;
                }
            }
        }
        self.fetch(miss, req).await
    }

    fn miss(
        &self,
        primary: CacheKey,
        key: CacheKey,
        head: bool,
        per_user_key: bool,
    ) -> Box<MissState> {
        Box::new(MissState {
            svc: Arc::clone(&self.inner),
            primary,
            key,
            head,
            per_user_key,
            stale: None,
            guard: None,
            fill: None,
            outcome: Some(Outcome::Miss),
            x_cache: "MISS",
            refresh: None,
        })
    }

    fn miss_state(
        &self,
        primary: CacheKey,
        key: CacheKey,
        head: bool,
        per_user_key: bool,
    ) -> CacheState {
        CacheState(Inner::Miss(self.miss(primary, key, head, per_user_key)))
    }

    /// The answer from `entry`, counted.
    fn serve(
        &self,
        entry: &CachedResponse,
        req: &RequestHeader,
        outcome: Outcome,
        now: u64,
    ) -> Option<Served> {
        let served = respond::respond(entry, req, outcome.x_cache(), now)?;
        self.inner.count(outcome);
        if served.is_not_modified() {
            self.inner.not_modified.inc();
        }
        Some(served)
    }

    /// Starts a background refresh of a stale entry being served, unless one (or a fill of
    /// the key) is under way or the bound of background refreshes is reached.
    fn refresh_in_background(
        &self,
        miss: &MissState,
        entry: &Arc<CachedResponse>,
        spawn: SpawnRefresh<'_>,
    ) {
        let s = &self.inner;
        let Join::Lead(guard) = s.cache.coalescer.join(miss.key.as_str()) else {
            return;
        };
        let Ok(permit) = Arc::clone(&s.cache.background).try_acquire_owned() else {
            s.refresh_skipped.inc();
            return;
        };
        let ticket = miss.refresh_ticket(Arc::clone(entry), guard, Some(permit));
        match spawn(ticket) {
            Ok(()) => s.refresh_started.inc(),
            Err(_) => s.refresh_skipped.inc(),
        }
    }

    /// Revalidates a stale entry through a subrequest (or follows the one under way) and
    /// answers from what it stored.
    async fn revalidate(
        &self,
        mut miss: Box<MissState>,
        entry: Arc<CachedResponse>,
        req: &RequestHeader,
        spawn: SpawnRefresh<'_>,
    ) -> Lookup {
        let (mut rx, led) = match self.inner.cache.coalescer.join(miss.key.as_str()) {
            Join::Follow(rx) => (rx, false),
            Join::Lead(guard) => {
                let rx = guard.subscribe();
                match spawn(miss.refresh_ticket(entry, guard, None)) {
                    Ok(()) => (rx, true),
                    Err(ticket) => {
                        // No subrequest possible: fetch the whole response ourselves.
                        miss.guard = Some(ticket.guard);
                        return Lookup::Forward(CacheState(Inner::Miss(miss)));
                    }
                }
            }
        };
        let state = self.wait(&mut rx).await;
        self.after_flight(miss, req, state, led)
    }

    /// The ordinary miss: lead the fill of the key, or wait for the request filling it.
    async fn fetch(&self, mut miss: Box<MissState>, req: &RequestHeader) -> Lookup {
        let coalescer = &self.inner.cache.coalescer;
        let rx = if miss.head {
            coalescer.follow(miss.key.as_str())
        } else {
            match coalescer.join(miss.key.as_str()) {
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
        let state = self.wait(&mut rx).await;
        self.after_flight(miss, req, state, false)
    }

    async fn wait(&self, rx: &mut tokio::sync::watch::Receiver<FlightState>) -> FlightState {
        tokio::time::timeout(self.inner.cache.lock_timeout, coalesce::wait(rx))
            .await
            .unwrap_or(FlightState::NotStored)
    }

    /// Answers from a flight's outcome, or forwards when it left nothing usable. `led`: this
    /// request started the flight (a fetched response is then its MISS, not a HIT).
    fn after_flight(
        &self,
        mut miss: Box<MissState>,
        req: &RequestHeader,
        state: FlightState,
        led: bool,
    ) -> Lookup {
        let (entry, outcome) = match state {
            FlightState::Stored(entry, how) if entry.vary_matches(&req.headers) => {
                let outcome = match how {
                    Filled::Revalidated => Outcome::Revalidated,
                    Filled::Fetched if led => Outcome::Miss,
                    Filled::Fetched => Outcome::Hit,
                };
                (entry, outcome)
            }
            FlightState::UpstreamFailed => {
                let now = self.inner.cache.now();
                match miss.stale.take().filter(|e| e.within_sie(now)) {
                    Some(entry) => (entry, Outcome::Stale),
                    None => return Lookup::Forward(CacheState(Inner::Miss(miss))),
                }
            }
            // The flight stored nothing usable for us: go upstream ourselves, in parallel.
            _ => return Lookup::Forward(CacheState(Inner::Miss(miss))),
        };
        let now = self.inner.cache.now();
        match self.serve(&entry, req, outcome, now) {
            Some(served) => {
                miss.outcome = None;
                Lookup::Hit(served)
            }
            None => Lookup::Forward(CacheState(Inner::Miss(miss))),
        }
    }
}

impl ServiceInner {
    fn count(&self, outcome: Outcome) {
        match outcome {
            Outcome::Hit => self.hit.inc(),
            Outcome::Miss => self.miss.inc(),
            Outcome::Stale => self.stale.inc(),
            Outcome::Revalidated => self.revalidated.inc(),
        }
    }
}

/// A refresh of one stale entry, to run as a subrequest through the pipeline: the proxy
/// passes it to the subrequest, whose cache state ([`CacheState::from`]) revalidates the
/// entry with its validators (or fetches it whole), stores the result and tells the waiting
/// requests. Dropping it unused ends the refresh (waiters go upstream themselves).
pub struct Refresh {
    svc: Arc<ServiceInner>,
    primary: CacheKey,
    key: CacheKey,
    per_user_key: bool,
    stale: Arc<CachedResponse>,
    guard: FlightGuard,
    /// Held by background refreshes, for the bound on them.
    permit: Option<OwnedSemaphorePermit>,
}

impl From<Refresh> for CacheState {
    fn from(t: Refresh) -> CacheState {
        CacheState(Inner::Miss(Box::new(MissState {
            svc: t.svc,
            primary: t.primary,
            key: t.key,
            head: false,
            per_user_key: t.per_user_key,
            stale: None,
            guard: Some(t.guard),
            fill: None,
            // Counted as revalidations and refreshes, not as client requests.
            outcome: None,
            x_cache: "MISS",
            refresh: Some(RefreshJob {
                revalidating: t.stale.has_validator(),
                stale: t.stale,
                _permit: t.permit,
            }),
        })))
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
    primary: CacheKey,
    /// The key the entry lives under (a variant key once the response is known to vary);
    /// flights are coalesced on it.
    key: CacheKey,
    head: bool,
    per_user_key: bool,
    /// A copy past its ttl but within stale-if-error, for `take_stale`.
    stale: Option<Arc<CachedResponse>>,
    /// Present while this request leads the fill of its key.
    guard: Option<FlightGuard>,
    fill: Option<Fill>,
    /// The result counted when the request ends.
    outcome: Option<Outcome>,
    x_cache: &'static str,
    /// Set when this request is the subrequest refreshing a stale entry.
    refresh: Option<RefreshJob>,
}

struct RefreshJob {
    stale: Arc<CachedResponse>,
    /// The stale entry has a validator: the upstream request is conditional.
    revalidating: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

/// A response being buffered for storage.
struct Fill {
    status: u16,
    headers: Vec<(HeaderName, HeaderValue)>,
    vary: Vec<(HeaderName, Option<HeaderValue>)>,
    /// The variant key and the varied names, for a response with `Vary`.
    variant: Option<(CacheKey, Vec<HeaderName>)>,
    lifetime: policy::Lifetime,
    chunks: Vec<Bytes>,
    len: usize,
}

impl Drop for MissState {
    fn drop(&mut self) {
        if let Some(outcome) = self.outcome.take() {
            self.svc.count(outcome);
        }
    }
}

impl CacheState {
    /// The `X-Cache` value this request's response gets (None: not cacheable).
    pub fn x_cache(&self) -> Option<&'static str> {
        match &self.0 {
            Inner::Pass => None,
            Inner::Bypass => Some("BYPASS"),
            Inner::Miss(m) => Some(m.x_cache),
        }
    }

    /// The request to the upstream (`upstream_request_filter`). A refresh asks for the
    /// whole current response: the triggering request's ranges and preconditions are
    /// removed, and the stale entry's `ETag` / `Last-Modified` sent as `If-None-Match` /
    /// `If-Modified-Since`.
    pub fn prepare_upstream_request(&self, upstream: &mut RequestHeader) -> pingora::Result<()> {
        let Inner::Miss(m) = &self.0 else {
            return Ok(());
        };
        let Some(job) = &m.refresh else {
            return Ok(());
        };
        for name in &CLIENT_PRECONDITIONS {
            upstream.remove_header(name);
        }
        if job.revalidating {
            if let Some(etag) = job.stale.header(&header::ETAG) {
                upstream.insert_header(header::IF_NONE_MATCH, etag.clone())?;
            }
            if let Some(lm) = job.stale.header(&header::LAST_MODIFIED) {
                upstream.insert_header(header::IF_MODIFIED_SINCE, lm.clone())?;
            }
        }
        Ok(())
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
        m.fill = None;
        let status = resp.status.as_u16();
        if let Some(job) = &m.refresh {
            if job.revalidating && status == 304 {
                m.refreshed(resp);
                return;
            }
            if status >= 500 {
                // RFC 9111 4.3.3: a 5xx while validating may be treated as no answer: the
                // stale copy stays.
                let _ = resp.insert_header(X_CACHE, "MISS");
                m.refresh_failed();
                return;
            }
            if job.revalidating {
                m.svc.revalidation_modified.inc();
            }
        }
        let _ = resp.insert_header(X_CACHE, "MISS");
        m.x_cache = "MISS";
        let svc = &m.svc;
        let fits = || {
            policy::content_length(&resp.headers)
                .is_none_or(|n| n <= svc.cache.max_body_size as u64)
        };
        let decision = (!m.head)
            .then(|| {
                policy::storable(
                    status,
                    &resp.headers,
                    m.per_user_key,
                    svc.defaults,
                    svc.cache.system_now(),
                )
            })
            .flatten()
            .and_then(|lifetime| Some((lifetime, policy::vary_names(&resp.headers)?)))
            .filter(|_| fits());
        let Some((lifetime, mut names)) = decision else {
            if let Some(guard) = m.guard.take() {
                guard.publish(FlightState::NotStored);
            }
            if m.refresh.is_some() {
                // What the upstream says now cannot be stored: the stale copy is no longer
                // the resource, so it goes.
                m.discard();
            }
            return;
        };
        if policy::is_encoded(&resp.headers) && !names.contains(&header::ACCEPT_ENCODING) {
            // The upstream encoded it for this client's `Accept-Encoding`, said so or not: a
            // client that does not accept the coding must never get this copy.
            compression::vary_on_accept_encoding(resp);
            names.push(header::ACCEPT_ENCODING);
            names.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        }
        let vary = names
            .iter()
            .map(|n| (n.clone(), entry::joined_values(&req.headers, n)))
            .collect();
        let variant = (!names.is_empty()).then(|| (m.primary.variant(&names, &req.headers), names));
        m.fill = Some(Fill {
            status,
            headers: policy::stored_headers(&resp.headers),
            vary,
            variant,
            lifetime,
            chunks: Vec::new(),
            len: 0,
        });
        let bodyless =
            matches!(status, 204 | 304) || policy::content_length(&resp.headers) == Some(0);
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
    /// copy, if one is within stale-if-error, tagged `X-Cache: STALE` (a `304` if the
    /// client's validator matches it). Followers of this request that hold a stale copy serve
    /// theirs at once. A refresh that fails keeps the stale entry as it is.
    pub fn take_stale(&mut self, req: &RequestHeader) -> Option<Served> {
        let Inner::Miss(m) = &mut self.0 else {
            return None;
        };
        m.fill = None;
        if m.refresh.is_some() {
            m.refresh_failed();
            return None;
        }
        if let Some(guard) = m.guard.take() {
            guard.publish(FlightState::UpstreamFailed);
        }
        let now = m.svc.cache.now();
        let entry = m.stale.take().filter(|e| e.within_sie(now))?;
        let served = respond::respond(&entry, req, "STALE", now)?;
        if served.is_not_modified() {
            m.svc.not_modified.inc();
        }
        m.outcome = Some(Outcome::Stale);
        m.x_cache = "STALE";
        Some(served)
    }
}

impl MissState {
    fn refresh_ticket(
        &self,
        stale: Arc<CachedResponse>,
        guard: FlightGuard,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Refresh {
        Refresh {
            svc: Arc::clone(&self.svc),
            primary: self.primary.clone(),
            key: self.key.clone(),
            per_user_key: self.per_user_key,
            stale,
            guard,
            permit,
        }
    }

    /// A `304` to the refresh's conditional request: the stored headers are updated from it
    /// and the entry is fresh again, body untouched.
    fn refreshed(&mut self, resp: &mut ResponseHeader) {
        let Some(job) = &self.refresh else {
            return;
        };
        let stale = Arc::clone(&job.stale);
        let svc = Arc::clone(&self.svc);
        let _ = resp.insert_header(X_CACHE, "REVALIDATED");
        self.x_cache = "REVALIDATED";
        // RFC 9111 4.3.4: a 304 naming another entity-tag is about another representation.
        let same_tag = match (resp.headers.get(header::ETAG), stale.header(&header::ETAG)) {
            (Some(new), Some(old)) => weak_tag(new) == weak_tag(old),
            _ => true,
        };
        let headers = policy::refreshed_headers(&stale.headers, &resp.headers);
        let mut map = HeaderMap::with_capacity(headers.len());
        for (n, v) in &headers {
            map.append(n.clone(), v.clone());
        }
        let lifetime = policy::storable(
            stale.status,
            &map,
            self.per_user_key,
            svc.defaults,
            svc.cache.system_now(),
        );
        let Some(lifetime) = lifetime.filter(|_| same_tag) else {
            svc.revalidation_modified.inc();
            if let Some(guard) = self.guard.take() {
                guard.publish(FlightState::NotStored);
            }
            self.discard();
            return;
        };
        svc.revalidation_not_modified.inc();
        let entry = CachedResponse {
            status: stale.status,
            headers,
            body: stale.body.clone(),
            stored_at_ms: svc.cache.now(),
            ttl_ms: lifetime.ttl_ms,
            swr_ms: lifetime.swr_ms,
            sie_ms: lifetime.sie_ms,
            vary: stale.vary.clone(),
        };
        let variant = (!entry.vary.is_empty()).then(|| {
            let names = entry.vary.iter().map(|(n, _)| n.clone()).collect();
            (self.key.clone(), names)
        });
        self.finish(entry.encode(), variant, Filled::Revalidated);
    }

    /// The refresh got no usable answer: waiters serve their stale copy; the entry stays.
    fn refresh_failed(&mut self) {
        if self.refresh.as_ref().is_some_and(|j| j.revalidating) {
            self.svc.revalidation_error.inc();
        }
        if let Some(guard) = self.guard.take() {
            guard.publish(FlightState::UpstreamFailed);
        }
    }

    /// Removes the stale entry this refresh was for, in the background.
    fn discard(&self) {
        let (cache, key) = (Arc::clone(&self.svc.cache), self.key.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = cache.backend.remove(&key).await {
                    crate::redis::record_error("cache_remove", &e);
                }
            });
        }
    }

    /// The whole body arrived: publish to followers and store in the background. The body
    /// is copied once, from the chunks as they arrived into the stored value.
    fn complete(&mut self) {
        let Some(fill) = self.fill.take() else {
            return;
        };
        let entry = CachedResponse {
            status: fill.status,
            headers: fill.headers,
            body: Bytes::new(),
            stored_at_ms: self.svc.cache.now(),
            ttl_ms: fill.lifetime.ttl_ms,
            swr_ms: fill.lifetime.swr_ms,
            sie_ms: fill.lifetime.sie_ms,
            vary: fill.vary,
        };
        self.finish(
            entry.encode_with_body(&fill.chunks),
            fill.variant,
            Filled::Fetched,
        );
    }

    /// Publishes the `encoded` entry to the followers and stores it in the background.
    fn finish(
        &mut self,
        encoded: Bytes,
        variant: Option<(CacheKey, Vec<HeaderName>)>,
        how: Filled,
    ) {
        let guard = self.guard.take();
        // What the cache encoded itself always reads back.
        let Ok(entry) = CachedResponse::decode_shared(encoded.clone()) else {
            return;
        };
        let keep_for = entry.keep_for();
        if let Some(g) = &guard {
            g.publish(FlightState::Stored(Arc::new(entry), how));
        }
        let cache = Arc::clone(&self.svc.cache);
        let primary = self.primary.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            log::warn!("cache: no async runtime to store {}", primary.as_str());
            return;
        };
        rt.spawn(async move {
            if let Err(e) = cache
                .store(&primary, variant.as_ref(), encoded, keep_for)
                .await
            {
                crate::redis::record_error("cache_put", &e);
            }
            // Until here, late arrivals for the key were answered from the published entry.
            drop(guard);
        });
    }
}

/// An entity-tag without its weakness marker, for the weak comparison.
fn weak_tag(v: &HeaderValue) -> &[u8] {
    let b = v.as_bytes().trim_ascii();
    b.strip_prefix(b"W/").unwrap_or(b)
}

#[cfg(test)]
mod tests;
