//! The cases.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use berth_csi::pb;
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::fixture::{expect_code, mount_cap, read_in_other_namespace, Node};
use crate::reqs::Needs;
use crate::seaweed::{ACCESS_KEY, SECRET_KEY};
use crate::util::rt;

pub struct Case {
    pub name: &'static str,
    pub needs: Needs,
    pub run: fn() -> Result<()>,
}

pub fn all() -> Vec<Case> {
    vec![
        Case {
            name: "node_stage_publish_rw_ro_across_namespaces_then_clean_up",
            needs: Needs::S3_MOUNT,
            run: node_lifecycle,
        },
        Case {
            name: "node_bad_requests_get_spec_codes",
            needs: Needs::S3_MOUNT,
            run: node_bad_requests,
        },
        Case {
            name: "controller_creates_and_deletes_prefixes",
            needs: Needs::S3_MOUNT,
            run: controller_prefixes,
        },
        Case {
            name: "dynamic_volume_end_to_end_with_refcounted_stage",
            needs: Needs::S3_MOUNT,
            run: dynamic_end_to_end,
        },
        Case {
            name: "killed_mount_is_restarted_and_targets_rebound",
            needs: Needs::S3_MOUNT,
            run: killed_mount_heals,
        },
        Case {
            name: "restarted_plugin_rebinds_targets_published_before",
            needs: Needs::S3_MOUNT,
            run: restarted_plugin_rebinds,
        },
        Case {
            name: "csi_socket_is_closed_to_others_and_never_taken_over",
            needs: Needs::S3_MOUNT,
            run: csi_socket_closed,
        },
    ]
}

/// The CSI socket is 0600, a process of another user cannot connect, and a second
/// berth-csi on the same endpoint is refused instead of unlinking the live socket.
fn csi_socket_closed() -> Result<()> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    use std::os::unix::process::CommandExt as _;
    let node = Node::start("socket")?;
    let meta = std::fs::symlink_metadata(&node.csi_socket)?;
    ensure!(meta.file_type().is_socket(), "no socket");
    ensure!(
        meta.permissions().mode() & 0o777 == 0o600,
        "the CSI socket is {:o}",
        meta.permissions().mode() & 0o777
    );
    // A process of another user (nobody) cannot connect.
    let probe = std::process::Command::new("python3")
        .args([
            "-c",
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e: print('refused', e.errno)",
        ])
        .arg(&node.csi_socket)
        .uid(65534)
        .gid(65534)
        .output()?;
    let said = String::from_utf8_lossy(&probe.stdout);
    ensure!(
        said.starts_with("refused"),
        "another user's connect: {said}{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    // A second driver on the same endpoint fails and leaves the first serving.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_berth-csi"))
        .arg("--endpoint")
        .arg(format!("unix://{}", node.csi_socket.display()))
        .args(["--mode", "controller", "--kube-events", "false"])
        .output()?;
    let err = String::from_utf8_lossy(&second.stderr);
    ensure!(
        !second.status.success(),
        "a second berth-csi took the live socket"
    );
    ensure!(err.contains("listen"), "unclear refusal: {err}");
    let name = rt()
        .block_on(
            node.identity()?
                .get_plugin_info(pb::GetPluginInfoRequest {}),
        )?
        .into_inner()
        .name;
    ensure!(
        name == berth_csi::DRIVER_NAME,
        "the first driver stopped answering"
    );
    let mut node = node;
    check_no_secrets(&node.stop())
}

fn secrets() -> HashMap<String, String> {
    HashMap::from([
        ("accessKeyId".to_string(), ACCESS_KEY.to_string()),
        ("secretAccessKey".to_string(), SECRET_KEY.to_string()),
    ])
}

fn context() -> Result<HashMap<String, String>> {
    Ok(HashMap::from([(
        "endpoint".to_string(),
        crate::server()?.endpoint(),
    )]))
}

fn stage_req(
    node: &Node,
    id: &str,
    staging: &str,
    mode: Mode,
) -> Result<pb::NodeStageVolumeRequest> {
    Ok(pb::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: node.path(staging).display().to_string(),
        volume_capability: Some(mount_cap(mode)),
        secrets: secrets(),
        volume_context: context()?,
        ..Default::default()
    })
}

