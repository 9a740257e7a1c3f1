//! Cache keys: what makes two requests "the same" for the cache, and the storage key string
//! both backends use.
//!
//! The storage key is `bw:c:<service>:<path>[?<query>]|<host>|GET[|u=<user>]`, every
//! component percent-escaped so that `:`, `|`, `?`, `%`, glob characters, spaces and
//! non-ASCII bytes never appear raw. That makes the layout unambiguous (two different requests
//! can never produce one key) and lets a purge by path prefix be a plain string-prefix match:
//! `bw:c:<service>:<escaped prefix>*`.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// The storage key prefix shared by every entry.
pub const KEY_PREFIX: &str = "bw:c:";

/// Identifies one cached response (before `Vary`, which is checked against the entry).
#[derive(Debug, Clone)]
pub struct CacheKey {
    service: Arc<str>,
    path: Box<str>,
    key: Box<str>,
}

impl PartialEq for CacheKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for CacheKey {}

impl Hash for CacheKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key.hash(state)
    }
}

impl CacheKey {
    /// GET and HEAD share a key (the method class is always `GET`: nothing else is cached).
    /// `host` is lower-cased, the query's parameters are sorted by name then value, and an
    /// empty query counts as none.
    pub fn new(
        service: &Arc<str>,
        host: &str,
        path: &str,
        query: Option<&str>,
        user: Option<&str>,
    ) -> CacheKey {
        let mut key =
            String::with_capacity(KEY_PREFIX.len() + service.len() + path.len() + host.len() + 32);
        key.push_str(KEY_PREFIX);
        escape_into(&mut key, service);
        key.push(':');
        escape_into(&mut key, path);
        if let Some(q) = query.and_then(normalize_query) {
            key.push('?');
            escape_into(&mut key, &q);
        }
        key.push('|');
        escape_into(&mut key, &host.to_ascii_lowercase());
        key.push_str("|GET");
        if let Some(user) = user {
            key.push_str("|u=");
            escape_into(&mut key, user);
        }
        CacheKey {
            service: Arc::clone(service),
            path: path.into(),
            key: key.into(),
        }
    }

    /// The storage key.
    pub fn as_str(&self) -> &str {
        &self.key
    }

    /// Whether a purge of `prefix` (optionally only in `service`) covers this key.
    pub fn matches_purge(&self, prefix: &str, service: Option<&str>) -> bool {
        service.is_none_or(|s| s == &*self.service) && self.path.starts_with(prefix)
    }
}

/// The storage-key prefix every key of `service` (or of any service) under the path `prefix`
/// starts with, as a Redis `SCAN MATCH` pattern.
pub fn purge_pattern(prefix: &str, service: Option<&str>) -> String {
    let mut literal = String::from(KEY_PREFIX);
    match service {
        Some(s) => escape_into(&mut literal, s),
        // Escaped services never contain ':', so this `*` cannot swallow part of the path.
        None => literal.push('\u{0}'),
    }
    literal.push(':');
    escape_into(&mut literal, prefix);
    let mut pattern = glob_escape(&literal).replace('\u{0}', "*");
    pattern.push('*');
    pattern
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

/// Sorts the parameters by name, then value; `None` for an empty query.
pub fn normalize_query(query: &str) -> Option<String> {
    let mut params: Vec<(&str, &str)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| (p.split('=').next().unwrap_or(p), p))
        .collect();
    if params.is_empty() {
        return None;
    }
    params.sort_unstable();
    let mut out = String::with_capacity(query.len());
    for (i, (_, param)) in params.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(param);
    }
    Some(out)
}

/// Percent-escapes every byte outside a conservative set, so separators and glob characters
/// only ever appear where the key layout puts them.
fn escape_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
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

    fn key(host: &str, path: &str, query: Option<&str>, user: Option<&str>) -> String {
        CacheKey::new(&Arc::from("users"), host, path, query, user)
            .as_str()
            .to_string()
    }

    #[test]
    fn query_order_and_host_case_do_not_matter() {
        let a = key("API.example.com", "/users", Some("b=2&a=1&a=0"), None);
        let b = key("api.example.com", "/users", Some("a=0&b=2&a=1"), None);
        assert_eq!(a, b);
        assert_eq!(a, "bw:c:users:/users?a=0&a=1&b=2|api.example.com|GET");
        assert_eq!(
            key("h", "/users", Some(""), None),
            key("h", "/users", None, None)
        );
        assert_eq!(
            key("h", "/users", Some("&&"), None),
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
            "bw:c:users:/a%3Ab%7Cc%2A%3F%5Bx%5D%25?q=%2A|localhost%3A8080|GET|u=u%3A1"
        );
        // Percent-escaping is per byte, so prefixes of paths stay prefixes of keys.
        let path_key = key("h", "/users/1/orders", None, None);
        assert!(path_key.starts_with(&purge_pattern("/users/1", Some("users")).replace('*', "")));
    }

    #[test]
    fn purge_patterns() {
        assert_eq!(
            purge_pattern("/users/1", Some("users")),
            "bw:c:users:/users/1*"
        );
        assert_eq!(purge_pattern("/users/1", None), "bw:c:*:/users/1*");
        assert_eq!(purge_pattern("/a*b", Some("s")), "bw:c:s:/a%2Ab*");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        let k = CacheKey::new(&Arc::from("users"), "h", "/users/10", None, None);
        assert!(k.matches_purge("/users/1", None));
        assert!(k.matches_purge("/users/1", Some("users")));
        assert!(!k.matches_purge("/users/1", Some("orders")));
        assert!(!k.matches_purge("/users/2", None));
    }
}
