//! Edge trust, end to end: the real binary judges each request as the upstream will read it.
//! Path tricks meant to reach `/admin` (auth required) through `/` (no auth) get 401 or 400 and
//! never reach the upstream; forwarding headers are only believed from trusted proxies; header
//! spellings and duplicates that upstreams read differently are dropped or refused; and rate
//! limits by address or header run before token checks, so refused requests count and a flood
//! of bad tokens is cut off before its signatures are checked.

mod common;

use common::{poll_until, raw_request, Gateway, RawConnection, RawResponse, Upstream};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::Duration;

const SECRET: &str = "edge-trust-test-secret-0123456789abcdef";

fn token(secret: &str) -> String {
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "user-7", "exp": exp}),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// `/` (no auth) and `/admin` (auth required) on one upstream, plus `extra` YAML under
/// `server:` and extra services.
fn gateway(up: &Upstream, server: &str, services: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    let gw = Gateway::start(&format!(
        r#"
server:
  listen: ["${{LISTEN}}"]
  {server}
admin: {{listen: "${{ADMIN}}"}}
auth: {{jwt: {{algorithms: [HS256], secret_file: "{secret}"}}}}
services:
  root: {{routes: [{{path_prefix: /}}], upstreams: ["{up}"], auth: none}}
  admin: {{routes: [{{path_prefix: /admin}}], upstreams: ["{up}"], auth: required}}
{services}
"#,
        secret = secret.display(),
        up = up.addr,
    ));
    (gw, dir)
}

/// `GET target` with `headers` (raw lines), over a raw socket: nothing is fixed on the way.
fn get(gw: &Gateway, target: &[u8], headers: &str) -> RawResponse {
    let mut request = b"GET ".to_vec();
    request.extend_from_slice(target);
    request.extend_from_slice(b" HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n");
    request.extend_from_slice(headers.as_bytes());
    request.extend_from_slice(b"\r\n");
    raw_request(&gw.http, &request)
}

/// What the gateway's answer must be.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Routed to `/admin`: 401 without a token.
    Unauthorized,
    /// Refused by the gateway: 400 with a JSON body naming the request id.
    BadPath,
    /// Refused by Pingora's parser before any routing: a bare 400.
    ParserRefused,
}

use Expect::*;

