//! The YAML configuration: its schema (the public contract, documented field by field),
//! its defaults, and its validation. Errors name the file, line and field.
//!
//! Parsing happens in two steps. serde_yaml checks shapes, types and unknown fields, and the
//! field types below (durations, addresses, route prefixes) check their own values while they
//! are parsed, so those errors carry serde_yaml's line and column. Checks that span several
//! fields (duplicate routes) run afterwards and find their line by scanning the file's text.

use crate::cache::{BackendKind as CacheBackendKind, CacheConfig, ServiceCacheConfig};
use crate::edge::auth::{AuthConfig, AuthMode};
use crate::edge::cors::CorsConfig;
use crate::edge::rate_limit::{Backend as RateLimitBackend, RateLimitConfig};
use crate::edge::security_headers::SecurityHeadersConfig;
use crate::redis::RedisConfig;
pub use crate::values::{ByteSize, PathPrefix};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A configuration that failed to load: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted path to the field, e.g. `services.users.upstreams[0]`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": invalid config")?;
        if !self.field.is_empty() {
            write!(f, " at field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

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
    /// One JSON line per request on stdout. Default: true.
    #[serde(default = "default_true")]
    pub access_log: bool,
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
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
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
    /// SNI and certificate name for TLS upstreams. Default: the upstream's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// Verify the upstream's TLS certificate. Default: true.
    #[serde(default = "default_true")]
    pub tls_verify: bool,
    /// Circuit breaker settings, one breaker per upstream. Always on; these tune it.
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
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
}

/// `circuit_breaker:` of a service (see the README's state machine).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the breaker; 0 turns this trip off. Default: 5.
    pub failure_threshold: u32,
    /// Failure percentage over the rolling window that opens it; 0 turns this trip off.
    /// Default: 50.
    pub error_threshold_percentage: u32,
    /// Calls the rolling window must hold before the percentage counts. Default: 20.
    pub volume_threshold: u32,
    /// Span of the rolling window (10 buckets). Default: 10s.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub rolling_window: Duration,
    /// How long it stays open before admitting probes (half-open). Default: 30s.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub reset_timeout: Duration,
    /// The open time doubles each time a probe fails, up to this. Default: 5m.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub max_reset_timeout: Duration,
    /// Probe requests admitted at once while half-open. Default: 1.
    pub half_open_requests: u32,
    /// Probe successes that close it. Default: 1.
    pub success_threshold: u32,
    /// Upstream statuses that count as failures. Default: [500, 502, 503, 504].
    pub failure_statuses: Vec<u16>,
    /// A call slower than this (to the end of its response) counts as a failure.
    /// Default: none.
    #[serde(deserialize_with = "crate::values::de_opt_duration")]
    pub slow_call_threshold: Option<Duration>,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        let b = crate::upstream::breaker::BreakerConfig::default();
        CircuitBreakerConfig {
            failure_threshold: b.failure_threshold,
            error_threshold_percentage: b.error_threshold_percentage,
            volume_threshold: b.volume_threshold,
            rolling_window: b.rolling_window,
            reset_timeout: b.reset_timeout,
            max_reset_timeout: b.max_reset_timeout,
            half_open_requests: b.half_open_requests,
            success_threshold: b.success_threshold,
            failure_statuses: vec![500, 502, 503, 504],
            slow_call_threshold: None,
        }
    }
}

impl CircuitBreakerConfig {
    /// The breaker state machine's own settings.
    pub fn breaker(&self) -> crate::upstream::breaker::BreakerConfig {
        crate::upstream::breaker::BreakerConfig {
            failure_threshold: self.failure_threshold,
            error_threshold_percentage: self.error_threshold_percentage,
            volume_threshold: self.volume_threshold,
            rolling_window: self.rolling_window,
            reset_timeout: self.reset_timeout,
            max_reset_timeout: self.max_reset_timeout,
            half_open_requests: self.half_open_requests,
            success_threshold: self.success_threshold,
        }
    }
}