fn publish_req(
    node: &Node,
    id: &str,
    staging: &str,
    target: &str,
    ro: bool,
) -> pb::NodePublishVolumeRequest {
    pb::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: node.path(staging).display().to_string(),
        target_path: node.path(target).display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        readonly: ro,
        ..Default::default()
    }
}

fn unpublish_req(node: &Node, id: &str, target: &str) -> pb::NodeUnpublishVolumeRequest {
    pb::NodeUnpublishVolumeRequest {
        volume_id: id.into(),
        target_path: node.path(target).display().to_string(),
    }
}

fn unstage_req(node: &Node, id: &str, staging: &str) -> pb::NodeUnstageVolumeRequest {
    pb::NodeUnstageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: node.path(staging).display().to_string(),
    }
}

fn check_no_secrets(logs: &str) -> Result<()> {
    ensure!(!logs.is_empty(), "no logs were captured");
    ensure!(
        !logs.contains(SECRET_KEY),
        "the secret key appears in the daemon or plugin logs"
    );
    Ok(())
}

fn daemon_volumes(node: &Node) -> Result<Vec<berth::api::pb::VolumeInfo>> {
    let mut d = node.daemon()?;
    Ok(rt()
        .block_on(d.list_volumes(berth::api::pb::ListVolumesRequest {}))?
        .into_inner()
        .volumes)
}

fn node_lifecycle() -> Result<()> {
    let bucket = crate::server()?.bucket("csi-node")?;
    bucket.put("vol1/hello.txt", b"hello from s3".to_vec())?;
    let id = format!("{}/vol1", bucket.name);
    let mut node = Node::start("life")?;
    let mut n = node.node()?;

    // Stage twice: the second call is a no-op success.
    for _ in 0..2 {
        rt().block_on(n.node_stage_volume(stage_req(
            &node,
            &id,
            "staging",
            Mode::MultiNodeMultiWriter,
        )?))
        .context("NodeStageVolume")?;
    }
    let vols = daemon_volumes(&node)?;
    ensure!(
        vols.len() == 1 && vols[0].targets.len() == 1,
        "daemon volumes: {vols:?}"
    );

    // Publish rw, seen from a mount namespace made before the publish.
    let rw = node.path("pods/a/volume");
    let seen = read_in_other_namespace(&rw.join("hello.txt"), || {
        rt().block_on(n.clone().node_publish_volume(publish_req(
            &node,
            &id,
            "staging",
            "pods/a/volume",
            false,
        )))?;
        Ok(())
    })?;
    ensure!(seen == "hello from s3", "other namespace read {seen:?}");
    // Publish again (idempotent), and read-only elsewhere (twice).
    rt().block_on(n.node_publish_volume(publish_req(
        &node,
        &id,
        "staging",
        "pods/a/volume",
        false,
    )))?;
    for _ in 0..2 {
        rt().block_on(n.node_publish_volume(publish_req(
            &node,
            &id,
            "staging",
            "pods/b/volume",
            true,
        )))?;
    }
    // The same target with another read-only setting is refused.
    expect_code(
        "publish rw over a ro target",
        rt().block_on(n.node_publish_volume(publish_req(
            &node,
            &id,
            "staging",
            "pods/b/volume",
            false,
        ))),
        Code::AlreadyExists,
    )?;

    // Writes go through rw, are refused on ro, and land in the bucket.
    std::fs::write(rw.join("new.txt"), b"written by a pod")
        .context("writing through the rw target")?;
    let ro = node.path("pods/b/volume");
    ensure!(
        std::fs::read(ro.join("new.txt"))? == b"written by a pod",
        "ro target does not see the write"
    );
    match std::fs::write(ro.join("x.txt"), b"no") {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {}
        other => bail!("write on a read-only target: {other:?}, want EROFS"),
    }
    ensure!(
        bucket.get("vol1/new.txt")? == b"written by a pod",
        "object not in the bucket"
    );

    // Stats on a published target.
    let stats = rt()
        .block_on(n.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: rw.display().to_string(),
            staging_target_path: String::new(),
        }))?
        .into_inner();
    ensure!(stats.usage.len() == 2, "stats: {stats:?}");

    // Metrics see the volume.
    let metrics = http_get(node.metrics_port, "/metrics").context("GET /metrics")?;
    ensure!(metrics.contains("berth_volumes 1"), "metrics: {metrics}");

    // Unpublish both (twice each): targets unmounted and removed.
    for target in ["pods/a/volume", "pods/b/volume"] {
        for _ in 0..2 {
            rt().block_on(n.node_unpublish_volume(unpublish_req(&node, &id, target)))?;
        }
        ensure!(!node.path(target).exists(), "{target} still exists");
    }
    for _ in 0..2 {
        rt().block_on(n.node_unstage_volume(unstage_req(&node, &id, "staging")))?;
    }
    ensure!(
        daemon_volumes(&node)?.is_empty(),
        "daemon still has volumes"
    );
    ensure!(
        !berth::sys::mounts::read()?
            .iter()
            .any(|m| m.target.starts_with(&node.dir) && m.target != node.dir),
        "mounts left below the node directory"
    );
    check_no_secrets(&node.stop())
}

