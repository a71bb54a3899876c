//! Writeback (bcache's `writeback.c`): each cached device's dirty extents are copied to its
//! backing device in LBA order, then marked clean.
//!
//! One extent's trip: a dirty scan hands out the key; its bucket is pinned and the data
//! read from the cache; backing writes go out in the order the scan found their keys (as
//! bcache's `writeback_sequence_next`), so a disk sees one sweep; once written, a flush of
//! the backing device makes them durable, and only then does the index mark each extent
//! clean, where it still holds the very data written back (a pointer in common), and the
//! journal record clean keys for exactly those extents. A crash anywhere leaves each
//! extent dirty (written back again after the restart) or clean with its data on the
//! backing device. Data read back that does not match its key's checksum (`data_csum`)
//! is never written back: the extent stays dirty.
//!
//! A user write or discard overlapping an extent on its way waits until the extent is
//! clean (the ordering of overlapping requests, `request/order.rs`, with the writeback as
//! an earlier request), and an extent overlapping a user write or discard in flight is
//! left for the next pass: the backing device never sees the old data land after the new,
//! and a write over dirty data, which goes in place (same pointer), never lands between
//! the read of the extent and its marking clean, where the pointer check would miss it.
//!
//! Pace: bcache's PI controller (`__update_writeback_rate`) sets the rate in sectors per
//! second from how far the dirty data is above the target (`writeback_percent` of the
//! cache, shared by the backing devices in proportion to their size), and each extent
//! written moves the next start on by its size over the rate (`bch_next_delay`). With
//! `writeback_percent` 0, or once the set has seen no request for six rate updates, it runs
//! at full speed. After a pass over the whole device it waits `writeback_delay`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::device::FlushWaiter;
use super::slots::Slots;
use super::{CacheSet, SetState, Tag};
use crate::error::{Error, ErrorKind, Result};
use crate::index::{Key, ScanFilter, ScanPos};
use crate::io::{AlignedBuf, IoCompletion, IoRequest};

/// Writeback I/Os in flight per cached device (bcache's `dc->in_flight` semaphore).
const MAX_IN_FLIGHT: usize = 64;
/// Keys a scan hands out at a time.
const SCAN_KEYS: usize = 16;
/// Dirty keys the search for fully dirty stripes looks at per call.
const STRIPE_SCAN_KEYS: usize = 1024;
/// Written extents flushed together at most.
const FLUSH_BATCH: usize = 256;
/// Rate updates without a request before the set counts as idle (bcache: six per device).
const IDLE_UPDATES: u32 = 6;
/// The fastest rate: bcache's cap, a sector per nanosecond.
const MAX_RATE: u64 = 1_000_000_000;
/// Order slots of writeback I/Os are this plus the I/O's number (request slots are small).
const ORDER_SLOT_BASE: u32 = 0x8000_0000;

/// Writeback tunables of a cached device, with bcache's names and defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WritebackConfig {
    /// `writeback_running`: false pauses writeback (extents in flight finish).
    pub running: bool,
    /// `writeback_percent`: the dirty data aimed at, as a percentage of the cache; 0 turns
    /// the controller off (full speed).
    pub percent: u8,
    /// `writeback_delay`: the wait after a pass over the whole device.
    pub delay: Duration,
    /// `writeback_rate_update_seconds`.
    pub rate_update: Duration,
    /// `writeback_rate_p_term_inverse`.
    pub p_term_inverse: u64,
    /// `writeback_rate_i_term_inverse`.
    pub i_term_inverse: u64,
    /// `writeback_rate_minimum`, sectors per second.
    pub rate_minimum: u64,
    /// `stripe_size`, bytes (0: the backing device has no stripes): a RAID's full stripe,
    /// what it writes without reading first.
    pub stripe_size: u64,
    /// `partial_stripes_expensive`: the backing device pays for writes of part of a
    /// stripe (RAID 5/6). Writeback then writes fully dirty stripes back first, and writes
    /// to a stripe that is partly dirty go to the cache even past the writeback cutoff
    /// (not past `CUTOFF_WRITEBACK_SYNC`), so that stripes fill in the cache.
    pub partial_stripes_expensive: bool,
    /// `writeback_consider_fragment`: past 50% of the cache in use, a few dirty sectors
    /// spread over many buckets raise the rate (bcache's fragment term), so that a cache
    /// whose buckets each hold a little dirty data does not sit past the writeback cutoff
    /// with writeback at its minimum rate because the dirty data is below its target.
    pub consider_fragment: bool,
    /// `writeback_rate_fp_term_low`, `_mid`, `_high`: the fragment term's weights from
    /// 50%, 57% and 64% of the cache in use (1, 10, 1000; each below the next).
    pub fp_term_low: u64,
    pub fp_term_mid: u64,
    pub fp_term_high: u64,
}

