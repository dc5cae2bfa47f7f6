//! `berth daemon`: the node daemon. One per node, it owns every mount and share on the node
//! and serves the gRPC API of `proto/berth/v1/daemon.proto` on a unix socket:
//! - [`spec`]: what a volume is (source, allow-listed options, credentials) and the node's
//!   settings; the CSI plugin and the CLI's `--socket` mode use the same option vocabulary;
//! - [`registry`]: the daemon's volumes, ref-counted by target, recorded for a restart;
//! - [`supervisor`]: one supervised `berth mount` process per volume, restarted with backoff
//!   (a restart is what triggers the last-resort heal), re-bound and re-shared after it;
//! - [`service`]: the gRPC service (mount, unmount, list, warm, stats, upgrade, shares);
//! - [`table`]: the volume table on disk, from which a restarted daemon restores volumes;
//! - [`metrics`]: a Prometheus text endpoint, off unless `--metrics-addr` is given.

pub mod metrics;
pub mod registry;
pub mod service;
pub mod spec;
pub mod supervisor;
pub mod table;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::os::fd::AsRawFd as _;

use anyhow::Context as _;
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};

use crate::cache::node::CacheServer;
use crate::state;
use crate::sys::files::{private_dir, NodeKey};
use crate::sys::sockets::{self, Peers};

pub mod pb {
    //! Generated from proto/berth/v1/daemon.proto.
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("berth.v1");
}

/// What `berth daemon` does.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Unix socket of the gRPC API.
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    /// The node cache every volume uses, if any.
    pub node_cache: Option<NodeCacheConfig>,
    /// Where to serve Prometheus metrics (off if `None`).
    pub metrics_addr: Option<SocketAddr>,
    /// The daemon's exit leaves volumes mounted (dead) for its successor to restore, instead
    /// of unmounting them.
    pub keep_on_exit: bool,
    /// Who may use the API socket and the share sockets: root, and this group if given.
    pub peers: Peers,
    /// Where share sockets may be created; empty: `<state-dir>/shares`.
    pub share_dirs: Vec<PathBuf>,
    /// Local directories volumes may serve; empty: none (s3:// sources only).
    pub local_sources: Vec<PathBuf>,
}

/// The daemon's node cache: one disk tier for every volume of the node.
#[derive(Clone, Debug)]
pub struct NodeCacheConfig {
    pub dir: PathBuf,
    /// Disk quota in bytes, for all volumes together.
    pub size: u64,
    /// The ranged GET size of every volume.
    pub block_size: u64,
}

/// `berth daemon`.
pub fn run(args: DaemonConfig) -> anyhow::Result<()> {
    private_dir(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    let state_dir = args.state_dir.canonicalize()?;
    let node_key = NodeKey::load_or_create(&state::node_key(&state_dir))
        .context("loading the node key that names volumes")?;
    let berth_bin = std::env::current_exe().context("finding the berth binary")?;
    let cache = match &args.node_cache {
        Some(config) => Some(open_node_cache(config, &state_dir)?),
        None => None,
    };
    let mut share_dirs = args.share_dirs.clone();
    if share_dirs.is_empty() {
        share_dirs.push(state_dir.join("shares"));
    }
    let share_dirs = share_dirs
        .iter()
        .map(|d| {
            private_dir(d).with_context(|| format!("creating the share dir {}", d.display()))?;
            d.canonicalize()
                .with_context(|| format!("share dir {}", d.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let local_sources = args
        .local_sources
        .iter()
        .map(|d| {
            d.canonicalize()
                .with_context(|| format!("--allow-local-source {}", d.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let node = spec::NodeSettings {
        node_key,
        share_dirs,
        local_sources,
        share_peers: args.peers,
        berth_bin,
        state_dir,
        cache,
        keep_on_exit: args.keep_on_exit,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(args, node))
}

/// Opens the node cache; it is served once the runtime runs (see [`serve`]).
fn open_node_cache(
    config: &NodeCacheConfig,
    state_dir: &Path,
) -> anyhow::Result<spec::SharedCache> {
    let server = CacheServer::open(&config.dir, config.size, config.block_size)
        .with_context(|| format!("opening the node cache in {}", config.dir.display()))?;
    Ok(spec::SharedCache {
        socket: state::node_cache_socket(state_dir),
        server,
    })
}

/// Serves the node cache's index to mount processes on its socket.
fn serve_node_cache(cache: &spec::SharedCache) -> anyhow::Result<()> {
    let socket = &cache.socket;
    // Whoever can connect can fill or empty the node cache: root only (mount processes).
    let listener = sockets::listen(socket, Peers::ROOT)
        .with_context(|| format!("listening on {}", socket.display()))?;
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    tokio::spawn(cache.server.clone().serve(listener));
    tracing::info!(socket = %socket.display(), "node cache served");
    Ok(())
}

async fn serve(args: DaemonConfig, node: spec::NodeSettings) -> anyhow::Result<()> {
    if let Some(dir) = args.socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // The API mounts anything anywhere: root, and the configured group, only.
    let listener = sockets::listen(&args.socket, args.peers)
        .with_context(|| format!("listening on {}", args.socket.display()))?;
    listener.set_nonblocking(true)?;
    let listener = UnixListener::from_std(listener)?;
    if let Some(cache) = &node.cache {
        serve_node_cache(cache)?;
    }
    let cache_socket = node.cache.as_ref().map(|c| c.socket.clone());
    let registry = registry::Registry::new(node);
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
    let peers = args.peers;
    println!("berth: daemon listening on {}", args.socket.display());
    tracing::info!(socket = %args.socket.display(), "daemon ready");
    tonic::transport::Server::builder()
        .add_service(pb::daemon_server::DaemonServer::new(service.clone()))
        .serve_with_incoming_shutdown(
            tokio_stream::StreamExt::filter(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                move |conn| {
                    conn.as_ref()
                        .map_or(true, |s| peers.allow(s.as_raw_fd(), "daemon API"))
                },
            ),
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
