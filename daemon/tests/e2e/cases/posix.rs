//! POSIX metadata and symbolic links: the everyday tools (tar, cp -a, rsync -a, git) succeed
//! and what they set survives a remount; objects carrying s3fs's metadata read right; chmod,
//! chown and utimes of stored objects, small and multipart.

use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::s3fs::S3fs;
use crate::shared_server;
use crate::util::{ensure_same_bytes, expect_errno, random_bytes, read_file};

const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Runs a command, failing with its output unless it exits 0 with nothing on stderr.
fn run(what: &str, cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.trim().is_empty(),
        "{what}: {} (stderr: {stderr})",
        out.status
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn set_mtime(path: &Path, secs: i64, nsecs: i64) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())?;
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: nsecs,
    };
    // SAFETY: a NUL-terminated path and two valid timespecs.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    ensure!(
        rc == 0,
        "utimensat {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// A tree with files of odd modes and owners, an empty directory, a sticky directory, and
/// symbolic links (to a file, to a directory, dangling, absolute), every time fixed.
fn make_tree(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root.join("sub/empty"))?;
    std::fs::create_dir_all(root.join("sticky"))?;
    std::fs::write(root.join("f1"), b"first file\n")?;
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\necho hi\n")?;
    std::fs::write(root.join("sub/data.bin"), random_bytes(0x9051, 300_000))?;
    for (p, mode) in [
        ("f1", 0o604),
        ("run.sh", 0o751),
        ("sub/data.bin", 0o640),
        ("sticky", 0o1777),
        ("sub/empty", 0o700),
    ] {
        std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(mode))?;
    }
    std::os::unix::fs::chown(root.join("f1"), Some(1234), Some(5678))?;
    std::os::unix::fs::chown(root.join("sub"), Some(42), Some(43))?;
    symlink("f1", root.join("link"))?;
    symlink("sub", root.join("dirlink"))?;
    symlink("nowhere/at/all", root.join("dangling"))?;
    symlink("/etc/hostname", root.join("absolute"))?;
    for (i, p) in [
        "f1",
        "run.sh",
        "sub/data.bin",
        "link",
        "dirlink",
        "dangling",
        "absolute",
        "sub/empty",
        "sticky",
        "sub",
    ]
    .iter()
    .enumerate()
    {
        // Whole seconds: tar's archive format keeps no more.
        set_mtime(&root.join(p), 1_500_000_000 + i as i64 * 1000, 0)?;
    }
    Ok(())
}

/// Every entry below `root` with its type, mode, owner, mtime and link target, one line each;
/// for a directory only its type unless `dir_attrs`.
fn describe(root: &Path, dir_attrs: bool) -> Result<Vec<String>> {
    let out = run(
        &format!("find {}", root.display()),
        Command::new("find")
            .arg(root)
            .arg("-mindepth")
            .arg("1")
            .arg("-printf")
            .arg("%P %y %m %U %G %T@ %l %s\n"),
    )?;
    let mut lines: Vec<String> = out
        .lines()
        .map(|l| {
            // Directory sizes are the filesystem's own.
            let mut f: Vec<&str> = l.split(' ').collect();
            if f.get(1) == Some(&"d") {
                f.truncate(if dir_attrs { f.len() - 1 } else { 2 });
            }
            f.join(" ")
        })
        .collect();
    lines.sort();
    Ok(lines)
}

fn ensure_same_tree(what: &str, got: &Path, want: &Path, dir_attrs: bool) -> Result<()> {
    let (got, want) = (describe(got, dir_attrs)?, describe(want, dir_attrs)?);
    if got != want {
        let diff: Vec<String> = want
            .iter()
            .filter(|l| !got.contains(l))
            .map(|l| format!("- {l}"))
            .chain(
                got.iter()
                    .filter(|l| !want.contains(l))
                    .map(|l| format!("+ {l}")),
            )
            .collect();
        bail!("{what}: trees differ:\n{}", diff.join("\n"));
    }
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new("git");
    cmd.arg("-C")
        .arg(dir)
        .args(["-c", "user.email=e2e@berth", "-c", "user.name=e2e"])
        .args(args)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("HOME", dir);
    cmd
}

/// What the tools write: run on a fresh mount, checked after a remount.
struct Tools {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    archive: PathBuf,
    repo: PathBuf,
}

