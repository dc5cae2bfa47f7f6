//! `berth daemon`: the node daemon. One per node, it owns every mount and share on the node
//! and serves the gRPC API of `proto/berth/v1/daemon.proto` on a unix socket:
//! - [`volumes`]: one supervised `berth mount` process per volume, bind-mounted to targets,
//!   ref-counted, restarted with backoff (a restart is what triggers the last-resort heal);
//! - [`service`]: the gRPC service (mount, unmount, list, warm, stats, upgrade, shares);
//! - [`table`]: the volume table on disk, from which a restarted daemon restores volumes;
//! - [`metrics`]: a Prometheus text endpoint, off unless `--metrics-addr` is given;
//! - [`mounts`]: mount-table helpers (also used by the CSI node plugin).

pub mod metrics;
pub mod mounts;
pub mod service;
pub mod table;
pub mod volumes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::os::unix::fs::PermissionsExt as _;

use anyhow::Context as _;
use clap::Args;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};

use crate::cache::shared::CacheServer;
use crate::units::parse_size;

pub mod pb {
    //! Generated from proto/berth/v1/daemon.proto.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("berth.v1");
}

#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Unix socket to serve the API on (its directory is created; a stale socket is replaced).
    #[arg(long, value_name = "PATH", default_value = "/run/berth/daemon.sock")]
    pub socket: PathBuf,

    /// State of the daemon and its mounts (inode journals, status files, volume mountpoints).
    #[arg(long, value_name = "DIR", default_value = "/run/berth")]
    pub state_dir: PathBuf,

    /// Node cache directory: one disk tier (data file, index, quota) for every volume of the
    /// node. The daemon owns it and serves its index to the mount processes on
    /// `<state-dir>/cache.sock`; they read and write the data file themselves. Without it,
    /// volumes have no block cache.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Disk quota of the node cache, for all volumes together (never exceeded).
    #[arg(long, value_name = "SIZE", default_value = "10GiB", value_parser = parse_size)]
    pub cache_size: u64,

    /// Block size of the node cache: the ranged GET size of every volume (a volume's
    /// `block-size` option must equal it).
    #[arg(long, value_name = "SIZE", default_value = "1MiB", value_parser = parse_size)]
    pub block_size: u64,

    /// Serve Prometheus metrics at http://ADDR/metrics (off by default), e.g. 127.0.0.1:9464.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// What the daemon's exit does to its volumes. `unmount`: unbind every target and stop
    /// every mount. `keep` (for a DaemonSet, where pods keep using their volumes across a
    /// daemon restart): leave the volumes recorded in --state-dir and kill the mount
    /// processes without unmounting; the next daemon restores every volume and re-binds the
    /// targets (applications see errors only in between). Recorded volumes are restored at
    /// start in either mode (after a crash, too).
    #[arg(long, value_enum, value_name = "WHAT", default_value = "unmount")]
    pub on_exit: OnExit,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    Unmount,
    Keep,
}

/// `berth daemon`.
pub fn run(args: DaemonArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let state_dir = args.state_dir.canonicalize()?;
    let berth_bin = std::env::current_exe().context("finding the berth binary")?;
    let cache = match &args.cache_dir {
        Some(dir) => Some(open_node_cache(dir, &args, &state_dir)?),
        None => None,
    };
    let node = volumes::Node {
        berth_bin,
        state_dir,
        cache,
        keep_on_exit: args.on_exit == OnExit::Keep,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(args, node))
}

/// Opens the node cache in `dir`; it is served once the runtime runs (see [`serve`]).
fn open_node_cache(
    dir: &Path,
    args: &DaemonArgs,
    state_dir: &Path,
) -> anyhow::Result<volumes::SharedCache> {
    if !(4096..=64 << 20).contains(&args.block_size) {
        anyhow::bail!("--block-size must be between 4KiB and 64MiB");
    }
    let server = CacheServer::open(dir, args.cache_size, args.block_size)
        .with_context(|| format!("opening the node cache in {}", dir.display()))?;
    Ok(volumes::SharedCache {
        socket: state_dir.join("cache.sock"),
        server,
    })
}

