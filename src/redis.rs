//! The shared Redis connection: owns the `redis:` config section, the fred client pool every
//! Redis-backed feature (rate limiting, the response cache) issues its commands through,
//! the background service that connects it inside Pingora's runtime and keeps it reconnecting,
//! and the accounting of Redis errors (`breakwater_redis_errors_total{op}` plus a rate-limited
//! warning).
//!
//! Redis is an optional dependency of the request path, never a hard one:
//! [`RedisConfig::compile`] does no I/O (so it is safe before Pingora daemonises and forks, and
//! in `check`), start-up never waits for Redis,
//! the pool reconnects forever with capped backoff, and [`Redis::commands`] fails a command at
//! once while its connection is down and after `command_timeout` otherwise, so a dead Redis
//! costs a request at most that long. Callers decide what a failure means (fail open/closed).

use fred::prelude::{
    ClientLike, Config as FredConfig, ConnectionConfig, Options, PerformanceConfig, Pool,
    ReconnectPolicy, TcpConfig,
};
use fred::types::config::UnresponsiveConfig;
use fred::types::Builder;
use once_cell::sync::Lazy;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::{IntCounterVec, Opts};
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Reconnect backoff: doubles from the minimum up to the cap, then retries at the cap forever.
const RECONNECT_MIN_DELAY_MS: u32 = 100;
const RECONNECT_MAX_DELAY_MS: u32 = 2_000;
/// At most one warning line per op in this interval; the counter still sees every error.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// `redis:` section (top level). Needed by any feature configured with `backend: redis`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Where Redis is: `redis://[user:password@]host[:port][/db]`, `rediss://` for TLS, or a
    /// Redis Cluster as `redis-cluster://host:port[?node=host2:port2...]` (also spelled
    /// `redis+cluster://`; `rediss-cluster://` for TLS). One node of a cluster is enough; the
    /// others are discovered. Default: `redis://127.0.0.1:6379`.
    pub url: String,
    /// Connections kept open; commands are spread round robin over the connected ones.
    /// Default: 4.
    pub pool_size: usize,
    /// Longest a command may take before the caller gets an error (and e.g. a rate limit
    /// fails open). Default: 250ms.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub command_timeout: Duration,
    /// Longest a TCP (and TLS) connect to Redis may take before it counts as failed and is
    /// retried with backoff. Default: 1s.
    #[serde(deserialize_with = "crate::values::de_duration")]
    pub connect_timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".to_string(),
            pool_size: 4,
            command_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// URL schemes fred is built to connect with here (no sentinel or unix-socket features).
const SCHEMES: &[&str] = &[
    "redis",
    "rediss",
    "valkey",
    "valkeys",
    "redis-cluster",
    "rediss-cluster",
    "valkey-cluster",
    "valkeys-cluster",
];

/// fred spells a cluster scheme `redis-cluster`; `redis+cluster` is the other common spelling.
fn normalize_url(url: &str) -> String {
    for (alias, scheme) in [
        ("redis+cluster://", "redis-cluster://"),
        ("rediss+cluster://", "rediss-cluster://"),
    ] {
        if let Some(rest) = url.strip_prefix(alias) {
            return format!("{scheme}{rest}");
        }
    }
    url.to_string()
}

/// A cheaply cloneable handle on the shared Redis pool.
#[derive(Clone)]
pub struct Redis {
    pool: Pool,
    /// The pool with this gateway's per-command options applied.
    commands: fred::clients::WithOptions<Pool>,
    command_timeout: Duration,
    /// Set by the first [`RedisConnector`] start, so a second start cannot spawn a second set
    /// of connection tasks.
    started: Arc<AtomicBool>,
    /// What readiness needs to know (behind one pointer, so the handle stays small).
    readiness: Arc<ReadinessState>,
}

#[derive(Debug, Default)]
struct ReadinessState {
    /// When the connector started: readiness waits up to `connect_timeout` from then.
    started_at: std::sync::OnceLock<Instant>,
    /// Latched once a connection was up: readiness never goes back to waiting.
    ever_connected: AtomicBool,
    connect_timeout: Duration,
}

