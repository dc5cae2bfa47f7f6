//! The node block cache through real mounts: blocks come from disk on the second read, across
//! restarts and kill -9, with the store down; changed objects, corrupt blocks, the quota and a
//! full cache disk are handled. Object GETs are counted by a proxy in front of SeaweedFS.

use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::proxy::CountingProxy;
use crate::seaweed::Seaweed;
use crate::shared_server;
use crate::util::{ensure_same_bytes, random_bytes, read_file};

const MIB: usize = 1 << 20;
/// Cache size the tests use unless they say otherwise.
const CACHE_MIB: usize = 64;

/// Overwrites `bytes` with `fill` at `offset` within every slot of the cache data file that
/// holds data, in place (the file is sparse and never read whole).
fn corrupt_slots(cache_dir: &Path, offset: usize, len: usize, fill: u8) -> Result<usize> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(cache_dir.join("data"))?;
    let slots = file.metadata()?.len() as usize / MIB;
    let mut corrupted = 0;
    let mut probe = vec![0u8; MIB];
    for slot in 0..slots {
        let at = (slot * MIB) as u64;
        file.read_exact_at(&mut probe, at)?;
        if probe.iter().any(|&b| b != 0) {
            file.write_all_at(&vec![fill; len], at + offset as u64)?;
            corrupted += 1;
        }
    }
    ensure!(corrupted > 0, "no cached block found to corrupt");
    Ok(corrupted)
}

/// Registers a test once per cache I/O engine: `NAME::io_uring` and `NAME::threads`, so both
/// engines pass the same suite.
macro_rules! on_both_engines {
    ($($test:ident),* $(,)?) => {$(
        pub mod $test {
            pub fn io_uring() -> anyhow::Result<()> {
                super::$test("io-uring")
            }
            pub fn threads() -> anyhow::Result<()> {
                super::$test("threads")
            }
        }
    )*};
}

on_both_engines!(
    second_read_served_locally,
    survives_kill_9,
    store_down_still_readable,
    changed_object_gives_new_bytes,
    corrupt_block_is_refetched,
    quota_is_respected,
    full_cache_disk_is_bypassed,
    random_reads_from_the_disk_tier,
);

fn cache_flags(dir: &Path, engine: &str, extra: &[&str]) -> MountOpts {
    let mut flags = vec![
        "--cache-dir".to_string(),
        dir.display().to_string(),
        "--cache-io".to_string(),
        engine.to_string(),
    ];
    flags.extend(extra.iter().map(|s| s.to_string()));
    if !extra.contains(&"--cache-size") {
        // Small, so that a test can scan the data file.
        flags.extend(["--cache-size".to_string(), format!("{CACHE_MIB}MiB")]);
    }
    MountOpts {
        extra: flags,
        ..MountOpts::default()
    }
}

/// Mounts `bucket` through the counting proxy with a block cache in `dir`.
fn mount_via(
    proxy: &CountingProxy,
    bucket: &str,
    dir: &Path,
    engine: &str,
    extra: &[&str],
) -> Result<Mount> {
    Mount::s3_endpoint(
        &proxy.endpoint(),
        bucket,
        None,
        cache_flags(dir, engine, extra),
    )
}

/// Fails if the proxy saw object GETs since it counted `before`.
fn no_new_gets(proxy: &CountingProxy, before: u64, what: &str) -> Result<()> {
    let now = proxy.gets();
    ensure!(now == before, "{what} made {} GETs", now - before);
    Ok(())
}

/// Drops the kernel's page cache so that reads reach berth again.
fn drop_page_cache() -> Result<()> {
    std::fs::write("/proc/sys/vm/drop_caches", "3").context("dropping the page cache")
}

/// Background disk writes finish within milliseconds; give them a moment before a crash.
fn let_writes_land() {
    std::thread::sleep(Duration::from_millis(500));
}

