//! Active health checks of a service's upstreams: the `health_check:` section, the probe
//! request compiled from it, and the check Pingora's load balancer runs in the background,
//! observed so that every result reaches the upstream's state (its health flag, metric and
//! circuit breaker). A service may ask for the gRPC health protocol instead
//! (`grpc.health.v1.Health/Check`), sent over the service's own HTTP/2 (h2 or h2c).

use super::peer::{Protocol, UpstreamTls};
use super::pool::HealthCheckLoop;
use super::state::Upstream;
use crate::values::PathPrefix;
use async_trait::async_trait;
use bytes::{Buf, Bytes, BytesMut};
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::lb::health_check::HealthCheck;
use pingora::lb::Backend;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::client::HttpSession;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::{Error, ErrorType, Result};
use serde::Deserialize;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// `health_check:` of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path requested with `GET`; any 2xx passes. Default: `/health`.
    #[serde(default = "default_health_path")]
    pub path: PathPrefix,
    /// Time between checks. Default: 5s.
    #[serde(
        default = "default_health_interval",
        deserialize_with = "crate::values::de_duration"
    )]
    pub interval: Duration,
    /// Connect and read timeout of one check. Default: 1s.
    #[serde(
        default = "default_health_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub timeout: Duration,
    /// `Host` header sent with every upstream's check. Default: the first upstream's
    /// `host:port` as written.
    #[serde(default)]
    pub host: Option<String>,
    /// Consecutive passes that make an unhealthy upstream healthy. Default: 1.
    #[serde(default = "default_one")]
    pub healthy_threshold: usize,
    /// Consecutive failures that make a healthy upstream unhealthy. Default: 1.
    #[serde(default = "default_one")]
    pub unhealthy_threshold: usize,
    /// Use the gRPC health protocol (`grpc.health.v1.Health/Check`) instead of `GET path`:
    /// the check passes when the call ends with `grpc-status` 0 and the answer is `SERVING`.
    /// Needs `protocol: grpc`, `h2` or `h2c`. Default: false.
    #[serde(default)]
    pub grpc: bool,
    /// The `service` asked about in the gRPC health request; empty asks about the server as
    /// a whole. Default: "".
    #[serde(default)]
    pub grpc_service: String,
}

fn default_one() -> usize {
    1
}
fn default_health_path() -> PathPrefix {
    PathPrefix("/health".into())
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}

/// A service's compiled health check: how often, and the probe Pingora sends.
pub struct HealthCheckPlan {
    pub interval: Duration,
    check: Probe,
}

/// The probe: `GET path`, or the gRPC health call.
enum Probe {
    Http(Box<HttpProbe>),
    Grpc(Box<GrpcHealthCheck>),
}

impl Probe {
    async fn check(&self, target: &Backend) -> Result<()> {
        match self {
            Probe::Http(check) => check.check(target).await,
            Probe::Grpc(check) => check.check(target).await,
        }
    }

    fn health_threshold(&self, success: bool) -> usize {
        match self {
            Probe::Http(check) => check.thresholds.of(success),
            Probe::Grpc(check) => check.thresholds.of(success),
        }
    }
}

