//! Unit tests of token verification, key sources, the JWKS refetch and the config checks.

use super::config::{default_forward_claims, validate_scopes};
use super::fetch::JwksUrl;
use super::*;
use crate::clock::ManualClock;
use base64::Engine;
use http::HeaderValue;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::Algorithm;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Deserialize;
use serde_json::json;
use serde_json::Value;
use std::io::{Read, Write};
use std::sync::atomic::Ordering;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

const SECRET: &[u8] = b"an-hmac-secret-of-at-least-32-bytes!!";
const RSA_PRIVATE: &str = include_str!("../../../tests/fixtures/jwt_rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("../../../tests/fixtures/jwt_rsa_public.pem");
const RSA_OTHER_PRIVATE: &str = include_str!("../../../tests/fixtures/jwt_rsa_other_private.pem");
const EC_PRIVATE: &str = include_str!("../../../tests/fixtures/jwt_ec_private.pem");
const EC_PUBLIC: &str = include_str!("../../../tests/fixtures/jwt_ec_public.pem");

fn now() -> i64 {
    jsonwebtoken::get_current_timestamp() as i64
}

fn config(yaml: &str) -> JwtConfig {
    serde_yaml::from_str(yaml).expect("valid jwt config")
}

fn write(dir: &tempfile::TempDir, name: &str, contents: &[u8]) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).expect("write fixture");
    path.display().to_string()
}

fn hs256() -> (Authenticator, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut secret = SECRET.to_vec();
    secret.push(b'\n');
    let path = write(&dir, "secret", &secret);
    let cfg = config(&format!(
        "algorithms: [HS256]\nsecret_file: {path}\nissuer: https://auth.example.com\n\
         audience: api\nleeway: 30s\n"
    ));
    (Authenticator::new(&cfg).expect("authenticator"), dir)
}

fn sign(header: Header, claims: &Value, key: &EncodingKey) -> String {
    encode(&header, claims, key).expect("encode token")
}

fn hs(claims: Value) -> String {
    sign(
        Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET),
    )
}

fn claims(extra: Value) -> Value {
    let mut base = json!({
        "sub": "user-1",
        "iss": "https://auth.example.com",
        "aud": "api",
        "exp": now() + 600,
    });
    if let (Some(base), Value::Object(extra)) = (base.as_object_mut(), extra) {
        for (k, v) in extra {
            if v.is_null() {
                base.remove(&k);
            } else {
                base.insert(k, v);
            }
        }
    }
    base
}

