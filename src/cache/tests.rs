//! Unit tests of the request path, the coalescer wiring, revalidation and refresh, and both
//! backends. Time is a `ManualClock`; nothing sleeps (the Redis tests wait only for a real
//! server to start). The storage rules are tested in `policy`, answers from an entry in
//! `respond`.

use super::*;
use crate::clock::ManualClock;
use crate::redis::tests::TestRedis;
use crate::values::ByteSize;
use async_trait::async_trait;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
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

    /// A stored response as the backend holds it.
    async fn stored(&self, key: &CacheKey) -> Option<Stored> {
        let bytes = self.cache.backend.get(key).await.unwrap()?;
        Some(Stored::decode(bytes).unwrap())
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

fn key(service: &str, path: &str) -> CacheKey {
    CacheKey::new(KeyParts {
        service,
        https: false,
        host: "api.test",
        path,
        query: None,
        user: None,
    })
}

/// A spawner for tests where no refresh is expected (or possible).
fn no_spawn(r: Refresh) -> Result<(), Refresh> {
    Err(r)
}

async fn look(svc: &ServiceCache, r: &RequestHeader) -> Lookup {
    svc.lookup(r, None, false, &no_spawn).await
}

async fn look_as(svc: &ServiceCache, r: &RequestHeader, user: Option<&str>) -> Lookup {
    svc.lookup(r, user, false, &no_spawn).await
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

/// Stores `body` for `r` through a full miss.
async fn fill(
    f: &Fixture,
    svc: &ServiceCache,
    r: &RequestHeader,
    headers: &[(&str, &str)],
    body: &str,
) {
    let mut s = forward(look(svc, r).await);
    respond(&mut s, r, resp(200, headers), body);
    drop(s);
    f.settle().await;
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

/// Refresh tickets handed to the spawner, for the test to run as the subrequest would.
#[derive(Clone, Default)]
struct Spawned(Arc<Mutex<Vec<Refresh>>>);

impl Spawned {
    fn spawner(&self) -> impl Fn(Refresh) -> Result<(), Refresh> + Send + Sync + 'static {
        let tickets = Arc::clone(&self.0);
        move |r| {
            tickets.lock().unwrap().push(r);
            Ok(())
        }
    }

    fn count(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    async fn next(&self) -> Refresh {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(t) = self.0.lock().unwrap().pop() {
                    return t;
                }
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a refresh was spawned")
    }
}

/// Runs a refresh as the subrequest does, against an upstream answering `r` with `body`;
/// returns the request the upstream got and the response header as tagged.
fn run_refresh(
    ticket: Refresh,
    client: &RequestHeader,
    r: ResponseHeader,
    body: &str,
) -> (RequestHeader, ResponseHeader) {
    let mut state = CacheState::from(ticket);
    let mut upstream = client.clone();
    state.prepare_upstream_request(&mut upstream).unwrap();
    let r = respond(&mut state, client, r, body);
    (upstream, r)
}

// ----- the request path ----------------------------------------------------------------------

#[tokio::test]
async fn miss_then_hit_with_age_and_head_from_the_get_entry() {
    let f = fixture();
    let svc = f.service("t_basic", "{ttl: 60s}", false);
    let get = req("GET", "/users/1?b=2&a=1", &[]);
    let mut state = forward(look(&svc, &get).await);
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
    let same = req("GET", "/users/1?b=2&a=1", &[]);
    let served = hit(look(&svc, &same).await);
    assert_eq!(served.header.status.as_u16(), 200);
    assert_eq!(header(&served.header, X_CACHE), Some("HIT"));
    assert_eq!(header(&served.header, "age"), Some("7"));
    assert_eq!(header(&served.header, "content-length"), Some("8"));
    assert_eq!(header(&served.header, "x-served-by"), Some("u1"));
    assert_eq!(&served.body[..], b"{\"id\":1}");

    let served = hit(look(&svc, &req("HEAD", "/users/1?b=2&a=1", &[])).await);
    assert_eq!(header(&served.header, X_CACHE), Some("HIT"));
    assert_eq!(header(&served.header, "content-length"), Some("8"));
    assert!(served.body.is_empty());

    assert_eq!(count("t_basic", "miss"), 1);
    assert_eq!(count("t_basic", "hit"), 2);
}

#[tokio::test]
async fn the_key_keeps_the_query_order_and_the_scheme() {
    let f = fixture();
    let svc = f.service("t_key", "{}", false);
    fill(&f, &svc, &req("GET", "/q?a=1&a=2", &[]), &[], "one-two").await;
    hit(look(&svc, &req("GET", "/q?a=1&a=2", &[])).await);
    forward(look(&svc, &req("GET", "/q?a=2&a=1", &[])).await);
    let get = req("GET", "/q?a=1&a=2", &[]);
    let over_tls = svc.lookup(&get, None, true, &no_spawn).await;
    assert!(
        is_leader(&forward(over_tls)),
        "an https request never gets the http entry"
    );
}

#[tokio::test]
async fn cookies_bypass_a_shared_key_unless_the_service_ignores_them() {
    let f = fixture();
    let svc = f.service("t_cookie", "{}", false);
    fill(&f, &svc, &req("GET", "/c", &[]), &[], "shared").await;
    let with_cookie = req("GET", "/c", &[("cookie", "session=alice")]);
    let mut s = forward(look(&svc, &with_cookie).await);
    assert_eq!(s.x_cache(), Some("BYPASS"));
    let r = respond(&mut s, &with_cookie, resp(200, &[]), "alice's page");
    assert_eq!(header(&r, X_CACHE), Some("BYPASS"));
    drop(s);
    f.settle().await;
    assert_eq!(
        &hit(look(&svc, &req("GET", "/c", &[])).await).body[..],
        b"shared"
    );

    let ignoring = f.service("t_cookie", "{ignore_cookies: true}", false);
    assert_eq!(
        &hit(look(&ignoring, &with_cookie).await).body[..],
        b"shared"
    );
    // Authorization is never covered by ignore_cookies.
    let with_token = req("GET", "/c", &[("authorization", "Bearer x")]);
    assert_eq!(
        forward(look(&ignoring, &with_token).await).x_cache(),
        Some("BYPASS")
    );
    // Keyed per user, a cookie is no reason to bypass.
    let per_user = f.service("t_cookie_user", "{}", true);
    let s = forward(look_as(&per_user, &with_cookie, Some("alice")).await);
    assert_eq!(s.x_cache(), Some("MISS"));
}

#[tokio::test]
async fn conditional_requests_on_a_fresh_entry_get_a_304() {
    let f = fixture();
    let svc = f.service("t_304", "{}", false);
    let get = req("GET", "/v", &[]);
    fill(
        &f,
        &svc,
        &get,
        &[("etag", "\"v1\""), ("cache-control", "max-age=60")],
        "body",
    )
    .await;
    let before = metrics().not_modified.with_label_values(&["t_304"]).get();
    let served = hit(look(&svc, &req("GET", "/v", &[("if-none-match", "W/\"v1\"")])).await);
    assert_eq!(served.header.status.as_u16(), 304);
    assert_eq!(header(&served.header, X_CACHE), Some("HIT"));
    assert_eq!(header(&served.header, "etag"), Some("\"v1\""));
    assert!(served.body.is_empty());
    let served = hit(look(&svc, &req("GET", "/v", &[("if-none-match", "\"v0\"")])).await);
    assert_eq!(served.header.status.as_u16(), 200);
    assert_eq!(
        metrics().not_modified.with_label_values(&["t_304"]).get(),
        before + 1
    );
    assert_eq!(count("t_304", "hit"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_entry_with_a_validator_is_revalidated_and_a_304_refreshes_it() {
    let f = fixture();
    let svc = f.service("t_reval", "{ttl: 10s}", false);
    let get = req("GET", "/r", &[]);
    let validators = [
        ("etag", "\"v1\""),
        ("last-modified", "Tue, 14 Nov 2023 22:13:20 GMT"),
    ];
    fill(
        &f,
        &svc,
        &get,
        &[&validators[..], &[("x-version", "1")]].concat(),
        "original",
    )
    .await;
    f.clock.advance(Duration::from_secs(11));

    // The client asks with its own validator and a range: the refresh asks for neither.
    let client = req(
        "GET",
        "/r",
        &[("if-none-match", "\"v1\""), ("range", "bytes=0-1")],
    );
    let spawned = Spawned::default();
    let lookup = {
        let (svc, client, spawner) = (svc.clone(), client.clone(), spawned.spawner());
        tokio::spawn(async move { svc.lookup(&client, None, false, &spawner).await })
    };
    let ticket = spawned.next().await;
    let (upstream, r) = run_refresh(
        ticket,
        &client,
        resp(
            304,
            &[
                ("etag", "\"v1\""),
                ("x-version", "2"),
                ("cache-control", "max-age=5"),
            ],
        ),
        "",
    );
    assert_eq!(header(&r, X_CACHE), Some("REVALIDATED"));
    assert_eq!(upstream.headers.get("if-none-match").unwrap(), "\"v1\"");
    assert_eq!(
        upstream.headers.get("if-modified-since").unwrap(),
        "Tue, 14 Nov 2023 22:13:20 GMT"
    );
    assert!(upstream.headers.get("range").is_none());
    // The waiting client's validator matches the refreshed entry: 304, tagged REVALIDATED.
    let served = hit(lookup.await.unwrap());
    assert_eq!(served.header.status.as_u16(), 304);
    assert_eq!(header(&served.header, X_CACHE), Some("REVALIDATED"));
    f.settle().await;

    // Fresh again, with the 304's headers and the old body, for max-age=5.
    let served = hit(look(&svc, &get).await);
    assert_eq!(header(&served.header, X_CACHE), Some("HIT"));
    assert_eq!(header(&served.header, "x-version"), Some("2"));
    assert_eq!(header(&served.header, "age"), Some("0"));
    assert_eq!(&served.body[..], b"original");
    f.clock.advance(Duration::from_secs(6));
    assert_eq!(spawned.count(), 0);
    let stale_again = svc.lookup(&get, None, false, &no_spawn).await;
    assert!(
        is_leader(&forward(stale_again)),
        "no spawner: fetched whole by the request"
    );
    assert_eq!(
        metrics()
            .revalidations
            .with_label_values(&["t_reval", "not_modified"])
            .get(),
        1
    );
    assert_eq!(count("t_reval", "revalidated"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revalidation_answered_200_replaces_the_entry_and_a_5xx_keeps_it() {
    let f = fixture();
    let svc = f.service("t_reval_200", "{ttl: 10s, stale_if_error: 1m}", false);
    let get = req("GET", "/r", &[]);
    fill(&f, &svc, &get, &[("etag", "\"v1\"")], "one").await;
    f.clock.advance(Duration::from_secs(11));

    // 5xx while validating: the waiting request gets the stale copy, the entry stays.
    let spawned = Spawned::default();
    let lookup = {
        let (svc, get, spawner) = (svc.clone(), get.clone(), spawned.spawner());
        tokio::spawn(async move { svc.lookup(&get, None, false, &spawner).await })
    };
    run_refresh(spawned.next().await, &get, resp(503, &[]), "down");
    let served = hit(lookup.await.unwrap());
    assert_eq!(header(&served.header, X_CACHE), Some("STALE"));
    assert_eq!(&served.body[..], b"one");
    assert_eq!(
        metrics()
            .revalidations
            .with_label_values(&["t_reval_200", "error"])
            .get(),
        1
    );

    // A 200: the new response replaces the entry; the request that waited says MISS.
    let lookup = {
        let (svc, get, spawner) = (svc.clone(), get.clone(), spawned.spawner());
        tokio::spawn(async move { svc.lookup(&get, None, false, &spawner).await })
    };
    run_refresh(
        spawned.next().await,
        &get,
        resp(200, &[("etag", "\"v2\"")]),
        "two",
    );
    let served = hit(lookup.await.unwrap());
    assert_eq!(header(&served.header, X_CACHE), Some("MISS"));
    assert_eq!(&served.body[..], b"two");
    f.settle().await;
    let served = hit(look(&svc, &get).await);
    assert_eq!(
        (header(&served.header, "etag"), &served.body[..]),
        (Some("\"v2\""), &b"two"[..])
    );
    assert_eq!(
        metrics()
            .revalidations
            .with_label_values(&["t_reval_200", "modified"])
            .get(),
        1
    );

    // Now not storable: the stale entry goes.
    f.clock.advance(Duration::from_secs(11));
    let lookup = {
        let (svc, get, spawner) = (svc.clone(), get.clone(), spawned.spawner());
        tokio::spawn(async move { svc.lookup(&get, None, false, &spawner).await })
    };
    run_refresh(
        spawned.next().await,
        &get,
        resp(200, &[("cache-control", "no-store")]),
        "x",
    );
    forward(lookup.await.unwrap());
    f.settle().await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while f.stored(&key("t_reval_200", "/r")).await.is_some() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the unstorable answer removed the stale entry");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_stale_while_revalidate_the_stale_copy_is_served_and_one_refresh_runs() {
    let f = fixture();
    let svc = f.service("t_swr", "{ttl: 10s, stale_while_revalidate: 30s}", false);
    let get = req("GET", "/s", &[]);
    fill(&f, &svc, &get, &[], "old").await;
    f.clock.advance(Duration::from_secs(15));
    let spawned = Spawned::default();
    let spawner = spawned.spawner();
    for _ in 0..5 {
        let served = hit(svc.lookup(&get, None, false, &spawner).await);
        assert_eq!(header(&served.header, X_CACHE), Some("STALE"));
        assert_eq!(&served.body[..], b"old");
    }
    assert_eq!(spawned.count(), 1, "one refresh for five stale answers");
    // A miss arriving meanwhile (another request without the entry) follows the refresh.
    let ticket = spawned.next().await;
    let (_, r) = run_refresh(ticket, &get, resp(200, &[]), "new");
    assert_eq!(header(&r, X_CACHE), Some("MISS"));
    f.settle().await;
    let served = hit(look(&svc, &get).await);
    assert_eq!(
        (header(&served.header, X_CACHE), &served.body[..]),
        (Some("HIT"), &b"new"[..])
    );
    let started = metrics()
        .background_refreshes
        .with_label_values(&["t_swr", "started"]);
    assert_eq!(started.get(), 1);

    // A failing refresh keeps the stale copy.
    f.clock.advance(Duration::from_secs(15));
    hit(svc.lookup(&get, None, false, &spawner).await);
    run_refresh(spawned.next().await, &get, resp(500, &[]), "");
    f.settle().await;
    let served = hit(svc.lookup(&get, None, false, &spawner).await);
    assert_eq!(
        (header(&served.header, X_CACHE), &served.body[..]),
        (Some("STALE"), &b"new"[..])
    );
    drop(spawned.next().await);

    // Beyond the bound of background refreshes, stale copies are served without one.
    let all = Arc::clone(&f.cache.background)
        .acquire_many_owned(MAX_BACKGROUND_REFRESHES as u32)
        .await
        .unwrap();
    f.settle().await;
    hit(svc.lookup(&get, None, false, &spawner).await);
    assert_eq!(spawned.count(), 0);
    let skipped = metrics()
        .background_refreshes
        .with_label_values(&["t_swr", "skipped"]);
    assert_eq!(skipped.get(), 1);
    drop(all);
    // HEAD never starts one.
    hit(svc
        .lookup(&req("HEAD", "/s", &[]), None, false, &spawner)
        .await);
    assert_eq!(spawned.count(), 0);
}

#[tokio::test]
async fn a_stale_answer_to_a_conditional_request_is_a_304_too() {
    let f = fixture();
    let svc = f.service("t_stale_304", "{ttl: 1s, stale_if_error: 1h}", false);
    let get = req("GET", "/x", &[]);
    fill(&f, &svc, &get, &[], "x").await;
    f.clock.advance(Duration::from_secs(5));
    let cond = req("GET", "/x", &[("if-none-match", "*")]);
    let mut s = forward(look(&svc, &cond).await);
    let stale = s.take_stale(&cond).unwrap();
    assert_eq!(stale.header.status.as_u16(), 304);
    assert_eq!(header(&stale.header, X_CACHE), Some("STALE"));
}

#[tokio::test]
async fn head_misses_are_not_stored_and_other_methods_are_left_alone() {
    let f = fixture();
    let svc = f.service("t_head", "{}", false);
    let head = req("HEAD", "/x", &[]);
    let mut state = forward(look(&svc, &head).await);
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
    forward(look(&svc, &req("GET", "/x", &[])).await);

    let post = req("POST", "/x", &[]);
    let mut state = forward(look(&svc, &post).await);
    assert_eq!(state.x_cache(), None);
    let r = respond(&mut state, &post, resp(200, &[]), "created");
    assert_eq!(header(&r, X_CACHE), None);
}

#[tokio::test]
async fn a_client_asking_for_no_cache_bypasses_lookup_and_store() {
    let f = fixture();
    let svc = f.service("t_bypass", "{}", false);
    let get = req("GET", "/x", &[]);
    let mut s = forward(look(&svc, &get).await);
    respond(&mut s, &get, resp(200, &[]), "v1");
    drop(s);
    f.settle().await;

    let fresh = req("GET", "/x", &[("cache-control", "no-cache")]);
    let mut s = forward(look(&svc, &fresh).await);
    assert_eq!(s.x_cache(), Some("BYPASS"));
    let r = respond(&mut s, &fresh, resp(200, &[]), "v2");
    assert_eq!(header(&r, X_CACHE), Some("BYPASS"));
    drop(s);
    f.settle().await;
    assert_eq!(
        &hit(look(&svc, &get).await).body[..],
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
    let s = forward(look_as(&shared, &alice_get, Some("alice")).await);
    assert_eq!(s.x_cache(), Some("BYPASS"));

    let per_user = f.service("t_auth_user", "{}", true);
    let mut s = forward(look_as(&per_user, &alice_get, Some("alice")).await);
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
        &hit(look_as(&per_user, &alice_get, Some("alice")).await).body[..],
        b"alice's"
    );

    let bob_get = req("GET", "/me", &[("authorization", "Bearer b")]);
    let mut s = forward(look_as(&per_user, &bob_get, Some("bob")).await);
    respond(
        &mut s,
        &bob_get,
        resp(200, &[("cache-control", "private")]),
        "bob's",
    );
    drop(s);
    f.settle().await;
    assert_eq!(
        &hit(look_as(&per_user, &bob_get, Some("bob")).await).body[..],
        b"bob's"
    );
    assert_eq!(
        &hit(look_as(&per_user, &alice_get, Some("alice")).await).body[..],
        b"alice's"
    );

    // Authorization without an identity cannot be keyed per user: bypass.
    let s = forward(look_as(&per_user, &alice_get, None).await);
    assert_eq!(s.x_cache(), Some("BYPASS"));
    // vary_by_user: false overrides the auth default.
    let off = f.service("t_auth_off", "{vary_by_user: false}", true);
    assert_eq!(
        forward(look_as(&off, &alice_get, Some("alice")).await).x_cache(),
        Some("BYPASS")
    );
}

#[tokio::test]
async fn an_encoded_response_varies_on_accept_encoding_whether_or_not_it_says_so() {
    let f = fixture();
    let svc = f.service("t_enc", "{}", false);
    let gzip = req("GET", "/page", &[("accept-encoding", "gzip")]);
    let mut s = forward(look(&svc, &gzip).await);
    let sent = respond(
        &mut s,
        &gzip,
        resp(200, &[("content-encoding", "gzip"), ("vary", "Origin")]),
        "gz",
    );
    drop(s);
    f.settle().await;
    // The client hears it too, in the upstream's Vary line.
    assert_eq!(header(&sent, "vary"), Some("Origin, Accept-Encoding"));
    let Some(Stored::Variants(index)) = f.stored(&key("t_enc", "/page")).await else {
        panic!("stored as a variant")
    };
    assert_eq!(index.names, [header::ACCEPT_ENCODING, header::ORIGIN]);
    assert_eq!(&hit(look(&svc, &gzip).await).body[..], b"gz");
    for other in [
        req("GET", "/page", &[]),
        req("GET", "/page", &[("accept-encoding", "br")]),
        req("GET", "/page", &[("accept-encoding", "gzip;q=0")]),
    ] {
        forward(look(&svc, &other).await);
    }
    // `identity` is no coding: stored for everyone.
    let plain = req("GET", "/plain", &[("accept-encoding", "gzip")]);
    fill(&f, &svc, &plain, &[("content-encoding", "identity")], "p").await;
    assert_eq!(
        &hit(look(&svc, &req("GET", "/plain", &[])).await).body[..],
        b"p"
    );
}

#[tokio::test]
async fn every_vary_variant_is_kept_under_its_own_key_up_to_max_variants() {
    let cfg = CacheConfig {
        max_variants: 2,
        ..CacheConfig::default()
    };
    let f = fixture_with(cfg, Arc::new(MemoryBackend::new(1 << 20)));
    let svc = f.service("t_vary", "{}", false);
    let lang = |l: &str| req("GET", "/greeting", &[("accept-language", l)]);
    let vary = [("vary", "Accept-Language")];
    fill(&f, &svc, &lang("de"), &vary, "hallo").await;
    assert_eq!(&hit(look(&svc, &lang("de")).await).body[..], b"hallo");
    let s = forward(look(&svc, &lang("en")).await);
    assert!(is_leader(&s), "another variant is a miss of its own");
    drop(s);
    f.settle().await;
    fill(&f, &svc, &lang("en"), &vary, "hello").await;
    assert_eq!(&hit(look(&svc, &lang("en")).await).body[..], b"hello");
    assert_eq!(
        &hit(look(&svc, &lang("de")).await).body[..],
        b"hallo",
        "storing English kept German"
    );
    // Absent is a variant of its own.
    fill(&f, &svc, &req("GET", "/greeting", &[]), &vary, "hi").await;
    let primary = key("t_vary", "/greeting");
    let Some(Stored::Variants(index)) = f.stored(&primary).await else {
        panic!("the primary key holds the variant index")
    };
    assert_eq!(index.names, [header::ACCEPT_LANGUAGE]);
    assert_eq!(index.variants.len(), 2, "max_variants: 2");
    // The oldest (German) went, from the index and from the backend.
    forward(look(&svc, &lang("de")).await);
    let de_key = primary.variant(&index.names, &lang("de").headers);
    assert!(f.cache.backend.get(&de_key).await.unwrap().is_none());
    assert_eq!(&hit(look(&svc, &lang("en")).await).body[..], b"hello");

    // A miss finds the response now varies on another header: old variants are dropped.
    let enc = req(
        "GET",
        "/greeting",
        &[("accept-language", "it"), ("accept-encoding", "gzip")],
    );
    let mut s = forward(look(&svc, &enc).await);
    respond(
        &mut s,
        &enc,
        resp(200, &[("vary", "Accept-Encoding")]),
        "gz",
    );
    drop(s);
    f.settle().await;
    let Some(Stored::Variants(index)) = f.stored(&primary).await else {
        panic!()
    };
    assert_eq!(index.names, [header::ACCEPT_ENCODING]);
    assert_eq!(index.variants.len(), 1);
    assert_eq!(&hit(look(&svc, &enc).await).body[..], b"gz");

    // Vary: * is never stored.
    let any = req("GET", "/star", &[]);
    let mut s = forward(look(&svc, &any).await);
    respond(&mut s, &any, resp(200, &[("vary", "*")]), "x");
    drop(s);
    f.settle().await;
    forward(look(&svc, &any).await);
    assert!(f.stored(&key("t_vary", "/star")).await.is_none());

    // A purge of the URL removes the index and every variant.
    fill(&f, &svc, &lang("fr"), &vary, "salut").await;
    let purged = f.cache.purge("/greeting", Some("t_vary")).await.unwrap();
    assert_eq!(purged, 2, "index and the one variant of the new Vary");
    forward(look(&svc, &lang("fr")).await);
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
        let mut s = forward(look(&svc, &get).await);
        let r = respond(&mut s, &get, resp(status, headers), "body");
        assert_eq!(header(&r, X_CACHE), Some("MISS"));
        drop(s);
        f.settle().await;
        forward(look(&svc, &get).await);
    }
}

#[tokio::test]
async fn fresh_then_stale_on_error_then_expired() {
    let f = fixture();
    let svc = f.service("t_stale", "{ttl: 10s, stale_if_error: 1m}", false);
    let get = req("GET", "/orders/7", &[]);
    let mut s = forward(look(&svc, &get).await);
    respond(&mut s, &get, resp(200, &[]), "order");
    drop(s);
    f.settle().await;

    f.clock.advance(Duration::from_secs(9));
    hit(look(&svc, &get).await);

    f.clock.advance(Duration::from_secs(11));
    let mut s = forward(look(&svc, &get).await);
    assert_eq!(s.x_cache(), Some("MISS"));
    let stale = s.take_stale(&get).expect("within stale_if_error");
    assert_eq!(header(&stale.header, X_CACHE), Some("STALE"));
    assert_eq!(header(&stale.header, "age"), Some("20"));
    assert_eq!(&stale.body[..], b"order");
    assert_eq!(s.x_cache(), Some("STALE"));
    drop(s);
    assert_eq!(count("t_stale", "stale"), 1);

    f.clock.advance(Duration::from_secs(50)); // 70s: ttl 10s + stale_if_error 60s
    let mut s = forward(look(&svc, &get).await);
    assert!(s.take_stale(&get).is_none(), "past ttl + stale_if_error");
}

#[tokio::test]
async fn max_age_shortens_freshness() {
    let f = fixture();
    let svc = f.service("t_maxage", "{ttl: 5m, stale_if_error: 1h}", false);
    let get = req("GET", "/x", &[]);
    let mut s = forward(look(&svc, &get).await);
    respond(
        &mut s,
        &get,
        resp(200, &[("cache-control", "public, max-age=2")]),
        "x",
    );
    drop(s);
    f.settle().await;
    f.clock.advance(Duration::from_millis(1_999));
    hit(look(&svc, &get).await);
    f.clock.advance(Duration::from_millis(2));
    let mut s = forward(look(&svc, &get).await);
    assert!(
        s.take_stale(&get).is_some(),
        "stale_if_error still counts from the capped ttl"
    );
}

#[tokio::test]
async fn bodies_over_max_body_size_stream_through_unstored() {
    let f = fixture(); // max_body_size 1024
    let svc = f.service("t_big", "{}", false);
    let get = req("GET", "/big", &[]);
    let mut s = forward(look(&svc, &get).await);
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
    forward(look(&svc, &get).await);

    // Known too large from Content-Length: not even buffered.
    let get = req("GET", "/big2", &[]);
    let mut s = forward(look(&svc, &get).await);
    let mut r = resp(200, &[("content-length", "5000")]);
    s.start_fill(&get, &mut r);
    assert!(matches!(&s.0, Inner::Miss(m) if m.fill.is_none()));

    // Exactly the limit is fine.
    let get = req("GET", "/fits", &[]);
    let mut s = forward(look(&svc, &get).await);
    respond(&mut s, &get, resp(200, &[]), &"y".repeat(1024));
    drop(s);
    f.settle().await;
    assert_eq!(hit(look(&svc, &get).await).body.len(), 1024);
}

#[tokio::test]
async fn bodyless_responses_complete_at_the_header() {
    let f = fixture();
    let svc = f.service("t_204", "{}", false);
    let get = req("GET", "/empty", &[]);
    let mut s = forward(look(&svc, &get).await);
    let mut r = resp(204, &[]);
    s.start_fill(&get, &mut r);
    drop(s);
    f.settle().await;
    let served = hit(look(&svc, &get).await);
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
        let mut s = forward(look(svc, &get).await);
        respond(&mut s, &get, resp(200, &[]), path);
    }
    f.settle().await;
    assert_eq!(
        f.cache.purge("/users/1", Some("t_purge_users")).await,
        Ok(3)
    );
    hit(look(&users, &req("GET", "/users/2", &[])).await);
    hit(look(&other, &req("GET", "/users/1", &[])).await);
    forward(look(&users, &req("GET", "/users/1", &[])).await);
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
            let l = look(&svc, &req("GET", "/hot", &[])).await;
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
    let key = key("t_coalesce", "/hot");
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
    let key = key("t_leader_gone", "/hot");
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
    let mut s = forward(look(&svc, &get).await);
    respond(&mut s, &get, resp(200, &[]), "old");
    drop(s);
    f.settle().await;
    f.clock.advance(Duration::from_secs(5));

    let key = key("t_stale_followers", "/hot");
    let (mut leader, mut rx) = start_concurrent(&svc, 10).await;
    wait_for_waiters(&f, key.as_str(), 9).await;
    let stale = leader.take_stale(&get).expect("leader has the stale copy");
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
    async fn get(&self, _: &CacheKey) -> Result<Option<Bytes>, CacheError> {
        Err(CacheError::Backend("down".into()))
    }
    async fn put(&self, _: &CacheKey, _: Bytes, _: Duration) -> Result<(), CacheError> {
        self.0.store(true, Ordering::SeqCst);
        Err(CacheError::Backend("down".into()))
    }
    async fn remove(&self, _: &CacheKey) -> Result<(), CacheError> {
        Err(CacheError::Backend("down".into()))
    }
    async fn purge(&self, _: &PurgeFilter) -> Result<u64, CacheError> {
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
    let mut a = forward(look(&svc, &get).await);
    let b = forward(look(&svc, &get).await);
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

fn entry(body_len: usize) -> Bytes {
    CachedResponse {
        status: 200,
        headers: vec![(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"))],
        body: Bytes::from(vec![b'x'; body_len]),
        stored_at_ms: T0,
        ttl_ms: 60_000,
        swr_ms: 0,
        sie_ms: 0,
        vary: vec![],
    }
    .encode()
}

fn key_n(service: &str, i: usize) -> CacheKey {
    key(service, &format!("/items/{i}"))
}

#[tokio::test]
async fn memory_backend_stays_within_its_byte_bound() {
    let m = MemoryBackend::new(80 * 1024);
    let max = memory::entry_budget(80 * 1024);
    assert_eq!(max, 40 * 1024, "half for entries, half for the allocator");
    let one = memory::weight(&key_n("s", 0), &entry(4096));
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
        present as u64 <= max / one && present as u64 * 2 >= max / one,
        "{present} entries of {one} bytes in {max}"
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

#[test]
fn an_entry_weighs_its_allocation_its_key_and_the_fixed_overhead() {
    let k = key_n("s", 1);
    let value = entry(200);
    assert_eq!(
        memory::weight(&k, &value),
        (k.as_str().len() + value.len() + value.len() / 8) as u64 + ENTRY_OVERHEAD
    );
    assert_eq!(memory::allocated(800), 900);
    assert_eq!(memory::allocated(128 << 10), (128 << 10) + (16 << 10));
    assert_eq!(memory::allocated(200_000), 256 << 10);
    assert_eq!(memory::allocated(256 << 10), 256 << 10);
    assert_eq!(memory::allocated((256 << 10) + 1), 320 << 10);
}

#[tokio::test]
async fn memory_backend_round_trip_replace_and_remove() {
    let m = MemoryBackend::new(1 << 20);
    let k = key_n("s", 1);
    assert_eq!(m.get(&k).await.unwrap(), None);
    m.put(&k, entry(10), Duration::from_secs(60)).await.unwrap();
    assert_eq!(m.get(&k).await.unwrap(), Some(entry(10)));
    m.put(&k, entry(20), Duration::from_secs(60)).await.unwrap();
    assert_eq!(m.get(&k).await.unwrap(), Some(entry(20)));
    m.remove(&k).await.unwrap();
    assert_eq!(m.get(&k).await.unwrap(), None);
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
async fn redis_backend_round_trip_expiry_remove_and_purge() {
    use fred::prelude::*;
    let server = TestRedis::start();
    let pool = connected_pool(&server).await;
    let r = RedisBackend::new(pool.clone());
    let k = CacheKey::new(KeyParts {
        service: "users",
        https: true,
        host: "h",
        path: "/users/1",
        query: Some("b=1&a=2"),
        user: Some("alice"),
    });
    assert_eq!(r.get(&k).await.unwrap(), None);
    r.put(&k, entry(100), Duration::from_secs(90))
        .await
        .unwrap();
    assert_eq!(r.get(&k).await.unwrap(), Some(entry(100)));
    let pttl: i64 = pool.pttl(k.as_str()).await.unwrap();
    assert!((89_000..=90_000).contains(&pttl), "PX keep_for: {pttl}");
    let raw: Bytes = pool.get(k.as_str()).await.unwrap();
    assert_eq!(raw[0], 2, "version byte first");
    r.remove(&k).await.unwrap();
    assert_eq!(r.get(&k).await.unwrap(), None);

    // A value that is not ours reads back as is; the cache treats it as a miss.
    let _: () = pool
        .set(k.as_str(), "garbage", None, None, false)
        .await
        .unwrap();
    assert!(Stored::decode(r.get(&k).await.unwrap().unwrap()).is_err());

    let primary = key("users", "/users/1");
    let variant = primary.variant(&[header::ACCEPT], &HeaderMap::new());
    for k in [
        primary.clone(),
        variant,
        key("users", "/users/1/orders"),
        key("users", "/users/2"),
        key("orders", "/users/1"),
        key("users", "/a*b"),
    ] {
        r.put(&k, entry(1), Duration::from_secs(60)).await.unwrap();
    }
    // The garbage key is /users/1 too (of users, per user alice).
    let purge = |prefix, service| {
        let filter = PurgeFilter::new(prefix, service);
        let r = &r;
        async move { r.purge(&filter).await }
    };
    assert_eq!(purge("/users/1", Some("users")).await, Ok(4));
    assert_eq!(
        purge("/a*", None).await,
        Ok(1),
        "glob characters match literally"
    );
    assert_eq!(purge("/users/1", None).await, Ok(1));
    assert_eq!(purge("/", None).await, Ok(1));
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

    let mut s = forward(look(&svc, &get).await);
    respond(&mut s, &get, resp(200, &[]), "one");
    drop(s);
    f.settle().await;
    assert_eq!(&hit(look(&svc, &get).await).body[..], b"one");

    server.kill();
    for _ in 0..5 {
        let started = Instant::now();
        let mut s = forward(look(&svc, &get).await);
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
        let mut s = match look(&svc, &get).await {
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
