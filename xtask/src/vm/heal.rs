//! vm-test's self-healing scenario: a real guest reads and writes through a share for a
//! minute while the host kills the engine serving it (SIGKILL), hangs it (SIGSTOP; the
//! holder's virtqueue watch replaces it) and upgrades it. The guest's VMM (QEMU, which has no
//! vhost-user reconnect) must never notice: its reads all return the right bytes, the files it
//! creates are in S3 byte-exact.
//!
//! Writes are counted apart from reads: a file open for writing when an engine is SIGKILLed
//! loses its unsent buffer (docs/virtiofs.md, "Limits"), so the guest may see a write error
//! there; it is reported, and what was written without error must be in S3.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::guest::{self, Device};
use super::{BUCKET, SMALL_TEXT};
use crate::seaweed::Seaweed;

/// What the host does to the engine while the guest works.
#[derive(Clone, Copy)]
pub struct Chaos {
    pub kills: u32,
    pub hangs: u32,
    pub upgrades: u32,
}

/// One run: where the share's engine is found, how it is upgraded, what is done to it.
#[derive(Clone)]
pub struct Scenario {
    /// The --state-dir of the holder.
    pub state: PathBuf,
    /// The arguments of the berth command that upgrades the engine: `upgrade SOCKET
    /// --state-dir STATE` for a standalone share, `--socket DAEMON upgrade` through a daemon.
    pub upgrade: Vec<OsString>,
    pub chaos: Chaos,
    /// How long each guest loops.
    pub seconds: u32,
}

/// One guest of a run: its device and the prefix of the files it creates.
pub struct Guest<'a> {
    pub device: &'a Device<'a>,
    pub prefix: &'static str,
}

/// What the guest reported.
#[derive(Debug, Default, PartialEq)]
pub struct Loop {
    pub iterations: u32,
    pub read_errors: u32,
    pub write_errors: u32,
}

/// The guest's loop (busybox sh): for `seconds`, read the large file (sha256, page cache
/// dropped first) and the small one, and create one file; then print the totals.
fn body(sha: &str, prefix: &str, seconds: u32) -> String {
    format!(
        r#"mount -t virtiofs $TAG /mnt || echo "heal-loop: mount failed"
mkdir -p /mnt/{prefix}
now() {{ cut -d . -f 1 /proc/uptime; }}
end=$(( $(now) + {seconds} )); i=0; rerr=0; werr=0
echo "heal: start"
while [ $(now) -lt $end ]; do
  i=$((i+1))
  echo 3 > /proc/sys/vm/drop_caches
  s=$(sha256sum /mnt/data/large.bin | cut -d " " -f 1)
  [ "$s" = {sha} ] || {{ rerr=$((rerr+1)); echo "heal-loop: read of large.bin failed at $i ($s)"; }}
  [ "$(cat /mnt/data/small.txt)" = "{SMALL_TEXT}" ] || {{ rerr=$((rerr+1)); echo "heal-loop: read of small.txt failed at $i"; }}
  echo "file $i" > /mnt/{prefix}/f$i.txt || {{ werr=$((werr+1)); echo "heal-loop: write of f$i failed"; }}
done
echo "heal: done"
echo "heal-loop: $i iterations, $rerr read errors, $werr write errors"
umount /mnt"#
    )
}

/// Reads `heal-loop: N iterations, R read errors, W write errors`.
fn parse(lines: &[String]) -> Option<Loop> {
    let line = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("heal-loop: ") && l.contains("iterations"))?;
    let numbers: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    match numbers[..] {
        [iterations, read_errors, write_errors] => Some(Loop {
            iterations,
            read_errors,
            write_errors,
        }),
        _ => None,
    }
}

/// The engine's pid and generation from the holder's status file under `state`.
pub fn engine(state: &Path) -> Result<(u32, u64)> {
    let dir = state.join("mounts");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path().join("status.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&text)?;
        if let (Some(pid), Some(generation)) =
            (v["engine_pid"].as_u64(), v["engine_generation"].as_u64())
        {
            return Ok((pid as u32, generation));
        }
    }
    bail!("no engine status under {}", dir.display())
}

