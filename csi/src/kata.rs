//! The serverless (Kata / microVM) publish flow: a virtio-fs share per publish target.
//!
//! When a volume's context says `mounter: virtiofs`, NodePublishVolume still bind-mounts the
//! staging path to the target (so the pod works under runc, and kubelet sees a mounted
//! target), and additionally:
//!
//! 1. asks the daemon for a vhost-user-fs share of the volume (`CreateShare`) on a socket
//!    under the share directory (`BERTH_SHARE_DIR`, default `/run/berth/shares`), named after
//!    the volume id and the target path, and waits until the socket exists;
//! 2. when enabled (`--kata-mount-info`), writes a direct-volume `mountInfo.json` for the
//!    target path under Kata's direct-volume root (`/run/kata-containers/shared/direct-volumes/<base64(target)>/`), in the format
//!    `kata-runtime direct-volume add` writes, with `volume-type: berth-virtiofs` and the
//!    socket as `device`.
//!
//! Kata itself knows no virtio-fs direct-volume type (it accepts raw block, VFIO and SPDK
//! vhost-user-blk direct volumes): a runtime must be taught `berth-virtiofs` to attach the
//! socket as a vhost-user-fs device. See docs/csi.md, "Serverless pods (Kata)".
//!
//! NodeUnpublishVolume removes the share and the mountInfo directory; both steps succeed
//! when there is nothing to remove. It always asks the daemon to remove the target's share
//! (which also clears a share whose process died), but only fails on that call when share
//! files were there.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use berth::api::pb as daemon;
use berth::sys::files::Fnv1a;
use tonic::transport::Channel;
use tonic::Status;

/// The volume-context key that selects the publish flow, and its values.
pub const MOUNTER_KEY: &str = "mounter";
pub const MOUNTER_VIRTIOFS: &str = "virtiofs";
pub const MOUNTER_FUSE: &str = "fuse";

/// The `volume-type` written to mountInfo.json.
pub const VOLUME_TYPE: &str = "berth-virtiofs";
pub const MOUNT_INFO_FILE: &str = "mountInfo.json";

/// How long NodePublishVolume waits for the share's socket to appear.
const SOCKET_WAIT: Duration = Duration::from_secs(20);

/// How long unpublish waits for the daemon's RemoveShare.
const DAEMON_CALL: Duration = Duration::from_secs(10);

/// Where shares and direct-volume files go.
#[derive(Clone, Debug)]
pub struct Paths {
    pub share_dir: PathBuf,
    pub direct_volume_dir: PathBuf,
    /// Write mountInfo.json. Off by default: stock Kata (Go runtime) rewrites a mount that
    /// has a mountInfo.json into `device`/`fstype` and would hand the guest a socket path
    /// as a mount source; only a runtime that knows `berth-virtiofs` may see these files.
    pub write_mount_info: bool,
}

/// Which flow a volume context asks for. Unknown values are refused, so a typo does not
/// silently give a FUSE bind mount to a pod that expects a share.
pub fn wants_share(ctx: &HashMap<String, String>) -> Result<bool, Status> {
    match ctx.get(MOUNTER_KEY).map(String::as_str) {
        None | Some("") | Some(MOUNTER_FUSE) => Ok(false),
        Some(MOUNTER_VIRTIOFS) => Ok(true),
        Some(other) => Err(Status::invalid_argument(format!(
            "volume attribute {MOUNTER_KEY} is {MOUNTER_FUSE} or {MOUNTER_VIRTIOFS}, not {other:?}"
        ))),
    }
}

/// A stable id of one publish (volume + target): the same on every call and across plugin
/// restarts, short enough for a unix socket path (108 bytes).
pub fn share_id(volume_id: &str, target: &Path) -> String {
    let hash = Fnv1a::new()
        .write(volume_id.as_bytes())
        .write(&[0])
        .write(target.as_os_str().as_encoded_bytes())
        .finish();
    format!("{hash:016x}")
}

impl Paths {
    pub fn socket(&self, volume_id: &str, target: &Path) -> PathBuf {
        self.share_dir
            .join(format!("{}.sock", share_id(volume_id, target)))
    }

