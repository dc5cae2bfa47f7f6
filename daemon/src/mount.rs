//! What `berth mount` is made of: sources, the store connection, and the volume (namespace +
//! filesystem) an engine serves. The processes live in `heal::holder` (the mount) and
//! `engine` (the serving).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::cache::{BlockCache, CacheConfig, DiskTier};
use crate::cli::{CacheArgs, MountArgs, StoreArgs};
use crate::fs::{AttrConfig, BerthFs, FsConfig};
use crate::memory::MemoryLimiter;
use crate::namespace::{keys, Namespace};
use crate::prefetch::{Fetcher, NodeCache, PrefetchConfig};
use crate::status;
use crate::store::{
    LocalStore, ObjectStore, RetryPolicy, RetryingStore, S3Options, S3Store, StoreError,
};

/// The start-up check gives up sooner than ordinary requests: a typo should not cost 30 s.
const MAX_STARTUP_CHECK: Duration = Duration::from_secs(10);
const MIN_S3_PART: u64 = 5 << 20;

/// What SOURCE names.
#[derive(Debug, PartialEq, Eq)]
pub enum Source {
    S3 { bucket: String, prefix: String },
    Local(PathBuf),
}

impl Source {
    pub fn parse(text: &str) -> anyhow::Result<Source> {
        if let Some(rest) = text.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("{text:?} names no bucket (expected s3://BUCKET[/PREFIX])");
            }
            let prefix = keys::normalize_prefix(prefix).map_err(anyhow::Error::msg)?;
            return Ok(Source::S3 {
                bucket: bucket.to_string(),
                prefix,
            });
        }
        if text.contains("://") {
            bail!("unsupported source {text:?}: use s3://BUCKET[/PREFIX] or a local directory");
        }
        Ok(Source::Local(PathBuf::from(text)))
    }
}

/// The (source text, parsed source, mountpoint) pairs of a `berth mount` command line, checked.
pub fn targets(args: &MountArgs) -> anyhow::Result<Vec<(String, Source, PathBuf)>> {
    let mut wanted = vec![(args.source.clone(), args.mountpoint.clone())];
    for pair in args.also.chunks(2) {
        if let [source, mountpoint] = pair {
            wanted.push((source.clone(), PathBuf::from(mountpoint)));
        }
    }
    let mut targets: Vec<(String, Source, PathBuf)> = Vec::with_capacity(wanted.len());
    for (text, mountpoint) in wanted {
        let source = Source::parse(&text)?;
        validate(args, &source)?;
        if targets.iter().any(|(_, _, m)| m == &mountpoint) {
            bail!("{} is given twice", mountpoint.display());
        }
        targets.push((text, source, mountpoint));
    }
    Ok(targets)
}

/// How a source shows in /proc/mounts (`berth:` + this).
pub fn describe(source: &Source) -> String {
    match source {
        Source::S3 { bucket, .. } => format!("s3://{bucket}"),
        Source::Local(path) => path
            .canonicalize()
            .unwrap_or_else(|_| path.clone())
            .display()
            .to_string(),
    }
}

/// The engine's view of one volume: namespace and filesystem.
pub struct Volume {
    pub fs: Arc<BerthFs>,
    pub ns: Arc<Namespace>,
    pub journal: PathBuf,
}

/// What [`build_volume`] needs besides the command line.
pub struct VolumeSpec<'a> {
    pub text: &'a str,
    pub source: &'a Source,
    pub mountpoint: &'a Path,
    /// Check the store answers before serving (a fresh mount; a successor skips it, so a
    /// store outage during a takeover stalls requests instead of failing the takeover).
    pub check_store: bool,
    /// Take over the inode journal of a predecessor instead of starting a new one.
    pub recover: bool,
    pub generation: u64,
}

