//! Self-healing: the engine is killed, stopped and upgraded under load, and the holder is
//! killed (last resort: remount + re-bind), while applications keep reading and writing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};

use crate::mount::{Mount, MountOpts, BERTH};
use crate::s3::Bucket;
use crate::shared_server;
use crate::util::{close_checked, ensure_same_bytes, expect_errno, random_bytes, read_file, Rng};

const MIB: usize = 1 << 20;
const BIG: usize = 24 * MIB;
const LISTED: usize = 40;

/// Writes the load made: (name, bytes, how it ended).
type WriteLog = Vec<(String, Vec<u8>, Result<(), String>)>;

/// Which detection layer a test runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detector {
    Ebpf,
    Fallback,
}

impl Detector {
    fn flags(self) -> Vec<&'static str> {
        match self {
            Detector::Ebpf => vec![],
            Detector::Fallback => vec!["--no-ebpf"],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Detector::Ebpf => "ebpf",
            Detector::Fallback => "fallback",
        }
    }
}

/// How a successor gets the requests its predecessor read and did not answer: the kernel's
/// RESEND (6.9+), or the request slots in the holder's shared region (older kernels; forced
/// here through the engine's environment).
#[derive(Clone, Copy, Debug)]
pub enum Takeover {
    Resend,
    Slots,
}

impl Takeover {
    fn env(self) -> Vec<(String, String)> {
        match self {
            Takeover::Resend => vec![],
            Takeover::Slots => vec![("BERTH_TAKEOVER_NO_RESEND".into(), "1".into())],
        }
    }

    fn name(self) -> &'static str {
        match self {
            Takeover::Resend => "resend",
            Takeover::Slots => "slots",
        }
    }

    /// The log shows which path the successors took; returns how many requests they served
    /// again from the request slots.
    fn check_log(self, m: &Mount) -> Result<usize> {
        let slots = m
            .log()
            .contains("serving the previous engine's unanswered requests from the request slots");
        ensure!(
            slots == matches!(self, Takeover::Slots),
            "takeover {:?}, but the request slots were {}used",
            self,
            if slots { "" } else { "not " }
        );
        Ok(m.log()
            .matches("serving again a request the previous engine read")
            .count())
    }
}

/// What the status file of a mount says about healing.
#[derive(Debug)]
pub(super) struct Heal {
    pub engine_pid: u32,
    pub generation: u64,
    detector: String,
    pub recoveries: u64,
    last_recovery_kind: Option<String>,
    pub last_detected_by: Option<String>,
}

fn status_file(state_dir: &Path) -> Result<PathBuf> {
    let dir = state_dir.join("mounts");
    let entry = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .next()
        .context("no mount state dir")??;
    Ok(entry.path().join("status.json"))
}

pub(super) fn heal_status(m: &Mount) -> Result<Heal> {
    heal_status_in(&m.state_dir())
}

/// The heal facts of the only volume held under `state_dir` (a mount's, a standalone share's).
pub(super) fn heal_status_in(state_dir: &Path) -> Result<Heal> {
    let path = status_file(state_dir)?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    for field in [
        "holder_pid",
        "engine_pid",
        "engine_generation",
        "detector",
        "recoveries",
        "last_recovery_ms",
    ] {
        ensure!(v.get(field).is_some(), "status lacks {field}: {text}");
    }
    Ok(Heal {
        engine_pid: v["engine_pid"].as_u64().context("engine_pid")? as u32,
        generation: v["engine_generation"]
            .as_u64()
            .context("engine_generation")?,
        detector: v["detector"].as_str().unwrap_or_default().to_string(),
        recoveries: v["recoveries"].as_u64().unwrap_or(0),
        last_recovery_kind: v["last_recovery_kind"].as_str().map(str::to_string),
        last_detected_by: v["last_detected_by"].as_str().map(str::to_string),
    })
}

/// Waits until the mount's status shows generation > `after` with a live engine.
pub(super) fn wait_generation(m: &Mount, after: u64, timeout: Duration) -> Result<Heal> {
    wait_generation_in(&m.state_dir(), after, timeout)
}

