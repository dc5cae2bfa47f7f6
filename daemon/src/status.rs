//! `berth status`: what a running mount reports about itself.
//!
//! Each engine (and each standalone `berth share`) writes a small JSON file next to its inode
//! journal (`<state-dir>/mounts/<mountpoint>/status.json`, see [`crate::state`]) when it starts
//! and every two seconds, through one [`Publisher`] per mount, and removes it when it ends.
//! `berth status MOUNTPOINT` reads it, checks that the process that wrote it is still alive,
//! and prints it (as JSON with `--json`). The daemon embeds the same file in ListVolumes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use indicatif::HumanBytes;
use serde::{Deserialize, Serialize};

use crate::cache::CacheStats;
use crate::memory::MemoryLimiter;
use crate::namespace::Namespace;
use crate::prefetch::NodeCache;
use crate::state;
use crate::sys::files::write_atomic;

/// How often a mount refreshes its status file.
pub const REFRESH: Duration = Duration::from_secs(2);

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountStatus {
    /// The holder: the process that owns the mount (`berth mount`).
    pub pid: u32,
    /// The engine serving it now.
    pub engine_pid: u32,
    /// holder_pid, engine_generation, detector, recoveries, last_recovery_ms, ...
    #[serde(flatten)]
    pub heal: HolderFacts,
    pub source: String,
    pub mountpoint: String,
    pub started_unix: u64,
    pub updated_unix: u64,
    pub read_only: bool,
    pub inodes: u64,
    pub skipped_keys: u64,
    pub memory_used: u64,
    pub memory_peak: u64,
    pub memory_limit: u64,
    pub cache: Option<CacheStats>,
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

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes the status atomically (a reader never sees half a file).
pub fn write(path: &Path, status: &MountStatus) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    write_atomic(path, &serde_json::to_vec_pretty(status)?, 0o600)
}

/// What one served mount (or standalone share) reports, and where.
pub struct Publisher {
    path: PathBuf,
    source: String,
    mountpoint: String,
    started_unix: u64,
    read_only: bool,
    ns: Arc<Namespace>,
    memory: Arc<MemoryLimiter>,
    cache: Option<NodeCache>,
    /// The holder's facts; a standalone share is its own holder.
    facts: Arc<Mutex<HolderFacts>>,
}

/// What a [`Publisher`] describes.
pub struct Reported {
    pub source: String,
    pub mountpoint: PathBuf,
    pub read_only: bool,
    pub ns: Arc<Namespace>,
    pub memory: Arc<MemoryLimiter>,
    pub cache: Option<NodeCache>,
    pub facts: Arc<Mutex<HolderFacts>>,
}

impl Publisher {
    /// A publisher writing `status.json` in the mount's state directory. It writes once now
    /// (a failure is logged: `berth status` will not see this mount, nothing else breaks).
    pub fn new(mount_dir: &Path, what: Reported) -> Arc<Publisher> {
        let publisher = Arc::new(Publisher {
            path: state::status_file(mount_dir),
            source: what.source,
            mountpoint: what.mountpoint.display().to_string(),
            started_unix: now_unix(),
            read_only: what.read_only,
            ns: what.ns,
            memory: what.memory,
            cache: what.cache,
            facts: what.facts,
        });
        if let Err(e) = write(&publisher.path, &publisher.status()) {
            tracing::warn!(path = %publisher.path.display(), error = %e, "could not write the status file; `berth status` will not see this mount");
        }
        publisher
    }

    pub fn status(&self) -> MountStatus {
        let heal = self.facts.lock().unwrap_or_else(|e| e.into_inner()).clone();
        MountStatus {
            pid: heal.holder_pid,
            engine_pid: std::process::id(),
            heal,
            source: self.source.clone(),
            mountpoint: self.mountpoint.clone(),
            started_unix: self.started_unix,
            updated_unix: now_unix(),
            read_only: self.read_only,
            inodes: self.ns.inode_count() as u64,
            skipped_keys: self.ns.skipped_keys(),
            memory_used: self.memory.used(),
            memory_peak: self.memory.peak(),
            memory_limit: self.memory.limit(),
            cache: self.cache.as_ref().map(|c| c.cache.stats()),
        }
    }

    /// Writes the status file now.
    pub fn refresh(&self) {
        if let Err(e) = write(&self.path, &self.status()) {
            tracing::debug!(path = %self.path.display(), error = %e, "could not write the status file");
        }
    }

    /// Refreshes the file every [`REFRESH`] on `rt` until the returned task is aborted.
    pub fn spawn_refresh(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(REFRESH).await;
                me.refresh();
            }
        })
    }

    /// Removes the status file (the mount ended).
    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as libc::pid_t, 0) == 0 }
}

