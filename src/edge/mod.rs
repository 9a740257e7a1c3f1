//! Edge protection: what a request must pass, or what the gateway adds to its answer, before
//! and besides any upstream. Authentication ([`auth`]), CORS ([`cors`]), response security
//! headers ([`security_headers`]) and per-client rate limits ([`rate_limit`]).

pub mod auth;
pub mod cors;
pub mod rate_limit;
pub mod security_headers;
