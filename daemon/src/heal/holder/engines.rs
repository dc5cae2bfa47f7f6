//! The holder's engine children: start one with every held connection in its hello, wait
//! until it serves, notice it is gone, stop or kill it, and reap it. An engine is a
//! `berth engine` process of the holder's binary (or of an upgrade's new one).

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::{Engine, Holder, FIRST_START_TIMEOUT};
use crate::heal::events::Event;
use crate::heal::handoff::{self, Hello, MountHandoff, ToEngine, ToHolder};
use crate::heal::signals;

impl Holder {
    pub(super) fn start_first_engine(&mut self) -> anyhow::Result<()> {
        let generation = self.spawn_engine(false)?;
        match self.wait_ready(generation, FIRST_START_TIMEOUT) {
            Ok(()) => Ok(()),
            Err(e) => Err(e.context("the engine did not start")),
        }
    }

    /// Starts engine generation N+1 and hands it every held connection.
    pub(super) fn spawn_engine(&mut self, resend: bool) -> anyhow::Result<u64> {
        self.generation += 1;
        let generation = self.generation;
        self.facts.generation = generation;
        let (ours, theirs) = UnixStream::pair().context("creating the handoff socket")?;
        let their_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&self.binary);
        if generation > 1 {
            // Fault injection (tests) crashes the first engine only.
            cmd.env_remove("BERTH_FAULT_CRASH_BEFORE_REPLY");
        }
        cmd.arg("engine")
            .arg("--handoff-fd")
            .arg(their_fd.to_string())
            .args(&self.config.engine_argv);
        // SAFETY: the closure only makes async-signal-safe calls (fcntl, sigprocmask, prctl).
        unsafe {
            cmd.pre_exec(move || {
                clear_cloexec(their_fd)?;
                signals::unblock_in_child()?;
                // An engine without its holder would serve a connection nobody can hand over.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting engine {}", self.binary.display()))?;
        drop(theirs);
        for m in &mut self.mounts {
            m.hang.engine_started(m.shared.progress());
        }
        let (hello, fds, mounts) = self.hello(generation, resend);
        handoff::send(&ours, &ToEngine::Hello(hello), &fds).context("handing fds to the engine")?;
        self.detector.watch_process(child.id());
        self.read_engine_messages(generation, &ours)?;
        tracing::info!(generation, pid = child.id(), resend, binary = %self.binary.display(), "engine started");
        self.engine = Some(Engine {
            generation,
            child,
            sock: ours,
            started: Instant::now(),
            mounts,
        });
        Ok(generation)
    }

    /// The hello of engine `generation`, its fds, and the holder's index of each mount in it.
    pub(super) fn hello(&self, generation: u64, resend: bool) -> (Hello, Vec<RawFd>, Vec<usize>) {
        let mut fds = Vec::new();
        let mut mounts = Vec::new();
        let mut indexes = Vec::new();
        for (i, m) in self.mounts.iter().enumerate().filter(|(_, m)| !m.gone) {
            fds.extend(m.queues.iter().map(|q| q.as_raw_fd()));
            fds.push(m.shared.file().as_raw_fd());
            indexes.push(i);
            mounts.push(MountHandoff {
                source: m.source.clone(),
                mountpoint: m.mountpoint.clone(),
                conn: m.conn,
                queues: m.queues.len(),
                init_capable: m.init_capable,
                // A fresh connection (first engine, or after a remount) has nothing to resend.
                resend: resend && m.init_capable.is_some(),
                shares: m.shares.iter().map(|s| s.spec.clone()).collect(),
                state_dir: m.state.as_ref().map(|d| d.path.clone()),
                takeover: m.fuse.is_none() && generation > 1,
            });
        }
        let hello = Hello {
            generation,
            facts: self.facts.clone(),
            mounts,
            vmm_front: true,
        };
        (hello, fds, indexes)
    }

    /// A thread per engine turns its messages (and its death: EOF) into events.
    pub(super) fn read_engine_messages(
        &self,
        generation: u64,
        sock: &UnixStream,
    ) -> anyhow::Result<()> {
        let sock = sock.try_clone()?;
        let events = self.sender.clone();
        std::thread::Builder::new()
            .name(format!("engine-{generation}"))
            .spawn(move || loop {
                match handoff::recv::<ToHolder>(&sock) {
                    Ok((message, _)) => {
                        if events
                            .send(Event::Engine {
                                generation,
                                message,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Err(_) => {
                        let _ = events.send(Event::EngineGone { generation });
                        return;
                    }
                }
            })?;
        Ok(())
    }

    /// Waits for engine `generation` to say it is serving; handles INIT reports meanwhile.
    pub(super) fn wait_ready(&mut self, generation: u64, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = match self.events.recv_timeout(left) {
                Ok(e) => e,
                Err(_) => {
                    self.kill_engine();
                    bail!("engine {generation} was not ready within {timeout:?}");
                }
            };
            match event {
                Event::Engine {
                    generation: g,
                    message,
                } if g == generation => match message {
                    ToHolder::Ready { .. } => {
                        // Its VMMs' queues too, before the holder goes on.
                        self.attach_vmms();
                        return Ok(());
                    }
                    ToHolder::Failed { error } => {
                        self.reap_engine();
                        bail!("{error}");
                    }
                    other => self.on_engine_message(other),
                },
                Event::EngineGone { generation: g } if g == generation => {
                    let status = self.reap_engine();
                    bail!("engine {generation} exited before it was ready ({status})");
                }
                Event::Engine { .. } | Event::EngineGone { .. } => {} // an older engine
                other => self.backlog.push_back(other),
            }
        }
    }

    /// Waits until engine `generation` is gone (killing it after `timeout`), and reaps it.
    pub(super) fn wait_gone(&mut self, generation: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::EngineGone { generation: g }) if g == generation => break,
                Ok(Event::Engine {
                    generation: g,
                    message,
                }) if g == generation => self.on_engine_message(message),
                Ok(Event::Engine { .. } | Event::EngineGone { .. }) => {}
                Ok(other) => self.backlog.push_back(other),
                Err(_) => {
                    tracing::error!(generation, "engine did not stop in time; killing it");
                    self.kill_engine_now();
                    break;
                }
            }
        }
        let _ = self.reap_engine();
    }

    pub(super) fn update_engine_facts(&self) {
        if let Some(engine) = &self.engine {
            let _ = handoff::send(&engine.sock, &ToEngine::Facts(self.facts.clone()), &[]);
        }
    }

    pub(super) fn kill_engine_now(&mut self) {
        if let Some(engine) = &mut self.engine {
            let _ = engine.child.kill();
        }
    }

    pub(super) fn kill_engine(&mut self) {
        self.kill_engine_now();
        let _ = self.reap_engine();
    }

    /// Waits for the current engine's exit and forgets it; returns how it ended.
    pub(super) fn reap_engine(&mut self) -> String {
        let Some(mut engine) = self.engine.take() else {
            return "no engine".into();
        };
        self.detector.unwatch_process(engine.child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match engine.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    let _ = engine.child.kill();
                    return engine
                        .child
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| s.to_string());
                }
            }
        }
    }
}

fn clear_cloexec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd of this (child) process.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
