//! Tests of the local store, each run once per resolver (openat2 and the component walk), with
//! real symlinks, FIFOs, sockets and device nodes and real threads racing: the hostile
//! directory the audit described, and the honest one that must see no change.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, FileExt, FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Instant;

use super::*;

/// Runs each named `async fn(Resolver)` (or plain `fn(Resolver)` with `sync`) once per resolver.
macro_rules! both_resolvers {
    (sync $($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn openat2() {
                super::$name(super::Resolver::Openat2)
            }
            #[test]
            fn walk() {
                super::$name(super::Resolver::Walk)
            }
        }
    )*};
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn openat2() {
                super::$name(super::Resolver::Openat2).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn walk() {
                super::$name(super::Resolver::Walk).await
            }
        }
    )*};
}

both_resolvers!(
    lists_in_s3_order_with_pages_and_markers,
    multipart_upload_assembles_parts_in_order,
    listing_below_a_file_or_a_missing_path_is_empty,
    refuses_keys_that_escape_the_root,
    honest_operations_keep_their_behaviour,
    symlinks_are_never_followed_for_reads,
    writes_never_go_through_symlinks,
    deletes_never_go_through_symlinks,
    special_files_are_not_served_and_never_opened,
    skipped_entries_are_counted_once_per_listing,
    staging_dir_is_unreachable,
);
both_resolvers!(sync race_with_symlink_swaps_never_leaves_the_root);

