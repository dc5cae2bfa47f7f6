//! The holder-engine channel: length-prefixed JSON messages over a unix socket, with file
//! descriptors (the FUSE queues, the shared region) passed as SCM_RIGHTS on a message.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::status::HolderFacts;

/// Most fds one message carries (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 250;
/// A message larger than this is refused (they are a few hundred bytes).
const MAX_MESSAGE: u32 = 1 << 20;

/// What the holder tells an engine when it starts it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Hello {
    pub generation: u64,
    pub facts: HolderFacts,
    pub mounts: Vec<MountHandoff>,
    /// The holder keeps its shares' VMM connections itself (a front per VMM) and attaches
    /// each to the engine ([`ToEngine::AttachVmm`]); no share listener follows in the hello.
    /// Older holders handed the listeners to the engine instead.
    #[serde(default)]
    pub vmm_front: bool,
}

/// One connection handed to an engine. Its fds follow in order: `queues` queue fds, then the
/// shared region.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountHandoff {
    pub source: String,
    pub mountpoint: PathBuf,
    pub conn: Option<u32>,
    pub queues: usize,
    /// The capability flags the kernel offered in FUSE INIT, once a predecessor saw them.
    pub init_capable: Option<u64>,
    /// Requests of a predecessor may be read but unanswered: send FUSE_NOTIFY_RESEND.
    pub resend: bool,
    /// virtio-fs shares of this volume (for the status). Holders before the VMM front
    /// (`Hello::vmm_front` false) sent one listening socket fd each after the shared region.
    #[serde(default)]
    pub shares: Vec<ShareSocket>,
    /// A volume without a FUSE connection (a standalone share) a predecessor served: the
    /// successor recovers its inode table, as for a mount whose INIT was seen.
    #[serde(default)]
    pub takeover: bool,
    /// The mount's state directory (inode journal, status file). Holders before per-mount
    /// digests sent none; the engine then uses the old name (`state::legacy_mount_dir`).
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
}

/// A vhost-user socket the holder bound (and keeps) for a share of a mount's volume: the
/// engine serves VMMs on it with the same filesystem, caches and inode numbers as the mount.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShareSocket {
    pub socket: PathBuf,
    pub request_queues: usize,
    pub queue_size: u16,
    /// A group whose processes may connect besides root (`--socket-group`).
    #[serde(default)]
    pub group: Option<u32>,
}

/// Most request queues a share offers (virtio-fs: one high-priority queue + up to 63).
pub const MAX_REQUEST_QUEUES: usize = 63;

impl ShareSocket {
    /// The queue settings are ones a virtio-fs device can have.
    pub fn check_settings(&self) -> anyhow::Result<()> {
        if self.request_queues == 0 || self.request_queues > MAX_REQUEST_QUEUES {
            anyhow::bail!("request queues must be between 1 and {MAX_REQUEST_QUEUES}");
        }
        if !self.queue_size.is_power_of_two() {
            anyhow::bail!("the queue size must be a power of two");
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ToEngine {
    Hello(Hello),
    /// Stop at a request boundary and exit (upgrade): files open for writing go on in the
    /// successor, from their spools.
    Stop,
    /// Stop for good (a standalone share stopping): files open for writing get up to 30 s
    /// to be closed first, since no successor will take them over.
    StopAfterWrites,
    /// New facts for the status (after a recovery completed).
    Facts(HolderFacts),
    /// From holders before the VMM front: serve a share on the attached listener. Ignored.
    AddShare {
        mount: usize,
        share: ShareSocket,
    },
    /// From holders before the VMM front. Ignored.
    RemoveShare {
        mount: usize,
        socket: PathBuf,
    },
    /// Serve the queues of VMM connection `connection` of share `socket` of mount `mount`.
    /// Attached: the link socket (the front's [`ToRings`] arrive on it), the virtqueue state
    /// region and the connection's reply journal.
    AttachVmm {
        mount: usize,
        socket: PathBuf,
        connection: u64,
    },
}

/// What a VMM connection's front tells the engine serving its queues (on the link socket).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ToRings {
    /// Serve the device as it is now; its fds are attached (`DeviceFds::to_list` order).
    Update(berth_vhost::device::DeviceState),
    /// Stop queue `queue` after its current request.
    Stop { queue: usize },
}

/// The engine's answer to each [`ToRings`].
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum FromRings {
    Done,
    Failed(String),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ToHolder {
    /// Serving every mount of the Hello.
    Ready { pid: u32 },
    /// The engine could not start; it exits after this.
    Failed { error: String },
    /// FUSE INIT was answered for mount `mount`.
    Init { mount: usize, capable: u64 },
    /// Stopped as asked: no request of the connection is being served any more.
    /// `open_writes_dropped` is 0 from engines with upload spools (their open writes go on
    /// in the successor); older engines reported the files whose writes would fail.
    Stopped { open_writes_dropped: usize },
    /// Every mount was unmounted; the engine committed what was open and exits.
    Unmounted,
}

/// Takes ownership of an fd number given on the command line (the engine's handoff socket).
///
/// # Safety
/// `fd` must be an open fd this process owns and nothing else will close.
pub unsafe fn adopt_fd(fd: RawFd) -> OwnedFd {
    OwnedFd::from_raw_fd(fd)
}

/// Sends `message` with `fds` attached.
pub fn send<T: Serialize>(sock: &UnixStream, message: &T, fds: &[RawFd]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "too many fds for one message",
        ));
    }
    let body = serde_json::to_vec(message)?;
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    if fds.is_empty() {
        return (&*sock).write_all(&frame);
    }
    // The fds ride on the first byte; the rest follows as plain stream data.
    send_with_fds(sock, &frame[..1], fds)?;
    (&*sock).write_all(&frame[1..])
}