    /// Kata's directory for a volume path: the path base64-encoded. The Go runtime
    /// (`kata-runtime direct-volume`) uses the URL-safe alphabet; runtime-rs and `kata-ctl`
    /// use the standard one. They differ only when the encoding holds `+` or `/`, and then
    /// both directories are written.
    pub fn mount_info_dirs(&self, target: &Path) -> Vec<PathBuf> {
        let bytes = target.as_os_str().as_encoded_bytes();
        let url = base64(bytes, true);
        let std = base64(bytes, false);
        let mut dirs = vec![self.direct_volume_dir.join(&url)];
        // A standard encoding with `/` would be a nested path: runtime-rs joins it as
        // sub-directories too, so write it the same way.
        if std != url {
            dirs.push(self.direct_volume_dir.join(&std));
        }
        dirs
    }
}

/// The mountInfo.json of a share, in Kata's direct-volume format (`volume-type`, `device`,
/// `fstype`, `metadata`, `options`).
pub fn mount_info(socket: &Path, volume_id: &str, tag: &str, read_only: bool) -> String {
    let metadata = BTreeMap::from([
        ("volumeId", volume_id.to_string()),
        ("tag", tag.to_string()),
        ("transport", "vhost-user-fs".to_string()),
    ]);
    let mut out = String::from("{");
    out.push_str(&format!("\"volume-type\":{},", json_str(VOLUME_TYPE)));
    out.push_str(&format!(
        "\"device\":{},",
        json_str(&socket.display().to_string())
    ));
    out.push_str("\"fstype\":\"virtiofs\",\"metadata\":{");
    let fields: Vec<String> = metadata
        .iter()
        .map(|(k, v)| format!("{}:{}", json_str(k), json_str(v)))
        .collect();
    out.push_str(&fields.join(","));
    out.push_str("},\"options\":[");
    out.push_str(if read_only { "\"ro\"" } else { "\"rw\"" });
    out.push_str("]}");
    out
}

/// Starts (or finds) the share of one publish and writes its mountInfo. On error, whatever
/// was made is removed again.
#[allow(clippy::too_many_arguments)]
pub async fn publish(
    client: &mut daemon::daemon_client::DaemonClient<Channel>,
    paths: &Paths,
    volume_id: &str,
    source: String,
    target: &Path,
    options: &HashMap<String, String>,
    secrets: HashMap<String, String>,
    read_only: bool,
) -> Result<PathBuf, Status> {
    let socket = paths.socket(volume_id, target);
    std::fs::create_dir_all(&paths.share_dir)
        .map_err(|e| Status::internal(format!("creating {}: {e}", paths.share_dir.display())))?;
    // The staging mount's options and credentials name the same volume, so the daemon serves
    // the share from the engine that serves the pods' mount (one inode table and cache). A
    // read-only publish of a writable volume is another volume: a read-only engine of its own.
    let mut share_opts = options.clone();
    if read_only {
        share_opts.insert("read-only".into(), "true".into());
    }
    let id = share_id(volume_id, target);
    client
        .create_share(daemon::CreateShareRequest {
            source,
            socket_path: socket.display().to_string(),
            options: share_opts,
            secrets,
            share_id: id.clone(),
        })
        .await?;
    let made = async {
        wait_for_socket(&socket).await?;
        if !paths.write_mount_info {
            return Ok(());
        }
        write_mount_info(
            paths,
            target,
            &mount_info(&socket, volume_id, &id, read_only),
        )
    };
    if let Err(e) = made.await {
        let _ = unpublish(client, paths, volume_id, target).await;
        return Err(e);
    }
    tracing::info!(volume = %volume_id, target = %target.display(), socket = %socket.display(), "virtio-fs share published");
    Ok(socket)
}

/// Removes the share and the mountInfo of one publish. Idempotent: nothing there is fine.
pub async fn unpublish(
    client: &mut daemon::daemon_client::DaemonClient<Channel>,
    paths: &Paths,
    volume_id: &str,
    target: &Path,
) -> Result<(), Status> {
    let socket = paths.socket(volume_id, target);
    let dirs = paths.mount_info_dirs(target);
    let present = socket.exists() || dirs.iter().any(|d| d.exists());
    let removed = tokio::time::timeout(
        DAEMON_CALL,
        client.remove_share(daemon::RemoveShareRequest {
            socket_path: socket.display().to_string(),
        }),
    )
    .await
    .unwrap_or_else(|_| {
        Err(Status::deadline_exceeded(
            "RemoveShare: the daemon did not answer",
        ))
    });
    if !present {
        // Most targets never had a share; the call above only tidies a share whose process
        // died and took its socket along. It must not make unpublishing an ordinary volume
        // depend on the daemon being up.
        if let Err(e) = removed {
            tracing::debug!(target = %target.display(), error = %e, "RemoveShare (no share files)");
        }
        return Ok(());
    }
    removed?;
    remove_file(&socket)?;
    for dir in &dirs {
        remove_file(&dir.join(MOUNT_INFO_FILE))?;
        remove_dir_chain(dir, &paths.direct_volume_dir)?;
    }
    tracing::info!(volume = %volume_id, target = %target.display(), "virtio-fs share removed");
    Ok(())
}

