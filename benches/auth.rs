//! Cost of bearer-token checks per request: a repeated token served by the verified-token
//! cache against the same token checked every time (RS256, ES256, HS256).

use std::hint::black_box;

use breakwater::edge::auth::{AuthConfig, Authenticator};
use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderValue;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn authenticator(source: &str, alg: &str, cache: &str) -> Authenticator {
    let yaml = format!("jwt:\n  algorithms: [{alg}]\n  {source}\n  verified_cache_size: {cache}\n");
    let cfg: AuthConfig = serde_yaml::from_str(&yaml).expect("auth config");
    cfg.compile().expect("compiles").expect("jwt")
}

fn token(alg: Algorithm, key: &EncodingKey) -> HeaderValue {
    let exp = jsonwebtoken::get_current_timestamp() + 3600;
    let claims = serde_json::json!({"sub": "user-42", "exp": exp, "scope": "users:read"});
    let jwt = encode(&Header::new(alg), &claims, key).expect("token");
    HeaderValue::from_str(&format!("Bearer {jwt}")).expect("header value")
}

fn auth_benches(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let pem = |name: &str| std::fs::read(format!("{FIXTURES}/{name}")).expect("fixture");
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "a-bench-secret-of-at-least-32-bytes-long").expect("secret");
    let cases = [
        (
            "rs256",
            format!("public_key_file: {FIXTURES}/jwt_rsa_public.pem"),
            token(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(&pem("jwt_rsa_private.pem")).expect("rsa"),
            ),
        ),
        (
            "es256",
            format!("public_key_file: {FIXTURES}/jwt_ec_public.pem"),
            token(
                Algorithm::ES256,
                &EncodingKey::from_ec_pem(&pem("jwt_ec_private.pem")).expect("ec"),
            ),
        ),
        (
            "hs256",
            format!("secret_file: {}", secret.display()),
            token(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"a-bench-secret-of-at-least-32-bytes-long"),
            ),
        ),
    ];
    for (alg, source, header) in &cases {
        for (mode, size) in [("cached", "8MiB"), ("uncached", "0")] {
            let auth = authenticator(source, &alg.to_uppercase(), size);
            c.bench_function(&format!("auth/{alg}/{mode}"), |b| {
                b.iter(|| {
                    runtime
                        .block_on(auth.authenticate(black_box(Some(header))))
                        .map(|id| id.scopes.len())
                })
            });
        }
    }
}

criterion_group!(benches, auth_benches);
criterion_main!(benches);
