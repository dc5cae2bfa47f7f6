//! The Node service. NodeStageVolume asks the berth daemon to mount the volume at the
//! staging path; NodePublishVolume bind-mounts the staging path to the pod's target
//! (read-only honoured). Unpublish and unstage unmount in a loop, never lazily, and succeed
//! when there is nothing left to do.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use berth::api::pb as daemon;
use berth::api::spec;
use berth::sys::mounts;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::kata;
use crate::pb;
use crate::published::Published;
use crate::volume_id::VolumeRef;
use crate::{check_capability, required};

/// Whether a volume-context key is passed to `berth mount` as an option: every option of the
/// daemon's vocabulary (`berth::api::spec`) except where the store is, which the volume handle
/// and the StorageClass's `endpoint` and `region` parameters say.
pub fn is_mount_option(key: &str) -> bool {
    spec::is_option(key) && !spec::LOCATION_OPTIONS.contains(&key)
}

pub struct NodeService {
    pub node_id: String,
    pub daemon: daemon::daemon_client::DaemonClient<Channel>,
    pub published: std::sync::Arc<Published>,
    /// Where virtio-fs shares and Kata direct-volume files go (the `mounter: virtiofs` flow).
    pub shares: kata::Paths,
    /// The secrets each staging path was staged with: a share started at publish time needs
    /// them when the publish request carries none (no nodePublishSecretRef). In memory only.
    pub stage_secrets: Mutex<HashMap<PathBuf, HashMap<String, String>>>,
}

fn io_status(what: &str, path: &Path, e: std::io::Error) -> Status {
    Status::internal(format!("{what} {}: {e}", path.display()))
}

fn clean_path(p: &str, what: &str) -> Result<PathBuf, Status> {
    let path = PathBuf::from(required(p, what)?);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        return Err(Status::invalid_argument(format!(
            "{what} must be absolute and free of `..`"
        )));
    }
    Ok(path)
}

