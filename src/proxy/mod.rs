//! The request pipeline: Breakwater's one `ProxyHttp` implementation.
//!
//! Read top to bottom, the phases are the life of a request: `request_filter` routes it and
//! picks an upstream (or answers at once), `upstream_peer` says how to connect,
//! `upstream_request_filter` sets the forwarding headers, `response_filter` tags the answer,
//! `fail_to_proxy` turns errors into JSON, and `logging` records metrics and the access log.
//! Each phase delegates to the module that owns the concern; `RequestCtx` carries state
//! between phases.

mod answer;
mod request_id;

use crate::cache::{CacheState, Lookup, Served};
use crate::edge::auth::{self, AuthError, Identity};
use crate::edge::cors::Preflight;
use crate::edge::forwarded::{self, client_ip, is_tls};
use crate::edge::limits::BODY_TOO_LARGE;
use crate::edge::security_headers::SecurityHeaders;
use crate::ops::lifecycle::LIFECYCLE;
use crate::ops::{access_log, metrics};
use crate::routing::{normalize_host, request_host, Route};
use crate::runtime::{Runtime, Service};
use crate::upstream::breaker::{Outcome, Permit};
use crate::upstream::peer;
use crate::upstream::state::{InFlight, Upstream};
use answer::ErrorBody;
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use request_id::REQUEST_ID;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Per-request state shared between the phases.
pub struct RequestCtx {
    start: Instant,
    request_id: HeaderValue,
    service: Option<Arc<Service>>,
    route: Option<Arc<Route>>,
    /// Upstream chosen for the next attempt, by `request_filter` or a retry.
    selected: Option<usize>,
    /// Upstreams already tried, so a retry goes elsewhere when it can.
    tried: Vec<usize>,
    upstream: Option<Arc<Upstream>>,
    /// The breaker's admission for the current attempt; its outcome is recorded once.
    permit: Option<Permit>,
    retries: u32,
    attempt_start: Option<Instant>,
    /// Status of the upstream's response header, once it arrived.
    upstream_status: Option<u16>,
    in_flight: Option<InFlight>,
    service_in_flight: bool,
    upstream_start: Option<Instant>,
    deadline: Option<Instant>,
    /// Why the gateway itself answered, for the access log.
    error: Option<&'static str>,
    /// Request body bytes received so far.
    body_bytes: u64,
    /// The verified token's identity, when the route uses auth and one was presented.
    identity: Option<Identity>,
    /// The request's `Origin`, for CORS response headers.
    origin: Option<HeaderValue>,
    /// `RateLimit-*` headers for the response.
    rate_limit_headers: Vec<(HeaderName, HeaderValue)>,
    /// The response cache's view of this request: what to fill, or a stale copy to serve.
    cache: Option<CacheState>,
    /// The service's security headers once routed, the top-level ones before.
    security_headers: Arc<SecurityHeaders>,
}

/// The gateway proxy.
pub struct Gateway {
    runtime: Arc<Runtime>,
}

impl Gateway {
    pub fn new(runtime: Arc<Runtime>) -> Gateway {
        Gateway { runtime }
    }

    /// Decides whether a failed attempt is tried again on another upstream, and if so picks
    /// it (with its breaker permit) for the next `upstream_peer`.
    fn plan_retry(&self, session: &Session, ctx: &mut RequestCtx) -> bool {
        let Some(service) = ctx.service.clone() else {
            return false;
        };
        if ctx.retries >= service.retries {
            return false;
        }
        let key = hash_key(session, &service);
        let tried = &ctx.tried;
        let Some((index, permit)) = service.pool.admit(&key, |i| !tried.contains(&i)) else {
            return false;
        };
        if !service.retry_budget.try_acquire_retry() {
            service.metrics.retries_budget_exhausted.inc();
            return false;
        }
        service.metrics.retries_attempted.inc();
        ctx.retries += 1;
        ctx.selected = Some(index);
        ctx.permit = Some(permit);
        true
    }

