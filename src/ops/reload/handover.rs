//! The handover between the running process (the predecessor) and the process a reload starts
//! (the successor), over a socket pair the successor inherits. Nothing the successor can fail
//! at happens after the predecessor stops accepting:
//!
//! ```text
//!  predecessor                                   successor (breakwater -c FILE --upgrade)
//!  spawn, with the socket pair ───────────────►  compile the config (TLS, JWT keys, ...),
//!                                                bind-test listeners it does not inherit
//!             ◄─────────────────────────────── {"ready"} or {"refused": reason}, exit
//!  send the listening sockets over
//!  server.upgrade_sock (still accepting) ──────► receive them, assemble the server
//!             ◄─────────────────────────────── {"bootstrapped"}
//!  stop accepting (connections queue in the
//!  kernel), capture breaker, health and
//!  rate-limit state ───── {"go": state} ──────►  resume the state, start accepting
//!  drain: finish in-flight requests, close
//!  idle connections, exit after grace_period
//! ```
//!
//! Until `go`, the predecessor serves as before: if the successor refuses the config, dies,
//! or stalls, the predecessor logs why, counts the failure and goes on serving; the sockets it
//! sent are copies, so nothing of its own is lost. After `go` only the successor accepts, so
//! no new connection sees the old config once the new one answers.

use super::carry::Carried;
use pingora::server::Fds;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The successor's end of the socket pair, by file descriptor number.
const CHANNEL_FD_ENV: &str = "BREAKWATER_HANDOVER_FD";
/// The listen addresses whose sockets the successor will inherit, space separated.
const INHERITED_ENV: &str = "BREAKWATER_INHERITED_LISTENERS";

/// How long the successor may take to compile its config (a `jwks_url` fetch included).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long it may take to receive the sockets and assemble the server. Pingora's socket
/// transfer polls once a second, so this is a few of its rounds.
const BOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the successor waits for `go` before it starts anyway (the predecessor is gone or
/// stuck; serving without the carried state beats not serving).
const GO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Message {
    Ready { pid: u32 },
    Refused { reason: String },
    Bootstrapped,
    Go { carried: Carried },
}

/// One end of the socket pair, one JSON message per line.
struct Channel(BufReader<UnixStream>);

impl Channel {
    fn send(&mut self, message: &Message) -> Result<(), String> {
        let mut line = serde_json::to_vec(message).map_err(|e| e.to_string())?;
        line.push(b'\n');
        let socket = self.0.get_mut();
        socket
            .write_all(&line)
            .and_then(|()| socket.flush())
            .map_err(|e| format!("cannot talk to the other process: {e}"))
    }

    fn receive(&mut self, timeout: Duration) -> Result<Message, String> {
        self.0
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        match self.0.read_line(&mut line) {
            Ok(0) => Err("it exited".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("garbled message: {e}")),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(format!("no answer within {}s", timeout.as_secs()))
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

/// What the predecessor needs to start a successor.
pub struct Launch<'a> {
    pub config_path: &'a Path,
    pub daemon: bool,
    /// The listeners this process holds (proxy, TLS and admin), as Pingora names them.
    pub listeners: &'a [SocketAddr],
    pub upgrade_sock: &'a Path,
    /// Extra environment for the successor.
    pub env: &'a [(&'a str, &'a str)],
}

/// Why a successor did not take over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotTakenOver {
    /// It refused: the config does not compile, or a listener cannot be opened.
    Refused(String),
    /// It could not be started, died, or stalled.
    Failed(String),
}

impl std::fmt::Display for NotTakenOver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotTakenOver::Refused(reason) | NotTakenOver::Failed(reason) => f.write_str(reason),
        }
    }
}

/// A successor that holds the sockets and waits for `go`.
pub struct Handover {
    channel: Channel,
    pub pid: u32,
}

/// Starts a successor and takes it up to the point where it could serve: config compiled,
/// listening sockets received. On error the successor is gone or abandoned, and this process
/// goes on serving untouched.
pub fn launch(launch: &Launch<'_>) -> Result<Handover, NotTakenOver> {
    let (channel, pid) = start(launch).map_err(NotTakenOver::Failed)?;
    take_over(launch, channel, pid)
}

