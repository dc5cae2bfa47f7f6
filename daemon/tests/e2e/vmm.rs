//! A pretend guest behind a pretend VMM: a vhost-user frontend that hands berth a memfd as
//! guest memory, lays one split virtqueue out in it, and sends real FUSE requests (INIT,
//! LOOKUP, OPEN, READ) as descriptor chains, the way a guest's virtio-fs driver does. With
//! it the e2e tests reach the code that parses guest input (descriptor chains, FUSE
//! messages) in a real share process, not just the vhost-user handshake.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};

const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;
/// virtio-fs: queue 0 is the high-priority queue, 1 the first request queue.
const REQUEST_QUEUE: usize = 1;
const QUEUE_SIZE: u16 = 16;
const MEMORY: usize = 1 << 20;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x1000;
const USED_RING: u64 = 0x2000;
const REQUEST: u64 = 0x1_0000;
const REPLY: u64 = 0x2_0000;
const REPLY_LEN: u32 = 0x4_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

const FUSE_LOOKUP: u32 = 1;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_RELEASE: u32 = 18;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_CREATE: u32 = 35;
/// struct fuse_entry_out: what LOOKUP answers and CREATE answers first.
const ENTRY_OUT: usize = 128;
const ROOT: u64 = 1;

/// One guest attached to a share.
pub struct Guest {
    /// Kept open: dropping it disconnects the VMM.
    _frontend: Frontend,
    memory: *mut u8,
    _memfd: File,
    /// The eventfds (kick, call), kept open for the backend; we write and read them raw.
    kick: OwnedFd,
    call: OwnedFd,
    next_avail: u16,
    unique: u64,
    /// How long a request may wait for its answer.
    pub patience: Duration,
}

// SAFETY: the mapping is owned by the Guest and only touched through &mut self.
unsafe impl Send for Guest {}

impl Drop for Guest {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `attach`, used by nothing else.
        unsafe { libc::munmap(self.memory.cast(), MEMORY) };
    }
}

