//! The in-process backend: a moka cache bounded by bytes, TinyLFU admission and eviction, and
//! each entry expiring after its own lifetime.
//!
//! `max_memory` is meant as a bound on resident memory, so an entry weighs what it really
//! costs: its value is one exactly sized allocation (the encoded entry, counted at the size
//! the allocator really reserves for it: see [`allocated`]), plus its key, plus
//! [`ENTRY_OVERHEAD`] for what moka spends around them. Entries fill at most half of the
//! bound: the other half is the allocator's slack under churn (freed memory it keeps for
//! reuse, pages shared by live and freed blocks). The churn test (32 MiB, a loaded 2-core
//! machine) measured that slack at 5 to 19 MB whether the entries weighed 22 or 27 MB: with
//! four fifths for entries the process went over 1.25 x `max_memory` in one run of six, with
//! two thirds it reached 1.24 x in one run of ten. moka applies evictions in
//! batches; so that a burst of large inserts cannot run far past the bound before the next
//! batch, pending evictions are settled whenever the bytes inserted since the last
//! settlement reach a thirty-second of the bound.

use super::backend::{CacheBackend, CacheError};
use super::key::{CacheKey, PurgeFilter};
use async_trait::async_trait;
use bytes::Bytes;
use moka::sync::Cache;
use moka::Expiry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes an entry costs beyond its key and value: moka's entry (hash table bucket, value
/// entry and entry info, access-order deque node, timer wheel node, the key's extra `Arc`).
/// Measured with mimalloc (the gateway's allocator): 50,000 entries of 200-byte bodies
/// (457 bytes of key and value each) grow resident memory by 923 bytes per entry; this
/// constant with the size-class allowance counts 962; 200 kB bodies take 252 kB each, counted
/// 263 kB. The integration test
/// `resident_memory_stays_within_max_memory_under_churn` holds the whole process to the bound.
pub const ENTRY_OVERHEAD: u64 = 448;

#[derive(Clone)]
struct Value {
    bytes: Bytes,
    keep_for: Duration,
}

struct KeepFor;

impl Expiry<CacheKey, Value> for KeepFor {
    fn expire_after_create(&self, _: &CacheKey, v: &Value, _: Instant) -> Option<Duration> {
        Some(v.keep_for)
    }

    fn expire_after_update(
        &self,
        _: &CacheKey,
        v: &Value,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(v.keep_for)
    }
}

pub struct MemoryBackend {
    cache: Cache<CacheKey, Value>,
    /// Bytes inserted since pending evictions were last settled.
    unsettled: AtomicU64,
    settle_every: u64,
}

/// What an entry weighs against `max_memory`.
pub fn weight(key: &CacheKey, value: &Bytes) -> u64 {
    key.as_str().len() as u64 + allocated(value.len() as u64) + ENTRY_OVERHEAD
}

/// The memory the allocator (mimalloc) really takes for an allocation of `n` bytes: blocks
/// above 128 KiB get pages of their own in 64 KiB slices (a 200 kB body takes 256 KiB);
/// smaller ones come from size classes at most an eighth apart.
pub fn allocated(n: u64) -> u64 {
    const LARGE: u64 = 128 << 10;
    const SLICE: u64 = 64 << 10;
    if n > LARGE {
        n.div_ceil(SLICE) * SLICE
    } else {
        n + n / 8
    }
}

/// The share of `max_memory` entries may weigh; the rest is the allocator's slack.
pub fn entry_budget(max_memory: u64) -> u64 {
    max_memory / 2
}

impl MemoryBackend {
    /// A backend whose process memory stays within about `max_memory` (entries weigh at most
    /// [`entry_budget`] of it).
    pub fn new(max_memory: u64) -> MemoryBackend {
        let max_bytes = entry_budget(max_memory);
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|k: &CacheKey, v: &Value| {
                u32::try_from(weight(k, &v.bytes)).unwrap_or(u32::MAX)
            })
            .expire_after(KeepFor)
            .build();
        MemoryBackend {
            cache,
            unsettled: AtomicU64::new(0),
            settle_every: (max_bytes / 32).max(1),
        }
    }

    fn publish_size(&self) {
        super::backend::metrics()
            .bytes
            .set(i64::try_from(self.cache.weighted_size()).unwrap_or(i64::MAX));
    }
}

#[async_trait]
impl CacheBackend for MemoryBackend {
    async fn get(&self, key: &CacheKey) -> Result<Option<Bytes>, CacheError> {
        Ok(self.cache.get(key).map(|v| v.bytes))
    }

    async fn put(
        &self,
        key: &CacheKey,
        value: Bytes,
        keep_for: Duration,
    ) -> Result<(), CacheError> {
        let w = weight(key, &value);
        self.cache.insert(
            key.clone(),
            Value {
                bytes: value,
                keep_for,
            },
        );
        let unsettled = self.unsettled.fetch_add(w, Ordering::Relaxed) + w;
        if unsettled >= self.settle_every {
            self.unsettled.store(0, Ordering::Relaxed);
            self.cache.run_pending_tasks();
            self.publish_size();
        }
        Ok(())
    }

    async fn remove(&self, key: &CacheKey) -> Result<(), CacheError> {
        self.cache.invalidate(key);
        Ok(())
    }

    async fn purge(&self, filter: &PurgeFilter) -> Result<u64, CacheError> {
        let mut purged = 0;
        for (key, _) in self.cache.iter() {
            if filter.matches(key.as_str()) && self.cache.remove(&*key).is_some() {
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
