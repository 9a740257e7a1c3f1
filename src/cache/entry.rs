//! A stored response, its freshness, and its compact binary encoding (the Redis value).

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue};

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
    /// Then usable on upstream error (STALE) for this much longer.
    pub stale_ms: u64,
    /// The request headers named by the response's `Vary` (lower-case) and the values the
    /// storing request had (`None`: absent). A request with other values is a miss.
    pub vary: Vec<(HeaderName, Option<HeaderValue>)>,
}

/// Where an entry is in its life at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// Past its ttl but within `stale_if_error`.
    Stale,
    Expired,
}

impl CachedResponse {
    pub fn freshness(&self, now_ms: u64) -> Freshness {
        let age = now_ms.saturating_sub(self.stored_at_ms);
        if age < self.ttl_ms {
            Freshness::Fresh
        } else if age < self.ttl_ms.saturating_add(self.stale_ms) {
            Freshness::Stale
        } else {
            Freshness::Expired
        }
    }

    /// Whole seconds since the entry was stored, for the `Age` header.
    pub fn age_secs(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.stored_at_ms) / 1000
    }

    /// Whether a request with these headers may be answered with this entry.
    pub fn vary_matches(&self, request: &HeaderMap) -> bool {
        self.vary
            .iter()
            .all(|(name, stored)| joined_values(request, name).as_ref() == stored.as_ref())
    }

    /// Approximate bytes the entry occupies, for the memory bound.
    pub fn weight(&self, key_len: usize) -> u32 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(n, v)| n.as_str().len() + v.as_ref().map_or(0, |v| v.len()) + 32)
            .sum();
        let total = self.body.len() + headers + vary + key_len + 128;
        u32::try_from(total).unwrap_or(u32::MAX)
    }

    /// Encodes as: version byte, status, the three times, the vary list, the headers, the
    /// body, every variable-length field length-prefixed.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.weight(0) as usize);
        out.put_u8(FORMAT_VERSION);
        out.put_u16(self.status);
        out.put_u64(self.stored_at_ms);
        out.put_u64(self.ttl_ms);
        out.put_u64(self.stale_ms);
        out.put_u16(len_u16(self.vary.len()));
        for (name, value) in self.vary.iter().take(usize::from(u16::MAX)) {
            put_short(&mut out, name.as_str().as_bytes());
            match value {
                Some(v) => {
                    out.put_u8(1);
                    put_long(&mut out, v.as_bytes());
                }
                None => out.put_u8(0),
            }
        }
        out.put_u16(len_u16(self.headers.len()));
        for (name, value) in self.headers.iter().take(usize::from(u16::MAX)) {
            put_short(&mut out, name.as_str().as_bytes());
            put_long(&mut out, value.as_bytes());
        }
        put_long(&mut out, &self.body);
        out.freeze()
    }

    pub fn decode(mut buf: Bytes) -> Result<CachedResponse, String> {
        let r = &mut buf;
        let version = take_u8(r)?;
        if version != FORMAT_VERSION {
            return Err(format!("unknown cache entry format {version}"));
        }
        let status = take_u16(r)?;
        let stored_at_ms = take_u64(r)?;
        let ttl_ms = take_u64(r)?;
        let stale_ms = take_u64(r)?;
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
        if !r.is_empty() {
            return Err("trailing bytes after cache entry".into());
        }
        Ok(CachedResponse {
            status,
            headers,
            body,
            stored_at_ms,
            ttl_ms,
            stale_ms,
            vary,
        })
    }
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

const FORMAT_VERSION: u8 = 1;

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
            stale_ms: 3_600_000,
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
    fn encoding_round_trips_and_rejects_garbage() {
        let e = sample();
        let bytes = e.encode();
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(CachedResponse::decode(bytes.clone()).unwrap(), e);
        for cut in [0, 1, 10, bytes.len() - 1] {
            assert!(
                CachedResponse::decode(bytes.slice(..cut)).is_err(),
                "cut {cut}"
            );
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert!(CachedResponse::decode(longer.into()).is_err());
        let mut other_version = bytes.to_vec();
        other_version[0] = 9;
        assert!(CachedResponse::decode(other_version.into()).is_err());
        let empty = CachedResponse {
            headers: vec![],
            vary: vec![],
            body: Bytes::new(),
            ..e
        };
        assert_eq!(CachedResponse::decode(empty.encode()).unwrap(), empty);
    }

    #[test]
    fn fresh_then_stale_then_expired() {
        let e = sample();
        let t0 = e.stored_at_ms;
        assert_eq!(e.freshness(t0), Freshness::Fresh);
        assert_eq!(e.freshness(t0 + 59_999), Freshness::Fresh);
        assert_eq!(e.freshness(t0 + 60_000), Freshness::Stale);
        assert_eq!(e.freshness(t0 + 3_659_999), Freshness::Stale);
        assert_eq!(e.freshness(t0 + 3_660_000), Freshness::Expired);
        assert_eq!(e.age_secs(t0 + 61_999), 61);
        // A clock behind the writer's (another gateway) reads as age zero, not a huge age.
        assert_eq!(e.age_secs(t0 - 5_000), 0);
        assert_eq!(e.freshness(t0 - 5_000), Freshness::Fresh);
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
