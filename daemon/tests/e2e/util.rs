//! Small helpers shared by the fixtures and the cases.

use std::fmt::Debug;
use std::io;
use std::os::fd::IntoRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Loopback only: no proxy may sit between the tests and their servers. Set
/// before any thread or child process starts, so everything inherits it.
/// Proxy settings that must not reach the SDK or berth in tests.
pub const PROXY_VARS: [&str; 6] = [
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
];

pub fn sanitize_proxy_env() {
    for var in PROXY_VARS {
        std::env::remove_var(var);
    }
    std::env::set_var("NO_PROXY", NO_PROXY);
    std::env::set_var("no_proxy", NO_PROXY);
}

pub const NO_PROXY: &str = "127.0.0.1,localhost";

/// The one tokio runtime every SDK call of the tests runs on.
pub fn rt() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("e2e-sdk")
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// A name unique within this run (and across concurrent runs via the PID),
/// valid as an S3 bucket name when `tag` is lowercase alphanumerics and '-'.
pub fn unique_name(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut name = format!("e2e-{tag}-{}-{n}", std::process::id());
    name.truncate(63);
    name
}

/// SplitMix64: deterministic pseudo-random numbers for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// `len` deterministic pseudo-random bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `std::fs::read` with the path in the error.
pub fn read_file(path: impl AsRef<Path>) -> Result<Vec<u8>> {
    let path = path.as_ref();
    std::fs::read(path).with_context(|| format!("read {}", path.display()))
}

/// `std::fs::metadata` with the path in the error.
pub fn stat(path: impl AsRef<Path>) -> Result<std::fs::Metadata> {
    let path = path.as_ref();
    std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))
}

/// Compare two byte strings, describing the first difference.
pub fn ensure_same_bytes(what: &str, got: &[u8], want: &[u8]) -> Result<()> {
    if got == want {
        return Ok(());
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    bail!(
        "{what}: content differs: got {} bytes, want {} bytes, first difference at offset {first}",
        got.len(),
        want.len()
    )
}

pub fn errno_name(errno: i32) -> &'static str {
    match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::EROFS => "EROFS",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        _ => "?",
    }
}

/// The operation must fail with exactly `errno`.
pub fn expect_errno<T: Debug>(what: &str, res: io::Result<T>, errno: i32) -> Result<()> {
    match res {
        Ok(v) => bail!(
            "{what}: expected {} ({errno}) but it succeeded ({v:?})",
            errno_name(errno)
        ),
        Err(e) if e.raw_os_error() == Some(errno) => Ok(()),
        Err(e) => bail!(
            "{what}: expected {} ({errno}), got {e} ({})",
            errno_name(errno),
            e.raw_os_error().map_or("no errno", errno_name)
        ),
    }
}

/// Close a file and report the error `close(2)` returns (a FUSE flush error
/// shows up here and nowhere else; `Drop for File` ignores it).
pub fn close_checked(file: std::fs::File) -> io::Result<()> {
    let fd = file.into_raw_fd();
    // SAFETY: we own `fd` (taken out of the File) and close it exactly once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `path` is a mount point according to /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mp| unescape_mountinfo(mp) == want)
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Run `f` on its own thread and give up waiting after `limit` (the thread
/// is left behind; fixtures unblock it when they kill the FUSE server).
pub fn with_time_limit<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<(T, Duration)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let start = Instant::now();
    std::thread::Builder::new()
        .name(format!("e2e-limited-{what}"))
        .spawn(move || {
            let v = f();
            let _ = tx.send((v, start.elapsed()));
        })?;
    match rx.recv_timeout(limit) {
        Ok(v) => Ok(v),
        Err(_) => bail!("{what}: still blocked after {limit:?} (hang)"),
    }
}

/// The last `n` lines of a text file, for failure reports.
pub fn tail_file(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let skip = lines.len().saturating_sub(n);
            let mut out = String::new();
            if skip > 0 {
                out.push_str(&format!("[... {skip} earlier lines ...]\n"));
            }
            for l in &lines[skip..] {
                out.push_str(l);
                out.push('\n');
            }
            out
        }
        Err(e) => format!("[cannot read {}: {e}]", path.display()),
    }
}

/// A little longer than a mount takes to refresh its status file (every 2 s).
pub const STATUS_REFRESH: std::time::Duration = std::time::Duration::from_millis(2500);

/// Waits until a server accepts connections on the unix socket at `path`. The file appears at
/// bind(2), a moment before listen(2), and a connect in that moment is refused, so the file
/// alone is not readiness (a CI run failed that way). `exited` reports a server that died.
pub fn wait_listening(
    what: &str,
    path: &Path,
    limit: Duration,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if let Some(why) = exited() {
            bail!(
                "{what} exited before listening on {}: {why}",
                path.display()
            );
        }
        if start.elapsed() > limit {
            bail!(
                "{what} did not listen on {} within {limit:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops a server we started: SIGTERM, up to 40 s to exit, then SIGKILL; always reaped.
pub fn terminate(child: &mut std::process::Child) {
    // SAFETY: not reaped yet, so the pid is still our child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(40) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
