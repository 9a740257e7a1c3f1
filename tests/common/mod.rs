//! Shared integration-test harness: real processes, started and stopped from plain `#[test]`s.
//!
//! Owns the lifecycle of everything a scenario needs besides the test itself: `sample-service`
//! upstreams ([`Upstream`]), the gateway under test ([`Gateway`], plus [`run_check`] for
//! `breakwater check`), and a throwaway Redis ([`Redis`]). Each handle kills its process on drop,
//! so a panicking test leaves nothing running; helpers panic with the evidence (logs, last
//! status) instead of returning errors the test would have to unwrap.
//!
//! Use it with `mod common;` from any file in `tests/`.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const GATEWAY_BIN: &str = env!("CARGO_BIN_EXE_breakwater");

/// The `sample-service` binary: a workspace member of its own (`tools/sample-service`), built
/// into the same target directory as the gateway by `scripts/test` (`cargo test --all-targets`
/// alone builds that package only as a test harness). Cargo only passes the path of its own
/// package's binaries, hence the lookup next to the gateway.
pub fn sample_service_bin() -> PathBuf {
    let bin = Path::new(GATEWAY_BIN).with_file_name("sample-service");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `scripts/test` (or build it first with \
         `cargo build -p sample-service` in the same profile as the tests)",
        bin.display()
    );
    bin
}

/// How long a process gets to print its listening line or answer its readiness probe.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The gateway may wait for a first round of health checks before it reports ready.
const GATEWAY_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// A port released by a killed process can stay busy briefly; restarts retry this long.
const REBIND_TIMEOUT: Duration = Duration::from_secs(5);

/// A blocking client for talking to gateways and upstreams: 10 s timeout, and never an
/// `HTTP_PROXY` from the environment, which would silently reroute loopback traffic.
pub fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .expect("build reqwest client")
}

/// Calls `f` every 25 ms until it returns true; panics naming `what` after `timeout`.
pub fn poll_until<F: FnMut() -> bool>(timeout: Duration, what: &str, mut f: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// A loopback port that was free a moment ago. Another process can take it before the caller
/// binds it, so whoever uses it should retry on "address in use" (the handles below do).
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free ports: all are held at once while picking so none is handed out twice,
/// and none handed out earlier in this test process is handed out again. Tests run in
/// parallel, and the kernel may give a port just released to the next `bind(0)`: two gateways
/// configured with one admin port would have the second one's probe answered by the first.
pub fn free_ports(n: usize) -> Vec<u16> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral loopback port");
        let port = listener.local_addr().unwrap().port();
        // Held until the end, so the kernel cannot offer the same port twice in this loop.
        held.push(listener);
        if !handed_out.contains(&port) {
            handed_out.push(port);
            ports.push(port);
        }
    }
    ports
}

/// True if something accepts TCP connections on `addr` right now.
pub fn is_listening(addr: &str) -> bool {
    let addr = addr.parse().expect("socket address");
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

/// A number from `/proc/PID/status`, such as `VmRSS` (in KiB) or `Threads`.
pub fn proc_status(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

fn kill_child(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        // SIGKILL on Unix; the error only means it already exited, and `wait` reaps it either way.
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------
// Upstreams
// ---------------------------------------------------------------------------------------------

/// One `sample-service` instance in its own process. See `tools/sample-service` for what it
/// answers; the methods here drive its `/_control/*` endpoints.
pub struct Upstream {
    /// "127.0.0.1:PORT".
    pub addr: String,
    pub name: String,
    child: Option<Child>,
    /// Held open so the service exits on its own (`--exit-on-stdin-eof`) if the test process
    /// dies without running destructors, e.g. when a test run is interrupted.
    stdin: Option<ChildStdin>,
    http: reqwest::blocking::Client,
}

/// Why a spawn did not produce a listening line.
enum SpawnError {
    /// The process exited first; with a fixed port that is almost always "address in use".
    Exited(String),
    TimedOut,
}

fn spawn_sample(name: &str, listen: &str) -> Result<(Child, ChildStdin, String), SpawnError> {
    let bin = sample_service_bin();
    let mut child = Command::new(&bin)
        .args(["--listen", listen, "--name", name, "--exit-on-stdin-eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let stdin = child.stdin.take().unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();

    // The reader thread keeps draining stdout after the first line so the pipe can never fill.
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let _ = tx.send(lines.next().and_then(Result::ok));
        lines.for_each(drop);
    });
    match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(Some(line)) => {
            let addr = line
                .strip_prefix("listening on ")
                .unwrap_or_else(|| panic!("unexpected first line from sample-service: {line:?}"))
                .trim()
                .to_owned();
            // Forward later stderr (accept errors) to ours, where a failing test shows it.
            thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                if !text.is_empty() {
                    eprint!("{text}");
                }
            });
            Ok((child, stdin, addr))
        }
        Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
            let _ = child.kill();
            let _ = child.wait();
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            Err(SpawnError::Exited(text))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(SpawnError::TimedOut)
        }
    }
}

