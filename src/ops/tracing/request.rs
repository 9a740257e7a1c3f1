//! What one request records for tracing, from `request_filter` to `logging`: its trace ids
//! (always, once tracing is on) and, only when the trace is sampled for export, the start and
//! end of each phase and upstream attempt, turned into spans when the request is logged.

use super::context::{self, FLAG_SAMPLED};
use super::Tracer;
use http::header::HeaderMap;
use http::HeaderValue;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};

/// The steps of `request_filter` that get a child span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Auth,
    RateLimit,
    CacheLookup,
}

impl Phase {
    fn span_name(self) -> &'static str {
        match self {
            Phase::Auth => "auth",
            Phase::RateLimit => "rate limit",
            Phase::CacheLookup => "cache lookup",
        }
    }

    /// The attribute that says whether the step answered the request itself.
    fn answered_attribute(self) -> &'static str {
        match self {
            Phase::Auth => "breakwater.auth.refused",
            Phase::RateLimit => "breakwater.rate_limit.refused",
            Phase::CacheLookup => "breakwater.cache.hit",
        }
    }
}

/// A request's trace: nothing when tracing is off. Boxed, so that without tracing it adds one
/// word to the request context, which Pingora moves several times per request.
#[derive(Default)]
pub struct RequestTrace(Option<Box<Active>>);

struct Active {
    trace_id: u128,
    /// The client's span, when the request continued its trace.
    parent_id: Option<u64>,
    /// This request's (server) span.
    span_id: u64,
    flags: u8,
    tracestate: Option<HeaderValue>,
    /// The span id the current upstream attempt forwards.
    attempt_span: u64,
    /// Present when the trace is exported.
    recording: Option<Box<Recording>>,
}

struct Recording {
    queue: Arc<super::SpanQueue>,
    start: Instant,
    start_wall: SystemTime,
    phases: Vec<PhaseSpan>,
    attempts: Vec<AttemptSpan>,
}

struct PhaseSpan {
    phase: Phase,
    start: Instant,
    end: Instant,
    answered: bool,
}

struct AttemptSpan {
    span_id: u64,
    upstream: String,
    breaker: &'static str,
    retry: u32,
    start: Instant,
    end: Option<Instant>,
    status: Option<u16>,
    error: Option<&'static str>,
}

/// What the request span says about the finished request.
pub struct RequestSummary<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub route: Option<&'a str>,
    pub service: &'a str,
    pub status: u16,
    pub client: Option<String>,
    pub request_id: &'a str,
    pub error: Option<&'a str>,
}

fn new_span_id() -> u64 {
    fastrand::u64(1..)
}

impl RequestTrace {
    /// Continues the client's trace when its `traceparent` is valid, else starts one;
    /// `start` is when the request arrived.
    pub fn begin(tracer: &Tracer, headers: &HeaderMap, start: Instant) -> RequestTrace {
        let (trace_id, parent_id, tracestate) = match context::incoming(headers) {
            Some(tp) => (
                tp.trace_id,
                Some(tp.parent_id),
                context::incoming_state(headers),
            ),
            None => (fastrand::u128(1..), None, None),
        };
        // The gateway is the edge: the sampling decision is its own, not the client's flag,
        // or any client could have every one of its requests traced.
        let sampled = tracer.samples(trace_id);
        let recording = match (&tracer.queue, sampled) {
            (Some(queue), true) => Some(Box::new(Recording {
                queue: Arc::clone(queue),
                start,
                start_wall: SystemTime::now() - start.elapsed(),
                phases: Vec::new(),
                attempts: Vec::new(),
            })),
            _ => None,
        };
        let span_id = new_span_id();
        RequestTrace(Some(Box::new(Active {
            trace_id,
            parent_id,
            span_id,
            flags: if sampled { FLAG_SAMPLED } else { 0 },
            tracestate,
            attempt_span: span_id,
            recording,
        })))
    }

    /// The trace id as 32 hex digits, when tracing is on.
    pub fn trace_id_hex(&self) -> Option<[u8; 32]> {
        self.0.as_ref().map(|a| context::trace_id_hex(a.trace_id))
    }

    /// The start of a phase, when the trace records (no clock read otherwise).
    pub fn phase_start(&self) -> Option<Instant> {
        self.recording().map(|_| Instant::now())
    }

    /// Ends a phase started with [`phase_start`](Self::phase_start); `answered` when the
    /// step answered the request itself (refused it, or served it from the cache).
    pub fn phase_end(&mut self, phase: Phase, start: Option<Instant>, answered: bool) {
        if let (Some(rec), Some(start)) = (self.recording_mut(), start) {
            rec.phases.push(PhaseSpan {
                phase,
                start,
                end: Instant::now(),
                answered,
            });
        }
    }

