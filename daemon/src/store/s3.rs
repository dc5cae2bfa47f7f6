//! S3 and S3-compatible stores through `aws-sdk-s3`.
//!
//! The SDK's own retries are switched off: [`super::RetryingStore`] owns retries and deadlines,
//! so a caller's deadline is one number, not the product of two retry layers. Checksums are
//! computed and validated only when the API requires it, because third-party servers
//! (SeaweedFS, MinIO, COS, OSS) differ in which flexible checksums they accept.

use std::ops::Range;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, MetadataDirective};
use aws_sdk_s3::Client;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use bytes::Bytes;

use super::{ListPage, ObjectInfo, ObjectStore, PosixMeta, StoreError, StoreResult, UploadedPart};

/// The largest object one CopyObject takes (S3's limit); larger ones are copied in parts.
pub const MAX_COPY_SIZE: u64 = 5 << 30;

/// How to reach a bucket.
#[derive(Clone, Debug, Default)]
pub struct S3Options {
    pub bucket: String,
    /// Custom endpoint (MinIO, SeaweedFS, COS, OSS...). Implies path-style addressing unless
    /// `virtual_hosted` is set.
    pub endpoint_url: Option<String>,
    pub region: Option<String>,
    pub virtual_hosted: bool,
    /// Objects above this size get their metadata replaced by a multipart copy, in parts of
    /// this size; `None`: [`MAX_COPY_SIZE`]. Lower only to test the multipart path.
    pub copy_limit: Option<u64>,
}

pub struct S3Store {
    client: Client,
    bucket: String,
    copy_limit: u64,
}

impl S3Store {
    /// Builds a client from the standard AWS configuration chain (env vars, profile files,
    /// web identity, container and instance credentials) plus the given overrides.
    pub async fn connect(opts: &S3Options) -> S3Store {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &opts.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let shared = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&shared)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(3))
                    .build(),
            )
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if shared.region().is_none() {
            builder = builder.region(Region::new("us-east-1"));
        }
        if let Some(url) = &opts.endpoint_url {
            builder = builder
                .endpoint_url(url.clone())
                .force_path_style(!opts.virtual_hosted);
        }
        S3Store {
            client: Client::from_conf(builder.build()),
            bucket: opts.bucket.clone(),
            copy_limit: opts
                .copy_limit
                .unwrap_or(MAX_COPY_SIZE)
                .clamp(5 << 20, MAX_COPY_SIZE),
        }
    }
}

/// Maps an SDK error to a [`StoreError`], deciding once what is worth retrying.
fn classify<E>(err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>, bucket: &str) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(ctx) => {
            let status = ctx.raw().status().as_u16();
            let code = ctx.err().code().unwrap_or("");
            let message = ctx.err().message().unwrap_or("");
            let detail = format!("HTTP {status} {code} {message}").trim().to_string();
            match (status, code) {
                (_, "NoSuchBucket") => StoreError::NoSuchBucket(bucket.to_string()),
                (_, "NoSuchKey") | (_, "NotFound") | (404, _) => StoreError::NotFound,
                (412, _) | (_, "PreconditionFailed") => StoreError::Changed,
                // A header the store does not implement (a conditional write): not transient.
                (501, _) | (_, "NotImplemented") => StoreError::Unsupported(detail),
                (401 | 403, _)
                | (_, "InvalidAccessKeyId")
                | (_, "SignatureDoesNotMatch")
                | (_, "AccessDenied") => StoreError::AccessDenied(detail),
                (408 | 429, _) | (500..=599, _) => StoreError::Unavailable(detail),
                (_, "SlowDown" | "RequestTimeout" | "InternalError") => {
                    StoreError::Unavailable(detail)
                }
                _ => StoreError::Rejected(detail),
            }
        }
        SdkError::ConstructionFailure(_) => StoreError::Rejected(error_chain(&err)),
        // Timeouts, connection failures and unparseable responses may all pass.
        _ => StoreError::Unavailable(error_chain(&err)),
    }
}

/// The SDK's Display is terse ("dispatch failure"); the cause chain says what happened.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}