/// `berth status MOUNTPOINT`.
pub fn run(mountpoint: &Path, state_dir: &Path, json: bool) -> anyhow::Result<()> {
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("{} does not exist", mountpoint.display()))?;
    let path = state::find_status_file(state_dir, &mountpoint);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "no berth mount at {} (no status in {}; is --state-dir the one the mount uses?)",
            mountpoint.display(),
            path.display()
        )
    })?;
    let status: MountStatus =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    if !alive(status.pid) {
        bail!(
            "the berth process that served {} (pid {}) is gone; its status is stale",
            mountpoint.display(),
            status.pid
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", human(&status));
    }
    Ok(())
}

/// The text form of a status (also used for each volume in `berth --socket PATH status`).
pub fn human(s: &MountStatus) -> String {
    let mut out = format!(
        "berth: {} at {} (pid {}, up {}s{})\n  inodes {}, skipped keys {}, memory {} used of {} (peak {})\n",
        s.source,
        s.mountpoint,
        s.pid,
        s.updated_unix.saturating_sub(s.started_unix),
        if s.read_only { ", read-only" } else { "" },
        s.inodes,
        s.skipped_keys,
        HumanBytes(s.memory_used),
        HumanBytes(s.memory_limit),
        HumanBytes(s.memory_peak),
    );
    let h = &s.heal;
    out.push_str(&format!(
        "  engine pid {} (generation {}), detector {}, {} recoveries{}, {} upgrades{}\n",
        s.engine_pid,
        h.generation,
        h.detector,
        h.recoveries,
        match (h.last_recovery_ms, &h.last_recovery_kind) {
            (Some(ms), Some(kind)) => format!(" (last: {kind} in {ms} ms)"),
            _ => String::new(),
        },
        h.upgrades,
        h.last_upgrade_ms
            .map(|ms| format!(" (last stalled {ms} ms)"))
            .unwrap_or_default(),
    ));
    if h.lost_open_files {
        out.push_str("  a remount happened: files open at the time were lost\n");
    }
    match &s.cache {
        None => out.push_str("  cache: off\n"),
        Some(c) => out.push_str(&format!(
            "  cache ({}): {} memory hits, {} disk hits, {} misses ({} coalesced)\n  \
             served {} from memory, {} from disk, {} from the store\n  \
             disk {} of {} blocks, {} evictions, {} checksum failures, {} write errors, {} writes skipped\n",
            c.engine,
            c.memory_hits,
            c.disk_hits,
            c.misses,
            c.coalesced,
            HumanBytes(c.bytes_from_memory),
            HumanBytes(c.bytes_from_disk),
            HumanBytes(c.bytes_from_store),
            c.disk_blocks,
            c.disk_slots,
            c.evictions,
            c.checksum_failures,
            c.write_errors,
            c.writes_skipped,
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pid: u32) -> MountStatus {
        MountStatus {
            pid,
            engine_pid: pid,
            heal: HolderFacts {
                holder_pid: pid,
                generation: 2,
                detector: "fallback".into(),
                recoveries: 1,
                last_recovery_ms: Some(42),
                last_recovery_kind: Some("takeover".into()),
                ..HolderFacts::default()
            },
            source: "s3://b".into(),
            mountpoint: "/mnt/b".into(),
            started_unix: 100,
            updated_unix: 160,
            read_only: false,
            inodes: 3,
            skipped_keys: 0,
            memory_used: 1 << 20,
            memory_peak: 2 << 20,
            memory_limit: 1 << 30,
            cache: Some(CacheStats {
                engine: "IoUring".into(),
                disk_hits: 7,
                ..CacheStats::default()
            }),
        }
    }

    #[test]
    fn round_trips_and_reports_stale_status() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let state = dir.path().join("state");
        let me = sample(std::process::id());
        let file = state::status_file(&state::mount_dir(&state, &mnt));
        write(&file, &me).unwrap();
        run(&mnt, &state, true).unwrap();
        let text = std::fs::read_to_string(&file).unwrap();
        assert_eq!(serde_json::from_str::<MountStatus>(&text).unwrap(), me);
        assert!(human(&me).contains("7 disk hits"));
        assert!(human(&me).contains("takeover in 42 ms"), "{}", human(&me));
        let value: serde_json::Value = serde_json::from_str(&text).unwrap();
        for field in [
            "holder_pid",
            "engine_pid",
            "engine_generation",
            "detector",
            "recoveries",
            "last_recovery_ms",
        ] {
            assert!(
                value.get(field).is_some(),
                "status JSON lacks {field}: {text}"
            );
        }

        // A pid that cannot be alive.
        write(&file, &sample(i32::MAX as u32)).unwrap();
        let err = run(&mnt, &state, false).unwrap_err().to_string();
        assert!(err.contains("stale"), "{err}");
    }

    #[test]
    fn a_path_without_a_mount_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let err = run(dir.path(), &dir.path().join("state"), false).unwrap_err();
        assert!(format!("{err:#}").contains("no berth mount"));
    }
}
