//! What a daemon volume is: its source, the `berth mount` options a client may set (one
//! vocabulary for the daemon, the CLI's `--socket` mode and the CSI plugin), its credentials,
//! the digest that names it, and the node's settings every volume's mount process gets.
//!
//! A volume is identified by a digest of its source, options and credentials, so two requests
//! for the same data with the same settings share one mount process (and one cache), and a
//! request with other credentials never reads through someone else's mount.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use crate::sys::files::{Fnv1a, NodeKey};

/// `berth mount` flags a client may set, taking a value (the CLI's `--socket` mode sends the
/// flags it is given from this list; see `crate::cli::client`).
pub const VALUE_OPTIONS: &[&str] = &[
    "endpoint-url",
    "region",
    "request-deadline",
    "metadata-ttl",
    "memory-limit",
    "part-size",
    "max-prefetch",
    "max-gets",
    "threads",
    "uid",
    "gid",
    "file-mode",
    "dir-mode",
    "cache-size",
    "cache-memory",
    "cache-io",
    "block-size",
];
/// `berth mount` switches a client may set ("true"/"false").
pub const FLAG_OPTIONS: &[&str] = &["read-only", "virtual-hosted"];
/// Secret keys and the environment variable each becomes in the mount process (and, in the
/// CLI's `--socket` mode, the variable each is read from).
pub const SECRET_ENV: &[(&str, &str)] = &[
    ("accessKeyId", "AWS_ACCESS_KEY_ID"),
    ("secretAccessKey", "AWS_SECRET_ACCESS_KEY"),
    ("sessionToken", "AWS_SESSION_TOKEN"),
];

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    Internal(String),
}

/// Credentials: never printed (Debug is redacted), only handed to a child's environment.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secrets(BTreeMap<String, String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Secrets({:?} redacted)",
            self.0.keys().collect::<Vec<_>>()
        )
    }
}

impl Secrets {
    pub fn parse(map: HashMap<String, String>) -> Result<Secrets, VolumeError> {
        for key in map.keys() {
            if !SECRET_ENV.iter().any(|(k, _)| k == key) {
                return Err(VolumeError::InvalidArgument(format!(
                    "unknown secret key {key:?} (known: accessKeyId, secretAccessKey, sessionToken)"
                )));
            }
        }
        Ok(Secrets(map.into_iter().collect()))
    }

    /// For the daemon's own table (`secrets.json`, mode 0600).
    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn env_pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        SECRET_ENV
            .iter()
            .filter_map(|(k, var)| self.0.get(*k).map(|v| (*var, v.as_str())))
    }
}

/// What makes two mounts the same volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeSpec {
    pub source: String,
    pub options: BTreeMap<String, String>,
    pub secrets: Secrets,
}

impl VolumeSpec {
    pub fn new(
        source: String,
        options: HashMap<String, String>,
        secrets: HashMap<String, String>,
    ) -> Result<VolumeSpec, VolumeError> {
        if source.is_empty() {
            return Err(VolumeError::InvalidArgument("source is required".into()));
        }
        crate::volume::Source::parse(&source)
            .map_err(|e| VolumeError::InvalidArgument(format!("{e:#}")))?;
        for (key, value) in &options {
            if FLAG_OPTIONS.contains(&key.as_str()) {
                if !matches!(value.as_str(), "true" | "false" | "") {
                    return Err(VolumeError::InvalidArgument(format!(
                        "option {key} takes true or false, not {value:?}"
                    )));
                }
            } else if !VALUE_OPTIONS.contains(&key.as_str()) {
                return Err(VolumeError::InvalidArgument(format!(
                    "unknown option {key:?} (known: {}, {})",
                    VALUE_OPTIONS.join(", "),
                    FLAG_OPTIONS.join(", ")
                )));
            } else if value.starts_with('-') || value.is_empty() {
                return Err(VolumeError::InvalidArgument(format!(
                    "option {key} has a bad value {value:?}"
                )));
            }
        }
        if let Some(url) = options.get("endpoint-url") {
            crate::volume::check_endpoint(url)
                .map_err(|e| VolumeError::InvalidArgument(format!("option endpoint-url: {e:#}")))?;
        }
        Ok(VolumeSpec {
            source,
            options: options.into_iter().collect(),
            secrets: Secrets::parse(secrets)?,
        })
    }

