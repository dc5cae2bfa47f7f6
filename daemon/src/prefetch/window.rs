//! Decides how far ahead of a reader to fetch.
//!
//! A read that continues where the last one ended (give or take the window plus two blocks,
//! since the kernel sends readahead requests from several threads out of order), or that falls
//! on blocks already prefetched, is sequential, and
//! every time such a reader enters a new block the window doubles, up to the maximum. Any other
//! read is random: the window drops to zero, so random readers fetch only what they ask for.

/// How one read was classified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Fetch this many blocks past the end of the request.
    Sequential {
        ahead: u64,
    },
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

    /// Classifies a read of `len` bytes at `offset`. `prefetched` says the blocks it covers
    /// were already fetched for this reader, i.e. it falls inside the current window.
    pub fn on_read(&mut self, offset: u64, len: u64, prefetched: bool) -> Access {
        let end = offset + len;
        let sequential = prefetched
            || match self.last_end {
                None => offset == 0,
                Some(last) => {
                    let slack = self.block_size * (self.ahead + 2);
                    offset + slack >= last && offset <= last + slack
                }
            };
        let entered_new_block = match self.last_end {
            None => true,
            Some(last) => {
                (end.saturating_sub(1)) / self.block_size > last.saturating_sub(1) / self.block_size
            }
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
            if let Access::Sequential { ahead } = w.on_read(i * 128 * KIB, 128 * KIB, false) {
                seen.push(ahead);
            } else {
                panic!("read {i} was not sequential");
            }
        }
        assert_eq!(seen[0], 1);
        assert!(
            seen.windows(2).all(|p| p[1] >= p[0]),
            "never shrinks: {seen:?}"
        );
        assert_eq!(*seen.last().unwrap(), 8);
    }

    #[test]
    fn resets_on_random_access_and_grows_again() {
        let mut w = Window::new(MIB, 64 * MIB);
        for i in 0..64 {
            w.on_read(i * MIB, MIB, false);
        }
        assert_eq!(w.ahead(), 64);
        assert_eq!(w.on_read(900 * MIB, 4 * KIB, false), Access::Random);
        assert_eq!(w.ahead(), 0);
        assert_eq!(w.on_read(3 * MIB, 4 * KIB, false), Access::Random);
        // Continuing from the last random read is sequential again, starting small.
        assert_eq!(
            w.on_read(3 * MIB + 4 * KIB, 2 * MIB, false),
            Access::Sequential { ahead: 1 }
        );
    }

    #[test]
    fn tolerates_slightly_reordered_readahead() {
        let mut w = Window::new(MIB, 16 * MIB);
        w.on_read(0, 128 * KIB, false);
        w.on_read(256 * KIB, 128 * KIB, false);
        assert!(matches!(
            w.on_read(128 * KIB, 128 * KIB, false),
            Access::Sequential { .. }
        ));
    }

    #[test]
    fn a_read_inside_the_prefetched_window_counts_as_sequential() {
        let mut w = Window::new(MIB, 16 * MIB);
        w.on_read(0, MIB, false);
        w.on_read(MIB, MIB, false);
        // Far ahead of the last read, but the blocks are there already.
        assert!(matches!(
            w.on_read(12 * MIB, MIB, true),
            Access::Sequential { .. }
        ));
        assert_eq!(
            w.on_read(12 * MIB, MIB, false),
            Access::Sequential { ahead: 4 }
        );
    }

    #[test]
    fn a_first_read_past_the_start_is_random() {
        let mut w = Window::new(MIB, 16 * MIB);
        assert_eq!(w.on_read(10 * MIB, 4 * KIB, false), Access::Random);
    }
}
