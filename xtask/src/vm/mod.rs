//! `cargo xtask vm-test`: a real guest mounts a berth share over virtio-fs.
//!
//! SeaweedFS on loopback holds a bucket; `berth share` serves it on a vhost-user socket;
//! QEMU (TCG) boots Debian's cloud kernel with a busybox initramfs whose init mounts the
//! share and runs the checks. The host then checks that the file the guest wrote is in S3,
//! then boots a guest that reads and writes for 75 s while the host kills (10x SIGKILL),
//! hangs (SIGSTOP) and upgrades (3x) the engine serving it ([`heal`]: 0 read errors, its
//! files in S3), and boots another guest on the same socket (the share serves the next VMM).
//! A share of a pod's mount goes through the same (10 kills, 3 upgrades, 65 s), and so do two
//! guests at once on two shares of one volume created through the node daemon (CreateShare).
//! Prints `vm-test: N passed, M failed`; fails if any check failed. berth is the test
//! build's ([`berth::binary`]), so after `cargo xtask test` nothing is compiled again.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::berth;
use crate::seaweed::Seaweed;
use crate::setup::weed_bin;
use crate::sh::{run_cmd, tempdir, Reaped};

pub mod guest;
pub mod heal;

const BUCKET: &str = "vmtest";
const TAG: &str = "berth";
const LARGE_SIZE: usize = 32 << 20;
const SMALL_TEXT: &str = "hello from s3";
const GUEST_TEXT: &str = "written by the guest";
const GUEST_DEADLINE: Duration = Duration::from_secs(300);
const CRASH_DEADLINE: Duration = Duration::from_secs(90);
/// --hang-timeout of the shares under test: a SIGSTOPped engine is replaced after this.
const HANG_TIMEOUT: &str = "3s";

pub fn run(strict: bool, crash: bool) -> Result<()> {
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
    let bin = berth::binary()?;
    let work = tempdir("berth-vm-test")?;
    if crash {
        return crash_probe(&bin, &work.0);
    }
    let result = run_in(&bin, &work.0);
    drop(work);
    let (passed, failed) = result?;
    println!("vm-test: {passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} vm-test check(s) failed");
    }
    Ok(())
}

