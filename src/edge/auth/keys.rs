//! Verification keys: an HMAC secret, a PEM public key, or a JSON Web Key Set read from a
//! file or fetched from a URL; the JWKS's refetch when a token names an unknown `kid`
//! (rate-limited) and, for a URL, in the background every `jwks_refresh_interval`, so a key
//! the issuer withdrew stops being accepted. A failed fetch keeps the keys already loaded and
//! doubles the wait before the next one (up to 5 minutes); `breakwater_jwks_refresh_total`
//! counts the outcomes.

use super::config::JwtConfig;
use super::fetch::{Fetcher, JwksUrl};
use crate::clock::{millis, Clock};
use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use once_cell::sync::Lazy;
use prometheus::{IntCounterVec, Opts};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const NEVER: u64 = u64::MAX;
/// The longest wait after failed fetches, however many failed.
const MAX_BACKOFF_MS: u64 = 5 * 60 * 1000;

pub(super) static REFRESHES: Lazy<IntCounterVec> = Lazy::new(|| {
    let counter = IntCounterVec::new(
        Opts::new(
            "breakwater_jwks_refresh_total",
            "JWKS fetches after start-up, by result (ok, error); on error the keys already loaded stay in use.",
        ),
        &["result"],
    )
    .expect("valid metric definition");
    if let Err(e) = crate::ops::metrics::METRICS
        .registry
        .register(Box::new(counter.clone()))
    {
        log::error!("breakwater_jwks_refresh_total not registered: {e}");
    }
    counter
});

pub(super) fn register_metrics() {
    Lazy::force(&REFRESHES);
}

pub(super) enum Keys {
    /// An HMAC secret or a PEM public key.
    Single(DecodingKey),
    Jwks(Jwks),
}

/// A JWKS and its refetches. The key set is swapped whole, so readers never lock, and the
/// refetch gate is atomics: nothing is held across an await.
pub(super) struct Jwks {
    source: JwksSource,
    set: ArcSwap<Vec<JwksKey>>,
    /// Bumped after each new set is stored: what the verified-token cache checks an entry's
    /// key set by.
    generation: AtomicU64,
    refetch_interval_ms: u64,
    /// How often a `jwks_url` is fetched again in the background.
    refresh_interval: Duration,
    fetch_timeout: Duration,
    clock: Arc<dyn Clock>,
    /// When the last refetch started (clock ms), or [`NEVER`].
    last_refetch_ms: AtomicU64,
    /// Fetches that failed in a row; each doubles the wait before the next.
    failures: AtomicU32,
    refreshing: AtomicBool,
    refreshed: tokio::sync::Notify,
}

pub(super) enum JwksSource {
    File(PathBuf),
    Url(Fetcher),
}

impl JwksSource {
    fn describe(&self) -> String {
        match self {
            JwksSource::File(path) => format!("jwks_file {}", path.display()),
            JwksSource::Url(fetcher) => format!("jwks_url {}", fetcher.url()),
        }
    }
}

pub(super) struct JwksKey {
    pub(super) kid: Option<String>,
    pub(super) alg: Option<Algorithm>,
    pub(super) key: DecodingKey,
}

/// Reads the secret or keys the config names (environment, files, or a fetch of `jwks_url`
/// that blocks the caller, on a thread of its own). Errors name the field or file at fault.
pub(super) fn load(
    cfg: &JwtConfig,
    jwks_url: Option<JwksUrl>,
    clock: Arc<dyn Clock>,
) -> Result<Keys, String> {
    let keys = if let Some(var) = &cfg.secret_env {
        let secret = std::env::var_os(var)
            .ok_or_else(|| format!("secret_env: environment variable {var} is not set"))?;
        Keys::Single(hmac_key(
            secret.as_encoded_bytes(),
            &format!("secret_env {var}"),
        )?)
    } else if let Some(path) = &cfg.secret_file {
        let bytes = read_file(path, "secret_file")?;
        let end = bytes
            .iter()
            .rposition(|b| !matches!(b, b'\n' | b'\r'))
            .map_or(0, |i| i + 1);
        Keys::Single(hmac_key(
            &bytes[..end],
            &format!("secret_file {}", path.display()),
        )?)
    } else if let Some(path) = &cfg.public_key_file {
        let pem = read_file(path, "public_key_file")?;
        Keys::Single(
            public_key(&pem, cfg.algorithms[0].family())
                .map_err(|e| format!("public_key_file {}: {e}", path.display()))?,
        )
    } else if let Some(path) = &cfg.jwks_file {
        let source = JwksSource::File(path.clone());
        let set = parse_jwks(&read_file(path, "jwks_file")?)
            .map_err(|e| format!("jwks_file {}: {e}", path.display()))?;
        Keys::Jwks(Jwks::new(source, set, cfg, clock))
    } else if let Some(url) = jwks_url {
        let raw = url.raw.clone();
        let fetcher = Fetcher::new(url, cfg.jwks_ca_file.as_deref(), cfg.jwks_fetch_timeout)?;
        let body = fetcher
            .get_blocking()
            .map_err(|e| format!("jwks_url {raw}: {e}"))?;
        let set = parse_jwks(&body).map_err(|e| format!("jwks_url {raw}: {e}"))?;
        Keys::Jwks(Jwks::new(JwksSource::Url(fetcher), set, cfg, clock))
    } else {
        return Err("no key source configured".into());
    };

    Ok(keys)
}

