//! The vhost-user sockets of a held mount's virtio-fs shares. The holder binds each share's vhost-user socket and
//! keeps the listening fd, like it keeps the /dev/fuse fds: every engine generation gets a
//! copy and accepts VMMs on it, so the socket path stays valid across engine crashes and
//! upgrades (a VMM that reconnects finds the successor; one that does not sees its device go
//! away, as with any vhost-user backend that dies).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::handoff::ShareSocket;
use crate::sys::sockets::{self, Peers};

pub struct HeldShare {
    pub spec: ShareSocket,
    pub listener: UnixListener,
}

impl HeldShare {
    /// Binds `spec.socket`, open to root and `spec.group` only: its directory is created, a
    /// stale socket replaced; a live socket, or anything that is not a socket, is refused.
    pub fn bind(spec: ShareSocket) -> anyhow::Result<HeldShare> {
        check(&spec)?;
        let socket = &spec.socket;
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the socket directory {}", dir.display()))?;
        }
        let listener = sockets::listen(socket, Peers { group: spec.group })
            .with_context(|| format!("listening on {}", socket.display()))?;
        Ok(HeldShare { spec, listener })
    }

    /// Removes the socket file (the listener closes when this is dropped).
    pub fn unlink(&self) {
        let _ = std::fs::remove_file(&self.spec.socket);
    }
}

fn check(spec: &ShareSocket) -> anyhow::Result<()> {
    if !spec.socket.is_absolute() || spec.socket.file_name().is_none() {
        bail!(
            "the share socket {} must be an absolute path to a file",
            spec.socket.display()
        );
    }
    spec.check_settings()
}

/// Index of the share on `socket`, if any.
pub fn find(shares: &[HeldShare], socket: &Path) -> Option<usize> {
    shares.iter().position(|s| s.spec.socket == socket)
}

/// The sockets of `shares` (for status and logs).
pub fn sockets(shares: &[HeldShare]) -> Vec<PathBuf> {
    shares.iter().map(|s| s.spec.socket.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(socket: PathBuf) -> ShareSocket {
        ShareSocket {
            socket,
            request_queues: 1,
            queue_size: 1024,
            group: None,
        }
    }

    #[test]
    fn binding_replaces_stale_sockets_and_refuses_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a/fs.sock");
        let first = HeldShare::bind(spec(sock.clone())).unwrap();
        drop(first);
        // The file of a dead listener is still there: it is replaced.
        let second = HeldShare::bind(spec(sock.clone())).unwrap();
        second.unlink();
        assert!(!sock.exists());
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"keep me").unwrap();
        let err = HeldShare::bind(spec(plain.clone())).err().unwrap();
        assert!(format!("{err:#}").contains("not a socket"), "{err:#}");
        assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
    }

    #[test]
    fn bad_settings_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec(dir.path().join("fs.sock"));
        s.request_queues = 0;
        assert!(HeldShare::bind(s.clone()).is_err());
        s.request_queues = 64;
        assert!(HeldShare::bind(s.clone()).is_err());
        s.request_queues = 2;
        s.queue_size = 1000;
        assert!(HeldShare::bind(s.clone()).is_err());
        assert!(HeldShare::bind(spec(PathBuf::from("relative.sock"))).is_err());
    }
}
