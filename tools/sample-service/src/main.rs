//! `sample-service`: the small, real HTTP/1.1 upstream behind the demo and the integration tests.
//!
//! One process serves one or more independent instances (`--listen ADDR --name NAME`, or repeated
//! `--service NAME=ADDR`). Every instance echoes what it received as JSON, answers `/health`, serves
//! deterministic `/users/{id}` or `/orders/{id}` entities depending on its name, and lets a test or a
//! demo inject faults per request (`?status=`, `?delay_ms=`, `?bytes=`, `?header=`, `?close=1`) or for
//! the whole instance through `/_control/*` (fail, delay, hang, recover, stats, reset).
//!
//! For each instance, once bound, it prints exactly one `listening on 127.0.0.1:PORT` line to stdout:
//! the test harness learns ephemeral ports (`--listen 127.0.0.1:0`) from it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

const USAGE: &str = "\
usage: sample-service [--listen ADDR] [--name NAME] [--service NAME=ADDR]... [--exit-on-stdin-eof]

  --listen ADDR         address of a single instance (default 127.0.0.1:0 when --name is given)
  --name NAME           service name of that instance (default \"sample\")
  --service NAME=ADDR   add an instance; repeatable, each instance has its own state
  --exit-on-stdin-eof   exit when stdin closes (the test harness uses it so that a killed
                        test run leaves no orphan upstreams behind)

Prints one `listening on ADDR` line per instance once all are bound.";

/// The largest `?bytes=` body we build; beyond it a typo would just eat the machine's memory.
const MAX_BYTES: usize = 256 * 1024 * 1024;

type Body = Full<Bytes>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The state of one instance. Everything a control endpoint can change or report lives here.
struct Instance {
    name: String,
    /// "127.0.0.1:PORT", as reported in `instance` and `X-Served-By`.
    addr: String,
    served_by: HeaderValue,
    requests: AtomicU64,
    health_checks: AtomicU64,
    by_method: Mutex<BTreeMap<String, u64>>,
    /// Headers of the last counted request. Health probes do not overwrite it, otherwise a
    /// gateway probing every second would race any test that inspects forwarded headers.
    last_headers: Mutex<Value>,
    /// 0 = healthy, otherwise the status every non-control request gets.
    fail_status: AtomicU16,
    delay_ms: AtomicU64,
    /// A watch rather than a flag so hung requests wake the moment `recover` is called.
    hang: watch::Sender<bool>,
}

impl Instance {
    fn new(name: String, addr: SocketAddr) -> Self {
        let addr = addr.to_string();
        Instance {
            served_by: HeaderValue::from_str(&addr).expect("a socket address is a valid header"),
            name,
            addr,
            requests: AtomicU64::new(0),
            health_checks: AtomicU64::new(0),
            by_method: Mutex::new(BTreeMap::new()),
            last_headers: Mutex::new(json!({})),
            fail_status: AtomicU16::new(0),
            delay_ms: AtomicU64::new(0),
            hang: watch::channel(false).0,
        }
    }

    fn stats(&self) -> Value {
        json!({
            "service": self.name,
            "instance": self.addr,
            "requests": self.requests.load(Ordering::Relaxed),
            "health_checks": self.health_checks.load(Ordering::Relaxed),
            "by_method": *self.by_method.lock().unwrap(),
            "last_headers": *self.last_headers.lock().unwrap(),
            "failing": self.fail_status.load(Ordering::Relaxed),
            "delay_ms": self.delay_ms.load(Ordering::Relaxed),
            "hanging": *self.hang.borrow(),
        })
    }

    fn reset(&self) {
        self.requests.store(0, Ordering::Relaxed);
        self.health_checks.store(0, Ordering::Relaxed);
        self.by_method.lock().unwrap().clear();
        *self.last_headers.lock().unwrap() = json!({});
    }
}

/// What the request asked for through its query string.
#[derive(Default)]
struct Overrides {
    status: Option<StatusCode>,
    delay_ms: u64,
    bytes: Option<usize>,
    headers: Vec<(HeaderName, HeaderValue)>,
    close: bool,
}

impl Overrides {
    fn parse(params: &[(String, String)]) -> Result<Self, String> {
        let mut o = Overrides::default();
        for (key, value) in params {
            match key.as_str() {
                "status" => o.status = Some(parse_status(value)?),
                "delay_ms" => o.delay_ms = parse_num(key, value)?,
                "bytes" => {
                    let n: usize = parse_num(key, value)?;
                    if n > MAX_BYTES {
                        return Err(format!("bytes={n} is above the {MAX_BYTES} limit"));
                    }
                    o.bytes = Some(n);
                }
                "header" => {
                    let (name, val) = value
                        .split_once(':')
                        .ok_or_else(|| format!("header={value:?} is not Name:Value"))?;
                    let name = HeaderName::from_bytes(name.trim().as_bytes())
                        .map_err(|_| format!("header name {name:?} is invalid"))?;
                    let val = HeaderValue::from_str(val.trim())
                        .map_err(|_| format!("header value {val:?} is invalid"))?;
                    o.headers.push((name, val));
                }
                "close" => o.close = value == "1" || value == "true",
                _ => {}
            }
        }
        Ok(o)
    }
}

fn parse_num<T: std::str::FromStr>(key: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("{key}={value:?} is not a non-negative integer"))
}

