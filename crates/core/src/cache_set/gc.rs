//! Garbage collection (bcache's `btree_gc`), a slice at a time: every live key's pointers
//! are reported to the allocator, which learns which buckets hold clean, dirty or no data
//! and how old the oldest pointer into each is; metadata buckets are marked at the end.
//! Requests go on between slices. That is safe because the allocator invalidates nothing
//! while a pass runs, new data only goes into buckets that are pinned (open buckets, keys
//! not yet indexed), whose marks a pass keeps, and keys inserted behind the scan's position
//! point into such buckets.
//!
//! A pass runs when the allocator asks (it ran out of buckets to invalidate, or a gen
//! neared the window GC allows), and after every sixteenth of the cache written, as bcache
//! does (`sectors_to_gc`), so the writeback cutoffs see a recent `in_use`.

use std::time::{Duration, Instant};

use super::{CacheSet, SetState};
use crate::alloc::PtrKind;
use crate::index::{Key, ScanFilter, ScanPos};

/// Keys a GC slice reports between clock checks.
const GC_BATCH: usize = 1024;

#[derive(Default)]
pub(crate) struct GcState {
    pub running: bool,
    pub wanted: bool,
    pos: ScanPos,
    /// Sectors still to allocate before the next pass (bcache's `sectors_to_gc`).
    sectors_to_gc: i64,
    out: Vec<Key>,
    /// When the pass under way began.
    started: Option<Instant>,
    /// bcache's `btree_gc_*` time stats: the last pass's end, the mean and longest pass
    /// (start to end, slices and the requests between them), the mean time between passes.
    last: Option<Instant>,
    avg_duration: Duration,
    max_duration: Duration,
    avg_interval: Duration,
}

/// GC's time figures (bcache's `btree_gc_average_duration_ms`, `btree_gc_max_duration_ms`,
/// `btree_gc_average_frequency_sec`, `btree_gc_last_sec`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcTimes {
    /// Mean length of a pass (an exponentially weighted mean, weight 1/8 for the newest).
    pub average_duration: Duration,
    /// The longest pass.
    pub max_duration: Duration,
    /// Mean time between the ends of two passes (weighted likewise).
    pub average_interval: Duration,
    /// Since the last pass ended (None before the first).
    pub since_last: Option<Duration>,
}

/// bcache's `ewma_add` with weight 8.
fn ewma(avg: Duration, sample: Duration) -> Duration {
    if avg.is_zero() {
        sample
    } else {
        (avg * 7 + sample) / 8
    }
}

impl CacheSet {
    /// Sectors handed out for data: count them towards the next GC pass.
    pub(crate) fn gc_count_sectors(&mut self, sectors: u64) {
        self.gc.sectors_to_gc -= sectors as i64;
        if self.gc.sectors_to_gc <= 0 {
            self.gc.sectors_to_gc = self.gc_interval();
            self.gc.wanted = true;
        }
    }

    fn gc_interval(&self) -> i64 {
        ((self.geo.sb.nbuckets << self.geo.bucket_bits) / 16).max(1) as i64
    }

    /// Asks for a pass (the allocator cannot go on without one).
    pub(crate) fn gc_wanted(&mut self) {
        self.gc.wanted = true;
    }

    /// Asks for a GC pass now (bcache's `trigger_gc`); it runs in slices between requests
    /// (while the set starts too: a pass asked for then is not lost). Does nothing while
    /// one runs.
    pub fn trigger_gc(&mut self) {
        if !self.gc.running && matches!(self.state, SetState::Running | SetState::Starting) {
            self.gc.wanted = true;
        }
    }

    /// GC's time figures.
    pub fn gc_times(&self) -> GcTimes {
        GcTimes {
            average_duration: self.gc.avg_duration,
            max_duration: self.gc.max_duration,
            average_interval: self.gc.avg_interval,
            since_last: self.gc.last.map(|t| t.elapsed()),
        }
    }

    /// Begins a pass.
    pub(crate) fn gc_start(&mut self) {
        self.gc.wanted = false;
        self.gc.running = true;
        self.gc.pos = ScanPos::default();
        if self.gc.sectors_to_gc == 0 {
            self.gc.sectors_to_gc = self.gc_interval();
        }
        self.gc.started = Some(Instant::now());
        self.alloc.gc_start();
    }

    /// Runs the pass until `deadline` or its end; true when it finished.
    pub(crate) fn gc_slice(&mut self, deadline: Instant) -> bool {
        let mut out = std::mem::take(&mut self.gc.out);
        loop {
            let next = self.index.scan(self.gc.pos, ScanFilter::All, GC_BATCH, &self.alloc, &mut out);
            for k in &out {
                let kind = if k.dirty { PtrKind::Dirty } else { PtrKind::Clean };
                for &p in k.ptrs() {
                    if let Err(e) = self.alloc.gc_mark_ptr(p, k.size as u32, kind) {
                        self.gc.out = out;
                        self.fail(e);
                        return false;
                    }
                }
            }
            match next {
                Some(p) => self.gc.pos = p,
                None => {
                    self.gc.out = out;
                    self.gc_finish();
                    return true;
                }
            }
            if Instant::now() >= deadline {
                self.gc.out = out;
                return false;
            }
        }
    }

    /// Runs a whole pass at once (opening, when nothing else runs).
    pub(crate) fn gc_run(&mut self) {
        self.gc_start();
        let far = Instant::now() + std::time::Duration::from_secs(3600 * 24);
        while self.gc.running && !self.gc_slice(far) {}
    }

    fn gc_finish(&mut self) {
        let mut meta: Vec<u64> = self.geo.sb.journal_buckets.clone();
        meta.extend(self.meta.metadata_buckets());
        meta.extend(self.ckpt.buckets_in_flight());
        for b in meta {
            if let Err(e) = self.alloc.gc_mark_metadata_bucket(0, b) {
                return self.fail(e);
            }
        }
        if let Err(e) = self.alloc.gc_finish() {
            return self.fail(e);
        }
        self.gc.running = false;
        self.stats.gc_runs += 1;
        let now = Instant::now();
        if let Some(t) = self.gc.started.take() {
            let d = now.duration_since(t);
            self.gc.avg_duration = ewma(self.gc.avg_duration, d);
            self.gc.max_duration = self.gc.max_duration.max(d);
        }
        if let Some(last) = self.gc.last.replace(now) {
            self.gc.avg_interval = ewma(self.gc.avg_interval, now.duration_since(last));
        }
        let _ = self.update_in_use();
        if self.state != SetState::Starting {
            self.space_progress();
        }
        self.moving_gc_begin();
    }
}
