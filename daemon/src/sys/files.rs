//! Files written whole, private directories, and names and keys derived from bytes.
//!
//! [`write_atomic`] is how berth writes every small state file (volume records, status files,
//! the CSI publish list, Kata's mountInfo.json, the cache index): readers see the old file or
//! the new one, never half of one. [`private_dir`] makes the directories berth keeps state in
//! (mode 0700: only root reads inode journals, status files or volume mountpoints).
//! [`Fnv1a`] names things that must keep their name across berth versions (a new binary must
//! find the control socket of a holder an old one started); [`digest`] and [`NodeKey`] name
//! things an outsider must not be able to forge or invert (volumes, per-mount state).

use std::io::{Read as _, Write as _};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};

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

/// Creates `dir` and its missing parents with mode 0700, and makes `dir` itself 0700 if it
/// was there already with a wider mode (an older berth made /run/berth 0755).
pub fn private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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

/// SHA-256 over `parts`, each prefixed with its length so that ("ab", "c") and ("a", "bc")
/// differ; hex of the first 16 bytes (128 bits: enough to name, short enough for paths).
pub fn digest<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    hex(&h.finalize()[..16])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A secret of one node (32 random bytes in a 0600 file): what makes a volume's name an HMAC
/// nobody without root on the node can compute, so that a name seen in ListVolumes, metrics
/// or file names says nothing about the credentials behind it and cannot be forged.
#[derive(Clone)]
pub struct NodeKey([u8; 32]);

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(redacted)")
    }
}

impl NodeKey {
    /// Loads the key in `path`, or creates it (O_EXCL, mode 0600) if there is none. A file
    /// that is not 32 bytes, or that others may read, is refused.
    pub fn load_or_create(path: &Path) -> std::io::Result<NodeKey> {
        match std::fs::File::open(path) {
            Ok(mut file) => {
                let meta = file.metadata()?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "{} may be read by others (mode {:o}); it must be 0600",
                            path.display(),
                            meta.permissions().mode() & 0o777
                        ),
                    ));
                }
                let mut key = [0u8; 32];
                let mut rest = Vec::new();
                file.read_exact(&mut key)?;
                file.read_to_end(&mut rest)?;
                if !rest.is_empty() {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{} is not a 32-byte node key", path.display()),
                    ));
                }
                Ok(NodeKey(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                random_bytes(&mut key)?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)?;
                file.write_all(&key)?;
                file.sync_all()?;
                Ok(NodeKey(key))
            }
            Err(e) => Err(e),
        }
    }

    /// HMAC-SHA256 over `parts` (length-prefixed as in [`digest`]); hex of the first 16 bytes.
    pub fn sign<'a>(&self, parts: impl IntoIterator<Item = &'a [u8]>) -> String {
        let mut mac = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC takes a key of any length");
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        hex(&mac.finalize().into_bytes()[..16])
    }

    #[cfg(test)]
    pub fn for_tests(byte: u8) -> NodeKey {
        NodeKey([byte; 32])
    }
}

/// Fills `buf` from the kernel's random pool.
fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most the given length into the buffer.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
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

    #[test]
    fn digests_separate_parts_and_node_keys_sign_differently() {
        assert_ne!(digest([&b"ab"[..], b"c"]), digest([&b"a"[..], b"bc"]));
        assert_eq!(digest([&b"x"[..]]).len(), 32);
        let (a, b) = (NodeKey::for_tests(1), NodeKey::for_tests(2));
        assert_eq!(a.sign([&b"v"[..]]), a.sign([&b"v"[..]]));
        assert_ne!(a.sign([&b"v"[..]]), b.sign([&b"v"[..]]));
        assert_ne!(a.sign([&b"v"[..]]), digest([&b"v"[..]]));
    }

    #[test]
    fn a_node_key_is_made_once_private_and_refused_when_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let first = NodeKey::load_or_create(&path).unwrap();
        let again = NodeKey::load_or_create(&path).unwrap();
        assert_eq!(first.0, again.0);
        assert_ne!(first.0, [0u8; 32]);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(format!("{first:?}"), "NodeKey(redacted)");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(NodeKey::load_or_create(&path).is_err());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, b"short").unwrap();
        assert!(NodeKey::load_or_create(&path).is_err());
    }

    #[test]
    fn private_dirs_are_0700_even_when_they_were_not() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b");
        private_dir(&deep).unwrap();
        for d in [dir.path().join("a"), deep.clone()] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", d.display());
        }
        std::fs::set_permissions(&deep, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&deep).unwrap();
        let mode = std::fs::metadata(&deep).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
