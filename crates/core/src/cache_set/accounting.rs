//! Request accounting as bcache's `stats.c` keeps it, per cached device and for the set:
//! hits, misses, bypassed hits and misses, miss collisions and bypassed sectors, in four
//! windows. Every 5 s (`accounting_delay`) what was counted since moves into each window,
//! and the windows decay by 31/32 (`accounting_weight` 32): the five-minute one at every
//! step, the hour one every 12th, the day one every 288th; the total never decays. Counts
//! are kept times 2^16 so that the decay keeps fractions, as bcache does.
//!
//! Nothing wakes the engine for this: the steps that fell due are applied when a request is
//! counted or the counts are read.

use std::time::{Duration, Instant};

/// How often counts move into the windows (bcache's `accounting_delay`, 5 s).
const STEP: Duration = Duration::from_secs(5);
/// Steps between decays of the five-minute, hour and day windows (bcache's
/// `FIVE_MINUTE_RESCALE`, `HOUR_RESCALE`, `DAY_RESCALE`).
const RESCALE: [u32; 3] = [1, 12, 288];
/// Decay weight (bcache's `accounting_weight`).
const WEIGHT: u64 = 32;
/// Fixed-point shift of the windows.
const SHIFT: u32 = 16;
/// Past this many missed steps every decaying window is empty anyway (31/32 to the 4000th
/// power is below 2^-180).
const MAX_CATCH_UP: u64 = 4000 * 288;

/// Counts of one window (or of requests since the last step), bcache's names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatWindow {
    /// Read requests served entirely from the cache.
    pub cache_hits: u64,
    /// Read requests that needed the backing device.
    pub cache_misses: u64,
    /// Bypassed read requests served entirely from the cache.
    pub cache_bypass_hits: u64,
    /// Bypassed read requests that needed the backing device.
    pub cache_bypass_misses: u64,
    /// Fills that lost (part of) their range to a write or invalidation, or found no space.
    pub cache_miss_collisions: u64,
    /// Sectors of requests that bypassed the cache (bcache's `bypassed`).
    pub bypassed_sectors: u64,
    /// Read misses extended by readahead (bcache's `cache_readaheads`).
    pub cache_readaheads: u64,
}

impl StatWindow {
    /// bcache's `cache_hit_ratio`: hits as a whole percentage of hits and misses (0 when
    /// there were none).
    pub fn hit_ratio(&self) -> u64 {
        (self.cache_hits * 100).checked_div(self.cache_hits + self.cache_misses).unwrap_or(0)
    }

    fn each(&mut self, f: impl Fn(&mut u64)) {
        for v in [
            &mut self.cache_hits,
            &mut self.cache_misses,
            &mut self.cache_bypass_hits,
            &mut self.cache_bypass_misses,
            &mut self.cache_miss_collisions,
            &mut self.bypassed_sectors,
            &mut self.cache_readaheads,
        ] {
            f(v)
        }
    }

    fn add_shifted(&mut self, o: &StatWindow) {
        self.cache_hits += o.cache_hits << SHIFT;
        self.cache_misses += o.cache_misses << SHIFT;
        self.cache_bypass_hits += o.cache_bypass_hits << SHIFT;
        self.cache_bypass_misses += o.cache_bypass_misses << SHIFT;
        self.cache_miss_collisions += o.cache_miss_collisions << SHIFT;
        self.bypassed_sectors += o.bypassed_sectors << SHIFT;
        self.cache_readaheads += o.cache_readaheads << SHIFT;
    }
}

/// The four windows of a device or of the set (bcache's `stats_total`, `stats_five_minute`,
/// `stats_hour`, `stats_day`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Accounting {
    pub five_minute: StatWindow,
    pub hour: StatWindow,
    pub day: StatWindow,
    pub total: StatWindow,
}

/// One collector.
#[derive(Clone, Debug)]
pub(crate) struct Collector {
    /// Counted since the last step, plain.
    pub active: StatWindow,
    /// five_minute, hour, day, total; times 2^16.
    windows: [StatWindow; 4],
    rescale: [u32; 3],
    next: Instant,
}

impl Collector {
    pub fn new(now: Instant) -> Collector {
        Collector { active: StatWindow::default(), windows: Default::default(), rescale: [0; 3], next: now + STEP }
    }

    /// Applies the steps that fell due by `now` (bcache's `scale_accounting`).
    pub fn catch_up(&mut self, now: Instant) {
        if now < self.next {
            return;
        }
        let steps = (now.duration_since(self.next).as_nanos() / STEP.as_nanos()) as u64 + 1;
        self.next += STEP * steps.min(u32::MAX as u64) as u32;
        let active = std::mem::take(&mut self.active);
        for w in &mut self.windows {
            w.add_shifted(&active);
        }
        for _ in 0..steps.min(MAX_CATCH_UP) {
            for (i, w) in self.windows[..3].iter_mut().enumerate() {
                self.rescale[i] += 1;
                if self.rescale[i] == RESCALE[i] {
                    self.rescale[i] = 0;
                    w.each(|v| *v = *v * (WEIGHT - 1) / WEIGHT);
                }
            }
        }
        if steps > MAX_CATCH_UP {
            self.windows[..3].iter_mut().for_each(|w| *w = StatWindow::default());
        }
    }

