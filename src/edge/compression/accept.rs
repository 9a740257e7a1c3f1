//! `Accept-Encoding` (RFC 9110 12.5.3): which of the service's codings a client takes, and
//! the one it gets.
//!
//! Every field line counts (a client may split the list), names compare case-insensitively,
//! `x-gzip` is `gzip`, `q` weighs (`q=0` refuses), `*` stands for any coding not named, and a
//! coding named twice takes its lowest weight, so a refusal anywhere stands. An unreadable
//! weight refuses its coding. No header, or an empty one, means no coding: compressing for a
//! client that did not ask is what RFC 9110 allows but no client expects.

use super::Coding;
use http::header::{HeaderMap, ACCEPT_ENCODING};

/// The coding for a client with these request headers among `preferred` (the service's
/// order): the highest weight the client gives one of them, ties to the service's order.
pub fn choose(headers: &HeaderMap, preferred: &[Coding]) -> Option<Coding> {
    let mut named: [Option<u16>; Coding::COUNT] = [None; Coding::COUNT];
    let mut star: Option<u16> = None;
    for value in headers.get_all(ACCEPT_ENCODING) {
        let Ok(text) = value.to_str() else {
            continue;
        };
        for element in text.split(',') {
            let Some((name, q)) = parse_element(element) else {
                continue;
            };
            let slot = if name == "*" {
                &mut star
            } else {
                match Coding::from_token(name) {
                    Some(c) => &mut named[c as usize],
                    None => continue,
                }
            };
            *slot = Some(slot.map_or(q, |old| old.min(q)));
        }
    }
    let mut best: Option<(Coding, u16)> = None;
    for &coding in preferred {
        let q = named[coding as usize].or(star).unwrap_or(0);
        if q > 0 && best.is_none_or(|(_, b)| q > b) {
            best = Some((coding, q));
        }
    }
    best.map(|(c, _)| c)
}

/// `coding [; q=weight]` with optional whitespace; the weight in thousandths. `None` for an
/// empty element. Parameters other than `q` are ignored.
fn parse_element(element: &str) -> Option<(&str, u16)> {
    let mut parts = element.split(';');
    let name = parts.next()?.trim();
    if name.is_empty() {
        return None;
    }
    let mut q = 1000;
    for param in parts {
        let Some((key, value)) = param.split_once('=') else {
            continue;
        };
        if key.trim().eq_ignore_ascii_case("q") {
            q = parse_weight(value.trim()).unwrap_or(0);
        }
    }
    Some((name, q))
}

/// `qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] )`, in thousandths.
fn parse_weight(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut thousandths: u16 = 0;
    for (i, b) in frac.bytes().enumerate() {
        thousandths += u16::from(b - b'0') * [100, 10, 1][i];
    }
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Coding::*;

    const ALL: [Coding; 3] = [Zstd, Brotli, Gzip];

    fn pick(values: &[&str]) -> Option<Coding> {
        pick_from(values, &ALL)
    }

    fn pick_from(values: &[&str], preferred: &[Coding]) -> Option<Coding> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(ACCEPT_ENCODING, v.parse().unwrap());
        }
        choose(&h, preferred)
    }

    #[test]
    fn the_service_order_breaks_ties_and_weights_come_first() {
        assert_eq!(pick(&["gzip, deflate, br, zstd"]), Some(Zstd));
        assert_eq!(pick(&["gzip, br"]), Some(Brotli));
        assert_eq!(pick_from(&["zstd, br, gzip"], &[Gzip, Brotli]), Some(Gzip));
        assert_eq!(pick(&["gzip;q=1, br;q=0.5, zstd;q=0.8"]), Some(Gzip));
        assert_eq!(pick(&["gzip;q=0.001"]), Some(Gzip));
    }

    #[test]
    fn no_header_identity_and_unknown_codings_mean_no_compression() {
        assert_eq!(pick(&[]), None);
        assert_eq!(pick(&[""]), None);
        assert_eq!(pick(&["identity"]), None);
        assert_eq!(pick(&["deflate, compress"]), None);
        assert_eq!(pick_from(&["br"], &[Gzip]), None);
    }

    #[test]
    fn refusals_stand() {
        assert_eq!(pick(&["gzip;q=0"]), None);
        assert_eq!(pick(&["gzip; q=0.000"]), None);
        assert_eq!(pick(&["*;q=0"]), None);
        assert_eq!(pick(&["gzip, *;q=0"]), Some(Gzip));
        assert_eq!(pick(&["*, gzip;q=0, zstd;q=0"]), Some(Brotli));
        // A coding named twice takes its lowest weight, across field lines too.
        assert_eq!(pick(&["gzip, gzip;q=0"]), None);
        assert_eq!(pick(&["gzip", "gzip;q=0"]), None);
        assert_eq!(pick(&["br;q=0", "gzip", "br"]), Some(Gzip));
    }

    #[test]
    fn odd_spellings() {
        assert_eq!(pick(&["GZIP"]), Some(Gzip));
        assert_eq!(pick(&["  Br ;  Q = 0.5 ,gzip;q=0.4"]), Some(Brotli));
        assert_eq!(pick(&["x-gzip"]), Some(Gzip));
        assert_eq!(pick(&[",,gzip,,"]), Some(Gzip));
        assert_eq!(pick(&["*"]), Some(Zstd));
        assert_eq!(pick(&["gzip;level=9"]), Some(Gzip));
        // Unreadable weights refuse: over 1, more than three decimals, not a number.
        assert_eq!(pick(&["gzip;q=2"]), None);
        assert_eq!(pick(&["gzip;q=1.5"]), None);
        assert_eq!(pick(&["gzip;q=0.0001"]), None);
        assert_eq!(pick(&["gzip;q=high"]), None);
        assert_eq!(pick(&["gzip;q=-1"]), None);
        assert_eq!(pick(&["gzip;q="]), None);
        assert_eq!(pick(&["gzip;q=1.000"]), Some(Gzip));
        assert_eq!(pick(&["gzip;q=0."]), None);
    }
}
