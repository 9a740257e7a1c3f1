//! JWT authentication at the edge: the `auth:` config section and the per-service `auth` mode,
//! the verification keys (HMAC secret, PEM public key, or a JWKS from a file or a URL), token
//! validation, the [`Identity`] a valid token yields (claims to forward upstream, scopes), the
//! client-facing answer for a refused token, and the `breakwater_auth_failures_total` metric.
//!
//! Security decisions live here and nowhere else: the algorithm allowlist is checked against
//! the token header before any key is touched, HMAC and public-key algorithms never share one
//! allowlist (algorithm confusion), `exp` is required, and a JWKS is refetched at most once per
//! `jwks_refetch_interval` however many unknown `kid`s arrive.

use crate::clock::{Clock, MonotonicClock};
use arc_swap::ArcSwap;
use base64::Engine;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use once_cell::sync::Lazy;
use prometheus::{IntCounterVec, Opts};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

/// The top-level `auth:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer JWT validation. Default: none, and then no service may use `auth: required` or
    /// `auth: optional`.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
}

impl AuthConfig {
    /// Cross-field checks; see [`JwtConfig::validate`].
    pub fn validate(&self) -> Result<(), String> {
        match &self.jwt {
            Some(jwt) => jwt.validate().map_err(|e| format!("jwt: {e}")),
            None => Ok(()),
        }
    }
}

/// A service's `auth:` mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// A valid token is needed; without one the gateway answers 401.
    Required,
    /// No token passes anonymously; a token that is present must be valid (else 401).
    Optional,
    /// Tokens are not looked at. The default.
    #[default]
    None,
}

