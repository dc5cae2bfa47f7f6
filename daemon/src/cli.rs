//! The `berth` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};

use crate::cache::EnginePreference;
use crate::units::{parse_duration, parse_mode, parse_size, parse_ttl, Ttl};

#[derive(Parser, Debug)]
#[command(
    name = "berth",
    version,
    about = "Object storage (S3 and S3-compatible, or a local directory) as a filesystem",
    long_about = "berth serves object storage as a filesystem on a Kubernetes node.\n\n\
                  With --socket PATH before the subcommand, mount, unmount, status, warm,\n\
                  upgrade, share and unshare act through a running `berth daemon` instead.\n\n\
                  Logging: set RUST_LOG (default: berth=info)."
)]
pub struct Cli {
    /// Act through the running `berth daemon` listening on this API socket (mount, unmount,
    /// status, warm, upgrade, share, unshare, volumes). Goes before the subcommand:
    /// `berth share --socket` and `berth daemon --socket` name other sockets.
    #[arg(long = "socket", env = "BERTH_SOCKET", value_name = "PATH")]
    pub daemon_socket: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Mount SOURCE at MOUNTPOINT and serve it until unmounted (runs in the foreground).
    ///
    /// Prints one line starting with "berth: mounted" when the mount is ready. Stops and
    /// unmounts on SIGINT/SIGTERM (a second signal forces it while files are open), or exits
    /// by itself when the mountpoint is unmounted with `umount`.
    Mount(MountArgs),

    /// Preload objects into the block cache, with bounded concurrency and a progress display.
    ///
    /// For paths inside a berth mount, every file below them is read through the mount (its
    /// process owns the cache). For s3:// sources, objects are read straight into --cache-dir,
    /// which must not be in use by a running mount, or into a daemon's node cache with
    /// --cache-socket. The cache quota is respected: if the data
    /// is larger than the cache, the oldest blocks are evicted and a warning says so.
    Warm(WarmArgs),

    /// Show what a running `berth mount` reports: engine generation and recoveries, inodes,
    /// memory, cache hits and misses.
    Status(StatusArgs),

    /// Replace the engine serving a mount with a new binary, without unmounting: the old
    /// engine finishes open writes and stops at a request boundary, the new one takes over
    /// the connection. Applications see a short stall, no error.
    Upgrade(UpgradeArgs),

    /// Serve connections handed over by a holder (started by `berth mount`, not by hand).
    #[command(hide = true)]
    Engine(EngineArgs),

    /// Serve SOURCE to one virtual machine over vhost-user virtio-fs (runs in the foreground).
    ///
    /// Listens on --socket; a VMM (QEMU `vhost-user-fs-pci`, Cloud Hypervisor `--fs`, Kata)
    /// connects and the guest mounts it with `mount -t virtiofs TAG DIR` (the tag is set on
    /// the VMM side). Prints one line starting with "berth: sharing" when the socket is ready.
    /// When the VMM goes away, berth listens again on the same path. Stops on SIGINT/SIGTERM.
    /// See docs/virtiofs.md.
    Share(ShareArgs),

    /// Run the node daemon: own every mount and share on the node and serve the gRPC API
    /// (proto/berth/v1/daemon.proto) on a unix socket.
    Daemon(crate::api::DaemonArgs),

    /// List the volumes of a running `berth daemon` (as JSON lines), through its socket.
    Volumes(VolumesArgs),

    /// Unmount a berth mount safely: every layer at TARGET, never lazily; fails (and changes
    /// nothing) while files are open. With --socket: the daemon unbinds TARGET, and stops the
    /// volume's mount process when its last target goes.
    Unmount(UnmountArgs),

    /// Remove a virtio-fs share of a running `berth daemon` (needs --socket before the
    /// subcommand); a foreground `berth share` stops with Ctrl-C or SIGTERM instead.
    Unshare(UnshareArgs),
}

