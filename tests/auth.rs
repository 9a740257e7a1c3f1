//! JWT authentication at the edge, end to end: the real `breakwater` binary validates bearer
//! tokens in front of a real sample upstream. A refused token gets a 401/403 JSON answer with a
//! `WWW-Authenticate` challenge and never reaches the upstream; a valid one arrives with the
//! caller's identity in `X-User-Id`, which clients can never set themselves.

mod common;

use common::{client, run_check, Gateway, Upstream};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::Duration;

const SECRET: &str = "integration-test-secret-0123456789abcdef";
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
const ISSUER: &str = "https://auth.example.com";

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

/// Claims of a valid token for `user-42`, with `changes` merged in (`null` removes a claim).
fn claims(changes: Value) -> Value {
    let mut c = json!({"sub": "user-42", "iss": ISSUER, "aud": "api", "exp": now() + 600});
    if let (Some(c), Some(changes)) = (c.as_object_mut(), changes.as_object()) {
        for (k, v) in changes {
            if v.is_null() {
                c.remove(k);
            } else {
                c.insert(k.clone(), v.clone());
            }
        }
    }
    c
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn fixture(name: &str) -> String {
    format!("{FIXTURES}/{name}")
}

fn read_fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// users (auth required), public (auth optional), admin (needs `users:write`) and open (no
/// auth), all on one upstream so one counter shows whether anything got through.
fn hs256_gateway(up: &Upstream) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("jwt.secret");
    // A trailing newline, as `echo` leaves it: it is not part of the secret.
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
auth:
  jwt:
    algorithms: [HS256]
    secret_file: "{secret}"
    issuer: {ISSUER}
    audience: api
    leeway: 5s
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
    auth: required
  public:
    routes: [{{path_prefix: /public}}]
    upstreams: ["{up}"]
    auth: optional
  admin:
    routes: [{{path_prefix: /admin}}]
    upstreams: ["{up}"]
    auth: required
    required_scopes: [users:write]
  open:
    routes: [{{path_prefix: /open}}]
    upstreams: ["{up}"]
"#,
        secret = secret.display(),
        up = up.addr,
    ));
    (gw, dir)
}

struct Answer {
    status: u16,
    www_authenticate: Option<String>,
    body: Value,
}

