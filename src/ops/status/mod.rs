//! The live status page of the admin listener: `/status` (an HTML page with its script and
//! style, embedded in the binary) and `/status.json`, which the page polls every second.
//!
//! The numbers of the last minute come from the Prometheus registry, not from the request
//! path: a background task ([`StatusSampler`]) reads the cumulative counters and histograms
//! once per second into a ring of 61 samples, and `/status.json` turns the differences between
//! samples into per-second series (requests, errors, p50/p99) and one-minute summaries.
//! Breakers, health and in-flight counts are read live from the runtime.

use crate::ops::lifecycle::LIFECYCLE;
use crate::ops::metrics::METRICS;
use crate::redis::RedisReadiness;
use crate::runtime::Runtime;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::proto::{MetricFamily, MetricType};
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub const PAGE_HTML: &str = include_str!("page.html");
pub const PAGE_JS: &str = include_str!("page.js");
pub const PAGE_CSS: &str = include_str!("page.css");

/// Samples kept: one a second, so 60 one-second intervals.
const SAMPLES: usize = 61;

/// One service's cumulative counts at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
struct Counts {
    requests: u64,
    errors: u64,
    /// `request_duration_seconds` buckets, cumulative, `+Inf` last.
    buckets: Vec<u64>,
    cache_hits: u64,
    cache_lookups: u64,
    rate_limited: u64,
}

#[derive(Debug, Clone)]
struct Sample {
    at: SystemTime,
    services: HashMap<String, Counts>,
}

/// The last minute of samples, shared by the sampler and the admin listener.
pub struct StatusHistory {
    started: SystemTime,
    samples: Mutex<VecDeque<Sample>>,
    /// Upper bounds of the duration histogram, in seconds.
    bounds: Mutex<Vec<f64>>,
}

impl StatusHistory {
    pub fn new() -> Arc<StatusHistory> {
        Arc::new(StatusHistory {
            started: SystemTime::now(),
            samples: Mutex::new(VecDeque::with_capacity(SAMPLES)),
            bounds: Mutex::new(Vec::new()),
        })
    }

    /// Reads the registry once and keeps the result.
    pub fn sample(&self) {
        let families = METRICS.registry.gather();
        let (services, bounds) = counts_of(&families);
        if let Ok(mut b) = self.bounds.lock() {
            if b.is_empty() && !bounds.is_empty() {
                *b = bounds;
            }
        }
        if let Ok(mut samples) = self.samples.lock() {
            if samples.len() == SAMPLES {
                samples.pop_front();
            }
            samples.push_back(Sample {
                at: SystemTime::now(),
                services,
            });
        }
    }
}

/// Per-service counts from the gathered registry, and the histogram's bucket bounds.
fn counts_of(families: &[MetricFamily]) -> (HashMap<String, Counts>, Vec<f64>) {
    let mut out: HashMap<String, Counts> = HashMap::new();
    let mut bounds = Vec::new();
    let label = |m: &prometheus::proto::Metric, name: &str| -> String {
        m.get_label()
            .iter()
            .find(|l| l.name() == name)
            .map(|l| l.value().to_string())
            .unwrap_or_default()
    };
    for family in families {
        match (family.name(), family.get_field_type()) {
            ("breakwater_requests_total", MetricType::COUNTER) => {
                for m in family.get_metric() {
                    let c = out.entry(label(m, "service")).or_default();
                    let n = m.get_counter().get_value() as u64;
                    c.requests += n;
                    if label(m, "status").starts_with('5') {
                        c.errors += n;
                    }
                }
            }
            ("breakwater_request_duration_seconds", MetricType::HISTOGRAM) => {
                for m in family.get_metric() {
                    let h = m.get_histogram();
                    if bounds.is_empty() {
                        bounds = h.get_bucket().iter().map(|b| b.upper_bound()).collect();
                    }
                    let mut buckets: Vec<u64> = h
                        .get_bucket()
                        .iter()
                        .map(|b| b.cumulative_count())
                        .collect();
                    buckets.push(h.get_sample_count());
                    out.entry(label(m, "service")).or_default().buckets = buckets;
                }
            }
            ("breakwater_cache_requests_total", MetricType::COUNTER) => {
                for m in family.get_metric() {
                    let c = out.entry(label(m, "service")).or_default();
                    let n = m.get_counter().get_value() as u64;
                    match label(m, "result").as_str() {
                        "hit" => {
                            c.cache_hits += n;
                            c.cache_lookups += n;
                        }
                        "miss" | "stale" => c.cache_lookups += n,
                        _ => {}
                    }
                }
            }
            ("breakwater_ratelimit_rejected_total", MetricType::COUNTER) => {
                for m in family.get_metric() {
                    out.entry(label(m, "service")).or_default().rate_limited +=
                        m.get_counter().get_value() as u64;
                }
            }
            _ => {}
        }
    }
    (out, bounds)
}

