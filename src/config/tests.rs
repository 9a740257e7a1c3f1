//! The file-level schema and rules, and where errors point: parsed and compiled the way
//! `check` and start-up do it.

use super::*;
use crate::routing::HostPattern;
use crate::runtime;
use crate::upstream::pool::{Algorithm, HashKey};
use std::path::Path;
use std::time::Duration;

/// Parses and compiles `text`, as `check` does, and hands back the parsed config.
fn parse(text: &str) -> Result<Config, ConfigError> {
    let source = Source::new(text, Path::new("test.yaml"));
    let config = Config::parse(&source)?;
    runtime::compile(&config, &source)?;
    Ok(config)
}

#[test]
fn minimal_service_takes_defaults() {
    let c = parse(
        "services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n",
    )
    .unwrap();
    assert_eq!(
        c.access_log,
        crate::ops::access_log::AccessLogConfig::default()
    );
    assert!(c.tracing.is_none());
    assert_eq!(c.admin.listen.0, "127.0.0.1:9090".parse().unwrap());
    let a = &c.services["a"];
    assert_eq!(a.load_balancing, Algorithm::RoundRobin);
    assert_eq!(a.timeouts.connect, Duration::from_secs(1));
    assert_eq!(a.upstreams[0].weight, 1);
    assert!(a.health_check.is_none());
}

#[test]
fn full_example_parses() {
    let c = parse(
        r#"
server:
  listen: ["0.0.0.0:8080"]
  tls: []
  threads: 1
admin:
  listen: "127.0.0.1:9090"
access_log: true
services:
  users:
    routes:
      - path_prefix: /users
        host: "*.example.com"
    upstreams: ["127.0.0.1:3001", {addr: "127.0.0.1:3003", weight: 3}]
    load_balancing: consistent_hash
    hash_key: header:X-User-Id
    timeouts: {connect: 1s, read: 3s, total: 5s}
    health_check: {path: /health, interval: 15s, timeout: 1s}
  orders:
    routes: [{path_prefix: /orders, strip_prefix: true}]
    upstreams: ["localhost:3002"]
    timeouts: {connect: 500ms, read: 5s}
"#,
    )
    .unwrap();
    let users = &c.services["users"];
    assert_eq!(users.upstreams[1].weight, 3);
    assert_eq!(users.hash_key, HashKey::Header("x-user-id".into()));
    assert_eq!(users.timeouts.total, Some(Duration::from_secs(5)));
    assert_eq!(
        users.routes[0].host,
        Some(HostPattern::Wildcard(".example.com".into()))
    );
    assert_eq!(
        c.services["orders"].timeouts.connect,
        Duration::from_millis(500)
    );
}

#[test]
fn unknown_field_names_line_and_field() {
    let e = parse("services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    retrys: 3\n")
        .unwrap_err();
    assert_eq!(e.line, Some(5), "{e}");
    assert_eq!(e.field, "services.a.retrys", "{e}");
    assert!(e.message.contains("retrys"), "{e}");
    assert!(e.to_string().starts_with("test.yaml:5:"), "{e}");
}

#[test]
fn bad_address_names_line_and_field() {
    let e = parse(
        "services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams:\n      - \"127.0.0.1\"\n",
    )
    .unwrap_err();
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.field.starts_with("services.a.upstreams"), "{e}");
    assert!(e.message.contains("host:port"), "{e}");
}

#[test]
fn errors_of_a_fields_own_parser_name_that_field_in_block_and_flow_style() {
    let block = "services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    timeouts:\n      connect: 1s\n      read: soon\n";
    let e = parse(block).unwrap_err();
    assert_eq!(e.field, "services.a.timeouts.read", "{e}");
    assert_eq!(e.line, Some(7), "{e}");
    let flow = "services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    timeouts: {connect: 1s, read: soon}\n";
    let e = parse(flow).unwrap_err();
    assert_eq!(e.field, "services.a.timeouts.read", "{e}");
    let top = "server:\n  threads: 2\n  grace_period: soon\nservices:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n";
    let e = parse(top).unwrap_err();
    assert_eq!(e.field, "server.grace_period", "{e}");
    assert_eq!(e.line, Some(3), "{e}");
}

#[test]
fn bad_duration_is_rejected() {
    let e = parse("services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    timeouts: {connect: soon}\n")
        .unwrap_err();
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("invalid duration"), "{e}");
}

