//! The journal writer: when entries are written and what they record.
//!
//! Keys go into the open entry as the index takes them. One entry is written at a time:
//! a flush of the cache device first when data or metadata reached it since the last one
//! (the keys point at that data), then the entry with FUA (or followed by a flush where
//! `journal_fua` is off). Meanwhile the next entry fills. An entry is written when
//! somebody waits for it (a flush, a FUA write, a metadata pointer that changed), when it
//! is full, or when its first key has waited `journal_delay_ms`. Each entry is stamped at
//! write time with the newest pointers (prio chain, UUID table, checkpoint) and the oldest
//! entry replay needs (`last_seq`).
//!
//! Waiters name the entry that must be durable: a key's is the entry it went into; a
//! metadata pointer's is the first entry written after it changed.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::{CacheSet, SetState, Tag};
use crate::error::{Error, ErrorKind};
use crate::index::Key;
use crate::io::{AlignedBuf, IoCompletion, IoRequest};
use crate::journal::{Journal, Jset, JSET_PRIO_SLOTS};

/// Who waits for an entry to be durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Waiter {
    /// A user request (flush, FUA write): one of its outstanding parts.
    Req(u32),
    /// A write's parts in place, held until the checksums they invalidate are dropped.
    InPlace(u32),
    /// The prio chain just written is recorded.
    Prio,
    /// The UUID table just written is recorded.
    Uuid,
    /// The checkpoint just written is recorded.
    Checkpoint,
    /// The clean close's entry is durable.
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Preflush,
    Write,
    Postflush,
}

struct Inflight {
    seq: u64,
    stage: Stage,
    at: u64,
    data: Option<AlignedBuf>,
}

pub(crate) struct JournalWriter {
    pub ring: Journal,
    /// Keys of the open entry, and its seq.
    open: Vec<Key>,
    open_words: usize,
    open_seq: u64,
    open_since: Option<Instant>,
    /// Entries sealed (full) and not yet written, oldest first.
    sealed: VecDeque<(u64, Vec<Key>)>,
    inflight: Option<Inflight>,
    /// Newest entry known durable.
    pub durable: u64,
    /// Newest entry somebody waits for.
    want: u64,
    waiters: Vec<(u64, Waiter)>,
    /// The ring was full: nothing is written until a checkpoint moves `last_seq` on.
    pub full: bool,
    /// The next entry written is the clean close's.
    pub clean_next: bool,
    fua: bool,
    delay: Duration,
    max_words: usize,
    buf: Vec<u8>,
    pub entries: u64,
    pub preflushes: u64,
}

impl JournalWriter {
    pub fn new(ring: Journal, fua: bool, delay: Duration) -> JournalWriter {
        let seq = ring.seq();
        let max_words = ring.geometry().max_key_words();
        JournalWriter {
            ring,
            open: Vec::new(),
            open_words: 0,
            open_seq: seq + 1,
            open_since: None,
            sealed: VecDeque::new(),
            inflight: None,
            durable: seq,
            want: 0,
            waiters: Vec::new(),
            full: false,
            clean_next: false,
            fua,
            delay,
            max_words,
            buf: Vec::new(),
            entries: 0,
            preflushes: 0,
        }
    }

    /// The first entry whose header is written from now on.
    fn next_stamped(&self) -> u64 {
        self.sealed.front().map_or(self.open_seq, |s| s.0)
    }
}

impl CacheSet {
    /// Records `key` (the index just took it) in the open entry; returns that entry's seq.
    pub(crate) fn journal_add(&mut self, key: Key) -> u64 {
        let j = &mut self.journal;
        j.open_words += key.bkey_u64s();
        j.open.push(key);
        j.open_since.get_or_insert_with(Instant::now);
        let seq = j.open_seq;
        if j.open_words >= j.max_words {
            let keys = std::mem::take(&mut j.open);
            j.sealed.push_back((j.open_seq, keys));
            j.open_words = 0;
            j.open_since = None;
            j.open_seq += 1;
        }
        seq
    }