/// `auth.jwt:`. Exactly one key source must be set: `secret_env`, `secret_file`,
/// `public_key_file`, `jwks_file` or `jwks_url`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// Allowed `alg` values: HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512,
    /// ES256, ES384, EdDSA. Required; HMAC (HS*) and public-key algorithms may not be mixed.
    pub algorithms: Vec<Algorithm>,
    /// Name of the environment variable holding the HMAC secret (its bytes as they are).
    /// Default: none.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// File holding the HMAC secret; trailing newlines are ignored. Default: none.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// PEM public key (RSA, EC P-256/P-384 or Ed25519; `PUBLIC KEY`, `RSA PUBLIC KEY` or a
    /// `CERTIFICATE`). Default: none.
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
    /// JSON Web Key Set file, read at start and again (rate-limited) when a token names an
    /// unknown `kid`. Default: none.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// JSON Web Key Set URL (`http://` only for now), fetched at start and again
    /// (rate-limited) when a token names an unknown `kid`. Default: none.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Required `iss` claim. Default: none (not checked).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted `aud` values, a string or a list; the token's `aud` must contain one of them.
    /// Default: none (not checked).
    #[serde(default, deserialize_with = "de_one_or_many")]
    pub audience: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`. Default: 30s.
    #[serde(default = "default_leeway", deserialize_with = "de_duration")]
    pub leeway: Duration,
    /// Claims sent upstream as request headers, claim -> header name. Client-sent copies of
    /// these headers must never reach an upstream. Default: `{sub: X-User-Id}`.
    #[serde(default = "default_forward_claims")]
    pub forward_claims: BTreeMap<String, String>,
    /// Shortest time between two JWKS refetches caused by unknown `kid`s. Default: 10s.
    #[serde(default = "default_refetch_interval", deserialize_with = "de_duration")]
    pub jwks_refetch_interval: Duration,
    /// Connect-and-read timeout of one `jwks_url` fetch. Default: 5s.
    #[serde(default = "default_fetch_timeout", deserialize_with = "de_duration")]
    pub jwks_fetch_timeout: Duration,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}
fn default_refetch_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_fetch_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_forward_claims() -> BTreeMap<String, String> {
    BTreeMap::from([("sub".to_string(), "X-User-Id".to_string())])
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| de::Error::custom(format!("invalid duration {s:?}: {e}")))
}

fn de_one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Headers a claim may never be forwarded as: they frame the request or carry the client's
/// own credentials.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "authorization",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "cookie",
];

impl JwtConfig {
    /// Cross-field checks that serde cannot do: one key source, one algorithm family that
    /// fits it, valid forward header names.
    pub fn validate(&self) -> Result<(), String> {
        if self.algorithms.is_empty() {
            return Err("algorithms: list at least one algorithm".into());
        }
        let sources: Vec<&str> = [
            ("secret_env", self.secret_env.is_some()),
            ("secret_file", self.secret_file.is_some()),
            ("public_key_file", self.public_key_file.is_some()),
            ("jwks_file", self.jwks_file.is_some()),
            ("jwks_url", self.jwks_url.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if sources.len() != 1 {
            return Err(format!(
                "set exactly one of secret_env, secret_file, public_key_file, jwks_file, \
                 jwks_url (found {})",
                if sources.is_empty() {
                    "none".to_string()
                } else {
                    sources.join(", ")
                }
            ));
        }
        let hmac = self.algorithms.iter().any(|a| is_hmac(*a));
        let public = self.algorithms.iter().any(|a| !is_hmac(*a));
        if hmac && public {
            return Err(format!(
                "algorithms: {} mixes HMAC (HS*) and public-key algorithms; a token could then \
                 pick the family its key was not meant for (algorithm confusion): allow one kind",
                alg_list(&self.algorithms)
            ));
        }
        let secret = self.secret_env.is_some() || self.secret_file.is_some();
        if hmac && !secret {
            return Err(format!(
                "algorithms {} need an HMAC secret: set secret_env or secret_file",
                alg_list(&self.algorithms)
            ));
        }
        if public && secret {
            return Err(format!(
                "algorithms {} need a public key: set public_key_file, jwks_file or jwks_url, \
                 not a secret",
                alg_list(&self.algorithms)
            ));
        }
        if self.public_key_file.is_some() {
            let first = self.algorithms[0].family();
            if self.algorithms.iter().any(|a| a.family() != first) {
                return Err(format!(
                    "algorithms {} span several key types, but public_key_file is one key: \
                     list only algorithms of its type, or use a JWKS",
                    alg_list(&self.algorithms)
                ));
            }
        }
        if let Some(url) = &self.jwks_url {
            HttpUrl::parse(url).map_err(|e| format!("jwks_url: {e}"))?;
        }
        if let Some(var) = &self.secret_env {
            if var.is_empty() {
                return Err("secret_env: name an environment variable".into());
            }
        }
        if self.issuer.as_deref() == Some("") {
            return Err("issuer: must not be empty (leave it out to not check it)".into());
        }
        if self.audience.iter().any(String::is_empty) {
            return Err("audience: values must not be empty".into());
        }
        forward_headers(&self.forward_claims)?;
        Ok(())
    }
}

fn is_hmac(alg: Algorithm) -> bool {
    alg.family() == AlgorithmFamily::Hmac
}

fn alg_list(algs: &[Algorithm]) -> String {
    let names: Vec<String> = algs.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", names.join(", "))
}

fn forward_headers(claims: &BTreeMap<String, String>) -> Result<Vec<(String, HeaderName)>, String> {
    claims
        .iter()
        .map(|(claim, header)| {
            if claim.is_empty() {
                return Err("forward_claims: a claim name is empty".to_string());
            }
            let name = HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                format!("forward_claims.{claim}: {header:?} is not a valid header name")
            })?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(format!(
                    "forward_claims.{claim}: {header} is reserved and cannot carry a claim"
                ));
            }
            Ok((claim.clone(), name))
        })
        .collect()
}

/// Checks a service's `required_scopes`: each must be a valid OAuth scope token (printable
/// ASCII without space, `"` or `\`), so it can be named in a `WWW-Authenticate` header.
pub fn validate_scopes(scopes: &[String]) -> Result<(), String> {
    for s in scopes {
        let ok = !s.is_empty()
            && s.bytes()
                .all(|b| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e));
        if !ok {
            return Err(format!(
                "required_scopes: {s:?} is not a valid scope (printable ASCII, no spaces, \
                 quotes or backslashes)"
            ));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Errors and the answer a refused client gets
// ---------------------------------------------------------------------------------------------

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No `Authorization` header.
    Missing,
    /// Not `Bearer <jwt>`, or the JWT cannot be decoded, or it lacks `exp`.
    Malformed,
    Expired,
    NotYetValid,
    BadSignature,
    WrongIssuer,
    WrongAudience,
    /// `alg` is `none` or outside the allowlist, or does not fit the key.
    AlgorithmNotAllowed,
    /// The token's `kid` is not in the JWKS, even after a refetch.
    UnknownKey,
    /// Valid token without every scope the service requires; carries the required scopes,
    /// space-separated, for the `WWW-Authenticate` challenge.
    InsufficientScope(String),
}

impl AuthError {
    /// Short snake_case label, for metrics, logs and the response body.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Expired => "expired",
            AuthError::NotYetValid => "not_yet_valid",
            AuthError::BadSignature => "bad_signature",
            AuthError::WrongIssuer => "wrong_issuer",
            AuthError::WrongAudience => "wrong_audience",
            AuthError::AlgorithmNotAllowed => "algorithm_not_allowed",
            AuthError::UnknownKey => "unknown_key",
            AuthError::InsufficientScope(_) => "insufficient_scope",
        }
    }

    /// 401, or 403 when the token was valid but lacks a scope.
    pub fn status(&self) -> u16 {
        match self {
            AuthError::InsufficientScope(_) => 403,
            _ => 401,
        }
    }

    /// The `error` field of the JSON body: `unauthorized` (401) or `forbidden` (403).
    pub fn error(&self) -> &'static str {
        match self {
            AuthError::InsufficientScope(_) => "forbidden",
            _ => "unauthorized",
        }
    }

    fn description(&self) -> &'static str {
        match self {
            AuthError::Missing => "no bearer token",
            AuthError::Malformed => "the token is malformed",
            AuthError::Expired => "the token has expired",
            AuthError::NotYetValid => "the token is not valid yet",
            AuthError::BadSignature => "the token signature is invalid",
            AuthError::WrongIssuer => "the token issuer is not accepted",
            AuthError::WrongAudience => "the token audience is not accepted",
            AuthError::AlgorithmNotAllowed => "the token algorithm is not allowed",
            AuthError::UnknownKey => "the token key is unknown",
            AuthError::InsufficientScope(_) => "the token lacks a required scope",
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750): just `Bearer` when no token was sent, so
    /// a client learns the scheme without an error it did not cause.
    pub fn www_authenticate(&self) -> String {
        match self {
            AuthError::Missing => "Bearer".to_string(),
            AuthError::InsufficientScope(scope) => {
                format!("Bearer error=\"insufficient_scope\", scope=\"{scope}\"")
            }
            other => format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                other.description()
            ),
        }
    }

    /// [`Self::www_authenticate`] as a header value.
    pub fn www_authenticate_value(&self) -> HeaderValue {
        // Descriptions are static ASCII and scopes are validated at load, so this only falls
        // back for a scope list built outside the config.
        HeaderValue::from_str(&self.www_authenticate())
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer"))
    }

    /// The response body: `{"error": "unauthorized"|"forbidden", "reason": "<reason>"}`.
    pub fn body(&self) -> Bytes {
        let mut body = serde_json::json!({"error": self.error(), "reason": self.reason()})
            .to_string()
            .into_bytes();
        body.push(b'\n');
        Bytes::from(body)
    }
}

