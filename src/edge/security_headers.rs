//! Security response headers: the top-level `security_headers:` section (which a service may
//! replace with its own), the header set prepared from it once at load, and applying it to
//! responses: headers the gateway adds unless the upstream set them, and headers that leak
//! implementation details removed.

use http::{HeaderName, HeaderValue};
use pingora::http::{PreparedHeaderName, ResponseHeader};
use serde::Deserialize;

/// `security_headers:`, top-level or per service. A service's section replaces the top-level
/// one as a whole; fields it leaves out take the defaults below, not the top-level values.
/// Any header value may be `""` to not send that header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityHeadersConfig {
    /// Add and remove the headers below at all. Default: true.
    pub enabled: bool,
    /// `X-Content-Type-Options`. Default: `nosniff`.
    pub content_type_options: String,
    /// `X-Frame-Options`. Default: `DENY`.
    pub frame_options: String,
    /// `Referrer-Policy`. Default: `no-referrer`.
    pub referrer_policy: String,
    /// `Strict-Transport-Security`, sent on TLS listeners only.
    /// Default: `max-age=31536000; includeSubDomains`.
    pub hsts: String,
    /// `Cross-Origin-Opener-Policy`. Default: `same-origin`.
    pub cross_origin_opener_policy: String,
    /// Headers removed from upstream responses. Default: `[Server, X-Powered-By]`.
    pub remove: Vec<String>,
}

impl Default for SecurityHeadersConfig {
    fn default() -> Self {
        SecurityHeadersConfig {
            enabled: true,
            content_type_options: "nosniff".into(),
            frame_options: "DENY".into(),
            referrer_policy: "no-referrer".into(),
            hsts: "max-age=31536000; includeSubDomains".into(),
            cross_origin_opener_policy: "same-origin".into(),
            remove: vec!["Server".into(), "X-Powered-By".into()],
        }
    }
}

/// The prepared header set; built once per service at load.
#[derive(Debug, Clone, Default)]
pub struct SecurityHeaders {
    /// Added unless the response has them.
    add: Vec<Added>,
    /// Added on TLS listeners only, unless the response has it.
    hsts: Option<Added>,
    remove: Vec<HeaderName>,
}

/// A header to add, its name prepared for insertion: Pingora keeps each name's case beside the
/// header map, and given a `HeaderName` it would parse and copy the name on every response.
/// The names are static, so putting one in a response's two maps copies no bytes and counts
/// no references.
#[derive(Debug, Clone)]
struct Added {
    name: &'static PreparedHeaderName,
    value: HeaderValue,
}

static X_CONTENT_TYPE_OPTIONS: PreparedHeaderName =
    PreparedHeaderName::from_static("x-content-type-options");
static X_FRAME_OPTIONS: PreparedHeaderName = PreparedHeaderName::from_static("x-frame-options");
static REFERRER_POLICY: PreparedHeaderName = PreparedHeaderName::from_static("referrer-policy");
static CROSS_ORIGIN_OPENER_POLICY: PreparedHeaderName =
    PreparedHeaderName::from_static("cross-origin-opener-policy");
static STRICT_TRANSPORT_SECURITY: PreparedHeaderName =
    PreparedHeaderName::from_static("strict-transport-security");

