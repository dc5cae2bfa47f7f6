//! The gRPC service: maps requests to the volume registry and to `berth` subcommands.
//! Requests are never logged whole: they carry credentials.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;
use tonic::{Request, Response, Status};

use super::pb;
use super::registry::Registry;
use super::spec::{VolumeError, VolumeSpec};
use super::table::ShareSpec;

impl From<VolumeError> for Status {
    fn from(e: VolumeError) -> Status {
        match e {
            VolumeError::InvalidArgument(m) => Status::invalid_argument(m),
            VolumeError::AlreadyExists(m) => Status::already_exists(m),
            VolumeError::NotFound(m) => Status::not_found(m),
            VolumeError::FailedPrecondition(m) => Status::failed_precondition(m),
            VolumeError::PermissionDenied(m) => Status::permission_denied(m),
            VolumeError::Internal(m) => Status::internal(m),
        }
    }
}

#[derive(Clone)]
pub struct DaemonService {
    pub registry: Registry,
}

impl DaemonService {
    pub fn new(registry: Registry) -> DaemonService {
        DaemonService { registry }
    }

    /// Runs `berth ARGS...` to completion; Err(UNIMPLEMENTED) when the binary does not know
    /// the subcommand.
    async fn berth(&self, args: &[&std::ffi::OsStr]) -> Result<String, Status> {
        let out = Command::new(&self.registry.node().berth_bin)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| Status::internal(format!("running berth: {e}")))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            return Ok(text);
        }
        if unknown_subcommand(&text) {
            return Err(Status::unimplemented(format!(
                "this berth binary has no `{}` subcommand",
                args.first()
                    .map(|a| a.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )));
        }
        Err(Status::internal(text.trim().to_string()))
    }
}

fn unknown_subcommand(text: &str) -> bool {
    text.contains("unrecognized subcommand")
}

fn required<'a>(value: &'a str, what: &str) -> Result<&'a str, Status> {
    if value.is_empty() {
        Err(Status::invalid_argument(format!("{what} is required")))
    } else {
        Ok(value)
    }
}

