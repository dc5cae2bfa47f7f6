//! `cargo xtask bench recovery --virtiofs [--kills N]`: what a real guest sees when the
//! engine serving its virtio-fs share is killed (SIGKILL, N times, default 20) and upgraded
//! (3 times). A QEMU guest (TCG) mounts a standalone `berth share` of a local directory and
//! loops: a LOOKUP of a new name and an OPEN/READ/RELEASE of a small file, timed on the
//! guest's clock (/proc/uptime, 10 ms steps); an operation that takes 30 ms or more is
//! printed on the console. The host stamps each such line as it arrives and charges it to
//! the kill or upgrade before it (within 1 s); a replacement with no slow line stalled the
//! guest less than 30 ms. Printed: guest stalls p50/p99/max per kind, guest errors, and the
//! slow operations with no replacement near them (TCG's own noise).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::berth;
use crate::sh::{repo_root, Reaped};
use crate::vm::guest::{self, Device};
use crate::vm::heal::engine;

/// Slower than this is printed by the guest (its clock steps by 10 ms).
const SLOW_MS: u32 = 30;
/// A slow operation this soon after a replacement is charged to it.
const WINDOW: Duration = Duration::from_secs(1);
const BETWEEN: Duration = Duration::from_millis(2500);
const UPGRADES: usize = 3;

/// One replacement: what and when (host clock).
struct Event {
    upgrade: bool,
    at: Instant,
}

pub fn run(kills: usize) -> Result<()> {
    let missing = guest::missing();
    if !missing.is_empty() {
        println!(
            "bench recovery --virtiofs: SKIPPED; missing: {}",
            missing.join("; ")
        );
        return Ok(());
    }
    let bin = berth::binary()?;
    let work = repo_root().join("target").join("bench-vm-recovery");
    let _ = std::fs::remove_dir_all(&work);
    let src = work.join("src");
    std::fs::create_dir_all(src.join("data"))?;
    std::fs::write(src.join("data/small.txt"), b"small\n")?;
    let socket = work.join("vfs.sock");
    let state = work.join("state");
    let _share = share(&bin, &work, &src, &socket, &state)?;

    let body = format!(
        r#"cs() {{ read u _ < /proc/uptime; echo "${{u%.*}}${{u#*.}}"; }}
mount -t virtiofs $TAG /mnt || echo "bench: mount failed"
echo "bench: start"
i=0
while [ ! -e /mnt/stop ]; do
  i=$((i+1)); a=$(cs)
  [ -e /mnt/data/none-$i ] && echo "bench: error: none-$i exists"
  cat /mnt/data/small.txt > /dev/null || echo "bench: error: read $i failed"
  b=$(cs); d=$(( (b - a) * 10 ))
  [ $d -ge {SLOW_MS} ] && echo "bench: slow $d"
done
echo "bench: $i operations"
umount /mnt"#
    );
    let device = Device {
        socket: &socket,
        tag: "berth",
        queues: 1,
        reconnect: 0,
    };
    let events: Arc<Mutex<Vec<Event>>> = Arc::default();
    let slow: Arc<Mutex<Vec<(Instant, u32)>>> = Arc::default();
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let failure: Arc<Mutex<Option<String>>> = Arc::default();
    let started = AtomicBool::new(false);
    let mut tormentor = None;
    let mut on_line = |line: &str| {
        let now = Instant::now();
        if let Some(ms) = line.strip_prefix("bench: slow ") {
            if let Ok(ms) = ms.trim().parse() {
                slow.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((now, ms));
            }
        } else if line.starts_with("bench: error") {
            errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.to_string());
        } else if line == "bench: start" && !started.swap(true, Ordering::AcqRel) {
            let (bin, state, socket, src) =
                (bin.clone(), state.clone(), socket.clone(), src.clone());
            let (events, failure) = (events.clone(), failure.clone());
            tormentor = Some(std::thread::spawn(move || {
                let result = torment(&bin, &state, &socket, kills, &events);
                if let Err(e) = result {
                    *failure.lock().unwrap_or_else(|e| e.into_inner()) = Some(format!("{e:#}"));
                }
                // The guest's loop ends when it sees this file.
                let _ = std::fs::write(src.join("stop"), b"");
            }));
        }
    };
    let deadline = Duration::from_secs(600);
    let lines = guest::boot_watching(&work, &device, &body, &[], deadline, &mut on_line);
    if let Some(t) = tormentor {
        let _ = t.join();
    }
    let _ = std::fs::write(src.join("stop"), b"");
    let lines = lines?;
    if let Some(e) = failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
        bail!("replacing the engine failed: {e}");
    }
    let ops = lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("bench: ")
                .and_then(|r| r.strip_suffix(" operations"))
        })
        .unwrap_or("?")
        .to_string();
    let events = events.lock().unwrap_or_else(|e| e.into_inner());
    let slow = slow.lock().unwrap_or_else(|e| e.into_inner());
    let errors = errors.lock().unwrap_or_else(|e| e.into_inner());
    let (kill_stalls, upgrade_stalls, unexplained) = charge(&events, &slow);
    println!(
        "bench recovery --virtiofs: a QEMU (TCG) guest, {ops} operations, {} guest errors",
        errors.len()
    );
    for e in errors.iter().take(5) {
        println!("  {e}");
    }
    for (what, stalls) in [("SIGKILL", &kill_stalls), ("upgrade", &upgrade_stalls)] {
        println!(
            "  {what:<8} x{:<3} guest stall p50 {}, p99 {}, max {}",
            stalls.len(),
            shown(percentile(stalls, 50)),
            shown(percentile(stalls, 99)),
            shown(stalls.iter().max().copied()),
        );
    }
    println!(
        "  slow operations (>= {SLOW_MS} ms) with no replacement within {WINDOW:?} before: {} (max {})",
        unexplained.len(),
        shown(unexplained.iter().max().copied())
    );
    if !errors.is_empty() {
        bail!("the guest saw {} errors", errors.len());
    }
    Ok(())
}