/// The store, asserting it resolves as asked (openat2 only where the kernel has it).
fn open_store(dir: &Path, resolver: Resolver) -> LocalStore {
    let store = LocalStore::open_with(dir, resolver).unwrap();
    if resolver == Resolver::Walk || openat2_supported() {
        assert_eq!(store.resolver(), resolver);
    }
    store
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn mkfifo(path: &Path) {
    let c = cstring(path);
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let ret = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    assert_eq!(
        ret,
        0,
        "mkfifo {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A device node (`S_IFCHR` or `S_IFBLK`); needs root.
fn mknod(path: &Path, kind: libc::mode_t, major: u32, minor: u32) {
    let c = cstring(path);
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    let ret = unsafe { libc::mknod(c.as_ptr(), kind | 0o600, libc::makedev(major, minor)) };
    assert_eq!(
        ret,
        0,
        "mknod {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
}

/// Counts real opens (not `O_PATH` ones, which open nothing) of the watched files.
struct OpenWatch(OwnedFd);

impl OpenWatch {
    fn new(paths: &[PathBuf]) -> OpenWatch {
        // SAFETY: inotify_init1 has no pointer arguments.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1: {}", io::Error::last_os_error());
        // SAFETY: the kernel just returned this fd; nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        for path in paths {
            let c = cstring(path);
            // SAFETY: `c` is NUL-terminated and outlives the call; `fd` is an inotify fd.
            let wd = unsafe {
                libc::inotify_add_watch(
                    fd.as_raw_fd(),
                    c.as_ptr(),
                    libc::IN_OPEN | libc::IN_DONT_FOLLOW,
                )
            };
            assert!(
                wd >= 0,
                "watch {}: {}",
                path.display(),
                io::Error::last_os_error()
            );
        }
        OpenWatch(fd)
    }

    /// Open events seen since the last call.
    fn opens(&self) -> usize {
        let mut buf = [0u8; 4096];
        let mut events = 0;
        loop {
            // SAFETY: `buf` is valid for writes of its length; the fd is non-blocking.
            let n = unsafe { libc::read(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                return events;
            }
            let mut at = 0;
            while at + std::mem::size_of::<libc::inotify_event>() <= n as usize {
                // SAFETY: the kernel wrote whole events; read_unaligned copes with alignment.
                let ev: libc::inotify_event =
                    unsafe { std::ptr::read_unaligned(buf[at..].as_ptr().cast()) };
                if ev.mask & libc::IN_OPEN != 0 {
                    events += 1;
                }
                at += std::mem::size_of::<libc::inotify_event>() + ev.len as usize;
            }
        }
    }
}

/// `fut`, failing the test if it takes over 5 s (a worker hung on a FIFO): the FIFO is then
/// opened for writing, which lets the hung open return, before the test fails.
async fn no_hang<T>(fifo: &Path, what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(v) => v,
        Err(_) => {
            let _ = OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(fifo);
            panic!("{what} hung on the FIFO");
        }
    }
}

/// Every file below `dir` (not following symlinks) with its bytes, symlinks as `-> target`.
fn tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in fs::read_dir(dir).unwrap() {
            let entry = entry.unwrap();
            let path = entry.path();
            let rel = path
                .strip_prefix(base)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let kind = fs::symlink_metadata(&path).unwrap().file_type();
            if kind.is_dir() {
                out.insert(format!("{rel}/"), Vec::new());
                walk(base, &path, out);
            } else if kind.is_symlink() {
                let target = fs::read_link(&path).unwrap();
                out.insert(rel, format!("-> {}", target.display()).into_bytes());
            } else if kind.is_file() {
                out.insert(rel, fs::read(&path).unwrap());
            } else {
                out.insert(rel, b"(special)".to_vec());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn object_keys(page: &ListPage) -> Vec<&str> {
    page.objects.iter().map(|o| o.key.as_str()).collect()
}

fn not_found<T: std::fmt::Debug>(what: &str, got: StoreResult<T>) {
    assert!(matches!(got, Err(StoreError::NotFound)), "{what}: {got:?}");
}

// ---- Behaviour an honest client relies on (unchanged) ----

async fn lists_in_s3_order_with_pages_and_markers(resolver: Resolver) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), resolver);
    for key in ["b", "a-1", "a/x", "c/"] {
        store
            .put(key, Bytes::from_static(b"hi"), &PosixMeta::default())
            .await
            .unwrap();
    }
    let page = store.list("", None, 2).await.unwrap();
    assert_eq!(object_keys(&page), ["a-1"]);
    assert_eq!(page.prefixes, ["a/"]);
    let page = store
        .list("", page.next_token.as_deref(), 10)
        .await
        .unwrap();
    assert_eq!(page.objects[0].key, "b");
    assert_eq!(page.prefixes, ["c/"]);
    assert!(page.next_token.is_none());
    assert_eq!(page.skipped, 0);
}

async fn multipart_upload_assembles_parts_in_order(resolver: Resolver) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), resolver);
    let id = store
        .create_upload("d/f", &PosixMeta::default())
        .await
        .unwrap();
    let p2 = store
        .upload_part("d/f", &id, 2, Bytes::from_static(b"world"))
        .await
        .unwrap();
    let p1 = store
        .upload_part("d/f", &id, 1, Bytes::from_static(b"hello "))
        .await
        .unwrap();
    // A part sent again replaces the first one whole.
    let p1 = store
        .upload_part("d/f", &id, 1, Bytes::from_static(b"hello "))
        .await
        .map(|again| {
            assert_eq!(again, p1);
            again
        })
        .unwrap();
    let etag = store.complete_upload("d/f", &id, &[p1, p2]).await.unwrap();
    assert_eq!(fs::read(dir.path().join("d/f")).unwrap(), b"hello world");
    let info = store.head("d/f").await.unwrap();
    assert_eq!(info.etag, etag);
    let got = store
        .get_range("d/f", 6..11, info.etag.as_deref())
        .await
        .unwrap();
    assert_eq!(&got[..], b"world");
    assert!(store.list("", None, 10).await.unwrap().prefixes == ["d/"]);
    let uploads = dir.path().join(UPLOADS_DIR);
    assert_eq!(
        fs::read_dir(&uploads).unwrap().count(),
        0,
        "upload dir removed"
    );
}

/// Regression: a lookup lists `name/` to see whether `name` is a directory; for a file
/// that must be an empty listing, not an error (it made `cat FILE` fail with EIO).
async fn listing_below_a_file_or_a_missing_path_is_empty(resolver: Resolver) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), resolver);
    store
        .put("f", Bytes::from_static(b"x"), &PosixMeta::default())
        .await
        .unwrap();
    for prefix in ["f/", "missing/", "f/deeper/"] {
        let page = store.list(prefix, None, 10).await.unwrap();
        assert!(
            page.objects.is_empty() && page.prefixes.is_empty(),
            "{prefix}"
        );
    }
}