/// Waits for an engine generation after `after` that runs.
fn next_engine(state: &Path, after: u64) -> Result<(u32, u64)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((pid, generation)) = engine(state) {
            // SAFETY: signal 0 only checks that the process exists.
            if generation > after && unsafe { libc::kill(pid as i32, 0) } == 0 {
                return Ok((pid, generation));
            }
        }
        if Instant::now() > deadline {
            bail!("no engine generation after {after} within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The host's side: `chaos` against the engine, a few seconds apart, until done or `stop`.
fn torment(bin: &Path, target: &Scenario, stop: &AtomicBool) -> Result<Vec<String>> {
    let chaos = target.chaos;
    let pause = || std::thread::sleep(Duration::from_secs(3));
    let mut done = Vec::new();
    let mut steps: Vec<&str> = Vec::new();
    for i in 0..chaos.kills.max(chaos.upgrades).max(chaos.hangs) {
        if i < chaos.kills {
            steps.push("kill");
        }
        if i < chaos.upgrades {
            steps.push("upgrade");
        }
        if i < chaos.hangs {
            steps.push("hang");
        }
    }
    for step in steps {
        pause();
        if stop.load(Ordering::Acquire) {
            break;
        }
        let (pid, generation) = engine(&target.state)?;
        let started = Instant::now();
        match step {
            // SAFETY: plain kill(2) of the share's engine.
            "kill" => unsafe { libc::kill(pid as i32, libc::SIGKILL) },
            // SAFETY: as above; the holder finds it hung and kills it.
            "hang" => unsafe { libc::kill(pid as i32, libc::SIGSTOP) },
            _ => {
                let out = Command::new(bin).args(&target.upgrade).output()?;
                if !out.status.success() {
                    bail!(
                        "berth upgrade failed: {}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                0
            }
        };
        next_engine(&target.state, generation)?;
        let line = format!(
            "{step} of generation {generation}: replaced in {:.0?}",
            started.elapsed()
        );
        println!("vm-test: host: {line}");
        done.push(line);
    }
    Ok(done)
}

/// Boots one guest per entry of `guests` at once, each looping for `seconds` while the
/// host does `chaos` to the engine they share, then checks what each saw and wrote; `host`
/// records each check.
pub fn run(
    bin: &Path,
    work: &Path,
    s3: &Seaweed,
    guests: &[Guest],
    target: &Scenario,
    sha: &str,
    host: &mut dyn FnMut(&str, bool, String),
) -> Result<()> {
    let (chaos, seconds) = (target.chaos, target.seconds);
    let started = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let deadline = Duration::from_secs(u64::from(seconds) + 240);
    let (done, consoles) = std::thread::scope(|scope| {
        // The chaos starts when the first guest starts its loop, and ends when all are done.
        let tormentor = scope.spawn(|| {
            while !started.load(Ordering::Acquire) {
                if stop.load(Ordering::Acquire) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(torment(bin, target, &stop))
        });
        let running: Vec<_> = guests
            .iter()
            .map(|g| {
                let started = &started;
                scope.spawn(move || {
                    guest::boot_watching(
                        work,
                        g.device,
                        &body(sha, g.prefix, seconds),
                        &[],
                        deadline,
                        &mut |line| {
                            if line == "heal: start" {
                                started.store(true, Ordering::Release);
                            }
                        },
                    )
                })
            })
            .collect();
        let consoles: Vec<Result<Vec<String>>> = running
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| bail!("the guest's thread panicked"))
            })
            .collect();
        stop.store(true, Ordering::Release);
        (tormentor.join().ok().flatten(), consoles)
    });
    let planned = chaos.kills + chaos.hangs + chaos.upgrades;
    let prefixes: Vec<&str> = guests.iter().map(|g| g.prefix).collect();
    let who = prefixes.join(", ");
    match done {
        Some(Ok(done)) => host(
            &format!("{planned} engine replacements while the guests work ({who})"),
            done.len() as u32 == planned,
            format!(
                "only {} of {planned} done before the guests finished",
                done.len()
            ),
        ),
        Some(Err(e)) => host("engine replacements", false, format!("{e:#}")),
        None => host(
            "engine replacements",
            false,
            "no guest started its loop".into(),
        ),
    }
    for (g, console) in guests.iter().zip(consoles) {
        check_guest(s3, g.prefix, &console?, host)?;
    }
    Ok(())
}

/// What one guest saw (its totals line) and wrote (its files in S3, byte-exact).
fn check_guest(
    s3: &Seaweed,
    prefix: &str,
    lines: &[String],
    host: &mut dyn FnMut(&str, bool, String),
) -> Result<()> {
    let Some(seen) = parse(lines) else {
        host(
            &format!("the guest's loop finished ({prefix})"),
            false,
            "no totals line".into(),
        );
        return Ok(());
    };
    println!(
        "vm-test: heal ({prefix}): {} iterations, {} read errors, {} write errors",
        seen.iterations, seen.read_errors, seen.write_errors
    );
    host(
        &format!("0 read errors in the guest across the replacements ({prefix})"),
        seen.read_errors == 0 && seen.iterations > 0,
        format!("{seen:?}"),
    );
    // Every file written without error is in S3, byte-exact.
    let mut wrong = Vec::new();
    let mut missing = 0;
    for i in 1..=seen.iterations {
        let key = format!("{prefix}/f{i}.txt");
        match s3.get(BUCKET, &key)? {
            Some(body) if body == format!("file {i}\n").as_bytes() => {}
            Some(body) => wrong.push(format!("{key}: {:?}", String::from_utf8_lossy(&body))),
            None => missing += 1,
        }
    }
    println!(
        "vm-test: heal ({prefix}): {} files in S3, {missing} missing, {} wrong; the guest saw {} write errors",
        seen.iterations - missing - wrong.len() as u32,
        wrong.len(),
        seen.write_errors
    );
    host(
        &format!("the guest's files are in S3 byte-exact ({prefix})"),
        wrong.is_empty() && missing <= seen.write_errors,
        format!(
            "{missing} missing (write errors {}), wrong: {wrong:?}",
            seen.write_errors
        ),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_totals_are_read_from_its_last_line() {
        let lines: Vec<String> = [
            "heal-loop: read of small.txt failed at 3",
            "heal-loop: 41 iterations, 1 read errors, 2 write errors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            parse(&lines),
            Some(Loop {
                iterations: 41,
                read_errors: 1,
                write_errors: 2
            })
        );
        assert_eq!(parse(&lines[..1]), None);
    }
}
