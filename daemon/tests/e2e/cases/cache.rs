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
/// afterwards reads the warmed objects without one object GET.
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
    for (k, d) in files {
        ensure_same_bytes(k, &read_file(target.join(k))?, d)?;
    }
    no_new_gets(proxy, warmed, "reads after warming the node cache")?;
    crate::util::rt().block_on(c.unmount_volume(pb::UnmountVolumeRequest {
        target_path: target.display().to_string(),
    }))?;
    Ok(())
}
