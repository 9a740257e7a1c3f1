//! Answering a request from a stored response: a `304 Not Modified` when the client's
//! validator matches (RFC 9110 13.1), a `206 Partial Content` (or `416`) for a single byte
//! range (RFC 9110 14), else the whole response; `HEAD` gets the header of the stored `GET`.
//!
//! Preconditions come first (a matching `If-None-Match` answers `304` whatever the `Range`),
//! as RFC 9110 13.2.2 orders them. Only a stored `200` is validated or sliced.

use super::entry::CachedResponse;
use super::X_CACHE;
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::Method;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::conditional_filter::not_modified_filter;

/// A response to write from the cache, `X-Cache` and `Age` set. The proxy adds its own
/// per-request headers (`X-Request-Id`).
pub struct Served {
    /// Boxed, as `Session::write_response_header` takes it.
    pub header: Box<ResponseHeader>,
    /// Empty for HEAD, `304` and `416` (a HEAD's header still carries the GET's
    /// `Content-Length`).
    pub body: Bytes,
}

impl Served {
    pub fn is_not_modified(&self) -> bool {
        self.header.status.as_u16() == 304
    }
}

/// The headers a `304` carries from the stored response (RFC 9110 15.4.5); `Last-Modified`
/// only when there is no `ETag`, as it then is the validator the client holds.
const NOT_MODIFIED_HEADERS: [HeaderName; 6] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::VARY,
];

/// The answer to `req` from `entry`, tagged `X-Cache: x_cache`. `None` only if the stored
/// headers cannot be rebuilt (never for what the cache stored itself).
pub fn respond(
    entry: &CachedResponse,
    req: &RequestHeader,
    x_cache: &'static str,
    now_ms: u64,
) -> Option<Served> {
    let head = req.method == Method::HEAD;
    let mut header = full_header(entry, x_cache, now_ms)?;
    if entry.status == 200 && not_modified(req, &header) {
        return Some(Served {
            header: Box::new(not_modified_header(entry, x_cache, now_ms)?),
            body: Bytes::new(),
        });
    }
    let len = entry.body.len();
    let body = match (entry.status, single_range(req, entry, len as u64)) {
        (200, Some(RangeAnswer::Partial(start, end))) => {
            header.set_status(206).ok()?;
            header
                .insert_header(header::CONTENT_LENGTH, end - start)
                .ok()?;
            header
                .insert_header(
                    header::CONTENT_RANGE,
                    format!("bytes {start}-{}/{len}", end - 1),
                )
                .ok()?;
            entry.body.slice(start as usize..end as usize)
        }
        (200, Some(RangeAnswer::Unsatisfiable)) => {
            header.set_status(416).ok()?;
            header.insert_header(header::CONTENT_LENGTH, 0).ok()?;
            header
                .insert_header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .ok()?;
            header.remove_header(&header::CONTENT_TYPE);
            header.remove_header(&header::CONTENT_ENCODING);
            Bytes::new()
        }
        _ => entry.body.clone(),
    };
    Some(Served {
        header: Box::new(header),
        body: if head { Bytes::new() } else { body },
    })
}

fn full_header(
    entry: &CachedResponse,
    x_cache: &'static str,
    now_ms: u64,
) -> Option<ResponseHeader> {
    let mut header = ResponseHeader::build(entry.status, Some(entry.headers.len() + 3)).ok()?;
    for (name, value) in &entry.headers {
        header.append_header(name.clone(), value.clone()).ok()?;
    }
    if !matches!(entry.status, 204 | 304) {
        header
            .insert_header(header::CONTENT_LENGTH, entry.body.len())
            .ok()?;
    }
    header.insert_header(X_CACHE, x_cache).ok()?;
    header
        .insert_header(header::AGE, entry.age_secs(now_ms))
        .ok()?;
    Some(header)
}

fn not_modified_header(
    entry: &CachedResponse,
    x_cache: &'static str,
    now_ms: u64,
) -> Option<ResponseHeader> {
    let has_etag = entry.header(&header::ETAG).is_some();
    let mut header = ResponseHeader::build(304, Some(8)).ok()?;
    for (name, value) in &entry.headers {
        let keep =
            NOT_MODIFIED_HEADERS.contains(name) || (!has_etag && *name == header::LAST_MODIFIED);
        if keep {
            header.append_header(name.clone(), value.clone()).ok()?;
        }
    }
    header.insert_header(X_CACHE, x_cache).ok()?;
    header
        .insert_header(header::AGE, entry.age_secs(now_ms))
        .ok()?;
    Some(header)
}

