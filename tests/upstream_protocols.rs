//! Upstream protocols, end to end: a service's `protocol: h2c` speaks HTTP/2 with prior
//! knowledge to a plain upstream and `protocol: h2` negotiates HTTP/2 with ALPN on a TLS one,
//! whatever the client spoke (curl with `--http1.1`, `--http2-prior-knowledge`, `--http2`),
//! and the health checks speak it too. The upstreams are HTTP/2-only hyper servers that
//! answer with the version they saw, so HTTP/1.1 to them would fail, not pass unnoticed.

mod common;

use common::{free_port, poll_until, Gateway};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use openssl::ssl::{AlpnError, SslAcceptor, SslFiletype, SslMethod};
use std::convert::Infallible;
use std::pin::Pin;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// An HTTP/2-only upstream (h2c, or h2 over TLS with ALPN `h2` only). Each answer's body is
/// `<version> <method> <path>` as the upstream saw the request; it keeps the paths it got.
struct H2Server {
    addr: String,
    seen: Arc<Mutex<Vec<String>>>,
    _runtime: tokio::runtime::Runtime,
}

impl H2Server {
    fn start(tls: bool) -> H2Server {
        let (runtime, listener, addr) = common::tokio_upstream_listener();
        let acceptor = tls.then(|| {
            let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
            b.set_certificate_chain_file(fixture("tls_cert.pem"))
                .unwrap();
            b.set_private_key_file(fixture("tls_key.pem"), SslFiletype::PEM)
                .unwrap();
            b.set_alpn_select_callback(|_, offered| {
                openssl::ssl::select_next_proto(b"\x02h2", offered).ok_or(AlpnError::NOACK)
            });
            Arc::new(b.build())
        });
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (log, acceptor) = (Arc::clone(&log), acceptor.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req| answer(req, Arc::clone(&log)));
                    let builder = http2::Builder::new(TokioExecutor::new());
                    match acceptor {
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                        Some(acceptor) => {
                            let ssl = openssl::ssl::Ssl::new(acceptor.context()).unwrap();
                            let mut tls = tokio_openssl::SslStream::new(ssl, stream).unwrap();
                            if Pin::new(&mut tls).accept().await.is_ok() {
                                let _ = builder.serve_connection(TokioIo::new(tls), svc).await;
                            }
                        }
                    }
                });
            }
        });
        H2Server {
            addr,
            seen,
            _runtime: runtime,
        }
    }

    fn saw(&self, path: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|p| p == path)
    }
}

async fn answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<String>>>,
) -> Result<Response<Full<bytes::Bytes>>, Infallible> {
    seen.lock().unwrap().push(req.uri().path().to_string());
    let body = format!("{:?} {} {}", req.version(), req.method(), req.uri().path());
    Ok(Response::new(Full::new(body.into())))
}

/// curl through the gateway with `args`; the body and the HTTP version curl spoke.
fn curl(args: &[&str], url: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_version}"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {args:?} {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, version) = text.rsplit_once('\n').unwrap();
    (body.to_string(), version.to_string())
}

#[test]
fn h2c_upstreams_get_http2_from_http1_and_h2c_clients_and_h2c_health_checks() {
    let up = H2Server::start(false);
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"], h2c: true}}
admin: {{listen: "${{ADMIN}}"}}
services:
  api:
    protocol: h2c
    routes: [{{path_prefix: /api}}]
    upstreams: ["{}"]
    health_check: {{path: /health, interval: 200ms}}
"#,
        up.addr
    ));
    // The check reached the HTTP/2-only upstream and passed.
    poll_until(Duration::from_secs(10), "an h2c health check", || {
        up.saw("/health")
    });
    poll_until(Duration::from_secs(5), "healthy", || {
        gw.circuit("api", &up.addr)["healthy"] == true
    });
    let (body, version) = curl(&["--http2-prior-knowledge"], &gw.url("/api/a"));
    assert_eq!(
        (body.as_str(), version.as_str()),
        ("HTTP/2.0 GET /api/a", "2")
    );
    let (body, version) = curl(&["--http1.1", "-X", "POST", "-d", "x=1"], &gw.url("/api/b"));
    assert_eq!(
        (body.as_str(), version.as_str()),
        ("HTTP/2.0 POST /api/b", "1.1")
    );
}

#[test]
fn h2_upstreams_over_tls_are_negotiated_with_alpn() {
    let up = H2Server::start(true);
    let tls_port = free_port();
    let gw = Gateway::start(&format!(
        r#"
server:
  listen: ["${{LISTEN}}"]
  tls: [{{listen: "127.0.0.1:{tls_port}", cert: "{cert}", key: "{key}"}}]
admin: {{listen: "${{ADMIN}}"}}
services:
  api:
    protocol: h2
    tls: true
    tls_verify: false
    routes: [{{path_prefix: /api}}]
    upstreams: ["{up}"]
    health_check: {{path: /health, interval: 200ms}}
"#,
        cert = fixture("tls_cert.pem"),
        key = fixture("tls_key.pem"),
        up = up.addr
    ));
    poll_until(Duration::from_secs(10), "an h2 health check", || {
        up.saw("/health")
    });
    let https = format!("https://localhost:{tls_port}/api/c");
    let resolve = format!("localhost:{tls_port}:127.0.0.1");
    let ca = fixture("tls_cert.pem");
    let (body, version) = curl(&["--http2", "--cacert", &ca, "--resolve", &resolve], &https);
    assert_eq!(
        (body.as_str(), version.as_str()),
        ("HTTP/2.0 GET /api/c", "2")
    );
    let (body, version) = curl(&["--http1.1"], &gw.url("/api/d"));
    assert_eq!(
        (body.as_str(), version.as_str()),
        ("HTTP/2.0 GET /api/d", "1.1")
    );
}

#[test]
fn an_http1_service_in_front_of_an_http2_only_upstream_fails_visibly() {
    // The control for the tests above: without `protocol`, the same upstream is not reached
    // over HTTP/2, so their passing is the setting's doing.
    let up = H2Server::start(false);
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  api: {{routes: [{{path_prefix: /api}}], upstreams: ["{}"], retries: 0}}
"#,
        up.addr
    ));
    let status = common::client()
        .get(gw.url("/api/a"))
        .send()
        .unwrap()
        .status();
    assert_eq!(status, 502);
}
