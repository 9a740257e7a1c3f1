//! What the backends hold: a stored response (or, for a URL whose responses vary, the list of
//! its variants), its freshness, and the compact binary encoding both backends store.
//!
//! The encoding is the whole footprint of an entry in the memory backend: one exactly sized
//! allocation holding the times, the header block and the body. Decoding it back shares that
//! allocation (header values and the body are slices of it), so a hit copies nothing but the
//! header names that are not standard.

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

/// One stored response. Times are wall-clock milliseconds since the Unix epoch (see
/// `SystemClock`), so gateways sharing a Redis agree on an entry's age.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedResponse {
    pub status: u16,
    /// End-to-end headers as the upstream sent them, minus hop-by-hop and per-request ones.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    pub body: Bytes,
    pub stored_at_ms: u64,
    /// Fresh (served as a HIT) for this long after `stored_at_ms`.
    pub ttl_ms: u64,
    /// Once stale, served at once while one request refreshes it, for this much longer
    /// (stale-while-revalidate).
    pub swr_ms: u64,
    /// Once stale, usable on upstream error for this much longer (stale-if-error).
    pub sie_ms: u64,
    /// The request headers named by the response's `Vary` (lower-case) and the values the
    /// storing request had (`None`: absent). A request with other values is a miss.
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// What one storage key holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Response(CachedResponse),
    /// The primary key of a URL whose responses vary: which headers they vary on, and the
    /// secondary keys of the variants stored, oldest first.
    Variants(VaryIndex),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VaryIndex {
    /// Lower-case, sorted, without duplicates.
    pub names: Vec<HeaderName>,
    pub variants: Vec<Box<str>>,
}

impl CachedResponse {
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms)
    }

    pub fn is_fresh(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) < self.ttl_ms
    }

    /// Stale, but within stale-while-revalidate: served at once while it is refreshed.
    pub fn within_swr(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) < self.ttl_ms.saturating_add(self.swr_ms)
    }

    /// Within stale-if-error: servable when the upstream fails.
    pub fn within_sie(&self, now_ms: u64) -> bool {
        self.age_ms(now_ms) < self.ttl_ms.saturating_add(self.sie_ms)
    }

    /// Whole seconds since the entry was stored, for the `Age` header.
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        self.age_ms(now_ms) / 1000
    }

    pub fn header(&self, name: &HeaderName) -> Option<&HeaderValue> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    /// An `ETag` or `Last-Modified` to revalidate the entry with.
    pub fn has_validator(&self) -> bool {
        self.headers
            .iter()
            .any(|(n, _)| n == header::ETAG || n == header::LAST_MODIFIED)
    }

    /// How long the backend keeps the entry: through its stale windows, and when it has a
    /// validator at least one more `ttl`, so a stale copy can be revalidated with a
    /// conditional request instead of being fetched again.
    pub fn keep_for(&self) -> Duration {
        let mut extra = self.swr_ms.max(self.sie_ms);
        if self.has_validator() {
            extra = extra.max(self.ttl_ms);
        }
        Duration::from_millis(self.ttl_ms.saturating_add(extra).max(1))
    }

    /// Whether a request with these headers may be answered with this entry.
    pub fn vary_matches(&self, request: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, stored)| joined_values(request, name).as_ref() == stored.as_ref())
    }

    /// Encodes as: version byte, kind, status, the four times, the vary list, the headers,
    /// the body, every variable-length field length-prefixed; in one allocation of exactly
    /// the encoded size.
    pub fn encode(&self) -> Bytes {
        Encoder::new(self, std::slice::from_ref(&self.body)).finish()
    }

    /// Like [`encode`](Self::encode), with the body given in `chunks` (as it arrived) instead
    /// of `self.body`: a body is copied once, straight into the stored value.
    pub fn encode_with_body(&self, chunks: &[Bytes]) -> Bytes {
        Encoder::new(self, chunks).finish()
    }

    /// The encoded entry read back, sharing its allocation.
    pub fn decode_shared(bytes: Bytes) -> Result<CachedResponse, String> {
        match Stored::decode(bytes)? {
            Stored::Response(r) => Ok(r),
            Stored::Variants(_) => Err("a variant index, not a response".into()),
        }
    }
}

