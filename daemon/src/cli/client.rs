//! `berth --socket PATH <command>`: the CLI as a client of a running `berth daemon`.
//!
//! The subcommands keep their meaning, but the daemon does the work and owns the result:
//! `mount` -> MountVolume, `unmount` -> UnmountVolume, `status` -> ListVolumes + Stats,
//! `warm` -> Warm, `upgrade` -> Upgrade, `share` -> CreateShare, `unshare` -> RemoveShare.
//!
//! Flags become the request's options through the daemon's own allowlist
//! ([`crate::api::spec::VALUE_OPTIONS`] and [`FLAG_OPTIONS`]): a flag given on the command
//! line that the daemon does not take is refused here, before anything happens, rather than
//! dropped. Credentials come from the usual variables (AWS_ACCESS_KEY_ID, ...) and travel in
//! `secrets` only; nothing here prints or logs them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory as _};
use indicatif::HumanBytes;
use tonic::transport::Channel;

use super::args::{Cli, Command};
use crate::api::pb;
use crate::api::pb::daemon_client::DaemonClient;
use crate::api::spec::{FLAG_OPTIONS, SECRET_ENV, VALUE_OPTIONS};

use crate::unmount::absolute;

/// Runs `command` through the daemon at `socket`.
pub fn run(socket: &Path, command: Command, matches: &ArgMatches) -> anyhow::Result<()> {
    let (name, sub) = matches
        .subcommand()
        .ok_or_else(|| anyhow!("no subcommand given"))?;
    // Refuse before connecting: a wrong command line must not depend on the daemon's state.
    match &command {
        Command::Daemon(_) | Command::Engine(_) => bail!(
            "--socket before the subcommand names a daemon to talk to; `berth {name}` does not \
             talk to one (the daemon's own socket is `berth daemon --socket PATH`)"
        ),
        Command::Volumes(args) => {
            if given_on_command_line(sub, "socket") && args.socket != socket {
                bail!(
                    "two daemon sockets given: --socket {} and volumes --socket {}",
                    socket.display(),
                    args.socket.display()
                );
            }
            reachable(socket)?;
            return crate::api::print_volumes(socket);
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut d = Daemon::connect(socket)?;
        match command {
            Command::Mount(args) => d.mount(&args.source, &args.mountpoint, sub).await,
            Command::Unmount(args) => d.unmount(&args.target).await,
            Command::Status(args) => {
                refuse_flags(sub, name, &["mountpoint", "json"])?;
                d.status(args.mountpoint.as_deref(), args.json).await
            }
            Command::Warm(args) => {
                refuse_flags(sub, name, &["paths", "concurrency"])?;
                d.warm(&args.paths, args.concurrency).await
            }
            Command::Upgrade(args) => {
                refuse_flags(sub, name, &["mountpoint"])?;
                d.upgrade(args.mountpoint.as_deref()).await
            }
            Command::Share(args) => {
                let source = args.source.as_deref().ok_or_else(|| {
                    anyhow!(
                        "berth share --mount attaches a VM to a local `berth mount`; through a \
                         daemon, give SOURCE (the daemon serves it from the volume's engine)"
                    )
                })?;
                d.share(source, &args.socket, sub).await
            }
            Command::Unshare(args) => d.unshare(&args.vhost_socket).await,
            Command::Volumes(_) | Command::Daemon(_) | Command::Engine(_) => {
                bail!("berth {name} was handled above")
            }
        }
    })
}

fn given_on_command_line(m: &ArgMatches, id: &str) -> bool {
    m.value_source(id) == Some(ValueSource::CommandLine)
}

/// Connects once up front so that a dead socket gives one clear line, not a transport error.
fn reachable(socket: &Path) -> anyhow::Result<()> {
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => Ok(()),
        Err(e) => match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => Err(anyhow!(
                "no berth daemon listening on {} ({e})",
                socket.display()
            )),
            _ => Err(anyhow!(
                "cannot reach the berth daemon at {}: {e}",
                socket.display()
            )),
        },
    }
}

