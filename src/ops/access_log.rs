//! The access log: owns the `access_log:` section and writes one line per request, as JSON
//! (today's fields by default, or a chosen list) or in the Apache/nginx `combined` format, on
//! stdout or to a file that `SIGUSR1` reopens (for logrotate).
//!
//! Request threads append finished lines to one queue, and one writer thread writes whatever
//! has queued up with a single `write`: a syscall per request is a measurable share of a
//! proxied request, and a slow output (a full pipe, a slow disk) then delays logging, not
//! requests. A line is formatted in a buffer of its thread and copied into the queue: no
//! allocation per line, and none freed on another thread. Lines queued in the last moments
//! before the process exits can be lost.

use crate::edge::forwarded::Client;
use once_cell::sync::Lazy;
use pingora::proxy::Session;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::cell::{Cell, RefCell};
use std::fmt;
use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

/// How long the writer lets lines gather before writing them.
const BATCH_INTERVAL: Duration = Duration::from_millis(20);
/// How long a thread derives the wall-clock time from the monotonic clock before it reads
/// the system time again.
const WALL_CLOCK_RESYNC: Duration = Duration::from_secs(1);
/// Lines waiting beyond this are dropped rather than buffered without bound.
const MAX_QUEUED_BYTES: usize = 8 << 20;
/// What the queue keeps allocated between bursts.
const KEPT_QUEUE_CAPACITY: usize = 256 << 10;

/// `access_log:` (top level): `true` (the default: JSON lines on stdout), `false` (off), or
/// the options below.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig(pub Option<AccessLogOptions>);

impl Default for AccessLogConfig {
    fn default() -> Self {
        AccessLogConfig(Some(AccessLogOptions::default()))
    }
}

/// `access_log: {format, fields, output}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogOptions {
    /// `json` (one object per line) or `combined` (Apache/nginx combined). Default: `json`.
    #[serde(default)]
    pub format: Format,
    /// The JSON fields, in this order. Default: every field but `trace_id`, in the order of
    /// [`Field`], and `trace_id` last when `tracing` is on. Only with `format: json`.
    #[serde(default)]
    pub fields: Option<Vec<Field>>,
    /// `stdout`, or a file path (appended to, created if missing, reopened on `SIGUSR1`).
    /// Default: `stdout`.
    #[serde(default = "default_output")]
    pub output: String,
}

impl Default for AccessLogOptions {
    fn default() -> Self {
        AccessLogOptions {
            format: Format::Json,
            fields: None,
            output: default_output(),
        }
    }
}

fn default_output() -> String {
    "stdout".to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Json,
    Combined,
}

/// A field of the JSON line. Optional ones are left out of a line when they have no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    Ts,
    RequestId,
    Client,
    Peer,
    Method,
    Host,
    Path,
    RawTarget,
    Status,
    Service,
    Upstream,
    Attempts,
    DurationMs,
    BytesSent,
    Error,
    Cache,
    TraceId,
}

/// Today's line, field for field.
const DEFAULT_FIELDS: [Field; 16] = [
    Field::Ts,
    Field::RequestId,
    Field::Client,
    Field::Peer,
    Field::Method,
    Field::Host,
    Field::Path,
    Field::RawTarget,
    Field::Status,
    Field::Service,
    Field::Upstream,
    Field::Attempts,
    Field::DurationMs,
    Field::BytesSent,
    Field::Error,
    Field::Cache,
];

impl<'de> Deserialize<'de> for AccessLogConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AccessLogConfig;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false, or {format, fields, output}")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(AccessLogConfig(v.then(AccessLogOptions::default)))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                let options =
                    AccessLogOptions::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(AccessLogConfig(Some(options)))
            }
        }
        d.deserialize_any(V)
    }
}

/// The section, checked.
#[derive(Debug, Clone)]
pub struct AccessLogPlan {
    format: Format,
    fields: Vec<Field>,
    output: Option<PathBuf>,
}

