//! Unit tests of the cache policy, the coalescer wiring and both backends. Time is a
//! `ManualClock`; nothing sleeps (the Redis tests wait only for a real server to start).

use super::*;
use crate::clock::ManualClock;
use crate::redis::tests::TestRedis;
use crate::values::ByteSize;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

const T0: u64 = 1_700_000_000_000;

struct Fixture {
    clock: Arc<ManualClock>,
    cache: Arc<ResponseCache>,
}

fn fixture_with(cfg: CacheConfig, backend: Arc<dyn CacheBackend>) -> Fixture {
    let clock = Arc::new(ManualClock::new(T0));
    let cache = ResponseCache::with_backend(&cfg, backend, clock.clone());
    Fixture { clock, cache }
}

fn fixture() -> Fixture {
    let cfg = CacheConfig {
        max_body_size: ByteSize(1024),
        ..CacheConfig::default()
    };
    let backend = Arc::new(MemoryBackend::new(cfg.max_memory.as_u64()));
    fixture_with(cfg, backend)
}

impl Fixture {
    fn service(&self, name: &str, yaml: &str, has_auth: bool) -> ServiceCache {
        let cfg: ServiceCacheConfig = serde_yaml::from_str(yaml).unwrap();
        ServiceCache::new(name, cfg.compile(has_auth), Arc::clone(&self.cache))
    }

    /// Waits (without sleeping) until background stores have finished.
    async fn settle(&self) {
        while self.cache.coalescer.in_flight() > 0 {
            tokio::task::yield_now().await;
        }
    }
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut r = RequestHeader::build(method, uri.as_bytes(), None).unwrap();
    r.insert_header("host", "api.test").unwrap();
    for (n, v) in headers {
        r.append_header(n.to_string(), *v).unwrap();
    }
    r
}

fn resp(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
    let mut r = ResponseHeader::build(status, None).unwrap();
    for (n, v) in headers {
        r.append_header(n.to_string(), *v).unwrap();
    }
    r
}

fn header<'a>(r: &'a ResponseHeader, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Runs a forwarded request's response phases the way the proxy does.
fn respond(
    state: &mut CacheState,
    request: &RequestHeader,
    mut r: ResponseHeader,
    body: &str,
) -> ResponseHeader {
    state.start_fill(request, &mut r);
    let b = Bytes::from(body.to_string());
    state.push_body(Some(&b), false);
    state.push_body(None, true);
    r
}

fn forward(l: Lookup) -> CacheState {
    match l {
        Lookup::Forward(s) => s,
        Lookup::Hit(s) => panic!(
            "expected to forward, got a {:?}",
            header(&s.header, X_CACHE)
        ),
    }
}

fn hit(l: Lookup) -> Served {
    match l {
        Lookup::Hit(s) => s,
        Lookup::Forward(s) => panic!("expected a hit, got forward ({:?})", s.x_cache()),
    }
}

fn is_leader(s: &CacheState) -> bool {
    matches!(&s.0, Inner::Miss(m) if m.guard.is_some())
}

fn count(service: &str, result: &str) -> u64 {
    metrics()
        .requests
        .with_label_values(&[service, result])
        .get()
}

// ----- storability and request rules ---------------------------------------------------------