impl fmt::Display for AuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.description())
    }
}

impl std::error::Error for AuthError {}

static AUTH_FAILURES: Lazy<IntCounterVec> = Lazy::new(|| {
    let counter = IntCounterVec::new(
        Opts::new(
            "breakwater_auth_failures_total",
            "Requests refused by authentication, by service and reason.",
        ),
        &["service", "reason"],
    )
    .expect("valid metric definition");
    if let Err(e) = crate::metrics::METRICS
        .registry
        .register(Box::new(counter.clone()))
    {
        log::error!("breakwater_auth_failures_total not registered: {e}");
    }
    counter
});

/// Registers the auth metrics; call once at start-up so `/metrics` lists them before the
/// first failure (and any definition error surfaces at start, not on a request).
pub fn register_metrics() {
    Lazy::force(&AUTH_FAILURES);
}

/// Counts one refused request.
pub fn count_failure(service: &str, err: &AuthError) {
    AUTH_FAILURES
        .with_label_values(&[service, err.reason()])
        .inc();
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

/// Who a valid token says the caller is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Identity {
    /// The `sub` claim, when it is a string.
    pub subject: Option<String>,
    /// From `scope` (space-separated string) and `scp` (list, or space-separated string).
    pub scopes: Vec<String>,
    /// Every claim of the token.
    pub claims: Map<String, Value>,
}

impl Identity {
    fn from_claims(claims: Map<String, Value>) -> Identity {
        let subject = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
        let mut scopes: Vec<String> = Vec::new();
        for claim in ["scope", "scp"] {
            match claims.get(claim) {
                Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_owned)),
                Some(Value::Array(items)) => {
                    scopes.extend(items.iter().filter_map(Value::as_str).map(str::to_owned))
                }
                _ => {}
            }
        }
        Identity {
            subject,
            scopes,
            claims,
        }
    }

    /// A claim as a header value: strings as they are, numbers and booleans as text; `None`
    /// for absent, null, object or array claims and for strings a header cannot carry.
    pub fn claim_as_header_value(&self, claim: &str) -> Option<HeaderValue> {
        match self.claims.get(claim)? {
            Value::String(s) => HeaderValue::from_str(s).ok(),
            Value::Number(n) => HeaderValue::from_str(&n.to_string()).ok(),
            Value::Bool(b) => Some(HeaderValue::from_static(if *b { "true" } else { "false" })),
            _ => None,
        }
    }
}

