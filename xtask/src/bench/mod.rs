//! `cargo xtask bench [SUITE...] [--quick] [--out DIR]`: the perf harness.
//!
//! Suites plug in through [`SUITES`]: a name, a line of help, and a function that gets the
//! shared [`Ctx`] (quick mode, output directory, progress display) and may add a section to
//! results.json. With no suite named, [`DEFAULT_SUITES`] run (the peer matrix).
//! `cargo xtask bench report [RESULTS]` rewrites the README section from a results.json.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use self::progress::Progress;
use self::sdk::Sdk;
use crate::berth;
use crate::seaweed::{self, Access, Seaweed};
use crate::setup::{ensure_apt, setup, weed_bin};
use crate::sh::{cargo, output, repo_root, target_dir};

mod cache;
mod fio;
mod matrix;
mod peers;
mod progress;
mod recovery;
mod report;
mod results;
mod sdk;
mod svg;
mod virtiofs;
mod vmrecovery;

/// One bench suite.
pub struct Suite {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&mut Ctx) -> Result<()>,
}

/// Suites by name; add a line here to plug one in.
pub const SUITES: &[Suite] = &[
    Suite {
        name: "peers",
        about: "berth vs rclone, s3fs and Mountpoint on one SeaweedFS bucket, with ceilings",
        run: peers_suite,
    },
    Suite {
        name: "cache",
        about: "warm reads through berth's block cache vs fio on the cache device (prints a table)",
        run: cache_suite,
    },
    Suite {
        name: "virtiofs",
        about: "reads in a QEMU guest through berth share vs virtiofsd 1.14 (prints a table)",
        run: virtiofs_suite,
    },
    Suite {
        name: "recovery",
        about: "kill -9 and upgrade of the engine under load: errors, stalls, detection latency (prints a table)",
        run: recovery_suite,
    },
];

pub const DEFAULT_SUITES: &[&str] = &["peers"];

/// What every suite gets.
pub struct Ctx {
    pub quick: bool,
    pub out: PathBuf,
    /// Restrict the peer matrix to workloads whose id contains one of these.
    pub only: Vec<String>,
    /// Restrict the peer matrix to these systems (berth is always measured).
    pub peers: Vec<String>,
    pub progress: Progress,
    /// Sections of results.json, one per suite that produced data.
    pub sections: Map<String, Value>,
    pub versions: Map<String, Value>,
}

struct Args {
    suites: Vec<String>,
    quick: bool,
    out: Option<PathBuf>,
    only: Vec<String>,
    peers: Vec<String>,
    /// Arguments after `--`, passed to suites with their own parser (cache).
    rest: Vec<String>,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        suites: Vec::new(),
        quick: false,
        out: None,
        only: Vec::new(),
        peers: Vec::new(),
        rest: Vec::new(),
    };
    let mut it = args.iter();
    let list = |v: Option<&String>, flag: &str| -> Result<Vec<String>> {
        Ok(v.with_context(|| format!("{flag} needs a value"))?
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    };
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = Some(PathBuf::from(it.next().context("--out needs a directory")?)),
            "--only" => a.only = list(it.next(), "--only")?,
            "--peers" => a.peers = list(it.next(), "--peers")?,
            "--" => {
                a.rest = it.cloned().collect();
                break;
            }
            s if !s.starts_with('-') => {
                if !SUITES.iter().any(|x| x.name == s) {
                    let names: Vec<String> = SUITES
                        .iter()
                        .map(|x| format!("  {:<8} {}", x.name, x.about))
                        .collect();
                    bail!("unknown bench suite {s:?}; suites:\n{}\n  report   rewrite the README table", names.join("\n"));
                }
                a.suites.push(s.to_owned());
            }
            other => bail!("unknown argument {other:?} to `cargo xtask bench`"),
        }
    }
    if a.suites.is_empty() {
        a.suites = DEFAULT_SUITES.iter().map(|s| s.to_string()).collect();
    }
    Ok(a)
}

