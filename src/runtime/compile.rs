//! Compiling a config: every section's compile step, in file order, with its errors pointed
//! at the file's line and field. What `breakwater check` accepts is exactly what a start (or
//! the process a reload starts) installs: start-up hands the [`Compiled`] value to
//! [`Compiled::install`](super::Compiled::install) as it is, with nothing checked or built
//! from the config a second time.
//!
//! Compiling has no side effects on the running process (no metrics, no state, no
//! connections), so the old process of a reload can compile the new file to vet it.

use crate::cache::BackendKind;
use crate::cache::{ResponseCache, ServiceCachePolicy};
use crate::config::{
    AdminConfig, AdminToken, Config, ConfigError, ListenAddr, ServerConfig, ServiceConfig, Source,
};
use crate::edge::auth::{AuthCompileError, AuthMode, Authenticator, ServiceAuth};
use crate::edge::compression::{CompressionConfig, CompressionPolicy};
use crate::edge::cors::{Cors, CorsConfig};
use crate::edge::forwarded::TrustedProxies;
use crate::edge::headers::HeaderRules;
use crate::edge::limits::{Limits, LimitsConfig};
use crate::edge::path::PathRules;
use crate::edge::rate_limit::{Backend as RateLimitBackend, RateLimitPolicy};
use crate::edge::security_headers::SecurityHeaders;
use crate::edge::tls::{TlsAcceptor, TlsFile};
use crate::ops::access_log::AccessLogPlan;
use crate::ops::tracing::TracingPlan;
use crate::redis::Redis;
use crate::routing::Router;
use crate::upstream::fallback::Fallback;
use crate::upstream::peer::{Protocol, Timeouts, UpstreamTls};
use crate::upstream::pool::{PoolConfig, PoolPlan};
use crate::upstream::retry::{check_retries, RetryBudgetConfig};
use crate::values::FieldError;
use std::path::Path;
use std::sync::Arc;

/// A config that passed every check, compiled into what the request path uses, waiting to
/// be installed in a process.
pub struct Compiled {
    /// Listeners and process settings, for assembling the server.
    pub server: ServerConfig,
    pub admin: AdminConfig,
    /// Each `server.tls` listener with its certificate and key, loaded and checked.
    pub tls: Vec<(ListenAddr, TlsAcceptor)>,
    /// What every client connection is held to before its request is routed.
    pub connection_limits: ConnectionLimits,
    /// Read from `admin.token_env` or `admin.token_file`.
    pub admin_token: Option<AdminToken>,
    pub(super) access_log: Option<AccessLogPlan>,
    pub(super) tracing: Option<TracingPlan>,
    /// Whether a rate limit or the cache depends on Redis, so readiness waits for it.
    pub(super) redis_needed: bool,
    pub(super) router: Router,
    /// In the order of the config's `services` (by name), which the router's indices follow.
    pub(super) services: Vec<CompiledService>,
    pub(super) authenticator: Option<Arc<Authenticator>>,
    pub(super) redis: Option<Redis>,
    pub(super) cache: Option<Arc<ResponseCache>>,
    /// The top-level set, for answers to requests no route matched.
    pub(super) security_headers: Arc<SecurityHeaders>,
    pub(super) paths: PathRules,
    pub(super) trusted_proxies: TrustedProxies,
    pub(super) header_rules: HeaderRules,
    route_count: usize,
}

/// Limits that apply to a client connection before a request is routed, so across services.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// The top-level `limits.header_read_timeout`: the whole request header must arrive
    /// within it.
    pub header_timeout: std::time::Duration,
    /// The largest `limits.max_header_size` of any service (each service then checks its own).
    pub max_header_size: u64,
}

