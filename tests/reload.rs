//! Hot reload, end to end: a new process takes over the listening sockets without one failed
//! request, atomically (no new connection meets the old config once the new one answers),
//! only once it is sure to start (a broken certificate or a port it cannot bind leaves the old
//! process serving), and with the state worth keeping (open breakers, health verdicts, rate
//! limits).

mod common;

use common::{client, poll_until, Gateway, Upstream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

fn config(upstream: &str, extra_routes: usize) -> String {
    let mut yaml = format!(
        r#"
server:
  listen: ["${{LISTEN}}"]
  grace_period: 1s
  upgrade_sock: ${{DIR}}/upgrade.sock
  pid_file: ${{DIR}}/breakwater.pid
admin: {{listen: "${{ADMIN}}"}}
access_log: false
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{upstream}"]
"#
    );
    for i in 1..=extra_routes {
        yaml.push_str(&format!(
            "  v{i}:\n    routes: [{{path_prefix: /v{i}}}]\n    upstreams: [\"{upstream}\"]\n"
        ));
    }
    yaml
}

fn fresh_client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .unwrap()
}

fn served_pid(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.dir.path().join("breakwater.pid"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// Requests sent in a loop until stopped, each a success or a recorded failure.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    /// `keep_alive` clients reuse their connection as real callers do; the others open a new
    /// connection for every request (the churn that once lost requests at a reload).
    fn start(url: String, keep_alive: usize, per_request: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::<String>::new()));
        let threads = (0..keep_alive + per_request)
            .map(|i| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                let url = url.clone();
                thread::spawn(move || {
                    let c = if i < keep_alive {
                        client()
                    } else {
                        fresh_client()
                    };
                    while !stop.load(Ordering::Relaxed) {
                        match c.get(&url).send() {
                            Ok(r) if r.status().is_success() => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(r) => failures
                                .lock()
                                .unwrap()
                                .push(format!("status {}", r.status())),
                            Err(e) => failures.lock().unwrap().push(format!("error {e}")),
                        }
                        thread::sleep(Duration::from_millis(2));
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    /// Stops and returns (successes, failures).
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[test]
fn ten_config_changes_under_load_lose_no_request() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(&up.addr, 0));
    let load = Load::start(gw.url("/users/1"), 2, 2);

    // Checks use fresh connections: a kept-alive one would stay with the old process until
    // it drains.
    let c = fresh_client();
    let mut pids = vec![served_pid(&gw)];
    for i in 1..=10 {
        gw.write_config(&config(&up.addr, i));
        // The change is visible: the route added by this version answers.
        poll_until(
            Duration::from_secs(15),
            &format!("reload {i} applied"),
            || {
                c.get(gw.url(&format!("/v{i}/x")))
                    .send()
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
            },
        );
        poll_until(Duration::from_secs(5), "new pid file", || {
            let pid = served_pid(&gw);
            !pid.is_empty() && !pids.contains(&pid)
        });
        pids.push(served_pid(&gw));
    }
    let (ok, failures) = load.finish();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 100, "too little load");
    assert_eq!(pids.len(), 11);
    let m = gw.metrics();
    assert!(
        m.contains(r#"breakwater_config_reloads_total{result="success"} 1"#),
        "{m}"
    );
}

#[test]
fn once_the_new_config_answers_no_new_connection_meets_the_old_one() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(&up.addr, 0));
    // Busy keep-alive clients on the old process while it hands over.
    let load = Load::start(gw.url("/users/1"), 2, 0);
    let c = fresh_client();
    for i in 1..=3 {
        gw.write_config(&config(&up.addr, i));
        // A new connection per request, as fast as they come: the route /v{i} exists only
        // in the new config. Once it answered, it must answer every time after.
        let url = gw.url(&format!("/v{i}/x"));
        poll_until(Duration::from_secs(15), "the new config answers", || {
            c.get(&url)
                .send()
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        });
        for n in 0..300 {
            let status = c.get(&url).send().map(|r| r.status().as_u16());
            assert_eq!(
                status.as_ref().ok(),
                Some(&200),
                "reload {i}: request {n} after the switch got {status:?}"
            );
        }
    }
    let (_, failures) = load.finish();
    assert!(failures.is_empty(), "{failures:?}");
}
#[test]
fn an_invalid_rewrite_keeps_the_old_config_serving() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(&up.addr, 1));
    let pid = served_pid(&gw);
    gw.write_config(&format!(
        "{}  broken:\n    routes: [{{path_prefix: /broken}}]\n    upstreams: [\"not-an-address\"]\n",
        config(&up.addr, 1)
    ));
    poll_until(Duration::from_secs(5), "reload refused and counted", || {
        gw.metrics()
            .contains(r#"breakwater_config_reloads_total{result="error"} 1"#)
    });
    assert!(
        gw.stderr().contains("services.broken.upstreams[0]"),
        "{}",
        gw.stderr()
    );
    let c = client();
    assert_eq!(c.get(gw.url("/v1/x")).send().unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/broken")).send().unwrap().status(), 404);
    assert_eq!(c.get(gw.admin_url("/ready")).send().unwrap().status(), 200);
    assert_eq!(served_pid(&gw), pid, "no new process for an invalid config");
    let c = fresh_client();

    // Fixing the file reloads it.
    gw.write_config(&config(&up.addr, 2));
    poll_until(Duration::from_secs(10), "fixed config applied", || {
        c.get(gw.url("/v2/x"))
            .send()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    });
}

#[test]
fn sighup_reloads() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(&up.addr, 0));
    let pid = served_pid(&gw);
    // Change the file and signal at once; the watcher and the signal may race, and either
    // way exactly one new process must take over.
    gw.write_config(&config(&up.addr, 1));
    let status = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let c = fresh_client();
    poll_until(Duration::from_secs(10), "reloaded on SIGHUP", || {
        c.get(gw.url("/v1/x"))
            .send()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    });
    poll_until(Duration::from_secs(5), "pid changed", || {
        let now = served_pid(&gw);
        !now.is_empty() && now != pid
    });
}

