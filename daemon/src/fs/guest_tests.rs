//! A hostile guest against the filesystem, through a virtio-fs queue in plain memory: sizes
//! up to 4 GiB, aliased descriptors and loops are bounded before anything is fetched or
//! allocated; each door (the FUSE door, each VMM) reaches only its own handles, each handle
//! only its inode, and a door holds at most so many; a VMM that leaves loses its unfinished
//! writes (never committed half-written) and frees the files for the pods; shutdown aborts
//! what was never flushed; a create never replaces an object that appeared meanwhile.

use std::sync::Arc;

use async_trait::async_trait;
use berth_vhost::testing::{check_reply, fuse_request, RawDescriptor, TestQueue, BUFFERS};
use berth_vhost::testing::{F_NEXT, F_WRITE};
use bytes::Bytes;
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;

use super::{AttrConfig, BerthFs, FsConfig, MAX_IO};
use crate::memory::MemoryLimiter;
use crate::namespace::Namespace;
use crate::prefetch::{Fetcher, PrefetchConfig};
use crate::store::{ListPage, LocalStore, ObjectInfo, ObjectStore, StoreResult, UploadedPart};
use crate::upload::SpoolDir;

const LOOKUP: u32 = 1;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const RELEASE: u32 = 18;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const CREATE: u32 = 35;
const OUT_HEADER: usize = 16;
const ENTRY_OUT: usize = 128;

/// A local directory that does not offer its files for direct reads: reads take the path of
/// a remote store (prefetch, block fetches, the memory budget), as S3's do.
struct Remote(LocalStore);

#[async_trait]
impl ObjectStore for Remote {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn is_reserved(&self, key: &str) -> bool {
        self.0.is_reserved(key)
    }
    async fn check(&self, prefix: &str) -> StoreResult<()> {
        self.0.check(prefix).await
    }
    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        self.0.head(key).await
    }
    async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<Bytes> {
        self.0.get_range(key, range, etag).await
    }
    async fn list(&self, prefix: &str, token: Option<&str>, max: usize) -> StoreResult<ListPage> {
        self.0.list(prefix, token, max).await
    }
    async fn put(
        &self,
        key: &str,
        body: Bytes,
        meta: &crate::store::PosixMeta,
    ) -> StoreResult<Option<String>> {
        self.0.put(key, body, meta).await
    }
    async fn create_upload(
        &self,
        key: &str,
        meta: &crate::store::PosixMeta,
    ) -> StoreResult<String> {
        self.0.create_upload(key, meta).await
    }
    async fn set_meta(
        &self,
        key: &str,
        etag: Option<&str>,
        size: u64,
        meta: &crate::store::PosixMeta,
    ) -> StoreResult<Option<String>> {
        self.0.set_meta(key, etag, size, meta).await
    }
    async fn upload_part(
        &self,
        key: &str,
        id: &str,
        n: i32,
        body: Bytes,
    ) -> StoreResult<UploadedPart> {
        self.0.upload_part(key, id, n, body).await
    }
    async fn complete_upload(
        &self,
        key: &str,
        id: &str,
        parts: &[UploadedPart],
    ) -> StoreResult<Option<String>> {
        self.0.complete_upload(key, id, parts).await
    }
    async fn abort_upload(&self, key: &str, id: &str) -> StoreResult<()> {
        self.0.abort_upload(key, id).await
    }
    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.0.delete(key).await
    }
    async fn copy(&self, from: &str, to: &str) -> StoreResult<()> {
        self.0.copy(from, to).await
    }
}

struct Setup {
    dir: tempfile::TempDir,
    _rt: tokio::runtime::Runtime,
    fs: Arc<BerthFs>,
    memory: Arc<MemoryLimiter>,
    _spool_dir: tempfile::TempDir,
}

