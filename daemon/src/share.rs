//! `berth share`: the virtio-fs door as a command.
//!
//! Two ways to run it:
//! - `berth share SOURCE --socket PATH`: a process of its own, for a VMM without a node
//!   daemon (and for the VM test), serving one volume to one VMM at a time;
//! - `berth share --mount MOUNTPOINT --socket PATH [--remove]`: asks the holder of a running
//!   `berth mount` to have its engine serve (or stop serving) the VMM, with the same inode
//!   table and block cache as the mount (see [`crate::virtiofs::EngineShare`]).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{mpsc, Arc, Mutex};

use anyhow::{bail, Context as _};
use berth_vhost::{Share, ShareConfig as VhostConfig};
use tokio::signal::unix::{signal, SignalKind};

use crate::heal::control::{self, ControlRequest};
use crate::heal::handoff::ShareSocket;
use crate::memory::MemoryLimiter;
use crate::sandbox::{self, SandboxPolicy};
use crate::state::MountDir;
use crate::status::{HolderFacts, Publisher, Reported};
use crate::sys::files::private_dir;
use crate::sys::sockets::{self, Peers};
use crate::virtiofs::door_tag;
use crate::volume::{self, Opening, Target, VolumeConfig};

/// What `berth share` does.
#[derive(Clone, Debug)]
pub enum ShareConfig {
    /// Serve `target` (its mountpoint is the socket path as given) on `socket`, standalone.
    Serve {
        target: Target,
        socket: ShareSocket,
        volume: Box<VolumeConfig>,
        /// Who may connect to the socket.
        peers: Peers,
        sandbox: SandboxPolicy,
    },
    /// Ask the holder of the mount at `mountpoint` to serve its volume on `socket`.
    Attach {
        mountpoint: PathBuf,
        socket: ShareSocket,
        state_dir: PathBuf,
    },
    /// Ask the holder of the mount at `mountpoint` to stop serving `socket`.
    Remove {
        mountpoint: PathBuf,
        socket: PathBuf,
        state_dir: PathBuf,
    },
}

pub fn run(config: ShareConfig) -> anyhow::Result<()> {
    match config {
        ShareConfig::Serve {
            target,
            socket,
            volume,
            peers,
            sandbox,
        } => serve(target, socket, &volume, peers, sandbox),
        ShareConfig::Attach {
            mountpoint,
            socket,
            state_dir,
        } => {
            let socket_path = socket_path(&socket.socket)?;
            let request = ControlRequest::AddShare {
                socket: socket_path,
                request_queues: socket.request_queues,
                queue_size: socket.queue_size,
                group: socket.group,
            };
            ask_holder(&state_dir, &mountpoint, &request)
        }
        ShareConfig::Remove {
            mountpoint,
            socket,
            state_dir,
        } => {
            let request = ControlRequest::RemoveShare {
                socket: socket_path(&socket)?,
            };
            ask_holder(&state_dir, &mountpoint, &request)
        }
    }
}