async fn refuses_keys_that_escape_the_root(resolver: Resolver) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), resolver);
    for key in ["../x", "a/../../x", "a//b", "./a"] {
        assert!(
            matches!(store.head(key).await, Err(StoreError::Rejected(_))),
            "{key}"
        );
    }
}

async fn honest_operations_keep_their_behaviour(resolver: Resolver) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = open_store(root, resolver);
    let etag = store
        .put(
            "a/b/c.txt",
            Bytes::from_static(b"0123456789"),
            &PosixMeta::default(),
        )
        .await
        .unwrap();
    let meta = fs::metadata(root.join("a/b/c.txt")).unwrap();
    use std::os::unix::fs::MetadataExt;
    let want = format!(
        "\"{:x}-{:x}-{:x}\"",
        meta.ino(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
        meta.len()
    );
    assert_eq!(
        etag.as_deref(),
        Some(want.as_str()),
        "etag format unchanged"
    );
    let info = store.head("a/b/c.txt").await.unwrap();
    assert_eq!((info.size, info.etag.clone()), (10, etag.clone()));
    assert_eq!(info.last_modified, meta.modified().unwrap());
    assert_eq!(
        &store.get_range("a/b/c.txt", 2..5, None).await.unwrap()[..],
        b"234"
    );
    assert_eq!(
        &store.get_range("a/b/c.txt", 8..100, None).await.unwrap()[..],
        b"89"
    );
    assert!(matches!(
        store.get_range("a/b/c.txt", 0..1, Some("\"other\"")).await,
        Err(StoreError::Changed)
    ));
    let mut buf = [0u8; 3];
    let file = store
        .open_local("a/b/c.txt", etag.as_deref())
        .unwrap()
        .unwrap();
    file.read_exact_at(&mut buf, 7).unwrap();
    assert_eq!(&buf, b"789");
    // Directories: markers, head with and without the slash.
    assert_eq!(
        store
            .put("m/", Bytes::new(), &PosixMeta::default())
            .await
            .unwrap(),
        None
    );
    assert!(root.join("m").is_dir());
    store.head("m/").await.unwrap();
    not_found("head of a dir without /", store.head("m").await);
    not_found("head of a file with /", store.head("a/b/c.txt/").await);
    not_found("get of a directory", store.get_range("m", 0..1, None).await);
    not_found("missing", store.head("nope").await);
    // Rename = copy + delete.
    store.copy("a/b/c.txt", "z/copied").await.unwrap();
    assert_eq!(fs::read(root.join("z/copied")).unwrap(), b"0123456789");
    store.delete("a/b/c.txt").await.unwrap();
    assert!(!root.join("a/b/c.txt").exists());
    store.delete("a/b/c.txt").await.unwrap(); // missing: succeeds, as in S3
    store.delete("no/such/dir/file").await.unwrap();
    store.delete("m/").await.unwrap();
    assert!(!root.join("m").exists());
    // A non-empty directory is not removed.
    assert!(matches!(
        store.delete("z/").await,
        Err(StoreError::Rejected(_))
    ));
    // Replacing a file.
    store
        .put(
            "z/copied",
            Bytes::from_static(b"new"),
            &PosixMeta::default(),
        )
        .await
        .unwrap();
    assert_eq!(fs::read(root.join("z/copied")).unwrap(), b"new");
    // Nothing staged is left behind.
    assert_eq!(fs::read_dir(root.join(UPLOADS_DIR)).unwrap().count(), 0);
    store.check("").await.unwrap();
}

// ---- The hostile directory ----

/// A root with symlinks out of it and an outside directory holding a root-only secret.
struct Hostile {
    _root: tempfile::TempDir,
    _outside: tempfile::TempDir,
    root: PathBuf,
    outside: PathBuf,
}

const SECRET: &[u8] = b"root-only secret, never served";

