//! File handle numbers that describe themselves, so a successor engine can take over handles
//! the kernel got from a predecessor without any handle table surviving the crash.
//!
//! Layout of the u64 the kernel keeps: bits 62-63 the kind (read, write, directory), bits
//! 40-61 the engine generation (mod 2^22), bits 0-39 a serial number. The inode number comes
//! with every request, so kind + inode is all a successor needs to rebuild a reader or a
//! directory stream; a write handle cannot be rebuilt (its unsaved data died with the engine).

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

pub fn generation_bits(generation: u64) -> u64 {
    generation & GENERATION_MASK
}

pub fn encode(kind: HandleKind, generation: u64, serial: u64) -> u64 {
    ((kind as u64) << KIND_SHIFT)
        | (generation_bits(generation) << GENERATION_SHIFT)
        | (serial & SERIAL_MASK)
}

/// The kind and generation bits of a handle berth made; None for anything else.
pub fn decode(fh: u64) -> Option<(HandleKind, u64)> {
    let kind = match fh >> KIND_SHIFT {
        1 => HandleKind::Read,
        2 => HandleKind::Write,
        3 => HandleKind::Dir,
        _ => return None,
    };
    Some((kind, (fh >> GENERATION_SHIFT) & GENERATION_MASK))
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
