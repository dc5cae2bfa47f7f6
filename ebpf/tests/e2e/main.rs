//! End-to-end tests of berth-ebpf: real programs in the running kernel, real
//! processes killed, real FUSE mounts (a hand-written server that stops
//! answering), real fusectl aborts.
//!
//! Requirements are checked at run time: root, kernel BTF, the programs built
//! (clang present at build time) and, for the FUSE cases, /dev/fuse. A missing
//! requirement marks the test ignored with the reason; with
//! `BERTH_E2E_REQUIRE=1` (CI) it fails the test instead.
//! Tests run one at a time: the connection-id reuse case needs the id the
//! previous mount freed.

mod cases;
mod child;
mod rawfuse;

use std::process::ExitCode;

use libtest_mimic::{Arguments, Completion, Failed, Measurement, Trial};

/// What a case needs from the machine.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// Root, BTF, programs built.
    Ebpf,
    /// All of `Ebpf` plus /dev/fuse.
    EbpfFuse,
}

pub struct Case {
    pub name: &'static str,
    pub needs: Needs,
    pub run: Run,
}

pub enum Run {
    Test(fn() -> anyhow::Result<()>),
    /// A benchmark: prints its figures; quick (a correctness run) unless
    /// `--bench`, where it returns the main figure in ns.
    Bench(fn(bool) -> anyhow::Result<Option<u64>>),
}

fn main() -> ExitCode {
    child::run_if_child();
    let mut args = Arguments::from_args();
    args.test_threads.get_or_insert(1);
    let strict = std::env::var("BERTH_E2E_REQUIRE").is_ok_and(|v| v == "1");
    let trials = cases::all()
        .into_iter()
        .map(|case| trial(case, strict))
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}

fn trial(case: Case, strict: bool) -> Trial {
    let missing = missing(case.needs);
    if missing.is_empty() {
        return match case.run {
            Run::Test(run) => Trial::test(case.name, move || {
                run().map_err(|e| Failed::from(format!("{e:#}")))
            }),
            Run::Bench(run) => Trial::bench(case.name, move |test_mode| {
                run(test_mode)
                    .map(|ns| ns.map(|avg| Measurement { avg, variance: 0 }))
                    .map_err(|e| Failed::from(format!("{e:#}")))
            }),
        };
    }
    let why = missing.join("; ");
    if strict {
        return Trial::test(case.name, move || {
            Err(Failed::from(format!(
                "requirement missing and BERTH_E2E_REQUIRE=1: {why}"
            )))
        });
    }
    eprintln!("e2e: skipping {}: {why}", case.name);
    Trial::ignorable_test(case.name, move || Ok(Completion::ignored_with(why)))
        .with_ignored_flag(true)
}

/// Why this machine cannot run a case that needs `needs` (empty: it can).
fn missing(needs: Needs) -> Vec<String> {
    let mut out = Vec::new();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        out.push(format!("not running as root (euid {euid})"));
    }
    if let Err(e) = std::fs::File::open("/sys/kernel/btf/vmlinux") {
        out.push(format!("no kernel BTF at /sys/kernel/btf/vmlinux: {e}"));
    }
    if !berth_ebpf::programs_built() {
        out.push("berth-ebpf was built without eBPF programs (clang was missing)".into());
    }
    if needs == Needs::EbpfFuse {
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            out.push(format!("/dev/fuse cannot be opened: {e}"));
        }
    }
    out
}
