//! A hostile guest for `cargo xtask fuzz-guest`: random and malformed virtio-fs requests
//! through berth's real request path (berth-vhost's descriptor-chain handling and the FUSE
//! server) into a real `BerthFs` door, over a local directory store or an S3 store, under a
//! memory budget. It runs for a given time and prints one JSON line: requests served,
//! crashes (panics caught per request; a crash of the process is seen by xtask), peak RSS,
//! peak of the engine's memory budget, replies by errno.
//!
//! ```text
//! fuzz_guest local DIR SECONDS SEED
//! fuzz_guest s3 s3://BUCKET SECONDS SEED      (AWS_ENDPOINT_URL and credentials from the env)
//! ```
//!
//! Requests are built from what the guest learned (node ids and handles from earlier
//! replies) mixed with junk: every FUSE opcode, hostile names, sizes up to 4 GiB, bodies of
//! random length, and descriptor tables that alias, loop, chain indirect tables or point
//! outside guest memory.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use berth::cli::args::{Cli, Command};
use berth::fs::BerthFs;
use berth::memory::MemoryLimiter;
use berth::volume::{self, Opening, Source, Target};
use berth_vhost::testing::{
    fuse_request, RawDescriptor, TestQueue, BUFFERS, F_INDIRECT, F_NEXT, F_WRITE, MEMORY_SIZE,
    QUEUE_SIZE,
};
use clap::Parser as _;
use fuse_backend_rs::api::server::Server;

/// The engine's memory budget during the run (small on purpose).
const MEMORY_LIMIT: &str = "64MiB";

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// What the guest knows: node ids and handles it was given.
#[derive(Default)]
struct Known {
    nodes: Vec<u64>,
    /// (node id, handle) as OPEN/OPENDIR/CREATE gave them.
    handles: Vec<(u64, u64)>,
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kind, source, seconds, seed] = args.as_slice() else {
        bail!("usage: fuzz_guest local DIR|s3 s3://BUCKET SECONDS SEED");
    };
    let seconds: u64 = seconds.parse().context("SECONDS")?;
    let seed: u64 = seed.parse().context("SEED")?;
    let state = tempfile::tempdir()?;
    let mut argv = vec![
        "berth".to_string(),
        "mount".into(),
        source.clone(),
        "/unused".into(),
        "--state-dir".into(),
        state.path().display().to_string(),
        "--memory-limit".into(),
        MEMORY_LIMIT.into(),
        "--part-size".into(),
        "5MiB".into(),
    ];
    if kind == "s3" {
        argv.extend(["--request-deadline".into(), "5s".into()]);
    } else if kind != "local" {
        bail!("the store is `local` or `s3`, not {kind:?}");
    }
    let Command::Mount(mount) = Cli::try_parse_from(&argv)?.command else {
        bail!("not a mount command line");
    };
    let config = mount.volume_config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let memory = MemoryLimiter::new(config.memory_limit);
    let target = Target {
        text: source.clone(),
        source: Source::parse(source)?,
        mountpoint: state.path().join("fuzz.sock"),
    };
    let v = volume::build_volume(
        &rt,
        &config,
        &target,
        state.path(),
        Opening::FRESH,
        &memory,
        None,
    )?;
    let report = fuzz(&rt, &v.fs, Duration::from_secs(seconds), seed, &memory)?;
    v.fs.shutdown();
    println!("{report}");
    Ok(())
}

/// A few objects for the guest to find: small, one block, several blocks, a directory.
/// Best effort: the guest may have made a name something else (a file where a directory
/// was), and then that object is simply not there this round.
fn seed_objects(rt: &tokio::runtime::Runtime, fs: &Arc<BerthFs>) -> Result<()> {
    let store = fs.namespace().store().clone();
    for (key, len) in [
        ("a", 10usize),
        ("dir/b", 1 << 20),
        ("dir/c/d", 3 << 20),
        ("e", 0),
    ] {
        let body = bytes::Bytes::from(vec![0x5a; len]);
        let _ = rt.block_on(store.put(key, body, &berth::store::PosixMeta::default()));
    }
    Ok(())
}

