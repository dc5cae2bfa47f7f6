//! A local directory as the store: an honest one, and the hostile one of the audit.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{File, Permissions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::util::{
    close_checked, ensure_same_bytes, expect_errno, random_bytes, read_file, with_time_limit,
    STATUS_REFRESH,
};

fn listing(dir: &std::path::Path) -> Result<BTreeMap<String, (bool, u64)>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("read_dir {}", dir.display()))? {
        let e = e?;
        let meta = std::fs::symlink_metadata(e.path())?;
        let size = if meta.is_dir() { 0 } else { meta.len() };
        out.insert(
            e.file_name().to_string_lossy().into_owned(),
            (meta.is_dir(), size),
        );
    }
    Ok(out)
}

pub fn local_directory_store() -> Result<()> {
    let src_dir = tempfile::Builder::new()
        .prefix("berth-e2e-src-")
        .tempdir()?;
    let src = src_dir.path().canonicalize()?;
    let files = [
        ("hello.txt", random_bytes(1, 12)),
        ("sub/nested.bin", random_bytes(2, 100 << 10)),
        ("sub/deeper/x", random_bytes(3, 3 << 20)),
    ];
    for (rel, data) in &files {
        let p = src.join(rel);
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(&p, data)?;
    }
    std::fs::create_dir(src.join("emptydir"))?;

    let m = Mount::local(&src, MountOpts::default())?;
    // Regression: a file looked up by path before any listing (lookup lists `name/` too).
    ensure_same_bytes(
        "direct read before any listing",
        &read_file(m.join("sub/deeper/x"))?,
        &files[2].1,
    )?;
    for dir in ["", "sub", "sub/deeper", "emptydir"] {
        let want = listing(&src.join(dir))?;
        let got = listing(&m.join(dir))?;
        ensure!(
            got == want,
            "listing of {dir:?}:\n  got  {got:?}\n  want {want:?}"
        );
    }
    for (rel, data) in &files {
        ensure_same_bytes(rel, &read_file(m.join(rel))?, data)?;
    }

    // Write through the mount: lands in the source directory.
    let new = random_bytes(4, (3 << 20) + 17);
    let mut f = File::create(m.join("sub/new.bin"))?;
    for chunk in new.chunks(1 << 20) {
        f.write_all(chunk)?;
    }
    close_checked(f).context("close sub/new.bin")?;
    ensure_same_bytes(
        "sub/new.bin in the source directory",
        &read_file(src.join("sub/new.bin"))?,
        &new,
    )?;

    // Unlink through the mount.
    std::fs::remove_file(m.join("hello.txt")).context("unlink hello.txt")?;
    ensure!(
        !src.join("hello.txt").exists(),
        "hello.txt still in the source directory after unlink"
    );
    expect_errno(
        "stat after unlink",
        std::fs::metadata(m.join("hello.txt")),
        libc::ENOENT,
    )?;
    m.finish()
}