    /// The volume's name: an HMAC under the node's secret of everything that makes the
    /// volume. It is stable for the node, says nothing about the credentials to whoever reads
    /// it (ListVolumes, metrics, `<state-dir>/volumes/`), and cannot be forged: a caller
    /// cannot choose credentials whose volume takes the name of someone else's.
    pub fn key(&self, node: &NodeKey) -> String {
        let mut parts: Vec<&[u8]> = vec![b"berth volume v2", self.source.as_bytes()];
        for (k, v) in &self.options {
            parts.extend([b"o".as_slice(), k.as_bytes(), v.as_bytes()]);
        }
        for (k, v) in &self.secrets.0 {
            parts.extend([b"s".as_slice(), k.as_bytes(), v.as_bytes()]);
        }
        node.sign(parts)
    }

    /// The name berth versions before [`Self::key`] gave the volume (FNV-1a of the same
    /// fields): a restarted daemon still finds the volumes an older one recorded.
    pub fn legacy_key(&self) -> String {
        let mut h = Fnv1a::new();
        let mut eat = |s: &str| h = h.write(s.as_bytes()).write(&[0]);
        eat(&self.source);
        for (k, v) in &self.options {
            eat(k);
            eat(v);
        }
        for (k, v) in &self.secrets.0 {
            eat(k);
            eat(v);
        }
        format!("{:016x}", h.finish())
    }

    /// `berth mount` arguments after SOURCE MOUNTPOINT.
    pub fn args(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in &self.options {
            if FLAG_OPTIONS.contains(&k.as_str()) {
                if v != "false" {
                    out.push(format!("--{k}"));
                }
            } else {
                out.push(format!("--{k}"));
                out.push(v.clone());
            }
        }
        out
    }
}

/// Settings of the daemon that every mount process gets.
#[derive(Clone, Debug)]
pub struct NodeSettings {
    /// Names volumes (see [`VolumeSpec::key`]).
    pub node_key: NodeKey,
    /// Where share sockets may be (canonical): CreateShare refuses any other place.
    pub share_dirs: Vec<PathBuf>,
    /// Local directories a volume may serve (canonical); none: only s3:// sources.
    pub local_sources: Vec<PathBuf>,
    /// Who may connect to the volumes' vhost-user sockets.
    pub share_peers: crate::sys::sockets::Peers,
    pub berth_bin: PathBuf,
    pub state_dir: PathBuf,
    /// The node cache every mount process uses (`--cache-socket`), if the daemon has one.
    pub cache: Option<SharedCache>,
    /// `--on-exit keep`: the daemon's exit (or death) leaves volumes for its successor to
    /// restore; mount processes are killed without unmounting (see [`Registry::shutdown`]).
    pub keep_on_exit: bool,
}

/// The daemon's node cache, as its mount processes reach it.
#[derive(Clone)]
pub struct SharedCache {
    pub socket: PathBuf,
    pub server: Arc<crate::cache::node::CacheServer>,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("socket", &self.socket)
            .field("block_size", &self.server.block_size())
            .finish()
    }
}

impl NodeSettings {
    /// A local-directory source must be inside one of `--allow-local-source`: through the
    /// daemon, anyone who can reach its socket could otherwise serve `/` to a pod.
    pub fn check_source(&self, spec: &VolumeSpec) -> Result<(), VolumeError> {
        let Ok(crate::volume::Source::Local(dir)) = crate::volume::Source::parse(&spec.source)
        else {
            return Ok(());
        };
        let refused = || {
            VolumeError::PermissionDenied(format!(
                "local source {} is not inside a directory the daemon allows \
                 (`berth daemon --allow-local-source DIR`)",
                dir.display()
            ))
        };
        let canonical = dir.canonicalize().map_err(|_| refused())?;
        if self.local_sources.iter().any(|a| canonical.starts_with(a)) {
            Ok(())
        } else {
            Err(refused())
        }
    }