fn fuzz(
    rt: &tokio::runtime::Runtime,
    fs: &Arc<BerthFs>,
    run_for: Duration,
    seed: u64,
    memory: &MemoryLimiter,
) -> Result<String> {
    let mut rng = Rng(seed | 1);
    let started = Instant::now();
    let mut served = 0u64;
    let mut crashes = 0u64;
    let mut doors = 0u64;
    let mut errnos: BTreeMap<i32, u64> = BTreeMap::new();
    let mut data_read = 0u64;
    while started.elapsed() < run_for {
        // A VMM connects, sends a burst, leaves: its door (and open files) go with it. The
        // last one may have truncated or removed the objects: they are put back.
        seed_objects(rt, fs)?;
        doors += 1;
        let door_tag = ((doors - 1) % 255 + 1) as u8;
        let server = Server::new(fs.door(door_tag));
        let mut queue = TestQueue::new();
        let mut known = Known {
            nodes: vec![1],
            handles: Vec::new(),
        };
        init(&server, &mut queue);
        for _ in 0..rng.below(2000) + 1 {
            let outcome = catch_unwind(AssertUnwindSafe(|| {
                one_request(&server, &mut queue, &mut rng, &mut known)
            }));
            match outcome {
                Ok(Outcome::Failed(errno)) => *errnos.entry(errno).or_default() += 1,
                Ok(Outcome::Read(n)) => data_read += n,
                Ok(Outcome::Other) => {}
                Err(_) => crashes += 1,
            }
            served += 1;
            if started.elapsed() >= run_for {
                break;
            }
        }
    }
    Ok(serde_json::json!({
        "requests": served,
        "crashes": crashes,
        "connections": doors,
        "bytes_read": data_read,
        "seconds": started.elapsed().as_secs_f64(),
        "peak_rss_kib": peak_rss_kib(),
        "memory_peak": memory.peak(),
        "memory_limit": memory.limit(),
        "errnos": errnos.iter().map(|(e, n)| (e.to_string(), *n)).collect::<BTreeMap<_, _>>(),
    })
    .to_string())
}

fn init(server: &Server<BerthFs>, queue: &mut TestQueue) {
    let mut body = Vec::new();
    for v in [7u32, 31, 1 << 20, 0] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&[0u8; 48]);
    queue.request(server, &fuse_request(26, 1, 0, &body), 4096);
}

const NAMES: &[&[u8]] = &[
    b"a",
    b"dir",
    b"b",
    b"c",
    b"d",
    b"e",
    b"new",
    b"..",
    b".",
    b"",
    b"a/b",
    b"/etc/passwd",
    b".berth-uploads",
    b"\xff\xfe",
    b"x\0y",
];

enum Outcome {
    /// The reply carried this errno.
    Failed(i32),
    /// A READ returned this many bytes.
    Read(u64),
    Other,
}

/// One request and what its reply said.
fn one_request(
    server: &Server<BerthFs>,
    queue: &mut TestQueue,
    rng: &mut Rng,
    known: &mut Known,
) -> Outcome {
    one(server, queue, rng, known).unwrap_or(Outcome::Other)
}

fn one(
    server: &Server<BerthFs>,
    queue: &mut TestQueue,
    rng: &mut Rng,
    known: &mut Known,
) -> Option<Outcome> {
    let opcode = if rng.chance(85) {
        // The opcodes that reach the filesystem's data paths, most often.
        *rng.pick(&[
            1u32, 3, 9, 10, 12, 14, 15, 16, 18, 25, 27, 28, 29, 35, 44, 4, 11, 39,
        ])?
    } else {
        rng.below(60) as u32
    };
    let (mut nodeid, mut fh) = (
        if rng.chance(80) {
            *rng.pick(&known.nodes)?
        } else {
            rng.next() % 64
        },
        rng.next(),
    );
    if rng.chance(70) {
        if let Some(&(n, h)) = rng.pick(&known.handles) {
            fh = h;
            // Mostly with the handle's own node, sometimes with another.
            if rng.chance(80) {
                nodeid = n;
            }
        }
    }
    let size = match rng.below(5) {
        0 => u32::MAX,
        1 => rng.next() as u32,
        2 => 1 << 20,
        _ => rng.below(200_000) as u32,
    };
    let offset = match rng.below(10) {
        0..=3 => 0,
        4..=6 => rng.below(2 << 20),
        7 => rng.next(),
        _ => rng.below(4 << 20),
    };
    let pick_name = rng.below(NAMES.len() as u64) as usize;
    let name = || NAMES[pick_name];
    let mut body = match opcode {
        // LOOKUP, MKDIR (mode, umask), UNLINK, RMDIR, CREATE (flags, mode, umask, open flags)
        1 | 10 | 11 => name_body(name()),
        9 => [0u8; 8].iter().copied().chain(name_body(name())).collect(),
        35 => {
            let flags = *rng.pick(&[
                libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC,
                libc::O_CREAT | libc::O_WRONLY,
                libc::O_CREAT | libc::O_RDWR,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
            ])?;
            let mut b = (flags as u32).to_le_bytes().to_vec();
            b.extend_from_slice(&[0o644u32.to_le_bytes(), [0; 4], [0; 4]].concat());
            b.extend(name_body(name()));
            b
        }
        // RENAME (newdir) old\0 new\0
        12 => {
            let mut b = rng.pick(&known.nodes)?.to_le_bytes().to_vec();
            b.extend(name_body(name()));
            b.extend(name_body(NAMES[rng.below(NAMES.len() as u64) as usize]));
            b
        }
        // OPEN, OPENDIR (flags)
        14 | 27 => {
            let flags =
                *rng.pick(&[libc::O_RDONLY, libc::O_WRONLY | libc::O_TRUNC, libc::O_RDWR])?;
            let mut b = (flags as u32).to_le_bytes().to_vec();
            b.extend_from_slice(&[0; 4]);
            b
        }
        // READ, READDIR, READDIRPLUS (fh, offset, size, ...)
        15 | 28 | 44 => io_in(fh, offset, size),
        // WRITE: the header's size, then data of some other length
        16 => {
            let mut b = io_in(fh, offset, size);
            let len = rng.below(70_000) as usize;
            b.extend(rng.bytes(len));
            b
        }
        // RELEASE, FLUSH, RELEASEDIR, FSYNC
        18 | 25 | 29 | 20 => {
            let mut b = fh.to_le_bytes().to_vec();
            b.extend_from_slice(&[0u8; 16]);
            b
        }
        _ => {
            let len = rng.below(300) as usize;
            rng.bytes(len)
        }
    };
    if rng.chance(5) {
        body.truncate(rng.below(body.len() as u64 + 1) as usize);
    }
    let unique = rng.next() | 1;
    let request = fuse_request(opcode, unique, nodeid, &body);
    if rng.chance(15) {
        hostile_chain(server, queue, rng, &request);
        return Some(Outcome::Other);
    }
    let room = *rng.pick(&[0u32, 16, 4096, 65536, 200_000])?;
    let room =
        room.min(((MEMORY_SIZE - BUFFERS) as u32).saturating_sub(request.len() as u32 + 128));
    if request.len() as u64 + u64::from(room) + 128 > MEMORY_SIZE - BUFFERS {
        return Some(Outcome::Other);
    }
    let (len, reply) = queue.request(server, &request, room);
    let header = berth_vhost::testing::check_reply(len, room, &reply, Some(unique)).ok()??;
    if header.error != 0 {
        return Some(Outcome::Failed(-header.error));
    }
    learn(opcode, nodeid, &reply[16..len as usize], known);
    if opcode == 15 {
        return Some(Outcome::Read(u64::from(len) - 16));
    }
    Some(Outcome::Other)
}

