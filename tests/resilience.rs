//! Resilience, end to end: circuit breakers per upstream, fallbacks, budgeted retries and
//! least-request balancing, with the real binary and real upstreams that die on demand.

mod common;

use common::{client, poll_until, Gateway, Upstream};
use serde_json::Value;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn one_upstream_dies_its_breaker_opens_and_errors_stop() {
    let healthy = Upstream::start("users");
    let mut dying = Upstream::start("users");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{}", "{}"]
    retries: 0
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 30s}}
"#,
        healthy.addr, dying.addr
    ));
    let c = client();
    dying.kill();
    let mut errors = 0;
    for _ in 0..20 {
        if c.get(gw.url("/users/1")).send().unwrap().status() != 200 {
            errors += 1;
        }
    }
    assert_eq!(
        errors, 3,
        "exactly failure_threshold requests fail before the trip"
    );
    assert_eq!(gw.circuit_state("users", &dying.addr), "open");
    assert_eq!(gw.circuit_state("users", &healthy.addr), "closed");
    for _ in 0..50 {
        assert_eq!(c.get(gw.url("/users/1")).send().unwrap().status(), 200);
    }
    let m = gw.metrics();
    assert!(m.contains(&format!(
        "breakwater_circuit_state{{service=\"users\",upstream=\"{}\"}} 2",
        dying.addr
    )));
    assert!(m.contains(&format!(
        "breakwater_circuit_transitions_total{{service=\"users\",to=\"open\",upstream=\"{}\"}} 1",
        dying.addr
    )));
}

#[test]
fn connect_failures_are_retried_on_another_upstream_for_any_method() {
    let alive = Upstream::start("users");
    let dead = common::free_port();
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{}", "127.0.0.1:{dead}"]
    retries: 1
    retry_budget: {{percent: 100, min_per_second: 100}}
    circuit_breaker: {{failure_threshold: 1000, error_threshold_percentage: 0}}
"#,
        alive.addr
    ));
    let c = client();
    for i in 0..20 {
        let resp = if i % 2 == 0 {
            c.post(gw.url("/users")).body("{}").send().unwrap()
        } else {
            c.get(gw.url("/users/1")).send().unwrap()
        };
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(alive.requests(), 20);
    let m = gw.metrics();
    let attempted: u64 = m
        .lines()
        .find(|l| l.starts_with(r#"breakwater_retries_total{outcome="attempted",service="users"}"#))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0);
    // Round robin sends about every other first attempt to the dead upstream.
    assert!(attempted >= 5, "{attempted} retries:\n{m}");
}

#[test]
fn orders_dies_under_load_users_stay_healthy_and_orders_gets_fast_fallbacks() {
    let users = Upstream::start("users");
    let mut orders = Upstream::start("orders");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"], threads: 2}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users: {{routes: [{{path_prefix: /users}}], upstreams: ["{}"]}}
  orders:
    routes: [{{path_prefix: /orders}}]
    upstreams: ["{}"]
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 1s, max_reset_timeout: 2s}}
    health_check: {{interval: 300ms, timeout: 200ms}}
"#,
        users.addr, orders.addr
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let killed = Arc::new(Mutex::new(None::<Instant>));
    // (when, status, latency) per request.
    type Log = Arc<Mutex<Vec<(Instant, u16, Duration)>>>;
    let users_log: Log = Arc::default();
    let orders_log: Log = Arc::default();
    let mut threads = Vec::new();
    for (path, log) in [("/users/1", &users_log), ("/orders/1", &orders_log)] {
        let (stop, log, url) = (Arc::clone(&stop), Arc::clone(log), gw.url(path));
        threads.push(thread::spawn(move || {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let status = c.get(&url).send().map(|r| r.status().as_u16()).unwrap_or(0);
                log.lock().unwrap().push((t, status, t.elapsed()));
                thread::sleep(Duration::from_millis(5));
            }
        }));
    }
    thread::sleep(Duration::from_millis(700));
    orders.kill();
    *killed.lock().unwrap() = Some(Instant::now());
    poll_until(Duration::from_secs(3), "orders breaker open", || {
        gw.circuit_state("orders", &orders.addr) == "open"
    });
    let tripped = Instant::now();
    thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let killed = killed.lock().unwrap().unwrap();

    let users_log = users_log.lock().unwrap();
    assert!(users_log.len() > 50, "too little load: {}", users_log.len());
    assert!(
        users_log.iter().all(|(_, s, _)| *s == 200),
        "users saw errors"
    );
    let before: Vec<Duration> = users_log
        .iter()
        .filter(|(t, ..)| *t < killed)
        .map(|e| e.2)
        .collect();
    let after: Vec<Duration> = users_log
        .iter()
        .filter(|(t, ..)| *t >= killed)
        .map(|e| e.2)
        .collect();
    // Users' latency does not suffer from the orders outage (a loose bound: the machine is shared).
    assert!(
        median(after.clone()) <= median(before.clone()) * 5 + Duration::from_millis(5),
        "users median before {:?}, after {:?}",
        median(before),
        median(after)
    );

    let orders_log = orders_log.lock().unwrap();
    let fallbacks: Vec<Duration> = orders_log
        .iter()
        .filter(|(t, s, _)| *t >= tripped && *s == 503)
        .map(|e| e.2)
        .collect();
    assert!(fallbacks.len() > 20, "few fallbacks: {}", fallbacks.len());
    assert!(
        orders_log
            .iter()
            .filter(|(t, ..)| *t >= tripped)
            .all(|(_, s, _)| *s == 503),
        "after the trip orders answers only with the fallback"
    );
    assert!(
        median(fallbacks) < Duration::from_millis(20),
        "fallback is not fast"
    );
    let failed_attempts = orders_log.iter().filter(|(_, s, _)| *s == 502).count();
    assert!(
        failed_attempts <= 3 + 2,
        "{failed_attempts} requests hit the dead upstream"
    );

    let resp = client().get(gw.url("/orders/1")).send().unwrap();
    assert_eq!(resp.status(), 503);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    let body: Value = resp.json().unwrap();
    assert_eq!(body["error"], "orders service unavailable");
    assert!(gw
        .metrics()
        .contains("breakwater_circuit_rejected_total{service=\"orders\"}"));

    // Orders comes back: a passing health check half-opens the breaker and one probe closes it.
    orders.restart();
    let back = Instant::now();
    poll_until(Duration::from_secs(3), "orders recovered", || {
        client()
            .get(gw.url("/orders/1"))
            .send()
            .map(|r| r.status() == 200)
            .unwrap_or(false)
    });
    assert!(back.elapsed() < Duration::from_millis(2500));
    assert_eq!(gw.circuit_state("orders", &orders.addr), "closed");
}

