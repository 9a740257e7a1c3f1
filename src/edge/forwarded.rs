//! Who the client is, and what the upstream is told about it. Owns `server.trusted_proxies`,
//! the client address (worked out once per request), and the forwarding headers.
//!
//! Forwarding headers are claims, and a claim is only as good as whoever made it. From a peer
//! that is not a trusted proxy, every forwarding header is removed ([`CLIENT_CLAIMS`]) and the
//! gateway sets its own from what it saw; the client is the TCP peer. From a trusted proxy,
//! they are kept, `X-Forwarded-For` and `Forwarded` get the peer appended, and the client is
//! the right-most `X-Forwarded-For` address that is not a trusted proxy (each proxy appends
//! the address it saw, so everything left of the first untrusted hop is the client's own
//! claim).

use crate::values::FieldError;
use http::{HeaderName, HeaderValue};
use ipnet::IpNet;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::{ErrorType, OrErr, Result};
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};

/// Headers that say who the client is or what it asked for, as set by proxies in front: kept
/// only from a trusted proxy. Some servers act on them (`X-Original-URL` replaces the path in
/// some frameworks, `X-Forwarded-Prefix` builds redirects), so from anyone else they go.
pub const CLIENT_CLAIMS: &[&str] = &[
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-uri",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-forwarded-protocol",
    "x-original-forwarded-for",
    "x-real-ip",
    "x-client-ip",
    "x-cluster-client-ip",
    "true-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-original-host",
    "x-host",
    "x-url-scheme",
    "front-end-https",
];

/// Whether `name` (lower-case) is one of [`CLIENT_CLAIMS`].
pub fn is_client_claim(name: &str) -> bool {
    CLIENT_CLAIMS.contains(&name)
}

/// Most `X-Forwarded-For` entries looked at, right to left: a chain of trusted proxies is
/// short, and a client-made list of trusted addresses must not cost more than this.
const MAX_HOPS: usize = 32;

/// One `server.trusted_proxies` entry: a CIDR block (`10.0.0.0/8`, `2001:db8::/32`) or one
/// address (`192.0.2.7`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyNet(pub IpNet);

impl<'de> Deserialize<'de> for ProxyNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let s = s.trim();
        let net = s
            .parse::<IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| {
                de::Error::custom(format!(
                    "invalid trusted proxy {s:?}: expected an address or a CIDR block, e.g. \
                     10.0.0.0/8 or 192.0.2.7"
                ))
            })?;
        Ok(ProxyNet(net))
    }
}

/// The compiled `server.trusted_proxies`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Refuses a block that trusts every address: the client could then name any address.
    pub fn compile(nets: &[ProxyNet]) -> Result<TrustedProxies, FieldError> {
        if let Some(all) = nets.iter().find(|n| n.0.prefix_len() == 0) {
            return Err(FieldError::new(
                ".trusted_proxies",
                format!(
                    "{} trusts every address, so any client could say who it is; list the \
                     proxies' own addresses",
                    all.0
                ),
            )
            .at_value(all.0.to_string()));
        }
        // IPv4-mapped IPv6 addresses are matched as IPv4 (see `canonical`).
        Ok(TrustedProxies(nets.iter().map(|n| n.0.trunc()).collect()))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }
}

/// Who the client is, worked out once per request, or once per connection when the peer is
/// not a trusted proxy (the client is then the peer, the same for every request on it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's address as text, empty when unknown (a Unix socket): what `key: ip`
    /// rate limits, `hash_key: ip` and the access log use, and the value of `X-Real-IP` (and
    /// of `X-Forwarded-For` from an untrusted peer), hence a header value, shared, not copied.
    addr: HeaderValue,
    /// The TCP peer is a trusted proxy, so its forwarding headers are kept and appended to.
    pub via_trusted_proxy: bool,
    /// The TCP peer's address, for `X-Forwarded-For` and `Forwarded`.
    peer: Option<IpAddr>,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            addr: HeaderValue::from_static(""),
            via_trusted_proxy: false,
            peer: None,
        }
    }
}

impl Client {
    /// The client of the request on `session`. The connection's earlier requests may have
    /// worked it out already.
    pub fn of(session: &Session, trusted: &TrustedProxies, conn: &mut ConnectionFacts) -> Client {
        if let Some(client) = &conn.client {
            return client.clone();
        }
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let client = Client::from_peer(peer, session.req_header(), trusted);
        if !client.via_trusted_proxy {
            conn.client = Some(client.clone());
        }
        client
    }

    fn from_peer(peer: Option<IpAddr>, req: &RequestHeader, trusted: &TrustedProxies) -> Client {
        let peer = peer.map(canonical);
        let via_trusted_proxy = peer.is_some_and(|p| trusted.contains(p));
        let client = if via_trusted_proxy {
            peer.map(|p| rightmost_untrusted(p, req, trusted))
        } else {
            peer
        };
        Client {
            addr: client.map_or_else(|| HeaderValue::from_static(""), ip_value),
            via_trusted_proxy,
            peer,
        }
    }