async fn wait_for_socket(socket: &Path) -> Result<(), Status> {
    use std::os::unix::fs::FileTypeExt;
    let start = Instant::now();
    loop {
        if std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket()) {
            return Ok(());
        }
        if start.elapsed() > SOCKET_WAIT {
            return Err(Status::unavailable(format!(
                "the share socket {} did not appear within {}s (see the daemon's log)",
                socket.display(),
                SOCKET_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write_mount_info(paths: &Paths, target: &Path, json: &str) -> Result<(), Status> {
    for dir in paths.mount_info_dirs(target) {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Status::internal(format!("creating {}: {e}", dir.display())))?;
        // Written whole, then renamed: the runtime never reads half a file.
        let file = dir.join(MOUNT_INFO_FILE);
        berth::sys::files::write_atomic(&file, json.as_bytes(), 0o644)
            .map_err(|e| Status::internal(format!("writing {}: {e}", file.display())))?;
    }
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), Status> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Status::internal(format!(
            "removing {}: {e}",
            path.display()
        ))),
    }
}

/// Removes `dir` and its empty parents up to (not including) `root`.
fn remove_dir_chain(dir: &Path, root: &Path) -> Result<(), Status> {
    let mut cur = dir.to_path_buf();
    while cur.starts_with(root) && cur != root {
        match std::fs::remove_dir(&cur) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            // Not empty: something else lives there; leave it.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => return Ok(()),
            Err(e) => return Err(Status::internal(format!("removing {}: {e}", cur.display()))),
        }
        if !cur.pop() {
            break;
        }
    }
    Ok(())
}

/// Base64 with padding; `url` picks the URL-safe alphabet (`-_` instead of `+/`).
pub fn base64(data: &[u8], url: bool) -> String {
    const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let sym = |v: u32| -> char {
        let c = STD[(v & 63) as usize];
        match (url, c) {
            (true, b'+') => '-',
            (true, b'/') => '_',
            _ => c as char,
        }
    };
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        out.push(sym(n >> 18));
        out.push(sym(n >> 12));
        out.push(if chunk.len() > 1 { sym(n >> 6) } else { '=' });
        out.push(if chunk.len() > 2 { sym(n) } else { '=' });
    }
    out
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes(), false), want);
        }
        assert_eq!(base64(&[0xfb, 0xff], false), "+/8=");
        assert_eq!(base64(&[0xfb, 0xff], true), "-_8=");
    }

    #[test]
    fn share_ids_are_stable_and_distinct() {
        let a = share_id("b/p", Path::new("/var/lib/kubelet/pods/1/volumes/x/mount"));
        assert_eq!(
            a,
            share_id("b/p", Path::new("/var/lib/kubelet/pods/1/volumes/x/mount"))
        );
        assert_ne!(
            a,
            share_id("b/p", Path::new("/var/lib/kubelet/pods/2/volumes/x/mount"))
        );
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn mount_info_is_kata_shaped_json() {
        let json = mount_info(Path::new("/run/berth/shares/a\"b.sock"), "v", "t", true);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["volume-type"], VOLUME_TYPE);
        assert_eq!(v["device"], "/run/berth/shares/a\"b.sock");
        assert_eq!(v["fstype"], "virtiofs");
        assert_eq!(v["metadata"]["volumeId"], "v");
        assert_eq!(v["options"][0], "ro");
    }

    #[test]
    fn mounter_values() {
        let ctx = |v: &str| HashMap::from([(MOUNTER_KEY.to_string(), v.to_string())]);
        assert!(!wants_share(&HashMap::new()).unwrap());
        assert!(!wants_share(&ctx("fuse")).unwrap());
        assert!(wants_share(&ctx("virtiofs")).unwrap());
        assert!(wants_share(&ctx("virtio-fs")).is_err());
    }
}
