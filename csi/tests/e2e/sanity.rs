//! The checks of the CSI conformance suite (kubernetes-csi/csi-test, `csi-sanity`) that apply
//! to what berth-csi declares, performed the way csi-sanity performs them: same request
//! shapes, same expected codes, same set-up and clean-up of the staging and target paths.
//!
//! csi-sanity itself (Go) cannot run on this machine; docs/csi.md says how to run it and
//! lists the checks mirrored here. The driver under test is the real `berth-csi --mode all`
//! with the real `berth daemon`, SeaweedFS and real mounts.
//!
//! What csi-sanity does around every test, mirrored by [`Sanity`]:
//! - set-up: `mkdir` (not `-p`, and failing if it exists) of the target *parent* directory
//!   (`--csi.mountdir`) and of the staging directory (`--csi.stagingdir`);
//! - publish targets are `<mountdir>/target`: the driver creates and removes them;
//! - clean-up of every volume the test created: NodeUnpublishVolume(`<mountdir>/target`),
//!   NodeUnstageVolume(stagingdir), DeleteVolume; any error except NOT_FOUND fails the test;
//! - tear-down: `rmdir` of both directories (they must be empty and unmounted by then, or
//!   the next test's set-up fails).
//!
//! Parameters are what the params file gives (`bucket`, `endpoint`); every call gets the
//! secrets of its section of the secrets file (`accessKeyId`, `secretAccessKey`).

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, ensure, Context, Result};
use berth_csi::pb;
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::fixture::{expect_code, mount_cap, Node};
use crate::reqs::Needs;
use crate::seaweed::{ACCESS_KEY, SECRET_KEY};
use crate::util::rt;

use super::cases::Case;

/// csi-sanity's default volume size (10 GiB) and longest name.
const TEST_VOLUME_SIZE: i64 = 10 << 30;
const MAX_NAME_LENGTH: usize = 128;
/// csi-sanity's default IdempotentCount.
const IDEMPOTENT_COUNT: usize = 10;

fn case(name: &'static str, run: fn() -> Result<()>) -> Case {
    Case {
        name,
        needs: Needs::S3_MOUNT,
        run,
    }
}

pub fn all() -> Vec<Case> {
    vec![
        case("sanity_identity", identity),
        case(
            "sanity_controller_capabilities_and_unimplemented_rpcs",
            controller_capabilities,
        ),
        case("sanity_create_volume", create_volume),
        case("sanity_delete_volume", delete_volume),
        case("sanity_validate_volume_capabilities", validate_volume),
        case("sanity_node_capabilities_and_info", node_capabilities),
        case("sanity_node_bad_requests", node_bad_requests),
        case(
            "sanity_node_unpublish_removes_target_path",
            unpublish_removes_target,
        ),
        case("sanity_node_get_volume_stats", node_volume_stats),
        case("sanity_node_should_work", || node_cycle(1)),
        case("sanity_node_should_be_idempotent", || {
            node_cycle(IDEMPOTENT_COUNT)
        }),
    ]
}

/// One csi-sanity test: the driver, its directories, and the volumes to clean up.
struct Sanity {
    node: Node,
    params: HashMap<String, String>,
    /// `--csi.mountdir`: the parent of publish targets.
    mount_dir: PathBuf,
    /// `--csi.stagingdir`.
    staging: PathBuf,
    created: Vec<String>,
}

/// A random suffix, as csi-sanity's UniqueString (`-%08X-%08X`).
fn unique_suffix() -> String {
    let mut b = [0u8; 8];
    if let Ok(f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = (&f).read_exact(&mut b);
    }
    let hex: String = b.iter().map(|x| format!("{x:02X}")).collect();
    format!("-{}-{}", &hex[..8], &hex[8..])
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{}", unique_suffix())
}

/// UniqueStringWithLength: padded with `a` to `len`.
fn unique_with_length(prefix: &str, len: usize) -> String {
    let mut s = unique(prefix);
    while s.len() < len {
        s.push('a');
    }
    s
}

/// The default IDGenerator's valid-looking id of a volume that does not exist.
fn unknown_volume_id() -> String {
    let hex = unique_suffix().to_lowercase();
    format!("fake-vol-id{}", &hex[..11])
}

fn secrets() -> HashMap<String, String> {
    HashMap::from([
        ("accessKeyId".to_string(), ACCESS_KEY.to_string()),
        ("secretAccessKey".to_string(), SECRET_KEY.to_string()),
    ])
}