fn hm(headers: &[(&str, &str)]) -> HeaderMap {
    let mut m = HeaderMap::new();
    for (n, v) in headers {
        m.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    m
}

#[test]
fn only_the_cacheable_statuses_are_stored() {
    for status in [200, 203, 204, 300, 301, 404, 405, 410, 414, 501] {
        assert_eq!(
            storable_ttl(status, &hm(&[]), false, 5000),
            Some(5000),
            "{status}"
        );
    }
    for status in [
        201, 202, 206, 302, 304, 307, 400, 401, 403, 429, 500, 502, 503, 504,
    ] {
        assert_eq!(
            storable_ttl(status, &hm(&[]), false, 5000),
            None,
            "{status}"
        );
    }
}

#[test]
fn event_streams_are_never_stored() {
    let ttl = |h: &[(&str, &str)]| storable_ttl(200, &hm(h), false, 5000);
    for ct in [
        "text/event-stream",
        "Text/Event-Stream",
        " text/event-stream ; charset=utf-8",
        "text/event-stream;charset=utf-8",
    ] {
        let h = [
            ("content-type", ct),
            ("cache-control", "public, max-age=60"),
        ];
        assert_eq!(ttl(&h), None, "{ct:?}");
    }
    // Two Content-Type lines, one of them an event stream.
    let two = [
        ("content-type", "application/json"),
        ("content-type", "text/event-stream"),
    ];
    assert_eq!(ttl(&two), None);
    assert_eq!(
        ttl(&[("content-type", "text/event-streams")]),
        Some(5000),
        "only the exact type"
    );
    assert_eq!(ttl(&[("content-type", "application/json")]), Some(5000));
}

#[test]
fn set_cookie_no_store_no_cache_and_private_are_not_stored() {
    let none = |h: &[(&str, &str)], per_user| storable_ttl(200, &hm(h), per_user, 5000);
    assert_eq!(none(&[("set-cookie", "a=b")], true), None);
    assert_eq!(none(&[("cache-control", "no-store")], true), None);
    assert_eq!(none(&[("cache-control", "public, No-Store")], true), None);
    assert_eq!(none(&[("cache-control", "no-cache")], true), None);
    assert_eq!(
        none(&[("cache-control", "no-cache=\"set-cookie\"")], true),
        None
    );
    assert_eq!(none(&[("cache-control", "private")], false), None);
    assert_eq!(
        none(&[("cache-control", "private, max-age=60")], false),
        None
    );
    // Keyed per user, a private response only ever goes back to its own user.
    assert_eq!(none(&[("cache-control", "private")], true), Some(5000));
    assert_eq!(none(&[("cache-control", "public")], false), Some(5000));
}

#[test]
fn max_age_and_s_maxage_cap_the_ttl() {
    let ttl = |h: &[(&str, &str)]| storable_ttl(200, &hm(h), false, 300_000);
    assert_eq!(ttl(&[("cache-control", "max-age=10")]), Some(10_000));
    assert_eq!(ttl(&[("cache-control", "max-age=3600")]), Some(300_000));
    assert_eq!(
        ttl(&[("cache-control", "max-age=100, s-maxage=20")]),
        Some(20_000)
    );
    assert_eq!(
        ttl(&[
            ("cache-control", "s-maxage=20"),
            ("cache-control", "max-age=5")
        ]),
        Some(20_000)
    );
    assert_eq!(ttl(&[("cache-control", "s-maxage=\"30\"")]), Some(30_000));
    assert_eq!(ttl(&[("cache-control", "max-age=0")]), None);
    assert_eq!(ttl(&[("cache-control", "max-age=soon")]), None);
}

#[test]
fn client_no_cache_no_store_and_pragma_bypass() {
    assert!(request_bypasses(&hm(&[("cache-control", "no-cache")])));
    assert!(request_bypasses(&hm(&[(
        "cache-control",
        "max-age=0, no-store"
    )])));
    assert!(request_bypasses(&hm(&[("pragma", "no-cache")])));
    assert!(!request_bypasses(&hm(&[
        ("pragma", "no-cache"),
        ("cache-control", "max-age=5")
    ])));
    assert!(!request_bypasses(&hm(&[("cache-control", "max-age=5")])));
    assert!(!request_bypasses(&hm(&[])));
}

#[test]
fn vary_names_are_collected_and_star_is_not_stored() {
    let req = hm(&[("accept-language", "de"), ("accept-encoding", "gzip")]);
    let v = vary_values(
        &hm(&[
            ("vary", "Accept-Language, accept-encoding"),
            ("vary", "accept-language"),
        ]),
        &req,
    )
    .unwrap();
    assert_eq!(
        v,
        vec![
            (
                HeaderName::from_static("accept-language"),
                Some(HeaderValue::from_static("de"))
            ),
            (
                HeaderName::from_static("accept-encoding"),
                Some(HeaderValue::from_static("gzip"))
            ),
        ]
    );
    assert_eq!(
        vary_values(&hm(&[("vary", "x-missing")]), &req).unwrap()[0].1,
        None
    );
    assert!(vary_values(&hm(&[("vary", "accept, *")]), &req).is_none());
    assert!(vary_values(&hm(&[]), &req).unwrap().is_empty());
}

#[test]
fn per_request_and_hop_by_hop_headers_are_not_stored() {
    let kept = stored_headers(&hm(&[
        ("content-type", "application/json"),
        ("connection", "keep-alive"),
        ("transfer-encoding", "chunked"),
        ("content-length", "12"),
        ("x-request-id", "abc"),
        ("x-cache", "MISS"),
        ("age", "3"),
        ("x-ratelimit-remaining", "9"),
        ("etag", "\"v1\""),
    ]));
    let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["content-type", "etag"]);
}