fn get(gw: &Gateway, path: &str, authorization: Option<&str>, headers: &[(&str, &str)]) -> Answer {
    let mut req = client().get(gw.url(path));
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let www_authenticate = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer {
        status,
        www_authenticate,
        body,
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Asserts a refusal: status, challenge, JSON reason, and that the upstream saw nothing.
fn assert_refused(
    gw: &Gateway,
    up: &Upstream,
    path: &str,
    auth: Option<&str>,
    status: u16,
    reason: &str,
) {
    let before = up.requests();
    let a = get(gw, path, auth, &[]);
    assert_eq!(a.status, status, "{reason}: {:?}", a.body);
    let error = if status == 403 {
        "forbidden"
    } else {
        "unauthorized"
    };
    assert_eq!(a.body["error"], error, "{reason}: {:?}", a.body);
    assert_eq!(a.body["reason"], reason, "{:?}", a.body);
    let challenge = a
        .www_authenticate
        .unwrap_or_else(|| panic!("{reason}: no WWW-Authenticate"));
    match reason {
        "missing" => assert_eq!(challenge, "Bearer"),
        "insufficient_scope" => assert!(
            challenge.starts_with("Bearer error=\"insufficient_scope\""),
            "{challenge}"
        ),
        _ => assert!(
            challenge.starts_with("Bearer error=\"invalid_token\""),
            "{challenge}"
        ),
    }
    assert_eq!(
        up.requests(),
        before,
        "{reason}: the refused request reached the upstream"
    );
}

#[test]
fn refused_tokens_get_401_and_never_reach_the_upstream() {
    let up = Upstream::start("users");
    let (gw, _dir) = hs256_gateway(&up);
    let b64 = |v: Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let alg_none = format!(
        "{}.{}.",
        b64(json!({"alg": "none", "typ": "JWT"})),
        b64(claims(json!({})))
    );
    let wrong_key = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(b"some-other-secret-some-other-secret"),
    )
    .unwrap();
    let hs512 = encode(
        &Header::new(Algorithm::HS512),
        &claims(json!({})),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let table: Vec<(&str, Option<String>, &str)> = vec![
        ("no Authorization header", None, "missing"),
        (
            "expired",
            Some(bearer(&hs256(&claims(json!({"exp": now() - 3600}))))),
            "expired",
        ),
        (
            "not yet valid",
            Some(bearer(&hs256(&claims(json!({"nbf": now() + 3600}))))),
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            Some(bearer(&hs256(&claims(
                json!({"iss": "https://evil.example"}),
            )))),
            "wrong_issuer",
        ),
        (
            "wrong audience",
            Some(bearer(&hs256(&claims(json!({"aud": "billing"}))))),
            "wrong_audience",
        ),
        (
            "no exp",
            Some(bearer(&hs256(&claims(json!({"exp": null}))))),
            "malformed",
        ),
        (
            "signed with another key",
            Some(bearer(&wrong_key)),
            "bad_signature",
        ),
        ("alg none", Some(bearer(&alg_none)), "algorithm_not_allowed"),
        (
            "alg outside the allowlist",
            Some(bearer(&hs512)),
            "algorithm_not_allowed",
        ),
        (
            "not a JWT",
            Some(bearer("definitely-not-a-jwt")),
            "malformed",
        ),
        (
            "basic auth",
            Some("Basic dXNlcjpwYXNz".to_string()),
            "malformed",
        ),
    ];
    for (case, auth, reason) in &table {
        eprintln!("case: {case}");
        assert_refused(&gw, &up, "/users/1", auth.as_deref(), 401, reason);
    }

    // The same checks hold on an `optional` route once a token is presented.
    let expired = bearer(&hs256(&claims(json!({"exp": now() - 3600}))));
    assert_refused(&gw, &up, "/public/info", Some(&expired), 401, "expired");

    let metrics = gw.metrics();
    assert!(
        metrics.contains(r#"breakwater_auth_failures_total{reason="expired",service="users"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"breakwater_auth_failures_total{reason="expired",service="public"} 1"#)
    );
    assert!(
        metrics.contains(r#"breakwater_auth_failures_total{reason="missing",service="users"} 1"#)
    );
}

#[test]
fn a_valid_token_reaches_the_upstream_as_x_user_id_and_clients_cannot_forge_it() {
    let up = Upstream::start("users");
    let (gw, _dir) = hs256_gateway(&up);
    let token = bearer(&hs256(&claims(json!({}))));

    let a = get(&gw, "/users/1", Some(&token), &[]);
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["headers"]["x-user-id"], "user-42");
    assert_eq!(up.requests(), 1);

    // A client-sent X-User-Id is replaced by the token's subject ...
    let a = get(&gw, "/users/1", Some(&token), &[("X-User-Id", "admin")]);
    assert_eq!(a.status, 200);
    assert_eq!(a.body["headers"]["x-user-id"], "user-42");

    // ... removed on an optional route without a token ...
    let a = get(&gw, "/public/info", None, &[("X-User-Id", "admin")]);
    assert_eq!(
        a.status, 200,
        "optional auth lets anonymous requests through"
    );
    assert!(
        a.body["headers"].get("x-user-id").is_none(),
        "{:?}",
        a.body["headers"]
    );

    // ... set on an optional route with a valid token ...
    let a = get(&gw, "/public/info", Some(&token), &[("x-user-id", "admin")]);
    assert_eq!(a.status, 200);
    assert_eq!(a.body["headers"]["x-user-id"], "user-42");

    // ... and removed even where auth is off.
    let a = get(&gw, "/open/info", None, &[("X-User-Id", "admin")]);
    assert_eq!(a.status, 200);
    assert!(
        a.body["headers"].get("x-user-id").is_none(),
        "{:?}",
        a.body["headers"]
    );

    // A token a few seconds past expiry is still inside the 5 s leeway.
    let a = get(
        &gw,
        "/users/1",
        Some(&bearer(&hs256(&claims(json!({"exp": now() - 2}))))),
        &[],
    );
    assert_eq!(a.status, 200);
}

#[test]
fn required_scopes_answer_403_without_the_scope() {
    let up = Upstream::start("users");
    let (gw, _dir) = hs256_gateway(&up);
    let reader = bearer(&hs256(&claims(json!({"scope": "users:read"}))));
    assert_refused(
        &gw,
        &up,
        "/admin/users",
        Some(&reader),
        403,
        "insufficient_scope",
    );
    let a = get(&gw, "/admin/users", Some(&reader), &[]);
    assert_eq!(
        a.www_authenticate.as_deref(),
        Some(r#"Bearer error="insufficient_scope", scope="users:write""#)
    );
    // No token at all is still a 401, not a 403.
    assert_refused(&gw, &up, "/admin/users", None, 401, "missing");

    let writer = bearer(&hs256(&claims(json!({"scope": "users:read users:write"}))));
    let a = get(&gw, "/admin/users", Some(&writer), &[]);
    assert_eq!(a.status, 200, "{:?}", a.body);
    let scp_list = bearer(&hs256(&claims(json!({"scp": ["users:write"]}))));
    assert_eq!(get(&gw, "/admin/users", Some(&scp_list), &[]).status, 200);
    assert_eq!(up.requests(), 2);
}

#[test]
fn rs256_with_a_public_key_refuses_hs256_signed_with_that_public_key() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
auth:
  jwt:
    algorithms: [RS256]
    public_key_file: "{key}"
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
    auth: required
"#,
        key = fixture("jwt_rsa_public.pem"),
        up = up.addr,
    ));
    let rs256 = |private: &str| {
        encode(
            &Header::new(Algorithm::RS256),
            &claims(json!({})),
            &EncodingKey::from_rsa_pem(&read_fixture(private)).unwrap(),
        )
        .unwrap()
    };
    // One token for all 21 requests: minted twice, in two different seconds, the two would
    // differ (`exp`), and the second would be checked once more.
    let token = rs256("jwt_rsa_private.pem");
    let a = get(&gw, "/users/1", Some(&bearer(&token)), &[]);
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.body["headers"]["x-user-id"], "user-42");

    // The same token again is not verified again: one signature check for 21 requests.
    const CHECKS: &str = "breakwater_jwt_signature_checks_total";
    const HITS: &str = "breakwater_jwt_verified_cache_total{result=\"hit\"}";
    let (checks_before, hits_before) = (gw.metric(CHECKS), gw.metric(HITS));
    for _ in 0..20 {
        let again = get(&gw, "/users/1", Some(&bearer(&token)), &[]);
        assert_eq!(again.status, 200, "{:?}", again.body);
        assert_eq!(again.body["headers"]["x-user-id"], "user-42");
    }
    assert_eq!(gw.metric(CHECKS), checks_before, "{}", gw.metrics());
    assert_eq!(gw.metric(HITS) - hits_before, 20, "{}", gw.metrics());

    // The algorithm-confusion attack: HS256 keyed with the (public) PEM bytes.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(&read_fixture("jwt_rsa_public.pem")),
    )
    .unwrap();
    assert_refused(
        &gw,
        &up,
        "/users/1",
        Some(&bearer(&confused)),
        401,
        "algorithm_not_allowed",
    );
    let other = rs256("jwt_rsa_other_private.pem");
    assert_refused(
        &gw,
        &up,
        "/users/1",
        Some(&bearer(&other)),
        401,
        "bad_signature",
    );
}

