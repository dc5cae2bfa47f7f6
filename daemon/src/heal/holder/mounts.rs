//! The holder's mounts: preparing a mountpoint (healing a dead berth mount left there),
//! mounting, cloning and holding the queues, the last-resort remount when a connection is
//! lost, and what a holder leaves in the state dir.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::{HeldMount, Holder};
use crate::fuse::connection_state::ConnectionState;
use crate::fuse::{FuseMount, MountOptions};
use crate::heal::detect::HangWatch;
use crate::heal::handoff::ShareSocket;
use crate::heal::remount::{self, BindTarget};
use crate::heal::vmm::HeldShare;
use crate::state::{self, MountDir};
use crate::sys::mounts;
use crate::volume::Target;
use crate::volume::{self, Source};

/// Creates and canonicalizes a mountpoint. A dead berth mount there (its holder was killed)
/// is detached with its binds, which are returned to re-bind after the new mount is up.
pub(super) fn prepare(path: &Path) -> anyhow::Result<(PathBuf, Vec<BindTarget>)> {
    if !path.exists() {
        // A dead mount fails exists(); only create what is really missing.
        if !remount::is_dead_berth_mount(path) {
            std::fs::create_dir_all(path)
                .with_context(|| format!("creating mountpoint {}", path.display()))?;
        }
    }
    let path = canonical_parent_join(path)?;
    if remount::is_dead_berth_mount(&path) {
        tracing::warn!(mountpoint = %path.display(), "found a dead berth mount (its holder is gone); replacing it");
        let targets = remount::detach_with_binds(&path)
            .with_context(|| format!("detaching the dead mount at {}", path.display()))?;
        return Ok((path, targets));
    }
    if !path.is_dir() {
        bail!("mountpoint {} is not a directory", path.display());
    }
    if mounts::is_mountpoint(&path).context("reading the mount table")? {
        bail!(
            "{} is already a mountpoint; unmount it first (stacking mounts hides the one below)",
            path.display()
        );
    }
    Ok((path, Vec::new()))
}

/// Canonical path without touching the (possibly dead) last component.
fn canonical_parent_join(path: &Path) -> anyhow::Result<PathBuf> {
    let absolute =
        std::path::absolute(path).with_context(|| format!("mountpoint {}", path.display()))?;
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => Ok(parent
            .canonicalize()
            .with_context(|| format!("mountpoint {}", path.display()))?
            .join(name)),
        _ => Ok(absolute),
    }
}

impl Holder {
    pub(super) fn mount(
        &mut self,
        text: String,
        source: &Source,
        mountpoint: &Path,
    ) -> anyhow::Result<()> {
        let fsname = format!("berth:{}", volume::describe(source));
        let state = MountDir::claim(&self.config.state_dir, mountpoint)
            .context("claiming the mount's state directory")?;
        let fuse = FuseMount::mount(
            mountpoint,
            &MountOptions {
                fsname: fsname.clone(),
                read_only: self.config.read_only,
                allow_other: true,
            },
        )
        .with_context(|| format!("mounting {}", mountpoint.display()))?;
        let mut held = self.hold(text, fsname, fuse)?;
        held.state = Some(state);
        self.mounts.push(held);
        Ok(())
    }

    /// A standalone share: its socket bound, no FUSE connection.
    pub(super) fn hold_share(&mut self, target: Target, socket: ShareSocket) -> anyhow::Result<()> {
        let path = target.mountpoint.clone();
        let state = MountDir::claim(&self.config.state_dir, &path)
            .context("claiming the share's state directory")?;
        let share = HeldShare::bind(socket)?;
        self.mounts.push(HeldMount {
            fsname: format!("berth:{}", volume::describe(&target.source)),
            source: target.text,
            mountpoint: path,
            fuse: None,
            queues: Vec::new(),
            shared: ConnectionState::create(0).context("creating the shared state region")?,
            conn: None,
            init_capable: None,
            hang: HangWatch::new(),
            gone: false,
            shares: vec![share],
            state: Some(state),
        });
        Ok(())
    }

    pub(super) fn hold(
        &mut self,
        source: String,
        fsname: String,
        fuse: FuseMount,
    ) -> anyhow::Result<HeldMount> {
        let queues = fuse
            .queues(self.config.threads)
            .context("cloning FUSE queues")?;
        let shared =
            ConnectionState::create(queues.len()).context("creating the shared state region")?;
        let conn = fuse.connection_id();
        if let Some(conn) = conn {
            self.detector.watch_connection(conn);
        }
        Ok(HeldMount {
            source,
            fsname,
            mountpoint: fuse.mountpoint().to_path_buf(),
            fuse: Some(fuse),
            queues,
            shared,
            conn,
            init_capable: None,
            hang: HangWatch::new(),
            gone: false,
            shares: Vec::new(),
            state: None,
        })
    }

    /// Gives up before serving: detach what was mounted, stop an engine if one started.
    pub(super) fn abandon(&mut self) {
        self.kill_engine();
        for m in &self.mounts {
            if let Some(fuse) = &m.fuse {
                let _ = fuse.unmount(true);
            }
        }
        self.cleanup_state();
    }

    pub(super) fn remount(&mut self, i: usize) -> anyhow::Result<Vec<BindTarget>> {
        let mountpoint = self.mounts[i].mountpoint.clone();
        if let Some(conn) = self.mounts[i].conn {
            self.detector.unwatch_connection(conn);
        }
        let targets = remount::detach_with_binds(&mountpoint)?;
        let fuse = FuseMount::mount(
            &mountpoint,
            &MountOptions {
                fsname: self.mounts[i].fsname.clone(),
                read_only: self.config.read_only,
                allow_other: true,
            },
        )?;
        let held = self.hold(
            self.mounts[i].source.clone(),
            self.mounts[i].fsname.clone(),
            fuse,
        )?;
        let mut held = held;
        held.shares = std::mem::take(&mut self.mounts[i].shares);
        held.state = self.mounts[i].state.take();
        self.mounts[i] = held;
        Ok(targets)
    }

    /// Removes what this holder put in the state dir.
    pub(super) fn cleanup_state(&mut self) {
        for m in &mut self.mounts {
            if let Some(dir) = m.state.take() {
                dir.remove();
            }
            let _ =
                std::fs::remove_file(state::control_socket(&self.config.state_dir, &m.mountpoint));
            m.shares.iter().for_each(HeldShare::unlink);
        }
    }
}
