//! Responses the gateway writes itself (errors, preflights, fallbacks): JSON bodies with the
//! request id, so a client always gets a machine-readable reason and never a bare page.

use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use serde::Serialize;

/// Adds the headers every answer of a service carries (security headers, CORS, ...).
pub type Decorate<'a> = dyn Fn(&mut ResponseHeader) + Send + Sync + 'a;

/// `{"error": ..., "service": ..., "upstream": ..., "detail": ...}`.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ErrorBody {
    pub fn new(error: impl Into<String>) -> ErrorBody {
        ErrorBody {
            error: error.into(),
            service: None,
            upstream: None,
            detail: None,
        }
    }

    pub fn service(mut self, service: &str) -> ErrorBody {
        self.service = Some(service.to_string());
        self
    }

    pub fn upstream(mut self, upstream: &str) -> ErrorBody {
        self.upstream = Some(upstream.to_string());
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> ErrorBody {
        self.detail = Some(detail.into());
        self
    }
}

/// Writes a complete response with a JSON body built from `body`.
pub async fn send_json(
    session: &mut Session,
    status: StatusCode,
    body: &ErrorBody,
    request_id: &HeaderValue,
    extra_headers: &[(HeaderName, HeaderValue)],
    decorate: &Decorate<'_>,
) -> Result<()> {
    #[derive(Serialize)]
    struct WithId<'a> {
        #[serde(flatten)]
        body: &'a ErrorBody,
        request_id: &'a str,
    }
    let with_id = WithId {
        body,
        request_id: request_id.to_str().unwrap_or_default(),
    };
    let mut bytes = serde_json::to_vec(&with_id).unwrap_or_default();
    bytes.push(b'\n');
    send(
        session,
        status,
        "application/json",
        Bytes::from(bytes),
        request_id,
        extra_headers,
        decorate,
    )
    .await
}

/// Writes a complete response with the given body and content type.
pub async fn send(
    session: &mut Session,
    status: StatusCode,
    content_type: &str,
    body: Bytes,
    request_id: &HeaderValue,
    extra_headers: &[(HeaderName, HeaderValue)],
    decorate: &Decorate<'_>,
) -> Result<()> {
    let mut header = ResponseHeader::build(status, Some(4 + extra_headers.len()))?;
    header.insert_header(http::header::CONTENT_TYPE, content_type)?;
    header.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    header.insert_header(http::header::CACHE_CONTROL, "no-store")?;
    header.insert_header(super::request_id::REQUEST_ID, request_id.clone())?;
    for (name, value) in extra_headers {
        header.insert_header(name.clone(), value.clone())?;
    }
    decorate(&mut header);
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(header), head_only)
        .await?;
    if !head_only {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}