/// Ok when `identity` has every scope in `required`.
pub fn check_scopes(identity: &Identity, required: &[String]) -> Result<(), AuthError> {
    if required.iter().all(|r| identity.scopes.contains(r)) {
        Ok(())
    } else {
        Err(AuthError::InsufficientScope(required.join(" ")))
    }
}

// ---------------------------------------------------------------------------------------------
// Authenticator
// ---------------------------------------------------------------------------------------------

/// Longer tokens are refused unparsed: no IdP issues them, and they only cost CPU.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1024 * 1024;
const NEVER: u64 = u64::MAX;

/// Validates bearer tokens; built once at start-up from [`JwtConfig`].
pub struct Authenticator {
    /// One validation per allowed algorithm: the library wants every algorithm of a
    /// validation to match the key's type, and a JWKS may hold keys of several types.
    validations: Vec<(Algorithm, Validation)>,
    keys: Keys,
    forwarded: Vec<(String, HeaderName)>,
}

enum Keys {
    /// An HMAC secret or a PEM public key.
    Single(DecodingKey),
    Jwks(Jwks),
}

/// A JWKS and its rate-limited refetch. The key set is swapped whole, so readers never lock,
/// and the refetch gate is two atomics: nothing is held across an await.
struct Jwks {
    source: JwksSource,
    set: ArcSwap<Vec<JwksKey>>,
    refetch_interval_ms: u64,
    fetch_timeout: Duration,
    clock: Arc<dyn Clock>,
    /// When the last refetch started (clock ms), or [`NEVER`].
    last_refetch_ms: AtomicU64,
    refreshing: AtomicBool,
    refreshed: tokio::sync::Notify,
}

enum JwksSource {
    File(PathBuf),
    Url(HttpUrl),
}

struct JwksKey {
    kid: Option<String>,
    alg: Option<Algorithm>,
    key: DecodingKey,
}

impl Authenticator {
    /// Reads the secret or keys (environment, files, or a blocking fetch of `jwks_url`).
    /// Errors name the field or file at fault.
    pub fn new(cfg: &JwtConfig) -> Result<Authenticator, String> {
        Authenticator::with_clock(cfg, Arc::new(MonotonicClock::new()))
    }

    /// Like [`Authenticator::new`] with the clock that paces JWKS refetches.
    pub fn with_clock(cfg: &JwtConfig, clock: Arc<dyn Clock>) -> Result<Authenticator, String> {
        cfg.validate()?;
        let keys = if let Some(var) = &cfg.secret_env {
            let secret = std::env::var_os(var)
                .ok_or_else(|| format!("secret_env: environment variable {var} is not set"))?;
            Keys::Single(hmac_key(
                secret.as_encoded_bytes(),
                &format!("secret_env {var}"),
            )?)
        } else if let Some(path) = &cfg.secret_file {
            let bytes = read_file(path, "secret_file")?;
            let end = bytes
                .iter()
                .rposition(|b| !matches!(b, b'\n' | b'\r'))
                .map_or(0, |i| i + 1);
            Keys::Single(hmac_key(
                &bytes[..end],
                &format!("secret_file {}", path.display()),
            )?)
        } else if let Some(path) = &cfg.public_key_file {
            let pem = read_file(path, "public_key_file")?;
            Keys::Single(
                public_key(&pem, cfg.algorithms[0].family())
                    .map_err(|e| format!("public_key_file {}: {e}", path.display()))?,
            )
        } else if let Some(path) = &cfg.jwks_file {
            let source = JwksSource::File(path.clone());
            let set = parse_jwks(&read_file(path, "jwks_file")?)
                .map_err(|e| format!("jwks_file {}: {e}", path.display()))?;
            Keys::Jwks(Jwks::new(source, set, cfg, clock))
        } else if let Some(url) = &cfg.jwks_url {
            let url = HttpUrl::parse(url).map_err(|e| format!("jwks_url: {e}"))?;
            let body = url
                .get_blocking(cfg.jwks_fetch_timeout)
                .map_err(|e| format!("jwks_url {}: {e}", url.raw))?;
            let set = parse_jwks(&body).map_err(|e| format!("jwks_url {}: {e}", url.raw))?;
            Keys::Jwks(Jwks::new(JwksSource::Url(url), set, cfg, clock))
        } else {
            return Err("no key source configured".into());
        };

        let mut validation = Validation::new(cfg.algorithms[0]);
        validation.leeway = cfg.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp"];
        if let Some(issuer) = &cfg.issuer {
            validation.set_issuer(&[issuer]);
            required.push("iss");
        }
        // Without a configured audience the `aud` claim is ignored, as documented; the
        // library would otherwise refuse every token that carries one.
        validation.validate_aud = !cfg.audience.is_empty();
        if validation.validate_aud {
            validation.set_audience(&cfg.audience);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);

        let validations = cfg
            .algorithms
            .iter()
            .map(|alg| {
                let mut v = validation.clone();
                v.algorithms = vec![*alg];
                (*alg, v)
            })
            .collect();
        Ok(Authenticator {
            validations,
            keys,
            forwarded: forward_headers(&cfg.forward_claims)?,
        })
    }

