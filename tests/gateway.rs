//! The core gateway, end to end: the real `breakwater` binary in front of real sample
//! upstreams, on ephemeral loopback ports.

mod common;

use common::{client, poll_until, run_check, Gateway, Upstream};
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn get_json(url: &str) -> (u16, Value, reqwest::header::HeaderMap) {
    let resp = client().get(url).send().expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.text().unwrap_or_default();
    let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
    (status, json, headers)
}

#[test]
fn routes_by_longest_prefix_and_host() {
    let users = Upstream::start("users");
    let admins = Upstream::start("admins");
    let api = Upstream::start("api");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users: {{routes: [{{path_prefix: /users}}], upstreams: ["{}"]}}
  admins: {{routes: [{{path_prefix: /users/admin}}], upstreams: ["{}"]}}
  api:
    routes: [{{path_prefix: /users, host: "*.example.com"}}]
    upstreams: ["{}"]
"#,
        users.addr, admins.addr, api.addr
    ));
    let served_by = |path: &str, host: Option<&str>| {
        let mut req = client().get(gw.url(path));
        if let Some(h) = host {
            req = req.header("Host", h);
        }
        let body: Value = req.send().unwrap().json().unwrap();
        body["service"].as_str().unwrap().to_string()
    };
    assert_eq!(served_by("/users/1", None), "users");
    assert_eq!(served_by("/users", None), "users");
    assert_eq!(served_by("/users/admin/9", None), "admins");
    assert_eq!(served_by("/users/1", Some("eu.example.com")), "api");
    assert_eq!(served_by("/users/1", Some("example.com")), "users");

    // Prefixes match whole segments only; an unrouted path gets a JSON 404.
    let (status, body, headers) = get_json(&gw.url("/usersx"));
    assert_eq!(status, 404);
    assert_eq!(body["error"], "no route");
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    assert_eq!(users.requests() + admins.requests() + api.requests(), 5);
}

#[test]
fn strip_prefix_rewrites_the_upstream_path_and_keeps_the_query() {
    let up = Upstream::start("orders");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  orders: {{routes: [{{path_prefix: /api/orders, strip_prefix: true}}], upstreams: ["{}"]}}
"#,
        up.addr
    ));
    let (status, body, _) = get_json(&gw.url("/api/orders/7?x=1"));
    assert_eq!(status, 200);
    assert_eq!(body["path"], "/7");
    assert_eq!(body["query"], "x=1");
}

#[test]
fn forwarding_headers_and_request_id() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users: {{routes: [{{path_prefix: /}}], upstreams: ["{}"]}}
"#,
        up.addr
    ));
    // A well-formed client id is kept, forwarded and echoed.
    let resp = client()
        .get(gw.url("/echo"))
        .header("X-Request-Id", "client-id-123")
        .header("X-Forwarded-For", "203.0.113.9")
        .header("Connection", "keep-alive, X-Drop-Me")
        .header("X-Drop-Me", "secret")
        .header("Host", "shop.example.com")
        .send()
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "client-id-123");
    let body: Value = resp.json().unwrap();
    let h = &body["headers"];
    assert_eq!(h["x-request-id"], "client-id-123");
    // The client is not a trusted proxy: its own X-Forwarded-For is replaced, not appended
    // to (tests/edge_trust.rs has the trusted case).
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.example.com");
    assert!(
        h.get("x-drop-me").is_none(),
        "connection-nominated header forwarded: {h}"
    );
    assert!(h.get("keep-alive").is_none());

    // A malformed id is replaced by a generated one, echoed to the client.
    let resp = client()
        .get(gw.url("/echo"))
        .header("X-Request-Id", "bad id with spaces")
        .send()
        .unwrap();
    let echoed = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_ne!(echoed, "bad id with spaces");
    assert_eq!(echoed.len(), 36, "a UUID: {echoed}");
    let body: Value = resp.json().unwrap();
    assert_eq!(body["headers"]["x-request-id"], echoed.as_str());
}

#[test]
fn weighted_round_robin_spreads_as_configured() {
    let light = Upstream::start("users");
    let heavy = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{}", {{addr: "{}", weight: 3}}]
"#,
        light.addr, heavy.addr
    ));
    let c = client();
    for _ in 0..400 {
        assert_eq!(c.get(gw.url("/users/1")).send().unwrap().status(), 200);
    }
    let (l, h) = (light.requests(), heavy.requests());
    assert_eq!(l + h, 400);
    assert!((90..=110).contains(&l), "light got {l}, heavy {h}");
}