fn cap() -> pb::VolumeCapability {
    mount_cap(Mode::SingleNodeWriter)
}

impl Sanity {
    fn setup(tag: &str) -> Result<Sanity> {
        let bucket = crate::server()?.bucket(&format!("san-{tag}"))?;
        let node = Node::start(&format!("san-{tag}"))?;
        let mount_dir = node.path("csi-mount");
        let staging = node.path("csi-staging");
        std::fs::create_dir(&mount_dir).context("creating the mount directory")?;
        std::fs::create_dir(&staging).context("creating the staging directory")?;
        let params = HashMap::from([
            ("bucket".to_string(), bucket.name.clone()),
            ("endpoint".to_string(), crate::server()?.endpoint()),
        ]);
        Ok(Sanity {
            node,
            params,
            mount_dir,
            staging,
            created: Vec::new(),
        })
    }

    fn target(&self) -> PathBuf {
        self.mount_dir.join("target")
    }

    fn controller(
        &self,
    ) -> Result<pb::controller_client::ControllerClient<tonic::transport::Channel>> {
        self.node.controller()
    }

    fn nodec(&self) -> Result<pb::node_client::NodeClient<tonic::transport::Channel>> {
        self.node.node()
    }

    /// MakeCreateVolumeReq.
    fn create_req(&self, name: &str) -> pb::CreateVolumeRequest {
        pb::CreateVolumeRequest {
            name: name.into(),
            volume_capabilities: vec![cap()],
            capacity_range: Some(pb::CapacityRange {
                required_bytes: TEST_VOLUME_SIZE,
                limit_bytes: 0,
            }),
            parameters: self.params.clone(),
            secrets: secrets(),
            ..Default::default()
        }
    }

    /// CreateVolume that must succeed; the volume is registered for clean-up.
    fn must_create(&mut self, req: pb::CreateVolumeRequest) -> Result<pb::Volume> {
        let name = req.name.clone();
        let vol = rt()
            .block_on(self.controller()?.create_volume(req))
            .with_context(|| format!("CreateVolume {name}"))?
            .into_inner()
            .volume
            .context("CreateVolume returned no volume")?;
        ensure!(
            !vol.volume_id.is_empty(),
            "CreateVolume returned an empty id"
        );
        self.created.push(vol.volume_id.clone());
        Ok(vol)
    }

    fn stage(&self, vol: &pb::Volume) -> Result<()> {
        rt().block_on(self.nodec()?.node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            volume_capability: Some(cap()),
            staging_target_path: self.staging.display().to_string(),
            volume_context: vol.volume_context.clone(),
            secrets: secrets(),
            ..Default::default()
        }))
        .context("NodeStageVolume")?;
        Ok(())
    }

    fn publish(&self, vol: &pb::Volume) -> Result<()> {
        rt().block_on(
            self.nodec()?
                .node_publish_volume(pb::NodePublishVolumeRequest {
                    volume_id: vol.volume_id.clone(),
                    target_path: self.target().display().to_string(),
                    staging_target_path: self.staging.display().to_string(),
                    volume_capability: Some(cap()),
                    volume_context: vol.volume_context.clone(),
                    secrets: secrets(),
                    ..Default::default()
                }),
        )
        .context("NodePublishVolume")?;
        Ok(())
    }

    /// Resources.Cleanup (every created volume, last first), then the tear-down.
    fn finish(mut self) -> Result<()> {
        let mut n = self.nodec()?;
        let mut c = self.controller()?;
        for id in std::mem::take(&mut self.created).into_iter().rev() {
            let relevant = |what: &str, r: Result<(), tonic::Status>| match r {
                Err(s) if s.code() != Code::NotFound => {
                    bail!("clean-up {what} of {id}: {s:?}")
                }
                _ => Ok(()),
            };
            relevant(
                "NodeUnpublishVolume",
                rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                    volume_id: id.clone(),
                    target_path: self.target().display().to_string(),
                }))
                .map(|_| ()),
            )?;
            relevant(
                "NodeUnstageVolume",
                rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: self.staging.display().to_string(),
                }))
                .map(|_| ()),
            )?;
            rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.clone(),
                secrets: secrets(),
            }))
            .with_context(|| format!("clean-up DeleteVolume of {id}"))?;
        }
        // csi-sanity removes both directories with rmdir; the next test's mkdir fails if
        // either is still there (or still mounted).
        std::fs::remove_dir(&self.mount_dir).context(
            "tear-down: rmdir of the mount directory (the driver must remove <mountdir>/target)",
        )?;
        std::fs::remove_dir(&self.staging)
            .context("tear-down: rmdir of the staging directory (must be unmounted)")?;
        let logs = self.node.stop();
        ensure!(
            !logs.contains(SECRET_KEY),
            "the secret key appears in the daemon or plugin logs"
        );
        Ok(())
    }
}

