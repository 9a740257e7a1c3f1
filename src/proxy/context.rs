//! The state of one request as it moves through the phases: what is known about the request
//! ([`RequestCtx`]), its forwarding to the service's upstreams once one admitted it
//! ([`Forwarding`]), and the try at one upstream that is planned or under way ([`Attempt`]).
//!
//! Counts and admissions are held by guards, so they are released however a request ends:
//! the service's in-flight gauge by [`Forwarding`], an upstream's in-flight count by a started
//! [`Attempt`], a breaker's half-open probe slot by the attempt's permit. A breaker hears how
//! an attempt went in one place, [`Attempt::record`]: when the upstream's response header
//! arrives (status and time to first byte decide; a probe's slot is freed) and when the
//! attempt ends (a body that broke off on the upstream's side makes it a failure). A gRPC
//! call's success waits for the status its upstream ends it with (the trailers).

use crate::cache::CacheState;
use crate::edge::auth::Identity;
use crate::edge::forwarded::{Client, ConnectionFacts};
use crate::edge::security_headers::SecurityHeaders;
use crate::ops::tracing::RequestTrace;
use crate::routing::Route;
use crate::runtime::Service;
use crate::upstream::breaker::{Outcome, Permit};
use crate::upstream::peer::Protocol;
use crate::upstream::state::{InFlight, Upstream};
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::{Error, ErrorSource};
use prometheus::IntGauge;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Per-request state shared between the phases.
pub struct RequestCtx {
    /// When the request's header had been read: Pingora makes the context right then.
    pub(super) start: Instant,
    pub(super) request_id: HeaderValue,
    /// Who the client is, once its request arrived.
    pub(super) client: Client,
    /// What the connection's earlier requests worked out (the client, the `Forwarded`
    /// element), carried to the next request on it.
    pub(super) connection: CarriedFacts,
    /// The request target as the client sent it, when normalizing changed it (access log).
    pub(super) original_target: Option<Box<str>>,
    /// The matched route and its service, once routed.
    /// Borrowed for the life of the process, as the whole runtime is (`Gateway`).
    pub(super) route: Option<&'static Route>,
    pub(super) service: Option<&'static Service>,
    /// The service's security headers once routed, the top-level ones before.
    pub(super) security_headers: &'static SecurityHeaders,
    /// The request's `Origin`, kept when the service has a CORS policy, for every answer.
    pub(super) origin: Option<HeaderValue>,
    /// The verified token's identity, when the service uses auth and one was presented.
    pub(super) identity: Option<Arc<Identity>>,
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

/// The connection's facts while a request on it runs, handed on to the next request. Boxed:
/// they move from request to request.
/// Pingora's hook that hands them on sees the context only by reference, so they are taken out
/// through a lock, never contended (one request at a time holds them), instead of copied.
#[derive(Default)]
pub(super) struct CarriedFacts(Mutex<Option<Box<ConnectionFacts>>>);

impl CarriedFacts {
    /// The facts, empty ones on a connection's first request.
    pub(super) fn get(&mut self) -> &mut ConnectionFacts {
        self.0
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .get_or_insert_with(Box::default)
    }

    /// What the connection's previous request handed on.
    pub(super) fn set(&mut self, facts: Box<ConnectionFacts>) {
        *self.0.get_mut().unwrap_or_else(PoisonError::into_inner) = Some(facts);
    }