    /// The seq a request that needs every key added so far durable waits for; 0 when all
    /// are durable already.
    pub(crate) fn journal_covering(&self) -> u64 {
        let j = &self.journal;
        if !j.open.is_empty() {
            j.open_seq
        } else if let Some(s) = j.sealed.back() {
            s.0
        } else if let Some(f) = &j.inflight {
            f.seq
        } else {
            0
        }
    }

    /// `who` waits until entry `seq` is durable (now, if it is already).
    pub(crate) fn journal_wait(&mut self, seq: u64, who: Waiter) {
        if seq <= self.journal.durable {
            self.journal_wake(who);
            return;
        }
        self.journal.want = self.journal.want.max(seq);
        self.journal.waiters.push((seq, who));
        self.journal_kick();
    }

    /// `who` waits for an entry stamped with the pointers as they are now (a metadata
    /// pointer just changed).
    pub(crate) fn journal_wait_new_entry(&mut self, who: Waiter) {
        let seq = self.journal.next_stamped();
        self.journal_wait(seq, who);
    }

    /// The first entry whose write begins from now on (and so flushes what reached the
    /// cache device before it).
    pub(crate) fn journal_next_stamped(&self) -> u64 {
        self.journal.next_stamped()
    }

    /// Writes the open entry if its delay ran out.
    pub(crate) fn journal_tick(&mut self, now: Instant) {
        if self.journal.open_since.is_some_and(|t| now.duration_since(t) >= self.journal.delay) {
            self.journal.want = self.journal.want.max(self.journal.open_seq);
        }
        self.journal_kick();
    }

    /// When the open entry's delay runs out, if it holds keys.
    pub(crate) fn journal_deadline(&self) -> Option<Instant> {
        self.journal.open_since.map(|t| t + self.journal.delay)
    }

    /// Starts the next entry write if one is due and none is in flight.
    pub(crate) fn journal_kick(&mut self) {
        if self.journal.inflight.is_some() || self.journal.full {
            return;
        }
        if matches!(self.state, SetState::Failed(_) | SetState::Closed) {
            return;
        }
        let j = &mut self.journal;
        let (seq, keys) = if let Some(s) = j.sealed.pop_front() {
            s
        } else if j.open_seq <= j.want {
            let keys = std::mem::take(&mut j.open);
            let seq = j.open_seq;
            j.open_words = 0;
            j.open_since = None;
            j.open_seq += 1;
            (seq, keys)
        } else {
            return;
        };
        let mut prio_bucket = [0u64; JSET_PRIO_SLOTS];
        prio_bucket[0] = self.meta.prio_head;
        let jset = Jset {
            seq,
            last_seq: self.last_seq(),
            uuid_bucket: self.meta.uuid_ptr,
            checkpoint: self.meta.newest_checkpoint(),
            prio_bucket,
            keys,
            clean: std::mem::replace(&mut self.journal.clean_next, false),
        };
        let mut buf = std::mem::take(&mut self.journal.buf);
        let r = self.journal.ring.prepare(&jset, &mut buf);
        let at = match r {
            Ok(at) => at,
            Err(e) if e.kind() == ErrorKind::NoSpace => {
                // Wait for a checkpoint to move last_seq on; the entry is written then.
                self.journal.full = true;
                self.journal.buf = buf;
                self.journal.sealed.push_front((seq, jset.keys));
                self.checkpoint_wanted(super::checkpoint::Reason::JournalFull);
                return;
            }
            Err(e) => {
                self.journal.buf = buf;
                self.fail(Error::new(e.kind(), format!("journal entry {seq}: {}", e.message())));
                return;
            }
        };
        let data = AlignedBuf::from_slice(&buf);
        self.journal.buf = buf;
        self.journal.entries += 1;
        let preflush = std::mem::replace(&mut self.cache_unflushed, false);
        let stage = if preflush { Stage::Preflush } else { Stage::Write };
        self.journal.inflight = Some(Inflight { seq, stage, at, data: Some(data) });
        if preflush {
            self.journal.preflushes += 1;
            self.push_io(IoRequest::flush(self.cache, Tag::Journal.encode()));
        } else {
            self.journal_submit_write();
        }
    }

