//! Edge protection headers, end to end: security headers on every proxied response (and
//! implementation-revealing ones removed), CORS answered by the gateway itself, and request
//! body limits, with the real `breakwater` binary in front of a real sample upstream.

mod common;

use common::{client, Gateway, Upstream};
use reqwest::blocking::Response;
use serde_json::Value;

fn header<'a>(resp: &'a Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

fn header_values(resp: &Response, name: &str) -> Vec<String> {
    resp.headers()
        .get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[test]
fn security_headers_are_on_by_default_and_leaky_headers_are_removed() {
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
    let resp = client()
        .get(gw.url("/users/1?header=X-Powered-By:Express&header=Server:sample/1.0"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&resp, "x-frame-options"), Some("DENY"));
    assert_eq!(header(&resp, "referrer-policy"), Some("no-referrer"));
    assert_eq!(
        header(&resp, "cross-origin-opener-policy"),
        Some("same-origin")
    );
    assert_eq!(header(&resp, "x-powered-by"), None);
    assert_eq!(header(&resp, "server"), None);
    assert_eq!(
        header(&resp, "strict-transport-security"),
        None,
        "HSTS is for TLS listeners only"
    );

    // A header the upstream sets itself is left alone.
    let resp = client()
        .get(gw.url("/users/1?header=X-Frame-Options:SAMEORIGIN"))
        .send()
        .unwrap();
    assert_eq!(header_values(&resp, "x-frame-options"), ["SAMEORIGIN"]);
}

#[test]
fn a_service_can_override_or_turn_off_security_headers() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
security_headers:
  frame_options: SAMEORIGIN
services:
  users: {{routes: [{{path_prefix: /users}}], upstreams: ["{up}"]}}
  legacy:
    routes: [{{path_prefix: /legacy}}]
    upstreams: ["{up}"]
    security_headers: {{enabled: false}}
  embed:
    routes: [{{path_prefix: /embed}}]
    upstreams: ["{up}"]
    security_headers: {{frame_options: "", remove: []}}
"#,
        up = up.addr
    ));
    let resp = client().get(gw.url("/users/1")).send().unwrap();
    assert_eq!(header(&resp, "x-frame-options"), Some("SAMEORIGIN"));
    assert_eq!(header(&resp, "x-content-type-options"), Some("nosniff"));

    let resp = client()
        .get(gw.url("/legacy/x?header=X-Powered-By:Express"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-content-type-options"), None);
    assert_eq!(header(&resp, "x-frame-options"), None);
    assert_eq!(header(&resp, "referrer-policy"), None);
    assert_eq!(header(&resp, "x-powered-by"), Some("Express"));

    // A service section replaces the top-level one; what it leaves out takes the defaults.
    let resp = client()
        .get(gw.url("/embed/x?header=X-Powered-By:Express"))
        .send()
        .unwrap();
    assert_eq!(header(&resp, "x-frame-options"), None);
    assert_eq!(header(&resp, "x-content-type-options"), Some("nosniff"));
    assert_eq!(header(&resp, "x-powered-by"), Some("Express"));
}

fn cors_gateway(up: &Upstream) -> Gateway {
    Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{}"]
    cors:
      allowed_origins: ["https://app.example.com", "https://*.example.com"]
      allowed_methods: [GET, POST]
      allowed_headers: [Authorization, Content-Type]
      expose_headers: [X-Request-Id]
      allow_credentials: true
      max_age: 10m
"#,
        up.addr
    ))
}

fn preflight(gw: &Gateway, origin: &str, method: &str, headers: Option<&str>) -> Response {
    let mut req = client()
        .request(reqwest::Method::OPTIONS, gw.url("/users/1"))
        .header("Origin", origin)
        .header("Access-Control-Request-Method", method);
    if let Some(h) = headers {
        req = req.header("Access-Control-Request-Headers", h);
    }
    req.send().unwrap()
}

