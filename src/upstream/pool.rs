//! Upstream pools: one pingora-load-balancing `LoadBalancer` per service, its active HTTP
//! health check (run as a Pingora background service), and the per-upstream state the proxy
//! consults when it picks an upstream: health, circuit breaker and requests in flight.

use crate::clock::Clock;
use crate::config::{Algorithm, HealthCheckConfig, ServiceConfig, UpstreamSpec};
use crate::ops::metrics::METRICS;
use crate::upstream::breaker::{CircuitBreaker, State};
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::discovery::Static;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::selection::{BackendIter, BackendSelection, Consistent, Random, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::prelude::background_service;
use pingora::prelude::HttpPeer;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::services::ServiceWithDependents;
use pingora::{Error, ErrorType, Result};
use prometheus::IntGauge;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// A Pingora service the server must run next to the proxy (here: a health check loop).
pub type BackgroundTask = Box<dyn ServiceWithDependents>;

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
    fn new(
        service: &str,
        spec: &UpstreamSpec,
        config: &ServiceConfig,
        clock: Arc<dyn Clock>,
    ) -> Upstream {
        let healthy_gauge = METRICS
            .upstream_healthy
            .with_label_values(&[service, &spec.name]);
        healthy_gauge.set(1);
        let breaker = CircuitBreaker::new(config.circuit_breaker.breaker(), clock)
            .with_listener(transition_listener(service, &spec.name));
        let sni = config
            .sni
            .clone()
            .unwrap_or_else(|| super::upstream_host(&spec.name));
        let mut peer = HttpPeer::new(spec.addr, config.tls, sni);
        let t = &config.timeouts;
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.write);
        peer.options.idle_timeout = Some(t.idle);
        if config.tls {
            peer.options.verify_cert = config.tls_verify;
            peer.options.verify_hostname = config.tls_verify;
        }
        Upstream {
            name: spec.name.clone(),
            addr: spec.addr,
            in_flight: AtomicU32::new(0),
            breaker: Arc::new(breaker),
            peer,
            healthy: AtomicBool::new(true),
            healthy_gauge,
        }
    }

    fn on_health_change(&self, service: &str, healthy: bool) {
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

/// Keeps the breaker's metrics and log in step with its transitions.
fn transition_listener(
    service: &str,
    upstream: &str,
) -> crate::upstream::breaker::TransitionListener {
    let m = &*METRICS;
    let state_gauge = m.circuit_state.with_label_values(&[service, upstream]);
    state_gauge.set(State::Closed as i64);
    let to_counter = |to: State| {
        m.circuit_transitions_total
            .with_label_values(&[service, upstream, to.as_str()])
    };
    let counters = [
        to_counter(State::Closed),
        to_counter(State::HalfOpen),
        to_counter(State::Open),
    ];
    let (service, upstream) = (service.to_string(), upstream.to_string());
    Arc::new(move |from: State, to: State| {
        state_gauge.set(to as i64);
        counters[to as usize].inc();
        if to == State::Open {
            log::warn!("circuit breaker of {service} upstream {upstream}: {from} -> {to}");
        } else {
            log::info!("circuit breaker of {service} upstream {upstream}: {from} -> {to}");
        }
    })
}

/// The load balancer, one variant per algorithm (the selection type is a type parameter).
enum Balancer {
    RoundRobin(Arc<LoadBalancer<RoundRobin>>),
    Random(Arc<LoadBalancer<Random>>),
    Consistent(Arc<LoadBalancer<Consistent>>),
    /// Two weighted-random candidates, the one with fewer requests in flight wins.
    LeastRequest(Arc<LoadBalancer<Random>>),
}

/// A service's upstreams and how one is chosen.
pub struct Pool {
    balancer: Balancer,
    /// Same order as the config's `upstreams`.
    pub upstreams: Vec<Arc<Upstream>>,
}

/// Upper bound on candidates examined per pick; enough to walk every upstream of any
/// realistic pool (weights expand round robin's list) without an unbounded loop.
const MAX_ITERATIONS: usize = 256;

impl Pool {
    /// Builds the pool, and the background service that runs its health checks when the
    /// service has `health_check` configured.
    pub fn new(
        service: &str,
        config: &ServiceConfig,
        clock: Arc<dyn Clock>,
    ) -> Result<(Pool, Option<BackgroundTask>)> {
        let upstreams: Vec<Arc<Upstream>> = config
            .upstreams
            .iter()
            .map(|spec| Arc::new(Upstream::new(service, spec, config, Arc::clone(&clock))))
            .collect();
        let health_check = config
            .health_check
            .as_ref()
            .map(|hc| observed_health_check(service, hc, config, &upstreams))
            .transpose()?;
        let (balancer, background) = match config.load_balancing {
            Algorithm::RoundRobin => {
                let (lb, bg) = build_lb::<RoundRobin>(service, config, health_check)?;
                (Balancer::RoundRobin(lb), bg)
            }
            Algorithm::Random => {
                let (lb, bg) = build_lb::<Random>(service, config, health_check)?;
                (Balancer::Random(lb), bg)
            }
            Algorithm::ConsistentHash => {
                let (lb, bg) = build_lb::<Consistent>(service, config, health_check)?;
                (Balancer::Consistent(lb), bg)
            }
            Algorithm::LeastRequest => {
                let (lb, bg) = build_lb::<Random>(service, config, health_check)?;
                (Balancer::LeastRequest(lb), bg)
            }
        };
        Ok((
            Pool {
                balancer,
                upstreams,
            },
            background,
        ))
    }

    /// Picks an upstream by the pool's algorithm among the healthy ones for which `accept`
    /// returns true (its index in `upstreams` is passed). `key` feeds consistent hashing.
    pub fn select(&self, key: &[u8], accept: impl Fn(usize) -> bool) -> Option<usize> {
        let filter =
            |b: &Backend, healthy: bool| healthy && self.index_of(&b.addr).is_some_and(&accept);
        let backend = match &self.balancer {
            Balancer::RoundRobin(lb) => lb.select_with(key, MAX_ITERATIONS, filter),
            Balancer::Random(lb) => lb.select_with(key, MAX_ITERATIONS, filter),
            Balancer::Consistent(lb) => lb.select_with(key, MAX_ITERATIONS, filter),
            Balancer::LeastRequest(lb) => {
                let first = lb.select_with(key, MAX_ITERATIONS, filter)?;
                let first_index = self.index_of(&first.addr)?;
                let second_index = lb
                    .select_with(key, MAX_ITERATIONS, |b, healthy| {
                        b.addr != first.addr && filter(b, healthy)
                    })
                    .and_then(|b| self.index_of(&b.addr));
                return Some(match second_index {
                    Some(second) if self.load(second) < self.load(first_index) => second,
                    _ => first_index,
                });
            }
        }?;
        self.index_of(&backend.addr)
    }

    fn load(&self, index: usize) -> u32 {
        self.upstreams[index].in_flight.load(Ordering::Relaxed)
    }

    /// Whether the health check currently counts the upstream as healthy.
    pub fn is_healthy(&self, index: usize) -> bool {
        self.upstreams
            .get(index)
            .is_some_and(|u| u.healthy.load(Ordering::Relaxed))
    }

    fn index_of(&self, addr: &PingoraAddr) -> Option<usize> {
        let PingoraAddr::Inet(addr) = addr else {
            return None;
        };
        self.upstreams.iter().position(|u| u.addr == *addr)
    }
}

fn build_lb<S>(
    service: &str,
    config: &ServiceConfig,
    health_check: Option<ObservedHealthCheck>,
) -> Result<(Arc<LoadBalancer<S>>, Option<BackgroundTask>)>
where
    S: BackendSelection + Send + Sync + 'static,
    S::Iter: BackendIter,
{
    let backends: BTreeSet<Backend> = config
        .upstreams
        .iter()
        .map(|u| Backend {
            addr: PingoraAddr::Inet(u.addr),
            weight: u.weight,
            ext: Default::default(),
        })
        .collect();
    let mut backends = Backends::new(Static::new(backends));
    let interval = config.health_check.as_ref().map(|hc| hc.interval);
    if let Some(hc) = health_check {
        backends.set_health_check(Box::new(hc));
    }
    let mut lb = LoadBalancer::<S>::from_backends(backends);
    // Static discovery cannot block or fail.
    futures_now(lb.update())?;
    match interval {
        Some(interval) => {
            lb.health_check_frequency = Some(interval);
            lb.parallel_health_check = true;
            let bg = background_service(&format!("health check {service}"), lb);
            let lb = bg.task();
            Ok((lb, Some(Box::new(bg))))
        }
        None => Ok((Arc::new(lb), None)),
    }
}

/// Runs a future that is known to complete without waiting (static discovery).
fn futures_now<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut f = std::pin::pin!(f);
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => Error::e_explain(
            ErrorType::InternalError,
            "static upstream discovery did not complete at once",
        ),
    }
}

