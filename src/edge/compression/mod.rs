//! Response compression: a service's `compression:` section, the coding each response gets,
//! and the body compressed as it streams.
//!
//! It runs as a Pingora downstream module ([`ResponseCompression`], in place of Pingora's own,
//! which the proxy leaves out), so every answer written to the client passes through it:
//! proxied responses after the proxy's `response_filter`, and answers from the cache. The cache
//! fills from the upstream's response before this step, so it stores what the upstream sent
//! and each hit is compressed for its own client. The proxy arms the module once the request
//! is routed to a service with `compression` ([`ResponseCompression::arm`]); otherwise it does
//! nothing and costs a branch per response.
//!
//! A response may be compressed when it has a body, its `Content-Type` is in the list, it has
//! no `Content-Encoding` (an upstream's own encoding is left alone), no `Content-Range` (a
//! `206` is a slice of the identity bytes), no `Cache-Control: no-transform`, and no
//! `Content-Length` under `min_size`. Such a response gets `Vary: Accept-Encoding` whatever
//! the client asked for. It is compressed when the client accepts one of the service's codings
//! ([`accept`]) over HTTP/1.1 or later without a request `no-transform`: `Content-Encoding`
//! set, `Content-Length` and `Accept-Ranges` removed, a strong `ETag` made weak (the bytes
//! differ from the identity representation's). A `HEAD` gets the header its `GET` would.
//!
//! Pingora's module does not fit: it takes the client's first listed coding, reads no `q`
//! (so `gzip;q=0` gets gzip), has a fixed type list and a 20-byte minimum, compresses `206`s,
//! ignores `no-transform`, and buffers output until its encoders fill ([`encoder`]).

mod accept;
mod encoder;

use crate::values::ByteSize;
use bytes::{Bytes, BytesMut};
use encoder::Encoder;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Version};
use once_cell::sync::Lazy;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::{HttpModule, HttpModuleBuilder, Module, ModuleBuilder};
use pingora::{Error, ErrorType, Result};
use prometheus::IntCounter;
use serde::Deserialize;
use std::any::Any;
use std::sync::Arc;

/// A content coding the gateway can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Coding {
    #[serde(rename = "gzip")]
    Gzip,
    #[serde(rename = "br", alias = "brotli")]
    Brotli,
    #[serde(rename = "zstd")]
    Zstd,
}

impl Coding {
    const COUNT: usize = 3;

    /// The `Content-Encoding` token.
    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Gzip => "gzip",
            Coding::Brotli => "br",
            Coding::Zstd => "zstd",
        }
    }

    /// The coding an `Accept-Encoding` token names (case-insensitive; `x-gzip` is gzip).
    fn from_token(token: &str) -> Option<Coding> {
        [
            ("gzip", Coding::Gzip),
            ("x-gzip", Coding::Gzip),
            ("br", Coding::Brotli),
            ("zstd", Coding::Zstd),
        ]
        .into_iter()
        .find(|(name, _)| token.eq_ignore_ascii_case(name))
        .map(|(_, c)| c)
    }
}

/// A service's `compression:` section. Absent: responses pass as the upstream sent them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// The codings offered, the service's preference first (a client's higher `q` wins).
    /// Default: `[zstd, br, gzip]`.
    pub algorithms: Vec<Coding>,
    /// Responses whose `Content-Length` is smaller stay as they are (one without a length is
    /// compressed). Default: `1KiB`.
    pub min_size: ByteSize,
    /// Media types compressed: `type/subtype`, `type/*` or `type/*+suffix`,
    /// case-insensitive. Default: [`DEFAULT_CONTENT_TYPES`].
    pub content_types: Vec<String>,
    /// Compression level per coding.
    pub levels: Levels,
}

/// Compressible types: text, and the structured formats APIs and pages send.
pub const DEFAULT_CONTENT_TYPES: [&str; 10] = [
    "text/*",
    "application/json",
    "application/*+json",
    "application/javascript",
    "application/xml",
    "application/*+xml",
    "application/wasm",
    "image/svg+xml",
    "font/ttf",
    "font/otf",
];

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            algorithms: vec![Coding::Zstd, Coding::Brotli, Coding::Gzip],
            min_size: ByteSize(1024),
            content_types: DEFAULT_CONTENT_TYPES.map(String::from).to_vec(),
            levels: Levels::default(),
        }
    }
}