#[test]
fn consistent_hash_sticks_a_key_to_one_upstream() {
    let ups: Vec<Upstream> = (0..3).map(|_| Upstream::start("users")).collect();
    let list = ups
        .iter()
        .map(|u| format!("\"{}\"", u.addr))
        .collect::<Vec<_>>()
        .join(", ");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: [{list}]
    load_balancing: consistent_hash
    hash_key: header:X-User-Id
"#
    ));
    let c = client();
    let mut owners: HashMap<String, String> = HashMap::new();
    for round in 0..5 {
        for user in 0..20 {
            let resp = c
                .get(gw.url("/users/me"))
                .header("X-User-Id", format!("user-{user}"))
                .send()
                .unwrap();
            let by = resp.headers()["x-served-by"].to_str().unwrap().to_string();
            let owner = owners.entry(format!("user-{user}")).or_insert(by.clone());
            assert_eq!(*owner, by, "user-{user} moved in round {round}");
        }
    }
    let distinct: std::collections::HashSet<_> = owners.values().collect();
    assert!(distinct.len() >= 2, "20 keys all hashed to one upstream");
}

#[test]
fn health_check_ejects_a_stopped_upstream_and_readmits_it() {
    let stable = Upstream::start("users");
    let mut flaky = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{}", "{}"]
    retries: 0
    circuit_breaker: {{failure_threshold: 0, error_threshold_percentage: 0}}
    health_check: {{path: /health, interval: 500ms, timeout: 300ms}}
"#,
        stable.addr, flaky.addr
    ));
    let c = client();
    flaky.kill();
    let killed = Instant::now();
    // Within two intervals (plus a check's timeout) the dead upstream gets no traffic.
    poll_until(Duration::from_millis(1500), "dead upstream ejected", || {
        gw.metrics().contains(&format!(
            "breakwater_upstream_healthy{{service=\"users\",upstream=\"{}\"}} 0",
            flaky.addr
        ))
    });
    assert!(killed.elapsed() < Duration::from_millis(1500));
    for _ in 0..20 {
        assert_eq!(c.get(gw.url("/users/1")).send().unwrap().status(), 200);
    }
    flaky.restart();
    poll_until(Duration::from_secs(3), "upstream re-admitted", || {
        c.get(gw.url("/users/1"))
            .send()
            .map(|r| r.headers()["x-served-by"] == flaky.addr.as_str())
            .unwrap_or(false)
    });
}

/// Health checks cost a service little beyond its probes: one connector (the CA bundle loaded
/// once) and one background runtime serve every service. Built per service they took, with
/// 200 services, 30 s to /ready, 739 MiB and 206 threads here (2026-12-03); now a quarter to
/// half a second, 43 MiB and 7 threads. Every service's loop still runs: a dead upstream is seen by all.
#[test]
fn two_hundred_health_checked_services_start_fast_small_and_all_checked() {
    const SERVICES: usize = 200;
    let mut up = Upstream::start("shared");
    let services: String = (0..SERVICES)
        .map(|i| {
            format!(
                "  s{i}: {{routes: [{{path_prefix: /s{i}}}], upstreams: [\"{}\"], \
                 health_check: {{interval: 300ms, timeout: 200ms}}}}\n",
                up.addr
            )
        })
        .collect();
    let started = Instant::now();
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
{services}"#
    ));
    let ready_after = started.elapsed();
    assert!(
        ready_after < Duration::from_secs(5),
        "ready after {ready_after:?}"
    );
    let pid = gw.pid().expect("gateway pid");
    let threads = common::proc_status(pid, "Threads");
    assert!(threads < 40, "{threads} threads for {SERVICES} services");
    let rss_mib = common::proc_status(pid, "VmRSS") / 1024;
    assert!(
        rss_mib < 200,
        "{rss_mib} MiB resident for {SERVICES} services"
    );
    assert_eq!(
        client().get(gw.url("/s199/x")).send().unwrap().status(),
        200
    );

    let addr = up.addr.clone();
    let healthy = |metrics: &str| {
        (0..SERVICES)
            .filter(|i| {
                metrics.contains(&format!(
                    "breakwater_upstream_healthy{{service=\"s{i}\",upstream=\"{}\"}} 1",
                    addr
                ))
            })
            .count()
    };
    assert_eq!(healthy(&gw.metrics()), SERVICES);
    up.kill();
    poll_until(
        Duration::from_secs(10),
        "every service sees its upstream die",
        || healthy(&gw.metrics()) == 0,
    );
}

