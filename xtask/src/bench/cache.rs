//! `cargo xtask bench cache`: warm reads through a berth mount against fio on the cache device.
//!
//! Everything is measured in one run on one machine, so the output is ratios:
//! - warm sequential 1 MiB and random 4 KiB reads (fio, O_DIRECT, psync) through the FUSE mount
//!   whose block cache holds the file, against the same fio jobs on a file of the same size on
//!   the filesystem of the cache directory (the device ceiling);
//! - CPU seconds the berth process spends per GiB served, io_uring engine against thread pool;
//! - the same mount using a `berth daemon`'s node cache (`--cache-socket`) against a cache of
//!   its own: the cost of asking the daemon where blocks are.
//!
//! The source is a local directory store, so the store plays no part once the cache is warm;
//! the memory tier is off (`--cache-memory 0`) so that hits come from the disk tier.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::berth;
use crate::setup::ensure_apt;
use crate::sh::{is_listening, repo_root, Pattern};

const MIB: u64 = 1 << 20;
const ENGINES: [&str; 2] = ["io-uring", "threads"];
const RANDOM_SECONDS: u32 = 10;

/// Results of one fio job.
#[derive(Debug, Clone, Copy, Default)]
struct Fio {
    bytes_per_sec: f64,
    iops: f64,
}

pub fn run(args: &[String]) -> Result<()> {
    let (suite, size_mib) = parse(args)?;
    if suite != "cache" {
        bail!("unknown bench suite {suite:?}; available: cache");
    }
    ensure_apt(&["fio"])?;
    let berth = berth::binary()?;
    let size = size_mib * MIB;
    let work = repo_root().join("target").join("bench-cache");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(work.join("src"))?;
    eprintln!("bench: writing a {size_mib} MiB test file");
    write_data(&work.join("src").join("data.bin"), size)?;

    let mut rows = Vec::new();
    for engine in ENGINES {
        let cache = [
            "--cache-io".into(),
            engine.into(),
            "--cache-size".into(),
            format!("{}MiB", 2 * size / MIB),
            "--cache-dir".into(),
            work.join(format!("cache-{engine}")).display().to_string(),
        ];
        rows.push((
            engine,
            through_mount(&berth, &work, engine, &cache, size, None)?,
        ));
    }
    rows.push((NODE_ROW, through_node_cache(&berth, &work, size)?));
    eprintln!("bench: measuring the device ceiling with fio");
    let ceiling_file = work.join("ceiling.bin");
    write_data(&ceiling_file, size)?;
    // The device at its best: berth reads ahead with several requests in flight, so the
    // sequential ceiling gets a queue depth too (fio takes the last --ioengine given); random
    // 4 KiB uses the same jobs as through the mount.
    let ceiling = (
        fio(
            &ceiling_file,
            size,
            &[
                "--rw=read",
                "--bs=1M",
                "--numjobs=1",
                "--ioengine=libaio",
                "--iodepth=16",
            ],
        )?,
        fio_rand(&ceiling_file, size)?,
    );
    let _ = std::fs::remove_dir_all(&work);
    report(&rows, ceiling, size_mib);
    Ok(())
}

fn parse(args: &[String]) -> Result<(String, u64)> {
    let mut suite = None;
    let mut size = 1024;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--size-mib" => {
                size = it
                    .next()
                    .context("--size-mib needs a number")?
                    .parse()
                    .context("--size-mib needs a number")?;
            }
            s if suite.is_none() && !s.starts_with('-') => suite = Some(s.to_string()),
            other => bail!("unknown argument {other:?} to `cargo xtask bench`"),
        }
    }
    Ok((suite.unwrap_or_else(|| "cache".into()), size))
}

/// A file of `size` bytes (whole MiB) of [`Pattern`].
pub(crate) fn write_data(path: &Path, size: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut pattern = Pattern::default();
    let mut chunk = vec![0u8; MIB as usize];
    for _ in 0..size / MIB {
        pattern.fill(&mut chunk);
        f.write_all(&chunk)?;
    }
    f.flush()?;
    f.get_ref().sync_all()?;
    Ok(())
}

struct Measured {
    seq: Fio,
    rand: Fio,
    cpu_per_gib: f64,
}

/// The row of a mount that uses a `berth daemon`'s node cache (io_uring) instead of its own.
const NODE_ROW: &str = "node cache, io-uring";

