//! `cargo xtask image`: the berth container image as an OCI archive, built without a
//! container daemon and without network, from the binaries of the workspace's test build
//! (the same `berth` and `berth-csi` every test ran).
//!
//! The image holds the two binaries without their debug info (kept beside the archive in
//! `<name>.debug/` as separate debug files, linked by `.gnu_debuglink`), the shared libraries
//! they load (found with `ldd`, copied from this machine with the symlinks that lead to
//! them), the CA certificates, and a minimal `/etc`. One layer, a gzipped tar written with
//! fixed owners and times, so two builds of the same binaries give the same digests.
//! The archive is an OCI image layout in a tar: `ctr images import`, `podman load` and
//! `kind load image-archive` take it. `--check` unpacks it with umoci (which verifies every
//! digest) and runs the entrypoint's `--version` and `berth-csi --version` in the unpacked
//! root under `unshare --root`.
//!
//! The `Containerfile` at the repository root builds the same content with a container
//! engine (multi-stage, from source); this command is for machines without one.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};

use crate::berth;
use crate::setup::ensure_apt;
use crate::sh::{on_path, output, repo_root, run_cmd, target_dir, tempdir};

/// What the image is called unless `--name` says otherwise (what deploy/base names).
pub const DEFAULT_NAME: &str = "berth:latest";
/// The user the image runs as by default; the node DaemonSet's containers ask for root.
const USER: &str = "65532:65532";
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

struct Args {
    out: PathBuf,
    name: String,
    check: bool,
}

fn parse(rest: &[String]) -> Result<Args> {
    let mut args = Args {
        out: target_dir().join("berth-image.tar"),
        name: DEFAULT_NAME.to_string(),
        check: false,
    };
    let mut iter = rest.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--out" => args.out = PathBuf::from(iter.next().context("--out needs a FILE")?),
            "--name" => args.name = iter.next().context("--name needs NAME:TAG")?.clone(),
            "--check" => args.check = true,
            other => {
                bail!("unknown argument {other:?} to `cargo xtask image`; see `cargo xtask --help`")
            }
        }
    }
    ensure!(
        args.name
            .rsplit_once(':')
            .is_some_and(|(n, t)| !n.is_empty() && !t.is_empty() && !t.contains('/')),
        "--name takes NAME:TAG (e.g. {DEFAULT_NAME}), not {:?}",
        args.name
    );
    Ok(args)
}

pub fn run(rest: &[String]) -> Result<()> {
    let args = parse(rest)?;
    for tool in ["objcopy", "ldd", "tar", "gzip", "sha256sum"] {
        ensure!(
            on_path(tool),
            "`cargo xtask image` needs {tool} (binutils, libc-bin, tar, gzip, coreutils)"
        );
    }
    ensure!(
        Path::new(CA_BUNDLE).is_file(),
        "no {CA_BUNDLE} (apt-get install ca-certificates)"
    );
    let build = berth::build(false)?;
    let csi = build
        .berth_csi
        .clone()
        .context("cargo reported no berth-csi binary from the test build")?;
    let work = tempdir("berth-image")?;
    let root = work.0.join("rootfs");
    let debug_dir = debug_dir(&args.out);
    std::fs::create_dir_all(&debug_dir)?;
    for bin in [&build.berth, &csi] {
        install_binary(bin, &root, &debug_dir)?;
    }
    base_files(&root)?;
    let layout = work.0.join("layout");
    let summary = write_layout(&root, &layout, &args.name)?;
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    run_cmd(
        Command::new("tar")
            .args([
                "--sort=name",
                "--mtime=@0",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
            ])
            .arg("-cf")
            .arg(&args.out)
            .arg("-C")
            .arg(&layout)
            .args(["oci-layout", "index.json", "blobs"]),
    )?;
    println!(
        "image: {} -> {} (layer {:.1} MiB, {:.1} MiB compressed; manifest {})",
        args.name,
        args.out.display(),
        summary.layer_bytes as f64 / 1048576.0,
        summary.compressed_bytes as f64 / 1048576.0,
        summary.manifest_digest
    );
    println!(
        "image: debug info of the binaries in {}",
        debug_dir.display()
    );
    if args.check {
        check(&args.out, &args.name)?;
    }
    Ok(())
}

