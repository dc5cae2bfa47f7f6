//! Runs the real `berth mount` binary and tears the mount down again.

use std::ffi::CString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use tempfile::TempDir;

use crate::seaweed::{Seaweed, ACCESS_KEY, SECRET_KEY};
use crate::util::{self, is_mounted, tail_file};

pub const BERTH: &str = env!("CARGO_BIN_EXE_berth");
const READY_LINE: &str = "berth: mounted ";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// A test that is still using its mount after this long is hung: the
/// watchdog kills `berth` so that blocked syscalls return and the test fails.
const DEFAULT_WATCHDOG: Duration = Duration::from_secs(600);

/// `berth mount` arguments for an S3 source at `endpoint`.
pub fn s3_args(endpoint: &str, bucket: &str, prefix: Option<&str>) -> Vec<String> {
    let source = match prefix {
        Some(p) => format!("s3://{bucket}/{p}"),
        None => format!("s3://{bucket}"),
    };
    vec![
        source,
        "--endpoint-url".into(),
        endpoint.to_owned(),
        "--region".into(),
        "us-east-1".into(),
    ]
}

/// The environment every `berth` child gets: test credentials, no proxy,
/// no AWS configuration from the machine.
pub fn berth_command(scratch: &Path) -> Command {
    let mut cmd = Command::new(BERTH);
    for var in util::PROXY_VARS.into_iter().chain([
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ]) {
        cmd.env_remove(var);
    }
    cmd.env("NO_PROXY", util::NO_PROXY)
        .env("no_proxy", util::NO_PROXY)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_CONFIG_FILE", scratch.join("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            scratch.join("no-aws-credentials"),
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "berth=debug")
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null());
    cmd
}

/// Extra knobs for [`Mount::start`].
pub struct MountOpts {
    /// Flags appended after the source and mountpoint.
    pub extra: Vec<String>,
    /// Environment overrides.
    pub env: Vec<(String, String)>,
    pub watchdog: Duration,
    /// Mount here instead of a fresh temp dir (it must exist).
    pub at: Option<PathBuf>,
    /// The umask berth starts with (the harness's own when None).
    pub umask: Option<libc::mode_t>,
}

impl Default for MountOpts {
    fn default() -> Self {
        MountOpts {
            extra: Vec::new(),
            env: Vec::new(),
            watchdog: DEFAULT_WATCHDOG,
            at: None,
            umask: None,
        }
    }
}

impl MountOpts {
    pub fn flags(flags: &[&str]) -> MountOpts {
        MountOpts {
            extra: flags.iter().map(|s| s.to_string()).collect(),
            ..MountOpts::default()
        }
    }
}

/// A live `berth mount`. Dropping it unmounts, reaps the process and removes
/// the temp dirs; if the test did not call [`Mount::finish`] (it failed or
/// panicked), the berth log is printed.
pub struct Mount {
    label: String,
    child: Option<Child>,
    mnt: PathBuf,
    log_path: PathBuf,
    stdout_path: PathBuf,
    dir: Option<TempDir>,
    watchdog: Option<(mpsc::Sender<()>, JoinHandle<()>)>,
    watchdog_fired: Arc<AtomicBool>,
    finished: bool,
}

impl Mount {
    /// Mount `s3://bucket[/prefix]` from `server`.
    pub fn s3(
        server: &Seaweed,
        bucket: &str,
        prefix: Option<&str>,
        opts: MountOpts,
    ) -> Result<Mount> {
        Mount::s3_endpoint(&server.endpoint(), bucket, prefix, opts)
    }

    /// Mount `s3://bucket[/prefix]` from any S3 endpoint.
    pub fn s3_endpoint(
        endpoint: &str,
        bucket: &str,
        prefix: Option<&str>,
        opts: MountOpts,
    ) -> Result<Mount> {
        Mount::start(bucket, s3_args(endpoint, bucket, prefix), opts)
    }

    /// Mount a local directory.
    pub fn local(src: &Path, opts: MountOpts) -> Result<Mount> {
        Mount::start("local", vec![src.to_string_lossy().into_owned()], opts)
    }