impl Upstream {
    /// Starts an instance named `name` (`users` and `orders` also serve entities) on an
    /// ephemeral port.
    pub fn start(name: &str) -> Upstream {
        match spawn_sample(name, "127.0.0.1:0") {
            Ok((child, stdin, addr)) => Upstream {
                addr,
                name: name.to_owned(),
                child: Some(child),
                stdin: Some(stdin),
                http: client(),
            },
            Err(SpawnError::Exited(stderr)) => {
                panic!("sample-service {name} exited before listening:\n{stderr}")
            }
            Err(SpawnError::TimedOut) => {
                panic!("sample-service {name} printed no listening line within {STARTUP_TIMEOUT:?}")
            }
        }
    }

    /// `http://ADDR{path}`, for talking to the upstream directly.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// SIGKILL: the upstream vanishes mid-flight, no graceful close. Idempotent.
    pub fn kill(&mut self) {
        self.stdin.take();
        kill_child(&mut self.child);
    }

    /// Starts the instance again on the same port, with fresh state (counters zero, no faults).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            match spawn_sample(&self.name, &self.addr) {
                Ok((child, stdin, addr)) => {
                    assert_eq!(addr, self.addr, "restart came back on another address");
                    self.child = Some(child);
                    self.stdin = Some(stdin);
                    return;
                }
                Err(SpawnError::Exited(_)) if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(SpawnError::Exited(stderr)) => {
                    panic!(
                        "sample-service {} could not rebind {}:\n{stderr}",
                        self.name, self.addr
                    )
                }
                Err(SpawnError::TimedOut) => {
                    panic!(
                        "sample-service {} printed no listening line on restart",
                        self.name
                    )
                }
            }
        }
    }

    fn control(&self, method: reqwest::Method, action: &str) -> Value {
        let url = self.url(&format!("/_control/{action}"));
        let resp = self
            .http
            .request(method, &url)
            .send()
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        let status = resp.status();
        let body = resp.text().unwrap_or_default();
        assert!(status.is_success(), "{url}: {status} {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{url}: {e}: {body}"))
    }

    /// `{"requests", "health_checks", "by_method", "last_headers", "failing", "delay_ms", ...}`.
    pub fn stats(&self) -> Value {
        self.control(reqwest::Method::GET, "stats")
    }

    /// Non-control, non-health requests received since start or the last `reset`.
    pub fn requests(&self) -> u64 {
        self.stats()["requests"].as_u64().expect("stats.requests")
    }

    pub fn health_checks(&self) -> u64 {
        self.stats()["health_checks"]
            .as_u64()
            .expect("stats.health_checks")
    }

    /// Zeroes the counters; faults stay as they are.
    pub fn reset(&self) {
        self.control(reqwest::Method::POST, "reset");
    }

    /// Every request, `/health` included, answers `status` from now on (0 = stop failing).
    pub fn fail(&self, status: u16) {
        self.control(reqwest::Method::POST, &format!("fail?status={status}"));
    }

    /// Clears every injected fault: failure status, delay and hang.
    pub fn recover(&self) {
        self.control(reqwest::Method::POST, "recover");
    }

    /// Delays every response, `/health` included, by `ms` (0 = no delay).
    pub fn delay(&self, ms: u64) {
        self.control(reqwest::Method::POST, &format!("delay?ms={ms}"));
    }

    /// Accepts connections but never answers (until `recover`); control endpoints still work.
    pub fn hang(&self) {
        self.control(reqwest::Method::POST, "hang");
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway
// ---------------------------------------------------------------------------------------------

/// A `breakwater` process running a config written into its own temp dir.
pub struct Gateway {
    /// Proxy listener, "127.0.0.1:PORT" (the `${LISTEN}` placeholder).
    pub http: String,
    /// Admin listener, "127.0.0.1:PORT" (the `${ADMIN}` placeholder).
    pub admin: String,
    /// Holds `gateway.yaml`, `stdout.log` and `stderr.log`; removed on drop. Templates can
    /// name it as `${DIR}` (e.g. `upgrade_sock: ${DIR}/upgrade.sock`).
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    http_client: reqwest::blocking::Client,
}

impl Gateway {
    /// Starts the gateway and waits until `GET /ready` on the admin port answers 200.
    /// Panics with the gateway's stderr if it exits or is not ready within 20 s.
    pub fn start(config_template: &str) -> Gateway {
        Gateway::try_start(config_template).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `start`, but returns the failure (with the gateway's stderr) instead of panicking,
    /// for tests that expect a config to be refused at startup.
    pub fn try_start(config_template: &str) -> Result<Gateway, String> {
        Gateway::start_waiting_for(config_template, "/ready", &[])
    }

    /// Starts the gateway and returns once its admin listener answers `GET /health`, without
    /// waiting for readiness (for tests of what makes it ready).
    pub fn start_live(config_template: &str) -> Gateway {
        Gateway::start_waiting_for(config_template, "/health", &[])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like `start`, with extra environment variables for the gateway process.
    pub fn start_with_env(config_template: &str, env: &[(&str, &str)]) -> Gateway {
        Gateway::start_waiting_for(config_template, "/ready", env).unwrap_or_else(|e| panic!("{e}"))
    }

    fn start_waiting_for(
        config_template: &str,
        probe_path: &str,
        env: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        // The ports are picked free and released before the gateway binds them, so another
        // process can win the race; that shows up as "in use" and is worth a fresh pair.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Gateway::start_once(config_template, probe_path, env) {
                Err(e) if attempt < 5 && e.contains("in use") => continue,
                result => return result,
            }
        }
    }

    fn start_once(
        config_template: &str,
        probe_path: &str,
        env: &[(&str, &str)],
    ) -> Result<Gateway, String> {
        let ports = free_ports(2);
        let dir = tempfile::Builder::new()
            .prefix("breakwater-test-")
            .tempdir()
            .map_err(|e| format!("create temp dir: {e}"))?;
        let mut gw = Gateway {
            http: format!("127.0.0.1:{}", ports[0]),
            admin: format!("127.0.0.1:{}", ports[1]),
            dir,
            child: None,
            http_client: client(),
        };
        gw.write_config(config_template);
        let log = |name: &str| {
            File::create(gw.dir.path().join(name)).map_err(|e| format!("create {name}: {e}"))
        };
        // Logs go to files: a pipe nobody reads would eventually block the gateway's logging.
        let child = Command::new(GATEWAY_BIN)
            .arg("-c")
            .arg(gw.config_path())
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log("stdout.log")?)
            .stderr(log("stderr.log")?)
            .spawn()
            .map_err(|e| format!("spawn {GATEWAY_BIN}: {e}"))?;
        gw.child = Some(child);

        // A short per-probe timeout: a gateway that accepts but stalls must not eat the deadline.
        let probe = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(1))
            .no_proxy()
            .build()
            .expect("build reqwest client");
        let ready = gw.admin_url(probe_path);
        let deadline = Instant::now() + GATEWAY_READY_TIMEOUT;
        loop {
            if let Some(status) = gw.child.as_mut().unwrap().try_wait().ok().flatten() {
                gw.child = None;
                return Err(format!(
                    "gateway exited with {status} before it was ready\n--- stderr.log ---\n{}",
                    gw.stderr()
                ));
            }
            // Pingora retries a bind that failed because the port is in use: another process
            // won the race for a port picked above. Start again on fresh ports rather than
            // wait for it, or test against whatever answers there.
            let answer = probe.get(&ready).send();
            let start_again = |gw: &mut Gateway| {
                gw.kill();
                Err(format!("a port of {} or {} is in use", gw.http, gw.admin))
            };
            if gw.lost_a_port() {
                return start_again(&mut gw);
            }
            let last = match answer {
                Ok(r) if r.status() == reqwest::StatusCode::OK => {
                    // Ready means every listener accepts: checked on every start.
                    if probe_path == "/ready"
                        && config_template.contains("${LISTEN}")
                        && !is_listening(&gw.http)
                    {
                        // Unless what answered was another process on a port this gateway
                        // has not bound yet: Pingora says so as soon as its bind fails.
                        let give_up = Instant::now() + Duration::from_secs(3);
                        while Instant::now() < give_up && !is_listening(&gw.http) {
                            if gw.lost_a_port() {
                                return start_again(&mut gw);
                            }
                            thread::sleep(Duration::from_millis(50));
                        }
                        gw.kill();
                        return Err(format!(
                            "{ready} answered 200 before the proxy port {} accepted \
                             connections\n--- stderr.log ---\n{}",
                            gw.http,
                            gw.stderr()
                        ));
                    }
                    return Ok(gw);
                }
                Ok(r) => format!("{} {}", r.status(), r.text().unwrap_or_default()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                gw.kill();
                return Err(format!(
                    "gateway not ready within {GATEWAY_READY_TIMEOUT:?} (last {ready}: {last})\n\
                     --- stderr.log ---\n{}",
                    gw.stderr()
                ));
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether Pingora found the proxy or admin port taken by another process.
    fn lost_a_port(&self) -> bool {
        let stderr = self.stderr();
        [&self.http, &self.admin]
            .iter()
            .any(|addr| stderr.contains(&format!("{addr} is in use")))
    }

    /// Substitutes this gateway's `${LISTEN}`/`${ADMIN}` (`${ADMIN_PORT}` is the admin
    /// listener's port alone, e.g. for `0.0.0.0:${ADMIN_PORT}`) and (re)writes `gateway.yaml`,
    /// e.g. to test a reload with a changed config.
    pub fn write_config(&self, config_template: &str) {
        let admin_port = self.admin.rsplit(':').next().unwrap_or_default();
        let yaml = config_template
            .replace("${ADMIN_PORT}", admin_port)
            .replace("${LISTEN}", &self.http)
            .replace("${ADMIN}", &self.admin)
            .replace("${DIR}", &self.dir.path().display().to_string());
        // Write-then-rename, as config management does, so a watcher never sees half a file.
        let tmp = self.dir.path().join("gateway.yaml.tmp");
        std::fs::write(&tmp, yaml).expect("write gateway.yaml");
        std::fs::rename(&tmp, self.config_path()).expect("rename gateway.yaml");
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("gateway.yaml")
    }

    /// `http://LISTEN{path}`: a request through the proxy.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// `http://ADMIN{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    /// The Prometheus exposition from `GET /metrics` on the admin port.
    /// The breaker's view of one upstream of `service`, from `/admin/circuits` (`null` when
    /// the upstream is not listed).
    pub fn circuit(&self, service: &str, upstream: &str) -> Value {
        let body: Value = self
            .http_client
            .get(self.admin_url("/admin/circuits"))
            .send()
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("GET /admin/circuits: {e}"));
        body["services"][service]["upstreams"]
            .as_array()
            .and_then(|list| list.iter().find(|u| u["upstream"] == upstream))
            .cloned()
            .unwrap_or_default()
    }

    /// The breaker state (`closed`, `open`, `half_open`) of one upstream, or "" when unlisted.
    pub fn circuit_state(&self, service: &str, upstream: &str) -> String {
        self.circuit(service, upstream)["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The value of one counter or gauge series, e.g. `breakwater_x_total{service="a"}`,
    /// from `/metrics`; 0 while the series is not there yet.
    pub fn metric(&self, series: &str) -> u64 {
        let prefix = format!("{series} ");
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
    }

    pub fn metrics(&self) -> String {
        let url = self.admin_url("/metrics");
        let resp = self
            .http_client
            .get(&url)
            .send()
            .unwrap_or_else(|e| panic!("{url}: {e}"));
        assert!(resp.status().is_success(), "{url}: {}", resp.status());
        resp.text().expect("metrics body")
    }

    pub fn stderr(&self) -> String {
        read_lossy(&self.dir.path().join("stderr.log"))
    }

    pub fn stdout(&self) -> String {
        read_lossy(&self.dir.path().join("stdout.log"))
    }

    /// Process id, for tests that signal the gateway themselves (reload, graceful shutdown).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the gateway process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// SIGKILL and reap. Idempotent. Also kills the process named in `${DIR}/breakwater.pid`,
    /// which after a hot reload is a successor process rather than our child, and any other
    /// process started with this gateway's config: a successor still in its handover has not
    /// written the pid file yet, and once its predecessor is gone it serves on by design.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
        if let Ok(pid) = std::fs::read_to_string(self.dir.path().join("breakwater.pid")) {
            let _ = Command::new("kill")
                .args(["-9", pid.trim()])
                .stderr(Stdio::null())
                .status();
        }
        // The temp dir's name is unique to this gateway, so the pattern matches only its own.
        let _ = Command::new("pkill")
            .args(["-9", "-f", "--"])
            .arg(self.config_path())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        // The temp dir and its logs vanish with us, so a failing test shows them now.
        if thread::panicking() {
            eprintln!(
                "--- gateway stderr.log (tail) ---\n{}\n--- gateway stdout.log (tail) ---\n{}",
                tail(&self.stderr(), 60),
                tail(&self.stdout(), 20)
            );
        }
    }
}

/// Runs `breakwater check -c <tmp>/gateway.yaml` on `yaml` and returns (exit code, stderr).
/// `${LISTEN}`/`${ADMIN}` are replaced with free ports so gateway templates can be checked too.
pub fn run_check(yaml: &str) -> (i32, String) {
    let dir = tempfile::tempdir().expect("create temp dir");
    let path = dir.path().join("gateway.yaml");
    let ports = free_ports(2);
    let yaml = yaml
        .replace("${LISTEN}", &format!("127.0.0.1:{}", ports[0]))
        .replace("${ADMIN}", &format!("127.0.0.1:{}", ports[1]));
    std::fs::write(&path, yaml).expect("write gateway.yaml");
    run_check_path(&path)
}

/// Runs `breakwater check -c <path>` (e.g. on the shipped `conf/*.yaml`).
pub fn run_check_path(path: &Path) -> (i32, String) {
    let out = Command::new(GATEWAY_BIN)
        .arg("check")
        .arg("-c")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run {GATEWAY_BIN} check: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// A private, non-persistent `redis-server` on a free loopback port.
pub struct Redis {
    pub port: u16,
    /// "redis://127.0.0.1:PORT".
    pub url: String,
    child: Option<Child>,
    /// Working directory, so nothing redis writes can land in the repo.
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts redis-server and waits until it answers PING. Panics if it is not installed:
    /// features that depend on Redis are tested, not skipped.
    pub fn start() -> Redis {
        for attempt in 1.. {
            let port = free_port();
            let mut redis = Redis {
                port,
                url: format!("redis://127.0.0.1:{port}"),
                child: None,
                dir: tempfile::tempdir().expect("create temp dir"),
            };
            match redis.spawn_and_wait() {
                Ok(()) => return redis,
                // Most likely lost the free-port race: try another port.
                Err(e) if attempt < 3 && e.contains("exited") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!()
    }

    /// Starts redis-server on `port` (e.g. one a gateway was configured with before Redis
    /// was up). Panics if the port is taken.
    pub fn start_on(port: u16) -> Redis {
        let mut redis = Redis {
            port,
            url: format!("redis://127.0.0.1:{port}"),
            child: None,
            dir: tempfile::tempdir().expect("create temp dir"),
        };
        redis.spawn_and_wait().unwrap_or_else(|e| panic!("{e}"));
        redis
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "redis-server is not installed (not on PATH). The Redis-backed tests need it: run the \
                 test command from README.md, which installs it (e.g. `apt-get install -y redis-server`)."
            ),
            Err(e) => panic!("spawn redis-server: {e}"),
        };
        self.child = Some(child);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if self.ping() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().ok().flatten() {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited with {status}",
                    self.port
                ));
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!(
                    "redis-server on port {} did not answer PING within {STARTUP_TIMEOUT:?}",
                    self.port
                ));
            }
            thread::sleep(Duration::from_millis(25));
        }
    }

    /// One inline `PING` over a fresh connection; true if the answer is `+PONG`.
    pub fn ping(&self) -> bool {
        let addr = ([127, 0, 0, 1], self.port).into();
        let Ok(mut conn) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
            return false;
        };
        let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
        if conn.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 7];
        conn.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// SIGKILL: Redis disappears without closing connections cleanly. Idempotent.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Starts redis-server again on the same port (empty: nothing is persisted).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(e) if Instant::now() < deadline && e.contains("exited") => {
                    thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("restart: {e}"),
            }
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1, for what a client library would refuse to send (or would fix on the way)
// ---------------------------------------------------------------------------------------------

