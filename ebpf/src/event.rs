//! The events FuseWatch reports, and the decoding of the kernel's ring-buffer records.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::Duration;

/// Something went wrong with a watched FUSE server or connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The last thread of a process registered with
    /// [`FuseWatch::watch_process`](crate::FuseWatch::watch_process) exited.
    EngineExited {
        tgid: u32,
        /// How it ended (`.signal()` is `Some(9)` after SIGKILL, `.code()` after exit()).
        status: ExitStatus,
        /// CLOCK_MONOTONIC time at which the kernel saw the exit (see [`monotonic_now`]).
        at: Duration,
    },
    /// A request of a watched connection ended with `-ECONNABORTED` or `-ENOTCONN`:
    /// the connection was aborted (fusectl `abort`, request timeout) or its last
    /// /dev/fuse fd was closed. Reported once per registration.
    ConnectionAborted {
        conn: u32,
        /// The epoch [`FuseWatch::watch_connection`](crate::FuseWatch::watch_connection) returned.
        epoch: u64,
        /// The (negative) errno the request ended with.
        error: i32,
        /// Opcode of the request that revealed the abort.
        opcode: u32,
        /// CLOCK_MONOTONIC time at which the kernel ended that request.
        at: Duration,
    },
    /// A request of a watched connection has been in flight (sent, not ended)
    /// for longer than the stall threshold. Reported once per request.
    RequestStalled {
        conn: u32,
        epoch: u64,
        /// The FUSE `unique` id, or 0 if the kernel had not numbered the request
        /// yet when it was seen (fentry mode sees it before numbering).
        unique: u64,
        opcode: u32,
        /// Age of the request at the scan that found it.
        age: Duration,
    },
}

/// CLOCK_MONOTONIC now, the clock of [`Event`] timestamps (`bpf_ktime_get_ns`).
pub fn monotonic_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A short name for a FUSE opcode, for logs ("GETATTR"); "?" if unknown.
pub fn opcode_name(opcode: u32) -> &'static str {
    const NAMES: &[(u32, &str)] = &[
        (1, "LOOKUP"),
        (2, "FORGET"),
        (3, "GETATTR"),
        (4, "SETATTR"),
        (5, "READLINK"),
        (6, "SYMLINK"),
        (8, "MKNOD"),
        (9, "MKDIR"),
        (10, "UNLINK"),
        (11, "RMDIR"),
        (12, "RENAME"),
        (13, "LINK"),
        (14, "OPEN"),
        (15, "READ"),
        (16, "WRITE"),
        (17, "STATFS"),
        (18, "RELEASE"),
        (20, "FSYNC"),
        (21, "SETXATTR"),
        (22, "GETXATTR"),
        (23, "LISTXATTR"),
        (24, "REMOVEXATTR"),
        (25, "FLUSH"),
        (26, "INIT"),
        (27, "OPENDIR"),
        (28, "READDIR"),
        (29, "RELEASEDIR"),
        (30, "FSYNCDIR"),
        (31, "GETLK"),
        (32, "SETLK"),
        (33, "SETLKW"),
        (34, "ACCESS"),
        (35, "CREATE"),
        (36, "INTERRUPT"),
        (37, "BMAP"),
        (38, "DESTROY"),
        (39, "IOCTL"),
        (40, "POLL"),
        (41, "NOTIFY_REPLY"),
        (42, "BATCH_FORGET"),
        (43, "FALLOCATE"),
        (44, "READDIRPLUS"),
        (45, "RENAME2"),
        (46, "LSEEK"),
        (47, "COPY_FILE_RANGE"),
        (48, "SETUPMAPPING"),
        (49, "REMOVEMAPPING"),
        (50, "SYNCFS"),
        (51, "TMPFILE"),
        (52, "STATX"),
    ];
    NAMES
        .iter()
        .find(|(op, _)| *op == opcode)
        .map_or("?", |(_, name)| name)
}

/// Record kinds, as `EV_*` in fusewatch.bpf.c.
const EV_EXIT: u32 = 1;
const EV_ABORT: u32 = 2;

