//! The volumes a daemon owns: one supervised `berth mount` process per volume, mounted at a
//! path of the daemon's own, and bind-mounted to every target that asked for it.
//!
//! A volume is identified by a digest of its source, options and credentials, so two requests
//! for the same data with the same settings share one mount process (and one cache), and a
//! request with other credentials never reads through someone else's mount.
//! If the mount process dies, it is started again with backoff; when that gives a fresh FUSE
//! mount (a last-resort remount), the daemon binds it again to its targets and bumps the
//! volume's `remount_generation` so that clients re-bind what they bound from a target.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch, Mutex};

use super::mounts;
use super::pb;
pub use super::table::ShareSpec;
use super::table::{self, Record};

/// How long a mount may take to print "berth: mounted".
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// How long a stopping mount gets after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Lines of a mount's stderr kept for `last_error`.
const STDERR_TAIL: usize = 20;

/// `berth mount` flags a client may set, taking a value (the CLI's `--socket` mode sends the
/// flags it is given from this list; see `crate::client`).
pub const VALUE_OPTIONS: &[&str] = &[
    "endpoint-url",
    "region",
    "request-deadline",
    "metadata-ttl",
    "memory-limit",
    "part-size",
    "max-prefetch",
    "max-gets",
    "threads",
    "uid",
    "gid",
    "file-mode",
    "dir-mode",
    "cache-size",
    "cache-memory",
    "cache-io",
    "block-size",
];
/// `berth mount` switches a client may set ("true"/"false").
pub const FLAG_OPTIONS: &[&str] = &["read-only", "virtual-hosted"];
/// Secret keys and the environment variable each becomes in the mount process (and, in the
/// CLI's `--socket` mode, the variable each is read from).
pub const SECRET_ENV: &[(&str, &str)] = &[
    ("accessKeyId", "AWS_ACCESS_KEY_ID"),
    ("secretAccessKey", "AWS_SECRET_ACCESS_KEY"),
    ("sessionToken", "AWS_SESSION_TOKEN"),
];

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
}

/// Credentials: never printed (Debug is redacted), only handed to a child's environment.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secrets({:?} redacted)",
            self.0.keys().collect::<Vec<_>>()
        )
    }
}

impl Secrets {
    pub fn parse(map: HashMap<String, String>) -> Result<Secrets, VolumeError> {
        for key in map.keys() {
            if !SECRET_ENV.iter().any(|(k, _)| k == key) {
                return Err(VolumeError::InvalidArgument(format!(
                    "unknown secret key {key:?} (known: accessKeyId, secretAccessKey, sessionToken)"
                )));
            }
        }
        Ok(Secrets(map.into_iter().collect()))
    }

    /// For the daemon's own table (`secrets.json`, mode 0600).
    fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn env_pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        SECRET_ENV
            .iter()
            .filter_map(|(k, var)| self.0.get(*k).map(|v| (*var, v.as_str())))
    }
}

/// What makes two mounts the same volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    pub source: String,
    pub options: BTreeMap<String, String>,
    pub secrets: Secrets,
}

impl VolumeSpec {
    pub fn new(
        source: String,
        options: HashMap<String, String>,
        secrets: HashMap<String, String>,
    ) -> Result<VolumeSpec, VolumeError> {
        if source.is_empty() {
            return Err(VolumeError::InvalidArgument("source is required".into()));
        }
        crate::mount::Source::parse(&source)
            .map_err(|e| VolumeError::InvalidArgument(format!("{e:#}")))?;
        for (key, value) in &options {
            if FLAG_OPTIONS.contains(&key.as_str()) {
                if !matches!(value.as_str(), "true" | "false" | "") {
                    return Err(VolumeError::InvalidArgument(format!(
                        "option {key} takes true or false, not {value:?}"
                    )));
                }
            } else if !VALUE_OPTIONS.contains(&key.as_str()) {
                return Err(VolumeError::InvalidArgument(format!(
                    "unknown option {key:?} (known: {}, {})",
                    VALUE_OPTIONS.join(", "),
                    FLAG_OPTIONS.join(", ")
                )));
            } else if value.starts_with('-') || value.is_empty() {
                return Err(VolumeError::InvalidArgument(format!(
                    "option {key} has a bad value {value:?}"
                )));
            }
        }
        Ok(VolumeSpec {
            source,
            options: options.into_iter().collect(),
            secrets: Secrets::parse(secrets)?,
        })
    }

