//! The few bits of the FUSE wire protocol berth reads itself, outside fuse-backend-rs: the
//! request header (to route, journal and drain requests) and the RESEND notification.

use std::io;
use std::os::fd::RawFd;

pub const FUSE_LOOKUP: u32 = 1;
pub const FUSE_FORGET: u32 = 2;
pub const FUSE_SYMLINK: u32 = 6;
pub const FUSE_MKDIR: u32 = 9;
pub const FUSE_UNLINK: u32 = 10;
pub const FUSE_RMDIR: u32 = 11;
pub const FUSE_RENAME: u32 = 12;
pub const FUSE_OPEN: u32 = 14;
pub const FUSE_INIT: u32 = 26;
pub const FUSE_CREATE: u32 = 35;
pub const FUSE_BATCH_FORGET: u32 = 42;
pub const FUSE_RENAME2: u32 = 45;

/// Set by the kernel on the `unique` of a request it sends again after FUSE_NOTIFY_RESEND.
pub const UNIQUE_RESEND: u64 = 1 << 63;
/// `fuse_notify_code::FUSE_NOTIFY_RESEND` (kernel 6.9+).
const FUSE_NOTIFY_RESEND: i32 = 7;

/// `struct fuse_in_header` is 40 bytes.
pub const IN_HEADER_LEN: usize = 40;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    pub fn parse(bytes: &[u8]) -> Option<InHeader> {
        if bytes.len() < IN_HEADER_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes(bytes[i..i + 4].try_into().unwrap_or([0; 4]));
        let u64_at = |i: usize| u64::from_ne_bytes(bytes[i..i + 8].try_into().unwrap_or([0; 8]));
        Some(InHeader {
            len: u32_at(0),
            opcode: u32_at(4),
            unique: u64_at(8),
            nodeid: u64_at(16),
        })
    }

    /// The request id without the resend mark, the same for the first send and a resend.
    pub fn request_id(&self) -> u64 {
        self.unique & !UNIQUE_RESEND
    }

    pub fn is_resend(&self) -> bool {
        self.unique & UNIQUE_RESEND != 0
    }
}

/// Operations that change the store: applying one twice is visible (EEXIST, ENOENT), so their
/// replies are journaled and a resent copy gets the journaled reply instead.
pub fn is_non_idempotent(opcode: u32) -> bool {
    matches!(
        opcode,
        FUSE_MKDIR
            | FUSE_SYMLINK
            | FUSE_UNLINK
            | FUSE_RMDIR
            | FUSE_RENAME
            | FUSE_RENAME2
            | FUSE_CREATE
    )
}

/// Whether a request opens a file for writing (create, or open with write access): while an
/// engine drains for an upgrade these are left for its successor.
pub fn opens_for_write(header: &InHeader, request: &[u8]) -> bool {
    match header.opcode {
        FUSE_CREATE => true,
        FUSE_OPEN => request
            .get(IN_HEADER_LEN..IN_HEADER_LEN + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
            .is_some_and(|flags| flags as i32 & libc::O_ACCMODE != libc::O_RDONLY),
        _ => false,
    }
}

/// The unique of a reply (`struct fuse_out_header` = len u32, error i32, unique u64).
pub fn set_reply_unique(reply: &mut [u8], unique: u64) {
    if reply.len() >= 16 {
        reply[8..16].copy_from_slice(&unique.to_ne_bytes());
    }
}

/// Asks the kernel to queue again every request that was read from this connection but not
/// answered (kernel 6.9+). A successor engine sends it once, before it starts reading, so that
/// only its dead predecessor's requests come back.
pub fn notify_resend(fd: RawFd) -> io::Result<()> {
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&16u32.to_ne_bytes());
    header[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
    // SAFETY: writes 16 bytes from a valid buffer to an fd we own.
    let n = unsafe { libc::write(fd, header.as_ptr().cast(), header.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: u32, unique: u64, extra: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; IN_HEADER_LEN];
        b[0..4].copy_from_slice(&((IN_HEADER_LEN + extra.len()) as u32).to_ne_bytes());
        b[4..8].copy_from_slice(&opcode.to_ne_bytes());
        b[8..16].copy_from_slice(&unique.to_ne_bytes());
        b[16..24].copy_from_slice(&7u64.to_ne_bytes());
        b.extend_from_slice(extra);
        b
    }

    #[test]
    fn parses_headers_and_resend_marks() {
        let bytes = header(FUSE_MKDIR, 42 | UNIQUE_RESEND, &[]);
        let h = InHeader::parse(&bytes).unwrap();
        assert_eq!(h.opcode, FUSE_MKDIR);
        assert_eq!(h.nodeid, 7);
        assert!(h.is_resend());
        assert_eq!(h.request_id(), 42);
        assert!(InHeader::parse(&bytes[..39]).is_none());
    }

    #[test]
    fn write_opens_are_told_apart_from_read_opens() {
        let ro = header(FUSE_OPEN, 1, &(libc::O_RDONLY as u32).to_ne_bytes());
        let rw = header(
            FUSE_OPEN,
            1,
            &((libc::O_WRONLY | libc::O_TRUNC) as u32).to_ne_bytes(),
        );
        let create = header(FUSE_CREATE, 1, &[0; 16]);
        let parse = |b: &[u8]| InHeader::parse(b).unwrap();
        assert!(!opens_for_write(&parse(&ro), &ro));
        assert!(opens_for_write(&parse(&rw), &rw));
        assert!(opens_for_write(&parse(&create), &create));
        let short = header(FUSE_OPEN, 1, &[]);
        assert!(!opens_for_write(&parse(&short), &short));
    }

    #[test]
    fn reply_unique_is_rewritten() {
        let mut reply = vec![0u8; 16];
        set_reply_unique(&mut reply, 9 | UNIQUE_RESEND);
        assert_eq!(
            u64::from_ne_bytes(reply[8..16].try_into().unwrap()),
            9 | UNIQUE_RESEND
        );
    }
}
