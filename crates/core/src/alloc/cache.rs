//! One cache device's share of the allocator: its bucket array, free lists, `free_inc`, the
//! LRU heap, and where its allocator state machine stands.

use std::collections::BinaryHeap;

use super::bucket::{Bucket, BUCKET_GC_GEN_MAX, INITIAL_PRIO};
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
    /// Every bucket's prio-file entry (prio u16 LE, gen u8), kept up to date as prios and gens
    /// change so that a prio write copies it instead of re-reading the whole bucket array.
    /// Empty until the first prio write builds it.
    pub image: Vec<u8>,
    /// S3-FIFO's clock (see `alloc::s3fifo`).
    pub(crate) s3: super::s3fifo::Clock,
}

impl CacheAlloc {
    pub fn new(
        nbuckets: u64,
        first_bucket: u64,
        replacement: Replacement,
        discard: bool,
        prio_nr: usize,
        seed: u64,
    ) -> CacheAlloc {
        // bcache's sizing: `free` is nbuckets/1024 rounded up to a power of two (at least
        // one, for caches of fewer than 1024 buckets).
        let free = ((nbuckets.next_power_of_two() >> 10) as usize).max(1);
        // One invalidation batch per prio write. bcache's (`free` × 4) makes a small cache
        // rewrite its whole prio chain for a handful of buckets: a 1 GiB cache of 512 KiB
        // buckets wrote a 512 KiB prio bucket per 8 buckets, 512 bytes of metadata per
        // 4 KiB written. The batch is therefore at least 512 buckets per prio bucket of
        // the chain (a prio write is 0.2% of the data written), but at most a sixteenth of
        // the cache.
        let batch = (free << 2).max((prio_nr * 512).min(nbuckets as usize / 16));
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
            free_inc: Fifo::new(batch),
            heap: BinaryHeap::with_capacity(batch * 2),
            heap_cap: batch * 2,
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
            image: Vec::new(),
            s3: Default::default(),
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

    /// True when the free lists hold a bucket for every link of a prio chain: what
    /// [`super::Allocator::prio_write_begin`] takes (`Reserve::None` first, then the prio reserve).
    #[inline]
    pub fn prio_write_placeable(&self) -> bool {
        self.free[Reserve::None as usize].len() + self.free[Reserve::Prio as usize].len() >= self.prio_nr
    }

    #[inline]
    pub fn has_free_room(&self) -> bool {
        self.free.iter().any(|f| !f.is_full())
    }

    /// Records bucket `idx`'s current prio and gen in the prio-file image, if there is one.
    #[inline]
    pub fn note(&mut self, idx: usize) {
        if let Some(e) = self.image.get_mut(idx * 3..idx * 3 + 3) {
            let b = &self.buckets[idx];
            let p = b.prio.to_le_bytes();
            e.copy_from_slice(&[p[0], p[1], b.gen]);
        }
    }

    /// Forgets the image (after changes too many to follow one by one).
    pub fn drop_image(&mut self) {
        self.image = Vec::new();
    }

    /// The prio-file entries of buckets `start..end`, building the image first if needed.
    pub fn entries(&mut self, start: usize, end: usize) -> &[u8] {
        if self.image.is_empty() {
            self.image = vec![0; self.buckets.len() * super::prio::PRIO_ENTRY_BYTES];
            super::prio::encode_entries(&self.buckets, &mut self.image);
        }
        let img = &self.image[start * 3..end * 3];
        debug_assert!(
            {
                let mut fresh = vec![0u8; img.len()];
                super::prio::encode_entries(&self.buckets[start..end], &mut fresh);
                fresh == img
            },
            "the prio-file image missed a change"
        );
        img
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
        self.note(idx);
    }

    pub(crate) fn invalidate_to_free_inc(&mut self, idx: usize, need_gc: &mut u8) {
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
            Replacement::S3Fifo | Replacement::TinyLfu => self.invalidate_s3fifo(need_gc),
        }
    }