    /// The client's address as text, empty when unknown.
    pub fn addr(&self) -> &str {
        // Made from an address's text: always visible ASCII.
        self.addr.to_str().unwrap_or_default()
    }
}

/// What stays the same for every request on one client connection, carried from request to
/// request (Pingora's connection context) so that it is worked out once: the client when the
/// peer is not a trusted proxy (behind one, each request's `X-Forwarded-For` says who it is),
/// and the last `Forwarded` element made, with the `Host` it was made for. It is kept while
/// the connection waits idle, so it holds copies, never a slice of a request's buffer (a
/// header value parsed from a request would keep that whole buffer alive).
#[derive(Debug, Default)]
pub struct ConnectionFacts {
    client: Option<Client>,
    forwarded: Option<(Box<[u8]>, HeaderValue)>,
}

/// Walks `X-Forwarded-For` right to left from a trusted `peer`: the first address that is
/// not a trusted proxy, else the left-most one. An entry that is not an address ends the walk
/// at the last address seen: nothing left of it can be told apart from the client's claims.
fn rightmost_untrusted(peer: IpAddr, req: &RequestHeader, trusted: &TrustedProxies) -> IpAddr {
    let mut client = peer;
    let entries = req
        .headers
        .get_all("x-forwarded-for")
        .iter()
        .rev()
        .flat_map(|line| line.as_bytes().rsplit(|&b| b == b','));
    for entry in entries.take(MAX_HOPS) {
        if !trusted.contains(client) {
            break;
        }
        match parse_entry(entry) {
            Some(ip) => client = ip,
            None => break,
        }
    }
    client
}

/// An `X-Forwarded-For` entry: an address, optionally with a port (`192.0.2.1:4711`,
/// `[2001:db8::1]:4711`).
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    let text = text.trim_matches('"');
    let ip = match text.parse::<IpAddr>() {
        Ok(ip) => ip,
        Err(_) => match text.parse::<SocketAddr>() {
            Ok(sa) => sa.ip(),
            Err(_) => text.strip_prefix('[')?.strip_suffix(']')?.parse().ok()?,
        },
    };
    Some(canonical(ip))
}

/// `ip` as a header value (text, as `Display` writes it).
fn ip_value(ip: IpAddr) -> HeaderValue {
    // Digits, dots, colons and hex digits: always a valid value.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(ip_text(ip)))
        .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// `ip` as text, as `Display` writes it; IPv4 without the formatting machinery, which cost
/// more than the rest of working out the client.
fn ip_text(ip: IpAddr) -> String {
    let IpAddr::V4(v4) = ip else {
        return ip.to_string();
    };
    let mut text = String::with_capacity(15);
    push_ipv4(&mut text, v4);
    text
}

fn push_ipv4(text: &mut String, v4: std::net::Ipv4Addr) {
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text.push('.');
        }
        if octet >= 100 {
            text.push(char::from(b'0' + octet / 100));
        }
        if octet >= 10 {
            text.push(char::from(b'0' + octet / 10 % 10));
        }
        text.push(char::from(b'0' + octet % 10));
    }
}

/// IPv4-mapped IPv6 (`::ffff:192.0.2.1`) as IPv4, so one address has one spelling.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Whether the client connected over TLS.
pub fn is_tls(session: &Session) -> bool {
    session.digest().is_some_and(|d| d.ssl_digest.is_some())
}

/// The forwarding headers' names, prepared for insertion (Pingora keeps each name's case
/// beside the header map, and given the name as bytes or a `HeaderName` it would parse and copy
/// it on every request); `.name()` is the `HeaderName` to look them up by.
mod wire {
    use pingora::http::PreparedHeaderName;
    pub static X_FORWARDED_FOR: PreparedHeaderName =
        PreparedHeaderName::from_static("x-forwarded-for");
    pub static X_FORWARDED_PROTO: PreparedHeaderName =
        PreparedHeaderName::from_static("x-forwarded-proto");
    pub static X_FORWARDED_HOST: PreparedHeaderName =
        PreparedHeaderName::from_static("x-forwarded-host");
    pub static X_FORWARDED_PORT: PreparedHeaderName =
        PreparedHeaderName::from_static("x-forwarded-port");
    pub static X_REAL_IP: PreparedHeaderName = PreparedHeaderName::from_static("x-real-ip");
    pub static FORWARDED: PreparedHeaderName = PreparedHeaderName::from_static("forwarded");
}

