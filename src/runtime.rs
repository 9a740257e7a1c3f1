//! The runtime form of a loaded config: compiled routes, per-service pools, prepared peer
//! settings and metric handles, built once at start-up so the request path only looks up.

use crate::breaker::{Clock, MonotonicClock};
use crate::config::{Config, FallbackConfig, HashKey, ServiceConfig, Timeouts};
use crate::metrics::ServiceMetrics;
use crate::pool::{BackgroundTask, Pool};
use crate::retry_budget::{RetryBudget, RetryBudgetConfig};
use crate::routing::Router;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::Result;
use std::sync::Arc;
use std::time::Duration;

/// One service at run time.
pub struct Service {
    pub name: String,
    pub pool: Pool,
    pub hash_key: HashKey,
    pub timeouts: Timeouts,
    pub tls: bool,
    pub sni: Option<String>,
    pub tls_verify: bool,
    pub metrics: ServiceMetrics,
    /// Upstream statuses the breaker counts as failures.
    pub failure_statuses: Vec<u16>,
    pub slow_call_threshold: Option<Duration>,
    pub retries: u32,
    pub retry_budget: RetryBudget,
    pub fallback: Fallback,
    /// Used for `Retry-After` when no breaker says when it half-opens (all unhealthy).
    pub health_check_interval: Option<Duration>,
}

/// The prepared fallback response.
pub struct Fallback {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Bytes,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether the config sets its own `Retry-After`.
    pub has_retry_after: bool,
}

impl Fallback {
    fn new(service: &str, config: &FallbackConfig) -> Fallback {
        let body = match &config.body {
            Some(body) => Bytes::from(body.clone()),
            None => {
                let mut json = serde_json::to_vec(
                    &serde_json::json!({"error": format!("{service} service unavailable")}),
                )
                .unwrap_or_default();
                json.push(b'\n');
                Bytes::from(json)
            }
        };
        // Validated at load, so nothing is dropped here in practice.
        let headers: Vec<(HeaderName, HeaderValue)> = config
            .headers
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::from_str(v).ok()?,
                ))
            })
            .collect();
        Fallback {
            status: StatusCode::from_u16(config.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            content_type: config.content_type.clone(),
            body,
            has_retry_after: headers.iter().any(|(k, _)| k == http::header::RETRY_AFTER),
            headers,
        }
    }
}

impl Service {
    fn new(
        name: &str,
        config: &ServiceConfig,
        clock: &Arc<dyn Clock>,
    ) -> Result<(Service, Option<BackgroundTask>)> {
        let (pool, health_check) = Pool::new(name, config, Arc::clone(clock))?;
        let budget = RetryBudgetConfig {
            percent: config.retry_budget.percent,
            min_per_second: config.retry_budget.min_per_second,
        };
        Ok((
            Service {
                name: name.to_string(),
                pool,
                hash_key: config.hash_key.clone(),
                timeouts: config.timeouts.clone(),
                tls: config.tls,
                sni: config.sni.clone(),
                tls_verify: config.tls_verify,
                metrics: ServiceMetrics::new(name),
                failure_statuses: config.circuit_breaker.failure_statuses.clone(),
                slow_call_threshold: config.circuit_breaker.slow_call_threshold,
                retries: config.retries,
                retry_budget: RetryBudget::new(budget, Arc::clone(clock)),
                fallback: Fallback::new(name, &config.fallback),
                health_check_interval: config.health_check.as_ref().map(|h| h.interval),
            },
            health_check,
        ))
    }

    /// Seconds until some upstream may admit requests again, for `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        let soonest = self
            .pool
            .upstreams
            .iter()
            .filter_map(|u| u.breaker.retry_after())
            .min()
            .or(self.health_check_interval)
            .unwrap_or(Duration::from_secs(1));
        soonest.as_secs_f64().ceil().max(1.0) as u64
    }
}

/// Everything the proxy needs per request, shared by all worker threads.
pub struct Runtime {
    pub router: Router,
    pub services: Vec<Arc<Service>>,
    pub access_log: bool,
}

impl Runtime {
    /// Builds the runtime and the background services (health checks) the server must run.
    pub fn new(config: &Config) -> Result<(Runtime, Vec<BackgroundTask>)> {
        let mut services = Vec::with_capacity(config.services.len());
        let mut background = Vec::new();
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
        for (name, svc) in &config.services {
            let (service, health_check) = Service::new(name, svc, &clock)?;
            services.push(Arc::new(service));
            background.extend(health_check);
        }
        let names: Vec<&str> = config.services.keys().map(String::as_str).collect();
        let router = Router::new(config, |name| {
            names.iter().position(|n| *n == name).unwrap_or_default()
        });
        Ok((
            Runtime {
                router,
                services,
                access_log: config.access_log,
            },
            background,
        ))
    }
}