#[test]
fn cors_preflight_is_answered_by_the_gateway_without_the_upstream() {
    let up = Upstream::start("users");
    let gw = cors_gateway(&up);

    let resp = preflight(
        &gw,
        "https://app.example.com",
        "POST",
        Some("authorization, content-type"),
    );
    assert_eq!(resp.status(), 204);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let methods = header(&resp, "access-control-allow-methods")
        .unwrap()
        .to_ascii_uppercase();
    assert!(
        methods.contains("GET") && methods.contains("POST"),
        "{methods}"
    );
    let allowed = header(&resp, "access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("content-type"),
        "{allowed}"
    );
    assert_eq!(
        header(&resp, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(header(&resp, "access-control-max-age"), Some("600"));

    // Any subdomain matches the wildcard; the echoed origin is the caller's own.
    let resp = preflight(&gw, "https://eu.example.com", "GET", None);
    assert_eq!(resp.status(), 204);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        Some("https://eu.example.com")
    );
    assert_eq!(up.requests(), 0, "preflights never reach the upstream");

    for (origin, method, headers) in [
        ("https://evil.io", "GET", None),
        ("https://example.com", "GET", None),
        ("https://app.example.com.evil.io", "GET", None),
        ("https://app.example.com", "DELETE", None),
        ("https://app.example.com", "GET", Some("x-secret")),
    ] {
        let resp = preflight(&gw, origin, method, headers);
        assert_eq!(resp.status(), 403, "{origin} {method} {headers:?}");
        assert_eq!(header(&resp, "access-control-allow-origin"), None);
        let body: Value = resp.json().unwrap();
        assert!(body["error"].is_string(), "{body}");
    }
    assert_eq!(
        up.requests(),
        0,
        "rejected preflights never reach the upstream"
    );

    // An OPTIONS that is not a preflight is proxied as usual.
    let resp = client()
        .request(reqwest::Method::OPTIONS, gw.url("/users/1"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(up.requests(), 1);
}

#[test]
fn actual_cors_requests_get_the_allow_origin_and_vary_headers() {
    let up = Upstream::start("users");
    let gw = cors_gateway(&up);
    let resp = client()
        .get(gw.url("/users/1"))
        .header("Origin", "https://app.example.com")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        header(&resp, "access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(
        header(&resp, "access-control-allow-credentials"),
        Some("true")
    );
    assert_eq!(
        header(&resp, "access-control-expose-headers").map(str::to_ascii_lowercase),
        Some("x-request-id".into())
    );
    let vary = header_values(&resp, "vary").join(", ").to_ascii_lowercase();
    assert!(vary.contains("origin"), "{vary}");

    // An upstream Vary is kept, Origin is added beside it.
    let resp = client()
        .get(gw.url("/users/1?header=Vary:Accept-Encoding"))
        .header("Origin", "https://app.example.com")
        .send()
        .unwrap();
    let vary = header_values(&resp, "vary").join(", ").to_ascii_lowercase();
    assert!(
        vary.contains("accept-encoding") && vary.contains("origin"),
        "{vary}"
    );

    // A foreign origin gets the data (CORS is enforced by browsers) but no permission to read it.
    let resp = client()
        .get(gw.url("/users/1?header=Access-Control-Allow-Origin:*"))
        .header("Origin", "https://evil.io")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "access-control-allow-origin"), None);
    let vary = header_values(&resp, "vary").join(", ").to_ascii_lowercase();
    assert!(vary.contains("origin"), "{vary}");
}

#[test]
fn oversized_bodies_get_413_and_services_can_raise_the_limit() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
limits: {{max_body_size: 1KiB}}
services:
  users: {{routes: [{{path_prefix: /users}}], upstreams: ["{up}"]}}
  uploads:
    routes: [{{path_prefix: /uploads}}]
    upstreams: ["{up}"]
    limits: {{max_body_size: 4KiB}}
"#,
        up = up.addr
    ));
    let post = |path: &str, len: usize| {
        client()
            .post(gw.url(path))
            .body(vec![b'x'; len])
            .send()
            .unwrap()
    };

    let resp = post("/users", 1024);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().unwrap()["body_bytes"], 1024);
    assert_eq!(up.requests(), 1);

    let resp = post("/users", 2048);
    assert_eq!(resp.status(), 413);
    let body: Value = resp.json().unwrap();
    assert_eq!(body["error"], "request body too large");
    assert_eq!(
        up.requests(),
        1,
        "a body announced too large is refused before the upstream"
    );

    let resp = post("/uploads", 2048);
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().unwrap()["body_bytes"], 2048);
    assert_eq!(post("/uploads", 8192).status(), 413);
    assert_eq!(up.requests(), 2);
}

#[test]
fn cached_and_gateway_written_answers_carry_the_same_headers_as_proxied_ones() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{}"]
    cache: {{ttl: 1m}}
    cors: {{allowed_origins: ["https://app.example.com"]}}
    rate_limit: {{requests_per_second: 1000, burst: 1000}}
    limits: {{max_body_size: 10}}