fn http_get(port: u16, path: &str) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn node_bad_requests() -> Result<()> {
    let bucket = crate::server()?.bucket("csi-bad")?;
    let id = format!("{}/v", bucket.name);
    let node = Node::start("bad")?;
    let mut n = node.node()?;
    let mut no_id = stage_req(&node, &id, "s", Mode::SingleNodeWriter)?;
    no_id.volume_id.clear();
    expect_code(
        "stage without volume id",
        rt().block_on(n.node_stage_volume(no_id)),
        Code::InvalidArgument,
    )?;
    let mut no_path = stage_req(&node, &id, "s", Mode::SingleNodeWriter)?;
    no_path.staging_target_path.clear();
    expect_code(
        "stage without staging path",
        rt().block_on(n.node_stage_volume(no_path)),
        Code::InvalidArgument,
    )?;
    let mut no_cap = stage_req(&node, &id, "s", Mode::SingleNodeWriter)?;
    no_cap.volume_capability = None;
    expect_code(
        "stage without capability",
        rt().block_on(n.node_stage_volume(no_cap)),
        Code::InvalidArgument,
    )?;
    let mut block = stage_req(&node, &id, "s", Mode::SingleNodeWriter)?;
    block.volume_capability = Some(pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Block(Default::default())),
        access_mode: Some(pb::volume_capability::AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    });
    expect_code(
        "stage a block volume",
        rt().block_on(n.node_stage_volume(block)),
        Code::InvalidArgument,
    )?;
    expect_code(
        "stage a volume id that names no bucket",
        rt().block_on(n.node_stage_volume(stage_req(&node, "x", "s", Mode::SingleNodeWriter)?)),
        Code::NotFound,
    )?;
    expect_code(
        "publish an unstaged volume",
        rt().block_on(n.node_publish_volume(publish_req(&node, &id, "s", "t", false))),
        Code::FailedPrecondition,
    )?;
    let mut no_target = publish_req(&node, &id, "s", "t", false);
    no_target.target_path.clear();
    expect_code(
        "publish without target",
        rt().block_on(n.node_publish_volume(no_target)),
        Code::InvalidArgument,
    )?;
    expect_code(
        "unpublish without volume id",
        rt().block_on(n.node_unpublish_volume(unpublish_req(&node, "", "t"))),
        Code::InvalidArgument,
    )?;
    expect_code(
        "unstage without staging path",
        rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: String::new(),
        })),
        Code::InvalidArgument,
    )?;
    expect_code(
        "stats of a path with no volume",
        rt().block_on(n.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: node.path("nothing").display().to_string(),
            staging_target_path: String::new(),
        })),
        Code::NotFound,
    )?;
    expect_code(
        "stats of a relative path",
        rt().block_on(n.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: "some/path".into(),
            staging_target_path: String::new(),
        })),
        Code::NotFound,
    )?;
    // Unpublish / unstage of what was never there succeed.
    rt().block_on(n.node_unpublish_volume(unpublish_req(&node, &id, "never")))?;
    rt().block_on(n.node_unstage_volume(unstage_req(&node, &id, "never")))?;
    // Bad credentials: the mount fails cleanly and the secret is not logged.
    let mut wrong = stage_req(&node, &id, "s", Mode::SingleNodeWriter)?;
    wrong
        .secrets
        .insert("secretAccessKey".into(), format!("{SECRET_KEY}-wrong"));
    ensure!(
        rt().block_on(n.node_stage_volume(wrong)).is_err(),
        "stage with a wrong secret succeeded"
    );
    // Bad share requests of the daemon API get the matching codes and change nothing.
    let mut d = node.daemon()?;
    let share = |socket: String, options: &[(&str, &str)]| berth::api::pb::CreateShareRequest {
        source: format!("s3://{}", bucket.name),
        socket_path: socket,
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    expect_code(
        "CreateShare on a relative socket path",
        rt().block_on(d.create_share(share("rel/share.sock".into(), &[]))),
        Code::InvalidArgument,
    )?;
    expect_code(
        "CreateShare with a bad request-queues",
        rt().block_on(d.create_share(share(
            node.path("q.sock").display().to_string(),
            &[("request-queues", "lots")],
        ))),
        Code::InvalidArgument,
    )?;
    let plain = node.path("plain-file");
    std::fs::write(&plain, b"keep me")?;
    let mut on_plain = share(plain.display().to_string(), &[]);
    on_plain
        .options
        .insert("endpoint-url".into(), crate::server()?.endpoint());
    on_plain.secrets = secrets();
    expect_code(
        "CreateShare over a file that is not a socket",
        rt().block_on(d.create_share(on_plain)),
        Code::FailedPrecondition,
    )?;
    ensure!(
        std::fs::read(&plain)? == b"keep me",
        "the file was replaced"
    );
    ensure!(
        daemon_volumes(&node)?.iter().all(|v| v.shares.is_empty()),
        "a refused share was recorded"
    );
    let info = rt()
        .block_on(n.node_get_info(pb::NodeGetInfoRequest {}))?
        .into_inner();
    ensure!(info.node_id == "test-node", "{info:?}");
    let caps = rt()
        .block_on(n.node_get_capabilities(pb::NodeGetCapabilitiesRequest {}))?
        .into_inner();
    ensure!(caps.capabilities.len() == 3, "{caps:?}");
    let name = rt()
        .block_on(
            node.identity()?
                .get_plugin_info(pb::GetPluginInfoRequest {}),
        )?
        .into_inner()
        .name;
    ensure!(name == berth_csi::DRIVER_NAME);
    let mut node = node;
    check_no_secrets(&node.stop())
}