fn to_system_time(t: Option<&aws_smithy_types::DateTime>) -> SystemTime {
    t.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Percent-encodes a key for the `x-amz-copy-source` header (keeps `/` and unreserved bytes).
fn encode_copy_source(bucket: &str, key: &str) -> String {
    let mut out = String::with_capacity(bucket.len() + key.len() + 1);
    out.push_str(bucket);
    out.push('/');
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    async fn check(&self, prefix: &str) -> StoreResult<()> {
        self.client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(())
    }

    async fn head(&self, key: &str) -> StoreResult<ObjectInfo> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(ObjectInfo {
            key: key.to_string(),
            size: out.content_length().unwrap_or(0).max(0) as u64,
            etag: out.e_tag().map(str::to_string),
            last_modified: to_system_time(out.last_modified()),
            meta: Some(PosixMeta::from_pairs(
                out.metadata()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )),
        })
    }

    async fn get_range(
        &self,
        key: &str,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<Bytes> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_if_match(etag.map(str::to_string))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        let body = out
            .body
            .collect()
            .await
            .map_err(|e| StoreError::Unavailable(format!("reading body: {}", error_chain(&e))))?
            .into_bytes();
        let expected = range.end - range.start;
        if body.len() as u64 != expected {
            return Err(StoreError::Unavailable(format!(
                "short body for {key} {range:?}: got {} bytes",
                body.len()
            )));
        }
        Ok(body)
    }

    async fn list(
        &self,
        prefix: &str,
        token: Option<&str>,
        max_keys: usize,
    ) -> StoreResult<ListPage> {
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .delimiter("/")
            .max_keys(max_keys.min(1000) as i32)
            .set_continuation_token(token.map(str::to_string))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        let objects = out
            .contents()
            .iter()
            .filter_map(|o| {
                Some(ObjectInfo {
                    key: o.key()?.to_string(),
                    size: o.size().unwrap_or(0).max(0) as u64,
                    etag: o.e_tag().map(str::to_string),
                    last_modified: to_system_time(o.last_modified()),
                    meta: None,
                })
            })
            .collect();
        let prefixes = out
            .common_prefixes()
            .iter()
            .filter_map(|p| p.prefix().map(str::to_string))
            .collect();
        let next_token = if out.is_truncated().unwrap_or(false) {
            out.next_continuation_token().map(str::to_string)
        } else {
            None
        };
        Ok(ListPage {
            objects,
            prefixes,
            next_token,
            skipped: 0,
        })
    }

    async fn put(&self, key: &str, body: Bytes, meta: &PosixMeta) -> StoreResult<Option<String>> {
        self.put_object(key, body, meta, None).await
    }

    async fn put_if_match(
        &self,
        key: &str,
        body: Bytes,
        meta: &PosixMeta,
        etag: &str,
    ) -> StoreResult<Option<String>> {
        self.put_object(key, body, meta, Some(etag)).await
    }

    async fn create_upload(&self, key: &str, meta: &PosixMeta) -> StoreResult<String> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(user_metadata(meta))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        out.upload_id().map(str::to_string).ok_or_else(|| {
            StoreError::Rejected("CreateMultipartUpload returned no upload id".into())
        })
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        body: Bytes,
    ) -> StoreResult<UploadedPart> {
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        let etag = out
            .e_tag()
            .map(str::to_string)
            .ok_or_else(|| StoreError::Rejected(format!("UploadPart {number} returned no ETag")))?;
        Ok(UploadedPart { number, etag })
    }

    async fn copy_part(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<Option<UploadedPart>> {
        self.upload_part_copy(key, upload_id, number, range, etag)
            .await
            .map(Some)
    }

    async fn complete_upload(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
    ) -> StoreResult<Option<String>> {
        self.complete(key, upload_id, parts, None).await
    }

    async fn complete_upload_if_match(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
        etag: &str,
    ) -> StoreResult<Option<String>> {
        self.complete(key, upload_id, parts, Some(etag)).await
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> StoreResult<()> {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(())
    }

    async fn delete(&self, key: &str) -> StoreResult<()> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(())
    }

    async fn copy(&self, from: &str, to: &str) -> StoreResult<()> {
        self.client
            .copy_object()
            .bucket(&self.bucket)
            .key(to)
            .copy_source(encode_copy_source(&self.bucket, from))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(())
    }

    async fn set_meta(
        &self,
        key: &str,
        etag: Option<&str>,
        size: u64,
        meta: &PosixMeta,
    ) -> StoreResult<Option<String>> {
        if size > self.copy_limit {
            return self.set_meta_multipart(key, etag, size, meta).await;
        }
        let out = self
            .client
            .copy_object()
            .bucket(&self.bucket)
            .key(key)
            .copy_source(encode_copy_source(&self.bucket, key))
            .set_copy_source_if_match(etag.map(str::to_string))
            .metadata_directive(MetadataDirective::Replace)
            .set_metadata(user_metadata(meta))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(out
            .copy_object_result()
            .and_then(|r| r.e_tag())
            .map(str::to_string))
    }
}

