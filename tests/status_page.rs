//! The live status page of the admin listener: `/status.json` (what the page polls) against
//! real traffic, the page's own assets and headers, and the page itself in a real browser,
//! headless Chromium, which must show an open breaker once an upstream fails.
//!
//! Chromium is Debian's `chromium` package, which `scripts/install-deps --test` installs. A
//! missing browser fails the test loudly instead of skipping it: CI installs it.

mod common;

use common::{client, poll_until, Gateway, Upstream};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn config(users: &[&Upstream], orders: &Upstream) -> String {
    let users: Vec<String> = users.iter().map(|u| format!("\"{}\"", u.addr)).collect();
    format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
access_log: false
services:
  users:
    routes: [{{path_prefix: /users}}, {{path_prefix: /people, host: "api.example.com"}}]
    upstreams: [{users}]
  orders:
    routes: [{{path_prefix: /orders}}]
    upstreams: ["{orders}"]
    retries: 0
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 60s}}
"#,
        users = users.join(", "),
        orders = orders.addr
    )
}

fn status(gw: &Gateway) -> Value {
    let resp = client().get(gw.admin_url("/status.json")).send().unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().unwrap()
}

fn service<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no service {name} in {status}"))
}

/// Makes `orders` fail until its breaker opens.
fn open_the_orders_breaker(gw: &Gateway, orders: &Upstream) {
    orders.fail(500);
    let http = client();
    poll_until(
        Duration::from_secs(10),
        "the orders breaker to open",
        || {
            let _ = http.get(gw.url("/orders/7")).send();
            service(&status(gw), "orders")["upstreams"][0]["state"] == "open"
        },
    );
}

