//! SeaweedFS (`weed mini`) on loopback, the one S3 server of vm-test and the benches, and
//! the environment of every process xtask starts that is an S3 server or talks to one.
//!
//! The server gets an explicit free port for every listener, as the e2e tests start it,
//! and is either open (no identities: any request is accepted, signed or not, so vm-test
//! reads objects back without signing) or has one identity with [`ACCESS_KEY`] and
//! [`SECRET_KEY`] (the bench). Objects are seeded through the filer's HTTP API (S3 buckets
//! are directories under /buckets), so xtask itself needs no S3 signing.
//!
//! weed, berth and the peers all read `AWS_*` from their environment: a caller's
//! credentials or endpoint would turn on authentication in weed or sign requests with the
//! wrong keys. [`isolate`] and [`client_env`] give every such process only what the
//! harness means.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub const ACCESS_KEY: &str = "berthbenchaccess";
pub const SECRET_KEY: &str = "berthbenchsecretkey0123456789";
pub const REGION: &str = "us-east-1";
pub const NO_PROXY: &str = "127.0.0.1,localhost";
/// What AWS_CONFIG_FILE and AWS_SHARED_CREDENTIALS_FILE point at: a file that does not
/// exist, below a directory only root could create.
const NO_AWS_FILE: &str = "/nonexistent/berth-xtask-no-aws-file";
/// CA bundles besides AWS_CA_BUNDLE: they mean nothing to a plain-http loopback endpoint,
/// but rclone refuses to start with one (LoadCustomCABundleError).
const CA_BUNDLE_VARS: [&str; 2] = ["CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE"];
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// The flags of the listeners, in the order of [`Seaweed::ports`].
const PORT_FLAGS: [&str; 10] = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
];
const FILER: usize = 4;
const S3: usize = 6;

/// Who may use the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No identities: any request is accepted, signed or not.
    Open,
    /// One identity, [`ACCESS_KEY`] / [`SECRET_KEY`] (an s3.json), allowed everything.
    Keys,
}

/// A running `weed mini`; killed, and its sockets in /tmp removed, when dropped.
pub struct Seaweed {
    child: Option<Child>,
    pub endpoint: String,
    pub log: PathBuf,
    ports: Vec<u16>,
}