#[test]
fn cors_preflight_needs_no_token() {
    let up = Upstream::start("users");
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
auth:
  jwt: {{algorithms: [HS256], secret_file: "{secret}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
    auth: required
    cors:
      allowed_origins: ["https://app.example.com"]
      allowed_methods: [GET]
      allowed_headers: [Authorization]
"#,
        secret = secret.display(),
        up = up.addr,
    ));
    // Browsers send preflights without credentials: the gateway answers them before auth.
    let resp = client()
        .request(reqwest::Method::OPTIONS, gw.url("/users/1"))
        .header("Origin", "https://app.example.com")
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "authorization")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(
        resp.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(up.requests(), 0);
}

#[test]
fn check_refuses_mixed_algorithm_families_and_missing_keys() {
    let (code, stderr) = run_check(
        r#"
auth:
  jwt: {algorithms: [HS256, RS256], secret_env: JWT_SECRET}
services:
  users: {routes: [{path_prefix: /users}], upstreams: ["127.0.0.1:1"]}
"#,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("algorithm confusion"), "{stderr}");

    let (code, stderr) = run_check(
        r#"
auth:
  jwt: {algorithms: [RS256], public_key_file: /nonexistent/jwt.pem}
services:
  users: {routes: [{path_prefix: /users}], upstreams: ["127.0.0.1:1"], auth: required}
"#,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/jwt.pem"), "{stderr}");

    // A service cannot require tokens when no validation is configured.
    let (code, stderr) = run_check(
        r#"
services:
  users: {routes: [{path_prefix: /users}], upstreams: ["127.0.0.1:1"], auth: required}
"#,
    );
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("auth"), "{stderr}");
}

