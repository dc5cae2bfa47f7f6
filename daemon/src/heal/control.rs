//! A holder's control socket (`<state-dir>/holders/<hash>.sock`, see [`crate::state`]): one
//! JSON request per connection, one JSON reply. `berth upgrade`, `berth share --mount` and the
//! node daemon talk to a running mount through it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::state;

/// How long a client may take to send its request line.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request line accepted (they are a few hundred bytes).
const MAX_REQUEST: u64 = 64 << 10;

/// A request on a mount's control socket.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ControlRequest {
    Upgrade {
        binary: Option<PathBuf>,
    },
    /// Serve the mount's volume to VMMs on a vhost-user socket (idempotent).
    AddShare {
        socket: PathBuf,
        request_queues: usize,
        queue_size: u16,
        /// A group whose processes may connect to it besides root.
        #[serde(default)]
        group: Option<u32>,
    },
    /// Stop serving a share (idempotent).
    RemoveShare {
        socket: PathBuf,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ControlReply {
    pub ok: bool,
    pub message: String,
    pub generation: u64,
    pub stall_ms: u64,
}

impl ControlReply {
    /// A reply from a result, with no stall to report.
    pub fn from_result(result: anyhow::Result<String>, generation: u64) -> ControlReply {
        let (ok, message) = match result {
            Ok(message) => (true, message),
            Err(e) => (false, format!("{e:#}")),
        };
        ControlReply {
            ok,
            message,
            generation,
            stall_ms: 0,
        }
    }
}

/// Sends `request` to the holder of `mountpoint` and waits for its answer.
pub fn ask(
    state_dir: &Path,
    mountpoint: &Path,
    request: &ControlRequest,
) -> anyhow::Result<ControlReply> {
    let path = state::control_socket(state_dir, mountpoint);
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

/// Reads the one request of a control connection (holder side).
pub fn read_request(conn: &UnixStream) -> anyhow::Result<ControlRequest> {
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(std::io::Read::take(conn, MAX_REQUEST)).read_line(&mut line)?;
    serde_json::from_str(line.trim()).context("bad control request")
}

/// Writes the reply of a control connection (holder side).
pub fn write_reply(mut conn: &UnixStream, reply: &ControlReply) -> anyhow::Result<()> {
    let mut out = serde_json::to_vec(reply)?;
    out.push(b'\n');
    conn.write_all(&out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_and_its_reply_cross_a_socket() {
        let (client, holder) = UnixStream::pair().unwrap();
        let request = ControlRequest::AddShare {
            socket: "/run/vm.sock".into(),
            request_queues: 2,
            queue_size: 512,
            group: None,
        };
        let mut line = serde_json::to_vec(&request).unwrap();
        line.push(b'\n');
        (&client).write_all(&line).unwrap();
        assert_eq!(read_request(&holder).unwrap(), request);
        let reply = ControlReply::from_result(Err(anyhow::anyhow!("no such mount")), 3);
        write_reply(&holder, &reply).unwrap();
        let mut answer = String::new();
        BufReader::new(&client).read_line(&mut answer).unwrap();
        let got: ControlReply = serde_json::from_str(answer.trim()).unwrap();
        assert_eq!(got, reply);
        assert!(!got.ok && got.message == "no such mount" && got.generation == 3);
    }

    #[test]
    fn garbage_and_endless_lines_are_refused() {
        let (client, holder) = UnixStream::pair().unwrap();
        (&client).write_all(b"{not json}\n").unwrap();
        assert!(read_request(&holder).is_err());
        let (client, holder) = UnixStream::pair().unwrap();
        let writer = std::thread::spawn(move || {
            let chunk = vec![b'x'; 4096];
            for _ in 0..64 {
                if (&client).write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        assert!(read_request(&holder).is_err(), "a 256 KiB line is refused");
        drop(holder);
        writer.join().unwrap();
    }
}
