//! The admin listener: liveness (`/health`), readiness (`/ready`), Prometheus metrics
//! (`/metrics`), breaker states (`/admin/circuits`), the live status page (`/status`,
//! `/status.json`) and cache purges (`/admin/cache`).
//!
//! It is a separate Pingora service on its own port, loopback by default, so nothing here is
//! reachable through the public listeners. Reading needs no credential; every endpoint that
//! changes something needs the admin token (`Authorization: Bearer`) when one is configured,
//! and without one answers only on a loopback listener.

use crate::cache::CacheError;
use crate::config::AdminToken;
use crate::ops::lifecycle::LIFECYCLE;
use crate::ops::metrics::METRICS;
use crate::ops::status::{self, StatusHistory};
use crate::redis::RedisReadiness;
use crate::runtime::Runtime;
use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The admin HTTP application.
pub struct AdminApp {
    runtime: Arc<Runtime>,
    writes: WriteAccess,
    history: Arc<StatusHistory>,
}

/// Who may use the endpoints that change something.
pub enum WriteAccess {
    /// Whoever presents this token.
    Token(AdminToken),
    /// Anyone who reaches the listener, which is on loopback.
    Loopback,
    /// Nobody: no token, and the listener is reachable from other hosts.
    Refused,
}

impl WriteAccess {
    /// The rule for a listener on `listen` with an optional token.
    pub fn new(token: Option<AdminToken>, listen: std::net::SocketAddr) -> WriteAccess {
        match token {
            Some(token) => WriteAccess::Token(token),
            None if listen.ip().is_loopback() => WriteAccess::Loopback,
            None => WriteAccess::Refused,
        }
    }

    /// `None` when the request may write, else the answer refusing it.
    fn check(&self, req: &pingora::http::RequestHeader) -> Option<Response<Vec<u8>>> {
        match self {
            WriteAccess::Loopback => None,
            WriteAccess::Token(token) => {
                let presented = req
                    .headers
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes());
                if token.accepts(presented) {
                    return None;
                }
                let mut resp = json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error": "admin token required: Authorization: Bearer <token>"}),
                );
                resp.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer realm=\"breakwater admin\""),
                );
                Some(resp)
            }
            WriteAccess::Refused => Some(json(
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": "admin writes are refused: the admin listener is not on loopback and no admin.token_env or admin.token_file is set"}),
            )),
        }
    }
}

impl AdminApp {
    pub fn new(
        runtime: Arc<Runtime>,
        writes: WriteAccess,
        history: Arc<StatusHistory>,
    ) -> AdminApp {
        AdminApp {
            runtime,
            writes,
            history,
        }
    }

