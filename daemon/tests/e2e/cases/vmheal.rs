//! virtio-fs self-healing (docs/self-healing.md, "The VM door"): one pretend VMM keeps one
//! vhost-user connection open while the engine serving it is killed, hung and upgraded. Every
//! request it sends is answered, by whichever engine serves then; its socket never closes,
//! handles opened before stay valid, a file written across an upgrade lands whole.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context as _, Result};

use super::heal::{heal_status, heal_status_in, wait_generation_in, Heal};
use super::sandbox::wait_for_line;
use crate::mount::{berth_command, Mount, MountOpts};
use crate::util::{random_bytes, tail_file, terminate};
use crate::vmm::Guest;

const TEXT: &[u8] = b"read through every engine";
/// A hang is detected after this (the test's --hang-timeout).
const HANG_TIMEOUT: &str = "2s";

fn store(dir: &Path) -> Result<PathBuf> {
    let src = dir.join("store");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("a.txt"), TEXT)?;
    Ok(src)
}

/// A running standalone `berth share`, stopped (SIGTERM) on drop.
struct Share {
    child: Child,
    socket: PathBuf,
    state: PathBuf,
    log: PathBuf,
}

impl Share {
    fn start(dir: &Path, src: &Path) -> Result<Share> {
        let socket = dir.join("vm/fs.sock");
        let state = dir.join("state");
        let log = dir.join("share.log");
        let mut child = berth_command(dir)
            .arg("share")
            .arg(src)
            .arg("--socket")
            .arg(&socket)
            .arg("--request-queues=1")
            .arg("--state-dir")
            .arg(&state)
            .args(["--hang-timeout", HANG_TIMEOUT])
            // The hang below is to be found by the virtqueue watch, not the heartbeat.
            .args(["--freeze-timeout", "0"])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting berth share")?;
        if let Err(e) = wait_for_line(&mut child, "berth: sharing", Duration::from_secs(30)) {
            terminate(&mut child);
            return Err(e.context(tail_file(&log, 40)));
        }
        Ok(Share {
            child,
            socket,
            state,
            log,
        })
    }

    fn heal(&self) -> Result<Heal> {
        heal_status_in(&self.state)
    }

    /// The engine generation after `before`, once it runs.
    fn next(&self, before: u64) -> Result<Heal> {
        wait_generation_in(&self.state, before, Duration::from_secs(30))
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        terminate(&mut self.child);
        if std::thread::panicking() {
            eprintln!("--- berth share log ---\n{}", tail_file(&self.log, 80));
        }
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) of a process of ours (the share's engine).
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits until every thread of `pid` is stopped: kill(2) returns before a SIGSTOP has taken
/// effect, and a thread still running could take the next request and answer it.
fn wait_stopped(pid: u32) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let all = std::fs::read_dir(format!("/proc/{pid}/task"))?
            .flatten()
            .all(|t| {
                std::fs::read_to_string(t.path().join("stat")).is_ok_and(|stat| {
                    // "tid (comm) S ...": the state follows the last ')'.
                    stat.rsplit(')')
                        .next()
                        .and_then(|r| r.trim_start().chars().next())
                        == Some('T')
                })
            });
        if all {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "engine {pid} did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Reads the whole of `a.txt` through handle `fh` and checks it.
fn read_checked(guest: &mut Guest, node: u64, fh: u64, what: &str) -> Result<Duration> {
    let start = Instant::now();
    let data = guest
        .read_at(node, fh, 0, 1 << 16)
        .with_context(|| format!("a read {what}"))?;
    ensure!(data == TEXT, "a read {what} returned {data:?}");
    Ok(start.elapsed())
}

/// The same guest session across 3 SIGKILLs, a SIGKILL while a request waits, a hang
/// (SIGSTOP) and 2 upgrades: every request answered, no error, one connection throughout.
pub fn standalone_share_survives_engine_deaths() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = store(dir.path())?;
    let share = Share::start(dir.path(), &src)?;
    let result = (|| -> Result<()> {
        let mut guest = Guest::attach(&share.socket)?;
        guest.init()?;
        let node = guest
            .lookup("a.txt")?
            .map_err(|e| anyhow::anyhow!("errno {e}"))?;
        let fh = guest.open(node)?;
        read_checked(&mut guest, node, fh, "before any kill")?;

        let mut stalls = Vec::new();
        for round in 1..=3 {
            let before = share.heal()?;
            signal(before.engine_pid, libc::SIGKILL);
            // Sent at once: it waits in the ring until the successor takes it.
            stalls.push(read_checked(
                &mut guest,
                node,
                fh,
                &format!("after kill {round}"),
            )?);
            let after = share.next(before.generation)?;
            ensure!(after.engine_pid != before.engine_pid, "not replaced");
        }

        // A request queued while the engine is stopped, then the engine is killed: the
        // successor takes it from the ring.
        let before = share.heal()?;
        signal(before.engine_pid, libc::SIGSTOP);
        wait_stopped(before.engine_pid)?;
        let pid = before.engine_pid;
        let killer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            signal(pid, libc::SIGKILL);
        });
        stalls.push(read_checked(&mut guest, node, fh, "queued at a kill")?);
        let _ = killer.join();
        let after = share.next(before.generation)?;

        // A hung engine: found by its queues (requests waiting, none answered) and replaced.
        signal(after.engine_pid, libc::SIGSTOP);
        wait_stopped(after.engine_pid)?;
        guest.patience = Duration::from_secs(30);
        let hung_for = read_checked(&mut guest, node, fh, "through a hung engine")?;
        let healed = share.next(after.generation)?;
        ensure!(
            healed.last_detected_by.as_deref() == Some("virtqueue"),
            "the hang was found by {:?}, not the virtqueue watch",
            healed.last_detected_by
        );
        guest.patience = Duration::from_secs(10);

        // Upgrades: the old engine stops at a request boundary, the new one goes on.
        for _ in 0..2 {
            let before = share.heal()?;
            upgrade(&share.socket, &share.state)?;
            stalls.push(read_checked(&mut guest, node, fh, "after an upgrade")?);
            ensure!(share.heal()?.generation > before.generation);
        }
        // A new file through the successor, byte-exact in the store.
        let data = random_bytes(7, 200_000);
        write_file(&mut guest, "new.bin", &data)?;
        ensure!(
            std::fs::read(src.join("new.bin"))? == data,
            "new.bin differs in the store"
        );
        // The VMM leaves and another comes: a fresh session on the same socket.
        drop(guest);
        let text = Guest::cat(&share.socket, "a.txt").context("a second VMM")?;
        ensure!(text == TEXT, "the second VMM read {text:?}");
        let max = stalls.iter().max().copied().unwrap_or_default();
        eprintln!(
            "vmheal: {} takeovers, max stall {max:?}, hang replaced after {hung_for:?}",
            stalls.len() + 1
        );
        Ok(())
    })();
    if result.is_err() {
        eprintln!("--- berth share log ---\n{}", tail_file(&share.log, 80));
    }
    result
}