impl Tools {
    fn new() -> Result<Tools> {
        let tmp = tempfile::Builder::new()
            .prefix("berth-e2e-posix-")
            .tempdir()?;
        let src = tmp.path().join("src");
        make_tree(&src)?;
        let archive = tmp.path().join("tree.tar");
        run(
            "tar c",
            Command::new("tar")
                .arg("cf")
                .arg(&archive)
                .arg("-C")
                .arg(&src)
                .arg("."),
        )?;
        let repo = tmp.path().join("repo");
        std::fs::create_dir(&repo)?;
        run("git init", &mut git(&repo, &["init", "-q"]))?;
        std::fs::write(repo.join("README"), b"hello\n")?;
        std::fs::write(repo.join("build.sh"), b"#!/bin/sh\n")?;
        std::fs::set_permissions(
            repo.join("build.sh"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        symlink("README", repo.join("README.link"))?;
        run("git add", &mut git(&repo, &["add", "-A"]))?;
        run(
            "git commit",
            &mut git(&repo, &["commit", "-q", "-m", "first commit"]),
        )?;
        Ok(Tools {
            _tmp: tmp,
            src,
            archive,
            repo,
        })
    }

    /// tar x, cp -a, rsync -a and git clone into `mnt`: each must exit 0, quietly.
    fn write(&self, mnt: &Path) -> Result<()> {
        std::fs::create_dir(mnt.join("tar"))?;
        run(
            "tar x into the mount",
            Command::new("tar")
                .arg("xf")
                .arg(&self.archive)
                .arg("-C")
                .arg(mnt.join("tar")),
        )?;
        run(
            "cp -a into the mount",
            Command::new("cp")
                .arg("-a")
                .arg(&self.src)
                .arg(mnt.join("cp")),
        )?;
        let mut from = self.src.clone().into_os_string();
        from.push("/");
        run(
            "rsync -a into the mount",
            Command::new("rsync")
                .arg("-a")
                .arg(&from)
                .arg(mnt.join("rsync")),
        )?;
        run(
            "git clone into the mount",
            Command::new("git")
                .arg("clone")
                .arg("-q")
                .arg(&self.repo)
                .arg(mnt.join("git"))
                .env("GIT_CONFIG_NOSYSTEM", "1"),
        )?;
        let status = run(
            "git status",
            &mut git(&mnt.join("git"), &["status", "--porcelain"]),
        )?;
        ensure!(
            status.trim().is_empty(),
            "git status right after the clone: {status}"
        );
        Ok(())
    }

    /// What a fresh mount shows of what `write` left. `dir_attrs`: whether the store keeps
    /// metadata on directory markers (SeaweedFS, the S3 server of these tests, drops it: a
    /// HEAD of a `dir/` marker answers without any `x-amz-meta-*`).
    fn check(&self, mnt: &Path, dir_attrs: bool) -> Result<()> {
        let out = Command::new("tar")
            .arg("df")
            .arg(&self.archive)
            .arg("-C")
            .arg(mnt.join("tar"))
            .output()?;
        let diff = String::from_utf8_lossy(&out.stdout);
        // Where the store drops them, only directories' attributes may differ.
        let dirs = [".:", "./sub:", "./sub/empty:", "./sticky:"];
        let real: Vec<&str> = diff
            .lines()
            .filter(|l| dir_attrs || !dirs.iter().any(|d| l.starts_with(d)))
            .collect();
        ensure!(
            real.is_empty() && out.stderr.is_empty(),
            "tar d: {diff} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure_same_tree("tar x", &mnt.join("tar"), &self.src, dir_attrs)?;
        ensure_same_tree("cp -a", &mnt.join("cp"), &self.src, dir_attrs)?;
        ensure_same_tree("rsync -a", &mnt.join("rsync"), &self.src, dir_attrs)?;
        let status = run(
            "git status after a remount",
            &mut git(&mnt.join("git"), &["status", "--porcelain"]),
        )?;
        ensure!(
            status.trim().is_empty(),
            "git status after a remount: {status}"
        );
        let log = run(
            "git log",
            &mut git(&mnt.join("git"), &["log", "--format=%s"]),
        )?;
        ensure!(
            log.trim() == "first commit",
            "git log after a remount: {log}"
        );
        ensure!(
            std::fs::read_link(mnt.join("git/README.link"))? == Path::new("README"),
            "the cloned link"
        );
        let exe = std::fs::metadata(mnt.join("git/build.sh"))?.mode();
        ensure!(
            exe & 0o111 != 0,
            "build.sh lost its executable bits: {exe:o}"
        );
        Ok(())
    }
}

pub fn tools_on_s3() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("posix-tools")?;
    let tools = Tools::new()?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    tools.write(m.path())?;
    m.finish()?;

    // In the bucket: s3fs's conventions.
    let meta = bucket.metadata("cp/f1")?;
    let want = |k: &str, v: String| (k.to_string(), v);
    for pair in [
        want("mode", (S_IFREG | 0o604).to_string()),
        want("uid", "1234".into()),
        want("gid", "5678".into()),
        want("mtime", "1500000000".into()),
    ] {
        ensure!(
            meta.contains(&pair),
            "cp/f1 metadata {meta:?} lacks {pair:?}"
        );
    }
    ensure_same_bytes("the link object's body", &bucket.get("cp/link")?, b"f1")?;
    let link = bucket.metadata("cp/link")?;
    ensure!(
        link.contains(&want("mode", (S_IFLNK | 0o777).to_string())),
        "cp/link metadata {link:?}"
    );

    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    tools.check(m.path(), false)?;
    m.finish()
}

pub fn tools_on_local_store() -> Result<()> {
    let store = tempfile::Builder::new()
        .prefix("berth-e2e-posix-store-")
        .tempdir()?;
    let tools = Tools::new()?;
    let m = Mount::local(store.path(), MountOpts::default())?;
    tools.write(m.path())?;
    m.finish()?;
    // Never a host symlink in the store: links are files (their metadata in an xattr).
    let host = std::fs::symlink_metadata(store.path().join("cp/link"))?;
    ensure!(
        host.is_file(),
        "the store holds a {:?} for a link",
        host.file_type()
    );
    let m = Mount::local(store.path(), MountOpts::default())?;
    tools.check(m.path(), true)?;
    m.finish()
}

pub fn stored_object_attributes() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("posix-stored")?;
    let small = b"stored without metadata".to_vec();
    bucket.put("plain.txt", small.clone())?;
    let big = random_bytes(0x5e7a, 12 << 20);
    bucket.put("big.bin", big.clone())?;
    // As s3fs writes them; then what a hostile writer could put there.
    bucket.put_with_metadata(
        "s3fs.txt",
        b"x",
        &[
            ("mode", "33216"),
            ("uid", "1001"),
            ("gid", "1002"),
            ("mtime", "1600000000"),
        ],
    )?;
    bucket.put_with_metadata("s3fs-link", b"plain.txt", &[("mode", "41471")])?;
    // A link object longer than any target (PATH_MAX) can be.
    bucket.put_with_metadata("long-link", &[b'a'; 5000], &[("mode", "41471")])?;
    bucket.put_with_metadata(
        "garbage.txt",
        b"y",
        &[("mode", "8630"), ("uid", "-5"), ("mtime", "soon")],
    )?;
    bucket.put_with_metadata("dir/", b"", &[("mode", "16832"), ("uid", "7")])?;
    bucket.put("dir/inner", b"in".to_vec())?;
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        MountOpts::flags(&["--copy-part-size", "5MiB", "--uid", "0", "--gid", "0"]),
    )?;
    let st = std::fs::symlink_metadata(m.join("plain.txt"))?;
    ensure!(
        (st.mode(), st.uid(), st.gid()) == (S_IFREG | 0o644, 0, 0),
        "an object without metadata: the mount's defaults, got {:o} {}:{}",
        st.mode(),
        st.uid(),
        st.gid()
    );
    let st = std::fs::symlink_metadata(m.join("s3fs.txt"))?;
    ensure!(
        (st.mode(), st.uid(), st.gid(), st.mtime()) == (33216, 1001, 1002, 1_600_000_000),
        "s3fs's metadata: got {:o} {}:{} {}",
        st.mode(),
        st.uid(),
        st.gid(),
        st.mtime()
    );
    ensure!(
        std::fs::read_link(m.join("s3fs-link"))? == Path::new("plain.txt"),
        "an s3fs link"
    );
    ensure_same_bytes(
        "read through an s3fs link",
        &read_file(m.join("s3fs-link"))?,
        &small,
    )?;
    expect_errno(
        "readlink of an oversized link object",
        std::fs::read_link(m.join("long-link")),
        libc::EIO,
    )?;
    // A character device's mode is served as a regular file's, the rest ignored.
    let st = std::fs::symlink_metadata(m.join("garbage.txt"))?;
    ensure!(
        st.file_type().is_file() && st.mode() == S_IFREG | 0o666 && st.uid() == 0,
        "garbage metadata: got {:o} uid {}",
        st.mode(),
        st.uid()
    );
    // (A directory's attributes on its marker: SeaweedFS keeps no metadata on `dir/`
    // markers, so they are checked on the local store, in `tools_on_local_store`.)
    ensure!(
        std::fs::metadata(m.join("dir"))?.is_dir(),
        "dir/ with a marker"
    );