/// Fails if a flag other than `allowed` was typed: with --socket the daemon decides it
/// (its --state-dir, --cache-dir, the binary it upgrades to...).
fn refuse_flags(sub: &ArgMatches, command: &str, allowed: &[&str]) -> anyhow::Result<()> {
    let cmd = Cli::command();
    let Some(def) = cmd.find_subcommand(command) else {
        return Ok(());
    };
    for arg in def.get_arguments() {
        let id = arg.get_id().as_str();
        if allowed.contains(&id) || !given_on_command_line(sub, id) {
            continue;
        }
        let flag = arg.get_long().unwrap_or(id);
        bail!(
            "--{flag} cannot be used with --socket: the daemon decides it (berth {command} through a daemon takes {})",
            allowed
                .iter()
                .map(|a| match *a {
                    "mountpoint" | "paths" => a.to_uppercase(),
                    other => format!("--{}", other.replace('_', "-")),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// `berth share` flags CreateShare also takes (the daemon reads them in create_share,
/// daemon/src/api/service.rs) besides the mount options.
const SHARE_OPTIONS: &[&str] = &["request-queues", "queue-size"];

/// The request options for the flags of `berth mount`/`berth share` given on the command line
/// (or, for --endpoint-url and --region, in AWS_ENDPOINT_URL/AWS_REGION): the daemon's
/// allowlist decides what may go; anything else is refused here.
fn options_from_flags(
    sub: &ArgMatches,
    command: &str,
    positional: &[&str],
) -> anyhow::Result<HashMap<String, String>> {
    let cmd = Cli::command();
    let def = cmd
        .find_subcommand(command)
        .ok_or_else(|| anyhow!("berth has no {command} subcommand"))?;
    let mut options = HashMap::new();
    for arg in def.get_arguments() {
        let id = arg.get_id().as_str();
        if positional.contains(&id) {
            continue;
        }
        let source = sub.value_source(id);
        if !matches!(
            source,
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        ) {
            continue;
        }
        let Some(long) = arg.get_long() else { continue };
        let share_option = command == "share" && SHARE_OPTIONS.contains(&long);
        if FLAG_OPTIONS.contains(&long) {
            if sub.get_flag(id) {
                options.insert(long.to_string(), "true".to_string());
            }
        } else if VALUE_OPTIONS.contains(&long) || share_option {
            let value = sub
                .get_raw(id)
                .and_then(|mut v| v.next())
                .and_then(|v| v.to_str())
                .ok_or_else(|| anyhow!("--{long} needs a UTF-8 value"))?;
            options.insert(long.to_string(), value.to_string());
        } else if source == Some(ValueSource::CommandLine) {
            bail!(
                "--{long} cannot be sent to the daemon (it takes {}, {}; its own --state-dir and \
                 --cache-dir apply)",
                VALUE_OPTIONS
                    .iter()
                    .map(|o| format!("--{o}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                FLAG_OPTIONS
                    .iter()
                    .map(|o| format!("--{o}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    Ok(options)
}

/// Credentials from the environment, under the daemon's secret keys. Never printed.
fn secrets_from_env() -> HashMap<String, String> {
    SECRET_ENV
        .iter()
        .filter_map(|(key, var)| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .map(|v| (key.to_string(), v))
        })
        .collect()
}

/// `s3://...` as given; a local directory made absolute (the daemon has another cwd).
fn source_for_daemon(source: &str) -> String {
    if source.contains("://") {
        source.to_string()
    } else {
        absolute(Path::new(source)).display().to_string()
    }
}

/// gRPC code names as the gRPC spec spells them (FAILED_PRECONDITION, ...).
fn code_name(code: tonic::Code) -> String {
    let camel = format!("{code:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A daemon message on one line. A failed mount's message carries the mount's last log lines;
/// its own `berth: error:` line says what went wrong, and the daemon's log keeps the rest.
fn readable(message: &str) -> String {
    let message = message.trim();
    if !message.contains('\n') {
        return message.to_string();
    }
    let error = message
        .lines()
        .rev()
        .find_map(|l| l.trim_start().strip_prefix("berth: error:"));
    match error {
        Some(e) => format!(
            "{} (the daemon's log has the mount's whole output)",
            e.trim()
        ),
        None => message.replace('\n', "\n    "),
    }
}

/// The daemon at one socket.
struct Daemon {
    socket: PathBuf,
    client: DaemonClient<Channel>,
}

impl Daemon {
    /// Needs a tokio runtime (the channel's worker runs on it).
    fn connect(socket: &Path) -> anyhow::Result<Daemon> {
        reachable(socket)?;
        Ok(Daemon {
            socket: socket.to_path_buf(),
            client: crate::api::connect(socket)?,
        })
    }

    /// A failed call as one error: the gRPC code and the daemon's message.
    fn failed(&self, call: &str, s: tonic::Status) -> anyhow::Error {
        if s.code() == tonic::Code::Unavailable {
            return anyhow!(
                "no berth daemon listening on {} ({call}: {})",
                self.socket.display(),
                s.message()
            );
        }
        let message = readable(s.message());
        anyhow!(
            "the daemon at {} refused {call}: {} {message}",
            self.socket.display(),
            code_name(s.code())
        )
    }

    async fn volumes(&mut self) -> anyhow::Result<Vec<pb::VolumeInfo>> {
        match self.client.list_volumes(pb::ListVolumesRequest {}).await {
            Ok(r) => Ok(r.into_inner().volumes),
            Err(s) => Err(self.failed("ListVolumes", s)),
        }
    }

    async fn mount(&mut self, source: &str, target: &Path, sub: &ArgMatches) -> anyhow::Result<()> {
        let options = options_from_flags(sub, "mount", &["source", "mountpoint"])?;
        let target = absolute(target);
        let source = source_for_daemon(source);
        let request = pb::MountVolumeRequest {
            source: source.clone(),
            target_path: target.display().to_string(),
            options,
            secrets: secrets_from_env(),
            volume_id: format!("cli:{}", target.display()),
            read_only: false,
        };
        let resp = match self.client.mount_volume(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.failed("MountVolume", s)),
        };
        let how = if resp.shared {
            "already mounted: target added"
        } else {
            "new mount process"
        };
        println!(
            "berth: mounted {source} at {} through the daemon at {} (volume {}, {how})",
            target.display(),
            self.socket.display(),
            resp.volume
        );
        Ok(())
    }

    async fn unmount(&mut self, target: &Path) -> anyhow::Result<()> {
        let target = absolute(target);
        let request = pb::UnmountVolumeRequest {
            target_path: target.display().to_string(),
        };
        let resp = match self.client.unmount_volume(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.failed("UnmountVolume", s)),
        };
        let rest = if resp.stopped {
            "; that was the volume's last target, its mount process stopped"
        } else {
            ""
        };
        println!("berth: unmounted {}{rest}", target.display());
        Ok(())
    }

    async fn status(&mut self, target: Option<&Path>, json: bool) -> anyhow::Result<()> {
        let mut volumes = self.volumes().await?;
        if let Some(target) = target {
            let target = absolute(target).display().to_string();
            volumes.retain(|v| v.targets.contains(&target));
            if volumes.is_empty() {
                bail!(
                    "the daemon at {} has no volume mounted at {target}",
                    self.socket.display()
                );
            }
        }
        let stats = match self.client.stats(pb::StatsRequest {}).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.failed("Stats", s)),
        };
        if json {
            let doc = serde_json::json!({
                "volumes": volumes.iter().map(crate::api::volume_json).collect::<Vec<_>>(),
                "node": stats_json(&stats),
            });
            println!("{}", serde_json::to_string_pretty(&doc)?);
            return Ok(());
        }
        if volumes.is_empty() {
            println!(
                "berth: the daemon at {} has no volumes",
                self.socket.display()
            );
        }
        for v in &volumes {
            print!("{}", volume_text(v));
        }
        println!("{}", stats_text(&stats));
        Ok(())
    }

    async fn warm(&mut self, paths: &[String], concurrency: usize) -> anyhow::Result<()> {
        let volumes = self.volumes().await?;
        let targets: Vec<PathBuf> = volumes
            .iter()
            .flat_map(|v| v.targets.iter().map(PathBuf::from))
            .collect();
        // target -> paths below it (empty: the whole target)
        let mut work: Vec<(PathBuf, Vec<String>)> = Vec::new();
        for p in paths {
            if p.contains("://") {
                bail!("with --socket, warm paths inside a target of the daemon, not {p}");
            }
            let path = absolute(Path::new(p));
            let target = targets
                .iter()
                .filter(|t| path.starts_with(t))
                .max_by_key(|t| t.as_os_str().len())
                .ok_or_else(|| {
                    anyhow!(
                        "{} is not inside a volume of the daemon at {} (see berth --socket {} status)",
                        path.display(),
                        self.socket.display(),
                        self.socket.display()
                    )
                })?;
            let rel = path
                .strip_prefix(target)
                .map(|r| r.display().to_string())
                .unwrap_or_default();
            match work.iter_mut().find(|(t, _)| t == target) {
                Some((_, rels)) => rels.push(rel),
                None => work.push((target.clone(), vec![rel])),
            }
        }
        for (target, rels) in work {
            // An empty relative path is the whole target: the daemon warms everything then.
            let paths = if rels.iter().any(String::is_empty) {
                Vec::new()
            } else {
                rels
            };
            let request = pb::WarmRequest {
                target_path: target.display().to_string(),
                paths,
                concurrency: u32::try_from(concurrency).unwrap_or(u32::MAX),
            };
            let resp = match self.client.warm(request).await {
                Ok(r) => r.into_inner(),
                Err(s) => return Err(self.failed("Warm", s)),
            };
            println!("berth: warmed {} through the daemon", target.display());
            for line in resp.output.lines().filter(|l| !l.trim().is_empty()) {
                println!("  {line}");
            }
        }
        Ok(())
    }

    async fn upgrade(&mut self, target: Option<&Path>) -> anyhow::Result<()> {
        let target = target.map(absolute);
        let request = pb::UpgradeRequest {
            target_path: target
                .as_ref()
                .map(|t| t.display().to_string())
                .unwrap_or_default(),
        };
        let resp = match self.client.upgrade(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.failed("Upgrade", s)),
        };
        if resp.upgraded.is_empty() {
            println!("berth: the daemon has no volumes to upgrade");
            return Ok(());
        }
        // Name volumes by their targets: the daemon answers with its own mountpoints.
        let volumes = self.volumes().await.unwrap_or_default();
        for mp in &resp.upgraded {
            let targets = volumes
                .iter()
                .find(|v| &v.mountpoint == mp)
                .map(|v| v.targets.join(", "))
                .unwrap_or_default();
            println!("berth: upgraded the engine of {mp} (targets: {targets}) to the daemon's berth binary");
        }
        Ok(())
    }

    async fn share(
        &mut self,
        source: &str,
        vhost_socket: &Path,
        sub: &ArgMatches,
    ) -> anyhow::Result<()> {
        let options = options_from_flags(sub, "share", &["source", "socket"])?;
        let vhost_socket = absolute(vhost_socket);
        let source = source_for_daemon(source);
        let request = pb::CreateShareRequest {
            source: source.clone(),
            socket_path: vhost_socket.display().to_string(),
            options,
            secrets: secrets_from_env(),
            share_id: format!("cli:{}", vhost_socket.display()),
        };
        let resp = match self.client.create_share(request).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.failed("CreateShare", s)),
        };
        println!(
            "berth: sharing {source} over virtio-fs on {} through the daemon at {}",
            resp.socket_path,
            self.socket.display()
        );
        Ok(())
    }

    async fn unshare(&mut self, vhost_socket: &Path) -> anyhow::Result<()> {
        let vhost_socket = absolute(vhost_socket);
        let request = pb::RemoveShareRequest {
            socket_path: vhost_socket.display().to_string(),
        };
        if let Err(s) = self.client.remove_share(request).await {
            return Err(self.failed("RemoveShare", s));
        }
        println!(
            "berth: the share on {} is removed (or was not there)",
            vhost_socket.display()
        );
        Ok(())
    }
}

fn volume_text(v: &pb::VolumeInfo) -> String {
    let mut out = format!(
        "volume {} ({}): {}, pid {}, {} restarts, remount generation {}\n  source {}\n",
        v.volume, v.volume_id, v.state, v.pid, v.restarts, v.remount_generation, v.source
    );
    if !v.options.is_empty() {
        let mut opts: Vec<String> = v.options.iter().map(|(k, v)| format!("{k}={v}")).collect();
        opts.sort();
        out.push_str(&format!("  options {}\n", opts.join(" ")));
    }
    out.push_str(&format!("  targets {}\n", v.targets.join(", ")));
    if !v.shares.is_empty() {
        out.push_str(&format!("  virtio-fs shares {}\n", v.shares.join(", ")));
    }
    if !v.last_error.is_empty() {
        out.push_str(&format!(
            "  last error: {}\n",
            v.last_error.trim().replace('\n', "\n    ")
        ));
    }
    match serde_json::from_str::<crate::status::MountStatus>(&v.status_json) {
        Ok(st) => {
            for line in crate::status::human(&st).lines() {
                out.push_str(&format!("  {line}\n"));
            }
        }
        Err(_) => out.push_str("  (the mount has not reported its status yet)\n"),
    }
    out
}

fn stats_text(s: &pb::StatsResponse) -> String {
    let mut text = format!(
        "node: {} volumes, {} targets, {} shares, {} restarts; memory {} used; cache {} memory hits, {} disk hits, {} misses; {} from the store",
        s.volumes,
        s.targets,
        s.shares,
        s.restarts,
        HumanBytes(s.memory_used),
        s.cache_memory_hits,
        s.cache_disk_hits,
        s.cache_misses,
        HumanBytes(s.bytes_from_store)
    );
    if s.cache_capacity_bytes > 0 {
        text.push_str(&format!(
            "; node cache {} blocks in {}, {} evictions",
            s.cache_blocks,
            HumanBytes(s.cache_capacity_bytes),
            s.cache_evictions
        ));
    }
    text
}

fn stats_json(s: &pb::StatsResponse) -> serde_json::Value {
    serde_json::json!({
        "volumes": s.volumes, "targets": s.targets, "shares": s.shares,
        "restarts": s.restarts, "memory_used": s.memory_used,
        "cache_memory_hits": s.cache_memory_hits, "cache_disk_hits": s.cache_disk_hits,
        "cache_misses": s.cache_misses, "bytes_from_store": s.bytes_from_store,
        "cache_blocks": s.cache_blocks, "cache_capacity_bytes": s.cache_capacity_bytes,
        "cache_evictions": s.cache_evictions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::FromArgMatches as _;

    fn parse(args: &[&str]) -> (Cli, ArgMatches) {
        let m = Cli::command().try_get_matches_from(args).unwrap();
        (Cli::from_arg_matches(&m).unwrap(), m)
    }

    fn mount_options(args: &[&str]) -> anyhow::Result<HashMap<String, String>> {
        let (_, m) = parse(args);
        let (_, sub) = m.subcommand().unwrap();
        options_from_flags(sub, "mount", &["source", "mountpoint"])
    }

    #[test]
    fn given_flags_become_options_and_defaults_do_not() {
        let o = mount_options(&[
            "berth",
            "--socket",
            "/d",
            "mount",
            "s3://b",
            "/m",
            "--endpoint-url",
            "http://127.0.0.1:1",
            "--read-only",
            "--memory-limit",
            "2GiB",
        ])
        .unwrap();
        assert_eq!(
            o.get("endpoint-url").map(String::as_str),
            Some("http://127.0.0.1:1")
        );
        assert_eq!(o.get("read-only").map(String::as_str), Some("true"));
        // As typed, not as parsed: the daemon's `berth mount` parses it again.
        assert_eq!(o.get("memory-limit").map(String::as_str), Some("2GiB"));
        assert!(!o.contains_key("part-size"), "{o:?}");
        assert!(!o.contains_key("virtual-hosted"), "{o:?}");
    }

    #[test]
    fn flags_the_daemon_does_not_take_are_refused() {
        for flag in [
            &["--cache-dir", "/x"][..],
            &["--state-dir", "/x"],
            &["--no-ebpf"],
        ] {
            let mut args = vec!["berth", "--socket", "/d", "mount", "s3://b", "/m"];
            args.extend_from_slice(flag);
            let err = mount_options(&args).unwrap_err().to_string();
            assert!(err.contains(flag[0]), "{err}");
        }
        let (_, m) = parse(&["berth", "--socket", "/d", "upgrade", "/m", "--binary", "/b"]);
        let (name, sub) = m.subcommand().unwrap();
        let err = refuse_flags(sub, name, &["mountpoint"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--binary"), "{err}");
        let (_, m) = parse(&["berth", "--socket", "/d", "status", "/m", "--json"]);
        let (name, sub) = m.subcommand().unwrap();
        refuse_flags(sub, name, &["mountpoint", "json"]).unwrap();
    }

    #[test]
    fn codes_are_spelled_as_in_grpc() {
        assert_eq!(
            code_name(tonic::Code::FailedPrecondition),
            "FAILED_PRECONDITION"
        );
        assert_eq!(code_name(tonic::Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(tonic::Code::Internal), "INTERNAL");
    }

    #[test]
    fn a_mount_log_in_a_message_is_cut_to_its_error_line() {
        let m = "berth mount of s3://x failed: 2026 DEBUG one\n  two\nberth: error: bucket \"x\" does not exist";
        assert_eq!(
            readable(m),
            "bucket \"x\" does not exist (the daemon's log has the mount's whole output)"
        );
        assert_eq!(
            readable("target_path is required"),
            "target_path is required"
        );
        assert_eq!(readable("a\nb"), "a\n    b");
    }

    #[test]
    fn a_dead_socket_says_no_daemon_is_listening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let err = reachable(&path).unwrap_err().to_string();
        assert!(err.contains("no berth daemon listening on"), "{err}");
        // A socket file nobody listens on any more: refused.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let err = reachable(&path).unwrap_err().to_string();
        assert!(err.contains("no berth daemon listening on"), "{err}");
    }

    #[test]
    fn local_sources_are_made_absolute() {
        assert_eq!(source_for_daemon("s3://b/p"), "s3://b/p");
        assert!(Path::new(&source_for_daemon("data")).is_absolute());
    }
}
