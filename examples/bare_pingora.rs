//! The bare-Pingora baseline of `loadtest/bench.sh` and `loadtest/idle.sh`: a `ProxyHttp` with
//! only `upstream_peer`, to one upstream, so that Pingora's own cost per request can be told
//! apart from Breakwater's. Same allocator as the gateway; 1 worker thread unless told.
//!
//!     target/release/examples/bare_pingora LISTEN UPSTREAM [THREADS]
//!     (e.g. bare_pingora 127.0.0.1:8000 127.0.0.1:3001)
//!
//! With `BARE_H2C=1` in the environment it also takes HTTP/2 with prior knowledge (h2c).
//! With `BARE_FRONT=1` the proxy runs behind Breakwater's connection front
//! (`breakwater::server::front`: whole-header deadline, idle wait without a buffer, connection
//! count), with Breakwater's defaults, so that the bench can tell what the front costs.
//! With `BARE_UNWATCHED=1` pooled upstream connections are checked when taken instead of watched
//! by a task each while idle (`ServerConf::upstream_watch_idle_connections`, the pingora-core
//! patch Breakwater turns on), so that the bench can tell what that saves Pingora itself.

use async_trait::async_trait;
use breakwater::server::front::{Front, FrontSettings};
use pingora::apps::HttpServerOptions;
use pingora::prelude::*;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::services::listening::Service as ListeningService;
use std::net::SocketAddr;
use std::time::Duration;

#[cfg(not(feature = "heap-profiling"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Bare(SocketAddr);

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();
    fn new_ctx(&self) {}
    async fn upstream_peer(&self, _: &mut Session, _: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream, rest @ ..] = args.as_slice() else {
        eprintln!("usage: bare_pingora LISTEN UPSTREAM [THREADS]");
        std::process::exit(2);
    };
    let upstream: SocketAddr = upstream.parse().expect("UPSTREAM is ip:port");
    let threads = rest.first().map_or(1, |t| t.parse().expect("THREADS"));
    let conf = ServerConf {
        threads,
        upstream_watch_idle_connections: std::env::var_os("BARE_UNWATCHED")
            .is_none_or(|v| v != "1"),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let h2c = std::env::var_os("BARE_H2C").is_some_and(|v| v == "1");
    let options = h2c.then(|| {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        options
    });
    if std::env::var_os("BARE_FRONT").is_some_and(|v| v == "1") {
        let mut http = HttpProxy::new(Bare(upstream), server.configuration.clone());
        http.server_options = options;
        http.handle_init_modules();
        // Breakwater's defaults: 10 s header deadline, 60 s keep-alive, 32 KiB header.
        let front = Front::new(
            http,
            FrontSettings {
                header_timeout: Duration::from_secs(10),
                keepalive_timeout: Duration::from_secs(60),
                max_header_size: 32 * 1024,
                max_connections: 100_000,
                h2c,
                // As bare Pingora: each name as the client spelled it.
                keep_header_case: true,
            },
        );
        let mut proxy = ListeningService::new("bare pingora behind the front".to_string(), front);
        proxy.add_tcp(listen);
        server.add_service(proxy);
    } else {
        let mut proxy = http_proxy_service(&server.configuration, Bare(upstream));
        if let Some(app) = proxy.app_logic_mut() {
            app.server_options = options;
        }
        proxy.add_tcp(listen);
        server.add_service(proxy);
    }
    server.run_forever();
}