"#,
        up.addr
    ));
    let origin = "https://app.example.com";
    let get = |path: &str| {
        client()
            .get(gw.url(path))
            .header("Origin", origin)
            .send()
            .unwrap()
    };
    let path = "/users/1?header=X-Powered-By:Express";
    let miss = get(path);
    assert_eq!(header(&miss, "x-cache"), Some("MISS"));
    let hit = get(path);
    assert_eq!(header(&hit, "x-cache"), Some("HIT"));
    let too_large = client()
        .post(gw.url("/users"))
        .header("Origin", origin)
        .body("x".repeat(100))
        .send()
        .unwrap();
    assert_eq!(too_large.status(), 413);
    for resp in [&miss, &hit, &too_large] {
        assert_eq!(header(resp, "x-content-type-options"), Some("nosniff"));
        assert_eq!(
            header(resp, "x-powered-by"),
            None,
            "stored leaky header served"
        );
        assert_eq!(header(resp, "access-control-allow-origin"), Some(origin));
        assert!(header(resp, "ratelimit-remaining").is_some() || resp.status() == 413);
    }
    assert!(header(&hit, "ratelimit-remaining").is_some());
    assert_eq!(
        up.requests(),
        1,
        "the hit and the 413 never reached the upstream"
    );

    // An unrouted request has no service, and still gets the top-level security headers.
    let unrouted = client().get(gw.url("/nowhere")).send().unwrap();
    assert_eq!(unrouted.status(), 404);
    assert_eq!(header(&unrouted, "x-content-type-options"), Some("nosniff"));
}

/// An upstream that records the head of each request it gets, as sent, and answers with a
/// header of its own spelling.
struct RecordingUpstream {
    addr: String,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl RecordingUpstream {
    fn start() -> RecordingUpstream {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let recorded = std::sync::Arc::clone(&heads);
        std::thread::spawn(move || {
            for mut stream in listener.incoming().flatten() {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                recorded
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Upstream-Thing: a\r\n\
                      Connection: close\r\n\r\nok",
                );
            }
        });
        RecordingUpstream { addr, heads }
    }

    /// The head of the last request for `path`.
    fn last_head(&self, path: &str) -> String {
        let heads = self.heads.lock().unwrap();
        heads
            .iter()
            .rev()
            .find(|h| h.starts_with(&format!("GET {path} ")))
            .cloned()
            .unwrap_or_else(|| panic!("no request for {path} among {heads:?}"))
    }
}

fn header_lines(head: &str) -> Vec<&str> {
    head.lines().skip(1).collect()
}

#[test]
fn header_names_are_normalized_unless_configured_to_keep_their_case() {
    let up = RecordingUpstream::start();
    let request = "GET /things/1 HTTP/1.1\r\nhost: api.example\r\nX-Custom-Thing: 1\r\n\
                   user-AGENT: t\r\nConnection: close\r\n\r\n";
    for (case, client_sees, upstream_sees) in [
        (
            "",
            ["x-upstream-thing: a", "x-request-id: "],
            ["Host: api.example", "x-custom-thing: 1", "user-agent: t"],
        ),
        (
            "header_name_case: preserve",
            ["X-Upstream-Thing: a", "x-request-id: "],
            ["host: api.example", "X-Custom-Thing: 1", "user-AGENT: t"],
        ),
    ] {
        let gw = Gateway::start(&format!(
            r#"
server: {{listen: ["${{LISTEN}}"], {case}}}
admin: {{listen: "${{ADMIN}}"}}
services:
  things: {{routes: [{{path_prefix: /things}}], upstreams: ["{}"]}}
"#,
            up.addr
        ));
        let answer = common::raw_request(&gw.http, request.as_bytes()).head;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        for line in client_sees {
            assert!(
                header_lines(&answer).iter().any(|l| l.starts_with(line)),
                "{case:?}: the client should see {line:?} in\n{answer}"
            );
        }
        let sent = up.last_head("/things/1");
        for line in upstream_sees {
            assert!(
                header_lines(&sent).contains(&line),
                "{case:?}: the upstream should see {line:?} in\n{sent}"
            );
        }
        // What the gateway adds is spelled the same either way.
        for line in ["x-forwarded-for: 127.0.0.1", "x-request-id: "] {
            assert!(
                header_lines(&sent).iter().any(|l| l.starts_with(line)),
                "{case:?}: the upstream should see {line:?} in\n{sent}"
            );
        }
    }
}
