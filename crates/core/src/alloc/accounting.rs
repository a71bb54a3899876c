//! The allocator as the index sees it: bucket gens to tell live pointers from stale ones,
//! and the live sector count of each bucket, kept up to date as extents come and go so that
//! LRU weights follow live data between GC passes (GC recounts them from scratch).

use super::bucket::{Bucket, MAX_GC_SECTORS_USED};
use super::Allocator;
use crate::index::{BucketAccounting, BucketGens};

impl Allocator {
    #[inline]
    fn bucket_entry(&self, dev: u8, bucket: u64) -> Option<&Bucket> {
        self.caches.get(dev as usize)?.buckets.get(usize::try_from(bucket).ok()?)
    }
}

impl BucketGens for Allocator {
    #[inline]
    fn bucket_bits(&self) -> u32 {
        self.bucket_bits
    }

    #[inline]
    fn bucket_gen(&self, dev: u8, bucket: u64) -> Option<u8> {
        self.bucket_entry(dev, bucket).map(|b| b.gen)
    }

    #[inline]
    fn prefetch_gen(&self, dev: u8, bucket: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Some(b) = self.bucket_entry(dev, bucket) {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: prefetching never faults, and the address is a live bucket entry.
            unsafe { _mm_prefetch((b as *const Bucket).cast::<i8>(), _MM_HINT_T0) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (dev, bucket);
    }
}

impl BucketAccounting for Allocator {
    /// Adds `sectors` (negative: removes) to the bucket's `sectors_used`, saturating at 0 and
    /// at [`MAX_GC_SECTORS_USED`]; clean and dirty data count alike. The GC mark and pins are
    /// left alone, and so is the prio file (which holds no sector counts). A device or bucket
    /// out of range is ignored: the index accounts only pointers that were live.
    #[inline]
    fn add_sectors(&mut self, dev: u8, bucket: u64, sectors: i64, _dirty: bool) {
        let Some(b) = self.caches.get_mut(dev as usize).and_then(|c| c.buckets.get_mut(usize::try_from(bucket).ok()?))
        else {
            return;
        };
        let now = i64::from(b.sectors_used()).saturating_add(sectors).clamp(0, i64::from(MAX_GC_SECTORS_USED));
        b.set_sectors_used(now as u32);
    }
}