/// Serves the node cache's index to mount processes on its socket.
fn serve_node_cache(cache: &volumes::SharedCache) -> anyhow::Result<()> {
    let socket = &cache.socket;
    if socket.exists() {
        std::fs::remove_file(socket)
            .with_context(|| format!("removing stale socket {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    // Whoever can connect can fill or empty the node cache: the daemon's user only.
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", socket.display()))?;
    tokio::spawn(cache.server.clone().serve(listener));
    tracing::info!(socket = %socket.display(), "node cache served");
    Ok(())
}

async fn serve(args: DaemonArgs, node: volumes::Node) -> anyhow::Result<()> {
    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if args.socket.exists() {
        std::fs::remove_file(&args.socket)
            .with_context(|| format!("removing stale socket {}", args.socket.display()))?;
    }
    let listener = UnixListener::bind(&args.socket)
        .with_context(|| format!("binding {}", args.socket.display()))?;
    if let Some(cache) = &node.cache {
        serve_node_cache(cache)?;
    }
    let cache_socket = node.cache.as_ref().map(|c| c.socket.clone());
    let registry = volumes::Registry::new(node);
    registry.restore().await;
    let service = service::DaemonService::new(registry.clone());
    if let Some(addr) = args.metrics_addr {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding metrics address {addr}"))?;
        tokio::spawn(metrics::serve(listener, registry.clone()));
        tracing::info!(%addr, "metrics at /metrics");
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    println!("berth: daemon listening on {}", args.socket.display());
    tracing::info!(socket = %args.socket.display(), "daemon ready");
    tonic::transport::Server::builder()
        .add_service(pb::daemon_server::DaemonServer::new(service.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
        .context("serving the API")?;
    tracing::info!("stopping every volume and share");
    registry.shutdown().await;
    let _ = std::fs::remove_file(&args.socket);
    if let Some(socket) = cache_socket {
        let _ = std::fs::remove_file(socket);
    }
    Ok(())
}

/// A client of the daemon API over its unix socket. It connects on first use (and again after
/// the daemon restarts), so a client may start before the daemon.
pub fn connect(
    socket: &Path,
) -> anyhow::Result<pb::daemon_client::DaemonClient<tonic::transport::Channel>> {
    let socket = socket.to_path_buf();
    // The URI is required by the API but unused: every connection goes to the socket.
    let channel = tonic::transport::Endpoint::try_from("http://[::1]:1")?
        .connect_with_connector_lazy(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    UnixStream::connect(socket).await?,
                ))
            }
        }));
    Ok(pb::daemon_client::DaemonClient::new(channel))
}

/// `berth volumes --socket PATH`: one JSON object per volume.
pub fn print_volumes(socket: &Path) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let volumes = rt.block_on(async {
        let mut client = connect(socket)?;
        let resp = client
            .list_volumes(pb::ListVolumesRequest {})
            .await
            .with_context(|| format!("asking the daemon at {}", socket.display()))?;
        anyhow::Ok(resp.into_inner().volumes)
    })?;
    for v in &volumes {
        println!("{}", volume_json(v));
    }
    Ok(())
}

/// A volume as JSON (`berth volumes`, `berth --socket PATH status --json`); its status.json is
/// embedded as an object.
pub fn volume_json(v: &pb::VolumeInfo) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&v.status_json).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "volume": v.volume, "volume_id": v.volume_id, "source": v.source,
        "options": v.options, "targets": v.targets, "mountpoint": v.mountpoint,
        "state": v.state, "pid": v.pid, "restarts": v.restarts,
        "remount_generation": v.remount_generation, "last_error": v.last_error,
        "shares": v.shares, "status": status,
    })
}
