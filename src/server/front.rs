//! The connection front: Breakwater's own Pingora `ServerApp` in front of the HTTP proxy.
//!
//! Pingora's HTTP/1 server reads a request header with a fixed 60 s timeout per read and no
//! bound on the whole header, and between requests it parks a connection inside the proxy's
//! request future with a 64 KiB read buffer attached: a client trickling one header line a
//! second holds a connection forever, and each idle keep-alive client costs about 90 KiB.
//! The front owns each client connection between requests instead:
//!
//! - it counts connections and closes new ones at once beyond `server.max_connections`;
//! - it waits for the next request for at most `server.keepalive_timeout` (the first request
//!   of a connection: at most `limits.header_read_timeout`): for `READ_AHEAD` with the header
//!   buffer ready, so that a busy client's request is read in one system call, and then with
//!   no buffer attached (a few dozen bytes on the stack);
//! - it reads the request line and headers under one deadline (`limits.header_read_timeout`
//!   from their first byte) and size bound (the largest `limits.max_header_size`), answering
//!   `408` or `431` itself;
//! - it hands the bytes to Pingora's HTTP/1 session as a pipelined prefix, so Pingora parses
//!   them as if it had read them, and takes the connection back when the exchange is done;
//! - it awaits the proxy's request future in place (the pingora-proxy patch), in a future
//!   boxed once per run of requests that follow one another within `READ_AHEAD`, where
//!   Pingora boxes (and copies) each request's several KB of state;
//! - HTTP/2 (ALPN `h2` on TLS, or the h2c preface when `server.h2c` is on) goes to Pingora's
//!   own HTTP/2 handling;
//! - once the process drains (a reload handed the listeners over, or shutdown), a connection
//!   that has been idle for `DRAIN_IDLE` is closed, and a request that still arrives is
//!   answered with `Connection: close`; a fresh connection still gets its first request
//!   answered, since the client sent it to us.

use bytes::{BufMut, BytesMut};
use memchr::memmem;
use once_cell::sync::Lazy;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ReusedHttpStream, ServerApp};
use pingora::connectors::http::custom;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{Stream, ALPN};
use pingora::proxy::{HttpProxy, ProxyHttp};
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntCounterVec, IntGauge};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

/// How long a connection may sit idle, once the process drains, before it is closed. Long
/// enough that a client which just got a response and is sending its next request on the
/// same connection gets it answered (with `Connection: close`) rather than cut off.
pub const DRAIN_IDLE: Duration = Duration::from_millis(250);

/// How long a connection keeps a header buffer while it waits for its next request. A busy
/// keep-alive client's next request mostly comes within it and is read in one system call
/// into the buffer Pingora then parses from; a connection quiet for longer gives the buffer
/// back and waits with none (see `FIRST_READ`).
const READ_AHEAD: Duration = Duration::from_millis(100);

/// Past `READ_AHEAD`, the first read of a request goes to a buffer this size on the stack, so
/// an idle connection holds no heap buffer; most API request headers are longer and take one
/// more read.
const FIRST_READ: usize = 64;

/// The HTTP/2 connection preface a prior-knowledge (h2c) client starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Buffer capacity a request header is read into (Pingora's own starting size).
const HEADER_BUFFER: usize = 4096;

/// What the front enforces, from the config.
#[derive(Debug, Clone)]
pub struct FrontSettings {
    /// Whole-header deadline, and the longest wait for a connection's first request.
    pub header_timeout: Duration,
    /// Longest idle wait between two requests of a keep-alive connection.
    pub keepalive_timeout: Duration,
    /// Largest request header block read; larger ones get `431`.
    pub max_header_size: usize,
    /// Open client connections allowed; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// Accept HTTP/2 with prior knowledge (h2c) on plain listeners.
    pub h2c: bool,
    /// Keep each request header name's spelling as the client sent it
    /// (`server.header_name_case: preserve`); otherwise the request header is built without
    /// that record, rather than built with one that the request filter then drops.
    pub keep_header_case: bool,
}