// ----- the request path ----------------------------------------------------------------------

#[tokio::test]
async fn miss_then_hit_with_age_and_head_from_the_get_entry() {
    let f = fixture();
    let svc = f.service("t_basic", "{ttl: 60s}", false);
    let get = req("GET", "/users/1?b=2&a=1", &[]);
    let mut state = forward(svc.lookup(&get, None).await);
    assert!(is_leader(&state));
    let r = respond(
        &mut state,
        &get,
        resp(
            200,
            &[("content-type", "application/json"), ("x-served-by", "u1")],
        ),
        "{\"id\":1}",
    );
    assert_eq!(header(&r, X_CACHE), Some("MISS"));
    drop(state);
    f.settle().await;

    f.clock.advance(Duration::from_millis(7_500));
    let same = req("GET", "/users/1?a=1&b=2", &[]);
    let served = hit(svc.lookup(&same, None).await);
    assert_eq!(served.header.status.as_u16(), 200);
    assert_eq!(header(&served.header, X_CACHE), Some("HIT"));
    assert_eq!(header(&served.header, "age"), Some("7"));
    assert_eq!(header(&served.header, "content-length"), Some("8"));
    assert_eq!(header(&served.header, "x-served-by"), Some("u1"));
    assert_eq!(&served.body[..], b"{\"id\":1}");

    let served = hit(svc
        .lookup(&req("HEAD", "/users/1?a=1&b=2", &[]), None)
        .await);
    assert_eq!(header(&served.header, X_CACHE), Some("HIT"));
    assert_eq!(header(&served.header, "content-length"), Some("8"));
    assert!(served.body.is_empty());

    assert_eq!(count("t_basic", "miss"), 1);
    assert_eq!(count("t_basic", "hit"), 2);
}

#[tokio::test]
async fn head_misses_are_not_stored_and_other_methods_are_left_alone() {
    let f = fixture();
    let svc = f.service("t_head", "{}", false);
    let head = req("HEAD", "/x", &[]);
    let mut state = forward(svc.lookup(&head, None).await);
    assert!(!is_leader(&state));
    let r = respond(
        &mut state,
        &head,
        resp(200, &[("content-length", "10")]),
        "",
    );
    assert_eq!(header(&r, X_CACHE), Some("MISS"));
    drop(state);
    f.settle().await;
    forward(svc.lookup(&req("GET", "/x", &[]), None).await);

    let post = req("POST", "/x", &[]);
    let mut state = forward(svc.lookup(&post, None).await);
    assert_eq!(state.x_cache(), None);
    let r = respond(&mut state, &post, resp(200, &[]), "created");
    assert_eq!(header(&r, X_CACHE), None);
}

#[tokio::test]
async fn a_client_asking_for_no_cache_bypasses_lookup_and_store() {
    let f = fixture();
    let svc = f.service("t_bypass", "{}", false);
    let get = req("GET", "/x", &[]);
    let mut s = forward(svc.lookup(&get, None).await);
    respond(&mut s, &get, resp(200, &[]), "v1");
    drop(s);
    f.settle().await;

    let fresh = req("GET", "/x", &[("cache-control", "no-cache")]);
    let mut s = forward(svc.lookup(&fresh, None).await);
    assert_eq!(s.x_cache(), Some("BYPASS"));
    let r = respond(&mut s, &fresh, resp(200, &[]), "v2");
    assert_eq!(header(&r, X_CACHE), Some("BYPASS"));
    drop(s);
    f.settle().await;
    assert_eq!(
        &hit(svc.lookup(&get, None).await).body[..],
        b"v1",
        "a bypass never stores"
    );
    assert_eq!(count("t_bypass", "bypass"), 1);
}