/// `<out>.debug` beside the archive: the separate debug files.
fn debug_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".debug");
    out.with_file_name(name)
}

/// Copies `bin` into `root`/usr/bin without debug info (kept in `debug_dir`), with every
/// shared library it loads.
fn install_binary(bin: &Path, root: &Path, debug_dir: &Path) -> Result<()> {
    let name = bin.file_name().context("binary without a name")?;
    let debug = debug_dir.join(format!("{}.debug", name.to_string_lossy()));
    run_cmd(
        Command::new("objcopy")
            .arg("--only-keep-debug")
            .arg(bin)
            .arg(&debug),
    )?;
    let dest = root.join("usr/bin").join(name);
    std::fs::create_dir_all(dest.parent().context("usr/bin")?)?;
    run_cmd(
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(format!("--add-gnu-debuglink={}", debug.display()))
            .arg(bin)
            .arg(&dest),
    )?;
    for lib in shared_libraries(bin)? {
        copy_path(&lib, root)?;
    }
    Ok(())
}

/// The files `ldd` says `bin` loads (the dynamic loader included), as absolute paths.
fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let text = output(Command::new("ldd").arg(bin))?;
    Ok(parse_ldd(&text))
}

/// `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and `/lib64/ld-linux-x86-64.so.2
/// (0x...)`; the vDSO has no file.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, right)) => right.trim(),
                None => line,
            };
            let path = path.split_whitespace().next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Copies the file at host path `path` into `root` at the same path, recreating every
/// symlink on the way (a merged-/usr `/lib` link, a `libc.so.6` link) so that the path
/// resolves in the image as it does here.
fn copy_path(path: &Path, root: &Path) -> Result<()> {
    let mut host = PathBuf::from("/");
    let parts: Vec<_> = path.components().skip(1).collect();
    for (i, part) in parts.iter().enumerate() {
        host.push(part);
        let inside = root.join(host.strip_prefix("/")?);
        let meta =
            std::fs::symlink_metadata(&host).with_context(|| format!("{}", host.display()))?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host)?;
            if std::fs::symlink_metadata(&inside).is_err() {
                std::os::unix::fs::symlink(&target, &inside)
                    .with_context(|| format!("linking {}", inside.display()))?;
            }
            // Go on from where the link leads (relative to the link's directory).
            let resolved = host.parent().unwrap_or(Path::new("/")).join(&target);
            let rest: PathBuf = parts[i + 1..].iter().collect();
            return copy_path(&normalize(&resolved.join(rest)), root);
        }
        if i + 1 == parts.len() {
            if !inside.exists() {
                std::fs::copy(&host, &inside)
                    .with_context(|| format!("copying {}", host.display()))?;
            }
        } else if !inside.exists() {
            std::fs::create_dir(&inside)?;
        }
    }
    Ok(())
}