/// What readiness makes of Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisReadiness {
    /// No connection yet and `connect_timeout` has not passed since start: not ready.
    Waiting,
    Connected,
    /// Ready without Redis (features fall back as configured), after the first connection
    /// or `connect_timeout` since start.
    Degraded,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("pool_size", &self.pool.size())
            .field("command_timeout", &self.command_timeout)
            .finish()
    }
}

impl RedisConfig {
    /// Compiles the section into the shared pool, without connecting: no I/O and no tasks, so
    /// it may run before Pingora forks, outside any tokio runtime, and in `check`.
    /// [`RedisConnector`] connects it once the server runs.
    pub fn compile(&self) -> Result<Redis, String> {
        let cfg = self;
        if cfg.pool_size == 0 {
            return Err("redis.pool_size must be at least 1".to_string());
        }
        if cfg.command_timeout.is_zero() {
            return Err("redis.command_timeout must be more than 0".to_string());
        }
        if cfg.connect_timeout.is_zero() {
            return Err("redis.connect_timeout must be more than 0".to_string());
        }
        // Only the scheme is echoed back: the URL may carry a password.
        let url = normalize_url(&cfg.url);
        let scheme = url.split_once("://").map_or("", |(scheme, _)| scheme);
        if !SCHEMES.contains(&scheme) {
            return Err(format!(
                "invalid redis.url: unsupported scheme {scheme:?} (expected one of {})",
                SCHEMES.join(", ")
            ));
        }
        let mut config = FredConfig::from_url(&url)
            .map_err(|e| format!("invalid redis.url (scheme {scheme:?}): {}", e.details()))?;
        // Redis being down at start-up is an outage to ride out, not a config error: the first
        // connect goes through the same reconnect policy as later ones.
        config.fail_fast = false;

        let mut builder = Builder::from_config(config);
        builder.set_policy(ReconnectPolicy::new_exponential(
            0, // retry forever
            RECONNECT_MIN_DELAY_MS,
            RECONNECT_MAX_DELAY_MS,
            2,
        ));
        builder.with_connection_config(|c: &mut ConnectionConfig| {
            c.connection_timeout = cfg.connect_timeout;
            c.internal_command_timeout = cfg.connect_timeout.max(cfg.command_timeout);
            c.tcp = TcpConfig {
                nodelay: Some(true),
                ..TcpConfig::default()
            };
            // A connection that stops answering (a partition rather than a clean close) is
            // dropped and reconnected instead of timing out every command forever.
            let max_timeout = (cfg.command_timeout * 4).max(Duration::from_secs(1));
            c.unresponsive = UnresponsiveConfig {
                max_timeout: Some(max_timeout),
                interval: (max_timeout / 4).max(Duration::from_millis(50)),
            };
        });
        builder.with_performance_config(|p: &mut PerformanceConfig| {
            p.default_command_timeout = cfg.command_timeout;
        });
        let pool = builder
            .build_pool(cfg.pool_size)
            .map_err(|e| format!("redis: {}", e.details()))?;
        let commands = pool.with_options(&Options {
            timeout: Some(cfg.command_timeout),
            // While a connection is down, answer at once rather than queue until the timeout;
            // this also returns write errors to the caller instead of replaying the command.
            // (`max_attempts: 1` would be the other way, but fred's cluster routing spends an
            // attempt before the write, so it fails every command on a cluster.)
            fail_fast: true,
            ..Options::default()
        });
        Ok(Redis {
            pool,
            commands,
            command_timeout: cfg.command_timeout,
            started: Arc::new(AtomicBool::new(false)),
            readiness: Arc::new(ReadinessState {
                connect_timeout: cfg.connect_timeout,
                ..ReadinessState::default()
            }),
        })
    }
}

impl Redis {
    /// The pool with the gateway's command options: `command_timeout`, fail fast while
    /// disconnected, no replay. Use this on the request path; it implements fred's
    /// `ClientLike` (`custom`, ...) and the command interfaces that `WithOptions` supports.
    pub fn commands(&self) -> &fred::clients::WithOptions<Pool> {
        &self.commands
    }

