//! Token verification: the `Authenticator` built once from `auth.jwt`, which checks a bearer
//! token's algorithm against the allowlist before touching any key, then its signature and
//! claims (`exp` always, `iss` and `aud` when configured).

use super::config::{AuthConfig, AuthMode, CheckedJwt, JwtConfig, ServiceAuth};
use super::error::{self, AuthError};
use super::identity::{self, check_scopes, Identity};
use super::keys::{self, Keys, Lookup};
use super::verified::VerifiedTokens;
use crate::clock::{Clock, MonotonicClock};
use base64::Engine;
use http::{HeaderName, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use pingora::http::{PreparedHeaderName, RequestHeader};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::{Map, Value};
use std::str::FromStr;
use std::sync::Arc;

/// Longer tokens are refused unparsed: no IdP issues them, and they only cost CPU.
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Validates bearer tokens; built once at start-up from [`JwtConfig`].
pub struct Authenticator {
    /// One validation per allowed algorithm: the library wants every algorithm of a
    /// validation to match the key's type, and a JWKS may hold keys of several types.
    validations: Vec<(Algorithm, Validation)>,
    keys: Keys,
    forwarded: Vec<(String, PreparedHeaderName)>,
    verified: VerifiedTokens,
}

/// Why `auth:` does not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthCompileError {
    /// A setting is wrong (the config points at `auth`).
    Invalid(String),
    /// The keys it names cannot be loaded: a variable, file or URL is at fault, not a line.
    Keys(String),
}

impl AuthConfig {
    /// Compiles `auth.jwt` into the authenticator: checks the section, then loads the keys it
    /// names (environment, files, or a blocking fetch of `jwks_url`). `None` without `jwt`.
    pub fn compile(&self) -> Result<Option<Authenticator>, AuthCompileError> {
        let Some(jwt) = &self.jwt else {
            return Ok(None);
        };
        let checked = jwt
            .check()
            .map_err(|e| AuthCompileError::Invalid(format!("jwt: {e}")))?;
        Authenticator::load(jwt, checked, Arc::new(MonotonicClock::new()))
            .map(Some)
            .map_err(AuthCompileError::Keys)
    }
}

impl ServiceAuth {
    /// Checks the request's `Authorization` header as this service asks: `Ok(None)` when its
    /// mode lets the request on without looking (`none`, or `optional` with no token and no
    /// required scopes), the identity of a valid token with every required scope, or why not.
    pub async fn verify(
        &self,
        authenticator: &Authenticator,
        authorization: Option<&HeaderValue>,
    ) -> Result<Option<Arc<Identity>>, AuthError> {
        match (self.mode, authorization) {
            (AuthMode::None, _) => return Ok(None),
            (AuthMode::Optional, None) if self.required_scopes.is_empty() => return Ok(None),
            _ => {}
        }
        let identity = authenticator.authenticate(authorization).await?;
        check_scopes(&identity, &self.required_scopes)?;
        Ok(Some(identity))
    }
}

impl Authenticator {
    /// Checks `cfg` and loads its keys, like [`AuthConfig::compile`].
    #[cfg(test)]
    pub fn new(cfg: &JwtConfig) -> Result<Authenticator, String> {
        Authenticator::with_clock(cfg, Arc::new(MonotonicClock::new()))
    }

    /// Like [`Authenticator::new`] with the clock that paces JWKS refetches.
    #[cfg(test)]
    pub fn with_clock(cfg: &JwtConfig, clock: Arc<dyn Clock>) -> Result<Authenticator, String> {
        let checked = cfg.check()?;
        Authenticator::load(cfg, checked, clock)
    }