/// Path tricks, each meant to reach `/admin/...` past the `/` route, with what they get.
const TRICKS: &[(&[u8], Expect)] = &[
    // The ones from the issue.
    (b"//admin/x", Unauthorized),
    (b"/x/../admin/x", Unauthorized),
    (b"/%61dmin/x", Unauthorized),
    (b"/./admin/x", Unauthorized),
    (b"/x/%2e%2e/admin/x", Unauthorized),
    // Dot segments and slashes, spelled every way.
    (b"/%2e%2e/admin", Unauthorized),
    (b"/%2E%2E/admin", Unauthorized),
    (b"/x/%2E%2e/admin/x", Unauthorized),
    (b"/x/.%2e/admin/x", Unauthorized),
    (b"/admin/%2e/x", Unauthorized),
    (b"/../../admin/x", Unauthorized),
    (b"/x/y/../../admin", Unauthorized),
    (b"///admin//x", Unauthorized),
    (b"/././/admin", Unauthorized),
    (b"/%61%64%6D%69%6E/x", Unauthorized),
    (b"/adm%69n", Unauthorized),
    (b"/admin%2f..%2fx", BadPath),
    (b"/x//../admin/x", BadPath),
    (b"/x/.//../admin/x", BadPath),
    // Encoded separators: refused, so no upstream can split on them.
    (b"/admin%2fx", BadPath),
    (b"/admin%2Fx", BadPath),
    (b"/x%2f..%2fadmin", BadPath),
    (b"/admin%5cx", BadPath),
    (b"/admin\\x", BadPath),
    (b"/x\\..\\admin", BadPath),
    (b"\\admin/x", BadPath),
    // Overlong UTF-8 forms of `.` and `/`.
    (b"/%c0%ae%c0%ae/admin", BadPath),
    (b"/x/%c0%ae%c0%ae/admin", BadPath),
    (b"/x%c0%afadmin", BadPath),
    (b"/%e0%80%ae%e0%80%ae/admin", BadPath),
    (b"/%c1%9cadmin", BadPath),
    // Path parameters, which some servers strip (`..;` is `..` to Tomcat).
    (b"/admin;x/y", BadPath),
    (b"/x/..;/admin/x", BadPath),
    (b"/admin%3bx/y", BadPath),
    (b"/;/admin", BadPath),
    // NUL, control characters, broken encodings.
    (b"/admin%00", BadPath),
    (b"/x/%00/../admin", BadPath),
    (b"/admin%0d%0aX-Injected:%201", BadPath),
    (b"/a%zz/../admin", BadPath),
    (b"/admin%", BadPath),
    // Targets that are not origin-form paths.
    (b"admin/x", BadPath),
    (b"*", BadPath),
    (b"ftp://gw/admin", BadPath),
    (b"http://gw/admin/x", Unauthorized),
    (b"http://gw//x/../admin", Unauthorized),
    (b"HTTP://gw/%61dmin", Unauthorized),
    (b"http://gw/../admin", Unauthorized),
    // More spellings: mixed encodings of dots, encoded separators next to dots, IIS-style
    // %u escapes, encoded tabs and NUL inside dot segments.
    (b"/admin", Unauthorized),
    (b"/admin/./", Unauthorized),
    (b"/.%2e/admin/x", Unauthorized),
    (b"/x/%2e./admin", Unauthorized),
    (b"/x/y/%2E%2E/%2E%2E/admin/x", Unauthorized),
    (b"/x/..%2fadmin", BadPath),
    (b"/..%2f..%2fadmin", BadPath),
    (b"/%2fadmin/x", BadPath),
    (b"/x/%2e%2e%5cadmin", BadPath),
    (b"/x/..%5Cadmin", BadPath),
    (b"/x/..%00/admin", BadPath),
    (b"/%09admin", BadPath),
    (b"/admin/..%3b/x", BadPath),
    (b"/admin%u0041", BadPath),
    (b"/%u002e%u002e/admin", BadPath),
    // Refused by Pingora's parser: not UTF-8, an authority other than Host, an ambiguous one.
    (b"/\xff/../admin", ParserRefused),
    (b"/\xc0\xae\xc0\xae/admin", ParserRefused),
    (b"http://other/admin", ParserRefused),
    (b"http:/\\gw/admin", ParserRefused),
];

fn check_answer(target: &[u8], r: &RawResponse, expect: Expect) {
    let shown = String::from_utf8_lossy(target);
    match expect {
        Unauthorized => {
            assert_eq!(r.status, 401, "{shown}: {r:?}");
            assert_eq!(r.json()["error"], "unauthorized", "{shown}");
        }
        BadPath => {
            assert_eq!(r.status, 400, "{shown}: {r:?}");
            let body = r.json();
            assert_eq!(body["error"], "bad request path", "{shown}: {body}");
            assert!(body["detail"].is_string(), "{shown}: {body}");
            assert_eq!(
                body["request_id"].as_str(),
                r.header("x-request-id"),
                "{shown}"
            );
        }
        ParserRefused => assert_eq!(r.status, 400, "{shown}: {r:?}"),
    }
}

#[test]
fn path_tricks_get_401_or_400_and_never_reach_the_upstream() {
    let up = Upstream::start("sample");
    let (gw, _dir) = gateway(&up, "", "");
    for (target, expect) in TRICKS {
        let r = get(&gw, target, "");
        check_answer(target, &r, *expect);
    }
    assert_eq!(
        up.requests(),
        0,
        "a path trick reached the upstream without a token"
    );

    // With a token, the ones routed to /admin arrive as the path the route saw.
    let bearer = format!("Authorization: Bearer {}\r\n", token(SECRET));
    for (target, expect) in TRICKS {
        if *expect == Unauthorized {
            let r = get(&gw, target, &bearer);
            assert_eq!(r.status, 200, "{}: {r:?}", String::from_utf8_lossy(target));
            let path = r.json()["path"].as_str().unwrap().to_string();
            assert!(
                path == "/admin" || path.starts_with("/admin/"),
                "{} arrived as {path}",
                String::from_utf8_lossy(target)
            );
        }
    }
}

