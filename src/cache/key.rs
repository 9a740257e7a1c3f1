//! Cache keys: what makes two requests "the same" for the cache, and the storage key string
//! both backends use.
//!
//! The primary key is `bw:c:<service>:<path>[?<query>]|<scheme>|<host>|GET[|u=<user>]`, every
//! component percent-escaped so that `:`, `|`, `?`, `%`, glob characters, spaces and non-ASCII
//! bytes never appear raw. That makes the layout unambiguous (two different requests can never
//! produce one key) and lets a purge by path prefix be a plain string-prefix match:
//! `bw:c:<service>:<escaped prefix>*`. A response with `Vary` is stored under a secondary key,
//! the primary key followed by `|v` and the request's values of the varied headers, so a purge
//! of the primary key's prefix covers every variant too.
//!
//! The query is kept as the client sent it: parameter order and repetition are part of the
//! key, since many frameworks read `?a=2&a=1` differently from `?a=1&a=2`.

use http::{HeaderMap, HeaderName};
use std::borrow::Borrow;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The storage key prefix shared by every entry.
pub const KEY_PREFIX: &str = "bw:c:";

/// The storage key of one cached response (or of the variant list of a URL whose responses
/// vary). Cheap to clone.
#[derive(Debug, Clone)]
pub struct CacheKey(Arc<str>);

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl Borrow<str> for CacheKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// What a request is keyed by, besides `Vary`.
#[derive(Debug, Clone, Copy)]
pub struct KeyParts<'a> {
    pub service: &'a str,
    /// The client came over TLS: `https` and `http` never share an entry.
    pub https: bool,
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// The authenticated user, when the service keys per user.
    pub user: Option<&'a str>,
}

impl CacheKey {
    /// GET and HEAD share a key (the method class is always `GET`: nothing else is cached).
    /// `host` is lower-cased; an empty query counts as none.
    pub fn new(p: KeyParts<'_>) -> CacheKey {
        let query = p.query.filter(|q| !q.is_empty());
        let mut key = String::with_capacity(
            KEY_PREFIX.len()
                + p.service.len()
                + p.path.len()
                + query.map_or(0, str::len)
                + p.host.len()
                + p.user.map_or(0, str::len)
                + 24,
        );
        key.push_str(KEY_PREFIX);
        escape_into(&mut key, p.service);
        key.push(':');
        escape_into(&mut key, p.path);
        if let Some(q) = query {
            key.push('?');
            escape_into(&mut key, q);
        }
        key.push_str(if p.https { "|https|" } else { "|http|" });
        escape_into(&mut key, &p.host.to_ascii_lowercase());
        key.push_str("|GET");
        if let Some(user) = p.user {
            key.push_str("|u=");
            escape_into(&mut key, user);
        }
        CacheKey(key.into())
    }

    /// The secondary key of the variant a request with `request` headers selects, for a
    /// response that varies on `names`: per name, `|` then nothing when the request lacks the
    /// header, else `=` and its (joined, escaped) values. Values are kept whole rather than
    /// hashed, so two variants can never share a key.
    pub fn variant(&self, names: &[HeaderName], request: &HeaderMap) -> CacheKey {
        let mut key = String::with_capacity(self.0.len() + 2 + names.len() * 16);
        key.push_str(&self.0);
        key.push_str("|v");
        for name in names {
            key.push('|');
            let mut values = request.get_all(name).iter();
            if let Some(first) = values.next() {
                key.push('=');
                escape_bytes_into(&mut key, first.as_bytes());
                for v in values {
                    escape_into(&mut key, ", ");
                    escape_bytes_into(&mut key, v.as_bytes());
                }
            }
        }
        CacheKey(key.into())
    }

    /// Rebuilds a key read back from storage (a variant key listed in a variant index).
    pub fn from_stored(key: &str) -> CacheKey {
        CacheKey(key.into())
    }

