//! A local directory as an object store: the embedded default, needing no server.
//!
//! Key `a/b/c` is the file `ROOT/a/b/c`; a key ending in `/` is a directory (the equivalent of
//! an S3 directory marker). Multipart uploads are staged under `ROOT/.berth-uploads`, which
//! listings hide, and land with a rename, so a reader never sees a half-written object.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::{ListPage, ObjectInfo, ObjectStore, StoreError, StoreResult, UploadedPart};

const UPLOADS_DIR: &str = ".berth-uploads";

pub struct LocalStore {
    root: PathBuf,
    next_upload: AtomicU64,
}

impl LocalStore {
    pub fn open(root: &Path) -> io::Result<LocalStore> {
        fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(LocalStore {
            root,
            next_upload: AtomicU64::new(0),
        })
    }

    /// Maps a key to a path under the root, refusing anything that could step outside it.
    fn path_of(&self, key: &str) -> StoreResult<PathBuf> {
        let trimmed = key.strip_suffix('/').unwrap_or(key);
        let mut path = self.root.clone();
        if trimmed.is_empty() {
            return Ok(path);
        }
        for part in trimmed.split('/') {
            if part.is_empty() || part == "." || part == ".." || part.contains('\0') {
                return Err(StoreError::Rejected(format!(
                    "key {key:?} is not a safe path"
                )));
            }
            path.push(part);
        }
        Ok(path)
    }

    fn uploads(&self) -> PathBuf {
        self.root.join(UPLOADS_DIR)
    }
}

fn io_err(context: &str, e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound => StoreError::NotFound,
        io::ErrorKind::PermissionDenied => StoreError::AccessDenied(format!("{context}: {e}")),
        _ => StoreError::Rejected(format!("{context}: {e}")),
    }
}

fn etag_of(meta: &fs::Metadata) -> String {
    format!(
        "\"{:x}-{:x}-{:x}\"",
        meta.ino(),
        meta.mtime_nsec() + meta.mtime() * 1_000_000_000,
        meta.len()
    )
}

fn info_of(key: String, meta: &fs::Metadata) -> ObjectInfo {
    ObjectInfo {
        key,
        size: meta.len(),
        etag: Some(etag_of(meta)),
        last_modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Rejected(format!("local store task failed: {e}")))?
}