/// An engine generation newer than `after`, alive, under `state_dir`.
pub(super) fn wait_generation_in(state_dir: &Path, after: u64, timeout: Duration) -> Result<Heal> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(h) = heal_status_in(state_dir) {
            // SAFETY: signal 0 only checks the process exists.
            if h.generation > after && unsafe { libc::kill(h.engine_pid as i32, 0) } == 0 {
                return Ok(h);
            }
        }
        if Instant::now() > deadline {
            bail!("no engine generation > {after} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Application load: readers on open fds, a lister, a writer of new files.
struct Load {
    stop: Arc<AtomicBool>,
    errors: Arc<Mutex<Vec<String>>>,
    max_stall_us: Arc<AtomicU64>,
    ops: Arc<AtomicU64>,
    writes: Arc<Mutex<WriteLog>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(mnt: &Path, big: Arc<Vec<u8>>) -> Result<Load> {
        let load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            errors: Arc::new(Mutex::new(Vec::new())),
            max_stall_us: Arc::new(AtomicU64::new(0)),
            ops: Arc::new(AtomicU64::new(0)),
            writes: Arc::new(Mutex::new(Vec::new())),
            threads: Vec::new(),
        };
        let mut load = load;
        for seed in 0..2 {
            let file = std::fs::File::open(mnt.join("big.bin"))?;
            let (big, probe) = (big.clone(), load.probe());
            load.threads.push(std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let mut rng = Rng::new(seed);
                let mut buf = vec![0u8; 64 << 10];
                probe.run(|| {
                    let off = rng.range(0, (big.len() - buf.len()) as u64) as usize;
                    file.read_exact_at(&mut buf, off as u64)
                        .map_err(|e| format!("pread at {off}: {e}"))?;
                    if buf[..] != big[off..off + buf.len()] {
                        return Err(format!("wrong bytes at {off}"));
                    }
                    Ok(())
                });
            }));
        }
        let (dir, probe) = (mnt.join("listed"), load.probe());
        load.threads.push(std::thread::spawn(move || {
            probe.run(|| {
                let n = std::fs::read_dir(&dir)
                    .and_then(|d| d.collect::<std::io::Result<Vec<_>>>())
                    .map_err(|e| format!("readdir: {e}"))?
                    .len();
                if n != LISTED {
                    return Err(format!("listed {n} entries, want {LISTED}"));
                }
                Ok(())
            });
        }));
        let (out, probe, writes) = (mnt.join("out"), load.probe(), load.writes.clone());
        load.threads.push(std::thread::spawn(move || {
            let mut i = 0u64;
            while !probe.stop.load(Ordering::Relaxed) {
                let name = format!("w-{i:05}.bin");
                let data = random_bytes(1000 + i, 192 << 10);
                let started = Instant::now();
                let result = write_file(&out.join(&name), &data);
                probe.note_stall(started.elapsed());
                writes.lock().unwrap().push((name, data, result));
                i += 1;
            }
        }));
        Ok(load)
    }

    fn probe(&self) -> Probe {
        Probe {
            stop: self.stop.clone(),
            errors: self.errors.clone(),
            max_stall_us: self.max_stall_us.clone(),
            ops: self.ops.clone(),
        }
    }

    /// Stops the load; returns (operations, errors, max stall, writes).
    #[allow(clippy::type_complexity)]
    fn finish(
        self,
    ) -> (
        u64,
        Vec<String>,
        Duration,
        Vec<(String, Vec<u8>, Result<(), String>)>,
    ) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let errors = self.errors.lock().unwrap().clone();
        let writes = std::mem::take(&mut *self.writes.lock().unwrap());
        (
            self.ops.load(Ordering::Relaxed),
            errors,
            Duration::from_micros(self.max_stall_us.load(Ordering::Relaxed)),
            writes,
        )
    }
}

#[derive(Clone)]
struct Probe {
    stop: Arc<AtomicBool>,
    errors: Arc<Mutex<Vec<String>>>,
    max_stall_us: Arc<AtomicU64>,
    ops: Arc<AtomicU64>,
}

impl Probe {
    fn run(&self, mut op: impl FnMut() -> Result<(), String>) {
        while !self.stop.load(Ordering::Relaxed) {
            let started = Instant::now();
            let result = op();
            self.note_stall(started.elapsed());
            if let Err(e) = result {
                self.errors.lock().unwrap().push(e);
            }
        }
    }

    fn note_stall(&self, took: Duration) {
        self.ops.fetch_add(1, Ordering::Relaxed);
        self.max_stall_us
            .fetch_max(took.as_micros() as u64, Ordering::Relaxed);
    }
}

/// Writes a new file and closes it, reporting any error of write or close.
fn write_file(path: &Path, data: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(|e| format!("create: {e}"))?;
    f.write_all(data).map_err(|e| format!("write: {e}"))?;
    close_checked(f).map_err(|e| format!("close: {e}"))
}

/// Every write reported as done is in the store, byte for byte.
fn check_writes(
    bucket: &Bucket,
    writes: &[(String, Vec<u8>, Result<(), String>)],
) -> Result<(usize, usize)> {
    let (mut ok, mut reported) = (0, 0);
    for (name, data, result) in writes {
        match result {
            Ok(()) => {
                let got = bucket.get(&format!("out/{name}"))?;
                ensure!(
                    &got == data,
                    "out/{name} was reported written but the store has {} other bytes",
                    got.len()
                );
                ok += 1;
            }
            Err(e) => {
                eprintln!("heal: write of {name} cleanly reported as failed: {e}");
                reported += 1;
            }
        }
    }
    Ok((ok, reported))
}

fn setup(tag: &str) -> Result<(Bucket, Arc<Vec<u8>>)> {
    let server = shared_server()?;
    let bucket = server.bucket(tag)?;
    let big = Arc::new(random_bytes(0x4ea1, BIG));
    bucket.put("big.bin", big.to_vec())?;
    bucket.put_many(
        (0..LISTED).map(|i| format!("listed/f{i:03}")).collect(),
        b"x",
        8,
    )?;
    bucket.put("out/", Vec::new())?;
    Ok((bucket, big))
}

