//! The command line's arguments become the config structs the commands take, here and only
//! here: defaults are resolved (metadata TTL, owner, hang timeout), sizes checked against each
//! other, sources parsed. Past this file no code sees a clap type.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;

use super::args::{
    CacheArgs, DaemonArgs, EngineFlags, HealArgs, MountArgs, OnExit, SandboxArg, ShareArgs,
    StoreArgs, WarmArgs, DEFAULT_THREADS,
};
use crate::api::{DaemonConfig, NodeCacheConfig};
use crate::cache::{CacheConfig, DiskTier};
use crate::fs::{AttrConfig, FsConfig};
use crate::heal::handoff::ShareSocket;
use crate::heal::holder::HolderConfig;
use crate::prefetch::PrefetchConfig;
use crate::sandbox::{SandboxMode, SandboxPolicy};
use crate::share::ShareConfig;
use crate::sys::sockets::{self, Peers};
use crate::volume::{Source, StoreConfig, Target, VolumeConfig};
use crate::warm::WarmConfig;

/// S3 refuses multipart parts under 5 MiB (the last one excepted).
const MIN_S3_PART: u64 = 5 << 20;
const MIN_BLOCK: u64 = 4 << 10;
const MAX_BLOCK: u64 = 64 << 20;
/// Without --metadata-ttl (and without --read-only) metadata is trusted this long.
const DEFAULT_METADATA_TTL: Duration = Duration::from_secs(1);
/// Without --hang-timeout, an engine is hung after --request-deadline plus this: a store
/// request may legitimately take the whole deadline.
const HANG_MARGIN: Duration = Duration::from_secs(10);

/// Root and, if named, one group.
fn peers(group: Option<&str>) -> anyhow::Result<Peers> {
    let group = match group {
        None => None,
        Some(name) => Some(
            sockets::group_id(name).map_err(|e| anyhow::anyhow!("--socket-group {name}: {e}"))?,
        ),
    };
    Ok(Peers { group })
}

impl StoreArgs {
    pub fn store_config(&self) -> anyhow::Result<StoreConfig> {
        if let Some(url) = &self.endpoint_url {
            crate::volume::check_endpoint(url)?;
        }
        Ok(StoreConfig {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            virtual_hosted: self.virtual_hosted,
            request_deadline: self.request_deadline,
            copy_part_size: self.copy_part_size,
        })
    }
}

impl CacheArgs {
    /// The block cache, if `--cache-dir` or `--cache-socket` names one. `wait_for_disk`: a
    /// warm-up wants every block written; a mount never waits for the cache disk.
    pub fn cache_config(&self, wait_for_disk: bool) -> anyhow::Result<Option<CacheConfig>> {
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&self.block_size) {
            bail!("--block-size must be between 4KiB and 64MiB");
        }
        let disk = match (&self.cache_dir, &self.cache_socket) {
            (Some(dir), _) => DiskTier::Dir {
                dir: dir.clone(),
                size: self.cache_size,
            },
            (None, Some(socket)) => DiskTier::Node {
                socket: socket.clone(),
            },
            (None, None) => return Ok(None),
        };
        Ok(Some(CacheConfig {
            disk,
            block_size: self.block_size,
            memory: self.cache_memory,
            engine: self.cache_io,
            wait_for_disk,
        }))
    }
}

impl EngineFlags {
    /// How the engine (or the standalone share) is sandboxed: on unless told otherwise;
    /// required when asked for by name.
    pub fn sandbox_policy(&self) -> SandboxPolicy {
        match self.sandbox {
            None => SandboxPolicy::default(),
            Some(SandboxArg::Off) => SandboxPolicy::OFF,
            Some(SandboxArg::On) => SandboxPolicy {
                mode: SandboxMode::On,
                required: true,
            },
            Some(SandboxArg::Log) => SandboxPolicy {
                mode: SandboxMode::Log,
                required: true,
            },
        }
    }
}

