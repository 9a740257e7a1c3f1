//! gRPC through the gateway, end to end, with a real gRPC server and client (Python grpcio
//! from Debian, `tests/grpc/server.py` and `client.py`): unary and server-streaming calls to
//! an h2c upstream, each answer the gateway makes itself read by the client as the right
//! gRPC status, `grpc-timeout` capped by the service and forwarded, the breaker judging the
//! `grpc-status` an upstream ends a call with, and the gRPC health protocol.
//!
//! The client speaks h2c with prior knowledge to the gateway (`server.h2c: true`).

mod common;

use common::{free_port, poll_until, Gateway};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const SECRET: &str = "grpc-integration-test-secret-0123456789";

/// Debian's python3-grpcio is installed for Debian's interpreter, which a pyenv or venv
/// `python3` earlier on the PATH would not see.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn script(name: &str) -> String {
    format!("{}/tests/grpc/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `tests/grpc/server.py`: a plaintext (h2c) gRPC server on a free loopback port.
struct GrpcServer {
    addr: String,
    child: Child,
}

impl GrpcServer {
    fn start() -> GrpcServer {
        GrpcServer::start_with(&[])
    }

    /// Over TLS (h2 by ALPN) with the test certificate.
    fn start_tls() -> GrpcServer {
        let fixture = |name: &str| format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        GrpcServer::start_with(&["--tls", &fixture("tls_cert.pem"), &fixture("tls_key.pem")])
    }

    fn start_with(args: &[&str]) -> GrpcServer {
        let mut child = Command::new(python())
            .arg(script("server.py"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start tests/grpc/server.py (needs python3-grpcio)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("PORT ")
            .unwrap_or_else(|| panic!("grpc server said {line:?} (is python3-grpcio installed?)"))
            .trim()
            .to_string();
        GrpcServer {
            addr: format!("127.0.0.1:{port}"),
            child,
        }
    }

    /// What its health service answers from now on.
    fn set_serving(&self, serving: bool) {
        let request = if serving { "1" } else { "0" };
        let r = calls(
            &self.addr,
            json!([unary_to("/test.Control/Serving", request)]),
        );
        assert_eq!(r[0]["code"], "OK", "{r:?}");
    }
}

impl GrpcServer {
    /// [`GrpcServer::set_serving`] through a gateway-less TLS channel is more than the test
    /// client does; the control call goes through a plain gateway instead.
    fn set_serving_tls(&self, serving: bool) {
        let gw = gateway(&format!(
            r#"
  control:
    protocol: grpc
    tls: true
    tls_verify: false
    routes: [{{path_prefix: /test.Control}}]
    upstreams: ["{}"]
"#,
            self.addr
        ));
        let request = if serving { "1" } else { "0" };
        let r = call(&gw.http, unary_to("/test.Control/Serving", request));
        assert_eq!(r["code"], "OK", "{r:?}");
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tests/grpc/client.py` against `target` with a list of calls; one result each.
fn calls(target: &str, calls: Value) -> Vec<Value> {
    let out = Command::new(python())
        .arg(script("client.py"))
        .arg(target)
        .arg(calls.to_string())
        .output()
        .expect("run tests/grpc/client.py");
    assert!(
        out.status.success(),
        "client.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client.py prints JSON")
}

fn call(target: &str, one: Value) -> Value {
    calls(target, json!([one])).remove(0)
}

fn unary(request: &str) -> Value {
    unary_to("/test.Echo/Unary", request)
}

fn unary_to(method: &str, request: &str) -> Value {
    json!({"method": method, "request": request})
}

fn codes(results: &[Value]) -> Vec<&str> {
    results
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect()
}

fn gateway(services: &str) -> Gateway {
    Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"], h2c: true}}
admin: {{listen: "${{ADMIN}}"}}
services:
{services}
"#
    ))
}

#[test]
fn unary_and_streaming_calls_pass_through_to_an_h2c_upstream() {
    let up = GrpcServer::start();
    let gw = gateway(&format!(
        r#"
  echo:
    protocol: grpc
    routes: [{{path_prefix: /test.Echo}}]
    upstreams: ["{}"]
"#,
        up.addr
    ));
    let r = calls(
        &gw.http,
        json!([
            unary("echo:hello"),
            {"method": "/test.Echo/Stream", "request": "50", "stream": true},
            unary("status:5"),
            unary("only:5"),
        ]),
    );
    assert_eq!(r[0]["code"], "OK", "{r:?}");
    assert_eq!(r[0]["responses"], json!(["echo:hello"]));
    let streamed: Vec<String> = (0..50).map(|i| format!("msg-{i}")).collect();
    assert_eq!(r[1]["code"], "OK", "{r:?}");
    assert_eq!(r[1]["responses"], json!(streamed));
    // The upstream's own statuses reach the client, from trailers and trailers-only alike.
    assert_eq!(r[2]["code"], "NOT_FOUND");
    assert_eq!(r[2]["details"], "asked for status:5");
    assert_eq!(r[3]["code"], "NOT_FOUND");
    assert_eq!(r[3]["details"], "asked for only:5");
}

#[test]
fn grpc_over_tls_upstreams_speaks_h2_by_alpn_and_checks_health_there() {
    let up = GrpcServer::start_tls();
    let gw = gateway(&format!(
        r#"
  echo:
    protocol: grpc
    tls: true
    sni: localhost
    tls_verify: false
    routes: [{{path_prefix: /test.Echo}}]
    upstreams: ["{}"]
    health_check: {{grpc: true, interval: 200ms, timeout: 1s}}
"#,
        up.addr
    ));
    let r = calls(
        &gw.http,
        json!([
            unary("echo:tls"),
            {"method": "/test.Echo/Stream", "request": "3", "stream": true},
            unary("status:14"),
        ]),
    );
    assert_eq!(r[0]["responses"], json!(["echo:tls"]), "{r:?}");
    assert_eq!(
        r[1]["responses"],
        json!(["msg-0", "msg-1", "msg-2"]),
        "{r:?}"
    );
    assert_eq!(r[2]["code"], "UNAVAILABLE");
    assert_eq!(r[2]["details"], "asked for status:14");
    // The gRPC health check over TLS passes, and then fails when the upstream stops serving.
    up.set_serving_tls(false);
    poll_until(Duration::from_secs(10), "unhealthy over TLS", || {
        gw.circuit("echo", &up.addr)["healthy"] == false
    });
}

#[test]
fn the_gateways_own_answers_reach_grpc_clients_as_statuses() {
    let up = GrpcServer::start();
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("jwt.secret");
    std::fs::write(&secret, SECRET).unwrap();
    let dead = free_port();
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"], h2c: true}}
admin: {{listen: "${{ADMIN}}"}}
auth:
  jwt: {{algorithms: [HS256], secret_file: "{secret}"}}
services:
  echo:
    protocol: grpc
    routes: [{{path_prefix: /test.Echo}}]
    upstreams: ["{up}"]
    timeouts: {{read: 300ms}}
  secure:
    protocol: grpc
    routes: [{{path_prefix: /test.Secure}}]
    upstreams: ["{up}"]
    auth: required
  limited:
    protocol: grpc
    routes: [{{path_prefix: /test.Limited}}]
    upstreams: ["{up}"]
    rate_limit: {{requests_per_second: 0.01, burst: 1}}
  down:
    protocol: grpc
    routes: [{{path_prefix: /test.Down}}]
    upstreams: ["127.0.0.1:{dead}"]
    retries: 0
    circuit_breaker: {{failure_threshold: 1, reset_timeout: 1m}}
"#,
        secret = secret.display(),
        up = up.addr,
    ));
    let r = calls(
        &gw.http,
        json!([
            unary_to("/nothing.Here/Method", "x"),
            unary_to("/test.Secure/Unary", "echo:x"),
            unary_to("/test.Limited/Unary", "echo:x"),
            unary_to("/test.Limited/Unary", "echo:x"),
            unary_to("/test.Down/Unary", "echo:x"),
            unary_to("/test.Down/Unary", "echo:x"),
            unary("sleep:3000"),
        ]),
    );
    let expected = [
        ("UNIMPLEMENTED", "no route"),
        ("UNAUTHENTICATED", "missing"),
        // Past the limit's unimplemented method on the upstream: the first call went through.
        ("UNIMPLEMENTED", ""),
        ("RESOURCE_EXHAUSTED", "rate limit exceeded"),
        ("UNAVAILABLE", "upstream connection refused"),
        // Now the breaker is open: the fallback.
        ("UNAVAILABLE", "no upstream available"),
        ("DEADLINE_EXCEEDED", "upstream timed out"),
    ];
    for (i, (code, details)) in expected.iter().enumerate() {
        assert_eq!(r[i]["code"], *code, "call {i}: {:?}", r[i]);
        if !details.is_empty() {
            assert_eq!(r[i]["details"], *details, "call {i}: {:?}", r[i]);
        }
    }
    // An HTTP client still gets the JSON answer.
    let resp = common::client().get(gw.url("/nothing")).send().unwrap();
    assert_eq!(resp.status(), 404);
    assert_eq!(resp.headers()["content-type"], "application/json");
    // A gRPC call to no service is recognised by its content type, over HTTP/1.1 too.
    let resp = common::client()
        .post(gw.url("/nothing.Here/Method"))
        .header("content-type", "application/grpc+proto")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "12");
    assert_eq!(resp.headers()["content-length"], "0");
}

#[test]
fn grpc_timeout_is_capped_by_the_service_and_forwarded() {
    let up = GrpcServer::start();
    let gw = gateway(&format!(
        r#"
  budget:
    protocol: grpc
    routes: [{{path_prefix: /test.Echo}}]
    upstreams: ["{0}"]
    timeouts: {{total: 1s}}
  open:
    protocol: grpc
    routes: [{{path_prefix: /open, strip_prefix: true}}]
    upstreams: ["{0}"]
"#,
        up.addr
    ));
    let deadline = |method: &str, timeout: Option<f64>| {
        let one = json!({"method": method, "request": "deadline", "timeout": timeout});
        let r = call(&gw.http, one);
        assert_eq!(r["code"], "OK", "{r:?}");
        r["responses"][0].as_str().unwrap().to_string()
    };
    // The service's 1 s budget caps the client's 30 s, and is sent when the client sets none.
    for timeout in [Some(30.0), None] {
        let left: u64 = deadline("/test.Echo/Unary", timeout).parse().unwrap();
        assert!(left <= 1000 && left > 200, "{timeout:?}: {left} ms left");
    }
    // A shorter client deadline is kept.
    let left: u64 = deadline("/open/test.Echo/Unary", Some(0.8))
        .parse()
        .unwrap();
    assert!(left <= 800 && left > 300, "{left} ms left");
    // No deadline anywhere: none is made up.
    assert_eq!(deadline("/open/test.Echo/Unary", None), "none");
}

#[test]
fn a_client_deadline_that_passes_blames_no_upstream() {
    let up = GrpcServer::start();
    let gw = gateway(&format!(
        r#"
  echo:
    protocol: grpc
    routes: [{{path_prefix: /test.Echo}}]
    upstreams: ["{}"]
    retries: 0
    circuit_breaker: {{failure_threshold: 2}}
"#,
        up.addr
    ));
    let slow = json!({"method": "/test.Echo/Unary", "request": "sleep:1000", "timeout": 0.2});
    // Whether the gateway's timer or the upstream's own answer to the forwarded deadline
    // comes first is a race: the upstream's `DEADLINE_EXCEEDED` under the client's deadline
    // blames it no more than the timer does.
    let answered = json!({"method": "/test.Echo/Unary", "request": "only:4", "timeout": 0.5});
    for call in [slow, answered] {
        let r = calls(
            &gw.http,
            json!([call.clone(), call.clone(), call, unary("echo:x")]),
        );
        assert_eq!(
            codes(&r),
            [
                "DEADLINE_EXCEEDED",
                "DEADLINE_EXCEEDED",
                "DEADLINE_EXCEEDED",
                "OK"
            ]
        );
        assert_eq!(gw.circuit_state("echo", &up.addr), "closed");
    }

    // Without a client deadline, an upstream that answers `DEADLINE_EXCEEDED` on its own is
    // failing (a default failure code): two open the breaker.
    let own = json!({"method": "/test.Echo/Unary", "request": "only:4"});
    let r = calls(&gw.http, json!([own, own, unary("echo:x")]));
    assert_eq!(
        codes(&r),
        ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "UNAVAILABLE"]
    );
    assert_eq!(gw.circuit_state("echo", &up.addr), "open");
}

#[test]
fn unavailable_in_trailers_opens_the_breaker_while_ok_and_not_found_do_not() {
    let up = GrpcServer::start();
    let gw = gateway(&format!(
        r#"
  echo:
    protocol: grpc
    routes: [{{path_prefix: /test.Echo}}]
    upstreams: ["{0}"]
    retries: 0
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 1m}}
  custom:
    protocol: grpc
    routes: [{{path_prefix: /custom, strip_prefix: true}}]
    upstreams: ["{0}"]
    retries: 0
    circuit_breaker: {{failure_threshold: 2, reset_timeout: 1m, grpc_failure_codes: [5]}}
"#,
        up.addr
    ));
    let mut fine = Vec::new();
    for _ in 0..4 {
        fine.extend([unary("status:5"), unary("only:5"), unary("echo:x")]);
    }
    let r = calls(&gw.http, Value::Array(fine));
    assert!(codes(&r).iter().all(|c| *c == "NOT_FOUND" || *c == "OK"));
    assert_eq!(gw.circuit_state("echo", &up.addr), "closed");

    // Two failures in trailers after a response header, one trailers-only: open.
    let r = calls(
        &gw.http,
        json!([unary("status:14"), unary("only:14"), unary("status:4")]),
    );
    assert_eq!(
        codes(&r),
        ["UNAVAILABLE", "UNAVAILABLE", "DEADLINE_EXCEEDED"]
    );
    assert_eq!(gw.circuit_state("echo", &up.addr), "open");
    let r = call(&gw.http, unary("echo:x"));
    assert_eq!(r["code"], "UNAVAILABLE");
    assert_eq!(r["details"], "no upstream available");

    // grpc_failure_codes decides: here NOT_FOUND is a failure and UNAVAILABLE is not.
    let custom = |request: &str| unary_to("/custom/test.Echo/Unary", request);
    let r = calls(&gw.http, json!([custom("status:14"), custom("only:14")]));
    assert_eq!(codes(&r), ["UNAVAILABLE", "UNAVAILABLE"]);
    assert_eq!(gw.circuit_state("custom", &up.addr), "closed");
    let r = calls(&gw.http, json!([custom("status:5"), custom("only:5")]));
    assert_eq!(codes(&r), ["NOT_FOUND", "NOT_FOUND"]);
    assert_eq!(gw.circuit_state("custom", &up.addr), "open");
}

#[test]
fn the_grpc_health_check_marks_a_not_serving_upstream_down() {
    let up = GrpcServer::start();
    let gw = gateway(&format!(
        r#"
  echo:
    protocol: grpc
    routes: [{{path_prefix: /test.Echo}}]
    upstreams: ["{}"]
    health_check: {{grpc: true, interval: 200ms, timeout: 1s}}
"#,
        up.addr
    ));
    let healthy = |want: bool| {
        poll_until(Duration::from_secs(10), "health flag", || {
            gw.circuit("echo", &up.addr)["healthy"] == want
        })
    };
    healthy(true);
    assert_eq!(call(&gw.http, unary("echo:x"))["code"], "OK");
    up.set_serving(false);
    healthy(false);
    let r = call(&gw.http, unary("echo:x"));
    assert_eq!(r["code"], "UNAVAILABLE", "{r:?}");
    assert_eq!(r["details"], "no upstream available");
    up.set_serving(true);
    healthy(true);
    assert_eq!(call(&gw.http, unary("echo:x"))["code"], "OK");
}