impl S3Store {
    /// PutObject, with If-Match when `if_match` is given.
    async fn put_object(
        &self,
        key: &str,
        body: Bytes,
        meta: &PosixMeta,
        if_match: Option<&str>,
    ) -> StoreResult<Option<String>> {
        let out = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .set_metadata(user_metadata(meta))
            .set_if_match(if_match.map(str::to_string))
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(out.e_tag().map(str::to_string))
    }

    /// CompleteMultipartUpload, with If-Match when `if_match` is given.
    async fn complete(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[UploadedPart],
        if_match: Option<&str>,
    ) -> StoreResult<Option<String>> {
        let parts = parts
            .iter()
            .map(|p| {
                CompletedPart::builder()
                    .part_number(p.number)
                    .e_tag(&p.etag)
                    .build()
            })
            .collect();
        let out = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .set_if_match(if_match.map(str::to_string))
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        Ok(out.e_tag().map(str::to_string))
    }

    /// Objects larger than one CopyObject takes: a multipart upload onto the same key whose
    /// parts are server-side copies of ranges of the object (each conditional on `etag`).
    async fn set_meta_multipart(
        &self,
        key: &str,
        etag: Option<&str>,
        size: u64,
        meta: &PosixMeta,
    ) -> StoreResult<Option<String>> {
        let id = self.create_upload(key, meta).await?;
        let copied = self.copy_parts(key, &id, etag, size).await;
        let parts = match copied {
            Ok(parts) => parts,
            Err(e) => {
                if let Err(abort) = self.abort_upload(key, &id).await {
                    tracing::warn!(key, error = %abort, "could not abort a metadata copy's upload");
                }
                return Err(e);
            }
        };
        self.complete_upload(key, &id, &parts).await
    }

    async fn copy_parts(
        &self,
        key: &str,
        upload_id: &str,
        etag: Option<&str>,
        size: u64,
    ) -> StoreResult<Vec<UploadedPart>> {
        let mut parts = Vec::new();
        let mut start = 0;
        let mut number = 1;
        while start < size {
            let end = (start + self.copy_limit).min(size);
            parts.push(
                self.upload_part_copy(key, upload_id, number, start..end, etag)
                    .await?,
            );
            start = end;
            number += 1;
        }
        Ok(parts)
    }

    /// UploadPartCopy of `range` of `key` itself, conditional on `etag`.
    async fn upload_part_copy(
        &self,
        key: &str,
        upload_id: &str,
        number: i32,
        range: Range<u64>,
        etag: Option<&str>,
    ) -> StoreResult<UploadedPart> {
        let out = self
            .client
            .upload_part_copy()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number)
            .copy_source(encode_copy_source(&self.bucket, key))
            .copy_source_range(format!("bytes={}-{}", range.start, range.end - 1))
            .set_copy_source_if_match(etag.map(str::to_string))
            .send()
            .await
            .map_err(|e| classify(e, &self.bucket))?;
        let etag = out
            .copy_part_result()
            .and_then(|r| r.e_tag())
            .map(str::to_string)
            .ok_or_else(|| {
                StoreError::Rejected(format!("UploadPartCopy {number} returned no ETag"))
            })?;
        Ok(UploadedPart { number, etag })
    }
}

/// The S3 user metadata carrying `meta`; `None` (no header) when nothing is stored.
fn user_metadata(meta: &PosixMeta) -> Option<std::collections::HashMap<String, String>> {
    let pairs = meta.to_pairs();
    (!pairs.is_empty()).then(|| pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

#[cfg(test)]
mod tests {
    use super::encode_copy_source;

    #[test]
    fn copy_source_is_percent_encoded() {
        assert_eq!(encode_copy_source("b", "a/b c+d.txt"), "b/a/b%20c%2Bd.txt");
        assert_eq!(encode_copy_source("b", "é"), "b/%C3%A9");
    }
}