/// Connects to the store and builds the namespace and filesystem of one volume.
pub fn build_volume(
    rt: &tokio::runtime::Runtime,
    args: &MountArgs,
    spec: &VolumeSpec<'_>,
    memory: &Arc<MemoryLimiter>,
    cache: Option<NodeCache>,
) -> anyhow::Result<Volume> {
    let (store, prefix) =
        connect_checked(rt, spec.source, spec.text, &args.store, spec.check_store)?;
    let ttl = match args.engine.metadata_ttl {
        Some(ttl) => ttl.0,
        None if args.read_only => None,
        None => Some(Duration::from_secs(1)),
    };
    let journal = journal_path(&args.state_dir, spec.mountpoint);
    let ns = Arc::new(open_namespace(
        store.clone(),
        prefix,
        ttl,
        &journal,
        spec.recover,
    )?);
    let fetcher = Fetcher::new(
        store,
        memory.clone(),
        PrefetchConfig {
            block_size: args.cache.block_size,
            max_window: args.engine.max_prefetch,
            max_concurrent_gets: args.engine.max_gets,
            ..PrefetchConfig::default()
        },
        cache,
    );
    let fs = BerthFs::new(
        rt.handle().clone(),
        ns.clone(),
        fetcher,
        memory.clone(),
        FsConfig {
            read_only: args.read_only,
            part_size: args.engine.part_size as usize,
            attr: AttrConfig {
                // SAFETY: getuid/getgid have no preconditions.
                uid: args.engine.uid.unwrap_or_else(|| unsafe { libc::getuid() }),
                gid: args.engine.gid.unwrap_or_else(|| unsafe { libc::getgid() }),
                file_mode: args.engine.file_mode,
                dir_mode: args.engine.dir_mode,
            },
        },
    )
    .with_generation(spec.generation);
    Ok(Volume {
        fs: Arc::new(fs),
        ns,
        journal,
    })
}

/// A successor takes over its predecessor's inode journal, so the node ids the kernel holds
/// keep naming the same paths. Without a usable journal they get ESTALE.
fn open_namespace(
    store: Arc<dyn ObjectStore>,
    prefix: String,
    ttl: Option<Duration>,
    journal: &Path,
    recover: bool,
) -> anyhow::Result<Namespace> {
    if recover {
        match Namespace::recover(store.clone(), prefix.clone(), ttl, journal) {
            Ok((ns, replayed)) => {
                tracing::info!(replayed, journal = %journal.display(), "took over the inode table");
                return Ok(ns);
            }
            Err(e) => tracing::error!(
                journal = %journal.display(),
                error = %e,
                "cannot take over the inode table; files the kernel knows get ESTALE"
            ),
        }
    }
    Namespace::new(store, prefix, ttl, Some(journal))
        .with_context(|| format!("creating the inode journal {}", journal.display()))
}

fn validate(args: &MountArgs, source: &Source) -> anyhow::Result<()> {
    if matches!(source, Source::S3 { .. }) && args.engine.part_size < MIN_S3_PART {
        bail!(
            "--part-size must be at least 5MiB for S3 (got {} bytes)",
            args.engine.part_size
        );
    }
    if args.cache.block_size < 4096 || args.cache.block_size > (64 << 20) {
        bail!("--block-size must be between 4KiB and 64MiB");
    }
    if args.engine.memory_limit < 2 * args.engine.part_size.max(args.cache.block_size) {
        bail!("--memory-limit must be at least twice --part-size and --block-size");
    }
    if args.threads == 0 || args.engine.max_gets == 0 {
        bail!("--threads and --max-gets must be at least 1");
    }
    Ok(())
}

/// Opens the block cache if `--cache-dir` or `--cache-socket` is given. A cache that cannot be
/// opened is an error: running silently without it would turn every read into a GET.
pub fn open_cache_dir(
    cache: &CacheArgs,
    wait_for_disk: bool,
) -> anyhow::Result<Option<Arc<BlockCache>>> {
    let (disk, place) = match (&cache.cache_dir, &cache.cache_socket) {
        (Some(dir), _) => (
            DiskTier::Dir {
                dir: dir.clone(),
                size: cache.cache_size,
            },
            dir,
        ),
        (None, Some(socket)) => (
            DiskTier::Node {
                socket: socket.clone(),
            },
            socket,
        ),
        (None, None) => return Ok(None),
    };
    let config = CacheConfig {
        disk,
        block_size: cache.block_size,
        memory: cache.cache_memory,
        engine: cache.cache_io,
        wait_for_disk,
    };
    BlockCache::open(&config)
        .map(Some)
        .with_context(|| format!("opening the block cache at {}", place.display()))
}

/// How a store is named in cache keys: two mounts of the same bucket share blocks.
fn store_id(store: &StoreArgs, source: &Source) -> String {
    match source {
        Source::S3 { bucket, .. } => format!(
            "s3|{}|{bucket}",
            store.endpoint_url.as_deref().unwrap_or("aws")
        ),
        Source::Local(path) => format!(
            "local|{}",
            path.canonicalize()
                .unwrap_or_else(|_| path.clone())
                .display()
        ),
    }
}

