//! deploy-check: renders every kustomization under deploy/ with `kubectl kustomize` and
//! checks each object against the Kubernetes API types (k8s-openapi): it must deserialize,
//! and serializing it back must keep every field (so a misspelt or misplaced field, which
//! Kubernetes would drop or reject, fails here).
//!
//! kubectl is found as $BERTH_KUBECTL, `<repo>/.tools/venv/bin/kubectl` or `kubectl` on PATH;
//! without it the check is skipped (failed under BERTH_E2E_REQUIRE=1).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use k8s_openapi::api;
use libtest_mimic::{Arguments, Completion, Failed, Trial};
use serde_json::Value;

const RENDERED: &[&str] = &["overlays/standard", "overlays/serverless", "examples"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("csi lives in the repository")
        .to_path_buf()
}

fn kubectl() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("BERTH_KUBECTL") {
        return Ok(PathBuf::from(p));
    }
    let venv = repo().join(".tools/venv/bin/kubectl");
    let candidates = std::iter::once(venv).chain(
        std::env::var_os("PATH")
            .map(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("kubectl"))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default(),
    );
    for c in candidates {
        let works = Command::new(&c)
            .args(["kustomize", "--help"])
            .output()
            .is_ok_and(|o| o.status.success());
        if works {
            return Ok(c);
        }
    }
    Err("no kubectl with `kustomize` (set BERTH_KUBECTL or run `cargo xtask setup`)".into())
}

fn main() -> ExitCode {
    let args = Arguments::from_args();
    let strict = std::env::var("BERTH_E2E_REQUIRE").is_ok_and(|v| v == "1");
    let kubectl = kubectl();
    let mut trials = Vec::new();
    for dir in RENDERED {
        let name = format!("deploy_{}_renders_valid_objects", dir.replace('/', "_"));
        trials.push(match &kubectl {
            Ok(bin) => {
                let bin = bin.clone();
                Trial::test(name, move || {
                    check(&bin, dir).map_err(|e| Failed::from(format!("{e:#}")))
                })
            }
            Err(why) if strict => {
                let why = why.clone();
                Trial::test(name, move || {
                    Err(Failed::from(format!(
                        "requirement missing and BERTH_E2E_REQUIRE=1: {why}"
                    )))
                })
            }
            Err(why) => {
                let why = why.clone();
                Trial::ignorable_test(name, move || Ok(Completion::ignored_with(why)))
                    .with_ignored_flag(true)
            }
        });
    }
    libtest_mimic::run(&args, trials).exit_code()
}

fn check(kubectl: &Path, dir: &str) -> Result<()> {
    let out = Command::new(kubectl)
        .arg("kustomize")
        .arg(repo().join("deploy").join(dir))
        .output()
        .context("running kubectl kustomize")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let mut n = 0;
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: Value = serde::Deserialize::deserialize(doc).context("parsing rendered YAML")?;
        if value.is_null() {
            continue;
        }
        validate(&value).with_context(|| {
            format!(
                "{dir}: {} {}",
                value["kind"].as_str().unwrap_or("?"),
                value["metadata"]["name"].as_str().unwrap_or("?")
            )
        })?;
        n += 1;
    }
    if n == 0 {
        bail!("{dir} rendered no objects");
    }
    eprintln!("deploy-check: {dir}: {n} objects valid");
    Ok(())
}

/// Deserializes into the typed object and back; every field of the input must survive.
fn roundtrip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<()> {
    let typed: T = serde_json::from_value(v.clone()).context("does not match the API type")?;
    let back = serde_json::to_value(&typed)?;
    contained(v, &back, "")
}

fn contained(want: &Value, got: &Value, path: &str) -> Result<()> {
    match (want, got) {
        (Value::Object(w), Value::Object(g)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match g.get(k) {
                    Some(gv) => contained(wv, gv, &p)?,
                    None if wv.is_null() => {}
                    None => bail!("field {p} is not part of the API type (misspelt or misplaced?)"),
                }
            }
            Ok(())
        }
        (Value::Array(w), Value::Array(g)) if w.len() == g.len() => {
            for (i, (wv, gv)) in w.iter().zip(g).enumerate() {
                contained(wv, gv, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (w, g) if w == g => Ok(()),
        // Numbers and strings that the type reads as the other (e.g. quantities).
        (Value::Number(w), Value::String(g)) if w.to_string() == *g => Ok(()),
        (w, g) => bail!("field {path}: {w} became {g}"),
    }
}

fn validate(v: &Value) -> Result<()> {
    let kind = v["kind"].as_str().context("no kind")?;
    match kind {
        "Namespace" => roundtrip::<api::core::v1::Namespace>(v),
        "ServiceAccount" => roundtrip::<api::core::v1::ServiceAccount>(v),
        "Secret" => roundtrip::<api::core::v1::Secret>(v),
        "Pod" => roundtrip::<api::core::v1::Pod>(v),
        "PersistentVolume" => roundtrip::<api::core::v1::PersistentVolume>(v),
        "PersistentVolumeClaim" => roundtrip::<api::core::v1::PersistentVolumeClaim>(v),
        "ClusterRole" => roundtrip::<api::rbac::v1::ClusterRole>(v),
        "ClusterRoleBinding" => roundtrip::<api::rbac::v1::ClusterRoleBinding>(v),
        "Role" => roundtrip::<api::rbac::v1::Role>(v),
        "RoleBinding" => roundtrip::<api::rbac::v1::RoleBinding>(v),
        "CSIDriver" => roundtrip::<api::storage::v1::CSIDriver>(v),
        "StorageClass" => roundtrip::<api::storage::v1::StorageClass>(v),
        "DaemonSet" => roundtrip::<api::apps::v1::DaemonSet>(v),
        "Deployment" => roundtrip::<api::apps::v1::Deployment>(v),
        "RuntimeClass" => roundtrip::<api::node::v1::RuntimeClass>(v),
        other => bail!("kind {other} is not known to the check (add it)"),
    }
}