    /// Picks the `free_inc`-sized batch of eligible buckets with the smallest [`lru_weight`]:
    /// one pass over the array keeps the best `heap_cap` candidates in a max-heap, then they
    /// are taken smallest first.
    fn invalidate_lru(&mut self, min_prio: u16, need_gc: &mut u8) {
        let cap = self.heap_cap;
        let first = self.first_bucket as usize;
        let mut heap = std::mem::take(&mut self.heap);
        heap.clear();
        lru_scan(&self.buckets, first, min_prio, &mut heap, cap);
        let mut picked = heap.into_vec();
        picked.sort_unstable();
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

/// Fills `heap` with the `cap` smallest LRU keys (weight << 32 | index) among the buckets from
/// `first` on that can be invalidated.
pub(crate) fn lru_scan(buckets: &[Bucket], first: usize, min_prio: u16, heap: &mut BinaryHeap<u64>, cap: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2, checked just above.
            unsafe { lru_scan_avx2(buckets, first, min_prio, heap, cap) };
            return;
        }
    }
    lru_scan_scalar(buckets, first, min_prio, heap, cap, u64::MAX);
}

/// The scan one bucket at a time, from `first` on, with `worst` the heap's bar so far. Most
/// buckets lose to the heap's current worst: compare against a cached copy of it and leave the
/// heap to a cold path for the few that win.
pub(crate) fn lru_scan_scalar(
    buckets: &[Bucket],
    first: usize,
    min_prio: u16,
    heap: &mut BinaryHeap<u64>,
    cap: usize,
    mut worst: u64,
) {
    let base = u64::from(INITIAL_PRIO.saturating_sub(min_prio) / 8) + 1;
    for (i, b) in (first as u64..).zip(&buckets[first..]) {
        // Weight in the high half, index in the low half: ties go to the lower index.
        let key = (weight(b.prio, b.sectors_used(), min_prio, base) << 32) | i;
        if b.can_invalidate() & (key < worst) {
            worst = heap_offer(heap, cap, key);
        }
    }
}

/// The same scan four buckets at a time: each 8-byte bucket is one 64-bit lane (prio in bits
/// 0..16, GC mark and sectors in 16..32, pin in 32..48, gen in 48..56, last_gc in 56..64).
/// Lanes that can be invalidated and weigh strictly less than the heap's worst go to the
/// exact scalar check. Strictly less is exact: buckets are visited in index order, so a later
/// bucket of equal weight has the larger key.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lru_scan_avx2(buckets: &[Bucket], first: usize, min_prio: u16, heap: &mut BinaryHeap<u64>, cap: usize) {
    use std::arch::x86_64::*;
    const _: () = assert!(std::mem::size_of::<Bucket>() == 8);
    let base = u64::from(INITIAL_PRIO.saturating_sub(min_prio) / 8) + 1;
    let min16 = _mm256_set1_epi64x(i64::from(min_prio));
    let low16 = _mm256_set1_epi64x(0xFFFF);
    let base_v = _mm256_set1_epi64x(base as i64);
    let sectors_mask = _mm256_set1_epi64x(0x3FFF);
    // Any pin, or GC mark 2 or 3 (dirty, metadata): bit 17 is the high bit of the mark.
    let busy = _mm256_set1_epi64x(((0xFFFFu64 << 32) | (2 << 16)) as i64);
    let byte = _mm256_set1_epi64x(0xFF);
    let gen_max = _mm256_set1_epi64x(i64::from(BUCKET_GC_GEN_MAX));
    let zero = _mm256_setzero_si256();
    let mut worst = u64::MAX;
    let mut i = first;
    while i + 4 <= buckets.len() {
        // SAFETY: buckets[i..i + 4] is in bounds and is 32 plain bytes (Bucket is repr(C),
        // 8 bytes, no padding); loadu has no alignment requirement.
        let w = unsafe { _mm256_loadu_si256(buckets.as_ptr().add(i).cast::<__m256i>()) };
        // Saturating 16-bit subtract touches only the prio field: min16 is zero elsewhere.
        let prio = _mm256_and_si256(_mm256_subs_epu16(w, min16), low16);
        let sectors = _mm256_and_si256(_mm256_srli_epi64::<18>(w), sectors_mask);
        // (prio + base) < 2^17 and sectors < 2^14: a 32x32 multiply is exact.
        let weights = _mm256_mul_epu32(_mm256_add_epi64(prio, base_v), sectors);
        let idle = _mm256_cmpeq_epi64(_mm256_and_si256(w, busy), zero);
        let gc_gen = _mm256_and_si256(_mm256_sub_epi64(_mm256_srli_epi64::<48>(w), _mm256_srli_epi64::<56>(w)), byte);
        let gen_ok = _mm256_cmpgt_epi64(gen_max, gc_gen);
        let bar = _mm256_set1_epi64x((worst >> 32) as i64);
        let light = _mm256_cmpgt_epi64(bar, weights);
        let hits = _mm256_and_si256(_mm256_and_si256(idle, gen_ok), light);
        let mut mask = _mm256_movemask_pd(_mm256_castsi256_pd(hits)) as u32;
        while mask != 0 {
            let j = i + mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let b = &buckets[j];
            let key = (weight(b.prio, b.sectors_used(), min_prio, base) << 32) | j as u64;
            if key < worst {
                worst = heap_offer(heap, cap, key);
            }
        }
        i += 4;
    }
    lru_scan_scalar(buckets, i, min_prio, heap, cap, worst);
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
/// An emptier bucket is cheaper to throw away. One more than bcache's base: on a young set,
/// whose minimum is still INITIAL_PRIO, bcache's weighs a full bucket nothing, as little as
/// an empty one, and LRU threw away the oldest data while empty buckets were to be had.
#[inline]
fn weight(prio: u16, sectors: u32, min_prio: u16, base: u64) -> u64 {
    (u64::from(prio.saturating_sub(min_prio)) + base) * u64::from(sectors)
}

