//! Response compression end to end: the real gateway in front of a real HTTP server (hyper, in
//! this file, so each response's type, size and headers are the test's to choose), read by curl
//! (`--compressed` decodes gzip, br and zstd) and, byte for byte, by the decoders of the crates
//! the gateway encodes with.
//!
//! What is proven: the coding each `Accept-Encoding` gets (q-values, refusals, `*`, odd
//! spellings), what is left alone (small bodies, other types, an upstream's own encoding,
//! `no-transform`, ranges, `304`), the headers of a compressed answer (`Vary` merged, `ETag`
//! weak, no `Content-Length`), `HEAD`, an event stream compressed yet delivered event by event,
//! and the cache: a stored response is compressed per client on the way out, and an upstream's
//! own gzip is never served from the cache to a client that does not take gzip.

mod common;

use bytes::Bytes;
use common::{is_listening, poll_until, run_check, GatedUpstream, Gateway};
use http_body_util::channel::Channel;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// `size` bytes of repetitive text, the same for every request.
fn text(size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(size + 64);
    let mut i = 0;
    while out.len() < size {
        out.extend(format!("line {i}: the quick brown fox jumps over the lazy dog\n").bytes());
        i += 1;
    }
    out.truncate(size);
    out
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

fn full(bytes: Vec<u8>) -> Body {
    Full::new(Bytes::from(bytes)).boxed()
}

/// The test upstream's answers (a [`GatedUpstream`]). Routes (query parameters in brackets):
/// - `/api/text` [`size` (2000), `type` (`text/plain; charset=utf-8`), `cc`, `vary`, `ce`]:
///   [`text`] of `size` bytes, with `ETag: "v1"` (answering a matching `If-None-Match` with
///   `304`), `Accept-Ranges: bytes`, and a single `Range` answered `206`; `ce` sets a
///   `Content-Encoding` the body does not have (the gateway must not touch it anyway);
/// - `/api/upgzip`: gzip-encoded text to a client whose `Accept-Encoding` lists a plain
///   `gzip`, plain text otherwise, `Cache-Control: public, max-age=60` and no `Vary` (a sloppy upstream);
/// - `/api/events`: an event stream: `data: one`, then after [`GatedUpstream::release`] the rest.
async fn respond(
    req: Request<Incoming>,
    gate: Arc<Semaphore>,
) -> Result<Response<Body>, Infallible> {
    let q: HashMap<String, String> = req
        .uri()
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or_default().to_string())
    };
    let resp = Response::builder();
    Ok(match req.uri().path().trim_start_matches("/raw") {
        "/api/upgzip" => {
            let body = text(4000);
            let gzip = header("accept-encoding")
                .is_some_and(|ae| ae.split(',').any(|c| c.trim() == "gzip"));
            let resp = resp
                .header("content-type", "text/plain")
                .header("cache-control", "public, max-age=60");
            if gzip {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
                e.write_all(&body).unwrap();
                resp.header("content-encoding", "gzip")
                    .body(full(e.finish().unwrap()))
            } else {
                resp.body(full(body))
            }
            .unwrap()
        }
        "/api/events" => {
            let (mut tx, body) = Channel::<Bytes, Infallible>::new(1);
            tokio::spawn(async move {
                let _ = tx.send_data(Bytes::from_static(b"data: one\n\n")).await;
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
                let _ = tx.send_data(Bytes::from_static(b"data: two\n\n")).await;
            });
            resp.header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(body.boxed())
                .unwrap()
        }
        _ => {
            let size = q.get("size").map_or(2000, |s| s.parse().unwrap());
            let body = text(size);
            let mut resp = resp
                .header(
                    "content-type",
                    q.get("type").map_or("text/plain; charset=utf-8", |t| t),
                )
                .header("etag", "\"v1\"")
                .header("accept-ranges", "bytes");
            for (param, name) in [
                ("cc", "cache-control"),
                ("vary", "vary"),
                ("ce", "content-encoding"),
            ] {
                if let Some(v) = q.get(param) {
                    resp = resp.header(name, v);
                }
            }
            let inm = header("if-none-match").unwrap_or_default();
            let range = header("range")
                .and_then(|r| {
                    let (a, b) = r.strip_prefix("bytes=")?.split_once('-')?;
                    Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?))
                })
                .filter(|&(a, b)| a <= b && b < size);
            if inm.trim_start_matches("W/") == "\"v1\"" {
                resp.status(304).body(full(Vec::new())).unwrap()
            } else if let Some((a, b)) = range {
                resp.status(206)
                    .header("content-range", format!("bytes {a}-{b}/{size}"))
                    .body(full(body[a..=b].to_vec()))
                    .unwrap()
            } else {
                resp.body(full(body)).unwrap()
            }
        }
    })
}