/// Starts `berth daemon --cache-dir` and measures a mount that uses its node cache: what the
/// cache index round trips to the daemon cost against a cache of the mount's own.
fn through_node_cache(berth: &Path, work: &Path, size: u64) -> Result<Measured> {
    let state = work.join("node-state");
    let mut daemon = Command::new(berth)
        .arg("daemon")
        .arg("--socket")
        .arg(work.join("node.sock"))
        .arg("--state-dir")
        .arg(&state)
        .arg("--cache-dir")
        .arg(work.join("cache-node"))
        .arg("--cache-size")
        .arg(format!("{}MiB", 2 * size / MIB))
        .env("RUST_LOG", "berth=warn")
        .stdout(Stdio::null())
        .spawn()
        .context("starting berth daemon")?;
    let socket = state.join("cache.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_listening(&socket) && Instant::now() < deadline && daemon.try_wait()?.is_none() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let cache = [
        "--cache-io".into(),
        "io-uring".into(),
        "--cache-socket".into(),
        socket.display().to_string(),
    ];
    let result = if is_listening(&socket) {
        through_mount(berth, work, "node", &cache, size, Some(daemon.id()))
    } else {
        Err(anyhow::anyhow!("berth daemon did not serve its node cache"))
    };
    // SAFETY: kill(2) of our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    let _ = daemon.wait();
    result
}

/// Mounts the source with the cache `flags`, warms it, and measures warm reads. The CPU of
/// `server` (the daemon of a node cache) counts as the mount's.
fn through_mount(
    berth: &Path,
    work: &Path,
    engine: &str,
    flags: &[String],
    size: u64,
    server: Option<u32>,
) -> Result<Measured> {
    let mnt = work.join(format!("mnt-{engine}"));
    std::fs::create_dir_all(&mnt)?;
    let mut child = Command::new(berth)
        .arg("mount")
        .arg(work.join("src"))
        .arg(&mnt)
        .args(["--read-only", "--cache-memory", "0"])
        .args(flags)
        .arg("--state-dir")
        .arg(work.join("state"))
        .env("RUST_LOG", "berth=warn")
        .stdout(Stdio::piped())
        .spawn()
        .context("starting berth")?;
    let result = (|| {
        wait_ready(&mut child)?;
        let file = mnt.join("data.bin");
        eprintln!("bench: [{engine}] warming the cache");
        fio_seq(&file, size)?;
        wait_cached(berth, work, &mnt, size)?;
        let pids: Vec<u32> = std::iter::once(child.id()).chain(server).collect();
        let cpu_of = || -> Result<f64> { pids.iter().map(|&p| cpu_seconds(p)).sum() };
        let cpu_before = cpu_of()?;
        let seq = fio_seq(&file, size)?;
        let cpu = cpu_of()? - cpu_before;
        eprintln!("bench: [{engine}] random 4 KiB reads for {RANDOM_SECONDS}s");
        let rand = fio_rand(&file, size)?;
        Ok(Measured {
            seq,
            rand,
            cpu_per_gib: cpu / (size as f64 / (1u64 << 30) as f64),
        })
    })();
    let _ = Command::new("umount").arg(&mnt).status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    result
}

pub(crate) fn wait_ready(child: &mut Child) -> Result<()> {
    let stdout = child.stdout.take().context("berth stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("berth: mounted") {
        bail!("berth did not mount (printed {line:?})");
    }
    Ok(())
}

/// Waits until `berth status` shows every block of the file on disk.
fn wait_cached(berth: &Path, work: &Path, mnt: &Path, size: u64) -> Result<()> {
    let want = size.div_ceil(MIB);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new(berth)
            .args(["status", "--json", "--state-dir"])
            .arg(work.join("state"))
            .arg(mnt)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let blocks = json_number(&text, "disk_blocks").unwrap_or(0.0) as u64;
        if blocks >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {blocks} of {want} blocks reached the cache disk");
        }
        // Blocks the disk could not take while the first read ran: read again.
        fio_seq(&mnt.join("data.bin"), size)?;
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `pid` and its live children: a berth mount is a holder process plus an engine child, and
/// what it costs is the sum of both.
pub(crate) fn process_and_children(pid: u32) -> Vec<u32> {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    std::iter::once(pid)
        .chain(children.split_whitespace().filter_map(|c| c.parse().ok()))
        .collect()
}

/// CPU seconds (utime + stime) of `pid` and its live children.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let mut total = 0.0;
    for p in process_and_children(pid) {
        total += process_cpu_seconds(p)?;
    }
    Ok(total)
}

/// utime + stime of a process, in seconds.
fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').context("odd /proc stat")?.1;
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    let hz = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(100.0);
    Ok(ticks / hz)
}

fn fio(file: &Path, size: u64, job: &[&str]) -> Result<Fio> {
    let out = Command::new("fio")
        .arg("--name=berth-bench")
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--size={size}"))
        .args([
            "--direct=1",
            "--ioengine=psync",
            "--group_reporting",
            "--output-format=json",
        ])
        .args(job)
        .output()
        .context("running fio")?;
    if !out.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let read = json_object(&text, "read").context("fio output has no read section")?;
    Ok(Fio {
        bytes_per_sec: json_number(read, "bw_bytes").context("no bw_bytes")?,
        iops: json_number(read, "iops").context("no iops")?,
    })
}