/// `retry_budget:` of a service, like Envoy's: retries in the last second may be at most
/// `percent` of the requests in it, but `min_per_second` are always allowed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    /// Default: 20.
    pub percent: u32,
    /// Default: 3.
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: 20,
            min_per_second: 3,
        }
    }
}

/// `fallback:` of a service: the immediate answer when no upstream admits the request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    /// Default: 503.
    pub status: u16,
    /// Default: `application/json`.
    pub content_type: String,
    /// Default: `{"error": "<service> service unavailable"}`.
    pub body: Option<String>,
    /// Extra response headers. `Retry-After` is added (seconds until the next half-open)
    /// unless set here.
    pub headers: BTreeMap<String, String>,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig {
            status: 503,
            content_type: "application/json".into(),
            body: None,
            headers: BTreeMap::new(),
        }
    }
}

/// One route of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched on segment boundaries (`/users` matches `/users` and `/users/1`,
    /// not `/usersx`). The longest matching prefix wins.
    pub path_prefix: PathPrefix,
    /// Optional host: exact (`api.example.com`) or wildcard (`*.example.com`). Routes with a
    /// host win over routes without one for the same prefix.
    #[serde(default)]
    pub host: Option<HostPattern>,
    /// Remove the prefix before forwarding (`/users/1` -> `/1`). Default: false.
    #[serde(default)]
    pub strip_prefix: bool,
}

/// Upstream selection algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Weighted random.
    Random,
    /// Ketama consistent hashing over `hash_key`.
    ConsistentHash,
    /// Power of two random choices over each upstream's requests in flight.
    LeastRequest,
}

/// What `consistent_hash` hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    #[default]
    Ip,
    /// The request path.
    Path,
    /// A request header (falls back to the client IP when absent).
    Header(String),
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "ip" => Ok(HashKey::Ip),
            "path" => Ok(HashKey::Path),
            _ => match s.strip_prefix("header:") {
                Some(name) if http::HeaderName::from_bytes(name.as_bytes()).is_ok() => {
                    Ok(HashKey::Header(name.to_ascii_lowercase()))
                }
                _ => Err(de::Error::custom(format!(
                    "invalid hash_key {s:?}: expected ip, path or header:NAME"
                ))),
            },
        }
    }
}

/// `timeouts:` of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP (and TLS) connect. Default: 1s.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub connect: Duration,
    /// Longest wait for each read from the upstream (the response header, then each body
    /// chunk). Default: 30s.
    #[serde(
        default = "default_read_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub read: Duration,
    /// Longest wait for each write to the upstream. Default: 30s.
    #[serde(
        default = "default_read_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub write: Duration,
    /// Budget counted from the request's arrival: each attempt's connect, read and write
    /// timeouts are capped at the time left when it starts, and no retry starts once it
    /// is spent. Default: none.
    #[serde(default, deserialize_with = "crate::values::de_opt_duration")]
    pub total: Option<Duration>,
    /// How long an idle upstream connection is kept for reuse. Default: 60s.
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: default_connect_timeout(),
            read: default_read_timeout(),
            write: default_read_timeout(),
            total: None,
            idle: default_idle_timeout(),
        }
    }
}

/// `health_check:` of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path requested with `GET`; any 2xx passes. Default: `/health`.
    #[serde(default = "default_health_path")]
    pub path: PathPrefix,
    /// Time between checks. Default: 5s.
    #[serde(
        default = "default_health_interval",
        deserialize_with = "crate::values::de_duration"
    )]
    pub interval: Duration,
    /// Connect and read timeout of one check. Default: 1s.
    #[serde(
        default = "default_health_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub timeout: Duration,
    /// `Host` header sent with every upstream's check. Default: the first upstream's
    /// `host:port` as written.
    #[serde(default)]
    pub host: Option<String>,
    /// Consecutive passes that make an unhealthy upstream healthy. Default: 1.
    #[serde(default = "default_one")]
    pub healthy_threshold: usize,
    /// Consecutive failures that make a healthy upstream unhealthy. Default: 1.
    #[serde(default = "default_one")]
    pub unhealthy_threshold: usize,
}

