//! The daemon's volumes: each bound to the targets that asked for it (ref-counted: the last
//! target or share to go stops it), recorded in the volume table so that a restarted daemon
//! brings them back, and listed for ListVolumes and the metrics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Mutex;

use super::pb;
use super::spec::{NodeSettings, VolumeError, VolumeSpec};
use super::supervisor::{self, Running, StopMode};
pub use super::table::ShareSpec;
use super::table::{self, Record};
use crate::state;
use crate::sys::mounts;

struct Volume {
    spec: VolumeSpec,
    volume_id: String,
    /// Its mount process, mountpoint, targets and shares.
    run: Running,
}

#[derive(Clone)]
pub struct Registry {
    node: Arc<NodeSettings>,
    /// One lock for every change: mount and unmount calls are rare and must not interleave.
    volumes: Arc<Mutex<BTreeMap<String, Volume>>>,
}

impl Registry {
    pub fn new(node: NodeSettings) -> Registry {
        Registry {
            node: Arc::new(node),
            volumes: Arc::default(),
        }
    }

    pub fn node(&self) -> &NodeSettings {
        &self.node
    }

    /// The node cache as a whole, if the daemon has one.
    pub fn node_cache_stats(&self) -> Option<crate::cache::node::ServerStats> {
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
        self.node.check_source(&spec)?;
        let mut volumes = self.volumes.lock().await;
        let key = self.key_for(&volumes, &spec)?;
        // Who holds this target already?
        if let Some((other_key, other)) = volumes
            .iter()
            .find(|(_, v)| v.run.targets.lock().is_ok_and(|t| t.contains_key(&target)))
        {
            let same_ro = other
                .run
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
            let volume = self.start(spec, key.clone(), volume_id, None).await?;
            volumes.insert(key.clone(), volume);
        }
        let volume = volumes
            .get(&key)
            .ok_or_else(|| VolumeError::Internal("volume vanished".into()))?;
        if let Err(e) = mounts::bind_read_only_if(&volume.run.mountpoint, &target, read_only) {
            let msg = format!(
                "binding {} to {}: {e}",
                volume.run.mountpoint.display(),
                target.display()
            );
            if !shared {
                if let Some(v) = volumes.remove(&key) {
                    v.run.stop(StopMode::Unmount).await;
                }
            }
            return Err(VolumeError::Internal(msg));
        }
        volume
            .run
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
            .find(|(_, v)| v.run.targets.lock().is_ok_and(|t| t.contains_key(target)))
            .map(|(k, _)| k.clone());
        // Unmount whatever is there, known or not (a restarted daemon forgets its targets).
        mounts::unmount_all(target)
            .map_err(|e| VolumeError::Internal(format!("unmounting {}: {e}", target.display())))?;
        let Some(key) = key else {
            return Ok(false);
        };
        let last = match volumes.get(&key) {
            Some(v) => {
                v.run
                    .targets
                    .lock()
                    .map_err(|_| VolumeError::Internal("poisoned".into()))?
                    .remove(target);
                v.run.unused()
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
        self.node.check_source(&spec)?;
        self.node.check_share_socket(&share.socket)?;
        let mut volumes = self.volumes.lock().await;
        let key = self.key_for(&volumes, &spec)?;
        if let Some((other_key, _)) = volumes.iter().find(|(_, v)| v.run.has_share(&share.socket)) {
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
                .start(spec, key.clone(), share.share_id.clone(), None)
                .await?;
            volumes.insert(key.clone(), volume);
        }
        let volume = volumes
            .get(&key)
            .ok_or_else(|| VolumeError::Internal("volume vanished".into()))?;
        let asked = supervisor::add_share(&self.node, &volume.run.mountpoint, &share).await;
        if let Err(e) = asked {
            if started {
                if let Some(v) = volumes.remove(&key) {
                    v.run.stop(StopMode::Unmount).await;
                }
            }
            return Err(e);
        }
        tracing::info!(volume = %key, socket = %share.socket.display(), share = %share.share_id, "virtio-fs share added");
        volume
            .run
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
        if !volume.run.unused() {
            self.persist(key, volume);
            return;
        }
        table::remove(&self.node.state_dir, key);
        if let Some(v) = volumes.remove(key) {
            v.run.stop(StopMode::Unmount).await;
        }
    }

    /// Stops the share on `socket`; stops the volume when nothing else uses it. True when
    /// the volume was stopped.
    pub async fn unshare(&self, socket: &Path) -> Result<bool, VolumeError> {
        check_target(socket)?;
        let mut volumes = self.volumes.lock().await;
        let Some(key) = volumes
            .iter()
            .find(|(_, v)| v.run.has_share(socket))
            .map(|(k, _)| k.clone())
        else {
            return Ok(false);
        };
        let Some(volume) = volumes.get(&key) else {
            return Ok(false);
        };
        let request = crate::heal::control::ControlRequest::RemoveShare {
            socket: socket.to_path_buf(),
        };
        if let Err(e) =
            supervisor::ask_holder(&self.node.state_dir, &volume.run.mountpoint, request).await
        {
            // The holder may be restarting; it forgets shares when it dies anyway.
            tracing::warn!(volume = %key, socket = %socket.display(), "removing the share from the mount process: {e}");
        }
        if let Ok(mut shares) = volume.run.shares.lock() {
            shares.remove(socket);
        }
        tracing::info!(volume = %key, socket = %socket.display(), "virtio-fs share removed");
        let unused = volume.run.unused();
        self.forget_or_persist(&mut volumes, &key).await;
        Ok(unused)
    }

    pub async fn share_count(&self) -> usize {
        let volumes = self.volumes.lock().await;
        volumes
            .values()
            .map(|v| v.run.shares.lock().map(|s| s.len()).unwrap_or(0))
            .sum()
    }

    pub async fn list(&self) -> Vec<pb::VolumeInfo> {
        let volumes = self.volumes.lock().await;
        volumes
            .iter()
            .map(|(key, v)| {
                let health = v.run.health.lock().map(|h| h.clone()).unwrap_or_default();
                let status_path = state::find_status_file(&self.node.state_dir, &v.run.mountpoint);
                pb::VolumeInfo {
                    volume: key.clone(),
                    volume_id: v.volume_id.clone(),
                    source: v.spec.source.clone(),
                    options: v.spec.options.clone().into_iter().collect(),
                    targets: v
                        .run
                        .targets
                        .lock()
                        .map(|t| t.keys().map(|p| p.display().to_string()).collect())
                        .unwrap_or_default(),
                    mountpoint: v.run.mountpoint.display().to_string(),
                    state: health.state,
                    pid: health.pid,
                    restarts: health.restarts,
                    remount_generation: health.remount_generation,
                    last_error: health.last_error,
                    status_json: std::fs::read_to_string(status_path).unwrap_or_default(),
                    shares: v
                        .run
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
            .find(|v| v.run.targets.lock().is_ok_and(|t| t.contains_key(target)))
            .map(|v| v.run.mountpoint.clone())
    }

    pub async fn mountpoints(&self) -> Vec<PathBuf> {
        let volumes = self.volumes.lock().await;
        volumes.values().map(|v| v.run.mountpoint.clone()).collect()
    }

    /// Daemon shutdown. By default every volume stops: targets unbound, processes stopped,
    /// the table emptied. With `--on-exit keep`, mount processes are killed without
    /// unmounting and the table stays: the next daemon restores every volume.
    pub async fn shutdown(&self) {
        let mut volumes = self.volumes.lock().await;
        for (key, v) in std::mem::take(&mut *volumes) {
            if self.node.keep_on_exit {
                v.run.stop(StopMode::Abandon).await;
                continue;
            }
            table::remove(&self.node.state_dir, &key);
            let targets: Vec<PathBuf> = v
                .run
                .targets
                .lock()
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default();
            for t in targets {
                if let Err(e) = mounts::unmount_all(&t) {
                    tracing::warn!(target = %t.display(), "unmount at shutdown: {e}");
                }
            }
            v.run.stop(StopMode::Unmount).await;
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
        // A volume an older berth recorded under its FNV name (derived from the credentials,
        // and forgeable) takes its HMAC name now; only its mountpoint, which pods' binds point
        // into, stays where it is until the volume stops.
        let new_key = spec.key(&self.node.node_key);
        let old_mountpoint = state::volume_mountpoint(&self.node.state_dir, key);
        let mountpoint = if new_key == key {
            record.mountpoint.clone()
        } else if spec.legacy_key() == key {
            tracing::warn!(volume = %new_key, old = %key, "a volume recorded under its old name takes its new name; it stays mounted at {}", old_mountpoint.display());
            Some(record.mountpoint.clone().unwrap_or(old_mountpoint))
        } else {
            return Err(VolumeError::Internal(
                "the record does not match its key".into(),
            ));
        };
        let mut volumes = self.volumes.lock().await;
        let volume = self
            .start(spec, new_key.clone(), record.volume_id.clone(), mountpoint)
            .await?;
        for (target, read_only) in &record.targets {
            if let Err(e) = supervisor::ensure_bound(&volume.run.mountpoint, target, *read_only) {
                tracing::error!(volume = %key, target = %target.display(), "re-binding a restored target: {e}");
            }
        }
        for share in &record.shares {
            if let Err(e) = supervisor::add_share(&self.node, &volume.run.mountpoint, share).await {
                tracing::error!(volume = %key, socket = %share.socket.display(), "serving a restored share: {e}");
            }
        }
        if let Ok(mut t) = volume.run.targets.lock() {
            *t = record.targets.clone();
        }
        if let Ok(mut s) = volume.run.shares.lock() {
            *s = record
                .shares
                .iter()
                .map(|s| (s.socket.clone(), s.clone()))
                .collect();
        }
        if let Ok(mut h) = volume.run.health.lock() {
            // Bind mounts made from targets before the restart are stale (see the proto).
            h.remount_generation = record.remount_generation + 1;
        }
        tracing::warn!(volume = %new_key, targets = record.targets.len(), shares = record.shares.len(), "volume restored after a daemon restart");
        self.persist(&new_key, &volume);
        if new_key != key {
            table::remove(&self.node.state_dir, key);
        }
        volumes.insert(new_key, volume);
        Ok(())
    }

    /// Records volume `key` in the daemon's table (best effort: logged on failure).
    fn persist(&self, key: &str, v: &Volume) {
        let record = Record {
            source: v.spec.source.clone(),
            options: v.spec.options.clone(),
            volume_id: v.volume_id.clone(),
            targets: v.run.targets.lock().map(|t| t.clone()).unwrap_or_default(),
            shares: v
                .run
                .shares
                .lock()
                .map(|s| s.values().cloned().collect())
                .unwrap_or_default(),
            remount_generation: v
                .run
                .health
                .lock()
                .map(|h| h.remount_generation)
                .unwrap_or(0),
            mountpoint: Some(v.run.mountpoint.clone())
                .filter(|m| *m != state::volume_mountpoint(&self.node.state_dir, key)),
        };
        if let Err(e) = table::save(&self.node.state_dir, key, &record, v.spec.secrets.as_map()) {
            tracing::error!(volume = %key, "could not record the volume; a restarted daemon will not restore it: {e}");
        }
    }

    /// The key of the volume `spec` describes: a running volume with exactly this spec (one
    /// restored under its old name is found too), or the name a new one gets. A running
    /// volume whose key matches but whose spec does not is never reused.
    fn key_for(
        &self,
        volumes: &BTreeMap<String, Volume>,
        spec: &VolumeSpec,
    ) -> Result<String, VolumeError> {
        let key = spec.key(&self.node.node_key);
        reuse(
            volumes.iter().map(|(k, v)| (k.as_str(), &v.spec)),
            key,
            spec,
        )
    }

    /// Starts the mount process of volume `key`, at `mountpoint` or where its key says.
    async fn start(
        &self,
        spec: VolumeSpec,
        key: String,
        volume_id: String,
        mountpoint: Option<PathBuf>,
    ) -> Result<Volume, VolumeError> {
        self.node.check_cache_options(&spec)?;
        let mountpoint =
            mountpoint.unwrap_or_else(|| state::volume_mountpoint(&self.node.state_dir, &key));
        let run = supervisor::start(self.node.clone(), spec.clone(), key, mountpoint).await?;
        Ok(Volume {
            spec,
            volume_id,
            run,
        })
    }
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

/// Which key a request for `spec` uses, among the running volumes: `key` if that volume has
/// this very spec, or the key of another volume with this spec, or `key` for a new volume.
fn reuse<'a>(
    running: impl Iterator<Item = (&'a str, &'a VolumeSpec)>,
    key: String,
    spec: &VolumeSpec,
) -> Result<String, VolumeError> {
    let mut same_spec = None;
    for (k, v) in running {
        if k == key && v != spec {
            tracing::error!(volume = %key, "a running volume has this name but another spec; refused");
            return Err(VolumeError::Internal(format!(
                "volume name {key} is taken by a volume with another source, options or credentials"
            )));
        }
        if v == spec && same_spec.is_none() {
            same_spec = Some(k.to_string());
        }
    }
    Ok(same_spec.unwrap_or(key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn spec(secret: &str) -> VolumeSpec {
        VolumeSpec::new(
            "s3://bucket/data".into(),
            HashMap::new(),
            HashMap::from([
                ("accessKeyId".to_string(), "AK".to_string()),
                ("secretAccessKey".to_string(), secret.to_string()),
            ]),
        )
        .unwrap()
    }

    #[test]
    fn a_name_is_reused_only_with_its_whole_spec() {
        let (victim, attacker) = (spec("victim-secret"), spec("forged"));
        let running = [("k1", &victim)];
        // Same spec, same name: reused.
        assert_eq!(
            reuse(running.into_iter(), "k1".into(), &victim).unwrap(),
            "k1"
        );
        // A spec that made the victim's name (a forged collision) never gets the victim's mount.
        assert!(matches!(
            reuse(running.into_iter(), "k1".into(), &attacker),
            Err(VolumeError::Internal(_))
        ));
        // A volume restored under its old name is found by its spec.
        let legacy = [("0123456789abcdef", &victim)];
        assert_eq!(
            reuse(legacy.into_iter(), "new".into(), &victim).unwrap(),
            "0123456789abcdef"
        );
        assert_eq!(
            reuse(legacy.into_iter(), "new".into(), &attacker).unwrap(),
            "new"
        );
    }
}
