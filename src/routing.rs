//! Routing: a service's `routes:` (path prefix, optional host), the route table compiled from
//! every service's routes, which maps a request's host and path to a service, and the host a
//! request is for.
//!
//! Built once when the config loads. A request matches the route with the longest path prefix
//! (on segment boundaries); for equal prefixes a route with a host wins over one without.

use crate::values::PathPrefix;
use pingora::http::RequestHeader;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::cell::OnceCell;
use std::fmt;
use std::sync::Arc;

/// One route of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Path prefix, matched on segment boundaries (`/users` matches `/users` and `/users/1`,
    /// not `/usersx`). The longest matching prefix wins.
    pub path_prefix: PathPrefix,
    /// Optional host: exact (`api.example.com`) or wildcard (`*.example.com`). Routes with a
    /// host win over routes without one for the same prefix.
    #[serde(default)]
    pub host: Option<HostPattern>,
    /// Remove the prefix before forwarding (`/users/1` -> `/1`). Default: false.
    #[serde(default)]
    pub strip_prefix: bool,
}

/// A route host: exact, or `*.suffix` for any subdomain of suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    Exact(String),
    /// Stored with its leading dot: `*.example.com` -> `.example.com`.
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (already lower-case, port removed) matches.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Wildcard(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        }
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?.to_ascii_lowercase();
        let valid_name = |h: &str| {
            !h.is_empty()
                && h.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                })
        };
        if let Some(suffix) = s.strip_prefix("*.") {
            if valid_name(suffix) {
                return Ok(HostPattern::Wildcard(format!(".{suffix}")));
            }
        } else if valid_name(&s) {
            return Ok(HostPattern::Exact(s));
        }
        Err(de::Error::custom(format!(
            "invalid host {s:?}: expected a host name like api.example.com or *.example.com"
        )))
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(h) => f.write_str(h),
            HostPattern::Wildcard(s) => write!(f, "*{s}"),
        }
    }
}

/// One compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub host: Option<HostPattern>,
    pub strip_prefix: bool,
    /// Index of the service in the runtime's service list.
    pub service: usize,
}

/// The route table, sorted most specific first, so the first match is the best one.
#[derive(Debug, Clone, Default)]
pub struct Router {
    /// Shared, so a request keeps its route without copying it.
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// Every route, most specific first (the status page lists them).
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }

    /// Compiles the routes of every service, given with the service's index in the
    /// runtime's service list.
    pub fn compile<'a>(services: impl IntoIterator<Item = (usize, &'a [RouteConfig])>) -> Router {
        let mut routes: Vec<Arc<Route>> = services
            .into_iter()
            .flat_map(|(service, routes)| {
                routes.iter().map(move |r| {
                    Arc::new(Route {
                        prefix: r.path_prefix.0.clone(),
                        host: r.host.clone(),
                        strip_prefix: r.strip_prefix,
                        service,
                    })
                })
            })
            .collect();
        // Longest prefix first; then exact host, wildcard host (longer suffix first), no host.
        routes.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then_with(|| host_rank(&b.host).cmp(&host_rank(&a.host)))
        });
        Router { routes }
    }

    /// The best route for the request, by its path (without query) and host (lower-case,
    /// without port). The host is read only once a route that names one is reached: most
    /// configurations route by path alone.
    pub fn find(&self, req: &RequestHeader) -> Option<&Arc<Route>> {
        let path = req.uri.path();
        let host = OnceCell::new();
        let host = || host.get_or_init(|| normalize_host(request_host(req).unwrap_or_default()));
        self.routes.iter().find(|r| {
            prefix_matches(&r.prefix, path) && r.host.as_ref().is_none_or(|h| h.matches(host()))
        })
    }
}

fn host_rank(host: &Option<HostPattern>) -> usize {
    match host {
        None => 0,
        Some(HostPattern::Wildcard(s)) => 1 + s.len(),
        Some(HostPattern::Exact(_)) => usize::MAX,
    }
}

/// `/users` matches `/users`, `/users/` and `/users/1`, but not `/usersx`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

impl Route {
    /// Sets the path the upstream gets: without the route's prefix when it says
    /// `strip_prefix`, the query kept.
    pub fn rewrite_path(&self, upstream_request: &mut RequestHeader) -> pingora::Result<()> {
        if !self.strip_prefix {
            return Ok(());
        }
        let path = strip_prefix(&self.prefix, upstream_request.uri.path());
        let path_and_query = match upstream_request.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path.to_string(),
        };
        let invalid =
            |e| pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "rewriting path", e);
        // The scheme and authority stay: an HTTP/2 request has no `Host` header, only its
        // URI's authority, which becomes the upstream's `Host` or `:authority`.
        let mut parts = upstream_request.uri.clone().into_parts();
        parts.path_and_query = Some(path_and_query.parse().map_err(invalid)?);
        let uri = http::Uri::from_parts(parts).map_err(|e| {
            pingora::Error::because(pingora::ErrorType::InvalidHTTPHeader, "rewriting path", e)
        })?;
        upstream_request.set_uri(uri);
        Ok(())
    }
}

/// The path sent upstream when the route strips its prefix: `/users/1` -> `/1`, `/users` -> `/`.
pub fn strip_prefix<'a>(prefix: &str, path: &'a str) -> &'a str {
    let prefix = prefix.trim_end_matches('/');
    match path.get(prefix.len()..) {
        Some(rest) if rest.starts_with('/') => rest,
        _ => "/",
    }
}

