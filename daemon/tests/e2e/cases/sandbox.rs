//! The sandbox of the processes that parse guest input (docs/virtiofs.md, "Sandbox"):
//! engines (a mount's, a standalone `berth share`'s) run with few capabilities, no_new_privs
//! and a seccomp allowlist; a forbidden syscall kills only the engine, which its holder
//! replaces; `--sandbox off` switches it all off; the holder is never sandboxed.

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};

use super::heal::{heal_status, heal_status_in, wait_for_kind};
use crate::mount::{berth_command, Mount, MountOpts};
use crate::util::{tail_file, terminate};
use crate::vmm::Guest;

/// FUSE_READ: the fault injection fires on the first read, after INIT and the lookups.
const FUSE_READ: &str = "15";
/// CAP_DAC_OVERRIDE | CAP_DAC_READ_SEARCH | CAP_FOWNER: what an engine keeps.
const ENGINE_CAPS: u64 = 0b1110;
const TEXT: &[u8] = b"read through the sandbox";

/// What /proc/PID/status says about a process's confinement.
#[derive(Debug)]
struct Confinement {
    seccomp: u32,
    no_new_privs: u32,
    effective: u64,
    permitted: u64,
    inheritable: u64,
    bounding: u64,
    ambient: u64,
}

fn confinement(pid: u32) -> Result<Confinement> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let field = |name: &str| -> Result<&str> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .with_context(|| format!("{path} has no {name}"))
    };
    let hex = |name: &str| -> Result<u64> { Ok(u64::from_str_radix(field(name)?, 16)?) };
    Ok(Confinement {
        seccomp: field("Seccomp")?.parse()?,
        no_new_privs: field("NoNewPrivs")?.parse()?,
        effective: hex("CapEff")?,
        permitted: hex("CapPrm")?,
        inheritable: hex("CapInh")?,
        bounding: hex("CapBnd")?,
        ambient: hex("CapAmb")?,
    })
}

/// A sandboxed process: seccomp filter mode, no_new_privs, only `caps`, bounding set too.
fn expect_sandboxed(what: &str, pid: u32, caps: u64) -> Result<()> {
    let c = confinement(pid)?;
    ensure!(
        c.seccomp == 2 && c.no_new_privs == 1,
        "{what} (pid {pid}) is not confined: {c:?}"
    );
    ensure!(
        c.effective == caps
            && c.permitted == caps
            && c.bounding == caps
            && c.inheritable == 0
            && c.ambient == 0,
        "{what} (pid {pid}) has capabilities {c:x?}, want {caps:#x}"
    );
    Ok(())
}

fn expect_unsandboxed(what: &str, pid: u32) -> Result<()> {
    let c = confinement(pid)?;
    ensure!(
        c.seccomp == 0 && c.no_new_privs == 0,
        "{what} (pid {pid}) is confined: {c:?}"
    );
    ensure!(
        c.effective & (1 << 21) != 0,
        "{what} (pid {pid}) lost CAP_SYS_ADMIN: {c:x?}"
    );
    Ok(())
}

fn store(dir: &Path) -> Result<std::path::PathBuf> {
    let src = dir.join("store");
    std::fs::create_dir_all(src.join("data"))?;
    std::fs::write(src.join("data/a.txt"), TEXT)?;
    std::fs::write(src.join("a.txt"), TEXT)?;
    Ok(src)
}

