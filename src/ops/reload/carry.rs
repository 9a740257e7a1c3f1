//! State that outlives a reload: what the old process hands to the new one so that a dead
//! upstream stays out of rotation and a client's rate limit is not refilled by a config change.
//!
//! Carried, for each upstream that remains (same service name, same address as written): its
//! breaker (state, backoff step, time until it half-opens, half-open successes, failures in a
//! row) and its health verdict; for each service that remains with a local rate limit: its
//! buckets. Services and upstreams that the new config drops drop their state. Not carried:
//! the memory cache (emptied; the Redis backend keeps entries), retry budgets and breakers'
//! rolling windows (seconds long), metric counters (Prometheus counts a restart as a reset).

use crate::runtime::Runtime;
use crate::upstream::breaker::CarriedBreaker;
use crate::upstream::state::CarriedHealth;
use serde::{Deserialize, Serialize};

/// Everything one process hands to its successor.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Carried {
    pub upstreams: Vec<CarriedUpstream>,
    pub rate_limits: Vec<CarriedRateLimit>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedUpstream {
    pub service: String,
    /// As written in the config.
    pub upstream: String,
    pub breaker: CarriedBreaker,
    pub health: CarriedHealth,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct CarriedRateLimit {
    pub service: String,
    /// Each key with the microseconds until its bucket is full again.
    pub buckets: Vec<(String, u64)>,
}

/// How much of what was carried found a place in the new config.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resumed {
    pub upstreams: usize,
    pub rate_limit_keys: usize,
}

/// Captures the state to hand over (called once this process stopped accepting).
pub fn capture(runtime: &Runtime) -> Carried {
    let mut carried = Carried::default();
    for service in &runtime.services {
        for upstream in &service.pool.upstreams {
            carried.upstreams.push(CarriedUpstream {
                service: service.name.clone(),
                upstream: upstream.name.clone(),
                breaker: upstream.breaker.carry(),
                health: upstream.carry_health(),
            });
        }
        if let Some(limiter) = &service.rate_limit {
            let buckets = limiter.carry_buckets();
            if !buckets.is_empty() {
                carried.rate_limits.push(CarriedRateLimit {
                    service: service.name.clone(),
                    buckets,
                });
            }
        }
    }
    carried
}

/// Resumes what a predecessor handed over, before this process accepts its first connection.
pub fn resume(runtime: &Runtime, carried: &Carried) -> Resumed {
    let mut resumed = Resumed::default();
    for c in &carried.upstreams {
        let Some(service) = runtime.services.iter().find(|s| s.name == c.service) else {
            continue;
        };
        let Some(upstream) = service.pool.upstreams.iter().find(|u| u.name == c.upstream) else {
            continue;
        };
        upstream.breaker.resume(&c.breaker);
        upstream.resume_health(&service.name, &c.health);
        resumed.upstreams += 1;
    }
    for c in &carried.rate_limits {
        let limiter = runtime
            .services
            .iter()
            .find(|s| s.name == c.service)
            .and_then(|s| s.rate_limit.as_ref());
        if let Some(limiter) = limiter {
            limiter.resume_buckets(&c.buckets);
            resumed.rate_limit_keys += c.buckets.len();
        }
    }
    resumed
}
