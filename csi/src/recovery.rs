//! Recovery hook: the daemon bumps a volume's `remount_generation` when the volume had to be
//! mounted afresh (a last-resort remount). The daemon re-binds its own targets (the staging
//! paths); this loop re-binds every publish target made from those staging paths, so pods
//! with HostToContainer propagation see the new mount.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use berth::api::mounts;
use berth::api::pb as daemon;
use tonic::transport::Channel;

use crate::events::Recorder;
use crate::node::Published;

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
            for staging in v.targets.iter().map(PathBuf::from) {
                let last = seen.insert(staging.clone(), v.remount_generation);
                if matches!(last, Some(g) if g < v.remount_generation) {
                    let targets = rebind(&published, &staging, &v.volume_id);
                    if let Some(rec) = &recorder {
                        match rec.remounted(&v.volume_id, &targets).await {
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
}

/// Binds the staging path again over each of its publish targets that does not show it yet.
/// The remounting `berth mount` re-binds every bind of the dead mount it can see itself; this
/// catches the targets it could not (another mount namespace) and leaves the rest alone, so
/// a pod never sees its volume unmounted twice. A stale bind is removed first when nothing
/// holds it; otherwise the new bind stacks on top of it. Returns the targets.
pub fn rebind(published: &Published, staging: &std::path::Path, volume_id: &str) -> Vec<PathBuf> {
    let targets = published.of_staging(staging);
    let live = mounts::mount_at(staging).ok().flatten();
    for (target, t) in &targets {
        let shown = mounts::mount_at(target).ok().flatten();
        if let (Some(live), Some(shown)) = (&live, &shown) {
            if live.device == shown.device && shown.read_only() == t.read_only {
                tracing::info!(volume = %volume_id, target = %target.display(), "already shows the new mount");
                continue;
            }
        }
        let _ = mounts::unmount_all(target);
        match mounts::bind(staging, target, t.read_only) {
            Ok(()) => {
                tracing::warn!(volume = %volume_id, target = %target.display(), "re-bound after a remount")
            }
            Err(e) => {
                tracing::error!(volume = %volume_id, target = %target.display(), "re-binding after a remount: {e}")
            }
        }
    }
    targets.into_iter().map(|(t, _)| t).collect()
}
