use super::*;
use std::io::Read;

fn policy(yaml: &str) -> Arc<CompressionPolicy> {
    let cfg: CompressionConfig = serde_yaml::from_str(yaml).unwrap();
    Arc::new(cfg.compile().unwrap())
}

fn request(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
    let mut req = RequestHeader::build(method, b"/", None).unwrap();
    for (n, v) in headers {
        req.append_header(n.to_string(), *v).unwrap();
    }
    req
}

fn response(status: u16, headers: &[(&str, &str)]) -> ResponseHeader {
    let mut resp = ResponseHeader::build(status, None).unwrap();
    for (n, v) in headers {
        resp.append_header(n.to_string(), *v).unwrap();
    }
    resp
}

fn get<'a>(resp: &'a ResponseHeader, name: &str) -> Option<&'a str> {
    resp.headers.get(name).map(|v| v.to_str().unwrap())
}

const JSON_2K: [(&str, &str); 2] = [
    ("content-type", "application/json; charset=utf-8"),
    ("content-length", "2048"),
];

/// The module armed for `req`, after the response header `resp`.
fn judge(req: &RequestHeader, resp: &mut ResponseHeader, end: bool) -> ResponseCompression {
    let mut m = ResponseCompression::default();
    m.arm(&policy("{}"), req);
    m.on_header(resp, end);
    m
}

#[test]
fn config_defaults_and_errors() {
    let p = policy("{}");
    assert_eq!(
        p.algorithms,
        vec![Coding::Zstd, Coding::Brotli, Coding::Gzip]
    );
    assert_eq!(p.min_size, 1024);
    assert_eq!(p.levels, [6, 4, 3]);
    let err = |yaml: &str| {
        serde_yaml::from_str::<CompressionConfig>(yaml)
            .map_err(|e| e.to_string())
            .and_then(|c| c.compile().map(|_| ()))
            .unwrap_err()
    };
    assert!(err("{algorithms: []}").contains("at least one"));
    assert!(err("{algorithms: [gzip, gzip]}").contains("listed twice"));
    assert!(err("{algorithms: [deflate]}").contains("unknown variant"));
    assert!(err("{content_types: [json]}").contains("not a media type"));
    assert!(err("{content_types: [\"*/*\"]}").contains("name a type"));
    assert!(err("{content_types: [\"text/*json\"]}").contains("subtype"));
    assert!(err("{levels: {gzip: 10}}").contains("compression.levels.gzip"));
    assert!(err("{levels: {zstd: 0}}").contains("1 to 19"));
    assert!(err("{level: 3}").contains("unknown field"));
    let p = policy("{algorithms: [brotli], min_size: 10KiB}");
    assert_eq!(
        (p.algorithms.as_slice(), p.min_size),
        (&[Coding::Brotli][..], 10240)
    );
}

#[test]
fn type_patterns() {
    let p = policy("{content_types: [text/*, application/*+json, Image/SVG+XML]}");
    let ok = |ct: &str| p.eligible(&response(200, &[("content-type", ct)]));
    assert!(ok("text/html"));
    assert!(ok("TEXT/Plain; charset=utf-8"));
    assert!(ok("application/problem+json"));
    assert!(ok("image/svg+xml"));
    assert!(!ok("application/json"));
    assert!(!ok("image/png"));
    assert!(!ok("textual/html"));
    assert!(!p.eligible(&response(200, &[])));
}

#[test]
fn what_is_never_compressed() {
    let p = policy("{}");
    let no = |status: u16, extra: &[(&str, &str)]| {
        let mut h = vec![("content-type", "text/html")];
        h.extend_from_slice(extra);
        assert!(!p.eligible(&response(status, &h)), "{status} {extra:?}");
    };
    no(204, &[]);
    no(206, &[("content-range", "bytes 0-9/100")]);
    no(200, &[("content-range", "bytes 0-9/100")]);
    no(304, &[]);
    no(200, &[("content-encoding", "gzip")]);
    no(200, &[("content-encoding", "identity")]);
    no(200, &[("cache-control", "public, No-Transform")]);
    no(
        200,
        &[
            ("cache-control", "public"),
            ("cache-control", "no-transform"),
        ],
    );
    no(200, &[("content-length", "1023")]);
    no(200, &[("content-length", "0")]);
    no(200, &[("content-length", "lots")]);
    assert!(p.eligible(&response(200, &[("content-type", "text/html")])));
    assert!(p.eligible(&response(
        404,
        &[("content-type", "text/html"), ("content-length", "1024")]
    )));
}

#[test]
fn a_compressed_answer_has_the_headers_of_its_coding() {
    let req = request("GET", &[("accept-encoding", "gzip, br")]);
    let mut resp = JSON_2K.to_vec();
    resp.extend([
        ("etag", "\"v1\""),
        ("accept-ranges", "bytes"),
        ("vary", "Origin"),
    ]);
    let mut resp = response(200, &resp);
    let m = judge(&req, &mut resp, false);
    assert!(matches!(
        m.state,
        State::Encoding {
            coding: Coding::Brotli,
            ..
        }
    ));
    assert_eq!(get(&resp, "content-encoding"), Some("br"));
    assert_eq!(get(&resp, "content-length"), None);
    assert_eq!(get(&resp, "accept-ranges"), None);
    assert_eq!(get(&resp, "transfer-encoding"), Some("chunked"));
    assert_eq!(get(&resp, "etag"), Some("W/\"v1\""));
    assert_eq!(get(&resp, "vary"), Some("Origin, Accept-Encoding"));
    assert_eq!(resp.headers.get_all("vary").iter().count(), 1);
}

