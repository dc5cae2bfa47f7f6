//! A SeaweedFS (`weed mini`) server on loopback, in its own temp dir, with an
//! explicit free port for every listener.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::s3::{Bucket, S3};
use crate::util::{self, tail_file};

pub const ACCESS_KEY: &str = "berthe2eaccess";
pub const SECRET_KEY: &str = "berthe2esecretkey0123456789";
/// A second identity that may list every bucket but read no object (SeaweedFS action `List`
/// only; HEAD and GET of an object are refused with 403 AccessDenied).
pub const LIST_ONLY_ACCESS_KEY: &str = "berthe2elistonly";
pub const LIST_ONLY_SECRET_KEY: &str = "berthe2elistonlysecret98765";

const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Every port `weed mini` listens on, chosen free up front so that a restart
/// comes back on the same addresses.
#[derive(Debug, Clone, Copy)]
struct Ports {
    master: u16,
    master_grpc: u16,
    volume: u16,
    volume_grpc: u16,
    filer: u16,
    filer_grpc: u16,
    s3: u16,
    s3_grpc: u16,
    admin: u16,
    admin_grpc: u16,
}

impl Ports {
    fn pick() -> Result<Ports> {
        // Hold every listener until all are chosen so no port is handed out twice.
        let listeners = (0..10)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("binding 127.0.0.1:0 to find free ports")?;
        let p = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Ports {
            master: p[0],
            master_grpc: p[1],
            volume: p[2],
            volume_grpc: p[3],
            filer: p[4],
            filer_grpc: p[5],
            s3: p[6],
            s3_grpc: p[7],
            admin: p[8],
            admin_grpc: p[9],
        })
    }

    fn all(&self) -> [u16; 10] {
        [
            self.master,
            self.master_grpc,
            self.volume,
            self.volume_grpc,
            self.filer,
            self.filer_grpc,
            self.s3,
            self.s3_grpc,
            self.admin,
            self.admin_grpc,
        ]
    }
}

pub struct Seaweed {
    label: String,
    bin: PathBuf,
    dir: Mutex<Option<TempDir>>,
    data_dir: PathBuf,
    log_path: PathBuf,
    ports: Ports,
    child: Mutex<Option<Child>>,
    client: S3,
    probe: S3,
}

