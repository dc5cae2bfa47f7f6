//! A node under test: `berth daemon` + `berth-csi --mode all` on sockets in a temp dir whose
//! root is a shared mount (like the kubelet directory), with their logs captured to files.
//! berth-csi may talk to the test SeaweedFS only (`--allowed-endpoint`), unless a test says
//! otherwise ([`CsiOptions`]).

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use berth_csi::pb;
use tonic::transport::Channel;

use crate::util::rt;

/// The `berth` binary: BERTH_BIN, else next to this test in the target directory.
pub fn berth_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BERTH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/release/deps/csi_e2e-HASH -> target/release/berth
    exe.parent()
        .and_then(Path::parent)
        .map(|d| d.join("berth"))
        .unwrap_or_default()
}

pub fn missing_binaries() -> Vec<String> {
    let mut out = Vec::new();
    if !berth_bin().is_file() {
        out.push(format!(
            "berth binary not found at {} (build it: cargo build --release -p berth, or set BERTH_BIN)",
            berth_bin().display()
        ));
    }
    if !Path::new("/usr/bin/unshare").exists() && !Path::new("/bin/unshare").exists() {
        out.push("unshare (util-linux) not found".into());
    }
    out
}

pub struct Node {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
    daemon: Option<Child>,
    csi: Option<Child>,
    pub daemon_socket: PathBuf,
    pub csi_socket: PathBuf,
    pub metrics_port: u16,
    allowed_endpoints: Vec<String>,
}

/// How berth-csi is started.
#[derive(Default)]
pub struct CsiOptions {
    /// Extra environment (set after the caller's AWS_* variables are removed).
    pub env: Vec<(String, OsString)>,
    /// The `--allowed-endpoint` values; None: the test SeaweedFS's endpoint.
    pub allowed_endpoints: Option<Vec<String>>,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn spawn(cmd: &mut Command, log: &Path, env: Vec<(String, OsString)>) -> Result<Child> {
    // No AWS_* of the caller's: the mounts' credentials are the volumes' secrets.
    for (name, _) in std::env::vars_os() {
        if name.as_encoded_bytes().starts_with(b"AWS_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", log.with_file_name("no-aws-config"))
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            log.with_file_name("no-aws-credentials"),
        )
        // The test's own, after the removal (a test may give AWS_* on purpose).
        .envs(env);
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .env("RUST_LOG", "debug,h2=info,hyper=info,tower=info,aws=info");
    // SAFETY: prctl is async-signal-safe; children die with the test.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("spawning {cmd:?}"))
}

/// Waits until `child` accepts connections on `path`; its log is the error if it exits first.
fn wait_socket(path: &Path, child: &mut Child, log: &Path) -> Result<()> {
    crate::util::wait_listening("server", path, Duration::from_secs(30), || {
        let status = child.try_wait().ok().flatten()?;
        Some(format!(
            "{status}: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        ))
    })
}

fn sh(args: &[&str]) -> Result<()> {
    let st = Command::new(args[0]).args(&args[1..]).status()?;
    if !st.success() {
        bail!("{args:?} failed: {st}");
    }
    Ok(())
}

impl Node {
    pub fn start(tag: &str) -> Result<Node> {
        Node::start_with(tag, |_| Vec::new())
    }

    /// Like [`Node::start`], with extra environment for berth-csi, made from the node's
    /// directory.
    pub fn start_with(
        tag: &str,
        csi_env: impl FnOnce(&Path) -> Vec<(String, PathBuf)>,
    ) -> Result<Node> {
        Node::start_opts(tag, |dir| CsiOptions {
            env: csi_env(dir)
                .into_iter()
                .map(|(k, v)| (k, v.into_os_string()))
                .collect(),
            allowed_endpoints: None,
        })
    }

    /// Like [`Node::start`], with berth-csi started as `csi` says (made from the node's
    /// directory).
    pub fn start_opts(tag: &str, csi: impl FnOnce(&Path) -> CsiOptions) -> Result<Node> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("berth-csi-{tag}-"))
            .tempdir()?;
        let dir = tmp.path().canonicalize()?;
        // A shared mount, as the kubelet directory is: mounts made below it propagate to
        // mount namespaces created from it with slave propagation (HostToContainer).
        sh(&[
            "mount",
            "--bind",
            &dir.display().to_string(),
            &dir.display().to_string(),
        ])?;
        sh(&["mount", "--make-rshared", &dir.display().to_string()])?;
        let daemon_socket = dir.join("daemon.sock");
        let csi_socket = dir.join("csi.sock");
        let metrics_port = free_port()?;
        let mut node = Node {
            _tmp: tmp,
            daemon: None,
            csi: None,
            daemon_socket: daemon_socket.clone(),
            csi_socket: csi_socket.clone(),
            metrics_port,
            dir: dir.clone(),
            allowed_endpoints: Vec::new(),
        };
        let daemon_log = dir.join("daemon.log");
        let mut daemon = spawn(
            Command::new(berth_bin())
                .arg("daemon")
                .arg("--socket")
                .arg(&daemon_socket)
                .arg("--state-dir")
                .arg(dir.join("state"))
                .arg("--cache-dir")
                .arg(dir.join("cache"))
                // The node's own directory holds the tests' local sources and share sockets.
                .arg("--allow-local-source")
                .arg(&dir)
                .arg("--share-dir")
                .arg(&dir)
                .arg("--metrics-addr")
                .arg(format!("127.0.0.1:{metrics_port}")),
            &daemon_log,
            Vec::new(),
        )?;
        let ready = wait_socket(&daemon_socket, &mut daemon, &daemon_log);
        node.daemon = Some(daemon);
        ready.context("berth daemon")?;
        let opts = csi(&dir);
        node.allowed_endpoints = match opts.allowed_endpoints {
            Some(list) => list,
            None => vec![crate::server()?.endpoint()],
        };
        node.start_csi(opts.env)?;
        Ok(node)
    }

    /// Starts berth-csi (`--mode all`) on the node's sockets, its log appended to csi.log.
    fn start_csi(&mut self, env: Vec<(String, OsString)>) -> Result<()> {
        let csi_log = self.dir.join("csi.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_berth-csi"));
        for url in &self.allowed_endpoints {
            cmd.arg("--allowed-endpoint").arg(url);
        }
        let mut csi = spawn(
            cmd.arg("--endpoint")
                .arg(format!("unix://{}", self.csi_socket.display()))
                .arg("--node-id")
                .arg("test-node")
                .arg("--daemon-socket")
                .arg(&self.daemon_socket)
                .arg("--mode")
                .arg("all")
                .arg("--recovery-interval-ms")
                .arg("200")
                .args(["--kube-events", "false"]),
            &csi_log,
            env,
        )?;
        let ready = wait_socket(&self.csi_socket, &mut csi, &csi_log);
        self.csi = Some(csi);
        ready.context("berth-csi")
    }