/// One service, compiled.
pub(super) struct CompiledService {
    pub(super) name: String,
    pub(super) pool: PoolPlan,
    pub(super) protocol: Protocol,
    pub(super) timeouts: Timeouts,
    pub(super) retries: u32,
    pub(super) retry_budget: RetryBudgetConfig,
    pub(super) fallback: Fallback,
    pub(super) limits: Limits,
    pub(super) auth: ServiceAuth,
    pub(super) security_headers: Arc<SecurityHeaders>,
    pub(super) cors: Option<Cors>,
    pub(super) rate_limit: Option<RateLimitPolicy>,
    pub(super) cache: Option<ServiceCachePolicy>,
    pub(super) compression: Option<Arc<CompressionPolicy>>,
}

impl Compiled {
    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn route_count(&self) -> usize {
        self.route_count
    }

    /// Every address the process listens on: plain, TLS and admin.
    pub fn listeners(&self) -> Vec<std::net::SocketAddr> {
        self.server
            .listen
            .iter()
            .chain(self.tls.iter().map(|(listen, _)| listen))
            .chain(std::iter::once(&self.admin.listen))
            .map(|l| l.0)
            .collect()
    }
}

/// Reads, parses and compiles `path`: what `check`, start-up and a reload all do, so they
/// refuse the same files with the same located messages.
pub fn prepare(path: &Path) -> Result<Compiled, ConfigError> {
    let source = Source::read(path)?;
    let config = Config::parse(&source)?;
    compile(&config, &source)
}