/// Identity Service: GetPluginCapabilities, Probe, GetPluginInfo.
fn identity() -> Result<()> {
    let s = Sanity::setup("id")?;
    let mut i = s.node.identity()?;
    let caps = rt()
        .block_on(i.get_plugin_capabilities(pb::GetPluginCapabilitiesRequest {}))?
        .into_inner();
    for c in &caps.capabilities {
        use pb::plugin_capability::Type;
        match &c.r#type {
            Some(Type::Service(svc)) => ensure!(
                (1..=3).contains(&svc.r#type),
                "unknown service capability {svc:?}"
            ),
            Some(Type::VolumeExpansion(e)) => ensure!(
                (1..=2).contains(&e.r#type),
                "unknown expansion capability {e:?}"
            ),
            None => bail!("a plugin capability without a type"),
        }
    }
    let probe = rt().block_on(i.probe(pb::ProbeRequest {}))?.into_inner();
    ensure!(
        probe.ready != Some(false),
        "Probe says not ready: {probe:?}"
    );
    let info = rt()
        .block_on(i.get_plugin_info(pb::GetPluginInfoRequest {}))?
        .into_inner();
    let name = info.name.as_bytes();
    ensure!(
        !name.is_empty()
            && name.len() <= 63
            && name[0].is_ascii_alphabetic()
            && name[name.len() - 1].is_ascii_alphabetic()
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(b)),
        "plugin name {:?} does not match ^[a-zA-Z][A-Za-z0-9-._]{{0,61}}[a-zA-Z]$",
        info.name
    );
    s.finish()
}

