//! The node cache's wire protocol: length-prefixed JSON frames over a unix socket. The server
//! greets each connection with the data file to use; then every request gets one reply.

use std::io;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::cache::index::SlotEntry;
use crate::cache::stats::Summary;

/// Largest message accepted (a lookup of many keys); anything bigger is a broken peer.
const MAX_FRAME: usize = 16 << 20;

/// What a server tells each new connection: the data file to read and write, and its geometry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    pub data: PathBuf,
    pub data_len: u64,
    pub block_size: u64,
    /// The slot generations file (see [`crate::cache::generations`]).
    pub generations: PathBuf,
    /// Device and inode of the data file: a client must use the very file the server indexes.
    pub dev: u64,
    pub ino: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireEntry {
    pub slot: u32,
    pub len: u32,
    pub crcs: Vec<u32>,
    pub generation: u64,
}

impl From<SlotEntry> for WireEntry {
    fn from(e: SlotEntry) -> WireEntry {
        WireEntry {
            slot: e.slot,
            len: e.len,
            crcs: e.crcs.to_vec(),
            generation: e.generation,
        }
    }
}

impl From<WireEntry> for SlotEntry {
    fn from(e: WireEntry) -> SlotEntry {
        SlotEntry {
            slot: e.slot,
            len: e.len,
            crcs: e.crcs.into(),
            generation: e.generation,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Where `keys` are; `touched` were read from remembered locations since the last call.
    Lookup {
        keys: Vec<String>,
        touched: Vec<String>,
    },
    Reserve {
        key: String,
    },
    Commit {
        key: String,
        entry: WireEntry,
        token: u64,
    },
    Abandon {
        slot: u32,
        token: u64,
    },
    Remove {
        key: String,
        slot: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Greeting(Greeting),
    Entries(Vec<Option<WireEntry>>),
    Reserved {
        /// Slot, token and the slot's new generation.
        reservation: Option<(u32, u64, u64)>,
        summary: Summary,
    },
    Committed {
        summary: Summary,
    },
    Done,
    Failed(String),
}

pub fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub fn frame<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(msg).map_err(|e| invalid(e.to_string()))?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    Ok(buf)
}

pub fn body_len(header: [u8; 4]) -> io::Result<usize> {
    let n = u32::from_le_bytes(header) as usize;
    if n > MAX_FRAME {
        return Err(invalid(format!("node cache message of {n} bytes refused")));
    }
    Ok(n)
}

pub fn parse<T: DeserializeOwned>(body: &[u8]) -> io::Result<T> {
    serde_json::from_slice(body).map_err(|e| invalid(format!("node cache message: {e}")))
}

pub async fn read_frame<T: DeserializeOwned>(stream: &mut UnixStream) -> io::Result<T> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await?;
    let mut body = vec![0u8; body_len(header)?];
    stream.read_exact(&mut body).await?;
    parse(&body)
}

pub async fn write_frame<T: Serialize>(stream: &mut UnixStream, msg: &T) -> io::Result<()> {
    stream.write_all(&frame(msg)?).await
}