pub fn run(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("report") {
        return report::run(&args[1..]);
    }
    // The recovery bench prints its own table and has its own flags (`--kills`).
    if args.first().map(String::as_str) == Some("recovery") {
        return recovery::run(&args[1..]);
    }
    // The virtio-fs bench prints its own table; `--size-mib` sets its file size.
    if args.first().map(String::as_str) == Some("virtiofs") {
        return virtiofs::run(virtiofs_size(&args[1..])?);
    }
    // The old cache bench keeps its own flags (`--size-mib`).
    if args.first().map(String::as_str) == Some("cache") && args.iter().any(|a| a == "--size-mib") {
        return cache::run(args);
    }
    let a = parse(args)?;
    let date = shell(&["date", "-u", "+%Y-%m-%d"]).unwrap_or_else(|| "unknown-date".into());
    let time = shell(&["date", "-u", "+%H%M%S"]).unwrap_or_default();
    let rev = git(&["rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "norev".into());
    let id = format!("{date}-{time}-{rev}{}", if a.quick { "-quick" } else { "" });
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| repo_root().join("perf").join("results").join(&id));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let mut ctx = Ctx {
        quick: a.quick,
        out,
        only: a.only.clone(),
        peers: a.peers.clone(),
        progress: Progress::new(),
        sections: Map::new(),
        versions: Map::new(),
    };
    let load_start = loadavg();
    let started = std::time::Instant::now();
    for name in &a.suites {
        let suite = SUITES
            .iter()
            .find(|s| s.name == name)
            .context("suite vanished")?;
        if suite.name == "cache" && !a.rest.is_empty() {
            cache::run(&a.rest)?;
            continue;
        }
        (suite.run)(&mut ctx).with_context(|| format!("bench suite {name}"))?;
    }
    ctx.progress.finish();
    let out = ctx.out.clone();
    if ctx.sections.is_empty() {
        let _ = std::fs::remove_dir(&out);
        return Ok(());
    }
    let results = json!({
        "schema": results::SCHEMA,
        "id": id,
        "date": date,
        "time": time,
        "quick": a.quick,
        "duration_seconds": started.elapsed().as_secs(),
        "machine": machine(&load_start),
        "versions": ctx.versions,
        "suites": ctx.sections,
    });
    report::write_outputs(&out, &results)?;
    println!("{}", std::fs::read_to_string(out.join("results.md"))?);
    println!("bench: results in {}", out.display());
    Ok(())
}

fn machine(load_start: &str) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    json!({
        "kernel": shell(&["uname", "-r"]).unwrap_or_default(),
        "cpu_model": cpu_model,
        "cpus": cpus,
        "mem_gib": (mem_kib as f64 / (1u64 << 20) as f64).round(),
        "load_start": load_start,
        "load_end": loadavg(),
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// stdout of a command, trimmed, if it succeeded.
fn shell(argv: &[&str]) -> Option<String> {
    let (program, args) = argv.split_first()?;
    output(Command::new(program).args(args)).ok()
}

/// stdout of `git ARGS` in the repository, trimmed, if it succeeded.
fn git(args: &[&str]) -> Option<String> {
    output(Command::new("git").arg("-C").arg(repo_root()).args(args)).ok()
}

fn recovery_suite(ctx: &mut Ctx) -> Result<()> {
    let kills = if ctx.quick { "5" } else { "20" };
    recovery::run(&["--kills".into(), kills.into()])
}

fn virtiofs_suite(ctx: &mut Ctx) -> Result<()> {
    virtiofs::run(if ctx.quick { 64 } else { 256 })
}

/// `bench virtiofs [--size-mib N]`: the file size in MiB (a TCG guest reads slowly: 256).
fn virtiofs_size(args: &[String]) -> Result<u64> {
    match args {
        [] => Ok(256),
        [flag, n] if flag == "--size-mib" => n.parse().context("--size-mib needs a number"),
        _ => bail!("`cargo xtask bench virtiofs` takes only --size-mib N"),
    }
}

fn cache_suite(ctx: &mut Ctx) -> Result<()> {
    let size = if ctx.quick { "256" } else { "1024" };
    cache::run(&["cache".into(), "--size-mib".into(), size.into()])
}

fn peers_suite(ctx: &mut Ctx) -> Result<()> {
    let p = &ctx.progress;
    p.plan(3);
    p.step("installing fio and SeaweedFS");
    ensure_apt(&["fio"])?;
    let weed = std::env::var_os("BERTH_WEED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(weed_bin);
    if !weed.is_file() {
        setup()?;
    }
    p.step("building berth (release)");
    let build = berth::build(true).context("building berth")?;
    let bench_s3 = build
        .bench_s3
        .context("the test build made no bench_s3 example")?;
    p.step("preparing peers");
    let (available, missing) = discover_peers(ctx, &build.berth);
    for (name, why) in &missing {
        ctx.progress.log(&format!("{name}: skipped: {why}"));
    }

    let work = target_dir().join("bench-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let outcome = (|| {
        let bucket = "berth-bench";
        // Ready once the SDK can create the bucket.
        let server = Seaweed::start(&weed, &work.join("weed"), Access::Keys, |s| {
            Sdk::new(&bench_s3, s).tool(&["mb", bucket]).map(drop)
        })?;
        let client = Sdk::new(&bench_s3, &server);
        let sizes = matrix::Sizes::new(ctx.quick);
        let m = matrix::Matrix {
            sdk: &client,
            target: peers::Target {
                bucket: bucket.to_owned(),
                endpoint: server.endpoint.clone(),
                cache_bytes: sizes.cache,
            },
            sizes: sizes.clone(),
            filter: matrix::Filter(ctx.only.clone()),
            work: work.clone(),
            progress: &ctx.progress,
        };
        // Rough step count for the bar: uploads, ceilings, then per system.
        let per_system = 2 + 2 * 6 + 3 + sizes.dirs.len() as u64 + 3;
        ctx.progress
            .plan(2 + sizes.dirs.len() as u64 + 28 + per_system * available.len() as u64);
        let (data_sets, write_ceiling) = m.upload()?;
        let (tmpfs, device, sdk) = m.ceilings(write_ceiling)?;
        let mut workloads = matrix::workload_list(&sizes);
        workloads.retain(|w| m.filter.wants(&w.id));
        for peer in &available {
            let figures = m.measure(peer);
            for w in &mut workloads {
                match figures.get(&w.id) {
                    Some(Ok(v)) => {
                        w.values.insert(peer.name().to_owned(), *v);
                    }
                    Some(Err(why)) => {
                        ctx.progress
                            .log(&format!("{}: {}: {why}", peer.name(), w.id));
                        w.notes.insert(peer.name().to_owned(), why.clone());
                    }
                    None => {
                        w.notes
                            .insert(peer.name().to_owned(), "not measured".to_owned());
                    }
                }
            }
        }
        for w in &mut workloads {
            for (name, why) in &missing {
                w.notes.insert(name.clone(), why.clone());
            }
            let key = w.id.trim_end_matches("-cold").trim_end_matches("-warm");
            w.ceiling = if w.id.ends_with("-warm") {
                device.get(key).map(|v| ("cache-device".to_owned(), *v))
            } else if w.id.starts_with("seqread") || w.id.starts_with("randread") {
                sdk.get(key).map(|v| ("s3-sdk".to_owned(), *v))
            } else {
                sdk.get(&w.id).map(|v| ("s3-sdk".to_owned(), *v))
            };
        }
        Ok::<_, anyhow::Error>(matrix::Outcome {
            workloads,
            tmpfs,
            data_sets,
        })
    })();
    let _ = std::fs::remove_dir_all(&work);
    let outcome = outcome?;

    let sizes = matrix::Sizes::new(ctx.quick);
    let target = peers::Target {
        bucket: "BUCKET".into(),
        endpoint: "ENDPOINT".into(),
        cache_bytes: sizes.cache,
    };
    let mut peer_list: Vec<Value> = available
        .iter()
        .map(|p| json!({"name": p.name(), "status": "measured", "version": p.version, "command": p.describe(&target)}))
        .collect();
    for (name, why) in &missing {
        peer_list.push(json!({"name": name, "status": "skipped", "reason": why, "command": format!("(skipped: {why})")}));
    }
    for p in &available {
        ctx.versions.insert(p.name().to_owned(), json!(p.version));
    }
    ctx.versions.insert("fio".into(), json!(fio::version()));
    ctx.versions
        .insert("seaweedfs".into(), json!(seaweed::version(&weed)));
    ctx.sections.insert(
        "peers".into(),
        json!({
            "data_sets": outcome.data_sets,
            "cache_bytes": sizes.cache,
            "metadata_ttl_seconds": peers::METADATA_TTL_SECS,
            "peers": peer_list,
            "ceilings_tmpfs": outcome.tmpfs,
            "workloads": outcome.workloads.iter().map(results::Workload::to_json).collect::<Vec<_>>(),
        }),
    );
    Ok(())
}

/// Which systems can run here: (available, [(name, why not)]).
fn discover_peers(ctx: &Ctx, berth: &Path) -> (Vec<peers::Peer>, Vec<(String, String)>) {
    let mut ok = Vec::new();
    let mut missing = Vec::new();
    for kind in peers::Kind::ALL {
        let name = kind.name();
        if kind != peers::Kind::Berth
            && !ctx.peers.is_empty()
            && !ctx.peers.iter().any(|p| p == name)
        {
            continue;
        }
        match prepare(ctx, kind, berth) {
            Ok(peer) => ok.push(peer),
            Err(e) => missing.push((name.to_owned(), format!("{e:#}"))),
        }
    }
    (ok, missing)
}

fn prepare(ctx: &Ctx, kind: peers::Kind, berth: &Path) -> Result<peers::Peer> {
    let version = |bin: &str, arg: &str| {
        shell(&[bin, arg])
            .and_then(|v| v.lines().next().map(str::to_owned))
            .unwrap_or_default()
    };
    let (bin, version) = match kind {
        peers::Kind::Berth => {
            let bin = berth.to_owned();
            let v = shell(&[&bin.to_string_lossy(), "--version"]).unwrap_or_default();
            let rev = git(&["describe", "--always", "--dirty"]).unwrap_or_default();
            (bin, format!("{v} ({rev})"))
        }
        peers::Kind::Rclone => {
            ensure_apt(&["rclone"])?;
            (PathBuf::from("rclone"), version("rclone", "version"))
        }
        peers::Kind::S3fs => {
            ensure_apt(&["s3fs"])?;
            (PathBuf::from("s3fs"), version("s3fs", "--version"))
        }
        peers::Kind::Mountpoint => {
            ctx.progress
                .step("building the Mountpoint peer (perf/mountpoint-peer)");
            (build_mountpoint()?, mountpoint_version())
        }
    };
    Ok(peers::Peer { kind, bin, version })
}

/// Builds perf/mountpoint-peer (its own workspace and target dir; aws-crt needs cmake and a C
/// compiler, FUSE needs libfuse headers).
fn build_mountpoint() -> Result<PathBuf> {
    ensure_apt(&["cmake", "clang", "libfuse-dev", "pkg-config"])?;
    let dir = repo_root().join("perf").join("mountpoint-peer");
    let target = target_dir().join("mountpoint-peer");
    let out = Command::new(cargo())
        .current_dir(&dir)
        .args(["build", "--release", "--locked"])
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .context("running cargo build for perf/mountpoint-peer")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first_error = err
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or("see cargo output")
            .to_owned();
        bail!("perf/mountpoint-peer does not build here: {first_error}");
    }
    Ok(target.join("release").join("mountpoint-peer"))
}

fn mountpoint_version() -> String {
    let lock = std::fs::read_to_string(repo_root().join("perf/mountpoint-peer/Cargo.lock"))
        .unwrap_or_default();
    let mut it = lock.lines();
    while let Some(l) = it.next() {
        if l == "name = \"mountpoint-s3-fs\"" {
            if let Some(v) = it.next().and_then(|v| v.strip_prefix("version = ")) {
                return format!("mountpoint-s3-fs {}", v.trim_matches('"'));
            }
        }
    }
    "mountpoint-s3-fs".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn default_suite_is_the_peer_matrix() {
        let a = parse(&args(&["--quick"])).unwrap();
        assert_eq!(a.suites, vec!["peers"]);
        assert!(a.quick);
    }

    #[test]
    fn parses_suites_and_filters() {
        let a = parse(&args(&[
            "peers",
            "cache",
            "--out",
            "/tmp/x",
            "--only",
            "seqread,ttfb",
            "--peers",
            "rclone",
        ]))
        .unwrap();
        assert_eq!(a.suites, vec!["peers", "cache"]);
        assert_eq!(a.out, Some(PathBuf::from("/tmp/x")));
        assert_eq!(a.only, vec!["seqread", "ttfb"]);
        assert_eq!(a.peers, vec!["rclone"]);
        assert!(parse(&args(&["nosuch"])).is_err());
        assert!(parse(&args(&["--bogus"])).is_err());
    }
}
