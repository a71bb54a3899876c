//! Moving GC (bcache's `movinggc.c`): after a GC pass, the live data of the emptiest data
//! buckets is copied into fresh buckets, so that the buckets it leaves hold nothing live
//! and come back as free space. Without it a cache whose data is overwritten piecemeal
//! fills with buckets that are mostly stale but never empty, and dirty ones of those can
//! never be invalidated at all.
//!
//! One move: a scan over the index hands out keys with a live pointer into a chosen
//! bucket; the source bucket is pinned and the extent read from the cache; the data is
//! written to space taken for moving GC (its own write point and reserve); then the index
//! swaps the pointer only where an extent still holds the very data read (a pointer to the
//! same place), keeping its dirty state, and the journal records exactly those keys. The
//! source sectors leave their bucket's count; the next GC pass finds the bucket empty.
//!
//! Ordering: a move holds its range in the request order (`request/order.rs`) as writeback
//! does, so a user write or discard over it waits until the swap — a write over dirty data
//! goes in place, and must land in the copy the index ends up with — and a key overlapping
//! a request in flight is left for the next pass. Reads pass: both copies hold the data.
//!
//! Crashes: the copy is written before the journal entry naming it (the journal flushes
//! the cache first), and the source bucket's gen only moves once a later entry (the prio
//! write's) is durable, so after a crash the key points at one copy or the other, both
//! intact.
//!
//! Selection (`Allocator::moving_gc_candidates`): clean or dirty buckets at most half full,
//! emptiest first, up to a thirty-second of the cache per pass. bcache takes any bucket not
//! full, up to its moving reserve; rewriting nearly full buckets buys little space for a
//! lot of writing.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::request::fill::piece_writes;
use super::slots::Slots;
use super::{CacheSet, SetState, Tag};
use crate::alloc::{DataWrite, SectorAlloc};
use crate::index::{Key, Ptr, ScanFilter, ScanPos};
use crate::io::{AlignedBuf, IoCompletion, IoRequest, Slab};

/// Order slots of moves are this plus the move's number (writeback's start at 0x8000_0000).
const ORDER_SLOT_BASE: u32 = 0xC000_0000;
/// Moves in flight at once.
const MAX_IN_FLIGHT: usize = 64;
/// Keys a scan hands out at a time.
const SCAN_KEYS: usize = 256;
/// The open-bucket write point of moved data, apart from every cached device's.
const WRITE_POINT: u64 = u64::MAX - 1;

/// One extent on its way to a new bucket.
pub(crate) struct Move {
    key: Key,
    /// The pointer read from.
    src: Ptr,
    /// The bucket pinned for the read (device, bucket).
    pinned: (u8, u64),
    pieces: Vec<SectorAlloc>,
    ok: Vec<bool>,
    left: u32,
    /// The data read, until its writes go out.
    read: Option<AlignedBuf>,
    /// The data read, which the pieces' writes take windows of.
    data: Option<Arc<Slab>>,
}

/// Moving GC's pass and counters.
#[derive(Default)]
pub(crate) struct MovingGc {
    /// The scan has keys left to look at.
    scanning: bool,
    /// Buckets being emptied (device 0), in order.
    targets: Vec<u64>,
    pos: ScanPos,
    moves: Slots<Move>,
    /// Moves read but short of space, oldest first.
    waiting: VecDeque<u32>,
    keys: Vec<Key>,
    moved: Vec<Key>,
    started: Option<Instant>,
    pass_sectors: u64,
    /// Figures for [`MovingGcStats`].
    stats: MovingGcStats,
}

/// What moving GC has done (bcache has no counters for it; these say whether it pays).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MovingGcStats {
    /// Passes finished.
    pub passes: u64,
    /// Buckets chosen for emptying, over all passes.
    pub buckets: u64,
    /// Sectors copied and re-pointed.
    pub sectors_moved: u64,
    /// Moves given up (space, I/O error, or the data changed meanwhile).
    pub moves_dropped: u64,
    /// The last pass: its sectors moved and how long it took.
    pub last_sectors: u64,
    /// See `last_sectors`.
    pub last_duration: Duration,
    /// Hits that moved their extent into a fresh bucket (`promote_hits`).
    pub promotions: u64,
}

