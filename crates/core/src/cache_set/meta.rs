//! Metadata kept outside the journal: the prio chain (gens and prios of every bucket), the
//! UUID table (which cached device each inode is), the superblock, and the list of
//! checkpoints replay may start from.
//!
//! Each is written to fresh buckets; once the write completes its pointer is stamped into
//! the next journal entry, and once that entry is durable the old copy is given up: the
//! previous prio chain freed and its batch of invalidated buckets handed out, the old UUID
//! bucket freed. A write error takes the set out of service.

use super::checkpoint::Reason;
use super::journal::Waiter;
use super::{CacheSet, SetState, Tag, CKPT_PRIO_HARD};
use crate::error::{Error, Result};
use crate::io::{AlignedBuf, IoCompletion, IoRequest};
use crate::journal::MetaPtr;
use crate::uuids::{self, UuidEntry};

/// A checkpoint replay may start from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CheckpointRef {
    pub ptr: MetaPtr,
    pub buckets: Vec<u64>,
    /// The prio write sequence number when it was begun.
    pub prio_seq: u64,
}

struct PrioInFlight {
    buckets: Vec<u64>,
    left: usize,
}

/// A control operation (its tag, and the inode it completes with) waiting for a UUID table.
type UuidEvent = (u64, u32);

struct UuidWrite {
    entries: Vec<UuidEntry>,
    ptr: MetaPtr,
    old: Option<MetaPtr>,
    /// Control operations that complete once the table is recorded.
    events: Vec<(u64, u32)>,
    written: bool,
}

pub(crate) struct Meta {
    /// Head of the newest prio chain written (stamped into entries).
    pub prio_head: u64,
    prio: Option<PrioInFlight>,
    /// The UUID table as recorded, and where.
    pub uuids: Vec<UuidEntry>,
    pub uuid_ptr: Option<MetaPtr>,
    uuid_write: Option<UuidWrite>,
    /// The next table to write, with the events waiting for it.
    uuid_next: Option<(Vec<UuidEntry>, Vec<UuidEvent>)>,
    /// Checkpoints replay may start from, oldest first; the last is the newest.
    pub checkpoints: Vec<CheckpointRef>,
    /// Buckets of checkpoints given up, freed once an entry that no longer needs them is durable.
    pub release: Vec<u64>,
    /// The superblock page as last written.
    pub sb_page: Vec<u8>,
    pub sb_writing: bool,
    /// The page changed while it was being written: write it again after.
    pub sb_again: bool,
}

impl Meta {
    pub fn new(prio_head: u64, uuids: Vec<UuidEntry>, uuid_ptr: Option<MetaPtr>, sb_page: Vec<u8>) -> Meta {
        Meta {
            prio_head,
            prio: None,
            uuids,
            uuid_ptr,
            uuid_write: None,
            uuid_next: None,
            checkpoints: Vec::new(),
            release: Vec::new(),
            sb_page,
            sb_writing: false,
            sb_again: false,
        }
    }

    pub fn newest_checkpoint(&self) -> Option<MetaPtr> {
        self.checkpoints.last().map(|c| c.ptr)
    }

    pub fn oldest_checkpoint(&self) -> Option<MetaPtr> {
        self.checkpoints.first().map(|c| c.ptr)
    }

    /// Buckets GC must mark as metadata: the UUID table(s) and every checkpoint kept or
    /// being released.
    pub fn metadata_buckets(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.uuid_ptr.iter().map(|p| p.bucket).collect();
        v.extend(self.uuid_write.iter().map(|w| w.ptr.bucket));
        for c in &self.checkpoints {
            v.extend(c.buckets.iter().copied());
        }
        v.extend(self.release.iter().copied());
        v
    }

    /// The UUID table with every change asked for so far, recorded or not.
    pub fn latest_uuids(&self) -> &[UuidEntry] {
        if let Some((t, _)) = &self.uuid_next {
            return t;
        }
        match &self.uuid_write {
            Some(w) => &w.entries,
            None => &self.uuids,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "prio head {} writing {:?}; uuid writing {} queued {}; checkpoints {:?}",
            self.prio_head,
            self.prio.as_ref().map(|p| p.left),
            self.uuid_write.is_some(),
            self.uuid_next.is_some(),
            self.checkpoints.iter().map(|c| c.ptr.seq).collect::<Vec<_>>()
        )
    }

    /// A UUID table or prio write is under way.
    pub fn busy(&self) -> bool {
        self.prio.is_some() || self.uuid_write.is_some() || self.uuid_next.is_some() || self.sb_writing
    }
}

impl CacheSet {
    /// Prio writes begun since the oldest checkpoint replay may start from.
    pub(crate) fn prio_write_distance(&self) -> u64 {
        let now = self.alloc.prio_seq(0).unwrap_or(0);
        let base = self.meta.checkpoints.first().map_or(now, |c| c.prio_seq);
        now.saturating_sub(base)
    }

