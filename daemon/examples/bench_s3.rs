//! S3 helper for `cargo xtask bench`: uploads the bench data sets fast (many requests in flight)
//! and measures the raw ranged-GET rate of the server from an SDK client (the ceiling for cold
//! reads through any mount). It lives here because the daemon already builds the AWS SDK; the
//! xtask crate stays free of it.
//!
//! Endpoint and credentials come from `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID` and
//! `AWS_SECRET_ACCESS_KEY`. Measurements print one JSON object on stdout.
//!
//! ```text
//! bench_s3 mb BUCKET
//! bench_s3 put-large BUCKET KEY BYTES
//! bench_s3 put-many BUCKET PREFIX COUNT BYTES
//! bench_s3 ranged BUCKET KEY BLOCK JOBS SECONDS seq|rand
//! bench_s3 get-many BUCKET PREFIX COUNT JOBS
//! bench_s3 head BUCKET KEY
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::DisplayErrorContext;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use tokio::task::JoinSet;

const PART: u64 = 8 << 20;
const UPLOAD_PARTS_IN_FLIGHT: usize = 8;
const PUTS_IN_FLIGHT: usize = 64;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting tokio")?;
    rt.block_on(run(args))
}

fn client() -> Result<Client> {
    let env = |k: &str| std::env::var(k).with_context(|| format!("{k} is not set"));
    let creds = Credentials::new(
        env("AWS_ACCESS_KEY_ID")?,
        env("AWS_SECRET_ACCESS_KEY")?,
        None,
        None,
        "berth-bench",
    );
    let config = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .endpoint_url(env("AWS_ENDPOINT_URL")?)
        .region(Region::new("us-east-1"))
        .credentials_provider(creds)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    Ok(Client::from_conf(config))
}

async fn run(args: Vec<String>) -> Result<()> {
    let s: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = client()?;
    let num = |v: &str| -> Result<u64> { v.parse().with_context(|| format!("not a number: {v}")) };
    match s.as_slice() {
        ["mb", bucket] => {
            c.create_bucket()
                .bucket(*bucket)
                .send()
                .await
                .map_err(|e| anyhow!("CreateBucket: {}", DisplayErrorContext(e)))?;
            Ok(())
        }
        ["put-large", bucket, key, bytes] => put_large(&c, bucket, key, num(bytes)?).await,
        ["put-many", bucket, prefix, count, bytes] => {
            put_many(&c, bucket, prefix, num(count)?, num(bytes)?).await
        }
        ["ranged", bucket, key, block, jobs, secs, mode] => {
            let random = match *mode {
                "seq" => false,
                "rand" => true,
                other => bail!("mode must be seq or rand, not {other}"),
            };
            ranged(&c, bucket, key, num(block)?, num(jobs)?, num(secs)?, random).await
        }
        ["get-many", bucket, prefix, count, jobs] => {
            get_many(&c, bucket, prefix, num(count)?, num(jobs)?).await
        }
        ["head", bucket, key] => {
            match c.head_object().bucket(*bucket).key(*key).send().await {
                Ok(h) => println!("{}", h.content_length().unwrap_or(0)),
                Err(_) => println!("missing"),
            }
            Ok(())
        }
        _ => bail!("unknown command {args:?}; see the comment at the top of bench_s3.rs"),
    }
}

/// Pseudo-random bytes (xorshift), cheap to make and not compressible.
fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn put_large(c: &Client, bucket: &str, key: &str, size: u64) -> Result<()> {
    let up = c
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| anyhow!("CreateMultipartUpload: {}", DisplayErrorContext(e)))?;
    let id = up.upload_id().context("no upload id")?.to_owned();
    let parts = size.div_ceil(PART);
    let mut done = Vec::new();
    let mut set = JoinSet::new();
    for n in 0..parts {
        if set.len() >= UPLOAD_PARTS_IN_FLIGHT {
            done.push(set.join_next().await.context("join")???);
        }
        let len = PART.min(size - n * PART) as usize;
        let req = c
            .upload_part()
            .bucket(bucket)
            .key(key)
            .upload_id(&id)
            .part_number(n as i32 + 1)
            .body(ByteStream::from(data(n + 1, len)));
        set.spawn(async move {
            let out = req
                .send()
                .await
                .map_err(|e| anyhow!("UploadPart {}: {}", n + 1, DisplayErrorContext(e)))?;
            Ok::<_, anyhow::Error>(
                CompletedPart::builder()
                    .part_number(n as i32 + 1)
                    .set_e_tag(out.e_tag().map(str::to_owned))
                    .build(),
            )
        });
    }
    while let Some(r) = set.join_next().await {
        done.push(r??);
    }
    done.sort_by_key(|p| p.part_number());
    c.complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(&id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await
        .map_err(|e| anyhow!("CompleteMultipartUpload: {}", DisplayErrorContext(e)))?;
    Ok(())
}