/// Only final statuses: hyper cannot send a 1xx as the response to a request.
fn parse_status(value: &str) -> Result<StatusCode, String> {
    value
        .parse::<u16>()
        .ok()
        .filter(|s| (200..=999).contains(s))
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or_else(|| format!("status={value:?} is not a status code in 200..=999"))
}

/// Splits and percent-decodes a query string, keeping repeated keys (`header=` is repeatable).
fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param<'a>(params: &'a [(String, String)], key: &str) -> Option<&'a str> {
    params
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Lower-case name → value; repeated headers joined with ", " as an HTTP intermediary would.
fn headers_json(headers: &hyper::HeaderMap) -> Value {
    let mut map = Map::new();
    for name in headers.keys() {
        let joined = headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(", ");
        map.insert(name.as_str().to_owned(), Value::String(joined));
    }
    Value::Object(map)
}

/// A stable 64-bit FNV-1a hash, so demo entities are the same on every run and every instance.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Numeric ids stay numbers in the JSON so `"id": 42` round-trips the way a client expects.
fn id_json(id: &str) -> Value {
    id.parse::<u64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(id))
}

const FIRST_NAMES: [&str; 12] = [
    "Ada", "Grace", "Alan", "Barbara", "Dennis", "Edsger", "Frances", "Ken", "Margaret", "Niklaus",
    "Radia", "Tim",
];
const LAST_NAMES: [&str; 12] = [
    "Lovelace",
    "Hopper",
    "Turing",
    "Liskov",
    "Ritchie",
    "Dijkstra",
    "Allen",
    "Thompson",
    "Hamilton",
    "Wirth",
    "Perlman",
    "Berners-Lee",
];

fn user(id: &str) -> Map<String, Value> {
    let h = fnv1a(id);
    let first = FIRST_NAMES[(h % 12) as usize];
    let last = LAST_NAMES[((h >> 8) % 12) as usize];
    let mut m = Map::new();
    m.insert("id".into(), id_json(id));
    m.insert("name".into(), format!("{first} {last}").into());
    m.insert(
        "email".into(),
        format!("{}.{}@example.com", first.to_lowercase(), id).into(),
    );
    m
}

fn order(id: &str) -> Map<String, Value> {
    let mut rng = fastrand::Rng::with_seed(fnv1a(id));
    let mut total_cents = 0u64;
    let items: Vec<Value> = (0..rng.usize(1..=3))
        .map(|_| {
            let qty = rng.u64(1..=4);
            let price_cents = rng.u64(199..=4999);
            total_cents += qty * price_cents;
            json!({
                "sku": format!("SKU-{:04}", rng.u32(0..10_000)),
                "qty": qty,
                "price": price_cents as f64 / 100.0,
            })
        })
        .collect();
    let mut m = Map::new();
    m.insert("id".into(), id_json(id));
    m.insert("user_id".into(), rng.u64(1..=1000).into());
    m.insert("items".into(), items.into());
    m.insert("total".into(), (total_cents as f64 / 100.0).into());
    m.insert("currency".into(), "USD".into());
    m
}