impl MovingGc {
    /// A pass is under way (scanning, or moves in flight).
    pub fn running(&self) -> bool {
        self.scanning || self.moves.len() > 0
    }

    fn get(&mut self, i: u32) -> &mut Move {
        self.moves.get_mut(i).expect("a live move")
    }
}

impl CacheSet {
    /// Moving GC's counters.
    pub fn moving_gc_stats(&self) -> MovingGcStats {
        self.moving.stats
    }

    /// A moving GC pass is under way.
    pub fn moving_gc_running(&self) -> bool {
        self.moving.running()
    }

    /// Chooses the buckets to empty and starts the scan (a GC pass just finished, so the
    /// buckets' sector counts are fresh). Does nothing while a pass runs.
    pub(crate) fn moving_gc_begin(&mut self) {
        if !self.opts.copy_gc_enabled || self.state != SetState::Running || self.moving.running() {
            return;
        }
        let bucket = 1u32 << self.geo.bucket_bits;
        let budget = (self.geo.sb.nbuckets / 32).max(1) << self.geo.bucket_bits;
        let Ok(targets) = self.alloc.moving_gc_candidates(0, bucket / 2, budget) else { return };
        if targets.is_empty() {
            return;
        }
        let m = &mut self.moving;
        m.stats.buckets += targets.len() as u64;
        m.targets = targets;
        m.pos = ScanPos::default();
        m.scanning = true;
        m.started = Some(Instant::now());
        m.pass_sectors = 0;
    }

    /// The scan can go on now.
    pub(crate) fn moving_gc_pending(&self) -> bool {
        self.moving.scanning && self.moving.moves.len() < MAX_IN_FLIGHT && self.state == SetState::Running
    }

