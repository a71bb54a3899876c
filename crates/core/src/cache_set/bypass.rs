//! Bypass (bcache's `check_should_bypass`): requests that would only push useful data out
//! of the cache go to the backing device instead.
//!
//! - **Sequential cutoff.** Recent streams are remembered by where they end (bcache's
//!   `io_hash`: 64 of them, each forgotten 5 s after its last request). A request that
//!   starts where a stream ended continues it; once a stream has moved `sequential_cutoff`
//!   bytes (its current request included), its requests bypass. Reads and writes may have
//!   cutoffs of their own. bcache also keeps a running average of each *task's* stream
//!   lengths; a library has no tasks (every caller shares the event loop), and an average
//!   over all callers would bypass a random reader because another reads sequentially, so
//!   only the stream itself counts here.
//! - **Congestion** (`bch_get_congested`; off by default, see [`CongestionConfig`]).
//!   Cache-device I/O slower than
//!   `congested_read_threshold_us` / `congested_write_threshold_us` drives a counter down by
//!   its latency in milliseconds; faster I/O and time bring it back. While it is down, a
//!   request bypasses when its stream is at least a threshold long that shrinks, with some
//!   randomness, as the congestion grows: at the worst, everything bypasses.
//! - **`CUTOFF_CACHE_ADD`.** Past 95% of the cache in use (dirty data and metadata), nothing
//!   new is added.
//!
//! A bypassed read is still served from the cache where it hits; its misses are read from
//! the backing device without filling. A bypassed write goes around the cache (the range
//! cached is dropped), except where it lands on dirty data, which it overwrites in place:
//! nothing stale is ever read (see `request::write`).

use std::time::{Duration, Instant};

use super::{CacheMode, CacheSet};
use crate::error::{Error, ErrorKind, Result};

/// Percentage of the cache in use past which nothing new enters it (bcache's
/// `CUTOFF_CACHE_ADD`).
pub const CUTOFF_CACHE_ADD: u64 = 95;
/// Streams remembered per cached device (bcache's `RECENT_IO`).
const RECENT_IO: usize = 64;
/// A stream is forgotten this long after its last request (bcache: 5000 ms).
const STREAM_EXPIRY: Duration = Duration::from_millis(5000);
/// Floor of the congestion counter (bcache's `CONGESTED_MAX`).
const CONGESTED_MAX: i64 = 1024;

/// Bypass tunables of a cached device, with bcache's names and defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BypassConfig {
    /// `sequential_cutoff`, bytes: a stream this long bypasses the cache; 0 turns the
    /// detector off. Default 4 MiB.
    pub sequential_cutoff: u64,
    /// The cutoff for reads, if not the shared one.
    pub sequential_cutoff_read: Option<u64>,
    /// The cutoff for writes, if not the shared one.
    pub sequential_cutoff_write: Option<u64>,
    /// `sequential_merge` (default true): a request that starts where a recent stream ended
    /// continues it; false counts each request alone (only a request itself as long as the
    /// cutoff bypasses).
    pub sequential_merge: bool,
    /// `readahead`, bytes (kept here with the other per-device request tunables): a read
    /// miss that ends where the request ends is extended by up to this much of what the
    /// cache does not hold after it, read into the cache and not returned. Default 0 (off).
    pub readahead: u64,
}

impl Default for BypassConfig {
    fn default() -> Self {
        BypassConfig {
            sequential_cutoff: 4 << 20,
            sequential_cutoff_read: None,
            sequential_cutoff_write: None,
            sequential_merge: true,
            readahead: 0,
        }
    }
}

impl BypassConfig {
    /// Refuses what bcache refuses (`sequential_cutoff` is clamped to 0..=UINT_MAX there).
    pub fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("sequential_cutoff", Some(self.sequential_cutoff)),
            ("sequential_cutoff_read", self.sequential_cutoff_read),
            ("sequential_cutoff_write", self.sequential_cutoff_write),
            ("readahead", Some(self.readahead)),
        ] {
            if v.is_some_and(|v| v > u64::from(u32::MAX)) {
                return Err(Error::new(ErrorKind::InvalidArgument, format!("{what}: must be 0..=4294967295 bytes")));
            }
        }
        Ok(())
    }

    /// The cutoff that applies to a read or a write, bytes (0: none).
    pub fn cutoff(&self, write: bool) -> u64 {
        let own = if write { self.sequential_cutoff_write } else { self.sequential_cutoff_read };
        own.unwrap_or(self.sequential_cutoff)
    }
}

