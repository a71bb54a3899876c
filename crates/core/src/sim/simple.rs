//! LRU and FIFO.

use std::collections::HashMap;

use super::nodes::{Nodes, Queue};
use super::Policy;

/// Least recently used: a hit moves the block to the head; a miss evicts the tail.
pub struct Lru {
    cap: usize,
    map: HashMap<u64, u32>,
    nodes: Nodes,
    q: Queue,
}

impl Lru {
    pub fn new(cap: usize) -> Self {
        Lru { cap, map: HashMap::with_capacity(cap), nodes: Nodes::with_capacity(cap), q: Queue::default() }
    }
}

impl Policy for Lru {
    fn access(&mut self, block: u64) -> bool {
        if let Some(&i) = self.map.get(&block) {
            self.nodes.unlink(&mut self.q, i);
            self.nodes.push_head(&mut self.q, i);
            return true;
        }
        if self.q.len == self.cap {
            let t = self.q.tail;
            self.nodes.unlink(&mut self.q, t);
            self.map.remove(&self.nodes.block[t as usize]);
            self.nodes.release(t);
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

/// First in, first out: hits change nothing; a miss evicts the oldest admitted block.
pub struct Fifo {
    cap: usize,
    map: HashMap<u64, u32>,
    nodes: Nodes,
    q: Queue,
}

impl Fifo {
    pub fn new(cap: usize) -> Self {
        Fifo { cap, map: HashMap::with_capacity(cap), nodes: Nodes::with_capacity(cap), q: Queue::default() }
    }
}

impl Policy for Fifo {
    fn access(&mut self, block: u64) -> bool {
        if self.map.contains_key(&block) {
            return true;
        }
        if self.q.len == self.cap {
            let t = self.q.tail;
            self.nodes.unlink(&mut self.q, t);
            self.map.remove(&self.nodes.block[t as usize]);
            self.nodes.release(t);
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