/// Connection counts, registered in the gateway's registry.
struct ConnectionMetrics {
    active: IntGauge,
    accepted: IntCounter,
    refused: IntCounter,
    closed_header_timeout: IntCounter,
    closed_header_too_large: IntCounter,
}

static CONNECTION_METRICS: Lazy<ConnectionMetrics> = Lazy::new(|| {
    use crate::ops::metrics::{register_counter, register_gauge, METRICS};
    let r = &METRICS.registry;
    let closed: IntCounterVec = register_counter(
        r,
        "breakwater_connections_closed_total",
        "Client connections the gateway closed before a request was complete, by reason.",
        &["reason"],
    );
    ConnectionMetrics {
        active: register_gauge(
            r,
            "breakwater_connections_active",
            "Client connections open right now (HTTP/1 and HTTP/2, plain and TLS).",
            &[],
        )
        .with_label_values::<&str>(&[]),
        accepted: register_counter(
            r,
            "breakwater_connections_total",
            "Client connections accepted and served (refused ones are not counted here).",
            &[],
        )
        .with_label_values::<&str>(&[]),
        refused: register_counter(
            r,
            "breakwater_connections_refused_total",
            "Client connections closed at once because server.max_connections were open.",
            &[],
        )
        .with_label_values::<&str>(&[]),
        closed_header_timeout: closed.with_label_values(&["header_timeout"]),
        closed_header_too_large: closed.with_label_values(&["header_too_large"]),
    }
});

/// Registers the connection metrics, so `/metrics` shows them before the first connection.
pub fn register_metrics() {
    Lazy::force(&CONNECTION_METRICS);
}

/// Pingora's HTTP application, with a way to serve one HTTP/1 request whose future the front
/// awaits in place. [`HttpServerApp::process_new_http`] boxes it: an allocation and a copy of
/// the whole request state (about 8.7 KB for the proxy) per request. The proxy's own method
/// comes from the pingora-proxy patch (patches/README.md).
pub trait InPlaceHttpApp: HttpServerApp {
    fn process_new_http_in_place<'a>(
        self: &'a Arc<Self>,
        session: ServerSession,
        shutdown: &'a ShutdownWatch,
    ) -> impl Future<Output = Option<ReusedHttpStream>> + Send + 'a;
}

impl<SV, C> InPlaceHttpApp for HttpProxy<SV, C>
where
    SV: ProxyHttp + Send + Sync + 'static,
    <SV as ProxyHttp>::CTX: Send + Sync,
    C: custom::Connector,
{
    fn process_new_http_in_place<'a>(
        self: &'a Arc<Self>,
        session: ServerSession,
        shutdown: &'a ShutdownWatch,
    ) -> impl Future<Output = Option<ReusedHttpStream>> + Send + 'a {
        self.process_new_http_unboxed(session, shutdown)
    }
}

/// The front of one listening service, in front of Pingora's HTTP application `A` (the proxy).
pub struct Front<A> {
    app: Arc<A>,
    settings: FrontSettings,
    open: AtomicUsize,
    stopped: Arc<AcceptStopped>,
}

impl<A> Front<A> {
    pub fn new(app: A, settings: FrontSettings) -> Front<A> {
        register_metrics();
        Front {
            app: Arc::new(app),
            settings,
            open: AtomicUsize::new(0),
            stopped: Arc::default(),
        }
    }

    /// Tells when the service's listeners stopped accepting (a reload hands the listening
    /// sockets over, then waits for this before the successor starts accepting).
    pub fn accept_stopped(&self) -> Arc<AcceptStopped> {
        Arc::clone(&self.stopped)
    }
}

/// Set once every accept loop of a listening service has ended.
#[derive(Debug, Default)]
pub struct AcceptStopped {
    stopped: std::sync::Mutex<bool>,
    changed: std::sync::Condvar,
}

impl AcceptStopped {
    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
    }

    /// Waits (blocking the thread) until the accept loops stopped or `timeout` passed;
    /// true when they stopped.
    pub fn wait(&self, timeout: Duration) -> bool {
        let guard = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, timeout, |stopped| !*stopped)
            .unwrap_or_else(|e| e.into_inner());
        *guard
    }
}

