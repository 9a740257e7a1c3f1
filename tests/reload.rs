//! Hot reload, end to end: the config file is rewritten under steady load and a new process
//! takes over the listening sockets without one failed request.

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

#[test]
fn ten_config_changes_under_load_lose_no_request() {
    let up = Upstream::start("users");
    let gw = Gateway::start(&config(&up.addr, 0));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
            let url = gw.url("/users/1");
            thread::spawn(move || {
                // A keep-alive client, as real callers use.
                let c = client();
                let mut sent = 0;
                while !stop.load(Ordering::Relaxed) && sent < 200_000 {
                    sent += 1;
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

    // Checks use fresh connections: a kept-alive one would stay with the old process until
    // it drains.
    let c = fresh_client();
    let mut pids = vec![served_pid(&gw)];
    for i in 1..=10 {
        gw.write_config(&config(&up.addr, i));
        // The change is visible: the route added by this version answers.
        poll_until(
            Duration::from_secs(10),
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
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(ok.load(Ordering::Relaxed) > 100, "too little load");
    assert_eq!(pids.len(), 11);
    let m = gw.metrics();
    assert!(
        m.contains(r#"breakwater_config_reloads_total{result="success"} 1"#),
        "{m}"
    );
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
