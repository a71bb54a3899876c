//! Writing checkpoints while the set runs (format and reading: [`crate::checkpoint`]).
//!
//! A checkpoint covers journal entries up to `seq`, the entry before the one open when it
//! began, and is taken a slice of the index at a time; each full bucket's worth is written
//! to a bucket from the btree reserve as soon as it has one. The slices are a fuzzy
//! snapshot, made exact by replaying the journal from `seq + 1`, which holds every change
//! made since the first slice (see the format's module docs). Once every bucket is written
//! the checkpoint is stamped into the next journal entry, and the checkpoints it makes
//! unnecessary are freed when that entry is durable. The one before is kept as a fallback
//! while the journal still holds the entries since it and few prio writes happened since.
//!
//! A checkpoint begins when the entries since the newest one fill a quarter of the journal,
//! when `CKPT_PRIO_SOFT` prio writes happened since the oldest one kept, when the journal is
//! full, after a recovery that found a gap or a damaged checkpoint, and at a clean close.

use std::collections::VecDeque;
use std::time::Instant;

use super::journal::Waiter;
use super::meta::CheckpointRef;
use super::{CacheSet, SetState, Tag, CKPT_PRIO_SOFT};
use crate::checkpoint::{CheckpointGeometry, Chunk, Writer};
use crate::error::Error;
use crate::index::{Key, ScanFilter, ScanPos};
use crate::io::{AlignedBuf, IoCompletion, IoRequest};
use crate::journal::MetaPtr;

/// Keys a checkpoint slice takes between clock checks.
const CKPT_BATCH: usize = 1024;

/// Why a checkpoint is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The journal since the newest checkpoint passed a quarter of its size.
    Journal,
    /// Prio writes since the oldest checkpoint kept (gens must not wrap within a replay).
    PrioDistance,
    /// The journal has no room for the next entry.
    JournalFull,
    /// Opening found a gap or a damaged checkpoint: what it recovered becomes the base.
    Recovery,
    /// A fresh set's first, empty checkpoint.
    Fresh,
    /// A clean close: the next open replays almost nothing.
    Close,
}

struct Run {
    w: Writer,
    reason: Reason,
    /// Where the scan goes on; None once every key was taken.
    pos: Option<ScanPos>,
    /// Chunks waiting for a bucket; the last one taken is the head.
    queue: VecDeque<(Chunk, bool)>,
    /// Buckets written or being written, in write order (pinned until recorded).
    buckets: Vec<u64>,
    head: Option<(u64, u8)>,
    left: u32,
    prio_seq: u64,
    out: Vec<Key>,
    buf: Vec<u8>,
    written: bool,
}

#[derive(Default)]
pub(crate) struct CheckpointState {
    pub wanted: Option<Reason>,
    run: Option<Run>,
    /// Journal entries and prio writes when the triggers were last looked at: they are
    /// looked at again only once one of them moved.
    looked_at: (u64, u64),
}

impl CheckpointState {
    /// Buckets a checkpoint being written holds.
    pub fn buckets_in_flight(&self) -> Vec<u64> {
        self.run.as_ref().map(|r| r.buckets.clone()).unwrap_or_default()
    }

    pub fn running(&self) -> bool {
        self.run.is_some()
    }

    /// The run has keys to take or chunks to place (work for a slice).
    pub fn has_work(&self) -> bool {
        self.run.as_ref().is_some_and(|r| r.pos.is_some())
    }
}

impl CacheSet {
    /// Asks for a checkpoint (one runs at a time; a close's runs after the current one).
    pub(crate) fn checkpoint_wanted(&mut self, reason: Reason) {
        if reason == Reason::Close || self.ckpt.wanted.is_none() {
            self.ckpt.wanted = Some(reason);
        }
    }

    /// Begins a checkpoint if one is wanted and none runs.
    pub(crate) fn checkpoint_begin(&mut self) {
        if self.ckpt.run.is_some() || matches!(self.state, SetState::Failed(_) | SetState::Closed) {
            return;
        }
        let Some(reason) = self.ckpt.wanted.take() else { return };
        let g = CheckpointGeometry {
            bucket_bytes: self.geo.bucket_bytes,
            block_bytes: self.geo.block_bytes,
            set_magic: self.geo.set_magic,
        };
        // Keys of the open entry and every later one are replayed on top.
        let seq = self.journal_open_seq() - 1;
        let prio_seq = self.alloc.prio_seq(0).unwrap_or(0);
        self.ckpt.run = Some(Run {
            w: Writer::new(&g, seq, prio_seq),
            reason,
            pos: Some(ScanPos::default()),
            queue: VecDeque::new(),
            buckets: Vec::new(),
            head: None,
            left: 0,
            prio_seq,
            out: Vec::new(),
            buf: Vec::new(),
            written: false,
        });
    }

