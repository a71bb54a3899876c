//! Doubly linked queues over one slab of nodes, shared by the list-based policies (a node
//! is in one queue at a time; moving it is two unlinks and a link, no allocation).

pub const NIL: u32 = u32::MAX;

/// A queue: `head` is the newest end, `tail` the oldest.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    pub head: u32,
    pub tail: u32,
    pub len: usize,
}

impl Default for Queue {
    fn default() -> Self {
        Queue { head: NIL, tail: NIL, len: 0 }
    }
}

/// The slab: each node's block, links and a small per-policy counter (`mark`).
#[derive(Debug, Default)]
pub struct Nodes {
    pub block: Vec<u64>,
    prev: Vec<u32>,
    next: Vec<u32>,
    pub mark: Vec<u8>,
    free: Vec<u32>,
}

impl Nodes {
    pub fn with_capacity(n: usize) -> Self {
        Nodes {
            block: Vec::with_capacity(n),
            prev: Vec::with_capacity(n),
            next: Vec::with_capacity(n),
            mark: Vec::with_capacity(n),
            free: Vec::new(),
        }
    }

    /// A free node holding `block` (mark 0), linked nowhere.
    pub fn alloc(&mut self, block: u64) -> u32 {
        if let Some(i) = self.free.pop() {
            let u = i as usize;
            self.block[u] = block;
            self.mark[u] = 0;
            self.prev[u] = NIL;
            self.next[u] = NIL;
            return i;
        }
        self.block.push(block);
        self.prev.push(NIL);
        self.next.push(NIL);
        self.mark.push(0);
        (self.block.len() - 1) as u32
    }

    pub fn release(&mut self, i: u32) {
        self.free.push(i);
    }

    /// Links `i` at the head (newest end) of `q`.
    pub fn push_head(&mut self, q: &mut Queue, i: u32) {
        let u = i as usize;
        self.prev[u] = NIL;
        self.next[u] = q.head;
        if q.head != NIL {
            self.prev[q.head as usize] = i;
        } else {
            q.tail = i;
        }
        q.head = i;
        q.len += 1;
    }

    /// Unlinks `i` from `q`.
    pub fn unlink(&mut self, q: &mut Queue, i: u32) {
        let u = i as usize;
        let (p, n) = (self.prev[u], self.next[u]);
        if p != NIL {
            self.next[p as usize] = n;
        } else {
            q.head = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        } else {
            q.tail = p;
        }
        self.prev[u] = NIL;
        self.next[u] = NIL;
        q.len -= 1;
    }

    /// The node newer than `i` (towards the head), or NIL.
    pub fn newer(&self, i: u32) -> u32 {
        self.prev[i as usize]
    }
}

/// The blocks of a single-queue policy (LRU, FIFO, SIEVE): a map from block to node and one
/// queue, newest at the head.
#[derive(Debug, Default)]
pub struct Resident {
    map: std::collections::HashMap<u64, u32>,
    pub nodes: Nodes,
    pub q: Queue,
}

impl Resident {
    pub fn with_capacity(n: usize) -> Self {
        Resident {
            map: std::collections::HashMap::with_capacity(n),
            nodes: Nodes::with_capacity(n),
            q: Queue::default(),
        }
    }

    /// The node of `block`, if cached.
    pub fn find(&self, block: u64) -> Option<u32> {
        self.map.get(&block).copied()
    }

    /// Caches `block` at the head.
    pub fn admit(&mut self, block: u64) {
        let i = self.nodes.alloc(block);
        self.nodes.push_head(&mut self.q, i);
        self.map.insert(block, i);
    }

    /// Drops node `i` from the cache.
    pub fn evict(&mut self, i: u32) {
        self.nodes.unlink(&mut self.q, i);
        self.map.remove(&self.nodes.block[i as usize]);
        self.nodes.release(i);
    }

    /// Moves node `i` to the head.
    pub fn touch(&mut self, i: u32) {
        self.nodes.unlink(&mut self.q, i);
        self.nodes.push_head(&mut self.q, i);
    }
}
