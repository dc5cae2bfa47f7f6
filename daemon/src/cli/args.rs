//! Every flag of the `berth` command line, as clap structs. Nothing outside `cli/` sees
//! these types: [`super::config`] turns them into the config structs each layer takes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::cache::EnginePreference;
use crate::units::{parse_duration, parse_mode, parse_size, parse_ttl, Ttl};

/// FUSE worker threads of a mount (and of a share's engine) unless --threads says otherwise.
pub const DEFAULT_THREADS: usize = 4;

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

    /// Serve SOURCE to virtual machines over vhost-user virtio-fs (runs in the foreground).
    ///
    /// Listens on --socket; a VMM (QEMU `vhost-user-fs-pci`, Cloud Hypervisor `--fs`, Kata)
    /// connects and the guest mounts it with `mount -t virtiofs TAG DIR` (the tag is set on
    /// the VMM side). Prints one line starting with "berth: sharing" when the socket is ready.
    /// This process keeps the socket and every VMM connection; an engine it starts serves the
    /// guests and is replaced, without the guests seeing an error, when it dies, hangs or is
    /// upgraded (`berth upgrade SOCKET`). Stops on SIGINT/SIGTERM. See docs/virtiofs.md.
    Share(ShareArgs),

    /// Run the node daemon: own every mount and share on the node and serve the gRPC API
    /// (proto/berth/v1/daemon.proto) on a unix socket.
    Daemon(DaemonArgs),

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

    #[command(flatten)]
    pub heal: HealArgs,

    /// Refuse every change (dataset mode; metadata cached for the life of the share).
    #[arg(long)]
    pub read_only: bool,

    #[command(flatten)]
    pub engine: EngineFlags,

    /// Where the engine keeps its state (inode journal, status file).
    #[arg(long, value_name = "DIR", default_value = "/run/berth")]
    pub state_dir: PathBuf,

    /// A group (name or number) whose processes (a VMM not running as root) may connect to
    /// the share's socket, besides root. Without it only root may connect.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
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

    /// Show every file and directory with --uid, --gid, --file-mode and --dir-mode, whatever
    /// owner and permission bits the objects carry (for mounts shared by many users).
    /// chmod and chown are still stored; symbolic links and mtimes are still honoured.
    #[arg(long)]
    pub ignore_stored_metadata: bool,

    /// Sandbox the process that parses requests (a mount's engines, a standalone share), as
    /// virtiofsd does: capabilities dropped but file access, no_new_privs, a seccomp allowlist
    /// (a syscall outside it kills the engine; its holder starts another). `log`: allow and
    /// log such a syscall (kernel log, audit type 1326) instead. Given explicitly, a kernel
    /// that refuses a step is an error; by default it is a warning and berth serves
    /// unsandboxed. [default: on]
    #[arg(long, value_enum, value_name = "on|off|log", env = "BERTH_SANDBOX")]
    pub sandbox: Option<SandboxArg>,
}

/// `--sandbox`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SandboxArg {
    On,
    Off,
    Log,
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
    pub heal: HealArgs,

    /// Refuse every change; metadata is then cached for the life of the mount unless
    /// --metadata-ttl says otherwise (dataset mode).
    #[arg(long)]
    pub read_only: bool,

    #[command(flatten)]
    pub engine: EngineFlags,

    /// FUSE worker threads, each on its own cloned /dev/fuse queue.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_THREADS)]
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

    /// Objects above this size get new metadata (chmod, chown, utimes) through a multipart
    /// copy in parts of this size (S3 takes at most 5 GiB in one copy). For tests.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, hide = true)]
    pub copy_part_size: Option<u64>,
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

/// Flags of `berth mount` about self-healing.
#[derive(Args, Debug, Clone)]
pub struct HealArgs {
    /// Do not load the eBPF probes: detect a dead or hung engine with its socket, the held
    /// /dev/fuse fds and fusectl only (also used when eBPF cannot load).
    #[arg(long)]
    pub no_ebpf: bool,