    // chmod, chown, utimes of stored objects: bytes untouched, metadata in the bucket.
    std::fs::set_permissions(m.join("plain.txt"), std::fs::Permissions::from_mode(0o600))?;
    std::os::unix::fs::chown(m.join("plain.txt"), Some(99), None)?;
    set_mtime(&m.join("plain.txt"), 1_234_567_890, 250_000_000)?;
    ensure_same_bytes("plain.txt after chmod", &bucket.get("plain.txt")?, &small)?;
    let meta = bucket.metadata("plain.txt")?;
    ensure!(
        meta == vec![
            ("mode".to_string(), (S_IFREG | 0o600).to_string()),
            ("mtime".to_string(), "1234567890.25".to_string()),
            ("uid".to_string(), "99".to_string()),
        ],
        "plain.txt metadata: {meta:?}"
    );
    // Above the copy part size: a multipart copy onto itself.
    std::fs::set_permissions(m.join("big.bin"), std::fs::Permissions::from_mode(0o751))?;
    ensure_same_bytes(
        "big.bin after chmod (multipart copy)",
        &bucket.get("big.bin")?,
        &big,
    )?;
    ensure!(
        bucket
            .metadata("big.bin")?
            .contains(&("mode".to_string(), (S_IFREG | 0o751).to_string())),
        "big.bin metadata: {:?}",
        bucket.metadata("big.bin")?
    );
    // An implicit directory gets a marker to carry its mode.
    bucket.put("implicit/x", b"x".to_vec())?;
    std::fs::set_permissions(m.join("implicit"), std::fs::Permissions::from_mode(0o750))?;
    ensure!(
        bucket.exists("implicit/")?,
        "no implicit/ marker after chmod"
    );
    // The root of a whole-bucket mount takes them too (kept in memory).
    std::fs::set_permissions(m.path(), std::fs::Permissions::from_mode(0o711))?;
    ensure!(
        std::fs::metadata(m.path())?.mode() & 0o7777 == 0o711,
        "root mode"
    );
    // Still refused, with their errnos.
    expect_errno(
        "hard link",
        std::fs::hard_link(m.join("plain.txt"), m.join("hard")),
        libc::EPERM,
    )?;
    let fifo = std::ffi::CString::new(m.join("fifo").as_os_str().as_encoded_bytes())?;
    // SAFETY: a NUL-terminated path.
    let rc = unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) };
    let res = if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    };
    expect_errno("mkfifo", res, libc::EPERM)?;
    m.finish()?;

    // Mounted for many users: stored owners and modes are not shown, links still are.
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        MountOpts::flags(&["--ignore-stored-metadata", "--uid", "0", "--gid", "0"]),
    )?;
    let st = std::fs::symlink_metadata(m.join("s3fs.txt"))?;
    ensure!(
        (st.mode(), st.uid(), st.mtime()) == (S_IFREG | 0o644, 0, 1_600_000_000),
        "--ignore-stored-metadata: got {:o} uid {} mtime {}",
        st.mode(),
        st.uid(),
        st.mtime()
    );
    ensure!(
        std::fs::read_link(m.join("s3fs-link")).is_ok(),
        "link with --ignore-stored-metadata"
    );
    m.finish()
}