#[test]
fn normal_forms_are_routed_forwarded_and_logged_with_the_query_untouched() {
    let up = Upstream::start("sample");
    let (gw, _dir) = gateway(&up, "", "");
    let seen = |target: &[u8]| {
        let r = get(&gw, target, "");
        assert_eq!(r.status, 200, "{}: {r:?}", String::from_utf8_lossy(target));
        let body = r.json();
        (
            body["path"].as_str().unwrap().to_string(),
            body["query"].as_str().unwrap().to_string(),
        )
    };
    // Dot segments resolved, unreserved characters decoded, the rest upper-cased; the
    // query exactly as sent, dots, slashes and broken encodings included.
    assert_eq!(
        seen(b"/x/./y/../%7ez/%c3%a9?a=%2F..//&b=%zz&c=%61"),
        ("/x/~z/%C3%A9".into(), "a=%2F..//&b=%zz&c=%61".into())
    );
    // Bytes a path may not hold raw are encoded, as the same data.
    assert_eq!(seen(b"/a|b{c}"), ("/a%7Cb%7Bc%7D".into(), String::new()));
    assert_eq!(seen("/é".as_bytes()), ("/%C3%A9".into(), String::new()));
    // Not tricks: one decoding (the upstream's) does not make them /admin.
    assert_eq!(seen(b"/%2561dmin/x").0, "/%2561dmin/x");
    assert_eq!(seen(b"/admin%23x").0, "/admin%23x");
    assert_eq!(seen(b"/x?/../admin").0, "/x");
    // A fragment is not part of the target.
    assert_eq!(seen(b"/x#/../admin").0, "/x");
    // Routes are case-sensitive, as in nginx and Envoy.
    assert_eq!(seen(b"/ADMIN/x").0, "/ADMIN/x");
    // Absolute-form reaches the upstream in origin-form.
    assert_eq!(seen(b"http://gw/x/../y?q=1"), ("/y".into(), "q=1".into()));

    // OPTIONS * is about the gateway: answered, not forwarded.
    let before = up.requests();
    let r = raw_request(&gw.http, b"OPTIONS * HTTP/1.1\r\nHost: gw\r\n\r\n");
    assert_eq!(r.status, 204, "{r:?}");
    assert!(r.header("allow").is_some());
    assert_eq!(up.requests(), before);

    // The access log has the path routed and the target as sent.
    poll_until(Duration::from_secs(5), "the access log line", || {
        gw.stdout().lines().any(|l| {
            let line: Value = serde_json::from_str(l).unwrap_or_default();
            line["path"] == "/x/~z/%C3%A9"
                && line["raw_target"] == "/x/./y/../%7ez/%c3%a9"
                && line["client"] == "127.0.0.1"
        })
    });
}

#[test]
fn options_keep_encoded_slashes_allow_semicolons_and_keep_repeated_slashes() {
    let up = Upstream::start("sample");
    let (gw, _dir) = gateway(
        &up,
        "paths: {escaped_slashes: keep, semicolons: allow, merge_slashes: false}",
        "",
    );
    let path = |target: &[u8]| {
        let r = get(&gw, target, "");
        assert_eq!(r.status, 200, "{}: {r:?}", String::from_utf8_lossy(target));
        r.json()["path"].as_str().unwrap().to_string()
    };
    assert_eq!(path(b"/files/a%2fb"), "/files/a%2Fb");
    assert_eq!(path(b"/files/a\\b"), "/files/a%5Cb");
    assert_eq!(path(b"/files;v=1/x"), "/files;v=1/x");
    assert_eq!(path(b"//files//x/./y"), "//files//x/y");
    // Still refused whatever the options: it resolves differently with merged slashes.
    assert_eq!(get(&gw, b"/x//../admin", "").status, 400);
    // The operator's choice, and its risk: `/admin%2Fx` is not under `/admin` for the
    // routes, though an upstream that decodes before routing may read it as `/admin/x`.
    assert_eq!(path(b"/admin%2fx"), "/admin%2Fx");
}

fn echoed_headers(r: &RawResponse) -> Value {
    assert_eq!(r.status, 200, "{r:?}");
    r.json()["headers"].clone()
}

const FORGED: &str = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\n\
    Forwarded: for=6.6.6.6;proto=https\r\nX-Forwarded-Proto: https\r\n\
    X-Forwarded-Host: evil.example\r\nX-Forwarded-Port: 443\r\nTrue-Client-IP: 6.6.6.6\r\n\
    X-Forwarded-Prefix: /evil\r\nX-Original-URL: /admin\r\nX-Rewrite-URL: /admin\r\n\
    CF-Connecting-IP: 6.6.6.6\r\nX-Client-IP: 6.6.6.6\r\n\
    x-forwarded-for: 6.6.6.7\r\nX-FORWARDED-HOST: evil2.example\r\n\
    forwarded: for=\"[2001:db8::6]\"\r\nX-Real-Ip: 6.6.6.8\r\n";

