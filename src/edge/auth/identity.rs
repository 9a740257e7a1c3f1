//! Who a valid token says the caller is: its subject, scopes and claims, the scope check a
//! service asks for, and the identity headers sent upstream in place of any the client sent.

use super::error::AuthError;
use http::HeaderValue;
use pingora::http::{PreparedHeaderName, RequestHeader};
use serde_json::{Map, Value};

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
    pub(super) fn from_claims(claims: Map<String, Value>) -> Identity {
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

/// Sets the `forward_claims` headers (`claim -> header`) of the upstream request from
/// `identity`, after removing whatever the client sent under those names: identity headers
/// come from the gateway only, on every route, authenticated or not.
pub fn forward(
    forwarded: &[(String, PreparedHeaderName)],
    identity: Option<&Identity>,
    upstream_request: &mut RequestHeader,
) -> pingora::Result<()> {
    for (claim, header) in forwarded {
        upstream_request.remove_header(header.name());
        if let Some(value) = identity.and_then(|i| i.claim_as_header_value(claim)) {
            upstream_request.insert_prepared_header(header, value)?;
        }
    }
    Ok(())
}