fn gateway(up: &GatedUpstream, service_extra: &str) -> Gateway {
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"], h2c: true}}
admin: {{listen: "${{ADMIN}}"}}
access_log: false
cache: {{backend: memory}}
services:
  api:
    routes: [{{path_prefix: /api}}]
    upstreams: ["{}"]
    compression: {{}}
{service_extra}
  plain:
    routes: [{{path_prefix: /plain}}]
    upstreams: ["{}"]
"#,
        up.addr, up.addr
    ));
    poll_until(
        Duration::from_secs(10),
        "the proxy listener is bound",
        || is_listening(&gw.http),
    );
    gw
}

/// A response as curl saw it: status, headers (names lower-case), body after any decoding
/// curl was asked to do.
#[derive(Debug)]
struct Got {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// `curl -si URL ARGS...`: the final response only.
fn curl(url: &str, args: &[&str]) -> Got {
    let out = Command::new("curl")
        .args(["-si", "--max-time", "10", "--noproxy", "*"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl {args:?} {url}: {out:?}");
    let raw = out.stdout;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("a status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Got {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}

/// The raw answer to a GET with this `Accept-Encoding` (none if `None`).
fn get(gw: &Gateway, path: &str, accept: Option<&str>) -> Got {
    let ae;
    let mut args = vec![];
    if let Some(a) = accept {
        // `Name;` is how curl sends a header with an empty value (`Name:` removes it).
        ae = if a.is_empty() {
            "Accept-Encoding;".to_string()
        } else {
            format!("Accept-Encoding: {a}")
        };
        args.extend(["-H", ae.as_str()]);
    }
    curl(&gw.url(path), &args)
}

fn decode(coding: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match coding {
        "gzip" => {
            flate2::read::GzDecoder::new(data)
                .read_to_end(&mut out)
                .expect("valid gzip");
        }
        "br" => {
            brotli::Decompressor::new(data, 4096)
                .read_to_end(&mut out)
                .expect("valid brotli");
        }
        "zstd" => out = zstd::stream::decode_all(data).expect("valid zstd"),
        other => panic!("unexpected coding {other:?}"),
    }
    out
}

fn coding(got: &Got) -> Option<&str> {
    got.header("content-encoding")
}

#[test]
fn each_client_gets_a_coding_it_accepts_and_curl_decodes_it() {
    let up = GatedUpstream::start(respond);
    let gw = gateway(&up, "");
    let expected = text(2000);

    // curl --compressed offers every coding it decodes; the service's order picks zstd. Each
    // coding alone, offered by curl and decoded by it.
    let got = curl(&gw.url("/api/text"), &["--compressed"]);
    assert_eq!(got.body, expected);
    for c in ["zstd", "br", "gzip"] {
        let ae = format!("Accept-Encoding: {c}");
        let got = curl(&gw.url("/api/text"), &["--compressed", "-H", &ae]);
        assert_eq!(got.status, 200);
        assert_eq!(coding(&got), Some(c));
        assert_eq!(got.body, expected, "curl decodes {c}");
        // And byte for byte, with the end of the stream present.
        let raw = get(&gw, "/api/text", Some(c));
        assert!(
            raw.body.len() < expected.len() / 2,
            "{c}: {} bytes",
            raw.body.len()
        );
        assert_eq!(decode(c, &raw.body), expected);
        assert_eq!(raw.header("content-length"), None);
        assert_eq!(raw.header("accept-ranges"), None);
        assert_eq!(raw.header("etag"), Some("W/\"v1\""));
        assert_eq!(raw.all("vary"), vec!["Accept-Encoding"]);
    }

    for (accept, want) in [
        (None, None),
        (Some("identity"), None),
        (Some(""), None),
        (Some("gzip;q=0"), None),
        (Some("*;q=0"), None),
        (Some("gzip;q=0, *;q=0"), None),
        (Some("deflate, compress"), None),
        (Some("gzip, deflate, br, zstd"), Some("zstd")),
        (Some("gzip;q=1.0, br;q=0.5"), Some("gzip")),
        (Some("*"), Some("zstd")),
        (Some("*, zstd;q=0"), Some("br")),
        (Some("GZIP"), Some("gzip")),
        (Some("  gzip ;  q=0.8 , Br ; Q=0.9"), Some("br")),
        (Some("gzip, gzip;q=0"), None),
        (Some("gzip;q=2"), None),
        (Some("x-gzip"), Some("gzip")),
    ] {
        let got = get(&gw, "/api/text", accept);
        assert_eq!(coding(&got), want, "Accept-Encoding: {accept:?}");
        assert_eq!(got.all("vary"), vec!["Accept-Encoding"], "{accept:?}");
        if want.is_none() {
            assert_eq!(got.body, expected, "{accept:?}");
            assert_eq!(got.header("content-length"), Some("2000"));
            assert_eq!(got.header("etag"), Some("\"v1\""));
        }
    }
    // Two Accept-Encoding lines count as one list.
    let got = curl(
        &gw.url("/api/text"),
        &[
            "-H",
            "Accept-Encoding: br;q=0",
            "-H",
            "Accept-Encoding: gzip, br",
        ],
    );
    assert_eq!(coding(&got), Some("gzip"));

    // Counted, by coding.
    assert!(gw.metric("breakwater_compressed_responses_total{algorithm=\"gzip\"}") >= 3);
    let (i, o) = (
        gw.metric("breakwater_compression_input_bytes_total{algorithm=\"br\"}"),
        gw.metric("breakwater_compression_output_bytes_total{algorithm=\"br\"}"),
    );
    assert!(i >= 2 * 2000 && o < i / 2, "br in {i}, out {o}");
}

#[test]
fn what_is_left_alone() {
    let up = GatedUpstream::start(respond);
    let gw = gateway(&up, "");
    let gz = Some("gzip, br, zstd");
    let plain = |got: &Got, len: &str, why: &str| {
        assert_eq!(got.status, 200, "{why}");
        assert_eq!(coding(got), None, "{why}");
        assert_eq!(got.header("content-length"), Some(len), "{why}");
        assert_eq!(got.header("etag"), Some("\"v1\""), "{why}");
    };

    // Below min_size (1 KiB), exactly at it.
    let small = get(&gw, "/api/text?size=1023", gz);
    plain(&small, "1023", "small");
    assert_eq!(small.all("vary"), Vec::<&str>::new());
    assert_eq!(coding(&get(&gw, "/api/text?size=1024", gz)), Some("zstd"));
    // Types not listed; listed ones in odd spellings.
    for t in ["image/png", "application/octet-stream", "application/zip"] {
        let got = get(&gw, &format!("/api/text?type={t}"), gz);
        plain(&got, "2000", t);
        assert!(got.all("vary").is_empty(), "{t}");
    }
    for t in [
        "TEXT/HTML",
        "application/json;charset=utf-8",
        "application/problem+json",
        "image/svg+xml",
    ] {
        let path = format!("/api/text?type={}", t.replace('+', "%2B"));
        assert_eq!(coding(&get(&gw, &path, gz)), Some("zstd"), "{t}");
    }
    // An upstream's own Content-Encoding, whatever it is.
    for ce in ["gzip", "identity", "deflate"] {
        let got = get(&gw, &format!("/api/text?ce={ce}"), gz);
        assert_eq!(got.all("content-encoding"), vec![ce]);
        assert_eq!(got.header("content-length"), Some("2000"), "{ce}");
        assert_eq!(got.body, text(2000), "{ce}: the bytes pass untouched");
    }
    // no-transform from the upstream, or from the client.
    plain(
        &get(&gw, "/api/text?cc=public,%20no-transform", gz),
        "2000",
        "no-transform",
    );
    let got = curl(
        &gw.url("/api/text"),
        &[
            "-H",
            "Accept-Encoding: gzip",
            "-H",
            "Cache-Control: no-transform",
        ],
    );
    plain(&got, "2000", "client no-transform");
    assert_eq!(got.all("vary"), vec!["Accept-Encoding"]);
    // HTTP/1.0 has no chunked framing for a body of unknown length.
    plain(
        &curl(&gw.url("/api/text"), &["-0", "-H", "Accept-Encoding: gzip"]),
        "2000",
        "http/1.0",
    );
    // A service without compression.
    let got = get(&gw, "/plain/text", gz);
    plain(&got, "2000", "service without compression");
    assert!(got.all("vary").is_empty());
}

#[test]
fn vary_is_merged_and_ranges_head_and_304_stay_right() {
    let up = GatedUpstream::start(respond);
    let gw = gateway(&up, "");
    let gz = Some("gzip");

    // The upstream's Vary gets Accept-Encoding added once, in one line.
    let got = get(&gw, "/api/text?vary=Origin", gz);
    assert_eq!(got.all("vary"), vec!["Origin, Accept-Encoding"]);
    let got = get(&gw, "/api/text?vary=accept-encoding,%20Origin", gz);
    assert_eq!(got.all("vary"), vec!["accept-encoding, Origin"]);
    assert_eq!(coding(&got), Some("gzip"));

    // A range is a slice of the identity bytes: never compressed.
    let got = curl(
        &gw.url("/api/text"),
        &["-H", "Accept-Encoding: gzip", "-r", "10-19"],
    );
    assert_eq!(got.status, 206);
    assert_eq!(coding(&got), None);
    assert_eq!(got.body, text(2000)[10..20].to_vec());
    assert_eq!(got.header("content-range"), Some("bytes 10-19/2000"));

    // HEAD: the header its GET gets, and no body.
    let head = curl(&gw.url("/api/text"), &["-I", "-H", "Accept-Encoding: gzip"]);
    assert_eq!(head.status, 200);
    assert_eq!(coding(&head), Some("gzip"));
    assert_eq!(head.header("content-length"), None);
    assert_eq!(head.header("etag"), Some("W/\"v1\""));
    assert!(head.body.is_empty());
    let head = curl(&gw.url("/api/text"), &["-I"]);
    assert_eq!(head.header("content-length"), Some("2000"));
    assert_eq!(coding(&head), None);

    // The weak tag the client got revalidates: a 304, nothing to compress, and the
    // connection stays usable (curl's second request on it).
    let got = curl(
        &gw.url("/api/text"),
        &[
            "-H",
            "Accept-Encoding: gzip",
            "-H",
            "If-None-Match: W/\"v1\"",
        ],
    );
    assert_eq!(got.status, 304);
    assert_eq!(coding(&got), None);
    assert!(got.body.is_empty());

    // HTTP/2 (h2c): no Transfer-Encoding, and curl decodes the body.
    let got = curl(
        &gw.url("/api/text"),
        &[
            "--http2-prior-knowledge",
            "--compressed",
            "-H",
            "Accept-Encoding: br",
        ],
    );
    assert_eq!(got.status, 200);
    assert_eq!(coding(&got), Some("br"));
    assert_eq!(got.header("transfer-encoding"), None);
    assert_eq!(got.body, text(2000));

    // Keep-alive survives a compressed body: two compressed answers on one connection.
    let url = gw.url("/api/text");
    let out = Command::new("curl")
        .args([
            "-s",
            "--noproxy",
            "*",
            "--compressed",
            "-H",
            "Accept-Encoding: gzip",
        ])
        .args([&url, &url])
        .output()
        .unwrap();
    assert_eq!(out.stdout, [text(2000), text(2000)].concat());
}

#[test]
fn an_event_stream_is_compressed_event_by_event() {
    let up = GatedUpstream::start(respond);
    let gw = gateway(&up, "");
    for c in ["gzip", "br", "zstd"] {
        let ae = format!("Accept-Encoding: {c}");
        let mut child = Command::new("curl")
            .args([
                "-sN",
                "--noproxy",
                "*",
                "--max-time",
                "10",
                "--compressed",
                "-D",
                "-",
                "-H",
            ])
            .arg(&ae)
            .arg(gw.url("/api/events"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            assert!(
                out.read_line(&mut line).unwrap() > 0,
                "{c}: header ended early"
            );
            if line == "\r\n" {
                break;
            }
            head.push(line.trim().to_ascii_lowercase());
        }
        assert!(
            head.contains(&format!("content-encoding: {c}")),
            "{c}: {head:?}"
        );
        // The upstream holds the rest back: the first event must arrive decoded now.
        let mut first = String::new();
        while !first.ends_with("\n\n") {
            assert!(
                out.read_line(&mut first).unwrap() > 0,
                "{c}: stream ended: {first:?}"
            );
        }
        assert_eq!(first, "data: one\n\n", "{c}");
        up.release();
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "data: two\n\n", "{c}");
        assert!(
            child.wait().unwrap().success(),
            "{c}: curl decoded the whole stream"
        );
    }
}

fn x_cache(got: &Got) -> Option<&str> {
    got.header("x-cache")
}

#[test]
fn the_cache_serves_each_client_an_encoding_it_accepts() {
    let up = GatedUpstream::start(respond);
    let gw = gateway(&up, "    cache: {ttl: 1m}");
    let expected = text(2000);

    // Stored as the upstream sent it (identity), compressed per client on the way out.
    let a = get(&gw, "/api/text?cc=public,%20max-age=60", Some("gzip"));
    assert_eq!((x_cache(&a), coding(&a)), (Some("MISS"), Some("gzip")));
    assert_eq!(decode("gzip", &a.body), expected);
    let b = get(&gw, "/api/text?cc=public,%20max-age=60", None);
    assert_eq!((x_cache(&b), coding(&b)), (Some("HIT"), None));
    assert_eq!(b.body, expected);
    assert_eq!(b.header("content-length"), Some("2000"));
    assert_eq!(b.all("vary"), vec!["Accept-Encoding"]);
    let c = get(&gw, "/api/text?cc=public,%20max-age=60", Some("br"));
    assert_eq!((x_cache(&c), coding(&c)), (Some("HIT"), Some("br")));
    assert_eq!(decode("br", &c.body), expected);
    assert_eq!(up.requests(), 1);
    // A range from the stored copy is sliced from the identity bytes.
    let r = curl(
        &gw.url("/api/text?cc=public,%20max-age=60"),
        &["-H", "Accept-Encoding: gzip", "-r", "0-9"],
    );
    assert_eq!(
        (r.status, x_cache(&r), coding(&r)),
        (206, Some("HIT"), None)
    );
    assert_eq!(r.body, expected[..10].to_vec());
    // HEAD from the cache: the GET's compressed header.
    let h = curl(
        &gw.url("/api/text?cc=public,%20max-age=60"),
        &["-I", "-H", "Accept-Encoding: zstd"],
    );
    assert_eq!((x_cache(&h), coding(&h)), (Some("HIT"), Some("zstd")));
    assert_eq!(h.header("content-length"), None);

    // An upstream that encodes by itself (and does not say it varies): its gzip copy is
    // stored as a variant for that Accept-Encoding, and goes to no client without gzip.
    let before = up.requests();
    let a = get(&gw, "/api/upgzip", Some("gzip"));
    assert_eq!((x_cache(&a), coding(&a)), (Some("MISS"), Some("gzip")));
    assert_eq!(a.all("vary"), vec!["Accept-Encoding"]);
    assert_eq!(decode("gzip", &a.body), text(4000));
    let a = get(&gw, "/api/upgzip", Some("gzip"));
    assert_eq!((x_cache(&a), coding(&a)), (Some("HIT"), Some("gzip")));
    assert_eq!(a.all("vary"), vec!["Accept-Encoding"]);
    assert_eq!(decode("gzip", &a.body), text(4000));
    assert_eq!(up.requests() - before, 1);
    let b = get(&gw, "/api/upgzip", None);
    assert_eq!((x_cache(&b), coding(&b)), (Some("MISS"), None));
    assert_eq!(b.body, text(4000));
    assert_eq!(up.requests() - before, 2);
    // The upstream's plain answer (no Vary) now stands for the URL; whatever each client
    // accepts, it gets that or the gateway's own coding of it, never the upstream's gzip
    // unless it takes gzip.
    for accept in [
        None,
        Some("identity"),
        Some("gzip;q=0"),
        Some("br"),
        Some("gzip;q=0, br"),
    ] {
        let b = get(&gw, "/api/upgzip", accept);
        assert_eq!(x_cache(&b), Some("HIT"), "{accept:?}");
        let got = match coding(&b) {
            None => b.body.clone(),
            Some("br") => decode("br", &b.body),
            Some(other) => panic!("{accept:?} got {other}"),
        };
        assert_eq!(got, text(4000), "{accept:?}");
    }
}

#[test]
fn a_gzip_copy_is_not_served_to_a_client_without_gzip_even_as_the_only_one_stored() {
    // No compression on this service: the cache alone must keep the encodings apart.
    let up = GatedUpstream::start(respond);
    let raw = format!(
        "  raw:\n    routes: [{{path_prefix: /raw}}]\n    upstreams: [\"{}\"]\n    cache: {{ttl: 1m}}",
        up.addr
    );
    let gw = gateway(&up, &raw);
    let a = get(&gw, "/raw/api/upgzip", Some("gzip"));
    assert_eq!((x_cache(&a), coding(&a)), (Some("MISS"), Some("gzip")));
    for accept in [None, Some("br"), Some("identity"), Some("gzip;q=0")] {
        let b = get(&gw, "/raw/api/upgzip", accept);
        assert_eq!(coding(&b), None, "{accept:?}");
        assert_eq!(b.body, text(4000), "{accept:?}");
    }
    // A gzip client still gets what it takes: the gzip variant or the plain copy.
    let a = get(&gw, "/raw/api/upgzip", Some("gzip"));
    let body = match coding(&a) {
        Some("gzip") => decode("gzip", &a.body),
        _ => a.body.clone(),
    };
    assert_eq!(body, text(4000));
}

#[test]
fn bad_compression_settings_are_refused_with_their_line() {
    for (section, needle) in [
        ("{algorithms: [gzip, deflate]}", "deflate"),
        ("{algorithms: []}", "at least one"),
        ("{content_types: [json]}", "not a media type"),
        ("{levels: {br: 12}}", "compression.levels.br"),
        ("{min_size: lots}", "invalid size"),
    ] {
        let (code, out) = run_check(&format!(
            r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
services:
  api:
    routes: [{{path_prefix: /api}}]
    upstreams: ["127.0.0.1:9"]
    compression: {section}
"#
        ));
        assert_eq!(code, 2, "{section}: {out}");
        assert!(out.contains(needle), "{section}: {out}");
        assert!(
            out.contains("gateway.yaml:8"),
            "{section}: names the line: {out}"
        );
    }
}