pub fn second_read_served_locally(engine: &str) -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket(&format!("cache-{}", engine.replace('-', "")))?;
    let data = random_bytes(0xcace, 16 * MIB + 12345);
    bucket.put("obj.bin", data.clone())?;
    let proxy = CountingProxy::start(&server.endpoint())?;
    let cache = tempfile::tempdir()?;

    let m = mount_via(&proxy, &bucket.name, cache.path(), engine, &[])?;
    ensure_same_bytes("first read", &read_file(m.join("obj.bin"))?, &data)?;
    let cold = proxy.gets();
    ensure!(cold > 0, "the first read must GET from the store");
    drop_page_cache()?;
    ensure_same_bytes("second read", &read_file(m.join("obj.bin"))?, &data)?;
    no_new_gets(&proxy, cold, "second read")?;
    let_writes_land();
    m.finish()?;

    // A new process on the same cache dir: served from disk, no GET.
    let m = mount_via(&proxy, &bucket.name, cache.path(), engine, &[])?;
    ensure_same_bytes("read after restart", &read_file(m.join("obj.bin"))?, &data)?;
    no_new_gets(&proxy, cold, "read after restart")?;
    m.finish()
}

pub fn survives_kill_9(engine: &str) -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket(&format!("cache-kill-{}", engine.replace('-', "")))?;
    let data = random_bytes(0x9, 8 * MIB);
    bucket.put("k.bin", data.clone())?;
    let proxy = CountingProxy::start(&server.endpoint())?;
    let cache = tempfile::tempdir()?;
    let m = mount_via(&proxy, &bucket.name, cache.path(), engine, &[])?;
    ensure_same_bytes("first read", &read_file(m.join("k.bin"))?, &data)?;
    let cold = proxy.gets();
    let_writes_land();
    m.kill9()?;

    let m = mount_via(&proxy, &bucket.name, cache.path(), engine, &[])?;
    ensure_same_bytes("read after kill -9", &read_file(m.join("k.bin"))?, &data)?;
    no_new_gets(&proxy, cold, "read after kill -9")?;
    m.finish()
}

pub fn store_down_still_readable(engine: &str) -> Result<()> {
    let bin = crate::reqs::find_weed().map_err(anyhow::Error::msg)?;
    let server = Seaweed::start(&bin, &format!("cache-down-{engine}"))?;
    let bucket = server.bucket(&format!("down-{}", engine.replace('-', "")))?;
    let data = random_bytes(0xd0, 6 * MIB);
    bucket.put("d.bin", data.clone())?;
    let cache = tempfile::tempdir()?;
    let m = Mount::s3(
        &server,
        &bucket.name,
        None,
        cache_flags(
            cache.path(),
            "auto",
            &["--read-only", "--request-deadline", "2s"],
        ),
    )?;
    ensure_same_bytes("first read", &read_file(m.join("d.bin"))?, &data)?;
    let_writes_land();
    server.kill()?;
    drop_page_cache()?;
    ensure_same_bytes(
        "read with the store down",
        &read_file(m.join("d.bin"))?,
        &data,
    )?;
    let result = m.finish();
    server.shutdown();
    result
}

pub fn changed_object_gives_new_bytes(engine: &str) -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket(&format!("cache-etag-{}", engine.replace('-', "")))?;
    let old = random_bytes(1, 3 * MIB);
    let new = random_bytes(2, 3 * MIB);
    bucket.put("e.bin", old.clone())?;
    let cache = tempfile::tempdir()?;
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        cache_flags(cache.path(), engine, &["--metadata-ttl", "200ms"]),
    )?;
    ensure_same_bytes("old", &read_file(m.join("e.bin"))?, &old)?;
    bucket.put("e.bin", new.clone())?;
    std::thread::sleep(Duration::from_millis(400));
    ensure_same_bytes(
        "after the object changed",
        &read_file(m.join("e.bin"))?,
        &new,
    )?;
    m.finish()
}

pub fn corrupt_block_is_refetched(engine: &str) -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket(&format!("cache-crc-{}", engine.replace('-', "")))?;
    let data = random_bytes(3, 4 * MIB);
    bucket.put("c.bin", data.clone())?;
    let cache = tempfile::tempdir()?;
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        cache_flags(cache.path(), engine, &[]),
    )?;
    ensure_same_bytes("first read", &read_file(m.join("c.bin"))?, &data)?;
    let_writes_land();
    m.finish()?;
    // Scribble over the first 64 KiB of every slot that holds data.
    corrupt_slots(cache.path(), 0, 64 * 1024, 0xAB)?;
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        cache_flags(cache.path(), engine, &[]),
    )?;
    ensure_same_bytes(
        "read over corrupt blocks",
        &read_file(m.join("c.bin"))?,
        &data,
    )?;
    ensure!(
        m.log().contains("checksum"),
        "the corruption was not reported in the log"
    );
    m.finish()
}