    /// Takes the facts out, for the next request on the connection.
    pub(super) fn take(&self) -> Option<Box<ConnectionFacts>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl RequestCtx {
    pub(super) fn new(security_headers: &'static SecurityHeaders) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: HeaderValue::from_static(""),
            client: Client::default(),
            connection: CarriedFacts::default(),
            original_target: None,
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
        self.forwarding.as_ref()?.upstream
    }

    /// The status of the current attempt's upstream response, once it arrived.
    pub(super) fn last_attempt_status(&self) -> Option<u16> {
        self.forwarding.as_ref()?.attempt.as_ref()?.status
    }

    /// The service, the forwarding state and the client's address, for the phases after
    /// admission.
    pub(super) fn forwarding(&mut self) -> Option<(&'static Service, &mut Forwarding, &str)> {
        Some((self.service?, self.forwarding.as_mut()?, self.client.addr()))
    }

    /// The upstream switched protocols: its attempt is judged now, on the handshake alone
    /// (a `101` is a success, slow only if the handshake was), since the tunnel's length says
    /// nothing about the upstream's health; the tunnel is counted from here until the request
    /// ends.
    pub(super) fn open_tunnel(&mut self) {
        let Some((service, forwarding, _)) = self.forwarding() else {
            return;
        };
        forwarding.responded(101);
        forwarding.end_attempt(AttemptEvent::Done(None));
        self.tunnel = Some(GaugeGuard::new(&service.metrics.tunnels));
    }

    /// How many headers `decorate` may add at most, CORS aside.
    pub(super) fn decorations(&self) -> usize {
        self.security_headers.added() + self.rate_limit_headers.len()
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
    /// When `timeouts.total` (or a shorter `grpc-timeout` of the client's) runs out, counted
    /// from the request's arrival.
    pub(super) deadline: Option<Instant>,
    /// The client's `grpc-timeout` is shorter than the service's read timeout and total
    /// budget: a timeout is then the client's choice, not the upstream's fault.
    pub(super) client_deadline: bool,
    /// Upstreams already tried, so a retry goes elsewhere when it can.
    pub(super) tried: Vec<usize>,
    pub(super) retries: u32,
    /// When the first attempt started, for `breakwater_upstream_duration_seconds`.
    pub(super) first_attempt_at: Option<Instant>,
    /// The upstream of the latest attempt, for the error body and the access log.
    pub(super) upstream: Option<&'static Upstream>,
    /// The attempt planned for the next `upstream_peer`, or under way.
    pub(super) attempt: Option<Attempt>,
}

impl Forwarding {
    /// Forwarding of a request that arrived at `start`, to the upstream `first` admitted;
    /// `client_timeout` is a gRPC call's `grpc-timeout`.
    pub(super) fn new(
        service: &'static Service,
        start: Instant,
        first: Attempt,
        client_timeout: Option<Duration>,
    ) -> Forwarding {
        let t = &service.timeouts;
        let budget = match (t.total, client_timeout) {
            (Some(total), Some(client)) => Some(total.min(client)),
            (total, client) => total.or(client),
        };
        let client_deadline =
            client_timeout.is_some_and(|c| c < t.read && t.total.is_none_or(|total| c < total));
        Forwarding {
            _in_flight: GaugeGuard::new(&service.metrics.in_flight),
            deadline: budget.map(|budget| start + budget),
            client_deadline,
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
        service: &'static Service,
        key: impl FnOnce() -> Vec<u8>,
    ) -> Option<&Attempt> {
        let mut attempt = match self.attempt.take() {
            Some(planned) if planned.started.is_none() => planned,
            previous => {
                if let Some(mut previous) = previous {
                    previous.record(AttemptEvent::Abandoned);
                }
                let (index, permit) = service.pool.admit(&key(), |_| true)?;
                Attempt::planned(service, index, permit)
            }
        };
        let now = Instant::now();
        self.tried.push(attempt.index);
        self.first_attempt_at.get_or_insert(now);
        self.upstream = Some(attempt.upstream);
        attempt.started = Some(Started {
            at: now,
            _in_flight: InFlight::new(attempt.upstream),
        });
        Some(self.attempt.insert(attempt))
    }

    /// The current attempt's upstream sent its response header with `status`.
    pub(super) fn responded(&mut self, status: u16) {
        if let Some(attempt) = &mut self.attempt {
            attempt.record(AttemptEvent::Responded(status));
        }
    }

    /// The current attempt's gRPC upstream ended the call with `code`.
    pub(super) fn grpc_status(&mut self, code: u32) {
        let Some(attempt) = &mut self.attempt else {
            return;
        };
        if self.client_deadline && code == super::grpc::DEADLINE_EXCEEDED {
            // The upstream ended the call at the client's own deadline, shorter than anything
            // the gateway would wait: no verdict on the upstream, as when the gateway's timer
            // gets there first (`client_deadline_passed`). Which of the two comes first is a
            // race. The permit is dropped, which counts for nothing.
            attempt.permit = None;
            return;
        }
        attempt.record(AttemptEvent::GrpcStatus(code));
    }

    /// Ends the current attempt, if any, as `end` says.
    pub(super) fn end_attempt(&mut self, end: AttemptEvent<'_>) {
        if let Some(mut attempt) = self.attempt.take() {
            attempt.record(end);
        }
    }

    /// Whether the current attempt got a response header from its upstream.
    pub(super) fn got_header(&self) -> bool {
        self.attempt.as_ref().is_some_and(|a| a.status.is_some())
    }

    /// Decides whether a failed attempt is tried again on another upstream, and if so plans
    /// it, with its breaker permit, for the next `upstream_peer`. `key` gives what consistent
    /// hashing hashes, only asked for when a retry is possible.
    pub(super) fn plan_retry(
        &mut self,
        service: &'static Service,
        key: impl FnOnce() -> Vec<u8>,
    ) -> bool {
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
    pub(super) upstream: &'static Upstream,
    /// Until the attempt ends; dropped unused, it frees a half-open probe slot.
    permit: Option<Permit>,
    started: Option<Started>,
    /// Status of the upstream's response header, once it arrived.
    status: Option<u16>,
    /// A gRPC call: a response header that is a success waits for the call's `grpc-status`.
    grpc: bool,
}

struct Started {
    at: Instant,
    /// Counts the attempt in its upstream's in-flight requests (least-request balancing and
    /// the admin API read them).
    _in_flight: InFlight<'static>,
}

/// What happened to an attempt, as far as its upstream's breaker is concerned.
pub(super) enum AttemptEvent<'a> {
    /// The upstream's response header arrived, with this status.
    Responded(u16),
    /// A gRPC upstream ended the call with this `grpc-status` (in its trailers, or in a
    /// trailers-only response header).
    GrpcStatus(u32),
    /// Connecting failed, or the exchange broke off on the upstream's side (before or after
    /// the response header).
    UpstreamFailed,
    /// The client went away or the gateway gave up on the attempt: it says nothing about the
    /// upstream.
    Abandoned,
    /// The request is over: judged by the upstream's response, or by the error that ended it.
    Done(Option<&'a Error>),
}

impl Attempt {
    /// When the attempt started, once it did.
    pub(super) fn started_at(&self) -> Option<Instant> {
        self.started.as_ref().map(|s| s.at)
    }

    pub(super) fn planned(service: &'static Service, index: usize, permit: Permit) -> Attempt {
        Attempt {
            index,
            upstream: &service.pool.upstreams[index],
            permit: Some(permit),
            started: None,
            status: None,
            grpc: service.protocol == Protocol::Grpc,
        }
    }

    /// The one place a breaker hears how an attempt went. The response header decides by its
    /// status and time to first byte (how long the client takes to read the body is not the
    /// upstream's doing); the end of the attempt can still make it a failure, when the
    /// exchange broke off on the upstream's side. An attempt never started (a retry planned
    /// but not made) tells it nothing: its upstream saw nothing.
    pub(super) fn record(&mut self, event: AttemptEvent<'_>) {
        let Some(started) = &self.started else {
            return;
        };
        let judged = match event {
            AttemptEvent::Responded(status) => {
                self.status = Some(status);
                let outcome = self.upstream.breaker.judge(status, || started.at.elapsed());
                // A gRPC call that failed tells in its trailers, after a `200`.
                (outcome == Outcome::Failure || !self.grpc).then_some(outcome)
            }
            AttemptEvent::GrpcStatus(code) => Some(self.upstream.breaker.judge_grpc(code)),
            _ => None,
        };
        if let AttemptEvent::Responded(_) | AttemptEvent::GrpcStatus(_) = event {
            if let (Some(outcome), Some(permit)) = (judged, &mut self.permit) {
                permit.responded(outcome);
            }
            return;
        }
        let Some(permit) = self.permit.take() else {
            return;
        };
        let answered = self.status.is_some();
        let outcome = match event {
            AttemptEvent::UpstreamFailed => Some(Outcome::Failure),
            AttemptEvent::Done(Some(e)) if e.esource() == &ErrorSource::Upstream => {
                Some(Outcome::Failure)
            }
            // The upstream answered; the client going away later is not its doing.
            AttemptEvent::Abandoned | AttemptEvent::Done(_) if answered => Some(Outcome::Success),
            AttemptEvent::Abandoned
            | AttemptEvent::Done(_)
            | AttemptEvent::Responded(_)
            | AttemptEvent::GrpcStatus(_) => None,
        };
        // Without an outcome the permit is dropped, which frees a probe slot.
        if let Some(outcome) = outcome {
            permit.record(outcome);
        }
    }
}

/// Holds a gauge one higher while it lives.
pub(super) struct GaugeGuard(&'static IntGauge);

impl GaugeGuard {
    fn new(gauge: &'static IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
