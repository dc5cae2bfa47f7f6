//! The serverless publish flow (`mounter: virtiofs`): NodePublishVolume makes a virtio-fs
//! share through the daemon and writes Kata's direct-volume mountInfo.json, keeping the bind
//! mount; NodeUnpublishVolume removes both. Real parts: the daemon runs `berth share`, and
//! the test speaks vhost-user to the socket.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use berth_csi::pb;
use pb::volume_capability::access_mode::Mode;
use tonic::Code;

use crate::cases::Case;
use crate::fixture::{expect_code, mount_cap, Node};
use crate::reqs::Needs;
use crate::seaweed::{ACCESS_KEY, SECRET_KEY};
use crate::util::rt;

pub fn all() -> Vec<Case> {
    vec![
        Case {
            name: "kata_virtiofs_publish_makes_a_share_and_mount_info_and_unpublish_removes_them",
            needs: Needs::S3_MOUNT,
            run: virtiofs_publish,
        },
        Case {
            name: "kata_virtiofs_publish_by_default_writes_no_kata_files",
            needs: Needs::S3_MOUNT,
            run: virtiofs_without_mount_info,
        },
    ]
}

const VHOST_USER_GET_FEATURES: u32 = 1;
/// Header flags: protocol version 1; the reply bit.
const VHOST_USER_VERSION: u32 = 0x1;
const VHOST_USER_REPLY: u32 = 0x4;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Sends VHOST_USER_GET_FEATURES and returns the features the backend offers.
fn vhost_user_features(socket: &Path) -> Result<u64> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut msg = Vec::with_capacity(12);
    for word in [VHOST_USER_GET_FEATURES, VHOST_USER_VERSION, 0] {
        msg.extend_from_slice(&word.to_le_bytes());
    }
    s.write_all(&msg)?;
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply)
        .context("reading the VHOST_USER_GET_FEATURES reply")?;
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    ensure!(
        word(0) == VHOST_USER_GET_FEATURES,
        "reply to request {}",
        word(0)
    );
    ensure!(
        word(4) & VHOST_USER_REPLY != 0 && word(4) & 0x3 == VHOST_USER_VERSION,
        "reply flags {:#x}",
        word(4)
    );
    ensure!(word(8) == 8, "reply payload of {} bytes", word(8));
    let mut features = [0u8; 8];
    features.copy_from_slice(&reply[12..20]);
    Ok(u64::from_le_bytes(features))
}

fn secrets() -> HashMap<String, String> {
    HashMap::from([
        ("accessKeyId".to_string(), ACCESS_KEY.to_string()),
        ("secretAccessKey".to_string(), SECRET_KEY.to_string()),
    ])
}

