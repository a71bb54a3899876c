//! The sector allocator: data is written into up to 128 open buckets at once, each filled by
//! one stream. Segregating streams keeps data of like lifetime together, so a bucket tends to
//! empty all at once; flash-only volume data (never reclaimable) is kept away from cached
//! data (reclaimable once clean), or one dirty sector would pin a bucket of clean data.

use super::{inval, Allocator, Ptr, Reserve};
use crate::error::Result;

/// Open buckets per cache set (bcache's MAX_OPEN_BUCKETS).
pub const MAX_OPEN_BUCKETS: usize = 128;

/// A write looking for space in the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataWrite {
    /// Cached device or flash-only volume the data belongs to.
    pub inode: u64,
    /// First sector of the write on that device.
    pub offset: u64,
    /// Sectors wanted; fewer may be given.
    pub sectors: u32,
    /// Who writes (a task, a client): writes of one writer stay together.
    pub write_point: u64,
    /// The data belongs to a flash-only volume.
    pub flash_only: bool,
    /// Moving GC is rewriting it: draw from the moving-GC reserve.
    pub moving_gc: bool,
    /// Data known to be read again (it returned after its eviction, or moving GC found it
    /// hot): written with hot data only, and with S3-FIFO its bucket joins the main queue.
    pub hot: bool,
}

/// Space handed out by [`Allocator::alloc_sectors`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorAlloc {
    /// Where the data goes; the key for it carries this pointer.
    pub ptr: Ptr,
    /// Sectors given, at most what was asked.
    pub sectors: u32,
}

#[derive(Clone, Copy, Debug)]
struct OpenBucket {
    /// Where the last write into this bucket ended: a write starting here continues it.
    inode: u64,
    offset: u64,
    flash_only: bool,
    hot: bool,
    write_point: u64,
    /// Next free sector.
    ptr: Ptr,
    sectors_free: u32,
}

impl Default for OpenBucket {
    fn default() -> OpenBucket {
        // The pointer of a closed slot (no sectors free) is never used.
        OpenBucket {
            inode: 0,
            offset: 0,
            flash_only: false,
            hot: false,
            write_point: 0,
            ptr: Ptr::from_bits(0),
            sectors_free: 0,
        }
    }
}

pub(crate) struct OpenBuckets {
    slots: Vec<OpenBucket>,
    /// Slot numbers, least recently used first.
    lru: Vec<u8>,
    /// Buckets open at most at once: a sixteenth of the cache, at most bcache's 128.
    limit: usize,
}

/// Open buckets a cache of `buckets` buckets may have at once. Each holds a pin, and a
/// pinned bucket counts as in use: bcache's 128 are nothing beside the thousands of
/// buckets it requires, but they would be most of a cache of a couple of hundred, which
/// then sits past the writeback cutoff with almost nothing dirty.
pub(crate) fn open_limit(buckets: u64) -> usize {
    ((buckets / 16) as usize).clamp(2, MAX_OPEN_BUCKETS)
}

impl OpenBuckets {
    pub fn new(limit: usize) -> OpenBuckets {
        OpenBuckets {
            slots: vec![OpenBucket::default(); MAX_OPEN_BUCKETS],
            lru: (0..MAX_OPEN_BUCKETS as u8).collect(),
            limit: limit.clamp(1, MAX_OPEN_BUCKETS),
        }
    }

    /// bcache's `pick_data_bucket`: the bucket this write continues, else the one the same
    /// writer used last, else the least recently used one. Buckets holding data of the other
    /// kind (flash-only or cached) are never chosen to share. bcache's loop ends on the
    /// *oldest* bucket of the writer, so one writer's random writes rotate over every open
    /// bucket, each landing in a different one; taking the newest keeps them end to end in
    /// one bucket, as its comment ("preserve locality") intends, and lets the block layer
    /// merge the cache-device writes made together into one request.
    fn pick(&self, w: &DataWrite) -> usize {
        let same_kind = |ob: &OpenBucket| ob.flash_only == w.flash_only && ob.hot == w.hot;
        let mut same_writer = None;
        for (pos, &s) in self.lru.iter().enumerate().rev() {
            let ob = &self.slots[s as usize];
            if !same_kind(ob) {
                continue;
            }
            // A closed slot has nothing to continue: opening a bucket in it would leave the
            // writer's open one open beside it.
            if ob.sectors_free > 0 && ob.inode == w.inode && ob.offset == w.offset {
                return pos;
            }
            if same_writer.is_none() && ob.write_point == w.write_point {
                same_writer = Some(pos);
            }
        }
        let chosen = same_writer.unwrap_or_else(|| {
            self.lru
                .iter()
                .position(|&s| self.slots[s as usize].sectors_free == 0 || same_kind(&self.slots[s as usize]))
                .unwrap_or(0)
        });
        // Counted only when a bucket would be opened: not on every write into an open one.
        if self.slots[self.lru[chosen] as usize].sectors_free == 0
            && self.slots.iter().filter(|o| o.sectors_free > 0).count() >= self.limit
        {
            // No bucket more: share the least recently used open one of this kind, or close
            // the least recently used open one (`alloc_sectors` gives up its rest).
            let open_pos = |kind: bool| {
                self.lru.iter().position(|&s| {
                    let ob = &self.slots[s as usize];
                    ob.sectors_free > 0 && (!kind || same_kind(ob))
                })
            };
            return open_pos(true).or_else(|| open_pos(false)).unwrap_or(chosen);
        }
        chosen
    }
}