impl Seaweed {
    /// Starts `weed mini` with its data, log and sockets in `dir`, and waits until `ready`
    /// succeeds (it is called every 250 ms for up to a minute).
    pub fn start(
        weed: &Path,
        dir: &Path,
        access: Access,
        mut ready: impl FnMut(&Seaweed) -> Result<()>,
    ) -> Result<Seaweed> {
        let data = dir.join("weed-data");
        std::fs::create_dir_all(&data)?;
        // Hold every listener until all are chosen so no port is handed out twice.
        let listeners = (0..PORT_FLAGS.len())
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("finding free ports")?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(listeners);
        let log = dir.join("weed.log");
        let out = File::create(&log)?;
        let mut cmd = Command::new(weed);
        cmd.arg("-logtostderr=true")
            .arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args([
                "-master.telemetry=false",
                "-admin.ui=false",
                "-webdav=false",
            ]);
        if access == Access::Keys {
            let config = dir.join("s3.json");
            std::fs::write(
                &config,
                format!(
                    r#"{{"identities":[{{"name":"berth-bench","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
                ),
            )?;
            cmd.arg(format!("-s3.config={}", config.display()));
        }
        for (flag, port) in PORT_FLAGS.iter().zip(&ports) {
            cmd.arg(format!("-{flag}={port}"));
        }
        cmd.args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!(
                "-filer.localSocket={}",
                dir.join("filer.sock").display()
            ))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()));
        let child = isolate(&mut cmd)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", weed.display()))?;
        let mut server = Seaweed {
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{}", ports[S3]),
            log,
            ports,
        };
        let started = Instant::now();
        let mut last = String::new();
        while started.elapsed() < READY_TIMEOUT {
            if let Some(status) = server
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "SeaweedFS exited early ({status}); log: {}",
                    server.log.display()
                );
            }
            match ready(&server) {
                Ok(()) => return Ok(server),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        bail!("SeaweedFS not ready after {READY_TIMEOUT:?}: {last}")
    }

    /// An [`Access::Open`] server, ready once its filer takes a write.
    pub fn open(weed: &Path, dir: &Path) -> Result<Seaweed> {
        Seaweed::start(weed, dir, Access::Open, |s| s.put("probe", "ready", b"ok"))
    }

    /// Stores `key` in `bucket` (creating the bucket) through the filer.
    pub fn put(&self, bucket: &str, key: &str, body: &[u8]) -> Result<()> {
        let (status, _) = http(
            self.ports[FILER],
            "PUT",
            &format!("/buckets/{bucket}/{key}"),
            body,
        )?;
        if !(200..300).contains(&status) {
            bail!("PUT {bucket}/{key}: HTTP {status}");
        }
        Ok(())
    }

    /// Reads `key` through the S3 API, unsigned (an [`Access::Open`] server), `None` if
    /// absent.
    pub fn get(&self, bucket: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let (status, body) = http(self.ports[S3], "GET", &format!("/{bucket}/{key}"), &[])?;
        match status {
            200 => Ok(Some(body)),
            404 => Ok(None),
            other => bail!("GET {bucket}/{key}: HTTP {other}"),
        }
    }

    /// [`client_env`] for this server.
    pub fn client_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        client_env(cmd, &self.endpoint)
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL is fine: the data directory is thrown away with the run.
            let _ = child.kill();
            let _ = child.wait();
        }
        // `weed` leaves seaweedfs-<component>-<port>.sock files in /tmp.
        if let Ok(entries) = std::fs::read_dir("/tmp") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with("seaweedfs-")
                    && self
                        .ports
                        .iter()
                        .any(|p| name.ends_with(&format!("-{p}.sock")))
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// The SeaweedFS version `weed version` prints.
pub fn version(weed: &Path) -> Option<String> {
    let out = Command::new(weed).arg("version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .map(str::to_owned)
}

/// The environment of a process that is an S3 server or talks to one, without credentials:
/// none of the caller's `AWS_*` variables (nor its CA bundles), no AWS config or
/// credentials file, no instance metadata, and no proxy for loopback.
pub fn isolate(cmd: &mut Command) -> &mut Command {
    isolate_from(cmd, std::env::vars_os().map(|(name, _)| name))
}

/// [`isolate`], then the test credentials, `endpoint` and the region.
pub fn client_env<'a>(cmd: &'a mut Command, endpoint: &str) -> &'a mut Command {
    isolate(cmd)
        .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("AWS_ENDPOINT_URL", endpoint)
        .env("AWS_REGION", REGION)
}