#[test]
fn without_health_checks_the_breaker_closes_after_reset_timeout_and_one_probe() {
    let orders = Upstream::start("orders");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  orders:
    routes: [{{path_prefix: /orders}}]
    upstreams: ["{}"]
    circuit_breaker: {{failure_threshold: 2, reset_timeout: 1s}}
"#,
        orders.addr
    ));
    let c = client();
    orders.fail(500);
    for _ in 0..2 {
        assert_eq!(c.get(gw.url("/orders/1")).send().unwrap().status(), 500);
    }
    let opened = Instant::now();
    assert_eq!(gw.circuit_state("orders", &orders.addr), "open");
    orders.reset();
    assert_eq!(c.get(gw.url("/orders/1")).send().unwrap().status(), 503);
    assert_eq!(
        orders.requests(),
        0,
        "an open breaker sends nothing upstream"
    );
    orders.recover();
    poll_until(Duration::from_secs(3), "breaker closed", || {
        c.get(gw.url("/orders/1")).send().unwrap().status() == 200
    });
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "closed before reset_timeout: {took:?}"
    );
    assert!(took < Duration::from_millis(1800), "took {took:?}");
    assert_eq!(orders.requests(), 1, "exactly one probe closed it");
    assert_eq!(gw.circuit_state("orders", &orders.addr), "closed");
}

