//! FuseWatch: loads the programs, keeps the watch lists, and turns the ring
//! buffer plus the in-flight map into [`Event`]s.

use std::collections::{HashMap as StdHashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, RawFd};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, MapError, RingBuf};
use aya::{Btf, Ebpf, EbpfLoader};

use crate::attach::{self, AttachMode};
use crate::event::{self, monotonic_now, Event};
use crate::Error;

/// The object compiled by build.rs (empty when clang was missing).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/fusewatch.bpf.o"));

pub(crate) fn programs_built() -> bool {
    !OBJECT.is_empty()
}

/// `max_entries` of WATCHED_TGIDS and WATCHED_CONNS in fusewatch.bpf.c.
const WATCH_LIMIT: u32 = 1024;

/// Value of WATCHED_CONNS (`struct conn_watch`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct ConnWatch {
    epoch: u64,
    abort_sent: u32,
    _pad: u32,
}

/// Value of INFLIGHT (`struct inflight`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Inflight {
    sent_ns: u64,
    epoch: u64,
    unique: u64,
    conn: u32,
    opcode: u32,
}

// SAFETY: plain #[repr(C)] integers without padding, valid for any bit pattern.
unsafe impl aya::Pod for ConnWatch {}
// SAFETY: as above.
unsafe impl aya::Pod for Inflight {}

/// Options for [`FuseWatch::load_with`]: `Options::new(threshold)`, then set fields.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Options {
    /// A request in flight longer than this is reported as [`Event::RequestStalled`].
    pub stall_threshold: Duration,
    /// How often the in-flight map is scanned; default `stall_threshold / 4`
    /// clamped to 10 ms..1 s. A stall is reported between `stall_threshold` and
    /// `stall_threshold + scan_interval` after the request was sent.
    pub scan_interval: Option<Duration>,
    /// Attach only this way (tests; `None` = fentry, then BTF tracepoints).
    pub force_mode: Option<AttachMode>,
}

impl Options {
    /// Defaults for everything but the stall threshold.
    pub fn new(stall_threshold: Duration) -> Options {
        Options {
            stall_threshold,
            scan_interval: None,
            force_mode: None,
        }
    }
}

/// The loaded and attached FUSE health watch. See the crate docs.
pub struct FuseWatch {
    /// Owns the programs (and their links): dropping it detaches everything.
    _ebpf: Ebpf,
    mode: AttachMode,
    fentry_refusal: Option<String>,
    tgids: HashMap<MapData, u32, u64>,
    conns: HashMap<MapData, u32, ConnWatch>,
    inflight: HashMap<MapData, u64, Inflight>,
    ring: RingBuf<MapData>,
    stall_threshold: Duration,
    scan_interval: Duration,
    next_scan: Instant,
    /// Registered connections and the epoch of their current registration.
    watched: StdHashMap<u32, u64>,
    next_epoch: u64,
    /// Stalls already reported: (fuse_req address, send time).
    stalls_sent: HashSet<(u64, u64)>,
    /// Aborts already reported: (conn, epoch).
    aborts_sent: HashSet<(u32, u64)>,
}

impl FuseWatch {
    /// Loads and attaches the programs (fentry if allowed, else BTF tracepoints).
    pub fn load(stall_threshold: Duration) -> Result<FuseWatch, Error> {
        FuseWatch::load_with(Options::new(stall_threshold))
    }

