//! The runtime form of a loaded config: compiled routes, per-service pools, prepared peer
//! settings and metric handles, built once at start-up so the request path only looks up.

use crate::config::{Config, HashKey, ServiceConfig, Timeouts};
use crate::metrics::ServiceMetrics;
use crate::pool::Pool;
use crate::routing::Router;
use pingora::services::ServiceWithDependents;
use pingora::Result;
use std::sync::Arc;

/// One service at run time.
pub struct Service {
    pub name: String,
    pub pool: Pool,
    pub hash_key: HashKey,
    pub timeouts: Timeouts,
    pub tls: bool,
    pub sni: Option<String>,
    pub tls_verify: bool,
    pub metrics: ServiceMetrics,
}

impl Service {
    fn new(name: &str, config: &ServiceConfig) -> Result<(Service, Option<Box<dyn ServiceWithDependents>>)> {
        let (pool, health_check) = Pool::new(name, config)?;
        Ok((
            Service {
                name: name.to_string(),
                pool,
                hash_key: config.hash_key.clone(),
                timeouts: config.timeouts.clone(),
                tls: config.tls,
                sni: config.sni.clone(),
                tls_verify: config.tls_verify,
                metrics: ServiceMetrics::new(name),
            },
            health_check,
        ))
    }
}

/// Everything the proxy needs per request, shared by all worker threads.
pub struct Runtime {
    pub router: Router,
    pub services: Vec<Arc<Service>>,
    pub access_log: bool,
}

impl Runtime {
    /// Builds the runtime and the background services (health checks) the server must run.
    pub fn new(config: &Config) -> Result<(Runtime, Vec<Box<dyn ServiceWithDependents>>)> {
        let mut services = Vec::with_capacity(config.services.len());
        let mut background = Vec::new();
        for (name, svc) in &config.services {
            let (service, health_check) = Service::new(name, svc)?;
            services.push(Arc::new(service));
            background.extend(health_check);
        }
        let names: Vec<&str> = config.services.keys().map(String::as_str).collect();
        let router = Router::new(config, |name| {
            names.iter().position(|n| *n == name).unwrap_or_default()
        });
        Ok((
            Runtime {
                router,
                services,
                access_log: config.access_log,
            },
            background,
        ))
    }
}