/// bcache's `BCH_WRITEBACK_FRAGMENT_THRESHOLD_{LOW,MID,HIGH}`, percent of buckets in use.
const FRAGMENT_LOW: u64 = 50;
const FRAGMENT_MID: u64 = 57;
const FRAGMENT_HIGH: u64 = 64;

impl Default for WritebackConfig {
    fn default() -> Self {
        WritebackConfig {
            running: true,
            percent: 10,
            delay: Duration::from_secs(30),
            rate_update: Duration::from_secs(5),
            p_term_inverse: 40,
            i_term_inverse: 10_000,
            rate_minimum: 8,
            stripe_size: 0,
            partial_stripes_expensive: false,
            consider_fragment: true,
            fp_term_low: 1,
            fp_term_mid: 10,
            fp_term_high: 1000,
        }
    }
}

impl WritebackConfig {
    /// Refuses values bcache refuses, naming the tunable and the range.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |what: &str, range: &str| Err(Error::new(ErrorKind::InvalidArgument, format!("{what}: must be {range}")));
        if self.percent > 40 {
            return bad("writeback_percent", "0..=40");
        }
        if self.delay > Duration::from_secs(u32::MAX as u64) {
            return bad("writeback_delay", "at most 2^32 - 1 seconds");
        }
        if self.rate_update.is_zero() || self.rate_update > Duration::from_secs(60) {
            return bad("writeback_rate_update_seconds", "1..=60 seconds");
        }
        if self.p_term_inverse == 0 || self.p_term_inverse > i32::MAX as u64 {
            return bad("writeback_rate_p_term_inverse", "1..=2^31 - 1");
        }
        if self.i_term_inverse == 0 || self.i_term_inverse > i32::MAX as u64 {
            return bad("writeback_rate_i_term_inverse", "1..=2^31 - 1");
        }
        if self.rate_minimum == 0 || self.rate_minimum > MAX_RATE {
            return bad("writeback_rate_minimum", "1..=1000000000 sectors per second");
        }
        if self.fp_term_low == 0 || self.fp_term_low >= self.fp_term_mid {
            return bad("writeback_rate_fp_term_low", "1..writeback_rate_fp_term_mid");
        }
        if self.fp_term_mid >= self.fp_term_high {
            return bad("writeback_rate_fp_term_mid", "writeback_rate_fp_term_low + 1..writeback_rate_fp_term_high");
        }
        if self.fp_term_high > u64::from(u32::MAX) {
            return bad("writeback_rate_fp_term_high", "writeback_rate_fp_term_mid + 1..=2^32 - 1");
        }
        if !self.stripe_size.is_multiple_of(4096) || self.stripe_size > 1 << 30 {
            return bad("stripe_size", "0 or a multiple of 4096 bytes up to 1 GiB");
        }
        Ok(())
    }
}