/// The LRU ordering key of a bucket with this prio and sectors used, given the set's
/// `min_prio` (smaller is invalidated first).
pub fn lru_weight(prio: u16, sectors_used: u32, min_prio: u16) -> u64 {
    weight(prio, sectors_used, min_prio, u64::from(INITIAL_PRIO.saturating_sub(min_prio) / 8) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::bucket::GcMark;

    fn random_buckets(n: usize, seed: u64) -> Vec<Bucket> {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        (0..n)
            .map(|_| {
                let mut b = Bucket { prio: (next() % 70000).min(65535) as u16, gen: next() as u8, ..Bucket::default() };
                b.last_gc = b.gen.wrapping_sub((next() % 110) as u8);
                b.set_mark(
                    [GcMark::Unused, GcMark::Reclaimable, GcMark::Reclaimable, GcMark::Dirty, GcMark::Metadata]
                        [(next() % 5) as usize],
                );
                b.set_sectors_used(if next() % 4 == 0 { 1024 } else { (next() % 20000) as u32 });
                b.pin = if next() % 6 == 0 { (next() % 3) as u16 } else { 0 };
                b
            })
            .collect()
    }

    /// Whatever path the CPU takes, the picks are those of the plain definition: the `cap`
    /// smallest (weight, index) keys of the buckets that can be invalidated.
    #[test]
    fn lru_scan_matches_the_definition() {
        for (seed, n, cap, min_prio, first) in [
            (1, 1000, 64, 0, 1),
            (2, 4099, 8, 30000, 3),
            (3, 10_003, 512, 100, 0),
            (4, 7, 16, 0, 2),
            (5, 5000, 4000, 65535, 5),
        ] {
            let bs = random_buckets(n, seed);
            let mut heap = BinaryHeap::new();
            lru_scan(&bs, first, min_prio, &mut heap, cap);
            let mut want: Vec<u64> = (first..n)
                .filter(|&i| bs[i].can_invalidate())
                .map(|i| (lru_weight(bs[i].prio, bs[i].sectors_used(), min_prio) << 32) | i as u64)
                .collect();
            want.sort_unstable();
            want.truncate(cap);
            assert_eq!(heap.into_sorted_vec(), want, "seed {seed}");
            let mut heap = BinaryHeap::new();
            lru_scan_scalar(&bs, first, min_prio, &mut heap, cap, u64::MAX);
            assert_eq!(heap.into_sorted_vec(), want, "scalar, seed {seed}");
        }
    }
}
