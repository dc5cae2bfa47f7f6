//! unlink, mkdir, rmdir.

use std::fs::File;

use anyhow::{ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::shared_server;
use crate::util::{close_checked, expect_errno, stat};

fn names(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        out.push(e?.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

pub fn unlink_mkdir_rmdir() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("namespace")?;
    bucket.put("gone.txt", b"to be deleted".to_vec())?;
    bucket.put("keep.txt", b"stays".to_vec())?;
    bucket.put("full/x.txt", b"keeps full/ non-empty".to_vec())?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;

    // unlink
    std::fs::remove_file(m.join("gone.txt")).context("unlink gone.txt")?;
    ensure!(
        !bucket.exists("gone.txt")?,
        "gone.txt still in the bucket after unlink"
    );
    ensure!(
        bucket.exists("keep.txt")?,
        "unlink removed the wrong object"
    );
    expect_errno(
        "stat after unlink",
        std::fs::metadata(m.join("gone.txt")),
        libc::ENOENT,
    )?;
    ensure!(
        !names(m.path())?.contains(&"gone.txt".to_owned()),
        "readdir still lists gone.txt"
    );

    // mkdir creates a marker
    std::fs::create_dir(m.join("newdir")).context("mkdir newdir")?;
    ensure!(
        bucket.exists("newdir/")?,
        "mkdir did not create the marker `newdir/`"
    );
    ensure!(
        stat(m.join("newdir"))?.is_dir(),
        "newdir is not a directory"
    );
    ensure!(
        names(m.path())?.contains(&"newdir".to_owned()),
        "readdir does not list newdir"
    );
    ensure!(
        names(&m.join("newdir"))?.is_empty(),
        "new directory is not empty"
    );

    // rmdir of an empty dir removes the marker
    std::fs::remove_dir(m.join("newdir")).context("rmdir newdir")?;
    ensure!(
        !bucket.exists("newdir/")?,
        "rmdir left the marker `newdir/`"
    );
    expect_errno(
        "stat after rmdir",
        std::fs::metadata(m.join("newdir")),
        libc::ENOENT,
    )?;

    // rmdir of a non-empty dir fails and keeps everything
    expect_errno(
        "rmdir full",
        std::fs::remove_dir(m.join("full")),
        libc::ENOTEMPTY,
    )?;
    ensure!(
        bucket.exists("full/x.txt")?,
        "failed rmdir removed full/x.txt"
    );

    // ... also when the content was created through the mount
    std::fs::create_dir(m.join("made")).context("mkdir made")?;
    close_checked(File::create(m.join("made/f.txt"))?).context("close made/f.txt")?;
    ensure!(bucket.exists("made/f.txt")?, "made/f.txt not in the bucket");
    expect_errno(
        "rmdir made",
        std::fs::remove_dir(m.join("made")),
        libc::ENOTEMPTY,
    )?;
    m.finish()
}
