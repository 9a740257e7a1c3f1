//! Header hygiene: the client's headers cleaned once, when the request arrives, so every
//! later step and the upstream see the same set. Owns `server.underscores_in_headers` and
//! `server.header_name_case`.
//!
//! - Names with `_`: many servers fold `_` and `-` into one name (CGI's `HTTP_X_USER_ID`), so
//!   `X_User_Id` would reach them as the identity header the gateway sets. Dropped by default,
//!   as nginx and Envoy do; `reject` answers 400; `allow` keeps them, except the spellings of
//!   the identity headers (`auth.jwt.forward_claims`) and of the forwarding headers.
//! - Forwarding headers from a peer that is not a trusted proxy (see `edge::forwarded`).
//! - More than one `Authorization`: the gateway would verify one and the upstream might read
//!   another, so the request is refused.
//!
//! - Header name case: by default the names go on as HTTP/2 would carry them (see
//!   [`HeaderNameCase`]), in requests and in the upstream's responses alike.
//!
//! What Pingora's parser already refuses (400, before any of this): a second `Host`,
//! `Content-Length`s that differ, whitespace before a header's colon, folded header lines.

use super::forwarded::{self, CLIENT_CLAIMS};
use http::header::InvalidHeaderValue;
use http::{HeaderName, HeaderValue};
use pingora::http::{RequestHeader, ResponseHeader};
use serde::Deserialize;

/// A header value made once from the config and added to many messages (security headers,
/// CORS). Its bytes are kept for the life of the process, which compiles its config once (a
/// reload starts a new process), so each copy put in a message shares them without a
/// reference count: a shared value costs two atomic read-modify-writes per message (clone and
/// drop), some 4 ns each on a core that is busy with stores, where a static one costs none.
pub fn value_for_process(text: &str) -> Result<HeaderValue, InvalidHeaderValue> {
    // Checked before the copy is made, so that a refused value is not kept.
    HeaderValue::from_str(text)?;
    let kept: &'static str = Box::leak(Box::from(text));
    HeaderValue::from_maybe_shared(bytes::Bytes::from_static(kept.as_bytes()))
}

/// `server.underscores_in_headers`: what a client header whose name contains `_` gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Underscores {
    /// Removed from the request. The default.
    #[default]
    Drop,
    /// The request is refused with 400.
    Reject,
    /// Kept, except spellings of the identity and forwarding headers.
    Allow,
}

/// `server.header_name_case`: how the names of the headers passed on (the client's to the
/// upstream, the upstream's to the client) are spelled on an HTTP/1 connection. Names are
/// case-insensitive (RFC 9110), and HTTP/2 writes them all in lower case.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeaderNameCase {
    /// Whatever the sender wrote: a dozen common names capitalised (`Host`, `Content-Type`,
    /// `Content-Length`, `Date`, `Server`, `Set-Cookie`, ...), every other name in lower case
    /// (`user-agent`, `x-request-id`). The default; Envoy and HAProxy also lower-case names.
    /// Keeping a second copy of every name, as `preserve` does, costs each proxied request
    /// about 12% more instructions (`loadtest/instructions.sh`, 2026-12-03).
    #[default]
    Normalize,
    /// Each name as its sender spelled it, for a peer that compares names with their case.
    /// A cache hit is the exception: the cache keeps names, not their spelling.
    Preserve,
}

impl HeaderNameCase {
    /// Whether each name's spelling as sent is kept (a second map beside the header map).
    pub fn keeps_spelling(self) -> bool {
        self == HeaderNameCase::Preserve
    }
}

/// Why the gateway refuses a request for its headers (the 400 answer's `detail`).
pub const UNDERSCORE_IN_NAME: &str = "a header name contains _ (underscores_in_headers: reject)";
pub const DUPLICATE_AUTHORIZATION: &str = "more than one Authorization header";

/// The compiled header rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    underscores: Underscores,
    name_case: HeaderNameCase,
    /// The `forward_claims` header names, lower-case.
    identity: Vec<HeaderName>,
}

impl HeaderRules {
    /// `identity` are the headers the gateway sets from a token (`forward_claims`).
    pub fn new(underscores: Underscores, identity: &[HeaderName]) -> HeaderRules {
        HeaderRules {
            underscores,
            name_case: HeaderNameCase::default(),
            identity: identity.to_vec(),
        }
    }

    /// The same rules with names spelled as `name_case` says.
    pub fn with_name_case(self, name_case: HeaderNameCase) -> HeaderRules {
        HeaderRules { name_case, ..self }
    }

    /// Applies the rules to an upstream's response header: its names' case. An HTTP/1
    /// upstream's response arrives without the spelling already (the peer's
    /// `keep_response_header_case`, set in `upstream::peer::prepare`); this covers any other
    /// source.
    pub fn clean_response(&self, resp: &mut ResponseHeader) {
        if !self.name_case.keeps_spelling() {
            resp.forget_case();
        }
    }