impl Hostile {
    fn new() -> Hostile {
        let outside_dir = tempfile::Builder::new()
            .prefix("berth-outside-")
            .tempdir()
            .unwrap();
        let outside = outside_dir.path().canonicalize().unwrap();
        fs::write(outside.join("secret"), SECRET).unwrap();
        fs::set_permissions(outside.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::create_dir(outside.join("cron.d")).unwrap();
        fs::write(outside.join("cron.d/existing"), b"keep").unwrap();
        let root_dir = tempfile::tempdir().unwrap();
        let root = root_dir.path().canonicalize().unwrap();
        symlink(&outside, root.join("x")).unwrap(); // like x -> /etc
        symlink(outside.join("secret"), root.join("s")).unwrap();
        symlink(outside.join("cron.d"), root.join("dirlink")).unwrap();
        let up = format!("../{}", outside.file_name().unwrap().to_string_lossy());
        symlink(&up, root.join("up")).unwrap(); // relative, out of the root
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"inside").unwrap();
        symlink("f", root.join("d/inner-link")).unwrap(); // even a link within the root
        Hostile {
            _root: root_dir,
            _outside: outside_dir,
            root,
            outside,
        }
    }

    fn outside_tree(&self) -> BTreeMap<String, Vec<u8>> {
        tree(&self.outside)
    }
}

async fn symlinks_are_never_followed_for_reads(resolver: Resolver) {
    let h = Hostile::new();
    let store = open_store(&h.root, resolver);
    for key in [
        "x/secret",
        "s",
        "up/secret",
        "dirlink/existing",
        "x/cron.d/existing",
        "d/inner-link",
    ] {
        not_found(key, store.head(key).await);
        not_found(key, store.get_range(key, 0..100, None).await);
        not_found(key, store.open_local(key, None).unwrap().map(drop));
        not_found(key, store.copy(key, "stolen").await);
    }
    assert!(!h.root.join("stolen").exists());
    for key in ["x/", "up/", "dirlink/", "x/cron.d/"] {
        not_found(key, store.head(key).await);
        let page = store.list(key, None, 100).await.unwrap();
        assert!(
            page.objects.is_empty() && page.prefixes.is_empty() && page.skipped == 0,
            "{key}: {page:?}"
        );
    }
    let page = store.list("", None, 100).await.unwrap();
    assert!(page.objects.is_empty(), "{page:?}");
    assert_eq!(page.prefixes, ["d/"]);
    assert_eq!(page.skipped, 4, "x, s, dirlink, up");
    let page = store.list("d/", None, 100).await.unwrap();
    assert_eq!(
        object_keys(&page),
        ["d/", "d/f"],
        "the directory is its own marker"
    );
    assert_eq!(page.skipped, 1, "d/inner-link");
}

async fn writes_never_go_through_symlinks(resolver: Resolver) {
    let h = Hostile::new();
    let before = h.outside_tree();
    let store = open_store(&h.root, resolver);
    let body = || Bytes::from_static(b"* * * * * root evil");
    for key in [
        "x/newfile",
        "x/cron.d/job",
        "dirlink/job",
        "up/newfile",
        "x/new/deeper/file",
        "d/inner-link/below",
    ] {
        let got = store.put(key, body(), &PosixMeta::default()).await;
        assert!(
            matches!(got, Err(StoreError::Rejected(_))),
            "put {key}: {got:?}"
        );
        let got = store.copy("d/f", key).await;
        assert!(
            matches!(got, Err(StoreError::Rejected(_))),
            "copy to {key}: {got:?}"
        );
        let id = store
            .create_upload(key, &PosixMeta::default())
            .await
            .unwrap();
        let part = store.upload_part(key, &id, 1, body()).await.unwrap();
        let got = store.complete_upload(key, &id, &[part]).await;
        assert!(
            matches!(got, Err(StoreError::Rejected(_))),
            "complete {key}: {got:?}"
        );
        store.abort_upload(key, &id).await.unwrap();
    }
    for key in ["x/newdir/", "dirlink/sub/", "x/cron.d/"] {
        let got = store.put(key, Bytes::new(), &PosixMeta::default()).await;
        assert!(
            matches!(got, Err(StoreError::Rejected(_))),
            "mkdir {key}: {got:?}"
        );
    }
    // A symlink (or special file) at the key itself is neither written through nor replaced.
    for key in ["s", "d/inner-link", "dirlink"] {
        let got = store.put(key, body(), &PosixMeta::default()).await;
        assert!(
            matches!(got, Err(StoreError::Rejected(_))),
            "put {key}: {got:?}"
        );
        let got = store.copy("d/f", key).await;
        assert!(
            matches!(got, Err(StoreError::Rejected(_))),
            "copy to {key}: {got:?}"
        );
        assert!(fs::symlink_metadata(h.root.join(key)).unwrap().is_symlink());
    }
    assert_eq!(h.outside_tree(), before, "nothing outside the root changed");
    assert_eq!(fs::read(h.root.join("d/f")).unwrap(), b"inside");
    assert_eq!(
        fs::read_dir(h.root.join(UPLOADS_DIR)).unwrap().count(),
        0,
        "failed writes leave nothing staged"
    );
}

