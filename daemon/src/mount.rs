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
    let mut wanted = vec![(args.source.clone(), args.mountpoint.clone())];
    for pair in args.also.chunks(2) {
        if let [source, mountpoint] = pair {
            wanted.push((source.clone(), PathBuf::from(mountpoint)));
        }
    }
    let mut targets = Vec::with_capacity(wanted.len());
    for (text, mountpoint) in wanted {
        let source = Source::parse(&text)?;
        validate(&args, &source)?;
        targets.push((text, source, mountpoint));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("berth mount needs root (CAP_SYS_ADMIN) to mount FUSE filesystems");
    }
    let mut mountpoints = Vec::with_capacity(targets.len());
    for (_, _, mountpoint) in &targets {
        let mountpoint = prepare_mountpoint(mountpoint)?;
        if mountpoints.contains(&mountpoint) {
            bail!("{} is given twice", mountpoint.display());
        }
        mountpoints.push(mountpoint);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth-io")
        .build()
        .context("starting the I/O runtime")?;

    // One memory budget and one block cache for every mount of this process.
    let memory = MemoryLimiter::new(args.memory_limit);
    let cache = open_cache_dir(&args.cache, false)?;
    let mut served: Vec<Served> = Vec::with_capacity(targets.len());
    for ((text, source, _), mountpoint) in targets.iter().zip(&mountpoints) {
        let node = cache.as_ref().map(|c| NodeCache {
            cache: c.clone(),
            store_id: Arc::from(store_id(&args.store, source)),
        });
        match serve(&rt, &args, text, source, mountpoint, &memory, node) {
            Ok(one) => served.push(one),
            Err(e) => {
                for one in &served {
                    let _ = one.fuse.unmount(true);
                }
                return Err(e);
            }
        }
    }
    for one in &served {
        println!(
            "berth: mounted {} at {}",
            one.source,
            one.fuse.mountpoint().display()
        );
    }
    let _ = std::io::stdout().flush();

    // Done when every worker of every mount has stopped (each mount unmounted).
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let workers: Vec<_> = served
        .iter_mut()
        .flat_map(|s| s.workers.drain(..))
        .collect();
    std::thread::spawn(move || {
        for w in workers {
            let _ = w.join();
        }
        let _ = done_tx.send(());
    });
    let fuses: Vec<&FuseMount> = served.iter().map(|s| &s.fuse).collect();
    rt.block_on(wait_for_end(&fuses, done_rx))?;
    for one in &served {
        one.finish();
    }
    if let Some(cache) = &cache {
        tracing::info!(stats = ?cache.stats(), "block cache");
    }
    tracing::info!(peak_memory = memory.peak(), "unmounted; bye");
    Ok(())
}

/// One mount being served.
struct Served {
    source: String,
    fuse: FuseMount,
    fs: Arc<BerthFs>,
    ns: Arc<Namespace>,
    workers: Vec<std::thread::JoinHandle<()>>,
    journal: PathBuf,
    status_file: PathBuf,
    reporter: tokio::task::JoinHandle<()>,
}

impl Served {
    /// After the unmount: commit what is still open, remove the state files.
    fn finish(&self) {
        self.reporter.abort();
        self.fs.shutdown();
        let _ = std::fs::remove_file(&self.journal);
        let _ = std::fs::remove_file(&self.status_file);
        tracing::info!(
            mountpoint = %self.fuse.mountpoint().display(),
            inodes = self.ns.inode_count(),
            skipped_keys = self.ns.skipped_keys(),
            "unmounted"
        );
    }
}