#[tokio::test]
async fn authenticated_requests_bypass_a_shared_key_and_users_never_share_entries() {
    let f = fixture();
    let shared = f.service("t_auth_shared", "{}", false);
    let alice_get = req("GET", "/me", &[("authorization", "Bearer a")]);
    let s = forward(shared.lookup(&alice_get, Some("alice")).await);
    assert_eq!(s.x_cache(), Some("BYPASS"));

    let per_user = f.service("t_auth_user", "{}", true);
    let mut s = forward(per_user.lookup(&alice_get, Some("alice")).await);
    assert_eq!(s.x_cache(), Some("MISS"));
    respond(
        &mut s,
        &alice_get,
        resp(200, &[("cache-control", "private")]),
        "alice's",
    );
    drop(s);
    f.settle().await;
    assert_eq!(
        &hit(per_user.lookup(&alice_get, Some("alice")).await).body[..],
        b"alice's"
    );

    let bob_get = req("GET", "/me", &[("authorization", "Bearer b")]);
    let mut s = forward(per_user.lookup(&bob_get, Some("bob")).await);
    respond(
        &mut s,
        &bob_get,
        resp(200, &[("cache-control", "private")]),
        "bob's",
    );
    drop(s);
    f.settle().await;
    assert_eq!(
        &hit(per_user.lookup(&bob_get, Some("bob")).await).body[..],
        b"bob's"
    );
    assert_eq!(
        &hit(per_user.lookup(&alice_get, Some("alice")).await).body[..],
        b"alice's"
    );

    // Authorization without an identity cannot be keyed per user: bypass.
    let s = forward(per_user.lookup(&alice_get, None).await);
    assert_eq!(s.x_cache(), Some("BYPASS"));
    // vary_by_user: false overrides the auth default.
    let off = f.service("t_auth_off", "{vary_by_user: false}", true);
    assert_eq!(
        forward(off.lookup(&alice_get, Some("alice")).await).x_cache(),
        Some("BYPASS")
    );
}

#[tokio::test]
async fn vary_mismatch_is_a_miss_and_the_new_response_replaces_the_entry() {
    let f = fixture();
    let svc = f.service("t_vary", "{}", false);
    let de = req("GET", "/greeting", &[("accept-language", "de")]);
    let en = req("GET", "/greeting", &[("accept-language", "en")]);
    let mut s = forward(svc.lookup(&de, None).await);
    respond(
        &mut s,
        &de,
        resp(200, &[("vary", "Accept-Language")]),
        "hallo",
    );
    drop(s);
    f.settle().await;
    assert_eq!(&hit(svc.lookup(&de, None).await).body[..], b"hallo");

    let mut s = forward(svc.lookup(&en, None).await);
    respond(
        &mut s,
        &en,
        resp(200, &[("vary", "Accept-Language")]),
        "hello",
    );
    drop(s);
    f.settle().await;
    assert_eq!(&hit(svc.lookup(&en, None).await).body[..], b"hello");
    forward(svc.lookup(&de, None).await);

    let any = req("GET", "/star", &[]);
    let mut s = forward(svc.lookup(&any, None).await);
    respond(&mut s, &any, resp(200, &[("vary", "*")]), "x");
    drop(s);
    f.settle().await;
    forward(svc.lookup(&any, None).await);
}

#[tokio::test]
async fn unstorable_responses_are_forwarded_every_time() {
    let f = fixture();
    let svc = f.service("t_unstorable", "{}", false);
    type Case<'a> = (&'a str, u16, &'a [(&'a str, &'a str)]);
    let cases: [Case; 5] = [
        ("/a", 200, &[("set-cookie", "a=b")]),
        ("/b", 200, &[("cache-control", "no-store")]),
        ("/c", 200, &[("cache-control", "private")]),
        ("/d", 500, &[]),
        ("/e", 200, &[("cache-control", "no-cache")]),
    ];
    for (path, status, headers) in cases {
        let get = req("GET", path, &[]);
        let mut s = forward(svc.lookup(&get, None).await);
        let r = respond(&mut s, &get, resp(status, headers), "body");
        assert_eq!(header(&r, X_CACHE), Some("MISS"));
        drop(s);
        f.settle().await;
        forward(svc.lookup(&get, None).await);
    }
}

