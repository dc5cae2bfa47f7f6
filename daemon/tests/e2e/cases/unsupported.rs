//! Operations object storage cannot do, each with its exact errno; and the
//! one rename that is supported.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;

use anyhow::{ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::shared_server;
use crate::util::{ensure_same_bytes, expect_errno, random_bytes, read_file};

pub fn errnos() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("unsupported")?;
    let content = b"original content".to_vec();
    bucket.put("f.txt", content.clone())?;
    bucket.put("d/inner.txt", b"inner".to_vec())?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    let f = m.join("f.txt");

    expect_errno(
        "hard link",
        std::fs::hard_link(&f, m.join("f2.txt")),
        libc::EPERM,
    )?;
    expect_errno(
        "rename of a directory",
        std::fs::rename(m.join("d"), m.join("d2")),
        libc::EOPNOTSUPP,
    )?;

    // A write that skips ahead of the end of a new file.
    let mut gap = File::create(m.join("gap.bin")).context("create gap.bin")?;
    gap.write_all(b"0123456789")
        .context("first write to gap.bin")?;
    gap.seek(SeekFrom::Start(1000))?;
    expect_errno(
        "write past the end (non-sequential)",
        gap.write(b"x"),
        libc::EINVAL,
    )?;
    drop(gap);

    let falloc = File::create(m.join("falloc.bin")).context("create falloc.bin")?;
    // SAFETY: a valid open fd; no memory is passed.
    let rc = unsafe { libc::fallocate(falloc.as_raw_fd(), 0, 0, 4096) };
    let res = if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    };
    expect_errno("fallocate", res, libc::EOPNOTSUPP)?;
    drop(falloc);

    // None of that changed the original object or created the link targets.
    ensure_same_bytes(
        "f.txt after the failed operations",
        &bucket.get("f.txt")?,
        &content,
    )?;
    for key in ["f2.txt", "d2/inner.txt"] {
        ensure!(
            !bucket.exists(key)?,
            "{key} exists after a failed operation"
        );
    }
    ensure!(
        bucket.exists("d/inner.txt")?,
        "failed directory rename lost d/inner.txt"
    );
    m.finish()
}

pub fn rename_file() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("rename")?;
    let data = random_bytes(0x7e, 100 << 10);
    bucket.put("from.txt", data.clone())?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    std::fs::rename(m.join("from.txt"), m.join("to.txt")).context("rename from.txt -> to.txt")?;
    ensure_same_bytes("GetObject to.txt", &bucket.get("to.txt")?, &data)?;
    ensure!(
        !bucket.exists("from.txt")?,
        "from.txt still exists after rename"
    );
    ensure_same_bytes(
        "to.txt through the mount",
        &read_file(m.join("to.txt"))?,
        &data,
    )?;
    expect_errno(
        "stat of the old name",
        std::fs::metadata(m.join("from.txt")),
        libc::ENOENT,
    )?;
    m.finish()
}