/// `compression.levels`: moderate levels by default, since the gateway compresses every
/// response on the fly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Levels {
    /// 1 (fastest) to 9. Default: 6.
    pub gzip: u32,
    /// 0 (fastest) to 11. Default: 4.
    pub br: u32,
    /// 1 (fastest) to 19. Default: 3.
    pub zstd: u32,
}

impl Default for Levels {
    fn default() -> Self {
        Levels {
            gzip: 6,
            br: 4,
            zstd: 3,
        }
    }
}

/// A service's compiled compression policy.
#[derive(Debug)]
pub struct CompressionPolicy {
    algorithms: Vec<Coding>,
    min_size: u64,
    content_types: Vec<TypePattern>,
    /// Indexed by `Coding as usize`.
    levels: [u32; Coding::COUNT],
}

/// A `content_types` entry, lower-case.
#[derive(Debug, PartialEq, Eq)]
enum TypePattern {
    Exact(String),
    /// `type/*`: the type, with its slash.
    AnySubtype(String),
    /// `type/*+suffix`: the type with its slash, and `+suffix`.
    Suffix(String, String),
}

impl TypePattern {
    fn parse(s: &str) -> Result<TypePattern, String> {
        let s = s.trim().to_ascii_lowercase();
        let Some((ty, sub)) = s.split_once('/') else {
            return Err(format!("{s:?} is not a media type (type/subtype)"));
        };
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
        };
        if !token(ty) {
            return Err(format!(
                "{s:?}: name a type, e.g. text/* or application/json"
            ));
        }
        if sub == "*" {
            return Ok(TypePattern::AnySubtype(format!("{ty}/")));
        }
        if let Some(suffix) = sub.strip_prefix("*+") {
            if token(suffix) {
                return Ok(TypePattern::Suffix(format!("{ty}/"), format!("+{suffix}")));
            }
        }
        if !token(sub) {
            return Err(format!("{s:?}: the subtype is a name, `*` or `*+suffix`"));
        }
        Ok(TypePattern::Exact(s))
    }

    /// `media_type`: lower-case, without parameters.
    fn matches(&self, media_type: &str) -> bool {
        match self {
            TypePattern::Exact(t) => media_type == t,
            TypePattern::AnySubtype(ty) => media_type.starts_with(ty.as_str()),
            TypePattern::Suffix(ty, suffix) => {
                media_type.starts_with(ty.as_str()) && media_type.ends_with(suffix.as_str())
            }
        }
    }
}

impl CompressionConfig {
    /// Checks the section and compiles it. The error names the field.
    pub fn compile(&self) -> Result<CompressionPolicy, String> {
        if self.algorithms.is_empty() {
            return Err("compression.algorithms: list at least one of zstd, br, gzip".into());
        }
        for (i, a) in self.algorithms.iter().enumerate() {
            if self.algorithms[..i].contains(a) {
                return Err(format!(
                    "compression.algorithms: {} is listed twice",
                    a.as_str()
                ));
            }
        }
        if self.content_types.is_empty() {
            return Err("compression.content_types: list at least one media type".into());
        }
        let content_types = self
            .content_types
            .iter()
            .map(|t| TypePattern::parse(t).map_err(|e| format!("compression.content_types: {e}")))
            .collect::<Result<Vec<_>, String>>()?;
        let l = self.levels;
        for (name, level, range) in [
            ("gzip", l.gzip, 1..=9),
            ("br", l.br, 0..=11),
            ("zstd", l.zstd, 1..=19),
        ] {
            if !range.contains(&level) {
                return Err(format!(
                    "compression.levels.{name}: {level} is out of range ({} to {})",
                    range.start(),
                    range.end()
                ));
            }
        }
        let mut levels = [0; Coding::COUNT];
        levels[Coding::Gzip as usize] = l.gzip;
        levels[Coding::Brotli as usize] = l.br;
        levels[Coding::Zstd as usize] = l.zstd;
        Ok(CompressionPolicy {
            algorithms: self.algorithms.clone(),
            min_size: self.min_size.as_u64(),
            content_types,
            levels,
        })
    }
}

impl CompressionPolicy {
    /// Whether this response could be compressed for some client, whoever asked: then it
    /// varies on `Accept-Encoding`.
    fn eligible(&self, resp: &ResponseHeader) -> bool {
        let h = &resp.headers;
        if matches!(resp.status.as_u16(), 204 | 206 | 304)
            || h.contains_key(header::CONTENT_ENCODING)
            || h.contains_key(header::CONTENT_RANGE)
            || has_no_transform(h)
        {
            return false;
        }
        if let Some(len) = h.get(header::CONTENT_LENGTH) {
            // An unreadable length is left for the client to judge, untouched.
            let len = len.to_str().ok().and_then(|l| l.trim().parse::<u64>().ok());
            if len.is_none_or(|n| n < self.min_size.max(1)) {
                return false;
            }
        }
        let Some(media_type) = h.get(header::CONTENT_TYPE).and_then(media_type) else {
            return false;
        };
        self.content_types.iter().any(|p| p.matches(&media_type))
    }
}

