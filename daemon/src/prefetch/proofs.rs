//! Read proofs: which object versions this volume's own credentials were seen reading.
//!
//! The node cache serves every volume of the node, whatever credentials cached a block, so a
//! volume may be given a cached block of `(key, etag)` only once the store accepted a read of
//! exactly that version signed with the volume's own credentials: one of its block GETs
//! (If-Match `etag`) succeeded, or a proof request did (a conditional GET of the first byte;
//! see [`super::Fetcher`]). A LIST, which also yields keys and ETags, proves nothing.
//!
//! A proof lasts for the metadata TTL (forever in read-only dataset mode), as long as what the
//! namespace learnt from the store is trusted. The table is bounded: past [`MAX_PROOFS`]
//! versions the oldest proof is forgotten (it is simply asked for again), and proofs that
//! expired are dropped whenever a new one is recorded. Concurrent readers wanting the same
//! proof wait for one request. Refusals are not remembered: the next read asks again, as an
//! uncached read would.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};

use crate::store::StoreResult;

/// Object versions remembered at most (a proof costs roughly its key and ETag in memory).
pub const MAX_PROOFS: usize = 32_768;

/// One object version: key and ETag.
pub type Version = (Arc<str>, Arc<str>);

type Attempt = Shared<BoxFuture<'static, StoreResult<()>>>;

/// The versions this volume proved it may read, and the proof requests in flight.
pub struct ReadProofs {
    /// `None`: proofs never expire.
    ttl: Option<Duration>,
    cap: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When each version was proved, and its place in `order`.
    proved: HashMap<Version, (Instant, u64)>,
    /// Versions by the order they were (last) proved in: the oldest first.
    order: BTreeMap<u64, Version>,
    next: u64,
    proving: HashMap<Version, Attempt>,
}

impl State {
    fn fresh(&self, version: &Version, now: Instant, ttl: Option<Duration>) -> bool {
        self.proved.get(version).is_some_and(|(at, _)| match ttl {
            None => true,
            Some(ttl) => now.saturating_duration_since(*at) < ttl,
        })
    }

    fn record(&mut self, version: Version, now: Instant, ttl: Option<Duration>, cap: usize) {
        if let Some((_, seq)) = self.proved.remove(&version) {
            self.order.remove(&seq);
        }
        let seq = self.next;
        self.next += 1;
        self.proved.insert(version.clone(), (now, seq));
        self.order.insert(seq, version);
        // Oldest first: what expired, then whatever is over the cap.
        while let Some((_, oldest)) = self.order.first_key_value() {
            let expired = !self.fresh(oldest, now, ttl);
            if !expired && self.order.len() <= cap {
                break;
            }
            if let Some((_, oldest)) = self.order.pop_first() {
                self.proved.remove(&oldest);
            }
        }
    }
}