impl Seaweed {
    /// Start a server and wait until it answers S3 requests.
    pub fn start(bin: &Path, label: &str) -> Result<Seaweed> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("berth-e2e-weed-{label}-"))
            .tempdir()
            .context("creating SeaweedFS temp dir")?;
        let data_dir = dir.path().join("data");
        std::fs::create_dir(&data_dir)?;
        std::fs::write(dir.path().join("s3.json"), s3_config())?;
        let ports = Ports::pick()?;
        let endpoint = format!("http://127.0.0.1:{}", ports.s3);
        let server = Seaweed {
            label: label.to_owned(),
            bin: bin.to_owned(),
            log_path: dir.path().join("weed.log"),
            data_dir,
            dir: Mutex::new(Some(dir)),
            ports,
            child: Mutex::new(None),
            client: S3::new(&endpoint, ACCESS_KEY, SECRET_KEY, true),
            probe: S3::new(&endpoint, ACCESS_KEY, SECRET_KEY, false),
        };
        server.spawn()?;
        if let Err(e) = server.wait_ready() {
            eprintln!(
                "e2e: SeaweedFS [{label}] did not become ready; its log ({}):\n{}",
                server.log_path.display(),
                tail_file(&server.log_path, 200)
            );
            server.shutdown();
            return Err(e);
        }
        Ok(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.s3)
    }

    /// A fresh bucket with a unique name derived from `tag`.
    pub fn bucket(&self, tag: &str) -> Result<Bucket> {
        self.client.bucket(&util::unique_name(tag))
    }

    fn root(&self) -> PathBuf {
        self.dir
            .lock()
            .unwrap()
            .as_ref()
            .map(|d| d.path().to_owned())
            .expect("server directory already removed")
    }

    fn spawn(&self) -> Result<()> {
        let root = self.root();
        let p = self.ports;
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .context("opening SeaweedFS log")?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-logtostderr=true")
            .arg("mini")
            .arg(format!("-dir={}", self.data_dir.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args([
                "-master.telemetry=false",
                "-admin.ui=false",
                "-webdav=false",
            ])
            .arg(format!("-s3.config={}", root.join("s3.json").display()))
            .arg(format!("-master.port={}", p.master))
            .arg(format!("-master.port.grpc={}", p.master_grpc))
            .arg(format!("-volume.port={}", p.volume))
            .arg(format!("-volume.port.grpc={}", p.volume_grpc))
            .arg(format!("-filer.port={}", p.filer))
            .arg(format!("-filer.port.grpc={}", p.filer_grpc))
            .arg(format!("-s3.port={}", p.s3))
            .arg(format!("-s3.port.grpc={}", p.s3_grpc))
            .arg(format!("-admin.port={}", p.admin))
            .arg(format!("-admin.port.grpc={}", p.admin_grpc))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            // Every bucket is a collection that grows several volumes; the default limit
            // (free disk / 128 MB) ran out on a full suite and PUTs failed with a 500.
            // Volumes are sparse files, so a high limit costs nothing.
            .arg("-volume.max=2000")
            .arg(format!(
                "-filer.localSocket={}",
                root.join("filer.sock").display()
            ))
            .arg(format!(
                "-s3.localSocket={}",
                root.join("s3.sock").display()
            ))
            .current_dir(&root)
            .env("NO_PROXY", util::NO_PROXY)
            .env("no_proxy", util::NO_PROXY)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // weed reads AWS_* (credentials turn on authentication): none of the caller's.
        for (name, _) in std::env::vars_os() {
            if name.as_encoded_bytes().starts_with(b"AWS_") {
                cmd.env_remove(name);
            }
        }
        // SAFETY: prctl is async-signal-safe; the server dies with the thread
        // that started it if the harness itself is killed.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))?;
        eprintln!(
            "e2e: SeaweedFS [{}] pid {} on {} (dir {})",
            self.label,
            child.id(),
            self.endpoint(),
            root.display()
        );
        *self.child.lock().unwrap() = Some(child);
        Ok(())
    }

    /// Poll ListBuckets, then prove a write/read round trip, within 60 s.
    fn wait_ready(&self) -> Result<()> {
        let start = Instant::now();
        let mut last = String::from("no attempt yet");
        while start.elapsed() < READY_TIMEOUT {
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("SeaweedFS [{}] exited early with {status}", self.label);
            }
            match self.probe_round_trip() {
                Ok(()) => {
                    eprintln!(
                        "e2e: SeaweedFS [{}] ready after {:.1?}",
                        self.label,
                        start.elapsed()
                    );
                    return Ok(());
                }
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!(
            "SeaweedFS [{}] not ready after {READY_TIMEOUT:?}; last error: {last}",
            self.label
        )
    }

    fn probe_round_trip(&self) -> Result<()> {
        self.probe.list_buckets()?;
        let bucket = self.probe.bucket("e2e-readiness-probe")?;
        bucket.put("probe", b"ok".to_vec())?;
        if bucket.get("probe")? != b"ok" {
            bail!("probe object read back wrong");
        }
        Ok(())
    }

    /// SIGKILL the server (a crash, as far as clients can tell) and reap it.
    pub fn kill(&self) -> Result<()> {
        let mut guard = self.child.lock().unwrap();
        let mut child = guard.take().context("SeaweedFS is not running")?;
        child.kill().context("killing SeaweedFS")?;
        child.wait().context("waiting for SeaweedFS")?;
        Ok(())
    }

    /// Start again on the same directory and ports, and wait until ready.
    pub fn restart(&self) -> Result<()> {
        if self.child.lock().unwrap().is_some() {
            bail!("SeaweedFS [{}] is still running", self.label);
        }
        self.spawn()?;
        self.wait_ready().inspect_err(|_| {
            eprintln!(
                "e2e: SeaweedFS [{}] did not come back; its log:\n{}",
                self.label,
                tail_file(&self.log_path, 200)
            )
        })
    }

    /// Stop the server (SIGTERM, 10 s grace, then SIGKILL), reap it, and remove
    /// its directory and the sockets it leaves in /tmp. Idempotent.
    pub fn shutdown(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let pid = child.id() as libc::pid_t;
            // SAFETY: the child is not reaped yet, so the PID is still ours.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(100))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        for port in self.ports.all() {
            remove_stale_sockets(port);
        }
        if let Some(dir) = self.dir.lock().unwrap().take() {
            if let Err(e) = dir.close() {
                eprintln!("e2e: removing SeaweedFS [{}] dir: {e}", self.label);
            }
        }
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn s3_config() -> String {
    format!(
        r#"{{"identities":[{{"name":"berth-e2e","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}},{{"name":"berth-e2e-list-only","credentials":[{{"accessKey":"{LIST_ONLY_ACCESS_KEY}","secretKey":"{LIST_ONLY_SECRET_KEY}"}}],"actions":["List"]}}]}}"#
    )
}

/// `weed` puts `seaweedfs-<component>-<port>.sock` files in /tmp that it
/// does not always remove; remove the ones that carry our ports.
fn remove_stale_sockets(port: u16) {
    let Ok(entries) = std::fs::read_dir("/tmp") else {
        return;
    };
    let suffix = format!("-{port}.sock");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("seaweedfs-") && name.ends_with(&suffix) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
