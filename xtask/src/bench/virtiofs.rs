//! `cargo xtask bench virtiofs`: the same file read in a QEMU guest through berth's virtio-fs
//! door and through virtiofsd 1.14 exporting a local copy, with the guest page cache out of
//! the way (virtiofsd `--cache=never`, reads with O_DIRECT), 1 MiB sequential and 4 KiB
//! random. Prints MiB/s, IOPS and the ratios berth / virtiofsd.
//!
//! berth runs three times: over a local directory store holding the same file (the door's own
//! cost), over SeaweedFS on loopback (the S3 path, first read of every block) and over
//! SeaweedFS with a node block cache that earlier rounds filled (the S3 path once warm).
//! The guest runs under TCG, so absolute numbers are low; the ratios are the result. Each
//! backend is measured in several guest boots, alternating with the others, and its median
//! round is reported. berth comes from the test build (see berth.rs); `BERTH_BIN=/path/to/berth`
//! runs that binary instead of building one (to compare two builds on the same host state).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::berth;
use crate::seaweed::Seaweed;
use crate::setup::{ensure_apt, weed_bin};
use crate::sh::{cargo, is_listening, pattern, repo_root, run_cmd, tempdir, Reaped};
use crate::vm::guest::{self, GuestFile};

const VIRTIOFSD_VERSION: &str = "1.14.0";
const BUCKET: &str = "bench";
const TAG: &str = "bench";
const DEADLINE: Duration = Duration::from_secs(600);
const RANDOM_OPS: u32 = 6000;
/// Guest boots per backend. The rounds alternate between the backends, so that load from
/// other processes on a shared host falls on all of them alike; each backend's result is
/// its median round.
const ROUNDS: usize = 3;

#[derive(Debug, Clone, Copy, Default)]
struct Result2 {
    seq_mibps: f64,
    rand_iops: f64,
}

pub fn run(size_mib: u64) -> Result<()> {
    let missing = guest::missing();
    if !missing.is_empty() {
        bail!("bench virtiofs needs: {}", missing.join("; "));
    }
    if !weed_bin().is_file() {
        bail!(
            "bench virtiofs needs {} (`cargo xtask setup`)",
            weed_bin().display()
        );
    }
    let virtiofsd = ensure_virtiofsd()?;
    let bin = berth::binary()?;
    if std::env::var_os(berth::BIN_ENV).is_some() {
        println!("bench virtiofs: berth is {}", bin.display());
    }
    let work = tempdir("berth-bench-virtiofs")?;
    let tool = build_reader(&work.0)?;
    let export = work.0.join("export");
    std::fs::create_dir_all(&export)?;
    let data = pattern((size_mib << 20) as usize);
    std::fs::write(export.join("data.bin"), &data)?;
    let s3 = Seaweed::open(&weed_bin(), &work.0)?;
    s3.put(BUCKET, "data.bin", &data)?;
    drop(data);

    let export_text = export.to_string_lossy().into_owned();
    let endpoint = s3.endpoint.clone();
    let source = format!("s3://{BUCKET}");
    let s3_args = [
        source.as_str(),
        "--read-only",
        "--endpoint-url",
        &endpoint,
        "--region",
        "us-east-1",
    ];
    let cache_dir = work.0.join("cache").to_string_lossy().into_owned();
    let mut s3_cached_args = s3_args.to_vec();
    s3_cached_args.extend(["--cache-dir", &cache_dir]);
    let names = [
        "virtiofsd",
        "berth (local dir)",
        "berth (S3)",
        "berth (S3, node cache)",
    ];
    let mut rounds: [Vec<Result2>; 4] = Default::default();
    for round in 1..=ROUNDS {
        let this = [
            measure(&work.0, &tool, size_mib, || {
                start_virtiofsd(&virtiofsd, &work.0, &export)
            })?,
            measure(&work.0, &tool, size_mib, || {
                share(&bin, &work.0, &s3, &[&export_text, "--read-only"])
            })?,
            measure(&work.0, &tool, size_mib, || {
                share(&bin, &work.0, &s3, &s3_args)
            })?,
            // The cache directory outlives each share: the first round fills it, later
            // rounds read it (disk tier; the memory tier starts empty with each process).
            measure(&work.0, &tool, size_mib, || {
                share(&bin, &work.0, &s3, &s3_cached_args)
            })?,
        ];
        for (all, r) in rounds.iter_mut().zip(this) {
            all.push(r);
        }
        let row = |f: fn(&Result2) -> f64| {
            this.iter()
                .map(|r| format!("{:.0}", f(r)))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "bench virtiofs: round {round}/{ROUNDS}: seq MiB/s {}, rand IOPS {} ({})",
            row(|r| r.seq_mibps),
            row(|r| r.rand_iops),
            names.join(" / ")
        );
    }
    let [reference, local, s3_row, s3_cached] = rounds.map(|all| median(&all));
    report(
        size_mib,
        reference,
        &[(names[1], local), (names[2], s3_row), (names[3], s3_cached)],
    );
    Ok(())
}

/// Median of each figure on its own (rounds are few and noisy; a mean would follow outliers).
fn median(rounds: &[Result2]) -> Result2 {
    let pick = |f: fn(&Result2) -> f64| {
        let mut v: Vec<f64> = rounds.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or_default()
    };
    Result2 {
        seq_mibps: pick(|r| r.seq_mibps),
        rand_iops: pick(|r| r.rand_iops),
    }
}

