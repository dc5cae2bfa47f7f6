//! `berth status`: what a running mount reports about itself.
//!
//! Each `berth mount` writes a small JSON file next to its inode journal
//! (`<state-dir>/mounts/<mountpoint>/status.json`) when it starts and every two seconds, and
//! removes it when it ends. `berth status MOUNTPOINT` reads it, checks that the process that
//! wrote it is still alive, and prints it (as JSON with `--json`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use indicatif::HumanBytes;
use serde::{Deserialize, Serialize};

use crate::cache::CacheStats;
use crate::heal::HolderFacts;

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

/// The state directory of one mount (inode journal, status file).
pub fn mount_state_dir(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    let name: String = mountpoint
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    state_dir.join("mounts").join(name)
}

pub fn status_path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    mount_state_dir(state_dir, mountpoint).join("status.json")
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
    // A temp name per write: two writers (the periodic one and a refresh) never share it.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("{}.{n}.tmp", std::process::id()));
    std::fs::write(&tmp, serde_json::to_vec_pretty(status)?)?;
    std::fs::rename(tmp, path)
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
    let path = status_path(state_dir, &mountpoint);
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
        write(&status_path(&state, &mnt), &me).unwrap();
        run(&mnt, &state, true).unwrap();
        let text = std::fs::read_to_string(status_path(&state, &mnt)).unwrap();
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
        write(&status_path(&state, &mnt), &sample(i32::MAX as u32)).unwrap();
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