    /// Starts the prio write the allocator asked for (or, `force`d, one of the current
    /// state). Returns false when it cannot start now.
    pub(crate) fn prio_write_start(&mut self, force: bool) -> bool {
        if self.meta.prio.is_some() || matches!(self.state, SetState::Failed(_) | SetState::Closed) {
            return false;
        }
        if self.prio_write_distance() + 1 > CKPT_PRIO_HARD {
            // Gens could otherwise move too far within what replay reads: a checkpoint first.
            self.checkpoint_wanted(Reason::PrioDistance);
            return false;
        }
        let w = if force { self.alloc.prio_write_force(0) } else { self.alloc.prio_write_begin(0) };
        let w = match w {
            Ok(w) => w,
            Err(e) if e.kind() == crate::error::ErrorKind::NoSpace => return false,
            Err(e) => {
                self.fail(e);
                return false;
            }
        };
        let bb = self.geo.bucket_bytes;
        let mut reqs = Vec::with_capacity(w.buckets.len());
        for (link, &b) in w.buckets.iter().enumerate() {
            let mut buf = AlignedBuf::new(bb);
            if let Err(e) = self.alloc.encode_prio_bucket(0, link, &mut buf) {
                self.fail(e);
                return false;
            }
            reqs.push(IoRequest::write(self.cache, b * bb as u64, buf, Tag::Prio { link: link as u32 }.encode()));
        }
        self.meta.prio = Some(PrioInFlight { left: w.buckets.len(), buckets: w.buckets });
        for r in reqs {
            self.push_io(r);
        }
        true
    }

    pub(crate) fn prio_io_done(&mut self, link: u32, c: IoCompletion) {
        if let Err(e) = c.result {
            return self.fail(Error::new(e.kind(), format!("prio write, link {link}: {}", e.message())));
        }
        self.cache_unflushed = true;
        self.stats.prio_bytes += self.geo.bucket_bytes as u64;
        let Some(p) = self.meta.prio.as_mut() else { return };
        p.left -= 1;
        if p.left == 0 {
            self.meta.prio_head = p.buckets[0];
            self.journal_wait_new_entry(Waiter::Prio);
        }
    }

    /// An entry recording the new prio chain is durable: its batch may be handed out.
    pub(crate) fn prio_recorded(&mut self) {
        self.meta.prio = None;
        if let Err(e) = self.alloc.prio_write_committed(0) {
            return self.fail(e);
        }
        self.stats.prio_writes += 1;
        if self.prio_write_distance() >= super::CKPT_PRIO_SOFT {
            self.checkpoint_wanted(Reason::PrioDistance);
        }
        self.startup_progress();
        self.space_progress();
    }

    /// Replaces the UUID table; `event` (a control operation's tag and its result) completes
    /// once the new table is recorded.
    pub(crate) fn uuid_write(&mut self, entries: Vec<UuidEntry>, event: Option<(u64, u32)>) {
        let next = self.meta.uuid_next.get_or_insert_with(|| (Vec::new(), Vec::new()));
        next.0 = entries;
        next.1.extend(event);
        self.uuid_write_next();
    }

    /// Starts the queued UUID table write, if none is under way and a bucket is free.
    pub(crate) fn uuid_write_next(&mut self) {
        if self.meta.uuid_write.is_some() || self.meta.uuid_next.is_none() {
            return;
        }
        if matches!(self.state, SetState::Failed(_) | SetState::Closed) {
            return;
        }
        let Some(b) = self.meta_bucket() else { return };
        let (entries, events) = self.meta.uuid_next.take().expect("queued");
        let gen = self.alloc.bucket(0, b).map(|i| i.gen).unwrap_or(0);
        // The table carries a seq that its journal pointer repeats, so that a table left in
        // a reused bucket is never taken for this one (the bucket's gen tells them apart too).
        let seq = self.journal.ring.seq() + 1;
        let buf = match uuids::encode(&entries, self.geo.set_magic, seq, self.geo.bucket_bytes, self.geo.block_bytes) {
            Ok(b) => b,
            Err(e) => {
                let _ = self.alloc.unpin(0, b);
                let _ = self.alloc.bucket_free(0, b);
                for (tag, _) in events {
                    self.events.push((tag, Err(e.clone())));
                }
                return;
            }
        };
        let ptr = MetaPtr { seq, dev: 0, bucket: b, gen };
        let old = self.meta.uuid_ptr;
        self.meta.uuid_write = Some(UuidWrite { entries, ptr, old, events, written: false });
        let at = b * self.geo.bucket_bytes as u64;
        self.push_io(IoRequest::write(self.cache, at, AlignedBuf::from_slice(&buf), Tag::Uuid.encode()));
    }

