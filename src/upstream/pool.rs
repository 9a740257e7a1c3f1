//! Upstream pools: a service's `upstreams`, `load_balancing` and `hash_key`, compiled into
//! one prepared peer per upstream; at start-up, one pingora-load-balancing `LoadBalancer` per
//! service with its health check loop (every service's runs on one background service), and
//! the per-upstream state the proxy consults when it picks an upstream: health, circuit
//! breaker and requests in flight.

use super::breaker::{BreakerConfig, Permit};
use super::health::{HealthCheckConfig, HealthCheckPlan, ObservedHealthCheck};
use super::peer::{self, Protocol, Timeouts, UpstreamTls};
use super::state::{Upstream, UpstreamPlan};
use crate::clock::Clock;
use crate::edge::headers::HeaderNameCase;
use crate::values::FieldError;
use pingora::http::RequestHeader;
use pingora::lb::discovery::Static;
use pingora::lb::selection::{BackendIter, BackendSelection, Consistent, Random, RoundRobin};
use pingora::lb::{Backend, Backends, LoadBalancer};
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::services::background::BackgroundService;
use pingora::{Error, ErrorType, Result};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::collections::{BTreeSet, HashSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A service's health check loop (its load balancer's), run with every other service's in
/// one background service ([`super::health::HealthChecks`]).
pub type HealthCheckLoop = Arc<dyn BackgroundService + Send + Sync>;

/// Upstream selection algorithm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Weighted random.
    Random,
    /// Ketama consistent hashing over `hash_key`.
    ConsistentHash,
    /// Power of two random choices over each upstream's requests in flight.
    LeastRequest,
}

/// What `consistent_hash` hashes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HashKey {
    /// The client's IP address.
    #[default]
    Ip,
    /// The request path.
    Path,
    /// A request header (falls back to the client IP when absent).
    Header(String),
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "ip" => Ok(HashKey::Ip),
            "path" => Ok(HashKey::Path),
            _ => match s.strip_prefix("header:") {
                Some(name) if http::HeaderName::from_bytes(name.as_bytes()).is_ok() => {
                    Ok(HashKey::Header(name.to_ascii_lowercase()))
                }
                _ => Err(de::Error::custom(format!(
                    "invalid hash_key {s:?}: expected ip, path or header:NAME"
                ))),
            },
        }
    }
}

/// An upstream: `"host:port"` or `{addr: "host:port", weight: N}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    /// As written in the file (`host:port`), used in metric labels and logs.
    pub name: String,
    /// Resolved when the file is loaded.
    pub addr: SocketAddr,
    /// Relative share of traffic, 1 to 1000. Default: 1.
    pub weight: usize,
    /// Why `name` is not a usable address, reported when the pool compiles, which can name
    /// the list entry and its line.
    addr_error: Option<String>,
}

impl<'de> Deserialize<'de> for UpstreamSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Read as a plain value first, so a typo in the long form gets a precise message
        // rather than serde's "did not match any variant".
        let (name, weight) = match serde_yaml::Value::deserialize(d)? {
            serde_yaml::Value::String(addr) => (addr, 1),
            serde_yaml::Value::Mapping(map) => {
                let mut addr = None;
                let mut weight = 1;
                for (k, v) in map {
                    match (k.as_str(), v) {
                        (Some("addr"), serde_yaml::Value::String(a)) => addr = Some(a),
                        (Some("weight"), serde_yaml::Value::Number(n)) => {
                            weight = n.as_u64().map_or(0, |w| w as usize)
                        }
                        (Some("addr" | "weight"), other) => {
                            return Err(de::Error::custom(format!(
                                "invalid value {other:?} for an upstream's addr or weight"
                            )))
                        }
                        (key, _) => {
                            return Err(de::Error::custom(format!(
                                "unknown field `{}` in upstream, expected `addr` or `weight`",
                                key.unwrap_or("?")
                            )))
                        }
                    }
                }
                let addr =
                    addr.ok_or_else(|| de::Error::custom("upstream is missing its `addr` field"))?;
                (addr, weight)
            }
            _ => {
                return Err(de::Error::custom(
                    "an upstream is \"host:port\" or {addr: \"host:port\", weight: N}",
                ))
            }
        };
        if !(1..=1000).contains(&weight) {
            return Err(de::Error::custom(format!(
                "weight {weight} of upstream {name:?} is out of range 1..=1000"
            )));
        }
        // An address that does not resolve is reported by `PoolConfig::compile`, which can
        // name the list entry and its line; serde_yaml would only point at the start of the
        // list.
        let (addr, addr_error) = match resolve_host_port(&name) {
            Ok(addr) => (addr, None),
            Err(e) => (SocketAddr::from(([0, 0, 0, 0], 0)), Some(e)),
        };
        Ok(UpstreamSpec {
            name,
            addr,
            weight,
            addr_error,
        })
    }
}

