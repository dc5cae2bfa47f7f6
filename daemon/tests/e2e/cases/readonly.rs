//! `--read-only`: reads work, every change fails with EROFS.

use std::fs::{File, OpenOptions};

use anyhow::{ensure, Result};

use crate::mount::{Mount, MountOpts};
use crate::shared_server;
use crate::util::{ensure_same_bytes, expect_errno, random_bytes, read_file};

pub fn read_only_mount() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("readonly")?;
    let data = random_bytes(0x40, 200_000);
    bucket.put("r.txt", data.clone())?;
    bucket.put("d/x.txt", b"x".to_vec())?;
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        MountOpts::flags(&["--read-only"]),
    )?;

    ensure_same_bytes("read r.txt", &read_file(m.join("r.txt"))?, &data)?;
    ensure_same_bytes("read d/x.txt", &read_file(m.join("d/x.txt"))?, b"x")?;
    expect_errno("create", File::create(m.join("new.txt")), libc::EROFS)?;
    expect_errno("mkdir", std::fs::create_dir(m.join("nd")), libc::EROFS)?;
    expect_errno("unlink", std::fs::remove_file(m.join("r.txt")), libc::EROFS)?;
    expect_errno(
        "open for write with O_TRUNC",
        OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.join("r.txt")),
        libc::EROFS,
    )?;
    // Attribute changes and links too (chmod, chown, utimes, symlink).
    use std::os::unix::fs::PermissionsExt;
    expect_errno(
        "chmod",
        std::fs::set_permissions(m.join("r.txt"), std::fs::Permissions::from_mode(0o600)),
        libc::EROFS,
    )?;
    expect_errno(
        "chown",
        std::os::unix::fs::chown(m.join("r.txt"), Some(1), Some(1)),
        libc::EROFS,
    )?;
    expect_errno(
        "utimes",
        File::open(m.join("r.txt"))?.set_modified(std::time::SystemTime::UNIX_EPOCH),
        libc::EROFS,
    )?;
    expect_errno(
        "symlink",
        std::os::unix::fs::symlink("r.txt", m.join("link")),
        libc::EROFS,
    )?;

    ensure_same_bytes("r.txt in the bucket", &bucket.get("r.txt")?, &data)?;
    ensure!(
        bucket.metadata("r.txt")?.is_empty(),
        "r.txt got metadata on a read-only mount: {:?}",
        bucket.metadata("r.txt")?
    );
    ensure!(!bucket.exists("link")?, "a link made on a read-only mount");
    ensure!(
        !bucket.exists("new.txt")?,
        "new.txt created on a read-only mount"
    );
    ensure!(!bucket.exists("nd/")?, "nd/ created on a read-only mount");
    m.finish()
}
