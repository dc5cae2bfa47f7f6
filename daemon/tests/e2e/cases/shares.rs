//! virtio-fs shares served by a mount's own engine: the holder binds and keeps the vhost-user
//! socket, the engine serves VMMs on it with the mount's filesystem, and a successor engine
//! serves the same socket after a crash. The test plays the VMM with a vhost-user frontend.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use berth::heal::control::ask;
use berth::heal::control::{ControlReply, ControlRequest};
use vhost::vhost_user::Frontend;
use vhost::VhostBackend;

use super::daemon::Daemon;
use super::heal::{heal_status, wait_generation};
use crate::mount::{Mount, MountOpts};
use crate::util::{rt, with_time_limit};
use crate::vmm::Guest;
use berth::api::pb;

/// VIRTIO_F_VERSION_1: every virtio-fs backend offers it.
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Asks the holder of `m` to share it on `socket` (1 request queue).
pub(super) fn add(m: &Mount, socket: &Path) -> Result<ControlReply> {
    ask(
        &m.state_dir(),
        m.path(),
        &ControlRequest::AddShare {
            socket: socket.to_path_buf(),
            request_queues: 1,
            queue_size: 1024,
            group: None,
        },
    )
}

/// Connects as a VMM and asks for the device features: only a serving backend answers
/// (a socket nobody accepts on would leave the question unanswered: time-limited).
fn handshake(socket: &Path) -> Result<u64> {
    let path = socket.to_path_buf();
    with_time_limit("vhost-user handshake", Duration::from_secs(10), move || {
        ask_features(&path)
    })?
    .0
}

fn ask_features(socket: &Path) -> Result<u64> {
    let frontend = Frontend::connect(socket, 2)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    frontend.set_owner().context("SET_OWNER")?;
    let features = frontend.get_features().context("GET_FEATURES")?;
    ensure!(
        features & VIRTIO_F_VERSION_1 != 0,
        "features {features:#x} lack VERSION_1"
    );
    Ok(features)
}

pub(super) fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

pub fn served_by_the_mount_engine() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("store");
    std::fs::create_dir_all(src.join("data"))?;
    std::fs::write(src.join("data/a.txt"), b"hello from the store")?;
    let m = Mount::local(&src, MountOpts::default())?;
    let socket: PathBuf = dir.path().join("vm/fs.sock");

    let reply = add(&m, &socket)?;
    ensure!(reply.ok, "AddShare failed: {}", reply.message);
    let again = add(&m, &socket)?;
    ensure!(again.ok, "a repeated AddShare failed: {}", again.message);
    ensure!(is_socket(&socket), "no socket at {}", socket.display());
    handshake(&socket).context("the first engine does not serve the share")?;

    // The engine dies: the holder keeps the socket, the successor serves it.
    let before = heal_status(&m)?;
    // SAFETY: plain kill(2) of the engine process.
    unsafe { libc::kill(before.engine_pid as i32, libc::SIGKILL) };
    let after = wait_generation(&m, before.generation, Duration::from_secs(30))?;
    ensure!(
        after.engine_pid != before.engine_pid,
        "the engine was not replaced"
    );
    ensure!(is_socket(&socket), "the socket went away with the engine");
    handshake(&socket).context("the successor does not serve the share")?;
    // The FUSE side of the same engine still serves the mount.
    let text = std::fs::read(m.join("data/a.txt"))?;
    ensure!(text == b"hello from the store", "read {text:?}");

    // Something that is not a socket is never replaced.
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"keep me")?;
    let refused = add(&m, &plain)?;
    ensure!(!refused.ok, "a share replaced a plain file");
    ensure!(
        refused.message.contains("not a socket"),
        "unclear refusal: {}",
        refused.message
    );
    ensure!(
        std::fs::read(&plain)? == b"keep me",
        "the plain file changed"
    );

    // Removing the share: the socket goes, nobody answers on that path any more.
    let removed = ask(
        &m.state_dir(),
        m.path(),
        &ControlRequest::RemoveShare {
            socket: socket.clone(),
        },
    )?;
    ensure!(removed.ok, "RemoveShare failed: {}", removed.message);
    ensure!(
        !socket.exists(),
        "the socket is still there after RemoveShare"
    );
    if handshake(&socket).is_ok() {
        bail!("a removed share still answers");
    }
    // The mount did not notice.
    ensure!(std::fs::read(m.join("data/a.txt"))? == b"hello from the store");
    m.finish()
}

fn share_req(source: &Path, socket: &Path) -> pb::CreateShareRequest {
    pb::CreateShareRequest {
        source: source.display().to_string(),
        socket_path: socket.display().to_string(),
        share_id: "sandbox-1".into(),
        ..Default::default()
    }
}

