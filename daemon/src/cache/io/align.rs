//! Heap buffers aligned for O_DIRECT, and the checks every engine runs before an I/O.

use std::alloc::{self, Layout};
use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// An owned, zero-initialised heap buffer whose address and length are multiples of `align`.
///
/// `align` is a power of two (at least 1); `len` is a multiple of it, so the whole buffer can be
/// handed to an O_DIRECT read or write of the same alignment. The buffer never grows or shrinks.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    align: usize,
}

// SAFETY: `AlignedBuf` uniquely owns its allocation (like `Box<[u8]>`); nothing else holds the
// pointer, so moving it to another thread or sharing `&AlignedBuf` (read-only bytes) is sound.
unsafe impl Send for AlignedBuf {}
// SAFETY: see above; `&AlignedBuf` only gives shared read access to plain bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes aligned to `align`.
    ///
    /// Fails with `InvalidInput` when `align` is not a power of two or `len` is not a multiple of
    /// it, and with `OutOfMemory` when the allocation fails.
    pub fn zeroed(len: usize, align: usize) -> io::Result<AlignedBuf> {
        if !align.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer alignment {align} is not a power of two"),
            ));
        }
        if len % align != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer length {len} is not a multiple of the alignment {align}"),
            ));
        }
        if len == 0 {
            // No allocation for an empty buffer: a non-null address that is never dereferenced
            // (slices of length 0 only need a non-null pointer aligned for `u8`).
            return Ok(AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
                align,
            });
        }
        let layout = Layout::from_size_align(len, align).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer of {len} bytes aligned to {align}: {e}"),
            )
        })?;
        // SAFETY: `layout` has a non-zero size (len > 0 was checked above).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!("could not allocate an aligned buffer of {len} bytes"),
            )
        })?;
        Ok(AlignedBuf { ptr, len, align })
    }

    /// A buffer holding a copy of `data`, zero-padded up to the next multiple of `align`.
    pub fn from_slice_padded(data: &[u8], align: usize) -> io::Result<AlignedBuf> {
        if !align.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("buffer alignment {align} is not a power of two"),
            ));
        }
        let len = round_up(data.len(), align).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} bytes padded to {align} overflows", data.len()),
            )
        })?;
        let mut buf = AlignedBuf::zeroed(len, align)?;
        buf.as_mut_slice()[..data.len()].copy_from_slice(data);
        Ok(buf)
    }

    /// Length in bytes (always a multiple of [`AlignedBuf::align`]).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The alignment the buffer was created with (its address is a multiple of it).
    pub fn align(&self) -> usize {
        self.align
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for reads of `len` initialised bytes (allocated zeroed with that
        // size, or dangling with len 0), and the borrow of `self` keeps it alive and unaliased
        // by writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: `zeroed` allocated `ptr` with exactly this size and alignment (it validated
        // them, so `from_size_align_unchecked` gets the same valid pair), and this is the only
        // place that frees it.
        unsafe {
            alloc::dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align_unchecked(self.len, self.align),
            )
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.align)
            .finish()
    }
}

/// `n` rounded up to a multiple of `align` (a power of two), or None on overflow.
pub(crate) fn round_up(n: usize, align: usize) -> Option<usize> {
    Some(n.checked_add(align - 1)? & !(align - 1))
}

/// Checks that an I/O of `buf` at `offset` meets the engine's `alignment`: offset, length and
/// buffer address all multiples of it, and no overflow of the end offset.
pub(crate) fn check_io(buf: &AlignedBuf, offset: u64, alignment: usize) -> io::Result<()> {
    let a = alignment as u64;
    if offset % a != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("offset {offset} is not a multiple of the cache alignment {alignment}"),
        ));
    }
    if buf.len() % alignment != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "length {} is not a multiple of the cache alignment {alignment}",
                buf.len()
            ),
        ));
    }
    if buf.as_ptr() as usize % alignment != 0 && !buf.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "buffer aligned to {} but the cache needs {alignment}",
                buf.align()
            ),
        ));
    }
    if u32::try_from(buf.len()).is_err() || offset.checked_add(buf.len() as u64).is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("I/O of {} bytes at {offset} is too large", buf.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_is_aligned_and_zero() {
        for align in [512usize, 4096, 65536] {
            let buf = AlignedBuf::zeroed(3 * align, align).unwrap();
            assert_eq!(buf.len(), 3 * align);
            assert_eq!(buf.as_ptr() as usize % align, 0);
            assert!(buf.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(
            AlignedBuf::zeroed(4096, 3000).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            AlignedBuf::zeroed(100, 512).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(AlignedBuf::zeroed(0, 4096).unwrap().is_empty());
    }

    #[test]
    fn from_slice_pads_with_zeros() {
        let buf = AlignedBuf::from_slice_padded(&[7u8; 5000], 4096).unwrap();
        assert_eq!(buf.len(), 8192);
        assert!(buf[..5000].iter().all(|&b| b == 7));
        assert!(buf[5000..].iter().all(|&b| b == 0));
        let exact = AlignedBuf::from_slice_padded(&[1u8; 4096], 4096).unwrap();
        assert_eq!(exact.len(), 4096);
        let empty = AlignedBuf::from_slice_padded(&[], 4096).unwrap();
        assert_eq!(empty.len(), 0);
    }

    #[test]
    fn check_io_catches_misalignment() {
        let buf = AlignedBuf::zeroed(4096, 4096).unwrap();
        assert!(check_io(&buf, 0, 4096).is_ok());
        assert!(check_io(&buf, 512, 4096).is_err());
        let small = AlignedBuf::zeroed(512, 512).unwrap();
        assert!(check_io(&small, 0, 4096).is_err());
        assert!(check_io(&buf, u64::MAX - 4095, 4096).is_err());
    }
}
