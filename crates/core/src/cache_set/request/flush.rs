//! Flushes and discards.
//!
//! A flush completes when every write completed before it is durable: the journal entry
//! holding the newest key (or dropped range) recorded so far is on stable storage, and the
//! backing device is flushed if writes reached it since its last flush. A flush with
//! nothing to wait for completes at once.
//!
//! A discard drops the range from the cache (recorded in the journal) and passes the
//! discard down to the backing device; a backing device that cannot discard is not an error.

use super::{split, CacheSet, Kind, Part};
use crate::cache_set::device::FlushWaiter;
use crate::cache_set::Tag;
use crate::io::{IoCompletion, IoRequest};

impl CacheSet {
    pub(crate) fn flush_start(&mut self, slot: u32) {
        if let Some(e) = self.failed_error() {
            self.req_error(slot, e);
            return self.complete_request(slot);
        }
        // Data written in place carries no key of its own: an entry written from now on
        // (which flushes the cache device first) covers it.
        let mut seq = self.journal_covering();
        if self.cache_unflushed {
            seq = seq.max(self.journal_next_stamped());
        }
        self.wait_journal(slot, seq);
        let inode = self.reqs.get(slot).inode;
        if self.backing_flush(inode, FlushWaiter::Req(slot)) {
            self.add_wait(slot);
        }
        self.maybe_finish(slot);
    }

    /// Makes what reached `inode`'s backing device so far durable: a new flush if writes
    /// completed since the last one was sent, else the last one if it is still in flight
    /// (it covers them). `who` is told when it completes; returns false when there is
    /// nothing to wait for.
    pub(crate) fn backing_flush(&mut self, inode: u32, who: FlushWaiter) -> bool {
        let Ok(d) = self.dev_mut(inode) else { return false };
        let n = if std::mem::replace(&mut d.backing_unflushed, false) {
            let n = d.flush_next;
            d.flush_next = d.flush_next.wrapping_add(1) & ((1 << 24) - 1);
            d.flushes_in_flight.push(n);
            let tag = Tag::BackingFlush { inode, n }.encode();
            let req = IoRequest::flush(d.backing, tag);
            self.push_io(req);
            n
        } else if let Some(&n) = d.flushes_in_flight.last() {
            n
        } else {
            return false;
        };
        self.dev_mut(inode).expect("attached").flush_waiters.push((n, who));
        true
    }

    /// Flush `n` of `inode`'s backing device completed: its waiters go on.
    pub(crate) fn backing_flush_done(&mut self, inode: u32, n: u32, c: IoCompletion) {
        let Ok(d) = self.dev_mut(inode) else { return };
        d.flushes_in_flight.retain(|&f| f != n);
        if c.result.is_err() {
            // Writes may still sit in the device's cache: the next flush tries again.
            d.backing_unflushed = true;
        }
        let mut woken = Vec::new();
        d.flush_waiters.retain(|&(f, w)| {
            if f == n {
                woken.push(w);
                false
            } else {
                true
            }
        });
        for w in woken {
            let r = match &c.result {
                Ok(_) => Ok(()),
                Err(e) => Err(e.clone()),
            };
            match (w, r) {
                (FlushWaiter::Req(slot), Ok(())) => self.req_wait_done(slot),
                (FlushWaiter::Req(slot), Err(e)) => self.req_failed_part(slot, e),
                (FlushWaiter::Close, r) => self.close_flush_done(r),
                (FlushWaiter::Writeback(batch), r) => self.writeback_flushed(inode, batch, r),
            }
        }
    }

    pub(crate) fn discard_start(&mut self, slot: u32) {
        if let Some(e) = self.failed_error() {
            self.req_error(slot, e);
            return self.complete_request(slot);
        }
        let r = self.reqs.get(slot);
        let (inode, offset, len) = (r.inode, r.offset, r.len);
        let dev = self.dev(inode).expect("attached");
        if dev.flash {
            // Only the cache holds a flash-only volume's data: dropping it is the discard.
            return self.maybe_finish(slot);
        }
        let (backing, off) = (dev.backing, dev.data_offset + offset);
        self.issue(slot, Part::BackingDiscard, |tag| IoRequest::discard(backing, off, len, tag));
    }

    pub(crate) fn flush_part_done(&mut self, slot: u32, part: usize, c: IoCompletion) {
        let (result, _) = split(c);
        let r = self.reqs.get(slot);
        let p = std::mem::replace(&mut r.parts[part], Part::Journal);
        match (p, result) {
            (Part::BackingDiscard, Ok(_)) => {
                // Like a write, a discard is durable only after a flush of the device.
                let inode = r.inode;
                if let Ok(d) = self.dev_mut(inode) {
                    d.backing_unflushed = true;
                }
            }
            (_, Ok(_)) => {}
            (Part::BackingDiscard, Err(e)) if discard_unsupported(&e) => {}
            (_, Err(e)) => self.req_error(slot, e),
        }
        debug_assert!(matches!(self.reqs.get(slot).kind, Kind::Flush | Kind::Discard));
        self.maybe_finish(slot);
    }

    /// The backing device has discarded the range: the cache drops it too.
    pub(crate) fn discard_commit(&mut self, slot: u32) {
        let r = self.reqs.get(slot);
        r.committed = true;
        let (inode, sector, sectors) = (r.inode, r.offset / 512, r.len / 512);
        if self.failed_error().is_none() {
            self.invalidate_range(inode, sector, sectors);
        }
        self.maybe_finish(slot);
    }
}

/// The backing device does not discard (EOPNOTSUPP, or EINVAL from some drivers).
fn discard_unsupported(e: &crate::error::Error) -> bool {
    use std::error::Error as _;
    let errno = e.source().and_then(|s| s.downcast_ref::<std::io::Error>()).and_then(|s| s.raw_os_error());
    matches!(errno, Some(libc::EOPNOTSUPP) | Some(libc::EINVAL))
}