fn bearer(token: &str) -> Option<HeaderValue> {
    Some(HeaderValue::from_str(&format!("Bearer {token}")).expect("header value"))
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

async fn check(auth: &Authenticator, header: Option<HeaderValue>) -> Result<String, AuthError> {
    auth.authenticate(header.as_ref())
        .await
        .map(|id| id.subject.clone().unwrap_or_default())
}

#[tokio::test]
async fn token_table() {
    let (auth, _dir) = hs256();
    let valid = hs(claims(json!({})));
    let mut tampered: Vec<&str> = valid.split('.').collect();
    let evil_payload = b64(&claims(json!({"sub": "admin"})));
    tampered[1] = &evil_payload;
    let tampered = tampered.join(".");
    let alg_none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(json!({})))
    );
    let hs512 = sign(
        Header::new(Algorithm::HS512),
        &claims(json!({})),
        &EncodingKey::from_secret(SECRET),
    );
    let other_secret = sign(
        Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(b"another-secret-another-secret-another"),
    );
    let ok = |s: &str| Ok(s.to_string());
    let cases: Vec<(&str, Option<HeaderValue>, Result<String, AuthError>)> = vec![
        ("valid", bearer(&valid), ok("user-1")),
        (
            "scheme is case-insensitive",
            Some(HeaderValue::from_str(&format!("bEaReR {valid}")).unwrap()),
            ok("user-1"),
        ),
        (
            "audience list containing ours",
            bearer(&hs(claims(json!({"aud": ["other", "api"]})))),
            ok("user-1"),
        ),
        (
            "expired within the leeway",
            bearer(&hs(claims(json!({"exp": now() - 10})))),
            ok("user-1"),
        ),
        ("missing header", None, Err(AuthError::Missing)),
        (
            "expired",
            bearer(&hs(claims(json!({"exp": now() - 3600})))),
            Err(AuthError::Expired),
        ),
        (
            "not yet valid",
            bearer(&hs(claims(json!({"nbf": now() + 3600})))),
            Err(AuthError::NotYetValid),
        ),
        (
            "wrong issuer",
            bearer(&hs(claims(json!({"iss": "https://evil.example.com"})))),
            Err(AuthError::WrongIssuer),
        ),
        (
            "no issuer",
            bearer(&hs(claims(json!({"iss": null})))),
            Err(AuthError::WrongIssuer),
        ),
        (
            "wrong audience",
            bearer(&hs(claims(json!({"aud": "billing"})))),
            Err(AuthError::WrongAudience),
        ),
        (
            "no audience",
            bearer(&hs(claims(json!({"aud": null})))),
            Err(AuthError::WrongAudience),
        ),
        (
            "no exp",
            bearer(&hs(claims(json!({"exp": null})))),
            Err(AuthError::Malformed),
        ),
        (
            "wrong key",
            bearer(&other_secret),
            Err(AuthError::BadSignature),
        ),
        (
            "tampered payload",
            bearer(&tampered),
            Err(AuthError::BadSignature),
        ),
        (
            "alg none",
            bearer(&alg_none),
            Err(AuthError::AlgorithmNotAllowed),
        ),
        (
            "alg outside the allowlist",
            bearer(&hs512),
            Err(AuthError::AlgorithmNotAllowed),
        ),
        ("two segments", bearer("abc.def"), Err(AuthError::Malformed)),
        ("garbage", bearer("not-a-jwt"), Err(AuthError::Malformed)),
        (
            "bad header json",
            bearer(&format!("{}.e30.sig", b64(&json!("x")))),
            Err(AuthError::Malformed),
        ),
        (
            "basic scheme",
            Some(HeaderValue::from_static("Basic dXNlcjpwYXNz")),
            Err(AuthError::Malformed),
        ),
        (
            "scheme only",
            Some(HeaderValue::from_static("Bearer")),
            Err(AuthError::Malformed),
        ),
    ];
    for (name, header, expected) in cases {
        assert_eq!(check(&auth, header).await, expected, "case: {name}");
    }
}

fn bytes(n: &str) -> usize {
    n.parse::<crate::values::ByteSize>().unwrap().0 as usize
}

/// An RS256 authenticator with `verified_cache_size` set to `size`.
fn rs256(size: &str) -> (Authenticator, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(&dir, "public.pem", RSA_PUBLIC.as_bytes());
    let cfg = config(&format!(
        "algorithms: [RS256]\npublic_key_file: {path}\nissuer: https://auth.example.com\n\
         audience: api\nverified_cache_size: {size}\n"
    ));
    (Authenticator::new(&cfg).expect("authenticator"), dir)
}

fn rs(claims: Value) -> String {
    sign(
        Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap(),
    )
}

#[tokio::test]
async fn a_repeated_token_is_served_from_the_verified_cache_until_its_exp() {
    let (auth, _dir) = rs256("8MiB");
    let t = now() as u64;
    let exp = t + 600;
    let token = rs(claims(json!({"exp": exp})));
    let first = auth
        .authenticate_at(bearer(&token).as_ref(), t)
        .await
        .unwrap();
    let again = auth
        .authenticate_at(bearer(&token).as_ref(), t + 599)
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&first, &again), "the second use is a cache hit");
    assert_eq!(auth.verified_tokens().len(), 1);

    // At `exp` the entry is no longer used: the token is checked again (and, within the
    // leeway, still passes), as a fresh identity.
    let at_exp = auth
        .authenticate_at(bearer(&token).as_ref(), exp)
        .await
        .unwrap();
    assert!(!Arc::ptr_eq(&first, &at_exp), "checked again at exp");

    // The same claims under another spelling of the scheme are the same token.
    let spelled = HeaderValue::from_str(&format!("bearer   {token}")).unwrap();
    let hit = auth.authenticate_at(Some(&spelled), t + 1).await.unwrap();
    assert_eq!(hit.subject.as_deref(), Some("user-1"));
}

