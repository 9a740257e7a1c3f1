//! What a cache backend is (the trait both the memory and the Redis store implement), how it
//! fails, and the cache's metrics, which the backends update too.
//!
//! A backend stores opaque values (an encoded [`Stored`](super::entry::Stored)) under string
//! keys with a lifetime; what they mean is the cache's business, so both backends stay small
//! and behave alike.

use super::key::{CacheKey, PurgeFilter};
use async_trait::async_trait;
use bytes::Bytes;
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
    async fn get(&self, key: &CacheKey) -> Result<Option<Bytes>, CacheError>;
    /// Stores `value` under `key`, replacing what was there; the backend drops it after
    /// `keep_for`.
    async fn put(&self, key: &CacheKey, value: Bytes, keep_for: Duration)
        -> Result<(), CacheError>;
    async fn remove(&self, key: &CacheKey) -> Result<(), CacheError>;
    /// Removes the keys `filter` matches; returns how many.
    async fn purge(&self, filter: &PurgeFilter) -> Result<u64, CacheError>;
    /// Bytes held, for backends that bound them.
    fn bytes(&self) -> Option<u64>;
}

pub(crate) struct CacheMetrics {
    pub(crate) requests: IntCounterVec,
    pub(crate) not_modified: IntCounterVec,
    pub(crate) revalidations: IntCounterVec,
    pub(crate) background_refreshes: IntCounterVec,
    pub(crate) bytes: IntGauge,
}

static CACHE_METRICS: Lazy<CacheMetrics> = Lazy::new(|| {
    let registry = &crate::ops::metrics::METRICS.registry;
    let requests = IntCounterVec::new(
        Opts::new(
            "breakwater_cache_requests_total",
            "Cacheable requests by service and how the cache answered: hit, miss, stale, \
             revalidated, bypass.",
        ),
        &["service", "result"],
    )
    .expect("valid metric definition");
    let not_modified = IntCounterVec::new(
        Opts::new(
            "breakwater_cache_not_modified_total",
            "304 Not Modified answers the cache gave to conditional requests, by service.",
        ),
        &["service"],
    )
    .expect("valid metric definition");
    let revalidations = IntCounterVec::new(
        Opts::new(
            "breakwater_cache_revalidations_total",
            "Conditional requests the cache sent upstream to revalidate a stale entry, by \
             service and outcome: not_modified (refreshed without the body), modified \
             (replaced), error (upstream failure or 5xx; the stale entry is kept).",
        ),
        &["service", "outcome"],
    )
    .expect("valid metric definition");
    let background_refreshes = IntCounterVec::new(
        Opts::new(
            "breakwater_cache_background_refreshes_total",
            "Stale-while-revalidate refreshes, by service and result: started, or skipped \
             when the bound of concurrent background refreshes was reached.",
        ),
        &["service", "result"],
    )
    .expect("valid metric definition");
    let bytes = IntGauge::new(
        "breakwater_cache_bytes",
        "Bytes held by the memory cache backend: each entry's encoded size, key and bookkeeping.",
    )
    .expect("valid metric definition");
    for m in [
        Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(not_modified.clone()),
        Box::new(revalidations.clone()),
        Box::new(background_refreshes.clone()),
        Box::new(bytes.clone()),
    ] {
        if let Err(e) = registry.register(m) {
            log::error!("registering cache metrics: {e}");
        }
    }
    CacheMetrics {
        requests,
        not_modified,
        revalidations,
        background_refreshes,
        bytes,
    }
});

pub(crate) fn metrics() -> &'static CacheMetrics {
    &CACHE_METRICS
}
