//! A minimal HTTP/1.1 GET for `jwks_url`: blocking at start-up, async for refetches, bounded
//! in size and time. Only plain `http://`: a JWKS is public, but over an untrusted network it
//! must come over TLS, which this client does not do yet.

use std::time::Duration;

/// Largest JWKS document accepted.
pub(super) const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// An `http://host[:port]/path` URL. Only plain HTTP: a JWKS is public, but over an untrusted
/// network it must come over TLS, which this client does not do yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HttpUrl {
    pub(super) raw: String,
    /// Without IPv6 brackets, for connecting.
    pub(super) host: String,
    pub(super) port: u16,
    /// As written, for the `Host` header.
    pub(super) authority: String,
    pub(super) path: String,
}

impl HttpUrl {
    pub(super) fn parse(url: &str) -> Result<HttpUrl, String> {
        let lower = url.to_ascii_lowercase();
        if lower.starts_with("https://") {
            return Err(format!(
                "{url}: fetching a JWKS over TLS (https://) is not supported yet; serve it over \
                 http:// on a trusted network, or use jwks_file"
            ));
        }
        if !lower.starts_with("http://") {
            return Err(format!("{url}: expected an http:// URL"));
        }
        let rest = &url["http://".len()..];
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('?') => (&rest[..i], format!("/{}", &rest[i..])),
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        if !path.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!("{url}: the path must be URL-encoded ASCII"));
        }
        if authority.contains('@') {
            return Err(format!("{url}: credentials in the URL are not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url}: unclosed IPv6 address"))?;
            let port = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{url}: bad port"))?,
                ),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:".contains(&b))
        {
            return Err(format!("{url}: invalid host"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| format!("{url}: invalid port {p:?}"))?,
            None => 80,
        };
        Ok(HttpUrl {
            raw: url.to_string(),
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            path,
        })
    }

    fn request(&self) -> Vec<u8> {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\
             User-Agent: breakwater\r\nConnection: close\r\n\r\n",
            self.path, self.authority
        )
        .into_bytes()
    }

    /// For start-up, before any runtime serves requests.
    pub(super) fn get_blocking(&self, timeout: Duration) -> Result<Vec<u8>, String> {
        use std::io::{Read, Write};
        use std::net::ToSocketAddrs;
        let addrs = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {}: {e}", self.host))?;
        let mut last_error = format!("{} resolves to no address", self.host);
        for addr in addrs {
            let mut stream = match std::net::TcpStream::connect_timeout(&addr, timeout) {
                Ok(s) => s,
                Err(e) => {
                    last_error = format!("cannot connect to {addr}: {e}");
                    continue;
                }
            };
            let io = |e: std::io::Error| format!("{addr}: {e}");
            stream.set_read_timeout(Some(timeout)).map_err(io)?;
            stream.set_write_timeout(Some(timeout)).map_err(io)?;
            stream.write_all(&self.request()).map_err(io)?;
            let mut buf = Vec::new();
            (&mut stream)
                .take(MAX_JWKS_BYTES as u64 + 16 * 1024)
                .read_to_end(&mut buf)
                .map_err(io)?;
            return parse_response(&buf);
        }
        Err(last_error)
    }

    pub(super) async fn get(&self, timeout: Duration) -> Result<Vec<u8>, String> {
        let exchange = async {
            let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
            let io = |e: std::io::Error| format!("{}:{}: {e}", self.host, self.port);
            let request = self.request();
            let mut sent = 0;
            while sent < request.len() {
                stream.writable().await.map_err(io)?;
                match stream.try_write(&request[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(io(e)),
                }
            }
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            loop {
                stream.readable().await.map_err(io)?;
                match stream.try_read(&mut chunk) {
                    Ok(0) => break,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        if buf.len() > MAX_JWKS_BYTES + 16 * 1024 {
                            return Err("response too large".to_string());
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(io(e)),
                }
            }
            parse_response(&buf)
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("no complete answer within {timeout:?}"))?
    }
}

/// The body of a complete `200` response read until the server closed the connection.
pub(super) fn parse_response(buf: &[u8]) -> Result<Vec<u8>, String> {
    let end = find(buf, b"\r\n\r\n").ok_or("incomplete HTTP response")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "invalid HTTP response head")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1."))
        .and_then(|l| l.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or("not an HTTP/1 response")?;
    if status != 200 {
        return Err(format!("answered HTTP {status}"));
    }
    let mut chunked = false;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "bad Content-Length")?);
        }
    }
    let body = &buf[end + 4..];
    let body = if chunked {
        dechunk(body)?
    } else if let Some(len) = length {
        body.get(..len).ok_or("truncated response body")?.to_vec()
    } else {
        body.to_vec()
    };
    if body.len() > MAX_JWKS_BYTES {
        return Err("JWKS larger than 1 MiB".into());
    }
    Ok(body)
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = find(body, b"\r\n").ok_or("truncated chunked body")?;
        let size_text = std::str::from_utf8(&body[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = body.get(..size).ok_or("truncated chunked body")?;
        out.extend_from_slice(chunk);
        body = body.get(size + 2..).ok_or("truncated chunked body")?;
    }
}

pub(super) fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