#[derive(Args, Debug, Clone)]
pub struct UnmountArgs {
    /// A berth mountpoint, or (with --socket) a target the daemon mounted.
    pub target: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct UnshareArgs {
    /// The vhost-user socket of the share (as given to `berth --socket PATH share --socket`).
    pub vhost_socket: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct UpgradeArgs {
    /// The mountpoint of a running `berth mount`. With --socket: a target of the daemon
    /// [default with --socket: every volume of the daemon].
    pub mountpoint: Option<PathBuf>,

    /// The new berth binary [default: the binary the mount runs now].
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,

    /// The --state-dir the mount uses.
    #[arg(long, value_name = "DIR", default_value = "/run/berth")]
    pub state_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// The socket to the holder (inherited fd).
    #[arg(long, value_name = "FD")]
    pub handoff_fd: i32,

    #[command(flatten)]
    pub mount: MountArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ShareArgs {
    /// `s3://BUCKET[/PREFIX]`, or a local directory used as an object store.
    #[arg(required_unless_present = "mount")]
    pub source: Option<String>,

    /// Instead of starting an engine of its own, have the engine of the running `berth mount`
    /// at MOUNTPOINT serve the VM: pods and the VM then share one inode table and one cache.
    /// Returns once the socket is served; the share lives as long as that mount.
    #[arg(long, value_name = "MOUNTPOINT", conflicts_with = "source")]
    pub mount: Option<PathBuf>,

    /// With --mount: stop the share on --socket instead of adding it.
    #[arg(long, requires = "mount")]
    pub remove: bool,

    /// The vhost-user socket to listen on (a stale file there is replaced).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// Request queues offered to the guest (QEMU: num-request-queues, at most this many).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub request_queues: usize,

    /// Largest virtqueue size accepted (QEMU: queue-size).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub queue_size: u16,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub cache: CacheArgs,

    /// Refuse every change (dataset mode; metadata cached for the life of the share).
    #[arg(long)]
    pub read_only: bool,

    #[command(flatten)]
    pub engine: EngineFlags,

    /// Where the engine keeps its state (inode journal, status file).
    #[arg(long, value_name = "DIR", default_value = "/run/berth")]
    pub state_dir: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct VolumesArgs {
    /// The daemon's API socket.
    #[arg(long, value_name = "PATH", default_value = "/run/berth/daemon.sock")]
    pub socket: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The mountpoint of a running `berth mount`. With --socket: a target of the daemon
    /// [default with --socket: every volume, and the node totals].
    pub mountpoint: Option<PathBuf>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,

    /// The --state-dir the mount uses.
    #[arg(long, value_name = "DIR", default_value = "/run/berth")]
    pub state_dir: PathBuf,
}

/// How an engine serves a volume: metadata trust, memory, readahead, ownership. Shared by
/// `berth mount` and `berth share` (and the engine a holder starts).
#[derive(Args, Debug, Clone)]
pub struct EngineFlags {
    /// How long metadata (stat, lookups, negative lookups) is trusted before asking the store
    /// again: e.g. 500ms, 1s, 5m, or `indefinite`. [default: 1s; indefinite with --read-only]
    #[arg(long, value_name = "DURATION", value_parser = parse_ttl)]
    pub metadata_ttl: Option<Ttl>,

    /// Memory for prefetched data and write buffers, across all open files.
    #[arg(long, value_name = "SIZE", default_value = "1GiB", value_parser = parse_size)]
    pub memory_limit: u64,

    /// Multipart upload part size (S3 needs >= 5MiB; at most 10,000 parts per object).
    #[arg(long, value_name = "SIZE", default_value = "8MiB", value_parser = parse_size)]
    pub part_size: u64,

    /// Largest readahead window of one sequential reader.
    #[arg(long, value_name = "SIZE", default_value = "64MiB", value_parser = parse_size)]
    pub max_prefetch: u64,

    /// Ranged GETs in flight at once, across all open files.
    #[arg(long, value_name = "N", default_value_t = 32)]
    pub max_gets: usize,

    /// Owner of every file and directory [default: the user running berth].
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,

    /// Group of every file and directory [default: the group running berth].
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,

    /// Permission bits of files.
    #[arg(long, value_name = "MODE", default_value = "0644", value_parser = parse_mode)]
    pub file_mode: u32,

    /// Permission bits of directories.
    #[arg(long, value_name = "MODE", default_value = "0755", value_parser = parse_mode)]
    pub dir_mode: u32,
}

#[derive(Args, Debug, Clone)]
pub struct MountArgs {
    /// `s3://BUCKET[/PREFIX]`, or a local directory used as an object store.
    #[arg(default_value = "berth-data")]
    pub source: String,

    /// Directory to mount on (created if missing).
    #[arg(default_value = "berth-mnt")]
    pub mountpoint: PathBuf,

    /// Serve another source at another mountpoint from this process, with the same flags,
    /// sharing one memory budget and one block cache (two mounts of one bucket read a block
    /// from the store once). Repeatable.
    #[arg(long, num_args = 2, value_names = ["SOURCE", "MOUNTPOINT"], action = clap::ArgAction::Append)]
    pub also: Vec<String>,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub cache: CacheArgs,

    #[command(flatten)]
    pub heal: crate::heal::HealArgs,

    /// Refuse every change; metadata is then cached for the life of the mount unless
    /// --metadata-ttl says otherwise (dataset mode).
    #[arg(long)]
    pub read_only: bool,

    #[command(flatten)]
    pub engine: EngineFlags,

    /// FUSE worker threads, each on its own cloned /dev/fuse queue.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub threads: usize,

    /// Where the engine keeps state a successor can take over (inode journal).
    #[arg(long, value_name = "DIR", default_value = "/run/berth")]
    pub state_dir: PathBuf,
}

/// How to reach the object store (shared by the commands that talk to one).
#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// S3 endpoint for S3-compatible stores (MinIO, SeaweedFS, COS, OSS...). Implies
    /// path-style addressing unless --virtual-hosted is given.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    pub endpoint_url: Option<String>,

    /// S3 region (default: from the AWS config chain, else us-east-1).
    #[arg(long, env = "AWS_REGION", value_name = "REGION")]
    pub region: Option<String>,

    /// Use virtual-hosted-style addressing with --endpoint-url.
    #[arg(long)]
    pub virtual_hosted: bool,

    /// How long one store request is retried (with backoff) before the operation fails with
    /// EIO. Also bounds the start-up check.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    pub request_deadline: Duration,
}

/// The node block cache.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// Node-wide block cache directory: blocks read from the store are kept here (and in
    /// memory) and survive restarts. Without it, every read goes to the store.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Use the node cache of a running `berth daemon --cache-dir` (its socket is
    /// `<daemon state dir>/cache.sock`): one disk quota and one index for every mount of the
    /// node. --cache-size is then the daemon's; --block-size must match the daemon's.
    #[arg(long, value_name = "PATH", conflicts_with = "cache_dir")]
    pub cache_socket: Option<PathBuf>,

    /// Disk quota of the block cache (never exceeded).
    #[arg(long, value_name = "SIZE", default_value = "10GiB", value_parser = parse_size)]
    pub cache_size: u64,

    /// Memory tier of the block cache (recently used blocks).
    #[arg(long, value_name = "SIZE", default_value = "256MiB", value_parser = parse_size)]
    pub cache_memory: u64,

    /// I/O engine of the cache disk: `auto` (io_uring, falling back to a thread pool when the
    /// kernel or a seccomp profile refuses it), `io-uring`, or `threads`.
    #[arg(long, value_name = "ENGINE", default_value = "auto")]
    pub cache_io: EnginePreference,
    /// Ranged GET size (the unit of reads and prefetch).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub block_size: u64,
}

#[derive(Args, Debug, Clone)]
pub struct WarmArgs {
    /// What to preload: paths inside a berth mount (files or directories, read through the
    /// mount so that its cache fills), or `s3://BUCKET[/PREFIX]` (read into --cache-dir).
    #[arg(required = true, value_name = "PATH")]
    pub paths: Vec<String>,

    /// Objects read at once.
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub concurrency: usize,

    #[command(flatten)]
    pub store: StoreArgs,

    #[command(flatten)]
    pub cache: CacheArgs,
}

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
        (Some(socket), command) => crate::client::run(&socket, command, &matches),
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
        Command::Mount(args) => crate::heal::holder::run(args, engine_argv()),
        Command::Upgrade(args) => crate::heal::upgrade::run(
            &needs_mountpoint(args.mountpoint, "upgrade")?,
            args.binary.as_deref(),
            &args.state_dir,
        ),
        Command::Engine(args) => crate::engine::run(args),
        Command::Warm(args) => crate::warm::run(args),
        Command::Status(args) => crate::status::run(
            &needs_mountpoint(args.mountpoint, "status")?,
            &args.state_dir,
            args.json,
        ),
        Command::Share(args) => crate::share::run(args),
        Command::Daemon(args) => crate::api::run(args),
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

/// The arguments after `mount`, given to every engine the holder starts.
fn engine_argv() -> Vec<std::ffi::OsString> {
    let mut args = std::env::args_os().skip(1);
    let _ = args.by_ref().find(|a| a == "mount");
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn mount_defaults_to_the_local_directory_store() {
        let cli = Cli::try_parse_from(["berth", "mount"]).unwrap();
        let Command::Mount(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.source, "berth-data");
        assert_eq!(args.mountpoint, PathBuf::from("berth-mnt"));
        assert_eq!(args.engine.part_size, 8 << 20);
        assert_eq!(args.cache.block_size, 1 << 20);
        assert!(args.cache.cache_dir.is_none());
        assert!(args.engine.metadata_ttl.is_none());
    }

    #[test]
    fn also_takes_source_and_mountpoint_pairs() {
        let cli = Cli::try_parse_from([
            "berth", "mount", "s3://a", "/m/a", "--also", "s3://b/p", "/m/b", "--also", "dir",
            "/m/c",
        ])
        .unwrap();
        let Command::Mount(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.also, ["s3://b/p", "/m/b", "dir", "/m/c"]);
        assert!(Cli::try_parse_from(["berth", "mount", "--also", "s3://b"]).is_err());
    }

    #[test]
    fn share_needs_a_socket() {
        let cli =
            Cli::try_parse_from(["berth", "share", "s3://b", "--socket", "/run/b.sock"]).unwrap();
        let Command::Share(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.socket, PathBuf::from("/run/b.sock"));
        assert_eq!(args.request_queues, 1);
        assert!(Cli::try_parse_from(["berth", "share", "s3://b"]).is_err());
        // A share of a running mount names the mount, not a source.
        let cli = Cli::try_parse_from(["berth", "share", "--mount", "/m", "--socket", "/s"]);
        assert!(cli.is_ok_and(|c| matches!(c.command, Command::Share(a) if a.source.is_none())));
        assert!(Cli::try_parse_from(["berth", "share", "--socket", "/s"]).is_err());
        assert!(Cli::try_parse_from([
            "berth", "share", "s3://b", "--mount", "/m", "--socket", "/s"
        ])
        .is_err());
        // --remove without --mount: refused before anything is done.
        let cli = Cli::try_parse_from(["berth", "share", "s3://b", "--remove", "--socket", "/s"]);
        let Ok(Cli {
            command: Command::Share(args),
            ..
        }) = cli
        else {
            panic!("parsed as another command");
        };
        let err = crate::share::run(args).unwrap_err();
        assert!(format!("{err:#}").contains("--remove"), "{err:#}");
    }

    #[test]
    fn the_daemon_socket_goes_before_the_subcommand() {
        let cli = Cli::try_parse_from([
            "berth",
            "--socket",
            "/run/d.sock",
            "share",
            "s3://b",
            "--socket",
            "/run/v.sock",
        ])
        .unwrap();
        assert_eq!(cli.daemon_socket, Some(PathBuf::from("/run/d.sock")));
        let Command::Share(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert_eq!(args.socket, PathBuf::from("/run/v.sock"));
        let cli = Cli::try_parse_from(["berth", "--socket", "/d", "status"]).unwrap();
        let Command::Status(args) = cli.command else {
            panic!("parsed as another command");
        };
        assert!(args.mountpoint.is_none());
        let cli = Cli::try_parse_from(["berth", "unmount", "/mnt/x"]).unwrap();
        assert!(matches!(cli.command, Command::Unmount(_)));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        let err = Cli::try_parse_from(["berth", "mount", "--memory-limit", "banana"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
