//! Space in the cache: carrying out the allocator's steps (prio writes, discards, GC) as
//! I/O completes, writes and metadata waiting for buckets, and bcache's writeback cutoffs.

use std::collections::VecDeque;

use super::{CacheSet, SetState, Tag};
use crate::alloc::{Reserve, Step};
use crate::error::{Error, ErrorKind, Result};
use crate::io::{IoCompletion, IoRequest};

/// Above this percentage of buckets in use (dirty or metadata), ordinary writes in
/// writeback mode go writethrough (bcache's `CUTOFF_WRITEBACK`).
pub(crate) const CUTOFF_WRITEBACK: u64 = 40;
/// Above this percentage, FUA writes in writeback mode go writethrough too (bcache's
/// `CUTOFF_WRITEBACK_SYNC`, for its sync writes).
pub(crate) const CUTOFF_WRITEBACK_SYNC: u64 = 70;

#[derive(Default)]
pub(crate) struct Space {
    /// Buckets holding dirty data or metadata, in percent of all, as of the last GC.
    pub in_use: u64,
    /// Writes waiting for a bucket, oldest first.
    pub waiters: VecDeque<u32>,
    /// Metadata (UUID table, checkpoint) waits for a bucket.
    pub meta_waiting: bool,
}

impl CacheSet {
    /// bcache's `should_writeback`, for a write that overlaps no dirty data.
    pub(crate) fn should_writeback(&self, fua: bool) -> bool {
        let in_use = self.space.in_use;
        in_use <= CUTOFF_WRITEBACK || (fua && in_use <= CUTOFF_WRITEBACK_SYNC)
    }

    /// Carries out what the allocator asks for until it waits on something.
    pub(crate) fn service_alloc(&mut self) {
        if matches!(self.state, SetState::Failed(_) | SetState::Closed) {
            return;
        }
        for _ in 0..8 {
            match self.alloc.poll(0) {
                Ok(Step::WritePrios) => {
                    if !self.prio_write_start(false) {
                        return;
                    }
                }
                Ok(Step::Discard(b)) => {
                    let len = self.geo.bucket_bytes as u64;
                    let tag = Tag::BucketDiscard { bucket: b as u32 }.encode();
                    self.push_io(IoRequest::discard(self.cache, b * len, len, tag));
                }
                Ok(Step::NeedGc) => {
                    self.gc_wanted();
                    return;
                }
                Ok(Step::Idle | Step::Waiting) => return,
                Err(e) => return self.fail(e),
            }
        }
    }

    pub(crate) fn bucket_discard_done(&mut self, bucket: u32, c: IoCompletion) {
        // A failed discard only means the bucket was not trimmed; its gen is what matters.
        let _ = c.result;
        if let Err(e) = self.alloc.discard_done(0, u64::from(bucket)) {
            return self.fail(e);
        }
        self.space_progress();
    }

    /// Space for a write: from the open buckets, else from the free lists, which the
    /// allocator refills from its invalidated batch as it is asked (the lists are short).
    pub(crate) fn alloc_sectors(&mut self, w: &crate::alloc::DataWrite) -> Result<crate::alloc::SectorAlloc> {
        match self.alloc.alloc_sectors(w) {
            Err(e) if e.kind() == ErrorKind::NoSpace => {
                self.service_alloc();
                self.alloc.alloc_sectors(w)
            }
            r => r,
        }
    }

    /// Something that needed a bucket found none: get the allocator going.
    pub(crate) fn space_wanted(&mut self) {
        self.service_alloc();
    }

    /// Buckets may have come free: writes and metadata that waited for them go on.
    pub(crate) fn space_progress(&mut self) {
        self.service_alloc();
        while let Some(&slot) = self.space.waiters.front() {
            if !matches!(self.state, SetState::Running | SetState::Closing) {
                break;
            }
            self.space.waiters.pop_front();
            if !self.write_retry_space(slot) {
                // Back in the queue (at the end); stop at the first that still waits so
                // the order is kept.
                if let Some(pos) = self.space.waiters.iter().rposition(|&s| s == slot) {
                    self.space.waiters.remove(pos);
                }
                self.space.waiters.push_front(slot);
                break;
            }
        }
        if self.space.meta_waiting {
            self.space.meta_waiting = false;
            self.uuid_write_next();
            self.checkpoint_pump();
        }
        if self.space.waiters.is_empty() {
            self.moving_gc_retry();
        }
    }

    /// A bucket for metadata (UUID table, checkpoint), pinned; None when the free lists
    /// are empty (the caller retries from [`CacheSet::space_progress`]).
    pub(crate) fn meta_bucket(&mut self) -> Option<u64> {
        let mut r = self.alloc.bucket_alloc(0, Reserve::Btree);
        if r.as_ref().is_err_and(|e| e.kind() == ErrorKind::NoSpace) {
            self.service_alloc();
            r = self.alloc.bucket_alloc(0, Reserve::Btree);
        }
        match r {
            Ok(b) => Some(b),
            Err(e) if e.kind() == ErrorKind::NoSpace => {
                self.space.meta_waiting = true;
                self.service_alloc();
                None
            }
            Err(e) => {
                self.fail(e);
                None
            }
        }
    }

    /// The set failed: writes waiting for space get the error.
    pub(crate) fn space_fail_waiters(&mut self) {
        let e = self.failed_error().unwrap_or_else(|| Error::new(ErrorKind::Closed, "the cache set is closed"));
        let waiters: Vec<u32> = self.space.waiters.drain(..).collect();
        for slot in waiters {
            self.req_error(slot, e.clone());
            let r = self.reqs.get(slot);
            r.committed = true;
            r.waiting_space = false;
            let ptrs: Vec<_> = std::mem::take(&mut r.pieces).iter().map(|p| p.alloc.ptr).collect();
            let _ = self.alloc.put_ptrs(&ptrs);
            self.maybe_finish(slot);
        }
    }

    /// Percentage of buckets in use after a GC.
    pub(crate) fn update_in_use(&mut self) -> Result<()> {
        let total = self.geo.sb.nbuckets - self.geo.sb.first_bucket;
        let avail = self.alloc.available_buckets().min(total);
        self.space.in_use = (total - avail) * 100 / total.max(1);
        Ok(())
    }
}