#[tokio::test]
async fn refused_tokens_are_never_cached_and_never_match_a_cached_one() {
    let (auth, _dir) = rs256("8MiB");
    let valid = rs(claims(json!({})));
    auth.authenticate(bearer(&valid).as_ref()).await.unwrap();
    assert_eq!(auth.verified_tokens().len(), 1);

    // Same header and payload, altered signature: a different digest, so the full check.
    let (unsigned, signature) = valid.rsplit_once('.').unwrap();
    let mut forged_sig = signature.as_bytes().to_vec();
    forged_sig[10] = if forged_sig[10] == b'A' { b'B' } else { b'A' };
    let forged = format!("{unsigned}.{}", String::from_utf8(forged_sig).unwrap());
    // The payload of the cached token under a signature by another key.
    let other_key = sign(
        Header::new(Algorithm::RS256),
        &claims(json!({})),
        &EncodingKey::from_rsa_pem(RSA_OTHER_PRIVATE.as_bytes()).unwrap(),
    );
    let refused = [
        forged,
        other_key,
        format!("{valid}."),
        format!(".{valid}"),
        rs(claims(json!({"exp": now() - 3600}))),
        rs(claims(json!({"aud": "other"}))),
        rs(claims(json!({"iss": "https://evil.example.com"}))),
        rs(claims(json!({"nbf": now() + 3600}))),
    ];
    for token in &refused {
        for _ in 0..3 {
            let verdict = auth.authenticate(bearer(token).as_ref()).await;
            assert!(verdict.is_err(), "{token} refused");
        }
    }
    assert_eq!(auth.verified_tokens().len(), 1, "no refused token was kept");
}

#[tokio::test]
async fn the_cache_stays_within_its_size_and_can_be_turned_off() {
    let (auth, _dir) = rs256("16KiB");
    for i in 0..200 {
        let token = rs(claims(json!({"sub": format!("user-{i}")})));
        auth.authenticate(bearer(&token).as_ref()).await.unwrap();
    }
    let held = auth.verified_tokens().weight() as usize;
    assert!(held <= bytes("16KiB"), "{held} bytes held");
    assert!(auth.verified_tokens().len() > 0);

    let (off, _dir) = rs256("0");
    let token = rs(claims(json!({})));
    let first = off.authenticate(bearer(&token).as_ref()).await.unwrap();
    let again = off.authenticate(bearer(&token).as_ref()).await.unwrap();
    assert!(!Arc::ptr_eq(&first, &again), "every use is checked");
    assert_eq!(off.verified_tokens().len(), 0);
}

#[tokio::test]
async fn a_cached_identity_still_needs_each_services_scopes() {
    let (auth, _dir) = rs256("8MiB");
    let token = rs(claims(json!({"scope": "read"})));
    let reader = ServiceAuth::compile(AuthMode::Required, &["read".into()]).unwrap();
    let writer = ServiceAuth::compile(AuthMode::Required, &["write".into()]).unwrap();
    let header = bearer(&token);
    assert!(reader.verify(&auth, header.as_ref()).await.is_ok());
    assert_eq!(
        writer.verify(&auth, header.as_ref()).await.unwrap_err(),
        AuthError::InsufficientScope("write".into())
    );
    assert_eq!(auth.verified_tokens().len(), 1);
}

#[tokio::test]
async fn rs256_refuses_hs256_signed_with_the_public_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "pub.pem", RSA_PUBLIC.as_bytes());
    let auth = Authenticator::new(&config(&format!(
        "algorithms: [RS256]\npublic_key_file: {path}"
    )))
    .unwrap();
    let c = claims(json!({}));
    let rs = |pem: &str| {
        sign(
            Header::new(Algorithm::RS256),
            &c,
            &EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap(),
        )
    };
    assert_eq!(
        check(&auth, bearer(&rs(RSA_PRIVATE))).await,
        Ok("user-1".into())
    );
    assert_eq!(
        check(&auth, bearer(&rs(RSA_OTHER_PRIVATE))).await,
        Err(AuthError::BadSignature)
    );
    // The classic confusion attack: the public key's PEM bytes used as an HMAC secret.
    let confused = sign(
        Header::new(Algorithm::HS256),
        &c,
        &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
    );
    assert_eq!(
        check(&auth, bearer(&confused)).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
    // A token for another key type is refused before any key is tried.
    let header = Header::new(Algorithm::ES256);
    let es = sign(
        header,
        &c,
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    );
    assert_eq!(
        check(&auth, bearer(&es)).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
}

#[tokio::test]
async fn es256_public_key_and_secret_env() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "ec.pem", EC_PUBLIC.as_bytes());
    let auth = Authenticator::new(&config(&format!(
        "algorithms: [ES256]\npublic_key_file: {path}"
    )))
    .unwrap();
    let token = sign(
        Header::new(Algorithm::ES256),
        &claims(json!({})),
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    );
    assert_eq!(check(&auth, bearer(&token)).await, Ok("user-1".into()));

    std::env::set_var(
        "BREAKWATER_TEST_JWT_SECRET",
        std::str::from_utf8(SECRET).unwrap(),
    );
    let auth = Authenticator::new(&config(
        "algorithms: [HS256]\nsecret_env: BREAKWATER_TEST_JWT_SECRET",
    ))
    .unwrap();
    let token = hs(claims(json!({"aud": "anything", "iss": "anyone"})));
    assert_eq!(
        check(&auth, bearer(&token)).await,
        Ok("user-1".into()),
        "issuer and audience are not checked when not configured"
    );
    let err = Authenticator::new(&config(
        "algorithms: [HS256]\nsecret_env: BREAKWATER_TEST_UNSET_VARIABLE",
    ))
    .err()
    .unwrap();
    assert!(err.contains("BREAKWATER_TEST_UNSET_VARIABLE"), "{err}");
}

