//! SIEVE (Zhang et al., NSDI '24): a FIFO queue with a visited bit per block and a hand
//! that moves from the oldest end towards the newest, clearing bits, and evicts the first
//! block it finds unvisited; survivors stay where they are.

use std::collections::HashMap;

use super::nodes::{Nodes, Queue, NIL};
use super::Policy;

pub struct Sieve {
    cap: usize,
    map: HashMap<u64, u32>,
    nodes: Nodes,
    q: Queue,
    hand: u32,
}

impl Sieve {
    pub fn new(cap: usize) -> Self {
        Sieve {
            cap,
            map: HashMap::with_capacity(cap),
            nodes: Nodes::with_capacity(cap),
            q: Queue::default(),
            hand: NIL,
        }
    }

    fn evict(&mut self) {
        let mut o = if self.hand != NIL { self.hand } else { self.q.tail };
        while self.nodes.mark[o as usize] != 0 {
            self.nodes.mark[o as usize] = 0;
            o = self.nodes.newer(o);
            if o == NIL {
                o = self.q.tail;
            }
        }
        self.hand = self.nodes.newer(o);
        self.nodes.unlink(&mut self.q, o);
        self.map.remove(&self.nodes.block[o as usize]);
        self.nodes.release(o);
    }
}

impl Policy for Sieve {
    fn access(&mut self, block: u64) -> bool {
        if let Some(&i) = self.map.get(&block) {
            self.nodes.mark[i as usize] = 1;
            return true;
        }
        if self.q.len == self.cap {
            self.evict();
        }
        let i = self.nodes.alloc(block);
        self.nodes.push_head(&mut self.q, i);
        self.map.insert(block, i);
        false
    }

    fn len(&self) -> usize {
        self.q.len
    }
}
