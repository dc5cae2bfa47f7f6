//! Sequential read throughput through the mount against direct SDK reads of the same object,
//! measured in one run on one server so the result is a ratio, not an absolute number.
//!
//! `cargo test --release -p berth --test e2e -- --bench` runs it on a large object (1 GiB, or
//! `BERTH_BENCH_MIB`) and prints the figures. In an ordinary test run it reads a small object
//! once and checks the bytes, with no timing asserted.

use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::shared_server;
use crate::util::{ensure_same_bytes, random_bytes};

const RUNS: usize = 3;
const PART: usize = 8 << 20;

fn mib_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / took.as_secs_f64()
}

/// Best of `RUNS` timings (the least disturbed by other load on a shared machine).
fn best(mut f: impl FnMut() -> Result<usize>) -> Result<(usize, Duration)> {
    let mut fastest = Duration::MAX;
    let mut bytes = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        bytes = f()?;
        fastest = fastest.min(start.elapsed());
    }
    Ok((bytes, fastest))
}

/// Returns the time of the best read through the mount, in nanoseconds (bench mode only).
pub fn seq_read_vs_sdk(test_mode: bool) -> Result<Option<u64>> {
    let mib: usize = if test_mode {
        8
    } else {
        std::env::var("BERTH_BENCH_MIB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024)
    };
    let server = shared_server()?;
    let bucket = server.bucket("bench")?;
    let data = random_bytes(0xbe4c, mib << 20);
    bucket.put("seq.bin", data.clone())?;
    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    let path = m.join("seq.bin");

    if test_mode {
        ensure_same_bytes("read through mount", &std::fs::read(&path)?, &data)?;
        return m.finish().map(|()| None);
    }
    drop(data);

    let (sdk_bytes, sdk) = best(|| Ok(bucket.get("seq.bin")?.len()))?;
    let (ranged_bytes, ranged) = best(|| bucket.get_ranged_parallel("seq.bin", PART, 8))?;
    let (mount_bytes, mount) = best(|| {
        let mut file = std::fs::File::open(&path)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        loop {
            let n = file.read(&mut buf).context("read through mount")?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    })?;
    ensure!(
        sdk_bytes == mib << 20 && ranged_bytes == sdk_bytes && mount_bytes == sdk_bytes,
        "short read: sdk {sdk_bytes}, ranged {ranged_bytes}, mount {mount_bytes}"
    );
    let (m_rate, s_rate, r_rate) = (
        mib_per_s(mount_bytes, mount),
        mib_per_s(sdk_bytes, sdk),
        mib_per_s(ranged_bytes, ranged),
    );
    eprintln!("bench: sequential read of a {mib} MiB object, best of {RUNS}:");
    eprintln!("bench:   berth mount (1 MiB reads)            {m_rate:8.1} MiB/s");
    eprintln!(
        "bench:   SDK GetObject, one stream            {s_rate:8.1} MiB/s   mount/sdk    = {:.2}",
        m_rate / s_rate
    );
    eprintln!(
        "bench:   SDK 8 x 8 MiB ranged GETs in flight  {r_rate:8.1} MiB/s   mount/ranged = {:.2}",
        m_rate / r_rate
    );
    m.finish()?;
    Ok(Some(mount.as_nanos() as u64))
}
