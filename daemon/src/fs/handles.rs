//! The open files and directories of a filesystem, and the handle numbers the kernel keeps
//! for them. The numbers describe themselves, so a successor engine can take over handles the
//! kernel got from a predecessor without any handle table surviving the crash.
//!
//! Layout of the u64 the kernel keeps: bits 62-63 the kind (read, write, directory), bits
//! 40-61 the engine generation (mod 2^22), bits 0-39 a serial number. The inode number comes
//! with every request, so kind + inode is all a successor needs to rebuild a reader or a
//! directory stream; a write handle cannot be rebuilt (its unsaved data died with the engine).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::namespace::DirStream;
use crate::prefetch::ObjectReader;
use crate::upload::Upload;

const KIND_SHIFT: u32 = 62;
const GENERATION_SHIFT: u32 = 40;
const GENERATION_MASK: u64 = (1 << 22) - 1;
const SERIAL_MASK: u64 = (1 << 40) - 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandleKind {
    Read = 1,
    Write = 2,
    Dir = 3,
}

fn generation_bits(generation: u64) -> u64 {
    generation & GENERATION_MASK
}

fn encode(kind: HandleKind, generation: u64, serial: u64) -> u64 {
    ((kind as u64) << KIND_SHIFT)
        | (generation_bits(generation) << GENERATION_SHIFT)
        | (serial & SERIAL_MASK)
}

/// The kind and generation bits of a handle berth made; None for anything else.
fn decode(fh: u64) -> Option<(HandleKind, u64)> {
    let kind = match fh >> KIND_SHIFT {
        1 => HandleKind::Read,
        2 => HandleKind::Write,
        3 => HandleKind::Dir,
        _ => return None,
    };
    Some((kind, (fh >> GENERATION_SHIFT) & GENERATION_MASK))
}

/// What a handle is open on.
pub enum Handle {
    Read(ObjectReader),
    Write { ino: u64, upload: Upload },
    Dir(Mutex<DirStream>),
}

impl Handle {
    fn kind(&self) -> HandleKind {
        match self {
            Handle::Read(_) => HandleKind::Read,
            Handle::Write { .. } => HandleKind::Write,
            Handle::Dir(_) => HandleKind::Dir,
        }
    }
}

/// The handles of one engine generation, and the ones it took over from predecessors.
pub struct HandleTable {
    open: Mutex<HashMap<u64, Arc<Handle>>>,
    next_serial: AtomicU64,
    /// The engine generation, written into every handle number.
    generation: u64,
}

impl HandleTable {
    pub fn new(generation: u64) -> HandleTable {
        HandleTable {
            open: Mutex::default(),
            next_serial: AtomicU64::new(1),
            generation,
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens `handle`; returns the number the kernel will use for it.
    pub fn add(&self, handle: Handle) -> u64 {
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let fh = encode(handle.kind(), self.generation, serial);
        self.open().insert(fh, Arc::new(handle));
        fh
    }

    pub fn get(&self, fh: u64) -> Option<Arc<Handle>> {
        self.open().get(&fh).cloned()
    }

    /// The kind of `fh` if it is a handle an earlier engine generation made (and so may be
    /// taken over); `None` for numbers berth never made and for this generation's own.
    pub fn predecessors(&self, fh: u64) -> Option<HandleKind> {
        let (kind, generation) = decode(fh)?;
        (generation != generation_bits(self.generation)).then_some(kind)
    }

    /// Keeps a handle rebuilt from a predecessor's; if another thread got there first, its
    /// copy is the one kept and returned.
    pub fn adopt(&self, fh: u64, handle: Handle) -> Arc<Handle> {
        self.open().entry(fh).or_insert(Arc::new(handle)).clone()
    }

    pub fn remove(&self, fh: u64) -> Option<Arc<Handle>> {
        self.open().remove(&fh)
    }

    /// Every open handle, taken out of the table (shutdown).
    pub fn drain(&self) -> Vec<Arc<Handle>> {
        self.open().drain().map(|(_, h)| h).collect()
    }

    pub fn count(&self, which: impl Fn(&Handle) -> bool) -> usize {
        self.open().values().filter(|h| which(h)).count()
    }
}

/// The kind of a handle number berth made, whatever its generation.
pub fn kind_of(fh: u64) -> Option<HandleKind> {
    decode(fh).map(|(kind, _)| kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_differ_across_generations() {
        let a = encode(HandleKind::Dir, 7, 12345);
        assert_eq!(decode(a), Some((HandleKind::Dir, 7)));
        let b = encode(HandleKind::Dir, 8, 12345);
        assert_ne!(
            a, b,
            "a successor's handles never collide with its predecessor's"
        );
        assert_eq!(
            decode(encode(HandleKind::Write, 1, 1)).unwrap().0,
            HandleKind::Write
        );
        assert_eq!(decode(5), None, "small numbers are not berth handles");
        assert_eq!(decode(0), None);
    }
}
