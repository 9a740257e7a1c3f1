//! The file-level schema: the top-level sections, the process settings no feature owns
//! (listeners, TLS certificates, admin, threads), and a service's entry, which composes the
//! sections each feature declares in its own module. Every field is documented where it is
//! declared, and the configuration reference (docs/configuration.md) follows them.

use crate::cache::{CacheConfig, ServiceCacheConfig};
use crate::edge::auth::{AuthConfig, AuthMode};
use crate::edge::compression::CompressionConfig;
use crate::edge::cors::CorsConfig;
use crate::edge::forwarded::ProxyNet;
use crate::edge::headers::{HeaderNameCase, Underscores};
use crate::edge::limits::LimitsConfig;
use crate::edge::path::PathConfig;
use crate::edge::rate_limit::RateLimitConfig;
use crate::edge::security_headers::SecurityHeadersConfig;
use crate::ops::access_log::AccessLogConfig;
use crate::ops::tracing::TracingConfig;
use crate::redis::RedisConfig;
use crate::routing::RouteConfig;
use crate::upstream::breaker::BreakerConfig;
use crate::upstream::fallback::FallbackConfig;
use crate::upstream::health::HealthCheckConfig;
use crate::upstream::peer::{Protocol, Timeouts};
use crate::upstream::pool::{Algorithm, HashKey, UpstreamSpec};
use crate::upstream::retry::RetryBudgetConfig;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client-facing listeners and process settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// The admin listener (health, readiness, metrics).
    #[serde(default)]
    pub admin: AdminConfig,
    /// One line per request: `true` (JSON on stdout), `false`, or `{format, fields, output}`.
    /// Default: true.
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// W3C trace context and OpenTelemetry spans. Default: none (off).
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    /// Request limits for every service (a service may override them).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// How tokens are verified (services opt in with their `auth` field).
    #[serde(default)]
    pub auth: AuthConfig,
    /// Response security headers for every service (a service may replace them).
    #[serde(default)]
    pub security_headers: SecurityHeadersConfig,
    /// The Redis connection shared by `redis`-backed rate limits and the response cache.
    /// Default: none.
    #[serde(default)]
    pub redis: Option<RedisConfig>,
    /// The response cache shared by services with a `cache` section.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Services by name. At least one.
    pub services: BTreeMap<String, ServiceConfig>,
}

/// `server:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Plain HTTP listeners, `ip:port`. Default: `["0.0.0.0:8080"]`.
    #[serde(default = "default_listen")]
    pub listen: Vec<ListenAddr>,
    /// TLS-terminating listeners. Default: none.
    #[serde(default)]
    pub tls: Vec<TlsListener>,
    /// Pingora worker threads per listener service. Default: 1.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// How long in-flight requests may take to finish once shutdown starts, in whole
    /// seconds (rounded up). Default: 10s.
    #[serde(
        default = "default_grace_period",
        deserialize_with = "crate::values::de_duration"
    )]
    pub grace_period: Duration,
    /// Unix socket that passes listening sockets to a new process on upgrade.
    /// Default: `/tmp/breakwater_upgrade.sock`.
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: PathBuf,
    /// PID file written when running daemonised (`-d`). Default: `/tmp/breakwater.pid`.
    #[serde(default = "default_pid_file")]
    pub pid_file: PathBuf,
    /// Longest idle wait between two requests on a keep-alive client connection; then it is
    /// closed. Default: 60s.
    #[serde(
        default = "default_keepalive_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub keepalive_timeout: Duration,
    /// Client connections one process keeps open at most; beyond, new ones are closed at
    /// once (and counted in `breakwater_connections_refused_total`). Default: 80% of the
    /// process's open-file limit, which start-up raises to its hard limit.
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Accept HTTP/2 with prior knowledge (h2c) on the plain listeners, besides HTTP/1.1.
    /// TLS listeners always offer h2 through ALPN. Default: false.
    #[serde(default)]
    pub h2c: bool,
    /// Proxies in front of the gateway whose forwarding headers are believed: addresses or
    /// CIDR blocks. From any other peer, `X-Forwarded-*`, `Forwarded`, `X-Real-IP` and the
    /// like are replaced. Default: none (the TCP peer is the client).
    #[serde(default)]
    pub trusted_proxies: Vec<ProxyNet>,
    /// What a client header whose name contains `_` gets: `drop`, `reject` (400) or
    /// `allow`. Default: drop.
    #[serde(default)]
    pub underscores_in_headers: Underscores,
    /// How header names are spelled on the way through: `normalize` (a dozen common names
    /// capitalised, others in lower case) or `preserve` (as sent). Default: normalize.
    #[serde(default)]
    pub header_name_case: HeaderNameCase,
    /// How request paths are normalized before routing.
    #[serde(default)]
    pub paths: PathConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: default_listen(),
            tls: Vec::new(),
            threads: default_threads(),
            grace_period: default_grace_period(),
            upgrade_sock: default_upgrade_sock(),
            pid_file: default_pid_file(),
            keepalive_timeout: default_keepalive_timeout(),
            max_connections: None,
            h2c: false,
            trusted_proxies: Vec::new(),
            underscores_in_headers: Underscores::default(),
            header_name_case: HeaderNameCase::default(),
            paths: PathConfig::default(),
        }
    }
}

/// One `server.tls` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsListener {
    /// `ip:port` to listen on.
    pub listen: ListenAddr,
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `admin:` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Admin listener `ip:port`. Default: `127.0.0.1:9090` (loopback, on purpose).
    #[serde(default = "default_admin_listen")]
    pub listen: ListenAddr,
    /// Environment variable holding the admin token: mutating admin endpoints then require
    /// `Authorization: Bearer <token>`. Default: none.
    #[serde(default)]
    pub token_env: Option<String>,
    /// File holding the admin token (a trailing newline is ignored), e.g. a mounted Secret.
    /// Default: none.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            token_env: None,
            token_file: None,
        }
    }
}

