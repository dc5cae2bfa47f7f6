//! POSIX attributes stored on an object, in s3fs's conventions so that berth and s3fs (and
//! rclone, for `mtime`) read each other's buckets.
//!
//! S3 user metadata (`x-amz-meta-<name>`):
//! - `mode`: decimal `st_mode`, type bits included (`S_IFREG`, `S_IFDIR` on a `dir/` marker,
//!   `S_IFLNK` on an object whose body is a symbolic link's target);
//! - `uid`, `gid`: decimal;
//! - `mtime`: seconds since the epoch, a fraction allowed (`1700000000.5`).
//!
//! Values come from whoever wrote the bucket: anything that does not parse is ignored (the
//! mount's defaults apply), never an error, and no type but a regular file, a directory or a
//! symbolic link is ever produced from it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The metadata names, without the `x-amz-meta-` prefix.
pub const MODE: &str = "mode";
pub const UID: &str = "uid";
pub const GID: &str = "gid";
pub const MTIME: &str = "mtime";

/// Times later than this (year 2500) are taken for garbage.
const MAX_SECS: u64 = 16_725_225_600;

/// What an object says about its POSIX attributes; `None` fields were not stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PosixMeta {
    /// Permission bits and the file type bits (`S_IFMT`) as stored.
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub mtime: Option<SystemTime>,
}

/// The file type a stored mode names, among those berth serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredType {
    Regular,
    Dir,
    Symlink,
    /// No type bits, or a type berth never serves (devices, FIFOs, sockets).
    Unspecified,
}

impl PosixMeta {
    /// Nothing stored.
    pub fn is_empty(&self) -> bool {
        self == &PosixMeta::default()
    }

    pub fn stored_type(&self) -> StoredType {
        match self.mode.map(|m| m & libc::S_IFMT) {
            Some(libc::S_IFREG) => StoredType::Regular,
            Some(libc::S_IFDIR) => StoredType::Dir,
            Some(libc::S_IFLNK) => StoredType::Symlink,
            _ => StoredType::Unspecified,
        }
    }

    /// `self` with every field `change` sets (a SETATTR's worth of changes) replaced.
    pub fn overlay(&mut self, change: &PosixMeta) {
        self.mode = change.mode.or(self.mode);
        self.uid = change.uid.or(self.uid);
        self.gid = change.gid.or(self.gid);
        self.mtime = change.mtime.or(self.mtime);
    }

    /// The metadata to send with a write, as (name, value) pairs.
    pub fn to_pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(mode) = self.mode {
            out.push((MODE, mode.to_string()));
        }
        if let Some(uid) = self.uid {
            out.push((UID, uid.to_string()));
        }
        if let Some(gid) = self.gid {
            out.push((GID, gid.to_string()));
        }
        if let Some(mtime) = self.mtime {
            out.push((MTIME, format_time(mtime)));
        }
        out
    }

    /// Reads the attributes from user metadata (names compared without case, as HTTP
    /// headers are); other names are ignored.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> PosixMeta {
        let mut meta = PosixMeta::default();
        for (name, value) in pairs {
            let value = value.trim();
            if name.eq_ignore_ascii_case(MODE) {
                meta.mode = value.parse().ok();
            } else if name.eq_ignore_ascii_case(UID) {
                meta.uid = value.parse().ok();
            } else if name.eq_ignore_ascii_case(GID) {
                meta.gid = value.parse().ok();
            } else if name.eq_ignore_ascii_case(MTIME) {
                meta.mtime = parse_time(value);
            }
        }
        meta
    }

    /// `name=value` lines (the local store keeps them in one extended attribute).
    pub fn to_text(&self) -> String {
        self.to_pairs()
            .into_iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    }

    pub fn from_text(text: &str) -> PosixMeta {
        PosixMeta::from_pairs(text.lines().filter_map(|l| l.split_once('=')))
    }
}

/// `secs` or `secs.nanos` (nine digits, trailing zeros dropped).
pub fn format_time(t: SystemTime) -> String {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) if d.subsec_nanos() == 0 => d.as_secs().to_string(),
        Ok(d) => {
            let frac = format!("{:09}", d.subsec_nanos());
            format!("{}.{}", d.as_secs(), frac.trim_end_matches('0'))
        }
        Err(_) => "0".to_string(),
    }
}

/// Seconds with an optional fraction of up to nine significant digits (more are cut).
pub fn parse_time(s: &str) -> Option<SystemTime> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if secs.is_empty() || !secs.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = secs.parse().ok().filter(|&s| s <= MAX_SECS)?;
    let digits = &frac[..frac.len().min(9)];
    let nanos = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_field() {
        let meta = PosixMeta {
            mode: Some(libc::S_IFREG | 0o4751),
            uid: Some(1000),
            gid: Some(0),
            mtime: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 120_000_000)),
        };
        let pairs = meta.to_pairs();
        assert_eq!(
            pairs,
            vec![
                ("mode", "35305".to_string()),
                ("uid", "1000".to_string()),
                ("gid", "0".to_string()),
                ("mtime", "1700000000.12".to_string()),
            ]
        );
        let back = PosixMeta::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())));
        assert_eq!(back, meta);
        assert_eq!(PosixMeta::from_text(&meta.to_text()), meta);
        assert!(PosixMeta::default().to_pairs().is_empty());
        let mut base = meta.clone();
        base.overlay(&PosixMeta {
            uid: Some(7),
            ..PosixMeta::default()
        });
        assert_eq!(
            (base.uid, base.mode, base.mtime),
            (Some(7), meta.mode, meta.mtime)
        );
    }

    #[test]
    fn reads_what_s3fs_and_rclone_write() {
        // s3fs: decimal mode with type bits, integral mtime; rclone: fractional mtime.
        let meta = PosixMeta::from_pairs([
            ("Mode", "41471"),
            ("uid", " 33 "),
            ("x-other", "1"),
            ("Mtime", "1577836800.123456789123"),
        ]);
        assert_eq!(meta.mode, Some(libc::S_IFLNK | 0o777));
        assert_eq!(meta.stored_type(), StoredType::Symlink);
        assert_eq!(meta.uid, Some(33));
        assert_eq!(meta.gid, None);
        assert_eq!(
            meta.mtime,
            Some(UNIX_EPOCH + Duration::new(1_577_836_800, 123_456_789))
        );
    }

    #[test]
    fn garbage_is_ignored_never_trusted() {
        let meta = PosixMeta::from_pairs([
            ("mode", "-1"),
            ("uid", "4294967296"),
            ("gid", "0x10"),
            ("mtime", "99999999999999999999"),
        ]);
        assert!(meta.is_empty(), "{meta:?}");
        for bad in ["", ".5", "1e9", "-3", "1.-2", "1.2.3", "１"] {
            assert_eq!(parse_time(bad), None, "{bad:?}");
        }
        assert_eq!(parse_time("7."), Some(UNIX_EPOCH + Duration::from_secs(7)));
        // Device nodes, FIFOs and sockets are never served as such.
        for kind in [
            libc::S_IFCHR,
            libc::S_IFBLK,
            libc::S_IFIFO,
            libc::S_IFSOCK,
            0,
        ] {
            let m = PosixMeta {
                mode: Some(kind | 0o644),
                ..PosixMeta::default()
            };
            assert_eq!(m.stored_type(), StoredType::Unspecified);
        }
    }
}
