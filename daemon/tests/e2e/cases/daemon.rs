//! The node daemon's own behaviour (its shares are in `shares`): volumes survive a restart
//! of the daemon with `--on-exit keep`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use berth::api::pb;
use berth::api::pb::daemon_client::DaemonClient;

use super::shares::is_socket;
use crate::util::rt;

/// A `berth daemon` of the test's own, stopped (SIGTERM, then SIGKILL) when dropped.
pub(super) struct Daemon {
    child: std::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    pub(super) fn start(dir: &Path, flags: &[&str]) -> Result<Daemon> {
        let socket = dir.join("daemon.sock");
        let log = dir.join("daemon.log");
        let child = std::process::Command::new(crate::mount::BERTH)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .args(flags)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()
            .context("starting berth daemon")?;
        let mut daemon = Daemon { child, socket, log };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !is_socket(&daemon.socket) {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                bail!("berth daemon exited ({status}): {}", daemon.logs());
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "berth daemon did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(daemon)
    }

    pub(super) fn client(&self) -> Result<DaemonClient<tonic::transport::Channel>> {
        let _guard = rt().enter();
        berth::api::connect(&self.socket)
    }

    pub(super) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub(super) fn volumes(&self) -> Result<Vec<pb::VolumeInfo>> {
        let mut c = self.client()?;
        Ok(rt()
            .block_on(c.list_volumes(pb::ListVolumesRequest {}))?
            .into_inner()
            .volumes)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: not reaped yet, so the pid is still our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(40);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const SECRET: &str = "s3cr3t-kept-out-of-logs";

fn read_ok(path: &Path, want: &[u8]) -> bool {
    std::fs::read(path).is_ok_and(|got| got == want)
}

/// `--on-exit keep`: the daemon stops (a DaemonSet update); its volume's mount process is
/// killed and the mount left dead with its binds; the next daemon restores the volume from
/// its table (credentials included): the daemon's target and a bind made from it (what the
/// CSI plugin publishes into a pod) serve again without any new request.
pub fn restart_restores_volumes() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().canonicalize()?;
    let src = dir.join("store");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("a.txt"), b"kept across restarts")?;
    let target = dir.join("staging/vol");
    let publish = dir.join("pod/vol");
    let result = restart_flow(&dir, &src, &target, &publish);
    // A failed run may leave mounts anywhere below the directory (the daemon's own
    // mountpoint of the volume too): innermost first.
    let mut left: Vec<PathBuf> = berth::api::mounts::mount_table()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|m| m.starts_with(&dir))
        .collect();
    left.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for path in left {
        let _ = berth::api::mounts::unmount_all(&path);
    }
    result
}

fn restart_flow(dir: &Path, src: &Path, target: &Path, publish: &Path) -> Result<()> {
    let want: &[u8] = b"kept across restarts";
    let first = Daemon::start(dir, &["--on-exit", "keep"])?;
    let mut c = first.client()?;
    rt().block_on(
        c.mount_volume(pb::MountVolumeRequest {
            source: src.display().to_string(),
            target_path: target.display().to_string(),
            volume_id: "vol-1".into(),
            secrets: [
                ("accessKeyId".to_string(), "AKIA-test".to_string()),
                ("secretAccessKey".to_string(), SECRET.to_string()),
            ]
            .into(),
            ..Default::default()
        }),
    )?;
    std::fs::create_dir_all(publish)?;
    berth::api::mounts::bind(target, publish, false)?;
    ensure!(read_ok(&target.join("a.txt"), want) && read_ok(&publish.join("a.txt"), want));
    let first_pid = first.volumes()?[0].pid;
    let first_logs = {
        drop(c);
        let logs = first.logs();
        drop(first);
        logs
    };
    ensure!(
        !first_logs.contains(SECRET),
        "a secret reached the daemon log"
    );
    // SAFETY: signal 0 only checks the process exists.
    ensure!(
        unsafe { libc::kill(first_pid as i32, 0) } != 0,
        "the mount process outlived the daemon"
    );
    ensure!(
        std::fs::read(target.join("a.txt")).is_err(),
        "the target still served with no mount process (the test proves nothing)"
    );

    let second = Daemon::start(dir, &[])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(read_ok(&target.join("a.txt"), want) && read_ok(&publish.join("a.txt"), want)) {
        if Instant::now() > deadline {
            bail!(
                "the volume did not come back after the daemon restart; log:\n{}",
                second.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let volumes = second.volumes()?;
    ensure!(volumes.len() == 1, "{volumes:?}");
    let v = &volumes[0];
    ensure!(
        v.targets == [target.display().to_string()] && v.remount_generation >= 1,
        "{v:?}"
    );
    // The pod goes first (as the CSI plugin unpublishes before it unstages).
    berth::api::mounts::unmount_all(publish)?;
    let mut c = second.client()?;
    let stopped = rt()
        .block_on(c.unmount_volume(pb::UnmountVolumeRequest {
            target_path: target.display().to_string(),
        }))?
        .into_inner()
        .stopped;
    ensure!(
        stopped,
        "the restored volume did not stop with its last target"
    );
    ensure!(
        !dir.join("state/volumes").read_dir()?.any(|e| e
            .map(|e| e.path().join("volume.json").exists())
            .unwrap_or(false)),
        "the volume record outlived the volume"
    );
    ensure!(
        !second.logs().contains(SECRET),
        "a secret reached the daemon log"
    );
    Ok(())
}