fn serve(
    target: Target,
    socket: ShareSocket,
    config: &VolumeConfig,
    peers: Peers,
    policy: SandboxPolicy,
) -> anyhow::Result<()> {
    // Still one thread: every thread started from here on inherits the dropped capabilities.
    sandbox::drop_privileges(&policy, sandbox::SHARE_CAPS).context("sandbox")?;
    let socket_file = socket_path(&socket.socket)?;
    let target = Target {
        mountpoint: socket_file.clone(),
        ..target
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth-io")
        .build()
        .context("starting the I/O runtime")?;
    let memory = MemoryLimiter::new(config.memory_limit);
    let cache = volume::open_cache(&config.cache, &config.store, &target.source)?;
    private_dir(&config.state_dir)
        .with_context(|| format!("creating {}", config.state_dir.display()))?;
    let state = MountDir::claim(&config.state_dir, &socket_file)
        .context("claiming the share's state directory")?;
    let volume = volume::build_volume(
        &rt,
        config,
        &target,
        &state.path,
        Opening::FRESH,
        &memory,
        cache.clone(),
    )?;
    let fs = volume.fs.clone();
    let share = Share::new(
        VhostConfig {
            socket: socket_file.clone(),
            request_queues: socket.request_queues,
            queue_size: socket.queue_size,
        },
        move |connection| fs.door(door_tag(connection)),
    );

    // Born open to root and the configured group only; a live socket is never taken over.
    let listener = sockets::listen(&socket_file, peers)
        .with_context(|| format!("listening on {}", socket_file.display()))?;
    // Set up: from here on the share reads guest input, in its sandbox.
    let io_uring = cache.as_ref().is_some_and(|c| {
        c.cache.stats().engine == format!("{:?}", crate::cache::EngineKind::IoUring)
    });
    sandbox::enter(&policy, sandbox::Uses { io_uring }).context("entering the sandbox")?;
    // The share serves VMMs one after another on its own thread until the process ends.
    let (ended_tx, ended_rx) = mpsc::channel::<anyhow::Result<()>>();
    std::thread::Builder::new()
        .name("vhost-listener".into())
        .spawn(move || {
            share.serve_listener(listener, &AtomicBool::new(false), |connection| {
                tracing::info!(connection, "listening again for the next VMM")
            });
            let _ = ended_tx.send(Err(anyhow::anyhow!("the vhost-user listener ended")));
        })
        .context("starting the vhost-user listener")?;
    // A standalone share is its own holder.
    let facts = HolderFacts {
        holder_pid: std::process::id(),
        ..HolderFacts::default()
    };
    let status = Publisher::new(
        &state.path,
        Reported {
            source: target.text.clone(),
            mountpoint: socket_file.clone(),
            read_only: config.fs.read_only,
            ns: volume.ns.clone(),
            memory: memory.clone(),
            cache,
            facts: Arc::new(Mutex::new(facts)),
        },
    );
    let refresh = status.spawn_refresh(rt.handle());
    println!(
        "berth: sharing {} on {}",
        target.text,
        socket_file.display()
    );
    let _ = std::io::stdout().flush();
    tracing::info!(
        source = %target.text,
        socket = %socket_file.display(),
        request_queues = socket.request_queues,
        read_only = config.fs.read_only,
        "serving over vhost-user"
    );

    let outcome = rt.block_on(wait_for_end(ended_rx));
    // Commit what is still open (a VMM may still be attached: its later requests fail).
    refresh.abort();
    volume.fs.shutdown();
    let _ = std::fs::remove_file(&socket_file);
    status.remove();
    state.remove();
    tracing::info!(
        inodes = volume.ns.inode_count(),
        skipped_keys = volume.ns.skipped_keys(),
        peak_memory = memory.peak(),
        "share stopped"
    );
    outcome
}

/// Sends a share request to the holder of a running mount and prints its answer.
fn ask_holder(state_dir: &Path, mountpoint: &Path, request: &ControlRequest) -> anyhow::Result<()> {
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("{} does not exist", mountpoint.display()))?;
    let reply = control::ask(state_dir, &mountpoint, request)?;
    if !reply.ok {
        bail!("{}: {}", mountpoint.display(), reply.message);
    }
    println!("berth: {} ({})", reply.message, mountpoint.display());
    Ok(())
}

/// The socket's absolute path (its directory is created if missing), so that state files
/// and `berth status SOCKET` agree on one name.
fn socket_path(socket: &Path) -> anyhow::Result<PathBuf> {
    let name = socket
        .file_name()
        .with_context(|| format!("--socket {} names no file", socket.display()))?;
    let dir = match socket.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating the socket directory {}", dir.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("socket directory {}", dir.display()))?;
    let path = dir.join(name);
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; refusing to replace it",
                path.display()
            );
        }
    }
    Ok(path)
}

/// Waits for SIGINT/SIGTERM, or for the listener to fail.
async fn wait_for_end(listener: mpsc::Receiver<anyhow::Result<()>>) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::channel(1);
    std::thread::spawn(move || {
        if let Ok(Err(e)) = listener.recv() {
            let _ = fail_tx.blocking_send(e);
        }
    });
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM; stopping the share"),
        _ = int.recv() => tracing::info!("SIGINT; stopping the share"),
        Some(e) = fail_rx.recv() => return Err(e).context("serving the vhost-user socket"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_are_absolute_and_never_replace_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sub/fs.sock");
        let path = socket_path(&sock).unwrap();
        assert!(path.is_absolute());
        assert!(path.ends_with("sub/fs.sock"));
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(socket_path(&file).is_err());
    }
}