/// `X-Forwarded-Port` of the last listener port seen on this thread: a listener's port is
/// the same on every request, so its header value is made once.
fn port_value(port: u16) -> HeaderValue {
    thread_local! {
        static LAST: std::cell::RefCell<Option<(u16, HeaderValue)>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with_borrow_mut(|last| match last {
        Some((p, value)) if *p == port => value.clone(),
        _ => {
            let value = HeaderValue::from(port);
            *last = Some((port, value.clone()));
            value
        }
    })
}

/// Sets the forwarding headers of the upstream request. A client's own claims were removed
/// when its request arrived (`edge::headers`); what a trusted proxy sent is kept and
/// appended to.
pub fn set_headers(
    session: &Session,
    client: &Client,
    conn: &mut ConnectionFacts,
    upstream_request: &mut RequestHeader,
) -> Result<()> {
    let trusted = client.via_trusted_proxy;
    // What a trusted proxy sent before; nothing from anyone else (removed on arrival).
    let prior = |req: &RequestHeader, name: &HeaderName| {
        if !trusted {
            return None;
        }
        req.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };

    // Unless the peer is a trusted proxy, the client is the peer: one value for both headers.
    let real_ip = client.addr.clone();
    // The trusted proxy's own address, appended to what it sent (an untrusted peer's is
    // `real_ip`, the client's).
    let peer_text = || client.peer.map(ip_text).unwrap_or_default();
    let xff = match prior(upstream_request, wire::X_FORWARDED_FOR.name()) {
        Some(prior) => {
            let peer = peer_text();
            HeaderValue::try_from(format!("{prior}, {peer}"))
                .explain_err(ErrorType::InvalidHTTPHeader, |_| "X-Forwarded-For")?
        }
        None if trusted => HeaderValue::try_from(peer_text())
            .explain_err(ErrorType::InvalidHTTPHeader, |_| "X-Forwarded-For")?,
        None => real_ip.clone(),
    };
    upstream_request.insert_prepared_header(&wire::X_FORWARDED_FOR, xff)?;
    upstream_request.insert_prepared_header(&wire::X_REAL_IP, real_ip)?;

    let tls = is_tls(session);
    let proto = if tls { "https" } else { "http" };
    let proto_value = HeaderValue::from_static(proto);
    let host = session.req_header().headers.get(http::header::HOST);
    let keep = |req: &RequestHeader, name: &HeaderName| trusted && req.headers.contains_key(name);
    if !keep(upstream_request, wire::X_FORWARDED_PROTO.name()) {
        upstream_request.insert_prepared_header(&wire::X_FORWARDED_PROTO, proto_value)?;
    }
    if let (false, Some(host)) = (keep(upstream_request, wire::X_FORWARDED_HOST.name()), host) {
        upstream_request.insert_prepared_header(&wire::X_FORWARDED_HOST, host.clone())?;
    }
    if !keep(upstream_request, wire::X_FORWARDED_PORT.name()) {
        if let Some(port) = session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.port())
        {
            upstream_request.insert_prepared_header(&wire::X_FORWARDED_PORT, port_value(port))?;
        }
    }

    let forwarded = match prior(upstream_request, wire::FORWARDED.name()) {
        Some(prior) => {
            let element = forwarded_element(client.peer, host, proto);
            HeaderValue::try_from(format!("{prior}, {element}"))
                .explain_err(ErrorType::InvalidHTTPHeader, |_| "Forwarded")?
        }
        None => own_forwarded_element(conn, client.peer, host, proto)?,
    };
    upstream_request.insert_prepared_header(&wire::FORWARDED, forwarded)?;
    Ok(())
}

/// The `Forwarded` element for a request that arrived with none: the same for every request
/// on a connection that names the same `Host` (peer and scheme do not change), so the last
/// one made is kept with the connection.
fn own_forwarded_element(
    conn: &mut ConnectionFacts,
    peer: Option<IpAddr>,
    host: Option<&HeaderValue>,
    proto: &str,
) -> Result<HeaderValue> {
    let host_bytes = host.map_or(&b""[..], HeaderValue::as_bytes);
    if let Some((for_host, element)) = &conn.forwarded {
        if **for_host == *host_bytes {
            return Ok(element.clone());
        }
    }
    let element = HeaderValue::try_from(forwarded_element(peer, host, proto))
        .explain_err(ErrorType::InvalidHTTPHeader, |_| "Forwarded")?;
    conn.forwarded = Some((host_bytes.into(), element.clone()));
    Ok(element)
}

