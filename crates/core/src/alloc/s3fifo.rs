//! S3-FIFO (Yang et al., SOSP '23) at bucket granularity: what is admitted is a bucket of
//! newly written data, what is touched is an extent in a bucket, what is evicted is a bucket.
//!
//! New buckets join a small FIFO queue. When a bucket reaches the head of the small queue it
//! moves to the main queue if any of its data was read since it was written, and is evicted
//! otherwise: data read once (a scan the sequential cutoff missed, a one-hit wonder) leaves
//! after a tenth of the cache's turnover instead of pushing out the data read again and
//! again. The main queue is a FIFO with reinsertion (a CLOCK): a bucket at its head with a
//! nonzero frequency goes back to the tail with the frequency lowered by one, one with zero
//! is evicted. The small queue holds a tenth of the data buckets.
//!
//! All of a bucket's state lives in its 16-bit prio, so bcache's prio chain persists it with
//! no format change and a restart keeps the queues: bit 15 the queue (1: main), bits 13-14
//! a frequency saturating at 3, bits 0-12 the epoch of its last (re)insertion, counted
//! modulo [`EPOCHS`] (the epoch moves on every nbuckets/4096 buckets allocated, so a whole
//! turnover of the cache is 4096 epochs). Ages are clamped at [`AGE_CLAMP`] epochs, so a
//! bucket held back for long (dirty, pinned) never wraps around to look young. A prio is
//! never `BTREE_PRIO` (the epoch never reaches 8191). After a restart, the current epoch is
//! the newest one found: the one before the widest gap in the circle of epochs in use.

use super::bucket::{GcMark, BTREE_PRIO, INITIAL_PRIO};
use super::cache::CacheAlloc;

/// Epochs run modulo this: 13 bits, never all ones.
pub const EPOCHS: u16 = 8191;
/// Ages beyond this are clamped to it.
pub const AGE_CLAMP: u16 = 6144;
/// Percent of the data buckets the small queue holds (S3-FIFO's 10%).
pub const SMALL_PERCENT: u64 = 10;
const MAIN: u16 = 1 << 15;
const FREQ_SHIFT: u16 = 13;
/// Highest frequency a bucket records.
pub const FREQ_MAX: u16 = 3;

/// The prio of a bucket in the main queue (`main`) or the small one, read `freq` times
/// since it was (re)inserted at `epoch`.
#[inline]
pub fn encode(main: bool, freq: u16, epoch: u16) -> u16 {
    (if main { MAIN } else { 0 }) | (freq.min(FREQ_MAX) << FREQ_SHIFT) | (epoch % EPOCHS)
}

/// True for a bucket of the main queue.
#[inline]
pub fn in_main(prio: u16) -> bool {
    prio & MAIN != 0
}

/// Reads of the bucket since it was (re)inserted, saturating at [`FREQ_MAX`].
#[inline]
pub fn freq(prio: u16) -> u16 {
    (prio >> FREQ_SHIFT) & FREQ_MAX
}

/// The epoch of the bucket's last (re)insertion.
#[inline]
pub fn epoch(prio: u16) -> u16 {
    prio & 0x1FFF
}

/// The clock of the policy: the current epoch, and buckets allocated in it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Clock {
    pub now: u16,
    allocs: u64,
}

impl CacheAlloc {
    /// How old an epoch is now.
    #[inline]
    fn s3_age(&self, e: u16) -> u16 {
        (self.s3.now + EPOCHS - e % EPOCHS) % EPOCHS
    }

    /// Epochs since the bucket of prio `p` was last (re)inserted into its queue.
    pub(crate) fn s3fifo_age(&self, p: u16) -> u16 {
        self.s3_age(epoch(p))
    }

    /// The prio of a data bucket being allocated: the small queue, or the main one for
    /// data known to be hot (`main`); unread; now. Moves the clock on.
    pub(crate) fn s3fifo_new_prio(&mut self, main: bool) -> u16 {
        self.s3.allocs += 1;
        if self.s3.allocs >= (self.nbuckets / 4096).max(1) {
            self.s3.allocs = 0;
            self.s3.now = (self.s3.now + 1) % EPOCHS;
        }
        encode(main, 0, self.s3.now)
    }

    /// A bucket just allocated for data known to be hot joins the main queue (nothing for
    /// another policy).
    pub(crate) fn s3fifo_join_main(&mut self, idx: usize) {
        if !self.replacement.fifo_queues() {
            return;
        }
        let p = self.buckets[idx].prio;
        self.buckets[idx].prio = encode(true, 0, epoch(p));
        self.note(idx);
    }

    /// A read of data in bucket `idx`: one more to its frequency.
    pub(crate) fn s3fifo_touch(&mut self, idx: usize) {
        let p = self.buckets[idx].prio;
        if p == BTREE_PRIO || freq(p) == FREQ_MAX {
            return;
        }
        self.buckets[idx].prio = encode(in_main(p), freq(p) + 1, epoch(p));
        self.note(idx);
    }

