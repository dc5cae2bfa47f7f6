//! Keys that cannot be a safe path component are skipped (and logged).
//!
//! Served by the fake S3 endpoint: SeaweedFS refuses or rewrites every one of
//! these keys (see `fakes3.rs`), real S3 stores them verbatim.

use anyhow::{ensure, Context, Result};

use crate::fakes3::FakeS3;
use crate::mount::{Mount, MountOpts};
use crate::util::{ensure_same_bytes, read_file, unique_name};

fn names(dir: &std::path::Path) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("read_dir {}", dir.display()))? {
        out.push(e?.file_name().to_string_lossy().into_owned());
    }
    out.sort();
    Ok(out)
}

pub fn unsafe_keys_skipped() -> Result<()> {
    let long = format!("odd/{}", "L".repeat(300));
    let bad = b"must never be visible".as_slice();
    let bucket = unique_name("oddkeys");
    let fake = FakeS3::start(
        &bucket,
        &[
            ("odd/../escape", bad),
            ("odd//double", bad),
            ("odd/./dot", bad),
            ("odd/..", bad),
            (long.as_str(), bad),
            ("odd/ok.txt", b"fine"),
            ("../outside", bad),
        ],
    )?;
    let m = Mount::s3_endpoint(&fake.endpoint(), &bucket, None, MountOpts::default())?;
    let check = || -> Result<()> {
        let root = names(m.path())?;
        ensure!(root == ["odd"], "root lists {root:?}, want only [\"odd\"]");
        let odd = names(&m.join("odd"))?;
        ensure!(
            odd == ["ok.txt"],
            "odd/ lists {odd:?}, want only [\"ok.txt\"]"
        );
        ensure_same_bytes("odd/ok.txt", &read_file(m.join("odd/ok.txt"))?, b"fine")?;

        // Nothing appeared next to the mountpoint or above it.
        let parent = m.path().parent().context("mountpoint has a parent")?;
        for name in names(parent)? {
            ensure!(
                ["berth.stderr.log", "berth.stdout.log", "mnt", "state"].contains(&name.as_str()),
                "unexpected {name:?} next to the mountpoint"
            );
        }
        for dir in [parent, parent.parent().context("parent of parent")?] {
            for name in ["escape", "outside", "double", "dot"] {
                ensure!(
                    !dir.join(name).exists(),
                    "{} appeared outside the mount",
                    dir.join(name).display()
                );
            }
        }
        ensure!(
            m.log().contains("skipped"),
            "berth's log does not mention skipped keys"
        );
        Ok(())
    };
    check().with_context(|| format!("S3 requests seen: {:?}", fake.requests()))?;
    m.finish()
}