/// A call to an RPC by path, with an empty request: for RPCs our .proto does not define.
fn raw_call(node: &Node, path: &'static str) -> std::result::Result<(), tonic::Status> {
    let channel = node
        .channel()
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    rt().block_on(async {
        grpc.ready()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        grpc.unary::<pb::ProbeRequest, pb::ProbeResponse, _>(
            tonic::Request::new(pb::ProbeRequest {}),
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .map(|_| ())
    })
}

/// ControllerGetCapabilities lists known capabilities only, and every RPC whose capability
/// is not advertised answers UNIMPLEMENTED (csi-sanity skips those checks by capability;
/// a CO calling them anyway must get UNIMPLEMENTED, not a crash or a wrong answer).
fn controller_capabilities() -> Result<()> {
    use pb::controller_service_capability::{rpc::Type, Type as Cap};
    let s = Sanity::setup("ctlcaps")?;
    let caps = rt()
        .block_on(
            s.controller()?
                .controller_get_capabilities(pb::ControllerGetCapabilitiesRequest {}),
        )?
        .into_inner();
    let mut advertised = Vec::new();
    for c in &caps.capabilities {
        let Some(Cap::Rpc(rpc)) = &c.r#type else {
            bail!("a controller capability without an RPC: {c:?}");
        };
        let t = Type::try_from(rpc.r#type).context("unknown controller capability")?;
        ensure!(t != Type::Unknown, "UNKNOWN controller capability");
        advertised.push(t);
    }
    ensure!(
        advertised == [Type::CreateDeleteVolume],
        "berth-csi implements CREATE_DELETE_VOLUME only, yet advertises {advertised:?}"
    );
    let node_caps = rt()
        .block_on(
            s.nodec()?
                .node_get_capabilities(pb::NodeGetCapabilitiesRequest {}),
        )?
        .into_inner();
    let node_expand = node_caps.capabilities.iter().any(|c| {
        matches!(&c.r#type, Some(pb::node_service_capability::Type::Rpc(r))
            if r.r#type == pb::node_service_capability::rpc::Type::ExpandVolume as i32)
    });
    ensure!(
        !node_expand,
        "NodeExpandVolume is advertised but not implemented"
    );
    for path in [
        "/csi.v1.Controller/ControllerPublishVolume",
        "/csi.v1.Controller/ControllerUnpublishVolume",
        "/csi.v1.Controller/ListVolumes",
        "/csi.v1.Controller/GetCapacity",
        "/csi.v1.Controller/CreateSnapshot",
        "/csi.v1.Controller/DeleteSnapshot",
        "/csi.v1.Controller/ListSnapshots",
        "/csi.v1.Controller/GetSnapshot",
        "/csi.v1.Controller/ControllerExpandVolume",
        "/csi.v1.Controller/ControllerGetVolume",
        "/csi.v1.Controller/ControllerModifyVolume",
        "/csi.v1.Node/NodeExpandVolume",
        "/csi.v1.GroupController/GroupControllerGetCapabilities",
    ] {
        expect_code(path, raw_call(&s.node, path), Code::Unimplemented)?;
    }
    s.finish()
}

/// CreateVolume.
fn create_volume() -> Result<()> {
    let mut s = Sanity::setup("create")?;
    let mut c = s.controller()?;
    // should fail when no name is provided
    expect_code(
        "CreateVolume without a name",
        rt().block_on(c.create_volume(pb::CreateVolumeRequest {
            secrets: secrets(),
            parameters: s.params.clone(),
            ..Default::default()
        })),
        Code::InvalidArgument,
    )?;
    // should fail when no volume capabilities are provided
    expect_code(
        "CreateVolume without capabilities",
        rt().block_on(c.create_volume(pb::CreateVolumeRequest {
            name: unique("sanity-controller-create-no-volume-capabilities"),
            secrets: secrets(),
            parameters: s.params.clone(),
            ..Default::default()
        })),
        Code::InvalidArgument,
    )?;
    // should return appropriate values SingleNodeWriter NoCapacity / WithCapacity 1Gi
    s.must_create(s.create_req(&unique("sanity-controller-create-single-no-capacity")))?;
    let vol =
        s.must_create(s.create_req(&unique("sanity-controller-create-single-with-capacity")))?;
    ensure!(
        vol.capacity_bytes == 0 || vol.capacity_bytes >= TEST_VOLUME_SIZE,
        "capacity {} < {TEST_VOLUME_SIZE}",
        vol.capacity_bytes
    );
    // should not fail when requesting to create a volume with already existing name and
    // same capacity
    let name = unique("sanity-controller-create-twice");
    let v1 = s.must_create(s.create_req(&name))?;
    let v2 = s.must_create(s.create_req(&name))?;
    ensure!(v1.volume_id == v2.volume_id, "ids differ: {v1:?} {v2:?}");
    // should fail when requesting to create a volume with already existing name and
    // different capacity
    let name = unique("sanity-controller-create-twice-different");
    let mut req = s.create_req(&name);
    req.capacity_range = Some(pb::CapacityRange {
        required_bytes: TEST_VOLUME_SIZE,
        limit_bytes: TEST_VOLUME_SIZE,
    });
    let v1 = s.must_create(req)?;
    ensure!(
        v1.capacity_bytes == TEST_VOLUME_SIZE,
        "capacity {} != {TEST_VOLUME_SIZE}",
        v1.capacity_bytes
    );
    let mut req = s.create_req(&name);
    req.capacity_range = Some(pb::CapacityRange {
        required_bytes: 2 * TEST_VOLUME_SIZE,
        limit_bytes: 2 * TEST_VOLUME_SIZE,
    });
    expect_code(
        "CreateVolume again with another capacity",
        rt().block_on(c.create_volume(req)),
        Code::AlreadyExists,
    )?;
    // should not fail when creating volume with maximum-length name
    let name = unique_with_length("sanity-controller-create-maxlen", MAX_NAME_LENGTH);
    ensure!(name.len() == MAX_NAME_LENGTH, "name length {}", name.len());
    let vol = s.must_create(s.create_req(&name))?;
    ensure!(
        vol.capacity_bytes == 0 || vol.capacity_bytes >= TEST_VOLUME_SIZE,
        "capacity {}",
        vol.capacity_bytes
    );
    s.finish()
}

/// DeleteVolume.
fn delete_volume() -> Result<()> {
    let mut s = Sanity::setup("delete")?;
    let mut c = s.controller()?;
    // should fail when no volume id is provided
    expect_code(
        "DeleteVolume without an id",
        rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: String::new(),
            secrets: secrets(),
        })),
        Code::InvalidArgument,
    )?;
    // should succeed when an invalid volume id is used
    rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "fake-vol-id".into(),
        secrets: secrets(),
    }))
    .context("DeleteVolume of an invalid id must succeed")?;
    // should return appropriate values (no optional values added); the clean-up deletes
    // it a second time, which must succeed too.
    let vol = s.must_create(s.create_req(&unique("sanity-controller-create-appropriate")))?;
    rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        secrets: secrets(),
    }))
    .context("DeleteVolume")?;
    s.finish()
}