    /// Loads the keys of a checked `cfg` and prepares one validation per allowed algorithm.
    fn load(
        cfg: &JwtConfig,
        checked: CheckedJwt,
        clock: Arc<dyn Clock>,
    ) -> Result<Authenticator, String> {
        let keys = keys::load(cfg, checked.jwks_url, clock)?;

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
            forwarded: checked
                .forwarded
                .into_iter()
                .map(|(claim, header)| (claim, PreparedHeaderName::from_header_name(header)))
                .collect(),
            verified: VerifiedTokens::new(cfg.verified_cache_size.0),
        })
    }

    /// Sets the `forward_claims` headers of the upstream request from `identity`, after
    /// removing whatever the client sent under those names.
    pub fn forward_identity(
        &self,
        identity: Option<&Identity>,
        upstream_request: &mut RequestHeader,
    ) -> pingora::Result<()> {
        identity::forward(&self.forwarded, identity, upstream_request)
    }

    /// claim -> upstream header, from `forward_claims`.
    #[cfg(test)]
    pub fn forwarded_headers(&self) -> &[(String, PreparedHeaderName)] {
        &self.forwarded
    }

    /// The background service that fetches a `jwks_url` again every `jwks_refresh_interval`;
    /// `None` for other key sources.
    pub fn jwks_refresher(self: &Arc<Self>) -> Option<JwksRefresher> {
        match &self.keys {
            Keys::Jwks(jwks) if jwks.next_refresh().is_some() => {
                Some(JwksRefresher(Arc::clone(self)))
            }
            _ => None,
        }
    }

    /// The headers the gateway sets from a token (`forward_claims`), which no client may set.
    pub fn identity_headers(&self) -> impl Iterator<Item = &HeaderName> {
        self.forwarded.iter().map(|(_, header)| header.name())
    }

    /// Validates the `Authorization: Bearer <jwt>` header (scheme case-insensitive).
    pub async fn authenticate(
        &self,
        authorization: Option<&HeaderValue>,
    ) -> Result<Arc<Identity>, AuthError> {
        self.authenticate_at(authorization, jsonwebtoken::get_current_timestamp())
            .await
    }

    /// [`Authenticator::authenticate`] with the time (Unix seconds) that the verified-token
    /// cache judges expiry by; the claims themselves are checked against the real clock.
    pub(super) async fn authenticate_at(
        &self,
        authorization: Option<&HeaderValue>,
        now: u64,
    ) -> Result<Arc<Identity>, AuthError> {
        let token = bearer_token(authorization)?;
        if !self.verified.enabled() {
            return self.check_token(token).await.map(Arc::new);
        }
        let digest = VerifiedTokens::digest(token);
        let generation = self.keys.generation();
        if let Some(identity) = self.verified.get(&digest, now, generation) {
            return Ok(identity);
        }
        let identity = Arc::new(self.check_token(token).await?);
        self.verified
            .insert(digest, &identity, token.len(), now, generation);
        Ok(identity)
    }

    /// The verified-token cache; for tests.
    #[cfg(test)]
    pub(super) fn verified_tokens(&self) -> &VerifiedTokens {
        &self.verified
    }

    /// Checks a token's algorithm, signature and claims.
    async fn check_token(&self, token: &str) -> Result<Identity, AuthError> {
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
                let (set, candidates) = match jwks.candidates(header.alg, header.kid.as_deref()) {
                    Lookup::Found(set, candidates) => (set, candidates),
                    Lookup::Incompatible => return Err(AuthError::AlgorithmNotAllowed),
                    Lookup::Unknown => {
                        jwks.refetch().await;
                        match jwks.candidates(header.alg, header.kid.as_deref()) {
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
    error::count_signature_check();
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

/// Fetches a `jwks_url` again every `jwks_refresh_interval` (sooner, with backoff, after a
/// failure), as a Pingora background service: on the server's runtime, never a request's.
pub struct JwksRefresher(Arc<Authenticator>);

#[async_trait::async_trait]
impl BackgroundService for JwksRefresher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Keys::Jwks(jwks) = &self.0.keys else {
            return;
        };
        while let Some(wait) = jwks.next_refresh() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(wait) => jwks.refresh().await,
            }
        }
    }
}
