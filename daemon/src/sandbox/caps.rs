//! Capabilities and `no_new_privs`: what a guest-facing process gives up for good.
//!
//! Capabilities are a property of each thread, not of the process, and no syscall changes
//! another thread's: [`drop_all_but`] must run while the process has one thread, so that every
//! thread started later (tokio's, the workers', the io_uring thread) inherits the reduced
//! sets. It empties the ambient set, drops every other capability from the bounding set (so
//! that no execve can bring one back, even of a setuid-root or file-capability binary), and
//! sets the permitted and effective sets to the capabilities kept, the inheritable set to none.

use std::io;

/// Capability numbers (linux/capability.h); libc does not define them.
pub const CAP_CHOWN: u32 = 0;
pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_FOWNER: u32 = 3;
/// Needed to drop capabilities from the bounding set (and dropped itself).
const CAP_SETPCAP: u32 = 8;
/// The highest capability number any kernel has ever known, as a bound for the loop below.
const CAP_MAX: u32 = 63;

/// `_LINUX_CAPABILITY_VERSION_3`: two 32-bit words per set.
const CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The name of a capability this module knows, for logs.
pub fn name(cap: u32) -> &'static str {
    match cap {
        CAP_CHOWN => "CAP_CHOWN",
        CAP_DAC_OVERRIDE => "CAP_DAC_OVERRIDE",
        CAP_DAC_READ_SEARCH => "CAP_DAC_READ_SEARCH",
        CAP_FOWNER => "CAP_FOWNER",
        CAP_SETPCAP => "CAP_SETPCAP",
        _ => "CAP_?",
    }
}

/// Sets `no_new_privs`: execve never grants privileges again (setuid bits and file
/// capabilities are ignored), and seccomp filters may be installed without CAP_SYS_ADMIN.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `cap` is in this thread's bounding set; `None` when the kernel does not know it.
fn in_bounding_set(cap: u32) -> Option<bool> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap as libc::c_ulong, 0, 0, 0) };
    (r >= 0).then_some(r == 1)
}

/// Keeps only the capabilities in `keep` (see the module text). Fails with EPERM when the
/// thread has no CAP_SETPCAP (berth is not running as root); what was dropped stays dropped.
pub fn drop_all_but(keep: &[u32]) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    // EINVAL: a kernel older than 4.3 has no ambient set.
    if r != 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
        return Err(io::Error::last_os_error());
    }
    for cap in 0..=CAP_MAX {
        match in_bounding_set(cap) {
            None => break,
            Some(false) => continue,
            Some(true) if keep.contains(&cap) => continue,
            Some(true) => {}
        }
        // SAFETY: prctl with integer arguments only.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut data = [CapData::default(); 2];
    for &cap in keep {
        let word = &mut data[(cap / 32) as usize];
        word.effective |= 1 << (cap % 32);
        word.permitted |= 1 << (cap % 32);
    }
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    // SAFETY: capset reads one header and two data structs of the v3 layout, both valid for
    // the call; pid 0 is the calling thread.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The effective, permitted and inheritable sets of the calling thread, as 64-bit masks.
#[cfg(test)]
fn current() -> io::Result<(u64, u64, u64)> {
    let mut header = CapHeader {
        version: CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two data structs of the v3 layout into `data`, valid for writes.
    let r = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |f: fn(&CapData) -> u32| u64::from(f(&data[0])) | u64::from(f(&data[1])) << 32;
    Ok((
        join(|d| d.effective),
        join(|d| d.permitted),
        join(|d| d.inheritable),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a forked child (capabilities are per thread, and the test harness has many), keeps
    /// two capabilities and checks what the kernel then reports.
    #[test]
    fn only_the_kept_capabilities_remain() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let keep = [CAP_DAC_OVERRIDE, CAP_FOWNER];
        let want = 1u64 << CAP_DAC_OVERRIDE | 1 << CAP_FOWNER;
        // SAFETY: the child only makes raw syscalls (prctl, capset, capget) and _exit: nothing
        // that allocates or takes a lock another thread of the parent might have held.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let code = match (set_no_new_privs(), drop_all_but(&keep)) {
                (Ok(()), Ok(())) => match current() {
                    Ok((eff, prm, inh)) if eff == want && prm == want && inh == 0 => {
                        let bounded = (0..=CAP_MAX)
                            .map_while(in_bounding_set)
                            .enumerate()
                            .all(|(cap, set)| set == keep.contains(&(cap as u32)));
                        if bounded {
                            0
                        } else {
                            3
                        }
                    }
                    _ => 2,
                },
                _ => 1,
            };
            // SAFETY: ends the forked child without running the parent's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "1: drop failed, 2: wrong sets, 3: wrong bounding set"
        );
    }
}