fn fio_seq(file: &Path, size: u64) -> Result<Fio> {
    fio(file, size, &["--rw=read", "--bs=1M", "--numjobs=1"])
}

fn fio_rand(file: &Path, size: u64) -> Result<Fio> {
    let runtime = format!("--runtime={RANDOM_SECONDS}");
    fio(
        file,
        size,
        &[
            "--rw=randread",
            "--bs=4k",
            "--numjobs=4",
            "--time_based",
            &runtime,
        ],
    )
}

/// The text after the first `"key" : {` (an object, not a string value such as `"rw" : "read"`).
fn json_object<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("\"{key}\"");
    let mut from = 0;
    while let Some(at) = text[from..].find(&needle) {
        let rest = text[from + at + needle.len()..].trim_start();
        if let Some(value) = rest.strip_prefix(':').map(str::trim_start) {
            if let Some(object) = value.strip_prefix('{') {
                return Some(object);
            }
        }
        from += at + needle.len();
    }
    None
}

/// The first `"key" : number` after the start of `text` (fio's JSON is regular enough).
fn json_number(text: &str, key: &str) -> Option<f64> {
    let at = text.find(&format!("\"{key}\""))?;
    let rest = text[at + key.len() + 2..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start();
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == 'e' || c == '+'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

fn report(rows: &[(&str, Measured)], ceiling: (Fio, Fio), size_mib: u64) {
    let mib = |f: &Fio| f.bytes_per_sec / MIB as f64;
    println!();
    println!(
        "cache bench: warm reads of a {size_mib} MiB file, disk tier only, fio O_DIRECT psync through the mount"
    );
    println!("ceiling: a file of the same size on the cache device; sequential with libaio QD16, random 4 KiB with 4 psync jobs");
    println!("| workload | ceiling (cache device) | engine | berth mount | ratio to ceiling |");
    println!("|---|---|---|---|---|");
    for (engine, m) in rows {
        println!(
            "| sequential 1 MiB, 1 job | {:.0} MiB/s | {engine} | {:.0} MiB/s | {:.2} |",
            mib(&ceiling.0),
            mib(&m.seq),
            m.seq.bytes_per_sec / ceiling.0.bytes_per_sec
        );
    }
    for (engine, m) in rows {
        println!(
            "| random 4 KiB, 4 jobs | {:.0} IOPS | {engine} | {:.0} IOPS | {:.2} |",
            ceiling.1.iops,
            m.rand.iops,
            m.rand.iops / ceiling.1.iops
        );
    }
    let row = |name: &str| rows.iter().find(|(n, _)| *n == name).map(|(_, m)| m);
    if let (Some(uring), Some(pool)) = (row("io-uring"), row("threads")) {
        println!();
        println!(
            "CPU per GiB served (sequential): io_uring {:.2} s, thread pool {:.2} s, io_uring/pool = {:.2}",
            uring.cpu_per_gib,
            pool.cpu_per_gib,
            uring.cpu_per_gib / pool.cpu_per_gib.max(1e-9)
        );
    }
    if let (Some(own), Some(node)) = (row("io-uring"), row(NODE_ROW)) {
        println!(
            "node cache (index in berth daemon) / own cache, io_uring: sequential {:.2}, random 4 KiB {:.2}, CPU per GiB {:.2}",
            node.seq.bytes_per_sec / own.seq.bytes_per_sec,
            node.rand.iops / own.rand.iops.max(1e-9),
            node.cpu_per_gib / own.cpu_per_gib.max(1e-9)
        );
    }
    println!("goals: sequential >= 0.90 of the ceiling, random 4 KiB >= 0.60, io_uring CPU <= 0.60 of the pool");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_numbers_out_of_fio_json() {
        let text = r#"{"jobs":[{"rw" : "read", "read" : {"io_bytes":1,"bw_bytes" : 1048576,"iops": 2.5e3}}]}"#;
        let read = json_object(text, "read").unwrap();
        assert_eq!(json_number(read, "bw_bytes"), Some(1048576.0));
        assert_eq!(json_number(read, "iops"), Some(2500.0));
        assert_eq!(json_number(read, "missing"), None);
    }

    #[test]
    fn parses_arguments() {
        let (suite, size) = parse(&["cache".into(), "--size-mib".into(), "64".into()]).unwrap();
        assert_eq!((suite.as_str(), size), ("cache", 64));
        assert!(parse(&["--bogus".into()]).is_err());
    }
}
