//! The cache set: one cache device caching any number of backing devices (cached
//! devices), run as an asynchronous engine over the [`IoEngine`] seam.
//!
//! Nothing here blocks or does I/O itself. Requests come in through
//! [`CacheSet::submit`] as [`IoRequest`]s naming a cached device; the set turns each into
//! I/O on the cache and backing devices, which it leaves in an outbox
//! ([`CacheSet::take_io`]) for whoever drives it ([`engine::CacheEngine`]) to submit, and
//! advances on their completions ([`CacheSet::complete`]). Completed requests wait in
//! [`CacheSet::take_done`]. Background work — the journal's delayed writes, prio writes,
//! discards, garbage collection, checkpoints — runs from [`CacheSet::tick`] in slices of a
//! fraction of a millisecond, so no piece of it holds the engine up.
//!
//! One module per concept:
//! - `open`: reading the set back (journal, prio chain, UUID table, checkpoint, replay,
//!   first GC) on any thread, and the startup that makes the set's state durable;
//! - `request`: the read, write, flush and discard state machines, read-miss fills, and
//!   the ordering of overlapping requests;
//! - `journal`: the journal writer (an entry fills while the previous one is written; a
//!   flush waits only for the entry that covers it);
//! - `meta`: prio writes, the UUID table, the superblock;
//! - `checkpoint`: writing the index as a fuzzy checkpoint, a slice at a time;
//! - `gc`: garbage collection, a slice at a time;
//! - `space`: the allocator's steps, requests waiting for space, bcache's writeback cutoffs;
//! - `accounting`: bcache's hit/miss/bypass counts in decaying windows, per device and set;
//! - `bypass`: which requests skip the cache (sequential cutoff, congestion, a full cache);
//! - `detach`: detaching a device for good (write back, drop its data, free its slot);
//! - `writeback`: dirty data copied to the backing devices at the controller's pace;
//! - `device`: cached devices and cache modes; `tag`: what an I/O belongs to;
//! - [`engine`]: the driver that owns the I/O engine and runs the set.
//!
//! Ordering rules that make a crash lose nothing flushed and never bring back stale data:
//! - state changes only on completions: a key enters the index when its data write
//!   completes; a metadata pointer (prio chain head, UUID table, checkpoint) is stamped
//!   into a journal entry only after the write it points to completed, and what it
//!   replaces is given up only once an entry carrying it is durable;
//! - a journal entry is written after a flush of the cache device whenever data or
//!   metadata was written since the last one, then with FUA (or followed by a flush);
//!   one entry is in flight at a time, so entries become durable in order;
//! - what the journal records is what the index did, in the order it did it: a read-miss
//!   fill records only the sectors it actually filled, a write that dropped cached data
//!   records the range it dropped;
//! - a hit read pins its bucket until the read completes, so the bucket cannot be reused
//!   under it;
//! - a metadata write error takes the set out of service (bcache's
//!   `bch_cache_set_error`): flushes fail, writes are refused, reads of data that is not
//!   dirty go to the backing device;
//! - opening a set ends with a durable prio write, so the gens the first GC bumped are on
//!   disk before any bucket is reused;
//! - a checkpoint is begun every `CKPT_PRIO_SOFT` prio writes and prio writes wait at
//!   `CKPT_PRIO_HARD`, so no bucket's gen moves 128 or more within what the journal would
//!   replay, and replay can never mistake a stale pointer for a live one;
//! - overlapping requests to a cached device are served in the order they were submitted
//!   (a read or write waits for earlier overlapping writes and discards).

mod accounting;
mod admission;
mod bypass;
mod checkpoint;
mod detach;
mod device;
pub mod engine;
mod existing;
mod gc;
mod journal;
mod meta;
mod moving_gc;
mod open;
mod request;
mod slots;
mod space;
pub mod superblock;
mod tag;
mod volume;
mod writeback;

use std::time::{Duration, Instant};

use crate::alloc::Allocator;
use crate::error::{Error, ErrorKind, Result};
use crate::index::ExtentIndex;
use crate::io::{DevId, IoCompletion, IoRequest};

