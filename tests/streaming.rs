//! Streaming responses through the gateway, end to end: Server-Sent Events and chunked
//! downloads from a real streaming HTTP server (hyper) reach the client as they are sent,
//! never held back until the upstream finishes, even on a cache-enabled route; and an event
//! stream is never cached, whatever its `Cache-Control` says.
//!
//! The upstream sends the first part of each response, then waits for the test to let it go
//! on: a gateway that buffered would leave the client waiting for the first part forever (the
//! test then fails on its read timeout), with no timing guesswork either way.

mod common;

use bytes::Bytes;
use common::{is_listening, poll_until, GatedUpstream, Gateway};
use http_body_util::channel::Channel;
use hyper::body::Incoming;
use hyper::{Request, Response};
use std::convert::Infallible;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

/// A streaming upstream. Every response is `200` with `Cache-Control: public, max-age=60`
/// and the `Content-Type` of its `type` query parameter (default `text/event-stream`); it
/// sends `data: one`, waits for a [`GatedUpstream::release`], then sends `data: two` and
/// `data: three` and ends, chunked.
async fn respond(
    req: Request<Incoming>,
    gate: Arc<Semaphore>,
) -> Result<Response<Channel<Bytes>>, Infallible> {
    let content_type = req
        .uri()
        .query()
        .and_then(|q| q.strip_prefix("type="))
        .unwrap_or("text/event-stream")
        .to_string();
    let (mut tx, body) = Channel::new(1);
    tokio::spawn(async move {
        let _ = tx.send_data(Bytes::from_static(b"data: one\n\n")).await;
        if let Ok(permit) = gate.acquire().await {
            permit.forget();
        }
        let _ = tx.send_data(Bytes::from_static(b"data: two\n\n")).await;
        let _ = tx.send_data(Bytes::from_static(b"data: three\n\n")).await;
    });
    let resp = Response::builder()
        .header("content-type", content_type)
        .header("cache-control", "public, max-age=60")
        .body(body)
        .unwrap();
    Ok(resp)
}

/// A `feed` service with the response cache on.
fn gateway(up: &GatedUpstream) -> Gateway {
    let gw = Gateway::start(&format!(
        r#"
server: {{listen: ["${{LISTEN}}"]}}
admin: {{listen: "${{ADMIN}}"}}
access_log: false
cache: {{backend: memory}}
services:
  feed:
    routes: [{{path_prefix: /feed}}]
    upstreams: ["{}"]
    cache: {{ttl: 1m}}
"#,
        up.addr
    ));
    // `/ready` can answer while Pingora is still retrying to bind the proxy port (taken a
    // moment by some other socket on a busy machine: "is in use, will try again" in its log).
    poll_until(
        Duration::from_secs(10),
        "the proxy listener is bound",
        || is_listening(&gw.http),
    );
    gw
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(15))
        .no_proxy()
        .build()
        .unwrap()
}

/// Reads until the first event (up to its blank line) has arrived; fails when the read
/// times out, which is what a buffering gateway leads to.
fn first_event(resp: &mut reqwest::blocking::Response) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(2).any(|w| w == b"\n\n") {
        let n = resp
            .read(&mut buf)
            .expect("the first event arrives while the upstream holds the rest back");
        assert!(n > 0, "the stream ended before its first event: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

fn rest(mut resp: reqwest::blocking::Response) -> String {
    let mut out = String::new();
    resp.read_to_string(&mut out)
        .expect("the rest of the stream");
    out
}

fn x_cache(resp: &reqwest::blocking::Response) -> String {
    resp.headers()
        .get("x-cache")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[test]
fn server_sent_events_arrive_as_sent_and_are_never_cached() {
    let up = GatedUpstream::start(respond);
    let gw = gateway(&up);
    let c = client();

    let mut a = c.get(gw.url("/feed/events")).send().unwrap();
    assert_eq!(a.status(), 200);
    assert_eq!(a.headers()["content-type"], "text/event-stream");
    assert_eq!(first_event(&mut a), "data: one\n\n");
    // A second subscriber of the same URL, while the first stream is open, is neither made
    // to wait for it (request coalescing) nor served from it.
    let mut b = c.get(gw.url("/feed/events")).send().unwrap();
    assert_eq!(first_event(&mut b), "data: one\n\n");
    assert_eq!(up.requests(), 2);
    up.release();
    up.release();
    assert_eq!(rest(a), "data: two\n\ndata: three\n\n");
    assert_eq!(rest(b), "data: two\n\ndata: three\n\n");

    // Finished and marked `public, max-age=60`, yet the next subscriber goes upstream.
    up.release();
    let c3 = c.get(gw.url("/feed/events")).send().unwrap();
    assert_ne!(x_cache(&c3), "HIT");
    assert_eq!(
        rest(c3),
        "data: one\n\ndata: two\n\ndata: three\n\n",
        "a fresh stream"
    );
    assert_eq!(up.requests(), 3);
}

#[test]
fn a_chunked_download_streams_while_the_cache_fills() {
    let up = GatedUpstream::start(respond);
    let gw = gateway(&up);
    let c = client();
    let url = gw.url("/feed/file?type=application/octet-stream");

    let mut first = c.get(&url).send().unwrap();
    assert_eq!(x_cache(&first), "MISS");
    // The cache copies the body as it passes; the client still gets each chunk at once.
    assert_eq!(first_event(&mut first), "data: one\n\n");
    up.release();
    assert_eq!(rest(first), "data: two\n\ndata: three\n\n");

    // Storable, so the cache kept it whole: the next download is a hit.
    let again = c.get(&url).send().unwrap();
    assert_eq!(x_cache(&again), "HIT");
    assert_eq!(rest(again), "data: one\n\ndata: two\n\ndata: three\n\n");
    assert_eq!(up.requests(), 1);
}