    /// A share socket must be inside one of `--share-dir` (checked on the path as given and
    /// on its parent once it exists, so a symlink cannot lead out).
    pub fn check_share_socket(&self, socket: &std::path::Path) -> Result<(), VolumeError> {
        let inside = |p: &std::path::Path| self.share_dirs.iter().any(|d| p.starts_with(d));
        let refused = || {
            VolumeError::PermissionDenied(format!(
                "share socket {} is not inside a share directory of the daemon \
                 (`berth daemon --share-dir DIR`: {})",
                socket.display(),
                self.share_dirs
                    .iter()
                    .map(|d| d.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        };
        if !inside(socket) {
            return Err(refused());
        }
        if let Some(parent) = socket.parent() {
            if let Ok(real) = parent.canonicalize() {
                if !inside(&real) {
                    return Err(refused());
                }
            }
        }
        Ok(())
    }

    /// With a node cache, its size and block size are the node's: a volume cannot bring its
    /// own (it would silently not apply, or could not share the cache's blocks).
    pub fn check_cache_options(&self, spec: &VolumeSpec) -> Result<(), VolumeError> {
        let Some(cache) = &self.cache else {
            return Ok(());
        };
        if spec.options.contains_key("cache-size") {
            return Err(VolumeError::InvalidArgument(
                "option cache-size: the node cache's size is set by `berth daemon --cache-size`; \
                 a volume cannot have its own"
                    .into(),
            ));
        }
        if let Some(text) = spec.options.get("block-size") {
            let node = cache.server.block_size();
            if crate::units::parse_size(text).ok() != Some(node) {
                return Err(VolumeError::InvalidArgument(format!(
                    "option block-size {text} differs from the node cache's block size {node} \
                     (`berth daemon --block-size`); every volume of a node cache uses its block size"
                )));
            }
        }
        Ok(())
    }
}

/// The options that say where the store is: the CSI plugin takes them from the volume handle
/// and the StorageClass, never from a volume context.
pub const LOCATION_OPTIONS: &[&str] = &["endpoint-url", "region"];

/// Whether `name` is a `berth mount` option a client may set (see [`VALUE_OPTIONS`] and
/// [`FLAG_OPTIONS`]).
pub fn is_option(name: &str) -> bool {
    VALUE_OPTIONS.contains(&name) || FLAG_OPTIONS.contains(&name)
}
#[cfg(test)]
mod tests {
    use super::*;

    fn spec(opts: &[(&str, &str)], secrets: &[(&str, &str)]) -> Result<VolumeSpec, VolumeError> {
        VolumeSpec::new(
            "s3://bucket/prefix".into(),
            opts.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secrets
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn options_become_flags_and_unknown_ones_are_refused() {
        let s = spec(&[("read-only", "true"), ("region", "eu-1")], &[]).unwrap();
        assert_eq!(s.args(), ["--read-only", "--region", "eu-1"]);
        assert!(matches!(
            spec(&[("cache-dir", "/etc")], &[]),
            Err(VolumeError::InvalidArgument(_))
        ));
        assert!(matches!(
            spec(&[("region", "--evil")], &[]),
            Err(VolumeError::InvalidArgument(_))
        ));
        assert!(matches!(
            spec(&[], &[("password", "x")]),
            Err(VolumeError::InvalidArgument(_))
        ));
    }

    #[test]
    fn the_key_depends_on_credentials_and_debug_hides_them() {
        let a = spec(&[], &[("accessKeyId", "AK"), ("secretAccessKey", "S1")]).unwrap();
        let b = spec(&[], &[("accessKeyId", "AK"), ("secretAccessKey", "S2")]).unwrap();
        let node = NodeKey::for_tests(7);
        assert_ne!(a.key(&node), b.key(&node));
        assert_eq!(a.key(&node), a.clone().key(&node));
        assert_ne!(
            a.key(&node),
            a.key(&NodeKey::for_tests(8)),
            "another node, another name"
        );
        assert_ne!(a.legacy_key(), b.legacy_key());
        let dbg = format!("{a:?}");
        assert!(!dbg.contains("S1"), "{dbg}");
    }
}
