//! Thin safe wrappers over the `*at` syscalls the local store resolves keys with, and what
//! fstat tells about a file.
//!
//! They exist so that `beneath.rs` can say what it resolves and why without an `unsafe`
//! block in every line: each wrapper here takes borrowed fds and checked C strings, retries
//! EINTR, and returns owned fds and `io::Error`s. None of them follows a symlink.

use std::ffi::{CStr, OsStr, OsString};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use libc::c_int;

/// What a directory entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Regular,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Unknown,
}

impl Kind {
    fn of(mode: libc::mode_t) -> Kind {
        match mode & libc::S_IFMT {
            libc::S_IFREG => Kind::Regular,
            libc::S_IFDIR => Kind::Dir,
            libc::S_IFLNK => Kind::Symlink,
            libc::S_IFIFO => Kind::Fifo,
            libc::S_IFSOCK => Kind::Socket,
            libc::S_IFCHR => Kind::CharDevice,
            libc::S_IFBLK => Kind::BlockDevice,
            _ => Kind::Unknown,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Regular => "regular file",
            Kind::Dir => "directory",
            Kind::Symlink => "symlink",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
            Kind::CharDevice => "character device",
            Kind::BlockDevice => "block device",
            Kind::Unknown => "unknown file type",
        }
    }

    /// Whether the store serves entries of this kind.
    pub fn is_served(self) -> bool {
        matches!(self, Kind::Regular | Kind::Dir)
    }
}

/// What fstat says about a file, as far as the store cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: i64,
    pub mtime_nsec: i64,
}

impl Meta {
    fn from_stat(st: &libc::stat) -> Meta {
        Meta {
            kind: Kind::of(st.st_mode),
            dev: st.st_dev,
            ino: st.st_ino,
            size: u64::try_from(st.st_size).unwrap_or(0),
            mtime: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec,
        }
    }
}

pub(super) fn dot() -> &'static CStr {
    c"."
}

/// Whether this kernel (and any seccomp filter in front of it) lets berth call openat2.
pub fn openat2_supported() -> bool {
    // SAFETY: AT_FDCWD is a constant the *at calls take in place of a directory fd; it is only
    // borrowed here, never closed.
    let cwd = unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) };
    match openat2(cwd, dot(), libc::O_PATH | libc::O_DIRECTORY) {
        Ok(_) => true,
        // ENOSYS: no such syscall; EPERM: a seccomp profile that predates it.
        Err(e) => !matches!(e.raw_os_error(), Some(libc::ENOSYS) | Some(libc::EPERM)),
    }
}

/// openat2(2) beneath `dir`, never following a symlink (the trailing component included:
/// with `O_PATH` a trailing symlink comes back as the link itself, otherwise ELOOP).
pub(super) fn openat2(dir: BorrowedFd<'_>, path: &CStr, flags: c_int) -> io::Result<OwnedFd> {
    // SAFETY: open_how is three u64 fields; all zeroes is a valid value (and the one the
    // kernel requires of every field not set below).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // EAGAIN: the kernel saw a rename race it could not rule out; a few retries settle it.
    for _ in 0..16 {
        // SAFETY: `path` is NUL-terminated and outlives the call, `how` is a valid open_how of
        // the size passed, `dir` is an open fd (or AT_FDCWD) for the duration of the call.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if ret >= 0 {
            // SAFETY: the kernel just returned this fd; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(ret as RawFd) });
        }
        let e = io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EAGAIN)) {
            return Err(e);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EAGAIN))
}

/// openat(2) of one component (no `/`), never following it if it is a symlink.
pub(super) fn openat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is an open fd.
        let fd = unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just returned this fd; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Meta> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is valid for writes of one struct stat; `fd` is open.
    if unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat succeeded, so it filled `st`.
    Ok(Meta::from_stat(unsafe { st.assume_init_ref() }))
}

/// lstat of one entry of `dir` (a symlink is described, never followed).
pub(super) fn fstatat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Meta> {
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated, `st` is valid for writes of one struct stat, `dir` is
    // an open fd.
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(Meta::from_stat(unsafe { st.assume_init_ref() }))
}

pub(super) fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: c_int) -> io::Result<()> {
    // SAFETY: `name` is NUL-terminated and outlives the call; `dir` is an open fd.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The names in a directory opened for reading (`.` and `..` left out).
pub(super) fn entry_names(dir: &OwnedFd) -> io::Result<Vec<OsString>> {
    struct Stream(*mut libc::DIR);
    impl Drop for Stream {
        fn drop(&mut self) {
            // SAFETY: the stream came from fdopendir and is closed only here.
            unsafe { libc::closedir(self.0) };
        }
    }
    let raw = dir.try_clone()?.into_raw_fd();
    // SAFETY: `raw` is an fd we own, open for reading on a directory; fdopendir takes it over.
    let ptr = unsafe { libc::fdopendir(raw) };
    if ptr.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `raw` is still ours to close, once.
        unsafe { libc::close(raw) };
        return Err(e);
    }
    let stream = Stream(ptr);
    let mut names = Vec::new();
    loop {
        // SAFETY: errno is thread-local; clearing it tells the end of the stream (NULL, errno
        // 0) from an error (NULL, errno set).
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream.0` is a valid DIR* until `stream` is dropped.
        let ent = unsafe { libc::readdir(stream.0) };
        if ent.is_null() {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(0) {
                break;
            }
            return Err(e);
        }
        // SAFETY: readdir returned an entry whose d_name is NUL-terminated; it stays valid
        // until the next readdir on this stream, and is copied out before then.
        let name = unsafe { CStr::from_ptr((*ent).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(OsStr::from_bytes(name).to_os_string());
        }
    }
    Ok(names)
}

/// The extended attribute holding an object's POSIX metadata (`PosixMeta::to_text`).
const META_XATTR: &CStr = c"user.berth.meta";
/// The metadata text is a few short lines; anything longer is not ours.
const META_MAX: usize = 1024;

/// The metadata text stored on the open file or directory `fd`; `None` if there is none or the
/// filesystem keeps no user extended attributes.
pub fn get_meta(fd: BorrowedFd<'_>) -> io::Result<Option<String>> {
    let mut buf = [0u8; META_MAX];
    // SAFETY: the name is NUL-terminated, `buf` is valid for writes of its length, `fd` is open.
    let n = unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            META_XATTR.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA | libc::EOPNOTSUPP | libc::ERANGE) => Ok(None),
            _ => Err(e),
        };
    }
    let n = usize::try_from(n).unwrap_or(0).min(buf.len());
    Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned()))
}

/// Stores `text` as the metadata of the open file or directory `fd` (removes it if empty).
/// EOPNOTSUPP: the filesystem keeps no user extended attributes.
pub fn set_meta(fd: BorrowedFd<'_>, text: &str) -> io::Result<()> {
    // SAFETY: the name is NUL-terminated, the value is valid for reads of its length, `fd` is
    // open.
    let ret = unsafe {
        if text.is_empty() {
            libc::fremovexattr(fd.as_raw_fd(), META_XATTR.as_ptr())
        } else {
            libc::fsetxattr(
                fd.as_raw_fd(),
                META_XATTR.as_ptr(),
                text.as_ptr().cast(),
                text.len(),
                0,
            )
        }
    };
    if ret != 0 {
        let e = io::Error::last_os_error();
        if text.is_empty() && e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}