/// `/users/42` → Some("42"); deeper paths like `/users/42/orders` are not entities and get echoed.
fn entity_id<'a>(path: &'a str, prefix: &str) -> Option<&'a str> {
    path.strip_prefix(prefix)
        .filter(|rest| !rest.is_empty() && !rest.contains('/'))
}

fn json_response(inst: &Instance, status: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert("x-served-by", inst.served_by.clone());
    resp
}

async fn handle(inst: Arc<Instance>, req: Request<Incoming>) -> Result<Response<Body>, BoxError> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_owned();
    let query = parts.uri.query().unwrap_or("").to_owned();
    let params = parse_query(&query);

    if let Some(action) = path.strip_prefix("/_control/") {
        return Ok(control(&inst, &parts.method, action, &params));
    }

    // Read the whole body even when the response ignores it, so keep-alive stays usable.
    let body_bytes = body.collect().await?.to_bytes().len();
    let headers = headers_json(&parts.headers);
    let is_health = path == "/health";
    if is_health {
        inst.health_checks.fetch_add(1, Ordering::Relaxed);
    } else {
        inst.requests.fetch_add(1, Ordering::Relaxed);
        *inst
            .by_method
            .lock()
            .unwrap()
            .entry(parts.method.to_string())
            .or_default() += 1;
        *inst.last_headers.lock().unwrap() = headers.clone();
    }

    let overrides = match Overrides::parse(&params) {
        Ok(o) => o,
        Err(msg) => {
            return Ok(json_response(
                &inst,
                StatusCode::BAD_REQUEST,
                &json!({ "error": msg }),
            ))
        }
    };

    // The sender lives as long as `inst`, so this only returns once the instance recovers.
    let _ = inst.hang.subscribe().wait_for(|hang| !*hang).await;
    let delay = inst.delay_ms.load(Ordering::Relaxed) + overrides.delay_ms;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if overrides.close {
        // A service error makes hyper drop the connection without writing anything, which is
        // what an upstream crashing mid-request looks like to the gateway.
        return Err("close=1 requested".into());
    }

    let fail = inst.fail_status.load(Ordering::Relaxed);
    let failing = StatusCode::from_u16(fail).ok().filter(|_| fail != 0);

    let mut resp = if let (None, Some(n)) = (failing, overrides.bytes) {
        let mut resp = Response::new(Full::new(Bytes::from(vec![b'x'; n])));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        resp.headers_mut()
            .insert("x-served-by", inst.served_by.clone());
        *resp.status_mut() = overrides.status.unwrap_or(StatusCode::OK);
        resp
    } else {
        let mut body = if failing.is_some() {
            let mut m = Map::new();
            m.insert("status".into(), "failing".into());
            m.insert("error".into(), "injected failure".into());
            m
        } else if is_health {
            let mut m = Map::new();
            m.insert("status".into(), "ok".into());
            m
        } else if let (true, Some(id)) = (
            parts.method == Method::GET && inst.name.starts_with("users"),
            entity_id(&path, "/users/"),
        ) {
            user(id)
        } else if let (true, Some(id)) = (
            parts.method == Method::GET && inst.name.starts_with("orders"),
            entity_id(&path, "/orders/"),
        ) {
            order(id)
        } else {
            Map::new()
        };
        body.insert("service".into(), inst.name.clone().into());
        body.insert("instance".into(), inst.addr.clone().into());
        body.insert("method".into(), parts.method.as_str().into());
        body.insert("path".into(), path.into());
        body.insert("query".into(), query.into());
        body.insert("headers".into(), headers);
        body.insert("body_bytes".into(), body_bytes.into());
        let status = failing.or(overrides.status).unwrap_or(StatusCode::OK);
        json_response(&inst, status, &Value::Object(body))
    };
    for (name, value) in overrides.headers {
        resp.headers_mut().append(name, value);
    }
    Ok(resp)
}