fn mount(bucket: &Bucket, detector: Detector, takeover: Takeover, extra: &[&str]) -> Result<Mount> {
    let mut flags = detector.flags();
    flags.extend_from_slice(extra);
    let m = Mount::s3(
        shared_server()?,
        &bucket.name,
        None,
        MountOpts {
            env: takeover.env(),
            ..MountOpts::flags(&flags)
        },
    )?;
    let status = heal_status(&m)?;
    ensure!(
        status.detector == detector.name(),
        "detector is {:?}, want {:?}",
        status.detector,
        detector.name()
    );
    Ok(m)
}

fn kill(pid: u32, sig: i32) -> Result<()> {
    // SAFETY: plain kill(2) of a process we started (through the holder).
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// The engine is killed with SIGKILL ten times under load: no application error.
pub fn kill9_under_load(detector: Detector, takeover: Takeover) -> Result<()> {
    let (bucket, big) = setup(&format!(
        "heal-kill-{}-{}",
        detector.name(),
        takeover.name()
    ))?;
    let m = mount(&bucket, detector, takeover, &[])?;
    let load = Load::start(m.path(), big)?;
    let mut generation = heal_status(&m)?.generation;
    let mut worst_recovery = Duration::ZERO;
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(400));
        let engine = heal_status(&m)?.engine_pid;
        let killed = Instant::now();
        kill(engine, libc::SIGKILL)?;
        generation = wait_generation(&m, generation, Duration::from_secs(20))?.generation;
        worst_recovery = worst_recovery.max(killed.elapsed());
    }
    std::thread::sleep(Duration::from_millis(300));
    let (ops, errors, max_stall, writes) = load.finish();
    let (ok, reported) = check_writes(&bucket, &writes)?;
    let status = heal_status(&m)?;
    eprintln!(
        "heal: {} {} kill -9 x10: {ops} operations, {} errors, max stall {max_stall:?}, worst kill-to-serving {worst_recovery:?}, writes {ok} committed / {reported} reported failed, generation {}, recoveries {}",
        detector.name(),
        takeover.name(),
        errors.len(),
        status.generation,
        status.recoveries
    );
    ensure!(
        errors.is_empty(),
        "applications saw errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    ensure!(
        status.recoveries >= 10,
        "recoveries {} < 10",
        status.recoveries
    );
    ensure!(status.last_recovery_kind.as_deref() == Some("takeover"));
    ensure!(ok > 0, "no write went through");
    ensure!(
        reported == 0,
        "{reported} files failed to write across engine kills"
    );
    let replayed = takeover.check_log(&m)?;
    eprintln!(
        "heal: {} takeover: {replayed} requests served again from request slots",
        takeover.name()
    );
    m.finish()
}

/// Upload spool files under a state directory (every `writes/` directory in it).
fn spool_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| {
            if e.file_name() == "writes" {
                std::fs::read_dir(e.path()).map(|d| d.count()).unwrap_or(0)
            } else {
                spool_files(&e.path())
            }
        })
        .sum()
}

/// One writer thread: files of `size` bytes in `chunk`-sized writes with `pause` between,
/// so that kills land inside files. Returns every file and how its writing ended.
fn paced_writer(
    out: PathBuf,
    stop: Arc<AtomicBool>,
    prefix: &'static str,
    size: usize,
    chunk: usize,
    pause: Duration,
) -> std::thread::JoinHandle<WriteLog> {
    std::thread::spawn(move || {
        let mut log = WriteLog::new();
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let name = format!("{prefix}-{i:04}.bin");
            let data = random_bytes(7000 + i + size as u64, size);
            let result = (|| {
                use std::io::Write;
                let mut f =
                    std::fs::File::create(out.join(&name)).map_err(|e| format!("create: {e}"))?;
                for piece in data.chunks(chunk) {
                    f.write_all(piece).map_err(|e| format!("write: {e}"))?;
                    std::thread::sleep(pause);
                }
                close_checked(f).map_err(|e| format!("close: {e}"))
            })();
            log.push((name, data, result));
            i += 1;
        }
        log
    })
}

/// Files being written survive the engine: SIGKILL ten times under writers of large
/// (multipart) and small files, paced so kills land mid-file. Every file is committed
/// byte-exact and no write, flush or close fails.
pub fn writes_survive_kill9(takeover: Takeover) -> Result<()> {
    writes_survive(
        "kill -9 x10",
        "heal-writes-kill",
        10,
        takeover,
        |m, generation| {
            kill(heal_status(m)?.engine_pid, libc::SIGKILL)?;
            Ok(wait_generation(m, generation, Duration::from_secs(20))?.generation)
        },
    )
}

/// The same writers across three `berth upgrade`s: open files are carried to the new engine
/// (no drain), none fails.
pub fn writes_survive_upgrade() -> Result<()> {
    writes_survive(
        "upgrade x3",
        "heal-writes-upgrade",
        3,
        Takeover::Resend,
        |m, generation| {
            let stdout = upgrade(m.path(), &m.state_dir())?;
            eprintln!("heal: {}", stdout.trim());
            let now = heal_status(m)?.generation;
            ensure!(now > generation, "no new engine after the upgrade");
            Ok(now)
        },
    )
}

