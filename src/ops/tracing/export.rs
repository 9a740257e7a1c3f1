//! Exporting spans: a bounded queue the request path pushes finished requests' spans into
//! without waiting, and a thread of its own that sends them in batches to the OTLP/HTTP
//! endpoint. What cannot be queued or sent is dropped and counted.

use once_cell::sync::Lazy;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use prometheus::IntCounter;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Requests whose spans may wait for the exporter; beyond that they are dropped.
const QUEUE_REQUESTS: usize = 2048;
/// Spans sent in one export request at most.
const MAX_BATCH_SPANS: usize = 512;
/// How long spans may gather before they are sent.
const BATCH_INTERVAL: Duration = Duration::from_millis(500);
/// How long one export may take; meanwhile the queue absorbs new spans.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

static DROPPED: Lazy<IntCounter> = Lazy::new(|| {
    counter(
        "breakwater_trace_spans_dropped_total",
        "Spans not exported: the export queue was full or the collector refused or did not answer.",
    )
});

static EXPORTED: Lazy<IntCounter> = Lazy::new(|| {
    counter(
        "breakwater_trace_spans_exported_total",
        "Spans the OTLP collector accepted.",
    )
});

fn counter(name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric definition");
    crate::ops::metrics::METRICS
        .registry
        .register(Box::new(c.clone()))
        .expect("trace metric registered once");
    c
}

pub(super) fn register_metrics() {
    Lazy::force(&DROPPED);
    Lazy::force(&EXPORTED);
}

/// Where spans go, checked.
#[derive(Debug, Clone)]
pub(super) struct ExportPlan {
    endpoint: String,
    service_name: String,
}

impl ExportPlan {
    pub(super) fn new(endpoint: &str, service_name: &str) -> Result<ExportPlan, String> {
        let bad = |why: &str| format!("invalid otlp_endpoint {endpoint:?}: {why}");
        let uri: http::Uri = endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) {
            return Err(bad("expected http:// or https://"));
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        let endpoint = if uri.path().is_empty() || uri.path() == "/" {
            format!("{}/v1/traces", endpoint.trim_end_matches('/'))
        } else {
            endpoint.to_string()
        };
        Ok(ExportPlan {
            endpoint,
            service_name: service_name.to_string(),
        })
    }
}

/// The request path's side of the export: pushes never wait.
pub struct SpanQueue {
    tx: SyncSender<Vec<SpanData>>,
}

impl SpanQueue {
    pub(super) fn new(plan: ExportPlan) -> (Arc<SpanQueue>, ExportService) {
        let (tx, rx) = mpsc::sync_channel(QUEUE_REQUESTS);
        let service = ExportService {
            plan,
            rx: Mutex::new(Some(rx)),
        };
        (Arc::new(SpanQueue { tx }), service)
    }

    /// Queues one request's spans, or drops them when the queue is full.
    pub(super) fn push(&self, spans: Vec<SpanData>) {
        match self.tx.try_send(spans) {
            Ok(()) => {}
            Err(TrySendError::Full(spans) | TrySendError::Disconnected(spans)) => {
                DROPPED.inc_by(spans.len() as u64);
            }
        }
    }
}

/// Pingora background service that starts the export thread once the server runs (after
/// daemonising: a fork keeps no threads).
pub struct ExportService {
    plan: ExportPlan,
    rx: Mutex<Option<Receiver<Vec<SpanData>>>>,
}

#[async_trait::async_trait]
impl BackgroundService for ExportService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let rx = self.rx.lock().ok().and_then(|mut rx| rx.take());
        let Some(rx) = rx else {
            return;
        };
        let plan = self.plan.clone();
        let spawned = std::thread::Builder::new()
            .name("trace export".into())
            .spawn(move || export_loop(&plan, &rx));
        if let Err(e) = spawned {
            log::error!("cannot start the trace exporter: {e}");
            return;
        }
        // Spans still queued at shutdown are lost with the process, like late access-log lines.
        let _ = shutdown.changed().await;
    }
}

fn export_loop(plan: &ExportPlan, rx: &Receiver<Vec<SpanData>>) {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(plan.endpoint.clone())
        .with_timeout(EXPORT_TIMEOUT)
        .build();
    let mut exporter = match exporter {
        Ok(e) => e,
        Err(e) => {
            log::error!("tracing: cannot build the OTLP exporter: {e}; spans are dropped");
            for spans in rx.iter() {
                DROPPED.inc_by(spans.len() as u64);
            }
            return;
        }
    };
    exporter.set_resource(
        &opentelemetry_sdk::Resource::builder_empty()
            .with_service_name(plan.service_name.clone())
            .build(),
    );
    log::info!("tracing: exporting spans to {}", plan.endpoint);
    let mut last_error_log: Option<Instant> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH_SPANS);
    loop {
        let Ok(first) = rx.recv() else {
            return;
        };
        batch.extend(first);
        let deadline = Instant::now() + BATCH_INTERVAL;
        while batch.len() < MAX_BATCH_SPANS {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(spans) => batch.extend(spans),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        let n = batch.len() as u64;
        let sent = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH_SPANS));
        match futures_executor::block_on(exporter.export(sent)) {
            Ok(()) => EXPORTED.inc_by(n),
            Err(e) => {
                DROPPED.inc_by(n);
                // One line per minute at most: a collector outage must not flood the log.
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                    last_error_log = Some(Instant::now());
                    log::warn!(
                        "tracing: export to {} failed: {e} (spans dropped and counted in \
                         breakwater_trace_spans_dropped_total)",
                        plan.endpoint
                    );
                }
            }
        }
    }
}