impl HealthCheckConfig {
    /// Checks the settings and prepares the probe: `GET path` with the `Host` header (the
    /// first upstream's `host:port` unless `host` is set), the timeouts and the TLS settings
    /// of the service's upstreams.
    pub fn compile(
        &self,
        first_upstream: &str,
        tls: &UpstreamTls,
        protocol: Protocol,
    ) -> std::result::Result<HealthCheckPlan, String> {
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err("interval and timeout must be greater than zero".into());
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
            return Err("healthy_threshold and unhealthy_threshold must be at least 1".into());
        }
        let host = self.host.as_deref().unwrap_or(first_upstream);
        // Checked here, for the gRPC probe too, so that the error names the setting.
        if http::HeaderValue::from_str(host).is_err() {
            return Err(format!("host {host:?} is not a valid Host header value"));
        }
        if self.grpc {
            if !protocol.is_h2() {
                return Err("grpc: true needs the service's protocol: grpc, h2 or h2c".into());
            }
            let check = GrpcHealthCheck::new(self, host, tls, protocol)?;
            return Ok(HealthCheckPlan {
                interval: self.interval,
                check: Probe::Grpc(Box::new(check)),
            });
        }
        let invalid = |e: Box<Error>| format!("cannot build the health check request: {e}");
        let mut req = RequestHeader::build("GET", self.path.0.as_bytes(), None).map_err(invalid)?;
        req.insert_header("Host", host).map_err(invalid)?;
        req.insert_header("User-Agent", "breakwater-health-check")
            .map_err(invalid)?;
        Ok(HealthCheckPlan {
            interval: self.interval,
            check: Probe::Http(Box::new(HttpProbe {
                peer_template: self.probe_peer(host, tls, protocol),
                req,
                thresholds: self.thresholds(),
            })),
        })
    }

    /// The peer every probe of the service starts from (its address set per check): the
    /// service's TLS and protocol, connect and read within `timeout`.
    fn probe_peer(&self, host: &str, tls: &UpstreamTls, protocol: Protocol) -> HttpPeer {
        let sni = if tls.enabled {
            tls.sni_for(host)
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new("0.0.0.0:1", tls.enabled, sni);
        tls.apply(&mut peer);
        protocol.apply(&mut peer);
        // One stream per HTTP/2 connection: one with room for more would be kept in the
        // connector's pool and reused by the next check.
        peer.options.max_h2_streams = 1;
        peer.options.connection_timeout = Some(self.timeout);
        peer.options.total_connection_timeout = Some(self.timeout);
        peer.options.read_timeout = Some(self.timeout);
        peer
    }

    fn thresholds(&self) -> Thresholds {
        Thresholds {
            success: self.healthy_threshold,
            failure: self.unhealthy_threshold,
        }
    }
}

/// The connector every probe of the process connects with. Building one loads the CA bundle
/// into a TLS context (shared by HTTP/1 and HTTP/2 since the in-tree pingora-core patch):
/// tens of milliseconds and a few MiB, which one per service made start-up, every reload and
/// memory grow with the number of services.
/// Probes never return connections to its pools, so sharing it shares no connection.
fn probe_connector() -> &'static Connector {
    static CONNECTOR: OnceLock<Connector> = OnceLock::new();
    CONNECTOR.get_or_init(|| Connector::new(None))
}

/// `GET path` on a fresh connection each time (a pooled one can hide a broken path to the
/// upstream); any 2xx passes, and the body is read to its end.
struct HttpProbe {
    peer_template: HttpPeer,
    req: RequestHeader,
    thresholds: Thresholds,
}

impl HttpProbe {
    async fn check(&self, target: &Backend) -> Result<()> {
        let mut peer = self.peer_template.clone();
        peer._address = target.addr.clone();
        let (mut session, _) = probe_connector().get_http_session(&peer).await?;
        session
            .write_request_header(Box::new(self.req.clone()))
            .await?;
        session.finish_request_body().await?;
        session.set_read_timeout(peer.options.read_timeout);
        session.read_response_header().await?;
        let status = session.response_header().map(|h| h.status);
        match status {
            Some(status) if status.is_success() => {}
            status => {
                let code = status.map_or(0, |s| s.as_u16());
                return Error::e_explain(
                    ErrorType::CustomCode("health check status", code),
                    "non-2xx health check response",
                );
            }
        }
        while session.read_response_body().await?.is_some() {}
        Ok(())
    }
}

/// `healthy_threshold` and `unhealthy_threshold`.
struct Thresholds {
    success: usize,
    failure: usize,
}

impl Thresholds {
    fn of(&self, success: bool) -> usize {
        if success {
            self.success
        } else {
            self.failure
        }
    }
}

/// The gRPC health protocol's unary `Check` call over HTTP/2, on a fresh connection each time
/// (as the HTTP check: a pooled connection can hide a broken path to the upstream).
struct GrpcHealthCheck {
    peer_template: HttpPeer,
    req: RequestHeader,
    /// The framed `HealthCheckRequest`.
    body: Bytes,
    timeout: Duration,
    thresholds: Thresholds,
}

/// `grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;

