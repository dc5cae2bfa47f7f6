//! A volume: one source (a bucket prefix or a local directory) seen as a namespace and served
//! as a filesystem, with its store connection and its view of the block cache. Both doors and
//! every command that reads a store (`berth mount`'s engine, `berth share`, `berth warm`)
//! build what they need here, from a [`VolumeConfig`] the command line made.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};

use crate::cache::{BlockCache, CacheConfig, DiskTier};
use crate::fs::{BerthFs, FsConfig};
use crate::memory::MemoryLimiter;
use crate::namespace::{keys, Namespace};
use crate::prefetch::{Fetcher, NodeCache, PrefetchConfig};
use crate::state;
use crate::store::{
    LocalStore, ObjectStore, RetryPolicy, RetryingStore, S3Options, S3Store, StoreError,
};
use crate::upload::{self, SpoolDir};

/// The start-up check gives up sooner than ordinary requests: a typo should not cost 30 s.
const MAX_STARTUP_CHECK: Duration = Duration::from_secs(10);

/// How to reach the object store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// S3 endpoint of an S3-compatible store (path-style unless `virtual_hosted`).
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub virtual_hosted: bool,
    /// How long one request is retried before the operation fails with EIO.
    pub request_deadline: Duration,
    /// Multipart copies (of metadata onto objects over 5 GiB) in parts of this size; tests.
    pub copy_part_size: Option<u64>,
}

/// Everything an engine needs to serve one volume, besides what names it (source and
/// mountpoint) and the connection it serves.
#[derive(Clone, Debug)]
pub struct VolumeConfig {
    pub store: StoreConfig,
    /// The block cache, if any.
    pub cache: Option<CacheConfig>,
    pub fs: FsConfig,
    pub prefetch: PrefetchConfig,
    /// How long metadata is trusted; `None`: for the life of the engine (dataset mode).
    pub metadata_ttl: Option<Duration>,
    /// Memory for prefetched data and write buffers, across all open files.
    pub memory_limit: u64,
    /// Where the inode journal and status files go.
    pub state_dir: PathBuf,
}

/// What SOURCE names.
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// Refuses an endpoint URL with credentials in it (`http://user:pass@host`): they would show
/// in process lists, volume records and metrics. Credentials go in the environment or the
/// daemon's secrets.
pub fn check_endpoint(url: &str) -> anyhow::Result<()> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.contains('@') {
        bail!("credentials in the endpoint URL are refused: give them as AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or secrets");
    }
    Ok(())
}

/// A source and where it is served: a mountpoint, or the socket of a standalone share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The source as the user wrote it (logs, status, /proc/mounts).
    pub text: String,
    pub source: Source,
    pub mountpoint: PathBuf,
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

/// The engine's view of one volume: namespace, filesystem, and its view of the block cache.
pub struct Volume {
    pub fs: Arc<BerthFs>,
    pub ns: Arc<Namespace>,
    pub journal: PathBuf,
    pub cache: Option<NodeCache>,
}

/// How a volume is opened.
#[derive(Clone, Copy, Debug)]
pub struct Opening {
    /// Check the store answers before serving (a fresh mount; a successor skips it, so a
    /// store outage during a takeover stalls requests instead of failing the takeover).
    pub check_store: bool,
    /// Take over the inode journal of a predecessor instead of starting a new one.
    pub recover: bool,
    /// The engine generation (handles of older generations are told apart by it).
    pub generation: u64,
}

impl Opening {
    /// A fresh volume: the store is checked, nothing is taken over.
    pub const FRESH: Opening = Opening {
        check_store: true,
        recover: false,
        generation: 0,
    };
}

/// Connects to the store and builds the namespace and filesystem of one volume.
pub fn build_volume(
    rt: &tokio::runtime::Runtime,
    config: &VolumeConfig,
    target: &Target,
    mount_dir: &Path,
    opening: Opening,
    memory: &Arc<MemoryLimiter>,
    cache: Option<NodeCache>,
) -> anyhow::Result<Volume> {
    let (store, prefix) = connect_checked(
        rt,
        &target.source,
        &target.text,
        &config.store,
        opening.check_store,
    )?;
    let journal = state::inode_journal(mount_dir);
    let ns = Arc::new(open_namespace(
        store.clone(),
        prefix,
        config.metadata_ttl,
        &journal,
        opening.recover,
    )?);
    let fetcher = Fetcher::new(
        store,
        memory.clone(),
        config.prefetch.clone(),
        cache.clone(),
    );
    let spools = Arc::new(SpoolDir::new(state::write_spools(mount_dir)));
    if !opening.recover {
        let discarded = rt.block_on(upload::discard_spools(ns.store(), &spools));
        if discarded > 0 {
            tracing::warn!(
                discarded,
                dir = %spools.path().display(),
                "files left being written by an earlier mount here (its holder died) were aborted; their objects are unchanged"
            );
        }
    }
    let fs = BerthFs::new(
        rt.handle().clone(),
        ns.clone(),
        fetcher,
        memory.clone(),
        config.fs.clone(),
        spools,
    )
    .with_generation(opening.generation);
    if opening.recover {
        fs.adopt_writes();
    }
    Ok(Volume {
        fs: Arc::new(fs),
        ns,
        journal,
        cache,
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

/// Opens the block cache, if the volume has one. A cache that cannot be opened is an error:
/// running silently without it would turn every read into a GET.
pub fn open_block_cache(config: &Option<CacheConfig>) -> anyhow::Result<Option<Arc<BlockCache>>> {
    let Some(config) = config else {
        return Ok(None);
    };
    let place = match &config.disk {
        DiskTier::Dir { dir, .. } => dir,
        DiskTier::Node { socket } => socket,
    };
    BlockCache::open(config)
        .map(Some)
        .with_context(|| format!("opening the block cache at {}", place.display()))
}

/// How a store is named in cache keys: two mounts of the same bucket share blocks.
fn store_id(store: &StoreConfig, source: &Source) -> String {
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
    store: &StoreConfig,
    source: &Source,
) -> Option<NodeCache> {
    cache.as_ref().map(|cache| NodeCache {
        cache: cache.clone(),
        store_id: Arc::from(store_id(store, source)),
    })
}

/// The block cache for one source (see [`open_block_cache`]).
pub fn open_cache(
    cache: &Option<CacheConfig>,
    store: &StoreConfig,
    source: &Source,
) -> anyhow::Result<Option<NodeCache>> {
    Ok(node_cache(&open_block_cache(cache)?, store, source))
}

/// Opens the store SOURCE names, checks it answers (bucket exists, credentials work) within
/// the start-up deadline, and wraps it with retries under `--request-deadline`. Returns the
/// store and the key prefix of the source.
pub fn connect(
    rt: &tokio::runtime::Runtime,
    source: &Source,
    text: &str,
    args: &StoreConfig,
) -> anyhow::Result<(Arc<dyn ObjectStore>, String)> {
    connect_checked(rt, source, text, args, true)
}

/// [`connect`], with the start-up check optional.
pub fn connect_checked(
    rt: &tokio::runtime::Runtime,
    source: &Source,
    text: &str,
    args: &StoreConfig,
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
                copy_limit: args.copy_part_size,
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
}
