//! The process lifecycle: whether it is ready to serve and whether it is draining (shutting
//! down or handing over to a reloaded successor), the background service that moves it along,
//! and the systemd notifications that tell a service manager about it.

use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the process serves traffic (`ready`) and whether it is shutting down (`draining`).
pub struct Lifecycle {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Lifecycle {
    pub const fn new() -> Lifecycle {
        Lifecycle {
            ready: AtomicBool::new(false),
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire) && !self.draining.load(Ordering::Acquire)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Marks the process as on its way out: `/ready` fails and responses close their
    /// connections, so clients move to the successor before idle connections are cut.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Lifecycle::new()
    }
}

/// The process-wide lifecycle.
pub static LIFECYCLE: Lifecycle = Lifecycle::new();

/// A background service that marks the process ready once every listener accepts
/// connections, and draining when shutdown or an upgrade begins.
pub struct LifecycleWatcher {
    /// Every address the process listens on (proxy, TLS and admin): ready waits for all.
    pub listen: Vec<std::net::SocketAddr>,
    /// Written with our pid once ready, so tools (and the next reload) find the process
    /// that serves, also in the foreground.
    pub pid_file: Option<std::path::PathBuf>,
}

/// Tells systemd (`Type=notify`, `NotifyAccess=all`) about readiness and the main pid, so a
/// reload's new process is tracked as the service. Does nothing outside systemd.
pub fn notify_systemd(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let sent = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| socket.send_to_addr(message.as_bytes(), &addr))
    } else {
        socket.send_to(message.as_bytes(), &path)
    };
    if let Err(e) = sent {
        log::debug!("sd_notify to {path} failed: {e}");
    }
}

#[async_trait::async_trait]
impl BackgroundService for LifecycleWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // Declared to depend on the proxy and admin services, this starts once Pingora calls
        // them ready, which it does before they bind: hence the wait.
        use crate::ops::listeners::{until_listening, LISTEN_DEADLINE};
        tokio::select! {
            listening = until_listening(&self.listen, LISTEN_DEADLINE) => {
                if let Err(e) = listening {
                    // Pingora has given up on the port by now and leaves the process up, half
                    // serving: better to end it, so a supervisor sees the failure.
                    log::error!("{e}: exiting");
                    notify_systemd(&format!("STATUS={e}"));
                    std::process::exit(1);
                }
            }
            _ = shutdown.changed() => {
                LIFECYCLE.draining.store(true, Ordering::Release);
                return;
            }
        }
        LIFECYCLE.ready.store(true, Ordering::Release);
        let pid = std::process::id();
        if let Some(pid_file) = &self.pid_file {
            if let Err(e) = std::fs::write(pid_file, format!("{pid}\n")) {
                log::warn!("cannot write pid file {}: {e}", pid_file.display());
            }
        }
        notify_systemd(&format!("READY=1\nMAINPID={pid}"));
        log::info!("breakwater is ready (pid {pid})");
        while !*shutdown.borrow() {
            if shutdown.changed().await.is_err() {
                return;
            }
        }
        LIFECYCLE.draining.store(true, Ordering::Release);
        log::info!("breakwater is draining: /ready now answers 503");
    }
}