struct Encoder<'a> {
    entry: &'a CachedResponse,
    body: &'a [Bytes],
}

impl<'a> Encoder<'a> {
    fn new(entry: &'a CachedResponse, body: &'a [Bytes]) -> Self {
        Encoder { entry, body }
    }

    fn len(&self) -> usize {
        let e = self.entry;
        let vary: usize = e
            .vary
            .iter()
            .map(|(n, v)| 2 + n.as_str().len() + 1 + v.as_ref().map_or(0, |v| 4 + v.len()))
            .sum();
        let headers: usize = e
            .headers
            .iter()
            .map(|(n, v)| 2 + n.as_str().len() + 4 + v.len())
            .sum();
        let body: usize = self.body.iter().map(Bytes::len).sum();
        2 + 2 + 8 * 4 + 2 + vary + 2 + headers + 4 + body
    }

    fn finish(self) -> Bytes {
        let e = self.entry;
        let mut out = BytesMut::with_capacity(self.len());
        out.put_u8(FORMAT_VERSION);
        out.put_u8(KIND_RESPONSE);
        out.put_u16(e.status);
        out.put_u64(e.stored_at_ms);
        out.put_u64(e.ttl_ms);
        out.put_u64(e.swr_ms);
        out.put_u64(e.sie_ms);
        let vary = &e.vary[..e.vary.len().min(usize::from(u16::MAX))];
        out.put_u16(len_u16(vary.len()));
        for (name, value) in vary {
            put_short(&mut out, name.as_str().as_bytes());
            match value {
                Some(v) => {
                    out.put_u8(1);
                    put_long(&mut out, v.as_bytes());
                }
                None => out.put_u8(0),
            }
        }
        let headers = &e.headers[..e.headers.len().min(usize::from(u16::MAX))];
        out.put_u16(len_u16(headers.len()));
        for (name, value) in headers {
            put_short(&mut out, name.as_str().as_bytes());
            put_long(&mut out, value.as_bytes());
        }
        // Bodies are bounded by max_body_size, far below 4 GiB.
        let body: usize = self.body.iter().map(Bytes::len).sum();
        out.put_u32(u32::try_from(body).unwrap_or(u32::MAX));
        for chunk in self.body {
            out.put_slice(chunk);
        }
        out.freeze()
    }
}

impl VaryIndex {
    fn encode(&self) -> Bytes {
        let len = 2
            + 2
            + self
                .names
                .iter()
                .map(|n| 2 + n.as_str().len())
                .sum::<usize>()
            + 2
            + self.variants.iter().map(|v| 2 + v.len()).sum::<usize>();
        let mut out = BytesMut::with_capacity(len);
        out.put_u8(FORMAT_VERSION);
        out.put_u8(KIND_VARIANTS);
        let names = &self.names[..self.names.len().min(usize::from(u16::MAX))];
        out.put_u16(len_u16(names.len()));
        for n in names {
            put_short(&mut out, n.as_str().as_bytes());
        }
        let variants = &self.variants[..self.variants.len().min(usize::from(u16::MAX))];
        out.put_u16(len_u16(variants.len()));
        for v in variants {
            put_short(&mut out, v.as_bytes());
        }
        out.freeze()
    }
}

impl Stored {
    pub fn encode(&self) -> Bytes {
        match self {
            Stored::Response(r) => r.encode(),
            Stored::Variants(i) => i.encode(),
        }
    }

    pub fn decode(mut buf: Bytes) -> Result<Stored, String> {
        let r = &mut buf;
        let version = take_u8(r)?;
        if version != FORMAT_VERSION {
            return Err(format!("unknown cache entry format {version}"));
        }
        let stored = match take_u8(r)? {
            KIND_RESPONSE => Stored::Response(decode_response(r)?),
            KIND_VARIANTS => {
                let n = take_u16(r)?;
                let mut names = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    names.push(header_name(take_short(r)?)?);
                }
                let n = take_u16(r)?;
                let mut variants = Vec::with_capacity(usize::from(n));
                for _ in 0..n {
                    let v = take_short(r)?;
                    let v = std::str::from_utf8(&v)
                        .map_err(|_| "variant key is not UTF-8".to_string())?;
                    variants.push(v.into());
                }
                Stored::Variants(VaryIndex { names, variants })
            }
            kind => return Err(format!("unknown cache entry kind {kind}")),
        };
        if !r.is_empty() {
            return Err("trailing bytes after cache entry".into());
        }
        Ok(stored)
    }
}