#[tokio::test]
async fn identity_claims_scopes_and_forwarding() {
    let (auth, _dir) = hs256();
    let token = hs(claims(json!({
        "scope": "users:read  users:write",
        "scp": ["orders:read"],
        "tenant": 42,
        "admin": false,
        "groups": ["a"],
        "bad": "line\nbreak",
    })));
    let id = auth.authenticate(bearer(&token).as_ref()).await.unwrap();
    assert_eq!(id.subject.as_deref(), Some("user-1"));
    assert_eq!(id.scopes, ["users:read", "users:write", "orders:read"]);
    assert_eq!(id.claim_as_header_value("sub").unwrap(), "user-1");
    assert_eq!(id.claim_as_header_value("tenant").unwrap(), "42");
    assert_eq!(id.claim_as_header_value("admin").unwrap(), "false");
    assert_eq!(id.claim_as_header_value("groups"), None);
    assert_eq!(id.claim_as_header_value("bad"), None);
    assert_eq!(id.claim_as_header_value("absent"), None);

    assert_eq!(check_scopes(&id, &[]), Ok(()));
    assert_eq!(
        check_scopes(&id, &["users:read".into(), "orders:read".into()]),
        Ok(())
    );
    let err = check_scopes(&id, &["users:read".into(), "users:admin".into()]).unwrap_err();
    assert_eq!(err.status(), 403);
    assert_eq!(err.reason(), "insufficient_scope");
    assert_eq!(
        err.www_authenticate(),
        "Bearer error=\"insufficient_scope\", scope=\"users:read users:admin\""
    );

    let forwarded = auth.forwarded_headers();
    assert_eq!(forwarded.len(), 1);
    assert_eq!(forwarded[0].0, "sub");
    assert_eq!(forwarded[0].1.name(), "x-user-id");
}