pub(super) fn read_file(path: &Path, field: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{field}: cannot read {}: {e}", path.display()))
}

pub(super) fn hmac_key(secret: &[u8], what: &str) -> Result<DecodingKey, String> {
    if secret.is_empty() {
        return Err(format!("{what}: the HMAC secret is empty"));
    }
    if secret.len() < 32 {
        log::warn!(
            "{what}: the HMAC secret is {} bytes; 32 or more are recommended",
            secret.len()
        );
    }
    Ok(DecodingKey::from_secret(secret))
}

pub(super) fn public_key(pem: &[u8], family: AlgorithmFamily) -> Result<DecodingKey, String> {
    let (parsed, kind) = match family {
        AlgorithmFamily::Rsa => (DecodingKey::from_rsa_pem(pem), "an RSA"),
        AlgorithmFamily::Ec => (DecodingKey::from_ec_pem(pem), "an EC"),
        AlgorithmFamily::Ed => (DecodingKey::from_ed_pem(pem), "an Ed25519"),
        AlgorithmFamily::Hmac => return Err("HMAC algorithms take a secret, not a PEM".into()),
    };
    parsed.map_err(|e| format!("not {kind} public key in PEM form, as the algorithms need ({e})"))
}

/// Parses a JWKS, keeping the signature keys this gateway can use and skipping (with a
/// warning) the others, so one exotic key does not take the whole set down.
pub(super) fn parse_jwks(bytes: &[u8]) -> Result<Vec<JwksKey>, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<Value>,
    }
    let raw: RawSet = serde_json::from_slice(bytes)
        .map_err(|e| format!("not a JSON Web Key Set ({{\"keys\": [...]}}): {e}"))?;
    let mut keys = Vec::new();
    for (i, value) in raw.keys.into_iter().enumerate() {
        let jwk: Jwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                log::warn!("JWKS key {i} skipped: unsupported ({e})");
                continue;
            }
        };
        let kid = jwk.common.key_id.clone();
        if matches!(&jwk.common.public_key_use, Some(u) if *u != PublicKeyUse::Signature) {
            continue;
        }
        // Symmetric keys in a key set would let a published document sign tokens.
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            log::warn!("JWKS key {kid:?} skipped: symmetric (oct) keys are not accepted");
            continue;
        }
        let alg = match &jwk.common.key_algorithm {
            Some(ka) => match Algorithm::from_str(&ka.to_string()) {
                Ok(alg) => Some(alg),
                Err(_) => {
                    log::warn!("JWKS key {kid:?} skipped: alg {ka} is not a signature algorithm");
                    continue;
                }
            },
            None => None,
        };
        match DecodingKey::from_jwk(&jwk) {
            Ok(key) => keys.push(JwksKey { kid, alg, key }),
            Err(e) => log::warn!("JWKS key {kid:?} skipped: {e}"),
        }
    }
    if keys.is_empty() {
        return Err("no usable signature key".into());
    }
    Ok(keys)
}

pub(super) enum Lookup {
    Found(Arc<Vec<JwksKey>>, Vec<usize>),
    Incompatible,
    Unknown,
}

impl Keys {
    /// Which key set is current: read before the keys a token is checked against, so a
    /// verdict is never filed under a newer set than the one that gave it.
    pub(super) fn generation(&self) -> u64 {
        match self {
            Keys::Single(_) => 0,
            Keys::Jwks(jwks) => jwks.generation.load(Ordering::SeqCst),
        }
    }
}

impl Jwks {
    fn new(source: JwksSource, set: Vec<JwksKey>, cfg: &JwtConfig, clock: Arc<dyn Clock>) -> Jwks {
        Jwks {
            source,
            set: ArcSwap::from_pointee(set),
            generation: AtomicU64::new(0),
            refetch_interval_ms: millis(cfg.jwks_refetch_interval),
            refresh_interval: cfg.jwks_refresh_interval,
            fetch_timeout: cfg.jwks_fetch_timeout,
            clock,
            last_refetch_ms: AtomicU64::new(NEVER),
            failures: AtomicU32::new(0),
            refreshing: AtomicBool::new(false),
            refreshed: tokio::sync::Notify::new(),
        }
    }