#[test]
fn upstream_failures_get_json_502_504_and_503() {
    let slow = Upstream::start("slow");
    let dead_port = common::free_port();
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  refused: {{routes: [{{path_prefix: /refused}}], upstreams: ["127.0.0.1:{dead_port}"], retries: 0}}
  slow:
    routes: [{{path_prefix: /slow}}]
    upstreams: ["{}"]
    timeouts: {{connect: 500ms, read: 300ms}}
  down:
    routes: [{{path_prefix: /down}}]
    upstreams: ["127.0.0.1:{dead_port}"]
    health_check: {{interval: 200ms, timeout: 100ms}}
"#,
        slow.addr
    ));
    let (status, body, _) = get_json(&gw.url("/refused/1"));
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["service"], "refused");
    assert!(body["request_id"].is_string());

    let start = Instant::now();
    let (status, body, _) = get_json(&gw.url("/slow/1?delay_ms=2000"));
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["service"], "slow");
    assert!(start.elapsed() < Duration::from_millis(1500));

    poll_until(Duration::from_secs(3), "down service answers 503", || {
        get_json(&gw.url("/down/1")).0 == 503
    });
    let (_, body, headers) = get_json(&gw.url("/down/1"));
    assert_eq!(body["error"], "down service unavailable");
    assert!(headers.contains_key("retry-after"));
}