#[test]
fn forwarding_headers_from_an_untrusted_peer_are_replaced_by_what_the_gateway_saw() {
    let up = Upstream::start("sample");
    let (gw, _dir) = gateway(
        &up,
        "",
        "  limited: {routes: [{path_prefix: /limited}], upstreams: [\"UP\"], \
         rate_limit: {requests_per_second: 0.01, burst: 2}}"
            .replace("UP", &up.addr)
            .as_str(),
    );
    let h = echoed_headers(&get(&gw, b"/x", FORGED));
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "gw");
    let port = gw.http.rsplit(':').next().unwrap();
    assert_eq!(h["x-forwarded-port"], port);
    assert_eq!(h["forwarded"], "for=127.0.0.1;host=\"gw\";proto=http");
    for gone in [
        "true-client-ip",
        "x-forwarded-prefix",
        "x-original-url",
        "x-rewrite-url",
        "cf-connecting-ip",
        "x-client-ip",
    ] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
    // A new forged address per request is still one client to the rate limit.
    let statuses: Vec<u16> = (1..=3)
        .map(|i| {
            let forged = format!("X-Forwarded-For: 6.6.6.{i}\r\nX-Real-IP: 6.6.6.{i}\r\n");
            get(&gw, b"/limited", &forged).status
        })
        .collect();
    assert_eq!(statuses, [200, 200, 429]);
}

#[test]
fn behind_a_trusted_proxy_the_client_is_the_rightmost_untrusted_address() {
    let (a, b) = (Upstream::start("a"), Upstream::start("b"));
    let (gw, _dir) = gateway(
        &a,
        "trusted_proxies: [127.0.0.1, \"10.0.0.0/8\"]",
        &format!(
            "  limited: {{routes: [{{path_prefix: /limited}}], upstreams: [\"{a}\"], \
             rate_limit: {{requests_per_second: 0.01, burst: 1}}}}\n  \
             sticky: {{routes: [{{path_prefix: /sticky}}], upstreams: [\"{a}\", \"{b}\"], \
             load_balancing: consistent_hash, hash_key: ip}}",
            a = a.addr,
            b = b.addr
        ),
    );
    // The load balancer in front (127.0.0.1, trusted) appended what it saw; so did an
    // internal hop (10.1.2.3); 6.6.6.6 is the client's own claim.
    let chain = "X-Forwarded-For: 6.6.6.6, 198.51.100.7, 10.1.2.3\r\n\
                 X-Forwarded-Proto: https\r\nX-Forwarded-Host: api.example\r\n\
                 Forwarded: for=198.51.100.7\r\nTrue-Client-IP: 198.51.100.7\r\n";
    let h = echoed_headers(&get(&gw, b"/x", chain));
    assert_eq!(
        h["x-forwarded-for"],
        "6.6.6.6, 198.51.100.7, 10.1.2.3, 127.0.0.1"
    );
    assert_eq!(h["x-real-ip"], "198.51.100.7");
    assert_eq!(
        h["x-forwarded-proto"], "https",
        "kept from the trusted proxy"
    );
    assert_eq!(h["x-forwarded-host"], "api.example");
    assert_eq!(
        h["forwarded"],
        "for=198.51.100.7, for=127.0.0.1;host=\"gw\";proto=http"
    );
    assert_eq!(h["true-client-ip"], "198.51.100.7");

    // Each client behind the proxy has its own bucket.
    let from = |ip: &str| format!("X-Forwarded-For: 6.6.6.6, {ip}\r\n");
    assert_eq!(get(&gw, b"/limited", &from("198.51.100.1")).status, 200);
    assert_eq!(get(&gw, b"/limited", &from("198.51.100.1")).status, 429);
    assert_eq!(get(&gw, b"/limited", &from("198.51.100.2")).status, 200);
    // ... whatever it claims to the left of what the proxy saw.
    let forged = "X-Forwarded-For: 1.2.3.4, 198.51.100.1\r\n";
    assert_eq!(get(&gw, b"/limited", forged).status, 429);

    // Consistent hashing sticks each client to one upstream, and spreads clients.
    let served_by = |ip: &str| {
        let r = get(&gw, b"/sticky", &from(ip));
        assert_eq!(r.status, 200, "{r:?}");
        r.header("x-served-by").unwrap().to_string()
    };
    let mut seen = std::collections::BTreeSet::new();
    for i in 1..=20 {
        let ip = format!("203.0.113.{i}");
        let first = served_by(&ip);
        assert_eq!(served_by(&ip), first, "{ip} moved");
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "20 clients all hashed to one upstream");

    // The access log names the client and the proxy it came through.
    poll_until(Duration::from_secs(5), "the access log line", || {
        gw.stdout().lines().any(|l| {
            let line: Value = serde_json::from_str(l).unwrap_or_default();
            line["client"] == "198.51.100.7"
                && line["peer"]
                    .as_str()
                    .is_some_and(|p| p.starts_with("127.0.0.1:"))
        })
    });
}