fn name_body(name: &[u8]) -> Vec<u8> {
    let mut b = name.to_vec();
    b.push(0);
    b
}

fn io_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
    let mut b = fh.to_le_bytes().to_vec();
    b.extend_from_slice(&offset.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&[0u8; 20]);
    b
}

/// Node ids from LOOKUP/MKDIR/CREATE, handles from OPEN/OPENDIR/CREATE.
fn learn(opcode: u32, nodeid: u64, body: &[u8], known: &mut Known) {
    let at = |i: usize| {
        body.get(i..i + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    match opcode {
        1 | 9 => known.nodes.extend(at(0).filter(|&n| n != 0)),
        35 => {
            if let (Some(n), Some(h)) = (at(0).filter(|&n| n != 0), at(128)) {
                known.nodes.push(n);
                known.handles.push((n, h));
            }
        }
        14 | 27 => known.handles.extend(at(0).map(|h| (nodeid, h))),
        _ => {}
    }
    known.nodes.truncate(512);
    known.handles.truncate(4096);
}

/// A descriptor table as a hostile guest writes it: aliasing, loops, indirect tables,
/// addresses outside memory, writable before readable.
fn hostile_chain(server: &Server<BerthFs>, queue: &mut TestQueue, rng: &mut Rng, request: &[u8]) {
    if request.len() as u64 + BUFFERS < MEMORY_SIZE {
        queue.write_buffer(BUFFERS, request);
    }
    let count = rng.below(u64::from(QUEUE_SIZE)) as u16 + 1;
    let descs: Vec<RawDescriptor> = (0..count)
        .map(|i| {
            let addr = match rng.below(4) {
                0 => BUFFERS,
                1 => BUFFERS + rng.below(MEMORY_SIZE - BUFFERS),
                2 => rng.next(),
                _ => rng.below(MEMORY_SIZE),
            };
            let len = match rng.below(4) {
                0 => request.len() as u32,
                1 => rng.next() as u32,
                2 => (MEMORY_SIZE - BUFFERS) as u32 - 4096,
                _ => rng.below(65536) as u32,
            };
            let mut flags = 0;
            if rng.chance(70) {
                flags |= F_NEXT;
            }
            if rng.chance(40) {
                flags |= F_WRITE;
            }
            if rng.chance(5) {
                flags |= F_INDIRECT;
            }
            let next = if rng.chance(20) {
                i
            } else {
                rng.below(u64::from(QUEUE_SIZE)) as u16
            };
            RawDescriptor {
                addr,
                len,
                flags,
                next,
            }
        })
        .collect();
    let head = if rng.chance(90) { 0 } else { rng.next() as u16 };
    let _ = queue.serve(server, &descs, head);
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}
