//! Detection of a dead or hung engine and of a lost connection.
//!
//! Two layers feed the holder's loop. The eBPF layer (the `berth-ebpf` crate) reports an
//! engine's exit, requests stalled past the hang timeout and aborted connections straight from
//! kernel tracepoints. The fallback layer needs nothing from the kernel but /dev/fuse and
//! fusectl, and runs always: the engine's socket closing (its death, seen at once), the held
//! /dev/fuse fd's error state (connection aborted or unmounted), and fusectl `waiting`
//! against the engine's progress counters (requests waiting, none finished: hung).

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use super::events::Event;

/// The detection layer in use: "ebpf" when the probes loaded, else "fallback".
pub struct Detector {
    ebpf: Option<super::ebpf::EbpfDetector>,
}

impl Detector {
    /// Loads the eBPF probes unless `no_ebpf`; falls back (and says why) when they cannot.
    pub fn start(no_ebpf: bool, hang_timeout: Duration, events: Sender<Event>) -> Detector {
        if no_ebpf {
            tracing::info!("eBPF detection off (--no-ebpf); using pidfd, held fds and fusectl");
            return Detector { ebpf: None };
        }
        match super::ebpf::EbpfDetector::start(hang_timeout, events) {
            Ok(d) => {
                tracing::info!(mode = d.mode(), "eBPF detection loaded");
                Detector { ebpf: Some(d) }
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "eBPF detection unavailable; using pidfd, held fds and fusectl");
                Detector { ebpf: None }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        if self.ebpf.is_some() {
            "ebpf"
        } else {
            "fallback"
        }
    }

    pub fn watch_process(&self, pid: u32) {
        if let Some(d) = &self.ebpf {
            d.watch_process(pid);
        }
    }

    pub fn unwatch_process(&self, pid: u32) {
        if let Some(d) = &self.ebpf {
            d.unwatch_process(pid);
        }
    }

    pub fn watch_connection(&self, conn: u32) {
        if let Some(d) = &self.ebpf {
            d.watch_connection(conn);
        }
    }

    pub fn unwatch_connection(&self, conn: u32) {
        if let Some(d) = &self.ebpf {
            d.unwatch_connection(conn);
        }
    }
}

/// The fallback hang check of one connection: requests are waiting in the kernel and the
/// engine has finished none for the hang timeout.
pub struct HangWatch {
    finished: u64,
    since: Instant,
    /// Requests started and never finished under the shared counters when the current engine
    /// started: what dead predecessors left (their successor counts them again).
    left: u64,
}

impl Default for HangWatch {
    fn default() -> Self {
        Self::new()
    }
}

impl HangWatch {
    pub fn new() -> HangWatch {
        HangWatch {
            finished: 0,
            since: Instant::now(),
            left: 0,
        }
    }

    /// A new engine takes the connection over; `progress` is the shared (started, finished).
    pub fn engine_started(&mut self, progress: (u64, u64)) {
        self.left = progress.0.saturating_sub(progress.1);
        self.since = Instant::now();
    }

    /// Requests the current engine has read and not finished, from the shared counters.
    pub fn in_flight(&self, progress: (u64, u64)) -> u64 {
        progress
            .0
            .saturating_sub(progress.1)
            .saturating_sub(self.left)
    }

    /// Starts over (a new engine serves): time stuck counts from now.
    pub fn reset(&mut self) {
        self.since = Instant::now();
    }

    /// Feeds one sample (fusectl `waiting`, the engine's finished counter); returns how long
    /// the engine has been stuck once that exceeds `timeout`.
    pub fn check(
        &mut self,
        waiting: Option<u64>,
        finished: u64,
        timeout: Duration,
    ) -> Option<Duration> {
        self.check_at(Instant::now(), waiting, finished, timeout)
    }

    fn check_at(
        &mut self,
        now: Instant,
        waiting: Option<u64>,
        finished: u64,
        timeout: Duration,
    ) -> Option<Duration> {
        let idle = waiting.is_none_or(|w| w == 0);
        if idle || finished != self.finished {
            self.finished = finished;
            self.since = now;
            return None;
        }
        let stuck = now.duration_since(self.since);
        if stuck >= timeout {
            self.since = now; // report once per timeout, not every tick
            return Some(stuck);
        }
        None
    }
}

/// CLOCK_MONOTONIC in ns: comparable across processes (the recovery bench kills at a
/// monotonic time and reads the holder's detection time from the status).
pub fn monotonic_ns() -> u64 {
    // SAFETY: timespec is plain data filled by clock_gettime.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hung_only_when_requests_wait_and_none_finish() {
        let t0 = Instant::now();
        let s = |ms| t0 + Duration::from_millis(ms);
        let timeout = Duration::from_secs(2);
        let mut w = HangWatch::new();
        assert_eq!(w.check_at(s(0), Some(0), 0, timeout), None);
        // Busy and making progress: never hung.
        assert_eq!(w.check_at(s(1000), Some(3), 5, timeout), None);
        assert_eq!(w.check_at(s(2500), Some(3), 9, timeout), None);
        // Idle for long: not hung either.
        assert_eq!(w.check_at(s(9000), Some(0), 9, timeout), None);
        // Waiting with no progress: hung after the timeout.
        assert_eq!(w.check_at(s(9500), Some(1), 9, timeout), None);
        assert_eq!(w.check_at(s(10500), Some(1), 9, timeout), None);
        assert_eq!(
            w.check_at(s(11000), Some(1), 9, timeout),
            Some(Duration::from_millis(2000))
        );
        // fusectl unreadable: no verdict.
        let mut w = HangWatch::new();
        assert_eq!(w.check_at(s(60000), None, 0, timeout), None);
    }

    /// Without fusectl the engine's own counters say what is in flight; what a killed engine
    /// left unfinished is not held against its successor.
    #[test]
    fn in_flight_by_the_counters_forgets_what_dead_engines_left() {
        let mut w = HangWatch::new();
        assert_eq!(w.in_flight((10, 8)), 2);
        // The engine dies with those two read; its successor starts.
        w.engine_started((10, 8));
        assert_eq!(
            w.in_flight((10, 8)),
            0,
            "an idle successor has nothing in flight"
        );
        // It reads the two again (RESEND or the request slots) and one more.
        assert_eq!(w.in_flight((13, 8)), 3);
        assert_eq!(w.in_flight((13, 11)), 0);
        assert_eq!(w.in_flight((12, 11)), 0, "never below zero");
    }
}
