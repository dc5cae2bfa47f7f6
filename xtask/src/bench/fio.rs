//! fio jobs and the parsing of fio's JSON output.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// What one fio run read: totals over all jobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FioResult {
    pub bytes_per_sec: f64,
    pub iops: f64,
}

impl FioResult {
    pub fn mib_per_sec(&self) -> f64 {
        self.bytes_per_sec / (1u64 << 20) as f64
    }
}

/// A read job over an existing file.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ReadJob {
    pub random: bool,
    pub block: u64,
    pub jobs: u32,
    /// Random jobs run this long; sequential jobs stop after it at the latest.
    pub seconds: u32,
}

impl ReadJob {
    /// fio arguments for a file of `size` bytes. Sequential jobs split the file into one
    /// stripe per job (`offset_increment`), so 4 jobs read the file once, not four times.
    /// O_DIRECT keeps the kernel page cache out, so warm reads hit each system's own cache.
    pub fn args(&self, file: &Path, size: u64) -> Vec<String> {
        let mut a = vec![
            "--name=berth-bench".to_owned(),
            format!("--filename={}", file.display()),
            "--direct=1".to_owned(),
            "--ioengine=psync".to_owned(),
            "--group_reporting".to_owned(),
            "--output-format=json".to_owned(),
            format!("--bs={}", self.block),
            format!("--numjobs={}", self.jobs),
            format!("--runtime={}", self.seconds),
        ];
        if self.random {
            a.push("--rw=randread".to_owned());
            a.push(format!("--size={size}"));
            a.push("--time_based".to_owned());
        } else {
            let stripe = (size / self.jobs as u64) / self.block * self.block;
            a.push("--rw=read".to_owned());
            a.push(format!("--size={stripe}"));
            a.push(format!("--offset_increment={stripe}"));
        }
        a
    }
}

/// Runs a read job and returns what it read.
pub fn read(file: &Path, size: u64, job: &ReadJob) -> Result<FioResult> {
    let out = Command::new("fio")
        .args(job.args(file, size))
        .output()
        .context("running fio (apt-get install fio)")?;
    if !out.status.success() {
        bail!(
            "fio on {} failed ({}): {}",
            file.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse(&String::from_utf8_lossy(&out.stdout), "read")
}

/// Sums `bw_bytes` and `iops` of the `dir` ("read"/"write") section over every job in fio's
/// JSON output. fio may print warnings before the JSON, so parsing starts at the first `{`.
pub fn parse(text: &str, dir: &str) -> Result<FioResult> {
    let start = text.find('{').context("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&text[start..]).context("fio output is not JSON")?;
    let jobs = v
        .get("jobs")
        .and_then(Value::as_array)
        .context("fio JSON has no jobs")?;
    if jobs.is_empty() {
        bail!("fio JSON has an empty jobs list");
    }
    let mut total = FioResult {
        bytes_per_sec: 0.0,
        iops: 0.0,
    };
    for job in jobs {
        if let Some(err) = job.get("error").and_then(Value::as_i64).filter(|e| *e != 0) {
            bail!("fio job failed with error {err}");
        }
        let section = job
            .get(dir)
            .with_context(|| format!("fio job has no {dir} section"))?;
        let num = |k: &str| {
            section
                .get(k)
                .and_then(Value::as_f64)
                .with_context(|| format!("fio {dir} section has no {k}"))
        };
        total.bytes_per_sec += num("bw_bytes")?;
        total.iops += num("iops")?;
    }
    Ok(total)
}

pub fn version() -> Option<String> {
    let out = Command::new("fio").arg("--version").output().ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_group_reported_json_after_warnings() {
        let text = r#"fio: note: both iodepth >= 1 and synchronous I/O engine are selected
{
  "fio version" : "fio-3.33",
  "jobs" : [
    {
      "jobname" : "berth-bench", "error" : 0,
      "read" : { "io_bytes" : 1073741824, "bw_bytes" : 536870912, "iops" : 512.000000 },
      "write" : { "io_bytes" : 0, "bw_bytes" : 0, "iops" : 0.000000 }
    }
  ]
}"#;
        let r = parse(text, "read").unwrap();
        assert_eq!(r.bytes_per_sec, 536870912.0);
        assert_eq!(r.iops, 512.0);
        assert_eq!(r.mib_per_sec(), 512.0);
    }

    #[test]
    fn sums_jobs_reported_separately() {
        let text = r#"{"jobs":[{"error":0,"read":{"bw_bytes":100,"iops":1.5}},{"error":0,"read":{"bw_bytes":50,"iops":0.5}}]}"#;
        assert_eq!(
            parse(text, "read").unwrap(),
            FioResult {
                bytes_per_sec: 150.0,
                iops: 2.0
            }
        );
    }

    #[test]
    fn rejects_failed_or_empty_output() {
        assert!(parse("fio: file not found", "read").is_err());
        assert!(parse(r#"{"jobs":[]}"#, "read").is_err());
        assert!(parse(
            r#"{"jobs":[{"error":5,"read":{"bw_bytes":1,"iops":1}}]}"#,
            "read"
        )
        .is_err());
        assert!(parse(r#"{"jobs":[{"error":0}]}"#, "read").is_err());
    }

    #[test]
    fn sequential_jobs_read_one_stripe_each() {
        let job = ReadJob {
            random: false,
            block: 1 << 20,
            jobs: 4,
            seconds: 30,
        };
        let args = job.args(Path::new("/m/f"), (1 << 30) + 5);
        assert!(args.contains(&"--size=268435456".to_owned()));
        assert!(args.contains(&"--offset_increment=268435456".to_owned()));
        assert!(!args.contains(&"--time_based".to_owned()));
        let rand = ReadJob {
            random: true,
            ..job
        };
        assert!(rand
            .args(Path::new("/m/f"), 1 << 30)
            .contains(&"--time_based".to_owned()));
    }
}