fn setup(memory_limit: u64, remote: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let local = LocalStore::open(dir.path()).unwrap();
    let store: Arc<dyn ObjectStore> = if remote {
        Arc::new(Remote(local))
    } else {
        Arc::new(local)
    };
    let ns = Arc::new(
        Namespace::new(
            store.clone(),
            String::new(),
            Some(std::time::Duration::ZERO),
            None,
        )
        .unwrap(),
    );
    let memory = MemoryLimiter::new(memory_limit);
    let fetcher = Fetcher::new(store, memory.clone(), PrefetchConfig::default(), None);
    let config = FsConfig {
        read_only: false,
        part_size: 1 << 20,
        attr: AttrConfig {
            uid: 0,
            gid: 0,
            file_mode: 0o644,
            dir_mode: 0o755,
            ignore_stored: false,
        },
    };
    let spool_dir = tempfile::tempdir().unwrap();
    let fs = Arc::new(BerthFs::new(
        rt.handle().clone(),
        ns,
        fetcher,
        memory.clone(),
        config,
        Arc::new(SpoolDir::new(spool_dir.path().join("writes"))),
    ));
    Setup {
        dir,
        _spool_dir: spool_dir,
        _rt: rt,
        fs,
        memory,
    }
}

/// One door's queue: its server and a queue in plain memory, FUSE INIT done.
struct Door<F: FileSystem + Sync> {
    server: Server<F>,
    queue: TestQueue,
    unique: u64,
}