impl ReadProofs {
    /// Proofs that last `ttl` (`None`: forever), at most `cap` of them.
    pub fn new(ttl: Option<Duration>, cap: usize) -> ReadProofs {
        ReadProofs {
            ttl,
            cap: cap.max(1),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `version` was proved within the TTL.
    #[cfg(test)]
    pub fn is_fresh(&self, version: &Version) -> bool {
        self.lock().fresh(version, Instant::now(), self.ttl)
    }

    /// The store accepted a read of `version` signed with this volume's credentials.
    pub fn record(&self, version: Version) {
        self.lock()
            .record(version, Instant::now(), self.ttl, self.cap);
    }

    /// Versions remembered (expired ones included until they are dropped).
    #[cfg(test)]
    pub fn remembered(&self) -> usize {
        self.lock().proved.len()
    }

    /// Succeeds at once if `version` has a fresh proof; otherwise runs `prove` (or waits for
    /// the attempt another reader started) and records the proof if it succeeds. The error
    /// of a failed attempt is returned to every reader that waited for it.
    pub async fn ensure(
        &self,
        version: &Version,
        prove: impl FnOnce() -> BoxFuture<'static, StoreResult<()>>,
    ) -> StoreResult<()> {
        let attempt = {
            let mut state = self.lock();
            if state.fresh(version, Instant::now(), self.ttl) {
                return Ok(());
            }
            state
                .proving
                .entry(version.clone())
                .or_insert_with(|| prove().shared())
                .clone()
        };
        let result = attempt.clone().await;
        let mut state = self.lock();
        // Whoever finds the attempt still registered retires it (and records its outcome).
        if state
            .proving
            .get(version)
            .is_some_and(|current| current.ptr_eq(&attempt))
        {
            state.proving.remove(version);
            if result.is_ok() {
                state.record(version.clone(), Instant::now(), self.ttl, self.cap);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn version(key: &str) -> Version {
        (Arc::from(key), Arc::from("\"e1\""))
    }

    #[test]
    fn proofs_expire_after_the_ttl_and_never_without_one() {
        let t0 = Instant::now();
        let ttl = Some(Duration::from_secs(1));
        let mut state = State::default();
        state.record(version("a"), t0, ttl, 10);
        assert!(state.fresh(&version("a"), t0 + Duration::from_millis(999), ttl));
        assert!(!state.fresh(&version("a"), t0 + Duration::from_secs(1), ttl));
        assert!(!state.fresh(&version("b"), t0, ttl), "never proved");
        let other_etag = (Arc::from("a"), Arc::from("\"e2\""));
        assert!(!state.fresh(&other_etag, t0, ttl), "a proof is per ETag");
        assert!(state.fresh(&version("a"), t0 + Duration::from_secs(1 << 30), None));
        // Recording drops what expired.
        state.record(version("b"), t0 + Duration::from_secs(5), ttl, 10);
        assert_eq!(state.proved.len(), 1);
        assert_eq!(state.order.len(), 1);
    }

    #[test]
    fn the_table_is_capped_and_forgets_the_oldest_proof_first() {
        let t0 = Instant::now();
        let mut state = State::default();
        for (i, key) in ["a", "b", "c"].into_iter().enumerate() {
            state.record(version(key), t0 + Duration::from_millis(i as u64), None, 3);
        }
        // Proving "a" again makes it the newest: "b" is now the oldest.
        state.record(version("a"), t0 + Duration::from_millis(3), None, 3);
        state.record(version("d"), t0 + Duration::from_millis(4), None, 3);
        let now = t0 + Duration::from_millis(5);
        assert!(
            !state.fresh(&version("b"), now, None),
            "the oldest is forgotten"
        );
        for key in ["a", "c", "d"] {
            assert!(state.fresh(&version(key), now, None), "{key}");
        }
        assert_eq!((state.proved.len(), state.order.len()), (3, 3));
    }

    #[tokio::test]
    async fn concurrent_readers_share_one_attempt_and_refusals_are_not_remembered() {
        let proofs = ReadProofs::new(Some(Duration::from_secs(60)), 16);
        let calls = Arc::new(AtomicUsize::new(0));
        let prove = |outcome: StoreResult<()>| {
            let calls = calls.clone();
            move || {
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    outcome
                }
                .boxed()
            }
        };
        let denied = || Err(StoreError::AccessDenied("HTTP 403".into()));
        let v = version("k");
        let (a, b) = tokio::join!(
            proofs.ensure(&v, prove(denied())),
            proofs.ensure(&v, prove(denied())),
        );
        assert!(matches!(a, Err(StoreError::AccessDenied(_))), "{a:?}");
        assert!(matches!(b, Err(StoreError::AccessDenied(_))), "{b:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "one request for both");
        assert!(!proofs.is_fresh(&v));

        let (a, b) = tokio::join!(
            proofs.ensure(&v, prove(Ok(()))),
            proofs.ensure(&v, prove(Ok(()))),
        );
        assert!(a.is_ok() && b.is_ok());
        assert_eq!(calls.load(Ordering::SeqCst), 2, "a refusal is asked again");
        assert!(proofs.is_fresh(&v));
        proofs.ensure(&v, prove(Ok(()))).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "a fresh proof needs no request"
        );
        assert_eq!(proofs.remembered(), 1);
    }
}
