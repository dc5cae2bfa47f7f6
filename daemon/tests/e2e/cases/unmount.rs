//! Ending a mount from outside: SIGTERM, or a plain `umount`.

use std::process::Command;

use anyhow::{ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::shared_server;
use crate::util::ensure_same_bytes;
use crate::util::read_file;

fn mounted_with_file(tag: &str) -> Result<Mount> {
    let server = shared_server()?;
    let bucket = server.bucket(tag)?;
    bucket.put("x.txt", b"x".to_vec())?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    ensure_same_bytes("x.txt", &read_file(m.join("x.txt"))?, b"x")?;
    Ok(m)
}

pub fn sigterm() -> Result<()> {
    let m = mounted_with_file("sigterm")?;
    m.signal(libc::SIGTERM)?;
    m.expect_clean_exit().context("after SIGTERM")
}

pub fn umount_command() -> Result<()> {
    let m = mounted_with_file("umount")?;
    let out = Command::new("umount")
        .arg(m.path())
        .output()
        .context("running umount")?;
    ensure!(
        out.status.success(),
        "umount failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    m.expect_clean_exit().context("after umount")
}
