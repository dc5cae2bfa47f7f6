//! The node cache across a real socket: a server and clients in one process.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixListener;

use super::client::RETRY_AFTER;
use super::wire::{Reply, Request};
use super::*;
use crate::cache::index::{BlockKey, SlotEntry};
use crate::cache::{BlockCache, CacheConfig, DiskTier, EnginePreference, ObjectId};
use crate::store::StoreResult;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt};
use std::ops::Range;
use std::sync::atomic::AtomicUsize;

const BS: u64 = 4096;

/// A node cache of `slots` blocks served on `socket` from its own runtime: dropping the
/// runtime is the daemon going away (every connection closes, the dir lock is released).
fn start_server(dir: &Path, socket: &Path, slots: u64) -> tokio::runtime::Runtime {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = CacheServer::open(dir, slots * BS, BS).unwrap();
    let _ = std::fs::remove_file(socket);
    let listener = {
        let _guard = rt.enter();
        UnixListener::bind(socket).unwrap()
    };
    rt.spawn(server.serve(listener));
    rt
}

fn client_cache(socket: &Path, block_size: u64) -> std::io::Result<Arc<BlockCache>> {
    BlockCache::open(&CacheConfig {
        disk: DiskTier::Node {
            socket: socket.to_path_buf(),
        },
        block_size,
        memory: 0,
        engine: EnginePreference::ThreadPool,
        wait_for_disk: true,
    })
}

fn object(key: &str) -> ObjectId {
    ObjectId {
        store: Arc::from("test"),
        key: Arc::from(key),
        etag: Arc::from("\"e\""),
    }
}

/// Byte `i` of every object is `i % 251`; counts the fetches.
fn source(
    calls: &Arc<AtomicUsize>,
) -> impl Fn(Range<u64>) -> BoxFuture<'static, StoreResult<Bytes>> {
    let calls = calls.clone();
    move |range: Range<u64>| {
        calls.fetch_add(1, Ordering::SeqCst);
        let bytes: Vec<u8> = range.map(|i| (i % 251) as u8).collect();
        async move { Ok(Bytes::from(bytes)) }.boxed()
    }
}

async fn read_all(
    cache: &Arc<BlockCache>,
    key: &str,
    blocks: u64,
    calls: &Arc<AtomicUsize>,
) -> Vec<u8> {
    let size = blocks * BS;
    let got = cache
        .read_blocks(&object(key), 0, blocks, size, source(calls))
        .await
        .unwrap();
    cache.drain_writes().await;
    got.concat()
}