/// Whether the request's preconditions say the client's copy is current: `If-None-Match`
/// (weak comparison, lists, `*`), else `If-Modified-Since` against `Last-Modified`.
fn not_modified(req: &RequestHeader, stored: &ResponseHeader) -> bool {
    let star = req
        .headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .any(|v| v.as_bytes().trim_ascii() == b"*");
    star || not_modified_filter(req, stored)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RangeAnswer {
    /// `start..end` (end exclusive).
    Partial(u64, u64),
    Unsatisfiable,
}

/// The single byte range a `GET` asks for, if it asks for one the cache answers: `None` means
/// the whole response (no `Range`, an `If-Range` that does not match, several ranges, a unit
/// other than bytes, or a malformed value, which RFC 9110 14.2 says to ignore).
fn single_range(req: &RequestHeader, entry: &CachedResponse, len: u64) -> Option<RangeAnswer> {
    if req.method != Method::GET {
        return None;
    }
    let mut values = req.headers.get_all(header::RANGE).iter();
    let range = values.next()?;
    if values.next().is_some() || !if_range_matches(req, entry) {
        return None;
    }
    let (unit, set) = range.to_str().ok()?.split_once('=')?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let spec = specs.next()?;
    if specs.next().is_some() {
        // Several ranges: the whole response is a valid answer (RFC 9110 14.2).
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if first.is_empty() {
        // Suffix: the last `n` bytes.
        if !digits(last) {
            return None;
        }
        let n = last.parse::<u64>().unwrap_or(u64::MAX);
        if n == 0 || len == 0 {
            return Some(RangeAnswer::Unsatisfiable);
        }
        return Some(RangeAnswer::Partial(len - n.min(len), len));
    }
    if !digits(first) || !(last.is_empty() || digits(last)) {
        return None;
    }
    // Too many digits for a u64 is still a number, just past any body.
    let start = first.parse::<u64>().unwrap_or(u64::MAX);
    let end = if last.is_empty() {
        None
    } else {
        Some(last.parse::<u64>().unwrap_or(u64::MAX))
    };
    if end.is_some_and(|e| e < start) {
        // An invalid range-spec makes the whole field invalid: ignored.
        return None;
    }
    if start >= len {
        return Some(RangeAnswer::Unsatisfiable);
    }
    let end = end.map_or(len, |e| e.saturating_add(1).min(len));
    Some(RangeAnswer::Partial(start, end))
}

/// `If-Range` (RFC 9110 13.1.5): a strong entity-tag equal to the stored `ETag`, or a date
/// equal to the stored `Last-Modified`. A weak tag never matches. Absent: true.
fn if_range_matches(req: &RequestHeader, entry: &CachedResponse) -> bool {
    let Some(if_range) = req.headers.get(header::IF_RANGE) else {
        return true;
    };
    let v = if_range.as_bytes().trim_ascii();
    if v.starts_with(b"W/") {
        return false;
    }
    if v.starts_with(b"\"") {
        return entry
            .header(&header::ETAG)
            .is_some_and(|etag| etag.as_bytes().trim_ascii() == v);
    }
    entry
        .header(&header::LAST_MODIFIED)
        .is_some_and(|lm| lm.as_bytes().trim_ascii() == v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn entry(headers: &[(&'static str, &'static str)], body: &'static str) -> CachedResponse {
        CachedResponse {
            status: 200,
            headers: headers
                .iter()
                .map(|(n, v)| (HeaderName::from_static(n), HeaderValue::from_static(v)))
                .collect(),
            body: Bytes::from_static(body.as_bytes()),
            stored_at_ms: 1_000,
            ttl_ms: 60_000,
            swr_ms: 0,
            sie_ms: 0,
            vary: vec![],
        }
    }

    fn req(method: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, b"/x", None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    fn answer(e: &CachedResponse, r: &RequestHeader) -> (u16, Vec<(String, String)>, String) {
        let s = respond(e, r, "HIT", 3_500).unwrap();
        let headers = s
            .header
            .headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        (
            s.header.status.as_u16(),
            headers,
            String::from_utf8(s.body.to_vec()).unwrap(),
        )
    }

    fn get<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    const LM: &str = "Tue, 14 Nov 2023 22:13:20 GMT";

    fn validated() -> CachedResponse {
        entry(
            &[
                ("content-type", "text/plain"),
                ("etag", "\"v1\""),
                ("last-modified", LM),
                ("cache-control", "public, max-age=60"),
                ("expires", "Tue, 14 Nov 2023 22:14:20 GMT"),
                ("date", LM),
                ("vary", "Accept-Language"),
                ("x-custom", "1"),
            ],
            "0123456789",
        )
    }

    #[test]
    fn the_whole_response_with_age_and_x_cache_and_head_without_body() {
        let e = validated();
        let (status, headers, body) = answer(&e, &req("GET", &[]));
        assert_eq!((status, body.as_str()), (200, "0123456789"));
        assert_eq!(get(&headers, "content-length"), Some("10"));
        assert_eq!(get(&headers, "age"), Some("2"));
        assert_eq!(get(&headers, "x-cache"), Some("HIT"));
        let (status, headers, body) = answer(&e, &req("HEAD", &[]));
        assert_eq!((status, body.as_str()), (200, ""));
        assert_eq!(get(&headers, "content-length"), Some("10"));
    }

    #[test]
    fn if_none_match_matches_weakly_in_lists_and_star_and_wins_over_if_modified_since() {
        let e = validated();
        for inm in [
            "\"v1\"",
            "W/\"v1\"",
            "\"x\", W/\"v1\"",
            "*",
            " * ",
            "\"a\",\"v1\"",
        ] {
            let (status, _, body) = answer(&e, &req("GET", &[("if-none-match", inm)]));
            assert_eq!((status, body.as_str()), (304, ""), "{inm}");
        }
        for inm in ["\"v2\"", "\"v1x\"", "v2"] {
            assert_eq!(
                answer(&e, &req("GET", &[("if-none-match", inm)])).0,
                200,
                "{inm}"
            );
        }
        // If-None-Match present and not matching: If-Modified-Since is not looked at.
        let r = req(
            "GET",
            &[("if-none-match", "\"v2\""), ("if-modified-since", LM)],
        );
        assert_eq!(answer(&e, &r).0, 200);
        assert_eq!(
            answer(&e, &req("HEAD", &[("if-none-match", "\"v1\"")])).0,
            304
        );
    }

    #[test]
    fn if_modified_since_compares_dates() {
        let e = validated();
        for (ims, status) in [
            (LM, 304),
            ("Wed, 15 Nov 2023 00:00:00 GMT", 304),
            ("Tue, 14 Nov 2023 22:13:19 GMT", 200),
            ("not a date", 200),
        ] {
            assert_eq!(
                answer(&e, &req("GET", &[("if-modified-since", ims)])).0,
                status,
                "{ims}"
            );
        }
        let no_lm = entry(&[("etag", "\"v1\"")], "x");
        assert_eq!(
            answer(&no_lm, &req("GET", &[("if-modified-since", LM)])).0,
            200
        );
    }

    #[test]
    fn a_304_carries_the_validators_and_caching_headers_only() {
        let (status, headers, body) =
            answer(&validated(), &req("GET", &[("if-none-match", "\"v1\"")]));
        assert_eq!((status, body.as_str()), (304, ""));
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "etag",
                "cache-control",
                "expires",
                "date",
                "vary",
                "x-cache",
                "age"
            ]
        );
        assert_eq!(get(&headers, "x-cache"), Some("HIT"));
        // Without an ETag, Last-Modified is the validator and comes along.
        let e = entry(
            &[("last-modified", LM), ("content-type", "text/plain")],
            "x",
        );
        let (status, headers, _) = answer(&e, &req("GET", &[("if-modified-since", LM)]));
        assert_eq!(status, 304);
        assert_eq!(get(&headers, "last-modified"), Some(LM));
        assert_eq!(get(&headers, "content-type"), None);
        assert_eq!(get(&headers, "content-length"), None);
    }

    #[test]
    fn only_a_stored_200_is_validated_or_sliced() {
        let mut e = validated();
        e.status = 404;
        assert_eq!(
            answer(&e, &req("GET", &[("if-none-match", "\"v1\"")])).0,
            404
        );
        assert_eq!(answer(&e, &req("GET", &[("range", "bytes=0-1")])).0, 404);
    }

    #[test]
    fn single_ranges_are_answered_206_with_content_range() {
        let e = validated();
        for (range, expect, content_range) in [
            ("bytes=0-3", "0123", "bytes 0-3/10"),
            ("bytes=2-", "23456789", "bytes 2-9/10"),
            ("bytes=-3", "789", "bytes 7-9/10"),
            ("bytes=-30", "0123456789", "bytes 0-9/10"),
            ("bytes=8-100", "89", "bytes 8-9/10"),
            ("Bytes = 9-9", "9", "bytes 9-9/10"),
            ("bytes=0-3,", "0123", "bytes 0-3/10"),
            ("bytes=5-99999999999999999999999", "56789", "bytes 5-9/10"),
        ] {
            let (status, headers, body) = answer(&e, &req("GET", &[("range", range)]));
            assert_eq!((status, body.as_str()), (206, expect), "{range}");
            assert_eq!(
                get(&headers, "content-range"),
                Some(content_range),
                "{range}"
            );
            assert_eq!(
                get(&headers, "content-length"),
                Some(expect.len().to_string().as_str()),
                "{range}"
            );
            assert_eq!(get(&headers, "content-type"), Some("text/plain"));
        }
    }

    #[test]
    fn unsatisfiable_ranges_are_416_and_odd_ones_get_the_whole_response() {
        let e = validated();
        for range in [
            "bytes=10-",
            "bytes=10-20",
            "bytes=-0",
            "bytes=99999999999999999999999-",
        ] {
            let (status, headers, body) = answer(&e, &req("GET", &[("range", range)]));
            assert_eq!((status, body.as_str()), (416, ""), "{range}");
            assert_eq!(
                get(&headers, "content-range"),
                Some("bytes */10"),
                "{range}"
            );
            assert_eq!(get(&headers, "content-length"), Some("0"));
            assert_eq!(get(&headers, "content-type"), None);
        }
        let empty = entry(&[], "");
        assert_eq!(answer(&empty, &req("GET", &[("range", "bytes=-1")])).0, 416);
        assert_eq!(answer(&empty, &req("GET", &[("range", "bytes=0-")])).0, 416);
        for range in [
            "bytes=0-1,3-4",
            "bytes=5-2",
            "bytes=",
            "bytes=-",
            "bytes=a-b",
            "bytes=+1-2",
            "bytes=-+2",
            "items=0-1",
            "0-1",
            "bytes=0-1-2",
        ] {
            let (status, _, body) = answer(&e, &req("GET", &[("range", range)]));
            assert_eq!((status, body.as_str()), (200, "0123456789"), "{range}");
        }
        // Two Range fields: ignored. HEAD: Range is for GET only.
        let mut two = req("GET", &[("range", "bytes=0-1")]);
        two.append_header("range", "bytes=2-3").unwrap();
        assert_eq!(answer(&e, &two).0, 200);
        assert_eq!(answer(&e, &req("HEAD", &[("range", "bytes=0-1")])).0, 200);
    }

    #[test]
    fn if_range_needs_a_strong_match() {
        let e = validated();
        let ranged = |if_range: &str| {
            answer(
                &e,
                &req("GET", &[("range", "bytes=0-1"), ("if-range", if_range)]),
            )
            .0
        };
        assert_eq!(ranged("\"v1\""), 206);
        assert_eq!(ranged(LM), 206);
        assert_eq!(ranged("W/\"v1\""), 200);
        assert_eq!(ranged("\"v2\""), 200);
        assert_eq!(ranged("Wed, 15 Nov 2023 00:00:00 GMT"), 200);
        let weak = entry(&[("etag", "W/\"v1\"")], "0123");
        let r = req("GET", &[("range", "bytes=0-1"), ("if-range", "W/\"v1\"")]);
        assert_eq!(answer(&weak, &r).0, 200);
    }

    #[test]
    fn a_matching_precondition_wins_over_range() {
        let e = validated();
        let r = req(
            "GET",
            &[("range", "bytes=0-1"), ("if-none-match", "\"v1\"")],
        );
        assert_eq!(answer(&e, &r).0, 304);
    }
}