/// `a/b/../c` -> `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// `/etc` (users, name service, CA certificates), `/tmp` and the directories berth uses.
fn base_files(root: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let write = |rel: &str, text: &str| -> Result<()> {
        let path = root.join(rel);
        std::fs::create_dir_all(path.parent().context("a file in /")?)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    };
    write("etc/passwd", "root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")?;
    write("etc/group", "root:x:0:\nnonroot:x:65532:\n")?;
    write("etc/nsswitch.conf", "hosts: files dns\n")?;
    let certs = root.join(CA_BUNDLE.trim_start_matches('/'));
    std::fs::create_dir_all(certs.parent().context("certs dir")?)?;
    std::fs::copy(CA_BUNDLE, &certs)?;
    for dir in [
        "tmp",
        "run/berth",
        "var/lib/berth",
        "var/cache/berth",
        "home/nonroot",
        "root",
    ] {
        std::fs::create_dir_all(root.join(dir))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

struct Summary {
    layer_bytes: u64,
    compressed_bytes: u64,
    manifest_digest: String,
}

/// Writes an OCI image layout of `root` (one layer) to `layout`, tagged `name`.
fn write_layout(root: &Path, layout: &Path, name: &str) -> Result<Summary> {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let layer_tar = layout.join("layer.tar");
    let epoch = source_date_epoch();
    run_cmd(
        Command::new("tar")
            .args([
                "--sort=name",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--format=gnu",
            ])
            .arg(format!("--mtime=@{epoch}"))
            .arg("-cf")
            .arg(&layer_tar)
            .arg("-C")
            .arg(root)
            .arg("."),
    )?;
    let diff_id = sha256(&layer_tar)?;
    let layer_bytes = std::fs::metadata(&layer_tar)?.len();
    run_cmd(Command::new("gzip").args(["-n", "-6"]).arg(&layer_tar))?;
    let gz = layout.join("layer.tar.gz");
    let layer_digest = sha256(&gz)?;
    let compressed_bytes = std::fs::metadata(&gz)?.len();
    std::fs::rename(&gz, blobs.join(&layer_digest))?;

    let (repo, tag) = name.rsplit_once(':').context("NAME:TAG")?;
    let version =
        output(Command::new(root.join("usr/bin/berth")).arg("--version")).unwrap_or_default();
    let revision = output(
        Command::new("git")
            .arg("-C")
            .arg(repo_root())
            .args(["rev-parse", "HEAD"]),
    )
    .unwrap_or_default();
    let created = iso8601(epoch);
    let config = json!({
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": USER,
            "Entrypoint": ["/usr/bin/berth"],
            "Cmd": ["--help"],
            "Env": [
                "PATH=/usr/bin:/bin",
                format!("SSL_CERT_FILE={CA_BUNDLE}"),
            ],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "berth",
                "org.opencontainers.image.version": version,
                "org.opencontainers.image.revision": revision,
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{diff_id}")]},
        "history": [{"created": created, "created_by": "cargo xtask image"}],
    });
    let config_desc = write_blob(&blobs, "application/vnd.oci.image.config.v1+json", &config)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": format!("sha256:{layer_digest}"),
            "size": compressed_bytes,
        }],
    });
    let mut manifest_desc = write_blob(
        &blobs,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest,
    )?;
    let manifest_digest = manifest_desc["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    manifest_desc["platform"] = json!({"architecture": "amd64", "os": "linux"});
    manifest_desc["annotations"] = json!({
        // containerd (ctr import, kind load) names the image from this one,
        "io.containerd.image.name": full_reference(repo, tag),
        // umoci and podman look the tag up here.
        "org.opencontainers.image.ref.name": tag,
    });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [manifest_desc],
    });
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    Ok(Summary {
        layer_bytes,
        compressed_bytes,
        manifest_digest,
    })
}

/// `berth:latest` -> `docker.io/library/berth:latest`: how Kubernetes spells the `image:`
/// of deploy/base once normalised, so that a kubelet finds the imported image.
fn full_reference(repo: &str, tag: &str) -> String {
    let first = repo.split('/').next().unwrap_or_default();
    let has_registry =
        repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    match (has_registry, repo.contains('/')) {
        (true, _) => format!("{repo}:{tag}"),
        (false, true) => format!("docker.io/{repo}:{tag}"),
        (false, false) => format!("docker.io/library/{repo}:{tag}"),
    }
}

/// Writes `doc` as a blob; its descriptor.
fn write_blob(blobs: &Path, media_type: &str, doc: &Value) -> Result<Value> {
    let bytes = serde_json::to_vec(doc)?;
    let tmp = blobs.join("blob.tmp");
    std::fs::write(&tmp, &bytes)?;
    let digest = sha256(&tmp)?;
    std::fs::rename(&tmp, blobs.join(&digest))?;
    Ok(json!({"mediaType": media_type, "digest": format!("sha256:{digest}"), "size": bytes.len()}))
}

