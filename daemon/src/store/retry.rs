//! Retries with exponential backoff under one deadline per operation.
//!
//! Each store call is retried while its error is retryable and the deadline has not passed;
//! every attempt is also cut off at the deadline, so a hung connection cannot outlive it.
//! When the deadline passes the caller gets [`StoreError::DeadlineExceeded`] (EIO above).
//! Nothing is sticky: the next call starts afresh, so the mount recovers by itself as soon as
//! the store answers again.

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::time::Instant;

use super::{ListPage, ObjectInfo, ObjectStore, PosixMeta, StoreError, StoreResult, UploadedPart};

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Total time one operation may take, retries included.
    pub deadline: Duration,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            deadline: Duration::from_secs(30),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl RetryPolicy {
    pub async fn run<T, F, Fut>(&self, what: &str, mut attempt: F) -> StoreResult<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let deadline = Instant::now() + self.deadline;
        let mut backoff = self.first_backoff;
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let last = match tokio::time::timeout_at(deadline, attempt()).await {
                Ok(Ok(value)) => {
                    if attempts > 1 {
                        tracing::info!(op = what, attempts, "store answered again after retries");
                    }
                    return Ok(value);
                }
                Ok(Err(e)) if !e.is_retryable() => return Err(e),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "attempt timed out".to_string(),
            };
            let now = Instant::now();
            if now + backoff >= deadline {
                tracing::warn!(op = what, attempts, error = %last, "giving up: deadline reached");
                return Err(StoreError::DeadlineExceeded { attempts, last });
            }
            tracing::debug!(op = what, attempts, error = %last, ?backoff, "retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.max_backoff);
        }
    }
}

/// An [`ObjectStore`] that retries the one it wraps.
pub struct RetryingStore {
    inner: Arc<dyn ObjectStore>,
    policy: RetryPolicy,
}

impl RetryingStore {
    pub fn new(inner: Arc<dyn ObjectStore>, policy: RetryPolicy) -> Self {
        RetryingStore { inner, policy }
    }
}

#[async_trait]
impl ObjectStore for RetryingStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn is_reserved(&self, key: &str) -> bool {
        self.inner.is_reserved(key)
    }

    /// Local files need no retries: opening one either works or fails for good.
    fn open_local(&self, key: &str, etag: Option<&str>) -> Option<StoreResult<std::fs::File>> {
        self.inner.open_local(key, etag)
    }

    async fn check(&self, prefix: &str) -> StoreResult<()> {
        self.policy.run("check", || self.inner.check(prefix)).await
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        self.policy.run("head", || self.inner.head(key)).await
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<Bytes> {
        self.policy
            .run("get", || self.inner.get_range(key, range.clone(), etag))
            .await
    }

    async fn list(
        &self,
        prefix: &str,
        token: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        self.policy
            .run("list", || self.inner.list(prefix, token, max_keys))
            .await
    }

    async fn put(&self, key: &str, body: Bytes, meta: &PosixMeta) -> StoreResult<Option<String>> {
        self.policy
            .run("put", || self.inner.put(key, body.clone(), meta))
            .await
    }

    async fn create_upload(&self, key: &str, meta: &PosixMeta) -> StoreResult<String> {
        self.policy
            .run("create_upload", || self.inner.create_upload(key, meta))
            .await
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> StoreResult<UploadedPart> {
        self.policy
            .run("upload_part", || {
                self.inner.upload_part(key, upload_id, number, body.clone())
            })
            .await
    }

    /// Safe to retry: copying the same range into the same part number again replaces it.
    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<Option<UploadedPart>> {
        self.policy
            .run("copy_part", || {
                self.inner
                    .copy_part(key, upload_id, number, range.clone(), etag)
            })
            .await
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> StoreResult<Option<String>> {
        self.policy
            .run("complete_upload", || {
                self.inner.complete_upload(key, upload_id, parts)
            })
            .await
    }

    /// Retried like `put`. A conditional write that succeeded but whose answer was lost is
    /// refused when sent again (the object now carries its own ETag): reported as changed.
    async fn put_if_match(
        &self,
        key: &str,
        body: Bytes,
        meta: &PosixMeta,
        etag: &str,
    ) -> StoreResult<Option<String>> {
        self.policy
            .run("put_if_match", || {
                self.inner.put_if_match(key, body.clone(), meta, etag)
            })
            .await
    }

    async fn complete_upload_if_match(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
        etag: &str,
    ) -> StoreResult<Option<String>> {
        self.policy
            .run("complete_upload_if_match", || {
                self.inner
                    .complete_upload_if_match(key, upload_id, parts, etag)
            })
            .await
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.policy
            .run("abort_upload", || self.inner.abort_upload(key, upload_id))
            .await
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.policy.run("delete", || self.inner.delete(key)).await
    }

    async fn copy(&self, from: &str, to: &str) -> StoreResult<()> {
        self.policy.run("copy", || self.inner.copy(from, to)).await
    }

    /// Safe to retry: the copy is conditional on the ETag, and copying the same bytes onto
    /// themselves again changes nothing.
    async fn set_meta(
        &self,
        key: &str,
        etag: Option<&str>,
        size: u64,
        meta: &PosixMeta,
    ) -> StoreResult<Option<String>> {
        self.policy
            .run("set_meta", || self.inner.set_meta(key, etag, size, meta))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(deadline_ms: u64) -> RetryPolicy {
        RetryPolicy {
            deadline: Duration::from_millis(deadline_ms),
            first_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        }
    }

    #[tokio::test]
    async fn retries_transient_errors_until_success() {
        let calls = AtomicU32::new(0);
        let out = quick(2000)
            .run("t", || async {
                if calls.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(StoreError::Unavailable("down".into()))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(out.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn permanent_errors_are_not_retried() {
        let calls = AtomicU32::new(0);
        let out: StoreResult<()> = quick(2000)
            .run("t", || async {
                calls.fetch_add(1, Ordering::SeqCst);
                Err(StoreError::NotFound)
            })
            .await;
        assert!(matches!(out, Err(StoreError::NotFound)));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_even_if_an_attempt_hangs() {
        let start = std::time::Instant::now();
        let out: StoreResult<()> = quick(200)
            .run("t", || async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(())
            })
            .await;
        assert!(matches!(out, Err(StoreError::DeadlineExceeded { .. })));
        assert!(start.elapsed() < Duration::from_secs(2));
        assert_eq!(out.unwrap_err().errno(), libc::EIO);
    }
}
