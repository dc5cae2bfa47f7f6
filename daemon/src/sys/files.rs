//! Files written whole, and stable names derived from bytes.
//!
//! [`write_atomic`] is how berth writes every small state file (volume records, status files,
//! the CSI publish list, Kata's mountInfo.json, the cache index): readers see the old file or
//! the new one, never half of one. [`Fnv1a`] names things that must keep their name across
//! berth versions (a new binary must find the control socket of a holder an old one started).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `data` to a temporary file beside `path` (created with `mode`), syncs it and renames
/// it over `path`. The temporary name is unique per process and call, so two writers of the
/// same file (a periodic refresh and an immediate one) never share it.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = temp_name(path);
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn temp_name(path: &Path) -> PathBuf {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// FNV-1a, 64 bit: stable across builds, platforms and berth versions (std's hasher is not).
/// Not a cryptographic digest: it names things, it does not protect them.
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    pub fn new() -> Fnv1a {
        Fnv1a::default()
    }

    pub fn write(mut self, bytes: &[u8]) -> Fnv1a {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        self
    }

    pub fn finish(self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_writes_replace_whole_files_with_the_mode_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        // A missing directory is an error, and leaves nothing behind.
        assert!(write_atomic(&dir.path().join("no/such/file"), b"x", 0o644).is_err());
    }

    #[test]
    fn fnv1a_matches_the_published_test_vectors() {
        assert_eq!(Fnv1a::new().finish(), 0xcbf2_9ce4_8422_2325);
        assert_eq!(Fnv1a::new().write(b"a").finish(), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            Fnv1a::new().write(b"foobar").finish(),
            0x8594_4171_f739_67e8
        );
        let split = Fnv1a::new().write(b"foo").write(b"bar").finish();
        assert_eq!(split, Fnv1a::new().write(b"foobar").finish());
    }
}