    /// The keys that may have signed a token with this header: those with its `kid` (or, for a
    /// token without one, every key) whose type and declared `alg` fit the token's `alg`.
    pub(super) fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Lookup {
        let set = self.set.load_full();
        let family = alg.family();
        let fits = |k: &JwksKey| k.key.family() == family && k.alg.is_none_or(|a| a == alg);
        let indices: Vec<usize> = match kid {
            Some(kid) => {
                let named: Vec<usize> = (0..set.len())
                    .filter(|&i| set[i].kid.as_deref() == Some(kid))
                    .collect();
                if named.is_empty() {
                    return Lookup::Unknown;
                }
                let fitting: Vec<usize> = named.into_iter().filter(|&i| fits(&set[i])).collect();
                if fitting.is_empty() {
                    return Lookup::Incompatible;
                }
                fitting
            }
            None => {
                let fitting: Vec<usize> = (0..set.len()).filter(|&i| fits(&set[i])).collect();
                if fitting.is_empty() {
                    return Lookup::Unknown;
                }
                fitting
            }
        };
        Lookup::Found(set, indices)
    }

    /// Refetches the key set for a token with an unknown `kid`, unless the last refetch was
    /// less than `jwks_refetch_interval` ago (longer after failures). A request arriving
    /// while another refetches waits for that result instead of fetching.
    pub(super) async fn refetch(&self) {
        let Some(gate) = self.enter().await else {
            return;
        };
        let now = self.clock.now_millis();
        let last = self.last_refetch_ms.load(Ordering::SeqCst);
        if last != NEVER && now.saturating_sub(last) < self.wait_ms(self.refetch_interval_ms) {
            return;
        }
        self.fetch(gate, now).await;
    }

    /// Fetches the set again now, unless a fetch is under way: the background refresh.
    pub(super) async fn refresh(&self) {
        if let Some(gate) = self.try_enter() {
            self.fetch(gate, self.clock.now_millis()).await;
        }
    }

    /// How long the background refresh waits before its next fetch: `jwks_refresh_interval`,
    /// or after failures the backoff (`None` for a file, which is not refreshed so).
    pub(super) fn next_refresh(&self) -> Option<Duration> {
        if !matches!(self.source, JwksSource::Url(_)) {
            return None;
        }
        Some(match self.failures.load(Ordering::SeqCst) {
            0 => self.refresh_interval,
            _ => Duration::from_millis(self.wait_ms(self.refetch_interval_ms)),
        })
    }

    /// `base`, doubled for each failure in a row, capped at 5 minutes (or `base` if longer).
    fn wait_ms(&self, base: u64) -> u64 {
        let failures = self.failures.load(Ordering::SeqCst);
        let factor = 1u64.checked_shl(failures).unwrap_or(u64::MAX);
        base.saturating_mul(factor).min(MAX_BACKOFF_MS.max(base))
    }

    /// Takes the refetch gate, or waits for the refetch that holds it and returns `None`.
    async fn enter(&self) -> Option<RefreshGate<'_>> {
        if let Some(gate) = self.try_enter() {
            return Some(gate);
        }
        let notified = std::pin::pin!(self.refreshed.notified());
        let mut notified = notified;
        // Registered before the re-check, so a refetch ending in between still wakes us.
        notified.as_mut().enable();
        if self.refreshing.load(Ordering::SeqCst) {
            let wait = self.fetch_timeout + Duration::from_secs(1);
            let _ = tokio::time::timeout(wait, notified).await;
        }
        None
    }

    fn try_enter(&self) -> Option<RefreshGate<'_>> {
        self.refreshing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
            // Cleared on drop too: a cancelled request must not leave the gate shut for good.
            .then(|| RefreshGate(self))
    }

    /// Fetches and parses the set; on failure the keys already loaded stay.
    async fn fetch(&self, _gate: RefreshGate<'_>, now: u64) {
        self.last_refetch_ms.store(now, Ordering::SeqCst);
        match self.load().await {
            Ok(set) => {
                log::info!(
                    "JWKS refetched from {}: {} keys",
                    self.source.describe(),
                    set.len()
                );
                self.set.store(Arc::new(set));
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.failures.store(0, Ordering::SeqCst);
                REFRESHES.with_label_values(&["ok"]).inc();
            }
            Err(e) => {
                let failures = self.failures.fetch_add(1, Ordering::SeqCst) + 1;
                REFRESHES.with_label_values(&["error"]).inc();
                log::warn!(
                    "JWKS refetch from {} failed ({failures} in a row), keeping the {} keys \
                     already loaded; next try in {:?} at the earliest: {e}",
                    self.source.describe(),
                    self.set.load().len(),
                    Duration::from_millis(self.wait_ms(self.refetch_interval_ms)),
                );
            }
        }
    }

    async fn load(&self) -> Result<Vec<JwksKey>, String> {
        let bytes = match &self.source {
            // A small local file, read at most once per refetch interval: not worth a
            // blocking-pool hop.
            JwksSource::File(path) => read_file(path, "jwks_file")?,
            JwksSource::Url(fetcher) => fetcher.get().await?,
        };
        parse_jwks(&bytes)
    }
}

struct RefreshGate<'a>(&'a Jwks);

impl Drop for RefreshGate<'_> {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::SeqCst);
        self.0.refreshed.notify_waiters();
    }
}