/// The controller's state, bcache's `writeback_rate_debug`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WritebackRate {
    /// Sectors per second.
    pub rate: u64,
    /// Dirty sectors of the device.
    pub dirty: u64,
    /// Dirty sectors aimed at.
    pub target: u64,
    /// The proportional term, sectors per second.
    pub proportional: i64,
    /// The integral term, sectors per second.
    pub integral: i64,
    /// Sectors written back and marked clean.
    pub written: u64,
    /// Running at full speed (the controller off, or the set idle).
    pub full_speed: bool,
}

/// Where one cached device's writeback stands.
pub(crate) struct Writeback {
    pub cfg: WritebackConfig,
    pub rate: WritebackRate,
    /// bcache's `writeback_rate_integral` (unscaled).
    integral: i64,
    next_update: Option<Instant>,
    /// When the next extent may start (`bch_ratelimit.next`).
    next_io: Option<Instant>,
    /// The scan continues after this sector.
    cursor: u64,
    /// The search for fully dirty stripes continues after this sector.
    stripe_cursor: u64,
    /// A pass over the whole device ended: the next starts after `delay`.
    pass_ended: Option<Instant>,
    /// I/Os in flight, in scan order (backing writes go out in this order).
    queue: VecDeque<u32>,
    /// Extents written (their I/O numbers), waiting for the next flush.
    written: Vec<u32>,
    /// Extents whose flush is in flight, by flush batch.
    flushing: Vec<(u32, Vec<u32>)>,
    next_batch: u32,
}

impl Writeback {
    pub fn new(cfg: WritebackConfig) -> Writeback {
        Writeback {
            cfg,
            rate: WritebackRate::default(),
            integral: 0,
            next_update: None,
            next_io: None,
            cursor: 0,
            stripe_cursor: 0,
            pass_ended: None,
            queue: VecDeque::new(),
            written: Vec::new(),
            flushing: Vec::new(),
            next_batch: 0,
        }
    }

    /// Writes back (its tunables say so, or the device is `detaching`: then at full speed,
    /// paused or not).
    pub fn active(&self, detaching: bool) -> bool {
        self.cfg.running || detaching
    }

    /// The wait after a pass (none while detaching, as bcache's `writeback_delay`).
    fn delay(&self, detaching: bool) -> Duration {
        if detaching {
            Duration::ZERO
        } else {
            self.cfg.delay
        }
    }

    /// The controller runs again at the next tick, and the next extent may start at once.
    pub fn reschedule(&mut self) {
        self.next_update = None;
        self.next_io = None;
        self.pass_ended = None;
    }

    /// Nothing in flight (I/O, or a flush with extents waiting for it).
    pub fn idle(&self) -> bool {
        self.queue.is_empty() && self.written.is_empty() && self.flushing.is_empty()
    }
}

/// One extent on its way to the backing device.
pub(crate) struct WbIo {
    inode: u32,
    key: Key,
    /// The bucket pinned for the cache read (device, bucket).
    pinned: (u8, u64),
    /// The cache read completed: the data, until the backing write takes it.
    data: Option<AlignedBuf>,
    writing: bool,
    failed: bool,
}

/// Writeback I/Os of the set, by number (their tag).
#[derive(Default)]
pub(crate) struct WbIos {
    ios: Slots<WbIo>,
    /// Requests submitted since the last rate update (for idle detection).
    pub requests_seen: u64,
    requests_at_update: u64,
    idle_updates: u32,
    /// Scratch for scans and cleaned keys.
    keys: Vec<Key>,
    cleaned: Vec<Key>,
}

impl WbIos {
    fn get(&mut self, i: u32) -> &mut WbIo {
        self.ios.get_mut(i).expect("a live writeback I/O")
    }
}

impl CacheSet {
    /// The writeback state of attached device `inode` (writeback I/O in flight keeps it
    /// attached: see `detach`).
    fn wb(&mut self, inode: u32) -> &mut Writeback {
        &mut self.devs[inode as usize].as_mut().expect("attached").wb
    }

    /// The writeback tunables of `inode`.
    pub fn writeback_config(&self, inode: u32) -> Result<WritebackConfig> {
        Ok(self.dev(inode)?.wb.cfg.clone())
    }