pub use accounting::{Accounting, StatWindow};
pub use bypass::{BypassConfig, CongestionConfig, CUTOFF_CACHE_ADD};
pub use device::{CacheMode, CachedDevConfig};
pub use engine::CacheEngine;
pub use gc::GcTimes;
pub use moving_gc::MovingGcStats;
pub use open::{load, OpenReport};
pub use superblock::CacheSb;
pub use writeback::{WritebackConfig, WritebackRate};

use checkpoint::CheckpointState;
use device::CachedDev;
use gc::GcState;
use journal::JournalWriter;
use meta::Meta;
use request::Requests;
use space::Space;
use tag::Tag;
use writeback::WbIos;

/// Prio writes after the oldest checkpoint replay may start from at which a new
/// checkpoint is begun.
pub(crate) const CKPT_PRIO_SOFT: u64 = 32;
/// Prio writes after the oldest checkpoint replay may start from at which prio writes wait
/// for a checkpoint. Each prio write moves a bucket's gen at most once, and so may each GC
/// that primes the reserves (at most one per prio write), so gens move at most
/// `2 × CKPT_PRIO_HARD + 2` within a replay: well inside the 128 at which they would wrap.
pub(crate) const CKPT_PRIO_HARD: u64 = 56;
/// A set whose journal replay spans more prio writes than this refuses to open: its gens
/// could have wrapped (only a set that crashed in every startup, dozens of times, gets here).
pub(crate) const CKPT_PRIO_LIMIT: u64 = 62;

/// Tunables of a cache set.
#[derive(Clone, Debug)]
pub struct CacheSetOptions {
    /// How long inserted keys may wait for a journal write when nobody flushes (bcache's
    /// `journal_delay_ms`).
    pub journal_delay_ms: u64,
    /// Seed of the random replacement policy.
    pub seed: u64,
    /// Journal entries are written with FUA (after a flush of the data they point at),
    /// instead of a write between two flushes.
    pub journal_fua: bool,
    /// Longest a slice of background work (GC, checkpoint) may run before the engine
    /// serves requests again.
    pub slice: Duration,
    /// I/O errors of the cache device (decayed, see `io_error_halflife`) at which the set
    /// leaves service (bcache's `io_error_limit`, default 8).
    pub io_error_limit: u32,
    /// Cache-device I/Os after which an error counts half (bcache's `io_error_halflife`);
    /// 0 (the default) never forgets one.
    pub io_error_halflife: u32,
    /// When the cache device counts as congested (bcache's `congested_*_threshold_us`).
    pub congestion: CongestionConfig,
    /// A GC pass runs when a device's writeback has left it with nothing dirty (bcache's
    /// `gc_after_writeback`; default false).
    pub gc_after_writeback: bool,
    /// After each GC pass, the live data of mostly empty buckets moves to fresh ones so
    /// their space comes back (bcache's `copy_gc_enabled`; default true).
    pub copy_gc_enabled: bool,
    /// Every extent written to the cache carries a crc64 of its data in its key (bcache has
    /// the field and leaves it unused); a hit whose data does not match is a cache read
    /// error. Default false.
    pub data_csum: bool,
    /// A hit on an extent in a bucket past the middle of its life (prio below halfway from
    /// the oldest to a fresh bucket's) copies the extent into a fresh bucket, as moving GC
    /// does, instead of making the old bucket young again: hot blocks gather in young
    /// buckets and LRU evicts buckets of cold ones (bcache's LRU keeps a whole bucket for
    /// one hot block in it). Default false.
    pub promote_hits: bool,
}

impl Default for CacheSetOptions {
    fn default() -> Self {
        CacheSetOptions {
            journal_delay_ms: 100,
            seed: 1,
            journal_fua: true,
            slice: Duration::from_micros(500),
            io_error_limit: 8,
            io_error_halflife: 0,
            congestion: CongestionConfig::default(),
            gc_after_writeback: false,
            copy_gc_enabled: true,
            data_csum: false,
            promote_hits: false,
        }
    }
}