/// `COUNT` objects `PREFIX/f000000...` of `BYTES` each, `PUTS_IN_FLIGHT` at a time.
async fn put_many(c: &Client, bucket: &str, prefix: &str, count: u64, size: u64) -> Result<()> {
    let mut set = JoinSet::new();
    for n in 0..count {
        if set.len() >= PUTS_IN_FLIGHT {
            set.join_next().await.context("join")???;
        }
        let req = c
            .put_object()
            .bucket(bucket)
            .key(format!("{prefix}/f{n:06}"))
            .body(ByteStream::from(data(n + 7, size as usize)));
        set.spawn(async move {
            req.send()
                .await
                .map_err(|e| anyhow!("PutObject: {}", DisplayErrorContext(e)))
                .map(drop)
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(())
}

/// `JOBS` workers issue ranged GETs of `BLOCK` bytes for `SECONDS`, sequential (a shared
/// cursor that wraps) or at random aligned offsets; prints bytes/s and GETs/s.
async fn ranged(
    c: &Client,
    bucket: &str,
    key: &str,
    block: u64,
    jobs: u64,
    secs: u64,
    random: bool,
) -> Result<()> {
    let size = c
        .head_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .map_err(|e| anyhow!("HeadObject: {}", DisplayErrorContext(e)))?
        .content_length()
        .unwrap_or(0) as u64;
    let blocks = (size / block).max(1);
    let cursor = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let mut set = JoinSet::new();
    for j in 0..jobs {
        let (c, bucket, key, cursor) =
            (c.clone(), bucket.to_owned(), key.to_owned(), cursor.clone());
        set.spawn(async move {
            let (mut bytes, mut ops, mut x) = (0u64, 0u64, 0x9E37_79B9_7F4A_7C15u64 ^ (j + 1));
            while Instant::now() < deadline {
                let n = if random {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % blocks
                } else {
                    cursor.fetch_add(1, Ordering::Relaxed) % blocks
                };
                let range = format!("bytes={}-{}", n * block, (n + 1) * block - 1);
                let out = c
                    .get_object()
                    .bucket(&bucket)
                    .key(&key)
                    .range(range)
                    .send()
                    .await
                    .map_err(|e| anyhow!("GetObject: {}", DisplayErrorContext(e)))?;
                let body = out.body.collect().await.context("reading body")?;
                bytes += body.into_bytes().len() as u64;
                ops += 1;
            }
            Ok::<_, anyhow::Error>((bytes, ops))
        });
    }
    let (mut bytes, mut ops) = (0, 0);
    while let Some(r) = set.join_next().await {
        let (b, o) = r??;
        bytes += b;
        ops += o;
    }
    let took = start.elapsed().as_secs_f64();
    println!(
        "{{\"bytes_per_sec\": {:.1}, \"ops_per_sec\": {:.1}}}",
        bytes as f64 / took,
        ops as f64 / took
    );
    Ok(())
}

/// GETs every object `PREFIX/f000000..COUNT` with `JOBS` in flight; prints objects/s.
async fn get_many(c: &Client, bucket: &str, prefix: &str, count: u64, jobs: u64) -> Result<()> {
    let cursor = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..jobs {
        let (c, bucket, prefix, cursor) = (
            c.clone(),
            bucket.to_owned(),
            prefix.to_owned(),
            cursor.clone(),
        );
        set.spawn(async move {
            loop {
                let n = cursor.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                let out = c
                    .get_object()
                    .bucket(&bucket)
                    .key(format!("{prefix}/f{n:06}"))
                    .send()
                    .await
                    .map_err(|e| anyhow!("GetObject: {}", DisplayErrorContext(e)))?;
                out.body.collect().await.context("reading body")?;
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    println!(
        "{{\"ops_per_sec\": {:.1}}}",
        count as f64 / start.elapsed().as_secs_f64()
    );
    Ok(())
}