    /// Sets the writeback tunables of `inode` (see [`WritebackConfig`]); takes effect at
    /// once (a pause stops new extents, a new rate applies to the next one).
    pub fn set_writeback_config(&mut self, inode: u32, cfg: WritebackConfig) -> Result<()> {
        cfg.validate()?;
        let d = self.dev_mut(inode)?;
        if d.flash {
            return Err(super::volume::flash_refuses(inode, "writeback"));
        }
        let wb = &mut d.wb;
        // The controller runs again at the next tick, with the new terms.
        wb.next_update = None;
        wb.next_io = None;
        wb.cfg = cfg;
        Ok(())
    }

    /// The writeback controller's state for `inode` (bcache's `writeback_rate_debug`).
    pub fn writeback_rate(&self, inode: u32) -> Result<WritebackRate> {
        let d = self.dev(inode)?;
        let mut r = d.wb.rate;
        r.dirty = self.index.dirty_sectors(inode);
        Ok(r)
    }

    /// Writeback I/O or flushes are in flight.
    pub(crate) fn writeback_busy(&self) -> bool {
        self.devs.iter().flatten().any(|d| !d.wb.idle())
    }

    /// Writeback of `inode` has something in flight.
    pub(crate) fn writeback_busy_for(&self, inode: u32) -> bool {
        self.dev(inode).is_ok_and(|d| !d.wb.idle())
    }

    /// When writeback next has something to start: None when it waits for nothing (no
    /// dirty data, paused, or only for completions).
    pub(crate) fn writeback_deadline(&self) -> Option<Instant> {
        if self.state != SetState::Running {
            return None;
        }
        let mut at: Option<Instant> = None;
        for d in self.devs.iter().flatten() {
            let wb = &d.wb;
            let detaching = d.detach.is_some();
            if !wb.active(detaching) || self.index.dirty_sectors(d.inode) == 0 {
                continue;
            }
            let mut t = wb.next_update.unwrap_or_else(Instant::now);
            // A pass that ended with extents still on their way: the next starts from a
            // completion's tick, not by polling a scan that can only find those again.
            let waiting = wb.pass_ended.is_some() && !wb.idle();
            if wb.queue.len() < MAX_IN_FLIGHT && !waiting {
                let start = match wb.pass_ended {
                    Some(p) => p + wb.delay(detaching),
                    None => wb.next_io.unwrap_or_else(Instant::now),
                };
                t = t.min(start);
            }
            at = Some(at.map_or(t, |a| a.min(t)));
        }
        at
    }

    /// Starts what writeback may start by `now`, for every cached device.
    pub(crate) fn writeback_tick(&mut self, now: Instant) {
        if self.state != SetState::Running {
            return;
        }
        let inodes: Vec<u32> = self.devs.iter().flatten().map(|d| d.inode).collect();
        for inode in inodes {
            self.writeback_update_rate(inode, now);
            self.writeback_start(inode, now);
        }
    }