    /// The storage key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Which keys a purge removes: those of one service (or any) whose path starts with a prefix.
#[derive(Debug, Clone)]
pub struct PurgeFilter {
    /// `bw:c:<service>:<path prefix>`, escaped; without a service, just `:<path prefix>`.
    literal: String,
    any_service: bool,
}

impl PurgeFilter {
    /// Keys whose request path starts with `prefix` (a plain string prefix: `/users/1` also
    /// covers `/users/10`), in `service` only when given.
    pub fn new(prefix: &str, service: Option<&str>) -> PurgeFilter {
        let mut literal = String::new();
        if let Some(s) = service {
            literal.push_str(KEY_PREFIX);
            escape_into(&mut literal, s);
        }
        literal.push(':');
        escape_into(&mut literal, prefix);
        PurgeFilter {
            literal,
            any_service: service.is_none(),
        }
    }

    pub fn matches(&self, key: &str) -> bool {
        if !self.any_service {
            return key.starts_with(&self.literal);
        }
        // Escaped services never contain ':', so the first one after the prefix ends it.
        key.strip_prefix(KEY_PREFIX)
            .and_then(|rest| rest.find(':').map(|i| &rest[i..]))
            .is_some_and(|rest| rest.starts_with(&self.literal))
    }

    /// The same set of keys as a Redis `SCAN MATCH` pattern.
    pub fn pattern(&self) -> String {
        let mut pattern = String::with_capacity(self.literal.len() + 12);
        if self.any_service {
            pattern.push_str(KEY_PREFIX);
            pattern.push('*');
        }
        pattern.push_str(&glob_escape(&self.literal));
        pattern.push('*');
        pattern
    }
}

/// Escapes Redis glob metacharacters so `s` matches only itself.
pub fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn escape_into(out: &mut String, s: &str) {
    escape_bytes_into(out, s.as_bytes())
}

/// Percent-escapes every byte outside a conservative set, so separators and glob characters
/// only ever appear where the key layout puts them.
fn escape_bytes_into(out: &mut String, s: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s {
        let plain = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'/' | b'-'
                    | b'.'
                    | b'_'
                    | b'~'
                    | b'&'
                    | b'='
                    | b'+'
                    | b','
                    | b';'
                    | b'@'
                    | b'!'
                    | b'$'
                    | b'\''
                    | b'('
                    | b')'
            );
        if plain {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn parts<'a>(
        https: bool,
        host: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        user: Option<&'a str>,
    ) -> KeyParts<'a> {
        KeyParts {
            service: "users",
            https,
            host,
            path,
            query,
            user,
        }
    }

    fn key(host: &str, path: &str, query: Option<&str>, user: Option<&str>) -> String {
        CacheKey::new(parts(false, host, path, query, user))
            .as_str()
            .to_string()
    }

    #[test]
    fn query_order_matters_and_host_case_does_not() {
        let a = key("API.example.com", "/users", Some("a=1&b=2"), None);
        let b = key("api.example.com", "/users", Some("a=1&b=2"), None);
        assert_eq!(a, b);
        assert_eq!(a, "bw:c:users:/users?a=1&b=2|http|api.example.com|GET");
        // Repeated parameters in another order are another request to most frameworks.
        assert_ne!(
            key("h", "/users", Some("a=2&a=1"), None),
            key("h", "/users", Some("a=1&a=2"), None)
        );
        assert_ne!(
            key("h", "/users", Some("b=2&a=1"), None),
            key("h", "/users", Some("a=1&b=2"), None)
        );
        assert_eq!(
            key("h", "/users", Some(""), None),
            key("h", "/users", None, None)
        );
        assert_ne!(
            key("h", "/users", Some("a=1"), None),
            key("h", "/users", Some("a=2"), None)
        );
        assert_ne!(
            key("h", "/users/1", None, None),
            key("h", "/users/2", None, None)
        );
        assert_ne!(
            key("a.com", "/u", None, None),
            key("b.com", "/u", None, None)
        );
        // `?` in a path (escaped) and the query separator never meet.
        assert_ne!(
            key("h", "/a?b", None, None),
            key("h", "/a", Some("b"), None)
        );
    }

    #[test]
    fn http_and_https_never_share_a_key() {
        let http = CacheKey::new(parts(false, "h", "/u", None, None));
        let https = CacheKey::new(parts(true, "h", "/u", None, None));
        assert_ne!(http, https);
        assert_eq!(https.as_str(), "bw:c:users:/u|https|h|GET");
        // A host cannot smuggle a scheme separator.
        let crafted = CacheKey::new(parts(false, "https|h", "/u", None, None));
        assert_ne!(crafted, https);
    }