/// Paced writers of 12 MiB (multipart), 48 KiB and 100-byte files while `disrupt` replaces
/// the engine `rounds` times; every file must land byte-exact with no error.
fn writes_survive(
    what: &str,
    tag: &str,
    rounds: u64,
    takeover: Takeover,
    disrupt: impl Fn(&Mount, u64) -> Result<u64>,
) -> Result<()> {
    let (bucket, _) = setup(&format!("{tag}-{}", takeover.name()))?;
    let m = mount(
        &bucket,
        Detector::Fallback,
        takeover,
        &["--part-size", "5MiB"],
    )?;
    let stop = Arc::new(AtomicBool::new(false));
    let out = m.path().join("out");
    let writers = vec![
        // 12 MiB: three parts, about 1.5 s a file.
        paced_writer(
            out.clone(),
            stop.clone(),
            "large",
            12 * MIB,
            256 << 10,
            Duration::from_millis(30),
        ),
        paced_writer(
            out.clone(),
            stop.clone(),
            "small",
            48 << 10,
            16 << 10,
            Duration::from_millis(20),
        ),
        paced_writer(out, stop.clone(), "tiny", 100, 30, Duration::from_millis(5)),
    ];
    let mut generation = heal_status(&m)?.generation;
    std::thread::sleep(Duration::from_millis(800));
    let result = (|| {
        for k in 0..rounds {
            std::thread::sleep(Duration::from_millis(500 + 137 * (k % 4)));
            generation = disrupt(&m, generation)?;
        }
        Ok::<_, anyhow::Error>(())
    })();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let mut writes = WriteLog::new();
    for w in writers {
        writes.extend(w.join().map_err(|_| anyhow::anyhow!("a writer panicked"))?);
    }
    result?;
    let (ok, reported) = check_writes(&bucket, &writes)?;
    let large = writes
        .iter()
        .filter(|(n, _, r)| n.starts_with("large") && r.is_ok())
        .count();
    let spools = spool_files(&m.state_dir());
    eprintln!(
        "heal: writes under {what}: {ok} files committed byte-exact ({large} of 12 MiB), {reported} failed, generation {generation}, spool files left {spools}"
    );
    ensure!(
        reported == 0,
        "{reported} files failed to write across engine replacements"
    );
    ensure!(large >= 2, "only {large} large files were written");
    let replayed = takeover.check_log(&m)?;
    eprintln!(
        "heal: {} takeover: {replayed} requests served again from request slots",
        takeover.name()
    );
    m.finish()
}