    /// [`FuseWatch::load`] with all options.
    pub fn load_with(opts: Options) -> Result<FuseWatch, Error> {
        if OBJECT.is_empty() {
            return Err(Error::NotBuilt);
        }
        check_privileges()?;
        let btf = Btf::from_sys_fs().map_err(Error::NoBtf)?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .load(OBJECT)
            .map_err(Error::Object)?;
        let attached = attach::attach(&mut ebpf, &btf, opts.force_mode)?;
        let tgids = take_hash(&mut ebpf, "WATCHED_TGIDS")?;
        let conns = take_hash(&mut ebpf, "WATCHED_CONNS")?;
        let inflight = take_hash(&mut ebpf, "INFLIGHT")?;
        let ring_map = ebpf
            .take_map("EVENTS")
            .ok_or(Error::Missing("map EVENTS"))?;
        let ring = RingBuf::try_from(ring_map).map_err(Error::map("EVENTS"))?;
        let scan_interval = opts.scan_interval.unwrap_or_else(|| {
            (opts.stall_threshold / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
        tracing::info!(
            mode = ?attached.mode,
            fentry_refusal = attached.fentry_refusal.as_deref().unwrap_or("-"),
            "eBPF FUSE watch attached"
        );
        Ok(FuseWatch {
            _ebpf: ebpf,
            mode: attached.mode,
            fentry_refusal: attached.fentry_refusal,
            tgids,
            conns,
            inflight,
            ring,
            stall_threshold: opts.stall_threshold,
            scan_interval,
            next_scan: Instant::now(),
            watched: StdHashMap::new(),
            next_epoch: 1,
            stalls_sent: HashSet::new(),
            aborts_sent: HashSet::new(),
        })
    }

    /// How the programs are attached.
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// Why fentry was not used (`None` in [`AttachMode::Fentry`]).
    pub fn fentry_refusal(&self) -> Option<&str> {
        self.fentry_refusal.as_deref()
    }

    /// The stall threshold and the scan interval in use.
    pub fn stall_timing(&self) -> (Duration, Duration) {
        (self.stall_threshold, self.scan_interval)
    }

    /// Reports [`Event::EngineExited`] once when the last thread of `tgid` exits.
    ///
    /// Fails with [`Error::NoSuchProcess`] if the process is already gone (or a
    /// zombie): its exit happened before the watch and will never be seen.
    pub fn watch_process(&mut self, tgid: u32) -> Result<(), Error> {
        match self.tgids.insert(tgid, 0, 0) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                return Err(Error::TooMany {
                    what: "processes",
                    limit: WATCH_LIMIT,
                })
            }
            other => other.map_err(Error::map("WATCHED_TGIDS"))?,
        }
        // Checked after inserting, so an exit in between is either seen by the
        // program or found here.
        if !process_alive(tgid) {
            let _ = self.tgids.remove(&tgid);
            return Err(Error::NoSuchProcess(tgid));
        }
        Ok(())
    }

    /// Stops watching `tgid` (no error if it was not watched or already reported).
    pub fn unwatch_process(&mut self, tgid: u32) -> Result<(), Error> {
        ignore_missing(self.tgids.remove(&tgid)).map_err(Error::map("WATCHED_TGIDS"))
    }

    /// Starts tracking the requests of FUSE connection `conn` (its fusectl id,
    /// see [`connection_id`](crate::connection_id)) and returns the epoch that
    /// events of this registration carry.
    ///
    /// Call it right after mounting and [`unwatch_connection`](Self::unwatch_connection)
    /// before unmounting: ids are reused at once, and the epoch keeps what was
    /// seen of an earlier connection with the same id from being reported for
    /// this one. Requests sent before the call are not tracked.
    pub fn watch_connection(&mut self, conn: u32) -> Result<u64, Error> {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let value = ConnWatch {
            epoch,
            abort_sent: 0,
            _pad: 0,
        };
        match self.conns.insert(conn, value, 0) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                return Err(Error::TooMany {
                    what: "connections",
                    limit: WATCH_LIMIT,
                })
            }
            other => other.map_err(Error::map("WATCHED_CONNS"))?,
        }
        self.watched.insert(conn, epoch);
        self.aborts_sent.retain(|(c, _)| *c != conn);
        self.purge_inflight(|v| v.conn == conn && v.epoch != epoch)?;
        Ok(epoch)
    }

    /// Stops tracking `conn` and forgets its in-flight requests.
    pub fn unwatch_connection(&mut self, conn: u32) -> Result<(), Error> {
        ignore_missing(self.conns.remove(&conn)).map_err(Error::map("WATCHED_CONNS"))?;
        self.watched.remove(&conn);
        self.aborts_sent.retain(|(c, _)| *c != conn);
        self.purge_inflight(|v| v.conn == conn)
    }

    /// How many requests of `conn`'s current registration are in flight now
    /// (sent, not yet answered). 0 if `conn` is not watched.
    pub fn in_flight(&self, conn: u32) -> Result<usize, Error> {
        let Some(&epoch) = self.watched.get(&conn) else {
            return Ok(0);
        };
        let mut n = 0;
        for entry in self.inflight.iter() {
            match entry {
                Ok((_, v)) if v.conn == conn && v.epoch == epoch => n += 1,
                Ok(_) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::map("INFLIGHT")(e)),
            }
        }
        Ok(n)
    }

    /// How long an event loop that polls [`FuseWatch`]'s fd (see the `AsFd` impl)
    /// may sleep before calling [`next_events`](Self::next_events) for the next
    /// stall scan; `None` while no connection is watched (only the fd matters).
    pub fn poll_timeout(&self) -> Option<Duration> {
        if self.watched.is_empty() {
            return None;
        }
        Some(self.next_scan.saturating_duration_since(Instant::now()))
    }

    /// Waits up to `timeout` for events and returns them; an empty vector means
    /// nothing happened. Ring-buffer events arrive as soon as the kernel emits
    /// them; stalls are found by scanning the in-flight map every scan interval.
    pub fn next_events(&mut self, timeout: Duration) -> Result<Vec<Event>, Error> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut out = Vec::new();
            self.drain_ring(&mut out);
            let now = Instant::now();
            if now >= self.next_scan {
                self.scan_stalls(&mut out)?;
                self.next_scan = now + self.scan_interval;
            }
            if !out.is_empty() || now >= deadline {
                return Ok(out);
            }
            let wake = if self.watched.is_empty() {
                deadline
            } else {
                deadline.min(self.next_scan)
            };
            wait_readable(self.ring.as_raw_fd(), wake.saturating_duration_since(now))?;
        }
    }

    fn drain_ring(&mut self, out: &mut Vec<Event>) {
        while let Some(record) = self.ring.next() {
            match event::decode(&record) {
                Ok(ev) => {
                    if let Event::ConnectionAborted { conn, epoch, .. } = ev {
                        // Late record of an old registration, or a duplicate from
                        // two CPUs racing on abort_sent.
                        if self.watched.get(&conn) != Some(&epoch)
                            || !self.aborts_sent.insert((conn, epoch))
                        {
                            continue;
                        }
                    }
                    out.push(ev);
                }
                Err(e) => tracing::warn!(error = %e, "dropping undecodable eBPF event"),
            }
        }
    }

    /// Reports requests of watched connections older than the threshold, once
    /// each, and deletes entries left by earlier registrations of an id.
    fn scan_stalls(&mut self, out: &mut Vec<Event>) -> Result<(), Error> {
        if self.watched.is_empty() && self.stalls_sent.is_empty() {
            return Ok(());
        }
        let now_ns = monotonic_now().as_nanos() as u64;
        let threshold_ns = self.stall_threshold.as_nanos() as u64;
        let mut stale = Vec::new();
        let mut live = HashSet::new();
        for entry in self.inflight.iter() {
            let (key, v) = match entry {
                Ok(kv) => kv,
                // Deleted by the kernel while we iterate: fine, it ended.
                Err(MapError::KeyNotFound) => continue,
                Err(e) => return Err(Error::map("INFLIGHT")(e)),
            };
            if self.watched.get(&v.conn) != Some(&v.epoch) {
                stale.push(key);
                continue;
            }
            live.insert((key, v.sent_ns));
            let age_ns = now_ns.saturating_sub(v.sent_ns);
            if age_ns >= threshold_ns && self.stalls_sent.insert((key, v.sent_ns)) {
                out.push(Event::RequestStalled {
                    conn: v.conn,
                    epoch: v.epoch,
                    unique: v.unique,
                    opcode: v.opcode,
                    age: Duration::from_nanos(age_ns),
                });
            }
        }
        self.stalls_sent.retain(|k| live.contains(k));
        for key in stale {
            ignore_missing(self.inflight.remove(&key)).map_err(Error::map("INFLIGHT"))?;
        }
        Ok(())
    }

    fn purge_inflight(&mut self, doomed: impl Fn(&Inflight) -> bool) -> Result<(), Error> {
        let mut keys = Vec::new();
        for entry in self.inflight.iter() {
            match entry {
                Ok((key, v)) if doomed(&v) => keys.push(key),
                Ok(_) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::map("INFLIGHT")(e)),
            }
        }
        for key in keys {
            ignore_missing(self.inflight.remove(&key)).map_err(Error::map("INFLIGHT"))?;
        }
        Ok(())
    }
}

