//! Breakwater: an edge API gateway on Pingora.
//!
//! The modules depend one way: `config` is parsed into the `runtime` (routing, pools,
//! metric handles), which the `proxy` pipeline and the `admin` listener read.

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
