//! Mount-table helpers shared by the daemon and the CSI node plugin: read
//! /proc/self/mountinfo, bind mounts (read-only honoured), and a safe unmount that loops
//! until nothing is mounted at a path (never lazy: a lazy unmount hides data loss).

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// One line of /proc/self/mountinfo (the fields we use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub parent: u64,
    /// major:minor of the device.
    pub device: String,
    /// The path inside the filesystem that is mounted (bind mounts show the sub path).
    pub root: String,
    pub mountpoint: PathBuf,
    pub options: String,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

/// Mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let oct = std::str::from_utf8(&bytes[i + 1..i + 4]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(oct, 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let f: Vec<&str> = left.split(' ').collect();
    let r: Vec<&str> = right.split(' ').collect();
    if f.len() < 6 || r.len() < 2 {
        return None;
    }
    Some(MountEntry {
        id: f[0].parse().ok()?,
        parent: f[1].parse().ok()?,
        device: f[2].to_string(),
        root: unescape(f[3]),
        mountpoint: PathBuf::from(unescape(f[4])),
        options: f[5].to_string(),
        fstype: r[0].to_string(),
        source: unescape(r[1]),
    })
}

pub fn mount_table() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The topmost mount at exactly `path` (no symlink resolution: callers pass clean paths).
pub fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(mount_table()?
        .into_iter()
        .rev()
        .find(|m| m.mountpoint == path))
}

pub fn is_mountpoint(path: &Path) -> io::Result<bool> {
    Ok(mount_at(path)?.is_some())
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Bind-mounts `from` on `to`, read-only if asked (never left writable if that fails).
pub fn bind(from: &Path, to: &Path, read_only: bool) -> io::Result<()> {
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    crate::fuse::bind(from, to, flags)
}

/// Unmounts everything stacked at `path`, one layer at a time, never lazily. Returns how
/// many layers went. EBUSY (files open) is returned as an error: the caller retries later.
pub fn unmount_all(path: &Path) -> io::Result<usize> {
    let c = cstr(path)?;
    // A bound on the loop: a path cannot hold more layers than this in practice.
    for layers in 0..64 {
        if !is_mountpoint(path)? {
            return Ok(layers);
        }
        // SAFETY: valid NUL-terminated path; flags 0 = an ordinary (not lazy) unmount.
        if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINVAL) && !is_mountpoint(path)? {
                return Ok(layers);
            }
            return Err(err);
        }
    }
    Err(io::Error::other(format!(
        "{} still mounted after 64 unmounts",
        path.display()
    )))
}

/// Unmounts every mount at or below `dir`, innermost first (a failed test's, or what a crash
/// left): each with [`unmount_all`], never lazily. Returns the paths that would not go.
pub fn unmount_below(dir: &Path) -> Vec<PathBuf> {
    let mut inner: Vec<PathBuf> = mount_table()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mountpoint)
        .filter(|m| m.starts_with(dir))
        .collect();
    inner.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    inner.dedup();
    inner.retain(|m| unmount_all(m).is_err());
    inner
}

/// statvfs of a path: (total, free, used) bytes and inodes.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub bytes_total: u64,
    pub bytes_available: u64,
    pub bytes_used: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub inodes_used: u64,
    pub read_only: bool,
}

pub fn usage(path: &Path) -> io::Result<Usage> {
    let c = cstr(path)?;
    // SAFETY: an all-zero statvfs is valid; statvfs fills it.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize.max(1);
    let total = st.f_blocks.saturating_mul(frsize);
    let free = st.f_bfree.saturating_mul(frsize);
    Ok(Usage {
        bytes_total: total,
        bytes_available: st.f_bavail.saturating_mul(frsize),
        bytes_used: total.saturating_sub(free),
        inodes_total: st.f_files,
        inodes_free: st.f_ffree,
        inodes_used: st.f_files.saturating_sub(st.f_ffree),
        read_only: st.f_flag & libc::ST_RDONLY != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    40 36 0:50 / /run/x ro,relatime shared:5 - fuse.berth berth rw\n\
                    garbage line\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mountpoint, PathBuf::from("/mnt/with space"));
        assert_eq!(m[0].root, "/mnt1");
        assert_eq!(m[1].fstype, "fuse.berth");
        assert!(m[1].read_only());
        assert!(!m[0].read_only());
    }

    #[test]
    fn the_root_is_a_mountpoint_and_a_temp_dir_is_not() {
        assert!(is_mountpoint(Path::new("/")).unwrap());
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mountpoint(dir.path()).unwrap());
        assert_eq!(unmount_all(dir.path()).unwrap(), 0);
    }
}
