//! Edge protection: what a request must pass, or what the gateway adds to its answer, before
//! and besides any upstream. The request as the upstream will read it: its path normalized
//! ([`path`]), its headers cleaned ([`headers`]), its client's address and the forwarding
//! headers that tell the upstream about it ([`forwarded`]); then size limits ([`limits`]),
//! CORS ([`cors`]), authentication ([`auth`]), per-client rate limits ([`rate_limit`]) and
//! response security headers ([`security_headers`]) and compression ([`compression`]); and the
//! certificates of TLS listeners ([`tls`]).

pub mod auth;
pub mod compression;
pub mod cors;
pub mod forwarded;
pub mod headers;
pub mod limits;
pub mod path;
pub mod rate_limit;
pub mod security_headers;
pub mod tls;