#[tokio::test]
async fn fresh_then_stale_on_error_then_expired() {
    let f = fixture();
    let svc = f.service("t_stale", "{ttl: 10s, stale_if_error: 1m}", false);
    let get = req("GET", "/orders/7", &[]);
    let mut s = forward(svc.lookup(&get, None).await);
    respond(&mut s, &get, resp(200, &[]), "order");
    drop(s);
    f.settle().await;

    f.clock.advance(Duration::from_secs(9));
    hit(svc.lookup(&get, None).await);

    f.clock.advance(Duration::from_secs(11));
    let mut s = forward(svc.lookup(&get, None).await);
    assert_eq!(s.x_cache(), Some("MISS"));
    let stale = s.take_stale().expect("within stale_if_error");
    assert_eq!(header(&stale.header, X_CACHE), Some("STALE"));
    assert_eq!(header(&stale.header, "age"), Some("20"));
    assert_eq!(&stale.body[..], b"order");
    assert_eq!(s.x_cache(), Some("STALE"));
    drop(s);
    assert_eq!(count("t_stale", "stale"), 1);

    f.clock.advance(Duration::from_secs(50)); // 70s: ttl 10s + stale_if_error 60s
    let mut s = forward(svc.lookup(&get, None).await);
    assert!(s.take_stale().is_none(), "past ttl + stale_if_error");
}

#[tokio::test]
async fn max_age_shortens_freshness() {
    let f = fixture();
    let svc = f.service("t_maxage", "{ttl: 5m, stale_if_error: 1h}", false);
    let get = req("GET", "/x", &[]);
    let mut s = forward(svc.lookup(&get, None).await);
    respond(
        &mut s,
        &get,
        resp(200, &[("cache-control", "public, max-age=2")]),
        "x",
    );
    drop(s);
    f.settle().await;
    f.clock.advance(Duration::from_millis(1_999));
    hit(svc.lookup(&get, None).await);
    f.clock.advance(Duration::from_millis(2));
    let mut s = forward(svc.lookup(&get, None).await);
    assert!(
        s.take_stale().is_some(),
        "stale_if_error still counts from the capped ttl"
    );
}

#[tokio::test]
async fn bodies_over_max_body_size_stream_through_unstored() {
    let f = fixture(); // max_body_size 1024
    let svc = f.service("t_big", "{}", false);
    let get = req("GET", "/big", &[]);
    let mut s = forward(svc.lookup(&get, None).await);
    let mut r = resp(200, &[]);
    s.start_fill(&get, &mut r);
    let chunk = Bytes::from(vec![b'x'; 600]);
    s.push_body(Some(&chunk), false);
    s.push_body(Some(&chunk), false);
    assert!(
        !is_leader(&s),
        "followers are released as soon as the fill is abandoned"
    );
    s.push_body(Some(&chunk), true);
    drop(s);
    f.settle().await;
    forward(svc.lookup(&get, None).await);

    // Known too large from Content-Length: not even buffered.
    let get = req("GET", "/big2", &[]);
    let mut s = forward(svc.lookup(&get, None).await);
    let mut r = resp(200, &[("content-length", "5000")]);
    s.start_fill(&get, &mut r);
    assert!(matches!(&s.0, Inner::Miss(m) if m.fill.is_none()));

    // Exactly the limit is fine.
    let get = req("GET", "/fits", &[]);
    let mut s = forward(svc.lookup(&get, None).await);
    respond(&mut s, &get, resp(200, &[]), &"y".repeat(1024));
    drop(s);
    f.settle().await;
    assert_eq!(hit(svc.lookup(&get, None).await).body.len(), 1024);
}

#[tokio::test]
async fn bodyless_responses_complete_at_the_header() {
    let f = fixture();
    let svc = f.service("t_204", "{}", false);
    let get = req("GET", "/empty", &[]);
    let mut s = forward(svc.lookup(&get, None).await);
    let mut r = resp(204, &[]);
    s.start_fill(&get, &mut r);
    drop(s);
    f.settle().await;
    let served = hit(svc.lookup(&get, None).await);
    assert_eq!(served.header.status.as_u16(), 204);
    assert!(served.header.headers.get("content-length").is_none());
}

#[tokio::test]
async fn purge_by_prefix_and_service() {
    let f = fixture();
    let users = f.service("t_purge_users", "{}", false);
    let other = f.service("t_purge_other", "{}", false);
    for (svc, path) in [
        (&users, "/users/1"),
        (&users, "/users/1/orders"),
        (&users, "/users/10"),
        (&users, "/users/2"),
        (&other, "/users/1"),
    ] {
        let get = req("GET", path, &[]);
        let mut s = forward(svc.lookup(&get, None).await);
        respond(&mut s, &get, resp(200, &[]), path);
    }
    f.settle().await;
    assert_eq!(
        f.cache.purge("/users/1", Some("t_purge_users")).await,
        Ok(3)
    );
    hit(users.lookup(&req("GET", "/users/2", &[]), None).await);
    hit(other.lookup(&req("GET", "/users/1", &[]), None).await);
    forward(users.lookup(&req("GET", "/users/1", &[]), None).await);
    assert_eq!(f.cache.purge("/", None).await, Ok(2));
    assert!(matches!(
        f.cache.purge("users", None).await,
        Err(CacheError::InvalidPurge(_))
    ));
}

