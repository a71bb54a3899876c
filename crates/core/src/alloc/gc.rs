//! The allocator's side of garbage collection. GC walks the index and reports every pointer;
//! from that the allocator learns which buckets hold clean, dirty or metadata sectors, and how
//! old the oldest pointer into each bucket is, which bounds how far its gen may advance.

use super::bucket::{gen_after, GcMark, MAX_GC_SECTORS_USED};
use super::{inval, Allocator, Ptr, Reserve};
use crate::error::Result;

/// What a pointer reported to GC points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PtrKind {
    /// Cached data that is also on the backing device.
    Clean,
    /// Data not yet written back.
    Dirty,
    /// A btree node (or other metadata referenced by a key).
    Metadata,
}

impl Allocator {
    /// Starts a GC pass: marks of unpinned buckets are forgotten (pinned ones are in use and
    /// keep theirs), sector counts restart at zero for the marks to recount (but a pinned
    /// metadata bucket still counts as full), and every bucket's `last_gc` restarts at its
    /// current gen. Invalidation waits until [`Allocator::gc_finish`].
    pub fn gc_start(&mut self) {
        self.gc_running = true;
        self.gc_mark_valid = false;
        for c in &mut self.caches {
            for b in &mut c.buckets {
                b.last_gc = b.gen;
                if b.pin == 0 {
                    b.set_mark(GcMark::Unused);
                    b.set_sectors_used(0);
                } else if b.mark() != GcMark::Metadata {
                    // An open data bucket: its indexed keys are counted again by the marks,
                    // the ones still in flight by the index's accounting when inserted.
                    b.set_sectors_used(0);
                }
            }
        }
    }

    /// Reports one pointer of a live key covering `sectors` sectors. Returns how stale it is
    /// (0 if valid); a stale pointer still holds back its bucket's `last_gc`, so its gen can
    /// never wrap round to look valid again while the key exists.
    pub fn gc_mark_ptr(&mut self, ptr: Ptr, sectors: u32, kind: PtrKind) -> Result<u8> {
        if !self.gc_running {
            return Err(inval("pointers are marked only between gc_start and gc_finish".into()));
        }
        let bucket = self.ptr_bucket(ptr)?;
        let b = &mut self.caches[ptr.dev() as usize].buckets[bucket as usize];
        if gen_after(b.last_gc, ptr.gen()) > 0 {
            b.last_gc = ptr.gen();
        }
        let stale = gen_after(b.gen, ptr.gen());
        if stale > 0 {
            return Ok(stale);
        }
        match (kind, b.mark()) {
            (PtrKind::Metadata, _) => b.set_mark(GcMark::Metadata),
            (PtrKind::Dirty, m) if m != GcMark::Metadata => b.set_mark(GcMark::Dirty),
            (PtrKind::Clean, GcMark::Unused) => b.set_mark(GcMark::Reclaimable),
            _ => {}
        }
        b.set_sectors_used(b.sectors_used().saturating_add(sectors).min(MAX_GC_SECTORS_USED));
        Ok(0)
    }

    /// Marks a whole bucket as metadata that no key points at (journal buckets, the UUID
    /// bucket). Prio chains are marked by the allocator itself.
    pub fn gc_mark_metadata_bucket(&mut self, dev: u8, bucket: u64) -> Result<()> {
        if !self.gc_running {
            return Err(inval("buckets are marked only between gc_start and gc_finish".into()));
        }
        let bucket_size = self.bucket_size;
        let c = self.cache_mut(dev)?;
        let i = super::check_bucket(c, dev, bucket)?;
        c.buckets[i].set_mark(GcMark::Metadata);
        c.buckets[i].set_sectors_used(bucket_size);
        Ok(())
    }

    /// Ends a GC pass: marks the prio chains, recounts available buckets and the gen-wrap
    /// pressure, and lets invalidation go on. The first pass also primes the prio and btree
    /// reserves straight from unused buckets: the allocator needs free buckets to write prios,
    /// and must write prios to free buckets. That is safe only because nothing points into an
    /// unused bucket. A later pass tops up the prio reserve the same way, but only on a device
    /// whose free lists cannot hold a prio chain (one that came up with too few unused buckets
    /// and has not written prios since): otherwise it could never write prios again.
    pub fn gc_finish(&mut self) -> Result<()> {
        if !self.gc_running {
            return Err(inval("gc_finish without gc_start".into()));
        }
        let bucket_size = self.bucket_size;
        let mut need_gc = 0u8;
        let mut avail = 0u64;
        for c in &mut self.caches {
            let inflight = c.prio_inflight.iter().flat_map(|w| w.buckets.iter());
            for &p in c.prio_buckets.iter().chain(inflight) {
                let b = &mut c.buckets[p as usize];
                b.set_mark(GcMark::Metadata);
                b.set_sectors_used(bucket_size);
            }
            let first = c.first_bucket as usize;
            for b in &c.buckets[first..] {
                need_gc = need_gc.max(b.gc_gen());
                if b.pin == 0 && matches!(b.mark(), GcMark::Unused | GcMark::Reclaimable) {
                    avail += 1;
                }
            }
            c.invalidate_needs_gc = false;
        }
        self.need_gc = need_gc;
        self.avail_nbuckets = avail;
        self.gc_running = false;
        self.gc_mark_valid = true;
        let first_pass = !self.started;
        self.started = true;
        for c in &mut self.caches {
            if !first_pass && c.prio_write_placeable() {
                continue;
            }
            let first = c.first_bucket as usize;
            for i in first..c.buckets.len() {
                let btree_done = !first_pass || c.free[Reserve::Btree as usize].is_full();
                if c.free[Reserve::Prio as usize].is_full() && btree_done {
                    break;
                }
                let b = c.buckets[i];
                if b.can_invalidate() && b.mark() == GcMark::Unused {
                    c.invalidate_one(i, &mut self.need_gc);
                    if !c.free[Reserve::Prio as usize].push(i as u32) {
                        c.free[Reserve::Btree as usize].push(i as u32);
                    }
                    self.avail_nbuckets = self.avail_nbuckets.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    /// The buckets moving GC should empty (bcache's `bch_moving_gc` selection): data buckets
    /// (clean or dirty), unpinned, holding some live sectors but at most `max_used`, those
    /// with the fewest first, as many as fit in `budget` sectors. In bucket order.
    pub fn moving_gc_candidates(&self, dev: u8, max_used: u32, budget: u64) -> Result<Vec<u64>> {
        let c = self.caches.get(dev as usize).ok_or_else(|| inval(format!("no cache device {dev}")))?;
        let mut found: Vec<(u32, u32)> = c
            .buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                matches!(b.mark(), GcMark::Reclaimable | GcMark::Dirty)
                    && b.pin == 0
                    && b.sectors_used() > 0
                    && b.sectors_used() <= max_used
            })
            .map(|(i, b)| (b.sectors_used(), i as u32))
            .collect();
        found.sort_unstable();
        let mut left = budget;
        let mut out: Vec<u64> = Vec::new();
        for (used, i) in found {
            if u64::from(used) > left {
                break;
            }
            left -= u64::from(used);
            out.push(u64::from(i));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// True between [`Allocator::gc_start`] and [`Allocator::gc_finish`].
    pub fn gc_running(&self) -> bool {
        self.gc_running
    }
}
