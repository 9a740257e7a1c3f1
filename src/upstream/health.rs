//! Active health checks of a service's upstreams: the `health_check:` section, the probe
//! request compiled from it, and the check Pingora's load balancer runs in the background,
//! observed so that every result reaches the upstream's state (its health flag, metric and
//! circuit breaker).

use super::peer::UpstreamTls;
use super::state::Upstream;
use crate::values::PathPrefix;
use async_trait::async_trait;
use pingora::http::RequestHeader;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::Backend;
use pingora::protocols::l4::socket::SocketAddr as PingoraAddr;
use pingora::{Error, ErrorType, Result};
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

/// `health_check:` of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Path requested with `GET`; any 2xx passes. Default: `/health`.
    #[serde(default = "default_health_path")]
    pub path: PathPrefix,
    /// Time between checks. Default: 5s.
    #[serde(
        default = "default_health_interval",
        deserialize_with = "crate::values::de_duration"
    )]
    pub interval: Duration,
    /// Connect and read timeout of one check. Default: 1s.
    #[serde(
        default = "default_health_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub timeout: Duration,
    /// `Host` header sent with every upstream's check. Default: the first upstream's
    /// `host:port` as written.
    #[serde(default)]
    pub host: Option<String>,
    /// Consecutive passes that make an unhealthy upstream healthy. Default: 1.
    #[serde(default = "default_one")]
    pub healthy_threshold: usize,
    /// Consecutive failures that make a healthy upstream unhealthy. Default: 1.
    #[serde(default = "default_one")]
    pub unhealthy_threshold: usize,
}

fn default_one() -> usize {
    1
}
fn default_health_path() -> PathPrefix {
    PathPrefix("/health".into())
}
fn default_health_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}

/// A service's compiled health check: how often, and the probe Pingora sends.
pub struct HealthCheckPlan {
    pub interval: Duration,
    check: HttpHealthCheck,
}

impl HealthCheckConfig {
    /// Checks the settings and prepares the probe: `GET path` with the `Host` header (the
    /// first upstream's `host:port` unless `host` is set), the timeouts and the TLS settings
    /// of the service's upstreams.
    pub fn compile(
        &self,
        first_upstream: &str,
        tls: &UpstreamTls,
    ) -> std::result::Result<HealthCheckPlan, String> {
        if self.interval.is_zero() || self.timeout.is_zero() {
            return Err("interval and timeout must be greater than zero".into());
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
            return Err("healthy_threshold and unhealthy_threshold must be at least 1".into());
        }
        let host = self.host.as_deref().unwrap_or(first_upstream);
        // Checked before Pingora builds its probe, which unwraps the header it adds.
        if http::HeaderValue::from_str(host).is_err() {
            return Err(format!("host {host:?} is not a valid Host header value"));
        }
        let mut check = HttpHealthCheck::new(host, tls.enabled);
        let invalid = |e: Box<Error>| format!("cannot build the health check request: {e}");
        let mut req = RequestHeader::build("GET", self.path.0.as_bytes(), None).map_err(invalid)?;
        req.insert_header("Host", host).map_err(invalid)?;
        req.insert_header("User-Agent", "breakwater-health-check")
            .map_err(invalid)?;
        check.req = req;
        let options = &mut check.peer_template.options;
        options.connection_timeout = Some(self.timeout);
        options.read_timeout = Some(self.timeout);
        options.total_connection_timeout = Some(self.timeout);
        if tls.enabled {
            check.peer_template.sni = tls.sni_for(host);
            tls.apply(&mut check.peer_template);
        }
        check.consecutive_success = self.healthy_threshold;
        check.consecutive_failure = self.unhealthy_threshold;
        check.validator = Some(Box::new(|resp| {
            if resp.status.is_success() {
                Ok(())
            } else {
                Error::e_explain(
                    ErrorType::CustomCode("health check status", resp.status.as_u16()),
                    "non-2xx health check response",
                )
            }
        }));
        Ok(HealthCheckPlan {
            interval: self.interval,
            check,
        })
    }
}

impl HealthCheckPlan {
    /// The check to hand to the load balancer, reporting to `upstreams`' state.
    pub(super) fn observe(self, service: &str, upstreams: &[Arc<Upstream>]) -> ObservedHealthCheck {
        ObservedHealthCheck {
            service: service.to_string(),
            inner: self.check,
            upstreams: upstreams.to_vec(),
        }
    }
}

/// Pingora's HTTP health check, observed so that results reach the upstream's state
/// (metrics now, the circuit breaker too) on every check, not only on a health flip.
pub(super) struct ObservedHealthCheck {
    service: String,
    inner: HttpHealthCheck,
    upstreams: Vec<Arc<Upstream>>,
}

impl ObservedHealthCheck {
    fn upstream(&self, target: &Backend) -> Option<&Arc<Upstream>> {
        let PingoraAddr::Inet(addr) = &target.addr else {
            return None;
        };
        self.upstreams.iter().find(|u| u.addr == *addr)
    }
}

#[async_trait]
impl HealthCheck for ObservedHealthCheck {
    async fn check(&self, target: &Backend) -> Result<()> {
        let result = self.inner.check(target).await;
        if let Some(upstream) = self.upstream(target) {
            // The upstream keeps its own verdict (Pingora's flips are not used) so that a
            // reloaded process can start from the verdict its predecessor reached.
            let passed = result.is_ok();
            upstream.observe_health(&self.service, passed, self.inner.health_threshold(passed));
        }
        result
    }

    fn health_threshold(&self, success: bool) -> usize {
        self.inner.health_threshold(success)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> HealthCheckConfig {
        serde_yaml::from_str(yaml).expect("health_check yaml")
    }

    fn plain() -> UpstreamTls {
        UpstreamTls {
            enabled: false,
            sni: None,
            verify: true,
        }
    }

    #[test]
    fn the_probe_asks_the_first_upstream_unless_a_host_is_set() {
        let plan = config("{path: /ready}")
            .compile("10.0.0.1:80", &plain())
            .unwrap();
        assert_eq!(plan.check.req.uri.path(), "/ready");
        assert_eq!(plan.check.req.headers["host"], "10.0.0.1:80");
        let plan = config("{host: api.internal}")
            .compile("10.0.0.1:80", &plain())
            .unwrap();
        assert_eq!(plan.check.req.headers["host"], "api.internal");
    }

    #[test]
    fn bad_settings_are_refused_when_compiled() {
        let refused = |yaml: &str, needle: &str| {
            let err = config(yaml).compile("10.0.0.1:80", &plain()).err().unwrap();
            assert!(err.contains(needle), "{yaml}: {err}");
        };
        refused("{interval: 0s}", "greater than zero");
        refused("{healthy_threshold: 0}", "at least 1");
        // Pingora would panic building its probe with this Host header.
        refused("{host: \"a\\u0001b\"}", "not a valid Host header value");
    }
}