    /// An engine that has requests waiting and finishes none for this long is hung: it is
    /// killed and replaced. [default: --request-deadline + 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub hang_timeout: Option<Duration>,

    /// An engine whose heartbeat stops for this long is frozen (stopped, or its runtime
    /// wedged): it is killed and replaced. An engine waiting on a slow store keeps beating,
    /// so this never fires for store latency. 0 turns the heartbeat check off.
    #[arg(long, value_name = "DURATION", default_value = "750ms", value_parser = parse_duration)]
    pub freeze_timeout: Duration,
}

#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Unix socket to serve the API on (its directory is created; a stale socket is replaced).
    #[arg(long, value_name = "PATH", default_value = "/run/berth/daemon.sock")]
    pub socket: PathBuf,

    /// State of the daemon and its mounts (inode journals, status files, volume mountpoints).
    #[arg(long, value_name = "DIR", default_value = "/run/berth")]
    pub state_dir: PathBuf,

    /// Node cache directory: one disk tier (data file, index, quota) for every volume of the
    /// node. The daemon owns it and serves its index to the mount processes on
    /// `<state-dir>/cache.sock`; they read and write the data file themselves. Without it,
    /// volumes have no block cache.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Disk quota of the node cache, for all volumes together (never exceeded).
    #[arg(long, value_name = "SIZE", default_value = "10GiB", value_parser = parse_size)]
    pub cache_size: u64,

    /// Block size of the node cache: the ranged GET size of every volume (a volume's
    /// `block-size` option must equal it).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub block_size: u64,

    /// Serve Prometheus metrics at http://ADDR/metrics (off by default), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// What the daemon's exit does to its volumes. `unmount`: unbind every target and stop
    /// every mount. `keep` (for a DaemonSet, where pods keep using their volumes across a
    /// daemon restart): leave the volumes recorded in --state-dir and kill the mount
    /// processes without unmounting; the next daemon restores every volume and re-binds the
    /// targets (applications see errors only in between). Recorded volumes are restored at
    /// start in either mode (after a crash, too).
    #[arg(long, value_enum, value_name = "WHAT", default_value = "unmount")]
    pub on_exit: OnExit,

    /// A group (name or number) whose processes may use the API socket and the volumes'
    /// virtio-fs share sockets, besides root. Without it only root may connect.
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,

    /// A directory in which CreateShare may put vhost-user sockets; repeatable. Sockets
    /// elsewhere are refused. [default: <state-dir>/shares]
    #[arg(long = "share-dir", value_name = "DIR")]
    pub share_dirs: Vec<PathBuf>,

    /// A local directory whose subdirectories volumes may serve (MountVolume or CreateShare
    /// with a local source); repeatable. Without it, only s3:// sources are accepted: whoever
    /// can use the API could otherwise serve any directory of the node to a pod.
    #[arg(long = "allow-local-source", value_name = "DIR")]
    pub local_sources: Vec<PathBuf>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    Unmount,
    Keep,
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

    /// The daemon's option vocabulary (which the CLI's --socket mode and the CSI plugin use)
    /// names `berth mount` flags only: value options take a value, switches take none.
    #[test]
    fn every_daemon_option_is_a_mount_flag() {
        use crate::api::spec::{FLAG_OPTIONS, VALUE_OPTIONS};
        let cli = Cli::command();
        let mount = cli.find_subcommand("mount").unwrap();
        let arg = |name: &str| {
            mount
                .get_arguments()
                .find(|a| a.get_long() == Some(name))
                .unwrap_or_else(|| panic!("--{name} is not a `berth mount` flag"))
        };
        for name in VALUE_OPTIONS {
            assert!(
                arg(name).get_action().takes_values(),
                "--{name} takes a value"
            );
        }
        for name in FLAG_OPTIONS {
            assert!(
                !arg(name).get_action().takes_values(),
                "--{name} is a switch"
            );
        }
    }

    #[test]
    fn bad_sizes_are_rejected() {
        let err = Cli::try_parse_from(["berth", "mount", "--memory-limit", "banana"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