    #[test]
    fn users_get_separate_keys() {
        let anon = key("h", "/me", None, None);
        let alice = key("h", "/me", None, Some("alice"));
        let bob = key("h", "/me", None, Some("bob"));
        assert_ne!(alice, bob);
        assert_ne!(alice, anon);
        // A crafted subject cannot impersonate another key's layout.
        assert_ne!(
            key("h", "/me", None, Some("a|u=b")),
            key("h", "/me|u=a", None, Some("b"))
        );
    }

    #[test]
    fn separators_and_glob_characters_are_escaped() {
        let k = key("localhost:8080", "/a:b|c*?[x]%", Some("q=*"), Some("u:1"));
        assert_eq!(
            k,
            "bw:c:users:/a%3Ab%7Cc%2A%3F%5Bx%5D%25?q=%2A|http|localhost%3A8080|GET|u=u%3A1"
        );
    }

    #[test]
    fn variants_extend_the_primary_key_unambiguously() {
        let primary = CacheKey::new(parts(false, "h", "/u", None, None));
        let names = [
            HeaderName::from_static("accept-language"),
            HeaderName::from_static("x-absent"),
        ];
        let mut req = HeaderMap::new();
        req.append("accept-language", HeaderValue::from_static("de"));
        req.append("accept-language", HeaderValue::from_static("en|x"));
        let v = primary.variant(&names, &req);
        assert_eq!(v.as_str(), "bw:c:users:/u|http|h|GET|v|=de,%20en%7Cx|");
        assert!(v.as_str().starts_with(primary.as_str()));
        // Absent, empty and "=" values are three different variants.
        let absent = primary.variant(&names[..1], &HeaderMap::new());
        let mut empty = HeaderMap::new();
        empty.insert("accept-language", HeaderValue::from_static(""));
        let empty = primary.variant(&names[..1], &empty);
        let mut eq = HeaderMap::new();
        eq.insert("accept-language", HeaderValue::from_static("="));
        let eq = primary.variant(&names[..1], &eq);
        assert_ne!(absent, empty);
        assert_ne!(empty, eq);
        assert_ne!(absent, eq);
        // A value cannot forge the separator of the next name.
        let mut forged = HeaderMap::new();
        forged.insert("accept-language", HeaderValue::from_static("de|=x"));
        let mut two = HeaderMap::new();
        two.insert("accept-language", HeaderValue::from_static("de"));
        two.insert("x-absent", HeaderValue::from_static("x"));
        assert_ne!(
            primary.variant(&names, &forged),
            primary.variant(&names, &two)
        );
    }

    #[test]
    fn purge_filters_and_patterns() {
        let f = PurgeFilter::new("/users/1", Some("users"));
        assert_eq!(f.pattern(), "bw:c:users:/users/1*");
        let any = PurgeFilter::new("/users/1", None);
        assert_eq!(any.pattern(), "bw:c:*:/users/1*");
        assert_eq!(
            PurgeFilter::new("/a*b", Some("s")).pattern(),
            "bw:c:s:/a%2Ab*"
        );
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");

        let k = key("h", "/users/10", None, None);
        assert!(f.matches(&k));
        assert!(any.matches(&k));
        assert!(!PurgeFilter::new("/users/1", Some("orders")).matches(&k));
        assert!(!PurgeFilter::new("/users/2", None).matches(&k));
        // Variants live under their primary key's prefix.
        let primary = CacheKey::new(parts(true, "h", "/users/1", None, None));
        let variant = primary.variant(&[HeaderName::from_static("accept")], &HeaderMap::new());
        assert!(f.matches(variant.as_str()));
        // A service whose name starts like another's is not covered.
        let other = CacheKey::new(KeyParts {
            service: "users2",
            ..parts(false, "h", "/users/1", None, None)
        });
        assert!(!f.matches(other.as_str()));
        assert!(any.matches(other.as_str()));
    }
}
