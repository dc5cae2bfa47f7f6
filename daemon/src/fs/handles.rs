//! The open files and directories of one door of a filesystem, and the handle numbers the
//! kernel (or a guest) keeps for them.
//!
//! Every door has a table of its own: the FUSE door, and each virtio-fs connection. A guest
//! that sends FLUSH, RELEASE or WRITE with a number it made up reaches only its own handles,
//! never a pod's; each handle is bound to its inode, and a door holds at most so many.
//!
//! The numbers describe themselves, so a successor engine can take over handles the kernel
//! got from a predecessor without any handle table surviving the crash. Layout of the u64:
//! bits 62-63 the kind (read, write, directory), bits 54-61 the door, bits 32-53 the engine
//! generation (mod 2^22), bits 0-31 a serial number. The inode number comes with every
//! request, so kind + inode is all a successor needs to rebuild a reader or a directory
//! stream; a write handle is rebuilt from the upload's spool, named after the number.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::namespace::DirStream;
use crate::prefetch::ObjectReader;
use crate::upload::Upload;

const KIND_SHIFT: u32 = 62;
const DOOR_SHIFT: u32 = 54;
const DOOR_MASK: u64 = 0xff;
const GENERATION_SHIFT: u32 = 32;
const GENERATION_MASK: u64 = (1 << 22) - 1;
const SERIAL_MASK: u64 = (1 << 32) - 1;

/// The FUSE door's tag; virtio-fs connections get 1.. (see [`super::BerthFs::door`]).
pub const FUSE_DOOR: u8 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HandleKind {
    Read = 1,
    Write = 2,
    Dir = 3,
}

fn generation_bits(generation: u64) -> u64 {
    generation & GENERATION_MASK
}

fn encode(kind: HandleKind, door: u8, generation: u64, serial: u64) -> u64 {
    ((kind as u64) << KIND_SHIFT)
        | (u64::from(door) << DOOR_SHIFT)
        | (generation_bits(generation) << GENERATION_SHIFT)
        | (serial & SERIAL_MASK)
}

/// The kind, door and generation bits of a handle berth made; None for anything else.
fn decode(fh: u64) -> Option<(HandleKind, u8, u64)> {
    let kind = match fh >> KIND_SHIFT {
        1 => HandleKind::Read,
        2 => HandleKind::Write,
        3 => HandleKind::Dir,
        _ => return None,
    };
    let door = ((fh >> DOOR_SHIFT) & DOOR_MASK) as u8;
    Some((kind, door, (fh >> GENERATION_SHIFT) & GENERATION_MASK))
}

/// What a handle is open on, and the inode it was opened for.
// Every handle lives behind an `Arc` once, for as long as it is open: no copies to save.
#[allow(clippy::large_enum_variant)]
pub enum Handle {
    Read { ino: u64, reader: ObjectReader },
    Write { ino: u64, upload: Upload },
    Dir { ino: u64, stream: Mutex<DirStream> },
}

impl Handle {
    fn kind(&self) -> HandleKind {
        match self {
            Handle::Read { .. } => HandleKind::Read,
            Handle::Write { .. } => HandleKind::Write,
            Handle::Dir { .. } => HandleKind::Dir,
        }
    }

    pub fn ino(&self) -> u64 {
        match self {
            Handle::Read { ino, .. } | Handle::Write { ino, .. } | Handle::Dir { ino, .. } => *ino,
        }
    }
}

/// The handles of one door in one engine generation, and the ones it took over from
/// predecessors.
pub struct HandleTable {
    open: Mutex<HashMap<u64, Arc<Handle>>>,
    next_serial: AtomicU64,
    /// The engine generation, written into every handle number.
    generation: u64,
    door: u8,
    /// Most handles open at once; past it, opens fail with EMFILE.
    max: usize,
}

