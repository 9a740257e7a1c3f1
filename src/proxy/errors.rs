//! What a failed request means: the status and message the client gets for an error (and its
//! gRPC status, for gRPC clients), and the short label an upstream failure is counted under.

use crate::edge::limits::BODY_TOO_LARGE;
use http::StatusCode;
use pingora::{Error, ErrorSource, ErrorType};

/// A short label of what went wrong with an upstream attempt.
pub fn error_kind(etype: &ErrorType) -> &'static str {
    match etype {
        ErrorType::ConnectTimedout | ErrorType::TLSHandshakeTimedout => "connect_timeout",
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => "timeout",
        ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
            "connect"
        }
        ErrorType::TLSHandshakeFailure | ErrorType::InvalidCert | ErrorType::HandshakeError => {
            "tls"
        }
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => "reset",
        _ => "other",
    }
}

/// The status and message the client gets for a failed request; `None` when the client is
/// gone.
pub fn classify(e: &Error) -> (Option<StatusCode>, &'static str) {
    if let ErrorType::HTTPStatus(code) = e.etype() {
        let status = StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY);
        let message = match status {
            StatusCode::PAYLOAD_TOO_LARGE => BODY_TOO_LARGE,
            _ => "request rejected",
        };
        return (Some(status), message);
    }
    match e.esource() {
        ErrorSource::Upstream => match e.etype() {
            ErrorType::ConnectTimedout
            | ErrorType::ReadTimedout
            | ErrorType::WriteTimedout
            | ErrorType::TLSHandshakeTimedout => {
                (Some(StatusCode::GATEWAY_TIMEOUT), "upstream timed out")
            }
            ErrorType::ConnectNoRoute => {
                (Some(StatusCode::SERVICE_UNAVAILABLE), "no healthy upstream")
            }
            ErrorType::ConnectRefused | ErrorType::ConnectError => {
                (Some(StatusCode::BAD_GATEWAY), "upstream connection refused")
            }
            ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError => {
                (Some(StatusCode::BAD_GATEWAY), "upstream connection reset")
            }
            _ => (Some(StatusCode::BAD_GATEWAY), "bad upstream response"),
        },
        ErrorSource::Downstream => match e.etype() {
            ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed => {
                (None, "client closed")
            }
            ErrorType::ReadTimedout => (Some(StatusCode::REQUEST_TIMEOUT), "client timed out"),
            _ => (Some(StatusCode::BAD_REQUEST), "bad request"),
        },
        ErrorSource::Internal | ErrorSource::Unset => match e.etype() {
            ErrorType::ConnectTimedout => (Some(StatusCode::GATEWAY_TIMEOUT), "upstream timed out"),
            ErrorType::ConnectNoRoute => {
                (Some(StatusCode::SERVICE_UNAVAILABLE), "no healthy upstream")
            }
            _ => (Some(StatusCode::INTERNAL_SERVER_ERROR), "internal error"),
        },
    }
}

/// gRPC status codes the gateway's own answers use.
pub mod grpc {
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
    pub const UNKNOWN: u32 = 2;
}

/// The gRPC status a gRPC client gets for what an HTTP client gets as `status`: what the
/// gateway refused or could not do, in the terms of gRPC's status codes (a request timeout,
/// the client's or the upstream's, is a missed deadline; a size limit, an exhausted
/// resource; no route, a method nobody implements).
pub fn grpc_code(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => grpc::INVALID_ARGUMENT,
        401 => grpc::UNAUTHENTICATED,
        403 => grpc::PERMISSION_DENIED,
        404 | 405 | 501 => grpc::UNIMPLEMENTED,
        408 | 504 => grpc::DEADLINE_EXCEEDED,
        413 | 414 | 429 | 431 => grpc::RESOURCE_EXHAUSTED,
        500 => grpc::INTERNAL,
        502 | 503 => grpc::UNAVAILABLE,
        _ => grpc::UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_answers_map_to_grpc_codes() {
        for (http, code) in [
            (404, 12),
            (401, 16),
            (403, 7),
            (429, 8),
            (413, 8),
            (431, 8),
            (503, 14),
            (502, 14),
            (504, 4),
            (408, 4),
            (400, 3),
            (500, 13),
            (418, 2),
        ] {
            assert_eq!(
                grpc_code(StatusCode::from_u16(http).unwrap()),
                code,
                "{http}"
            );
        }
    }

    #[test]
    fn upstream_errors_map_to_502_and_504() {
        let mut e = Error::new(ErrorType::ConnectRefused);
        e.esource = ErrorSource::Upstream;
        assert_eq!(classify(&e).0, Some(StatusCode::BAD_GATEWAY));
        let mut e = Error::new(ErrorType::ReadTimedout);
        e.esource = ErrorSource::Upstream;
        assert_eq!(classify(&e).0, Some(StatusCode::GATEWAY_TIMEOUT));
        let mut e = Error::new(ErrorType::ConnectionClosed);
        e.esource = ErrorSource::Downstream;
        assert_eq!(classify(&e).0, None);
    }
}
