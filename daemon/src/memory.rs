//! One memory budget for the whole engine: prefetch buffers and write buffers of every handle
//! draw from it, so many readers cannot multiply memory use (unlike per-handle windows).
//!
//! Prefetching is optional work and only takes what is free ([`MemoryLimiter::try_reserve`]).
//! Bytes a caller is waiting for right now are always granted ([`MemoryLimiter::reserve`]),
//! because refusing them would stall the application instead of saving memory; they are few
//! (bounded by the FUSE requests in flight). Writers wait for room, with a cap on the wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

pub struct MemoryLimiter {
    limit: u64,
    used: AtomicU64,
    peak: AtomicU64,
    freed: Notify,
}

/// Bytes held against the budget until dropped.
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<MemoryLimiter>,
    bytes: u64,
}

impl std::fmt::Debug for MemoryLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryLimiter({}/{})", self.used(), self.limit)
    }
}

impl MemoryLimiter {
    pub fn new(limit: u64) -> Arc<MemoryLimiter> {
        Arc::new(MemoryLimiter {
            limit,
            used: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            freed: Notify::new(),
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// Highest `used` seen so far.
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Acquire)
    }

    /// Takes `bytes` only if they fit under the limit.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64) -> Option<Reservation> {
        let mut used = self.used();
        loop {
            let next = used.checked_add(bytes)?;
            if next > self.limit {
                return None;
            }
            match self
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(self.granted(next, bytes)),
                Err(now) => used = now,
            }
        }
    }

    /// Takes `bytes` even past the limit: for data an application is waiting on.
    pub fn reserve(self: &Arc<Self>, bytes: u64) -> Reservation {
        let next = self.used.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.granted(next, bytes)
    }

    /// Waits up to `max_wait` for room, then takes the bytes anyway (and says so), so that a
    /// budget held by idle handles slows writers down but cannot deadlock them.
    pub async fn reserve_wait(self: &Arc<Self>, bytes: u64, max_wait: Duration) -> Reservation {
        let deadline = tokio::time::Instant::now() + max_wait;
        loop {
            let freed = self.freed.notified();
            if let Some(r) = self.try_reserve(bytes) {
                return r;
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                tracing::warn!(
                    bytes,
                    used = self.used(),
                    limit = self.limit,
                    "memory limit reached; going over it rather than stalling a writer"
                );
                return self.reserve(bytes);
            }
        }
    }

    fn granted(self: &Arc<Self>, used_now: u64, bytes: u64) -> Reservation {
        self.peak.fetch_max(used_now, Ordering::AcqRel);
        Reservation {
            limiter: self.clone(),
            bytes,
        }
    }
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.limiter.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.limiter.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn try_reserve_respects_the_limit_and_drop_returns_bytes() {
        let m = MemoryLimiter::new(100);
        let a = m.try_reserve(60).unwrap();
        assert!(m.try_reserve(41).is_none());
        let b = m.try_reserve(40).unwrap();
        assert_eq!(m.used(), 100);
        drop(a);
        assert_eq!(m.used(), 40);
        drop(b);
        assert_eq!(m.used(), 0);
        assert_eq!(m.peak(), 100);
    }

    #[test]
    fn forced_reservations_may_exceed_but_block_optional_ones() {
        let m = MemoryLimiter::new(10);
        let _big = m.reserve(25);
        assert_eq!(m.used(), 25);
        assert!(m.try_reserve(1).is_none());
    }

    #[tokio::test]
    async fn waiting_writer_gets_room_when_memory_is_freed() {
        let m = MemoryLimiter::new(10);
        let held = m.try_reserve(10).unwrap();
        let m2 = m.clone();
        let waiter =
            tokio::spawn(async move { m2.reserve_wait(5, Duration::from_secs(10)).await.bytes() });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(held);
        assert_eq!(waiter.await.unwrap(), 5);
        assert_eq!(m.used(), 0);
    }

    #[tokio::test]
    async fn waiting_writer_goes_over_the_limit_after_max_wait() {
        let m = MemoryLimiter::new(10);
        let _held = m.try_reserve(10).unwrap();
        let r = m.reserve_wait(5, Duration::from_millis(30)).await;
        assert_eq!(m.used(), 15);
        drop(r);
        assert_eq!(m.used(), 10);
    }
}