/// The volume settings shared by `berth mount` (and its engines) and `berth share`.
fn volume_config(
    engine: &EngineFlags,
    store: &StoreArgs,
    cache: &CacheArgs,
    read_only: bool,
    state_dir: &std::path::Path,
) -> anyhow::Result<VolumeConfig> {
    let cache_config = cache.cache_config(false)?;
    if engine.memory_limit < 2 * engine.part_size.max(cache.block_size) {
        bail!("--memory-limit must be at least twice --part-size and --block-size");
    }
    if engine.max_gets == 0 {
        bail!("--max-gets must be at least 1");
    }
    let part_size = usize::try_from(engine.part_size)
        .map_err(|_| anyhow::anyhow!("--part-size {} is too large", engine.part_size))?;
    let metadata_ttl = match engine.metadata_ttl {
        Some(ttl) => ttl.0,
        None if read_only => None,
        None => Some(DEFAULT_METADATA_TTL),
    };
    Ok(VolumeConfig {
        store: store.store_config()?,
        cache: cache_config,
        fs: FsConfig {
            read_only,
            part_size,
            attr: AttrConfig {
                // SAFETY: getuid/getgid have no preconditions.
                uid: engine.uid.unwrap_or_else(|| unsafe { libc::getuid() }),
                gid: engine.gid.unwrap_or_else(|| unsafe { libc::getgid() }),
                file_mode: engine.file_mode,
                dir_mode: engine.dir_mode,
                ignore_stored: engine.ignore_stored_metadata,
            },
        },
        prefetch: PrefetchConfig {
            block_size: cache.block_size,
            max_window: engine.max_prefetch,
            max_concurrent_gets: engine.max_gets,
            // Cached blocks are served for as long as what the store said is trusted.
            read_proof_ttl: metadata_ttl,
            ..PrefetchConfig::default()
        },
        metadata_ttl,
        memory_limit: engine.memory_limit,
        state_dir: state_dir.to_path_buf(),
    })
}

/// A source checked against the volume settings it is served with.
fn target(text: &str, mountpoint: PathBuf, config: &VolumeConfig) -> anyhow::Result<Target> {
    let source = Source::parse(text)?;
    if matches!(source, Source::S3 { .. }) && (config.fs.part_size as u64) < MIN_S3_PART {
        bail!(
            "--part-size must be at least 5MiB for S3 (got {} bytes)",
            config.fs.part_size
        );
    }
    Ok(Target {
        text: text.to_string(),
        source,
        mountpoint,
    })
}

impl HealArgs {
    /// --hang-timeout, or the store's --request-deadline plus a margin: a slow store is not
    /// a hung engine.
    fn hang_timeout(&self, store: &StoreArgs) -> Duration {
        self.hang_timeout
            .unwrap_or(store.request_deadline + HANG_MARGIN)
    }

    /// --freeze-timeout, None when 0 (off).
    fn freeze_timeout(&self) -> Option<Duration> {
        Some(self.freeze_timeout).filter(|t| !t.is_zero())
    }
}

impl MountArgs {
    /// The settings of every volume this mount serves (the engine's config).
    pub fn volume_config(&self) -> anyhow::Result<VolumeConfig> {
        if self.threads == 0 {
            bail!("--threads must be at least 1");
        }
        volume_config(
            &self.engine,
            &self.store,
            &self.cache,
            self.read_only,
            &self.state_dir,
        )
    }

    /// SOURCE MOUNTPOINT and every `--also` pair, checked.
    pub fn targets(&self) -> anyhow::Result<Vec<Target>> {
        let config = self.volume_config()?;
        let mut wanted = vec![(self.source.clone(), self.mountpoint.clone())];
        for pair in self.also.chunks(2) {
            if let [source, mountpoint] = pair {
                wanted.push((source.clone(), PathBuf::from(mountpoint)));
            }
        }
        let mut targets: Vec<Target> = Vec::with_capacity(wanted.len());
        for (text, mountpoint) in wanted {
            if targets.iter().any(|t| t.mountpoint == mountpoint) {
                bail!("{} is given twice", mountpoint.display());
            }
            targets.push(target(&text, mountpoint, &config)?);
        }
        Ok(targets)
    }

