//! The `cache:` sections of the YAML (top level and per service).

use crate::values::ByteSize;
use serde::Deserialize;
use std::time::Duration;

/// Top-level `cache:` section: one response cache per process, shared by every service that
/// has a `cache:` of its own. Optional; without it the memory backend runs with these defaults.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Where entries live: `memory` (this process only) or `redis` (shared by every gateway
    /// instance; uses the top-level `redis:` connection). Default: `memory`.
    pub backend: BackendKind,
    /// Bound of the memory backend, in bytes: what its entries really occupy (each entry is
    /// one allocation holding its headers and body, plus its key and a fixed bookkeeping
    /// cost, at most half of the bound, the rest being the allocator's slack); the
    /// least valuable entries (TinyLFU) are evicted beyond it. Ignored by
    /// `redis`, whose own `maxmemory` applies. Default: `256MiB`.
    pub max_memory: ByteSize,
    /// Responses with a larger body are streamed to the client uncached, never buffered
    /// whole. Default: `1MiB`.
    pub max_body_size: ByteSize,
    /// How long concurrent misses for one key wait for the one request filling the entry
    /// before going upstream themselves. Default: `5s`.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub lock_timeout: Duration,
    /// Most variants kept per URL for responses with `Vary` (one per distinct set of values
    /// of the varied request headers); storing one more drops the oldest. At least 1.
    /// Default: `16`.
    pub max_variants: usize,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            backend: BackendKind::Memory,
            max_memory: ByteSize(256 * 1024 * 1024),
            max_body_size: ByteSize(1024 * 1024),
            lock_timeout: Duration::from_secs(5),
            max_variants: 16,
        }
    }
}

/// `cache.backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// In-process, bounded by `max_memory`.
    #[default]
    Memory,
    /// Shared through Redis (the top-level `redis:` connection).
    Redis,
}

/// `cache:` of a service. Without it the service's responses are not cached.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceCacheConfig {
    /// How long a stored response is served as fresh (`X-Cache: HIT`); an upstream
    /// `Cache-Control: max-age`/`s-maxage` lowers it for that response. Default: `1m`.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub ttl: Duration,
    /// How long after `ttl` a stored response may still be served (`X-Cache: STALE`) when
    /// the upstream fails, times out or its breaker is open; a response's own
    /// `Cache-Control: stale-if-error=N` overrides it. Default: `0s` (never).
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub stale_if_error: Duration,
    /// How long after `ttl` a stored response is still served at once (`X-Cache: STALE`)
    /// while one background request refreshes it; a response's own
    /// `Cache-Control: stale-while-revalidate=N` overrides it. Default: `0s` (the first
    /// request after `ttl` waits for the refresh).
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub stale_while_revalidate: Duration,
    /// Key entries by the authenticated user (the JWT subject), so one user's response is
    /// never served to another; `private` responses are then storable. Default: true when
    /// the service's route requires auth, else false. Requests carrying `Authorization` on a
    /// service whose key is not per user bypass the cache.
    pub vary_by_user: Option<bool>,
    /// Let requests carrying `Cookie` use the shared cache (when the key is not per user).
    /// Only for upstreams whose answers do not depend on cookies, or that say so with
    /// `Cache-Control: private`, `no-store` or `Vary: Cookie`. Default: false: such requests
    /// go upstream and store nothing (`X-Cache: BYPASS`).
    pub ignore_cookies: bool,
}

impl Default for ServiceCacheConfig {
    fn default() -> Self {
        ServiceCacheConfig {
            ttl: Duration::from_secs(60),
            stale_if_error: Duration::ZERO,
            stale_while_revalidate: Duration::ZERO,
            vary_by_user: None,
            ignore_cookies: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: CacheConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(c, CacheConfig::default());
        assert_eq!(c.max_memory, ByteSize(256 << 20));
        assert_eq!(c.lock_timeout, Duration::from_secs(5));
        let c: CacheConfig = serde_yaml::from_str(
            "{backend: redis, max_memory: 64MiB, max_body_size: 512KiB, lock_timeout: 500ms, \
             max_variants: 4}",
        )
        .unwrap();
        assert_eq!(c.max_variants, 4);
        assert_eq!(c.backend, BackendKind::Redis);
        assert_eq!(c.max_body_size, ByteSize(512 * 1024));
        assert_eq!(c.lock_timeout, Duration::from_millis(500));
        assert!(serde_yaml::from_str::<CacheConfig>("{backend: disk}").is_err());
        assert!(serde_yaml::from_str::<CacheConfig>("{max_mem: 1MiB}").is_err());

        let s: ServiceCacheConfig = serde_yaml::from_str(
            "{ttl: 5m, stale_if_error: 1h, stale_while_revalidate: 30s, vary_by_user: true, \
             ignore_cookies: true}",
        )
        .unwrap();
        assert_eq!(s.stale_while_revalidate, Duration::from_secs(30));
        assert!(s.ignore_cookies);
        assert_eq!(s.ttl, Duration::from_secs(300));
        assert_eq!(s.stale_if_error, Duration::from_secs(3600));
        assert_eq!(s.vary_by_user, Some(true));
        let s: ServiceCacheConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(s, ServiceCacheConfig::default());
        assert!(serde_yaml::from_str::<ServiceCacheConfig>("{ttl: soon}").is_err());
        assert!(serde_yaml::from_str::<ServiceCacheConfig>("{ttl: 1s, tll: 2s}").is_err());
    }
}