/// An answer read off the socket as it came.
#[derive(Debug)]
pub struct RawResponse {
    /// 0 when the connection closed without an answer.
    pub status: u16,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The status line and header lines as sent (names in their wire spelling), without the
    /// blank line that ends them.
    pub head: String,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON, `Value::Null` when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// Sends `request` as it is over a fresh connection to `addr` and reads one answer (to its
/// `Content-Length`, or until the connection closes).
pub fn raw_request(addr: &str, request: &[u8]) -> RawResponse {
    RawConnection::open(addr).request(request)
}

/// One client connection that sends raw requests one after another and reads each answer
/// (keep-alive): what a gateway carries from request to request on a connection is tested on
/// it.
pub struct RawConnection {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawConnection {
    pub fn open(addr: &str) -> RawConnection {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        RawConnection {
            stream,
            buf: Vec::new(),
        }
    }

    /// Sends `request` and reads its answer; status 0 when the connection closed first.
    pub fn request(&mut self, request: &[u8]) -> RawResponse {
        self.stream.write_all(request).expect("send the request");
        let mut chunk = [0u8; 16 * 1024];
        loop {
            if let Some((response, used)) = parse_raw_response(&self.buf) {
                self.buf.drain(..used);
                return response;
            }
            match self.stream.read(&mut chunk) {
                Ok(0) | Err(_) => {
                    return RawResponse {
                        status: 0,
                        headers: Vec::new(),
                        head: String::new(),
                        body: std::mem::take(&mut self.buf),
                    }
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// A complete response (header, then `Content-Length` bytes of body) at the start of `buf`,
/// if there is one, and how many bytes it took.
fn parse_raw_response(buf: &[u8]) -> Option<(RawResponse, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body = buf.get(end + 4..end + 4 + length)?.to_vec();
    let response = RawResponse {
        status,
        headers,
        head: head.into_owned(),
        body,
    };
    Some((response, end + 4 + length))
}

/// A one-worker tokio runtime and a listener on an ephemeral loopback port, with its
/// address: the start of every upstream a test writes with hyper. Keep the runtime alive as
/// long as the upstream must serve.
pub fn tokio_upstream_listener() -> (tokio::runtime::Runtime, tokio::net::TcpListener, String) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("local address").to_string();
    (runtime, listener, addr)
}

/// An HTTP/1 upstream written with hyper that counts the requests it gets and hands each
/// to `handler` with a gate: a response can hold back the rest of its body until the test
/// calls [`GatedUpstream::release`] (a stream whose first event must arrive alone).
pub struct GatedUpstream {
    pub addr: String,
    requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
    gate: std::sync::Arc<tokio::sync::Semaphore>,
    _runtime: tokio::runtime::Runtime,
}

impl GatedUpstream {
    pub fn start<F, Fut, B>(handler: F) -> GatedUpstream
    where
        F: Fn(hyper::Request<hyper::body::Incoming>, std::sync::Arc<tokio::sync::Semaphore>) -> Fut
            + Clone
            + Send
            + Sync
            + 'static,
        Fut: std::future::Future<Output = Result<hyper::Response<B>, std::convert::Infallible>>
            + Send
            + 'static,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let (runtime, listener, addr) = tokio_upstream_listener();
        let requests = Arc::new(AtomicU64::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let (count, held) = (Arc::clone(&requests), Arc::clone(&gate));
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (count, held, handler) =
                    (Arc::clone(&count), Arc::clone(&held), handler.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        count.fetch_add(1, Ordering::SeqCst);
                        handler(req, Arc::clone(&held))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        GatedUpstream {
            addr,
            requests,
            gate,
            _runtime: runtime,
        }
    }

    /// Lets one waiting (or the next) response send the rest of its body.
    pub fn release(&self) {
        self.gate.add_permits(1);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(std::sync::atomic::Ordering::SeqCst)
    }
}
