//! A service's fallback: the `fallback:` section and the answer compiled from it, sent at once,
//! without touching the network, when no upstream admits a request (every breaker open or
//! every upstream unhealthy).

use crate::values::FieldError;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use serde::Deserialize;
use std::collections::BTreeMap;

/// `fallback:` of a service: the immediate answer when no upstream admits the request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FallbackConfig {
    /// Default: 503.
    pub status: u16,
    /// Default: `application/json`.
    pub content_type: String,
    /// Default: `{"error": "<service> service unavailable"}`.
    pub body: Option<String>,
    /// Extra response headers. `Retry-After` is added (seconds until the next half-open)
    /// unless set here.
    pub headers: BTreeMap<String, String>,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig {
            status: 503,
            content_type: "application/json".into(),
            body: None,
            headers: BTreeMap::new(),
        }
    }
}

/// The compiled fallback answer.
pub struct Fallback {
    pub status: StatusCode,
    pub content_type: String,
    pub body: Bytes,
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// Whether the config sets its own `Retry-After`; if not, the proxy adds the seconds until
    /// an upstream may admit requests again.
    pub has_retry_after: bool,
}

impl FallbackConfig {
    /// Compiles the answer of `service`: status, headers and body checked and built once.
    /// Errors name the field below the service.
    pub fn compile(&self, service: &str) -> Result<Fallback, FieldError> {
        let status = StatusCode::from_u16(self.status)
            .ok()
            .filter(|s| (100..=599).contains(&s.as_u16()))
            .ok_or_else(|| {
                FieldError::new(
                    ".fallback.status",
                    format!("{} is not an HTTP status", self.status),
                )
            })?;
        if HeaderValue::from_str(&self.content_type).is_err() {
            return Err(FieldError::new(
                ".fallback.content_type",
                "not a valid header value",
            ));
        }
        let headers = self
            .headers
            .iter()
            .map(|(name, value)| {
                match (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    (Ok(n), Ok(v)) => Ok((n, v)),
                    _ => Err(FieldError::new(
                        ".fallback.headers",
                        format!("invalid header {name}: {value}"),
                    )
                    .at(name)),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let body = match &self.body {
            Some(body) => Bytes::from(body.clone()),
            None => {
                let mut json = serde_json::to_vec(
                    &serde_json::json!({"error": format!("{service} service unavailable")}),
                )
                .unwrap_or_default();
                json.push(b'\n');
                Bytes::from(json)
            }
        };
        Ok(Fallback {
            status,
            content_type: self.content_type.clone(),
            body,
            has_retry_after: headers.iter().any(|(k, _)| k == http::header::RETRY_AFTER),
            headers,
        })
    }
}