/// The admin token, read once at compile time. Its `Debug` never shows it.
#[derive(Clone)]
pub struct AdminToken(String);

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(..)")
    }
}

impl AdminToken {
    /// Whether `authorization` is `Bearer <this token>`, compared in constant time.
    pub fn accepts(&self, authorization: Option<&[u8]>) -> bool {
        use subtle::ConstantTimeEq;
        let Some(presented) = authorization.and_then(|v| {
            let (scheme, token) = v.split_at_checked(7)?;
            scheme.eq_ignore_ascii_case(b"bearer ").then_some(token)
        }) else {
            return false;
        };
        // ct_eq answers unequal lengths at once; only the length can leak, never a prefix.
        bool::from(presented.ct_eq(self.0.as_bytes()))
    }
}

impl AdminConfig {
    /// Reads the admin token from `token_env` or `token_file`; `None` when neither is set.
    pub fn token(&self) -> Result<Option<AdminToken>, String> {
        let token = match (&self.token_env, &self.token_file) {
            (Some(_), Some(_)) => {
                return Err("set token_env or token_file, not both".to_string());
            }
            (None, None) => return Ok(None),
            (Some(var), None) => std::env::var(var).map_err(|_| {
                format!("token_env: the environment variable {var} is not set (or not UTF-8)")
            })?,
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("token_file: cannot read {}: {e}", path.display()))?,
        };
        let token = token.trim_end_matches(['\r', '\n']);
        if token.len() < 16 {
            return Err("the admin token must be at least 16 characters".to_string());
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "the admin token must be printable ASCII without spaces (it travels in a header)"
                    .to_string(),
            );
        }
        Ok(Some(AdminToken(token.to_string())))
    }
}

/// One entry of `services:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Which requests go to this service. At least one.
    pub routes: Vec<RouteConfig>,
    /// Upstream servers, `host:port` or `{addr: host:port, weight: N}`. At least one.
    pub upstreams: Vec<UpstreamSpec>,
    /// How an upstream is picked. Default: `round_robin`.
    #[serde(default)]
    pub load_balancing: Algorithm,
    /// What `consistent_hash` hashes. Default: `ip`.
    #[serde(default)]
    pub hash_key: HashKey,
    /// Upstream timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Active HTTP health checks. Default: none (every upstream counts as healthy).
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    /// Connect to the upstreams over TLS. Default: false.
    #[serde(default)]
    pub tls: bool,
    /// What the gateway speaks to the upstreams: `http1`, `h2` (HTTP/2 over TLS through ALPN,
    /// needs `tls: true`), `h2c` (HTTP/2 with prior knowledge, no TLS) or `grpc` (h2 with
    /// `tls: true`, else h2c; the gateway's own answers in gRPC's form). Default: http1.
    #[serde(default)]
    pub protocol: Protocol,
    /// SNI and certificate name for TLS upstreams. Default: the upstream's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// Verify the upstream's TLS certificate. Default: true.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// Circuit breaker settings, one breaker per upstream. Always on; these tune it.
    #[serde(default)]
    pub circuit_breaker: BreakerConfig,
    /// How many times a failed attempt may be retried, each time on an upstream not yet
    /// tried for this request (so at most the number of upstreams minus one). Default: 1.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Caps retries as a share of live traffic. Default: 20%, at least 3 per second.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// The answer when no upstream admits a request (all breakers open or all unhealthy).
    #[serde(default)]
    pub fallback: FallbackConfig,
    /// Overrides of the top-level `limits` for this service.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// JWT authentication: `required`, `optional` or `none`. Default: none.
    #[serde(default)]
    pub auth: AuthMode,
    /// Scopes the token must grant (`scope` or `scp` claim); missing ones get 403.
    #[serde(default)]
    pub required_scopes: Vec<String>,
    /// Replaces the top-level `security_headers` for this service.
    #[serde(default)]
    pub security_headers: Option<SecurityHeadersConfig>,
    /// CORS policy; preflights are answered by the gateway. Default: none (no CORS headers).
    #[serde(default)]
    pub cors: Option<CorsConfig>,
    /// Rate limit per client key. Default: none.
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Cache `GET`/`HEAD` responses. Default: none (not cached).
    #[serde(default)]
    pub cache: Option<ServiceCacheConfig>,
    /// Compress responses for clients that accept it. Default: none (sent as the upstream
    /// sent them).
    #[serde(default)]
    pub compression: Option<CompressionConfig>,
}

/// A listen address, `ip:port` (no host names: listeners bind to an interface).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(ListenAddr).map_err(|_| {
            de::Error::custom(format!(
                "invalid listen address {s:?}: expected ip:port, e.g. 0.0.0.0:8080"
            ))
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

fn default_true() -> bool {
    true
}
fn default_retries() -> u32 {
    1
}
fn default_listen() -> Vec<ListenAddr> {
    vec![ListenAddr(SocketAddr::from(([0, 0, 0, 0], 8080)))]
}
fn default_admin_listen() -> ListenAddr {
    ListenAddr(SocketAddr::from(([127, 0, 0, 1], 9090)))
}
fn default_threads() -> usize {
    1
}
fn default_grace_period() -> Duration {
    Duration::from_secs(10)
}
fn default_upgrade_sock() -> PathBuf {
    PathBuf::from("/tmp/breakwater_upgrade.sock")
}
fn default_pid_file() -> PathBuf {
    PathBuf::from("/tmp/breakwater.pid")
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(60)
}
