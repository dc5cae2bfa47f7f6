//! Decides how far ahead of a reader to fetch.
//!
//! A read that continues where the last one ended (give or take one block, since the kernel
//! sends readahead requests from several threads slightly out of order) is sequential, and
//! every time such a reader enters a new block the window doubles, up to the maximum. Any other
//! read is random: the window drops to zero, so random readers fetch only what they ask for.

/// How one read was classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Fetch this many blocks past the end of the request.
    Sequential { ahead: u64 },
    Random,
}

#[derive(Clone, Debug)]
pub struct Window {
    block_size: u64,
    max_ahead: u64,
    ahead: u64,
    last_end: Option<u64>,
}

impl Window {
    pub fn new(block_size: u64, max_window_bytes: u64) -> Window {
        Window {
            block_size,
            max_ahead: (max_window_bytes / block_size).max(1),
            ahead: 0,
            last_end: None,
        }
    }

    pub fn ahead(&self) -> u64 {
        self.ahead
    }

    pub fn on_read(&mut self, offset: u64, len: u64) -> Access {
        let end = offset + len;
        let sequential = match self.last_end {
            None => offset == 0,
            Some(last) => {
                let behind = self.block_size;
                let forward = self.block_size * self.ahead.max(1);
                offset + behind >= last && offset <= last + forward
            }
        };
        let entered_new_block = match self.last_end {
            None => true,
            Some(last) => (end.saturating_sub(1)) / self.block_size > last.saturating_sub(1) / self.block_size,
        };
        self.last_end = Some(self.last_end.map_or(end, |l| l.max(end)));
        if !sequential {
            self.ahead = 0;
            self.last_end = Some(end);
            return Access::Random;
        }
        if entered_new_block {
            self.ahead = (self.ahead * 2).clamp(1, self.max_ahead);
        }
        Access::Sequential { ahead: self.ahead }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;

    #[test]
    fn grows_on_sequential_reads_up_to_the_maximum() {
        let mut w = Window::new(MIB, 8 * MIB);
        let mut seen = Vec::new();
        for i in 0..40 {
            // 128 KiB requests, as the kernel sends them.
            if let Access::Sequential { ahead } = w.on_read(i * 128 * KIB, 128 * KIB) {
                seen.push(ahead);
            } else {
                panic!("read {i} was not sequential");
            }
        }
        assert_eq!(seen[0], 1);
        assert!(seen.windows(2).all(|p| p[1] >= p[0]), "never shrinks: {seen:?}");
        assert_eq!(*seen.last().unwrap(), 8);
    }

    #[test]
    fn resets_on_random_access_and_grows_again() {
        let mut w = Window::new(MIB, 64 * MIB);
        for i in 0..64 {
            w.on_read(i * MIB, MIB);
        }
        assert_eq!(w.ahead(), 64);
        assert_eq!(w.on_read(900 * MIB, 4 * KIB), Access::Random);
        assert_eq!(w.ahead(), 0);
        assert_eq!(w.on_read(3 * MIB, 4 * KIB), Access::Random);
        // Continuing from the last random read is sequential again, starting small.
        assert_eq!(w.on_read(3 * MIB + 4 * KIB, 2 * MIB), Access::Sequential { ahead: 1 });
    }

    #[test]
    fn tolerates_slightly_reordered_readahead() {
        let mut w = Window::new(MIB, 16 * MIB);
        w.on_read(0, 128 * KIB);
        w.on_read(256 * KIB, 128 * KIB);
        assert!(matches!(w.on_read(128 * KIB, 128 * KIB), Access::Sequential { .. }));
    }

    #[test]
    fn a_first_read_past_the_start_is_random() {
        let mut w = Window::new(MIB, 16 * MIB);
        assert_eq!(w.on_read(10 * MIB, 4 * KIB), Access::Random);
    }
}
