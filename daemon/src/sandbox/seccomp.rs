//! The seccomp-BPF allowlist of a guest-facing process, written as a classic BPF program.
//!
//! The program checks the architecture (anything but the one berth was built for is killed:
//! the syscall numbers below would mean other calls there; on x86_64 the x32 ABI is killed
//! too), loads the syscall number and compares it with each entry of [`rules`] in turn. An
//! entry allows the call, allows it only for some argument values (`clone` without namespace
//! flags, `socket` of a few families, `tgkill` of this process, a few `ioctl`s and `prctl`s),
//! or refuses it with an errno that the calling code handles (`clone3`: glibc falls back to
//! `clone`, whose flags the filter can see). Everything else gets the default action:
//! `SECCOMP_RET_KILL_PROCESS` (or `SECCOMP_RET_LOG` in log mode).
//!
//! The numbers are libc's `SYS_*` constants for the target, so the list builds for x86_64 and
//! aarch64 alike; the calls only x86_64 has (the pre-`*at` ones glibc may still use) are
//! listed apart. How the list was derived, and why each group is there: docs/virtiofs.md,
//! "Sandbox".

use std::io;

use libc::sock_filter;

/// `AUDIT_ARCH_*` of linux/audit.h (libc has none of them).
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xC000_003E;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xC000_00B7;

/// x86_64 syscalls of the x32 ABI have this bit set in their number.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Offsets in `struct seccomp_data`: nr, arch, instruction pointer, six 64-bit arguments.
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of argument `i` (both targets are little-endian).
const fn arg_low(i: u8) -> u32 {
    16 + 8 * i as u32
}

/// Every `CLONE_NEW*` flag: a new namespace (a user namespace above all) is a kernel attack
/// surface and a way back to capabilities, inside it.
const CLONE_NAMESPACES: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32;

/// What the filter answers for one syscall number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Allowed, whatever the arguments.
    Allow,
    /// Refused with this errno: the caller gets an error it handles.
    Errno(i32),
    /// Allowed when the low 32 bits of argument `arg` have none of the bits of `mask`.
    NoneOf { arg: u8, mask: u32 },
    /// Allowed when the low 32 bits of argument `arg` are one of `values`.
    OneOf { arg: u8, values: Vec<u32> },
}

/// What the process uses besides the common ground, as found after its setup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Uses {
    /// The block cache runs on io_uring: its thread calls `io_uring_enter`.
    pub io_uring: bool,
}

/// Calls every guest-facing process makes after its setup: memory, threads, time, files (the
/// state dir, the cache, a local-directory store, /proc/self/fd), sockets (S3 over TCP, unix
/// sockets to the holder, the node cache and VMMs), waiting, pipes, eventfds. Derived from
/// `strace -f` of the engines and shares of the e2e suite (what they called after installing
/// the filter), plus the few marked "not seen" that rare paths need and that give nothing
/// away.
const ALLOWED: &[libc::c_long] = &[
    // memory (brk, mremap: not seen; the allocator may use them)
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    // threads, signals, exit
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    // not seen: spin-then-yield backoff under contention
    libc::SYS_sched_yield,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    // not seen: the kernel's restart of a sleep interrupted by SIGSTOP/SIGCONT
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // not seen: reaping a child whose execve the filter refused (see execve below)
    libc::SYS_wait4,
    libc::SYS_waitid,
    // time (not seen: the vDSO answers unless the clock source cannot), randomness
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    // not seen: the resolver's gethostname
    libc::SYS_uname,
    // file descriptors and data
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fcntl,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_ftruncate,
    // upload spools give back the space of parts the store has
    libc::SYS_fallocate,
    // the local store keeps objects' POSIX metadata in an extended attribute (fd-based only)
    libc::SYS_fgetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_fremovexattr,
    // the local store copies objects (rename, multipart assembly) through the kernel
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    // paths (the local store resolves beneath its root with openat2 and *at calls)
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_getdents64,
    libc::SYS_mkdirat,
    libc::SYS_unlinkat,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    // sockets (socket(2) itself is filtered by family, below)
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    // not seen (the tests use IP endpoints): the resolver's parallel A/AAAA queries, and
    // the netlink socket it may bind to learn the local addresses
    libc::SYS_sendmmsg,
    libc::SYS_bind,
    // waiting (epoll_pwait, ppoll: what aarch64 has for epoll_wait and poll)
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
];