/// SIGSTOP of the engine of `m` under load; waits until a successor serves. Fails if an
/// application saw an error; returns the status after and the longest stall.
fn stop_under_load(
    m: &Mount,
    bucket: &Bucket,
    big: Arc<Vec<u8>>,
    what: &str,
) -> Result<(Heal, Duration)> {
    let load = Load::start(m.path(), big)?;
    std::thread::sleep(Duration::from_millis(500));
    let before = heal_status(m)?;
    kill(before.engine_pid, libc::SIGSTOP)?;
    let after = wait_generation(m, before.generation, Duration::from_secs(30))?;
    std::thread::sleep(Duration::from_millis(500));
    let (ops, errors, max_stall, writes) = load.finish();
    let (ok, reported) = check_writes(bucket, &writes)?;
    eprintln!(
        "heal: {what}: replaced by generation {}, {ops} operations, {} errors, max stall {max_stall:?}, writes {ok} ok / {reported} reported",
        after.generation,
        errors.len()
    );
    ensure!(
        errors.is_empty(),
        "applications saw errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    ensure!(after.recoveries >= 1);
    Ok((after, max_stall))
}

/// A stopped engine (SIGSTOP) is detected by its stalled requests, killed and replaced.
/// The heartbeat is off here, so that the stall detectors themselves are tested.
pub fn hung_engine_replaced(detector: Detector) -> Result<()> {
    let (bucket, big) = setup(&format!("heal-hang-{}", detector.name()))?;
    let m = mount(
        &bucket,
        detector,
        Takeover::Resend,
        &["--hang-timeout", "2s", "--freeze-timeout", "0"],
    )?;
    let what = format!("{} SIGSTOP", detector.name());
    let (after, max_stall) = stop_under_load(&m, &bucket, big, &what)?;
    let want = match detector {
        Detector::Ebpf => "ebpf",
        Detector::Fallback => "fusectl",
    };
    ensure!(
        after.last_detected_by.as_deref() == Some(want),
        "the hang was detected by {:?}, want {want}",
        after.last_detected_by
    );
    ensure!(
        max_stall >= Duration::from_millis(1500),
        "a stopped engine should have stalled someone for about the hang timeout; max stall was {max_stall:?}"
    );
    m.finish()
}

/// With default flags (hang timeout 40 s) a stopped engine under load is found by its
/// missing heartbeat, killed and replaced, and nobody sees an error. How fast is measured by
/// `cargo xtask bench recovery`; here only which detector found it (the stall detectors need
/// 40 s).
///
/// `fusectl: false` runs the holder as on a node without fusectl (`BERTH_NO_FUSECTL=1`): the
/// heartbeat does not need it.
pub fn frozen_engine_replaced_by_heartbeat(detector: Detector, fusectl: bool) -> Result<()> {
    let tag = if fusectl { "" } else { "-no-fusectl" };
    let (bucket, big) = setup(&format!("heal-frozen-{}{tag}", detector.name()))?;
    let m = if fusectl {
        mount(&bucket, detector, Takeover::Resend, &[])?
    } else {
        Mount::s3(
            shared_server()?,
            &bucket.name,
            None,
            MountOpts {
                env: vec![("BERTH_NO_FUSECTL".into(), "1".into())],
                ..MountOpts::flags(&detector.flags())
            },
        )?
    };
    let what = format!("{} frozen engine", detector.name());
    let (after, _) = stop_under_load(&m, &bucket, big, &what)?;
    ensure!(
        after.last_detected_by.as_deref() == Some("heartbeat"),
        "the frozen engine was found by {:?}, not its heartbeat",
        after.last_detected_by
    );
    ensure!(
        fusectl || m.log().contains("fusectl not used"),
        "the holder did not say it runs without fusectl"
    );
    m.finish()
}

/// A store whose GETs take 20 s (a delaying proxy in front of SeaweedFS) is not a frozen or
/// hung engine: with default flags the read waits and succeeds, and no engine is replaced.
pub fn slow_store_is_never_a_hang() -> Result<()> {
    const DELAY: Duration = Duration::from_secs(20);
    let server = shared_server()?;
    let bucket = server.bucket("heal-slow-store")?;
    let data = random_bytes(0x510, 256 * 1024);
    bucket.put("slow.bin", data.clone())?;
    let proxy = crate::proxy::CountingProxy::delaying(&server.endpoint(), DELAY)?;
    let m = Mount::s3_endpoint(&proxy.endpoint(), &bucket.name, None, MountOpts::default())?;
    let before = heal_status(&m)?;
    let started = Instant::now();
    let read = read_file(m.join("slow.bin"))?;
    let took = started.elapsed();
    ensure_same_bytes("a read from the slow store", &read, &data)?;
    ensure!(
        took >= DELAY,
        "the read took {took:?}: it did not wait for the slow store (the test proves nothing)"
    );
    // The status is written every 2 s: let it catch up with anything the holder did.
    std::thread::sleep(Duration::from_millis(2500));
    let after = heal_status(&m)?;
    ensure!(
        after.generation == before.generation && after.recoveries == before.recoveries,
        "the engine was replaced while it waited {took:?} for the store (detected by {:?})",
        after.last_detected_by
    );
    m.finish()
}

/// A bucket and a mount whose first engine aborts after applying its first request of FUSE
/// `opcode`, before the reply (fault injection; the holder clears it for successors).
fn crashing_before_reply(tag: &str, opcode: u32, takeover: Takeover) -> Result<(Bucket, Mount)> {
    let server = shared_server()?;
    let bucket = server.bucket(&format!("{tag}-{}", takeover.name()))?;
    bucket.put("keep", b"x".to_vec())?;
    let mut env = takeover.env();
    env.push(("BERTH_FAULT_CRASH_BEFORE_REPLY".into(), opcode.to_string()));
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        MountOpts {
            env,
            ..MountOpts::flags(&["--no-ebpf"])
        },
    )?;
    Ok((bucket, m))
}

/// The engine applies a mkdir, journals its reply and dies before replying: the successor
/// gets the resent request and answers from the journal, so mkdir succeeds once instead of
/// failing with EEXIST.
pub fn resent_mkdir_is_not_applied_twice(takeover: Takeover) -> Result<()> {
    const FUSE_MKDIR: u32 = 9;
    let (bucket, m) = crashing_before_reply("heal-resend", FUSE_MKDIR, takeover)?;
    let result = std::fs::create_dir(m.path().join("made-once"));
    let status = wait_for_kind(&m, "takeover", Duration::from_secs(10))?;
    ensure!(
        result.is_ok(),
        "mkdir failed after the takeover: {result:?} (a resent mkdir was applied twice?)"
    );
    ensure!(
        bucket.exists("made-once/")?,
        "the directory marker is not in the store"
    );
    ensure!(
        status.recoveries == 1,
        "the engine should have died once: {status:?}"
    );
    ensure!(
        m.log().contains("replaying its journaled reply"),
        "no journal replay in the log"
    );
    takeover.check_log(&m)?;
    if let Takeover::Slots = takeover {
        ensure!(
            m.log()
                .contains("serving again a request the previous engine read"),
            "the mkdir was not served again from its request slot"
        );
    }
    m.finish()
}