/// Compiles a parsed config; `source` is its text, to locate errors. The JWT keys are loaded
/// last: a bad field elsewhere is reported without waiting for a `jwks_url` fetch.
pub fn compile(config: &Config, source: &Source) -> Result<Compiled, ConfigError> {
    let security_headers = config
        .security_headers
        .compile()
        .map_err(|e| source.error("security_headers", None, e))?;
    let security_headers = Arc::new(security_headers);
    let redis = config
        .redis
        .as_ref()
        .map(|r| r.compile())
        .transpose()
        .map_err(|e| source.error("redis", None, e))?;
    let cache = if config.services.values().any(|s| s.cache.is_some()) {
        let cache = config.cache.compile(redis.as_ref());
        Some(cache.map_err(|e| source.error("cache", None, e))?)
    } else {
        None
    };
    let shared = Shared {
        config,
        security_headers: &security_headers,
        redis: redis.as_ref(),
        source,
    };
    let services = config
        .services
        .iter()
        .map(|(name, svc)| compile_service(name, svc, &shared))
        .collect::<Result<Vec<_>, _>>()?;
    let router = Router::compile(
        config
            .services
            .values()
            .enumerate()
            .map(|(index, svc)| (index, svc.routes.as_slice())),
    );
    let tls = config
        .server
        .tls
        .iter()
        .enumerate()
        .map(|(i, listener)| {
            TlsAcceptor::load(&listener.cert, &listener.key)
                .map(|acceptor| (listener.listen, acceptor))
                .map_err(|(file, message)| {
                    let path = match file {
                        TlsFile::Cert => &listener.cert,
                        TlsFile::Key => &listener.key,
                    };
                    let field = format!("server.tls[{i}].{}", file.field());
                    source.error(field, Some(&path.display().to_string()), message)
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let global_limits = config.limits.compile(&LimitsConfig::default());
    let connection_limits = ConnectionLimits {
        header_timeout: global_limits.header_read_timeout,
        max_header_size: services
            .iter()
            .map(|s| s.limits.max_header_size)
            .fold(global_limits.max_header_size, u64::max),
    };
    let admin_token = config
        .admin
        .token()
        .map_err(|e| source.error("admin", None, e))?;
    let tracing = config
        .tracing
        .as_ref()
        .map(|t| t.compile())
        .transpose()
        .map_err(|e| source.error("tracing", None, e))?;
    let access_log = config
        .access_log
        .compile(tracing.is_some())
        .map_err(|e| source.error("access_log", None, e))?;
    let redis_needed = redis.is_some()
        && (cache.is_some() && config.cache.backend == BackendKind::Redis
            || config.services.values().any(|s| {
                s.rate_limit
                    .as_ref()
                    .is_some_and(|rl| rl.backend == RateLimitBackend::Redis)
            }));
    let trusted_proxies = TrustedProxies::compile(&config.server.trusted_proxies)
        .map_err(|e| source.section_error("server", e))?;
    let authenticator = config.auth.compile().map_err(|e| match e {
        AuthCompileError::Invalid(message) => source.error("auth", None, message),
        AuthCompileError::Keys(message) => source.error_without_line("auth.jwt", message),
    })?;
    // The identity headers are refused from clients in every spelling.
    let identity_headers: Vec<_> = authenticator
        .as_ref()
        .map(|a| a.identity_headers().cloned().collect())
        .unwrap_or_default();
    let header_rules = HeaderRules::new(config.server.underscores_in_headers, &identity_headers)
        .with_name_case(config.server.header_name_case);
    Ok(Compiled {
        server: config.server.clone(),
        admin: config.admin.clone(),
        tls,
        connection_limits,
        admin_token,
        access_log,
        tracing,
        redis_needed,
        router,
        services,
        authenticator: authenticator.map(Arc::new),
        redis,
        cache,
        security_headers,
        paths: config.server.paths.compile(),
        trusted_proxies,
        header_rules,
        route_count: config.route_count(),
    })
}

/// What every service's compile step may need besides its own section.
struct Shared<'a> {
    config: &'a Config,
    security_headers: &'a Arc<SecurityHeaders>,
    redis: Option<&'a Redis>,
    source: &'a Source,
}

fn compile_service(
    name: &str,
    svc: &ServiceConfig,
    shared: &Shared<'_>,
) -> Result<CompiledService, ConfigError> {
    let source = shared.source;
    // The field of an error the section reports as a message, or as a path below the service.
    let at = |rest: &'static str| {
        move |message: String| source.error(format!("services.{name}{rest}"), None, message)
    };
    let section = format!("services.{name}");
    let below = |e: FieldError| source.section_error(&section, e);

    let tls = UpstreamTls {
        enabled: svc.tls,
        sni: svc.sni.clone(),
        verify: svc.tls_verify,
    };
    let pool = PoolConfig {
        upstreams: &svc.upstreams,
        load_balancing: svc.load_balancing,
        hash_key: &svc.hash_key,
        tls: &tls,
        protocol: svc.protocol,
        timeouts: &svc.timeouts,
        name_case: shared.config.server.header_name_case,
        health_check: svc.health_check.as_ref(),
        circuit_breaker: &svc.circuit_breaker,
    }
    .compile(name)
    .map_err(below)?;
    let auth =
        ServiceAuth::compile(svc.auth, &svc.required_scopes).map_err(at(".required_scopes"))?;
    let cors = svc
        .cors
        .as_ref()
        .map(CorsConfig::compile)
        .transpose()
        .map_err(at(".cors"))?;
    let security_headers = match &svc.security_headers {
        Some(own) => Arc::new(own.compile().map_err(at(".security_headers"))?),
        None => Arc::clone(shared.security_headers),
    };
    let rate_limit = svc
        .rate_limit
        .as_ref()
        .map(|rl| rl.compile(name, shared.redis))
        .transpose()
        .map_err(at(".rate_limit"))?;
    let compression = svc
        .compression
        .as_ref()
        .map(CompressionConfig::compile)
        .transpose()
        .map_err(at(".compression"))?
        .map(Arc::new);
    let fallback = svc.fallback.compile(name).map_err(below)?;
    check_retries(svc.retries).map_err(at(".retries"))?;
    svc.timeouts.check().map_err(at(".timeouts"))?;
    Ok(CompiledService {
        name: name.to_string(),
        pool,
        protocol: svc.protocol,
        timeouts: svc.timeouts.clone(),
        retries: svc.retries,
        retry_budget: svc.retry_budget.clone(),
        fallback,
        limits: svc.limits.compile(&shared.config.limits),
        auth,
        security_headers,
        cors,
        rate_limit,
        cache: svc
            .cache
            .as_ref()
            .map(|c| c.compile(svc.auth != AuthMode::None)),
        compression,
    })
}
