//! Assembles the Pingora server from a compiled config: installs it in this process, then adds
//! the proxy listeners (plain and TLS) behind the connection [`front`], the admin listener,
//! the background services (health checks, span export, the status page's sampler), the Redis
//! connector, the JWKS refresher and the lifecycle watcher.

pub mod front;

use crate::ops::admin::{AdminApp, WriteAccess};
use crate::ops::lifecycle::LifecycleWatcher;
use crate::ops::status::{StatusHistory, StatusSampler};
use crate::proxy::Gateway;
use crate::redis::RedisConnector;
use crate::runtime::{Compiled, Runtime};
use front::{AcceptStopped, Front, FrontSettings};
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::prelude::{background_service, Opt};
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service as ListeningService;
use pingora::Result;
use std::sync::Arc;

/// How the process was asked to start.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Run in the background (`-d`).
    pub daemon: bool,
    /// Take the listening sockets over from a running instance (`-u`).
    pub upgrade: bool,
}

/// A server ready to run, with the handles a reload needs.
pub struct Assembled {
    pub server: Server,
    /// The installed config, shared with the request path (a reload carries state into it).
    pub runtime: Arc<Runtime>,
    /// Set when the proxy listeners stopped accepting.
    pub accept_stopped: Arc<AcceptStopped>,
}

/// Plain listeners read straight into the HTTP parser's buffer: Pingora's 64 KiB read buffer
/// per connection saves no system call there, and an idle connection would keep it. The write
/// buffer gathers a small response's header and body into one write.
const PLAIN_BUFFERS: L4BufferSettings = L4BufferSettings {
    read: Some(0),
    write: Some(1460),
};

/// Share of the open-file limit client connections may use by default; the rest is left to
/// upstream connections, listeners and files.
const DEFAULT_CONNECTION_SHARE: f64 = 0.8;

/// Builds a ready-to-run server. `server.bootstrap()` happens here: with `start.upgrade` it
/// takes the listening sockets of the running instance, so everything that can fail must
/// have failed before (compiling the config did that).
pub fn build(compiled: Compiled, start: &StartOptions) -> Result<Assembled> {
    let open_files = raise_open_file_limit();
    let server_config = compiled.server.clone();
    let admin_config = compiled.admin.clone();
    let writes = WriteAccess::new(compiled.admin_token.clone(), admin_config.listen.0);
    let opt = Opt {
        upgrade: start.upgrade,
        daemon: start.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let grace_secs = server_config.grace_period.as_secs_f64().ceil() as u64;
    let server_conf = ServerConf {
        threads: server_config.threads,
        daemon: start.daemon,
        grace_period_seconds: Some(grace_secs),
        graceful_shutdown_timeout_seconds: Some(grace_secs + 5),
        upgrade_sock: server_config.upgrade_sock.display().to_string(),
        pid_file: server_config.pid_file.display().to_string(),
        // Every per-request timeout of a second or more (upstream reads and writes, the
        // pooled connections' idle timeout) on Tokio's timer wheel rather than Pingora's
        // fast timeouts: nearly all of them are cancelled early, which a wheel entry undoes
        // and a fast-timeout slot does not (each stays in a per-thread B-tree of every 10 ms
        // slot until it expires). 1.5% fewer instructions per request (2026-12-02,
        // loadtest/instructions.sh).
        fast_timeout_to_tokio_threshold_seconds: Some(0),
        // A pooled upstream connection is checked when it is taken for reuse (closed by the
        // upstream, or idle past `timeouts.idle`: closed then, the next one tried) instead of
        // being watched by a task of its own while idle: that task was spawned, woken and
        // ended on every request. The cost: a connection the upstream closed, or one past
        // `timeouts.idle`, keeps its socket until it is next taken or evicted (bounded by the
        // pool's size).
        upstream_watch_idle_connections: false,
        ..ServerConf::default()
    };
    // Nothing here asks a stream how long its reads and writes waited (Pingora keeps it for
    // logging hooks), and timing each wait took four clock reads a proxied request.
    pingora::protocols::l4::stream::set_pending_time_tracking(false);
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();

    let listeners = compiled.listeners();
    let connection_limits = compiled.connection_limits;
    let mut compiled = compiled;
    let tls = std::mem::take(&mut compiled.tls);
    let (runtime, background) = compiled.install()?;
    let runtime = Arc::new(runtime);
    // The request path borrows the runtime for the life of the process, which installs one
    // config (a reload starts a new process): a borrow counts no references, where each request
    // cloned and dropped half a dozen `Arc`s (service, route, upstream, gauges), every one an
    // atomic read-modify-write. This handle is never dropped.
    let for_requests: &'static Runtime = Box::leak(Box::new(Arc::clone(&runtime)));
    let history = StatusHistory::new();
    // Redis is connected in the background: start-up never waits for it.
    let redis = runtime.redis.clone();

    let mut http = HttpProxy::new(Gateway::new(for_requests), server.configuration.clone());
    let mut options = HttpServerOptions::default();
    options.h2c = server_config.h2c;
    http.server_options = Some(options);
    http.handle_init_modules();
    let max_connections = server_config
        .max_connections
        .unwrap_or_else(|| ((open_files as f64 * DEFAULT_CONNECTION_SHARE) as usize).max(64));
    let front = Front::new(
        http,
        FrontSettings {
            header_timeout: connection_limits.header_timeout,
            keepalive_timeout: server_config.keepalive_timeout,
            max_header_size: usize::try_from(connection_limits.max_header_size)
                .unwrap_or(usize::MAX),
            max_connections,
            h2c: server_config.h2c,
            keep_header_case: server_config.header_name_case.keeps_spelling(),
        },
    );
    let accept_stopped = front.accept_stopped();
    let mut proxy = ListeningService::new("breakwater proxy".to_string(), front);
    for listen in &server_config.listen {
        proxy.add_listener(ListenerConfig::tcp(listen.to_string()).l4_buffer(PLAIN_BUFFERS));
    }
    for (listen, acceptor) in tls {
        // OpenSSL reads whole records into its own (released when idle) buffer.
        proxy.add_listener(
            ListenerConfig::tcp(listen.to_string())
                .tls(acceptor.settings)
                .l4_buffer(PLAIN_BUFFERS),
        );
    }

    let mut admin = ListeningService::new(
        "breakwater admin".to_string(),
        AdminApp::new(Arc::clone(&runtime), writes, Arc::clone(&history)),
    );
    admin.threads = Some(1);
    admin.add_tcp(&admin_config.listen.to_string());

    let proxy = server.add_service(proxy);
    let admin = server.add_service(admin);
    for service in background {
        server.add_boxed_service(service);
    }
    server.add_service(background_service("status", StatusSampler(history)));
    if let Some(redis) = redis {
        server.add_service(background_service("redis", RedisConnector(redis)));
    }
    if let Some(refresher) = runtime
        .authenticator
        .as_ref()
        .and_then(|a| a.jwks_refresher())
    {
        server.add_service(background_service("jwks", refresher));
    }
    let lifecycle = server.add_service(background_service(
        "lifecycle",
        LifecycleWatcher {
            listen: listeners,
            pid_file: (!start.daemon).then(|| server_config.pid_file.clone()),
        },
    ));
    lifecycle.add_dependency(&proxy);
    lifecycle.add_dependency(&admin);
    log::info!("accepting at most {max_connections} client connections");
    Ok(Assembled {
        server,
        runtime,
        accept_stopped,
    })
}

/// Raises the soft open-file limit to the hard one, as nginx's `worker_rlimit_nofile` and Go's
/// runtime do: every client and upstream connection is a file. Returns the limit in force.
fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}