/// `berth mount` options of a volume from its context (static PV attributes or what
/// CreateVolume returned), plus read-only when the access mode says so.
fn mount_options(
    vol: &VolumeRef,
    ctx: &HashMap<String, String>,
    read_only: bool,
) -> HashMap<String, String> {
    let mut opts: HashMap<String, String> = ctx
        .iter()
        .filter(|(k, _)| is_mount_option(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(e) = ctx.get("endpoint").or(vol.endpoint.as_ref()) {
        opts.insert("endpoint-url".into(), e.clone());
    }
    if let Some(r) = ctx.get("region").or(vol.region.as_ref()) {
        opts.insert("region".into(), r.clone());
    }
    if read_only {
        opts.insert("read-only".into(), "true".into());
    }
    opts
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<pb::NodeStageVolumeRequest>,
    ) -> Result<Response<pb::NodeStageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let staging = clean_path(&r.staging_target_path, "staging_target_path")?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let read_only = check_capability(cap).map_err(Status::invalid_argument)?;
        let vol = VolumeRef::parse(id).map_err(|e| Status::not_found(e.to_string()))?;
        kata::wants_share(&r.volume_context)?;
        let req = daemon::MountVolumeRequest {
            source: vol.source(),
            target_path: staging.display().to_string(),
            options: mount_options(&vol, &r.volume_context, read_only),
            secrets: r.secrets.clone(),
            volume_id: id.to_string(),
            read_only: false,
        };
        self.daemon.clone().mount_volume(req).await?;
        if let Ok(mut m) = self.stage_secrets.lock() {
            m.insert(staging.clone(), r.secrets);
        }
        tracing::info!(volume = %id, staging = %staging.display(), "staged");
        Ok(Response::new(pb::NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<pb::NodeUnstageVolumeRequest>,
    ) -> Result<Response<pb::NodeUnstageVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let staging = clean_path(&r.staging_target_path, "staging_target_path")?;
        self.daemon
            .clone()
            .unmount_volume(daemon::UnmountVolumeRequest {
                target_path: staging.display().to_string(),
            })
            .await?;
        if let Ok(mut m) = self.stage_secrets.lock() {
            m.remove(&staging);
        }
        tracing::info!(volume = %id, staging = %staging.display(), "unstaged");
        Ok(Response::new(pb::NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<pb::NodePublishVolumeRequest>,
    ) -> Result<Response<pb::NodePublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let target = clean_path(&r.target_path, "target_path")?;
        let cap = r
            .volume_capability
            .as_ref()
            .ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        let read_only = check_capability(cap).map_err(Status::invalid_argument)? || r.readonly;
        // The spec: with STAGE_UNSTAGE_VOLUME, a missing staging path is FAILED_PRECONDITION.
        if r.staging_target_path.is_empty() {
            return Err(Status::failed_precondition(
                "staging_target_path is required: this plugin stages volumes",
            ));
        }
        let staging = clean_path(&r.staging_target_path, "staging_target_path")?;
        let share = kata::wants_share(&r.volume_context)?;
        let Some(staged) =
            mounts::mount_at(&staging).map_err(|e| io_status("reading mounts for", &staging, e))?
        else {
            return Err(Status::failed_precondition(format!(
                "volume {id} is not staged at {}",
                staging.display()
            )));
        };
        match mounts::mount_at(&target).map_err(|e| io_status("reading mounts for", &target, e))? {
            // Already published: the same request is a success, another one is not.
            Some(m) if m.device == staged.device && m.read_only() == read_only => {}
            Some(m) => {
                return Err(Status::already_exists(format!(
                    "{} is already published from another volume or with read-only={}",
                    target.display(),
                    m.read_only()
                )))
            }
            None => {
                std::fs::create_dir_all(&target).map_err(|e| io_status("creating", &target, e))?;
                mounts::bind_read_only_if(&staging, &target, read_only)
                    .map_err(|e| io_status("bind-mounting to", &target, e))?;
                tracing::info!(volume = %id, target = %target.display(), read_only, "published");
            }
        }
        self.remember(&target, &staging, read_only);
        if share {
            self.publish_share(id, &staging, &target, &r, read_only)
                .await?;
        }
        Ok(Response::new(pb::NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<pb::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<pb::NodeUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let target = clean_path(&r.target_path, "target_path")?;
        // The share first: the runtime stops using the socket before the bind goes.
        kata::unpublish(&mut self.daemon.clone(), &self.shares, id, &target).await?;
        mounts::unmount_all(&target).map_err(|e| {
            Status::unavailable(format!(
                "unmounting {}: {e} (retry later)",
                target.display()
            ))
        })?;
        // The spec: the plugin removes the target it created.
        match std::fs::remove_dir(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_status("removing", &target, e)),
        }
        self.published.remove(&target);
        tracing::info!(volume = %id, target = %target.display(), "unpublished");
        Ok(Response::new(pb::NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<pb::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<pb::NodeGetVolumeStatsResponse>, Status> {
        use pb::volume_usage::Unit;
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let path = PathBuf::from(required(&r.volume_path, "volume_path")?);
        let not_found =
            || Status::not_found(format!("volume {id} is not mounted at {}", path.display()));
        if !path.is_absolute() {
            return Err(not_found());
        }
        let Some(at_path) =
            mounts::mount_at(&path).map_err(|e| io_status("reading mounts for", &path, e))?
        else {
            return Err(not_found());
        };
        // The mount at the path must be this volume's: the daemon's mount of it has the same
        // device (a bind mount keeps the device of its source).
        let volume = self
            .daemon_volume(id, at_path.device)
            .await?
            .ok_or_else(not_found)?;
        let mut condition = match volume.state.as_str() {
            "running" => pb::VolumeCondition {
                abnormal: false,
                message: "ok".into(),
            },
            state => pb::VolumeCondition {
                abnormal: true,
                message: format!("mount process {state}: {}", volume.last_error),
            },
        };
        let usage = match mounts::usage(&path) {
            Ok(u) => vec![
                pb::VolumeUsage {
                    available: u.bytes_available as i64,
                    total: u.bytes_total as i64,
                    used: u.bytes_used as i64,
                    unit: Unit::Bytes as i32,
                },
                pb::VolumeUsage {
                    available: u.inodes_free as i64,
                    total: u.inodes_total as i64,
                    used: u.inodes_used as i64,
                    unit: Unit::Inodes as i32,
                },
            ],
            Err(e) => {
                condition = pb::VolumeCondition {
                    abnormal: true,
                    message: format!("statfs: {e}"),
                };
                Vec::new()
            }
        };
        Ok(Response::new(pb::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        }))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<pb::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<pb::NodeGetCapabilitiesResponse>, Status> {
        use pb::node_service_capability::{rpc::Type, Rpc, Type as Cap};
        let cap = |t: Type| pb::NodeServiceCapability {
            r#type: Some(Cap::Rpc(Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(pb::NodeGetCapabilitiesResponse {
            capabilities: vec![
                cap(Type::StageUnstageVolume),
                cap(Type::GetVolumeStats),
                cap(Type::VolumeCondition),
            ],
        }))
    }

    async fn node_get_info(
        &self,
        _: Request<pb::NodeGetInfoRequest>,
    ) -> Result<Response<pb::NodeGetInfoResponse>, Status> {
        Ok(Response::new(pb::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}

impl NodeService {
    /// The daemon's volume with this CSI id (or the same source) whose mount has `device`.
    async fn daemon_volume(
        &self,
        id: &str,
        device: (u32, u32),
    ) -> Result<Option<daemon::VolumeInfo>, Status> {
        let source = VolumeRef::parse(id).ok().map(|v| v.source());
        let volumes = self
            .daemon
            .clone()
            .list_volumes(daemon::ListVolumesRequest {})
            .await?
            .into_inner()
            .volumes;
        Ok(volumes.into_iter().find(|v| {
            let same_volume = v.volume_id == id || source.as_deref() == Some(v.source.as_str());
            same_volume
                && mounts::mount_at(Path::new(&v.mountpoint))
                    .ok()
                    .flatten()
                    .is_some_and(|m| m.device == device)
        }))
    }

    /// The `mounter: virtiofs` part of a publish: a share of the volume for the target.
    async fn publish_share(
        &self,
        id: &str,
        staging: &Path,
        target: &Path,
        r: &pb::NodePublishVolumeRequest,
        read_only: bool,
    ) -> Result<(), Status> {
        let vol = VolumeRef::parse(id).map_err(|e| Status::not_found(e.to_string()))?;
        let secrets = if r.secrets.is_empty() {
            self.stage_secrets
                .lock()
                .ok()
                .and_then(|m| m.get(staging).cloned())
                .unwrap_or_default()
        } else {
            r.secrets.clone()
        };
        kata::publish(
            &mut self.daemon.clone(),
            &self.shares,
            id,
            vol.source(),
            target,
            &mount_options(&vol, &r.volume_context, read_only),
            secrets,
            read_only,
        )
        .await
        .map(|_| ())
    }

    fn remember(&self, target: &Path, staging: &Path, read_only: bool) {
        self.published.insert(target, staging, read_only);
    }
}