pub fn quota_is_respected(engine: &str) -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket(&format!("cache-quota-{}", engine.replace('-', "")))?;
    let files: Vec<(String, Vec<u8>)> = (0..6)
        .map(|i| (format!("q{i}.bin"), random_bytes(100 + i, 4 * MIB)))
        .collect();
    for (k, d) in &files {
        bucket.put(k, d.clone())?;
    }
    let cache = tempfile::tempdir()?;
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        cache_flags(
            cache.path(),
            "auto",
            &["--cache-size", "8MiB", "--cache-memory", "2MiB"],
        ),
    )?;
    for _ in 0..2 {
        for (k, d) in &files {
            ensure_same_bytes(k, &read_file(m.join(k))?, d)?;
        }
        drop_page_cache()?;
    }
    let_writes_land();
    let meta = std::fs::metadata(cache.path().join("data"))?;
    use std::os::unix::fs::MetadataExt;
    let on_disk = meta.blocks() * 512;
    ensure!(
        on_disk <= 8 * MIB as u64,
        "cache data uses {on_disk} bytes, over the 8 MiB quota"
    );
    m.finish()
}

pub fn full_cache_disk_is_bypassed(engine: &str) -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket(&format!("cache-full-{}", engine.replace('-', "")))?;
    let data = random_bytes(5, 8 * MIB);
    bucket.put("f.bin", data.clone())?;
    let tiny = tempfile::tempdir()?;
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "berth-e2e-tiny"])
        .arg(tiny.path())
        .status()?;
    ensure!(status.success(), "mounting a tiny tmpfs failed");
    let result = (|| {
        let m = Mount::s3(
            server,
            &bucket.name,
            None,
            cache_flags(tiny.path(), engine, &["--cache-size", "64MiB"]),
        )?;
        ensure_same_bytes(
            "read with a full cache disk",
            &read_file(m.join("f.bin"))?,
            &data,
        )?;
        drop_page_cache()?;
        ensure_same_bytes("second read", &read_file(m.join("f.bin"))?, &data)?;
        let_writes_land();
        ensure!(
            m.log().contains("cache disk write failed"),
            "the full disk was not reported"
        );
        m.finish()
    })();
    let _ = std::process::Command::new("umount")
        .arg(tiny.path())
        .status();
    result
}

/// Runs `berth warm ARGS...` to completion, killing it after two minutes; returns its stderr.
fn berth_warm(args: &[String]) -> Result<String> {
    let scratch = tempfile::tempdir()?;
    let err_path = scratch.path().join("stderr");
    let mut child = crate::mount::berth_command(scratch.path())
        .arg("warm")
        .args(args)
        .env("RUST_LOG", "berth=info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("berth warm did not finish within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::fs::read_to_string(&err_path)?;
    ensure!(status.success(), "berth warm failed ({status}): {stderr}");
    Ok(stderr)
}

fn nested_objects(bucket: &crate::s3::Bucket) -> Result<Vec<(String, Vec<u8>)>> {
    let files: Vec<(String, Vec<u8>)> = ["ds/a.bin", "ds/sub/b.bin", "ds/sub/deeper/c.bin"]
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                k.to_string(),
                random_bytes(40 + i as u64, 3 * MIB + i * 1000),
            )
        })
        .collect();
    for (k, d) in &files {
        bucket.put(k, d.clone())?;
    }
    Ok(files)
}

/// `berth warm s3://...` fills the cache dir; a mount on it then reads without GETs.
pub fn warm_s3_source() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("warm-s3")?;
    let files = nested_objects(&bucket)?;
    let proxy = CountingProxy::start(&server.endpoint())?;
    let cache = tempfile::tempdir()?;
    let log = berth_warm(&[
        format!("s3://{}/ds", bucket.name),
        "--endpoint-url".into(),
        proxy.endpoint(),
        "--cache-dir".into(),
        cache.path().display().to_string(),
        "--cache-size".into(),
        format!("{CACHE_MIB}MiB"),
    ])?;
    ensure!(
        log.contains("3 objects"),
        "warm did not report what it found: {log}"
    );
    ensure!(log.contains("0 failed"), "warm summary missing: {log}");
    let warmed = proxy.gets();
    ensure!(warmed > 0, "warm made no GETs");
    let m = mount_via(&proxy, &bucket.name, cache.path(), "auto", &[])?;
    for (k, d) in &files {
        ensure_same_bytes(k, &read_file(m.join(k))?, d)?;
    }
    no_new_gets(&proxy, warmed, "reads after warm")?;
    m.finish()
}