/// Counters of a cache set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheSetStats {
    /// Data bytes written to the cache device (writes and read-miss fills).
    pub data_bytes: u64,
    /// Journal entry bytes written.
    pub journal_bytes: u64,
    /// Checkpoint bytes written.
    pub checkpoint_bytes: u64,
    /// Prio chain bytes written.
    pub prio_bytes: u64,
    /// UUID table and superblock bytes written.
    pub other_meta_bytes: u64,
    /// Journal entries written.
    pub journal_entries: u64,
    /// Flushes of the cache device sent ahead of journal entries.
    pub journal_preflushes: u64,
    /// Checkpoints recorded.
    pub checkpoints: u64,
    /// Of those, begun because many prio writes happened since the oldest one kept.
    pub prio_distance_checkpoints: u64,
    /// Prio writes committed.
    pub prio_writes: u64,
    /// GC passes finished.
    pub gc_runs: u64,
    /// Sectors read from the cache (hits).
    pub hit_sectors: u64,
    /// Sectors read from backing devices because the cache did not hold them.
    pub miss_sectors: u64,
    /// Read requests served entirely from the cache.
    pub cache_hits: u64,
    /// Read requests that needed the backing device.
    pub cache_misses: u64,
    /// Bypassed read requests served entirely from the cache (bcache's `cache_bypass_hits`).
    pub cache_bypass_hits: u64,
    /// Bypassed read requests that needed the backing device (`cache_bypass_misses`).
    pub cache_bypass_misses: u64,
    /// Sectors of requests that bypassed the cache, for any reason (bcache's `bypassed`).
    pub bypassed_sectors: u64,
    /// Requests that bypassed because their stream passed the sequential cutoff.
    pub sequential_bypasses: u64,
    /// Requests that bypassed because the cache device was congested.
    pub congested_bypasses: u64,
    /// Requests that added nothing because the cache was past `CUTOFF_CACHE_ADD`.
    pub cache_add_cutoffs: u64,
    /// Fills that lost part of their range to a write or invalidation meanwhile.
    pub cache_miss_collisions: u64,
    /// Sectors of read misses inserted into the cache.
    pub fill_sectors: u64,
    /// Read misses on data the cache held and evicted (the replacement policy's ghost
    /// record): with S3-FIFO they fill buckets of its main queue.
    pub returning_misses: u64,
    /// Read misses `tinylfu`'s admission kept out of the cache (their data missed for the
    /// first time in the window).
    pub admission_bypasses: u64,
    /// Writes in writeback mode sent through instead, because too much of the cache was dirty
    /// (bcache's `CUTOFF_WRITEBACK` and `CUTOFF_WRITEBACK_SYNC`).
    pub writeback_cutoffs: u64,
    /// Writes that went to the cache because they overlapped dirty data, whatever the mode.
    pub dirty_overlaps: u64,
    /// Writes that waited for the allocator to free space.
    pub space_waits: u64,
    /// Requests that waited for an earlier overlapping write.
    pub ordered_waits: u64,
    /// Errors reading or writing the cache device's data.
    pub cache_io_errors: u64,
    /// Hit reads served again from the backing device after a cache read error.
    pub reread_from_backing: u64,
    /// Cache reads (hits, writeback) whose data did not match its key's checksum.
    pub csum_errors: u64,
    /// Sectors read ahead past read misses (bcache's `readahead`).
    pub readahead_sectors: u64,
    /// Hits whose bucket was reused while they were read (bcache's `cache_read_races`);
    /// read again from the backing device when clean.
    pub cache_read_races: u64,
    /// The cache device's I/O error count as `io_error_limit` sees it (decayed by
    /// `io_error_halflife`), times 1000.
    pub io_errors_milli: u64,
    /// Sectors written back to backing devices and marked clean.
    pub writeback_sectors: u64,
    /// Writeback extents that failed (a cache read, a backing write or its flush) and
    /// stayed dirty for the next pass.
    pub writeback_errors: u64,
    /// The longest the engine spent in one call of background work (a GC or checkpoint
    /// slice, the allocator's steps, a prio write's encoding), in microseconds.
    pub longest_tick_us: u64,
}

