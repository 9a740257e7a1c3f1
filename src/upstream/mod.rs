//! The upstream side of a service: its pool of servers and how one is picked ([`pool`]), the
//! state of each ([`state`]), how they are connected to ([`peer`]), their active health checks
//! ([`health`]), the circuit breaker of each ([`breaker`]), the retry count and budget
//! ([`retry`]), and the answer when none of them admits a request ([`fallback`]).
//!
//! Each section compiles in two steps: `compile` checks the config and prepares everything
//! that needs no running server (peers, the health-check probe, the breaker settings);
//! `start` creates the per-process state from that: breakers, health flags, in-flight counts,
//! load balancers and their health-check loops (run together on one background service).
//! Per-upstream state is kept by service and upstream address (`Pool::upstreams`), in config
//! order.

pub mod breaker;
pub mod fallback;
pub mod health;
pub mod peer;
pub mod pool;
pub mod retry;
pub mod state;
