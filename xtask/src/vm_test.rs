//! `cargo xtask vm-test`: a real guest mounts a berth share over virtio-fs.
//!
//! SeaweedFS on loopback holds a bucket; `berth share` serves it on a vhost-user socket;
//! QEMU (TCG) boots Debian's cloud kernel with a busybox initramfs whose init mounts the
//! share and runs the checks. The host then checks that the file the guest wrote is in S3,
//! and boots a second guest on the same socket (the share must serve the next VMM).
//! Prints `vm-test: N passed, M failed`; fails if any check failed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::guest::{self, Reaped};
use crate::locals3::{LocalS3, NO_PROXY};
use crate::{cargo, repo_root, run_cmd, weed_bin};

const BUCKET: &str = "vmtest";
const TAG: &str = "berth";
const LARGE_SIZE: usize = 32 << 20;
const SMALL_TEXT: &str = "hello from s3";
const GUEST_TEXT: &str = "written by the guest";
const GUEST_DEADLINE: Duration = Duration::from_secs(300);
const SHARE_READY: Duration = Duration::from_secs(60);

pub fn run(strict: bool) -> Result<()> {
    let mut missing = guest::missing();
    if !weed_bin().is_file() {
        missing.push(format!("{} (`cargo xtask setup`)", weed_bin().display()));
    }
    if !missing.is_empty() {
        let what = missing.join("; ");
        if strict {
            bail!("vm-test cannot run; missing: {what}");
        }
        println!("vm-test: SKIPPED; missing: {what}");
        return Ok(());
    }
    run_cmd(Command::new(cargo()).current_dir(repo_root()).args([
        "build",
        "--release",
        "-p",
        "berth",
        "--bin",
        "berth",
    ]))?;
    let work = tempdir("berth-vm-test")?;
    let result = run_in(&work.0);
    drop(work);
    let (passed, failed) = result?;
    println!("vm-test: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} vm-test check(s) failed");
    }
    Ok(())
}

/// A temp dir removed when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir(prefix: &str) -> Result<TempDir> {
    let base = std::env::temp_dir();
    for n in 0..1000u32 {
        let path = base.join(format!("{prefix}-{}-{n}", std::process::id()));
        if std::fs::create_dir(&path).is_ok() {
            return Ok(TempDir(path));
        }
    }
    bail!("cannot create a temp dir in {}", base.display())
}

/// The berth binary `cargo build --release` made.
pub fn berth_bin() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("release")
        .join("berth")
}

fn run_in(work: &Path) -> Result<(u32, u32)> {
    let s3 = LocalS3::start(&weed_bin(), work)?;
    let large = pattern(LARGE_SIZE);
    s3.put(BUCKET, "data/large.bin", &large)?;
    s3.put(BUCKET, "data/small.txt", SMALL_TEXT.as_bytes())?;
    s3.put(BUCKET, "data/sub/inner.txt", b"inner")?;
    let sha = sha256(&work.join("large.bin"), &large)?;

    let socket = work.join("vfs.sock");
    let _share = start_share(
        work,
        &[
            &format!("s3://{BUCKET}"),
            "--socket",
            &socket.to_string_lossy(),
            "--endpoint-url",
            &s3.endpoint(),
            "--region",
            "us-east-1",
            "--request-queues",
            "2",
        ],
    )?;

    let device = guest::Device {
        socket: &socket,
        tag: TAG,
        queues: 2,
    };
    let lines = guest::boot(work, &device, &checks(&sha), GUEST_DEADLINE)?;
    let (mut passed, mut failed) = guest_totals(&lines);

    let mut host = |name: &str, ok: bool, detail: String| {
        if ok {
            passed += 1;
            println!("vm-test: ok {name}");
        } else {
            failed += 1;
            println!("vm-test: FAILED {name}: {detail}");
        }
    };
    match s3.get(BUCKET, "out/guest.txt") {
        Ok(Some(body)) => host(
            "guest write is in S3",
            body == format!("{GUEST_TEXT}\n").as_bytes(),
            format!("S3 holds {:?}", String::from_utf8_lossy(&body)),
        ),
        Ok(None) => host("guest write is in S3", false, "no such object".into()),
        Err(e) => host("guest write is in S3", false, format!("{e:#}")),
    }
    // A second VMM on the same socket: the share listens again after the first left.
    let again = format!(
        "if mount -t virtiofs $TAG /mnt && [ \"$(cat /mnt/data/small.txt)\" = \"{SMALL_TEXT}\" ] \
         && [ \"$(cat /mnt/out/guest.txt)\" = \"{GUEST_TEXT}\" ]; then echo reconnect-ok; fi; umount /mnt"
    );
    match guest::boot(work, &device, &again, GUEST_DEADLINE) {
        Ok(lines) => host(
            "second VMM on the same socket",
            lines.iter().any(|l| l.trim() == "reconnect-ok"),
            "the second guest could not read the share".into(),
        ),
        Err(e) => host("second VMM on the same socket", false, format!("{e:#}")),
    }
    Ok((passed, failed))
}

