//! The HTTP caching rules (RFC 9111) the cache applies to requests and responses: which
//! requests stay out of the shared cache, which responses are stored and for how long, which
//! headers are kept, and how a `304` refreshes a stored response.

use super::X_CACHE;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use std::time::SystemTime;

/// Statuses whose responses may be stored (RFC 9110's heuristically cacheable set).
pub const STORABLE_STATUSES: [u16; 10] = [200, 203, 204, 300, 301, 404, 405, 410, 414, 501];

/// Request headers some frameworks read as another method (a `GET` carrying one may be
/// handled as a `POST` or `DELETE`): such requests never use the shared cache.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// The service's defaults for a stored response's lifetime, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub ttl_ms: u64,
    pub swr_ms: u64,
    pub sie_ms: u64,
}

/// How long a stored response is fresh, then servable while revalidating, then on error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetime {
    pub ttl_ms: u64,
    pub swr_ms: u64,
    pub sie_ms: u64,
}

/// Why a request does not use the shared cache, if it does not: the client asked for a
/// fresh answer, or the request carries input the key does not cover and the upstream may
/// read (a body on a `GET`, a method override).
pub fn request_bypasses(headers: &HeaderMap) -> bool {
    let mut has_cache_control = false;
    for v in headers.get_all(header::CACHE_CONTROL) {
        has_cache_control = true;
        if directives(v).any(|(name, _)| name == "no-cache" || name == "no-store") {
            return true;
        }
    }
    // HTTP/1.0 clients say it with Pragma; Cache-Control wins when both are present.
    if !has_cache_control
        && headers
            .get_all(header::PRAGMA)
            .iter()
            .any(|v| directives(v).any(|(name, _)| name == "no-cache"))
    {
        return true;
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || content_length(headers).is_some_and(|n| n > 0);
    has_body || METHOD_OVERRIDES.iter().any(|h| headers.contains_key(*h))
}

/// The lifetime of a response, or `None` when it must not be stored. `per_user_key`: the key
/// includes the user, so `private` responses are storable.
///
/// Freshness is the service's `ttl`, lowered by `s-maxage`, else `max-age`, else `Expires`
/// (against `Date`). The stale windows are the response's `stale-while-revalidate` /
/// `stale-if-error` when it sends them, else the service's; `must-revalidate`,
/// `proxy-revalidate` and `s-maxage` (which implies `proxy-revalidate` for a shared cache)
/// forbid serving a stale copy beyond what the response itself allows.
pub fn storable(
    status: u16,
    headers: &HeaderMap,
    per_user_key: bool,
    defaults: Defaults,
    now: SystemTime,
) -> Option<Lifetime> {
    if !STORABLE_STATUSES.contains(&status)
        || headers.contains_key(header::SET_COOKIE)
        || is_event_stream(headers)
    {
        return None;
    }
    let mut max_age = None;
    let mut s_maxage = None;
    let mut swr = None;
    let mut sie = None;
    let mut no_stale = false;
    for v in headers.get_all(header::CACHE_CONTROL) {
        for (name, arg) in directives(v) {
            match name.as_str() {
                "no-store" | "no-cache" => return None,
                "private" if !per_user_key => return None,
                // An unreadable age means "stale now", per RFC 9111 4.2.1.
                "max-age" => max_age = Some(seconds(arg).unwrap_or(0)),
                "s-maxage" => {
                    s_maxage = Some(seconds(arg).unwrap_or(0));
                    no_stale = true;
                }
                "must-revalidate" | "proxy-revalidate" => no_stale = true,
                "stale-while-revalidate" => swr = seconds(arg),
                "stale-if-error" => sie = seconds(arg),
                _ => {}
            }
        }
    }
    let lifetime_ms = match s_maxage.or(max_age) {
        Some(secs) => Some(secs.saturating_mul(1000)),
        None => expires_lifetime_ms(headers, now),
    };
    let ttl_ms = lifetime_ms.map_or(defaults.ttl_ms, |l| l.min(defaults.ttl_ms));
    if ttl_ms == 0 {
        return None;
    }
    let window = |directive: Option<u64>, default: u64| match directive {
        Some(secs) => secs.saturating_mul(1000),
        None if no_stale => 0,
        None => default,
    };
    Some(Lifetime {
        ttl_ms,
        swr_ms: window(swr, defaults.swr_ms),
        sie_ms: window(sie, defaults.sie_ms),
    })
}

/// `Expires` minus `Date` (or now), in ms; an `Expires` that is not a date means already
/// expired (RFC 9111 5.3). `None` without `Expires`.
fn expires_lifetime_ms(headers: &HeaderMap, now: SystemTime) -> Option<u64> {
    let expires = headers.get(header::EXPIRES)?;
    let Some(expires) = http_date(expires) else {
        return Some(0);
    };
    let date = headers.get(header::DATE).and_then(http_date).unwrap_or(now);
    Some(
        expires
            .duration_since(date)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
    )
}

pub fn http_date(v: &HeaderValue) -> Option<SystemTime> {
    httpdate::parse_http_date(v.to_str().ok()?.trim()).ok()
}

fn seconds(arg: Option<&str>) -> Option<u64> {
    arg?.parse().ok()
}

/// The request headers a response varies on, lower-case, sorted and without duplicates;
/// `None` for `Vary: *` or an unreadable `Vary` (not storable).
pub fn vary_names(resp: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut out: Vec<HeaderName> = Vec::new();
    for v in resp.get_all(header::VARY) {
        let text = v.to_str().ok()?;
        for name in text.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if name == "*" {
                return None;
            }
            out.push(HeaderName::from_bytes(name.as_bytes()).ok()?);
        }
    }
    out.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    out.dedup();
    Some(out)
}

