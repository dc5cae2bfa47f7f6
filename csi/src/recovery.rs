//! Recovery hook: the daemon bumps a volume's `remount_generation` when the volume had to be
//! mounted afresh (a last-resort remount). The daemon re-binds its own targets (the staging
//! paths); this loop re-binds every publish target made from those staging paths, so pods
//! with HostToContainer propagation see the new mount.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth::api::pb as daemon;
use berth::sys::mounts;
use tonic::transport::Channel;

use crate::events::Recorder;
use crate::published::Published;

pub async fn watch(
    mut client: daemon::daemon_client::DaemonClient<Channel>,
    published: Arc<Published>,
    every: Duration,
    recorder: Option<Recorder>,
) {
    // staging path -> generation last seen
    let mut seen: HashMap<PathBuf, u64> = HashMap::new();
    loop {
        tokio::time::sleep(every).await;
        let Ok(resp) = client.list_volumes(daemon::ListVolumesRequest {}).await else {
            continue;
        };
        for v in resp.into_inner().volumes {
            if v.state != "running" {
                continue;
            }
            for staging in v.targets.iter().map(PathBuf::from) {
                let last = seen.insert(staging.clone(), v.remount_generation);
                let remounted = matches!(last, Some(g) if g < v.remount_generation);
                // First sight: this plugin just started, and the volume may have been
                // remounted while it was away; the targets that show the mount are left alone.
                if !remounted && last.is_some() {
                    continue;
                }
                let (targets, rebound) = rebind(&published, &staging, &v.volume_id);
                let affected = if remounted { targets } else { rebound };
                if let (Some(rec), false) = (&recorder, affected.is_empty()) {
                    match rec.remounted(&v.volume_id, &affected).await {
                        Ok(n) => {
                            tracing::info!(volume = %v.volume_id, events = n, "remount recorded on pods")
                        }
                        Err(e) => {
                            tracing::warn!(volume = %v.volume_id, "recording remount events: {e}")
                        }
                    }
                }
            }
        }
    }
}

/// Binds the staging path again over each of its publish targets that does not show it yet.
/// The remounting `berth mount` re-binds every bind of the dead mount it can see itself; this
/// catches the targets it could not (another mount namespace, or a bind made while this plugin
/// was away) and leaves the rest alone, so a pod never sees its volume unmounted twice. A
/// stale bind is removed first when nothing holds it; otherwise the new bind stacks on top.
/// Returns every target of the staging path, and those it bound again.
pub fn rebind(
    published: &Published,
    staging: &std::path::Path,
    volume_id: &str,
) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let targets = published.of_staging(staging);
    // One read of the mount table for the staging path and every target (topmost mounts).
    let table = mounts::read().unwrap_or_default();
    let mount_at = |path: &std::path::Path| table.iter().rev().find(|m| m.target == path);
    let Some(live) = mount_at(staging) else {
        // Never bind an empty staging directory over a pod's volume.
        tracing::warn!(volume = %volume_id, staging = %staging.display(), "staging path is not mounted; targets left as they are");
        return (targets.into_iter().map(|(t, _)| t).collect(), Vec::new());
    };
    let mut rebound = Vec::new();
    for (target, t) in &targets {
        if mount_at(target).is_some_and(|m| m.device == live.device && m.read_only() == t.read_only)
        {
            continue;
        }
        let _ = mounts::unmount_all(target);
        match mounts::bind_read_only_if(staging, target, t.read_only) {
            Ok(()) => {
                tracing::warn!(volume = %volume_id, target = %target.display(), "re-bound after a remount");
                rebound.push(target.clone());
            }
            Err(e) => {
                tracing::error!(volume = %volume_id, target = %target.display(), "re-binding after a remount: {e}")
            }
        }
    }
    (targets.into_iter().map(|(t, _)| t).collect(), rebound)
}