#[test]
fn a_post_that_reached_the_upstream_is_never_replayed() {
    let a = Upstream::start("orders");
    let b = Upstream::start("orders");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  orders:
    routes: [{{path_prefix: /orders}}]
    upstreams: ["{}", "{}"]
    retries: 2
    retry_budget: {{percent: 100, min_per_second: 100}}
    circuit_breaker: {{failure_threshold: 1000, error_threshold_percentage: 0}}
"#,
        a.addr, b.addr
    ));
    let c = client();
    // The upstream reads the request, then drops the connection without answering.
    let resp = c
        .post(gw.url("/orders?close=1"))
        .body("{\"pay\": 100}")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(a.requests() + b.requests(), 1, "the POST was replayed");

    // An idempotent GET is retried on the other upstream.
    a.reset();
    b.reset();
    let resp = c.get(gw.url("/orders/1?close=1")).send().unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(a.requests(), 1);
    assert_eq!(b.requests(), 1);
}

#[test]
fn a_retry_storm_is_capped_by_the_budget() {
    let a = Upstream::start("orders");
    let b = Upstream::start("orders");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  orders:
    routes: [{{path_prefix: /orders}}]
    upstreams: ["{}", "{}"]
    retries: 3
    retry_budget: {{percent: 20, min_per_second: 3}}
    circuit_breaker: {{failure_threshold: 0, error_threshold_percentage: 0}}
"#,
        a.addr, b.addr
    ));
    let c = client();
    let start = Instant::now();
    for _ in 0..100 {
        c.get(gw.url("/orders/1?close=1")).send().unwrap();
    }
    let secs = start.elapsed().as_secs_f64().ceil();
    let upstream_calls = a.requests() + b.requests();
    let retries = upstream_calls - 100;
    // Without a budget this would be 100 retries (one per request: only one other upstream).
    let cap = (0.2 * 100.0 + 3.0 * secs) as u64;
    assert!(retries <= cap, "{retries} retries > cap {cap} over {secs}s");
    assert!(
        retries >= 3,
        "the min_per_second floor allows some retries: {retries}"
    );
    let m = gw.metrics();
    assert!(m.contains(r#"breakwater_retries_total{outcome="budget_exhausted",service="orders"}"#));
}

#[test]
fn least_request_avoids_the_busy_upstream() {
    let fast = Upstream::start("users");
    let slow = Upstream::start("users");
    slow.delay(300);
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"], threads: 2}}
admin: {{listen: "${{ADMIN}}"}}
services:
  users:
    routes: [{{path_prefix: /users}}]
    upstreams: ["{}", "{}"]
    load_balancing: least_request
"#,
        fast.addr, slow.addr
    ));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let url = gw.url("/users/1");
            thread::spawn(move || {
                let c = client();
                for _ in 0..15 {
                    assert_eq!(c.get(&url).send().unwrap().status(), 200);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let (f, s) = (fast.requests(), slow.requests());
    assert_eq!(f + s, 90);
    assert!(s * 4 < f, "slow upstream got {s} of 90 (fast {f})");
}

#[test]
fn a_configured_fallback_is_served_as_written() {
    let dead = common::free_port();
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  recs:
    routes: [{{path_prefix: /recommendations}}]
    upstreams: ["127.0.0.1:{dead}"]
    health_check: {{interval: 200ms, timeout: 100ms}}
    fallback:
      status: 200
      content_type: application/json
      body: '{{"items": [], "degraded": true}}'
      headers: {{X-Fallback: "true", Retry-After: "7"}}
"#
    ));
    poll_until(Duration::from_secs(3), "fallback served", || {
        client()
            .get(gw.url("/recommendations"))
            .send()
            .unwrap()
            .headers()
            .contains_key("x-fallback")
    });
    let resp = client().get(gw.url("/recommendations")).send().unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["retry-after"], "7");
    let body: Value = resp.json().unwrap();
    assert_eq!(body["degraded"], true);
}

/// A client that reads a large response slowly: a small receive buffer and a pause between
/// small reads. It reports on `header` once the response header arrived, then reads on;
/// returns the body bytes it read.
fn slow_download(addr: &str, path: &str, header: std::sync::mpsc::Sender<u16>) -> usize {
    use socket2::{Domain, Socket, Type};
    use std::io::{Read, Write};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(64 * 1024).unwrap();
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    socket.connect(&addr.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut received = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut body_start = None;
    loop {
        let n = stream.read(&mut chunk).unwrap_or(0);
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
        if body_start.is_none() {
            if let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                body_start = Some(end + 4);
                let status = String::from_utf8_lossy(&received[9..12])
                    .parse()
                    .unwrap_or(0);
                let _ = header.send(status);
            }
        }
        // About 8 MB/s at most: the body below takes two seconds to read.
        thread::sleep(Duration::from_millis(8));
    }
    received.len() - body_start.unwrap_or(received.len())
}