#[test]
fn error_answers() {
    assert_eq!(AuthError::Missing.www_authenticate(), "Bearer");
    assert_eq!(AuthError::Missing.status(), 401);
    assert_eq!(
        AuthError::Expired.www_authenticate(),
        "Bearer error=\"invalid_token\", error_description=\"the token has expired\""
    );
    let body: Value = serde_json::from_slice(&AuthError::Expired.body()).unwrap();
    assert_eq!(body, json!({"error": "unauthorized", "reason": "expired"}));
    let scope = AuthError::InsufficientScope("a:b".into());
    let body: Value = serde_json::from_slice(&scope.body()).unwrap();
    assert_eq!(
        body,
        json!({"error": "forbidden", "reason": "insufficient_scope"})
    );
    for e in [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::BadSignature,
        AuthError::WrongIssuer,
        AuthError::WrongAudience,
        AuthError::AlgorithmNotAllowed,
        AuthError::UnknownKey,
        scope,
    ] {
        assert_ne!(e.www_authenticate_value(), "", "{e:?}");
        assert!(e
            .reason()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_'));
    }
}

#[test]
fn failures_are_counted_by_service_and_reason() {
    register_metrics();
    count_failure("users", &AuthError::Expired);
    count_failure("users", &AuthError::Expired);
    let mut text = Vec::new();
    prometheus::Encoder::encode(
        &prometheus::TextEncoder::new(),
        &crate::ops::metrics::METRICS.registry.gather(),
        &mut text,
    )
    .unwrap();
    let text = String::from_utf8(text).unwrap();
    assert!(
        text.contains("breakwater_auth_failures_total{reason=\"expired\",service=\"users\"} 2"),
        "{text}"
    );
}

#[test]
fn config_defaults_and_cross_field_checks() {
    let cfg = config("algorithms: [HS256]\nsecret_env: S");
    assert_eq!(cfg.leeway, Duration::from_secs(30));
    assert_eq!(cfg.jwks_refetch_interval, Duration::from_secs(10));
    assert_eq!(cfg.forward_claims, default_forward_claims());
    assert!(cfg.audience.is_empty());
    assert_eq!(cfg.check().map(|_| ()), Ok(()));
    let cfg = config("algorithms: [RS256]\njwks_file: k.json\naudience: [a, b]\nleeway: 1m");
    assert_eq!(cfg.audience, ["a", "b"]);
    assert_eq!(cfg.leeway, Duration::from_secs(60));
    assert_eq!(cfg.check().map(|_| ()), Ok(()));

    let refused = |yaml: &str, needle: &str| {
        let err = config(yaml).check().map(|_| ()).unwrap_err();
        assert!(err.contains(needle), "{yaml:?}: {err}");
    };
    refused(
        "algorithms: [HS256, RS256]\nsecret_env: S",
        "algorithm confusion",
    );
    refused(
        "algorithms: [HS256]\nsecret_env: S\nsecret_file: f",
        "found secret_env, secret_file",
    );
    refused("algorithms: [HS256]", "found none");
    refused(
        "algorithms: [HS256]\npublic_key_file: k.pem",
        "need an HMAC secret",
    );
    refused("algorithms: [RS256]\nsecret_file: s", "need a public key");
    refused(
        "algorithms: [RS256, ES256]\npublic_key_file: k.pem",
        "one key",
    );
    refused("algorithms: []\nsecret_env: S", "at least one");
    assert!(config("algorithms: [RS256]\njwks_url: https://idp/jwks")
        .check()
        .is_ok());
    refused(
        "algorithms: [RS256]\njwks_url: http://idp/jwks",
        "allow_insecure_jwks_url",
    );
    assert!(config(
        "algorithms: [RS256]\njwks_url: http://idp/jwks\nallow_insecure_jwks_url: true"
    )
    .check()
    .is_ok());
    refused("algorithms: [RS256]\njwks_url: ftp://idp/jwks", "https://");
    refused(
        "algorithms: [RS256]\njwks_file: k.json\njwks_ca_file: ca.pem",
        "only apply to jwks_url",
    );
    refused(
        "algorithms: [RS256]\njwks_url: https://idp/jwks\njwks_refresh_interval: 0s",
        "at least 1s",
    );
    refused(
        "algorithms: [HS256]\nsecret_env: S\nforward_claims: {sub: Host}",
        "reserved",
    );
    refused(
        "algorithms: [HS256]\nsecret_env: S\nforward_claims: {sub: \"X User\"}",
        "not a valid header name",
    );
    assert!(serde_yaml::from_str::<JwtConfig>("algorithms: [none]\nsecret_env: S").is_err());
    assert!(serde_yaml::from_str::<JwtConfig>("algorithms: [HS256]\nsecret: x").is_err());
    let auth: AuthConfig = serde_yaml::from_str("{}").unwrap();
    assert!(auth.jwt.is_none());
    #[derive(Deserialize)]
    struct Service {
        #[serde(default)]
        auth: AuthMode,
    }
    let mode = |y: &str| serde_yaml::from_str::<Service>(y).unwrap().auth;
    assert_eq!(mode("{}"), AuthMode::None);
    assert_eq!(mode("auth: required"), AuthMode::Required);
    assert_eq!(mode("auth: optional"), AuthMode::Optional);
    assert!(validate_scopes(&["users:read".into()]).is_ok());
    assert!(validate_scopes(&["two words".into()]).is_err());
    assert!(validate_scopes(&["q\"uote".into()]).is_err());
}

#[test]
fn startup_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem").display().to_string();
    let err = Authenticator::new(&config(&format!(
        "algorithms: [RS256]\npublic_key_file: {missing}"
    )))
    .err()
    .unwrap();
    assert!(
        err.contains("public_key_file") && err.contains("nope.pem"),
        "{err}"
    );
    let garbage = write(&dir, "garbage.pem", b"not a pem");
    let err = Authenticator::new(&config(&format!(
        "algorithms: [RS256]\npublic_key_file: {garbage}"
    )))
    .err()
    .unwrap();
    assert!(err.contains("garbage.pem") && err.contains("RSA"), "{err}");
    let empty = write(&dir, "empty", b"\n");
    let err = Authenticator::new(&config(&format!(
        "algorithms: [HS256]\nsecret_file: {empty}"
    )))
    .err()
    .unwrap();
    assert!(err.contains("empty"), "{err}");
    let jwks = write(&dir, "jwks.json", b"{\"keys\": []}");
    let err = Authenticator::new(&config(&format!("algorithms: [RS256]\njwks_file: {jwks}")))
        .err()
        .unwrap();
    assert!(
        err.contains("jwks.json") && err.contains("no usable"),
        "{err}"
    );
}