impl CacheSetStats {
    /// All metadata bytes.
    pub fn meta_bytes(&self) -> u64 {
        self.journal_bytes + self.checkpoint_bytes + self.prio_bytes + self.other_meta_bytes
    }
}

/// Where a set stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetState {
    /// Making the opened state durable (prio write, superblock, ...); requests wait.
    Starting,
    /// Serving requests.
    Running,
    /// A metadata write failed: flushes fail, writes are refused, clean data is read
    /// from the backing devices. Holds the error.
    Failed(Error),
    /// Draining requests and writing a final checkpoint; new requests are refused.
    Closing,
    /// Closed cleanly: everything is on disk.
    Closed,
}

/// A cache set as it runs (see the module docs).
pub struct CacheSet {
    pub(crate) geo: Geometry,
    pub(crate) opts: CacheSetOptions,
    pub(crate) alloc: Allocator,
    pub(crate) index: ExtentIndex,
    pub(crate) journal: JournalWriter,
    pub(crate) meta: Meta,
    pub(crate) gc: GcState,
    pub(crate) ckpt: CheckpointState,
    pub(crate) space: Space,
    pub(crate) reqs: Requests,
    /// Writeback I/Os in flight.
    pub(crate) wb_ios: WbIos,
    pub(crate) moving: moving_gc::MovingGc,
    pub(crate) congestion: bypass::Congestion,
    pub(crate) accounting: accounting::Collector,
    /// The cache device's decaying I/O error count.
    pub(crate) io_errors: IoErrors,
    /// Cached devices by inode.
    pub(crate) devs: Vec<Option<CachedDev>>,
    pub(crate) state: SetState,
    pub(crate) startup: open::Startup,
    pub(crate) closing: Closing,
    /// The cache device in the I/O engine.
    pub(crate) cache: DevId,
    /// Data or metadata reached the cache device since the last flush of it was sent.
    pub(crate) cache_unflushed: bool,
    /// Checksums the index dropped by cuts, and the journal entry recording the newest
    /// (writes in place wait for it: see `request::write`).
    pub(crate) crc_cuts: CrcCuts,
    pub(crate) stats: CacheSetStats,
    /// `tinylfu`'s doorkeeper (off for other policies).
    pub(crate) admission: admission::Doorkeeper,
    pub(crate) report: OpenReport,
    /// I/O to submit.
    pub(crate) io_out: Vec<IoRequest>,
    /// Requests finished.
    pub(crate) done: Vec<IoCompletion>,
    /// Control operations finished (attach, close, ...): their tag and result.
    pub(crate) events: Vec<(u64, Result<u32>)>,
}

/// See `CacheSet::crc_cuts`.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CrcCuts {
    pub seen: u64,
    pub seq: u64,
}

/// Errors count `1 << IO_ERROR_SHIFT` each, so decay keeps fractions (bcache's scale).
const IO_ERROR_SHIFT: u32 = 20;

/// The cache device's I/O errors (scaled by `IO_ERROR_SHIFT`) and the I/Os since the last
/// decay step.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IoErrors {
    errors: u64,
    ios: u64,
}

/// How far a clean close has come.
#[derive(Clone, Debug, Default)]
pub(crate) struct Closing {
    /// The states of devices with no superblock were recorded (see `existing`).
    entries_recorded: bool,
    started: bool,
    pub checkpoint_done: bool,
    flushes_sent: bool,
    flushes: u32,
    clean_sent: bool,
}

/// Sizes of the cache device.
#[derive(Clone, Debug)]
pub(crate) struct Geometry {
    pub sb: CacheSb,
    pub bucket_bytes: usize,
    pub block_bytes: usize,
    pub bucket_bits: u32,
    pub set_magic: u64,
}

impl CacheSet {
    /// Queues a request for a cached device (`req.dev` is its inode, as returned by
    /// [`CacheSet::attach`]). Its completion comes out of [`CacheSet::take_done`] with the
    /// same `user_data`.
    pub fn submit(&mut self, req: IoRequest) {
        self.submit_request(req);
    }

