//! Value types that config sections of several features share, each checking itself while
//! it is parsed so that its errors carry the parser's line and column: durations, byte sizes
//! and path prefixes. Also [`FieldError`], how a section's compile step names the field at
//! fault. Nothing here knows any feature.

use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A section's compile step refusing one of its fields; the config layer adds the section's
/// path and finds the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path below the section, e.g. `.upstreams[1]` or `.fallback.status`; empty for the
    /// section itself.
    pub field: String,
    /// Text to look for from the field's line on, to point at the right list entry.
    pub needle: Option<String>,
    /// Look for the needle in double quotes first, so a value written `"10.0.0.1"` is not
    /// found inside `"10.0.0.1:80"` on an earlier line.
    pub quoted_first: bool,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            needle: None,
            quoted_first: false,
            message: message.into(),
        }
    }

    /// Points at the first `needle` from the field's line on.
    pub fn at(mut self, needle: impl Into<String>) -> FieldError {
        self.needle = Some(needle.into());
        self
    }

    /// Points at the value as written, quoted or not.
    pub fn at_value(mut self, value: impl Into<String>) -> FieldError {
        self.needle = Some(value.into());
        self.quoted_first = true;
        self
    }
}

/// Parses a human duration: `500ms`, `3s`, `1m`, `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration {s:?} ({e}): expected e.g. 500ms, 3s, 1m"))
}

/// The config's one duration deserializer, for
/// `#[serde(deserialize_with = "crate::values::de_duration")]`.
pub fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(de::Error::custom)
}

/// [`de_duration`] for an optional field (absent is `None` through `#[serde(default)]`).
pub fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// A size in bytes, written `1024`, `"512KiB"`, `"1MiB"`, `"2GiB"` (powers of 1024) or
/// `"1KB"`, `"1MB"`, `"1GB"` (powers of 1000); `B` may be left out (`"64Ki"`, `"1M"`), and
/// unit letters are case-insensitive except that `i` marks the binary units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn as_u64(self) -> u64 {
        self.0
    }

    /// As a `usize`, saturating on 32-bit targets.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let invalid = || {
            format!("invalid size {s:?}: expected a whole number of bytes with an optional unit, e.g. 1024, 512KiB, 1MiB, 1GB")
        };
        if digits.is_empty() {
            return Err(invalid());
        }
        let n: u64 = digits.parse().map_err(|_| invalid())?;
        let multiplier: u64 = match unit.trim() {
            "" | "b" | "B" => 1,
            "Ki" | "KiB" | "kiB" | "ki" => 1 << 10,
            "Mi" | "MiB" | "mi" | "miB" => 1 << 20,
            "Gi" | "GiB" | "gi" | "giB" => 1 << 30,
            "Ti" | "TiB" | "ti" | "tiB" => 1 << 40,
            u => match u.to_ascii_lowercase().as_str() {
                "k" | "kb" => 1_000,
                "m" | "mb" => 1_000_000,
                "g" | "gb" => 1_000_000_000,
                "t" | "tb" => 1_000_000_000_000,
                _ => return Err(invalid()),
            },
        };
        n.checked_mul(multiplier)
            .map(ByteSize)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (size, unit) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 1024, \"512KiB\", \"1MiB\" or \"1GB\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("invalid size {v}: must not be negative")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A path prefix: starts with `/`, no query, no whitespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PathPrefix(pub String);

impl<'de> Deserialize<'de> for PathPrefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.starts_with('/') {
            return Err(de::Error::custom(format!(
                "invalid path {s:?}: must start with '/'"
            )));
        }
        if s.contains(['?', '#', ' ', '\t']) {
            return Err(de::Error::custom(format!(
                "invalid path {s:?}: no query, fragment or whitespace allowed"
            )));
        }
        Ok(PathPrefix(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_and_decimal_units() {
        let ok = [
            ("1024", 1024),
            ("0", 0),
            ("512KiB", 512 * 1024),
            ("1MiB", 1 << 20),
            ("256MiB", 256 << 20),
            ("2GiB", 2 << 30),
            ("1GB", 1_000_000_000),
            ("1kb", 1000),
            ("10 MB", 10_000_000),
            ("64Ki", 64 * 1024),
            ("7B", 7),
        ];
        for (text, bytes) in ok {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in [
            "",
            "MiB",
            "1.5MiB",
            "-1",
            "1XB",
            "1 M B",
            "99999999999999999999",
        ] {
            assert!(
                bad.parse::<ByteSize>().is_err(),
                "{bad:?} should be refused"
            );
        }
        assert!("20000000TiB"
            .parse::<ByteSize>()
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn sizes_deserialize_from_numbers_and_strings_and_display_compactly() {
        let v: Vec<ByteSize> = serde_yaml::from_str("[1024, \"1MiB\", 3GB]").unwrap();
        assert_eq!(
            v,
            vec![ByteSize(1024), ByteSize(1 << 20), ByteSize(3_000_000_000)]
        );
        assert!(serde_yaml::from_str::<ByteSize>("-5").is_err());
        assert_eq!(ByteSize(256 << 20).to_string(), "256MiB");
        assert_eq!(ByteSize(1536).to_string(), "1536");
        assert_eq!(ByteSize(1024).to_string(), "1KiB");
    }

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration(" 500ms "), Ok(Duration::from_millis(500)));
        let err = parse_duration("10").unwrap_err();
        assert!(err.contains("invalid duration \"10\""), "{err}");
    }
}