/// Through the node daemon: a volume mounted for a pod and shared with a VM is one mount
/// process; the share keeps the volume alive after the last target goes, and survives the
/// death of the mount process (the daemon restarts it and shares again).
pub fn daemon_shares_use_the_volume_engine() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let dir_path = dir.path().canonicalize()?;
    let src = dir_path.join("store");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("a.txt"), b"one volume")?;
    let other = dir_path.join("other-store");
    std::fs::create_dir_all(&other)?;
    let target = dir_path.join("pod/target");
    let socket = dir_path.join("vm/fs.sock");
    let daemon = Daemon::start(&dir_path, &[])?;
    let result = (|| -> Result<()> {
        let mut c = daemon.client()?;
        rt().block_on(c.mount_volume(pb::MountVolumeRequest {
            source: src.display().to_string(),
            target_path: target.display().to_string(),
            volume_id: "vol-1".into(),
            ..Default::default()
        }))?;
        rt().block_on(c.create_share(share_req(&src, &socket)))?;
        rt().block_on(c.create_share(share_req(&src, &socket)))
            .context("a repeated CreateShare")?;
        let other_on_same_socket = rt().block_on(c.create_share(share_req(&other, &socket)));
        ensure!(
            other_on_same_socket.as_ref().map_err(|s| s.code()).err()
                == Some(tonic::Code::AlreadyExists),
            "another volume on the same socket: {other_on_same_socket:?}"
        );
        let volumes = daemon.volumes()?;
        ensure!(volumes.len() == 1, "one volume expected: {volumes:?}");
        let v = &volumes[0];
        ensure!(
            v.targets.len() == 1 && v.shares == [socket.display().to_string()],
            "{v:?}"
        );
        handshake(&socket)?;
        ensure!(std::fs::read(target.join("a.txt"))? == b"one volume");

        // The pod goes; the VM's share keeps the volume.
        let stopped = rt()
            .block_on(c.unmount_volume(pb::UnmountVolumeRequest {
                target_path: target.display().to_string(),
            }))?
            .into_inner()
            .stopped;
        ensure!(!stopped, "the volume stopped while a VM shares it");
        handshake(&socket).context("after the last target went")?;

        // The mount process dies: the daemon restarts it and shares again.
        let pid = daemon.volumes()?[0].pid;
        // SAFETY: plain kill(2) of the mount process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let v = daemon.volumes()?;
            if v.first()
                .is_some_and(|v| v.pid != pid && v.state == "running")
                && handshake(&socket).is_ok()
            {
                break;
            }
            ensure!(
                std::time::Instant::now() < deadline,
                "the share did not come back after the mount process died: {v:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }

        rt().block_on(c.remove_share(pb::RemoveShareRequest {
            socket_path: socket.display().to_string(),
        }))?;
        rt().block_on(c.remove_share(pb::RemoveShareRequest {
            socket_path: socket.display().to_string(),
        }))
        .context("a repeated RemoveShare")?;
        ensure!(!socket.exists(), "the socket outlived its share");
        let left = daemon.volumes()?;
        ensure!(
            left.is_empty(),
            "the volume outlived its last user: {left:?}"
        );
        Ok(())
    })();
    if result.is_err() {
        eprintln!("--- daemon log ---\n{}", daemon.logs());
    }
    result
}

/// A hostile VMM on a share of a pod's mount (hardening, the VMM side): memory regions that
/// claim more than their file holds (or whose offset wraps) are refused before anything maps
/// them, and a VMM that shrinks its memory file under a running device does not bring the
/// holder down. Before the check, the holder watching the rings and each engine serving them
/// died of SIGBUS, the engine over and over, taking the pods' mount with it.
pub fn hostile_memory_tables_are_refused() -> Result<()> {
    const MIB: u64 = 1 << 20;
    let dir = tempfile::tempdir()?;
    let src = dir.path().join("store");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("a.txt"), b"still served")?;
    let m = Mount::local(&src, MountOpts::default())?;
    let socket: PathBuf = dir.path().join("vm/fs.sock");
    let reply = add(&m, &socket)?;
    ensure!(reply.ok, "AddShare failed: {}", reply.message);
    // The mount process is the holder; its engine is the pod's too.
    let holder = m.pid();
    let engine = heal_status(&m)?.engine_pid as i32;
    // SAFETY: signal 0 only checks that the process exists.
    let exists = |pid: i32| unsafe { libc::kill(pid, 0) } == 0;
    let alive = |what: &str| -> Result<()> {
        ensure!(exists(holder), "{what}: the holder died");
        ensure!(exists(engine), "{what}: the engine died");
        ensure!(
            std::fs::read(m.join("a.txt"))? == b"still served",
            "{what}: the pod's mount no longer reads"
        );
        Ok(())
    };
    for (declared, real, offset, what) in [
        (1 << 30, MIB, 0, "a 1 GiB region of a 1 MiB file"),
        (2 * MIB, 2 * MIB, MIB, "a region that ends past its file"),
        (
            2 * MIB,
            2 * MIB,
            u64::MAX - MIB,
            "a region whose offset wraps",
        ),
    ] {
        let accepted = crate::vmm::offer_memory_past_the_file(&socket, declared, real, offset)?;
        ensure!(!accepted, "{what} was accepted");
        alive(what)?;
    }
    // An honest device, then its memory file shrunk under it: the holder reads the rings
    // it watches from the file, not a mapping.
    let mut guest = Guest::attach(&socket)?;
    guest.init()?;
    let recoveries = heal_status(&m)?.recoveries;
    guest.shrink_memory(0x1000)?;
    std::thread::sleep(Duration::from_secs(2));
    ensure!(
        exists(holder),
        "the holder died when a VMM shrank its memory"
    );
    // It kicks the ring it shrank away: the engine that reads it may die of it once; its
    // successor is not given that device (no crash loop) and the pods' mount reads on.
    guest.kick()?;
    std::thread::sleep(Duration::from_secs(5));
    ensure!(
        exists(holder),
        "the holder died of a kick into shrunk memory"
    );
    let after = heal_status(&m)?;
    ensure!(
        after.recoveries <= recoveries + 1,
        "the engine was replaced {} times after one kick: a crash loop",
        after.recoveries - recoveries
    );
    ensure!(
        std::fs::read(m.join("a.txt"))? == b"still served",
        "the pod's mount no longer reads after the shrunk device"
    );
    drop(guest);
    let data = Guest::cat(&socket, "a.txt")?;
    ensure!(data == b"still served", "an honest guest read {data:?}");
    m.finish()
}
