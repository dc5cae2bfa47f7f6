//! A throwaway QEMU guest for the virtio-fs door: Debian's cloud kernel (which `cargo xtask
//! setup` extracts), a busybox-static initramfs written here (cpio newc), and a vhost-user-fs
//! device on a given socket.
//!
//! Used by `cargo xtask vm-test` and `cargo xtask bench virtiofs`. QEMU runs under TCG (no
//! KVM needed), prints the guest's serial console on stdout, and is killed at the deadline.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::setup::{kernel_dir, GUEST_MODULES, KERNEL_PACKAGE};
use crate::sh::{describe, dpkg_installed, on_path, Reaped};

/// Guest RAM; the memfd backend shares all of it with the vhost-user backend.
const GUEST_MEMORY: &str = "512M";
pub const QEMU: &str = "qemu-system-x86_64";
const BUSYBOX: &str = "/bin/busybox";

/// What is missing to boot a guest, in words (empty when everything is there).
pub fn missing() -> Vec<String> {
    let mut out = Vec::new();
    if !on_path(QEMU) {
        out.push(format!("{QEMU} (apt-get install qemu-system-x86)"));
    }
    if !Path::new(BUSYBOX).is_file() || !dpkg_installed("busybox-static") {
        out.push("a static busybox (apt-get install busybox-static)".into());
    }
    if !kernel_dir().join("vmlinuz").is_file() {
        out.push(format!(
            "the guest kernel in {} (`cargo xtask setup` extracts {KERNEL_PACKAGE})",
            kernel_dir().display()
        ));
    }
    out
}

/// The guest's /init: mount the basics, load the modules, then `body` (busybox sh), then
/// power off. `body` runs with the virtio-fs tag in $TAG.
fn init_script(tag: &str, body: &str) -> String {
    let modules = GUEST_MODULES.join(" ");
    format!(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/bin\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         for m in {modules}; do grep -q \"^$m \" /proc/modules || insmod /lib/modules/$m.ko || echo \"guest: insmod $m failed\"; done\n\
         echo \"guest: virtio devices: $(cat /sys/bus/virtio/devices/*/device 2>/dev/null | tr '\\n' ' ')\"\n\
         TAG={tag}\n\
         {body}\n\
         sync\n\
         poweroff -f\n"
    )
}

/// Writes a cpio (newc) initramfs: busybox, the modules, `files` (executables in /bin) and
/// /init.
pub fn build_initramfs(path: &Path, tag: &str, body: &str, files: &[GuestFile]) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "mnt",
        "tmp",
        "lib",
        "lib/modules",
    ] {
        cpio.dir(dir);
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    cpio.char_device("dev/console", 5, 1);
    let busybox = std::fs::read(BUSYBOX).with_context(|| format!("reading {BUSYBOX}"))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    for entry in std::fs::read_dir(kernel_dir().join("modules"))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        cpio.file(
            &format!("lib/modules/{name}"),
            0o644,
            &std::fs::read(entry.path())?,
        );
    }
    for file in files {
        cpio.file(&format!("bin/{}", file.name), 0o755, &file.data);
    }
    cpio.file("init", 0o755, init_script(tag, body).as_bytes());
    std::fs::write(path, cpio.finish()).with_context(|| format!("writing {}", path.display()))
}

/// A minimal cpio "newc" archive writer (the format the kernel unpacks as initramfs).
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, 0, (0, 0), &[]);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, 0, (major, minor), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, data.len() as u32, (0, 0), data);
    }

    fn entry(&mut self, name: &str, mode: u32, size: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & 0o040000 != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0,
            0,
            nlink,
            0,
            size,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.out.len() % 4 != 0 {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, 0, (0, 0), &[]);
        self.out
    }
}

/// An extra executable for the guest's /bin.
pub struct GuestFile {
    pub name: String,
    pub data: Vec<u8>,
}

/// How the guest is wired to the backend.
pub struct Device<'a> {
    pub socket: &'a Path,
    pub tag: &'a str,
    /// Request queues (the backend must offer at least this many).
    pub queues: usize,
    /// QEMU reconnects to the socket this many seconds after losing the backend (0: never).
    pub reconnect: u32,
}

