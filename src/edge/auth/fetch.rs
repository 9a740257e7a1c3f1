//! Fetching a JWKS from `jwks_url`: over HTTPS with reqwest, whose TLS is native-tls, i.e. the
//! OpenSSL that Pingora links already. The certificate is verified against the system's roots,
//! or only against `jwks_ca_file` when it is set. Plain `http://` is refused unless the host is
//! loopback or the config opts in (`allow_insecure_jwks_url`): whoever can answer for the URL
//! can mint tokens.
//!
//! No redirects (a redirect could leave TLS or the host), no proxy from the environment, no
//! pooled connections (fetches are rare, and one client serves the start-up fetch and the
//! refetches on the proxy's runtime), a body of at most 1 MiB, and one timeout for the whole
//! exchange. Nothing a token says is ever fetched (`jku`, `x5u`).

use reqwest::{Certificate, Client, Url};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

/// Largest JWKS document accepted.
pub(super) const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// A checked `jwks_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct JwksUrl {
    pub(super) raw: String,
    url: Url,
}

impl JwksUrl {
    /// An `https://` URL, or an `http://` one to a loopback host or when `allow_insecure`.
    pub(super) fn parse(raw: &str, allow_insecure: bool) -> Result<JwksUrl, String> {
        let url = Url::parse(raw).map_err(|e| format!("{raw}: not a URL ({e})"))?;
        match url.scheme() {
            "https" => {}
            "http" if allow_insecure || is_loopback(&url) => {}
            "http" => {
                return Err(format!(
                    "{raw}: a JWKS over plain http:// can be swapped by anyone on the path, who \
                     could then mint tokens; use https:// (with jwks_ca_file for a private CA), \
                     or set allow_insecure_jwks_url: true on a network you trust"
                ))
            }
            other => return Err(format!("{raw}: expected an https:// URL, not {other}://")),
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(format!("{raw}: the URL has no host"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!("{raw}: credentials in the URL are not supported"));
        }
        Ok(JwksUrl {
            raw: raw.to_string(),
            url,
        })
    }
}

fn is_loopback(url: &Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Fetches one JWKS URL.
pub(super) struct Fetcher {
    url: JwksUrl,
    client: Client,
}

impl Fetcher {
    /// A client for `url`, trusting only the certificates in `ca_file` when given.
    pub(super) fn new(
        url: JwksUrl,
        ca_file: Option<&Path>,
        timeout: Duration,
    ) -> Result<Fetcher, String> {
        let mut builder = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .pool_max_idle_per_host(0)
            .connect_timeout(timeout)
            .timeout(timeout)
            .min_tls_version(reqwest::tls::Version::TLS_1_2)
            .https_only(url.url.scheme() == "https")
            .user_agent(concat!("breakwater/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("jwks_ca_file: cannot read {}: {e}", path.display()))?;
            let certs = Certificate::from_pem_bundle(&pem)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| {
                    format!("jwks_ca_file {}: no PEM certificate in it", path.display())
                })?;
            builder = builder.tls_built_in_root_certs(false);
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder.build().map_err(|e| {
            format!(
                "jwks_url {}: cannot set up the client: {}",
                url.raw,
                chain(&e)
            )
        })?;
        Ok(Fetcher { url, client })
    }

    pub(super) fn url(&self) -> &str {
        &self.url.raw
    }

    /// The body of a `200` answer, at most [`MAX_JWKS_BYTES`].
    pub(super) async fn get(&self) -> Result<Vec<u8>, String> {
        let mut response = self
            .client
            .get(self.url.url.clone())
            .header(
                http::header::ACCEPT,
                "application/jwk-set+json, application/json",
            )
            .send()
            .await
            .map_err(|e| chain(&e))?;
        let status = response.status();
        if status != reqwest::StatusCode::OK {
            return Err(format!("answered HTTP {}", status.as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err("JWKS larger than 1 MiB".into());
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(|e| chain(&e))? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err("JWKS larger than 1 MiB".into());
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// [`Fetcher::get`] for callers outside any runtime or inside one they must not block
    /// (start-up, and the old process vetting a reload): on a thread of its own, with a
    /// runtime of its own.
    pub(super) fn get_blocking(&self) -> Result<Vec<u8>, String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("cannot start a runtime to fetch it: {e}"))?
                        .block_on(self.get())
                })
                .join()
                .unwrap_or_else(|_| Err("the fetch panicked".into()))
        })
    }
}

/// An error with its causes: reqwest's own message rarely says what failed (TLS, DNS, ...).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let _ = write!(text, ": {cause}");
        source = cause.source();
    }
    text
}