/// One open connection: counted while it lives.
struct Open<'a>(&'a AtomicUsize);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        CONNECTION_METRICS.active.dec();
    }
}

/// How waiting for a request header ended, when no header came.
enum NoRequest {
    /// Closed, reset, idle too long, or drained: close quietly.
    Gone,
    /// Part of a header arrived, the rest did not in time.
    TimedOut,
    /// The header grew past the limit.
    TooLarge,
}

impl<A> Front<A>
where
    A: InPlaceHttpApp + Send + Sync + 'static,
{
    /// Serves HTTP/1 requests on `stream` until the connection closes: runs of requests
    /// that follow one another within `READ_AHEAD` (`serve_busy`), and quiet waits between
    /// them that hold neither a buffer nor a request's state.
    async fn serve_http1(&self, mut stream: Stream, shutdown: &ShutdownWatch) {
        let mut persistent: Option<HttpPersistentSettings> = None;
        let mut served = 0u64;
        let mut first = None;
        loop {
            // Boxed once per run, not per request as Pingora's own loop does (the request's
            // future is several KB, copied into its box), and not kept inline either: an idle
            // connection would then hold that much for as long as it stays open.
            let busy =
                self.serve_busy(stream, first.take(), &mut persistent, &mut served, shutdown);
            let Some((returned, idle_since)) = Box::pin(busy).await else {
                return;
            };
            stream = returned;
            match self
                .wait_quietly(&mut stream, shutdown, served > 0, idle_since)
                .await
            {
                Ok(head) => first = Some(head),
                Err(why) => return close_without_request(&mut stream, why).await,
            }
        }
    }

    /// Serves requests on `stream` as long as each next one starts within `READ_AHEAD`,
    /// starting with `first` (bytes of a request already read) if given. Gives the stream
    /// back, with when it went idle, once the connection is quiet; `None` once it closed.
    async fn serve_busy(
        &self,
        mut stream: Stream,
        mut first: Option<BytesMut>,
        persistent: &mut Option<HttpPersistentSettings>,
        served: &mut u64,
        shutdown: &ShutdownWatch,
    ) -> Option<(Stream, Instant)> {
        // One shutdown watcher for the whole run: a watcher cloned and dropped per request,
        // and its value read under its lock, were six atomic operations a request.
        let mut drain = Drain::new(shutdown);
        // One timer for the whole run, moved only when it fires, rather than one armed and
        // cancelled for every request (see `wait_and_read`).
        let timer = tokio::time::sleep_until(Instant::now() + READ_AHEAD);
        tokio::pin!(timer);
        loop {
            let start = match first.take() {
                Some(start) => Ok(start),
                None => {
                    let idle_since = Instant::now();
                    match self
                        .read_ahead(
                            &mut stream,
                            &mut drain,
                            *served > 0,
                            idle_since,
                            timer.as_mut(),
                        )
                        .await
                    {
                        Ok(Some(start)) => Ok(start),
                        Ok(None) => return Some((stream, idle_since)),
                        Err(why) => Err(why),
                    }
                }
            };
            let head = match start {
                Ok(start) => self.complete_head(&mut stream, start).await,
                Err(why) => Err(why),
            };
            let head = match head {
                Ok(head) => head,
                Err(why) => {
                    close_without_request(&mut stream, why).await;
                    return None;
                }
            };
            let mut session = ServerSession::new_http1(stream);
            session.set_keep_header_case(self.settings.keep_header_case);
            session.set_keepalive(Some(self.settings.keepalive_timeout.as_secs()));
            if let Some(settings) = persistent.take() {
                settings.apply_to_session(&mut session);
            }
            session.set_pipelined_prefix(head);
            // The proxy closes the connection itself when it cannot be reused, and answers
            // `Connection: close` once shutdown has begun.
            let reused = self
                .app
                .process_new_http_in_place(session, shutdown)
                .await?;
            (stream, *persistent) = reused.consume();
            *served += 1;
        }
    }

    /// Waits up to `READ_AHEAD` for the next request with the header buffer ready: its first
    /// bytes, or `None` if none came.
    async fn read_ahead(
        &self,
        stream: &mut Stream,
        drain: &mut Drain,
        reused: bool,
        idle_since: Instant,
        timer: Pin<&mut Sleep>,
    ) -> Result<Option<BytesMut>, NoRequest> {
        let mut head = BytesMut::with_capacity(HEADER_BUFFER);
        let window = Some(idle_since + READ_AHEAD);
        let read = self
            .wait_and_read(stream, drain, reused, idle_since, window, timer, &mut head)
            .await?;
        Ok(read.map(|_| head))
    }

    /// Waits on for the next request with no heap buffer held, idle since `idle_since`, and
    /// returns its first bytes.
    async fn wait_quietly(
        &self,
        stream: &mut Stream,
        shutdown: &ShutdownWatch,
        reused: bool,
        idle_since: Instant,
    ) -> Result<BytesMut, NoRequest> {
        let mut first = [0u8; FIRST_READ];
        let mut unfilled = &mut first[..];
        // Already due: `wait_and_read` moves it to the wait's deadline when it first fires.
        let timer = tokio::time::sleep_until(idle_since);
        tokio::pin!(timer);
        let n = self
            .wait_and_read(
                stream,
                &mut Drain::new(shutdown),
                reused,
                idle_since,
                None,
                timer,
                &mut unfilled,
            )
            .await?
            .ok_or(NoRequest::Gone)?;
        let mut head = BytesMut::with_capacity(HEADER_BUFFER.max(n));
        head.extend_from_slice(&first[..n]);
        Ok(head)
    }

    /// Reads on until `head` holds the whole request header, under the header deadline and
    /// size bound. The bytes may run past the header (a body, or pipelined requests);
    /// Pingora's session takes them all.
    async fn complete_head(
        &self,
        stream: &mut Stream,
        mut head: BytesMut,
    ) -> Result<BytesMut, NoRequest> {
        // Taken when a read is first needed: mostly the first read brought the whole header,
        // and a clock read is some 20 ns.
        let mut deadline = None;
        let mut scanned = 0;
        while !header_complete(&head, scanned) {
            if head.len() >= self.settings.max_header_size {
                return Err(NoRequest::TooLarge);
            }
            scanned = head.len();
            head.reserve(1024);
            let deadline =
                *deadline.get_or_insert_with(|| Instant::now() + self.settings.header_timeout);
            match tokio::time::timeout_at(deadline, stream.read_buf(&mut head)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(NoRequest::Gone),
                Ok(Ok(_)) => {}
                Err(_) => return Err(NoRequest::TimedOut),
            }
        }
        Ok(head)
    }

    /// Waits for the first bytes of the next request and reads them into `buf`: `Some(n)`
    /// once bytes came, `None` if `window` ended first. A connection idle since `idle_since`
    /// past its idle limit, closed, or drained is `Gone`.
    ///
    /// `timer` may be set for any time up to the wait's deadline (a run of requests shares
    /// one, left set for an earlier request's deadline): when it fires early, it is moved to
    /// this deadline. A Tokio timer costs a few hundred instructions to make, register and
    /// remove, and under load the next request mostly arrives well within the window, so a
    /// busy connection moves its timer about once per `READ_AHEAD` instead of arming one per
    /// request.
    #[allow(clippy::too_many_arguments)]
    async fn wait_and_read<B: BufMut + ?Sized>(
        &self,
        stream: &mut Stream,
        drain: &mut Drain,
        reused: bool,
        idle_since: Instant,
        window: Option<Instant>,
        mut timer: Pin<&mut Sleep>,
        buf: &mut B,
    ) -> Result<Option<usize>, NoRequest> {
        let mut draining = drain.draining();
        // Draining can only end the wait of a reused connection, and no sooner than
        // `DRAIN_IDLE` after it went idle: a window that closes by then ends the wait first
        // either way, so the read-ahead of a busy connection does not watch for it. Watching
        // registers with the shutdown channel each time the read waits (a lock taken twice,
        // some 650 instructions).
        let watch_drain = reused && window.is_none_or(|w| w > idle_since + DRAIN_IDLE);
        loop {
            // A fresh connection waits for its first request even while draining: the
            // client chose us, and closing now would fail a request it is sending.
            let limit = idle_since
                + match (reused, draining) {
                    (false, _) => self.settings.header_timeout,
                    (true, false) => self.settings.keepalive_timeout,
                    (true, true) => self.settings.keepalive_timeout.min(DRAIN_IDLE),
                };
            let until = window.map_or(limit, |w| w.min(limit));
            if timer.deadline() > until {
                timer.as_mut().reset(until);
            }
            tokio::select! {
                biased;
                read = stream.read_buf(buf) => {
                    return match read {
                        Ok(0) | Err(_) => Err(NoRequest::Gone),
                        Ok(n) => Ok(Some(n)),
                    };
                }
                () = drain.changed(), if watch_drain && !draining => draining = true,
                _ = timer.as_mut() => {
                    if Instant::now() < until {
                        timer.as_mut().reset(until);
                        continue;
                    }
                    if until < limit {
                        return Ok(None);
                    }
                    // Nothing arrived: an idle keep-alive connection is simply closed; a new
                    // one that never spoke gets no answer either (nginx does the same).
                    return Err(NoRequest::Gone);
                }
            }
        }
    }
}