/// The media type of a `Content-Type`, lower-case, without parameters.
fn media_type(v: &HeaderValue) -> Option<String> {
    let text = v.to_str().ok()?;
    let t = text.split(';').next()?.trim();
    Some(t.to_ascii_lowercase())
}

/// `Cache-Control: no-transform`, in any of the field lines.
fn has_no_transform(h: &HeaderMap) -> bool {
    h.get_all(header::CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
        })
    })
}

/// Adds `Accept-Encoding` to `Vary`, in one field line with what is there (unless it is
/// already named, or `*`).
pub fn vary_on_accept_encoding(resp: &mut ResponseHeader) {
    let existing: Vec<&HeaderValue> = resp.headers.get_all(header::VARY).iter().collect();
    let named = existing.iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|n| {
            let n = n.trim_ascii();
            n == b"*" || n.eq_ignore_ascii_case(b"accept-encoding")
        })
    });
    if named {
        return;
    }
    let mut merged = BytesMut::new();
    for v in existing {
        let v = v.as_bytes().trim_ascii();
        if !v.is_empty() {
            merged.extend_from_slice(v);
            merged.extend_from_slice(b", ");
        }
    }
    merged.extend_from_slice(b"Accept-Encoding");
    // What was a valid header value stays one with a name appended.
    if let Ok(v) = HeaderValue::from_maybe_shared(merged.freeze()) {
        let _ = resp.insert_header(header::VARY, v);
    }
}

/// RFC 9110 8.8.1: a strong validator names one byte sequence, so the compressed one gets a
/// weak tag (as nginx does); a malformed tag is dropped.
fn weaken_etag(resp: &mut ResponseHeader) {
    let Some(etag) = resp.headers.get(header::ETAG) else {
        return;
    };
    let bytes = etag.as_bytes();
    if bytes.starts_with(b"W/") {
        return;
    }
    if bytes.starts_with(b"\"") {
        if let Ok(weak) = HeaderValue::from_bytes(&[b"W/", bytes].concat()) {
            let _ = resp.insert_header(header::ETAG, weak);
            return;
        }
    }
    resp.remove_header(&header::ETAG);
}

/// Compressed responses and their bytes before and after, by coding.
struct CompressionMetrics {
    responses: [IntCounter; Coding::COUNT],
    bytes_in: [IntCounter; Coding::COUNT],
    bytes_out: [IntCounter; Coding::COUNT],
}

static METRICS: Lazy<CompressionMetrics> = Lazy::new(|| {
    use crate::ops::metrics::{register_counter, METRICS};
    let r = &METRICS.registry;
    let per_coding = |name: &str, help: &str| {
        let vec = register_counter(r, name, help, &["algorithm"]);
        [Coding::Gzip, Coding::Brotli, Coding::Zstd].map(|c| vec.with_label_values(&[c.as_str()]))
    };
    CompressionMetrics {
        responses: per_coding(
            "breakwater_compressed_responses_total",
            "Responses the gateway compressed, by content coding.",
        ),
        bytes_in: per_coding(
            "breakwater_compression_input_bytes_total",
            "Body bytes the gateway compressed, before compression, by content coding.",
        ),
        bytes_out: per_coding(
            "breakwater_compression_output_bytes_total",
            "Body bytes the gateway sent compressed, by content coding.",
        ),
    }
});

/// Registers the compression metrics, so `/metrics` shows them before the first compressed
/// response.
pub fn register_metrics() {
    Lazy::force(&METRICS);
}

/// The downstream module: Breakwater's compression step for one request.
#[derive(Default)]
pub struct ResponseCompression {
    state: State,
}

#[derive(Default)]
enum State {
    /// The service does not compress, or the response was judged.
    #[default]
    Off,
    /// Armed for a service: waiting for the response header.
    Armed {
        policy: Arc<CompressionPolicy>,
        /// What the client accepts, if it may get a compressed answer at all.
        coding: Option<Coding>,
        head: bool,
    },
    Encoding {
        encoder: Encoder,
        coding: Coding,
    },
}