/// Starts `berth share` and waits for its ready line; killed when the guard drops.
pub fn start_share(work: &Path, args: &[&str]) -> Result<Reaped> {
    let log = std::fs::File::create(work.join("berth.log"))?;
    let mut child = Command::new(berth_bin())
        .arg("share")
        .args(args)
        .arg("--state-dir")
        .arg(work.join("state"))
        .env("AWS_ACCESS_KEY_ID", "berth-vm-test")
        .env("AWS_SECRET_ACCESS_KEY", "berth-vm-test")
        .env("NO_PROXY", NO_PROXY)
        .env("no_proxy", NO_PROXY)
        .env("RUST_LOG", "berth=info,berth_vhost=info,warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", berth_bin().display()))?;
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
    if rx.recv_timeout(SHARE_READY).is_err() {
        let log = std::fs::read_to_string(work.join("berth.log")).unwrap_or_default();
        bail!("berth share did not get ready within {SHARE_READY:?}; its log:\n{log}");
    }
    Ok(guard)
}

/// The guest's checks (busybox sh). Each prints `check ok: NAME` or `check FAILED: NAME`.
fn checks(sha: &str) -> String {
    format!(
        r#"pass=0; fail=0
check() {{
  if eval "$2" > /tmp/out 2>&1; then pass=$((pass+1)); echo "check ok: $1"
  else fail=$((fail+1)); echo "check FAILED: $1"; cat /tmp/out; fi
}}
check mount 'mount -t virtiofs $TAG /mnt'
check ls '[ "$(ls /mnt/data | tr "\n" " ")" = "large.bin small.txt sub " ]'
check stat '[ "$(stat -c %s /mnt/data/large.bin)" = {LARGE_SIZE} ] && [ -d /mnt/data/sub ] && [ -f /mnt/data/sub/inner.txt ]'
check cat '[ "$(cat /mnt/data/small.txt)" = "{SMALL_TEXT}" ]'
check sha256-large '[ "$(sha256sum /mnt/data/large.bin | cut -d " " -f 1)" = {sha} ]'
check missing-name 'grep -q " /mnt virtiofs " /proc/mounts && ! stat /mnt/data/no-such-file'
check write 'grep -q " /mnt virtiofs " /proc/mounts && mkdir -p /mnt/out && echo "{GUEST_TEXT}" > /mnt/out/guest.txt && [ "$(cat /mnt/out/guest.txt)" = "{GUEST_TEXT}" ]'
check throughput 'grep -q " /mnt virtiofs " /proc/mounts && echo 3 > /proc/sys/vm/drop_caches; a=$(cut -d " " -f 1 /proc/uptime); dd if=/mnt/data/large.bin of=/dev/null bs=1M 2>/tmp/dd; b=$(cut -d " " -f 1 /proc/uptime); echo "guest read: $(awk "BEGIN {{ t = $b - $a; if (t < 0.01) t = 0.01; printf \"%.1f MiB/s\", {LARGE_SIZE} / 1048576 / t }}")" > /dev/console; grep -q "^32+0 records in" /tmp/dd'
umount /mnt
echo "vm-test-guest: $pass passed, $fail failed""#
    )
}

/// Sums the guest's check lines; a guest that died early counts as one failure.
fn guest_totals(lines: &[String]) -> (u32, u32) {
    let passed = lines.iter().filter(|l| l.starts_with("check ok: ")).count() as u32;
    let mut failed = lines
        .iter()
        .filter(|l| l.starts_with("check FAILED: "))
        .count() as u32;
    if !lines.iter().any(|l| l.starts_with("vm-test-guest: ")) {
        println!("vm-test: FAILED the guest did not finish its checks");
        failed += 1;
    }
    (passed, failed)
}

/// Deterministic bytes that do not compress (xorshift).
pub fn pattern(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// sha256 of `data` with the host's sha256sum (written to `scratch` first).
fn sha256(scratch: &Path, data: &[u8]) -> Result<String> {
    std::fs::write(scratch, data)?;
    let out = Command::new("sha256sum").arg(scratch).output()?;
    let _ = std::fs::remove_file(scratch);
    let text = String::from_utf8_lossy(&out.stdout);
    let sum = text.split_whitespace().next().unwrap_or("");
    if !out.status.success() || sum.len() != 64 {
        bail!("sha256sum failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(sum.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_totals_count_checks_and_a_missing_summary() {
        let lines: Vec<String> = ["check ok: a", "check FAILED: b", "check ok: c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(guest_totals(&lines), (2, 2));
        let mut done = lines.clone();
        done.push("vm-test-guest: 2 passed, 1 failed".into());
        assert_eq!(guest_totals(&done), (2, 1));
    }

    #[test]
    fn pattern_is_deterministic() {
        assert_eq!(pattern(100), pattern(100));
        assert_eq!(pattern(13).len(), 13);
    }
}