    /// Stops berth-csi (SIGTERM), as a plugin container restart does; see [`Node::start_csi_again`].
    pub fn stop_csi(&mut self) {
        if let Some(mut child) = self.csi.take() {
            crate::util::terminate(&mut child);
        }
    }

    /// Starts berth-csi again (without extra environment, with the same allowlist) after
    /// [`Node::stop_csi`].
    pub fn start_csi_again(&mut self) -> Result<()> {
        self.start_csi(Vec::new())
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    pub fn logs(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.join("csi.log")).unwrap_or_default());
        s
    }

    pub fn channel(&self) -> Result<Channel> {
        let socket = self.csi_socket.clone();
        let _guard = rt().enter();
        Ok(
            tonic::transport::Endpoint::try_from("http://[::1]:1")?.connect_with_connector_lazy(
                tower::service_fn(move |_| {
                    let socket = socket.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(socket).await?,
                        ))
                    }
                }),
            ),
        )
    }

    pub fn node(&self) -> Result<pb::node_client::NodeClient<Channel>> {
        Ok(pb::node_client::NodeClient::new(self.channel()?))
    }

    pub fn controller(&self) -> Result<pb::controller_client::ControllerClient<Channel>> {
        Ok(pb::controller_client::ControllerClient::new(
            self.channel()?,
        ))
    }

    pub fn identity(&self) -> Result<pb::identity_client::IdentityClient<Channel>> {
        Ok(pb::identity_client::IdentityClient::new(self.channel()?))
    }

    pub fn daemon(&self) -> Result<berth::api::pb::daemon_client::DaemonClient<Channel>> {
        let _guard = rt().enter();
        berth::api::connect(&self.daemon_socket)
    }

    /// Stops berth-csi and the daemon (which unmounts what is left), then undoes the shared
    /// mount. Returns the captured logs.
    pub fn stop(&mut self) -> String {
        for mut child in [self.csi.take(), self.daemon.take()].into_iter().flatten() {
            crate::util::terminate(&mut child);
        }
        let logs = self.logs();
        // Anything still mounted below the directory (a failed test).
        berth::sys::mounts::unmount_below(&self.dir);
        logs
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Not stopped by the test: it failed; show what the daemon and plugin said.
        let failed = self.daemon.is_some();
        let logs = self.stop();
        if failed {
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("--- logs of the failed node (last 60 lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

pub fn mount_cap(mode: pb::volume_capability::access_mode::Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(
            pb::volume_capability::MountVolume::default(),
        )),
        access_mode: Some(pb::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// The gRPC code of a call that must fail.
pub fn code<T: std::fmt::Debug>(
    what: &str,
    r: std::result::Result<T, tonic::Status>,
) -> Result<tonic::Code> {
    match r {
        Ok(v) => bail!("{what}: succeeded ({v:?}) but must fail"),
        Err(s) => Ok(s.code()),
    }
}

pub fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: std::result::Result<T, tonic::Status>,
    want: tonic::Code,
) -> Result<()> {
    let got = code(what, r)?;
    if got != want {
        bail!("{what}: got {got:?}, want {want:?}");
    }
    Ok(())
}

/// Reads a file from a new mount namespace made (with slave propagation) *before* `publish`
/// runs, so the file is only visible if the mount propagated (HostToContainer).
pub fn read_in_other_namespace(
    path: &Path,
    publish: impl FnOnce() -> Result<()>,
) -> Result<String> {
    let mut child = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "slave",
            "sh",
            "-c",
            "read go; cat \"$0\"",
        ])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("unshare")?;
    // Let the namespace exist before the mount is made.
    std::thread::sleep(Duration::from_millis(300));
    let published = publish();
    {
        use std::io::Write;
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"go\n");
        }
    }
    let out = child.wait_with_output()?;
    published?;
    if !out.status.success() {
        bail!(
            "reading {} in another mount namespace: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
