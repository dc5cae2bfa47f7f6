//! Writing new objects through the mount: commit on close (or fsync).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::shared_server;
use crate::util::{close_checked, ensure_same_bytes, random_bytes, read_file, stat};

/// Write `data` to a new file in chunks whose sizes cycle through `chunks`,
/// then close, checking the close result.
fn write_chunked(path: &std::path::Path, data: &[u8], chunks: &[usize]) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut off = 0;
    for size in chunks.iter().cycle() {
        if off == data.len() {
            break;
        }
        let end = (off + size).min(data.len());
        file.write_all(&data[off..end])
            .with_context(|| format!("write {}..{end} of {}", off, path.display()))?;
        off = end;
    }
    close_checked(file).with_context(|| format!("close {}", path.display()))
}

pub fn sequential_writes() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("write")?;
    bucket.put("existing/x", b"makes existing/ a directory".to_vec())?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;

    // 20 MiB in 1 MiB and odd-sized chunks.
    let big = random_bytes(0x20, 20 << 20);
    let chunks = [1 << 20, 777, 65_537, (1 << 20) + 13, 4093, 1, 300_000];
    write_chunked(&m.join("big.bin"), &big, &chunks)?;
    ensure_same_bytes("GetObject big.bin", &bucket.get("big.bin")?, &big)?;
    ensure!(
        stat(m.join("big.bin"))?.len() == big.len() as u64,
        "size of big.bin through the mount after close"
    );
    ensure_same_bytes(
        "big.bin read back through the mount",
        &read_file(m.join("big.bin"))?,
        &big,
    )?;

    // A few bytes.
    write_chunked(&m.join("small.txt"), b"hi!\n", &[4])?;
    ensure_same_bytes("GetObject small.txt", &bucket.get("small.txt")?, b"hi!\n")?;

    // An empty file.
    close_checked(File::create(m.join("empty.txt"))?).context("close empty.txt")?;
    let head = bucket
        .head("empty.txt")?
        .context("empty.txt not in bucket after close")?;
    ensure!(
        head.size == 0,
        "empty.txt has {} bytes in the bucket",
        head.size
    );

    // Into an implicit directory: the key gets the directory's prefix.
    let nested = random_bytes(0x21, 100_000);
    write_chunked(&m.join("existing/new.bin"), &nested, &[4096])?;
    ensure_same_bytes(
        "GetObject existing/new.bin",
        &bucket.get("existing/new.bin")?,
        &nested,
    )?;
    m.finish()
}

pub fn cp_into_mount() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("cp")?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    let src_dir = tempfile::Builder::new().prefix("berth-e2e-cp-").tempdir()?;
    let src = src_dir.path().join("source.bin");
    let data = random_bytes(0xc9, (3 << 20) + 5);
    std::fs::write(&src, &data)?;
    let out = Command::new("cp")
        .arg(&src)
        .arg(m.join("copied.bin"))
        .output()
        .context("running cp")?;
    ensure!(
        out.status.success(),
        "cp into the mount failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure_same_bytes("GetObject copied.bin", &bucket.get("copied.bin")?, &data)?;
    m.finish()
}

pub fn overwrite_with_truncate() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("overwrite")?;
    bucket.put("over.txt", b"old content, longer than the new one".to_vec())?;
    bucket.put("over2.txt", b"old content too".to_vec())?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;

    // O_WRONLY|O_TRUNC on an existing object.
    let mut f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.join("over.txt"))
        .context("open over.txt with O_TRUNC")?;
    f.write_all(b"new")?;
    close_checked(f).context("close over.txt")?;
    ensure_same_bytes("GetObject over.txt", &bucket.get("over.txt")?, b"new")?;
    ensure_same_bytes(
        "over.txt through the mount",
        &read_file(m.join("over.txt"))?,
        b"new",
    )?;

    // O_CREAT|O_TRUNC (File::create) on an existing object.
    let data = random_bytes(0x0e, 2 << 20);
    let mut f = File::create(m.join("over2.txt")).context("File::create over2.txt")?;
    f.write_all(&data)?;
    close_checked(f).context("close over2.txt")?;
    ensure_same_bytes("GetObject over2.txt", &bucket.get("over2.txt")?, &data)?;
    m.finish()
}

