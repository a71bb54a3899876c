//! ARC (Megiddo and Modha, FAST '03): recency (T1) and frequency (T2) lists of cached blocks,
//! ghost lists (B1, B2) of blocks recently evicted from each, and a target size `p` for T1
//! that a ghost hit moves towards the list that would have kept the block.

use std::collections::HashMap;

use super::nodes::{Nodes, Queue};
use super::Policy;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Where {
    T1,
    T2,
    B1,
    B2,
}

pub struct Arc {
    c: usize,
    p: usize,
    map: HashMap<u64, (u32, Where)>,
    nodes: Nodes,
    t1: Queue,
    t2: Queue,
    b1: Queue,
    b2: Queue,
}

impl Arc {
    pub fn new(c: usize) -> Self {
        Arc {
            c,
            p: 0,
            map: HashMap::with_capacity(2 * c),
            nodes: Nodes::with_capacity(2 * c),
            t1: Queue::default(),
            t2: Queue::default(),
            b1: Queue::default(),
            b2: Queue::default(),
        }
    }

    fn queue(&mut self, w: Where) -> &mut Queue {
        match w {
            Where::T1 => &mut self.t1,
            Where::T2 => &mut self.t2,
            Where::B1 => &mut self.b1,
            Where::B2 => &mut self.b2,
        }
    }

    fn unlink(&mut self, i: u32, w: Where) {
        let mut q = *self.queue(w);
        self.nodes.unlink(&mut q, i);
        *self.queue(w) = q;
    }

    fn push(&mut self, i: u32, w: Where) {
        let mut q = *self.queue(w);
        self.nodes.push_head(&mut q, i);
        *self.queue(w) = q;
        let b = self.nodes.block[i as usize];
        self.map.insert(b, (i, w));
    }

    /// Moves the tail of `from` to the head of `to`.
    fn demote(&mut self, from: Where, to: Where) {
        let t = self.queue(from).tail;
        self.unlink(t, from);
        self.push(t, to);
    }

    /// Drops the tail of a ghost list.
    fn drop_tail(&mut self, w: Where) {
        let t = self.queue(w).tail;
        self.unlink(t, w);
        self.map.remove(&self.nodes.block[t as usize]);
        self.nodes.release(t);
    }

    /// REPLACE: evicts from T1 into B1 or from T2 into B2.
    fn replace(&mut self, in_b2: bool) {
        let t1 = self.t1.len;
        if t1 > 0 && (t1 > self.p || (in_b2 && t1 == self.p)) {
            self.demote(Where::T1, Where::B1);
        } else if self.t2.len > 0 {
            self.demote(Where::T2, Where::B2);
        } else {
            self.demote(Where::T1, Where::B1);
        }
    }
}

impl Policy for Arc {
    fn access(&mut self, block: u64) -> bool {
        let c = self.c;
        match self.map.get(&block).copied() {
            Some((i, Where::T1)) | Some((i, Where::T2)) => {
                let w = self.map[&block].1;
                self.unlink(i, w);
                self.push(i, Where::T2);
                true
            }
            Some((i, Where::B1)) => {
                let delta = (self.b2.len / self.b1.len).max(1);
                self.p = (self.p + delta).min(c);
                self.replace(false);
                self.unlink(i, Where::B1);
                self.push(i, Where::T2);
                false
            }
            Some((i, Where::B2)) => {
                let delta = (self.b1.len / self.b2.len).max(1);
                self.p = self.p.saturating_sub(delta);
                self.replace(true);
                self.unlink(i, Where::B2);
                self.push(i, Where::T2);
                false
            }
            None => {
                let l1 = self.t1.len + self.b1.len;
                if l1 == c {
                    if self.t1.len < c {
                        self.drop_tail(Where::B1);
                        self.replace(false);
                    } else {
                        // B1 is empty: the tail of T1 goes for good.
                        self.drop_tail(Where::T1);
                    }
                } else {
                    let total = l1 + self.t2.len + self.b2.len;
                    if total >= c {
                        if total == 2 * c {
                            self.drop_tail(Where::B2);
                        }
                        self.replace(false);
                    }
                }
                let i = self.nodes.alloc(block);
                self.push(i, Where::T1);
                false
            }
        }
    }

    fn len(&self) -> usize {
        self.t1.len + self.t2.len
    }
}