/// The `q` quantile (0..1) of a histogram given as cumulative bucket counts (`+Inf` last)
/// with their upper bounds, interpolated within the bucket as Prometheus'
/// `histogram_quantile` does. `None` without observations.
fn quantile(q: f64, bounds: &[f64], cumulative: &[u64]) -> Option<f64> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let i = cumulative.iter().position(|&c| c as f64 >= rank)?;
    let Some(&upper) = bounds.get(i) else {
        // In the +Inf bucket: the highest finite bound is all that is known.
        return bounds.last().copied();
    };
    let lower = if i == 0 { 0.0 } else { bounds[i - 1] };
    let below = if i == 0 { 0 } else { cumulative[i - 1] };
    let in_bucket = cumulative[i] - below;
    if in_bucket == 0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below as f64) / in_bucket as f64)
}

fn delta(now: &[u64], then: &[u64]) -> Vec<u64> {
    now.iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(then.get(i).copied().unwrap_or(0)))
        .collect()
}

fn ms(seconds: Option<f64>) -> Value {
    seconds.map_or(Value::Null, |s| json!((s * 1e5).round() / 100.0))
}

fn ratio(part: u64, whole: u64) -> Value {
    if whole == 0 {
        Value::Null
    } else {
        json!((part as f64 / whole as f64 * 1e4).round() / 1e4)
    }
}