/// Congestion tunables of a cache set (bcache's names).
///
/// Off by default, unlike bcache (2000 and 20000 µs, [`CongestionConfig::BCACHE`]): the
/// engine times a cache I/O from its request's start to the moment it handles the
/// completion, so the time its thread spends elsewhere (a busy event loop, a loaded
/// machine) counts as device latency. With bcache's values on, a registry test on a loaded
/// 2-core machine saw every read bypass the cache. Turn it on where the engine has its
/// thread to itself and the cache device is shared or can stall.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CongestionConfig {
    /// `congested_read_threshold_us`: cache reads slower than this count as congestion;
    /// 0 (the default) ignores reads.
    pub read_threshold_us: u32,
    /// `congested_write_threshold_us`: the same for writes; 0 (the default) ignores them.
    pub write_threshold_us: u32,
}

impl CongestionConfig {
    /// bcache's defaults.
    pub const BCACHE: CongestionConfig = CongestionConfig { read_threshold_us: 2000, write_threshold_us: 20000 };
}

/// Why a request bypassed the cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reason {
    /// The device's mode adds nothing (mode `none`; writes in writearound), or it detaches.
    Mode,
    /// The cache is past `CUTOFF_CACHE_ADD`.
    Full,
    /// Its stream passed the sequential cutoff.
    Sequential,
    /// The cache device is congested.
    Congested,
}

#[derive(Clone, Copy, Debug)]
struct Stream {
    /// Sector the stream's last request ended at.
    last: u64,
    expires: Instant,
    /// Bytes moved by the stream so far.
    sequential: u64,
    /// When the stream was last used, for reuse of the least recent.
    used: u64,
}

/// The recent streams of one cached device.
#[derive(Debug)]
pub(crate) struct Streams {
    s: Vec<Stream>,
    tick: u64,
}

impl Streams {
    pub fn new(now: Instant) -> Streams {
        Streams { s: vec![Stream { last: u64::MAX, expires: now, sequential: 0, used: 0 }; RECENT_IO], tick: 0 }
    }

    /// Records a request of `bytes` at `sector`; returns the bytes its stream has moved,
    /// this request included.
    pub fn track(&mut self, sector: u64, bytes: u64, now: Instant) -> u64 {
        self.tick += 1;
        let i = match self.s.iter().position(|s| s.last == sector && now < s.expires) {
            Some(i) => i,
            None => {
                let i = (0..self.s.len()).min_by_key(|&i| self.s[i].used).expect("streams");
                self.s[i].sequential = 0;
                i
            }
        };
        let s = &mut self.s[i];
        s.sequential = s.sequential.saturating_add(bytes);
        s.last = sector + bytes / 512;
        s.expires = now + STREAM_EXPIRY;
        s.used = self.tick;
        s.sequential
    }
}

/// A cached device's bypass state.
#[derive(Debug)]
pub(crate) struct Bypass {
    pub cfg: BypassConfig,
    pub streams: Streams,
}

impl Bypass {
    pub fn new(cfg: BypassConfig) -> Bypass {
        Bypass { cfg, streams: Streams::new(Instant::now()) }
    }
}

/// The congestion counter of a cache set.
#[derive(Debug)]
pub(crate) struct Congestion {
    pub cfg: CongestionConfig,
    /// Down by the milliseconds of slow I/O, up by one per fast I/O (bcache's `congested`).
    congested: i64,
    /// The last slow I/O (bcache's `congested_last_us`).
    last: Option<Instant>,
    rng: u64,
}

impl Congestion {
    pub fn new(cfg: CongestionConfig, seed: u64) -> Congestion {
        Congestion { cfg, congested: 0, last: None, rng: seed | 1 }
    }

    /// Whether a cache read (or write) is timed at all.
    pub fn timed(&self) -> bool {
        self.cfg.read_threshold_us != 0 || self.cfg.write_threshold_us != 0
    }

    /// A cache I/O took `latency` (bcache's `bch_bbio_count_io_errors`).
    pub fn sample(&mut self, write: bool, latency: Duration, now: Instant) {
        let threshold = if write { self.cfg.write_threshold_us } else { self.cfg.read_threshold_us };
        if threshold == 0 {
            return;
        }
        let us = latency.as_micros().min(i64::MAX as u128) as i64;
        if us > i64::from(threshold) {
            let ms = (us / 1024).min(CONGESTED_MAX + self.congested);
            self.last = Some(now);
            self.congested -= ms;
        } else if self.congested < 0 {
            self.congested += 1;
        }
    }