/// The gateway works out the client once per connection when the peer is not a trusted
/// proxy, and keeps the last `Forwarded` element it made: on one keep-alive connection, each
/// request still gets forwarding headers for its own `Host`, and behind a trusted proxy each
/// request's own `X-Forwarded-For` decides who the client is.
#[test]
fn forwarding_headers_follow_each_request_on_a_keep_alive_connection() {
    let up = Upstream::start("sample");
    let keep_alive = |host: &str, headers: &str| {
        format!("GET /x HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n").into_bytes()
    };

    let (gw, _dir) = gateway(&up, "", "");
    let mut conn = RawConnection::open(&gw.http);
    for (host, forged) in [
        ("a.example", ""),
        (
            "b.example",
            "X-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n",
        ),
        ("a.example", "X-Real-IP: 6.6.6.6\r\n"),
    ] {
        let h = echoed_headers(&conn.request(&keep_alive(host, forged)));
        assert_eq!(h["x-forwarded-for"], "127.0.0.1", "{host}: {h}");
        assert_eq!(h["x-real-ip"], "127.0.0.1", "{host}: {h}");
        assert_eq!(h["x-forwarded-host"], host);
        let forwarded = format!("for=127.0.0.1;host=\"{host}\";proto=http");
        assert_eq!(h["forwarded"], forwarded.as_str());
    }
    // No Host at all (HTTP/1.0) after one with a Host: no stale host in `Forwarded`.
    let h = echoed_headers(&conn.request(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http");
    drop(gw);

    let (gw, _dir) = gateway(&up, "trusted_proxies: [127.0.0.1]", "");
    let mut conn = RawConnection::open(&gw.http);
    for (xff, client) in [
        (Some("198.51.100.1"), "198.51.100.1"),
        (Some("198.51.100.2"), "198.51.100.2"),
        (None, "127.0.0.1"),
        (Some("198.51.100.1"), "198.51.100.1"),
    ] {
        let headers = xff.map_or(String::new(), |a| format!("X-Forwarded-For: {a}\r\n"));
        let h = echoed_headers(&conn.request(&keep_alive("gw", &headers)));
        assert_eq!(h["x-real-ip"], client, "{xff:?}: {h}");
        let expected_xff = xff.map_or("127.0.0.1".to_string(), |a| format!("{a}, 127.0.0.1"));
        assert_eq!(h["x-forwarded-for"], expected_xff.as_str());
    }
    let prior = keep_alive("gw", "Forwarded: for=198.51.100.9\r\n");
    let h = echoed_headers(&conn.request(&prior));
    assert_eq!(
        h["forwarded"],
        "for=198.51.100.9, for=127.0.0.1;host=\"gw\";proto=http"
    );
    let h = echoed_headers(&conn.request(&keep_alive("gw", "")));
    assert_eq!(h["forwarded"], "for=127.0.0.1;host=\"gw\";proto=http");
}

const SPELLINGS: &str = "X_User_Id: forged\r\nx_user_id: forged\r\nX-User_Id: forged\r\n\
    X_Forwarded_For: 6.6.6.6\r\nMy_Header: kept?\r\nX-User-Id: forged\r\n";

#[test]
fn identity_headers_are_stripped_in_every_spelling_and_underscores_dropped_by_default() {
    let up = Upstream::start("sample");
    let (gw, _dir) = gateway(&up, "", "");
    let bearer = format!("Authorization: Bearer {}\r\n", token(SECRET));
    for (target, auth) in [(&b"/x"[..], ""), (&b"/admin/x"[..], bearer.as_str())] {
        let h = echoed_headers(&get(&gw, target, &format!("{SPELLINGS}{auth}")));
        let names: Vec<&String> = h.as_object().unwrap().keys().collect();
        assert!(
            names.iter().all(|n| !n.contains('_')),
            "an underscore name reached the upstream: {names:?}"
        );
        let expected = if auth.is_empty() {
            None
        } else {
            Some("user-7")
        };
        assert_eq!(h["x-user-id"].as_str(), expected, "{h}");
    }
}

#[test]
fn underscores_in_headers_reject_answers_400_and_allow_keeps_all_but_identity_spellings() {
    let up = Upstream::start("sample");
    let (gw, _dir) = gateway(&up, "underscores_in_headers: reject", "");
    let r = get(&gw, b"/x", "My_Header: v\r\n");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["error"], "bad request header");
    assert_eq!(up.requests(), 0);
    assert_eq!(get(&gw, b"/x", "My-Header: v\r\n").status, 200);

    let (gw, _dir) = gateway(&up, "underscores_in_headers: allow", "");
    let h = echoed_headers(&get(&gw, b"/x", SPELLINGS));
    assert_eq!(h["my_header"], "kept?");
    for gone in ["x_user_id", "x-user_id", "x_forwarded_for", "x-user-id"] {
        assert!(h.get(gone).is_none(), "{gone} reached the upstream: {h}");
    }
}

#[test]
fn ambiguous_headers_are_refused_and_never_reach_the_upstream() {
    let up = Upstream::start("sample");
    let (gw, _dir) = gateway(&up, "", "");
    let token = token(SECRET);
    let send = |raw: String| raw_request(&gw.http, raw.as_bytes());
    // Two Authorization headers: which one would the upstream read? Refused by the gateway.
    let r = send(format!(
        "GET /admin/x HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {token}\r\n\
         Authorization: Bearer forged\r\n\r\n"
    ));
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.json()["error"], "bad request header");
    assert!(r.json()["request_id"].is_string());
    let r =
        send("GET /x HTTP/1.1\r\nHost: gw\r\nAuthorization: a\r\nAuthorization: b\r\n\r\n".into());
    assert_eq!(r.status, 400, "on a route without auth too: {r:?}");

    // Refused by Pingora's parser before any routing.
    for raw in [
        "GET /x HTTP/1.1\r\nHost: gw\r\nHost: other\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        "GET /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 1, 2\r\n\r\nab",
        "GET /x HTTP/1.1\r\nHost : gw\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: gw\r\nX-User-Id : forged\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: gw\r\nX-A: a\r\n folded: b\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: gzip\r\n\r\n",
        "GET /x HTTP/1.0\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        let r = send(raw.to_string());
        assert_eq!(r.status, 400, "{raw:?}: {r:?}");
    }
    assert_eq!(
        up.requests(),
        0,
        "an ambiguous request reached the upstream"
    );
    // Identical duplicate lengths are one length (RFC 9110 8.6).
    let r = send(
        "POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab".into(),
    );
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["body_bytes"], 2);
}