/// As for mkdir, for symlink: applied once, answered from the journal after the takeover
/// (else the link would be made again and the caller get EEXIST).
pub fn resent_symlink_is_not_applied_twice(takeover: Takeover) -> Result<()> {
    const FUSE_SYMLINK: u32 = 6;
    let (bucket, m) = crashing_before_reply("heal-resend-link", FUSE_SYMLINK, takeover)?;
    let result = std::os::unix::fs::symlink("keep", m.join("link"));
    let status = wait_for_kind(&m, "takeover", Duration::from_secs(10))?;
    ensure!(
        result.is_ok(),
        "symlink failed after the takeover: {result:?} (a resent symlink was applied twice?)"
    );
    ensure!(
        status.recoveries == 1,
        "the engine should have died once: {status:?}"
    );
    ensure_same_bytes("the link object's body", &bucket.get("link")?, b"keep")?;
    ensure!(
        std::fs::read_link(m.join("link"))? == Path::new("keep"),
        "readlink after the takeover"
    );
    ensure!(
        m.log().contains("replaying its journaled reply"),
        "no journal replay in the log"
    );
    takeover.check_log(&m)?;
    m.finish()
}

/// The engine commits and releases a closed file, then dies before its reply to RELEASE: the
/// successor gets the RELEASE again (resent, or from the request slot) and finds the work
/// done. No error, the object whole, and no false "file NOT saved" in the log.
pub fn release_done_before_a_crash_is_not_redone(takeover: Takeover) -> Result<()> {
    const FUSE_RELEASE: u32 = 18;
    let (bucket, m) = crashing_before_reply("heal-release", FUSE_RELEASE, takeover)?;
    let data = random_bytes(0x7e1e, 300_000);
    std::fs::write(m.join("closed.bin"), &data)?;
    let status = wait_for_kind(&m, "takeover", Duration::from_secs(10))?;
    ensure!(
        status.recoveries == 1,
        "the engine should have died once, at the RELEASE: {status:?}"
    );
    ensure_same_bytes("closed.bin in the store", &bucket.get("closed.bin")?, &data)?;
    ensure_same_bytes(
        "closed.bin through the mount",
        &read_file(m.join("closed.bin"))?,
        &data,
    )?;
    std::fs::write(m.join("after.bin"), b"after the takeover")?;
    ensure_same_bytes(
        "a file written after the takeover",
        &bucket.get("after.bin")?,
        b"after the takeover",
    )?;
    ensure!(
        !m.log().contains("NOT saved"),
        "a RELEASE the dead engine had applied was reported as a lost file"
    );
    takeover.check_log(&m)?;
    m.finish()
}

