//! The node daemon's own behaviour (its shares are in `shares`): volumes survive a restart
//! of the daemon with `--on-exit keep`.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use berth::api::pb;
use berth::api::pb::daemon_client::DaemonClient;

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
        // The e2e environment (store credentials, no proxies) for the mounts it starts.
        let child = crate::mount::berth_command(dir)
            .arg("daemon")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            // The test's own directory holds its local sources and share sockets.
            .arg("--allow-local-source")
            .arg(dir)
            .arg("--share-dir")
            .arg(dir)
            .args(flags)
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::options().append(true).open(&log)?)
            .spawn()
            .context("starting berth daemon")?;
        let mut daemon = Daemon { child, socket, log };
        let Daemon { child, socket, log } = &mut daemon;
        crate::util::wait_listening("berth daemon", socket, Duration::from_secs(30), || {
            let status = child.try_wait().ok().flatten()?;
            Some(format!(
                "{status}: {}",
                std::fs::read_to_string(&*log).unwrap_or_default()
            ))
        })?;
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
        crate::util::terminate(&mut self.child);
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
    restart_case(false)
}

/// A volume an older berth recorded under its FNV name (derived from its credentials) is
/// restored under its HMAC name (hardening item 4), at the mountpoint its pods' binds point
/// into; a further restart finds it under the new name, and when it stops nothing of either
/// name is left.
pub fn restart_renames_a_legacy_volume() -> Result<()> {
    restart_case(true)
}

fn restart_case(legacy: bool) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().canonicalize()?;
    let src = dir.join("store");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("a.txt"), b"kept across restarts")?;
    let target = dir.join("staging/vol");
    let publish = dir.join("pod/vol");
    let result = restart_flow(&dir, &src, &target, &publish, legacy);
    // A failed run may leave mounts anywhere below the directory (the daemon's own
    // mountpoint of the volume too).
    berth::sys::mounts::unmount_below(&dir);
    result
}