/// Kills the daemon named in a pid file when the test ends, however it ends.
struct KillOnDrop(std::path::PathBuf);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(&self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-9", pid.trim()])
                .status();
        }
    }
}

#[test]
fn a_daemonised_gateway_reloads_too() {
    let up = Upstream::start("users");
    let dir = tempfile::tempdir().unwrap();
    let [http, admin] = [common::free_port(), common::free_port()];
    let write = |routes: usize| {
        let yaml = config(&up.addr, routes)
            .replace("${LISTEN}", &format!("127.0.0.1:{http}"))
            .replace("${ADMIN}", &format!("127.0.0.1:{admin}"))
            .replace("${DIR}", &dir.path().display().to_string());
        let tmp = dir.path().join("gateway.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, dir.path().join("gateway.yaml")).unwrap();
    };
    write(0);
    let pid_file = dir.path().join("breakwater.pid");
    let _cleanup = KillOnDrop(pid_file.clone());
    let status = std::process::Command::new(common::GATEWAY_BIN)
        .args(["-d", "-c"])
        .arg(dir.path().join("gateway.yaml"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "the foreground part of -d exits 0");
    let c = fresh_client();
    let url = |path: &str| format!("http://127.0.0.1:{http}{path}");
    poll_until(Duration::from_secs(10), "daemon serving", || {
        c.get(url("/users/1"))
            .send()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    });
    let first = std::fs::read_to_string(&pid_file).unwrap();
    write(1);
    poll_until(Duration::from_secs(15), "daemon reloaded", || {
        c.get(url("/v1/x"))
            .send()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    });
    poll_until(Duration::from_secs(5), "new daemon pid", || {
        std::fs::read_to_string(&pid_file).is_ok_and(|p| p != first)
    });
}

fn fixture(name: &str) -> String {
    format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `breakwater reload -c <the gateway's file>`: (exit code, stdout + stderr).
fn breakwater_reload(gw: &Gateway) -> (i32, String) {
    let out = std::process::Command::new(common::GATEWAY_BIN)
        .arg("reload")
        .arg("-c")
        .arg(gw.config_path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn a_broken_certificate_leaves_the_old_process_serving() {
    let up = Upstream::start("users");
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(fixture("tls_cert.pem"), &cert).unwrap();
    std::fs::copy(fixture("tls_key.pem"), &key).unwrap();
    let tls_port = common::free_port();
    let with_tls = |routes: usize| {
        config(&up.addr, routes).replace(
            "  pid_file:",
            &format!(
                "  tls: [{{listen: \"127.0.0.1:{tls_port}\", cert: \"{}\", key: \"{}\"}}]\n  pid_file:",
                cert.display(),
                key.display()
            ),
        )
    };
    let gw = Gateway::start(&with_tls(0));
    let pid = served_pid(&gw);
    // The certificate is replaced by something that does not parse, the config by one that
    // would otherwise be fine; the operator asks for a reload.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64 at all\n").unwrap();
    gw.write_config(&with_tls(1));
    let (code, said) = breakwater_reload(&gw);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("refused"), "{said}");
    assert!(said.contains("server.tls[0].cert"), "{said}");
    assert!(gw
        .metrics()
        .contains(r#"breakwater_config_reloads_total{result="error"} 1"#));
    // The old process goes on serving, on both listeners, with its config.
    assert_eq!(served_pid(&gw), pid);
    let c = fresh_client();
    for _ in 0..20 {
        assert_eq!(c.get(gw.url("/users/1")).send().unwrap().status(), 200);
    }
    assert_eq!(c.get(gw.url("/v1/x")).send().unwrap().status(), 404);
    assert!(common::is_listening(&format!("127.0.0.1:{tls_port}")));
    // `check` refuses the same file for the same reason.
    let (code, stderr) = common::run_check_path(&gw.config_path());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("server.tls[0].cert"), "{stderr}");
}

#[test]
fn a_port_that_cannot_be_bound_leaves_the_old_process_serving() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(&up.addr, 0));
    let pid = served_pid(&gw);
    // Someone else holds the port the new config adds a listener on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    gw.write_config(&config(&up.addr, 1).replace(
        r#"listen: ["${LISTEN}"]"#,
        &format!(r#"listen: ["${{LISTEN}}", "{taken_addr}"]"#),
    ));
    let (code, said) = breakwater_reload(&gw);
    assert_eq!(code, 1, "{said}");
    assert!(
        said.contains(&format!("cannot listen on {taken_addr}")),
        "{said}"
    );
    assert_eq!(served_pid(&gw), pid);
    let c = fresh_client();
    assert_eq!(c.get(gw.url("/users/1")).send().unwrap().status(), 200);
    assert_eq!(c.get(gw.url("/v1/x")).send().unwrap().status(), 404);
    drop(taken);
    // Once the port is free the same file goes in.
    let (code, said) = breakwater_reload(&gw);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("reload applied"), "{said}");
    assert_eq!(c.get(gw.url("/v1/x")).send().unwrap().status(), 200);
}

#[test]
fn breakwater_reload_reports_applied_or_refused_with_the_reason() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(&up.addr, 0));
    gw.write_config(&config(&up.addr, 1));
    let (code, said) = breakwater_reload(&gw);
    assert_eq!(code, 0, "{said}");
    assert!(said.contains("reload applied: process"), "{said}");
    let c = fresh_client();
    assert_eq!(c.get(gw.url("/v1/x")).send().unwrap().status(), 200);

    gw.write_config(&format!(
        "{}    timeouts: {{connect: 2 parsecs}}\n",
        config(&up.addr, 1)
    ));
    let (code, said) = breakwater_reload(&gw);
    assert_eq!(code, 1, "{said}");
    assert!(said.contains("reload refused"), "{said}");
    assert!(
        said.contains("gateway.yaml:"),
        "names the file and line: {said}"
    );
    assert!(said.contains("timeouts"), "names the field: {said}");
    assert_eq!(c.get(gw.url("/v1/x")).send().unwrap().status(), 200);
}