/// ValidateVolumeCapabilities.
fn validate_volume() -> Result<()> {
    let mut s = Sanity::setup("validate")?;
    let mut c = s.controller()?;
    // should fail when no volume id is provided
    expect_code(
        "ValidateVolumeCapabilities without an id",
        rt().block_on(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                secrets: secrets(),
                ..Default::default()
            }),
        ),
        Code::InvalidArgument,
    )?;
    // should fail when no volume capabilities are provided
    let vol = s.must_create(s.create_req(&unique("sanity-controller-validate-nocaps")))?;
    expect_code(
        "ValidateVolumeCapabilities without capabilities",
        rt().block_on(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: vol.volume_id.clone(),
                secrets: secrets(),
                ..Default::default()
            }),
        ),
        Code::InvalidArgument,
    )?;
    // should return appropriate values (no optional values added)
    let vol = s.must_create(s.create_req(&unique("sanity-controller-validate")))?;
    let resp = rt()
        .block_on(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: vol.volume_id.clone(),
                volume_capabilities: vec![cap()],
                secrets: secrets(),
                ..Default::default()
            }),
        )
        .context("ValidateVolumeCapabilities")?
        .into_inner();
    // If confirmed, the capabilities are required. berth supports mount access in every
    // mode, so it must confirm.
    let confirmed = resp
        .confirmed
        .with_context(|| format!("not confirmed: {}", resp.message))?;
    ensure!(
        !confirmed.volume_capabilities.is_empty(),
        "confirmed without capabilities"
    );
    // should fail when the requested volume does not exist
    expect_code(
        "ValidateVolumeCapabilities of an unknown volume",
        rt().block_on(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: unknown_volume_id(),
                volume_capabilities: vec![cap()],
                secrets: secrets(),
                ..Default::default()
            }),
        ),
        Code::NotFound,
    )?;
    // Stricter than csi-sanity: an id in our dynamic form whose bucket does not exist.
    let missing = format!(
        "nobucket{}/pvc-1?e={}&d=0",
        unique_suffix().to_lowercase().replace('-', ""),
        crate::server()?
            .endpoint()
            .replace(':', "%3A")
            .replace('/', "%2F")
    );
    expect_code(
        "ValidateVolumeCapabilities of a volume whose bucket does not exist",
        rt().block_on(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: missing,
                volume_capabilities: vec![cap()],
                secrets: secrets(),
                ..Default::default()
            }),
        ),
        Code::NotFound,
    )?;
    s.finish()
}

