//! The access log against the real binary: today's JSON line by default, field for field and
//! in order; a chosen list of JSON fields; the `combined` format to a file that `SIGUSR1`
//! reopens after logrotate moved it; and a file that cannot be opened refused at start.

mod common;

use common::{client, poll_until, run_check, Gateway, Upstream};
use std::process::Command;
use std::time::{Duration, SystemTime};

fn config(up: &Upstream, top: &str) -> String {
    format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
{top}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{up}"]
"#,
        up = up.addr
    )
}

fn wait_for_lines(read: impl Fn() -> String, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    poll_until(Duration::from_secs(10), "access log lines", || {
        lines = read().lines().map(str::to_owned).collect();
        lines.len() >= n
    });
    lines
}

/// The keys of a flat JSON object, in the order they are written.
fn keys_in_order(line: &str) -> Vec<String> {
    let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
    let mut keys: Vec<(usize, String)> = value
        .as_object()
        .unwrap()
        .keys()
        .map(|k| {
            let at = line
                .find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} in {line}"));
            (at, k.clone())
        })
        .collect();
    keys.sort();
    keys.into_iter().map(|(_, k)| k).collect()
}

#[test]
fn the_default_line_is_unchanged() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(&up, ""));
    let before = SystemTime::now();
    let resp = client().get(gw.url("/users/1")).send().unwrap();
    let after = SystemTime::now();
    assert_eq!(resp.status(), 200);
    let lines = wait_for_lines(|| gw.stdout(), 1);
    // The time the request ended, to the millisecond (derived from the monotonic clock
    // within a second of a system-time read).
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let ts = humantime::parse_rfc3339(v["ts"].as_str().unwrap()).unwrap();
    let slack = Duration::from_millis(5);
    assert!(
        ts + slack >= before && ts <= after + slack,
        "ts {} not between {} and {}",
        v["ts"],
        humantime::format_rfc3339_micros(before),
        humantime::format_rfc3339_micros(after)
    );
    assert_eq!(
        keys_in_order(&lines[0]),
        [
            "ts",
            "request_id",
            "client",
            "method",
            "host",
            "path",
            "status",
            "service",
            "upstream",
            "attempts",
            "duration_ms",
            "bytes_sent"
        ]
    );
    assert!(lines[0].starts_with("{\"ts\":\""), "{}", lines[0]);
}

#[test]
fn chosen_json_fields_in_their_order() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(
        &up,
        "tracing: {}\naccess_log: {format: json, fields: [status, path, trace_id, upstream]}",
    ));
    let resp = client().get(gw.url("/users/1")).send().unwrap();
    assert_eq!(resp.status(), 200);
    let lines = wait_for_lines(|| gw.stdout(), 1);
    assert_eq!(
        keys_in_order(&lines[0]),
        ["status", "path", "trace_id", "upstream"]
    );
    let v: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(v["status"], 200);
    assert_eq!(v["path"], "/users/1");
    assert_eq!(v["trace_id"].as_str().unwrap().len(), 32);
}

#[test]
fn combined_format_to_a_file_reopened_on_sigusr1() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(
        &up,
        "access_log: {format: combined, output: ${DIR}/access.log}",
    ));
    let log = gw.dir.path().join("access.log");
    let read = |path: &std::path::Path| std::fs::read_to_string(path).unwrap_or_default();
    let http = client();
    let resp = http
        .get(gw.url("/users/1?x=1"))
        .header("User-Agent", "curl/8 \"quoted\"\\")
        .header("Referer", "https://example.com/a b")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let lines = wait_for_lines(|| read(&log), 1);
    let line = &lines[0];
    // 127.0.0.1 - - [10/Oct/2000:13:55:36 +0000] "GET /users/1?x=1 HTTP/1.1" 200 N "ref" "ua"
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains(" +0000] \"GET /users/1?x=1 HTTP/1.1\" 200 "),
        "{line}"
    );
    assert!(
        line.ends_with(r#" "https://example.com/a b" "curl/8 \"quoted\"\\""#),
        "{line}"
    );
    assert!(!gw.stdout().contains("/users/1"), "the file only");

    // logrotate: move the file away, then SIGUSR1.
    let rotated = gw.dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    let status = Command::new("kill")
        .args(["-USR1", &gw.pid().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let resp = http.get(gw.url("/users/2")).send().unwrap();
    assert_eq!(resp.status(), 200);
    let lines = wait_for_lines(|| read(&log), 1);
    assert!(
        lines[0].contains("\"GET /users/2 HTTP/1.1\" 200"),
        "{lines:?}"
    );
    let old = read(&rotated);
    assert_eq!(old.lines().count(), 1, "{old}");
    assert!(old.contains("/users/1?x=1"));
    // The signal did not stop the gateway.
    assert_eq!(http.get(gw.url("/users/3")).send().unwrap().status(), 200);
}

#[test]
fn bad_access_log_sections_are_config_errors() {
    for (top, expect) in [
        ("access_log: {format: xml}", "format"),
        (
            "access_log: {format: combined, fields: [ts]}",
            "only with format: json",
        ),
        ("access_log: {fields: [ts, nope]}", "nope"),
        ("access_log: {fields: [ts, ts]}", "twice"),
        ("access_log: 3", "access_log"),
    ] {
        let yaml = format!(
            "{top}\nservices:\n  a:\n    routes: [{{path_prefix: /a}}]\n    upstreams: [\"127.0.0.1:1\"]\n"
        );
        let (code, stderr) = run_check(&yaml);
        assert_eq!(code, 2, "{top}: {stderr}");
        assert!(stderr.contains(expect), "{top}: {stderr}");
    }
}

#[test]
fn an_access_log_file_that_cannot_be_opened_stops_the_start() {
    let up = Upstream::start("users");
    let err = Gateway::try_start(&config(
        &up,
        "access_log: {output: /nonexistent-dir/access.log}",
    ))
    .err()
    .expect("start refused");
    assert!(err.contains("cannot open the access log"), "{err}");
}
