//! The virtio-fs door: FUSE requests arrive in virtqueues from a guest's virtio-fs driver
//! (crate `berth-vhost`) instead of /dev/fuse.
//!
//! Two ways to run it:
//! - inside a mount's engine ([`EngineShare`]): the node daemon asks a volume's holder for a
//!   share, and the engine that serves the FUSE mount serves the VMM too, with the same
//!   [`BerthFs`](crate::fs::BerthFs), inode numbers and block cache;
//! - `berth share SOURCE --socket PATH`: a process of its own, for a VMM without a node
//!   daemon (and for the VM test).

use std::io::Write as _;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::{bail, Context as _};
use berth_vhost::{Share, ShareConfig};
use clap::Parser as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::{Cli, Command, MountArgs, ShareArgs};
use crate::fs::BerthFs;
use crate::heal::handoff::ShareHandoff;
use crate::heal::holder::ControlRequest;
use crate::heal::HolderFacts;
use crate::memory::MemoryLimiter;
use crate::mount::{self, Volume, VolumeSpec};
use crate::prefetch::NodeCache;
use crate::status;

/// A share served by an engine on a socket its holder bound and keeps.
pub struct EngineShare {
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    /// A copy of the listener, to wake the serving thread's accept when stopping.
    waker: UnixListener,
}

impl EngineShare {
    /// Serves `fs` to VMMs connecting on `listener`, on a thread of its own.
    pub fn start(
        fs: Arc<BerthFs>,
        spec: &ShareHandoff,
        listener: UnixListener,
    ) -> anyhow::Result<EngineShare> {
        let waker = listener.try_clone().context("copying the share listener")?;
        let stop = Arc::new(AtomicBool::new(false));
        let share = Share::new(
            fs,
            ShareConfig {
                socket: spec.socket.clone(),
                request_queues: spec.request_queues,
                queue_size: spec.queue_size,
            },
        );
        let flag = stop.clone();
        let socket = spec.socket.clone();
        std::thread::Builder::new()
            .name("vhost-listener".into())
            .spawn(move || {
                share.serve_listener(listener, &flag, |connection| {
                    tracing::info!(connection, socket = %socket.display(), "VMM left; listening for the next one")
                })
            })
            .context("starting the vhost-user listener")?;
        tracing::info!(socket = %spec.socket.display(), request_queues = spec.request_queues, "serving a virtio-fs share");
        Ok(EngineShare {
            socket: spec.socket.clone(),
            stop,
            waker,
        })
    }

    /// Stops accepting VMMs; one still attached is served until it leaves.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        if let Err(e) = berth_vhost::wake_listener(&self.waker) {
            tracing::warn!(socket = %self.socket.display(), error = %e, "could not wake the share's listener");
        }
    }
}

/// How long to wait for the socket to be bound before giving up.
const LISTEN_DEADLINE: Duration = Duration::from_secs(10);

pub fn run(args: ShareArgs) -> anyhow::Result<()> {
    if let Some(mountpoint) = &args.mount {
        return attach(&args, mountpoint);
    }
    if args.remove {
        bail!("--remove stops a share of a mount: it needs --mount MOUNTPOINT");
    }
    let text = args.source.clone().context("SOURCE is required")?;
    let engine_args = engine_args(&args, &text)?;
    // The same checks as `berth mount` (source syntax, sizes).
    let source = mount::targets(&engine_args)?
        .into_iter()
        .next()
        .map(|(_, source, _)| source)
        .context("no source")?;
    if args.request_queues == 0 || args.request_queues > 63 {
        bail!("--request-queues must be between 1 and 63");
    }
    if !args.queue_size.is_power_of_two() {
        bail!("--queue-size must be a power of two");
    }
    let socket = socket_path(&args.socket)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("berth-io")
        .build()
        .context("starting the I/O runtime")?;
    let memory = MemoryLimiter::new(args.engine.memory_limit);
    let cache = mount::open_cache(&args.cache, &args.store, &source, false)?;
    let volume = mount::build_volume(
        &rt,
        &engine_args,
        &VolumeSpec {
            text: &text,
            source: &source,
            mountpoint: &socket,
            check_store: true,
            recover: false,
            generation: 0,
        },
        &memory,
        cache.clone(),
    )?;
    let share = Share::new(
        volume.fs.clone(),
        ShareConfig {
            socket: socket.clone(),
            request_queues: args.request_queues,
            queue_size: args.queue_size,
        },
    );

    // The share serves VMMs one after another on its own thread until the process ends.
    let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
    let failed = ready_tx.clone();
    std::thread::Builder::new()
        .name("vhost-listener".into())
        .spawn(move || {
            let result = share.serve(
                || {
                    let _ = ready_tx.send(Ok(()));
                },
                |connection| tracing::info!(connection, "listening again for the next VMM"),
            );
            if let Err(e) = result {
                let _ = failed.send(Err(anyhow::anyhow!("{e}")));
            }
        })
        .context("starting the vhost-user listener")?;
    match ready_rx.recv_timeout(LISTEN_DEADLINE) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("the vhost-user socket was not ready within {LISTEN_DEADLINE:?}"),
    }
    let status_file = status::status_path(&args.state_dir, &socket);
    let reporter = publish_status(&rt, &status_file, &args, &socket, &volume, &memory, cache);
    println!("berth: sharing {text} on {}", socket.display());
    let _ = std::io::stdout().flush();
    tracing::info!(
        source = %text,
        socket = %socket.display(),
        request_queues = args.request_queues,
        read_only = args.read_only,
        "serving over vhost-user"
    );

    let outcome = rt.block_on(wait_for_end(ready_rx));
    // Commit what is still open (a VMM may still be attached: its later requests fail).
    reporter.abort();
    volume.fs.shutdown();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&volume.journal);
    let _ = std::fs::remove_file(&status_file);
    tracing::info!(
        inodes = volume.ns.inode_count(),
        skipped_keys = volume.ns.skipped_keys(),
        peak_memory = memory.peak(),
        "share stopped"
    );
    outcome
}

