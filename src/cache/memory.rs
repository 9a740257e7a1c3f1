//! The in-process backend: a moka cache bounded by bytes (each entry weighs its body, headers
//! and key), TinyLFU admission and eviction, and each entry expiring after its own
//! `ttl + stale_if_error`.

use super::backend::{CacheBackend, CacheError};
use super::entry::CachedResponse;
use super::key::CacheKey;
use async_trait::async_trait;
use moka::sync::Cache;
use moka::Expiry;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Clone)]
struct Stored {
    entry: Arc<CachedResponse>,
    keep_for: Duration,
}

struct KeepFor;

impl Expiry<CacheKey, Stored> for KeepFor {
    fn expire_after_create(&self, _: &CacheKey, v: &Stored, _: Instant) -> Option<Duration> {
        Some(v.keep_for)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        v: &Stored,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.keep_for)
    }
}

pub struct MemoryBackend {
    cache: Cache<CacheKey, Stored>,
}

impl MemoryBackend {
    pub fn new(max_bytes: u64) -> MemoryBackend {
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &CacheKey, v: &Stored| v.entry.weight(k.as_str().len()))
            .expire_after(KeepFor)
            .build();
        MemoryBackend { cache }
    }

    fn publish_size(&self) {
        super::backend::metrics()
            .bytes
            .set(i64::try_from(self.cache.weighted_size()).unwrap_or(i64::MAX));
    }
}

#[async_trait]
impl CacheBackend for MemoryBackend {
    async fn get(&self, key: &CacheKey) -> Result<Option<CachedResponse>, CacheError> {
        Ok(self.cache.get(key).map(|s| (*s.entry).clone()))
    }

    async fn put(
        &self,
        key: &CacheKey,
        entry: CachedResponse,
        keep_for: Duration,
    ) -> Result<(), CacheError> {
        self.cache.insert(
            key.clone(),
            Stored {
                entry: Arc::new(entry),
                keep_for,
            },
        );
        self.publish_size();
        Ok(())
    }

    async fn purge(&self, path_prefix: &str, service: Option<&str>) -> Result<u64, CacheError> {
        let mut purged = 0;
        for (key, _) in self.cache.iter() {
            if key.matches_purge(path_prefix, service) && self.cache.remove(&*key).is_some() {
                purged += 1;
            }
        }
        self.cache.run_pending_tasks();
        self.publish_size();
        Ok(purged)
    }

    fn bytes(&self) -> Option<u64> {
        // Evictions are applied in batches; settle them so the figure is the real bound.
        self.cache.run_pending_tasks();
        self.publish_size();
        Some(self.cache.weighted_size())
    }
}
