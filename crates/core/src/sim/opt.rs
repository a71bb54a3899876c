//! Belady's MIN: the offline optimum for a cache of equal-sized blocks. On a miss with the
//! cache full, of the cached blocks and the one just missed, the one needed again furthest
//! in the future (or never) is the one not kept: a block missed may be left out of the
//! cache, as an optimal cache would. O(n log c) with a max-heap of next uses, entries made
//! stale by a hit skipped when they surface.

use std::collections::{BinaryHeap, HashMap};

/// Hits of the optimal cache of `capacity` blocks over `trace`.
pub fn opt_hits(trace: &[u64], capacity: usize) -> u64 {
    min_hits(trace, capacity, true)
}

/// Hits of Belady's MIN as first stated, for demand paging: every missed block is admitted,
/// evicting the cached block needed furthest ahead (libCacheSim's `Belady`). At most
/// [`opt_hits`].
pub fn belady_admit_all_hits(trace: &[u64], capacity: usize) -> u64 {
    min_hits(trace, capacity, false)
}

fn min_hits(trace: &[u64], capacity: usize, may_bypass: bool) -> u64 {
    let n = trace.len();
    if n == 0 || capacity == 0 {
        return 0;
    }
    // next[i]: the index of the next access to trace[i]'s block after i, or n for never.
    let mut next = vec![n as u64; n];
    let mut last: HashMap<u64, usize> = HashMap::with_capacity(n.min(1 << 24));
    for i in (0..n).rev() {
        if let Some(j) = last.insert(trace[i], i) {
            next[i] = j as u64;
        }
    }
    drop(last);
    // Cached blocks with the index of their next use; the heap holds (next use, block), some stale.
    let mut cached: HashMap<u64, u64> = HashMap::with_capacity(capacity);
    let mut heap: BinaryHeap<(u64, u64)> = BinaryHeap::with_capacity(capacity * 2);
    let mut hits = 0u64;
    for (i, &b) in trace.iter().enumerate() {
        let nu = next[i];
        if let Some(e) = cached.get_mut(&b) {
            hits += 1;
            *e = nu;
            heap.push((nu, b));
            continue;
        }
        if cached.len() == capacity {
            // The cached block needed furthest ahead (skipping stale heap entries).
            let far = loop {
                let (u, blk) = *heap.peek().expect("a full cache has heap entries");
                if cached.get(&blk) == Some(&u) {
                    break (u, blk);
                }
                heap.pop();
            };
            if may_bypass && far.0 <= nu {
                // The missed block is needed no sooner than any cached one: leave it out.
                continue;
            }
            heap.pop();
            cached.remove(&far.1);
        }
        if may_bypass && nu as usize == n {
            // Never needed again: caching it can only take a place.
            continue;
        }
        cached.insert(b, nu);
        heap.push((nu, b));
        // Keep stale entries from piling up without bound.
        if heap.len() > 4 * capacity + 1024 {
            heap = cached.iter().map(|(&blk, &u)| (u, blk)).collect();
        }
    }
    hits
}
