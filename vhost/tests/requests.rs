//! Untrusted guests: arbitrary request bytes and arbitrary descriptor tables through the
//! request path, over a filesystem that implements nothing (every operation ENOSYS) and one
//! that answers lookups. Nothing may panic or hang, and every reply must be well formed.

use std::ffi::CStr;
use std::io;

use berth_vhost::testing::{
    check_reply, fuse_request, RawDescriptor, TestQueue, BUFFERS, F_INDIRECT, F_NEXT, F_WRITE,
    MEMORY_SIZE, QUEUE_SIZE,
};
use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem};
use fuse_backend_rs::api::server::Server;
use proptest::prelude::*;

/// Answers LOOKUP of "hello" under the root; everything else is the trait's default.
struct Tiny;

impl FileSystem for Tiny {
    type Inode = u64;
    type Handle = u64;

    fn lookup(&self, _ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        if parent == 1 && name.to_bytes() == b"hello" {
            // SAFETY: stat64 is plain data; all zeroes is a valid value.
            let mut attr: stat64 = unsafe { std::mem::zeroed() };
            attr.st_ino = 2;
            attr.st_mode = libc::S_IFREG | 0o644;
            return Ok(Entry {
                inode: 2,
                generation: 0,
                attr,
                attr_flags: 0,
                attr_timeout: std::time::Duration::ZERO,
                entry_timeout: std::time::Duration::ZERO,
            });
        }
        Err(io::Error::from_raw_os_error(libc::ENOENT))
    }
}

const INIT: u32 = 26;
const LOOKUP: u32 = 1;

fn init_body() -> Vec<u8> {
    // fuse_init_in: major, minor, max_readahead, flags (+ flags2 and padding, zero).
    let mut body = Vec::new();
    for v in [7u32, 31, 1 << 20, 0] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&[0u8; 48]);
    body
}

fn server() -> (Server<Tiny>, TestQueue) {
    let server = Server::new(Tiny);
    let mut queue = TestQueue::new();
    let (len, reply) = queue.request(&server, &fuse_request(INIT, 1, 0, &init_body()), 4096);
    let header = check_reply(len, 4096, &reply, Some(1)).unwrap().unwrap();
    assert_eq!(header.error, 0, "INIT failed");
    (server, queue)
}

#[test]
fn lookup_answers_and_misses() {
    let (server, mut queue) = server();
    let (len, reply) = queue.request(&server, &fuse_request(LOOKUP, 7, 1, b"hello\0"), 4096);
    let header = check_reply(len, 4096, &reply, Some(7)).unwrap().unwrap();
    assert_eq!(header.error, 0);
    assert!(len > 16, "an entry follows the header");
    let (len, reply) = queue.request(&server, &fuse_request(LOOKUP, 8, 1, b"nope\0"), 4096);
    let header = check_reply(len, 4096, &reply, Some(8)).unwrap().unwrap();
    assert_eq!(header.error, -libc::ENOENT);
}

#[test]
fn a_reply_that_does_not_fit_is_an_error_not_a_crash() {
    let (server, mut queue) = server();
    // Room for the header only: the entry cannot be written.
    let (len, reply) = queue.request(&server, &fuse_request(LOOKUP, 9, 1, b"hello\0"), 16);
    let header = check_reply(len, 16, &reply, Some(9)).unwrap();
    assert!(header.is_none_or(|h| h.error < 0));
}

#[test]
fn truncated_header_gets_no_reply_and_no_crash() {
    let (server, mut queue) = server();
    let (len, _) = queue.request(&server, &[1, 2, 3], 4096);
    assert_eq!(len, 0);
}

#[test]
fn unknown_opcode_is_enosys() {
    let (server, mut queue) = server();
    let (len, reply) = queue.request(&server, &fuse_request(9999, 5, 1, &[]), 4096);
    let header = check_reply(len, 4096, &reply, Some(5)).unwrap().unwrap();
    assert_eq!(header.error, -libc::ENOSYS);
}

fn descriptor() -> impl Strategy<Value = RawDescriptor> {
    (
        prop_oneof![
            0..MEMORY_SIZE + 0x1000,
            Just(BUFFERS),
            any::<u64>(),
            Just(u64::MAX - 8)
        ],
        prop_oneof![0u32..8192, any::<u32>()],
        prop_oneof![
            Just(0),
            Just(F_NEXT),
            Just(F_WRITE),
            Just(F_NEXT | F_WRITE),
            Just(F_INDIRECT),
            any::<u16>()
        ],
        prop_oneof![0..QUEUE_SIZE + 2, any::<u16>()],
    )
        .prop_map(|(addr, len, flags, next)| RawDescriptor {
            addr,
            len,
            flags,
            next,
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_request_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..600), room in 0u32..5000) {
        let (server, mut queue) = server();
        let unique = (bytes.len() >= 40).then(|| u64::from_le_bytes(bytes[8..16].try_into().unwrap()));
        let (len, reply) = queue.request(&server, &bytes, room);
        if let Err(e) = check_reply(len, room, &reply, unique) {
            return Err(TestCaseError::fail(e));
        }
    }

    #[test]
    fn header_shaped_requests(
        opcode in prop_oneof![0u32..64, any::<u32>()],
        unique in any::<u64>(),
        nodeid in prop_oneof![0u64..4, any::<u64>()],
        body in proptest::collection::vec(any::<u8>(), 0..300),
        lie in prop_oneof![Just(None), any::<u32>().prop_map(Some)],
        room in prop_oneof![Just(4096u32), 0u32..200],
    ) {
        let (server, mut queue) = server();
        let mut request = fuse_request(opcode, unique, nodeid, &body);
        if let Some(len) = lie {
            request[..4].copy_from_slice(&len.to_le_bytes());
        }
        let (len, reply) = queue.request(&server, &request, room);
        if let Err(e) = check_reply(len, room, &reply, Some(unique)) {
            return Err(TestCaseError::fail(e));
        }
    }

    #[test]
    fn arbitrary_descriptor_tables(
        descs in proptest::collection::vec(descriptor(), 1..=QUEUE_SIZE as usize),
        head in prop_oneof![0..QUEUE_SIZE, any::<u16>()],
        request in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let (server, mut queue) = server();
        use vm_memory::Bytes;
        let _ = queue.mem.write_slice(&request, vm_memory::GuestAddress(BUFFERS));
        // Whatever the table holds: served or refused, never a panic or a hang.
        let _ = queue.serve(&server, &descs, head);
        // The queue still works afterwards.
        let (len, reply) = queue.request(&server, &fuse_request(LOOKUP, 3, 1, b"hello\0"), 4096);
        prop_assert!(check_reply(len, 4096, &reply, Some(3)).is_ok());
    }
}