/// Parses `host:port` (or `ip:port`, `[v6]:port`) and resolves it once.
fn resolve_host_port(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bad = || format!("invalid upstream address {s:?}: expected host:port");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || host.contains('/') || host.contains(' ') {
        return Err(bad());
    }
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve upstream {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("upstream {s:?} resolves to no address"))
}

/// The fields of a service that say how its pool is built.
pub struct PoolConfig<'a> {
    pub upstreams: &'a [UpstreamSpec],
    pub load_balancing: Algorithm,
    pub hash_key: &'a HashKey,
    pub tls: &'a UpstreamTls,
    pub protocol: Protocol,
    pub timeouts: &'a Timeouts,
    /// How the names of the headers passed on are spelled (`server.header_name_case`).
    pub name_case: HeaderNameCase,
    pub health_check: Option<&'a HealthCheckConfig>,
    pub circuit_breaker: &'a BreakerConfig,
}

/// A service's compiled pool: what [`PoolPlan::start`] builds the running pool from.
pub struct PoolPlan {
    service: String,
    upstreams: Vec<UpstreamPlan>,
    algorithm: Algorithm,
    hash_key: HashKey,
    breaker: BreakerConfig,
    health_check: Option<HealthCheckPlan>,
}

impl PoolConfig<'_> {
    /// Checks the upstreams (each resolves, none twice), the health check and the breaker
    /// settings, and prepares each upstream's peer. Errors name the field below the service.
    pub fn compile(&self, service: &str) -> std::result::Result<PoolPlan, FieldError> {
        self.protocol
            .check(self.tls.enabled)
            .map_err(|e| FieldError::new(".protocol", e))?;
        let mut seen = HashSet::new();
        let mut upstreams = Vec::with_capacity(self.upstreams.len());
        for (i, u) in self.upstreams.iter().enumerate() {
            let field = format!(".upstreams[{i}]");
            if let Some(e) = &u.addr_error {
                return Err(FieldError::new(field, e.clone()).at_value(&u.name));
            }
            if !seen.insert(u.addr) {
                let message = format!("upstream {} is listed twice", u.name);
                return Err(FieldError::new(field, message).at(&u.name));
            }
            upstreams.push(UpstreamPlan {
                name: u.name.clone(),
                addr: u.addr,
                weight: u.weight,
                peer: peer::prepare(
                    u.addr,
                    &u.name,
                    self.tls,
                    self.protocol,
                    self.timeouts,
                    self.name_case,
                ),
            });
        }
        let health_check = match (self.health_check, upstreams.first()) {
            (Some(hc), Some(first)) => Some(
                hc.compile(&first.name, self.tls, self.protocol)
                    .map_err(|e| FieldError::new(".health_check", e))?,
            ),
            _ => None,
        };
        self.circuit_breaker.check()?;
        Ok(PoolPlan {
            service: service.to_string(),
            upstreams,
            algorithm: self.load_balancing,
            hash_key: self.hash_key.clone(),
            breaker: self.circuit_breaker.clone(),
            health_check,
        })
    }
}

/// The load balancer, one variant per algorithm (the selection type is a type parameter).
enum Balancer {
    /// Round robin is the pool's own (`WeightedRing`); Pingora's balancer only runs the
    /// health checks.
    RoundRobin(WeightedRing),
    Random(Arc<LoadBalancer<Random>>),
    Consistent(Arc<LoadBalancer<Consistent>>),
    /// Two weighted-random candidates, the one with fewer requests in flight wins.
    LeastRequest(Arc<LoadBalancer<Random>>),
}

/// Weighted round robin over the pool's upstream indices, as Pingora's `RoundRobin` picks: the
/// first candidate from the list with each upstream repeated `weight` times, the next ones
/// unweighted. Pingora's `select_with` dedupes candidates through a `HashSet` made per request
/// and hashes each backend twice more to find its state: about 1,800 instructions a request,
/// where this takes a few dozen.
struct WeightedRing {
    /// Upstream indices, each `weight` times, in config order.
    slots: Box<[usize]>,
    next: AtomicUsize,
}