pub fn fsync_commits() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("fsync")?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    let data = random_bytes(0xf5, 300 << 10);
    let mut f = File::create(m.join("synced.bin"))?;
    f.write_all(&data)?;
    f.sync_all().context("fsync synced.bin")?;
    // Still open: the object must already be there.
    let head = bucket
        .head("synced.bin")?
        .context("synced.bin not in the bucket after fsync (before close)")?;
    ensure!(
        head.size == data.len() as u64,
        "after fsync the object has {} bytes, want {}",
        head.size,
        data.len()
    );
    ensure_same_bytes("GetObject after fsync", &bucket.get("synced.bin")?, &data)?;
    close_checked(f).context("close synced.bin")?;
    ensure_same_bytes("GetObject after close", &bucket.get("synced.bin")?, &data)?;
    m.finish()
}

/// Regression: a child forked while a file is open for writing closes its copy of the
/// descriptor at exec (O_CLOEXEC), a FUSE flush that commits the file half-way; the writer's
/// later writes used to fail with EOPNOTSUPP. They go on, and the close commits the whole
/// file: after the flush, after a second one, and with a write after each fork.
pub fn a_fork_mid_write_loses_nothing() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("fork-mid-write")?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    // 12 MiB: the re-read of what the flush committed spans more than one part.
    let data = random_bytes(0xf0c, 12 << 20);
    let mut f = File::create(m.join("forked.bin"))?;
    for (i, piece) in data.chunks(4 << 20).enumerate() {
        f.write_all(piece)
            .with_context(|| format!("write of piece {i} (after {i} forks)"))?;
        let status = std::process::Command::new("true")
            .status()
            .context("running true")?;
        ensure!(status.success());
        // The child's close was a flush: what was written so far is committed.
        let head = bucket
            .head("forked.bin")?
            .context("nothing committed by the child's flush")?;
        ensure!(
            head.size == ((i + 1) * (4 << 20)) as u64,
            "after fork {i} the object has {} bytes",
            head.size
        );
    }
    close_checked(f).context("close forked.bin")?;
    ensure_same_bytes("GetObject after close", &bucket.get("forked.bin")?, &data)?;
    ensure_same_bytes("read back", &std::fs::read(m.join("forked.bin"))?, &data)?;
    m.finish()
}

/// Regression: a shell redirect opens the file, moves the fd with dup2 and closes the original
/// before writing, so the first flush carries no data. The object must end up with the bytes
/// written afterwards, not empty. Appending (`>>`) to a stored object is refused.
pub fn shell_redirect() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("redirect")?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    let file = m.join("greeting.txt");
    let status = Command::new("sh")
        .arg("-c")
        .arg("echo hello > \"$1\" && printf world > \"$1.2\"")
        .arg("sh")
        .arg(&file)
        .status()?;
    ensure!(status.success(), "redirect into the mount failed: {status}");
    ensure_same_bytes(
        "GetObject greeting.txt",
        &bucket.get("greeting.txt")?,
        b"hello\n",
    )?;
    ensure_same_bytes(
        "GetObject greeting.txt.2",
        &bucket.get("greeting.txt.2")?,
        b"world",
    )?;
    ensure_same_bytes("read back", &read_file(&file)?, b"hello\n")?;

    // `>>` appends to the stored object (write::append_to_stored_objects has the rest).
    let status = Command::new("sh")
        .arg("-c")
        .arg("echo more >> \"$1\"")
        .arg("sh")
        .arg(&file)
        .status()?;
    ensure!(status.success(), "appending with >> failed: {status}");
    ensure_same_bytes(
        "GetObject greeting.txt after >>",
        &bucket.get("greeting.txt")?,
        b"hello\nmore\n",
    )?;
    m.finish()
}

