//! The ghost record of a replacement policy (S3-FIFO's ghost queue): where extents the
//! cache evicted started, remembered after their keys went stale and were dropped, so that
//! a read miss there is known to be data returning. A fixed number of fingerprints, the
//! oldest forgotten first; a fingerprint is forgotten too when its data returns.

use std::collections::{HashSet, VecDeque};

#[derive(Default)]
pub(crate) struct Ghost {
    cap: usize,
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

fn fingerprint(inode: u32, start: u64) -> u64 {
    (u64::from(inode).wrapping_mul(0x9E37_79B9_7F4A_7C15)) ^ start
}

impl Ghost {
    /// Remembers at most `cap` extents (0: none, and forgets all).
    pub fn set_capacity(&mut self, cap: usize) {
        self.cap = cap;
        while self.order.len() > cap {
            if let Some(f) = self.order.pop_front() {
                self.set.remove(&f);
            }
        }
    }

    /// An extent of `inode` starting at `start` was evicted.
    pub fn record(&mut self, inode: u32, start: u64) {
        if self.cap == 0 {
            return;
        }
        let f = fingerprint(inode, start);
        if !self.set.insert(f) {
            return;
        }
        self.order.push_back(f);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// True (once) if an evicted extent of `inode` started at `start`.
    pub fn take(&mut self, inode: u32, start: u64) -> bool {
        // The order queue keeps the fingerprint until it falls off: harmless, it is no
        // longer in the set.
        self.cap > 0 && self.set.remove(&fingerprint(inode, start))
    }
}