/// An upstream: `"host:port"` or `{addr: "host:port", weight: N}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// As written in the file (`host:port`), used in metric labels and logs.
    pub name: String,
    /// Resolved when the file is loaded.
    pub addr: SocketAddr,
    /// Relative share of traffic, 1 to 1000. Default: 1.
    pub weight: usize,
    /// Why `name` is not a usable address, reported by validation.
    addr_error: Option<String>,
}

impl<'de> Deserialize<'de> for UpstreamSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Read as a plain value first, so a typo in the long form gets a precise message
        // rather than serde's "did not match any variant".
        let (name, weight) = match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::String(addr) => (addr, 1),
            serde_yaml::Value::Mapping(map) => {
                let mut addr = None;
                let mut weight = 1;
                for (k, v) in map {
                    match (k.as_str(), v) {
                        (Some("addr"), serde_yaml::Value::String(a)) => addr = Some(a),
                        (Some("weight"), serde_yaml::Value::Number(n)) => {
                            weight = n.as_u64().map_or(0, |w| w as usize)
                        }
                        (Some("addr" | "weight"), other) => {
                            return Err(de::Error::custom(format!(
                                "invalid value {other:?} for an upstream's addr or weight"
                            )))
                        }
                        (key, _) => {
                            return Err(de::Error::custom(format!(
                                "unknown field `{}` in upstream, expected `addr` or `weight`",
                                key.unwrap_or("?")
                            )))
                        }
                    }
                }
                let addr =
                    addr.ok_or_else(|| de::Error::custom("upstream is missing its `addr` field"))?;
                (addr, weight)
            }
            _ => {
                return Err(de::Error::custom(
                    "an upstream is \"host:port\" or {addr: \"host:port\", weight: N}",
                ))
            }
        };
        if !(1..=1000).contains(&weight) {
            return Err(de::Error::custom(format!(
                "weight {weight} of upstream {name:?} is out of range 1..=1000"
            )));
        }
        // An address that does not resolve is reported by `validate`, which can name the
        // list entry and its line; serde_yaml would only point at the start of the list.
        let (addr, addr_error) = match resolve_host_port(&name) {
            Ok(addr) => (addr, None),
            Err(e) => (SocketAddr::from(([0, 0, 0, 0], 0)), Some(e)),
        };
        Ok(UpstreamSpec {
            name,
            addr,
            weight,
            addr_error,
        })
    }
}