fn run_in(bin: &Path, work: &Path) -> Result<(u32, u32)> {
    let s3 = Seaweed::open(&weed_bin(), work)?;
    let large = crate::sh::pattern(LARGE_SIZE);
    s3.put(BUCKET, "data/large.bin", &large)?;
    s3.put(BUCKET, "data/small.txt", SMALL_TEXT.as_bytes())?;
    s3.put(BUCKET, "data/sub/inner.txt", b"inner")?;
    let sha = sha256(&work.join("large.bin"), &large)?;

    let socket = work.join("vfs.sock");
    let _share = berth::share(
        bin,
        work,
        &s3,
        &[
            &format!("s3://{BUCKET}"),
            "--socket",
            &socket.to_string_lossy(),
            "--endpoint-url",
            &s3.endpoint,
            "--region",
            "us-east-1",
            "--request-queues",
            "2",
            "--hang-timeout",
            HANG_TIMEOUT,
        ],
    )?;

    let device = guest::Device {
        socket: &socket,
        tag: TAG,
        queues: 2,
        reconnect: 0,
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
    // A guest at work while its engine is killed, hung and upgraded.
    let state = work.join("state");
    let scenario = heal::Scenario {
        upgrade: vec![
            "upgrade".into(),
            socket.clone().into(),
            "--state-dir".into(),
            state.clone().into(),
        ],
        state,
        chaos: heal::Chaos {
            kills: 10,
            hangs: 1,
            upgrades: 3,
        },
        seconds: 75,
    };
    let guest = heal::Guest {
        device: &device,
        prefix: "out/heal",
    };
    if let Err(e) = heal::run(bin, work, &s3, &[guest], &scenario, &sha, &mut host) {
        host(
            "a guest across engine replacements",
            false,
            format!("{e:#}"),
        );
    }
    // A second VMM on the same socket (the VM restarted): the holder accepts the next one.
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
    // A guest reboot: the same VMM resets the device and sets its rings up again on the
    // same connection. The first boot leaves a mark in the share and reboots; the second
    // finds it, reads and powers off.
    let reboot = format!(
        "mount -t virtiofs $TAG /mnt || echo 'reboot: mount failed'\n\
         if [ -e /mnt/out/rebooted ]; then\n\
           [ \"$(sha256sum /mnt/data/large.bin | cut -d ' ' -f 1)\" = {sha} ] && echo reboot-read-ok\n\
           umount /mnt\n\
         else\n\
           echo once > /mnt/out/rebooted && umount /mnt && sync && echo 'reboot: rebooting' && reboot -f\n\
           sleep 30\n\
         fi"
    );
    match guest::boot_rebooting(work, &device, &reboot, GUEST_DEADLINE) {
        Ok(lines) => host(
            "a rebooted guest reads again on the same connection (rings reset)",
            lines.iter().any(|l| l.trim() == "reboot: rebooting")
                && lines.iter().any(|l| l.trim() == "reboot-read-ok"),
            "the guest did not reboot and read (see its console above)".into(),
        ),
        Err(e) => host("a rebooted guest reads again", false, format!("{e:#}")),
    }
    if let Err(e) = pod_and_vm_on_one_engine(bin, work, &s3, &sha, &large, &mut host) {
        host("pod mount and VM on one engine", false, format!("{e:#}"));
    }
    if let Err(e) = daemon_shares(bin, work, &s3, &sha, &mut host) {
        host(
            "two VMs on the shares of a daemon's volume",
            false,
            format!("{e:#}"),
        );
    }
    Ok((passed, failed))
}

/// A FUSE mount of the bucket (what a pod gets) and a VM share of that mount
/// (`berth share --mount`): the VM's reads must go through the mount's engine and fill its
/// cache, so that the pod's read of the same file afterwards comes from the cache.
fn pod_and_vm_on_one_engine(
    bin: &Path,
    work: &Path,
    s3: &Seaweed,
    sha: &str,
    large: &[u8],
    host: &mut dyn FnMut(&str, bool, String),
) -> Result<()> {
    let mountpoint = work.join("pod");
    std::fs::create_dir_all(&mountpoint)?;
    let state = work.join("pod-state");
    let mount = berth::start(
        bin,
        work,
        s3,
        "mount",
        &[
            &format!("s3://{BUCKET}"),
            &mountpoint.to_string_lossy(),
            "--endpoint-url",
            &s3.endpoint,
            "--region",
            "us-east-1",
            "--cache-dir",
            &work.join("pod-cache").to_string_lossy(),
            "--state-dir",
            &state.to_string_lossy(),
            "--hang-timeout",
            HANG_TIMEOUT,
        ],
        "berth: mounted",
    )?;
    let _unmount = Unmount(mountpoint.clone(), mount);
    let socket = work.join("pod-vm.sock");
    let share_of_mount = |extra: &[&str]| {
        run_cmd(
            s3.client_env(&mut Command::new(bin))
                .arg("share")
                .arg("--mount")
                .arg(&mountpoint)
                .arg("--socket")
                .arg(&socket)
                .arg("--state-dir")
                .arg(&state)
                .args(["--request-queues", "2"])
                .args(extra),
        )
    };
    share_of_mount(&[])?;
    let before = store_bytes(bin, &mountpoint, &state)?;
    let device = guest::Device {
        socket: &socket,
        tag: TAG,
        queues: 2,
        reconnect: 0,
    };
    let body = format!(
        "mount -t virtiofs $TAG /mnt && [ \"$(sha256sum /mnt/data/large.bin | cut -d ' ' -f 1)\" = {sha} ] \
         && echo shared-read-ok; umount /mnt"
    );
    let lines = guest::boot(work, &device, &body, GUEST_DEADLINE)?;
    host(
        "VM reads through the pod mount's engine",
        lines.iter().any(|l| l.trim() == "shared-read-ok"),
        "the guest could not read the share of the mount".into(),
    );
    let after_vm = store_bytes(bin, &mountpoint, &state)?;
    host(
        "the VM's reads fill the mount's cache",
        after_vm >= before + LARGE_SIZE as u64,
        format!(
            "the mount fetched {} bytes from S3 while the VM read {LARGE_SIZE}",
            after_vm - before
        ),
    );
    let pod_read = std::fs::read(mountpoint.join("data/large.bin"))?;
    let after_pod = store_bytes(bin, &mountpoint, &state)?;
    println!(
        "vm-test: the mount fetched {} bytes from S3 for the VM's read of {LARGE_SIZE}, then {} for the pod's",
        after_vm - before,
        after_pod - after_vm
    );
    host(
        "the pod's read of the same file is served from that cache",
        pod_read == large && after_pod - after_vm < (LARGE_SIZE / 8) as u64,
        format!(
            "same bytes: {}; fetched from S3 again: {} bytes",
            pod_read == large,
            after_pod - after_vm
        ),
    );
    let scenario = heal::Scenario {
        state: state.clone(),
        upgrade: vec![
            "upgrade".into(),
            mountpoint.clone().into(),
            "--state-dir".into(),
            state.clone().into(),
        ],
        chaos: heal::Chaos {
            kills: 10,
            hangs: 0,
            upgrades: 3,
        },
        seconds: 65,
    };
    let guest = heal::Guest {
        device: &device,
        prefix: "out/pod-heal",
    };
    heal::run(bin, work, s3, &[guest], &scenario, sha, host)?;
    share_of_mount(&["--remove"])?;
    host(
        "removing the share closes its socket",
        !socket.exists(),
        format!("{} is still there", socket.display()),
    );
    Ok(())
}

/// Two shares of one volume created through the node daemon (CreateShare, as the CSI
/// driver's Kata path does): two guests at once, one on each socket, read and write while
/// the volume's engine is killed 10 times and upgraded 3 times through the daemon.
fn daemon_shares(
    bin: &Path,
    work: &Path,
    s3: &Seaweed,
    sha: &str,
    host: &mut dyn FnMut(&str, bool, String),
) -> Result<()> {
    let daemon_socket = work.join("daemon.sock");
    let state = work.join("daemon-state");
    let shares = work.join("daemon-shares");
    std::fs::create_dir_all(&shares)?;
    let _daemon = Daemon(berth::start(
        bin,
        work,
        s3,
        "daemon",
        &[
            "--socket",
            &daemon_socket.to_string_lossy(),
            "--state-dir",
            &state.to_string_lossy(),
            "--cache-dir",
            &work.join("daemon-cache").to_string_lossy(),
            "--share-dir",
            &shares.to_string_lossy(),
        ],
        "berth: daemon listening",
    )?);
    let through_daemon = |args: &[&OsStr]| {
        run_cmd(
            s3.client_env(&mut Command::new(bin))
                .arg("--socket")
                .arg(&daemon_socket)
                .args(args),
        )
    };
    let sockets = [shares.join("vm-a.sock"), shares.join("vm-b.sock")];
    for socket in &sockets {
        through_daemon(&[
            "share".as_ref(),
            format!("s3://{BUCKET}").as_ref(),
            "--socket".as_ref(),
            socket.as_os_str(),
            "--endpoint-url".as_ref(),
            s3.endpoint.as_ref(),
            "--region".as_ref(),
            "us-east-1".as_ref(),
            "--request-queues".as_ref(),
            "2".as_ref(),
        ])?;
    }
    // One volume, both sockets on it: the chaos below reaches both guests.
    let out = s3
        .client_env(&mut Command::new(bin))
        .arg("--socket")
        .arg(&daemon_socket)
        .args(["status", "--json"])
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("berth status: {}", String::from_utf8_lossy(&out.stderr)))?;
    let volumes = status["volumes"].as_array().cloned().unwrap_or_default();
    let shares: Vec<&str> = volumes
        .first()
        .and_then(|v| v["shares"].as_array())
        .map(|s| s.iter().filter_map(|s| s.as_str()).collect())
        .unwrap_or_default();
    let wanted: Vec<String> = sockets.iter().map(|s| s.display().to_string()).collect();
    host(
        "two CreateShares of one source are two sockets of one volume",
        volumes.len() == 1 && wanted.iter().all(|w| shares.contains(&w.as_str())),
        format!("{} volumes, shares {shares:?}", volumes.len()),
    );
    let devices = sockets.each_ref().map(|socket| guest::Device {
        socket,
        tag: TAG,
        queues: 2,
        reconnect: 0,
    });
    let scenario = heal::Scenario {
        state,
        upgrade: vec![
            "--socket".into(),
            daemon_socket.clone().into(),
            "upgrade".into(),
        ],
        chaos: heal::Chaos {
            kills: 10,
            hangs: 0,
            upgrades: 3,
        },
        seconds: 65,
    };
    let guests = [
        heal::Guest {
            device: &devices[0],
            prefix: "out/daemon-a",
        },
        heal::Guest {
            device: &devices[1],
            prefix: "out/daemon-b",
        },
    ];
    heal::run(bin, work, s3, &guests, &scenario, sha, host)?;
    for socket in &sockets {
        through_daemon(&["unshare".as_ref(), socket.as_os_str()])?;
    }
    host(
        "removing the daemon's shares closes their sockets",
        sockets.iter().all(|s| !s.exists()),
        format!("{sockets:?}: some still there"),
    );
    Ok(())
}

