//! Object stores: one trait, an S3 implementation and a local-directory implementation.
//!
//! Everything above this module speaks in keys relative to the bucket root; the mount prefix is
//! applied by the namespace. Errors are classified here once, so that the retry policy and the
//! errno mapping above never look at SDK types.

mod local;
pub mod meta;
mod retry;
mod s3;

use std::ops::Range;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

pub use local::{openat2_supported, LocalStore, Resolver as LocalResolver};
pub use meta::PosixMeta;
pub use retry::{RetryPolicy, RetryingStore};
pub use s3::{S3Options, S3Store, MAX_COPY_SIZE};

/// Metadata of one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub key: String,
    pub size: u64,
    /// Opaque version tag; a new value means new content.
    pub etag: Option<String>,
    pub last_modified: SystemTime,
    /// The POSIX attributes stored on the object; `None` when the answer did not say
    /// (listings carry no user metadata: only HEAD does).
    pub meta: Option<PosixMeta>,
}

/// One page of a delimited (`/`) listing.
#[derive(Clone, Debug, Default)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    /// Common prefixes, each ending in `/`.
    pub prefixes: Vec<String>,
    /// Token for the next page; `None` when the listing is complete.
    pub next_token: Option<String>,
    /// Entries the store left out of this page because it does not serve them (a local
    /// directory's symlinks, FIFOs, sockets and device nodes); counted like odd keys.
    pub skipped: u64,
}

/// A part of a multipart upload that the store accepted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadedPart {
    pub number: i32,
    pub etag: String,
}

#[derive(Debug, thiserror::Error, Clone)]
pub enum StoreError {
    #[error("object not found")]
    NotFound,
    #[error("object changed since it was opened")]
    Changed,
    #[error("bucket does not exist: {0}")]
    NoSuchBucket(String),
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// Worth retrying: network errors, timeouts, throttling, 5xx.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The store rejected the request for a reason a retry will not fix.
    #[error("store error: {0}")]
    Rejected(String),
    /// The store cannot do this at all (e.g. a local directory on a filesystem without
    /// extended attributes cannot keep POSIX metadata).
    #[error("not supported by the store: {0}")]
    Unsupported(String),
    /// Retries ran out before the store answered.
    #[error("store did not answer within the deadline ({attempts} attempts): {last}")]
    DeadlineExceeded { attempts: u32, last: String },
}

impl StoreError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// The errno a filesystem caller sees for this error.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::NotFound => libc::ENOENT,
            StoreError::AccessDenied(_) => libc::EACCES,
            StoreError::Unsupported(_) => libc::EOPNOTSUPP,
            StoreError::Changed
            | StoreError::NoSuchBucket(_)
            | StoreError::Unavailable(_)
            | StoreError::Rejected(_)
            | StoreError::DeadlineExceeded { .. } => libc::EIO,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The operations berth needs from an object store. Listings are always delimited by `/`.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Human-readable name for logs, e.g. `s3://bucket` or `/srv/data`.
    fn describe(&self) -> String;

    /// Whether `key` is the store's own (a local directory's staging area): no client may
    /// look it up, list it or create it. The store refuses such keys itself; this lets the
    /// namespace refuse them before asking.
    fn is_reserved(&self, _key: &str) -> bool {
        false
    }

    /// Cheap check that the store is reachable and usable (bucket exists, credentials work).
    async fn check(&self, prefix: &str) -> StoreResult<()>;

    async fn head(&self, key: &str) -> StoreResult<ObjectInfo>;

    /// Reads `range` of `key`. With `etag`, fails with [`StoreError::Changed`] if the object
    /// no longer carries that tag.
    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<Bytes>;

    /// Lists `prefix` (empty or ending in `/`) with delimiter `/`.
    /// The object as a local file opened for reading, for stores that are a local directory;
    /// `None` for remote stores. Readers use it to read straight into the caller's buffers
    /// (for virtio-fs: guest memory), without an intermediate copy. With `etag`, fails with
    /// [`StoreError::Changed`] if the object no longer carries that tag.
    fn open_local(&self, _key: &str, _etag: Option<&str>) -> Option<StoreResult<std::fs::File>> {
        None
    }

    async fn list(
        &self,
        prefix: &str,
        token: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage>;

    /// Writes `key` whole, with `meta` as its stored POSIX attributes.
    async fn put(&self, key: &str, body: Bytes, meta: &PosixMeta) -> StoreResult<Option<String>>;

    /// Starts a multipart upload of `key`; the object it completes carries `meta`.
    async fn create_upload(&self, key: &str, meta: &PosixMeta) -> StoreResult<String>;

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> StoreResult<UploadedPart>;

    /// Part `number` of upload `upload_id` of `key` as a copy, made by the store itself, of
    /// `range` of the object `key` is now, only if that still carries `etag`
    /// ([`StoreError::Changed`] otherwise): how an append keeps the old bytes without reading
    /// them. `Ok(None)` from stores that cannot (the caller sends the bytes itself).
    async fn copy_part(
        &self,
        _key: &str,
        _upload_id: &str,
        _number: i32,
        _range: Range<u64>,
        _etag: Option<&str>,
    ) -> StoreResult<Option<UploadedPart>> {
        Ok(None)
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> StoreResult<Option<String>>;

    /// [`ObjectStore::put`], only if `key` still carries `etag` (If-Match; [`StoreError::Changed`]
    /// otherwise). Stores that cannot make a write conditional answer
    /// [`StoreError::Unsupported`], and the caller checks with a HEAD instead.
    async fn put_if_match(
        &self,
        _key: &str,
        _body: Bytes,
        _meta: &PosixMeta,
        _etag: &str,
    ) -> StoreResult<Option<String>> {
        Err(StoreError::Unsupported("conditional writes".into()))
    }

    /// [`ObjectStore::complete_upload`], only if `key` still carries `etag`; as
    /// [`ObjectStore::put_if_match`].
    async fn complete_upload_if_match(
        &self,
        _key: &str,
        _upload_id: &str,
        _parts: &[UploadedPart],
        _etag: &str,
    ) -> StoreResult<Option<String>> {
        Err(StoreError::Unsupported("conditional writes".into()))
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> StoreResult<()>;

    async fn delete(&self, key: &str) -> StoreResult<()>;

    /// Server-side copy of a whole object, its stored metadata with it.
    async fn copy(&self, from: &str, to: &str) -> StoreResult<()>;

    /// Replaces the stored POSIX attributes of `key` (`size` bytes), only if it still
    /// carries `etag` ([`StoreError::Changed`] otherwise): the bytes stay as they are. For S3
    /// a copy of the object onto itself. Returns the object's ETag afterwards.
    async fn set_meta(
        &self,
        key: &str,
        etag: Option<&str>,
        size: u64,
        meta: &PosixMeta,
    ) -> StoreResult<Option<String>>;
}