fn rsa_jwk(private_pem: &str, kid: &str) -> Value {
    let key = EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some(kid.to_string());
    serde_json::to_value(jwk).unwrap()
}

fn rs256_with_kid(private_pem: &str, kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    sign(
        header,
        &claims(json!({})),
        &EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
    )
}

/// A one-route HTTP server on a std thread serving the current JWKS, counting fetches.
fn jwks_server(jwks: Arc<Mutex<String>>, hits: Arc<AtomicUsize>, chunked: bool) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            read_request(&mut stream);
            hits.fetch_add(1, Ordering::SeqCst);
            let body = jwks.lock().unwrap().clone();
            let response = if chunked {
                let (a, b) = body.split_at(body.len() / 2);
                format!(
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                     {:x}\r\n{a}\r\n{:x};ext=1\r\n{b}\r\n0\r\n\r\n",
                    a.len(),
                    b.len()
                )
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    format!("http://{addr}/.well-known/jwks.json")
}

#[tokio::test]
async fn unknown_kid_triggers_one_rate_limited_jwks_refetch() {
    let jwks = Arc::new(Mutex::new(
        json!({"keys": [rsa_jwk(RSA_PRIVATE, "k1")]}).to_string(),
    ));
    let hits = Arc::new(AtomicUsize::new(0));
    let url = jwks_server(Arc::clone(&jwks), Arc::clone(&hits), false);
    let clock = Arc::new(ManualClock::new(1_000));
    let cfg = config(&format!("algorithms: [RS256]\njwks_url: \"{url}\""));
    let auth = Authenticator::with_clock(&cfg, clock.clone()).unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1, "fetched at start");

    let k1 = rs256_with_kid(RSA_PRIVATE, Some("k1"));
    assert_eq!(check(&auth, bearer(&k1)).await, Ok("user-1".into()));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "a known kid fetches nothing"
    );

    // The IdP rotates in a new key: the first token with its kid refetches once.
    *jwks.lock().unwrap() = json!({"keys": [
        rsa_jwk(RSA_PRIVATE, "k1"), rsa_jwk(RSA_OTHER_PRIVATE, "k2")
    ]})
    .to_string();
    let k2 = rs256_with_kid(RSA_OTHER_PRIVATE, Some("k2"));
    assert_eq!(check(&auth, bearer(&k2)).await, Ok("user-1".into()));
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    // Within the interval, unknown kids are refused without another fetch.
    let k3 = rs256_with_kid(RSA_PRIVATE, Some("k3"));
    *jwks.lock().unwrap() = json!({"keys": [rsa_jwk(RSA_PRIVATE, "k3")]}).to_string();
    for _ in 0..5 {
        assert_eq!(check(&auth, bearer(&k3)).await, Err(AuthError::UnknownKey));
    }
    clock.advance(Duration::from_millis(9_999));
    assert_eq!(check(&auth, bearer(&k3)).await, Err(AuthError::UnknownKey));
    assert_eq!(hits.load(Ordering::SeqCst), 2);

    clock.advance(Duration::from_millis(1));
    assert_eq!(check(&auth, bearer(&k3)).await, Ok("user-1".into()));
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let unknown = rs256_with_kid(RSA_PRIVATE, Some("nobody"));
    assert_eq!(
        check(&auth, bearer(&unknown)).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    assert_eq!(
        check(&auth, bearer(&k1)).await,
        Err(AuthError::UnknownKey),
        "k1 was rotated out"
    );
}