    /// `GET /ready`: 200 once the listeners are up and, when a rate limit or the cache uses
    /// Redis, the first Redis connection is up or `redis.connect_timeout` has passed (then
    /// ready but degraded); 503 while starting or draining.
    fn ready(&self) -> Response<Vec<u8>> {
        if !LIFECYCLE.is_ready() {
            let state = if LIFECYCLE.is_draining() {
                "draining"
            } else {
                "starting"
            };
            return json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": state}),
            );
        }
        let redis = match &self.runtime.redis {
            Some(redis) if self.runtime.redis_needed => redis.readiness(),
            _ => return json(StatusCode::OK, serde_json::json!({"status": "ready"})),
        };
        match redis {
            RedisReadiness::Connected => {
                json(StatusCode::OK, serde_json::json!({"status": "ready"}))
            }
            RedisReadiness::Degraded => json(
                StatusCode::OK,
                serde_json::json!({"status": "ready", "degraded": ["redis"]}),
            ),
            RedisReadiness::Waiting => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "waiting for redis"}),
            ),
        }
    }

    /// `DELETE /admin/cache?prefix=/users/1[&service=users]`.
    async fn purge_cache(&self, query: Option<&str>) -> Response<Vec<u8>> {
        let Some(cache) = &self.runtime.cache else {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "no service has a cache"}),
            );
        };
        let mut prefix = None;
        let mut service = None;
        for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match k.as_ref() {
                "prefix" => prefix = Some(v.into_owned()),
                "service" => service = Some(v.into_owned()),
                _ => {}
            }
        }
        let Some(prefix) = prefix else {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "missing prefix, e.g. ?prefix=/users/1"}),
            );
        };
        match cache.purge(&prefix, service.as_deref()).await {
            Ok(purged) => json(StatusCode::OK, serde_json::json!({ "purged": purged })),
            Err(CacheError::InvalidPurge(e)) => {
                json(StatusCode::BAD_REQUEST, serde_json::json!({ "error": e }))
            }
            Err(e) => json(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": e.to_string() }),
            ),
        }
    }

    /// Every breaker's state, by service and upstream.
    fn circuits(&self) -> serde_json::Value {
        let services: serde_json::Map<String, serde_json::Value> = self
            .runtime
            .services
            .iter()
            .map(|service| {
                let upstreams: Vec<serde_json::Value> = service
                    .pool
                    .upstreams
                    .iter()
                    .map(|u| {
                        let snap = u.breaker.snapshot();
                        serde_json::json!({
                            "upstream": u.name,
                            "state": snap.state.as_str(),
                            "healthy": u.is_healthy(),
                            "in_flight": u.in_flight.load(Ordering::Relaxed),
                            "consecutive_failures": snap.consecutive_failures,
                            "window_calls": snap.window_calls,
                            "window_failures": snap.window_failures,
                            "reset_timeout_ms": snap.current_reset_timeout.as_millis() as u64,
                            "retry_after_ms": snap.retry_after.map(|d| d.as_millis() as u64),
                            "probes_in_flight": snap.probes_in_flight,
                        })
                    })
                    .collect();
                (
                    service.name.clone(),
                    serde_json::json!({ "upstreams": upstreams }),
                )
            })
            .collect();
        serde_json::json!({ "services": services })
    }
}

fn json(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    bytes.push(b'\n');
    reply(status, "application/json", bytes)
}

/// A page asset, embedded in the binary, with headers that keep it to itself: its script
/// and style come from this listener only, and no other site may frame it.
fn page(body: &'static str, content_type: &str) -> Response<Vec<u8>> {
    let mut resp = reply(
        StatusCode::OK,
        &format!("{content_type}; charset=utf-8"),
        body.as_bytes().to_vec(),
    );
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
             img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::REFERRER_POLICY,
        http::HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.clone();
        let path = req.uri.path().to_string();
        match (method, path.as_str()) {
            (Method::GET | Method::HEAD, "/health") => {
                json(StatusCode::OK, serde_json::json!({"status": "ok"}))
            }
            (Method::GET | Method::HEAD, "/ready") => self.ready(),
            (Method::GET | Method::HEAD, "/status") => page(status::PAGE_HTML, "text/html"),
            (Method::GET | Method::HEAD, "/status.js") => page(status::PAGE_JS, "text/javascript"),
            (Method::GET | Method::HEAD, "/status.css") => page(status::PAGE_CSS, "text/css"),
            (Method::GET | Method::HEAD, "/status.json") => json(
                StatusCode::OK,
                status::status_json(&self.runtime, &self.history),
            ),
            (Method::GET | Method::HEAD, "/admin/circuits") => {
                json(StatusCode::OK, self.circuits())
            }
            (Method::GET | Method::HEAD, "/metrics") => {
                if let Some(cache) = &self.runtime.cache {
                    cache.refresh_metrics();
                }
                if let Some(redis) = &self.runtime.redis {
                    redis.refresh_metrics();
                }
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    METRICS.encode(),
                )
            }
            (Method::DELETE, "/admin/cache") => match self.writes.check(req) {
                Some(refused) => refused,
                None => self.purge_cache(req.uri.query()).await,
            },
            (
                _,
                "/health" | "/ready" | "/metrics" | "/admin/circuits" | "/admin/cache" | "/status"
                | "/status.js" | "/status.css" | "/status.json",
            ) => json(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({"error": "method not allowed"}),
            ),
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not found", "path": path}),
            ),
        }
    }
}