impl ResponseCompression {
    /// Arms the module for a request to a service with `policy`: the coding is chosen now,
    /// from the request alone.
    pub fn arm(&mut self, policy: &Arc<CompressionPolicy>, req: &RequestHeader) {
        let may_transform = req.version >= Version::HTTP_11 && !has_no_transform(&req.headers);
        let coding = may_transform
            .then(|| accept::choose(&req.headers, &policy.algorithms))
            .flatten();
        self.state = State::Armed {
            policy: Arc::clone(policy),
            coding,
            head: req.method == Method::HEAD,
        };
    }

    /// Judges the response header: `Vary`, and the headers of a compressed answer.
    fn on_header(&mut self, resp: &mut ResponseHeader, end: bool) {
        if !matches!(self.state, State::Armed { .. }) {
            return;
        }
        if resp.status.is_informational() && resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
            // The final header decides.
            return;
        }
        let State::Armed {
            policy,
            coding,
            head,
        } = std::mem::take(&mut self.state)
        else {
            return;
        };
        if resp.status == http::StatusCode::SWITCHING_PROTOCOLS || !policy.eligible(resp) {
            return;
        }
        vary_on_accept_encoding(resp);
        let Some(coding) = coding else {
            return;
        };
        if end && !head {
            // No body after all: nothing to encode, and an empty body is no valid stream.
            return;
        }
        let encoder = if head {
            None
        } else {
            let level = policy.levels[coding as usize];
            match Encoder::new(coding, level) {
                Ok(e) => Some(e),
                Err(e) => {
                    log::warn!(
                        "compression: cannot start a {} encoder: {e}",
                        coding.as_str()
                    );
                    return;
                }
            }
        };
        let h = resp;
        let _ = h.insert_header(header::CONTENT_ENCODING, coding.as_str());
        h.remove_header(&header::CONTENT_LENGTH);
        h.remove_header(&header::ACCEPT_RANGES);
        // The length is unknown until the end; HTTP/2 drops this header and frames by itself.
        let _ = h.insert_header(header::TRANSFER_ENCODING, "chunked");
        weaken_etag(h);
        if let Some(encoder) = encoder {
            METRICS.responses[coding as usize].inc();
            self.state = State::Encoding { encoder, coding };
        }
    }

    /// Compresses a body chunk in place; at the end, finishes the stream.
    fn on_body(&mut self, body: &mut Option<Bytes>, end: bool) -> Result<()> {
        let State::Encoding { encoder, coding } = &mut self.state else {
            return Ok(());
        };
        let coding = *coding;
        let input = body.take().unwrap_or_default();
        let out = if end {
            let State::Encoding { encoder, .. } = std::mem::take(&mut self.state) else {
                return Ok(());
            };
            encoder.finish(&input)
        } else {
            encoder.chunk(&input)
        };
        let out = out.or_else(|e| {
            // The client has part of a stream already: cut it off rather than send garbage.
            self.state = State::Off;
            Error::e_explain(ErrorType::InternalError, format!("compressing: {e}"))
        })?;
        let i = coding as usize;
        METRICS.bytes_in[i].inc_by(input.len() as u64);
        METRICS.bytes_out[i].inc_by(out.len() as u64);
        *body = Some(out);
        Ok(())
    }
}

#[async_trait::async_trait]
impl HttpModule for ResponseCompression {
    fn as_any(&self) -> &dyn Any {
        self
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }

    async fn response_header_filter(
        &mut self,
        resp: &mut ResponseHeader,
        end_of_stream: bool,
    ) -> Result<()> {
        self.on_header(resp, end_of_stream);
        Ok(())
    }

    fn response_body_filter(
        &mut self,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
    ) -> Result<()> {
        self.on_body(body, end_of_stream)
    }

    fn response_done_filter(&mut self) -> Result<Option<Bytes>> {
        // The response ended without a body chunk saying so: the stream's end goes now.
        let mut body = None;
        self.on_body(&mut body, true)?;
        Ok(body)
    }
}

/// Builds an (unarmed) [`ResponseCompression`] for each request.
pub struct ResponseCompressionBuilder;

impl ResponseCompressionBuilder {
    pub fn module() -> ModuleBuilder {
        Box::new(ResponseCompressionBuilder)
    }
}

impl HttpModuleBuilder for ResponseCompressionBuilder {
    fn init(&self) -> Module {
        Box::new(ResponseCompression::default())
    }

    fn order(&self) -> i16 {
        // After any other module's response filter, like Pingora's own compression.
        i16::MIN / 2
    }
}

#[cfg(test)]
mod tests;