    pub(crate) fn uuid_io_done(&mut self, c: IoCompletion) {
        if let Err(e) = c.result {
            return self.fail(Error::new(e.kind(), format!("UUID table write: {}", e.message())));
        }
        self.cache_unflushed = true;
        let Some(w) = self.meta.uuid_write.as_mut() else { return };
        w.written = true;
        self.stats.other_meta_bytes += c.op.len();
        self.meta.uuid_ptr = Some(w.ptr);
        self.journal_wait_new_entry(Waiter::Uuid);
    }

    /// An entry recording the new UUID table is durable.
    pub(crate) fn uuid_recorded(&mut self) {
        let Some(w) = self.meta.uuid_write.take() else { return };
        self.meta.uuids = w.entries;
        let _ = self.alloc.unpin(0, w.ptr.bucket);
        if let Some(o) = w.old {
            if let Err(e) = self.alloc.bucket_free(0, o.bucket) {
                return self.fail(e);
            }
        }
        for (tag, inode) in w.events {
            self.uuid_event_done(tag, inode);
        }
        self.startup_progress();
        self.uuid_write_next();
        self.close_progress();
    }

    /// Writes the superblock with `CACHE_SYNC` set and `seq` bumped.
    pub(crate) fn super_write(&mut self) {
        let mut page = self.meta.sb_page.clone();
        if let Err(e) = super::superblock::mark_sync(&mut page) {
            return self.fail(e);
        }
        self.meta.sb_page = page.clone();
        self.meta.sb_writing = true;
        let buf = AlignedBuf::from_slice(&page);
        self.push_io(IoRequest::write_fua(self.cache, super::superblock::SB_OFFSET, buf, Tag::Super.encode()));
    }

    pub(crate) fn super_io_done(&mut self, c: IoCompletion) {
        self.meta.sb_writing = false;
        if let Err(e) = c.result {
            return self.fail(Error::new(e.kind(), format!("superblock write: {}", e.message())));
        }
        self.stats.other_meta_bytes += c.op.len();
        match super::superblock::parse(&self.meta.sb_page) {
            Ok(sb) => self.geo.sb = sb,
            Err(e) => return self.fail(e),
        }
        if std::mem::take(&mut self.meta.sb_again) {
            return self.super_write();
        }
        self.startup_progress();
    }

    /// The state the replacement policy keeps beside the allocator's: S3-FIFO's ghost record
    /// of as many extents as the cache holds blocks (at most 2^20, 32 MiB of memory), and
    /// `tinylfu`'s doorkeeper; other policies neither.
    pub(crate) fn policy_state_follow(&mut self) {
        let r = self.cache_policy().0;
        let blocks = self.alloc.nbuckets(0).unwrap_or(0) as usize * (self.geo.bucket_bytes / self.geo.block_bytes);
        self.index.set_ghost_capacity(if r.fifo_queues() { blocks.clamp(1, 1 << 20) } else { 0 });
        self.admission.resize(if r == crate::alloc::Replacement::TinyLfu { blocks as u64 } else { 0 });
    }

    /// The cache device's replacement policy and whether it discards buckets before reuse
    /// (bcache's sysfs `cache_replacement_policy` and `discard`).
    pub fn cache_policy(&self) -> (crate::alloc::Replacement, bool) {
        self.alloc.cache_policy(0).unwrap_or_default()
    }

    /// Changes the replacement policy and the discard flag at once, and records them in the
    /// cache superblock (written in the background, as bcache's `bcache_write_super`).
    pub fn set_cache_policy(&mut self, replacement: crate::alloc::Replacement, discard: bool) -> Result<()> {
        if let Some(e) = self.failed_error() {
            return Err(e);
        }
        if matches!(self.state, SetState::Closing | SetState::Closed) {
            return Err(Error::new(crate::error::ErrorKind::Closed, "the cache set is closed"));
        }
        self.alloc.set_cache_policy(0, replacement, discard)?;
        self.policy_state_follow();
        let bits = match replacement {
            crate::alloc::Replacement::Lru => 0,
            crate::alloc::Replacement::Fifo => 1,
            crate::alloc::Replacement::Random => 2,
            // Not one of bcache's: bcache-tools shows the number (see docs/format.md).
            crate::alloc::Replacement::S3Fifo => 3,
            crate::alloc::Replacement::TinyLfu => 4,
        };
        let mut page = self.meta.sb_page.clone();
        let flags = super::superblock::parse(&page)?.flags_with(bits, discard);
        super::superblock::set_flags(&mut page, flags)?;
        self.meta.sb_page = page;
        if self.meta.sb_writing {
            self.meta.sb_again = true;
        } else {
            self.super_write();
        }
        Ok(())
    }
}
