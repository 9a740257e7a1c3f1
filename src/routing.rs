//! Routing: the compiled route table that maps a request's host and path to a service.
//!
//! Built once when the config loads. A request matches the route with the longest path prefix
//! (on segment boundaries); for equal prefixes a route with a host wins over one without.

use crate::config::{Config, HostPattern};
use std::sync::Arc;

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
    /// Compiles the routes of every service; `service_index` maps a service name to its index.
    pub fn new(config: &Config, service_index: impl Fn(&str) -> usize) -> Router {
        let mut routes: Vec<Arc<Route>> = config
            .services
            .iter()
            .flat_map(|(name, svc)| {
                let service = service_index(name);
                svc.routes.iter().map(move |r| {
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

    /// The best route for `host` (lower-case, without port) and `path` (without query).
    pub fn find(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| {
            prefix_matches(&r.prefix, path) && r.host.as_ref().is_none_or(|h| h.matches(host))
        })
    }

    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
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

/// The path sent upstream when the route strips its prefix: `/users/1` -> `/1`, `/users` -> `/`.
pub fn strip_prefix<'a>(prefix: &str, path: &'a str) -> &'a str {
    let prefix = prefix.trim_end_matches('/');
    match path.get(prefix.len()..) {
        Some(rest) if rest.starts_with('/') => rest,
        _ => "/",
    }
}

/// The request host, lower-case and without its port.
pub fn normalize_host(raw: &str) -> String {
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
    host.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn router(yaml: &str) -> (Router, Vec<String>) {
        let config = Config::parse(yaml, Path::new("t.yaml")).unwrap();
        let names: Vec<String> = config.services.keys().cloned().collect();
        let r = Router::new(&config, |n| names.iter().position(|x| x == n).unwrap());
        (r, names)
    }

    fn service_for<'a>(r: &Router, names: &'a [String], host: &str, path: &str) -> Option<&'a str> {
        r.find(host, path)
            .map(|route| names[route.service].as_str())
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
    fn host_normalisation() {
        assert_eq!(normalize_host("API.Example.com:8080"), "api.example.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("localhost"), "localhost");
    }
}