/// Whether the process is draining, as Pingora's shutdown watch says: once draining, idle
/// connections are let go sooner (`DRAIN_IDLE`).
struct Drain {
    watch: ShutdownWatch,
    draining: bool,
}

impl Drain {
    fn new(shutdown: &ShutdownWatch) -> Drain {
        let mut watch = shutdown.clone();
        let draining = *watch.borrow_and_update();
        Drain { watch, draining }
    }

    /// Reads the watched value only when it was sent since last read: checking for a new
    /// value is a plain load, reading one takes the watch's lock.
    fn draining(&mut self) -> bool {
        if !self.draining && self.watch.has_changed().unwrap_or(true) {
            // A closed channel means the server is going away: drain as well.
            self.draining = self.watch.is_closed() || *self.watch.borrow_and_update();
        }
        self.draining
    }

    /// Until draining starts (or the server goes away, which closes the channel).
    async fn changed(&mut self) {
        let _closed = self.watch.changed().await;
        self.draining = true;
    }
}

/// Whether `buf` holds a complete header block: an empty line after the request line.
/// `from` is how much was already scanned. Bare `\n` line ends are accepted, as Pingora's
/// parser does: a line end followed by `\r\n` or by `\n`.
fn header_complete(buf: &[u8], from: usize) -> bool {
    // Vectorized searches (a byte loop was about 5 instructions a byte); the two or three
    // bytes before `from` are looked at again, for an end split across reads.
    static CRLF_END: Lazy<memmem::Finder<'static>> = Lazy::new(|| memmem::Finder::new(b"\n\r\n"));
    static LF_END: Lazy<memmem::Finder<'static>> = Lazy::new(|| memmem::Finder::new(b"\n\n"));
    let rest = &buf[from.saturating_sub(3).min(buf.len())..];
    CRLF_END.find(rest).is_some() || LF_END.find(rest).is_some()
}

