//! `breakwater reload`: asks the running instance to reload its config and waits for the
//! outcome, so a deploy script or systemd's `ExecReload` learns whether the new config is in
//! force or was refused, and why.

use super::{status_path, ReloadStatus};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest wait for the running instance to report (a successor compiling its config, a
/// `jwks_url` fetch included, then taking over the sockets).
const WAIT: Duration = Duration::from_secs(180);

/// The pid file the config names (`server.pid_file`), read leniently: the file may be the
/// new, possibly invalid, config; its pid file is where the running instance writes.
fn pid_file_of(config: &Path) -> PathBuf {
    let configured = std::fs::read_to_string(config)
        .ok()
        .and_then(|text| serde_yaml::from_str::<serde_yaml::Value>(&text).ok())
        .and_then(|v| {
            v.get("server")?
                .get("pid_file")?
                .as_str()
                .map(PathBuf::from)
        });
    configured.unwrap_or_else(|| PathBuf::from("/tmp/breakwater.pid"))
}

fn read_status(path: &Path) -> Option<ReloadStatus> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Signals the instance whose pid file `config` names, waits for the outcome and prints it.
/// `Ok` when the new config is in force; `Err` with what to print otherwise.
pub fn request_reload(config: &Path) -> Result<String, String> {
    let pid_file = pid_file_of(config);
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| format!("cannot read the pid file {}: {e}", pid_file.display()))?
        .trim()
        .parse()
        .map_err(|_| format!("{} does not hold a pid", pid_file.display()))?;
    let status_file = status_path(&pid_file);
    let before = read_status(&status_file);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGHUP,
    )
    .map_err(|e| format!("cannot signal process {pid}: {e}"))?;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let Some(status) = read_status(&status_file) else {
            continue;
        };
        if Some(&status) == before.as_ref() {
            continue;
        }
        return match status.outcome.as_str() {
            "applied" => Ok(format!(
                "reload applied: process {} serves {}",
                status.pid,
                config.display()
            )),
            outcome => Err(format!(
                "reload {outcome}, process {} still serves the previous config: {}",
                status.pid, status.message
            )),
        };
    }
    Err(format!(
        "process {pid} did not report within {}s (see its log)",
        WAIT.as_secs()
    ))
}