/// Size of `struct event` in fusewatch.bpf.c.
pub(crate) const RAW_EVENT_LEN: usize = 32;

/// Why a ring-buffer record could not be decoded (a loader/program mismatch).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("ring-buffer record of {0} bytes, expected {RAW_EVENT_LEN}")]
    Length(usize),
    #[error("ring-buffer record of unknown kind {0}")]
    Kind(u32),
}

/// Decodes one `struct event` record (native endianness, as the kernel wrote it).
///
/// Layout: kind u32 @0, id u32 @4, epoch u64 @8, code i32 @16, opcode u32 @20,
/// ktime_ns u64 @24.
pub(crate) fn decode(record: &[u8]) -> Result<Event, DecodeError> {
    let rec: &[u8; RAW_EVENT_LEN] = record
        .try_into()
        .map_err(|_| DecodeError::Length(record.len()))?;
    let u32_at = |o: usize| u32::from_ne_bytes([rec[o], rec[o + 1], rec[o + 2], rec[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&rec[o..o + 8]);
        u64::from_ne_bytes(b)
    };
    let (kind, id, epoch) = (u32_at(0), u32_at(4), u64_at(8));
    let code = u32_at(16) as i32;
    let opcode = u32_at(20);
    let at = Duration::from_nanos(u64_at(24));
    match kind {
        EV_EXIT => Ok(Event::EngineExited {
            tgid: id,
            status: ExitStatus::from_raw(code),
            at,
        }),
        EV_ABORT => Ok(Event::ConnectionAborted {
            conn: id,
            epoch,
            error: code,
            opcode,
            at,
        }),
        other => Err(DecodeError::Kind(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a record the way the C struct lays it out.
    fn record(kind: u32, id: u32, epoch: u64, code: i32, opcode: u32, ktime: u64) -> Vec<u8> {
        let mut v = Vec::with_capacity(RAW_EVENT_LEN);
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(&id.to_ne_bytes());
        v.extend_from_slice(&epoch.to_ne_bytes());
        v.extend_from_slice(&code.to_ne_bytes());
        v.extend_from_slice(&opcode.to_ne_bytes());
        v.extend_from_slice(&ktime.to_ne_bytes());
        v
    }

    #[test]
    fn decodes_exit_by_sigkill() {
        let ev = decode(&record(EV_EXIT, 4242, 0, 9, 0, 1_500_000_123)).unwrap();
        let Event::EngineExited { tgid, status, at } = ev else {
            panic!("wrong kind: {ev:?}");
        };
        assert_eq!(tgid, 4242);
        assert_eq!(status.signal(), Some(9));
        assert_eq!(status.code(), None);
        assert_eq!(at, Duration::new(1, 500_000_123));
    }

    #[test]
    fn decodes_exit_with_status() {
        let ev = decode(&record(EV_EXIT, 7, 0, 3 << 8, 0, 0)).unwrap();
        let Event::EngineExited { status, .. } = ev else {
            panic!("wrong kind: {ev:?}");
        };
        assert_eq!(status.code(), Some(3));
        assert_eq!(status.signal(), None);
    }

    #[test]
    fn decodes_abort() {
        let ev = decode(&record(EV_ABORT, 61, u64::MAX - 1, -103, 3, 99)).unwrap();
        assert_eq!(
            ev,
            Event::ConnectionAborted {
                conn: 61,
                epoch: u64::MAX - 1,
                error: -103,
                opcode: 3,
                at: Duration::from_nanos(99),
            }
        );
    }

    #[test]
    fn rejects_bad_records() {
        assert_eq!(decode(&[0; 31]), Err(DecodeError::Length(31)));
        assert_eq!(decode(&[0; 40]), Err(DecodeError::Length(40)));
        assert_eq!(decode(&record(9, 1, 1, 1, 1, 1)), Err(DecodeError::Kind(9)));
    }

    #[test]
    fn names_opcodes() {
        assert_eq!(opcode_name(3), "GETATTR");
        assert_eq!(opcode_name(26), "INIT");
        assert_eq!(opcode_name(7), "?");
    }
}