fn create_req(
    name: &str,
    bucket: &str,
    extra: &[(&str, &str)],
    bytes: i64,
) -> Result<pb::CreateVolumeRequest> {
    let mut parameters = HashMap::from([
        ("bucket".to_string(), bucket.to_string()),
        ("endpoint".to_string(), crate::server()?.endpoint()),
        ("prefix".to_string(), "pvs".to_string()),
    ]);
    for (k, v) in extra {
        parameters.insert(k.to_string(), v.to_string());
    }
    Ok(pb::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::MultiNodeMultiWriter)],
        parameters,
        secrets: secrets(),
        ..Default::default()
    })
}

fn controller_prefixes() -> Result<()> {
    let bucket = crate::server()?.bucket("csi-ctl")?;
    let node = Node::start("ctl")?;
    let mut c = node.controller()?;
    // Create twice: same id, one marker.
    let v1 = rt()
        .block_on(c.create_volume(create_req("pvc-1", &bucket.name, &[], 1 << 30)?))?
        .into_inner()
        .volume
        .context("no volume")?;
    let v1b = rt()
        .block_on(c.create_volume(create_req("pvc-1", &bucket.name, &[], 1 << 30)?))?
        .into_inner()
        .volume
        .context("no volume")?;
    ensure!(
        v1.volume_id == v1b.volume_id,
        "ids differ: {} {}",
        v1.volume_id,
        v1b.volume_id
    );
    ensure!(bucket.exists("pvs/pvc-1/")?, "no marker for pvs/pvc-1");
    ensure!(v1.volume_context.get("endpoint") == Some(&crate::server()?.endpoint()));
    expect_code(
        "same name, other capacity",
        rt().block_on(c.create_volume(create_req("pvc-1", &bucket.name, &[], 2 << 30)?)),
        Code::AlreadyExists,
    )?;
    let mut no_name = create_req("x", &bucket.name, &[], 0)?;
    no_name.name.clear();
    expect_code(
        "create without name",
        rt().block_on(c.create_volume(no_name)),
        Code::InvalidArgument,
    )?;
    let mut no_bucket = create_req("x", &bucket.name, &[], 0)?;
    no_bucket.parameters.remove("bucket");
    expect_code(
        "create without bucket",
        rt().block_on(c.create_volume(no_bucket)),
        Code::InvalidArgument,
    )?;
    let mut no_caps = create_req("x", &bucket.name, &[], 0)?;
    no_caps.volume_capabilities.clear();
    expect_code(
        "create without capabilities",
        rt().block_on(c.create_volume(no_caps)),
        Code::InvalidArgument,
    )?;
    expect_code(
        "unknown parameter",
        rt().block_on(c.create_volume(create_req("x", &bucket.name, &[("bukket", "y")], 0)?)),
        Code::InvalidArgument,
    )?;

    // Validate: an existing volume is confirmed, a missing one is NOT_FOUND.
    let valid = rt()
        .block_on(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: v1.volume_id.clone(),
                volume_capabilities: vec![mount_cap(Mode::MultiNodeReaderOnly)],
                secrets: secrets(),
                ..Default::default()
            }),
        )?
        .into_inner();
    ensure!(valid.confirmed.is_some(), "{valid:?}");
    let missing = v1.volume_id.replace("pvc-1", "pvc-nope");
    expect_code(
        "validate a missing volume",
        rt().block_on(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: missing,
                volume_capabilities: vec![mount_cap(Mode::MultiNodeReaderOnly)],
                secrets: secrets(),
                ..Default::default()
            }),
        ),
        Code::NotFound,
    )?;

    // An id that only looks like a bucket (csi-sanity's fake ids) is NOT_FOUND too.
    expect_code(
        "validate a fake id",
        rt().block_on(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: "fake-vol-id-0123456789".into(),
                volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
                secrets: secrets(),
                ..Default::default()
            }),
        ),
        Code::NotFound,
    )?;
    // A static handle is found in the store at the endpoint its context names.
    bucket.put("static/obj", b"x".to_vec())?;
    let static_ok = rt()
        .block_on(
            c.validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: format!("{}/static", bucket.name),
                volume_context: context()?,
                volume_capabilities: vec![mount_cap(Mode::MultiNodeReaderOnly)],
                secrets: secrets(),
                ..Default::default()
            }),
        )?
        .into_inner();
    ensure!(static_ok.confirmed.is_some(), "{static_ok:?}");

    // Retain (default): data stays after DeleteVolume.
    bucket.put("pvs/pvc-1/data.bin", b"keep".to_vec())?;
    for _ in 0..2 {
        rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: v1.volume_id.clone(),
            secrets: secrets(),
        }))?;
    }
    ensure!(
        bucket.exists("pvs/pvc-1/data.bin")?,
        "retained data was deleted"
    );

    // onDelete=delete: the prefix goes, and nothing outside it.
    let v2 = rt()
        .block_on(c.create_volume(create_req(
            "pvc-2",
            &bucket.name,
            &[("onDelete", "delete")],
            0,
        )?))?
        .into_inner()
        .volume
        .context("no volume")?;
    for i in 0..5 {
        bucket.put(&format!("pvs/pvc-2/d/f{i}"), b"x".to_vec())?;
    }
    bucket.put("pvs/pvc-20/other", b"neighbour".to_vec())?;
    for _ in 0..2 {
        rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: v2.volume_id.clone(),
            secrets: secrets(),
        }))?;
    }
    ensure!(
        bucket.list("pvs/pvc-2/")?.is_empty(),
        "prefix not deleted: {:?}",
        bucket.list("pvs/pvc-2/")?
    );
    ensure!(
        bucket.exists("pvs/pvc-20/other")?,
        "a neighbouring prefix was deleted"
    );
    // An id we never made: deleting it succeeds.
    rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
        volume_id: "not an id".into(),
        secrets: secrets(),
    }))?;
    expect_code(
        "delete without id",
        rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
            volume_id: String::new(),
            secrets: secrets(),
        })),
        Code::InvalidArgument,
    )?;
    let mut node = node;
    check_no_secrets(&node.stop())
}