impl<F: FileSystem + Sync> Door<F> {
    fn new(fs: F) -> Door<F> {
        let mut door = Door {
            server: Server::new(fs),
            queue: TestQueue::new(),
            unique: 1,
        };
        let mut init = Vec::new();
        for v in [7u32, 31, 1 << 20, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        init.extend_from_slice(&[0u8; 48]);
        door.call(INIT, 0, &init).unwrap();
        door
    }

    /// One request; Ok(reply body) or Err(errno).
    fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Result<Vec<u8>, i32> {
        self.unique += 1;
        let room = 64 << 10;
        let (len, reply) = self.queue.request(
            &self.server,
            &fuse_request(opcode, self.unique, nodeid, body),
            room,
        );
        let header = check_reply(len, room, &reply, Some(self.unique))
            .unwrap()
            .expect("a reply");
        if header.error != 0 {
            return Err(-header.error);
        }
        Ok(reply[OUT_HEADER..len as usize].to_vec())
    }

    fn lookup(&mut self, name: &str) -> Result<u64, i32> {
        let body = format!("{name}\0");
        self.call(LOOKUP, 1, body.as_bytes()).map(|e| u64_at(&e, 0))
    }

    fn open(&mut self, nodeid: u64, flags: i32) -> Result<u64, i32> {
        let mut body = (flags as u32).to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 4]);
        self.call(OPEN, nodeid, &body).map(|o| u64_at(&o, 0))
    }

    /// (nodeid, fh)
    fn create(&mut self, name: &str, flags: i32) -> Result<(u64, u64), i32> {
        let mut body = Vec::new();
        for v in [flags as u32, libc::S_IFREG | 0o644, 0, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        body.extend_from_slice(name.as_bytes());
        body.push(0);
        self.call(CREATE, 1, &body)
            .map(|r| (u64_at(&r, 0), u64_at(&r, ENTRY_OUT)))
    }

    fn write(&mut self, nodeid: u64, fh: u64, offset: u64, data: &[u8]) -> Result<(), i32> {
        self.write_claiming(nodeid, fh, offset, data.len() as u32, data)
    }

    fn write_claiming(
        &mut self,
        nodeid: u64,
        fh: u64,
        offset: u64,
        size: u32,
        data: &[u8],
    ) -> Result<(), i32> {
        let mut body = Vec::new();
        body.extend_from_slice(&fh.to_le_bytes());
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&[0u8; 20]);
        body.extend_from_slice(data);
        self.call(WRITE, nodeid, &body).map(|_| ())
    }

    fn read_in(fh: u64, offset: u64, size: u32) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&fh.to_le_bytes());
        body.extend_from_slice(&offset.to_le_bytes());
        body.extend_from_slice(&size.to_le_bytes());
        body.extend_from_slice(&[0u8; 20]);
        body
    }

    fn read(&mut self, nodeid: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        self.call(READ, nodeid, &Self::read_in(fh, offset, size))
    }

    fn flush(&mut self, nodeid: u64, fh: u64) -> Result<(), i32> {
        let mut body = fh.to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 16]);
        self.call(FLUSH, nodeid, &body).map(|_| ())
    }

    fn release(&mut self, nodeid: u64, fh: u64) -> Result<(), i32> {
        let mut body = fh.to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 16]);
        self.call(RELEASE, nodeid, &body).map(|_| ())
    }
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn guest_sizes_are_bounded_before_anything_is_fetched_or_allocated() {
    let limit = 16 << 20;
    let s = setup(limit, true);
    std::fs::write(s.dir.path().join("big"), vec![7u8; 32 << 20]).unwrap();
    let mut guest = Door::new(s.fs.door(1));
    let ino = guest.lookup("big").unwrap();
    let fh = guest.open(ino, libc::O_RDONLY).unwrap();
    let before = rss_kib();

    // READ of 4 GiB with a 4 KiB reply buffer: 4 KiB come back.
    let request = fuse_request(READ, 900, ino, &Door::<BerthFs>::read_in(fh, 0, u32::MAX));
    let (len, reply) = guest.queue.request(&guest.server, &request, 4096);
    let header = check_reply(len, 4096, &reply, Some(900)).unwrap().unwrap();
    assert_eq!(header.error, 0);
    assert!(len as usize <= 4096, "a reply of {len} bytes in 4 KiB");

    // READ of 4 GiB into 15 writable descriptors aliasing the same 900 KiB of guest memory
    // (13.5 MiB of "room"): at most MAX_IO.
    guest.queue.write_buffer(BUFFERS, &request);
    let mut descs = vec![RawDescriptor {
        addr: BUFFERS,
        len: request.len() as u32,
        flags: F_NEXT,
        next: 1,
    }];
    for i in 1..15u16 {
        descs.push(RawDescriptor {
            addr: BUFFERS + 4096,
            len: 900 << 10,
            flags: F_WRITE | if i < 14 { F_NEXT } else { 0 },
            next: i + 1,
        });
    }
    let len = guest.queue.serve(&guest.server, &descs, 0).unwrap();
    assert!(
        len as usize <= MAX_IO + OUT_HEADER,
        "an aliased 4 GiB READ returned {len} bytes"
    );

    // WRITE claiming 4 GiB with 10 bytes of data: refused before anything is allocated.
    let (wino, wfh) = guest
        .create("out", libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)
        .unwrap();
    assert_eq!(
        guest.write_claiming(wino, wfh, 0, u32::MAX, b"0123456789"),
        Err(libc::EINVAL)
    );
    // A request whose readable part aliases 15 x 900 KiB: refused by the queue, answered.
    let write = fuse_request(
        WRITE,
        901,
        wino,
        &Door::<BerthFs>::read_in(wfh, 0, 15 * (900 << 10)),
    );
    guest.queue.write_buffer(BUFFERS, &write);
    let mut descs = vec![RawDescriptor {
        addr: BUFFERS,
        len: write.len() as u32,
        flags: F_NEXT,
        next: 1,
    }];
    for i in 1..15u16 {
        descs.push(RawDescriptor {
            addr: BUFFERS + 4096,
            len: 900 << 10,
            flags: F_NEXT,
            next: i + 1,
        });
    }
    descs.push(RawDescriptor {
        addr: BUFFERS + 4096 + (900 << 10) + 4096,
        len: 64,
        flags: F_WRITE,
        next: 0,
    });
    let len = guest.queue.serve(&guest.server, &descs, 0).unwrap();
    assert_eq!(len as usize, OUT_HEADER, "an error reply");
    // A descriptor loop: served (or dropped) without hanging.
    let loop_descs = [RawDescriptor {
        addr: BUFFERS,
        len: 64,
        flags: F_NEXT,
        next: 0,
    }];
    let _ = guest.queue.serve(&guest.server, &loop_descs, 0);

    // The engine's memory stayed inside its budget, and the guest's requests did not grow
    // this process by anything like what they asked for.
    assert!(
        s.memory.peak() <= limit,
        "memory peak {} over {limit}",
        s.memory.peak()
    );
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 256 << 10, "RSS grew by {grown} KiB");
    // And it keeps serving.
    let fh2 = guest.open(ino, libc::O_RDONLY).unwrap();
    assert_eq!(guest.read(ino, fh2, 0, 4).unwrap(), vec![7u8; 4]);
}

