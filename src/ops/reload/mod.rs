//! Hot reload: watches the config file (and `SIGHUP`), and hands the listening sockets and the
//! state worth keeping to a new process of ourselves that runs the new config.
//!
//! Pingora asks a `ShutdownSignalWatch` when to stop; ours starts a successor when the file
//! changes or `SIGHUP` arrives, and answers "terminate gracefully" once the successor holds the
//! sockets and is ready to accept (see [`handover`] for the sequence). Pingora then stops this
//! process's accept loops at once, so the switch is atomic: no new connection reaches the old
//! config once the new one accepts. In-flight requests finish; idle keep-alive connections are
//! closed while idle, busy ones get `Connection: close` on their response (the connection
//! [`front`](crate::server::front)). The successor resumes breakers, health verdicts and local
//! rate-limit buckets ([`carry`]).
//!
//! Every outcome is logged, counted in `breakwater_config_reloads_total` (`error` here,
//! `success` by the successor) and written to the reload status file next to the pid file,
//! which `breakwater reload` waits on.

pub mod carry;
pub mod command;
pub mod handover;

use crate::ops::lifecycle::{notify_systemd, LIFECYCLE};
use crate::ops::metrics::METRICS;
use crate::runtime::Runtime;
use crate::server::front::AcceptStopped;
use crate::server::StartOptions;
use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use serde::{Deserialize, Serialize};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::signal::unix::{signal, SignalKind};

/// How often the config file is read to look for changes.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// Set in the environment of a process started by a reload, so it counts the success.
const RELOADED_ENV: &str = "BREAKWATER_RELOADED";
/// Longest wait for this process's accept loops to stop before the successor is let go.
const STOP_ACCEPTING_TIMEOUT: Duration = Duration::from_secs(2);

/// What this process serves, for starting a successor.
pub struct Serving {
    pub runtime: Arc<Runtime>,
    pub accept_stopped: Arc<AcceptStopped>,
    /// Every listener it holds: proxy, TLS and admin.
    pub listeners: Vec<SocketAddr>,
    pub upgrade_sock: PathBuf,
    pub pid_file: PathBuf,
}

/// Pingora's shutdown-signal source, extended with config reloads.
pub struct ReloadWatch {
    config_path: PathBuf,
    start: StartOptions,
    serving: Serving,
    state: Mutex<WatchState>,
}

struct WatchState {
    /// Hash of the file content this process serves, or last refused.
    settled: u64,
    /// Hash seen at the previous poll: a change is acted on once two polls agree, so a
    /// file caught half-written is not reported as invalid.
    last_seen: u64,
}

fn hash_file(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// The outcome of the last reload, as `breakwater reload` reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadStatus {
    /// `applied`, or `refused` (the new config is invalid), or `failed` (it is valid but the
    /// new process could not take over).
    pub outcome: String,
    pub message: String,
    /// The process serving now.
    pub pid: u32,
    /// When, in milliseconds since the Unix epoch.
    pub at_ms: u64,
}

/// Where the outcome of reloads is written: next to the pid file.
pub fn status_path(pid_file: &Path) -> PathBuf {
    let mut name = pid_file.as_os_str().to_owned();
    name.push(".reload");
    PathBuf::from(name)
}

fn write_status(pid_file: &Path, outcome: &str, message: &str, pid: u32) {
    let status = ReloadStatus {
        outcome: outcome.to_string(),
        message: message.to_string(),
        pid,
        at_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    let path = status_path(pid_file);
    let tmp = path.with_extension("reload.tmp");
    let written = serde_json::to_vec(&status)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        log::warn!("cannot write the reload status {}: {e}", path.display());
    }
}

impl ReloadWatch {
    /// `config_path` is the file this process loaded.
    pub fn new(config_path: PathBuf, start: StartOptions, serving: Serving) -> ReloadWatch {
        // Absolute, but symlinks kept: a Kubernetes ConfigMap directory swaps its target on
        // update, and the link is what must be read again.
        let config_path = std::path::absolute(&config_path).unwrap_or(config_path);
        let hash = hash_file(&config_path).unwrap_or_default();
        ReloadWatch {
            config_path,
            start,
            serving,
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

    /// Starts a successor with the current file and takes it to where it can accept. On
    /// failure this process keeps serving; the reason is logged, counted and written down.
    fn try_handover(&self, trigger: &str) -> Option<handover::Handover> {
        // Whatever the outcome, this content has been dealt with.
        self.settle();
        let launch = handover::Launch {
            config_path: &self.config_path,
            daemon: self.start.daemon,
            listeners: &self.serving.listeners,
            upgrade_sock: &self.serving.upgrade_sock,
            env: &[(RELOADED_ENV, "1")],
        };
        match handover::launch(&launch) {
            Ok(handover) => Some(handover),
            Err(not_taken) => {
                METRICS
                    .config_reloads_total
                    .with_label_values(&["error"])
                    .inc();
                let outcome = match &not_taken {
                    handover::NotTakenOver::Refused(_) => "refused",
                    handover::NotTakenOver::Failed(_) => "failed",
                };
                log::error!(
                    "config reload ({trigger}) {outcome}, still serving the previous config: {not_taken}"
                );
                write_status(
                    &self.serving.pid_file,
                    outcome,
                    &not_taken.to_string(),
                    std::process::id(),
                );
                None
            }
        }
    }

    /// Once this process stopped accepting, hands the state over and lets the successor go.
    fn let_go(&self, handover: handover::Handover, trigger: String) {
        let runtime = Arc::clone(&self.serving.runtime);
        let stopped = Arc::clone(&self.serving.accept_stopped);
        let pid_file = self.serving.pid_file.clone();
        std::thread::spawn(move || {
            if !stopped.wait(STOP_ACCEPTING_TIMEOUT) {
                log::warn!("reload: the listeners did not report stopping; letting go anyway");
            }
            let carried = carry::capture(&runtime);
            let pid = handover.pid;
            let (upstreams, limits) = (carried.upstreams.len(), carried.rate_limits.len());
            match handover.go(carried) {
                Ok(()) => {
                    log::info!(
                        "config reload ({trigger}) applied: process {pid} accepts now, with the \
                         state of {upstreams} upstreams and {limits} rate limits; this one drains"
                    );
                    write_status(&pid_file, "applied", "", pid);
                }
                Err(e) => log::error!("config reload ({trigger}): {e}"),
            }
        });
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
            let trigger = tokio::select! {
                // A successor started by hand (`breakwater -u`) takes the sockets the way
                // Pingora does it.
                _ = quit.recv() => {
                    LIFECYCLE.start_draining();
                    notify_systemd("STOPPING=1");
                    return ShutdownSignal::GracefulUpgrade;
                }
                _ = term.recv() => {
                    LIFECYCLE.start_draining();
                    notify_systemd("STOPPING=1");
                    return ShutdownSignal::GracefulTerminate;
                }
                _ = int.recv() => return ShutdownSignal::FastShutdown,
                _ = hup.recv() => "SIGHUP",
                _ = poll.tick() => {
                    if !self.changed_and_stable() {
                        continue;
                    }
                    "file changed"
                }
            };
            // The handover blocks on the successor; it must not hold up this runtime's timers.
            let attempt = tokio::task::block_in_place(|| self.try_handover(trigger));
            let Some(handover) = attempt else {
                continue;
            };
            notify_systemd(&format!("RELOADING=1\nMAINPID={}", handover.pid));
            LIFECYCLE.start_draining();
            self.let_go(handover, trigger.to_string());
            // Stops the accept loops now; in-flight requests get `server.grace_period`.
            return ShutdownSignal::GracefulTerminate;
        }
    }
}
