//! The verified-token cache: a token whose signature and claims checked out once is not
//! checked again until its `exp`, so a client repeating its token pays a digest and a lookup
//! instead of an RSA or ECDSA verification (hundreds of microseconds).
//!
//! What keeps it safe:
//! - Entries are keyed by the SHA-256 of the whole token, so two tokens share an entry only if
//!   they are the same bytes; the raw token is never kept.
//! - Only tokens that verified are stored: a refused token costs its check every time, and
//!   never evicts good entries.
//! - An entry is used only before the token's `exp` (without the leeway; past it the library
//!   decides again) and only while the key set it was checked against is current: a JWKS
//!   refresh that changes the keys retires every entry.
//! - The cache is bounded by bytes (`auth.jwt.verified_cache_size`), each entry weighed by
//!   its token's length; moka's TinyLFU admission keeps a flood of one-off tokens from
//!   pushing out the tokens clients repeat.
//! - A reload builds a new authenticator, so changed `issuer`, `audience` or keys start from
//!   an empty cache.

use super::identity::Identity;
use moka::sync::Cache;
use moka::Expiry;
use once_cell::sync::Lazy;
use prometheus::{IntCounter, IntCounterVec, Opts};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes an entry costs beyond its token's length: the digest, moka's bookkeeping, and the
/// identity's allocations beyond the claims' own text (map nodes, strings' headers).
const ENTRY_OVERHEAD: u32 = 640;

/// The digest a token is cached under.
pub(super) type TokenDigest = [u8; 32];

#[derive(Clone)]
struct Verified {
    identity: Arc<Identity>,
    /// The token's `exp`, Unix seconds.
    expires_at: u64,
    /// The key-set generation the token was checked against.
    generation: u64,
    /// How long moka keeps the entry: until `exp` as seen at insertion.
    keep_for: Duration,
    /// What the entry counts against `verified_cache_size`.
    weight: u32,
}

struct UntilExp;

impl Expiry<TokenDigest, Verified> for UntilExp {
    fn expire_after_create(&self, _: &TokenDigest, v: &Verified, _: Instant) -> Option<Duration> {
        Some(v.keep_for)
    }
}

/// Tokens that verified, until they expire; `None` when `verified_cache_size` is 0.
pub(super) struct VerifiedTokens(Option<Cache<TokenDigest, Verified>>);

static LOOKUPS: Lazy<IntCounterVec> = Lazy::new(|| {
    let counter = IntCounterVec::new(
        Opts::new(
            "breakwater_jwt_verified_cache_total",
            "Bearer tokens looked up in the verified-token cache, by result (hit, miss).",
        ),
        &["result"],
    )
    .expect("valid metric definition");
    if let Err(e) = crate::ops::metrics::METRICS
        .registry
        .register(Box::new(counter.clone()))
    {
        log::error!("breakwater_jwt_verified_cache_total not registered: {e}");
    }
    counter
});

// Resolved once: a label lookup per request would cost more than the hit it counts.
static HITS: Lazy<IntCounter> = Lazy::new(|| LOOKUPS.with_label_values(&["hit"]));
static MISSES: Lazy<IntCounter> = Lazy::new(|| LOOKUPS.with_label_values(&["miss"]));

pub(super) fn register_metrics() {
    Lazy::force(&HITS);
    Lazy::force(&MISSES);
}

impl VerifiedTokens {
    /// A cache holding about `max_bytes` of tokens.
    pub(super) fn new(max_bytes: u64) -> VerifiedTokens {
        if max_bytes == 0 {
            return VerifiedTokens(None);
        }
        let cache = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_: &TokenDigest, v: &Verified| v.weight)
            .expire_after(UntilExp)
            .build();
        VerifiedTokens(Some(cache))
    }

    pub(super) fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// The digest `token` is cached under.
    pub(super) fn digest(token: &str) -> TokenDigest {
        Sha256::digest(token.as_bytes()).into()
    }

    /// The identity of a token that verified against key-set `generation` and has not
    /// expired at `now` (Unix seconds).
    pub(super) fn get(
        &self,
        digest: &TokenDigest,
        now: u64,
        generation: u64,
    ) -> Option<Arc<Identity>> {
        let cache = self.0.as_ref()?;
        let found = cache
            .get(digest)
            .filter(|v| now < v.expires_at && v.generation == generation);
        if found.is_some() { &HITS } else { &MISSES }.inc();
        found.map(|v| v.identity)
    }

    /// Keeps a verified token's identity until its `exp`; tokens already past it, or whose
    /// `exp` is not a whole number of seconds, are not kept.
    pub(super) fn insert(
        &self,
        digest: TokenDigest,
        identity: &Arc<Identity>,
        token_len: usize,
        now: u64,
        generation: u64,
    ) {
        let Some(cache) = &self.0 else {
            return;
        };
        let Some(expires_at) = identity.claims.get("exp").and_then(|v| v.as_u64()) else {
            return;
        };
        if expires_at <= now {
            return;
        }
        // The token's bytes twice: the claims decoded from it, and the map holding them.
        let weight = u32::try_from(token_len)
            .unwrap_or(u32::MAX)
            .saturating_mul(2)
            .saturating_add(ENTRY_OVERHEAD);
        let verified = Verified {
            identity: Arc::clone(identity),
            expires_at,
            generation,
            keep_for: Duration::from_secs(expires_at - now),
            weight,
        };
        cache.insert(digest, verified);
    }

    /// Entries held now (after moka has applied pending work); for tests.
    #[cfg(test)]
    pub(super) fn len(&self) -> u64 {
        self.0.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.entry_count()
        })
    }

    /// Bytes held now by moka's weighing; for tests.
    #[cfg(test)]
    pub(super) fn weight(&self) -> u64 {
        self.0.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.weighted_size()
        })
    }
}
