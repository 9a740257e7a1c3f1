//! JWT authentication at the edge: the `auth:` config section and the per-service `auth` mode
//! (`config`), the verification keys and the JWKS refetches (`keys`, fetched over HTTPS by
//! `fetch`), token validation (`verify`), the [`Identity`] a valid token yields
//! and the identity headers forwarded upstream (`identity`), and the client-facing answer
//! and metric for a refused token (`error`).
//!
//! Security decisions live here and nowhere else: the algorithm allowlist is checked against
//! the token header before any key is touched, HMAC and public-key algorithms never share one
//! allowlist (algorithm confusion), `exp` is required, and a JWKS is refetched at most once per
//! `jwks_refetch_interval` however many unknown `kid`s arrive.

mod config;
mod error;
mod fetch;
mod identity;
mod keys;
mod verified;
mod verify;

pub use config::{AuthConfig, AuthMode, JwtConfig, ServiceAuth};
pub use error::{count_failure, register_metrics, AuthError};
pub use identity::{check_scopes, Identity};
pub use verify::{AuthCompileError, Authenticator, JwksRefresher};

#[cfg(test)]
mod tests;