/// Whether `bytes`, the start of a connection, could be the HTTP/2 preface.
fn may_be_h2_preface(bytes: &[u8]) -> bool {
    let n = bytes.len().min(H2_PREFACE.len());
    bytes[..n] == H2_PREFACE[..n]
}

/// Closes a connection on which no request came whole: quietly, or with `408` or `431`.
async fn close_without_request(stream: &mut Stream, why: NoRequest) {
    match why {
        NoRequest::Gone => {}
        NoRequest::TimedOut => {
            CONNECTION_METRICS.closed_header_timeout.inc();
            refuse(stream, 408, "request header timeout").await;
        }
        NoRequest::TooLarge => {
            CONNECTION_METRICS.closed_header_too_large.inc();
            refuse(stream, 431, "request header too large").await;
        }
    }
}

/// Answers a request the front refuses before Pingora sees it, then closes.
async fn refuse(stream: &mut Stream, status: u16, reason: &str) {
    let request_id = crate::proxy::request_id::new();
    let body = serde_json::json!({
        "error": reason,
        "request_id": request_id.to_str().unwrap_or_default(),
    })
    .to_string();
    let phrase = match status {
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        _ => "Bad Request",
    };
    let response = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n\
         X-Request-Id: {}\r\nConnection: close\r\n\r\n{body}",
        body.len(),
        request_id.to_str().unwrap_or_default(),
    );
    // The client may be gone already; there is nothing more to do either way.
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
}