/// Whether a response with these headers is in a content coding (a `Content-Encoding` other
/// than `identity`).
pub fn is_encoded(resp: &HeaderMap) -> bool {
    resp.get_all(header::CONTENT_ENCODING).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|c| !c.is_empty() && !c.eq_ignore_ascii_case(b"identity"))
    })
}

/// The response headers worth replaying: not hop-by-hop, not recomputed on serving
/// (`Content-Length`, `Age`, `X-Cache`), not about one request (`X-Request-Id`, rate-limit
/// counters).
pub fn stored_headers(headers: &HeaderMap) -> Vec<(HeaderName, HeaderValue)> {
    headers
        .iter()
        .filter(|(name, _)| is_stored(name))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect()
}

fn is_stored(name: &HeaderName) -> bool {
    let n = name.as_str();
    !matches!(
        n,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "te"
            | "trailer"
            | "upgrade"
            | "content-length"
            | "age"
            | X_CACHE
            | "x-request-id"
    ) && !n.starts_with("x-ratelimit-")
        && !n.starts_with("ratelimit")
}

/// A stored response's headers updated by a `304` (RFC 9111 3.2): every header the `304`
/// carries replaces the stored ones of that name, except those describing the stored body.
pub fn refreshed_headers(
    stored: &[(HeaderName, HeaderValue)],
    not_modified: &HeaderMap,
) -> Vec<(HeaderName, HeaderValue)> {
    let updates = |n: &HeaderName| {
        is_stored(n)
            && *n != header::CONTENT_ENCODING
            && *n != header::CONTENT_RANGE
            && *n != header::CONTENT_TYPE
            && not_modified.contains_key(n)
    };
    let mut out: Vec<(HeaderName, HeaderValue)> = stored
        .iter()
        .filter(|(n, _)| !updates(n))
        .cloned()
        .collect();
    out.extend(
        not_modified
            .iter()
            .filter(|(n, _)| updates(n))
            .map(|(n, v)| (n.clone(), v.clone())),
    );
    out
}

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// `Cache-Control`-style directives of one header value: lower-case names, unquoted args.
pub fn directives(v: &HeaderValue) -> impl Iterator<Item = (String, Option<&str>)> {
    v.to_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| match d.split_once('=') {
            Some((name, arg)) => (
                name.trim().to_ascii_lowercase(),
                Some(arg.trim().trim_matches('"')),
            ),
            None => (d.to_ascii_lowercase(), None),
        })
}

