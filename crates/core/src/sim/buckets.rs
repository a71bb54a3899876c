//! Simulated caches at bucket granularity, as a cache set works: a missed block is written
//! into an open bucket, and space comes back a whole bucket at a time, chosen by
//! `bucket-lru` (the bucket least recently read or filled), `bucket-s3fifo` or
//! `bucket-tinylfu` (ubcache's `s3fifo` and `tinylfu`, docs/replacement.md). What the
//! engine does besides (weighing buckets by the sectors they still hold, invalidating a
//! batch at a time, recording its ghost lazily as stale keys are dropped) is left out: these
//! show what the policies make of a trace when eviction is by the bucket.

use std::collections::{HashMap, HashSet, VecDeque};

use super::{Policy, SimResult};
use crate::{Error, ErrorKind, Result};

/// The bucket-granular policies by name.
pub const BUCKET_POLICIES: [&str; 3] = ["bucket-lru", "bucket-s3fifo", "bucket-tinylfu"];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lru,
    S3Fifo,
    TinyLfu,
}

#[derive(Clone, Default)]
struct Bucket {
    blocks: Vec<u64>,
    /// Last read or fill (LRU); last (re)insertion into its queue (S3-FIFO).
    time: u64,
    main: bool,
    freq: u8,
    live: bool,
}

/// A cache of whole buckets (see the module docs).
pub struct BucketSim {
    kind: Kind,
    per: usize,
    buckets: Vec<Bucket>,
    free: Vec<u32>,
    /// Open buckets for cold and hot (returning) data.
    open: [Option<u32>; 2],
    at: HashMap<u64, u32>,
    now: u64,
    ghost: HashSet<u64>,
    ghost_order: VecDeque<u64>,
    ghost_cap: usize,
    door: HashSet<u64>,
    door_window: usize,
}

impl BucketSim {
    /// A cache of `capacity` blocks in buckets of `per` blocks (at least two buckets).
    pub fn new(name: &str, capacity: usize, per: usize) -> Result<BucketSim> {
        let kind = match name {
            "bucket-lru" => Kind::Lru,
            "bucket-s3fifo" => Kind::S3Fifo,
            "bucket-tinylfu" => Kind::TinyLfu,
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("unknown bucket policy '{name}' (known: {})", BUCKET_POLICIES.join(", ")),
                ))
            }
        };
        if per == 0 || capacity / per < 2 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("a cache of {capacity} blocks holds fewer than two buckets of {per}"),
            ));
        }
        let n = capacity / per;
        Ok(BucketSim {
            kind,
            per,
            buckets: vec![Bucket::default(); n],
            free: (0..n as u32).rev().collect(),
            open: [None, None],
            at: HashMap::new(),
            now: 0,
            ghost: HashSet::new(),
            ghost_order: VecDeque::new(),
            ghost_cap: if kind == Kind::Lru { 0 } else { n * per },
            door: HashSet::new(),
            door_window: n * per * 8,
        })
    }

    fn evict_one(&mut self) {
        let open = self.open;
        let candidates = |b: &(usize, &Bucket)| b.1.live && !open.contains(&Some(b.0 as u32));
        let victim = if self.kind == Kind::Lru {
            self.buckets.iter().enumerate().filter(candidates).min_by_key(|(i, b)| (b.time, *i)).map(|(i, _)| i)
        } else {
            let live = self.buckets.iter().filter(|b| b.live).count();
            let target = live / 10;
            let mut pick = None;
            // Each pass over a queue head either evicts or moves a bucket on (with a read
            // fewer): at most a few rounds per bucket.
            for _ in 0..4 * self.buckets.len() + 4 {
                let small = self.buckets.iter().filter(|b| b.live && !b.main).count();
                let head = |main: bool| {
                    self.buckets
                        .iter()
                        .enumerate()
                        .filter(candidates)
                        .filter(|(_, b)| b.main == main)
                        .min_by_key(|(i, b)| (b.time, *i))
                        .map(|(i, _)| i)
                };
                let (from_small, i) = match (head(false), head(true)) {
                    (Some(s), _) if small > target => (true, s),
                    (_, Some(m)) => (false, m),
                    (Some(s), None) => (true, s),
                    (None, None) => break,
                };
                self.now += 1;
                let b = &mut self.buckets[i];
                if b.freq > 0 {
                    b.freq = if from_small { 0 } else { b.freq - 1 };
                    b.main = true;
                    b.time = self.now;
                } else {
                    pick = Some(i);
                    break;
                }
            }
            pick
        };
        let Some(i) = victim else { return };
        let blocks = std::mem::take(&mut self.buckets[i].blocks);
        for blk in blocks {
            if self.at.get(&blk) == Some(&(i as u32)) {
                self.at.remove(&blk);
                if self.ghost_cap > 0 && self.ghost.insert(blk) {
                    self.ghost_order.push_back(blk);
                    if self.ghost_order.len() > self.ghost_cap {
                        if let Some(old) = self.ghost_order.pop_front() {
                            self.ghost.remove(&old);
                        }
                    }
                }
            }
        }
        self.buckets[i].live = false;
        self.free.push(i as u32);
    }

    fn insert(&mut self, block: u64, hot: bool) {
        let k = usize::from(hot);
        let full = |s: &BucketSim, b: Option<u32>| b.is_none_or(|b| s.buckets[b as usize].blocks.len() >= s.per);
        if full(self, self.open[k]) {
            self.open[k] = None;
            if self.free.is_empty() {
                self.evict_one();
            }
            let Some(b) = self.free.pop() else { return };
            self.buckets[b as usize] =
                Bucket { blocks: Vec::with_capacity(self.per), time: self.now, main: hot, freq: 0, live: true };
            self.open[k] = Some(b);
        }
        let b = self.open[k].expect("an open bucket");
        self.buckets[b as usize].blocks.push(block);
        self.at.insert(block, b);
    }

    /// TinyLFU's doorkeeper: true on the block's second miss within the window.
    fn admit(&mut self, block: u64) -> bool {
        if self.door.remove(&block) {
            return true;
        }
        self.door.insert(block);
        if self.door.len() >= self.door_window {
            self.door.clear();
        }
        false
    }
}