async fn deletes_never_go_through_symlinks(resolver: Resolver) {
    let h = Hostile::new();
    let before = h.outside_tree();
    let store = open_store(&h.root, resolver);
    for key in [
        "x/secret",
        "s",
        "dirlink/existing",
        "x/cron.d/",
        "dirlink/",
        "up/secret",
        "x/",
        "d/inner-link",
    ] {
        not_found(key, store.delete(key).await);
    }
    assert_eq!(h.outside_tree(), before, "nothing outside the root removed");
    for link in ["x", "s", "dirlink", "up", "d/inner-link"] {
        assert!(
            fs::symlink_metadata(h.root.join(link))
                .unwrap()
                .is_symlink(),
            "{link} removed"
        );
    }
}

async fn special_files_are_not_served_and_never_opened(resolver: Resolver) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    fs::write(root.join("ok"), b"ok").unwrap();
    let fifo = root.join("fifo");
    mkfifo(&fifo);
    let _listener = UnixListener::bind(root.join("sock")).unwrap();
    let mut watched = vec![fifo.clone()];
    let mut specials = vec!["fifo", "sock"];
    if is_root() {
        mknod(&root.join("null"), libc::S_IFCHR, 1, 3); // what /dev/null is
        mknod(&root.join("blk"), libc::S_IFBLK, 7, 250); // a loop device number
        watched.extend([root.join("null"), root.join("blk")]);
        specials.extend(["null", "blk"]);
    } else {
        eprintln!("not root: device nodes left out of this test");
    }
    let watch = OpenWatch::new(&watched);
    let store = Arc::new(open_store(&root, resolver));
    for name in &specials {
        let what = |op: &str| format!("{op} {name}");
        not_found(&what("head"), no_hang(&fifo, name, store.head(name)).await);
        not_found(
            &what("get"),
            no_hang(&fifo, name, store.get_range(name, 0..10, None)).await,
        );
        let (s, key) = (store.clone(), name.to_string());
        let opened = no_hang(
            &fifo,
            name,
            tokio::task::spawn_blocking(move || s.open_local(&key, None).unwrap().map(drop)),
        )
        .await
        .unwrap();
        not_found(&what("open_local"), opened);
        not_found(
            &what("copy"),
            no_hang(&fifo, name, store.copy(name, "copied")).await,
        );
        assert!(!root.join("copied").exists());
        not_found(&what("delete"), store.delete(name).await);
        let got = store
            .put(name, Bytes::from_static(b"replace"), &PosixMeta::default())
            .await;
        assert!(
            matches!(got, Err(StoreError::Rejected(_))),
            "put {name}: {got:?}"
        );
        let page = store.list(&format!("{name}/"), None, 10).await.unwrap();
        assert!(page.objects.is_empty() && page.prefixes.is_empty());
        let kind = fs::symlink_metadata(root.join(name)).unwrap().file_type();
        assert!(
            kind.is_fifo() || kind.is_socket() || kind.is_char_device() || kind.is_block_device(),
            "{name} was replaced or removed"
        );
    }
    let page = store.list("", None, 100).await.unwrap();
    assert_eq!(object_keys(&page), ["ok"]);
    assert!(page.prefixes.is_empty());
    assert_eq!(page.skipped, specials.len() as u64);
    assert_eq!(watch.opens(), 0, "a FIFO or device node was opened");
    // The watch does see a real open (so the assertion above can fail).
    drop(fs::File::open(root.join(if is_root() {
        "null"
    } else {
        "ok"
    })));
    if is_root() {
        assert_eq!(watch.opens(), 1, "the watch missed an open");
    }
}

