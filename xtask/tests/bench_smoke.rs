//! Smoke test of the perf harness: `cargo xtask bench peers --quick` with one tiny workload
//! against a real SeaweedFS server and a real berth mount, then a check of results.json.
//!
//! Nothing is timed. It needs root, /dev/fuse, fio and the `weed` binary (`cargo xtask setup`
//! installs the last two); when one is missing the test is reported as ignored with the reason,
//! or fails under `BERTH_E2E_REQUIRE=1` (CI). rclone and s3fs take part only if installed: the
//! harness is told not to install anything, so a missing peer shows up as a skip note inside
//! results.json, which the test checks is there rather than silently absent.

use std::path::{Path, PathBuf};
use std::process::Command;

use libtest_mimic::{Arguments, Completion, Failed, Trial};
use serde_json::Value;

const WORKLOAD: &str = "seqread-1m-1j-cold";
const PEERS: [&str; 2] = ["rclone", "s3fs"];

fn main() {
    let args = Arguments::from_args();
    let strict = std::env::var("BERTH_E2E_REQUIRE").is_ok_and(|v| v == "1");
    let missing = missing_requirements();
    let trial = if missing.is_empty() {
        Trial::test("bench_quick_smoke", || smoke().map_err(Failed::from))
    } else if strict {
        Trial::test("bench_quick_smoke", move || {
            Err(Failed::from(format!(
                "requirement missing and BERTH_E2E_REQUIRE=1: {missing}"
            )))
        })
    } else {
        eprintln!("bench_quick_smoke: SKIPPED: {missing}");
        Trial::ignorable_test("bench_quick_smoke", move || {
            Ok(Completion::ignored_with(missing))
        })
        .with_ignored_flag(true)
    };
    libtest_mimic::run(&args, vec![trial]).exit();
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the repository")
        .to_path_buf()
}

fn weed_bin() -> PathBuf {
    std::env::var_os("BERTH_WEED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/venv/bin/weed"))
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// What this machine lacks for the smoke test, joined for the skip message ("" = nothing).
fn missing_requirements() -> String {
    let mut missing = Vec::new();
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !root {
        missing.push("not root (FUSE mounts need root)".to_owned());
    }
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .is_err()
    {
        missing.push("/dev/fuse cannot be opened".to_owned());
    }
    if !on_path("fio") {
        missing.push("fio not installed (cargo xtask setup installs it)".to_owned());
    }
    if !weed_bin().is_file() {
        missing.push(format!(
            "{} missing (cargo xtask setup installs SeaweedFS)",
            weed_bin().display()
        ));
    }
    missing.join("; ")
}

fn smoke() -> Result<(), String> {
    let out = std::env::temp_dir().join(format!("berth-bench-smoke-{}", std::process::id()));
    let result = run_and_check(&out);
    let _ = std::fs::remove_dir_all(&out);
    result
}

fn run_and_check(out: &Path) -> Result<(), String> {
    let status = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["bench", "peers", "--quick", "--only", WORKLOAD, "--peers"])
        .arg(PEERS.join(","))
        .arg("--out")
        .arg(out)
        .env("BERTH_BENCH_NO_INSTALL", "1")
        .env("BERTH_WEED_BIN", weed_bin())
        .current_dir(repo_root())
        .status()
        .map_err(|e| format!("running xtask: {e}"))?;
    if !status.success() {
        return Err(format!("cargo xtask bench failed ({status})"));
    }
    let text = std::fs::read_to_string(out.join("results.json"))
        .map_err(|e| format!("reading results.json: {e}"))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("results.json: {e}"))?;
    check_schema(&v)?;
    for file in ["results.md", "cold-reads.svg"] {
        if !out.join(file).is_file() {
            return Err(format!("{file} was not written"));
        }
    }
    Ok(())
}

fn check_schema(v: &Value) -> Result<(), String> {
    let need = |p: &str| {
        v.pointer(p)
            .ok_or_else(|| format!("results.json lacks {p}"))
    };
    if need("/schema")? != 1 {
        return Err("schema is not 1".into());
    }
    for p in [
        "/id",
        "/date",
        "/machine/kernel",
        "/machine/cpus",
        "/versions/berth",
        "/versions/fio",
    ] {
        need(p)?;
    }
    let workloads = need("/suites/peers/workloads")?
        .as_array()
        .ok_or("workloads is not a list")?;
    let [w] = workloads.as_slice() else {
        return Err(format!(
            "expected only {WORKLOAD}, got {} workloads",
            workloads.len()
        ));
    };
    if w["id"] != WORKLOAD || w["unit"] != "MiB/s" {
        return Err(format!("unexpected workload {w}"));
    }
    let berth = w["values"]["berth"]
        .as_f64()
        .ok_or_else(|| format!("no berth figure: {w}"))?;
    if berth <= 0.0 {
        return Err(format!("berth figure {berth} is not positive"));
    }
    if w["ceiling"]["source"] != "s3-sdk" || !w["ceiling"]["value"].is_number() {
        return Err(format!("no s3-sdk ceiling: {w}"));
    }
    if !w["ratio_to_ceiling"]["berth"].is_number() {
        return Err(format!("no ratio_to_ceiling for berth: {w}"));
    }
    for peer in PEERS {
        let measured = w["values"][peer].is_number();
        let noted = w["notes"][peer].is_string();
        if measured == noted {
            return Err(format!(
                "{peer} must have a figure or a skip note, not both or neither: {w}"
            ));
        }
        if noted {
            eprintln!("bench_quick_smoke: {peer} skipped: {}", w["notes"][peer]);
        }
    }
    if w["values"].as_object().is_some_and(|m| m.len() > 1) && !w["ratio_to_best_peer"].is_number()
    {
        return Err(format!("peers measured but no ratio_to_best_peer: {w}"));
    }
    Ok(())
}