    /// claim -> upstream header, from `forward_claims`. The proxy removes these headers from
    /// every client request and sets them from the [`Identity`] only.
    pub fn forwarded_headers(&self) -> &[(String, HeaderName)] {
        &self.forwarded
    }

    /// Validates the `Authorization: Bearer <jwt>` header (scheme case-insensitive).
    pub async fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<Identity, AuthError> {
        let token = bearer_token(authorization)?;
        let header = TokenHeader::parse(token)?;
        let validation = self
            .validations
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, v)| v)
            .ok_or(AuthError::AlgorithmNotAllowed)?;
        match &self.keys {
            Keys::Single(key) => decode(token, key, validation),
            Keys::Jwks(jwks) => {
                let (set, candidates) = match jwks.candidates(&header) {
                    Lookup::Found(set, candidates) => (set, candidates),
                    Lookup::Incompatible => return Err(AuthError::AlgorithmNotAllowed),
                    Lookup::Unknown => {
                        jwks.refetch().await;
                        match jwks.candidates(&header) {
                            Lookup::Found(set, candidates) => (set, candidates),
                            Lookup::Incompatible => return Err(AuthError::AlgorithmNotAllowed),
                            Lookup::Unknown => return Err(AuthError::UnknownKey),
                        }
                    }
                };
                // Without a `kid` every key of the right type is tried; only a signature
                // mismatch moves on to the next, any other verdict is about the token itself.
                let mut result = Err(AuthError::UnknownKey);
                for index in candidates {
                    result = decode(token, &set[index].key, validation);
                    if result != Err(AuthError::BadSignature) {
                        break;
                    }
                }
                result
            }
        }
    }
}

fn decode(token: &str, key: &DecodingKey, validation: &Validation) -> Result<Identity, AuthError> {
    // Checked here as well as by the library, so a key of the wrong type is reported as an
    // algorithm the key does not allow rather than as a bad signature.
    if validation
        .algorithms
        .iter()
        .any(|a| a.family() != key.family())
    {
        return Err(AuthError::AlgorithmNotAllowed);
    }
    jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
        .map(|data| Identity::from_claims(data.claims))
        .map_err(|e| classify(e.kind()))
}

fn classify(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "iss" => AuthError::WrongIssuer,
            "aud" => AuthError::WrongAudience,
            _ => AuthError::Malformed,
        },
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthError::AlgorithmNotAllowed,
        ErrorKind::InvalidToken
        | ErrorKind::InvalidClaimFormat(_)
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => AuthError::Malformed,
        // Signature mismatches, and keys that do not fit the algorithm: fail closed.
        _ => AuthError::BadSignature,
    }
}

fn bearer_token(authorization: Option<&HeaderValue>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::Missing)?;
    let value = value.to_str().map_err(|_| AuthError::Malformed)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::Malformed)?;
    let token = token.trim_start_matches(' ');
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.len() > MAX_TOKEN_LEN
        || token.contains(' ')
    {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// The parts of the JOSE header looked at before any key: parsed here rather than by the
/// library so that `alg: none` and unknown algorithms are reported as such, not as malformed.
struct TokenHeader {
    alg: Algorithm,
    kid: Option<String>,
}

impl TokenHeader {
    fn parse(token: &str) -> Result<TokenHeader, AuthError> {
        let mut parts = token.split('.');
        let (Some(header), Some(_), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AuthError::Malformed);
        };
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .map_err(|_| AuthError::Malformed)?;
        let json: Map<String, Value> =
            serde_json::from_slice(&bytes).map_err(|_| AuthError::Malformed)?;
        let alg = json
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(AuthError::Malformed)?;
        let alg = Algorithm::from_str(alg).map_err(|_| AuthError::AlgorithmNotAllowed)?;
        let kid = match json.get("kid") {
            None | Some(Value::Null) => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => return Err(AuthError::Malformed),
        };
        Ok(TokenHeader { alg, kid })
    }
}