fn start(launch: &Launch<'_>) -> Result<(Channel, u32), String> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| format!("cannot create the handover socket: {e}"))?;
    let theirs_fd = theirs.as_raw_fd();
    let inherited: Vec<String> = launch.listeners.iter().map(|a| a.to_string()).collect();
    let mut command = Command::new(own_executable()?);
    command
        .arg("-c")
        .arg(launch.config_path)
        .arg("--upgrade")
        .env(CHANNEL_FD_ENV, theirs_fd.to_string())
        .env(INHERITED_ENV, inherited.join(" "))
        .envs(launch.env.iter().copied())
        .stdin(Stdio::null());
    if launch.daemon {
        command.arg("--daemon");
    }
    // SAFETY: between fork and exec only async-signal-safe calls: fcntl on an fd we own.
    unsafe {
        command.pre_exec(move || {
            let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
            if flags < 0 || libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start a new process: {e}"))?;
    drop(theirs);
    let pid = child.id();
    reap(child);
    Ok((Channel(BufReader::new(ours)), pid))
}

fn take_over(
    launch: &Launch<'_>,
    mut channel: Channel,
    pid: u32,
) -> Result<Handover, NotTakenOver> {
    let failed = |what: &str, e: String| {
        NotTakenOver::Failed(format!("the new process (pid {pid}) {what}: {e}"))
    };
    match channel.receive(READY_TIMEOUT) {
        Ok(Message::Ready { .. }) => {}
        Ok(Message::Refused { reason }) => return Err(NotTakenOver::Refused(reason)),
        Ok(other) => return Err(failed("said", format!("{other:?}"))),
        Err(e) => return Err(failed("did not get ready", e)),
    }
    let fds = listening_fds(launch.listeners);
    fds.send_to_sock(launch.upgrade_sock.to_string_lossy().as_ref())
        .map_err(|e| {
            failed(
                "did not take the listening sockets",
                format!("{} ({e})", launch.upgrade_sock.display()),
            )
        })?;
    match channel.receive(BOOTSTRAP_TIMEOUT) {
        Ok(Message::Bootstrapped) => Ok(Handover { channel, pid }),
        Ok(other) => Err(failed("said", format!("{other:?}"))),
        Err(e) => Err(failed("did not start", e)),
    }
}

impl Handover {
    /// Tells the successor to start accepting, with the state it carries on.
    pub fn go(mut self, carried: Carried) -> Result<(), String> {
        self.channel.send(&Message::Go { carried })
    }
}

/// Waits for the successor in the background so it does not linger as a zombie.
fn reap(mut child: Child) {
    std::thread::spawn(move || {
        let _ = child.wait();
    });
}

/// The executable to start: our own.
fn own_executable() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    // After a package upgrade replaced the binary, Linux reports the old inode's path with
    // this suffix; the file now at that path is the one to start.
    Ok(
        match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(path) => PathBuf::from(path),
            None => exe,
        },
    )
}

/// This process's listening TCP sockets bound to one of `addresses`, named as Pingora names
/// its listeners, for its socket transfer.
fn listening_fds(addresses: &[SocketAddr]) -> Fds {
    let mut fds = Fds::new();
    for (fd, bound) in crate::ops::listeners::listening_sockets().unwrap_or_default() {
        if addresses.contains(&bound) && fds.get(&bound.to_string()).is_none() {
            fds.add(bound.to_string(), fd);
        }
    }
    fds
}

/// The successor's side of a handover: present when this process was started by a reload.
pub struct Successor {
    channel: Channel,
    inherited: Vec<SocketAddr>,
}

impl Successor {
    /// The handover this process was started for, if any (and forgets it for its children).
    pub fn from_env() -> Option<Successor> {
        let fd: RawFd = std::env::var(CHANNEL_FD_ENV).ok()?.parse().ok()?;
        let inherited = std::env::var(INHERITED_ENV)
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|a| a.parse().ok())
            .collect();
        std::env::remove_var(CHANNEL_FD_ENV);
        std::env::remove_var(INHERITED_ENV);
        // SAFETY: the predecessor passed this fd to us for this purpose; we own it from here.
        let socket = unsafe { UnixStream::from_raw_fd(fd) };
        // Our own children (the next reload) must not inherit it.
        // SAFETY: plain fcntl on an fd we own.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
        Some(Successor {
            channel: Channel(BufReader::new(socket)),
            inherited,
        })
    }

    /// Binds each of `listeners` that will not be inherited, and lets go of it again, so a
    /// port that cannot be bound fails the reload while the predecessor still serves.
    pub fn check_new_listeners(&self, listeners: &[SocketAddr]) -> Result<(), String> {
        for addr in listeners.iter().filter(|a| !self.inherited.contains(a)) {
            if addr.port() == 0 {
                continue;
            }
            std::net::TcpListener::bind(addr)
                .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        }
        Ok(())
    }

    /// Tells the predecessor this process cannot take over, and why.
    pub fn refuse(mut self, reason: &str) {
        let _ = self.channel.send(&Message::Refused {
            reason: reason.to_string(),
        });
    }

    /// Config compiled: ready for the listening sockets.
    pub fn ready(&mut self) -> Result<(), String> {
        self.channel.send(&Message::Ready {
            pid: std::process::id(),
        })
    }

    /// Sockets received and server assembled; then waits for `go` and the carried state.
    /// `None` when the predecessor went away or took too long: start anyway.
    pub fn bootstrapped(mut self) -> Option<Carried> {
        self.channel.send(&Message::Bootstrapped).ok()?;
        match self.channel.receive(GO_TIMEOUT) {
            Ok(Message::Go { carried }) => Some(carried),
            Ok(other) => {
                log::warn!("reload: unexpected message from the previous process: {other:?}");
                None
            }
            Err(e) => {
                log::warn!("reload: no go from the previous process ({e}); starting anyway");
                None
            }
        }
    }
}