#[test]
fn vary_is_merged_once() {
    for (before, after) in [
        (vec![], "Accept-Encoding"),
        (vec!["accept-encoding"], "accept-encoding"),
        (vec!["Origin, ACCEPT-ENCODING"], "Origin, ACCEPT-ENCODING"),
        (vec!["*"], "*"),
        (vec!["Origin", "Cookie"], "Origin, Cookie, Accept-Encoding"),
    ] {
        let mut resp = response(200, &[]);
        for v in &before {
            resp.append_header("vary", *v).unwrap();
        }
        vary_on_accept_encoding(&mut resp);
        let all: Vec<_> = resp.headers.get_all("vary").iter().collect();
        assert_eq!(all.len(), 1, "{before:?}");
        assert_eq!(all[0].to_str().unwrap(), after, "{before:?}");
    }
}

#[test]
fn etags_weak_kept_strong_weakened_malformed_dropped() {
    for (before, after) in [
        ("\"a\"", Some("W/\"a\"")),
        ("W/\"a\"", Some("W/\"a\"")),
        ("a", None),
    ] {
        let mut resp = response(200, &[("etag", before)]);
        weaken_etag(&mut resp);
        assert_eq!(get(&resp, "etag"), after);
    }
}

#[test]
fn uncompressed_answers_still_vary_when_they_could_have_been() {
    for req in [
        request("GET", &[]),
        request("GET", &[("accept-encoding", "identity")]),
        request(
            "GET",
            &[
                ("accept-encoding", "gzip"),
                ("cache-control", "no-transform"),
            ],
        ),
    ] {
        let mut resp = response(200, &JSON_2K);
        let m = judge(&req, &mut resp, false);
        assert!(matches!(m.state, State::Off));
        assert_eq!(get(&resp, "content-length"), Some("2048"));
        assert_eq!(get(&resp, "content-encoding"), None);
        assert_eq!(get(&resp, "vary"), Some("Accept-Encoding"));
    }
    // Not eligible: no Vary either.
    let mut resp = response(200, &[("content-type", "image/png")]);
    judge(
        &request("GET", &[("accept-encoding", "gzip")]),
        &mut resp,
        false,
    );
    assert_eq!(get(&resp, "vary"), None);
}

#[test]
fn http_1_0_clients_get_identity() {
    let mut req = request("GET", &[("accept-encoding", "gzip")]);
    req.set_version(Version::HTTP_10);
    let mut resp = response(200, &JSON_2K);
    assert!(matches!(judge(&req, &mut resp, false).state, State::Off));
    assert_eq!(get(&resp, "content-length"), Some("2048"));
}

#[test]
fn head_gets_the_get_header_and_no_encoder() {
    let req = request("HEAD", &[("accept-encoding", "gzip")]);
    let mut resp = response(200, &JSON_2K);
    let m = judge(&req, &mut resp, true);
    assert!(matches!(m.state, State::Off));
    assert_eq!(get(&resp, "content-encoding"), Some("gzip"));
    assert_eq!(get(&resp, "content-length"), None);
}

#[test]
fn a_get_without_body_is_left_alone() {
    let req = request("GET", &[("accept-encoding", "gzip")]);
    let mut resp = response(200, &[("content-type", "text/plain")]);
    let m = judge(&req, &mut resp, true);
    assert!(matches!(m.state, State::Off));
    assert_eq!(get(&resp, "content-encoding"), None);
}

#[test]
fn informational_headers_wait_for_the_final_one_and_101_ends_it() {
    let req = request("GET", &[("accept-encoding", "gzip")]);
    let mut m = ResponseCompression::default();
    m.arm(&policy("{}"), &req);
    m.on_header(&mut response(103, &[]), false);
    assert!(matches!(m.state, State::Armed { .. }));
    m.on_header(&mut response(101, &[("content-type", "text/plain")]), false);
    assert!(matches!(m.state, State::Off));
}

#[test]
fn the_body_is_compressed_chunk_by_chunk_and_ends_on_done() {
    let req = request("GET", &[("accept-encoding", "gzip")]);
    let mut resp = response(200, &[("content-type", "text/event-stream")]);
    let mut m = judge(&req, &mut resp, false);
    let mut out = Vec::new();
    for chunk in ["data: one\n\n", "data: two\n\n"] {
        let mut body = Some(Bytes::from(chunk));
        m.on_body(&mut body, false).unwrap();
        out.extend_from_slice(&body.unwrap());
    }
    // An empty chunk passes as an empty chunk.
    let mut body = Some(Bytes::new());
    m.on_body(&mut body, false).unwrap();
    assert_eq!(body, Some(Bytes::new()));
    out.extend_from_slice(&m.response_done_filter().unwrap().unwrap());
    // Done once: a second end adds nothing.
    assert_eq!(m.response_done_filter().unwrap(), None);
    let mut text = String::new();
    flate2::read::GzDecoder::new(&out[..])
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, "data: one\n\ndata: two\n\n");
}

#[test]
fn an_unarmed_module_touches_nothing() {
    let mut m = ResponseCompression::default();
    let mut resp = response(200, &JSON_2K);
    m.on_header(&mut resp, false);
    assert_eq!(resp.headers.len(), 2);
    let mut body = Some(Bytes::from_static(b"x"));
    m.on_body(&mut body, true).unwrap();
    assert_eq!(body, Some(Bytes::from_static(b"x")));
}
