//! The order overlapping requests are served in: a request waits for every write or
//! discard submitted before it that overlaps it and has not completed. Two overlapping
//! writes in flight at once would otherwise land in either order (the cache's key in one,
//! the backing device's data in the other), and a read would see either. Requests that
//! overlap nothing in flight — nearly all — pay one check of an empty or short list.
//!
//! Writeback holds its extents here too, so that no write changes one while it is copied
//! and marked clean; reads pass those: the cache keeps the data they read unchanged.

use std::collections::VecDeque;

use super::Req;

struct Active {
    inode: u32,
    start: u64,
    end: u64,
    seqno: u64,
    slot: u32,
    /// Reads need not wait for it (writeback's extents).
    reads_pass: bool,
}

#[derive(Default)]
pub(crate) struct Order {
    /// Writes and discards submitted and not completed (running or waiting).
    active: Vec<Active>,
    /// Requests waiting to start, in submission order.
    blocked: VecDeque<u32>,
}

impl Order {
    /// A write or discard of sectors `start..end` of `inode` was submitted (with
    /// `reads_pass`: a writeback extent, which only writes wait for).
    pub fn add(&mut self, inode: u32, start: u64, end: u64, seqno: u64, slot: u32, reads_pass: bool) {
        self.active.push(Active { inode, start, end, seqno, slot, reads_pass });
    }

    /// The write or discard in `slot` completed.
    pub fn remove(&mut self, slot: u32) {
        if let Some(i) = self.active.iter().position(|a| a.slot == slot) {
            self.active.swap_remove(i);
        }
    }

    /// True when a write or discard submitted before `seqno` overlaps `start..end` of `inode`
    /// (for a `read`, one that reads do not pass).
    pub fn must_wait(&self, inode: u32, start: u64, end: u64, seqno: u64, read: bool) -> bool {
        self.active
            .iter()
            .any(|a| a.inode == inode && a.seqno < seqno && a.start < end && start < a.end && !(read && a.reads_pass))
    }

    /// True when any write or discard in flight overlaps `start..end` of `inode`.
    pub fn overlaps_any(&self, inode: u32, start: u64, end: u64) -> bool {
        self.active.iter().any(|a| a.inode == inode && a.start < end && start < a.end)
    }

    pub fn block(&mut self, slot: u32) {
        self.blocked.push_back(slot);
    }

    /// The waiting requests that may start now, in submission order (taken off the list).
    pub fn take_ready(&mut self, slots: &[Option<Req>]) -> Vec<u32> {
        let mut ready = Vec::new();
        let mut i = 0;
        while i < self.blocked.len() {
            let slot = self.blocked[i];
            let r = slots[slot as usize].as_ref().expect("a blocked request is live");
            let (start, end) = (r.offset / 512, (r.offset + r.len) / 512);
            if self.must_wait(r.inode, start, end, r.seqno, r.kind == super::Kind::Read) {
                i += 1;
            } else {
                self.blocked.remove(i);
                ready.push(slot);
            }
        }
        ready
    }

    /// Every waiting request (the set is closing).
    pub fn take_all_blocked(&mut self) -> Vec<u32> {
        self.blocked.drain(..).collect()
    }
}