    fn journal_submit_write(&mut self) {
        let f = self.journal.inflight.as_mut().expect("an entry in flight");
        f.stage = Stage::Write;
        let data = f.data.take().expect("entry data");
        let (at, tag) = (f.at, Tag::Journal.encode());
        let req = if self.journal.fua {
            IoRequest::write_fua(self.cache, at, data, tag)
        } else {
            IoRequest::write(self.cache, at, data, tag)
        };
        self.push_io(req);
    }

    pub(crate) fn journal_io_done(&mut self, c: IoCompletion) {
        let Some(f) = self.journal.inflight.as_ref() else { return };
        let (seq, stage) = (f.seq, f.stage);
        if let Err(e) = c.result {
            self.journal.inflight = None;
            let what = match stage {
                Stage::Preflush => "flush before",
                Stage::Write => "write of",
                Stage::Postflush => "flush after",
            };
            self.fail(Error::new(e.kind(), format!("journal: {what} entry {seq}: {}", e.message())));
            return;
        }
        match stage {
            Stage::Preflush => self.journal_submit_write(),
            Stage::Write if !self.journal.fua => {
                self.journal.inflight.as_mut().expect("in flight").stage = Stage::Postflush;
                self.push_io(IoRequest::flush(self.cache, Tag::Journal.encode()));
            }
            Stage::Write | Stage::Postflush => {
                self.journal.inflight = None;
                self.journal.durable = seq;
                let mut woken = Vec::new();
                self.journal.waiters.retain(|&(s, w)| {
                    if s <= seq {
                        woken.push(w);
                        false
                    } else {
                        true
                    }
                });
                for w in woken {
                    self.journal_wake(w);
                }
                self.journal_kick();
            }
        }
    }

    fn journal_wake(&mut self, who: Waiter) {
        match who {
            Waiter::Req(slot) => self.req_wait_done(slot),
            Waiter::InPlace(slot) => self.write_in_place_go(slot),
            Waiter::Prio => self.prio_recorded(),
            Waiter::Uuid => self.uuid_recorded(),
            Waiter::Checkpoint => self.checkpoint_recorded(),
            Waiter::Close => self.close_recorded(),
        }
    }

    /// The set failed: every waiting request gets the error.
    pub(crate) fn journal_fail(&mut self, e: &Error) {
        let waiters = std::mem::take(&mut self.journal.waiters);
        for (_, w) in waiters {
            if let Waiter::Req(slot) | Waiter::InPlace(slot) = w {
                self.reqs.get(slot).in_place_gated.clear();
                self.req_failed_part(slot, e.clone());
            }
        }
    }

    /// A checkpoint moved `last_seq` on: a full journal may go on.
    pub(crate) fn journal_unblock(&mut self) {
        if self.journal.full {
            self.journal.full = false;
            self.journal_kick();
        }
    }

    /// Oldest entry replay needs: the one after the oldest checkpoint kept.
    pub(crate) fn last_seq(&self) -> u64 {
        match self.meta.oldest_checkpoint() {
            Some(p) => p.seq + 1,
            None => self.journal.ring.seq() + 1,
        }
    }

    /// Journal buckets holding entries replay would need from the newest checkpoint on.
    pub(crate) fn journal_fill_since(&self, seq: u64) -> (usize, usize) {
        (self.journal.ring.buckets_in_use(seq + 1), self.journal.ring.nr_buckets())
    }

    pub(crate) fn journal_describe(&self) -> String {
        let j = &self.journal;
        format!(
            "journal open {} ({} keys) sealed {} in flight {:?} durable {} want {} waiters {} full {}",
            j.open_seq,
            j.open.len(),
            j.sealed.len(),
            j.inflight.as_ref().map(|f| (f.seq, f.stage)),
            j.durable,
            j.want,
            j.waiters.len(),
            j.full
        )
    }

    /// Seq of the open entry (the next key recorded goes into it).
    pub(crate) fn journal_open_seq(&self) -> u64 {
        self.journal.open_seq
    }
}