/// The first engine calls mount(2) when it reads its first FUSE_READ: the kernel kills it
/// with SIGSYS, the holder starts a successor, and the application's read succeeds.
pub fn forbidden_syscall_kills_only_the_engine() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = store(dir.path())?;
    let m = Mount::local(
        &src,
        MountOpts {
            env: vec![("BERTH_FAULT_FORBIDDEN_SYSCALL".into(), FUSE_READ.into())],
            ..MountOpts::flags(&["--no-ebpf"])
        },
    )?;
    let first = heal_status(&m)?;
    expect_sandboxed("the first engine", first.engine_pid, ENGINE_CAPS)?;
    expect_unsandboxed("the holder", m.pid() as u32)?;

    let text = std::fs::read(m.join("data/a.txt")).context("reading through the mount")?;
    ensure!(text == TEXT, "read {text:?}");
    let after = wait_for_kind(&m, "takeover", Duration::from_secs(20))?;
    ensure!(
        after.recoveries == 1 && after.generation == 2,
        "the engine should have been replaced once: {after:?}"
    );
    ensure!(
        after.engine_pid != first.engine_pid,
        "same engine: {after:?}"
    );
    let log = m.log();
    ensure!(
        log.contains("fault injection: calling mount(2)"),
        "the fault was not injected"
    );
    ensure!(
        log.contains("SIGSYS"),
        "the holder did not see the engine die of SIGSYS:\n{}",
        log.lines()
            .filter(|l| l.contains("engine"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    ensure!(
        !log.contains("this process is not sandboxed"),
        "mount(2) returned to the engine"
    );
    // The successor is sandboxed too, and serves.
    expect_sandboxed("the successor", after.engine_pid, ENGINE_CAPS)?;
    ensure!(std::fs::read(m.join("a.txt"))? == TEXT);
    m.finish()
}

/// `--sandbox off`: the same fault does not kill (mount(2) just fails), nothing is confined.
pub fn off_leaves_the_engine_unconfined() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = store(dir.path())?;
    let m = Mount::local(
        &src,
        MountOpts {
            env: vec![("BERTH_FAULT_FORBIDDEN_SYSCALL".into(), FUSE_READ.into())],
            ..MountOpts::flags(&["--no-ebpf", "--sandbox", "off"])
        },
    )?;
    let engine = heal_status(&m)?;
    expect_unsandboxed("the engine", engine.engine_pid)?;
    ensure!(std::fs::read(m.join("data/a.txt"))? == TEXT);
    std::thread::sleep(Duration::from_millis(300));
    let after = heal_status(&m)?;
    ensure!(
        after.recoveries == 0 && after.engine_pid == engine.engine_pid,
        "the engine was replaced: {after:?}"
    );
    ensure!(
        m.log().contains("this process is not sandboxed"),
        "the fault injection did not report that mount(2) returned"
    );
    m.finish()
}

/// A share of a mount: its sandboxed engine serves a guest's FUSE requests (descriptor
/// chains in guest memory), before and after a takeover.
pub fn mount_engine_serves_a_guest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = store(dir.path())?;
    let m = Mount::local(&src, MountOpts::default())?;
    let socket = dir.path().join("vm/fs.sock");
    let reply = super::shares::add(&m, &socket)?;
    ensure!(reply.ok, "AddShare failed: {}", reply.message);
    let engine = heal_status(&m)?;
    expect_sandboxed("the engine", engine.engine_pid, ENGINE_CAPS)?;
    let text = Guest::cat(&socket, "a.txt").context("a guest reading through the share")?;
    ensure!(text == TEXT, "the guest read {text:?}");
    // Another VMM after the first left; the pods' side did not notice.
    let text = Guest::cat(&socket, "a.txt").context("a second guest")?;
    ensure!(text == TEXT, "the second guest read {text:?}");
    ensure!(std::fs::read(m.join("a.txt"))? == TEXT);
    let after = heal_status(&m)?;
    ensure!(
        after.recoveries == 0,
        "the engine died serving the guest: {after:?}\n{}",
        m.log()
    );
    m.finish()
}

/// A standalone `berth share`: its holder (not sandboxed: it never reads a guest request)
/// keeps the socket, its sandboxed engine serves a guest, then the next one, and the share
/// stops cleanly on SIGTERM (the engine's shutdown runs in the sandbox too).
pub fn standalone_share_serves_a_guest() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = store(dir.path())?;
    let socket = dir.path().join("vm/fs.sock");
    let log = dir.path().join("share.log");
    let mut child = berth_command(dir.path())
        .arg("share")
        .arg(&src)
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting berth share")?;
    let result = (|| -> Result<()> {
        wait_for_line(&mut child, "berth: sharing", Duration::from_secs(30))?;
        expect_unsandboxed("the share's holder", child.id())?;
        let engine = heal_status_in(&dir.path().join("state"))?;
        expect_sandboxed("the share's engine", engine.engine_pid, ENGINE_CAPS)?;
        for round in ["first", "second"] {
            let text =
                Guest::cat(&socket, "a.txt").with_context(|| format!("the {round} guest"))?;
            ensure!(text == TEXT, "the {round} guest read {text:?}");
        }
        // SAFETY: plain kill(2) of our child, not reaped yet.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "berth share did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        ensure!(status.success(), "berth share ended with {status}");
        ensure!(!socket.exists(), "the socket outlived the share");
        Ok(())
    })();
    if result.is_err() {
        terminate(&mut child);
        eprintln!("--- berth share log ---\n{}", tail_file(&log, 80));
    }
    result
}

pub(super) fn wait_for_line(child: &mut Child, want: &str, limit: Duration) -> Result<()> {
    let stdout = child.stdout.take().context("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(line) if line.starts_with(want) => return Ok(()),
            Ok(_) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("exited before {want:?}"),
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                bail!("no {want:?} within {limit:?}")
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
}
