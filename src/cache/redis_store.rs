//! The shared backend: entries in Redis as `SET key <binary entry> PX keep_for`, so every
//! gateway instance serves what any of them stored. A response that varies takes two
//! round trips to find: its variant index at the primary key, then the variant.
//!
//! Every command is single-key (Cluster-safe), fails fast while the connection is down and is
//! bounded by [`COMMAND_TIMEOUT`]: a slow or dead Redis costs a request at most that, and the
//! caller then treats it as a miss. A purge SCANs each primary node for the key prefix and
//! deletes key by key; on a cluster that is best-effort (keys written during the scan, or
//! moved by a reshard, can be missed).

use super::backend::{CacheBackend, CacheError};
use super::key::{CacheKey, PurgeFilter};
use async_trait::async_trait;
use bytes::Bytes;
use fred::clients::Pool;
use fred::prelude::*;
use fred::types::CustomCommand;
use std::future::Future;
use std::time::Duration;

/// Upper bound of one Redis command on the request path.
pub const COMMAND_TIMEOUT: Duration = Duration::from_millis(250);

/// Keys asked for per SCAN step.
const SCAN_COUNT: u32 = 500;

pub struct RedisBackend {
    pool: Pool,
    options: Options,
}

impl RedisBackend {
    pub fn new(pool: Pool) -> RedisBackend {
        RedisBackend {
            pool,
            options: Options {
                timeout: Some(COMMAND_TIMEOUT),
                // While disconnected, fail at once instead of queueing until reconnection:
                // the request goes upstream rather than waiting for Redis.
                // (`max_attempts: Some(1)` would also stop replays, but fred spends an attempt
                // on routing first, and then every command fails.)
                fail_fast: true,
                ..Default::default()
            },
        }
    }

    /// Scans one node (or the whole server when not clustered) and deletes what matches.
    async fn purge_node<C: ClientLike>(
        &self,
        client: &C,
        pattern: &str,
    ) -> Result<u64, CacheError> {
        let mut cursor = String::from("0");
        let mut purged = 0u64;
        loop {
            let args: Vec<Value> = vec![
                cursor.as_str().into(),
                "MATCH".into(),
                pattern.into(),
                "COUNT".into(),
                i64::from(SCAN_COUNT).into(),
            ];
            let reply: Value = bounded(
                "SCAN",
                client.custom(CustomCommand::new_static("SCAN", None, false), args),
            )
            .await?;
            let (next, keys) = parse_scan(reply)?;
            for key in keys {
                // One key per DEL: keys of one page may live in different cluster slots.
                let n: i64 = bounded(
                    "DEL",
                    self.pool
                        .next_connected()
                        .with_options(&self.options)
                        .del::<i64, _>(key),
                )
                .await?;
                purged += u64::try_from(n).unwrap_or(0);
            }
            if next == "0" {
                return Ok(purged);
            }
            cursor = next;
        }
    }
}

/// Runs a Redis command under [`COMMAND_TIMEOUT`], mapping both failures to `CacheError`.
async fn bounded<T>(
    what: &'static str,
    fut: impl Future<Output = Result<T, fred::error::Error>>,
) -> Result<T, CacheError> {
    match tokio::time::timeout(COMMAND_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CacheError::Backend(format!("redis {what}: {e}"))),
        Err(_) => Err(CacheError::Backend(format!(
            "redis {what}: no answer within {COMMAND_TIMEOUT:?}"
        ))),
    }
}

/// `[cursor, [key, ...]]`.
fn parse_scan(reply: Value) -> Result<(String, Vec<Bytes>), CacheError> {
    let bad = || CacheError::Backend("redis SCAN: unexpected reply".into());
    let Value::Array(mut parts) = reply else {
        return Err(bad());
    };
    if parts.len() != 2 {
        return Err(bad());
    }
    let keys = parts.pop().ok_or_else(bad)?;
    let cursor = parts.pop().ok_or_else(bad)?;
    let cursor = cursor.as_string().ok_or_else(bad)?;
    let Value::Array(keys) = keys else {
        return Err(bad());
    };
    let keys = keys
        .into_iter()
        .filter_map(|k| k.as_bytes().map(Bytes::copy_from_slice))
        .collect();
    Ok((cursor, keys))
}

#[async_trait]
impl CacheBackend for RedisBackend {
    async fn get(&self, key: &CacheKey) -> Result<Option<Bytes>, CacheError> {
        bounded(
            "GET",
            self.pool
                .next_connected()
                .with_options(&self.options)
                .get(key.as_str()),
        )
        .await
    }

    async fn put(
        &self,
        key: &CacheKey,
        value: Bytes,
        keep_for: Duration,
    ) -> Result<(), CacheError> {
        let ms = i64::try_from(keep_for.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        bounded(
            "SET",
            self.pool
                .next_connected()
                .with_options(&self.options)
                .set::<(), _, _>(key.as_str(), value, Some(Expiration::PX(ms)), None, false),
        )
        .await
    }

    async fn remove(&self, key: &CacheKey) -> Result<(), CacheError> {
        bounded(
            "DEL",
            self.pool
                .next_connected()
                .with_options(&self.options)
                .del::<i64, _>(key.as_str()),
        )
        .await
        .map(drop)
    }

    async fn purge(&self, filter: &PurgeFilter) -> Result<u64, CacheError> {
        let pattern = filter.pattern();
        let client = self.pool.next_connected();
        if !client.is_clustered() {
            return self.purge_node(client, &pattern).await;
        }
        let nodes = client
            .cached_cluster_state()
            .map(|s| s.unique_primary_nodes())
            .unwrap_or_default();
        let mut purged = 0;
        for node in nodes {
            let node_client = client.with_cluster_node(node);
            purged += self.purge_node(&node_client, &pattern).await?;
        }
        Ok(purged)
    }

    fn bytes(&self) -> Option<u64> {
        None
    }
}