    /// Feeds the completion of an I/O taken from [`CacheSet::take_io`].
    pub fn complete(&mut self, c: IoCompletion) {
        if c.dev == self.cache {
            self.count_cache_io(c.result.as_ref().err());
        }
        match Tag::decode(c.user_data) {
            Some(Tag::Part { req, part }) => self.part_done(req, part, c),
            Some(Tag::Fill { fill, piece }) => self.fill_done(fill, piece, c),
            Some(Tag::Journal) => self.journal_io_done(c),
            Some(Tag::Prio { link }) => self.prio_io_done(link, c),
            Some(Tag::Uuid) => self.uuid_io_done(c),
            Some(Tag::Checkpoint) => self.checkpoint_io_done(c),
            Some(Tag::Super) => self.super_io_done(c),
            Some(Tag::BucketDiscard { bucket }) => self.bucket_discard_done(bucket, c),
            Some(Tag::BackingFlush { inode, n }) => self.backing_flush_done(inode, n, c),
            Some(Tag::Writeback { io, write }) => self.writeback_io_done(io, write, c),
            Some(Tag::MoveRead { io }) => self.move_read_done(io, c),
            Some(Tag::MoveWrite { io, piece }) => self.move_write_done(io, piece, c),
            None => debug_assert!(false, "completion {:#x} the set never issued", c.user_data),
        }
    }

    /// Runs background work that is due (journal delay, allocator steps, a slice of GC or
    /// checkpoint). Call it after completions, and again by [`CacheSet::next_deadline`].
    pub fn tick(&mut self, now: Instant) {
        let started = Instant::now();
        self.tick_inner(now);
        let us = started.elapsed().as_micros() as u64;
        self.stats.longest_tick_us = self.stats.longest_tick_us.max(us);
    }

    fn tick_inner(&mut self, now: Instant) {
        self.journal_tick(now);
        if matches!(self.state, SetState::Running | SetState::Starting | SetState::Closing) {
            // The allocator's steps may free buckets at once: writes waiting for them go on.
            self.space_progress();
            self.background_slice(now);
            self.writeback_tick(now);
            self.detach_progress();
        }
        self.close_progress();
    }

