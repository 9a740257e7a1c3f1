//! WebSocket (and any `Upgrade`) through the gateway, end to end: a real WebSocket client and
//! server (`tungstenite`) on either side of the real binary. The handshake is a request like
//! any other (auth, rate limit, origin checks); after the `101` the connection is a tunnel that
//! no request timeout, body limit or keep-alive timer may cut, only `timeouts.tunnel_idle`; the
//! breaker judges the handshake alone, and `breakwater_tunnels_active` counts open tunnels.

mod common;

use common::{is_listening, poll_until, Gateway};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use tungstenite::client::IntoClientRequest;
use tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tungstenite::{HandshakeError, Message, WebSocket};

const SECRET: &str = "tunnel-test-secret-0123456789abcdef";

/// A WebSocket server on loopback. On `/…/push` it sends `tick N` every 300 ms, ten times,
/// reading nothing; on `/…/reset` it echoes one message, then resets the TCP connection; on
/// any other path it echoes every message back.
struct WsServer {
    addr: String,
    /// Request headers of every handshake that reached it, by path.
    handshakes: Arc<Seen>,
    /// Connections whose WebSocket session has ended (closed or broken).
    ended: Arc<AtomicU64>,
}

impl WsServer {
    fn start() -> WsServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the WebSocket server");
        let addr = listener.local_addr().unwrap().to_string();
        let handshakes = Arc::new(Mutex::new(Vec::new()));
        let ended = Arc::new(AtomicU64::new(0));
        let (seen, done) = (Arc::clone(&handshakes), Arc::clone(&ended));
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (seen, done) = (Arc::clone(&seen), Arc::clone(&done));
                thread::spawn(move || serve(stream, &seen, &done));
            }
        });
        WsServer {
            addr,
            handshakes,
            ended,
        }
    }

    fn handshakes_on(&self, prefix: &str) -> Vec<HashMap<String, String>> {
        let seen = self.handshakes.lock().unwrap();
        seen.iter()
            .filter(|(path, _)| path.starts_with(prefix))
            .map(|(_, h)| h.clone())
            .collect()
    }
}

/// Path and request headers of each handshake.
type Seen = Mutex<Vec<(String, HashMap<String, String>)>>;

