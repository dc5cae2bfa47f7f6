//! What the holder's loop reacts to: everything arrives on one channel as an [`Event`]
//! (engine messages and deaths, signals, control requests, detector reports), so the loop is a
//! plain loop over that channel.

use std::sync::mpsc::Sender;
use std::time::Duration;

use super::control::{ControlReply, ControlRequest};
use super::handoff::ToHolder;

/// What a detector reports to the holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DetectorEvent {
    EngineExited { pid: u32 },
    Stalled { conn: u32, waited: Duration },
    Aborted { conn: u32 },
}

/// What the holder's loop reacts to.
pub enum Event {
    Signal(i32),
    Engine {
        generation: u64,
        message: ToHolder,
    },
    /// The engine's end of the socket closed: it exited or died.
    EngineGone {
        generation: u64,
    },
    Detector(DetectorEvent),
    /// A VMM connected to share `socket` of mount `mount` (its front is in the share's
    /// connections): the engine is to be attached to it.
    VmmConnected {
        mount: usize,
        socket: std::path::PathBuf,
        connection: u64,
    },
    /// A request on the control socket of mount `mount`.
    Control {
        mount: usize,
        request: ControlRequest,
        reply: Sender<ControlReply>,
    },
}
