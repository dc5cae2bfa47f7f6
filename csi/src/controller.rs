//! The Controller service: a volume is a prefix in a bucket.
//!
//! StorageClass parameters: `bucket` (required), `endpoint`, `prefix` (parent of every volume's
//! prefix), `region`, `onDelete` (`retain`, the default, or `delete`), and `berth mount`
//! options (see [`crate::node::is_mount_option`]) that go to the volume context.
//!
//! The controller sends requests only to endpoints of its allowlist ([`Allowlist`]), only with
//! the credentials of the request, and DeleteVolume deletes only what CreateVolume recorded
//! ([`crate::record`]).

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use crate::endpoint::{Allowed, Allowlist};
use crate::node::is_mount_option;
use crate::pb;
use crate::record::{self, OnDelete, Plan, Record, Stored};
use crate::s3;
use crate::volume_id::{valid_bucket, VolumeRef};
use crate::{check_capability, required};

pub struct ControllerService {
    /// The S3 endpoints the controller may talk to (`--allowed-endpoint`).
    pub allowed: Allowlist,
}

/// The top-level directory of the provisioning records: no volume may live there.
const RECORDS_TOP: &str = ".berth-csi";

/// Parameters the controller itself uses.
const OWN_PARAMS: &[&str] = &[
    "bucket",
    "endpoint",
    "prefix",
    "region",
    "onDelete",
    crate::kata::MOUNTER_KEY,
];

fn volume_ref(name: &str, params: &HashMap<String, String>) -> Result<VolumeRef, Status> {
    let bucket = params
        .get("bucket")
        .filter(|b| !b.is_empty())
        .ok_or_else(|| Status::invalid_argument("parameter `bucket` is required"))?;
    if !valid_bucket(bucket) {
        return Err(Status::invalid_argument(format!(
            "parameter `bucket` {bucket:?} is not a bucket name"
        )));
    }
    let parent = params
        .get("prefix")
        .map(|p| p.trim_matches('/'))
        .unwrap_or("");
    if parent.contains('?') || name.contains('?') || name.contains('/') {
        return Err(Status::invalid_argument(
            "`?` is not allowed in the prefix, nor `/` or `?` in the volume name",
        ));
    }
    if parent.split('/').next() == Some(RECORDS_TOP) || (parent.is_empty() && name == RECORDS_TOP) {
        return Err(Status::invalid_argument(format!(
            "volumes cannot live under {RECORDS_TOP}/, where berth-csi keeps its records"
        )));
    }
    let prefix = if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    };
    let delete_on_delete = match params.get("onDelete").map(String::as_str) {
        None | Some("retain") | Some("") => false,
        Some("delete") => true,
        Some(other) => {
            return Err(Status::invalid_argument(format!(
                "parameter onDelete is retain or delete, not {other:?}"
            )))
        }
    };
    for key in params.keys() {
        let known = OWN_PARAMS.contains(&key.as_str())
            || is_mount_option(key)
            || key.starts_with("csi.storage.k8s.io/");
        if !known {
            return Err(Status::invalid_argument(format!(
                "unknown parameter {key:?}"
            )));
        }
    }
    let vol = VolumeRef {
        bucket: bucket.clone(),
        prefix,
        endpoint: params.get("endpoint").filter(|e| !e.is_empty()).cloned(),
        region: params.get("region").filter(|r| !r.is_empty()).cloned(),
        delete_on_delete,
        dynamic: true,
    };
    // The id must parse back to the same volume (e.g. no `..` components).
    VolumeRef::parse(&vol.id()).map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(vol)
}