    /// The bare pool, for callers that need options of their own.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Whether at least one pooled connection is up right now.
    pub fn is_connected(&self) -> bool {
        self.pool.clients().iter().any(|c| c.is_connected())
    }

    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// Whether the process may report ready as far as Redis goes: once the first connection
    /// is up, or once `connect_timeout` has passed since the connector started.
    pub fn readiness(&self) -> RedisReadiness {
        let state = &self.readiness;
        if self.is_connected() {
            state.ever_connected.store(true, Ordering::Release);
            return RedisReadiness::Connected;
        }
        let waited_enough = state
            .started_at
            .get()
            .is_some_and(|t| t.elapsed() >= state.connect_timeout);
        if state.ever_connected.load(Ordering::Acquire) || waited_enough {
            RedisReadiness::Degraded
        } else {
            RedisReadiness::Waiting
        }
    }

    /// Spawns the pool's connection tasks on the current tokio runtime without waiting for
    /// them to connect, and returns the task that ends when they all stop. `None` if it was
    /// already started.
    fn spawn_connections(&self) -> Option<tokio::task::JoinHandle<Result<(), fred::error::Error>>> {
        if self.started.swap(true, Ordering::SeqCst) {
            return None;
        }
        let _ = self.readiness.started_at.set(Instant::now());
        Some(self.pool.connect())
    }
}

/// Pingora background service that connects the pool inside Pingora's runtime and keeps its
/// connection tasks running until shutdown; commands are then issued from the proxy's worker
/// runtimes. Add it with `pingora::services::background::background_service("redis",
/// RedisConnector(redis.clone()))`.
pub struct RedisConnector(pub Redis);

#[async_trait::async_trait]
impl BackgroundService for RedisConnector {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut connections) = self.0.spawn_connections() else {
            log::warn!("redis connector started twice; the second start does nothing");
            return;
        };
        log::info!("redis: connecting ({} connections)", self.0.pool.size());
        tokio::select! {
            _ = shutdown.changed() => {
                // QUIT closes the connections; their tasks then end on their own.
                let _ = self.0.pool.quit().await;
                let _ = tokio::time::timeout(Duration::from_secs(1), &mut connections).await;
            }
            ended = &mut connections => {
                // With an unlimited reconnect policy this only happens on a bug or a QUIT.
                match ended {
                    Ok(Ok(())) => log::warn!("redis: connection tasks ended"),
                    Ok(Err(e)) => log::error!("redis: connection tasks ended: {e}"),
                    Err(e) => log::error!("redis: connection task failed: {e}"),
                }
            }
        }
    }
}

static REDIS_ERRORS: Lazy<IntCounterVec> = Lazy::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "breakwater_redis_errors_total",
            "Failed Redis commands (errors, timeouts, Redis down), by the operation that issued them.",
        ),
        &["op"],
    )
    .expect("valid metric definition");
    crate::ops::metrics::METRICS
        .registry
        .register(Box::new(c.clone()))
        .expect("breakwater_redis_errors_total registered once");
    c
});

static REDIS_UP: Lazy<prometheus::IntGauge> = Lazy::new(|| {
    let g = prometheus::IntGauge::new(
        "breakwater_redis_up",
        "Whether at least one pooled Redis connection is up (1) or none is (0), read at scrape time.",
    )
    .expect("valid metric definition");
    crate::ops::metrics::METRICS
        .registry
        .register(Box::new(g.clone()))
        .expect("breakwater_redis_up registered once");
    g
});

/// Registers the Redis metrics at start-up rather than on the first error, in the middle of
/// an outage.
pub fn register_metrics() {
    Lazy::force(&REDIS_ERRORS);
    Lazy::force(&REDIS_UP);
}

impl Redis {
    /// Brings `breakwater_redis_up` up to date; called when metrics are scraped.
    pub fn refresh_metrics(&self) {
        REDIS_UP.set(i64::from(self.is_connected()));
    }
}

