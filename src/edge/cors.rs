//! CORS for a service: its `cors:` config section, the policy compiled from it once at load,
//! preflight requests answered by the gateway itself (never forwarded), and the
//! `Access-Control-*` headers on actual responses. Where a service has `cors:`, the gateway is
//! the only authority: upstream `Access-Control-Allow-*` headers are replaced.

use http::{header, HeaderName, HeaderValue, Method};
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;
use std::time::Duration;

/// A service's `cors:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorsConfig {
    /// Origins allowed to call the service: exact (`https://app.example.com`, with `:port`
    /// when not the default), any subdomain (`https://*.example.com`, which does not match
    /// `https://example.com` itself), or `*` for any origin (not with `allow_credentials`).
    /// Required, at least one.
    pub allowed_origins: Vec<String>,
    /// Methods a preflight may ask for. Default: `[GET, HEAD, POST]`.
    #[serde(default = "default_methods")]
    pub allowed_methods: Vec<String>,
    /// Request headers a preflight may ask for (case-insensitive). Default: none.
    #[serde(default)]
    pub allowed_headers: Vec<String>,
    /// Response headers the browser lets scripts read (`Access-Control-Expose-Headers`).
    /// Default: none.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// Allow cookies and `Authorization` (`Access-Control-Allow-Credentials: true`).
    /// Default: false.
    #[serde(default)]
    pub allow_credentials: bool,
    /// How long a browser may cache a preflight answer (`Access-Control-Max-Age`, whole
    /// seconds; `0s` leaves it to the browser). Default: 10m.
    #[serde(
        default = "default_max_age",
        deserialize_with = "crate::values::de_duration"
    )]
    pub max_age: Duration,
}

fn default_methods() -> Vec<String> {
    vec!["GET".into(), "HEAD".into(), "POST".into()]
}

fn default_max_age() -> Duration {
    Duration::from_secs(600)
}

/// What to do with a request, as far as CORS preflight goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preflight {
    /// Not a preflight (not `OPTIONS` with `Origin` and `Access-Control-Request-Method`):
    /// handle it as any request.
    NotCors,
    /// Answer `204` with these headers, without calling the upstream.
    Allowed(Vec<(HeaderName, HeaderValue)>),
    /// Answer `403`: the origin, method or a requested header is not allowed.
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OriginPattern {
    Any,
    /// Lower-case `scheme://host[:port]`.
    Exact(String),
    /// `scheme://*.suffix[:port]`: `suffix` is lower-case and starts with a dot.
    Subdomain {
        scheme: String,
        suffix: String,
        port: Option<u16>,
    },
}

/// A service's compiled CORS policy.
#[derive(Debug, Clone)]
pub struct Cors {
    origins: Vec<OriginPattern>,
    methods: Vec<Method>,
    /// Lower-case.
    headers: Vec<HeaderName>,
    credentials: bool,
    allow_methods: HeaderValue,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
}

const PREFLIGHT_VARY: &str =
    "Origin, Access-Control-Request-Method, Access-Control-Request-Headers";