/// The ring buffer's fd: readable when the kernel has queued events. For a
/// caller's own epoll loop: wait on it (and at most [`FuseWatch::poll_timeout`]),
/// then call `next_events(Duration::ZERO)`.
impl AsFd for FuseWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

fn take_hash<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, Error> {
    let map = ebpf.take_map(name).ok_or(Error::Missing(name))?;
    HashMap::try_from(map).map_err(Error::map(name))
}

/// Treats "no such key" as success (removal is idempotent).
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Root, or CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) in the effective set.
fn check_privileges() -> Result<(), Error> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        return Ok(());
    }
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let eff = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(Error::NotRoot { euid })
    }
}

/// True if the thread group `tgid` exists and has not finished exiting.
///
/// Uses a pidfd, which becomes readable once the whole group has exited (a
/// leader that called pthread_exit while other threads run is a zombie in
/// /proc but its process is alive). Falls back to /proc on kernels without
/// pidfd_open (< 5.3).
fn process_alive(tgid: u32) -> bool {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tgid as libc::pid_t, 0) };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENOSYS) => proc_alive(tgid),
            // ESRCH: no such process; EINVAL: a thread id, not a process.
            _ => false,
        };
    }
    // SAFETY: fd was just returned by pidfd_open and is owned by nobody else.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as RawFd) };
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: pfd is valid for the call; timeout 0 never blocks.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc == 0
}

/// /proc fallback of [`process_alive`]: exists and is not a zombie.
fn proc_alive(tgid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{tgid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')' (comm may contain one).
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next())
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// Waits until `fd` is readable or `timeout` passes (EINTR counts as a wake-up).
fn wait_readable(fd: RawFd, timeout: Duration) -> Result<(), Error> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: pfd and ts are valid for the call; a null sigmask keeps the current mask.
    let rc = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if rc < 0 {
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::Interrupted {
            return Err(Error::Poll(err));
        }
    }
    Ok(())
}
