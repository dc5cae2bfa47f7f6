//! `cargo xtask bench recovery`: what applications see when the engine dies or is upgraded.
//!
//! A local directory store is mounted (the store plays no part in recovery), and threads read
//! random 64 KiB ranges through open fds, list a directory and write new files while the
//! engine is killed with SIGKILL `--kills` times (default 20), once with the eBPF detector and
//! once with `--no-ebpf`; then it is frozen with SIGSTOP 5 times (default flags: the holder
//! finds it by its missing heartbeat within `--freeze-timeout`, 750 ms, and replaces it); then
//! the engine is upgraded 5 times. The kill -9 and upgrade runs are repeated with the takeover
//! path of kernels without FUSE_NOTIFY_RESEND (request slots) forced. Printed per run: operations,
//! application errors, the stall each kill caused (longest operation that ended within 2 s
//! after it; p50/p99/max), detection latency (kill to the holder noticing, both on
//! CLOCK_MONOTONIC) and the holder's kill-to-serving time.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::cache::{wait_ready, write_data};
use crate::berth;
use crate::sh::repo_root;

const DATA_MIB: u64 = 64;
const UPGRADES: usize = 5;
const FREEZES: usize = 5;
const BETWEEN: Duration = Duration::from_millis(400);
/// The engine's switch to the takeover path of kernels before 6.9 (daemon/src/engine.rs).
const NO_RESEND_ENV: &str = "BERTH_TAKEOVER_NO_RESEND";

/// One operation the load made: when it started and ended (monotonic ns), and whether it failed.
#[derive(Clone, Copy)]
struct Op {
    start: u64,
    end: u64,
    failed: bool,
    write: bool,
}

struct Row {
    label: String,
    ops: usize,
    errors: usize,
    writes_failed: usize,
    stalls_ms: Vec<f64>,
    detect_ms: Vec<f64>,
    serving_ms: Vec<f64>,
}

pub fn run(args: &[String]) -> Result<()> {
    let kills = parse_kills(args)?;
    if args.iter().any(|a| a == "--virtiofs") {
        return super::vmrecovery::run(kills);
    }
    let berth = berth::binary()?;
    let work = repo_root().join("target").join("bench-recovery");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("src").join("listed"))?;
    std::fs::create_dir_all(work.join("src").join("out"))?;
    write_data(&work.join("src").join("data.bin"), DATA_MIB << 20)?;
    // An empty directory is no prefix in an object store: give `out` a key.
    std::fs::write(work.join("src").join("out").join("keep"), b"")?;
    for i in 0..100 {
        std::fs::write(
            work.join("src").join("listed").join(format!("f{i:03}")),
            b"x",
        )?;
    }
    let data = Arc::new(std::fs::read(work.join("src").join("data.bin"))?);
    let mut rows = Vec::new();
    // The kernel path without FUSE_NOTIFY_RESEND (before 6.9), forced on this kernel.
    let no_resend = [(NO_RESEND_ENV, "1")];
    for (label, flags, env) in [
        ("kill -9, eBPF", vec![], &[][..]),
        ("kill -9, --no-ebpf", vec!["--no-ebpf"], &[][..]),
        (
            "kill -9, --no-ebpf, no RESEND",
            vec!["--no-ebpf"],
            &no_resend[..],
        ),
    ] {
        let mut mount = BenchMount::start(&berth, &work, &flags, env)?;
        let detector = mount.status()?["detector"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        if flags.is_empty() && detector != "ebpf" {
            eprintln!("bench: eBPF detector unavailable here (status says {detector:?}); see the holder log; skipping that row");
            mount.stop()?;
            continue;
        }
        let row = kill_run(&mut mount, label, kills, &data, libc::SIGKILL);
        mount.stop()?;
        rows.push(row?);
    }
    let mut mount = BenchMount::start(&berth, &work, &["--no-ebpf"], &[])?;
    let row = kill_run(
        &mut mount,
        "SIGSTOP (frozen)",
        FREEZES,
        &data,
        libc::SIGSTOP,
    );
    mount.stop()?;
    rows.push(row?);
    for (label, env) in [("upgrade", &[][..]), ("upgrade, no RESEND", &no_resend[..])] {
        let mut mount = BenchMount::start(&berth, &work, &["--no-ebpf"], env)?;
        let row = upgrade_run(&mut mount, label, &data);
        mount.stop()?;
        rows.push(row?);
    }
    let _ = std::fs::remove_dir_all(&work);
    print_table(&rows, kills);
    Ok(())
}

fn parse_kills(args: &[String]) -> Result<usize> {
    match args.iter().position(|a| a == "--kills") {
        Some(i) => args
            .get(i + 1)
            .context("--kills needs a number")?
            .parse()
            .context("--kills needs a number"),
        None => Ok(20),
    }
}

