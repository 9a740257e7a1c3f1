//! The rules of the file that no single section can check: there are services and listeners,
//! listeners and routes do not collide, TLS files open, service names are plain, and features
//! that need another section (`redis`, `auth.jwt`) have it.

use super::schema::{Config, ServiceConfig};
use super::source::{ConfigError, Source};
use crate::cache::BackendKind as CacheBackend;
use crate::edge::auth::AuthMode;
use crate::edge::rate_limit::Backend as RateLimitBackend;
use crate::routing::HostPattern;
use std::collections::{HashMap, HashSet};

/// Checks every rule, in file order as far as possible; the first broken one is the error.
pub(super) fn check(config: &Config, source: &Source) -> Result<(), ConfigError> {
    listeners(config, source)?;
    redis_is_configured_for_the_cache(config, source)?;
    let mut routes = RouteOwners::default();
    for (name, svc) in &config.services {
        let field = |rest: &str| format!("services.{name}{rest}");
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(source.error(
                field(""),
                None,
                format!("service name {name:?} may only hold letters, digits, '-' and '_'"),
            ));
        }
        if svc.routes.is_empty() {
            let message = "a service needs at least one route";
            return Err(source.error(field(".routes"), None, message));
        }
        if svc.upstreams.is_empty() {
            let message = "a service needs at least one upstream";
            return Err(source.error(field(".upstreams"), None, message));
        }
        routes.claim(name, svc, source)?;
        if svc.auth != AuthMode::None && config.auth.jwt.is_none() {
            return Err(source.error(
                field(".auth"),
                None,
                "auth is required or optional but the top-level auth.jwt is not configured",
            ));
        }
        if !svc.required_scopes.is_empty() && svc.auth == AuthMode::None {
            return Err(source.error(
                field(".required_scopes"),
                None,
                "required_scopes needs auth: required or optional",
            ));
        }
        let redis_rate_limit = svc
            .rate_limit
            .as_ref()
            .is_some_and(|rl| rl.backend == RateLimitBackend::Redis);
        if redis_rate_limit && config.redis.is_none() {
            return Err(source.error(
                field(".rate_limit.backend"),
                Some("backend"),
                "backend redis needs the top-level redis: {url: ...}",
            ));
        }
    }
    Ok(())
}

/// At least one service and one listener, a sane thread count, readable TLS files, and no
/// address used by two listeners (the admin one included).
fn listeners(config: &Config, source: &Source) -> Result<(), ConfigError> {
    if config.services.is_empty() {
        return Err(source.error("services", None, "at least one service is required"));
    }
    let server = &config.server;
    if server.listen.is_empty() && server.tls.is_empty() {
        return Err(source.error(
            "server.listen",
            None,
            "at least one listener (server.listen or server.tls) is required",
        ));
    }
    if server.threads == 0 || server.threads > 256 {
        return Err(source.error(
            "server.threads",
            None,
            format!("threads must be 1..=256, got {}", server.threads),
        ));
    }
    if server.keepalive_timeout.is_zero() {
        let message = "keepalive_timeout must be greater than zero";
        return Err(source.error("server.keepalive_timeout", None, message));
    }
    if server.max_connections == Some(0) {
        let message = "max_connections must be at least 1";
        return Err(source.error("server.max_connections", None, message));
    }
    let mut addresses = HashSet::new();
    let all = server
        .listen
        .iter()
        .chain(server.tls.iter().map(|t| &t.listen))
        .chain(std::iter::once(&config.admin.listen));
    for l in all {
        if l.0.port() != 0 && !addresses.insert(l.0) {
            return Err(source.error(
                "server.listen",
                Some(&l.to_string()),
                format!("address {l} is used by two listeners"),
            ));
        }
    }
    Ok(())
}

fn redis_is_configured_for_the_cache(config: &Config, source: &Source) -> Result<(), ConfigError> {
    if config.cache.backend == CacheBackend::Redis && config.redis.is_none() {
        return Err(source.error(
            "cache.backend",
            Some("backend"),
            "backend redis needs the top-level redis: {url: ...}",
        ));
    }
    Ok(())
}

/// Which service each (host, path prefix) is routed to, so that no two routes are the same.
#[derive(Default)]
struct RouteOwners<'c> {
    owners: HashMap<(Option<HostPattern>, String), &'c str>,
}

impl<'c> RouteOwners<'c> {
    fn claim(
        &mut self,
        name: &'c str,
        svc: &ServiceConfig,
        source: &Source,
    ) -> Result<(), ConfigError> {
        for (i, r) in svc.routes.iter().enumerate() {
            let key = (r.host.clone(), r.path_prefix.0.clone());
            if let Some(other) = self.owners.insert(key, name) {
                let host = r
                    .host
                    .as_ref()
                    .map(|h| format!(" host {h}"))
                    .unwrap_or_default();
                return Err(source.error(
                    format!("services.{name}.routes[{i}].path_prefix"),
                    Some(&r.path_prefix.0),
                    format!(
                        "duplicate route: path_prefix {}{host} is already routed to service {other}",
                        r.path_prefix.0
                    ),
                ));
            }
        }
        Ok(())
    }
}