/// The audit's hostile source directory, through a real mount: symlinks out of it (`x ->
/// /etc`, `s ->` a root-only file, a directory symlink), a FIFO, a unix socket and a device
/// node are not reachable, not listed, not written through and not removed, and are counted
/// in the status's skipped_keys; the staging directory is not reachable either. With `walk`
/// the store resolves keys one component at a time (`BERTH_LOCAL_NO_OPENAT2=1`).
pub fn hostile_directory(walk: bool) -> Result<()> {
    const SECRET: &[u8] = b"root-only secret, never served";
    let outside_dir = tempfile::Builder::new()
        .prefix("berth-e2e-outside-")
        .tempdir()?;
    let outside = outside_dir.path().canonicalize()?;
    std::fs::write(outside.join("secret"), SECRET)?;
    std::fs::set_permissions(outside.join("secret"), Permissions::from_mode(0o600))?;
    std::fs::create_dir(outside.join("dir"))?;
    std::fs::write(outside.join("dir/inner.txt"), b"outside")?;
    let outside_before = tree(&outside)?;

    let src_dir = tempfile::Builder::new()
        .prefix("berth-e2e-src-")
        .tempdir()?;
    let src = src_dir.path().canonicalize()?;
    std::fs::write(src.join("ok.txt"), b"fine")?;
    std::fs::create_dir(src.join("sub"))?;
    std::fs::write(src.join("sub/inner.txt"), b"also fine")?;
    symlink("/etc", src.join("x"))?;
    symlink(outside.join("secret"), src.join("s"))?;
    symlink(outside.join("dir"), src.join("dirlink"))?;
    symlink("/etc/passwd", src.join("sub/link"))?;
    mknod(&src.join("fifo"), libc::S_IFIFO, 0)?;
    mknod(&src.join("null"), libc::S_IFCHR, libc::makedev(1, 3))?; // what /dev/null is
    let _socket = UnixListener::bind(src.join("sock"))?;
    std::fs::create_dir(src.join(".berth-uploads"))?;
    std::fs::write(src.join(".berth-uploads/planted"), b"staged part")?;
    let src_before = tree(&src)?;

    let mut opts = MountOpts::default();
    if walk {
        opts.env.push(("BERTH_LOCAL_NO_OPENAT2".into(), "1".into()));
    }
    let m = Mount::local(&src, opts)?;

    let root = names(m.path())?;
    ensure!(root == ["ok.txt", "sub"], "the mount lists {root:?}");
    let sub = names(&m.join("sub"))?;
    ensure!(sub == ["inner.txt"], "sub/ lists {sub:?}");

    for rel in [
        "x",
        "x/shadow",
        "x/passwd",
        "s",
        "dirlink",
        "dirlink/inner.txt",
        "fifo",
        "sock",
        "null",
        "sub/link",
        ".berth-uploads",
        ".berth-uploads/planted",
    ] {
        let path = m.join(rel);
        expect_errno(
            &format!("stat {rel}"),
            std::fs::metadata(&path),
            libc::ENOENT,
        )?;
        let (opened, _) = with_time_limit(rel, Duration::from_secs(10), move || {
            File::open(path).map(drop)
        })?;
        expect_errno(&format!("open {rel}"), opened, libc::ENOENT)?;
    }
    for rel in ["x", "dirlink", ".berth-uploads"] {
        expect_errno(
            &format!("ls {rel}"),
            std::fs::read_dir(m.join(rel)).map(drop),
            libc::ENOENT,
        )?;
    }

    // Nothing is written through a symlink, made below one, or removed.
    for rel in ["x/newfile", "x/cron.d/berth-e2e-job", "dirlink/newfile"] {
        expect_errno(
            &format!("create {rel}"),
            File::create(m.join(rel)).map(drop),
            libc::ENOENT,
        )?;
    }
    expect_errno(
        "mkdir x/d",
        std::fs::create_dir(m.join("x/d")),
        libc::ENOENT,
    )?;
    for rel in ["s", "fifo", "null", "sub/link"] {
        expect_errno(
            &format!("unlink {rel}"),
            std::fs::remove_file(m.join(rel)),
            libc::ENOENT,
        )?;
    }
    // A new file where the source has a symlink: the store will not replace the link.
    let replaced = File::create(m.join("s")).and_then(|mut f| {
        f.write_all(b"overwrite")?;
        close_checked(f)
    });
    ensure!(
        replaced.is_err(),
        "writing s (a symlink in the source) succeeded"
    );
    expect_errno(
        "create .berth-uploads",
        File::create(m.join(".berth-uploads")).map(drop),
        libc::EACCES,
    )?;
    ensure!(
        !Path::new("/etc/newfile").exists() && !Path::new("/etc/cron.d/berth-e2e-job").exists(),
        "a file appeared in /etc"
    );
    ensure!(
        tree(&outside)? == outside_before,
        "the directory outside the source changed"
    );

    // Regular files and directories keep working.
    ensure_same_bytes("ok.txt", &read_file(m.join("ok.txt"))?, b"fine")?;
    ensure_same_bytes(
        "sub/inner.txt",
        &read_file(m.join("sub/inner.txt"))?,
        b"also fine",
    )?;
    let mut f = File::create(m.join("sub/new.txt"))?;
    f.write_all(b"new")?;
    close_checked(f).context("close sub/new.txt")?;
    ensure_same_bytes(
        "sub/new.txt in the source",
        &read_file(src.join("sub/new.txt"))?,
        b"new",
    )?;
    let mut src_now = tree(&src)?;
    src_now.remove("sub/new.txt");
    src_now.retain(|k, _| !k.starts_with(".berth-uploads/") || k == ".berth-uploads/planted");
    let mut want = src_before.clone();
    want.retain(|k, _| !k.starts_with(".berth-uploads/") || k == ".berth-uploads/planted");
    ensure!(
        src_now == want,
        "the source's symlinks, special files or staged files changed:\n  now  {src_now:?}\n  was  {want:?}"
    );

    // `berth status` counts what was skipped: x, s, dirlink, fifo, sock, null and sub/link.
    std::thread::sleep(STATUS_REFRESH);
    let scratch = tempfile::tempdir()?;
    let out = crate::mount::berth_command(scratch.path())
        .args(["status", "--json", "--state-dir"])
        .arg(m.state_dir())
        .arg(m.path())
        .output()?;
    ensure!(
        out.status.success(),
        "berth status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("status JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    let skipped = status["skipped_keys"]
        .as_u64()
        .context("skipped_keys in status")?;
    ensure!(skipped >= 7, "skipped_keys is {skipped}, want at least 7");
    let log = m.log();
    ensure!(
        !log.contains(std::str::from_utf8(SECRET)?),
        "the secret appeared in berth's log"
    );
    m.finish()
}

fn names(dir: &Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("read_dir {}", dir.display()))? {
        out.push(e?.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

/// Every entry below `dir` (not following symlinks): file bytes, symlink targets, or the
/// kind of a special file.
fn tree(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) -> Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let rel = path.strip_prefix(base)?.to_string_lossy().into_owned();
            let kind = std::fs::symlink_metadata(&path)?.file_type();
            if kind.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(base, &path, out)?;
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path)?;
                out.insert(rel, format!("-> {}", target.display()).into_bytes());
            } else if kind.is_file() {
                out.insert(rel, std::fs::read(&path)?);
            } else {
                out.insert(rel, format!("{kind:?}").into_bytes());
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out)?;
    Ok(out)
}

fn mknod(path: &Path, kind: libc::mode_t, dev: libc::dev_t) -> Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, dev) } != 0 {
        anyhow::bail!(
            "mknod {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