    /// Fills `free_inc` as S3-FIFO evicts (see the module docs): buckets with nothing live
    /// first, then from the small queue while it holds more than its share (read buckets
    /// move to the main queue instead), else from the main queue (read buckets go back to
    /// its tail, one read fewer).
    pub(crate) fn invalidate_s3fifo(&mut self, need_gc: &mut u8) {
        let first = self.first_bucket as usize;
        let mut unused = Vec::new();
        let mut small = Vec::new();
        let mut main = Vec::new();
        let (mut n_small, mut n_main) = (0u64, 0u64);
        for i in first..self.buckets.len() {
            let b = self.buckets[i];
            // Nothing live (a freed prio or btree bucket keeps BTREE_PRIO): taken first.
            if b.mark() == GcMark::Unused {
                if b.can_invalidate() {
                    unused.push(i);
                }
                continue;
            }
            if b.prio == BTREE_PRIO || b.mark() == GcMark::Metadata {
                continue;
            }
            let mut age = self.s3_age(epoch(b.prio));
            if age > AGE_CLAMP {
                age = AGE_CLAMP;
                let e = (self.s3.now + EPOCHS - AGE_CLAMP) % EPOCHS;
                self.buckets[i].prio = encode(in_main(b.prio), freq(b.prio), e);
                self.note(i);
            }
            let q = if in_main(b.prio) {
                n_main += 1;
                &mut main
            } else {
                n_small += 1;
                &mut small
            };
            if b.can_invalidate() {
                q.push((age, i));
            }
        }
        // Oldest first; ties by index, so runs are reproducible.
        small.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        main.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for idx in unused {
            if self.free_inc.is_full() {
                return;
            }
            self.invalidate_to_free_inc(idx, need_gc);
        }
        let target = (n_small + n_main) * SMALL_PERCENT / 100;
        let now = self.s3.now;
        let (mut si, mut mi) = (0, 0);
        let mut reinserted: Vec<(u16, usize)> = Vec::new();
        let mut rounds = 0;
        while !self.free_inc.is_full() {
            let main_left = mi < main.len() || (!reinserted.is_empty() && rounds < FREQ_MAX);
            if si < small.len() && (n_small > target || !main_left) {
                let idx = small[si].1;
                si += 1;
                let p = self.buckets[idx].prio;
                n_small -= 1;
                if freq(p) > 0 {
                    // Read again while in the small queue: it is worth keeping.
                    self.buckets[idx].prio = encode(true, 0, now);
                    self.note(idx);
                    reinserted.push((now, idx));
                } else {
                    self.invalidate_to_free_inc(idx, need_gc);
                }
                continue;
            }
            if mi >= main.len() {
                if reinserted.is_empty() || rounds >= FREQ_MAX {
                    break;
                }
                // Every bucket left went to the tail (all of one epoch): go over them again.
                main = std::mem::take(&mut reinserted);
                main.sort_unstable_by_key(|&(_, i)| i);
                mi = 0;
                rounds += 1;
                continue;
            }
            let idx = main[mi].1;
            mi += 1;
            let p = self.buckets[idx].prio;
            if freq(p) > 0 {
                self.buckets[idx].prio = encode(true, freq(p) - 1, now);
                self.note(idx);
                reinserted.push((now, idx));
            } else {
                self.invalidate_to_free_inc(idx, need_gc);
            }
        }
        if !self.free_inc.is_full() {
            self.invalidate_needs_gc = true;
        }
    }

    /// After the prios were read back: the current epoch is the newest in use, the one
    /// before the widest gap in the circle of epochs data buckets carry.
    pub(crate) fn s3fifo_restore_clock(&mut self) {
        let first = self.first_bucket as usize;
        let mut used = vec![false; EPOCHS as usize];
        let mut any = false;
        // GC has not marked anything yet: free and never used buckets are told by their prio
        // (what invalidation leaves, or a fresh chain's zero).
        for b in &self.buckets[first..] {
            if !matches!(b.prio, BTREE_PRIO | INITIAL_PRIO | 0) {
                used[epoch(b.prio) as usize % EPOCHS as usize] = true;
                any = true;
            }
        }
        if !any {
            return;
        }
        // The widest run of unused epochs, going round the circle; `now` is the epoch before it.
        let n = EPOCHS as usize;
        let (mut best_len, mut best_start, mut run, mut run_start) = (0usize, 0usize, 0usize, 0usize);
        for k in 0..2 * n {
            let i = k % n;
            if used[i] {
                run = 0;
            } else {
                if run == 0 {
                    run_start = i;
                }
                run += 1;
                if run > best_len && run <= n {
                    best_len = run;
                    best_start = run_start;
                }
            }
        }
        self.s3.now = ((best_start + n - 1) % n) as u16;
        self.s3.allocs = 0;
    }

    /// A switch to S3-FIFO: every data bucket joins the small queue, unread, now.
    pub(crate) fn s3fifo_reset(&mut self) {
        let first = self.first_bucket as usize;
        for i in first..self.buckets.len() {
            if self.buckets[i].prio != BTREE_PRIO {
                self.buckets[i].prio = encode(false, 0, self.s3.now);
                self.note(i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_never_reads_as_metadata() {
        for main in [false, true] {
            for f in 0..=FREQ_MAX {
                for e in [0, 1, 4095, EPOCHS - 1] {
                    let p = encode(main, f, e);
                    assert_ne!(p, BTREE_PRIO);
                    assert_eq!((in_main(p), freq(p), epoch(p)), (main, f, e));
                }
            }
        }
        assert_eq!(freq(encode(false, 9, 0)), FREQ_MAX, "saturates");
        assert_eq!(epoch(encode(false, 0, EPOCHS)), 0, "wraps");
    }
}