fn read_file(path: &Path, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
}

fn hmac_key(secret: &[u8], what: &str) -> Result<DecodingKey, String> {
    if secret.is_empty() {
        return Err(format!("{what}: the HMAC secret is empty"));
    }
    if secret.len() < 32 {
        log::warn!(
            "{what}: the HMAC secret is {} bytes; 32 or more are recommended",
            secret.len()
        );
    }
    Ok(DecodingKey::from_secret(secret))
}

fn public_key(pem: &[u8], family: AlgorithmFamily) -> Result<DecodingKey, String> {
    let (parsed, kind) = match family {
        AlgorithmFamily::Rsa => (DecodingKey::from_rsa_pem(pem), "an RSA"),
        AlgorithmFamily::Ec => (DecodingKey::from_ec_pem(pem), "an EC"),
        AlgorithmFamily::Ed => (DecodingKey::from_ed_pem(pem), "an Ed25519"),
        AlgorithmFamily::Hmac => return Err("HMAC algorithms take a secret, not a PEM".into()),
    };
    parsed.map_err(|e| format!("not {kind} public key in PEM form, as the algorithms need ({e})"))
}

/// Parses a JWKS, keeping the signature keys this gateway can use and skipping (with a
/// warning) the others, so one exotic key does not take the whole set down.
fn parse_jwks(bytes: &[u8]) -> Result<Vec<JwksKey>, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let raw: RawSet = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JSON Web Key Set ({{\"keys\": [...]}}): {e}"))?;
    let mut keys = Vec::new();
    for (i, value) in raw.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                log::warn!("JWKS key {i} skipped: unsupported ({e})");
                continue;
            }
        };
        let kid = jwk.common.key_id.clone();
        if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        // Symmetric keys in a key set would let a published document sign tokens.
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            log::warn!("JWKS key {kid:?} skipped: symmetric (oct) keys are not accepted");
            continue;
        }
        let alg = match &jwk.common.key_algorithm {
            Some(ka) => match Algorithm::from_str(&ka.to_string()) {
                Ok(alg) => Some(alg),
                Err(_) => {
                    log::warn!("JWKS key {kid:?} skipped: alg {ka} is not a signature algorithm");
                    continue;
                }
            },
            None => None,
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => keys.push(JwksKey { kid, alg, key }),
            Err(e) => log::warn!("JWKS key {kid:?} skipped: {e}"),
        }
    }
    if keys.is_empty() {
        return Err("no usable signature key".into());
    }
    Ok(keys)
}

enum Lookup {
    Found(Arc<Vec<JwksKey>>, Vec<usize>),
    Incompatible,
    Unknown,
}

impl Jwks {
    fn new(source: JwksSource, set: Vec<JwksKey>, cfg: &JwtConfig, clock: Arc<dyn Clock>) -> Jwks {
        Jwks {
            source,
            set: ArcSwap::from_pointee(set),
            refetch_interval_ms: u64::try_from(cfg.jwks_refetch_interval.as_millis())
                .unwrap_or(u64::MAX),
            fetch_timeout: cfg.jwks_fetch_timeout,
            clock,
            last_refetch_ms: AtomicU64::new(NEVER),
            refreshing: AtomicBool::new(false),
            refreshed: tokio::sync::Notify::new(),
        }
    }

    /// The keys that may have signed a token with this header: those with its `kid` (or, for a
    /// token without one, every key) whose type and declared `alg` fit the token's `alg`.
    fn candidates(&self, header: &TokenHeader) -> Lookup {
        let set = self.set.load_full();
        let family = header.alg.family();
        let fits = |k: &JwksKey| k.key.family() == family && k.alg.is_none_or(|a| a == header.alg);
        let indices: Vec<usize> = match &header.kid {
            Some(kid) => {
                let named: Vec<usize> = (0..set.len())
                    .filter(|&i| set[i].kid.as_deref() == Some(kid.as_str()))
                    .collect();
                if named.is_empty() {
                    return Lookup::Unknown;
                }
                let fitting: Vec<usize> = named.into_iter().filter(|&i| fits(&set[i])).collect();
                if fitting.is_empty() {
                    return Lookup::Incompatible;
                }
                fitting
            }
            None => {
                let fitting: Vec<usize> = (0..set.len()).filter(|&i| fits(&set[i])).collect();
                if fitting.is_empty() {
                    return Lookup::Unknown;
                }
                fitting
            }
        };
        Lookup::Found(set, indices)
    }

