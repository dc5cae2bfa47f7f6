//! Self-healing: a long-lived holder keeps every FUSE connection while replaceable engines
//! serve it (see docs/self-healing.md).
//!
//! - [`holder`]: `berth mount`'s process; mounts, holds the fds, replaces engines;
//! - [`handoff`]: the holder-engine socket (messages + SCM_RIGHTS);
//! - [`shared`]: per-connection memory shared with engines (progress, reply journal);
//! - [`detect`] and [`ebpf`]: how a dead or hung engine or a lost connection is noticed;
//! - [`remount`]: the last resort when a connection itself is gone;
//! - [`shares`]: vhost-user sockets of virtio-fs shares, kept like the FUSE fds;
//! - [`upgrade`]: `berth upgrade`.

pub mod detect;
pub mod ebpf;
pub mod handoff;
pub mod holder;
pub mod remount;
pub mod shared;
pub mod shares;
pub mod signals;
pub mod upgrade;

use std::time::Duration;

use clap::Args;
use serde::{Deserialize, Serialize};

use crate::units::parse_duration;

/// Flags of `berth mount` about self-healing.
#[derive(Args, Debug, Clone)]
pub struct HealArgs {
    /// Do not load the eBPF probes: detect a dead or hung engine with its socket, the held
    /// /dev/fuse fds and fusectl only (also used when eBPF cannot load).
    #[arg(long)]
    pub no_ebpf: bool,

    /// An engine that has requests waiting and finishes none for this long is hung: it is
    /// killed and replaced. [default: --request-deadline + 10s]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub hang_timeout: Option<Duration>,
}

/// What the holder knows and the engine reports in `berth status` (and logs).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct HolderFacts {
    pub holder_pid: u32,
    /// Increases with every engine the holder starts (takeover, upgrade, remount).
    #[serde(rename = "engine_generation")]
    pub generation: u64,
    /// "ebpf" or "fallback".
    pub detector: String,
    /// Engines replaced after a crash or hang, and remounts.
    pub recoveries: u64,
    /// From detection to the successor serving, for the last recovery.
    pub last_recovery_ms: Option<u64>,
    /// "takeover" (engine replaced, nothing lost) or "remount" (connection lost).
    pub last_recovery_kind: Option<String>,
    /// What noticed the last death or hang: "ebpf", "socket" (the engine's socket closed),
    /// "fusectl" (requests waiting, no progress).
    pub last_detected_by: Option<String>,
    /// CLOCK_MONOTONIC when the last engine death or hang was noticed.
    pub last_detection_mono_ns: Option<u64>,
    /// A remount happened: files open at the time were lost.
    pub lost_open_files: bool,
    pub upgrades: u64,
    pub last_upgrade_ms: Option<u64>,
}
