//! Who may change things through the admin listener: with `admin.token_file` or
//! `admin.token_env`, every mutating endpoint needs `Authorization: Bearer <token>`; without
//! a token, mutating endpoints answer only on a loopback listener (403 otherwise). Reading
//! (probes, metrics, circuits, the status page) needs no credential either way.

mod common;

use common::{client, run_check, Gateway, Upstream};
use serde_json::Value;

const TOKEN: &str = "s3cret-admin-token-0123456789";

fn config(up: &Upstream, admin: &str) -> String {
    format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {admin}
cache: {{backend: memory}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
    cache: {{ttl: 1m}}
"#,
        up = up.addr
    )
}

fn purge(gw: &Gateway, authorization: Option<&str>) -> (u16, Value, Option<String>) {
    let mut req = client().delete(gw.admin_url("/admin/cache?prefix=/users"));
    if let Some(a) = authorization {
        req = req.header("Authorization", a);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.json().unwrap_or(Value::Null);
    (status, body, challenge)
}

fn reads_need_no_token(gw: &Gateway) {
    for path in [
        "/health",
        "/ready",
        "/metrics",
        "/admin/circuits",
        "/status",
        "/status.json",
    ] {
        let resp = client().get(gw.admin_url(path)).send().unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
}

#[test]
fn with_a_token_writes_need_it() {
    let up = Upstream::start("users");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("admin-token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let gw = Gateway::start(&config(
        &up,
        &format!(
            "{{listen: \"${{ADMIN}}\", token_file: \"{}\"}}",
            file.display()
        ),
    ));
    reads_need_no_token(&gw);
    let wrong = [
        None,
        Some(String::new()),
        Some(TOKEN.to_string()),
        Some(format!("Basic {TOKEN}")),
        Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])),
        Some(format!("Bearer {TOKEN}x")),
        Some(format!("Bearer  {TOKEN}")),
        Some(format!("Bearer {}", TOKEN.to_uppercase())),
    ];
    for authorization in &wrong {
        let (status, body, challenge) = purge(&gw, authorization.as_deref());
        assert_eq!(status, 401, "{authorization:?}");
        assert!(
            body["error"].as_str().unwrap().contains("admin token"),
            "{body}"
        );
        assert!(challenge.unwrap().starts_with("Bearer"));
    }
    let (status, body, _) = purge(&gw, Some(&format!("Bearer {TOKEN}")));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["purged"], 0);
    // The scheme is case-insensitive (RFC 9110); the token is not.
    let (status, _, _) = purge(&gw, Some(&format!("bearer {TOKEN}")));
    assert_eq!(status, 200);
}

#[test]
fn without_a_token_writes_only_on_loopback() {
    let up = Upstream::start("users");
    // Loopback: as before.
    let gw = Gateway::start(&config(&up, "{listen: \"${ADMIN}\"}"));
    assert_eq!(purge(&gw, None).0, 200);
    drop(gw);

    // All interfaces, no token: reads work, writes are refused.
    let gw = Gateway::start(&config(&up, "{listen: \"0.0.0.0:${ADMIN_PORT}\"}"));
    reads_need_no_token(&gw);
    let (status, body, _) = purge(&gw, None);
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not on loopback"),
        "{body}"
    );
    // A token that is not configured opens nothing.
    assert_eq!(purge(&gw, Some(&format!("Bearer {TOKEN}"))).0, 403);
}

#[test]
fn admin_token_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("short");
    std::fs::write(&short, "tooshort\n").unwrap();
    let spaced = dir.path().join("spaced");
    std::fs::write(&spaced, "a token with spaces in it\n").unwrap();
    let ok = dir.path().join("ok");
    std::fs::write(&ok, TOKEN).unwrap();
    let missing = dir.path().join("missing");
    for (admin, expect) in [
        (
            "{token_env: BREAKWATER_TEST_UNSET_VAR_XYZ}".to_string(),
            "BREAKWATER_TEST_UNSET_VAR_XYZ is not set",
        ),
        (
            format!("{{token_file: \"{}\"}}", missing.display()),
            "cannot read",
        ),
        (
            format!("{{token_file: \"{}\"}}", short.display()),
            "at least 16",
        ),
        (
            format!("{{token_file: \"{}\"}}", spaced.display()),
            "printable ASCII",
        ),
        (
            format!("{{token_env: HOME, token_file: \"{}\"}}", ok.display()),
            "not both",
        ),
    ] {
        let yaml = format!(
            "admin: {admin}\nservices:\n  a:\n    routes: [{{path_prefix: /a}}]\n    upstreams: [\"127.0.0.1:1\"]\n"
        );
        let (code, stderr) = run_check(&yaml);
        assert_eq!(code, 2, "{admin}: {stderr}");
        assert!(stderr.contains(expect), "{admin}: {stderr}");
        assert!(stderr.contains("admin"), "{stderr}");
    }
}
