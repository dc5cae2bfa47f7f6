//! A FUSE "server" written by hand for the tests: it mounts with mount(2),
//! answers FUSE_INIT and then never reads /dev/fuse again, so every later
//! request stays in flight: a hung engine.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};

const FUSE_GETATTR: u32 = 3;
const FUSE_INIT: u32 = 26;
/// sizeof(struct fuse_in_header)
const IN_HEADER: usize = 40;
/// sizeof(struct fuse_out_header)
const OUT_HEADER: usize = 16;
/// sizeof(struct fuse_init_out) for protocol 7.31+
const INIT_OUT: usize = 64;
/// Read buffer: the kernel wants room for a WRITE of max_write (128 KiB) plus headers.
const READ_BUF: usize = 256 * 1024;
pub const FUSECTL: &str = "/sys/fs/fuse/connections";

/// A mounted raw FUSE filesystem. Dropping it aborts the connection (so
/// blocked callers return), unmounts and removes the directory.
pub struct RawMount {
    dev: File,
    dir: tempfile::TempDir,
    path: PathBuf,
    mounted: bool,
}

impl RawMount {
    /// Mounts on a fresh temporary directory and answers FUSE_INIT.
    pub fn mount() -> Result<RawMount> {
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
            .context("open /dev/fuse")?;
        let dir = tempfile::Builder::new()
            .prefix("berth-ebpf-")
            .tempdir()
            .context("temp dir")?;
        // Spelled as mountinfo will show it (connection_id compares text).
        let path = dir.path().canonicalize().context("canonicalize temp dir")?;
        let opts = format!("fd={},rootmode=40000,user_id=0,group_id=0", dev.as_raw_fd());
        mount(
            "berth-ebpf-test",
            &path,
            "fuse",
            libc::MS_NOSUID | libc::MS_NODEV,
            Some(&opts),
        )?;
        let mut m = RawMount {
            dev,
            dir,
            path,
            mounted: true,
        };
        m.answer_init()?;
        Ok(m)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the FUSE_INIT the kernel queued at mount time and accepts it
    /// with protocol 7.31 and no optional features.
    fn answer_init(&mut self) -> Result<()> {
        let mut buf = vec![0u8; READ_BUF];
        let n = self.dev.read(&mut buf).context("read FUSE_INIT")?;
        ensure!(n >= IN_HEADER + 8, "short FUSE_INIT request ({n} bytes)");
        let opcode = u32::from_ne_bytes(buf[4..8].try_into()?);
        ensure!(
            opcode == FUSE_INIT,
            "first request has opcode {opcode}, not INIT"
        );
        let unique = u64::from_ne_bytes(buf[8..16].try_into()?);
        let kernel_major = u32::from_ne_bytes(buf[IN_HEADER..IN_HEADER + 4].try_into()?);
        ensure!(kernel_major == 7, "kernel speaks FUSE {kernel_major}.x");

        let mut reply = Vec::with_capacity(OUT_HEADER + INIT_OUT);
        reply.extend_from_slice(&((OUT_HEADER + INIT_OUT) as u32).to_ne_bytes());
        reply.extend_from_slice(&0i32.to_ne_bytes()); // error
        reply.extend_from_slice(&unique.to_ne_bytes());
        reply.extend_from_slice(&7u32.to_ne_bytes()); // major
        reply.extend_from_slice(&31u32.to_ne_bytes()); // minor
        reply.extend_from_slice(&(128u32 * 1024).to_ne_bytes()); // max_readahead
        reply.extend_from_slice(&0u32.to_ne_bytes()); // flags
        reply.extend_from_slice(&16u16.to_ne_bytes()); // max_background
        reply.extend_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
        reply.extend_from_slice(&(128u32 * 1024).to_ne_bytes()); // max_write
        reply.extend_from_slice(&1u32.to_ne_bytes()); // time_gran
        reply.resize(OUT_HEADER + INIT_OUT, 0); // max_pages, map_alignment, flags2, unused
        let written = self.dev.write(&reply).context("write FUSE_INIT reply")?;
        ensure!(written == reply.len(), "short INIT reply write");
        Ok(())
    }

    /// Reads the next request (blocking) and returns its opcode and unique,
    /// without answering it: the request moves to the kernel's processing list.
    pub fn read_request(&mut self) -> Result<(u32, u64)> {
        let mut buf = vec![0u8; READ_BUF];
        let n = self.dev.read(&mut buf).context("read request")?;
        ensure!(n >= IN_HEADER, "short request ({n} bytes)");
        let opcode = u32::from_ne_bytes(buf[4..8].try_into()?);
        let unique = u64::from_ne_bytes(buf[8..16].try_into()?);
        Ok((opcode, unique))
    }

    /// Starts a thread that answers on a dup of the device: ENOSYS to STATX
    /// (the kernel then uses GETATTR) and to everything else, and GETATTR of
    /// the root with attributes valid for 0 s, so every stat(2) is a request.
    /// The thread ends when the connection goes away (abort, unmount).
    /// Returns the thread and a counter of GETATTRs answered.
    pub fn serve_getattr(&self) -> Result<(std::thread::JoinHandle<Result<()>>, Arc<AtomicU64>)> {
        let mut dev = self.dev.try_clone().context("dup /dev/fuse")?;
        let served = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&served);
        let thread = std::thread::spawn(move || {
            let mut buf = vec![0u8; READ_BUF];
            loop {
                let n = match dev.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => return Err(e).context("serve: read"),
                };
                ensure!(n >= IN_HEADER, "serve: short request");
                let opcode = u32::from_ne_bytes(buf[4..8].try_into()?);
                let unique = u64::from_ne_bytes(buf[8..16].try_into()?);
                let reply = match opcode {
                    FUSE_GETATTR => getattr_reply(unique),
                    _ => error_reply(unique, libc::ENOSYS),
                };
                match dev.write(&reply) {
                    Ok(_) if opcode == FUSE_GETATTR => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    // The request was interrupted or the connection aborted meanwhile.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return Ok(()),
                    Err(e) => return Err(e).context("serve: write"),
                }
            }
        });
        Ok((thread, served))
    }

    /// Sends FUSE_NOTIFY_RESEND: the kernel puts every request read but not
    /// answered back on the pending list (what a successor engine does).
    pub fn notify_resend(&mut self) -> Result<()> {
        const FUSE_NOTIFY_RESEND: i32 = 7;
        let mut msg = Vec::with_capacity(OUT_HEADER);
        msg.extend_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
        msg.extend_from_slice(&FUSE_NOTIFY_RESEND.to_ne_bytes());
        msg.extend_from_slice(&0u64.to_ne_bytes());
        let n = self.dev.write(&msg).context("write FUSE_NOTIFY_RESEND")?;
        ensure!(n == msg.len(), "short notify write");
        Ok(())
    }

    /// Writes `1` to `/sys/fs/fuse/connections/<conn>/abort`.
    pub fn abort(&self, conn: u32) -> Result<()> {
        let file = format!("{FUSECTL}/{conn}/abort");
        std::fs::write(&file, b"1").with_context(|| format!("write {file}"))
    }

    /// Aborts (so nothing is left blocked), unmounts, closes the device and
    /// removes the directory.
    pub fn unmount(mut self) -> Result<()> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<()> {
        if !self.mounted {
            return Ok(());
        }
        if let Ok(conn) = berth_ebpf::connection_id(&self.path) {
            let _ = self.abort(conn);
        }
        let c = CString::new(self.path.as_os_str().as_bytes())?;
        // SAFETY: c is a valid NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 {
            bail!(
                "umount {}: {}",
                self.path.display(),
                std::io::Error::last_os_error()
            );
        }
        self.mounted = false;
        Ok(())
    }
}

