//! The request pipeline: Breakwater's one `ProxyHttp` implementation, the table of contents of
//! the gateway.
//!
//! Read top to bottom, the phases are the life of a request: `request_filter` routes it, runs
//! the edge checks and picks an upstream (or answers at once), `upstream_peer` says how to
//! connect, `upstream_request_filter` sets the forwarding headers, the response filters fill
//! the cache and tag the answer, the failure hooks decide on retries and turn errors into
//! JSON, and `logging` settles the attempt and records metrics and the access log. Each phase
//! is a few calls into the module that owns the concern; [`RequestCtx`] carries the state
//! between phases (`context`), `answer` writes what the gateway answers itself, and
//! `errors` says what a failure means for the client.

mod answer;
mod context;
mod errors;
mod grpc;
pub mod request_id;

pub use context::RequestCtx;

use crate::cache::{CacheState, Lookup, Refresh};
use crate::edge::auth::{self, AuthMode};
use crate::edge::compression::{ResponseCompression, ResponseCompressionBuilder};
use crate::edge::cors::Preflight;
use crate::edge::forwarded::{self, is_tls, Client, ConnectionFacts};
use crate::edge::limits::BODY_TOO_LARGE;
use crate::edge::path::Target;
use crate::ops::lifecycle::LIFECYCLE;
use crate::ops::tracing::{Phase, RequestSummary, RequestTrace};
use crate::ops::{access_log, metrics};
use crate::runtime::{Runtime, Service};
use crate::upstream::peer::{self, Protocol};
use answer::{Answer, ErrorBody};
use async_trait::async_trait;
use bytes::Bytes;
use context::{Attempt, AttemptEvent, Forwarding};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::HttpModules;
use pingora::prelude::HttpPeer;
use pingora::proxy::subrequest::Ctx as SubrequestCtx;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use request_id::REQUEST_ID_HEADER;
use std::time::{Duration, Instant};

/// The gateway proxy.
pub struct Gateway {
    runtime: &'static Runtime,
    /// Some service caches, so a request may refresh a stale entry in a subrequest.
    refreshes_cache: bool,
}

