//! A local directory as the store.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;

use anyhow::{ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::util::{close_checked, ensure_same_bytes, expect_errno, random_bytes, read_file};

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
