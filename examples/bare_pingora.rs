//! The bare-Pingora baseline of `loadtest/bench.sh` and `loadtest/idle.sh`: a `ProxyHttp` with
//! only `upstream_peer`, to one upstream, so that Pingora's own cost per request can be told
//! apart from Breakwater's. Same allocator as the gateway; 1 worker thread unless told.
//!
//!     target/release/examples/bare_pingora LISTEN UPSTREAM [THREADS]
//!     (e.g. bare_pingora 127.0.0.1:8000 127.0.0.1:3001)
//!
//! With `BARE_H2C=1` in the environment it also takes HTTP/2 with prior knowledge (h2c).

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;
use std::net::SocketAddr;

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
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(&server.configuration, Bare(upstream));
    if std::env::var_os("BARE_H2C").is_some_and(|v| v == "1") {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        if let Some(app) = proxy.app_logic_mut() {
            app.server_options = Some(options);
        }
    }
    proxy.add_tcp(listen);
    server.add_service(proxy);
    server.run_forever();
}