/// NodeGetCapabilities and NodeGetInfo.
fn node_capabilities() -> Result<()> {
    use pb::node_service_capability::{rpc::Type, Type as Cap};
    let s = Sanity::setup("nodecaps")?;
    let mut n = s.nodec()?;
    let caps = rt()
        .block_on(n.node_get_capabilities(pb::NodeGetCapabilitiesRequest {}))?
        .into_inner();
    let mut got = Vec::new();
    for c in &caps.capabilities {
        let Some(Cap::Rpc(rpc)) = &c.r#type else {
            bail!("a node capability without an RPC: {c:?}");
        };
        got.push(Type::try_from(rpc.r#type).context("unknown node capability")?);
    }
    ensure!(
        got == [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::VolumeCondition
        ],
        "node capabilities {got:?}"
    );
    let info = rt()
        .block_on(n.node_get_info(pb::NodeGetInfoRequest {}))?
        .into_inner();
    ensure!(!info.node_id.is_empty(), "empty node id");
    ensure!(info.max_volumes_per_node >= 0, "negative max volumes");
    s.finish()
}

/// The INVALID_ARGUMENT checks of NodePublish/Unpublish/Stage/UnstageVolume.
fn node_bad_requests() -> Result<()> {
    let mut s = Sanity::setup("nodebad")?;
    let mut n = s.nodec()?;
    let target = s.target().display().to_string();
    let staging = s.staging.display().to_string();
    let ia = Code::InvalidArgument;
    expect_code(
        "NodePublishVolume without a volume id",
        rt().block_on(n.node_publish_volume(pb::NodePublishVolumeRequest {
            secrets: secrets(),
            ..Default::default()
        })),
        ia,
    )?;
    expect_code(
        "NodePublishVolume without a target path",
        rt().block_on(n.node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: unknown_volume_id(),
            secrets: secrets(),
            ..Default::default()
        })),
        ia,
    )?;
    expect_code(
        "NodePublishVolume without a capability",
        rt().block_on(n.node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: unknown_volume_id(),
            target_path: target.clone(),
            secrets: secrets(),
            ..Default::default()
        })),
        ia,
    )?;
    // The spec (not csi-sanity): STAGE_UNSTAGE_VOLUME is advertised, so a publish without
    // a staging path is FAILED_PRECONDITION.
    expect_code(
        "NodePublishVolume without a staging path",
        rt().block_on(n.node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: unknown_volume_id(),
            target_path: target.clone(),
            volume_capability: Some(cap()),
            secrets: secrets(),
            ..Default::default()
        })),
        Code::FailedPrecondition,
    )?;
    expect_code(
        "NodeUnpublishVolume without a volume id",
        rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest::default())),
        ia,
    )?;
    expect_code(
        "NodeUnpublishVolume without a target path",
        rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: unknown_volume_id(),
            target_path: String::new(),
        })),
        ia,
    )?;
    let device = HashMap::from([("device".to_string(), "/dev/mock".to_string())]);
    expect_code(
        "NodeStageVolume without a volume id",
        rt().block_on(n.node_stage_volume(pb::NodeStageVolumeRequest {
            staging_target_path: staging.clone(),
            volume_capability: Some(cap()),
            publish_context: device.clone(),
            secrets: secrets(),
            ..Default::default()
        })),
        ia,
    )?;
    expect_code(
        "NodeStageVolume without a staging path",
        rt().block_on(n.node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: unknown_volume_id(),
            volume_capability: Some(cap()),
            publish_context: device.clone(),
            secrets: secrets(),
            ..Default::default()
        })),
        ia,
    )?;
    let vol = s.must_create(s.create_req(&unique("sanity-node-stage-nocaps")))?;
    expect_code(
        "NodeStageVolume without a capability",
        rt().block_on(n.node_stage_volume(pb::NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.clone(),
            publish_context: device,
            secrets: secrets(),
            ..Default::default()
        })),
        ia,
    )?;
    expect_code(
        "NodeUnstageVolume without a volume id",
        rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: staging,
        })),
        ia,
    )?;
    expect_code(
        "NodeUnstageVolume without a staging path",
        rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: unknown_volume_id(),
            staging_target_path: String::new(),
        })),
        ia,
    )?;
    s.finish()
}

/// NodeUnpublishVolume "should remove target path": the driver created `<mountdir>/target`
/// and must delete it.
fn unpublish_removes_target() -> Result<()> {
    let mut s = Sanity::setup("unpub")?;
    let vol = s.must_create(s.create_req(&unique("sanity-node-unpublish-volume")))?;
    s.stage(&vol)?;
    s.publish(&vol)?;
    let target = s.target();
    ensure!(
        target.exists(),
        "{} should have been created by the driver",
        target.display()
    );
    rt().block_on(
        s.nodec()?
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                target_path: target.display().to_string(),
            }),
    )
    .context("NodeUnpublishVolume")?;
    ensure!(
        !target.exists() && target.symlink_metadata().is_err(),
        "{} should have been removed by NodeUnpublishVolume",
        target.display()
    );
    s.finish()
}