    /// Cleans the client's headers in place: names with `_` as configured, and the client's
    /// forwarding claims unless `peer_trusted`. Returns why the request must be refused, if it
    /// must (the caller answers 400 once the request has been counted by its rate limit).
    pub fn clean(&self, req: &mut RequestHeader, peer_trusted: bool) -> Option<&'static str> {
        if !self.name_case.keeps_spelling() {
            // First, so the removals below touch one map rather than two. A request read by
            // `server::front` arrives without the spelling already; this covers any other.
            req.forget_case();
        }
        let mut refusal = None;
        // Allocated only when something goes, which is rare.
        let mut remove: Vec<HeaderName> = Vec::new();
        for name in req.headers.keys() {
            let n = name.as_str();
            if n.as_bytes().contains(&b'_') {
                let goes = match self.underscores {
                    Underscores::Drop => true,
                    Underscores::Reject => {
                        refusal = Some(UNDERSCORE_IN_NAME);
                        true
                    }
                    Underscores::Allow => {
                        self.identity.iter().any(|h| same_folded(h.as_str(), n))
                            || CLIENT_CLAIMS.iter().any(|h| same_folded(h, n))
                    }
                };
                if goes {
                    remove.push(name.clone());
                }
            } else if !peer_trusted && forwarded::is_client_claim(n) {
                remove.push(name.clone());
            }
        }
        for name in &remove {
            req.remove_header(name);
        }
        if req
            .headers
            .get_all(http::header::AUTHORIZATION)
            .iter()
            .nth(1)
            .is_some()
        {
            refusal = Some(DUPLICATE_AUTHORIZATION);
        }
        refusal
    }
}

/// Whether two lower-case header names are the same once `_` and `-` are folded together.
fn same_folded(a: &str, b: &str) -> bool {
    let fold = |c: u8| if c == b'_' { b'-' } else { c };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        req
    }

    fn names(req: &RequestHeader) -> Vec<String> {
        let mut n: Vec<String> = req.headers.keys().map(|k| k.to_string()).collect();
        n.sort();
        n
    }

    fn rules(u: Underscores) -> HeaderRules {
        HeaderRules::new(u, &[HeaderName::from_static("x-user-id")])
    }

    const SENT: &[(&str, &str)] = &[
        ("Host", "h"),
        ("X_User_Id", "forged"),
        ("x_forwarded_for", "6.6.6.6"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("True-Client-IP", "6.6.6.6"),
        ("X-Original-URL", "/admin"),
        ("Forwarded", "for=6.6.6.6"),
        ("My_Header", "v"),
        ("Accept", "*/*"),
    ];

    #[test]
    fn names_keep_their_case_only_when_configured_to() {
        let mut normalized = req(SENT);
        rules(Underscores::Drop).clean(&mut normalized, false);
        assert!(!normalized.has_case());
        let mut kept = req(SENT);
        let preserve = rules(Underscores::Drop).with_name_case(HeaderNameCase::Preserve);
        preserve.clean(&mut kept, false);
        assert!(kept.has_case());
        assert_eq!(names(&kept), names(&normalized));

        let mut resp = ResponseHeader::build(200, None).unwrap();
        resp.append_header("X-Upstream", "a").unwrap();
        preserve.clean_response(&mut resp);
        assert!(resp.has_case());
        rules(Underscores::Drop).clean_response(&mut resp);
        assert!(!resp.has_case());
    }

    #[test]
    fn dropped_by_default_with_client_claims_from_untrusted_peers() {
        let mut r = req(SENT);
        assert_eq!(rules(Underscores::Drop).clean(&mut r, false), None);
        assert_eq!(names(&r), ["accept", "host"]);
        // A trusted proxy's forwarding headers stay.
        let mut r = req(SENT);
        assert_eq!(rules(Underscores::Drop).clean(&mut r, true), None);
        assert_eq!(
            names(&r),
            [
                "accept",
                "forwarded",
                "host",
                "true-client-ip",
                "x-forwarded-for",
                "x-original-url"
            ]
        );
    }

    #[test]
    fn reject_refuses_and_allow_keeps_all_but_identity_and_forwarding_spellings() {
        let mut r = req(SENT);
        assert_eq!(
            rules(Underscores::Reject).clean(&mut r, false),
            Some(UNDERSCORE_IN_NAME)
        );
        let mut r = req(&[("Host", "h")]);
        assert_eq!(rules(Underscores::Reject).clean(&mut r, false), None);

        let mut r = req(SENT);
        assert_eq!(rules(Underscores::Allow).clean(&mut r, true), None);
        assert!(names(&r).contains(&"my_header".to_string()));
        assert!(!names(&r).contains(&"x_user_id".to_string()));
        assert!(!names(&r).contains(&"x_forwarded_for".to_string()));
    }

    #[test]
    fn two_authorization_headers_are_refused() {
        let mut r = req(&[("Authorization", "Bearer a"), ("authorization", "Bearer b")]);
        assert_eq!(
            rules(Underscores::Drop).clean(&mut r, false),
            Some(DUPLICATE_AUTHORIZATION)
        );
        let mut r = req(&[("Authorization", "Bearer a")]);
        assert_eq!(rules(Underscores::Drop).clean(&mut r, false), None);
    }
}
