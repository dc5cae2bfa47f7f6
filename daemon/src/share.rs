//! `berth share`: the virtio-fs door as a command.
//!
//! Two ways to run it:
//! - `berth share SOURCE --socket PATH`: a holder of its own (as `berth mount` is) with no
//!   FUSE mount: it keeps the socket and every VMM connection, and an engine it starts (and
//!   replaces when it dies, hangs or is upgraded) serves the guests' queues;
//! - `berth share --mount MOUNTPOINT --socket PATH [--remove]`: asks the holder of a running
//!   `berth mount` to offer (or stop offering) its volume on the socket, served by the same
//!   engine, with the same inode table and block cache as the mount.
//!
//! Either way the VMM talks to the holder (`heal::vmm`), never to an engine.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use crate::heal::control::{self, ControlRequest};
use crate::heal::handoff::ShareSocket;
use crate::heal::holder::HolderConfig;

/// What `berth share` does.
#[derive(Clone, Debug)]
pub enum ShareConfig {
    /// Hold the standalone share(s) of the config (a target's mountpoint is its socket path as
    /// given) and serve them through engines of their own.
    Serve(Box<HolderConfig>),
    /// Ask the holder of the mount at `mountpoint` to serve its volume on `socket`.
    Attach {
        mountpoint: PathBuf,
        socket: ShareSocket,
        state_dir: PathBuf,
    },
    /// Ask the holder of the mount at `mountpoint` to stop serving `socket`.
    Remove {
        mountpoint: PathBuf,
        socket: PathBuf,
        state_dir: PathBuf,
    },
}

pub fn run(config: ShareConfig) -> anyhow::Result<()> {
    match config {
        ShareConfig::Serve(mut holder) => {
            // One absolute name for the socket: state files and `berth status SOCKET` agree.
            for (target, socket) in &mut holder.standalone {
                let path = socket_path(&socket.socket)?;
                target.mountpoint = path.clone();
                socket.socket = path;
            }
            crate::heal::holder::run(*holder)
        }
        ShareConfig::Attach {
            mountpoint,
            socket,
            state_dir,
        } => {
            let socket_path = socket_path(&socket.socket)?;
            let request = ControlRequest::AddShare {
                socket: socket_path,
                request_queues: socket.request_queues,
                queue_size: socket.queue_size,
                group: socket.group,
            };
            ask_holder(&state_dir, &mountpoint, &request)
        }
        ShareConfig::Remove {
            mountpoint,
            socket,
            state_dir,
        } => {
            let request = ControlRequest::RemoveShare {
                socket: socket_path(&socket)?,
            };
            ask_holder(&state_dir, &mountpoint, &request)
        }
    }
}

/// Sends a share request to the holder of a running mount and prints its answer.
fn ask_holder(state_dir: &Path, mountpoint: &Path, request: &ControlRequest) -> anyhow::Result<()> {
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("{} does not exist", mountpoint.display()))?;
    let reply = control::ask(state_dir, &mountpoint, request)?;
    if !reply.ok {
        bail!("{}: {}", mountpoint.display(), reply.message);
    }
    println!("berth: {} ({})", reply.message, mountpoint.display());
    Ok(())
}

/// The socket's absolute path (its directory is created if missing), so that state files
/// and `berth status SOCKET` agree on one name.
fn socket_path(socket: &Path) -> anyhow::Result<PathBuf> {
    let name = socket
        .file_name()
        .with_context(|| format!("--socket {} names no file", socket.display()))?;
    let dir = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("socket directory {}", dir.display()))?;
    let path = dir.join(name);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_are_absolute_and_never_replace_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sub/fs.sock");
        let path = socket_path(&sock).unwrap();
        assert!(path.is_absolute());
        assert!(path.ends_with("sub/fs.sock"));
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(socket_path(&file).is_err());
    }
}