/// When each op last logged; a handful of entries, so a linear scan beats a map.
static LAST_LOGGED: Lazy<Mutex<Vec<(&'static str, Instant)>>> = Lazy::new(Mutex::default);

/// Counts a failed Redis command under `op` and logs a warning at most once per 10 s per op,
/// so an outage does not flood the log with one line per request.
pub fn record_error(op: &'static str, err: &dyn std::fmt::Display) {
    REDIS_ERRORS.with_label_values(&[op]).inc();
    // try_lock: a thread that finds the lock taken is in an error storm that someone else is
    // already logging, so it skips instead of waiting.
    let Ok(mut last) = LAST_LOGGED.try_lock() else {
        return;
    };
    let now = Instant::now();
    match last.iter_mut().find(|(name, _)| *name == op) {
        Some((_, at)) if now.duration_since(*at) < ERROR_LOG_INTERVAL => return,
        Some((_, at)) => *at = now,
        None => last.push((op, now)),
    }
    drop(last);
    log::warn!("redis {op} failed: {err} (further {op} errors in the next 10s are only counted in breakwater_redis_errors_total)");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use fred::prelude::{KeysInterface, ServerConfig};
    use std::net::TcpListener;
    use std::process::{Child, Command, Stdio};

    /// A throwaway `redis-server` on a free loopback port, killed on drop.
    pub(crate) struct TestRedis {
        pub port: u16,
        child: Option<Child>,
        _dir: tempfile::TempDir,
    }

    impl TestRedis {
        pub fn start() -> TestRedis {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port();
            let mut r = TestRedis {
                port,
                child: None,
                _dir: tempfile::tempdir().expect("temp dir"),
            };
            r.spawn();
            r
        }

        pub fn url(&self) -> String {
            format!("redis://127.0.0.1:{}", self.port)
        }

        fn spawn(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let child = Command::new("redis-server")
                    .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .current_dir(self._dir.path())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn redis-server (is it installed?)");
                self.child = Some(child);
                while Instant::now() < deadline {
                    if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                        return;
                    }
                    if let Some(Ok(Some(_))) = self.child.as_mut().map(|c| c.try_wait()) {
                        break; // port still held by the previous instance: try again
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                assert!(Instant::now() < deadline, "redis-server did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
        }

        pub fn kill(&mut self) {
            if let Some(mut c) = self.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }

        pub fn restart(&mut self) {
            self.kill();
            self.spawn();
        }
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            self.kill();
        }
    }

    pub(crate) fn config(url: &str) -> RedisConfig {
        RedisConfig {
            url: url.to_string(),
            pool_size: 2,
            ..RedisConfig::default()
        }
    }

    /// Runs the connector the way Pingora does, on a runtime of its own; dropping the returned
    /// guard shuts it down.
    pub(crate) struct ConnectorRuntime {
        stop: tokio::sync::watch::Sender<bool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl ConnectorRuntime {
        pub fn start(redis: &Redis) -> ConnectorRuntime {
            let (stop, watch) = tokio::sync::watch::channel(false);
            let connector = RedisConnector(redis.clone());
            let thread = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("connector runtime");
                rt.block_on(connector.start(watch));
            });
            ConnectorRuntime {
                stop,
                thread: Some(thread),
            }
        }
    }

    impl Drop for ConnectorRuntime {
        fn drop(&mut self) {
            let _ = self.stop.send(true);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    pub(crate) async fn wait_connected(redis: &Redis) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis.pool.clients().iter().all(|c| c.is_connected()) {
            assert!(Instant::now() < deadline, "redis pool did not connect");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn config_defaults_and_durations() {
        let cfg: RedisConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(cfg, RedisConfig::default());
        assert_eq!(cfg.url, "redis://127.0.0.1:6379");
        assert_eq!(cfg.pool_size, 4);
        assert_eq!(cfg.command_timeout, Duration::from_millis(250));
        assert_eq!(cfg.connect_timeout, Duration::from_secs(1));
        let cfg: RedisConfig = serde_yaml::from_str(
            "{url: 'redis://r:1', command_timeout: 100ms, connect_timeout: 3s}",
        )
        .unwrap();
        assert_eq!(cfg.command_timeout, Duration::from_millis(100));
        assert_eq!(cfg.connect_timeout, Duration::from_secs(3));
        let err = serde_yaml::from_str::<RedisConfig>("{command_timeout: soon}").unwrap_err();
        assert!(err.to_string().contains("invalid duration"), "{err}");
        let err = serde_yaml::from_str::<RedisConfig>("{urls: x}").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn new_rejects_bad_settings_without_leaking_the_password() {
        let bad = |cfg: RedisConfig| cfg.compile().unwrap_err();
        assert!(bad(RedisConfig {
            pool_size: 0,
            ..RedisConfig::default()
        })
        .contains("pool_size"));
        let err = bad(RedisConfig {
            url: "http://user:s3cret@host:1".into(),
            ..RedisConfig::default()
        });
        let err2 = bad(RedisConfig {
            url: "not a url s3cret".into(),
            ..RedisConfig::default()
        });
        for e in [err, err2] {
            assert!(e.contains("redis.url"), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }

    #[test]
    fn cluster_urls_in_every_spelling_configure_a_cluster() {
        for url in [
            "redis-cluster://10.0.0.1:7000",
            "redis+cluster://10.0.0.1:7000",
            "redis-cluster://10.0.0.1:7000?node=10.0.0.2:7001",
        ] {
            let cfg = FredConfig::from_url(&normalize_url(url)).unwrap();
            assert!(
                matches!(cfg.server, ServerConfig::Clustered { .. }),
                "{url}: {:?}",
                cfg.server
            );
            config(url).compile().unwrap();
        }
        let cfg = FredConfig::from_url(&normalize_url("redis://10.0.0.1:7000")).unwrap();
        assert!(matches!(cfg.server, ServerConfig::Centralized { .. }));
    }

    #[test]
    fn new_needs_no_runtime_and_does_no_io() {
        // Nothing listens on this port; building must still succeed, instantly, outside tokio.
        let start = Instant::now();
        let redis = config("redis://127.0.0.1:1").compile().unwrap();
        assert!(!redis.is_connected());
        assert!(start.elapsed() < Duration::from_millis(100));
    }

    #[test]
    fn commands_issued_from_another_runtime_than_the_connectors_work() {
        let server = TestRedis::start();
        let redis = config(&server.url()).compile().unwrap();
        let _connector = ConnectorRuntime::start(&redis);
        // The "worker" runtime: a different runtime on other threads, like Pingora's proxy.
        let worker = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        worker.block_on(async {
            wait_connected(&redis).await;
            let handles: Vec<_> = (0..20)
                .map(|i| {
                    let redis = redis.clone();
                    tokio::spawn(async move {
                        let key = format!("bw:test:{i}");
                        redis
                            .commands()
                            .set::<(), _, _>(&key, i, None, None, false)
                            .await
                            .unwrap();
                        redis.commands().get::<i64, _>(&key).await.unwrap()
                    })
                })
                .collect();
            for (i, h) in handles.into_iter().enumerate() {
                assert_eq!(h.await.unwrap(), i as i64);
            }
        });
        // And from a plain current-thread runtime too.
        let other = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let v: i64 = other.block_on(redis.commands().get("bw:test:7")).unwrap();
        assert_eq!(v, 7);
    }

    #[test]
    fn start_up_does_not_wait_for_a_down_redis_and_commands_fail_fast_until_it_is_up() {
        let mut server = TestRedis::start();
        server.kill();
        let redis = config(&server.url()).compile().unwrap();
        let _connector = ConnectorRuntime::start(&redis);
        let worker = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        worker.block_on(async {
            for _ in 0..5 {
                let start = Instant::now();
                let r = redis.commands().get::<Option<String>, _>("k").await;
                assert!(r.is_err());
                assert!(start.elapsed() <= redis.command_timeout() + Duration::from_millis(100));
            }
        });
        server.restart();
        worker.block_on(async {
            wait_connected(&redis).await;
            let v: Option<String> = redis.commands().get("k").await.unwrap();
            assert_eq!(v, None);
        });
    }

    #[test]
    fn record_error_counts_every_error() {
        let before = REDIS_ERRORS.with_label_values(&["test_op"]).get();
        for _ in 0..3 {
            record_error("test_op", &"boom");
        }
        assert_eq!(
            REDIS_ERRORS.with_label_values(&["test_op"]).get(),
            before + 3
        );
        let text = {
            use prometheus::Encoder;
            let mut buf = Vec::new();
            prometheus::TextEncoder::new()
                .encode(&crate::ops::metrics::METRICS.registry.gather(), &mut buf)
                .unwrap();
            String::from_utf8(buf).unwrap()
        };
        assert!(text.contains("breakwater_redis_errors_total{op=\"test_op\"}"));
    }
}
