//! Smoke tests of the test harness itself (`tests/common`) and of `sample-service`: every other
//! integration test trusts these pieces, so they are proven here without the gateway.

mod common;

use std::time::{Duration, Instant};

use common::{client, is_listening, poll_until, Redis, Upstream};
use serde_json::Value;

fn get_json(url: &str) -> (u16, Value) {
    let resp = client()
        .get(url)
        .send()
        .unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status().as_u16();
    (status, resp.json().expect("JSON body"))
}

#[test]
fn upstreams_echo_what_they_received_and_serve_their_entities() {
    let users = Upstream::start("users");
    let orders = Upstream::start("orders");
    assert_ne!(users.addr, orders.addr);

    let resp = client()
        .post(users.url("/anything/else?a=1&b=two"))
        .header("X-Repeated", "one")
        .header("X-Repeated", "two")
        .body("hello")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-served-by"], users.addr.as_str());
    let echo: Value = resp.json().unwrap();
    assert_eq!(echo["service"], "users");
    assert_eq!(echo["instance"], users.addr.as_str());
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/anything/else");
    assert_eq!(echo["query"], "a=1&b=two");
    assert_eq!(echo["headers"]["x-repeated"], "one, two");
    assert_eq!(echo["body_bytes"], 5);

    // Entities are deterministic, so two calls (or two instances) agree.
    let (status, user) = get_json(&users.url("/users/42"));
    assert_eq!(status, 200);
    assert_eq!(user["id"], 42);
    assert!(
        user["name"].is_string() && user["email"].is_string(),
        "{user}"
    );
    assert_eq!(user["service"], "users");
    assert_eq!(get_json(&users.url("/users/42")).1["name"], user["name"]);

    let (_, order) = get_json(&orders.url("/orders/7"));
    assert_eq!(order["id"], 7);
    assert!(
        order["items"].as_array().is_some_and(|i| !i.is_empty()),
        "{order}"
    );
    assert!(
        order["user_id"].is_u64() && order["total"].is_number(),
        "{order}"
    );
    assert_eq!(order["instance"], orders.addr.as_str());

    // A users instance does not pretend to be the orders service: it echoes.
    let (_, echoed) = get_json(&users.url("/orders/7"));
    assert!(echoed.get("items").is_none(), "{echoed}");
    assert_eq!(echoed["path"], "/orders/7");
}

#[test]
fn per_request_overrides_shape_the_response() {
    let up = Upstream::start("users");
    let http = client();

    let resp = http.get(up.url("/x?status=418")).send().unwrap();
    assert_eq!(resp.status(), 418);
    assert_eq!(resp.json::<Value>().unwrap()["path"], "/x");

    let resp = http.get(up.url("/x?bytes=1000")).send().unwrap();
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(resp.headers()["x-served-by"], up.addr.as_str());
    let body = resp.bytes().unwrap();
    assert_eq!(body.len(), 1000);
    assert!(body.iter().all(|&b| b == b'x'));

    let resp = http
        .get(up.url("/x?header=X-One:1&header=Cache-Control%3A%20max-age%3D60"))
        .send()
        .unwrap();
    assert_eq!(resp.headers()["x-one"], "1");
    assert_eq!(resp.headers()["cache-control"], "max-age=60");

    let started = Instant::now();
    let resp = http.get(up.url("/x?delay_ms=300")).send().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(300));

    // close=1 is a reset after the request was sent: the client gets no response at all.
    let err = http.get(up.url("/x?close=1")).send().unwrap_err();
    assert!(!err.is_status(), "{err}");
}

#[test]
fn control_endpoints_inject_faults_and_count_only_real_requests() {
    let up = Upstream::start("orders");
    let http = client();

    up.fail(500);
    assert_eq!(http.get(up.url("/orders/1")).send().unwrap().status(), 500);
    assert_eq!(http.get(up.url("/health")).send().unwrap().status(), 500);
    up.fail(0);
    assert_eq!(http.get(up.url("/health")).send().unwrap().status(), 200);
    up.fail(503);
    up.recover();
    let (status, health) = get_json(&up.url("/health"));
    assert_eq!((status, &health["status"]), (200, &Value::from("ok")));

    up.delay(300);
    let started = Instant::now();
    http.get(up.url("/slow")).send().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    up.delay(0);

    // A hung instance takes the request (it is counted) but never answers until recovered.
    up.reset();
    up.hang();
    let short = reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(short.get(up.url("/stuck")).send().unwrap_err().is_timeout());
    assert_eq!(up.requests(), 1);
    up.recover();
    assert_eq!(http.get(up.url("/fine")).send().unwrap().status(), 200);

    // Counting: control calls and health probes are not requests.
    up.reset();
    http.get(up.url("/a")).send().unwrap();
    http.put(up.url("/b"))
        .header("X-Trace", "t1")
        .send()
        .unwrap();
    http.get(up.url("/health")).send().unwrap();
    up.stats();
    let stats = up.stats();
    assert_eq!(stats["requests"], 2, "{stats}");
    assert_eq!(stats["health_checks"], 1, "{stats}");
    assert_eq!(stats["by_method"]["GET"], 1, "{stats}");
    assert_eq!(stats["by_method"]["PUT"], 1, "{stats}");
    assert_eq!(stats["last_headers"]["x-trace"], "t1", "{stats}");
    up.reset();
    assert_eq!(up.requests(), 0);
}

#[test]
fn a_killed_upstream_restarts_on_the_same_port_with_fresh_state() {
    let mut up = Upstream::start("users");
    let addr = up.addr.clone();
    client().get(up.url("/before")).send().unwrap();
    up.fail(500);

    up.kill();
    assert!(!is_listening(&addr));
    assert!(client().get(up.url("/health")).send().is_err());

    up.restart();
    assert_eq!(up.addr, addr);
    let (status, _) = get_json(&up.url("/health"));
    assert_eq!(status, 200, "a restarted instance starts healthy");
    assert_eq!(up.requests(), 0);
}

#[test]
fn redis_starts_dies_and_comes_back_on_the_same_port() {
    // Optional here only: this test is about the harness, and Redis::start itself refuses to
    // skip, so the feature tests that need Redis still fail loudly without it.
    if std::process::Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("redis-server not installed; the Redis harness is not exercised here");
        return;
    }
    let mut redis = Redis::start();
    assert!(redis.ping());
    assert_eq!(redis.url, format!("redis://127.0.0.1:{}", redis.port));

    redis.kill();
    assert!(!is_listening(&format!("127.0.0.1:{}", redis.port)));
    assert!(!redis.ping());

    let port = redis.port;
    redis.restart();
    assert_eq!(redis.port, port);
    poll_until(Duration::from_secs(5), "redis to answer PING", || {
        redis.ping()
    });
}