    /// `berth mount <source_args[0]> <mnt> <source_args[1..]> <extra>`.
    fn start(label: &str, source_args: Vec<String>, opts: MountOpts) -> Result<Mount> {
        let dir = tempfile::Builder::new()
            .prefix("berth-e2e-mnt-")
            .tempdir()
            .context("creating mount temp dir")?;
        let mnt = match &opts.at {
            Some(at) => at.clone(),
            None => {
                let mnt = dir.path().join("mnt");
                std::fs::create_dir(&mnt)?;
                mnt.canonicalize()?
            }
        };
        let log_path = dir.path().join("berth.stderr.log");
        let stdout_path = dir.path().join("berth.stdout.log");

        let mut cmd = berth_command(dir.path());
        cmd.arg("mount")
            .arg(&source_args[0])
            .arg(&mnt)
            .args(&source_args[1..])
            // Keep the inode journal out of /run/berth.
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(&opts.extra)
            .stdout(Stdio::piped())
            .stderr(File::create(&log_path)?);
        for (k, v) in &opts.env {
            cmd.env(k, v);
        }
        // SAFETY: prctl is async-signal-safe. If the harness dies, berth gets
        // SIGTERM and can still unmount cleanly.
        let umask = opts.umask;
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                if let Some(mask) = umask {
                    libc::umask(mask);
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().context("spawning berth")?;
        let pid = child.id() as libc::pid_t;
        let stdout = child.stdout.take().context("berth stdout")?;

        let (ready_tx, ready_rx) = mpsc::channel::<String>();
        let mut stdout_log = File::create(&stdout_path)?;
        std::thread::Builder::new()
            .name(format!("berth-stdout-{pid}"))
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(stdout_log, "{line}");
                    let _ = ready_tx.send(line);
                }
            })?;

        let watchdog_fired = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let fired = watchdog_fired.clone();
        let limit = opts.watchdog;
        let mnt_for_dog = mnt.clone();
        let dog = std::thread::Builder::new()
            .name(format!("berth-watchdog-{pid}"))
            .spawn(move || {
                if let Err(RecvTimeoutError::Timeout) = stop_rx.recv_timeout(limit) {
                    eprintln!(
                        "e2e: watchdog: mount {} still in use after {limit:?}; killing berth pid {pid}",
                        mnt_for_dog.display()
                    );
                    fired.store(true, Ordering::SeqCst);
                    // SAFETY: the child is reaped only after this thread is
                    // joined, so `pid` cannot have been reused.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            })?;

        let mut mount = Mount {
            label: format!("{label}@{}", mnt.display()),
            child: Some(child),
            mnt,
            log_path,
            stdout_path,
            dir: Some(dir),
            watchdog: Some((stop_tx, dog)),
            watchdog_fired,
            finished: false,
        };
        mount.wait_ready(&ready_rx)?;
        Ok(mount)
    }

    fn wait_ready(&mut self, lines: &mpsc::Receiver<String>) -> Result<()> {
        let start = Instant::now();
        loop {
            match lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line.starts_with(READY_LINE) => break,
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // stdout closed: the process is exiting.
                    let status = match self.wait_exit(EXIT_TIMEOUT) {
                        Ok(s) => s.to_string(),
                        Err(e) => format!("{e:#}"),
                    };
                    bail!(
                        "berth closed stdout before printing {READY_LINE:?} ({status}); stderr:\n{}",
                        tail_file(&self.log_path, 60)
                    );
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "berth exited with {status} before printing {READY_LINE:?}; stderr:\n{}",
                    tail_file(&self.log_path, 60)
                );
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("berth did not print {READY_LINE:?} within {READY_TIMEOUT:?}");
            }
        }
        if !is_mounted(&self.mnt) {
            bail!(
                "berth printed {READY_LINE:?} but {} is not in /proc/self/mountinfo",
                self.mnt.display()
            );
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.mnt.join(rel)
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.as_ref().map_or(0, |c| c.id() as libc::pid_t)
    }

    /// The `--state-dir` this mount was given.
    pub fn state_dir(&self) -> PathBuf {
        self.dir
            .as_ref()
            .map(|d| d.path().join("state"))
            .unwrap_or_default()
    }

    /// Everything berth wrote to stderr so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    /// Send a signal to the berth process.
    pub fn signal(&self, sig: libc::c_int) -> Result<()> {
        let pid = self.pid();
        if pid <= 0 {
            bail!("berth is not running");
        }
        // SAFETY: the child is not reaped while `self.child` is Some.
        if unsafe { libc::kill(pid, sig) } != 0 {
            bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Wait for the process to exit (SIGKILL after `timeout`); reaps it.
    fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.stop_watchdog();
        let Some(mut child) = self.child.take() else {
            bail!("berth already reaped");
        };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait()?;
                bail!("berth did not exit within {timeout:?} (killed: {status})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop_watchdog(&mut self) {
        if let Some((stop, handle)) = self.watchdog.take() {
            let _ = stop.send(());
            let _ = handle.join();
        }
    }

    /// After something else ended the mount (a signal, `umount`): the process
    /// must exit 0 within 10 s and the mount must be gone.
    pub fn expect_clean_exit(mut self) -> Result<()> {
        let status = self.wait_exit(EXIT_TIMEOUT)?;
        if self.watchdog_fired.load(Ordering::SeqCst) {
            bail!("berth was killed by the test watchdog");
        }
        if status.code() != Some(0) {
            bail!("berth exited with {status}, want exit code 0");
        }
        if is_mounted(&self.mnt) {
            bail!("berth exited but {} is still mounted", self.mnt.display());
        }
        self.finished = true;
        Ok(())
    }

    /// Crash berth with SIGKILL, reap it, and detach the dead mount it leaves behind (the
    /// kernel keeps it, failing with ENOTCONN, until someone unmounts it).
    pub fn kill9(mut self) -> Result<()> {
        self.signal(libc::SIGKILL)?;
        let status = self.wait_exit(EXIT_TIMEOUT)?;
        ensure!(status.code().is_none(), "berth survived SIGKILL: {status}");
        let _ = umount2(&self.mnt, libc::MNT_DETACH);
        self.finished = true;
        Ok(())
    }

    /// Crash berth's holder with SIGKILL and reap it, leaving the dead mount in place (the
    /// last-resort remount is what a test of it wants to see).
    pub fn crash(mut self) -> Result<()> {
        self.signal(libc::SIGKILL)?;
        let status = self.wait_exit(EXIT_TIMEOUT)?;
        ensure!(status.code().is_none(), "berth survived SIGKILL: {status}");
        self.finished = true;
        self.mnt = PathBuf::new(); // not ours to clean up any more
        Ok(())
    }

    /// Unmount (as `umount` would), then require a clean exit. Every test
    /// that mounts ends with this, so a berth that cannot shut down fails it.
    pub fn finish(self) -> Result<()> {
        unmount(&self.mnt).context("unmounting")?;
        self.expect_clean_exit()
    }

    fn cleanup(&mut self) {
        let alive = self
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        if alive && is_mounted(&self.mnt) {
            if let Err(e) = unmount(&self.mnt) {
                eprintln!("e2e: [{}] {e:#}", self.label);
            }
        } else if alive {
            // Never got mounted (or lost it): ask it to stop.
            let _ = self.signal(libc::SIGTERM);
        }
        if self.child.is_some() {
            if let Err(e) = self.wait_exit(EXIT_TIMEOUT) {
                eprintln!("e2e: [{}] {e:#}", self.label);
            }
        }
        self.stop_watchdog();
        if is_mounted(&self.mnt) {
            eprintln!(
                "e2e: [{}] still mounted after berth exited; detaching",
                self.label
            );
            let _ = umount2(&self.mnt, libc::MNT_DETACH);
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.finished {
            eprintln!(
                "e2e: [{}] test did not finish cleanly; berth stdout:\n{}berth stderr ({}):\n{}",
                self.label,
                tail_file(&self.stdout_path, 20),
                self.log_path.display(),
                tail_file(&self.log_path, 150)
            );
        }
        self.cleanup();
        if is_mounted(&self.mnt) {
            // Never delete through a live mount.
            eprintln!(
                "e2e: [{}] mount could not be removed; leaving {}",
                self.label,
                self.mnt.display()
            );
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
        }
    }
}

fn umount2(path: &Path, flags: libc::c_int) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// umount(2) with a few retries while busy, then a lazy detach.
pub fn unmount(path: &Path) -> Result<()> {
    let mut last = None;
    for _ in 0..10 {
        match umount2(path, 0) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && !is_mounted(path) => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    umount2(path, libc::MNT_DETACH).with_context(|| {
        format!(
            "lazy unmount of {} (umount failed: {last:?})",
            path.display()
        )
    })?;
    bail!(
        "{} was busy ({last:?}); had to detach it lazily",
        path.display()
    )
}

/// How a `berth mount` that was expected to fail ended.
pub struct FailedRun {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Run `berth mount <args>` (first arg is the source, the mountpoint is
/// inserted after it) expecting it to exit on its own within `timeout`. It
/// is killed and the test fails if it hangs, and the test fails if anything
/// is left mounted. Logging is off so stderr carries only the error report.
pub fn run_expect_exit(
    args: &[String],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<FailedRun> {
    let dir = tempfile::Builder::new()
        .prefix("berth-e2e-cli-")
        .tempdir()
        .context("creating temp dir")?;
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt)?;
    let mnt = mnt.canonicalize()?;
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut cmd = berth_command(dir.path());
    // Logging off: what is left on stderr is the error report alone.
    cmd.env("RUST_LOG", "off").env_remove("RUST_BACKTRACE");
    if let Some((source, rest)) = args.split_first() {
        cmd.arg("mount")
            .arg(source)
            .arg(&mnt)
            .args(rest)
            .arg("--state-dir")
            .arg(dir.path().join("state"));
    } else {
        cmd.arg("mount");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let start = Instant::now();
    let mut child = cmd.spawn().context("spawning berth")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            if is_mounted(&mnt) {
                let _ = umount2(&mnt, libc::MNT_DETACH);
            }
            bail!(
                "berth mount {args:?} still running after {timeout:?} (hang); stderr:\n{}",
                tail_file(&err_path, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = start.elapsed();
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let run = FailedRun {
        status,
        stdout: read(&out_path),
        stderr: read(&err_path),
        elapsed,
    };
    if is_mounted(&mnt) {
        let _ = unmount(&mnt);
        bail!(
            "berth mount {args:?} exited ({status}) but left {} mounted",
            mnt.display()
        );
    }
    Ok(run)
}