/// `berth share --mount MOUNTPOINT --socket PATH [--remove]`: asks the holder of a running
/// mount to serve (or stop serving) its volume on a vhost-user socket.
fn attach(args: &ShareArgs, mountpoint: &Path) -> anyhow::Result<()> {
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("{} does not exist", mountpoint.display()))?;
    let socket = socket_path(&args.socket)?;
    let request = if args.remove {
        ControlRequest::RemoveShare {
            socket: socket.clone(),
        }
    } else {
        ControlRequest::AddShare {
            socket: socket.clone(),
            request_queues: args.request_queues,
            queue_size: args.queue_size,
        }
    };
    let reply = crate::heal::upgrade::ask(&args.state_dir, &mountpoint, &request)?;
    if !reply.ok {
        bail!("{}: {}", mountpoint.display(), reply.message);
    }
    println!("berth: {} ({})", reply.message, mountpoint.display());
    Ok(())
}

/// The engine flags of a share in the form the engine builder takes: `berth mount`'s
/// defaults (parsed, so that flags added there keep their defaults) with the share's values.
fn engine_args(args: &ShareArgs, source: &str) -> anyhow::Result<MountArgs> {
    let socket = args.socket.to_string_lossy();
    let cli = Cli::try_parse_from(["berth", "mount", source, &socket])
        .context("building the engine settings")?;
    let Command::Mount(mut mount) = cli.command else {
        bail!("building the engine settings: not a mount command line");
    };
    mount.store = args.store.clone();
    mount.cache = args.cache.clone();
    mount.read_only = args.read_only;
    mount.engine = args.engine.clone();
    mount.state_dir = args.state_dir.clone();
    Ok(mount)
}

