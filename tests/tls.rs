//! TLS, end to end: termination on `server.tls` listeners, and HTTPS to upstreams whose
//! certificate is verified unless `tls_verify: false`.

mod common;

use common::{client, free_port, Gateway, Upstream};
use serde_json::Value;

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn tls_client() -> reqwest::blocking::Client {
    let ca = std::fs::read(fixture("tls_cert.pem")).unwrap();
    reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .no_proxy()
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .unwrap()
}

/// A gateway serving `users` over HTTPS on `tls_port`, in front of `up`.
fn tls_gateway(up: &Upstream, tls_port: u16) -> Gateway {
    Gateway::start(&format!(
        r#"
server:
  listen: ["${{LISTEN}}"]
  tls: [{{listen: "127.0.0.1:{tls_port}", cert: "{}", key: "{}"}}]
admin: {{listen: "${{ADMIN}}"}}
services:
  users: {{routes: [{{path_prefix: /users}}], upstreams: ["{}"]}}
"#,
        fixture("tls_cert.pem"),
        fixture("tls_key.pem"),
        up.addr
    ))
}

#[test]
fn tls_listeners_terminate_https_and_send_hsts() {
    let up = Upstream::start("users");
    let tls_port = free_port();
    let gw = tls_gateway(&up, tls_port);
    let resp = tls_client()
        .get(format!("https://localhost:{tls_port}/users/1"))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("strict-transport-security"));
    let body: Value = resp.json().unwrap();
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");

    // The plain listener still answers, without HSTS.
    let resp = client().get(gw.url("/users/1")).send().unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("strict-transport-security"));
}

#[test]
fn https_upstreams_are_verified_unless_told_otherwise() {
    let up = Upstream::start("users");
    let tls_port = free_port();
    // A TLS-terminating gateway plays the HTTPS upstream.
    let _https_upstream = tls_gateway(&up, tls_port);
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  trusting:
    routes: [{{path_prefix: /users}}]
    upstreams: ["localhost:{tls_port}"]
    tls: true
    tls_verify: false
    retries: 0
  verifying:
    routes: [{{path_prefix: /verified}}]
    upstreams: ["localhost:{tls_port}"]
    tls: true
    retries: 0
"#
    ));
    let resp = client().get(gw.url("/users/1")).send().unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().unwrap();
    assert_eq!(body["headers"]["x-forwarded-proto"], "https", "{body}");

    // The self-signed certificate is not trusted: the verifying service refuses it.
    let resp = client().get(gw.url("/verified/1")).send().unwrap();
    assert_eq!(resp.status(), 502);
    let body: Value = resp.json().unwrap();
    assert_eq!(body["service"], "verifying");
    assert_eq!(
        up.requests(),
        1,
        "only the trusting route reached the upstream"
    );
}