/// The attributes both tools must agree on, as `stat` shows them.
fn attrs(path: &Path) -> Result<(u32, u32, u32, i64)> {
    let st = std::fs::symlink_metadata(path).with_context(|| format!("stat {}", path.display()))?;
    Ok((st.mode(), st.uid(), st.gid(), st.mtime()))
}

/// Writes, through `root` (a mount), a file with a set mode, owner and time, an executable,
/// a link to the file, a dangling link and a subdirectory with a file in it.
fn write_interop_tree(root: &Path) -> Result<()> {
    std::fs::create_dir_all(root.join("sub"))?;
    std::fs::write(root.join("f.txt"), b"written for the other tool\n")?;
    std::fs::set_permissions(root.join("f.txt"), std::fs::Permissions::from_mode(0o640))?;
    std::os::unix::fs::chown(root.join("f.txt"), Some(1234), Some(5678))?;
    set_mtime(&root.join("f.txt"), 1_500_000_000, 0)?;
    std::fs::write(root.join("run.sh"), b"#!/bin/sh\n")?;
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))?;
    set_mtime(&root.join("run.sh"), 1_600_000_000, 500_000_000)?;
    symlink("f.txt", root.join("link"))?;
    symlink("../nowhere/x", root.join("dangling"))?;
    std::fs::write(root.join("sub/inner"), b"inner\n")?;
    Ok(())
}

