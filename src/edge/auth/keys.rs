//! Verification keys: an HMAC secret, a PEM public key, or a JSON Web Key Set read from a
//! file or fetched from a URL, and the JWKS's rate-limited refetch when a token names an
//! unknown `kid`.

use super::config::JwtConfig;
use super::fetch::HttpUrl;
use crate::clock::{millis, Clock};
use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const NEVER: u64 = u64::MAX;

pub(super) enum Keys {
    /// An HMAC secret or a PEM public key.
    Single(DecodingKey),
    Jwks(Jwks),
}

/// A JWKS and its rate-limited refetch. The key set is swapped whole, so readers never lock,
/// and the refetch gate is two atomics: nothing is held across an await.
pub(super) struct Jwks {
    source: JwksSource,
    set: ArcSwap<Vec<JwksKey>>,
    refetch_interval_ms: u64,
    fetch_timeout: Duration,
    clock: Arc<dyn Clock>,
    /// When the last refetch started (clock ms), or [`NEVER`].
    last_refetch_ms: AtomicU64,
    refreshing: AtomicBool,
    refreshed: tokio::sync::Notify,
}

pub(super) enum JwksSource {
    File(PathBuf),
    Url(HttpUrl),
}

pub(super) struct JwksKey {
    pub(super) kid: Option<String>,
    pub(super) alg: Option<Algorithm>,
    pub(super) key: DecodingKey,
}

/// Reads the secret or keys the config names (environment, files, or a blocking fetch of
/// `jwks_url`). Errors name the field or file at fault.
pub(super) fn load(
    cfg: &JwtConfig,
    jwks_url: Option<HttpUrl>,
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
        let body = url
            .get_blocking(cfg.jwks_fetch_timeout)
            .map_err(|e| format!("jwks_url {}: {e}", url.raw))?;
        let set = parse_jwks(&body).map_err(|e| format!("jwks_url {}: {e}", url.raw))?;
        Keys::Jwks(Jwks::new(JwksSource::Url(url), set, cfg, clock))
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

impl Jwks {
    fn new(source: JwksSource, set: Vec<JwksKey>, cfg: &JwtConfig, clock: Arc<dyn Clock>) -> Jwks {
        Jwks {
            source,
            set: ArcSwap::from_pointee(set),
            refetch_interval_ms: millis(cfg.jwks_refetch_interval),
            fetch_timeout: cfg.jwks_fetch_timeout,
            clock,
            last_refetch_ms: AtomicU64::new(NEVER),
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

    /// Refetches the key set unless one was fetched less than `refetch_interval` ago. A
    /// request arriving while another refetches waits for that result instead of fetching.
    pub(super) async fn refetch(&self) {
        if self
            .refreshing
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            let notified = std::pin::pin!(self.refreshed.notified());
            let mut notified = notified;
            // Registered before the re-check, so a refetch ending in between still wakes us.
            notified.as_mut().enable();
            if self.refreshing.load(Ordering::SeqCst) {
                let wait = self.fetch_timeout + Duration::from_secs(1);
                let _ = tokio::time::timeout(wait, notified).await;
            }
            return;
        }
        // Cleared on drop too: a cancelled request must not leave the gate shut for good.
        let _gate = RefreshGate(self);
        let now = self.clock.now_millis();
        let last = self.last_refetch_ms.load(Ordering::SeqCst);
        if last != NEVER && now.saturating_sub(last) < self.refetch_interval_ms {
            return;
        }
        self.last_refetch_ms.store(now, Ordering::SeqCst);
        match self.load().await {
            Ok(set) => {
                log::info!("JWKS refetched: {} keys", set.len());
                self.set.store(Arc::new(set));
            }
            Err(e) => log::warn!("JWKS refetch failed, keeping the current keys: {e}"),
        }
    }

    async fn load(&self) -> Result<Vec<JwksKey>, String> {
        let bytes = match &self.source {
            // A small local file, read at most once per refetch interval: not worth a
            // blocking-pool hop.
            JwksSource::File(path) => read_file(path, "jwks_file")?,
            JwksSource::Url(url) => url
                .get(self.fetch_timeout)
                .await
                .map_err(|e| format!("jwks_url {}: {e}", url.raw))?,
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
