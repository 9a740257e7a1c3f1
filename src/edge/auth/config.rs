//! The `auth:` section (how tokens are verified) and a service's `auth` mode and
//! `required_scopes`, with the checks serde cannot do: one key source, one algorithm family
//! that fits it, valid forward headers and scopes.

use super::fetch::JwksUrl;
use crate::values::ByteSize;
use http::HeaderName;
use jsonwebtoken::{Algorithm, AlgorithmFamily};
use serde::de::Deserializer;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The top-level `auth:` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer JWT validation. Default: none, and then no service may use `auth: required` or
    /// `auth: optional`.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
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
    /// JSON Web Key Set URL, `https://` (plain `http://` only to a loopback host or with
    /// `allow_insecure_jwks_url`), fetched at start, every `jwks_refresh_interval`, and again
    /// (rate-limited) when a token names an unknown `kid`. Default: none.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM file of the CA certificates the `jwks_url` server's certificate must chain to,
    /// instead of the system's roots (a private CA). Default: none (the system's roots).
    #[serde(default)]
    pub jwks_ca_file: Option<PathBuf>,
    /// Accept an `http://` `jwks_url` to a host that is not loopback. Whoever can answer for
    /// that URL can mint tokens; only on a network you trust. Default: false.
    #[serde(default)]
    pub allow_insecure_jwks_url: bool,
    /// Required `iss` claim. Default: none (not checked).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Accepted `aud` values, a string or a list; the token's `aud` must contain one of them.
    /// Default: none (not checked).
    #[serde(default, deserialize_with = "de_one_or_many")]
    pub audience: Vec<String>,
    /// Clock skew tolerated on `exp` and `nbf`. Default: 30s.
    #[serde(
        default = "default_leeway",
        deserialize_with = "crate::values::de_duration"
    )]
    pub leeway: Duration,
    /// Claims sent upstream as request headers, claim -> header name. Client-sent copies of
    /// these headers must never reach an upstream. Default: `{sub: X-User-Id}`.
    #[serde(default = "default_forward_claims")]
    pub forward_claims: BTreeMap<String, String>,
    /// Shortest time between two JWKS refetches caused by unknown `kid`s. Default: 10s.
    #[serde(
        default = "default_refetch_interval",
        deserialize_with = "crate::values::de_duration"
    )]
    pub jwks_refetch_interval: Duration,
    /// Connect-and-read timeout of one `jwks_url` fetch. Default: 5s.
    #[serde(
        default = "default_fetch_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub jwks_fetch_timeout: Duration,
    /// How often a `jwks_url` is fetched again in the background, so keys the issuer adds
    /// are known and keys it withdraws stop being accepted. Default: 10m.
    #[serde(
        default = "default_refresh_interval",
        deserialize_with = "crate::values::de_duration"
    )]
    pub jwks_refresh_interval: Duration,
    /// Memory for tokens that verified, kept until their `exp` so a repeated token is not
    /// checked again (see the README's authentication section); `0` turns it off.
    /// Default: 8MiB (about 5,000 tokens of 700 bytes).
    #[serde(default = "default_verified_cache_size")]
    pub verified_cache_size: ByteSize,
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
fn default_verified_cache_size() -> ByteSize {
    ByteSize(8 << 20)
}
fn default_refresh_interval() -> Duration {
    Duration::from_secs(600)
}
pub(super) fn default_forward_claims() -> BTreeMap<String, String> {
    BTreeMap::from([("sub".to_string(), "X-User-Id".to_string())])
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

/// What checking `auth.jwt` yields for loading its keys: the `forward_claims` as header names,
/// and the parsed `jwks_url`.
pub(super) struct CheckedJwt {
    pub(super) forwarded: Vec<(String, HeaderName)>,
    pub(super) jwks_url: Option<JwksUrl>,
}

impl JwtConfig {
    /// The checks serde cannot do: one key source, one algorithm family that fits it, valid
    /// forward header names.
    pub(super) fn check(&self) -> Result<CheckedJwt, String> {
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
        let jwks_url = self
            .jwks_url
            .as_deref()
            .map(|url| JwksUrl::parse(url, self.allow_insecure_jwks_url))
            .transpose()
            .map_err(|e| format!("jwks_url: {e}"))?;
        if self.jwks_url.is_none() && (self.jwks_ca_file.is_some() || self.allow_insecure_jwks_url)
        {
            return Err("jwks_ca_file and allow_insecure_jwks_url only apply to jwks_url".into());
        }
        if self.jwks_refresh_interval < Duration::from_secs(1) {
            return Err("jwks_refresh_interval: must be at least 1s".into());
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
        Ok(CheckedJwt {
            forwarded: forward_headers(&self.forward_claims)?,
            jwks_url,
        })
    }
}

pub(super) fn is_hmac(alg: Algorithm) -> bool {
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

/// A service's authentication: its `auth` mode and the `required_scopes` its tokens must
/// grant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceAuth {
    pub mode: AuthMode,
    pub required_scopes: Vec<String>,
}

impl ServiceAuth {
    /// Compiles a service's `auth` and `required_scopes`; the error is about the scopes.
    pub fn compile(mode: AuthMode, required_scopes: &[String]) -> Result<ServiceAuth, String> {
        validate_scopes(required_scopes)?;
        Ok(ServiceAuth {
            mode,
            required_scopes: required_scopes.to_vec(),
        })
    }
}

/// Checks a service's `required_scopes`: each must be a valid OAuth scope token (printable
/// ASCII without space, `"` or `\`), so it can be named in a `WWW-Authenticate` header.
pub(super) fn validate_scopes(scopes: &[String]) -> Result<(), String> {
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
