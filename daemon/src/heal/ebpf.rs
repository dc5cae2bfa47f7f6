//! The eBPF detection layer (the `berth-ebpf` crate), adapted to the holder's events.
//!
//! The probes live on a thread of their own: it owns the loaded programs, applies watch and
//! unwatch commands from the holder, and turns kernel events into [`DetectorEvent`]s on the
//! holder's channel. Connection events are matched on the epoch the registration returned,
//! because the kernel reuses a connection id as soon as a connection is gone.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::Duration;

use anyhow::Context as _;
use berth_ebpf::{Event as KernelEvent, FuseWatch};

use super::events::{DetectorEvent, Event};

/// How often the probe thread looks for holder commands when the kernel is quiet.
const POLL: Duration = Duration::from_millis(50);

enum Command {
    WatchProcess(u32),
    UnwatchProcess(u32),
    WatchConnection(u32),
    UnwatchConnection(u32),
}

pub struct EbpfDetector {
    commands: Sender<Command>,
    mode: &'static str,
}

impl EbpfDetector {
    /// Loads the probes (fentry, else BTF tracepoints) and starts their thread.
    pub fn start(hang_timeout: Duration, events: Sender<Event>) -> anyhow::Result<EbpfDetector> {
        let watch = FuseWatch::load(hang_timeout).context("loading the eBPF probes")?;
        let mode = match watch.attach_mode() {
            berth_ebpf::AttachMode::Fentry => "fentry",
            berth_ebpf::AttachMode::BtfTracepoint => "btf-tracepoints",
        };
        if let Some(why) = watch.fentry_refusal() {
            tracing::debug!(why, "fentry refused; BTF tracepoints attached instead");
        }
        let (commands, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("holder-ebpf".into())
            .spawn(move || run(watch, rx, events))?;
        Ok(EbpfDetector { commands, mode })
    }

    pub fn mode(&self) -> &'static str {
        self.mode
    }

    pub fn watch_process(&self, pid: u32) {
        let _ = self.commands.send(Command::WatchProcess(pid));
    }

    pub fn unwatch_process(&self, pid: u32) {
        let _ = self.commands.send(Command::UnwatchProcess(pid));
    }

    pub fn watch_connection(&self, conn: u32) {
        let _ = self.commands.send(Command::WatchConnection(conn));
    }

    pub fn unwatch_connection(&self, conn: u32) {
        let _ = self.commands.send(Command::UnwatchConnection(conn));
    }
}

fn run(mut watch: FuseWatch, commands: Receiver<Command>, events: Sender<Event>) {
    let mut epochs: HashMap<u32, u64> = HashMap::new();
    loop {
        loop {
            match commands.try_recv() {
                Ok(command) => apply(&mut watch, &mut epochs, command),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        let batch = match watch.next_events(POLL) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reading eBPF events failed; the fallback detector goes on alone");
                return;
            }
        };
        for event in batch {
            let Some(event) = translate(&epochs, event) else {
                continue;
            };
            if events.send(Event::Detector(event)).is_err() {
                return;
            }
        }
    }
}

fn apply(watch: &mut FuseWatch, epochs: &mut HashMap<u32, u64>, command: Command) {
    let result = match command {
        Command::WatchProcess(pid) => watch.watch_process(pid),
        Command::UnwatchProcess(pid) => watch.unwatch_process(pid),
        Command::WatchConnection(conn) => watch.watch_connection(conn).map(|epoch| {
            epochs.insert(conn, epoch);
        }),
        Command::UnwatchConnection(conn) => {
            epochs.remove(&conn);
            watch.unwatch_connection(conn)
        }
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "eBPF watch update failed");
    }
}

/// Kernel events of connections registered under another epoch are stale; dropped.
fn translate(epochs: &HashMap<u32, u64>, event: KernelEvent) -> Option<DetectorEvent> {
    let current = |conn: u32, epoch: u64| epochs.get(&conn) == Some(&epoch);
    match event {
        KernelEvent::EngineExited { tgid, .. } => Some(DetectorEvent::EngineExited { pid: tgid }),
        KernelEvent::RequestStalled {
            conn, epoch, age, ..
        } if current(conn, epoch) => Some(DetectorEvent::Stalled { conn, waited: age }),
        KernelEvent::ConnectionAborted { conn, epoch, .. } if current(conn, epoch) => {
            Some(DetectorEvent::Aborted { conn })
        }
        _ => None,
    }
}
