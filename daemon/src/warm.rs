//! `berth warm`: preload objects into the block cache before an application needs them.
//!
//! Two ways in. A path inside a berth mount is warmed by reading its files through the mount:
//! the mount's process owns the cache, so this fills it however that mount is configured. An
//! `s3://` source is read straight into `--cache-dir` by this process (the cache dir is locked,
//! so that only works while no mount uses it), or into a node daemon's cache (`--cache-socket`),
//! which every mount of the node then reads. Either way concurrency is bounded, progress is
//! shown (a bar on a terminal, a line every few seconds otherwise), and a summary ends the run.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures::{FutureExt, StreamExt};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

use crate::cache::{CacheConfig, ObjectId};
use crate::namespace::keys;
use crate::store::{ObjectInfo, ObjectStore};
use crate::volume::{connect, open_cache, Source, StoreConfig};

/// Blocks read per cache call (consecutive blocks travel in one GET).
const BLOCKS_PER_READ: u64 = 8;
/// How often progress is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// What `berth warm` does.
#[derive(Clone, Debug)]
pub struct WarmConfig {
    /// Paths inside a berth mount, or `s3://BUCKET[/PREFIX]` sources.
    pub paths: Vec<String>,
    /// Objects read at once (at least 1).
    pub concurrency: usize,
    /// How to reach the store of `s3://` sources.
    pub store: StoreConfig,
    /// The cache `s3://` sources are read into.
    pub cache: Option<CacheConfig>,
}

pub fn run(args: WarmConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the I/O runtime")?;
    let mut failed = 0;
    for path in &args.paths {
        failed += if path.starts_with("s3://") {
            warm_store(&rt, path, &args)?
        } else {
            warm_mounted(Path::new(path), args.concurrency)?
        };
    }
    if failed > 0 {
        bail!("{failed} object(s) could not be warmed (see the log above)");
    }
    Ok(())
}

/// Progress on stderr: an indicatif bar on a terminal, plain lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    total: u64,
    done: AtomicU64,
    start: Instant,
    last_line: Mutex<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "warm {bar:40} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            total,
            done: AtomicU64::new(0),
            start: Instant::now(),
            last_line: Mutex::new(Instant::now()),
        }
    }

    fn add(&self, bytes: u64) {
        let done = self.done.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
            return;
        }
        let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
        if last.elapsed() >= PLAIN_EVERY {
            *last = Instant::now();
            let rate = self.rate(done);
            let eta = if rate > 0.0 {
                format!("{:.0}s", (self.total.saturating_sub(done)) as f64 / rate)
            } else {
                "?".into()
            };
            eprintln!(
                "warm: {} / {} ({:.0}%), {}/s, ETA {eta}",
                HumanBytes(done),
                HumanBytes(self.total),
                100.0 * done as f64 / self.total.max(1) as f64,
                HumanBytes(rate as u64)
            );
        }
    }

    fn rate(&self, done: u64) -> f64 {
        done as f64 / self.start.elapsed().as_secs_f64().max(1e-3)
    }

    fn finish(&self) -> (u64, Duration) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        (self.done.load(Ordering::Relaxed), self.start.elapsed())
    }
}

/// Every object below `prefix`, following the same path rules as the namespace (keys that
/// cannot be paths are skipped, and counted).
async fn list_all(store: &dyn ObjectStore, prefix: &str) -> anyhow::Result<(Vec<ObjectInfo>, u64)> {
    let mut objects = Vec::new();
    let mut skipped = 0;
    let mut dirs = vec![prefix.to_string()];
    while let Some(dir) = dirs.pop() {
        let mut token: Option<String> = None;
        loop {
            let page = store
                .list(&dir, token.as_deref(), 1000)
                .await
                .with_context(|| format!("listing {dir:?}"))?;
            for obj in page.objects {
                match obj.key.strip_prefix(dir.as_str()) {
                    Some("") => {} // the directory marker
                    Some(name) if keys::is_valid_name(name) => objects.push(obj),
                    _ => skipped += 1,
                }
            }
            for sub in page.prefixes {
                let name = sub
                    .strip_prefix(dir.as_str())
                    .and_then(|r| r.strip_suffix('/'));
                match name {
                    Some(name) if keys::is_valid_name(name) => dirs.push(sub),
                    _ => skipped += 1,
                }
            }
            token = page.next_token;
            if token.is_none() {
                break;
            }
        }
    }
    Ok((objects, skipped))
}

