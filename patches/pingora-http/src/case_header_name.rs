// Copyright 2026 Cloudflare, Inc.
//
// Licensed under the Apache License, Version 2.0 (the "License");
// you may not use this file except in compliance with the License.
// You may obtain a copy of the License at
//
// http://www.apache.org/licenses/LICENSE-2.0
//
// Unless required by applicable law or agreed to in writing, software
// distributed under the License is distributed on an "AS IS" BASIS,
// WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
// See the License for the specific language governing permissions and
// limitations under the License.

use crate::*;
use bytes::Bytes;
use http::header;

#[derive(Debug, Clone)]
pub struct CaseHeaderName(Bytes);

impl CaseHeaderName {
    pub fn new(name: String) -> Self {
        CaseHeaderName(name.into())
    }
}

impl CaseHeaderName {
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn from_slice(buf: &[u8]) -> Self {
        CaseHeaderName(Bytes::copy_from_slice(buf))
    }
}

/// A trait that converts into case-sensitive header names.
pub trait IntoCaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName;
}

impl IntoCaseHeaderName for CaseHeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        self
    }
}

impl IntoCaseHeaderName for String {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for &'static str {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self.into())
    }
}

impl IntoCaseHeaderName for HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(&self))
    }
}

impl IntoCaseHeaderName for &HeaderName {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(titled_header_name(self))
    }
}

impl IntoCaseHeaderName for Bytes {
    fn into_case_header_name(self) -> CaseHeaderName {
        CaseHeaderName(self)
    }
}

/// A header name parsed once, with the spelling written for it on the wire.
///
/// `insert_header` and `append_header` take the name as bytes and parse it into a
/// [`HeaderName`] on every call: for a name outside the standard set that copies the name into
/// a new buffer, and cloning it into the case map allocates again. A program that sets the same
/// header on every message prepares its name once and inserts it with `insert_prepared_header`
/// or `append_prepared_header`, which only clone the two names (reference counts, or nothing
/// for static ones).
///
/// The name also carries the hash a header map files it under ([`header::PrehashedName`]), so
/// inserting it does not hash it again.
#[derive(Debug, Clone)]
pub struct PreparedHeaderName {
    name: header::PrehashedName,
    case: CaseHeaderName,
}

impl PreparedHeaderName {
    /// A name written on the wire as `wire`; fails if it is not a valid header name.
    pub fn new(wire: impl IntoCaseHeaderName) -> Result<Self> {
        let case = wire.into_case_header_name();
        let name = HeaderName::from_bytes(case.as_slice())
            .or_err(InvalidHTTPHeader, "invalid header name")?;
        Ok(PreparedHeaderName {
            name: header::PrehashedName::new(name),
            case,
        })
    }

    /// A name already parsed, written on the wire in lower case, as [`HeaderName::as_str`]
    /// spells it.
    pub fn from_header_name(name: HeaderName) -> Self {
        let case = CaseHeaderName(Bytes::copy_from_slice(name.as_str().as_bytes()));
        PreparedHeaderName {
            name: header::PrehashedName::new(name),
            case,
        }
    }

    /// A lower-case name known at compile time, written as it is; cloning it never allocates.
    ///
    /// # Panics
    ///
    /// As [`HeaderName::from_static`]: if `lower` is not a valid lower-case header name.
    pub const fn from_static(lower: &'static str) -> Self {
        PreparedHeaderName {
            name: header::PrehashedName::from_static(lower),
            case: CaseHeaderName(Bytes::from_static(lower.as_bytes())),
        }
    }

    /// The parsed (lower-case) name.
    pub fn name(&self) -> &HeaderName {
        self.name.name()
    }

    /// The parsed name with its hash, to insert into a header map without hashing it.
    pub fn prehashed(&self) -> &header::PrehashedName {
        &self.name
    }

    /// The name as written on the wire.
    pub fn wire_name(&self) -> &[u8] {
        self.case.as_slice()
    }

    pub(crate) fn case_name(&self) -> CaseHeaderName {
        self.case.clone()
    }
}

fn titled_header_name(header_name: &HeaderName) -> Bytes {
    titled_header_name_str(header_name).map_or_else(
        || Bytes::copy_from_slice(header_name.as_str().as_bytes()),
        |s| Bytes::from_static(s.as_bytes()),
    )
}

pub(crate) fn titled_header_name_str(header_name: &HeaderName) -> Option<&'static str> {
    Some(match *header_name {
        header::ACCEPT_RANGES => "Accept-Ranges",
        header::AGE => "Age",
        header::CACHE_CONTROL => "Cache-Control",
        header::CONNECTION => "Connection",
        header::CONTENT_TYPE => "Content-Type",
        header::CONTENT_ENCODING => "Content-Encoding",
        header::CONTENT_LENGTH => "Content-Length",
        header::DATE => "Date",
        header::TRANSFER_ENCODING => "Transfer-Encoding",
        header::HOST => "Host",
        header::SERVER => "Server",
        header::SET_COOKIE => "Set-Cookie",
        // TODO: add more const header here to map to their titled case
        // TODO: automatically upper case the first letter?
        _ => {
            return None;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_case_header_name() {
        assert_eq!("FoO".into_case_header_name().as_slice(), b"FoO");
        assert_eq!("FoO".to_string().into_case_header_name().as_slice(), b"FoO");
        assert_eq!(header::SERVER.into_case_header_name().as_slice(), b"Server");
    }

    #[test]
    fn test_prepared_header_name() {
        let custom = PreparedHeaderName::new("X-Request-Id").unwrap();
        assert_eq!(custom.name().as_str(), "x-request-id");
        assert_eq!(custom.wire_name(), b"X-Request-Id");
        let lower = PreparedHeaderName::from_static("x-forwarded-for");
        assert_eq!(lower.name().as_str(), "x-forwarded-for");
        assert_eq!(lower.wire_name(), b"x-forwarded-for");
        assert!(PreparedHeaderName::new("bad name").is_err());
        let parsed = PreparedHeaderName::from_header_name(header::CONTENT_TYPE);
        assert_eq!(parsed.wire_name(), b"content-type");
    }
}
