//! The `peers` suite: berth and its peers on one bucket of one SeaweedFS server, a
//! Mountpoint-like workload matrix, and the ceilings each workload is compared with.
//!
//! Per system, in this order:
//! 1. one mount with an empty cache: time to first byte of the large object, sequential 1 MiB
//!    cold (1 job), one untimed pass to warm the cache, then every read workload warm;
//! 2. one fresh mount (empty cache) per remaining cold read workload;
//! 3. one fresh mount for metadata: readdir of each listing prefix, time to first byte of
//!    small files, reading every small file, and a sequential write of a new file.
//!
//! Reads use fio with O_DIRECT so the kernel page cache never answers for a system's cache.
//! Peak RSS of each mount process is sampled after its read workloads.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::fio::{self, ReadJob};
use super::peers::{Mounted, Peer, Target};
use super::progress::Progress;
use super::results::Workload;
use super::sdk::Sdk;

const MIB: u64 = 1 << 20;
const LARGE_KEY: &str = "large/data.bin";
const SMALL_PREFIX: &str = "small";
const READERS: usize = 4;
const TTFB_SAMPLES: u64 = 5;

/// Sizes of the data sets and run times; `--quick` shrinks everything.
#[derive(Debug, Clone)]
pub struct Sizes {
    pub large: u64,
    pub small_count: u64,
    pub small_size: u64,
    /// (label, number of keys) of the listing prefixes `dirs/<label>/`.
    pub dirs: Vec<(&'static str, u64)>,
    pub rand_seconds: u32,
    pub seq_seconds: u32,
    pub write: u64,
    pub cache: u64,
    /// Time limit of one metadata workload (readdir, small files).
    pub meta_timeout: Duration,
}

impl Sizes {
    pub fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                large: 128 * MIB,
                small_count: 500,
                small_size: 64 << 10,
                dirs: vec![("1k", 1000)],
                rand_seconds: 2,
                seq_seconds: 10,
                write: 128 * MIB,
                cache: 1 << 30,
                meta_timeout: Duration::from_secs(30),
            }
        } else {
            Sizes {
                large: 1 << 30,
                small_count: 10_000,
                small_size: 64 << 10,
                dirs: vec![("1k", 1000), ("10k", 10_000), ("100k", 100_000)],
                rand_seconds: 8,
                seq_seconds: 30,
                write: 1 << 30,
                cache: 4 << 30,
                meta_timeout: Duration::from_secs(120),
            }
        }
    }
}

/// The read workloads of the matrix: (id stem, title stem, job).
pub fn read_jobs(s: &Sizes) -> Vec<(String, String, ReadJob)> {
    let mut v = Vec::new();
    for jobs in [1, 4] {
        v.push((
            format!("seqread-1m-{jobs}j"),
            format!(
                "sequential read 1 MiB, {jobs} job{}",
                if jobs > 1 { "s" } else { "" }
            ),
            ReadJob {
                random: false,
                block: MIB,
                jobs,
                seconds: s.seq_seconds,
            },
        ));
    }
    for (bs, label) in [(4 << 10, "4k"), (128 << 10, "128k")] {
        for jobs in [1, 4] {
            v.push((
                format!("randread-{label}-{jobs}j"),
                format!(
                    "random read {} KiB, {jobs} job{}",
                    bs >> 10,
                    if jobs > 1 { "s" } else { "" }
                ),
                ReadJob {
                    random: true,
                    block: bs,
                    jobs,
                    seconds: s.rand_seconds,
                },
            ));
        }
    }
    v
}

/// Which workloads to run: every one, or those whose id contains one of the patterns.
#[derive(Debug, Clone, Default)]
pub struct Filter(pub Vec<String>);

impl Filter {
    pub fn wants(&self, id: &str) -> bool {
        self.0.is_empty() || self.0.iter().any(|p| id.contains(p.as_str()))
    }
}

/// Everything the suite measured, as workloads with figures, plus extra facts for the JSON.
pub struct Outcome {
    pub workloads: Vec<Workload>,
    pub tmpfs: BTreeMap<String, f64>,
    pub data_sets: Value,
}

/// A figure per workload id for one system, or why it is missing.
type Figures = BTreeMap<String, std::result::Result<f64, String>>;

pub struct Matrix<'a> {
    pub sdk: &'a Sdk,
    pub target: Target,
    pub sizes: Sizes,
    pub filter: Filter,
    pub work: PathBuf,
    pub progress: &'a Progress,
}

