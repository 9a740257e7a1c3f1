//! How the gateway connects to a service's upstreams: the `timeouts:` section, TLS with its
//! SNI and certificate checks, the peer prepared once per upstream, and the copy an attempt
//! connects with, its timeouts capped by what is left of the request's total budget, and the
//! `protocol` the gateway speaks to the upstreams (HTTP/1.1, h2 over TLS, h2c, gRPC).

use crate::edge::headers::HeaderNameCase;
use pingora::prelude::HttpPeer;
use pingora::protocols::ALPN;
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
    /// How long an idle upstream connection may wait in the pool and still be reused (checked
    /// when it is taken, not watched meanwhile). Default: 60s.
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

/// A service's `protocol`: what the gateway speaks to its upstreams, whatever the client spoke.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 (over TLS with `tls: true`).
    #[default]
    Http1,
    /// HTTP/2 over TLS, negotiated with ALPN (an upstream that picks HTTP/1.1 gets HTTP/1.1).
    H2,
    /// HTTP/2 with prior knowledge on a plain connection.
    H2c,
    /// gRPC: HTTP/2 over TLS with `tls: true`, h2c without; gateway answers in gRPC's form,
    /// `grpc-status` judged by the breaker, `grpc-timeout` capped.
    Grpc,
}

/// Streams one upstream HTTP/2 connection carries at once before another is opened.
const MAX_H2_STREAMS: usize = 100;

impl Protocol {
    /// `h2` needs TLS to negotiate, `h2c` has none.
    pub fn check(self, tls: bool) -> std::result::Result<(), String> {
        match (self, tls) {
            (Protocol::H2, false) => {
                Err("protocol h2 needs tls: true (use h2c for HTTP/2 without TLS)".into())
            }
            (Protocol::H2c, true) => {
                Err("protocol h2c is HTTP/2 without TLS: set tls: false, or use h2".into())
            }
            _ => Ok(()),
        }
    }

    /// Sets what a peer offers: HTTP/2 through ALPN on TLS, or with prior knowledge on a
    /// plain connection (Pingora speaks h2c when a plain peer's lowest version is 2).
    pub fn apply(self, peer: &mut HttpPeer) {
        if self != Protocol::Http1 {
            peer.options.alpn = ALPN::H2;
            peer.options.max_h2_streams = MAX_H2_STREAMS;
        }
    }

    /// Whether the gateway speaks HTTP/2 to the upstreams.
    pub fn is_h2(self) -> bool {
        self != Protocol::Http1
    }
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

/// The peer of one upstream, prepared once: address, TLS, protocol and the configured timeouts.
pub fn prepare(
    addr: SocketAddr,
    name: &str,
    tls: &UpstreamTls,
    protocol: Protocol,
    t: &Timeouts,
    name_case: HeaderNameCase,
) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, tls.enabled, tls.sni_for(name));
    // Normalized names need no record of the upstream's spelling: the response header is
    // built without one rather than built with one that the response filter then drops.
    peer.options.keep_response_header_case = name_case.keeps_spelling();
    peer.options.connection_timeout = Some(t.connect);
    peer.options.total_connection_timeout = Some(t.connect);
    peer.options.read_timeout = Some(t.read);
    peer.options.write_timeout = Some(t.write);
    peer.options.idle_timeout = Some(t.idle);
    tls.apply(&mut peer);
    protocol.apply(&mut peer);
    peer
}

/// The peer an attempt started at `now` connects with: `prepared`, its connect, read and write
/// timeouts capped at what is left until `deadline` (the request's `timeouts.total`). An error
/// when nothing is left. Boxed here, as Pingora takes it: the clone lands in its box instead
/// of being moved into one.
pub fn for_attempt(
    prepared: &HttpPeer,
    t: &Timeouts,
    deadline: Option<Instant>,
    now: Instant,
) -> Result<Box<HttpPeer>> {
    let mut peer = Box::new(prepared.clone());
    if let Some(deadline) = deadline {
        let left = deadline.saturating_duration_since(now);
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

    #[test]
    fn h2_needs_tls_and_h2c_refuses_it() {
        assert!(Protocol::H2.check(false).unwrap_err().contains("tls: true"));
        assert!(Protocol::H2c
            .check(true)
            .unwrap_err()
            .contains("tls: false"));
        for ok in [
            (Protocol::H2, true),
            (Protocol::H2c, false),
            (Protocol::Http1, true),
            (Protocol::Grpc, true),
            (Protocol::Grpc, false),
        ] {
            assert!(ok.0.check(ok.1).is_ok(), "{ok:?}");
        }
    }

    fn tls(enabled: bool) -> UpstreamTls {
        UpstreamTls {
            enabled,
            sni: None,
            verify: true,
        }
    }

    #[test]
    fn http2_peers_offer_h2_and_http1_peers_do_not() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t = Timeouts::default();
        let alpn = |tls_on, protocol| {
            let normalize = HeaderNameCase::Normalize;
            prepare(addr, "a:1", &tls(tls_on), protocol, &t, normalize)
                .options
                .alpn
        };
        assert_eq!(alpn(false, Protocol::H2c), ALPN::H2);
        assert_eq!(alpn(true, Protocol::Grpc), ALPN::H2);
        assert_eq!(alpn(false, Protocol::Http1), ALPN::H1);
    }

    #[test]
    fn upstream_responses_keep_name_spelling_only_under_preserve() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let t = Timeouts::default();
        let keeps = |case| {
            prepare(addr, "a:1", &tls(false), Protocol::Http1, &t, case)
                .options
                .keep_response_header_case
        };
        assert!(keeps(HeaderNameCase::Preserve));
        assert!(!keeps(HeaderNameCase::Normalize));
    }
}
