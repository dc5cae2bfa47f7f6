//! `berth mount`: build the engine for one source, mount it, serve until unmounted.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::signal::unix::{signal, SignalKind};

use crate::cache::{BlockCache, CacheConfig};
use crate::cli::{CacheArgs, MountArgs, StoreArgs};
use crate::fs::{AttrConfig, BerthFs, FsConfig};
use crate::fuse::{FuseMount, MountOptions};
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

pub fn run(args: MountArgs) -> anyhow::Result<()> {
    let source = Source::parse(&args.source)?;
    validate(&args, &source)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("berth mount needs root (CAP_SYS_ADMIN) to mount FUSE filesystems");
    }
    let mountpoint = prepare_mountpoint(&args.mountpoint)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth-io")
        .build()
        .context("starting the I/O runtime")?;

    let (store, prefix) = connect(&rt, &source, &args.source, &args.store)?;

    let ttl = match args.metadata_ttl {
        Some(ttl) => ttl.0,
        None if args.read_only => None,
        None => Some(Duration::from_secs(1)),
    };
    let journal = journal_path(&args.state_dir, &mountpoint);
    let ns = Arc::new(
        Namespace::new(store.clone(), prefix, ttl, Some(&journal))
            .with_context(|| format!("creating the inode journal {}", journal.display()))?,
    );
    let memory = MemoryLimiter::new(args.memory_limit);
    let cache = open_cache(&args.cache, &args.store, &source, false)?;
    let fetcher = Fetcher::new(
        store.clone(),
        memory.clone(),
        PrefetchConfig {
            block_size: args.cache.block_size,
            max_window: args.max_prefetch,
            max_concurrent_gets: args.max_gets,
            ..PrefetchConfig::default()
        },
        cache.clone(),
    );
    let fs = Arc::new(BerthFs::new(
        rt.handle().clone(),
        ns.clone(),
        fetcher,
        memory.clone(),
        FsConfig {
            read_only: args.read_only,
            part_size: args.part_size as usize,
            attr: AttrConfig {
                // SAFETY: getuid/getgid have no preconditions.
                uid: args.uid.unwrap_or_else(|| unsafe { libc::getuid() }),
                gid: args.gid.unwrap_or_else(|| unsafe { libc::getgid() }),
                file_mode: args.file_mode,
                dir_mode: args.dir_mode,
            },
        },
    ));

    let fuse = FuseMount::mount(
        &mountpoint,
        &MountOptions {
            fsname: format!("berth:{}", store.describe()),
            read_only: args.read_only,
            allow_other: true,
        },
    )
    .context("mounting")?;
    let workers = match fuse.serve(fs.clone(), args.threads) {
        Ok(w) => w,
        Err(e) => {
            let _ = fuse.unmount(true);
            return Err(e).context("starting FUSE workers");
        }
    };
    tune_readahead(&fuse);
    tracing::info!(
        source = %args.source,
        mountpoint = %mountpoint.display(),
        ttl = ?ttl,
        memory_limit = args.memory_limit,
        read_only = args.read_only,
        "serving"
    );

    let status_file = status::status_path(&args.state_dir, &mountpoint);
    let report = {
        let (source, mountpoint) = (args.source.clone(), mountpoint.display().to_string());
        let (ns, memory, cache) = (ns.clone(), memory.clone(), cache.clone());
        let started = status::now_unix();
        let read_only = args.read_only;
        move || status::MountStatus {
            pid: std::process::id(),
            source: source.clone(),
            mountpoint: mountpoint.clone(),
            started_unix: started,
            updated_unix: status::now_unix(),
            read_only,
            inodes: ns.inode_count() as u64,
            skipped_keys: ns.skipped_keys(),
            memory_used: memory.used(),
            memory_peak: memory.peak(),
            memory_limit: memory.limit(),
            cache: cache.as_ref().map(|c| c.cache.stats()),
        }
    };
    let reporter = {
        let path = status_file.clone();
        if let Err(e) = status::write(&path, &report()) {
            tracing::warn!(path = %path.display(), error = %e, "could not write the status file; `berth status` will not see this mount");
        }
        rt.spawn(async move {
            loop {
                tokio::time::sleep(status::REFRESH).await;
                if let Err(e) = status::write(&path, &report()) {
                    tracing::debug!(error = %e, "could not write the status file");
                }
            }
        })
    };
    println!("berth: mounted {} at {}", args.source, mountpoint.display());
    let _ = std::io::stdout().flush();

    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        for w in workers {
            let _ = w.join();
        }
        let _ = done_tx.send(());
    });
    rt.block_on(wait_for_end(&fuse, done_rx))?;
    reporter.abort();
    fs.shutdown();
    let _ = std::fs::remove_file(&journal);
    let _ = std::fs::remove_file(&status_file);
    if let Some(node) = &cache {
        tracing::info!(stats = ?node.cache.stats(), "block cache");
    }
    tracing::info!(
        inodes = ns.inode_count(),
        skipped_keys = ns.skipped_keys(),
        peak_memory = memory.peak(),
        "unmounted; bye"
    );
    Ok(())
}

