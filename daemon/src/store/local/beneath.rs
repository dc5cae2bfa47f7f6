//! The local store's one door to the filesystem: every key is resolved beneath the root
//! directory's file descriptor, and nothing on the way is ever followed if it is a symlink.
//!
//! berth runs as root and serves the directory to pods and VM guests, who are hostile by
//! assumption, and whoever can change the directory (or race berth while it works) must not
//! make berth read, create or remove anything outside it, nor hang it on a FIFO, nor make it
//! open a device. So no path is built from strings and handed to the kernel: a key becomes
//! checked components, resolved from the root's `O_PATH` fd with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`, or, where the kernel has no openat2 (or the walk is asked for,
//! [`Resolver::Walk`]), with one `openat(O_PATH | O_NOFOLLOW)` per component, each checked to
//! be a directory before the next is opened below it. Only regular files are opened for I/O,
//! and only through the `O_PATH` fd that fstat said is one; new files are created `O_EXCL` in a
//! directory fd and renamed into a directory fd resolved the same way; unlinks name an entry of
//! such a directory fd. Everything else is not served: [`not_served`] (ENOENT-like) errors.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use libc::c_int;

use super::sys::{
    dot, entry_names, fstat, fstatat, openat, openat2, openat2_supported, unlinkat, Kind, Meta,
};

/// How keys are resolved beneath the root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolver {
    /// `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`: one syscall per key (Linux 5.6+).
    Openat2,
    /// One `openat(O_PATH | O_NOFOLLOW)` per component: where openat2 is missing.
    Walk,
}

impl Resolver {
    /// Environment variable that selects [`Resolver::Walk`] (`=1`) even where openat2 exists.
    pub const ENV: &'static str = "BERTH_LOCAL_NO_OPENAT2";

    /// The resolver asked for by the value of [`Resolver::ENV`].
    pub fn from_env_value(value: Option<&OsStr>) -> Resolver {
        match value.map(OsStr::as_bytes) {
            Some(b"1") | Some(b"true") | Some(b"yes") => Resolver::Walk,
            _ => Resolver::Openat2,
        }
    }

    pub fn from_env() -> Resolver {
        Resolver::from_env_value(std::env::var_os(Resolver::ENV).as_deref())
    }
}

/// One entry of a directory listing.
pub struct Entry {
    pub name: OsString,
    pub meta: Meta,
}

/// Something the store does not serve (a symlink, FIFO, socket, device) where a regular file
/// or directory was looked for.
#[derive(Debug)]
pub struct NotServed {
    pub what: String,
    pub kind: Kind,
}

impl std::fmt::Display for NotServed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} is a {}, which the local store does not serve",
            self.what,
            self.kind.name()
        )
    }
}

impl std::error::Error for NotServed {}

/// The error for a [`NotServed`] entry: it reads as not found (`io::ErrorKind::NotFound`,
/// no errno).
pub fn not_served(what: &str, kind: Kind) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        NotServed {
            what: what.to_string(),
            kind,
        },
    )
}

/// The kind of entry a [`not_served`] error found.
pub fn not_served_kind(e: &io::Error) -> Option<Kind> {
    e.get_ref()?.downcast_ref::<NotServed>().map(|n| n.kind)
}

/// Whether `e` came from a symlink on the way or a component that is not a directory: the
/// key names nothing the store serves.
pub fn is_not_beneath(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ELOOP) | Some(libc::ENOTDIR) | Some(libc::EXDEV)
    )
}

fn component(name: &str) -> io::Result<CString> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The ok-for-a-directory check of the walk: ELOOP for a symlink, ENOTDIR for anything else.
fn require_dir(fd: &OwnedFd) -> io::Result<()> {
    match fstat(fd.as_fd())?.kind {
        Kind::Dir => Ok(()),
        Kind::Symlink => Err(io::Error::from_raw_os_error(libc::ELOOP)),
        _ => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
    }
}

/// The root of a local store: an `O_PATH` fd of the directory and the way keys are resolved
/// below it. Every method takes components already split from a key (no `/`, no `.`/`..`, no
/// NUL; checked again here).
pub struct Root {
    fd: OwnedFd,
    /// Whether openat2 is in use: false when the walk was asked for or openat2 is missing.
    openat2: AtomicBool,
}

impl Root {
    pub fn open(path: &Path, want: Resolver) -> io::Result<Root> {
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(path)?;
        let use_openat2 = want == Resolver::Openat2 && openat2_supported();
        if want == Resolver::Openat2 && !use_openat2 {
            tracing::info!(
                "openat2 is not available: resolving local keys one component at a time"
            );
        }
        Ok(Root {
            fd: OwnedFd::from(dir),
            openat2: AtomicBool::new(use_openat2),
        })
    }

    /// The resolver in use.
    pub fn resolver(&self) -> Resolver {
        if self.openat2.load(Ordering::Relaxed) {
            Resolver::Openat2
        } else {
            Resolver::Walk
        }
    }