impl AccessLogConfig {
    /// Checks the section; `None` when the log is off. `tracing` says whether requests have a
    /// trace id (the default JSON fields then end with it).
    pub fn compile(&self, tracing: bool) -> Result<Option<AccessLogPlan>, String> {
        let Some(o) = &self.0 else {
            return Ok(None);
        };
        let fields = match (&o.fields, o.format) {
            (Some(_), Format::Combined) => {
                return Err("fields: only with format: json (combined has a fixed layout)".into())
            }
            (Some(fields), Format::Json) => {
                if fields.is_empty() {
                    return Err("fields: list at least one field".into());
                }
                for (i, f) in fields.iter().enumerate() {
                    if fields[..i].contains(f) {
                        return Err(format!("fields: {f:?} is listed twice"));
                    }
                }
                fields.clone()
            }
            (None, _) => {
                let mut fields = DEFAULT_FIELDS.to_vec();
                if tracing {
                    fields.push(Field::TraceId);
                }
                fields
            }
        };
        let output = match o.output.as_str() {
            "stdout" | "-" => None,
            "" => return Err("output: `stdout` or a file path".into()),
            path => Some(PathBuf::from(path)),
        };
        Ok(Some(AccessLogPlan {
            format: o.format,
            fields,
            output,
        }))
    }
}

/// Where lines go, opened by [`AccessLogPlan::install`].
enum Output {
    Stdout,
    File { path: PathBuf, file: File },
}

/// Set by `SIGUSR1`: the writer reopens its file before the next write.
static REOPEN: Lazy<Arc<AtomicBool>> = Lazy::new(Arc::default);
static OUTPUT_FILE: OnceLock<PathBuf> = OnceLock::new();

/// The access log installed in this process.
pub struct AccessLog {
    format: Format,
    fields: Vec<Field>,
}

impl AccessLogPlan {
    /// Opens the output file (so a path that cannot be written stops the start, not the
    /// first request) and, for a file, makes `SIGUSR1` reopen it. The handler is installed
    /// here, before the server runs, so no `SIGUSR1` can find the process without it (its
    /// default action ends the process); it only sets a flag, independent of the reload and
    /// shutdown signals.
    pub fn install(self) -> Result<AccessLog, String> {
        if let Some(path) = &self.output {
            open_append(path)?;
            // One output per process: a second install (tests) keeps the first.
            let _ = OUTPUT_FILE.set(path.clone());
            signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(&REOPEN))
                .map_err(|e| format!("cannot handle SIGUSR1 to reopen the access log: {e}"))?;
        }
        Ok(AccessLog {
            format: self.format,
            fields: self.fields,
        })
    }
}

fn open_append(path: &PathBuf) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open the access log {}: {e}", path.display()))
}

struct Writer {
    /// Lines not yet written, in order.
    queue: Mutex<Vec<u8>>,
    /// Signalled when a line lands in an empty queue; the idle writer waits on it.
    queued: Condvar,
}

impl Writer {
    /// The queue, also after a thread panicked holding it: a line is appended whole or
    /// not at all, so what it holds is still lines.
    fn queue(&self) -> MutexGuard<'_, Vec<u8>> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Started on first use, so after Pingora has daemonised (a fork keeps no threads).
fn writer() -> &'static Writer {
    static WRITER: OnceLock<Writer> = OnceLock::new();
    WRITER.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("access log".into())
            .spawn(write_lines);
        if let Err(e) = spawned {
            log::error!("cannot start the access log writer: {e}");
        }
        Writer {
            queue: Mutex::new(Vec::with_capacity(KEPT_QUEUE_CAPACITY)),
            queued: Condvar::new(),
        }
    })
}

fn open_output() -> Output {
    match OUTPUT_FILE.get() {
        None => Output::Stdout,
        Some(path) => match open_append(path) {
            Ok(file) => Output::File {
                path: path.clone(),
                file,
            },
            Err(e) => {
                log::error!("{e}; access log lines go to stdout");
                Output::Stdout
            }
        },
    }
}