    /// bcache's `__update_writeback_rate`, every `rate_update`.
    fn writeback_update_rate(&mut self, inode: u32, now: Instant) {
        let cache_sectors = self.geo.sb.nbuckets * u64::from(self.geo.sb.bucket_size);
        let total: u64 = self.devs.iter().flatten().filter(|d| !d.flash).map(|d| d.sectors).sum::<u64>().max(1);
        let dirty = self.index.dirty_sectors(inode);
        let in_use = self.space.in_use;
        let buckets = self.geo.sb.nbuckets - self.geo.sb.first_bucket;
        let unavailable = buckets.saturating_sub(self.alloc.available_buckets()).max(1);
        let bucket_sectors = u64::from(self.geo.sb.bucket_size);
        let wbs = &mut self.wb_ios;
        let d = self.devs[inode as usize].as_mut().expect("attached");
        let wb = &mut d.wb;
        if wb.next_update.is_some_and(|t| now < t) {
            return;
        }
        let first = wb.next_update.is_none();
        wb.next_update = Some(now + wb.cfg.rate_update);
        // The set is idle after six updates without a request (bcache's
        // `set_at_max_writeback_rate`); one device's updates count for all.
        if !first {
            if wbs.requests_seen == wbs.requests_at_update {
                wbs.idle_updates = wbs.idle_updates.saturating_add(1);
            } else {
                wbs.idle_updates = 0;
            }
            wbs.requests_at_update = wbs.requests_seen;
        }
        let target = (cache_sectors * u64::from(wb.cfg.percent) / 100).saturating_mul(d.sectors) / total;
        let error = dirty as i64 - target as i64;
        let mut proportional = error / wb.cfg.p_term_inverse as i64;
        // bcache's fragment term: past 50% in use, buckets that each hold a little dirty
        // data (on average more than three buckets' room per dirty bucket's worth) set the
        // rate from the dirty sectors per bucket, weighted by how far past the threshold the
        // cache is, when that beats the proportional term.
        if wb.cfg.consider_fragment && in_use > FRAGMENT_LOW && dirty > 0 {
            let fragment = unavailable * bucket_sectors / dirty;
            let fp_term = if in_use <= FRAGMENT_MID {
                wb.cfg.fp_term_low * (in_use - FRAGMENT_LOW)
            } else if in_use <= FRAGMENT_HIGH {
                wb.cfg.fp_term_mid * (in_use - FRAGMENT_MID)
            } else {
                wb.cfg.fp_term_high * (in_use - FRAGMENT_HIGH)
            };
            let fps = (dirty / unavailable).saturating_mul(fp_term) as i64;
            if fragment > 3 && fps > proportional {
                proportional = fps;
            }
        }
        // The integral only grows while writeback keeps up with the rate it has (or shrinks
        // while below target), so it cannot wind up while the device is the bottleneck.
        let behind = wb.next_io.is_some_and(|n| n + Duration::from_millis(1) < now);
        if !first && ((error < 0 && wb.integral > 0) || (error > 0 && !behind)) {
            wb.integral = wb.integral.saturating_add(error.saturating_mul(wb.cfg.rate_update.as_secs() as i64));
        }
        let integral = wb.integral / wb.cfg.i_term_inverse as i64;
        let rate = (proportional + integral).clamp(wb.cfg.rate_minimum as i64, MAX_RATE as i64) as u64;
        let full = wb.cfg.percent == 0 || wbs.idle_updates >= IDLE_UPDATES || d.detach.is_some();
        wb.rate = WritebackRate {
            rate: if full { MAX_RATE } else { rate },
            dirty,
            target,
            proportional,
            integral,
            written: wb.rate.written,
            full_speed: full,
        };
    }

    /// Starts extents of `inode` while the rate and the in-flight limit allow.
    fn writeback_start(&mut self, inode: u32, now: Instant) {
        let dirty = self.index.dirty_sectors(inode);
        let Ok(d) = self.dev_mut(inode) else { return };
        let detaching = d.detach.is_some();
        let wb = &mut d.wb;
        if !wb.active(detaching) || dirty == 0 {
            return;
        }
        if let Some(p) = wb.pass_ended {
            if now < p + wb.delay(detaching) {
                return;
            }
            wb.pass_ended = None;
        }
        let mut keys = std::mem::take(&mut self.wb_ios.keys);
        let wb = &self.wb(inode).cfg;
        if wb.partial_stripes_expensive && wb.stripe_size > 0 {
            self.writeback_full_stripes(inode, now, &mut keys);
        }
        loop {
            let wb = self.wb(inode);
            if wb.queue.len() >= MAX_IN_FLIGHT || wb.next_io.is_some_and(|t| now < t) {
                break;
            }
            let from = ScanPos { inode, offset: wb.cursor };
            let want = SCAN_KEYS.min(MAX_IN_FLIGHT - wb.queue.len());
            let next = self.index.scan(from, ScanFilter::Dirty, want, &self.alloc, &mut keys);
            keys.retain(|k| k.inode == inode);
            let reached_end = next.is_none_or(|p| p.inode != inode) || keys.is_empty();
            let mut started = 0;
            let mut paced = false;
            for k in keys.drain(..) {
                let wb = self.wb(inode);
                if wb.next_io.is_some_and(|t| now < t) {
                    // The rest waits for its turn: the next scan starts at this key.
                    paced = true;
                    wb.cursor = k.start;
                    break;
                }
                let end = k.end();
                if self.writeback_extent(k, now) {
                    started += 1;
                }
                self.wb(inode).cursor = end;
            }
            keys.clear();
            let wb = self.wb(inode);
            if paced {
                break;
            }
            if reached_end {
                wb.cursor = 0;
                wb.pass_ended = Some(now);
                break;
            }
            if started == 0 && wb.queue.len() >= MAX_IN_FLIGHT {
                break;
            }
        }
        self.wb_ios.keys = keys;
    }

