//! A front keeps a VMM's device while ring servers come and go: a real vhost-user frontend
//! (the `vhost` crate's, as a VMM uses it) sets up guest memory (a memfd) and a queue; the
//! test plays the guest driver in that memory. A ring server stuck on a request (a hung or
//! dead engine: its thread never returns) is replaced, and the successor answers the request
//! it had taken, exactly once, then goes on; a request that changes the store and was already
//! applied is answered from the journal, not applied again; GET_VRING_BASE gives the avail
//! position; the VMM's socket never closes.

use std::collections::HashMap;
use std::ffi::CStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use berth_vhost::device::{DeviceFds, DeviceState};
use berth_vhost::front::{Front, FrontConfig, RingLink};
use berth_vhost::inflight::Inflight;
use berth_vhost::rings::{Hooks, Rings};
use berth_vhost::testing::fuse_request;
use fuse_backend_rs::abi::fuse_abi::stat64;
use fuse_backend_rs::api::filesystem::{Context, Entry, FileSystem};
use fuse_backend_rs::api::server::Server;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{BackendReqHandler, Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const NUM: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const BUFS: u64 = 0x10000;
/// Where the "VMM" says it maps guest memory (vring addresses come in this space).
const UADDR: u64 = 0x7000_0000_0000;
const LOOKUP: u32 = 1;
const MKDIR: u32 = 9;
const INIT: u32 = 26;

/// Lookups answer; a lookup of "stuck" blocks forever the first time; mkdirs are counted.
struct Fs {
    stuck_once: AtomicBool,
    mkdirs: AtomicU32,
    lookups: Mutex<HashMap<String, u32>>,
}

impl FileSystem for Fs {
    type Inode = u64;
    type Handle = u64;

    fn lookup(&self, _ctx: &Context, _parent: u64, name: &CStr) -> io::Result<Entry> {
        let name = name.to_string_lossy().into_owned();
        *self
            .lookups
            .lock()
            .unwrap()
            .entry(name.clone())
            .or_default() += 1;
        if name == "stuck" && !self.stuck_once.swap(true, Ordering::SeqCst) {
            // The engine hangs (or dies) here: this thread never comes back.
            loop {
                std::thread::park();
            }
        }
        // SAFETY: stat64 is plain data; all zeroes is valid.
        let mut attr: stat64 = unsafe { std::mem::zeroed() };
        attr.st_ino = 7;
        attr.st_mode = libc::S_IFREG | 0o644;
        Ok(Entry {
            inode: 7,
            generation: 0,
            attr,
            attr_flags: 0,
            attr_timeout: Duration::ZERO,
            entry_timeout: Duration::ZERO,
        })
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        _mode: u32,
        _umask: u32,
    ) -> io::Result<Entry> {
        self.mkdirs.fetch_add(1, Ordering::SeqCst);
        self.lookup(ctx, parent, name)
    }
}

/// Journals MKDIR replies; the first journal() call never returns (the engine dies after
/// journaling and before answering).
struct Journal {
    replies: Mutex<HashMap<u64, Vec<u8>>>,
    die_once: AtomicBool,
}

impl Hooks for Journal {
    fn journaled(&self, opcode: u32) -> bool {
        opcode == MKDIR
    }
    fn journal(&self, unique: u64, reply: &[u8]) {
        self.replies.lock().unwrap().insert(unique, reply.to_vec());
        if !self.die_once.swap(true, Ordering::SeqCst) {
            loop {
                std::thread::park();
            }
        }
    }
    fn replay(&self, unique: u64) -> Option<Vec<u8>> {
        self.replies.lock().unwrap().get(&unique).cloned()
    }
}

/// A ring server in this process, as an engine would run one.
struct Local {
    rings: Option<Rings<Arc<Fs>>>,
}

impl RingLink for Local {
    fn update(&mut self, state: &DeviceState, fds: &DeviceFds) -> io::Result<()> {
        let fds = DeviceFds::from_list(state, fds.to_list(state)?)?;
        if let Some(r) = &mut self.rings {
            r.update(state, &fds)?;
        }
        Ok(())
    }
    fn stop(&mut self, index: usize) -> io::Result<()> {
        if let Some(r) = &mut self.rings {
            r.stop(index);
        }
        Ok(())
    }
}

/// The guest: its memory (mapped here) and the driver's side of queue 1.
struct Guest {
    mem: *mut u8,
    next_avail: u16,
    seen_used: u16,
    call: EventFd,
    kick: EventFd,
}

impl Guest {
    fn write(&self, at: u64, bytes: &[u8]) {
        assert!(at as usize + bytes.len() <= MEM);
        // SAFETY: inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.mem.add(at as usize), bytes.len())
        };
    }
    fn read(&self, at: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        // SAFETY: inside the mapping.
        unsafe { std::ptr::copy_nonoverlapping(self.mem.add(at as usize), out.as_mut_ptr(), len) };
        out
    }
    fn u16_at(&self, at: u64) -> u16 {
        u16::from_le_bytes(self.read(at, 2).try_into().unwrap())
    }

    /// Posts `request` in head `head` (two descriptors: request, 4 KiB reply) and kicks.
    fn post(&mut self, head: u16, request: &[u8]) {
        let buf = BUFS + u64::from(head) * 0x4000;
        self.write(buf, request);
        let d0 = u64::from(head) * 2;
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let mut b = addr.to_le_bytes().to_vec();
            b.extend_from_slice(&len.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&next.to_le_bytes());
            self.write(DESC + 16 * i, &b);
        };
        desc(d0, buf, request.len() as u32, 1, (d0 + 1) as u16);
        desc(d0 + 1, buf + 0x2000, 4096, 2, 0);
        // head index as the guest names it: the first descriptor of the chain.
        self.write(
            AVAIL + 4 + 2 * u64::from(self.next_avail % NUM),
            &(d0 as u16).to_le_bytes(),
        );
        self.next_avail = self.next_avail.wrapping_add(1);
        self.write(AVAIL + 2, &self.next_avail.to_le_bytes());
        self.kick.write(1).unwrap();
    }

    /// Waits until the used ring shows `n` more answers; returns (head, reply error) each.
    fn answers(&mut self, n: usize, timeout: Duration) -> Vec<(u16, i32)> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let used = self.u16_at(USED + 2);
            while self.seen_used != used {
                let slot = u64::from(self.seen_used % NUM);
                let id = u32::from_le_bytes(self.read(USED + 4 + slot * 8, 4).try_into().unwrap());
                let reply_at = BUFS + u64::from(id as u16 / 2) * 0x4000 + 0x2000;
                let error = i32::from_le_bytes(self.read(reply_at + 4, 4).try_into().unwrap());
                out.push((id as u16, error));
                self.seen_used = self.seen_used.wrapping_add(1);
            }
            if Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    }
}

