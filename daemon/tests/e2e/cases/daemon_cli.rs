//! `berth --socket PATH <command>`: the CLI as a client of a real `berth daemon` (its own
//! socket and state dir), with real FUSE mounts of a local directory store and of a SeaweedFS
//! bucket; and `berth unmount` without a daemon.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use tempfile::TempDir;

use crate::mount::{berth_command, Mount, MountOpts};
use crate::seaweed::SECRET_KEY;
use crate::shared_server;
use crate::util::{ensure_same_bytes, is_mounted, random_bytes, read_file};

/// A `berth daemon` on a socket in its own temp dir. Dropping it stops the daemon (which
/// unmounts its volumes) and removes what a failed test left mounted below the dir.
struct Daemon {
    child: Option<Child>,
    dir: TempDir,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    fn start(tag: &str) -> Result<Daemon> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("berth-e2e-daemon-{tag}-"))
            .tempdir()?;
        let root = dir.path().canonicalize()?;
        let socket = root.join("daemon.sock");
        let log = root.join("daemon.log");
        let out = std::fs::File::create(&log)?;
        let mut cmd = berth_command(&root);
        // The daemon gets no credentials of its own: a bucket mount only works if the CLI
        // sent them in the request's secrets.
        cmd.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--cache-dir")
            .arg(root.join("cache"))
            // The test's own directory holds its local sources and share sockets.
            .arg("--allow-local-source")
            .arg(&root)
            .arg("--share-dir")
            .arg(&root)
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl is async-signal-safe; the daemon dies with the test.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().context("starting berth daemon")?;
        let mut d = Daemon {
            child: Some(child),
            dir,
            socket,
            log,
        };
        let (child, log) = (&mut d.child, &d.log);
        crate::util::wait_listening("berth daemon", &d.socket, Duration::from_secs(30), || {
            let status = child.as_mut()?.try_wait().ok().flatten()?;
            Some(format!(
                "{status}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ))
        })?;
        Ok(d)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().canonicalize().unwrap_or_default().join(rel)
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `berth --socket SOCKET ARGS...`, with the test credentials in the environment.
    fn berth(&self, args: &[&str]) -> Result<Run> {
        let out = berth_command(self.dir.path())
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running berth --socket ... {args:?}"))?;
        let mut run = Run::new(args, out);
        run.what = format!("berth --socket ... {}", run.what);
        Ok(run)
    }

    /// Stops the daemon with SIGTERM (it unmounts every volume) and returns its log.
    fn stop(&mut self) -> String {
        if let Some(mut child) = self.child.take() {
            crate::util::terminate(&mut child);
        }
        // Whatever a failed test left mounted below the dir.
        berth::sys::mounts::unmount_below(&self.path(""));
        self.logs()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let log = self.stop();
            eprintln!(
                "e2e: daemon test did not finish cleanly; daemon log (last 60 lines):\n{}",
                tail(&log, 60)
            );
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One finished CLI run.
struct Run {
    what: String,
    ok: bool,
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn new(args: &[&str], out: Output) -> Run {
        Run {
            what: args.join(" "),
            ok: out.status.success(),
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn success(self) -> Result<Run> {
        ensure!(
            self.ok,
            "{} failed ({}):\nstdout: {}\nstderr: {}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        eprintln!("e2e: {}: {}", self.what, self.stdout.trim_end());
        Ok(self)
    }

    /// Must fail (exit code 1, no signal), saying `want` on stderr.
    fn failure(self, want: &str) -> Result<Run> {
        ensure!(
            self.status.code() == Some(1),
            "{}: want exit code 1, got {}:\nstdout: {}\nstderr: {}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        ensure!(
            self.stderr.contains(want),
            "{}: stderr does not say {want:?}:\n{}",
            self.what,
            self.stderr
        );
        eprintln!("e2e: {}: {}", self.what, self.stderr.trim_end());
        Ok(self)
    }
}

fn ensure_contains(what: &str, text: &str, want: &str) -> Result<()> {
    ensure!(text.contains(want), "{what} does not say {want:?}:\n{text}");
    Ok(())
}

fn status_json(d: &Daemon, target: Option<&Path>) -> Result<serde_json::Value> {
    let mut args = vec!["status", "--json"];
    let t;
    if let Some(target) = target {
        t = target.display().to_string();
        args.push(&t);
    }
    let run = d.berth(&args)?.success()?;
    serde_json::from_str(&run.stdout).with_context(|| format!("status --json: {}", run.stdout))
}

/// Mount a local directory store and a SeaweedFS bucket through the daemon, read through both
/// targets, see them in status, warm, upgrade, then unmount; bad requests fail clearly; the
/// secret key shows up nowhere.
pub fn through_daemon() -> Result<()> {
    let server = shared_server()?;
    let endpoint = server.endpoint();
    let bucket = server.bucket("dcli")?;
    let big = random_bytes(61, 3 << 20);
    let small = random_bytes(62, 70_000);
    bucket.put("weights.bin", big.clone())?;
    bucket.put("dir/a.bin", small.clone())?;

    let mut d = Daemon::start("cli")?;
    let local_src = d.path("local-src");
    std::fs::create_dir_all(&local_src)?;
    let greeting = b"hello from a local directory store\n".to_vec();
    std::fs::write(local_src.join("greeting.txt"), &greeting)?;
    let (t_local, t_s3, t_bad) = (d.path("t-local"), d.path("t-s3"), d.path("t-bad"));
    let mut outputs = String::new();

    // Mount both, read through the targets.
    let run = d
        .berth(&[
            "mount",
            &local_src.display().to_string(),
            &t_local.display().to_string(),
        ])?
        .success()?;
    ensure_contains("mount (local)", &run.stdout, "berth: mounted")?;
    ensure!(is_mounted(&t_local), "{} is not mounted", t_local.display());
    ensure_same_bytes(
        "greeting.txt through the daemon's mount",
        &read_file(t_local.join("greeting.txt"))?,
        &greeting,
    )?;
    let source = format!("s3://{}", bucket.name);
    let t_s3_text = t_s3.display().to_string();
    let run = d
        .berth(&[
            "mount",
            &source,
            &t_s3_text,
            "--endpoint-url",
            &endpoint,
            "--region",
            "us-east-1",
            "--read-only",
        ])?
        .success()?;
    outputs.push_str(&run.stdout);
    ensure_same_bytes(
        "weights.bin through the daemon's mount",
        &read_file(t_s3.join("weights.bin"))?,
        &big,
    )?;
    // The same volume again: shared, not a second process.
    let run = d
        .berth(&[
            "mount",
            &source,
            &t_s3_text,
            "--endpoint-url",
            &endpoint,
            "--region",
            "us-east-1",
            "--read-only",
        ])?
        .success()?;
    ensure_contains("repeated mount", &run.stdout, "already mounted")?;

    // Status, as text and as JSON.
    let run = d.berth(&["status"])?.success()?;
    let t_local_text = t_local.display().to_string();
    for want in [t_local_text.as_str(), t_s3_text.as_str(), "node: 2 volumes"] {
        ensure_contains("status", &run.stdout, want)?;
    }
    outputs.push_str(&run.stdout);
    let json = status_json(&d, Some(t_s3.as_path()))?;
    let volumes = json["volumes"]
        .as_array()
        .context("status --json: no volumes")?;
    ensure!(volumes.len() == 1, "status of one target: {json}");
    let v = &volumes[0];
    ensure!(v["state"] == "running", "volume not running: {v}");
    ensure!(v["targets"] == serde_json::json!([t_s3_text]), "{v}");
    ensure!(v["options"]["endpoint-url"] == endpoint.as_str(), "{v}");
    ensure!(v["options"]["read-only"] == "true", "{v}");
    ensure!(json["node"]["volumes"] == 2, "{json}");
    let run = d.berth(&["volumes"])?.success()?;
    ensure!(run.stdout.lines().count() == 2, "volumes: {}", run.stdout);

    // Warm the bucket's target; the daemon's output comes back.
    let run = d.berth(&["warm", &t_s3_text])?.success()?;
    ensure_contains("warm", &run.stdout, "2 files")?;
    ensure_contains("warm", &run.stdout, "0 failed")?;
    let run = d
        .berth(&["warm", &t_s3.join("dir").display().to_string()])?
        .success()?;
    ensure_contains("warm of a subdirectory", &run.stdout, "1 files")?;
    // The blocks reached the volume's disk cache (3 MiB + 70 kB = 4 blocks of 1 MiB); the
    // mount refreshes its status every 2 s.
    let start = Instant::now();
    loop {
        let json = status_json(&d, Some(t_s3.as_path()))?;
        let blocks = json["volumes"][0]["status"]["cache"]["disk_blocks"]
            .as_u64()
            .unwrap_or(0);
        if blocks >= 4 {
            break;
        }
        ensure!(
            start.elapsed() < Duration::from_secs(20),
            "after warm-up the cache holds {blocks} blocks, want 4: {json}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Upgrade the engine of the bucket's volume; the target still reads.
    let run = d.berth(&["upgrade", &t_s3_text])?.success()?;
    ensure_contains("upgrade", &run.stdout, "upgraded")?;
    ensure_same_bytes(
        "dir/a.bin after the upgrade",
        &read_file(t_s3.join("dir/a.bin"))?,
        &small,
    )?;

    // Bad requests: the daemon's code and message, or a clear refusal before sending.
    let run = d
        .berth(&[
            "mount",
            "s3://e2e-no-such-bucket-here",
            &t_bad.display().to_string(),
            "--endpoint-url",
            &endpoint,
            "--region",
            "us-east-1",
        ])?
        .failure("FAILED_PRECONDITION")?;
    ensure_contains("bad source", &run.stderr, "MountVolume")?;
    ensure_contains("bad source", &run.stderr, "does not exist")?;
    ensure!(
        run.stderr.trim().lines().count() == 1,
        "bad source: want a one-line error:\n{}",
        run.stderr
    );
    ensure!(
        !is_mounted(&t_bad),
        "a failed mount left {}",
        t_bad.display()
    );
    d.berth(&[
        "mount",
        &local_src.display().to_string(),
        "/tmp/x",
        "--cache-dir",
        "/tmp",
    ])?
    .failure("--cache-dir cannot be sent to the daemon")?;
    d.berth(&["warm", &d.path("elsewhere").display().to_string()])?
        .failure("is not inside a volume of the daemon")?;
    d.berth(&["status", &t_bad.display().to_string()])?
        .failure("has no volume mounted at")?;

    // Unmount both: targets go, the volumes' processes stop.
    let run = d
        .berth(&["unmount", &t_local.display().to_string()])?
        .success()?;
    ensure_contains("unmount", &run.stdout, "mount process stopped")?;
    ensure!(!is_mounted(&t_local), "{} still mounted", t_local.display());
    let run = d.berth(&["status"])?.success()?;
    ensure_contains("status after an unmount", &run.stdout, "node: 1 volumes")?;
    d.berth(&["unmount", &t_s3_text])?.success()?;
    ensure!(!is_mounted(&t_s3), "{} still mounted", t_s3.display());
    let run = d.berth(&["status"])?.success()?;
    ensure_contains("status at the end", &run.stdout, "has no volumes")?;
    // Unmounting again is fine (idempotent, as the API is).
    d.berth(&["unmount", &t_s3_text])?.success()?;

    let log = d.stop();
    for (what, text) in [("the daemon log", &log), ("the CLI output", &outputs)] {
        ensure!(
            !text.contains(SECRET_KEY),
            "the secret key appears in {what}"
        );
    }
    Ok(())
}

/// A virtio-fs share made and removed through the daemon (no VMM needed: the share listens).
pub fn share_and_unshare() -> Result<()> {
    let mut d = Daemon::start("share")?;
    let src = d.path("share-src");
    std::fs::create_dir_all(&src)?;
    let vhost = d.path("vm.sock");
    let vhost_text = vhost.display().to_string();
    let run = d
        .berth(&[
            "share",
            &src.display().to_string(),
            "--socket",
            &vhost_text,
            "--read-only",
            "--queue-size",
            "512",
        ])?
        .success()?;
    ensure_contains("share", &run.stdout, "berth: sharing")?;
    let start = Instant::now();
    while !vhost.exists() {
        ensure!(
            start.elapsed() < Duration::from_secs(30),
            "{} did not appear",
            vhost.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = d.berth(&["status"])?.success()?;
    ensure_contains("status with a share", &run.stdout, "1 shares")?;
    ensure_contains("status with a share", &run.stdout, &vhost_text)?;
    d.berth(&[
        "share",
        "s3://b",
        "--socket",
        "/tmp/v.sock",
        "--state-dir",
        "/tmp",
    ])?
    .failure("--state-dir cannot be sent to the daemon")?;
    let run = d.berth(&["unshare", &vhost_text])?.success()?;
    ensure_contains("unshare", &run.stdout, "removed")?;
    let run = d.berth(&["status"])?.success()?;
    ensure_contains("status after unshare", &run.stdout, "0 shares")?;
    // Without a daemon there is nothing to unshare from: a clear error.
    let out = berth_command(d.path("").as_path())
        .arg("unshare")
        .arg(&vhost)
        .output()?;
    Run::new(&["berth unshare (no daemon)", &vhost_text], out)
        .failure("berth --socket PATH unshare")?;
    d.stop();
    Ok(())
}

/// A dead or missing socket says so in one clear line (flag and BERTH_SOCKET alike).
pub fn dead_socket() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("missing.sock");
    let refused = dir.path().join("refused.sock");
    // A socket file whose listener is gone: connections are refused.
    drop(std::os::unix::net::UnixListener::bind(&refused)?);
    for socket in [&missing, &refused] {
        let want = format!("no berth daemon listening on {}", socket.display());
        for args in [
            &["status"][..],
            &["unmount", "/tmp/x"],
            &["mount", "s3://b", "/tmp/x"],
        ] {
            let out = berth_command(dir.path())
                .arg("--socket")
                .arg(socket)
                .args(args)
                .output()?;
            let mut run = Run::new(args, out);
            run.what = format!("berth --socket {} {}", socket.display(), run.what);
            run.failure(&want)?;
        }
        let out = berth_command(dir.path())
            .env("BERTH_SOCKET", socket)
            .arg("status")
            .output()?;
        Run::new(&["berth status (with BERTH_SOCKET)"], out).failure(&want)?;
    }
    Ok(())
}

/// `berth unmount` without a daemon: refuses other filesystems, refuses while busy (and
/// changes nothing), then unmounts a foreground `berth mount`, which exits by itself.
pub fn plain_unmount() -> Result<()> {
    let src = tempfile::tempdir()?;
    std::fs::write(src.path().join("f.txt"), b"data")?;
    let mount = Mount::local(src.path(), MountOpts::default())?;
    let unmount = |path: &Path| -> Result<Run> {
        let out = berth_command(src.path())
            .arg("unmount")
            .arg(path)
            .output()?;
        let mut run = Run::new(&["unmount", &path.display().to_string()], out);
        run.what = format!("berth {} (no daemon)", run.what);
        Ok(run)
    };

    // Busy: a file is open; nothing changes.
    let open = std::fs::File::open(mount.join("f.txt"))?;
    unmount(mount.path())?.failure("busy")?;
    ensure!(
        is_mounted(mount.path()),
        "a busy unmount took the mount away"
    );
    drop(open);
    // Not a berth mount: left alone.
    let other = tempfile::tempdir()?;
    let other_path = other.path().canonicalize()?;
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&other_path)
        .status()?;
    ensure!(st.success(), "mounting a tmpfs for the test: {st}");
    let refused = unmount(&other_path).and_then(|r| r.failure("not a berth mount"));
    let still = is_mounted(&other_path);
    let _ = berth::sys::mounts::unmount_all(&other_path);
    refused?;
    ensure!(still, "berth unmount removed a tmpfs");

    let run = unmount(mount.path())?.success()?;
    ensure_contains("unmount", &run.stdout, "unmounted")?;
    let run = unmount(mount.path())?.success()?;
    ensure_contains("unmount again", &run.stdout, "nothing is mounted")?;
    mount
        .expect_clean_exit()
        .context("the foreground berth mount after berth unmount")
}
