//! A blocking wrapper around the AWS SDK, for the tests to check what the
//! bucket really holds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use crate::util::rt;

/// A client for one endpoint.
#[derive(Clone)]
pub struct S3 {
    client: Client,
}

/// What HeadObject says about an object.
#[derive(Debug, Clone)]
pub struct ObjectInfo {
    pub size: u64,
    pub last_modified: SystemTime,
}

impl S3 {
    /// `patient`: retries and long timeouts for tests; otherwise one quick
    /// attempt (readiness probes).
    pub fn new(endpoint: &str, access_key: &str, secret_key: &str, patient: bool) -> S3 {
        let creds = Credentials::new(access_key, secret_key, None, None, "berth-e2e");
        let (retry, timeouts) = if patient {
            (
                RetryConfig::standard().with_max_attempts(4),
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(120))
                    .build(),
            )
        } else {
            (
                RetryConfig::disabled(),
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_attempt_timeout(Duration::from_secs(5))
                    .build(),
            )
        };
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(endpoint)
            .region(Region::new("us-east-1"))
            .credentials_provider(creds)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .retry_config(retry)
            .timeout_config(timeouts)
            .build();
        S3 {
            client: Client::from_conf(config),
        }
    }

    pub fn list_buckets(&self) -> Result<Vec<String>> {
        let out = rt()
            .block_on(self.client.list_buckets().send())
            .map_err(|e| anyhow!("ListBuckets: {}", DisplayErrorContext(e)))?;
        Ok(out
            .buckets()
            .iter()
            .filter_map(|b| b.name().map(str::to_owned))
            .collect())
    }

    /// Create (if needed) and return a handle on `name`.
    pub fn bucket(&self, name: &str) -> Result<Bucket> {
        let res = rt().block_on(self.client.create_bucket().bucket(name).send());
        if let Err(e) = res {
            let owned = e
                .as_service_error()
                .is_some_and(|se| se.is_bucket_already_owned_by_you());
            if !owned {
                bail!("CreateBucket {name}: {}", DisplayErrorContext(e));
            }
        }
        Ok(Bucket {
            client: self.client.clone(),
            name: name.to_owned(),
        })
    }
}

/// One bucket.
#[derive(Clone)]
pub struct Bucket {
    client: Client,
    pub name: String,
}

impl Bucket {
    pub fn put(&self, key: &str, body: impl Into<Vec<u8>>) -> Result<()> {
        rt().block_on(put(&self.client, &self.name, key, body.into()))
    }

    pub fn get(&self, key: &str) -> Result<Vec<u8>> {
        rt().block_on(async {
            let out = self
                .client
                .get_object()
                .bucket(&self.name)
                .key(key)
                .send()
                .await
                .map_err(|e| {
                    anyhow!("GetObject {}/{key}: {}", self.name, DisplayErrorContext(e))
                })?;
            let body = out
                .body
                .collect()
                .await
                .with_context(|| format!("GetObject {}/{key}: reading body", self.name))?;
            Ok(body.into_bytes().to_vec())
        })
    }

    /// Reads a whole object with `concurrency` ranged GETs of `part` bytes in flight (how a
    /// tuned client reads); returns the byte count.
    pub fn get_ranged_parallel(&self, key: &str, part: usize, concurrency: usize) -> Result<usize> {
        let size = self
            .head(key)?
            .with_context(|| format!("{key} does not exist"))?
            .size as usize;
        rt().block_on(async {
            let mut offsets = (0..size).step_by(part.max(1));
            let mut in_flight = tokio::task::JoinSet::new();
            let mut total = 0;
            loop {
                while in_flight.len() < concurrency {
                    let Some(start) = offsets.next() else { break };
                    let end = (start + part).min(size) - 1;
                    let req = self
                        .client
                        .get_object()
                        .bucket(&self.name)
                        .key(key)
                        .range(format!("bytes={start}-{end}"));
                    in_flight.spawn(async move {
                        let out = req
                            .send()
                            .await
                            .map_err(|e| anyhow!("ranged GET: {}", DisplayErrorContext(e)))?;
                        let body = out.body.collect().await.context("ranged GET body")?;
                        anyhow::Ok(body.into_bytes().len())
                    });
                }
                match in_flight.join_next().await {
                    Some(done) => total += done??,
                    None => return Ok(total),
                }
            }
        })
    }