    /// Finds the service for the request by host and path.
    fn route(&self, session: &Session, ctx: &mut RequestCtx) -> Option<Arc<Service>> {
        let req = session.req_header();
        let host = normalize_host(request_host(req).unwrap_or_default());
        let route = self.runtime.router.find(&host, req.uri.path())?;
        let service = Arc::clone(&self.runtime.services[route.service]);
        ctx.route = Some(Arc::clone(route));
        ctx.service = Some(Arc::clone(&service));
        ctx.security_headers = Arc::clone(&service.security_headers);
        if service.cors.is_some() {
            // Every answer from here on, errors included, needs it for its CORS headers.
            ctx.origin = req.headers.get(http::header::ORIGIN).cloned();
        }
        Some(service)
    }

    /// Verifies the token as the service's `auth` mode asks and keeps the identity.
    async fn authenticate(
        &self,
        session: &Session,
        service: &Service,
        ctx: &mut RequestCtx,
    ) -> Option<Answer> {
        let authenticator = self.runtime.authenticator.as_ref()?;
        let header = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION);
        match service.auth.verify(authenticator, header).await {
            Ok(identity) => {
                ctx.identity = identity;
                None
            }
            Err(e) => {
                auth::count_failure(&service.name, &e);
                Some(Answer::Unauthorized(e))
            }
        }
    }
}

/// What consistent hashing hashes for this request (empty for the other algorithms).
fn hash_key(session: &Session, service: &Service) -> Vec<u8> {
    service
        .pool
        .hash_key(session.req_header(), || client_ip(session))
}