/// `berth warm MOUNT/dir` reads through the mount, whose cache then serves without GETs.
pub fn warm_through_mount() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("warm-mnt")?;
    let files = nested_objects(&bucket)?;
    let proxy = CountingProxy::start(&server.endpoint())?;
    let cache = tempfile::tempdir()?;
    let m = mount_via(&proxy, &bucket.name, cache.path(), "auto", &[])?;
    let log = berth_warm(&[
        m.join("ds").display().to_string(),
        "--concurrency".into(),
        "2".into(),
    ])?;
    ensure!(
        log.contains("3 files"),
        "warm did not report what it found: {log}"
    );
    let warmed = proxy.gets();
    ensure!(warmed > 0, "warm made no GETs");
    drop_page_cache()?;
    for (k, d) in &files {
        ensure_same_bytes(k, &read_file(m.join(k))?, d)?;
    }
    no_new_gets(&proxy, warmed, "reads after warm")?;
    m.finish()
}

/// `berth status` reports a running mount, its cache counters included, and says clearly
/// when nothing is mounted.
pub fn status_reports_the_cache() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("status")?;
    let data = random_bytes(77, 2 * MIB);
    bucket.put("s.bin", data.clone())?;
    let cache = tempfile::tempdir()?;
    let m = Mount::s3(
        server,
        &bucket.name,
        None,
        cache_flags(cache.path(), "auto", &[]),
    )?;
    ensure_same_bytes("read", &read_file(m.join("s.bin"))?, &data)?;
    std::thread::sleep(crate::util::STATUS_REFRESH);
    let scratch = tempfile::tempdir()?;
    let out = crate::mount::berth_command(scratch.path())
        .args(["status", "--json", "--state-dir"])
        .arg(m.state_dir())
        .arg(m.path())
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "berth status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains(&format!("\"pid\": {}", m.pid())),
        "wrong pid in {text}"
    );
    ensure!(
        text.contains("\"misses\": 2"),
        "two 1 MiB blocks missed: {text}"
    );
    ensure!(
        text.contains(&format!("\"bytes_from_store\": {}", 2 * MIB)),
        "{text}"
    );
    let state = m.state_dir();
    m.finish()?;
    // A directory nothing is mounted on.
    let out = crate::mount::berth_command(scratch.path())
        .args(["status", "--state-dir"])
        .arg(&state)
        .arg(scratch.path())
        .output()?;
    ensure!(
        !out.status.success(),
        "status of an unmounted path must fail"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("no berth mount"),
        "unclear error: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Small random reads of cached blocks read only the chunks they need from the disk tier,
/// verify them, and never return a corrupt chunk.
pub fn random_reads_from_the_disk_tier(engine: &str) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let server = shared_server()?;
    let bucket = server.bucket(&format!("cache-rand-{}", engine.replace('-', "")))?;
    let data = random_bytes(0x5eed, 6 * MIB + 777);
    bucket.put("r.bin", data.clone())?;
    let proxy = CountingProxy::start(&server.endpoint())?;
    let cache = tempfile::tempdir()?;
    let m = mount_via(
        &proxy,
        &bucket.name,
        cache.path(),
        engine,
        &["--cache-memory", "0"],
    )?;
    ensure_same_bytes("warming read", &read_file(m.join("r.bin"))?, &data)?;
    let_writes_land();
    let cold = proxy.gets();
    drop_page_cache()?;
    let file = std::fs::File::open(m.join("r.bin"))?;
    let mut rng = crate::util::Rng::new(0xab);
    for i in 0..300 {
        let offset = rng.range(0, data.len() as u64 - 1) as usize;
        let len = (rng.range(1, 9000) as usize).min(data.len() - offset);
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset as u64)?;
        ensure_same_bytes(
            &format!("pread #{i} at {offset}"),
            &buf,
            &data[offset..offset + len],
        )?;
    }
    no_new_gets(&proxy, cold, "random reads of cached blocks")?;
    drop(file);
    m.finish()?;

    // Corrupt one 4 KiB chunk in the middle of every used slot, then read exactly there.
    corrupt_slots(cache.path(), 512 * 1024, 4096, 0x5A)?;
    let m = mount_via(
        &proxy,
        &bucket.name,
        cache.path(),
        engine,
        &["--cache-memory", "0"],
    )?;
    let file = std::fs::File::open(m.join("r.bin"))?;
    let offset = 2 * MIB + 512 * 1024 + 100;
    let mut buf = vec![0u8; 1000];
    file.read_exact_at(&mut buf, offset as u64)?;
    ensure_same_bytes(
        "pread over a corrupt chunk",
        &buf,
        &data[offset..offset + 1000],
    )?;
    ensure!(
        m.log().contains("checksum"),
        "the corrupt chunk was not reported"
    );
    drop(file);
    m.finish()
}