fn write_atomically(target: &Path, staging: &Path, body: &[u8]) -> StoreResult<()> {
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(|e| io_err("create parent", e))?;
    }
    let mut f = fs::File::create(staging).map_err(|e| io_err("create staging file", e))?;
    f.write_all(body)
        .map_err(|e| io_err("write staging file", e))?;
    fs::rename(staging, target).map_err(|e| io_err("rename into place", e))
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    async fn check(&self, _prefix: &str) -> StoreResult<()> {
        let root = self.root.clone();
        blocking(move || {
            fs::read_dir(&root).map_err(|e| io_err("read root", e))?;
            Ok(())
        })
        .await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        blocking(move || {
            let meta = fs::metadata(&path).map_err(|e| io_err("stat", e))?;
            if meta.is_dir() != key.ends_with('/') {
                return Err(StoreError::NotFound);
            }
            Ok(info_of(key, &meta))
        })
        .await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<Bytes> {
        let path = self.path_of(key)?;
        let etag = etag.map(str::to_string);
        blocking(move || {
            let file = fs::File::open(&path).map_err(|e| io_err("open", e))?;
            let meta = file.metadata().map_err(|e| io_err("stat", e))?;
            if meta.is_dir() {
                return Err(StoreError::NotFound);
            }
            if etag.is_some_and(|want| want != etag_of(&meta)) {
                return Err(StoreError::Changed);
            }
            let end = range.end.min(meta.len());
            let mut buf = vec![0u8; end.saturating_sub(range.start) as usize];
            file.read_exact_at(&mut buf, range.start)
                .map_err(|e| io_err("read", e))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    fn open_local(&self, key: &str, etag: Option<&str>) -> Option<StoreResult<fs::File>> {
        let open = || {
            let file = fs::File::open(self.path_of(key)?).map_err(|e| io_err("open", e))?;
            let meta = file.metadata().map_err(|e| io_err("stat", e))?;
            if meta.is_dir() {
                return Err(StoreError::NotFound);
            }
            if etag.is_some_and(|want| want != etag_of(&meta)) {
                return Err(StoreError::Changed);
            }
            Ok(file)
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
        let dir = self.path_of(prefix)?;
        let prefix = prefix.to_string();
        let after = token.map(str::to_string);
        blocking(move || {
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                // Nothing below a missing path or a file: an empty listing, as in S3.
                Err(e)
                    if e.kind() == io::ErrorKind::NotFound
                        || e.raw_os_error() == Some(libc::ENOTDIR) =>
                {
                    return Ok(ListPage::default())
                }
                Err(e) => return Err(io_err("list", e)),
            };
            // (key, metadata) in S3 order: byte order of the full key, directories ending in '/'.
            let mut keyed = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| io_err("list", e))?;
                let Ok(name) = entry.file_name().into_string() else {
                    continue; // not UTF-8: cannot be an S3 key
                };
                if prefix.is_empty() && name == UPLOADS_DIR {
                    continue;
                }
                let Ok(meta) = fs::metadata(entry.path()) else {
                    continue; // vanished or dangling symlink
                };
                let key = if meta.is_dir() {
                    format!("{prefix}{name}/")
                } else {
                    format!("{prefix}{name}")
                };
                if after.as_deref().is_some_and(|a| key.as_str() <= a) {
                    continue;
                }
                keyed.push((key, meta));
            }
            keyed.sort_by(|a, b| a.0.cmp(&b.0));
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
            for (key, meta) in keyed {
                if meta.is_dir() {
                    page.prefixes.push(key);
                } else {
                    page.objects.push(info_of(key, &meta));
                }
            }
            Ok(page)
        })
        .await
    }

    async fn put(&self, key: &str, body: Bytes) -> StoreResult<Option<String>> {
        let path = self.path_of(key)?;
        if key.ends_with('/') {
            return blocking(move || {
                fs::create_dir_all(&path).map_err(|e| io_err("mkdir", e))?;
                Ok(None)
            })
            .await;
        }
        let staging = self.uploads().join(format!(
            "put-{}-{}",
            std::process::id(),
            self.next_upload.fetch_add(1, Ordering::Relaxed)
        ));
        let uploads = self.uploads();
        blocking(move || {
            fs::create_dir_all(&uploads).map_err(|e| io_err("create staging dir", e))?;
            write_atomically(&path, &staging, &body)?;
            let meta = fs::metadata(&path).map_err(|e| io_err("stat", e))?;
            Ok(Some(etag_of(&meta)))
        })
        .await
    }

    async fn create_upload(&self, key: &str) -> StoreResult<String> {
        self.path_of(key)?;
        let id = format!(
            "mpu-{}-{}",
            std::process::id(),
            self.next_upload.fetch_add(1, Ordering::Relaxed)
        );
        let dir = self.uploads().join(&id);
        blocking(move || {
            fs::create_dir_all(&dir).map_err(|e| io_err("create upload dir", e))?;
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
        let dir = self.upload_dir(upload_id)?;
        blocking(move || {
            let path = dir.join(format!("{number:05}"));
            fs::write(&path, &body).map_err(|e| io_err("write part", e))?;
            Ok(UploadedPart {
                number,
                etag: format!("\"part-{number}-{}\"", body.len()),
            })
        })
        .await
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> StoreResult<Option<String>> {
        let dir = self.upload_dir(upload_id)?;
        let target = self.path_of(key)?;
        let numbers: Vec<i32> = parts.iter().map(|p| p.number).collect();
        blocking(move || {
            let assembled = dir.join("assembled");
            let mut out = fs::File::create(&assembled).map_err(|e| io_err("assemble", e))?;
            for n in numbers {
                let mut part = fs::File::open(dir.join(format!("{n:05}")))
                    .map_err(|e| io_err("open part", e))?;
                io::copy(&mut part, &mut out).map_err(|e| io_err("assemble", e))?;
            }
            drop(out);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| io_err("create parent", e))?;
            }
            fs::rename(&assembled, &target).map_err(|e| io_err("rename into place", e))?;
            let _ = fs::remove_dir_all(&dir);
            let meta = fs::metadata(&target).map_err(|e| io_err("stat", e))?;
            Ok(Some(etag_of(&meta)))
        })
        .await
    }

    async fn abort_upload(&self, _key: &str, upload_id: &str) -> StoreResult<()> {
        let dir = self.upload_dir(upload_id)?;
        blocking(move || {
            let _ = fs::remove_dir_all(dir);
            Ok(())
        })
        .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        let path = self.path_of(key)?;
        let is_dir = key.ends_with('/');
        blocking(move || {
            let result = if is_dir {
                fs::remove_dir(&path)
            } else {
                fs::remove_file(&path)
            };
            match result {
                // Like S3: deleting what is not there succeeds.
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                other => other.map_err(|e| io_err("delete", e)),
            }
        })
        .await
    }

    async fn copy(&self, from: &str, to: &str) -> StoreResult<()> {
        let source = self.path_of(from)?;
        let target = self.path_of(to)?;
        let staging = self.uploads().join(format!(
            "copy-{}-{}",
            std::process::id(),
            self.next_upload.fetch_add(1, Ordering::Relaxed)
        ));
        let uploads = self.uploads();
        blocking(move || {
            fs::create_dir_all(&uploads).map_err(|e| io_err("create staging dir", e))?;
            let mut src = fs::File::open(&source).map_err(|e| io_err("open source", e))?;
            src.seek(SeekFrom::Start(0))
                .map_err(|e| io_err("seek", e))?;
            let mut body = Vec::new();
            src.read_to_end(&mut body)
                .map_err(|e| io_err("read source", e))?;
            write_atomically(&target, &staging, &body)
        })
        .await
    }
}

impl LocalStore {
    fn upload_dir(&self, upload_id: &str) -> StoreResult<PathBuf> {
        if upload_id.contains('/') || upload_id.starts_with('.') || upload_id.is_empty() {
            return Err(StoreError::Rejected(format!("bad upload id {upload_id:?}")));
        }
        Ok(self.uploads().join(upload_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lists_in_s3_order_with_pages_and_markers() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        for key in ["b", "a-1", "a/x", "c/"] {
            store.put(key, Bytes::from_static(b"hi")).await.unwrap();
        }
        let page = store.list("", None, 2).await.unwrap();
        assert_eq!(
            page.objects
                .iter()
                .map(|o| o.key.as_str())
                .collect::<Vec<_>>(),
            ["a-1"]
        );
        assert_eq!(page.prefixes, ["a/"]);
        let page = store
            .list("", page.next_token.as_deref(), 10)
            .await
            .unwrap();
        assert_eq!(page.objects[0].key, "b");
        assert_eq!(page.prefixes, ["c/"]);
        assert!(page.next_token.is_none());
    }

    #[tokio::test]
    async fn multipart_upload_assembles_parts_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let id = store.create_upload("d/f").await.unwrap();
        let p2 = store
            .upload_part("d/f", &id, 2, Bytes::from_static(b"world"))
            .await
            .unwrap();
        let p1 = store
            .upload_part("d/f", &id, 1, Bytes::from_static(b"hello "))
            .await
            .unwrap();
        store.complete_upload("d/f", &id, &[p1, p2]).await.unwrap();
        assert_eq!(fs::read(dir.path().join("d/f")).unwrap(), b"hello world");
        let info = store.head("d/f").await.unwrap();
        let got = store
            .get_range("d/f", 6..11, info.etag.as_deref())
            .await
            .unwrap();
        assert_eq!(&got[..], b"world");
        assert!(store.list("", None, 10).await.unwrap().prefixes == ["d/"]);
    }

    /// Regression: a lookup lists `name/` to see whether `name` is a directory; for a file
    /// that must be an empty listing, not an error (it made `cat FILE` fail with EIO).
    #[tokio::test]
    async fn listing_below_a_file_or_a_missing_path_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        store.put("f", Bytes::from_static(b"x")).await.unwrap();
        for prefix in ["f/", "missing/", "f/deeper/"] {
            let page = store.list(prefix, None, 10).await.unwrap();
            assert!(
                page.objects.is_empty() && page.prefixes.is_empty(),
                "{prefix}"
            );
        }
    }

    #[tokio::test]
    async fn refuses_keys_that_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        for key in ["../x", "a/../../x", "a//b", "./a"] {
            assert!(
                matches!(store.head(key).await, Err(StoreError::Rejected(_))),
                "{key}"
            );
        }
    }
}