    /// Sectors a stream must have moved for a request of it to bypass; 0 when the cache is
    /// not congested (bcache's `bch_get_congested`).
    pub fn threshold(&mut self, now: Instant) -> u64 {
        if !self.timed() {
            return 0;
        }
        let Some(last) = self.last else { return 0 };
        let mut i = (now.saturating_duration_since(last).as_micros() / 1024).min(CONGESTED_MAX as u128) as i64;
        i += self.congested;
        if i >= 0 {
            return 0;
        }
        i += CONGESTED_MAX;
        if i > 0 {
            i = fract_exp_two(i as u64, 6) as i64;
        }
        // xorshift64: bcache subtracts the popcount of a random word.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        i -= i64::from((self.rng as u32).count_ones());
        if i > 0 {
            i as u64
        } else {
            1
        }
    }
}

/// 2^(x / 2^fract_bits), from the integer part and a linear fraction (bcache's `fract_exp_two`).
fn fract_exp_two(x: u64, fract_bits: u32) -> u64 {
    let fract = x & ((1 << fract_bits) - 1);
    let x = 1u64 << (x >> fract_bits).min(62);
    x + ((x * fract) >> fract_bits)
}

/// What one request's bypass decision needs to know.
pub(crate) struct Ask {
    pub mode: CacheMode,
    pub write: bool,
    pub sector: u64,
    pub bytes: u64,
    /// Percentage of the cache holding dirty data or metadata.
    pub in_use: u64,
    /// The device detaches (bcache's `BCACHE_DEV_DETACHING`).
    pub detaching: bool,
}

/// bcache's `check_should_bypass`, without the cache set around it.
/// The clock is read only when the detector or congestion needs it (not for a device with
/// neither, the common case on the request path).
pub(crate) fn decide(
    dev: &mut Bypass,
    congestion: &mut Congestion,
    a: &Ask,
    clock: impl FnOnce() -> Instant,
) -> Option<Reason> {
    if a.detaching {
        return Some(Reason::Mode);
    }
    if a.in_use > CUTOFF_CACHE_ADD {
        return Some(Reason::Full);
    }
    if a.mode == CacheMode::None || (a.mode == CacheMode::Writearound && a.write) {
        return Some(Reason::Mode);
    }
    let cutoff = dev.cfg.cutoff(a.write);
    if cutoff == 0 && !congestion.timed() {
        return None;
    }
    let now = clock();
    let congested = congestion.threshold(now);
    if congested == 0 && cutoff == 0 {
        return None;
    }
    let bytes = if dev.cfg.sequential_merge { dev.streams.track(a.sector, a.bytes, now) } else { a.bytes };
    let sectors = bytes / 512;
    if cutoff != 0 && sectors >= cutoff / 512 {
        return Some(Reason::Sequential);
    }
    if congested != 0 && sectors >= congested {
        return Some(Reason::Congested);
    }
    None
}

impl CacheSet {
    /// Whether a read or write of `inode` bypasses the cache, counted in the stats.
    pub(crate) fn bypass_check(&mut self, inode: u32, write: bool, sector: u64, sectors: u64) -> bool {
        let in_use = self.space.in_use;
        let Some(Some(dev)) = self.devs.get_mut(inode as usize) else { return false };
        if dev.flash {
            // Nowhere to go around the cache to.
            return false;
        }
        let a = Ask { mode: dev.mode, write, sector, bytes: sectors * 512, in_use, detaching: dev.detach.is_some() };
        let reason = decide(&mut dev.bypass, &mut self.congestion, &a, Instant::now);
        let Some(reason) = reason else { return false };
        self.account(inode, super::accounting::Event::Bypassed(sectors));
        let s = &mut self.stats;
        s.bypassed_sectors += sectors;
        match reason {
            Reason::Sequential => s.sequential_bypasses += 1,
            Reason::Congested => s.congested_bypasses += 1,
            Reason::Full => s.cache_add_cutoffs += 1,
            Reason::Mode => {}
        }
        true
    }

    /// A request's cache I/O finished `latency` after the request started.
    pub(crate) fn congestion_sample(&mut self, write: bool, started: Option<Instant>) {
        if let Some(t) = started {
            let now = Instant::now();
            self.congestion.sample(write, now.saturating_duration_since(t), now);
        }
    }