/// The `/status.json` document.
pub fn status_json(runtime: &Runtime, history: &StatusHistory) -> Value {
    let samples: Vec<Sample> = history
        .samples
        .lock()
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default();
    let bounds = history.bounds.lock().map(|b| b.clone()).unwrap_or_default();
    let empty = Counts::default();
    let counts = |sample: &Sample, name: &str| -> Counts {
        sample
            .services
            .get(name)
            .cloned()
            .unwrap_or_else(|| empty.clone())
    };
    let services: Vec<Value> = runtime
        .services
        .iter()
        .enumerate()
        .map(|(index, service)| {
            let routes: Vec<Value> = runtime
                .router
                .routes()
                .iter()
                .filter(|r| r.service == index)
                .map(|r| json!({"host": r.host.as_ref().map(|h| h.to_string()), "path_prefix": r.prefix}))
                .collect();
            let upstreams: Vec<Value> = service
                .pool
                .upstreams
                .iter()
                .map(|u| {
                    let snap = u.breaker.snapshot();
                    json!({
                        "name": u.name,
                        "healthy": u.is_healthy(),
                        "state": snap.state.as_str(),
                        "half_open_in_ms": snap.retry_after.map(|d| d.as_millis() as u64),
                        "in_flight": u.in_flight.load(Ordering::Relaxed),
                        "consecutive_failures": snap.consecutive_failures,
                    })
                })
                .collect();
            let mut rps = Vec::new();
            let mut error_rate = Vec::new();
            let mut p50 = Vec::new();
            let mut p99 = Vec::new();
            for pair in samples.windows(2) {
                let (then, now) = (counts(&pair[0], &service.name), counts(&pair[1], &service.name));
                let secs = now_secs(&pair[1]) - now_secs(&pair[0]);
                let requests = now.requests.saturating_sub(then.requests);
                let errors = now.errors.saturating_sub(then.errors);
                let buckets = delta(&now.buckets, &then.buckets);
                rps.push(json!(if secs > 0.0 { (requests as f64 / secs * 10.0).round() / 10.0 } else { 0.0 }));
                error_rate.push(ratio(errors, requests));
                p50.push(ms(quantile(0.5, &bounds, &buckets)));
                p99.push(ms(quantile(0.99, &bounds, &buckets)));
            }
            let minute = match (samples.first(), samples.last()) {
                (Some(first), Some(last)) if samples.len() > 1 => {
                    let (then, now) = (counts(first, &service.name), counts(last, &service.name));
                    let secs = now_secs(last) - now_secs(first);
                    let requests = now.requests.saturating_sub(then.requests);
                    let buckets = delta(&now.buckets, &then.buckets);
                    json!({
                        "seconds": secs.round(),
                        "requests": requests,
                        "rps": if secs > 0.0 { (requests as f64 / secs * 10.0).round() / 10.0 } else { 0.0 },
                        "error_rate": ratio(now.errors.saturating_sub(then.errors), requests),
                        "p50_ms": ms(quantile(0.5, &bounds, &buckets)),
                        "p99_ms": ms(quantile(0.99, &bounds, &buckets)),
                        "cache_hit_ratio": ratio(
                            now.cache_hits.saturating_sub(then.cache_hits),
                            now.cache_lookups.saturating_sub(then.cache_lookups),
                        ),
                        "rate_limited": now.rate_limited.saturating_sub(then.rate_limited),
                    })
                }
                _ => Value::Null,
            };
            json!({
                "name": service.name,
                "routes": routes,
                "upstreams": upstreams,
                "cache": service.cache.is_some(),
                "rate_limit": service.rate_limit.is_some(),
                "last_minute": minute,
                "series": {"rps": rps, "error_rate": error_rate, "p50_ms": p50, "p99_ms": p99},
            })
        })
        .collect();
    let reloads = |result: &str| {
        METRICS
            .config_reloads_total
            .get_metric_with_label_values(&[result])
            .map_or(0, |c| c.get())
    };
    let redis = runtime.redis.as_ref().map(|r| match r.readiness() {
        RedisReadiness::Connected => "connected",
        RedisReadiness::Degraded => "down",
        RedisReadiness::Waiting => "connecting",
    });
    let now = SystemTime::now();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "pid": std::process::id(),
        "started_at": humantime::format_rfc3339_seconds(history.started).to_string(),
        "uptime_s": now.duration_since(history.started).map_or(0, |d| d.as_secs()),
        "ready": LIFECYCLE.is_ready(),
        "draining": LIFECYCLE.is_draining(),
        "redis": redis,
        "reloads": {"success": reloads("success"), "error": reloads("error")},
        "services": services,
    })
}

fn now_secs(s: &Sample) -> f64 {
    s.at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Pingora background service: samples the registry once a second for the status page.
pub struct StatusSampler(pub Arc<StatusHistory>);

#[async_trait::async_trait]
impl BackgroundService for StatusSampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => self.0.sample(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let bounds = [0.001, 0.002, 0.004];
        // 10 below 1 ms, 10 in 1-2 ms, none in 2-4 ms, 0 beyond.
        let cumulative = [10, 20, 20, 20];
        assert_eq!(quantile(0.5, &bounds, &cumulative), Some(0.001));
        let p75 = quantile(0.75, &bounds, &cumulative).unwrap();
        assert!((p75 - 0.0015).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(0.5, &bounds, &[0, 0, 0, 0]), None);
        // Everything beyond the last bound: the last bound is all that is known.
        assert_eq!(quantile(0.99, &bounds, &[0, 0, 0, 5]), Some(0.004));
    }

    #[test]
    fn counts_come_from_the_registry_families() {
        let m = &*METRICS;
        m.requests_total
            .with_label_values(&["status-test", "GET", "200"])
            .inc_by(3);
        m.requests_total
            .with_label_values(&["status-test", "GET", "503"])
            .inc_by(2);
        m.request_duration
            .with_label_values(&["status-test"])
            .observe(0.003);
        let (counts, bounds) = counts_of(&m.registry.gather());
        let c = &counts["status-test"];
        assert_eq!((c.requests, c.errors), (5, 2));
        assert_eq!(c.buckets.len(), bounds.len() + 1);
        assert_eq!(*c.buckets.last().unwrap(), 1);
    }
}