/// What a test JWKS server answers, and how often it was asked.
#[derive(Default)]
struct JwksState {
    body: std::sync::Mutex<String>,
    failing: std::sync::atomic::AtomicBool,
    hits: std::sync::atomic::AtomicUsize,
}

/// A JWKS server over HTTPS with the given certificate (OpenSSL, as Pingora links it), on
/// threads of its own. Returns its `https://127.0.0.1:PORT/jwks` URL.
fn https_jwks_server(cert: &str, key: &str, state: std::sync::Arc<JwksState>) -> String {
    use pingora::tls::ssl::{SslAcceptor, SslFiletype, SslMethod};
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let mut acceptor = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    acceptor
        .set_private_key_file(fixture(key), SslFiletype::PEM)
        .unwrap();
    acceptor.set_certificate_chain_file(fixture(cert)).unwrap();
    let acceptor = std::sync::Arc::new(acceptor.build());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}/jwks", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let (acceptor, state) = (acceptor.clone(), state.clone());
            std::thread::spawn(move || {
                // A client that refuses the certificate ends the handshake: nothing to serve.
                let Ok(mut tls) = acceptor.accept(stream) else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                state.hits.fetch_add(1, Ordering::SeqCst);
                let response = if state.failing.load(Ordering::SeqCst) {
                    "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_string()
                } else {
                    let body = state.body.lock().unwrap().clone();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                };
                let _ = tls.write_all(response.as_bytes());
                let _ = tls.shutdown();
            });
        }
    });
    url
}

/// The public JWK of a fixture's RSA private key, with `kid`.
fn rsa_jwk(private: &str, kid: &str) -> Value {
    let key = EncodingKey::from_rsa_pem(&read_fixture(private)).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    serde_json::to_value(jwk).unwrap()
}

