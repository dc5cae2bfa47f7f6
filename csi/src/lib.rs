//! berth-csi: the CSI plugin of berth.
//!
//! - [`identity`]: plugin name, capabilities, probe;
//! - [`controller`]: CreateVolume/DeleteVolume as prefixes in a bucket (talks to S3 itself,
//!   only to the endpoints of [`endpoint::Allowlist`]), each recorded in a [`record`];
//! - [`node`]: stage = ask the node daemon to mount, publish = bind-mount to the pod's target;
//! - [`recovery`]: re-binds publish targets after the daemon reports a last-resort remount,
//!   and [`events`] records it as a Kubernetes Event on the pods that use the volume;
//! - [`volume_id`]: what a volume id carries.

pub mod controller;
pub mod endpoint;
pub mod events;
pub mod identity;
pub mod kata;
pub mod node;
pub mod published;
pub mod record;
pub mod recovery;
pub mod s3;
pub mod volume_id;

use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;

pub mod pb {
    //! Generated from proto/csi/v1/csi.proto.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The name kubelet and the sidecars know the driver by.
pub const DRIVER_NAME: &str = "csi.berth.dev";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Node,
    Controller,
    All,
}

impl Mode {
    pub fn node(self) -> bool {
        matches!(self, Mode::Node | Mode::All)
    }
    pub fn controller(self) -> bool {
        matches!(self, Mode::Controller | Mode::All)
    }
}

#[derive(clap::Parser, Debug, Clone)]
#[command(name = "berth-csi", version, about = "CSI plugin for berth")]
pub struct Args {
    /// Where to serve CSI: unix://PATH (or a plain path).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,

    /// This node's name (the Kubernetes node name).
    #[arg(long, env = "NODE_ID", default_value = "")]
    pub node_id: String,

    /// The berth daemon's API socket (node mode).
    #[arg(long, value_name = "PATH", default_value = "/run/berth/daemon.sock")]
    pub daemon_socket: PathBuf,

    /// Which services to serve.
    #[arg(long, value_enum, default_value = "all")]
    pub mode: Mode,

    /// How often the node plugin asks the daemon for remounts to heal, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub recovery_interval_ms: u64,

    /// Where the daemon puts the vhost-user sockets of virtio-fs shares (`mounter: virtiofs`
    /// volumes); the VMM on the host must reach them.
    #[arg(
        long,
        env = "BERTH_SHARE_DIR",
        value_name = "DIR",
        default_value = "/run/berth/shares"
    )]
    pub share_dir: PathBuf,

    /// Kata's direct-volume directory, where the node plugin writes mountInfo.json of shares.
    #[arg(
        long,
        env = "KATA_DIRECT_VOLUME_DIR",
        value_name = "DIR",
        default_value = "/run/kata-containers/shared/direct-volumes"
    )]
    pub kata_direct_volume_dir: PathBuf,

    /// Write Kata direct-volume mountInfo.json (volume-type `berth-virtiofs`) for virtio-fs
    /// publishes. Only for runtimes that understand that type: stock Kata does not.
    #[arg(long, env = "BERTH_KATA_MOUNT_INFO", default_value_t = false, action = clap::ArgAction::Set)]
    pub kata_mount_info: bool,

    /// Where the node plugin keeps its list of publish targets, so that a restarted plugin
    /// still re-binds them after a remount. Default: `published.json` next to the endpoint
    /// socket (a hostPath in deploy/).
    #[arg(long, value_name = "PATH")]
    pub state_file: Option<PathBuf>,

    /// An S3 endpoint the controller may send requests to (repeat the flag; in the variable,
    /// separate them with commas). CreateVolume refuses a StorageClass `endpoint` that is not
    /// listed, DeleteVolume and ValidateVolumeCapabilities an id or context naming one. Without
    /// any, only AWS's own endpoint (no `endpoint` parameter) is allowed, which always is.
    #[arg(
        long = "allowed-endpoint",
        env = "BERTH_CSI_ALLOWED_ENDPOINTS",
        value_name = "URL",
        value_delimiter = ','
    )]
    pub allowed_endpoints: Vec<String>,

    /// Record a Kubernetes Event on pods whose volume was remounted (needs the in-cluster
    /// API or a kubeconfig; off when neither is there).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub kube_events: bool,
}

/// Path of a `unix://` endpoint.
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .unwrap_or(endpoint)
        .to_string();
    if path.is_empty() || endpoint.contains("://") && !endpoint.starts_with("unix://") {
        anyhow::bail!("--endpoint must be unix://PATH, not {endpoint:?}");
    }
    Ok(PathBuf::from(path))
}

