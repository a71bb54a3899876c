//! Admission (TinyLFU's doorkeeper, Einziger et al., 2017), for `tinylfu`: a read miss fills
//! the cache only if its data missed once before within the window, or returns after an
//! eviction (the ghost record). Data read once (a scan the sequential cutoff missed, a
//! one-hit wonder) never takes a bucket. The doorkeeper is a Bloom filter of the misses
//! seen (two hashes, eight bits per miss of the window), cleared once it has taken
//! [`WINDOW`] times as many misses as the cache holds blocks (TinyLFU's sample of ten
//! cache sizes, rounded to a power of two).

use super::CacheSet;

/// Misses the doorkeeper remembers, in cache sizes.
pub const WINDOW: u64 = 8;

#[derive(Default)]
pub(crate) struct Doorkeeper {
    bits: Vec<u64>,
    /// Misses taken since the last clear, and how many clear it.
    taken: u64,
    window: u64,
}

fn hashes(inode: u32, start: u64) -> (u64, u64) {
    let mut z = (u64::from(inode) << 48 ^ start).wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z, z.rotate_left(32))
}

impl Doorkeeper {
    /// Sized for a cache of `blocks` blocks (0: off, every miss admitted).
    pub fn resize(&mut self, blocks: u64) {
        let window = blocks * WINDOW;
        let bits = (window.max(1) * 8).next_power_of_two().min(1 << 30);
        self.bits = if blocks == 0 { Vec::new() } else { vec![0; (bits / 64) as usize] };
        self.taken = 0;
        self.window = window;
    }

    /// Whether a miss at `start` of `inode` fills the cache: true if it missed before in the
    /// window; otherwise it is remembered, and false.
    pub fn admit(&mut self, inode: u32, start: u64) -> bool {
        if self.bits.is_empty() {
            return true;
        }
        let mask = self.bits.len() as u64 * 64 - 1;
        let (a, b) = hashes(inode, start);
        let (i, j) = (a & mask, b & mask);
        let seen =
            self.bits[(i / 64) as usize] >> (i % 64) & 1 == 1 && self.bits[(j / 64) as usize] >> (j % 64) & 1 == 1;
        if seen {
            return true;
        }
        self.bits[(i / 64) as usize] |= 1 << (i % 64);
        self.bits[(j / 64) as usize] |= 1 << (j % 64);
        self.taken += 1;
        if self.taken >= self.window {
            self.bits.fill(0);
            self.taken = 0;
        }
        false
    }
}

impl CacheSet {
    /// Whether a read miss at `start` of `inode` fills the cache (see the module docs):
    /// always, but for `tinylfu`; data returning after an eviction (`returning`) always.
    pub(crate) fn admit(&mut self, inode: u32, start: u64, returning: bool) -> bool {
        if returning || self.admission.admit(inode, start) {
            return true;
        }
        self.stats.admission_bypasses += 1;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_miss_in_the_window_is_admitted() {
        let mut d = Doorkeeper::default();
        assert!(d.admit(1, 8), "off: every miss");
        d.resize(1000);
        assert!(!d.admit(1, 8));
        assert!(d.admit(1, 8));
        assert!(!d.admit(2, 8), "another device");
        assert!(!d.admit(1, 16));
        // A window's worth of other misses clears it (a few more: those it takes for
        // seen, false positives, are not counted).
        for s in 0..1000 * WINDOW + 500 {
            d.admit(3, 1000 + s * 8);
        }
        assert!(!d.admit(1, 16));
        let mut false_positives = 0;
        d.resize(100_000 / WINDOW);
        for s in 0..50_000u64 {
            d.admit(4, s * 8);
        }
        for s in 50_000..60_000u64 {
            false_positives += usize::from(d.admit(4, s * 8));
        }
        assert!(false_positives < 300, "{false_positives} of 10000");
    }
}
