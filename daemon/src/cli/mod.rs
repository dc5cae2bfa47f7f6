//! The `berth` command line: parse it ([`args`]), turn it into the commands' configs
//! ([`config`]), and run the command, here or through a running daemon ([`client`]). This is
//! the only place that knows about clap.

pub mod args;
pub mod client;
pub mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory as _, FromArgMatches as _};

use args::{Cli, Command};

pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // BERTH_SOCKET is for the command the user typed: the processes berth starts (the
    // daemon's mounts, holders, engines) must not inherit it and turn into clients.
    // Single-threaded here, so changing the environment is sound.
    std::env::remove_var("BERTH_SOCKET");
    init_logging();
    let daemon_socket = cli.daemon_socket.clone().filter(|_| {
        // A daemon or an engine ignores a BERTH_SOCKET it finds in its environment.
        matches.value_source("daemon_socket") == Some(clap::parser::ValueSource::CommandLine)
            || !matches!(cli.command, Command::Daemon(_) | Command::Engine(_))
    });
    let result = match (daemon_socket, cli.command) {
        (Some(socket), command) => client::run(&socket, command, &matches),
        (None, command) => run_local(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the whole cause chain, outermost first.
            eprintln!("berth: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A subcommand without --socket: berth does the work itself.
fn run_local(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Mount(args) => {
            crate::heal::holder::run(args.holder_config(argv_after("mount"))?)
        }
        Command::Upgrade(args) => crate::heal::upgrade::run(
            &needs_mountpoint(args.mountpoint, "upgrade")?,
            args.binary.as_deref(),
            &args.state_dir,
        ),
        Command::Engine(args) => crate::engine::run(
            args.handoff_fd,
            args.mount.volume_config()?,
            args.mount.engine.sandbox_policy(),
        ),
        Command::Warm(args) => crate::warm::run(args.warm_config()?),
        Command::Status(args) => crate::status::run(
            &needs_mountpoint(args.mountpoint, "status")?,
            &args.state_dir,
            args.json,
        ),
        Command::Share(args) => crate::share::run(args.share_config(&argv_after("share"))?),
        Command::Daemon(args) => crate::api::run(args.daemon_config()?),
        Command::Volumes(args) => crate::api::print_volumes(&args.socket),
        Command::Unmount(args) => crate::unmount::run(&args.target),
        Command::Unshare(_) => anyhow::bail!(
            "berth unshare removes a share of a daemon: give its API socket, \
             `berth --socket PATH unshare VHOST_SOCKET` (a foreground `berth share` stops with Ctrl-C)"
        ),
    }
}

fn needs_mountpoint(mountpoint: Option<PathBuf>, command: &str) -> anyhow::Result<PathBuf> {
    mountpoint.ok_or_else(|| {
        anyhow::anyhow!(
            "berth {command} needs a MOUNTPOINT (or `berth --socket PATH {command}` to ask a daemon)"
        )
    })
}

/// The arguments after the subcommand (`mount`, `share`): what every engine the holder
/// starts is given.
fn argv_after(command: &str) -> Vec<std::ffi::OsString> {
    let mut args = std::env::args_os().skip(1);
    let _ = args.by_ref().find(|a| a == command);
    args.collect()
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("berth=info,warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
