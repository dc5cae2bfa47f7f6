//! Reads through a virtio-fs queue (guest memory in plain memory) from a `BerthFs` over a
//! local directory store: the direct path that reads the file straight into the guest's
//! buffers must return the exact bytes, short only at the end of the file.

use std::sync::Arc;

use berth_vhost::testing::{check_reply, fuse_request, TestQueue};
use fuse_backend_rs::api::server::Server;

use super::{AttrConfig, BerthFs, FsConfig};
use crate::memory::MemoryLimiter;
use crate::namespace::Namespace;
use crate::prefetch::{Fetcher, PrefetchConfig};
use crate::store::{LocalStore, ObjectStore};

const LOOKUP: u32 = 1;
const OPEN: u32 = 14;
const READ: u32 = 15;
const INIT: u32 = 26;
const OUT_HEADER: usize = 16;

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
}

/// Sends one request and returns the reply body (after the out header), failing on errors.
fn call(
    queue: &mut TestQueue,
    server: &Server<Arc<BerthFs>>,
    request: Vec<u8>,
    room: u32,
) -> Vec<u8> {
    let (len, reply) = queue.request(server, &request, room);
    let header = check_reply(len, room, &reply, None)
        .unwrap()
        .expect("a reply");
    assert_eq!(header.error, 0, "request failed");
    reply[OUT_HEADER..len as usize].to_vec()
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

#[test]
fn reads_of_a_local_store_go_straight_to_guest_memory() {
    let dir = tempfile::tempdir().unwrap();
    let data = pattern(300_000);
    std::fs::write(dir.path().join("data.bin"), &data).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(LocalStore::open(dir.path()).unwrap());
    let ns = Arc::new(Namespace::new(store.clone(), String::new(), None, None).unwrap());
    let memory = MemoryLimiter::new(1 << 30);
    let fetcher = Fetcher::new(store, memory.clone(), PrefetchConfig::default(), None);
    let attr = AttrConfig {
        uid: 0,
        gid: 0,
        file_mode: 0o644,
        dir_mode: 0o755,
        ignore_stored: false,
    };
    let config = FsConfig {
        read_only: true,
        part_size: 8 << 20,
        attr,
    };
    let spool_dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(BerthFs::new(
        rt.handle().clone(),
        ns,
        fetcher,
        memory,
        config,
        Arc::new(crate::upload::SpoolDir::new(spool_dir.path().to_path_buf())),
    ));
    let server = Server::new(fs);
    let mut queue = TestQueue::new();

    let mut init = Vec::new();
    for v in [7u32, 31, 1 << 20, 0] {
        init.extend_from_slice(&v.to_le_bytes());
    }
    init.extend_from_slice(&[0u8; 48]);
    call(&mut queue, &server, fuse_request(INIT, 1, 0, &init), 4096);
    let entry = call(
        &mut queue,
        &server,
        fuse_request(LOOKUP, 2, 1, b"data.bin\0"),
        4096,
    );
    let nodeid = u64_at(&entry, 0);
    let open_in = [0u8; 8]; // O_RDONLY, no FUSE open flags
    let opened = call(
        &mut queue,
        &server,
        fuse_request(OPEN, 3, nodeid, &open_in),
        4096,
    );
    let fh = u64_at(&opened, 0);

    let reads = [
        (0u64, 4096u32),
        (123_457, 4096),
        (4096, 200_000),
        (299_000, 4096), // short: the file ends
        (300_000, 4096), // at the end: nothing
        (900_000, 4096), // past the end: nothing
    ];
    for (n, (offset, size)) in reads.into_iter().enumerate() {
        let mut read_in = Vec::new();
        read_in.extend_from_slice(&fh.to_le_bytes());
        read_in.extend_from_slice(&offset.to_le_bytes());
        read_in.extend_from_slice(&size.to_le_bytes());
        read_in.extend_from_slice(&[0u8; 20]); // read_flags, lock_owner, flags, padding
        let room = size + OUT_HEADER as u32;
        let got = call(
            &mut queue,
            &server,
            fuse_request(READ, 10 + n as u64, nodeid, &read_in),
            room,
        );
        let start = (offset as usize).min(data.len());
        let end = (offset as usize + size as usize).min(data.len());
        assert_eq!(got, &data[start..end], "read of {size} at {offset}");
    }
}
