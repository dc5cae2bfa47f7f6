//! readdir and stat against what the bucket lists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::s3::Bucket;
use crate::shared_server;
use crate::util::{ensure_same_bytes, expect_errno, random_bytes, read_file, stat};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    File,
    Dir,
}

/// The children of directory `dir` ("" for the root, else ending in '/') that
/// a mount of the bucket should show, derived from the bucket's keys: implicit
/// directories from '/', `x/` markers as directories, and a directory wins
/// over a file of the same name.
fn expected_children(keys: &[String], dir: &str) -> BTreeMap<String, Kind> {
    let mut out = BTreeMap::new();
    for key in keys {
        let Some(rest) = key.strip_prefix(dir) else {
            continue;
        };
        match rest.split_once('/') {
            None if rest.is_empty() => {} // the marker of `dir` itself
            None => {
                out.entry(rest.to_owned()).or_insert(Kind::File);
            }
            Some((name, _)) => {
                out.insert(name.to_owned(), Kind::Dir);
            }
        }
    }
    out
}

/// What readdir shows, with each entry's type (checked against lstat too).
fn mount_children(dir: &Path) -> Result<BTreeMap<String, Kind>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read_dir {}", dir.display()))? {
        let entry = entry.with_context(|| format!("read_dir {} entry", dir.display()))?;
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| anyhow::anyhow!("non-UTF-8 name {n:?}"))?;
        let ft = entry.file_type()?;
        let kind = kind_of(&ft).with_context(|| format!("{name}: readdir type"))?;
        let meta = std::fs::symlink_metadata(entry.path())
            .with_context(|| format!("lstat {}", entry.path().display()))?;
        let stat_kind =
            kind_of(&meta.file_type()).with_context(|| format!("{name}: lstat type"))?;
        ensure!(
            kind == stat_kind,
            "{name}: readdir says {kind:?} but lstat says {stat_kind:?}"
        );
        if out.insert(name.clone(), kind).is_some() {
            bail!("readdir of {} lists {name:?} twice", dir.display());
        }
    }
    Ok(out)
}

fn kind_of(ft: &std::fs::FileType) -> Result<Kind> {
    if ft.is_file() {
        Ok(Kind::File)
    } else if ft.is_dir() {
        Ok(Kind::Dir)
    } else {
        bail!("neither file nor directory: {ft:?}")
    }
}

fn check_dir(m: &Mount, keys: &[String], dir: &str) -> Result<()> {
    let want = expected_children(keys, dir);
    let got = mount_children(&m.join(dir.trim_end_matches('/')))?;
    ensure!(
        got == want,
        "readdir of {dir:?}:\n  got  {got:?}\n  want {want:?}"
    );
    Ok(())
}

fn put_all(bucket: &Bucket, objects: &[(&str, &[u8])]) -> Result<Vec<String>> {
    for (key, body) in objects {
        bucket.put(key, body.to_vec())?;
    }
    bucket.list("")
}

pub fn readdir_matches_bucket() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("readdir")?;
    let keys = put_all(
        &bucket,
        &[
            ("a/b/c.txt", b"c in b in a"),
            ("a/top.txt", b"top"),
            ("dir/", b""),
            ("dir2/", b""),
            ("dir2/inside.txt", b"inside"),
            ("root.txt", b"root file"),
            ("same", b"I am a file shadowed by a dir"),
            ("same/child.txt", b"child"),
            ("deep/x/y/z/leaf.bin", b"leaf"),
        ],
    )?;
    // Sanity check of the model itself against a hand-written expectation.
    let root = expected_children(&keys, "");
    let want_root: BTreeMap<String, Kind> = [
        ("a", Kind::Dir),
        ("deep", Kind::Dir),
        ("dir", Kind::Dir),
        ("dir2", Kind::Dir),
        ("root.txt", Kind::File),
        ("same", Kind::Dir),
    ]
    .into_iter()
    .map(|(n, k)| (n.to_owned(), k))
    .collect();
    ensure!(
        root == want_root,
        "bucket holds unexpected keys {keys:?} (model {root:?})"
    );

    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    for dir in [
        "",
        "a/",
        "a/b/",
        "dir/",
        "dir2/",
        "same/",
        "deep/",
        "deep/x/",
        "deep/x/y/",
        "deep/x/y/z/",
    ] {
        check_dir(&m, &keys, dir)?;
    }
    ensure!(
        std::fs::read_dir(m.join("dir"))?.next().is_none(),
        "marker-only dir/ must be empty"
    );
    ensure_same_bytes(
        "a/b/c.txt",
        &read_file(m.join("a/b/c.txt"))?,
        &bucket.get("a/b/c.txt")?,
    )?;
    ensure_same_bytes(
        "same/child.txt",
        &read_file(m.join("same/child.txt"))?,
        &bucket.get("same/child.txt")?,
    )?;
    ensure!(
        stat(m.join("same"))?.is_dir(),
        "`same` is both a key and a prefix: the directory must win"
    );
    expect_errno(
        "lstat of a missing name",
        std::fs::symlink_metadata(m.join("no-such-entry")),
        libc::ENOENT,
    )?;
    m.finish()
}

