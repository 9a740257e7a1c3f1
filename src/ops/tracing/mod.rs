//! Distributed tracing: owns the `tracing:` section, W3C Trace Context propagation
//! ([`context`]), what one request records for its spans ([`RequestTrace`]), and the OTLP
//! export of those spans off the request path ([`export`]).
//!
//! Without a `tracing` section nothing here runs and `traceparent` passes through like any
//! other header. With one, every request continues the client's trace (or starts one),
//! forwards it upstream with a new span id per attempt, and the access log carries the trace
//! id. With `otlp_endpoint` set too, sampled requests are exported as spans: one per request,
//! with child spans for auth, the rate limit, the cache lookup and each upstream attempt.
//!
//! The request path only reads clocks and fills a small record for sampled requests; the
//! spans are built when the request is logged and handed to a bounded queue that a thread of
//! its own exports from. A full queue or a failed export drops spans and counts them
//! (`breakwater_trace_spans_dropped_total`): no request ever waits for a collector.

pub mod context;
mod export;
mod request;

pub use export::{ExportService, SpanQueue};
pub use request::{Phase, RequestSummary, RequestTrace};

use serde::Deserialize;
use std::sync::Arc;

/// `tracing:` section (top level). Default: absent (no propagation, no spans).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// OTLP/HTTP (protobuf) traces endpoint, e.g. `http://otel-collector:4318/v1/traces`; a
    /// URL with no path gets `/v1/traces`. Default: none (trace context is propagated and
    /// logged, no spans are exported).
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Share of traces exported, 0.0 to 1.0, decided on the trace id (as OpenTelemetry's
    /// `TraceIdRatioBased` sampler does). Default: 1.0.
    #[serde(default = "default_sample_ratio")]
    pub sample_ratio: f64,
    /// `service.name` of the exported spans. Default: `breakwater`.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

fn default_sample_ratio() -> f64 {
    1.0
}

fn default_service_name() -> String {
    "breakwater".to_string()
}

/// The `tracing` section, checked: what to propagate and where spans go.
#[derive(Debug, Clone)]
pub struct TracingPlan {
    threshold: u64,
    export: Option<export::ExportPlan>,
}

impl TracingConfig {
    /// Checks the section. No I/O: the exporter connects when the server runs.
    pub fn compile(&self) -> Result<TracingPlan, String> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(format!(
                "sample_ratio must be between 0.0 and 1.0, got {}",
                self.sample_ratio
            ));
        }
        if self.service_name.trim().is_empty() {
            return Err("service_name must not be empty".to_string());
        }
        let export = self
            .otlp_endpoint
            .as_deref()
            .map(|e| export::ExportPlan::new(e, &self.service_name))
            .transpose()?;
        Ok(TracingPlan {
            threshold: ratio_threshold(self.sample_ratio),
            export,
        })
    }
}

/// The sampling threshold for the upper 63 bits of a trace id's lower half: a trace is
/// sampled when they are below it (`TraceIdRatioBased`'s rule, so samplers agree along a trace).
fn ratio_threshold(ratio: f64) -> u64 {
    if ratio >= 1.0 {
        u64::MAX
    } else {
        (ratio * (1u64 << 63) as f64) as u64
    }
}

/// Tracing installed in a process: the sampling rule and the export queue.
pub struct Tracer {
    threshold: u64,
    queue: Option<Arc<SpanQueue>>,
}

impl TracingPlan {
    /// The tracer, and the background service that exports its spans (when exporting).
    pub fn install(self) -> (Arc<Tracer>, Option<ExportService>) {
        export::register_metrics();
        let (queue, service) = match self.export {
            Some(plan) => {
                let (queue, service) = SpanQueue::new(plan);
                (Some(queue), Some(service))
            }
            None => (None, None),
        };
        let tracer = Tracer {
            threshold: self.threshold,
            queue,
        };
        (Arc::new(tracer), service)
    }
}

impl Tracer {
    /// Whether spans of `trace_id` are exported.
    fn samples(&self, trace_id: u128) -> bool {
        self.queue.is_some() && ((trace_id as u64) >> 1) < self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer(ratio: f64) -> Arc<Tracer> {
        let config = TracingConfig {
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            sample_ratio: ratio,
            service_name: "t".into(),
        };
        config.compile().unwrap().install().0
    }

    #[test]
    fn sampling_follows_the_ratio() {
        let all = tracer(1.0);
        let none = tracer(0.0);
        let some = tracer(0.25);
        let mut sampled = 0;
        for _ in 0..10_000 {
            let id = fastrand::u128(1..);
            assert!(all.samples(id));
            assert!(!none.samples(id));
            sampled += usize::from(some.samples(id));
        }
        assert!((2000..3000).contains(&sampled), "{sampled} of 10000 at 25%");
        // The decision is the trace id's, so every hop with the same ratio agrees.
        assert!(some.samples(0x0000_0000_0000_0000_0000_0000_0000_0002));
        assert!(!some.samples(0x0000_0000_0000_0000_ffff_ffff_ffff_fffe));
    }

    #[test]
    fn bad_sections_are_refused() {
        let mut config = TracingConfig {
            otlp_endpoint: None,
            sample_ratio: 1.5,
            service_name: "x".into(),
        };
        assert!(config.compile().unwrap_err().contains("sample_ratio"));
        config.sample_ratio = f64::NAN;
        assert!(config.compile().is_err());
        config.sample_ratio = 0.5;
        config.service_name = " ".into();
        assert!(config.compile().unwrap_err().contains("service_name"));
        config.service_name = "x".into();
        for endpoint in [
            "127.0.0.1:4318",
            "ftp://x/v1/traces",
            "http://",
            "http://a b/",
        ] {
            config.otlp_endpoint = Some(endpoint.into());
            assert!(config.compile().is_err(), "{endpoint}");
        }
        config.otlp_endpoint = Some("https://collector.example:4318/custom".into());
        assert!(config.compile().is_ok());
    }
}
