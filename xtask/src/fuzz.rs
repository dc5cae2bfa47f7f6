//! `cargo xtask fuzz-guest --minutes N`: a hostile guest against berth's virtio-fs request
//! path (the `fuzz_guest` example of the daemon: random and malformed requests and descriptor
//! tables into a real `BerthFs` door), half the time over a local directory store, half over
//! SeaweedFS, under a 64 MiB memory budget. Prints each run's report (requests served,
//! crashes, peak RSS) and fails on any crash, a fuzzer that dies, or an RSS far above the
//! budget. CI runs it for two minutes; longer runs are for hunting.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::berth;
use crate::seaweed::{Access, Seaweed};
use crate::setup::weed_bin;
use crate::sh::{describe, tempdir};

const BUCKET: &str = "fuzz";
/// Far above what the fuzzer needs (its budget is 64 MiB): only a guest that made berth
/// allocate what it asked for gets there.
const RSS_CEILING_KIB: u64 = 512 << 10;

pub fn run(args: &[String]) -> Result<()> {
    let minutes = match args {
        [] => 2.0,
        [flag, n] if flag == "--minutes" => n
            .parse::<f64>()
            .ok()
            .filter(|m| *m > 0.0)
            .with_context(|| format!("--minutes takes a positive number, not {n:?}"))?,
        _ => bail!("`cargo xtask fuzz-guest` takes only --minutes N"),
    };
    let bin = berth::build(true)?
        .fuzz_guest
        .context("the test build made no fuzz_guest example")?;
    let seconds = ((minutes * 60.0) / 2.0).ceil().max(1.0) as u64;
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let work = tempdir("berth-fuzz-guest")?;
    let local = work.0.as_path().join("local-store");
    std::fs::create_dir_all(&local)?;
    let mut failures = Vec::new();
    let mut cmd = Command::new(&bin);
    cmd.arg("local")
        .arg(&local)
        .arg(seconds.to_string())
        .arg(seed.to_string());
    check("local", &mut cmd, &mut failures)?;
    let s3 = Seaweed::start(&weed_bin(), work.0.as_path(), Access::Keys, |s| {
        s.put(BUCKET, "ready", b"ok")
    })?;
    let mut cmd = Command::new(&bin);
    s3.client_env(&mut cmd)
        .arg("s3")
        .arg(format!("s3://{BUCKET}"))
        .arg(seconds.to_string())
        .arg((seed ^ 0x9e37_79b9).to_string());
    check("s3", &mut cmd, &mut failures)?;
    if !failures.is_empty() {
        bail!("fuzz-guest (seed {seed}): {}", failures.join("; "));
    }
    println!("fuzz-guest: seed {seed}: 0 crashes");
    Ok(())
}

fn check(store: &str, cmd: &mut Command, failures: &mut Vec<String>) -> Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let out = cmd
        .env("RUST_LOG", "error")
        .output()
        .with_context(|| format!("running {}", describe(cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        failures.push(format!(
            "{store}: the fuzzer died ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join(" | ")
        ));
        return Ok(());
    }
    let report: Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("no report from the {store} fuzzer: {stdout}"))?;
    println!("fuzz-guest {store}: {report}");
    let crashes = report["crashes"].as_u64().unwrap_or(u64::MAX);
    let rss = report["peak_rss_kib"].as_u64().unwrap_or(u64::MAX);
    if crashes != 0 {
        failures.push(format!("{store}: {crashes} requests panicked"));
    }
    if rss > RSS_CEILING_KIB {
        failures.push(format!(
            "{store}: peak RSS {rss} KiB over {RSS_CEILING_KIB} KiB"
        ));
    }
    Ok(())
}