impl HandleTable {
    pub fn new(generation: u64, door: u8, max: usize) -> HandleTable {
        HandleTable {
            open: Mutex::default(),
            next_serial: AtomicU64::new(1),
            generation,
            door,
            max,
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Handle>>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens `handle`; returns the number the kernel will use for it. EMFILE when the door
    /// holds its maximum.
    pub fn add(&self, handle: Handle) -> io::Result<u64> {
        self.add_with(handle.kind(), |_| Ok(handle))
    }

    /// Opens the handle `make` builds once it knows its number (an upload names its spool
    /// after it). EMFILE when the door holds its maximum (checked before `make`, so
    /// concurrent opens may pass it by a few: one per worker thread at most).
    pub fn add_with(
        &self,
        kind: HandleKind,
        make: impl FnOnce(u64) -> io::Result<Handle>,
    ) -> io::Result<u64> {
        if self.open().len() >= self.max {
            tracing::warn!(
                door = self.door,
                max = self.max,
                "too many open handles on one door; refused (EMFILE)"
            );
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let fh = encode(kind, self.door, self.generation, serial);
        let handle = make(fh)?;
        debug_assert_eq!(handle.kind(), kind);
        self.open().insert(fh, Arc::new(handle));
        Ok(fh)
    }

    /// The handle `fh`, if it is open on this door for inode `ino`.
    pub fn get(&self, fh: u64, ino: u64) -> Option<Arc<Handle>> {
        self.open().get(&fh).filter(|h| h.ino() == ino).cloned()
    }

    /// The kind of `fh` if it is a handle an earlier engine generation made on this door (and
    /// so may be taken over); `None` for numbers berth never made, for this generation's own
    /// and for other doors'.
    pub fn predecessors(&self, fh: u64) -> Option<HandleKind> {
        let (kind, door, generation) = decode(fh)?;
        (door == self.door && generation != generation_bits(self.generation)).then_some(kind)
    }

    /// Keeps a handle rebuilt from a predecessor's; if another thread got there first, its
    /// copy is the one kept and returned. Counts against the door's maximum.
    pub fn adopt(&self, fh: u64, handle: Handle) -> io::Result<Arc<Handle>> {
        let mut open = self.open();
        if let Some(h) = open.get(&fh) {
            return Ok(h.clone());
        }
        if open.len() >= self.max {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let handle = Arc::new(handle);
        open.insert(fh, handle.clone());
        Ok(handle)
    }

    /// Closes `fh` if it is open on this door for inode `ino`.
    pub fn remove(&self, fh: u64, ino: u64) -> Option<Arc<Handle>> {
        let mut open = self.open();
        if open.get(&fh).is_some_and(|h| h.ino() == ino) {
            return open.remove(&fh);
        }
        None
    }

    /// The open handles `which` picks, taken out of the table.
    pub fn take_where(&self, which: impl Fn(&Handle) -> bool) -> Vec<Arc<Handle>> {
        let mut open = self.open();
        let picked: Vec<u64> = open
            .iter()
            .filter(|(_, h)| which(h))
            .map(|(fh, _)| *fh)
            .collect();
        picked.iter().filter_map(|fh| open.remove(fh)).collect()
    }

    /// The first open handle `which` picks, left in the table.
    pub fn find_where(&self, which: impl Fn(&Handle) -> bool) -> Option<Arc<Handle>> {
        self.open().values().find(|h| which(h)).cloned()
    }

    /// Every open handle, taken out of the table (shutdown, a VMM gone).
    pub fn drain(&self) -> Vec<Arc<Handle>> {
        self.open().drain().map(|(_, h)| h).collect()
    }

    pub fn is_fuse_door(&self) -> bool {
        self.door == FUSE_DOOR
    }

    pub fn count(&self, which: impl Fn(&Handle) -> bool) -> usize {
        self.open().values().filter(|h| which(h)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_differ_across_generations_and_doors() {
        let a = encode(HandleKind::Dir, FUSE_DOOR, 7, 12345);
        assert_eq!(decode(a), Some((HandleKind::Dir, FUSE_DOOR, 7)));
        let b = encode(HandleKind::Dir, FUSE_DOOR, 8, 12345);
        assert_ne!(
            a, b,
            "a successor's handles never collide with its predecessor's"
        );
        assert_ne!(
            a,
            encode(HandleKind::Dir, 3, 7, 12345),
            "nor another door's"
        );
        assert_eq!(
            decode(encode(HandleKind::Write, 200, 1, 1)).unwrap(),
            (HandleKind::Write, 200, 1)
        );
        assert_eq!(decode(5), None, "small numbers are not berth handles");
        assert_eq!(decode(0), None);
    }

    #[test]
    fn only_this_doors_predecessors_may_be_taken_over() {
        let fuse = HandleTable::new(5, FUSE_DOOR, 10);
        let guest = HandleTable::new(5, 1, 10);
        let old_fuse = encode(HandleKind::Read, FUSE_DOOR, 4, 9);
        assert_eq!(fuse.predecessors(old_fuse), Some(HandleKind::Read));
        assert_eq!(
            guest.predecessors(old_fuse),
            None,
            "a guest never adopts a pod's handle"
        );
        assert_eq!(
            fuse.predecessors(encode(HandleKind::Read, FUSE_DOOR, 5, 9)),
            None
        );
        assert_eq!(fuse.predecessors(12), None);
    }
}