    fn root(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `rel` below `dir` (itself resolved beneath the root) with `flags`; `O_NOFOLLOW`
    /// and `O_CLOEXEC` are always added. An empty `rel` opens `dir` itself again.
    pub fn open_in(&self, dir: BorrowedFd<'_>, rel: &[&str], flags: c_int) -> io::Result<OwnedFd> {
        let names = rel
            .iter()
            .map(|c| component(c))
            .collect::<io::Result<Vec<CString>>>()?;
        if self.openat2.load(Ordering::Relaxed) {
            let path = if rel.is_empty() {
                dot().to_owned()
            } else {
                component_path(rel)?
            };
            match openat2(dir, &path, flags) {
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    self.openat2.store(false, Ordering::Relaxed);
                    tracing::info!(
                        "openat2 went missing: resolving local keys one component at a time"
                    );
                }
                other => return other,
            }
        }
        walk(dir, &names, flags)
    }

    /// Whether the root can be read (listed).
    pub fn check(&self) -> io::Result<()> {
        self.open_in(self.root(), &[], libc::O_RDONLY | libc::O_DIRECTORY)
            .map(drop)
    }

    /// `rel` below the root as an `O_PATH` fd of a directory: ELOOP if it is a symlink,
    /// ENOTDIR if it is anything else.
    pub fn open_dir(&self, rel: &[&str]) -> io::Result<OwnedFd> {
        self.open_dir_in(self.root(), rel)
    }

    /// `rel` below the root opened for reading as a directory (its extended attributes can
    /// be read and written through this fd, not through an `O_PATH` one).
    pub fn open_dir_readable(&self, rel: &[&str]) -> io::Result<OwnedFd> {
        let fd = self.open_in(self.root(), rel, libc::O_RDONLY | libc::O_DIRECTORY)?;
        require_dir(&fd)?;
        Ok(fd)
    }

    fn open_dir_in(&self, dir: BorrowedFd<'_>, rel: &[&str]) -> io::Result<OwnedFd> {
        let fd = self.open_in(dir, rel, libc::O_PATH | libc::O_DIRECTORY)?;
        require_dir(&fd)?;
        Ok(fd)
    }

    /// What `rel` below the root is, without opening it (a symlink is described as one).
    pub fn stat(&self, rel: &[&str]) -> io::Result<Meta> {
        let fd = self.open_in(self.root(), rel, libc::O_PATH)?;
        fstat(fd.as_fd())
    }

    /// `rel` below the root opened for reading if, and only if, it is a regular file.
    pub fn open_regular(&self, rel: &[&str]) -> io::Result<(File, Meta)> {
        self.open_regular_in(self.root(), rel)
    }