/// A Server-Sent Events stream: live, never finished in the usual sense, and different for
/// each subscriber, so never stored whatever its `Cache-Control` says. Any `Content-Type`
/// line naming it counts (parameters, case and spaces aside).
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_TYPE).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b';')
            .next()
            .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"text/event-stream"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn hm(headers: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in headers {
            m.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    const D: Defaults = Defaults {
        ttl_ms: 60_000,
        swr_ms: 5_000,
        sie_ms: 7_000,
    };

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn lifetime(headers: &[(&str, &str)]) -> Option<Lifetime> {
        storable(200, &hm(headers), false, D, now())
    }

    fn ttl(headers: &[(&str, &str)]) -> Option<u64> {
        lifetime(headers).map(|l| l.ttl_ms)
    }

    #[test]
    fn only_the_cacheable_statuses_are_stored() {
        for status in STORABLE_STATUSES {
            assert!(
                storable(status, &hm(&[]), false, D, now()).is_some(),
                "{status}"
            );
        }
        for status in [
            201, 202, 206, 302, 304, 307, 400, 401, 403, 429, 500, 502, 503, 504,
        ] {
            assert_eq!(
                storable(status, &hm(&[]), false, D, now()),
                None,
                "{status}"
            );
        }
    }

    #[test]
    fn event_streams_are_never_stored() {
        for ct in [
            "text/event-stream",
            "Text/Event-Stream",
            " text/event-stream ; charset=utf-8",
            "text/event-stream;charset=utf-8",
        ] {
            let h = [
                ("content-type", ct),
                ("cache-control", "public, max-age=60"),
            ];
            assert_eq!(ttl(&h), None, "{ct:?}");
        }
        // Two Content-Type lines, one of them an event stream.
        let two = [
            ("content-type", "application/json"),
            ("content-type", "text/event-stream"),
        ];
        assert_eq!(ttl(&two), None);
        assert_eq!(
            ttl(&[("content-type", "text/event-streams")]),
            Some(60_000),
            "only the exact type"
        );
        assert_eq!(ttl(&[("content-type", "application/json")]), Some(60_000));
    }

    #[test]
    fn set_cookie_no_store_no_cache_and_private_are_not_stored() {
        assert_eq!(ttl(&[("set-cookie", "a=b")]), None);
        assert_eq!(ttl(&[("cache-control", "no-store")]), None);
        assert_eq!(ttl(&[("cache-control", "public, No-Cache")]), None);
        assert_eq!(ttl(&[("cache-control", "no-cache=\"set-cookie\"")]), None);
        assert_eq!(ttl(&[("cache-control", "private")]), None);
        assert_eq!(
            ttl(&[
                ("cache-control", "max-age=60"),
                ("cache-control", "private")
            ]),
            None
        );
        let private = hm(&[("cache-control", "private")]);
        assert!(
            storable(200, &private, true, D, now()).is_some(),
            "per-user keys store private"
        );
    }

    #[test]
    fn freshness_from_s_maxage_then_max_age_then_expires_capped_by_the_ttl() {
        assert_eq!(ttl(&[]), Some(60_000));
        assert_eq!(ttl(&[("cache-control", "max-age=5")]), Some(5_000));
        assert_eq!(
            ttl(&[("cache-control", "max-age=5, s-maxage=9")]),
            Some(9_000)
        );
        assert_eq!(
            ttl(&[
                ("cache-control", "s-maxage=20"),
                ("cache-control", "max-age=5")
            ]),
            Some(20_000)
        );
        assert_eq!(ttl(&[("cache-control", "s-maxage=\"30\"")]), Some(30_000));
        assert_eq!(ttl(&[("cache-control", "max-age=3600")]), Some(60_000));
        assert_eq!(ttl(&[("cache-control", "max-age=0")]), None);
        assert_eq!(ttl(&[("cache-control", "max-age=soon")]), None);
        let date = "Tue, 14 Nov 2023 22:13:20 GMT"; // 1_700_000_000
        assert_eq!(
            ttl(&[("date", date), ("expires", "Tue, 14 Nov 2023 22:13:50 GMT")]),
            Some(30_000)
        );
        // No Date: against now (the same instant here).
        assert_eq!(
            ttl(&[("expires", "Tue, 14 Nov 2023 22:13:30 GMT")]),
            Some(10_000)
        );
        // max-age wins over Expires; an Expires in the past or unreadable is stale now.
        assert_eq!(
            ttl(&[
                ("expires", "Tue, 14 Nov 2023 22:13:30 GMT"),
                ("cache-control", "max-age=20")
            ]),
            Some(20_000)
        );
        assert_eq!(
            ttl(&[("date", date), ("expires", "Mon, 13 Nov 2023 00:00:00 GMT")]),
            None
        );
        assert_eq!(ttl(&[("expires", "0")]), None);
    }

    #[test]
    fn stale_windows_from_the_response_else_the_service_unless_revalidation_is_required() {
        let l = lifetime(&[]).unwrap();
        assert_eq!((l.swr_ms, l.sie_ms), (5_000, 7_000));
        let l = lifetime(&[("cache-control", "max-age=9, stale-while-revalidate=30")]).unwrap();
        assert_eq!((l.swr_ms, l.sie_ms), (30_000, 7_000));
        let l = lifetime(&[(
            "cache-control",
            "stale-if-error=100, stale-while-revalidate=0",
        )])
        .unwrap();
        assert_eq!((l.swr_ms, l.sie_ms), (0, 100_000));
        for cc in ["must-revalidate", "proxy-revalidate", "s-maxage=10"] {
            let l = lifetime(&[("cache-control", cc)]).unwrap();
            assert_eq!((l.swr_ms, l.sie_ms), (0, 0), "{cc}");
        }
        // What the origin explicitly allows still holds.
        let l = lifetime(&[("cache-control", "must-revalidate, stale-if-error=60")]).unwrap();
        assert_eq!((l.swr_ms, l.sie_ms), (0, 60_000));
    }

    #[test]
    fn client_no_cache_no_store_pragma_bodies_and_method_overrides_bypass() {
        assert!(!request_bypasses(&hm(&[])));
        assert!(request_bypasses(&hm(&[("cache-control", "no-cache")])));
        assert!(request_bypasses(&hm(&[(
            "cache-control",
            "max-age=0, NO-STORE"
        )])));
        assert!(!request_bypasses(&hm(&[("cache-control", "max-age=0")])));
        assert!(request_bypasses(&hm(&[("pragma", "no-cache")])));
        // Cache-Control wins over Pragma.
        assert!(!request_bypasses(&hm(&[
            ("pragma", "no-cache"),
            ("cache-control", "max-age=5")
        ])));
        // A GET with a body: the upstream may read what the key does not cover.
        assert!(request_bypasses(&hm(&[("content-length", "3")])));
        assert!(!request_bypasses(&hm(&[("content-length", "0")])));
        assert!(request_bypasses(&hm(&[("transfer-encoding", "chunked")])));
        assert!(request_bypasses(&hm(&[(
            "x-http-method-override",
            "DELETE"
        )])));
        assert!(request_bypasses(&hm(&[("X-Method-Override", "POST")])));
    }

    #[test]
    fn encoded_means_a_coding_other_than_identity() {
        assert!(is_encoded(&hm(&[("content-encoding", "gzip")])));
        assert!(is_encoded(&hm(&[("content-encoding", "identity, br")])));
        assert!(!is_encoded(&hm(&[("content-encoding", "Identity")])));
        assert!(!is_encoded(&hm(&[("content-encoding", "")])));
        assert!(!is_encoded(&hm(&[])));
    }

    #[test]
    fn vary_names_are_sorted_unique_and_star_is_not_storable() {
        let names = vary_names(&hm(&[
            ("vary", "Accept-Language, accept-encoding"),
            ("vary", "Accept-Language"),
        ]))
        .unwrap();
        let names: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["accept-encoding", "accept-language"]);
        assert_eq!(vary_names(&hm(&[])), Some(vec![]));
        assert_eq!(vary_names(&hm(&[("vary", "Accept, *")])), None);
        assert_eq!(vary_names(&hm(&[("vary", "bad header")])), None);
    }

    #[test]
    fn per_request_and_hop_by_hop_headers_are_not_stored() {
        let kept = stored_headers(&hm(&[
            ("content-type", "text/plain"),
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("content-length", "5"),
            ("age", "3"),
            ("x-cache", "MISS"),
            ("x-request-id", "abc"),
            ("x-ratelimit-remaining", "4"),
            ("ratelimit-limit", "5"),
            ("etag", "\"v1\""),
        ]));
        let names: Vec<&str> = kept.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "etag"]);
    }

    #[test]
    fn a_304_replaces_the_headers_it_carries_except_those_describing_the_body() {
        let stored = stored_headers(&hm(&[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
            ("cache-control", "max-age=1"),
            ("x-multi", "a"),
            ("x-multi", "b"),
            ("etag", "\"v1\""),
        ]));
        let merged = refreshed_headers(
            &stored,
            &hm(&[
                ("cache-control", "max-age=60"),
                ("x-multi", "c"),
                ("content-type", "text/html"),
                ("content-encoding", "br"),
                ("content-length", "0"),
                ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
                ("connection", "keep-alive"),
            ]),
        );
        let get = |name: &str| -> Vec<&str> {
            merged
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.to_str().unwrap())
                .collect()
        };
        assert_eq!(get("cache-control"), ["max-age=60"]);
        assert_eq!(get("x-multi"), ["c"]);
        assert_eq!(get("content-type"), ["application/json"]);
        assert_eq!(get("content-encoding"), ["gzip"]);
        assert_eq!(get("etag"), ["\"v1\""]);
        assert_eq!(get("date"), ["Tue, 14 Nov 2023 22:13:20 GMT"]);
        assert!(get("content-length").is_empty() && get("connection").is_empty());
    }
}
