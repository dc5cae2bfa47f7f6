//! `berth mount` that cannot work must say so on one line and exit, fast.

use std::time::Duration;

use anyhow::{ensure, Result};

use crate::mount::{run_expect_exit, s3_args, FailedRun};
use crate::shared_server;

const LIMIT: Duration = Duration::from_secs(30);

/// Non-zero exit (not a signal), exactly one non-empty line on stderr, never
/// reported as mounted.
fn ensure_clean_failure(what: &str, run: &FailedRun) -> Result<()> {
    let code = run.status.code();
    ensure!(
        code.is_some_and(|c| c != 0),
        "{what}: want a non-zero exit code, got {} after {:.1?}",
        run.status,
        run.elapsed
    );
    ensure!(
        !run.stdout.contains("berth: mounted "),
        "{what}: berth claimed to be mounted: {}",
        run.stdout
    );
    let lines: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    ensure!(
        lines.len() == 1,
        "{what}: want a one-line error on stderr, got {} lines:\n{}",
        lines.len(),
        run.stderr
    );
    eprintln!(
        "e2e: {what}: {} after {:.1?}: {}",
        run.status, run.elapsed, lines[0]
    );
    Ok(())
}

pub fn no_such_bucket() -> Result<()> {
    let server = shared_server()?;
    let name = crate::util::unique_name("missing");
    let run = run_expect_exit(&s3_args(&server.endpoint(), &name, None), &[], LIMIT)?;
    ensure_clean_failure("non-existent bucket", &run)
}

pub fn wrong_credentials() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("creds")?;
    bucket.put("x", b"x".to_vec())?;
    let run = run_expect_exit(
        &s3_args(&server.endpoint(), &bucket.name, None),
        &[("AWS_SECRET_ACCESS_KEY", "definitely-not-the-secret")],
        LIMIT,
    )?;
    ensure_clean_failure("wrong credentials", &run)
}

pub fn unreachable_endpoint() -> Result<()> {
    let args: Vec<String> = [
        "s3://unreachable",
        "--endpoint-url",
        "http://127.0.0.1:1",
        "--region",
        "us-east-1",
    ]
    .map(String::from)
    .to_vec();
    let run = run_expect_exit(&args, &[], LIMIT)?;
    ensure_clean_failure("unreachable endpoint", &run)
}

pub fn bad_flag() -> Result<()> {
    let args: Vec<String> = ["s3://whatever", "--memory-limit", "banana"]
        .map(String::from)
        .to_vec();
    let run = run_expect_exit(&args, &[], LIMIT)?;
    ensure!(
        run.status.code() == Some(2),
        "--memory-limit banana: want exit code 2 (usage error), got {}; stderr:\n{}",
        run.status,
        run.stderr
    );
    Ok(())
}