    /// bcache's `bcache_dev_stripe_dirty` for a write of `sectors` at `sector`: with
    /// `partial_stripes_expensive`, whether a stripe it touches holds dirty data (the write
    /// then goes to the cache, to fill the stripe there), while the cache is at most
    /// `CUTOFF_WRITEBACK_SYNC` in use.
    pub(crate) fn stripe_dirty(&self, inode: u32, sector: u64, sectors: u64) -> bool {
        let Ok(d) = self.dev(inode) else { return false };
        let stripe = d.wb.cfg.stripe_size / 512;
        if !d.wb.cfg.partial_stripes_expensive || stripe == 0 || self.space.in_use > super::space::CUTOFF_WRITEBACK_SYNC
        {
            return false;
        }
        let (start, end) = (sector / stripe * stripe, (sector + sectors).div_ceil(stripe) * stripe);
        self.index.dirty_sectors_in(inode, start, end) > 0
    }

    /// bcache's `refill_full_stripes`: starts the extents of stripes that are dirty whole,
    /// looking at up to `STRIPE_SCAN_KEYS` dirty keys from where the last look ended, so
    /// that a RAID gets whole stripes first.
    fn writeback_full_stripes(&mut self, inode: u32, now: Instant, keys: &mut Vec<Key>) {
        let (stripe, dev_sectors) = {
            let d = self.dev(inode).expect("attached");
            (d.wb.cfg.stripe_size / 512, d.sectors)
        };
        let mut full: Option<(u64, bool)> = None;
        let mut looked = 0;
        while looked < STRIPE_SCAN_KEYS {
            let wb = self.wb(inode);
            if wb.queue.len() >= MAX_IN_FLIGHT || wb.next_io.is_some_and(|t| now < t) {
                return;
            }
            let from = ScanPos { inode, offset: wb.stripe_cursor };
            let next = self.index.scan(from, ScanFilter::Dirty, SCAN_KEYS, &self.alloc, keys);
            keys.retain(|k| k.inode == inode);
            if keys.is_empty() {
                self.wb(inode).stripe_cursor = 0;
                return;
            }
            looked += keys.len();
            for k in keys.drain(..) {
                let s = k.start / stripe;
                let whole = match full {
                    Some((fs, w)) if fs == s => w,
                    _ => {
                        let (start, end) = (s * stripe, ((s + 1) * stripe).min(dev_sectors));
                        let w = k.end() <= end && self.index.dirty_sectors_in(inode, start, end) == end - start;
                        full = Some((s, w));
                        w
                    }
                };
                let end = k.end();
                // (An extent already on its way is skipped: it overlaps its own order slot.)
                if whole {
                    self.writeback_extent(k, now);
                }
                self.wb(inode).stripe_cursor = end;
            }
            if next.is_none_or(|p| p.inode != inode) {
                self.wb(inode).stripe_cursor = 0;
                return;
            }
        }
    }

