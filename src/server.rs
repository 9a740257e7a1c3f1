//! Assembles the Pingora server from a loaded config: the proxy listeners (plain and TLS),
//! the admin listener, the health-check background services and the lifecycle watcher.

use crate::ops::admin::AdminApp;
use crate::ops::lifecycle::LifecycleWatcher;
use crate::proxy::Gateway;
use crate::redis::{Redis, RedisConnector};
use crate::runtime::{Prepared, Runtime};
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::{background_service, Opt};
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service as ListeningService;
use pingora::{Error, ErrorType, Result};
use std::sync::Arc;

/// How the process was asked to start.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Run in the background (`-d`).
    pub daemon: bool,
    /// Take the listening sockets over from a running instance (`-u`).
    pub upgrade: bool,
}

/// Builds a ready-to-run server. Errors here are start-up failures (e.g. a TLS key that
/// does not load), not config syntax, which `Config::load` already checked.
pub fn build(prepared: &Prepared, start: &StartOptions) -> Result<Server> {
    let config = &prepared.config;
    let opt = Opt {
        upgrade: start.upgrade,
        daemon: start.daemon,
        nocapture: false,
        test: false,
        conf: None,
    };
    let grace_secs = config.server.grace_period.as_secs_f64().ceil() as u64;
    let server_conf = ServerConf {
        threads: config.server.threads,
        daemon: start.daemon,
        grace_period_seconds: Some(grace_secs),
        graceful_shutdown_timeout_seconds: Some(grace_secs + 5),
        upgrade_sock: config.server.upgrade_sock.display().to_string(),
        pid_file: config.server.pid_file.display().to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();

    // Redis is connected in the background: start-up and readiness never wait for it.
    let redis = config
        .redis
        .as_ref()
        .map(Redis::new)
        .transpose()
        .map_err(|e| Error::explain(ErrorType::InternalError, format!("redis: {e}")))?;
    let (runtime, health_checks) = Runtime::new(prepared, redis.as_ref())?;
    let runtime = Arc::new(runtime);

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway::new(Arc::clone(&runtime)),
        "breakwater proxy",
    );
    for listen in &config.server.listen {
        proxy.add_tcp(&listen.to_string());
    }
    for tls in &config.server.tls {
        let mut settings =
            TlsSettings::intermediate(&tls.cert.to_string_lossy(), &tls.key.to_string_lossy())?;
        settings.enable_h2();
        proxy.add_tls_with_settings(&tls.listen.to_string(), None, settings);
    }

    let mut admin = ListeningService::new(
        "breakwater admin".to_string(),
        AdminApp::new(Arc::clone(&runtime)),
    );
    admin.threads = Some(1);
    admin.add_tcp(&config.admin.listen.to_string());

    let proxy = server.add_service(proxy);
    let admin = server.add_service(admin);
    for hc in health_checks {
        server.add_boxed_service(hc);
    }
    if let Some(redis) = redis {
        server.add_service(background_service("redis", RedisConnector(redis)));
    }
    let lifecycle = server.add_service(background_service(
        "lifecycle",
        LifecycleWatcher {
            pid_file: (!start.daemon).then(|| config.server.pid_file.clone()),
        },
    ));
    lifecycle.add_dependency(&proxy);
    lifecycle.add_dependency(&admin);
    Ok(server)
}
