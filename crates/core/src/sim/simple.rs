//! LRU and FIFO.

use super::nodes::Resident;
use super::Policy;

/// Least recently used: a hit moves the block to the head; a miss evicts the tail.
pub struct Lru {
    cap: usize,
    r: Resident,
}

impl Lru {
    pub fn new(cap: usize) -> Self {
        Lru { cap, r: Resident::with_capacity(cap) }
    }
}

impl Policy for Lru {
    fn access(&mut self, block: u64) -> bool {
        if let Some(i) = self.r.find(block) {
            self.r.touch(i);
            return true;
        }
        if self.r.q.len == self.cap {
            self.r.evict(self.r.q.tail);
        }
        self.r.admit(block);
        false
    }

    fn len(&self) -> usize {
        self.r.q.len
    }
}

/// First in, first out: hits change nothing; a miss evicts the oldest admitted block.
pub struct Fifo {
    cap: usize,
    r: Resident,
}

impl Fifo {
    pub fn new(cap: usize) -> Self {
        Fifo { cap, r: Resident::with_capacity(cap) }
    }
}

impl Policy for Fifo {
    fn access(&mut self, block: u64) -> bool {
        if self.r.find(block).is_some() {
            return true;
        }
        if self.r.q.len == self.cap {
            self.r.evict(self.r.q.tail);
        }
        self.r.admit(block);
        false
    }

    fn len(&self) -> usize {
        self.r.q.len
    }
}
