//! S3-FIFO (Yang et al., SOSP '23): a small FIFO (10% of the cache) that new blocks enter,
//! a main FIFO (90%) for blocks touched again while in the small one, a ghost FIFO of
//! blocks recently evicted from the small one (as many as the main queue holds; a block
//! found there goes straight to main), and a 2-bit frequency per cached block.

use std::collections::HashMap;

use super::nodes::{Nodes, Queue};
use super::Policy;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Where {
    Small,
    Main,
    Ghost,
}

pub struct S3Fifo {
    cap: usize,
    small_cap: usize,
    ghost_cap: usize,
    map: HashMap<u64, (u32, Where)>,
    nodes: Nodes,
    small: Queue,
    main: Queue,
    ghost: Queue,
}

impl S3Fifo {
    pub fn new(cap: usize) -> Self {
        let small_cap = (cap / 10).max(1);
        S3Fifo {
            cap,
            small_cap,
            ghost_cap: (cap - small_cap.min(cap - 1)).max(1),
            map: HashMap::with_capacity(2 * cap),
            nodes: Nodes::with_capacity(2 * cap),
            small: Queue::default(),
            main: Queue::default(),
            ghost: Queue::default(),
        }
    }

    fn cached(&self) -> usize {
        self.small.len + self.main.len
    }

    fn remember_evicted(&mut self, i: u32) {
        if self.ghost.len >= self.ghost_cap {
            let t = self.ghost.tail;
            self.nodes.unlink(&mut self.ghost, t);
            self.map.remove(&self.nodes.block[t as usize]);
            self.nodes.release(t);
        }
        self.nodes.mark[i as usize] = 0;
        self.nodes.push_head(&mut self.ghost, i);
        self.map.insert(self.nodes.block[i as usize], (i, Where::Ghost));
    }

    fn evict_main(&mut self) {
        while self.main.len > 0 {
            let t = self.main.tail;
            self.nodes.unlink(&mut self.main, t);
            let f = self.nodes.mark[t as usize];
            if f > 0 {
                self.nodes.mark[t as usize] = f - 1;
                self.nodes.push_head(&mut self.main, t);
            } else {
                self.map.remove(&self.nodes.block[t as usize]);
                self.nodes.release(t);
                return;
            }
        }
    }

    fn evict_small(&mut self) {
        while self.small.len > 0 {
            let t = self.small.tail;
            self.nodes.unlink(&mut self.small, t);
            if self.nodes.mark[t as usize] > 1 {
                self.nodes.mark[t as usize] = 0;
                self.nodes.push_head(&mut self.main, t);
                self.map.insert(self.nodes.block[t as usize], (t, Where::Main));
                if self.main.len > self.cap - self.small_cap.min(self.cap - 1) {
                    self.evict_main();
                }
            } else {
                self.remember_evicted(t);
                return;
            }
        }
    }

    fn evict(&mut self) {
        if self.small.len >= self.small_cap || self.main.len == 0 {
            self.evict_small();
        } else {
            self.evict_main();
        }
    }
}

impl Policy for S3Fifo {
    fn access(&mut self, block: u64) -> bool {
        match self.map.get(&block).copied() {
            Some((i, Where::Small)) | Some((i, Where::Main)) => {
                let m = &mut self.nodes.mark[i as usize];
                *m = (*m + 1).min(3);
                true
            }
            Some((i, Where::Ghost)) => {
                self.nodes.unlink(&mut self.ghost, i);
                while self.cached() >= self.cap {
                    self.evict();
                }
                self.nodes.mark[i as usize] = 0;
                self.nodes.push_head(&mut self.main, i);
                self.map.insert(block, (i, Where::Main));
                false
            }
            None => {
                while self.cached() >= self.cap {
                    self.evict();
                }
                let i = self.nodes.alloc(block);
                self.nodes.push_head(&mut self.small, i);
                self.map.insert(block, (i, Where::Small));
                false
            }
        }
    }

    fn len(&self) -> usize {
        self.cached()
    }
}