    /// `rel` below `dir` opened for reading if, and only if, it is a regular file: it is
    /// opened `O_PATH` (which opens nothing: no FIFO can block, no device driver runs),
    /// fstat'ed, and only a regular file is opened again, through its own fd
    /// (`/proc/self/fd/N` names exactly that inode), `O_RDONLY | O_NONBLOCK`.
    pub fn open_regular_in(&self, dir: BorrowedFd<'_>, rel: &[&str]) -> io::Result<(File, Meta)> {
        let fd = self.open_in(dir, rel, libc::O_PATH)?;
        let meta = fstat(fd.as_fd())?;
        if meta.kind != Kind::Regular {
            if meta.kind == Kind::Dir {
                return Err(io::Error::from_raw_os_error(libc::EISDIR));
            }
            return Err(not_served(&rel.join("/"), meta.kind));
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))?;
        let opened = fstat(file.as_fd())?;
        if (opened.dev, opened.ino) != (meta.dev, meta.ino) || opened.kind != Kind::Regular {
            // Cannot happen: the magic link is the fd's own file. Refuse rather than trust.
            return Err(io::Error::other("reopened file is not the one resolved"));
        }
        Ok((file, meta))
    }

    /// The directory `rel` below the root, made (mkdirat) where missing, as an `O_PATH` fd.
    /// Each component is resolved beneath the one before it: a symlink on the way fails
    /// (ELOOP or ENOTDIR), it is never followed and nothing is made through it.
    pub fn mkdir_all(&self, rel: &[&str]) -> io::Result<OwnedFd> {
        let mut held: Option<OwnedFd> = None;
        for part in rel {
            let name = component(part)?;
            let base = held.as_ref().map_or(self.root(), |fd| fd.as_fd());
            let next = match self.open_dir_in(base, &[part]) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    // SAFETY: `name` is NUL-terminated and outlives the call; `base` is open.
                    if unsafe { libc::mkdirat(base.as_raw_fd(), name.as_ptr(), 0o777) } != 0 {
                        let e = io::Error::last_os_error();
                        if e.raw_os_error() != Some(libc::EEXIST) {
                            return Err(e);
                        }
                    }
                    self.open_dir_in(base, &[part])?
                }
                other => other?,
            };
            held = Some(next);
        }
        match held {
            Some(fd) => Ok(fd),
            None => self.fd.try_clone(),
        }
    }

    /// A new file `name` in `dir`, created `O_CREAT | O_EXCL | O_NOFOLLOW` for writing: never
    /// an existing file, never through a symlink.
    pub fn create_new(&self, dir: BorrowedFd<'_>, name: &str) -> io::Result<File> {
        let name = component(name)?;
        let fd = openat(
            dir,
            &name,
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o666,
        )?;
        Ok(File::from(fd))
    }

    /// Renames `from_name` in `from_dir` to `to_name` in `to_dir` (renameat: neither name is
    /// followed). An existing target may be a regular file (replaced) or a directory (the
    /// kernel refuses); a symlink or special file there is left alone and the rename refused.
    pub fn rename_into(
        &self,
        from_dir: BorrowedFd<'_>,
        from_name: &str,
        to_dir: BorrowedFd<'_>,
        to_name: &str,
    ) -> io::Result<()> {
        let (from, to) = (component(from_name)?, component(to_name)?);
        match fstatat(to_dir, &to) {
            Ok(meta) if !meta.kind.is_served() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "{to_name} is a {}: the local store leaves it alone",
                        meta.kind.name()
                    ),
                ))
            }
            Err(e) if e.raw_os_error() != Some(libc::ENOENT) => return Err(e),
            _ => {}
        }
        // SAFETY: both names are NUL-terminated and outlive the call; both fds are open.
        let ret = unsafe {
            libc::renameat(
                from_dir.as_raw_fd(),
                from.as_ptr(),
                to_dir.as_raw_fd(),
                to.as_ptr(),
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Removes the regular file `name` of `dir`; a symlink or special file there is not served
    /// and stays (EISDIR for a directory).
    pub fn unlink_file(&self, dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
        let c = component(name)?;
        match fstatat(dir, &c)?.kind {
            Kind::Regular => unlinkat(dir, &c, 0),
            Kind::Dir => Err(io::Error::from_raw_os_error(libc::EISDIR)),
            other => Err(not_served(name, other)),
        }
    }

    /// Removes the empty directory `name` of `dir`; a symlink or special file there is not
    /// served and stays (ENOTDIR for a regular file).
    pub fn remove_dir(&self, dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
        let c = component(name)?;
        match fstatat(dir, &c)?.kind {
            Kind::Dir => unlinkat(dir, &c, libc::AT_REMOVEDIR),
            Kind::Regular => Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
            other => Err(not_served(name, other)),
        }
    }

    /// Removes the file `name` of `dir` whatever it is (never a directory, never followed):
    /// for the store's own staging files.
    pub fn remove_staged(&self, dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
        unlinkat(dir, &component(name)?, 0)
    }

    /// Removes the directory `rel` below the root and the files directly in it (one level:
    /// what an upload directory holds). Symlinks in it are unlinked, never followed.
    pub fn remove_flat_dir(&self, rel: &[&str]) -> io::Result<()> {
        let Some((last, parents)) = rel.split_last() else {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        };
        let parent = self.open_dir(parents)?;
        let dir = self.open_in(
            parent.as_fd(),
            &[last],
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK,
        )?;
        for name in entry_names(&dir)? {
            let Ok(c) = CString::new(name.as_bytes()) else {
                continue;
            };
            let _ = unlinkat(dir.as_fd(), &c, 0);
        }
        unlinkat(parent.as_fd(), &component(last)?, libc::AT_REMOVEDIR)
    }

    /// The entries of the directory `rel` below the root with what each is (lstat: nothing is
    /// followed or opened). Entries that vanish while being listed are left out.
    pub fn list(&self, rel: &[&str]) -> io::Result<Vec<Entry>> {
        // O_DIRECTORY: the kernel refuses anything but a directory before opening it.
        let dir = self.open_in(
            self.root(),
            rel,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK,
        )?;
        let mut out = Vec::new();
        for name in entry_names(&dir)? {
            let Ok(c) = CString::new(name.as_bytes()) else {
                continue;
            };
            match fstatat(dir.as_fd(), &c) {
                Ok(meta) => out.push(Entry { name, meta }),
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

fn component_path(rel: &[&str]) -> io::Result<CString> {
    CString::new(rel.join("/")).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// The component-by-component resolver: each parent opened `O_PATH | O_NOFOLLOW |
/// O_DIRECTORY` below the one before and checked to be a directory, the last opened with
/// `flags | O_NOFOLLOW`. No name has `/` or is `..`, so every step stays below `dir`.
fn walk(dir: BorrowedFd<'_>, names: &[CString], flags: c_int) -> io::Result<OwnedFd> {
    let Some((last, parents)) = names.split_last() else {
        return openat(dir, dot(), flags, 0);
    };
    let mut held: Option<OwnedFd> = None;
    for name in parents {
        let base = held.as_ref().map_or(dir, |fd| fd.as_fd());
        let next = openat(base, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        require_dir(&next)?;
        held = Some(next);
    }
    let base = held.as_ref().map_or(dir, |fd| fd.as_fd());
    openat(base, last, flags, 0)
}