fn dynamic_end_to_end() -> Result<()> {
    let bucket = crate::server()?.bucket("csi-dyn")?;
    let node = Node::start("dyn")?;
    let mut c = node.controller()?;
    let mut n = node.node()?;
    let vol = rt()
        .block_on(c.create_volume(create_req(
            "pvc-e2e",
            &bucket.name,
            &[("onDelete", "delete"), ("metadata-ttl", "1s")],
            0,
        )?))?
        .into_inner()
        .volume
        .context("no volume")?;
    let id = vol.volume_id.clone();
    // Two staging paths of the same volume (two PVs of one prefix): one mount, two targets.
    for staging in ["stage1", "stage2"] {
        let mut req = stage_req(&node, &id, staging, Mode::MultiNodeMultiWriter)?;
        req.volume_context = vol.volume_context.clone();
        rt().block_on(n.node_stage_volume(req))?;
    }
    let vols = daemon_volumes(&node)?;
    ensure!(
        vols.len() == 1 && vols[0].targets.len() == 2,
        "expected one shared volume: {vols:?}"
    );
    rt().block_on(n.node_publish_volume(publish_req(&node, &id, "stage1", "pods/p1/vol", false)))?;
    rt().block_on(n.node_publish_volume(publish_req(&node, &id, "stage2", "pods/p2/vol", false)))?;
    std::fs::write(node.path("pods/p1/vol/result.txt"), b"result")?;
    ensure!(
        bucket.get("pvs/pvc-e2e/result.txt")? == b"result",
        "written file not in the prefix"
    );
    ensure!(
        std::fs::read(node.path("pods/p2/vol/result.txt"))? == b"result",
        "other pod does not see it"
    );
    for (t, s) in [("pods/p1/vol", "stage1"), ("pods/p2/vol", "stage2")] {
        rt().block_on(n.node_unpublish_volume(unpublish_req(&node, &id, t)))?;
        rt().block_on(n.node_unstage_volume(unstage_req(&node, &id, s)))?;
    }
    ensure!(daemon_volumes(&node)?.is_empty(), "volume still mounted");
    rt().block_on(c.delete_volume(pb::DeleteVolumeRequest {
        volume_id: id,
        secrets: secrets(),
    }))?;
    ensure!(
        bucket.list("pvs/pvc-e2e/")?.is_empty(),
        "prefix not deleted"
    );
    let mut node = node;
    check_no_secrets(&node.stop())
}

