//! The response cache, end to end: the real gateway in front of a real upstream that counts
//! what reaches it, with the memory backend and with a real Redis that dies and comes back.
//! Every scenario that applies to both backends runs once per backend (`<scenario>::memory`,
//! `<scenario>::redis`).

mod common;

use common::{client, poll_until, run_check, Gateway, Redis, Upstream};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use reqwest::blocking::Response;
use serde_json::{json, Value};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const SECRET: &str = "cache-tests-hs256-secret-of-at-least-32-bytes";

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis,
}

/// Runs a scenario once per backend, as `<scenario>::memory` and `<scenario>::redis`.
macro_rules! both_backends {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[test]
            fn memory() {
                super::$scenario(super::Backend::Memory)
            }
            #[test]
            fn redis() {
                super::$scenario(super::Backend::Redis)
            }
        }
    )*};
}

both_backends!(
    a_miss_then_hits_and_the_upstream_sees_one_request,
    entries_expire_after_their_ttl,
    no_store_private_and_set_cookie_responses_are_not_stored,
    vary_is_honoured,
    one_users_response_is_never_served_to_another,
    a_hundred_concurrent_misses_reach_the_upstream_once,
    the_stale_copy_is_served_when_the_upstream_is_down,
    a_body_over_max_body_size_streams_through_intact_and_uncached,
    purge_by_prefix_removes_entries,
);

/// A running gateway with one `users` upstream behind two services: `users` (`/users`, no
/// auth) and `me` (`/me`, `auth: required`, cached per user).
struct Setup {
    gw: Gateway,
    up: Upstream,
    redis: Option<Redis>,
    _dir: tempfile::TempDir,
}

/// `cache` is extra fields of the top-level `cache:` section, `users_cache` the `users`
/// service's `cache:` value, `users_extra` more YAML lines for the `users` service.
fn start(backend: Backend, cache: &str, users_cache: &str, users_extra: &str) -> Setup {
    let up = Upstream::start("users");
    let redis = matches!(backend, Backend::Redis).then(Redis::start);
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let top = match &redis {
        Some(r) => format!(
            "redis: {{url: \"{}\"}}\ncache: {{backend: redis{cache}}}",
            r.url
        ),
        None => format!("cache: {{backend: memory{cache}}}"),
    };
    let yaml = r#"
server: {listen: ["${LISTEN}"]}
admin: {listen: "${ADMIN}"}
@TOP@
auth:
  jwt: {algorithms: [HS256], secret_file: "@SECRET@"}
services:
  users:
    routes: [{path_prefix: /users}]
    upstreams: ["@UP@"]
    retries: 0
    cache: @USERS_CACHE@
@USERS_EXTRA@
  me:
    routes: [{path_prefix: /me}]
    upstreams: ["@UP@"]
    auth: required
    cache: {ttl: 1m}
"#
    .replace("@TOP@", &top)
    .replace("@SECRET@", &secret.display().to_string())
    .replace("@UP@", &up.addr)
    .replace("@USERS_CACHE@", users_cache)
    .replace("@USERS_EXTRA@", users_extra);
    let gw = Gateway::start(&yaml);
    if redis.is_some() {
        // The gateway connects to Redis in the background; until then the cache is bypassed.
        poll_until(Duration::from_secs(5), "gateway connected to redis", || {
            gw.metrics().contains("breakwater_redis_up 1")
        });
    }
    Setup {
        gw,
        up,
        redis,
        _dir: dir,
    }
}

