//! One cache device's share of the allocator: its bucket array, free lists, `free_inc`, the
//! LRU heap, and where its allocator state machine stands.

use std::collections::BinaryHeap;

use super::bucket::{Bucket, INITIAL_PRIO};
use super::fifo::Fifo;
use super::{Replacement, Reserve, RESERVE_NR};

/// Where the allocator of one device stands; see [`super::Allocator::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    /// `free_inc` holds buckets whose new gens are durable: move them to the free lists.
    Draining,
    /// Invalidating buckets into `free_inc` until it is full.
    Filling,
    /// `free_inc` is full of invalidated buckets: their gens must be written out.
    BatchFull,
}

/// A prio write handed to the engine and not yet committed.
#[derive(Clone, Debug)]
pub(crate) struct PrioInFlight {
    pub buckets: Vec<u64>,
    pub seq: u64,
}

pub(crate) struct CacheAlloc {
    pub nbuckets: u64,
    pub first_bucket: u64,
    pub replacement: Replacement,
    pub discard: bool,
    pub buckets: Vec<Bucket>,
    pub free: [Fifo; RESERVE_NR],
    pub free_inc: Fifo,
    heap: BinaryHeap<u64>,
    heap_cap: usize,
    fifo_last_bucket: u64,
    rng: u64,
    pub invalidate_needs_gc: bool,
    pub state: State,
    pub discarding: Option<u32>,
    /// Number of prio buckets a full chain takes.
    pub prio_nr: usize,
    /// The chain last committed (what the journal points at); empty before the first write.
    pub prio_buckets: Vec<u64>,
    pub prio_seq: u64,
    pub prio_inflight: Option<PrioInFlight>,
    pub sectors_written: u64,
    pub meta_sectors_written: u64,
}

impl CacheAlloc {
    pub fn new(nbuckets: u64, first_bucket: u64, replacement: Replacement, discard: bool, prio_nr: usize, seed: u64) -> CacheAlloc {
        // bcache's sizing: `free` is nbuckets/1024 rounded up to a power of two.
        let free = (nbuckets.next_power_of_two() >> 10) as usize;
        let mut lists = [Fifo::new(0), Fifo::new(0), Fifo::new(0), Fifo::new(0)];
        lists[Reserve::Btree as usize] = Fifo::new(8);
        lists[Reserve::Prio as usize] = Fifo::new(prio_nr);
        lists[Reserve::MovingGc as usize] = Fifo::new(free);
        lists[Reserve::None as usize] = Fifo::new(free);
        CacheAlloc {
            nbuckets,
            first_bucket,
            replacement,
            discard,
            buckets: vec![Bucket::default(); nbuckets as usize],
            free: lists,
            free_inc: Fifo::new(free << 2),
            heap: BinaryHeap::with_capacity(free << 3),
            heap_cap: free << 3,
            fifo_last_bucket: first_bucket,
            rng: seed ^ 0x9E37_79B9_7F4A_7C15,
            invalidate_needs_gc: false,
            state: State::Filling,
            discarding: None,
            prio_nr,
            prio_buckets: Vec::new(),
            prio_seq: 0,
            prio_inflight: None,
            sectors_written: 0,
            meta_sectors_written: 0,
        }
    }

    /// Puts a ready bucket on a free list: the prio reserve first (prio writes unblock
    /// everything else), then the others in reserve order.
    #[inline]
    pub fn push_free(&mut self, b: u32) -> bool {
        if self.free[Reserve::Prio as usize].push(b) {
            return true;
        }
        self.free.iter_mut().any(|f| f.push(b))
    }

    #[inline]
    pub fn has_free_room(&self) -> bool {
        self.free.iter().any(|f| !f.is_full())
    }

    /// bcache's `__bch_invalidate_one_bucket`: bump the gen (every pointer into the bucket is
    /// now stale), reset the prio, and pin the bucket while it waits to be handed out.
    #[inline]
    pub fn invalidate_one(&mut self, idx: usize, need_gc: &mut u8) {
        let b = &mut self.buckets[idx];
        b.gen = b.gen.wrapping_add(1);
        *need_gc = (*need_gc).max(b.gc_gen());
        b.prio = INITIAL_PRIO;
        b.pin += 1;
    }

    fn invalidate_to_free_inc(&mut self, idx: usize, need_gc: &mut u8) {
        self.invalidate_one(idx, need_gc);
        self.free_inc.push(idx as u32);
    }

