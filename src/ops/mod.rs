//! Operating the gateway: the process lifecycle ([`lifecycle`]), the admin listener
//! ([`admin`]), Prometheus metrics ([`metrics`]), the access log ([`access_log`]) and hot
//! reload ([`reload`]).

pub mod access_log;
pub mod admin;
pub mod lifecycle;
pub mod metrics;
pub mod reload;