#[tonic::async_trait]
impl pb::daemon_server::Daemon for DaemonService {
    async fn mount_volume(
        &self,
        request: Request<pb::MountVolumeRequest>,
    ) -> Result<Response<pb::MountVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.target_path, "target_path")?;
        let spec = VolumeSpec::new(r.source, r.options, r.secrets)?;
        let resp = self
            .registry
            .mount(spec, PathBuf::from(r.target_path), r.read_only, r.volume_id)
            .await?;
        Ok(Response::new(resp))
    }

    async fn unmount_volume(
        &self,
        request: Request<pb::UnmountVolumeRequest>,
    ) -> Result<Response<pb::UnmountVolumeResponse>, Status> {
        let r = request.into_inner();
        required(&r.target_path, "target_path")?;
        let stopped = self.registry.unmount(Path::new(&r.target_path)).await?;
        Ok(Response::new(pb::UnmountVolumeResponse { stopped }))
    }

    async fn list_volumes(
        &self,
        _request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        Ok(Response::new(pb::ListVolumesResponse {
            volumes: self.registry.list().await,
        }))
    }

    async fn warm(
        &self,
        request: Request<pb::WarmRequest>,
    ) -> Result<Response<pb::WarmResponse>, Status> {
        let r = request.into_inner();
        let target = PathBuf::from(required(&r.target_path, "target_path")?);
        let Some(mountpoint) = self.registry.mountpoint_of(&target).await else {
            return Err(Status::not_found(format!(
                "no volume is mounted at {}",
                target.display()
            )));
        };
        let mut paths = Vec::new();
        for p in &r.paths {
            let rel = Path::new(p.trim_start_matches('/'));
            if rel
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(Status::invalid_argument(format!("{p:?} leaves the volume")));
            }
            paths.push(mountpoint.join(rel));
        }
        if paths.is_empty() {
            paths.push(mountpoint);
        }
        let concurrency = r.concurrency.max(1).to_string();
        let mut args: Vec<&std::ffi::OsStr> = vec!["warm".as_ref()];
        args.extend(paths.iter().map(|p| p.as_os_str()));
        args.push("--concurrency".as_ref());
        args.push(concurrency.as_ref());
        let output = self.berth(&args).await?;
        Ok(Response::new(pb::WarmResponse { output }))
    }

    async fn stats(
        &self,
        _request: Request<pb::StatsRequest>,
    ) -> Result<Response<pb::StatsResponse>, Status> {
        let volumes = self.registry.list().await;
        let mut s = pb::StatsResponse {
            volumes: volumes.len() as u64,
            shares: self.registry.share_count().await as u64,
            ..Default::default()
        };
        if let Some(node) = self.registry.node_cache_stats() {
            s.cache_blocks = node.disk.blocks;
            s.cache_capacity_bytes = node.disk.slots * node.block_size;
            s.cache_evictions = node.disk.evictions;
        }
        for v in &volumes {
            s.targets += v.targets.len() as u64;
            s.restarts += v.restarts;
            if let Ok(st) = serde_json::from_str::<crate::status::MountStatus>(&v.status_json) {
                s.memory_used += st.memory_used;
                if let Some(c) = st.cache {
                    s.cache_memory_hits += c.memory_hits;
                    s.cache_disk_hits += c.disk_hits;
                    s.cache_misses += c.misses;
                    s.bytes_from_store += c.bytes_from_store;
                }
            }
        }
        Ok(Response::new(s))
    }

    async fn upgrade(
        &self,
        request: Request<pb::UpgradeRequest>,
    ) -> Result<Response<pb::UpgradeResponse>, Status> {
        let r = request.into_inner();
        let mountpoints = if r.target_path.is_empty() {
            self.registry.mountpoints().await
        } else {
            match self.registry.mountpoint_of(Path::new(&r.target_path)).await {
                Some(m) => vec![m],
                None => {
                    return Err(Status::not_found(format!(
                        "no volume is mounted at {}",
                        r.target_path
                    )))
                }
            }
        };
        let mut upgraded = Vec::new();
        let state_dir = self.registry.node().state_dir.clone();
        for mp in mountpoints {
            self.berth(&[
                "upgrade".as_ref(),
                mp.as_os_str(),
                "--state-dir".as_ref(),
                state_dir.as_os_str(),
            ])
            .await?;
            upgraded.push(mp.display().to_string());
        }
        Ok(Response::new(pb::UpgradeResponse { upgraded }))
    }

    async fn create_share(
        &self,
        request: Request<pb::CreateShareRequest>,
    ) -> Result<Response<pb::CreateShareResponse>, Status> {
        let r = request.into_inner();
        let socket = PathBuf::from(required(&r.socket_path, "socket_path")?);
        let mut options = r.options;
        let share = ShareSpec {
            socket,
            request_queues: take_number(&mut options, "request-queues", 1)?,
            queue_size: take_number(&mut options, "queue-size", 1024)?,
            share_id: r.share_id,
        };
        let spec = VolumeSpec::new(r.source, options, r.secrets)?;
        self.registry.share(spec, share).await?;
        Ok(Response::new(pb::CreateShareResponse {
            socket_path: r.socket_path,
        }))
    }

    async fn remove_share(
        &self,
        request: Request<pb::RemoveShareRequest>,
    ) -> Result<Response<pb::RemoveShareResponse>, Status> {
        let r = request.into_inner();
        let socket = PathBuf::from(required(&r.socket_path, "socket_path")?);
        self.registry.unshare(&socket).await?;
        Ok(Response::new(pb::RemoveShareResponse {}))
    }
}

/// Removes option `key` from `options` and parses it (absent: `default`).
fn take_number<T: std::str::FromStr>(
    options: &mut std::collections::HashMap<String, String>,
    key: &str,
    default: T,
) -> Result<T, Status> {
    match options.remove(key) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            Status::invalid_argument(format!("option {key} takes a number, not {v:?}"))
        }),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn recognises_clap_unknown_subcommand() {
        assert!(super::unknown_subcommand(
            "error: unrecognized subcommand 'upgrade'\n\nUsage: berth <COMMAND>"
        ));
        assert!(!super::unknown_subcommand("error: no mount"));
    }
}
