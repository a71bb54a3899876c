//! One bucket's in-memory state: gen, prio, pin count and GC mark, packed into 8 bytes so a
//! million-bucket cache keeps its whole bucket array in 8 MiB.

/// Prio a data bucket gets when it is allocated, invalidated or hit by a read.
pub const INITIAL_PRIO: u16 = 32768;
/// Prio of metadata buckets (btree nodes, prio buckets): never aged, never invalidated by LRU.
pub const BTREE_PRIO: u16 = u16::MAX;
/// How far a bucket's gen may run ahead of the oldest pointer GC saw into it. Pointer gens are
/// compared modulo 256 with a window of 128, so stopping at 96 leaves a safety margin.
pub const BUCKET_GC_GEN_MAX: u8 = 96;
/// Largest sector count a bucket's GC mark can hold (14 bits); larger counts saturate.
pub const MAX_GC_SECTORS_USED: u32 = (1 << 14) - 1;

/// What garbage collection found in a bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GcMark {
    /// Nothing live points into it.
    Unused,
    /// Clean cached data: may be invalidated (the data is also on the backing device).
    Reclaimable,
    /// Dirty data not yet written back: must not be invalidated.
    Dirty,
    /// Btree nodes, prio buckets, journal, UUIDs: never invalidated by the allocator.
    Metadata,
}

impl GcMark {
    #[inline]
    pub(crate) fn from_bits(bits: u16) -> GcMark {
        match bits & 3 {
            0 => GcMark::Unused,
            1 => GcMark::Reclaimable,
            2 => GcMark::Dirty,
            _ => GcMark::Metadata,
        }
    }

    #[inline]
    pub(crate) fn bits(self) -> u16 {
        match self {
            GcMark::Unused => 0,
            GcMark::Reclaimable => 1,
            GcMark::Dirty => 2,
            GcMark::Metadata => 3,
        }
    }
}

/// In-memory bucket. `gc` holds the mark in bits 0..2 and the sectors used in bits 2..16.
#[derive(Clone, Copy, Default, Debug)]
#[repr(C)]
pub(crate) struct Bucket {
    pub prio: u16,
    pub gc: u16,
    pub pin: u16,
    pub gen: u8,
    /// Oldest gen of any pointer into this bucket seen by the last GC.
    pub last_gc: u8,
}

impl Bucket {
    #[inline]
    pub fn mark(&self) -> GcMark {
        GcMark::from_bits(self.gc)
    }

    #[inline]
    pub fn set_mark(&mut self, mark: GcMark) {
        self.gc = (self.gc & !3) | mark.bits();
    }

    #[inline]
    pub fn sectors_used(&self) -> u32 {
        u32::from(self.gc >> 2)
    }

    #[inline]
    pub fn set_sectors_used(&mut self, sectors: u32) {
        let s = sectors.min(MAX_GC_SECTORS_USED) as u16;
        self.gc = (self.gc & 3) | (s << 2);
    }

    /// How far the gen ran ahead of the oldest pointer the last GC saw.
    #[inline]
    pub fn gc_gen(&self) -> u8 {
        self.gen.wrapping_sub(self.last_gc)
    }

    /// bcache's `bch_can_invalidate_bucket`: unused or clean, unpinned, and its gen may still be
    /// incremented without wrapping past a pointer GC has not yet cleaned up.
    #[inline]
    pub fn can_invalidate(&self) -> bool {
        (self.gc & 3) <= 1 && self.pin == 0 && self.gc_gen() < BUCKET_GC_GEN_MAX
    }

    pub fn info(&self) -> BucketInfo {
        BucketInfo {
            gen: self.gen,
            last_gc: self.last_gc,
            prio: self.prio,
            pin: self.pin,
            mark: self.mark(),
            sectors_used: self.sectors_used(),
        }
    }
}

/// How many gens `a` is ahead of `b`, or 0 if it is not ahead (modulo 256, window of 128).
#[inline]
pub fn gen_after(a: u8, b: u8) -> u8 {
    let r = a.wrapping_sub(b);
    if r > 128 {
        0
    } else {
        r
    }
}

/// A read-only copy of one bucket's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketInfo {
    pub gen: u8,
    pub last_gc: u8,
    pub prio: u16,
    pub pin: u16,
    pub mark: GcMark,
    pub sectors_used: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_is_eight_bytes() {
        assert_eq!(std::mem::size_of::<Bucket>(), 8);
    }

    #[test]
    fn mark_and_sectors_share_a_word_without_clobbering() {
        let mut b = Bucket::default();
        b.set_sectors_used(1000);
        b.set_mark(GcMark::Dirty);
        assert_eq!((b.mark(), b.sectors_used()), (GcMark::Dirty, 1000));
        b.set_sectors_used(1 << 20);
        assert_eq!((b.mark(), b.sectors_used()), (GcMark::Dirty, MAX_GC_SECTORS_USED));
        b.set_mark(GcMark::Unused);
        assert_eq!(b.sectors_used(), MAX_GC_SECTORS_USED);
    }

    #[test]
    fn gen_after_is_modular() {
        assert_eq!(gen_after(5, 3), 2);
        assert_eq!(gen_after(3, 5), 0);
        assert_eq!(gen_after(1, 255), 2);
        assert_eq!(gen_after(128, 0), 128);
        assert_eq!(gen_after(129, 0), 0);
    }

    #[test]
    fn invalidation_rules() {
        let mut b = Bucket::default();
        assert!(b.can_invalidate());
        b.set_mark(GcMark::Reclaimable);
        assert!(b.can_invalidate());
        b.set_mark(GcMark::Dirty);
        assert!(!b.can_invalidate());
        b.set_mark(GcMark::Metadata);
        assert!(!b.can_invalidate());
        b.set_mark(GcMark::Unused);
        b.pin = 1;
        assert!(!b.can_invalidate());
        b.pin = 0;
        b.gen = BUCKET_GC_GEN_MAX;
        assert!(!b.can_invalidate());
        b.last_gc = 1;
        assert!(b.can_invalidate());
    }
}