/// Pingora's HTTP health check, observed so that results reach the upstream's state
/// (metrics now, the circuit breaker too) on every check, not only on a health flip.
struct ObservedHealthCheck {
    service: String,
    inner: HttpHealthCheck,
    upstreams: Vec<Arc<Upstream>>,
}

fn observed_health_check(
    service: &str,
    hc: &HealthCheckConfig,
    config: &ServiceConfig,
    upstreams: &[Arc<Upstream>],
) -> Result<ObservedHealthCheck> {
    let host = hc
        .host
        .clone()
        .unwrap_or_else(|| config.upstreams[0].name.clone());
    let mut check = HttpHealthCheck::new(&host, config.tls);
    let mut req = RequestHeader::build("GET", hc.path.0.as_bytes(), None)?;
    req.insert_header("Host", host.as_str())?;
    req.insert_header("User-Agent", "breakwater-health-check")?;
    check.req = req;
    check.peer_template.options.connection_timeout = Some(hc.timeout);
    check.peer_template.options.read_timeout = Some(hc.timeout);
    check.peer_template.options.total_connection_timeout = Some(hc.timeout);
    if config.tls {
        check.peer_template.sni = config
            .sni
            .clone()
            .unwrap_or_else(|| super::upstream_host(&host));
        check.peer_template.options.verify_cert = config.tls_verify;
        check.peer_template.options.verify_hostname = config.tls_verify;
    }
    check.consecutive_success = hc.healthy_threshold;
    check.consecutive_failure = hc.unhealthy_threshold;
    check.validator = Some(Box::new(|resp| {
        if resp.status.is_success() {
            Ok(())
        } else {
            Error::e_explain(
                ErrorType::CustomCode("health check status", resp.status.as_u16()),
                "non-2xx health check response",
            )
        }
    }));
    Ok(ObservedHealthCheck {
        service: service.to_string(),
        inner: check,
        upstreams: upstreams.to_vec(),
    })
}

impl ObservedHealthCheck {
    fn upstream(&self, target: &Backend) -> Option<&Arc<Upstream>> {
        let PingoraAddr::Inet(addr) = &target.addr else {
            return None;
        };
        self.upstreams.iter().find(|u| u.addr == *addr)
    }
}

#[async_trait]
impl HealthCheck for ObservedHealthCheck {
    async fn check(&self, target: &Backend) -> Result<()> {
        let result = self.inner.check(target).await;
        if let Some(upstream) = self.upstream(target) {
            // A passing check lets real traffic probe an open breaker now, rather than after
            // the reset timeout. The first failures open it through `health_status_change`,
            // which honours `unhealthy_threshold`; later ones keep it open, so an upstream
            // that stays down never shows as half-open.
            if result.is_ok() {
                upstream.breaker.on_health_check(true);
            } else if !upstream.healthy.load(Ordering::Relaxed) {
                upstream.breaker.on_health_check(false);
            }
        }
        result
    }

    async fn health_status_change(&self, target: &Backend, healthy: bool) {
        if let Some(upstream) = self.upstream(target) {
            upstream.on_health_change(&self.service, healthy);
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.inner.health_threshold(success)
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
