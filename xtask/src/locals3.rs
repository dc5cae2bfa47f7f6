//! A SeaweedFS server on loopback for the guest tests, and the few HTTP calls they need.
//!
//! Objects are seeded and checked through the filer's HTTP API (S3 buckets are directories
//! under /buckets), so the xtask needs no S3 signing; berth talks S3 to the same server.
//! The server runs without identities, so any credentials are accepted.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::sh::Reaped;

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
pub const NO_PROXY: &str = "127.0.0.1,localhost";

pub struct LocalS3 {
    pub s3_port: u16,
    pub filer_port: u16,
    _child: Reaped,
}

impl LocalS3 {
    /// Starts `weed mini` with its data in `dir` and waits until the filer takes a write.
    pub fn start(weed: &Path, dir: &Path) -> Result<LocalS3> {
        let listeners = (0..10)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("finding free ports")?;
        let p = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(listeners);
        let data = dir.join("weed-data");
        std::fs::create_dir_all(&data)?;
        let log = std::fs::File::create(dir.join("weed.log"))?;
        let child = Command::new(weed)
            .arg("-logtostderr=true")
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args([
                "-master.telemetry=false",
                "-admin.ui=false",
                "-webdav=false",
            ])
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-admin.port={}", p[8]))
            .arg(format!("-admin.port.grpc={}", p[9]))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!(
                "-filer.localSocket={}",
                dir.join("filer.sock").display()
            ))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()))
            .current_dir(dir)
            .env("NO_PROXY", NO_PROXY)
            .env("no_proxy", NO_PROXY)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", weed.display()))?;
        let server = LocalS3 {
            s3_port: p[6],
            filer_port: p[4],
            _child: Reaped(Some(child)),
        };
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < READY_TIMEOUT {
            match server.put("probe", "ready", b"ok") {
                Ok(()) => return Ok(server),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("SeaweedFS not ready after {READY_TIMEOUT:?}: {last}")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Stores `key` in `bucket` (creating the bucket) through the filer.
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) -> Result<()> {
        let (status, _) = http(
            self.filer_port,
            "PUT",
            &format!("/buckets/{bucket}/{key}"),
            body,
        )?;
        if !(200..300).contains(&status) {
            bail!("PUT {bucket}/{key}: HTTP {status}");
        }
        Ok(())
    }

    /// Reads `key` through the S3 API (anonymous), `None` if absent.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let (status, body) = http(self.s3_port, "GET", &format!("/{bucket}/{key}"), &[])?;
        match status {
            200 => Ok(Some(body)),
            404 => Ok(None),
            other => bail!("GET {bucket}/{key}: HTTP {other}"),
        }
    }
}

/// One HTTP/1.0 request on loopback (no chunked replies, connection closes at the end).
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
    let mut conn = TcpStream::connect(("127.0.0.1", port))?;
    conn.set_read_timeout(Some(HTTP_TIMEOUT))?;
    conn.set_write_timeout(Some(HTTP_TIMEOUT))?;
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body)?;
    let mut reply = Vec::new();
    conn.read_to_end(&mut reply)?;
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("HTTP reply without a header end")?;
    let head = String::from_utf8_lossy(&reply[..split]);
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad HTTP status line in {head:?}"))?;
    Ok((status, reply[split + 4..].to_vec()))
}
