//! What the index needs from the bucket allocator: bucket generations, to tell live
//! pointers from stale ones, and a place to account the sectors each bucket holds, for GC.
//!
//! The allocator implements both traits; [`MemBuckets`] is a plain in-memory version for
//! tests and benchmarks.

use super::key::Ptr;

/// Bucket generations, as the allocator currently has them.
pub trait BucketGens {
    /// log2 of the bucket size in sectors (the same for every cache device of a set, as in
    /// bcache's `bucket_bits`).
    fn bucket_bits(&self) -> u32;

    /// Current generation of `bucket` on cache device `dev`, or `None` if there is no such
    /// bucket (a pointer to it is treated as stale).
    fn bucket_gen(&self, dev: u8, bucket: u64) -> Option<u8>;

    /// Starts loading the gen of `bucket` into cache, ahead of a `bucket_gen` call (batched
    /// lookups use it). Optional: the default does nothing.
    #[inline]
    fn prefetch_gen(&self, _dev: u8, _bucket: u64) {}

    /// A pointer is live while its gen equals its bucket's: the allocator bumps the gen when
    /// it invalidates the bucket, which kills every pointer into it at once.
    #[inline]
    fn ptr_stale(&self, ptr: Ptr) -> bool {
        self.bucket_gen(ptr.dev(), ptr.bucket(self.bucket_bits())) != Some(ptr.gen())
    }
}

/// Sector accounting per bucket, called by the index whenever live data starts or stops
/// pointing into a bucket (bcache's `GC_SECTORS_USED`, with dirty data kept apart so a
/// bucket holding dirty sectors is never reclaimed).
///
/// Only live pointers are accounted: sectors behind a stale pointer were dropped from the
/// bucket's count when its gen was bumped, so removing them later reports nothing.
pub trait BucketAccounting {
    /// `sectors` (negative: fewer) of clean or `dirty` data now point into `bucket` of `dev`.
    fn add_sectors(&mut self, dev: u8, bucket: u64, sectors: i64, dirty: bool);
}

/// Per-bucket state of one cache device in [`MemBuckets`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemBucket {
    /// Generation.
    pub gen: u8,
    /// Clean sectors accounted to the bucket.
    pub clean_sectors: i64,
    /// Dirty sectors accounted to the bucket.
    pub dirty_sectors: i64,
}

/// A simple in-memory allocator stand-in: gens and sector counts per bucket per device.
#[derive(Clone, Debug)]
pub struct MemBuckets {
    bucket_bits: u32,
    devs: Vec<Vec<MemBucket>>,
}

impl MemBuckets {
    /// `devs` cache devices of `nbuckets` buckets of `1 << bucket_bits` sectors, all gen 0.
    pub fn new(bucket_bits: u32, devs: usize, nbuckets: usize) -> MemBuckets {
        MemBuckets { bucket_bits, devs: vec![vec![MemBucket::default(); nbuckets]; devs] }
    }

    /// The state of `bucket` on `dev`, if it exists.
    pub fn bucket(&self, dev: u8, bucket: u64) -> Option<&MemBucket> {
        self.devs.get(dev as usize)?.get(usize::try_from(bucket).ok()?)
    }

    /// Invalidates a bucket as the allocator does before reuse: bumps its gen (killing
    /// every pointer into it) and forgets its sectors. Returns the new gen.
    pub fn invalidate(&mut self, dev: u8, bucket: u64) -> Option<u8> {
        let b = self.devs.get_mut(dev as usize)?.get_mut(usize::try_from(bucket).ok()?)?;
        b.gen = b.gen.wrapping_add(1);
        b.clean_sectors = 0;
        b.dirty_sectors = 0;
        Some(b.gen)
    }

    /// Every bucket of every device, as `(dev, bucket, state)`.
    pub fn iter(&self) -> impl Iterator<Item = (u8, u64, &MemBucket)> {
        self.devs.iter().enumerate().flat_map(|(d, bs)| bs.iter().enumerate().map(move |(b, s)| (d as u8, b as u64, s)))
    }
}

impl BucketGens for MemBuckets {
    #[inline]
    fn bucket_bits(&self) -> u32 {
        self.bucket_bits
    }

    #[inline]
    fn bucket_gen(&self, dev: u8, bucket: u64) -> Option<u8> {
        self.bucket(dev, bucket).map(|b| b.gen)
    }
}

impl BucketAccounting for MemBuckets {
    fn add_sectors(&mut self, dev: u8, bucket: u64, sectors: i64, dirty: bool) {
        let Some(b) = self.devs.get_mut(dev as usize).and_then(|d| d.get_mut(bucket as usize)) else {
            return;
        };
        if dirty {
            b.dirty_sectors += sectors;
        } else {
            b.clean_sectors += sectors;
        }
    }
}

/// Gens without accounting, for the index's own lazy removal of stale keys (which never
/// accounts anything).
pub(crate) struct GensOnly<'a, G: ?Sized>(pub &'a G);

impl<G: BucketGens + ?Sized> BucketGens for GensOnly<'_, G> {
    #[inline]
    fn bucket_bits(&self) -> u32 {
        self.0.bucket_bits()
    }

    #[inline]
    fn bucket_gen(&self, dev: u8, bucket: u64) -> Option<u8> {
        self.0.bucket_gen(dev, bucket)
    }
}

impl<G: ?Sized> BucketAccounting for GensOnly<'_, G> {
    fn add_sectors(&mut self, _dev: u8, _bucket: u64, _sectors: i64, _dirty: bool) {
        debug_assert!(false, "stale-key removal must not account sectors");
    }
}