    /// Starts one extent: pins its bucket and reads it from the cache. False when it is
    /// left for the next pass (a user write or discard over it is in flight, or it went
    /// stale).
    fn writeback_extent(&mut self, key: Key, now: Instant) -> bool {
        let (start, end) = (key.start, key.end());
        if self.reqs.order.overlaps_any(key.inode, start, end) {
            return false;
        }
        let Some(&ptr) = key.ptrs().iter().find(|&&p| matches!(self.alloc.ptr_stale(p), Ok(0))) else {
            return false;
        };
        let bucket = ptr.bucket(self.geo.bucket_bits);
        if self.alloc.pin(ptr.dev(), bucket).is_err() {
            return false;
        }
        let inode = key.inode;
        let sectors = key.size;
        let n = self.wb_ios.ios.insert(WbIo {
            inode,
            key,
            pinned: (ptr.dev(), bucket),
            data: None,
            writing: false,
            failed: false,
        });
        // Later user requests over the extent wait for its backing write.
        let seqno = self.reqs.take_seqno();
        self.reqs.order.add(inode, start, end, seqno, ORDER_SLOT_BASE + n, true);
        let wb = self.wb(inode);
        wb.queue.push_back(n);
        // bch_next_delay: the next extent starts sectors/rate later, never more than 2.5 s
        // ahead nor 2 s behind.
        if !wb.rate.full_speed && wb.rate.rate > 0 {
            let step = Duration::from_nanos(sectors.saturating_mul(1_000_000_000) / wb.rate.rate);
            let mut next = wb.next_io.unwrap_or(now) + step;
            if let Some(lo) = now.checked_sub(Duration::from_secs(2)) {
                next = next.max(lo);
            }
            wb.next_io = Some(next.min(now + Duration::from_millis(2500)));
        }
        let buf = self.reqs.fill_pool.get((sectors * 512) as usize);
        let tag = Tag::Writeback { io: n, write: false }.encode();
        self.push_io(IoRequest::read(self.cache, ptr.offset() * 512, buf, tag));
        let _ = self.alloc.touch_for_writeback(ptr);
        true
    }

    /// A writeback I/O completed.
    pub(crate) fn writeback_io_done(&mut self, n: u32, write: bool, c: IoCompletion) {
        let result = c.result.clone();
        let buf = match c.op {
            crate::io::IoOp::Read { buf } | crate::io::IoOp::Write { buf } => Some(buf),
            _ => None,
        };
        let io = self.wb_ios.get(n);
        let inode = io.inode;
        if !write {
            let (dev, bucket) = io.pinned;
            let _ = self.alloc.unpin(dev, bucket);
            let io = self.wb_ios.get(n);
            // Data that does not match its checksum must not reach the backing device.
            let bad = match (&result, io.key.crc, &buf) {
                (Ok(_), Some(crc), Some(b)) => crate::index::Key::data_crc(b) != crc,
                _ => false,
            };
            if bad {
                io.failed = true;
                self.stats.csum_errors += 1;
                self.stats.writeback_errors += 1;
                return self.writeback_issue_writes(inode);
            }
            let io = self.wb_ios.get(n);
            match result {
                Ok(_) => io.data = buf,
                Err(_) => {
                    // The extent stays dirty: the next pass tries again.
                    io.failed = true;
                    self.stats.cache_io_errors += 1;
                    self.stats.writeback_errors += 1;
                }
            }
            return self.writeback_issue_writes(inode);
        }
        let d = self.devs[inode as usize].as_mut().expect("attached");
        d.wb.queue.retain(|&q| q != n);
        match result {
            Ok(_) => {
                d.backing_unflushed = true;
                d.wb.written.push(n);
            }
            Err(_) => {
                self.stats.writeback_errors += 1;
                self.wb_ios.ios.remove(n);
                self.reqs.order.remove(ORDER_SLOT_BASE + n);
            }
        }
        self.writeback_maybe_flush(inode);
        self.unblock_requests();
        self.close_progress();
    }

