//! Rate limiting, end to end: per-service limits in the real binary, local and shared through
//! a real Redis that dies and comes back while the gateways keep running.

mod common;

use common::{client, poll_until, Gateway, Redis, Upstream};
use reqwest::blocking::Response;
use serde_json::Value;
use std::thread;
use std::time::{Duration, Instant};

/// A gateway routing `/users` to `users` with `rate_limit: {rate_limit}` and `/orders` to
/// `orders` without a limit; `top` is extra top-level YAML (e.g. `redis:`).
fn gateway(users: &Upstream, orders: &Upstream, rate_limit: &str, top: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
{top}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{}"]
    rate_limit: {rate_limit}
  orders:
    routes: [{{path_prefix: /orders}}]
    upstreams: ["{}"]
"#,
        users.addr, orders.addr
    ))
}

fn get(gw: &Gateway, path: &str, api_key: Option<&str>) -> Response {
    let mut req = client().get(gw.url(path));
    if let Some(key) = api_key {
        req = req.header("X-Api-Key", key);
    }
    req.send().unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn header_secs(resp: &Response, name: &str) -> u64 {
    header(resp, name)
        .unwrap_or_else(|| panic!("no {name} header: {:?}", resp.headers()))
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

const REDIS_ERRORS: &str = r#"breakwater_redis_errors_total{op="ratelimit"}"#;
const USERS_REJECTED: &str = r#"breakwater_ratelimit_rejected_total{service="users"}"#;

/// Waits until the gateway's Redis-backed limiter answers from Redis (its decisions carry
/// `RateLimit-Limit`; a degraded, Redis-less one does not). Uses its own API key so the
/// buckets the test counts are untouched.
fn wait_for_redis_limiting(gw: &Gateway, what: &str) {
    let mut probe = 0;
    poll_until(Duration::from_secs(15), what, || {
        probe += 1;
        let resp = get(gw, "/users/1", Some(&format!("probe-{probe}")));
        resp.status() == 200 && header(&resp, "ratelimit-limit").is_some()
    });
}

#[test]
fn the_sixth_quick_request_gets_429_with_ratelimit_headers_and_never_reaches_the_upstream() {
    let users = Upstream::start("users");
    let orders = Upstream::start("orders");
    let gw = gateway(
        &users,
        &orders,
        // A token back every 2 s: none returns while the six requests run on a slow machine.
        "{requests_per_second: 0.5, burst: 5, key: ip}",
        "",
    );
    let c = client();
    let mut remaining = Vec::new();
    for _ in 0..5 {
        let resp = c.get(gw.url("/users/1")).send().unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "ratelimit-limit").as_deref(), Some("5"));
        assert!(header(&resp, "retry-after").is_none());
        remaining.push(header(&resp, "ratelimit-remaining").unwrap_or_default());
    }
    assert_eq!(remaining, ["4", "3", "2", "1", "0"]);

    let resp = c.get(gw.url("/users/1")).send().unwrap();
    assert_eq!(resp.status(), 429);
    let retry_after = header_secs(&resp, "retry-after");
    assert!((2..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert_eq!(header(&resp, "ratelimit-limit").as_deref(), Some("5"));
    assert_eq!(header(&resp, "ratelimit-remaining").as_deref(), Some("0"));
    // Until the bucket is full again: five tokens at one per 2 s, less the time the requests took.
    let reset = header_secs(&resp, "ratelimit-reset");
    assert!((9..=10).contains(&reset), "RateLimit-Reset {reset}");
    assert!(header(&resp, "content-type")
        .unwrap_or_default()
        .starts_with("application/json"));
    let body: Value = resp.json().unwrap();
    assert_eq!(body["error"], "rate limit exceeded", "{body}");
    assert_eq!(
        users.requests(),
        5,
        "the rejected request never reached users"
    );
    assert_eq!(gw.metric(USERS_REJECTED), 1);

    // Another service has no limit and is not affected.
    for _ in 0..20 {
        assert_eq!(c.get(gw.url("/orders/7")).send().unwrap().status(), 200);
    }
    // The limit is a rate, not a ban: after Retry-After the client gets through again.
    thread::sleep(Duration::from_secs(retry_after));
    assert_eq!(c.get(gw.url("/users/1")).send().unwrap().status(), 200);
    assert_eq!(users.requests(), 6);
}

#[test]
fn api_keys_are_limited_separately_and_requests_without_one_fall_back_to_the_client_ip() {
    let users = Upstream::start("users");
    let orders = Upstream::start("orders");
    let gw = gateway(
        &users,
        &orders,
        // A token back every 100 s: the IP's bucket is still empty at the last request, however
        // slowly the test runs.
        "{requests_per_second: 0.01, burst: 2, key: 'header:X-Api-Key'}",
        "",
    );
    for key in [Some("key-a"), Some("key-b"), None] {
        assert_eq!(get(&gw, "/users/1", key).status(), 200, "{key:?}");
        assert_eq!(get(&gw, "/users/1", key).status(), 200, "{key:?}");
        let resp = get(&gw, "/users/1", key);
        assert_eq!(resp.status(), 429, "{key:?}");
        assert!(header_secs(&resp, "retry-after") >= 1);
    }
    // A client cannot use someone else's bucket by sending their address as its key, nor
    // escape its own by sending an empty one.
    assert_eq!(get(&gw, "/users/1", Some("127.0.0.1")).status(), 200);
    assert_eq!(get(&gw, "/users/1", Some("")).status(), 429);
    assert_eq!(users.requests(), 7);
}

#[test]
fn two_gateways_sharing_one_redis_enforce_one_combined_limit() {
    let redis = Redis::start();
    let users = Upstream::start("users");
    let orders = Upstream::start("orders");
    let top = format!("redis: {{url: \"{}\"}}", redis.url);
    // A token back every 100 s: none refills while the test runs.
    let limit = "{requests_per_second: 0.01, burst: 6, key: 'header:X-Api-Key', backend: redis}";
    let gw1 = gateway(&users, &orders, limit, &top);
    let gw2 = gateway(&users, &orders, limit, &top);
    wait_for_redis_limiting(&gw1, "gateway 1 to limit through redis");
    wait_for_redis_limiting(&gw2, "gateway 2 to limit through redis");
    users.reset();

    let mut allowed = 0;
    for i in 0..12 {
        let gw = if i % 2 == 0 { &gw1 } else { &gw2 };
        match get(gw, "/users/1", Some("shared")).status().as_u16() {
            200 => allowed += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    // Each gateway alone would have let 6 through (12 in total); together they share one
    // bucket of 6.
    assert_eq!(allowed, 6, "of 12");
    assert_eq!(users.requests(), allowed);
    assert_eq!(
        gw1.metric(USERS_REJECTED) + gw2.metric(USERS_REJECTED),
        12 - allowed
    );
}

#[test]
fn redis_dies_requests_keep_being_served_and_limiting_resumes_after_it_restarts() {
    let mut redis = Redis::start();
    let users = Upstream::start("users");
    let orders = Upstream::start("orders");
    let mut gw = gateway(
        &users,
        &orders,
        "{requests_per_second: 0.01, burst: 3, key: 'header:X-Api-Key', backend: redis}",
        &format!("redis: {{url: \"{}\", command_timeout: 250ms}}", redis.url),
    );
    let pid = gw.pid();
    wait_for_redis_limiting(&gw, "the gateway to limit through redis");
    for _ in 0..3 {
        assert_eq!(get(&gw, "/users/1", Some("k")).status(), 200);
    }
    assert_eq!(get(&gw, "/users/1", Some("k")).status(), 429);
    let errors_before = gw.metric(REDIS_ERRORS);

    redis.kill();
    users.reset();
    for i in 0..10 {
        let start = Instant::now();
        let resp = get(&gw, "/users/1", Some("k"));
        assert_eq!(
            resp.status(),
            200,
            "request {i} with redis down (fail open)"
        );
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "request {i} took {:?}: a dead Redis must not stall requests",
            start.elapsed()
        );
    }
    assert_eq!(users.requests(), 10);
    assert!(
        gw.metric(REDIS_ERRORS) > errors_before,
        "{REDIS_ERRORS} did not rise"
    );

    // Same port, empty Redis: the running gateway reconnects by itself.
    redis.restart();
    wait_for_redis_limiting(&gw, "limiting to resume after redis restarted");
    for _ in 0..3 {
        assert_eq!(get(&gw, "/users/1", Some("after")).status(), 200);
    }
    let resp = get(&gw, "/users/1", Some("after"));
    assert_eq!(resp.status(), 429);
    assert_eq!(header(&resp, "ratelimit-remaining").as_deref(), Some("0"));
    assert!(gw.is_running());
    assert_eq!(gw.pid(), pid, "no gateway restart");
}

#[test]
fn with_failure_mode_closed_a_down_redis_gets_503_and_the_gateway_still_starts() {
    let mut redis = Redis::start();
    redis.kill();
    let users = Upstream::start("users");
    let orders = Upstream::start("orders");
    // Start-up must not wait for (or fail on) a Redis that is down.
    let gw = gateway(
        &users,
        &orders,
        "{requests_per_second: 100, burst: 100, key: ip, backend: redis, failure_mode: closed}",
        &format!("redis: {{url: \"{}\"}}", redis.url),
    );
    let resp = get(&gw, "/users/1", None);
    assert_eq!(resp.status(), 503);
    assert!(header_secs(&resp, "retry-after") >= 1);
    let body: Value = resp.json().unwrap();
    assert_eq!(body["error"], "rate limiter unavailable", "{body}");
    assert_eq!(users.requests(), 0);
    assert!(gw.metric(REDIS_ERRORS) >= 1);
    // Other services do not depend on Redis.
    assert_eq!(get(&gw, "/orders/7", None).status(), 200);

    redis.restart();
    poll_until(
        Duration::from_secs(15),
        "requests to pass once redis is back",
        || get(&gw, "/users/1", None).status() == 200,
    );
}