    /// Refetches the key set unless one was fetched less than `refetch_interval` ago. A
    /// request arriving while another refetches waits for that result instead of fetching.
    async fn refetch(&self) {
        if self
            .refreshing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            let notified = std::pin::pin!(self.refreshed.notified());
            let mut notified = notified;
            // Registered before the re-check, so a refetch ending in between still wakes us.
            notified.as_mut().enable();
            if self.refreshing.load(Ordering::SeqCst) {
                let wait = self.fetch_timeout + Duration::from_secs(1);
                let _ = tokio::time::timeout(wait, notified).await;
            }
            return;
        }
        // Cleared on drop too: a cancelled request must not leave the gate shut for good.
        let _gate = RefreshGate(self);
        let now = self.clock.now_millis();
        let last = self.last_refetch_ms.load(Ordering::SeqCst);
        if last != NEVER && now.saturating_sub(last) < self.refetch_interval_ms {
            return;
        }
        self.last_refetch_ms.store(now, Ordering::SeqCst);
        match self.load().await {
            Ok(set) => {
                log::info!("JWKS refetched: {} keys", set.len());
                self.set.store(Arc::new(set));
            }
            Err(e) => log::warn!("JWKS refetch failed, keeping the current keys: {e}"),
        }
    }

    async fn load(&self) -> Result<Vec<JwksKey>, String> {
        let bytes = match &self.source {
            // A small local file, read at most once per refetch interval: not worth a
            // blocking-pool hop.
            JwksSource::File(path) => read_file(path, "jwks_file")?,
            JwksSource::Url(url) => url
                .get(self.fetch_timeout)
                .await
                .map_err(|e| format!("jwks_url {}: {e}", url.raw))?,
        };
        parse_jwks(&bytes)
    }
}

struct RefreshGate<'a>(&'a Jwks);

impl Drop for RefreshGate<'_> {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::SeqCst);
        self.0.refreshed.notify_waiters();
    }
}

// ---------------------------------------------------------------------------------------------
// A minimal HTTP/1.1 GET for `jwks_url`
// ---------------------------------------------------------------------------------------------

/// An `http://host[:port]/path` URL. Only plain HTTP: a JWKS is public, but over an untrusted
/// network it must come over TLS, which this client does not do yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct HttpUrl {
    raw: String,
    /// Without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    /// As written, for the `Host` header.
    authority: String,
    path: String,
}

impl HttpUrl {
    fn parse(url: &str) -> Result<HttpUrl, String> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(format!(
                "{url}: fetching a JWKS over TLS (https://) is not supported yet; serve it over \
                 http:// on a trusted network, or use jwks_file"
            ));
        }
        if !lower.starts_with("http://") {
            return Err(format!("{url}: expected an http:// URL"));
        }
        let rest = &url["http://".len()..];
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{url}: the path must be URL-encoded ASCII"));
        }
        if authority.contains('@') {
            return Err(format!("{url}: credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url}: unclosed IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{url}: bad port"))?,
                ),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b))
        {
            return Err(format!("{url}: invalid host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("{url}: invalid port {p:?}"))?,
            None => 80,
        };
        Ok(HttpUrl {
            raw: url.to_string(),
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path,
        })
    }

    fn request(&self) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\
             User-Agent: breakwater\r\nConnection: close\r\n\r\n",
            self.path, self.authority
        )
        .into_bytes()
    }

    /// For start-up, before any runtime serves requests.
    fn get_blocking(&self, timeout: Duration) -> Result<Vec<u8>, String> {
        use std::io::{Read, Write};
        use std::net::ToSocketAddrs;
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?;
        let mut last_error = format!("{} resolves to no address", self.host);
        for addr in addrs {
            let mut stream = match std::net::TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => s,
                Err(e) => {
                    last_error = format!("cannot connect to {addr}: {e}");
                    continue;
                }
            };
            let io = |e: std::io::Error| format!("{addr}: {e}");
            stream.set_read_timeout(Some(timeout)).map_err(io)?;
            stream.set_write_timeout(Some(timeout)).map_err(io)?;
            stream.write_all(&self.request()).map_err(io)?;
            let mut buf = Vec::new();
            (&mut stream)
                .take(MAX_JWKS_BYTES as u64 + 16 * 1024)
                .read_to_end(&mut buf)
                .map_err(io)?;
            return parse_response(&buf);
        }
        Err(last_error)
    }

    async fn get(&self, timeout: Duration) -> Result<Vec<u8>, String> {
        let exchange = async {
            let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
            let io = |e: std::io::Error| format!("{}:{}: {e}", self.host, self.port);
            let request = self.request();
            let mut sent = 0;
            while sent < request.len() {
                stream.writable().await.map_err(io)?;
                match stream.try_write(&request[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(io(e)),
                }
            }
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                stream.readable().await.map_err(io)?;
                match stream.try_read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if buf.len() > MAX_JWKS_BYTES + 16 * 1024 {
                            return Err("response too large".to_string());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(io(e)),
                }
            }
            parse_response(&buf)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no complete answer within {timeout:?}"))?
    }
}

