//! The access log: one JSON line per request on stdout, for log shippers to pick up.

use pingora::proxy::Session;
use serde::Serialize;
use std::io::Write;
use std::time::{Duration, SystemTime};

/// What one line records.
pub struct Entry<'a> {
    pub session: &'a Session,
    pub request_id: &'a str,
    pub status: u16,
    pub service: &'a str,
    pub upstream: Option<&'a str>,
    pub attempts: usize,
    pub duration: Duration,
    pub error: Option<&'a str>,
    /// `X-Cache` result on cacheable routes.
    pub cache: Option<&'a str>,
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    request_id: &'a str,
    client: String,
    method: &'a str,
    host: &'a str,
    path: &'a str,
    status: u16,
    service: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    attempts: usize,
    duration_ms: f64,
    bytes_sent: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'a str>,
}

/// Writes the line for one finished request.
pub fn write(entry: &Entry<'_>) {
    let req = entry.session.req_header();
    let line = Line {
        ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        request_id: entry.request_id,
        client: entry
            .session
            .client_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
        method: req.method.as_str(),
        host: req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default(),
        path: req.uri.path(),
        status: entry.status,
        service: entry.service,
        upstream: entry.upstream,
        attempts: entry.attempts,
        duration_ms: (entry.duration.as_secs_f64() * 1e6).round() / 1e3,
        bytes_sent: entry.session.body_bytes_sent(),
        error: entry.error,
        cache: entry.cache,
    };
    let Ok(mut buf) = serde_json::to_vec(&line) else {
        return;
    };
    buf.push(b'\n');
    // One write per line keeps lines whole when several threads log at once; a closed
    // stdout must never take a request down, so errors are ignored.
    let _ = std::io::stdout().lock().write_all(&buf);
}