#[test]
fn a_guest_reaches_only_its_own_handles_and_each_handle_only_its_inode() {
    let s = setup(1 << 30, false);
    std::fs::write(s.dir.path().join("other"), b"other file").unwrap();
    let mut pod = Door::new(s.fs.clone());
    let (ino, fh) = pod
        .create("pod-file", libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)
        .unwrap();
    pod.write(ino, fh, 0, b"written by the pod").unwrap();
    let mut guest = Door::new(s.fs.door(1));
    // The guest names the pod's handle: nothing of the pod's is reached.
    assert_eq!(guest.write(ino, fh, 18, b"injected"), Err(libc::EBADF));
    assert_eq!(guest.flush(ino, fh), Err(libc::EBADF));
    let _ = guest.release(ino, fh);
    assert!(
        !s.dir.path().join("pod-file").exists(),
        "the guest committed the pod's file"
    );
    // A handle names one inode: used with another, it is no handle.
    let other = pod.lookup("other").unwrap();
    assert_eq!(pod.write(other, fh, 18, b"x"), Err(libc::EBADF));
    assert_eq!(pod.flush(other, fh), Err(libc::EBADF));
    pod.flush(ino, fh).unwrap();
    assert_eq!(
        std::fs::read(s.dir.path().join("pod-file")).unwrap(),
        b"written by the pod"
    );
}

#[test]
fn a_vmm_that_leaves_aborts_its_writes_and_frees_the_files() {
    let s = setup(1 << 30, false);
    std::fs::write(s.dir.path().join("kept"), b"the old object").unwrap();
    let mut guest = Door::new(s.fs.door(1));
    let (new_ino, new_fh) = guest
        .create("half", libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)
        .unwrap();
    guest.write(new_ino, new_fh, 0, b"half of a file").unwrap();
    let kept = guest.lookup("kept").unwrap();
    let kfh = guest.open(kept, libc::O_WRONLY | libc::O_TRUNC).unwrap();
    guest.write(kept, kfh, 0, b"new").unwrap();
    let mut pod = Door::new(s.fs.clone());
    assert_eq!(
        pod.open(kept, libc::O_RDONLY),
        Err(libc::EBUSY),
        "busy while the guest writes it"
    );
    drop(guest); // the VMM left
    assert!(
        !s.dir.path().join("half").exists(),
        "a half-written file was committed"
    );
    assert_eq!(
        std::fs::read(s.dir.path().join("kept")).unwrap(),
        b"the old object"
    );
    let fh = pod
        .open(kept, libc::O_RDONLY)
        .expect("no longer busy for the pods");
    assert_eq!(pod.read(kept, fh, 0, 100).unwrap(), b"the old object");
}

#[test]
fn a_door_holds_at_most_so_many_handles() {
    let s = setup(1 << 30, false);
    std::fs::write(s.dir.path().join("f"), b"x").unwrap();
    let guest = s.fs.door(1);
    let ctx = fuse_backend_rs::api::filesystem::Context::default();
    let ino = guest.lookup(&ctx, 1, c"f").map(|e| e.inode).unwrap();
    let mut opened = 0;
    let err = loop {
        match guest.open(&ctx, ino, libc::O_RDONLY as u32, 0) {
            Ok(_) => opened += 1,
            Err(e) => break e,
        }
        assert!(opened <= super::MAX_GUEST_HANDLES, "no cap");
    };
    assert_eq!(err.raw_os_error(), Some(libc::EMFILE));
    assert_eq!(opened, super::MAX_GUEST_HANDLES);
    // Another door is not affected.
    assert!(s.fs.open(&ctx, ino, libc::O_RDONLY as u32, 0).is_ok());
}