fn sha256(path: &Path) -> Result<String> {
    let out = output(Command::new("sha256sum").arg(path))?;
    let digest = out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    ensure!(digest.len() == 64, "sha256sum printed {out:?}");
    Ok(digest)
}

/// The commit time of HEAD (reproducible builds), or 0 outside a git checkout.
fn source_date_epoch() -> u64 {
    if let Some(epoch) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return epoch;
    }
    output(
        Command::new("git")
            .arg("-C")
            .arg(repo_root())
            .args(["log", "-1", "--format=%ct"]),
    )
    .ok()
    .and_then(|t| t.parse().ok())
    .unwrap_or(0)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (UTC).
fn iso8601(epoch: u64) -> String {
    let (days, secs) = (epoch / 86400, epoch % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Unpacks the archive with umoci (digests verified) and runs the entrypoint with
/// `--version`, and `berth-csi --version`, inside the unpacked root.
fn check(archive: &Path, name: &str) -> Result<()> {
    ensure_apt(&["umoci"]).context("`cargo xtask image --check` needs umoci")?;
    ensure!(on_path("umoci"), "umoci is installed but not on PATH");
    let work = tempdir("berth-image-check")?;
    let layout = work.0.join("layout");
    std::fs::create_dir_all(&layout)?;
    run_cmd(
        Command::new("tar")
            .arg("-xf")
            .arg(archive)
            .arg("-C")
            .arg(&layout),
    )?;
    let (_, tag) = name.rsplit_once(':').context("NAME:TAG")?;
    let bundle = work.0.join("bundle");
    run_cmd(
        Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:{tag}", layout.display()))
            .arg(&bundle),
    )?;
    let runtime: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json"))?)?;
    let entrypoint: Vec<String> = runtime["process"]["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    ensure!(
        entrypoint.first().map(String::as_str) == Some("/usr/bin/berth"),
        "the image's entrypoint is {entrypoint:?}, not /usr/bin/berth"
    );
    let rootfs = bundle.join("rootfs");
    for program in ["/usr/bin/berth", "/usr/bin/berth-csi"] {
        let out = output(
            Command::new("unshare")
                .arg(format!("--root={}", rootfs.display()))
                .args([program, "--version"])
                .env_clear()
                .env("PATH", "/usr/bin:/bin"),
        )
        .with_context(|| format!("running {program} --version in the image"))?;
        let name = program.rsplit('/').next().unwrap_or(program);
        ensure!(
            out.split_whitespace().next() == Some(name),
            "{program} --version printed {out:?}"
        );
        println!("image: ok {program} --version in the unpacked image: {out}");
    }
    let debug = std::fs::read_dir(debug_dir(archive))?.count();
    ensure!(debug == 2, "{debug} debug files beside the archive, not 2");
    println!(
        "image: ok {} is a valid OCI image (umoci unpack)",
        archive.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines_give_the_files_loaded() {
        let text = "\tlinux-vdso.so.1 (0x00007f)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }

    #[test]
    fn names_are_normalised_as_kubernetes_does() {
        assert_eq!(
            full_reference("berth", "latest"),
            "docker.io/library/berth:latest"
        );
        assert_eq!(
            full_reference("acme/berth", "1.0"),
            "docker.io/acme/berth:1.0"
        );
        assert_eq!(
            full_reference("registry.example.com/berth", "1"),
            "registry.example.com/berth:1"
        );
        assert_eq!(
            full_reference("localhost:5000/berth", "dev"),
            "localhost:5000/berth:dev"
        );
        assert!(parse(&["--name".into(), "berth".into()]).is_err());
        assert!(parse(&["--name".into(), "reg:5000/berth".into()]).is_err());
    }

    #[test]
    fn dates_are_utc() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(1_796_601_600), "2026-12-07T00:00:00Z");
        assert_eq!(iso8601(951_782_400 + 3661), "2000-02-29T01:01:01Z");
    }
}