/// The body of a complete `200` response read until the server closed the connection.
fn parse_response(buf: &[u8]) -> Result<Vec<u8>, String> {
    let end = find(buf, b"\r\n\r\n").ok_or("incomplete HTTP response")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "invalid HTTP response head")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or("not an HTTP/1 response")?;
    if status != 200 {
        return Err(format!("answered HTTP {status}"));
    }
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "bad Content-Length")?);
        }
    }
    let body = &buf[end + 4..];
    let body = if chunked {
        dechunk(body)?
    } else if let Some(len) = length {
        body.get(..len).ok_or("truncated response body")?.to_vec()
    } else {
        body.to_vec()
    };
    if body.len() > MAX_JWKS_BYTES {
        return Err("JWKS larger than 1 MiB".into());
    }
    Ok(body)
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find(body, b"\r\n").ok_or("truncated chunked body")?;
        let size_text = std::str::from_utf8(&body[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or("truncated chunked body")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).ok_or("truncated chunked body")?;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    const SECRET: &[u8] = b"an-hmac-secret-of-at-least-32-bytes!!";
    const RSA_PRIVATE: &str = include_str!("../tests/fixtures/jwt_rsa_private.pem");
    const RSA_PUBLIC: &str = include_str!("../tests/fixtures/jwt_rsa_public.pem");
    const RSA_OTHER_PRIVATE: &str = include_str!("../tests/fixtures/jwt_rsa_other_private.pem");
    const EC_PRIVATE: &str = include_str!("../tests/fixtures/jwt_ec_private.pem");
    const EC_PUBLIC: &str = include_str!("../tests/fixtures/jwt_ec_public.pem");

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
            .map(|id| id.subject.unwrap_or_default())
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
        assert_eq!(forwarded[0].1, "x-user-id");
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
            &crate::metrics::METRICS.registry.gather(),
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
        assert_eq!(cfg.validate(), Ok(()));
        let cfg = config("algorithms: [RS256]\njwks_file: k.json\naudience: [a, b]\nleeway: 1m");
        assert_eq!(cfg.audience, ["a", "b"]);
        assert_eq!(cfg.leeway, Duration::from_secs(60));
        assert_eq!(cfg.validate(), Ok(()));

        let refused = |yaml: &str, needle: &str| {
            let err = config(yaml).validate().unwrap_err();
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
        refused(
            "algorithms: [RS256]\njwks_url: https://idp/jwks",
            "not supported yet",
        );
        refused("algorithms: [RS256]\njwks_url: ftp://idp/jwks", "http://");
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
                let mut request = Vec::new();
                let mut buf = [0u8; 1024];
                while find(&request, b"\r\n\r\n").is_none() {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
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
        // Once the interval passed, a fixed file is picked up.
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
        let auth =
            Arc::new(Authenticator::with_clock(&cfg, Arc::new(ManualClock::new(0))).unwrap());
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
    fn http_url_and_response_parsing() {
        let u = HttpUrl::parse("http://idp.local:8080/keys?x=1#frag").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("idp.local", 8080, "/keys?x=1")
        );
        assert_eq!(u.authority, "idp.local:8080");
        let u = HttpUrl::parse("http://[::1]/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 80));
        let u = HttpUrl::parse("http://idp?a=b").unwrap();
        assert_eq!(u.path, "/?a=b");
        assert!(HttpUrl::parse("HTTPS://idp/keys")
            .unwrap_err()
            .contains("not supported yet"));
        assert!(HttpUrl::parse("http://user@idp/").is_err());
        assert!(HttpUrl::parse("http://idp:99999/").is_err());
        assert!(HttpUrl::parse("http://idp/a b").is_err());
        assert!(HttpUrl::parse("http:///x").is_err());

        let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}trailing";
        assert_eq!(parse_response(ok).unwrap(), b"{}");
        let chunked =
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1\r\n{\r\n1\r\n}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), b"{}");
        let close = b"HTTP/1.0 200 OK\r\n\r\n{}";
        assert_eq!(parse_response(close).unwrap(), b"{}");
        assert!(parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n")
            .unwrap_err()
            .contains("404"));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(parse_response(b"HTTP/1.1 200").is_err());
    }
}
