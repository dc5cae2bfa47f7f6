//! SeaweedFS (`weed mini`) on loopback for the bench, started the way the e2e tests start it
//! (explicit free ports, an s3.json identity), and the `bench_s3` SDK helper that talks to it.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const ACCESS_KEY: &str = "berthbenchaccess";
pub const SECRET_KEY: &str = "berthbenchsecretkey0123456789";
pub const NO_PROXY: &str = "127.0.0.1,localhost";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Seaweed {
    child: Option<Child>,
    pub endpoint: String,
    pub log: PathBuf,
    ports: Vec<u16>,
    /// The `bench_s3` example binary.
    tool: PathBuf,
}

impl Seaweed {
    /// Starts `weed mini` with its data in `dir` and waits until `bucket` can be created.
    pub fn start(weed: &Path, tool: &Path, dir: &Path, bucket: &str) -> Result<Seaweed> {
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::write(
            dir.join("s3.json"),
            format!(
                r#"{{"identities":[{{"name":"berth-bench","credentials":[{{"accessKey":"{ACCESS_KEY}","secretKey":"{SECRET_KEY}"}}],"actions":["Admin","Read","Write","List","Tagging"]}}]}}"#
            ),
        )?;
        // Hold every listener until all are chosen so no port is handed out twice.
        let listeners = (0..10)
            .map(|_| TcpListener::bind("127.0.0.1:0"))
            .collect::<std::io::Result<Vec<_>>>()
            .context("finding free ports")?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<std::io::Result<Vec<_>>>()?;
        drop(listeners);
        let names = [
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
        let log = dir.join("weed.log");
        let out = File::create(&log)?;
        let mut cmd = Command::new(weed);
        cmd.arg("-logtostderr=true")
            .arg("mini")
            .arg(format!("-dir={}", dir.join("data").display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
            .args([
                "-master.telemetry=false",
                "-admin.ui=false",
                "-webdav=false",
            ])
            .arg(format!("-s3.config={}", dir.join("s3.json").display()))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .arg(format!(
                "-filer.localSocket={}",
                dir.join("filer.sock").display()
            ))
            .arg(format!("-s3.localSocket={}", dir.join("s3.sock").display()));
        for (name, port) in names.iter().zip(&ports) {
            cmd.arg(format!("-{name}={port}"));
        }
        let child = cmd
            .current_dir(dir)
            .env("NO_PROXY", NO_PROXY)
            .env("no_proxy", NO_PROXY)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", weed.display()))?;
        let mut server = Seaweed {
            child: Some(child),
            endpoint: format!("http://127.0.0.1:{}", ports[6]),
            log,
            ports,
            tool: tool.to_owned(),
        };
        server.wait_ready(bucket)?;
        Ok(server)
    }

    fn wait_ready(&mut self, bucket: &str) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < READY_TIMEOUT {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "SeaweedFS exited early ({status}); log: {}",
                    self.log.display()
                );
            }
            match self.tool(&["mb", bucket]) {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("{e:#}"),
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        bail!("SeaweedFS not ready after {READY_TIMEOUT:?}: {last}")
    }

    /// Environment every S3 client of the bench gets (berth, peers, the SDK helper).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("NO_PROXY", NO_PROXY.to_owned()),
            ("no_proxy", NO_PROXY.to_owned()),
        ]
    }

    /// Runs the SDK helper and returns its stdout.
    pub fn tool(&self, args: &[&str]) -> Result<String> {
        let mut cmd = Command::new(&self.tool);
        for var in super::peers::CA_BUNDLE_VARS {
            cmd.env_remove(var);
        }
        let out = cmd
            .args(args)
            .envs(self.env())
            .output()
            .with_context(|| format!("running {}", self.tool.display()))?;
        if !out.status.success() {
            bail!(
                "bench_s3 {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Runs a measuring subcommand of the SDK helper and reads one field of its JSON.
    pub fn measure(&self, args: &[&str], field: &str) -> Result<f64> {
        let out = self.tool(args)?;
        let v: Value =
            serde_json::from_str(&out).with_context(|| format!("bench_s3 printed {out:?}"))?;
        v.get(field)
            .and_then(Value::as_f64)
            .with_context(|| format!("bench_s3 output has no {field}: {out}"))
    }

    pub fn shutdown(&mut self) {
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

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub fn version(weed: &Path) -> Option<String> {
    let out = Command::new(weed).arg("version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find(|w| w.contains('.') && w.chars().all(|c| c.is_ascii_digit() || c == '.'))
        .map(str::to_owned)
}