    /// Fills `free_inc` by the device's replacement policy. Sets `invalidate_needs_gc` when the
    /// policy ran out of candidates before `free_inc` was full.
    pub fn invalidate_buckets(&mut self, min_prio: u16, need_gc: &mut u8) {
        match self.replacement {
            Replacement::Lru => self.invalidate_lru(min_prio, need_gc),
            Replacement::Fifo => self.invalidate_fifo(need_gc),
            Replacement::Random => self.invalidate_random(need_gc),
        }
    }

    /// Picks the `free_inc`-sized batch of eligible buckets with the smallest [`lru_weight`]:
    /// one pass over the array keeps the best `heap_cap` candidates in a max-heap, then they
    /// are taken smallest first.
    fn invalidate_lru(&mut self, min_prio: u16, need_gc: &mut u8) {
        let base = u64::from(INITIAL_PRIO.saturating_sub(min_prio) / 8);
        let cap = self.heap_cap;
        let first = self.first_bucket as usize;
        let mut heap = std::mem::take(&mut self.heap);
        heap.clear();
        // Most buckets lose to the heap's current worst: compare against a cached copy of it
        // and leave the heap to a cold path for the few that win.
        // Most buckets lose to the heap's current worst: compare against a cached copy of it
        // and leave the heap to a cold path for the few that win.
        let mut worst = u64::MAX;
        for (i, b) in (first as u64..).zip(&self.buckets[first..]) {
            // Weight in the high half, index in the low half: ties go to the lower index.
            let key = (weight(b.prio, b.sectors_used(), min_prio, base) << 32) | i;
            if b.can_invalidate() & (key < worst) {
                worst = heap_offer(&mut heap, cap, key);
            }
        }
        let mut picked = heap.into_sorted_vec();
        for &key in picked.iter() {
            if self.free_inc.is_full() {
                break;
            }
            self.invalidate_to_free_inc((key & 0xFFFF_FFFF) as usize, need_gc);
        }
        // Candidates ran out first: only GC can turn up more.
        if !self.free_inc.is_full() {
            self.invalidate_needs_gc = true;
        }
        picked.clear();
        self.heap = BinaryHeap::from(picked);
    }

    fn invalidate_fifo(&mut self, need_gc: &mut u8) {
        let mut checked = 0u64;
        while !self.free_inc.is_full() {
            if self.fifo_last_bucket < self.first_bucket || self.fifo_last_bucket >= self.nbuckets {
                self.fifo_last_bucket = self.first_bucket;
            }
            let idx = self.fifo_last_bucket as usize;
            self.fifo_last_bucket += 1;
            if self.buckets[idx].can_invalidate() {
                self.invalidate_to_free_inc(idx, need_gc);
            }
            checked += 1;
            if checked >= self.nbuckets {
                self.invalidate_needs_gc = true;
                return;
            }
        }
    }

    fn invalidate_random(&mut self, need_gc: &mut u8) {
        let span = self.nbuckets - self.first_bucket;
        let mut checked = 0u64;
        while !self.free_inc.is_full() {
            let idx = (self.first_bucket + self.next_random() % span) as usize;
            if self.buckets[idx].can_invalidate() {
                self.invalidate_to_free_inc(idx, need_gc);
            }
            checked += 1;
            if checked >= self.nbuckets / 2 {
                self.invalidate_needs_gc = true;
                return;
            }
        }
    }

    /// splitmix64: cheap, and deterministic for a given seed so tests can replay a run.
    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Adds `key` to the bounded max-heap of the best candidates, displacing its worst when full;
/// returns the bar a later key must get under (u64::MAX while the heap is not full).
#[cold]
#[inline(never)]
fn heap_offer(heap: &mut BinaryHeap<u64>, cap: usize, key: u64) -> u64 {
    if heap.len() < cap {
        heap.push(key);
        if heap.len() < cap {
            return u64::MAX;
        }
    } else {
        *heap.peek_mut().expect("heap is full") = key;
    }
    *heap.peek().expect("heap is full")
}

/// bcache's `bucket_prio`: the prio above the set's minimum, plus an eighth of the range up to
/// INITIAL_PRIO so that even the oldest bucket keeps some weight, times the sectors still used.
/// An emptier bucket is cheaper to throw away.
#[inline]
fn weight(prio: u16, sectors: u32, min_prio: u16, base: u64) -> u64 {
    (u64::from(prio.saturating_sub(min_prio)) + base) * u64::from(sectors)
}

/// The LRU ordering key of a bucket with this prio and sectors used, given the set's
/// `min_prio` (smaller is invalidated first).
pub fn lru_weight(prio: u16, sectors_used: u32, min_prio: u16) -> u64 {
    weight(prio, sectors_used, min_prio, u64::from(INITIAL_PRIO.saturating_sub(min_prio) / 8))
}