/// One RFC 7239 element: `for=192.0.2.1;host="api.example.com";proto=https`.
fn forwarded_element(peer: Option<IpAddr>, host: Option<&HeaderValue>, proto: &str) -> String {
    let mut element = match peer {
        Some(IpAddr::V4(ip)) => {
            let mut element = String::with_capacity(64);
            element.push_str("for=");
            push_ipv4(&mut element, ip);
            element
        }
        Some(IpAddr::V6(ip)) => format!("for=\"[{ip}]\""),
        None => "for=unknown".to_string(),
    };
    // A host a quoted-string cannot carry as it is is left out rather than escaped.
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        if !host.is_empty() && !host.contains(['"', '\\']) {
            element.push_str(";host=\"");
            element.push_str(host);
            element.push('"');
        }
    }
    element.push_str(";proto=");
    element.push_str(proto);
    element
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "127.0.0.1",
            "192.0.2.255",
            "255.255.255.255",
            "2001:db8::1",
            "::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
        for n in [0u32, 1, 0x0a0b0c0d, 0x7f000001, 0xc0a80164, u32::MAX] {
            let ip = IpAddr::V4(n.into());
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    fn trusted(nets: &[&str]) -> TrustedProxies {
        let nets: Vec<ProxyNet> = nets
            .iter()
            .map(|n| serde_yaml::from_str(&format!("\"{n}\"")).unwrap())
            .collect();
        TrustedProxies::compile(&nets).unwrap()
    }

    fn req(xff: &[&str]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for line in xff {
            req.append_header("x-forwarded-for", *line).unwrap();
        }
        req
    }

    fn client(peer: &str, xff: &[&str], nets: &[&str]) -> Client {
        Client::from_peer(Some(peer.parse().unwrap()), &req(xff), &trusted(nets))
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let c = client("203.0.113.9", &["6.6.6.6"], &[]);
        assert_eq!(c.addr(), "203.0.113.9");
        assert!(!c.via_trusted_proxy);
        let c = client("203.0.113.9", &["6.6.6.6"], &["10.0.0.0/8"]);
        assert_eq!(c.addr(), "203.0.113.9");
    }

    #[test]
    fn behind_trusted_proxies_the_client_is_the_rightmost_untrusted_address() {
        let nets = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"];
        // The client forged 6.6.6.6; the proxy appended what it saw.
        assert_eq!(
            client("10.0.0.1", &["6.6.6.6, 198.51.100.4"], &nets).addr(),
            "198.51.100.4"
        );
        // Two proxies, over two header lines, one of them by address.
        assert_eq!(
            client("10.0.0.1", &["6.6.6.6, 198.51.100.4", "192.0.2.7"], &nets).addr(),
            "198.51.100.4"
        );
        // Ports, brackets, IPv6 and IPv4-mapped addresses.
        assert_eq!(
            client("10.0.0.1", &["[2001:db9::1]:443"], &nets).addr(),
            "2001:db9::1"
        );
        assert_eq!(
            client("10.0.0.1", &["198.51.100.4:80"], &nets).addr(),
            "198.51.100.4"
        );
        assert_eq!(
            client("::ffff:10.0.0.1", &["::ffff:198.51.100.4"], &nets).addr(),
            "198.51.100.4"
        );
        // Only trusted addresses: the left-most one.
        assert_eq!(
            client("10.0.0.1", &["10.1.1.1, 10.2.2.2"], &nets).addr(),
            "10.1.1.1"
        );
        // No header: the proxy itself.
        assert_eq!(client("10.0.0.1", &[], &nets).addr(), "10.0.0.1");
        // Garbage stops the walk at the last address seen.
        assert_eq!(
            client("10.0.0.1", &["6.6.6.6, garbage, 10.2.2.2"], &nets).addr(),
            "10.2.2.2"
        );
        assert_eq!(client("10.0.0.1", &[""], &nets).addr(), "10.0.0.1");
        // A forged chain of trusted addresses costs a bounded walk.
        let long = vec!["10.9.9.9"; 1000].join(",");
        assert_eq!(client("10.0.0.1", &[&long], &nets).addr(), "10.9.9.9");
    }

    #[test]
    fn trusting_everyone_is_refused() {
        let all: ProxyNet = serde_yaml::from_str("\"0.0.0.0/0\"").unwrap();
        assert!(TrustedProxies::compile(&[all]).is_err());
        assert!(serde_yaml::from_str::<ProxyNet>("\"10.0.0.0/33\"").is_err());
        assert!(serde_yaml::from_str::<ProxyNet>("\"proxy.local\"").is_err());
    }

    #[test]
    fn forwarded_elements() {
        let host = HeaderValue::from_static("api.example:8443");
        assert_eq!(
            forwarded_element(Some("192.0.2.1".parse().unwrap()), Some(&host), "https"),
            "for=192.0.2.1;host=\"api.example:8443\";proto=https"
        );
        assert_eq!(
            forwarded_element(Some("2001:db8::1".parse().unwrap()), None, "http"),
            "for=\"[2001:db8::1]\";proto=http"
        );
        let odd = HeaderValue::from_static("a\"b");
        assert_eq!(
            forwarded_element(None, Some(&odd), "http"),
            "for=unknown;proto=http"
        );
    }
}
