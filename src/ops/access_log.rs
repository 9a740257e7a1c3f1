//! The access log: one JSON line per request on stdout, for log shippers to pick up.
//!
//! Request threads hand finished lines to one writer thread, which writes whatever has queued
//! up with a single `write`: a syscall per request is a measurable share of a proxied request,
//! and a slow stdout (a full pipe) then delays logging, not requests. Lines queued in the
//! last moments before the process exits can be lost.

use crate::edge::forwarded::Client;
use pingora::proxy::Session;
use serde::Serialize;
use std::io::Write;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// How long the writer lets lines gather before writing them.
const BATCH_INTERVAL: Duration = Duration::from_millis(20);
/// Lines waiting beyond this are dropped rather than buffered without bound.
const MAX_QUEUED_BYTES: usize = 8 << 20;

struct Writer {
    lines: Sender<Vec<u8>>,
    queued: std::sync::atomic::AtomicUsize,
}

/// Started on first use, so after Pingora has daemonised (a fork keeps no threads).
fn writer() -> &'static Writer {
    static WRITER: OnceLock<Writer> = OnceLock::new();
    WRITER.get_or_init(|| {
        let (lines, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("access log".into())
            .spawn(move || write_lines(rx));
        if let Err(e) = spawned {
            log::error!("cannot start the access log writer: {e}");
        }
        Writer {
            lines,
            queued: std::sync::atomic::AtomicUsize::new(0),
        }
    })
}

fn write_lines(rx: Receiver<Vec<u8>>) {
    let mut batch = Vec::with_capacity(64 << 10);
    while let Ok(first) = rx.recv() {
        // Let lines gather: one wake-up and one write per interval instead of per request.
        std::thread::sleep(BATCH_INTERVAL);
        batch.clear();
        batch.extend_from_slice(&first);
        while batch.len() < (4 << 20) {
            match rx.try_recv() {
                Ok(line) => batch.extend_from_slice(&line),
                Err(_) => break,
            }
        }
        writer()
            .queued
            .fetch_sub(batch.len(), std::sync::atomic::Ordering::Relaxed);
        // A closed or broken stdout must never take a request down: errors are dropped.
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(&batch);
        let _ = out.flush();
    }
}

/// What one line records.
pub struct Entry<'a> {
    pub session: &'a Session,
    pub request_id: &'a str,
    pub client: &'a Client,
    /// The request target as sent, when normalizing changed it.
    pub original_target: Option<&'a str>,
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
    ts: &'a str,
    request_id: &'a str,
    /// The client's address: the TCP peer, or behind trusted proxies the address they saw.
    client: &'a str,
    /// The TCP peer (`ip:port`), when it is a trusted proxy rather than the client.
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<String>,
    method: &'a str,
    host: &'a str,
    /// The normalized path: what was routed and forwarded.
    path: &'a str,
    /// The target as sent, when it was not normal.
    #[serde(skip_serializing_if = "Option::is_none")]
    raw_target: Option<&'a str>,
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

/// The current time, RFC 3339 with milliseconds; formatted once per millisecond per thread,
/// since many requests share one.
fn timestamp() -> std::rc::Rc<str> {
    thread_local! {
        static LAST: std::cell::RefCell<(u128, std::rc::Rc<str>)> =
            std::cell::RefCell::new((0, std::rc::Rc::from("")));
    }
    let now = SystemTime::now();
    let ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != ms {
            *last = (
                ms,
                std::rc::Rc::from(humantime::format_rfc3339_millis(now).to_string()),
            );
        }
        std::rc::Rc::clone(&last.1)
    })
}

/// Writes the line for one finished request.
pub fn write(entry: &Entry<'_>) {
    let req = entry.session.req_header();
    let ts = timestamp();
    let line = Line {
        ts: &ts,
        request_id: entry.request_id,
        client: &entry.client.addr,
        peer: entry
            .client
            .via_trusted_proxy
            .then(|| entry.session.client_addr().map(|a| a.to_string()))
            .flatten(),
        method: req.method.as_str(),
        host: req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default(),
        path: req.uri.path(),
        raw_target: entry.original_target,
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
    let w = writer();
    let queued = w
        .queued
        .fetch_add(buf.len(), std::sync::atomic::Ordering::Relaxed);
    if queued > MAX_QUEUED_BYTES {
        w.queued
            .fetch_sub(buf.len(), std::sync::atomic::Ordering::Relaxed);
        return;
    }
    let _ = w.lines.send(buf);
}
