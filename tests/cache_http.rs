//! HTTP caching as RFC 9111 and 9110 describe it, end to end: the real gateway in front of an
//! origin (a small HTTP/1.1 server in this file that serves versioned resources with `ETag`
//! and `Last-Modified` and answers conditional requests with `304`), counting what reaches
//! the origin. Every scenario runs once per backend (`<scenario>::memory`, `::redis`), except
//! the resident-memory bound, which is the memory backend's.
//!
//! Covered: `304`s from stored entries, revalidation of stale entries with conditional
//! requests, stale-while-revalidate with one background refresh, every `Vary` variant under
//! its own key, byte ranges, the cache key (scheme, query order, credentials), cache
//! deception and poisoning attempts, and resident memory under churn.

mod common;

use common::{client, free_port, poll_until, Gateway, Redis};
use reqwest::blocking::{Client, Response};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Memory,
    Redis,
}

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
    conditional_requests_on_a_fresh_entry_are_answered_304,
    a_stale_entry_is_revalidated_and_a_304_refreshes_it_without_the_body,
    a_revalidation_answered_200_replaces_the_entry_and_a_failure_keeps_it,
    stale_while_revalidate_serves_at_once_and_refreshes_once,
    every_vary_variant_is_kept_bounded_and_purged_together,
    ranges_are_answered_from_the_stored_entry,
    http_and_https_never_share_an_entry,
    query_order_and_credentials_are_part_of_the_key,
    private_responses_and_unkeyed_inputs_are_never_shared,
);

// ---------------------------------------------------------------------------------------------
// The origin

/// What the origin serves; tests change it while it runs.
struct OriginState {
    /// Bumped to change the representation: the body, `ETag` and `Last-Modified` follow.
    version: u64,
    cache_control: String,
    /// Answer every request with this status and no validators (0: behave).
    fail: u16,
    delay: Duration,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    /// Requests that carried `If-None-Match` or `If-Modified-Since`.
    conditional: AtomicU64,
    not_modified: AtomicU64,
}

/// One request as the origin saw it: method, target and lower-case headers.
#[derive(Clone, Debug)]
struct Seen {
    target: String,
    headers: HashMap<String, String>,
}

struct Origin {
    addr: String,
    state: Arc<Mutex<OriginState>>,
    counters: Arc<Counters>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

/// `Last-Modified` of a version: a fixed date plus one hour per version.
fn last_modified(version: u64) -> String {
    httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(1_600_000_000 + version * 3600))
}

impl Origin {
    fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(OriginState {
            version: 1,
            cache_control: "public, max-age=60".into(),
            fail: 0,
            delay: Duration::ZERO,
        }));
        let counters = Arc::new(Counters::default());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let origin = Origin {
            addr,
            state: Arc::clone(&state),
            counters: Arc::clone(&counters),
            seen: Arc::clone(&seen),
        };
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (state, counters, seen) = (state.clone(), counters.clone(), seen.clone());
                thread::spawn(move || serve_connection(stream, &state, &counters, &seen));
            }
        });
        origin
    }

    fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::SeqCst)
    }

    fn conditional(&self) -> u64 {
        self.counters.conditional.load(Ordering::SeqCst)
    }

    fn not_modified(&self) -> u64 {
        self.counters.not_modified.load(Ordering::SeqCst)
    }

    fn last_seen(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }

    fn set(&self, f: impl FnOnce(&mut OriginState)) {
        f(&mut self.state.lock().unwrap())
    }
}

fn serve_connection(
    stream: TcpStream,
    state: &Mutex<OriginState>,
    counters: &Counters,
    seen: &Mutex<Vec<Seen>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = match (parts.next(), parts.next()) {
            (Some(m), Some(t)) => (m.to_string(), t.to_string()),
            _ => return,
        };
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((n, v)) = h.split_once(':') {
                let (n, v) = (n.trim().to_ascii_lowercase(), v.trim().to_string());
                headers
                    .entry(n)
                    .and_modify(|old: &mut String| *old = format!("{old}, {v}"))
                    .or_insert(v);
            }
        }
        let body_len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut sink = vec![0; body_len];
        if reader.read_exact(&mut sink).is_err() {
            return;
        }
        counters.requests.fetch_add(1, Ordering::SeqCst);
        seen.lock().unwrap().push(Seen {
            target: target.clone(),
            headers: headers.clone(),
        });
        let response = respond(&method, &target, &headers, state, counters);
        if out.write_all(&response).is_err() {
            return;
        }
    }
}