impl SecurityHeadersConfig {
    /// Compiles the header set: every value and name parsed once. The error names the field.
    pub fn compile(&self) -> Result<SecurityHeaders, String> {
        let cfg = self;
        if !cfg.enabled {
            return Ok(SecurityHeaders::default());
        }
        let value = |field: &str, v: &str| -> Result<Option<HeaderValue>, String> {
            if v.is_empty() {
                return Ok(None);
            }
            super::headers::value_for_process(v)
                .map(Some)
                .map_err(|_| format!("security_headers.{field}: {v:?} is not a valid header value"))
        };
        let mut add = Vec::new();
        for (field, name, v) in [
            (
                "content_type_options",
                &X_CONTENT_TYPE_OPTIONS,
                &cfg.content_type_options,
            ),
            ("frame_options", &X_FRAME_OPTIONS, &cfg.frame_options),
            ("referrer_policy", &REFERRER_POLICY, &cfg.referrer_policy),
            (
                "cross_origin_opener_policy",
                &CROSS_ORIGIN_OPENER_POLICY,
                &cfg.cross_origin_opener_policy,
            ),
        ] {
            if let Some(v) = value(field, v)? {
                add.push(Added { name, value: v });
            }
        }
        let hsts = value("hsts", &cfg.hsts)?.map(|value| Added {
            name: &STRICT_TRANSPORT_SECURITY,
            value,
        });
        let remove = cfg
            .remove
            .iter()
            .map(|name| {
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                    format!("security_headers.remove: {name:?} is not a valid header name")
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(SecurityHeaders { add, hsts, remove })
    }
}

impl SecurityHeaders {
    /// How many headers `apply` may add at most.
    pub fn added(&self) -> usize {
        self.add.len() + usize::from(self.hsts.is_some())
    }

    /// Removes the `remove` list, then adds each header the response does not already have
    /// (the upstream's own value wins); HSTS only when the client came over TLS, since
    /// browsers ignore it on plain HTTP and it must not pin a plain-HTTP-only host.
    pub fn apply(&self, resp: &mut ResponseHeader, tls: bool) {
        for name in &self.remove {
            resp.remove_header(name);
        }
        let hsts = self.hsts.as_ref().filter(|_| tls);
        for added in self.add.iter().chain(hsts) {
            // A valid name and value: inserting cannot fail.
            let _ = resp.insert_prepared_header_if_absent(added.name, added.value.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(headers: &[(&str, &str)]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (n, v) in headers {
            resp.append_header(n.to_string(), *v).unwrap();
        }
        resp
    }

    fn get<'a>(resp: &'a ResponseHeader, name: &str) -> Option<&'a str> {
        resp.headers.get(name).map(|v| v.to_str().unwrap())
    }

    #[test]
    fn defaults_add_the_headers_and_remove_leaky_ones() {
        let sh = SecurityHeadersConfig::default().compile().unwrap();
        let mut resp = response(&[
            ("Server", "nginx"),
            ("X-Powered-By", "Express"),
            ("Content-Type", "application/json"),
        ]);
        sh.apply(&mut resp, false);
        assert_eq!(get(&resp, "x-content-type-options"), Some("nosniff"));
        assert_eq!(get(&resp, "x-frame-options"), Some("DENY"));
        assert_eq!(get(&resp, "referrer-policy"), Some("no-referrer"));
        assert_eq!(
            get(&resp, "cross-origin-opener-policy"),
            Some("same-origin")
        );
        assert_eq!(
            get(&resp, "strict-transport-security"),
            None,
            "no HSTS on plain HTTP"
        );
        assert_eq!(get(&resp, "server"), None);
        assert_eq!(get(&resp, "x-powered-by"), None);
        assert_eq!(get(&resp, "content-type"), Some("application/json"));

        let mut resp = response(&[]);
        sh.apply(&mut resp, true);
        assert_eq!(
            get(&resp, "strict-transport-security"),
            Some("max-age=31536000; includeSubDomains")
        );
    }

    #[test]
    fn the_upstream_value_wins() {
        let sh = SecurityHeadersConfig::default().compile().unwrap();
        let mut resp = response(&[
            ("X-Frame-Options", "SAMEORIGIN"),
            ("Strict-Transport-Security", "max-age=60"),
        ]);
        sh.apply(&mut resp, true);
        assert_eq!(get(&resp, "x-frame-options"), Some("SAMEORIGIN"));
        assert_eq!(resp.headers.get_all("x-frame-options").iter().count(), 1);
        assert_eq!(get(&resp, "strict-transport-security"), Some("max-age=60"));
    }

    #[test]
    fn empty_values_and_disabled_send_nothing() {
        let cfg: SecurityHeadersConfig =
            serde_yaml::from_str("frame_options: \"\"\nhsts: \"\"\nremove: []").unwrap();
        let sh = cfg.compile().unwrap();
        let mut resp = response(&[("Server", "x")]);
        sh.apply(&mut resp, true);
        assert_eq!(get(&resp, "x-frame-options"), None);
        assert_eq!(get(&resp, "strict-transport-security"), None);
        assert_eq!(get(&resp, "server"), Some("x"));
        assert_eq!(get(&resp, "x-content-type-options"), Some("nosniff"));

        let cfg: SecurityHeadersConfig = serde_yaml::from_str("enabled: false").unwrap();
        let sh = cfg.compile().unwrap();
        let mut resp = response(&[("X-Powered-By", "Express")]);
        sh.apply(&mut resp, true);
        assert_eq!(resp.headers.len(), 1);
    }

    #[test]
    fn config_is_checked() {
        let cfg: SecurityHeadersConfig = serde_yaml::from_str("{}").unwrap();
        assert_eq!(cfg, SecurityHeadersConfig::default());
        assert!(serde_yaml::from_str::<SecurityHeadersConfig>("csp: x").is_err());
        let bad = SecurityHeadersConfig {
            referrer_policy: "a\nb".into(),
            ..Default::default()
        };
        assert!(bad.compile().unwrap_err().contains("referrer_policy"));
        let bad = SecurityHeadersConfig {
            remove: vec!["Bad Name".into()],
            ..Default::default()
        };
        assert!(bad.compile().unwrap_err().contains("remove"));
    }
}
