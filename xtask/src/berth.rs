//! The berth binary that vm-test and the benches run: one build for all of them, the test
//! build, and one way to start it as a client of the harness's S3 server.
//!
//! `cargo xtask test` runs `cargo test --release --workspace` ([`TEST_BUILD`]). Cargo
//! resolves features once per invocation, over the packages and targets it selects: the
//! whole workspace with its dev-dependencies (the daemon's dev-dependency `vhost` with
//! `vhost-user-frontend` also reaches `berth-vhost`, for one). `cargo build -p berth --bin
//! berth` selects one package without dev-dependencies, so it resolved other features and
//! rebuilt berth and much below it. [`build`] runs the test build itself, with `--no-run`:
//! the same packages, targets, profile and features, so the same units, fresh after
//! `cargo xtask test` (and inside it, where the bench smoke test runs xtask). It reads where
//! cargo put the binaries from cargo's own messages, so CARGO_TARGET_DIR and cargo's
//! configuration are honoured.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::seaweed::Seaweed;
use crate::sh::{cargo, describe, repo_root, Reaped};

/// The cargo command line of the workspace's test build; `cargo xtask test` adds its
/// options and the caller's arguments.
pub const TEST_BUILD: [&str; 3] = ["test", "--release", "--workspace"];
/// Runs this berth binary instead of building one (to compare two builds in `bench
/// virtiofs`).
pub const BIN_ENV: &str = "BERTH_BIN";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// What the test build made that xtask runs.
pub struct Build {
    pub berth: PathBuf,
    /// The CSI driver (`cargo xtask image`).
    pub berth_csi: Option<PathBuf>,
    /// The `bench_s3` example (the bench's SDK helper).
    pub bench_s3: Option<PathBuf>,
    /// The `fuzz_guest` example (`cargo xtask fuzz-guest`).
    pub fuzz_guest: Option<PathBuf>,
}

/// Builds the workspace as `cargo xtask test` does, without running a test, and returns
/// where the binaries are. `quiet` shows cargo's output only if the build fails.
pub fn build(quiet: bool) -> Result<Build> {
    let mut cmd = Command::new(cargo());
    cmd.current_dir(repo_root())
        .args(TEST_BUILD)
        .args(["--no-run", "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped())
        .stderr(if quiet {
            Stdio::piped()
        } else {
            Stdio::inherit()
        });
    if !quiet {
        eprintln!("xtask: $ {}", describe(&cmd));
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", describe(&cmd)))?;
    if !out.status.success() {
        // Quiet: what cargo said is the error; else it is on the terminal already.
        bail!(
            "{} failed ({}): {}",
            describe(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let messages = String::from_utf8_lossy(&out.stdout);
    let berth = executable(&messages, "bin", "berth")
        .context("cargo reported no berth binary from the test build")?;
    Ok(Build {
        berth,
        berth_csi: executable(&messages, "bin", "berth-csi"),
        bench_s3: executable(&messages, "example", "bench_s3"),
        fuzz_guest: executable(&messages, "example", "fuzz_guest"),
    })
}

/// The berth binary: BERTH_BIN if set, else the one [`build`] makes.
pub fn binary() -> Result<PathBuf> {
    match std::env::var_os(BIN_ENV) {
        Some(bin) => Ok(PathBuf::from(bin)),
        None => Ok(build(false)?.berth),
    }
}

/// The executable of target `name` of kind `kind` (not its test harness) among cargo's
/// JSON messages.
fn executable(messages: &str, kind: &str, name: &str) -> Option<PathBuf> {
    messages
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["profile"]["test"] == false)
        .filter(|m| m["target"]["name"] == name)
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|k| k == kind))
        })
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
}

/// Starts `berth share ARGS` (its state in `work`/state) as a client of `s3` and waits
/// until it shares; killed when the guard drops.
pub fn share(bin: &Path, work: &Path, s3: &Seaweed, args: &[&str]) -> Result<Reaped> {
    let state = work.join("state");
    let state = state.to_string_lossy();
    let mut all: Vec<&str> = args.to_vec();
    all.extend(["--state-dir", &state]);
    start(bin, work, s3, "share", &all, "berth: sharing")
}

/// Starts `berth COMMAND ARGS` as a client of `s3`, its stderr in `work`/berth-COMMAND.log,
/// and waits for a stdout line starting with `ready`; killed when the guard drops.
pub fn start(
    bin: &Path,
    work: &Path,
    s3: &Seaweed,
    command: &str,
    args: &[&str],
    ready: &'static str,
) -> Result<Reaped> {
    let log_path = work.join(format!("berth-{command}.log"));
    let log = std::fs::File::create(&log_path)?;
    let mut child = s3
        .client_env(&mut Command::new(bin))
        .arg(command)
        .args(args)
        .env("RUST_LOG", "berth=info,berth_vhost=info,warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child.stdout.take().context("berth stdout")?;
    let guard = Reaped(Some(child));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with(ready) {
                let _ = tx.send(());
            }
        }
    });
    if rx.recv_timeout(READY_TIMEOUT).is_err() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        bail!("berth {command} did not get ready within {READY_TIMEOUT:?}; its log:\n{log}");
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_binary_not_its_test_harness() {
        let messages = [
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"berth"},"profile":{"test":true},"executable":"/t/release/deps/berth-1f2e"}"#,
            r#"{"reason":"build-script-executed","package_id":"x"}"#,
            r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"berth"},"profile":{"test":false},"executable":null}"#,
            r#"{"reason":"compiler-artifact","target":{"kind":["bin"],"name":"berth"},"profile":{"test":false},"executable":"/t/release/berth","fresh":true}"#,
            r#"{"reason":"compiler-artifact","target":{"kind":["example"],"name":"bench_s3"},"profile":{"test":false},"executable":"/t/release/examples/bench_s3"}"#,
            r#"{"reason":"build-finished","success":true}"#,
        ]
        .join("\n");
        assert_eq!(
            executable(&messages, "bin", "berth"),
            Some(PathBuf::from("/t/release/berth"))
        );
        assert_eq!(
            executable(&messages, "example", "bench_s3"),
            Some(PathBuf::from("/t/release/examples/bench_s3"))
        );
        assert_eq!(executable(&messages, "bin", "berth-csi"), None);
        assert_eq!(executable("not json\n", "bin", "berth"), None);
    }
}