/// Boots the guest with a vhost-user-fs device, runs `body` in its init, echoes its console,
/// and returns the console lines. Kills QEMU at `deadline`.
pub fn boot(work: &Path, device: &Device, body: &str, deadline: Duration) -> Result<Vec<String>> {
    boot_watching(work, device, body, &[], deadline, &mut |_| {})
}

/// [`boot`], calling `on_line` with every console line as it arrives.
pub fn boot_watching(
    work: &Path,
    device: &Device,
    body: &str,
    files: &[GuestFile],
    deadline: Duration,
    on_line: &mut dyn FnMut(&str),
) -> Result<Vec<String>> {
    launch(work, device, body, files, deadline, on_line, false)
}

/// [`boot`], but a reboot in the guest restarts it in the same QEMU, on the same vhost-user
/// connection (the device is reset, its rings set up again): `body` runs again after each
/// reboot, until it powers off.
pub fn boot_rebooting(
    work: &Path,
    device: &Device,
    body: &str,
    deadline: Duration,
) -> Result<Vec<String>> {
    launch(work, device, body, &[], deadline, &mut |_| {}, true)
}

fn launch(
    work: &Path,
    device: &Device,
    body: &str,
    files: &[GuestFile],
    deadline: Duration,
    on_line: &mut dyn FnMut(&str),
    reboots: bool,
) -> Result<Vec<String>> {
    let Device {
        socket,
        tag,
        queues,
        reconnect,
    } = *device;
    let reconnect = if reconnect > 0 {
        format!(",reconnect={reconnect}")
    } else {
        String::new()
    };
    // One initramfs per socket: guests on different shares may boot at once.
    let name = socket
        .file_stem()
        .map_or("guest".into(), |s| s.to_string_lossy().into_owned());
    let initrd = work.join(format!("initramfs-{name}.cpio"));
    build_initramfs(&initrd, tag, body, files)?;
    let mut cmd = Command::new(QEMU);
    cmd.args([
        "-machine",
        "q35",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        GUEST_MEMORY,
    ])
    .args(["-nographic", "-nodefaults", "-serial", "stdio"])
    .args(if reboots {
        &[][..]
    } else {
        &["-no-reboot"][..]
    })
    .arg("-object")
    .arg(format!(
        "memory-backend-memfd,id=mem,size={GUEST_MEMORY},share=on"
    ))
    .args(["-numa", "node,memdev=mem"])
    .arg("-chardev")
    .arg(format!(
        "socket,id=vfs,path={}{reconnect}",
        socket.display()
    ))
    .arg("-device")
    .arg(format!(
        "vhost-user-fs-pci,chardev=vfs,tag={tag},queue-size=1024,num-request-queues={queues}"
    ))
    .arg("-kernel")
    .arg(kernel_dir().join("vmlinuz"))
    .arg("-initrd")
    .arg(&initrd)
    .args(["-append", "console=ttyS0 panic=-1 loglevel=3 rdinit=/init"])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    eprintln!("xtask: $ {}", describe(&cmd));
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting QEMU")?;
    let stdout = child.stdout.take().context("QEMU stdout")?;
    let mut stderr = child.stderr.take().context("QEMU stderr")?;
    let mut qemu = Reaped(Some(child));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let err_thread = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_sub(started.elapsed());
        if left.is_zero() {
            drop(qemu);
            let errors = err_thread.join().unwrap_or_default();
            bail!(
                "the guest did not finish within {deadline:?}; QEMU stderr: {}",
                errors.trim()
            );
        }
        match rx.recv_timeout(left.min(Duration::from_millis(500))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_string();
                println!("guest {name}| {line}");
                on_line(&line);
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = qemu.0.take().map(|mut c| c.wait()).transpose()?;
    let errors = err_thread.join().unwrap_or_default();
    if !errors.trim().is_empty() {
        eprintln!("xtask: QEMU stderr:\n{}", errors.trim());
    }
    eprintln!(
        "xtask: guest ran {:.1?} (QEMU {})",
        started.elapsed(),
        status.map_or("killed".into(), |s| s.to_string())
    );
    Ok(lines)
}
