//! The state of one upstream server of a service, shared by every request and the health
//! check: its health flag, its circuit breaker and its requests in flight, with the metrics
//! that report them. A service's upstreams are kept in config order in `Pool::upstreams`,
//! each named by its address as written.

use super::breaker::{self, BreakerConfig, CircuitBreaker};
use crate::clock::Clock;
use crate::ops::metrics::METRICS;
use pingora::prelude::HttpPeer;
use prometheus::IntGauge;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// One upstream, compiled.
pub(super) struct UpstreamPlan {
    pub(super) name: String,
    pub(super) addr: SocketAddr,
    pub(super) weight: usize,
    pub(super) peer: HttpPeer,
}

/// Runtime state of one upstream server of a service.
pub struct Upstream {
    /// As written in the config (`host:port`): the label in metrics, logs and the admin API.
    pub name: String,
    pub addr: SocketAddr,
    /// Requests being proxied to it right now.
    pub in_flight: AtomicU32,
    /// Consulted before every attempt; fed by request outcomes and health checks.
    pub breaker: Arc<CircuitBreaker>,
    /// How to connect, prepared once; a request copies it and tightens its timeouts.
    pub peer: HttpPeer,
    /// The health check's verdict (true without health checks).
    healthy: AtomicBool,
    healthy_gauge: IntGauge,
}

impl Upstream {
    pub(super) fn start(
        service: &str,
        plan: UpstreamPlan,
        breaker: &BreakerConfig,
        clock: Arc<dyn Clock>,
    ) -> Upstream {
        let healthy_gauge = METRICS
            .upstream_healthy
            .with_label_values(&[service, &plan.name]);
        healthy_gauge.set(1);
        let breaker = CircuitBreaker::new(breaker.clone(), clock)
            .with_listener(breaker::metrics_listener(service, &plan.name));
        Upstream {
            name: plan.name,
            addr: plan.addr,
            in_flight: AtomicU32::new(0),
            breaker: Arc::new(breaker),
            peer: plan.peer,
            healthy: AtomicBool::new(true),
            healthy_gauge,
        }
    }

    /// Whether the health check currently counts the upstream as healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub(super) fn on_health_change(&self, service: &str, healthy: bool) {
        self.healthy_gauge.set(i64::from(healthy));
        self.healthy.store(healthy, Ordering::Relaxed);
        if healthy {
            log::info!(
                "upstream {} of service {service} passes its health check again",
                self.name
            );
        } else {
            log::warn!(
                "upstream {} of service {service} fails its health check: no traffic until it passes",
                self.name
            );
            self.breaker.on_health_check(false);
        }
    }
}

/// Counts the request as in flight on the upstream until dropped (least-request balancing
/// and the admin API read it).
pub struct InFlight(Arc<Upstream>);

impl InFlight {
    pub fn new(upstream: Arc<Upstream>) -> InFlight {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(upstream)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