    /// When [`CacheSet::tick`] next has work: `Some(now)` when background work is waiting
    /// for a slice, the journal's delay when keys wait for it, `None` when idle.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.background_pending() || !self.space.waiters.is_empty() && self.state == SetState::Running {
            return Some(Instant::now());
        }
        [self.journal_deadline(), self.writeback_deadline(), self.detach_deadline()].into_iter().flatten().min()
    }

    /// I/O to submit, in order.
    pub fn take_io(&mut self, out: &mut Vec<IoRequest>) {
        out.append(&mut self.io_out);
    }

    /// True when I/O is waiting in the outbox.
    pub fn has_io(&self) -> bool {
        !self.io_out.is_empty()
    }

    /// Finished requests.
    pub fn take_done(&mut self, out: &mut Vec<IoCompletion>) {
        out.append(&mut self.done);
    }

    /// Finished control operations (attach, detach, close): their tag and result (the
    /// inode, for an attach).
    pub fn take_events(&mut self, out: &mut Vec<(u64, Result<u32>)>) {
        out.append(&mut self.events);
    }

    /// Where the set stands.
    pub fn state(&self) -> &SetState {
        &self.state
    }

    /// Counters.
    pub fn stats(&self) -> CacheSetStats {
        let mut s = self.stats;
        s.io_errors_milli = (self.io_errors.errors * 1000) >> IO_ERROR_SHIFT;
        s.cache_miss_collisions = self.index.stats().cache_miss_collisions;
        s.journal_bytes = self.journal.ring.bytes_written();
        s.journal_entries = self.journal.entries;
        s.journal_preflushes = self.journal.preflushes;
        s
    }

    /// What opening found and did.
    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// The superblock as last written.
    pub fn superblock(&self) -> &CacheSb {
        &self.geo.sb
    }

    /// The allocator.
    pub fn allocator(&self) -> &Allocator {
        &self.alloc
    }

    /// The UUID table as recorded.
    pub fn uuids(&self) -> &[crate::uuids::UuidEntry] {
        &self.meta.uuids
    }

    /// Requests (and fills) in flight.
    pub fn in_flight(&self) -> usize {
        self.reqs.in_flight()
    }

    /// Percentage of buckets holding dirty data or metadata, as of the last GC (bcache's
    /// `in_use`, which the writeback cutoffs compare against).
    pub fn in_use_percent(&self) -> u64 {
        self.space.in_use
    }

    /// Dirty sectors of a cached device.
    pub fn dirty_sectors(&self, inode: u32) -> u64 {
        self.index.dirty_sectors(inode)
    }

    /// The ranges of a cached device whose current data only the cache holds (its dirty
    /// extents, adjacent ones merged), as `(sector, sectors)` in order, at most `max` of
    /// them: what a set out of service reports lost should its cache device be lost too.
    pub fn dirty_extents(&mut self, inode: u32, max: usize) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut keys = Vec::new();
        let mut pos = crate::index::ScanPos { inode, offset: 0 };
        loop {
            let next = self.index.scan(pos, crate::index::ScanFilter::Dirty, 1024, &self.alloc, &mut keys);
            for k in keys.iter().filter(|k| k.inode == inode) {
                if let Some(last) = out.last_mut().filter(|(s, l)| *s + *l == k.start) {
                    last.1 += k.size;
                } else if out.len() == max {
                    return out;
                } else {
                    out.push((k.start, k.size));
                }
            }
            match next {
                Some(p) if p.inode == inode => pos = p,
                _ => return out,
            }
        }
    }

    /// Sectors of a cached device the cache holds.
    pub fn cached_sectors(&self, inode: u32) -> u64 {
        self.index.sectors(inode)
    }

    /// The cache mode of a cached device.
    pub fn cache_mode(&self, inode: u32) -> Result<CacheMode> {
        Ok(self.dev(inode)?.mode)
    }

    /// Switches a cached device's cache mode; requests submitted from now on follow it.
    pub fn set_cache_mode(&mut self, inode: u32, mode: CacheMode) -> Result<()> {
        let d = self.dev_mut(inode)?;
        if d.flash && mode != CacheMode::Writeback {
            return Err(volume::flash_refuses(inode, "another cache mode"));
        }
        d.mode = mode;
        Ok(())
    }

    /// Every live key of the index, in order (for tests and tools: it walks everything).
    pub fn keys(&mut self) -> Vec<crate::index::Key> {
        let mut all = Vec::new();
        let mut out = Vec::new();
        let mut pos = crate::index::ScanPos::default();
        loop {
            let next = self.index.scan(pos, crate::index::ScanFilter::All, 4096, &self.alloc, &mut out);
            all.append(&mut out);
            match next {
                Some(p) => pos = p,
                None => return all,
            }
        }
    }

    /// Where the newest journal entries point (the checkpoint replay starts from, the UUID
    /// table, the head of the prio chain), as they stand now: a checkpoint is named from
    /// when its last bucket is written, before the entry recording it is durable (see
    /// [`CacheSet::checkpoint_running`]).
    pub fn metadata_pointers(&self) -> (Option<crate::journal::MetaPtr>, Option<crate::journal::MetaPtr>, u64) {
        (self.meta.newest_checkpoint(), self.meta.uuid_ptr, self.meta.prio_head)
    }

    /// A checkpoint is wanted or being written (until the entry recording it is durable).
    pub fn checkpoint_running(&self) -> bool {
        self.ckpt.wanted.is_some() || self.ckpt.running()
    }

    /// The buckets of every checkpoint replay may start from, oldest first (the newest may
    /// not be recorded yet: see [`CacheSet::checkpoint_running`]).
    pub fn checkpoint_chains(&self) -> Vec<Vec<u64>> {
        self.meta.checkpoints.iter().map(|c| c.buckets.clone()).collect()
    }

    /// Prio writes begun since the oldest checkpoint replay may start from: what bounds how
    /// far any bucket's gen moved within a replay (a checkpoint is begun at
    /// `CKPT_PRIO_SOFT` = 32, prio writes wait at `CKPT_PRIO_HARD` = 56).
    pub fn prio_distance(&self) -> u64 {
        self.prio_write_distance()
    }

    /// A one-line account of what the set is doing and waiting for, for diagnostics.
    pub fn describe(&self) -> String {
        format!(
            "state {:?}; {} requests and {} fills in flight, {} waiting for space; {}; {}; gc running {} wanted {}; \
             checkpoint running {} wanted {:?}; {} I/O queued; available buckets {}, in use {}%",
            self.state,
            self.reqs.in_flight() - self.reqs.fills.len(),
            self.reqs.fills.len(),
            self.space.waiters.len(),
            self.journal_describe(),
            self.meta.describe(),
            self.gc.running,
            self.gc.wanted,
            self.ckpt.running(),
            self.ckpt.wanted,
            self.io_out.len(),
            self.alloc.available_buckets(),
            self.space.in_use,
        )
    }

    /// Checks the index's consistency (no overlaps, counts right).
    pub fn verify_index(&self) -> std::result::Result<(), String> {
        self.index.verify()
    }

    pub(crate) fn dev(&self, inode: u32) -> Result<&CachedDev> {
        self.devs.get(inode as usize).and_then(Option::as_ref).ok_or_else(|| no_device(inode))
    }

    pub(crate) fn dev_mut(&mut self, inode: u32) -> Result<&mut CachedDev> {
        self.devs.get_mut(inode as usize).and_then(Option::as_mut).ok_or_else(|| no_device(inode))
    }

    /// A metadata write failed: out of service (see [`SetState::Failed`]).
    pub(crate) fn fail(&mut self, e: Error) {
        if matches!(self.state, SetState::Failed(_) | SetState::Closed) {
            return;
        }
        let e = Error::new(
            e.kind(),
            format!("cache set {} out of service: {}", crate::uuids::uuid_string(&self.geo.sb.set_uuid), e.message()),
        );
        self.state = SetState::Failed(e.clone());
        self.moving_gc_stop();
        self.detach_abort_all(&e);
        self.journal_fail(&e);
        self.reqs_fail(&e);
        self.close_progress();
    }

    /// Whether a control operation may change the set's metadata now: the set's failure, or
    /// `Closed` saying what it cannot `do` once the set is closing.
    pub(crate) fn check_open(&self, doing: &str) -> Result<()> {
        if let Some(e) = self.failed_error() {
            return Err(e);
        }
        if !matches!(self.state, SetState::Running | SetState::Starting) {
            return Err(Error::new(ErrorKind::Closed, format!("cache set is {:?}: cannot {doing}", self.state)));
        }
        Ok(())
    }

    /// The error requests get while the set is failed.
    pub(crate) fn failed_error(&self) -> Option<Error> {
        match &self.state {
            SetState::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// bcache's `bch_count_io_errors`: every I/O of the cache device counts; every
    /// `io_error_halflife / 88` of them the error count decays by 1/128 (so an error counts
    /// half after about `io_error_halflife` I/Os); at `io_error_limit` errors the set
    /// leaves service (clean data is then read from the backing devices).
    fn count_cache_io(&mut self, err: Option<&Error>) {
        let decay = u64::from(self.opts.io_error_halflife / 88);
        let e = &mut self.io_errors;
        if decay > 0 {
            e.ios += 1;
            while e.ios >= decay {
                e.ios -= decay;
                e.errors = e.errors * 127 / 128;
            }
        }
        let Some(err) = err else { return };
        e.errors += 1 << IO_ERROR_SHIFT;
        let count = e.errors >> IO_ERROR_SHIFT;
        let limit = u64::from(self.opts.io_error_limit);
        if count >= limit && self.failed_error().is_none() {
            self.fail(Error::new(
                ErrorKind::Io,
                format!(
                    "too many I/O errors on the cache device ({count}, io_error_limit {limit}); the last: {}",
                    err.message()
                ),
            ));
        }
    }

    pub(crate) fn push_io(&mut self, req: IoRequest) {
        self.io_out.push(req);
    }

    /// Begins a clean close: requests waiting to start are refused, those running finish,
    /// then the open buckets are closed and a final checkpoint is written and recorded.
    /// The state is [`SetState::Closed`] once all of it is durable.
    pub fn close(&mut self) {
        if matches!(self.state, SetState::Starting | SetState::Running) {
            self.state = SetState::Closing;
            let e = Error::new(ErrorKind::Closed, "the cache set is closing");
            self.reqs_refuse_waiting(&e);
            self.detach_abort_all(&e);
            self.moving_gc_stop();
        }
        self.close_progress();
    }

    /// Moves a close on as far as what it waits for allows: requests drain; the open
    /// buckets close and a final checkpoint is written; backing devices written since their
    /// last flush are flushed; an entry marked clean records it all.
    pub(crate) fn close_progress(&mut self) {
        if self.state != SetState::Closing {
            return;
        }
        if self.reqs.in_flight() > 0 || self.meta.busy() || self.writeback_busy() || self.moving.running() {
            return;
        }
        if !self.closing.entries_recorded {
            self.closing.entries_recorded = true;
            // Nothing of any device moves from now on: its dirty count is final.
            if self.record_final_states() {
                return;
            }
        }
        let c = &mut self.closing;
        if !c.started {
            c.started = true;
            // A checkpoint begun earlier finishes first; the final one follows it.
            if !self.ckpt.running() {
                if let Err(e) = self.alloc.close_open_buckets() {
                    return self.fail(e);
                }
            }
            self.checkpoint_wanted(checkpoint::Reason::Close);
            return;
        }
        if !c.checkpoint_done || c.flushes > 0 || c.clean_sent {
            return;
        }
        if !c.flushes_sent {
            c.flushes_sent = true;
            let inodes: Vec<u32> = self.devs.iter().flatten().map(|d| d.inode).collect();
            for inode in inodes {
                if self.backing_flush(inode, device::FlushWaiter::Close) {
                    self.closing.flushes += 1;
                }
            }
            if self.closing.flushes > 0 {
                return;
            }
        }
        self.closing.clean_sent = true;
        self.journal.clean_next = true;
        self.journal_wait_new_entry(journal::Waiter::Close);
    }

    /// A backing device flushed for the close.
    pub(crate) fn close_flush_done(&mut self, r: Result<()>) {
        self.closing.flushes -= 1;
        if let Err(e) = r {
            return self.fail(Error::new(e.kind(), format!("closing: flushing a backing device: {}", e.message())));
        }
        self.close_progress();
    }

    /// The clean close's entry is durable: everything is.
    pub(crate) fn close_recorded(&mut self) {
        if self.state == SetState::Closing {
            self.state = SetState::Closed;
        }
    }

    /// One slice of background work: GC first (allocation may wait on it), then the
    /// checkpoint.
    fn background_slice(&mut self, now: Instant) {
        let deadline = now + self.opts.slice;
        self.maybe_checkpoint();
        if self.gc.running {
            self.gc_slice(deadline);
            return;
        }
        if self.gc.wanted {
            self.gc_start();
            self.gc_slice(deadline);
            return;
        }
        if !self.ckpt.running() && self.ckpt.wanted.is_some() {
            self.checkpoint_begin();
        }
        if self.ckpt.has_work() {
            self.checkpoint_slice(deadline);
        }
        if self.moving_gc_pending() {
            self.moving_gc_slice(deadline);
        }
    }

    /// Background work is waiting for a slice.
    fn background_pending(&self) -> bool {
        if !matches!(self.state, SetState::Running | SetState::Starting | SetState::Closing) {
            return false;
        }
        self.gc.running
            || self.gc.wanted
            || self.ckpt.has_work()
            || (self.ckpt.wanted.is_some() && !self.ckpt.running())
            || self.moving_gc_pending()
    }
}

fn no_device(inode: u32) -> Error {
    Error::new(ErrorKind::InvalidArgument, format!("no cached device {inode} in this cache set"))
}
