//! Self-healing: a long-lived holder keeps every FUSE connection while replaceable engines
//! serve it (see docs/self-healing.md).
//!
//! - [`holder`]: `berth mount`'s process; mounts, holds the fds, replaces engines;
//! - [`handoff`]: the holder-engine socket (messages + SCM_RIGHTS);
//! - [`events`]: what the holder's loop reacts to;
//! - [`control`]: a holder's control socket (`berth upgrade`, shares of a running mount);
//! - [`detect`] and [`ebpf`]: how a dead or hung engine or a lost connection is noticed;
//! - [`remount`]: the last resort when a connection itself is gone;
//! - [`vmm`]: virtio-fs shares: the VMM connections the holder keeps, a front each;
//! - [`signals`]: SIGINT/SIGTERM as events;
//! - [`upgrade`]: `berth upgrade`.

pub mod control;
pub mod detect;
pub mod ebpf;
pub mod events;
pub mod handoff;
pub mod holder;
pub mod remount;
pub mod signals;
pub mod upgrade;
pub mod vmm;
