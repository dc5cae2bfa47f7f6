//! The mount process of one daemon volume: `berth mount` started at the daemon's mountpoint
//! of the volume, watched, and started again with backoff when it dies. A new mount process
//! heals the dead mount it finds there (remount, re-bind of every bind of it); the supervisor
//! then makes sure every target of the volume shows the new mount and asks the new holder to
//! serve the volume's virtio-fs shares again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use super::spec::{NodeSettings, VolumeError, VolumeSpec};
use super::table::ShareSpec;
use crate::heal::control::{self, ControlRequest};
use crate::sys::mounts;

/// How long a mount may take to print "berth: mounted".
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a stopping mount gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Lines of a mount's stderr kept for `last_error`.
const STDERR_TAIL: usize = 20;

/// How a volume's mount process is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// SIGTERM: the mount process unmounts and commits open files.
    Unmount,
    /// SIGKILL: the FUSE mount stays (dead) with its binds, for a restarted daemon to heal.
    Abandon,
}

/// Observable state of one volume (what ListVolumes shows).
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub state: String,
    pub pid: u32,
    pub restarts: u64,
    pub remount_generation: u64,
    pub last_error: String,
}

pub type Shares = Arc<std::sync::Mutex<BTreeMap<PathBuf, ShareSpec>>>;

/// Targets of a volume: target -> read-only.
pub type Targets = Arc<std::sync::Mutex<BTreeMap<PathBuf, bool>>>;

/// A volume's supervised mount process, as the registry holds it.
pub struct Running {
    pub mountpoint: PathBuf,
    pub targets: Targets,
    pub shares: Shares,
    pub health: Arc<std::sync::Mutex<Health>>,
    stop: Option<oneshot::Sender<StopMode>>,
    done: watch::Receiver<bool>,
}

/// Asks the holder of the volume mounted at `mountpoint` to serve a share.
pub async fn add_share(
    node: &NodeSettings,
    mountpoint: &Path,
    share: &ShareSpec,
) -> Result<(), VolumeError> {
    let request = ControlRequest::AddShare {
        socket: share.socket.clone(),
        request_queues: share.request_queues,
        queue_size: share.queue_size,
        group: node.share_peers.group,
    };
    ask_holder(&node.state_dir, mountpoint, request).await
}

/// Sends a control request to a mount process (blocking socket I/O, off the runtime).
pub async fn ask_holder(
    state_dir: &Path,
    mountpoint: &Path,
    request: ControlRequest,
) -> Result<(), VolumeError> {
    let (state_dir, mountpoint) = (state_dir.to_path_buf(), mountpoint.to_path_buf());
    let reply =
        tokio::task::spawn_blocking(move || control::ask(&state_dir, &mountpoint, &request))
            .await
            .map_err(|e| VolumeError::Internal(e.to_string()))?
            .map_err(|e| VolumeError::Internal(format!("{e:#}")))?;
    if reply.ok {
        Ok(())
    } else {
        Err(VolumeError::FailedPrecondition(reply.message))
    }
}

/// Binds `mountpoint` at `target` unless `target` already shows that mount (same device).
pub fn ensure_bound(mountpoint: &Path, target: &Path, read_only: bool) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let live = std::fs::metadata(mountpoint)?.dev();
    if std::fs::metadata(target).is_ok_and(|m| m.dev() == live) {
        return Ok(());
    }
    // A stale bind (dead connection) goes if nothing holds it; else the new one stacks on it.
    let _ = mounts::unmount_all(target);
    std::fs::create_dir_all(target)?;
    mounts::bind_read_only_if(mountpoint, target, read_only)
}

/// Starts the mount process of volume `key` at `mountpoint` and returns once it has mounted
/// (or failed to).
pub async fn start(
    node: Arc<NodeSettings>,
    spec: VolumeSpec,
    key: String,
    mountpoint: PathBuf,
) -> Result<Running, VolumeError> {
    std::fs::create_dir_all(&mountpoint)
        .map_err(|e| VolumeError::Internal(format!("creating {}: {e}", mountpoint.display())))?;
    let targets: Targets = Arc::default();
    let shares: Shares = Arc::default();
    let health = Arc::new(std::sync::Mutex::new(Health {
        state: "starting".into(),
        ..Health::default()
    }));
    let (stop_tx, stop_rx) = oneshot::channel();
    let (ready_tx, ready_rx) = oneshot::channel();
    let (done_tx, done_rx) = watch::channel(false);
    let sup = Supervisor {
        node,
        spec,
        key,
        mountpoint: mountpoint.clone(),
        targets: targets.clone(),
        shares: shares.clone(),
        health: health.clone(),
    };
    tokio::spawn(async move {
        sup.run(stop_rx, ready_tx).await;
        let _ = done_tx.send(true);
    });
    match ready_rx.await {
        Ok(Ok(())) => Ok(Running {
            mountpoint,
            targets,
            shares,
            health,
            stop: Some(stop_tx),
            done: done_rx,
        }),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(VolumeError::Internal(
            "mount supervisor ended before the mount was ready".into(),
        )),
    }
}

