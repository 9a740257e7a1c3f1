//! The state of one request as it moves through the phases: what is known about the request
//! ([`RequestCtx`]), its forwarding to the service's upstreams once one admitted it
//! ([`Forwarding`]), and the try at one upstream that is planned or under way ([`Attempt`]).
//!
//! Counts and admissions are held by guards, so they are released however a request ends:
//! the service's in-flight gauge by [`Forwarding`], an upstream's in-flight count by a started
//! [`Attempt`], a breaker's half-open probe slot by the attempt's permit. A breaker hears how
//! an attempt went in one place, [`Attempt::finish`].

use crate::cache::CacheState;
use crate::edge::auth::Identity;
use crate::edge::security_headers::SecurityHeaders;
use crate::ops::tracing::RequestTrace;
use crate::routing::Route;
use crate::runtime::Service;
use crate::upstream::breaker::{Outcome, Permit};
use crate::upstream::state::{InFlight, Upstream};
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorSource};
use prometheus::IntGauge;
use std::sync::Arc;
use std::time::Instant;

/// Per-request state shared between the phases.
pub struct RequestCtx {
    pub(super) start: Instant,
    pub(super) request_id: HeaderValue,
    /// The matched route and its service, once routed.
    pub(super) route: Option<Arc<Route>>,
    pub(super) service: Option<Arc<Service>>,
    /// The service's security headers once routed, the top-level ones before.
    pub(super) security_headers: Arc<SecurityHeaders>,
    /// The request's `Origin`, kept when the service has a CORS policy, for every answer.
    pub(super) origin: Option<HeaderValue>,
    /// The verified token's identity, when the service uses auth and one was presented.
    pub(super) identity: Option<Identity>,
    /// `RateLimit-*` headers for the response.
    pub(super) rate_limit_headers: Vec<(HeaderName, HeaderValue)>,
    /// The response cache's view of this request: what to fill, or a stale copy to serve.
    pub(super) cache: Option<CacheState>,
    /// Request body bytes received so far.
    pub(super) body_bytes: u64,
    /// Why the gateway itself answered, for the access log.
    pub(super) error: Option<&'static str>,
    /// Set once an upstream admitted the request.
    pub(super) forwarding: Option<Forwarding>,
    /// Trace context and, when sampled, the spans being recorded (`ops::tracing`).
    pub(super) trace: RequestTrace,
    /// Set when the upstream switched protocols (`101`): the request is now a tunnel, counted
    /// in the service's `tunnels_active` while it lives.
    pub(super) tunnel: Option<GaugeGuard>,
}

impl RequestCtx {
    pub(super) fn new(security_headers: Arc<SecurityHeaders>) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: HeaderValue::from_static(""),
            route: None,
            service: None,
            security_headers,
            origin: None,
            identity: None,
            rate_limit_headers: Vec::new(),
            cache: None,
            body_bytes: 0,
            error: None,
            forwarding: None,
            trace: RequestTrace::default(),
            tunnel: None,
        }
    }

    pub(super) fn service_name(&self) -> &str {
        self.service.as_ref().map_or("none", |s| s.name.as_str())
    }

    /// The upstream of the latest attempt, if one started.
    pub(super) fn last_upstream(&self) -> Option<&Upstream> {
        self.forwarding.as_ref()?.upstream.as_deref()
    }

    /// The status of the current attempt's upstream response, once it arrived.
    pub(super) fn last_attempt_status(&self) -> Option<u16> {
        self.forwarding.as_ref()?.attempt.as_ref()?.status
    }

    /// The service and the forwarding state, for the phases after admission.
    pub(super) fn forwarding(&mut self) -> Option<(Arc<Service>, &mut Forwarding)> {
        Some((
            Arc::clone(self.service.as_ref()?),
            self.forwarding.as_mut()?,
        ))
    }

    /// The upstream switched protocols: its attempt is judged now, on the handshake alone
    /// (a `101` is a success, slow only if the handshake was), since the tunnel's length says
    /// nothing about the upstream's health; the tunnel is counted from here until the request
    /// ends.
    pub(super) fn open_tunnel(&mut self) {
        let Some((service, forwarding)) = self.forwarding() else {
            return;
        };
        forwarding.end_attempt(AttemptEnd::Done(None));
        self.tunnel = Some(GaugeGuard::new(service.metrics.tunnels.clone()));
    }

    /// The headers every answer of a routed service carries, whoever wrote it (the upstream,
    /// the cache or the gateway): security headers, CORS, rate-limit state.
    pub(super) fn decorate(&self, resp: &mut ResponseHeader, tls: bool, with_cors: bool) {
        self.security_headers.apply(resp, tls);
        if let Some(cors) = self.service.as_ref().and_then(|s| s.cors.as_ref()) {
            if with_cors {
                cors.apply(self.origin.as_ref(), resp);
            }
        }
        for (name, value) in &self.rate_limit_headers {
            // Valid names and values, prepared by the rate limiter.
            let _ = resp.insert_header(name.clone(), value.clone());
        }
    }
}

/// A request on its way to the service's upstreams, from admission to the end of the request.
pub(super) struct Forwarding {
    /// Counts the request in the service's `requests_in_flight` while it lives.
    _in_flight: GaugeGuard,
    /// When `timeouts.total` runs out, counted from the request's arrival.
    pub(super) deadline: Option<Instant>,
    /// Upstreams already tried, so a retry goes elsewhere when it can.
    pub(super) tried: Vec<usize>,
    pub(super) retries: u32,
    /// When the first attempt started, for `breakwater_upstream_duration_seconds`.
    pub(super) first_attempt_at: Option<Instant>,
    /// The upstream of the latest attempt, for the error body and the access log.
    pub(super) upstream: Option<Arc<Upstream>>,
    /// The attempt planned for the next `upstream_peer`, or under way.
    pub(super) attempt: Option<Attempt>,
}