fn memfd(len: usize) -> File {
    // SAFETY: a valid name; the fd is owned by the File.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: a fresh fd.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len as u64).unwrap();
    f
}

fn init_request() -> Vec<u8> {
    let mut body = Vec::new();
    for v in [7u32, 31, 1 << 20, 0] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.extend_from_slice(&[0u8; 48]);
    fuse_request(INIT, 1, 0, &body)
}

struct Setup {
    front: Arc<Mutex<Front>>,
    frontend: Frontend,
    guest: Guest,
    fs: Arc<Fs>,
    server: Arc<Server<Arc<Fs>>>,
    inflight: Arc<Inflight>,
    journal: Arc<Journal>,
}

fn setup() -> Setup {
    let front = Front::new(FrontConfig {
        request_queues: 1,
        queue_size: NUM,
    })
    .unwrap();
    let inflight = front.inflight().clone();
    let front = Arc::new(Mutex::new(front));
    let (vmm, backend) = UnixStream::pair().unwrap();
    let handler_front = front.clone();
    std::thread::spawn(move || {
        let mut handler = BackendReqHandler::from_stream(backend, handler_front);
        while handler.handle_request().is_ok() {}
    });
    let frontend = Frontend::from_stream(vmm, 2);
    frontend.set_owner().unwrap();
    let features = frontend.get_features().unwrap();
    frontend.set_features(features).unwrap();
    let mut fe = frontend.clone();
    let proto = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        proto & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK),
    )
    .unwrap();
    let guest_mem = memfd(MEM);
    // SAFETY: maps the guest memfd shared, as the VMM would.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            MEM,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            guest_mem.as_raw_fd(),
            0,
        )
    };
    assert_ne!(mem, libc::MAP_FAILED);
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: UADDR,
            mmap_offset: 0,
            mmap_handle: guest_mem.as_raw_fd(),
        }])
        .unwrap();
    let (kick, call) = (
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
    );
    for q in 0..2usize {
        frontend.set_vring_num(q, NUM).unwrap();
        frontend
            .set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: NUM,
                    queue_size: NUM,
                    flags: 0,
                    desc_table_addr: UADDR + DESC + if q == 0 { 0x4000 } else { 0 },
                    used_ring_addr: UADDR + USED + if q == 0 { 0x4000 } else { 0 },
                    avail_ring_addr: UADDR + AVAIL + if q == 0 { 0x4000 } else { 0 },
                    log_addr: None,
                },
            )
            .unwrap();
        frontend.set_vring_base(q, 0).unwrap();
    }
    frontend.set_vring_call(1, &call).unwrap();
    frontend.set_vring_kick(1, &kick).unwrap();
    fe.set_vring_enable(1, true).unwrap();
    let fs = Arc::new(Fs {
        stuck_once: AtomicBool::new(false),
        mkdirs: AtomicU32::new(0),
        lookups: Mutex::default(),
    });
    let server = Arc::new(Server::new(fs.clone()));
    let journal = Arc::new(Journal {
        replies: Mutex::default(),
        die_once: AtomicBool::new(false),
    });
    Setup {
        front,
        frontend,
        guest: Guest {
            mem: mem.cast(),
            next_avail: 0,
            seen_used: 0,
            call,
            kick,
        },
        fs,
        server,
        inflight,
        journal,
    }
}