impl Drop for RawMount {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("rawfuse: cleanup of {}: {e:#}", self.dir.path().display());
        }
    }
}

fn error_reply(unique: u64, errno: i32) -> Vec<u8> {
    let mut r = Vec::with_capacity(OUT_HEADER);
    r.extend_from_slice(&(OUT_HEADER as u32).to_ne_bytes());
    r.extend_from_slice(&(-errno).to_ne_bytes());
    r.extend_from_slice(&unique.to_ne_bytes());
    r
}

/// fuse_out_header + fuse_attr_out for the root directory (inode 1, 0755).
fn getattr_reply(unique: u64) -> Vec<u8> {
    const ATTR_OUT: usize = 16 + 88;
    let mut r = Vec::with_capacity(OUT_HEADER + ATTR_OUT);
    r.extend_from_slice(&((OUT_HEADER + ATTR_OUT) as u32).to_ne_bytes());
    r.extend_from_slice(&0i32.to_ne_bytes());
    r.extend_from_slice(&unique.to_ne_bytes());
    r.extend_from_slice(&[0u8; 16]); // attr_valid (s, ns) = 0: ask again next time
    r.extend_from_slice(&1u64.to_ne_bytes()); // ino
    r.extend_from_slice(&[0u8; 5 * 8]); // size, blocks, atime, mtime, ctime
    r.extend_from_slice(&[0u8; 3 * 4]); // atimensec, mtimensec, ctimensec
    r.extend_from_slice(&0o040755u32.to_ne_bytes()); // mode
    r.extend_from_slice(&2u32.to_ne_bytes()); // nlink
    r.extend_from_slice(&[0u8; 3 * 4]); // uid, gid, rdev
    r.extend_from_slice(&4096u32.to_ne_bytes()); // blksize
    r.extend_from_slice(&0u32.to_ne_bytes()); // flags
    r
}

/// Mounts fusectl at its usual place if it is not there yet. It is left
/// mounted: it is a standard system mount other processes may be using.
pub fn ensure_fusectl() -> Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    if mountinfo
        .lines()
        .any(|l| l.contains(" - fusectl ") && l.split(' ').nth(4) == Some(FUSECTL))
    {
        return Ok(());
    }
    mount("fusectl", Path::new(FUSECTL), "fusectl", 0, None).context("mount fusectl")
}

fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let source = CString::new(source)?;
    let target_c = CString::new(target.as_os_str().as_bytes())?;
    let fstype = CString::new(fstype)?;
    let data = data.map(CString::new).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast::<libc::c_void>());
    // SAFETY: all pointers are valid NUL-terminated strings (or null data).
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags,
            data_ptr,
        )
    };
    if rc != 0 {
        bail!(
            "mount {} on {}: {}",
            source.to_string_lossy(),
            target.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
