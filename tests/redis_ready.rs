//! Readiness waits for Redis when a rate limit or the cache uses it: `/ready` answers 503
//! until the first connection is up, or until `redis.connect_timeout` has passed since start;
//! then it is ready (degraded while Redis is down, with `breakwater_redis_up 0`).

mod common;

use common::{client, free_port, poll_until, Gateway, Redis, Upstream};
use serde_json::Value;
use std::time::{Duration, Instant};

fn config(up: &Upstream, redis_port: u16, connect_timeout: &str) -> String {
    format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
redis: {{url: "redis://127.0.0.1:{redis_port}", connect_timeout: {connect_timeout}}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
    rate_limit: {{requests_per_second: 100, burst: 100, backend: redis}}
"#,
        up = up.addr
    )
}

fn ready(gw: &Gateway) -> (u16, Value) {
    let resp = client().get(gw.admin_url("/ready")).send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap())
}

fn redis_up(gw: &Gateway) -> Option<u8> {
    gw.metrics()
        .lines()
        .find_map(|l| l.strip_prefix("breakwater_redis_up ")?.parse().ok())
}

#[test]
fn ready_once_a_late_redis_is_connected() {
    let up = Upstream::start("users");
    let port = free_port();
    // A connect timeout far beyond the test: only a connection can make it ready.
    let gw = Gateway::start_live(&config(&up, port, "60s"));
    poll_until(Duration::from_secs(10), "waiting for redis", || {
        let (status, body) = ready(&gw);
        assert_eq!(status, 503, "{body}");
        body["status"] == "waiting for redis"
    });
    assert_eq!(redis_up(&gw), Some(0));

    let redis = Redis::start_on(port);
    poll_until(Duration::from_secs(15), "ready after redis started", || {
        ready(&gw).0 == 200
    });
    let (_, body) = ready(&gw);
    assert_eq!(body, serde_json::json!({"status": "ready"}));
    assert_eq!(redis_up(&gw), Some(1));

    // Once connected, losing Redis leaves it ready, degraded.
    drop(redis);
    poll_until(Duration::from_secs(15), "degraded", || {
        ready(&gw).1["degraded"] == serde_json::json!(["redis"])
    });
    assert_eq!(ready(&gw).0, 200);
    assert_eq!(redis_up(&gw), Some(0));
}

#[test]
fn ready_degraded_after_connect_timeout_without_redis() {
    let up = Upstream::start("users");
    let port = free_port();
    let started = Instant::now();
    let gw = Gateway::start_live(&config(&up, port, "3s"));
    let mut became_ready = None;
    poll_until(Duration::from_secs(20), "ready without redis", || {
        let (status, body) = ready(&gw);
        if status == 200 {
            became_ready = Some((started.elapsed(), body));
            return true;
        }
        assert!(
            body["status"] == "waiting for redis" || body["status"] == "starting",
            "{body}"
        );
        false
    });
    let (after, body) = became_ready.unwrap();
    // The gateway's clock starts after ours, so this cannot pass early by accident.
    assert!(after >= Duration::from_secs(3), "ready after {after:?}");
    assert_eq!(
        body,
        serde_json::json!({"status": "ready", "degraded": ["redis"]})
    );
    assert_eq!(redis_up(&gw), Some(0));
    // Requests are served meanwhile (the rate limit fails open by default).
    let resp = client().get(gw.url("/users/1")).send().unwrap();
    assert_eq!(resp.status(), 200);
}

#[test]
fn without_redis_users_readiness_does_not_wait() {
    let up = Upstream::start("users");
    let port = free_port();
    // Redis configured but used by nothing: readiness does not depend on it.
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
redis: {{url: "redis://127.0.0.1:{port}", connect_timeout: 60s}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
"#,
        up = up.addr
    ));
    assert_eq!(ready(&gw), (200, serde_json::json!({"status": "ready"})));
}