fn share(bin: &Path, work: &Path, s3: &Seaweed, args: &[&str]) -> Result<Reaped> {
    let socket = work.join("vfs.sock");
    let socket = socket.to_string_lossy().into_owned();
    let mut all = args.to_vec();
    all.extend(["--socket", &socket]);
    berth::share(bin, work, s3, &all)
}

/// Boots one guest against the backend `start` gives and parses the reader's lines.
fn measure(
    work: &Path,
    tool: &GuestFile,
    size_mib: u64,
    start: impl FnOnce() -> Result<Reaped>,
) -> Result<Result2> {
    let backend = start()?;
    let body = format!(
        "mount -t virtiofs $TAG /mnt || echo 'bench: mount failed'\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         vfsread seq /mnt/data.bin 1048576 0\n\
         echo 3 > /proc/sys/vm/drop_caches\n\
         vfsread rand /mnt/data.bin 4096 {RANDOM_OPS}\n\
         umount /mnt"
    );
    let device = guest::Device {
        socket: &work.join("vfs.sock"),
        tag: TAG,
        queues: 1,
        reconnect: 0,
    };
    let files = [GuestFile {
        name: tool.name.clone(),
        data: tool.data.clone(),
    }];
    let lines = guest::boot_watching(work, &device, &body, &files, DEADLINE, &mut |_| {})?;
    drop(backend);
    let field = |mode: &str, key: &str| -> Result<f64> {
        lines
            .iter()
            .find(|l| l.starts_with(&format!("vfsread {mode} ")))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{key}=")))
                    .and_then(|v| v.parse().ok())
            })
            .with_context(|| format!("no `vfsread {mode}` result from the guest ({size_mib} MiB)"))
    };
    Ok(Result2 {
        seq_mibps: field("seq", "mibps")?,
        rand_iops: field("rand", "iops")?,
    })
}

fn report(size_mib: u64, reference: Result2, rows: &[(&str, Result2)]) {
    println!();
    println!(
        "bench virtiofs: {size_mib} MiB file, guest under TCG, O_DIRECT reads, virtiofsd {VIRTIOFSD_VERSION} --cache=never, median of {ROUNDS} rounds"
    );
    println!(
        "{:<24} {:>14} {:>16}",
        "backend", "seq 1M MiB/s", "rand 4K IOPS"
    );
    println!(
        "{:<24} {:>14.1} {:>16.0}",
        "virtiofsd", reference.seq_mibps, reference.rand_iops
    );
    for (name, r) in rows {
        println!("{:<24} {:>14.1} {:>16.0}", name, r.seq_mibps, r.rand_iops);
    }
    println!();
    for (name, r) in rows {
        println!(
            "ratio {name} / virtiofsd: seq 1M {:.2}x, rand 4K {:.2}x",
            r.seq_mibps / reference.seq_mibps.max(1e-9),
            r.rand_iops / reference.rand_iops.max(1e-9)
        );
    }
}

fn virtiofsd_bin() -> PathBuf {
    repo_root()
        .join(".tools")
        .join("virtiofsd")
        .join("bin")
        .join("virtiofsd")
}

/// virtiofsd from crates.io into .tools/virtiofsd (a few minutes the first time).
fn ensure_virtiofsd() -> Result<PathBuf> {
    let bin = virtiofsd_bin();
    let ok = Command::new(&bin)
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(VIRTIOFSD_VERSION));
    if !ok {
        // virtiofsd links against libseccomp and libcap-ng.
        ensure_apt(&["libseccomp-dev", "libcap-ng-dev"]).context("building virtiofsd")?;
        let root = repo_root().join(".tools").join("virtiofsd");
        run_cmd(
            Command::new(cargo())
                .args(["install", "--locked", "--root"])
                .arg(&root)
                .arg(format!("virtiofsd@{VIRTIOFSD_VERSION}")),
        )?;
    }
    Ok(bin)
}

fn start_virtiofsd(bin: &Path, work: &Path, export: &Path) -> Result<Reaped> {
    let socket = work.join("vfs.sock");
    let _ = std::fs::remove_file(&socket);
    let log = std::fs::File::create(work.join("virtiofsd.log"))?;
    let child = Command::new(bin)
        .arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", export.display()))
        .args(["--cache=never", "--sandbox=none"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let guard = Reaped(Some(child));
    let started = Instant::now();
    while !is_listening(&socket) {
        if started.elapsed() > Duration::from_secs(10) {
            bail!(
                "virtiofsd did not listen on {} within 10 s",
                socket.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(guard)
}

/// Builds the guest reader as a static binary with the host's rustc (glibc, crt-static).
fn build_reader(work: &Path) -> Result<GuestFile> {
    let src = repo_root()
        .join("xtask")
        .join("guest-tools")
        .join("vfsread.rs");
    let out = work.join("vfsread");
    run_cmd(
        Command::new("rustc")
            .args([
                "--edition",
                "2021",
                "-O",
                "-C",
                "target-feature=+crt-static",
            ])
            .arg("-o")
            .arg(&out)
            .arg(&src),
    )?;
    Ok(GuestFile {
        name: "vfsread".into(),
        data: std::fs::read(&out)?,
    })
}