fn restart_flow(dir: &Path, src: &Path, target: &Path, publish: &Path, legacy: bool) -> Result<()> {
    let want: &[u8] = b"kept across restarts";
    let secrets: std::collections::HashMap<String, String> = [
        ("accessKeyId".to_string(), "AKIA-test".to_string()),
        ("secretAccessKey".to_string(), SECRET.to_string()),
    ]
    .into();
    let first = Daemon::start(dir, &["--on-exit", "keep"])?;
    let mut c = first.client()?;
    rt().block_on(c.mount_volume(pb::MountVolumeRequest {
        source: src.display().to_string(),
        target_path: target.display().to_string(),
        volume_id: "vol-1".into(),
        secrets: secrets.clone(),
        ..Default::default()
    }))?;
    std::fs::create_dir_all(publish)?;
    berth::sys::mounts::bind(target, publish, 0)?;
    ensure!(read_ok(&target.join("a.txt"), want) && read_ok(&publish.join("a.txt"), want));
    let first_pid = first.volumes()?[0].pid;
    let name = first.volumes()?[0].volume.clone();
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
    let volumes_dir = dir.join("state/volumes");
    if legacy {
        // What an older berth left: the same volume under its FNV name (the dead mount
        // moves with its directory).
        let spec = berth::api::spec::VolumeSpec::new(
            src.display().to_string(),
            Default::default(),
            secrets,
        )?;
        let old = spec.legacy_key();
        ensure!(old != name, "the legacy name is the new one");
        std::fs::rename(volumes_dir.join(&name), volumes_dir.join(&old))?;
    }

    // A legacy volume is restored twice: once renamed, once under its new name.
    let restarts = if legacy { 2 } else { 1 };
    let mut last = None;
    for round in 1..=restarts {
        let keep: &[&str] = if round < restarts {
            &["--on-exit", "keep"]
        } else {
            &[]
        };
        let daemon = Daemon::start(dir, keep)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !(read_ok(&target.join("a.txt"), want) && read_ok(&publish.join("a.txt"), want)) {
            if Instant::now() > deadline {
                bail!(
                    "the volume did not come back after daemon restart {round}; log:\n{}",
                    daemon.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let volumes = daemon.volumes()?;
        ensure!(volumes.len() == 1, "{volumes:?}");
        let v = &volumes[0];
        ensure!(
            v.targets == [target.display().to_string()]
                && v.remount_generation >= round
                && v.volume == name,
            "restart {round}, the volume is {name}: {v:?}"
        );
        if legacy {
            let recorded: Vec<String> = std::fs::read_dir(&volumes_dir)?
                .flatten()
                .filter(|e| e.path().join("volume.json").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            ensure!(
                recorded == [name.clone()],
                "restart {round}: the volume is recorded as {recorded:?}, not {name}"
            );
        }
        if round < restarts {
            drop(daemon);
            ensure!(
                std::fs::read(target.join("a.txt")).is_err(),
                "the target still served with no mount process"
            );
        } else {
            last = Some(daemon);
        }
    }
    let second = last.context("no daemon restarted")?;
    // The pod goes first (as the CSI plugin unpublishes before it unstages).
    berth::sys::mounts::unmount_all(publish)?;
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
    let left: Vec<PathBuf> = volumes_dir
        .read_dir()?
        .flatten()
        .map(|e| e.path())
        .collect();
    ensure!(
        left.iter().all(|p| !p.join("volume.json").exists()),
        "the volume record outlived the volume: {left:?}"
    );
    ensure!(
        !legacy || left.is_empty(),
        "a renamed volume left directories behind: {left:?}"
    );
    ensure!(
        !second.logs().contains(SECRET),
        "a secret reached the daemon log"
    );
    Ok(())
}

/// A volume's cache counters, as its mount process last reported them.
pub(super) fn cache_of(v: &pb::VolumeInfo) -> Option<berth::cache::CacheStats> {
    status_of(v)?.cache
}

/// A volume's status, as its mount process last reported it.
pub(super) fn status_of(v: &pb::VolumeInfo) -> Option<berth::status::MountStatus> {
    serde_json::from_str(&v.status_json).ok()
}

fn mount_req(src: &Path, target: &Path, options: &[(&str, &str)]) -> pb::MountVolumeRequest {
    pb::MountVolumeRequest {
        source: src.display().to_string(),
        target_path: target.display().to_string(),
        volume_id: target.display().to_string(),
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Two volumes of one bucket (two mount processes: other options) use the daemon's one node
/// cache: what the first read is served to the second from the cache disk with no store read,
/// both count against one quota, and a volume cannot bring a cache size of its own.
pub fn volumes_share_the_node_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().canonicalize()?;
    let result = node_cache_flow(&dir);
    berth::sys::mounts::unmount_below(&dir);
    result
}

fn node_cache_flow(dir: &Path) -> Result<()> {
    let src = dir.join("store");
    std::fs::create_dir_all(&src)?;
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(src.join("big.bin"), &data)?;
    let daemon = Daemon::start(dir, &["--cache-size", "64MiB"])?;
    let mut c = daemon.client()?;
    let (a, b) = (dir.join("pods/a"), dir.join("pods/b"));
    rt().block_on(c.mount_volume(mount_req(&src, &a, &[])))?;
    rt().block_on(c.mount_volume(mount_req(&src, &b, &[("read-only", "true")])))?;
    let volumes = daemon.volumes()?;
    ensure!(
        volumes.len() == 2 && volumes[0].pid != volumes[1].pid,
        "two volumes, two mount processes: {volumes:?}"
    );

    ensure!(
        std::fs::read(a.join("big.bin"))? == data,
        "a read wrong bytes"
    );
    let stats = || -> Result<pb::StatsResponse> {
        Ok(rt()
            .block_on(c.clone().stats(pb::StatsRequest {}))?
            .into_inner())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats()?.cache_blocks < 4 {
        ensure!(
            Instant::now() < deadline,
            "a's blocks never reached the node cache: {:?}",
            stats()?
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(
        std::fs::read(b.join("big.bin"))? == data,
        "b read wrong bytes"
    );
    let b_volume = |daemon: &Daemon| -> Result<pb::VolumeInfo> {
        daemon
            .volumes()?
            .into_iter()
            .find(|v| v.targets == [b.display().to_string()])
            .context("volume b is gone")
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let b_cache = loop {
        let cache = cache_of(&b_volume(&daemon)?);
        if cache.as_ref().is_some_and(|c| c.disk_hits >= 4) || Instant::now() > deadline {
            break cache;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let b_cache = b_cache.context("volume b reports no cache")?;
    ensure!(
        b_cache.bytes_from_store == 0 && b_cache.disk_hits >= 4,
        "b should read a's blocks from the node cache: {b_cache:?}"
    );
    let node = stats()?;
    ensure!(
        node.cache_capacity_bytes == 64 << 20 && node.cache_blocks >= 4,
        "{node:?}"
    );
    let entries: Vec<String> = std::fs::read_dir(dir.join("cache"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    ensure!(
        entries
            .iter()
            .all(|e| ["data", "index", "lock", "generations"].contains(&e.as_str())),
        "one cache for the node, not one per volume: {entries:?}"
    );

    let own_size = rt().block_on(c.mount_volume(mount_req(
        &src,
        &dir.join("pods/c"),
        &[("cache-size", "1GiB")],
    )));
    ensure!(
        own_size.as_ref().map_err(|s| s.code()).err() == Some(tonic::Code::InvalidArgument),
        "a volume with its own cache-size: {own_size:?}"
    );
    for target in [&a, &b] {
        rt().block_on(c.unmount_volume(pb::UnmountVolumeRequest {
            target_path: target.display().to_string(),
        }))?;
    }
    ensure!(
        daemon.volumes()?.is_empty(),
        "volumes left: {:?}",
        daemon.volumes()?
    );
    Ok(())
}

/// What a caller of the daemon API cannot do: serve a local directory the daemon was not
/// told to allow (say `/`), put a share socket outside the share directories, take over a
/// live socket, or talk to the daemon at all without being root.
pub fn api_refuses_what_it_was_not_allowed() -> Result<()> {
    fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Option<tonic::Code> {
        r.err().map(|s| s.code())
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().canonicalize()?;
    let result = (|| -> Result<()> {
        let daemon = Daemon::start(&dir, &[])?;
        let mut c = daemon.client()?;
        let outside = tempfile::tempdir()?;
        for source in ["/", "/etc"] {
            let mounted =
                rt().block_on(c.mount_volume(mount_req(Path::new(source), &dir.join("t1"), &[])));
            ensure!(
                code(mounted) == Some(tonic::Code::PermissionDenied),
                "a local source {source} outside --allow-local-source was not refused"
            );
        }
        ensure!(
            !berth::sys::mounts::is_mountpoint(&dir.join("t1"))?,
            "a refused mount left a mount behind"
        );
        let src = dir.join("store");
        std::fs::create_dir_all(&src)?;
        let share = |socket: &Path| pb::CreateShareRequest {
            source: src.display().to_string(),
            socket_path: socket.display().to_string(),
            share_id: "s".into(),
            ..Default::default()
        };
        let elsewhere = outside.path().join("vm.sock");
        ensure!(
            code(rt().block_on(c.create_share(share(&elsewhere))))
                == Some(tonic::Code::PermissionDenied),
            "a share socket outside --share-dir was not refused"
        );
        ensure!(!elsewhere.exists(), "a refused share created its socket");
        // A live socket of someone else in the share dir is never replaced.
        let live_path = dir.join("live.sock");
        let live = std::os::unix::net::UnixListener::bind(&live_path)?;
        let taken = rt().block_on(c.create_share(share(&live_path)));
        ensure!(taken.is_err(), "a live socket was taken over");
        ensure!(
            std::os::unix::net::UnixStream::connect(&live_path).is_ok(),
            "the live socket no longer reaches its owner"
        );
        drop(live);
        // The API socket is root's: nobody else may even connect.
        let mode = std::fs::metadata(&daemon.socket)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "daemon.sock is {mode:o}");
        let as_nobody = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_berth"))
            .arg("--socket")
            .arg(&daemon.socket)
            .arg("volumes")
            .output()
            .context("running berth as nobody (setpriv)")?;
        ensure!(
            !as_nobody.status.success(),
            "a non-root client used the daemon API: {}",
            String::from_utf8_lossy(&as_nobody.stdout)
        );
        Ok(())
    })();
    berth::sys::mounts::unmount_below(&dir);
    result
}
