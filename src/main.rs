//! The `breakwater` command: run the gateway, or check a config file.

use breakwater::ops::reload::carry;
use breakwater::ops::reload::command::request_reload;
use breakwater::ops::reload::handover::Successor;
use breakwater::ops::reload::{ReloadWatch, Serving};
use breakwater::runtime;
use breakwater::server::{self, StartOptions};
use clap::{Parser, Subcommand};
use pingora::server::RunArgs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

// glibc's malloc was a tenth of the CPU time of a proxied request; mimalloc's thread-local
// free lists suit the many small, short-lived allocations of a request.
// A `heap-profiling` build leaves the system allocator in place, so heaptrack or valgrind see
// every allocation.
#[cfg(not(feature = "heap-profiling"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for an invalid config, distinct from a crash (1).
const EXIT_INVALID_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(name = "breakwater", version, about = "An edge API gateway on Pingora")]
struct Cli {
    /// Configuration file (YAML).
    #[arg(short, long, global = true, default_value = "conf/gateway.yaml")]
    config: PathBuf,
    /// Run in the background.
    #[arg(short, long)]
    daemon: bool,
    /// Take over the listening sockets of a running instance (graceful upgrade).
    #[arg(short, long)]
    upgrade: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Validate the configuration file and exit: 0 when valid, 2 when not.
    Check,
    /// Ask the running instance (found through `server.pid_file`) to reload this file, and
    /// wait for the outcome: 0 when applied, 1 when refused or failed.
    Reload,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,pingora_core=warn,pingora_proxy=warn"),
    )
    .init();
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => check(&cli.config),
        Command::Reload => match request_reload(&cli.config) {
            Ok(applied) => {
                println!("{applied}");
                ExitCode::SUCCESS
            }
            Err(refused) => {
                eprintln!("error: {refused}");
                ExitCode::FAILURE
            }
        },
        Command::Run => run(
            cli.config,
            StartOptions {
                daemon: cli.daemon,
                upgrade: cli.upgrade,
            },
        ),
    }
}

fn check(config: &Path) -> ExitCode {
    match runtime::prepare(config) {
        Ok(compiled) => {
            println!(
                "{}: ok ({} services, {} routes)",
                config.display(),
                compiled.service_count(),
                compiled.route_count()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_INVALID_CONFIG)
        }
    }
}

/// Runs the gateway. A process started by a reload (see `ops::reload::handover`) reports to
/// its predecessor at each step, so that everything that can fail fails while the predecessor
/// still serves.
fn run(config: PathBuf, start: StartOptions) -> ExitCode {
    let mut successor = Successor::from_env();
    let compiled = match runtime::prepare(&config) {
        Ok(compiled) => compiled,
        Err(e) => {
            eprintln!("error: {e}");
            if let Some(successor) = successor {
                successor.refuse(&e.to_string());
            }
            return ExitCode::from(EXIT_INVALID_CONFIG);
        }
    };
    let listeners = compiled.listeners();
    if let Some(s) = successor.as_mut() {
        let ready = s.check_new_listeners(&listeners).and_then(|()| s.ready());
        if let Err(e) = ready {
            eprintln!("error: cannot take over: {e}");
            if let Some(successor) = successor {
                successor.refuse(&e);
            }
            return ExitCode::FAILURE;
        }
    }
    breakwater::ops::reload::count_if_reloaded();
    let (upgrade_sock, pid_file) = (
        compiled.server.upgrade_sock.clone(),
        compiled.server.pid_file.clone(),
    );
    let assembled = match server::build(compiled, &start) {
        Ok(assembled) => assembled,
        Err(e) => {
            eprintln!("error: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(carried) = successor.and_then(Successor::bootstrapped) {
        let resumed = carry::resume(&assembled.runtime, &carried);
        log::info!(
            "reload: resumed the state of {} upstreams and {} rate-limit keys",
            resumed.upstreams,
            resumed.rate_limit_keys
        );
    }
    let serving = Serving {
        runtime: assembled.runtime,
        accept_stopped: assembled.accept_stopped,
        listeners,
        upgrade_sock,
        pid_file,
    };
    let watch = ReloadWatch::new(config, start, serving);
    assembled.server.run(RunArgs {
        shutdown_signal: Box::new(watch),
    });
    ExitCode::SUCCESS
}