/// Calls of x86_64 that aarch64 never had, which glibc and Rust's std make there.
#[cfg(target_arch = "x86_64")]
const ALLOWED_X86_64: &[libc::c_long] = &[
    libc::SYS_mkdir,
    libc::SYS_rmdir,
    libc::SYS_unlink,
    libc::SYS_rename,
    libc::SYS_poll,
    libc::SYS_epoll_wait,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_X86_64: &[libc::c_long] = &[];

/// `ioctl` requests (none was seen after setup): close-on-exec and non-blocking toggles
/// (std's `set_nonblocking`), bytes readable, and the log writer's terminal check (`TCGETS`).
/// Nothing else: no `TIOCSTI` into a terminal, no device ioctls on the FUSE or other fds.
const IOCTLS: &[libc::c_ulong] = &[
    libc::FIOCLEX as libc::c_ulong,
    libc::FIONCLEX as libc::c_ulong,
    libc::FIONBIO as libc::c_ulong,
    libc::FIONREAD as libc::c_ulong,
    libc::TCGETS as libc::c_ulong,
];

/// `prctl` options: thread names (std and tokio name their threads) and reading them.
const PRCTLS: &[libc::c_int] = &[libc::PR_SET_NAME, libc::PR_GET_NAME];

/// Socket families: unix (holder, node cache, VMMs), IPv4 and IPv6 (S3, DNS), and netlink
/// (not seen; getaddrinfo may ask it for the local addresses). No packet or raw sockets.
const SOCKET_FAMILIES: &[libc::c_int] = &[
    libc::AF_UNIX,
    libc::AF_INET,
    libc::AF_INET6,
    libc::AF_NETLINK,
];

/// The rules of a process whose pid is `pid`, with what it `uses`, in program order.
pub fn rules(pid: u32, uses: Uses) -> Vec<(libc::c_long, Rule)> {
    let mut rules: Vec<(libc::c_long, Rule)> = ALLOWED
        .iter()
        .chain(ALLOWED_X86_64)
        .map(|&nr| (nr, Rule::Allow))
        .collect();
    rules.extend([
        // Threads and processes, never in a new namespace. clone3 passes its flags in memory
        // the filter cannot read: ENOSYS makes glibc fall back to clone.
        (
            libc::SYS_clone,
            Rule::NoneOf {
                arg: 0,
                mask: CLONE_NAMESPACES,
            },
        ),
        (libc::SYS_clone3, Rule::Errno(libc::ENOSYS)),
        // A signal to one of our own threads (abort, a panic's backtrace) only.
        (
            libc::SYS_tgkill,
            Rule::OneOf {
                arg: 0,
                values: vec![pid],
            },
        ),
        (
            libc::SYS_socket,
            Rule::OneOf {
                arg: 0,
                values: SOCKET_FAMILIES.iter().map(|&f| f as u32).collect(),
            },
        ),
        (
            libc::SYS_ioctl,
            Rule::OneOf {
                arg: 1,
                values: IOCTLS.iter().map(|&r| r as u32).collect(),
            },
        ),
        (
            libc::SYS_prctl,
            Rule::OneOf {
                arg: 0,
                values: PRCTLS.iter().map(|&o| o as u32).collect(),
            },
        ),
        // Nothing is executed from inside the sandbox: a credential_process of the AWS
        // config fails (with an error the S3 client reports) instead of killing the engine.
        (libc::SYS_execve, Rule::Errno(libc::EPERM)),
        (libc::SYS_execveat, Rule::Errno(libc::EPERM)),
        // Rings are set up before the sandbox: a new one is refused (the cache falls back to
        // its thread pool), never killed.
        (libc::SYS_io_uring_setup, Rule::Errno(libc::EPERM)),
        (libc::SYS_io_uring_register, Rule::Errno(libc::EPERM)),
    ]);
    if uses.io_uring {
        rules.push((libc::SYS_io_uring_enter, Rule::Allow));
    }
    rules
}

fn stmt(code: u32, k: u32) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

const LOAD: u32 = libc::BPF_LD | libc::BPF_W | libc::BPF_ABS;
const JEQ: u32 = libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K;
const JGE: u32 = libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K;
const JSET: u32 = libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K;
const RET: u32 = libc::BPF_RET | libc::BPF_K;

/// The BPF program: `rules` in order, `default` for every other call of this architecture,
/// `SECCOMP_RET_KILL_PROCESS` for any other architecture.
pub fn program(rules: &[(libc::c_long, Rule)], default: u32) -> Vec<sock_filter> {
    let allow = stmt(RET, libc::SECCOMP_RET_ALLOW);
    let mut p = vec![
        stmt(LOAD, ARCH),
        jump(JEQ, AUDIT_ARCH, 1, 0),
        stmt(RET, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(LOAD, NR),
    ];
    #[cfg(target_arch = "x86_64")]
    p.extend([
        jump(JGE, X32_SYSCALL_BIT, 0, 1),
        stmt(RET, libc::SECCOMP_RET_KILL_PROCESS),
    ]);
    for (nr, rule) in rules {
        // Each entry: "not this number? skip my block", then a block that ends in a return.
        let block = match rule {
            Rule::Allow => vec![allow],
            Rule::Errno(errno) => vec![stmt(
                RET,
                libc::SECCOMP_RET_ERRNO | (*errno as u32 & libc::SECCOMP_RET_DATA),
            )],
            Rule::NoneOf { arg, mask } => vec![
                stmt(LOAD, arg_low(*arg)),
                jump(JSET, *mask, 0, 1),
                stmt(RET, default),
                allow,
            ],
            Rule::OneOf { arg, values } => {
                let mut b = vec![stmt(LOAD, arg_low(*arg))];
                for v in values {
                    b.extend([jump(JEQ, *v, 0, 1), allow]);
                }
                b.push(stmt(RET, default));
                b
            }
        };
        let skip = u8::try_from(block.len()).expect("a rule's block is short");
        p.push(jump(JEQ, *nr as u32, 0, skip));
        p.extend(block);
    }
    p.push(stmt(RET, default));
    p
}

/// Installs `program` on every thread of the process (`SECCOMP_FILTER_FLAG_TSYNC`). Needs
/// `no_new_privs` (or CAP_SYS_ADMIN). Filters only ever add up: nothing can remove this one.
pub fn install(program: &[sock_filter]) -> io::Result<()> {
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?,
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points at `program`, which outlives the call; the kernel copies it.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &prog as *const libc::sock_fprog,
        )
    };
    match r {
        0 => Ok(()),
        r if r < 0 => Err(io::Error::last_os_error()),
        // TSYNC: the id of a thread that could not take the filter (it has another one).
        tid => Err(io::Error::other(format!(
            "thread {tid} could not take the filter"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `struct seccomp_data` as the kernel hands it to the filter.
    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    impl Data {
        fn word(&self, offset: u32) -> u32 {
            match offset {
                NR => self.nr,
                ARCH => self.arch,
                o if (16..64).contains(&o) => {
                    let arg = self.args[((o - 16) / 8) as usize];
                    if (o - 16) % 8 == 0 {
                        arg as u32
                    } else {
                        (arg >> 32) as u32
                    }
                }
                o => panic!("load of offset {o}"),
            }
        }
    }

    /// Runs the classic BPF instructions this module emits, as the kernel would.
    fn run(program: &[sock_filter], data: &Data) -> u32 {
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = program[pc];
            let code = u32::from(i.code);
            pc += 1;
            match code {
                LOAD => a = data.word(i.k),
                RET => return i.k,
                JEQ | JGE | JSET => {
                    let taken = match code {
                        JEQ => a == i.k,
                        JGE => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += usize::from(if taken { i.jt } else { i.jf });
                }
                other => panic!("unexpected instruction {other:#x}"),
            }
        }
    }

    fn call(nr: libc::c_long, args: [u64; 6]) -> Data {
        Data {
            nr: nr as u32,
            arch: AUDIT_ARCH,
            args,
        }
    }

    const KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;

    #[test]
    fn the_program_answers_as_the_rules_say() {
        let pid = 4242;
        let p = program(&rules(pid, Uses { io_uring: true }), KILL);
        let answer = |nr, args| run(&p, &call(nr, args));
        assert_eq!(answer(libc::SYS_read, [0; 6]), ALLOW);
        assert_eq!(answer(libc::SYS_openat2, [0; 6]), ALLOW);
        assert_eq!(answer(libc::SYS_io_uring_enter, [0; 6]), ALLOW);
        for forbidden in [
            libc::SYS_mount,
            libc::SYS_umount2,
            libc::SYS_ptrace,
            libc::SYS_bpf,
            libc::SYS_init_module,
            libc::SYS_finit_module,
            libc::SYS_kexec_load,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_keyctl,
            libc::SYS_open_by_handle_at,
            libc::SYS_reboot,
            libc::SYS_swapon,
            libc::SYS_pivot_root,
            libc::SYS_chroot,
            libc::SYS_setuid,
            libc::SYS_setresuid,
            libc::SYS_setgid,
            libc::SYS_personality,
            libc::SYS_userfaultfd,
            libc::SYS_perf_event_open,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_kill,
            libc::SYS_capset,
            libc::SYS_seccomp,
            libc::SYS_fchown,
        ] {
            assert_eq!(answer(forbidden, [0; 6]), KILL, "syscall {forbidden}");
        }
        // Threads yes, namespaces no; clone3 falls back.
        let thread = (libc::CLONE_VM | libc::CLONE_THREAD | libc::CLONE_SIGHAND) as u64;
        assert_eq!(answer(libc::SYS_clone, [thread, 0, 0, 0, 0, 0]), ALLOW);
        let userns = thread | libc::CLONE_NEWUSER as u64;
        assert_eq!(answer(libc::SYS_clone, [userns, 0, 0, 0, 0, 0]), KILL);
        assert_eq!(
            answer(libc::SYS_clone3, [0; 6]),
            libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32
        );
        assert_eq!(
            answer(libc::SYS_execve, [0; 6]),
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32
        );
        // Signals to our own threads only.
        assert_eq!(answer(libc::SYS_tgkill, [4242, 1, 6, 0, 0, 0]), ALLOW);
        assert_eq!(answer(libc::SYS_tgkill, [1, 1, 9, 0, 0, 0]), KILL);
        // Sockets of the families S3 and the unix sockets need; no raw packets.
        let family = |f: libc::c_int| [f as u64, 0, 0, 0, 0, 0];
        assert_eq!(answer(libc::SYS_socket, family(libc::AF_INET6)), ALLOW);
        assert_eq!(answer(libc::SYS_socket, family(libc::AF_PACKET)), KILL);
        // The high half of an argument does not smuggle a value past the check.
        let high = (1u64 << 32) | libc::AF_PACKET as u64;
        assert_eq!(answer(libc::SYS_socket, [high, 0, 0, 0, 0, 0]), KILL);
        let ioctl = |req: libc::c_ulong| [2, req, 0, 0, 0, 0];
        assert_eq!(answer(libc::SYS_ioctl, ioctl(libc::TCGETS)), ALLOW);
        assert_eq!(answer(libc::SYS_ioctl, ioctl(libc::TIOCSTI)), KILL);
        let prctl = |o: libc::c_int| [o as u64, 0, 0, 0, 0, 0];
        assert_eq!(answer(libc::SYS_prctl, prctl(libc::PR_SET_NAME)), ALLOW);
        assert_eq!(answer(libc::SYS_prctl, prctl(libc::PR_SET_DUMPABLE)), KILL);
        // Another architecture, whatever the number.
        let foreign = Data {
            arch: 0x4000_0003, // AUDIT_ARCH_I386
            ..call(libc::SYS_read, [0; 6])
        };
        assert_eq!(run(&p, &foreign), KILL);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            answer(libc::SYS_read | X32_SYSCALL_BIT as i64, [0; 6]),
            KILL
        );
    }

    #[test]
    fn io_uring_enter_only_with_a_ring() {
        let p = program(&rules(1, Uses { io_uring: false }), KILL);
        assert_eq!(run(&p, &call(libc::SYS_io_uring_enter, [0; 6])), KILL);
        let setup = run(&p, &call(libc::SYS_io_uring_setup, [0; 6]));
        assert_eq!(setup, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32);
    }

    #[test]
    fn each_syscall_has_one_rule() {
        let rules = rules(1, Uses { io_uring: true });
        let mut seen = std::collections::HashSet::new();
        for (nr, _) in &rules {
            assert!(seen.insert(*nr), "syscall {nr} is listed twice");
        }
        // Log mode: the default changes, the rules do not.
        let log = program(&rules, libc::SECCOMP_RET_LOG);
        assert_eq!(
            run(&log, &call(libc::SYS_mount, [0; 6])),
            libc::SECCOMP_RET_LOG
        );
        assert!(log.len() < usize::from(u16::MAX));
    }

    /// The real thing, in a forked child (a filter cannot be taken off again): an allowed
    /// call works, a forbidden one kills the process with SIGSYS.
    #[test]
    fn a_forbidden_syscall_kills_the_process() {
        let exit_status = |forbidden: bool| {
            // SAFETY: getpid has no preconditions.
            let pid = unsafe { libc::getpid() };
            // Built before fork: the child must not allocate (another thread of the harness
            // may hold the allocator's lock). The child's pid differs; its own tgkill is not
            // needed here.
            let p = program(&rules(pid as u32, Uses::default()), KILL);
            // SAFETY: the child makes raw syscalls only (prctl, seccomp, getpid, mount,
            // _exit) on memory built before the fork.
            let child = unsafe { libc::fork() };
            assert!(child >= 0, "fork failed");
            if child == 0 {
                // SAFETY: prctl with integer arguments; syscalls on valid or null pointers.
                unsafe {
                    if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                        libc::_exit(10);
                    }
                    if install(&p).is_err() {
                        libc::_exit(11);
                    }
                    if libc::getpid() <= 0 {
                        libc::_exit(12);
                    }
                    if forbidden {
                        libc::syscall(
                            libc::SYS_mount,
                            std::ptr::null::<libc::c_char>(),
                            std::ptr::null::<libc::c_char>(),
                            std::ptr::null::<libc::c_char>(),
                            0,
                            std::ptr::null::<libc::c_void>(),
                        );
                        libc::_exit(13);
                    }
                    libc::_exit(0);
                }
            }
            let mut status = 0;
            // SAFETY: waits for our own child.
            assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
            status
        };
        let allowed = exit_status(false);
        assert!(
            libc::WIFEXITED(allowed) && libc::WEXITSTATUS(allowed) == 0,
            "the child doing allowed calls did not exit 0: status {allowed:#x}"
        );
        let killed = exit_status(true);
        assert!(
            libc::WIFSIGNALED(killed) && libc::WTERMSIG(killed) == libc::SIGSYS,
            "the child calling mount(2) was not killed by SIGSYS: status {killed:#x}"
        );
    }
}