/// The origin's answer. Query parameters: `vary=NAME` (the response varies on that request
/// header and its body names the value), `bytes=N` (a body of `N` bytes, `a`..`z` repeating),
/// `cc=VALUE` (`Cache-Control` for this URL instead of the origin's), `private_body=1` (the
/// body names the request's `Cookie`).
fn respond(
    method: &str,
    target: &str,
    headers: &HashMap<String, String>,
    state: &Mutex<OriginState>,
    counters: &Counters,
) -> Vec<u8> {
    let (version, cache_control, fail, delay) = {
        let s = state.lock().unwrap();
        (s.version, s.cache_control.clone(), s.fail, s.delay)
    };
    if !delay.is_zero() {
        thread::sleep(delay);
    }
    let date = httpdate::fmt_http_date(SystemTime::now());
    if fail != 0 {
        let body = "failing";
        return format!(
            "HTTP/1.1 {fail} Failing\r\ncontent-length: {}\r\ndate: {date}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: HashMap<&str, &str> = query.split('&').filter_map(|p| p.split_once('=')).collect();
    let cache_control = params
        .get("cc")
        .map(|v| v.replace("%20", " ").replace("%2C", ","))
        .unwrap_or(cache_control);
    let etag = format!("\"v{version}\"");
    let lm = last_modified(version);
    let mut extra = String::new();
    let mut body = format!("{path} version {version}");
    if let Some(name) = params.get("vary") {
        extra.push_str(&format!("vary: {name}\r\n"));
        let value = headers.get(&name.to_ascii_lowercase()).map_or("-", |v| v);
        body.push_str(&format!(" for {value}"));
    }
    if params.contains_key("private_body") {
        let cookie = headers.get("cookie").map_or("-", |v| v);
        body.push_str(&format!(" cookie {cookie}"));
    }
    if let Some(n) = params.get("bytes").and_then(|n| n.parse::<usize>().ok()) {
        body = (0..n).map(|i| (b'a' + (i % 26) as u8) as char).collect();
    }
    let cc_line = if cache_control.is_empty() {
        String::new()
    } else {
        format!("cache-control: {cache_control}\r\n")
    };
    if headers.contains_key("if-none-match") || headers.contains_key("if-modified-since") {
        counters.conditional.fetch_add(1, Ordering::SeqCst);
    }
    let matches = match headers.get("if-none-match") {
        Some(inm) => inm
            .split(',')
            .map(|t| t.trim().trim_start_matches("W/"))
            .any(|t| t == etag || t == "*"),
        None => headers
            .get("if-modified-since")
            .and_then(|ims| httpdate::parse_http_date(ims).ok())
            .is_some_and(|ims| httpdate::parse_http_date(&lm).is_ok_and(|lm| lm <= ims)),
    };
    if matches {
        counters.not_modified.fetch_add(1, Ordering::SeqCst);
        return format!(
            "HTTP/1.1 304 Not Modified\r\netag: {etag}\r\nlast-modified: {lm}\r\n{cc_line}\
             date: {date}\r\nx-origin-version: {version}\r\n{extra}\r\n"
        )
        .into_bytes();
    }
    let mut response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\netag: {etag}\r\n\
         last-modified: {lm}\r\n{cc_line}date: {date}\r\nx-origin-version: {version}\r\n\
         {extra}\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        response.extend_from_slice(body.as_bytes());
    }
    response
}

// ---------------------------------------------------------------------------------------------
// The gateway

struct Setup {
    gw: Gateway,
    origin: Origin,
    _redis: Option<Redis>,
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A gateway with service `site` (`/`) on `origin`, with `site_cache` as its `cache:` value
/// and `cache` as extra fields of the top-level section; `server_extra` is added to `server:`.
fn start_with(
    backend: Backend,
    origin: Origin,
    cache: &str,
    site_cache: &str,
    server_extra: &str,
) -> Setup {
    let redis = matches!(backend, Backend::Redis).then(Redis::start);
    let top = match &redis {
        Some(r) => format!(
            "redis: {{url: \"{}\"}}\ncache: {{backend: redis{cache}}}",
            r.url
        ),
        None => format!("cache: {{backend: memory{cache}}}"),
    };
    let yaml = format!(
        r#"
server:
  listen: ["${{LISTEN}}"]
{server_extra}
admin: {{listen: "${{ADMIN}}"}}
{top}
services:
  site:
    routes: [{{path_prefix: /}}]
    upstreams: ["{}"]
    retries: 0
    cache: {site_cache}
"#,
        origin.addr
    );
    let gw = Gateway::start(&yaml);
    if redis.is_some() {
        poll_until(Duration::from_secs(5), "gateway connected to redis", || {
            gw.metrics().contains("breakwater_redis_up 1")
        });
    }
    Setup {
        gw,
        origin,
        _redis: redis,
    }
}

fn start(backend: Backend, site_cache: &str) -> Setup {
    start_with(backend, Origin::start(), "", site_cache, "")
}

fn get(s: &Setup, path: &str, headers: &[(&str, &str)]) -> Response {
    send(&client(), &s.gw.url(path), headers)
}

fn send(http: &Client, url: &str, headers: &[(&str, &str)]) -> Response {
    let mut req = http.get(url);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    req.send().unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

fn header(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
}

/// Status, X-Cache and body.
fn fetch(s: &Setup, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let resp = get(s, path, headers);
    let status = resp.status().as_u16();
    let cache = header(&resp, "x-cache").unwrap_or_default();
    (status, cache, resp.text().unwrap())
}

fn purge(gw: &Gateway, query: &str) -> String {
    let resp = client()
        .delete(gw.admin_url(&format!("/admin/cache?{query}")))
        .send()
        .unwrap();
    assert!(resp.status().is_success(), "{query}: {}", resp.status());
    resp.text().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. Conditional requests from clients

fn conditional_requests_on_a_fresh_entry_are_answered_304(backend: Backend) {
    let s = start(backend, "{ttl: 1m}");
    let (status, cache, body) = fetch(&s, "/doc", &[]);
    assert_eq!((status, cache.as_str()), (200, "MISS"));
    assert_eq!(body, "/doc version 1");
    let lm = last_modified(1);

    for inm in ["\"v1\"", "W/\"v1\"", "\"v0\", \"v1\"", "*"] {
        let resp = get(&s, "/doc", &[("If-None-Match", inm)]);
        assert_eq!(resp.status(), 304, "If-None-Match: {inm}");
        assert_eq!(header(&resp, "x-cache").as_deref(), Some("HIT"));
        assert_eq!(header(&resp, "etag").as_deref(), Some("\"v1\""));
        assert_eq!(
            header(&resp, "cache-control").as_deref(),
            Some("public, max-age=60")
        );
        assert!(header(&resp, "date").is_some());
        assert!(header(&resp, "age").is_some());
        assert!(header(&resp, "x-request-id").is_some());
        // RFC 9110 15.4.5: validators and caching headers, not the representation's.
        assert_eq!(header(&resp, "content-type"), None);
        assert_eq!(
            header(&resp, "last-modified"),
            None,
            "the ETag is the validator"
        );
        assert!(resp.bytes().unwrap().is_empty());
    }
    let resp = get(&s, "/doc", &[("If-Modified-Since", &lm)]);
    assert_eq!(resp.status(), 304);
    let later = last_modified(2);
    assert_eq!(
        get(&s, "/doc", &[("If-Modified-Since", &later)]).status(),
        304
    );
    // Modified since an earlier date, or another tag: the whole response.
    let earlier = last_modified(0);
    let (status, cache, body) = fetch(&s, "/doc", &[("If-Modified-Since", &earlier)]);
    assert_eq!(
        (status, cache.as_str(), body.as_str()),
        (200, "HIT", "/doc version 1")
    );
    assert_eq!(fetch(&s, "/doc", &[("If-None-Match", "\"v2\"")]).0, 200);
    // If-None-Match takes precedence: a non-matching tag beats a matching date.
    let resp = get(
        &s,
        "/doc",
        &[("If-None-Match", "\"v2\""), ("If-Modified-Since", &lm)],
    );
    assert_eq!(resp.status(), 200);
    // HEAD too.
    let head = client()
        .head(s.gw.url("/doc"))
        .header("If-None-Match", "\"v1\"")
        .send()
        .unwrap();
    assert_eq!(head.status(), 304);

    assert_eq!(
        s.origin.requests(),
        1,
        "every answer above came from the cache"
    );
    assert_eq!(
        s.gw.metric(r#"breakwater_cache_not_modified_total{service="site"}"#),
        7
    );
}

// ---------------------------------------------------------------------------------------------
// 2. Revalidation with the upstream

/// Waits out a 1 s ttl. Only where no request may be sent meanwhile (it would refresh the
/// entry) and where waiting longer changes nothing.
fn wait_stale() {
    thread::sleep(Duration::from_millis(1_100));
}

/// Requests `path` until the answer is no longer a `HIT` (the entry went stale), and returns
/// that answer. The hits before it never reach the origin.
fn fetch_when_stale(s: &Setup, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = fetch(s, path, headers);
        let fresh_hit = answer.1 == "HIT" && (answer.0 == 200 || answer.0 == 304);
        if !fresh_hit {
            return answer;
        }
        assert!(Instant::now() < deadline, "{path} never went stale");
        thread::sleep(Duration::from_millis(50));
    }
}

fn a_stale_entry_is_revalidated_and_a_304_refreshes_it_without_the_body(backend: Backend) {
    // ttl 1s; stale_if_error keeps entries long enough for any slowness of this test.
    let s = start(backend, "{ttl: 1s, stale_if_error: 1h}");
    assert_eq!(fetch(&s, "/doc", &[]).1, "MISS");
    assert_eq!(fetch(&s, "/doc", &[]).1, "HIT");

    let (status, cache, body) = fetch_when_stale(&s, "/doc", &[]);
    assert_eq!(
        (status, cache.as_str(), body.as_str()),
        (200, "REVALIDATED", "/doc version 1")
    );
    assert_eq!(s.origin.requests(), 2);
    assert_eq!(
        s.origin.not_modified(),
        1,
        "the origin answered 304, sending no body"
    );
    let seen = s.origin.last_seen();
    assert_eq!(
        seen.headers.get("if-none-match").map(String::as_str),
        Some("\"v1\"")
    );
    assert_eq!(
        seen.headers.get("if-modified-since"),
        Some(&last_modified(1))
    );
    let resp = get(&s, "/doc", &[]);
    let cache = header(&resp, "x-cache").unwrap();
    assert!(cache == "HIT" || cache == "REVALIDATED", "{cache}");
    if cache == "HIT" {
        // Fresh again (unless this machine took a second to send it).
        assert!(header(&resp, "age").unwrap().parse::<u64>().unwrap() <= 1);
    }

    // A client revalidating its own copy while the entry is stale: the gateway revalidates
    // with its validator (not the client's Range), then answers the client 304.
    let conditional = [("If-None-Match", "\"v1\""), ("Range", "bytes=0-3")];
    let (status, cache, body) = fetch_when_stale(&s, "/doc", &conditional);
    assert_eq!(
        (status, cache.as_str(), body.as_str()),
        (304, "REVALIDATED", "")
    );
    assert!(!s.origin.last_seen().headers.contains_key("range"));
    // And a client whose copy is older gets the whole refreshed response.
    let (status, cache, body) = fetch_when_stale(&s, "/doc", &[("If-None-Match", "\"v0\"")]);
    assert_eq!(
        (status, cache.as_str(), body.as_str()),
        (200, "REVALIDATED", "/doc version 1")
    );

    let revalidated = s
        .gw
        .metric(r#"breakwater_cache_revalidations_total{outcome="not_modified",service="site"}"#);
    assert!(revalidated >= 3, "{revalidated}");
    assert_eq!(
        s.origin.requests(),
        1 + revalidated,
        "no body was fetched again"
    );
    assert_eq!(s.origin.not_modified(), revalidated);
    assert_eq!(
        s.gw.metric(r#"breakwater_cache_requests_total{result="revalidated",service="site"}"#),
        revalidated
    );
}

fn a_revalidation_answered_200_replaces_the_entry_and_a_failure_keeps_it(backend: Backend) {
    let s = start(backend, "{ttl: 1s, stale_if_error: 1h}");
    assert_eq!(fetch(&s, "/doc", &[]).2, "/doc version 1");
    s.origin.set(|o| o.version = 2);
    let (status, cache, body) = fetch_when_stale(&s, "/doc", &[]);
    assert_eq!(
        (status, cache.as_str(), body.as_str()),
        (200, "MISS", "/doc version 2")
    );
    assert_eq!(
        s.origin.conditional(),
        1,
        "asked conditionally, got the new version"
    );
    assert_eq!(fetch(&s, "/doc", &[]).2, "/doc version 2");

    // The origin fails while the entry is stale: the stale copy is served and kept.
    s.origin.set(|o| o.fail = 503);
    let (status, cache, body) = fetch_when_stale(&s, "/doc", &[]);
    assert_eq!(
        (status, cache.as_str(), body.as_str()),
        (200, "STALE", "/doc version 2")
    );
    s.origin.set(|o| o.fail = 0);
    let (_, cache, body) = fetch(&s, "/doc", &[]);
    assert_eq!(
        (cache.as_str(), body.as_str()),
        ("REVALIDATED", "/doc version 2")
    );
    let outcome = |o: &str| {
        s.gw.metric(&format!(
            r#"breakwater_cache_revalidations_total{{outcome="{o}",service="site"}}"#
        ))
    };
    assert_eq!((outcome("modified"), outcome("error")), (1, 1));
    assert!(outcome("not_modified") >= 1);
    assert_eq!(s.origin.requests(), 3 + outcome("not_modified"));
}

// ---------------------------------------------------------------------------------------------
// 3. stale-while-revalidate

fn stale_while_revalidate_serves_at_once_and_refreshes_once(backend: Backend) {
    let s = start(backend, "{ttl: 1s, stale_while_revalidate: 1h}");
    assert_eq!(fetch(&s, "/doc", &[]).1, "MISS");
    s.origin.set(|o| {
        o.version = 2;
        o.delay = Duration::from_millis(1_500);
    });
    wait_stale();

    // Twenty clients at once: all get the stale copy without waiting for the slow origin,
    // and one refresh goes upstream.
    let n = 20;
    let barrier = Arc::new(Barrier::new(n));
    let url = s.gw.url("/doc");
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, url) = (barrier.clone(), url.clone());
            thread::spawn(move || {
                let http = client();
                barrier.wait();
                let started = Instant::now();
                let resp = http.get(&url).send().unwrap();
                let cache = header(&resp, "x-cache").unwrap_or_default();
                (cache, resp.text().unwrap(), started.elapsed())
            })
        })
        .collect();
    for h in handles {
        let (cache, body, took) = h.join().unwrap();
        assert_eq!((cache.as_str(), body.as_str()), ("STALE", "/doc version 1"));
        assert!(
            took < Duration::from_millis(1_000),
            "served at once, not after the origin: {took:?}"
        );
    }
    // Counted while the origin still holds the refresh (1.5 s): later, the refreshed copy
    // (ttl 1s) could go stale again on a loaded machine and start a second, legitimate one.
    poll_until(
        Duration::from_secs(5),
        "the background refresh to reach the origin",
        || s.origin.requests() >= 2,
    );
    assert_eq!(
        s.origin.requests(),
        2,
        "one refresh for twenty stale answers"
    );
    let refresh = s.origin.last_seen();
    assert!(
        refresh.headers.contains_key("if-none-match")
            || refresh.headers.contains_key("if-modified-since"),
        "the refresh was a conditional request: {refresh:?}"
    );
    assert_eq!(
        s.gw.metric(
            r#"breakwater_cache_background_refreshes_total{result="started",service="site"}"#
        ),
        1
    );
    poll_until(
        Duration::from_secs(10),
        "the background refresh to store",
        || fetch(&s, "/doc", &[]).1 == "HIT",
    );
    assert_eq!(fetch(&s, "/doc", &[]).2, "/doc version 2");

    // A refresh that fails keeps the stale copy.
    s.origin.set(|o| {
        o.fail = 500;
        o.delay = Duration::ZERO;
    });
    wait_stale();
    assert_eq!(fetch(&s, "/doc", &[]).1, "STALE");
    poll_until(Duration::from_secs(10), "the failed refresh", || {
        s.origin.requests() == 3
    });
    let (status, cache, body) = fetch(&s, "/doc", &[]);
    assert_eq!(
        (status, cache.as_str(), body.as_str()),
        (200, "STALE", "/doc version 2")
    );

    // The response's own stale-while-revalidate applies where the service sets none.
    let s = start(backend, "{ttl: 1m}");
    s.origin
        .set(|o| o.cache_control = "max-age=1, stale-while-revalidate=3600".into());
    assert_eq!(fetch(&s, "/doc", &[]).1, "MISS");
    wait_stale();
    assert_eq!(fetch(&s, "/doc", &[]).1, "STALE");
    poll_until(Duration::from_secs(10), "the background refresh", || {
        s.origin.requests() == 2
    });
}

// ---------------------------------------------------------------------------------------------
// 4. Vary

fn every_vary_variant_is_kept_bounded_and_purged_together(backend: Backend) {
    let s = start_with(
        backend,
        Origin::start(),
        ", max_variants: 3",
        "{ttl: 1h}",
        "",
    );
    let path = "/greeting?vary=Accept-Language";
    let lang = |l: &str| fetch(&s, path, &[("Accept-Language", l)]);
    for l in ["de", "en", "fr"] {
        let (_, cache, body) = lang(l);
        assert_eq!(cache, "MISS", "{l}");
        assert!(body.ends_with(&format!("for {l}")), "{body}");
    }
    for l in ["de", "en", "fr"] {
        let (_, cache, body) = lang(l);
        assert_eq!(cache, "HIT", "{l}: every variant is kept");
        assert!(body.ends_with(&format!("for {l}")), "{body}");
    }
    assert_eq!(s.origin.requests(), 3);
    // A fourth variant drops the oldest (max_variants: 3).
    assert_eq!(lang("it").1, "MISS");
    assert_eq!(lang("en").1, "HIT");
    assert_eq!(lang("de").1, "MISS", "the oldest variant went");
    assert_eq!(s.origin.requests(), 5);

    // Vary: * is never stored.
    for _ in 0..2 {
        assert_eq!(fetch(&s, "/star?vary=*", &[]).1, "MISS");
    }
    // The purge of the URL removes the variant index and every variant.
    let answer = purge(&s.gw, "prefix=/greeting");
    assert!(
        answer.contains("\"purged\":4"),
        "index + 3 variants: {answer}"
    );
    for l in ["de", "en", "fr", "it"] {
        assert_eq!(lang(l).1, "MISS", "{l} after the purge");
    }
}

// ---------------------------------------------------------------------------------------------
// 5. Ranges

fn ranges_are_answered_from_the_stored_entry(backend: Backend) {
    let s = start(backend, "{ttl: 1h}");
    let path = "/file?bytes=100";
    assert_eq!(fetch(&s, path, &[]).1, "MISS");
    let full: String = (0..100).map(|i| (b'a' + (i % 26) as u8) as char).collect();

    let resp = get(&s, path, &[("Range", "bytes=10-19")]);
    assert_eq!(resp.status(), 206);
    assert_eq!(header(&resp, "x-cache").as_deref(), Some("HIT"));
    assert_eq!(
        header(&resp, "content-range").as_deref(),
        Some("bytes 10-19/100")
    );
    assert_eq!(header(&resp, "content-length").as_deref(), Some("10"));
    assert_eq!(resp.text().unwrap(), full[10..20]);
    let resp = get(&s, path, &[("Range", "bytes=-5")]);
    assert_eq!(
        header(&resp, "content-range").as_deref(),
        Some("bytes 95-99/100")
    );
    assert_eq!(resp.text().unwrap(), full[95..]);
    let resp = get(&s, path, &[("Range", "bytes=90-")]);
    assert_eq!(resp.status(), 206);
    assert_eq!(resp.text().unwrap(), full[90..]);

    let resp = get(&s, path, &[("Range", "bytes=100-")]);
    assert_eq!(resp.status(), 416);
    assert_eq!(
        header(&resp, "content-range").as_deref(),
        Some("bytes */100")
    );
    assert!(resp.bytes().unwrap().is_empty());

    // Several ranges, or an If-Range that does not match: the whole response.
    for headers in [
        &[("Range", "bytes=0-1,5-6")][..],
        &[("Range", "bytes=0-1"), ("If-Range", "\"v0\"")],
        &[("Range", "bytes=0-1"), ("If-Range", "W/\"v1\"")],
    ] {
        let resp = get(&s, path, headers);
        assert_eq!(resp.status(), 200, "{headers:?}");
        assert_eq!(resp.text().unwrap(), full);
    }
    let resp = get(&s, path, &[("Range", "bytes=0-1"), ("If-Range", "\"v1\"")]);
    assert_eq!(resp.status(), 206);
    let resp = get(
        &s,
        path,
        &[("Range", "bytes=0-1"), ("If-Range", &last_modified(1))],
    );
    assert_eq!(resp.status(), 206);

    // HEAD is answered from the stored GET.
    let head = client().head(s.gw.url(path)).send().unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(header(&head, "x-cache").as_deref(), Some("HIT"));
    assert_eq!(header(&head, "content-length").as_deref(), Some("100"));
    assert_eq!(s.origin.requests(), 1);
}

// ---------------------------------------------------------------------------------------------
// The key (issue 10, item 6)

fn tls_client() -> Client {
    let ca = std::fs::read(fixture("tls_cert.pem")).unwrap();
    Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn http_and_https_never_share_an_entry(backend: Backend) {
    let tls_port = free_port();
    let tls = format!(
        "  tls: [{{listen: \"127.0.0.1:{tls_port}\", cert: \"{}\", key: \"{}\"}}]",
        fixture("tls_cert.pem"),
        fixture("tls_key.pem")
    );
    let s = start_with(backend, Origin::start(), "", "{ttl: 1h}", &tls);
    let host = [("Host", "api.test")];
    let https = format!("https://localhost:{tls_port}/doc");
    let over_tls = |headers: &[(&str, &str)]| {
        let resp = send(&tls_client(), &https, headers);
        header(&resp, "x-cache").unwrap_or_default()
    };
    assert_eq!(fetch(&s, "/doc", &host).1, "MISS");
    assert_eq!(fetch(&s, "/doc", &host).1, "HIT");
    assert_eq!(
        over_tls(&host),
        "MISS",
        "an https client never gets the http entry"
    );
    assert_eq!(over_tls(&host), "HIT");
    assert_eq!(s.origin.requests(), 2);
}

fn query_order_and_credentials_are_part_of_the_key(backend: Backend) {
    let s = start(backend, "{ttl: 1h}");
    assert_eq!(fetch(&s, "/q?a=1&a=2", &[]).1, "MISS");
    assert_eq!(
        fetch(&s, "/q?a=2&a=1", &[]).1,
        "MISS",
        "another order, another entry"
    );
    assert_eq!(fetch(&s, "/q?a=1&a=2", &[]).1, "HIT");
    assert_eq!(s.origin.requests(), 2);

    // Credentials on a route without per-user keys: straight to the origin, nothing stored,
    // and never the shared entry.
    for credential in [("Cookie", "session=alice"), ("Authorization", "Bearer x")] {
        let resp = get(&s, "/q?a=1&a=2&private_body=1", &[credential]);
        assert_eq!(
            header(&resp, "x-cache").as_deref(),
            Some("BYPASS"),
            "{credential:?}"
        );
        let resp = get(&s, "/q?a=1&a=2", &[credential]);
        assert_eq!(
            header(&resp, "x-cache").as_deref(),
            Some("BYPASS"),
            "{credential:?}"
        );
    }
    assert_eq!(s.origin.requests(), 6);
    assert_eq!(
        fetch(&s, "/q?a=1&a=2&private_body=1", &[]).1,
        "MISS",
        "nothing was stored"
    );
    assert_eq!(
        s.gw.metric(r#"breakwater_cache_requests_total{result="bypass",service="site"}"#),
        4
    );

    // A service that opts in shares entries with requests that carry cookies.
    let s = start(backend, "{ttl: 1h, ignore_cookies: true}");
    assert_eq!(fetch(&s, "/q", &[]).1, "MISS");
    assert_eq!(fetch(&s, "/q", &[("Cookie", "session=alice")]).1, "HIT");
    assert_eq!(
        fetch(&s, "/q", &[("Authorization", "Bearer x")]).1,
        "BYPASS"
    );
    assert_eq!(s.origin.requests(), 2);
}

fn private_responses_and_unkeyed_inputs_are_never_shared(backend: Backend) {
    let s = start(backend, "{ttl: 1h, ignore_cookies: true}");
    // Cache deception: a personal page under a path that looks static. The origin says
    // private (or no-store): never stored, whatever the extension.
    for (path, cc) in [
        ("/account/settings.css?private_body=1&cc=private", "private"),
        ("/account/avatar.png?private_body=1&cc=no-store", "no-store"),
    ] {
        let (_, cache, body) = fetch(&s, path, &[("Cookie", "session=victim")]);
        assert_eq!(cache, "MISS", "{cc}");
        assert!(body.contains("session=victim"), "{body}");
        let (_, cache, body) = fetch(&s, path, &[]);
        assert_eq!(cache, "MISS", "{cc}: the victim's page was not stored");
        assert!(!body.contains("victim"), "{body}");
    }
    // Unkeyed inputs an upstream may act on: a body on a GET, a method override.
    let before = s.origin.requests();
    let with_body = client().get(s.gw.url("/doc")).body("x=1").send().unwrap();
    assert_eq!(header(&with_body, "x-cache").as_deref(), Some("BYPASS"));
    let overridden = get(&s, "/doc", &[("X-HTTP-Method-Override", "DELETE")]);
    assert_eq!(header(&overridden, "x-cache").as_deref(), Some("BYPASS"));
    assert_eq!(fetch(&s, "/doc", &[]).1, "MISS", "neither filled the cache");
    // The forwarding headers the gateway sets are its own, whatever the client sent, so they
    // cannot make the origin answer for another host or scheme under this key.
    get(
        &s,
        "/doc?fwd",
        &[
            ("X-Forwarded-Host", "evil.test"),
            ("X-Forwarded-Proto", "https"),
        ],
    );
    let seen = s.origin.last_seen();
    assert_ne!(
        seen.headers.get("x-forwarded-host").map(String::as_str),
        Some("evil.test")
    );
    assert_eq!(
        seen.headers.get("x-forwarded-proto").map(String::as_str),
        Some("http")
    );
    assert!(seen.target.ends_with("?fwd"));
    assert_eq!(s.origin.requests(), before + 4);
}

// ---------------------------------------------------------------------------------------------
// 7. max_memory bounds resident memory

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    common::proc_status(pid, "VmRSS") * 1024
}

/// `n` requests over `threads` keep-alive clients, to `/{prefix}/{i}` (every key new), a
/// large body every `large_every`-th.
fn churn(gw: &Gateway, prefix: &str, from: usize, n: usize, large_every: usize) {
    let threads = 4;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let base = gw.url(prefix);
            thread::spawn(move || {
                let http = client();
                for i in (from + t..from + n).step_by(threads) {
                    let bytes = if i % large_every == 0 { 200_000 } else { 200 };
                    let resp = http
                        .get(format!("{base}/{i}?bytes={bytes}"))
                        .send()
                        .unwrap();
                    assert_eq!(resp.status(), 200);
                    assert_eq!(resp.bytes().unwrap().len(), bytes);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn resident_memory_stays_within_max_memory_under_churn() {
    const MAX: u64 = 32 << 20;
    let origin = Origin::start();
    origin.set(|o| o.cache_control = String::new());
    let yaml = format!(
        r#"
server: {{listen: ["${{LISTEN}}"], threads: 2}}
admin: {{listen: "${{ADMIN}}"}}
cache: {{backend: memory, max_memory: {MAX}}}
services:
  cached:
    routes: [{{path_prefix: /c}}]
    upstreams: ["{0}"]
    cache: {{ttl: 1h}}
  plain:
    routes: [{{path_prefix: /p}}]
    upstreams: ["{0}"]
"#,
        origin.addr
    );
    let gw = Gateway::start(&yaml);
    let pid = gw.pid().unwrap();
    // The baseline: a round of the same traffic, uncached, so buffers and allocator caches
    // are warm and only what the cache keeps is measured (a shorter warm-up left the baseline
    // up to 5 MB lower from run to run).
    churn(&gw, "/p", 0, 20_000, 100);
    let baseline = rss(pid);
    // Ever-new keys, 200-byte bodies with a 200 kB one every 100th: in three rounds about
    // twice the bound in small entries and four times in large ones.
    let mut peak = 0;
    for round in 0..3 {
        churn(&gw, "/c", round * 20_000, 20_000, 100);
        peak = peak.max(rss(pid));
    }
    let held = gw.metric("breakwater_cache_bytes");
    let grown = peak.saturating_sub(baseline);
    let report = format!(
        "resident memory: baseline {baseline}, peak {peak}, grown {grown} bytes ({:.2} x \
         max_memory {MAX}); cache bytes {held}",
        grown as f64 / MAX as f64
    );
    eprintln!("{report}");
    // Entries weigh at most half of max_memory; the rest is the allocator's slack.
    assert!(
        held > MAX / 3 && held <= MAX / 2,
        "the cache filled: {report}"
    );
    assert!(
        grown <= MAX + MAX / 4,
        "more than 1.25 x max_memory: {report}"
    );
}
