//! `berth upgrade MOUNTPOINT [--binary PATH]`: asks the mount's holder to replace its engine;
//! [`ask`] is how any client talks to a holder's control socket.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use anyhow::{bail, Context as _};

use super::holder::{control_socket, ControlReply, ControlRequest};

pub fn run(mountpoint: &Path, binary: Option<&Path>, state_dir: &Path) -> anyhow::Result<()> {
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| format!("{} does not exist", mountpoint.display()))?;
    let binary = match binary {
        Some(b) => Some(
            b.canonicalize()
                .with_context(|| format!("new engine binary {}", b.display()))?,
        ),
        None => None,
    };
    let reply = ask(state_dir, &mountpoint, &ControlRequest::Upgrade { binary })?;
    if !reply.ok {
        bail!(
            "upgrade of {} failed: {}",
            mountpoint.display(),
            reply.message
        );
    }
    println!(
        "berth: upgraded {}: engine generation {} serving; applications stalled {} ms",
        mountpoint.display(),
        reply.generation,
        reply.stall_ms
    );
    Ok(())
}

/// Sends `request` to the holder of `mountpoint` and waits for its answer.
pub fn ask(
    state_dir: &Path,
    mountpoint: &Path,
    request: &ControlRequest,
) -> anyhow::Result<ControlReply> {
    let path = control_socket(state_dir, mountpoint);
    let conn = UnixStream::connect(&path).with_context(|| {
        format!(
            "no berth holder for {} (cannot connect to {}; is --state-dir the one the mount uses?)",
            mountpoint.display(),
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    (&conn).write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(&conn)
        .read_line(&mut answer)
        .context("waiting for the holder's answer")?;
    serde_json::from_str(answer.trim()).context("the holder's answer is not understood")
}