/// The node cache as seen by one source (its blocks keyed by the store).
pub fn node_cache(
    cache: &Option<Arc<BlockCache>>,
    store: &StoreArgs,
    source: &Source,
) -> Option<NodeCache> {
    cache.as_ref().map(|cache| NodeCache {
        cache: cache.clone(),
        store_id: Arc::from(store_id(store, source)),
    })
}

/// The block cache for one source (see [`open_cache_dir`]).
pub fn open_cache(
    cache: &CacheArgs,
    store: &StoreArgs,
    source: &Source,
    wait_for_disk: bool,
) -> anyhow::Result<Option<NodeCache>> {
    Ok(
        open_cache_dir(cache, wait_for_disk)?.map(|cache| NodeCache {
            cache,
            store_id: Arc::from(store_id(store, source)),
        }),
    )
}

/// Opens the store SOURCE names, checks it answers (bucket exists, credentials work) within
/// the start-up deadline, and wraps it with retries under `--request-deadline`. Returns the
/// store and the key prefix of the source.
pub fn connect(
    rt: &tokio::runtime::Runtime,
    source: &Source,
    text: &str,
    args: &StoreArgs,
) -> anyhow::Result<(Arc<dyn ObjectStore>, String)> {
    connect_checked(rt, source, text, args, true)
}

/// [`connect`], with the start-up check optional.
pub fn connect_checked(
    rt: &tokio::runtime::Runtime,
    source: &Source,
    text: &str,
    args: &StoreArgs,
    check_store: bool,
) -> anyhow::Result<(Arc<dyn ObjectStore>, String)> {
    let (store, prefix): (Arc<dyn ObjectStore>, String) = match source {
        Source::Local(dir) => {
            let store = LocalStore::open(dir)
                .with_context(|| format!("opening local store {}", dir.display()))?;
            (Arc::new(store), String::new())
        }
        Source::S3 { bucket, prefix } => {
            let store = rt.block_on(S3Store::connect(&S3Options {
                bucket: bucket.clone(),
                endpoint_url: args.endpoint_url.clone(),
                region: args.region.clone(),
                virtual_hosted: args.virtual_hosted,
            }));
            (Arc::new(store), prefix.clone())
        }
    };
    if check_store {
        let check = RetryPolicy {
            deadline: args.request_deadline.min(MAX_STARTUP_CHECK),
            ..RetryPolicy::default()
        };
        rt.block_on(check.run("check", || store.check(&prefix)))
            .map_err(|e| explain_check_failure(e, text, args.endpoint_url.as_deref()))?;
    }
    let policy = RetryPolicy {
        deadline: args.request_deadline,
        ..RetryPolicy::default()
    };
    Ok((Arc::new(RetryingStore::new(store, policy)), prefix))
}

fn explain_check_failure(e: StoreError, source: &str, endpoint: Option<&str>) -> anyhow::Error {
    let endpoint = endpoint.unwrap_or("the default AWS endpoint");
    match e {
        StoreError::NoSuchBucket(b) => anyhow::anyhow!("cannot mount {source}: bucket {b:?} does not exist at {endpoint}"),
        StoreError::AccessDenied(detail) => anyhow::anyhow!(
            "cannot mount {source}: access denied ({detail}); check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the profile"
        ),
        StoreError::DeadlineExceeded { last, .. } => {
            anyhow::anyhow!("cannot mount {source}: {endpoint} did not answer: {last}")
        }
        other => anyhow::anyhow!("cannot mount {source}: {other}"),
    }
}

/// Where the inode journal of a mount lives: one directory per mountpoint under the state dir.
fn journal_path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    status::mount_state_dir(state_dir, mountpoint).join("inodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            Source::parse("s3://b").unwrap(),
            Source::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            Source::parse("s3://b/data/set/").unwrap(),
            Source::S3 {
                bucket: "b".into(),
                prefix: "data/set/".into()
            }
        );
        assert_eq!(
            Source::parse("./dir").unwrap(),
            Source::Local("./dir".into())
        );
        assert!(Source::parse("s3://").is_err());
        assert!(Source::parse("s3://b/../x").is_err());
        assert!(Source::parse("gs://b").is_err());
    }

    #[test]
    fn journal_paths_are_one_component_per_mountpoint() {
        let p = journal_path(Path::new("/run/berth"), Path::new("/mnt/a b"));
        assert_eq!(p, Path::new("/run/berth/mounts/_mnt_a_b/inodes"));
    }
}