/// `berth upgrade` under load: no error, and every write is committed.
pub fn upgrade_under_load(takeover: Takeover) -> Result<()> {
    let (bucket, big) = setup(&format!("heal-upgrade-{}", takeover.name()))?;
    let m = mount(&bucket, Detector::Fallback, takeover, &[])?;
    let load = Load::start(m.path(), big)?;
    for round in 1..=3u64 {
        std::thread::sleep(Duration::from_millis(500));
        let stdout = upgrade(m.path(), &m.state_dir())?;
        eprintln!("heal: {}", stdout.trim());
        ensure!(heal_status(&m)?.generation == round + 1);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (ops, errors, max_stall, writes) = load.finish();
    let (ok, reported) = check_writes(&bucket, &writes)?;
    eprintln!(
        "heal: upgrade x3: {ops} operations, {} errors, max stall {max_stall:?}, writes {ok} ok / {reported} reported",
        errors.len()
    );
    ensure!(
        errors.is_empty(),
        "applications saw errors: {:?}",
        &errors[..errors.len().min(5)]
    );
    ensure!(
        reported == 0,
        "an upgrade must not fail writes ({reported} did)"
    );
    takeover.check_log(&m)?;
    m.finish()
}

/// `berth upgrade` of the mount (or share) at `target` to this same binary; its stdout.
pub(super) fn upgrade(target: &Path, state_dir: &Path) -> Result<String> {
    let out = Command::new(BERTH)
        .arg("upgrade")
        .arg(target)
        .arg("--binary")
        .arg(BERTH)
        .arg("--state-dir")
        .arg(state_dir)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "berth upgrade failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(stdout)
}

/// Runs a shell command, failing with its output.
fn sh(cmd: &str) -> Result<()> {
    let out = Command::new("sh").arg("-c").arg(cmd).output()?;
    ensure!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A reader in another mount namespace (slave propagation, like a pod with HostToContainer)
/// that opens a file by path every 50 ms and logs ok/err.
fn namespaced_reader(file: &Path, log: &Path) -> Result<Child> {
    let script = format!(
        "while :; do if cat '{}' >/dev/null 2>&1; then echo ok; else echo err; fi; sleep 0.05; done",
        file.display()
    );
    Ok(Command::new("unshare")
        .args(["-m", "--propagation", "slave", "sh", "-c", &script])
        .stdout(std::fs::File::create(log)?)
        .stderr(Stdio::null())
        .spawn()?)
}

fn wait_for_line(log: &Path, after_lines: usize, want: &str, timeout: Duration) -> Result<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(i) = text.lines().skip(after_lines).position(|l| l == want) {
            return Ok(after_lines + i + 1);
        }
        if Instant::now() > deadline {
            bail!(
                "no {want:?} in {} after line {after_lines} within {timeout:?}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The holder is killed (so the connection is gone): a new `berth mount` on the same
/// mountpoint detaches the dead mount, mounts afresh and re-binds every bind target; a reader
/// in another mount namespace that uses paths works again without a restart.
pub fn holder_killed_remount_rebinds() -> Result<()> {
    with_shared_root(|data, root| {
        let (mnt, target, log) = (
            root.join("mnt"),
            root.join("target"),
            root.join("reader.log"),
        );
        let first = Mount::local(data, at(&mnt))?;
        bind(&mnt, &target)?;
        // A read-only publish, as a pod's `readOnly: true` volume.
        let read_only = root.join("target-ro");
        std::fs::create_dir_all(&read_only)?;
        bind(&mnt, &read_only)?;
        sh(&format!(
            "mount -o remount,bind,ro '{}'",
            read_only.display()
        ))?;
        let mut reader = namespaced_reader(&target.join("f.txt"), &log)?;
        let outcome = (|| -> Result<()> {
            expect_read_only(&read_only).context("before the crash")?;
            let seen = wait_for_line(&log, 0, "ok", Duration::from_secs(10))?;
            first.crash()?;
            let broken = wait_for_line(&log, seen, "err", Duration::from_secs(10))?;
            let healing = Instant::now();
            let second = Mount::local(data, at(&mnt))?;
            wait_for_line(&log, broken, "ok", Duration::from_secs(10))?;
            eprintln!(
                "heal: holder killed; a reader in another mount namespace saw errors, then ok again {:?} after the new mount started",
                healing.elapsed()
            );
            expect_remounted(&second, &target)?;
            expect_read_only(&read_only).context("after the remount")?;
            // The bind keeps the connection alive: remove it before unmounting.
            // A reader busy in the other namespace would make the propagated umount fail.
            stop(&mut reader);
            umount_retrying(&target)?;
            umount_retrying(&read_only)?;
            second.finish()
        })();
        stop(&mut reader);
        outcome
    })
}

/// The connection is aborted (fusectl) while the holder lives: the holder itself remounts and
/// re-binds; the namespaced reader recovers by path.
pub fn aborted_connection_remounts() -> Result<()> {
    with_shared_root(|data, root| {
        let (mnt, target, log) = (
            root.join("mnt"),
            root.join("target"),
            root.join("reader.log"),
        );
        let m = Mount::local(data, at(&mnt))?;
        bind(&mnt, &target)?;
        let mut reader = namespaced_reader(&target.join("f.txt"), &log)?;
        let outcome = (|| -> Result<()> {
            let seen = wait_for_line(&log, 0, "ok", Duration::from_secs(10))?;
            let conn = connection_of(&mnt)?;
            let aborted = Instant::now();
            std::fs::write(format!("/sys/fs/fuse/connections/{conn}/abort"), "1")
                .context("aborting through fusectl")?;
            wait_for_line(&log, seen, "ok", Duration::from_secs(10))?;
            let status = wait_for_kind(&m, "remount", Duration::from_secs(10))?;
            eprintln!(
                "heal: connection aborted; remounted and re-bound, reader ok again within {:?} (recoveries {})",
                aborted.elapsed(),
                status.recoveries
            );
            expect_remounted(&m, &target)?;
            // A reader busy in the other namespace would make the propagated umount fail.
            stop(&mut reader);
            umount_retrying(&target)?;
            m.finish()
        })();
        stop(&mut reader);
        outcome
    })
}

/// umount, retried while a process that is going away still holds the mount busy.
fn umount_retrying(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match sh(&format!("umount '{}'", path.display())) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn stop(reader: &mut Child) {
    let _ = reader.kill();
    let _ = reader.wait();
}

fn at(mnt: &Path) -> MountOpts {
    MountOpts {
        at: Some(mnt.to_path_buf()),
        ..MountOpts::flags(&["--no-ebpf"])
    }
}

fn bind(from: &Path, to: &Path) -> Result<()> {
    sh(&format!(
        "mount --bind '{}' '{}'",
        from.display(),
        to.display()
    ))
}

/// The fusectl id of the mount at `mnt` (minor of its device, from mountinfo).
fn connection_of(mnt: &Path) -> Result<u32> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let line = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(&*mnt.to_string_lossy()))
        .context("mount not in mountinfo")?;
    let dev = line.split(' ').nth(2).context("odd mountinfo")?;
    Ok(dev.split(':').nth(1).context("odd device")?.parse()?)
}

pub(super) fn wait_for_kind(m: &Mount, kind: &str, timeout: Duration) -> Result<Heal> {
    let deadline = Instant::now() + timeout;
    loop {
        let status = heal_status(m)?;
        if status.last_recovery_kind.as_deref() == Some(kind) {
            return Ok(status);
        }
        if Instant::now() > deadline {
            bail!("status never said last_recovery_kind = {kind}: {status:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn expect_remounted(m: &Mount, target: &Path) -> Result<()> {
    ensure!(
        std::fs::read(target.join("f.txt"))? == b"still here",
        "the bind target does not show the new mount"
    );
    let status = wait_for_kind(m, "remount", Duration::from_secs(5))?;
    ensure!(status.recoveries >= 1, "{status:?}");
    Ok(())
}

/// A read-only bind target shows the volume and refuses writes (EROFS). Regression: the
/// last-resort remount used to bind the new mount read-write over read-only targets.
fn expect_read_only(target: &Path) -> Result<()> {
    ensure!(
        std::fs::read(target.join("f.txt"))? == b"still here",
        "{} does not show the mount",
        target.display()
    );
    expect_errno(
        "creating a file through a read-only bind",
        std::fs::write(target.join("written.txt"), b"x"),
        libc::EROFS,
    )
}

/// Runs `scenario(data dir, root)` where root is a shared mount (like the kubelet's pods
/// directory) holding `mnt` and `target`; cleans up every mount under root afterwards.
fn with_shared_root(scenario: impl FnOnce(&Path, &Path) -> Result<()>) -> Result<()> {
    let data = tempfile::tempdir()?;
    std::fs::write(data.path().join("f.txt"), b"still here")?;
    let root = tempfile::Builder::new()
        .prefix("berth-e2e-heal-")
        .tempdir()?;
    let root_path = root.path().canonicalize()?;
    sh(&format!(
        "mount --bind '{0}' '{0}' && mount --make-rshared '{0}'",
        root_path.display()
    ))?;
    std::fs::create_dir_all(root_path.join("mnt"))?;
    std::fs::create_dir_all(root_path.join("target"))?;
    let result = scenario(data.path(), &root_path);
    let _ = sh(&format!("umount -R -l '{}'", root_path.display()));
    result
}

/// Two mountpoints whose names differ only in punctuation (`a-b`, `a_b`) are served by one
/// holder: each keeps an inode journal of its own, so after the engine is killed the
/// successor answers each mount's open files from the right journal. (The state directory
/// used to be the path with every non-alphanumeric character made `_`: both mounts wrote
/// one journal, and a successor served the wrong file or none.) The state is root's only.
pub fn lookalike_mountpoints_keep_their_own_journals() -> Result<()> {
    use std::io::{Read, Seek};
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::Builder::new()
        .prefix("berth-e2e-lookalike-")
        .tempdir()?;
    let result = (|| {
        let root = tmp.path().canonicalize()?;
        let (src_a, src_b) = (root.join("src-a"), root.join("src-b"));
        let (mnt_a, mnt_b) = (root.join("a-b"), root.join("a_b"));
        for d in [&src_a, &src_b, &mnt_a, &mnt_b] {
            std::fs::create_dir_all(d)?;
        }
        // Different names, so that a mixed-up journal cannot resolve to the same key.
        std::fs::write(src_a.join("only-in-a"), b"data of a")?;
        std::fs::write(src_b.join("only-in-b"), b"data of b")?;
        let also = [
            "--also".to_string(),
            src_b.display().to_string(),
            mnt_b.display().to_string(),
            "--no-ebpf".to_string(),
        ];
        let m = Mount::local(
            &src_a,
            MountOpts {
                at: Some(mnt_a.clone()),
                extra: also.to_vec(),
                ..MountOpts::default()
            },
        )?;
        let mut fa = std::fs::File::open(mnt_a.join("only-in-a"))?;
        let mut fb = std::fs::File::open(mnt_b.join("only-in-b"))?;
        let state = m.state_dir();
        let mode =
            |p: &Path| -> Result<u32> { Ok(std::fs::metadata(p)?.permissions().mode() & 0o777) };
        ensure!(mode(&state)? == 0o700, "state dir is {:o}", mode(&state)?);
        let dirs: Vec<PathBuf> = std::fs::read_dir(state.join("mounts"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()?;
        ensure!(dirs.len() == 2, "one state dir per mount, got {dirs:?}");
        for d in &dirs {
            ensure!(mode(d)? == 0o700, "{} is {:o}", d.display(), mode(d)?);
            ensure!(
                mode(&d.join("inodes"))? == 0o600,
                "{} journal is {:o}",
                d.display(),
                mode(&d.join("inodes"))?
            );
        }
        let before = heal_status(&m)?;
        kill(before.engine_pid, libc::SIGKILL)?;
        wait_generation(&m, before.generation, Duration::from_secs(20))?;
        for (file, want) in [(&mut fa, &b"data of a"[..]), (&mut fb, &b"data of b"[..])] {
            file.rewind()?;
            let mut got = Vec::new();
            file.read_to_end(&mut got)
                .context("reading an open file after the takeover")?;
            ensure!(
                got == want,
                "after the takeover an open file read {:?}, want {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(want)
            );
        }
        // Paths the kernel cached keep naming their own files too.
        ensure!(std::fs::read(mnt_b.join("only-in-b"))? == b"data of b");
        drop((fa, fb));
        // The holder exits once both of its mounts are gone.
        crate::mount::unmount(&mnt_b)?;
        m.finish()
    })();
    berth::sys::mounts::unmount_below(tmp.path());
    result
}
