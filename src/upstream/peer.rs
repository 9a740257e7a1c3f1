//! How the gateway connects to a service's upstreams: the `timeouts:` section, TLS with its
//! SNI and certificate checks, the peer prepared once per upstream, and the copy an attempt
//! connects with, its timeouts capped by what is left of the request's total budget.

use pingora::prelude::HttpPeer;
use pingora::{Error, ErrorType, Result};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// `timeouts:` of a service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    /// TCP (and TLS) connect. Default: 1s.
    #[serde(
        default = "default_connect_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub connect: Duration,
    /// Longest wait for each read from the upstream (the response header, then each body
    /// chunk). Default: 30s.
    #[serde(
        default = "default_read_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub read: Duration,
    /// Longest wait for each write to the upstream. Default: 30s.
    #[serde(
        default = "default_read_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub write: Duration,
    /// Budget counted from the request's arrival: each attempt's connect, read and write
    /// timeouts are capped at the time left when it starts, and no retry starts once it
    /// is spent. Default: none.
    #[serde(default, deserialize_with = "crate::values::de_opt_duration")]
    pub total: Option<Duration>,
    /// How long an idle upstream connection is kept for reuse. Default: 60s.
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub idle: Duration,
    /// How long an upgraded connection (WebSocket and other `Upgrade` tunnels) may carry no
    /// byte in either direction before both sides are closed. It replaces the read and write
    /// timeouts for the whole exchange of an upgrade request, the handshake included, and is
    /// not capped by `total`. Default: 1h.
    #[serde(
        default = "default_tunnel_idle_timeout",
        deserialize_with = "crate::values::de_duration"
    )]
    pub tunnel_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: default_connect_timeout(),
            read: default_read_timeout(),
            write: default_read_timeout(),
            total: None,
            idle: default_idle_timeout(),
            tunnel_idle: default_tunnel_idle_timeout(),
        }
    }
}

impl Timeouts {
    /// Connect and read timeouts of zero would fail every attempt at once, a tunnel idle
    /// timeout of zero every tunnel.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.connect.is_zero() || self.read.is_zero() {
            return Err("connect and read timeouts must be greater than zero".into());
        }
        if self.tunnel_idle.is_zero() {
            return Err("tunnel_idle must be greater than zero".into());
        }
        Ok(())
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
/// An hour: far above the ping interval of WebSocket libraries and browsers' own idle
/// limits, so a quiet but live session is never cut, while a tunnel whose client vanished
/// without a FIN (a laptop lid closed, a mobile network gone) is reclaimed the same hour.
fn default_tunnel_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}

/// A service's `tls`, `sni` and `tls_verify`: whether and how its upstreams speak TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    pub enabled: bool,
    /// SNI and certificate name; `None`: the upstream's host.
    pub sni: Option<String>,
    pub verify: bool,
}

impl UpstreamTls {
    /// The SNI for an upstream written `host_port`.
    pub fn sni_for(&self, host_port: &str) -> String {
        self.sni.clone().unwrap_or_else(|| upstream_host(host_port))
    }

    /// Sets the certificate checks of a TLS peer.
    pub fn apply(&self, peer: &mut HttpPeer) {
        if self.enabled {
            peer.options.verify_cert = self.verify;
            peer.options.verify_hostname = self.verify;
        }
    }
}

/// The host part of an upstream's `host:port`, used as SNI by default.
pub fn upstream_host(name: &str) -> String {
    name.rsplit_once(':')
        .map_or(name, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string()
}

/// The peer of one upstream, prepared once: address, TLS and the configured timeouts.
pub fn prepare(addr: SocketAddr, name: &str, tls: &UpstreamTls, t: &Timeouts) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, tls.enabled, tls.sni_for(name));
    peer.options.connection_timeout = Some(t.connect);
    peer.options.total_connection_timeout = Some(t.connect);
    peer.options.read_timeout = Some(t.read);
    peer.options.write_timeout = Some(t.write);
    peer.options.idle_timeout = Some(t.idle);
    tls.apply(&mut peer);
    peer
}

/// The peer an attempt connects with: `prepared`, its connect, read and write timeouts capped
/// at what is left until `deadline` (the request's `timeouts.total`). An error when nothing
/// is left.
pub fn for_attempt(
    prepared: &HttpPeer,
    t: &Timeouts,
    deadline: Option<Instant>,
) -> Result<HttpPeer> {
    let mut peer = prepared.clone();
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Error::e_explain(
                ErrorType::ConnectTimedout,
                "total timeout spent before connecting",
            );
        }
        let o = &mut peer.options;
        o.connection_timeout = Some(t.connect.min(left));
        o.total_connection_timeout = Some(t.connect.min(left));
        o.read_timeout = Some(t.read.min(left));
        o.write_timeout = Some(t.write.min(left));
    }
    Ok(peer)
}

/// Turns an attempt's peer into one for an upgrade request (`Upgrade` with
/// `Connection: upgrade`): Pingora reads and writes the upgraded bytes with the timeouts the
/// connection was opened with, so they must already be `tunnel_idle`, or a quiet WebSocket
/// would be cut after `timeouts.read` (and after `total`). The connect timeout keeps its cap.
pub fn for_tunnel(peer: &mut HttpPeer, t: &Timeouts) {
    peer.options.read_timeout = Some(t.tunnel_idle);
    peer.options.write_timeout = Some(t.tunnel_idle);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sni_defaults_to_upstream_host() {
        assert_eq!(upstream_host("api.internal:443"), "api.internal");
        assert_eq!(upstream_host("[::1]:443"), "::1");
    }
}