impl Running {
    /// Stops the mount process and waits until it is gone. Unmounting, its mountpoint
    /// directory goes too.
    pub async fn stop(mut self, mode: StopMode) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(mode);
        }
        let _ = self.done.wait_for(|done| *done).await;
        if mode == StopMode::Abandon {
            return;
        }
        let _ = std::fs::remove_dir(&self.mountpoint);
        if let Some(dir) = self.mountpoint.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }

    pub fn has_share(&self, socket: &Path) -> bool {
        self.shares.lock().is_ok_and(|s| s.contains_key(socket))
    }

    /// No target and no share left: the volume can stop.
    pub fn unused(&self) -> bool {
        self.targets.lock().is_ok_and(|t| t.is_empty())
            && self.shares.lock().is_ok_and(|s| s.is_empty())
    }
}

/// Runs and restarts the mount process of one volume.
struct Supervisor {
    node: Arc<NodeSettings>,
    spec: VolumeSpec,
    key: String,
    mountpoint: PathBuf,
    targets: Targets,
    shares: Shares,
    health: Arc<std::sync::Mutex<Health>>,
}

enum Exit {
    Stopped,
    Died(String),
}

impl Supervisor {
    fn set(&self, f: impl FnOnce(&mut Health)) {
        if let Ok(mut h) = self.health.lock() {
            f(&mut h);
        }
    }

    async fn run(
        self,
        mut stop: oneshot::Receiver<StopMode>,
        ready: oneshot::Sender<Result<(), VolumeError>>,
    ) {
        let mut ready = Some(ready);
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = tokio::select! {
                r = self.spawn() => r,
                _ = &mut stop => return,
            };
            let (mut child, stderr_tail) = match started {
                Ok(c) => c,
                Err(e) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    self.set(|h| {
                        h.state = "restarting".into();
                        h.last_error = e.to_string();
                    });
                    tracing::warn!(volume = %self.key, "mount did not come back: {e}");
                    // Whatever is left at the mountpoint may be what stops it: clear it.
                    self.clear_dead_mount();
                    if sleep_or_stop(&mut stop, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            let pid = child.id().unwrap_or(0);
            if let Some(tx) = ready.take() {
                let _ = tx.send(Ok(()));
            } else {
                self.after_restart();
                self.reshare().await;
                backoff = BACKOFF_MIN;
            }
            self.set(|h| {
                h.state = "running".into();
                h.pid = pid;
            });
            match self.serve(&mut child, &mut stop).await {
                Exit::Stopped => {
                    self.set(|h| h.state = "stopped".into());
                    return;
                }
                Exit::Died(status) => {
                    let tail = stderr_tail.lock().map(|t| t.join("\n")).unwrap_or_default();
                    tracing::warn!(volume = %self.key, pid, "mount process died ({status}); restarting");
                    self.set(|h| {
                        h.state = "restarting".into();
                        h.restarts += 1;
                        h.last_error = format!("mount process {pid} exited ({status}): {tail}");
                    });
                    // The dead mount stays for the next `berth mount`, which detaches it with
                    // every bind of it it can see (pod targets too, not only ours) and binds
                    // the new mount over each, with their read-only flags.
                    if sleep_or_stop(&mut stop, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Starts `berth mount` and waits until it prints "berth: mounted".
    #[allow(clippy::type_complexity)]
    async fn spawn(&self) -> Result<(Child, Arc<std::sync::Mutex<Vec<String>>>), VolumeError> {
        let mut cmd = Command::new(&self.node.berth_bin);
        cmd.arg("mount")
            .arg(&self.spec.source)
            .arg(&self.mountpoint)
            .arg("--state-dir")
            .arg(&self.node.state_dir)
            .args(self.spec.args());
        if let Some(cache) = &self.node.cache {
            cmd.arg("--cache-socket").arg(&cache.socket);
            if !self.spec.options.contains_key("block-size") {
                cmd.arg("--block-size")
                    .arg(cache.server.block_size().to_string());
            }
        }
        for (var, value) in self.spec.secrets.env_pairs() {
            cmd.env(var, value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // If the daemon dies, its mounts end with it: cleanly (SIGTERM: unmount), or, when the
        // next daemon is to restore them, at once (SIGKILL: the dead mount and its binds stay
        // for the new mount process to heal and re-bind).
        let on_death = if self.node.keep_on_exit {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, on_death);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            VolumeError::Internal(format!("starting {}: {e}", self.node.berth_bin.display()))
        })?;
        let tail = Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            let key = self.key.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(volume = %key, "{line}");
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == STDERR_TAIL {
                            t.remove(0);
                        }
                        t.push(line);
                    }
                }
            });
        }
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| VolumeError::Internal("no stdout pipe".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let wait_ready = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("berth: mounted") {
                    return true;
                }
            }
            false
        };
        let ok = tokio::time::timeout(START_TIMEOUT, wait_ready)
            .await
            .unwrap_or(false);
        if !ok {
            let _ = child.start_kill();
            let _ = child.wait().await;
            // Let the stderr reader drain.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let why = tail.lock().map(|t| t.join("\n")).unwrap_or_default();
            return Err(VolumeError::FailedPrecondition(format!(
                "berth mount of {} failed: {why}",
                self.spec.source
            )));
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((child, tail))
    }

    async fn serve(&self, child: &mut Child, stop: &mut oneshot::Receiver<StopMode>) -> Exit {
        tokio::select! {
            status = child.wait() => {
                Exit::Died(status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()))
            }
            mode = stop => {
                self.set(|h| h.state = "stopping".into());
                if mode == Ok(StopMode::Abandon) {
                    let _ = child.kill().await;
                    tracing::info!(volume = %self.key, "mount process killed; the volume is left for the next daemon");
                    return Exit::Stopped;
                }
                if let Some(pid) = child.id() {
                    // SAFETY: the child is not reaped yet, so the pid is still ours.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                    tracing::warn!(volume = %self.key, "mount did not stop in {STOP_GRACE:?}; killing it");
                    let _ = child.kill().await;
                }
                self.clear_dead_mount();
                Exit::Stopped
            }
        }
    }

