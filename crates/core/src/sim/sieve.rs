//! SIEVE (Zhang et al., NSDI '24): a FIFO queue with a visited bit per block and a hand
//! that moves from the oldest end towards the newest, clearing bits, and evicts the first
//! block it finds unvisited; survivors stay where they are.

use super::nodes::{Resident, NIL};
use super::Policy;

pub struct Sieve {
    cap: usize,
    r: Resident,
    hand: u32,
}

impl Sieve {
    pub fn new(cap: usize) -> Self {
        Sieve { cap, r: Resident::with_capacity(cap), hand: NIL }
    }

    fn evict(&mut self) {
        let r = &mut self.r;
        let mut o = if self.hand != NIL { self.hand } else { r.q.tail };
        while r.nodes.mark[o as usize] != 0 {
            r.nodes.mark[o as usize] = 0;
            o = r.nodes.newer(o);
            if o == NIL {
                o = r.q.tail;
            }
        }
        self.hand = r.nodes.newer(o);
        r.evict(o);
    }
}

impl Policy for Sieve {
    fn access(&mut self, block: u64) -> bool {
        if let Some(i) = self.r.find(block) {
            self.r.nodes.mark[i as usize] = 1;
            return true;
        }
        if self.r.q.len == self.cap {
            self.evict();
        }
        self.r.admit(block);
        false
    }

    fn len(&self) -> usize {
        self.r.q.len
    }
}