/// The host the client asked for: the `Host` header, or the absolute URI's authority (HTTP/2
/// and absolute-form requests), as sent.
pub fn request_host(req: &RequestHeader) -> Option<&str> {
    req.headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri.authority().map(|a| a.as_str()))
}

/// The request host, lower-case and without its port (borrowed when it already is).
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // IPv6 literal: keep the brackets' content.
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                raw
            }
        })
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The router of a `services:` map, each service's index its position in name order, as
    /// in the runtime's service list.
    fn router(yaml: &str) -> (Router, Vec<String>) {
        #[derive(Deserialize)]
        struct File {
            services: BTreeMap<String, Service>,
        }
        #[derive(Deserialize)]
        struct Service {
            routes: Vec<RouteConfig>,
        }
        let file: File = serde_yaml::from_str(yaml).unwrap();
        let names: Vec<String> = file.services.keys().cloned().collect();
        let r = Router::compile(
            file.services
                .values()
                .enumerate()
                .map(|(i, s)| (i, s.routes.as_slice())),
        );
        (r, names)
    }

    fn service_for<'a>(r: &Router, names: &'a [String], host: &str, path: &str) -> Option<&'a str> {
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        if !host.is_empty() {
            req.insert_header(http::header::HOST, host).unwrap();
        }
        r.find(&req).map(|route| names[route.service].as_str())
    }

    const YAML: &str = r#"
services:
  root: {routes: [{path_prefix: /}], upstreams: ["127.0.0.1:1"]}
  users: {routes: [{path_prefix: /users}], upstreams: ["127.0.0.1:2"]}
  admin_users: {routes: [{path_prefix: /users/admin}], upstreams: ["127.0.0.1:3"]}
  api_users: {routes: [{path_prefix: /users, host: api.example.com}], upstreams: ["127.0.0.1:4"]}
  wild: {routes: [{path_prefix: /users, host: "*.example.com"}], upstreams: ["127.0.0.1:5"]}
"#;

    #[test]
    fn longest_prefix_wins() {
        let (r, n) = router(YAML);
        assert_eq!(
            service_for(&r, &n, "x", "/users/admin/7"),
            Some("admin_users")
        );
        assert_eq!(service_for(&r, &n, "x", "/users/7"), Some("users"));
        assert_eq!(service_for(&r, &n, "x", "/users"), Some("users"));
        assert_eq!(service_for(&r, &n, "x", "/orders"), Some("root"));
    }

    #[test]
    fn prefix_matches_on_segment_boundaries() {
        let (r, n) = router(YAML);
        assert_eq!(service_for(&r, &n, "x", "/usersx"), Some("root"));
        assert_eq!(service_for(&r, &n, "x", "/users/adminx"), Some("users"));
    }

    #[test]
    fn host_routes_beat_hostless_and_exact_beats_wildcard() {
        let (r, n) = router(YAML);
        assert_eq!(
            service_for(&r, &n, "api.example.com", "/users/1"),
            Some("api_users")
        );
        assert_eq!(
            service_for(&r, &n, "eu.example.com", "/users/1"),
            Some("wild")
        );
        assert_eq!(
            service_for(&r, &n, "example.com", "/users/1"),
            Some("users")
        );
        // The `Host` header as sent: any case, with a port.
        assert_eq!(
            service_for(&r, &n, "API.Example.com:8443", "/users/1"),
            Some("api_users")
        );
        assert_eq!(
            service_for(&r, &n, "", "/users/1"),
            Some("users"),
            "no host: only routes without one"
        );
    }

    #[test]
    fn no_route_without_catch_all() {
        let (r, n) =
            router("services:\n  a: {routes: [{path_prefix: /a}], upstreams: [\"127.0.0.1:1\"]}\n");
        assert_eq!(service_for(&r, &n, "x", "/b"), None);
    }

    #[test]
    fn strip_prefix_keeps_a_leading_slash() {
        assert_eq!(strip_prefix("/users", "/users/1"), "/1");
        assert_eq!(strip_prefix("/users", "/users"), "/");
        assert_eq!(strip_prefix("/users/", "/users/1"), "/1");
        assert_eq!(strip_prefix("/", "/a"), "/a");
    }

    #[test]
    fn stripping_a_prefix_keeps_the_query_and_an_http2_requests_authority() {
        let route = Route {
            prefix: "/api".into(),
            host: None,
            strip_prefix: true,
            service: 0,
        };
        let mut h1 = RequestHeader::build("GET", b"/api/a?b=1", None).unwrap();
        route.rewrite_path(&mut h1).unwrap();
        assert_eq!(h1.uri.to_string(), "/a?b=1");
        // An HTTP/2 request's URI carries its authority (it has no `Host` header).
        let mut h2 = RequestHeader::build("GET", b"/api/a", None).unwrap();
        h2.set_uri("http://example.com:8080/api/a".parse().unwrap());
        route.rewrite_path(&mut h2).unwrap();
        assert_eq!(h2.uri.to_string(), "http://example.com:8080/a");
    }

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("localhost"), "localhost");
    }

    #[test]
    fn wildcard_host_matches_subdomains_only() {
        let p = HostPattern::Wildcard(".example.com".into());
        assert!(p.matches("api.example.com"));
        assert!(!p.matches("example.com"));
        assert!(!p.matches("badexample.com"));
    }
}
