//! The answers the gateway writes itself, without an upstream: JSON errors, CORS preflights,
//! refused tokens, cached copies and the service's fallback. Every one carries the request id
//! and the headers every answer of its service gets; errors have a JSON body, so a client
//! always gets a machine-readable reason and never a bare page. A gRPC client gets each
//! refusal as a gRPC status instead (`grpc`), since it cannot read a JSON body.

use super::context::RequestCtx;
use super::errors::{grpc, grpc_code};
use super::request_id::REQUEST_ID_HEADER;
use crate::cache::Served;
use crate::edge::auth::AuthError;
use crate::edge::forwarded::is_tls;
use crate::runtime::Service;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;
use pingora::Result;
use serde::Serialize;

/// What the gateway answers itself, without an upstream.
pub enum Answer {
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
    /// `OPTIONS *`: a question about the server, not a resource; no upstream is asked.
    ServerOptions,
}

impl Answer {
    /// `404` for a request no route matches.
    pub fn no_route(req: &RequestHeader) -> Answer {
        let path = req.uri.path();
        let body = ErrorBody::new("no route").detail(format!("no service is routed for {path}"));
        Answer::Error(StatusCode::NOT_FOUND, "no route", body, Vec::new())
    }

    /// A JSON error whose body is just the reason.
    pub fn error(status: StatusCode, reason: &'static str) -> Answer {
        Answer::Error(status, reason, ErrorBody::new(reason), Vec::new())
    }

    /// `400` for a request the gateway cannot judge safely, saying why.
    pub fn bad_request(reason: &'static str, detail: &'static str) -> Answer {
        let body = ErrorBody::new(reason).detail(detail);
        Answer::Error(StatusCode::BAD_REQUEST, reason, body, Vec::new())
    }

    /// Writes the answer and records why the gateway answered; `Ok(true)` tells Pingora the
    /// request is done.
    pub async fn send(self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        ctx.error = match &self {
            Answer::Error(_, reason, ..) => Some(reason),
            Answer::Preflight(_) => Some("cors preflight"),
            Answer::PreflightRejected => Some("cors preflight rejected"),
            Answer::Unauthorized(e) => Some(e.reason()),
            // Keeps the reason of a stale answer (the upstream's failure).
            Answer::Cached(_) => ctx.error,
            Answer::Fallback => Some("fallback"),
            Answer::ServerOptions => Some("options *"),
        };
        let ctx = &*ctx;
        let id = &ctx.request_id;
        let tls = is_tls(session);
        // A preflight carries its own CORS headers (none when refused); every answer gets
        // the rest.
        let with_cors = !matches!(self, Answer::Preflight(_) | Answer::PreflightRejected);
        let finish = |h: &mut ResponseHeader| ctx.decorate(h, tls, with_cors);
        // Cheap first (a cache hit is no refusal), then the request's content type.
        if let Some((code, message, headers)) = self.grpc_status() {
            if super::grpc::wants_grpc_answers(session.req_header(), ctx.service) {
                super::grpc::send_status(session, code, message, id, headers, &finish).await?;
                return Ok(true);
            }
        }
        match self {
            Answer::Error(status, _, mut body, headers) => {
                if let Some(service) = &ctx.service {
                    body = body.service(&service.name);
                }
                send_json(session, status, &body, id, &headers, &finish).await?;
            }
            Answer::Preflight(headers) => {
                let (status, empty) = (StatusCode::NO_CONTENT, Bytes::new());
                send(session, status, "text/plain", empty, id, &headers, &finish).await?;
            }
            Answer::PreflightRejected => {
                let body = ErrorBody::new("cors preflight rejected").service(ctx.service_name());
                let status = StatusCode::FORBIDDEN;
                send_json(session, status, &body, id, &[], &finish).await?;
            }
            Answer::Unauthorized(e) => {
                let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
                let challenge = [(http::header::WWW_AUTHENTICATE, e.www_authenticate_value())];
                let json = "application/json";
                send(session, status, json, e.body(), id, &challenge, &finish).await?;
            }
            Answer::Cached(served) => {
                let mut header = served.header;
                header.insert_prepared_header(&REQUEST_ID_HEADER, id.clone())?;
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
            Answer::ServerOptions => {
                let allow = [(
                    http::header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                )];
                let (status, empty) = (StatusCode::NO_CONTENT, Bytes::new());
                send(session, status, "text/plain", empty, id, &allow, &finish).await?;
            }
        }
        Ok(true)
    }
}

impl Answer {
    /// The refusal as a gRPC status, message and extra headers; `None` for what is no refusal
    /// (an allowed preflight, a cached copy, `OPTIONS *`).
    fn grpc_status(&self) -> Option<(u32, &'static str, &ExtraHeaders)> {
        match self {
            Answer::Error(status, reason, _, headers) => {
                Some((grpc_code(*status), reason, headers))
            }
            Answer::Unauthorized(e) => {
                let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
                Some((grpc_code(status), e.reason(), &[]))
            }
            Answer::PreflightRejected => {
                Some((grpc::PERMISSION_DENIED, "cors preflight rejected", &[]))
            }
            Answer::Fallback => Some((grpc::UNAVAILABLE, "no upstream available", &[])),
            Answer::Preflight(_) | Answer::Cached(_) | Answer::ServerOptions => None,
        }
    }
}

/// Answers with the service's fallback, with `Retry-After` unless the config sets one.
async fn send_fallback(
    session: &mut Session,
    service: &Service,
    request_id: &HeaderValue,
    finish: &Decorate<'_>,
) -> Result<()> {
    let fallback = &service.fallback;
    let mut headers = fallback.headers.clone();
    if !fallback.has_retry_after {
        headers.push((
            http::header::RETRY_AFTER,
            HeaderValue::from(service.pool.retry_after_secs()),
        ));
    }
    send(
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

/// Headers an answer adds to the usual ones (`Retry-After`, rate-limit state, ...).
type ExtraHeaders = [(HeaderName, HeaderValue)];

/// Adds the headers every answer of a service carries (security headers, CORS, ...).
pub type Decorate<'a> = dyn Fn(&mut ResponseHeader) + Send + Sync + 'a;

/// `{"error": ..., "service": ..., "upstream": ..., "detail": ...}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: error.into(),
            service: None,
            upstream: None,
            detail: None,
        }
    }