    /// The bypass tunables of `inode`.
    pub fn bypass_config(&self, inode: u32) -> Result<BypassConfig> {
        Ok(self.dev(inode)?.bypass.cfg.clone())
    }

    /// Sets the bypass tunables of `inode` (validated); the streams seen so far are kept.
    pub fn set_bypass_config(&mut self, inode: u32, cfg: BypassConfig) -> Result<()> {
        cfg.validate()?;
        self.dev_mut(inode)?.bypass.cfg = cfg;
        Ok(())
    }

    /// The set's congestion tunables.
    pub fn congestion_config(&self) -> CongestionConfig {
        self.congestion.cfg
    }

    /// Sets the set's congestion tunables (0 turns a direction's timing off).
    pub fn set_congestion_config(&mut self, cfg: CongestionConfig) {
        self.congestion.cfg = cfg;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(write: bool, sector: u64, kib: u64) -> Ask {
        Ask { mode: CacheMode::Writethrough, write, sector, bytes: kib << 10, in_use: 0, detaching: false }
    }

    fn off() -> Congestion {
        Congestion::new(CongestionConfig { read_threshold_us: 0, write_threshold_us: 0 }, 1)
    }

    #[test]
    fn without_sequential_merge_only_a_request_as_long_as_the_cutoff_bypasses() {
        let cfg = BypassConfig { sequential_cutoff: 1 << 20, sequential_merge: false, ..Default::default() };
        let mut dev = Bypass::new(cfg);
        let mut c = off();
        let now = Instant::now();
        // 64 KiB requests one after another: a stream of 4 MiB, never merged.
        for i in 0..64u64 {
            assert_eq!(decide(&mut dev, &mut c, &ask(false, i * 128, 64), || now), None, "request {i}");
        }
        assert_eq!(decide(&mut dev, &mut c, &ask(false, 1 << 20, 1024), || now), Some(Reason::Sequential));
        // Merged (the default), the same stream bypasses from its 16th request on.
        let mut dev = Bypass::new(BypassConfig { sequential_cutoff: 1 << 20, ..Default::default() });
        let first = (0..64u64).position(|i| decide(&mut dev, &mut c, &ask(false, i * 128, 64), || now).is_some());
        assert_eq!(first, Some(15));
    }

    #[test]
    fn interleaved_streams_each_reach_the_cutoff_and_random_io_between_them_never_does() {
        let mut dev = Bypass::new(BypassConfig { sequential_cutoff: 1 << 20, ..Default::default() });
        let mut c = off();
        let now = Instant::now();
        let (mut a, mut b) = (0u64, 1 << 30);
        let mut rng = 7u64;
        let mut bypassed = [0u32; 3];
        for step in 0..64u64 {
            // Two 64 KiB sequential streams and a 4 KiB random reader, interleaved.
            let ra = decide(&mut dev, &mut c, &ask(false, a, 64), || now);
            a += 128;
            let rb = decide(&mut dev, &mut c, &ask(true, b, 64), || now);
            b += 128;
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let rr = decide(&mut dev, &mut c, &ask(false, (rng >> 20) % (1 << 28) * 8, 4), || now);
            // A stream reaches 1 MiB with its 16th request.
            assert_eq!(ra.is_some(), step >= 15, "stream a, request {step}");
            assert_eq!(rb.is_some(), step >= 15, "stream b, request {step}");
            assert_eq!(rr, None, "random request {step}");
            bypassed[0] += ra.is_some() as u32;
            bypassed[1] += rb.is_some() as u32;
            bypassed[2] += rr.is_some() as u32;
        }
        assert_eq!(bypassed, [49, 49, 0]);
    }

    #[test]
    fn reads_and_writes_may_have_cutoffs_of_their_own_and_zero_turns_one_off() {
        let cfg = BypassConfig {
            sequential_cutoff: 1 << 20,
            sequential_cutoff_read: Some(0),
            sequential_cutoff_write: Some(256 << 10),
            sequential_merge: true,
            readahead: 0,
        };
        let mut dev = Bypass::new(cfg);
        let mut c = off();
        let now = Instant::now();
        for i in 0..32u64 {
            assert_eq!(decide(&mut dev, &mut c, &ask(false, i * 128, 64), || now), None, "reads never bypass");
        }
        let w: Vec<bool> = (0..8u64)
            .map(|i| decide(&mut dev, &mut c, &ask(true, (1 << 20) + i * 128, 64), || now).is_some())
            .collect();
        assert_eq!(w, [false, false, false, true, true, true, true, true], "256 KiB with the 4th write");
    }

    #[test]
    fn a_stream_is_forgotten_after_five_seconds_and_the_least_recent_makes_room() {
        let mut dev = Bypass::new(BypassConfig { sequential_cutoff: 128 << 10, ..Default::default() });
        let mut c = off();
        let t = Instant::now();
        assert_eq!(decide(&mut dev, &mut c, &ask(false, 0, 64), || t), None);
        assert_eq!(
            decide(&mut dev, &mut c, &ask(false, 128, 64), || t + Duration::from_secs(6)),
            None,
            "expired: a new stream"
        );
        assert_eq!(
            decide(&mut dev, &mut c, &ask(false, 256, 64), || t + Duration::from_secs(7)),
            Some(Reason::Sequential)
        );
        // 64 other streams push it out.
        for i in 0..64u64 {
            decide(&mut dev, &mut c, &ask(false, (i + 1) << 24, 4), || t + Duration::from_secs(7));
        }
        assert_eq!(decide(&mut dev, &mut c, &ask(false, 384, 64), || t + Duration::from_secs(7)), None, "forgotten");
    }

    #[test]
    fn modes_and_a_full_cache_bypass_before_any_stream_is_looked_at() {
        let mut dev = Bypass::new(BypassConfig { sequential_cutoff: 0, ..Default::default() });
        let mut c = off();
        let now = Instant::now();
        let mut a = ask(false, 0, 4);
        a.in_use = CUTOFF_CACHE_ADD;
        assert_eq!(decide(&mut dev, &mut c, &a, || now), None, "at the cutoff: still added");
        a.in_use = CUTOFF_CACHE_ADD + 1;
        assert_eq!(decide(&mut dev, &mut c, &a, || now), Some(Reason::Full));
        a.in_use = 0;
        a.mode = CacheMode::None;
        assert_eq!(decide(&mut dev, &mut c, &a, || now), Some(Reason::Mode));
        a.mode = CacheMode::Writearound;
        assert_eq!(decide(&mut dev, &mut c, &a, || now), None, "writearound reads fill");
        a.write = true;
        assert_eq!(decide(&mut dev, &mut c, &a, || now), Some(Reason::Mode));
    }

    #[test]
    fn congestion_grows_with_slow_io_and_fades_with_fast_io_and_time() {
        let mut c = Congestion::new(CongestionConfig::BCACHE, 3);
        let t = Instant::now();
        c.sample(false, Duration::from_micros(1500), t);
        assert_eq!(c.threshold(t), 0, "below the read threshold");
        c.sample(true, Duration::from_millis(15), t);
        assert_eq!(c.threshold(t), 0, "below the write threshold");
        // Mild congestion: only long streams bypass.
        c.sample(false, Duration::from_millis(10), t);
        let mild = c.threshold(t);
        assert!(mild > 10_000, "{mild}");
        // Severe: everything does.
        for _ in 0..200 {
            c.sample(false, Duration::from_millis(50), t);
        }
        assert_eq!(c.congested, -CONGESTED_MAX, "bounded");
        assert_eq!(c.threshold(t), 1);
        // Fast I/O brings it back a step at a time; time since the last slow I/O, all at once.
        for _ in 0..100 {
            c.sample(false, Duration::from_micros(100), t);
        }
        assert_eq!(c.congested, -CONGESTED_MAX + 100);
        assert_eq!(c.threshold(t + Duration::from_secs(2)), 0, "a second without slow I/O ends it");
        let mut dev = Bypass::new(BypassConfig { sequential_cutoff: 0, ..Default::default() });
        let mut c = Congestion::new(CongestionConfig::BCACHE, 3);
        for _ in 0..200 {
            c.sample(false, Duration::from_millis(50), t);
        }
        assert_eq!(decide(&mut dev, &mut c, &ask(false, 99, 4), || t), Some(Reason::Congested));
    }

    #[test]
    fn fract_exp_two_matches_bcache() {
        assert_eq!(fract_exp_two(0, 6), 1);
        assert_eq!(fract_exp_two(64, 6), 2);
        assert_eq!(fract_exp_two(96, 6), 3);
        assert_eq!(fract_exp_two(1024, 6), 65536);
    }

    #[test]
    fn cutoffs_past_u32_are_refused_by_name() {
        let e = BypassConfig { sequential_cutoff_write: Some(1 << 33), ..Default::default() }.validate().unwrap_err();
        assert!(e.message().contains("sequential_cutoff_write"), "{e}");
    }
}