impl CorsConfig {
    /// Compiles the policy: origin patterns parsed, header values joined once. The error
    /// names the field at fault.
    pub fn compile(&self) -> Result<Cors, String> {
        let cfg = self;
        if cfg.allowed_origins.is_empty() {
            return Err("cors.allowed_origins: list at least one origin".into());
        }
        let origins = cfg
            .allowed_origins
            .iter()
            .map(|o| parse_pattern(o).map_err(|e| format!("cors.allowed_origins: {o:?}: {e}")))
            .collect::<Result<Vec<_>, String>>()?;
        if cfg.allow_credentials && origins.contains(&OriginPattern::Any) {
            return Err(
                "cors.allowed_origins: \"*\" cannot be combined with allow_credentials: true \
                 (any site could act with the user's credentials); list the origins"
                    .into(),
            );
        }
        let methods = cfg
            .allowed_methods
            .iter()
            .map(|m| {
                let upper = m.to_ascii_uppercase();
                if upper == "*" {
                    return Err(format!("cors.allowed_methods: list the methods, not {m:?}"));
                }
                Method::from_bytes(upper.as_bytes())
                    .map_err(|_| format!("cors.allowed_methods: {m:?} is not a valid method"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let names = |field: &str, list: &[String]| -> Result<Vec<HeaderName>, String> {
            list.iter()
                .map(|h| {
                    if h == "*" {
                        return Err(format!("cors.{field}: list the header names, not \"*\""));
                    }
                    HeaderName::from_bytes(h.as_bytes())
                        .map_err(|_| format!("cors.{field}: {h:?} is not a valid header name"))
                })
                .collect()
        };
        let headers = names("allowed_headers", &cfg.allowed_headers)?;
        let expose = names("expose_headers", &cfg.expose_headers)?;
        let joined = |items: Vec<&str>| -> Result<Option<HeaderValue>, String> {
            if items.is_empty() {
                return Ok(None);
            }
            super::headers::value_for_process(&items.join(", "))
                .map(Some)
                .map_err(|e| format!("cors: {e}"))
        };
        let allow_methods = joined(methods.iter().map(Method::as_str).collect())?
            .unwrap_or_else(|| HeaderValue::from_static(""));
        let allow_headers = joined(headers.iter().map(HeaderName::as_str).collect())?;
        let expose_headers = joined(expose.iter().map(HeaderName::as_str).collect())?;
        let max_age = match cfg.max_age.as_secs() {
            0 => None,
            secs => Some(
                super::headers::value_for_process(&secs.to_string())
                    .map_err(|e| format!("cors: {e}"))?,
            ),
        };
        Ok(Cors {
            origins,
            methods,
            headers,
            credentials: cfg.allow_credentials,
            allow_methods,
            allow_headers,
            expose_headers,
            max_age,
        })
    }
}

impl Cors {
    /// The value for `Access-Control-Allow-Origin` when `origin` is allowed: the origin
    /// itself, or `*` when any origin is allowed without credentials.
    fn allow_origin(&self, origin: &HeaderValue) -> Option<HeaderValue> {
        let text = origin.to_str().ok()?;
        let mut any = false;
        let parsed = parse_origin(text);
        for pattern in &self.origins {
            match pattern {
                OriginPattern::Any => any = true,
                OriginPattern::Exact(exact) if text.eq_ignore_ascii_case(exact) => {
                    return Some(origin.clone())
                }
                OriginPattern::Subdomain {
                    scheme,
                    suffix,
                    port,
                } => {
                    if let Some(o) = &parsed {
                        if o.scheme.eq_ignore_ascii_case(scheme)
                            && o.port == *port
                            && is_subdomain(o.host, suffix)
                        {
                            return Some(origin.clone());
                        }
                    }
                }
                OriginPattern::Exact(_) => {}
            }
        }
        // `*` only for origins that are well formed, so junk is not blessed either.
        (any && parsed.is_some()).then(|| HeaderValue::from_static("*"))
    }

    /// Recognises and judges a preflight request; the gateway answers it itself.
    pub fn preflight(&self, req: &RequestHeader) -> Preflight {
        if req.method != Method::OPTIONS {
            return Preflight::NotCors;
        }
        let (Some(origin), Some(method)) = (
            req.headers.get(header::ORIGIN),
            req.headers.get(header::ACCESS_CONTROL_REQUEST_METHOD),
        ) else {
            return Preflight::NotCors;
        };
        let Some(allow_origin) = self.allow_origin(origin) else {
            return Preflight::Rejected;
        };
        // Methods are case-sensitive (RFC 9110), so no normalisation here.
        let method_ok = Method::from_bytes(method.as_bytes())
            .map(|m| self.methods.contains(&m))
            .unwrap_or(false);
        if !method_ok {
            return Preflight::Rejected;
        }
        for requested in req
            .headers
            .get_all(header::ACCESS_CONTROL_REQUEST_HEADERS)
            .iter()
        {
            let Ok(list) = requested.to_str() else {
                return Preflight::Rejected;
            };
            let all_allowed = list
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .all(|h| {
                    self.headers
                        .iter()
                        .any(|a| a.as_str().eq_ignore_ascii_case(h))
                });
            if !all_allowed {
                return Preflight::Rejected;
            }
        }
        let mut out = vec![
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin),
            (
                header::ACCESS_CONTROL_ALLOW_METHODS,
                self.allow_methods.clone(),
            ),
        ];
        if let Some(h) = &self.allow_headers {
            out.push((header::ACCESS_CONTROL_ALLOW_HEADERS, h.clone()));
        }
        if self.credentials {
            out.push((
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            ));
        }
        if let Some(age) = &self.max_age {
            out.push((header::ACCESS_CONTROL_MAX_AGE, age.clone()));
        }
        out.push((header::VARY, HeaderValue::from_static(PREFLIGHT_VARY)));
        Preflight::Allowed(out)
    }

    /// Whether the request's `Origin`, if it has one, is one the policy allows.
    pub fn allows_origin_of(&self, req: &RequestHeader) -> bool {
        let mut origins = req.headers.get_all(header::ORIGIN).iter();
        match (origins.next(), origins.next()) {
            (None, _) => true,
            (Some(origin), None) => self.allow_origin(origin).is_some(),
            // Two origins: a browser never sends that.
            (Some(_), Some(_)) => false,
        }
    }

    /// Sets the CORS headers of an actual (non-preflight) response for the request's
    /// `Origin`, replacing any the upstream set, and always appends `Vary: Origin` since the
    /// answer depends on it.
    pub fn apply(&self, origin: Option<&HeaderValue>, resp: &mut ResponseHeader) {
        for name in [
            &header::ACCESS_CONTROL_ALLOW_ORIGIN,
            &header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            &header::ACCESS_CONTROL_EXPOSE_HEADERS,
        ] {
            resp.remove_header(name);
        }
        if let Some(allow) = origin.and_then(|o| self.allow_origin(o)) {
            // Typed names and values: inserting cannot fail.
            let _ = resp.insert_header(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow);
            if self.credentials {
                let _ = resp.insert_header(
                    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                    HeaderValue::from_static("true"),
                );
            }
            if let Some(expose) = &self.expose_headers {
                let _ = resp.insert_header(header::ACCESS_CONTROL_EXPOSE_HEADERS, expose.clone());
            }
        }
        let varies = resp.headers.get_all(header::VARY).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .map(str::trim)
                    .any(|t| t == "*" || t.eq_ignore_ascii_case("origin"))
            })
        });
        if !varies {
            let _ = resp.append_header(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
}

struct Origin<'a> {
    scheme: &'a str,
    host: &'a str,
    port: Option<u16>,
}

/// Parses a serialized origin, `scheme://host[:port]`, strictly: no path, user info or
/// anything else, so a suffix test on the host cannot be fooled.
fn parse_origin(s: &str) -> Option<Origin<'_>> {
    let (scheme, rest) = s.split_once("://")?;
    let scheme_ok = scheme.bytes().next()?.is_ascii_alphabetic()
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
    if !scheme_ok {
        return None;
    }
    let (host, port) = if rest.starts_with('[') {
        let end = rest.find(']')?;
        let (host, after) = rest.split_at(end + 1);
        match after {
            "" => (host, None),
            p => (host, Some(p.strip_prefix(':')?)),
        }
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b))
        && (host.starts_with('[') || !host.contains(':'));
    if !host_ok {
        return None;
    }
    let port = match port {
        Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse().ok()?),
        Some(_) => return None,
        None => None,
    };
    Some(Origin { scheme, host, port })
}

