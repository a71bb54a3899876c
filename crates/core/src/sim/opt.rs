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

/// For each access, the index of the next access to its block, or the trace's length for never.
fn next_uses(trace: &[u64]) -> Vec<u64> {
    let n = trace.len();
    let mut next = vec![n as u64; n];
    let mut last: HashMap<u64, usize> = HashMap::with_capacity(n.min(1 << 24));
    for i in (0..n).rev() {
        if let Some(j) = last.insert(trace[i], i) {
            next[i] = j as u64;
        }
    }
    next
}

fn min_hits(trace: &[u64], capacity: usize, may_bypass: bool) -> u64 {
    let n = trace.len();
    if n == 0 || capacity == 0 {
        return 0;
    }
    let next = next_uses(trace);
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

/// Hits of Belady's rule applied at bucket granularity, for a cache that, like bcache,
/// fills one bucket at a time and can only evict whole buckets: every missed block is
/// appended to the open bucket (a new one once it is full), and when a new bucket is
/// needed with all `capacity / bucket` taken, the bucket whose next needed block is
/// furthest ahead goes with all its blocks. Hits do not move blocks. This is the rule, not
/// a proven optimum (choosing buckets optimally is a harder problem), and with one block
/// per bucket it is [`belady_admit_all_hits`]. At most that.
pub fn bucket_min_hits(trace: &[u64], capacity: usize, bucket: usize) -> u64 {
    let n = trace.len();
    if n == 0 || capacity == 0 {
        return 0;
    }
    // A bucket larger than the cache is the whole cache.
    let bucket = bucket.clamp(1, capacity);
    let slots = capacity / bucket;
    let next = next_uses(trace);
    // Cached blocks: their bucket and next use. Buckets: their blocks (a slot table).
    let mut cached: HashMap<u64, (usize, u64)> = HashMap::with_capacity(capacity);
    let mut buckets: Vec<Vec<u64>> = Vec::with_capacity(slots);
    let mut free: Vec<usize> = Vec::new();
    let mut live = 0usize;
    let mut open: Option<usize> = None;
    let mut hits = 0u64;
    for (i, &b) in trace.iter().enumerate() {
        let nu = next[i];
        if let Some(e) = cached.get_mut(&b) {
            hits += 1;
            e.1 = nu;
            continue;
        }
        let need_new = match open {
            Some(o) => buckets[o].len() >= bucket,
            None => true,
        };
        if need_new {
            if live == slots {
                // The bucket whose soonest needed block is furthest ahead.
                let mut victim = usize::MAX;
                let mut best = 0u64;
                for (k, blocks) in buckets.iter().enumerate() {
                    if blocks.is_empty() && !free.is_empty() && free.contains(&k) {
                        continue;
                    }
                    let soonest = blocks.iter().map(|blk| cached[blk].1).min().unwrap_or(u64::MAX);
                    if victim == usize::MAX || soonest > best {
                        victim = k;
                        best = soonest;
                    }
                }
                for blk in std::mem::take(&mut buckets[victim]) {
                    cached.remove(&blk);
                }
                free.push(victim);
                live -= 1;
            }
            let slot = match free.pop() {
                Some(s) => s,
                None => {
                    buckets.push(Vec::with_capacity(bucket));
                    buckets.len() - 1
                }
            };
            live += 1;
            open = Some(slot);
        }
        let o = open.expect("an open bucket");
        buckets[o].push(b);
        cached.insert(b, (o, nu));
    }
    hits
}
