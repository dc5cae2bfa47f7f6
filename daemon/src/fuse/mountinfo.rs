//! Reading /proc/self/mountinfo: is a path a mountpoint, which filesystem holds it, and which
//! other mounts show the same filesystem (bind targets to re-bind after a remount).

use std::path::{Path, PathBuf};

/// One line of /proc/self/mountinfo, the fields berth uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// `major:minor` of the filesystem; the minor of a FUSE mount is its fusectl connection id.
    pub device: (u32, u32),
    /// The directory of the filesystem this mount shows (`/` for the whole filesystem).
    pub root: PathBuf,
    pub target: PathBuf,
    pub fstype: String,
    /// The per-mount flags among `ro`, `nosuid`, `nodev`, `noexec` (as `MS_*` bits): a bind
    /// made again in its place must get them back.
    pub flags: libc::c_ulong,
}

/// Parses mountinfo text; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let mut fields = line.split(' ');
    let (_id, _parent) = (fields.next()?, fields.next()?);
    let (major, minor) = fields.next()?.split_once(':')?;
    let root = fields.next()?;
    let target = fields.next()?;
    let options = fields.next()?;
    let fstype = line.split(" - ").nth(1)?.split(' ').next()?;
    Some(MountEntry {
        device: (major.parse().ok()?, minor.parse().ok()?),
        root: PathBuf::from(unescape(root)),
        target: PathBuf::from(unescape(target)),
        fstype: fstype.to_string(),
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

/// The mounts of this mount namespace.
pub fn read() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

/// The topmost mount whose target is exactly `path` (canonical), if any.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    read().into_iter().rev().find(|m| m.target == path)
}

/// Whether `path` (canonical) is the target of a mount in this mount namespace.
pub fn is_mountpoint(path: &Path) -> bool {
    mount_at(path).is_some()
}

/// The filesystem type of the mount that holds `path` (canonical), e.g. `fuse.berth`.
pub fn fstype_of(path: &Path) -> Option<String> {
    // The mount with the longest target that is a prefix of `path`; later lines stack on
    // earlier ones, so the last one wins among equals.
    let mut best: Option<MountEntry> = None;
    for m in read() {
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

fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
80 22 0:61 / /mnt/a\\040b rw,nosuid,nodev,relatime - fuse.berth berth:s3 rw,user_id=0
81 22 0:61 /sub /var/pods/t1 ro,nosuid,noexec,relatime shared:7 - fuse.berth berth:s3 rw,user_id=0
82 22 0:62 / /mnt/other rw - fuse.berth berth:x rw
";

    #[test]
    fn parses_escaped_targets_and_devices() {
        let entries = parse(SAMPLE);
        assert_eq!(entries.len(), 4);
        assert_eq!(entries[1].target, Path::new("/mnt/a b"));
        assert_eq!(entries[1].device, (0, 61));
        assert_eq!(entries[2].root, Path::new("/sub"));
        assert_eq!(entries[1].fstype, "fuse.berth");
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
    fn this_namespace_has_proc() {
        assert!(is_mountpoint(Path::new("/proc")));
        assert!(!is_mountpoint(Path::new("/proc/self")));
        assert_eq!(fstype_of(Path::new("/proc/self")).as_deref(), Some("proc"));
    }
}