    /// A stable digest (FNV-1a 64) of everything that makes the volume; the secrets are part
    /// of it but cannot be recovered from it.
    pub fn key(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |s: &str| {
            for b in s.bytes().chain([0u8]) {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        };
        eat(&self.source);
        for (k, v) in &self.options {
            eat(k);
            eat(v);
        }
        for (k, v) in &self.secrets.0 {
            eat(k);
            eat(v);
        }
        format!("{h:016x}")
    }

    /// `berth mount` arguments after SOURCE MOUNTPOINT.
    fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.options {
            if FLAG_OPTIONS.contains(&k.as_str()) {
                if v != "false" {
                    out.push(format!("--{k}"));
                }
            } else {
                out.push(format!("--{k}"));
                out.push(v.clone());
            }
        }
        out
    }
}

/// Settings of the daemon that every mount process gets.
#[derive(Clone, Debug)]
pub struct Node {
    pub berth_bin: PathBuf,
    pub state_dir: PathBuf,
    /// The node cache every mount process uses (`--cache-socket`), if the daemon has one.
    pub cache: Option<SharedCache>,
    /// `--on-exit keep`: the daemon's exit (or death) leaves volumes for its successor to
    /// restore; mount processes are killed without unmounting (see [`Registry::shutdown`]).
    pub keep_on_exit: bool,
}

/// The daemon's node cache, as its mount processes reach it.
#[derive(Clone)]
pub struct SharedCache {
    pub socket: PathBuf,
    pub server: Arc<crate::cache::shared::CacheServer>,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("socket", &self.socket)
            .field("block_size", &self.server.block_size())
            .finish()
    }
}

impl Node {
    /// With a node cache, its size and block size are the node's: a volume cannot bring its
    /// own (it would silently not apply, or could not share the cache's blocks).
    fn check_cache_options(&self, spec: &VolumeSpec) -> Result<(), VolumeError> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        if spec.options.contains_key("cache-size") {
            return Err(VolumeError::InvalidArgument(
                "option cache-size: the node cache's size is set by `berth daemon --cache-size`; \
                 a volume cannot have its own"
                    .into(),
            ));
        }
        if let Some(text) = spec.options.get("block-size") {
            let node = cache.server.block_size();
            if crate::units::parse_size(text).ok() != Some(node) {
                return Err(VolumeError::InvalidArgument(format!(
                    "option block-size {text} differs from the node cache's block size {node} \
                     (`berth daemon --block-size`); every volume of a node cache uses its block size"
                )));
            }
        }
        Ok(())
    }
}

/// How a volume's mount process is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopMode {
    /// SIGTERM: the mount process unmounts and commits open files.
    Unmount,
    /// SIGKILL: the FUSE mount stays (dead) with its binds, for a restarted daemon to heal.
    Abandon,
}

/// Observable state of one volume (what ListVolumes shows).
#[derive(Clone, Debug, Default)]
pub struct Health {
    pub state: String,
    pub pid: u32,
    pub restarts: u64,
    pub remount_generation: u64,
    pub last_error: String,
}

type Shares = Arc<std::sync::Mutex<BTreeMap<PathBuf, ShareSpec>>>;

struct Volume {
    spec: VolumeSpec,
    volume_id: String,
    mountpoint: PathBuf,
    /// target -> read-only
    targets: Arc<std::sync::Mutex<BTreeMap<PathBuf, bool>>>,
    shares: Shares,
    health: Arc<std::sync::Mutex<Health>>,
    stop: Option<oneshot::Sender<StopMode>>,
    done: watch::Receiver<bool>,
}

#[derive(Clone)]
pub struct Registry {
    node: Arc<Node>,
    /// One lock for every change: mount and unmount calls are rare and must not interleave.
    volumes: Arc<Mutex<BTreeMap<String, Volume>>>,
}

impl Registry {
    pub fn new(node: Node) -> Registry {
        Registry {
            node: Arc::new(node),
            volumes: Arc::default(),
        }
    }

    pub fn node(&self) -> &Node {
        &self.node
    }

    /// The node cache as a whole, if the daemon has one.
    pub fn node_cache_stats(&self) -> Option<crate::cache::shared::ServerStats> {
        self.node.cache.as_ref().map(|c| c.server.stats())
    }

