//! Runs the real s3fs (Debian's s3fs-fuse) against the test server, so the interop tests can
//! check that berth and s3fs read each other's metadata and links.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::mount::unmount;
use crate::seaweed::{ACCESS_KEY, SECRET_KEY};
use crate::util::{self, is_mounted, tail_file};

const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A live s3fs mount of one bucket, in the foreground. Dropping it unmounts and reaps it, and
/// prints its log unless [`S3fs::finish`] was called.
pub struct S3fs {
    child: Option<Child>,
    dir: TempDir,
    mnt: PathBuf,
    log: PathBuf,
    finished: bool,
}

impl S3fs {
    pub fn mount(endpoint: &str, bucket: &str) -> Result<S3fs> {
        let dir = tempfile::Builder::new()
            .prefix("berth-e2e-s3fs-")
            .tempdir()?;
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt)?;
        let log = dir.path().join("s3fs.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = Command::new("s3fs");
        // s3fs reads AWS_* and ~/.aws too: only the test's credentials, by its own variables.
        for (name, _) in std::env::vars_os() {
            if name.as_encoded_bytes().starts_with(b"AWS") {
                cmd.env_remove(name);
            }
        }
        for var in util::PROXY_VARS {
            cmd.env_remove(var);
        }
        cmd.arg(bucket)
            .arg(&mnt)
            .arg("-f")
            .args(["-o", &format!("url={endpoint}")])
            .args(["-o", "use_path_request_style"])
            .args(["-o", "endpoint=us-east-1"])
            .args(["-o", "dbglevel=warn"])
            .env("AWSACCESSKEYID", ACCESS_KEY)
            .env("AWSSECRETACCESSKEY", SECRET_KEY)
            .env("HOME", dir.path())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd.spawn().context("starting s3fs")?;
        let mut me = S3fs {
            child: Some(child),
            dir,
            mnt,
            log,
            finished: false,
        };
        let start = Instant::now();
        while !is_mounted(&me.mnt) {
            if let Some(child) = me.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    me.child = None;
                    bail!(
                        "s3fs exited ({status}) before mounting; its log:\n{}",
                        tail_file(&me.log, 50)
                    );
                }
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!("s3fs did not mount within {READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(me)
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Unmounts (s3fs uploads what it still holds on release) and waits for a clean exit.
    pub fn finish(mut self) -> Result<()> {
        self.finished = true;
        let res = self.stop();
        if res.is_err() {
            eprintln!("e2e: s3fs log:\n{}", tail_file(&self.log, 50));
        }
        res
    }

    fn stop(&mut self) -> Result<()> {
        let unmounted = if is_mounted(&self.mnt) {
            unmount(&self.mnt)
        } else {
            Ok(())
        };
        let Some(mut child) = self.child.take() else {
            return unmounted;
        };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                unmounted?;
                if !status.success() {
                    bail!("s3fs exited with {status} after the unmount");
                }
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(20) {
                util::terminate(&mut child);
                unmounted?;
                bail!("s3fs did not exit within 20 s of its unmount");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for S3fs {
    fn drop(&mut self) {
        if !self.finished {
            eprintln!(
                "e2e: s3fs at {} dropped unfinished; its log:\n{}",
                self.dir.path().display(),
                tail_file(&self.log, 50)
            );
        }
        let _ = self.stop();
    }
}