#[test]
fn twenty_bad_tokens_meet_the_rate_limit_before_their_signatures_are_checked() {
    let up = Upstream::start("sample");
    let (gw, _dir) = gateway(
        &up,
        "",
        &format!(
            "  limited: {{routes: [{{path_prefix: /limited}}], upstreams: [\"{up}\"], \
             auth: required, rate_limit: {{requests_per_second: 0.01, burst: 3}}}}\n  \
             per_user: {{routes: [{{path_prefix: /per_user}}], upstreams: [\"{up}\"], \
             auth: required, rate_limit: {{requests_per_second: 0.01, burst: 3, key: user}}}}",
            up = up.addr
        ),
    );
    const CHECKS: &str = "breakwater_jwt_signature_checks_total";
    let checks_before = gw.metric(CHECKS);
    // Well-formed tokens with a wrong signature: each one that is checked costs a signature.
    let forged = format!(
        "Authorization: Bearer {}\r\n",
        token("not-the-secret-at-all-0123456789")
    );
    let statuses: Vec<u16> = (0..20)
        .map(|_| get(&gw, b"/limited", &forged).status)
        .collect();
    // The bucket refills one token per 100 s: none while the test runs.
    assert_eq!(&statuses[..3], [401, 401, 401], "{statuses:?}");
    assert_eq!(&statuses[3..], [429; 17], "{statuses:?}");
    assert_eq!(
        gw.metric(CHECKS) - checks_before,
        3,
        "a limited request costs no signature check"
    );
    assert_eq!(up.requests(), 0);

    // A per-user limit needs the identity, so it still runs after the token check.
    let statuses: Vec<u16> = (0..5)
        .map(|_| get(&gw, b"/per_user", &forged).status)
        .collect();
    assert_eq!(statuses, [401; 5]);
}

