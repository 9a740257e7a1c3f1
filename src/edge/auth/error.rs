//! Why a token was refused, the answer the client gets for it (status, `WWW-Authenticate`
//! challenge, JSON body), and the `breakwater_auth_failures_total` metric.

use bytes::Bytes;
use http::HeaderValue;
use once_cell::sync::Lazy;
use prometheus::{IntCounter, IntCounterVec, Opts};
use std::fmt;

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
    if let Err(e) = crate::ops::metrics::METRICS
        .registry
        .register(Box::new(counter.clone()))
    {
        log::error!("breakwater_auth_failures_total not registered: {e}");
    }
    counter
});

static SIGNATURE_CHECKS: Lazy<IntCounter> = Lazy::new(|| {
    let counter = IntCounter::new(
        "breakwater_jwt_signature_checks_total",
        "Token signatures checked (each key tried counts): the CPU that tokens cost.",
    )
    .expect("valid metric definition");
    if let Err(e) = crate::ops::metrics::METRICS
        .registry
        .register(Box::new(counter.clone()))
    {
        log::error!("breakwater_jwt_signature_checks_total not registered: {e}");
    }
    counter
});

/// Registers the auth metrics; call once at start-up so `/metrics` lists them before the
/// first failure (and any definition error surfaces at start, not on a request).
pub fn register_metrics() {
    Lazy::force(&AUTH_FAILURES);
    Lazy::force(&SIGNATURE_CHECKS);
    super::keys::register_metrics();
    super::verified::register_metrics();
}

/// Counts one signature check.
pub(super) fn count_signature_check() {
    SIGNATURE_CHECKS.inc();
}

/// Counts one refused request.
pub fn count_failure(service: &str, err: &AuthError) {
    AUTH_FAILURES
        .with_label_values(&[service, err.reason()])
        .inc();
}