    /// Mounts (or shares) a volume at `target`.
    pub async fn mount(
        &self,
        spec: VolumeSpec,
        target: PathBuf,
        read_only: bool,
        volume_id: String,
    ) -> Result<pb::MountVolumeResponse, VolumeError> {
        check_target(&target)?;
        let key = spec.key();
        let mut volumes = self.volumes.lock().await;
        // Who holds this target already?
        if let Some((other_key, other)) = volumes
            .iter()
            .find(|(_, v)| v.targets.lock().is_ok_and(|t| t.contains_key(&target)))
        {
            let same_ro = other
                .targets
                .lock()
                .map(|t| t.get(&target) == Some(&read_only))
                .unwrap_or(false);
            if *other_key == key && same_ro {
                return Ok(pb::MountVolumeResponse {
                    volume: key,
                    shared: true,
                });
            }
            return Err(VolumeError::AlreadyExists(format!(
                "{} already holds another volume or another read-only setting",
                target.display()
            )));
        }
        if mounts::is_mountpoint(&target).map_err(internal)? {
            return Err(VolumeError::AlreadyExists(format!(
                "{} is already a mountpoint that this daemon did not make",
                target.display()
            )));
        }
        std::fs::create_dir_all(&target)
            .map_err(|e| VolumeError::Internal(format!("creating {}: {e}", target.display())))?;
        let shared = volumes.contains_key(&key);
        if !shared {
            let volume = self.start(spec, key.clone(), volume_id).await?;
            volumes.insert(key.clone(), volume);
        }
        let volume = volumes
            .get(&key)
            .ok_or_else(|| VolumeError::Internal("volume vanished".into()))?;
        if let Err(e) = mounts::bind(&volume.mountpoint, &target, read_only) {
            let msg = format!(
                "binding {} to {}: {e}",
                volume.mountpoint.display(),
                target.display()
            );
            if !shared {
                if let Some(v) = volumes.remove(&key) {
                    stop(v).await;
                }
            }
            return Err(VolumeError::Internal(msg));
        }
        volume
            .targets
            .lock()
            .map_err(|_| VolumeError::Internal("poisoned".into()))?
            .insert(target.clone(), read_only);
        self.persist(&key, volume);
        tracing::info!(volume = %key, target = %target.display(), shared, "volume target added");
        Ok(pb::MountVolumeResponse {
            volume: key,
            shared,
        })
    }

    /// Unbinds `target`; stops the volume when it was its last target.
    pub async fn unmount(&self, target: &Path) -> Result<bool, VolumeError> {
        check_target(target)?;
        let mut volumes = self.volumes.lock().await;
        let key = volumes
            .iter()
            .find(|(_, v)| v.targets.lock().is_ok_and(|t| t.contains_key(target)))
            .map(|(k, _)| k.clone());
        // Unmount whatever is there, known or not (a restarted daemon forgets its targets).
        mounts::unmount_all(target)
            .map_err(|e| VolumeError::Internal(format!("unmounting {}: {e}", target.display())))?;
        let Some(key) = key else {
            return Ok(false);
        };
        let last = match volumes.get(&key) {
            Some(v) => {
                v.targets
                    .lock()
                    .map_err(|_| VolumeError::Internal("poisoned".into()))?
                    .remove(target);
                v.unused()
            }
            None => false,
        };
        tracing::info!(volume = %key, target = %target.display(), last, "volume target removed");
        self.forget_or_persist(&mut volumes, &key).await;
        Ok(last)
    }

    /// Serves the volume of `spec` to VMMs on `share.socket`, from the engine of its mount
    /// (started here if the volume is not mounted yet).
    pub async fn share(&self, spec: VolumeSpec, share: ShareSpec) -> Result<(), VolumeError> {
        check_target(&share.socket)?;
        let key = spec.key();
        let mut volumes = self.volumes.lock().await;
        if let Some((other_key, _)) = volumes.iter().find(|(_, v)| v.has_share(&share.socket)) {
            if *other_key == key {
                return Ok(());
            }
            return Err(VolumeError::AlreadyExists(format!(
                "{} already serves another volume",
                share.socket.display()
            )));
        }
        let started = !volumes.contains_key(&key);
        if started {
            let volume = self
                .start(spec, key.clone(), share.share_id.clone())
                .await?;
            volumes.insert(key.clone(), volume);
        }
        let volume = volumes
            .get(&key)
            .ok_or_else(|| VolumeError::Internal("volume vanished".into()))?;
        let asked = add_share(&self.node.state_dir, &volume.mountpoint, &share).await;
        if let Err(e) = asked {
            if started {
                if let Some(v) = volumes.remove(&key) {
                    stop(v).await;
                }
            }
            return Err(e);
        }
        tracing::info!(volume = %key, socket = %share.socket.display(), share = %share.share_id, "virtio-fs share added");
        volume
            .shares
            .lock()
            .map_err(|_| VolumeError::Internal("poisoned".into()))?
            .insert(share.socket.clone(), share);
        self.persist(&key, volume);
        Ok(())
    }