/// Bytes the mount at `mountpoint` fetched from the store, from its status file (written
/// every 2 s: wait for a fresh one).
fn store_bytes(bin: &Path, mountpoint: &Path, state: &Path) -> Result<u64> {
    std::thread::sleep(Duration::from_millis(2500));
    let out = Command::new(bin)
        .arg("status")
        .arg(mountpoint)
        .arg("--json")
        .arg("--state-dir")
        .arg(state)
        .output()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("berth status: {}", String::from_utf8_lossy(&out.stderr)))?;
    status["cache"]["bytes_from_store"]
        .as_u64()
        .context("berth status shows no cache")
}

/// Stops a `berth daemon` with SIGTERM (it then stops its volumes); killed if it does not
/// exit within 30 s.
struct Daemon(Reaped);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.0 .0.as_mut() {
            // SAFETY: plain kill(2) of our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            for _ in 0..300 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Unmounts a `berth mount` (its process then exits); killed if it does not.
struct Unmount(PathBuf, Reaped);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        if let Some(child) = self.1 .0.as_mut() {
            for _ in 0..100 {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `vm-test --crash`: what the guest sees when berth is killed (SIGKILL) under a mounted
/// share, and after a new berth listens on the same socket. A measurement, not a check:
/// it prints what happened (see docs/virtiofs.md).
fn crash_probe(bin: &Path, work: &Path) -> Result<()> {
    let s3 = Seaweed::open(&weed_bin(), work)?;
    s3.put(BUCKET, "data/small.txt", SMALL_TEXT.as_bytes())?;
    s3.put(BUCKET, "data/sub/inner.txt", b"inner")?;
    let socket = work.join("vfs.sock");
    let endpoint = s3.endpoint.clone();
    let socket_text = socket.to_string_lossy().into_owned();
    let args = [
        format!("s3://{BUCKET}"),
        "--socket".into(),
        socket_text,
        "--endpoint-url".into(),
        endpoint,
        "--region".into(),
        "us-east-1".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut share = Some(berth::share(bin, work, &s3, &args)?);
    let body = r#"now() { cut -d " " -f 1 /proc/uptime; }
mount -t virtiofs $TAG /mnt && cat /mnt/data/small.txt && echo
echo "crash-probe: kill now"
a=$(now); timeout -s KILL 15 cat /mnt/data/sub/inner.txt; rc=$?; b=$(now)
echo "crash-probe: read after the kill: rc=$rc in $(awk "BEGIN { print $b - $a }") s"
sleep 5
a=$(now); timeout -s KILL 15 cat /mnt/data/small.txt; rc=$?; b=$(now)
echo "crash-probe: read after the restart: rc=$rc in $(awk "BEGIN { print $b - $a }") s"
a=$(now); timeout -s KILL 15 ls /mnt/data; rc=$?; b=$(now)
echo "crash-probe: ls after the restart: rc=$rc in $(awk "BEGIN { print $b - $a }") s""#;
    let device = guest::Device {
        socket: &socket,
        tag: TAG,
        queues: 1,
        // QEMU 7.2 refuses `reconnect=` on a vhost-user-fs chardev at start-up ("Failed to
        // set msg fds"), so the VMM keeps its first connection only.
        reconnect: 0,
    };
    let mut restarted = None;
    // The restart does not wait for the guest: with QEMU 7.2 the guest may make no progress
    // at all while the backend is gone.
    let mut on_line = |line: &str| {
        if line.contains("crash-probe: kill now") {
            println!("crash-probe: host: SIGKILL berth share");
            share = None;
            std::thread::sleep(Duration::from_secs(5));
            println!("crash-probe: host: starting berth share again on the same socket");
            match berth::share(bin, work, &s3, &args) {
                Ok(s) => restarted = Some(s),
                Err(e) => println!("crash-probe: host: restart failed: {e:#}"),
            }
        }
    };
    match guest::boot_watching(work, &device, body, &[], CRASH_DEADLINE, &mut on_line) {
        Ok(lines) => {
            for line in lines.iter().filter(|l| l.starts_with("crash-probe:")) {
                println!("{line}");
            }
        }
        Err(e) => println!("crash-probe: the guest stopped making progress: {e:#}"),
    }
    drop(restarted);
    Ok(())
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
}