fn get(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> Response {
    let mut req = client().get(gw.url(path));
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

fn x_cache(resp: &Response) -> String {
    header(resp, "x-cache").unwrap_or_else(|| panic!("no X-Cache: {:?}", resp.headers()))
}

/// Status, X-Cache and the JSON body of a GET.
fn fetch(gw: &Gateway, path: &str, headers: &[(&str, &str)]) -> (u16, String, Value) {
    let resp = get(gw, path, headers);
    let status = resp.status().as_u16();
    let cache = x_cache(&resp);
    let text = resp.text().unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, cache, body)
}

fn token(sub: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let t = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": sub, "exp": exp}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    format!("Bearer {t}")
}

/// The value of one series once it reaches `want`, or after 5 s. A request's miss or stale
/// result is counted when the gateway is done with the request, just after the client has
/// its answer, so right after the answer the series may still lag by that request.
fn metric_reaching(gw: &Gateway, series: &str, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = gw.metric(series);
        if value >= want || Instant::now() >= deadline {
            return value;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

fn a_miss_then_hits_and_the_upstream_sees_one_request(backend: Backend) {
    let s = start(backend, "", "{ttl: 1m}", "");
    let first = get(&s.gw, "/users/1?b=2&a=1", &[]);
    assert_eq!(first.status(), 200);
    assert_eq!(x_cache(&first), "MISS");
    assert!(header(&first, "age").is_none());
    let first_body = first.text().unwrap();

    for _ in 0..5 {
        let again = get(&s.gw, "/users/1?b=2&a=1", &[]);
        assert_eq!(again.status(), 200);
        assert_eq!(x_cache(&again), "HIT");
        let age: u64 = header(&again, "age")
            .expect("Age on a hit")
            .parse()
            .unwrap();
        assert!(age < 60, "{age}");
        assert!(header(&again, "x-request-id").is_some());
        assert_eq!(again.text().unwrap(), first_body);
    }
    let head = client().head(s.gw.url("/users/1?b=2&a=1")).send().unwrap();
    assert_eq!(x_cache(&head), "HIT");
    assert_eq!(
        header(&head, "content-length"),
        Some(first_body.len().to_string())
    );
    assert_eq!(s.up.requests(), 1, "hits never reach the upstream");

    // Other methods are not the cache's business: no X-Cache, always forwarded.
    let post = client()
        .post(s.gw.url("/users/1"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(post.status(), 200);
    assert!(header(&post, "x-cache").is_none());
    assert_eq!(s.up.requests(), 2);

    // A client asking for a fresh answer gets one, and it is not stored.
    let bypass = get(&s.gw, "/users/3", &[("Cache-Control", "no-cache")]);
    assert_eq!(x_cache(&bypass), "BYPASS");
    assert_eq!(fetch(&s.gw, "/users/3", &[]).1, "MISS");

    assert_eq!(
        s.gw.metric(r#"breakwater_cache_requests_total{result="hit",service="users"}"#),
        6
    );
    assert_eq!(
        metric_reaching(
            &s.gw,
            r#"breakwater_cache_requests_total{result="miss",service="users"}"#,
            2
        ),
        2
    );
    assert_eq!(
        s.gw.metric(r#"breakwater_cache_requests_total{result="bypass",service="users"}"#),
        1
    );
    if let Backend::Memory = backend {
        assert!(s.gw.metric("breakwater_cache_bytes") > first_body.len() as u64);
    }
}

fn entries_expire_after_their_ttl(backend: Backend) {
    let s = start(backend, "", "{ttl: 1s}", "");
    assert_eq!(fetch(&s.gw, "/users/1", &[]).1, "MISS");
    let stored = Instant::now();
    assert_eq!(fetch(&s.gw, "/users/1", &[]).1, "HIT");
    poll_until(Duration::from_secs(5), "the entry to expire", || {
        fetch(&s.gw, "/users/1", &[]).1 == "MISS"
    });
    assert!(stored.elapsed() >= Duration::from_millis(900));
    assert_eq!(s.up.requests(), 2);
    assert_eq!(fetch(&s.gw, "/users/1", &[]).1, "HIT", "stored again");
}

fn no_store_private_and_set_cookie_responses_are_not_stored(backend: Backend) {
    let s = start(backend, "", "{ttl: 1m}", "");
    for path in [
        "/users/1?header=Cache-Control:no-store",
        "/users/1?header=Cache-Control:private",
        "/users/1?header=Cache-Control:no-cache",
        "/users/1?header=Set-Cookie:a=b",
        "/users/1?header=Vary:*",
        "/users/1?status=500",
        "/users/1?status=302",
    ] {
        let before = s.up.requests();
        for _ in 0..2 {
            let (_, cache, _) = fetch(&s.gw, path, &[]);
            assert_eq!(cache, "MISS", "{path}");
        }
        assert_eq!(
            s.up.requests(),
            before + 2,
            "{path}: both reached the upstream"
        );
    }
    // max-age caps the ttl: max-age=1 under a 1m ttl expires in about a second.
    let path = "/users/1?header=Cache-Control:max-age=1";
    assert_eq!(fetch(&s.gw, path, &[]).1, "MISS");
    assert_eq!(fetch(&s.gw, path, &[]).1, "HIT");
    poll_until(
        Duration::from_secs(5),
        "max-age to expire the entry",
        || fetch(&s.gw, path, &[]).1 == "MISS",
    );
    // A cacheable 404 is stored.
    assert_eq!(fetch(&s.gw, "/users/1?status=404", &[]).1, "MISS");
    let (status, cache, _) = fetch(&s.gw, "/users/1?status=404", &[]);
    assert_eq!((status, cache.as_str()), (404, "HIT"));
}

fn vary_is_honoured(backend: Backend) {
    let s = start(backend, "", "{ttl: 1m}", "");
    let path = "/users/1?header=Vary:Accept-Language";
    let lang = |l: &str| fetch(&s.gw, path, &[("Accept-Language", l)]);
    let seen = |body: &Value| {
        body["headers"]["accept-language"]
            .as_str()
            .unwrap()
            .to_string()
    };

    let (_, cache, body) = lang("de");
    assert_eq!((cache.as_str(), seen(&body).as_str()), ("MISS", "de"));
    let (_, cache, body) = lang("de");
    assert_eq!((cache.as_str(), seen(&body).as_str()), ("HIT", "de"));
    let (_, cache, body) = lang("en");
    assert_eq!(
        (cache.as_str(), seen(&body).as_str()),
        ("MISS", "en"),
        "a German answer is never served for English"
    );
    let (_, cache, body) = lang("en");
    assert_eq!((cache.as_str(), seen(&body).as_str()), ("HIT", "en"));
    let (_, cache, body) = lang("de");
    assert_eq!(
        (cache.as_str(), seen(&body).as_str()),
        ("HIT", "de"),
        "each variant is kept"
    );
    assert_eq!(s.up.requests(), 2);
}

fn one_users_response_is_never_served_to_another(backend: Backend) {
    let s = start(backend, "", "{ttl: 1m}", "");
    let (alice, bob) = (token("alice"), token("bob"));
    let as_user = |t: &str, path: &str| fetch(&s.gw, path, &[("Authorization", t)]);
    let user_seen = |body: &Value| body["headers"]["x-user-id"].as_str().unwrap().to_string();

    let (status, cache, body) = as_user(&alice, "/me/profile");
    assert_eq!(
        (status, cache.as_str(), user_seen(&body).as_str()),
        (200, "MISS", "alice")
    );
    let (_, cache, body) = as_user(&alice, "/me/profile");
    assert_eq!(
        (cache.as_str(), user_seen(&body).as_str()),
        ("HIT", "alice")
    );
    let (_, cache, body) = as_user(&bob, "/me/profile");
    assert_eq!(
        (cache.as_str(), user_seen(&body).as_str()),
        ("MISS", "bob"),
        "bob must not get alice's entry"
    );
    let (_, cache, body) = as_user(&bob, "/me/profile");
    assert_eq!((cache.as_str(), user_seen(&body).as_str()), ("HIT", "bob"));
    let (_, _, body) = as_user(&alice, "/me/profile");
    assert_eq!(user_seen(&body), "alice");

    // Keyed per user, `private` responses are storable.
    let private = "/me/settings?header=Cache-Control:private";
    assert_eq!(as_user(&alice, private).1, "MISS");
    assert_eq!(as_user(&alice, private).1, "HIT");
    assert_eq!(as_user(&bob, private).1, "MISS");

    // Without a token there is nothing to serve: the gateway refuses before the cache.
    assert_eq!(get(&s.gw, "/me/profile", &[]).status(), 401);

    // On the shared `users` service, an Authorization header bypasses the cache both ways.
    assert_eq!(fetch(&s.gw, "/users/9", &[]).1, "MISS");
    let (_, cache, _) = fetch(&s.gw, "/users/9", &[("Authorization", &alice)]);
    assert_eq!(cache, "BYPASS");
    assert_eq!(s.up.requests(), 6);
}

fn a_hundred_concurrent_misses_reach_the_upstream_once(backend: Backend) {
    let s = start(backend, ", lock_timeout: 10s", "{ttl: 1m}", "");
    let n = 100;
    let barrier = Arc::new(Barrier::new(n));
    let url = s.gw.url("/users/1?delay_ms=300");
    let http = client();
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, url, http) = (barrier.clone(), url.clone(), http.clone());
            thread::spawn(move || {
                barrier.wait();
                let resp = http.get(&url).send().unwrap();
                let status = resp.status().as_u16();
                let cache = x_cache(&resp);
                (status, cache, resp.text().unwrap())
            })
        })
        .collect();
    let results: Vec<(u16, String, String)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(results.iter().all(|r| r.0 == 200), "{results:?}");
    let misses = results.iter().filter(|r| r.1 == "MISS").count();
    assert_eq!(
        misses, 1,
        "one leader; the rest were answered from its response"
    );
    assert!(
        results.iter().all(|r| r.2 == results[0].2),
        "everyone got the same body"
    );
    assert_eq!(s.up.requests(), 1);
}

fn the_stale_copy_is_served_when_the_upstream_is_down(backend: Backend) {
    let mut s = start(
        backend,
        "",
        "{ttl: 1s, stale_if_error: 1h}",
        "    circuit_breaker: {failure_threshold: 2, reset_timeout: 30s}",
    );
    let (_, cache, original) = fetch(&s.gw, "/users/1", &[]);
    assert_eq!(cache, "MISS");
    thread::sleep(Duration::from_millis(1_100)); // past the ttl, within stale_if_error
    s.up.kill();
    // Connection refused (twice), then the breaker is open and nothing is attempted: the
    // stale copy answers throughout.
    for i in 0..6 {
        let (status, cache, body) = fetch(&s.gw, "/users/1", &[]);
        assert_eq!((status, cache.as_str()), (200, "STALE"), "request {i}");
        assert_eq!(body, original);
    }
    let stale = get(&s.gw, "/users/1", &[]);
    assert!(header(&stale, "age").unwrap().parse::<u64>().unwrap() >= 1);
    // Nothing stored for this one: the error goes through.
    let uncached = get(&s.gw, "/users/2", &[]);
    assert!(uncached.status().is_server_error(), "{}", uncached.status());
    assert!(
        metric_reaching(
            &s.gw,
            r#"breakwater_cache_requests_total{result="stale",service="users"}"#,
            7
        ) >= 7
    );
}

fn a_body_over_max_body_size_streams_through_intact_and_uncached(backend: Backend) {
    let s = start(backend, ", max_body_size: 64KiB", "{ttl: 1m}", "");
    for _ in 0..2 {
        let resp = get(&s.gw, "/users/1?bytes=300000", &[]);
        assert_eq!(resp.status(), 200);
        assert_eq!(x_cache(&resp), "MISS");
        let body = resp.bytes().unwrap();
        assert_eq!(body.len(), 300_000);
        assert!(body.iter().all(|&b| b == b'x'));
    }
    assert_eq!(s.up.requests(), 2);
    // Within the limit it is stored.
    assert_eq!(fetch(&s.gw, "/users/1?bytes=60000", &[]).1, "MISS");
    let resp = get(&s.gw, "/users/1?bytes=60000", &[]);
    assert_eq!(x_cache(&resp), "HIT");
    assert_eq!(resp.bytes().unwrap().len(), 60_000);
}

fn purge_by_prefix_removes_entries(backend: Backend) {
    let s = start(backend, "", "{ttl: 1h}", "");
    for path in ["/users/1", "/users/1/orders", "/users/2"] {
        assert_eq!(fetch(&s.gw, path, &[]).1, "MISS");
        assert_eq!(fetch(&s.gw, path, &[]).1, "HIT");
    }
    let purge = |query: &str| {
        let resp = client()
            .delete(s.gw.admin_url(&format!("/admin/cache?{query}")))
            .send()
            .unwrap();
        assert!(resp.status().is_success(), "{query}: {}", resp.status());
        resp.text().unwrap()
    };
    let answer = purge("prefix=/users/1");
    assert!(answer.contains('2'), "two entries purged: {answer}");
    assert_eq!(fetch(&s.gw, "/users/1", &[]).1, "MISS");
    assert_eq!(fetch(&s.gw, "/users/1/orders", &[]).1, "MISS");
    assert_eq!(fetch(&s.gw, "/users/2", &[]).1, "HIT");

    purge("prefix=/users/2&service=orders");
    assert_eq!(
        fetch(&s.gw, "/users/2", &[]).1,
        "HIT",
        "another service's purge"
    );
    purge("prefix=/users/2&service=users");
    assert_eq!(fetch(&s.gw, "/users/2", &[]).1, "MISS");

    let bad = client()
        .delete(s.gw.admin_url("/admin/cache"))
        .send()
        .unwrap();
    assert!(
        bad.status().is_client_error(),
        "no prefix: {}",
        bad.status()
    );
}

#[test]
fn redis_killed_mid_test_all_requests_succeed_and_caching_resumes() {
    let mut s = start(Backend::Redis, "", "{ttl: 1m}", "");
    assert_eq!(fetch(&s.gw, "/users/1", &[]).1, "MISS");
    assert_eq!(fetch(&s.gw, "/users/1", &[]).1, "HIT");

    s.redis.as_mut().unwrap().kill();
    for i in 0..20 {
        let started = Instant::now();
        let (status, cache, _) = fetch(&s.gw, "/users/1", &[]);
        assert_eq!(status, 200, "request {i} while Redis is down");
        assert_eq!(cache, "MISS");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "request {i} took {:?}",
            started.elapsed()
        );
    }

    s.redis.as_mut().unwrap().restart();
    poll_until(Duration::from_secs(20), "caching to resume", || {
        fetch(&s.gw, "/users/1", &[]).1 == "HIT"
    });
    assert!(s.gw.metrics().contains("breakwater_redis_errors_total"));
}

#[test]
fn invalid_cache_sections_are_refused_with_their_field() {
    let base = |extra: &str| {
        format!(
            "server: {{listen: [\"${{LISTEN}}\"]}}\nadmin: {{listen: \"${{ADMIN}}\"}}\n{extra}\n\
             services:\n  users:\n    routes: [{{path_prefix: /users}}]\n    upstreams: [\"127.0.0.1:1\"]\n"
        )
    };
    let (code, stderr) = run_check(&base("cache: {max_memory: lots}"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("max_memory"), "{stderr}");
    let (code, stderr) = run_check(&base("cache: {backend: redis}"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("redis"), "{stderr}");
    let (code, stderr) = run_check(&base("").replace(
        "upstreams: [\"127.0.0.1:1\"]",
        "upstreams: [\"127.0.0.1:1\"]\n    cache: {ttl: forever}",
    ));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("ttl"), "{stderr}");
}