/// `cat TAIL >> KEY` in a child process (O_APPEND) with `len` random bytes; checks that the
/// object, in the bucket and through the mount, is `old` then those bytes. Returns the tail
/// and its file.
fn cat_onto(
    m: &Mount,
    bucket: &crate::s3::Bucket,
    key: &str,
    old: &[u8],
    seed: u64,
    len: usize,
) -> Result<(Vec<u8>, tempfile::NamedTempFile)> {
    let tail = random_bytes(seed, len);
    let tail_file = tempfile::NamedTempFile::new()?;
    std::fs::write(tail_file.path(), &tail)?;
    let out = Command::new("sh")
        .arg("-c")
        .arg("cat \"$2\" >> \"$1\"")
        .arg("sh")
        .arg(m.join(key))
        .arg(tail_file.path())
        .output()?;
    ensure!(
        out.status.success(),
        "O_APPEND of {len} bytes onto {key} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = old.to_vec();
    want.extend_from_slice(&tail);
    ensure_same_bytes(&format!("{key} after O_APPEND"), &bucket.get(key)?, &want)?;
    ensure_same_bytes(&format!("{key} read back"), &read_file(m.join(key))?, &want)?;
    Ok((tail, tail_file))
}

/// An append to an object of several parts: the whole parts are copied by the store
/// (UploadPartCopy, conditional on the ETag), only the tail is read back; the object is the
/// old bytes then the new ones. An append to an object replaced before its parts are copied
/// fails and leaves the other client's object.
pub fn large_append_copies_on_the_store_side() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("append-copy")?;
    let old = random_bytes(0xc09e, 12 * 1024 * 1024 + 4321);
    bucket.put("big.bin", old.clone())?;
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        MountOpts::flags(&["--part-size", "5MiB"]),
    )?;
    let (_, tail_file) = cat_onto(&m, &bucket, "big.bin", &old, 0x7a12, 3 * 1024 * 1024 + 7)?;
    let copied = 10 * 1024 * 1024;
    ensure!(
        m.log().contains(&format!("copied={copied}")),
        "the two whole 5 MiB parts were not copied by the store (log says nothing of copied={copied})"
    );

    // Opened for append, then replaced by another client before the first write: the copy
    // is refused (If-Match), the write fails, the other client's object stays.
    bucket.put("raced.bin", old.clone())?;
    let mut sh = Command::new("sh")
        .arg("-c")
        .arg("exec 3>>\"$1\"; read go; cat \"$2\" >&3")
        .arg("sh")
        .arg(m.join("raced.bin"))
        .arg(tail_file.path())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let mut go = sh.stdin.take().context("sh stdin")?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    let other = random_bytes(0x07e5, 11 * 1024 * 1024);
    bucket.put("raced.bin", other.clone())?;
    go.write_all(b"go\n")?;
    drop(go);
    let out = sh.wait_with_output()?;
    ensure!(
        !out.status.success(),
        "an append to an object replaced before its parts were copied was reported as saved"
    );
    ensure_same_bytes(
        "raced.bin keeps the other client's version",
        &bucket.get("raced.bin")?,
        &other,
    )?;
    m.finish()
}