fn validate(args: &MountArgs, source: &Source) -> anyhow::Result<()> {
    if matches!(source, Source::S3 { .. }) && args.part_size < MIN_S3_PART {
        bail!(
            "--part-size must be at least 5MiB for S3 (got {} bytes)",
            args.part_size
        );
    }
    if args.cache.block_size < 4096 || args.cache.block_size > (64 << 20) {
        bail!("--block-size must be between 4KiB and 64MiB");
    }
    if args.memory_limit < 2 * args.part_size.max(args.cache.block_size) {
        bail!("--memory-limit must be at least twice --part-size and --block-size");
    }
    if args.threads == 0 || args.max_gets == 0 {
        bail!("--threads and --max-gets must be at least 1");
    }
    Ok(())
}

/// Opens the node cache if `--cache-dir` is given. A cache that cannot be opened is an error:
/// running silently without it would turn every read into a GET.
pub fn open_cache(
    cache: &CacheArgs,
    store: &StoreArgs,
    source: &Source,
    wait_for_disk: bool,
) -> anyhow::Result<Option<NodeCache>> {
    let Some(dir) = &cache.cache_dir else {
        return Ok(None);
    };
    let config = CacheConfig {
        dir: dir.clone(),
        size: cache.cache_size,
        block_size: cache.block_size,
        memory: cache.cache_memory,
        engine: cache.cache_io,
        wait_for_disk,
    };
    let opened = BlockCache::open(&config)
        .with_context(|| format!("opening the block cache in {}", dir.display()))?;
    let store_id = match source {
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
    };
    Ok(Some(NodeCache {
        cache: opened,
        store_id: Arc::from(store_id),
    }))
}

fn prepare_mountpoint(path: &Path) -> anyhow::Result<PathBuf> {
    if !path.exists() {
        std::fs::create_dir_all(path)
            .with_context(|| format!("creating mountpoint {}", path.display()))?;
    }
    let path = path
        .canonicalize()
        .with_context(|| format!("mountpoint {}", path.display()))?;
    if !path.is_dir() {
        bail!("mountpoint {} is not a directory", path.display());
    }
    if crate::fuse::is_mountpoint(&path) {
        bail!(
            "{} is already a mountpoint; unmount it first (stacking mounts hides the one below)",
            path.display()
        );
    }
    Ok(path)
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
    let check = RetryPolicy {
        deadline: args.request_deadline.min(MAX_STARTUP_CHECK),
        ..RetryPolicy::default()
    };
    rt.block_on(check.run("check", || store.check(&prefix)))
        .map_err(|e| explain_check_failure(e, text, args.endpoint_url.as_deref()))?;
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

/// The kernel reads ahead 128 KiB on FUSE by default; 1 MiB requests halve the round trips of
/// a sequential reader. Best effort: the knob is per backing device in sysfs.
fn tune_readahead(fuse: &FuseMount) {
    let Ok(meta) = std::fs::metadata(fuse.mountpoint()) else {
        return;
    };
    use std::os::unix::fs::MetadataExt;
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let path = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "1024") {
        tracing::debug!(path, error = %e, "could not raise readahead");
    }
}

/// Waits for a signal (then unmounts) or for the workers to stop (unmounted from outside).
async fn wait_for_end(
    fuse: &FuseMount,
    mut done: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut signals = 0;
    loop {
        tokio::select! {
            _ = &mut done => return Ok(()),
            _ = term.recv() => signals += 1,
            _ = int.recv() => signals += 1,
        }
        if signals == 1 {
            tracing::info!("signal received; unmounting");
        }
        loop {
            match fuse.unmount(signals > 1) {
                Ok(()) => {
                    if signals > 1 {
                        tracing::warn!("forced unmount: open files on the mount now fail");
                        fuse.abort_connection();
                    }
                    break;
                }
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    tracing::warn!("mountpoint busy (open files or working directories); retrying every second; signal again to force");
                    tokio::select! {
                        _ = &mut done => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = term.recv() => { signals += 1; continue }
                        _ = int.recv() => { signals += 1; continue }
                    }
                }
                Err(e) => return Err(e).context("unmounting"),
            }
        }
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

    #[test]
    fn journal_paths_are_one_component_per_mountpoint() {
        let p = journal_path(Path::new("/run/berth"), Path::new("/mnt/a b"));
        assert_eq!(p, Path::new("/run/berth/mounts/_mnt_a_b/inodes"));
    }
}