/// `host` is one or more DNS labels followed by `suffix` (".example.com").
fn is_subdomain(host: &str, suffix: &str) -> bool {
    host.len() > suffix.len()
        && host.is_char_boundary(host.len() - suffix.len())
        && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
        && host[..host.len() - suffix.len()].split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn parse_pattern(pattern: &str) -> Result<OriginPattern, String> {
    if pattern == "*" {
        return Ok(OriginPattern::Any);
    }
    const SHAPE: &str =
        "expected scheme://host[:port] with no path or trailing slash, scheme://*.domain, or *";
    let wildcard = pattern.split_once("://*.");
    let plain = match wildcard {
        Some((scheme, domain)) => format!("{scheme}://{domain}"),
        None => pattern.to_string(),
    };
    if plain.contains('*') {
        return Err("`*` is only allowed as the first label: https://*.example.com".into());
    }
    let origin = parse_origin(&plain).ok_or(SHAPE)?;
    let lower = |s: &str| s.to_ascii_lowercase();
    if wildcard.is_none() {
        return Ok(OriginPattern::Exact(lower(pattern)));
    }
    if !origin.host.contains('.') || origin.host.starts_with('[') {
        return Err("a wildcard needs a domain with a dot in it: https://*.example.com".into());
    }
    Ok(OriginPattern::Subdomain {
        scheme: lower(origin.scheme),
        suffix: format!(".{}", lower(origin.host)),
        port: origin.port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(yaml: &str) -> Cors {
        serde_yaml::from_str::<CorsConfig>(yaml)
            .expect("cors yaml")
            .compile()
            .expect("valid cors")
    }

    fn app() -> Cors {
        cors(
            "allowed_origins: [\"https://app.example.com\", \"https://*.example.com\", \
             \"http://localhost:3000\"]\n\
             allowed_methods: [GET, POST]\n\
             allowed_headers: [Authorization, Content-Type]\n\
             expose_headers: [X-Request-Id]\n\
             allow_credentials: true\n\
             max_age: 10m",
        )
    }

    fn preflight_req(origin: &str, method: &str, headers: Option<&str>) -> RequestHeader {
        let mut req = RequestHeader::build("OPTIONS", b"/users", None).unwrap();
        req.insert_header("Origin", origin).unwrap();
        req.insert_header("Access-Control-Request-Method", method)
            .unwrap();
        if let Some(h) = headers {
            req.insert_header("Access-Control-Request-Headers", h)
                .unwrap();
        }
        req
    }

    fn allowed(p: Preflight) -> Vec<(String, String)> {
        match p {
            Preflight::Allowed(h) => h
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                .collect(),
            other => panic!("expected Allowed, got {other:?}"),
        }
    }

    fn allows(c: &Cors, origin: &str) -> bool {
        c.allow_origin(&HeaderValue::from_str(origin).unwrap())
            .is_some()
    }

    #[test]
    fn origin_matching() {
        let c = app();
        for ok in [
            "https://app.example.com",
            "HTTPS://APP.EXAMPLE.COM",
            "https://a.example.com",
            "https://a.b.example.com",
            "http://localhost:3000",
        ] {
            assert!(allows(&c, ok), "{ok} should be allowed");
        }
        for bad in [
            "https://example.com",
            "https://a.example.com.evil.io",
            "https://evilexample.com",
            "https://evil.io/.example.com",
            "https://a.example.com:8443",
            "http://a.example.com",
            "https://a.example.com/",
            "https://user@a.example.com",
            "https://.example.com",
            "https://a..example.com",
            "http://localhost:3001",
            "http://localhost",
            "null",
            "",
        ] {
            assert!(!allows(&c, bad), "{bad:?} should be refused");
        }
    }

    #[test]
    fn preflight_allowed_with_the_configured_headers() {
        let c = app();
        let h = allowed(c.preflight(&preflight_req(
            "https://a.example.com",
            "POST",
            Some("authorization, Content-Type"),
        )));
        let get = |name: &str| h.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
        assert_eq!(
            get("access-control-allow-origin"),
            Some("https://a.example.com")
        );
        assert_eq!(get("access-control-allow-methods"), Some("GET, POST"));
        assert_eq!(
            get("access-control-allow-headers"),
            Some("authorization, content-type")
        );
        assert_eq!(get("access-control-allow-credentials"), Some("true"));
        assert_eq!(get("access-control-max-age"), Some("600"));
        assert!(get("vary").unwrap().starts_with("Origin"));
    }

    #[test]
    fn preflight_rejections_and_non_preflights() {
        let c = app();
        let reject = |origin: &str, method: &str, headers: Option<&str>| {
            assert_eq!(
                c.preflight(&preflight_req(origin, method, headers)),
                Preflight::Rejected,
                "{origin} {method} {headers:?}"
            );
        };
        reject("https://evil.io", "GET", None);
        reject("https://app.example.com", "DELETE", None);
        reject("https://app.example.com", "post", None);
        reject(
            "https://app.example.com",
            "GET",
            Some("Authorization, X-Secret"),
        );

        let mut get = RequestHeader::build("GET", b"/", None).unwrap();
        get.insert_header("Origin", "https://app.example.com")
            .unwrap();
        assert_eq!(c.preflight(&get), Preflight::NotCors);
        let mut options = RequestHeader::build("OPTIONS", b"/", None).unwrap();
        options
            .insert_header("Origin", "https://app.example.com")
            .unwrap();
        assert_eq!(
            c.preflight(&options),
            Preflight::NotCors,
            "no request method"
        );
    }

    #[test]
    fn actual_responses() {
        let c = app();
        let origin = HeaderValue::from_static("https://app.example.com");
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Vary", "Accept-Encoding").unwrap();
        resp.append_header("Access-Control-Allow-Origin", "*")
            .unwrap();
        c.apply(Some(&origin), &mut resp);
        let h = &resp.headers;
        assert_eq!(h["access-control-allow-origin"], "https://app.example.com");
        assert_eq!(h.get_all("access-control-allow-origin").iter().count(), 1);
        assert_eq!(h["access-control-allow-credentials"], "true");
        assert_eq!(h["access-control-expose-headers"], "x-request-id");
        let vary: Vec<_> = h.get_all("vary").iter().collect();
        assert_eq!(vary, ["Accept-Encoding", "Origin"]);

        // Refused origin: no CORS headers, the upstream's removed, still varies on Origin.
        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("Access-Control-Allow-Origin", "*")
            .unwrap();
        resp.append_header("Vary", "origin").unwrap();
        c.apply(
            Some(&HeaderValue::from_static("https://evil.io")),
            &mut resp,
        );
        assert!(resp.headers.get("access-control-allow-origin").is_none());
        assert_eq!(resp.headers.get_all("vary").iter().count(), 1);

        let mut resp = ResponseHeader::build(200, None).unwrap();
        c.apply(None, &mut resp);
        assert_eq!(resp.headers["vary"], "Origin");
    }

    #[test]
    fn any_origin_without_credentials() {
        let c = cors("allowed_origins: [\"*\"]\nmax_age: 0s");
        let h = allowed(c.preflight(&preflight_req("https://x.io", "GET", None)));
        assert!(h.contains(&("access-control-allow-origin".into(), "*".into())));
        assert!(!h.iter().any(|(n, _)| n == "access-control-max-age"));
        assert!(!h
            .iter()
            .any(|(n, _)| n == "access-control-allow-credentials"));
        assert_eq!(
            c.preflight(&preflight_req("https://x.io", "PUT", None)),
            Preflight::Rejected
        );
        assert_eq!(
            c.preflight(&preflight_req("not an origin", "GET", None)),
            Preflight::Rejected
        );
    }

    #[test]
    fn config_is_checked() {
        let cfg: CorsConfig = serde_yaml::from_str("allowed_origins: [\"https://a.io\"]").unwrap();
        assert_eq!(cfg.allowed_methods, ["GET", "HEAD", "POST"]);
        assert_eq!(cfg.max_age, Duration::from_secs(600));
        assert!(!cfg.allow_credentials);
        assert!(
            serde_yaml::from_str::<CorsConfig>("{}").is_err(),
            "origins are required"
        );
        assert!(serde_yaml::from_str::<CorsConfig>("allowed_origins: []\nbogus: 1").is_err());
        let refused = |yaml: &str, needle: &str| {
            let cfg: CorsConfig = serde_yaml::from_str(yaml).unwrap();
            let err = cfg.compile().unwrap_err();
            assert!(err.contains(needle), "{yaml}: {err}");
        };
        refused("allowed_origins: []", "at least one");
        refused("allowed_origins: [\"https://a.io/\"]", "allowed_origins");
        refused("allowed_origins: [\"a.io\"]", "scheme://host");
        refused("allowed_origins: [\"https://*.io\"]", "wildcard");
        refused("allowed_origins: [\"https://a.*.io\"]", "first label");
        refused("allowed_origins: [\"null\"]", "allowed_origins");
        refused(
            "allowed_origins: [\"*\"]\nallow_credentials: true",
            "allow_credentials",
        );
        refused(
            "allowed_origins: [\"https://a.io\"]\nallowed_methods: [\"G T\"]",
            "allowed_methods",
        );
        refused(
            "allowed_origins: [\"https://a.io\"]\nallowed_headers: [\"*\"]",
            "allowed_headers",
        );
        refused(
            "allowed_origins: [\"https://a.io\"]\nexpose_headers: [\"a b\"]",
            "expose_headers",
        );
        let c = cors("allowed_origins: [\"https://a.io\"]\nallowed_methods: [get, patch]");
        assert_eq!(c.allow_methods, "GET, PATCH");
    }
}
