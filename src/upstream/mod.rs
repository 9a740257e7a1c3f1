//! The upstream side of a service: its pool of servers and how one is picked
//! ([`pool`]), the circuit breaker of each ([`breaker`]), and the retry budget that caps how
//! often failed attempts are tried again ([`retry`]).

pub mod breaker;
pub mod pool;
pub mod retry;

/// The host part of an upstream's `host:port`, used as SNI by default.
pub fn upstream_host(name: &str) -> String {
    name.rsplit_once(':')
        .map_or(name, |(h, _)| h)
        .trim_matches(['[', ']'])
        .to_string()
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