fn killed_mount_heals() -> Result<()> {
    let (node, id) = staged_and_published(
        "heal",
        &[
            ("pods/a/vol", false),
            ("pods/b/vol", true),
            ("pods/c/vol", false),
        ],
    )?;
    let mut n = node.node()?;
    let target = node.path("pods/a/vol/data.txt");
    ensure!(std::fs::read(&target)? == b"survives");
    // pods/c stands for a target the remounting `berth mount` cannot see (another mount
    // namespace): its bind is gone when the mount dies, so only berth-csi can bind it again.
    berth::sys::mounts::unmount_all(&node.path("pods/c/vol"))?;
    let before = daemon_volumes(&node)?.pop().context("no volume")?;
    // SAFETY: kill -9 of the mount process the daemon reports.
    unsafe { libc::kill(before.pid as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = daemon_volumes(&node)?.pop().context("volume vanished")?;
        let readable = std::fs::read(&target).ok();
        let hidden = std::fs::read(node.path("pods/c/vol/data.txt")).ok();
        if v.restarts >= 1
            && hidden.as_deref() == Some(b"survives".as_slice())
            && v.remount_generation >= 1
            && v.state == "running"
            && readable.as_deref() == Some(b"survives".as_slice())
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("not healed within 60 s: state {} restarts {} generation {} read {:?}; last error {}",
                v.state, v.restarts, v.remount_generation, readable.map(|r| String::from_utf8_lossy(&r).into_owned()), v.last_error);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The read-only target came back read-only.
    let read_only = node.path("pods/b/vol");
    ensure!(std::fs::read(read_only.join("data.txt"))? == b"survives");
    let write = std::fs::write(read_only.join("new.txt"), b"x");
    ensure!(
        write
            .as_ref()
            .is_err_and(|e| e.raw_os_error() == Some(libc::EROFS)),
        "writing through the read-only target after the remount: {write:?}"
    );
    for target in ["pods/a/vol", "pods/b/vol", "pods/c/vol"] {
        rt().block_on(n.node_unpublish_volume(unpublish_req(&node, &id, target)))?;
    }
    rt().block_on(n.node_unstage_volume(unstage_req(&node, &id, "staging")))?;
    let mut node = node;
    check_no_secrets(&node.stop())
}

/// berth-csi is restarted (its container replaced) and the volume is remounted while it is
/// away: the targets it published before come back, also one that only it can re-bind (its
/// list of targets is kept in `published.json` next to its socket).
fn restarted_plugin_rebinds() -> Result<()> {
    let (mut node, id) =
        staged_and_published("restart", &[("pods/a/vol", false), ("pods/c/vol", false)])?;
    // As in killed_mount_heals: a target the remounting mount cannot see.
    let hidden = node.path("pods/c/vol/data.txt");
    berth::sys::mounts::unmount_all(&node.path("pods/c/vol"))?;
    let before = daemon_volumes(&node)?.pop().context("no volume")?;
    let remounted = |node: &Node| -> Result<bool> {
        let v = daemon_volumes(node)?.pop().context("volume vanished")?;
        Ok(v.restarts >= 1 && v.remount_generation >= 1 && v.state == "running")
    };
    node.stop_csi();
    // SAFETY: kill -9 of the mount process the daemon reports.
    unsafe { libc::kill(before.pid as libc::pid_t, libc::SIGKILL) };
    wait_until("the daemon remounts the volume", || remounted(&node))?;
    ensure!(
        std::fs::read(&hidden).is_err(),
        "the hidden target serves without berth-csi (the test proves nothing)"
    );
    node.start_csi_again()?;
    wait_until("the restarted berth-csi re-binds the hidden target", || {
        Ok(std::fs::read(&hidden).ok().as_deref() == Some(b"survives".as_slice()))
    })?;
    ensure!(std::fs::read(node.path("pods/a/vol/data.txt"))? == b"survives");
    let mut n = node.node()?;
    for target in ["pods/a/vol", "pods/c/vol"] {
        rt().block_on(n.node_unpublish_volume(unpublish_req(&node, &id, target)))?;
    }
    rt().block_on(n.node_unstage_volume(unstage_req(&node, &id, "staging")))?;
    check_no_secrets(&node.stop())
}

/// A node with `v/data.txt` ("survives") in a new bucket staged at `staging` and published
/// at each `(target, read_only)`; returns the node and the volume id.
fn staged_and_published(tag: &str, targets: &[(&str, bool)]) -> Result<(Node, String)> {
    let bucket = crate::server()?.bucket(&format!("csi-{tag}"))?;
    bucket.put("v/data.txt", b"survives".to_vec())?;
    let id = format!("{}/v", bucket.name);
    let node = Node::start(tag)?;
    let mut n = node.node()?;
    rt().block_on(n.node_stage_volume(stage_req(
        &node,
        &id,
        "staging",
        Mode::MultiNodeMultiWriter,
    )?))?;
    for (target, read_only) in targets {
        rt().block_on(
            n.node_publish_volume(publish_req(&node, &id, "staging", target, *read_only)),
        )?;
    }
    Ok((node, id))
}

/// Polls `done` every 200 ms for up to 60 s.
fn wait_until(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done()? {
        if Instant::now() > deadline {
            bail!("{what}: not within 60 s");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
