//! Tracing against the real binary: W3C trace context continued, started and forwarded per
//! upstream attempt; spans exported over OTLP/HTTP to a real receiver in this test (it decodes
//! the protobuf with `opentelemetry-proto`) with the parent ids and attributes of the
//! request's path through the pipeline; and a dead or hanging collector costing requests
//! nothing while the dropped spans are counted.

mod common;

use common::{client, free_port, poll_until, Gateway, Upstream};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A span as received, with its resource's `service.name`.
#[derive(Clone, Debug)]
struct Received {
    service_name: String,
    span: Span,
}

/// A minimal OTLP/HTTP traces receiver: answers every POST with 200 and keeps the spans.
struct Receiver {
    endpoint: String,
    spans: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let spans = Arc::new(Mutex::new(Vec::new()));
        let store = Arc::clone(&spans);
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let store = Arc::clone(&store);
                thread::spawn(move || serve(conn, &store));
            }
        });
        Receiver { endpoint, spans }
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until the spans of `trace_id` number at least `n`.
    fn trace(&self, trace_id: &[u8], n: usize) -> Vec<Received> {
        let mut found = Vec::new();
        poll_until(Duration::from_secs(15), "spans at the receiver", || {
            found = self
                .spans()
                .into_iter()
                .filter(|r| r.span.trace_id == trace_id)
                .collect();
            found.len() >= n
        });
        found
    }
}

fn serve(conn: TcpStream, store: &Mutex<Vec<Received>>) {
    let mut writer = conn.try_clone().unwrap();
    let mut reader = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        assert!(
            request_line.starts_with("POST /v1/traces "),
            "{request_line}"
        );
        let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        let mut spans = store.lock().unwrap();
        for rs in request.resource_spans {
            let service_name = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    spans.push(Received {
                        service_name: service_name.clone(),
                        span,
                    });
                }
            }
        }
        drop(spans);
        let _ = writer.write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n",
        );
    }
}

fn attr(span: &Span, key: &str) -> Option<AnyValue> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.clone())
}