    /// After a target or share went: stops and forgets the volume if nothing uses it any
    /// more, else records what is left.
    async fn forget_or_persist(&self, volumes: &mut BTreeMap<String, Volume>, key: &str) {
        let Some(volume) = volumes.get(key) else {
            return;
        };
        if !volume.unused() {
            self.persist(key, volume);
            return;
        }
        table::remove(&self.node.state_dir, key);
        if let Some(v) = volumes.remove(key) {
            stop(v).await;
        }
    }

    /// Stops the share on `socket`; stops the volume when nothing else uses it. True when
    /// the volume was stopped.
    pub async fn unshare(&self, socket: &Path) -> Result<bool, VolumeError> {
        check_target(socket)?;
        let mut volumes = self.volumes.lock().await;
        let Some(key) = volumes
            .iter()
            .find(|(_, v)| v.has_share(socket))
            .map(|(k, _)| k.clone())
        else {
            return Ok(false);
        };
        let Some(volume) = volumes.get(&key) else {
            return Ok(false);
        };
        let request = crate::heal::holder::ControlRequest::RemoveShare {
            socket: socket.to_path_buf(),
        };
        if let Err(e) = ask_holder(&self.node.state_dir, &volume.mountpoint, request).await {
            // The holder may be restarting; it forgets shares when it dies anyway.
            tracing::warn!(volume = %key, socket = %socket.display(), "removing the share from the mount process: {e}");
        }
        if let Ok(mut shares) = volume.shares.lock() {
            shares.remove(socket);
        }
        tracing::info!(volume = %key, socket = %socket.display(), "virtio-fs share removed");
        let unused = volume.unused();
        self.forget_or_persist(&mut volumes, &key).await;
        Ok(unused)
    }