/// Attaches a new ring server (an engine generation) to the front.
fn attach(s: &Setup) {
    let rings = Rings::new(
        s.server.clone(),
        Arc::new(Inflight::open(s.inflight.file().try_clone().unwrap()).unwrap()),
        s.journal.clone(),
    );
    let mut front = s.front.lock().unwrap();
    front
        .attach(Box::new(Local { rings: Some(rings) }))
        .unwrap();
}

/// The engine dies: its link goes, its stuck thread stays stuck (as a dead process would).
fn engine_dies(s: &Setup) {
    let link = s.front.lock().unwrap().detach();
    // A dead engine's threads never run again; never join them.
    std::mem::forget(link);
}

#[test]
fn a_successor_answers_what_a_dead_engine_took_exactly_once() {
    let mut s = setup();
    attach(&s);
    s.guest.post(0, &init_request());
    assert_eq!(s.guest.answers(1, Duration::from_secs(5)), vec![(0, 0)]);
    // Three lookups; the engine gets stuck on the second.
    s.guest.post(1, &fuse_request(LOOKUP, 11, 1, b"before\0"));
    s.guest.post(2, &fuse_request(LOOKUP, 12, 1, b"stuck\0"));
    s.guest.post(3, &fuse_request(LOOKUP, 13, 1, b"after\0"));
    let first = s.guest.answers(1, Duration::from_secs(5));
    assert_eq!(first, vec![(2, 0)], "the first lookup is answered");
    assert!(
        s.guest.answers(1, Duration::from_millis(300)).is_empty(),
        "stuck"
    );
    engine_dies(&s);
    // The VMM goes on talking to the front meanwhile: its socket is open.
    assert!(s.frontend.get_features().is_ok());
    // The successor takes over.
    attach(&s);
    let mut rest = s.guest.answers(2, Duration::from_secs(5));
    rest.sort_unstable();
    assert_eq!(
        rest,
        vec![(4, 0), (6, 0)],
        "the taken request and the queued one"
    );
    let lookups = s.fs.lookups.lock().unwrap().clone();
    assert_eq!(
        lookups.get("stuck"),
        Some(&2),
        "the stuck one served again once"
    );
    assert_eq!(
        lookups.get("before"),
        Some(&1),
        "an answered one never again"
    );
    assert_eq!(lookups.get("after"), Some(&1));
    assert!(
        s.guest.answers(1, Duration::from_millis(200)).is_empty(),
        "no duplicate answer"
    );
    // And it goes on serving.
    s.guest.post(4, &fuse_request(LOOKUP, 14, 1, b"later\0"));
    assert_eq!(s.guest.answers(1, Duration::from_secs(5)), vec![(8, 0)]);
    // GET_VRING_BASE: the ring stops at the avail position the guest reached.
    let base = s.frontend.get_vring_base(1).unwrap();
    assert_eq!(base, 5);
}

#[test]
fn a_journaled_request_is_answered_from_the_journal_not_applied_again() {
    let mut s = setup();
    attach(&s);
    s.guest.post(0, &init_request());
    assert_eq!(s.guest.answers(1, Duration::from_secs(5)).len(), 1);
    let mut mkdir = vec![0u8; 8];
    mkdir.extend_from_slice(b"made-once\0");
    s.guest.post(1, &fuse_request(MKDIR, 21, 1, &mkdir));
    // Applied and journaled; the engine dies before answering.
    assert!(s.guest.answers(1, Duration::from_millis(500)).is_empty());
    assert_eq!(s.fs.mkdirs.load(Ordering::SeqCst), 1);
    engine_dies(&s);
    attach(&s);
    assert_eq!(s.guest.answers(1, Duration::from_secs(5)), vec![(2, 0)]);
    assert_eq!(
        s.fs.mkdirs.load(Ordering::SeqCst),
        1,
        "the resubmitted mkdir was not applied twice"
    );
}

#[test]
fn kicks_while_no_engine_runs_are_served_by_the_next() {
    let mut s = setup();
    attach(&s);
    s.guest.post(0, &init_request());
    assert_eq!(s.guest.answers(1, Duration::from_secs(5)).len(), 1);
    // An upgrade: the engine stops cleanly between requests.
    let link = s.front.lock().unwrap().detach();
    drop(link);
    s.guest
        .post(1, &fuse_request(LOOKUP, 31, 1, b"while-away\0"));
    assert!(s.guest.answers(1, Duration::from_millis(200)).is_empty());
    attach(&s);
    assert_eq!(s.guest.answers(1, Duration::from_secs(5)), vec![(2, 0)]);
    // The guest was signalled.
    assert!(s.guest.call.read().is_ok());
}