fn eventfd() -> Result<OwnedFd> {
    // SAFETY: eventfd has no memory preconditions; the fd is owned below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    ensure!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Guest {
    /// Connects to `socket` as a VMM does and sets the request queue up.
    pub fn attach(socket: &Path) -> Result<Guest> {
        let mut frontend = Frontend::connect(socket, 2)
            .with_context(|| format!("connecting to {}", socket.display()))?;
        frontend.set_owner().context("SET_OWNER")?;
        let offered = frontend.get_features().context("GET_FEATURES")?;
        ensure!(
            offered & VIRTIO_F_VERSION_1 != 0,
            "no VERSION_1 in {offered:#x}"
        );
        let wanted = offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES);
        frontend.set_features(wanted).context("SET_FEATURES")?;
        if wanted & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let _ = frontend
                .get_protocol_features()
                .context("GET_PROTOCOL_FEATURES")?;
            frontend
                .set_protocol_features(VhostUserProtocolFeatures::empty())
                .context("SET_PROTOCOL_FEATURES")?;
        }

        // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
        let fd = unsafe { libc::memfd_create(c"berth-e2e-guest".as_ptr(), libc::MFD_CLOEXEC) };
        ensure!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd nobody else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(MEMORY as u64)?;
        // SAFETY: a shared mapping of the whole memfd, owned by the Guest (unmapped on drop).
        let memory = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEMORY,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                memfd.as_raw_fd(),
                0,
            )
        };
        ensure!(
            memory != libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let base = memory as u64;
        frontend
            .set_mem_table(&[VhostUserMemoryRegionInfo {
                guest_phys_addr: 0,
                memory_size: MEMORY as u64,
                userspace_addr: base,
                mmap_offset: 0,
                mmap_handle: memfd.as_raw_fd(),
            }])
            .context("SET_MEM_TABLE")?;

        let q = REQUEST_QUEUE;
        frontend
            .set_vring_num(q, QUEUE_SIZE)
            .context("SET_VRING_NUM")?;
        frontend.set_vring_base(q, 0).context("SET_VRING_BASE")?;
        frontend
            .set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: base + DESC_TABLE,
                    used_ring_addr: base + USED_RING,
                    avail_ring_addr: base + AVAIL_RING,
                    log_addr: None,
                },
            )
            .context("SET_VRING_ADDR")?;
        // The frontend wants vmm-sys-util's EventFd, which this crate does not name: the
        // types follow from the calls. We keep our own copies of the fds to use them raw.
        let (kick, call) = (eventfd()?, eventfd()?);
        // SAFETY: dup'ed fds, owned by the EventFds handed to the frontend below.
        let kick_fd = unsafe { FromRawFd::from_raw_fd(libc::dup(kick.as_raw_fd())) };
        frontend
            .set_vring_kick(q, &kick_fd)
            .context("SET_VRING_KICK")?;
        // SAFETY: as above.
        let call_fd = unsafe { FromRawFd::from_raw_fd(libc::dup(call.as_raw_fd())) };
        frontend
            .set_vring_call(q, &call_fd)
            .context("SET_VRING_CALL")?;
        if wanted & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            frontend
                .set_vring_enable(q, true)
                .context("SET_VRING_ENABLE")?;
        }
        Ok(Guest {
            _frontend: frontend,
            memory: memory.cast(),
            _memfd: memfd,
            kick,
            call,
            next_avail: 0,
            unique: 0,
            patience: Duration::from_secs(10),
        })
    }

    fn write_bytes(&mut self, at: u64, bytes: &[u8]) {
        assert!(at as usize + bytes.len() <= MEMORY);
        // SAFETY: within the mapping (checked above); the backend only reads what we offer.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.memory.add(at as usize), bytes.len())
        };
    }

    fn read_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        assert!(at as usize + len <= MEMORY);
        let mut out = vec![0u8; len];
        // SAFETY: within the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(self.memory.add(at as usize), out.as_mut_ptr(), len)
        };
        out
    }

    fn read_u16(&self, at: u64) -> u16 {
        // SAFETY: an aligned u16 inside the mapping, written by the backend.
        unsafe { std::ptr::read_volatile(self.memory.add(at as usize).cast::<u16>()) }
    }

    fn write_u16(&mut self, at: u64, v: u16) {
        // SAFETY: an aligned u16 inside the mapping.
        unsafe { std::ptr::write_volatile(self.memory.add(at as usize).cast::<u16>(), v) }
    }

    /// Sends one FUSE request (`opcode` on `nodeid` with `body`) and returns the reply's
    /// error and payload (the bytes after the out header).
    pub fn request(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Result<(i32, Vec<u8>)> {
        self.unique += 1;
        let unique = self.unique;
        let len = 40 + body.len() as u32;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend(len.to_le_bytes());
        msg.extend(opcode.to_le_bytes());
        msg.extend(unique.to_le_bytes());
        msg.extend(nodeid.to_le_bytes());
        msg.extend([0u8; 16]); // uid, gid, pid, total_extlen, padding
        msg.extend(body);
        self.write_bytes(REQUEST, &msg);
        // A chain of two: the request (device-readable), the reply buffer (device-writable).
        let mut table = Vec::new();
        for (addr, len, flags, next) in
            [(REQUEST, len, F_NEXT, 1u16), (REPLY, REPLY_LEN, F_WRITE, 0)]
        {
            table.extend(addr.to_le_bytes());
            table.extend(len.to_le_bytes());
            table.extend(flags.to_le_bytes());
            table.extend(next.to_le_bytes());
        }
        self.write_bytes(DESC_TABLE, &table);
        let slot = AVAIL_RING + 4 + 2 * u64::from(self.next_avail % QUEUE_SIZE);
        self.write_u16(slot, 0);
        fence(Ordering::SeqCst);
        self.next_avail = self.next_avail.wrapping_add(1);
        self.write_u16(AVAIL_RING + 2, self.next_avail);
        fence(Ordering::SeqCst);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        let n = unsafe { libc::write(self.kick.as_raw_fd(), (&one as *const u64).cast(), 8) };
        ensure!(n == 8, "kick: {}", std::io::Error::last_os_error());
        self.wait_used(self.patience)
            .with_context(|| format!("FUSE opcode {opcode}"))?;
        let used = USED_RING + 4 + 8 * u64::from((self.next_avail - 1) % QUEUE_SIZE);
        let entry = self.read_bytes(used, 8);
        let used_len = u32::from_le_bytes(entry[4..8].try_into().unwrap());
        let header = self.read_bytes(REPLY, 16);
        let reply_len = u32::from_le_bytes(header[0..4].try_into().unwrap());
        let error = i32::from_le_bytes(header[4..8].try_into().unwrap());
        let reply_unique = u64::from_le_bytes(header[8..16].try_into().unwrap());
        ensure!(
            reply_unique == unique,
            "reply for request {reply_unique}, sent {unique}"
        );
        ensure!(
            reply_len == used_len && reply_len >= 16,
            "reply length {reply_len}, used length {used_len}"
        );
        Ok((error, self.read_bytes(REPLY + 16, reply_len as usize - 16)))
    }

    /// Waits until the backend has used our last chain (and called us).
    fn wait_used(&mut self, limit: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            fence(Ordering::SeqCst);
            if self.read_u16(USED_RING + 2) == self.next_avail {
                let mut count = 0u64;
                // SAFETY: reads 8 bytes into a u64 from our non-blocking eventfd.
                unsafe { libc::read(self.call.as_raw_fd(), (&mut count as *mut u64).cast(), 8) };
                return Ok(());
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                bail!("the backend did not answer within {limit:?}");
            }
            let mut pfd = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polls one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
        }
    }

    /// FUSE INIT, as the guest driver sends it first.
    pub fn init(&mut self) -> Result<()> {
        let mut body = Vec::new();
        for v in [7u32, 31, 128 << 10, 0] {
            body.extend(v.to_le_bytes()); // major, minor, max_readahead, flags
        }
        let (error, reply) = self.request(FUSE_INIT, 0, &body)?;
        ensure!(error == 0, "INIT failed: errno {}", -error);
        ensure!(reply.len() >= 8, "short INIT reply");
        let major = u32::from_le_bytes(reply[0..4].try_into().unwrap());
        ensure!(major == 7, "INIT answered major {major}");
        Ok(())
    }

    /// LOOKUP `name` in the root: its node id, or the errno.
    pub fn lookup(&mut self, name: &str) -> Result<std::result::Result<u64, i32>> {
        let mut body = name.as_bytes().to_vec();
        body.push(0);
        let (error, reply) = self.request(FUSE_LOOKUP, ROOT, &body)?;
        if error != 0 {
            return Ok(Err(-error));
        }
        Ok(Ok(u64::from_le_bytes(reply[0..8].try_into().unwrap())))
    }

    /// OPEN node `nodeid` read-only, READ `size` bytes at 0: what the guest reads.
    pub fn read(&mut self, nodeid: u64, size: u32) -> Result<Vec<u8>> {
        let fh = self.open(nodeid)?;
        self.read_at(nodeid, fh, 0, size)
    }

    /// OPEN node `nodeid` read-only: its file handle.
    pub fn open(&mut self, nodeid: u64) -> Result<u64> {
        let open_in = [0u8; 8]; // flags O_RDONLY, open_flags 0
        let (error, reply) = self.request(FUSE_OPEN, nodeid, &open_in)?;
        ensure!(error == 0, "OPEN failed: errno {}", -error);
        ensure!(reply.len() >= 8, "short OPEN reply");
        Ok(u64::from_le_bytes(reply[0..8].try_into().unwrap()))
    }

    /// READ `size` bytes at `offset` of open handle `fh`.
    pub fn read_at(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let mut read_in = Vec::new();
        read_in.extend(fh.to_le_bytes());
        read_in.extend(offset.to_le_bytes());
        read_in.extend(size.to_le_bytes());
        read_in.extend([0u8; 20]); // read_flags, lock_owner, flags, padding
        let (error, data) = self.request(FUSE_READ, nodeid, &read_in)?;
        ensure!(error == 0, "READ failed: errno {}", -error);
        Ok(data)
    }

    /// CREATE `name` in the root for writing (O_WRONLY | O_EXCL, mode 0644): its node id
    /// and file handle.
    pub fn create(&mut self, name: &str) -> Result<(u64, u64)> {
        let mut body = Vec::new();
        let flags = (libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL) as u32;
        for v in [flags, 0o100644, 0o022, 0] {
            body.extend(v.to_le_bytes()); // flags, mode, umask, open_flags
        }
        body.extend(name.as_bytes());
        body.push(0);
        let (error, reply) = self.request(FUSE_CREATE, ROOT, &body)?;
        ensure!(error == 0, "CREATE {name} failed: errno {}", -error);
        ensure!(reply.len() >= ENTRY_OUT + 8, "short CREATE reply");
        let node = u64::from_le_bytes(reply[0..8].try_into().unwrap());
        let fh = u64::from_le_bytes(reply[ENTRY_OUT..ENTRY_OUT + 8].try_into().unwrap());
        Ok((node, fh))
    }

    /// WRITE `data` at `offset` of open handle `fh`; every byte must be taken.
    pub fn write_at(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<()> {
        let mut body = Vec::new();
        body.extend(fh.to_le_bytes());
        body.extend(offset.to_le_bytes());
        body.extend((data.len() as u32).to_le_bytes());
        body.extend([0u8; 20]); // write_flags, lock_owner, flags, padding
        body.extend(data);
        let (error, reply) = self.request(FUSE_WRITE, nodeid, &body)?;
        ensure!(error == 0, "WRITE failed: errno {}", -error);
        ensure!(reply.len() >= 4, "short WRITE reply");
        let size = u32::from_le_bytes(reply[0..4].try_into().unwrap());
        ensure!(
            size as usize == data.len(),
            "WRITE took {size} of {} bytes",
            data.len()
        );
        Ok(())
    }

    /// FLUSH then RELEASE of handle `fh`, as close(2) in the guest: the file is committed by
    /// the FLUSH, whose error is returned.
    pub fn close(&mut self, nodeid: u64, fh: u64) -> Result<()> {
        let mut flush_in = Vec::new();
        flush_in.extend(fh.to_le_bytes());
        flush_in.extend([0u8; 16]); // unused, padding, lock_owner
        let (error, _) = self.request(FUSE_FLUSH, nodeid, &flush_in)?;
        ensure!(error == 0, "FLUSH failed: errno {}", -error);
        let mut release_in = Vec::new();
        release_in.extend(fh.to_le_bytes());
        release_in.extend([0u8; 16]); // flags, release_flags, lock_owner
        let (error, _) = self.request(FUSE_RELEASE, nodeid, &release_in)?;
        ensure!(error == 0, "RELEASE failed: errno {}", -error);
        Ok(())
    }

    /// Shrinks the guest's memory file to `len` bytes under the backend (a hostile VMM):
    /// whatever maps it and touches the rest gets SIGBUS.
    pub fn shrink_memory(&self, len: u64) -> Result<()> {
        self._memfd
            .set_len(len)
            .context("shrinking the guest memory")
    }

    /// Kicks the request queue without queueing anything.
    pub fn kick(&self) -> Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write to our own eventfd.
        let n = unsafe { libc::write(self.kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        ensure!(n == 8, "kick: {}", std::io::Error::last_os_error());
        Ok(())
    }

    /// INIT, then LOOKUP and READ of `name` in the root: what a guest's `cat /mnt/name` does.
    pub fn cat(socket: &Path, name: &str) -> Result<Vec<u8>> {
        let mut guest = Guest::attach(socket)?;
        guest.init()?;
        let node = match guest.lookup(name)? {
            Ok(node) => node,
            Err(errno) => bail!("LOOKUP {name} failed: errno {errno}"),
        };
        let data = guest.read(node, 1 << 16)?;
        // A missing name is an answer too (ENOENT, or node 0: a negative entry the guest
        // may cache), not a dead backend.
        let missing = guest.lookup("no-such-file")?;
        ensure!(
            matches!(missing, Err(libc::ENOENT) | Ok(0)),
            "LOOKUP of a missing name answered {missing:?}"
        );
        Ok(data)
    }
}

/// A hostile VMM: it offers a memory table whose one region claims `declared` bytes of a
/// memfd of `real` bytes (at file offset `offset`), with REPLY_ACK so that a refusal is an
/// answer, then sets a request queue up whose rings lie past the end of the file and kicks
/// it. Returns whether the backend accepted the table; the connection is dropped on return.
pub fn offer_memory_past_the_file(
    socket: &Path,
    declared: u64,
    real: u64,
    offset: u64,
) -> Result<bool> {
    let mut frontend = Frontend::connect(socket, 2)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    frontend.set_owner().context("SET_OWNER")?;
    let offered = frontend.get_features().context("GET_FEATURES")?;
    let wanted = offered & (VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES);
    ensure!(
        wanted & VHOST_USER_F_PROTOCOL_FEATURES != 0,
        "the backend offers no protocol features ({offered:#x})"
    );
    frontend.set_features(wanted).context("SET_FEATURES")?;
    frontend
        .get_protocol_features()
        .context("GET_PROTOCOL_FEATURES")?;
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::REPLY_ACK)
        .context("SET_PROTOCOL_FEATURES")?;
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"berth-e2e-hostile".as_ptr(), libc::MFD_CLOEXEC) };
    ensure!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd nobody else owns.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd.set_len(real)?;
    // Addresses the VMM claims; nothing is mapped there in this process.
    let base: u64 = 0x7f00_0000_0000;
    let accepted = frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: declared,
            userspace_addr: base,
            mmap_offset: offset,
            mmap_handle: memfd.as_raw_fd(),
        }])
        .is_ok()
        // A refusal closes the connection (with REPLY_ACK it is also answered): only a
        // backend that took the table answers the next question.
        && frontend.get_features().is_ok();
    // What would follow an accepted table: rings far past the end of the file, kicked.
    let past = declared.saturating_sub(0x10_0000);
    let q = REQUEST_QUEUE;
    let _ = frontend.set_vring_num(q, QUEUE_SIZE);
    let _ = frontend.set_vring_base(q, 0);
    let _ = frontend.set_vring_addr(
        q,
        &VringConfigData {
            queue_max_size: QUEUE_SIZE,
            queue_size: QUEUE_SIZE,
            flags: 0,
            desc_table_addr: base + past + DESC_TABLE,
            used_ring_addr: base + past + USED_RING,
            avail_ring_addr: base + past + AVAIL_RING,
            log_addr: None,
        },
    );
    let (kick, call) = (eventfd()?, eventfd()?);
    // SAFETY: dup'ed fds, owned by the EventFds handed to the frontend below.
    let kick_fd = unsafe { FromRawFd::from_raw_fd(libc::dup(kick.as_raw_fd())) };
    let _ = frontend.set_vring_kick(q, &kick_fd);
    // SAFETY: as above.
    let call_fd = unsafe { FromRawFd::from_raw_fd(libc::dup(call.as_raw_fd())) };
    let _ = frontend.set_vring_call(q, &call_fd);
    let _ = frontend.set_vring_enable(q, true);
    let one = 1u64.to_ne_bytes();
    // SAFETY: an 8-byte write to our own eventfd.
    unsafe { libc::write(kick.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    // Long enough for the holder's 100 ms watch of the rings and an engine's scan.
    std::thread::sleep(Duration::from_secs(2));
    Ok(accepted)
}