    /// `None` when the object does not exist.
    pub fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let res = rt().block_on(self.client.head_object().bucket(&self.name).key(key).send());
        match res {
            Ok(out) => {
                let size = out.content_length().unwrap_or(0);
                let last_modified = out
                    .last_modified()
                    .map(|t| SystemTime::try_from(*t))
                    .transpose()
                    .context("LastModified out of range")?
                    .ok_or_else(|| anyhow!("HeadObject {key}: no LastModified"))?;
                Ok(Some(ObjectInfo {
                    size: u64::try_from(size).context("negative Content-Length")?,
                    last_modified,
                }))
            }
            Err(e) => {
                let not_found = e.as_service_error().is_some_and(|se| se.is_not_found())
                    || e.raw_response().is_some_and(|r| r.status().as_u16() == 404);
                if not_found {
                    Ok(None)
                } else {
                    bail!("HeadObject {}/{key}: {}", self.name, DisplayErrorContext(e))
                }
            }
        }
    }

    /// The user metadata of `key` (names without `x-amz-meta-`), sorted.
    pub fn metadata(&self, key: &str) -> Result<Vec<(String, String)>> {
        let out = rt()
            .block_on(self.client.head_object().bucket(&self.name).key(key).send())
            .map_err(|e| anyhow!("HeadObject {}/{key}: {}", self.name, DisplayErrorContext(e)))?;
        let mut pairs: Vec<(String, String)> = out
            .metadata()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        pairs.sort();
        Ok(pairs)
    }

    /// Writes `key` with user metadata `meta`.
    pub fn put_with_metadata(&self, key: &str, body: &[u8], meta: &[(&str, &str)]) -> Result<()> {
        let mut req = self
            .client
            .put_object()
            .bucket(&self.name)
            .key(key)
            .body(body.to_vec().into());
        for (k, v) in meta {
            req = req.metadata(*k, *v);
        }
        rt().block_on(req.send())
            .map_err(|e| anyhow!("PutObject {}/{key}: {}", self.name, DisplayErrorContext(e)))?;
        Ok(())
    }

    pub fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.head(key)?.is_some())
    }

    /// Every key under `prefix`, in the order S3 lists them.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        rt().block_on(async {
            let mut keys = Vec::new();
            let mut token: Option<String> = None;
            loop {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.name)
                    .prefix(prefix)
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| {
                        anyhow!(
                            "ListObjectsV2 {}/{prefix}: {}",
                            self.name,
                            DisplayErrorContext(e)
                        )
                    })?;
                keys.extend(
                    out.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_owned)),
                );
                match out.next_continuation_token() {
                    Some(t) if out.is_truncated() == Some(true) => token = Some(t.to_owned()),
                    _ => break,
                }
            }
            Ok(keys)
        })
    }

    /// PUT every key (same small body) with `concurrency` requests in flight.
    pub fn put_many(&self, keys: Vec<String>, body: &[u8], concurrency: usize) -> Result<()> {
        let keys = Arc::new(keys);
        let next = Arc::new(AtomicUsize::new(0));
        let body = bytes::Bytes::copy_from_slice(body);
        rt().block_on(async {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..concurrency {
                let (keys, next, body) = (keys.clone(), next.clone(), body.clone());
                let (client, bucket) = (self.client.clone(), self.name.clone());
                tasks.spawn(async move {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(key) = keys.get(i) else {
                            return Ok::<(), anyhow::Error>(());
                        };
                        put(&client, &bucket, key, body.to_vec()).await?;
                    }
                });
            }
            while let Some(res) = tasks.join_next().await {
                res.context("PUT worker panicked")??;
            }
            Ok(())
        })
    }
}

async fn put(client: &Client, bucket: &str, key: &str, body: Vec<u8>) -> Result<()> {
    client
        .put_object()
        .bucket(bucket)
        .key(key)
        .body(ByteStream::from(body))
        .send()
        .await
        .map_err(|e| anyhow!("PutObject {bucket}/{key}: {}", DisplayErrorContext(e)))?;
    Ok(())
}