fn want(blocks: u64) -> Vec<u8> {
    (0..blocks * BS).map(|i| (i % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_share_blocks_and_one_quota() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cache.sock");
    let server = start_server(&dir.path().join("cache"), &socket, 8);
    let (a, b) = (
        client_cache(&socket, BS).unwrap(),
        client_cache(&socket, BS).unwrap(),
    );
    let (calls_a, calls_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));

    assert_eq!(read_all(&a, "x", 4, &calls_a).await, want(4));
    assert_eq!(calls_a.load(Ordering::SeqCst), 1);
    // Another process reads what the first one cached, from the disk, with no fetch.
    assert_eq!(read_all(&b, "x", 4, &calls_b).await, want(4));
    assert_eq!(
        calls_b.load(Ordering::SeqCst),
        0,
        "b fetched blocks a had cached"
    );
    assert_eq!(b.stats().disk_hits, 4);

    // Both fill the one quota: 8 slots hold at most 8 blocks, whoever wrote them.
    read_all(&a, "y", 6, &calls_a).await;
    read_all(&b, "z", 6, &calls_b).await;
    let node = b.stats();
    assert_eq!(node.disk_slots, 8);
    assert!(node.disk_blocks <= 8, "{node:?}");
    assert!(node.evictions >= 8, "{node:?}");
    server.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_gives_back_its_slots() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cache.sock");
    let server = start_server(&dir.path().join("cache"), &socket, 1);
    let first = CacheClient::connect(&socket, Duration::ZERO).unwrap();
    let key: BlockKey = Arc::from("k");
    let reservation = first.reserve(&key).await.expect("a free slot");
    let slot = reservation.slot;
    let second = CacheClient::connect(&socket, Duration::ZERO).unwrap();
    let other: BlockKey = Arc::from("other");
    assert!(
        second.reserve(&other).await.is_none(),
        "the only slot is reserved"
    );
    // The reserving process dies before its commit: its connection closes.
    drop(reservation);
    drop(first);
    let mut again = None;
    for _ in 0..100 {
        again = second.reserve(&other).await;
        if again.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let again = again.expect("the lost reservation's slot came back");
    assert_eq!(again.slot, slot);
    second
        .commit(&other, SlotEntry::new(slot, &[2; 100]), again)
        .await
        .unwrap();
    assert_eq!(second.lookup(&[&key]).await, vec![None]);
    assert!(second.lookup(&[&other]).await[0].is_some());
    server.shutdown_background();
}

#[test]
fn a_commit_without_its_reservation_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = CacheServer::open(&dir.path().join("cache"), 4 * BS, BS).unwrap();
    let Reply::Reserved {
        reservation: Some((slot, token, _)),
        ..
    } = server.answer(1, Request::Reserve { key: "k".into() })
    else {
        panic!("no reservation");
    };
    let commit = |token| Request::Commit {
        key: "k".into(),
        entry: SlotEntry::new(slot, &[1; 10]).into(),
        token,
    };
    assert!(matches!(
        server.answer(1, commit(token + 1)),
        Reply::Failed(_)
    ));
    server.forget(1);
    assert!(
        matches!(server.answer(2, commit(token)), Reply::Failed(_)),
        "its connection closed"
    );
    assert_eq!(server.stats().disk.blocks, 0);
}

/// Regression: reservations were tied to connections that the client's pool closed when
/// it had enough idle ones, so commits under load failed and slots were written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_writes_at_once_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cache.sock");
    let server = start_server(&dir.path().join("cache"), &socket, 256);
    let cache = client_cache(&socket, BS).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let reads = (0..64).map(|i| {
        let (cache, calls) = (cache.clone(), calls.clone());
        async move {
            let key = format!("obj{i}");
            cache
                .read_blocks(&object(&key), 0, 2, 2 * BS, source(&calls))
                .await
                .unwrap()
        }
    });
    futures::future::join_all(reads).await;
    cache.drain_writes().await;
    let stats = cache.stats();
    assert_eq!(stats.write_errors, 0, "{stats:?}");
    assert_eq!(stats.disk_blocks, 128, "{stats:?}");
    let again = Arc::new(AtomicUsize::new(0));
    for i in 0..64 {
        let got = cache
            .read_blocks(&object(&format!("obj{i}")), 0, 2, 2 * BS, source(&again))
            .await
            .unwrap();
        assert_eq!(got.concat(), want(2));
    }
    assert_eq!(again.load(Ordering::SeqCst), 0);
    assert_eq!(cache.stats().checksum_failures, 0);
    server.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_on_while_the_daemon_is_away_and_the_cache_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let socket = dir.path().join("cache.sock");
    let server = start_server(&cache_dir, &socket, 16);
    let cache = client_cache(&socket, BS).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    read_all(&cache, "x", 2, &calls).await;
    server.shutdown_background();
    std::fs::remove_file(&socket).unwrap();

    // No daemon: a block never looked up is read from the store, and nothing fails.
    assert_eq!(read_all(&cache, "z", 2, &calls).await, want(2));
    assert_eq!(calls.load(Ordering::SeqCst), 2);

    // A new daemon on the same dir bumps every generation (what the client remembers
    // goes stale), but its index has the blocks recorded before: found again.
    let server = start_server(&cache_dir, &socket, 16);
    tokio::time::sleep(RETRY_AFTER + Duration::from_millis(100)).await;
    let before = cache.stats().disk_hits;
    assert_eq!(read_all(&cache, "x", 2, &calls).await, want(2));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "served from the node cache again"
    );
    assert_eq!(cache.stats().disk_hits, before + 2);
    assert_eq!(cache.stats().checksum_failures, 0);
    server.shutdown_background();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remembered_blocks_need_no_daemon_until_their_slot_changes_hands() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cache.sock");
    let server = start_server(&dir.path().join("cache"), &socket, 2);
    let (a, b) = (
        client_cache(&socket, BS).unwrap(),
        client_cache(&socket, BS).unwrap(),
    );
    let calls = Arc::new(AtomicUsize::new(0));
    read_all(&a, "x", 2, &calls).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // b fills both slots with other blocks: x's slots change hands.
    read_all(&b, "y", 2, &calls).await;
    assert_eq!(read_all(&a, "x", 2, &calls).await, want(2));
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "x was fetched again, not read from y's slots"
    );
    assert_eq!(
        a.stats().checksum_failures,
        0,
        "a stale location is a miss, not a bad disk"
    );

    // What a wrote last it reads again with the daemon gone: no round trip needed.
    server.shutdown_background();
    let hits = a.stats().disk_hits;
    assert_eq!(read_all(&a, "x", 2, &calls).await, want(2));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(a.stats().disk_hits, hits + 2);
}

#[test]
fn a_mount_with_another_block_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cache.sock");
    let server = start_server(&dir.path().join("cache"), &socket, 4);
    let err = client_cache(&socket, 2 * BS).err().expect("refused");
    assert!(err.to_string().contains("block size 4096"), "{err}");
    let err = CacheClient::connect(&dir.path().join("nothing.sock"), Duration::ZERO)
        .err()
        .expect("no server");
    assert!(err.to_string().contains("nothing.sock"), "{err}");
    drop(server);
}