#[tokio::test]
async fn jwks_file_kidless_tokens_and_failed_refetch_keep_the_keys() {
    let dir = tempfile::tempdir().unwrap();
    let mut ec = {
        let key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        serde_json::to_value(Jwk::from_encoding_key(&key, Algorithm::ES256).unwrap()).unwrap()
    };
    ec["kid"] = json!("ec1");
    let set = json!({"keys": [
        rsa_jwk(RSA_PRIVATE, "r1"),
        rsa_jwk(RSA_OTHER_PRIVATE, "r2"),
        ec,
        {"kty": "oct", "k": "c2VjcmV0", "kid": "sym"},
        {"kty": "RSA", "use": "enc", "kid": "enc", "n": "AQAB", "e": "AQAB"},
    ]});
    let path = write(&dir, "jwks.json", set.to_string().as_bytes());
    let clock = Arc::new(ManualClock::new(0));
    let cfg = config(&format!("algorithms: [RS256, ES256]\njwks_file: {path}"));
    let auth = Authenticator::with_clock(&cfg, clock.clone()).unwrap();

    // No kid: every RSA key is tried.
    let kidless = rs256_with_kid(RSA_OTHER_PRIVATE, None);
    assert_eq!(check(&auth, bearer(&kidless)).await, Ok("user-1".into()));
    let wrong = rs256_with_kid(RSA_OTHER_PRIVATE, Some("r1"));
    assert_eq!(
        check(&auth, bearer(&wrong)).await,
        Err(AuthError::BadSignature)
    );
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("r1".into());
    let es_on_rsa_kid = sign(
        header,
        &claims(json!({})),
        &EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap(),
    );
    assert_eq!(
        check(&auth, bearer(&es_on_rsa_kid)).await,
        Err(AuthError::AlgorithmNotAllowed)
    );
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("sym".into());
    let hs_on_oct = sign(
        header,
        &claims(json!({})),
        &EncodingKey::from_secret(b"secret"),
    );
    assert_eq!(
        check(&auth, bearer(&hs_on_oct)).await,
        Err(AuthError::AlgorithmNotAllowed)
    );

    // A broken file on refetch keeps the keys already loaded.
    std::fs::write(&path, b"{not json").unwrap();
    let unknown = rs256_with_kid(RSA_PRIVATE, Some("new"));
    assert_eq!(
        check(&auth, bearer(&unknown)).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(check(&auth, bearer(&kidless)).await, Ok("user-1".into()));
    // A fixed file is picked up once the interval, doubled by the failure, has passed.
    std::fs::write(
        &path,
        json!({"keys": [rsa_jwk(RSA_PRIVATE, "new")]}).to_string(),
    )
    .unwrap();
    assert_eq!(
        check(&auth, bearer(&unknown)).await,
        Err(AuthError::UnknownKey)
    );
    clock.advance(Duration::from_secs(10));
    assert_eq!(
        check(&auth, bearer(&unknown)).await,
        Err(AuthError::UnknownKey)
    );
    clock.advance(Duration::from_secs(10));
    assert_eq!(check(&auth, bearer(&unknown)).await, Ok("user-1".into()));
}

#[tokio::test]
async fn concurrent_unknown_kids_share_one_refetch() {
    let jwks = Arc::new(Mutex::new(
        json!({"keys": [rsa_jwk(RSA_PRIVATE, "k1")]}).to_string(),
    ));
    let hits = Arc::new(AtomicUsize::new(0));
    let url = jwks_server(Arc::clone(&jwks), Arc::clone(&hits), true);
    let cfg = config(&format!("algorithms: [RS256]\njwks_url: \"{url}\""));
    let auth = Arc::new(Authenticator::with_clock(&cfg, Arc::new(ManualClock::new(0))).unwrap());
    *jwks.lock().unwrap() = json!({"keys": [rsa_jwk(RSA_OTHER_PRIVATE, "k2")]}).to_string();
    let k2 = rs256_with_kid(RSA_OTHER_PRIVATE, Some("k2"));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (auth, k2) = (Arc::clone(&auth), k2.clone());
            tokio::spawn(async move { check(&auth, bearer(&k2)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), Ok("user-1".into()));
    }
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "start-up fetch plus one refetch"
    );
}