/// `kills` times `signal` (SIGKILL, or SIGSTOP for a frozen engine) to the engine under load.
fn kill_run(
    mount: &mut BenchMount,
    label: &str,
    kills: usize,
    data: &Arc<Vec<u8>>,
    signal: i32,
) -> Result<Row> {
    eprintln!("bench: {label}: {kills} times under load");
    let load = Load::start(&mount.mnt, data.clone())?;
    let (mut kill_times, mut detect_ms, mut serving_ms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..kills {
        std::thread::sleep(BETWEEN);
        let before = mount.status()?;
        let generation = before["engine_generation"].as_u64().unwrap_or(0);
        let engine = before["engine_pid"].as_u64().context("engine_pid")? as i32;
        let killed = monotonic_ns();
        // SAFETY: kill(2) of the engine the holder started for us.
        unsafe { libc::kill(engine, signal) };
        kill_times.push(killed);
        let after = mount.wait_generation(generation)?;
        if let Some(seen) = after["last_detection_mono_ns"].as_u64() {
            detect_ms.push(seen.saturating_sub(killed) as f64 / 1e6);
        }
        if let Some(ms) = after["last_recovery_ms"].as_f64() {
            serving_ms.push(ms);
        }
    }
    std::thread::sleep(BETWEEN);
    let ops = load.finish();
    Ok(Row {
        label: label.to_string(),
        ops: ops.len(),
        errors: ops.iter().filter(|o| o.failed && !o.write).count(),
        writes_failed: ops.iter().filter(|o| o.failed && o.write).count(),
        stalls_ms: stalls(&ops, &kill_times),
        detect_ms,
        serving_ms,
    })
}

fn upgrade_run(mount: &mut BenchMount, label: &str, data: &Arc<Vec<u8>>) -> Result<Row> {
    eprintln!("bench: {UPGRADES} upgrades under load");
    let load = Load::start(&mount.mnt, data.clone())?;
    let mut times = Vec::new();
    let mut reported = Vec::new();
    for _ in 0..UPGRADES {
        std::thread::sleep(BETWEEN);
        times.push(monotonic_ns());
        let out = Command::new(&mount.berth)
            .arg("upgrade")
            .arg(&mount.mnt)
            .arg("--state-dir")
            .arg(&mount.state)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if !out.status.success() {
            bail!(
                "berth upgrade failed: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if let Some(ms) = text
            .split("stalled ")
            .nth(1)
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
        {
            reported.push(ms);
        }
    }
    std::thread::sleep(BETWEEN);
    let ops = load.finish();
    Ok(Row {
        label: format!("berth {label}"),
        ops: ops.len(),
        errors: ops.iter().filter(|o| o.failed && !o.write).count(),
        writes_failed: ops.iter().filter(|o| o.failed && o.write).count(),
        stalls_ms: stalls(&ops, &times),
        detect_ms: Vec::new(),
        serving_ms: reported,
    })
}

/// For each event, the longest operation in flight at it or started after it, before the
/// next event (at most 2 s later).
fn stalls(ops: &[Op], events: &[u64]) -> Vec<f64> {
    events
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let until = events
                .get(i + 1)
                .copied()
                .unwrap_or(u64::MAX)
                .min(t + 2_000_000_000);
            ops.iter()
                .filter(|o| o.end >= t && o.start <= until)
                .map(|o| (o.end - o.start) as f64 / 1e6)
                .fold(0.0, f64::max)
        })
        .collect()
}

fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let idx = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[idx.min(v.len() - 1)]
}

fn print_table(rows: &[Row], kills: usize) {
    println!();
    println!("recovery bench: {kills} kills per detector, {FREEZES} freezes (SIGSTOP; detect = stop to the heartbeat verdict, goal < 1 s), {UPGRADES} upgrades; local store, {DATA_MIB} MiB file; 2 readers + lister + writer");
    println!(
        "{:<20} {:>7} {:>7} {:>9} {:>22} {:>18} {:>18}",
        "run",
        "ops",
        "errors",
        "w.failed",
        "stall ms p50/p99/max",
        "detect ms p50/max",
        "serving ms p50/max"
    );
    for r in rows {
        let triple = |v: &[f64]| {
            format!(
                "{:.1}/{:.1}/{:.1}",
                percentile(v, 50.0),
                percentile(v, 99.0),
                percentile(v, 100.0)
            )
        };
        let pair = |v: &[f64]| {
            if v.is_empty() {
                "-".to_string()
            } else {
                format!("{:.2}/{:.2}", percentile(v, 50.0), percentile(v, 100.0))
            }
        };
        println!(
            "{:<20} {:>7} {:>7} {:>9} {:>22} {:>18} {:>18}",
            r.label,
            r.ops,
            r.errors,
            r.writes_failed,
            triple(&r.stalls_ms),
            pair(&r.detect_ms),
            pair(&r.serving_ms)
        );
    }
    println!("(errors: failed reads and listings; w.failed: new files whose write or close failed cleanly with EIO because their engine died mid-file)");
    println!("(stall: longest application operation around each kill/upgrade; detect: kill to the holder noticing; serving: holder's detection-to-successor-serving, or the stall `berth upgrade` reports)");
}