impl Gateway {
    pub fn new(runtime: &'static Runtime) -> Gateway {
        let refreshes_cache = runtime.services.iter().any(|s| s.cache.is_some());
        Gateway {
            runtime,
            refreshes_cache,
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    /// Boxed: Pingora keeps the context in the request's future, which is copied whole into
    /// a heap box once per request (`process_new_http` is an `async_trait` method). With the
    /// 448-byte context inline that copy was 1.3 KB (three contexts) larger than bare
    /// Pingora's; with a pointer it is the same (callgrind: -1.4% instructions per request).
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Self::CTX {
        Box::new(RequestCtx::new(&self.runtime.security_headers))
    }

    /// Breakwater's compression module in place of Pingora's (which the default adds,
    /// disabled): one module per request either way.
    fn init_downstream_modules(&self, modules: &mut HttpModules) {
        modules.add_module(ResponseCompressionBuilder::module());
    }

    /// What one request on a keep-alive connection worked out about the connection goes to
    /// the next one (`on_connection_reuse`). Pingora calls this last, after `logging`.
    fn persist_connection_context(
        &self,
        _session: &Session,
        ctx: &Self::CTX,
    ) -> Option<Box<dyn std::any::Any + Send + Sync>> {
        let facts: Box<dyn std::any::Any + Send + Sync> = ctx.connection.take()?;
        Some(facts)
    }

    fn on_connection_reuse(
        &self,
        _session: &mut Session,
        ctx: &mut Self::CTX,
        previous: Box<dyn std::any::Any + Send + Sync>,
    ) {
        if let Ok(facts) = previous.downcast::<ConnectionFacts>() {
            ctx.connection.set(facts);
        }
    }

    /// The cache refreshes stale entries through subrequests of this same pipeline. Asked
    /// for every request, before it is routed; without a cache no request needs the spawner,
    /// which holds a reference to the proxy (two atomic operations a request).
    fn allow_spawning_subrequest(&self, _session: &Session, _ctx: &Self::CTX) -> bool {
        self.refreshes_cache
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Self::CTX) -> Result<bool> {
        begin(session, ctx);
        if let Some(tracer) = &self.runtime.tracer {
            ctx.trace = RequestTrace::begin(tracer, &session.req_header().headers, ctx.start);
        }
        // The request as the upstream will read it, before anything judges it: its client
        // known, its target normalized, its headers cleaned.
        let connection = ctx.connection.get();
        ctx.client = Client::of(session, &self.runtime.trusted_proxies, connection);
        match self
            .runtime
            .paths
            .normalize_request(session.req_header_mut())
        {
            Ok((Target::Path, original)) => ctx.original_target = original,
            Ok((Target::Asterisk, _)) => return Answer::ServerOptions.send(session, ctx).await,
            Err(e) => {
                let answer = Answer::bad_request("bad request path", e.detail());
                return answer.send(session, ctx).await;
            }
        }
        let header_refusal = self
            .runtime
            .header_rules
            .clean(session.req_header_mut(), ctx.client.via_trusted_proxy);
        let Some(service) = self.route(session, ctx) else {
            return Answer::no_route(session.req_header())
                .send(session, ctx)
                .await;
        };
        arm_compression(session, service);
        // Each step either lets the request on or answers it here, in this order: the rate
        // limit when it needs no identity (first, so every request refused below counts, and
        // a flood of bad tokens is cut off before their signatures are checked), ambiguous
        // headers, size limits, CORS preflight (browsers send it without credentials),
        // authentication, the rate limit per user, cache, then an upstream or the fallback.
        if let Some(answer) = rate_limit(session, service, ctx, Stage::BeforeAuth).await {
            return answer.send(session, ctx).await;
        }
        if let Some(detail) = header_refusal {
            return Answer::bad_request("bad request header", detail)
                .send(session, ctx)
                .await;
        }
        if let Some(answer) = check_limits(session, service) {
            return answer.send(session, ctx).await;
        }
        session.set_read_timeout(Some(service.limits.header_read_timeout));
        if let Some(answer) = cors_preflight(session, service) {
            return answer.send(session, ctx).await;
        }
        if let Some(answer) = cross_origin_upgrade(session, service) {
            return answer.send(session, ctx).await;
        }
        if let Some(answer) = self.authenticate(session, service, ctx).await {
            return answer.send(session, ctx).await;
        }
        if let Some(answer) = rate_limit(session, service, ctx, Stage::AfterAuth).await {
            return answer.send(session, ctx).await;
        }
        if let Some(answer) = cache_lookup(session, service, ctx).await {
            return answer.send(session, ctx).await;
        }
        match admit(session, service, ctx) {
            Some(answer) => answer.send(session, ctx).await,
            None => Ok(false),
        }
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut Self::CTX,
    ) -> Result<Box<HttpPeer>> {
        let Some((service, forwarding, client)) = ctx.forwarding() else {
            return Error::e_explain(ErrorType::InternalError, "no upstream admitted");
        };
        let deadline = forwarding.deadline;
        let key = || hash_key(session, service, client);
        let retry = forwarding.retries;
        let Some(attempt) = forwarding.start_attempt(service, key) else {
            return Error::e_explain(ErrorType::ConnectNoRoute, "no upstream admits the retry");
        };
        let started = attempt.started_at().unwrap_or_else(Instant::now);
        let upstream = &attempt.upstream.peer;
        let mut peer = peer::for_attempt(upstream, &service.timeouts, deadline, started)?;
        if session.is_upgrade_req() {
            peer::for_tunnel(&mut peer, &service.timeouts);
        }
        if let Some(upstream) = ctx.forwarding.as_ref().and_then(|f| f.upstream) {
            let state = || upstream.breaker.state().as_str();
            ctx.trace
                .attempt_started(retry, || (upstream.name.clone(), state()));
        }
        Ok(peer)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Room for the request id, six forwarding headers, a trace context and the identity
        // headers. The copy keeps the index headroom of the client's parsed header, so this
        // grows the index only when the identity headers need more than that; the entry
        // lists, copied at their length, still grow as headers are added (`http` reserves
        // entries only with its index; patches/README.md).
        let identity = self
            .runtime
            .authenticator
            .as_ref()
            .map_or(0, |a| a.identity_headers().count());
        upstream_request.reserve_headers(8 + identity)?;
        if let Some(authenticator) = &self.runtime.authenticator {
            authenticator.forward_identity(ctx.identity.as_deref(), upstream_request)?;
        }
        if let Some(route) = &ctx.route {
            route.rewrite_path(upstream_request)?;
        }
        upstream_request.insert_prepared_header(&REQUEST_ID_HEADER, ctx.request_id.clone())?;
        ctx.trace.set_upstream_headers(upstream_request);
        if let Some(cache) = &ctx.cache {
            cache.prepare_upstream_request(upstream_request)?;
        }
        if let (Some(service), Some(forwarding)) = (&ctx.service, &ctx.forwarding) {
            if service.protocol == Protocol::Grpc {
                // The upstream hears the deadline the gateway keeps, not the client's.
                upstream_request.remove_header(grpc::GRPC_TIMEOUT);
                if let Some(deadline) = forwarding.deadline {
                    let left = deadline.saturating_duration_since(Instant::now());
                    upstream_request
                        .insert_header(grpc::GRPC_TIMEOUT, grpc::timeout_value(left))?;
                }
            }
        }
        let connection = ctx.connection.get();
        forwarded::set_headers(session, &ctx.client, connection, upstream_request)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        // Past a `101` the bytes are another protocol's (WebSocket frames), not a body: a
        // long session may carry any amount.
        if session.was_upgraded() {
            return Ok(());
        }
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
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if upstream_response.status == http::StatusCode::SWITCHING_PROTOCOLS
            && session.is_upgrade_req()
        {
            open_tunnel(session, ctx);
        }
        if !upstream_response.status.is_informational() {
            // The breaker judges the attempt now, by its status and time to first byte (a
            // gRPC call's success waits for its status, here for a trailers-only answer).
            if let (Some(service), Some(forwarding)) = (&ctx.service, &mut ctx.forwarding) {
                forwarding.responded(upstream_response.status.as_u16());
                if service.protocol == Protocol::Grpc {
                    if let Some(code) = grpc::status_of(&upstream_response.headers) {
                        forwarding.grpc_status(code);
                    }
                }
            }
            // Before any per-request header is added, so none of them is stored.
            if let Some(cache) = &mut ctx.cache {
                cache.start_fill(session.req_header(), upstream_response);
            }
        }
        Ok(())
    }

    fn upstream_response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        if let (Some(service), Some(forwarding)) = (&ctx.service, &mut ctx.forwarding) {
            if service.protocol == Protocol::Grpc {
                if let Some(code) = grpc::status_of(trailers) {
                    forwarding.grpc_status(code);
                }
            }
        }
        Ok(())
    }

    fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Self::CTX,
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
        ctx: &mut Self::CTX,
    ) -> Result<()> {
        self.runtime.header_rules.clean_response(upstream_response);
        upstream_response.reserve_headers(1 + ctx.decorations())?;
        upstream_response.insert_prepared_header(&REQUEST_ID_HEADER, ctx.request_id.clone())?;
        ctx.decorate(upstream_response, is_tls(session), true);
        Ok(())
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Self::CTX,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.trace
            .attempt_ended(None, Some(errors::error_kind(e.etype())));
        let Some((service, forwarding, client)) = ctx.forwarding() else {
            return no_retry(e);
        };
        if client_deadline_passed(forwarding, &e) {
            forwarding.end_attempt(AttemptEvent::Abandoned);
            return no_retry(e);
        }
        upstream_failed(service, forwarding, &e);
        // Nothing was sent, so any method may go to another upstream.
        let retry = forwarding.plan_retry(service, || hash_key(session, service, client));
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Self::CTX,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("upstream {peer}"));
        let status = ctx.last_attempt_status();
        ctx.trace
            .attempt_ended(status, Some(errors::error_kind(e.etype())));
        if ctx.tunnel.is_some() {
            // The handshake was judged at the `101`; however the tunnel ends, nothing is
            // retried and no upstream is blamed.
            return no_retry(e);
        }
        let Some((service, forwarding, client)) = ctx.forwarding() else {
            return no_retry(e);
        };
        let responded = forwarding.got_header();
        if e.esource() != &ErrorSource::Upstream || client_deadline_passed(forwarding, &e) {
            // The client went away, sent garbage or let its own deadline pass: not the
            // upstream's fault.
            forwarding.end_attempt(AttemptEvent::Abandoned);
            return no_retry(e);
        }
        upstream_failed(service, forwarding, &e);
        // The request was sent: only an idempotent one may be replayed, only before any
        // response byte arrived, and only while its body is still fully buffered.
        let replayable = session.req_header().method.is_idempotent()
            && !responded
            && !session.as_ref().retry_buffer_truncated();
        let retry = if replayable {
            forwarding.plan_retry(service, || hash_key(session, service, client))
        } else {
            if forwarding.retries < service.retries {
                service.metrics.retries_not_retryable.inc();
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
        ctx: &mut Self::CTX,
    ) -> FailToProxy {
        let (status, message) = errors::classify(e);
        let Some(status) = status else {
            // The client went away: nobody to answer.
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        ctx.error = Some(message);
        let mut error_code = status.as_u16();
        if session.response_written().is_none() {
            // Pingora closes the client connection after an upstream error; say so, so the
            // client does not reuse it.
            session.set_keepalive(None);
            let stale = ctx
                .cache
                .as_mut()
                .and_then(|c| c.take_stale(session.req_header()));
            let answer = match stale {
                Some(stale) => {
                    error_code = stale.header.status.as_u16();
                    Answer::Cached(stale)
                }
                None => {
                    let mut body = ErrorBody::new(message);
                    if let Some(upstream) = ctx.last_upstream() {
                        body = body.upstream(&upstream.name);
                    }
                    Answer::Error(status, message, body, Vec::new())
                }
            };
            if let Err(write_error) = answer.send(session, ctx).await {
                log::debug!("could not send the answer to a failed request: {write_error}");
            }
        }
        FailToProxy {
            error_code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Self::CTX) {
        let attempt_status = ctx.last_attempt_status();
        ctx.trace
            .attempt_ended(attempt_status, e.map(|e| errors::error_kind(e.etype())));
        if let Some(forwarding) = &mut ctx.forwarding {
            forwarding.end_attempt(AttemptEvent::Done(e));
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(ctx.start);
        count_request(session, ctx, status, now);
        let trace_id = ctx.trace.trace_id_hex();
        if let Some(log) = &self.runtime.access_log {
            log.write(&access_log::Entry {
                session,
                request_id: ctx.request_id.to_str().unwrap_or_default(),
                client: &ctx.client,
                original_target: ctx.original_target.as_deref(),
                status,
                service: ctx.service_name(),
                upstream: ctx.last_upstream().map(|u| u.name.as_str()),
                attempts: ctx.forwarding.as_ref().map_or(0, |f| f.tried.len()),
                duration: elapsed,
                finished: now,
                error: ctx.error.or(e.map(|e| e.etype().as_str())),
                cache: ctx.cache.as_ref().and_then(|c| c.x_cache()),
                trace_id: trace_id.as_ref().and_then(|t| std::str::from_utf8(t).ok()),
            });
        }
        finish_trace(session, ctx, status, e);
        // Releases the service's in-flight count, and the tunnel's.
        ctx.forwarding = None;
        ctx.tunnel = None;
    }
}

impl Gateway {
    /// Finds the service for the request by host and path.
    fn route(&self, session: &Session, ctx: &mut RequestCtx) -> Option<&'static Service> {
        let req = session.req_header();
        let route = self.runtime.router.find(req)?;
        let service: &'static Service = &self.runtime.services[route.service];
        ctx.route = Some(route);
        ctx.service = Some(service);
        ctx.security_headers = &service.security_headers;
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
        if service.auth.mode == AuthMode::None {
            return None;
        }
        let header = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION);
        let t = ctx.trace.phase_start();
        let verified = service.auth.verify(authenticator, header).await;
        ctx.trace.phase_end(Phase::Auth, t, verified.is_err());
        match verified {
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

/// Starts the request: its id, kept from the client when well formed. (Its clock started
/// when Pingora made the context, right after reading the header.)
fn begin(session: &mut Session, ctx: &mut RequestCtx) {
    if LIFECYCLE.is_draining() {
        // A successor process serves new connections: let this one go after the answer.
        session.set_keepalive(None);
    }
    ctx.request_id = match session.req_header().headers.get(REQUEST_ID_HEADER.name()) {
        Some(v) if request_id::is_well_formed(v) => v.clone(),
        _ => request_id::new(),
    };
}

/// Every answer from here on (a cached copy included) is compressed as the service says. A
/// cache refresh answers nobody: nothing to compress.
fn arm_compression(session: &mut Session, service: &Service) {
    let Some(policy) = &service.compression else {
        return;
    };
    if session.subrequest_ctx.is_some() {
        return;
    }
    let (req, modules) = (
        session.downstream_session.req_header(),
        &mut session.downstream_modules_ctx,
    );
    if let Some(module) = modules.get_mut::<ResponseCompression>() {
        module.arm(policy, req);
    }
}

/// Size limits known from the header alone.
fn check_limits(session: &Session, service: &Service) -> Option<Answer> {
    let (status, reason) = service.limits.check_header(session.req_header())?;
    Some(Answer::error(status, reason))
}

/// Answers CORS preflights.
fn cors_preflight(session: &Session, service: &Service) -> Option<Answer> {
    match service.cors.as_ref()?.preflight(session.req_header()) {
        Preflight::Allowed(headers) => Some(Answer::Preflight(headers)),
        Preflight::Rejected => Some(Answer::PreflightRejected),
        Preflight::NotCors => None,
    }
}

/// Browsers apply no CORS to WebSocket handshakes (they send `Origin` and let the server
/// decide), so a service with a CORS policy refuses an upgrade from an origin the policy
/// does not allow: otherwise any site could open a socket with the user's cookies. A
/// handshake without `Origin` (not from a browser) is let through.
fn cross_origin_upgrade(session: &Session, service: &Service) -> Option<Answer> {
    let cors = service.cors.as_ref()?;
    let req = session.req_header();
    if !session.is_upgrade_req() || cors.allows_origin_of(req) {
        return None;
    }
    Some(Answer::error(
        http::StatusCode::FORBIDDEN,
        "origin not allowed to upgrade",
    ))
}

/// The upstream answered an upgrade request with `101`: the handshake is settled for the
/// breaker and the trace, and from here on the session is a tunnel, whose reads and writes
/// on the client's side wait up to `timeouts.tunnel_idle` (instead of the request body's
/// `header_read_timeout`); the upstream side got the same when it connected.
fn open_tunnel(session: &mut Session, ctx: &mut RequestCtx) {
    let Some(service) = ctx.service else {
        return;
    };
    ctx.trace.attempt_ended(Some(101), None);
    ctx.open_tunnel();
    let idle = Some(service.timeouts.tunnel_idle);
    session.set_read_timeout(idle);
    session.set_write_timeout(idle);
}

/// When a rate limit is checked: before authentication unless it is per user.
#[derive(PartialEq, Eq)]
enum Stage {
    BeforeAuth,
    AfterAuth,
}

/// Counts the request against the service's rate limit, at the stage its key allows.
async fn rate_limit(
    session: &Session,
    service: &Service,
    ctx: &mut RequestCtx,
    stage: Stage,
) -> Option<Answer> {
    let limiter = service.rate_limit.as_ref()?;
    if limiter.needs_identity() != (stage == Stage::AfterAuth) {
        return None;
    }
    if session.subrequest_ctx.is_some() {
        // A cache refresh on behalf of a request that was counted already.
        return None;
    }
    let t = ctx.trace.phase_start();
    let subject = ctx.identity.as_ref().and_then(|i| i.subject.as_deref());
    let key = limiter.key_for(ctx.client.addr(), subject, &session.req_header().headers);
    let decision = limiter.check(&key).await;
    ctx.trace
        .phase_end(Phase::RateLimit, t, decision.rejection().is_some());
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

/// Answers from the cache, or keeps the cache's state for filling it from the upstream. A
/// cache refresh (a subrequest the cache asked for) goes upstream with its own state.
async fn cache_lookup(
    session: &mut Session,
    service: &Service,
    ctx: &mut RequestCtx,
) -> Option<Answer> {
    let cache = service.cache.as_ref()?;
    if session.is_upgrade_req() {
        // A handshake is never answered from a stored copy, and must not wait on another
        // handshake for the same URL as a cache miss would: its "response" lasts as long as
        // the tunnel.
        return None;
    }
    if let Some(refresh) = refresh_ticket(session) {
        ctx.cache = Some(CacheState::from(refresh));
        return None;
    }
    let t = ctx.trace.phase_start();
    let subject = ctx.identity.as_ref().and_then(|i| i.subject.as_deref());
    let session = &*session;
    let spawn = |refresh| spawn_refresh(session, refresh);
    let lookup = cache
        .lookup(session.req_header(), subject, is_tls(session), &spawn)
        .await;
    ctx.trace
        .phase_end(Phase::CacheLookup, t, matches!(lookup, Lookup::Hit(_)));
    match lookup {
        Lookup::Hit(served) => Some(Answer::Cached(served)),
        Lookup::Forward(state) => {
            ctx.cache = Some(state);
            None
        }
    }
}

/// Runs a cache refresh as a background subrequest of this request: a copy of its header
/// through the whole pipeline (auth, breaker, timeouts, retries), answering nobody.
fn spawn_refresh(session: &Session, refresh: Refresh) -> Result<(), Refresh> {
    let Some(spawner) = &session.subrequest_spawner else {
        return Err(refresh);
    };
    let ctx = SubrequestCtx::builder()
        .user_ctx(Box::new(Some(refresh)))
        .build();
    spawner.spawn_background_subrequest(session.as_ref(), ctx);
    Ok(())
}

/// The refresh this request was spawned for, if it is one.
fn refresh_ticket(session: &mut Session) -> Option<Refresh> {
    let user_ctx = session.subrequest_ctx.as_mut()?.user_ctx_mut()?;
    user_ctx.as_mut().downcast_mut::<Option<Refresh>>()?.take()
}

/// Picks the upstream for the first attempt: one whose health check passes and whose
/// breaker admits the request. When none does, the answer is given now, without touching the
/// network: a stale cached copy when there is one, else the fallback.
fn admit(session: &Session, service: &'static Service, ctx: &mut RequestCtx) -> Option<Answer> {
    let key = hash_key(session, service, ctx.client.addr());
    match service.pool.admit(&key, |_| true) {
        Some((index, permit)) => {
            let first = Attempt::planned(service, index, permit);
            let client_timeout = match service.protocol {
                Protocol::Grpc => grpc::timeout_of(session.req_header()),
                _ => None,
            };
            ctx.forwarding = Some(Forwarding::new(service, ctx.start, first, client_timeout));
            service.retry_budget.record_request();
            None
        }
        None => {
            service.metrics.circuit_rejected.inc();
            let stale = ctx
                .cache
                .as_mut()
                .and_then(|c| c.take_stale(session.req_header()));
            Some(match stale {
                Some(stale) => Answer::Cached(stale),
                None => Answer::Fallback,
            })
        }
    }
}

/// Counts the answered request and its durations, until `now`, in the service's metrics
/// (`none` when no route matched).
fn count_request(session: &Session, ctx: &RequestCtx, status: u16, now: Instant) {
    let method = session.req_header().method.as_str();
    let Some(service) = &ctx.service else {
        return metrics::count_request("none", method, status);
    };
    let m = &service.metrics;
    m.count_request(method, status);
    if ctx.tunnel.is_some() {
        // A tunnel lasts as long as its users like: its length is no latency.
        return;
    }
    let since = |t: Instant| now.saturating_duration_since(t).as_secs_f64();
    m.request_duration.observe(since(ctx.start));
    if let Some(t) = ctx.forwarding.as_ref().and_then(|f| f.first_attempt_at) {
        m.upstream_duration.observe(since(t));
    }
}

/// The current attempt failed on the upstream's side: its breaker and the error metric
/// hear of it.
fn upstream_failed(service: &Service, forwarding: &mut Forwarding, e: &Error) {
    forwarding.end_attempt(AttemptEvent::UpstreamFailed);
    service
        .metrics
        .upstream_error(errors::error_kind(e.etype()));
}

/// A timeout of a gRPC call whose `grpc-timeout` was shorter than anything the gateway
/// would wait: the client chose it, so it is no upstream failure and is not retried (else
/// any client could open a breaker by asking for tiny deadlines).
fn client_deadline_passed(forwarding: &Forwarding, e: &Error) -> bool {
    forwarding.client_deadline
        && matches!(
            e.etype(),
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
        )
}

/// Hands the request's spans to the exporter, when its trace is sampled.
fn finish_trace(session: &Session, ctx: &mut RequestCtx, status: u16, e: Option<&Error>) {
    if !ctx.trace.is_recording() {
        return;
    }
    // Taken out of the context, which the summary borrows; the request is over.
    let mut trace = std::mem::take(&mut ctx.trace);
    let req = session.req_header();
    let summary = RequestSummary {
        method: req.method.as_str(),
        path: req.uri.path(),
        route: ctx.route.as_ref().map(|r| r.prefix.as_str()),
        service: ctx.service_name(),
        status,
        client: session.client_addr().map(|a| a.to_string()),
        request_id: ctx.request_id.to_str().unwrap_or_default(),
        error: ctx.error.or(e.map(|e| e.etype().as_str())),
    };
    trace.finish(&summary);
}

fn no_retry(mut e: Box<Error>) -> Box<Error> {
    e.set_retry(false);
    e
}

/// What consistent hashing hashes for this request (empty for the other algorithms).
fn hash_key(session: &Session, service: &Service, client: &str) -> Vec<u8> {
    service
        .pool
        .hash_key(session.req_header(), || client.to_owned())
}