/// Parses `host:port` (or `ip:port`, `[v6]:port`) and resolves it once.
fn resolve_host_port(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = || format!("invalid upstream address {s:?}: expected host:port");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains('/') || host.contains(' ') {
        return Err(bad());
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve upstream {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("upstream {s:?} resolves to no address"))
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

/// A route host: exact, or `*.suffix` for any subdomain of suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// Stored with its leading dot: `*.example.com` -> `.example.com`.
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (already lower-case, port removed) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?.to_ascii_lowercase();
        let valid_name = |h: &str| {
            !h.is_empty()
                && h.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        if let Some(suffix) = s.strip_prefix("*.") {
            if valid_name(suffix) {
                return Ok(HostPattern::Wildcard(format!(".{suffix}")));
            }
        } else if valid_name(&s) {
            return Ok(HostPattern::Exact(s));
        }
        Err(de::Error::custom(format!(
            "invalid host {s:?}: expected a host name like api.example.com or *.example.com"
        )))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

/// `limits:` at the top level, or a service's override of some of its fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body; larger ones get `413`. Default: 10MiB.
    #[serde(default)]
    pub max_body_size: Option<ByteSize>,
    /// Largest request header block (request line and all headers); larger ones get `431`.
    /// Pingora itself refuses anything over 1MiB while reading. Default: 32KiB.
    #[serde(default)]
    pub max_header_size: Option<ByteSize>,
    /// Longest wait for each read of a client's request body once its header arrived, so a
    /// client that trickles its body cannot hold a request open. Default: 10s.
    #[serde(default, deserialize_with = "crate::values::de_opt_duration")]
    pub header_read_timeout: Option<Duration>,
}

/// Limits in force for one service: its own fields, else the top-level ones, else defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body_size: u64,
    pub max_header_size: u64,
    pub header_read_timeout: Duration,
}

impl LimitsConfig {
    /// `self` (a service's override) over `global` over the defaults.
    pub fn resolve(&self, global: &LimitsConfig) -> Limits {
        Limits {
            max_body_size: self
                .max_body_size
                .or(global.max_body_size)
                .map_or(10 << 20, |b| b.0),
            max_header_size: self
                .max_header_size
                .or(global.max_header_size)
                .map_or(32 << 10, |b| b.0),
            header_read_timeout: self
                .header_read_timeout
                .or(global.header_read_timeout)
                .unwrap_or(Duration::from_secs(10)),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_one() -> usize {
    1
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
fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_health_path() -> PathPrefix {
    PathPrefix("/health".into())
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: None,
            column: None,
            field: String::new(),
            message: format!("cannot read file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = serde_yaml::from_str(text).map_err(|e| yaml_error(e, path, text))?;
        config.validate(text, path)?;
        Ok(config)
    }

    fn validate(&self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let fail = |field: String, needle: Option<&str>, message: String| {
            let line = locate(text, &field, needle);
            ConfigError {
                file: path.to_path_buf(),
                line,
                column: None,
                field,
                message,
            }
        };
        if self.services.is_empty() {
            return Err(fail(
                "services".into(),
                None,
                "at least one service is required".into(),
            ));
        }
        if self.server.listen.is_empty() && self.server.tls.is_empty() {
            return Err(fail(
                "server.listen".into(),
                None,
                "at least one listener (server.listen or server.tls) is required".into(),
            ));
        }
        if self.server.threads == 0 || self.server.threads > 256 {
            return Err(fail(
                "server.threads".into(),
                None,
                format!("threads must be 1..=256, got {}", self.server.threads),
            ));
        }
        for (i, tls) in self.server.tls.iter().enumerate() {
            for (what, file) in [("cert", &tls.cert), ("key", &tls.key)] {
                if let Err(e) = std::fs::File::open(file) {
                    return Err(fail(
                        format!("server.tls[{i}].{what}"),
                        Some(&file.display().to_string()),
                        format!("cannot read {}: {e}", file.display()),
                    ));
                }
            }
        }
        let mut listeners = HashSet::new();
        let all_listeners = self
            .server
            .listen
            .iter()
            .chain(self.server.tls.iter().map(|t| &t.listen))
            .chain(std::iter::once(&self.admin.listen));
        for l in all_listeners {
            if l.0.port() != 0 && !listeners.insert(l.0) {
                return Err(fail(
                    "server.listen".into(),
                    Some(&l.to_string()),
                    format!("address {l} is used by two listeners"),
                ));
            }
        }
        if let Err(e) = self.auth.validate() {
            return Err(fail("auth".into(), None, e));
        }
        if let Err(e) = self.security_headers.validate() {
            return Err(fail("security_headers".into(), None, e));
        }
        if let Some(Err(e)) = self.redis.as_ref().map(crate::redis::Redis::new) {
            return Err(fail("redis".into(), None, e));
        }
        if self.cache.backend == CacheBackendKind::Redis && self.redis.is_none() {
            return Err(fail(
                "cache.backend".into(),
                Some("backend"),
                "backend redis needs the top-level redis: {url: ...}".into(),
            ));
        }
        let mut seen_routes: std::collections::HashMap<(Option<HostPattern>, String), &str> =
            std::collections::HashMap::new();
        for (name, svc) in &self.services {
            let field = |rest: &str| format!("services.{name}{rest}");
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(fail(
                    field(""),
                    None,
                    format!("service name {name:?} may only hold letters, digits, '-' and '_'"),
                ));
            }
            if svc.routes.is_empty() {
                return Err(fail(
                    field(".routes"),
                    None,
                    "a service needs at least one route".into(),
                ));
            }
            if svc.upstreams.is_empty() {
                return Err(fail(
                    field(".upstreams"),
                    None,
                    "a service needs at least one upstream".into(),
                ));
            }
            let mut upstream_names = HashSet::new();
            for (i, u) in svc.upstreams.iter().enumerate() {
                if let Some(e) = &u.addr_error {
                    // Prefer the quoted form, so "10.0.0.1" is not found inside "10.0.0.1:80".
                    let quoted = format!("\"{}\"", u.name);
                    let needle = if text.contains(&quoted) {
                        quoted.as_str()
                    } else {
                        u.name.as_str()
                    };
                    return Err(fail(
                        field(&format!(".upstreams[{i}]")),
                        Some(needle),
                        e.clone(),
                    ));
                }
                if !upstream_names.insert(u.addr) {
                    return Err(fail(
                        field(&format!(".upstreams[{i}]")),
                        Some(&u.name),
                        format!("upstream {} is listed twice", u.name),
                    ));
                }
            }
            for (i, r) in svc.routes.iter().enumerate() {
                let key = (r.host.clone(), r.path_prefix.0.clone());
                if let Some(other) = seen_routes.insert(key, name) {
                    let host = r
                        .host
                        .as_ref()
                        .map(|h| format!(" host {h}"))
                        .unwrap_or_default();
                    return Err(fail(
                        field(&format!(".routes[{i}].path_prefix")),
                        Some(&r.path_prefix.0),
                        format!(
                            "duplicate route: path_prefix {}{host} is already routed to service {other}",
                            r.path_prefix.0
                        ),
                    ));
                }
            }
            if let Some(hc) = &svc.health_check {
                if hc.interval.is_zero() || hc.timeout.is_zero() {
                    return Err(fail(
                        field(".health_check"),
                        None,
                        "interval and timeout must be greater than zero".into(),
                    ));
                }
                if hc.healthy_threshold == 0 || hc.unhealthy_threshold == 0 {
                    return Err(fail(
                        field(".health_check"),
                        None,
                        "healthy_threshold and unhealthy_threshold must be at least 1".into(),
                    ));
                }
            }
            if svc.auth != AuthMode::None && self.auth.jwt.is_none() {
                return Err(fail(
                    field(".auth"),
                    None,
                    "auth is required or optional but the top-level auth.jwt is not configured"
                        .into(),
                ));
            }
            if let Err(e) = crate::edge::auth::validate_scopes(&svc.required_scopes) {
                return Err(fail(field(".required_scopes"), None, e));
            }
            if !svc.required_scopes.is_empty() && svc.auth == AuthMode::None {
                return Err(fail(
                    field(".required_scopes"),
                    None,
                    "required_scopes needs auth: required or optional".into(),
                ));
            }
            if let Some(Err(e)) = svc.cors.as_ref().map(CorsConfig::validate) {
                return Err(fail(field(".cors"), None, e));
            }
            if let Some(Err(e)) = svc
                .security_headers
                .as_ref()
                .map(SecurityHeadersConfig::validate)
            {
                return Err(fail(field(".security_headers"), None, e));
            }
            if let Some(rl) = &svc.rate_limit {
                if rl.backend == RateLimitBackend::Redis && self.redis.is_none() {
                    return Err(fail(
                        field(".rate_limit.backend"),
                        Some("backend"),
                        "backend redis needs the top-level redis: {url: ...}".into(),
                    ));
                }
            }
            let cb = &svc.circuit_breaker;
            if cb.error_threshold_percentage > 100 {
                return Err(fail(
                    field(".circuit_breaker.error_threshold_percentage"),
                    None,
                    format!("must be 0..=100, got {}", cb.error_threshold_percentage),
                ));
            }
            if cb.half_open_requests == 0 || cb.success_threshold == 0 {
                return Err(fail(
                    field(".circuit_breaker"),
                    None,
                    "half_open_requests and success_threshold must be at least 1".into(),
                ));
            }
            if cb.reset_timeout.is_zero() || cb.rolling_window.is_zero() {
                return Err(fail(
                    field(".circuit_breaker"),
                    None,
                    "reset_timeout and rolling_window must be greater than zero".into(),
                ));
            }
            if cb.max_reset_timeout < cb.reset_timeout {
                return Err(fail(
                    field(".circuit_breaker.max_reset_timeout"),
                    None,
                    "max_reset_timeout must not be shorter than reset_timeout".into(),
                ));
            }
            if let Some(bad) = cb
                .failure_statuses
                .iter()
                .find(|s| !(100..=599).contains(*s))
            {
                return Err(fail(
                    field(".circuit_breaker.failure_statuses"),
                    None,
                    format!("{bad} is not an HTTP status"),
                ));
            }
            if !(100..=599).contains(&svc.fallback.status) {
                return Err(fail(
                    field(".fallback.status"),
                    None,
                    format!("{} is not an HTTP status", svc.fallback.status),
                ));
            }
            if http::HeaderValue::from_str(&svc.fallback.content_type).is_err() {
                return Err(fail(
                    field(".fallback.content_type"),
                    None,
                    "not a valid header value".into(),
                ));
            }
            for (name, value) in &svc.fallback.headers {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err()
                    || http::HeaderValue::from_str(value).is_err()
                {
                    return Err(fail(
                        field(".fallback.headers"),
                        Some(name),
                        format!("invalid header {name}: {value}"),
                    ));
                }
            }
            if svc.retries > 10 {
                return Err(fail(
                    field(".retries"),
                    None,
                    format!("at most 10 retries, got {}", svc.retries),
                ));
            }
            if svc.timeouts.connect.is_zero() || svc.timeouts.read.is_zero() {
                return Err(fail(
                    field(".timeouts"),
                    None,
                    "connect and read timeouts must be greater than zero".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Turns a serde_yaml error into ours, keeping its location and field path.
fn yaml_error(e: serde_yaml::Error, path: &Path, text: &str) -> ConfigError {
    let (line, column) = match e.location() {
        Some(loc) => (Some(loc.line()), Some(loc.column())),
        None => (None, None),
    };
    let mut message = e.to_string();
    if let Some(pos) = message.rfind(" at line ") {
        message.truncate(pos);
    }
    // serde_yaml prefixes the message with the field path ("services.users: ..."), except at
    // the top level.
    let (field, message) = match message.split_once(": ") {
        Some((field, rest))
            if !field.contains(' ') && !field.is_empty() && !field.contains('`') =>
        {
            (field.to_string(), rest.to_string())
        }
        _ => (String::new(), message),
    };
    // Errors raised by a field's own parser (durations, sizes, hosts) carry the path of the
    // enclosing mapping and point at its start; find the key whose value the message quotes.
    // Unknown fields point at the key itself. Upstream entries are named by `validate`.
    let (field, line) = if field.ends_with("upstreams") {
        (field, line)
    } else if let Some((key, key_line)) = key_of_value(text, line, &message) {
        (join_field(field, key), Some(key_line))
    } else if let Some(key) = key_at(text, line, column) {
        (join_field(field, key), line)
    } else {
        (field, line)
    };
    ConfigError {
        file: path.to_path_buf(),
        line,
        column,
        field,
        message,
    }
}

fn join_field(field: String, key: &str) -> String {
    if field.is_empty() {
        key.to_string()
    } else if field.ends_with(key) {
        field
    } else {
        format!("{field}.{key}")
    }
}

/// The key (and its 1-based line) whose value is the one quoted in `message`, searched from
/// the error's line through the rest of that mapping (deeper or equally indented lines).
fn key_of_value<'t>(text: &'t str, line: Option<usize>, message: &str) -> Option<(&'t str, usize)> {
    let value = message.split('"').nth(1).filter(|v| !v.is_empty())?;
    let start = line? - 1;
    let indent = |row: &str| row.len() - row.trim_start().len();
    let first_indent = indent(text.lines().nth(start)?);
    for (i, row) in text.lines().enumerate().skip(start) {
        if i > start && !row.trim().is_empty() && indent(row) < first_indent {
            break;
        }
        let at = row
            .find(&format!(": {value}"))
            .or_else(|| row.find(&format!(": \"{value}\"")))
            .or_else(|| row.find(&format!(": '{value}'")));
        if let Some(at) = at {
            let before = &row[..at];
            let from = before
                .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .map_or(0, |i| i + 1);
            let key = &before[from..];
            if !key.is_empty() {
                return Some((key, i + 1));
            }
        }
    }
    None
}

/// The mapping key written at a 1-based line and column, if one starts there.
fn key_at(text: &str, line: Option<usize>, column: Option<usize>) -> Option<&str> {
    let rest = text.lines().nth(line? - 1)?.get(column? - 1..)?;
    let end = rest
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .unwrap_or(rest.len());
    let key = &rest[..end];
    let after = rest[end..].trim_start();
    (!key.is_empty() && after.starts_with(':')).then_some(key)
}

/// Finds the 1-based line of a field in the YAML text, for checks that run after parsing.
///
/// Walks the dotted path key by key through block-style mappings, then, when `needle` is
/// given, looks for the value from there on (this also covers flow style such as
/// `routes: [{path_prefix: /a}]`). Best effort: `None` when the text is too unusual.
fn locate(text: &str, field: &str, needle: Option<&str>) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0;
    let keys = field
        .split('.')
        .map(|k| k.split('[').next().unwrap_or(k))
        .filter(|k| !k.is_empty());
    for key in keys {
        let pattern = format!("{key}:");
        let found = lines.iter().enumerate().skip(from).find(|(_, l)| {
            let t = l
                .trim_start()
                .trim_start_matches("- ")
                .trim_start_matches('{');
            t.starts_with(&pattern) || l.contains(&format!(" {pattern}"))
        });
        match found {
            Some((i, _)) => from = i,
            None => break,
        }
    }
    if let Some(needle) = needle {
        if let Some((i, _)) = lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| l.contains(needle))
        {
            return Some(i + 1);
        }
    }
    Some(from + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.yaml"))
    }

    #[test]
    fn minimal_service_takes_defaults() {
        let c = parse(
            "services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n",
        )
        .unwrap();
        assert!(c.access_log);
        assert_eq!(c.admin.listen.0, "127.0.0.1:9090".parse().unwrap());
        let a = &c.services["a"];
        assert_eq!(a.load_balancing, Algorithm::RoundRobin);
        assert_eq!(a.timeouts.connect, Duration::from_secs(1));
        assert_eq!(a.upstreams[0].weight, 1);
        assert!(a.health_check.is_none());
    }

    #[test]
    fn full_example_parses() {
        let c = parse(
            r#"
server:
  listen: ["0.0.0.0:8080"]
  tls: []
  threads: 1
admin:
  listen: "127.0.0.1:9090"
access_log: true
services:
  users:
    routes:
      - path_prefix: /users
        host: "*.example.com"
    upstreams: ["127.0.0.1:3001", {addr: "127.0.0.1:3003", weight: 3}]
    load_balancing: consistent_hash
    hash_key: header:X-User-Id
    timeouts: {connect: 1s, read: 3s, total: 5s}
    health_check: {path: /health, interval: 15s, timeout: 1s}
  orders:
    routes: [{path_prefix: /orders, strip_prefix: true}]
    upstreams: ["localhost:3002"]
    timeouts: {connect: 500ms, read: 5s}
"#,
        )
        .unwrap();
        let users = &c.services["users"];
        assert_eq!(users.upstreams[1].weight, 3);
        assert_eq!(users.hash_key, HashKey::Header("x-user-id".into()));
        assert_eq!(users.timeouts.total, Some(Duration::from_secs(5)));
        assert_eq!(
            users.routes[0].host,
            Some(HostPattern::Wildcard(".example.com".into()))
        );
        assert_eq!(
            c.services["orders"].timeouts.connect,
            Duration::from_millis(500)
        );
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let e = parse("services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    retrys: 3\n")
            .unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert_eq!(e.field, "services.a.retrys", "{e}");
        assert!(e.message.contains("retrys"), "{e}");
        assert!(e.to_string().starts_with("test.yaml:5:"), "{e}");
    }

    #[test]
    fn bad_address_names_line_and_field() {
        let e = parse("services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams:\n      - \"127.0.0.1\"\n")
            .unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.field.starts_with("services.a.upstreams"), "{e}");
        assert!(e.message.contains("host:port"), "{e}");
    }

    #[test]
    fn errors_of_a_fields_own_parser_name_that_field_in_block_and_flow_style() {
        let block = "services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    timeouts:\n      connect: 1s\n      read: soon\n";
        let e = parse(block).unwrap_err();
        assert_eq!(e.field, "services.a.timeouts.read", "{e}");
        assert_eq!(e.line, Some(7), "{e}");
        let flow = "services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    timeouts: {connect: 1s, read: soon}\n";
        let e = parse(flow).unwrap_err();
        assert_eq!(e.field, "services.a.timeouts.read", "{e}");
        let top = "server:\n  threads: 2\n  grace_period: soon\nservices:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n";
        let e = parse(top).unwrap_err();
        assert_eq!(e.field, "server.grace_period", "{e}");
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn bad_duration_is_rejected() {
        let e = parse("services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    timeouts: {connect: soon}\n")
            .unwrap_err();
        assert_eq!(e.line, Some(5), "{e}");
        assert!(e.message.contains("invalid duration"), "{e}");
    }

    #[test]
    fn duplicate_route_is_rejected_with_its_line() {
        let e = parse("services:\n  a:\n    routes: [{path_prefix: /x}]\n    upstreams: [\"127.0.0.1:1\"]\n  b:\n    routes:\n      - path_prefix: /x\n    upstreams: [\"127.0.0.1:2\"]\n")
            .unwrap_err();
        assert_eq!(e.field, "services.b.routes[0].path_prefix", "{e}");
        assert_eq!(e.line, Some(7), "{e}");
        assert!(e.message.contains("duplicate route"), "{e}");
    }

    #[test]
    fn same_prefix_on_other_host_is_allowed() {
        parse("services:\n  a:\n    routes: [{path_prefix: /x}]\n    upstreams: [\"127.0.0.1:1\"]\n  b:\n    routes: [{path_prefix: /x, host: b.example.com}]\n    upstreams: [\"127.0.0.1:2\"]\n")
            .unwrap();
    }

    #[test]
    fn empty_routes_and_upstreams_are_rejected() {
        let e = parse("services:\n  a:\n    routes: []\n    upstreams: [\"127.0.0.1:1\"]\n")
            .unwrap_err();
        assert_eq!(e.field, "services.a.routes");
        assert_eq!(e.line, Some(3));
        let e = parse("services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: []\n")
            .unwrap_err();
        assert_eq!(e.field, "services.a.upstreams");
    }

    #[test]
    fn path_prefix_must_start_with_slash() {
        let e = parse("services:\n  a:\n    routes: [{path_prefix: users}]\n    upstreams: [\"127.0.0.1:1\"]\n")
            .unwrap_err();
        assert!(e.message.contains("must start with '/'"), "{e}");
        assert_eq!(e.line, Some(3));
    }

    #[test]
    fn service_limits_override_global_ones() {
        let c = parse("limits: {max_body_size: 1KiB}\nservices:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    limits: {max_header_size: 8KiB}\n  b:\n    routes: [{path_prefix: /b}]\n    upstreams: [\"127.0.0.1:2\"]\n")
            .unwrap();
        let a = c.services["a"].limits.resolve(&c.limits);
        assert_eq!(a.max_body_size, 1024);
        assert_eq!(a.max_header_size, 8192);
        let b = c.services["b"].limits.resolve(&c.limits);
        assert_eq!(b.max_header_size, 32 << 10);
        assert_eq!(b.header_read_timeout, Duration::from_secs(10));
    }

    #[test]
    fn wildcard_host_matches_subdomains_only() {
        let p = HostPattern::Wildcard(".example.com".into());
        assert!(p.matches("api.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
    }
}