/// [`isolate`] with the caller's variable names given.
fn isolate_from(cmd: &mut Command, inherited: impl IntoIterator<Item = OsString>) -> &mut Command {
    for name in inherited {
        if name.as_encoded_bytes().starts_with(b"AWS_") {
            cmd.env_remove(name);
        }
    }
    for var in CA_BUNDLE_VARS {
        cmd.env_remove(var);
    }
    cmd.env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", NO_AWS_FILE)
        .env("AWS_SHARED_CREDENTIALS_FILE", NO_AWS_FILE)
        .env("NO_PROXY", NO_PROXY)
        .env("no_proxy", NO_PROXY)
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ffi::OsStr;

    use super::*;

    /// What `cmd` changes in the environment it inherits: name -> new value (None: removed).
    fn changes(cmd: &Command) -> BTreeMap<String, Option<String>> {
        cmd.get_envs()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.map(|v| v.to_string_lossy().into_owned()),
                )
            })
            .collect()
    }

    #[test]
    fn isolate_removes_every_inherited_aws_variable() {
        let inherited = [
            "AWS_FOO",
            "AWS_PROFILE",
            "AWS_CA_BUNDLE",
            "HOME",
            "AWSX",
            "XAWS_Y",
        ];
        let mut cmd = Command::new("true");
        isolate_from(&mut cmd, inherited.map(OsString::from));
        let env = changes(&cmd);
        for gone in ["AWS_FOO", "AWS_PROFILE", "AWS_CA_BUNDLE", "CURL_CA_BUNDLE"] {
            assert_eq!(env.get(gone), Some(&None), "{gone}");
        }
        for kept in ["HOME", "AWSX", "XAWS_Y"] {
            assert!(!env.contains_key(kept), "{kept} must be left alone");
        }
        let set = |k: &str| env.get(k).cloned().flatten();
        assert_eq!(set("AWS_EC2_METADATA_DISABLED").as_deref(), Some("true"));
        assert_eq!(set("AWS_CONFIG_FILE").as_deref(), Some(NO_AWS_FILE));
        assert_eq!(
            set("AWS_SHARED_CREDENTIALS_FILE").as_deref(),
            Some(NO_AWS_FILE)
        );
        assert_eq!(set("NO_PROXY").as_deref(), Some(NO_PROXY));
        assert!(!Path::new(NO_AWS_FILE).exists());
    }

    #[test]
    fn client_env_sets_only_the_harness_credentials() {
        let mut cmd = Command::new("true");
        client_env(&mut cmd, "http://127.0.0.1:9");
        let set: BTreeMap<_, _> = cmd
            .get_envs()
            .filter_map(|(k, v)| Some((k, v?)))
            .filter(|(k, _)| k.as_encoded_bytes().starts_with(b"AWS_"))
            .collect();
        let want: BTreeMap<&OsStr, &OsStr> = [
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
            ("AWS_CONFIG_FILE", NO_AWS_FILE),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:9"),
            ("AWS_REGION", REGION),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
            ("AWS_SHARED_CREDENTIALS_FILE", NO_AWS_FILE),
        ]
        .into_iter()
        .map(|(k, v)| (OsStr::new(k), OsStr::new(v)))
        .collect();
        assert_eq!(set, want);
    }

    /// The real thing: this test runs itself again in a child that inherits fake AWS_*
    /// variables; there, `env` started through [`client_env`] must not see them.
    #[test]
    fn a_child_started_with_client_env_inherits_no_aws_variable() {
        const PROBE: &str = "XTASK_AWS_SCRUB_PROBE";
        if std::env::var_os(PROBE).is_none() {
            let exe = std::env::current_exe().expect("test binary path");
            // libtest names tests without the crate: seaweed::tests::NAME.
            let path = module_path!().split_once("::").map_or("", |(_, p)| p);
            let name = format!("{path}::a_child_started_with_client_env_inherits_no_aws_variable");
            let out = Command::new(exe)
                .args(["--exact", &name, "--test-threads=1"])
                .env(PROBE, "1")
                .env("AWS_FOO", "caller")
                .env("AWS_ACCESS_KEY_ID", "caller")
                .env("AWS_SESSION_TOKEN", "caller")
                .output()
                .expect("running the test binary");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "{text}");
            assert!(text.contains("1 passed"), "the probe did not run: {text}");
            return;
        }
        assert_eq!(std::env::var("AWS_FOO").as_deref(), Ok("caller"));
        let out = client_env(&mut Command::new("env"), "http://127.0.0.1:9")
            .output()
            .expect("running env");
        let env = String::from_utf8_lossy(&out.stdout);
        let aws: Vec<&str> = env.lines().filter(|l| l.starts_with("AWS_")).collect();
        assert!(!env.contains("caller"), "{aws:?}");
        let key = format!("AWS_ACCESS_KEY_ID={ACCESS_KEY}");
        assert!(aws.contains(&key.as_str()), "{aws:?}");
        assert_eq!(aws.len(), 7, "{aws:?}");
    }
}