impl Matrix<'_> {
    /// Uploads the data sets; returns a description with the upload times.
    pub fn upload(&self) -> Result<(Value, f64)> {
        let s = &self.sizes;
        let b = &self.target.bucket;
        let p = self.progress;
        p.step(&format!("upload: large object ({} MiB)", s.large >> 20));
        let t = Instant::now();
        self.sdk
            .tool(&["put-large", b, LARGE_KEY, &s.large.to_string()])?;
        let large_secs = t.elapsed().as_secs_f64();
        p.step(&format!("upload: {} small objects", s.small_count));
        let t = Instant::now();
        self.sdk.tool(&[
            "put-many",
            b,
            SMALL_PREFIX,
            &s.small_count.to_string(),
            &s.small_size.to_string(),
        ])?;
        let small_secs = t.elapsed().as_secs_f64();
        let mut dirs = serde_json::Map::new();
        for (label, count) in &s.dirs {
            p.step(&format!("upload: listing prefix of {count} keys"));
            let t = Instant::now();
            self.sdk.tool(&[
                "put-many",
                b,
                &format!("dirs/{label}"),
                &count.to_string(),
                "0",
            ])?;
            dirs.insert(
                label.to_string(),
                json!({"keys": count, "upload_seconds": t.elapsed().as_secs_f64()}),
            );
        }
        let desc = json!({
            "large": {"key": LARGE_KEY, "bytes": s.large, "upload_seconds": large_secs},
            "small": {"prefix": SMALL_PREFIX, "count": s.small_count, "bytes_each": s.small_size, "upload_seconds": small_secs},
            "listing_prefixes": dirs,
        });
        let write_ceiling = s.large as f64 / MIB as f64 / large_secs;
        Ok((desc, write_ceiling))
    }

    /// Ceilings: fio on tmpfs and on the cache device, and the SDK against the server.
    /// Returns (tmpfs, cache device, s3-sdk) figures keyed by workload id.
    #[allow(clippy::type_complexity)]
    pub fn ceilings(
        &self,
        write_ceiling: f64,
    ) -> Result<(
        BTreeMap<String, f64>,
        BTreeMap<String, f64>,
        BTreeMap<String, f64>,
    )> {
        let s = &self.sizes;
        let (mut tmpfs, mut device, mut sdk) = (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        let shm = PathBuf::from("/dev/shm").join(format!("berth-bench-{}.bin", std::process::id()));
        let disk = self.work.join("ceiling.bin");
        let jobs = read_jobs(s);
        // fio lays the files out itself when they do not exist yet.
        for (file, map, label) in [
            (&shm, &mut tmpfs, "tmpfs"),
            (&disk, &mut device, "cache device"),
        ] {
            for (id, _, job) in &jobs {
                // Local ceilings are what warm reads are compared with.
                if !self.filter.wants(&format!("{id}-warm")) {
                    continue;
                }
                self.progress.step(&format!("ceiling: {label}, {id}"));
                let mut job = *job;
                if label == "tmpfs" {
                    // tmpfs has no O_DIRECT; its page cache is the data itself.
                    job.seconds = job.seconds.min(3);
                }
                let r = fio_plain(file, s.large, &job, label != "tmpfs")?;
                map.insert(id.clone(), rate(&job, r));
            }
        }
        let _ = std::fs::remove_file(&shm);
        let _ = std::fs::remove_file(&disk);

        let b = &self.target.bucket;
        for (id, _, job) in &jobs {
            // The server's rate is what cold reads are compared with.
            if !self.filter.wants(&format!("{id}-cold")) {
                continue;
            }
            self.progress.step(&format!("ceiling: s3-sdk, {id}"));
            // Sequential: what a reader with 8 MiB ranged GETs, 8 in flight, gets from the
            // server; random: the same block size and concurrency as the fio job.
            let (block, conc, mode) = if job.random {
                (job.block, job.jobs as u64, "rand")
            } else {
                (8 * MIB, 8, "seq")
            };
            let secs = job.seconds.clamp(2, 8).to_string();
            let field = if job.random {
                "ops_per_sec"
            } else {
                "bytes_per_sec"
            };
            let v = self.sdk.measure(
                &[
                    "ranged",
                    b,
                    LARGE_KEY,
                    &block.to_string(),
                    &conc.to_string(),
                    &secs,
                    mode,
                ],
                field,
            )?;
            sdk.insert(id.clone(), if job.random { v } else { v / MIB as f64 });
        }
        if self.filter.wants("ttfb") {
            self.progress
                .step("ceiling: s3-sdk, single 4 KiB GET latency");
            let ops = self.sdk.measure(
                &["ranged", b, LARGE_KEY, "4096", "1", "2", "rand"],
                "ops_per_sec",
            )?;
            sdk.insert("ttfb-large-cold".into(), 1000.0 / ops);
            sdk.insert("ttfb-small-cold".into(), 1000.0 / ops);
        }
        if self.filter.wants("smallfiles") {
            self.progress.step("ceiling: s3-sdk, small objects");
            let v = self.sdk.measure(
                &[
                    "get-many",
                    b,
                    SMALL_PREFIX,
                    &self.sizes.small_count.to_string(),
                    &READERS.to_string(),
                ],
                "ops_per_sec",
            )?;
            sdk.insert("smallfiles-read-cold".into(), v);
        }
        sdk.insert("write-seq-new".into(), write_ceiling);
        Ok((tmpfs, device, sdk))
    }

    /// Every workload on one system.
    pub fn measure(&self, peer: &Peer) -> Figures {
        let mut f = Figures::new();
        let mut rss: Option<u64> = None;
        let mut note_rss = |m: &Mounted| {
            if let Some(r) = m.peak_rss() {
                rss = Some(rss.map_or(r, |x: u64| x.max(r)));
            }
        };
        let jobs = read_jobs(&self.sizes);
        let large = |m: &Mounted| m.mp.join(LARGE_KEY);

        // 1. First mount: ttfb, sequential cold, warm everything.
        let warm_wanted = jobs
            .iter()
            .any(|(id, _, _)| self.filter.wants(&format!("{id}-warm")));
        let first_cold = format!("{}-cold", jobs[0].0);
        if warm_wanted || self.filter.wants(&first_cold) || self.filter.wants("ttfb-large") {
            match self.mount(peer) {
                Err(e) => fail_all(&mut f, &jobs, &format!("mount failed: {e:#}")),
                Ok(m) => {
                    if self.filter.wants("ttfb-large") {
                        self.progress
                            .step(&format!("{}: ttfb-large-cold", peer.name()));
                        f.insert("ttfb-large-cold".into(), ttfb(&large(&m)).map_err(show));
                    }
                    let (id, _, job) = &jobs[0];
                    self.progress.step(&format!("{}: {id}-cold", peer.name()));
                    f.insert(first_cold.clone(), self.read(&large(&m), job));
                    if warm_wanted {
                        self.progress
                            .step(&format!("{}: warming the cache", peer.name()));
                        let warm = ReadJob {
                            jobs: 4,
                            seconds: 120,
                            ..*job
                        };
                        let warmed = self.read(&large(&m), &warm);
                        for (id, _, job) in &jobs {
                            let wid = format!("{id}-warm");
                            if !self.filter.wants(&wid) {
                                continue;
                            }
                            self.progress.step(&format!("{}: {wid}", peer.name()));
                            let r = match &warmed {
                                Err(e) => Err(format!("warming failed: {e}")),
                                Ok(_) => self.read(&large(&m), job),
                            };
                            f.insert(wid, r);
                        }
                    }
                    note_rss(&m);
                    if let Err(e) = m.unmount() {
                        self.progress.log(&format!("{}: {e:#}", peer.name()));
                    }
                }
            }
        }

        // 2. A fresh mount per remaining cold read workload.
        for (id, _, job) in jobs.iter().skip(1) {
            let cid = format!("{id}-cold");
            if !self.filter.wants(&cid) {
                continue;
            }
            self.progress.step(&format!("{}: {cid}", peer.name()));
            let r = self.mount(peer).map_err(show).and_then(|m| {
                let r = self.read(&large(&m), job);
                note_rss(&m);
                drop(m);
                r
            });
            f.insert(cid, r);
        }
        if let Some(r) = rss {
            f.insert("rss-peak-reads".into(), Ok(r as f64 / MIB as f64));
        }

        // 3. Metadata, small files, write.
        let meta_ids = ["readdir", "ttfb-small", "smallfiles", "write"];
        if meta_ids.iter().any(|id| self.filter.wants(id)) {
            match self.mount(peer) {
                Err(e) => {
                    for id in meta_ids {
                        f.insert(id.to_owned(), Err(format!("mount failed: {e:#}")));
                    }
                }
                Ok(m) => self.metadata(peer, m, &mut f),
            }
        }
        f
    }

    fn metadata(&self, peer: &Peer, m: Mounted, f: &mut Figures) {
        let s = &self.sizes;
        let limit = s.meta_timeout;
        let mut hung = false;
        if self.filter.wants("ttfb-small") && !hung {
            self.progress
                .step(&format!("{}: ttfb-small-cold", peer.name()));
            let mut samples: Vec<f64> = Vec::new();
            let mut err = None;
            for n in 0..TTFB_SAMPLES {
                // Spread over the prefix, never the files the small-file test starts with.
                let i = s.small_count - 1 - n * (s.small_count / TTFB_SAMPLES / 2).max(1);
                match ttfb(&m.mp.join(SMALL_PREFIX).join(format!("f{i:06}"))) {
                    Ok(ms) => samples.push(ms),
                    Err(e) => err = Some(show(e)),
                }
            }
            f.insert(
                "ttfb-small-cold".into(),
                match err {
                    Some(e) => Err(e),
                    None => Ok(median(&mut samples)),
                },
            );
        }
        if self.filter.wants("smallfiles") && !hung {
            self.progress
                .step(&format!("{}: smallfiles-read-cold", peer.name()));
            let dir = m.mp.join(SMALL_PREFIX);
            let (count, size) = (s.small_count, s.small_size);
            let r = with_timeout(limit, move || read_all(&dir, count, size));
            hung |= r.as_ref().is_err_and(|e| e.contains("timed out"));
            f.insert("smallfiles-read-cold".into(), r);
        }
        if self.filter.wants("write") && !hung {
            self.progress
                .step(&format!("{}: write-seq-new", peer.name()));
            let name = format!("write-{}.bin", peer.name());
            let r = write_new(&m.mp.join(&name), s.write)
                .and_then(|started| self.wait_durable(&name, s.write, started))
                .map_err(show);
            f.insert("write-seq-new".into(), r);
        }
        for (label, count) in &s.dirs {
            let id = format!("readdir-{label}-cold");
            if !self.filter.wants(&id) || hung {
                continue;
            }
            self.progress.step(&format!("{}: {id}", peer.name()));
            let dir = m.mp.join("dirs").join(label);
            let want = *count;
            let r = with_timeout(limit, move || {
                let t = Instant::now();
                let n = std::fs::read_dir(&dir)?.count() as u64;
                if n != want {
                    bail!("listed {n} entries, expected {want}");
                }
                Ok(t.elapsed().as_secs_f64())
            });
            hung |= r.as_ref().is_err_and(|e| e.contains("timed out"));
            f.insert(id, r);
        }
        if hung {
            m.kill();
        } else if let Err(e) = m.unmount() {
            self.progress.log(&format!("{}: {e:#}", peer.name()));
        }
    }

    /// MiB/s of a write from create() until the object is complete in the store (some systems
    /// upload only after close returns, so close alone would flatter them).
    fn wait_durable(&self, key: &str, size: u64, started: Instant) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let out = self.sdk.tool(&["head", &self.target.bucket, key])?;
            if out.parse::<u64>().ok() == Some(size) {
                return Ok(size as f64 / MIB as f64 / started.elapsed().as_secs_f64());
            }
            if Instant::now() > deadline {
                bail!("{key} not complete in the store 300 s after close (head: {out})");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn mount(&self, peer: &Peer) -> Result<Mounted> {
        peer.mount(&self.target, &self.work)
    }

    fn read(&self, file: &Path, job: &ReadJob) -> std::result::Result<f64, String> {
        fio::read(file, self.sizes.large, job)
            .map(|r| rate(job, r))
            .map_err(show)
    }
}

/// MiB/s for sequential jobs, IOPS for random ones.
fn rate(job: &ReadJob, r: fio::FioResult) -> f64 {
    if job.random {
        r.iops
    } else {
        r.mib_per_sec()
    }
}

/// fio on a plain file (the ceilings); `direct` where the filesystem supports it.
fn fio_plain(file: &Path, size: u64, job: &ReadJob, direct: bool) -> Result<fio::FioResult> {
    if !file.exists() {
        write_file(file, size)?;
    }
    let mut args = job.args(file, size);
    if !direct {
        args.retain(|a| a != "--direct=1");
    }
    let out = std::process::Command::new("fio")
        .args(&args)
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    fio::parse(&String::from_utf8_lossy(&out.stdout), "read")
}

fn write_file(path: &Path, size: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let chunk: Vec<u8> = (0..MIB).map(|i| (i * 131 % 251) as u8).collect();
    for _ in 0..size / MIB {
        f.write_all(&chunk)?;
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(())
}

/// Milliseconds from open() to the first 4 KiB read.
fn ttfb(path: &Path) -> Result<f64> {
    let t = Instant::now();
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = [0u8; 4096];
    let n = file.read(&mut buf)?;
    if n == 0 {
        bail!("{} is empty", path.display());
    }
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// Lists `dir` and reads every file with `READERS` threads; files/s.
fn read_all(dir: &Path, count: u64, size: u64) -> Result<f64> {
    let t = Instant::now();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    files.sort();
    if files.len() as u64 != count {
        bail!("listed {} files, expected {count}", files.len());
    }
    let next = AtomicU64::new(0);
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..READERS)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                        let Some(path) = files.get(i) else {
                            return Ok(());
                        };
                        let n = std::fs::read(path)
                            .with_context(|| format!("reading {}", path.display()))?
                            .len() as u64;
                        if n != size {
                            bail!("{} has {n} bytes, expected {size}", path.display());
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| anyhow::anyhow!("reader panicked"))??;
        }
        Ok(())
    })?;
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

