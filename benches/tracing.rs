//! What tracing adds to one proxied request, on the request path: reading the client's
//! `traceparent`, the trace ids, one `traceparent` for the upstream, and for sampled requests
//! the recorded phases and the spans handed to the export queue. Measured at sampling 0%
//! (propagation only), 1% and 100%, and with tracing off.
//!
//! The export thread runs against a closed port here, so its batches fail at once and the
//! queue never fills up: the request-path cost is measured, not the collector's.
//!
//!   cargo bench --bench tracing

use breakwater::ops::tracing::{Phase, RequestSummary, RequestTrace, Tracer, TracingConfig};
use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use pingora::http::RequestHeader;
use pingora::services::background::BackgroundService;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

fn tracer(ratio: f64, rt: &tokio::runtime::Runtime) -> Arc<Tracer> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let config = TracingConfig {
        otlp_endpoint: Some(format!("http://127.0.0.1:{port}/v1/traces")),
        sample_ratio: ratio,
        service_name: "bench".into(),
    };
    let (tracer, export) = config.compile().unwrap().install();
    let export = export.unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    rt.spawn(async move {
        let _tx = _tx;
        export.start(rx).await;
    });
    tracer
}

/// The tracing calls of one request with one upstream attempt, as the proxy makes them.
fn one_request(tracer: &Tracer, headers: &HeaderMap, upstream_req: &mut RequestHeader) {
    let start = Instant::now();
    let mut trace = RequestTrace::begin(tracer, headers, start);
    let t = trace.phase_start();
    trace.phase_end(Phase::RateLimit, t, false);
    trace.attempt_started(0, || ("127.0.0.1:3001".to_string(), "closed"));
    trace.set_upstream_headers(upstream_req);
    trace.attempt_ended(Some(200), None);
    black_box(trace.trace_id_hex());
    if trace.is_recording() {
        trace.finish(&RequestSummary {
            method: "GET",
            path: "/users/1",
            route: Some("/users"),
            service: "users",
            status: 200,
            client: Some("127.0.0.1:50000".to_string()),
            request_id: "4f1c2a7e-0b7e-4c1e-9d1e-1f2a3b4c5d6e",
            error: None,
        });
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let mut headers = HeaderMap::new();
    headers.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let mut upstream_req = RequestHeader::build("GET", b"/users/1", None).unwrap();

    // For scale: what the proxy already does once per attempt for X-Request-Id.
    let request_id = HeaderValue::from_static("4f1c2a7e-0b7e-4c1e-9d1e-1f2a3b4c5d6e");
    c.bench_function("reference: one upstream header (X-Request-Id)", |b| {
        b.iter(|| {
            upstream_req
                .insert_header("x-request-id", request_id.clone())
                .unwrap();
        })
    });
    c.bench_function("tracing off", |b| {
        b.iter(|| {
            let trace = RequestTrace::default();
            black_box(trace.trace_id_hex());
        })
    });
    for (name, ratio) in [
        ("tracing, sampled 0%", 0.0),
        ("tracing, sampled 1%", 0.01),
        ("tracing, sampled 100%", 1.0),
    ] {
        let tracer = tracer(ratio, &rt);
        // Continue a client's trace and start new ones in equal parts: a new trace id is what
        // the sampling decision is taken on.
        let empty = HeaderMap::new();
        let mut n = 0u64;
        c.bench_function(name, |b| {
            b.iter(|| {
                n += 1;
                let h = if n.is_multiple_of(2) {
                    &headers
                } else {
                    &empty
                };
                one_request(&tracer, h, &mut upstream_req);
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