    /// Takes keys until `deadline`, then writes what is ready. True while keys are left.
    pub(crate) fn checkpoint_slice(&mut self, deadline: Instant) -> bool {
        let Some(mut run) = self.ckpt.run.take() else { return false };
        while let Some(pos) = run.pos {
            let next = self.index.scan(pos, ScanFilter::All, CKPT_BATCH, &self.alloc, &mut run.out);
            for k in &run.out {
                match run.w.push(k) {
                    Ok(Some(full)) => run.queue.push_back((full, false)),
                    Ok(None) => {}
                    Err(e) => {
                        self.ckpt.run = Some(run);
                        self.fail(e);
                        return false;
                    }
                }
            }
            run.pos = next;
            if run.pos.is_none() {
                let last = run.w.finish();
                run.queue.push_back((last, true));
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let more = run.pos.is_some();
        self.ckpt.run = Some(run);
        self.checkpoint_pump();
        more
    }

    /// Writes the chunks that are ready to buckets, as far as buckets are free.
    pub(crate) fn checkpoint_pump(&mut self) {
        while self.ckpt.run.as_ref().is_some_and(|r| !r.queue.is_empty()) {
            if matches!(self.state, SetState::Failed(_) | SetState::Closed) {
                return;
            }
            let Some(b) = self.meta_bucket() else { return };
            let gen = self.alloc.bucket(0, b).map(|i| i.gen).unwrap_or(0);
            let run = self.ckpt.run.as_mut().expect("a run");
            let (chunk, head) = run.queue.pop_front().expect("a chunk");
            let mut buf = std::mem::take(&mut run.buf);
            if let Err(e) = run.w.encode(&chunk, b, head, &mut buf) {
                run.buf = buf;
                return self.fail(e);
            }
            run.buckets.push(b);
            if head {
                run.head = Some((b, gen));
            }
            run.left += 1;
            let data = AlignedBuf::from_slice(&buf);
            run.buf = buf;
            let at = b * self.geo.bucket_bytes as u64;
            self.push_io(IoRequest::write(self.cache, at, data, Tag::Checkpoint.encode()));
        }
    }

    pub(crate) fn checkpoint_io_done(&mut self, c: IoCompletion) {
        if let Err(e) = c.result {
            return self.fail(Error::new(e.kind(), format!("checkpoint write: {}", e.message())));
        }
        self.cache_unflushed = true;
        self.stats.checkpoint_bytes += c.op.len();
        let Some(run) = self.ckpt.run.as_mut() else { return };
        run.left -= 1;
        if run.left > 0 || run.pos.is_some() || !run.queue.is_empty() || run.written {
            return;
        }
        let Some((head, gen)) = run.head else { return };
        run.written = true;
        let new = CheckpointRef {
            ptr: MetaPtr { seq: run.w.seq(), dev: 0, bucket: head, gen },
            buckets: run.buckets.clone(),
            prio_seq: run.prio_seq,
        };
        // Keep the newest older checkpoint as a fallback while the journal holds every entry
        // since it (in half its size) and few prio writes happened since it began.
        let mut old = std::mem::take(&mut self.meta.checkpoints);
        let keep = old.last().is_some_and(|prev| {
            let (used, nr) = self.journal_fill_since(prev.ptr.seq);
            let prio_now = self.alloc.prio_seq(0).unwrap_or(0);
            used * 2 <= nr && prio_now.saturating_sub(prev.prio_seq) < CKPT_PRIO_SOFT
        });
        let prev = if keep { old.pop() } else { None };
        for c in old {
            self.meta.release.extend(c.buckets);
        }
        self.meta.checkpoints = prev.into_iter().chain(std::iter::once(new)).collect();
        // A journal that was full has room once entries stamp the new last_seq.
        self.journal_unblock();
        self.journal_wait_new_entry(Waiter::Checkpoint);
    }

    /// An entry recording the new checkpoint (and the new `last_seq`) is durable.
    pub(crate) fn checkpoint_recorded(&mut self) {
        let Some(run) = self.ckpt.run.take() else { return };
        for b in std::mem::take(&mut self.meta.release) {
            if let Err(e) = self.alloc.bucket_free(0, b) {
                return self.fail(e);
            }
        }
        for &b in &run.buckets {
            let _ = self.alloc.unpin(0, b);
        }
        self.stats.checkpoints += 1;
        if run.reason == Reason::PrioDistance {
            self.stats.prio_distance_checkpoints += 1;
        }
        if run.reason == Reason::Close {
            self.closing.checkpoint_done = true;
        }
        self.startup_progress();
        self.space_progress();
        self.close_progress();
    }

    /// Begins a checkpoint when the journal since the newest one passed a quarter of its size.
    pub(crate) fn maybe_checkpoint(&mut self) {
        if self.ckpt.run.is_some() || self.ckpt.wanted.is_some() || self.state != SetState::Running {
            return;
        }
        let now = (self.journal.entries, self.alloc.prio_seq(0).unwrap_or(0));
        if std::mem::replace(&mut self.ckpt.looked_at, now) == now {
            return;
        }
        let nr = self.journal.ring.nr_buckets();
        let since = match self.meta.newest_checkpoint() {
            Some(p) => self.journal_fill_since(p.seq).0,
            None => nr,
        };
        if since > (nr / 4).max(1) {
            self.checkpoint_wanted(Reason::Journal);
        } else if self.prio_write_distance() >= CKPT_PRIO_SOFT {
            self.checkpoint_wanted(Reason::PrioDistance);
        }
    }
}