fn write_lines() {
    let w = writer();
    let mut out = open_output();
    let mut batch = Vec::with_capacity(KEPT_QUEUE_CAPACITY);
    loop {
        let mut queue = w.queue();
        while queue.is_empty() {
            queue = w
                .queued
                .wait(queue)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        drop(queue);
        // Let lines gather: one wake-up and one write per interval instead of per request.
        std::thread::sleep(BATCH_INTERVAL);
        // The queue takes the written batch's buffer, so neither side allocates in turn.
        std::mem::swap(&mut *w.queue(), &mut batch);
        if REOPEN.swap(false, Ordering::AcqRel) {
            if let Output::File { path, .. } = &out {
                log::info!("access log: reopening {}", path.display());
            }
            out = open_output();
        }
        // A closed or broken output must never take a request down: errors are dropped.
        match &mut out {
            Output::Stdout => {
                let mut stdout = std::io::stdout().lock();
                let _ = stdout.write_all(&batch);
                let _ = stdout.flush();
            }
            Output::File { file, .. } => {
                let _ = file.write_all(&batch);
            }
        }
        batch.clear();
        batch.shrink_to(KEPT_QUEUE_CAPACITY);
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
    /// When the request ended (its line's timestamp).
    pub finished: Instant,
    pub error: Option<&'a str>,
    /// `X-Cache` result on cacheable routes.
    pub cache: Option<&'a str>,
    /// The request's trace id (32 hex digits) when tracing is on.
    pub trace_id: Option<&'a str>,
}

thread_local! {
    /// The line being formatted, kept for the thread's next one.
    static LINE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// A monotonic time and the system time read with it, for `wall_time`.
    static WALL_CLOCK: Cell<Option<(Instant, SystemTime)>> = const { Cell::new(None) };
    /// The second and its RFC 3339 text up to the seconds (`2000-10-10T13:55:36`).
    static RFC3339_SECOND: std::cell::RefCell<(u64, String)> =
        const { std::cell::RefCell::new((0, String::new())) };
    /// The second and its common log format text.
    static CLF_SECOND: std::cell::RefCell<(u64, String)> =
        const { std::cell::RefCell::new((0, String::new())) };
}

/// The wall-clock time of `at`: the system time read at most a second earlier on this thread,
/// plus the monotonic time since. The request's end was read from the monotonic clock
/// already, and a second clock read was a tenth of a line's cost. A step of the system clock
/// (NTP, by hand) shows within a second.
fn wall_time(at: Instant) -> SystemTime {
    WALL_CLOCK.with(|synced| {
        if let Some((then, wall)) = synced.get() {
            if let Some(since) = at.checked_duration_since(then) {
                if since < WALL_CLOCK_RESYNC {
                    return wall + since;
                }
            }
        }
        let wall = SystemTime::now();
        synced.set(Some((at, wall)));
        wall
    })
}

/// The time `at` as a JSON string, RFC 3339 with milliseconds, UTC
/// (`"2000-10-10T13:55:36.123Z"`). The part up to the seconds is formatted once a second per
/// thread; the milliseconds are three digits written here.
fn push_timestamp(buf: &mut Vec<u8>, at: Instant) {
    push_rfc3339_millis(buf, wall_time(at));
}

fn push_rfc3339_millis(buf: &mut Vec<u8>, now: SystemTime) {
    let since_epoch = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let (secs, ms) = (since_epoch.as_secs(), since_epoch.subsec_millis());
    RFC3339_SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs || text.is_empty() {
            let whole = humantime::format_rfc3339_seconds(now).to_string();
            *second = secs;
            *text = whole.trim_end_matches('Z').to_owned();
        }
        buf.push(b'"');
        buf.extend_from_slice(text.as_bytes());
    });
    let ms = ms as u16;
    buf.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
        b'Z',
        b'"',
    ]);
}

