//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): reading `traceparent` and
//! `tracestate` from a client, strictly, and writing them for an upstream.
//!
//! Anything that is not exactly a valid header is ignored rather than repaired: the gateway
//! then starts a trace of its own, as the spec asks. A client cannot make the gateway forward
//! a malformed or oversized `tracestate` either.

use http::header::{HeaderMap, HeaderValue};

pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// Bit 0 of the trace flags: the caller recorded (sampled) its span.
pub const FLAG_SAMPLED: u8 = 1;

/// Longest `tracestate` forwarded: the length the spec asks every vendor to propagate.
const MAX_TRACESTATE_LEN: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A valid incoming `traceparent`: the trace to continue and the caller's span.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: u128,
    pub parent_id: u64,
    pub flags: u8,
}

/// The `traceparent` of the request, when there is exactly one and it is valid.
pub fn incoming(headers: &HeaderMap) -> Option<TraceParent> {
    let mut values = headers.get_all(TRACEPARENT).iter();
    let value = values.next()?;
    if values.next().is_some() {
        // Two parents cannot both be continued; neither is trusted.
        return None;
    }
    parse_traceparent(value.as_bytes())
}

/// Parses one `traceparent` value (version 00, or a later version read as 00 where its first
/// 55 characters follow 00's layout, as the spec says).
pub fn parse_traceparent(v: &[u8]) -> Option<TraceParent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_u8(&v[0..2])?;
    match version {
        0xff => return None,
        0 if v.len() != 55 => return None,
        // A later version may append fields, after a dash.
        _ if v.len() > 55 && v[55] != b'-' => return None,
        _ => {}
    }
    let trace_id = hex_u128(&v[3..35])?;
    let parent_id = hex_u64(&v[36..52])?;
    let flags = hex_u8(&v[53..55])?;
    if trace_id == 0 || parent_id == 0 {
        return None;
    }
    Some(TraceParent {
        trace_id,
        parent_id,
        flags,
    })
}

/// The request's `tracestate`, its header lines joined as HTTP allows, when every member is
/// well formed, keys are unique and it fits in 512 bytes; else none is forwarded.
pub fn incoming_state(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(TRACESTATE).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return valid_tracestate(first.as_bytes()).then(|| first.clone());
    };
    let mut joined = Vec::with_capacity(first.len() + second.len() + 1);
    joined.extend_from_slice(first.as_bytes());
    for v in std::iter::once(second).chain(values) {
        joined.push(b',');
        joined.extend_from_slice(v.as_bytes());
        if joined.len() > MAX_TRACESTATE_LEN {
            return None;
        }
    }
    if !valid_tracestate(&joined) {
        return None;
    }
    HeaderValue::from_bytes(&joined).ok()
}

/// `tracestate = list-member 0*31( OWS "," OWS list-member )`, empty members allowed.
pub fn valid_tracestate(v: &[u8]) -> bool {
    if v.len() > MAX_TRACESTATE_LEN {
        return false;
    }
    let mut keys: [&[u8]; MAX_TRACESTATE_MEMBERS] = [&[]; MAX_TRACESTATE_MEMBERS];
    let mut count = 0;
    for member in v.split(|&b| b == b',') {
        let member = trim_ows(member);
        if member.is_empty() {
            continue;
        }
        let Some(eq) = member.iter().position(|&b| b == b'=') else {
            return false;
        };
        let (key, value) = (&member[..eq], &member[eq + 1..]);
        if !valid_key(key) || !valid_value(value) {
            return false;
        }
        if count == MAX_TRACESTATE_MEMBERS || keys[..count].contains(&key) {
            return false;
        }
        keys[count] = key;
        count += 1;
    }
    true
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// `key = simple-key / multi-tenant-key`: lowercase letters, digits and `_-*/`, starting with
/// a letter (a tenant may start with a digit), at most one `@`.
fn valid_key(key: &[u8]) -> bool {
    let part_ok = |p: &[u8], max: usize, digit_first: bool| {
        !p.is_empty()
            && p.len() <= max
            && (p[0].is_ascii_lowercase() || (digit_first && p[0].is_ascii_digit()))
            && p.iter().all(|&b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'_' | b'-' | b'*' | b'/')
            })
    };
    match key.iter().position(|&b| b == b'@') {
        None => part_ok(key, 256, false),
        Some(at) => part_ok(&key[..at], 241, true) && part_ok(&key[at + 1..], 14, false),
    }
}

/// `value = 0*255(chr) nblk-chr`: printable ASCII but `,` and `=`, not ending in a space.
fn valid_value(value: &[u8]) -> bool {
    !value.is_empty()
        && value.len() <= 256
        && value.last() != Some(&b' ')
        && value
            .iter()
            .all(|&b| (0x20..=0x7e).contains(&b) && b != b',' && b != b'=')
}