/// Connects to one source and mounts it, sharing the process's memory budget and cache.
fn serve(
    rt: &tokio::runtime::Runtime,
    args: &MountArgs,
    text: &str,
    source: &Source,
    mountpoint: &Path,
    memory: &Arc<MemoryLimiter>,
    cache: Option<NodeCache>,
) -> anyhow::Result<Served> {
    let (store, prefix) = connect(rt, source, text, &args.store)?;
    let ttl = match args.metadata_ttl {
        Some(ttl) => ttl.0,
        None if args.read_only => None,
        None => Some(Duration::from_secs(1)),
    };
    let journal = journal_path(&args.state_dir, mountpoint);
    let ns = Arc::new(
        Namespace::new(store.clone(), prefix, ttl, Some(&journal))
            .with_context(|| format!("creating the inode journal {}", journal.display()))?,
    );
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
        mountpoint,
        &MountOptions {
            fsname: format!("berth:{}", store.describe()),
            read_only: args.read_only,
            allow_other: true,
        },
    )
    .with_context(|| format!("mounting {}", mountpoint.display()))?;
    let workers = match fuse.serve(fs.clone(), args.threads) {
        Ok(w) => w,
        Err(e) => {
            let _ = fuse.unmount(true);
            return Err(e).context("starting FUSE workers");
        }
    };
    tune_readahead(&fuse);
    tracing::info!(
        source = %text,
        mountpoint = %mountpoint.display(),
        ttl = ?ttl,
        memory_limit = args.memory_limit,
        read_only = args.read_only,
        "serving"
    );
    let status_file = status::status_path(&args.state_dir, mountpoint);
    let reporter = publish_status(rt, &status_file, args, text, mountpoint, &ns, memory, cache);
    Ok(Served {
        source: text.to_string(),
        fuse,
        fs,
        ns,
        workers,
        journal,
        status_file,
        reporter,
    })
}

/// Writes the mount's status file now and every few seconds (see `berth status`).
#[allow(clippy::too_many_arguments)]
fn publish_status(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    args: &MountArgs,
    text: &str,
    mountpoint: &Path,
    ns: &Arc<Namespace>,
    memory: &Arc<MemoryLimiter>,
    cache: Option<NodeCache>,
) -> tokio::task::JoinHandle<()> {
    let report = {
        let (source, mountpoint) = (text.to_string(), mountpoint.display().to_string());
        let (ns, memory) = (ns.clone(), memory.clone());
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
    if let Err(e) = status::write(path, &report()) {
        tracing::warn!(path = %path.display(), error = %e, "could not write the status file; `berth status` will not see this mount");
    }
    let path = path.to_path_buf();
    rt.spawn(async move {
        loop {
            tokio::time::sleep(status::REFRESH).await;
            if let Err(e) = status::write(&path, &report()) {
                tracing::debug!(error = %e, "could not write the status file");
            }
        }
    })
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

/// Opens the block cache if `--cache-dir` is given. A cache that cannot be opened is an
/// error: running silently without it would turn every read into a GET.
pub fn open_cache_dir(
    cache: &CacheArgs,
    wait_for_disk: bool,
) -> anyhow::Result<Option<Arc<BlockCache>>> {
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
    BlockCache::open(&config)
        .map(Some)
        .with_context(|| format!("opening the block cache in {}", dir.display()))
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

/// Waits for a signal (then unmounts everything) or for every mount's workers to stop
/// (unmounted from outside).
async fn wait_for_end(
    mounts: &[&FuseMount],
    mut done: tokio::sync::oneshot::Receiver<()>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut signals = 0;
    tokio::select! {
        _ = &mut done => return Ok(()),
        _ = term.recv() => signals += 1,
        _ = int.recv() => signals += 1,
    }
    tracing::info!("signal received; unmounting");
    let mut left: Vec<&FuseMount> = mounts.to_vec();
    loop {
        let mut busy = Vec::new();
        for fuse in left {
            match fuse.unmount(signals > 1) {
                Ok(()) if signals > 1 => {
                    tracing::warn!(mountpoint = %fuse.mountpoint().display(), "forced unmount: open files on the mount now fail");
                    fuse.abort_connection();
                }
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => busy.push(fuse),
                Err(e) => return Err(e).context("unmounting"),
            }
        }
        if busy.is_empty() {
            return Ok(());
        }
        tracing::warn!(
            busy = busy.len(),
            "mountpoint busy (open files or working directories); retrying every second; signal again to force"
        );
        left = busy;
        tokio::select! {
            _ = &mut done => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = term.recv() => signals += 1,
            _ = int.recv() => signals += 1,
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
