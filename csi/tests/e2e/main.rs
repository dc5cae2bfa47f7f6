//! berth-csi end to end, as root, with real mounts: the real `berth daemon` and `berth-csi`
//! binaries, a real SeaweedFS, FUSE, bind mounts, and another mount namespace.
//!
//! Requirements (root, /dev/fuse, `weed`, `unshare`, the `berth` binary built next to this
//! test) are checked at run time: a missing one marks the test ignored with the reason, or
//! fails it when BERTH_E2E_REQUIRE=1 (CI).

// Fixtures shared with the daemon's e2e tests (SeaweedFS, S3 client, requirements).
#[allow(dead_code)]
#[path = "../../../daemon/tests/e2e/reqs.rs"]
mod reqs;
#[allow(dead_code)]
#[path = "../../../daemon/tests/e2e/s3.rs"]
mod s3;
#[allow(dead_code)]
#[path = "../../../daemon/tests/e2e/seaweed.rs"]
mod seaweed;
#[allow(dead_code)]
#[path = "../../../daemon/tests/e2e/util.rs"]
mod util;

mod cases;
mod fixture;
mod guard;
mod kata;
mod sanity;

use std::process::ExitCode;
use std::sync::OnceLock;

use libtest_mimic::{Arguments, Completion, Failed, Trial};

use crate::reqs::{Needs, Requirements};
use crate::seaweed::Seaweed;

static SHARED: OnceLock<Result<Seaweed, String>> = OnceLock::new();

pub fn server() -> anyhow::Result<&'static Seaweed> {
    match SHARED.get() {
        Some(Ok(s)) => Ok(s),
        Some(Err(why)) => anyhow::bail!("SeaweedFS is not available: {why}"),
        None => anyhow::bail!("SeaweedFS was not started (harness bug)"),
    }
}

fn main() -> ExitCode {
    util::sanitize_proxy_env();
    let args = Arguments::from_args();
    let reqs = Requirements::detect();
    let strict = std::env::var("BERTH_E2E_REQUIRE").is_ok_and(|v| v == "1");
    let extra = fixture::missing_binaries();
    let mut trials = Vec::new();
    let mut wants_server = false;
    for case in cases::all()
        .into_iter()
        .chain(sanity::all())
        .chain(kata::all())
        .chain(guard::all())
    {
        let mut missing: Vec<String> = reqs
            .missing(case.needs)
            .into_iter()
            .map(|m| m.reason)
            .collect();
        missing.extend(extra.iter().cloned());
        if missing.is_empty() {
            let trial = Trial::test(case.name, move || {
                (case.run)().map_err(|e| Failed::from(format!("{e:#}")))
            });
            wants_server |= !args.list && !args.is_filtered_out(&trial);
            trials.push(trial);
            continue;
        }
        let why = missing.join("; ");
        eprintln!(
            "csi-e2e: {} {}: {why}",
            if strict { "failing" } else { "skipping" },
            case.name
        );
        trials.push(if strict {
            Trial::test(case.name, move || {
                Err(Failed::from(format!(
                    "requirement missing and BERTH_E2E_REQUIRE=1: {why}"
                )))
            })
        } else {
            Trial::ignorable_test(case.name, move || Ok(Completion::ignored_with(why)))
                .with_ignored_flag(true)
        });
    }
    if wants_server {
        let started = reqs
            .weed_bin()
            .ok_or_else(|| "no weed binary".to_string())
            .and_then(|bin| Seaweed::start(bin, "csi").map_err(|e| format!("{e:#}")));
        let _ = SHARED.set(started);
    }
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(Ok(s)) = SHARED.get() {
        s.shutdown();
    }
    conclusion.exit_code()
}

pub use reqs::Needs as TestNeeds;
const _: Needs = Needs::NOTHING;
