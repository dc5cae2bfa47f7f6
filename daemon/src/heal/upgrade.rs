//! `berth upgrade MOUNTPOINT [--binary PATH]`: asks the mount's holder to replace its engine.

use std::path::Path;

use anyhow::{bail, Context as _};

use super::control::{ask, ControlRequest};

pub fn run(mountpoint: &Path, binary: Option<&Path>, state_dir: &Path) -> anyhow::Result<()> {
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("{} does not exist", mountpoint.display()))?;
    let binary = match binary {
        Some(b) => Some(
            b.canonicalize()
                .with_context(|| format!("new engine binary {}", b.display()))?,
        ),
        None => None,
    };
    let reply = ask(state_dir, &mountpoint, &ControlRequest::Upgrade { binary })?;
    if !reply.ok {
        bail!(
            "upgrade of {} failed: {}",
            mountpoint.display(),
            reply.message
        );
    }
    println!(
        "berth: upgraded {}: engine generation {} serving; applications stalled {} ms",
        mountpoint.display(),
        reply.generation,
        reply.stall_ms
    );
    Ok(())
}