fn control(
    inst: &Instance,
    method: &Method,
    action: &str,
    params: &[(String, String)],
) -> Response<Body> {
    let reply = |status: StatusCode, body: Value| json_response(inst, status, &body);
    let mutating = matches!(action, "fail" | "recover" | "delay" | "hang" | "reset");
    if mutating && method != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({ "error": format!("use POST /_control/{action}") }),
        );
    }
    match action {
        "fail" => {
            let status = match param(params, "status").unwrap_or("500") {
                "0" => 0,
                s => match parse_status(s) {
                    Ok(s) => s.as_u16(),
                    Err(e) => return reply(StatusCode::BAD_REQUEST, json!({ "error": e })),
                },
            };
            inst.fail_status.store(status, Ordering::Relaxed);
            reply(StatusCode::OK, json!({ "ok": true, "failing": status }))
        }
        "delay" => match parse_num::<u64>("ms", param(params, "ms").unwrap_or("0")) {
            Ok(ms) => {
                inst.delay_ms.store(ms, Ordering::Relaxed);
                reply(StatusCode::OK, json!({ "ok": true, "delay_ms": ms }))
            }
            Err(e) => reply(StatusCode::BAD_REQUEST, json!({ "error": e })),
        },
        "hang" => {
            inst.hang.send_replace(true);
            reply(StatusCode::OK, json!({ "ok": true, "hanging": true }))
        }
        // Clears every injected fault, so the demo needs one command to get back to normal.
        "recover" => {
            inst.fail_status.store(0, Ordering::Relaxed);
            inst.delay_ms.store(0, Ordering::Relaxed);
            inst.hang.send_replace(false);
            reply(StatusCode::OK, json!({ "ok": true }))
        }
        "reset" => {
            inst.reset();
            reply(StatusCode::OK, json!({ "ok": true }))
        }
        "stats" => reply(StatusCode::OK, inst.stats()),
        _ => reply(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("unknown control endpoint /_control/{action}") }),
        ),
    }
}

async fn serve(listener: TcpListener, inst: Arc<Instance>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Typically EMFILE under a load test: back off instead of spinning.
                eprintln!("sample-service {}: accept failed: {e}", inst.addr);
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let inst = inst.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(inst.clone(), req));
            // Errors here are peers going away or `close=1`; neither is worth a log line.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

struct Args {
    instances: Vec<(String, String)>,
    exit_on_stdin_eof: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut name = None;
    let mut instances = Vec::new();
    let mut exit_on_stdin_eof = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--listen" => listen = Some(value("--listen")?),
            "--name" => name = Some(value("--name")?),
            "--service" => {
                let spec = value("--service")?;
                let (n, a) = spec
                    .split_once('=')
                    .ok_or_else(|| format!("--service {spec:?} is not NAME=ADDR"))?;
                instances.push((n.to_owned(), a.to_owned()));
            }
            "--exit-on-stdin-eof" => exit_on_stdin_eof = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if listen.is_some() || name.is_some() {
        instances.insert(
            0,
            (
                name.unwrap_or_else(|| "sample".into()),
                listen.unwrap_or_else(|| "127.0.0.1:0".into()),
            ),
        );
    }
    if instances.is_empty() {
        return Err("no instance to serve".into());
    }
    Ok(Args {
        instances,
        exit_on_stdin_eof,
    })
}

#[tokio::main]
async fn main() {
    let args = parse_args().unwrap_or_else(|e| {
        eprintln!("sample-service: {e}\n\n{USAGE}");
        std::process::exit(2);
    });

    // Bind everything before announcing anything, so a reader of the listening lines never
    // sees a half-started process.
    let mut bound = Vec::new();
    for (name, addr) in args.instances {
        let listener = TcpListener::bind(&addr).await.unwrap_or_else(|e| {
            eprintln!("sample-service: cannot listen on {addr} for {name}: {e}");
            std::process::exit(1);
        });
        let local = listener
            .local_addr()
            .expect("bound listener has an address");
        bound.push((listener, Arc::new(Instance::new(name, local))));
    }
    {
        let mut out = std::io::stdout().lock();
        for (_, inst) in &bound {
            let _ = writeln!(out, "listening on {}", inst.addr);
        }
        let _ = out.flush();
    }
    for (listener, inst) in bound {
        tokio::spawn(serve(listener, inst));
    }

    if args.exit_on_stdin_eof {
        // A plain thread, not tokio's stdin: a blocking read would stall runtime shutdown.
        std::thread::spawn(|| {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