impl WeightedRing {
    /// `weights` of the upstreams, in config order.
    fn new(weights: impl IntoIterator<Item = usize>) -> WeightedRing {
        let slots = weights
            .into_iter()
            .enumerate()
            .flat_map(|(i, weight)| std::iter::repeat_n(i, weight))
            .collect();
        WeightedRing {
            slots,
            next: AtomicUsize::new(0),
        }
    }

    /// The next upstream `accept` takes: the ring's next slot, else each other upstream once
    /// in order after it.
    fn select(&self, count: usize, accept: impl Fn(usize) -> bool) -> Option<usize> {
        if self.slots.is_empty() || count == 0 {
            return None;
        }
        let first = self.slots[self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()];
        (0..count)
            .map(|step| (first + step) % count)
            .find(|&i| accept(i))
    }
}

/// A service's upstreams and how one is chosen.
pub struct Pool {
    balancer: Balancer,
    /// Same order as the config's `upstreams`.
    pub upstreams: Vec<Arc<Upstream>>,
    hash_key: Option<HashKey>,
    /// Used for `Retry-After` when no breaker says when it half-opens (all unhealthy).
    health_check_interval: Option<Duration>,
}

/// Upper bound on candidates examined per pick; enough to walk every upstream of any
/// realistic pool (weights expand round robin's list) without an unbounded loop.
const MAX_ITERATIONS: usize = 256;

impl PoolPlan {
    /// Starts the pool: each upstream's state and breaker, the load balancer, and the loop
    /// that runs its health checks when the service has `health_check`.
    pub fn start(self, clock: Arc<dyn Clock>) -> Result<(Pool, Option<HealthCheckLoop>)> {
        let service = self.service;
        let backends: BTreeSet<Backend> = self
            .upstreams
            .iter()
            .map(|u| Backend {
                addr: PingoraAddr::Inet(u.addr),
                weight: u.weight,
                ext: Default::default(),
            })
            .collect();
        let breaker = &self.breaker;
        let ring = WeightedRing::new(self.upstreams.iter().map(|u| u.weight));
        let upstreams: Vec<Arc<Upstream>> = self
            .upstreams
            .into_iter()
            .map(|plan| Arc::new(Upstream::start(&service, plan, breaker, Arc::clone(&clock))))
            .collect();
        let health_check_interval = self.health_check.as_ref().map(|hc| hc.interval);
        let health_check = self
            .health_check
            .map(|hc| (hc.interval, hc.observe(&service, &upstreams)));
        let (balancer, background) = match self.algorithm {
            Algorithm::RoundRobin => {
                let (_, bg) = build_lb::<RoundRobin>(backends, health_check)?;
                (Balancer::RoundRobin(ring), bg)
            }
            Algorithm::Random => {
                let (lb, bg) = build_lb::<Random>(backends, health_check)?;
                (Balancer::Random(lb), bg)
            }
            Algorithm::ConsistentHash => {
                let (lb, bg) = build_lb::<Consistent>(backends, health_check)?;
                (Balancer::Consistent(lb), bg)
            }
            Algorithm::LeastRequest => {
                let (lb, bg) = build_lb::<Random>(backends, health_check)?;
                (Balancer::LeastRequest(lb), bg)
            }
        };
        let hash_key = (self.algorithm == Algorithm::ConsistentHash).then_some(self.hash_key);
        Ok((
            Pool {
                balancer,
                upstreams,
                hash_key,
                health_check_interval,
            },
            background,
        ))
    }
}

impl Pool {
    /// What consistent hashing hashes for this request; empty for the other algorithms, which
    /// ignore it. `client_ip` is only asked for when the key needs it.
    pub fn hash_key(&self, req: &RequestHeader, client_ip: impl FnOnce() -> String) -> Vec<u8> {
        match &self.hash_key {
            None => Vec::new(),
            Some(HashKey::Path) => req.uri.path().as_bytes().to_vec(),
            Some(HashKey::Header(name)) => match req.headers.get(name.as_str()) {
                Some(v) => v.as_bytes().to_vec(),
                None => client_ip().into_bytes(),
            },
            Some(HashKey::Ip) => client_ip().into_bytes(),
        }
    }