pub fn prefix_mount() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("prefix")?;
    let keys = put_all(
        &bucket,
        &[
            ("pre/one.txt", b"one"),
            ("pre/sub/two.txt", b"two"),
            ("prelude.txt", b"not under pre/"),
            ("pre-sibling/x", b"not under pre/"),
            ("other.txt", b"other"),
        ],
    )?;
    let m = Mount::s3(server, &bucket.name, Some("pre"), MountOpts::default())?;
    let want = expected_children(&keys, "pre/");
    let got = mount_children(m.path())?;
    ensure!(
        got == want,
        "root of s3://{}/pre:\n  got  {got:?}\n  want {want:?}",
        bucket.name
    );
    ensure!(
        mount_children(&m.join("sub"))? == expected_children(&keys, "pre/sub/"),
        "listing of sub/ under the prefix"
    );
    ensure_same_bytes(
        "one.txt",
        &read_file(m.join("one.txt"))?,
        &bucket.get("pre/one.txt")?,
    )?;
    m.finish()
}

pub fn big_prefix_100k() -> Result<()> {
    const N: usize = 100_000;
    let server = shared_server()?;
    let bucket = server.bucket("big")?;
    let names: Vec<String> = (0..N).map(|i| format!("f{i:06}")).collect();
    let keys: Vec<String> = names.iter().map(|n| format!("big/{n}")).collect();
    let start = Instant::now();
    bucket.put_many(keys, b"x", 64)?;
    eprintln!(
        "e2e: big_prefix_100k: {N} PUTs took {:.1?}",
        start.elapsed()
    );
    let listed = bucket.list("big/")?;
    ensure!(
        listed.len() == N,
        "bucket lists {} keys under big/, want {N}",
        listed.len()
    );

    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    let start = Instant::now();
    let mut got = Vec::with_capacity(N);
    for entry in std::fs::read_dir(m.join("big"))? {
        let entry = entry.context("read_dir big")?;
        got.push(entry.file_name().to_string_lossy().into_owned());
    }
    eprintln!(
        "e2e: big_prefix_100k: readdir of {} entries took {:.1?}",
        got.len(),
        start.elapsed()
    );
    ensure!(
        got.len() == N,
        "readdir of big returned {} entries, want {N}",
        got.len()
    );
    let got: BTreeSet<String> = got.into_iter().collect();
    ensure!(
        got.len() == N,
        "readdir of big returned duplicates ({} distinct)",
        got.len()
    );
    let want: BTreeSet<String> = names.into_iter().collect();
    if got != want {
        let missing: Vec<_> = want.difference(&got).take(5).collect();
        let extra: Vec<_> = got.difference(&want).take(5).collect();
        bail!("readdir of big: missing e.g. {missing:?}, unexpected e.g. {extra:?}");
    }
    m.finish()
}

pub fn stat_matches_head() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("stat")?;
    let files: [(&str, usize); 4] = [
        ("s.txt", 1234),
        ("empty.txt", 0),
        ("d/inner.bin", 70_000),
        ("d/e/deeper.bin", 1 << 20),
    ];
    for (i, (key, len)) in files.iter().enumerate() {
        bucket.put(key, random_bytes(100 + i as u64, *len))?;
    }
    bucket.put("m/", Vec::new())?;

    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    ensure!(stat(m.path())?.is_dir(), "mount root is not a directory");
    for (key, _) in files {
        let head = bucket
            .head(key)?
            .with_context(|| format!("{key} missing in bucket"))?;
        let meta = stat(m.join(key))?;
        ensure!(meta.is_file(), "{key}: not a regular file");
        ensure!(
            meta.len() == head.size,
            "{key}: size {} but HeadObject says {}",
            meta.len(),
            head.size
        );
        let mtime = meta.modified()?;
        let skew = abs_diff(mtime, head.last_modified);
        ensure!(
            skew <= Duration::from_secs(2),
            "{key}: mtime {mtime:?} is {skew:?} away from LastModified {:?}",
            head.last_modified
        );
    }
    for dir in ["d", "d/e", "m"] {
        let meta = stat(m.join(dir))?;
        ensure!(meta.is_dir(), "{dir}: not a directory");
    }
    expect_errno(
        "stat missing",
        std::fs::metadata(m.join("d/nope")),
        libc::ENOENT,
    )?;
    m.finish()
}

fn abs_diff(a: SystemTime, b: SystemTime) -> Duration {
    a.duration_since(b)
        .or_else(|_| b.duration_since(a))
        .unwrap_or_default()
}
