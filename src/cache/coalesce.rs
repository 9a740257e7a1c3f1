//! Request coalescing: concurrent misses for one key send one request upstream.
//!
//! The first miss becomes the leader and holds a [`FlightGuard`]; later misses follow, waiting
//! on a `watch` channel for the leader's outcome. The guard publishes the outcome explicitly
//! (stored, not storable, upstream failed) and its `Drop` covers every other way a request can
//! end, so followers are woken as soon as the leader is done, never left to their timeout.
//! The map is sharded and its locks are never held across an `.await`.

use super::entry::CachedResponse;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

const SHARDS: usize = 64;

/// What followers learn from the leader.
#[derive(Debug, Clone)]
pub enum FlightState {
    Pending,
    /// The leader stored this (fetched anew, or refreshed by a `304`); followers answer from
    /// it.
    Stored(Arc<CachedResponse>, Filled),
    /// The response could not be stored (or the leader went away): followers go upstream.
    NotStored,
    /// The upstream failed: followers holding a stale copy serve it, the rest go upstream.
    UpstreamFailed,
}

/// How a flight's entry came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filled {
    Fetched,
    /// A stale entry the upstream confirmed with a `304`.
    Revalidated,
}

type Flights = HashMap<Box<str>, Arc<watch::Sender<FlightState>>>;

pub struct Coalescer {
    shards: Box<[Mutex<Flights>]>,
    hasher: std::collections::hash_map::RandomState,
}

/// The outcome of [`Coalescer::join`].
pub enum Join {
    Lead(FlightGuard),
    Follow(watch::Receiver<FlightState>),
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }
}

impl Coalescer {
    fn shard(&self, key: &str) -> MutexGuard<'_, Flights> {
        let i = (self.hasher.hash_one(key) as usize) % self.shards.len();
        // A panic while holding this lock cannot leave the map half-updated (single insert
        // or remove), so a poisoned lock is still usable.
        self.shards[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Becomes the leader for `key`, or follows the flight already under way.
    pub fn join(self: &Arc<Self>, key: &str) -> Join {
        let mut shard = self.shard(key);
        if let Some(tx) = shard.get(key) {
            return Join::Follow(tx.subscribe());
        }
        let (tx, _) = watch::channel(FlightState::Pending);
        let tx = Arc::new(tx);
        shard.insert(key.into(), Arc::clone(&tx));
        Join::Lead(FlightGuard {
            coalescer: Arc::clone(self),
            key: key.into(),
            tx,
        })
    }

    /// Follows the flight for `key` if there is one; never leads.
    pub fn follow(&self, key: &str) -> Option<watch::Receiver<FlightState>> {
        self.shard(key).get(key).map(|tx| tx.subscribe())
    }

    /// Followers currently waiting on `key` (tests).
    #[cfg(test)]
    pub fn waiters(&self, key: &str) -> usize {
        self.shard(key).get(key).map_or(0, |tx| tx.receiver_count())
    }

    #[cfg(test)]
    pub fn in_flight(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// Held by the leader of a flight; dropping it ends the flight.
pub struct FlightGuard {
    coalescer: Arc<Coalescer>,
    key: Box<str>,
    tx: Arc<watch::Sender<FlightState>>,
}

impl FlightGuard {
    /// Tells the followers how it went. The flight stays registered until the guard drops,
    /// so requests arriving meanwhile (e.g. while the entry is written to Redis) are answered
    /// from this outcome too.
    pub fn publish(&self, state: FlightState) {
        self.tx.send_replace(state);
    }

    /// Waits on this flight like a follower (the leader hands the work to someone else).
    pub fn subscribe(&self) -> watch::Receiver<FlightState> {
        self.tx.subscribe()
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        {
            let mut shard = self.coalescer.shard(&self.key);
            if shard
                .get(&*self.key)
                .is_some_and(|tx| Arc::ptr_eq(tx, &self.tx))
            {
                shard.remove(&*self.key);
            }
        }
        self.tx.send_if_modified(|s| {
            if matches!(s, FlightState::Pending) {
                *s = FlightState::NotStored;
                true
            } else {
                false
            }
        });
    }
}

/// Waits for the leader's outcome. A closed channel counts as `NotStored`.
pub async fn wait(rx: &mut watch::Receiver<FlightState>) -> FlightState {
    match rx.wait_for(|s| !matches!(s, FlightState::Pending)).await {
        Ok(state) => state.clone(),
        Err(_) => FlightState::NotStored,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_then_followers_until_the_guard_drops() {
        let c = Arc::new(Coalescer::default());
        let Join::Lead(guard) = c.join("k") else {
            panic!("first join leads")
        };
        let Join::Follow(mut rx) = c.join("k") else {
            panic!("second join follows")
        };
        assert!(matches!(c.join("other"), Join::Lead(_)));
        assert_eq!(c.waiters("k"), 1);
        drop(guard);
        assert!(matches!(wait(&mut rx).await, FlightState::NotStored));
        assert_eq!(c.in_flight(), 0);
        assert!(matches!(c.join("k"), Join::Lead(_)));
    }

    #[tokio::test]
    async fn a_published_outcome_is_seen_by_late_followers_until_the_drop() {
        let c = Arc::new(Coalescer::default());
        let Join::Lead(guard) = c.join("k") else {
            panic!()
        };
        guard.publish(FlightState::UpstreamFailed);
        let mut late = c.follow("k").expect("flight still registered");
        assert!(matches!(wait(&mut late).await, FlightState::UpstreamFailed));
        drop(guard);
        assert!(c.follow("k").is_none());
    }
}
