//! Metrics: every Prometheus metric the gateway exports, registered once in one registry,
//! and the text encoding served on the admin listener's `/metrics`.
//!
//! Per-service and per-upstream handles are resolved when the config loads (see
//! `ServiceMetrics`), so the request path only increments atomics.

use once_cell::sync::Lazy;
use prometheus::{
    exponential_buckets, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::{Arc, OnceLock};

/// All of the gateway's metrics.
pub struct Metrics {
    pub registry: Registry,
    pub requests_total: IntCounterVec,
    pub request_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub requests_in_flight: IntGaugeVec,
    pub tunnels_active: IntGaugeVec,
    pub upstream_errors_total: IntCounterVec,
    pub upstream_healthy: IntGaugeVec,
    pub circuit_state: IntGaugeVec,
    pub circuit_transitions_total: IntCounterVec,
    pub circuit_rejected_total: IntCounterVec,
    pub retries_total: IntCounterVec,
    pub config_reloads_total: IntCounterVec,
    pub build_info: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
    registry
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

/// Registers a counter owned by another module (which keeps its handle) in the gateway's
/// registry, so `/metrics` shows it.
pub fn register_counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> IntCounterVec {
    counter(registry, name, help, labels)
}

/// Registers a gauge owned by another module, like [`register_counter`].
pub fn register_gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    gauge(registry, name, help, labels)
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    // 0.5 ms .. ~16 s: covers a cached hit through a slow upstream.
    let buckets = exponential_buckets(0.0005, 2.0, 16).expect("valid buckets");
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric definition");
    registry
        .register(Box::new(h.clone()))
        .expect("metric registered once");
    h
}

impl Metrics {
    fn new() -> Metrics {
        let r = Registry::new();
        let m = Metrics {
            requests_total: counter(
                &r,
                "breakwater_requests_total",
                "Requests answered, by service, method and status.",
                &["service", "method", "status"],
            ),
            request_duration: histogram(
                &r,
                "breakwater_request_duration_seconds",
                "Time from request header received to response finished, by service.",
                &["service"],
            ),
            upstream_duration: histogram(
                &r,
                "breakwater_upstream_duration_seconds",
                "Time from upstream selection to the end of the upstream response, by service.",
                &["service"],
            ),
            requests_in_flight: gauge(
                &r,
                "breakwater_requests_in_flight",
                "Requests being proxied right now, by service.",
                &["service"],
            ),
            tunnels_active: gauge(
                &r,
                "breakwater_tunnels_active",
                "Upgraded connections (WebSocket and other Upgrade tunnels) open right now, \
                 by service.",
                &["service"],
            ),
            upstream_errors_total: counter(
                &r,
                "breakwater_upstream_errors_total",
                "Failed upstream attempts, by service and kind (connect, timeout, reset, ...).",
                &["service", "kind"],
            ),
            upstream_healthy: gauge(
                &r,
                "breakwater_upstream_healthy",
                "1 when the upstream passes its active health check, else 0.",
                &["service", "upstream"],
            ),
            circuit_state: gauge(
                &r,
                "breakwater_circuit_state",
                "Circuit breaker state per upstream: 0 closed, 1 half-open, 2 open.",
                &["service", "upstream"],
            ),
            circuit_transitions_total: counter(
                &r,
                "breakwater_circuit_transitions_total",
                "Circuit breaker transitions, by the state entered.",
                &["service", "upstream", "to"],
            ),
            circuit_rejected_total: counter(
                &r,
                "breakwater_circuit_rejected_total",
                "Requests answered with the fallback because no upstream's breaker admitted them.",
                &["service"],
            ),
            retries_total: counter(
                &r,
                "breakwater_retries_total",
                "Retry decisions: attempted, budget_exhausted, or not_retryable.",
                &["service", "outcome"],
            ),
            config_reloads_total: counter(
                &r,
                "breakwater_config_reloads_total",
                "Config reloads: success (counted by the process that took over) or error.",
                &["result"],
            ),
            build_info: gauge(
                &r,
                "breakwater_build_info",
                "Always 1; the version label says which build runs.",
                &["version"],
            ),
            registry: r,
        };
        m.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The process-wide metrics.
pub static METRICS: Lazy<Metrics> = Lazy::new(Metrics::new);

/// Handles for one service, resolved once at load.
#[derive(Clone)]
pub struct ServiceMetrics {
    pub name: String,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub in_flight: IntGauge,
    pub tunnels: IntGauge,
    pub circuit_rejected: IntCounter,
    pub retries_attempted: IntCounter,
    pub retries_budget_exhausted: IntCounter,
    pub retries_not_retryable: IntCounter,
    /// `requests_total` handles by method and status, resolved on first use: the request
    /// path then skips the label hashing and the registry's lock. One row per method and
    /// hundred of statuses, made when first counted: a full table for every service was
    /// 4,800 slots, 75 KiB a service before its first request.
    requests: Arc<[OnceLock<Box<StatusRow>>]>,
}

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
];
const STATUSES: usize = 600;
/// Statuses in one row of [`ServiceMetrics::requests`].
const ROW: usize = 100;
type StatusRow = [OnceLock<IntCounter>; ROW];

impl ServiceMetrics {
    pub fn new(service: &str) -> ServiceMetrics {
        let m = &*METRICS;
        let retries = |outcome: &str| m.retries_total.with_label_values(&[service, outcome]);
        ServiceMetrics {
            name: service.to_string(),
            request_duration: m.request_duration.with_label_values(&[service]),
            upstream_duration: m.upstream_duration.with_label_values(&[service]),
            in_flight: m.requests_in_flight.with_label_values(&[service]),
            tunnels: m.tunnels_active.with_label_values(&[service]),
            circuit_rejected: m.circuit_rejected_total.with_label_values(&[service]),
            retries_attempted: retries("attempted"),
            retries_budget_exhausted: retries("budget_exhausted"),
            retries_not_retryable: retries("not_retryable"),
            requests: (0..METHODS.len() * STATUSES / ROW)
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    /// Counts one failed upstream attempt.
    pub fn upstream_error(&self, kind: &str) {
        METRICS
            .upstream_errors_total
            .with_label_values(&[&self.name, kind])
            .inc();
    }

    /// Counts one answered request.
    pub fn count_request(&self, method: &str, status: u16) {
        let m = method_label(method);
        let Some(mi) = METHODS.iter().position(|x| *x == m) else {
            return;
        };
        let status_index = usize::from(status);
        match self.requests.get((mi * STATUSES + status_index) / ROW) {
            Some(row) if status_index < STATUSES => row
                .get_or_init(|| Box::new(std::array::from_fn(|_| OnceLock::new())))
                [status_index % ROW]
                .get_or_init(|| {
                    let code = http::StatusCode::from_u16(status).ok();
                    let status = code.as_ref().map_or("000", |c| c.as_str());
                    METRICS
                        .requests_total
                        .with_label_values(&[&self.name, m, status])
                })
                .inc(),
            _ => count_request(&self.name, method, status),
        }
    }
}

/// Counts one answered request; `service` is `"none"` when no route matched.
pub fn count_request(service: &str, method: &str, status: u16) {
    let code = http::StatusCode::from_u16(status).ok();
    let status = code.as_ref().map_or("000", |c| c.as_str());
    METRICS
        .requests_total
        .with_label_values(&[service, method_label(method), status])
        .inc();
}

/// Bounds the method label's cardinality: unknown methods count as `OTHER`.
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_by_method_and_status_across_rows() {
        let service = "count-request-rows";
        let m = ServiceMetrics::new(service);
        let counted = [
            ("GET", 200, 3),
            ("GET", 299, 1),
            ("GET", 300, 1),
            ("POST", 503, 2),
            ("GET", 503, 1),
            ("BREW", 418, 1),
            ("OPTIONS", 599, 1),
            ("GET", 999, 1),
        ];
        for (method, status, times) in counted {
            for _ in 0..times {
                m.count_request(method, status);
            }
        }
        let count = |method: &str, status: &str| {
            METRICS
                .requests_total
                .with_label_values(&[service, method, status])
                .get()
        };
        assert_eq!(count("GET", "200"), 3);
        assert_eq!(count("GET", "299"), 1);
        assert_eq!(count("GET", "300"), 1);
        assert_eq!(count("POST", "503"), 2);
        assert_eq!(count("GET", "503"), 1);
        assert_eq!(count("OTHER", "418"), 1);
        assert_eq!(count("OPTIONS", "599"), 1);
        assert_eq!(count("GET", "999"), 1);
        assert_eq!(count("POST", "200"), 0);
    }
}