impl GrpcHealthCheck {
    fn new(
        config: &HealthCheckConfig,
        host: &str,
        tls: &UpstreamTls,
        protocol: Protocol,
    ) -> std::result::Result<GrpcHealthCheck, String> {
        let invalid = |e: Box<Error>| format!("cannot build the gRPC health check request: {e}");
        let mut req =
            RequestHeader::build("POST", b"/grpc.health.v1.Health/Check", None).map_err(invalid)?;
        for (name, value) in [
            ("host", host),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "breakwater-health-check"),
        ] {
            req.insert_header(name, value).map_err(invalid)?;
        }
        Ok(GrpcHealthCheck {
            peer_template: config.probe_peer(host, tls, protocol),
            req,
            body: grpc_frame(&health_check_request(&config.grpc_service)),
            timeout: config.timeout,
            thresholds: config.thresholds(),
        })
    }

    async fn check(&self, target: &Backend) -> Result<()> {
        let mut peer = self.peer_template.clone();
        peer._address = target.addr.clone();
        // The whole call, connecting included, within the timeout.
        match tokio::time::timeout(self.timeout, self.call(&peer)).await {
            Ok(result) => result,
            Err(_) => Error::e_explain(ErrorType::ReadTimedout, "gRPC health check timed out"),
        }
    }

    async fn call(&self, peer: &HttpPeer) -> Result<()> {
        let (session, _) = probe_connector().get_http_session(peer).await?;
        let HttpSession::H2(mut session) = session else {
            return Error::e_explain(
                ErrorType::InvalidHTTPHeader,
                "the upstream did not speak HTTP/2 to the gRPC health check",
            );
        };
        session.read_timeout = Some(self.timeout);
        session.write_request_header(Box::new(self.req.clone()), false)?;
        session.write_request_body(self.body.clone(), true).await?;
        session.read_response_header().await?;
        let header = session.response_header().cloned();
        let mut body = BytesMut::new();
        while let Some(chunk) = session.read_response_body().await? {
            body.extend_from_slice(&chunk);
        }
        let trailers = session.read_trailers().await?;
        let header_status = header.as_ref().and_then(|h| grpc_status(&h.headers));
        let status = trailers.as_ref().and_then(grpc_status).or(header_status);
        if let Some(h) = &header {
            if !h.status.is_success() {
                return health_failure(h.status.as_u16().into(), "gRPC health check HTTP status");
            }
        }
        match status {
            Some(0) => {}
            Some(code) => return health_failure(code, "gRPC health check status"),
            None => return health_failure(2, "gRPC health check without grpc-status"),
        }
        match serving_status(&body) {
            Some(SERVING) => Ok(()),
            other => health_failure(
                other.unwrap_or(0) as u32,
                "gRPC health check: the upstream is not SERVING",
            ),
        }
    }
}

fn health_failure(code: u32, what: &'static str) -> Result<()> {
    Error::e_explain(ErrorType::CustomCode(what, code as u16), what)
}

/// The `grpc-status` header or trailer.
fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    std::str::from_utf8(headers.get("grpc-status")?.as_bytes())
        .ok()?
        .parse()
        .ok()
}

/// `HealthCheckRequest { string service = 1; }` in protobuf's wire form.
fn health_check_request(service: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    message
}

/// A gRPC length-prefixed message: not compressed, 4-byte big-endian length, the message.
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    Bytes::from(frame)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *buf.first()?;
        buf.advance(1);
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The `status` of the first `HealthCheckResponse` in a gRPC response body (0, UNKNOWN, when
/// the field is absent, as protobuf leaves defaults out); `None` when the body is malformed or
/// compressed.
fn serving_status(body: &[u8]) -> Option<u64> {
    let (&compressed, rest) = body.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if compressed != 0 {
        return None;
    }
    let mut message = rest.get(4..4 + len)?;
    let mut status = 0;
    while !message.is_empty() {
        let key = get_varint(&mut message)?;
        match key & 7 {
            0 => {
                let value = get_varint(&mut message)?;
                if key >> 3 == 1 {
                    status = value;
                }
            }
            2 => {
                let n = get_varint(&mut message)? as usize;
                message = message.get(n..)?;
            }
            1 => message = message.get(8..)?,
            5 => message = message.get(4..)?,
            _ => return None,
        }
    }
    Some(status)
}

impl HealthCheckPlan {
    /// The check to hand to the load balancer, reporting to `upstreams`' state.
    pub(super) fn observe(self, service: &str, upstreams: &[Arc<Upstream>]) -> ObservedHealthCheck {
        ObservedHealthCheck {
            service: service.to_string(),
            inner: self.check,
            upstreams: upstreams.to_vec(),
        }
    }
}

/// Pingora's HTTP health check, observed so that results reach the upstream's state
/// (metrics now, the circuit breaker too) on every check, not only on a health flip.
pub(super) struct ObservedHealthCheck {
    service: String,
    inner: Probe,
    upstreams: Vec<Arc<Upstream>>,
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
            // The upstream keeps its own verdict (Pingora's flips are not used) so that a
            // reloaded process can start from the verdict its predecessor reached.
            let passed = result.is_ok();
            upstream.observe_health(&self.service, passed, self.inner.health_threshold(passed));
        }
        result
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.inner.health_threshold(success)
    }
}