impl Forwarding {
    /// Forwarding of a request that arrived at `start`, to the upstream `first` admitted.
    pub(super) fn new(service: &Service, start: Instant, first: Attempt) -> Forwarding {
        Forwarding {
            _in_flight: GaugeGuard::new(service.metrics.in_flight.clone()),
            deadline: service.timeouts.total.map(|total| start + total),
            tried: Vec::new(),
            retries: 0,
            first_attempt_at: None,
            upstream: None,
            attempt: Some(first),
        }
    }

    /// Starts the next attempt, as Pingora is about to connect: the planned one, or a new
    /// pick when Pingora retries a stale pooled connection on its own (`key` gives what
    /// consistent hashing hashes). `None` when no upstream admits it.
    pub(super) fn start_attempt(
        &mut self,
        service: &Service,
        key: impl FnOnce() -> Vec<u8>,
    ) -> Option<&Attempt> {
        let mut attempt = match self.attempt.take() {
            Some(planned) if planned.started.is_none() => planned,
            previous => {
                if let Some(previous) = previous {
                    previous.finish(AttemptEnd::Abandoned);
                }
                let (index, permit) = service.pool.admit(&key(), |_| true)?;
                Attempt::planned(service, index, permit)
            }
        };
        let now = Instant::now();
        self.tried.push(attempt.index);
        self.first_attempt_at.get_or_insert(now);
        self.upstream = Some(Arc::clone(&attempt.upstream));
        attempt.started = Some(Started {
            at: now,
            _in_flight: InFlight::new(Arc::clone(&attempt.upstream)),
        });
        Some(self.attempt.insert(attempt))
    }

    /// Ends the current attempt, if any, as `end` says.
    pub(super) fn end_attempt(&mut self, end: AttemptEnd<'_>) {
        if let Some(attempt) = self.attempt.take() {
            attempt.finish(end);
        }
    }

    /// Whether the current attempt got a response header from its upstream.
    pub(super) fn responded(&self) -> bool {
        self.attempt.as_ref().is_some_and(|a| a.status.is_some())
    }

    /// Decides whether a failed attempt is tried again on another upstream, and if so plans
    /// it, with its breaker permit, for the next `upstream_peer`. `key` gives what consistent
    /// hashing hashes, only asked for when a retry is possible.
    pub(super) fn plan_retry(&mut self, service: &Service, key: impl FnOnce() -> Vec<u8>) -> bool {
        if self.retries >= service.retries {
            return false;
        }
        let tried = &self.tried;
        let Some((index, permit)) = service.pool.admit(&key(), |i| !tried.contains(&i)) else {
            return false;
        };
        if !service.retry_budget.try_acquire_retry() {
            service.metrics.retries_budget_exhausted.inc();
            return false;
        }
        service.metrics.retries_attempted.inc();
        self.retries += 1;
        self.attempt = Some(Attempt::planned(service, index, permit));
        true
    }
}

/// One try at one upstream: planned with its breaker's permit (by admission or a retry),
/// started when Pingora asks for its peer, finished exactly once.
pub(super) struct Attempt {
    index: usize,
    pub(super) upstream: Arc<Upstream>,
    permit: Permit,
    started: Option<Started>,
    /// Status of the upstream's response header, once it arrived.
    pub(super) status: Option<u16>,
}

struct Started {
    at: Instant,
    /// Counts the attempt in its upstream's in-flight requests (least-request balancing and
    /// the admin API read them).
    _in_flight: InFlight,
}

/// How an attempt ended, as far as its upstream's breaker is concerned.
pub(super) enum AttemptEnd<'a> {
    /// Connecting failed, or the exchange broke off on the upstream's side.
    UpstreamFailed,
    /// The client went away or the gateway gave up on the attempt: it says nothing about the
    /// upstream.
    Abandoned,
    /// The request is over: judged by the upstream's response, or by the error that ended it.
    Done(Option<&'a Error>),
}

impl Attempt {
    pub(super) fn planned(service: &Service, index: usize, permit: Permit) -> Attempt {
        Attempt {
            index,
            upstream: Arc::clone(&service.pool.upstreams[index]),
            permit,
            started: None,
            status: None,
        }
    }

    /// The one place a breaker hears how an attempt went. An attempt never started (a retry
    /// planned but not made) tells it nothing: its upstream saw nothing.
    pub(super) fn finish(self, end: AttemptEnd<'_>) {
        let Some(started) = &self.started else {
            return;
        };
        let outcome = match (end, self.status) {
            (AttemptEnd::UpstreamFailed, _) => Some(Outcome::Failure),
            (AttemptEnd::Abandoned, _) => None,
            (AttemptEnd::Done(_), Some(status)) => {
                Some(self.upstream.breaker.judge(status, started.at.elapsed()))
            }
            // The exchange broke off and no hook recorded it: blame the upstream only when the
            // error came from its side.
            (AttemptEnd::Done(Some(e)), None) if e.esource() == &ErrorSource::Upstream => {
                Some(Outcome::Failure)
            }
            (AttemptEnd::Done(_), None) => None,
        };
        if let Some(outcome) = outcome {
            self.permit.record(outcome);
        }
    }
}

/// Holds a gauge one higher while it lives.
pub(super) struct GaugeGuard(IntGauge);

impl GaugeGuard {
    fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
