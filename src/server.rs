//! Assembles the Pingora server from a compiled config: installs it in this process, then adds
//! the proxy listeners (plain and TLS), the admin listener, the health-check background
//! services, the Redis connector, the JWKS refresher and the lifecycle watcher.

use crate::ops::admin::AdminApp;
use crate::ops::lifecycle::LifecycleWatcher;
use crate::proxy::Gateway;
use crate::redis::RedisConnector;
use crate::runtime::Compiled;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::{background_service, Opt};
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

/// Builds a ready-to-run server. Errors here are start-up failures (e.g. a TLS key that
/// does not load), not config errors, which compiling it already reported.
pub fn build(compiled: Compiled, start: &StartOptions) -> Result<Server> {
    let (server_config, admin_config) = (compiled.server.clone(), compiled.admin.clone());
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
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, server_conf);
    server.bootstrap();

    let (runtime, health_checks) = compiled.install()?;
    let runtime = Arc::new(runtime);
    // Redis is connected in the background: start-up and readiness never wait for it.
    let redis = runtime.redis.clone();

    let mut proxy = pingora::proxy::http_proxy_service_with_name(
        &server.configuration,
        Gateway::new(Arc::clone(&runtime)),
        "breakwater proxy",
    );
    for listen in &server_config.listen {
        proxy.add_tcp(&listen.to_string());
    }
    for tls in &server_config.tls {
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
    admin.add_tcp(&admin_config.listen.to_string());

    let proxy = server.add_service(proxy);
    let admin = server.add_service(admin);
    for hc in health_checks {
        server.add_boxed_service(hc);
    }
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
            pid_file: (!start.daemon).then(|| server_config.pid_file.clone()),
        },
    ));
    lifecycle.add_dependency(&proxy);
    lifecycle.add_dependency(&admin);
    Ok(server)
}
