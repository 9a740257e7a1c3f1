//! What a failed request means: the status and message the client gets for an error, and the
//! short label an upstream failure is counted under.

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

#[cfg(test)]
mod tests {
    use super::*;

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