/// Writes a new file of `size` bytes in 1 MiB writes and closes it; returns when it started.
fn write_new(path: &Path, size: u64) -> Result<Instant> {
    let chunk: Vec<u8> = (0..MIB).map(|i| (i * 7 % 253) as u8).collect();
    let start = Instant::now();
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    for _ in 0..size / MIB {
        f.write_all(&chunk).context("writing")?;
    }
    drop(f);
    Ok(start)
}

/// Runs `f` on its own thread; gives up after `limit` (the thread is left blocked in the
/// mount, which the caller then kills).
fn with_timeout(
    limit: Duration,
    f: impl FnOnce() -> Result<f64> + Send + 'static,
) -> std::result::Result<f64, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r.map_err(show),
        Err(_) => Err(format!("timed out after {} s", limit.as_secs())),
    }
}

fn fail_all(f: &mut Figures, jobs: &[(String, String, ReadJob)], why: &str) {
    for (id, _, _) in jobs {
        f.insert(format!("{id}-warm"), Err(why.to_owned()));
    }
    f.insert(format!("{}-cold", jobs[0].0), Err(why.to_owned()));
    f.insert("ttfb-large-cold".into(), Err(why.to_owned()));
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn show(e: anyhow::Error) -> String {
    format!("{e:#}")
}

/// The empty workload list of the matrix (figures are filled in per system).
pub fn workload_list(s: &Sizes) -> Vec<Workload> {
    let mut v = Vec::new();
    for temp in ["cold", "warm"] {
        for (id, title, job) in read_jobs(s) {
            let unit = if job.random { "IOPS" } else { "MiB/s" };
            v.push(Workload::new(
                &format!("{id}-{temp}"),
                &format!("{title}, {temp}"),
                &format!("{temp} reads"),
                unit,
                true,
            ));
        }
    }
    v.push(Workload::new(
        "ttfb-large-cold",
        "time to first byte, large object",
        "metadata",
        "ms",
        false,
    ));
    v.push(Workload::new(
        "ttfb-small-cold",
        "time to first byte, small file (median of 5)",
        "metadata",
        "ms",
        false,
    ));
    v.push(Workload::new(
        "smallfiles-read-cold",
        &format!(
            "small files: list + read {} × {} KiB, {READERS} threads",
            s.small_count,
            s.small_size >> 10
        ),
        "metadata",
        "files/s",
        true,
    ));
    for (label, count) in &s.dirs {
        v.push(Workload::new(
            &format!("readdir-{label}-cold"),
            &format!("readdir of {count} entries"),
            "metadata",
            "s",
            false,
        ));
    }
    v.push(Workload::new(
        "write-seq-new",
        &format!(
            "sequential write of a new {} MiB file (until in the store)",
            s.write >> 20
        ),
        "write",
        "MiB/s",
        true,
    ));
    v.push(Workload::new(
        "rss-peak-reads",
        "peak RSS of the mount process during reads",
        "memory",
        "MiB",
        false,
    ));
    v
}
