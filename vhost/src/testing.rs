//! A split virtqueue in ordinary memory, for driving request handling without a VMM: the
//! proptest harnesses of this crate and of the daemon build descriptor chains here (well
//! formed or not) and check the replies.

use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::request::handle_chain_unguarded;

/// Descriptors in the table (and the longest chain).
pub const QUEUE_SIZE: u16 = 16;
/// Size of the pretend guest memory.
pub const MEMORY_SIZE: u64 = 0x10_0000;
/// Where request and reply buffers start (below: descriptor table and rings).
pub const BUFFERS: u64 = 0x1_0000;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
/// virtq_desc flags.
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One descriptor as the guest writes it into the table.
#[derive(Clone, Copy, Debug)]
pub struct RawDescriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

pub struct TestQueue {
    pub mem: GuestMemoryMmap<()>,
    queue: Queue,
    next_avail: u16,
}

impl Default for TestQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl TestQueue {
    pub fn new() -> TestQueue {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEMORY_SIZE as usize)])
            .expect("anonymous test memory");
        let mut queue = Queue::new(QUEUE_SIZE).expect("valid queue size");
        queue.set_size(QUEUE_SIZE);
        queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
        queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
        queue.set_ready(true);
        TestQueue {
            mem,
            queue,
            next_avail: 0,
        }
    }

    /// Writes `descs` into table slots 0.., offers slot `head` to the device and serves what
    /// the queue yields. Returns the used length, or `None` if the queue yielded no chain.
    pub fn serve<F: FileSystem + Sync>(
        &mut self,
        server: &Server<F>,
        descs: &[RawDescriptor],
        head: u16,
    ) -> Option<u32> {
        for (i, d) in descs.iter().take(QUEUE_SIZE as usize).enumerate() {
            let at = DESC_TABLE + 16 * i as u64;
            self.write(d.addr, at);
            self.write(d.len, at + 8);
            self.write(d.flags, at + 12);
            self.write(d.next, at + 14);
        }
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.next_avail % QUEUE_SIZE);
        self.write(head, slot);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.write(self.next_avail, AVAIL_RING + 2);
        let chain = self.queue.pop_descriptor_chain(&self.mem)?;
        let head = chain.head_index();
        let len = handle_chain_unguarded(server, &self.mem, chain);
        // A head index beyond the queue is refused here, as in the backend (which logs it).
        let _ = self.queue.add_used(&self.mem, head, len);
        Some(len)
    }

    /// A well-formed chain: `request` in one readable buffer, `room` writable bytes after
    /// it. Returns the used length and the reply bytes.
    pub fn request<F: FileSystem + Sync>(
        &mut self,
        server: &Server<F>,
        request: &[u8],
        room: u32,
    ) -> (u32, Vec<u8>) {
        let reply_at = BUFFERS + request.len() as u64 + 64;
        self.mem
            .write_slice(request, GuestAddress(BUFFERS))
            .expect("request fits in test memory");
        let mut descs = vec![RawDescriptor {
            addr: BUFFERS,
            len: request.len() as u32,
            flags: if room > 0 { F_NEXT } else { 0 },
            next: 1,
        }];
        if room > 0 {
            descs.push(RawDescriptor {
                addr: reply_at,
                len: room,
                flags: F_WRITE,
                next: 0,
            });
        }
        let len = self
            .serve(server, &descs, 0)
            .expect("a valid chain is served");
        let mut reply = vec![0u8; len.min(room) as usize];
        self.mem
            .read_slice(&mut reply, GuestAddress(reply_at))
            .expect("reply in test memory");
        (len, reply)
    }

    /// Writes `bytes` into guest memory at `at` (for chains built by hand).
    pub fn write_buffer(&self, at: u64, bytes: &[u8]) {
        self.mem
            .write_slice(bytes, GuestAddress(at))
            .expect("buffer fits in test memory");
    }

    fn write<T: vm_memory::ByteValued>(&self, value: T, at: u64) {
        self.mem
            .write_obj(value, GuestAddress(at))
            .expect("queue layout fits in test memory");
    }
}

/// A FUSE request: header (with `len` covering the body) and body.
pub fn fuse_request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let header = InHeader {
        len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
        opcode,
        unique,
        nodeid,
        uid: 0,
        gid: 0,
        pid: 1,
        padding: 0,
    };
    let mut out = vm_memory::ByteValued::as_slice(&header).to_vec();
    out.extend_from_slice(body);
    out
}

/// Checks that `reply` (with used length `len`, in a buffer of `room` bytes) is a FUSE reply
/// a guest can parse; returns its header. `unique` is the request's id if it had a header.
pub fn check_reply(
    len: u32,
    room: u32,
    reply: &[u8],
    unique: Option<u64>,
) -> Result<Option<OutHeader>, String> {
    if len > room {
        return Err(format!(
            "used length {len} beyond the {room} writable bytes"
        ));
    }
    if len == 0 {
        return Ok(None);
    }
    let size = std::mem::size_of::<OutHeader>();
    if (len as usize) < size || reply.len() < size {
        return Err(format!("a {len}-byte reply is shorter than its header"));
    }
    let mut header = OutHeader::default();
    vm_memory::ByteValued::as_mut_slice(&mut header).copy_from_slice(&reply[..size]);
    if header.len != len {
        return Err(format!("header says {} bytes, used ring {len}", header.len));
    }
    if header.error > 0 || header.error < -4095 {
        return Err(format!("error field {} is no negative errno", header.error));
    }
    if let Some(unique) = unique {
        if header.unique != unique {
            return Err(format!("reply to {} for request {unique}", header.unique));
        }
    }
    Ok(Some(header))
}
