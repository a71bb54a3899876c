//! Priority statistics, the figures of bcache's `priority_stats` file.

use super::bucket::{GcMark, BTREE_PRIO, INITIAL_PRIO};
use super::Allocator;
use crate::error::Result;

/// How a device's buckets are used and how old their data is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityStats {
    /// Share of buckets with no sectors used, in percent.
    pub unused_percent: u64,
    /// Share of buckets holding clean (reclaimable) data, in percent.
    pub clean_percent: u64,
    /// Share of buckets holding dirty data, in percent.
    pub dirty_percent: u64,
    /// Share of metadata buckets, in percent.
    pub metadata_percent: u64,
    /// Mean age (INITIAL_PRIO - prio) of data buckets with a non-zero prio; under `s3fifo`
    /// and `tinylfu`, epochs since each bucket's last insertion into its queue.
    pub average: u64,
    /// Sectors each quantile stands for.
    pub sectors_per_quantile: u64,
    /// 31 quantiles of age (as `average`), youngest first.
    pub quantiles: [u16; 31],
}

impl Allocator {
    /// Priority statistics of one device. Sorts a copy of all prios: not for the hot path.
    pub fn priority_stats(&self, dev: u8) -> Result<PriorityStats> {
        let c = self.cache(dev)?;
        let first = c.first_bucket as usize;
        let total = c.nbuckets;
        let (mut unused, mut clean, mut dirty, mut meta) = (0u64, 0u64, 0u64, 0u64);
        for b in &c.buckets[first..] {
            if b.sectors_used() == 0 {
                unused += 1;
            }
            match b.mark() {
                GcMark::Reclaimable => clean += 1,
                GcMark::Dirty => dirty += 1,
                GcMark::Metadata => meta += 1,
                GcMark::Unused => {}
            }
        }
        // Drop never-used (prio 0) buckets and metadata (BTREE_PRIO); youngest first.
        let fifo = c.replacement.fifo_queues();
        let age = |p: u16| if fifo { c.s3fifo_age(p) } else { INITIAL_PRIO.saturating_sub(p) };
        let mut ages: Vec<u16> =
            c.buckets[first..].iter().map(|b| b.prio).filter(|&p| p != 0 && p != BTREE_PRIO).map(age).collect();
        ages.sort_unstable();
        let n = ages.len();
        let average = if n == 0 { 0 } else { ages.iter().map(|&a| u64::from(a)).sum::<u64>() / n as u64 };
        let mut quantiles = [0u16; 31];
        if n > 0 {
            for (i, q) in quantiles.iter_mut().enumerate() {
                *q = ages[n * (i + 1) / 32];
            }
        }
        Ok(PriorityStats {
            unused_percent: unused * 100 / total,
            clean_percent: clean * 100 / total,
            dirty_percent: dirty * 100 / total,
            metadata_percent: meta * 100 / total,
            average,
            sectors_per_quantile: n as u64 * u64::from(self.bucket_size) / 32,
            quantiles,
        })
    }
}