/// The common log format's `10/Oct/2000:13:55:36 +0000`, UTC.
/// Formatted once a second per thread, since many requests share one.
fn push_clf_timestamp(buf: &mut Vec<u8>, at: Instant) {
    let now = wall_time(at);
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CLF_SECOND.with_borrow_mut(|(second, text)| {
        if *second != secs || text.is_empty() {
            *second = secs;
            *text = format_clf(now);
        }
        buf.extend_from_slice(text.as_bytes());
    });
}

fn format_clf(t: SystemTime) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl AccessLog {
    /// Writes the line for one finished request.
    pub fn write(&self, entry: &Entry<'_>) {
        LINE.with_borrow_mut(|buf| {
            buf.clear();
            match self.format {
                Format::Json => self.json_line(entry, buf),
                Format::Combined => combined_line(entry, buf),
            }
            buf.push(b'\n');
            let w = writer();
            let mut queue = w.queue();
            if queue.len() + buf.len() > MAX_QUEUED_BYTES {
                return;
            }
            let was_empty = queue.is_empty();
            queue.extend_from_slice(buf);
            drop(queue);
            if was_empty {
                w.queued.notify_one();
            }
            // One very long line (a long URL, a long user agent) is not kept per thread.
            if buf.capacity() > 64 << 10 {
                *buf = Vec::new();
            }
        });
    }

    fn json_line(&self, e: &Entry<'_>, buf: &mut Vec<u8>) {
        let req = e.session.req_header();
        // Each field is written as `,"name":value`, its name a literal so that copying it
        // compiles to a few moves; the first field's comma becomes the opening brace.
        let start = buf.len();
        for field in &self.fields {
            // serde_json writes numbers into a Vec without failing.
            match field {
                Field::Ts => {
                    buf.extend_from_slice(b",\"ts\":");
                    push_timestamp(buf, e.finished);
                }
                Field::RequestId => {
                    buf.extend_from_slice(b",\"request_id\":");
                    json_str(buf, e.request_id);
                }
                Field::Client => {
                    // The TCP peer, or behind trusted proxies the address they saw.
                    buf.extend_from_slice(b",\"client\":");
                    json_str(buf, e.client.addr());
                }
                Field::Peer => {
                    // The TCP peer (`ip:port`), when it is a trusted proxy, not the client.
                    if e.client.via_trusted_proxy {
                        if let Some(peer) = e.session.client_addr() {
                            buf.extend_from_slice(b",\"peer\":");
                            json_str(buf, &peer.to_string());
                        }
                    }
                }
                Field::Method => {
                    buf.extend_from_slice(b",\"method\":");
                    json_str(buf, req.method.as_str());
                }
                Field::Host => {
                    buf.extend_from_slice(b",\"host\":");
                    let host = req
                        .headers
                        .get(http::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .unwrap_or_default();
                    json_str(buf, host);
                }
                Field::Path => {
                    // Normalized: what was routed and forwarded.
                    buf.extend_from_slice(b",\"path\":");
                    json_str(buf, req.uri.path());
                }
                Field::RawTarget => {
                    if let Some(target) = e.original_target {
                        buf.extend_from_slice(b",\"raw_target\":");
                        json_str(buf, target);
                    }
                }
                Field::Status => {
                    buf.extend_from_slice(b",\"status\":");
                    let _ = serde_json::to_writer(&mut *buf, &e.status);
                }
                Field::Service => {
                    buf.extend_from_slice(b",\"service\":");
                    json_str(buf, e.service);
                }
                Field::Upstream => {
                    if let Some(upstream) = e.upstream {
                        buf.extend_from_slice(b",\"upstream\":");
                        json_str(buf, upstream);
                    }
                }
                Field::Attempts => {
                    buf.extend_from_slice(b",\"attempts\":");
                    let _ = serde_json::to_writer(&mut *buf, &e.attempts);
                }
                Field::DurationMs => {
                    buf.extend_from_slice(b",\"duration_ms\":");
                    push_millis(buf, e.duration);
                }
                Field::BytesSent => {
                    buf.extend_from_slice(b",\"bytes_sent\":");
                    let _ = serde_json::to_writer(&mut *buf, &e.session.body_bytes_sent());
                }
                Field::Error => {
                    if let Some(error) = e.error {
                        buf.extend_from_slice(b",\"error\":");
                        json_str(buf, error);
                    }
                }
                Field::Cache => {
                    if let Some(cache) = e.cache {
                        buf.extend_from_slice(b",\"cache\":");
                        json_str(buf, cache);
                    }
                }
                Field::TraceId => {
                    if let Some(trace_id) = e.trace_id {
                        buf.extend_from_slice(b",\"trace_id\":");
                        json_str(buf, trace_id);
                    }
                }
            }
        }
        match buf.get_mut(start) {
            Some(comma) => *comma = b'{',
            None => buf.push(b'{'),
        }
        buf.push(b'}');
    }
}

/// `d` in milliseconds to the microsecond, as the JSON number serde_json writes for that
/// `f64` (`12.0`, `0.5`, `3.027`), without formatting a float.
fn push_millis(buf: &mut Vec<u8>, d: Duration) {
    let micros = (d.as_nanos() + 500) / 1000;
    let (whole, frac) = (micros / 1000, (micros % 1000) as u16);
    let _ = serde_json::to_writer(&mut *buf, &whole);
    buf.push(b'.');
    let digits = [
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ];
    let len = match frac {
        0 => 1,
        f if f % 100 == 0 => 1,
        f if f % 10 == 0 => 2,
        _ => 3,
    };
    buf.extend_from_slice(&digits[..len]);
}

/// `s` as a JSON string. Most values (ids, addresses, paths, names) need no escaping: they are
/// copied as they are, which costs a fraction of serde_json's byte-by-byte escaping. Inlined:
/// a line writes seven or more strings, and the call was a fifth of each one's cost.
#[inline(always)]
fn json_str(buf: &mut Vec<u8>, s: &str) {
    if !needs_escape(s.as_bytes()) {
        buf.push(b'"');
        buf.extend_from_slice(s.as_bytes());
        buf.push(b'"');
    } else {
        // serde_json writes a string into a Vec without failing.
        let _ = serde_json::to_writer(&mut *buf, s);
    }
}

/// Whether JSON needs any byte of `s` escaped (a control character, `"` or `\\`), eight bytes
/// at a time: the classic "has a byte less than n / equal to c" word tricks, which never miss
/// one (a false alarm would only cost the escaping path). A string of eight bytes or more ends
/// with one word that overlaps the last whole one, rather than a byte loop.
fn needs_escape(s: &[u8]) -> bool {
    let mut chunks = s.chunks_exact(8);
    for chunk in &mut chunks {
        if word_needs_escape(chunk) {
            return true;
        }
    }
    let rest = chunks.remainder();
    if rest.is_empty() {
        return false;
    }
    match s.len().checked_sub(8) {
        Some(last_word) => word_needs_escape(&s[last_word..]),
        None => rest.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\'),
    }
}

/// [`needs_escape`] for eight bytes.
#[inline(always)]
fn word_needs_escape(chunk: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([1; 8]);
    const HIGHS: u64 = ONES * 0x80;
    let mut word = [0u8; 8];
    word.copy_from_slice(chunk);
    let x = u64::from_ne_bytes(word);
    let quote = x ^ (ONES * u64::from(b'"'));
    let backslash = x ^ (ONES * u64::from(b'\\'));
    let control = x.wrapping_sub(ONES * 0x20) & !x;
    let is_quote = quote.wrapping_sub(ONES) & !quote;
    let is_backslash = backslash.wrapping_sub(ONES) & !backslash;
    (control | is_quote | is_backslash) & HIGHS != 0
}

/// `client - - [time] "METHOD target VERSION" status bytes "referer" "user-agent"`.
fn combined_line(e: &Entry<'_>, buf: &mut Vec<u8>) {
    let req = e.session.req_header();
    match e.client.addr() {
        "" => buf.push(b'-'),
        addr => buf.extend_from_slice(addr.as_bytes()),
    }
    buf.extend_from_slice(b" - - [");
    push_clf_timestamp(buf, e.finished);
    buf.extend_from_slice(b"] \"");
    quoted_part(buf, req.method.as_str().as_bytes());
    buf.push(b' ');
    let target = req
        .uri
        .path_and_query()
        .map_or(req.uri.path(), |pq| pq.as_str());
    quoted_part(buf, target.as_bytes());
    let version = match req.version {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    };
    let _ = write!(buf, " {version}\" {} ", e.status);
    match e.session.body_bytes_sent() {
        0 => buf.push(b'-'),
        n => {
            let _ = write!(buf, "{n}");
        }
    }
    for name in [http::header::REFERER, http::header::USER_AGENT] {
        buf.extend_from_slice(b" \"");
        match req.headers.get(name) {
            Some(v) => quoted_part(buf, v.as_bytes()),
            None => buf.push(b'-'),
        }
        buf.push(b'"');
    }
}

/// Copies client-sent bytes into a quoted field, escaping as nginx does (`\"`, `\\` and
/// `\xHH` for anything not printable ASCII), so a client cannot forge a line or a field.
fn quoted_part(buf: &mut Vec<u8>, bytes: &[u8]) {
    for &b in bytes {
        match b {
            b'"' | b'\\' => {
                buf.push(b'\\');
                buf.push(b);
            }
            0x20..=0x7e => buf.push(b),
            _ => {
                let _ = write!(buf, "\\x{b:02X}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_that_needs_escaping_is_found_wherever_it_is() {
        for len in (1..=25).chain([31, 32, 33, 40]) {
            for at in 0..len {
                for byte in 0..=255u8 {
                    let mut s = vec![b'a'; len];
                    s[at] = byte;
                    let expected = byte < 0x20 || byte == b'"' || byte == b'\\';
                    assert_eq!(needs_escape(&s), expected, "{byte:#x} at {at} of {len}");
                }
            }
        }
        assert!(!needs_escape("ünïcödé ✓ /users/1?x=y".as_bytes()));
    }

    #[test]
    fn strings_are_copied_when_plain_and_escaped_otherwise() {
        for s in [
            "/users/1",
            "ünïcödé ✓",
            "",
            "a\"quote",
            "back\\slash",
            "tab\tand\u{1}",
            "\u{7f}del",
        ] {
            let mut buf = Vec::new();
            json_str(&mut buf, s);
            assert_eq!(buf, serde_json::to_vec(s).unwrap(), "{s:?}");
        }
    }

    fn parse(yaml: &str) -> Result<AccessLogConfig, String> {
        #[derive(Deserialize)]
        struct Doc {
            access_log: AccessLogConfig,
        }
        serde_yaml::from_str::<Doc>(yaml)
            .map(|d| d.access_log)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn bool_and_map_forms() {
        assert_eq!(
            parse("access_log: true").unwrap(),
            AccessLogConfig::default()
        );
        assert_eq!(parse("access_log: false").unwrap(), AccessLogConfig(None));
        let c = parse("access_log: {format: combined, output: /tmp/x.log}").unwrap();
        let o = c.0.unwrap();
        assert_eq!(o.format, Format::Combined);
        assert_eq!(o.output, "/tmp/x.log");
        let c = parse("access_log: {fields: [status, path, trace_id]}").unwrap();
        assert_eq!(
            c.0.unwrap().fields.unwrap(),
            vec![Field::Status, Field::Path, Field::TraceId]
        );
        for bad in [
            "access_log: 1",
            "access_log: yes please",
            "access_log: {format: xml}",
            "access_log: {fields: [nope]}",
            "access_log: {colour: blue}",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn compile_checks_fields() {
        let compile = |yaml: &str, tracing| parse(yaml).unwrap().compile(tracing);
        assert!(compile("access_log: false", false).unwrap().is_none());
        let plan = compile("access_log: true", false).unwrap().unwrap();
        assert_eq!(plan.fields, DEFAULT_FIELDS.to_vec());
        let plan = compile("access_log: true", true).unwrap().unwrap();
        assert_eq!(plan.fields.last(), Some(&Field::TraceId));
        assert!(
            compile("access_log: {format: combined, fields: [ts]}", false)
                .unwrap_err()
                .contains("only with format: json")
        );
        assert!(compile("access_log: {fields: []}", false).is_err());
        assert!(compile("access_log: {fields: [ts, ts]}", false)
            .unwrap_err()
            .contains("twice"));
        assert!(compile("access_log: {output: ''}", false).is_err());
    }

    #[test]
    fn wall_time_follows_the_monotonic_clock_and_reads_the_system_time_each_second() {
        let at = Instant::now();
        let wall = wall_time(at);
        let off = SystemTime::now()
            .duration_since(wall)
            .unwrap_or_else(|e| e.duration());
        assert!(
            off < Duration::from_millis(100),
            "{off:?} from the system time"
        );
        // Within the second: derived, to the nanosecond.
        let later = at + Duration::from_millis(300);
        assert_eq!(wall_time(later), wall + Duration::from_millis(300));
        // A second on (an instant made up here, so the system time has not moved with it):
        // read again, so the result is the system time now, not `wall` plus 1.5 s.
        let next_second = at + Duration::from_millis(1_500);
        let resynced = wall_time(next_second);
        assert!(resynced < wall + Duration::from_secs(1), "read again");
        assert_eq!(
            wall_time(next_second + Duration::from_millis(7)),
            resynced + Duration::from_millis(7)
        );
        // An instant before the one read with: read again too.
        assert!(wall_time(at) < resynced + Duration::from_secs(1));
    }

    #[test]
    fn timestamps_read_as_humantime_writes_them_within_and_across_seconds() {
        let base = SystemTime::UNIX_EPOCH + Duration::from_millis(971_186_136_000);
        for ms in [
            0, 1, 9, 10, 99, 100, 456, 999, 1_000, 1_005, 61_010, 0, 86_400_123,
        ] {
            let t = base + Duration::from_millis(ms) + Duration::from_micros(700);
            let mut buf = Vec::new();
            push_rfc3339_millis(&mut buf, t);
            let expected = format!("\"{}\"", humantime::format_rfc3339_millis(t));
            assert_eq!(String::from_utf8(buf).unwrap(), expected, "{ms} ms");
        }
    }

    #[test]
    fn durations_read_as_the_float_serde_json_writes() {
        for micros in [
            0u64,
            1,
            9,
            10,
            100,
            999,
            1_000,
            1_010,
            1_200,
            3_027,
            12_000,
            86_400_000_001,
        ] {
            // Not 500: a tie rounds up here, and either way in the float's inexact product.
            for extra_nanos in [0, 499, 501] {
                let d = Duration::from_micros(micros) + Duration::from_nanos(extra_nanos);
                let mut buf = Vec::new();
                push_millis(&mut buf, d);
                let ms = (d.as_secs_f64() * 1e6).round() / 1e3;
                assert_eq!(buf, serde_json::to_vec(&ms).unwrap(), "{d:?}");
            }
        }
    }

    #[test]
    fn clf_dates() {
        let at = |s: u64| format_clf(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0), "01/Jan/1970:00:00:00 +0000");
        assert_eq!(at(971_186_136), "10/Oct/2000:13:55:36 +0000");
        assert_eq!(at(951_782_400), "29/Feb/2000:00:00:00 +0000");
        assert_eq!(at(4_133_980_799), "31/Dec/2100:23:59:59 +0000");
        assert_eq!(
            at(4_107_542_399),
            "28/Feb/2100:23:59:59 +0000",
            "2100 is no leap year"
        );
    }

    #[test]
    fn quoted_parts_cannot_break_out() {
        let mut buf = Vec::new();
        quoted_part(&mut buf, b"a\"b\\c\nd\x7f\xff");
        assert_eq!(buf, br#"a\"b\\c\x0Ad\x7F\xFF"#);
    }
}
