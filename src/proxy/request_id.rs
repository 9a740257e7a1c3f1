//! The request id: `X-Request-Id`, kept from the client when well formed, else a new random
//! one; sent upstream, on every answer and in the access log.

use http::HeaderValue;
use pingora::http::PreparedHeaderName;

pub const REQUEST_ID: &str = "x-request-id";

/// `REQUEST_ID` prepared once: looked up and inserted without parsing the name each time.
pub static REQUEST_ID_HEADER: PreparedHeaderName = PreparedHeaderName::from_static(REQUEST_ID);

/// A client-sent request id is kept when it is short and plainly printable.
pub fn is_well_formed(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    (1..=128).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

pub fn new() -> HeaderValue {
    // A random (v4) UUID from the thread's fast generator: ids must be unique, not secret,
    // and a getrandom syscall per request is measurable.
    let id = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    // A hyphenated UUID is always a valid header value.
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_id_validation() {
        assert!(is_well_formed(&HeaderValue::from_static("abc-123_x.y:z")));
        assert!(!is_well_formed(&HeaderValue::from_static("")));
        assert!(!is_well_formed(&HeaderValue::from_static("a b")));
        assert!(!is_well_formed(
            &HeaderValue::from_str(&"a".repeat(129)).unwrap()
        ));
        assert!(is_well_formed(&new()));
    }
}