    /// Sends the backing writes of extents read, in scan order; drops failed reads.
    fn writeback_issue_writes(&mut self, inode: u32) {
        let (backing, data_offset) = {
            let d = self.dev(inode).expect("attached");
            (d.backing, d.data_offset)
        };
        loop {
            let wb = &self.dev(inode).expect("attached").wb;
            let Some(&n) = wb.queue.iter().find(|&&q| !self.wb_ios.ios.get(q).is_some_and(|io| io.writing)) else {
                break;
            };
            let io = self.wb_ios.get(n);
            if io.failed {
                self.wb_ios.ios.remove(n);
                self.reqs.order.remove(ORDER_SLOT_BASE + n);
                self.wb(inode).queue.retain(|&q| q != n);
                continue;
            }
            let Some(data) = io.data.take() else { break };
            io.writing = true;
            let off = data_offset + io.key.start * 512;
            let tag = Tag::Writeback { io: n, write: true }.encode();
            self.push_io(IoRequest::write(backing, off, data, tag));
        }
        self.writeback_maybe_flush(inode);
        self.unblock_requests();
        self.close_progress();
    }

    /// Flushes the backing device for the extents written, once none is in flight to it
    /// or enough have gathered.
    fn writeback_maybe_flush(&mut self, inode: u32) {
        let wb = &self.dev(inode).expect("attached").wb;
        if wb.written.is_empty() || (!wb.queue.is_empty() && wb.written.len() < FLUSH_BATCH) {
            return;
        }
        let wb = self.wb(inode);
        let batch = wb.next_batch;
        wb.next_batch = wb.next_batch.wrapping_add(1);
        let keys = std::mem::take(&mut wb.written);
        wb.flushing.push((batch, keys));
        if !self.backing_flush(inode, FlushWaiter::Writeback(batch)) {
            // Nothing unflushed (cannot happen after a write): clean at once.
            self.writeback_flushed(inode, batch, Ok(()));
        }
    }

    /// The flush after extents of batch `batch` completed: they become clean.
    pub(crate) fn writeback_flushed(&mut self, inode: u32, batch: u32, r: Result<()>) {
        let Ok(d) = self.dev_mut(inode) else { return };
        let Some(i) = d.wb.flushing.iter().position(|(b, _)| *b == batch) else { return };
        let (_, ios) = d.wb.flushing.swap_remove(i);
        // Failed: still dirty, the next pass writes them again.
        let ok = r.is_ok() && self.failed_error().is_none();
        if !ok {
            self.stats.writeback_errors += ios.len() as u64;
        }
        let mut cleaned = std::mem::take(&mut self.wb_ios.cleaned);
        let mut sectors = 0;
        let mut failure = None;
        for n in ios {
            let io = self.wb_ios.ios.remove(n);
            self.reqs.order.remove(ORDER_SLOT_BASE + n);
            if !ok || failure.is_some() {
                continue;
            }
            cleaned.clear();
            match self.index.mark_clean(&io.key, &mut self.alloc, &mut cleaned) {
                Ok(n) => sectors += n,
                Err(e) => failure = Some(e),
            }
            for c in cleaned.drain(..) {
                self.journal_add(c);
            }
        }
        self.wb_ios.cleaned = cleaned;
        if let Some(e) = failure {
            self.fail(e);
        }
        self.unblock_requests();
        self.stats.writeback_sectors += sectors;
        if let Ok(d) = self.dev_mut(inode) {
            d.wb.rate.written += sectors;
        }
        if self.opts.gc_after_writeback && sectors > 0 && self.index.dirty_sectors(inode) == 0 {
            // bcache's BCH_DO_AUTO_GC: the buckets writeback made clean are counted anew.
            self.trigger_gc();
        }
        self.close_progress();
    }
}