/// Writes `data` to a new file `name` in 64 KiB pieces and closes it.
fn write_file(guest: &mut Guest, name: &str, data: &[u8]) -> Result<()> {
    let (node, fh) = guest.create(name)?;
    for (i, piece) in data.chunks(60 << 10).enumerate() {
        guest.write_at(node, fh, (i * (60 << 10)) as u64, piece)?;
    }
    guest.close(node, fh)
}

fn upgrade(target: &Path, state: &Path) -> Result<()> {
    super::heal::upgrade(target, state).map(drop)
}

/// An upgrade while the guest has a file open for writing: the old engine finishes it (the
/// writes after the upgrade began are still its), a file created while it drains is left to
/// the successor; both land whole.
pub fn upgrade_drains_guest_writes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = store(dir.path())?;
    let share = Share::start(dir.path(), &src)?;
    let mut guest = Guest::attach(&share.socket)?;
    guest.init()?;
    let first = random_bytes(1, 100_000);
    let second = random_bytes(2, 100_000);
    let (node, fh) = guest.create("open.bin")?;
    guest.write_at(node, fh, 0, &first)?;
    let before = share.heal()?;
    let (socket, state) = (share.socket.clone(), share.state.clone());
    let upgrader = std::thread::spawn(move || upgrade(&socket, &state));
    // The upgrade has begun (the old engine drains) before the rest is written.
    std::thread::sleep(Duration::from_millis(500));
    guest.write_at(node, fh, first.len() as u64, &second)?;
    guest.close(node, fh)?;
    let late = random_bytes(3, 50_000);
    guest.patience = Duration::from_secs(30);
    write_file(&mut guest, "late.bin", &late)?;
    upgrader
        .join()
        .map_err(|_| anyhow::anyhow!("the upgrade thread panicked"))??;
    ensure!(
        share.heal()?.generation > before.generation,
        "no new engine"
    );
    let stored = std::fs::read(src.join("open.bin"))?;
    ensure!(
        stored.len() == first.len() + second.len()
            && stored[..first.len()] == first[..]
            && stored[first.len()..] == second[..],
        "open.bin differs in the store ({} bytes)",
        stored.len()
    );
    ensure!(
        std::fs::read(src.join("late.bin"))? == late,
        "late.bin differs"
    );
    Ok(())
}

/// A share of a mount (`berth share --mount`): the guest's session survives the mount's
/// engine being killed, and the pods' side keeps reading too.
pub fn mount_share_survives_engine_kill() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = store(dir.path())?;
    let m = Mount::local(&src, MountOpts::default())?;
    let socket = dir.path().join("vm/fs.sock");
    let reply = super::shares::add(&m, &socket)?;
    ensure!(reply.ok, "AddShare failed: {}", reply.message);
    let mut guest = Guest::attach(&socket)?;
    guest.init()?;
    let node = guest
        .lookup("a.txt")?
        .map_err(|e| anyhow::anyhow!("errno {e}"))?;
    let fh = guest.open(node)?;
    read_checked(&mut guest, node, fh, "before the kill")?;
    for round in 1..=2 {
        let before = heal_status(&m)?;
        signal(before.engine_pid, libc::SIGKILL);
        read_checked(&mut guest, node, fh, &format!("after kill {round}"))?;
        super::heal::wait_generation(&m, before.generation, Duration::from_secs(30))?;
        ensure!(std::fs::read(m.join("a.txt"))? == TEXT, "the pods' side");
    }
    let data = random_bytes(9, 70_000);
    write_file(&mut guest, "from-vm.bin", &data)?;
    ensure!(
        std::fs::read(m.join("from-vm.bin"))? == data,
        "the pods see the VM's file"
    );
    drop(guest);
    m.finish()
}
