//! What a test needs from the machine, and what this machine has.

use std::path::{Path, PathBuf};

/// A set of requirements (a tiny bit set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Needs(u8);

impl Needs {
    /// Nothing beyond the `berth` binary.
    pub const NOTHING: Needs = Needs(0);
    /// Root and an openable `/dev/fuse`.
    pub const FUSE: Needs = Needs(1);
    /// The `weed` binary (the test starts its own server).
    pub const WEED: Needs = Needs(2);
    /// The shared SeaweedFS server started by `main` (implies `WEED`).
    pub const SHARED_SERVER: Needs = Needs(4 | 2);
    /// The usual S3 test: FUSE plus the shared server.
    pub const S3_MOUNT: Needs = Needs(1 | 4 | 2);
    /// What berth's eBPF probes need: root, kernel BTF, and probes built into this berth.
    pub const EBPF: Needs = Needs(8);
    /// The everyday tools the POSIX metadata tests run: tar, cp, rsync, git.
    pub const TOOLS: Needs = Needs(16);
    /// The real s3fs (Debian's s3fs-fuse), for the interop test.
    pub const S3FS: Needs = Needs(32);

    pub const fn union(self, other: Needs) -> Needs {
        Needs(self.0 | other.0)
    }

    pub const fn contains(self, other: Needs) -> bool {
        self.0 & other.0 == other.0
    }
}

/// One requirement this machine lacks, grouped for the skip message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Missing {
    /// "FUSE" or "S3".
    pub kind: &'static str,
    pub reason: String,
}

pub struct Requirements {
    fuse: Result<(), String>,
    weed: Result<PathBuf, String>,
    ebpf: Result<(), String>,
    tools: Result<(), String>,
    s3fs: Result<(), String>,
}

impl Requirements {
    pub fn detect() -> Requirements {
        Requirements {
            fuse: detect_fuse(),
            weed: find_weed(),
            ebpf: detect_ebpf(),
            tools: on_path(&["tar", "cp", "rsync", "git"]),
            s3fs: on_path(&["s3fs"]),
        }
    }

    pub fn weed_bin(&self) -> Option<&Path> {
        self.weed.as_deref().ok()
    }

    pub fn missing(&self, needs: Needs) -> Vec<Missing> {
        let mut out = Vec::new();
        if needs.contains(Needs::FUSE) {
            if let Err(reason) = &self.fuse {
                out.push(Missing {
                    kind: "FUSE",
                    reason: reason.clone(),
                });
            }
        }
        if needs.contains(Needs::EBPF) {
            if let Err(reason) = &self.ebpf {
                out.push(Missing {
                    kind: "eBPF",
                    reason: reason.clone(),
                });
            }
        }
        if needs.contains(Needs::TOOLS) {
            if let Err(reason) = &self.tools {
                out.push(Missing {
                    kind: "tools",
                    reason: reason.clone(),
                });
            }
        }
        if needs.contains(Needs::S3FS) {
            if let Err(reason) = &self.s3fs {
                out.push(Missing {
                    kind: "s3fs",
                    reason: reason.clone(),
                });
            }
        }
        if needs.contains(Needs::WEED) {
            if let Err(reason) = &self.weed {
                out.push(Missing {
                    kind: "S3",
                    reason: reason.clone(),
                });
            }
        }
        out
    }
}

/// Whether every program in `names` is on `PATH`.
fn on_path(names: &[&str]) -> Result<(), String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !std::env::split_paths(&path).any(|d| is_executable(&d.join(n))))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "not on PATH: {} (`.ci/run` installs them with apt-get)",
            missing.join(", ")
        ))
    }
}

fn detect_fuse() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!("not running as root (euid {euid})"));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .map(drop)
        .map_err(|e| format!("/dev/fuse cannot be opened: {e}"))
}

fn detect_ebpf() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err("the kernel has no BTF (/sys/kernel/btf/vmlinux)".into());
    }
    if !berth_ebpf::programs_built() {
        return Err("berth was built without its eBPF programs (clang was missing)".into());
    }
    Ok(())
}

/// `BERTH_WEED_BIN`, else `<repo>/.tools/venv/bin/weed`, else `weed` on `PATH`.
pub fn find_weed() -> Result<PathBuf, String> {
    const HINT: &str = "set BERTH_WEED_BIN or run `cargo xtask setup`";
    if let Some(bin) = std::env::var_os("BERTH_WEED_BIN").filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(bin);
        return if is_executable(&bin) {
            Ok(bin)
        } else {
            Err(format!(
                "weed binary not found: BERTH_WEED_BIN={} is not an executable file ({HINT})",
                bin.display()
            ))
        };
    }
    let venv = repo_root().join(".tools/venv/bin/weed");
    if is_executable(&venv) {
        return Ok(venv);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("weed");
            if is_executable(&candidate) {
                return Ok(candidate);
            }
        }
    }
    Err(format!("weed binary not found ({HINT})"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("daemon crate lives inside the repository")
        .to_path_buf()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
