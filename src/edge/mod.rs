//! Edge protection: what a request must pass, or what the gateway adds to its answer, before
//! and besides any upstream. Size limits ([`limits`]), CORS ([`cors`]), authentication
//! ([`auth`]), per-client rate limits ([`rate_limit`]), response security headers
//! ([`security_headers`]), and the client's address and the `X-Forwarded-*` headers that tell
//! the upstream about it ([`forwarded`]), and the certificates of TLS listeners ([`tls`]).

pub mod auth;
pub mod cors;
pub mod forwarded;
pub mod limits;
pub mod rate_limit;
pub mod security_headers;
pub mod tls;