// The callback's error type is tungstenite's own.
#[allow(clippy::result_large_err)]
fn serve(stream: TcpStream, seen: &Seen, ended: &AtomicU64) {
    let mut path = String::new();
    let record = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let headers = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        path = req.uri().path().to_string();
        seen.lock().unwrap().push((path.clone(), headers));
        Ok(resp)
    };
    let Ok(mut ws) = tungstenite::accept_hdr(stream, record) else {
        return;
    };
    if path.ends_with("/push") {
        for i in 0..10 {
            thread::sleep(Duration::from_millis(300));
            if ws.send(Message::text(format!("tick {i}"))).is_err() {
                break;
            }
        }
        let _ = ws.close(None);
        while ws.read().is_ok() {}
    } else if path.ends_with("/reset") {
        if let Ok(m) = ws.read() {
            let _ = ws.send(m);
        }
        // SO_LINGER 0: closing sends a RST, the way a crashing server's kernel does.
        let off = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        let _ = nix::sys::socket::setsockopt(ws.get_ref(), nix::sys::socket::sockopt::Linger, &off);
        drop(ws);
    } else {
        loop {
            match ws.read() {
                Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                    if ws.send(m).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    ended.fetch_add(1, Ordering::SeqCst);
}

/// Opens a WebSocket to `path` through the gateway, with extra handshake headers. A refused
/// handshake comes back as the HTTP status and body the gateway sent.
fn open(
    gw: &Gateway,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<WebSocket<TcpStream>, (u16, String)> {
    let stream = TcpStream::connect(&gw.http).expect("connect to the gateway");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut req = format!("ws://{}{path}", gw.http)
        .into_client_request()
        .unwrap();
    for (name, value) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
    }
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(ws),
        Err(HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            let body = resp.body().clone().unwrap_or_default();
            Err((
                resp.status().as_u16(),
                String::from_utf8_lossy(&body).into(),
            ))
        }
        Err(e) => panic!("handshake to {path} failed: {e}"),
    }
}

/// Sends `text` and expects it back.
fn echo(ws: &mut WebSocket<TcpStream>, text: &str) {
    ws.send(Message::text(text))
        .expect("send through the tunnel");
    loop {
        match ws.read().expect("read the echo") {
            Message::Text(t) => {
                assert_eq!(t.as_str(), text, "echoed");
                return;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected the echo, got {other:?}"),
        }
    }
}

/// `breakwater_tunnels_active{service=…}`, 0 when not exported yet.
fn tunnels_active(gw: &Gateway, service: &str) -> i64 {
    let line = format!("breakwater_tunnels_active{{service=\"{service}\"}} ");
    gw.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The sum of `breakwater_upstream_errors_total` of a service, over every kind.
fn upstream_errors(gw: &Gateway, service: &str) -> u64 {
    let label = format!("service=\"{service}\"");
    gw.metrics()
        .lines()
        .filter(|l| l.starts_with("breakwater_upstream_errors_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Every timer a request knows is 1 s (header deadline, body reads, keep-alive, upstream
/// reads) and its body may be 1 KiB; `chat`'s breaker opens on one slow (300 ms) call and its
/// responses are cached.
fn gateway(ws: &WsServer, dir: &tempfile::TempDir) -> Gateway {
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let gw = Gateway::start(&format!(
        r#"
server:
  listen: ["${{LISTEN}}"]
  keepalive_timeout: 1s
admin: {{listen: "${{ADMIN}}"}}
access_log: false
limits: {{header_read_timeout: 1s, max_body_size: 1KiB}}
cache: {{backend: memory, lock_timeout: 30s}}
auth:
  jwt: {{algorithms: [HS256], secret_file: "{secret}"}}
services:
  chat:
    routes: [{{path_prefix: /chat}}]
    upstreams: ["{up}"]
    timeouts: {{read: 1s, write: 1s, total: 2s}}
    circuit_breaker: {{failure_threshold: 1, slow_call_threshold: 300ms, reset_timeout: 1m}}
    cache: {{ttl: 1m}}
  quiet:
    routes: [{{path_prefix: /quiet}}]
    upstreams: ["{up}"]
    timeouts: {{tunnel_idle: 2s}}
    circuit_breaker: {{failure_threshold: 1, reset_timeout: 1m}}
  secure:
    routes: [{{path_prefix: /secure}}]
    upstreams: ["{up}"]
    auth: required
  limited:
    routes: [{{path_prefix: /limited}}]
    upstreams: ["{up}"]
    rate_limit: {{requests_per_second: 0.01, burst: 1}}
  browser:
    routes: [{{path_prefix: /browser}}]
    upstreams: ["{up}"]
    cors: {{allowed_origins: ["https://app.example.com"]}}
"#,
        secret = secret.display(),
        up = ws.addr,
    ));
    wait_for_proxy_listener(&gw);
    gw
}

/// `/ready` can answer while Pingora is still retrying to bind the proxy port (taken a moment
/// by some other socket on a busy machine: "is in use, will try again" in its log).
fn wait_for_proxy_listener(gw: &Gateway) {
    poll_until(
        Duration::from_secs(10),
        "the proxy listener is bound",
        || is_listening(&gw.http),
    );
}

#[test]
fn a_websocket_outlives_every_request_timer_and_the_body_limit() {
    let server = WsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&server, &dir);

    let mut ws = open(&gw, "/chat/ws", &[]).expect("handshake through the gateway");
    // The upstream got the handshake's hop-by-hop headers (it would refuse it otherwise).
    let seen = server.handshakes_on("/chat");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["sec-websocket-version"], "13");
    assert_eq!(seen[0]["upgrade"].to_ascii_lowercase(), "websocket");
    assert!(
        seen[0]["connection"]
            .to_ascii_lowercase()
            .contains("upgrade"),
        "{:?}",
        seen[0]
    );
    assert_eq!(tunnels_active(&gw, "chat"), 1);
    echo(&mut ws, "hello");
    // On a caching route, a second handshake for the same URL neither waits for the first
    // (as a cache miss would, for up to the 30 s lock_timeout) nor is answered from it.
    let mut second = open(&gw, "/chat/ws", &[]).expect("a concurrent handshake");
    echo(&mut second, "second");
    assert_eq!(tunnels_active(&gw, "chat"), 2);
    second.close(None).unwrap();
    while second.read().is_ok() {}

    // Quiet for well past the 1 s header deadline, body read timeout, keep-alive timeout,
    // upstream read timeout and the 2 s total budget.
    thread::sleep(Duration::from_millis(2500));
    echo(&mut ws, "still here");

    // 40 KiB in all through a service whose bodies may be 1 KiB.
    let big = "x".repeat(2048);
    for _ in 0..20 {
        echo(&mut ws, &big);
    }
    ws.close(None).unwrap();
    while ws.read().is_ok() {}
    poll_until(Duration::from_secs(10), "tunnel gauge back to 0", || {
        tunnels_active(&gw, "chat") == 0
    });

    // The tunnel took > 2.5 s against a 300 ms slow-call threshold and a breaker that opens
    // on one failure: only the handshake counted, so it is closed and the next one passes.
    assert_eq!(gw.circuit_state("chat", &server.addr), "closed");
    let mut again = open(&gw, "/chat/ws", &[]).expect("a second handshake");
    echo(&mut again, "again");
    // The two tunnels that ended are counted as answered requests, with their `101`.
    let metrics = gw.metrics();
    assert!(
        metrics
            .contains(r#"breakwater_requests_total{method="GET",service="chat",status="101"} 2"#),
        "{metrics}"
    );
}

#[test]
fn tunnel_idle_closes_a_quiet_tunnel_on_both_sides() {
    let server = WsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&server, &dir);

    let mut ws = open(&gw, "/quiet/ws", &[]).expect("handshake");
    echo(&mut ws, "hello");
    assert_eq!(tunnels_active(&gw, "quiet"), 1);
    let quiet_since = Instant::now();
    // Nothing sent either way: the gateway closes the tunnel after `tunnel_idle` (2 s), not
    // after the 1 s that every request timer is set to.
    let closed = loop {
        match ws.read() {
            Ok(Message::Ping(_) | Message::Pong(_)) => continue,
            Ok(Message::Close(_)) => continue,
            Ok(other) => panic!("nothing was sent, got {other:?}"),
            Err(e) => break e,
        }
    };
    let after = quiet_since.elapsed();
    eprintln!("tunnel_idle 2s: the quiet tunnel was closed after {after:?}");
    assert!(
        !matches!(closed, tungstenite::Error::Io(ref e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the client's own 15 s read timeout fired: the gateway never closed the tunnel"
    );
    assert!(
        after >= Duration::from_millis(1800) && after < Duration::from_secs(9),
        "closed after {after:?}"
    );
    poll_until(
        Duration::from_secs(5),
        "the upstream side closed too",
        || server.ended.load(Ordering::SeqCst) == 1,
    );
    poll_until(Duration::from_secs(5), "tunnel gauge back to 0", || {
        tunnels_active(&gw, "quiet") == 0
    });
    // Whichever side's timer fired, the upstream is not blamed (its breaker opens on one
    // failure).
    assert_eq!(gw.circuit_state("quiet", &server.addr), "closed");
    assert_eq!(upstream_errors(&gw, "quiet"), 0);
}

#[test]
fn a_tunnel_the_upstream_breaks_does_not_trip_its_breaker() {
    let server = WsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&server, &dir);

    let mut ws = open(&gw, "/chat/reset", &[]).expect("handshake");
    echo(&mut ws, "before the reset");
    // The upstream resets the connection: the tunnel ends, the client sees it end.
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => panic!("nothing more was sent, got {t}"),
            Ok(_) => {}
            Err(_) => break,
        }
    }
    poll_until(Duration::from_secs(5), "tunnel gauge back to 0", || {
        tunnels_active(&gw, "chat") == 0
    });
    // `chat`'s breaker opens on one failure; the handshake succeeded, and how the tunnel
    // ended afterwards is nobody's failure (and nothing is retried).
    assert_eq!(gw.circuit_state("chat", &server.addr), "closed");
    assert_eq!(upstream_errors(&gw, "chat"), 0);
    assert_eq!(server.handshakes_on("/chat").len(), 1, "not retried");
    let mut again = open(&gw, "/chat/ws", &[]).expect("the next handshake");
    echo(&mut again, "again");
}

#[test]
fn traffic_one_way_keeps_a_tunnel_open() {
    let server = WsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&server, &dir);

    // The upstream sends for 3 s, 300 ms apart; the client sends nothing, so its side of the
    // tunnel is silent for longer than `tunnel_idle` (2 s), and than the 1 s request timers:
    // the tunnel is idle only when both sides are.
    let mut ws = open(&gw, "/quiet/push", &[]).expect("handshake");
    let mut ticks = Vec::new();
    loop {
        match ws.read() {
            Ok(Message::Text(t)) => ticks.push(t.to_string()),
            Ok(Message::Close(_)) | Err(tungstenite::Error::ConnectionClosed) => break,
            Ok(_) => {}
            Err(e) => panic!("after {} ticks: {e}", ticks.len()),
        }
    }
    assert_eq!(ticks.len(), 10, "{ticks:?}");
}

#[test]
fn the_handshake_passes_auth_rate_limit_and_origin_checks() {
    let server = WsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&server, &dir);

    // Auth: no token, a bad one, then a valid one.
    let (status, body) = open(&gw, "/secure/ws", &[]).map(|_| ()).unwrap_err();
    assert_eq!(status, 401, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "unauthorized");
    let bad = [("authorization", "Bearer not.a.token")];
    assert_eq!(
        open(&gw, "/secure/ws", &bad).map(|_| ()).unwrap_err().0,
        401
    );
    assert!(server.handshakes_on("/secure").is_empty());
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    let token = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "user-7", "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let bearer = format!("Bearer {token}");
    let mut ws = open(&gw, "/secure/ws", &[("authorization", &bearer)]).expect("with a token");
    echo(&mut ws, "authorized");
    let seen = server.handshakes_on("/secure");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0]["x-user-id"], "user-7");

    // Rate limit: one handshake per 100 s.
    let mut first = open(&gw, "/limited/ws", &[]).expect("the first handshake");
    echo(&mut first, "first");
    let (status, body) = open(&gw, "/limited/ws", &[]).map(|_| ()).unwrap_err();
    assert_eq!(status, 429, "{body}");
    assert_eq!(server.handshakes_on("/limited").len(), 1);

    // Origin: browsers apply no CORS to WebSockets, so the gateway refuses other sites.
    for evil in [
        "https://evil.example",
        "null",
        "https://app.example.com.evil.example",
    ] {
        let (status, body) = open(&gw, "/browser/ws", &[("origin", evil)])
            .map(|_| ())
            .unwrap_err();
        assert_eq!(status, 403, "{evil}: {body}");
    }
    assert!(server.handshakes_on("/browser").is_empty());
    let allowed = [("origin", "https://app.example.com")];
    let mut ws = open(&gw, "/browser/ws", &allowed).expect("an allowed origin");
    echo(&mut ws, "same site");
    let mut ws = open(&gw, "/browser/ws", &[]).expect("no origin: not a browser");
    echo(&mut ws, "no origin");
    assert_eq!(server.handshakes_on("/browser").len(), 2);
}