    /// What the holder (`berth mount` itself) does. `engine_argv` is the mount's command line
    /// after `mount`: every engine is started with it.
    pub fn holder_config(&self, engine_argv: Vec<OsString>) -> anyhow::Result<HolderConfig> {
        Ok(HolderConfig {
            targets: self.targets()?,
            standalone: vec![],
            read_only: self.read_only,
            threads: self.threads,
            state_dir: self.state_dir.clone(),
            no_ebpf: self.heal.no_ebpf,
            hang_timeout: self.heal.hang_timeout(&self.store),
            freeze_timeout: self.heal.freeze_timeout(),
            engine_argv,
        })
    }
}

impl ShareArgs {
    /// What `berth share` does. `share_argv` is its command line after `share`: the engine
    /// of a standalone share is started with it, less the share-only flags.
    pub fn share_config(&self, share_argv: &[OsString]) -> anyhow::Result<ShareConfig> {
        let engine_argv = share_engine_argv(share_argv);
        let peers = peers(self.socket_group.as_deref())?;
        let socket = ShareSocket {
            socket: self.socket.clone(),
            request_queues: self.request_queues,
            queue_size: self.queue_size,
            group: peers.group,
        };
        if let Some(mountpoint) = &self.mount {
            if self.remove {
                return Ok(ShareConfig::Remove {
                    mountpoint: mountpoint.clone(),
                    socket: self.socket.clone(),
                    state_dir: self.state_dir.clone(),
                });
            }
            socket.check_settings()?;
            return Ok(ShareConfig::Attach {
                mountpoint: mountpoint.clone(),
                socket,
                state_dir: self.state_dir.clone(),
            });
        }
        if self.remove {
            bail!("--remove stops a share of a mount: it needs --mount MOUNTPOINT");
        }
        let Some(text) = &self.source else {
            bail!("SOURCE is required (or --mount MOUNTPOINT)");
        };
        socket.check_settings()?;
        let volume = volume_config(
            &self.engine,
            &self.store,
            &self.cache,
            self.read_only,
            &self.state_dir,
        )?;
        let target = target(text, self.socket.clone(), &volume)?;
        Ok(ShareConfig::Serve(Box::new(HolderConfig {
            targets: vec![],
            standalone: vec![(target, socket)],
            read_only: self.read_only,
            threads: DEFAULT_THREADS,
            state_dir: self.state_dir.clone(),
            no_ebpf: self.heal.no_ebpf,
            hang_timeout: self.heal.hang_timeout(&self.store),
            freeze_timeout: self.heal.freeze_timeout(),
            engine_argv,
        })))
    }
}

/// The flags of `berth share` that only the holder uses (the share's socket): the engine
/// of a share is started with the rest, which `berth engine` parses as a mount's flags.
const SHARE_ONLY_FLAGS: [&str; 4] = [
    "--socket",
    "--request-queues",
    "--queue-size",
    "--socket-group",
];

/// `berth share`'s arguments (after `share`) without the share-only flags and their values.
pub fn share_engine_argv(share_argv: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::with_capacity(share_argv.len());
    let mut args = share_argv.iter();
    while let Some(arg) = args.next() {
        let text = arg.to_string_lossy();
        if SHARE_ONLY_FLAGS.contains(&text.as_ref()) {
            let _ = args.next();
            continue;
        }
        let joined = SHARE_ONLY_FLAGS.iter().any(|f| {
            text.strip_prefix(f)
                .is_some_and(|rest| rest.starts_with('='))
        });
        if !joined {
            out.push(arg.clone());
        }
    }
    out
}

impl WarmArgs {
    pub fn warm_config(&self) -> anyhow::Result<WarmConfig> {
        if self.concurrency == 0 {
            bail!("--concurrency must be at least 1");
        }
        Ok(WarmConfig {
            paths: self.paths.clone(),
            concurrency: self.concurrency,
            store: self.store.store_config()?,
            cache: self.cache.cache_config(true)?,
        })
    }
}