/// Every service's health check loop, side by side on one background service. One service
/// each meant a Tokio runtime and a thread per health-checked service, and the memory that
/// goes with them.
pub struct HealthChecks(Vec<HealthCheckLoop>);

impl HealthChecks {
    pub fn new(loops: Vec<HealthCheckLoop>) -> HealthChecks {
        HealthChecks(loops)
    }
}

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, shutdown: ShutdownWatch) {
        let mut loops = tokio::task::JoinSet::new();
        for check in &self.0 {
            let (check, shutdown) = (Arc::clone(check), shutdown.clone());
            loops.spawn(async move { check.start(shutdown).await });
        }
        // Each loop returns at shutdown; one that panicked leaves the others running.
        while loops.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> HealthCheckConfig {
        serde_yaml::from_str(yaml).expect("health_check yaml")
    }

    fn plain() -> UpstreamTls {
        UpstreamTls {
            enabled: false,
            sni: None,
            verify: true,
        }
    }

    fn http_probe(plan: &HealthCheckPlan) -> &HttpProbe {
        match &plan.check {
            Probe::Http(check) => check,
            Probe::Grpc(_) => panic!("an HTTP probe was expected"),
        }
    }

    #[test]
    fn the_probe_asks_the_first_upstream_unless_a_host_is_set() {
        let plan = config("{path: /ready}")
            .compile("10.0.0.1:80", &plain(), Protocol::Http1)
            .unwrap();
        assert_eq!(http_probe(&plan).req.uri.path(), "/ready");
        assert_eq!(http_probe(&plan).req.headers["host"], "10.0.0.1:80");
        let plan = config("{host: api.internal}")
            .compile("10.0.0.1:80", &plain(), Protocol::Http1)
            .unwrap();
        assert_eq!(http_probe(&plan).req.headers["host"], "api.internal");
    }

    #[test]
    fn the_probe_speaks_the_services_protocol() {
        let plan = config("{}")
            .compile("10.0.0.1:80", &plain(), Protocol::H2c)
            .unwrap();
        let alpn = &http_probe(&plan).peer_template.options.alpn;
        assert_eq!(*alpn, pingora::protocols::ALPN::H2);
        let plan = config("{grpc: true}")
            .compile("10.0.0.1:80", &plain(), Protocol::Grpc)
            .unwrap();
        assert!(matches!(plan.check, Probe::Grpc(_)));
    }

    #[test]
    fn bad_settings_are_refused_when_compiled() {
        let refused = |yaml: &str, needle: &str| {
            let err = config(yaml)
                .compile("10.0.0.1:80", &plain(), Protocol::Http1)
                .err()
                .unwrap();
            assert!(err.contains(needle), "{yaml}: {err}");
        };
        refused("{interval: 0s}", "greater than zero");
        refused("{healthy_threshold: 0}", "at least 1");
        // Not a header value: refused with the config, not at the first check.
        refused("{host: \"a\\u0001b\"}", "not a valid Host header value");
        refused("{grpc: true}", "needs the service's protocol");
    }

    #[test]
    fn health_messages_in_protobufs_wire_form() {
        assert_eq!(health_check_request(""), b"");
        assert_eq!(health_check_request("svc"), b"\x0a\x03svc");
        assert_eq!(&grpc_frame(b"ab")[..], b"\0\0\0\0\x02ab");
        assert_eq!(serving_status(&grpc_frame(b"\x08\x01")), Some(SERVING));
        assert_eq!(serving_status(&grpc_frame(b"\x08\x02")), Some(2));
        // Absent field: the default, UNKNOWN; unknown fields are skipped.
        assert_eq!(serving_status(&grpc_frame(b"")), Some(0));
        assert_eq!(
            serving_status(&grpc_frame(b"\x12\x01x\x08\x01")),
            Some(SERVING)
        );
        // Truncated or compressed: no verdict.
        assert_eq!(serving_status(b"\0\0\0\0\x05\x08"), None);
        assert_eq!(serving_status(b"\x01\0\0\0\x02\x08\x01"), None);
    }
}
