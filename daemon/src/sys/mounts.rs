//! The mount table and the mount calls berth makes on it: reading /proc/self/mountinfo, bind
//! mounts that keep their per-mount flags (a read-only target never comes back writable), and
//! unmounts that are never lazy unless asked (a lazy unmount hides data loss). The FUSE door,
//! the holder's last-resort remount, the daemon and the CSI node plugin all use this one table.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// One line of /proc/self/mountinfo, the fields berth uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub parent: u64,
    /// `major:minor` of the filesystem; the minor of a FUSE mount is its fusectl connection id.
    pub device: (u32, u32),
    /// The directory of the filesystem this mount shows (`/` for the whole filesystem).
    pub root: PathBuf,
    pub target: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The per-mount flags among `ro`, `nosuid`, `nodev`, `noexec` (as `MS_*` bits): a bind
    /// made again in its place must get them back.
    pub flags: libc::c_ulong,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.flags & libc::MS_RDONLY != 0
    }
}

/// Parses mountinfo text; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut f = left.split(' ');
    let id = f.next()?.parse().ok()?;
    let parent = f.next()?.parse().ok()?;
    let (major, minor) = f.next()?.split_once(':')?;
    let root = f.next()?;
    let target = f.next()?;
    let options = f.next()?;
    let mut r = right.split(' ');
    let fstype = r.next()?;
    let source = r.next()?;
    Some(MountEntry {
        id,
        parent,
        device: (major.parse().ok()?, minor.parse().ok()?),
        root: PathBuf::from(unescape(root)),
        target: PathBuf::from(unescape(target)),
        fstype: fstype.to_string(),
        source: unescape(source).to_string_lossy().into_owned(),
        flags: mount_flags(options),
    })
}

/// The `MS_*` bits of the per-mount options berth restores on a re-bind.
fn mount_flags(options: &str) -> libc::c_ulong {
    options
        .split(',')
        .map(|o| match o {
            "ro" => libc::MS_RDONLY,
            "nosuid" => libc::MS_NOSUID,
            "nodev" => libc::MS_NODEV,
            "noexec" => libc::MS_NOEXEC,
            _ => 0,
        })
        .fold(0, |all, f| all | f)
}

/// Mountinfo escapes space, tab, newline and backslash as three octal digits (`\040`). The
/// bytes come back as they were, whatever their encoding.
fn unescape(field: &str) -> OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits.iter().fold(0u32, |v, d| v * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// The mounts of this mount namespace.
pub fn read() -> io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// The topmost mount whose target is exactly `path` (no symlink resolution: callers pass
/// clean, canonical paths).
pub fn mount_at(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(read()?.into_iter().rev().find(|m| m.target == path))
}

/// Whether `path` is the target of a mount in this mount namespace.
pub fn is_mountpoint(path: &Path) -> io::Result<bool> {
    Ok(mount_at(path)?.is_some())
}

/// The filesystem type of the mount that holds `path` (canonical), e.g. `fuse.berth`.
pub fn fstype_of(path: &Path) -> Option<String> {
    // The mount with the longest target that is a prefix of `path`; later lines stack on
    // earlier ones, so the last one wins among equals.
    let mut best: Option<MountEntry> = None;
    for m in read().ok()? {
        let longer = best
            .as_ref()
            .is_none_or(|b| m.target.as_os_str().len() >= b.target.as_os_str().len());
        if path.starts_with(&m.target) && longer {
            best = Some(m);
        }
    }
    best.map(|m| m.fstype)
}

/// Every other mount of the filesystem `device` (bind mounts of it), in mount order.
pub fn bind_targets(entries: &[MountEntry], device: (u32, u32), except: &Path) -> Vec<MountEntry> {
    entries
        .iter()
        .filter(|m| m.device == device && m.target != except)
        .cloned()
        .collect()
}

/// A path as the kernel takes it: its bytes, whatever their encoding.
pub fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Bind-mounts `source` onto `target` with the per-mount `flags` (`MS_RDONLY`, `MS_NOSUID`,
/// ...). The kernel ignores those on the bind itself, so they take a second, remounting call;
/// if that fails the bind goes again: a read-only target must never come back writable.
pub fn bind(source: &Path, target: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let source = cpath(source)?;
    let target_c = cpath(target)?;
    // SAFETY: valid NUL-terminated paths; no data argument for a bind mount.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if flags == 0 {
        return Ok(());
    }
    // SAFETY: as above; a remount of the bind just made.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        let _ = unmount(target, false);
        return Err(e);
    }
    Ok(())
}