#[test]
fn a_slow_reader_is_not_a_slow_call_and_does_not_hold_the_probe_slot() {
    // Larger than the socket buffers between the gateway and the client (the send buffer
    // grows to 4 MiB), so the gateway is still writing it long after the upstream answered.
    const BODY: usize = 16_000_000;
    let up = Upstream::start("big");
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  big:
    routes: [{{path_prefix: /}}]
    upstreams: ["{}"]
    retries: 0
    circuit_breaker:
      slow_call_threshold: 1s
      failure_threshold: 1
      reset_timeout: 1s
      half_open_requests: 1
      success_threshold: 2
"#,
        up.addr
    ));
    let path = format!("/big?bytes={BODY}");
    // A fast upstream, a client that takes two seconds or more to read what it sent; the
    // gateway is still writing it after one and a half.
    let (tx, rx) = std::sync::mpsc::channel();
    let started = Instant::now();
    assert_eq!(slow_download(&gw.http, &path, tx), BODY);
    assert_eq!(rx.recv().unwrap(), 200);
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "the download was not slow: {:?}",
        started.elapsed()
    );
    let c = gw.circuit("big", &up.addr);
    assert_eq!(c["state"], "closed", "{c}");
    assert_eq!(
        (c["window_calls"].as_u64(), c["window_failures"].as_u64()),
        (Some(1), Some(0))
    );

    // Open the breaker, let it half-open: the slow reader is its probe.
    up.fail(503);
    assert_eq!(client().get(gw.url("/x")).send().unwrap().status(), 503);
    assert_eq!(gw.circuit("big", &up.addr)["state"], "open");
    up.recover();
    poll_until(Duration::from_secs(5), "half open", || {
        gw.circuit("big", &up.addr)["state"] == "half_open"
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let (addr, slow_path) = (gw.http.clone(), path.clone());
    let reader = thread::spawn(move || slow_download(&addr, &slow_path, tx));
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)).unwrap(), 200);
    // Its header arrived: the probe succeeded and its slot is free while it still reads.
    let c = gw.circuit("big", &up.addr);
    assert_eq!(c["state"], "half_open", "{c}");
    assert_eq!(c["probes_in_flight"], 0, "{c}");
    assert!(
        !reader.is_finished(),
        "the probe finished too fast to show anything"
    );
    // So the next request is admitted as the second probe, and closes the breaker.
    assert_eq!(client().get(gw.url("/x")).send().unwrap().status(), 200);
    assert_eq!(gw.circuit("big", &up.addr)["state"], "closed");
    assert_eq!(reader.join().unwrap(), BODY);
}

/// An upstream that sends a response header promising `length` bytes, `sent` of them, then
/// closes the connection.
fn truncating_upstream(length: usize, sent: usize) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n"
                );
                let _ = stream.write_all(&vec![b'x'; sent]);
            });
        }
    });
    addr
}

#[test]
fn an_upstream_that_breaks_off_mid_body_counts_as_a_failure() {
    let up = truncating_upstream(1_000_000, 10_000);
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  broken:
    routes: [{{path_prefix: /}}]
    upstreams: ["{up}"]
    retries: 0
    circuit_breaker: {{failure_threshold: 2, reset_timeout: 30s}}
"#
    ));
    for i in 1..=2 {
        // The client gets the header and part of the body, then the connection closes.
        let r = common::raw_request(&gw.http, b"GET /x HTTP/1.1\r\nHost: gw\r\n\r\n");
        assert!(r.status == 200 || r.status == 0, "{r:?}");
        poll_until(Duration::from_secs(5), "the failure counted", || {
            gw.circuit("broken", &up)["window_failures"].as_u64() == Some(i)
        });
    }
    let c = gw.circuit("broken", &up);
    assert_eq!(c["state"], "open", "{c}");
    assert_eq!(c["window_calls"].as_u64(), Some(2), "{c}");
}