impl Allocator {
    /// Finds space for a write in an open bucket, opening a new bucket (from the `None`
    /// reserve, or `MovingGc` for moving GC) when needed. May give fewer sectors than asked:
    /// the caller writes that much and asks again for the rest. The returned pointer's bucket
    /// is pinned for the caller; unpin it once the key is in the index. Ages prios by the
    /// sectors handed out.
    pub fn alloc_sectors(&mut self, w: &DataWrite) -> Result<SectorAlloc> {
        if w.sectors == 0 {
            return Err(inval("a write of 0 sectors needs no space".into()));
        }
        let pos = self.open.pick(w);
        let slot = self.open.lru[pos] as usize;
        let ob = self.open.slots[slot];
        if ob.sectors_free > 0 && (ob.flash_only != w.flash_only || ob.hot != w.hot) {
            // Every slot holds another kind of data: give up the rest of the oldest.
            let b = self.ptr_bucket(ob.ptr)?;
            self.unpin(ob.ptr.dev(), b)?;
            self.open.slots[slot].sectors_free = 0;
        }
        if self.open.slots[slot].sectors_free == 0 {
            let reserve = if w.moving_gc { Reserve::MovingGc } else { Reserve::None };
            let p = self.alloc_set(reserve, 1)?[0];
            if w.hot {
                let b = self.ptr_bucket(p)?;
                self.caches[p.dev() as usize].s3fifo_join_main(b as usize);
            }
            let ob = &mut self.open.slots[slot];
            ob.ptr = p;
            ob.sectors_free = self.bucket_size;
        }
        let ob = self.open.slots[slot];
        let sectors = w.sectors.min(ob.sectors_free);
        let mut left = ob.sectors_free - sectors;
        if left < self.block_size {
            left = 0;
        }
        let bucket = self.ptr_bucket(ob.ptr)?;
        if left > 0 {
            // The key takes its own pin; otherwise the open bucket's pin passes to the key.
            self.pin(ob.ptr.dev(), bucket)?;
        }
        let out = SectorAlloc { ptr: ob.ptr, sectors };
        let ob = &mut self.open.slots[slot];
        ob.inode = w.inode;
        ob.offset = w.offset + u64::from(sectors);
        ob.flash_only = w.flash_only;
        ob.hot = w.hot;
        ob.write_point = w.write_point;
        if left > 0 {
            // Still inside the bucket, whose every sector a pointer can name (checked by
            // `Allocator::new`); a full bucket's pointer is never used again.
            ob.ptr = ob.ptr.advance(u64::from(sectors));
        }
        ob.sectors_free = left;
        let s = self.open.lru.remove(pos);
        self.open.lru.push(s);
        self.caches[out.ptr.dev() as usize].sectors_written += u64::from(sectors);
        self.rescale_priorities(u64::from(sectors));
        Ok(out)
    }

    /// Closes every open bucket, dropping the pins they hold (before a GC that must see the
    /// true marks, or at shutdown). Their unused rest is not written.
    pub fn close_open_buckets(&mut self) -> Result<()> {
        for slot in 0..MAX_OPEN_BUCKETS {
            let ob = self.open.slots[slot];
            if ob.sectors_free > 0 {
                let b = self.ptr_bucket(ob.ptr)?;
                self.unpin(ob.ptr.dev(), b)?;
                self.open.slots[slot].sectors_free = 0;
            }
        }
        Ok(())
    }

    /// Open buckets that still have room.
    pub fn open_buckets_in_use(&self) -> usize {
        self.open.slots.iter().filter(|o| o.sectors_free > 0).count()
    }
}