async fn skipped_entries_are_counted_once_per_listing(resolver: Resolver) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for name in ["a", "c", "e", "g"] {
        fs::write(root.join(name), b"x").unwrap();
    }
    for name in ["b", "d", "h"] {
        symlink("/etc", root.join(name)).unwrap();
    }
    mkfifo(&root.join("f"));
    let store = open_store(root, resolver);
    let (mut token, mut keys, mut skipped) = (None, Vec::new(), 0);
    loop {
        let page = store.list("", token.as_deref(), 2).await.unwrap();
        keys.extend(page.objects.iter().map(|o| o.key.clone()));
        skipped += page.skipped;
        token = page.next_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(keys, ["a", "c", "e", "g"]);
    assert_eq!(skipped, 4, "b, d, f and h, each once");
}

async fn staging_dir_is_unreachable(resolver: Resolver) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let store = open_store(root, resolver);
    store
        .put("f", Bytes::from_static(b"data"), &PosixMeta::default())
        .await
        .unwrap();
    let id = store
        .create_upload("big", &PosixMeta::default())
        .await
        .unwrap();
    let p1 = store
        .upload_part("big", &id, 1, Bytes::from_static(b"staged part"))
        .await
        .unwrap();
    let part = format!("{UPLOADS_DIR}/{id}/00001");
    let upload_dir = format!("{UPLOADS_DIR}/{id}/");
    assert_eq!(fs::read(root.join(&part)).unwrap(), b"staged part");
    let top = format!("{UPLOADS_DIR}/");
    for key in [part.as_str(), UPLOADS_DIR, &top, &upload_dir] {
        assert!(store.is_reserved(key), "{key}");
        not_found(key, store.head(key).await);
        not_found(key, store.get_range(key, 0..100, None).await);
        not_found(key, store.open_local(key, None).unwrap().map(drop));
        not_found(key, store.copy(key, "stolen").await);
        not_found(key, store.delete(key).await);
        for write in [
            store
                .put(key, Bytes::from_static(b"evil"), &PosixMeta::default())
                .await
                .map(drop),
            store.copy("f", key).await,
            store
                .create_upload(key, &PosixMeta::default())
                .await
                .map(drop),
        ] {
            assert!(
                matches!(write, Err(StoreError::Rejected(_))),
                "{key}: {write:?}"
            );
        }
    }
    for prefix in [top.as_str(), &upload_dir] {
        let page = store.list(prefix, None, 100).await.unwrap();
        assert!(
            page.objects.is_empty() && page.prefixes.is_empty(),
            "{page:?}"
        );
    }
    let page = store.list("", None, 100).await.unwrap();
    assert_eq!(object_keys(&page), ["f"]);
    assert!(page.prefixes.is_empty() && page.skipped == 0, "{page:?}");
    assert!(!store.is_reserved("a/.berth-uploads/x") && !store.is_reserved(".berth-uploadsx"));
    // The staged part is as its writer left it, and the upload completes.
    assert_eq!(fs::read(root.join(&part)).unwrap(), b"staged part");
    assert!(!root.join("stolen").exists());
    store.complete_upload("big", &id, &[p1]).await.unwrap();
    assert_eq!(fs::read(root.join("big")).unwrap(), b"staged part");
}

// ---- Races ----

fn exchange(a: &Path, b: &Path) -> bool {
    let (a, b) = (cstring(a), cstring(b));
    // SAFETY: both paths are NUL-terminated and outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    ret == 0
}

