//! The small helpers every xtask command shares: where the repository and cargo are, running
//! a command and saying what it ran, what the machine has (root, a program on PATH, a Debian
//! package, a listening socket), children and temp dirs that clean up after themselves, and
//! test data.
//!
//! This is the ground floor: it imports no other xtask module.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

/// The repository root: the parent of this crate's directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the repository")
        .to_path_buf()
}

/// The cargo that runs xtask (`$CARGO`), else `cargo` from PATH.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// The cargo target directory (honours CARGO_TARGET_DIR).
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
}

/// Under CI a missing requirement fails instead of skipping.
pub fn strict_env() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Run a command with inherited stdio, failing on a non-zero exit.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

/// stdout of a command, trimmed; Err with its stderr if it fails.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// The program and its arguments, as one line.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

pub fn is_root() -> bool {
    // `id -u` keeps this free of unsafe code; fall back to "not root".
    Command::new("id")
        .arg("-u")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .is_some_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

pub fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg")
        .args(["-s", package])
        .stderr(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("Status: install ok installed")
        })
}

/// Whether a stream socket listens on the unix socket path `path`, from /proc/net/unix.
/// The file exists from bind(2) on, before listen(2), so it is no sign of readiness; and a
/// probe connect is no good for vhost-user servers, which take any connection for their VMM.
pub fn is_listening(path: &Path) -> bool {
    const ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|line| {
        // Num RefCount Protocol Flags Type St Inode Path
        let fields: Vec<&str> = line.split_whitespace().collect();
        let flags = fields.get(3).and_then(|f| u32::from_str_radix(f, 16).ok());
        let stream = fields.get(4) == Some(&"0001");
        stream && flags.is_some_and(|f| f & ACCEPTCON != 0) && fields.get(7) == Some(&&*want)
    })
}

/// A child process killed (and reaped) when dropped.
pub struct Reaped(pub Option<Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A temp dir removed when dropped.
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn tempdir(prefix: &str) -> Result<TempDir> {
    let base = std::env::temp_dir();
    for n in 0..1000u32 {
        let path = base.join(format!("{prefix}-{}-{n}", std::process::id()));
        if std::fs::create_dir(&path).is_ok() {
            return Ok(TempDir(path));
        }
    }
    bail!("cannot create a temp dir in {}", base.display())
}

/// Deterministic bytes that do not compress (xorshift), the same stream for every caller:
/// fill buffers one after another to continue it.
pub struct Pattern(u64);

impl Default for Pattern {
    fn default() -> Pattern {
        Pattern(0x9e37_79b9_7f4a_7c15)
    }
}

impl Pattern {
    /// Fills `buf` with the next bytes of the stream (whole words: keep lengths a multiple
    /// of 8 to continue it in the next call).
    pub fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_mut(8) {
            let x = &mut self.0;
            *x ^= *x << 13;
            *x ^= *x >> 7;
            *x ^= *x << 17;
            word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
        }
    }
}

/// The first `len` bytes of [`Pattern`].
pub fn pattern(len: usize) -> Vec<u8> {
    let mut out = vec![0; len];
    Pattern::default().fill(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_socket_listens_only_after_listen() {
        let dir = std::env::temp_dir().join(format!("xtask-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        // SAFETY: plain socket calls on a fresh fd with a zeroed, filled-in sockaddr_un.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr
            .sun_path
            .iter_mut()
            .zip(path.as_os_str().as_encoded_bytes())
        {
            *d = *s as libc::c_char;
        }
        let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
        let bound = unsafe { libc::bind(fd, (&raw const addr).cast(), len) };
        assert_eq!(bound, 0, "{}", std::io::Error::last_os_error());
        assert!(path.exists());
        assert!(!is_listening(&path), "bound but not listening");
        assert_eq!(unsafe { libc::listen(fd, 1) }, 0);
        assert!(is_listening(&path));
        assert!(!is_listening(&dir.join("other.sock")));
        unsafe { libc::close(fd) };
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn pattern_is_deterministic() {
        assert_eq!(pattern(100), pattern(100));
        assert_eq!(pattern(13).len(), 13);
        assert_eq!(&pattern(13)[..], &pattern(16)[..13]);
    }

    #[test]
    fn pattern_continues_across_fills() {
        let mut p = Pattern::default();
        let (mut a, mut b) = (vec![0; 64], vec![0; 64]);
        p.fill(&mut a);
        p.fill(&mut b);
        a.extend(b);
        assert_eq!(a, pattern(128));
    }
}
