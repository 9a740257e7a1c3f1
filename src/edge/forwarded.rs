//! The client as the gateway sees it, and what it tells the upstream about it: the client's
//! address, whether it came over TLS, and the `X-Forwarded-For`, `-Proto` and `-Host` headers.

use crate::routing::request_host;
use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Result;

/// The client's IP address (the TCP peer), empty when unknown.
pub fn client_ip(session: &Session) -> String {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
        .unwrap_or_default()
}

/// Whether the client connected over TLS.
pub fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// Sets the `X-Forwarded-*` headers of the upstream request: the client's address appended to
/// any `X-Forwarded-For` it sent, the scheme it used, and the host it asked for.
pub fn set_headers(session: &Session, upstream_request: &mut RequestHeader) -> Result<()> {
    let ip = client_ip(session);
    let forwarded_for = match upstream_request
        .headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
    {
        Some(prior) if !prior.is_empty() => format!("{prior}, {ip}"),
        _ => ip,
    };
    upstream_request.insert_header("x-forwarded-for", forwarded_for)?;
    let proto = if is_tls(session) { "https" } else { "http" };
    upstream_request.insert_header("x-forwarded-proto", proto)?;
    if let Some(host) =
        request_host(session.req_header()).and_then(|h| HeaderValue::from_str(h).ok())
    {
        upstream_request.insert_header("x-forwarded-host", host)?;
    }
    Ok(())
}
