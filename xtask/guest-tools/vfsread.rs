//! vfsread: the guest side of `cargo xtask bench virtiofs` (built static by the xtask with
//! rustc, run inside the guest). Reads FILE with O_DIRECT, sequentially or at random
//! block-aligned offsets, and prints one result line.
//!
//! usage: vfsread seq|rand FILE BLOCK_SIZE OPS   (seq: OPS 0 means the whole file)

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

const O_DIRECT: i32 = 0o40000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: vfsread seq|rand FILE BLOCK_SIZE OPS");
        std::process::exit(2);
    }
    let (mode, path) = (args[1].as_str(), args[2].as_str());
    let bs: u64 = args[3].parse().expect("block size");
    let ops: u64 = args[4].parse().expect("ops");
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(O_DIRECT)
        .open(path)
        .expect("open");
    let blocks = file.metadata().expect("stat").len() / bs;
    let ops = if mode == "seq" && ops == 0 { blocks } else { ops };
    // O_DIRECT wants an aligned buffer: over-allocate and start at a 4 KiB boundary.
    let mut backing = vec![0u8; bs as usize + 4096];
    let skew = (4096 - backing.as_ptr() as usize % 4096) % 4096;
    let buf = &mut backing[skew..skew + bs as usize];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut bytes = 0u64;
    let start = Instant::now();
    for i in 0..ops {
        let block = if mode == "seq" {
            i % blocks
        } else {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % blocks
        };
        bytes += file.read_at(buf, block * bs).expect("read") as u64;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-6);
    println!(
        "vfsread {mode} bs={bs} ops={ops} bytes={bytes} secs={secs:.3} mibps={:.1} iops={:.0}",
        bytes as f64 / 1048576.0 / secs,
        ops as f64 / secs
    );
}