/// Pingora calls a service ready before it binds its listeners, and tries a port in use again
/// each second for half a minute: `/ready` (what a load balancer or Kubernetes asks) says yes
/// only once the proxy port is the gateway's own and accepts.
#[test]
fn not_ready_while_another_process_holds_the_proxy_port() {
    let up = Upstream::start("users");
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    let taken = squatter.local_addr().expect("its address");
    let gw = Gateway::start_live(&format!(
        r#"
server: {{listen: ["{taken}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users: {{routes: [{{path_prefix: /users}}], upstreams: ["{}"]}}
"#,
        up.addr
    ));
    let ready = || {
        client()
            .get(gw.admin_url("/ready"))
            .send()
            .expect("admin answers")
            .status()
    };
    poll_until(Duration::from_secs(10), "the bind refused", || {
        gw.stderr().contains(&format!("{taken} is in use"))
    });
    // Two more of Pingora's tries, each refused, and not ready all along.
    let until = Instant::now() + Duration::from_millis(2200);
    while Instant::now() < until {
        assert_eq!(ready(), 503, "ready while {taken} is another process's");
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(squatter);
    poll_until(
        Duration::from_secs(10),
        "ready once the port is free",
        || ready() == 200,
    );
    let resp = client()
        .get(format!("http://{taken}/users/1"))
        .send()
        .expect("the proxy port accepts once ready");
    assert_eq!(resp.status(), 200);
}

#[test]
fn admin_endpoints_answer_and_metrics_count_requests() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users: {{routes: [{{path_prefix: /users}}], upstreams: ["{}"]}}
"#,
        up.addr
    ));
    let c = client();
    assert_eq!(c.get(gw.admin_url("/health")).send().unwrap().status(), 200);
    assert_eq!(c.get(gw.admin_url("/ready")).send().unwrap().status(), 200);
    for _ in 0..3 {
        c.get(gw.url("/users/1")).send().unwrap();
    }
    c.get(gw.url("/users/1?status=500")).send().unwrap();
    // Counted in the logging phase, which may end just after the client has its answer.
    poll_until(Duration::from_secs(2), "the last request counted", || {
        gw.metrics()
            .contains(r#"breakwater_request_duration_seconds_count{service="users"} 4"#)
    });
    let m = gw.metrics();
    assert!(
        m.contains(r#"breakwater_requests_total{method="GET",service="users",status="200"} 3"#),
        "{m}"
    );
    assert!(m.contains(r#"breakwater_requests_total{method="GET",service="users",status="500"} 1"#));
    assert!(m.contains(r#"breakwater_request_duration_seconds_count{service="users"} 4"#));
    // The admin API is not reachable through the proxy listener.
    assert_eq!(c.get(gw.url("/metrics")).send().unwrap().status(), 404);
    // One JSON access-log line per request.
    poll_until(Duration::from_secs(2), "access log written", || {
        gw.stdout()
            .lines()
            .filter(|l| l.contains("\"service\":\"users\""))
            .count()
            == 4
    });
    let line: Value = serde_json::from_str(gw.stdout().lines().next().unwrap()).unwrap();
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream"], up.addr.as_str());
}

#[test]
fn invalid_configs_exit_2_naming_file_line_and_field() {
    let cases = [
        (
            "services:\n  users:\n    routes: [{path_prefix: /users}]\n    upstreams: [\"127.0.0.1:1\"]\n    retrys: 2\n",
            "retrys",
            ":5:",
        ),
        (
            "services:\n  users:\n    routes: [{path_prefix: /users}]\n    upstreams:\n      - not-an-address\n",
            "services.users.upstreams",
            ":5:",
        ),
        (
            "services:\n  a:\n    routes: [{path_prefix: /x}]\n    upstreams: [\"127.0.0.1:1\"]\n  b:\n    routes: [{path_prefix: /x}]\n    upstreams: [\"127.0.0.1:2\"]\n",
            "services.b.routes[0].path_prefix",
            ":6",
        ),
        (
            "services:\n  a:\n    routes: []\n    upstreams: [\"127.0.0.1:1\"]\n",
            "services.a.routes",
            ":3",
        ),
        (
            "services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    timeouts: {read: forever}\n",
            "invalid duration",
            ":5:",
        ),
    ];
    for (yaml, needle, line) in cases {
        let (code, stderr) = run_check(yaml);
        assert_eq!(code, 2, "{yaml}\n{stderr}");
        assert!(stderr.contains(needle), "{needle} not in: {stderr}");
        assert!(
            stderr.contains(&format!(".yaml{line}")),
            "line {line} not in: {stderr}"
        );
    }
    let (code, stderr) = run_check(
        "services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n",
    );
    assert_eq!(code, 0, "{stderr}");

    // Starting with an invalid file fails the same way, before binding anything.
    let err = Gateway::try_start("services: {a: {routes: [], upstreams: []}}\n")
        .err()
        .expect("must not start");
    assert!(err.contains("services.a.routes"), "{err}");
}

/// A keep-alive HTTP/1.1 upstream on raw sockets that answers every request with `200 ok`.
/// It counts the connections it accepts and those the gateway closes, and can close its own
/// end of every connection it holds: what a server does to idle keep-alive connections.
struct KeepAliveUpstream {
    addr: String,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    closed_by_gateway: std::sync::Arc<std::sync::atomic::AtomicU64>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
}

impl KeepAliveUpstream {
    fn start() -> KeepAliveUpstream {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let upstream = KeepAliveUpstream {
            addr: listener.local_addr().expect("address").to_string(),
            accepted: Default::default(),
            closed_by_gateway: Default::default(),
            open: Default::default(),
        };
        let (accepted, closed, open) = (
            upstream.accepted.clone(),
            upstream.closed_by_gateway.clone(),
            upstream.open.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                accepted.fetch_add(1, Ordering::SeqCst);
                if let Ok(ours) = stream.try_clone() {
                    open.lock().unwrap().push(ours);
                }
                let closed = closed.clone();
                std::thread::spawn(move || {
                    if Self::serve(stream) {
                        closed.fetch_add(1, Ordering::SeqCst);
                    }
                });
            }
        });
        upstream
    }

    /// Answers requests until the connection ends; true when it ended with the other side's
    /// close (after `close_connections` reads end too, so only count it without that).
    fn serve(mut stream: std::net::TcpStream) -> bool {
        use std::io::{Read, Write};
        let mut pending = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                pending.drain(..end + 4);
                let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                if stream.write_all(answer).is_err() {
                    return false;
                }
            }
            match stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(n) => pending.extend_from_slice(&chunk[..n]),
                Err(_) => return false,
            }
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn closed_by_gateway(&self) -> u64 {
        self.closed_by_gateway
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Closes the upstream's end of every connection it accepted so far.
    fn close_connections(&self) {
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn keep_alive_gateway(upstream: &KeepAliveUpstream, timeouts: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"], threads: 1}}
admin: {{listen: "${{ADMIN}}"}}
services:
  pool:
    routes: [{{path_prefix: /}}]
    upstreams: ["{}"]
    timeouts: {timeouts}
"#,
        upstream.addr
    ))
}

fn get_ok(gw: &Gateway) {
    let resp = client().get(gw.url("/x")).send().expect("request");
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.text().expect("body"), "ok");
}

#[test]
fn upstream_connections_are_reused_and_one_the_upstream_closed_is_replaced() {
    let upstream = KeepAliveUpstream::start();
    let gw = keep_alive_gateway(&upstream, "{}");
    for _ in 0..5 {
        get_ok(&gw);
    }
    assert_eq!(
        upstream.accepted(),
        1,
        "one pooled connection serves them all"
    );

    // The upstream closes its idle connection, as servers do after their own keep-alive
    // timeout. The gateway must not answer the next request with the dead connection's error:
    // it connects again, once, and pools the new connection.
    upstream.close_connections();
    for _ in 0..5 {
        get_ok(&gw);
    }
    assert_eq!(upstream.accepted(), 2);
}

#[test]
fn an_upstream_connection_idle_past_timeouts_idle_is_closed_not_reused() {
    let upstream = KeepAliveUpstream::start();
    let gw = keep_alive_gateway(&upstream, "{idle: 200ms}");
    get_ok(&gw);
    get_ok(&gw);
    assert_eq!(upstream.accepted(), 1);

    // Time passing is the subject here: nothing to poll for before the timeout is over.
    std::thread::sleep(Duration::from_millis(400));
    get_ok(&gw);
    assert_eq!(upstream.accepted(), 2, "the expired connection was reused");
    poll_until(
        Duration::from_secs(5),
        "the expired connection closed",
        || upstream.closed_by_gateway() == 1,
    );
}