    /// Picks an upstream whose health check passes and whose breaker admits the request, and
    /// takes the breaker's permit. `accept` narrows the candidates (e.g. not yet tried).
    pub fn admit(&self, key: &[u8], accept: impl Fn(usize) -> bool) -> Option<(usize, Permit)> {
        let upstreams = &self.upstreams;
        // A candidate can lose its half-open probe slot between the check and the acquire;
        // then the next one is tried, a bounded number of times.
        let mut refused: Vec<usize> = Vec::new();
        for _ in 0..upstreams.len() {
            let index = self.select(key, |i| {
                accept(i) && !refused.contains(&i) && upstreams[i].breaker.would_admit()
            })?;
            match upstreams[index].breaker.try_acquire() {
                Some(permit) => return Some((index, permit)),
                None => refused.push(index),
            }
        }
        None
    }

    /// Seconds until some upstream may admit requests again, for `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        let soonest = self
            .upstreams
            .iter()
            .filter_map(|u| u.breaker.retry_after())
            .min()
            .or(self.health_check_interval)
            .unwrap_or(Duration::from_secs(1));
        soonest.as_secs_f64().ceil().max(1.0) as u64
    }

    /// Picks an upstream by the pool's algorithm among the healthy ones for which `accept`
    /// returns true (its index in `upstreams` is passed). `key` feeds consistent hashing.
    fn select(&self, key: &[u8], accept: impl Fn(usize) -> bool) -> Option<usize> {
        // The upstream's own verdict, not Pingora's: it may have been carried over a reload.
        let admits = |i: usize| self.upstreams[i].is_healthy() && accept(i);
        let filter = |b: &Backend, _: bool| self.index_of(&b.addr).is_some_and(admits);
        let backend = match &self.balancer {
            Balancer::RoundRobin(ring) => return ring.select(self.upstreams.len(), admits),
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

    fn index_of(&self, addr: &PingoraAddr) -> Option<usize> {
        let PingoraAddr::Inet(addr) = addr else {
            return None;
        };
        self.upstreams.iter().position(|u| u.addr == *addr)
    }
}

fn build_lb<S>(
    backends: BTreeSet<Backend>,
    health_check: Option<(Duration, ObservedHealthCheck)>,
) -> Result<(Arc<LoadBalancer<S>>, Option<HealthCheckLoop>)>
where
    S: BackendSelection + Send + Sync + 'static,
    S::Iter: BackendIter,
{
    let mut backends = Backends::new(Static::new(backends));
    let interval = health_check.as_ref().map(|(interval, _)| *interval);
    if let Some((_, hc)) = health_check {
        backends.set_health_check(Box::new(hc));
    }
    let mut lb = LoadBalancer::<S>::from_backends(backends);
    // Static discovery cannot block or fail.
    futures_now(lb.update())?;
    match interval {
        Some(interval) => {
            lb.health_check_frequency = Some(interval);
            lb.parallel_health_check = true;
            let lb = Arc::new(lb);
            let health_check_loop: HealthCheckLoop = lb.clone();
            Ok((lb, Some(health_check_loop)))
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

#[cfg(test)]
mod tests {
    use super::WeightedRing;

    fn picks(ring: &WeightedRing, n: usize, accept: impl Fn(usize) -> bool) -> Vec<usize> {
        (0..n).map(|_| ring.select(3, &accept).unwrap()).collect()
    }

    #[test]
    fn round_robin_follows_the_weights_in_config_order() {
        let ring = WeightedRing::new([1, 3, 2]);
        let six = picks(&ring, 6, |_| true);
        assert_eq!(six, [0, 1, 1, 1, 2, 2]);
        assert_eq!(picks(&ring, 6, |_| true), six, "and again from the top");
    }

    #[test]
    fn a_refused_upstream_passes_its_turn_to_the_next_in_order() {
        let ring = WeightedRing::new([1, 1, 1]);
        assert_eq!(picks(&ring, 6, |i| i != 1), [0, 2, 2, 0, 2, 2]);
        assert_eq!(picks(&ring, 3, |i| i == 0), [0, 0, 0]);
        assert_eq!(ring.select(3, |_| false), None);
    }

    #[test]
    fn an_empty_pool_picks_nothing() {
        assert_eq!(WeightedRing::new([]).select(0, |_| true), None);
    }
}