    /// Unmounts (not lazily) what is left at the mountpoint, when a new `berth mount` could
    /// not start over it; if that fails (busy), the next try heals over it.
    fn clear_dead_mount(&self) {
        if let Err(e) = mounts::unmount_all(&self.mountpoint) {
            tracing::warn!(volume = %self.key, "leaving the old mount at {}: {e}", self.mountpoint.display());
        }
    }

    /// After a restart, which follows the death of the mount process (the holder of the FUSE
    /// connection) and so is always a new mount: bind it to every target again. (Mount ids
    /// cannot tell: the kernel gives the new mount the dead one's id again.)
    fn after_restart(&self) {
        let targets: Vec<(PathBuf, bool)> = self
            .targets
            .lock()
            .map(|t| t.iter().map(|(p, ro)| (p.clone(), *ro)).collect())
            .unwrap_or_default();
        for (target, ro) in targets {
            // Usually re-bound already by the new mount (see `run`).
            if let Err(e) = ensure_bound(&self.mountpoint, &target, ro) {
                tracing::error!(volume = %self.key, target = %target.display(), "re-binding after a remount: {e}");
            }
        }
        self.set(|h| h.remount_generation += 1);
        tracing::warn!(volume = %self.key, "volume was mounted afresh (last-resort remount); targets re-bound");
    }

    /// A new mount process knows no shares: give it every share of the volume again.
    async fn reshare(&self) {
        let shares: Vec<ShareSpec> = self
            .shares
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        for share in shares {
            match add_share(&self.node, &self.mountpoint, &share).await {
                Ok(()) => {
                    tracing::info!(volume = %self.key, socket = %share.socket.display(), "share served again after a restart")
                }
                Err(e) => {
                    tracing::error!(volume = %self.key, socket = %share.socket.display(), "could not serve the share again: {e}")
                }
            }
        }
    }
}

/// Sleeps for the backoff (doubling it); true when a stop came instead.
async fn sleep_or_stop(stop: &mut oneshot::Receiver<StopMode>, backoff: &mut Duration) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop => true,
    }
}