    pub async fn share_count(&self) -> usize {
        let volumes = self.volumes.lock().await;
        volumes
            .values()
            .map(|v| v.shares.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }

    pub async fn list(&self) -> Vec<pb::VolumeInfo> {
        let volumes = self.volumes.lock().await;
        volumes
            .iter()
            .map(|(key, v)| {
                let health = v.health.lock().map(|h| h.clone()).unwrap_or_default();
                let status_path = crate::status::status_path(&self.node.state_dir, &v.mountpoint);
                pb::VolumeInfo {
                    volume: key.clone(),
                    volume_id: v.volume_id.clone(),
                    source: v.spec.source.clone(),
                    options: v.spec.options.clone().into_iter().collect(),
                    targets: v
                        .targets
                        .lock()
                        .map(|t| t.keys().map(|p| p.display().to_string()).collect())
                        .unwrap_or_default(),
                    mountpoint: v.mountpoint.display().to_string(),
                    state: health.state,
                    pid: health.pid,
                    restarts: health.restarts,
                    remount_generation: health.remount_generation,
                    last_error: health.last_error,
                    status_json: std::fs::read_to_string(status_path).unwrap_or_default(),
                    shares: v
                        .shares
                        .lock()
                        .map(|s| s.keys().map(|p| p.display().to_string()).collect())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The daemon's own mountpoint of the volume bound at `target`.
    pub async fn mountpoint_of(&self, target: &Path) -> Option<PathBuf> {
        let volumes = self.volumes.lock().await;
        volumes
            .values()
            .find(|v| v.targets.lock().is_ok_and(|t| t.contains_key(target)))
            .map(|v| v.mountpoint.clone())
    }

    pub async fn mountpoints(&self) -> Vec<PathBuf> {
        let volumes = self.volumes.lock().await;
        volumes.values().map(|v| v.mountpoint.clone()).collect()
    }

    /// Daemon shutdown. By default every volume stops: targets unbound, processes stopped,
    /// the table emptied. With `--on-exit keep`, mount processes are killed without
    /// unmounting and the table stays: the next daemon restores every volume.
    pub async fn shutdown(&self) {
        let mut volumes = self.volumes.lock().await;
        for (key, v) in std::mem::take(&mut *volumes) {
            if self.node.keep_on_exit {
                end(v, StopMode::Abandon).await;
                continue;
            }
            table::remove(&self.node.state_dir, &key);
            let targets: Vec<PathBuf> = v
                .targets
                .lock()
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default();
            for t in targets {
                if let Err(e) = mounts::unmount_all(&t) {
                    tracing::warn!(target = %t.display(), "unmount at shutdown: {e}");
                }
            }
            stop(v).await;
        }
    }

    /// Brings back every volume a previous daemon recorded: its mount process is started at
    /// the same mountpoint (healing a dead mount there and re-binding every bind of it, pod
    /// targets included), targets that are not bound are bound again, shares served again.
    pub async fn restore(&self) {
        for (key, record, secrets) in table::load_all(&self.node.state_dir) {
            if let Err(e) = self.restore_one(&key, record, secrets).await {
                tracing::error!(volume = %key, "could not restore the volume (its record is kept for the next start): {e}");
            }
        }
    }

    async fn restore_one(
        &self,
        key: &str,
        record: Record,
        secrets: BTreeMap<String, String>,
    ) -> Result<(), VolumeError> {
        let spec = VolumeSpec::new(
            record.source.clone(),
            record.options.clone().into_iter().collect(),
            secrets.into_iter().collect(),
        )?;
        if spec.key() != key {
            return Err(VolumeError::Internal(
                "the record does not match its key".into(),
            ));
        }
        let mut volumes = self.volumes.lock().await;
        let volume = self
            .start(spec, key.to_string(), record.volume_id.clone())
            .await?;
        for (target, read_only) in &record.targets {
            if let Err(e) = ensure_bound(&volume.mountpoint, target, *read_only) {
                tracing::error!(volume = %key, target = %target.display(), "re-binding a restored target: {e}");
            }
        }
        for share in &record.shares {
            if let Err(e) = add_share(&self.node.state_dir, &volume.mountpoint, share).await {
                tracing::error!(volume = %key, socket = %share.socket.display(), "serving a restored share: {e}");
            }
        }
        if let Ok(mut t) = volume.targets.lock() {
            *t = record.targets.clone();
        }
        if let Ok(mut s) = volume.shares.lock() {
            *s = record
                .shares
                .iter()
                .map(|s| (s.socket.clone(), s.clone()))
                .collect();
        }
        if let Ok(mut h) = volume.health.lock() {
            // Bind mounts made from targets before the restart are stale (see the proto).
            h.remount_generation = record.remount_generation + 1;
        }
        tracing::warn!(volume = %key, targets = record.targets.len(), shares = record.shares.len(), "volume restored after a daemon restart");
        self.persist(key, &volume);
        volumes.insert(key.to_string(), volume);
        Ok(())
    }

    /// Records volume `key` in the daemon's table (best effort: logged on failure).
    fn persist(&self, key: &str, v: &Volume) {
        let record = Record {
            source: v.spec.source.clone(),
            options: v.spec.options.clone(),
            volume_id: v.volume_id.clone(),
            targets: v.targets.lock().map(|t| t.clone()).unwrap_or_default(),
            shares: v
                .shares
                .lock()
                .map(|s| s.values().cloned().collect())
                .unwrap_or_default(),
            remount_generation: v.health.lock().map(|h| h.remount_generation).unwrap_or(0),
        };
        if let Err(e) = table::save(&self.node.state_dir, key, &record, v.spec.secrets.as_map()) {
            tracing::error!(volume = %key, "could not record the volume; a restarted daemon will not restore it: {e}");
        }
    }

    async fn start(
        &self,
        spec: VolumeSpec,
        key: String,
        volume_id: String,
    ) -> Result<Volume, VolumeError> {
        self.node.check_cache_options(&spec)?;
        let mountpoint = self.node.state_dir.join("volumes").join(&key).join("mnt");
        std::fs::create_dir_all(&mountpoint).map_err(|e| {
            VolumeError::Internal(format!("creating {}: {e}", mountpoint.display()))
        })?;
        let targets = Arc::new(std::sync::Mutex::new(BTreeMap::new()));
        let shares: Shares = Arc::default();
        let health = Arc::new(std::sync::Mutex::new(Health {
            state: "starting".into(),
            ..Health::default()
        }));
        let (stop_tx, stop_rx) = oneshot::channel();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (done_tx, done_rx) = watch::channel(false);
        let sup = Supervisor {
            node: self.node.clone(),
            spec: spec.clone(),
            key: key.clone(),
            mountpoint: mountpoint.clone(),
            targets: targets.clone(),
            shares: shares.clone(),
            health: health.clone(),
        };
        tokio::spawn(async move {
            sup.run(stop_rx, ready_tx).await;
            let _ = done_tx.send(true);
        });
        match ready_rx.await {
            Ok(Ok(())) => Ok(Volume {
                spec,
                volume_id,
                mountpoint,
                targets,
                shares,
                health,
                stop: Some(stop_tx),
                done: done_rx,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(VolumeError::Internal(
                "mount supervisor ended before the mount was ready".into(),
            )),
        }
    }
}

impl Volume {
    fn has_share(&self, socket: &Path) -> bool {
        self.shares.lock().is_ok_and(|s| s.contains_key(socket))
    }

    /// No target and no share left: the volume can stop.
    fn unused(&self) -> bool {
        self.targets.lock().is_ok_and(|t| t.is_empty())
            && self.shares.lock().is_ok_and(|s| s.is_empty())
    }
}

/// Asks the holder of the volume mounted at `mountpoint` to serve a share.
async fn add_share(
    state_dir: &Path,
    mountpoint: &Path,
    share: &ShareSpec,
) -> Result<(), VolumeError> {
    let request = crate::heal::holder::ControlRequest::AddShare {
        socket: share.socket.clone(),
        request_queues: share.request_queues,
        queue_size: share.queue_size,
    };
    ask_holder(state_dir, mountpoint, request).await
}

/// Sends a control request to a mount process (blocking socket I/O, off the runtime).
async fn ask_holder(
    state_dir: &Path,
    mountpoint: &Path,
    request: crate::heal::holder::ControlRequest,
) -> Result<(), VolumeError> {
    let (state_dir, mountpoint) = (state_dir.to_path_buf(), mountpoint.to_path_buf());
    let reply = tokio::task::spawn_blocking(move || {
        crate::heal::upgrade::ask(&state_dir, &mountpoint, &request)
    })
    .await
    .map_err(|e| VolumeError::Internal(e.to_string()))?
    .map_err(|e| VolumeError::Internal(format!("{e:#}")))?;
    if reply.ok {
        Ok(())
    } else {
        Err(VolumeError::FailedPrecondition(reply.message))
    }
}

/// Binds `mountpoint` at `target` unless `target` already shows that mount (same device).
fn ensure_bound(mountpoint: &Path, target: &Path, read_only: bool) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let live = std::fs::metadata(mountpoint)?.dev();
    if std::fs::metadata(target).is_ok_and(|m| m.dev() == live) {
        return Ok(());
    }
    // A stale bind (dead connection) goes if nothing holds it; else the new one stacks on it.
    let _ = mounts::unmount_all(target);
    std::fs::create_dir_all(target)?;
    mounts::bind(mountpoint, target, read_only)
}

fn internal(e: std::io::Error) -> VolumeError {
    VolumeError::Internal(e.to_string())
}

fn check_target(target: &Path) -> Result<(), VolumeError> {
    if target.as_os_str().is_empty() {
        return Err(VolumeError::InvalidArgument(
            "target_path is required".into(),
        ));
    }
    if !target.is_absolute()
        || target
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(VolumeError::InvalidArgument(format!(
            "target_path {} must be absolute and free of `..`",
            target.display()
        )));
    }
    Ok(())
}

async fn stop(v: Volume) {
    end(v, StopMode::Unmount).await
}

async fn end(mut v: Volume, mode: StopMode) {
    if let Some(tx) = v.stop.take() {
        let _ = tx.send(mode);
    }
    let _ = v.done.wait_for(|done| *done).await;
    if mode == StopMode::Abandon {
        return;
    }
    let _ = std::fs::remove_dir(&v.mountpoint);
    if let Some(dir) = v.mountpoint.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Runs and restarts the mount process of one volume.
struct Supervisor {
    node: Arc<Node>,
    spec: VolumeSpec,
    key: String,
    mountpoint: PathBuf,
    targets: Arc<std::sync::Mutex<BTreeMap<PathBuf, bool>>>,
    shares: Shares,
    health: Arc<std::sync::Mutex<Health>>,
}

enum Exit {
    Stopped,
    Died(String),
}

impl Supervisor {
    fn set(&self, f: impl FnOnce(&mut Health)) {
        if let Ok(mut h) = self.health.lock() {
            f(&mut h);
        }
    }

    async fn run(
        self,
        mut stop: oneshot::Receiver<StopMode>,
        ready: oneshot::Sender<Result<(), VolumeError>>,
    ) {
        let mut ready = Some(ready);
        let mut backoff = BACKOFF_MIN;
        loop {
            let started = tokio::select! {
                r = self.spawn() => r,
                _ = &mut stop => return,
            };
            let (mut child, stderr_tail) = match started {
                Ok(c) => c,
                Err(e) => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Err(e));
                        return;
                    }
                    self.set(|h| {
                        h.state = "restarting".into();
                        h.last_error = e.to_string();
                    });
                    tracing::warn!(volume = %self.key, "mount did not come back: {e}");
                    // Whatever is left at the mountpoint may be what stops it: clear it.
                    self.clear_dead_mount();
                    if sleep_or_stop(&mut stop, &mut backoff).await {
                        return;
                    }
                    continue;
                }
            };
            let pid = child.id().unwrap_or(0);
            if let Some(tx) = ready.take() {
                let _ = tx.send(Ok(()));
            } else {
                self.after_restart();
                self.reshare().await;
                backoff = BACKOFF_MIN;
            }
            self.set(|h| {
                h.state = "running".into();
                h.pid = pid;
            });
            match self.serve(&mut child, &mut stop).await {
                Exit::Stopped => {
                    self.set(|h| h.state = "stopped".into());
                    return;
                }
                Exit::Died(status) => {
                    let tail = stderr_tail.lock().map(|t| t.join("\n")).unwrap_or_default();
                    tracing::warn!(volume = %self.key, pid, "mount process died ({status}); restarting");
                    self.set(|h| {
                        h.state = "restarting".into();
                        h.restarts += 1;
                        h.last_error = format!("mount process {pid} exited ({status}): {tail}");
                    });
                    // The dead mount stays for the next `berth mount`, which detaches it with
                    // every bind of it it can see (pod targets too, not only ours) and binds
                    // the new mount over each, with their read-only flags.
                    if sleep_or_stop(&mut stop, &mut backoff).await {
                        return;
                    }
                }
            }
        }
    }

    /// Starts `berth mount` and waits until it prints "berth: mounted".
    #[allow(clippy::type_complexity)]
    async fn spawn(&self) -> Result<(Child, Arc<std::sync::Mutex<Vec<String>>>), VolumeError> {
        let mut cmd = Command::new(&self.node.berth_bin);
        cmd.arg("mount")
            .arg(&self.spec.source)
            .arg(&self.mountpoint)
            .arg("--state-dir")
            .arg(&self.node.state_dir)
            .args(self.spec.args());
        if let Some(cache) = &self.node.cache {
            cmd.arg("--cache-socket").arg(&cache.socket);
            if !self.spec.options.contains_key("block-size") {
                cmd.arg("--block-size")
                    .arg(cache.server.block_size().to_string());
            }
        }
        for (var, value) in self.spec.secrets.env_pairs() {
            cmd.env(var, value);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // If the daemon dies, its mounts end with it: cleanly (SIGTERM: unmount), or, when the
        // next daemon is to restore them, at once (SIGKILL: the dead mount and its binds stay
        // for the new mount process to heal and re-bind).
        let on_death = if self.node.keep_on_exit {
            libc::SIGKILL
        } else {
            libc::SIGTERM
        };
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, on_death);
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            VolumeError::Internal(format!("starting {}: {e}", self.node.berth_bin.display()))
        })?;
        let tail = Arc::new(std::sync::Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let tail = tail.clone();
            let key = self.key.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::info!(volume = %key, "{line}");
                    if let Ok(mut t) = tail.lock() {
                        if t.len() == STDERR_TAIL {
                            t.remove(0);
                        }
                        t.push(line);
                    }
                }
            });
        }
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| VolumeError::Internal("no stdout pipe".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let wait_ready = async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("berth: mounted") {
                    return true;
                }
            }
            false
        };
        let ok = tokio::time::timeout(START_TIMEOUT, wait_ready)
            .await
            .unwrap_or(false);
        if !ok {
            let _ = child.start_kill();
            let _ = child.wait().await;
            // Let the stderr reader drain.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let why = tail.lock().map(|t| t.join("\n")).unwrap_or_default();
            return Err(VolumeError::FailedPrecondition(format!(
                "berth mount of {} failed: {why}",
                self.spec.source
            )));
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok((child, tail))
    }

    async fn serve(&self, child: &mut Child, stop: &mut oneshot::Receiver<StopMode>) -> Exit {
        tokio::select! {
            status = child.wait() => {
                Exit::Died(status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()))
            }
            mode = stop => {
                self.set(|h| h.state = "stopping".into());
                if mode == Ok(StopMode::Abandon) {
                    let _ = child.kill().await;
                    tracing::info!(volume = %self.key, "mount process killed; the volume is left for the next daemon");
                    return Exit::Stopped;
                }
                if let Some(pid) = child.id() {
                    // SAFETY: the child is not reaped yet, so the pid is still ours.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
                }
                if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                    tracing::warn!(volume = %self.key, "mount did not stop in {STOP_GRACE:?}; killing it");
                    let _ = child.kill().await;
                }
                self.clear_dead_mount();
                Exit::Stopped
            }
        }
    }

    /// Unmounts (not lazily) what is left at the mountpoint, when a new `berth mount` could
    /// not start over it; if that fails (busy), the next try heals over it.
    fn clear_dead_mount(&self) {
        if let Err(e) = mounts::unmount_all(&self.mountpoint) {
            tracing::warn!(volume = %self.key, "leaving the old mount at {}: {e}", self.mountpoint.display());
        }
    }

    /// After a restart, which follows the death of the mount process (the holder of the FUSE
    /// connection) and so is always a new mount: bind it to every target again. (Mount ids
    /// cannot tell: the kernel gives the new mount the dead one's id again.)
    fn after_restart(&self) {
        let targets: Vec<(PathBuf, bool)> = self
            .targets
            .lock()
            .map(|t| t.iter().map(|(p, ro)| (p.clone(), *ro)).collect())
            .unwrap_or_default();
        for (target, ro) in targets {
            // Usually re-bound already by the new mount (see `run`).
            if let Err(e) = ensure_bound(&self.mountpoint, &target, ro) {
                tracing::error!(volume = %self.key, target = %target.display(), "re-binding after a remount: {e}");
            }
        }
        self.set(|h| h.remount_generation += 1);
        tracing::warn!(volume = %self.key, "volume was mounted afresh (last-resort remount); targets re-bound");
    }

    /// A new mount process knows no shares: give it every share of the volume again.
    async fn reshare(&self) {
        let shares: Vec<ShareSpec> = self
            .shares
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        for share in shares {
            match add_share(&self.node.state_dir, &self.mountpoint, &share).await {
                Ok(()) => {
                    tracing::info!(volume = %self.key, socket = %share.socket.display(), "share served again after a restart")
                }
                Err(e) => {
                    tracing::error!(volume = %self.key, socket = %share.socket.display(), "could not serve the share again: {e}")
                }
            }
        }
    }
}