/// Two mounts of one bucket in one process share the cache: a block read through one is not
/// fetched again through the other. Unmounting one leaves the other serving.
pub fn two_mounts_share_blocks() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("cache-share")?;
    let data = random_bytes(0x5ade, 5 * MIB + 3);
    bucket.put("shared.bin", data.clone())?;
    let proxy = CountingProxy::start(&server.endpoint())?;
    let cache = tempfile::tempdir()?;
    let second = tempfile::tempdir()?;
    let second_mnt = second.path().canonicalize()?;
    let source = format!("s3://{}", bucket.name);
    let also = [
        "--also",
        source.as_str(),
        second_mnt.to_str().context("utf-8 path")?,
    ];
    let m = mount_via(&proxy, &bucket.name, cache.path(), "auto", &also)?;
    ensure!(
        crate::util::is_mounted(&second_mnt),
        "the --also mount is not there"
    );
    ensure_same_bytes(
        "read through the first mount",
        &read_file(m.join("shared.bin"))?,
        &data,
    )?;
    let once = proxy.gets();
    ensure!(once > 0, "the first read must GET from the store");
    ensure_same_bytes(
        "read through the second mount",
        &read_file(second_mnt.join("shared.bin"))?,
        &data,
    )?;
    no_new_gets(&proxy, once, "the second mount's read")?;
    let status = std::process::Command::new("umount")
        .arg(&second_mnt)
        .status()?;
    ensure!(status.success(), "umount of the second mount failed");
    ensure_same_bytes(
        "first mount after the second left",
        &read_file(m.join("shared.bin"))?,
        &data,
    )?;
    m.finish()
}

/// `berth warm s3://... --cache-socket` fills a daemon's node cache: a volume the daemon mounts
/// afterwards reads the warmed objects without one block GET (only the one-byte read proofs
/// of its own credentials).
pub fn warm_into_the_node_cache() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("warm-node")?;
    let files = nested_objects(&bucket)?;
    let proxy = CountingProxy::start(&server.endpoint())?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().canonicalize()?;
    let result = warm_node_flow(&dir, &bucket.name, &proxy, &files);
    berth::sys::mounts::unmount_below(&dir);
    result
}

fn warm_node_flow(
    dir: &Path,
    bucket: &str,
    proxy: &CountingProxy,
    files: &[(String, Vec<u8>)],
) -> Result<()> {
    use berth::api::pb;
    let daemon = super::daemon::Daemon::start(dir, &["--cache-size", &format!("{CACHE_MIB}MiB")])?;
    let log = berth_warm(&[
        format!("s3://{bucket}/ds"),
        "--endpoint-url".into(),
        proxy.endpoint(),
        "--cache-socket".into(),
        dir.join("state/cache.sock").display().to_string(),
    ])?;
    ensure!(
        log.contains("3 objects") && log.contains("0 failed"),
        "warm: {log}"
    );
    let warmed = proxy.gets();
    ensure!(warmed > 0, "warm made no GETs");

    let target = dir.join("pods/a");
    let mut c = daemon.client()?;
    let secrets = [
        ("accessKeyId", crate::seaweed::ACCESS_KEY),
        ("secretAccessKey", crate::seaweed::SECRET_KEY),
    ];
    crate::util::rt().block_on(
        c.mount_volume(pb::MountVolumeRequest {
            source: format!("s3://{bucket}"),
            target_path: target.display().to_string(),
            volume_id: bucket.to_string(),
            options: [("endpoint-url".to_string(), proxy.endpoint())].into(),
            secrets: secrets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }),
    )?;
    let proofs = proxy.proofs();
    for (k, d) in files {
        ensure_same_bytes(k, &read_file(target.join(k))?, d)?;
    }
    no_new_gets(proxy, warmed, "reads after warming the node cache")?;
    // The volume did not fetch what warm cached: its own credentials were asked, with a
    // one-byte GET per object, before it was served the blocks.
    ensure!(
        proxy.proofs() > proofs,
        "the volume was served warmed blocks without proving it may read them"
    );
    crate::util::rt().block_on(c.unmount_volume(pb::UnmountVolumeRequest {
        target_path: target.display().to_string(),
    }))?;
    Ok(())
}

