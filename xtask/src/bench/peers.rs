//! The systems the bench mounts side by side: berth and its peers (rclone, s3fs, Mountpoint).
//!
//! Every system mounts the same bucket of the same server, in the foreground as a child of the
//! bench (so its PID is the mount process, for peak RSS and for cleanup), with a disk cache of
//! the same size where it has one and the same metadata TTL (60 s). The exact command lines end
//! up in results.json; perf/README.md explains the choices.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::seaweed::{client_env, ACCESS_KEY, SECRET_KEY};

const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);
pub const METADATA_TTL_SECS: u64 = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Berth,
    Mountpoint,
    Rclone,
    S3fs,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Berth, Kind::Mountpoint, Kind::Rclone, Kind::S3fs];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Berth => "berth",
            Kind::Mountpoint => "mountpoint-s3",
            Kind::Rclone => "rclone",
            Kind::S3fs => "s3fs",
        }
    }
}

/// Where and how to mount: the same for every system.
#[derive(Debug, Clone)]
pub struct Target {
    pub bucket: String,
    pub endpoint: String,
    pub cache_bytes: u64,
}

/// A system that is available on this machine.
#[derive(Debug, Clone)]
pub struct Peer {
    pub kind: Kind,
    pub bin: PathBuf,
    pub version: String,
}

impl Peer {
    pub fn name(&self) -> &'static str {
        self.kind.name()
    }

    /// The mount command (foreground) with `{MP}`, `{CACHE}` and `{STATE}` filled in.
    pub fn command(&self, t: &Target, mp: &Path, cache: &Path, state: &Path) -> Command {
        let mut cmd = Command::new(&self.bin);
        // Test credentials, the endpoint and the region; nothing of the caller's AWS_*.
        client_env(&mut cmd, &t.endpoint);
        let ttl = METADATA_TTL_SECS;
        let cache_mib = t.cache_bytes >> 20;
        match self.kind {
            Kind::Berth => {
                cmd.arg("mount")
                    .arg(format!("s3://{}", t.bucket))
                    .arg(mp)
                    .args(["--endpoint-url", &t.endpoint])
                    .arg("--cache-dir")
                    .arg(cache)
                    .args(["--cache-size", &format!("{cache_mib}MiB")])
                    .args(["--metadata-ttl", &format!("{ttl}s")])
                    .arg("--state-dir")
                    .arg(state)
                    // Tuning experiments: extra flags, recorded in the command line.
                    .args(extra_berth_args())
                    .env("RUST_LOG", "berth=warn");
            }
            Kind::Mountpoint => {
                cmd.arg(format!("s3://{}", t.bucket))
                    .arg(mp)
                    .args(["--endpoint-url", &t.endpoint])
                    .arg("--cache")
                    .arg(cache)
                    .args(["--max-cache-size", &t.cache_bytes.to_string()])
                    .args(["--metadata-ttl", &ttl.to_string()])
                    .env("MOUNTPOINT_LOG", "warn");
            }
            Kind::Rclone => {
                // The remote comes from the environment; an empty config file keeps any user
                // configuration out.
                cmd.arg("mount")
                    .arg(format!("bench:{}", t.bucket))
                    .arg(mp)
                    .arg("--config")
                    .arg(state.join("rclone.conf"))
                    .arg("--cache-dir")
                    .arg(cache)
                    .args(["--vfs-cache-mode", "full"])
                    .args(["--vfs-cache-max-size", &format!("{cache_mib}M")])
                    .args(["--dir-cache-time", &format!("{ttl}s")])
                    .args(["--attr-timeout", &format!("{ttl}s")])
                    .args(["--log-level", "ERROR"])
                    .env("RCLONE_CONFIG_BENCH_TYPE", "s3")
                    .env("RCLONE_CONFIG_BENCH_PROVIDER", "SeaweedFS")
                    .env("RCLONE_CONFIG_BENCH_ACCESS_KEY_ID", ACCESS_KEY)
                    .env("RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY", SECRET_KEY)
                    .env("RCLONE_CONFIG_BENCH_ENDPOINT", &t.endpoint)
                    .env("RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE", "true");
            }
            Kind::S3fs => {
                cmd.arg(&t.bucket)
                    .arg(mp)
                    .arg("-f")
                    .args(["-o", &format!("url={}", t.endpoint)])
                    .args(["-o", "use_path_request_style"])
                    .args(["-o", "endpoint=us-east-1"])
                    .args(["-o", &format!("use_cache={}", cache.display())])
                    .args(["-o", &format!("stat_cache_expire={ttl}")])
                    .args(["-o", "dbglevel=err"])
                    .env("AWSACCESSKEYID", ACCESS_KEY)
                    .env("AWSSECRETACCESSKEY", SECRET_KEY);
            }
        }
        cmd
    }

    /// The command line as documentation (paths replaced by placeholders).
    pub fn describe(&self, t: &Target) -> String {
        let cmd = self.command(
            t,
            Path::new("MOUNTPOINT"),
            Path::new("CACHE_DIR"),
            Path::new("STATE_DIR"),
        );
        let mut s = self
            .bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for a in cmd.get_args() {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s.replace(&t.endpoint, "ENDPOINT")
            .replace(&t.bucket, "BUCKET")
    }

    /// Mounts with an empty cache (a fresh `cache` directory) and waits for the mount.
    pub fn mount(&self, t: &Target, work: &Path) -> Result<Mounted> {
        let mp = work.join(format!("mnt-{}", self.name()));
        let cache = work.join(format!("cache-{}", self.name()));
        let state = work.join(format!("state-{}", self.name()));
        for dir in [&cache, &state] {
            let _ = std::fs::remove_dir_all(dir);
            std::fs::create_dir_all(dir)?;
        }
        std::fs::create_dir_all(&mp)?;
        std::fs::write(state.join("rclone.conf"), "")?;
        let log = work.join(format!("{}.log", self.name()));
        let out = File::create(&log)?;
        let child = self
            .command(t, &mp, &cache, &state)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let mut m = Mounted {
            child: Some(child),
            mp,
            log,
            name: self.name(),
        };
        m.wait_mounted()?;
        Ok(m)
    }
}