pub async fn serve(
    args: Args,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let socket = socket_path(&args.endpoint)?;
    if args.mode.node() && args.node_id.is_empty() {
        anyhow::bail!("--node-id is required in node mode");
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let listener = listen(&socket)?;
    let identity = identity::IdentityService { mode: args.mode };
    let mut router = tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(identity));
    if args.mode.controller() {
        let allowed = endpoint::Allowlist::new(&args.allowed_endpoints)
            .context("--allowed-endpoint / BERTH_CSI_ALLOWED_ENDPOINTS")?;
        let list: Vec<String> = allowed.endpoints().iter().map(|e| e.url()).collect();
        tracing::info!(
            allowed_endpoints = ?list,
            "the controller talks to these S3 endpoints (and AWS's own)"
        );
        router = router.add_service(pb::controller_server::ControllerServer::new(
            controller::ControllerService { allowed },
        ));
    }
    if args.mode.node() {
        let daemon = berth::api::connect(&args.daemon_socket)?;
        let state_file = args
            .state_file
            .clone()
            .unwrap_or_else(|| socket.with_file_name("published.json"));
        let published = Arc::new(published::Published::load(&state_file));
        let node = node::NodeService {
            node_id: args.node_id.clone(),
            daemon: daemon.clone(),
            published: published.clone(),
            shares: kata::Paths {
                share_dir: args.share_dir.clone(),
                direct_volume_dir: args.kata_direct_volume_dir.clone(),
                write_mount_info: args.kata_mount_info,
            },
            stage_secrets: Default::default(),
        };
        let recorder = if args.kube_events {
            events::Recorder::from_env(args.node_id.clone()).await
        } else {
            None
        };
        tokio::spawn(recovery::watch(
            daemon,
            published,
            std::time::Duration::from_millis(args.recovery_interval_ms),
            recorder,
        ));
        router = router.add_service(pb::node_server::NodeServer::new(node));
    }
    tracing::info!(endpoint = %socket.display(), mode = ?args.mode, "berth-csi serving");
    println!("berth-csi: serving on {}", socket.display());
    router
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::filter(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                |conn| conn.as_ref().map_or(true, |c| may_connect(c.as_raw_fd())),
            ),
            shutdown,
        )
        .await
        .context("serving CSI")?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

/// The CSI socket, born 0600 (owned by this process's user): a stale file is replaced, a
/// socket another berth-csi still listens on is never taken over, anything else is refused.
fn listen(socket: &Path) -> anyhow::Result<tokio::net::UnixListener> {
    let listener = berth::sys::sockets::listen(socket, berth::sys::sockets::Peers::ROOT)
        .with_context(|| format!("listening on {}", socket.display()))?;
    listener
        .set_nonblocking(true)
        .context("making the CSI socket non-blocking")?;
    tokio::net::UnixListener::from_std(listener).context("registering the CSI socket")
}

/// Who may call the driver: root (the kubelet) and processes of our own user (the sidecars
/// of our pod, e.g. the controller's provisioner running as the same non-root user). Others
/// are disconnected before a byte is read.
fn may_connect(fd: std::os::fd::RawFd) -> bool {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    match berth::sys::sockets::peer_cred(fd) {
        Ok(peer) if peer.uid == 0 || peer.uid == me => true,
        Ok(peer) => {
            tracing::warn!(
                uid = peer.uid,
                pid = peer.pid,
                "refused a CSI connection from a process that is neither root nor this driver's user"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "refused a CSI connection whose peer is unknown");
            false
        }
    }
}

/// An empty string is a missing field (proto3 has no presence for strings).
pub fn required<'a>(value: &'a str, what: &str) -> Result<&'a str, tonic::Status> {
    if value.is_empty() {
        Err(tonic::Status::invalid_argument(format!(
            "{what} is required"
        )))
    } else {
        Ok(value)
    }
}

/// Checks capabilities: mount access only (no raw block); any access mode is fine (S3 is
/// shared storage). Returns whether every mode is read-only.
pub fn check_capability(cap: &pb::VolumeCapability) -> Result<bool, String> {
    use pb::volume_capability::access_mode::Mode as M;
    use pb::volume_capability::AccessType;
    match &cap.access_type {
        Some(AccessType::Mount(_)) => {}
        Some(AccessType::Block(_)) => return Err("block access is not supported".into()),
        None => return Err("access_type is required".into()),
    }
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| m.mode())
        .ok_or("access_mode is required")?;
    match mode {
        M::Unknown => Err("access mode UNKNOWN".into()),
        M::SingleNodeReaderOnly | M::MultiNodeReaderOnly => Ok(true),
        _ => Ok(false),
    }
}
