//! The eBPF detection layer, adapted to the holder's events. Until the `berth-ebpf` crate is
//! wired in, loading reports that the probes are not part of this build, and the holder uses
//! the fallback layer.

use std::sync::mpsc::Sender;
use std::time::Duration;

use super::holder::Event;

pub struct EbpfDetector {
    _events: Sender<Event>,
}

impl EbpfDetector {
    pub fn start(_hang_timeout: Duration, _events: Sender<Event>) -> anyhow::Result<EbpfDetector> {
        anyhow::bail!("this berth was built without the eBPF probes")
    }

    pub fn mode(&self) -> &'static str {
        "none"
    }

    pub fn watch_process(&self, _pid: u32) {}
    pub fn unwatch_process(&self, _pid: u32) {}
    pub fn watch_connection(&self, _conn: u32) {}
    pub fn unwatch_connection(&self, _conn: u32) {}
}