/// The window the HEAD check leaves: another client replaces the object after berth checked
/// it and before the commit reaches the store. The commit carries If-Match (held back here
/// by a proxy while the object is replaced), so the store refuses it: close fails, the other
/// client's object stays.
pub fn append_commit_is_conditional() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("append-if-match")?;
    bucket.put("log.txt", b"line one\n".to_vec())?;
    let proxy = crate::proxy::CountingProxy::holding_conditional_writes(
        &server.endpoint(),
        std::time::Duration::from_secs(2),
    )?;
    let m = Mount::s3_endpoint(&proxy.endpoint(), &bucket.name, None, MountOpts::default())?;
    // dd opens the file itself and reports a failing close (a shell's `>>` ignores it).
    let mut dd = Command::new("dd")
        .arg(format!("of={}", m.join("log.txt").display()))
        .args(["oflag=append", "conv=notrunc", "status=none"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    dd.stdin
        .take()
        .context("dd stdin")?
        .write_all(b"line two\n")?;
    let start = std::time::Instant::now();
    while proxy.held() == 0 {
        ensure!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the append's commit never reached the store with If-Match"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    bucket.put("log.txt", b"another client's version\n".to_vec())?;
    let out = dd.wait_with_output()?;
    ensure!(
        !out.status.success(),
        "an append whose object was replaced before its commit was reported as saved"
    );
    ensure_same_bytes(
        "log.txt keeps the other client's version",
        &bucket.get("log.txt")?,
        b"another client's version\n",
    )?;
    ensure!(
        m.log().contains("If-Match refused"),
        "the refusal is not in the log"
    );
    m.finish()
}

/// Appending to stored objects (`>>`, O_APPEND, write-only open without O_TRUNC and a write at
/// the end), small and above the 5 MiB part size: the old bytes then the new ones, in S3. An
/// object another client replaces while an append is open is not clobbered: the appender's
/// close fails and the other client's object stays.
pub fn append_to_stored_objects() -> Result<()> {
    use std::process::Stdio;
    let server = shared_server()?;
    let bucket = server.bucket("append")?;
    let small = b"line one\n".to_vec();
    let big = random_bytes(0xa99e, 6 * 1024 * 1024 + 123);
    bucket.put("small.log", small.clone())?;
    bucket.put("big.bin", big.clone())?;
    bucket.put("raced.log", b"v1\n".to_vec())?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;

    let status = Command::new("sh")
        .arg("-c")
        .arg("echo 'line two' >> \"$1\" && echo 'line three' >> \"$1\"")
        .arg("sh")
        .arg(m.join("small.log"))
        .status()?;
    ensure!(status.success(), ">> failed: {status}");
    ensure_same_bytes(
        "small.log after two >>",
        &bucket.get("small.log")?,
        b"line one\nline two\nline three\n",
    )?;

    // The writers below are child processes: a child another test thread forks while this
    // process holds a file open closes its copy of the fd at exec, and that close is a FUSE
    // FLUSH that commits the file early (README, semantics: "a writer that forks").
    cat_onto(&m, &bucket, "big.bin", &big, 0x7a11, 3 * 1024 * 1024)?;

    // Write-only, no O_TRUNC (dd conv=notrunc), at the end.
    let size = b"line one\nline two\nline three\n".len();
    let mut dd = Command::new("dd")
        .arg(format!("of={}", m.join("small.log").display()))
        .args(["conv=notrunc", "oflag=seek_bytes", "status=none"])
        .arg(format!("seek={size}"))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    dd.stdin
        .take()
        .context("dd stdin")?
        .write_all(b"line four\n")?;
    let out = dd.wait_with_output()?;
    ensure!(
        out.status.success(),
        "a write-only write at the end of small.log failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure_same_bytes(
        "small.log after a write at its end",
        &bucket.get("small.log")?,
        b"line one\nline two\nline three\nline four\n",
    )?;

    // `cat >> raced.log` writes a line, another client replaces the object, cat closes: its
    // close fails (cat exits non-zero) and the other client's object stays. (Should cat's
    // write come after the PUT, the read-back of the old bytes fails instead: same outcome.)
    let mut cat = Command::new("sh")
        .arg("-c")
        .arg("cat >> \"$1\"")
        .arg("sh")
        .arg(m.join("raced.log"))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut stdin = cat.stdin.take().context("cat stdin")?;
    stdin.write_all(b"appended\n")?;
    stdin.flush()?;
    std::thread::sleep(std::time::Duration::from_millis(300));
    bucket.put("raced.log", b"another client's version\n".to_vec())?;
    drop(stdin);
    let out = cat.wait_with_output()?;
    ensure!(
        !out.status.success(),
        "an append to a replaced object was reported as saved"
    );
    ensure_same_bytes(
        "raced.log keeps the other client's version",
        &bucket.get("raced.log")?,
        b"another client's version\n",
    )?;
    m.finish()
}