#[test]
fn status_json_reports_services_upstreams_and_the_last_minute() {
    let (u1, u2, orders) = (
        Upstream::start("users"),
        Upstream::start("users"),
        Upstream::start("orders"),
    );
    let gw = Gateway::start(&config(&[&u1, &u2], &orders));
    let http = client();
    for i in 0..20 {
        let resp = http
            .get(gw.url(&format!("/users/{}", i % 3 + 1)))
            .send()
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // The sampler reads the counters once a second: wait for a sample after the traffic.
    let mut s = Value::Null;
    poll_until(
        Duration::from_secs(10),
        "the requests in the last minute",
        || {
            s = status(&gw);
            service(&s, "users")["last_minute"]["requests"] == 20
        },
    );
    let users = service(&s, "users");
    let routes: Vec<String> = users["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}{}",
                r["host"].as_str().unwrap_or(""),
                r["path_prefix"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(routes.len(), 2);
    assert!(routes.contains(&"/users".to_string()), "{routes:?}");
    assert!(
        routes.contains(&"api.example.com/people".to_string()),
        "{routes:?}"
    );
    let ups = users["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 2);
    assert!(ups
        .iter()
        .all(|u| u["state"] == "closed" && u["healthy"] == true));
    let m = &users["last_minute"];
    assert_eq!(m["error_rate"], 0.0);
    assert!(m["p50_ms"].as_f64().unwrap() > 0.0, "{m}");
    assert!(
        m["p99_ms"].as_f64().unwrap() >= m["p50_ms"].as_f64().unwrap(),
        "{m}"
    );
    assert!(m["rps"].as_f64().unwrap() > 0.0, "{m}");
    let series = &users["series"]["rps"];
    assert!(series.as_array().unwrap().len() <= 60);
    assert!(series
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v.as_f64() > Some(0.0)));
    assert_eq!(s["ready"], true);
    assert_eq!(s["reloads"]["error"], 0);
    assert!(s["started_at"].as_str().unwrap().ends_with('Z'));

    open_the_orders_breaker(&gw, &orders);
    let s = status(&gw);
    let up = &service(&s, "orders")["upstreams"][0];
    let half_open_in = up["half_open_in_ms"].as_u64().unwrap();
    assert!(half_open_in > 50_000 && half_open_in <= 60_000, "{up}");
    poll_until(
        Duration::from_secs(10),
        "the errors in the last minute",
        || service(&status(&gw), "orders")["last_minute"]["error_rate"].as_f64() > Some(0.0),
    );
}

#[test]
fn the_page_and_its_assets_are_served_with_a_strict_policy() {
    let orders = Upstream::start("orders");
    let users = Upstream::start("users");
    let gw = Gateway::start(&config(&[&users], &orders));
    let http = client();
    for (path, content_type, needle) in [
        ("/status", "text/html", "/status.js"),
        ("/status.js", "text/javascript", "/status.json"),
        ("/status.css", "text/css", ".badge"),
    ] {
        let resp = http.get(gw.admin_url(path)).send().unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        let h = resp.headers().clone();
        assert!(
            h["content-type"]
                .to_str()
                .unwrap()
                .starts_with(content_type),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
        let body = resp.text().unwrap();
        assert!(body.contains(needle), "{path}");
        // Everything is embedded: nothing is loaded from another origin.
        for external in ["src=\"http", "href=\"http", "url(", "fetch(\"http", "//cdn"] {
            assert!(!body.contains(external), "{path} loads {external}...");
        }
    }
    let resp = http.post(gw.admin_url("/status.json")).send().unwrap();
    assert_eq!(resp.status(), 405);
}

/// Debian's Chromium; fails loudly when it is missing.
fn chromium() -> &'static str {
    for bin in ["chromium", "chromium-browser"] {
        if Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return bin;
        }
    }
    panic!(
        "headless Chromium is needed for the status page test and was not found: run \
         `scripts/install-deps --test` (apt-get install -y chromium)"
    );
}

/// Runs headless Chromium on `url` with its own empty profile, after the page's script has
/// run for `budget_ms` of virtual time; returns its stdout.
fn run_chromium(url: &str, profile: &Path, extra: &[&str], budget_ms: u32) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .args(extra)
        .arg(url)
        .output()
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn headless_chromium_shows_the_open_breaker() {
    let users = Upstream::start("users");
    let orders = Upstream::start("orders");
    let gw = Gateway::start(&config(&[&users], &orders));
    let http = client();
    for i in 0..10 {
        assert_eq!(
            http.get(gw.url(&format!("/users/{i}")))
                .send()
                .unwrap()
                .status(),
            200
        );
    }
    open_the_orders_breaker(&gw, &orders);

    let url = gw.admin_url("/status");
    let mut dom = String::new();
    // The page renders after its first poll; a loaded machine may need a second try.
    for attempt in 0..3 {
        let profile = tempfile::tempdir().unwrap();
        dom = run_chromium(&url, profile.path(), &["--dump-dom"], 5000 + attempt * 5000);
        if dom.contains("data-loaded=\"true\"") {
            break;
        }
    }
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page never rendered:\n{dom}"
    );
    let row = dom
        .split("<tr ")
        .find(|tr| tr.contains(&format!("data-upstream=\"{}\"", orders.addr)))
        .unwrap_or_else(|| panic!("no row for {} in:\n{dom}", orders.addr));
    assert!(row.contains("data-state=\"open\""), "{row}");
    assert!(row.contains("half-open in"), "{row}");
    let users_row = dom
        .split("<tr ")
        .find(|tr| tr.contains(&format!("data-upstream=\"{}\"", users.addr)))
        .unwrap();
    assert!(users_row.contains("data-state=\"closed\""), "{users_row}");
    assert!(
        dom.contains("class=\"service degraded\" data-service=\"orders\""),
        "{dom}"
    );

    // A screenshot, as a person would see it (kept next to the gateway's logs).
    let profile = tempfile::tempdir().unwrap();
    let png = gw.dir.path().join("status.png");
    run_chromium(
        &url,
        profile.path(),
        &[
            &format!("--screenshot={}", png.display()),
            "--window-size=1200,900",
        ],
        5000,
    );
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(bytes.len() > 10_000, "a blank page? {} bytes", bytes.len());
    if let Ok(dir) = std::env::var("BREAKWATER_SCREENSHOT_DIR") {
        std::fs::copy(&png, Path::new(&dir).join("status-page-test.png")).unwrap();
    }
}