/// Writes the share's status file now and every few seconds (`berth status SOCKET`).
fn publish_status(
    rt: &tokio::runtime::Runtime,
    path: &Path,
    args: &ShareArgs,
    socket: &Path,
    volume: &Volume,
    memory: &Arc<MemoryLimiter>,
    cache: Option<NodeCache>,
) -> tokio::task::JoinHandle<()> {
    let (source, socket) = (
        args.source.clone().unwrap_or_default(),
        socket.display().to_string(),
    );
    let (ns, memory, read_only) = (volume.ns.clone(), memory.clone(), args.read_only);
    let started = status::now_unix();
    let report = move || status::MountStatus {
        pid: std::process::id(),
        engine_pid: std::process::id(),
        heal: HolderFacts {
            holder_pid: std::process::id(),
            ..HolderFacts::default()
        },
        source: source.clone(),
        mountpoint: socket.clone(),
        started_unix: started,
        updated_unix: status::now_unix(),
        read_only,
        inodes: ns.inode_count() as u64,
        skipped_keys: ns.skipped_keys(),
        memory_used: memory.used(),
        memory_peak: memory.peak(),
        memory_limit: memory.limit(),
        cache: cache.as_ref().map(|c| c.cache.stats()),
    };
    if let Err(e) = status::write(path, &report()) {
        tracing::warn!(path = %path.display(), error = %e, "could not write the status file");
    }
    let path = path.to_path_buf();
    rt.spawn(async move {
        loop {
            tokio::time::sleep(status::REFRESH).await;
            if let Err(e) = status::write(&path, &report()) {
                tracing::debug!(error = %e, "could not write the status file");
            }
        }
    })
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

/// A guest sending FUSE requests with hostile names to a share of a local directory store:
/// every reply is well formed, nothing panics, and nothing appears outside the store.
#[cfg(test)]
mod hostile_guest {
    use super::*;
    use berth_vhost::testing::{check_reply, fuse_request, TestQueue};
    use fuse_backend_rs::api::server::Server;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    const LOOKUP: u32 = 1;
    const SYMLINK: u32 = 6;
    const MKNOD: u32 = 8;
    const MKDIR: u32 = 9;
    const UNLINK: u32 = 10;
    const RMDIR: u32 = 11;
    const RENAME: u32 = 12;
    const LINK: u32 = 13;
    const CREATE: u32 = 35;
    const INIT: u32 = 26;

    /// Fixed-size argument struct before the name(s), per opcode (FUSE 7.31).
    fn args_len(opcode: u32) -> usize {
        match opcode {
            MKNOD | CREATE => 16,
            MKDIR | RENAME | LINK => 8,
            _ => 0,
        }
    }

    fn name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"..".to_vec()),
            Just(b".".to_vec()),
            Just(b"".to_vec()),
            Just(b"../outside/escaped".to_vec()),
            Just(b"../../outside".to_vec()),
            Just(b"a/b".to_vec()),
            Just(b"/etc/passwd".to_vec()),
            Just(b"ok-name".to_vec()),
            Just(b"dir".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..40),
        ]
    }

    #[test]
    fn hostile_names_stay_inside_the_share() {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let outside = dir.path().join("outside");
        std::fs::create_dir_all(store.join("dir")).unwrap();
        std::fs::write(store.join("dir/file"), b"data").unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        let state = dir.path().join("state");
        let cli = crate::cli::Cli::try_parse_from([
            "berth",
            "mount",
            &store.to_string_lossy(),
            "/unused",
            "--state-dir",
            &state.to_string_lossy(),
        ])
        .unwrap();
        let crate::cli::Command::Mount(args) = cli.command else {
            panic!("parsed as another command");
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let memory = MemoryLimiter::new(args.engine.memory_limit);
        let source = mount::Source::Local(store.clone());
        let engine = mount::build_volume(
            &rt,
            &args,
            &VolumeSpec {
                text: &args.source,
                source: &source,
                mountpoint: &dir.path().join("fs.sock"),
                check_store: true,
                recover: false,
                generation: 0,
            },
            &memory,
            None,
        )
        .unwrap();
        let server = Server::new(engine.fs.clone());
        let mut queue = TestQueue::new();
        let mut init = Vec::new();
        for v in [7u32, 31, 1 << 20, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        init.extend_from_slice(&[0u8; 48]);
        let (len, reply) = queue.request(&server, &fuse_request(INIT, 1, 0, &init), 4096);
        assert_eq!(
            check_reply(len, 4096, &reply, Some(1))
                .unwrap()
                .unwrap()
                .error,
            0
        );
        // The runner takes a `Fn`; the queue is mutated through a RefCell.
        let queue = std::cell::RefCell::new(queue);

        let ops = prop_oneof![
            Just(LOOKUP),
            Just(SYMLINK),
            Just(MKNOD),
            Just(MKDIR),
            Just(UNLINK),
            Just(RMDIR),
            Just(RENAME),
            Just(LINK),
            Just(CREATE),
        ];
        let case = (
            ops,
            prop_oneof![Just(1u64), Just(2u64), 0u64..5, any::<u64>()],
            name(),
            name(),
            any::<u64>(),
        );
        let mut runner = TestRunner::new(Config {
            cases: 400,
            failure_persistence: None,
            ..Config::default()
        });
        runner
            .run(&case, |(opcode, nodeid, first, second, unique)| {
                let mut body = vec![0u8; args_len(opcode)];
                if opcode == RENAME {
                    body.copy_from_slice(&1u64.to_le_bytes()); // newdir: the root
                }
                body.extend_from_slice(&first);
                body.push(0);
                if opcode == RENAME || opcode == SYMLINK {
                    body.extend_from_slice(&second);
                    body.push(0);
                }
                let request = fuse_request(opcode, unique, nodeid, &body);
                let (len, reply) = queue.borrow_mut().request(&server, &request, 4096);
                let header =
                    check_reply(len, 4096, &reply, Some(unique)).map_err(TestCaseError::fail)?;
                // The server reads the name up to its first NUL.
                let seen = first.split(|b| *b == 0).next().unwrap_or_default();
                let bad = seen.is_empty()
                    || seen == b"."
                    || seen == b".."
                    || seen.contains(&b'/')
                    || std::str::from_utf8(seen).is_err();
                if bad {
                    let error = header.map_or(0, |h| h.error);
                    prop_assert!(error < 0, "{opcode} of {first:?} answered {error}");
                }
                let escaped: Vec<_> = std::fs::read_dir(&outside).unwrap().flatten().collect();
                prop_assert!(escaped.is_empty(), "files outside the share: {escaped:?}");
                Ok(())
            })
            .unwrap();
        engine.fs.shutdown();
        drop(queue);
    }
}
