//! Mountpoint for Amazon S3 as a bench peer: the `mountpoint-s3-fs` library behind a tiny CLI.
//!
//! No binary crate of Mountpoint is published, so `cargo xtask bench` builds this wrapper (its
//! own workspace, never built in CI) and mounts it next to berth, rclone and s3fs.
//!
//! Usage: `mountpoint-peer s3://BUCKET[/PREFIX] MOUNTPOINT --endpoint-url URL
//!         [--cache DIR --max-cache-size BYTES] [--metadata-ttl SECS] [--max-threads N]`
//!
//! Credentials come from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), as
//! the CRT's default chain reads them. Addressing is path style (a loopback endpoint has no
//! bucket host names). The process stays in the foreground, prints `mountpoint-peer: mounted`
//! once the FUSE session is up, and unmounts on SIGINT/SIGTERM or an external `umount`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use mountpoint_s3_client::config::AddressingStyle;
use mountpoint_s3_client::user_agent::UserAgent;
use mountpoint_s3_fs::data_cache::{
    CacheLimit, DataCacheConfig, DiskDataCacheConfig, ManagedCacheDir,
};
use mountpoint_s3_fs::fs::{CacheConfig, TimeToLive};
use mountpoint_s3_fs::fuse::config::{FuseOptions, FuseSessionConfig, MountPoint};
use mountpoint_s3_fs::memory::{CandidateSize, PagedPool};
use mountpoint_s3_fs::s3::config::{
    ClientConfig, MemoryLimitSetting, PartConfig, Region, TargetThroughputSetting,
};
use mountpoint_s3_fs::s3::{S3Path, S3Personality};
use mountpoint_s3_fs::{
    MountpointConfig, Runtime, S3FilesystemConfig, Superblock, SuperblockConfig,
};

/// Mountpoint's own defaults: 8 MiB parts, 16 FUSE threads, 60 s metadata TTL with a cache.
const PART_SIZE: usize = 8 << 20;

struct Args {
    source: String,
    mountpoint: String,
    endpoint: String,
    cache: Option<String>,
    max_cache_size: Option<usize>,
    metadata_ttl: Duration,
    max_threads: usize,
    throughput_gbps: f64,
}

fn parse_args() -> Result<Args> {
    let mut positional = Vec::new();
    let mut endpoint = None;
    let mut cache = None;
    let mut max_cache_size = None;
    let mut metadata_ttl = Duration::from_secs(60);
    let mut max_threads = 16;
    let mut throughput_gbps = 10.0;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--endpoint-url" => endpoint = Some(value("--endpoint-url")?),
            "--cache" => cache = Some(value("--cache")?),
            "--max-cache-size" => max_cache_size = Some(value("--max-cache-size")?.parse()?),
            "--metadata-ttl" => {
                metadata_ttl = Duration::from_secs(value("--metadata-ttl")?.parse()?)
            }
            "--max-threads" => max_threads = value("--max-threads")?.parse()?,
            "--maximum-throughput-gbps" => {
                throughput_gbps = value("--maximum-throughput-gbps")?.parse()?
            }
            s if s.starts_with("--") => bail!("unknown option {s}"),
            _ => positional.push(arg),
        }
    }
    let [source, mountpoint] = <[String; 2]>::try_from(positional).map_err(|_| {
        anyhow::anyhow!("usage: mountpoint-peer s3://BUCKET MOUNTPOINT --endpoint-url URL [...]")
    })?;
    Ok(Args {
        source,
        mountpoint,
        endpoint: endpoint.context("--endpoint-url is required")?,
        cache,
        max_cache_size,
        metadata_ttl,
        max_threads,
        throughput_gbps,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let s3_path = S3Path::parse_s3_uri(&args.source).context("parsing the source URI")?;

    let cache_config = CacheConfig::new(TimeToLive::Duration(args.metadata_ttl));
    let mut fs_config = S3FilesystemConfig {
        cache_config: cache_config.clone(),
        allow_delete: true,
        allow_overwrite: true,
        ..Default::default()
    };
    fs_config.s3_personality = S3Personality::Standard;

    let fuse_config = FuseSessionConfig::new(
        MountPoint::new(&args.mountpoint)?,
        FuseOptions {
            read_only: false,
            auto_unmount: false,
            allow_root: false,
            allow_other: false,
            clone_fd: false,
        },
        args.max_threads,
    )?;

    // The disk cache lives in a managed sub-directory that Mountpoint wipes at mount and exit.
    let mut data_cache = DataCacheConfig::default();
    let mut managed_dir = None;
    if let Some(dir) = &args.cache {
        let managed = ManagedCacheDir::new_from_parent_with_cache_key(dir, None, true)
            .context("creating the cache directory")?;
        data_cache.disk_cache_config = Some(DiskDataCacheConfig {
            cache_directory: managed.as_path_buf(),
            block_size: 1 << 20,
            limit: match args.max_cache_size {
                Some(max_size) => CacheLimit::TotalSize { max_size },
                None => CacheLimit::default(),
            },
        });
        managed_dir = Some(managed);
    }

    let mem_limit = mountpoint_s3_fs::memory::MINIMUM_MEM_LIMIT.max(1 << 30);
    let client_config = ClientConfig {
        region: Region::new_user_specified("us-east-1".to_owned()),
        endpoint_url: Some(args.endpoint.clone()),
        addressing_style: AddressingStyle::Path,
        dual_stack: false,
        transfer_acceleration: false,
        auth_config: Default::default(),
        requester_pays: false,
        expected_bucket_owner: None,
        throughput_target: TargetThroughputSetting::User {
            gbps: args.throughput_gbps,
        },
        bind: None,
        part_config: PartConfig::with_part_size(PART_SIZE)
            .validate(MemoryLimitSetting::Default(mem_limit))?,
        user_agent: UserAgent::new(Some("berth-bench-mountpoint-peer".to_owned())),
        tls_config: None,
    };
    let pool = PagedPool::config()
        .with_candidate_sizes([CandidateSize::new(
            client_config.part_config.read_size_bytes,
        )])
        .with_memory_limit(mem_limit)
        .build();
    let client = client_config
        .create_client(pool.clone(), None)
        .context("creating the S3 client")?;
    let runtime = Runtime::new(client.event_loop_group());
    let superblock = Superblock::new(
        client.clone(),
        s3_path,
        SuperblockConfig {
            cache_config,
            s3_personality: S3Personality::Standard,
        },
    );
    let mut session = MountpointConfig::new(fuse_config, fs_config, data_cache)?
        .create_fuse_session(superblock, client, runtime, pool)
        .context("mounting")?;
    if let Some(managed) = managed_dir {
        session.run_on_close(Box::new(move || drop(managed)));
    }
    println!(
        "mountpoint-peer: mounted {} at {}",
        args.source, args.mountpoint
    );
    session.join().context("serving the mount")
}