/// Threads swap directories for symlinks to an outside directory (an atomic exchange, and a
/// rename dance) while others read, list, create, copy and delete through the store: nothing
/// outside the root is ever read, created or removed.
fn race_with_symlink_swaps_never_leaves_the_root(resolver: Resolver) {
    const INSIDE: &[u8] = b"inside";
    let outside_dir = tempfile::tempdir().unwrap();
    let outside = outside_dir.path().canonicalize().unwrap();
    fs::write(outside.join("secret.txt"), SECRET).unwrap();
    fs::write(outside.join("victim"), b"outside victim").unwrap();
    let before = tree(&outside);
    let root_dir = tempfile::tempdir().unwrap();
    let root = root_dir.path().canonicalize().unwrap();
    for top in ["d", "e"] {
        fs::create_dir(root.join(top)).unwrap();
        fs::write(root.join(top).join("f"), INSIDE).unwrap();
    }
    symlink(&outside, root.join("alt")).unwrap();
    symlink(&outside, root.join("e.lnk")).unwrap();

    let store = Arc::new(open_store(&root, resolver));
    let rt = Arc::new(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let escapes = Arc::new(Mutex::new(Vec::<String>::new()));
    let swaps = Arc::new(AtomicU64::new(0));
    let good_reads = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    // d <-> alt, atomically, over and over.
    {
        let (root, stop, swaps) = (root.clone(), stop.clone(), swaps.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if exchange(&root.join("d"), &root.join("alt")) {
                    swaps.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // e: the dance that leaves a symlink at `e` for a while.
    {
        let (root, stop, swaps) = (root.clone(), stop.clone(), swaps.clone());
        threads.push(std::thread::spawn(move || {
            let p = |n: &str| root.join(n);
            while !stop.load(Ordering::Relaxed) {
                let _ = fs::rename(p("e"), p("e.real"));
                let _ = fs::rename(p("e.lnk"), p("e"));
                std::thread::yield_now();
                let _ = fs::rename(p("e"), p("e.lnk"));
                let _ = fs::rename(p("e.real"), p("e"));
                swaps.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in 0..4 {
        let (store, rt, stop) = (store.clone(), rt.clone(), stop.clone());
        let (escapes, good_reads, outside) = (escapes.clone(), good_reads.clone(), outside.clone());
        threads.push(std::thread::spawn(move || {
            let escaped = |what: String| escapes.lock().unwrap().push(what);
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                for top in ["d", "e"] {
                    let secret = format!("{top}/secret.txt");
                    rt.block_on(async {
                        if let Ok(got) = store.head(&secret).await {
                            escaped(format!("head {secret}: {got:?}"));
                        }
                        if store.get_range(&secret, 0..100, None).await.is_ok() {
                            escaped(format!("read {secret}"));
                        }
                        if let Some(Ok(_)) = store.open_local(&secret, None) {
                            escaped(format!("open_local {secret}"));
                        }
                        match store.get_range(&format!("{top}/f"), 0..100, None).await {
                            Ok(got) if &got[..] == INSIDE => {
                                good_reads.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(got) => escaped(format!("read {top}/f gave {got:?}")),
                            Err(_) => {}
                        }
                        if let Ok(page) = store.list(&format!("{top}/"), None, 100).await {
                            if page.objects.iter().any(|o| o.key.ends_with("secret.txt")) {
                                escaped(format!("listed {top}/: {page:?}"));
                            }
                        }
                        if store
                            .copy(&secret, &format!("stolen-{t}-{i}"))
                            .await
                            .is_ok()
                        {
                            escaped(format!("copied {secret}"));
                        }
                        let key = format!("{top}/new-{t}-{i}");
                        let _ = store
                            .put(&key, Bytes::from_static(b"new"), &PosixMeta::default())
                            .await;
                        let _ = store
                            .put(
                                &format!("{top}/dir-{t}-{i}/"),
                                Bytes::new(),
                                &PosixMeta::default(),
                            )
                            .await;
                        let _ = store
                            .copy(&format!("{top}/f"), &format!("{top}/copy-{t}-{i}"))
                            .await;
                        if let Ok(id) = store
                            .create_upload(&format!("{top}/mp-{t}-{i}"), &PosixMeta::default())
                            .await
                        {
                            let key = format!("{top}/mp-{t}-{i}");
                            if let Ok(p) = store
                                .upload_part(&key, &id, 1, Bytes::from_static(b"mp"))
                                .await
                            {
                                let _ = store.complete_upload(&key, &id, &[p]).await;
                            }
                            let _ = store.abort_upload(&key, &id).await;
                        }
                        let _ = store.delete(&format!("{top}/victim")).await;
                        let _ = store.delete(&secret).await;
                        let _ = store.delete(&format!("{top}/new-{t}-{i}")).await;
                    });
                }
                if !outside.join("victim").exists() || !outside.join("secret.txt").exists() {
                    escaped("a file outside the root was removed".into());
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let escapes = escapes.lock().unwrap();
    assert!(
        escapes.is_empty(),
        "{} escapes, first: {:?}",
        escapes.len(),
        &escapes[..escapes.len().min(5)]
    );
    assert_eq!(tree(&outside), before, "the outside directory changed");
    let (swaps, good) = (
        swaps.load(Ordering::Relaxed),
        good_reads.load(Ordering::Relaxed),
    );
    eprintln!("race ({resolver:?}): {swaps} swaps, {good} reads of the real directory");
    assert!(swaps > 100, "only {swaps} swaps: no race happened");
    assert!(
        good > 10,
        "only {good} reads of the real directory: the test proved nothing"
    );
}

// ---- copy ----

/// `copy` streams through the kernel: in a process of its own (so nothing else moves its
/// peak memory), copying a 128 MiB file must not raise the peak RSS by anything near that.
#[test]
fn copy_does_not_read_the_object_into_memory() {
    for walk in [false, true] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::local::tests::copy_in_a_process_of_its_own",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("BERTH_TEST_COPY_CHILD", "1")
            .env(Resolver::ENV, if walk { "1" } else { "0" })
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "child failed:\n{text}");
        assert!(
            text.contains("copy child: ok"),
            "the child did not run:\n{text}"
        );
    }
}

fn peak_rss_kib() -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
#[ignore = "run by copy_does_not_read_the_object_into_memory, in a process of its own"]
fn copy_in_a_process_of_its_own() {
    if std::env::var_os("BERTH_TEST_COPY_CHILD").is_none() {
        return;
    }
    const SIZE: u64 = 128 << 20;
    let dir = tempfile::tempdir().unwrap();
    let big = fs::File::create(dir.path().join("big")).unwrap();
    big.set_len(SIZE).unwrap();
    big.write_all_at(b"head", 0).unwrap();
    big.write_all_at(b"tail", SIZE - 4).unwrap();
    drop(big);
    let store = LocalStore::open(dir.path()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let before = peak_rss_kib();
    let start = Instant::now();
    rt.block_on(store.copy("big", "sub/copy")).unwrap();
    let grew = peak_rss_kib().saturating_sub(before);
    let copy = fs::File::open(dir.path().join("sub/copy")).unwrap();
    assert_eq!(copy.metadata().unwrap().len(), SIZE);
    let mut buf = [0u8; 4];
    copy.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"head");
    copy.read_exact_at(&mut buf, SIZE - 4).unwrap();
    assert_eq!(&buf, b"tail");
    assert!(
        grew < 32 << 10,
        "copying 128 MiB raised the peak RSS by {grew} KiB: it went through memory"
    );
    println!(
        "copy child: ok ({:?}, peak RSS +{grew} KiB, {:?})",
        store.resolver(),
        start.elapsed()
    );
}

#[test]
fn resolver_follows_the_environment_value() {
    use std::ffi::OsStr;
    assert_eq!(Resolver::from_env_value(None), Resolver::Openat2);
    assert_eq!(
        Resolver::from_env_value(Some(OsStr::new("0"))),
        Resolver::Openat2
    );
    assert_eq!(
        Resolver::from_env_value(Some(OsStr::new("1"))),
        Resolver::Walk
    );
    let dir = tempfile::tempdir().unwrap();
    let walk = LocalStore::open_with(dir.path(), Resolver::Walk).unwrap();
    assert_eq!(walk.resolver(), Resolver::Walk);
    let auto = LocalStore::open_with(dir.path(), Resolver::Openat2).unwrap();
    if openat2_supported() {
        assert_eq!(auto.resolver(), Resolver::Openat2);
    } else {
        assert_eq!(
            auto.resolver(),
            Resolver::Walk,
            "falls back where openat2 is missing"
        );
    }
}
