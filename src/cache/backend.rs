//! What a cache backend is (the trait both the memory and the Redis store implement), how it
//! fails, and the cache's metrics, which the backends update too.

use super::entry::CachedResponse;
use super::key::CacheKey;
use async_trait::async_trait;
use once_cell::sync::Lazy;
use prometheus::{IntCounterVec, IntGauge, Opts};
use std::fmt;
use std::time::Duration;

/// A backend failure. The request path treats every one as a miss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheError {
    /// The store could not be reached or refused the command (Redis down, timeout).
    Backend(String),
    /// A stored value could not be read back.
    Decode(String),
    /// A purge request that makes no sense (the prefix must start with `/`).
    InvalidPurge(String),
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Backend(m) => write!(f, "cache backend: {m}"),
            CacheError::Decode(m) => write!(f, "cache entry unreadable: {m}"),
            CacheError::InvalidPurge(m) => write!(f, "invalid purge: {m}"),
        }
    }
}

impl std::error::Error for CacheError {}

/// Where entries live.
#[async_trait]
pub trait CacheBackend: Send + Sync {
    async fn get(&self, key: &CacheKey) -> Result<Option<CachedResponse>, CacheError>;
    /// Stores `entry`, replacing any other variant under `key`; the backend drops it after
    /// `keep_for`.
    async fn put(
        &self,
        key: &CacheKey,
        entry: CachedResponse,
        keep_for: Duration,
    ) -> Result<(), CacheError>;
    /// Removes the entries whose path starts with `path_prefix` (in one service, or all);
    /// returns how many.
    async fn purge(&self, path_prefix: &str, service: Option<&str>) -> Result<u64, CacheError>;
    /// Bytes held, for backends that bound them.
    fn bytes(&self) -> Option<u64>;
}

pub(crate) struct CacheMetrics {
    pub(crate) requests: IntCounterVec,
    pub(crate) bytes: IntGauge,
}

static CACHE_METRICS: Lazy<CacheMetrics> = Lazy::new(|| {
    let registry = &crate::ops::metrics::METRICS.registry;
    let requests = IntCounterVec::new(
        Opts::new(
            "breakwater_cache_requests_total",
            "Cacheable requests by service and how the cache answered: hit, miss, stale, bypass.",
        ),
        &["service", "result"],
    )
    .expect("valid metric definition");
    let bytes = IntGauge::new(
        "breakwater_cache_bytes",
        "Bytes held by the memory cache backend (bodies, headers and keys).",
    )
    .expect("valid metric definition");
    for m in [
        Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(bytes.clone()),
    ] {
        if let Err(e) = registry.register(m) {
            log::error!("registering cache metrics: {e}");
        }
    }
    CacheMetrics { requests, bytes }
});

pub(crate) fn metrics() -> &'static CacheMetrics {
    &CACHE_METRICS
}