fn volume_context(vol: &VolumeRef, params: &HashMap<String, String>) -> HashMap<String, String> {
    let mut ctx: HashMap<String, String> = params
        .iter()
        .filter(|(k, _)| is_mount_option(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(e) = &vol.endpoint {
        ctx.insert("endpoint".into(), e.clone());
    }
    if let Some(r) = &vol.region {
        ctx.insert("region".into(), r.clone());
    }
    if let Some(m) = params.get(crate::kata::MOUNTER_KEY) {
        ctx.insert(crate::kata::MOUNTER_KEY.into(), m.clone());
    }
    ctx
}

impl ControllerService {
    /// Where the requests for an endpoint and region taken from a volume id or context may
    /// go; FAILED_PRECONDITION when they may not (the volume exists in the cluster, the
    /// controller is not configured to reach it).
    fn allowed_for_id(
        &self,
        endpoint: Option<&str>,
        region: Option<&str>,
    ) -> Result<Allowed, Status> {
        self.allowed
            .check(endpoint, region)
            .map_err(|e| Status::failed_precondition(format!("{e}; nothing was sent")))
    }
}

/// The record CreateVolume writes for `vol`.
fn new_record(allowed: &Allowed, vol: &VolumeRef, capacity: i64) -> Record {
    Record {
        version: record::VERSION,
        capacity_bytes: capacity,
        endpoint: allowed.endpoint().map(|e| e.url()),
        region: allowed.region().map(str::to_string),
        on_delete: if vol.delete_on_delete {
            OnDelete::Delete
        } else {
            OnDelete::Retain
        },
    }
}

#[tonic::async_trait]
impl pb::controller_server::Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let name = required(&r.name, "name")?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        for cap in &r.volume_capabilities {
            check_capability(cap).map_err(Status::invalid_argument)?;
        }
        if r.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume content sources (snapshots, clones) are not supported",
            ));
        }
        let (required_bytes, limit) = r
            .capacity_range
            .map(|c| (c.required_bytes, c.limit_bytes))
            .unwrap_or((0, 0));
        if required_bytes < 0 || limit < 0 || (limit > 0 && limit < required_bytes) {
            return Err(Status::invalid_argument("bad capacity_range"));
        }
        // S3 has no size: the volume has the capacity asked for (the limit if only that).
        let capacity = if required_bytes > 0 {
            required_bytes
        } else {
            limit
        };
        let vol = volume_ref(name, &r.parameters)?;
        crate::kata::wants_share(&r.parameters)?;
        let allowed = self
            .allowed
            .check(vol.endpoint.as_deref(), vol.region.as_deref())
            .map_err(|e| Status::invalid_argument(format!("parameter `endpoint`/`region`: {e}")))?;
        let client = s3::client(&allowed, &r.secrets)?;
        let want = new_record(&allowed, &vol, capacity);
        match s3::read_record(&client, &vol).await? {
            Some(existing) if existing.capacity_bytes() != capacity => {
                return Err(Status::already_exists(format!(
                    "volume {name} exists with capacity {}, not {capacity}",
                    existing.capacity_bytes()
                )))
            }
            Some(Stored::Current(existing)) if existing != want => {
                return Err(Status::already_exists(format!(
                    "volume {name} exists, created with another endpoint, region or onDelete"
                )))
            }
            Some(_) => {}
            None => s3::create_volume(&client, &vol, &want).await?,
        }
        tracing::info!(volume = %vol.id(), "volume created");
        Ok(Response::new(pb::CreateVolumeResponse {
            volume: Some(pb::Volume {
                capacity_bytes: capacity,
                volume_id: vol.id(),
                volume_context: volume_context(&vol, &r.parameters),
                content_source: None,
                accessible_topology: Vec::new(),
            }),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        let nothing = |why: &str| {
            tracing::info!(volume = %id, "DeleteVolume: nothing deleted: {why}");
            Ok(Response::new(pb::DeleteVolumeResponse {}))
        };
        // An id we never made names no volume: deleting it succeeds (idempotent).
        let Ok(vol) = VolumeRef::parse(id) else {
            return nothing("not a volume id of this driver");
        };
        if !vol.dynamic {
            // CreateVolume always makes ids with a query: this is a static PV's handle.
            return nothing(
                "a static volume handle (BUCKET/PREFIX), not a volume CreateVolume made",
            );
        }
        // The id only says where to look; the record says what there is to delete.
        let allowed = self.allowed_for_id(vol.endpoint.as_deref(), vol.region.as_deref())?;
        let client = s3::client(&allowed, &r.secrets)?;
        let stored = s3::read_record(&client, &vol).await?;
        let plan = record::plan_delete(allowed.endpoint(), allowed.region(), stored.as_ref())
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        match plan {
            Plan::Nothing => nothing(
                "no provisioning record in the bucket (a hand-made handle, or deleted before)",
            ),
            Plan::KeepData { legacy } => {
                // The record goes (so the name can be created again with another size); the
                // data stays.
                s3::delete_record(&client, &vol).await?;
                if legacy {
                    tracing::info!(volume = %id, "volume deleted; its data is retained (its record, from an older berth-csi, holds no delete policy)");
                } else {
                    tracing::info!(volume = %id, "volume deleted; its data is retained (onDelete: retain)");
                }
                Ok(Response::new(pb::DeleteVolumeResponse {}))
            }
            Plan::DeleteData => {
                let n = s3::delete_prefix(&client, &vol).await?;
                // Last, so that a failed delete is retried (the record still says delete).
                s3::delete_record(&client, &vol).await?;
                tracing::info!(volume = %id, objects = n, "volume deleted with its data (onDelete: delete)");
                Ok(Response::new(pb::DeleteVolumeResponse {}))
            }
        }
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<pb::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<pb::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        let id = required(&r.volume_id, "volume_id")?;
        if r.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities is required"));
        }
        let mut vol = VolumeRef::parse(id).map_err(|e| Status::not_found(e.to_string()))?;
        if vol.dynamic {
            // Made by CreateVolume: its record says it exists (a bucket that is gone holds no
            // record: NOT_FOUND, not FAILED_PRECONDITION).
            let allowed = self.allowed_for_id(vol.endpoint.as_deref(), vol.region.as_deref())?;
            let client = s3::client(&allowed, &r.secrets)?;
            if s3::read_record(&client, &vol).await?.is_none() {
                return Err(Status::not_found(format!("volume {id} does not exist")));
            }
        } else {
            // A static handle: the bucket (and prefix) must be there, at the endpoint the
            // volume context names.
            let Some(endpoint) = r.volume_context.get("endpoint") else {
                return Err(Status::not_found(format!(
                    "volume {id} is not one this driver created, and no endpoint in the volume context locates it"
                )));
            };
            vol.endpoint = Some(endpoint.clone());
            vol.region = r.volume_context.get("region").cloned();
            let allowed = self.allowed_for_id(vol.endpoint.as_deref(), vol.region.as_deref())?;
            let client = s3::client(&allowed, &r.secrets)?;
            if !s3::prefix_exists(&client, &vol).await? {
                return Err(Status::not_found(format!("volume {id} does not exist")));
            }
        }
        let unsupported = r
            .volume_capabilities
            .iter()
            .find_map(|c| check_capability(c).err());
        let resp = match unsupported {
            Some(why) => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            },
            None => pb::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(pb::validate_volume_capabilities_response::Confirmed {
                    volume_context: r.volume_context,
                    volume_capabilities: r.volume_capabilities,
                    parameters: r.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            },
        };
        Ok(Response::new(resp))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<pb::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<pb::ControllerGetCapabilitiesResponse>, Status> {
        use pb::controller_service_capability::{rpc::Type, Rpc, Type as Cap};
        Ok(Response::new(pb::ControllerGetCapabilitiesResponse {
            capabilities: vec![pb::ControllerServiceCapability {
                r#type: Some(Cap::Rpc(Rpc {
                    r#type: Type::CreateDeleteVolume as i32,
                })),
            }],
        }))
    }
}