#[test]
fn open_breakers_down_upstreams_and_rate_limits_survive_a_reload() {
    let users = Upstream::start("users");
    let orders = Upstream::start("orders");
    let flaky = Upstream::start("orders-2");
    let limited = Upstream::start("limited");
    let with_version = |version: usize| {
        format!(
            r#"
server:
  listen: ["${{LISTEN}}"]
  grace_period: 1s
  upgrade_sock: ${{DIR}}/upgrade.sock
  pid_file: ${{DIR}}/breakwater.pid
admin: {{listen: "${{ADMIN}}"}}
access_log: false
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{users}"]
  orders:
    routes: [{{path_prefix: /orders}}]
    upstreams: ["{orders}"]
    retries: 0
    circuit_breaker: {{failure_threshold: 2, reset_timeout: 60s}}
  pool:
    routes: [{{path_prefix: /pool}}]
    upstreams: ["{users}", "{flaky}"]
    health_check: {{path: /health, interval: 1h, healthy_threshold: 3}}
  limited:
    routes: [{{path_prefix: /limited}}]
    upstreams: ["{limited}"]
    rate_limit: {{requests_per_second: 0.1, burst: 2, key: ip}}
  v{version}:
    routes: [{{path_prefix: /v{version}}}]
    upstreams: ["{users}"]
"#,
            users = users.addr,
            orders = orders.addr,
            flaky = flaky.addr,
            limited = limited.addr,
        )
    };
    flaky.fail(500);
    let gw = Gateway::start(&with_version(0));
    let c = fresh_client();
    // orders fails twice: its breaker opens for 60 s.
    orders.fail(500);
    for _ in 0..2 {
        assert_eq!(c.get(gw.url("/orders/1")).send().unwrap().status(), 500);
    }
    assert_eq!(c.get(gw.url("/orders/1")).send().unwrap().status(), 503);
    orders.recover();
    // The flaky upstream failed its first check and is down; it recovers, but needs three
    // passes in a row, an hour apart, to count as healthy again.
    poll_until(Duration::from_secs(5), "flaky marked down", || {
        gw.metrics().contains(&format!(
            r#"breakwater_upstream_healthy{{service="pool",upstream="{}"}} 0"#,
            flaky.addr
        ))
    });
    flaky.recover();
    // The rate-limited client spends its burst.
    for _ in 0..2 {
        assert_eq!(c.get(gw.url("/limited/1")).send().unwrap().status(), 200);
    }
    assert_eq!(c.get(gw.url("/limited/1")).send().unwrap().status(), 429);

    gw.write_config(&with_version(1));
    let (code, said) = breakwater_reload(&gw);
    assert_eq!(code, 0, "{said}");
    let orders_seen = orders.requests();
    let flaky_seen = flaky.requests();
    // The breaker is still open: the fallback answers, the upstream sees nothing.
    let fallback = c.get(gw.url("/orders/1")).send().unwrap();
    assert_eq!(fallback.status(), 503);
    let retry_after: u64 = fallback.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (30..=60).contains(&retry_after),
        "retry-after {retry_after}"
    );
    assert_eq!(orders.requests(), orders_seen);
    // The down upstream stays out of rotation.
    for _ in 0..20 {
        assert_eq!(c.get(gw.url("/pool/1")).send().unwrap().status(), 200);
    }
    assert_eq!(
        flaky.requests(),
        flaky_seen,
        "no request to the down upstream"
    );
    let m = gw.metrics();
    assert!(
        m.contains(&format!(
            r#"breakwater_upstream_healthy{{service="pool",upstream="{}"}} 0"#,
            flaky.addr
        )),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            r#"breakwater_circuit_state{{service="orders",upstream="{}"}} 2"#,
            orders.addr
        )),
        "{m}"
    );
    // The bucket is still empty.
    assert_eq!(c.get(gw.url("/limited/1")).send().unwrap().status(), 429);
    assert_eq!(c.get(gw.url("/users/1")).send().unwrap().status(), 200);
}