fn virtiofs_publish() -> Result<()> {
    let bucket = crate::server()?.bucket("csi-kata")?;
    bucket.put("vol1/hello.txt", b"hello from s3".to_vec())?;
    let id = format!("{}/vol1", bucket.name);
    let node = Node::start_with("kata", |dir| {
        vec![
            ("BERTH_SHARE_DIR".to_string(), dir.join("shares")),
            ("KATA_DIRECT_VOLUME_DIR".to_string(), dir.join("direct")),
            ("BERTH_KATA_MOUNT_INFO".to_string(), PathBuf::from("true")),
        ]
    })?;
    let mut n = node.node()?;
    let staging = node.path("staging");
    let mut ctx = HashMap::from([
        ("endpoint".to_string(), crate::server()?.endpoint()),
        ("mounter".to_string(), "virtiofs".to_string()),
    ]);
    rt().block_on(n.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        secrets: secrets(),
        volume_context: ctx.clone(),
        ..Default::default()
    }))
    .context("NodeStageVolume")?;
    let target = node.path("pods/p1/volumes/kubernetes.io~csi/pv1/mount");
    // No publish secrets (no nodePublishSecretRef): the share uses the stage secrets.
    let publish = |ctx: &HashMap<String, String>| pb::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeMultiWriter)),
        volume_context: ctx.clone(),
        ..Default::default()
    };
    // A mounter value we do not know is refused, and nothing is left behind.
    ctx.insert("mounter".into(), "virtio-fs".into());
    expect_code(
        "publish with mounter virtio-fs",
        rt().block_on(n.node_publish_volume(publish(&ctx))),
        Code::InvalidArgument,
    )?;
    ensure!(!target.exists(), "a refused publish left the target");
    ctx.insert("mounter".into(), "virtiofs".into());
    for i in 0..2 {
        rt().block_on(n.node_publish_volume(publish(&ctx)))
            .with_context(|| format!("NodePublishVolume #{}", i + 1))?;
    }

    // The bind mount is there (the pod works under runc too).
    ensure!(
        std::fs::read(target.join("hello.txt")).context("reading through the target")?
            == b"hello from s3",
        "target content"
    );
    // One share socket, answering vhost-user.
    let sockets: Vec<PathBuf> = std::fs::read_dir(node.path("shares"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    ensure!(sockets.len() == 1, "share sockets: {sockets:?}");
    let socket = &sockets[0];
    let features = vhost_user_features(socket)?;
    ensure!(
        features & VIRTIO_F_VERSION_1 != 0,
        "features {features:#x} lack VIRTIO_F_VERSION_1"
    );
    // The share is served by the staged volume's own mount process (one engine and cache).
    let volumes = rt()
        .block_on(
            node.daemon()?
                .list_volumes(berth::api::pb::ListVolumesRequest {}),
        )?
        .into_inner()
        .volumes;
    ensure!(
        volumes.len() == 1 && volumes[0].shares == [socket.display().to_string()],
        "the share is not served by the staged volume: {volumes:?}"
    );
    // mountInfo.json, where the Go runtime looks (URL-safe base64 of the target path).
    let encoded = berth_csi::kata::base64(target.as_os_str().as_encoded_bytes(), true);
    let info_path = node.path("direct").join(&encoded).join("mountInfo.json");
    let info: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&info_path)
            .with_context(|| format!("reading {}", info_path.display()))?,
    )?;
    ensure!(info["volume-type"] == "berth-virtiofs", "mountInfo {info}");
    ensure!(
        info["device"] == socket.display().to_string().as_str(),
        "mountInfo device {} is not the socket {}",
        info["device"],
        socket.display()
    );
    ensure!(info["fstype"] == "virtiofs", "mountInfo {info}");
    ensure!(
        info["metadata"]["volumeId"] == id.as_str(),
        "mountInfo {info}"
    );

    // Unpublish (twice): share, socket, mountInfo and target all gone.
    for _ in 0..2 {
        rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        }))
        .context("NodeUnpublishVolume")?;
    }
    ensure!(!socket.exists(), "{} still exists", socket.display());
    ensure!(
        std::fs::read_dir(node.path("direct"))?.next().is_none(),
        "direct-volume files left: {:?}",
        std::fs::read_dir(node.path("direct"))?.collect::<Vec<_>>()
    );
    ensure!(!target.exists(), "target still exists");
    let stats = rt()
        .block_on(node.daemon()?.stats(berth::api::pb::StatsRequest {}))?
        .into_inner();
    ensure!(
        stats.shares == 0,
        "daemon still has {} shares",
        stats.shares
    );

    rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
    }))
    .context("NodeUnstageVolume")?;
    let mut node = node;
    let logs = node.stop();
    ensure!(
        !logs.contains(SECRET_KEY),
        "the secret key appears in the daemon or plugin logs"
    );
    Ok(())
}

/// The default (`--kata-mount-info=false`): the share is made, but no mountInfo.json (stock
/// Kata would turn the mount into the socket path), and a read-only publish shares read-only.
fn virtiofs_without_mount_info() -> Result<()> {
    let bucket = crate::server()?.bucket("csi-kata-nomi")?;
    bucket.put("v/a.txt", b"a".to_vec())?;
    let id = format!("{}/v", bucket.name);
    let mut node = Node::start_with("katanomi", |dir| {
        vec![
            ("BERTH_SHARE_DIR".to_string(), dir.join("shares")),
            ("KATA_DIRECT_VOLUME_DIR".to_string(), dir.join("direct")),
        ]
    })?;
    let mut n = node.node()?;
    let staging = node.path("staging");
    let ctx = HashMap::from([
        ("endpoint".to_string(), crate::server()?.endpoint()),
        ("mounter".to_string(), "virtiofs".to_string()),
    ]);
    rt().block_on(n.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeReaderOnly)),
        secrets: secrets(),
        volume_context: ctx.clone(),
        ..Default::default()
    }))
    .context("NodeStageVolume")?;
    let target = node.path("pods/p2/mount");
    rt().block_on(n.node_publish_volume(pb::NodePublishVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap(Mode::MultiNodeReaderOnly)),
        readonly: true,
        volume_context: ctx,
        // Publish secrets given: they are the share's credentials.
        secrets: secrets(),
        ..Default::default()
    }))
    .context("NodePublishVolume")?;
    let sockets: Vec<PathBuf> = std::fs::read_dir(node.path("shares"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    ensure!(sockets.len() == 1, "share sockets: {sockets:?}");
    vhost_user_features(&sockets[0])?;
    ensure!(
        !node.path("direct").exists(),
        "Kata files were written without --kata-mount-info"
    );
    ensure!(
        std::fs::read(target.join("a.txt"))? == b"a",
        "target content"
    );
    rt().block_on(n.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: target.display().to_string(),
    }))
    .context("NodeUnpublishVolume")?;
    ensure!(!sockets[0].exists(), "socket left after unpublish");
    rt().block_on(n.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id,
        staging_target_path: staging.display().to_string(),
    }))
    .context("NodeUnstageVolume")?;
    let logs = node.stop();
    ensure!(
        !logs.contains(SECRET_KEY),
        "the secret key appears in the logs"
    );
    Ok(())
}
