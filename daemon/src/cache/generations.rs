//! Slot generations of the node cache, in a file every process of the node maps.
//!
//! The daemon bumps a slot's generation whenever the slot changes hands (reserved for a new
//! block, or its block dropped). A mount process that remembers where a block is (slot and
//! generation) can then read it without asking the daemon: it checks the generation before and
//! after the read, as a seqlock reader does. A new owner only writes a slot after the bump, so a
//! read that sees the same generation on both sides read the bytes it was promised.
//!
//! Layout: a header of 8 words (`MAGIC`, then the `retired` flag), then one little-endian u64
//! per slot. A daemon that starts again reuses the file (so mappings of running mounts stay
//! live) and bumps every generation; one that needs another size marks the old file retired
//! first, which makes its readers stop trusting it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const MAGIC: u64 = u64::from_le_bytes(*b"BERTHGEN");
const HEADER_WORDS: usize = 8;

/// A mapping of the generations file.
pub struct Generations {
    base: *mut AtomicU64,
    words: usize,
    slots: usize,
}

// SAFETY: the mapping is only accessed through atomics, and it lives until drop.
unsafe impl Send for Generations {}
// SAFETY: as above.
unsafe impl Sync for Generations {}

impl Generations {
    /// The daemon's side: opens (or creates) the file for `slots` and bumps every generation.
    pub fn open_for_server(path: &Path, slots: usize) -> io::Result<Generations> {
        let len = ((HEADER_WORDS + slots) * 8) as u64;
        let reuse = std::fs::metadata(path).is_ok_and(|m| m.len() == len);
        if !reuse && path.exists() {
            // Another geometry: tell whoever still maps it, then start a new file.
            if let Ok(old) = Self::map(path, true, 0) {
                old.word(1).store(1, Ordering::SeqCst);
            }
            std::fs::remove_file(path)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)?;
        file.set_len(len)?;
        drop(file);
        let table = Self::map(path, true, slots)?;
        table.word(0).store(MAGIC, Ordering::SeqCst);
        table.word(1).store(0, Ordering::SeqCst);
        for slot in 0..slots {
            table.bump(slot as u32);
        }
        Ok(table)
    }

    /// A mount process's side: maps the file read-only.
    pub fn open_for_client(path: &Path, slots: usize) -> io::Result<Generations> {
        let table = Self::map(path, false, slots)?;
        if table.word(0).load(Ordering::SeqCst) != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a berth generations file", path.display()),
            ));
        }
        Ok(table)
    }

    fn map(path: &Path, write: bool, slots: usize) -> io::Result<Generations> {
        let file = OpenOptions::new().read(true).write(write).open(path)?;
        let words = HEADER_WORDS + slots;
        let len = words * 8;
        if file.metadata()?.len() < len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is shorter than {len} bytes", path.display()),
            ));
        }
        let prot = if write {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh shared mapping of `len` bytes of an open file; checked for failure.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Generations {
            base: base.cast(),
            words,
            slots,
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words, "generation word {i} out of range");
        // SAFETY: in bounds (checked), 8-byte aligned (page-aligned base), mapped until drop.
        unsafe { &*self.base.add(i) }
    }

    /// The generation of `slot`; `None` for a slot out of range or a retired file.
    pub fn get(&self, slot: u32) -> Option<u64> {
        if slot as usize >= self.slots || self.word(1).load(Ordering::SeqCst) != 0 {
            return None;
        }
        Some(
            self.word(HEADER_WORDS + slot as usize)
                .load(Ordering::SeqCst),
        )
    }

    /// The slot changes hands: every remembered location of it is stale from now on.
    pub fn bump(&self, slot: u32) -> u64 {
        if slot as usize >= self.slots {
            return 0;
        }
        self.word(HEADER_WORDS + slot as usize)
            .fetch_add(1, Ordering::SeqCst)
            + 1
    }
}

impl Drop for Generations {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; nothing borrows it any more.
        unsafe { libc::munmap(self.base.cast(), self.words * 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_see_bumps_and_a_restart_invalidates_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("generations");
        let server = Generations::open_for_server(&path, 4).unwrap();
        let client = Generations::open_for_client(&path, 4).unwrap();
        let g = client.get(2).unwrap();
        assert_eq!(server.bump(2), g + 1);
        assert_eq!(client.get(2), Some(g + 1));
        assert_eq!(client.get(4), None, "out of range");
        // A restarted daemon with the same geometry keeps the file and bumps every slot.
        let before: Vec<u64> = (0..4).map(|s| client.get(s).unwrap()).collect();
        drop(server);
        let again = Generations::open_for_server(&path, 4).unwrap();
        for s in 0..4 {
            assert!(client.get(s).unwrap() > before[s as usize]);
        }
        // Another geometry retires the old file: its readers trust nothing.
        drop(again);
        let _bigger = Generations::open_for_server(&path, 8).unwrap();
        assert_eq!(client.get(0), None);
        assert!(Generations::open_for_client(&dir.path().join("nope"), 4).is_err());
    }
}
