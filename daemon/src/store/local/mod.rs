//! A local directory as an object store: the embedded default, needing no server.
//!
//! Key `a/b/c` is the file `ROOT/a/b/c`; a key ending in `/` is a directory (the equivalent of
//! an S3 directory marker). Uploads are staged under `ROOT/.berth-uploads`, which no key can
//! name, and land with a rename, so a reader never sees a half-written object. The directory
//! may be shared with hostile clients (berth runs as root), so every key is resolved beneath
//! the root's fd without following a symlink (`beneath.rs`, over the syscall wrappers of
//! `sys.rs`), and only regular files and directories are served: symlinks, FIFOs, sockets and
//! device nodes are not found, skipped and counted in listings, never opened, never written
//! through and never removed.

mod beneath;
mod sys;
#[cfg(test)]
mod tests;

use std::fs::File;
use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

pub use self::beneath::Resolver;
use self::beneath::{is_not_beneath, not_served_kind, Root};
pub use self::sys::openat2_supported;
use self::sys::{Kind, Meta};
use super::{ListPage, ObjectInfo, ObjectStore, PosixMeta, StoreError, StoreResult, UploadedPart};

/// The staging directory below the root; reserved: no key may start with it.
pub const UPLOADS_DIR: &str = ".berth-uploads";

pub struct LocalStore {
    path: PathBuf,
    root: Arc<Root>,
}

/// What a key is wanted for: reads of a reserved or unsafe key find nothing, writes are
/// refused.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
}

impl LocalStore {
    /// The directory `root` as a store, resolving keys as `BERTH_LOCAL_NO_OPENAT2` says
    /// ([`Resolver::from_env`]).
    pub fn open(root: &Path) -> io::Result<LocalStore> {
        LocalStore::open_with(root, Resolver::from_env())
    }

    /// The directory `root` as a store, resolving keys with `resolver` (openat2 falls back to
    /// the walk where the kernel lacks it).
    pub fn open_with(root: &Path, resolver: Resolver) -> io::Result<LocalStore> {
        std::fs::create_dir_all(root)?;
        let path = root.canonicalize()?;
        if !path.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", path.display()),
            ));
        }
        let root = Root::open(&path, resolver)?;
        Ok(LocalStore {
            path,
            root: Arc::new(root),
        })
    }

    /// The resolver in use.
    pub fn resolver(&self) -> Resolver {
        self.root.resolver()
    }
}

/// A name for a new staging file or upload directory, unique among every store of every
/// process that may share the directory: the pid, a random number drawn once per process
/// (processes in other pid namespaces can have the same pid) and a counter. The files are
/// created `O_EXCL` all the same, so a collision would fail a write, never mix two.
fn staging_name(what: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    static NONCE: OnceLock<u64> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let nonce = NONCE.get_or_init(|| {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    });
    format!(
        "{what}-{}-{nonce:016x}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Splits a key into path components below the root, refusing anything that could step
/// outside it (Rejected) and the staging directory (NotFound to read, Rejected to write).
fn components(key: &str, access: Access) -> StoreResult<Vec<String>> {
    let trimmed = key.strip_suffix('/').unwrap_or(key);
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    let mut parts = Vec::new();
    for part in trimmed.split('/') {
        if part.is_empty() || part == "." || part == ".." || part.contains('\0') {
            return Err(StoreError::Rejected(format!(
                "key {key:?} is not a safe path"
            )));
        }
        parts.push(part.to_string());
    }
    if is_reserved(key) {
        return Err(match access {
            Access::Read => StoreError::NotFound,
            Access::Write => StoreError::Rejected(format!(
                "key {key:?} is in the local store's staging directory {UPLOADS_DIR}"
            )),
        });
    }
    Ok(parts)
}

/// Whether `key` names the staging directory or something in it.
fn is_reserved(key: &str) -> bool {
    key.split('/').next() == Some(UPLOADS_DIR)
}

fn strs(parts: &[String]) -> Vec<&str> {
    parts.iter().map(String::as_str).collect()
}

fn io_err(context: &str, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound,
        io::ErrorKind::PermissionDenied => StoreError::AccessDenied(format!("{context}: {e}")),
        _ => StoreError::Rejected(format!("{context}: {e}")),
    }
}

/// For reads: a symlink on the way, a component that is not a directory or a directory where
/// a file was asked for all mean the key names nothing.
fn read_err(context: &str, e: io::Error) -> StoreError {
    if is_not_beneath(&e) || e.raw_os_error() == Some(libc::EISDIR) {
        return StoreError::NotFound;
    }
    io_err(context, e)
}

/// For writes: a symlink on the way is refused, never followed.
fn write_err(context: &str, e: io::Error) -> StoreError {
    if is_not_beneath(&e) {
        return StoreError::Rejected(format!(
            "{context}: a component is a symlink or not a directory ({e}); the local store \
             never follows one"
        ));
    }
    io_err(context, e)
}

fn etag_of(meta: &Meta) -> String {
    format!(
        "\"{:x}-{:x}-{:x}\"",
        meta.ino,
        meta.mtime_nsec + meta.mtime * 1_000_000_000,
        meta.size
    )
}

fn modified(meta: &Meta) -> SystemTime {
    let nanos = Duration::from_nanos(u64::try_from(meta.mtime_nsec).unwrap_or(0));
    let at = match u64::try_from(meta.mtime) {
        Ok(secs) => SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs)),
        Err(_) => {
            SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(meta.mtime.unsigned_abs()))
        }
    };
    at.and_then(|t| t.checked_add(nanos))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn info_of(key: String, meta: &Meta) -> ObjectInfo {
    ObjectInfo {
        key,
        size: meta.size,
        etag: Some(etag_of(meta)),
        last_modified: modified(meta),
        meta: None,
    }
}

