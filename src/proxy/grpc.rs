//! gRPC at the gateway: which requests are gRPC calls, the gateway's own answers in gRPC's
//! trailers-only form (HTTP `200`, `grpc-status`, `grpc-message`, no body), the status a
//! gRPC upstream ended a call with, and the `grpc-timeout` deadline (read, capped by the
//! service's timeouts, and forwarded as what is left).

use super::answer::Decorate;
use super::request_id::REQUEST_ID_HEADER;
use crate::runtime::Service;
use crate::upstream::peer::Protocol;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::http::ServerSession;
use pingora::proxy::Session;
use pingora::Result;
use std::time::Duration;

pub const GRPC_TIMEOUT: &str = "grpc-timeout";
/// The status of a call whose deadline passed.
pub const DEADLINE_EXCEEDED: u32 = 4;
const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";

/// Whether the gateway's answers to this request take gRPC's form: the service is a gRPC
/// service, or the request says it is a gRPC call (`application/grpc`, `application/grpc+proto`,
/// ...; not gRPC-Web, whose clients read trailers from the body).
pub fn wants_grpc_answers(req: &RequestHeader, service: Option<&Service>) -> bool {
    service.is_some_and(|s| s.protocol == Protocol::Grpc) || is_grpc_call(req)
}

fn is_grpc_call(req: &RequestHeader) -> bool {
    let Some(content_type) = req.headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let v = content_type.as_bytes();
    v.len() >= 16
        && v[..16].eq_ignore_ascii_case(b"application/grpc")
        && matches!(v.get(16), None | Some(b'+' | b';'))
}

/// Writes a trailers-only gRPC response: the call ends with `code` and `message` in the
/// response header, which ends the stream.
pub async fn send_status(
    session: &mut Session,
    code: u32,
    message: &str,
    request_id: &HeaderValue,
    extra_headers: &[(HeaderName, HeaderValue)],
    decorate: &Decorate<'_>,
) -> Result<()> {
    let mut header = ResponseHeader::build(StatusCode::OK, Some(5 + extra_headers.len()))?;
    header.insert_header(http::header::CONTENT_TYPE, "application/grpc")?;
    header.insert_header(GRPC_STATUS, HeaderValue::from(code))?;
    header.insert_header(GRPC_MESSAGE, encode_message(message))?;
    header.insert_prepared_header(&REQUEST_ID_HEADER, request_id.clone())?;
    if !session.is_http2() {
        // An HTTP/1.1 client must see where the (empty) body ends.
        header.insert_header(http::header::CONTENT_LENGTH, "0")?;
    }
    for (name, value) in extra_headers {
        header.insert_header(name.clone(), value.clone())?;
    }
    decorate(&mut header);
    // Pingora's `Session::write_response_header` never ends an h2 stream with the header, and
    // a gRPC client reads `grpc-status` from a header only when that header ends the stream
    // (else it waits for trailers and reports the call as broken).
    if let ServerSession::H2(h2) = session.as_downstream_mut() {
        return h2.write_response_header(Box::new(header), true);
    }
    session.write_response_header(Box::new(header), true).await
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII, and `%` itself.
fn encode_message(message: &str) -> HeaderValue {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).unwrap_or(HeaderValue::from_static(""))
}

/// The `grpc-status` of a response header (a trailers-only answer) or of trailers.
pub fn status_of(headers: &HeaderMap) -> Option<u32> {
    let v = headers.get(GRPC_STATUS)?;
    std::str::from_utf8(v.as_bytes()).ok()?.parse().ok()
}

/// The client's deadline from `grpc-timeout`: 1 to 8 digits and a unit (`H`, `M`, `S`, `m`,
/// `u`, `n`); `None` when absent or malformed (then no deadline is taken from it).
pub fn timeout_of(req: &RequestHeader) -> Option<Duration> {
    let v = req.headers.get(GRPC_TIMEOUT)?.as_bytes();
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `left` as a `grpc-timeout` value, in milliseconds rounded up (at least 1, at most the 8
/// digits the header allows).
pub fn timeout_value(left: Duration) -> HeaderValue {
    let ms = left.as_nanos().div_ceil(1_000_000).clamp(1, 99_999_999);
    HeaderValue::from_str(&format!("{ms}m")).unwrap_or(HeaderValue::from_static("1m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("POST", b"/pkg.Svc/Method", None).unwrap();
        for (name, value) in headers {
            req.insert_header(name.to_string(), *value).unwrap();
        }
        req
    }

    #[test]
    fn grpc_calls_are_told_by_their_content_type() {
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "Application/GRPC;x=1",
        ] {
            assert!(is_grpc_call(&req(&[("content-type", ct)])), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/json",
            "application/grp",
        ] {
            assert!(!is_grpc_call(&req(&[("content-type", ct)])), "{ct}");
        }
        assert!(!is_grpc_call(&req(&[])));
    }

    #[test]
    fn grpc_timeout_is_read_in_every_unit_and_refused_when_malformed() {
        let t = |v: &str| timeout_of(&req(&[("grpc-timeout", v)]));
        assert_eq!(t("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(t("3M"), Some(Duration::from_secs(180)));
        assert_eq!(t("10S"), Some(Duration::from_secs(10)));
        assert_eq!(t("250m"), Some(Duration::from_millis(250)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("5n"), Some(Duration::from_nanos(5)));
        for bad in [
            "",
            "S",
            "123456789S",
            "10s",
            "-1S",
            "1.5S",
            "10",
            " 10S",
            "1 S",
        ] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(timeout_of(&req(&[])), None);
    }

    #[test]
    fn the_forwarded_timeout_is_what_is_left_in_milliseconds() {
        assert_eq!(timeout_value(Duration::from_millis(1500)), "1500m");
        assert_eq!(timeout_value(Duration::from_micros(1)), "1m");
        assert_eq!(timeout_value(Duration::ZERO), "1m");
        assert_eq!(timeout_value(Duration::from_secs(10_000_000)), "99999999m");
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("no route"), "no route");
        assert_eq!(encode_message("50% off\né"), "50%25 off%0A%C3%A9");
    }

    #[test]
    fn status_is_read_from_headers_or_trailers() {
        let mut h = HeaderMap::new();
        assert_eq!(status_of(&h), None);
        h.insert("grpc-status", HeaderValue::from_static("14"));
        assert_eq!(status_of(&h), Some(14));
        h.insert("grpc-status", HeaderValue::from_static("x"));
        assert_eq!(status_of(&h), None);
    }
}