/// [`bind`], read-only if asked.
pub fn bind_read_only_if(source: &Path, target: &Path, read_only: bool) -> io::Result<()> {
    bind(source, target, if read_only { libc::MS_RDONLY } else { 0 })
}

/// umount2(2) of `path` once; "not mounted" counts as done.
pub fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let target = cpath(path)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: target is a valid NUL-terminated path.
    if unsafe { libc::umount2(target.as_ptr(), flags) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Unmounts everything stacked at `path`, one layer at a time, never lazily. Returns how
/// many layers went. EBUSY (files open) is returned as an error: the caller retries later.
pub fn unmount_all(path: &Path) -> io::Result<usize> {
    let c = cpath(path)?;
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
    let mut inner: Vec<PathBuf> = read()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.target)
        .filter(|m| m.starts_with(dir))
        .collect();
    inner.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    inner.dedup();
    inner.retain(|m| unmount_all(m).is_err());
    inner
}

/// statvfs of a path: bytes and inodes.
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
    let c = cpath(path)?;
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

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
80 22 0:61 / /mnt/a\\040b rw,nosuid,nodev,relatime - fuse.berth berth:s3 rw,user_id=0
81 22 0:61 /sub /var/pods/t1 ro,nosuid,noexec,relatime shared:7 - fuse.berth berth:s3 rw,user_id=0
82 22 0:62 / /mnt/other rw - fuse.berth berth:x rw
36 35 98:0 /mnt1 /mnt/with\\011tab\\134 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
83 22 0:63 / /mnt/\\377raw rw - tmpfs tmp rw
garbage line
";

    #[test]
    fn parses_escaped_targets_devices_and_flags() {
        let entries = parse(SAMPLE);
        assert_eq!(entries.len(), 6);
        assert_eq!(entries[1].target, Path::new("/mnt/a b"));
        assert_eq!(entries[1].device, (0, 61));
        assert_eq!((entries[1].id, entries[1].parent), (80, 22));
        assert_eq!(entries[1].source, "berth:s3");
        assert_eq!(entries[2].root, Path::new("/sub"));
        assert_eq!(entries[1].fstype, "fuse.berth");
        assert!(entries[2].read_only());
        assert!(!entries[1].read_only());
        assert_eq!(entries[4].target, Path::new("/mnt/with\ttab\\"));
        assert_eq!(entries[4].root, Path::new("/mnt1"));
        // Non-UTF-8 bytes stay the bytes they were.
        assert_eq!(
            entries[5].target.as_os_str().as_bytes(),
            b"/mnt/\xffraw".as_slice()
        );
    }

    #[test]
    fn bind_targets_share_the_device_and_exclude_the_mountpoint() {
        let entries = parse(SAMPLE);
        let targets = bind_targets(&entries, (0, 61), Path::new("/mnt/a b"));
        assert_eq!(targets.len(), 1);
        assert_eq!(targets[0].target, Path::new("/var/pods/t1"));
        assert_eq!(targets[0].root, Path::new("/sub"));
        assert_eq!(
            targets[0].flags,
            libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NOEXEC
        );
        assert_eq!(entries[1].flags, libc::MS_NOSUID | libc::MS_NODEV);
    }

    #[test]
    fn this_namespace_has_proc_and_a_temp_dir_is_no_mountpoint() {
        assert!(is_mountpoint(Path::new("/proc")).unwrap());
        assert!(!is_mountpoint(Path::new("/proc/self")).unwrap());
        assert_eq!(fstype_of(Path::new("/proc/self")).as_deref(), Some("proc"));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mountpoint(dir.path()).unwrap());
        assert_eq!(unmount_all(dir.path()).unwrap(), 0);
    }
}
