//! Request size limits: the `limits:` section (top level, and a service's override of some
//! of its fields), and the checks against it: the header block and a declared body length
//! when the header arrives, the body's actual length while it streams.

use crate::values::ByteSize;
use http::StatusCode;
use pingora::http::RequestHeader;
use serde::Deserialize;
use std::time::Duration;

/// What the client is told, and the access log records, for a body over `max_body_size`.
pub const BODY_TOO_LARGE: &str = "request body too large";
/// ... and for a header block over `max_header_size`.
pub const HEADER_TOO_LARGE: &str = "request header too large";

/// `limits:` at the top level, or a service's override of some of its fields.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request body; larger ones get `413`. Default: 10MiB.
    #[serde(default)]
    pub max_body_size: Option<ByteSize>,
    /// Largest request header block (request line and all headers); larger ones get `431`.
    /// Pingora itself refuses anything over 1MiB while reading. Default: 32KiB.
    #[serde(default)]
    pub max_header_size: Option<ByteSize>,
    /// Longest wait for each read of a client's request body once its header arrived, so a
    /// client that trickles its body cannot hold a request open. Default: 10s.
    #[serde(default, deserialize_with = "crate::values::de_opt_duration")]
    pub header_read_timeout: Option<Duration>,
}

/// Limits in force for one service: its own fields, else the top-level ones, else defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body_size: u64,
    pub max_header_size: u64,
    pub header_read_timeout: Duration,
}

impl LimitsConfig {
    /// The limits in force for a service: `self` (its override) over `global` over the
    /// defaults. Any size or duration is accepted.
    pub fn compile(&self, global: &LimitsConfig) -> Limits {
        Limits {
            max_body_size: self
                .max_body_size
                .or(global.max_body_size)
                .map_or(10 << 20, |b| b.0),
            max_header_size: self
                .max_header_size
                .or(global.max_header_size)
                .map_or(32 << 10, |b| b.0),
            header_read_timeout: self
                .header_read_timeout
                .or(global.header_read_timeout)
                .unwrap_or(Duration::from_secs(10)),
        }
    }
}

/// The length of `value` as text, counted without writing it anywhere.
fn display_len(value: &impl std::fmt::Display) -> usize {
    struct Count(usize);
    impl std::fmt::Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut count = Count(0);
    // Counting never fails.
    let _ = std::fmt::write(&mut count, format_args!("{value}"));
    count.0
}

impl Limits {
    /// Checks what is known from the header alone: its own size and a declared body length.
    pub fn check_header(&self, req: &RequestHeader) -> Option<(StatusCode, &'static str)> {
        let header_size: usize = req.method.as_str().len()
            + display_len(&req.uri)
            + req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum::<usize>();
        if header_size as u64 > self.max_header_size {
            return Some((
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                HEADER_TOO_LARGE,
            ));
        }
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        match declared {
            Some(len) if len > self.max_body_size => {
                Some((StatusCode::PAYLOAD_TOO_LARGE, BODY_TOO_LARGE))
            }
            _ => None,
        }
    }

    /// Whether a body of `received` bytes so far is over the limit: a body without
    /// `Content-Length` (chunked) is counted as it streams.
    pub fn body_exceeds(&self, received: u64) -> bool {
        received > self.max_body_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn a_target_is_measured_as_it_is_written() {
        for target in [
            "/",
            "/users/1?a=b&c=%20",
            "http://example.com:8080/x?y",
            "*",
        ] {
            let uri: http::Uri = target.parse().unwrap();
            assert_eq!(display_len(&uri), uri.to_string().len(), "{target}");
        }
    }

    /// The top-level `limits` and each service's, from a config file's text.
    #[derive(Deserialize)]
    struct File {
        limits: LimitsConfig,
        services: BTreeMap<String, Service>,
    }

    #[derive(Deserialize)]
    struct Service {
        #[serde(default)]
        limits: LimitsConfig,
    }

    fn parse(text: &str) -> File {
        serde_yaml::from_str(text).unwrap()
    }

    #[test]
    fn service_limits_override_global_ones() {
        let c = parse("limits: {max_body_size: 1KiB}\nservices:\n  a:\n    routes: [{path_prefix: /a}]\n    upstreams: [\"127.0.0.1:1\"]\n    limits: {max_header_size: 8KiB}\n  b:\n    routes: [{path_prefix: /b}]\n    upstreams: [\"127.0.0.1:2\"]\n");
        let a = c.services["a"].limits.compile(&c.limits);
        assert_eq!(a.max_body_size, 1024);
        assert_eq!(a.max_header_size, 8192);
        let b = c.services["b"].limits.compile(&c.limits);
        assert_eq!(b.max_header_size, 32 << 10);
        assert_eq!(b.header_read_timeout, Duration::from_secs(10));
    }
}