#[test]
fn shutdown_aborts_what_was_never_flushed_and_keeps_what_was() {
    let s = setup(1 << 30, false);
    let mut pod = Door::new(s.fs.clone());
    let (a, afh) = pod
        .create("unfinished", libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)
        .unwrap();
    pod.write(a, afh, 0, b"half").unwrap();
    let (b, bfh) = pod
        .create("closed", libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC)
        .unwrap();
    pod.write(b, bfh, 0, b"whole").unwrap();
    pod.flush(b, bfh).unwrap();
    s.fs.shutdown();
    assert!(
        !s.dir.path().join("unfinished").exists(),
        "committed half-written at shutdown"
    );
    assert_eq!(
        std::fs::read(s.dir.path().join("closed")).unwrap(),
        b"whole"
    );
}

#[test]
fn a_create_never_replaces_an_object_that_appeared_meanwhile() {
    let s = setup(1 << 30, false);
    let mut pod = Door::new(s.fs.clone());
    // The kernel looked the name up (negative), then another client made the object.
    assert!(
        matches!(pod.lookup("log"), Err(libc::ENOENT) | Ok(0)),
        "a negative lookup"
    );
    std::fs::write(s.dir.path().join("log"), b"another client's data").unwrap();
    // open(O_CREAT|O_WRONLY|O_APPEND) and open(O_CREAT|O_WRONLY): the existing object is
    // opened for appending; closed with nothing written, it is left as it was.
    for flags in [
        libc::O_CREAT | libc::O_WRONLY | libc::O_APPEND,
        libc::O_CREAT | libc::O_WRONLY,
    ] {
        let (ino, fh) = pod.create("log", flags).unwrap();
        pod.flush(ino, fh).unwrap();
        pod.release(ino, fh).unwrap();
    }
    assert_eq!(
        pod.create("log", libc::O_CREAT | libc::O_EXCL).map(|_| ()),
        Err(libc::EEXIST)
    );
    let (ino, fh) = pod.create("log", libc::O_CREAT | libc::O_RDONLY).unwrap();
    assert_eq!(pod.read(ino, fh, 0, 100).unwrap(), b"another client's data");
    assert_eq!(
        std::fs::read(s.dir.path().join("log")).unwrap(),
        b"another client's data"
    );
    // O_TRUNC still replaces, as asked.
    let (ino, fh) = pod
        .create("log", libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC)
        .unwrap();
    pod.write(ino, fh, 0, b"new").unwrap();
    pod.flush(ino, fh).unwrap();
    assert_eq!(std::fs::read(s.dir.path().join("log")).unwrap(), b"new");
}

#[test]
fn a_guest_cannot_lose_a_file_by_renaming_it_onto_itself_or_hide_one_under_a_name() {
    let s = setup(1 << 30, false);
    std::fs::write(s.dir.path().join("f"), b"keep").unwrap();
    let guest = s.fs.door(1);
    let ctx = fuse_backend_rs::api::filesystem::Context::default();
    let ino = guest.lookup(&ctx, 1, c"f").unwrap().inode;
    guest.rename(&ctx, 1, c"f", 1, c"f", 0).unwrap();
    assert_eq!(std::fs::read(s.dir.path().join("f")).unwrap(), b"keep");
    // A file is no directory: nothing is made below it (it would vanish from view).
    let err = guest.mkdir(&ctx, ino, c"sub", 0o755, 0).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
    let args = fuse_backend_rs::abi::fuse_abi::CreateIn {
        flags: (libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC) as u32,
        mode: 0o644,
        umask: 0,
        fuse_flags: 0,
    };
    let err = guest.create(&ctx, ino, c"sub", args).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTDIR));
    assert!(s.dir.path().join("f").is_file(), "the file is still a file");
}
