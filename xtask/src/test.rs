//! `cargo xtask test`, `ci` and `deploy-check`: the workspace's tests under cargo, with a
//! one-line summary added up from libtest's `test result:` lines ([`Totals`]).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::berth::TEST_BUILD;
use crate::setup::{setup, weed_bin};
use crate::sh::{cargo, describe, repo_root, run_cmd, strict_env};
use crate::vm;

pub fn parse_args(rest: &[String]) -> Result<(bool, Vec<String>)> {
    let mut no_setup = false;
    let mut iter = rest.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--no-setup" => no_setup = true,
            "--" => return Ok((no_setup, iter.cloned().collect())),
            other => bail!(
                "unknown argument {other:?} to `cargo xtask test`; pass cargo test arguments after `--`"
            ),
        }
    }
    Ok((no_setup, Vec::new()))
}

pub fn test(no_setup: bool, extra: &[String], strict_e2e: bool) -> Result<()> {
    if !no_setup {
        setup()?;
    }
    let weed = weed_bin();
    let mut cmd = Command::new(cargo());
    cmd.current_dir(repo_root())
        .args(TEST_BUILD)
        .arg("--no-fail-fast")
        .args(extra)
        .stdout(Stdio::piped());
    if weed.is_file() {
        cmd.env("BERTH_WEED_BIN", &weed);
    } else {
        eprintln!(
            "xtask: {} not found; S3 end-to-end tests will be skipped (run `cargo xtask setup`)",
            weed.display()
        );
    }
    if strict_e2e {
        cmd.env("BERTH_E2E_REQUIRE", "1");
    }
    eprintln!("xtask: $ {}", describe(&cmd));
    let mut child = cmd.spawn().context("running cargo test")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let mut totals = Totals::default();
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        totals.add_line(&line);
    }
    let status = child.wait()?;
    println!();
    println!(
        "summary: {} passed, {} failed, {} skipped",
        totals.passed, totals.failed, totals.ignored
    );
    if !status.success() {
        bail!("cargo test failed ({status})");
    }
    if totals.suites == 0 {
        bail!("cargo test ran no test suite");
    }
    Ok(())
}

pub fn ci() -> Result<()> {
    let root = repo_root();
    run_cmd(
        Command::new(cargo())
            .current_dir(&root)
            .args(["fmt", "--all", "--", "--check"]),
    )?;
    run_cmd(Command::new(cargo()).current_dir(&root).args([
        "clippy",
        "--release",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    let strict = strict_env();
    test(false, &[], strict)?;
    vm::run(strict, false)?;
    crate::fuzz::run(&[])?;
    crate::image::run(&["--check".to_string()])
}

/// `cargo test --release -p berth-csi --test deploy`: every kustomization under deploy/
/// rendered and checked against the Kubernetes API types.
pub fn deploy_check() -> Result<()> {
    run_cmd(
        Command::new(cargo())
            .current_dir(repo_root())
            .args(["test", "--release", "-p", "berth-csi", "--test", "deploy"])
            .env("BERTH_E2E_REQUIRE", "1"),
    )
}

/// Totals over every `test result:` line of a cargo test run.
#[derive(Default, Debug, PartialEq, Eq)]
struct Totals {
    passed: u64,
    failed: u64,
    ignored: u64,
    suites: u64,
}

impl Totals {
    /// `test result: ok. 3 passed; 0 failed; 2 ignored; 0 measured; ...`
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.suites += 1;
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let n = |i: usize| {
                words
                    .get(i)
                    .and_then(|w| w.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            // The first part is "ok. 3 passed" / "FAILED. 3 passed".
            let (count, label) = match words.as_slice() {
                [_, _, label] => (n(1), *label),
                [_, label] => (n(0), *label),
                _ => continue,
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                "ignored" => self.ignored += count,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_add_up_libtest_lines() {
        let mut t = Totals::default();
        t.add_line("test result: ok. 3 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        t.add_line("test result: FAILED. 1 passed; 4 failed; 0 ignored; 0 measured; 1 filtered out; finished in 2.00s");
        t.add_line("running 5 tests");
        assert_eq!(
            t,
            Totals {
                passed: 4,
                failed: 4,
                ignored: 2,
                suites: 2
            }
        );
    }

    #[test]
    fn test_args() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(parse_args(&args(&[])).unwrap(), (false, vec![]));
        assert_eq!(
            parse_args(&args(&["--no-setup", "--", "--test", "e2e"])).unwrap(),
            (true, args(&["--test", "e2e"]))
        );
        assert!(parse_args(&args(&["--bogus"])).is_err());
    }
}