impl Policy for BucketSim {
    fn access(&mut self, block: u64) -> bool {
        self.now += 1;
        if let Some(&b) = self.at.get(&block) {
            let now = self.now;
            let bk = &mut self.buckets[b as usize];
            if self.kind == Kind::Lru {
                bk.time = now;
            } else {
                bk.freq = (bk.freq + 1).min(3);
            }
            return true;
        }
        let returning = self.ghost_cap > 0 && self.ghost.remove(&block);
        if self.kind == Kind::TinyLfu && !returning && !self.admit(block) {
            return false;
        }
        self.insert(block, returning);
        false
    }

    fn len(&self) -> usize {
        self.at.len()
    }
}

/// Runs `trace` through the bucket-granular policy `name` with `capacity` blocks in buckets
/// of `bucket` blocks.
pub fn simulate_buckets(name: &str, trace: &[u64], capacity: usize, bucket: usize) -> Result<SimResult> {
    Ok(super::run(&mut BucketSim::new(name, capacity, bucket)?, trace))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_traces() {
        // Two buckets of two blocks, LRU: 1 2 fill bucket A, 3 4 bucket B; a read of 1 makes
        // A the newest; 5 needs a bucket: B (3, 4) goes, A stays.
        let mut p = BucketSim::new("bucket-lru", 4, 2).unwrap();
        let hits: Vec<bool> = [1, 2, 3, 4, 1, 5, 1, 2, 3].iter().map(|&b| p.access(b)).collect();
        assert_eq!(hits, [false, false, false, false, true, false, true, true, false]);
        // S3-FIFO: a scan (10..) passes through without pushing out the block read twice.
        let mut p = BucketSim::new("bucket-s3fifo", 40, 2).unwrap();
        p.access(1);
        p.access(2);
        p.access(1);
        for b in 10..200 {
            p.access(b);
        }
        assert!(p.access(1), "the bucket read again survived the scan");
        assert!(p.len() <= 40);
        // tinylfu: a block enters on its second miss only.
        let mut p = BucketSim::new("bucket-tinylfu", 8, 2).unwrap();
        assert!(!p.access(7));
        assert!(!p.access(7));
        assert!(p.access(7));
        assert!(BucketSim::new("bucket-lru", 3, 2).is_err(), "fewer than two buckets");
        assert!(BucketSim::new("bucket-clock", 8, 2).is_err());
    }

    #[test]
    fn never_holds_more_than_its_size() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        for name in BUCKET_POLICIES {
            let mut p = BucketSim::new(name, 64, 4).unwrap();
            for _ in 0..20_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                p.access(x % 500);
                assert!(p.len() <= 64, "{name}: {} blocks", p.len());
            }
        }
    }
}