/// Records how the current attempt went with its breaker, once.
fn record_attempt(ctx: &mut RequestCtx, outcome: Outcome) {
    if let Some(permit) = ctx.permit.take() {
        permit.record(outcome);
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            start: Instant::now(),
            request_id: HeaderValue::from_static(""),
            service: None,
            route: None,
            selected: None,
            tried: Vec::new(),
            upstream: None,
            permit: None,
            retries: 0,
            attempt_start: None,
            upstream_status: None,
            in_flight: None,
            service_in_flight: false,
            upstream_start: None,
            deadline: None,
            error: None,
            body_bytes: 0,
            identity: None,
            origin: None,
            rate_limit_headers: Vec::new(),
            cache: None,
            security_headers: Arc::clone(&self.runtime.security_headers),
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.start = Instant::now();
        if LIFECYCLE.is_draining() {
            // A successor process serves new connections: let this one go after the answer.
            session.set_keepalive(None);
        }
        ctx.request_id = match session.req_header().headers.get(REQUEST_ID) {
            Some(v) if request_id::is_well_formed(v) => v.clone(),
            _ => request_id::new(),
        };
        let Some(service) = self.route(session, ctx) else {
            let path = session.req_header().uri.path();
            let body =
                ErrorBody::new("no route").detail(format!("no service is routed for {path}"));
            let answer = Answer::Error(StatusCode::NOT_FOUND, "no route", body, Vec::new());
            return answer.send(session, ctx).await;
        };
        // Each step either lets the request on or answers it here, in this order: size
        // limits, CORS preflight (browsers send it without credentials), authentication,
        // rate limit (per user needs the identity), cache, then an upstream or the fallback.
        if let Some(answer) = check_limits(session, &service) {
            return answer.send(session, ctx).await;
        }
        session.set_read_timeout(Some(service.limits.header_read_timeout));
        if let Some(answer) = cors_preflight(session, &service) {
            return answer.send(session, ctx).await;
        }
        if let Some(answer) = self.authenticate(session, &service, ctx).await {
            return answer.send(session, ctx).await;
        }
        if let Some(answer) = rate_limit(session, &service, ctx).await {
            return answer.send(session, ctx).await;
        }
        if let Some(answer) = cache_lookup(session, &service, ctx).await {
            return answer.send(session, ctx).await;
        }
        service.metrics.in_flight.inc();
        ctx.service_in_flight = true;
        ctx.deadline = service.timeouts.total.map(|t| ctx.start + t);
        let key = hash_key(session, &service);
        match service.pool.admit(&key, |_| true) {
            Some((index, permit)) => {
                ctx.selected = Some(index);
                ctx.permit = Some(permit);
                service.retry_budget.record_request();
                Ok(false)
            }
            None => {
                // Every upstream is unhealthy or its breaker is open: answer now, without
                // touching the network, with a stale cached copy when there is one.
                service.metrics.circuit_rejected.inc();
                let answer = match ctx.cache.as_mut().and_then(|c| c.take_stale()) {
                    Some(stale) => Answer::Cached(stale),
                    None => Answer::Fallback,
                };
                answer.send(session, ctx).await
            }
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(service) = ctx.service.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no service chosen");
        };
        let index = match ctx.selected.take() {
            Some(i) => i,
            None => {
                // Pingora retries a stale pooled connection on its own: pick again.
                let key = hash_key(session, &service);
                let (index, permit) = service.pool.admit(&key, |_| true).ok_or_else(|| {
                    Error::explain(ErrorType::ConnectNoRoute, "no upstream admits the retry")
                })?;
                ctx.permit = Some(permit);
                index
            }
        };
        let upstream = Arc::clone(&service.pool.upstreams[index]);
        ctx.tried.push(index);
        ctx.upstream = Some(Arc::clone(&upstream));
        let now = Instant::now();
        ctx.upstream_start.get_or_insert(now);
        ctx.attempt_start = Some(now);
        ctx.upstream_status = None;
        ctx.in_flight = Some(InFlight::new(Arc::clone(&upstream)));

        let peer = peer::for_attempt(&upstream.peer, &service.timeouts, ctx.deadline)?;
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(authenticator) = &self.runtime.authenticator {
            authenticator.forward_identity(ctx.identity.as_ref(), upstream_request)?;
        }
        if let Some(route) = &ctx.route {
            route.rewrite_path(upstream_request)?;
        }
        upstream_request.insert_header(REQUEST_ID, ctx.request_id.clone())?;
        forwarded::set_headers(session, upstream_request)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A body without Content-Length (chunked) is counted as it streams.
        if let (Some(chunk), Some(service)) = (body.as_ref(), &ctx.service) {
            ctx.body_bytes += chunk.len() as u64;
            if service.limits.body_exceeds(ctx.body_bytes) {
                ctx.error = Some(BODY_TOO_LARGE);
                return Error::e_explain(ErrorType::HTTPStatus(413), BODY_TOO_LARGE);
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if !upstream_response.status.is_informational() {
            ctx.upstream_status = Some(upstream_response.status.as_u16());
            // Before any per-request header is added, so none of them is stored.
            if let Some(cache) = &mut ctx.cache {
                cache.start_fill(session.req_header(), upstream_response);
            }
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(cache) = &mut ctx.cache {
            cache.push_body(body.as_ref(), end_of_stream);
        }
        Ok(None)
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        upstream_response.insert_header(REQUEST_ID, ctx.request_id.clone())?;
        decorate(upstream_response, is_tls(session), ctx, true);
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        record_attempt(ctx, Outcome::Failure);
        if let Some(service) = &ctx.service {
            service.metrics.upstream_error(error_kind(e.etype()));
        }
        // Nothing was sent, so any method may go to another upstream.
        let retry = self.plan_retry(session, ctx);
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("upstream {peer}"));
        if e.esource() != &ErrorSource::Upstream {
            // The client went away or sent garbage: not the upstream's fault.
            ctx.permit = None;
            e.set_retry(false);
            return e;
        }
        record_attempt(ctx, Outcome::Failure);
        if let Some(service) = &ctx.service {
            service.metrics.upstream_error(error_kind(e.etype()));
        }
        // The request was sent: only an idempotent one may be replayed, only before any
        // response byte arrived, and only while its body is still fully buffered.
        let replayable = session.req_header().method.is_idempotent()
            && ctx.upstream_status.is_none()
            && !session.as_ref().retry_buffer_truncated();
        let retry = if replayable {
            self.plan_retry(session, ctx)
        } else {
            if let Some(service) = &ctx.service {
                if ctx.retries < service.retries {
                    service.metrics.retries_not_retryable.inc();
                }
            }
            false
        };
        e.set_retry(retry);
        e
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (status, message) = classify_error(e);
        let Some(status) = status else {
            // The client went away: nobody to answer.
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        ctx.error = Some(message);
        if session.response_written().is_none() {
            if let Some(stale) = ctx.cache.as_mut().and_then(|c| c.take_stale()) {
                let status = stale.header.status.as_u16();
                session.set_keepalive(None);
                if let Err(write_error) = Answer::Cached(stale).send(session, ctx).await {
                    log::debug!("could not send the stale response: {write_error}");
                }
                return FailToProxy {
                    error_code: status,
                    can_reuse_downstream: false,
                };
            }
            // Pingora closes the client connection after an upstream error; say so, so the
            // client does not reuse it.
            session.set_keepalive(None);
            let mut body = ErrorBody::new(message);
            if let Some(service) = &ctx.service {
                body = body.service(&service.name);
            }
            if let Some(upstream) = &ctx.upstream {
                body = body.upstream(&upstream.name);
            }
            let tls = is_tls(session);
            let finish = |h: &mut ResponseHeader| decorate(h, tls, ctx, true);
            if let Err(write_error) =
                answer::send_json(session, status, &body, &ctx.request_id, &[], &finish).await
            {
                log::debug!("could not send the error response: {write_error}");
            }
        }
        FailToProxy {
            error_code: status.as_u16(),
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session
            .response_written()
            .map(|r| r.status.as_u16())
            .unwrap_or(0);
        let elapsed = ctx.start.elapsed();
        let service_name = ctx.service.as_ref().map_or("none", |s| s.name.as_str());
        let method = session.req_header().method.clone();
        if ctx.selected.take().is_some() {
            // A retry was planned but never made: its upstream saw nothing.
            ctx.permit = None;
        }
        if let (Some(_), Some(permit)) = (&ctx.service, ctx.permit.take()) {
            match (ctx.upstream_status, e) {
                (Some(upstream_status), _) => {
                    let took = ctx.attempt_start.map(|t| t.elapsed()).unwrap_or_default();
                    if let Some(upstream) = &ctx.upstream {
                        permit.record(upstream.breaker.judge(upstream_status, took));
                    }
                }
                // The exchange broke off and no hook recorded it: blame the upstream only
                // when the error came from its side.
                (None, Some(err)) if err.esource() == &ErrorSource::Upstream => {
                    permit.record(Outcome::Failure)
                }
                _ => drop(permit),
            }
        }
        match &ctx.service {
            Some(service) => {
                service.metrics.count_request(method.as_str(), status);
                service
                    .metrics
                    .request_duration
                    .observe(elapsed.as_secs_f64());
                if let Some(t) = ctx.upstream_start {
                    service
                        .metrics
                        .upstream_duration
                        .observe(t.elapsed().as_secs_f64());
                }
                if ctx.service_in_flight {
                    service.metrics.in_flight.dec();
                    ctx.service_in_flight = false;
                }
            }
            None => metrics::count_request("none", method.as_str(), status),
        }
        ctx.in_flight = None;
        if self.runtime.access_log {
            access_log::write(&access_log::Entry {
                session,
                request_id: ctx.request_id.to_str().unwrap_or_default(),
                status,
                service: service_name,
                upstream: ctx.upstream.as_ref().map(|u| u.name.as_str()),
                attempts: ctx.tried.len(),
                duration: elapsed,
                error: ctx.error.or(e.map(|e| e.etype().as_str())),
                cache: ctx.cache.as_ref().and_then(|c| c.x_cache()),
            });
        }
    }
}

/// What the gateway answers itself, without an upstream.
enum Answer {
    /// A JSON error: status, the access log's reason, the body, extra headers.
    Error(
        StatusCode,
        &'static str,
        ErrorBody,
        Vec<(HeaderName, HeaderValue)>,
    ),
    /// A CORS preflight, allowed, with its headers.
    Preflight(Vec<(HeaderName, HeaderValue)>),
    /// A CORS preflight for an origin, method or header the policy does not allow.
    PreflightRejected,
    Unauthorized(AuthError),
    /// From the cache: fresh, or stale while the upstream is down.
    Cached(Served),
    /// The service's fallback: no upstream admits the request.
    Fallback,
}

impl Answer {
    async fn send(self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.error = match &self {
            Answer::Error(_, reason, ..) => Some(reason),
            Answer::Preflight(_) => Some("cors preflight"),
            Answer::PreflightRejected => Some("cors preflight rejected"),
            Answer::Unauthorized(e) => Some(e.reason()),
            // Keeps the reason of a stale answer (the upstream's failure).
            Answer::Cached(_) => ctx.error,
            Answer::Fallback => Some("fallback"),
        };
        let ctx = &*ctx;
        let id = &ctx.request_id;
        let tls = is_tls(session);
        // A preflight carries its own CORS headers (none when refused); every answer gets
        // the rest.
        let with_cors = !matches!(self, Answer::Preflight(_) | Answer::PreflightRejected);
        let finish = |h: &mut ResponseHeader| decorate(h, tls, ctx, with_cors);
        match self {
            Answer::Error(status, _, mut body, headers) => {
                if let Some(service) = &ctx.service {
                    body = body.service(&service.name);
                }
                answer::send_json(session, status, &body, id, &headers, &finish).await?;
            }
            Answer::Preflight(headers) => {
                let (status, empty) = (StatusCode::NO_CONTENT, Bytes::new());
                answer::send(session, status, "text/plain", empty, id, &headers, &finish).await?;
            }
            Answer::PreflightRejected => {
                let body = ErrorBody::new("cors preflight rejected").service(service_name(ctx));
                let status = StatusCode::FORBIDDEN;
                answer::send_json(session, status, &body, id, &[], &finish).await?;
            }
            Answer::Unauthorized(e) => {
                let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
                let challenge = [(http::header::WWW_AUTHENTICATE, e.www_authenticate_value())];
                let json = "application/json";
                answer::send(session, status, json, e.body(), id, &challenge, &finish).await?;
            }
            Answer::Cached(served) => {
                let mut header = served.header;
                header.insert_header(REQUEST_ID, id.clone())?;
                finish(&mut header);
                let head_only = served.body.is_empty();
                session.write_response_header(header, head_only).await?;
                if !head_only {
                    session.write_response_body(Some(served.body), true).await?;
                }
            }
            Answer::Fallback => {
                if let Some(service) = &ctx.service {
                    send_fallback(session, service, id, &finish).await?;
                }
            }
        }
        Ok(true)
    }
}

fn service_name(ctx: &RequestCtx) -> &str {
    ctx.service.as_ref().map_or("none", |s| s.name.as_str())
}

/// Size limits known from the header alone.
fn check_limits(session: &Session, service: &Service) -> Option<Answer> {
    let (status, reason) = service.limits.check_header(session.req_header())?;
    Some(Answer::Error(
        status,
        reason,
        ErrorBody::new(reason),
        Vec::new(),
    ))
}

/// Answers CORS preflights.
fn cors_preflight(session: &Session, service: &Service) -> Option<Answer> {
    let cors = service.cors.as_ref()?;
    match cors.preflight(session.req_header()) {
        Preflight::Allowed(headers) => Some(Answer::Preflight(headers)),
        Preflight::Rejected => Some(Answer::PreflightRejected),

        Preflight::NotCors => None,
    }
}

/// Counts the request against the service's rate limit.
async fn rate_limit(session: &Session, service: &Service, ctx: &mut RequestCtx) -> Option<Answer> {
    let limiter = service.rate_limit.as_ref()?;
    let ip = client_ip(session);
    let subject = ctx.identity.as_ref().and_then(|i| i.subject.as_deref());
    let key = limiter.key_for(&ip, subject, &session.req_header().headers);
    let decision = limiter.check(&key).await;
    let headers = limiter.headers(&decision);
    match decision.rejection() {
        Some((status, reason)) => Some(Answer::Error(
            status,
            reason,
            ErrorBody::new(reason),
            headers,
        )),
        None => {
            ctx.rate_limit_headers = headers;
            None
        }
    }
}

/// Answers from the cache, or keeps the cache's state for filling it from the upstream.
async fn cache_lookup(
    session: &Session,
    service: &Service,
    ctx: &mut RequestCtx,
) -> Option<Answer> {
    let cache = service.cache.as_ref()?;
    let subject = ctx.identity.as_ref().and_then(|i| i.subject.as_deref());
    match cache.lookup(session.req_header(), subject).await {
        Lookup::Hit(served) => Some(Answer::Cached(served)),
        Lookup::Forward(state) => {
            ctx.cache = Some(state);
            None
        }
    }
}

/// Answers with the service's fallback, with `Retry-After` unless the config sets one.
async fn send_fallback(
    session: &mut Session,
    service: &Service,
    request_id: &HeaderValue,
    finish: &answer::Decorate<'_>,
) -> Result<()> {
    let fallback = &service.fallback;
    let mut headers = fallback.headers.clone();
    if !fallback.has_retry_after {
        headers.push((
            http::header::RETRY_AFTER,
            HeaderValue::from(service.pool.retry_after_secs()),
        ));
    }
    answer::send(
        session,
        fallback.status,
        &fallback.content_type,
        fallback.body.clone(),
        request_id,
        &headers,
        finish,
    )
    .await
}

/// The headers every answer of a routed service carries, whoever wrote it (the upstream, the
/// cache or the gateway): security headers, CORS, rate-limit state.
fn decorate(resp: &mut ResponseHeader, tls: bool, ctx: &RequestCtx, with_cors: bool) {
    ctx.security_headers.apply(resp, tls);
    if let Some(cors) = ctx.service.as_ref().and_then(|s| s.cors.as_ref()) {
        if with_cors {
            cors.apply(ctx.origin.as_ref(), resp);
        }
    }
    for (name, value) in &ctx.rate_limit_headers {
        // Valid names and values, prepared by the rate limiter.
        let _ = resp.insert_header(name.clone(), value.clone());
    }
}

/// A short label of what went wrong with an upstream attempt.
fn error_kind(etype: &ErrorType) -> &'static str {
    match etype {
        ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => "connect_timeout",
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => "timeout",
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
            "connect"
        }
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => {
            "tls"
        }
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => "reset",
        _ => "other",
    }
}

/// The status and message the client gets for a failed request; `None` when the client is
/// gone.
fn classify_error(e: &Error) -> (Option<StatusCode>, &'static str) {
    if let ErrorType::HTTPStatus(code) = e.etype() {
        let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY);
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => BODY_TOO_LARGE,
            _ => "request rejected",
        };
        return (Some(status), message);
    }
    match e.esource() {
        ErrorSource::Upstream => match e.etype() {
            ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
            | ErrorType::TLSHandshakeTimedout => {
                (Some(StatusCode::GATEWAY_TIMEOUT), "upstream timed out")
            }
            ErrorType::ConnectNoRoute => {
                (Some(StatusCode::SERVICE_UNAVAILABLE), "no healthy upstream")
            }
            ErrorType::ConnectRefused | ErrorType::ConnectError => {
                (Some(StatusCode::BAD_GATEWAY), "upstream connection refused")
            }
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
                (Some(StatusCode::BAD_GATEWAY), "upstream connection reset")
            }
            _ => (Some(StatusCode::BAD_GATEWAY), "bad upstream response"),
        },
        ErrorSource::Downstream => match e.etype() {
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => {
                (None, "client closed")
            }
            ErrorType::ReadTimedout => (Some(StatusCode::REQUEST_TIMEOUT), "client timed out"),
            _ => (Some(StatusCode::BAD_REQUEST), "bad request"),
        },
        ErrorSource::Internal | ErrorSource::Unset => match e.etype() {
            ErrorType::ConnectTimedout => (Some(StatusCode::GATEWAY_TIMEOUT), "upstream timed out"),
            ErrorType::ConnectNoRoute => {
                (Some(StatusCode::SERVICE_UNAVAILABLE), "no healthy upstream")
            }
            _ => (Some(StatusCode::INTERNAL_SERVER_ERROR), "internal error"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_errors_map_to_502_and_504() {
        let mut e = Error::new(ErrorType::ConnectRefused);
        e.esource = ErrorSource::Upstream;
        assert_eq!(classify_error(&e).0, Some(StatusCode::BAD_GATEWAY));
        let mut e = Error::new(ErrorType::ReadTimedout);
        e.esource = ErrorSource::Upstream;
        assert_eq!(classify_error(&e).0, Some(StatusCode::GATEWAY_TIMEOUT));
        let mut e = Error::new(ErrorType::ConnectionClosed);
        e.esource = ErrorSource::Downstream;
        assert_eq!(classify_error(&e).0, None);
    }
}