/// NodeGetVolumeStats.
fn node_volume_stats() -> Result<()> {
    let mut s = Sanity::setup("stats")?;
    let mut n = s.nodec()?;
    let stats = |id: String, path: String| pb::NodeGetVolumeStatsRequest {
        volume_id: id,
        volume_path: path,
        staging_target_path: String::new(),
    };
    expect_code(
        "NodeGetVolumeStats without a volume id",
        rt().block_on(n.node_get_volume_stats(stats(String::new(), "some/path".into()))),
        Code::InvalidArgument,
    )?;
    expect_code(
        "NodeGetVolumeStats without a path",
        rt().block_on(n.node_get_volume_stats(stats(unknown_volume_id(), String::new()))),
        Code::InvalidArgument,
    )?;
    expect_code(
        "NodeGetVolumeStats of an unknown volume",
        rt().block_on(n.node_get_volume_stats(stats(unknown_volume_id(), "some/path".into()))),
        Code::NotFound,
    )?;
    let vol = s.must_create(s.create_req(&unique("sanity-node-get-volume-stats")))?;
    s.stage(&vol)?;
    s.publish(&vol)?;
    expect_code(
        "NodeGetVolumeStats of a volume on a path it is not on",
        rt().block_on(n.node_get_volume_stats(stats(vol.volume_id.clone(), "some/path".into()))),
        Code::NotFound,
    )?;
    // Stricter than csi-sanity: an absolute path that is a mount point, but of something
    // else (the test's shared bind mount), is not this volume either.
    expect_code(
        "NodeGetVolumeStats of a volume on another mount point",
        rt().block_on(n.node_get_volume_stats(stats(
            vol.volume_id.clone(),
            s.node.dir.display().to_string(),
        ))),
        Code::NotFound,
    )?;
    // An unknown volume on a path where another volume is mounted.
    expect_code(
        "NodeGetVolumeStats of an unknown volume at a published target",
        rt().block_on(
            n.node_get_volume_stats(stats(unknown_volume_id(), s.target().display().to_string())),
        ),
        Code::NotFound,
    )?;
    // The target and the staging path both answer, with a healthy condition.
    for path in [s.target(), s.staging.clone()] {
        let resp = rt()
            .block_on(
                n.node_get_volume_stats(stats(vol.volume_id.clone(), path.display().to_string())),
            )
            .with_context(|| format!("NodeGetVolumeStats at {}", path.display()))?
            .into_inner();
        ensure!(!resp.usage.is_empty(), "no usage: {resp:?}");
        let cond = resp.volume_condition.context("no volume condition")?;
        ensure!(!cond.abnormal, "abnormal: {cond:?}");
    }
    s.finish()
}

/// runControllerTest: create, stage `count` times, publish `count` times, stats; then the
/// clean-up unpublishes, unstages and deletes. With `count` > 1 this is "should be
/// idempotent". A file written through the target proves the mount is real.
fn node_cycle(count: usize) -> Result<()> {
    let mut s = Sanity::setup(if count > 1 { "idem" } else { "work" })?;
    let mut n = s.nodec()?;
    let info = rt()
        .block_on(n.node_get_info(pb::NodeGetInfoRequest {}))?
        .into_inner();
    ensure!(!info.node_id.is_empty(), "empty node id");
    let mut req = s.create_req(&unique(&format!("sanity-node-full-{count}")));
    if let Some(topology) = info.accessible_topology {
        req.accessibility_requirements = Some(pb::TopologyRequirement {
            requisite: vec![topology],
            preferred: Vec::new(),
        });
    }
    let vol = s.must_create(req)?;
    for i in 0..count {
        s.stage(&vol).with_context(|| format!("stage #{}", i + 1))?;
    }
    for i in 0..count {
        s.publish(&vol)
            .with_context(|| format!("publish #{}", i + 1))?;
    }
    let resp = rt()
        .block_on(n.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: vol.volume_id.clone(),
            volume_path: s.target().display().to_string(),
            staging_target_path: String::new(),
        }))
        .context("NodeGetVolumeStats")?
        .into_inner();
    ensure!(!resp.usage.is_empty(), "no usage: {resp:?}");
    let file = s.target().join("sanity.txt");
    std::fs::write(&file, b"through the target").context("writing through the target")?;
    ensure!(
        std::fs::read(s.staging.join("sanity.txt"))? == b"through the target",
        "the staging mount does not see the write"
    );
    // Repeats of unpublish and unstage succeed too (the clean-up does one more of each).
    for _ in 1..count.max(2) {
        rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: s.target().display().to_string(),
        }))
        .context("NodeUnpublishVolume")?;
    }
    for _ in 1..count.max(2) {
        rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: s.staging.display().to_string(),
        }))
        .context("NodeUnstageVolume")?;
    }
    s.finish()
}
