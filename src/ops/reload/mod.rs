//! Hot reload: watches the config file (and `SIGHUP`), validates a changed file, and hands the
//! listening sockets to a new process of ourselves through Pingora's graceful upgrade.
//!
//! Pingora asks a `ShutdownSignalWatch` when to stop; ours also answers "upgrade" when a
//! valid new config appears. The sequence on a change:
//!
//! 1. the new file is loaded and validated in this (old) process; an invalid file is logged
//!    with file, line and field, counted as `breakwater_config_reloads_total{result="error"}`,
//!    and the old config keeps serving;
//! 2. a valid file starts `breakwater -c FILE --upgrade` (plus `-d` when daemonised), which
//!    waits on `server.upgrade_sock` for the listening sockets;
//! 3. this process returns `GracefulUpgrade` to Pingora, which sends the sockets, keeps
//!    accepting for a few seconds while the new process starts, then stops accepting and
//!    drains in-flight requests for `server.grace_period` before exiting.
//!
//! Nothing is dropped: the listening sockets are never closed, so connections queue in the
//! kernel until one of the two processes accepts them. The new process starts with fresh
//! in-memory state (breakers, health, local rate limits, memory cache, metric counters);
//! state kept in Redis survives.

use crate::ops::lifecycle::LIFECYCLE;
use crate::ops::metrics::METRICS;
use crate::server::StartOptions;
use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};

/// How often the config file is read to look for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Set in the environment of a process started by a reload, so it counts the success.
const RELOADED_ENV: &str = "BREAKWATER_RELOADED";

/// Pingora's shutdown-signal source, extended with config reloads.
pub struct ReloadWatch {
    config_path: PathBuf,
    start: StartOptions,
    state: Mutex<WatchState>,
}

struct WatchState {
    /// Hash of the file content this process serves, or last refused.
    settled: u64,
    /// Hash seen at the previous poll: a change is acted on once two polls agree, so a
    /// file caught half-written is not reported as invalid.
    last_seen: u64,
}

fn hash_file(path: &PathBuf) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

impl ReloadWatch {
    /// `config_path` is the file this process loaded.
    pub fn new(config_path: PathBuf, start: StartOptions) -> ReloadWatch {
        // Absolute, but symlinks kept: a Kubernetes ConfigMap directory swaps its target on
        // update, and the link is what must be read again.
        let config_path = std::path::absolute(&config_path).unwrap_or(config_path);
        let hash = hash_file(&config_path).unwrap_or_default();
        ReloadWatch {
            config_path,
            start,
            state: Mutex::new(WatchState {
                settled: hash,
                last_seen: hash,
            }),
        }
    }

    /// Whether the file changed since it was last settled and has stayed the same since the
    /// previous poll.
    fn changed_and_stable(&self) -> bool {
        let Some(hash) = hash_file(&self.config_path) else {
            return false;
        };
        let Ok(mut state) = self.state.lock() else {
            return false;
        };
        let stable = hash == state.last_seen;
        state.last_seen = hash;
        stable && hash != state.settled
    }

    fn settle(&self) {
        if let (Some(hash), Ok(mut state)) = (hash_file(&self.config_path), self.state.lock()) {
            state.settled = hash;
            state.last_seen = hash;
        }
    }

    /// Validates the file and starts the process that takes over. True when it started.
    fn try_reload(&self, trigger: &str) -> bool {
        // Whatever the outcome, this content has been dealt with.
        self.settle();
        let errors = METRICS.config_reloads_total.with_label_values(&["error"]);
        if let Err(e) = crate::runtime::prepare(&self.config_path) {
            errors.inc();
            log::error!(
                "config reload ({trigger}) refused, still serving the previous config: {e}"
            );
            return false;
        }
        let exe = match std::env::current_exe() {
            // After a package upgrade replaced the binary, Linux reports the old inode's path
            // with this suffix; the file now at that path is the one to start.
            Ok(exe) => match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
                Some(path) => PathBuf::from(path),
                None => exe,
            },
            Err(e) => {
                errors.inc();
                log::error!("config reload ({trigger}) failed: cannot find own executable: {e}");
                return false;
            }
        };
        let mut cmd = Command::new(exe);
        cmd.arg("-c").arg(&self.config_path).arg("--upgrade");
        if self.start.daemon {
            cmd.arg("--daemon");
        }
        cmd.env(RELOADED_ENV, "1").stdin(Stdio::null());
        match cmd.spawn() {
            Ok(mut child) => {
                // A new process that dies at once (e.g. cannot bind the upgrade socket) must
                // not make us hand over our sockets to nobody.
                std::thread::sleep(Duration::from_millis(100));
                if let Ok(Some(status)) = child.try_wait() {
                    if !(self.start.daemon && status.success()) {
                        errors.inc();
                        log::error!(
                            "config reload ({trigger}) failed: the new process exited at once ({status})"
                        );
                        return false;
                    }
                }
                log::info!(
                    "config reload ({trigger}): process {} takes over the listeners; this one drains",
                    child.id()
                );
                crate::ops::lifecycle::notify_systemd(&format!(
                    "RELOADING=1\nMAINPID={}",
                    child.id()
                ));
                true
            }
            Err(e) => {
                errors.inc();
                log::error!("config reload ({trigger}) failed: cannot start a new process: {e}");
                false
            }
        }
    }
}

/// Counts the reload that started this process, if one did.
pub fn count_if_reloaded() {
    if std::env::var_os(RELOADED_ENV).is_some() {
        METRICS
            .config_reloads_total
            .with_label_values(&["success"])
            .inc();
        // Our children are not reloads until they say so themselves.
        std::env::remove_var(RELOADED_ENV);
    }
}

#[async_trait]
impl ShutdownSignalWatch for ReloadWatch {
    async fn recv(&self) -> ShutdownSignal {
        let (Ok(mut quit), Ok(mut term), Ok(mut int), Ok(mut hup)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) else {
            log::error!("cannot install signal handlers; shutting down");
            return ShutdownSignal::GracefulTerminate;
        };
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        loop {
            let signal = tokio::select! {
                _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
                _ = term.recv() => ShutdownSignal::GracefulTerminate,
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = hup.recv() => {
                    if !self.try_reload("SIGHUP") {
                        continue;
                    }
                    ShutdownSignal::GracefulUpgrade
                }
                _ = poll.tick() => {
                    if !(self.changed_and_stable() && self.try_reload("file changed")) {
                        continue;
                    }
                    ShutdownSignal::GracefulUpgrade
                }
            };
            LIFECYCLE.start_draining();
            crate::ops::lifecycle::notify_systemd("STOPPING=1");
            return signal;
        }
    }
}