#[test]
fn jwks_urls_are_https_unless_loopback_or_opted_in() {
    for ok in [
        "https://idp.example/.well-known/jwks.json",
        "HTTPS://idp.example:8443/keys?x=1",
        "http://127.0.0.1:8000/jwks",
        "http://127.9.9.9/jwks",
        "http://[::1]/jwks",
        "http://localhost/jwks",
        "http://LOCALHOST:1/jwks",
    ] {
        assert!(JwksUrl::parse(ok, false).is_ok(), "{ok}");
    }
    for (bad, needle) in [
        ("http://idp.example/jwks", "allow_insecure_jwks_url"),
        ("http://10.0.0.1/jwks", "allow_insecure_jwks_url"),
        (
            "http://localhost.evil.example/jwks",
            "allow_insecure_jwks_url",
        ),
        ("http://127.0.0.1.nip.io/jwks", "allow_insecure_jwks_url"),
        ("ftp://idp/jwks", "https://"),
        ("https://user:pw@idp/jwks", "credentials"),
        ("not a url", "not a URL"),
    ] {
        let err = JwksUrl::parse(bad, false).unwrap_err();
        assert!(err.contains(needle), "{bad}: {err}");
    }
    assert!(JwksUrl::parse("http://idp.example/jwks", true).is_ok());
}

/// A JWKS server that fails with 500 until told otherwise, counting fetches.
fn flaky_jwks_server(jwks: String, failing: Arc<AtomicBool>, hits: Arc<AtomicUsize>) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            read_request(&mut stream);
            hits.fetch_add(1, Ordering::SeqCst);
            let response = if failing.load(Ordering::SeqCst) {
                "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n".to_string()
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{jwks}",
                    jwks.len()
                )
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    format!("http://{addr}/jwks")
}

#[tokio::test]
async fn failed_refetches_keep_the_keys_back_off_and_are_counted() {
    let failing = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let set = json!({"keys": [rsa_jwk(RSA_PRIVATE, "k1")]}).to_string();
    let url = flaky_jwks_server(set, Arc::clone(&failing), Arc::clone(&hits));
    let clock = Arc::new(ManualClock::new(0));
    let cfg = config(&format!(
        "algorithms: [RS256]\njwks_url: \"{url}\"\njwks_refetch_interval: 10s"
    ));
    let auth = Authenticator::with_clock(&cfg, clock.clone()).unwrap();
    register_metrics();
    let refreshes = |result: &str| super::keys::REFRESHES.with_label_values(&[result]).get();
    let errors_before = refreshes("error");
    failing.store(true, Ordering::SeqCst);
    let k1 = rs256_with_kid(RSA_PRIVATE, Some("k1"));
    let unknown = rs256_with_kid(RSA_PRIVATE, Some("k9"));
    // Each failure in a row doubles the wait: 20s after one, 40s after two.
    let mut fetched_at = Vec::new();
    for second in 0..=75 {
        if second > 0 {
            clock.advance(Duration::from_secs(1));
        }
        let before = hits.load(Ordering::SeqCst);
        assert_eq!(
            check(&auth, bearer(&unknown)).await,
            Err(AuthError::UnknownKey)
        );
        if hits.load(Ordering::SeqCst) > before {
            fetched_at.push(second);
        }
        // The keys loaded at start keep working throughout.
        assert_eq!(check(&auth, bearer(&k1)).await, Ok("user-1".into()));
    }
    assert_eq!(fetched_at, [0, 20, 60]);
    // Other tests may fail refetches at the same time: at least these three.
    assert!(refreshes("error") - errors_before >= 3);
    // A success resets the backoff.
    failing.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(75));
    assert_eq!(
        check(&auth, bearer(&unknown)).await,
        Err(AuthError::UnknownKey)
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        5,
        "start-up plus four refetches"
    );
    clock.advance(Duration::from_secs(10));
    check(&auth, bearer(&unknown)).await.unwrap_err();
    assert_eq!(hits.load(Ordering::SeqCst), 6, "10s again after a success");
}

fn read_request(stream: &mut std::net::TcpStream) {
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
}
