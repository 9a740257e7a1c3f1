//! Operating the gateway: the process lifecycle ([`lifecycle`]) and the listening sockets it
//! waits for ([`listeners`]), the admin listener ([`admin`]) and its live status page
//! ([`status`]), Prometheus metrics ([`metrics`]), the access log ([`access_log`]), distributed
//! tracing ([`tracing`]) and hot reload ([`reload`]).

pub mod access_log;
pub mod admin;
pub mod lifecycle;
pub mod listeners;
pub mod metrics;
pub mod reload;
pub mod status;
pub mod tracing;
