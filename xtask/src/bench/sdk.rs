//! The `bench_s3` example of the berth package: the AWS SDK's own view of the server, for
//! the peer matrix's uploads, its s3-sdk ceilings and the check that a write is complete in
//! the store.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::seaweed::{client_env, Seaweed};

pub struct Sdk {
    /// The `bench_s3` example binary.
    bin: PathBuf,
    endpoint: String,
}

impl Sdk {
    /// The helper `bin` against `server`.
    pub fn new(bin: &Path, server: &Seaweed) -> Sdk {
        Sdk {
            bin: bin.to_owned(),
            endpoint: server.endpoint.clone(),
        }
    }

    /// Runs the SDK helper and returns its stdout.
    pub fn tool(&self, args: &[&str]) -> Result<String> {
        let out = client_env(&mut Command::new(&self.bin), &self.endpoint)
            .args(args)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
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
}
