//! Breakwater: an edge API gateway on Pingora.
//!
//! The modules depend one way (docs/architecture.md has the full map):
//!
//! 1. foundations, which know no feature: [`values`] (the value types config sections share),
//!    [`clock`], [`ops::metrics`] (the registry) and [`ops::lifecycle`];
//! 2. features, each owning its config section, its compile step and its request-time logic:
//!    [`routing`], [`edge`] (limits, CORS, auth, rate limits, security headers), [`upstream`]
//!    (pools, peers, health checks, breakers, retries, fallbacks), [`cache`] and [`redis`];
//! 3. [`config`]: the file-level schema composed of the features' sections, the rules across
//!    them, and errors located by file, line and field;
//! 4. [`runtime`]: a config compiled once, then installed in the process;
//! 5. the request pipeline [`proxy`] and the admin listener [`ops::admin`];
//! 6. [`server`] (assembling Pingora's server), [`ops::reload`], and the `breakwater` binary.

pub mod cache;
pub mod clock;
pub mod config;
pub mod edge;
pub mod ops;
pub mod proxy;
pub mod redis;
pub mod routing;
pub mod runtime;
pub mod server;
pub mod upstream;
pub mod values;
