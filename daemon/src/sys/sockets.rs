//! The unix sockets berth listens on, and who may connect to them.
//!
//! Every socket berth serves is privileged: the daemon's API mounts anything anywhere, the
//! node cache can fill or empty every volume's cache, a holder's control socket upgrades its
//! engine, a share's socket hands a VMM a filesystem. So each is created with its final mode
//! already in place ([`listen`]: the mode is set on the socket before bind, and there is no
//! moment where the file exists with a wider one), and each connection's peer is checked
//! with SO_PEERCRED ([`Peers`]): root, or the members of one configured group.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The uid, gid and pid of the process at the other end of a connected unix socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

pub fn peer_cred(fd: RawFd) -> io::Result<PeerCred> {
    // SAFETY: ucred is plain data; getsockopt fills at most `len` bytes of it.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: a valid out pointer and length for SO_PEERCRED.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(PeerCred {
        pid: cred.pid,
        uid: cred.uid,
        gid: cred.gid,
    })
}

/// Who may connect: root always; the processes whose group is `group`, if one is given.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peers {
    pub group: Option<u32>,
}

impl Peers {
    /// Root only.
    pub const ROOT: Peers = Peers { group: None };

    /// Whether the peer of the connected socket `fd` may talk to us. A peer whose
    /// credentials cannot be read is refused.
    pub fn allow(&self, fd: RawFd, what: &str) -> bool {
        match peer_cred(fd) {
            Ok(peer) if peer.uid == 0 || Some(peer.gid) == self.group => true,
            Ok(peer) => {
                tracing::warn!(
                    socket = what,
                    peer_pid = peer.pid,
                    peer_uid = peer.uid,
                    peer_gid = peer.gid,
                    "refused a connection from a process that is neither root nor in the allowed group"
                );
                false
            }
            Err(e) => {
                tracing::warn!(socket = what, error = %e, "refused a connection whose peer is unknown");
                false
            }
        }
    }

    /// The mode a socket file needs for these peers: 0600 for root only, 0660 with a group
    /// (the file is then chowned to the group).
    pub fn mode(&self) -> u32 {
        if self.group.is_some() {
            0o660
        } else {
            0o600
        }
    }
}

/// A group's id from its name (or its number).
pub fn group_id(name: &str) -> io::Result<u32> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "group name contains NUL"))?;
    // SAFETY: group is plain data; getgrnam_r fills it with pointers into `buf`, which
    // outlives every use of them (only gr_gid is read).
    let mut group: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut found: *mut libc::group = std::ptr::null_mut();
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut group,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no group named {name:?}"),
        ));
    }
    Ok(group.gr_gid)
}

/// Binds and listens on a unix stream socket at `path` that only `peers` can open: the
/// socket's mode is set before bind (Linux creates the file with it), and for a group the
/// file is chowned before listen, so nobody else can ever connect. A file already at `path`
/// is refused unless it is a socket nobody listens on (a stale one, replaced); a live socket
/// is never taken over. The parent directory must exist.
pub fn listen(path: &Path, peers: Peers) -> io::Result<UnixListener> {
    remove_stale(path)?;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = c.as_bytes_with_nul();
    if bytes.len() > addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is longer than {} bytes",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: a new socket; the fd is owned by `sock` below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is not owned elsewhere.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: calls on the fd we own, with a filled-in sockaddr_un.
    unsafe {
        if libc::fchmod(sock.as_raw_fd(), peers.mode()) != 0 {
            return Err(io::Error::last_os_error());
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        if libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), len) != 0 {
            return Err(io::Error::last_os_error());
        }
        // The umask may have narrowed the mode further; a group needs its bits back.
        if libc::chmod(c.as_ptr(), peers.mode()) != 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(group) = peers.group {
            // uid -1: the owner stays (root when the daemon runs as root).
            if libc::chown(c.as_ptr(), u32::MAX, group) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if libc::listen(sock.as_raw_fd(), 128) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(UnixListener::from(sock))
}

/// Removes a stale socket at `path` (nobody listens on it); refuses any other file and a live
/// socket.
pub fn remove_stale(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if is_listening(path) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is a live socket another process listens on; refusing to replace it",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            ),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether a stream socket listens on the unix socket path `path`, from /proc/net/unix. (A
/// probe connect would do, but a vhost-user backend takes any connection for its VMM, and
/// one that leaves at once may end it.)
pub fn is_listening(path: &Path) -> bool {
    const ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read("/proc/net/unix") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    table.split(|b| *b == b'\n').skip(1).any(|line| {
        // Num RefCount Protocol Flags Type St Inode Path
        let mut fields = line.split(|b| *b == b' ').filter(|f| !f.is_empty());
        let flags = fields.nth(3).and_then(|f| {
            std::str::from_utf8(f)
                .ok()
                .and_then(|f| u32::from_str_radix(f, 16).ok())
        });
        let stream = fields.next() == Some(b"0001");
        let path = fields.nth(2);
        stream && flags.is_some_and(|f| f & ACCEPTCON != 0) && path == Some(want)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;

    #[test]
    fn sockets_are_born_private_and_peers_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("api.sock");
        let listener = listen(&path, Peers::ROOT).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let client = UnixStream::connect(&path).unwrap();
        let (served, _) = listener.accept().unwrap();
        let me = peer_cred(served.as_raw_fd()).unwrap();
        assert_eq!(me.pid as u32, std::process::id());
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        assert_eq!((me.uid, me.gid), (uid, gid));
        let allowed = Peers::ROOT.allow(served.as_raw_fd(), "test");
        assert_eq!(allowed, uid == 0);
        assert!(Peers { group: Some(gid) }.allow(served.as_raw_fd(), "test"));
        drop(client);
    }

    #[test]
    fn live_sockets_and_other_files_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.sock");
        let live = listen(&path, Peers::ROOT).unwrap();
        assert!(is_listening(&path));
        let err = listen(&path, Peers::ROOT).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
        drop(live);
        // The file of a dead listener is stale: replaced.
        assert!(!is_listening(&path));
        let _again = listen(&path, Peers::ROOT).unwrap();
        let plain = dir.path().join("plain");
        std::fs::write(&plain, b"keep me").unwrap();
        assert!(listen(&plain, Peers::ROOT).is_err());
        assert_eq!(std::fs::read(&plain).unwrap(), b"keep me");
    }

    #[test]
    fn groups_are_found_by_name_or_number() {
        assert_eq!(group_id("root").unwrap(), 0);
        assert_eq!(group_id("4242").unwrap(), 4242);
        assert!(group_id("no-such-group-berth").is_err());
    }

    #[test]
    fn a_group_socket_is_the_groups() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sock");
        // SAFETY: getgid has no preconditions.
        let gid = unsafe { libc::getgid() };
        let _l = listen(&path, Peers { group: Some(gid) }).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
    }
}