struct BenchMount {
    berth: PathBuf,
    mnt: PathBuf,
    state: PathBuf,
    child: Child,
}

impl BenchMount {
    fn start(
        berth: &Path,
        work: &Path,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Result<BenchMount> {
        let mnt = work.join("mnt");
        let state = work.join("state");
        std::fs::create_dir_all(&mnt)?;
        let mut child = Command::new(berth)
            .arg("mount")
            .arg(work.join("src"))
            .arg(&mnt)
            .arg("--state-dir")
            .arg(&state)
            .args(flags)
            .envs(env.iter().copied())
            .env("RUST_LOG", "berth=warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting berth")?;
        wait_ready(&mut child)?;
        Ok(BenchMount {
            berth: berth.to_owned(),
            mnt,
            state,
            child,
        })
    }

    fn status(&self) -> Result<serde_json::Value> {
        let dir = self.state.join("mounts");
        let entry = std::fs::read_dir(&dir)?
            .next()
            .context("no mount state")??;
        let text = std::fs::read_to_string(entry.path().join("status.json"))?;
        Ok(serde_json::from_str(&text)?)
    }

    fn wait_generation(&self, after: u64) -> Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(s) = self.status() {
                if s["engine_generation"].as_u64().unwrap_or(0) > after {
                    return Ok(s);
                }
            }
            if Instant::now() > deadline {
                bail!("the engine was not replaced within 30 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stop(mut self) -> Result<()> {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
                let _ = self.child.wait();
                bail!("berth did not exit after umount");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

/// Readers on open fds, a lister and a writer, recording every operation.
struct Load {
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<Op>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(mnt: &Path, data: Arc<Vec<u8>>) -> Result<Load> {
        let mut load = Load {
            stop: Arc::new(AtomicBool::new(false)),
            ops: Arc::new(Mutex::new(Vec::new())),
            threads: Vec::new(),
        };
        for seed in 1..=2u64 {
            let file = std::fs::File::open(mnt.join("data.bin"))?;
            let data = data.clone();
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            load.spawn(false, move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let off = (x % (data.len() as u64 - 65536)) as usize;
                let mut buf = vec![0u8; 65536];
                file.read_exact_at(&mut buf, off as u64).is_ok()
                    && buf[..] == data[off..off + 65536]
            });
        }
        let listed = mnt.join("listed");
        load.spawn(false, move || {
            std::fs::read_dir(&listed)
                .map(|d| d.count() == 100)
                .unwrap_or(false)
        });
        let out = mnt.join("out");
        let mut i = 0u64;
        load.spawn(true, move || {
            i += 1;
            std::fs::write(out.join(format!("w{i}")), vec![7u8; 128 << 10]).is_ok()
        });
        Ok(load)
    }

    fn spawn(&mut self, write: bool, mut op: impl FnMut() -> bool + Send + 'static) {
        let (stop, ops) = (self.stop.clone(), self.ops.clone());
        self.threads.push(std::thread::spawn(move || {
            let mut mine = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = monotonic_ns();
                let ok = op();
                mine.push(Op {
                    start,
                    end: monotonic_ns(),
                    failed: !ok,
                    write,
                });
            }
            ops.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
        }));
    }

    fn finish(self) -> Vec<Op> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let ops = self.ops.lock().unwrap_or_else(|e| e.into_inner());
        ops.clone()
    }
}

fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data filled by clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_is_the_longest_op_around_an_event() {
        let ms = 1_000_000;
        let ops = [
            Op {
                start: 0,
                end: ms,
                failed: false,
                write: false,
            },
            Op {
                start: 5 * ms,
                end: 45 * ms,
                failed: false,
                write: false,
            },
            Op {
                start: 46 * ms,
                end: 47 * ms,
                failed: false,
                write: false,
            },
            Op {
                start: 9000 * ms,
                end: 9500 * ms,
                failed: false,
                write: false,
            },
        ];
        let s = stalls(&ops, &[10 * ms]);
        assert_eq!(s, vec![40.0]);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 100.0], 50.0), 3.0);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 100.0], 100.0), 100.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