/// Sleeps for the backoff (doubling it); true when a stop came instead.
async fn sleep_or_stop(stop: &mut oneshot::Receiver<StopMode>, backoff: &mut Duration) -> bool {
    let d = *backoff;
    *backoff = (*backoff * 2).min(BACKOFF_MAX);
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(opts: &[(&str, &str)], secrets: &[(&str, &str)]) -> Result<VolumeSpec, VolumeError> {
        VolumeSpec::new(
            "s3://bucket/prefix".into(),
            opts.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn options_become_flags_and_unknown_ones_are_refused() {
        let s = spec(&[("read-only", "true"), ("region", "eu-1")], &[]).unwrap();
        assert_eq!(s.args(), ["--read-only", "--region", "eu-1"]);
        assert!(matches!(
            spec(&[("cache-dir", "/etc")], &[]),
            Err(VolumeError::InvalidArgument(_))
        ));
        assert!(matches!(
            spec(&[("region", "--evil")], &[]),
            Err(VolumeError::InvalidArgument(_))
        ));
        assert!(matches!(
            spec(&[], &[("password", "x")]),
            Err(VolumeError::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_key_depends_on_credentials_and_debug_hides_them() {
        let a = spec(&[], &[("accessKeyId", "AK"), ("secretAccessKey", "S1")]).unwrap();
        let b = spec(&[], &[("accessKeyId", "AK"), ("secretAccessKey", "S2")]).unwrap();
        assert_ne!(a.key(), b.key());
        assert_eq!(a.key(), a.clone().key());
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("S1"), "{dbg}");
    }
}