impl DaemonArgs {
    pub fn daemon_config(&self) -> anyhow::Result<DaemonConfig> {
        if !(MIN_BLOCK..=MAX_BLOCK).contains(&self.block_size) {
            bail!("--block-size must be between 4KiB and 64MiB");
        }
        Ok(DaemonConfig {
            socket: self.socket.clone(),
            state_dir: self.state_dir.clone(),
            node_cache: self.cache_dir.as_ref().map(|dir| NodeCacheConfig {
                dir: dir.clone(),
                size: self.cache_size,
                block_size: self.block_size,
            }),
            metrics_addr: self.metrics_addr,
            keep_on_exit: self.on_exit == OnExit::Keep,
            peers: peers(self.socket_group.as_deref())?,
            share_dirs: self.share_dirs.clone(),
            local_sources: self.local_sources.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::args::{Cli, Command};
    use super::*;
    use clap::Parser as _;

    fn mount(args: &[&str]) -> MountArgs {
        let argv = ["berth", "mount"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Mount(m) => m,
            _ => panic!("parsed as another command"),
        }
    }

    fn share(args: &[&str]) -> anyhow::Result<ShareConfig> {
        let argv = ["berth", "share"].iter().chain(args).copied();
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Share(s) => {
                let argv: Vec<OsString> = args.iter().map(OsString::from).collect();
                s.share_config(&argv)
            }
            _ => panic!("parsed as another command"),
        }
    }

    #[test]
    fn mount_defaults_resolve_to_the_documented_settings() {
        let config = mount(&[]).volume_config().unwrap();
        assert_eq!(config.metadata_ttl, Some(Duration::from_secs(1)));
        assert_eq!(config.fs.part_size, 8 << 20);
        assert_eq!(config.prefetch.block_size, 1 << 20);
        assert!(config.cache.is_none());
        // SAFETY: getuid has no preconditions.
        assert_eq!(config.fs.attr.uid, unsafe { libc::getuid() });
        // Read-only trusts metadata for the life of the mount unless told otherwise.
        let ro = mount(&["--read-only"]).volume_config().unwrap();
        assert_eq!(ro.metadata_ttl, None);
        let ro = mount(&["--read-only", "--metadata-ttl", "5s"]);
        assert_eq!(
            ro.volume_config().unwrap().metadata_ttl,
            Some(Duration::from_secs(5))
        );
        let holder = mount(&["--request-deadline", "20s"])
            .holder_config(vec![])
            .unwrap();
        assert_eq!(holder.hang_timeout, Duration::from_secs(30));
        assert_eq!(holder.targets[0].text, "berth-data");
        // The heartbeat check: on by default, under a second; 0 turns it off.
        assert_eq!(holder.freeze_timeout, Some(Duration::from_millis(750)));
        let off = mount(&["--freeze-timeout", "0"])
            .holder_config(vec![])
            .unwrap();
        assert_eq!(off.freeze_timeout, None);
    }

    #[test]
    fn the_sandbox_is_on_unless_switched_off() {
        if std::env::var_os("BERTH_SANDBOX").is_some() {
            return; // the environment decides; the default cannot be seen
        }
        let policy = |args: &[&str]| mount(args).engine.sandbox_policy();
        assert_eq!(policy(&[]), SandboxPolicy::default());
        assert_eq!(policy(&[]).mode, SandboxMode::On);
        assert!(!policy(&[]).required, "the default warns when refused");
        assert!(policy(&["--sandbox", "on"]).required);
        assert_eq!(policy(&["--sandbox", "off"]), SandboxPolicy::OFF);
        assert_eq!(policy(&["--sandbox", "log"]).mode, SandboxMode::Log);
        let argv = ["berth", "mount", "--sandbox", "maybe"];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn sizes_are_checked_against_each_other() {
        let err = |args: &[&str]| format!("{:#}", mount(args).holder_config(vec![]).unwrap_err());
        assert!(err(&["s3://b", "/m", "--part-size", "1MiB"]).contains("--part-size"));
        assert!(err(&["--block-size", "1KiB"]).contains("--block-size"));
        assert!(err(&["--memory-limit", "4MiB"]).contains("--memory-limit"));
        assert!(err(&["--threads", "0"]).contains("--threads"));
        assert!(err(&["a", "/m", "--also", "b", "/m"]).contains("given twice"));
        assert!(err(&["gs://b", "/m"]).contains("unsupported source"));
        // A local store takes small parts.
        assert!(mount(&["dir", "/m", "--part-size", "1MiB"])
            .holder_config(vec![])
            .is_ok());
    }

    #[test]
    fn share_commands_become_their_configs() {
        let served = share(&["s3://b", "--socket", "/run/b.sock", "--read-only"]).unwrap();
        let ShareConfig::Serve(holder) = served else {
            panic!("not a standalone share");
        };
        assert!(holder.targets.is_empty());
        let (target, socket) = &holder.standalone[0];
        assert_eq!(target.mountpoint, PathBuf::from("/run/b.sock"));
        assert_eq!(socket.request_queues, 1);
        assert_eq!(socket.group, None);
        assert!(holder.read_only);
        assert_eq!(holder.hang_timeout, Duration::from_secs(40));
        let grouped = share(&["s3://b", "--socket", "/s", "--socket-group", "0"]).unwrap();
        assert!(matches!(grouped, ShareConfig::Serve(h) if h.standalone[0].1.group == Some(0)));
        assert!(share(&[
            "s3://b",
            "--socket",
            "/s",
            "--socket-group",
            "no-such-group-x"
        ])
        .is_err());
        assert!(matches!(
            share(&["--mount", "/m", "--socket", "/s"]).unwrap(),
            ShareConfig::Attach { .. }
        ));
        assert!(matches!(
            share(&["--mount", "/m", "--socket", "/s", "--remove"]).unwrap(),
            ShareConfig::Remove { .. }
        ));
        // --remove without --mount: refused before anything is done.
        let err = share(&["s3://b", "--remove", "--socket", "/s"]).unwrap_err();
        assert!(format!("{err:#}").contains("--remove"), "{err:#}");
        let err = share(&["s3://b", "--socket", "/s", "--request-queues", "64"]).unwrap_err();
        assert!(format!("{err:#}").contains("request queues"), "{err:#}");
        let err = share(&["s3://b", "--socket", "/s", "--queue-size", "1000"]).unwrap_err();
        assert!(format!("{err:#}").contains("power of two"), "{err:#}");
    }

    #[test]
    fn a_share_engine_parses_the_share_flags_as_a_mount() {
        let argv = [
            "s3://b/p",
            "--socket",
            "/run/b.sock",
            "--request-queues=2",
            "--queue-size",
            "256",
            "--socket-group=0",
            "--read-only",
            "--part-size",
            "16MiB",
            "--hang-timeout",
            "3s",
            "--sandbox",
            "log",
        ];
        let argv: Vec<OsString> = argv.iter().map(OsString::from).collect();
        let engine = share_engine_argv(&argv);
        let text: Vec<String> = engine.iter().map(|a| a.to_string_lossy().into()).collect();
        assert_eq!(
            text,
            [
                "s3://b/p",
                "--read-only",
                "--part-size",
                "16MiB",
                "--hang-timeout",
                "3s",
                "--sandbox",
                "log"
            ]
        );
        let parsed = Cli::try_parse_from(
            ["berth", "engine", "--handoff-fd", "3"]
                .iter()
                .map(OsString::from)
                .chain(engine),
        )
        .unwrap();
        let Command::Engine(e) = parsed.command else {
            panic!("parsed as another command");
        };
        let from_engine = e.mount.volume_config().unwrap();
        let Command::Share(s) = Cli::try_parse_from(
            ["berth", "share"]
                .iter()
                .map(OsString::from)
                .chain(argv.clone()),
        )
        .unwrap()
        .command
        else {
            panic!("parsed as another command");
        };
        let from_share =
            volume_config(&s.engine, &s.store, &s.cache, s.read_only, &s.state_dir).unwrap();
        assert_eq!(format!("{from_engine:?}"), format!("{from_share:?}"));
        assert_eq!(e.mount.engine.sandbox_policy(), s.engine.sandbox_policy());
        assert!(from_engine.fs.read_only);
        assert_eq!(from_engine.fs.part_size, 16 << 20);
    }
}