fn decode_response(r: &mut Bytes) -> Result<CachedResponse, String> {
    let status = take_u16(r)?;
    let stored_at_ms = take_u64(r)?;
    let ttl_ms = take_u64(r)?;
    let swr_ms = take_u64(r)?;
    let sie_ms = take_u64(r)?;
    let n = take_u16(r)?;
    let mut vary = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let name = header_name(take_short(r)?)?;
        let value = match take_u8(r)? {
            0 => None,
            _ => Some(header_value(take_long(r)?)?),
        };
        vary.push((name, value));
    }
    let n = take_u16(r)?;
    let mut headers = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let name = header_name(take_short(r)?)?;
        let value = header_value(take_long(r)?)?;
        headers.push((name, value));
    }
    let body = take_long(r)?;
    Ok(CachedResponse {
        status,
        headers,
        body,
        stored_at_ms,
        ttl_ms,
        swr_ms,
        sie_ms,
        vary,
    })
}

/// All values of a request header, joined the way a list header would be.
pub fn joined_values(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(first.clone());
    };
    let mut joined = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(values) {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(v.as_bytes());
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// Version 1 (one response per key, one stale window) is no longer read: such entries are
/// misses and are replaced.
const FORMAT_VERSION: u8 = 2;
const KIND_RESPONSE: u8 = 0;
const KIND_VARIANTS: u8 = 1;

fn len_u16(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

fn put_short(out: &mut BytesMut, b: &[u8]) {
    let b = &b[..b.len().min(usize::from(u16::MAX))];
    out.put_u16(len_u16(b.len()));
    out.put_slice(b);
}

fn put_long(out: &mut BytesMut, b: &[u8]) {
    // Bodies are bounded by max_body_size, far below 4 GiB; clamp rather than corrupt.
    let n = u32::try_from(b.len()).unwrap_or(u32::MAX);
    out.put_u32(n);
    out.put_slice(&b[..n as usize]);
}

fn take(r: &mut Bytes, n: usize) -> Result<Bytes, String> {
    if r.len() < n {
        return Err("truncated cache entry".into());
    }
    Ok(r.split_to(n))
}

fn take_u8(r: &mut Bytes) -> Result<u8, String> {
    Ok(take(r, 1)?[0])
}

fn take_u16(r: &mut Bytes) -> Result<u16, String> {
    let b = take(r, 2)?;
    Ok(u16::from_be_bytes([b[0], b[1]]))
}

fn take_u32(r: &mut Bytes) -> Result<u32, String> {
    let b = take(r, 4)?;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn take_u64(r: &mut Bytes) -> Result<u64, String> {
    let b = take(r, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(&b);
    Ok(u64::from_be_bytes(a))
}

fn take_short(r: &mut Bytes) -> Result<Bytes, String> {
    let n = take_u16(r)?;
    take(r, usize::from(n))
}

fn take_long(r: &mut Bytes) -> Result<Bytes, String> {
    let n = take_u32(r)?;
    take(r, n as usize)
}

fn header_name(b: Bytes) -> Result<HeaderName, String> {
    HeaderName::from_bytes(&b).map_err(|e| format!("bad header name in cache entry: {e}"))
}

fn header_value(b: Bytes) -> Result<HeaderValue, String> {
    HeaderValue::from_maybe_shared(b).map_err(|e| format!("bad header value in cache entry: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> CachedResponse {
        CachedResponse {
            status: 200,
            headers: vec![
                (
                    HeaderName::from_static("content-type"),
                    HeaderValue::from_static("application/json"),
                ),
                (
                    HeaderName::from_static("x-a"),
                    HeaderValue::from_static("1"),
                ),
                (
                    HeaderName::from_static("x-a"),
                    HeaderValue::from_static("2"),
                ),
            ],
            body: Bytes::from_static(b"{\"id\":1}"),
            stored_at_ms: 1_700_000_000_000,
            ttl_ms: 60_000,
            swr_ms: 30_000,
            sie_ms: 3_600_000,
            vary: vec![
                (
                    HeaderName::from_static("accept-language"),
                    Some(HeaderValue::from_static("de, en")),
                ),
                (HeaderName::from_static("x-absent"), None),
            ],
        }
    }

    #[test]
    fn encoding_round_trips_in_one_exact_allocation_and_rejects_garbage() {
        let e = sample();
        let bytes = e.encode();
        assert_eq!(
            bytes.len(),
            Encoder::new(&e, std::slice::from_ref(&e.body)).len()
        );
        let chunks = [e.body.slice(..3), e.body.slice(3..)];
        assert_eq!(e.encode_with_body(&chunks), bytes);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(
            Stored::decode(bytes.clone()).unwrap(),
            Stored::Response(e.clone())
        );
        for cut in [0, 1, 2, 10, bytes.len() - 1] {
            assert!(Stored::decode(bytes.slice(..cut)).is_err(), "cut {cut}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(Stored::decode(longer.into()).is_err());
        let mut other_version = bytes.to_vec();
        other_version[0] = 1;
        assert!(Stored::decode(other_version.into()).is_err());
        let mut other_kind = bytes.to_vec();
        other_kind[1] = 7;
        assert!(Stored::decode(other_kind.into()).is_err());
        let empty = CachedResponse {
            headers: vec![],
            vary: vec![],
            body: Bytes::new(),
            ..e
        };
        assert_eq!(
            Stored::decode(empty.encode()).unwrap(),
            Stored::Response(empty)
        );

        let index = Stored::Variants(VaryIndex {
            names: vec![HeaderName::from_static("accept-language")],
            variants: vec!["bw:c:s:/a|http|h|GET|v|=de".into(), "k2".into()],
        });
        let bytes = index.encode();
        assert_eq!(Stored::decode(bytes.clone()).unwrap(), index);
        assert!(Stored::decode(bytes.slice(..bytes.len() - 1)).is_err());
    }

    #[test]
    fn decoded_values_share_the_stored_allocation() {
        let bytes = sample().encode();
        let Stored::Response(e) = Stored::decode(bytes.clone()).unwrap() else {
            panic!()
        };
        let range = bytes.as_ptr() as usize..bytes.as_ptr() as usize + bytes.len();
        assert!(range.contains(&(e.body.as_ptr() as usize)));
        assert!(range.contains(&(e.headers[0].1.as_bytes().as_ptr() as usize)));
    }

    #[test]
    fn fresh_then_stale_windows_then_kept_for_revalidation() {
        let e = sample();
        let t0 = e.stored_at_ms;
        assert!(e.is_fresh(t0) && e.is_fresh(t0 + 59_999));
        assert!(!e.is_fresh(t0 + 60_000));
        assert!(e.within_swr(t0 + 89_999) && !e.within_swr(t0 + 90_000));
        assert!(e.within_sie(t0 + 3_659_999) && !e.within_sie(t0 + 3_660_000));
        assert_eq!(e.age_secs(t0 + 61_999), 61);
        // A clock behind the writer's (another gateway) reads as age zero, not a huge age.
        assert_eq!(e.age_secs(t0 - 5_000), 0);
        assert!(e.is_fresh(t0 - 5_000));
        assert!(!e.has_validator());
        assert_eq!(e.keep_for(), Duration::from_millis(60_000 + 3_600_000));

        let mut v = CachedResponse {
            sie_ms: 0,
            swr_ms: 10_000,
            ..e
        };
        assert_eq!(v.keep_for(), Duration::from_millis(70_000));
        v.headers
            .push((header::ETAG, HeaderValue::from_static("\"v1\"")));
        assert!(v.has_validator());
        assert_eq!(v.keep_for(), Duration::from_millis(120_000));
    }

    #[test]
    fn vary_compares_joined_request_values() {
        let e = sample();
        let mut req = HeaderMap::new();
        req.append("accept-language", HeaderValue::from_static("de"));
        req.append("accept-language", HeaderValue::from_static("en"));
        assert!(e.vary_matches(&req));
        req.insert("x-absent", HeaderValue::from_static("now present"));
        assert!(!e.vary_matches(&req));
        let mut req = HeaderMap::new();
        req.insert("accept-language", HeaderValue::from_static("fr"));
        assert!(!e.vary_matches(&req));
        assert!(!e.vary_matches(&HeaderMap::new()));
    }
}