/// Each replacement's stall: the longest slow operation after it and before the next one
/// (within [`WINDOW`]); 0 if none. And the slow operations no replacement explains.
fn charge(events: &[Event], slow: &[(Instant, u32)]) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (mut kills, mut upgrades, mut unexplained) = (Vec::new(), Vec::new(), Vec::new());
    let mut worst = vec![0u32; events.len()];
    for &(at, ms) in slow {
        let owner = events.iter().rposition(|e| {
            e.at <= at && at.duration_since(e.at) < WINDOW + Duration::from_millis(u64::from(ms))
        });
        match owner {
            Some(i) => worst[i] = worst[i].max(ms),
            None => unexplained.push(ms),
        }
    }
    for (e, ms) in events.iter().zip(worst) {
        if e.upgrade {
            upgrades.push(ms);
        } else {
            kills.push(ms);
        }
    }
    (kills, upgrades, unexplained)
}

fn percentile(values: &[u32], p: usize) -> Option<u32> {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let i = (sorted.len() * p).div_ceil(100).saturating_sub(1);
    sorted.get(i).copied()
}

fn shown(ms: Option<u32>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < SLOW_MS => format!("< {SLOW_MS} ms"),
        Some(ms) => format!("{ms} ms"),
    }
}

/// Kills the engine `kills` times, then upgrades it [`UPGRADES`] times, waiting for each
/// successor, and records when.
fn torment(
    bin: &Path,
    state: &Path,
    socket: &Path,
    kills: usize,
    events: &Mutex<Vec<Event>>,
) -> Result<()> {
    for step in 0..kills + UPGRADES {
        std::thread::sleep(BETWEEN);
        let (pid, generation) = engine(state)?;
        let upgrade = step >= kills;
        events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Event {
                upgrade,
                at: Instant::now(),
            });
        if upgrade {
            let out = Command::new(bin)
                .arg("upgrade")
                .arg(socket)
                .arg("--state-dir")
                .arg(state)
                .output()?;
            if !out.status.success() {
                bail!("berth upgrade: {}", String::from_utf8_lossy(&out.stderr));
            }
        } else {
            // SAFETY: plain kill(2) of the share's engine.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while engine(state).map(|(_, g)| g).unwrap_or(generation) <= generation {
            if Instant::now() > deadline {
                bail!("no successor of engine generation {generation} within 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// `berth share SRC` on `socket`, waited for; killed when the guard drops.
fn share(bin: &Path, work: &Path, src: &Path, socket: &Path, state: &Path) -> Result<Reaped> {
    let log = std::fs::File::create(work.join("berth-share.log"))?;
    let mut child = Command::new(bin)
        .arg("share")
        .arg(src)
        .arg("--socket")
        .arg(socket)
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "berth=info,warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .context("starting berth share")?;
    let stdout = child.stdout.take().context("berth stdout")?;
    let guard = Reaped(Some(child));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("berth: sharing") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .context("berth share did not start sharing within 60 s (see berth-share.log)")?;
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_operations_are_charged_to_the_replacement_before_them() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let events = [
            Event {
                upgrade: false,
                at: at(1000),
            },
            Event {
                upgrade: false,
                at: at(3000),
            },
            Event {
                upgrade: true,
                at: at(6000),
            },
        ];
        let slow = [
            (at(500), 40),
            (at(1100), 60),
            (at(1200), 90),
            (at(6500), 300),
            (at(12000), 50),
        ];
        let (kills, upgrades, unexplained) = charge(&events, &slow);
        assert_eq!(kills, [90, 0]);
        assert_eq!(upgrades, [300]);
        assert_eq!(unexplained, [40, 50]);
        assert_eq!(percentile(&[5, 1, 3], 50), Some(3));
        assert_eq!(percentile(&[], 99), None);
        assert_eq!(shown(Some(0)), format!("< {SLOW_MS} ms"));
    }
}
