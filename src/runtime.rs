//! The runtime form of a loaded config: compiled routes, per-service pools, prepared peer
//! settings and metric handles, built once at start-up so the request path only looks up.

use crate::cache::{ResponseCache, ServiceCache};
use crate::clock::{Clock, MonotonicClock};
use crate::config::{
    Algorithm, Config, ConfigError, FallbackConfig, HashKey, Limits, ServiceConfig, Timeouts,
};
use crate::edge::auth::{AuthMode, Authenticator};
use crate::edge::cors::Cors;
use crate::edge::rate_limit::RateLimiter;
use crate::edge::security_headers::SecurityHeaders;
use crate::ops::metrics::ServiceMetrics;
use crate::redis::Redis;
use crate::routing::Router;
use crate::upstream::pool::{BackgroundTask, Pool};
use crate::upstream::retry::{RetryBudget, RetryBudgetConfig};
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::{Error, ErrorType, Result};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One service at run time.
pub struct Service {
    pub name: String,
    pub pool: Pool,
    pub algorithm: Algorithm,
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
    pub limits: Limits,
    pub auth: AuthMode,
    pub required_scopes: Vec<String>,
    pub security_headers: Arc<SecurityHeaders>,
    pub cors: Option<Cors>,
    pub rate_limit: Option<RateLimiter>,
    pub cache: Option<ServiceCache>,
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
        global: &Config,
        global_headers: &Arc<SecurityHeaders>,
        redis: Option<&Redis>,
        response_cache: Option<&Arc<ResponseCache>>,
        clock: &Arc<dyn Clock>,
    ) -> Result<(Service, Option<BackgroundTask>)> {
        let cache = match (&config.cache, response_cache) {
            (Some(own), Some(shared)) => Some(ServiceCache::new(
                name,
                own,
                config.auth != AuthMode::None,
                Arc::clone(shared),
            )),
            _ => None,
        };
        let rate_limit = config
            .rate_limit
            .as_ref()
            .map(|rl| RateLimiter::new(name, rl, redis.cloned(), Arc::clone(clock)))
            .transpose()
            .map_err(startup_error)?;
        let (pool, health_check) = Pool::new(name, config, Arc::clone(clock))?;
        let security_headers = match &config.security_headers {
            Some(own) => Arc::new(SecurityHeaders::new(own).map_err(startup_error)?),
            None => Arc::clone(global_headers),
        };
        let cors = config
            .cors
            .as_ref()
            .map(Cors::new)
            .transpose()
            .map_err(startup_error)?;
        let budget = RetryBudgetConfig {
            percent: config.retry_budget.percent,
            min_per_second: config.retry_budget.min_per_second,
        };
        Ok((
            Service {
                name: name.to_string(),
                pool,
                algorithm: config.load_balancing,
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
                limits: config.limits.resolve(&global.limits),
                auth: config.auth,
                required_scopes: config.required_scopes.clone(),
                security_headers,
                cors,
                rate_limit,
                cache,
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
    /// Verifies tokens for services with `auth`; `None` without `auth.jwt`.
    pub authenticator: Option<Arc<Authenticator>>,
    /// The response cache, when some service caches (the admin API purges it).
    pub cache: Option<Arc<ResponseCache>>,
    /// The shared Redis connection, when configured.
    pub redis: Option<Redis>,
    /// Top-level security headers, for answers to requests no route matched.
    pub security_headers: Arc<SecurityHeaders>,
}

fn startup_error(e: String) -> Box<Error> {
    Error::explain(ErrorType::InternalError, e)
}

/// A config that passed every check a start needs, with its loaded key material.
pub struct Prepared {
    pub config: Config,
    pub authenticator: Option<Arc<Authenticator>>,
}

/// Loads and validates `path`, then loads what it refers to (JWT keys), so that `check`,
/// start-up and reload all refuse the same files, with the same located messages.
pub fn prepare(path: &Path) -> std::result::Result<Prepared, ConfigError> {
    let config = Config::load(path)?;
    let authenticator = match &config.auth.jwt {
        Some(jwt) => Some(Arc::new(Authenticator::new(jwt).map_err(|message| {
            ConfigError {
                file: path.to_path_buf(),
                line: None,
                column: None,
                field: "auth.jwt".into(),
                message,
            }
        })?)),
        None => None,
    };
    Ok(Prepared {
        config,
        authenticator,
    })
}

impl Runtime {
    /// Builds the runtime and the background services (health checks) the server must run.
    pub fn new(
        prepared: &Prepared,
        redis: Option<&Redis>,
    ) -> Result<(Runtime, Vec<BackgroundTask>)> {
        let config = &prepared.config;
        let mut services = Vec::with_capacity(config.services.len());
        let mut background = Vec::new();
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
        crate::edge::auth::register_metrics();
        let global_headers =
            Arc::new(SecurityHeaders::new(&config.security_headers).map_err(startup_error)?);
        let cache = if config.services.values().any(|s| s.cache.is_some()) {
            let pool = redis.map(|r| r.pool().clone());
            Some(ResponseCache::new(&config.cache, pool).map_err(startup_error)?)
        } else {
            None
        };
        for (name, svc) in &config.services {
            let (service, health_check) = Service::new(
                name,
                svc,
                config,
                &global_headers,
                redis,
                cache.as_ref(),
                &clock,
            )?;
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
                authenticator: prepared.authenticator.clone(),
                cache,
                redis: redis.cloned(),
                security_headers: global_headers,
            },
            background,
        ))
    }
}