    pub fn service(mut self, service: &str) -> ErrorBody {
        self.service = Some(service.to_string());
        self
    }

    pub fn upstream(mut self, upstream: &str) -> ErrorBody {
        self.upstream = Some(upstream.to_string());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> ErrorBody {
        self.detail = Some(detail.into());
        self
    }
}

/// Writes a complete response with a JSON body built from `body`.
pub async fn send_json(
    session: &mut Session,
    status: StatusCode,
    body: &ErrorBody,
    request_id: &HeaderValue,
    extra_headers: &[(HeaderName, HeaderValue)],
    decorate: &Decorate<'_>,
) -> Result<()> {
    #[derive(Serialize)]
    struct WithId<'a> {
        #[serde(flatten)]
        body: &'a ErrorBody,
        request_id: &'a str,
    }
    let with_id = WithId {
        body,
        request_id: request_id.to_str().unwrap_or_default(),
    };
    let mut bytes = serde_json::to_vec(&with_id).unwrap_or_default();
    bytes.push(b'\n');
    send(
        session,
        status,
        "application/json",
        Bytes::from(bytes),
        request_id,
        extra_headers,
        decorate,
    )
    .await
}

/// Writes a complete response with the given body and content type.
pub async fn send(
    session: &mut Session,
    status: StatusCode,
    content_type: &str,
    body: Bytes,
    request_id: &HeaderValue,
    extra_headers: &[(HeaderName, HeaderValue)],
    decorate: &Decorate<'_>,
) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(4 + extra_headers.len()))?;
    header.insert_header(http::header::CONTENT_TYPE, content_type)?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    header.insert_prepared_header(&REQUEST_ID_HEADER, request_id.clone())?;
    for (name, value) in extra_headers {
        header.insert_header(name.clone(), value.clone())?;
    }
    decorate(&mut header);
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}