// ----- coalescing ----------------------------------------------------------------------------

async fn start_concurrent(
    svc: &ServiceCache,
    n: usize,
) -> (CacheState, tokio::sync::mpsc::UnboundedReceiver<Lookup>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..n {
        let svc = svc.clone();
        let tx = tx.clone();
        tokio::spawn(async move {
            let l = svc.lookup(&req("GET", "/hot", &[]), None).await;
            let _ = tx.send(l);
        });
    }
    // Followers cannot return before the leader does something, so the first is the leader.
    let first = forward(rx.recv().await.unwrap());
    assert!(is_leader(&first));
    (first, rx)
}

async fn wait_for_waiters(f: &Fixture, key: &str, n: usize) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while f.cache.coalescer.waiters(key) < n {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("followers queue up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_concurrent_misses_make_one_upstream_request() {
    let f = fixture();
    let svc = f.service("t_coalesce", "{}", false);
    let key = CacheKey::new(&Arc::from("t_coalesce"), "api.test", "/hot", None, None);
    let (mut leader, mut rx) = start_concurrent(&svc, 100).await;
    wait_for_waiters(&f, key.as_str(), 99).await;
    respond(&mut leader, &req("GET", "/hot", &[]), resp(200, &[]), "hot");
    drop(leader);
    for _ in 0..99 {
        let served = hit(rx.recv().await.unwrap());
        assert_eq!(&served.body[..], b"hot");
    }
    assert_eq!(count("t_coalesce", "miss"), 1);
    assert_eq!(count("t_coalesce", "hit"), 99);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_go_upstream_promptly_when_the_leader_stores_nothing() {
    let cfg = CacheConfig {
        lock_timeout: Duration::from_secs(60),
        ..CacheConfig::default()
    };
    let f = fixture_with(cfg, Arc::new(MemoryBackend::new(1 << 20)));
    let svc = f.service("t_leader_gone", "{}", false);
    let key = CacheKey::new(&Arc::from("t_leader_gone"), "api.test", "/hot", None, None);
    let (leader, mut rx) = start_concurrent(&svc, 20).await;
    wait_for_waiters(&f, key.as_str(), 19).await;
    let started = Instant::now();
    drop(leader); // e.g. the client went away before the upstream answered
    for _ in 0..19 {
        let s = forward(rx.recv().await.unwrap());
        assert!(
            !is_leader(&s),
            "released followers go upstream on their own"
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "released long before lock_timeout"
    );

    // An unstorable leader response releases them at the header.
    let (mut leader, mut rx) = start_concurrent(&svc, 5).await;
    wait_for_waiters(&f, key.as_str(), 4).await;
    let mut r = resp(200, &[("set-cookie", "s=1")]);
    leader.start_fill(&req("GET", "/hot", &[]), &mut r);
    for _ in 0..4 {
        forward(rx.recv().await.unwrap());
    }
    drop(leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_serve_their_stale_copy_when_the_leaders_upstream_fails() {
    let f = fixture();
    let svc = f.service("t_stale_followers", "{ttl: 1s, stale_if_error: 1h}", false);
    let get = req("GET", "/hot", &[]);
    let mut s = forward(svc.lookup(&get, None).await);
    respond(&mut s, &get, resp(200, &[]), "old");
    drop(s);
    f.settle().await;
    f.clock.advance(Duration::from_secs(5));

    let key = CacheKey::new(
        &Arc::from("t_stale_followers"),
        "api.test",
        "/hot",
        None,
        None,
    );
    let (mut leader, mut rx) = start_concurrent(&svc, 10).await;
    wait_for_waiters(&f, key.as_str(), 9).await;
    let stale = leader.take_stale().expect("leader has the stale copy");
    assert_eq!(header(&stale.header, X_CACHE), Some("STALE"));
    for _ in 0..9 {
        let served = hit(rx.recv().await.unwrap());
        assert_eq!(header(&served.header, X_CACHE), Some("STALE"));
        assert_eq!(&served.body[..], b"old");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_give_up_after_lock_timeout() {
    let cfg = CacheConfig {
        lock_timeout: Duration::from_millis(50),
        ..CacheConfig::default()
    };
    let f = fixture_with(cfg, Arc::new(MemoryBackend::new(1 << 20)));
    let svc = f.service("t_lock_timeout", "{}", false);
    let (_leader, mut rx) = start_concurrent(&svc, 2).await;
    let s = forward(rx.recv().await.unwrap());
    assert!(!is_leader(&s));
}

// ----- backends ------------------------------------------------------------------------------

/// A backend that is down.
struct Broken(AtomicBool);

#[async_trait]
impl CacheBackend for Broken {
    async fn get(&self, _: &CacheKey) -> Result<Option<CachedResponse>, CacheError> {
        Err(CacheError::Backend("down".into()))
    }
    async fn put(&self, _: &CacheKey, _: CachedResponse, _: Duration) -> Result<(), CacheError> {
        self.0.store(true, Ordering::SeqCst);
        Err(CacheError::Backend("down".into()))
    }
    async fn purge(&self, _: &str, _: Option<&str>) -> Result<u64, CacheError> {
        Err(CacheError::Backend("down".into()))
    }
    fn bytes(&self) -> Option<u64> {
        None
    }
}

#[tokio::test]
async fn a_broken_backend_means_misses_without_coalescing_waits() {
    let backend = Arc::new(Broken(AtomicBool::new(false)));
    let f = fixture_with(CacheConfig::default(), backend.clone());
    let svc = f.service("t_broken", "{}", false);
    let get = req("GET", "/x", &[]);
    let mut a = forward(svc.lookup(&get, None).await);
    let b = forward(svc.lookup(&get, None).await);
    assert!(!is_leader(&a) && !is_leader(&b));
    let r = respond(&mut a, &get, resp(200, &[]), "x");
    assert_eq!(header(&r, X_CACHE), Some("MISS"));
    drop(a);
    tokio::time::timeout(Duration::from_secs(5), async {
        while !backend.0.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the put was attempted (and its error ignored)");
    assert!(f.cache.purge("/", None).await.is_err());
}

fn entry(body_len: usize) -> CachedResponse {
    CachedResponse {
        status: 200,
        headers: vec![(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        body: Bytes::from(vec![b'x'; body_len]),
        stored_at_ms: T0,
        ttl_ms: 60_000,
        stale_ms: 0,
        vary: vec![],
    }
}

fn key_n(service: &str, i: usize) -> CacheKey {
    CacheKey::new(&Arc::from(service), "h", &format!("/items/{i}"), None, None)
}

#[tokio::test]
async fn memory_backend_stays_within_its_byte_bound() {
    let max = 64 * 1024;
    let m = MemoryBackend::new(max);
    for i in 0..100 {
        m.put(&key_n("s", i), entry(4096), Duration::from_secs(60))
            .await
            .unwrap();
    }
    let held = m.bytes().unwrap();
    assert!(held <= max, "{held} > {max}");
    assert!(held > max / 2, "{held}: it should still be mostly full");
    let mut present = 0;
    for i in 0..100 {
        if m.get(&key_n("s", i)).await.unwrap().is_some() {
            present += 1;
        }
    }
    assert!(
        (8..=16).contains(&present),
        "{present} entries of ~4 KiB in 64 KiB"
    );

    // An entry larger than the whole cache is never kept.
    m.put(
        &key_n("s", 1000),
        entry(100 * 1024),
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert!(m.bytes().unwrap() <= max);
    assert!(m.get(&key_n("s", 1000)).await.unwrap().is_none());
}

#[tokio::test]
async fn memory_backend_round_trip_and_replace() {
    let m = MemoryBackend::new(1 << 20);
    let k = key_n("s", 1);
    assert_eq!(m.get(&k).await.unwrap(), None);
    m.put(&k, entry(10), Duration::from_secs(60)).await.unwrap();
    assert_eq!(m.get(&k).await.unwrap(), Some(entry(10)));
    m.put(&k, entry(20), Duration::from_secs(60)).await.unwrap();
    assert_eq!(m.get(&k).await.unwrap().unwrap().body.len(), 20);
    // A zero keep_for expires at once (moka's own clock).
    m.put(&key_n("s", 2), entry(1), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(m.get(&key_n("s", 2)).await.unwrap(), None);
}

// ----- Redis, against a real redis-server ----------------------------------------------------

/// A pool on a test Redis, connected, that retries quickly while the server is down.
async fn connected_pool(server: &TestRedis) -> fred::clients::Pool {
    use fred::prelude::*;
    let config = Config::from_url(&server.url()).unwrap();
    let pool = Builder::from_config(config)
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_millis(500);
            c.internal_command_timeout = Duration::from_millis(500);
        })
        .set_policy(ReconnectPolicy::new_constant(0, 50))
        .build_pool(2)
        .unwrap();
    pool.init().await.unwrap();
    pool
}

#[tokio::test]
async fn redis_backend_round_trip_expiry_and_purge() {
    use fred::prelude::*;
    let server = TestRedis::start();
    let pool = connected_pool(&server).await;
    let r = RedisBackend::new(pool.clone());
    let k = CacheKey::new(
        &Arc::from("users"),
        "h",
        "/users/1",
        Some("b=1&a=2"),
        Some("alice"),
    );
    assert_eq!(r.get(&k).await.unwrap(), None);
    let mut e = entry(100);
    e.vary = vec![(
        header::ACCEPT_LANGUAGE,
        Some(HeaderValue::from_static("de")),
    )];
    r.put(&k, e.clone(), Duration::from_secs(90)).await.unwrap();
    assert_eq!(r.get(&k).await.unwrap(), Some(e));
    let pttl: i64 = pool.pttl(k.as_str()).await.unwrap();
    assert!((89_000..=90_000).contains(&pttl), "PX keep_for: {pttl}");
    let raw: Bytes = pool.get(k.as_str()).await.unwrap();
    assert_eq!(raw[0], 1, "version byte first");

    // A value that is not ours reads as an error (the lookup treats it as a miss).
    let _: () = pool
        .set(k.as_str(), "garbage", None, None, false)
        .await
        .unwrap();
    assert!(matches!(r.get(&k).await, Err(CacheError::Decode(_))));

    for (svc, path) in [
        ("users", "/users/1"),
        ("users", "/users/1/orders"),
        ("users", "/users/2"),
        ("orders", "/users/1"),
        ("users", "/a*b"),
    ] {
        let k = CacheKey::new(&Arc::from(svc), "h", path, None, None);
        r.put(&k, entry(1), Duration::from_secs(60)).await.unwrap();
    }
    // The garbage key is /users/1 too (of users, per user alice).
    assert_eq!(r.purge("/users/1", Some("users")).await, Ok(3));
    assert_eq!(
        r.purge("/a*", None).await,
        Ok(1),
        "glob characters match literally"
    );
    assert_eq!(r.purge("/users/1", None).await, Ok(1));
    assert_eq!(r.purge("/", None).await, Ok(1));
    let left: i64 = pool.dbsize().await.unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_every_request_still_forwarded_then_caching_resumes() {
    let mut server = TestRedis::start();
    let pool = connected_pool(&server).await;
    let f = fixture_with(CacheConfig::default(), Arc::new(RedisBackend::new(pool)));
    let svc = f.service("t_redis_down", "{}", false);
    let get = req("GET", "/users/1", &[]);

    let mut s = forward(svc.lookup(&get, None).await);
    respond(&mut s, &get, resp(200, &[]), "one");
    drop(s);
    f.settle().await;
    assert_eq!(&hit(svc.lookup(&get, None).await).body[..], b"one");

    server.kill();
    for _ in 0..5 {
        let started = Instant::now();
        let mut s = forward(svc.lookup(&get, None).await);
        assert!(
            started.elapsed() < Duration::from_millis(600),
            "{:?}",
            started.elapsed()
        );
        respond(&mut s, &get, resp(200, &[]), "two");
        drop(s);
        f.settle().await;
    }

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = match svc.lookup(&get, None).await {
            Lookup::Hit(served) => {
                assert_eq!(&served.body[..], b"three");
                break;
            }
            Lookup::Forward(s) => s,
        };
        respond(&mut s, &get, resp(200, &[]), "three");
        drop(s);
        f.settle().await;
        assert!(
            Instant::now() < deadline,
            "caching never resumed after Redis came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