    /// An attempt starts (`retry` is 0 for the first): it gets a span id of its own, which
    /// the upstream sees as its parent. `upstream` names the upstream and its breaker's state,
    /// asked for only when the trace records.
    pub fn attempt_started(
        &mut self,
        retry: u32,
        upstream: impl FnOnce() -> (String, &'static str),
    ) {
        let Some(active) = &mut self.0 else {
            return;
        };
        let span_id = new_span_id();
        active.attempt_span = span_id;
        if let Some(rec) = &mut active.recording {
            let (upstream, breaker) = upstream();
            rec.attempts.push(AttemptSpan {
                span_id,
                upstream,
                breaker,
                retry,
                start: Instant::now(),
                end: None,
                status: None,
                error: None,
            });
        }
    }

    /// The current attempt ended: with the upstream's status, or an error kind.
    pub fn attempt_ended(&mut self, status: Option<u16>, error: Option<&'static str>) {
        let Some(rec) = self.recording_mut() else {
            return;
        };
        if let Some(a) = rec.attempts.last_mut().filter(|a| a.end.is_none()) {
            a.end = Some(Instant::now());
            a.status = status;
            a.error = error;
        }
    }

    /// Sets `traceparent` (and the client's valid `tracestate`) on the upstream request,
    /// replacing whatever the client sent.
    pub fn set_upstream_headers(&self, req: &mut pingora::http::RequestHeader) {
        let Some(a) = &self.0 else {
            return;
        };
        let tp = context::format_traceparent(a.trace_id, a.attempt_span, a.flags);
        // Both names are valid static header names; inserting cannot fail.
        let _ = req.insert_header(context::TRACEPARENT, tp);
        match &a.tracestate {
            Some(ts) => {
                let _ = req.insert_header(context::TRACESTATE, ts.clone());
            }
            None if req.headers.contains_key(context::TRACESTATE) => {
                req.remove_header(context::TRACESTATE);
            }
            None => {}
        }
    }

    /// Builds the request's spans and queues them for export, when the trace records.
    pub fn finish(&mut self, summary: &RequestSummary<'_>) {
        let Some(active) = &mut self.0 else {
            return;
        };
        let Some(mut rec) = active.recording.take() else {
            return;
        };
        if let Some(a) = rec.attempts.last_mut().filter(|a| a.end.is_none()) {
            a.end = Some(Instant::now());
        }
        let spans = build_spans(active, &rec, summary);
        rec.queue.push(spans);
    }

    /// Whether this request's spans are exported (so its summary is worth building).
    pub fn is_recording(&self) -> bool {
        self.recording().is_some()
    }

    fn recording(&self) -> Option<&Recording> {
        self.0.as_ref()?.recording.as_deref()
    }

    fn recording_mut(&mut self) -> Option<&mut Recording> {
        self.0.as_mut()?.recording.as_deref_mut()
    }
}

fn scope() -> InstrumentationScope {
    static SCOPE: OnceLock<InstrumentationScope> = OnceLock::new();
    SCOPE
        .get_or_init(|| {
            InstrumentationScope::builder("breakwater")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build()
        })
        .clone()
}

fn build_spans(active: &Active, rec: &Recording, s: &RequestSummary<'_>) -> Vec<SpanData> {
    let trace_id = TraceId::from(active.trace_id);
    let flags = TraceFlags::new(active.flags);
    let state = active
        .tracestate
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| TraceState::from_key_value(parse_members(v)).ok())
        .unwrap_or_default();
    let wall = |t: Instant| rec.start_wall + t.saturating_duration_since(rec.start);
    let now = Instant::now();
    let server_span = SpanId::from(active.span_id);
    let span = |span_id: u64, parent: SpanId, kind, name: Cow<'static, str>| SpanData {
        span_context: SpanContext::new(
            trace_id,
            SpanId::from(span_id),
            flags,
            false,
            state.clone(),
        ),
        parent_span_id: parent,
        parent_span_is_remote: false,
        span_kind: kind,
        name,
        start_time: rec.start_wall,
        end_time: rec.start_wall,
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope(),
    };

    let mut spans = Vec::with_capacity(1 + rec.phases.len() + rec.attempts.len());
    let name = match s.route {
        Some(route) => format!("{} {route}", s.method),
        None => s.method.to_string(),
    };
    let parent = active.parent_id.map_or(SpanId::INVALID, SpanId::from);
    let mut root = span(active.span_id, parent, SpanKind::Server, name.into());
    root.parent_span_is_remote = active.parent_id.is_some();
    root.end_time = wall(now);
    root.attributes = vec![
        KeyValue::new("http.request.method", s.method.to_string()),
        KeyValue::new("url.path", s.path.to_string()),
        KeyValue::new("http.response.status_code", i64::from(s.status)),
        KeyValue::new("breakwater.service", s.service.to_string()),
        KeyValue::new("breakwater.request_id", s.request_id.to_string()),
    ];
    if let Some(route) = s.route {
        root.attributes
            .push(KeyValue::new("http.route", route.to_string()));
    }
    if let Some(client) = &s.client {
        root.attributes
            .push(KeyValue::new("client.address", client.clone()));
    }
    if let Some(error) = s.error {
        root.attributes
            .push(KeyValue::new("error.type", error.to_string()));
    }
    if s.status >= 500 || s.status == 0 {
        root.status = Status::error(s.error.unwrap_or("").to_string());
    }
    spans.push(root);

    for p in &rec.phases {
        let mut child = span(
            new_span_id(),
            server_span,
            SpanKind::Internal,
            p.phase.span_name().into(),
        );
        child.start_time = wall(p.start);
        child.end_time = wall(p.end);
        child.attributes = vec![KeyValue::new(p.phase.answered_attribute(), p.answered)];
        spans.push(child);
    }
    for a in &rec.attempts {
        let mut child = span(
            a.span_id,
            server_span,
            SpanKind::Client,
            "upstream attempt".into(),
        );
        child.start_time = wall(a.start);
        child.end_time = wall(a.end.unwrap_or(now));
        child.attributes = vec![
            KeyValue::new("server.address", a.upstream.clone()),
            KeyValue::new("breakwater.breaker.state", a.breaker),
            KeyValue::new("breakwater.retry", i64::from(a.retry)),
        ];
        if let Some(status) = a.status {
            child.attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if let Some(error) = a.error {
            child.attributes.push(KeyValue::new("error.type", error));
            child.status = Status::error(error);
        } else if a.status.is_some_and(|s| s >= 500) {
            child.status = Status::error("");
        }
        spans.push(child);
    }
    spans
}

/// `tracestate` members as pairs, for the exported span context (already validated).
fn parse_members(v: &str) -> Vec<(String, String)> {
    v.split(',')
        .filter_map(|m| m.trim_matches([' ', '\t']).split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