#[test]
fn requests_refused_for_their_size_headers_or_token_count_toward_the_limit() {
    let up = Upstream::start("sample");
    let (gw, _dir) = gateway(
        &up,
        "",
        &format!(
            "  limited: {{routes: [{{path_prefix: /limited}}], upstreams: [\"{}\"], \
             auth: required, required_scopes: [admin], \
             limits: {{max_body_size: 10, max_header_size: 2KiB}}, \
             rate_limit: {{requests_per_second: 0.01, burst: 5}}}}",
            up.addr
        ),
    );
    let big = format!("X-Big: {}\r\n", "b".repeat(4096));
    let bearer = format!("Authorization: Bearer {}\r\n", token(SECRET));
    let refused = [
        (get(&gw, b"/limited", &big).status, 431),
        (get(&gw, b"/limited", "Content-Length: 11\r\n").status, 413),
        (
            get(&gw, b"/limited", "Authorization: a\r\nAuthorization: b\r\n").status,
            400,
        ),
        (get(&gw, b"/limited", "").status, 401),
        // A valid token without the scope.
        (get(&gw, b"/limited", &bearer).status, 403),
    ];
    for (got, want) in refused {
        assert_eq!(got, want, "{refused:?}");
    }
    assert_eq!(
        get(&gw, b"/limited", &bearer).status,
        429,
        "five refusals used the burst"
    );
}

#[test]
fn check_names_the_field_of_a_bad_trust_setting() {
    let yaml = |server: &str| {
        format!(
            "server:\n  listen: [\"${{LISTEN}}\"]\n  {server}\nservices:\n  a: {{routes: \
             [{{path_prefix: /}}], upstreams: [\"127.0.0.1:1\"]}}\n"
        )
    };
    for (server, needle) in [
        ("trusted_proxies: [\"0.0.0.0/0\"]", "trusts every address"),
        ("trusted_proxies: [\"::/0\"]", "trusts every address"),
        ("trusted_proxies: [proxy.internal]", "invalid trusted proxy"),
        (
            "trusted_proxies: [\"10.0.0.0/33\"]",
            "invalid trusted proxy",
        ),
        ("underscores_in_headers: keep", "underscores_in_headers"),
        ("paths: {escaped_slashes: decode}", "escaped_slashes"),
        ("paths: {normalize: false}", "normalize"),
    ] {
        let (code, stderr) = common::run_check(&yaml(server));
        assert_eq!(code, 2, "{server}: {stderr}");
        assert!(stderr.contains(needle), "{server}: {stderr}");
        assert!(
            stderr.contains(":3:"),
            "{server}: the line is named: {stderr}"
        );
    }
    let (code, stderr) = common::run_check(&yaml("trusted_proxies: [10.0.0.0/8, \"::1\"]"));
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn the_cache_key_is_the_normalized_path() {
    let up = Upstream::start("sample");
    let gw = common::Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
cache: {{backend: memory}}
services:
  cached: {{routes: [{{path_prefix: /}}], upstreams: ["{}"], cache: {{ttl: 1m}}}}
"#,
        up.addr
    ));
    let first = get(&gw, b"/c/x?q=1", "");
    assert_eq!(first.header("x-cache"), Some("MISS"), "{first:?}");
    // Every spelling of one path is one entry: no spelling fetches (or poisons) its own.
    for spelling in [
        "/c/./x?q=1",
        "//c//x?q=1",
        "/%63/x?q=1",
        "/c/y/../x?q=1",
        "/%63/%78?q=1",
        "http://gw/c/x?q=1",
    ] {
        let r = get(&gw, spelling.as_bytes(), "");
        assert_eq!(r.status, 200, "{spelling}: {r:?}");
        assert_eq!(r.header("x-cache"), Some("HIT"), "{spelling}: {r:?}");
    }
    assert_eq!(up.requests(), 1);
}