fn rs256_kid(private: &str, kid: &str, header: impl FnOnce(&mut Header)) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(kid.to_string());
    header(&mut h);
    encode(
        &h,
        &claims(json!({})),
        &EncodingKey::from_rsa_pem(&read_fixture(private)).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_jwks_over_https_from_a_private_ca_is_refreshed_and_kept_when_its_server_fails() {
    use std::sync::atomic::Ordering;
    let up = Upstream::start("users");
    let state = std::sync::Arc::new(JwksState::default());
    *state.body.lock().unwrap() =
        json!({"keys": [rsa_jwk("jwt_rsa_private.pem", "k1")]}).to_string();
    let url = https_jwks_server("jwks_server_cert.pem", "jwks_server_key.pem", state.clone());
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
auth:
  jwt:
    algorithms: [RS256]
    jwks_url: "{url}"
    jwks_ca_file: "{ca}"
    jwks_refresh_interval: 1s
    jwks_refetch_interval: 1s
services:
  users: {{routes: [{{path_prefix: /users}}], upstreams: ["{up}"], auth: required}}
"#,
        ca = fixture("jwks_ca.pem"),
        up = up.addr,
    ));
    let k1 = bearer(&rs256_kid("jwt_rsa_private.pem", "k1", |_| {}));
    assert_eq!(get(&gw, "/users/1", Some(&k1), &[]).status, 200);

    // Never fetch what a token names: a key of the attacker's choosing, at a URL of theirs.
    let attacker = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let attacker_url = format!("https://{}/jwks", attacker.local_addr().unwrap());
    attacker.set_nonblocking(true).unwrap();
    let forged = bearer(&rs256_kid("jwt_rsa_other_private.pem", "evil", |h| {
        h.jku = Some(attacker_url.clone());
        h.x5u = Some(attacker_url.clone());
    }));
    assert_refused(&gw, &up, "/users/1", Some(&forged), 401, "unknown_key");
    assert!(
        attacker.accept().is_err(),
        "the gateway connected to the URL a token named"
    );

    // The issuer rotates k1 out: the background refresh picks that up without any token
    // naming an unknown key, and k1 stops being accepted.
    *state.body.lock().unwrap() =
        json!({"keys": [rsa_jwk("jwt_rsa_other_private.pem", "k2")]}).to_string();
    common::poll_until(Duration::from_secs(10), "k1 withdrawn", || {
        get(&gw, "/users/1", Some(&k1), &[]).status == 401
    });
    let k2 = bearer(&rs256_kid("jwt_rsa_other_private.pem", "k2", |_| {}));
    assert_eq!(get(&gw, "/users/1", Some(&k2), &[]).status, 200);

    // The JWKS server fails: refreshes fail, are counted, and the keys loaded stay.
    state.failing.store(true, Ordering::SeqCst);
    const ERRORS: &str = r#"breakwater_jwks_refresh_total{result="error"}"#;
    common::poll_until(Duration::from_secs(10), "a failed refresh", || {
        gw.metric(ERRORS) >= 2
    });
    assert_eq!(get(&gw, "/users/1", Some(&k2), &[]).status, 200);
    assert!(gw.metric(r#"breakwater_jwks_refresh_total{result="ok"}"#) >= 1);
    assert!(gw.stderr().contains("keeping the 1 keys already loaded"));
}

#[test]
fn check_refuses_a_jwks_url_it_cannot_trust() {
    let state = std::sync::Arc::new(JwksState::default());
    *state.body.lock().unwrap() =
        json!({"keys": [rsa_jwk("jwt_rsa_private.pem", "k1")]}).to_string();
    let private_ca =
        https_jwks_server("jwks_server_cert.pem", "jwks_server_key.pem", state.clone());
    let self_signed = https_jwks_server("tls_cert.pem", "tls_key.pem", state.clone());
    let check = |jwt: &str| {
        run_check(&format!(
            "auth:\n  jwt: {{algorithms: [RS256], {jwt}}}\nservices:\n  users: \
             {{routes: [{{path_prefix: /users}}], upstreams: [\"127.0.0.1:1\"], auth: required}}\n"
        ))
    };
    let ca = fixture("jwks_ca.pem");

    let (code, stderr) = check(&format!(
        "jwks_url: \"{private_ca}\", jwks_ca_file: \"{ca}\""
    ));
    assert_eq!(code, 0, "{stderr}");
    // Plain http to a host that is not loopback: refused before any fetch.
    let (code, stderr) = check("jwks_url: \"http://idp.example/jwks\"");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("allow_insecure_jwks_url"), "{stderr}");
    // The system's roots do not know the private CA.
    let (code, stderr) = check(&format!("jwks_url: \"{private_ca}\""));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    // A certificate the private CA did not sign.
    let (code, stderr) = check(&format!(
        "jwks_url: \"{self_signed}\", jwks_ca_file: \"{ca}\""
    ));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("certificate"), "{stderr}");
    // The CA file must hold a certificate.
    let (code, stderr) = check(&format!(
        "jwks_url: \"{private_ca}\", jwks_ca_file: \"{}\"",
        fixture("jwt_rsa_public.pem")
    ));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no PEM certificate"), "{stderr}");
    assert_eq!(
        state.hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the trusted fetch"
    );
}