/// The POSIX metadata stored on `fd` (none if unreadable: the mount's defaults apply).
fn read_meta(key: &str, fd: BorrowedFd<'_>) -> PosixMeta {
    match sys::get_meta(fd) {
        Ok(text) => text.map(|t| PosixMeta::from_text(&t)).unwrap_or_default(),
        Err(e) => {
            tracing::debug!(key, error = %e, "could not read an object's metadata");
            PosixMeta::default()
        }
    }
}

/// Stores `meta` on `fd` (an empty one removes what was there).
fn write_meta(fd: BorrowedFd<'_>, meta: &PosixMeta) -> StoreResult<()> {
    sys::set_meta(fd, &meta.to_text()).map_err(|e| match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) => StoreError::Unsupported(
            "the local store's filesystem keeps no user extended attributes, where POSIX \
             metadata goes"
                .into(),
        ),
        _ => io_err("store metadata", e),
    })
}

/// Stores `meta` on a new file `fd` unless there is none (nothing to remove).
fn write_new_meta(fd: BorrowedFd<'_>, meta: &PosixMeta) -> io::Result<()> {
    if meta.is_empty() {
        return Ok(());
    }
    sys::set_meta(fd, &meta.to_text())
}

/// Where an upload keeps the metadata its object will carry.
const UPLOAD_META: &str = "meta";

fn skipped(key: &str, kind: Kind) {
    tracing::debug!(
        key,
        kind = kind.name(),
        "skipped: the local store serves regular files and directories only"
    );
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Rejected(format!("local store task failed: {e}")))?
}

/// Opens `key` (its components) for reading if it is a regular file carrying `etag`.
fn open_object(
    root: &Root,
    key: &str,
    parts: &[String],
    etag: Option<&str>,
) -> StoreResult<(File, Meta)> {
    let (file, meta) = root.open_regular(&strs(parts)).map_err(|e| {
        if let Some(kind) = not_served_kind(&e) {
            skipped(key, kind);
        }
        read_err("open", e)
    })?;
    if etag.is_some_and(|want| want != etag_of(&meta)) {
        return Err(StoreError::Changed);
    }
    Ok((file, meta))
}

