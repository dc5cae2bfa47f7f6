//! A counting TCP proxy in front of the S3 server: forwards bytes both ways untouched and
//! counts the object GETs it sees (requests with a `Range` header or on an object path, but
//! not listings), so a test can prove that a read was served without going to the store.
//! GETs of just the first byte (`Range: bytes=0-0`) are counted apart: they are the read
//! proofs a volume makes before it is served blocks it did not fetch itself (docs/cache.md),
//! and carry no block. [`CountingProxy::delaying`] also holds every object GET back for a
//! while before forwarding it: a slow store. [`CountingProxy::holding_conditional_writes`]
//! holds back writes that carry `If-Match` (a conditional PutObject or
//! CompleteMultipartUpload), so a test can change the object in between.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};

pub struct CountingProxy {
    port: u16,
    gets: Arc<AtomicU64>,
    proofs: Arc<AtomicU64>,
    held: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl CountingProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards to `upstream` (`http://host:port`).
    pub fn start(upstream: &str) -> Result<CountingProxy> {
        CountingProxy::delaying(upstream, std::time::Duration::ZERO)
    }

    /// As [`CountingProxy::start`], each object GET forwarded only after `delay`.
    pub fn delaying(upstream: &str, delay: std::time::Duration) -> Result<CountingProxy> {
        CountingProxy::spawn(upstream, delay, std::time::Duration::ZERO)
    }

    /// As [`CountingProxy::start`], each PUT or POST carrying `If-Match` forwarded only after
    /// `hold` ([`CountingProxy::held`] counts them as they are held).
    pub fn holding_conditional_writes(
        upstream: &str,
        hold: std::time::Duration,
    ) -> Result<CountingProxy> {
        CountingProxy::spawn(upstream, std::time::Duration::ZERO, hold)
    }

    fn spawn(
        upstream: &str,
        delay: std::time::Duration,
        hold: std::time::Duration,
    ) -> Result<CountingProxy> {
        let target = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        let port = listener.local_addr()?.port();
        let gets = Arc::new(AtomicU64::new(0));
        let proofs = Arc::new(AtomicU64::new(0));
        let held = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, p, h, s) = (gets.clone(), proofs.clone(), held.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Acquire) {
                    return;
                }
                let Ok(client) = conn else { continue };
                let (target, g, p, h) = (target.clone(), g.clone(), p.clone(), h.clone());
                std::thread::spawn(move || {
                    let counters = Counters {
                        gets: &g,
                        proofs: &p,
                        held: &h,
                    };
                    let _ = relay(client, &target, counters, delay, hold);
                });
            }
        });
        Ok(CountingProxy {
            port,
            gets,
            proofs,
            held,
            stop,
            accept: Some(accept),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Object GETs seen so far, read proofs not included.
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::Acquire)
    }

    /// Read proofs (GETs of an object's first byte only) seen so far.
    pub fn proofs(&self) -> u64 {
        self.proofs.load(Ordering::Acquire)
    }

    /// Conditional writes held back so far.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

struct Counters<'a> {
    gets: &'a AtomicU64,
    proofs: &'a AtomicU64,
    held: &'a AtomicU64,
}

/// Copies server -> client raw; parses client -> server requests to count GETs.
fn relay(
    client: TcpStream,
    target: &str,
    counters: Counters<'_>,
    delay: std::time::Duration,
    hold: std::time::Duration,
) -> Result<()> {
    let Counters { gets, proofs, held } = counters;
    let server = TcpStream::connect(target)?;
    let (mut server_r, mut client_w) = (server.try_clone()?, client.try_clone()?);
    let back = std::thread::spawn(move || {
        let _ = std::io::copy(&mut server_r, &mut client_w);
        let _ = client_w.shutdown(Shutdown::Write);
    });
    let mut reader = BufReader::new(client);
    let mut server_w = server;
    loop {
        let mut head = Vec::new();
        let mut content_length = 0usize;
        let mut is_get = false;
        let mut is_write = false;
        let mut conditional = false;
        let mut first_byte_only = false;
        let mut first = true;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                let _ = server_w.shutdown(Shutdown::Write);
                let _ = back.join();
                return Ok(());
            }
            if first {
                // "GET /bucket/key?x-id=GetObject HTTP/1.1": a GET of an object, not a listing.
                let path = line.split(' ').nth(1).unwrap_or("");
                is_get = line.starts_with("GET ")
                    && !path.contains("list-type")
                    && path.trim_start_matches('/').contains('/');
                is_write = line.starts_with("PUT ") || line.starts_with("POST ");
                first = false;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                content_length = v.trim().parse().unwrap_or(0);
            }
            conditional |= lower.starts_with("if-match:");
            if let Some(v) = lower.strip_prefix("range:") {
                first_byte_only = v.trim() == "bytes=0-0";
            }
            head.extend_from_slice(line.as_bytes());
            if line == "\r\n" {
                break;
            }
        }
        if is_get && first_byte_only {
            proofs.fetch_add(1, Ordering::AcqRel);
        } else if is_get {
            gets.fetch_add(1, Ordering::AcqRel);
        }
        if is_get {
            std::thread::sleep(delay);
        }
        if is_write && conditional && !hold.is_zero() {
            held.fetch_add(1, Ordering::AcqRel);
            std::thread::sleep(hold);
        }
        server_w.write_all(&head)?;
        let mut body = (&mut reader).take(content_length as u64);
        std::io::copy(&mut body, &mut server_w)?;
    }
}