#[test]
fn duplicate_route_is_rejected_with_its_line() {
    let e = parse("services:\n  a:\n    routes: [{path_prefix: /x}]\n    upstreams: [\"127.0.0.1:1\"]\n  b:\n    routes:\n      - path_prefix: /x\n    upstreams: [\"127.0.0.1:2\"]\n")
        .unwrap_err();
    assert_eq!(e.field, "services.b.routes[0].path_prefix", "{e}");
    assert_eq!(e.line, Some(7), "{e}");
    assert!(e.message.contains("duplicate route"), "{e}");
}

#[test]
fn same_prefix_on_other_host_is_allowed() {
    parse("services:\n  a:\n    routes: [{path_prefix: /x}]\n    upstreams: [\"127.0.0.1:1\"]\n  b:\n    routes: [{path_prefix: /x, host: b.example.com}]\n    upstreams: [\"127.0.0.1:2\"]\n")
        .unwrap();
}

#[test]
fn empty_routes_and_upstreams_are_rejected() {
    let e =
        parse("services:\n  a:\n    routes: []\n    upstreams: [\"127.0.0.1:1\"]\n").unwrap_err();
    assert_eq!(e.field, "services.a.routes");
    assert_eq!(e.line, Some(3));
    let e =
        parse("services:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: []\n").unwrap_err();
    assert_eq!(e.field, "services.a.upstreams");
}

#[test]
fn path_prefix_must_start_with_slash() {
    let e = parse(
        "services:\n  a:\n    routes: [{path_prefix: users}]\n    upstreams: [\"127.0.0.1:1\"]\n",
    )
    .unwrap_err();
    assert!(e.message.contains("must start with '/'"), "{e}");
    assert_eq!(e.line, Some(3));
}

#[test]
fn admin_token_needs_the_exact_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "0123456789abcdef-token\r\n").unwrap();
    let admin = AdminConfig {
        token_file: Some(file),
        ..AdminConfig::default()
    };
    let token = admin.token().unwrap().unwrap();
    assert!(
        format!("{token:?}").find("0123").is_none(),
        "Debug shows the token"
    );
    assert!(token.accepts(Some(b"Bearer 0123456789abcdef-token")));
    assert!(token.accepts(Some(b"BEARER 0123456789abcdef-token")));
    for wrong in [
        &b""[..],
        b"Bearer",
        b"Bearer ",
        b"0123456789abcdef-token",
        b"Bearer 0123456789abcdef-toke",
        b"Bearer 0123456789abcdef-token ",
        b"Bearer 0123456789abcdef-token\r\n",
        b"Basic 0123456789abcdef-token",
        b"Bearer\t0123456789abcdef-token",
    ] {
        assert!(
            !token.accepts(Some(wrong)),
            "{:?}",
            String::from_utf8_lossy(wrong)
        );
    }
    assert!(!token.accepts(None));
    assert!(AdminConfig::default().token().unwrap().is_none());
}

#[test]
fn protocol_and_tls_must_agree_and_errors_name_the_protocol_line() {
    let service = |extra: &str| {
        format!("services:\n  a:\n    routes: [{{path_prefix: /a}}]\n    upstreams: [\"127.0.0.1:1\"]\n{extra}")
    };
    let e = parse(&service("    protocol: h2\n")).unwrap_err();
    assert_eq!(e.field, "services.a.protocol", "{e}");
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("tls: true"), "{e}");
    let e = parse(&service("    tls: true\n    protocol: h2c\n")).unwrap_err();
    assert_eq!(e.field, "services.a.protocol", "{e}");
    assert_eq!(e.line, Some(6), "{e}");
    let e = parse(&service("    protocol: http2\n")).unwrap_err();
    assert_eq!(e.line, Some(5), "{e}");
    assert!(e.message.contains("h2c"), "{e}");
    let e = parse(&service("    health_check: {grpc: true}\n")).unwrap_err();
    assert!(e.field.starts_with("services.a.health_check"), "{e}");
    let e = parse(&service(
        "    protocol: grpc\n    circuit_breaker: {grpc_failure_codes: [14, 17]}\n",
    ))
    .unwrap_err();
    assert_eq!(
        e.field, "services.a.circuit_breaker.grpc_failure_codes",
        "{e}"
    );
    for ok in [
        "    protocol: h2\n    tls: true\n",
        "    protocol: h2c\n    health_check: {path: /health}\n",
        "    protocol: grpc\n    health_check: {grpc: true, grpc_service: svc}\n",
        "    protocol: grpc\n    tls: true\n",
    ] {
        let c = parse(&service(ok)).unwrap_or_else(|e| panic!("{ok}: {e}"));
        assert_ne!(
            c.services["a"].protocol,
            crate::upstream::peer::Protocol::Http1
        );
    }
}
