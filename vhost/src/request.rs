//! One virtio-fs request: a descriptor chain in guest memory, in (readable) then out
//! (writable) buffers, served by the fuse-backend-rs `Server`.
//!
//! The guest is untrusted. Whatever the chain holds, this function answers with a reply the
//! guest can parse (or nothing, when the guest gave no room for one) and never panics: a
//! panic would kill the queue's worker thread and hang every request behind it.

use std::io::Write as _;
use std::ops::Deref;
use std::panic::{catch_unwind, AssertUnwindSafe};

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::DescriptorChain;
use vm_memory::{ByteValued, GuestMemory};

/// The longest request a guest may send: a header, a WRITE's fixed part and 1 MiB of data,
/// with room to spare.
pub const MAX_REQUEST: usize = (1 << 20) + (64 << 10);

/// Serves one request chain and returns the number of bytes written into the guest's
/// writable buffers (the length to put in the used ring).
pub fn handle_chain<F, M>(server: &Server<F>, mem: &M::Target, chain: DescriptorChain<M>) -> u32
where
    F: FileSystem + Sync,
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let served = catch_unwind(AssertUnwindSafe(|| serve(server, mem, chain.clone())));
    let error = match served {
        Ok(Ok(written)) => return u32::try_from(written).unwrap_or(u32::MAX),
        Ok(Err(e)) => e,
        Err(_) => "the filesystem panicked while serving the request".to_string(),
    };
    tracing::warn!(error = %error, "virtio-fs request failed; answering EIO");
    reply_error(mem, chain, libc::EIO)
}

/// [`handle_chain`] without the panic guard, so that tests and fuzzing see panics.
#[doc(hidden)]
pub fn handle_chain_unguarded<F, M>(
    server: &Server<F>,
    mem: &M::Target,
    chain: DescriptorChain<M>,
) -> u32
where
    F: FileSystem + Sync,
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    match serve(server, mem, chain.clone()) {
        Ok(written) => u32::try_from(written).unwrap_or(u32::MAX),
        Err(_) => reply_error(mem, chain, libc::EIO),
    }
}

fn serve<F, M>(
    server: &Server<F>,
    mem: &M::Target,
    chain: DescriptorChain<M>,
) -> Result<usize, String>
where
    F: FileSystem + Sync,
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let reader = Reader::from_descriptor_chain(mem, chain.clone())
        .map_err(|e| format!("bad readable buffers: {e}"))?;
    // A request is a header and at most MAX_REQUEST bytes: anything longer is a guest
    // lying (descriptors may alias the same pages), and the FUSE server would allocate what
    // the request asks for (an IOCTL's in_size) before any filesystem could refuse it.
    if reader.available_bytes() > MAX_REQUEST {
        return Err(format!(
            "a request of {} bytes is longer than any FUSE request ({MAX_REQUEST})",
            reader.available_bytes()
        ));
    }
    let writer =
        VirtioFsWriter::new(mem, chain).map_err(|e| format!("bad writable buffers: {e}"))?;
    server
        .handle_message(reader, writer.into(), None, None)
        .map_err(|e| format!("{e}"))
}

/// Answers a request the server could not: an out header carrying `errno`, when the request
/// header is readable, expects a reply and the guest left room for one. Returns the bytes
/// written (0 when no reply is possible).
fn reply_error<M>(mem: &M::Target, chain: DescriptorChain<M>, errno: i32) -> u32
where
    M: Deref + Clone,
    M::Target: GuestMemory + Sized,
{
    let Ok(mut reader) = Reader::from_descriptor_chain(mem, chain.clone()) else {
        return 0;
    };
    let Ok(header) = reader.read_obj::<InHeader>() else {
        return 0;
    };
    if !expects_reply(header.opcode) {
        return 0;
    }
    let Ok(mut writer) = VirtioFsWriter::new(mem, chain) else {
        return 0;
    };
    let out = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -errno,
        unique: header.unique,
    };
    match writer.write_all(out.as_slice()) {
        Ok(()) => out.len,
        Err(e) => {
            tracing::debug!(error = %e, "no room for an error reply");
            0
        }
    }
}

/// FORGET, BATCH_FORGET and INTERRUPT are never answered (FUSE protocol).
fn expects_reply(opcode: u32) -> bool {
    opcode != Opcode::Forget as u32
        && opcode != Opcode::BatchForget as u32
        && opcode != Opcode::Interrupt as u32
}