/// Makes a new file `name` in `stage` (a directory fd beneath the root), fills it, and renames
/// it to `target`, whose parent directories are made as needed. The staged file goes away if
/// anything fails. Returns what the landed file is.
fn land(
    root: &Root,
    stage: &OwnedFd,
    name: &str,
    target: &[String],
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> StoreResult<Meta> {
    let Some((last, parents)) = target.split_last() else {
        return Err(StoreError::Rejected("cannot write the root".into()));
    };
    let dir = root
        .mkdir_all(&strs(parents))
        .map_err(|e| write_err("create parent", e))?;
    let mut file = root
        .create_new(stage.as_fd(), name)
        .map_err(|e| write_err("create staging file", e))?;
    let landed = fill(&mut file)
        .map_err(|e| write_err("write staging file", e))
        .and_then(|()| sys::fstat(file.as_fd()).map_err(|e| io_err("stat", e)))
        .and_then(|meta| {
            root.rename_into(stage.as_fd(), name, dir.as_fd(), last)
                .map_err(|e| write_err("rename into place", e))?;
            Ok(meta)
        });
    if landed.is_err() {
        let _ = root.remove_staged(stage.as_fd(), name);
    }
    landed
}

fn staging_dir(root: &Root) -> StoreResult<OwnedFd> {
    root.mkdir_all(&[UPLOADS_DIR])
        .map_err(|e| write_err("create staging dir", e))
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn is_reserved(&self, key: &str) -> bool {
        is_reserved(key)
    }

    async fn check(&self, _prefix: &str) -> StoreResult<()> {
        let root = self.root.clone();
        blocking(move || root.check().map_err(|e| io_err("read root", e))).await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        let parts = components(key, Access::Read)?;
        let root = self.root.clone();
        let key = key.to_string();
        blocking(move || {
            let meta = root.stat(&strs(&parts)).map_err(|e| read_err("stat", e))?;
            match (meta.kind, key.ends_with('/')) {
                (Kind::Dir, true) => {
                    let dir = root
                        .open_dir_readable(&strs(&parts))
                        .map_err(|e| read_err("open", e))?;
                    let stored = read_meta(&key, dir.as_fd());
                    let mut info = info_of(key, &meta);
                    info.meta = Some(stored);
                    Ok(info)
                }
                (Kind::Regular, false) => {
                    let (file, meta) = open_object(&root, &key, &parts, None)?;
                    let stored = read_meta(&key, file.as_fd());
                    let mut info = info_of(key, &meta);
                    info.meta = Some(stored);
                    Ok(info)
                }
                (Kind::Dir, false) | (Kind::Regular, true) => Err(StoreError::NotFound),
                (kind, _) => {
                    skipped(&key, kind);
                    Err(StoreError::NotFound)
                }
            }
        })
        .await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<Bytes> {
        let parts = components(key, Access::Read)?;
        let root = self.root.clone();
        let key = key.to_string();
        let etag = etag.map(str::to_string);
        blocking(move || {
            let (file, meta) = open_object(&root, &key, &parts, etag.as_deref())?;
            let end = range.end.min(meta.size);
            let mut buf = vec![0u8; end.saturating_sub(range.start) as usize];
            file.read_exact_at(&mut buf, range.start)
                .map_err(|e| io_err("read", e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    fn open_local(&self, key: &str, etag: Option<&str>) -> Option<StoreResult<File>> {
        let open = || {
            let parts = components(key, Access::Read)?;
            open_object(&self.root, key, &parts, etag).map(|(file, _)| file)
        };
        Some(open())
    }

    async fn list(
        &self,
        prefix: &str,
        token: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        if !(prefix.is_empty() || prefix.ends_with('/')) {
            return Err(StoreError::Rejected(format!(
                "local store lists directories only, not {prefix:?}"
            )));
        }
        let parts = match components(prefix, Access::Read) {
            Err(StoreError::NotFound) => return Ok(ListPage::default()),
            other => other?,
        };
        let root = self.root.clone();
        let prefix = prefix.to_string();
        let after = token.map(str::to_string);
        blocking(move || list_page(&root, &parts, &prefix, after.as_deref(), max_keys)).await
    }

    async fn put(&self, key: &str, body: Bytes, meta: &PosixMeta) -> StoreResult<Option<String>> {
        let parts = components(key, Access::Write)?;
        let root = self.root.clone();
        let posix = meta.clone();
        if key.ends_with('/') {
            return blocking(move || {
                root.mkdir_all(&strs(&parts))
                    .map_err(|e| write_err("mkdir", e))?;
                if !posix.is_empty() {
                    let dir = root
                        .open_dir_readable(&strs(&parts))
                        .map_err(|e| write_err("open", e))?;
                    write_meta(dir.as_fd(), &posix)?;
                }
                Ok(None)
            })
            .await;
        }
        let name = staging_name("put");
        blocking(move || {
            let stage = staging_dir(&root)?;
            let meta = land(&root, &stage, &name, &parts, |f| {
                f.write_all(&body)?;
                write_new_meta(f.as_fd(), &posix)
            })?;
            Ok(Some(etag_of(&meta)))
        })
        .await
    }

    async fn create_upload(&self, key: &str, meta: &PosixMeta) -> StoreResult<String> {
        components(key, Access::Write)?;
        let id = staging_name("mpu");
        let root = self.root.clone();
        let text = meta.to_text();
        blocking(move || {
            let dir = root
                .mkdir_all(&[UPLOADS_DIR, &id])
                .map_err(|e| write_err("create upload dir", e))?;
            if !text.is_empty() {
                root.create_new(dir.as_fd(), UPLOAD_META)
                    .and_then(|mut f| f.write_all(text.as_bytes()))
                    .map_err(|e| write_err("create upload dir", e))?;
            }
            Ok(id)
        })
        .await
    }

    async fn upload_part(
        &self,
        _key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> StoreResult<UploadedPart> {
        check_upload_id(upload_id)?;
        let id = upload_id.to_string();
        let root = self.root.clone();
        let staged = staging_name("part");
        blocking(move || {
            let dir = root
                .open_dir(&[UPLOADS_DIR, &id])
                .map_err(|e| write_err("open upload dir", e))?;
            let name = format!("{number:05}");
            // Staged under its own name, then renamed over the part: a part sent again
            // replaces the first one whole.
            let mut file = root
                .create_new(dir.as_fd(), &staged)
                .map_err(|e| write_err("write part", e))?;
            let written = file
                .write_all(&body)
                .and_then(|()| root.rename_into(dir.as_fd(), &staged, dir.as_fd(), &name));
            if let Err(e) = written {
                let _ = root.remove_staged(dir.as_fd(), &staged);
                return Err(write_err("write part", e));
            }
            Ok(UploadedPart {
                number,
                etag: format!("\"part-{number}-{}\"", body.len()),
            })
        })
        .await
    }

    /// The range read and written as the part, inside the store: the bytes never pass through
    /// the caller's upload pipeline.
    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<Option<UploadedPart>> {
        let want = range.end - range.start;
        let bytes = self.get_range(key, range, etag).await?;
        if bytes.len() as u64 != want {
            return Err(StoreError::Changed);
        }
        self.upload_part(key, upload_id, number, bytes)
            .await
            .map(Some)
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> StoreResult<Option<String>> {
        check_upload_id(upload_id)?;
        let target = components(key, Access::Write)?;
        let id = upload_id.to_string();
        let root = self.root.clone();
        let numbers: Vec<i32> = parts.iter().map(|p| p.number).collect();
        blocking(move || {
            let dir = root
                .open_dir(&[UPLOADS_DIR, &id])
                .map_err(|e| write_err("open upload dir", e))?;
            // Left over from an attempt that failed half-way.
            let _ = root.remove_staged(dir.as_fd(), "assembled");
            let posix = match root.open_regular_in(dir.as_fd(), &[UPLOAD_META]) {
                Ok((mut f, _)) => {
                    let mut text = String::new();
                    io::Read::read_to_string(&mut f, &mut text)
                        .map_err(|e| io_err("read upload metadata", e))?;
                    PosixMeta::from_text(&text)
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => PosixMeta::default(),
                Err(e) => return Err(io_err("read upload metadata", e)),
            };
            let meta = land(&root, &dir, "assembled", &target, |out| {
                for n in numbers {
                    let (mut part, _) = root.open_regular_in(dir.as_fd(), &[&format!("{n:05}")])?;
                    io::copy(&mut part, out)?;
                }
                write_new_meta(out.as_fd(), &posix)
            })?;
            let _ = root.remove_flat_dir(&[UPLOADS_DIR, &id]);
            Ok(Some(etag_of(&meta)))
        })
        .await
    }

    async fn abort_upload(&self, _key: &str, upload_id: &str) -> StoreResult<()> {
        check_upload_id(upload_id)?;
        let id = upload_id.to_string();
        let root = self.root.clone();
        blocking(move || {
            let _ = root.remove_flat_dir(&[UPLOADS_DIR, &id]);
            Ok(())
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let parts = components(key, Access::Read)?;
        let Some((last, parents)) = parts.split_last() else {
            return Err(StoreError::Rejected("will not delete the root".into()));
        };
        let (last, parents) = (last.clone(), parents.to_vec());
        let root = self.root.clone();
        let is_dir = key.ends_with('/');
        let key = key.to_string();
        blocking(move || {
            let removed = root.open_dir(&strs(&parents)).and_then(|dir| {
                if is_dir {
                    root.remove_dir(dir.as_fd(), &last)
                } else {
                    root.unlink_file(dir.as_fd(), &last)
                }
            });
            match removed {
                // Like S3: deleting what is not there succeeds.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                // A symlink on the way, or a symlink or special file there: not served.
                Err(e) if is_not_beneath(&e) => Err(StoreError::NotFound),
                Err(e) if not_served_kind(&e).is_some() => {
                    tracing::debug!(key, error = %e, "delete refused: not served");
                    Err(StoreError::NotFound)
                }
                other => other.map_err(|e| io_err("delete", e)),
            }
        })
        .await
    }

    /// Copies through the kernel (`io::copy` between files is copy_file_range on Linux): the
    /// object is never read into memory.
    async fn copy(&self, from: &str, to: &str) -> StoreResult<()> {
        let source = components(from, Access::Read)?;
        let target = components(to, Access::Write)?;
        let root = self.root.clone();
        let from = from.to_string();
        let name = staging_name("copy");
        blocking(move || {
            let (mut src, _) = open_object(&root, &from, &source, None)?;
            let posix = read_meta(&from, src.as_fd());
            let stage = staging_dir(&root)?;
            land(&root, &stage, &name, &target, |out| {
                io::copy(&mut src, out)?;
                write_new_meta(out.as_fd(), &posix)
            })?;
            Ok(())
        })
        .await
    }

    /// Sets the extended attribute in place (the file's bytes and ETag stay as they are).
    async fn set_meta(
        &self,
        key: &str,
        etag: Option<&str>,
        _size: u64,
        meta: &PosixMeta,
    ) -> StoreResult<Option<String>> {
        let parts = components(key, Access::Write)?;
        let root = self.root.clone();
        let key = key.to_string();
        let etag = etag.map(str::to_string);
        let posix = meta.clone();
        blocking(move || {
            if key.ends_with('/') {
                let dir = root
                    .open_dir_readable(&strs(&parts))
                    .map_err(|e| read_err("open", e))?;
                write_meta(dir.as_fd(), &posix)?;
                return Ok(None);
            }
            let (file, meta) = open_object(&root, &key, &parts, etag.as_deref())?;
            write_meta(file.as_fd(), &posix)?;
            Ok(Some(etag_of(&meta)))
        })
        .await
    }
}

/// One page of the listing of directory `parts` (key `prefix`), in S3 order: byte order of
/// the full key, directories ending in `/`. Symlinks and special files are left out and
/// counted in `skipped`, each on the one page whose key range holds it.
fn list_page(
    root: &Root,
    parts: &[String],
    prefix: &str,
    after: Option<&str>,
    max_keys: usize,
) -> StoreResult<ListPage> {
    let entries = match root.list(&strs(parts)) {
        Ok(entries) => entries,
        // Nothing below a missing path, a file or a symlink: an empty listing, as in S3.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) || is_not_beneath(&e) => {
            return Ok(ListPage::default())
        }
        Err(e) => return Err(io_err("list", e)),
    };
    let mut keyed = Vec::new();
    let mut special: Vec<(String, Kind)> = Vec::new();
    for entry in entries {
        let Ok(name) = entry.name.into_string() else {
            continue; // not UTF-8: cannot be an S3 key
        };
        if parts.is_empty() && name == UPLOADS_DIR {
            continue;
        }
        let key = match entry.meta.kind {
            Kind::Dir => format!("{prefix}{name}/"),
            Kind::Regular => format!("{prefix}{name}"),
            kind => {
                special.push((format!("{prefix}{name}"), kind));
                continue;
            }
        };
        if after.is_some_and(|a| key.as_str() <= a) {
            continue;
        }
        keyed.push((key, entry.meta));
    }
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    // The directory itself is its marker, listed first as S3 lists a `dir/` object: an empty
    // directory is then found like one with children.
    if !parts.is_empty() && after.is_none() {
        if let Ok(meta) = root.stat(&strs(parts)) {
            keyed.insert(0, (prefix.to_string(), meta));
        }
    }
    let truncated = keyed.len() > max_keys;
    keyed.truncate(max_keys);
    let next_token = if truncated {
        keyed.last().map(|(k, _)| k.clone())
    } else {
        None
    };
    let mut page = ListPage {
        next_token,
        ..ListPage::default()
    };
    for (key, kind) in &special {
        let past_start = after.is_none_or(|a| key.as_str() > a);
        let before_end = page
            .next_token
            .as_deref()
            .is_none_or(|end| key.as_str() <= end);
        if past_start && before_end {
            skipped(key, *kind);
            page.skipped += 1;
        }
    }
    for (key, meta) in keyed {
        if key == prefix {
            page.objects.push(info_of(key, &meta));
        } else if meta.kind == Kind::Dir {
            page.prefixes.push(key);
        } else {
            page.objects.push(info_of(key, &meta));
        }
    }
    Ok(page)
}

fn check_upload_id(upload_id: &str) -> StoreResult<()> {
    if upload_id.contains(['/', '\0']) || upload_id.starts_with('.') || upload_id.is_empty() {
        return Err(StoreError::Rejected(format!("bad upload id {upload_id:?}")));
    }
    Ok(())
}