/// `BERTH_BENCH_BERTH_ARGS`, split on whitespace: extra `berth mount` flags for experiments
/// (e.g. `--block-size 4MiB`). Empty for the committed results.
fn extra_berth_args() -> Vec<String> {
    std::env::var("BERTH_BENCH_BERTH_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A running mount; unmounted (and its process reaped or killed) on drop.
pub struct Mounted {
    child: Option<Child>,
    pub mp: PathBuf,
    log: PathBuf,
    name: &'static str,
}

impl Mounted {
    fn wait_mounted(&mut self) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < MOUNT_TIMEOUT {
            if is_fuse_mount(&self.mp) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "{} exited before mounting ({status}): {}",
                    self.name,
                    tail(&self.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "{} did not mount within {MOUNT_TIMEOUT:?}: {}",
            self.name,
            tail(&self.log)
        )
    }

    /// Peak resident set size of the mount so far (VmHWM), in bytes: of the mount process
    /// plus its live children (a berth mount is a holder process and an engine child).
    pub fn peak_rss(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let mut total = vm_hwm(pid)?;
        for child in super::cache::process_and_children(pid).into_iter().skip(1) {
            total += vm_hwm(child).unwrap_or(0);
        }
        Some(total)
    }

    /// Unmounts and waits for the process to exit; kills it (by PID) if it does not.
    pub fn unmount(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let ok = Command::new("umount")
            .arg(&self.mp)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok && is_fuse_mount(&self.mp) {
            let _ = Command::new("umount").arg("-l").arg(&self.mp).status();
        }
        let start = Instant::now();
        while start.elapsed() < EXIT_TIMEOUT {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!(
            "{} did not exit within {EXIT_TIMEOUT:?} of the unmount; killed",
            self.name
        )
    }

    /// Kills the process at once (a workload hung in the mount), then cleans the mount up.
    pub fn kill(mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mp).status();
        let _ = self.stop();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("bench: {e:#}");
        }
    }
}

/// Whether `path` is a FUSE mount point in this mount namespace.
pub fn is_fuse_mount(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines().any(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let fstype = l.split(" - ").nth(1).and_then(|r| r.split(' ').next());
        fields.get(4) == Some(&want.as_ref()) && fstype.is_some_and(|t| t.starts_with("fuse"))
    })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join(" | ")
}

/// VmHWM of one process, in bytes.
fn vm_hwm(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_share_bucket_cache_size_and_ttl() {
        let t = Target {
            bucket: "bkt".into(),
            endpoint: "http://127.0.0.1:9".into(),
            cache_bytes: 4 << 30,
        };
        let line = |kind| {
            Peer {
                kind,
                bin: PathBuf::from("/bin/x"),
                version: String::new(),
            }
            .describe(&t)
        };
        assert_eq!(
            line(Kind::Berth),
            "x mount s3://BUCKET MOUNTPOINT --endpoint-url ENDPOINT --cache-dir CACHE_DIR \
             --cache-size 4096MiB --metadata-ttl 60s --state-dir STATE_DIR"
        );
        assert!(line(Kind::Rclone).contains("--vfs-cache-mode full --vfs-cache-max-size 4096M"));
        assert!(line(Kind::Mountpoint).contains("--max-cache-size 4294967296 --metadata-ttl 60"));
        assert!(line(Kind::S3fs).contains("-o use_cache=CACHE_DIR -o stat_cache_expire=60"));
    }
}