/// What `write_interop_tree` left, seen through the other tool's mount at `root`.
fn check_interop_tree(tool: &str, root: &Path) -> Result<()> {
    let got = attrs(&root.join("f.txt"))?;
    ensure!(
        got == (S_IFREG | 0o640, 1234, 5678, 1_500_000_000),
        "{tool}: f.txt mode {:o} owner {}:{} mtime {}",
        got.0,
        got.1,
        got.2,
        got.3
    );
    let (mode, _, _, mtime) = attrs(&root.join("run.sh"))?;
    ensure!(
        (mode, mtime) == (S_IFREG | 0o755, 1_600_000_000),
        "{tool}: run.sh mode {mode:o} mtime {mtime}"
    );
    ensure_same_bytes(
        &format!("{tool}: f.txt"),
        &read_file(root.join("f.txt"))?,
        b"written for the other tool\n",
    )?;
    for (link, target) in [("link", "f.txt"), ("dangling", "../nowhere/x")] {
        let (mode, ..) = attrs(&root.join(link))?;
        ensure!(mode & 0o170000 == S_IFLNK, "{tool}: {link} mode {mode:o}");
        let got = std::fs::read_link(root.join(link))?;
        ensure!(
            got == Path::new(target),
            "{tool}: {link} -> {}",
            got.display()
        );
    }
    ensure_same_bytes(
        &format!("{tool}: read through the link"),
        &read_file(root.join("link"))?,
        b"written for the other tool\n",
    )?;
    ensure!(
        std::fs::metadata(root.join("sub"))?.is_dir(),
        "{tool}: sub is not a directory"
    );
    ensure_same_bytes(
        &format!("{tool}: sub/inner"),
        &read_file(root.join("sub/inner"))?,
        b"inner\n",
    )?;
    let mut names: Vec<String> = std::fs::read_dir(root)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    ensure!(
        names == ["dangling", "f.txt", "link", "run.sh", "sub"],
        "{tool}: listing {names:?}"
    );
    Ok(())
}

/// The real s3fs and berth, on one bucket: what one writes (modes, owners, mtimes, links),
/// the other reads right.
pub fn s3fs_interop() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("posix-s3fs")?;

    let s3fs = S3fs::mount(&server.endpoint(), &bucket.name)?;
    std::fs::create_dir(s3fs.join("from-s3fs"))?;
    write_interop_tree(&s3fs.join("from-s3fs"))?;
    s3fs.finish()?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    check_interop_tree("berth reading s3fs", &m.join("from-s3fs"))?;
    std::fs::create_dir(m.join("from-berth"))?;
    write_interop_tree(&m.join("from-berth"))?;
    m.finish()?;

    let s3fs = S3fs::mount(&server.endpoint(), &bucket.name)?;
    check_interop_tree("s3fs reading berth", &s3fs.join("from-berth"))?;
    s3fs.finish()
}
