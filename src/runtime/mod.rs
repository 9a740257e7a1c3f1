//! The runtime: a compiled config installed in this process, which the proxy and the admin
//! listener read, shared by all worker threads.
//!
//! A config becomes a runtime in two steps. [`compile`] checks every section and builds what
//! needs no running server (route table, peers, CORS policies, header sets, fallbacks, the JWT
//! keys, the unconnected Redis pool); `check` stops there. [`Compiled::install`] then creates
//! the per-process state from it: breakers, health flags, retry budgets, rate-limit counts,
//! metric handles and the health-check loops (one background service runs them all).

mod compile;

pub use compile::{compile, prepare, Compiled, ConnectionLimits};

use crate::cache::{ResponseCache, ServiceCache};
use crate::clock::{Clock, CoarseClock, MonotonicClock};
use crate::edge::auth::{self, Authenticator, ServiceAuth};
use crate::edge::compression::{self, CompressionPolicy};
use crate::edge::cors::Cors;
use crate::edge::forwarded::TrustedProxies;
use crate::edge::headers::HeaderRules;
use crate::edge::limits::Limits;
use crate::edge::path::PathRules;
use crate::edge::rate_limit::RateLimiter;
use crate::edge::security_headers::SecurityHeaders;
use crate::ops::access_log::AccessLog;
use crate::ops::metrics::ServiceMetrics;
use crate::ops::tracing::Tracer;
use crate::redis::{self, Redis};
use crate::routing::Router;
use crate::upstream::fallback::Fallback;
use crate::upstream::health::HealthChecks;
use crate::upstream::peer::{Protocol, Timeouts};
use crate::upstream::pool::{HealthCheckLoop, Pool};
use crate::upstream::retry::RetryBudget;
use compile::CompiledService;
use pingora::services::background::background_service;
use pingora::services::ServiceWithDependents;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;

/// Everything the proxy needs per request, shared by all worker threads.
pub struct Runtime {
    pub router: Router,
    /// In the order the router's indices refer to.
    pub services: Vec<Arc<Service>>,
    /// The access log, unless `access_log: false`.
    pub access_log: Option<AccessLog>,
    /// Trace context and spans, with a `tracing` section.
    pub tracer: Option<Arc<Tracer>>,
    /// Verifies tokens for services with `auth`; `None` without `auth.jwt`.
    pub authenticator: Option<Arc<Authenticator>>,
    /// The response cache, when some service caches (the admin API purges it).
    pub cache: Option<Arc<ResponseCache>>,
    /// The shared Redis connection, when configured.
    pub redis: Option<Redis>,
    /// Whether a rate limit or the cache uses Redis: readiness then waits for it.
    pub redis_needed: bool,
    /// Top-level security headers, for answers to requests no route matched.
    pub security_headers: Arc<SecurityHeaders>,
    /// How request paths are normalized before routing (`server.paths`).
    pub paths: PathRules,
    /// Whose forwarding headers are believed (`server.trusted_proxies`).
    pub trusted_proxies: TrustedProxies,
    /// How the client's headers are cleaned (`server.underscores_in_headers`, identity
    /// headers).
    pub header_rules: HeaderRules,
}

/// One service at run time.
pub struct Service {
    pub name: String,
    pub pool: Pool,
    /// What the gateway speaks to the upstreams (`grpc`: gateway answers in gRPC's form).
    pub protocol: Protocol,
    pub timeouts: Timeouts,
    /// Retries a failed request may make (each on an upstream not yet tried).
    pub retries: u32,
    pub retry_budget: RetryBudget,
    pub fallback: Fallback,
    pub limits: Limits,
    pub auth: ServiceAuth,
    pub security_headers: Arc<SecurityHeaders>,
    pub cors: Option<Cors>,
    pub rate_limit: Option<RateLimiter>,
    pub cache: Option<ServiceCache>,
    /// Response compression, when the service has a `compression` section.
    pub compression: Option<Arc<CompressionPolicy>>,
    pub metrics: ServiceMetrics,
}

/// A Pingora service the server must run next to the proxy: the health checks, the span
/// exporter.
pub type BackgroundTask = Box<dyn ServiceWithDependents>;

impl Compiled {
    /// Installs the compiled config in this process and returns the background services
    /// (health checks, the span exporter) the server
    /// must run. Fails where Pingora refuses (it should not: static upstream discovery cannot
    /// fail) or the access log file cannot be opened.
    pub fn install(self) -> Result<(Runtime, Vec<BackgroundTask>)> {
        auth::register_metrics();
        if self.redis.is_some() {
            redis::register_metrics();
        }
        if self.services.iter().any(|s| s.compression.is_some()) {
            compression::register_metrics();
        }
        let clocks = Clocks {
            precise: Arc::new(MonotonicClock::new()),
            coarse: Arc::new(CoarseClock::new()),
        };
        let mut services = Vec::with_capacity(self.services.len());
        let mut health_checks = Vec::new();
        for compiled in self.services {
            let (service, health_check) = install_service(compiled, self.cache.as_ref(), &clocks)?;
            services.push(Arc::new(service));
            health_checks.extend(health_check);
        }
        let mut background: Vec<BackgroundTask> = Vec::new();
        if !health_checks.is_empty() {
            let checks = HealthChecks::new(health_checks);
            background.push(Box::new(background_service("health checks", checks)));
        }
        let access_log = match self.access_log.map(|plan| plan.install()).transpose() {
            Ok(log) => log,
            Err(e) => return Error::e_explain(ErrorType::FileOpenError, e),
        };
        let tracer = self.tracing.map(|plan| {
            let (tracer, export) = plan.install();
            if let Some(export) = export {
                background.push(Box::new(background_service("trace export", export)));
            }
            tracer
        });
        Ok((
            Runtime {
                router: self.router,
                services,
                access_log,
                tracer,
                redis_needed: self.redis_needed,
                authenticator: self.authenticator,
                cache: self.cache,
                redis: self.redis,
                security_headers: self.security_headers,
                paths: self.paths,
                trusted_proxies: self.trusted_proxies,
                header_rules: self.header_rules,
            },
            background,
        ))
    }
}

/// The clocks of a service's state machines: breakers and retry budgets count in windows and
/// read the time on every request, so they take the cheaper coarse one.
struct Clocks {
    precise: Arc<dyn Clock>,
    coarse: Arc<dyn Clock>,
}

fn install_service(
    s: CompiledService,
    cache: Option<&Arc<ResponseCache>>,
    clocks: &Clocks,
) -> Result<(Service, Option<HealthCheckLoop>)> {
    let (pool, health_check) = s.pool.start(Arc::clone(&clocks.coarse))?;
    let service = Service {
        pool,
        protocol: s.protocol,
        timeouts: s.timeouts,
        retries: s.retries,
        retry_budget: RetryBudget::new(s.retry_budget, Arc::clone(&clocks.coarse)),
        fallback: s.fallback,
        limits: s.limits,
        auth: s.auth,
        security_headers: s.security_headers,
        cors: s.cors,
        rate_limit: s
            .rate_limit
            .map(|policy| RateLimiter::new(policy, Arc::clone(&clocks.precise))),
        cache: s
            .cache
            .zip(cache)
            .map(|(policy, cache)| ServiceCache::new(&s.name, policy, Arc::clone(cache))),
        compression: s.compression,
        metrics: ServiceMetrics::new(&s.name),
        name: s.name,
    };
    Ok((service, health_check))
}