#[async_trait::async_trait]
impl<A> ServerApp for Front<A>
where
    A: InPlaceHttpApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.settings.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            CONNECTION_METRICS.refused.inc();
            return None;
        }
        CONNECTION_METRICS.active.inc();
        CONNECTION_METRICS.accepted.inc();
        let _open = Open(&self.open);

        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return ServerApp::process_new(&self.app, stream, shutdown).await;
        }
        if self.settings.h2c && stream.get_ssl().is_none() {
            // Peek at the start of the connection without consuming it: read what is there
            // and put it back, then let Pingora's own h2c handling take a preface.
            let mut start = [0u8; H2_PREFACE.len()];
            let n = tokio::time::timeout(self.settings.header_timeout, stream.read(&mut start))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            let mut l4 = stream.into_any().downcast::<L4Stream>().ok()?;
            l4.rewind(&start[..n]);
            stream = l4;
            if may_be_h2_preface(&start[..n]) {
                return ServerApp::process_new(&self.app, stream, shutdown).await;
            }
        }
        self.serve_http1(stream, shutdown).await;
        None
    }

    /// Pingora calls this once every accept loop of the service has ended.
    async fn cleanup(&self) {
        self.stopped.set();
        self.app.http_cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_is_complete_at_its_empty_line_whatever_the_line_ends() {
        assert!(header_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", 0));
        assert!(header_complete(b"GET / HTTP/1.1\nHost: a\n\n", 0));
        assert!(header_complete(b"GET / HTTP/1.1\r\nHost: a\n\r\n", 0));
        assert!(!header_complete(b"GET / HTTP/1.1\r\nHost: a\r\n", 0));
        assert!(!header_complete(b"GET / HTTP/1.1\r\n", 0));
        // The terminator may straddle two reads.
        let whole = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        for split in 1..whole.len() {
            assert!(header_complete(whole, split), "split at {split}");
        }
        assert!(!header_complete(b"GET / HTTP/1.1\r\nHost: a\r\n\r", 0));
        assert!(!header_complete(b"\r\n\r", 0));
        assert!(header_complete(b"\n\n", 0));
        assert!(!header_complete(b"", 0));
    }

    #[test]
    fn the_header_end_search_agrees_with_its_definition_on_every_short_input() {
        // Every string of up to seven bytes over `\r`, `\n` and a letter, from every resume
        // point: a line end followed by `\n` or `\r\n`, at or after three bytes before it.
        let defined = |buf: &[u8], from: usize| {
            (from.saturating_sub(3)..buf.len()).any(|i| {
                buf[i] == b'\n'
                    && (buf.get(i + 1) == Some(&b'\n')
                        || (buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n')))
            })
        };
        let alphabet = [b'\r', b'\n', b'a'];
        for len in 0..=7u32 {
            for mut code in 0..3usize.pow(len) {
                let buf: Vec<u8> = (0..len)
                    .map(|_| {
                        let b = alphabet[code % 3];
                        code /= 3;
                        b
                    })
                    .collect();
                for from in 0..=buf.len() {
                    assert_eq!(
                        header_complete(&buf, from),
                        defined(&buf, from),
                        "{buf:?} from {from}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_h2_preface_is_recognised_from_its_first_byte() {
        assert!(may_be_h2_preface(b"P"));
        assert!(may_be_h2_preface(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!may_be_h2_preface(b"GET / HTTP/1.1\r\n"));
        assert!(!may_be_h2_preface(b"POST / HTTP/1.1\r\n"));
    }
}
