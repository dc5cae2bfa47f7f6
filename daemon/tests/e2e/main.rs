//! End-to-end tests: the real `berth` binary mounted over FUSE against a real
//! SeaweedFS S3 server (or a local directory), compared byte for byte with
//! what the bucket holds according to the AWS SDK.
//!
//! Requirements are decided at run time: root, an openable `/dev/fuse` and the
//! `weed` binary (`BERTH_WEED_BIN`, `<repo>/.tools/venv/bin/weed` or `PATH`).
//! A test whose requirement is missing is registered as ignored and a line on
//! stderr says why. With `BERTH_E2E_REQUIRE=1` a missing requirement fails the
//! test instead (CI sets it so that a broken machine cannot pass silently).

mod cases;
mod fakes3;
mod mount;
mod proxy;
mod reqs;
mod s3;
mod s3fs;
mod seaweed;
mod util;
mod vmm;

use std::process::ExitCode;
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Completion, Failed, Measurement, Trial};

use crate::reqs::{Needs, Requirements};
use crate::seaweed::Seaweed;

/// The SeaweedFS server shared by every test that does not need its own.
static SHARED: OnceLock<Result<Seaweed, String>> = OnceLock::new();

/// The shared server, or why there is none.
pub fn shared_server() -> anyhow::Result<&'static Seaweed> {
    match SHARED.get() {
        Some(Ok(server)) => Ok(server),
        Some(Err(why)) => anyhow::bail!("shared SeaweedFS server is not available: {why}"),
        None => anyhow::bail!("shared SeaweedFS server was not started (harness bug)"),
    }
}

fn main() -> ExitCode {
    util::sanitize_proxy_env();
    let args = Arguments::from_args();
    let reqs = Requirements::detect();
    let strict = std::env::var("BERTH_E2E_REQUIRE").is_ok_and(|v| v == "1");

    let mut trials = Vec::new();
    let mut wants_shared = false;
    let mut skipped: Vec<(reqs::Missing, usize)> = Vec::new();
    let tests = cases::all()
        .into_iter()
        .map(|case| (case.needs, TrialKind::Test(case.name, case.run)));
    let benches = cases::benches()
        .into_iter()
        .map(|case| (case.needs, TrialKind::Bench(case.name, case.run)));
    for (needs, kind) in tests.chain(benches) {
        let missing = reqs.missing(needs);
        let trial = make_trial(kind, missing.clone(), strict);
        if missing.is_empty() {
            let runs = !args.list && !args.is_filtered_out(&trial) && !args.is_ignored(&trial);
            wants_shared |= runs && needs.contains(Needs::SHARED_SERVER);
        } else {
            for m in missing {
                match skipped.iter_mut().find(|(seen, _)| *seen == m) {
                    Some((_, n)) => *n += 1,
                    None => skipped.push((m, 1)),
                }
            }
        }
        trials.push(trial);
    }
    for (m, n) in &skipped {
        let verb = if strict { "failing" } else { "skipping" };
        eprintln!("e2e: {verb} {n} {} tests: {}", m.kind, m.reason);
    }

    if wants_shared {
        let started = reqs
            .weed_bin()
            .ok_or_else(|| "no weed binary".to_string())
            .and_then(|bin| Seaweed::start(bin, "shared").map_err(|e| format!("{e:#}")));
        if let Err(why) = &started {
            eprintln!("e2e: shared SeaweedFS server failed to start: {why}");
        }
        let _ = SHARED.set(started);
    }

    let conclusion = libtest_mimic::run(&args, trials);

    // Stop the shared server (kill by PID, wait, remove its directory).
    if let Some(Ok(server)) = SHARED.get() {
        server.shutdown();
    }
    conclusion.exit_code()
}

/// A test, or a benchmark that runs as a quick correctness test unless `--bench` is given.
enum TrialKind {
    Test(&'static str, fn() -> anyhow::Result<()>),
    Bench(&'static str, fn(bool) -> anyhow::Result<Option<u64>>),
}

fn make_trial(kind: TrialKind, missing: Vec<reqs::Missing>, strict: bool) -> Trial {
    let name = match kind {
        TrialKind::Test(name, _) | TrialKind::Bench(name, _) => name,
    };
    if missing.is_empty() {
        return match kind {
            TrialKind::Test(_, run) => Trial::test(name, move || {
                run().map_err(|e| Failed::from(format!("{e:#}")))
            }),
            TrialKind::Bench(_, run) => Trial::bench(name, move |test_mode| {
                run(test_mode)
                    .map(|ns| ns.map(|avg| Measurement { avg, variance: 0 }))
                    .map_err(|e| Failed::from(format!("{e:#}")))
            }),
        };
    }
    let why = missing
        .iter()
        .map(|m| m.reason.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    if strict {
        return Trial::test(name, move || {
            Err(Failed::from(format!(
                "requirement missing and BERTH_E2E_REQUIRE=1: {why}"
            )))
        });
    }
    // Ignored by default; if forced to run with --ignored/--include-ignored it
    // still reports itself as ignored rather than failing or passing.
    Trial::ignorable_test(name, move || Ok(Completion::ignored_with(why))).with_ignored_flag(true)
}