fn str_attr(span: &Span, key: &str) -> Option<String> {
    match attr(span, key)? {
        AnyValue::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int_attr(span: &Span, key: &str) -> Option<i64> {
    match attr(span, key)? {
        AnyValue::IntValue(i) => Some(i),
        _ => None,
    }
}

fn bool_attr(span: &Span, key: &str) -> Option<bool> {
    match attr(span, key)? {
        AnyValue::BoolValue(b) => Some(b),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// The access-log lines on the gateway's stdout, once `n` are there.
fn access_lines(gw: &Gateway, n: usize) -> Vec<Value> {
    let mut lines = Vec::new();
    poll_until(Duration::from_secs(10), "access log lines", || {
        lines = gw
            .stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect();
        lines.len() >= n
    });
    lines
}

/// The traceparent the upstream got with its latest request.
fn upstream_traceparent(up: &Upstream) -> Option<(String, String, String)> {
    let stats = up.stats();
    let tp = stats["last_headers"]["traceparent"].as_str()?.to_string();
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(parts[0], "00", "{tp}");
    Some((parts[1].into(), parts[2].into(), parts[3].into()))
}

fn metric(gw: &Gateway, name: &str) -> f64 {
    gw.metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[test]
fn a_request_is_traced_through_the_pipeline_and_its_upstream_attempts() {
    let receiver = Receiver::start();
    let up = Upstream::start("orders");
    // Nothing listens there: an attempt at it fails to connect and is retried on `up`.
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
tracing: {{otlp_endpoint: "{endpoint}", sample_ratio: 1.0, service_name: edge-test}}
services:
  orders:
    routes: [{{path_prefix: /orders}}]
    upstreams: ["{dead}", "{up}"]
    retries: 1
    rate_limit: {{requests_per_second: 1000, burst: 1000, key: ip}}
    cache: {{ttl: 1s}}
"#,
        endpoint = receiver.endpoint,
        up = up.addr,
    ));
    let http = client();
    // Round robin sends some of these to the dead upstream first.
    let mut two_attempts = 0;
    for i in 0..4 {
        let trace_id = format!("{:0>32x}", (0x4bf92f3577b34da6_u128 << 64) | (i + 1));
        let resp = http
            .get(gw.url(&format!("/orders/{}", i + 1)))
            .header("traceparent", format!("00-{trace_id}-{CLIENT_SPAN}-01"))
            .header("tracestate", "congo=t61rcWkgMzE")
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);

        // The upstream continues the client's trace, under the span of its own attempt.
        let (up_trace, up_parent, up_flags) = upstream_traceparent(&up).expect("traceparent");
        assert_eq!(up_trace, trace_id);
        assert_eq!(up_flags, "01");
        assert_ne!(
            up_parent, CLIENT_SPAN,
            "a span of the gateway's, not the client's"
        );
        assert_eq!(
            up.stats()["last_headers"]["tracestate"],
            "congo=t61rcWkgMzE"
        );

        let lines = access_lines(&gw, i as usize + 1);
        let line = &lines[i as usize];
        assert_eq!(line["trace_id"], trace_id.as_str(), "{line}");
        let attempts = line["attempts"].as_u64().unwrap() as usize;

        let tid = unhex(&trace_id);
        let spans = receiver.trace(&tid, 3 + attempts);
        assert!(spans.iter().all(|s| s.service_name == "edge-test"));
        let by_name = |name: &str| -> Vec<&Span> {
            spans
                .iter()
                .map(|r| &r.span)
                .filter(|s| s.name == name)
                .collect()
        };
        let root = by_name("GET /orders");
        assert_eq!(root.len(), 1, "{spans:#?}");
        let root = root[0];
        assert_eq!(hex(&root.parent_span_id), CLIENT_SPAN);
        assert_eq!(root.kind, 2, "SPAN_KIND_SERVER");
        assert_eq!(str_attr(root, "http.route").as_deref(), Some("/orders"));
        assert_eq!(
            str_attr(root, "breakwater.service").as_deref(),
            Some("orders")
        );
        assert_eq!(int_attr(root, "http.response.status_code"), Some(200));
        assert_eq!(
            str_attr(root, "url.path"),
            Some(format!("/orders/{}", i + 1))
        );
        assert!(str_attr(root, "client.address")
            .unwrap()
            .starts_with("127.0.0.1:"));
        assert_eq!(
            str_attr(root, "breakwater.request_id").as_deref(),
            line["request_id"].as_str()
        );

        for (name, attribute, value) in [
            ("rate limit", "breakwater.rate_limit.refused", false),
            ("cache lookup", "breakwater.cache.hit", false),
        ] {
            let phase = by_name(name);
            assert_eq!(phase.len(), 1, "{name}: {spans:#?}");
            assert_eq!(phase[0].parent_span_id, root.span_id, "{name}");
            assert_eq!(bool_attr(phase[0], attribute), Some(value), "{name}");
            assert!(phase[0].start_time_unix_nano >= root.start_time_unix_nano);
            assert!(phase[0].end_time_unix_nano <= root.end_time_unix_nano);
        }
        let mut tries = by_name("upstream attempt");
        tries.sort_by_key(|s| int_attr(s, "breakwater.retry"));
        assert_eq!(tries.len(), attempts, "{spans:#?}");
        for (n, attempt) in tries.iter().enumerate() {
            assert_eq!(attempt.parent_span_id, root.span_id);
            assert_eq!(attempt.kind, 3, "SPAN_KIND_CLIENT");
            assert_eq!(int_attr(attempt, "breakwater.retry"), Some(n as i64));
            assert_eq!(
                str_attr(attempt, "breakwater.breaker.state").as_deref(),
                Some("closed")
            );
            let address = str_attr(attempt, "server.address").unwrap();
            if address == dead {
                assert!(str_attr(attempt, "error.type").is_some(), "{attempt:#?}");
                assert_eq!(
                    attempt.status.as_ref().map(|s| s.code),
                    Some(2),
                    "error status"
                );
            } else {
                assert_eq!(address, up.addr);
                assert_eq!(int_attr(attempt, "http.response.status_code"), Some(200));
            }
        }
        // The upstream's parent is the last attempt's span.
        assert_eq!(hex(&tries.last().unwrap().span_id), up_parent);
        if attempts == 2 {
            two_attempts += 1;
            assert_eq!(str_attr(tries[0], "server.address"), Some(dead.clone()));
        }
    }
    assert!(two_attempts > 0, "no request tried the dead upstream first");
}

#[test]
fn invalid_or_missing_trace_context_starts_a_new_trace() {
    let up = Upstream::start("users");
    // No endpoint: context is propagated and logged, nothing is exported.
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
tracing: {{}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
"#,
        up = up.addr
    ));
    let http = client();
    let invalid = [
        Some(format!("00-{}-{CLIENT_SPAN}-01", TRACE_ID.to_uppercase())),
        Some(format!("00-{TRACE_ID}-0000000000000000-01")),
        Some(format!("00-{}-{CLIENT_SPAN}-01", "0".repeat(32))),
        Some(format!("ff-{TRACE_ID}-{CLIENT_SPAN}-01")),
        Some(format!("00-{TRACE_ID}-{CLIENT_SPAN}-01-extra")),
        Some(format!("00-{TRACE_ID}-{CLIENT_SPAN}")),
        None,
    ];
    let mut seen = std::collections::HashSet::new();
    for (i, tp) in invalid.iter().enumerate() {
        let mut req = http.get(gw.url("/users/1"));
        if let Some(tp) = tp {
            req = req.header("traceparent", tp).header("tracestate", "evil=1");
        }
        assert_eq!(req.send().unwrap().status(), 200);
        let (trace, parent, flags) = upstream_traceparent(&up).expect("a traceparent");
        assert_ne!(trace, TRACE_ID, "{tp:?} was continued");
        assert_eq!(trace.len(), 32);
        assert_ne!(trace, "0".repeat(32));
        assert_ne!(parent, "0".repeat(16));
        // Not exported, so not sampled.
        assert_eq!(flags, "00");
        assert!(seen.insert(trace.clone()), "trace ids are new each time");
        // A tracestate belongs to the trace it came with.
        assert!(up.stats()["last_headers"]["tracestate"].is_null(), "{tp:?}");
        let lines = access_lines(&gw, i + 1);
        assert_eq!(lines[i]["trace_id"], trace.as_str());
    }
    // Two traceparents: neither is trusted.
    let resp = http
        .get(gw.url("/users/1"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-00"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_ne!(upstream_traceparent(&up).unwrap().0, TRACE_ID);
    // A valid one is continued, unsampled because the gateway decides (no export here).
    let resp = http
        .get(gw.url("/users/1"))
        .header("traceparent", format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))
        .header("tracestate", "a=1,b=2")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (trace, parent, _) = upstream_traceparent(&up).unwrap();
    assert_eq!(trace, TRACE_ID);
    assert_ne!(parent, CLIENT_SPAN);
    assert_eq!(up.stats()["last_headers"]["tracestate"], "a=1,b=2");
}

/// Sends `n` requests one after the other; returns the slowest.
fn slowest_of(gw: &Gateway, n: usize) -> Duration {
    let http = client();
    let mut slowest = Duration::ZERO;
    for i in 0..n {
        let t = Instant::now();
        let resp = http
            .get(gw.url(&format!("/users/{}", i % 5 + 1)))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
        slowest = slowest.max(t.elapsed());
    }
    slowest
}

fn gateway_exporting_to(endpoint: &str, up: &Upstream) -> Gateway {
    Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
access_log: false
tracing: {{otlp_endpoint: "{endpoint}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
"#,
        up = up.addr
    ))
}

#[test]
fn a_dead_collector_costs_no_request_anything() {
    let up = Upstream::start("users");

    // Closed port: every export fails at once, and its spans are counted as dropped.
    let closed = format!("http://127.0.0.1:{}/v1/traces", free_port());
    let gw = gateway_exporting_to(&closed, &up);
    let slowest = slowest_of(&gw, 50);
    assert!(
        slowest < Duration::from_secs(1),
        "slowest request {slowest:?}"
    );
    // Two spans a request: the request and its upstream attempt.
    poll_until(Duration::from_secs(20), "100 dropped spans", || {
        metric(&gw, "breakwater_trace_spans_dropped_total") >= 100.0
    });
    assert_eq!(metric(&gw, "breakwater_trace_spans_exported_total"), 0.0);
    drop(gw);

    // A collector that accepts and never answers: an export hangs for its 5 s timeout, which
    // would show in every request if one ever waited for it.
    let hanging = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}/v1/traces", hanging.local_addr().unwrap());
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let holder = Arc::clone(&held);
    thread::spawn(move || {
        for conn in hanging.incoming().flatten() {
            holder.lock().unwrap().push(conn);
        }
    });
    let gw = gateway_exporting_to(&endpoint, &up);
    let t = Instant::now();
    let mut slowest = Duration::ZERO;
    // Keep requests going while the exporter is stuck on its first export.
    while t.elapsed() < Duration::from_secs(3) {
        slowest = slowest.max(slowest_of(&gw, 5));
    }
    assert!(
        !held.lock().unwrap().is_empty(),
        "the exporter never reached the hanging collector"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "slowest request {slowest:?}"
    );
    // The stuck export times out and its spans are counted.
    poll_until(
        Duration::from_secs(20),
        "dropped spans after the timeout",
        || metric(&gw, "breakwater_trace_spans_dropped_total") > 0.0,
    );
}

#[test]
fn spans_are_sampled_by_ratio() {
    let receiver = Receiver::start();
    let up = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
access_log: false
tracing: {{otlp_endpoint: "{endpoint}", sample_ratio: 0.5}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
"#,
        endpoint = receiver.endpoint,
        up = up.addr
    ));
    let http = client();
    // Trace ids chosen on both sides of the 50% threshold (the upper 63 bits of the lower
    // half): ...0002 is sampled, ...fffe is not, whatever the client's flag says.
    let sampled = "000000000000000a0000000000000002";
    let unsampled = "000000000000000bfffffffffffffffe";
    for (trace, client_flag) in [(unsampled, "01"), (sampled, "00")] {
        let resp = http
            .get(gw.url("/users/1"))
            .header(
                "traceparent",
                format!("00-{trace}-{CLIENT_SPAN}-{client_flag}"),
            )
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
        let (_, _, flags) = upstream_traceparent(&up).unwrap();
        assert_eq!(flags, if trace == sampled { "01" } else { "00" });
    }
    receiver.trace(&unhex(sampled), 2);
    let exported: HashMap<String, usize> =
        receiver.spans().iter().fold(HashMap::new(), |mut m, r| {
            *m.entry(hex(&r.span.trace_id)).or_default() += 1;
            m
        });
    // Exports are in order: once the sampled trace is in, the unsampled one would be too.
    assert!(!exported.contains_key(unsampled), "{exported:?}");
}
