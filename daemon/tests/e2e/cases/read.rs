//! Reading a large object sequentially and at random offsets.

use std::io::Read;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use anyhow::{ensure, Context, Result};

use crate::mount::{Mount, MountOpts};
use crate::shared_server;
use crate::util::{ensure_same_bytes, random_bytes, stat, Rng};

const SIZE: usize = 64 << 20;
const MAX_READ: u64 = 3 << 20;
const RANDOM_READS: usize = 200;

pub fn large_object() -> Result<()> {
    let server = shared_server()?;
    let bucket = server.bucket("large")?;
    let data = random_bytes(0x1a26e, SIZE);
    bucket.put("large.bin", data.clone())?;
    ensure_same_bytes("GetObject of the source", &bucket.get("large.bin")?, &data)?;

    let m = Mount::s3(server, &bucket.name, None, MountOpts::default())?;
    let path = m.join("large.bin");
    ensure!(
        stat(&path)?.len() == SIZE as u64,
        "size of large.bin through the mount"
    );

    // Full sequential read in 1 MiB requests.
    let start = Instant::now();
    let mut file = std::fs::File::open(&path)?;
    let mut got = Vec::with_capacity(SIZE);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).context("sequential read")?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    eprintln!(
        "e2e: large_object: sequential read of {} MiB took {:.1?}",
        SIZE >> 20,
        start.elapsed()
    );
    ensure_same_bytes("sequential read", &got, &data)?;
    drop(got);
    drop(file); // shadowing below would keep it open and the unmount busy

    // Random preads on a fresh handle.
    let file = std::fs::File::open(&path)?;
    let mut rng = Rng::new(0xbe27);
    let start = Instant::now();
    for i in 0..RANDOM_READS {
        let offset = rng.range(0, SIZE as u64 - 1);
        let len = rng.range(1, MAX_READ).min(SIZE as u64 - offset) as usize;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)
            .with_context(|| format!("pread #{i}: {len} bytes at {offset}"))?;
        let want = &data[offset as usize..offset as usize + len];
        ensure_same_bytes(&format!("pread #{i}: {len} bytes at {offset}"), &buf, want)?;
    }
    eprintln!(
        "e2e: large_object: {RANDOM_READS} random preads took {:.1?}",
        start.elapsed()
    );
    let mut buf = [0u8; 16];
    ensure!(
        file.read_at(&mut buf, SIZE as u64)? == 0,
        "pread at EOF must return 0 bytes"
    );
    drop(file);
    m.finish()
}
