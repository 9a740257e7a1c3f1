//! The state of one upstream server of a service, shared by every request and the health
//! check: its health flag, its circuit breaker and its requests in flight, with the metrics
//! that report them. A service's upstreams are kept in config order in `Pool::upstreams`,
//! each named by its address as written.

use super::breaker::{self, BreakerConfig, CircuitBreaker};
use crate::clock::Clock;
use crate::ops::metrics::METRICS;
use pingora::prelude::HttpPeer;
use prometheus::IntGauge;
use serde::{Deserialize, Serialize};
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
    /// Results in a row that disagree with the verdict, toward flipping it.
    health_streak: AtomicU32,
    healthy_gauge: IntGauge,
}

/// An upstream's health verdict, handed to the process that takes over at a reload, so a
/// down upstream stays out of rotation until its health check passes again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedHealth {
    pub healthy: bool,
    /// Results in a row toward flipping the verdict.
    pub streak: u32,
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
            health_streak: AtomicU32::new(0),
            healthy_gauge,
        }
    }

    /// Whether the health check currently counts the upstream as healthy.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Counts one health check result; the verdict flips after `threshold` results in a row
    /// that disagree with it (the check's `healthy_threshold` or `unhealthy_threshold`).
    /// Every result also reaches the breaker: a pass lets real traffic probe an open breaker
    /// now rather than after its reset timeout; a failure while unhealthy keeps it open, so an
    /// upstream that stays down never shows as half-open.
    pub(super) fn observe_health(&self, service: &str, passed: bool, threshold: usize) {
        if passed == self.is_healthy() {
            self.health_streak.store(0, Ordering::Relaxed);
        } else {
            let streak = self.health_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if streak as usize >= threshold {
                self.health_streak.store(0, Ordering::Relaxed);
                self.set_health(service, passed);
            }
        }
        if passed {
            self.breaker.on_health_check(true);
        } else if !self.is_healthy() {
            self.breaker.on_health_check(false);
        }
    }

    /// The verdict to hand to a reloaded process.
    pub fn carry_health(&self) -> CarriedHealth {
        CarriedHealth {
            healthy: self.is_healthy(),
            streak: self.health_streak.load(Ordering::Relaxed),
        }
    }

    /// Takes over the verdict a previous process handed over.
    pub fn resume_health(&self, service: &str, carried: &CarriedHealth) {
        self.health_streak.store(carried.streak, Ordering::Relaxed);
        if carried.healthy != self.is_healthy() {
            self.set_health(service, carried.healthy);
        }
    }

    fn set_health(&self, service: &str, healthy: bool) {
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
pub struct InFlight<'a>(&'a Upstream);

impl<'a> InFlight<'a> {
    pub fn new(upstream: &'a Upstream) -> InFlight<'a> {
        upstream.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(upstream)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