    /// The windows as of `now`, what was counted since the last step included (undecayed).
    pub fn view(&self, now: Instant) -> Accounting {
        let mut c = self.clone();
        c.catch_up(now);
        let active = c.active;
        let out = |w: &StatWindow| {
            let mut w = *w;
            w.add_shifted(&active);
            w.each(|v| *v >>= SHIFT);
            w
        };
        Accounting {
            five_minute: out(&c.windows[0]),
            hour: out(&c.windows[1]),
            day: out(&c.windows[2]),
            total: out(&c.windows[3]),
        }
    }
}

/// What one request adds.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event {
    /// A read: hit or not, bypassed or not.
    Read { hit: bool, bypass: bool },
    /// A fill collided.
    Collision,
    /// A request of this many sectors bypassed the cache.
    Bypassed(u64),
    /// A read miss was extended by readahead.
    Readahead,
}

impl StatWindow {
    pub(crate) fn count(&mut self, e: Event) {
        match e {
            Event::Read { hit: true, bypass: false } => self.cache_hits += 1,
            Event::Read { hit: false, bypass: false } => self.cache_misses += 1,
            Event::Read { hit: true, bypass: true } => self.cache_bypass_hits += 1,
            Event::Read { hit: false, bypass: true } => self.cache_bypass_misses += 1,
            Event::Collision => self.cache_miss_collisions += 1,
            Event::Bypassed(n) => self.bypassed_sectors += n,
            Event::Readahead => self.cache_readaheads += 1,
        }
    }
}

impl super::CacheSet {
    /// Counts `e` for the set and for device `inode`.
    pub(crate) fn account(&mut self, inode: u32, e: Event) {
        let now = Instant::now();
        self.accounting.catch_up(now);
        self.accounting.active.count(e);
        if let Some(Some(d)) = self.devs.get_mut(inode as usize) {
            d.accounting.catch_up(now);
            d.accounting.active.count(e);
        }
    }

    /// The set's request accounting: every cached device's, since the set was opened.
    pub fn accounting(&self) -> Accounting {
        self.accounting.view(Instant::now())
    }

    /// Device `inode`'s request accounting, since it was attached.
    pub fn device_accounting(&self, inode: u32) -> crate::error::Result<Accounting> {
        Ok(self.dev(inode)?.accounting.view(Instant::now()))
    }

    /// bcache's `clear_stats`: empties the windows of device `inode`, or (None) of the set
    /// and every device, as writing the set's `clear_stats` does.
    pub fn clear_accounting(&mut self, inode: Option<u32>) -> crate::error::Result<()> {
        let now = Instant::now();
        match inode {
            Some(i) => self.dev_mut(i)?.accounting = Collector::new(now),
            None => {
                self.accounting = Collector::new(now);
                for d in self.devs.iter_mut().flatten() {
                    d.accounting = Collector::new(now);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_reach_every_window_and_decay_at_each_windows_pace() {
        let t = Instant::now();
        let mut c = Collector::new(t);
        for _ in 0..320 {
            c.active.count(Event::Read { hit: true, bypass: false });
        }
        c.active.count(Event::Read { hit: false, bypass: false });
        // Before the first step: the counts show undecayed.
        let v = c.view(t + Duration::from_secs(1));
        assert_eq!((v.five_minute.cache_hits, v.total.cache_hits, v.total.cache_misses), (320, 320, 1));
        assert_eq!(v.total.hit_ratio(), 99);
        // The first step moves them and decays the five-minute window once: 320 × 31/32.
        c.catch_up(t + STEP);
        let v = c.view(t + STEP);
        assert_eq!(
            (v.five_minute.cache_hits, v.hour.cache_hits, v.day.cache_hits, v.total.cache_hits),
            (310, 320, 320, 320)
        );
        // Twelve steps: the hour window decays once, the five-minute one twelve times.
        c.catch_up(t + STEP * 12);
        let v = c.view(t + STEP * 12);
        let five = (320u64 << 16) as f64 * (31f64 / 32.0).powi(12);
        assert!((v.five_minute.cache_hits as f64 - five / 65536.0).abs() <= 1.0, "{v:?}");
        assert_eq!((v.hour.cache_hits, v.day.cache_hits, v.total.cache_hits), (310, 320, 320));
        // A day later the day window has decayed 300 times and the total not at all.
        let v = c.view(t + STEP * (12 + 288 * 300));
        assert_eq!(v.total.cache_hits, 320);
        assert_eq!((v.five_minute.cache_hits, v.hour.cache_hits), (0, 0));
        assert!(v.day.cache_hits < 320, "{v:?}");
        // Years later: a bounded catch-up, the decaying windows empty.
        let v = c.view(t + Duration::from_secs(3600 * 24 * 365 * 3));
        assert_eq!((v.day.cache_hits, v.total.cache_hits, v.total.cache_misses), (0, 320, 1));
    }

    #[test]
    fn each_event_lands_in_its_counter() {
        let mut w = StatWindow::default();
        w.count(Event::Read { hit: true, bypass: true });
        w.count(Event::Read { hit: false, bypass: true });
        w.count(Event::Read { hit: false, bypass: true });
        w.count(Event::Collision);
        w.count(Event::Bypassed(24));
        assert_eq!(
            w,
            StatWindow {
                cache_bypass_hits: 1,
                cache_bypass_misses: 2,
                cache_miss_collisions: 1,
                bypassed_sectors: 24,
                ..Default::default()
            }
        );
        assert_eq!(w.hit_ratio(), 0);
    }
}