/// Reads every object of an s3:// source into the cache; returns the number of failures.
fn warm_store(
    rt: &tokio::runtime::Runtime,
    text: &str,
    args: &WarmConfig,
) -> anyhow::Result<usize> {
    let source = Source::parse(text)?;
    if args.cache.is_none() {
        bail!("warming {text} needs --cache-dir or --cache-socket (the cache to fill)");
    }
    let (store, prefix) = connect(rt, &source, text, &args.store)?;
    let node = open_cache(&args.cache, &args.store, &source)?.context("no cache was opened")?;
    let (objects, skipped) = rt.block_on(list_all(store.as_ref(), &prefix))?;
    if skipped > 0 {
        tracing::warn!(skipped, "skipped keys that cannot be paths");
    }
    let total: u64 = objects.iter().map(|o| o.size).sum();
    let capacity = node.cache.stats().disk_slots * node.cache.block_size();
    if total > capacity {
        tracing::warn!(
            data = %HumanBytes(total),
            cache = %HumanBytes(capacity),
            "the data is larger than the cache: only the part read last stays cached"
        );
    }
    eprintln!(
        "warm: {text}: {} objects, {}",
        objects.len(),
        HumanBytes(total)
    );
    let progress = Progress::new(total);
    let cache = node.cache.clone();
    let bs = cache.block_size();
    let warm_one = |obj: ObjectInfo| {
        let (store, cache, progress) = (store.clone(), cache.clone(), &progress);
        let store_id = node.store_id.clone();
        async move {
            let Some(etag) = obj.etag.clone() else {
                tracing::warn!(key = %obj.key, "object has no ETag; it cannot be cached");
                return Err(());
            };
            let id = ObjectId {
                store: store_id,
                key: Arc::from(obj.key.as_str()),
                etag: Arc::from(etag.as_str()),
            };
            let blocks = obj.size.div_ceil(bs);
            let mut first = 0;
            while first < blocks {
                let count = BLOCKS_PER_READ.min(blocks - first);
                let fetch = |range: std::ops::Range<u64>| {
                    let (store, key, etag) = (store.clone(), id.key.clone(), id.etag.clone());
                    async move { store.get_range(&key, range, Some(&etag)).await }.boxed()
                };
                match cache.read_blocks(&id, first, count, obj.size, fetch).await {
                    Ok(got) => progress.add(got.iter().map(|b| b.len() as u64).sum()),
                    Err(e) => {
                        tracing::error!(key = %obj.key, error = %e, "could not warm object");
                        return Err(());
                    }
                }
                first += count;
            }
            Ok(())
        }
    };
    let results: Vec<Result<(), ()>> = rt.block_on(
        futures::stream::iter(objects)
            .map(warm_one)
            .buffer_unordered(args.concurrency)
            .collect(),
    );
    rt.block_on(cache.drain_writes());
    let (done, took) = progress.finish();
    let failed = results.iter().filter(|r| r.is_err()).count();
    let stats = cache.stats();
    eprintln!(
        "warm: {text}: {} in {:.1?} ({}/s); {} from the store, {} already cached; {} blocks on disk of {}; {failed} failed",
        HumanBytes(done),
        took,
        HumanBytes(progress.rate(done) as u64),
        HumanBytes(stats.bytes_from_store),
        HumanBytes(stats.bytes_from_disk + stats.bytes_from_memory),
        stats.disk_blocks,
        stats.disk_slots,
    );
    Ok(failed)
}

/// Every regular file below `root` (symlinks are not followed), with its size.
fn walk(root: &Path) -> anyhow::Result<Vec<(PathBuf, u64)>> {
    let mut files = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let meta =
            std::fs::symlink_metadata(&dir).with_context(|| format!("stat {}", dir.display()))?;
        if meta.is_file() {
            files.push((dir, meta.len()));
            continue;
        }
        for entry in
            std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))?
        {
            let entry = entry?;
            let kind = entry.file_type()?;
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                files.push((entry.path(), entry.metadata()?.len()));
            }
        }
    }
    Ok(files)
}

/// Reads every file below `path` through its berth mount; returns the number of failures.
fn warm_mounted(path: &Path, concurrency: usize) -> anyhow::Result<usize> {
    let path = path
        .canonicalize()
        .with_context(|| format!("{} does not exist", path.display()))?;
    match crate::sys::mounts::fstype_of(&path).as_deref() {
        Some("fuse.berth") => {}
        other => bail!(
            "{} is not inside a berth mount (filesystem {}); use an s3:// source with --cache-dir, or a path under a berth mountpoint",
            path.display(),
            other.unwrap_or("unknown")
        ),
    }
    let files = walk(&path)?;
    let total: u64 = files.iter().map(|(_, len)| len).sum();
    eprintln!(
        "warm: {}: {} files, {}",
        path.display(),
        files.len(),
        HumanBytes(total)
    );
    let progress = Progress::new(total);
    let queue = Mutex::new(files);
    let failed = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..concurrency {
            scope.spawn(|| {
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let next = queue.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let Some((file, _)) = next else { return };
                    if let Err(e) = read_through(&file, &mut buf, &progress) {
                        tracing::error!(file = %file.display(), error = %e, "could not warm file");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    let (done, took) = progress.finish();
    let failed = failed.load(Ordering::Relaxed) as usize;
    eprintln!(
        "warm: {}: {} read through the mount in {:.1?} ({}/s); {failed} failed",
        path.display(),
        HumanBytes(done),
        took,
        HumanBytes(progress.rate(done) as u64),
    );
    Ok(failed)
}

fn read_through(file: &Path, buf: &mut [u8], progress: &Progress) -> std::io::Result<()> {
    let mut f = std::fs::File::open(file)?;
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            return Ok(());
        }
        progress.add(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[tokio::test]
    async fn lists_every_object_below_a_prefix_and_skips_odd_keys() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["a/1", "a/b/2", "c", "a/b/c/3"] {
            let p = dir.path().join(f);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, f).unwrap();
        }
        let store = LocalStore::open(dir.path()).unwrap();
        let (objects, skipped) = list_all(&store, "a/").await.unwrap();
        let mut keys: Vec<_> = objects.iter().map(|o| o.key.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["a/1", "a/b/2", "a/b/c/3"]);
        assert_eq!(skipped, 0);
    }

    #[test]
    fn refuses_paths_outside_a_berth_mount() {
        let err = warm_mounted(Path::new("/proc"), 1).unwrap_err();
        assert!(
            err.to_string().contains("not inside a berth mount"),
            "{err}"
        );
    }
}