    /// Scans for keys in the chosen buckets and starts moves until `deadline`, the end of
    /// the index, or a full pipeline.
    pub(crate) fn moving_gc_slice(&mut self, deadline: Instant) {
        let mut keys = std::mem::take(&mut self.moving.keys);
        while self.moving_gc_pending() {
            let next = self.index.scan(self.moving.pos, ScanFilter::All, SCAN_KEYS, &self.alloc, &mut keys);
            let mut stopped = None;
            for k in &keys {
                let Some(src) = self.move_source(k) else { continue };
                if self.moving.moves.len() >= MAX_IN_FLIGHT {
                    stopped = Some(ScanPos { inode: k.inode, offset: k.start });
                    break;
                }
                let _ = self.move_start(k.clone(), src);
            }
            match stopped.or(next) {
                Some(p) => self.moving.pos = p,
                None => {
                    self.moving.scanning = false;
                    break;
                }
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        self.moving.keys = keys;
        self.moving_gc_maybe_done();
    }

    /// The live pointer of `k` into a bucket being emptied, if it has one.
    fn move_source(&self, k: &Key) -> Option<Ptr> {
        k.ptrs().iter().copied().find(|p| {
            p.dev() == 0
                && self.moving.targets.binary_search(&p.bucket(self.geo.bucket_bits)).is_ok()
                && matches!(self.alloc.ptr_stale(*p), Ok(0))
        })
    }

    /// With `promote_hits`: a hit at `sector` of `inode`, on the extent that starts at
    /// `ptr` (`offset` sectors before `sector`), in a bucket past the middle of its life,
    /// starts a move of that extent into a fresh bucket. True when it did (the old bucket
    /// is then left to age instead of being touched).
    pub(crate) fn promote_hit(&mut self, inode: u32, sector: u64, ptr: Ptr, offset: u64) -> bool {
        // Its test of a bucket's age reads LRU prios (S3-FIFO's are queues and epochs).
        let lru = self.alloc.cache_policy(0).is_ok_and(|(r, _)| !r.fifo_queues());
        if !self.opts.promote_hits
            || !lru
            || self.state != SetState::Running
            || self.moving.moves.len() >= MAX_IN_FLIGHT
        {
            return false;
        }
        let Ok(b) = self.alloc.bucket(ptr.dev(), ptr.bucket(self.geo.bucket_bits)) else { return false };
        let min = self.alloc.min_prio();
        // Past the middle of the prio range (halfway tried best in bench/policies' Zipf
        // reads: 87.5% hits, against 86.7% from an eighth and 86.5% at the oldest only).
        if b.prio == crate::alloc::BTREE_PRIO || b.prio > min + crate::alloc::INITIAL_PRIO.saturating_sub(min) / 2 {
            return false;
        }
        let Some(key) = self.index.key_at(inode, sector, &self.alloc) else { return false };
        if key.start + offset != sector || !key.ptrs().contains(&ptr) {
            return false;
        }
        if self.move_start(key, ptr) {
            self.moving.stats.promotions += 1;
            true
        } else {
            false
        }
    }

    /// Pins the source bucket and reads the extent; a key under a request in flight is
    /// left for the next pass. False when it did not start.
    fn move_start(&mut self, key: Key, src: Ptr) -> bool {
        if self.reqs.order.overlaps_any(key.inode, key.start, key.end()) {
            return false;
        }
        let bucket = src.bucket(self.geo.bucket_bits);
        if self.alloc.pin(src.dev(), bucket).is_err() {
            return false;
        }
        let (inode, start, end, sectors) = (key.inode, key.start, key.end(), key.size);
        let n = self.moving.moves.insert(Move {
            key,
            src,
            pinned: (src.dev(), bucket),
            pieces: Vec::new(),
            ok: Vec::new(),
            left: 0,
            read: None,
            data: None,
        });
        let seqno = self.reqs.take_seqno();
        self.reqs.order.add(inode, start, end, seqno, ORDER_SLOT_BASE + n, true);
        let buf = self.reqs.fill_pool.get((sectors * 512) as usize);
        self.push_io(IoRequest::read(self.cache, src.offset() * 512, buf, Tag::MoveRead { io: n }.encode()));
        true
    }

    /// The extent was read: takes space for it and writes it there.
    pub(crate) fn move_read_done(&mut self, n: u32, c: IoCompletion) {
        let (dev, bucket) = self.moving.get(n).pinned;
        let _ = self.alloc.unpin(dev, bucket);
        let buf = match (c.result, c.op) {
            (Ok(_), crate::io::IoOp::Read { buf }) => buf,
            (r, _) => {
                if r.is_err() {
                    self.stats.cache_io_errors += 1;
                }
                return self.move_drop(n);
            }
        };
        self.moving.get(n).read = Some(buf);
        self.move_continue(n);
    }

    /// Takes the space the copy still lacks and, once it has all, writes it. A move short
    /// of space waits (behind user writes) for `space_progress`.
    fn move_continue(&mut self, n: u32) {
        if self.state != SetState::Running {
            return self.move_drop(n);
        }
        let (inode, start, size) = {
            let m = self.moving.get(n);
            (m.key.inode, m.key.start, m.key.size)
        };
        let mut done: u64 = self.moving.get(n).pieces.iter().map(|a| u64::from(a.sectors)).sum();
        // Data of a bucket its policy found hot moves in with hot data.
        let hot = self.alloc.ptr_hot(self.moving.get(n).src);
        while done < size {
            let w = DataWrite {
                inode: u64::from(inode),
                offset: start + done,
                sectors: (size - done) as u32,
                write_point: WRITE_POINT,
                flash_only: false,
                moving_gc: true,
                hot,
            };
            match self.alloc_sectors(&w) {
                Ok(a) => {
                    done += u64::from(a.sectors);
                    self.gc_count_sectors(u64::from(a.sectors));
                    self.moving.get(n).pieces.push(a);
                }
                Err(_) => {
                    self.moving.waiting.push_back(n);
                    self.space_wanted();
                    return;
                }
            }
        }
        let m = self.moving.get(n);
        let (slab, _, _) = m.read.take().expect("the data read").into_slab();
        let reqs = piece_writes(self.cache, &slab, &m.pieces, |piece| Tag::MoveWrite { io: n, piece }.encode());
        m.ok = vec![false; m.pieces.len()];
        m.left = m.pieces.len() as u32;
        m.data = Some(slab);
        for r in reqs {
            self.push_io(r);
        }
    }

    /// Buckets came free and no user write waits for them: moves short of space go on.
    pub(crate) fn moving_gc_retry(&mut self) {
        while let Some(n) = self.moving.waiting.pop_front() {
            self.move_continue(n);
            if self.moving.waiting.back() == Some(&n) {
                break;
            }
        }
    }

    /// A piece of the copy was written; once all are, the index takes the copy where it
    /// still holds the data read.
    pub(crate) fn move_write_done(&mut self, n: u32, piece: u32, c: IoCompletion) {
        let m = self.moving.get(n);
        m.left -= 1;
        match c.result {
            Ok(_) => m.ok[piece as usize] = true,
            Err(_) => self.stats.cache_io_errors += 1,
        }
        self.cache_unflushed = true;
        if self.moving.get(n).left > 0 {
            return;
        }
        let m = self.moving.moves.remove(n);
        self.reqs.order.remove(ORDER_SLOT_BASE + n);
        let mut moved_sectors = 0;
        if self.state == SetState::Running && m.ok.iter().all(|&ok| ok) {
            let mut moved = std::mem::take(&mut self.moving.moved);
            let mut at = m.key.start;
            for a in &m.pieces {
                let len = u64::from(a.sectors);
                let src = m.src.advance(at - m.key.start);
                moved.clear();
                match self.index.move_ptr(m.key.inode, at, len, src, a.ptr, &mut self.alloc, &mut moved) {
                    Ok(got) => moved_sectors += got,
                    Err(e) => debug_assert!(false, "moving {}: {e}", m.key),
                }
                for k in moved.drain(..) {
                    if k.dirty {
                        let _ = self.alloc.mark_dirty(a.ptr);
                    }
                    self.journal_add(k);
                }
                at += len;
            }
            self.moving.moved = moved;
        }
        let ptrs: Vec<_> = m.pieces.iter().map(|a| a.ptr).collect();
        let _ = self.alloc.put_ptrs(&ptrs);
        if moved_sectors == 0 {
            self.moving.stats.moves_dropped += 1;
        }
        self.moving.stats.sectors_moved += moved_sectors;
        self.moving.pass_sectors += moved_sectors;
        self.unblock_requests();
        self.moving_gc_maybe_done();
        self.close_progress();
    }

    /// Gives up move `n`: the data stays where it was.
    fn move_drop(&mut self, n: u32) {
        let m = self.moving.moves.remove(n);
        let ptrs: Vec<_> = m.pieces.iter().map(|a| a.ptr).collect();
        let _ = self.alloc.put_ptrs(&ptrs);
        self.reqs.order.remove(ORDER_SLOT_BASE + n);
        self.moving.stats.moves_dropped += 1;
        self.unblock_requests();
        self.moving_gc_maybe_done();
        self.close_progress();
    }

    fn moving_gc_maybe_done(&mut self) {
        let m = &mut self.moving;
        if m.running() {
            return;
        }
        if let Some(t) = m.started.take() {
            m.targets.clear();
            m.stats.passes += 1;
            m.stats.last_sectors = m.pass_sectors;
            m.stats.last_duration = t.elapsed();
        }
    }

    /// Stops choosing new keys (closing or failing); moves in flight finish or drop.
    pub(crate) fn moving_gc_stop(&mut self) {
        self.moving.scanning = false;
        while let Some(n) = self.moving.waiting.pop_front() {
            self.move_drop(n);
        }
        self.moving_gc_maybe_done();
    }
}