/// Audit finding H1: the node cache serves a block to a volume only once that volume's own
/// credentials were accepted for the object. Two volumes of one bucket through one daemon (one
/// node cache): `a` may read; `b`'s identity may list the bucket but read no object (SeaweedFS
/// action `List` only). After `ls`, `b` sees the file `a` cached, with its size, but reading it
/// fails with EACCES: not one byte comes back, and `b`'s cache serves it no block.
pub fn list_only_volume_reads_no_cached_block() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("list-only")?;
    let data = random_bytes(0x1157, 3 * MIB + 5);
    bucket.put("private.bin", data.clone())?;
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().canonicalize()?;
    let result = list_only_flow(&dir, &server.endpoint(), &bucket.name, &data);
    berth::sys::mounts::unmount_below(&dir);
    result
}

fn list_only_flow(dir: &Path, endpoint: &str, bucket: &str, data: &[u8]) -> Result<()> {
    use super::daemon::{cache_of, status_of, Daemon};
    use crate::seaweed::{ACCESS_KEY, LIST_ONLY_ACCESS_KEY, LIST_ONLY_SECRET_KEY, SECRET_KEY};
    use crate::util::rt;
    use berth::api::pb;
    use std::io::Read as _;
    use std::os::unix::fs::FileExt as _;
    use std::time::{Instant, SystemTime, UNIX_EPOCH};

    let daemon = Daemon::start(dir, &["--cache-size", &format!("{CACHE_MIB}MiB")])?;
    let mut c = daemon.client()?;
    let mount = |target: &Path, (key, secret): (&str, &str)| pb::MountVolumeRequest {
        source: format!("s3://{bucket}"),
        target_path: target.display().to_string(),
        volume_id: target.display().to_string(),
        // Read-only: metadata (and read proofs) are trusted for the life of the mount.
        options: [
            ("endpoint-url".to_string(), endpoint.to_string()),
            ("read-only".to_string(), "true".to_string()),
        ]
        .into(),
        secrets: [
            ("accessKeyId".to_string(), key.to_string()),
            ("secretAccessKey".to_string(), secret.to_string()),
        ]
        .into(),
        ..Default::default()
    };
    let (a, b) = (dir.join("pods/a"), dir.join("pods/b"));
    rt().block_on(c.mount_volume(mount(&a, (ACCESS_KEY, SECRET_KEY))))?;
    rt().block_on(c.mount_volume(mount(&b, (LIST_ONLY_ACCESS_KEY, LIST_ONLY_SECRET_KEY))))?;
    let volume_at = |target: &Path| -> Result<pb::VolumeInfo> {
        daemon
            .volumes()?
            .into_iter()
            .find(|v| v.targets == [target.display().to_string()])
            .with_context(|| format!("no volume at {}", target.display()))
    };
    ensure!(
        volume_at(&a)?.pid != volume_at(&b)?.pid,
        "two volumes, two mount processes"
    );

    // a reads the file: the node cache holds its blocks.
    ensure_same_bytes("a's read", &read_file(a.join("private.bin"))?, data)?;
    let blocks = data.len().div_ceil(MIB) as u64;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = rt()
            .block_on(c.clone().stats(pb::StatsRequest {}))?
            .into_inner();
        if stats.cache_blocks >= blocks {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "a's blocks never reached the node cache: {stats:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // b lists the bucket and learns the key, the size (and the ETag) from LIST alone.
    let names: Vec<String> = std::fs::read_dir(&b)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<std::io::Result<_>>()?;
    ensure!(names == ["private.bin"], "b lists {names:?}");
    let size = std::fs::metadata(b.join("private.bin"))?.len();
    ensure!(size == data.len() as u64, "b sees size {size}");

    // ... but reading it is refused, from the start and in the middle, and nothing comes back.
    let mut file = std::fs::File::open(b.join("private.bin"))?;
    let mut buf = vec![0x5au8; 256 * 1024];
    let first = file.read(&mut buf);
    ensure!(
        first.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES),
        "b's read from the start: {:?} (want EACCES)",
        first.map(|n| format!("{n} bytes"))
    );
    let middle = file.read_at(&mut buf[..4096], 2 * MIB as u64 + 100);
    ensure!(
        middle.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES),
        "b's read in the middle: {:?} (want EACCES)",
        middle.map(|n| format!("{n} bytes"))
    );
    ensure!(buf.iter().all(|&x| x == 0x5a), "bytes reached b's buffer");
    drop(file);
    let whole = std::fs::read(b.join("private.bin"));
    ensure!(
        whole.as_ref().err().and_then(|e| e.raw_os_error()) == Some(libc::EACCES),
        "b read {:?} bytes (want EACCES)",
        whole.map(|d| d.len())
    );
    let refused_at = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();

    // b's own counters, published after the refusals: no block served from either tier.
    let deadline = Instant::now() + Duration::from_secs(20);
    let b_status = loop {
        let status = status_of(&volume_at(&b)?);
        if status.as_ref().is_some_and(|s| s.updated_unix > refused_at) {
            break status.context("no status")?;
        }
        ensure!(
            Instant::now() < deadline,
            "b's status was not refreshed: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let b_cache = b_status.cache.context("volume b reports no cache")?;
    ensure!(
        b_cache.memory_hits == 0
            && b_cache.disk_hits == 0
            && b_cache.bytes_from_memory == 0
            && b_cache.bytes_from_disk == 0
            && b_cache.bytes_from_store == 0,
        "b was served cached blocks: {b_cache:?}"
    );
    let logs = daemon.logs();
    ensure!(
        logs.contains("may not read the object") && logs.contains("private.bin"),
        "the refusal was not logged with its key"
    );
    for secret in [SECRET_KEY, LIST_ONLY_SECRET_KEY] {
        ensure!(!logs.contains(secret), "a secret reached the log");
    }

    // a is unaffected.
    ensure_same_bytes("a's second read", &read_file(a.join("private.bin"))?, data)?;
    let a_cache = cache_of(&volume_at(&a)?).context("volume a reports no cache")?;
    ensure!(a_cache.bytes_from_store > 0, "{a_cache:?}");
    for target in [&a, &b] {
        rt().block_on(c.unmount_volume(pb::UnmountVolumeRequest {
            target_path: target.display().to_string(),
        }))?;
    }
    Ok(())
}

/// Everything berth keeps on the node is its own (hardening item 9): under a umask of 0,
/// after a read, a write and a mkdir, every directory of the state and
/// cache dirs is 0700 and every file and socket in them is 0600 or stricter.
pub fn state_and_cache_are_private() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("private-state")?;
    let data = random_bytes(0x700, 3 * MIB);
    bucket.put("obj.bin", data.clone())?;
    let cache = tempfile::tempdir()?;
    let cache_dir = cache.path().join("cache");
    let mut opts = cache_flags(&cache_dir, "threads", &[]);
    opts.umask = Some(0);
    let m = Mount::s3(server, &bucket.name, None, opts)?;
    ensure_same_bytes("read", &read_file(m.join("obj.bin"))?, &data)?;
    std::fs::write(m.join("new.txt"), b"written")?;
    ensure!(
        bucket.get("new.txt")? == b"written",
        "the write is not in S3"
    );
    std::fs::create_dir(m.join("dir"))?;
    let_writes_land();
    let mut open = Vec::new();
    for root in [m.state_dir(), cache_dir.clone()] {
        open.extend(not_private(&root)?);
    }
    ensure!(open.is_empty(), "readable or writable by others: {open:?}");
    m.finish()
}

/// Entries under `root` (itself included) that group or others may use: directories not
/// 0700, anything else with a group or other bit.
fn not_private(root: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::PermissionsExt as _;
    let mut out = Vec::new();
    let mut todo = vec![root.to_path_buf()];
    let mut seen = 0;
    while let Some(path) = todo.pop() {
        let meta =
            std::fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
        let mode = meta.permissions().mode() & 0o7777;
        seen += 1;
        if meta.is_dir() {
            if mode != 0o700 {
                out.push(format!("{} {mode:o}", path.display()));
            }
            for entry in std::fs::read_dir(&path)? {
                todo.push(entry?.path());
            }
        } else if mode & 0o077 != 0 {
            out.push(format!("{} {mode:o}", path.display()));
        }
    }
    ensure!(seen > 1, "{} holds nothing to check", root.display());
    Ok(out)
}