fn send_with_fds(sock: &UnixStream, data: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let fd_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut _,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below points into live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer has room for one cmsg carrying `fds`.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast(), fds.len());
    }
    // SAFETY: msg is fully initialised.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Receives one message and the fds attached to it (closed-on-exec).
pub fn recv<T: for<'de> Deserialize<'de>>(sock: &UnixStream) -> io::Result<(T, Vec<File>)> {
    let mut first = [0u8; 1];
    let fds = recv_with_fds(sock, &mut first)?;
    let mut len = [0u8; 4];
    len[0] = first[0];
    (&*sock).read_exact(&mut len[1..])?;
    let len = u32::from_le_bytes(len);
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handoff message too large",
        ));
    }
    let mut body = vec![0u8; len as usize];
    (&*sock).read_exact(&mut body)?;
    let message = serde_json::from_slice(&body).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad handoff message: {e}"),
        )
    })?;
    Ok((message, fds))
}

fn recv_with_fds(sock: &UnixStream, data: &mut [u8]) -> io::Result<Vec<File>> {
    // SAFETY: CMSG_SPACE is a pure computation.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * 4) as u32) } as usize;
    let mut control = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; pointers set below point into live buffers.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    let n = loop {
        // SAFETY: msg is fully initialised; MSG_CMSG_CLOEXEC keeps fds from leaking to children.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        break n;
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    if n == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "peer closed the handoff socket",
        ));
    }
    let mut files = Vec::new();
    // SAFETY: walks the cmsgs the kernel wrote into `control`; each SCM_RIGHTS payload is an
    // array of fds now owned by this process.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload = (*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / 4 {
                    files.push(File::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "fds were truncated in transit",
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn messages_and_fds_cross_the_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(b"hello fd").unwrap();
        let hello = ToEngine::Hello(Hello {
            generation: 3,
            vmm_front: true,
            facts: HolderFacts {
                holder_pid: 1,
                detector: "fallback".into(),
                recoveries: 2,
                last_recovery_ms: Some(40),
                ..HolderFacts::default()
            },
            mounts: vec![MountHandoff {
                source: "s3://b".into(),
                mountpoint: "/mnt/x".into(),
                conn: Some(61),
                queues: 1,
                init_capable: Some(0xff),
                resend: true,
                shares: vec![ShareSocket {
                    socket: "/run/vm.sock".into(),
                    request_queues: 2,
                    queue_size: 512,
                    group: None,
                }],
                state_dir: Some("/run/berth/mounts/0123".into()),
                takeover: true,
            }],
        });
        let attach = ToEngine::AttachVmm {
            mount: 0,
            socket: "/run/vm.sock".into(),
            connection: 7,
        };
        send(&a, &hello, &[f.as_raw_fd()]).unwrap();
        send(&a, &attach, &[]).unwrap();
        send(&a, &ToEngine::Stop, &[]).unwrap();
        let (got, mut files): (ToEngine, _) = recv(&b).unwrap();
        assert_eq!(got, hello);
        let (got, _): (ToEngine, _) = recv(&b).unwrap();
        assert_eq!(got, attach);
        assert_eq!(files.len(), 1);
        let mut text = String::new();
        files[0].rewind().unwrap();
        files[0].read_to_string(&mut text).unwrap();
        assert_eq!(text, "hello fd");
        let (stop, none): (ToEngine, _) = recv(&b).unwrap();
        assert_eq!(stop, ToEngine::Stop);
        assert!(none.is_empty());
        drop(a);
        let eof = recv::<ToEngine>(&b).unwrap_err();
        assert_eq!(eof.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (a, b) = UnixStream::pair().unwrap();
        (&a).write_all(&5u32.to_le_bytes()).unwrap();
        (&a).write_all(b"{{{{{").unwrap();
        assert!(recv::<ToEngine>(&b).is_err());
        (&a).write_all(&u32::MAX.to_le_bytes()).unwrap();
        assert!(recv::<ToEngine>(&b).is_err());
    }
}