fn hex_digit(b: u8) -> Option<u8> {
    // Lowercase only: the spec makes uppercase hex invalid.
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_u128(s: &[u8]) -> Option<u128> {
    s.iter()
        .try_fold(0u128, |acc, &b| Some(acc << 4 | u128::from(hex_digit(b)?)))
}

fn hex_u64(s: &[u8]) -> Option<u64> {
    s.iter()
        .try_fold(0u64, |acc, &b| Some(acc << 4 | u64::from(hex_digit(b)?)))
}

fn hex_u8(s: &[u8]) -> Option<u8> {
    s.iter()
        .try_fold(0u8, |acc, &b| Some(acc << 4 | hex_digit(b)?))
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes `n` as `out.len()` lowercase hex digits.
fn write_hex(out: &mut [u8], mut n: u128) {
    for b in out.iter_mut().rev() {
        *b = HEX[(n & 0xf) as usize];
        n >>= 4;
    }
}

/// A trace id as 32 lowercase hex digits, on the stack (for the access log).
pub fn trace_id_hex(trace_id: u128) -> [u8; 32] {
    let mut out = [0u8; 32];
    write_hex(&mut out, trace_id);
    out
}

/// The `traceparent` value an upstream gets: version 00, this trace, `span_id` as its parent.
pub fn format_traceparent(trace_id: u128, span_id: u64, flags: u8) -> HeaderValue {
    let mut v = [0u8; 55];
    v[0] = b'0';
    v[1] = b'0';
    v[2] = b'-';
    write_hex(&mut v[3..35], trace_id);
    v[35] = b'-';
    write_hex(&mut v[36..52], u128::from(span_id));
    v[52] = b'-';
    write_hex(&mut v[53..55], u128::from(flags));
    // Hex digits and dashes only: always a valid header value.
    HeaderValue::from_bytes(&v).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_the_spec_example() {
        let tp = parse_traceparent(VALID.as_bytes()).unwrap();
        assert_eq!(tp.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(tp.parent_id, 0x00f067aa0ba902b7);
        assert_eq!(tp.flags, 1);
        let back = format_traceparent(tp.trace_id, tp.parent_id, tp.flags);
        assert_eq!(back.to_str().unwrap(), VALID);
    }

    #[test]
    fn refuses_what_is_not_exactly_a_traceparent() {
        let bad = [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-600f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            " 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
        ];
        for v in bad {
            assert_eq!(parse_traceparent(v.as_bytes()), None, "{v:?}");
        }
    }

    #[test]
    fn later_versions_are_read_as_version_00() {
        let tp = parse_traceparent(
            b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds",
        )
        .unwrap();
        assert_eq!(tp.parent_id, 0x00f067aa0ba902b7);
        assert!(
            parse_traceparent(b"cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some()
        );
    }

    #[test]
    fn two_traceparents_are_none() {
        let mut h = HeaderMap::new();
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert!(incoming(&h).is_some());
        h.append(TRACEPARENT, HeaderValue::from_static(VALID));
        assert_eq!(incoming(&h), None);
    }

    #[test]
    fn tracestate_grammar() {
        for ok in [
            "rojo=00f067aa0ba902b7",
            "congo=t61rcWkgMzE, rojo=00f067aa0ba902b7",
            "a@b=1,,c*d/e_f-g=x y",
            "0tenant@sys=v",
            " , ",
        ] {
            assert!(valid_tracestate(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "Rojo=1",
            "rojo",
            "rojo=",
            "rojo=a=b",
            "rojo=a,b",
            "a=1,a=2",
            "1abc=1",
            "a@=1",
            "a@b@c=1",
            "a=\u{7f}",
            "a@toolongsystemname=1",
        ] {
            assert!(!valid_tracestate(bad.as_bytes()), "{bad:?}");
        }
        let many: Vec<String> = (0..33).map(|i| format!("k{i}=v")).collect();
        assert!(!valid_tracestate(many.join(",").as_bytes()));
        assert!(valid_tracestate(many[..32].join(",").as_bytes()));
        let long = format!("a={}", "x".repeat(257));
        assert!(valid_tracestate(
            format!("a={}", "x".repeat(256)).as_bytes()
        ));
        assert!(!valid_tracestate(long.as_bytes()));
        let huge: Vec<String> = (0..20)
            .map(|i| format!("k{i}={}", "v".repeat(30)))
            .collect();
        assert!(
            !valid_tracestate(huge.join(",").as_bytes()),
            "over 512 bytes"
        );
    }

    #[test]
    fn tracestate_lines_are_joined() {
        let mut h = HeaderMap::new();
        h.append(TRACESTATE, HeaderValue::from_static("a=1"));
        h.append(TRACESTATE, HeaderValue::from_static("b=2"));
        assert_eq!(incoming_state(&h).unwrap(), "a=1,b=2");
        h.append(TRACESTATE, HeaderValue::from_static("a=3"));
        assert_eq!(incoming_state(&h), None, "a duplicate key across lines");
    }

    #[test]
    fn trace_id_hex_is_32_lowercase_digits() {
        assert_eq!(
            &trace_id_hex(0x4bf92f3577b34da6a3ce929d0e0e4736),
            b"4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(&trace_id_hex(1)[..], b"00000000000000000000000000000001");
    }
}
